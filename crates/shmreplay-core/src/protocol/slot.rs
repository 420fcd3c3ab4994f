//! The per-slot seqlock: the whole concurrency protocol of the ring, in one place.
//!
//! Each slot has one version word `seq`, stored right before the slot's record:
//!
//! ```text
//!  63                          12   11    10 … 1   0
//! +------------------------------+-------+--------+------+
//! |  ticket + 1   (0 = never)    | first | owner  | busy |
//! +------------------------------+-------+--------+------+
//! ```
//!
//! * `0`: the slot was never written.
//! * busy = 0: the slot holds the committed record of insert number `ticket`. If `first` is set,
//!   that commit was the slot's first one, made through handle-table entry `owner`, and nobody
//!   has overwritten it since: the size count of that entry may still lack it (see
//!   `protocol::handles`, which settles it before the word is replaced).
//! * busy = 1: handle-table entry `owner` is writing insert `ticket` into the slot; `first` says
//!   the slot held no committed record before (so the commit grows the buffer's size).
//!
//! Writers ([`claim`] / [`commit`]) never wait for readers. Readers ([`read_begin`] /
//! [`read_validate`]) never write shared memory and never wait: a slot that is busy or changes
//! while they copy is dropped and the caller draws another. Tickets are unique, so a validated
//! version word cannot be an ABA coincidence.
//!
//! A commit is a compare-and-swap from the writer's own busy word: a writer whose slot was
//! taken over (which needs proof of its death, so never happens to a live writer unless that
//! proof was wrong) never publishes.
//!
//! Why the orderings are enough (C++20/Rust memory model; the classic seqlock argument of
//! Boehm, "Can seqlocks get along with programming language memory models?", MSPC 2012, also
//! used by crossbeam's `AtomicCell`):
//! * the writer's `fence(Release)` after its claim CAS and the reader's `fence(Acquire)` after its
//!   data loads synchronise whenever the reader saw any word the writer stored; then the claim
//!   happens-before the reader's second `seq` load, which therefore sees a busy or newer word and
//!   fails validation.
//! * if the reader saw only older data, the commit (`Release`) it read at [`read_begin`]
//!   (`Acquire`) happens-before its data loads, so it saw exactly that commit's record.
//!
//! This module is model-checked with loom (`make loom`): see the tests at the bottom.

use crate::sync::{fence, spin_loop, yield_now, AtomicU64, Ordering};

const BUSY: u64 = 1;
const OWNER_SHIFT: u32 = 1;
const OWNER_BITS: u32 = 10;
const FIRST: u64 = 1 << (OWNER_SHIFT + OWNER_BITS);
const TICKET_SHIFT: u32 = 12;
/// A waiting writer asks whether the slot's writer died once per this many spins: the question
/// reads `/proc`, and the answer is almost always "no, it is just slower".
const SPINS_PER_LIVENESS_CHECK: u32 = if cfg!(loom) { 1 } else { 64 };

/// How many handle-table entries a seq word can name.
pub const MAX_OWNERS: usize = 1 << OWNER_BITS;
/// Tickets must stay below this so that `ticket + 1` fits the word.
pub const MAX_TICKET: u64 = (1 << (64 - TICKET_SHIFT)) - 2;

/// The seq word of a slot holding the committed record of `ticket` (not its first commit).
pub fn committed(ticket: u64) -> u64 {
    (ticket + 1) << TICKET_SHIFT
}

/// The seq word of a slot holding the first record ever committed to it, by entry `owner`.
pub fn committed_first(ticket: u64, owner: usize) -> u64 {
    committed(ticket) | ((owner as u64) << OWNER_SHIFT) | FIRST
}

/// The seq word of a slot that entry `owner` is writing insert `ticket` into.
pub fn busy(ticket: u64, owner: usize, first: bool) -> u64 {
    debug_assert!(owner < MAX_OWNERS);
    committed(ticket) | ((owner as u64) << OWNER_SHIFT) | if first { FIRST } else { 0 } | BUSY
}

/// A committed word whose commit was the slot's first (see the module docs).
pub fn is_first_commit(word: u64) -> bool {
    names_a_ticket(word) && !is_busy(word) && word & FIRST != 0
}

/// The insert ticket a seq word refers to (meaningful when [`names_a_ticket`]).
pub fn ticket_of(word: u64) -> u64 {
    (word >> TICKET_SHIFT).wrapping_sub(1)
}

/// False for 0 (never written) and for damaged words with flags but no ticket, which no
/// writer stores: a waiting writer takes such a slot over.
pub fn names_a_ticket(word: u64) -> bool {
    word >> TICKET_SHIFT != 0
}

