//! Client-side rate limiting of the AWS calls that mint URLs.
//!
//! AWS publishes no rate for the three operations, and throttling one refresh risks a lapse, so
//! the operator paces itself: one token bucket per (service, region, identity), and when calls
//! queue up, the most urgent one (the URL that stops working first) goes first, not the one that
//! arrived first.
//!
//! A caller that has to wait for a token joins its bucket's line and gives its reconcile slot
//! back meanwhile (the `park` guard of [`RateLimits::acquire`]): a bucket whose demand is above
//! the rate would otherwise hold every slot with its waiters, and requests of other buckets,
//! with tokens to spare, would wait behind them until their own URLs lapsed. A line holds at
//! most `line` callers, and all lines together at most `parked` (each waiter is a suspended
//! reconcile, a few KiB): beyond that a caller is turned away ([`TurnedAway`]) and waits in the
//! work queue instead, until the line has room ([`crate::work_queue::WorkQueue::block`]). A
//! caller more urgent than the last in a full line takes that one's place, and the one it
//! replaced is turned away: the line always holds the most urgent callers.

use crate::providers::Service;
use jiff::Timestamp;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How many buckets exist before idle ones (full, unused) are dropped.
const BUCKETS_BEFORE_PRUNING: usize = 256;

/// What a bucket is shared by.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BucketKey {
    pub service: Service,
    pub region: String,
    /// The assumed role's ARN, or empty for the operator's own identity.
    pub identity: String,
}

impl BucketKey {
    /// A short name for the bucket, for the work queue's lists of requests turned away (two
    /// buckets that happen to share one only share that list).
    pub fn id(&self) -> u64 {
        let mut hasher = DefaultHasher::new();
        self.hash(&mut hasher);
        hasher.finish()
    }
}

/// A token, taken at once or after waiting in line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Granted {
    pub waited: Duration,
    /// The caller waited in line: leaving it made room for one that was turned away.
    pub from_line: bool,
}

/// The bucket's line was full of more urgent callers: try again when it has room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TurnedAway {
    /// When the line will have had room for this caller if every caller ahead of it takes its
    /// token in turn: the work queue's fallback in case nobody says so earlier.
    pub retry_after: Duration,
}

/// Token buckets for every (service, region, identity).
pub struct RateLimits {
    /// Tokens added per second; zero or less disables limiting.
    rate: f64,
    burst: f64,
    /// Callers one bucket's line holds.
    line: usize,
    /// Callers all lines hold together.
    parked_cap: usize,
    parked: Mutex<usize>,
    buckets: Mutex<HashMap<BucketKey, Arc<Bucket>>>,
}

struct Bucket {
    state: Mutex<BucketState>,
    changed: Notify,
}

struct BucketState {
    tokens: f64,
    refilled: Instant,
    /// Callers in line, most urgent (earliest use-by) first; ties by arrival.
    waiting: BTreeSet<(i64, u64)>,
    /// Callers whose place a more urgent one took; they leave the line turned away.
    displaced: HashSet<(i64, u64)>,
    next_ticket: u64,
}

