//! Prioritized replay: priorities given with inserts, sampling in proportion to them, updates
//! from any process, and the repair of what a process killed mid-change left behind. The tree
//! itself, and why it needs no lock, is `protocol::priority`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::sampler::{Drawn, Records, Rows};
use super::{Blocking, NoBlocking, OutColumn, ReplayBuffer};
use crate::error::{Error, Result};
use crate::layout::{self, Prioritized, Sampler};
use crate::platform::liveness::Liveness;
use crate::platform::locks::LockKind;
use crate::platform::mapping::Segment;
use crate::protocol::handles::{self, Counter};
use crate::protocol::priority::{Leaf, Tree, TreeMemory};
use crate::protocol::slot;
use crate::sync::{AtomicU128, AtomicU64};

/// How often a handle looks for changes of the tree left half-done by dead processes.
const REPAIR_EVERY: Duration = Duration::from_millis(50);
/// After this many misses for one row, sampling suspects the tree itself (scribbled memory:
/// values where no record is) and makes it agree with the slots, once per call.
const MISSES_BEFORE_RESYNC: u64 = 1024;
/// How many rows ahead sampling prefetches slots.
const PREFETCH_AHEAD: usize = 16;
/// After this many misses for one row, a sampler checks for interrupts and its time bound.
const MISSES_BEFORE_CHECK: u64 = 32;
/// Draws of slots holding no item (an episode buffer's sequence sampler skips most steps)
/// before it makes sure some item exists, and checks for Ctrl-C and its time limit.
const SKIPS_BEFORE_CHECK: u64 = 1 << 12;
/// Skipped draws of one row after which a prioritized draw falls back to uniform draws.
const UNIFORM_AFTER_SKIPS: u64 = 4 * SKIPS_BEFORE_CHECK;
/// Skipped draws in its stratum after which a row of a stratified batch draws from the
/// whole tree.
const STRATUM_PATIENCE: u64 = 64;

/// The priority section of a segment, as a tree's memory.
#[derive(Clone, Copy)]
pub(crate) struct Section<'a> {
    segment: &'a Segment,
    base: usize,
}

impl TreeMemory for Section<'_> {
    fn words(&self, offset: usize, count: usize) -> &[AtomicU64] {
        self.segment.words(self.base + offset, count)
    }
    fn cell(&self, offset: usize) -> &AtomicU128 {
        self.segment.cell(self.base + offset)
    }
    fn prefetch(&self, offset: usize, len: usize) {
        self.segment.prefetch(self.base + offset, len)
    }
}

/// Where [`ReplayBuffer::sample_prioritized_columns`] writes what it knows about each row.
pub struct PriorityOutputs<'a> {
    /// `P(i)`: the row's share of the total priority when it was drawn.
    pub probability: &'a mut [f64],
    /// The importance weight `(v_i / v_min)^-beta`, at most 1.
    pub weight: &'a mut [f32],
    /// The row's raw priority `p`.
    pub priority: &'a mut [f64],
}

/// What a prioritized buffer reports beyond the counters.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PriorityStats {
    /// The sum of `v` over the records (exact, in the tree's fixed point).
    pub total: f64,
    /// The largest raw priority ever set (1.0 if none above it was).
    pub max_priority: f64,
}

/// The fixed-point values of the rows of one insert into a prioritized buffer.
pub(crate) enum RowPriorities {
    /// One `(q, raw bits)` for every row.
    All(u64, u64),
    Each(Vec<(u64, u64)>),
}

impl RowPriorities {
    fn of(&self, row: usize) -> (u64, u64) {
        match self {
            RowPriorities::All(q, raw) => (*q, *raw),
            RowPriorities::Each(each) => each[row],
        }
    }

    /// The largest raw priority among the rows from `first` on.
    fn largest(&self, first: usize) -> f64 {
        match self {
            RowPriorities::All(_, raw) => f64::from_bits(*raw),
            RowPriorities::Each(each) => each[first.min(each.len())..]
                .iter()
                .map(|&(_, raw)| f64::from_bits(raw))
                .fold(0.0, f64::max),
        }
    }
}

