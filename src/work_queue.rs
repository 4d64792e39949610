//! Which request is reconciled next, and when.
//!
//! Every reason to reconcile a request (a change a user made, a change to its Secret, a policy
//! change, the planned refresh, a retry) is an entry here with a due time. Entries that are due
//! are started at most `slots` at a time (a reconcile in flight holds a slot, except while it
//! waits in an AWS rate-limit line: [`WorkQueue::park`]), the request whose URL stops working
//! first going first, ties by arrival, and never two reconciles of one request at once. Requests
//! turned away by a full rate-limit line wait here, without a slot, until it has room
//! ([`WorkQueue::block`]).
//!
//! kube-runtime's controller could schedule and bound reconciles itself, but at its bound it
//! moves the due ones into a hash set and takes them out in hash order: under a backlog that
//! lasts (AWS slower than the refreshes need, or the client-side rate limit below it) the same
//! requests are taken again and again while others never are, and their Secrets never get a
//! URL. Starting every due reconcile at once instead costs the controller a poll of every
//! reconcile in flight on each wake-up, quadratic under a backlog. So this queue decides, and
//! the controller module runs what it hands out (see `controller::dispatch`). An entry is a few
//! small allocations (kube-runtime's scheduler keeps two copies of the object reference with
//! four strings each).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// A request, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestKey {
    pub namespace: Box<str>,
    pub name: Box<str>,
}

impl RequestKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        RequestKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of a request object.
    pub fn of(request: &impl kube::ResourceExt) -> Self {
        Self::new(
            &request.namespace().unwrap_or_default(),
            &request.name_any(),
        )
    }
}

/// How urgent a due request is: when its URL stops working, in Unix milliseconds (smaller goes
/// first). Asked when an entry comes due, so it reflects the latest status.
pub type Urgency = Box<dyn Fn(&RequestKey) -> i64 + Send + Sync>;

pub struct WorkQueue {
    state: Mutex<State>,
    /// An entry came due earlier than the dispatcher was waiting for, or a slot was freed.
    changed: Notify,
    slots: usize,
    urgency: Urgency,
    made: Instant,
}

/// How the queue is stuck ([`WorkQueue::stall`]); its `Display` is what `/healthz` answers.
#[derive(Debug, PartialEq, Eq)]
pub enum Stall {
    /// Due work waits while slots are free: nothing takes it.
    NotTaken {
        overdue: Duration,
        free_slots: usize,
    },
    /// Every slot is held by a reconcile, and none ended for this long.
    SlotsHeld { slots: usize, for_: Duration },
}

/// What `/healthz` checks: whether the work queue of the controllers running now (a leader's,
/// while it leads; none on a replica standing by) is stuck ([`WorkQueue::stall`]).
#[derive(Clone, Default)]
pub struct Liveness {
    queue: Arc<Mutex<Weak<WorkQueue>>>,
    /// None: never judged stuck.
    limit: Option<Duration>,
}

impl Liveness {
    /// Judges the queue stuck after `limit` without progress; zero turns the check off.
    pub fn new(limit: Duration) -> Self {
        Liveness {
            queue: Arc::default(),
            limit: (!limit.is_zero()).then_some(limit),
        }
    }

    /// The queue to judge from now on (held weakly: once the controllers stop, there is none).
    pub fn watch(&self, queue: &Arc<WorkQueue>) {
        *self
            .queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::downgrade(queue);
    }

    /// How the queue is stuck, if it is.
    pub fn stall(&self) -> Option<Stall> {
        let limit = self.limit?;
        let queue = self
            .queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .upgrade()?;
        queue.stall(limit)
    }
}

impl std::fmt::Display for Stall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stall::NotTaken {
                overdue,
                free_slots,
            } => write!(
                f,
                "stalled: a request is {} s overdue while {free_slots} reconcile slots are free",
                overdue.as_secs()
            ),
            Stall::SlotsHeld { slots, for_ } => write!(
                f,
                "stalled: all {slots} reconcile slots held and no reconcile ended for {} s",
                for_.as_secs()
            ),
        }
    }
}

