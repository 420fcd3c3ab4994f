//! The priority tree: a 16-ary sum tree of integers in the segment, updated by any number of
//! processes with no lock, whose sums are exact and repair themselves.
//!
//! **Values.** An item's priority `v = (p + eps)^alpha` is held in fixed point: the integer
//! `q = round(v · 2^f)` (at least 1 if `v > 0`), `q < 2^b`. [`Scale`] picks `b` and `f` from the
//! capacity so that `capacity · 2^b ≤ 2^62`: no sum can overflow, and the largest `v` is about
//! 2^20 at any capacity. Integer sums are exact: no drift, ever, and no rebuild (Reverb rebuilds
//! its float tree when drift exceeds 1e-4).
//!
//! **Leaves.** Slot `i`'s leaf is one 128-bit cell: `tag << b | q` and the raw priority `p` as
//! given (`f64` bits), changed only by 128-bit compare-and-swap or store, so `q` and `p` always
//! agree. The tag is the lap of the slot's insert ticket (`ticket / capacity + 1`, modulo
//! `2^(64-b)`, at least 2^24): a writer retags the leaf when it claims the slot, and an update
//! CASes the leaf only if it still carries its key's tag, so an update can never land on a newer
//! record. (Keys from 2^24 laps back or more, whose tag a newer record could share, are refused
//! before the CAS: `Scale::oldest_distinguishable`.)
//!
//! **Nodes.** Level 0 is a compact copy of every leaf's `q` (16 siblings in two cache lines, for
//! the descent). Each internal node holds two words: the sum of its children and the smallest
//! positive value below it (0: none), for the importance weights' global minimum. Level 0 and the
//! nodes are only ever *recomputed* from what is below them, never incremented: `Tree::settle`
//! reads the children, stores sum and minimum where they differ, and reads the children again
//! until what it stored matches them. Whoever changes a child recomputes its parent, and whoever
//! stores a node recomputes that node's parent. Why a node ends right once everyone is done: take
//! the last store to it; its storer read the children *after* that store and found them
//! matching; any later change of a child would have been followed by its changer's recompute
//! and store of this node, contradicting "last". (The node's storer stores, then loads the
//! children; the child's changer stores, then loads the node: the store-buffering pattern, where
//! each must see the other's store or be seen. A `SeqCst` fence between the stores and the loads
//! after them guarantees that, even for relaxed stores, which is what the nodes get: a `SeqCst`
//! store is a locked instruction on x86 that waits for every load before it, so a batch's cache
//! misses could not overlap. One fence serves a whole batch of nodes of one level; loom finds
//! the lost update when it is taken out.) A recompute that finds its node already right stops climbing:
//! whoever stored that value climbs.
//!
//! Recomputing is idempotent, which is what makes dead processes harmless: a process killed
//! between changing leaves and finishing the climb leaves some ancestors behind; the range of
//! leaves it was changing is recorded in its handle entry, and whoever finds it dead recomputes
//! every ancestor of that range ([`Tree::repair`]), concurrently with live updates, with no
//! "exactly once" to get right. (Increments with `fetch_add`, faster by a little, would need
//! the dead process's progress recorded atomically with each add.)
//!
//! **Sampling** descends from the root, choosing the child whose cumulative range holds the
//! target (a whole batch level by level, prefetching each row's next node). A node may be momentarily ahead of or behind its children; the descent then wraps the
//! target into the children's actual total, and never enters a child whose sum is 0: an item
//! with `q = 0` is never drawn.
//!
//! Model-checked with loom (`make loom`): see the tests at the bottom.

use crate::sync::{fence, AtomicU128, AtomicU64, Ordering};

/// Children per node: 16 words, two cache lines. 2 under loom, to keep the models small.
pub const FANOUT: usize = if cfg!(loom) { 2 } else { 16 };
/// Bits of `q` above the binary point: `v` up to about 2^20 at any capacity.
const V_BITS: u32 = 20;
/// At most this many bits of `q` (more would leave the tag too few).
const MAX_Q_BITS: u32 = 40;
/// Sums stay below 2^62.
const SUM_BITS: u32 = 62;
/// Bytes of the section's head (the largest raw priority, on a cache line pair of its own).
const HEAD_BYTES: usize = 128;
/// The head word holding the largest raw priority ever set (`f64` bits; starts at 1.0).
pub const MAX_RAW: usize = 0;
const LEAF_BYTES: usize = 16;

/// The fixed point of one buffer (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scale {
    /// `b`: bits of `q`.
    pub q_bits: u32,
    /// `f`: bits of `q` below the binary point.
    pub fraction_bits: u32,
}

impl Scale {
    pub fn for_capacity(capacity: usize) -> Scale {
        let log2 = usize::BITS - capacity.max(1).saturating_sub(1).leading_zeros();
        let q_bits = MAX_Q_BITS.min(SUM_BITS.saturating_sub(log2)).max(V_BITS);
        Scale {
            q_bits,
            fraction_bits: q_bits - V_BITS,
        }
    }

