//! Flow control: rate limiters and the queue, on the counters and futex words of the control
//! section (see `protocol::flow` for the formulas and the wait/wake handshake).
//!
//! * A rate-limited ring admits an insert of `k` rows by moving the insert cursor `I` by `k` at
//!   once (the call takes all its tickets together), and a sample of `n` rows by moving `S` by
//!   `n`, each with a compare-and-swap of the value its check read. A sample reads `I` as the
//!   tickets whose inserts are done with them (`C_COMMITTED`), so it never waits for rows still
//!   being written. `D = max(0, I − capacity)`.
//! * A queue is Reverb's `Queue(capacity)`: `S = D` = its head, the tickets delivered (or
//!   skipped). An insert is admitted while `I + k − head ≤ capacity`, so no row is overwritten
//!   before it is delivered. A sample checks from the version words alone that the `n` rows at
//!   the head are written, copies them (validating each with its seqlock), then moves the head
//!   past them with one compare-and-swap: the rows are delivered exactly once, to the consumer
//!   whose swap succeeded; a consumer that loses the race, or dies before its swap, takes
//!   nothing. A consumer that sees another one copying the head (`C_TAKING`, a hint) copies the
//!   rows after those instead, and swaps once the head reaches them.
//! * A queue ticket whose writer died is skipped once its death is proved: the writer's entry
//!   announces the first ticket of its insert (`E_QUEUE_CLAIM`) before taking its tickets, and
//!   clears it after its last commit, so a consumer waits for an unwritten ticket while some
//!   live entry's claim is at or before it, and skips it when none is (at once, when it is at
//!   the head: skipping delivers nothing).
//! * Waits sleep on a futex word (inserts on one, samples on the other) in slices of
//!   [`SLICE`], asking the interrupt check after each; `shutdown` sets a flag and wakes everyone.
//!   Each entry holds its process's share of the waiter counts, which whoever finds the
//!   process dead takes off.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Blocking, OutColumn, ReplayBuffer};
use crate::error::{Error, Result};
use crate::layout::{self, Flow, Limiter};
use crate::platform::futex;
use crate::platform::interrupt::Patience;
use crate::platform::liveness::Liveness;
use crate::platform::locks::LockFile;
use crate::protocol::flow::{Counts, Event, Limits};
use crate::protocol::handles::{self, Counter};
use crate::protocol::slot;

/// The longest a waiting call sleeps before it checks for Ctrl-C, its deadline and shutdown.
const SLICE: Duration = Duration::from_millis(10);
/// How long a queue consumer that copied the rows after another consumer's waits for that one
/// to deliver (a copy of a batch takes well under this), before it starts again at the head.
const HANDOVER_WAIT: Duration = Duration::from_millis(5);
/// How often a waiting call, or a call that finds waiters to wake, looks for waiters that
/// died waiting (their share of the counts would make every call wake nobody).
const FORGET_DEAD_WAITERS_EVERY: Duration = Duration::from_secs(1);

/// Which side of the limiter a call is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Insert,
    Sample,
}

impl Side {
    /// One waiter of this side in an entry's `E_WAITERS` word.
    fn unit(self) -> u64 {
        match self {
            Side::Insert => 1,
            Side::Sample => 1 << 32,
        }
    }
}

impl ReplayBuffer {
    /// How this buffer's calls wait (fixed at creation).
    pub fn flow(&self) -> Flow {
        self.layout.flow()
    }

    /// The rate limiter, if any (a queue's flow control is its sampler's).
    pub fn limiter(&self) -> Option<Limiter> {
        self.layout.limiter
    }

    /// The flow-control counters right now (`I`, `S`, `D`).
    pub fn flow_counts(&self) -> Counts {
        let load = |word| self.word(self.control(word)).load(Ordering::SeqCst);
        let inserts = load(layout::C_CURSOR);
        match self.flow() {
            Flow::Queue(_) => {
                let head = load(layout::C_HEAD);
                Counts {
                    inserts,
                    samples: head,
                    deletes: head,
                }
            }
            Flow::Free | Flow::Limited(_) => Counts {
                inserts,
                samples: load(layout::C_SAMPLED),
                deletes: inserts.saturating_sub(self.capacity()),
            },
        }
    }