#[derive(Default)]
struct State {
    entries: HashMap<Arc<RequestKey>, Entry>,
    /// Entries turned away by a full rate-limit line, by bucket ([`BucketKey::id`]), most
    /// urgent first; each also waits in `waiting` until its fallback time.
    ///
    /// [`BucketKey::id`]: crate::ratelimit::BucketKey::id
    blocked: HashMap<u64, BTreeMap<(i64, u64), Arc<RequestKey>>>,
    /// How many entries `blocked` holds in all.
    blocked_count: usize,
    /// Entries not due yet, by due time and arrival.
    waiting: BTreeMap<(Instant, u64), Arc<RequestKey>>,
    /// Entries that are due, most urgent first, then by arrival.
    due: BTreeMap<(i64, u64), Arc<RequestKey>>,
    next_ticket: u64,
    /// Reconciles in flight, holding a slot.
    running: usize,
    /// Since when a slot has been free (None while every slot is held): with due work, a
    /// dispatcher that takes nothing for long is stuck ([`WorkQueue::stall`]).
    slot_free_since: Option<Instant>,
    /// Since when every slot has been held (None while one is free).
    all_held_since: Option<Instant>,
    /// When a reconcile last ended. With `all_held_since`: every slot held and none ending for
    /// long means the reconciles holding them are stuck. (Parked reconciles taking their slots
    /// back can hold more than all of them for a moment, so an end does not always free one.)
    last_ended: Option<Instant>,
    /// Requests whose reconcile is running (or waiting in a rate-limit line), and what
    /// happened to them meanwhile.
    in_flight: HashMap<Arc<RequestKey>, InFlight>,
}

/// What happened to a request while a reconcile of it was in flight.
#[derive(Clone, Copy, Default)]
struct InFlight {
    /// It came due again: handed out again when the reconcile ends, not while it runs (where
    /// the two would race, or the second would hold a slot waiting for the first).
    due_again: bool,
    /// It was deleted ([`WorkQueue::forget`]): what the reconcile records about it would
    /// outlive it (see [`Running::forgotten`]). Stays set if a request of the same name is
    /// created meanwhile (that one is then `due_again`).
    forgotten: bool,
}

#[derive(Clone, Copy)]
struct Entry {
    at: Instant,
    ticket: u64,
    /// Set once due: the key in `due`.
    urgency: Option<i64>,
    /// Set while turned away by this rate-limit bucket: the key in `blocked`.
    blocked_on: Option<(u64, i64)>,
}

impl WorkQueue {
    /// `slots` reconciles in flight at most (at least one).
    pub fn new(slots: usize, urgency: Urgency) -> Self {
        WorkQueue {
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            slots: slots.max(1),
            urgency,
            made: Instant::now(),
        }
    }

    /// Reconcile `key` at `at` at the latest: an entry already due earlier stays as it is.
    pub fn schedule(&self, key: &RequestKey, at: Instant) {
        let mut state = self.lock();
        let moved_earlier = state.schedule(key, at);
        drop(state);
        if moved_earlier {
            // The dispatcher may be sleeping until a later entry.
            self.changed.notify_one();
        }
    }

    /// `key` was turned away by the full line of rate-limit bucket `bucket` (with `urgency`, as
    /// the line orders callers): reconcile it when [`Self::release_blocked`] says that line has
    /// room, most urgent first, or at a fallback time at the latest. An entry due earlier (a
    /// change since the reconcile began) stays as it is.
    ///
    /// The fallback is `first_turn` plus `per_turn` for every request of the bucket already
    /// turned away: when its turn would come if the line served them all in order, so that a
    /// large crowd turned away is not reconciled all at once, again and again.
    pub fn block(
        &self,
        key: &RequestKey,
        bucket: u64,
        urgency: i64,
        first_turn: Duration,
        per_turn: Duration,
    ) {
        let mut state = self.lock();
        if state.in_flight.get(key).is_some_and(|f| f.forgotten) {
            // Deleted while its reconcile waited for the line: it has no turn to wait for.
            return;
        }
        let ahead = state.blocked.get(&bucket).map_or(0, BTreeMap::len);
        let fallback = Instant::now()
            + first_turn
            + per_turn.saturating_mul(u32::try_from(ahead).unwrap_or(u32::MAX));
        if let Some(entry) = state.entries.get(key).copied() {
            if entry.at <= fallback {
                return;
            }
            state.unlink(key, entry);
        }
        let (ticket, key) = state.insert(key, fallback, Some((bucket, urgency)));
        state
            .blocked
            .entry(bucket)
            .or_default()
            .insert((urgency, ticket), key);
        state.blocked_count += 1;
        drop(state);
        self.changed.notify_one();
    }