    pub fn q_max(&self) -> u64 {
        (1 << self.q_bits) - 1
    }

    /// The largest `v` that can be held.
    pub fn v_max(&self) -> f64 {
        self.q_max() as f64 / self.one()
    }

    /// The smallest positive `v` that can be told apart (`2^-f`).
    pub fn resolution(&self) -> f64 {
        1.0 / self.one()
    }

    fn one(&self) -> f64 {
        (1u64 << self.fraction_bits) as f64
    }

    /// `v` in fixed point, or `None` if it is negative, not finite, or beyond [`Self::v_max`].
    /// A positive `v` below the resolution becomes 1, not 0: it stays drawable.
    pub fn quantize(&self, v: f64) -> Option<u64> {
        if !(v.is_finite() && v >= 0.0) {
            return None;
        }
        // Rounded half up by adding 0.5 and truncating (exact: `v · 2^f` is at most about 2^40
        // here); `f64::round` is a call into libm on baseline x86-64.
        let q = v * self.one() + 0.5;
        if q >= (1u64 << self.q_bits) as f64 {
            return None;
        }
        Some(if v > 0.0 { (q as u64).max(1) } else { 0 })
    }

    /// The value a fixed-point number stands for.
    pub fn value(&self, q: u64) -> f64 {
        q as f64 / self.one()
    }

    fn tag_mask(&self) -> u64 {
        u64::MAX >> self.q_bits
    }

    /// The tag of the record of `ticket` in a ring of `capacity` slots: its lap, plus one
    /// (modulo `2^(64 - b)`).
    pub fn tag(&self, ticket: u64, capacity: u64) -> u64 {
        (ticket / capacity + 1) & self.tag_mask()
    }

    /// The oldest key whose tag no later record of its slot can share, with the insert cursor
    /// at `cursor`: keys from `2^(64 - b) - 1` laps before it or older could match a newer
    /// record's tag, so updates treat them as stale without looking.
    pub fn oldest_distinguishable(&self, cursor: u64, capacity: u64) -> u64 {
        cursor.saturating_sub(capacity.saturating_mul(self.tag_mask()))
    }
}

/// A leaf: the tag of the record it belongs to, its fixed-point value and its raw priority.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    pub tag: u64,
    pub q: u64,
    /// `p` as `f64` bits.
    pub raw: u64,
}

impl Leaf {
    pub fn raw_priority(&self) -> f64 {
        f64::from_bits(self.raw)
    }

    fn encode(&self, scale: Scale) -> u128 {
        let low = self.tag << scale.q_bits | (self.q & scale.q_max());
        u128::from(self.raw) << 64 | u128::from(low)
    }

    fn decode(cell: u128, scale: Scale) -> Leaf {
        let low = cell as u64;
        Leaf {
            tag: low >> scale.q_bits,
            q: low & scale.q_max(),
            raw: (cell >> 64) as u64,
        }
    }
}

/// One level of internal nodes: where its sums and minima are (offsets in the section).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Level {
    pub nodes: usize,
    sums: usize,
    mins: usize,
}

/// Where everything of a tree over `capacity` leaves is, relative to the start of its section:
/// the head; the leaves (16 bytes each); level 0, a compact copy of every leaf's `q` (8 bytes
/// each: the descent reads 16 siblings from two cache lines instead of four); then each level
/// of nodes up to the root (one word of sums and one of minima per node). Every array is padded
/// to whole nodes of 16.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub capacity: usize,
    pub scale: Scale,
    leaves: usize,
    values: usize,
    /// Level 1 (the parents of level 0) first, the root's level last.
    levels: Vec<Level>,
    pub bytes: usize,
}

impl Geometry {
    pub fn new(capacity: usize) -> Geometry {
        let whole = |n: usize| n.div_ceil(FANOUT) * FANOUT;
        let leaves = HEAD_BYTES;
        let values = leaves + whole(capacity) * LEAF_BYTES;
        let mut at = values + whole(capacity) * 8;
        let mut levels = Vec::new();
        let mut below = capacity;
        loop {
            let nodes = below.div_ceil(FANOUT);
            let words = whole(nodes) * 8;
            levels.push(Level {
                nodes,
                sums: at,
                mins: at + words,
            });
            at += 2 * words;
            below = nodes;
            if nodes <= 1 {
                break;
            }
        }
        Geometry {
            capacity,
            scale: Scale::for_capacity(capacity),
            leaves,
            values,
            levels,
            bytes: at,
        }
    }

    /// Levels of internal nodes (the root's is the last).
    pub fn depth(&self) -> usize {
        self.levels.len()
    }

