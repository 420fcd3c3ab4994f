//! Inserting records: tickets from the cursor in small chunks, one seqlock claim and commit per
//! slot, and waits for a slot's previous writer that never happen under the embedder's lock.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::priority::{LeafWriter, RowPriorities};
use super::{Backoff, Blocking, InColumn, NoBlocking, Orphan, ReplayBuffer, WAIT_LIMIT};
use crate::error::{Error, Result};
use crate::layout::{self, Flow, STAGED_RECORD_BYTES};
use crate::platform::interrupt::Patience;
use crate::platform::liveness::Liveness;
use crate::platform::locks::LockFile;
use crate::protocol::handles::Counter;
use crate::protocol::slot::{self, Busy, Claim, Contention};
use std::sync::Arc;

/// Tickets a writer takes from the cursor at a time. A writer killed mid-insert leaves at most
/// this many claimed tickets unwritten (holes while the ring fills), whatever the size of its
/// insert; taking them one by one would make the cursor's cache line a hot spot.
const CLAIM_CHUNK: u64 = 64;
/// How many rows ahead the writer prefetches its slots.
const PREFETCH_AHEAD: u64 = 16;

/// Where a test hook stops a writer (cargo feature `test-hooks`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
pub enum PauseAt {
    /// After the first half of the first row's record bytes were stored.
    Copy,
    /// After the first row's commit, before it is counted in the size.
    Count,
}

type Pause<'p> = Option<(PauseAt, &'p mut dyn FnMut(u64))>;

impl ReplayBuffer {
    /// Inserts one record: `fields[i]` holds the bytes of schema field `i`.
    pub fn push(&self, fields: &[&[u8]]) -> Result<()> {
        self.extend(fields).map(|_| ())
    }

    /// Inserts `n` records given column-wise: `columns[i]` holds `n` consecutive values of
    /// schema field `i` (`n * field.bytes` bytes). If `n` exceeds the capacity only the last
    /// `capacity` are written (the others would be overwritten at once, so they take their
    /// tickets but are never written). Returns `n`.
    ///
    /// Everything is validated before the first byte is written. Rows take tickets in order,
    /// in chunks of 64: rows of concurrent inserts may interleave between chunks.
    ///
    /// A writer waits only for the previous writer of a slot it claims (one lap older, still
    /// copying), and only while that writer may be alive: a writer proved dead is taken over.
    /// After 10 s it gives up with [`Error::Contended`]; if the interrupt check fires, with
    /// [`Error::Interrupted`]. Either way the rows before that slot were inserted, the rest not.
    pub fn extend(&self, columns: &[&[u8]]) -> Result<usize> {
        let columns: Vec<InColumn<'_>> = columns.iter().map(|c| InColumn::from_slice(c)).collect();
        self.insert_rows(&columns, None, &mut NoBlocking, None)
    }