    /// A caller left `bucket`'s line with its token: the most urgent request it turned away
    /// may take the place, as soon as a slot allows.
    pub fn release_blocked(&self, bucket: u64) {
        let key = {
            let mut state = self.lock();
            let Some(blocked) = state.blocked.get_mut(&bucket) else {
                return;
            };
            let Some((_, key)) = blocked.pop_first() else {
                return;
            };
            if blocked.is_empty() {
                state.blocked.remove(&bucket);
            }
            state.blocked_count -= 1;
            if let Some(entry) = state.entries.get_mut(&*key) {
                // Already out of `blocked`: unlinked below from `waiting` only.
                entry.blocked_on = None;
            }
            key
        };
        self.schedule_now(&key);
    }

    /// Gives the caller's reconcile slot back while it waits in a rate-limit line; the slot is
    /// taken again when the guard is dropped, even if that makes more reconciles run than there
    /// are slots for a moment (the dispatcher then waits until enough have finished).
    pub fn park(&self) -> Parked<'_> {
        {
            let mut state = self.lock();
            state.running = state.running.saturating_sub(1);
            state.track_slots(self.slots);
        }
        self.changed.notify_one();
        Parked { queue: self }
    }

    /// Reconcile `key` as soon as a slot allows.
    pub fn schedule_now(&self, key: &RequestKey) {
        self.schedule(key, Instant::now());
    }

    /// Drops everything about a deleted request (a reconcile in flight runs to its end, and is
    /// not followed by another).
    pub fn forget(&self, key: &RequestKey) {
        let mut state = self.lock();
        if let Some(entry) = state.entries.get(key).copied() {
            state.unlink(key, entry);
        }
        if let Some(in_flight) = state.in_flight.get_mut(key) {
            *in_flight = InFlight {
                due_again: false,
                forgotten: true,
            };
        }
    }

    /// Whether the queue has made no progress for `limit` although it had work: a request
    /// overdue by `limit` while a slot has been free that long (whoever takes work from the
    /// queue stopped taking it), or every slot held and no reconcile ended for `limit` (the
    /// reconciles holding them are stuck). `/healthz` reports it, so that Kubernetes restarts
    /// the process. Either is a bug: a healthy dispatcher takes due work as soon as a slot is
    /// free, and every wait of a reconcile has a bounded time (the API and AWS timeouts).
    pub fn stall(&self, limit: Duration) -> Option<Stall> {
        let now = Instant::now();
        let state = self.lock();
        let long_ago = |at: Instant| now.saturating_duration_since(at) >= limit;
        if state.running >= self.slots {
            let since = state
                .all_held_since
                .unwrap_or(now)
                .max(state.last_ended.unwrap_or(self.made));
            return long_ago(since).then(|| Stall::SlotsHeld {
                slots: self.slots,
                for_: now.saturating_duration_since(since),
            });
        }
        let free_since = state.slot_free_since.unwrap_or(self.made);
        if !long_ago(free_since) {
            return None;
        }
        // Entries that came due and were not taken: those promoted but left in `due`, and the
        // earliest still waiting for their time.
        let promoted = state
            .due
            .values()
            .filter_map(|key| state.entries.get(key).map(|entry| entry.at));
        let waiting = state.waiting.keys().next().map(|(at, _)| *at);
        let oldest = promoted.chain(waiting).min()?;
        long_ago(oldest).then(|| Stall::NotTaken {
            overdue: now.saturating_duration_since(oldest),
            free_slots: self.slots - state.running,
        })
    }

    /// Entries known, due or not (for tests and diagnostics).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits for the next request to reconcile: due, a slot free for it, and no reconcile of
    /// it in flight. Its reconcile holds the slot from now on, until the returned guard is
    /// dropped. `backlog` is told how many due requests wait for a slot, or for room in a
    /// rate-limit line, each time that is looked at.
    pub async fn next(self: &Arc<Self>, backlog: impl Fn(usize)) -> Running {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before looking, so a change in between is not missed.
            changed.as_mut().enable();
            let wake_at = {
                let mut state = self.lock();
                self.promote(&mut state, Instant::now());
                while state.running < self.slots
                    && let Some((_, key)) = state.due.pop_first()
                {
                    state.entries.remove(&*key);
                    if let Some(in_flight) = state.in_flight.get_mut(&*key) {
                        // Its reconcile is still running: once more when it ends.
                        in_flight.due_again = true;
                        continue;
                    }
                    state.running += 1;
                    state.track_slots(self.slots);
                    state.in_flight.insert(key.clone(), InFlight::default());
                    backlog(state.due.len() + state.blocked_count);
                    return Running {
                        queue: self.clone(),
                        key,
                    };
                }
                backlog(state.due.len() + state.blocked_count);
                // Full (a finished reconcile wakes us), or nothing due yet.
                state.waiting.keys().next().map(|(at, _)| *at)
            };
            match wake_at {
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {},
                        _ = &mut changed => {},
                    }
                }
                None => changed.await,
            }
        }
    }

    /// Moves the entries that are due into `due`, ordered by their urgency now.
    fn promote(&self, state: &mut State, now: Instant) {
        while let Some(entry) = state.waiting.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let ((_, ticket), key) = entry.remove_entry();
            let urgency = (self.urgency)(&key);
            let blocked_on = state.entries.get_mut(&*key).and_then(|entry| {
                entry.urgency = Some(urgency);
                entry.blocked_on.take()
            });
            // Due at its fallback time: no longer waiting for its line to have room.
            if let Some((bucket, blocked_urgency)) = blocked_on {
                state.unblock(bucket, blocked_urgency, ticket);
            }
            state.due.insert((urgency, ticket), key);
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain data, consistent between statements: usable after a panic elsewhere.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    /// Keeps `slot_free_since` in step with `running`.
    fn track_slots(&mut self, slots: usize) {
        if self.running >= slots {
            self.slot_free_since = None;
            self.all_held_since.get_or_insert_with(Instant::now);
        } else {
            self.all_held_since = None;
            self.slot_free_since.get_or_insert_with(Instant::now);
        }
    }

    /// [`WorkQueue::schedule`] under its lock; false if an entry due no later was kept.
    fn schedule(&mut self, key: &RequestKey, at: Instant) -> bool {
        if let Some(entry) = self.entries.get(key).copied() {
            if entry.at <= at {
                return false;
            }
            self.unlink(key, entry);
        }
        self.insert(key, at, None);
        true
    }

    /// A new entry for `key`, waiting until `at`; its ticket and shared key.
    fn insert(
        &mut self,
        key: &RequestKey,
        at: Instant,
        blocked_on: Option<(u64, i64)>,
    ) -> (u64, Arc<RequestKey>) {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let key = Arc::new(key.clone());
        self.waiting.insert((at, ticket), key.clone());
        self.entries.insert(
            key.clone(),
            Entry {
                at,
                ticket,
                urgency: None,
                blocked_on,
            },
        );
        (ticket, key)
    }

    /// Removes `key`'s entry from the maps it is in.
    fn unlink(&mut self, key: &RequestKey, entry: Entry) {
        match entry.urgency {
            Some(urgency) => self.due.remove(&(urgency, entry.ticket)),
            None => self.waiting.remove(&(entry.at, entry.ticket)),
        };
        if let Some((bucket, urgency)) = entry.blocked_on {
            self.unblock(bucket, urgency, entry.ticket);
        }
        self.entries.remove(key);
    }

    /// Takes an entry out of `bucket`'s list of requests turned away.
    fn unblock(&mut self, bucket: u64, urgency: i64, ticket: u64) {
        if let Some(blocked) = self.blocked.get_mut(&bucket) {
            if blocked.remove(&(urgency, ticket)).is_some() {
                self.blocked_count -= 1;
            }
            if blocked.is_empty() {
                self.blocked.remove(&bucket);
            }
        }
    }
}