    /// The bytes of level 0 (for tests that scribble it).
    #[cfg(test)]
    pub fn values_range(&self) -> std::ops::Range<usize> {
        self.values..self.values + self.capacity.div_ceil(FANOUT) * FANOUT * 8
    }

    fn leaf_offset(&self, index: usize) -> usize {
        self.leaves + index * LEAF_BYTES
    }

    /// Where the sums of the children of node `node` of level `level` start (level 0's values
    /// for level 1).
    fn children_offset(&self, level: usize, node: usize) -> usize {
        let first = node * FANOUT * 8;
        if level == 1 {
            self.values + first
        } else {
            self.levels[level - 2].sums + first
        }
    }
}

/// The memory a tree lives in: the segment, or plain atomics in the models.
pub trait TreeMemory {
    /// The 8-byte words at byte `offset` of the section and the `count - 1` after it.
    fn words(&self, offset: usize, count: usize) -> &[AtomicU64];
    /// The 16-byte cell at byte `offset` of the section.
    fn cell(&self, offset: usize) -> &AtomicU128;
    /// A hint that the `len` bytes at `offset` will be read soon.
    fn prefetch(&self, _offset: usize, _len: usize) {}

    fn word(&self, offset: usize) -> &AtomicU64 {
        &self.words(offset, 1)[0]
    }
}

impl<T: TreeMemory> TreeMemory for &T {
    fn words(&self, offset: usize, count: usize) -> &[AtomicU64] {
        (**self).words(offset, count)
    }
    fn cell(&self, offset: usize) -> &AtomicU128 {
        (**self).cell(offset)
    }
    fn prefetch(&self, offset: usize, len: usize) {
        (**self).prefetch(offset, len)
    }
}

/// A tree over some memory.
pub struct Tree<'a, M: TreeMemory> {
    pub geometry: &'a Geometry,
    pub memory: M,
}

