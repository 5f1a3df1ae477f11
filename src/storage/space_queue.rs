//! Appenders waiting for room in a partition's pending queue, let in strictly in arrival
//! order: requests pipelined on one connection are stored in the order they were sent, even
//! when a smaller append behind a larger one would already fit.
//!
//! Only the first waiter is woken at a time. Until it has run, nobody overtakes it: neither
//! a newcomer nor a later waiter.

use std::collections::VecDeque;

use futures::channel::oneshot;

/// The queue of appenders held back by a full pending queue.
#[derive(Debug, Default)]
pub struct SpaceQueue {
    waiting: VecDeque<oneshot::Sender<()>>,
    /// The first waiter was woken and has not taken its turn yet.
    handed_over: bool,
}

impl SpaceQueue {
    /// True when nobody waits: an appender that just arrived may go ahead if there is room.
    pub fn is_clear(&self) -> bool {
        self.waiting.is_empty() && !self.handed_over
    }

    /// Queues an appender that just arrived, behind everyone; the receiver resolves when it
    /// is first in line and may look for room.
    pub fn join_back(&mut self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.waiting.push_back(tx);
        rx
    }

    /// Called by a woken appender when it runs: its turn is taken, the queue is its own to
    /// append to or to wait in again with [`SpaceQueue::wait_again_first`].
    pub fn take_turn(&mut self) {
        self.handed_over = false;
    }

    /// A woken appender found no room yet: it waits again, still first in line.
    pub fn wait_again_first(&mut self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.waiting.push_front(tx);
        rx
    }

    /// Wakes the first waiter, unless one is already woken and has not run: called when
    /// room is freed and when a woken appender is done with its turn.
    pub fn wake_next(&mut self) {
        if self.handed_over {
            return;
        }
        while let Some(tx) = self.waiting.pop_front() {
            // A waiter whose append was given up (receiver dropped) is skipped.
            if tx.send(()).is_ok() {
                self.handed_over = true;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn woken(rx: &mut oneshot::Receiver<()>) -> bool {
        matches!(rx.try_recv(), Ok(Some(())))
    }

    #[test]
    fn waiters_are_woken_one_at_a_time_in_arrival_order() {
        let mut q = SpaceQueue::default();
        assert!(q.is_clear());
        let mut first = q.join_back();
        let mut second = q.join_back();
        q.wake_next();
        q.wake_next(); // the first has not run yet: nobody else is woken
        assert!(woken(&mut first));
        assert!(!woken(&mut second));
        assert!(
            !q.is_clear(),
            "a newcomer must not overtake the woken waiter"
        );
        q.take_turn();
        q.wake_next(); // the first is done
        assert!(woken(&mut second));
        q.take_turn();
        assert!(q.is_clear());
    }

    #[test]
    fn a_woken_waiter_without_room_stays_first() {
        let mut q = SpaceQueue::default();
        let mut first = q.join_back();
        let mut second = q.join_back();
        q.wake_next();
        assert!(woken(&mut first));
        q.take_turn();
        let mut first_again = q.wait_again_first();
        q.wake_next();
        assert!(woken(&mut first_again));
        assert!(!woken(&mut second));
    }

    #[test]
    fn given_up_waiters_are_skipped() {
        let mut q = SpaceQueue::default();
        drop(q.join_back());
        let mut second = q.join_back();
        q.wake_next();
        assert!(woken(&mut second));
    }
}