pub fn is_busy(word: u64) -> bool {
    word & BUSY != 0
}

/// The handle-table entry named by a busy word.
pub fn owner_of(word: u64) -> usize {
    ((word >> OWNER_SHIFT) & ((1 << OWNER_BITS) - 1)) as usize
}

/// What [`claim`] got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The slot is ours; write the record, then [`commit`].
    Acquired {
        /// The slot held no committed record before: committing it grows the buffer.
        first: bool,
        /// We took the slot over from a writer that died while writing it.
        recovered: bool,
    },
    /// A newer ticket already owns this slot: our record would be overwritten at once, drop it.
    Superseded,
    /// The caller gave up waiting for the slot's writer ([`Busy::GiveUp`]); nothing was changed.
    GaveUp,
}

/// What [`claim`] asks its caller about the words it finds.
pub trait Contention {
    /// What to do about busy word `word` (asked rarely: after spinning).
    fn busy(&mut self, word: u64) -> Busy;
    /// Called before a first commit's word (see [`is_first_commit`]) is replaced, so that its
    /// committer's size count is settled first.
    fn settle(&mut self, word: u64);
}

/// What a writer waiting for a slot's busy writer does next, decided by [`claim`]'s caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Busy {
    /// The writer is alive: keep waiting.
    Wait,
    /// The writer is dead and will never finish: take the slot over.
    TakeOver,
    /// Stop waiting (the caller was interrupted).
    GiveUp,
}

/// Locks the slot whose version word is `seq` for insert `ticket`, as handle-table entry `owner`.
///
/// Waits only for another *writer* of the same slot, i.e. an insert one lap older that is still
/// copying; `contention.busy(word)` is asked (rarely: after spinning) what to do about the
/// writer named in busy word `word`: wait on, take the slot over (that writer is dead), or give
/// up.
pub fn claim(
    seq: &AtomicU64,
    ticket: u64,
    owner: usize,
    contention: &mut impl Contention,
) -> Claim {
    let mut current = seq.load(Ordering::Acquire);
    let mut spins = 0u32;
    loop {
        if names_a_ticket(current) && ticket_of(current) > ticket {
            return Claim::Superseded;
        }
        let recovered = is_busy(current);
        if recovered {
            spins += 1;
            let verdict = if spins % SPINS_PER_LIVENESS_CHECK == 0 {
                contention.busy(current)
            } else {
                Busy::Wait
            };
            if verdict == Busy::GiveUp {
                return Claim::GaveUp;
            }
            if verdict == Busy::Wait {
                if spins < 16 {
                    spin_loop();
                } else {
                    yield_now();
                }
                current = seq.load(Ordering::Acquire);
                continue;
            }
        }
        if is_first_commit(current) {
            contention.settle(current);
        }
        // A word without a ticket is either 0 or damaged: the slot holds no record.
        let first = !names_a_ticket(current) || (recovered && current & FIRST != 0);
        // AcqRel: Acquire orders our record stores after the previous writer's (their commit
        // was Release); Release publishes our handle entry's `writing` mark before the busy word
        // that points at it, so `orphaned` can trust it.
        match seq.compare_exchange_weak(
            current,
            busy(ticket, owner, first),
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => {
                // Orders the record stores that follow after the busy word (see module docs).
                fence(Ordering::Release);
                return Claim::Acquired { first, recovered };
            }
            Err(now) => current = now,
        }
    }
}

/// Publishes the record of `ticket` written by entry `owner` into a slot claimed by [`claim`]
/// (`first` as the claim reported). False if the slot is no longer ours: nothing was published.
pub fn commit(seq: &AtomicU64, ticket: u64, owner: usize, first: bool) -> bool {
    let done = if first {
        committed_first(ticket, owner)
    } else {
        committed(ticket)
    };
    // Release: publishes the record stores (see the module docs).
    seq.compare_exchange(
        busy(ticket, owner, first),
        done,
        Ordering::Release,
        Ordering::Relaxed,
    )
    .is_ok()
}

/// Starts a read: the committed version to validate against, or `None` if the slot holds no
/// readable record right now (never written, being written, or damaged).
pub fn read_begin(seq: &AtomicU64) -> Option<u64> {
    let word = seq.load(Ordering::Acquire);
    (names_a_ticket(word) && !is_busy(word)).then_some(word)
}

/// Ends a read begun at version `begun`: true iff the bytes copied since are that record, whole.
pub fn read_validate(seq: &AtomicU64, begun: u64) -> bool {
    fence(Ordering::Acquire);
    seq.load(Ordering::Relaxed) == begun
}

