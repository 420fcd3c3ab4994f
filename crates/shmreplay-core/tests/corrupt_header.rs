//! Property test: hostile or broken segment files. `ReplayBuffer::attach` and `inspect` on a
//! copy of a real segment that was truncated, extended, overwritten with random bytes in its
//! header, schema text, control words or handle table, given forged header words (sampler words
//! included) or section directory entries (with the checksum recomputed, so that the deeper
//! layout checks are reached), forged version words in its slots, or per-entry counters near
//! overflow, either return a usable buffer or fail with `Error::Corrupt` naming the file --
//! never a panic (in debug builds too), an out-of-bounds access, a long wait, or another error.
//! Uniform buffers and prioritized ones (with a priority tree section) alike. Several thousand
//! cases in all.
//!
//! The layout is private to the crate, so the offsets below mirror layout version 3 as defined
//! in `src/layout/mod.rs` (header words `H_*`, the sampler words, the section directory, the
//! control words `C_*`), `src/protocol/handles.rs` (handle-table entry words `E_*`) and
//! `src/protocol/priority.rs` (the priority section: `Geometry`, `Scale`, leaves).
//! `pristine_copy_attaches_and_matches_the_mirror` and
//! `prioritized_pristine_copy_attaches_and_matches_the_mirror` check every mirrored constant
//! against real segments, so a layout change fails there first, with a message saying what
//! moved.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use shmreplay_core::protocol::handles::Counter;
use shmreplay_core::protocol::slot;
use shmreplay_core::{
    DType, Error, InColumn, NoBlocking, OutColumn, Prioritized, PriorityOutputs, PriorityStats,
    ReplayBuffer, Sampler, Schema, Stats, LAYOUT_VERSION, MAX_CAPACITY, MAX_HANDLES,
};

// ---- Mirror of src/layout/mod.rs, layout version 3 ----

/// The layout version this mirror describes.
const MIRRORED_LAYOUT_VERSION: u64 = 4;
const MAGIC: u64 = u64::from_le_bytes(*b"SHMRPLY\0");
const READY: u64 = 1;
const KIND_RING: u64 = 1;
/// The one feature bit (`KNOWN_FEATURES`): set exactly in prioritized buffers.
const FEATURE_PRIORITIZED: u64 = 1;
// Header words. The checksum covers H_KIND..HEADER_END and the schema text.
const H_MAGIC: usize = 0;
const H_VERSION: usize = 8;
const H_READY: usize = 16;
const H_CHECKSUM: usize = 24;
const H_KIND: usize = 32;
const H_FEATURES: usize = 40;
const H_CAPACITY: usize = 48;
const H_RECORD_BYTES: usize = 56;
const H_SLOT_BYTES: usize = 64;
const H_RECORD_IN_SLOT: usize = 72;
const H_SCHEMA_LEN: usize = 80;
const H_SCHEMA_HASH: usize = 88;
const H_TOTAL_BYTES: usize = 96;
const H_CREATOR: usize = 104;
const H_CREATOR_NAMESPACE: usize = 112;
const H_CREATED_UNIX_NS: usize = 120;
const H_SECTION_COUNT: usize = 128;
/// Section directory: up to `MAX_SECTIONS` entries of (tag, offset, length, version).
const SECTION_DIRECTORY: usize = 136;
const MAX_SECTIONS: usize = 8;
const SECTION_ENTRY_BYTES: usize = 32;
/// The sampler words, right after the directory: kind (0 uniform, 1 prioritized), alpha and
/// eps (`f64` bits), stratified (0 or 1). All 0 in uniform buffers.
const H_SAMPLER: usize = 392;
const H_ALPHA: usize = 400;
const H_EPS: usize = 408;
const H_STRATIFIED: usize = 416;
/// The rate limiter: kind (0 none, 1 min size, 2 sample-to-insert ratio), then its samples per
/// insert, min size, min diff and max diff (read only when the feature bit says there is one;
/// the buffers mirrored here have none).
const H_LIMITER: usize = 424;
const H_MIN_SIZE: usize = 440;
const HEADER_END: usize = 512;
const SCHEMA_TEXT: usize = HEADER_END;
const _: () = assert!(SECTION_DIRECTORY + MAX_SECTIONS * SECTION_ENTRY_BYTES == H_SAMPLER);
/// `layout::schema::MAX_SCHEMA_TEXT`.
const MAX_SCHEMA_TEXT: u64 = 32 * 1024;
/// Records from this size on start on a cache line of their own.
const ALIGNED_RECORD_BYTES: u64 = 1024;
/// Section tags, in directory order (the priority section in prioritized buffers only).
const CONTROL_TAG: [u8; 8] = *b"control\0";
const HANDLES_TAG: [u8; 8] = *b"handles\0";
const SLOTS_TAG: [u8; 8] = *b"slots\0\0\0";
const PRIORITY_TAG: [u8; 8] = *b"priority";
const CONTROL_BYTES: u64 = 1024;
/// Control words (offsets in the control section).
const C_CURSOR: usize = 0;
const C_ENTRIES_USED: usize = 128;

// ---- Mirror of src/protocol/handles.rs ----

const ENTRY_BYTES: usize = 128;
const E_OWNER: usize = 0;
const E_NAMESPACE: usize = 8;
const E_INTENT: usize = 16;
const E_FIRSTS: usize = 24;
const E_COUNTERS: usize = 32;
/// Per-entry counters: inserts, samples, retries, recovered, superseded, lost, stale updates,
/// nanoseconds inserts and samples waited for flow control.
const COUNTERS: usize = 9;
/// How many changes of the priority tree the entry's process has in flight (0 when quiet; a
/// dead entry with any makes its finder recompute the whole tree).
const E_TREE_CHANGES: usize = E_COUNTERS + 8 * COUNTERS;
/// A queue producer's claim (first ticket + 1; 0 in the rings mirrored here).
const E_QUEUE_CLAIM: usize = E_TREE_CHANGES + 8;
/// Its process's calls waiting for flow control (0 in the rings mirrored here).
const E_WAITERS: usize = E_QUEUE_CLAIM + 8;
/// Bytes of an entry that hold words (all of it).
const ENTRY_WORDS_END: usize = E_WAITERS + 8;
/// The intent word's snapshot of `firsts` takes its low 12 bits.
const SNAPSHOT_BITS: u32 = 12;

fn counter_offset(counter: Counter) -> usize {
    E_COUNTERS + 8 * counter as usize
}

fn intent_word(ticket: u64, firsts: u64) -> u64 {
    ((ticket + 1) << SNAPSHOT_BITS) | (firsts & ((1 << SNAPSHOT_BITS) - 1))
}

/// The per-entry counters summed in `stats`, in `Counter::ALL` order.
fn summed(s: Stats) -> [u64; COUNTERS] {
    [
        s.inserts,
        s.samples,
        s.retries,
        s.recovered,
        s.superseded,
        s.lost,
        s.stale_updates,
        s.insert_wait_ns,
        s.sample_wait_ns,
    ]
}

// ---- Mirror of src/protocol/priority.rs ----

/// Children per node.
const FANOUT: usize = 16;
/// The section's head: its first word holds the largest raw priority ever set above 1.0
/// (`f64` bits; 0 while none was).
const HEAD_BYTES: usize = 128;
const MAX_RAW: usize = 0;
/// A leaf: `tag << q_bits | q`, then the raw priority's `f64` bits.
const LEAF_BYTES: usize = 16;
/// `Scale`: `q_bits = min(MAX_Q_BITS, SUM_BITS - ceil(log2(capacity)))`, at least `V_BITS`;
/// `fraction_bits = q_bits - V_BITS`.
const V_BITS: u32 = 20;
const MAX_Q_BITS: u32 = 40;
const SUM_BITS: u32 = 62;

/// The sampler words of a header (`None`: uniform).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SamplerWords {
    alpha: u64,
    eps: u64,
    stratified: bool,
}

impl SamplerWords {
    fn of(sampler: Sampler) -> Option<SamplerWords> {
        match sampler {
            Sampler::Uniform => None,
            Sampler::Queue => panic!("this mirror covers rings sampled uniformly or by priority"),
            Sampler::Prioritized(p) => Some(SamplerWords {
                alpha: p.alpha.to_bits(),
                eps: p.eps.to_bits(),
                stratified: p.stratified,
            }),
        }
    }

    /// What a header says (words as written by `write_header`, not validated).
    fn in_header(data: &[u8]) -> Option<SamplerWords> {
        (word(data, H_SAMPLER) == 1).then(|| SamplerWords {
            alpha: word(data, H_ALPHA),
            eps: word(data, H_EPS),
            stratified: word(data, H_STRATIFIED) == 1,
        })
    }

    fn alpha(&self) -> f64 {
        f64::from_bits(self.alpha)
    }

    fn eps(&self) -> f64 {
        f64::from_bits(self.eps)
    }
}

/// Whether `Layout::new` takes these bits as alpha or eps: a finite number >= 0 (-0.0 too).
fn valid_parameter(bits: u64) -> bool {
    let v = f64::from_bits(bits);
    v.is_finite() && v >= 0.0
}

/// One level of internal nodes (offsets in the section).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TreeLevel {
    nodes: usize,
    sums: usize,
    mins: usize,
}

/// Where everything of a priority section is (mirror of `protocol::priority::Geometry` and
/// `Scale`): the head, the leaves, level 0 (a copy of every leaf's `q`), then per level of
/// nodes up to the root its sums, then its minima; every array padded to whole nodes of 16.
#[derive(Clone, Debug, PartialEq, Eq)]
struct TreeMirror {
    capacity: usize,
    q_bits: u32,
    fraction_bits: u32,
    values: usize,
    /// Level 1 first, the root's last.
    levels: Vec<TreeLevel>,
    bytes: usize,
}

impl TreeMirror {
    fn new(capacity: usize) -> TreeMirror {
        let whole = |n: usize| n.div_ceil(FANOUT) * FANOUT;
        let values = HEAD_BYTES + whole(capacity) * LEAF_BYTES;
        let mut at = values + whole(capacity) * 8;
        let mut levels = Vec::new();
        let mut below = capacity;
        loop {
            let nodes = below.div_ceil(FANOUT);
            let words = whole(nodes) * 8;
            levels.push(TreeLevel {
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
        // ceil(log2(capacity)): the smallest k with 2^k >= capacity.
        let log2 = (0..64).find(|&k| (1u128 << k) >= capacity as u128).unwrap();
        let q_bits = MAX_Q_BITS.min(SUM_BITS.saturating_sub(log2)).max(V_BITS);
        TreeMirror {
            capacity,
            q_bits,
            fraction_bits: q_bits - V_BITS,
            values,
            levels,
            bytes: at,
        }
    }

    fn leaf(&self, index: usize) -> usize {
        HEAD_BYTES + index * LEAF_BYTES
    }

    fn q_max(&self) -> u64 {
        (1 << self.q_bits) - 1
    }

    fn one(&self) -> f64 {
        (1u64 << self.fraction_bits) as f64
    }

    /// The tag of the record of `ticket`: its lap plus one, in the bits above `q`.
    fn tag(&self, ticket: u64) -> u64 {
        (ticket / self.capacity as u64 + 1) & (u64::MAX >> self.q_bits)
    }

    /// `q` of raw priority `raw` under `sampler`: `(raw + eps)^alpha · 2^f` rounded half up
    /// (`+ 0.5`, truncated), at least 1 if positive.
    fn quantize(&self, sampler: SamplerWords, raw: f64) -> u64 {
        let v = (raw + sampler.eps()).powf(sampler.alpha());
        let q = (v * self.one() + 0.5).trunc();
        assert!(
            v.is_finite() && q <= self.q_max() as f64,
            "{raw} is out of range"
        );
        if v > 0.0 {
            (q as u64).max(1)
        } else {
            0
        }
    }

    /// The section as it must be with `leaves[i]` = `(tag, q, raw bits)` of slot `i` and the
    /// head's word `max_raw`: level 0 and every node computed from the leaves.
    fn image(&self, leaves: &[(u64, u64, u64)], max_raw: u64) -> Vec<u8> {
        assert_eq!(leaves.len(), self.capacity);
        let mut image = vec![0u8; self.bytes];
        put(&mut image, MAX_RAW, max_raw);
        for (i, &(tag, q, raw)) in leaves.iter().enumerate() {
            put(&mut image, self.leaf(i), (tag << self.q_bits) | q);
            put(&mut image, self.leaf(i) + 8, raw);
            put(&mut image, self.values + 8 * i, q);
        }
        // (sum, smallest positive value) of each child of the level being computed.
        let mut below: Vec<(u64, u64)> = leaves.iter().map(|&(_, q, _)| (q, q)).collect();
        for level in &self.levels {
            let nodes: Vec<(u64, u64)> = below
                .chunks(FANOUT)
                .map(|children| {
                    let sum = children.iter().map(|c| c.0).sum();
                    let min = children.iter().map(|c| c.1).filter(|&m| m > 0).min();
                    (sum, min.unwrap_or(0))
                })
                .collect();
            assert_eq!(nodes.len(), level.nodes);
            for (k, &(sum, min)) in nodes.iter().enumerate() {
                put(&mut image, level.sums + 8 * k, sum);
                put(&mut image, level.mins + 8 * k, min);
            }
            below = nodes;
        }
        image
    }

    /// Which array byte `offset` of the section is in, for messages.
    fn region(&self, offset: usize) -> String {
        if offset < HEAD_BYTES {
            return format!("head word {}", offset / 8);
        }
        if offset < self.values {
            return format!("leaf {}", (offset - HEAD_BYTES) / LEAF_BYTES);
        }
        let first = self.levels[0].sums;
        if offset < first {
            return format!("level 0 value {}", (offset - self.values) / 8);
        }
        for (l, level) in self.levels.iter().enumerate() {
            if offset < level.mins {
                return format!("level {} sum {}", l + 1, (offset - level.sums) / 8);
            }
            if offset < level.mins + (level.mins - level.sums) {
                return format!("level {} minimum {}", l + 1, (offset - level.mins) / 8);
            }
        }
        "past the end".into()
    }
}

/// One section directory entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Section {
    tag: [u8; 8],
    offset: u64,
    len: u64,
    version: u64,
}

/// Where everything is in a segment of a given shape (mirror of `layout::Layout::new`).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Mirror {
    capacity: u64,
    record_bytes: u64,
    schema_len: u64,
    slot_bytes: u64,
    record_in_slot: u64,
    sampler: Option<SamplerWords>,
    /// Prioritized buffers only.
    tree: Option<TreeMirror>,
    /// Control, handles, slots, then (prioritized buffers only) priority.
    sections: Vec<Section>,
    total: u64,
}

impl Mirror {
    /// `None` where `Layout::new` refuses the shape.
    fn new(
        capacity: u64,
        record_bytes: u64,
        schema_len: u64,
        sampler: Option<SamplerWords>,
    ) -> Option<Mirror> {
        if capacity == 0 || capacity > MAX_CAPACITY || schema_len > MAX_SCHEMA_TEXT {
            return None;
        }
        if let Some(s) = sampler {
            if !(valid_parameter(s.alpha) && valid_parameter(s.eps)) {
                return None;
            }
        }
        let record_in_slot = if record_bytes >= ALIGNED_RECORD_BYTES {
            64
        } else {
            8
        };
        let slot_bytes = record_bytes
            .checked_add(record_in_slot)?
            .checked_next_multiple_of(record_in_slot)?;
        let control = (SCHEMA_TEXT as u64 + schema_len).next_multiple_of(128);
        let handles = control + CONTROL_BYTES;
        let handles_len = (MAX_HANDLES * ENTRY_BYTES) as u64;
        let slots = (handles + handles_len).next_multiple_of(4096);
        let slots_len = capacity.checked_mul(slot_bytes)?;
        let slots_end = slots.checked_add(slots_len)?;
        let section = |tag, offset, len| Section {
            tag,
            offset,
            len,
            version: 1,
        };
        let mut sections = vec![
            section(CONTROL_TAG, control, CONTROL_BYTES),
            section(HANDLES_TAG, handles, handles_len),
            section(SLOTS_TAG, slots, slots_len),
        ];
        let tree = sampler.map(|_| TreeMirror::new(capacity as usize));
        let total = match &tree {
            Some(tree) => {
                let offset = slots_end.next_multiple_of(4096);
                sections.push(section(PRIORITY_TAG, offset, tree.bytes as u64));
                offset.checked_add(tree.bytes as u64)?
            }
            None => slots_end,
        };
        if total > i64::MAX as u64 {
            return None;
        }
        Some(Mirror {
            capacity,
            record_bytes,
            schema_len,
            slot_bytes,
            record_in_slot,
            sampler,
            tree,
            sections,
            total,
        })
    }

