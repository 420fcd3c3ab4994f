//! The handshake between attaching and garbage collection: however many `attach` and `gc`
//! calls run at once, a buffer that any live process holds is never removed.
//!
//! Three kinds of kernel lock on the segment file do it (see `platform::locks`), no timing:
//!
//! * each handle holds an exclusive lock on its entry's byte for as long as it lives (the
//!   kernel drops it when the process dies);
//! * an attacher holds the *gate* shared while it checks that the file is still linked and
//!   takes its entry;
//! * a gc takes the gate exclusive, then every entry byte exclusive: if it gets both, no handle
//!   exists and none can appear until it releases the gate; only then does it unlink.
//!
//! So either the attacher's entry lock exists before the gc looks (the gc fails to lock it and
//! keeps the buffer), or the gc's unlink happens before the attacher looks at the link count
//! (the attacher finds the file unlinked and reports it gone). Two gcs exclude each other on
//! the gate: the loser skips the buffer, which is not an error. A gc or attacher that dies
//! holding the gate releases it by dying.

use crate::error::Result;

/// The locks and file facts the handshake needs (the kernel's, or a model's under loom).
pub(crate) trait SegmentLocks {
    /// Takes the gate without waiting: shared for attachers, exclusive for gc.
    fn try_gate(&self, exclusive: bool) -> Result<bool>;
    fn release_gate(&self);
    /// Takes the lock of every handle entry, without waiting (gc only).
    fn try_all_entries(&self) -> Result<bool>;
    fn release_all_entries(&self);
    /// True while the segment file is linked under some name.
    fn is_linked(&self) -> Result<bool>;
}

/// What one attempt at the attacher's side of the handshake got.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admission<T> {
    /// Registered: `take_entry`'s result.
    Admitted(T),
    /// A gc holds the gate: try again shortly.
    Busy,
    /// The segment was removed: the buffer is gone.
    Removed,
}

/// The attacher's side: holding the gate shared, checks the file is still linked (unless the
/// caller already holds a handle, e.g. one inherited through `fork`, which keeps working after
/// an unlink), then runs `take_entry` (which locks a handle entry).
pub(crate) fn admit<L: SegmentLocks, T>(
    locks: &L,
    require_linked: bool,
    take_entry: impl FnOnce() -> Result<T>,
) -> Result<Admission<T>> {
    if !locks.try_gate(false)? {
        return Ok(Admission::Busy);
    }
    let linked = if require_linked {
        locks.is_linked()
    } else {
        Ok(true)
    };
    let result = match linked {
        Ok(true) => take_entry().map(Admission::Admitted),
        Ok(false) => Ok(Admission::Removed),
        Err(e) => Err(e),
    };
    locks.release_gate();
    result
}

/// What the gc's side decided.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Removed by this call.
    Removed,
    /// Held by some handle, or its creator may still be running: kept.
    Kept,
    /// Another gc or an attacher is at it right now: skipped (not an error).
    Busy,
}

/// The gc's side: with the gate and every entry locked, asks `stale` (the creator's liveness)
/// and, if stale, runs `remove` (which must remove only this very file).
pub(crate) fn reap<L: SegmentLocks>(
    locks: &L,
    stale: impl FnOnce() -> bool,
    remove: impl FnOnce() -> Result<bool>,
) -> Result<Verdict> {
    if !locks.try_gate(true)? {
        return Ok(Verdict::Busy);
    }
    let verdict = (|| {
        if !locks.try_all_entries()? {
            return Ok(Verdict::Kept);
        }
        let removed = if stale() { remove() } else { Ok(false) };
        locks.release_all_entries();
        Ok(if removed? {
            Verdict::Removed
        } else {
            Verdict::Kept
        })
    })();
    locks.release_gate();
    verdict
}

/// Every interleaving of attachers and gcs on one stale buffer: an attacher that was admitted
/// always holds a linked file when its attempt ends; the file is removed at most once.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::sync::{AtomicU64, Ordering};
    use loom::sync::atomic::AtomicBool;
    use loom::sync::Arc;
    use loom::thread;

    /// A model of the kernel's locks: the gate as a reader count with a writer bit, the entry
    /// range as a count of holders, the link as a flag.
    struct Model {
        gate: AtomicU64,
        entries_held: AtomicU64,
        linked: AtomicBool,
        removals: AtomicU64,
    }

    const WRITER: u64 = 1 << 32;

    /// One process's view: the model plus whether this process holds the entry range.
    struct Process<'a>(&'a Model);

    impl SegmentLocks for Process<'_> {
        fn try_gate(&self, exclusive: bool) -> Result<bool> {
            let gate = &self.0.gate;
            let current = gate.load(Ordering::SeqCst);
            let ok = if exclusive {
                current == 0
                    && gate
                        .compare_exchange(0, WRITER, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
            } else {
                current & WRITER == 0
                    && gate
                        .compare_exchange(current, current + 1, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
            };
            Ok(ok)
        }
        fn release_gate(&self) {
            let gate = &self.0.gate;
            if gate.load(Ordering::SeqCst) == WRITER {
                gate.store(0, Ordering::SeqCst);
            } else {
                gate.fetch_sub(1, Ordering::SeqCst);
            }
        }
        fn try_all_entries(&self) -> Result<bool> {
            // Attachers only add holders while they hold the gate shared, which the gc's
            // exclusive gate excludes: a plain check is the model of the kernel's lock here.
            Ok(self.0.entries_held.load(Ordering::SeqCst) == 0)
        }
        fn release_all_entries(&self) {}
        fn is_linked(&self) -> Result<bool> {
            Ok(self.0.linked.load(Ordering::SeqCst))
        }
    }

    #[test]
    fn loom_gc_never_removes_a_buffer_an_attacher_was_admitted_to() {
        loom::model(|| {
            let model = Arc::new(Model {
                gate: AtomicU64::new(0),
                entries_held: AtomicU64::new(0),
                linked: AtomicBool::new(true),
                removals: AtomicU64::new(0),
            });
            let gcs: Vec<_> = (0..2)
                .map(|_| {
                    let model = model.clone();
                    thread::spawn(move || {
                        let p = Process(&model);
                        reap(
                            &p,
                            || true,
                            // Like `remove_if_same`: only a file still linked is removed.
                            || {
                                let removed = model
                                    .linked
                                    .compare_exchange(
                                        true,
                                        false,
                                        Ordering::SeqCst,
                                        Ordering::SeqCst,
                                    )
                                    .is_ok();
                                if removed {
                                    model.removals.fetch_add(1, Ordering::SeqCst);
                                }
                                Ok(removed)
                            },
                        )
                        .unwrap()
                    })
                })
                .collect();
            let attacher = {
                let model = model.clone();
                thread::spawn(move || {
                    let p = Process(&model);
                    admit(&p, true, || {
                        model.entries_held.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    })
                    .unwrap()
                })
            };
            let admitted = attacher.join().unwrap() == Admission::Admitted(());
            for gc in gcs {
                gc.join().unwrap();
            }
            if admitted {
                assert!(
                    model.linked.load(Ordering::SeqCst),
                    "an admitted attacher's buffer was removed"
                );
            }
            assert!(model.removals.load(Ordering::SeqCst) <= 1);
        });
    }
}