    /// The counters a sample is admitted against: those of [`flow_counts`](Self::flow_counts),
    /// but in a rate-limited ring `I` counts only the tickets whose inserts are done with them
    /// (committed, or overwritten before they were written), so that an admitted sample never
    /// waits for rows still being written (or never to be, their writer dead).
    fn sample_counts(&self) -> Counts {
        let counts = self.flow_counts();
        match self.flow() {
            Flow::Limited(_) => {
                let inserts = self
                    .word(self.control(layout::C_COMMITTED))
                    .load(Ordering::SeqCst);
                Counts {
                    inserts,
                    deletes: inserts.saturating_sub(self.capacity()),
                    ..counts
                }
            }
            Flow::Free | Flow::Queue(_) => counts,
        }
    }

    /// Whether `sample(n)` would proceed now without waiting (with no flow control: whether
    /// the buffer holds a record).
    pub fn can_sample(&self, n: u64) -> bool {
        match self.flow() {
            Flow::Free => n == 0 || !self.is_empty(),
            Flow::Limited(l) | Flow::Queue(l) => l.can_sample(self.sample_counts(), n),
        }
    }

    /// Whether an insert of `k` rows would proceed now without waiting.
    pub fn can_insert(&self, k: u64) -> bool {
        match self.flow() {
            Flow::Free => true,
            Flow::Limited(l) | Flow::Queue(l) => l.can_insert(self.flow_counts(), k),
        }
    }

    /// Every call that waits for flow control, in every process, fails with
    /// [`Error::Shutdown`], and so does every later call that cannot proceed at once. Calls
    /// that need not wait still succeed (a consumer can drain a queue). Permanent.
    pub fn shutdown(&self) {
        self.word(self.control(layout::C_SHUTDOWN))
            .store(1, Ordering::SeqCst);
        for side in [Side::Insert, Side::Sample] {
            let event = self.event(side);
            event.sequence.fetch_add(1, Ordering::SeqCst);
            futex::wake_all(event.sequence);
        }
    }

    /// True once [`shutdown`](Self::shutdown) was called (by any process).
    pub fn is_shut_down(&self) -> bool {
        self.word(self.control(layout::C_SHUTDOWN))
            .load(Ordering::SeqCst)
            != 0
    }

