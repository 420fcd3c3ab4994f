//! What a buffer holds and what happened to it: size, counters, attached processes.

use std::path::PathBuf;

use super::{entry_lock, NoBlocking, ReplayBuffer};
use crate::layout;
use crate::platform::liveness::{self, Liveness};
use crate::protocol::handles::Counter;

/// A live view of one segment's counters, summed over every handle that ever used it
/// (approximate while other processes are running, exact once they are quiet).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    pub capacity: u64,
    /// Slots holding a committed record (`len`).
    pub size: u64,
    /// Records committed since creation.
    pub inserts: u64,
    /// Rows returned by `sample`.
    pub samples: u64,
    /// Draws that hit a slot being written (or overwritten while copied) and were redrawn.
    pub retries: u64,
    /// Slots taken over from a writer proved dead while writing them.
    pub recovered: u64,
    /// Inserts dropped because a newer insert had already taken their slot.
    pub superseded: u64,
    /// Commits refused because the slot had been taken over meanwhile (a writer wrongly
    /// believed dead; never expected).
    pub lost: u64,
    /// Priority updates ignored because their record had been overwritten since it was
    /// sampled (0 in uniform buffers).
    pub stale_updates: u64,
    /// Live handles, over all processes.
    pub attached: u64,
    /// Rows deleted: overwritten (a ring), or delivered and skipped (a queue).
    pub deletes: u64,
    /// Nanoseconds inserts spent waiting for flow control, over all processes.
    pub insert_wait_ns: u64,
    /// Nanoseconds samples spent waiting for flow control, over all processes.
    pub sample_wait_ns: u64,
}

impl Stats {
    /// `(name, value)` of every counter, in a fixed order: the one definition of the stats'
    /// shape, which the Python binding turns into its dict.
    pub fn items(&self) -> [(&'static str, u64); 13] {
        [
            ("capacity", self.capacity),
            ("size", self.size),
            ("inserts", self.inserts),
            ("samples", self.samples),
            ("retries", self.retries),
            ("recovered", self.recovered),
            ("superseded", self.superseded),
            ("lost", self.lost),
            ("stale_updates", self.stale_updates),
            ("attached", self.attached),
            ("deletes", self.deletes),
            ("insert_wait_ns", self.insert_wait_ns),
            ("sample_wait_ns", self.sample_wait_ns),
        ]
    }
}

/// One segment found by [`crate::list`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct SegmentInfo {
    pub name: String,
    pub path: PathBuf,
    pub capacity: u64,
    pub size: u64,
    pub bytes: u64,
    pub record_bytes: u64,
    pub attached: u64,
    /// Pid of the process that created the buffer.
    pub creator_pid: u32,
    /// How it samples.
    pub sampler: crate::layout::Sampler,
    /// An episode buffer (`EpisodeBuffer`), not a plain ring.
    pub episodes: bool,
    /// No handle is held by any process and its creator is provably gone: [`crate::remove_stale`]
    /// removes it.
    pub stale: bool,
}

impl ReplayBuffer {
    /// Slots that hold a committed record: first fills counted in every entry, plus the
    /// adjustments of inserts in progress (see `protocol::handles`). Exact when no insert is in
    /// flight, whoever died where. In a queue: the rows admitted and not yet delivered.
    pub fn len(&self) -> u64 {
        if let crate::layout::Flow::Queue(_) = self.flow() {
            // Admitted, not yet delivered (rows still being written included).
            return self.flow_counts().size().min(self.capacity());
        }
        let mut size = 0i64;
        for e in 0..self.entries_used() {
            let (firsts, adjustment) = self.entry(e).size_terms(|t| self.seq_of_ticket(t));
            size = size.wrapping_add(firsts as i64).wrapping_add(adjustment);
        }
        size.clamp(0, self.capacity() as i64) as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counters summed over every handle that ever used the buffer.
    pub fn stats(&self) -> Stats {
        let mut totals = [0u64; Counter::ALL.len()];
        for e in 0..self.entries_used() {
            for (total, counter) in totals.iter_mut().zip(Counter::ALL) {
                // Wrapping: the counters live in shared memory, which anyone with access may
                // scribble.
                *total = total.wrapping_add(
                    self.entry_word(e, counter.offset())
                        .load(std::sync::atomic::Ordering::Relaxed),
                );
            }
        }
        let [inserts, samples, retries, recovered, superseded, lost, stale_updates, insert_wait_ns, sample_wait_ns] =
            totals;
        Stats {
            capacity: self.capacity(),
            size: self.len(),
            inserts,
            samples,
            retries,
            recovered,
            superseded,
            lost,
            stale_updates,
            attached: self.held_entries().len() as u64,
            deletes: self.flow_counts().deletes,
            insert_wait_ns,
            sample_wait_ns,
        }
    }

    /// Entries some live handle holds (its lock is held), with their owners' pids.
    fn held_entries(&self) -> Vec<(usize, u32)> {
        let Ok(lock) = self.locks(&mut NoBlocking) else {
            return Vec::new();
        };
        let mine = self.registered_entry();
        (0..self.entries_used())
            .filter(|&e| mine == Some(e) || lock.held_by_others(entry_lock(e)).unwrap_or(true))
            .map(|e| (e, self.owner(e).pid()))
            .collect()
    }

    /// Pids of the processes holding handles to this buffer, sorted, without repeats.
    pub fn processes(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .held_entries()
            .into_iter()
            .filter(|&(e, _)| liveness::liveness(self.owner(e)) != Liveness::Dead)
            .map(|(_, pid)| pid)
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// What [`crate::list`] reports about this buffer.
    pub fn info(&self) -> SegmentInfo {
        let stats = self.stats();
        let creator = layout::creator(&self.segment);
        SegmentInfo {
            name: self.name.clone(),
            path: self.path.clone(),
            capacity: stats.capacity,
            size: stats.size,
            bytes: self.segment_bytes(),
            record_bytes: self.layout.record_bytes as u64,
            attached: stats.attached,
            creator_pid: creator.pid(),
            sampler: self.sampler(),
            episodes: self.holds_episodes(),
            stale: stats.attached == 0 && self.creator_is_gone(),
        }
    }

    /// True if the process that created the buffer is provably gone (half of
    /// [`SegmentInfo::stale`]; gc asks it with every entry locked).
    pub(crate) fn creator_is_gone(&self) -> bool {
        liveness::liveness(layout::creator(&self.segment)) == Liveness::Dead
    }
}