    /// [`extend`](Self::extend) into a prioritized buffer: `priorities` holds each row's raw
    /// priority `p >= 0`, or one for all rows. Without priorities (here `None`, or a plain
    /// `extend`), rows get the largest raw priority ever set in the buffer (at least 1.0).
    /// Invalid priorities (negative, not finite, beyond the largest value the tree holds) are
    /// refused before anything is written.
    pub fn extend_columns_with_priorities(
        &self,
        columns: &[InColumn<'_>],
        priorities: Option<&[f64]>,
        blocking: &mut dyn Blocking,
    ) -> Result<usize> {
        self.insert_rows(columns, priorities, blocking, None)
    }

    /// [`extend`](Self::extend) of raw columns, waiting through `blocking` (an embedder releases
    /// its own lock there).
    pub fn extend_columns(
        &self,
        columns: &[InColumn<'_>],
        blocking: &mut dyn Blocking,
    ) -> Result<usize> {
        self.insert_rows(columns, None, blocking, None)
    }

    /// [`extend_columns`](Self::extend_columns), calling `pause(slot)` at `at` in the first
    /// row, while the slot is still claimed. For tests that kill a writer there.
    #[cfg(feature = "test-hooks")]
    pub fn extend_pausing(
        &self,
        columns: &[InColumn<'_>],
        at: PauseAt,
        pause: &mut dyn FnMut(u64),
    ) -> Result<usize> {
        self.insert_rows(columns, None, &mut NoBlocking, Some((at, pause)))
    }

    /// Inserts rows as [`extend_columns_with_priorities`](Self::extend_columns_with_priorities)
    /// does, writing into `tickets[row]` the ticket of each row it committed (rows it did not
    /// commit keep what `tickets` held).
    fn insert_rows(
        &self,
        columns: &[InColumn<'_>],
        priorities: Option<&[f64]>,
        blocking: &mut dyn Blocking,
        pause: Pause<'_>,
    ) -> Result<usize> {
        self.refuse_episodes("write")?;
        self.insert(columns, Leaves::Given(priorities), blocking, pause, None)
    }

    pub(crate) fn insert(
        &self,
        columns: &[InColumn<'_>],
        leaves: Leaves<'_>,
        blocking: &mut dyn Blocking,
        mut pause: Pause<'_>,
        tickets: Option<&mut [u64]>,
    ) -> Result<usize> {
        let n = self.rows_in(columns.iter().map(|c| c.len()), "column")?;
        let priorities = match leaves {
            Leaves::Given(priorities) => self.row_priorities(priorities, n)?,
            Leaves::Withheld => self.tree().map(|_| RowPriorities::All(0, 0)),
        };
        if n == 0 {
            return Ok(0);
        }
        self.repair_if_due(blocking);
        let mut handle = self.lock_handle(blocking)?;
        let entry = self
            .prepare(&mut handle, blocking, true, false)?
            .expect("registered");
        // With flow control the call takes all its tickets when it is admitted (holding the
        // handle: another thread of this process inserting through it waits its turn, and the
        // entry's queue claim is this call's alone).
        let admitted = self.admit_insert(n as u64, entry, blocking)?;
        let read_soon = admitted.is_some_and(|first| self.read_soon(first + n as u64));
        // Rows that the same call would overwrite at once are never written.
        let skipped = n.saturating_sub(self.layout.capacity);
        let mut writer = RowWriter {
            buffer: self,
            columns,
            entry,
            leaves: priorities.map(|p| LeafWriter::new(self, p)),
            tickets,
            read_soon,
            inserted: 0,
            recovered: 0,
            superseded: skipped as u64,
            lost: 0,
        };
        let mut result = Ok(n);
        let mut row = skipped;
        // Rows the call overwrites itself still take their tickets (keys count every row),
        // but write nothing.
        if skipped > 0 && admitted.is_none() {
            if let Err(e) = self.take_tickets(skipped as u64) {
                row = n;
                result = Err(e);
            }
        }
        'chunks: while row < n {
            let take = ((n - row) as u64).min(CLAIM_CHUNK);
            let first_ticket = match admitted {
                Some(first) => first + row as u64,
                None => match self.take_tickets(take) {
                    Ok(t) => t,
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                },
            };
            let first_index = (first_ticket % self.capacity()) as usize;
            if writer.leaves.is_some() {
                self.begin_tree_change(entry);
            }
            let written = (|| {
                for k in 0..take {
                    let ticket = first_ticket + k;
                    if k + PREFETCH_AHEAD < take {
                        self.prefetch(((ticket + PREFETCH_AHEAD) % self.capacity()) as usize);
                    }
                    writer.write(row, ticket, blocking, &mut pause)?;
                    row += 1;
                }
                Ok(())
            })();
            if let Some(leaves) = &writer.leaves {
                leaves.propagate(first_index, take as usize);
                self.end_tree_change(entry);
            }
            if let Err(e) = written {
                result = Err(e);
                break 'chunks;
            }
        }
        self.entry(entry).end();
        self.count(entry, Counter::Inserts, writer.inserted);
        self.count(entry, Counter::Recovered, writer.recovered);
        self.count(entry, Counter::Superseded, writer.superseded);
        self.count(entry, Counter::Lost, writer.lost);
        if let (Some(leaves), true) = (&writer.leaves, writer.inserted > 0) {
            leaves.inserted(skipped);
        }
        // Every ticket the call is done with: committed, or overwritten before it was written.
        self.inserted_rows(entry, writer.inserted + writer.superseded + writer.lost);
        drop(handle);
        result
    }

    /// Takes `n` consecutive tickets, refusing (and taking none) if the counter would pass
    /// the largest ticket a version word can hold.
    fn take_tickets(&self, n: u64) -> Result<u64> {
        self.word(self.control(layout::C_CURSOR))
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                c.checked_add(n).filter(|&end| end <= slot::MAX_TICKET)
            })
            .map_err(|_| {
                Error::InvalidArgument("the insert counter of this buffer is exhausted".into())
            })
    }

    /// True in a queue whose consumers are so close behind that the rows up to ticket `end`
    /// would still be in the cache when they take them (see `copy::cache_reach`): then ordinary
    /// stores leave the lines there for them, where streaming stores would send every row to
    /// memory and back. A deep queue (consumers far behind) streams.
    fn read_soon(&self, end: u64) -> bool {
        if !matches!(self.flow(), Flow::Queue(_)) {
            return false;
        }
        let head = self
            .word(self.control(layout::C_HEAD))
            .load(Ordering::Relaxed);
        let ahead = end.saturating_sub(head);
        ahead.saturating_mul(self.layout.slot_bytes as u64)
            <= crate::platform::copy::cache_reach() as u64
    }

    /// Starts loading slot `index`'s version word and record into the cache.
    pub(super) fn prefetch(&self, index: usize) {
        self.segment
            .prefetch(self.slot_offset(index), self.layout.slot_bytes);
    }
}

/// The priorities an insert gives its rows' leaves (a prioritized ring).
pub(crate) enum Leaves<'p> {
    /// Raw priorities, one per row or one for all (validated); `None`: the largest so far.
    Given(Option<&'p [f64]>),
    /// 0, never drawn: an episode buffer's frames, until their step's window completes.
    Withheld,
}

/// One insert call's rows, written slot by slot.
struct RowWriter<'a> {
    buffer: &'a ReplayBuffer,
    columns: &'a [InColumn<'a>],
    entry: usize,
    /// The priority tree's leaves and the rows' values, in a prioritized buffer.
    leaves: Option<LeafWriter<'a>>,
    /// Where the ticket of each committed row goes, if the caller wants them.
    tickets: Option<&'a mut [u64]>,
    /// A queue's consumers will take these rows while they are still in the cache.
    read_soon: bool,
    inserted: u64,
    recovered: u64,
    superseded: u64,
    lost: u64,
}