impl<M: TreeMemory> Tree<'_, M> {
    fn scale(&self) -> Scale {
        self.geometry.scale
    }

    pub fn leaf(&self, index: usize) -> Leaf {
        let cell = self.memory.cell(self.geometry.leaf_offset(index));
        Leaf::decode(cell.load(Ordering::SeqCst), self.scale())
    }

    /// Starts loading leaf `index`.
    pub fn prefetch_leaf(&self, index: usize) {
        self.memory
            .prefetch(self.geometry.leaf_offset(index), LEAF_BYTES);
    }

    /// Starts loading what changing leaf `index` reads: the leaf, and its 16 siblings' values
    /// in level 0 (its own copy, and what its parent is recomputed from).
    pub fn prefetch_update(&self, index: usize) {
        self.prefetch_leaf(index);
        self.memory
            .prefetch(self.geometry.children_offset(1, index / FANOUT), FANOUT * 8);
    }

    /// The sum over every leaf, as the root says.
    pub fn total(&self) -> u64 {
        let top = self.geometry.levels[self.geometry.depth() - 1];
        self.memory.word(top.sums).load(Ordering::SeqCst)
    }

    /// The smallest positive leaf value, as the root says (0: none).
    pub fn minimum(&self) -> u64 {
        let top = self.geometry.levels[self.geometry.depth() - 1];
        self.memory.word(top.mins).load(Ordering::SeqCst)
    }

    /// The largest raw priority ever set (1.0 until one above it is).
    pub fn max_raw(&self) -> f64 {
        match self.memory.word(MAX_RAW).load(Ordering::SeqCst) {
            0 => 1.0, // never raised (a new section is zero)
            bits => f64::from_bits(bits),
        }
    }

    /// Raises the largest raw priority to `p` (finite, ≥ 0: their bits order as the values).
    pub fn raise_max_raw(&self, p: f64) {
        if p > 1.0 {
            self.memory
                .word(MAX_RAW)
                .fetch_max(p.to_bits(), Ordering::SeqCst);
        }
    }

    /// A writer claimed the slot for the record of `tag`: the old record's value leaves the
    /// tree's leaves at once, and no update for the old record can land any more.
    pub fn retag(&self, index: usize, tag: u64) {
        self.store(index, Leaf { tag, q: 0, raw: 0 });
    }

    /// Sets the leaf of a slot being written (the writer's own: nobody else changes it).
    pub fn store(&self, index: usize, leaf: Leaf) {
        let cell = self.memory.cell(self.geometry.leaf_offset(index));
        cell.store(leaf.encode(self.scale()), Ordering::SeqCst);
    }

    /// Sets leaf `index` to `q`/`raw` if it still belongs to the record of `tag`; false (and
    /// nothing changed) if that record has been replaced.
    pub fn update(&self, index: usize, tag: u64, q: u64, raw: u64) -> bool {
        let cell = self.memory.cell(self.geometry.leaf_offset(index));
        let new = Leaf { tag, q, raw }.encode(self.scale());
        let mut current = cell.load(Ordering::SeqCst);
        loop {
            if Leaf::decode(current, self.scale()).tag != tag {
                return false;
            }
            match cell.compare_exchange(current, new, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return true,
                Err(now) => current = now,
            }
        }
    }

    /// The sums of node `node` of level `level`'s children, and how many of them exist (the
    /// last node of a level has fewer: the words after them are padding, whose values, 0 unless
    /// scribbled, are never used, so scribbled padding can lead nowhere).
    fn children(&self, level: usize, node: usize) -> (&[AtomicU64], usize) {
        let below = match level {
            1 => self.geometry.capacity,
            _ => self.geometry.levels[level - 2].nodes,
        };
        let words = self
            .memory
            .words(self.geometry.children_offset(level, node), FANOUT);
        (words, below.saturating_sub(node * FANOUT).min(FANOUT))
    }

    /// `(sum, smallest positive)` of node `node` of level `level`'s children.
    fn summary(&self, level: usize, node: usize) -> (u64, u64) {
        let (sums, count) = self.children(level, node);
        let minima = if level == 1 {
            sums
        } else {
            let below = self.geometry.levels[level - 2];
            self.memory.words(below.mins + node * FANOUT * 8, FANOUT)
        };
        // Loaded into plain arrays first (atomic loads are never vectorised), every one of
        // the FANOUT words with the absent children counted as 0: fixed-length loops with no
        // branch, which the compiler vectorises.
        let mut sum_of = [0u64; FANOUT];
        let mut min_of = [0u64; FANOUT];
        for k in 0..FANOUT {
            let present = k < count;
            sum_of[k] = if present {
                sums[k].load(Ordering::SeqCst)
            } else {
                0
            };
            min_of[k] = if present {
                minima[k].load(Ordering::SeqCst)
            } else {
                0
            };
        }
        (wrapping_sum(&sum_of), positive_min(&min_of))
    }

    /// What level 0's copy of leaf `index` should hold, and the word holding it.
    fn value_of(&self, index: usize) -> ([u64; 2], [&AtomicU64; 1]) {
        let value = self.memory.word(self.geometry.values + index * 8);
        ([self.leaf(index).q, 0], [value])
    }

    /// What node `node` of level `level` should hold (its children's sum and smallest positive
    /// value), and its two words.
    fn node_of(&self, level: usize, node: usize) -> ([u64; 2], [&AtomicU64; 2]) {
        let l = self.geometry.levels[level - 1];
        let words = [
            self.memory.word(l.sums + node * 8),
            self.memory.word(l.mins + node * 8),
        ];
        let (sum, min) = self.summary(level, node);
        ([sum, min], words)
    }

    /// Makes the items `items` of one level (level 0's values, or nodes) match what is below
    /// them (see the module docs): reads what each should hold, stores it where it differs,
    /// and reads again after its stores until what it stored matches. Returns the items it
    /// stored to, sorted (their parents must be recomputed in turn). One fence per pass over
    /// the batch: it orders every store before it (the caller's changes below, and our stores
    /// of the pass before) before every load after it.
    fn settle<'w, const W: usize>(
        &'w self,
        items: &[usize],
        target: impl Fn(usize) -> ([u64; 2], [&'w AtomicU64; W]),
    ) -> Vec<usize> {
        let mut stored = Vec::new();
        let mut pending = items.to_vec();
        while !pending.is_empty() {
            fence(Ordering::SeqCst);
            pending.retain(|&item| {
                let (want, words) = target(item);
                let differs = words
                    .iter()
                    .zip(want)
                    .any(|(word, want)| word.load(Ordering::SeqCst) != want);
                if differs {
                    // Relaxed: the fence opening the next pass orders these stores before
                    // its loads, which is all the protocol needs (a SeqCst store on x86 is a
                    // locked instruction that waits for every load before it, so the misses of
                    // a batch could not overlap).
                    for (word, want) in words.iter().zip(want) {
                        word.store(want, Ordering::Relaxed);
                    }
                }
                differs
            });
            stored.extend_from_slice(&pending);
        }
        stored.sort_unstable();
        stored.dedup();
        stored
    }

    /// Starts loading what recomputing `items` of `level` (0: level 0's values) reads, all of
    /// them at once, so that their cache misses overlap instead of following one another.
    fn prefetch_inputs(&self, level: usize, items: &[usize]) {
        for &item in items {
            if level == 0 {
                self.prefetch_update(item);
            } else if level > 1 {
                // (Level 1's inputs are level 0's values: loaded with level 0.)
                self.memory
                    .prefetch(self.geometry.children_offset(level, item), FANOUT * 8);
                let below = self.geometry.levels[level - 2];
                self.memory
                    .prefetch(below.mins + item * FANOUT * 8, FANOUT * 8);
            }
        }
    }

    /// Brings level 0 and the ancestors of the changed leaves `leaves` (sorted) up to date.
    /// With `all`, every ancestor is recomputed even where a level below was already right (a
    /// repair: the process that changed them may have died between two levels).
    pub fn propagate(&self, leaves: impl IntoIterator<Item = usize>, all: bool) {
        let leaves: Vec<usize> = leaves.into_iter().collect();
        self.prefetch_inputs(0, &leaves);
        let stored = self.settle(&leaves, |i| self.value_of(i));
        let mut changed = if all { leaves } else { stored };
        for level in 1..=self.geometry.depth() {
            let mut nodes: Vec<usize> = Vec::with_capacity(changed.len());
            for &child in &changed {
                push_unique(&mut nodes, child / FANOUT);
            }
            if nodes.is_empty() {
                return;
            }
            self.prefetch_inputs(level, &nodes);
            let stored = self.settle(&nodes, |n| self.node_of(level, n));
            changed = if all { nodes } else { stored };
        }
    }

    /// Recomputes level 0 and every ancestor of leaves `first..=last` (wrapping past the end of
    /// the ring when `last < first`), bottom up: undoes whatever a process killed while
    /// changing those leaves left behind. Safe while other processes update (it is only
    /// recomputation).
    ///
    /// First, `abandoned(index, leaf)` is asked about every leaf of the range: if it names a tag
    /// (the slot holds no record that leaf may count: one a dead process claimed and never
    /// committed, say), the leaf is set to that tag with no value, unless it changed meanwhile
    /// (a writer taking the slot over retags it).
    pub fn repair(
        &self,
        first: usize,
        last: usize,
        abandoned: impl Fn(usize, Leaf) -> Option<u64>,
    ) {
        let capacity = self.geometry.capacity;
        let (first, last) = (first.min(capacity - 1), last.min(capacity - 1));
        let leaves: Vec<usize> = if first <= last {
            (first..=last).collect()
        } else {
            (0..=last).chain(first..capacity).collect()
        };
        for &index in &leaves {
            let cell = self.memory.cell(self.geometry.leaf_offset(index));
            let current = cell.load(Ordering::SeqCst);
            if let Some(tag) = abandoned(index, Leaf::decode(current, self.scale())) {
                let empty = Leaf { tag, q: 0, raw: 0 }.encode(self.scale());
                if empty != current {
                    let _ =
                        cell.compare_exchange(current, empty, Ordering::SeqCst, Ordering::SeqCst);
                }
            }
        }
        self.propagate(leaves, true);
    }

    /// Where the ranges of node `node` of level `level`'s children end, cumulatively (the last
    /// is the children's total). Plain adds: each child is below 2^62, so 16 of them overflow
    /// only in scribbled memory, where [`pick`] still stays inside the node.
    #[inline]
    fn ends(&self, level: usize, node: usize) -> [u64; FANOUT] {
        // All 16 words in a loop of fixed length (unrolled, its loads issue together), each
        // child that does not exist counted as 0: an empty range at the end, never picked.
        // (Cutting the loop short, or filling the ends after it, cost a quarter of the sampling
        // time at 1M slots.)
        let (children, count) = self.children(level, node);
        let mut ends = [0u64; FANOUT];
        let mut total = 0u64;
        for (k, (end, child)) in ends.iter_mut().zip(children).enumerate() {
            let value = child.load(Ordering::Relaxed);
            total = total.wrapping_add(if k < count { value } else { 0 });
            *end = total;
        }
        ends
    }

    /// One step down from node `node` of level `level` (above 0): the child whose cumulative
    /// range holds `target`, and the target within that child. `None` if every child is 0.
    /// Never a child whose sum is 0. A node a little ahead of its children (an update in
    /// flight): the target is wrapped into what the children hold.
    #[inline]
    fn step(&self, level: usize, node: usize, target: u64) -> Option<(usize, u64)> {
        pick(&self.ends(level, node), target).map(|(child, rest)| (node * FANOUT + child, rest))
    }

    /// The leaf whose cumulative range holds `target` (below the total the caller read), or
    /// `None` if the tree holds nothing drawable right now. Never a leaf whose value is 0 (in
    /// level 0; the caller checks the leaf itself).
    pub fn descend(&self, target: u64) -> Option<usize> {
        let (mut node, mut target) = (0usize, target);
        for level in (1..=self.geometry.depth()).rev() {
            (node, target) = self.step(level, node, target)?;
        }
        (node < self.geometry.capacity).then_some(node)
    }

    /// [`descend`](Self::descend) for many targets at once, level by level: while one row's
    /// step runs, the nodes the other rows go to next are being loaded (prefetched), so their
    /// cache misses overlap. `targets[i]` becomes leaf `Some(index)` of row `i`; `None` where
    /// nothing was drawable.
    pub fn descend_many(&self, targets: &[u64], leaves: &mut [Option<usize>]) {
        const NOTHING: usize = usize::MAX;
        let mut at: Vec<(usize, u64)> = targets.iter().map(|&t| (0, t)).collect();
        for level in (1..=self.geometry.depth()).rev() {
            for (node, target) in at.iter_mut().filter(|(node, _)| *node != NOTHING) {
                let Some(next) = self.step(level, *node, *target) else {
                    *node = NOTHING;
                    continue;
                };
                (*node, *target) = next;
                if level > 1 {
                    let children = self.geometry.children_offset(level - 1, *node);
                    self.memory.prefetch(children, FANOUT * 8);
                }
            }
        }
        for (leaf, &(node, _)) in leaves.iter_mut().zip(&at) {
            *leaf = (node < self.geometry.capacity).then_some(node);
        }
    }

    /// Every node (and level 0) matches its children (for tests and checks; only meaningful
    /// when no update is in flight).
    pub fn is_consistent(&self) -> bool {
        let values = (0..self.geometry.capacity).all(|i| {
            self.memory
                .word(self.geometry.values + i * 8)
                .load(Ordering::SeqCst)
                == self.leaf(i).q
        });
        values
            && (1..=self.geometry.depth()).all(|level| {
                let l = self.geometry.levels[level - 1];
                (0..l.nodes).all(|node| {
                    self.summary(level, node)
                        == (
                            self.memory.word(l.sums + node * 8).load(Ordering::SeqCst),
                            self.memory.word(l.mins + node * 8).load(Ordering::SeqCst),
                        )
                })
            })
    }
}

