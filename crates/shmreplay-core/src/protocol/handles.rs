//! The handle table: one entry per live handle, in any process, with what it is doing and what
//! it has done, and the rules that keep the buffer's size exact whoever dies where.
//!
//! An entry (128 bytes) holds:
//!
//! ```text
//! owner      identity word of the process that registered it (pid, start time)
//! namespace  that process's PID namespace
//! intent     the insert in progress: (ticket + 1) << 12 | (firsts & 0xfff), or 0
//! firsts     how many slots were first filled through this entry (monotone, never reset)
//! counters   inserts, samples, retries, recovered, superseded, lost, stale updates, and
//!            nanoseconds spent waiting for flow control by inserts and by samples (monotone,
//!            never reset)
//! changes    how many changes of the priority tree the entry's process has in flight
//! claim      a queue's insert in progress: its first ticket + 1, or 0 (see `buffer::flow`)
//! waiters    how many of its process's calls are registered as waiting for flow control:
//!            inserts in the low 32 bits, samples in the high 32 (see `buffer::flow`)
//! ```
//!
//! Who owns an entry is decided by a kernel lock (see `platform::locks`), not by these words.
//! Counters are never reset or moved: a new owner of an entry keeps counting where the last
//! one stopped, and sums run over every entry ever used, so no count is lost or doubled by a
//! process that dies between two stores.
//!
//! **Size.** `len()` is the number of slots holding a committed record. A slot is first filled
//! once; the committing writer counts it in its entry's `firsts` right after its commit. The
//! commit and the count are two stores, so a writer killed between them would leave the count
//! one short. The intent word closes that gap: it names the ticket being written and a snapshot
//! of `firsts` taken before, so anyone can tell, from shared words alone, whether that commit
//! happened and was counted:
//!
//! * the slot holds `committed_first(ticket, entry)` and `firsts` still equals the snapshot:
//!   committed, not yet counted: the size includes it (an adjustment of +1), and whoever replaces
//!   that word (the next writer of the slot) or reclaims the entry first counts it (`Entry::settle`);
//! * the slot holds `busy(ticket, entry, first = false)`: the entry is overwriting a record, so
//!   the slot holds none right now (an adjustment of -1), whether its writer is alive or dead;
//! * anything else: nothing to adjust.
//!
//! The owner counts with a compare-and-swap from the snapshot, and so does a settler, so
//! exactly one of them counts. `firsts` only grows, so the swap cannot succeed twice.

use crate::protocol::slot;
use crate::sync::{AtomicU64, Ordering};

/// Byte offsets of an entry's words.
pub(crate) const E_OWNER: usize = 0;
pub(crate) const E_NAMESPACE: usize = 8;
pub(crate) const E_INTENT: usize = 16;
pub(crate) const E_FIRSTS: usize = 24;
pub(crate) const E_COUNTERS: usize = 32;
/// How many changes of the priority tree (leaves changed, ancestors not yet recomputed; see
/// `protocol::priority`) this entry's process has in flight, over all its threads: if it dies
/// with any, whoever finds it dead recomputes the tree.
pub(crate) const E_TREE_CHANGES: usize = E_COUNTERS + 8 * Counter::ALL.len();
/// A queue producer's insert in progress: its first ticket + 1, stored before it takes its
/// tickets and cleared after its last commit (0: none). A consumer waiting for a ticket at or
/// after it waits for this entry while its process lives, and skips the ticket once it is dead.
pub(crate) const E_QUEUE_CLAIM: usize = E_TREE_CHANGES + 8;
/// This entry's share of the flow-control waiter counts (inserts in the low half, samples in
/// the high half): whoever finds the entry's process dead takes its share off the counts, so a
/// waiter killed while waiting leaves no waiter behind.
pub(crate) const E_WAITERS: usize = E_QUEUE_CLAIM + 8;
const _: () = assert!(E_WAITERS + 8 <= 128, "an entry is 128 bytes");

/// Per-entry event counters, summed over all entries for the stats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Records committed.
    Inserts,
    /// Rows returned by sampling.
    Samples,
    /// Draws that hit a slot being written (or overwritten while copied) and were redrawn.
    Retries,
    /// Slots taken over from a writer proved dead.
    Recovered,
    /// Inserts dropped because a newer insert had already taken their slot.
    Superseded,
    /// Commits refused because the slot had been taken over meanwhile.
    Lost,
    /// Priority updates ignored because their record had been overwritten.
    StaleUpdates,
    /// Nanoseconds inserts spent waiting for flow control (timeouts included).
    InsertWaitNs,
    /// Nanoseconds samples spent waiting for flow control (timeouts included).
    SampleWaitNs,
}

