//! Flow control: when a sample or an insert may proceed (Reverb's rate limiter formulas), and
//! the handshake that lets a waiting call sleep without missing the change it waits for.
//!
//! **Admission.** The counters are `I` (insert tickets admitted), `S` (rows admitted to
//! sampling) and `D` (rows deleted: overwritten in a ring, `max(0, I - capacity)`; delivered or
//! skipped in a queue). A sample of `n` rows is admitted by a compare-and-swap of `S` (or of the
//! queue's head) from the value it checked; an insert of `k` rows by one of `I`, the insert
//! cursor. Each side reads the other side's counter without locking it, and that is enough:
//! both counters only grow, and a larger `I` only ever allows more samples and a larger `S`
//! more inserts, so the stale value a call may read can only make it wait longer, never admit
//! what the formulas refuse.
//!
//! **Waiting** (see [`Event`]): a call that must wait registers as a waiter, reads the event's
//! sequence number, checks its condition once more, and sleeps until the sequence changes (a
//! futex, in slices, so Ctrl-C, timeouts and shutdown are noticed). A call that changes a
//! counter bumps the sequence and wakes the sleepers, but only if a waiter is registered: a call
//! that never waits makes no system call, and neither does one that nobody waits for. Either the
//! waiter's check sees the change, or the changer sees the waiter (the store-buffering pattern,
//! settled by a `SeqCst` fence on each side); then the sequence the waiter sleeps on has moved.

use crate::sync::{fence, AtomicU32, Ordering};

/// The limits of a rate limiter, as Reverb's `RateLimiter` holds them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    pub samples_per_insert: f64,
    pub min_size: u64,
    pub min_diff: f64,
    pub max_diff: f64,
}

/// The counters a decision reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counts {
    /// Insert tickets admitted.
    pub inserts: u64,
    /// Rows admitted to sampling.
    pub samples: u64,
    /// Rows deleted (overwritten, or delivered).
    pub deletes: u64,
}

impl Counts {
    pub fn size(&self) -> u64 {
        self.inserts.saturating_sub(self.deletes)
    }
}

impl Limits {
    /// `size ≥ min_size  and  I·spi − S − n ≥ min_diff`.
    pub fn can_sample(&self, c: Counts, n: u64) -> bool {
        c.size() >= self.min_size
            && c.inserts as f64 * self.samples_per_insert - c.samples as f64 - n as f64
                >= self.min_diff
    }

    /// `I + k − D ≤ min_size  or  (I + k)·spi − S ≤ max_diff`.
    pub fn can_insert(&self, c: Counts, k: u64) -> bool {
        c.size().saturating_add(k) <= self.min_size
            || (c.inserts as f64 + k as f64) * self.samples_per_insert - c.samples as f64
                <= self.max_diff
    }

    /// The width of the error window: no batch wider can ever pass it.
    pub fn window(&self) -> f64 {
        self.max_diff - self.min_diff
    }
}

/// A futex word and its waiter count: the wait/wake handshake (see the module docs).
pub struct Event<'a> {
    /// Bumped by every change a waiter may be waiting for, while one is registered.
    pub sequence: &'a AtomicU32,
    /// Calls registered as waiting (any process).
    pub waiters: &'a AtomicU32,
}

impl Event<'_> {
    /// Registers a waiter; returns the sequence number to sleep on. The caller must check its
    /// condition again after this, before sleeping, and call [`Event::unregister`] when done.
    pub fn register(&self) -> u32 {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.sequence.load(Ordering::SeqCst)
    }

    pub fn unregister(&self) {
        // Saturating: a scribbled count must not wrap into "always wake".
        let _ = self
            .waiters
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| w.checked_sub(1));
    }

    /// After a change a waiter may wait for: true if the caller must wake the sleepers (the
    /// sequence was bumped).
    pub fn notify(&self) -> bool {
        fence(Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) == 0 {
            return false;
        }
        self.sequence.fetch_add(1, Ordering::SeqCst);
        true
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn counts(inserts: u64, samples: u64, deletes: u64) -> Counts {
        Counts {
            inserts,
            samples,
            deletes,
        }
    }

    #[test]
    fn min_size_waits_for_rows_only() {
        let l = Limits {
            samples_per_insert: 1.0,
            min_size: 3,
            min_diff: f64::NEG_INFINITY,
            max_diff: f64::INFINITY,
        };
        assert!(!l.can_sample(counts(2, 0, 0), 1));
        assert!(l.can_sample(counts(3, 1_000_000, 0), 1_000));
        assert!(l.can_insert(counts(u64::MAX / 2, 0, 0), 1 << 40));
    }

    #[test]
    fn sample_to_insert_ratio_is_reverbs() {
        // spi 2, min_size 2, error buffer 4: [0, 8].
        let l = Limits {
            samples_per_insert: 2.0,
            min_size: 2,
            min_diff: 0.0,
            max_diff: 8.0,
        };
        assert!(!l.can_sample(counts(1, 0, 0), 1), "below min_size");
        assert!(l.can_sample(counts(2, 0, 0), 4), "2·2 − 0 − 4 = 0 ≥ 0");
        assert!(!l.can_sample(counts(2, 0, 0), 5));
        assert!(l.can_insert(counts(2, 0, 0), 2), "(2 + 2)·2 − 0 = 8 ≤ 8");
        assert!(!l.can_insert(counts(2, 0, 0), 3));
        assert!(
            l.can_insert(counts(0, 0, 0), 2),
            "still filling up to min_size"
        );
        assert!(l.can_insert(counts(10, 20, 8), 0));
    }
}

#[cfg(loom)]
mod loom_tests {
    use super::*;
    use crate::sync::AtomicU64;
    use loom::sync::Arc;

    /// The waiter never sleeps through the change it waits for: if its last check missed the
    /// counter's new value, the sequence it sleeps on has moved by the time both are done.
    #[test]
    fn loom_a_waiter_never_misses_the_change_it_waits_for() {
        loom::model(|| {
            let words = Arc::new((AtomicU32::new(0), AtomicU32::new(0), AtomicU64::new(0)));
            let changer = {
                let words = words.clone();
                loom::thread::spawn(move || {
                    words.2.store(1, Ordering::Relaxed);
                    let event = Event {
                        sequence: &words.0,
                        waiters: &words.1,
                    };
                    event.notify();
                })
            };
            let event = Event {
                sequence: &words.0,
                waiters: &words.1,
            };
            let slept_on = event.register();
            let saw_change = words.2.load(Ordering::Relaxed) == 1;
            changer.join().unwrap();
            if !saw_change {
                assert_ne!(
                    words.0.load(Ordering::SeqCst),
                    slept_on,
                    "the waiter would sleep through the change"
                );
            }
            event.unregister();
        });
    }
}