/// The child whose range, of the cumulative `ends`, holds `target` (wrapped into the total if
/// beyond it), and the target within that child; `None` if the total is 0. Branch-free: a
/// random child would mispredict a branch at every level.
#[inline(always)]
fn pick(ends: &[u64; FANOUT], target: u64) -> Option<(usize, u64)> {
    let total = ends[FANOUT - 1];
    if total == 0 {
        return None;
    }
    let target = if target < total {
        target
    } else {
        target % total
    };
    // The first child whose range ends above the target: not empty, its range ends above the
    // end of the one before. A binary search with no branches (FANOUT is a power of two);
    // scribbled memory (`ends` not increasing) can only make it pick another child.
    let mut child = 0;
    let mut half = FANOUT / 2;
    while half > 0 {
        if ends[child + half - 1] <= target {
            child += half;
        }
        half /= 2;
    }
    let start = if child == 0 { 0 } else { ends[child - 1] };
    Some((child, target.wrapping_sub(start)))
}

/// The sum of `values`, wrapping: only scribbled memory can exceed 2^62, and it must not panic
/// (the descent copes with a node that disagrees with its children).
#[inline(always)]
fn wrapping_sum(values: &[u64; FANOUT]) -> u64 {
    values.iter().fold(0u64, |a, &b| a.wrapping_add(b))
}