/// A [`Contention`] from a closure answering `busy`, for tests that have no size counts.
#[cfg(test)]
pub(crate) struct Ask<F>(pub F);

#[cfg(test)]
impl<F: FnMut(u64) -> Busy> Contention for Ask<F> {
    fn busy(&mut self, word: u64) -> Busy {
        (self.0)(word)
    }
    fn settle(&mut self, _word: u64) {}
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn word_encoding_round_trips() {
        let w = busy(12345, 1023, true);
        assert!(is_busy(w));
        assert_eq!(ticket_of(w), 12345);
        assert_eq!(owner_of(w), 1023);
        assert_eq!(w & FIRST, FIRST);
        assert_eq!(ticket_of(committed(MAX_TICKET)), MAX_TICKET);
        assert!(!is_busy(committed(7)));
    }

    #[test]
    fn claim_commit_read() {
        let seq = AtomicU64::new(0);
        assert_eq!(read_begin(&seq), None);
        let got = claim(&seq, 3, 5, &mut Ask(|_| unreachable!()));
        assert_eq!(
            got,
            Claim::Acquired {
                first: true,
                recovered: false
            }
        );
        assert_eq!(read_begin(&seq), None, "a busy slot is not readable");
        assert!(commit(&seq, 3, 5, true));
        assert!(is_first_commit(seq.load(Ordering::Relaxed)));
        let v = read_begin(&seq).unwrap();
        assert!(read_validate(&seq, v));
        assert_eq!(ticket_of(v), 3);
        // An older lap arriving late is dropped, not written over the newer record.
        assert_eq!(
            claim(&seq, 1, 0, &mut Ask(|_| unreachable!())),
            Claim::Superseded
        );
        assert_eq!(
            claim(&seq, 11, 0, &mut Ask(|_| unreachable!())),
            Claim::Acquired {
                first: false,
                recovered: false
            }
        );
        assert!(!read_validate(&seq, v));
    }

    #[test]
    fn dead_writer_slot_is_taken_over_and_keeps_first_flag() {
        let seq = AtomicU64::new(busy(2, 9, true));
        let mut asked = 0;
        let got = claim(
            &seq,
            12,
            1,
            &mut Ask(|w| {
                asked += 1;
                assert_eq!(owner_of(w), 9);
                Busy::TakeOver
            }),
        );
        assert_eq!(asked, 1);
        assert_eq!(
            got,
            Claim::Acquired {
                first: true,
                recovered: true
            }
        );
        assert_eq!(owner_of(seq.load(Ordering::Relaxed)), 1);
    }

    #[test]
    fn a_writer_whose_slot_was_taken_over_never_publishes() {
        let seq = AtomicU64::new(0);
        let got = claim(&seq, 2, 9, &mut Ask(|_| unreachable!()));
        assert!(matches!(got, Claim::Acquired { first: true, .. }));
        // Taken over (wrongly believed dead), then the first writer resumes.
        claim(&seq, 12, 1, &mut Ask(|_| Busy::TakeOver));
        assert!(
            !commit(&seq, 2, 9, true),
            "a lost slot must not be published"
        );
        assert!(is_busy(seq.load(Ordering::Relaxed)));
        assert!(commit(&seq, 12, 1, true));
    }

    #[test]
    fn damaged_words_are_never_read_and_are_claimed_as_empty() {
        for word in [FIRST, FIRST | (3 << OWNER_SHIFT), 1 << 5] {
            let seq = AtomicU64::new(word);
            assert_eq!(read_begin(&seq), None);
            let got = claim(&seq, 4, 0, &mut Ask(|_| Busy::TakeOver));
            assert!(
                matches!(got, Claim::Acquired { first: true, .. }),
                "{word:#x}"
            );
        }
    }

    #[test]
    fn giving_up_leaves_the_slot_to_its_writer() {
        let word = busy(2, 9, false);
        let seq = AtomicU64::new(word);
        let mut asked = 0;
        let got = claim(
            &seq,
            12,
            1,
            &mut Ask(|_| {
                asked += 1;
                if asked < 3 {
                    Busy::Wait
                } else {
                    Busy::GiveUp
                }
            }),
        );
        assert_eq!((got, asked), (Claim::GaveUp, 3));
        assert_eq!(seq.load(Ordering::Relaxed), word);
    }
}