impl RateLimits {
    /// `rate` calls per second on average, bursts of up to `burst` calls; lines of up to 16
    /// callers, 256 in all (see [`Self::with_lines`]).
    pub fn new(rate: f64, burst: u32) -> Self {
        RateLimits {
            rate,
            burst: f64::from(burst.max(1)),
            line: 16,
            parked_cap: 256,
            parked: Mutex::new(0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Lines of up to `line` callers per bucket and `total` callers in all (each at least one).
    pub fn with_lines(mut self, line: usize, total: usize) -> Self {
        self.line = line.max(1);
        self.parked_cap = total.max(1);
        self
    }

    /// No limit at all (tests that are not about pacing).
    pub fn unlimited() -> Self {
        Self::new(0.0, 1)
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    pub fn burst(&self) -> u32 {
        // Built from a u32 in `new`.
        self.burst as u32
    }

    /// Callers that can wait in lines at once, in all: what reconciles may be suspended in
    /// lines beyond the reconcile slots.
    pub fn parked_capacity(&self) -> usize {
        self.parked_cap
    }

    /// Gives back a token that was not used (its request went away while it waited): the next
    /// in line takes it.
    pub fn refund(&self, key: &BucketKey) {
        if self.rate <= 0.0 {
            return;
        }
        let bucket = self.bucket(key);
        {
            let mut state = lock(&bucket.state);
            state.refill(Instant::now(), self.rate, self.burst);
            state.tokens = (state.tokens + 1.0).min(self.burst);
        }
        bucket.changed.notify_waiters();
    }

    /// The time between two tokens of one bucket once its burst is spent (zero: no limit).
    pub fn token_interval(&self) -> Duration {
        if self.rate > 0.0 {
            Duration::from_secs_f64(1.0 / self.rate)
        } else {
            Duration::ZERO
        }
    }

    /// Takes a token of `key`'s bucket. `urgency` is when the current URL stops working (now, if
    /// there is none): earlier goes first. If there is no token for the caller at once, it joins
    /// the line, holding what `park` returns while it waits (the reconcile's slot given back),
    /// or it is turned away if the line is full of more urgent callers. Dropping the future
    /// gives up the place in the line.
    pub async fn acquire<P>(
        &self,
        key: &BucketKey,
        urgency: Timestamp,
        park: impl FnOnce() -> P,
    ) -> Result<Granted, TurnedAway> {
        let at_once = Granted {
            waited: Duration::ZERO,
            from_line: false,
        };
        if self.rate <= 0.0 {
            return Ok(at_once);
        }
        let started = Instant::now();
        let bucket = self.bucket(key);
        let ticket = {
            let mut state = lock(&bucket.state);
            state.refill(Instant::now(), self.rate, self.burst);
            if state.waiting.is_empty() && state.tokens >= 1.0 {
                state.tokens -= 1.0;
                return Ok(at_once);
            }
            let ticket = (urgency.as_millisecond(), state.next_ticket);
            state.next_ticket += 1;
            let turned_away = TurnedAway {
                retry_after: Duration::from_secs_f64(
                    (state.waiting.len() as f64 + 1.0 - state.tokens).max(1.0) / self.rate,
                ),
            };
            if state.waiting.len() >= self.line {
                // Full: take the last one's place if more urgent than it.
                match state.waiting.last().copied() {
                    Some(last) if ticket < last => {
                        state.waiting.remove(&last);
                        state.displaced.insert(last);
                        bucket.changed.notify_waiters();
                        // Counted until the displaced caller notices and leaves.
                        *lock(&self.parked) += 1;
                    }
                    _ => return Err(turned_away),
                }
            } else {
                let mut parked = lock(&self.parked);
                if *parked >= self.parked_cap {
                    return Err(turned_away);
                }
                *parked += 1;
            }
            state.waiting.insert(ticket);
            ticket
        };
        let mut place = Place {
            limits: self,
            bucket: &bucket,
            ticket,
            left: false,
        };
        let _parked = park();
        loop {
            let changed = bucket.changed.notified();
            tokio::pin!(changed);
            // Register for wake-ups before looking, so a change in between is not missed.
            changed.as_mut().enable();
            let wait_for_token = {
                let mut state = lock(&bucket.state);
                if state.displaced.remove(&ticket) {
                    place.leave();
                    let retry_after = Duration::from_secs_f64(
                        (state.waiting.len() as f64 + 1.0).max(1.0) / self.rate,
                    );
                    return Err(TurnedAway { retry_after });
                }
                state.refill(Instant::now(), self.rate, self.burst);
                let first = state.waiting.first() == Some(&ticket);
                if first && state.tokens >= 1.0 {
                    state.tokens -= 1.0;
                    state.waiting.pop_first();
                    place.leave();
                    drop(state);
                    // The next in line may have a token too.
                    bucket.changed.notify_waiters();
                    return Ok(Granted {
                        waited: started.elapsed(),
                        from_line: true,
                    });
                }
                first.then(|| Duration::from_secs_f64((1.0 - state.tokens) / self.rate))
            };
            match wait_for_token {
                Some(delay) => {
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {},
                        _ = &mut changed => {},
                    }
                }
                None => changed.await,
            }
        }
    }

    fn bucket(&self, key: &BucketKey) -> Arc<Bucket> {
        let mut buckets = lock(&self.buckets);
        if buckets.len() >= BUCKETS_BEFORE_PRUNING && !buckets.contains_key(key) {
            // A request's region is its author's choice: made-up ones must not grow this map
            // for ever. A bucket nobody holds, with no one waiting and every token back, is
            // exactly what a new one would be, so dropping it changes no one's pace.
            let now = Instant::now();
            buckets.retain(|_, bucket| {
                Arc::strong_count(bucket) > 1 || {
                    let mut state = lock(&bucket.state);
                    state.refill(now, self.rate, self.burst);
                    !state.waiting.is_empty() || state.tokens < self.burst
                }
            });
        }
        buckets
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Bucket {
                    state: Mutex::new(BucketState {
                        tokens: self.burst,
                        refilled: Instant::now(),
                        waiting: BTreeSet::new(),
                        displaced: HashSet::new(),
                        next_ticket: 0,
                    }),
                    changed: Notify::new(),
                })
            })
            .clone()
    }
}