impl ReplayBuffer {
    /// How this buffer samples (fixed at creation).
    pub fn sampler(&self) -> Sampler {
        self.layout.sampler
    }

    /// The priority tree, if the buffer has one.
    pub(crate) fn tree(&self) -> Option<Tree<'_, Section<'_>>> {
        let (base, geometry) = self.layout.priority.as_ref()?;
        Some(Tree {
            geometry,
            memory: Section {
                segment: &self.segment,
                base: *base,
            },
        })
    }

    pub(crate) fn prioritized(&self, what: &str) -> Result<(Prioritized, Tree<'_, Section<'_>>)> {
        match (self.layout.sampler, self.tree()) {
            (Sampler::Prioritized(p), Some(tree)) => Ok((p, tree)),
            (sampler, _) => Err(Error::WrongSampler(format!(
                "{what} needs a prioritized buffer; {} is {} (create it with \
                 sampler=Prioritized(...))",
                self.name,
                match sampler {
                    Sampler::Queue => "a queue",
                    _ => "sampled uniformly",
                }
            ))),
        }
    }

    /// `(q, raw bits)` of raw priority `raw` (-0 is held as 0), or why it cannot be held.
    fn quantize(
        &self,
        p: Prioritized,
        tree: &Tree<'_, Section<'_>>,
        raw: f64,
    ) -> Result<(u64, u64)> {
        let scale = tree.geometry.scale;
        let bad = |why: String| Err(Error::InvalidArgument(why));
        if !(raw.is_finite() && raw >= 0.0) {
            return bad(format!("priorities must be finite and >= 0, got {raw}"));
        }
        let v = (raw + p.eps).powf(p.alpha);
        match scale.quantize(v) {
            Some(q) => Ok((q, (raw + 0.0).to_bits())),
            None => bad(format!(
                "priority {raw} gives (p + eps)^alpha = {v:e}, above the largest value this \
                 buffer holds ({:e})",
                scale.v_max()
            )),
        }
    }