/// A reconcile in flight; dropping it frees its slot.
#[must_use = "the slot is freed when this is dropped"]
pub struct Running {
    queue: Arc<WorkQueue>,
    key: Arc<RequestKey>,
}

impl Running {
    /// The request being reconciled.
    pub fn key(&self) -> &RequestKey {
        &self.key
    }

    /// Reconcile this request again at `at` at the latest, as [`WorkQueue::schedule`] does,
    /// unless it was deleted ([`WorkQueue::forget`]) while this reconcile ran: a deleted
    /// request is not reconciled again (a new one of the same name is, once this one ends).
    pub fn reschedule(&self, at: Instant) {
        let mut state = self.queue.lock();
        if state.in_flight.get(&self.key).is_some_and(|f| f.forgotten) {
            return;
        }
        let moved_earlier = state.schedule(&self.key, at);
        drop(state);
        if moved_earlier {
            self.queue.changed.notify_one();
        }
    }

    /// Whether the request was deleted ([`WorkQueue::forget`]) while this reconcile ran. Asked
    /// after the reconcile recorded what it learned: the deletion's own clean-up may have come
    /// before those records, so the reconcile then cleans up after itself.
    pub fn forgotten(&self) -> bool {
        self.queue
            .lock()
            .in_flight
            .get(&self.key)
            .is_some_and(|f| f.forgotten)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let due_again = {
            let mut state = self.queue.lock();
            state.running = state.running.saturating_sub(1);
            state.track_slots(self.queue.slots);
            state.last_ended = Some(Instant::now());
            state
                .in_flight
                .remove(&self.key)
                .is_some_and(|f| f.due_again)
        };
        if due_again {
            self.queue.schedule_now(&self.key);
        }
        self.queue.changed.notify_one();
    }
}

