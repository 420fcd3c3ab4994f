//! Episode links: how a reader finds the next frame of an episode in a ring that many writers
//! share, without trusting a link that outlived its slot.
//!
//! A frame's record holds `prev`, its predecessor's ticket + 1 (written with the record, under
//! the slot's seqlock). Its successor is found through the slot's link word, which the
//! episode's writer sets ([`link`]) once the successor is committed. The link word is not
//! covered by the seqlock: when a slot is overwritten, its old link stays until the new
//! occupant's writer replaces it, and a writer may set a link just after its frame's slot was
//! overwritten. So a reader follows a link from frame `t` only to a later ticket ([`linked`]),
//! and accepts the frame there only if that slot holds exactly that ticket and its `prev` names
//! `t` ([`follows`]) — tickets are never reused, so that is the successor `t`'s writer wrote,
//! whatever happened to the link word. A reader validates every slot it used afterwards
//! (`slot::read_validate`), as for any record.

use crate::sync::{AtomicU64, Ordering};

/// Links a frame's slot `word` to its committed successor `successor` (Release: a reader that
/// follows the link finds the successor's commit), if `holds_frame()` says the slot still holds
/// the frame. The word is read before that check and replaced only if unchanged since: a slot
/// overwritten in between, whose new frame's writer already linked it, keeps that link (a
/// plain store would hide it, and the new frame's windows with it). Returns whether it linked.
pub fn link(word: &AtomicU64, successor: u64, holds_frame: impl FnOnce() -> bool) -> bool {
    let old = word.load(Ordering::Acquire);
    holds_frame()
        && word
            .compare_exchange(old, successor + 1, Ordering::Release, Ordering::Relaxed)
            .is_ok()
}

/// The ticket a reader may look for as the successor of frame `ticket`, from its slot's link
/// word: a later ticket, or none.
pub fn linked(word: &AtomicU64, ticket: u64) -> Option<u64> {
    word.load(Ordering::Acquire)
        .checked_sub(1)
        .filter(|&t| t > ticket)
}

/// Whether a frame whose record says `prev` follows frame `ticket` in its episode.
pub fn follows(prev: u64, ticket: u64) -> bool {
    prev == ticket + 1
}

/// The `prev` word of a frame whose predecessor is `ticket` (`None`: it starts an episode).
pub fn prev_word(ticket: Option<u64>) -> u64 {
    ticket.map_or(0, |t| t + 1)
}

#[cfg(loom)]
mod loom_tests {
    use super::*;
    use crate::protocol::slot;
    use loom::sync::Arc;

    /// Two slots, each a seqlock word, a `prev` word inside the record, and a link word.
    struct Ring {
        seq: [AtomicU64; 2],
        prev: [AtomicU64; 2],
        link: [AtomicU64; 2],
    }

    impl Ring {
        /// Writes frame `ticket` with predecessor `prev` (the slot's previous lap is done).
        fn write(&self, ticket: u64, prev: Option<u64>) {
            let i = (ticket % 2) as usize;
            let old = self.seq[i].load(Ordering::Relaxed);
            self.seq[i].store(slot::busy(ticket, 0, old == 0), Ordering::Relaxed);
            crate::sync::fence(Ordering::Release);
            self.prev[i].store(prev_word(prev), Ordering::Relaxed);
            assert!(slot::commit(&self.seq[i], ticket, 0, old == 0));
        }
    }

    /// A reader walking from slot 0 to its linked successor accepts only a true succession,
    /// while the episode's writer links frames 0 -> 1 and another writer overwrites slot 0 with
    /// frame 2 (a new episode) in between, racing the link.
    #[test]
    fn loom_a_followed_link_always_leads_to_the_true_successor() {
        loom::model(|| {
            let ring = Arc::new(Ring {
                seq: [AtomicU64::new(0), AtomicU64::new(0)],
                prev: [AtomicU64::new(0), AtomicU64::new(0)],
                link: [AtomicU64::new(0), AtomicU64::new(0)],
            });
            ring.write(0, None);
            let writer = {
                let ring = ring.clone();
                loom::thread::spawn(move || {
                    ring.write(1, Some(0));
                    // The writer checks slot 0 still holds frame 0, but the other writer may
                    // overwrite it before the link lands.
                    link(&ring.link[0], 1, || {
                        let word = ring.seq[0].load(Ordering::Acquire);
                        slot::read_begin(&ring.seq[0]).is_some() && slot::ticket_of(word) == 0
                    });
                })
            };
            let other = {
                let ring = ring.clone();
                loom::thread::spawn(move || ring.write(2, None))
            };
            // The reader: frame at slot 0, then its successor through the link.
            let reader = loom::thread::spawn(move || {
                if let Some(begun) = slot::read_begin(&ring.seq[0]) {
                    let ticket = slot::ticket_of(begun);
                    if let Some(next) = linked(&ring.link[0], ticket) {
                        let j = (next % 2) as usize;
                        if let Some(next_begun) = slot::read_begin(&ring.seq[j]) {
                            let next_prev = ring.prev[j].load(Ordering::Relaxed);
                            let accepted = slot::ticket_of(next_begun) == next
                                && follows(next_prev, ticket)
                                && slot::read_validate(&ring.seq[0], begun)
                                && slot::read_validate(&ring.seq[j], next_begun);
                            if accepted {
                                assert_eq!((ticket, next), (0, 1), "followed a stale link");
                            }
                        }
                    }
                }
            });
            reader.join().unwrap();
            writer.join().unwrap();
            other.join().unwrap();
        });
    }
}