    /// The fixed-point values of an insert's rows (`None` in a uniform buffer): `priorities`
    /// holds one raw priority for every row or one for all; `None` gives every row the largest
    /// raw priority ever set. Validated whole before anything is written.
    pub(crate) fn row_priorities(
        &self,
        priorities: Option<&[f64]>,
        rows: usize,
    ) -> Result<Option<RowPriorities>> {
        if self.layout.sampler.prioritized().is_none() && priorities.is_none() {
            return Ok(None);
        }
        let (p, tree) = self.prioritized("an insert with priorities")?;
        match priorities {
            None => {
                let (q, raw) = self.quantize(p, &tree, tree.max_raw())?;
                Ok(Some(RowPriorities::All(q, raw)))
            }
            Some([raw]) => {
                let (q, raw) = self.quantize(p, &tree, *raw)?;
                Ok(Some(RowPriorities::All(q, raw)))
            }
            Some(each) if each.len() == rows => {
                let values = each
                    .iter()
                    .map(|&raw| self.quantize(p, &tree, raw))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Some(RowPriorities::Each(values)))
            }
            Some(each) => Err(Error::InvalidArgument(format!(
                "{} priorities for {rows} rows (give one per row, or one for all)",
                each.len()
            ))),
        }
    }

    // ---- changes in flight, and their repair after a death ----

    /// This entry's process starts changing leaves (any thread: the count is shared).
    pub(crate) fn begin_tree_change(&self, entry: usize) {
        self.entry_word(entry, handles::E_TREE_CHANGES)
            .fetch_add(1, Ordering::SeqCst);
    }

    /// A change is done and its ancestors recomputed.
    pub(crate) fn end_tree_change(&self, entry: usize) {
        self.entry_word(entry, handles::E_TREE_CHANGES)
            .fetch_sub(1, Ordering::SeqCst);
    }

    /// Recomputes the tree if entry `e`'s dead process had a change in flight: every leaf of a
    /// slot it claimed and never committed is retagged to the claimed record with no value
    /// (whatever it held: the old record's value, the new one's, or an update that landed on
    /// the old tag meanwhile), then every node is recomputed. With `forget`, the count is reset
    /// (the caller holds the entry's lock, so no new owner is using it). Returns whether it
    /// repaired anything.
    pub(crate) fn repair_entry(&self, e: usize, forget: bool) -> bool {
        let Some(tree) = self.tree() else {
            return false;
        };
        let changes = self.entry_word(e, handles::E_TREE_CHANGES);
        if changes.load(Ordering::SeqCst) == 0 {
            return false;
        }
        let capacity = self.capacity();
        let scale = tree.geometry.scale;
        tree.repair(0, self.layout.capacity - 1, |index, _| {
            let word = self.seq(index).load(Ordering::Acquire);
            (slot::is_busy(word) && slot::names_a_ticket(word) && slot::owner_of(word) == e)
                .then(|| scale.tag(slot::ticket_of(word), capacity))
        });
        if forget {
            changes.store(0, Ordering::SeqCst);
        }
        true
    }

    /// Every `REPAIR_EVERY`, looks for entries whose process died with a change of the tree in
    /// flight and repairs it: ordinary calls do it, no special call is needed. The repair reads
    /// the whole tree, so it runs through `blocking` (outside the embedder's lock).
    pub(crate) fn repair_if_due(&self, blocking: &mut dyn Blocking) {
        if self.layout.priority.is_none() || !self.due(&self.repair_due, REPAIR_EVERY) {
            return;
        }
        let mine = self.registered_entry();
        let pending: Vec<usize> = (0..self.entries_used())
            .filter(|&e| Some(e) != mine)
            .filter(|&e| {
                self.entry_word(e, handles::E_TREE_CHANGES)
                    .load(Ordering::SeqCst)
                    != 0
            })
            .collect();
        if pending.is_empty() {
            return;
        }
        let lock = self.current_lock_file();
        blocking.block(&mut || {
            for &e in &pending {
                if self.entry_liveness(e, &lock) != Liveness::Dead {
                    continue;
                }
                // Holding the entry's lock keeps a new owner out while it is repaired and reset.
                if let Ok(true) = lock.try_lock(super::entry_lock(e), LockKind::Exclusive) {
                    self.repair_entry(e, true);
                    lock.unlock(super::entry_lock(e));
                    continue;
                }
                // Dead, but its lock is held through a description a forked child inherited:
                // nobody can reuse the entry, so repair without resetting, once per process
                // and owner (the repair is idempotent).
                let owner = self.owner(e).word;
                let mut repaired = self.repaired.lock().unwrap_or_else(|p| p.into_inner());
                if !repaired.contains(&(e, owner)) && self.repair_entry(e, false) {
                    repaired.push((e, owner));
                }
            }
        });
    }

    // ---- sampling ----

    /// Draws `index.len()` rows in proportion to their priorities (see the crate docs): like
    /// [`sample_columns`](Self::sample_columns), plus each row's probability, importance
    /// weight (`beta` in `[0, 1]`) and raw priority. When every record's priority is 0, draws
    /// uniformly (probability `1/len`, weight 1).
    pub fn sample_prioritized_columns(
        &self,
        out: &[OutColumn<'_>],
        index: &mut [u64],
        key: &mut [u64],
        info: PriorityOutputs<'_>,
        beta: f64,
        blocking: &mut dyn Blocking,
    ) -> Result<()> {
        self.prioritized("sampling by priority")?;
        self.refuse_episodes("sample")?;
        let n = index.len();
        for (name, len) in [
            ("key", key.len()),
            ("probability", info.probability.len()),
            ("weight", info.weight.len()),
            ("priority", info.priority.len()),
        ] {
            if len != n {
                return Err(Error::InvalidArgument(format!(
                    "{name} has {len} rows, index has {n}"
                )));
            }
        }
        if self.rows_in(out.iter().map(|o| o.len()), "output")? != n {
            return Err(Error::InvalidArgument(format!(
                "outputs do not hold {n} rows"
            )));
        }
        self.draw_prioritized(
            &mut Records { buffer: self, out },
            index,
            key,
            info,
            beta,
            blocking,
        )
    }

    /// The draws of [`sample_prioritized_columns`](Self::sample_prioritized_columns), each slot
    /// read by `rows`; the lengths checked, `beta` not yet.
    pub(super) fn draw_prioritized(
        &self,
        rows: &mut dyn Rows,
        index: &mut [u64],
        key: &mut [u64],
        info: PriorityOutputs<'_>,
        beta: f64,
        blocking: &mut dyn Blocking,
    ) -> Result<()> {
        let (params, tree) = self.prioritized("sampling by priority")?;
        let n = index.len();
        if !(0.0..=1.0).contains(&beta) {
            return Err(Error::InvalidArgument(format!(
                "beta must be between 0 and 1, got {beta}"
            )));
        }
        if n == 0 {
            return Ok(());
        }
        self.admit_sample(n as u64, blocking)?;
        self.repair_if_due(blocking);
        let total = tree.total();
        if total == 0 {
            return self.sample_all_zero(rows, index, key, info, &tree, blocking);
        }
        let entry = self.ensure_registered(blocking)?;
        let mut rng = self.rng_for_call();
        let capacity = self.capacity();
        let scale = tree.geometry.scale;
        let limited = !matches!(self.flow(), crate::layout::Flow::Free);
        // Row k of a stratified batch draws from its own k-th of [0, T): the first `T % n`
        // strata are one longer (integers only, no rounding to lose mass to).
        let (width, longer) = (total / n as u64, total % n as u64);
        let stratified = params.stratified && rows.stratifiable();
        // A row whose stratum keeps yielding no item (its mass on an episode buffer's steps
        // that cannot be read) draws from the whole tree instead, rather than skip there for
        // ever. (Misses, records being written or damaged, are the resync's business.)
        let mut target = |row: usize, total: u64, fruitless: u64| -> u64 {
            let stratum = row as u64;
            let size = width + u64::from(stratum < longer);
            if stratified && size > 0 && fruitless < STRATUM_PATIENCE {
                stratum * width + stratum.min(longer) + rng.below(size)
            } else {
                rng.below(total)
            }
        };
        // Every row's leaf first (all descents together, so their cache misses overlap), then
        // the copies, prefetching slots ahead (as `sample_columns`).
        let targets: Vec<u64> = (0..n).map(|row| target(row, total, 0)).collect();
        let mut drawn: Vec<Option<usize>> = vec![None; n];
        tree.descend_many(&targets, &mut drawn);
        for &index in drawn.iter().take(PREFETCH_AHEAD).flatten() {
            self.prefetch(index);
            tree.prefetch_leaf(index);
        }
        let mut retries = 0u64;
        let mut redraws = super::sampler::Redraws::new();
        let mut total_now = total;
        let mut resynced = false;
        let mut values = vec![0u64; n];
        let result = (|| {
            for row in 0..n {
                if let Some(&Some(ahead)) = drawn.get(row + PREFETCH_AHEAD) {
                    self.prefetch(ahead);
                    tree.prefetch_leaf(ahead);
                }
                let (mut misses, mut skips) = (0u64, 0u64);
                loop {
                    let read = drawn[row].map(|at| (at, rows.read(at, row)));
                    let missed = match read {
                        Some((at, Drawn::Item(ticket))) => {
                            // The leaf must still be this record's, and drawable.
                            let leaf = tree.leaf(at);
                            if leaf.tag == scale.tag(ticket, capacity) && leaf.q > 0 {
                                index[row] = at as u64;
                                key[row] = ticket;
                                values[row] = leaf.q;
                                info.priority[row] = leaf.raw_priority();
                                break;
                            }
                            true
                        }
                        Some((_, Drawn::Skip)) => false,
                        Some((_, Drawn::Gone(ticket))) => {
                            // It can never be drawn again: its mass goes, for every caller.
                            self.withdraw(&tree, entry, ticket);
                            total_now = tree.total();
                            if total_now == 0 {
                                return Ok(false);
                            }
                            false
                        }
                        None | Some((_, Drawn::Miss)) => true,
                    };
                    if missed {
                        misses += 1;
                        retries += 1;
                    } else {
                        skips += 1;
                        if skips % SKIPS_BEFORE_CHECK == 0 {
                            // Drawn by priority, yet none holds an item (an episode buffer
                            // whose sequence starts all have priority 0, say): is there any
                            // item at all? If there is, draw uniformly, as when every
                            // priority is 0 (a limited sample waits there for one).
                            if !limited && !rows.any(capacity) {
                                return Err(Error::Empty);
                            }
                            if limited || skips >= UNIFORM_AFTER_SKIPS {
                                return Ok(false);
                            }
                            redraws.pause(misses + skips)?;
                        }
                    }
                    if missed && misses % MISSES_BEFORE_CHECK == 0 {
                        // A writer that died holding a drawn slot: its repair drops the slot.
                        self.repair_if_due(&mut NoBlocking);
                        if misses >= MISSES_BEFORE_RESYNC && !resynced {
                            self.resync_tree(&tree);
                            resynced = true;
                        }
                        total_now = tree.total();
                        if total_now == 0 {
                            return Ok(false); // nothing drawable by priority any more
                        }
                        redraws.pause(misses)?;
                    }
                    drawn[row] = tree.descend(target(row, total_now, skips));
                }
            }
            Ok(true)
        })();
        self.count(entry, Counter::Retries, retries);
        if !result? {
            return self.sample_all_zero(rows, index, key, info, &tree, blocking);
        }
        // The global minimum, or the batch's if the root is momentarily behind: weights ≤ 1.
        let batch_min = values.iter().copied().min().unwrap_or(1);
        let v_min = match tree.minimum() {
            0 => batch_min,
            m => m.min(batch_min),
        } as f64;
        // The total the call last read: the one it started with unless a resync changed it.
        let (total, beta) = (total_now as f64, -beta as f32);
        let rows = values
            .iter()
            .zip(info.probability.iter_mut().zip(info.weight.iter_mut()));
        for (&q, (probability, weight)) in rows {
            let q = q as f64;
            *probability = q / total;
            // In f32, the weights' own precision: twice as fast as in f64.
            *weight = ((q / v_min) as f32).powf(beta);
        }
        self.count(entry, Counter::Samples, n as u64);
        Ok(())
    }

    /// Sets the leaf of record `ticket` to 0 (if it is still that record's): an item that can
    /// never be drawn again (an episode buffer's step whose frames were overwritten).
    fn withdraw(&self, tree: &Tree<'_, Section<'_>>, entry: usize, ticket: u64) {
        let capacity = self.capacity();
        let index = (ticket % capacity) as usize;
        self.begin_tree_change(entry);
        if tree.update(index, tree.geometry.scale.tag(ticket, capacity), 0, 0) {
            tree.propagate([index], false);
        }
        self.end_tree_change(entry);
    }

    /// Makes every leaf agree with its slot (a leaf counting a record its slot does not hold
    /// is zeroed) and every node with the leaves: for a tree whose draws keep missing, which
    /// only scribbled shared memory causes. Safe while others write and update.
    fn resync_tree(&self, tree: &Tree<'_, Section<'_>>) {
        let capacity = self.capacity();
        let scale = tree.geometry.scale;
        tree.repair(0, self.layout.capacity - 1, |index, leaf| {
            let word = self.seq(index).load(Ordering::Acquire);
            if slot::is_busy(word) {
                return None; // being written; a dead writer's range is its own repair's
            }
            if !slot::names_a_ticket(word) {
                return Some(leaf.tag); // no record at all
            }
            let tag = scale.tag(slot::ticket_of(word), capacity);
            (tag != leaf.tag).then_some(tag)
        });
    }

    /// Every priority is 0: uniform draws, probability `1/len`, weight 1.
    fn sample_all_zero(
        &self,
        rows: &mut dyn Rows,
        index: &mut [u64],
        key: &mut [u64],
        info: PriorityOutputs<'_>,
        tree: &Tree<'_, Section<'_>>,
        blocking: &mut dyn Blocking,
    ) -> Result<()> {
        self.draw_uniform_rows(rows, index, key, blocking)?;
        let size = self.len().max(1) as f64;
        let scale = tree.geometry.scale;
        for row in 0..index.len() {
            let leaf = tree.leaf(index[row] as usize);
            let own = leaf.tag == scale.tag(key[row], self.capacity());
            info.priority[row] = if own { leaf.raw_priority() } else { 0.0 };
            info.probability[row] = 1.0 / size;
            info.weight[row] = 1.0;
        }
        Ok(())
    }

    // ---- updates ----

    /// Sets the raw priorities of the records `keys` (as sampling returned them) to
    /// `priorities`, from any process. A key whose slot has been overwritten since is ignored
    /// and counted as a stale update; of duplicate keys the last wins. Everything is validated
    /// first: on an error nothing is applied. Returns how many distinct keys were applied.
    pub fn update_priorities(
        &self,
        keys: &[u64],
        priorities: &[f64],
        blocking: &mut dyn Blocking,
    ) -> Result<usize> {
        self.set_priorities(keys, priorities, true, blocking)
    }

    /// [`update_priorities`](Self::update_priorities), counting the stale keys in the stats
    /// only if `count_stale` (not for an episode writer's own, whose slots may be gone).
    pub(crate) fn set_priorities(
        &self,
        keys: &[u64],
        priorities: &[f64],
        count_stale: bool,
        blocking: &mut dyn Blocking,
    ) -> Result<usize> {
        let (params, tree) = self.prioritized("update_priorities")?;
        if keys.len() != priorities.len() {
            return Err(Error::InvalidArgument(format!(
                "{} keys but {} priorities",
                keys.len(),
                priorities.len()
            )));
        }
        let capacity = self.capacity();
        // (slot, key, order, q, raw): sorted by slot, ancestors are shared and memory is walked
        // in order; among duplicate keys (adjacent then) the last given comes first and wins.
        let mut updates = keys
            .iter()
            .zip(priorities)
            .enumerate()
            .map(|(order, (&key, &raw))| {
                let (q, raw) = self.quantize(params, &tree, raw)?;
                Ok((key % capacity, key, std::cmp::Reverse(order), q, raw))
            })
            .collect::<Result<Vec<_>>>()?;
        if updates.is_empty() {
            return Ok(0);
        }
        self.repair_if_due(blocking);
        let entry = self.ensure_registered(blocking)?;
        updates.sort_unstable_by_key(|&(slot, key, order, ..)| (slot, key, order));
        updates.dedup_by_key(|u| u.1);
        // Keys from before this lap horizon might share their lap tag with the record now in
        // their slot (tags are the lap modulo 2^24 or more): stale, without looking. Keys at or
        // past the cursor were never issued.
        let cursor = self
            .word(self.control(layout::C_CURSOR))
            .load(Ordering::Acquire);
        let scale = tree.geometry.scale;
        let oldest = scale.oldest_distinguishable(cursor, capacity);
        self.begin_tree_change(entry);
        let mut changed = Vec::with_capacity(updates.len());
        let mut largest = 0.0f64;
        for (i, &(index, key, _, q, raw)) in updates.iter().enumerate() {
            // The leaves a few keys ahead are random memory: start loading them.
            if let Some(&(ahead, ..)) = updates.get(i + PREFETCH_AHEAD) {
                tree.prefetch_update(ahead as usize);
            }
            // The leaf's tag decides: a writer retags the leaf as soon as it claims the slot, so
            // a key whose record is being or has been overwritten no longer matches. (The
            // slot's version word is not read: it is one more cache miss per key.)
            let index = index as usize;
            if (oldest..cursor).contains(&key)
                && tree.update(index, scale.tag(key, capacity), q, raw)
            {
                changed.push(index);
                largest = largest.max(f64::from_bits(raw));
            }
        }
        tree.propagate(changed.iter().copied(), false);
        self.end_tree_change(entry);
        tree.raise_max_raw(largest);
        if count_stale {
            self.count(
                entry,
                Counter::StaleUpdates,
                (updates.len() - changed.len()) as u64,
            );
        }
        Ok(changed.len())
    }

    /// The raw priorities of the records `keys` into `out`; NaN for a key whose slot has been
    /// overwritten since (or that never was a record of this buffer).
    pub fn priorities(&self, keys: &[u64], out: &mut [f64]) -> Result<()> {
        let (_, tree) = self.prioritized("priorities")?;
        if keys.len() != out.len() {
            return Err(Error::InvalidArgument(format!(
                "{} keys but room for {} priorities",
                keys.len(),
                out.len()
            )));
        }
        let capacity = self.capacity();
        let scale = tree.geometry.scale;
        for (&key, p) in keys.iter().zip(out.iter_mut()) {
            let index = (key % capacity) as usize;
            let holds_key =
                slot::read_begin(self.seq(index)).is_some_and(|word| slot::ticket_of(word) == key);
            let leaf = tree.leaf(index);
            *p = if holds_key && leaf.tag == scale.tag(key, capacity) {
                leaf.raw_priority()
            } else {
                f64::NAN
            };
        }
        Ok(())
    }

    /// The priority total and maximum, for prioritized buffers.
    pub fn priority_stats(&self) -> Option<PriorityStats> {
        let tree = self.tree()?;
        Some(PriorityStats {
            total: tree.geometry.scale.value(tree.total()),
            max_priority: tree.max_raw(),
        })
    }

    /// `(largest v, smallest positive v)` the tree holds (None for a uniform buffer).
    pub fn priority_range(&self) -> Option<(f64, f64)> {
        let scale = self.tree()?.geometry.scale;
        Some((scale.v_max(), scale.resolution()))
    }

    /// Whether every node of the tree matches its leaves (meaningful when nothing is in flight);
    /// `None` for a uniform buffer. For tests and checks.
    #[doc(hidden)]
    pub fn priority_tree_is_exact(&self) -> Option<bool> {
        self.tree().map(|t| t.is_consistent())
    }
}