impl RowWriter<'_> {
    fn write(
        &mut self,
        row: usize,
        ticket: u64,
        blocking: &mut dyn Blocking,
        pause: &mut Pause<'_>,
    ) -> Result<()> {
        let buffer = self.buffer;
        let index = (ticket % buffer.capacity()) as usize;
        let seq = buffer.seq(index);
        let entry = buffer.entry(self.entry);
        let intent = entry.begin(ticket);
        let mut waiting = Waiting::new(buffer, self.entry, false);
        let mut claimed = slot::claim(seq, ticket, self.entry, &mut waiting);
        if claimed == Claim::GaveUp {
            // The slot's previous writer is still at it: wait for it outside the embedder's lock.
            let mut waiting = Waiting::new(buffer, self.entry, true);
            let entry_index = self.entry;
            let mut outcome = None;
            blocking
                .block(&mut || outcome = Some(slot::claim(seq, ticket, entry_index, &mut waiting)));
            claimed = outcome.expect("block runs its closure");
            if claimed == Claim::GaveUp {
                return Err(waiting.gave_up());
            }
        }
        let (first, took_over) = match claimed {
            Claim::Superseded => {
                self.superseded += 1;
                return Ok(());
            }
            Claim::GaveUp => unreachable!("handled above"),
            Claim::Acquired { first, recovered } => (first, recovered),
        };
        if let Some(leaves) = &self.leaves {
            leaves.claimed(index, ticket);
        }
        // A test hook pauses the first row written, then no more.
        let mut pause = pause.take();
        self.copy_row(row, index, &mut pause);
        if let Some(leaves) = &self.leaves {
            leaves.written(index, ticket, row);
        }
        if !slot::commit(seq, ticket, self.entry, first) {
            self.lost += 1;
            return Ok(());
        }
        if let Some((PauseAt::Count, hook)) = pause.as_mut() {
            hook(index as u64);
        }
        if first {
            entry.count_first(intent);
        }
        if let Some(tickets) = self.tickets.as_deref_mut() {
            tickets[row] = ticket;
        }
        self.inserted += 1;
        self.recovered += u64::from(took_over);
        Ok(())
    }

    /// Copies row `row` of the columns into slot `index`, with the kernels of the copy plan:
    /// small records assembled privately and stored whole, large ones field by field.
    fn copy_row(&self, row: usize, index: usize, pause: &mut Pause<'_>) {
        let buffer = self.buffer;
        let record = buffer.record_offset(index);
        let fields = buffer.schema.fields();
        let mut hook = match pause.as_mut() {
            Some((PauseAt::Copy, hook)) => Some(hook),
            _ => None,
        };
        if buffer.layout.staged() {
            let mut staged = [0u8; STAGED_RECORD_BYTES];
            for (field, column) in fields.iter().zip(self.columns) {
                column.read_into(
                    row * field.bytes,
                    &mut staged[field.offset..field.offset + field.bytes],
                );
            }
            let len = buffer.layout.record_bytes;
            let staged = crate::platform::memory::Input::from_slice(&staged[..len]);
            let kernel = buffer.copy.record.store(self.read_soon);
            match hook.as_mut() {
                // Two stores with the record's own kernel: the same access width as one.
                Some(hook) => {
                    let half = (len / 2).next_multiple_of(8).min(len);
                    buffer.segment.store_from(record, &staged, 0, half, kernel);
                    hook(index as u64);
                    buffer
                        .segment
                        .store_from(record + half, &staged, half, len - half, kernel);
                }
                None => buffer.segment.store_from(record, &staged, 0, len, kernel),
            }
            return;
        }
        let half = buffer.layout.record_bytes / 2;
        for ((field, column), kernels) in fields.iter().zip(self.columns).zip(&buffer.copy.fields) {
            let kernel = kernels.store(self.read_soon);
            let at = record + field.offset;
            let from = row * field.bytes;
            let crosses_half = field.offset <= half && half < field.offset + field.bytes;
            match hook.as_mut() {
                Some(hook) if crosses_half => {
                    let split = (half - field.offset).next_multiple_of(8).min(field.bytes);
                    buffer.segment.store_from(at, column, from, split, kernel);
                    hook(index as u64);
                    buffer.segment.store_from(
                        at + split,
                        column,
                        from + split,
                        field.bytes - split,
                        kernel,
                    );
                }
                _ => buffer
                    .segment
                    .store_from(at, column, from, field.bytes, kernel),
            }
        }
    }
}

