//! Which peers a round of the device must look at, so that a round costs
//! what changed, not the number of peers: the peers something happened
//! to since the last round (a message, a send, a configuration change,
//! traffic the workers carried: "touched"), and those whose earliest timer
//! is due, from a min-heap of deadlines.
//!
//! The heap is lazy: a peer's live entry is the deadline it was last given
//! (`scheduled`); a new deadline is a new entry, and the old one is
//! skipped when it surfaces. Traffic moves timers on every round, so the
//! heap is rebuilt from the live entries when the stale ones outnumber
//! them (linear, and rare: amortized constant per change).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

#[derive(Default)]
pub(super) struct Schedule {
    touched: Vec<u32>,
    /// Per peer: in `touched`, or taken by [`Schedule::take_due`] and not
    /// yet [`Schedule::done`].
    marked: Vec<bool>,
    /// Per peer: its live entry in `heap`.
    scheduled: Vec<Option<Duration>>,
    heap: BinaryHeap<Reverse<(Duration, u32)>>,
    /// At most the live entries in `heap` (the peers with a deadline);
    /// recounted by [`Schedule::compact`].
    live: usize,
}

impl Schedule {
    fn grow(&mut self, id: u32) {
        let n = id as usize + 1;
        if self.marked.len() < n {
            self.marked.resize(n, false);
            self.scheduled.resize(n, None);
        }
    }

    /// Something happened to `id`: the next round looks at it.
    pub fn touch(&mut self, id: u32) {
        self.grow(id);
        if !self.marked[id as usize] {
            self.marked[id as usize] = true;
            self.touched.push(id);
        }
    }

    /// Every peer `0..n` (a change to all of them: standby, renumbering).
    pub fn touch_all(&mut self, n: u32) {
        for id in 0..n {
            self.touch(id);
        }
    }

    /// The peers touched since the last round.
    pub fn touched(&self) -> &[u32] {
        &self.touched
    }

    /// A round is wanted now (a peer was touched).
    pub fn pending(&self) -> bool {
        !self.touched.is_empty()
    }

    /// The earliest live deadline.
    pub fn next(&mut self) -> Option<Duration> {
        while let Some(&Reverse((at, id))) = self.heap.peek() {
            if self.scheduled.get(id as usize) == Some(&Some(at)) {
                return Some(at);
            }
            self.heap.pop();
        }
        None
    }

    /// The peers to look at `now`: the touched ones and those whose
    /// deadline passed, each once.
    pub fn take_due(&mut self, now: Duration) -> Vec<u32> {
        let mut due = std::mem::take(&mut self.touched);
        while let Some(&Reverse((at, id))) = self.heap.peek() {
            if at > now {
                break;
            }
            self.heap.pop();
            let i = id as usize;
            if self.scheduled.get(i) == Some(&Some(at)) {
                self.scheduled[i] = None;
                self.live -= 1;
                if !self.marked[i] {
                    self.marked[i] = true;
                    due.push(id);
                }
            }
        }
        due
    }

    /// After the round looked at `id` (one of those taken as due): its
    /// next deadline (None: no timer).
    pub fn done(&mut self, id: u32, deadline: Option<Duration>) {
        let i = id as usize;
        self.marked[i] = false;
        if self.scheduled[i] == deadline {
            return;
        }
        if std::mem::replace(&mut self.scheduled[i], deadline).is_some() {
            self.live -= 1;
        }
        if let Some(at) = deadline {
            self.heap.push(Reverse((at, id)));
            self.live += 1;
        }
        if self.heap.len() > 2 * self.live.max(512) {
            self.compact();
        }
    }

    /// Rebuilds the heap from the live entries.
    fn compact(&mut self) {
        let live: Vec<Reverse<(Duration, u32)>> = self
            .scheduled
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.map(|at| Reverse((at, i as u32))))
            .collect();
        self.live = live.len();
        self.heap = BinaryHeap::from(live);
    }

    /// Entries in the heap, live or stale (for tests and the bound).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.heap.len()
    }

    #[cfg(test)]
    fn done_all(&mut self, due: &[u32], deadline: impl Fn(u32) -> Option<Duration>) {
        for &id in due {
            self.done(id, deadline(id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn touched_peers_are_due_at_once_and_once() {
        let mut q = Schedule::default();
        q.touch(3);
        q.touch(1);
        q.touch(3);
        assert!(q.pending());
        assert_eq!(q.take_due(s(0)), vec![3, 1]);
        assert!(!q.pending());
        // Touched while being looked at: covered by the deadline `done` asks for.
        q.touch(3);
        assert!(!q.pending());
        q.done_all(&[3, 1], |_| None);
        assert_eq!(q.take_due(s(100)), Vec::<u32>::new());
        assert_eq!(q.next(), None);
    }

    #[test]
    fn a_deadline_is_due_when_it_passes_and_not_before() {
        let mut q = Schedule::default();
        q.touch(0);
        q.touch(1);
        let due = q.take_due(s(0));
        q.done_all(&due, |id| Some(s(10 + id as u64)));
        assert_eq!(q.next(), Some(s(10)));
        assert_eq!(q.take_due(s(9)), Vec::<u32>::new());
        assert_eq!(q.take_due(s(10)), vec![0]);
        q.done_all(&[0], |_| None);
        assert_eq!(q.next(), Some(s(11)));
        assert_eq!(q.take_due(s(20)), vec![1]);
    }

    #[test]
    fn a_new_deadline_replaces_the_old_one_earlier_or_later() {
        let mut q = Schedule::default();
        q.touch(0);
        let due = q.take_due(s(0));
        q.done_all(&due, |_| Some(s(10)));
        // Traffic moved the timer later: no wake-up at 10.
        q.touch(0);
        let due = q.take_due(s(1));
        q.done_all(&due, |_| Some(s(15)));
        assert_eq!(q.next(), Some(s(15)));
        assert_eq!(q.take_due(s(14)), Vec::<u32>::new());
        // Earlier again.
        q.touch(0);
        let due = q.take_due(s(11));
        q.done_all(&due, |_| Some(s(12)));
        assert_eq!(q.next(), Some(s(12)));
        assert_eq!(q.take_due(s(12)), vec![0]);
        q.done_all(&[0], |_| None);
        assert_eq!(q.take_due(s(16)), Vec::<u32>::new(), "the stale entry at 15 is skipped");
        assert_eq!(q.next(), None);
        assert_eq!(q.live, 0);
    }

    #[test]
    fn the_heap_stays_near_one_entry_per_peer_under_constant_traffic() {
        let mut q = Schedule::default();
        for round in 0..1000u64 {
            for id in 0..100 {
                q.touch(id);
            }
            let due = q.take_due(s(round));
            q.done_all(&due, |id| Some(s(round + 10 + id as u64 % 3)));
        }
        // Every round gave every peer a new deadline: the stale entries
        // are dropped when they outnumber the live ones.
        assert!(q.len() <= 2 * 512 + 1, "{} entries", q.len());
        assert_eq!(q.live, 100);
        assert_eq!(q.next(), Some(s(999 + 10)));
    }
}