    /// The futex word a call of `side` waits on: inserts wait for samples, samples for inserts.
    fn event(&self, side: Side) -> Event<'_> {
        let at = self.control(match side {
            Side::Insert => layout::C_INSERT_EVENT,
            Side::Sample => layout::C_SAMPLE_EVENT,
        });
        Event {
            sequence: self.segment.word32(at),
            waiters: self.segment.word32(at + 4),
        }
    }

    /// Wakes the calls of `side` waiting for a change (only if any is registered).
    fn wake(&self, side: Side) {
        let event = self.event(side);
        if event.notify() {
            futex::wake_all(event.sequence);
            self.forget_dead_waiters_if_due();
        }
    }

    /// Takes the share of the waiter counts of every entry whose process died waiting off the
    /// counts; at most once per [`FORGET_DEAD_WAITERS_EVERY`] per handle.
    fn forget_dead_waiters_if_due(&self) {
        if !self.due(&self.waiters_check_due, FORGET_DEAD_WAITERS_EVERY) {
            return;
        }
        let lock = self.current_lock_file();
        for e in 0..self.entries_used() {
            if self
                .entry_word(e, handles::E_WAITERS)
                .load(Ordering::SeqCst)
                != 0
                && self.entry_liveness(e, &lock) == Liveness::Dead
            {
                self.forget_waiters_of(e);
            }
        }
    }

    /// Takes entry `e`'s share off the waiter counts (its process is dead, or it is being
    /// reclaimed).
    pub(super) fn forget_waiters_of(&self, e: usize) {
        let share = self
            .entry_word(e, handles::E_WAITERS)
            .swap(0, Ordering::SeqCst);
        for side in [Side::Insert, Side::Sample] {
            let n = ((share / side.unit()) & u64::from(u32::MAX)) as u32;
            if n > 0 {
                let _ = self.event(side).waiters.fetch_update(
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                    |w| Some(w.saturating_sub(n)),
                );
            }
        }
    }

    /// Inserts of `k` rows: refuses sizes that could never be admitted.
    fn check_insert_size(&self, k: u64) -> Result<()> {
        match self.flow() {
            Flow::Free => Ok(()),
            Flow::Queue(_) if k > self.capacity() => Err(Error::InvalidArgument(format!(
                "an insert of {k} rows into a queue of capacity {} could never be admitted \
                 (rows are not overwritten before they are delivered)",
                self.capacity()
            ))),
            Flow::Limited(l) if k as f64 * l.samples_per_insert > l.window() => {
                Err(Error::InvalidArgument(format!(
                    "an insert of {k} rows moves I·samples_per_insert by {}, more than the \
                     limiter's window max_diff − min_diff = {}: it could wait forever; insert \
                     smaller batches",
                    k as f64 * l.samples_per_insert,
                    l.window()
                )))
            }
            _ => Ok(()),
        }
    }

    /// Samples of `n` rows: refuses sizes that could never be admitted (acme#233).
    pub(super) fn check_sample_size(&self, n: u64) -> Result<()> {
        match self.flow() {
            Flow::Free => Ok(()),
            Flow::Queue(_) if n > self.capacity() => Err(Error::InvalidArgument(format!(
                "sample({n}) from a queue of capacity {} could never be admitted",
                self.capacity()
            ))),
            Flow::Limited(l) if n as f64 > l.window() => Err(Error::InvalidArgument(format!(
                "sample({n}) is larger than the limiter's window max_diff − min_diff = {}: it \
                 could never be admitted; sample smaller batches",
                l.window()
            ))),
            _ => Ok(()),
        }
    }

    /// Admits an insert of `k` rows through entry `entry` (whose handle the caller holds):
    /// with flow control, waits until the limiter allows it and takes all `k` tickets at once,
    /// returning the first; without, returns `None` (the insert takes its tickets itself, as
    /// it goes).
    pub(super) fn admit_insert(
        &self,
        k: u64,
        entry: usize,
        blocking: &mut dyn Blocking,
    ) -> Result<Option<u64>> {
        let limits = match self.flow() {
            Flow::Free => return Ok(None),
            Flow::Limited(l) | Flow::Queue(l) => l,
        };
        self.check_insert_size(k)?;
        let claim = matches!(self.flow(), Flow::Queue(_))
            .then(|| self.entry_word(entry, handles::E_QUEUE_CLAIM));
        let cursor = self.word(self.control(layout::C_CURSOR));
        let admitted = self.wait_for(Side::Insert, blocking, &limits, k, || loop {
            let counts = self.flow_counts();
            if !limits.can_insert(counts, k) {
                return Ok(None);
            }
            let first = counts.inserts;
            let end = first
                .checked_add(k)
                .filter(|&end| end <= slot::MAX_TICKET)
                .ok_or_else(|| {
                    Error::InvalidArgument("the insert counter of this buffer is exhausted".into())
                })?;
            // Announced before the tickets are taken: a consumer that finds one of them
            // unwritten waits for us while we live.
            if let Some(claim) = claim {
                claim.store(first + 1, Ordering::SeqCst);
            }
            if cursor
                .compare_exchange(first, end, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                return Ok(Some(first));
            }
        });
        if admitted.is_err() {
            if let Some(claim) = claim {
                claim.store(0, Ordering::SeqCst);
            }
        }
        admitted.map(Some)
    }

    /// After an insert that is done with `committed` tickets (their rows committed, or
    /// overwritten before they were written): counts them for a limiter's samples, clears the
    /// queue claim, and wakes the samples waiting for rows.
    pub(super) fn inserted_rows(&self, entry: usize, committed: u64) {
        match self.flow() {
            Flow::Free => return,
            Flow::Limited(_) => {
                self.word(self.control(layout::C_COMMITTED))
                    .fetch_add(committed, Ordering::SeqCst);
            }
            Flow::Queue(_) => self
                .entry_word(entry, handles::E_QUEUE_CLAIM)
                .store(0, Ordering::SeqCst),
        }
        self.wake(Side::Sample);
    }

    /// Admits a sample of `n` rows from a rate-limited ring (moves `S` by `n`); no-op without
    /// a limiter.
    pub(super) fn admit_sample(&self, n: u64, blocking: &mut dyn Blocking) -> Result<()> {
        let Flow::Limited(limits) = self.flow() else {
            return Ok(());
        };
        self.check_sample_size(n)?;
        let sampled = self.word(self.control(layout::C_SAMPLED));
        self.wait_for(Side::Sample, blocking, &limits, n, || loop {
            let counts = self.sample_counts();
            if !limits.can_sample(counts, n) {
                return Ok(None);
            }
            if sampled
                .compare_exchange(
                    counts.samples,
                    counts.samples.wrapping_add(n),
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                )
                .is_ok()
            {
                return Ok(Some(()));
            }
        })?;
        self.wake(Side::Insert);
        Ok(())
    }

    /// Takes the `n = index.len()` rows at the head of a queue into `out` (their slots into
    /// `index`, their tickets into `key`), waiting until `n` rows are there.
    pub(super) fn take_from_queue(
        &self,
        out: &[OutColumn<'_>],
        index: &mut [u64],
        key: &mut [u64],
        blocking: &mut dyn Blocking,
    ) -> Result<()> {
        let Flow::Queue(limits) = self.flow() else {
            unreachable!("only queues are taken from");
        };
        let n = index.len() as u64;
        self.check_sample_size(n)?;
        let entry = self.ensure_registered(blocking)?;
        let lock = self.current_lock_file();
        self.wait_for(Side::Sample, blocking, &limits, n, || {
            Ok(self.try_take(out, index, key, &lock))
        })?;
        self.count(entry, Counter::Samples, n);
        self.wake(Side::Insert);
        Ok(())
    }

    /// One attempt at taking the rows at the head: `None` if they are not all there yet.
    ///
    /// First the tickets at the head whose writer died are skipped for good (that delivers
    /// nothing, so no consumer need take them: dead tickets never hold room in the ring while
    /// the rows behind them are too few for a take). Then the version words alone say whether
    /// `n` rows are ready (written, or skipped as dead) before anything is copied; the rows are
    /// copied and validated, and the head moved past them with one compare-and-swap.
    fn try_take(
        &self,
        out: &[OutColumn<'_>],
        index: &mut [u64],
        key: &mut [u64],
        lock: &LockFile,
    ) -> Option<()> {
        let head_word = self.word(self.control(layout::C_HEAD));
        let taking = self.word(self.control(layout::C_TAKING));
        let cursor = self.word(self.control(layout::C_CURSOR));
        let capacity = self.capacity();
        let n = index.len();
        let mut taken = Vec::with_capacity(n);
        'attempt: loop {
            let head = head_word.load(Ordering::SeqCst);
            let end = cursor.load(Ordering::SeqCst);
            let mut tickets = Tickets::new(self, lock, head);
            if head < end && tickets.state(head) == Ready::Abandoned {
                if head_word
                    .compare_exchange(head, head + 1, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    self.wake(Side::Insert);
                }
                continue 'attempt;
            }
            // The n rows from `from` on that are ready, and the ticket after them.
            let mut ready = |from: u64, taken: &mut Vec<u64>| -> Plan {
                taken.clear();
                let mut ticket = from;
                while taken.len() < n {
                    if ticket >= end {
                        return Plan::NotYet; // skipped tickets left too few rows
                    }
                    match tickets.state(ticket) {
                        Ready::Written => taken.push(ticket),
                        Ready::Abandoned => {}
                        Ready::Moved => return Plan::Moved,
                        Ready::Pending => return Plan::NotYet,
                    }
                    ticket += 1;
                }
                Plan::Until(ticket)
            };
            // Another consumer is copying the rows at the head (a hint, nothing more): copy
            // the rows after them meanwhile, to deliver once it has, instead of the same rows.
            let mut start = head;
            if taking.load(Ordering::SeqCst) == head + 1 {
                match ready(head, &mut taken) {
                    Plan::Moved => continue 'attempt,
                    Plan::Until(after) if after < end => start = after,
                    _ => {}
                }
            }
            let stop = match ready(start, &mut taken) {
                Plan::Moved => continue 'attempt,
                Plan::Until(stop) => stop,
                Plan::NotYet if start == head => return None,
                // Not enough rows after the other consumer's: take the head's ourselves.
                Plan::NotYet => match ready(head, &mut taken) {
                    Plan::Moved => continue 'attempt,
                    Plan::Until(stop) => {
                        start = head;
                        stop
                    }
                    Plan::NotYet => return None,
                },
            };
            taking.store(start + 1, Ordering::SeqCst);
            for (row, &t) in taken.iter().enumerate() {
                let slot_index = (t % capacity) as usize;
                if self.try_read(slot_index, out, row) != Some(t) {
                    continue 'attempt; // overwritten: the head moved on meanwhile
                }
                index[row] = slot_index as u64;
                key[row] = t;
            }
            if start != head && !self.head_reaches(start, head) {
                continue 'attempt; // the consumer before us did not deliver up to our rows
            }
            if head_word
                .compare_exchange(start, stop, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                return Some(());
            }
        }
    }

    /// Waits briefly (about as long as another consumer's copy takes) for the head to move
    /// from `from` to `to`; false if it went elsewhere or did not move in time.
    fn head_reaches(&self, to: u64, from: u64) -> bool {
        let head_word = self.word(self.control(layout::C_HEAD));
        let started = Instant::now();
        let mut spins = 0u32;
        loop {
            match head_word.load(Ordering::SeqCst) {
                h if h == to => return true,
                h if h != from => return false,
                _ if started.elapsed() > HANDOVER_WAIT => return false,
                _ => {}
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// The lowest first ticket claimed by a queue producer whose process may be alive
    /// (`u64::MAX`: none).
    fn live_queue_claims_from(&self, lock: &LockFile) -> u64 {
        (0..self.entries_used())
            .filter_map(|e| {
                let claim = self
                    .entry_word(e, handles::E_QUEUE_CLAIM)
                    .load(Ordering::SeqCst);
                (claim != 0 && self.entry_liveness(e, lock) != Liveness::Dead).then(|| claim - 1)
            })
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Runs `attempt` until it admits the call (`Some`), sleeping on the futex of `side`
    /// between tries: up to the timeout of `blocking` ([`Error::Timeout`]), until Ctrl-C
    /// ([`Error::Interrupted`]) or shutdown ([`Error::Shutdown`]). Counts the time waited.
    fn wait_for<T: Send>(
        &self,
        side: Side,
        blocking: &mut dyn Blocking,
        limits: &Limits,
        size: u64,
        mut attempt: impl FnMut() -> Result<Option<T>> + Send,
    ) -> Result<T> {
        if let Some(admitted) = attempt()? {
            return Ok(admitted);
        }
        let timeout = blocking.timeout();
        let started = Instant::now();
        let event = self.event(side);
        // This entry's share of the count: taken off by whoever finds us dead.
        let entry = self.ensure_registered(blocking)?;
        let share = self.entry_word(entry, handles::E_WAITERS);
        let mut outcome = None;
        blocking.block(&mut || {
            outcome = Some(loop {
                if self.is_shut_down() {
                    break Err(Error::Shutdown);
                }
                share.fetch_add(side.unit(), Ordering::SeqCst);
                let sequence = event.register();
                let admitted = attempt();
                let now = Instant::now();
                let left = timeout.map(|t| t.saturating_sub(now - started));
                match admitted {
                    Ok(None) if !self.is_shut_down() && left != Some(Duration::ZERO) => {
                        futex::wait(event.sequence, sequence, left.unwrap_or(SLICE).min(SLICE));
                    }
                    _ => {}
                }
                event.unregister();
                // Only what we added (a reclaimer may have zeroed the word meanwhile).
                let _ = share.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                    Some(if (w / side.unit()) & u64::from(u32::MAX) > 0 {
                        w - side.unit()
                    } else {
                        w
                    })
                });
                self.forget_dead_waiters_if_due();
                match admitted {
                    Ok(Some(admitted)) => break Ok(admitted),
                    Err(e) => break Err(e),
                    Ok(None) => {}
                }
                if self.is_shut_down() {
                    break Err(Error::Shutdown);
                }
                if left == Some(Duration::ZERO) {
                    break Err(self.timed_out(side, limits, size, timeout.unwrap_or_default()));
                }
                if Patience::interrupted_now() {
                    break Err(Error::Interrupted);
                }
            });
        });
        let counter = match side {
            Side::Insert => Counter::InsertWaitNs,
            Side::Sample => Counter::SampleWaitNs,
        };
        self.count(entry, counter, started.elapsed().as_nanos() as u64);
        outcome.expect("block runs its closure")
    }

    /// The timeout error of a call of `side` for `size` rows, with the limiter's state.
    fn timed_out(&self, side: Side, l: &Limits, size: u64, timeout: Duration) -> Error {
        let c = match side {
            Side::Insert => self.flow_counts(),
            Side::Sample => self.sample_counts(),
        };
        let call = match side {
            Side::Insert => format!("an insert of {size} rows"),
            Side::Sample => format!("sample({size})"),
        };
        Error::Timeout(format!(
            "{call} was not allowed within {:.3} s: size {}, inserts I = {}, sampled S = {}, \
             deleted D = {}, samples_per_insert {}, min_size {}, min_diff {}, max_diff {}",
            timeout.as_secs_f64(),
            c.size(),
            c.inserts,
            c.samples,
            c.deletes,
            l.samples_per_insert,
            l.min_size,
            l.min_diff,
            l.max_diff
        ))
    }
}

/// Where a queue ticket stands, for a consumer at head `head`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ready {
    /// Its record is committed.
    Written,
    /// No process will ever write it: skipped.
    Abandoned,
    /// Its writer may still write it: wait.
    Pending,
    /// The head moved since it was read: start again.
    Moved,
}

/// What a consumer found from a ticket on.
enum Plan {
    /// The rows it wants are ready: they end before this ticket.
    Until(u64),
    /// Some are not written yet.
    NotYet,
    /// The head moved: start again.
    Moved,
}

/// One attempt's view of the tickets after the head: the lowest first ticket any live
/// producer has claimed is looked up once, the first time a ticket is not written.
struct Tickets<'a> {
    buffer: &'a ReplayBuffer,
    lock: &'a LockFile,
    head: u64,
    live_claims_from: Option<u64>,
}

