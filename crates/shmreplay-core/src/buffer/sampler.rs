//! Reading records: uniform batches over the committed slots, and single slots by index.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Backoff, Blocking, NoBlocking, Orphan, OutColumn, ReplayBuffer, WAIT_LIMIT};
use crate::error::{Error, Result};
use crate::layout::{self, Flow, STAGED_RECORD_BYTES};
use crate::platform::interrupt::Patience;
use crate::protocol::handles::Counter;
use crate::protocol::slot;

/// How many rows ahead `sample_into` prefetches.
const PREFETCH_AHEAD: usize = 16;
/// After this many misses in a row, a sampler asks whether any slot holds a record at all.
const MISSES_BEFORE_SIZE_CHECK: u64 = 32;
/// After this many misses for one row, it checks by looking at every slot (a multiple of the
/// above).
const MISSES_BEFORE_SCAN: u64 = 4096;
/// Skipped slots (holding nothing of what is sampled) count as a miss this many at a time.
const SKIPS_PER_MISS: u64 = 16;
/// How long an admitted sample sleeps between rounds of draws that find no item.
const ITEM_WAIT: Duration = Duration::from_millis(2);

impl ReplayBuffer {
    /// Draws `index.len()` records uniformly with replacement from the slots holding a committed
    /// record into `out` (`out[i]` takes the rows of schema field `i`, row after row), writing
    /// each row's slot into `index` and insert ticket into `key`. Torn or in-progress slots are
    /// redrawn; slots of dead writers read as empty. [`Error::Empty`] if no slot holds a record.
    pub fn sample_into(
        &self,
        out: &mut [&mut [u8]],
        index: &mut [u64],
        key: &mut [u64],
    ) -> Result<()> {
        let out: Vec<OutColumn<'_>> = out.iter_mut().map(|o| OutColumn::from_slice(o)).collect();
        self.sample_columns(&out, index, key, &mut NoBlocking)
    }

