//! Property test: hostile or broken segment files. `ReplayBuffer::attach` and `inspect` on a
//! copy of a real segment that was truncated, extended, overwritten with random bytes in its
//! header, schema text, control words or handle table, given forged header words or section
//! directory entries (with the checksum recomputed, so that the deeper layout checks are
//! reached), forged version words in its slots, or per-entry counters near overflow, either
//! return a usable buffer or fail with `Error::Corrupt` naming the file -- never a panic (in
//! debug builds too), an out-of-bounds access, a long wait, or another error. Several thousand
//! cases in all.
//!
//! The layout is private to the crate, so the offsets below mirror layout version 3 as defined
//! in `src/layout/mod.rs` (header words `H_*`, the section directory, the control words `C_*`)
//! and `src/protocol/handles.rs` (handle-table entry words `E_*`).
//! `pristine_copy_attaches_and_matches_the_mirror` checks every mirrored constant against real
//! segments, so a layout change fails there first, with a message saying what moved.

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
    DType, Error, ReplayBuffer, Schema, Stats, LAYOUT_VERSION, MAX_CAPACITY, MAX_HANDLES,
};

// ---- Mirror of src/layout/mod.rs, layout version 3 ----

/// The layout version this mirror describes.
const MIRRORED_LAYOUT_VERSION: u64 = 3;
const MAGIC: u64 = u64::from_le_bytes(*b"SHMRPLY\0");
const READY: u64 = 1;
const KIND_RING: u64 = 1;
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
const HEADER_END: usize = 512;
const SCHEMA_TEXT: usize = HEADER_END;
/// `layout::schema::MAX_SCHEMA_TEXT`.
const MAX_SCHEMA_TEXT: u64 = 32 * 1024;
/// Records from this size on start on a cache line of their own.
const ALIGNED_RECORD_BYTES: u64 = 1024;
/// Section tags, in directory order.
const CONTROL_TAG: [u8; 8] = *b"control\0";
const HANDLES_TAG: [u8; 8] = *b"handles\0";
const SLOTS_TAG: [u8; 8] = *b"slots\0\0\0";
const CONTROL_BYTES: u64 = 256;
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
/// The intent word's snapshot of `firsts` takes its low 12 bits.
const SNAPSHOT_BITS: u32 = 12;

fn counter_offset(counter: Counter) -> usize {
    E_COUNTERS + 8 * counter as usize
}

fn intent_word(ticket: u64, firsts: u64) -> u64 {
    ((ticket + 1) << SNAPSHOT_BITS) | (firsts & ((1 << SNAPSHOT_BITS) - 1))
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
    sections: [Section; 3],
    total: u64,
}