impl<'a> Tickets<'a> {
    fn new(buffer: &'a ReplayBuffer, lock: &'a LockFile, head: u64) -> Tickets<'a> {
        Tickets {
            buffer,
            lock,
            head,
            live_claims_from: None,
        }
    }

    fn state(&mut self, ticket: u64) -> Ready {
        let b = self.buffer;
        let seq = b.seq((ticket % b.capacity()) as usize);
        let word = seq.load(Ordering::SeqCst);
        let named = slot::names_a_ticket(word).then(|| slot::ticket_of(word));
        if named == Some(ticket) && !slot::is_busy(word) {
            return Ready::Written;
        }
        if named.is_some_and(|t| t > ticket) {
            // No producer gets a lap ahead of the head: unless the head moved, the word is
            // damage, and the ticket's record is gone.
            return if b.word(b.control(layout::C_HEAD)).load(Ordering::SeqCst) != self.head {
                Ready::Moved
            } else {
                Ready::Abandoned
            };
        }
        // Tickets below the first claimed by a live producer belong to producers that are done
        // (committed, or gave up) or dead. A producer commits before it clears its claim, so
        // the slot is read again after the claims.
        let live_claims_from = *self
            .live_claims_from
            .get_or_insert_with(|| b.live_queue_claims_from(self.lock));
        let word = seq.load(Ordering::SeqCst);
        let named = slot::names_a_ticket(word).then(|| slot::ticket_of(word));
        match (named == Some(ticket), slot::is_busy(word)) {
            (true, false) => Ready::Written,
            (true, true) if b.orphan(word, self.lock) == super::Orphan::No(Liveness::Alive) => {
                Ready::Pending
            }
            _ if ticket >= live_claims_from => Ready::Pending,
            (true, true) if b.orphan(word, self.lock) != super::Orphan::Yes => Ready::Pending,
            _ => Ready::Abandoned,
        }
    }
}