    /// [`sample_into`](Self::sample_into) into raw output columns.
    pub fn sample_columns(
        &self,
        out: &[OutColumn<'_>],
        index: &mut [u64],
        key: &mut [u64],
        blocking: &mut dyn Blocking,
    ) -> Result<()> {
        let n = index.len();
        if key.len() != n {
            return Err(Error::InvalidArgument(format!(
                "key has {} rows, index has {n}",
                key.len()
            )));
        }
        if self.rows_in(out.iter().map(|o| o.len()), "output")? != n {
            return Err(Error::InvalidArgument(format!(
                "outputs do not hold {n} rows"
            )));
        }
        self.refuse_episodes("sample")?;
        if n == 0 {
            return Ok(());
        }
        match self.flow() {
            Flow::Queue(_) => return self.take_from_queue(out, index, key, blocking),
            Flow::Limited(_) => self.admit_sample(n as u64, blocking)?,
            Flow::Free => {}
        }
        self.draw_uniform(out, index, key, blocking)
    }

    /// The uniform draws of [`sample_columns`](Self::sample_columns), its arguments checked
    /// and its flow control passed (also the fallback of a prioritized buffer whose every
    /// priority is 0).
    pub(super) fn draw_uniform(
        &self,
        out: &[OutColumn<'_>],
        index: &mut [u64],
        key: &mut [u64],
        blocking: &mut dyn Blocking,
    ) -> Result<()> {
        self.draw_uniform_rows(&mut Records { buffer: self, out }, index, key, blocking)
    }

    /// Uniform draws of slots, each read by `rows` (a record, or an episode buffer's item),
    /// redrawing slots that hold nothing `rows` can read.
    pub(super) fn draw_uniform_rows(
        &self,
        rows: &mut dyn Rows,
        index: &mut [u64],
        key: &mut [u64],
        blocking: &mut dyn Blocking,
    ) -> Result<()> {
        let n = index.len();
        // Slots past the cursor were never claimed. Read once per call (writers hammer that
        // cache line), and again after a miss while the ring is still filling.
        let claimed_slots = || {
            self.word(self.control(layout::C_CURSOR))
                .load(Ordering::Relaxed)
                .min(self.capacity())
        };
        let mut claimed = claimed_slots();
        if claimed == 0 {
            return Err(Error::Empty);
        }
        let entry = self.ensure_registered(blocking)?;
        let limited = !matches!(self.flow(), Flow::Free);
        let mut rng = self.rng_for_call();
        let mut retries = 0u64;
        let mut redraws = Redraws::new();
        // Every slot is drawn first, and the one `PREFETCH_AHEAD` rows ahead is prefetched
        // while a row is copied: random rows miss the cache, and this keeps several misses in
        // flight instead of waiting for one at a time (1M control slots, `cargo bench ... sample`:
        // 143 us per 256 rows without prefetching, 29 us with it).
        for slot_index in index.iter_mut() {
            *slot_index = rng.below(claimed);
        }
        for &slot_index in index.iter().take(PREFETCH_AHEAD) {
            self.prefetch(slot_index as usize);
        }
        let result = (|| {
            for row in 0..n {
                if let Some(&ahead) = index.get(row + PREFETCH_AHEAD) {
                    self.prefetch(ahead as usize);
                }
                let mut slot_index = index[row] as usize;
                // A miss costs `SKIPS_PER_MISS` units of effort, a skip one.
                let (mut misses, mut effort, mut scanned) = (0u64, 0u64, false);
                let mut next_check = MISSES_BEFORE_SIZE_CHECK * SKIPS_PER_MISS;
                key[row] = loop {
                    match rows.read(slot_index, row) {
                        Drawn::Item(ticket) => break ticket,
                        Drawn::Miss => {
                            retries += 1;
                            misses += 1;
                            effort += SKIPS_PER_MISS;
                        }
                        Drawn::Skip | Drawn::Gone(_) => effort += 1,
                    }
                    if claimed < self.capacity() {
                        claimed = claimed_slots();
                    }
                    slot_index = rng.below(claimed) as usize;
                    if effort >= next_check {
                        next_check += MISSES_BEFORE_SIZE_CHECK * SKIPS_PER_MISS;
                        // Most slots drawn hold nothing: is there anything to draw at all?
                        // The size says so cheaply; once, after many misses, a scan makes sure
                        // (the size words live in shared memory and may have been damaged).
                        // (A rate limiter admitted this sample: its rows are being written,
                        // so it redraws until they are, within the bound, rather than fail.)
                        let scan = !scanned && effort >= MISSES_BEFORE_SCAN * SKIPS_PER_MISS;
                        scanned |= scan;
                        if !limited && (self.is_empty() || (scan && !rows.any(claimed))) {
                            return Err(Error::Empty);
                        }
                        if limited && self.holds_episodes() {
                            // Admitted, but no step's window may be complete yet: wait for
                            // the writers as flow control waits (the caller's timeout).
                            redraws.wait(blocking.timeout(), || self.is_shut_down())?;
                        } else {
                            redraws.pause(misses)?;
                        }
                    }
                };
                index[row] = slot_index as u64;
            }
            Ok(())
        })();
        self.count(entry, Counter::Retries, retries);
        if result.is_ok() {
            self.count(entry, Counter::Samples, n as u64);
        }
        result
    }

    /// Copies slot `index` into `out` (`out[i]` holds one value of field `i`), returning its
    /// ticket, or `None` if the slot holds no record: never written, or its writer died while
    /// writing it (the next insert into the slot recovers it). Waits (briefly, bounded) for a
    /// writer that may be alive.
    pub fn read(&self, index: u64, out: &mut [&mut [u8]]) -> Result<Option<u64>> {
        let out: Vec<OutColumn<'_>> = out.iter_mut().map(|o| OutColumn::from_slice(o)).collect();
        self.read_columns(index, &out, &mut NoBlocking)
    }

    /// [`read`](Self::read) into raw output columns.
    pub fn read_columns(
        &self,
        index: u64,
        out: &[OutColumn<'_>],
        blocking: &mut dyn Blocking,
    ) -> Result<Option<u64>> {
        if index >= self.capacity() {
            return Err(Error::IndexOutOfRange {
                index,
                capacity: self.capacity(),
            });
        }
        if self.rows_in(out.iter().map(|o| o.len()), "output")? != 1 {
            return Err(Error::InvalidArgument(
                "read takes outputs of exactly one row".into(),
            ));
        }
        let lock = self.locks(blocking)?;
        let index = index as usize;
        let mut result = None;
        blocking.block(&mut || {
            let started = Instant::now();
            let mut patience = Patience::new();
            let mut backoff = Backoff::new();
            result = Some(loop {
                let word = self.seq(index).load(Ordering::Acquire);
                if !slot::names_a_ticket(word) {
                    break Ok(None);
                }
                if let Some(ticket) = self.try_read(index, out, 0) {
                    break Ok(Some(ticket));
                }
                // Busy: a writer proved gone will never finish (if the slot still holds its word).
                if slot::is_busy(word)
                    && self.orphan(word, &lock) == Orphan::Yes
                    && self.seq(index).load(Ordering::Acquire) == word
                {
                    break Ok(None);
                }
                if started.elapsed() > WAIT_LIMIT {
                    break Err(Error::Contended(format!(
                        "slot {index} stayed busy for {} s, its writer alive or not provably dead",
                        WAIT_LIMIT.as_secs()
                    )));
                }
                if patience.interrupted() {
                    break Err(Error::Interrupted);
                }
                backoff.wait();
            });
        });
        result.expect("block runs its closure")
    }

    /// True if any of the first `claimed` slots holds a committed record right now.
    fn any_readable(&self, claimed: u64) -> bool {
        (0..claimed as usize).any(|i| slot::read_begin(self.seq(i)).is_some())
    }

    /// One seqlock read of slot `index` into row `row` of `out`: its ticket, if consistent.
    pub(super) fn try_read(&self, index: usize, out: &[OutColumn<'_>], row: usize) -> Option<u64> {
        let seq = self.seq(index);
        let begun = slot::read_begin(seq)?;
        let record = self.record_offset(index);
        let fields = self.schema.fields();
        if self.layout.staged() {
            // Small records: one copy of the whole record, then split into fields once valid.
            let mut staged = [0u8; STAGED_RECORD_BYTES];
            let staged = &mut staged[..self.layout.record_bytes];
            self.segment
                .load_bytes(record, staged, self.copy.record.load);
            if !slot::read_validate(seq, begun) {
                return None;
            }
            for (field, dst) in fields.iter().zip(out) {
                dst.write(
                    row * field.bytes,
                    &staged[field.offset..field.offset + field.bytes],
                );
            }
            return Some(slot::ticket_of(begun));
        }
        for ((field, dst), kernels) in fields.iter().zip(out).zip(&self.copy.fields) {
            let kernel = kernels.load;
            self.segment.load_to(
                record + field.offset,
                dst,
                row * field.bytes,
                field.bytes,
                kernel,
            );
        }
        slot::read_validate(seq, begun).then(|| slot::ticket_of(begun))
    }
}

/// What a sampler makes of a slot it drew.
pub(super) enum Drawn {
    /// An item, copied into its row: its key.
    Item(u64),
    /// The slot changed or was being written while it was read: drawn again (a retry).
    Miss,
    /// The slot holds nothing of what is sampled (an episode's first frame, a step whose
    /// window is not complete): drawn again, not counted as a retry.
    Skip,
    /// Like `Skip`, for good: the record `ticket` in the slot is an item that can never be
    /// read (an episode's step whose frames were overwritten). A prioritized sampler drops
    /// its priority.
    Gone(u64),
}

/// How a sampler reads the slots it draws: whole records, or an episode buffer's items.
pub(super) trait Rows {
    /// Reads the item at slot `index` into row `row` of the outputs.
    fn read(&mut self, index: usize, row: usize) -> Drawn;
    /// Whether any of the first `claimed` slots holds an item right now (asked after many
    /// fruitless draws, to tell an empty buffer from an unlucky one).
    fn any(&mut self, claimed: u64) -> bool;
    /// Whether a stratified prioritized draw suits these items (not when most draws are
    /// skipped: a stratum could hold none that is read).
    fn stratifiable(&self) -> bool {
        true
    }
}

/// Whole records of a ring.
pub(super) struct Records<'a> {
    pub buffer: &'a ReplayBuffer,
    pub out: &'a [OutColumn<'a>],
}

impl Rows for Records<'_> {
    fn read(&mut self, index: usize, row: usize) -> Drawn {
        match self.buffer.try_read(index, self.out, row) {
            Some(ticket) => Drawn::Item(ticket),
            None => Drawn::Miss,
        }
    }

    fn any(&mut self, claimed: u64) -> bool {
        self.buffer.any_readable(claimed)
    }
}

/// The patience of a sampler redrawing slots that were busy: asked every few dozen misses, it
/// yields the CPU, answers the interrupt check, and gives up after [`WAIT_LIMIT`].
pub(super) struct Redraws {
    patience: Patience,
    started: Option<Instant>,
}

impl Redraws {
    pub(super) fn new() -> Redraws {
        Redraws {
            patience: Patience::new(),
            started: None,
        }
    }