/// A writer's answers to the slot protocol's questions about the words it finds.
struct Waiting<'a> {
    buffer: &'a ReplayBuffer,
    /// This process's lock file, fetched the first time a liveness question comes up (most
    /// inserts never ask one).
    lock: Option<Arc<LockFile>>,
    /// The entry this writer claims slots for.
    entry: usize,
    /// False: never wait here (the embedder's lock may be held): give up so the caller can
    /// wait outside it. True: wait, up to the bound.
    may_wait: bool,
    patience: Patience,
    started: Option<Instant>,
    backoff: Backoff,
    last: Option<(u64, Liveness)>,
    interrupted: bool,
}

impl<'a> Waiting<'a> {
    fn new(buffer: &'a ReplayBuffer, entry: usize, may_wait: bool) -> Waiting<'a> {
        Waiting {
            buffer,
            lock: None,
            entry,
            may_wait,
            patience: Patience::new(),
            started: None,
            backoff: Backoff::new(),
            last: None,
            interrupted: false,
        }
    }

    /// Why the wait gave up.
    fn gave_up(&self) -> Error {
        if self.interrupted {
            return Error::Interrupted;
        }
        let (word, liveness) = self.last.unwrap_or((0, Liveness::Unknown));
        let owner = self.buffer.owner(slot::owner_of(word));
        let state = match liveness {
            Liveness::Alive => "alive but not finishing (stopped? traced?)",
            _ => "neither provably alive nor provably dead (another PID namespace, or /proc unreadable)",
        };
        Error::Contended(format!(
            "a slot of {} has been busy for {} s: its writer (pid {}) is {state}; shmreplay never \
             takes over the slot of a writer that may still be copying",
            self.buffer.name,
            WAIT_LIMIT.as_secs(),
            owner.pid()
        ))
    }
}

impl Contention for Waiting<'_> {
    fn busy(&mut self, word: u64) -> Busy {
        // Writes through an entry are serialised and this one is claiming: a busy word naming
        // our own entry is no write in progress (damage, or a dead former owner's slot).
        if slot::owner_of(word) == self.entry {
            return Busy::TakeOver;
        }
        let buffer = self.buffer;
        let lock = self.lock.get_or_insert_with(|| buffer.current_lock_file());
        match buffer.orphan(word, lock) {
            Orphan::Yes => return Busy::TakeOver,
            Orphan::No(liveness) => self.last = Some((word, liveness)),
        }
        if !self.may_wait {
            return Busy::GiveUp;
        }
        if self.patience.interrupted() {
            self.interrupted = true;
            return Busy::GiveUp;
        }
        if self.started.get_or_insert_with(Instant::now).elapsed() > WAIT_LIMIT {
            return Busy::GiveUp;
        }
        self.backoff.wait();
        Busy::Wait
    }