impl BucketState {
    fn refill(&mut self, now: Instant, rate: f64, burst: f64) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.refilled = now;
    }
}

/// A caller's place in a bucket's line, and in the count of parked callers. Leaving without a
/// token (the reconcile was cancelled) frees the place for the next one.
struct Place<'a> {
    limits: &'a RateLimits,
    bucket: &'a Bucket,
    ticket: (i64, u64),
    left: bool,
}

impl Place<'_> {
    /// Out of the parked count; the line itself was already left (token taken, or displaced).
    fn leave(&mut self) {
        if !self.left {
            self.left = true;
            let mut parked = lock(&self.limits.parked);
            *parked = parked.saturating_sub(1);
        }
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        if !self.left {
            self.leave();
            let mut state = lock(&self.bucket.state);
            state.waiting.remove(&self.ticket);
            state.displaced.remove(&self.ticket);
            drop(state);
            self.bucket.changed.notify_waiters();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain numbers behind; they are still usable.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether a refresh that started `late_by` after its planned time means demand is above the
/// configured rate, as far as one request can tell: it had to wait in its bucket's line (no
/// token was free), and it started later than the random lead its schedule allows for (the
/// jitter share of `refresh_before`), and by at least a second. Shorter delays are the limiter
/// doing its job: spreading a burst of refreshes that fall due together. (Lateness counts the
/// time turned away by a full line and waiting for a slot, which the wait in line alone, at most
/// a line's length of tokens, does not.)
pub fn delayed_refresh(waited_in_line: bool, late_by: Duration, refresh_before: Duration) -> bool {
    let tolerated = refresh_before
        .mul_f64(crate::schedule::MAX_JITTER_SHARE)
        .max(Duration::from_secs(1));
    waited_in_line && late_by >= tolerated
}

/// What one request asks of the rate limit, for [`Demand`].
pub struct Refreshing<'a> {
    pub service: Service,
    /// The region it is served in (its own, its policy's, else the operator's default).
    pub region: &'a str,
    /// The role its policy assumes, or empty for the operator's own identity.
    pub identity: &'a str,
    /// Its `refreshBefore` (the default when unset), and its service's use-by window.
    pub refresh_before: Duration,
    pub window: Duration,
}

/// Calls per second the requests need, per rate-limit bucket (service, region, identity):
/// each refreshes every `window - refreshBefore` (with `refreshBefore` at most 90 % of the
/// window, as the schedule counts it, and the jitter's 10 % on top).
#[derive(Default)]
pub struct Demand(HashMap<(Service, String, String), f64>);

impl Demand {
    pub fn add(&mut self, request: &Refreshing<'_>) {
        let refresh_before = request.refresh_before.min(
            request
                .window
                .mul_f64(1.0 - crate::schedule::MIN_INTERVAL_SHARE),
        );
        let interval = request
            .window
            .saturating_sub(refresh_before.mul_f64(1.0 + crate::schedule::MAX_JITTER_SHARE));
        let rate = if interval.is_zero() {
            f64::INFINITY
        } else {
            1.0 / interval.as_secs_f64()
        };
        let bucket = (
            request.service,
            request.region.to_string(),
            request.identity.to_string(),
        );
        *self.0.entry(bucket).or_default() += rate;
    }

    /// The need of the busiest bucket of `service`, and that bucket's region and identity.
    pub fn busiest(&self, service: Service) -> (f64, Option<(&str, &str)>) {
        self.0
            .iter()
            .filter(|((s, _, _), _)| *s == service)
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or((0.0, None), |((_, region, identity), rate)| {
                (*rate, Some((region.as_str(), identity.as_str())))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Decrements `count` when dropped: tells a test when a park guard is let go.
    fn scopeguard(count: Arc<AtomicUsize>) -> impl Drop {
        struct Guard(Arc<AtomicUsize>);
        impl Drop for Guard {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        Guard(count)
    }

    fn key() -> BucketKey {
        BucketKey {
            service: Service::QuickSight,
            region: "us-east-1".into(),
            identity: String::new(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_buckets_are_dropped_and_busy_ones_keep_their_pace() {
        let limits = RateLimits::new(1.0, 2);
        let now = Timestamp::now();
        let region = |i: usize| BucketKey {
            region: format!("xx-made-up-{i}"),
            ..key()
        };
        // One bucket drained first, then more made-up ones than the threshold (no pruning
        // yet: each has spent a token, so none is idle).
        limits.acquire(&key(), now, || ()).await.unwrap();
        limits.acquire(&key(), now, || ()).await.unwrap();
        for i in 0..BUCKETS_BEFORE_PRUNING {
            limits.acquire(&region(i), now, || ()).await.unwrap();
        }
        assert_eq!(lock(&limits.buckets).len(), BUCKETS_BEFORE_PRUNING + 1);
        // A second later the made-up ones are full again, the drained one is not (1 of 2).
        tokio::time::advance(Duration::from_secs(1)).await;
        // A new bucket past the threshold drops every idle one, not the drained one.
        limits
            .acquire(&region(BUCKETS_BEFORE_PRUNING), now, || ())
            .await
            .unwrap();
        assert_eq!(lock(&limits.buckets).len(), 2);
        assert!(lock(&limits.buckets).contains_key(&key()));
        // The drained bucket kept its pace: one token back after that second, then the next
        // only a second later.
        limits.acquire(&key(), now, || ()).await.unwrap();
        let started = Instant::now();
        limits.acquire(&key(), now, || ()).await.unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "the drained bucket kept its pace"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_the_configured_rate() {
        let limits = RateLimits::new(2.0, 3);
        let now = Timestamp::now();
        let started = Instant::now();
        for _ in 0..3 {
            assert_eq!(
                limits.acquire(&key(), now, || ()).await.unwrap().waited,
                Duration::ZERO
            );
        }
        // The burst is spent: one more token every half second.
        limits.acquire(&key(), now, || ()).await.unwrap();
        limits.acquire(&key(), now, || ()).await.unwrap();
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(1000) && elapsed < Duration::from_millis(1100),
            "{elapsed:?}"
        );
        // Another bucket is independent.
        let other = BucketKey {
            region: "eu-west-1".into(),
            ..key()
        };
        assert_eq!(
            limits.acquire(&other, now, || ()).await.unwrap().waited,
            Duration::ZERO
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_most_urgent_caller_goes_first() {
        let limits = Arc::new(RateLimits::new(1.0, 1));
        let base = Timestamp::now();
        // Spend the burst so the next callers queue.
        limits.acquire(&key(), base, || ()).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let served = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        // Arrive in order of decreasing urgency... reversed: least urgent first.
        for (i, secs) in [300, 200, 100].into_iter().enumerate() {
            let (limits, order, served) = (limits.clone(), order.clone(), served.clone());
            tasks.push(tokio::spawn(async move {
                let urgency = base + jiff::SignedDuration::from_secs(secs);
                limits.acquire(&key(), urgency, || ()).await.unwrap();
                lock(&order).push(secs);
                served.fetch_add(1, Ordering::SeqCst);
            }));
            // Make the arrival order certain.
            tokio::time::sleep(Duration::from_millis(1 + i as u64)).await;
        }
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(*lock(&order), vec![100, 200, 300]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_caller_frees_its_place() {
        let limits = Arc::new(RateLimits::new(1.0, 1));
        let now = Timestamp::now();
        limits.acquire(&key(), now, || ()).await.unwrap();
        let urgent = {
            let limits = limits.clone();
            tokio::spawn(async move { limits.acquire(&key(), now, || ()).await.unwrap().waited })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        urgent.abort();
        let later = now + jiff::SignedDuration::from_secs(60);
        let waited = limits.acquire(&key(), later, || ()).await.unwrap().waited;
        assert!(
            waited <= Duration::from_secs(1),
            "blocked by a cancelled caller: {waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_caller_is_parked_and_a_full_line_turns_the_least_urgent_away() {
        let limits = Arc::new(RateLimits::new(1.0, 1).with_lines(2, 100));
        let base = Timestamp::now();
        let at = move |secs: i64| base + jiff::SignedDuration::from_secs(secs);
        let parked = Arc::new(AtomicUsize::new(0));
        // A token at once: never parked.
        let park = |parked: &Arc<AtomicUsize>| {
            let parked = parked.clone();
            move || {
                parked.fetch_add(1, Ordering::SeqCst);
                scopeguard(parked)
            }
        };
        let granted = limits.acquire(&key(), at(0), park(&parked)).await;
        assert_eq!(granted.map(|g| g.from_line), Ok(false));
        assert_eq!(parked.load(Ordering::SeqCst), 0);
        // Two callers fill the line, parked while they wait.
        let mut line = Vec::new();
        for secs in [200, 300] {
            let (limits, park) = (limits.clone(), park(&parked));
            line.push(tokio::spawn(async move {
                limits.acquire(&key(), at(secs), park).await
            }));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(parked.load(Ordering::SeqCst), 2);
        assert_eq!(*lock(&limits.parked), 2);
        // Less urgent than everyone in the full line: turned away at once, never parked.
        let turned = limits.acquire(&key(), at(400), park(&parked)).await;
        assert!(matches!(turned, Err(TurnedAway { .. })), "{turned:?}");
        assert_eq!(parked.load(Ordering::SeqCst), 2);
        // More urgent than the last in line: takes its place; the last is turned away.
        let urgent = {
            let (limits, park) = (limits.clone(), park(&parked));
            tokio::spawn(async move { limits.acquire(&key(), at(100), park).await })
        };
        let last = line.pop().unwrap().await.unwrap();
        assert!(matches!(last, Err(TurnedAway { .. })), "{last:?}");
        // The two left take their tokens, most urgent first, a second apart.
        let started = Instant::now();
        assert_eq!(urgent.await.unwrap().map(|g| g.from_line), Ok(true));
        assert!(started.elapsed() <= Duration::from_millis(1100));
        assert!(line.pop().unwrap().await.unwrap().is_ok());
        assert!(started.elapsed() >= Duration::from_millis(1900));
        assert_eq!(*lock(&limits.parked), 0, "every parked caller counted out");
        // Each park guard was dropped when its caller left the line.
        assert_eq!(parked.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn all_lines_together_hold_at_most_the_parked_capacity() {
        let limits = Arc::new(RateLimits::new(1.0, 1).with_lines(10, 1));
        let now = Timestamp::now();
        let other = BucketKey {
            region: "eu-west-1".into(),
            ..key()
        };
        limits.acquire(&key(), now, || ()).await.unwrap();
        limits.acquire(&other, now, || ()).await.unwrap();
        let waiting = {
            let limits = limits.clone();
            tokio::spawn(async move { limits.acquire(&key(), now, || ()).await })
        };
        tokio::time::sleep(Duration::from_millis(1)).await;
        // The other bucket's line is empty, but no one else may park.
        let turned = limits.acquire(&other, now, || ()).await;
        assert!(matches!(turned, Err(TurnedAway { .. })), "{turned:?}");
        assert!(waiting.await.unwrap().is_ok());
        assert!(limits.acquire(&other, now, || ()).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_refunded_token_goes_to_the_next_in_line() {
        let limits = Arc::new(RateLimits::new(1.0, 1));
        let now = Timestamp::now();
        limits.acquire(&key(), now, || ()).await.unwrap();
        let next = {
            let limits = limits.clone();
            tokio::spawn(async move { limits.acquire(&key(), now, || ()).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        limits.refund(&key());
        let waited = next.await.unwrap().unwrap().waited;
        assert!(waited < Duration::from_millis(200), "{waited:?}");
    }

    #[tokio::test]
    async fn zero_rate_means_no_limit() {
        let limits = RateLimits::unlimited();
        for _ in 0..1000 {
            assert_eq!(
                limits
                    .acquire(&key(), Timestamp::now(), || ())
                    .await
                    .map(|g| g.waited),
                Ok(Duration::ZERO)
            );
        }
    }

    #[test]
    fn only_waits_longer_than_the_jitter_lead_count_as_delays() {
        let refresh_before = Duration::from_secs(150);
        assert!(!delayed_refresh(
            true,
            Duration::from_secs(14),
            refresh_before
        ));
        assert!(delayed_refresh(
            true,
            Duration::from_secs(15),
            refresh_before
        ));
        // Late for another reason (slots, not tokens): not the rate limit's doing.
        assert!(!delayed_refresh(
            false,
            Duration::from_secs(60),
            refresh_before
        ));
        // Short refreshBefore: at least a second.
        let short = Duration::from_secs(3);
        assert!(!delayed_refresh(true, Duration::from_millis(900), short));
        assert!(delayed_refresh(true, Duration::from_secs(1), short));
    }

    #[test]
    fn demand_counts_each_requests_refresh_interval_per_bucket() {
        let window = Duration::from_secs(300);
        let request = |region, refresh_before: u64| Refreshing {
            service: Service::QuickSight,
            region,
            identity: "",
            refresh_before: Duration::from_secs(refresh_before),
            window,
        };
        let mut demand = Demand::default();
        // 150 s ahead (plus up to 15 s of jitter): one call every 135 s at the most.
        for _ in 0..27 {
            demand.add(&request("us-east-1", 150));
        }
        let (rate, bucket) = demand.busiest(Service::QuickSight);
        assert!((rate - 0.2).abs() < 1e-9, "{rate}");
        assert_eq!(bucket, Some(("us-east-1", "")));
        // A request refreshing 4 min ahead needs more than twice as much.
        let mut eager = Demand::default();
        eager.add(&request("us-east-1", 240));
        let (rate, _) = eager.busiest(Service::QuickSight);
        assert!((rate - 1.0 / 36.0).abs() < 1e-9, "{rate}");
        // Another region is another bucket: the busiest one counts.
        for _ in 0..10 {
            demand.add(&request("eu-west-1", 150));
        }
        assert_eq!(
            demand.busiest(Service::QuickSight).1,
            Some(("us-east-1", ""))
        );
        // So is another identity in the same region: twenty requests under a role are a bucket
        // of their own, and the twenty-seven under the operator's own identity stay the busiest
        // (counted together, the region's forty-seven would be).
        for _ in 0..20 {
            demand.add(&Refreshing {
                identity: "arn:aws:iam::111122223333:role/embed",
                ..request("us-east-1", 150)
            });
        }
        let (rate, bucket) = demand.busiest(Service::QuickSight);
        assert!((rate - 0.2).abs() < 1e-9, "{rate}");
        assert_eq!(bucket, Some(("us-east-1", "")));
        assert_eq!(demand.busiest(Service::Flink), (0.0, None));
    }
}