impl Counter {
    pub const ALL: [Counter; 9] = [
        Counter::Inserts,
        Counter::Samples,
        Counter::Retries,
        Counter::Recovered,
        Counter::Superseded,
        Counter::Lost,
        Counter::StaleUpdates,
        Counter::InsertWaitNs,
        Counter::SampleWaitNs,
    ];

    pub(crate) fn offset(self) -> usize {
        E_COUNTERS + 8 * self as usize
    }
}

const SNAPSHOT_BITS: u32 = 12;
const SNAPSHOT_MASK: u64 = (1 << SNAPSHOT_BITS) - 1;

/// The two words of an entry that track an insert in progress.
pub(crate) struct Entry<'a> {
    pub index: usize,
    pub intent: &'a AtomicU64,
    pub firsts: &'a AtomicU64,
}

/// An insert in progress, as its writer remembers it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Intent {
    firsts: u64,
}

fn intent_word(ticket: u64, firsts: u64) -> u64 {
    ((ticket + 1) << SNAPSHOT_BITS) | (firsts & SNAPSHOT_MASK)
}

/// The ticket an intent word names, if any.
pub(crate) fn intent_ticket(word: u64) -> Option<u64> {
    (word >> SNAPSHOT_BITS).checked_sub(1)
}

impl Entry<'_> {
    /// Announces the insert of `ticket`, before the slot is claimed (the claim's Release
    /// publishes it together with the busy word that names this entry).
    pub fn begin(&self, ticket: u64) -> Intent {
        let firsts = self.firsts.load(Ordering::Relaxed);
        self.intent
            .store(intent_word(ticket, firsts), Ordering::Release);
        Intent { firsts }
    }

    /// Counts the first fill committed under `intent` (unless a settler already did).
    pub fn count_first(&self, intent: Intent) {
        // Wrapping: the word lives in shared memory, which anyone with access may scribble.
        let _ = self.firsts.compare_exchange(
            intent.firsts,
            intent.firsts.wrapping_add(1),
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }

    /// No insert in progress any more. Release: whoever sees this also sees the count.
    pub fn end(&self) {
        self.intent.store(0, Ordering::Release);
    }

    /// `(firsts, adjustment)`: this entry's count of first fills and what its insert in progress
    /// changes about the size right now (see the module docs). `seq_of(ticket)` is the version
    /// word of the slot of `ticket`.
    pub fn size_terms<'s>(&self, seq_of: impl Fn(u64) -> &'s AtomicU64) -> (u64, i64) {
        loop {
            let intent = self.intent.load(Ordering::Acquire);
            let firsts = self.firsts.load(Ordering::Acquire);
            // A consistent pair: the intent did not move while `firsts` was read.
            if self.intent.load(Ordering::Acquire) != intent {
                continue;
            }
            let Some(ticket) = intent_ticket(intent) else {
                return (firsts, 0);
            };
            let word = seq_of(ticket).load(Ordering::Acquire);
            let adjustment = if word == slot::busy(ticket, self.index, false) {
                -1
            } else if word == slot::committed_first(ticket, self.index)
                && firsts & SNAPSHOT_MASK == intent & SNAPSHOT_MASK
            {
                1
            } else {
                0
            };
            return (firsts, adjustment);
        }
    }

    /// Counts the first fill of the slot holding first-commit word `word` for this entry if its
    /// writer did not (it died between its commit and its count); idempotent.
    pub fn settle(&self, word: u64) {
        let intent = self.intent.load(Ordering::Acquire);
        if intent_ticket(intent) != Some(slot::ticket_of(word)) {
            return; // the writer moved on, which it does only after counting
        }
        let firsts = self.firsts.load(Ordering::Acquire);
        if self.intent.load(Ordering::Acquire) != intent {
            return;
        }
        if firsts & SNAPSHOT_MASK == intent & SNAPSHOT_MASK {
            let _ = self.firsts.compare_exchange(
                firsts,
                firsts.wrapping_add(1),
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
    }

    /// The slot of the insert in progress, if it is `busy(ticket, entry, first = false)`: the
    /// entry still holds a slot whose old record it destroyed. Such an entry is not reused until
    /// that slot is taken over (its -1 must stay countable).
    pub fn holds_overwrite<'s>(&self, seq_of: impl Fn(u64) -> &'s AtomicU64) -> bool {
        self.size_terms(seq_of).1 < 0
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::protocol::slot::{claim, commit, Ask, Busy, Claim};

    struct Words {
        intent: AtomicU64,
        firsts: AtomicU64,
        seq: AtomicU64,
    }

    impl Words {
        fn new() -> Words {
            Words {
                intent: AtomicU64::new(0),
                firsts: AtomicU64::new(0),
                seq: AtomicU64::new(0),
            }
        }
        fn entry(&self) -> Entry<'_> {
            Entry {
                index: 3,
                intent: &self.intent,
                firsts: &self.firsts,
            }
        }
        fn size(&self) -> i64 {
            let (firsts, adjustment) = self.entry().size_terms(|_| &self.seq);
            firsts as i64 + adjustment
        }
    }

    #[test]
    fn killed_between_commit_and_count_is_still_counted_once() {
        let w = Words::new();
        let e = w.entry();
        let intent = e.begin(0);
        assert!(matches!(
            claim(&w.seq, 0, 3, &mut Ask(|_| unreachable!())),
            Claim::Acquired { first: true, .. }
        ));
        assert_eq!(w.size(), 0, "being written: not yet in the size");
        assert!(commit(&w.seq, 0, 3, true));
        // The writer dies here.
        assert_eq!(w.size(), 1, "committed, not counted: the size includes it");
        e.settle(w.seq.load(Ordering::Relaxed));
        e.settle(w.seq.load(Ordering::Relaxed));
        assert_eq!(w.firsts.load(Ordering::Relaxed), 1, "settled exactly once");
        assert_eq!(w.size(), 1);
        // Had the writer lived, its own count would now be a no-op.
        e.count_first(intent);
        assert_eq!(w.size(), 1);
    }

    #[test]
    fn an_overwrite_in_progress_takes_its_slot_out_of_the_size() {
        let w = Words::new();
        let e = w.entry();
        let first = e.begin(0);
        claim(&w.seq, 0, 3, &mut Ask(|_| unreachable!()));
        commit(&w.seq, 0, 3, true);
        e.count_first(first);
        e.end();
        assert_eq!(w.size(), 1);
        e.begin(1);
        let got = claim(&w.seq, 1, 3, &mut Ask(|_| unreachable!()));
        assert!(matches!(got, Claim::Acquired { first: false, .. }));
        assert_eq!(
            w.size(),
            0,
            "the old record is gone while the new one is written"
        );
        assert!(e.holds_overwrite(|_| &w.seq));
        // A survivor takes the slot over (the writer died): the entry no longer holds it.
        claim(&w.seq, 2, 5, &mut Ask(|_| Busy::TakeOver));
        assert_eq!(
            w.size(),
            1,
            "this entry's terms alone: the survivor's entry now carries the -1"
        );
        assert!(!e.holds_overwrite(|_| &w.seq));
    }
}