impl Mirror {
    /// `None` where `Layout::new` refuses the shape.
    fn new(capacity: u64, record_bytes: u64, schema_len: u64) -> Option<Mirror> {
        if capacity == 0 || capacity > MAX_CAPACITY || schema_len > MAX_SCHEMA_TEXT {
            return None;
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
        let total = slots
            .checked_add(slots_len)
            .filter(|&t| t <= i64::MAX as u64)?;
        let section = |tag, offset, len| Section {
            tag,
            offset,
            len,
            version: 1,
        };
        Some(Mirror {
            capacity,
            record_bytes,
            schema_len,
            slot_bytes,
            record_in_slot,
            sections: [
                section(CONTROL_TAG, control, CONTROL_BYTES),
                section(HANDLES_TAG, handles, handles_len),
                section(SLOTS_TAG, slots, slots_len),
            ],
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

    fn entry(&self, e: usize) -> usize {
        self.handles() + e * ENTRY_BYTES
    }

    fn slot(&self, index: usize) -> usize {
        self.slots() + index * self.slot_bytes as usize
    }

    /// Every header word the shape determines, with its value (the schema hash aside).
    fn header_words(&self) -> Vec<(usize, u64)> {
        let mut words = vec![
            (H_CAPACITY, self.capacity),
            (H_RECORD_BYTES, self.record_bytes),
            (H_SLOT_BYTES, self.slot_bytes),
            (H_RECORD_IN_SLOT, self.record_in_slot),
            (H_SCHEMA_LEN, self.schema_len),
            (H_TOTAL_BYTES, self.total),
            (H_SECTION_COUNT, self.sections.len() as u64),
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
/// record size of `record_bytes`), reseals, and sizes the file to what the header states plus
/// `size_delta`.
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
    if let Some(m) = Mirror::new(capacity, record_bytes, word(&data, H_SCHEMA_LEN)) {
        for (offset, value) in m.header_words() {
            put(&mut data, offset, value);
        }
        if m.total <= 8 << 20 {
            size = m.total;
        }
    }
    let size = (size as i64 + size_delta).max(SCHEMA_TEXT as i64 + 8) as usize;
    data.resize(size, 0);
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
        )
        .expect("the test schema has a layout");
        Pristine {
            data,
            mirror,
            stats,
        }
    })
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
    let columns: Vec<&[u8]> = row.iter().map(|v| v.as_slice()).collect();
    match buffer.push(&columns) {
        Ok(()) => {}
        // A forged insert counter can be exhausted.
        Err(Error::InvalidArgument(m)) if m.contains("exhausted") => {}
        Err(e) => return Err(TestCaseError::fail(format!("push: {e}"))),
    }
    let after = buffer.stats();
    prop_assert!(after.size <= capacity);
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

/// Checks every mirrored constant against a real segment of shape `(capacity, schema)` made
/// by this process, whose data is `data`.
fn check_mirror(data: &[u8], capacity: u64, schema: &Schema, buffer: &ReplayBuffer) -> Mirror {
    let text = schema.encode();
    let m = Mirror::new(capacity, schema.record_bytes() as u64, text.len() as u64)
        .expect("a real shape has a layout");
    let shape = format!(
        "capacity {capacity}, {} record bytes",
        schema.record_bytes()
    );
    assert_eq!(word(data, H_MAGIC), MAGIC, "H_MAGIC ({shape})");
    assert_eq!(word(data, H_VERSION), LAYOUT_VERSION, "H_VERSION ({shape})");
    assert_eq!(word(data, H_READY), READY, "H_READY ({shape})");
    assert_eq!(word(data, H_KIND), KIND_RING, "H_KIND ({shape})");
    assert_eq!(word(data, H_FEATURES), 0, "H_FEATURES ({shape})");
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
    let used = directory_entry(m.sections.len());
    assert!(
        data[used..HEADER_END].iter().all(|&b| b == 0),
        "header bytes {used}..{HEADER_END} are not all zero ({shape}): a new header word or \
         section? Update the mirror from layout/mod.rs"
    );
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

#[test]
fn pristine_copy_attaches_and_matches_the_mirror() {
    assert_eq!(
        LAYOUT_VERSION, MIRRORED_LAYOUT_VERSION,
        "the segment layout changed: update the mirror at the top of this file from \
         src/layout/mod.rs and src/protocol/handles.rs"
    );
    let p = pristine();
    let m = &p.mirror;
    let data = &p.data;
    let victim = Victim::new("sanity");
    victim.write(data);
    let buffer = victim.inspect();
    assert_eq!(check_mirror(data, CAPACITY, &schema(), &buffer), *m);

    // Control words: the cursor is the next ticket.
    assert_eq!(word(data, m.control() + C_CURSOR), NEXT_TICKET, "C_CURSOR");
    // Entry 0: no insert in progress, every slot first filled through it, its counters.
    let entry = m.entry(0);
    assert_eq!(word(data, entry + E_INTENT), 0, "E_INTENT");
    assert_eq!(word(data, entry + E_FIRSTS), CAPACITY, "E_FIRSTS");
    let stats = buffer.stats();
    // All but `attached` (the creator held it; this inspecting handle does not).
    assert_eq!(stats.items()[..8], p.stats.items()[..8]);
    assert_eq!(stats.items()[8], ("attached", 0));
    for (counter, expected) in [
        (Counter::Inserts, INSERTED),
        (Counter::Samples, SAMPLED),
        (Counter::Retries, 0),
        (Counter::Recovered, 0),
        (Counter::Superseded, 0),
        (Counter::Lost, 0),
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
        E_COUNTERS + 8 * Counter::ALL.len(),
        80,
        "an entry's words: 4, then the counters"
    );
    assert!(
        data[entry + 80..m.handles() + MAX_HANDLES * ENTRY_BYTES]
            .iter()
            .all(|&b| b == 0),
        "only entry 0 was ever used, and only its first 10 words"
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
        let m = check_mirror(&data, capacity, &schema, &buffer);
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn truncated_is_corrupt(len in 0..pristine().data.len()) {
        let victim = Victim::new("truncated");
        prop_assert_eq!(outcome(&victim, &pristine().data[..len], true)?, Outcome::Corrupt);
    }

    #[test]
    fn extended_is_corrupt(extra in prop::collection::vec(any::<u8>(), 1..9000)) {
        let victim = Victim::new("extended");
        let mut data = pristine().data.clone();
        data.extend_from_slice(&extra);
        prop_assert_eq!(outcome(&victim, &data, true)?, Outcome::Corrupt);
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
        let p = pristine();
        let victim = Victim::new("bytes");
        let mut data = p.data.clone();
        for &(offset, value) in &writes {
            data[offset] = value;
        }
        let changed: Vec<usize> = writes.iter().map(|w| w.0).filter(|&o| data[o] != p.data[o]).collect();
        let validated = changed
            .iter()
            .any(|&o| o < HEADER_END || (SCHEMA_TEXT..SCHEMA_TEXT + p.mirror.schema_len as usize).contains(&o));
        let got = outcome(&victim, &data, changed.iter().all(|&o| o < p.mirror.control()))?;
        if validated {
            prop_assert_eq!(got, Outcome::Corrupt, "changed {:?}", changed);
        } else {
            prop_assert_eq!(got, Outcome::Usable, "changed {:?}", changed);
        }
    }
}

/// Header words `attach` does not check: who created the segment and when, unused section
/// directory entries, the padding up to the schema text. Changing them (with the checksum
/// resealed) leaves the segment usable; every other header word is checked.
fn unchecked_when_sealed(offset: usize, sections: usize) -> bool {
    [H_CREATOR, H_CREATOR_NAMESPACE, H_CREATED_UNIX_NS].contains(&offset)
        || (directory_entry(sections)..HEADER_END).contains(&offset)
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
        let p = pristine();
        let victim = Victim::new("words");
        let offset = 8 * index;
        let mut data = p.data.clone();
        put(&mut data, offset, value.apply(word(&p.data, offset)));
        if sealed {
            reseal(&mut data);
        }
        let got = outcome(&victim, &data, true)?;
        if data == p.data || (sealed && unchecked_when_sealed(offset, p.mirror.sections.len())) {
            prop_assert_eq!(got, Outcome::Usable);
        } else {
            prop_assert_eq!(got, Outcome::Corrupt);
        }
    }

    /// A section directory entry's tag, offset, length or version forged (another section's
    /// tag, an offset or length a little or far off, out of the file, overlapping the header),
    /// checksum stale or resealed: refused with `Corrupt` unless the entry is unused.
    #[test]
    fn forged_section_directory(
        entry in prop_oneof![0usize..3, 0usize..MAX_SECTIONS],
        field in 0usize..4,
        value in forged(),
        tag in prop::sample::select(vec![CONTROL_TAG, HANDLES_TAG, SLOTS_TAG, *b"priority", *b"slots\0\0\x01", [0; 8]]),
        use_tag in any::<bool>(),
        sealed in any::<bool>(),
    ) {
        let p = pristine();
        let victim = Victim::new("directory");
        let offset = directory_entry(entry) + 8 * field;
        let forged = if field == 0 && use_tag {
            u64::from_le_bytes(tag)
        } else {
            value.apply(word(&p.data, offset))
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
    }

    /// A control word, a handle-table word (owner, namespace, intent, size count, counters) or
    /// padding set to a random, boundary or nearby value: none is checked by `attach`, so the
    /// segment opens, and everything works; counters are summed with wrapping.
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
        let p = pristine();
        let m = &p.mirror;
        let victim = Victim::new("table");
        let original = word(&p.data, index);
        let forged = value.apply(original);
        let mut data = p.data.clone();
        put(&mut data, index, forged);
        // The entry-0 counter this word is, if any: its sum must move by exactly the change.
        let counter = Counter::ALL
            .into_iter()
            .find(|&c| index == m.entry(0) + counter_offset(c));
        let touches_size = index == m.control() + C_CURSOR
            || index == m.control() + C_ENTRIES_USED
            || (index >= m.handles() && (index - m.handles()) % ENTRY_BYTES / 8 == E_INTENT / 8)
            || (index >= m.handles() && (index - m.handles()) % ENTRY_BYTES / 8 == E_FIRSTS / 8);
        victim.write(&data);
        let stats = victim.inspect().stats();
        if let Some(c) = counter {
            let summed = |s: Stats| [s.inserts, s.samples, s.retries, s.recovered, s.superseded, s.lost];
            let mut expected = summed(p.stats);
            expected[c as usize] = expected[c as usize].wrapping_add(forged.wrapping_sub(original));
            prop_assert_eq!(summed(stats), expected);
        }
        prop_assert_eq!(outcome(&victim, &data, !touches_size)?, Outcome::Usable);
    }

    /// A header forged for another capacity, sealed: accepted exactly when the file has the
    /// size the forged header states, and then with that capacity.
    #[test]
    fn forged_capacity(
        capacity in prop_oneof![1u64..512, prop::sample::select(BOUNDARIES.to_vec())],
        size_delta in prop_oneof![Just(0i64), Just(0i64), -4096i64..4096],
    ) {
        let p = pristine();
        let victim = Victim::new("capacity");
        let rb = p.mirror.record_bytes;
        let data = forge(&p.data, capacity, None, rb, size_delta);
        let fits = Mirror::new(capacity, rb, p.mirror.schema_len)
            .is_some_and(|m| m.total == data.len() as u64);
        let got = outcome(&victim, &data, false)?;
        prop_assert_eq!(got, if fits { Outcome::Usable } else { Outcome::Corrupt });
        if fits {
            let buffer = victim.inspect();
            prop_assert_eq!(buffer.capacity(), capacity);
            prop_assert_eq!(buffer.segment_bytes(), data.len() as u64);
        }
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