/// What the writer of a prioritized buffer does to its slots' leaves.
pub(crate) struct LeafWriter<'a> {
    tree: Tree<'a, Section<'a>>,
    capacity: u64,
    priorities: RowPriorities,
}

impl<'a> LeafWriter<'a> {
    pub(crate) fn new(buffer: &'a ReplayBuffer, priorities: RowPriorities) -> LeafWriter<'a> {
        LeafWriter {
            tree: buffer
                .tree()
                .expect("row priorities exist only in prioritized buffers"),
            capacity: buffer.capacity(),
            priorities,
        }
    }

    /// The slot was claimed for `ticket`: its old record's value is gone.
    pub(crate) fn claimed(&self, index: usize, ticket: u64) {
        self.tree
            .retag(index, self.tree.geometry.scale.tag(ticket, self.capacity));
    }

    /// Row `row`, the record of `ticket`, is written, about to be committed: its value goes in.
    pub(crate) fn written(&self, index: usize, ticket: u64, row: usize) {
        let tag = self.tree.geometry.scale.tag(ticket, self.capacity);
        let (q, raw) = self.priorities.of(row);
        self.tree.store(index, Leaf { tag, q, raw });
    }

    /// The insert wrote rows from row `first` on (the rows before it, overwritten by the same
    /// call, were never written): the largest raw priority ever set takes theirs into account.
    pub(crate) fn inserted(&self, first: usize) {
        self.tree.raise_max_raw(self.priorities.largest(first));
    }

    /// The leaves `first..first + count` (wrapping) changed: recompute their ancestors.
    pub(crate) fn propagate(&self, first: usize, count: usize) {
        let capacity = self.capacity as usize;
        let end = first + count;
        if count >= capacity {
            self.tree.propagate(0..capacity, false);
        } else if end <= capacity {
            self.tree.propagate(first..end, false);
        } else {
            self.tree
                .propagate((0..end - capacity).chain(first..capacity), false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::schema::{DType, Schema};
    use crate::platform::memory::{Input, Output};
    use std::time::Instant;

    fn buffer(capacity: u64) -> ReplayBuffer {
        let schema = Schema::new(&[("x", DType::U64, vec![])]).unwrap();
        let sampler = Sampler::Prioritized(Prioritized {
            alpha: 1.0,
            eps: 0.0,
            stratified: true,
        });
        let name = crate::unique_name();
        ReplayBuffer::builder(&name)
            .dir(std::env::temp_dir())
            .capacity(capacity)
            .schema(schema)
            .sampler(sampler)
            .create()
            .unwrap()
    }

    fn fill(buffer: &ReplayBuffer, priorities: &[f64]) {
        let rows: Vec<u8> = (0..priorities.len() as u64)
            .flat_map(|x| x.to_le_bytes())
            .collect();
        buffer
            .extend_columns_with_priorities(
                &[Input::from_slice(&rows)],
                Some(priorities),
                &mut NoBlocking,
            )
            .unwrap();
    }

    /// Draws `n` rows; returns their `x` values.
    fn draw(buffer: &ReplayBuffer, n: usize) -> Result<Vec<u64>> {
        let mut x = vec![0u8; 8 * n];
        let (mut index, mut key) = (vec![0; n], vec![0; n]);
        let (mut p, mut w, mut raw) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        let info = PriorityOutputs {
            probability: &mut p,
            weight: &mut w,
            priority: &mut raw,
        };
        buffer.sample_prioritized_columns(
            &[Output::from_slice(&mut x)],
            &mut index,
            &mut key,
            info,
            0.4,
            &mut NoBlocking,
        )?;
        Ok(x.chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect())
    }

    /// Level 0 scribbled to zeros under intact nodes: every descent dead-ends. Sampling notices,
    /// makes the tree agree with its leaves and slots, and answers at once, not after a 10 s
    /// wait.
    #[test]
    fn a_scribbled_tree_is_resynced_by_sampling() {
        let buffer = buffer(1000);
        fill(&buffer, &vec![1.0; 1000]);
        let tree = buffer.tree().unwrap();
        let values = tree.geometry.values_range();
        for word in tree.memory.words(values.start, values.len() / 8) {
            word.store(0, Ordering::Relaxed);
        }
        let started = Instant::now();
        assert_eq!(draw(&buffer, 64).unwrap().len(), 64);
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(buffer.priority_tree_is_exact(), Some(true));
        buffer.unlink().unwrap();
    }

    /// Leaves counting records their slots do not hold (scribbled): dropped by the resync; with
    /// nothing left drawable by priority, sampling is uniform over the records.
    #[test]
    fn leaves_without_records_are_dropped_by_the_resync() {
        let buffer = buffer(100);
        fill(&buffer, &[0.0; 10]);
        let tree = buffer.tree().unwrap();
        // Values on leaves of slots that were never written.
        for index in 50..60 {
            tree.store(
                index,
                Leaf {
                    tag: 1,
                    q: 1 << 20,
                    raw: 1.0f64.to_bits(),
                },
            );
        }
        tree.propagate(50..60, false);
        assert!(tree.total() > 0);
        let x = draw(&buffer, 32).unwrap();
        assert!(x.iter().all(|&x| x < 10), "{x:?}");
        assert_eq!(tree.total(), 0);
        buffer.unlink().unwrap();
    }
}
