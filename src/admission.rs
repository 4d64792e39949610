//! Which reconciles run now and which wait: at most `slots` at once, the most urgent first.
//!
//! kube-runtime's controller can bound its concurrency itself, but at that bound it moves the
//! reconciles that come due into a hash set and takes them out in hash order. Under a backlog
//! that lasts (AWS answering slower than the refresh rate needs, or the client-side rate limit
//! below it) the same requests are taken again and again while others never are: their
//! Secrets never get a URL, or keep a dead one. So the controller starts every reconcile that
//! comes due, and each waits here for a slot, the request whose URL stops working first going
//! first (ties by arrival). A waiting reconcile is a small future: the reconcile's own work,
//! and its memory, start only with the slot.

use jiff::Timestamp;
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use tokio::sync::oneshot;

/// At most `slots` holders at once; waiters ordered by urgency, then arrival.
pub struct Admission {
    state: Mutex<State>,
}

struct State {
    free: usize,
    /// (urgency in Unix milliseconds, arrival ticket) -> how to hand the waiter its slot.
    waiting: BTreeMap<(i64, u64), oneshot::Sender<()>>,
    next_ticket: u64,
}

/// A slot, given back when dropped.
#[must_use = "the slot is given back when dropped"]
pub struct Slot<'a> {
    admission: &'a Admission,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.admission.release();
    }
}

impl Admission {
    /// `slots` holders at once (at least one).
    pub fn new(slots: usize) -> Self {
        Admission {
            state: Mutex::new(State {
                free: slots.max(1),
                waiting: BTreeMap::new(),
                next_ticket: 0,
            }),
        }
    }

    /// Waits for a slot. `urgency` is when the request's current URL stops working (now, if it
    /// has none): earlier goes first. Dropping the future gives up the place in the queue.
    pub async fn wait_turn(&self, urgency: Timestamp) -> Slot<'_> {
        let (ticket, granted) = {
            let mut state = self.lock();
            if state.free > 0 && state.waiting.is_empty() {
                state.free -= 1;
                return Slot { admission: self };
            }
            let ticket = (urgency.as_millisecond(), state.next_ticket);
            state.next_ticket += 1;
            let (grant, granted) = oneshot::channel();
            state.waiting.insert(ticket, grant);
            (ticket, granted)
        };
        let mut place = Place {
            admission: self,
            ticket,
            granted: Some(granted),
        };
        if let Some(granted) = place.granted.as_mut() {
            // The sender is only dropped after sending: `release` holds it until then.
            let _ = granted.await;
        }
        place.granted = None;
        Slot { admission: self }
    }

    /// How many reconciles wait for a slot.
    pub fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }

    /// Hands a slot to the most urgent waiter still waiting, or frees it.
    fn release(&self) {
        let mut state = self.lock();
        while let Some((_, grant)) = state.waiting.pop_first() {
            if grant.send(()).is_ok() {
                return;
            }
        }
        state.free += 1;
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is plain data, consistent between statements: a panic elsewhere while
        // holding the lock leaves nothing half-done.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A place in the queue. If the waiting future is dropped, the place is given up, and a slot
/// handed to it meanwhile is passed on.
struct Place<'a> {
    admission: &'a Admission,
    ticket: (i64, u64),
    /// `None` once the slot is taken.
    granted: Option<oneshot::Receiver<()>>,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let Some(mut granted) = self.granted.take() else {
            return;
        };
        let still_waiting = self.admission.lock().waiting.remove(&self.ticket).is_some();
        // Not waiting any more means `release` took the place and sent the slot (under the
        // lock, before this looked): pass it on.
        if !still_waiting && granted.try_recv().is_ok() {
            self.admission.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    /// Starts a task that waits for its turn with `urgency`, records `id` when it gets a slot,
    /// and holds the slot until `release` fires.
    fn waiter(
        admission: &Arc<Admission>,
        order: &Arc<Mutex<Vec<u32>>>,
        id: u32,
        urgency: Timestamp,
    ) -> (tokio::task::JoinHandle<()>, oneshot::Sender<()>) {
        let (release, released) = oneshot::channel::<()>();
        let (admission, order) = (admission.clone(), order.clone());
        let task = tokio::spawn(async move {
            let _slot = admission.wait_turn(urgency).await;
            order.lock().unwrap().push(id);
            let _ = released.await;
        });
        (task, release)
    }

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_most_urgent_waiter_goes_next_whatever_its_arrival() {
        let admission = Arc::new(Admission::new(2));
        let order = Arc::new(Mutex::new(Vec::new()));
        let (_a, release_a) = waiter(&admission, &order, 1, at(100));
        let (_b, release_b) = waiter(&admission, &order, 2, at(100));
        settle().await;
        assert_eq!(*order.lock().unwrap(), [1, 2], "two slots, taken at once");

        // Arrive least urgent first; two with the same urgency keep their arrival order.
        let (_c, release_c) = waiter(&admission, &order, 3, at(300));
        let (_d, release_d) = waiter(&admission, &order, 4, at(50));
        let (_e, release_e) = waiter(&admission, &order, 5, at(200));
        let (_f, release_f) = waiter(&admission, &order, 6, at(50));
        settle().await;
        assert_eq!(admission.waiting(), 4);
        assert_eq!(
            order.lock().unwrap().len(),
            2,
            "nobody beyond the two slots"
        );

        for release in [
            release_a, release_b, release_d, release_f, release_e, release_c,
        ] {
            release.send(()).unwrap();
            settle().await;
        }
        assert_eq!(*order.lock().unwrap(), [1, 2, 4, 6, 5, 3]);
        assert_eq!(admission.waiting(), 0);
        assert_eq!(admission.lock().free, 2, "every slot came back");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_gives_up_loses_no_slot() {
        let admission = Arc::new(Admission::new(1));
        let order = Arc::new(Mutex::new(Vec::new()));
        let (_a, release_a) = waiter(&admission, &order, 1, at(0));
        let (cancelled, _keep) = waiter(&admission, &order, 2, at(0));
        let (_c, release_c) = waiter(&admission, &order, 3, at(10));
        settle().await;
        // Gives up while waiting: its place goes.
        cancelled.abort();
        settle().await;
        assert_eq!(admission.waiting(), 1);
        release_a.send(()).unwrap();
        settle().await;
        assert_eq!(*order.lock().unwrap(), [1, 3]);
        release_c.send(()).unwrap();
        settle().await;
        assert_eq!(admission.lock().free, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_handed_to_a_waiter_that_gave_up_is_passed_on() {
        let admission = Admission::new(1);
        let held = admission.wait_turn(at(0)).await;
        let mut first = Box::pin(admission.wait_turn(at(1)));
        let mut second = Box::pin(admission.wait_turn(at(2)));
        // Both register their place.
        assert!(futures::poll!(first.as_mut()).is_pending());
        assert!(futures::poll!(second.as_mut()).is_pending());
        // The slot goes to `first`, which is dropped before it ever looks.
        drop(held);
        drop(first);
        let slot = tokio::time::timeout(Duration::from_secs(1), second)
            .await
            .expect("the slot reached the next waiter");
        drop(slot);
        assert_eq!(admission.lock().free, 1);
        assert_eq!(admission.waiting(), 0);
    }
}