    /// Sleeps a little while an admitted sample finds no item yet (an episode buffer's
    /// windows are not complete): go on, or why not (Ctrl-C, shut down, `timeout` run out).
    pub(super) fn wait(
        &mut self,
        timeout: Option<Duration>,
        shut_down: impl Fn() -> bool,
    ) -> Result<()> {
        std::thread::sleep(ITEM_WAIT);
        if self.patience.interrupted() {
            return Err(Error::Interrupted);
        }
        if shut_down() {
            return Err(Error::Shutdown);
        }
        let waited = self.started.get_or_insert_with(Instant::now).elapsed();
        if timeout.is_some_and(|t| waited >= t) {
            return Err(Error::Timeout(format!(
                "sample: no complete item to draw after {:.3} s (admitted by the limiter, and \
                 counted in its samples)",
                waited.as_secs_f64()
            )));
        }
        Ok(())
    }

    /// After `misses` misses for one row: go on, or why not.
    pub(super) fn pause(&mut self, misses: u64) -> Result<()> {
        std::thread::yield_now();
        if self.patience.interrupted() {
            return Err(Error::Interrupted);
        }
        if self.started.get_or_insert_with(Instant::now).elapsed() > WAIT_LIMIT {
            return Err(Error::Contended(format!(
                "sample: no consistent row after {misses} draws in {} s: every slot drawn was \
                 being written; use a larger capacity",
                WAIT_LIMIT.as_secs()
            )));
        }
        Ok(())
    }
}