/// Model checks of the protocol: every interleaving (within loom's bounds) of writers and a
/// reader on a 1-slot ring, with records of two words that must never be seen mixed.
///
/// Every actor is a spawned thread: loom does not preempt the main thread before its first
/// operation, so a read done there would always run before the writers and prove nothing.
/// Both tests were checked to fail when validation, the writer's Release fence or the reader's
/// Acquire fence is removed, or when a waiting writer takes over a slot without asking whether
/// its writer is dead.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::atomic::AtomicBool;
    use loom::sync::Arc;
    use loom::thread;

    struct Ring {
        cursor: AtomicU64,
        seq: AtomicU64,
        data: [AtomicU64; 2],
    }

    impl Ring {
        fn new() -> Arc<Ring> {
            Arc::new(Ring {
                cursor: AtomicU64::new(0),
                seq: AtomicU64::new(0),
                data: [AtomicU64::new(0), AtomicU64::new(0)],
            })
        }

        /// A writer's whole insert; `die_mid_copy` stops after the first word, like a SIGKILL.
        fn insert(
            &self,
            owner: usize,
            value: u64,
            die_mid_copy: bool,
            owner_dead: &dyn Fn(usize) -> bool,
        ) {
            let ticket = self.cursor.fetch_add(1, Ordering::Relaxed);
            let mut ask = Ask(|w| {
                if owner_dead(owner_of(w)) {
                    Busy::TakeOver
                } else {
                    Busy::Wait
                }
            });
            if let Claim::Acquired { first, .. } = claim(&self.seq, ticket, owner, &mut ask) {
                self.data[0].store(value, Ordering::Relaxed);
                if die_mid_copy {
                    return;
                }
                self.data[1].store(value, Ordering::Relaxed);
                commit(&self.seq, ticket, owner, first);
            }
        }

        /// A reader's attempt: `Some(record)` only if validated.
        fn read(&self) -> Option<(u64, u64)> {
            let begun = read_begin(&self.seq)?;
            let a = self.data[0].load(Ordering::Relaxed);
            let b = self.data[1].load(Ordering::Relaxed);
            read_validate(&self.seq, begun).then_some((a, b))
        }
    }

    /// Exhaustive search over 4 threads with spinning writers does not finish; 3 preemptions
    /// is loom's recommended bound and still reaches every bug listed above.
    fn model(test: impl Fn() + Sync + Send + 'static) {
        let mut builder = loom::model::Builder::new();
        if builder.preemption_bound.is_none() {
            builder.preemption_bound = Some(3);
        }
        builder.check(test);
    }

    fn spawn_reader(ring: &Arc<Ring>, check: fn((u64, u64))) -> thread::JoinHandle<()> {
        let ring = ring.clone();
        thread::spawn(move || {
            if let Some(record) = ring.read() {
                check(record);
            }
        })
    }

    #[test]
    fn loom_two_writers_one_reader_never_torn() {
        model(|| {
            let ring = Ring::new();
            let mut threads: Vec<_> = (1..=2u64)
                .map(|w| {
                    let ring = ring.clone();
                    thread::spawn(move || ring.insert(w as usize, w * 100, false, &|_| false))
                })
                .collect();
            threads.push(spawn_reader(&ring, |(a, b)| {
                assert_eq!(a, b, "torn record");
                assert!(a == 100 || a == 200);
            }));
            for t in threads {
                t.join().unwrap();
            }
            let (a, b) = ring.read().expect("a quiescent committed slot is readable");
            assert_eq!(a, b);
        });
    }

    #[test]
    fn loom_dead_writer_is_taken_over_and_never_read_torn() {
        model(|| {
            let ring = Ring::new();
            // Writer 1 dies after half its copy. Like the kernel for a killed process, `dead`
            // reports the death only once the dead writer can store nothing more.
            let dead = Arc::new(AtomicBool::new(false));
            let dying = {
                let (ring, dead) = (ring.clone(), dead.clone());
                thread::spawn(move || {
                    ring.insert(1, 100, true, &|_| false);
                    dead.store(true, Ordering::Release);
                })
            };
            let survivor = {
                let (ring, dead) = (ring.clone(), dead.clone());
                thread::spawn(move || {
                    ring.insert(2, 200, false, &|owner| {
                        owner == 1 && dead.load(Ordering::Acquire)
                    })
                })
            };
            let reader = spawn_reader(&ring, |record| {
                assert_eq!(
                    record,
                    (200, 200),
                    "only the survivor's whole record is readable"
                )
            });
            for t in [dying, survivor, reader] {
                t.join().unwrap();
            }
            match ring.read() {
                // The survivor either took the slot over or came first and was superseded.
                Some(record) => assert_eq!(record, (200, 200)),
                None => assert!(is_busy(ring.seq.load(Ordering::Relaxed))),
            }
        });
    }
}