/// The smallest positive value of `values`, 0 if none: 0 becomes the largest `u64` by the
/// wrapping `- 1`, and back by the `+ 1` (no branch, so the compiler vectorises it).
#[inline(always)]
fn positive_min(values: &[u64; FANOUT]) -> u64 {
    values
        .iter()
        .fold(u64::MAX, |m, &v| m.min(v.wrapping_sub(1)))
        .wrapping_add(1)
}

/// Appends `value` unless it is the last element (the inputs come sorted).
fn push_unique(values: &mut Vec<usize>, value: usize) {
    if values.last() != Some(&value) {
        values.push(value);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// A tree in private memory.
    struct Memory {
        words: Vec<AtomicU64>,
        cells: Vec<AtomicU128>,
    }

    impl Memory {
        fn new(geometry: &Geometry) -> Memory {
            Memory {
                words: (0..geometry.bytes / 8).map(|_| AtomicU64::new(0)).collect(),
                cells: (0..geometry.bytes / 16)
                    .map(|_| AtomicU128::new(0))
                    .collect(),
            }
        }
    }

    impl TreeMemory for Memory {
        fn words(&self, offset: usize, count: usize) -> &[AtomicU64] {
            &self.words[offset / 8..offset / 8 + count]
        }
        fn cell(&self, offset: usize) -> &AtomicU128 {
            &self.cells[offset / 16]
        }
    }

    fn tree_with(values: &[u64]) -> (Geometry, Memory) {
        let g = Geometry::new(values.len());
        let m = Memory::new(&g);
        {
            let t = Tree {
                geometry: &g,
                memory: &m,
            };
            for (i, &q) in values.iter().enumerate() {
                t.store(i, Leaf { tag: 1, q, raw: 0 });
            }
            t.propagate(0..values.len(), false);
        }
        (g, m)
    }

    #[test]
    fn scale_keeps_sums_below_2_62_and_v_up_to_2_20() {
        for capacity in [1usize, 2, 3, 1000, 1 << 20, 10_000_000, 1 << 40] {
            let s = Scale::for_capacity(capacity);
            assert!(
                (capacity as u128) * u128::from(s.q_max()) < 1 << 62,
                "{capacity}"
            );
            assert!(s.v_max() >= (1u64 << 20) as f64 * 0.99, "{capacity}");
            assert!(64 - s.q_bits >= 24, "tag bits at {capacity}");
        }
        let s = Scale::for_capacity(1000);
        assert_eq!(s.quantize(1.0), Some(1 << s.fraction_bits));
        assert_eq!(s.quantize(0.0), Some(0));
        assert_eq!(s.quantize(1e-30), Some(1), "positive stays drawable");
        assert_eq!(s.quantize(-1.0), None);
        assert_eq!(s.quantize(f64::NAN), None);
        assert_eq!(s.quantize(f64::INFINITY), None);
        assert_eq!(s.quantize(s.v_max() * 1.01), None);
    }

    #[test]
    fn leaf_round_trips() {
        let s = Scale::for_capacity(10_000_000);
        let leaf = Leaf {
            tag: s.tag(123_456_789_012, 10_000_000),
            q: s.q_max(),
            raw: 2.5f64.to_bits(),
        };
        assert_eq!(Leaf::decode(leaf.encode(s), s), leaf);
    }

    #[test]
    fn sums_and_minima_are_exact_at_every_level() {
        let values: Vec<u64> = (0..5000u64).map(|i| (i * 7919) % 13).collect();
        let (g, m) = tree_with(&values);
        let t = Tree {
            geometry: &g,
            memory: &m,
        };
        assert!(g.depth() >= 3);
        assert_eq!(t.total(), values.iter().sum::<u64>());
        assert_eq!(t.minimum(), 1);
        assert!(t.is_consistent());
        // Updates and a repair keep it so.
        assert!(t.update(17, 1, 1000, 0));
        assert!(!t.update(18, 2, 1000, 0), "another record's tag");
        t.propagate([17], false);
        assert_eq!(t.total(), values.iter().sum::<u64>() - values[17] + 1000);
        t.repair(4990, 20, |_, _| None);
        assert!(t.is_consistent());
    }

    #[test]
    fn descent_never_draws_zero_and_follows_the_values() {
        // Nonzero only at node boundaries and at the end.
        let mut values = vec![0u64; 4096];
        for i in [15, 16, 255, 256, 4095] {
            values[i] = 1 + i as u64;
        }
        let (g, m) = tree_with(&values);
        let t = Tree {
            geometry: &g,
            memory: &m,
        };
        let total = t.total();
        let mut counts = vec![0u64; values.len()];
        for target in 0..total {
            let index = t.descend(target).expect("drawable");
            counts[index] += 1;
        }
        assert_eq!(
            counts, values,
            "each leaf gets exactly its share of targets"
        );
    }

    #[test]
    fn descent_survives_a_node_ahead_of_its_children() {
        let (g, m) = tree_with(&[0, 5, 0, 3]);
        let t = Tree {
            geometry: &g,
            memory: &m,
        };
        // Leaves change, the root is not yet recomputed.
        t.store(
            1,
            Leaf {
                tag: 1,
                q: 0,
                raw: 0,
            },
        );
        t.propagate([1], false);
        for target in 0..8 {
            assert_eq!(t.descend(target), Some(3));
        }
        t.store(
            3,
            Leaf {
                tag: 1,
                q: 0,
                raw: 0,
            },
        );
        t.propagate([3], false);
        assert_eq!(t.descend(2), None, "nothing drawable");
    }
}

/// Model checks: an update racing the overwrite of its slot, and concurrent recomputation by
/// live and repairing processes, in every interleaving.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::protocol::slot::{self, Ask, Claim};
    use loom::sync::Arc;
    use loom::thread;

    struct Memory {
        words: Vec<AtomicU64>,
        cells: Vec<AtomicU128>,
        seq: Vec<AtomicU64>,
    }

    impl TreeMemory for Memory {
        fn words(&self, offset: usize, count: usize) -> &[AtomicU64] {
            &self.words[offset / 8..offset / 8 + count]
        }
        fn cell(&self, offset: usize) -> &AtomicU128 {
            &self.cells[offset / 16]
        }
    }

    const CAPACITY: u64 = 4;

    /// Runs `f` in every interleaving with up to 5 preemptions: a recompute reads and writes
    /// dozens of words, and unbounded exploration does not end (5 preemptions: 5 s; the bug the
    /// fence in `recompute` fixes was found with 3). CHESS (Musuvathi and Qadeer, PLDI 2007)
    /// found concurrency bugs needing more than two preemptions to be rare.
    fn model(f: impl Fn() + Sync + Send + 'static) {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(5);
        builder.check(f);
    }

    /// A full ring of 4 slots (tickets 0..4, leaf values 1..=4) and its tree, consistent.
    fn full() -> (Arc<Geometry>, Arc<Memory>) {
        let g = Geometry::new(CAPACITY as usize);
        let m = Memory {
            words: (0..g.bytes / 8).map(|_| AtomicU64::new(0)).collect(),
            cells: (0..g.bytes / 16).map(|_| AtomicU128::new(0)).collect(),
            seq: (0..CAPACITY)
                .map(|t| AtomicU64::new(slot::committed(t)))
                .collect(),
        };
        {
            let t = Tree {
                geometry: &g,
                memory: &m,
            };
            for i in 0..CAPACITY as usize {
                let tag = g.scale.tag(i as u64, CAPACITY);
                t.store(
                    i,
                    Leaf {
                        tag,
                        q: 1 + i as u64,
                        raw: 0,
                    },
                );
            }
            t.propagate(0..CAPACITY as usize, false);
        }
        (Arc::new(g), Arc::new(m))
    }

    /// What `update_priorities` does for key `ticket`: the slot must hold that record, then
    /// the leaf is CASed under its tag and the ancestors recomputed.
    fn update(g: &Geometry, m: &Memory, ticket: u64, q: u64) -> bool {
        let index = (ticket % CAPACITY) as usize;
        let Some(word) = slot::read_begin(&m.seq[index]) else {
            return false;
        };
        if slot::ticket_of(word) != ticket {
            return false;
        }
        let t = Tree {
            geometry: g,
            memory: m,
        };
        let applied = t.update(index, g.scale.tag(ticket, CAPACITY), q, q);
        t.propagate([index], false);
        applied
    }

    /// What a writer does: claim, retag, write, set its value, commit, recompute.
    fn overwrite(g: &Geometry, m: &Memory, ticket: u64, q: u64) {
        let index = (ticket % CAPACITY) as usize;
        let t = Tree {
            geometry: g,
            memory: m,
        };
        let claimed = slot::claim(&m.seq[index], ticket, 1, &mut Ask(|_| unreachable!()));
        assert!(matches!(claimed, Claim::Acquired { .. }));
        let tag = g.scale.tag(ticket, CAPACITY);
        t.retag(index, tag);
        t.store(index, Leaf { tag, q, raw: q });
        assert!(slot::commit(&m.seq[index], ticket, 1, false));
        t.propagate([index], false);
    }

    fn assert_exact(g: &Geometry, m: &Memory) {
        let t = Tree {
            geometry: g,
            memory: m,
        };
        assert!(t.is_consistent(), "a node does not match its children");
        let leaves: Vec<u64> = (0..CAPACITY as usize).map(|i| t.leaf(i).q).collect();
        assert_eq!(t.total(), leaves.iter().sum::<u64>());
        let positive = leaves.iter().copied().filter(|&q| q > 0);
        assert_eq!(t.minimum(), positive.min().unwrap_or(0));
    }

    #[test]
    fn loom_an_update_never_lands_on_the_record_that_replaced_its_own() {
        model(|| {
            let (g, m) = full();
            let updating = {
                let (g, m) = (g.clone(), m.clone());
                thread::spawn(move || update(&g, &m, 0, 100))
            };
            // Ticket 4 replaces ticket 0 in slot 0.
            overwrite(&g, &m, 4, 7);
            let applied = updating.join().unwrap();
            let t = Tree {
                geometry: &*g,
                memory: &*m,
            };
            let leaf = t.leaf(0);
            assert_eq!(leaf.tag, g.scale.tag(4, CAPACITY));
            assert_eq!(
                leaf.q, 7,
                "the update (applied: {applied}) landed on the new record"
            );
            assert_exact(&g, &m);
        });
    }

    #[test]
    fn loom_concurrent_updates_of_sibling_leaves_leave_exact_sums() {
        model(|| {
            let (g, m) = full();
            let other = {
                let (g, m) = (g.clone(), m.clone());
                thread::spawn(move || assert!(update(&g, &m, 1, 9)))
            };
            assert!(update(&g, &m, 2, 0));
            other.join().unwrap();
            assert_exact(&g, &m);
        });
    }

    #[test]
    fn loom_a_repair_racing_a_live_update_leaves_exact_sums() {
        model(|| {
            let (g, m) = full();
            // A process changed leaf 3 and died before recomputing anything.
            {
                let t = Tree {
                    geometry: &*g,
                    memory: &*m,
                };
                assert!(t.update(3, g.scale.tag(3, CAPACITY), 50, 0));
            }
            let live = {
                let (g, m) = (g.clone(), m.clone());
                thread::spawn(move || assert!(update(&g, &m, 0, 20)))
            };
            Tree {
                geometry: &*g,
                memory: &*m,
            }
            .repair(3, 3, |_, _| None);
            live.join().unwrap();
            assert_exact(&g, &m);
        });
    }
}