/// A reconcile waiting in a rate-limit line, its slot given back; dropping it takes the slot
/// again.
#[must_use = "the slot is taken again when this is dropped"]
pub struct Parked<'a> {
    queue: &'a WorkQueue,
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        let mut state = self.queue.lock();
        state.running += 1;
        state.track_slots(self.queue.slots);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> RequestKey {
        RequestKey::new("analytics", name)
    }

    /// Urgency from a fixed table (names not in it: 0).
    fn queue(slots: usize, urgencies: &[(&str, i64)]) -> Arc<WorkQueue> {
        let table: HashMap<String, i64> = urgencies
            .iter()
            .map(|(name, urgency)| (name.to_string(), *urgency))
            .collect();
        Arc::new(WorkQueue::new(
            slots,
            Box::new(move |key| table.get(&*key.name).copied().unwrap_or(0)),
        ))
    }

    /// The next reconcile started, if one is within `within`; it holds its slot until dropped.
    async fn next_within(queue: &Arc<WorkQueue>, within: Duration) -> Option<Running> {
        tokio::time::timeout(within, queue.next(|_| ())).await.ok()
    }

    /// The name of the next request handed out within `within`, its reconcile ended at once.
    async fn next_name(queue: &Arc<WorkQueue>, within: Duration) -> Option<String> {
        next_within(queue, within)
            .await
            .map(|r| name(&r).to_string())
    }

    fn name(running: &Running) -> &str {
        &running.key().name
    }

    #[tokio::test(start_paused = true)]
    async fn due_entries_go_most_urgent_first_and_never_beyond_the_slots() {
        let q = queue(2, &[("a", 300), ("b", 100), ("c", 200), ("d", 100)]);
        for name in ["a", "b", "c", "d"] {
            q.schedule_now(&key(name));
        }
        let b = next_within(&q, Duration::ZERO).await.unwrap();
        let d = next_within(&q, Duration::ZERO).await.unwrap();
        // b and d are as urgent: arrival decides.
        assert_eq!((name(&b), name(&d)), ("b", "d"));
        // Both slots are taken.
        assert!(next_within(&q, Duration::from_secs(1)).await.is_none());
        drop(b);
        let c = next_within(&q, Duration::ZERO).await.unwrap();
        assert_eq!(name(&c), "c");
        assert!(next_within(&q, Duration::from_secs(1)).await.is_none());
        drop(c);
        assert_eq!(next_name(&q, Duration::ZERO).await.as_deref(), Some("a"));
        drop(d);
        assert!(q.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn entries_wait_for_their_time_and_the_earliest_schedule_wins() {
        let q = queue(4, &[]);
        let now = Instant::now();
        q.schedule(&key("later"), now + Duration::from_secs(10));
        q.schedule(&key("soon"), now + Duration::from_secs(5));
        // A later time for an entry already due earlier changes nothing...
        q.schedule(&key("soon"), now + Duration::from_secs(60));
        // ...an earlier one brings it forward.
        q.schedule(&key("later"), now + Duration::from_secs(7));
        assert_eq!(next_name(&q, Duration::from_secs(4)).await, None);
        assert_eq!(
            next_name(&q, Duration::from_secs(2)).await.as_deref(),
            Some("soon")
        );
        assert_eq!(next_name(&q, Duration::from_millis(1500)).await, None);
        assert_eq!(
            next_name(&q, Duration::from_secs(1)).await.as_deref(),
            Some("later")
        );
        assert!(q.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn turned_away_entries_wait_for_room_in_their_line_most_urgent_first() {
        let q = queue(4, &[("b", 2), ("c", 1)]);
        let second = Duration::from_secs(1);
        q.block(&key("a"), 7, 3, second, second);
        q.block(&key("b"), 7, 2, second, second);
        q.block(&key("c"), 7, 1, second, second);
        q.block(&key("other-bucket"), 8, 0, second, second);
        // Nothing is due until their line has room...
        assert_eq!(next_name(&q, Duration::from_millis(900)).await, None);
        // ...but all four wait their turn, as the backlog gauge says.
        let backlog = Mutex::new(None);
        let _ = tokio::time::timeout(
            Duration::ZERO,
            q.next(|n| *backlog.lock().unwrap() = Some(n)),
        )
        .await;
        assert_eq!(*backlog.lock().unwrap(), Some(4));
        // ...which lets the most urgent of that bucket through, no other.
        q.release_blocked(7);
        assert_eq!(next_name(&q, Duration::ZERO).await.as_deref(), Some("c"));
        assert_eq!(next_name(&q, Duration::ZERO).await, None);
        // A change (scheduled earlier) takes an entry out of the line's list.
        q.schedule_now(&key("b"));
        assert_eq!(next_name(&q, Duration::ZERO).await.as_deref(), Some("b"));
        q.release_blocked(7);
        assert_eq!(next_name(&q, Duration::ZERO).await.as_deref(), Some("a"));
        q.release_blocked(7);
        // The fallback: the first turned away of a bucket after a second, and each one more
        // in that bucket's list a turn later.
        assert_eq!(next_name(&q, Duration::ZERO).await, None);
        assert_eq!(
            next_name(&q, Duration::from_millis(200)).await.as_deref(),
            Some("other-bucket")
        );
        let q = queue(4, &[]);
        q.block(&key("first"), 7, 0, second, second);
        q.block(&key("second"), 7, 0, second, second);
        assert_eq!(
            next_name(&q, Duration::from_millis(1100)).await.as_deref(),
            Some("first")
        );
        // Handed out at its fallback time, it is out of the bucket's list too: room in the line
        // goes to the one still waiting for it.
        assert_eq!(q.lock().blocked_count, 1);
        assert_eq!(q.lock().blocked[&7].len(), 1);
        assert_eq!(next_name(&q, Duration::from_millis(500)).await, None);
        assert_eq!(
            next_name(&q, Duration::from_millis(600)).await.as_deref(),
            Some("second")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_due_while_its_reconcile_runs_is_handed_out_when_it_ends() {
        // One slot: `other` is handed out only because `busy` gave its slot back in the line.
        let q = queue(1, &[]);
        q.schedule_now(&key("busy"));
        let running = next_within(&q, Duration::ZERO).await.unwrap();
        assert_eq!(name(&running), "busy");
        let parked = q.park();
        // Due again (its Secret changed, a policy changed) while it waits in a line: not
        // handed out now, where the two would race.
        q.schedule_now(&key("busy"));
        q.schedule_now(&key("other"));
        assert_eq!(
            next_name(&q, Duration::ZERO).await.as_deref(),
            Some("other")
        );
        assert_eq!(next_name(&q, Duration::ZERO).await, None);
        drop(parked);
        drop(running);
        let running = next_within(&q, Duration::ZERO).await.unwrap();
        assert_eq!(name(&running), "busy");
        // Not due again meanwhile: nothing more.
        drop(running);
        assert_eq!(next_name(&q, Duration::from_secs(1)).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_parked_reconcile_gives_its_slot_back_until_it_leaves_the_line() {
        let q = queue(1, &[]);
        q.schedule_now(&key("waiting"));
        q.schedule_now(&key("other"));
        let running = next_within(&q, Duration::ZERO).await.unwrap();
        assert_eq!(name(&running), "waiting");
        assert_eq!(
            next_name(&q, Duration::ZERO).await,
            None,
            "the one slot is taken"
        );
        let parked = q.park();
        let other = next_within(&q, Duration::ZERO).await.unwrap();
        assert_eq!(name(&other), "other");
        q.schedule_now(&key("third"));
        // Back from the line: both run, one above the slots, and nothing more is handed out
        // until both have finished.
        drop(parked);
        drop(other);
        assert_eq!(next_name(&q, Duration::ZERO).await, None);
        drop(running);
        assert_eq!(
            next_name(&q, Duration::ZERO).await.as_deref(),
            Some("third")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_earlier_entry_wakes_a_waiting_dispatcher() {
        let q = queue(1, &[]);
        q.schedule(&key("late"), Instant::now() + Duration::from_secs(60));
        let dispatcher = tokio::spawn({
            let q = q.clone();
            async move { q.next(|_| ()).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        q.schedule_now(&key("urgent"));
        let dispatched = tokio::time::timeout(Duration::from_millis(10), dispatcher)
            .await
            .expect("woken at once")
            .unwrap();
        assert_eq!(name(&dispatched), "urgent");
    }

    #[tokio::test(start_paused = true)]
    async fn a_forgotten_request_is_not_reconciled_again() {
        let q = queue(2, &[]);
        q.schedule_now(&key("deleted"));
        let running = next_within(&q, Duration::ZERO).await.unwrap();
        // Due again while its reconcile runs (which keeps it back until that ends)...
        q.schedule_now(&key("deleted"));
        assert_eq!(next_name(&q, Duration::ZERO).await, None);
        // ...then deleted: once the reconcile ends, nothing more.
        q.forget(&key("deleted"));
        drop(running);
        assert_eq!(next_name(&q, Duration::from_secs(1)).await, None);
        // Forgetting a waiting entry drops it.
        q.schedule(&key("gone"), Instant::now() + Duration::from_secs(1));
        q.forget(&key("gone"));
        assert!(q.is_empty());
        assert_eq!(next_name(&q, Duration::from_secs(2)).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_deleted_mid_reconcile_is_not_put_back_by_that_reconcile() {
        let q = queue(2, &[]);
        q.schedule_now(&key("deleted"));
        let running = next_within(&q, Duration::ZERO).await.unwrap();
        assert!(!running.forgotten());
        q.forget(&key("deleted"));
        assert!(running.forgotten(), "the reconcile learns of the deletion");
        // Its reconcile ends planning the next refresh (or a retry), or turned away by a full
        // rate-limit line: nothing is kept, and the line has no one to let back in.
        running.reschedule(Instant::now());
        q.block(
            &key("deleted"),
            7,
            0,
            Duration::from_secs(1),
            Duration::from_secs(1),
        );
        drop(running);
        assert!(q.is_empty());
        q.release_blocked(7);
        assert!(q.is_empty());
        assert_eq!(next_name(&q, Duration::from_secs(1)).await, None);

        // Deleted and created again under its name while a reconcile of the old one runs.
        q.schedule_now(&key("again"));
        let old = next_within(&q, Duration::ZERO).await.unwrap();
        q.forget(&key("again"));
        q.schedule_now(&key("again"));
        assert_eq!(
            next_name(&q, Duration::ZERO).await,
            None,
            "not while the old runs"
        );
        assert!(old.forgotten(), "the old one's records still go");
        old.reschedule(Instant::now() + Duration::from_secs(60));
        drop(old);
        // The new one is reconciled next, and its own plans count.
        let new = next_within(&q, Duration::ZERO).await.unwrap();
        assert_eq!(name(&new), "again");
        assert!(!new.forgotten());
        new.reschedule(Instant::now() + Duration::from_secs(5));
        drop(new);
        assert_eq!(q.len(), 1);
        assert_eq!(next_name(&q, Duration::from_secs(4)).await, None);
        assert_eq!(
            next_name(&q, Duration::from_secs(2)).await.as_deref(),
            Some("again")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_queue_whose_due_work_is_not_taken_is_stalled() {
        let limit = Duration::from_secs(60);
        let q = queue(2, &[]);
        assert_eq!(q.stall(limit), None, "nothing to do");
        tokio::time::advance(Duration::from_secs(600)).await;
        assert_eq!(q.stall(limit), None, "idle for long, with nothing due");
        q.schedule(&key("later"), Instant::now() + Duration::from_secs(30));
        tokio::time::advance(Duration::from_secs(89)).await;
        assert_eq!(q.stall(limit), None, "due for less than the limit");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            q.stall(limit),
            Some(Stall::NotTaken {
                overdue: limit,
                free_slots: 2
            })
        );
        // Taken: progress. One slot is still free, with nothing due.
        let running = next_within(&q, Duration::ZERO).await.unwrap();
        assert_eq!(q.stall(limit), None);
        // Due work promoted but left while both slots were held, then a slot freed long ago.
        q.schedule_now(&key("waits"));
        let second = next_within(&q, Duration::ZERO).await.unwrap();
        q.schedule_now(&key("third"));
        assert_eq!(next_name(&q, Duration::ZERO).await, None, "both slots held");
        drop(second);
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(q.stall(limit), None, "a slot free for less than the limit");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(matches!(
            q.stall(limit),
            Some(Stall::NotTaken { free_slots: 1, .. })
        ));
        drop(running);
    }

    #[tokio::test(start_paused = true)]
    async fn slots_held_with_no_reconcile_ending_is_a_stall_but_a_busy_queue_is_not() {
        let limit = Duration::from_secs(60);
        let q = queue(1, &[]);
        for i in 0..10 {
            q.schedule_now(&key(&format!("r{i}")));
        }
        // A backlog far older than the limit, served one at a time, each taking 30 s.
        tokio::time::advance(Duration::from_secs(300)).await;
        for _ in 0..10 {
            let running = next_within(&q, Duration::ZERO).await.unwrap();
            tokio::time::advance(Duration::from_secs(30)).await;
            assert_eq!(q.stall(limit), None, "reconciles end");
            drop(running);
            assert_eq!(q.stall(limit), None, "the slot was just freed");
        }
        // One reconcile holds the only slot and never ends.
        q.schedule_now(&key("stuck"));
        let stuck = next_within(&q, Duration::ZERO).await.unwrap();
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(q.stall(limit), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            q.stall(limit),
            Some(Stall::SlotsHeld {
                slots: 1,
                for_: limit
            })
        );
        drop(stuck);
        assert_eq!(q.stall(limit), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_limit_turns_the_liveness_check_off() {
        let q = queue(1, &[]);
        let off = Liveness::new(Duration::ZERO);
        off.watch(&q);
        q.schedule_now(&key("overdue"));
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(off.stall(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn urgency_is_asked_when_an_entry_comes_due() {
        let urgencies = Arc::new(Mutex::new(HashMap::from([
            ("x".to_string(), 100),
            ("y".to_string(), 200),
        ])));
        let table = urgencies.clone();
        let q = Arc::new(WorkQueue::new(
            1,
            Box::new(move |key| table.lock().unwrap()[&*key.name]),
        ));
        let at = Instant::now() + Duration::from_secs(5);
        q.schedule(&key("x"), at);
        q.schedule(&key("y"), at);
        // Meanwhile y's URL turned out to stop working first.
        urgencies.lock().unwrap().insert("y".to_string(), 50);
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(next_name(&q, Duration::ZERO).await.as_deref(), Some("y"));
    }
}
