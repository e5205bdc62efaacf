//! The event queue: earliest (time, sequence number) first, every entry with a unique sequence
//! number, so the order is total and runs are deterministic.
//!
//! Most deliveries are scheduled in time order (a burst of punches over one path all arrive a
//! fixed delay later), so a FIFO lane takes every entry not earlier than its last one and a
//! binary heap takes the rest; `pop` compares the two heads. Same order as a plain heap, a
//! fraction of the cost.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Duration;

struct Entry<E> {
    /// Nanoseconds of virtual time (584 years fit).
    at: u64,
    seq: u64,
    ev: E,
}

impl<E> PartialEq for Entry<E> {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl<E> Eq for Entry<E> {}
impl<E> PartialOrd for Entry<E> {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl<E> Ord for Entry<E> {
    /// Reversed: `BinaryHeap` is a max-heap and we want the earliest first.
    fn cmp(&self, o: &Self) -> Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

pub(crate) struct EventQueue<E> {
    lane: VecDeque<Entry<E>>,
    heap: BinaryHeap<Entry<E>>,
    seq: u64,
}

impl<E> EventQueue<E> {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Self {
            lane: VecDeque::with_capacity(n),
            heap: BinaryHeap::with_capacity(n / 4),
            seq: 0,
        }
    }

    /// Empties the queue and restarts the sequence numbers, keeping the allocations: the
    /// queue is then as [`EventQueue::with_capacity`] made it.
    pub(crate) fn clear(&mut self) {
        self.lane.clear();
        self.heap.clear();
        self.seq = 0;
    }

    pub(crate) fn push(&mut self, at: Duration, ev: E) {
        self.push_ns(at.as_nanos() as u64, ev);
    }

    /// [`EventQueue::push`] with the time in nanoseconds.
    #[inline]
    pub(crate) fn push_ns(&mut self, at: u64, ev: E) {
        self.seq += 1;
        let e = Entry {
            at,
            seq: self.seq,
            ev,
        };
        // A later seq at an equal time sorts after the lane's back, so the lane stays sorted.
        if self.lane.back().is_none_or(|b| b.at <= e.at) {
            self.lane.push_back(e);
        } else {
            self.heap.push(e);
        }
    }

    /// The sequence number of the entry pushed last (0 before the first). While that entry
    /// is queued, an entry pushed now for the same time would be delivered right after it (no
    /// sequence number sorts between the two), so a caller may merge into it instead.
    pub(crate) fn last_seq(&self) -> u64 {
        self.seq
    }

    /// Time of the earliest entry.
    pub(crate) fn next_at(&self) -> Option<Duration> {
        let at = match (self.lane.front(), self.heap.peek()) {
            (Some(l), Some(h)) => l.at.min(h.at),
            (l, h) => l.or(h)?.at,
        };
        Some(Duration::from_nanos(at))
    }

    /// The earliest entry if it is due at `now`.
    pub(crate) fn pop_due(&mut self, now: Duration) -> Option<E> {
        let now = now.as_nanos() as u64;
        let from_lane = match (self.lane.front(), self.heap.peek()) {
            (Some(l), Some(h)) => (l.at, l.seq) < (h.at, h.seq),
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return None,
        };
        if from_lane {
            if self.lane.front()?.at > now {
                return None;
            }
            self.lane.pop_front().map(|e| e.ev)
        } else {
            if self.heap.peek()?.at > now {
                return None;
            }
            self.heap.pop().map(|e| e.ev)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pops_in_time_then_insertion_order_whatever_the_push_order() {
        let ms = Duration::from_millis;
        let mut q = EventQueue::with_capacity(8);
        for (t, id) in [
            (5, 'a'),
            (7, 'b'),
            (3, 'c'),
            (7, 'd'),
            (5, 'e'),
            (9, 'f'),
            (1, 'g'),
        ] {
            q.push(ms(t), id);
        }
        assert_eq!(q.next_at(), Some(ms(1)));
        assert_eq!(q.pop_due(ms(0)), None);
        let mut out = String::new();
        while let Some(id) = q.pop_due(ms(100)) {
            out.push(id);
        }
        assert_eq!(out, "gcaebdf");
    }
}