/// Model checks: a writer that may die anywhere in its insert, a reader of the size and a
/// settler (the next writer of the slot), in every interleaving: the size, once everyone is
/// done, is exactly the number of slots holding a record.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::protocol::slot::{claim, commit, read_begin, Ask, Claim};
    use loom::sync::Arc;
    use loom::thread;

    struct Words {
        intent: AtomicU64,
        firsts: AtomicU64,
        seq: AtomicU64,
    }

    impl Words {
        fn entry(&self) -> Entry<'_> {
            Entry {
                index: 1,
                intent: &self.intent,
                firsts: &self.firsts,
            }
        }
        fn size(&self) -> i64 {
            let (firsts, adjustment) = self.entry().size_terms(|_| &self.seq);
            firsts as i64 + adjustment
        }
    }

    /// The writer of ticket 0 stops after `steps` of: begin, claim, commit, count, end.
    fn writer(w: &Words, steps: usize) {
        let e = w.entry();
        let intent = e.begin(0);
        if steps < 2 {
            return;
        }
        let Claim::Acquired { first, .. } = claim(&w.seq, 0, 1, &mut Ask(|_| unreachable!()))
        else {
            return;
        };
        if steps < 3 {
            return;
        }
        commit(&w.seq, 0, 1, first);
        if steps < 4 {
            return;
        }
        e.count_first(intent);
        if steps < 5 {
            return;
        }
        e.end();
    }

    #[test]
    fn loom_size_is_exact_whatever_step_the_writer_dies_at() {
        for steps in 1..=5 {
            loom::model(move || {
                let w = Arc::new(Words {
                    intent: AtomicU64::new(0),
                    firsts: AtomicU64::new(0),
                    seq: AtomicU64::new(0),
                });
                let writing = {
                    let w = w.clone();
                    thread::spawn(move || writer(&w, steps))
                };
                let settling = {
                    let w = w.clone();
                    thread::spawn(move || {
                        let word = w.seq.load(Ordering::Acquire);
                        if slot::is_first_commit(word) {
                            w.entry().settle(word);
                        }
                        let size = w.size();
                        assert!((0..=1).contains(&size), "size {size} out of range");
                    })
                };
                writing.join().unwrap();
                settling.join().unwrap();
                let holds = i64::from(read_begin(&w.seq).is_some());
                assert_eq!(w.size(), holds, "steps {steps}");
                assert!(w.firsts.load(Ordering::Relaxed) <= 1, "counted twice");
            });
        }
    }
}