    fn settle(&mut self, word: u64) {
        self.buffer.entry(slot::owner_of(word)).settle(word);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::schema::{DType, Schema};
    use crate::layout::Sampler;
    use crate::platform::copy::cache_reach;
    use crate::platform::memory::{Input, Output};

    const ROW: usize = 16 << 10;

    /// A buffer of 16 KiB rows (stored with streaming stores by default): at least three fit
    /// in any cache reach, a few thousand fill the largest.
    fn buffer(sampler: Sampler) -> ReplayBuffer {
        let schema = Schema::new(&[("frame", DType::U8, vec![ROW])]).unwrap();
        let buffer = ReplayBuffer::builder(&crate::unique_name())
            .dir(std::env::temp_dir())
            .capacity(4)
            .schema(schema)
            .sampler(sampler)
            .create()
            .unwrap();
        buffer.unlink().unwrap();
        buffer
    }

    #[test]
    fn only_a_queue_stores_rows_for_reading_soon_and_only_within_the_cache_reach() {
        let queue = buffer(Sampler::Queue);
        let reach = (cache_reach() / queue.layout.slot_bytes) as u64;
        assert!(reach >= 3, "16 KiB rows fit in the reach");
        assert!(queue.read_soon(1) && queue.read_soon(reach));
        assert!(!queue.read_soon(reach + 1), "rows past the reach stream");
        // The reach counts from the head (the next row to deliver), not from the insert
        // cursor: rows inserted and not yet taken still count.
        let rows = vec![7u8; 2 * ROW];
        queue
            .extend_columns_with_priorities(&[Input::from_slice(&rows)], None, &mut NoBlocking)
            .unwrap();
        assert!(
            !queue.read_soon(reach + 1),
            "undelivered rows are still ahead"
        );
        let mut out = vec![0u8; 2 * ROW];
        let (mut index, mut key) = ([0u64; 2], [0u64; 2]);
        queue
            .sample_columns(
                &[Output::from_slice(&mut out)],
                &mut index,
                &mut key,
                &mut NoBlocking,
            )
            .unwrap();
        assert_eq!(out, rows);
        assert!(queue.read_soon(reach + 2) && !queue.read_soon(reach + 3));
        // A ring's rows are drawn at random, long after: its stores always stream.
        assert!(!buffer(Sampler::Uniform).read_soon(1));
    }
}
