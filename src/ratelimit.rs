//! Client-side rate limiting of the AWS calls that mint URLs.
//!
//! AWS publishes no rate for the three operations, and throttling one refresh risks a lapse, so
//! the operator paces itself: one token bucket per (service, region, identity), and when calls
//! queue up, the most urgent one (the URL that stops working first) goes first, not the one that
//! arrived first.

use crate::providers::Service;
use jiff::Timestamp;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
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

/// Token buckets for every (service, region, identity).
pub struct RateLimits {
    /// Tokens added per second; zero or less disables limiting.
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<BucketKey, Arc<Bucket>>>,
}

struct Bucket {
    state: Mutex<BucketState>,
    changed: Notify,
}

struct BucketState {
    tokens: f64,
    refilled: Instant,
    /// Waiting callers, most urgent (earliest use-by) first; ties by arrival.
    waiting: BinaryHeap<Reverse<(i64, u64)>>,
    next_ticket: u64,
}

impl RateLimits {
    /// `rate` calls per second on average, bursts of up to `burst` calls.
    pub fn new(rate: f64, burst: u32) -> Self {
        RateLimits {
            rate,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
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

    /// Waits for a token of `key`'s bucket. `urgency` is when the current URL stops working
    /// (now, if there is none): earlier goes first. Returns how long the caller waited.
    /// Dropping the future gives up the place in the queue.
    pub async fn acquire(&self, key: &BucketKey, urgency: Timestamp) -> Duration {
        if self.rate <= 0.0 {
            return Duration::ZERO;
        }
        let started = Instant::now();
        let bucket = self.bucket(key);
        let ticket = {
            let mut state = lock(&bucket.state);
            let ticket = (urgency.as_millisecond(), state.next_ticket);
            state.next_ticket += 1;
            state.waiting.push(Reverse(ticket));
            ticket
        };
        let mut place = Place {
            bucket: &bucket,
            ticket,
            granted: false,
        };
        loop {
            let changed = bucket.changed.notified();
            tokio::pin!(changed);
            // Register for wake-ups before looking, so a change in between is not missed.
            changed.as_mut().enable();
            let wait_for_token = {
                let mut state = lock(&bucket.state);
                state.refill(Instant::now(), self.rate, self.burst);
                let first = state.waiting.peek() == Some(&Reverse(ticket));
                if first && state.tokens >= 1.0 {
                    state.tokens -= 1.0;
                    state.waiting.pop();
                    place.granted = true;
                    drop(state);
                    // The next in line may have a token too.
                    bucket.changed.notify_waiters();
                    return started.elapsed();
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
                        waiting: BinaryHeap::new(),
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

/// A caller's place in a bucket's queue; leaving without a token (the reconcile was cancelled)
/// frees the place for the next one.
struct Place<'a> {
    bucket: &'a Bucket,
    ticket: (i64, u64),
    granted: bool,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        if !self.granted {
            lock(&self.bucket.state)
                .waiting
                .retain(|Reverse(t)| *t != self.ticket);
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

/// Whether waiting `waited` for a token means demand is above the configured rate, as far as
/// one request can tell: the wait delayed its refresh by more than the random lead its schedule
/// allows for (the jitter share of `refresh_before`), and by at least a second. Shorter waits are
/// the limiter doing its job: spreading a burst of refreshes that fall due together.
pub fn delayed_refresh(waited: Duration, refresh_before: Duration) -> bool {
    let tolerated = refresh_before
        .mul_f64(crate::schedule::MAX_JITTER_SHARE)
        .max(Duration::from_secs(1));
    waited >= tolerated
}

/// Calls per second needed to refresh `requests` URLs of one bucket every `refresh_period`.
pub fn required_rate(requests: usize, refresh_period: Duration) -> f64 {
    if refresh_period.is_zero() {
        return f64::INFINITY;
    }
    requests as f64 / refresh_period.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

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
        limits.acquire(&key(), now).await;
        limits.acquire(&key(), now).await;
        for i in 0..BUCKETS_BEFORE_PRUNING {
            limits.acquire(&region(i), now).await;
        }
        assert_eq!(lock(&limits.buckets).len(), BUCKETS_BEFORE_PRUNING + 1);
        // A second later the made-up ones are full again, the drained one is not (1 of 2).
        tokio::time::advance(Duration::from_secs(1)).await;
        // A new bucket past the threshold drops every idle one, not the drained one.
        limits.acquire(&region(BUCKETS_BEFORE_PRUNING), now).await;
        assert_eq!(lock(&limits.buckets).len(), 2);
        assert!(lock(&limits.buckets).contains_key(&key()));
        // The drained bucket kept its pace: one token back after that second, then the next
        // only a second later.
        limits.acquire(&key(), now).await;
        let started = Instant::now();
        limits.acquire(&key(), now).await;
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
            assert_eq!(limits.acquire(&key(), now).await, Duration::ZERO);
        }
        // The burst is spent: one more token every half second.
        limits.acquire(&key(), now).await;
        limits.acquire(&key(), now).await;
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
        assert_eq!(limits.acquire(&other, now).await, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn the_most_urgent_caller_goes_first() {
        let limits = Arc::new(RateLimits::new(1.0, 1));
        let base = Timestamp::now();
        // Spend the burst so the next callers queue.
        limits.acquire(&key(), base).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let served = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        // Arrive in order of decreasing urgency... reversed: least urgent first.
        for (i, secs) in [300, 200, 100].into_iter().enumerate() {
            let (limits, order, served) = (limits.clone(), order.clone(), served.clone());
            tasks.push(tokio::spawn(async move {
                let urgency = base + jiff::SignedDuration::from_secs(secs);
                limits.acquire(&key(), urgency).await;
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
        limits.acquire(&key(), now).await;
        let urgent = {
            let limits = limits.clone();
            tokio::spawn(async move { limits.acquire(&key(), now).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        urgent.abort();
        let later = now + jiff::SignedDuration::from_secs(60);
        let waited = limits.acquire(&key(), later).await;
        assert!(
            waited <= Duration::from_secs(1),
            "blocked by a cancelled caller: {waited:?}"
        );
    }

    #[tokio::test]
    async fn zero_rate_means_no_limit() {
        let limits = RateLimits::unlimited();
        for _ in 0..1000 {
            assert_eq!(
                limits.acquire(&key(), Timestamp::now()).await,
                Duration::ZERO
            );
        }
    }

    #[test]
    fn only_waits_longer_than_the_jitter_lead_count_as_delays() {
        let refresh_before = Duration::from_secs(150);
        assert!(!delayed_refresh(Duration::from_secs(14), refresh_before));
        assert!(delayed_refresh(Duration::from_secs(15), refresh_before));
        // Short refreshBefore: at least a second.
        let short = Duration::from_secs(3);
        assert!(!delayed_refresh(Duration::from_millis(900), short));
        assert!(delayed_refresh(Duration::from_secs(1), short));
    }

    #[test]
    fn required_rate_per_refresh_period() {
        assert_eq!(required_rate(1500, Duration::from_secs(150)), 10.0);
        assert!(required_rate(1, Duration::ZERO).is_infinite());
    }
}