    fn control(&self) -> usize {
        self.sections[0].offset as usize
    }

    fn handles(&self) -> usize {
        self.sections[1].offset as usize
    }

    fn slots(&self) -> usize {
        self.sections[2].offset as usize
    }

    fn slots_end(&self) -> usize {
        (self.sections[2].offset + self.sections[2].len) as usize
    }

    /// Where the priority section starts (prioritized buffers only).
    fn priority(&self) -> Option<usize> {
        self.sections.get(3).map(|s| s.offset as usize)
    }

    fn entry(&self, e: usize) -> usize {
        self.handles() + e * ENTRY_BYTES
    }

    fn slot(&self, index: usize) -> usize {
        self.slots() + index * self.slot_bytes as usize
    }

    fn features(&self) -> u64 {
        if self.sampler.is_some() {
            FEATURE_PRIORITIZED
        } else {
            0
        }
    }

    /// Every header word the shape and sampler determine, with its value (the schema hash
    /// aside).
    fn header_words(&self) -> Vec<(usize, u64)> {
        let s = self.sampler;
        let mut words = vec![
            (H_FEATURES, self.features()),
            (H_CAPACITY, self.capacity),
            (H_RECORD_BYTES, self.record_bytes),
            (H_SLOT_BYTES, self.slot_bytes),
            (H_RECORD_IN_SLOT, self.record_in_slot),
            (H_SCHEMA_LEN, self.schema_len),
            (H_TOTAL_BYTES, self.total),
            (H_SECTION_COUNT, self.sections.len() as u64),
            (H_SAMPLER, u64::from(s.is_some())),
            (H_ALPHA, s.map_or(0, |s| s.alpha)),
            (H_EPS, s.map_or(0, |s| s.eps)),
            (H_STRATIFIED, s.map_or(0, |s| u64::from(s.stratified))),
        ];
        for (i, s) in self.sections.iter().enumerate() {
            let at = directory_entry(i);
            words.extend([
                (at, u64::from_le_bytes(s.tag)),
                (at + 8, s.offset),
                (at + 16, s.len),
                (at + 24, s.version),
            ]);
        }
        words
    }
}

fn directory_entry(i: usize) -> usize {
    SECTION_DIRECTORY + i * SECTION_ENTRY_BYTES
}

fn read_section(data: &[u8], i: usize) -> Section {
    let at = directory_entry(i);
    Section {
        tag: word(data, at).to_le_bytes(),
        offset: word(data, at + 8),
        len: word(data, at + 16),
        version: word(data, at + 24),
    }
}

const CAPACITY: u64 = 8;
/// Records the pristine segment saw: a full ring, then 3 more (slots 0..3 overwritten).
const INSERTED: u64 = CAPACITY + 3;
/// Rows the pristine segment's creator sampled.
const SAMPLED: u64 = 4;
/// The ticket the next insert into the pristine copy takes, and its slot.
const NEXT_TICKET: u64 = INSERTED;
const NEXT_SLOT: usize = (NEXT_TICKET % CAPACITY) as usize;

/// The prioritized pristine segment: 40 slots (a tree of two levels: 3 nodes, then the root).
const P_CAPACITY: u64 = 40;
/// Records it saw: a full ring with priorities, then 3 more without (slots 0..3 overwritten).
const P_INSERTED: u64 = P_CAPACITY + 3;
/// Rows its creator sampled by priority.
const P_SAMPLED: u64 = 4;
/// eps 0: a raw priority of 0 makes `q = 0` (a leaf that is never drawn, no node minimum).
const P_SAMPLER: Prioritized = Prioritized {
    alpha: 0.7,
    eps: 0.0,
    stratified: false,
};
/// The raw priority given with record `k` of the first `P_CAPACITY`.
fn p_priority(k: u64) -> f64 {
    (k % 9) as f64 * 0.75
}
/// The largest of them (the raw priority of the 3 inserted without one).
const P_FIRST_MAX: f64 = 6.0;
/// Its creator's `update_priorities` after the inserts: key 0 is stale (slot 0 holds ticket 40
/// now), key 5 gets the largest raw priority, key 12 gets 0.
const P_UPDATE_KEYS: [u64; 3] = [5, 0, 12];
const P_UPDATE_PRIORITIES: [f64; 3] = [7.5, 2.0, 0.0];

const BOUNDARIES: [u64; 16] = [
    0,
    1,
    7,
    8,
    9,
    512,
    4095,
    4096,
    1 << 31,
    1 << 32,
    1 << 40,
    (1 << 40) + 1,
    i64::MAX as u64,
    1 << 63,
    u64::MAX - 1,
    u64::MAX,
];

fn schema() -> Schema {
    Schema::new(&[
        ("obs", DType::U8, vec![3]),
        ("act", DType::I32, vec![]),
        ("rew", DType::F32, vec![2]),
    ])
    .unwrap()
}

/// The columns of records `range` (record `k`: obs `[k; 3]`, act `k`, rew `[k, -k]`).
fn columns(range: std::ops::Range<u64>) -> [Vec<u8>; 3] {
    [
        range.clone().flat_map(|k| [k as u8; 3]).collect(),
        range
            .clone()
            .flat_map(|k| (k as i32).to_le_bytes())
            .collect(),
        range
            .flat_map(|k| [k as f32, -(k as f32)])
            .flat_map(f32::to_le_bytes)
            .collect(),
    ]
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn word(data: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(data[offset..offset + 8].try_into().unwrap())
}

fn put(data: &mut [u8], offset: usize, value: u64) {
    data[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
}

fn add(data: &mut [u8], offset: usize, delta: u64) {
    put(data, offset, word(data, offset).wrapping_add(delta));
}

/// The checksum of the header as the segment stands (mirror of `layout::checksum`).
fn checksum(data: &[u8], text: &[u8]) -> u64 {
    let mut covered = data[H_KIND..HEADER_END].to_vec();
    covered.extend_from_slice(text);
    fnv1a(&covered)
}

/// Recomputes the schema hash and the checksum, as a forger would.
fn reseal(data: &mut [u8]) {
    let len = word(data, H_SCHEMA_LEN);
    if len > MAX_SCHEMA_TEXT || SCHEMA_TEXT + len as usize > data.len() {
        return;
    }
    let text = data[SCHEMA_TEXT..SCHEMA_TEXT + len as usize].to_vec();
    put(data, H_SCHEMA_HASH, fnv1a(&text));
    let sum = checksum(data, &text);
    put(data, H_CHECKSUM, sum);
}

/// Rewrites the layout words (directory included) for `capacity` and `schema_text` (with the
/// record size of `record_bytes`) and the sampler the header names, reseals, and sizes the file
/// to what the header states plus `size_delta`. A priority section that moved or changed size
/// is zeroed, as a forger making a consistent file would (an empty tree).
fn forge(
    base: &[u8],
    capacity: u64,
    schema_text: Option<&[u8]>,
    record_bytes: u64,
    size_delta: i64,
) -> Vec<u8> {
    let mut data = base.to_vec();
    if let Some(text) = schema_text {
        let old = word(&data, H_SCHEMA_LEN) as usize;
        data[SCHEMA_TEXT..SCHEMA_TEXT + old].fill(0);
        if SCHEMA_TEXT + text.len() > data.len() {
            data.resize(SCHEMA_TEXT + text.len(), 0);
        }
        data[SCHEMA_TEXT..SCHEMA_TEXT + text.len()].copy_from_slice(text);
        put(&mut data, H_SCHEMA_LEN, text.len() as u64);
    }
    put(&mut data, H_CAPACITY, capacity);
    let mut size = data.len() as u64;
    let sampler = SamplerWords::in_header(base);
    let mut new_tree = None;
    if let Some(m) = Mirror::new(capacity, record_bytes, word(&data, H_SCHEMA_LEN), sampler) {
        for (offset, value) in m.header_words() {
            put(&mut data, offset, value);
        }
        if m.total <= 8 << 20 {
            size = m.total;
        }
        new_tree = m
            .sections
            .get(3)
            .copied()
            .filter(|&s| s != read_section(base, 3));
    }
    let size = (size as i64 + size_delta).max(SCHEMA_TEXT as i64 + 8) as usize;
    data.resize(size, 0);
    if let Some(s) = new_tree {
        let end = s.offset.saturating_add(s.len).min(size as u64) as usize;
        data[(s.offset as usize).min(end)..end].fill(0);
    }
    reseal(&mut data);
    data
}

struct Pristine {
    data: Vec<u8>,
    /// The mirror of its layout, computed from the shape alone (checked against `data` by
    /// `pristine_copy_attaches_and_matches_the_mirror`).
    mirror: Mirror,
    /// Its stats, as the creator saw them.
    stats: Stats,
    /// Prefix of its tests' directory tags ("" for the uniform one: tests may share a process).
    tag: &'static str,
}

impl Pristine {
    fn victim(&self, what: &str) -> Victim {
        Victim::new(&format!("{}{what}", self.tag))
    }
}

/// A real segment: a full ring (wrapped), counters, its creator's handle entry released.
fn pristine() -> &'static Pristine {
    static PRISTINE: OnceLock<Pristine> = OnceLock::new();
    PRISTINE.get_or_init(|| {
        let dir = test_dir("pristine");
        let buffer = ReplayBuffer::create("pristine", Some(&dir), CAPACITY, schema()).unwrap();
        let path = buffer.path().to_owned();
        for range in [0..CAPACITY, CAPACITY..INSERTED] {
            let n = (range.end - range.start) as usize;
            let [obs, act, rew] = columns(range);
            assert_eq!(buffer.extend(&[&obs, &act, &rew]).unwrap(), n);
        }
        let sizes: Vec<usize> = schema().fields().iter().map(|f| f.bytes).collect();
        let mut batch: Vec<Vec<u8>> = sizes
            .iter()
            .map(|&b| vec![0u8; SAMPLED as usize * b])
            .collect();
        let mut out: Vec<&mut [u8]> = batch.iter_mut().map(|v| v.as_mut_slice()).collect();
        let (mut index, mut key) = ([0u64; SAMPLED as usize], [0u64; SAMPLED as usize]);
        buffer.sample_into(&mut out, &mut index, &mut key).unwrap();
        let stats = buffer.stats();
        drop(buffer);
        let data = std::fs::read(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let mirror = Mirror::new(
            CAPACITY,
            schema().record_bytes() as u64,
            schema().encode().len() as u64,
            None,
        )
        .expect("the test schema has a layout");
        Pristine {
            data,
            mirror,
            stats,
            tag: "",
        }
    })
}

/// Inserts records `range` with raw priorities `priorities` (`None`: the buffer's largest).
fn extend_prioritized(
    buffer: &ReplayBuffer,
    range: std::ops::Range<u64>,
    priorities: Option<&[f64]>,
) {
    let n = (range.end - range.start) as usize;
    let [obs, act, rew] = columns(range);
    let columns = [&obs, &act, &rew].map(|c| InColumn::from_slice(c));
    let inserted = buffer
        .extend_columns_with_priorities(&columns, priorities, &mut NoBlocking)
        .unwrap();
    assert_eq!(inserted, n);
}

/// What one `sample_prioritized_columns` call returned.
struct Drawn {
    index: Vec<u64>,
    key: Vec<u64>,
    probability: Vec<f64>,
    weight: Vec<f32>,
    priority: Vec<f64>,
}

impl Drawn {
    /// Probabilities in (0, 1], importance weights in (0, 1].
    fn check(&self) -> Result<(), TestCaseError> {
        for (row, (&p, &w)) in self.probability.iter().zip(&self.weight).enumerate() {
            prop_assert!(p > 0.0 && p <= 1.0, "probability {} of row {}", p, row);
            prop_assert!(w > 0.0 && w <= 1.0, "weight {} of row {}", w, row);
        }
        Ok(())
    }
}

/// Samples `n` rows by priority (beta 0.4).
fn sample_prioritized(buffer: &ReplayBuffer, n: usize) -> Result<Drawn, Error> {
    let sizes: Vec<usize> = buffer.schema().fields().iter().map(|f| f.bytes).collect();
    let mut batch: Vec<Vec<u8>> = sizes.iter().map(|&b| vec![0u8; n * b]).collect();
    let out: Vec<OutColumn<'_>> = batch.iter_mut().map(|v| OutColumn::from_slice(v)).collect();
    let mut d = Drawn {
        index: vec![0; n],
        key: vec![0; n],
        probability: vec![0.0; n],
        weight: vec![0.0; n],
        priority: vec![0.0; n],
    };
    let info = PriorityOutputs {
        probability: &mut d.probability,
        weight: &mut d.weight,
        priority: &mut d.priority,
    };
    buffer.sample_prioritized_columns(
        &out,
        &mut d.index,
        &mut d.key,
        info,
        0.4,
        &mut NoBlocking,
    )?;
    Ok(d)
}

/// A real prioritized segment: a full ring with priorities (wrapped by 3 records without), a
/// stale and two applied priority updates, a sample by priority, its creator's entry released.
fn prioritized_pristine() -> &'static Pristine {
    static PRISTINE: OnceLock<Pristine> = OnceLock::new();
    PRISTINE.get_or_init(|| {
        let dir = test_dir("pristine-prioritized");
        let buffer = ReplayBuffer::builder("pristine")
            .dir(&dir)
            .capacity(P_CAPACITY)
            .schema(schema())
            .sampler(Sampler::Prioritized(P_SAMPLER))
            .create()
            .unwrap();
        let path = buffer.path().to_owned();
        let first: Vec<f64> = (0..P_CAPACITY).map(p_priority).collect();
        extend_prioritized(&buffer, 0..P_CAPACITY, Some(&first));
        extend_prioritized(&buffer, P_CAPACITY..P_INSERTED, None);
        let applied = buffer
            .update_priorities(&P_UPDATE_KEYS, &P_UPDATE_PRIORITIES, &mut NoBlocking)
            .unwrap();
        assert_eq!(applied, 2, "key 0 is stale");
        let drawn = sample_prioritized(&buffer, P_SAMPLED as usize).unwrap();
        drawn.check().unwrap();
        let stats = buffer.stats();
        drop(buffer);
        let data = std::fs::read(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let mirror = Mirror::new(
            P_CAPACITY,
            schema().record_bytes() as u64,
            schema().encode().len() as u64,
            SamplerWords::of(Sampler::Prioritized(P_SAMPLER)),
        )
        .expect("the test schema has a layout");
        Pristine {
            data,
            mirror,
            stats,
            tag: "p-",
        }
    })
}

/// `(tag, q, raw bits)` of every leaf of the prioritized pristine segment, and its head word.
fn prioritized_pristine_leaves(tree: &TreeMirror) -> (Vec<(u64, u64, u64)>, u64) {
    let sampler = SamplerWords::of(Sampler::Prioritized(P_SAMPLER)).unwrap();
    let leaves = (0..P_CAPACITY)
        .map(|index| {
            let ticket = if index < P_INSERTED - P_CAPACITY {
                index + P_CAPACITY
            } else {
                index
            };
            let updated = P_UPDATE_KEYS.iter().position(|&k| k == ticket);
            let raw = match updated {
                Some(u) => P_UPDATE_PRIORITIES[u],
                None if ticket >= P_CAPACITY => P_FIRST_MAX,
                None => p_priority(ticket),
            };
            (tree.tag(ticket), tree.quantize(sampler, raw), raw.to_bits())
        })
        .collect();
    (leaves, 7.5f64.to_bits())
}

fn test_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shmreplay-corrupt-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The directory one property test rewrites its victim segment in.
struct Victim {
    dir: PathBuf,
    path: PathBuf,
}

impl Victim {
    fn new(tag: &str) -> Victim {
        let dir = test_dir(tag);
        let path = dir.join("shmreplay.victim");
        Victim { dir, path }
    }

    /// A fresh file each time: earlier mappings are never truncated under their handles.
    fn write(&self, data: &[u8]) {
        let _ = std::fs::remove_file(&self.path);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&self.path)
            .unwrap();
        file.write_all(data).unwrap();
    }

    fn inspect(&self) -> ReplayBuffer {
        ReplayBuffer::inspect("victim", Some(&self.dir)).unwrap()
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Usable,
    Corrupt,
}

/// Everything a user does with a handle works, or fails with its documented error. With
/// `exact`, the control words, handle table and slots are the pristine ones, so the size must
/// be exactly the number of slots holding a record.
fn exercise(buffer: &ReplayBuffer, full: bool, exact: bool) -> Result<(), TestCaseError> {
    let capacity = buffer.capacity();
    let n = buffer.len();
    prop_assert!(n <= capacity);
    let stats = buffer.stats();
    prop_assert_eq!(stats.capacity, capacity);
    prop_assert_eq!(stats.size, n);
    let _ = buffer.processes();
    let _ = buffer.info();
    // A prioritized buffer: a forged (sealed) alpha or eps can make `(p + eps)^alpha` too large
    // for the tree, which inserts and updates refuse with their documented error.
    let prioritized = matches!(buffer.sampler(), Sampler::Prioritized(_));
    let too_large =
        |m: &str| prioritized && m.contains("above the largest value this buffer holds");
    prop_assert_eq!(buffer.priority_stats().is_some(), prioritized);
    if exact || !prioritized {
        // The tree is the pristine one (or there is none).
        prop_assert_eq!(buffer.priority_tree_is_exact(), prioritized.then_some(true));
    }
    let sizes: Vec<usize> = buffer.schema().fields().iter().map(|f| f.bytes).collect();
    let mut row: Vec<Vec<u8>> = sizes.iter().map(|&b| vec![0u8; b]).collect();
    // What `read` finds in each slot: the ticket of its record, or none.
    let mut held = Vec::new();
    for slot in 0..capacity.min(4096) {
        let mut out: Vec<&mut [u8]> = row.iter_mut().map(|v| v.as_mut_slice()).collect();
        match buffer.read(slot, &mut out) {
            Ok(ticket) => held.push(ticket),
            Err(e) => return Err(TestCaseError::fail(format!("read({slot}): {e}"))),
        }
    }
    let holding = held.iter().flatten().count() as u64;
    if exact {
        prop_assert_eq!(n, holding, "len() against the slots holding a record");
    }
    if !full {
        return Ok(());
    }
    let mut batch: Vec<Vec<u8>> = sizes.iter().map(|&b| vec![0u8; 4 * b]).collect();
    let mut out: Vec<&mut [u8]> = batch.iter_mut().map(|v| v.as_mut_slice()).collect();
    let (mut index, mut key) = ([0u64; 4], [0u64; 4]);
    match buffer.sample_into(&mut out, &mut index, &mut key) {
        Ok(()) => {
            for (&i, &k) in index.iter().zip(&key) {
                prop_assert!(i < capacity);
                if let Some(&found) = held.get(i as usize) {
                    prop_assert_eq!(
                        found,
                        Some(k),
                        "sampled slot {} is not what read() found",
                        i
                    );
                }
            }
        }
        // Forged control or handle words may hide records from a sampler (a cursor of 0, a
        // size of 0); intact ones may not.
        Err(Error::Empty) => prop_assert!(!exact || holding == 0, "Empty with {} records", holding),
        Err(e) => return Err(TestCaseError::fail(format!("sample: {e}"))),
    }
    if prioritized {
        exercise_priorities(buffer, &held, holding, exact)?;
    }
    let columns: Vec<&[u8]> = row.iter().map(|v| v.as_slice()).collect();
    match buffer.push(&columns) {
        Ok(()) => {}
        // A forged insert counter can be exhausted.
        Err(Error::InvalidArgument(m)) if m.contains("exhausted") || too_large(&m) => {}
        Err(e) => return Err(TestCaseError::fail(format!("push: {e}"))),
    }
    if prioritized && exact {
        prop_assert_eq!(buffer.priority_tree_is_exact(), Some(true), "after a push");
    }
    let after = buffer.stats();
    prop_assert!(after.size <= capacity);
    Ok(())
}

/// The prioritized part of [`exercise`] (`held`: what `read` found in each slot): sampling by
/// priority finds what `read` finds, `priorities` agrees with it, updates apply or count as
/// stale, and the tree stays exact where it was.
fn exercise_priorities(
    buffer: &ReplayBuffer,
    held: &[Option<u64>],
    holding: u64,
    exact: bool,
) -> Result<(), TestCaseError> {
    let capacity = buffer.capacity();
    let drawn = match sample_prioritized(buffer, 4) {
        Ok(drawn) => drawn,
        Err(Error::Empty) => {
            prop_assert!(!exact || holding == 0, "Empty with {} records", holding);
            return Ok(());
        }
        Err(e) => return Err(TestCaseError::fail(format!("sample by priority: {e}"))),
    };
    drawn.check()?;
    for (&i, &k) in drawn.index.iter().zip(&drawn.key) {
        prop_assert!(i < capacity);
        if let Some(&found) = held.get(i as usize) {
            prop_assert_eq!(
                found,
                Some(k),
                "slot {} drawn by priority is not what read() found",
                i
            );
        }
    }
    let mut now = vec![0f64; drawn.key.len()];
    if let Err(e) = buffer.priorities(&drawn.key, &mut now) {
        return Err(TestCaseError::fail(format!("priorities: {e}")));
    }
    if exact && buffer.priority_stats().is_some_and(|s| s.total > 0.0) {
        for (row, (a, b)) in now.iter().zip(&drawn.priority).enumerate() {
            prop_assert_eq!(a.to_bits(), b.to_bits(), "priority of row {}", row);
        }
    }
    let before = buffer.stats().stale_updates;
    let mut distinct = drawn.key.clone();
    distinct.sort_unstable();
    distinct.dedup();
    match buffer.update_priorities(&drawn.key, &[0.5; 4], &mut NoBlocking) {
        Ok(applied) => {
            prop_assert!(applied <= distinct.len());
            let stale = buffer.stats().stale_updates.wrapping_sub(before);
            prop_assert_eq!(stale, (distinct.len() - applied) as u64, "stale updates");
        }
        Err(Error::InvalidArgument(m))
            if m.contains("above the largest value this buffer holds") => {}
        Err(e) => return Err(TestCaseError::fail(format!("update_priorities: {e}"))),
    }
    if exact {
        prop_assert_eq!(
            buffer.priority_tree_is_exact(),
            Some(true),
            "after an update"
        );
    }
    Ok(())
}

/// Writes `data` as the victim, inspects and attaches it: both must agree, fail only with
/// `Corrupt` naming the file, and give a usable buffer (see [`exercise`] for `exact`).
fn outcome(victim: &Victim, data: &[u8], exact: bool) -> Result<Outcome, TestCaseError> {
    victim.write(data);
    let mut seen = Vec::new();
    for attach in [false, true] {
        let opened = if attach {
            ReplayBuffer::attach("victim", Some(&victim.dir))
        } else {
            ReplayBuffer::inspect("victim", Some(&victim.dir))
        };
        let got = match opened {
            Ok(buffer) => {
                exercise(&buffer, attach, exact)?;
                Outcome::Usable
            }
            Err(e @ Error::Corrupt { .. }) => {
                let Error::Corrupt { path, .. } = &e else {
                    unreachable!()
                };
                prop_assert_eq!(path, &victim.path);
                prop_assert!(e.to_string().contains(&*victim.path.to_string_lossy()));
                Outcome::Corrupt
            }
            Err(e) => {
                return Err(TestCaseError::fail(format!(
                    "attach={attach}: unexpected error {e:?}"
                )))
            }
        };
        seen.push(got);
    }
    prop_assert_eq!(seen[0], seen[1], "inspect and attach disagree");
    Ok(seen[0])
}

fn boundary_or_any() -> impl Strategy<Value = u64> {
    prop_oneof![any::<u64>(), prop::sample::select(BOUNDARIES.to_vec())]
}

/// A forged value for a word: anything, a boundary, or a small change of what it held.
#[derive(Clone, Copy, Debug)]
enum Forged {
    Value(u64),
    Nudge(i64),
}

impl Forged {
    fn apply(self, original: u64) -> u64 {
        match self {
            Forged::Value(v) => v,
            Forged::Nudge(d) => original.wrapping_add(d as u64),
        }
    }
}

fn forged() -> impl Strategy<Value = Forged> {
    prop_oneof![
        boundary_or_any().prop_map(Forged::Value),
        prop_oneof![-4096i64..4096, -8i64..8].prop_map(Forged::Nudge),
    ]
}

/// Checks every mirrored constant against a real segment of shape `(capacity, schema)` and
/// sampler `sampler` made by this process, whose data is `data`.
fn check_mirror(
    data: &[u8],
    capacity: u64,
    schema: &Schema,
    sampler: Sampler,
    buffer: &ReplayBuffer,
) -> Mirror {
    let text = schema.encode();
    let m = Mirror::new(
        capacity,
        schema.record_bytes() as u64,
        text.len() as u64,
        SamplerWords::of(sampler),
    )
    .expect("a real shape has a layout");
    let shape = format!(
        "capacity {capacity}, {} record bytes, {sampler:?}",
        schema.record_bytes()
    );
    assert_eq!(word(data, H_MAGIC), MAGIC, "H_MAGIC ({shape})");
    assert_eq!(word(data, H_VERSION), LAYOUT_VERSION, "H_VERSION ({shape})");
    assert_eq!(word(data, H_READY), READY, "H_READY ({shape})");
    assert_eq!(word(data, H_KIND), KIND_RING, "H_KIND ({shape})");
    assert_eq!(
        word(data, H_FEATURES),
        if sampler == Sampler::Uniform {
            0
        } else {
            FEATURE_PRIORITIZED
        },
        "H_FEATURES ({shape})"
    );
    for (offset, value) in m.header_words() {
        assert_eq!(
            word(data, offset),
            value,
            "header word at byte {offset} ({shape}): the mirror of layout/mod.rs is stale"
        );
    }
    for i in 0..m.sections.len() {
        assert_eq!(
            read_section(data, i),
            m.sections[i],
            "section {i} ({shape})"
        );
    }
    // Nothing else in the header: unused directory entries and padding are zero, so a new
    // header word or section shows up here.
    let mut known = vec![
        H_MAGIC,
        H_VERSION,
        H_READY,
        H_CHECKSUM,
        H_KIND,
        H_SCHEMA_HASH,
        H_CREATOR,
        H_CREATOR_NAMESPACE,
        H_CREATED_UNIX_NS,
    ];
    known.extend(m.header_words().iter().map(|&(offset, _)| offset));
    for offset in (0..HEADER_END).step_by(8) {
        if !known.contains(&offset) {
            assert_eq!(
                word(data, offset),
                0,
                "header word at byte {offset} is not zero ({shape}): a new header word or \
                 section? Update the mirror from layout/mod.rs"
            );
        }
    }
    assert_eq!(
        &data[SCHEMA_TEXT..SCHEMA_TEXT + text.len()],
        text.as_bytes()
    );
    assert_eq!(
        word(data, H_SCHEMA_HASH),
        fnv1a(text.as_bytes()),
        "H_SCHEMA_HASH"
    );
    assert_eq!(
        word(data, H_CHECKSUM),
        checksum(data, text.as_bytes()),
        "H_CHECKSUM: the checksum no longer covers H_KIND..HEADER_END and the schema text"
    );
    let pid = u64::from(std::process::id());
    assert_eq!(
        word(data, H_CREATOR) & 0xffff_ffff,
        pid,
        "H_CREATOR holds the creator's pid"
    );
    {
        use std::os::unix::fs::MetadataExt;
        if let Ok(ns) = std::fs::metadata("/proc/self/ns/pid") {
            assert_eq!(
                word(data, H_CREATOR_NAMESPACE),
                ns.ino(),
                "H_CREATOR_NAMESPACE"
            );
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let created = word(data, H_CREATED_UNIX_NS);
    assert!(
        created <= now && now - created < 3_600_000_000_000,
        "H_CREATED_UNIX_NS {created} is not a recent time ({now})"
    );
    // The public API agrees.
    assert_eq!(data.len() as u64, m.total, "file size ({shape})");
    assert_eq!(buffer.segment_bytes(), m.total);
    assert_eq!(buffer.capacity(), capacity);
    assert_eq!(buffer.record_bytes() as u64, m.record_bytes);
    assert_eq!(
        SamplerWords::of(buffer.sampler()),
        m.sampler,
        "sampler ({shape})"
    );
    // The priority section: where it is, how long, and the fixed point it holds.
    match (&m.tree, m.priority()) {
        (Some(tree), Some(offset)) => {
            assert_eq!(offset % 4096, 0, "the priority section starts on a page");
            assert_eq!(
                offset,
                m.slots_end().next_multiple_of(4096),
                "the priority section follows the slots"
            );
            let one = (1u64 << tree.fraction_bits) as f64;
            assert_eq!(
                buffer.priority_range(),
                Some((tree.q_max() as f64 / one, 1.0 / one)),
                "the fixed point of priority::Scale ({shape})"
            );
        }
        (None, None) => {
            assert_eq!(buffer.priority_range(), None);
            assert_eq!(buffer.priority_stats(), None);
        }
        _ => unreachable!("a mirror has a tree exactly when it has a priority section"),
    }
    // The creator's handle entry (entry 0) and the control words.
    let entry = m.entry(0);
    assert_eq!(
        word(data, entry + E_OWNER) & 0xffff_ffff,
        pid,
        "E_OWNER of entry 0"
    );
    assert_eq!(
        word(data, entry + E_NAMESPACE),
        word(data, H_CREATOR_NAMESPACE),
        "E_NAMESPACE"
    );
    assert_eq!(
        word(data, m.control() + C_ENTRIES_USED),
        1,
        "C_ENTRIES_USED"
    );
    m
}

/// Checks the priority section of `data` byte for byte against the mirror's image of a tree
/// with leaves `leaves` (`(tag, q, raw bits)` of each slot) and head word `max_raw`.
fn check_tree(data: &[u8], m: &Mirror, leaves: &[(u64, u64, u64)], max_raw: u64, shape: &str) {
    let tree = m.tree.as_ref().expect("a prioritized mirror");
    let offset = m.priority().unwrap();
    let section = &data[offset..offset + tree.bytes];
    let image = tree.image(leaves, max_raw);
    if let Some(at) = (0..tree.bytes)
        .step_by(8)
        .find(|&at| section[at..at + 8] != image[at..at + 8])
    {
        panic!(
            "priority section word at byte {at} ({}) is {}, the mirror of protocol/priority.rs \
             expects {} ({shape})",
            tree.region(at),
            word(section, at),
            word(&image, at)
        );
    }
}

#[test]
fn pristine_copy_attaches_and_matches_the_mirror() {
    assert_eq!(
        LAYOUT_VERSION, MIRRORED_LAYOUT_VERSION,
        "the segment layout changed: update the mirror at the top of this file from \
         src/layout/mod.rs and src/protocol/handles.rs"
    );
    assert_eq!(
        Counter::ALL.len(),
        COUNTERS,
        "the per-entry counters changed: update the mirror of src/protocol/handles.rs"
    );
    let p = pristine();
    let m = &p.mirror;
    let data = &p.data;
    let victim = Victim::new("sanity");
    victim.write(data);
    let buffer = victim.inspect();
    assert_eq!(
        check_mirror(data, CAPACITY, &schema(), Sampler::Uniform, &buffer),
        *m
    );

    // Control words: the cursor is the next ticket.
    assert_eq!(word(data, m.control() + C_CURSOR), NEXT_TICKET, "C_CURSOR");
    // Entry 0: no insert in progress, every slot first filled through it, its counters.
    let entry = m.entry(0);
    assert_eq!(word(data, entry + E_INTENT), 0, "E_INTENT");
    assert_eq!(word(data, entry + E_FIRSTS), CAPACITY, "E_FIRSTS");
    let stats = buffer.stats();
    // All but `attached` (the creator held it; this inspecting handle does not).
    let (items, created) = (stats.items(), p.stats.items());
    assert_eq!(
        items.len(),
        2 + COUNTERS + 2,
        "capacity, size, the counters, attached, deletes"
    );
    assert_eq!(items[..9], created[..9]);
    assert_eq!(items[9], ("attached", 0));
    assert_eq!(summed(stats), summed(p.stats));
    for (counter, expected) in [
        (Counter::Inserts, INSERTED),
        (Counter::Samples, SAMPLED),
        (Counter::Retries, 0),
        (Counter::Recovered, 0),
        (Counter::Superseded, 0),
        (Counter::Lost, 0),
        (Counter::StaleUpdates, 0),
        (Counter::InsertWaitNs, 0),
        (Counter::SampleWaitNs, 0),
    ] {
        assert_eq!(
            word(data, entry + counter_offset(counter)),
            expected,
            "{counter:?} word"
        );
    }
    assert_eq!(
        (stats.inserts, stats.samples, stats.size),
        (INSERTED, SAMPLED, CAPACITY)
    );
    assert_eq!(
        (
            E_COUNTERS + 8 * Counter::ALL.len(),
            E_TREE_CHANGES,
            E_QUEUE_CLAIM
        ),
        (104, 104, 112),
        "an entry's words: 4, then the 9 counters, then the tree changes in flight, then a \
         queue's claim and the waiters"
    );
    // A uniform ring never changes a tree, nor claims queue tickets: those words stay 0.
    assert!(
        data[entry + E_COUNTERS + 8 * COUNTERS..m.handles() + MAX_HANDLES * ENTRY_BYTES]
            .iter()
            .all(|&b| b == 0),
        "only entry 0 was ever used, and only its first 13 words"
    );
    // Slots: version word (the protocol's encoding), then the record.
    let obs = schema().fields()[0].offset;
    for index in 0..CAPACITY as usize {
        let ticket = if (index as u64) < INSERTED - CAPACITY {
            index as u64 + CAPACITY
        } else {
            index as u64
        };
        let expected = if ticket < CAPACITY {
            slot::committed_first(ticket, 0)
        } else {
            slot::committed(ticket)
        };
        let at = m.slot(index);
        assert_eq!(word(data, at), expected, "version word of slot {index}");
        let record = at + m.record_in_slot as usize + obs;
        assert_eq!(
            &data[record..record + 3],
            &[ticket as u8; 3],
            "record of slot {index}"
        );
    }
    drop(buffer);

    // It opens, is usable, and the forger reproduces it exactly.
    assert_eq!(outcome(&victim, data, true).unwrap(), Outcome::Usable);
    victim.write(data);
    let buffer = ReplayBuffer::attach("victim", Some(&victim.dir)).unwrap();
    assert_eq!(buffer.len(), CAPACITY);
    assert_eq!(buffer.stats().attached, 1);
    assert_eq!(forge(data, CAPACITY, None, m.record_bytes, 0), *data);
    drop(buffer);

    // Other shapes: one slot, large (cache-line aligned) records, a long schema text.
    let dir = test_dir("shapes");
    let long_names: Vec<(String, DType, Vec<usize>)> = (0..40)
        .map(|i| {
            (
                format!("field_with_a_long_name_{i:02}"),
                DType::F64,
                vec![3, 2],
            )
        })
        .collect();
    for (k, (capacity, schema)) in [
        (1, Schema::new(&[("x", DType::U8, vec![])]).unwrap()),
        (
            7,
            Schema::new(&[("frame", DType::U8, vec![2000]), ("r", DType::F32, vec![])]).unwrap(),
        ),
        (3, Schema::new(&long_names).unwrap()),
        (4096, schema()),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("shape{k}");
        let buffer = ReplayBuffer::create(&name, Some(&dir), capacity, schema.clone()).unwrap();
        let data = std::fs::read(buffer.path()).unwrap();
        let m = check_mirror(&data, capacity, &schema, Sampler::Uniform, &buffer);
        assert_eq!(m.slots() % 4096, 0);
        assert_eq!(
            m.record_in_slot,
            if m.record_bytes >= 1024 { 64 } else { 8 }
        );
        assert_eq!(
            forge(&data, capacity, None, m.record_bytes, 0),
            data,
            "forge ({name})"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The prioritized pristine segment against the mirror: header and sampler words, the
/// priority section byte for byte (head, leaves, level 0, every node's sum and minimum), the
/// creator's entry (counters, tree changes in flight); then prioritized segments of other shapes and
/// parameters, fresh and filled (trees of one to five levels, and one whose fixed point has
/// fewer than 40 bits).
#[test]
fn prioritized_pristine_copy_attaches_and_matches_the_mirror() {
    let p = prioritized_pristine();
    let m = &p.mirror;
    let data = &p.data;
    let victim = p.victim("sanity");
    victim.write(data);
    let buffer = victim.inspect();
    let sampler = Sampler::Prioritized(P_SAMPLER);
    assert_eq!(
        check_mirror(data, P_CAPACITY, &schema(), sampler, &buffer),
        *m
    );
    assert_eq!(buffer.sampler(), sampler);
    // The mirror itself, by hand: 40 leaves padded to 48; level 0; 3 nodes and the root, each
    // level's sums and minima padded to 16 words.
    let tree = m.tree.as_ref().unwrap();
    assert_eq!(
        (tree.levels.len(), tree.bytes),
        (2, 128 + 48 * 16 + 48 * 8 + 2 * 128 + 2 * 128)
    );
    assert_eq!((tree.q_bits, tree.fraction_bits), (40, 20));
    assert_eq!(m.sections.len(), 4);
    let (leaves, max_raw) = prioritized_pristine_leaves(tree);
    check_tree(
        data,
        m,
        &leaves,
        max_raw,
        "the prioritized pristine segment",
    );
    assert_eq!(buffer.priority_tree_is_exact(), Some(true));
    let total: u64 = leaves.iter().map(|l| l.1).sum();
    assert_eq!(
        buffer.priority_stats(),
        Some(PriorityStats {
            total: total as f64 / (1u64 << tree.fraction_bits) as f64,
            max_priority: 7.5,
        })
    );
    // The raw priorities the API reports: the records' own; NaN for the overwritten key 0.
    let keys: Vec<u64> = (P_INSERTED - P_CAPACITY..P_INSERTED).chain([0]).collect();
    let mut raw = vec![0f64; keys.len()];
    buffer.priorities(&keys, &mut raw).unwrap();
    for (&key, &got) in keys.iter().zip(&raw) {
        if key < P_INSERTED - P_CAPACITY {
            assert!(got.is_nan(), "key {key} was overwritten: {got}");
        } else {
            let leaf = leaves[(key % P_CAPACITY) as usize];
            assert_eq!(got.to_bits(), leaf.2, "raw priority of key {key}");
        }
    }

    // Control words and entry 0, as for the uniform segment, plus the stale update, and no
    // tree change in flight.
    assert_eq!(word(data, m.control() + C_CURSOR), P_INSERTED, "C_CURSOR");
    let entry = m.entry(0);
    assert_eq!(word(data, entry + E_INTENT), 0, "E_INTENT");
    assert_eq!(word(data, entry + E_FIRSTS), P_CAPACITY, "E_FIRSTS");
    let stats = buffer.stats();
    let (items, created) = (stats.items(), p.stats.items());
    assert_eq!(items[..9], created[..9]);
    assert_eq!(items[9], ("attached", 0));
    for (counter, expected) in [
        (Counter::Inserts, P_INSERTED),
        (Counter::Samples, P_SAMPLED),
        (Counter::Retries, 0),
        (Counter::Recovered, 0),
        (Counter::Superseded, 0),
        (Counter::Lost, 0),
        (Counter::StaleUpdates, 1),
    ] {
        assert_eq!(
            word(data, entry + counter_offset(counter)),
            expected,
            "{counter:?} word"
        );
    }
    assert_eq!(
        (
            stats.inserts,
            stats.samples,
            stats.stale_updates,
            stats.size
        ),
        (P_INSERTED, P_SAMPLED, 1, P_CAPACITY)
    );
    assert_eq!(word(data, entry + E_TREE_CHANGES), 0, "E_TREE_CHANGES");
    assert!(
        data[entry + ENTRY_WORDS_END..m.handles() + MAX_HANDLES * ENTRY_BYTES]
            .iter()
            .all(|&b| b == 0),
        "only entry 0 was ever used, and only its first 13 words"
    );
    // Slots, as for the uniform segment; then zeros up to the page the tree starts on.
    let obs = schema().fields()[0].offset;
    for index in 0..P_CAPACITY as usize {
        let ticket = if (index as u64) < P_INSERTED - P_CAPACITY {
            index as u64 + P_CAPACITY
        } else {
            index as u64
        };
        let expected = if ticket < P_CAPACITY {
            slot::committed_first(ticket, 0)
        } else {
            slot::committed(ticket)
        };
        let at = m.slot(index);
        assert_eq!(word(data, at), expected, "version word of slot {index}");
        let record = at + m.record_in_slot as usize + obs;
        assert_eq!(
            &data[record..record + 3],
            &[ticket as u8; 3],
            "record of slot {index}"
        );
    }
    assert!(data[m.slots_end()..m.priority().unwrap()]
        .iter()
        .all(|&b| b == 0));
    drop(buffer);

    // It opens, is usable, and the forger reproduces it exactly.
    assert_eq!(outcome(&victim, data, true).unwrap(), Outcome::Usable);
    victim.write(data);
    let buffer = ReplayBuffer::attach("victim", Some(&victim.dir)).unwrap();
    assert_eq!(buffer.len(), P_CAPACITY);
    assert_eq!(buffer.sampler(), sampler);
    assert_eq!(buffer.stats().attached, 1);
    assert_eq!(forge(data, P_CAPACITY, None, m.record_bytes, 0), *data);
    drop(buffer);

    // Other shapes and parameters. Filled ones hold record k with raw priority
    // `(7k mod 13) / 2`: some 0 (with eps 0, never drawn), the largest 6.
    let dir = test_dir("p-shapes");
    let long_names: Vec<(String, DType, Vec<usize>)> = (0..40)
        .map(|i| {
            (
                format!("field_with_a_long_name_{i:02}"),
                DType::F64,
                vec![3, 2],
            )
        })
        .collect();
    let params = |alpha, eps, stratified| {
        Sampler::Prioritized(Prioritized {
            alpha,
            eps,
            stratified,
        })
    };
    let x = Schema::new(&[("x", DType::U8, vec![])]).unwrap();
    let shapes = [
        // (capacity, schema, sampler, filled, tree levels)
        (
            1,
            x.clone(),
            Sampler::Prioritized(Prioritized::default()),
            false,
            1,
        ),
        (
            7,
            Schema::new(&[("frame", DType::U8, vec![2000]), ("r", DType::F32, vec![])]).unwrap(),
            params(1.0, 0.0, false),
            false,
            1,
        ),
        (
            3,
            Schema::new(&long_names).unwrap(),
            params(0.0, 0.5, true),
            false,
            1,
        ),
        (
            16,
            schema(),
            Sampler::Prioritized(Prioritized::default()),
            true,
            1,
        ),
        (17, schema(), params(1.0, 0.0, true), true, 2),
        (257, schema(), params(0.5, 0.01, false), true, 3),
        (4097, schema(), params(0.6, 1e-6, true), true, 4),
        (65537, schema(), params(0.9, 0.0, false), true, 5),
        // 2^22 + 1 leaves: 23 bits of capacity leave 39 for `q`.
        ((1 << 22) + 1, x, params(0.6, 1e-6, true), false, 6),
    ];
    for (k, (capacity, schema, sampler, filled, depth)) in shapes.into_iter().enumerate() {
        let name = format!("shape{k}");
        let buffer = ReplayBuffer::builder(&name)
            .dir(&dir)
            .capacity(capacity)
            .schema(schema.clone())
            .sampler(sampler)
            .create()
            .unwrap();
        let tree = TreeMirror::new(capacity as usize);
        let words = SamplerWords::of(sampler).unwrap();
        let mut leaves = vec![(0, 0, 0); capacity as usize];
        let mut max_raw = 0;
        if filled {
            let raw: Vec<f64> = (0..capacity).map(|k| ((7 * k) % 13) as f64 / 2.0).collect();
            extend_prioritized(&buffer, 0..capacity, Some(&raw));
            for (k, &p) in raw.iter().enumerate() {
                leaves[k] = (tree.tag(k as u64), tree.quantize(words, p), p.to_bits());
            }
            max_raw = 6.0f64.to_bits();
        }
        let data = std::fs::read(buffer.path()).unwrap();
        let shape = format!("{name}: capacity {capacity}, {sampler:?}");
        let m = check_mirror(&data, capacity, &schema, sampler, &buffer);
        assert_eq!(m.tree.as_ref(), Some(&tree));
        assert_eq!(tree.levels.len(), depth, "{shape}");
        assert_eq!(tree.q_bits, if depth == 6 { 39 } else { 40 }, "{shape}");
        if capacity > 1 << 20 {
            // The fixed point is what this shape is for (checked by `check_mirror`).
            std::fs::remove_file(buffer.path()).unwrap();
            continue;
        }
        check_tree(&data, &m, &leaves, max_raw, &shape);
        assert_eq!(buffer.priority_tree_is_exact(), Some(true), "{shape}");
        let entry = m.entry(0);
        assert_eq!(
            word(&data, entry + E_TREE_CHANGES),
            0,
            "no tree change in flight in entry 0 ({shape})"
        );
        assert_eq!(
            forge(&data, capacity, None, m.record_bytes, 0),
            data,
            "forge ({shape})"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The pristine copy with every handle entry used and every per-entry counter (and size count)
/// near `u64::MAX`: the sums in `stats()` and `len()` wrap, inserting and sampling keep
/// counting past the overflow, and nothing panics, in debug builds too.
#[test]
fn counters_near_overflow_do_not_panic() {
    let p = pristine();
    let m = &p.mirror;
    let victim = Victim::new("overflow");
    let mut data = p.data.clone();
    put(&mut data, m.control() + C_ENTRIES_USED, MAX_HANDLES as u64);
    let near = |e: usize, c: usize| u64::MAX - (e * 7 + c) as u64;
    let mut sums = [0u64; Counter::ALL.len()];
    for e in 0..MAX_HANDLES {
        let entry = m.entry(e);
        put(&mut data, entry + E_FIRSTS, u64::MAX - e as u64);
        for (c, counter) in Counter::ALL.into_iter().enumerate() {
            put(&mut data, entry + counter_offset(counter), near(e, c));
            sums[c] = sums[c].wrapping_add(near(e, c));
        }
    }
    victim.write(&data);
    let summed = |s: Stats| {
        [
            s.inserts,
            s.samples,
            s.retries,
            s.recovered,
            s.superseded,
            s.lost,
            s.stale_updates,
            s.insert_wait_ns,
            s.sample_wait_ns,
        ]
    };
    {
        let buffer = victim.inspect();
        assert_eq!(summed(buffer.stats()), sums);
        assert!(buffer.len() <= CAPACITY);
        let _ = buffer.info();
    }
    let buffer = ReplayBuffer::attach("victim", Some(&victim.dir)).unwrap();
    exercise(&buffer, true, false).unwrap();
    // Entry 0's inserts and samples are 7 and 6 below u64::MAX: push and sample past it.
    let [obs, act, rew] = columns(100..101);
    let sizes: Vec<usize> = schema().fields().iter().map(|f| f.bytes).collect();
    let mut batch: Vec<Vec<u8>> = sizes.iter().map(|&b| vec![0u8; 4 * b]).collect();
    let before = buffer.stats();
    for _ in 0..10 {
        buffer.push(&[&obs, &act, &rew]).unwrap();
        let mut out: Vec<&mut [u8]> = batch.iter_mut().map(|v| v.as_mut_slice()).collect();
        buffer
            .sample_into(&mut out, &mut [0; 4], &mut [0; 4])
            .unwrap();
    }
    let after = buffer.stats();
    assert_eq!(after.inserts, before.inserts.wrapping_add(10));
    assert_eq!(after.samples, before.samples.wrapping_add(40));
    assert!(after.size <= CAPACITY);
}

/// An entry whose size count `firsts` is `u64::MAX` and a slot that was never written: the
/// first fill counts with `firsts + 1`.
#[test]
fn size_count_near_overflow_on_a_first_fill_does_not_panic() {
    let p = pristine();
    let m = &p.mirror;
    let victim = Victim::new("firsts");
    let mut data = p.data.clone();
    put(&mut data, m.entry(0) + E_FIRSTS, u64::MAX);
    put(&mut data, m.slot(NEXT_SLOT), 0);
    victim.write(&data);
    let buffer = ReplayBuffer::attach("victim", Some(&victim.dir)).unwrap();
    let [obs, act, rew] = columns(100..101);
    buffer.push(&[&obs, &act, &rew]).unwrap();
    assert!(buffer.len() <= CAPACITY);
    let _ = buffer.stats();
}

/// Entry `e` as if its writer died between the first commit of the ticket whose slot the next
/// push takes and that commit's count, with its size count `firsts` at `u64::MAX`; then attach
/// and push. Whoever settles that count counts with `firsts + 1`.
fn settle_near_overflow(e: usize) {
    let p = pristine();
    let m = &p.mirror;
    let victim = Victim::new(&format!("settle{e}"));
    let ticket = NEXT_TICKET - CAPACITY;
    let mut data = p.data.clone();
    put(&mut data, m.control() + C_ENTRIES_USED, e as u64 + 1);
    put(&mut data, m.entry(e) + E_FIRSTS, u64::MAX);
    put(
        &mut data,
        m.entry(e) + E_INTENT,
        intent_word(ticket, u64::MAX),
    );
    put(
        &mut data,
        m.slot(NEXT_SLOT),
        slot::committed_first(ticket, e),
    );
    victim.write(&data);
    let buffer = ReplayBuffer::attach("victim", Some(&victim.dir)).unwrap();
    let [obs, act, rew] = columns(100..101);
    buffer.push(&[&obs, &act, &rew]).unwrap();
    assert!(buffer.len() <= CAPACITY);
    let _ = buffer.stats();
}

/// Settled by the next owner of the entry (the attacher takes entry 0).
#[test]
fn size_count_near_overflow_settled_by_the_next_owner_does_not_panic() {
    settle_near_overflow(0);
}

/// Settled by the writer that replaces the slot's first-commit word.
#[test]
fn size_count_near_overflow_settled_by_a_writer_does_not_panic() {
    settle_near_overflow(5);
}

/// A truncated copy is refused.
fn check_truncated(p: &Pristine, len: usize) -> Result<(), TestCaseError> {
    let victim = p.victim("truncated");
    prop_assert_eq!(outcome(&victim, &p.data[..len], true)?, Outcome::Corrupt);
    Ok(())
}

/// An extended copy is refused.
fn check_extended(p: &Pristine, extra: &[u8]) -> Result<(), TestCaseError> {
    let victim = p.victim("extended");
    let mut data = p.data.clone();
    data.extend_from_slice(extra);
    prop_assert_eq!(outcome(&victim, &data, true)?, Outcome::Corrupt);
    Ok(())
}

/// Random bytes written at `writes`: a changed header or schema byte is refused, anything else
/// opens and works.
fn check_random_bytes(p: &Pristine, writes: &[(usize, u8)]) -> Result<(), TestCaseError> {
    let m = &p.mirror;
    let victim = p.victim("bytes");
    let mut data = p.data.clone();
    for &(offset, value) in writes {
        data[offset] = value;
    }
    let changed: Vec<usize> = writes
        .iter()
        .map(|w| w.0)
        .filter(|&o| data[o] != p.data[o])
        .collect();
    let validated = changed.iter().any(|&o| {
        o < HEADER_END || (SCHEMA_TEXT..SCHEMA_TEXT + m.schema_len as usize).contains(&o)
    });
    // The padding between the slots and the priority section (if any) is nothing at all.
    let gap = m.slots_end()..m.priority().unwrap_or(0);
    let exact = changed.iter().all(|&o| o < m.control() || gap.contains(&o));
    let got = outcome(&victim, &data, exact)?;
    if validated {
        prop_assert_eq!(got, Outcome::Corrupt, "changed {:?}", changed);
    } else {
        prop_assert_eq!(got, Outcome::Usable, "changed {:?}", changed);
    }
    Ok(())
}

/// Header words `attach` does not check: who created the segment and when, unused section
/// directory entries, the words after the sampler's up to the schema text but the limiter's
/// kind (the limiter's others are read only with a limiter, which no mirrored buffer has) and
/// the padding, and in a
/// uniform buffer alpha, eps and stratified (`read_header` reads them only for a prioritized
/// sampler; `write_header` leaves them 0). Changing them (with the checksum resealed) leaves
/// the segment usable; every other header word is checked, but see [`accepted_sampler_word`].
fn unchecked_when_sealed(offset: usize, m: &Mirror) -> bool {
    [H_CREATOR, H_CREATOR_NAMESPACE, H_CREATED_UNIX_NS].contains(&offset)
        || (directory_entry(m.sections.len())..H_SAMPLER).contains(&offset)
        || ((H_STRATIFIED + 8..HEADER_END).contains(&offset) && offset != H_LIMITER)
        || (m.sampler.is_none() && [H_ALPHA, H_EPS, H_STRATIFIED].contains(&offset))
}

/// Whether `value`, sealed into sampler word `offset` of a prioritized buffer, is accepted:
/// alpha and eps may be any finite number >= 0 (-0.0 included), stratified 0 or 1.
fn accepted_sampler_word(offset: usize, value: u64, m: &Mirror) -> bool {
    m.sampler.is_some()
        && match offset {
            H_ALPHA | H_EPS => valid_parameter(value),
            H_STRATIFIED => value <= 1,
            _ => false,
        }
}

/// Header word `offset` set to `value` (applied to what it held), checksum stale or resealed.
fn check_header_word(
    p: &Pristine,
    offset: usize,
    value: Forged,
    sealed: bool,
) -> Result<(), TestCaseError> {
    let m = &p.mirror;
    let victim = p.victim("words");
    let forged = value.apply(word(&p.data, offset));
    let mut data = p.data.clone();
    put(&mut data, offset, forged);
    if sealed {
        reseal(&mut data);
    }
    let got = outcome(&victim, &data, true)?;
    let accepted =
        sealed && (unchecked_when_sealed(offset, m) || accepted_sampler_word(offset, forged, m));
    if data == p.data || accepted {
        prop_assert_eq!(got, Outcome::Usable);
        // An accepted sampler word is the buffer's sampler from then on.
        if let Some(mut s) = m.sampler {
            match offset {
                H_ALPHA => s.alpha = forged,
                H_EPS => s.eps = forged,
                H_STRATIFIED => s.stratified = forged == 1,
                _ => {}
            }
            prop_assert_eq!(SamplerWords::of(victim.inspect().sampler()), Some(s));
        } else {
            prop_assert_eq!(victim.inspect().sampler(), Sampler::Uniform);
        }
    } else {
        prop_assert_eq!(got, Outcome::Corrupt);
    }
    Ok(())
}

/// Directory entry `entry`'s word `field` forged (to `tag` if `use_tag` and it is the tag),
/// checksum stale or resealed: refused with `Corrupt` unless the entry is unused.
fn check_directory_word(
    p: &Pristine,
    (entry, field): (usize, usize),
    value: Forged,
    tag: Option<[u8; 8]>,
    sealed: bool,
) -> Result<(), TestCaseError> {
    let victim = p.victim("directory");
    let offset = directory_entry(entry) + 8 * field;
    let forged = match tag {
        Some(tag) if field == 0 => u64::from_le_bytes(tag),
        _ => value.apply(word(&p.data, offset)),
    };
    let mut data = p.data.clone();
    put(&mut data, offset, forged);
    if sealed {
        reseal(&mut data);
    }
    let got = outcome(&victim, &data, true)?;
    if data == p.data || (sealed && entry >= p.mirror.sections.len()) {
        prop_assert_eq!(got, Outcome::Usable);
    } else {
        prop_assert_eq!(got, Outcome::Corrupt);
    }
    Ok(())
}

/// The word at byte `index` (a control word, a handle-table word, padding) forged: none is
/// checked by `attach`, so the segment opens, and everything works; counters are summed with
/// wrapping.
fn check_table_word(p: &Pristine, index: usize, value: Forged) -> Result<(), TestCaseError> {
    let m = &p.mirror;
    let victim = p.victim("table");
    let original = word(&p.data, index);
    let forged = value.apply(original);
    let mut data = p.data.clone();
    put(&mut data, index, forged);
    // The entry-0 counter this word is, if any: its sum must move by exactly the change.
    let counter = Counter::ALL
        .into_iter()
        .find(|&c| index == m.entry(0) + counter_offset(c));
    let in_entry = |w: usize| {
        index >= m.handles()
            && index < m.handles() + MAX_HANDLES * ENTRY_BYTES
            && (index - m.handles()) % ENTRY_BYTES == w
    };
    let touches_size = index == m.control() + C_CURSOR
        || index == m.control() + C_ENTRIES_USED
        || in_entry(E_INTENT)
        || in_entry(E_FIRSTS);
    victim.write(&data);
    let stats = victim.inspect().stats();
    if let Some(c) = counter {
        let mut expected = summed(p.stats);
        expected[c as usize] = expected[c as usize].wrapping_add(forged.wrapping_sub(original));
        prop_assert_eq!(summed(stats), expected);
    } else if index != m.control() + C_ENTRIES_USED {
        // (Sums run over the entries up to `C_ENTRIES_USED`: entry 0 only, here.)
        prop_assert_eq!(summed(stats), summed(p.stats));
    }
    prop_assert_eq!(outcome(&victim, &data, !touches_size)?, Outcome::Usable);
    Ok(())
}

/// A header forged for another capacity, sealed: accepted exactly when the file has the size
/// the forged header states, and then with that capacity.
fn check_forged_capacity(
    p: &Pristine,
    capacity: u64,
    size_delta: i64,
) -> Result<(), TestCaseError> {
    let victim = p.victim("capacity");
    let rb = p.mirror.record_bytes;
    let data = forge(&p.data, capacity, None, rb, size_delta);
    let fits = Mirror::new(capacity, rb, p.mirror.schema_len, p.mirror.sampler)
        .is_some_and(|m| m.total == data.len() as u64);
    let got = outcome(&victim, &data, false)?;
    prop_assert_eq!(
        got,
        if fits {
            Outcome::Usable
        } else {
            Outcome::Corrupt
        }
    );
    if fits {
        let buffer = victim.inspect();
        prop_assert_eq!(buffer.capacity(), capacity);
        prop_assert_eq!(buffer.segment_bytes(), data.len() as u64);
        prop_assert_eq!(SamplerWords::of(buffer.sampler()), p.mirror.sampler);
    }
    Ok(())
}

/// A forged `f64` for alpha or eps: special values, or any bits.
fn forged_f64() -> impl Strategy<Value = Forged> {
    let special = prop::sample::select(vec![
        0.0,
        -0.0,
        0.5,
        1.0,
        7.0,
        1e300,
        f64::MAX,
        f64::MIN_POSITIVE,
        5e-324,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::NAN,
        -f64::NAN,
        -1.0,
        -5e-324,
    ]);
    prop_oneof![special, any::<f64>()].prop_map(|v| Forged::Value(v.to_bits()))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn truncated_is_corrupt(len in 0..pristine().data.len()) {
        check_truncated(pristine(), len)?;
    }

    #[test]
    fn extended_is_corrupt(extra in prop::collection::vec(any::<u8>(), 1..9000)) {
        check_extended(pristine(), &extra)?;
    }

    #[test]
    fn foreign_files_are_corrupt(
        body in prop::collection::vec(any::<u8>(), 0..8192),
        heads in 0usize..4,
        version in prop_oneof![Just(LAYOUT_VERSION), 0u64..LAYOUT_VERSION + 2],
    ) {
        let victim = Victim::new("foreign");
        let mut data = body;
        for (i, w) in [MAGIC, version, READY].into_iter().take(heads).enumerate() {
            if data.len() >= 8 * (i + 1) {
                put(&mut data, 8 * i, w);
            }
        }
        prop_assert_eq!(outcome(&victim, &data, true)?, Outcome::Corrupt);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    /// A truncated prioritized copy (in its priority section, too) is refused.
    #[test]
    fn prioritized_truncated_is_corrupt(
        len in prop_oneof![
            0..prioritized_pristine().data.len(),
            prioritized_pristine().mirror.slots_end()..prioritized_pristine().data.len(),
        ],
    ) {
        check_truncated(prioritized_pristine(), len)?;
    }

    #[test]
    fn prioritized_extended_is_corrupt(extra in prop::collection::vec(any::<u8>(), 1..9000)) {
        check_extended(prioritized_pristine(), &extra)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random bytes before the slots: a changed header or schema byte is refused, anything
    /// else (padding, control words, handle table) opens and works.
    #[test]
    fn random_bytes_before_the_slots(
        writes in prop::collection::vec(
            (
                prop_oneof![
                    0..SCHEMA_TEXT + 64,
                    pristine().mirror.control()..pristine().mirror.entry(2),
                    0..pristine().mirror.slots(),
                ],
                any::<u8>(),
            ),
            1..12,
        ),
    ) {
        check_random_bytes(pristine(), &writes)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 800, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random bytes before the slots of a prioritized copy (the sampler words among them), or
    /// in the padding between its slots and its priority section: a changed header or schema
    /// byte is refused, anything else opens and works.
    #[test]
    fn prioritized_random_bytes_before_the_slots(
        writes in prop::collection::vec(
            (
                prop_oneof![
                    0..SCHEMA_TEXT + 64,
                    H_SAMPLER..H_STRATIFIED + 8,
                    prioritized_pristine().mirror.control()..prioritized_pristine().mirror.entry(2),
                    0..prioritized_pristine().mirror.slots(),
                    prioritized_pristine().mirror.slots_end()..prioritized_pristine().mirror.priority().unwrap(),
                ],
                any::<u8>(),
            ),
            1..12,
        ),
    ) {
        check_random_bytes(prioritized_pristine(), &writes)?;
    }

    /// A header word of a prioritized copy set to a random, boundary or nearby value (alpha and
    /// eps also to special and random `f64`s), checksum stale or resealed: the features and the
    /// sampler kind must say prioritized, alpha and eps be finite and >= 0, stratified 0 or 1;
    /// an accepted forged parameter is the buffer's from then on.
    #[test]
    fn prioritized_header_words(
        index in prop_oneof![
            0usize..HEADER_END / 8,
            0usize..H_SECTION_COUNT / 8 + 1,
            H_SAMPLER / 8..H_STRATIFIED / 8 + 1,
            Just(H_FEATURES / 8),
        ],
        value in prop_oneof![forged(), forged_f64(), (0u64..4).prop_map(Forged::Value)],
        sealed in any::<bool>(),
    ) {
        check_header_word(prioritized_pristine(), 8 * index, value, sealed)?;
    }

    /// As `forged_section_directory`, for a prioritized copy (four sections in use).
    #[test]
    fn prioritized_forged_section_directory(
        entry in prop_oneof![0usize..4, Just(3usize), 0usize..MAX_SECTIONS],
        field in 0usize..4,
        value in forged(),
        tag in prop::sample::select(vec![CONTROL_TAG, HANDLES_TAG, SLOTS_TAG, PRIORITY_TAG, *b"priorit\0", *b"slots\0\0\x01", [0; 8]]),
        use_tag in any::<bool>(),
        sealed in any::<bool>(),
    ) {
        let p = prioritized_pristine();
        check_directory_word(p, (entry, field), value, use_tag.then_some(tag), sealed)?;
    }

    /// As `control_and_handle_table_words`, for a prioritized copy, and its entries' counts of
    /// tree changes in flight (the attacher that takes entry 0 recomputes the tree if its count
    /// is not 0: recomputing an exact tree changes nothing).
    #[test]
    fn prioritized_control_and_handle_table_words(
        index in prop_oneof![
            (0usize..2).prop_map(|w| prioritized_pristine().mirror.control() + [C_CURSOR, C_ENTRIES_USED][w]),
            (0usize..3, 0usize..ENTRY_BYTES / 8).prop_map(|(e, w)| prioritized_pristine().mirror.entry(e) + 8 * w),
            (0usize..2).prop_map(|e| prioritized_pristine().mirror.entry(e) + E_TREE_CHANGES),
            ((SCHEMA_TEXT + prioritized_pristine().mirror.schema_len as usize).div_ceil(8)
                ..prioritized_pristine().mirror.slots() / 8)
                .prop_map(|w| 8 * w),
        ],
        value in prop_oneof![forged(), (0u64..2 * P_CAPACITY + 2).prop_map(Forged::Value)],
    ) {
        check_table_word(prioritized_pristine(), index, value)?;
    }

    /// As `forged_capacity`, for a prioritized copy: its priority section follows the forged
    /// capacity's slots and has that capacity's size (the forger zeroes it).
    #[test]
    fn prioritized_forged_capacity(
        capacity in prop_oneof![1u64..512, 512u64..20_000, prop::sample::select(BOUNDARIES.to_vec())],
        size_delta in prop_oneof![Just(0i64), Just(0i64), -4096i64..4096],
    ) {
        check_forged_capacity(prioritized_pristine(), capacity, size_delta)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 800, failure_persistence: None, ..ProptestConfig::default() })]

    /// A header word set to a random, boundary or nearby value, checksum stale or resealed.
    #[test]
    fn header_words(
        index in prop_oneof![0usize..HEADER_END / 8, 0usize..H_SECTION_COUNT / 8 + 1],
        value in forged(),
        sealed in any::<bool>(),
    ) {
        check_header_word(pristine(), 8 * index, value, sealed)?;
    }

    /// A section directory entry's tag, offset, length or version forged (another section's
    /// tag, an offset or length a little or far off, out of the file, overlapping the header),
    /// checksum stale or resealed: refused with `Corrupt` unless the entry is unused.
    #[test]
    fn forged_section_directory(
        entry in prop_oneof![0usize..3, 0usize..MAX_SECTIONS],
        field in 0usize..4,
        value in forged(),
        tag in prop::sample::select(vec![CONTROL_TAG, HANDLES_TAG, SLOTS_TAG, PRIORITY_TAG, *b"slots\0\0\x01", [0; 8]]),
        use_tag in any::<bool>(),
        sealed in any::<bool>(),
    ) {
        check_directory_word(pristine(), (entry, field), value, use_tag.then_some(tag), sealed)?;
    }

    /// A control word, a handle-table word (owner, namespace, intent, size count, counters,
    /// tree changes in flight) or padding set to a random, boundary or nearby value: none is checked by
    /// `attach`, so the segment opens, and everything works; counters are summed with wrapping.
    #[test]
    fn control_and_handle_table_words(
        index in prop_oneof![
            // Control words, then the first entries' words, then anywhere up to the slots.
            (0usize..2).prop_map(|w| pristine().mirror.control() + [C_CURSOR, C_ENTRIES_USED][w]),
            (0usize..3, 0usize..ENTRY_BYTES / 8).prop_map(|(e, w)| pristine().mirror.entry(e) + 8 * w),
            ((SCHEMA_TEXT + pristine().mirror.schema_len as usize).div_ceil(8)
                ..pristine().mirror.slots() / 8)
                .prop_map(|w| 8 * w),
        ],
        value in forged(),
    ) {
        check_table_word(pristine(), index, value)?;
    }

    /// A header forged for another capacity, sealed: accepted exactly when the file has the
    /// size the forged header states, and then with that capacity.
    #[test]
    fn forged_capacity(
        capacity in prop_oneof![1u64..512, prop::sample::select(BOUNDARIES.to_vec())],
        size_delta in prop_oneof![Just(0i64), Just(0i64), -4096i64..4096],
    ) {
        check_forged_capacity(pristine(), capacity, size_delta)?;
    }

    /// Schema texts replaced, checksum and hash recomputed. A valid schema with a consistent
    /// layout opens with exactly those fields; garbage is refused; nothing else happens.
    #[test]
    fn forged_schema(
        valid in prop::collection::vec(
            ("[a-z_][a-z0-9_]{0,8}", 0usize..12, prop::collection::vec(1usize..6, 0..3)),
            1..5,
        ),
        garbage in prop::collection::vec(any::<u8>(), 0..120),
        use_valid in any::<bool>(),
        consistent in any::<bool>(),
    ) {
        let p = pristine();
        let victim = Victim::new("schema");
        const CODES: [&str; 12] = ["b1", "u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f2", "f4", "f8"];
        let fields: Vec<(String, DType, Vec<usize>)> = valid
            .iter()
            .map(|(n, c, s)| (n.clone(), DType::from_code(CODES[*c]).unwrap(), s.clone()))
            .collect();
        let schema = Schema::new(&fields).ok().filter(|_| use_valid);
        let text = match &schema {
            Some(s) => s.encode().into_bytes(),
            None => garbage,
        };
        let decoded = std::str::from_utf8(&text).ok().and_then(|t| Schema::decode(t).ok());
        let control = p.mirror.control();
        let data = if consistent {
            let rb = decoded.as_ref().map_or(p.mirror.record_bytes, |s| s.record_bytes() as u64);
            forge(&p.data, CAPACITY, Some(&text), rb, 0)
        } else {
            let mut data = p.data.clone();
            data[SCHEMA_TEXT..SCHEMA_TEXT + p.mirror.schema_len as usize].fill(0);
            let end = (SCHEMA_TEXT + text.len()).min(control);
            data[SCHEMA_TEXT..end].copy_from_slice(&text[..end - SCHEMA_TEXT]);
            put(&mut data, H_SCHEMA_LEN, text.len() as u64);
            reseal(&mut data);
            data
        };
        let got = outcome(&victim, &data, false)?;
        if schema.is_some() && consistent {
            prop_assert_eq!(got, Outcome::Usable);
            let buffer = victim.inspect();
            prop_assert_eq!(buffer.schema(), schema.as_ref().unwrap());
        }
        if decoded.is_none() && (consistent || text.len() <= control - SCHEMA_TEXT) {
            prop_assert_eq!(got, Outcome::Corrupt);
        }
    }
}

/// Sections moved, swapped, added, dropped or resized consistently with the rest of the header
/// (total size and file size adjusted, checksum resealed): all refused with `Corrupt`, because
/// `attach` recomputes the whole layout before trusting any offset.
#[test]
fn consistently_forged_sections_are_corrupt() {
    let p = pristine();
    let m = &p.mirror;
    let victim = Victim::new("sections");
    let count = m.sections.len();
    let entry = directory_entry;
    let grow = |data: &mut Vec<u8>, by: u64| {
        let total = word(data, H_TOTAL_BYTES) + by;
        put(data, H_TOTAL_BYTES, total);
        data.resize(total as usize, 0);
    };
    type Forgery = Box<dyn Fn(&mut Vec<u8>)>;
    let forgeries: Vec<(&str, Forgery)> = vec![
        (
            "slots moved a page on, file grown to match",
            Box::new(move |d| {
                add(d, entry(2) + 8, 4096);
                grow(d, 4096);
            }),
        ),
        (
            "control and handles swapped",
            Box::new(move |d| {
                let (a, b) = (
                    d[entry(0)..entry(1)].to_vec(),
                    d[entry(1)..entry(2)].to_vec(),
                );
                d[entry(0)..entry(1)].copy_from_slice(&b);
                d[entry(1)..entry(2)].copy_from_slice(&a);
            }),
        ),
        (
            "a fourth section appended after the slots",
            Box::new(move |d| {
                let end = word(d, H_TOTAL_BYTES);
                put(d, H_SECTION_COUNT, count as u64 + 1);
                put(d, entry(count), u64::from_le_bytes(*b"priority"));
                put(d, entry(count) + 8, end);
                put(d, entry(count) + 16, 4096);
                put(d, entry(count) + 24, 1);
                grow(d, 4096);
            }),
        ),
        (
            "the slots section dropped",
            Box::new(move |d| {
                put(d, H_SECTION_COUNT, count as u64 - 1);
                d[entry(2)..entry(3)].fill(0);
            }),
        ),
        ("no sections", Box::new(|d| put(d, H_SECTION_COUNT, 0))),
        (
            "section count past the directory",
            Box::new(|d| put(d, H_SECTION_COUNT, MAX_SECTIONS as u64 + 1)),
        ),
        (
            "slots one word short",
            Box::new(move |d| add(d, entry(2) + 16, 8u64.wrapping_neg())),
        ),
        (
            "slots one slot longer, file grown to match",
            Box::new(move |d| {
                let slot = word(d, H_SLOT_BYTES);
                add(d, entry(2) + 16, slot);
                grow(d, slot);
            }),
        ),
        (
            "handles overlapping the control section",
            Box::new(move |d| {
                let control = word(d, entry(0) + 8);
                put(d, entry(1) + 8, control + 128)
            }),
        ),
        (
            "control overlapping the schema text",
            Box::new(move |d| put(d, entry(0) + 8, SCHEMA_TEXT as u64)),
        ),
        (
            "control at the header",
            Box::new(move |d| put(d, entry(0) + 8, 0)),
        ),
        (
            "slots past the end of the file",
            Box::new(move |d| put(d, entry(2) + 8, u64::MAX - 7)),
        ),
        (
            "slots length wrapping the address space",
            Box::new(move |d| put(d, entry(2) + 16, u64::MAX)),
        ),
        (
            "handles version 2",
            Box::new(move |d| put(d, entry(1) + 24, 2)),
        ),
        (
            "control version 0",
            Box::new(move |d| put(d, entry(0) + 24, 0)),
        ),
        (
            "a tag of another version",
            Box::new(move |d| put(d, entry(2), u64::from_le_bytes(*b"slots\0\0\x02"))),
        ),
    ];
    for (what, forge) in forgeries {
        let mut data = p.data.clone();
        forge(&mut data);
        reseal(&mut data);
        assert_ne!(data, p.data, "{what}: no change");
        assert_eq!(
            outcome(&victim, &data, true).unwrap(),
            Outcome::Corrupt,
            "{what}"
        );
    }
}

/// The sampler of a usable buffer, or the reason it is corrupt.
type Verdict = Result<Option<SamplerWords>, String>;

/// `attach`'s verdict on `data` (after [`outcome`] checked that `inspect` agrees and that a
/// usable copy works).
fn verdict(victim: &Victim, data: &[u8]) -> Verdict {
    let got = outcome(victim, data, true).unwrap();
    victim.write(data);
    match ReplayBuffer::attach("victim", Some(&victim.dir)) {
        Ok(buffer) => {
            assert_eq!(got, Outcome::Usable);
            Ok(SamplerWords::of(buffer.sampler()))
        }
        Err(Error::Corrupt { reason, .. }) => {
            assert_eq!(got, Outcome::Corrupt);
            Err(reason)
        }
        Err(e) => panic!("unexpected error {e:?}"),
    }
}

/// The features and sampler words, forged one way or several (checksum resealed), with the
/// reason `attach` gives, or the sampler it then has: the features and the sampler kind must
/// agree, stratified be 0 or 1, alpha and eps be finite and >= 0 in a prioritized buffer; in a
/// uniform buffer alpha, eps and stratified are not read.
#[test]
fn sampler_words_are_checked() {
    let bits = f64::to_bits;
    let u = pristine();
    let pp = prioritized_pristine();
    let s = pp.mirror.sampler.unwrap();
    let with = |alpha: f64, eps: f64, stratified: bool| {
        Ok(Some(SamplerWords {
            alpha: bits(alpha),
            eps: bits(eps),
            stratified,
        }))
    };
    let refused = |why: &str| Err(why.to_string());
    /// The copy, its words forged, and `verdict` on it.
    type Case<'a> = (&'a Pristine, Vec<(usize, u64)>, Verdict);
    let cases: Vec<Case<'_>> = vec![
        // A uniform buffer.
        (
            u,
            vec![(H_FEATURES, 1)],
            refused("sampler kind 0 does not match the feature bits 0x1"),
        ),
        (
            u,
            vec![(H_SAMPLER, 1)],
            refused("sampler kind 1 does not match the feature bits 0x0"),
        ),
        (
            u,
            vec![(H_SAMPLER, 2)],
            refused("sampler kind 2 does not match the feature bits 0x0"),
        ),
        (
            u,
            vec![(H_FEATURES, 2)],
            refused("limiter kind 0 does not match the feature bits 0x2"),
        ),
        (
            u,
            vec![(H_FEATURES, 4)],
            refused("sampler kind 0 does not match the feature bits 0x4"),
        ),
        // The episodes bit on a ring: its episode words (all 0) and schema are refused.
        (
            u,
            vec![(H_FEATURES, 8)],
            refused("episode words: n_step must be between 1 and 4096, got 0"),
        ),
        (
            u,
            vec![(H_FEATURES, 16)],
            refused("features this shmreplay does not know (bits 0x10)"),
        ),
        (
            u,
            vec![(H_LIMITER, 1)],
            refused("limiter kind 1 does not match the feature bits 0x0"),
        ),
        (
            u,
            vec![(H_FEATURES, 2), (H_LIMITER, 3)],
            refused("limiter kind 3 does not match the feature bits 0x2"),
        ),
        (
            u,
            vec![(H_FEATURES, 2), (H_LIMITER, 1), (H_MIN_SIZE, 1)],
            refused("limiter word at byte 432 does not match the limiter's kind"),
        ),
        (
            u,
            vec![(H_FEATURES, 1 << 63 | 1), (H_SAMPLER, 1)],
            refused("features this shmreplay does not know (bits 0x8000000000000000)"),
        ),
        // Prioritized words, valid ones, but no priority section: the layout is another.
        (
            u,
            vec![
                (H_FEATURES, 1),
                (H_SAMPLER, 1),
                (H_ALPHA, bits(0.6)),
                (H_STRATIFIED, 1),
            ],
            refused("header word at byte 96 is"),
        ),
        (
            u,
            vec![
                (H_ALPHA, bits(0.5)),
                (H_EPS, bits(f64::NAN)),
                (H_STRATIFIED, 7),
            ],
            Ok(None),
        ),
        // A prioritized buffer.
        (
            pp,
            vec![(H_FEATURES, 0)],
            refused("sampler kind 1 does not match the feature bits 0x0"),
        ),
        (
            pp,
            vec![(H_SAMPLER, 0)],
            refused("sampler kind 0 does not match the feature bits 0x1"),
        ),
        (
            pp,
            vec![(H_SAMPLER, 2)],
            refused("sampler kind 2 does not match the feature bits 0x1"),
        ),
        (
            pp,
            vec![(H_FEATURES, 3)],
            refused("limiter kind 0 does not match the feature bits 0x3"),
        ),
        // Uniform words, but a priority section: the layout is another.
        (
            pp,
            vec![(H_FEATURES, 0), (H_SAMPLER, 0)],
            refused("header word at byte 96 is"),
        ),
        (
            pp,
            vec![(H_STRATIFIED, 2)],
            refused("sampler flag 2 is not 0 or 1"),
        ),
        (
            pp,
            vec![(H_STRATIFIED, u64::MAX)],
            refused("sampler flag 18446744073709551615 is not 0 or 1"),
        ),
        (
            pp,
            vec![(H_ALPHA, bits(f64::NAN))],
            refused("alpha must be a finite number >= 0, got NaN"),
        ),
        (
            pp,
            vec![(H_ALPHA, bits(-1.0))],
            refused("alpha must be a finite number >= 0, got -1"),
        ),
        (
            pp,
            vec![(H_ALPHA, bits(f64::INFINITY))],
            refused("alpha must be a finite number >= 0, got inf"),
        ),
        (
            pp,
            vec![(H_EPS, bits(-5e-324))],
            refused("eps must be a finite number >= 0, got -"),
        ),
        (
            pp,
            vec![(H_EPS, bits(f64::NEG_INFINITY))],
            refused("eps must be a finite number >= 0"),
        ),
        (
            pp,
            vec![(H_EPS, u64::MAX)],
            refused("eps must be a finite number >= 0, got NaN"),
        ),
        // Accepted: the buffer samples with the forged parameters from then on.
        (pp, vec![(H_STRATIFIED, 1)], with(s.alpha(), s.eps(), true)),
        (pp, vec![(H_ALPHA, bits(1.0))], with(1.0, s.eps(), false)),
        (pp, vec![(H_ALPHA, bits(-0.0))], with(-0.0, s.eps(), false)),
        (
            pp,
            vec![(H_ALPHA, 0), (H_EPS, bits(0.25))],
            with(0.0, 0.25, false),
        ),
        // (1.0 + 1e300)^0.7 is beyond what the tree holds: pushes and updates are refused
        // with their documented error (see `exercise`), nothing else.
        (
            pp,
            vec![(H_EPS, bits(1e300))],
            with(s.alpha(), 1e300, false),
        ),
    ];
    for (p, words, expected) in cases {
        let victim = p.victim("sampler");
        let mut data = p.data.clone();
        for &(offset, value) in &words {
            put(&mut data, offset, value);
        }
        reseal(&mut data);
        let got = verdict(&victim, &data);
        let what = format!("{}{words:x?}", p.tag);
        match (&got, &expected) {
            (Err(reason), Err(fragment)) => assert!(
                reason.contains(fragment.as_str()),
                "{what}: refused because {reason:?}, expected {fragment:?}"
            ),
            _ => assert_eq!(got, expected, "{what}"),
        }
        // Unsealed, every one of them is refused by the checksum.
        let mut data = p.data.clone();
        for &(offset, value) in &words {
            put(&mut data, offset, value);
        }
        let got = verdict(&victim, &data).unwrap_err();
        assert!(got.contains("checksum"), "{what} unsealed: {got}");
    }
}

/// `data` (the pristine copy of a segment) rewritten as a consistent segment of sampler
/// `sampler`: header words, directory and file size of its layout, unused directory entries
/// zeroed, a new priority section zeroed, checksum resealed.
fn with_sampler(p: &Pristine, sampler: Option<SamplerWords>) -> (Vec<u8>, Mirror) {
    let m = &p.mirror;
    let to = Mirror::new(m.capacity, m.record_bytes, m.schema_len, sampler).unwrap();
    let mut data = p.data.clone();
    data.resize(to.total as usize, 0);
    for (offset, value) in to.header_words() {
        put(&mut data, offset, value);
    }
    data[directory_entry(to.sections.len())..H_SAMPLER].fill(0);
    if let (Some(offset), None) = (to.priority(), m.priority()) {
        data[offset..].fill(0);
    }
    reseal(&mut data);
    (data, to)
}

/// A buffer rewritten consistently as one of the other sampler (features, sampler words,
/// section count and directory, total size, file size): `attach` cannot tell, and the result
/// works. Uniform to prioritized gives a tree of zeros (sampled uniformly until priorities
/// come); prioritized to uniform drops the tree.
#[test]
fn sampler_changed_consistently_is_accepted() {
    let sampler = SamplerWords::of(Sampler::Prioritized(Prioritized::default()));
    for (p, to) in [(pristine(), sampler), (prioritized_pristine(), None)] {
        let victim = p.victim("converted");
        let (data, m) = with_sampler(p, to);
        assert_eq!(data.len() as u64, m.total);
        assert_eq!(verdict(&victim, &data), Ok(to), "{}", p.tag);
        victim.write(&data);
        let buffer = victim.inspect();
        assert_eq!(buffer.len(), p.mirror.capacity);
        assert_eq!(
            buffer.priority_stats(),
            to.map(|_| PriorityStats {
                total: 0.0,
                max_priority: 1.0
            })
        );
    }
}

/// The priority section moved, resized, dropped, swapped or retagged consistently with the
/// rest of the header (total size and file size adjusted, checksum resealed): all refused.
#[test]
fn consistently_forged_priority_sections_are_corrupt() {
    let p = prioritized_pristine();
    let m = &p.mirror;
    let victim = p.victim("sections");
    let entry = directory_entry;
    let total = m.total;
    let set_total = |data: &mut Vec<u8>, total: u64| {
        put(data, H_TOTAL_BYTES, total);
        data.resize(total as usize, 0);
    };
    let grow = move |data: &mut Vec<u8>, by: u64| {
        let total = word(data, H_TOTAL_BYTES) + by;
        set_total(data, total);
    };
    let slots = m.slots() as u64;
    let slots_end = m.slots_end() as u64;
    let tree_len = m.sections[3].len;
    type Forgery = Box<dyn Fn(&mut Vec<u8>)>;
    let forgeries: Vec<(&str, Forgery)> = vec![
        (
            "priority moved a page on, file grown to match",
            Box::new(move |d| {
                add(d, entry(3) + 8, 4096);
                grow(d, 4096);
            }),
        ),
        (
            "priority right after the slots, not on a page, file shrunk to match",
            Box::new(move |d| {
                put(d, entry(3) + 8, slots_end);
                set_total(d, slots_end + tree_len);
            }),
        ),
        (
            "priority one word short, file shrunk to match",
            Box::new(move |d| {
                add(d, entry(3) + 16, 8u64.wrapping_neg());
                set_total(d, total - 8);
            }),
        ),
        (
            "priority one node array longer, file grown to match",
            Box::new(move |d| {
                add(d, entry(3) + 16, 128);
                grow(d, 128);
            }),
        ),
        (
            "priority sized for twice the capacity, file grown to match",
            Box::new(move |d| {
                let bigger = TreeMirror::new(2 * P_CAPACITY as usize).bytes as u64;
                put(d, entry(3) + 16, bigger);
                grow(d, bigger - tree_len);
            }),
        ),
        (
            "priority dropped, file shrunk to match",
            Box::new(move |d| {
                put(d, H_SECTION_COUNT, 3);
                d[entry(3)..entry(4)].fill(0);
                set_total(d, slots_end);
            }),
        ),
        (
            "slots and priority swapped",
            Box::new(move |d| {
                let (a, b) = (
                    d[entry(2)..entry(3)].to_vec(),
                    d[entry(3)..entry(4)].to_vec(),
                );
                d[entry(2)..entry(3)].copy_from_slice(&b);
                d[entry(3)..entry(4)].copy_from_slice(&a);
            }),
        ),
        (
            "a fifth section appended after the tree",
            Box::new(move |d| {
                put(d, H_SECTION_COUNT, 5);
                put(d, entry(4), u64::from_le_bytes(*b"limiter\0"));
                put(d, entry(4) + 8, total);
                put(d, entry(4) + 16, 4096);
                put(d, entry(4) + 24, 1);
                grow(d, 4096);
            }),
        ),
        (
            "priority version 2",
            Box::new(move |d| put(d, entry(3) + 24, 2)),
        ),
        (
            "priority tagged as the slots",
            Box::new(move |d| put(d, entry(3), u64::from_le_bytes(SLOTS_TAG))),
        ),
        (
            "priority tag misspelled",
            Box::new(move |d| put(d, entry(3), u64::from_le_bytes(*b"Priority"))),
        ),
        (
            "priority over the slots",
            Box::new(move |d| put(d, entry(3) + 8, slots)),
        ),
        (
            "priority past the end of the file",
            Box::new(move |d| put(d, entry(3) + 8, u64::MAX - 7)),
        ),
        (
            "priority length wrapping the address space",
            Box::new(move |d| put(d, entry(3) + 16, u64::MAX)),
        ),
    ];
    for (what, forge) in forgeries {
        let mut data = p.data.clone();
        forge(&mut data);
        reseal(&mut data);
        assert_ne!(data, p.data, "{what}: no change");
        assert_eq!(
            outcome(&victim, &data, true).unwrap(),
            Outcome::Corrupt,
            "{what}"
        );
    }
}

/// Whether `word` in slot `index` names the push of `exercise` itself: busy, by the attacher's
/// own entry (0, the first free one), for the very ticket that push takes. Its writer is alive
/// (it is the caller), so that push waits out `WAIT_LIMIT` (10 s) and fails `Contended`; no
/// real writer makes that word before its claim, so it is left out here.
fn names_the_next_push(index: usize, word: u64) -> bool {
    index == NEXT_SLOT
        && slot::is_busy(word)
        && slot::names_a_ticket(word)
        && slot::ticket_of(word) == NEXT_TICKET
        && slot::owner_of(word) == 0
}

/// A version word as a forger would make it: random, a boundary, or a well-formed word of the
/// protocol (committed, first commit, busy) for a ticket near the ring's, far past it, or at
/// the largest, owned by the live attacher's entry, another entry or the last one.
fn version_word() -> impl Strategy<Value = u64> {
    let ticket = prop_oneof![
        0u64..2 * INSERTED,
        prop::sample::select(vec![1 << 40, slot::MAX_TICKET - 1, slot::MAX_TICKET]),
    ];
    let owner = prop::sample::select(vec![0usize, 1, 5, slot::MAX_OWNERS - 1]);
    prop_oneof![
        boundary_or_any(),
        // Flags with no ticket: damaged, never made by a writer.
        (0u64..1 << 12),
        (ticket, owner, 0usize..4).prop_map(|(t, o, kind)| match kind {
            0 => slot::committed(t),
            1 => slot::committed_first(t, o),
            k => slot::busy(t, o, k == 3),
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, failure_persistence: None, ..ProptestConfig::default() })]

    /// Forged version words and random record words in every slot but one: the buffer opens,
    /// forged slots read as some record or as none (at once: no wait for a writer), sampling
    /// finds what `read` finds, and a writer is never blocked by a forged "busy" word.
    #[test]
    fn forged_words_in_slots(
        writes in prop::collection::vec(
            (0..CAPACITY as usize, prop_oneof![Just(0usize), 0usize..8], version_word()),
            1..12,
        ),
        keep in 0..CAPACITY as usize,
    ) {
        let p = pristine();
        let victim = Victim::new("slots");
        let slot_bytes = p.mirror.slot_bytes as usize;
        let mut data = p.data.clone();
        for &(index, w, value) in &writes {
            let w = w % (slot_bytes / 8);
            if index == keep || (w == 0 && names_the_next_push(index, value)) {
                continue;
            }
            put(&mut data, p.mirror.slot(index) + 8 * w, value);
        }
        let started = std::time::Instant::now();
        prop_assert_eq!(outcome(&victim, &data, false)?, Outcome::Usable);
        prop_assert!(started.elapsed() < std::time::Duration::from_secs(2), "took {:?}", started.elapsed());
    }
}

/// A version word of 1 (busy, owner entry 0, ticket field 0) names the reader's own live
/// handle as its writer, so `read` would wait its full bound (and `ticket_of(word) + 1`
/// overflows in debug builds). Such a word only comes from corruption and must read as no
/// record at once.
#[test]
fn busy_version_word_without_ticket_reads_as_no_record() {
    let p = pristine();
    let victim = Victim::new("busy0");
    let mut data = p.data.clone();
    put(&mut data, p.mirror.slot(0), 1);
    victim.write(&data);
    let buffer = ReplayBuffer::attach("victim", Some(&victim.dir)).unwrap();
    let mut row: Vec<Vec<u8>> = buffer
        .schema()
        .fields()
        .iter()
        .map(|f| vec![0u8; f.bytes])
        .collect();
    let mut out: Vec<&mut [u8]> = row.iter_mut().map(|v| v.as_mut_slice()).collect();
    let started = std::time::Instant::now();
    let got = buffer.read(0, &mut out);
    assert!(matches!(got, Ok(None)), "{got:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
}
