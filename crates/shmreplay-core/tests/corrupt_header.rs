//! Property test: hostile or broken segment files. `ReplayBuffer::attach` and `inspect` on a
//! copy of a real segment that was truncated, extended, overwritten with random bytes in its
//! header, counters, schema text or handle table, or given forged header words (with the
//! checksum recomputed, so that the deeper layout checks are reached) either return a usable
//! buffer or fail with `Error::Corrupt` naming the file -- never a panic, an out-of-bounds
//! access, or another error. Several thousand cases in all.
//!
//! The header offsets below mirror the layout documented at the top of `src/buffer.rs`;
//! `pristine_copy_attaches_and_matches_the_mirror` fails if they drift apart.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use shmreplay_core::{DType, Error, ReplayBuffer, Schema, MAX_HANDLES};

const H_MAGIC: usize = 0;
const H_VERSION: usize = 8;
const H_READY: usize = 16;
const H_CHECKSUM: usize = 24;
const H_CAPACITY: usize = 32;
const H_RECORD_BYTES: usize = 40;
const H_SCHEMA_LEN: usize = 48;
const H_SCHEMA_HASH: usize = 56;
const H_TABLE: usize = 64;
const H_SLOT: usize = 72;
const H_DATA: usize = 80;
const H_TOTAL: usize = 88;
const H_CREATOR: usize = 96;
const H_CREATED: usize = 104;
const H_END: usize = 128;
const RETIRED: usize = 384;
const REAPER: usize = 448;
const SCHEMA_TEXT: usize = 512;
const ENTRY_BYTES: usize = 128;
const REAPED: u64 = u64::MAX;
const CAPACITY: u64 = 8;

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

/// Recomputes the schema hash and the checksum, as a forger would.
fn reseal(data: &mut [u8]) {
    let len = word(data, H_SCHEMA_LEN);
    if len > 32 * 1024 || SCHEMA_TEXT + len as usize > data.len() {
        return;
    }
    let text = data[SCHEMA_TEXT..SCHEMA_TEXT + len as usize].to_vec();
    put(data, H_SCHEMA_HASH, fnv1a(&text));
    let mut covered = data[H_CAPACITY..H_END].to_vec();
    covered.extend_from_slice(&text);
    put(data, H_CHECKSUM, fnv1a(&covered));
}

/// Mirror of the segment layout: `(table, slot_bytes, data, total)`, if representable. Each
/// slot is its version word followed by its record (cache-line aligned from 1 KiB on).
fn layout(capacity: u64, record_bytes: u64, schema_len: u64) -> Option<(u64, u64, u64, u64)> {
    if capacity == 0 || capacity > 1 << 40 || schema_len > 32 * 1024 {
        return None;
    }
    let table = (SCHEMA_TEXT as u64 + schema_len).next_multiple_of(ENTRY_BYTES as u64);
    let data = (table + (MAX_HANDLES * ENTRY_BYTES) as u64).next_multiple_of(4096);
    let slot = if record_bytes < 1024 {
        record_bytes.checked_add(8)?
    } else {
        record_bytes.checked_add(64)?.next_multiple_of(64)
    };
    let total = capacity
        .checked_mul(slot)?
        .checked_add(data)
        .filter(|&t| t <= i64::MAX as u64)?;
    Some((table, slot, data, total))
}

/// Rewrites the layout words for `capacity` and `schema_text` (with the record size of
/// `record_bytes`), reseals, and sizes the file to what the header states plus `size_delta`.
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
    if let Some((table, slot, data_offset, total)) =
        layout(capacity, record_bytes, word(&data, H_SCHEMA_LEN))
    {
        for (offset, value) in [
            (H_RECORD_BYTES, record_bytes),
            (H_TABLE, table),
            (H_SLOT, slot),
            (H_DATA, data_offset),
            (H_TOTAL, total),
        ] {
            put(&mut data, offset, value);
        }
        if total <= 8 << 20 {
            size = total;
        }
    }
    let size = (size as i64 + size_delta).max(SCHEMA_TEXT as i64 + 8) as usize;
    data.resize(size, 0);
    reseal(&mut data);
    data
}

struct Pristine {
    data: Vec<u8>,
    schema_len: usize,
    table: usize,
    /// Where the slots (version word + record each) start.
    slots: usize,
}

/// A real segment: a full ring (wrapped), counters, its creator's handle entry released.
fn pristine() -> &'static Pristine {
    static PRISTINE: OnceLock<Pristine> = OnceLock::new();
    PRISTINE.get_or_init(|| {
        let dir = test_dir("pristine");
        let buffer = ReplayBuffer::create("pristine", Some(&dir), CAPACITY, schema()).unwrap();
        let path = buffer.path().to_owned();
        for range in [0..CAPACITY, CAPACITY..CAPACITY + 3] {
            let n = range.end - range.start;
            let obs: Vec<u8> = range.clone().flat_map(|k| [k as u8; 3]).collect();
            let act: Vec<u8> = range
                .clone()
                .flat_map(|k| (k as i32).to_le_bytes())
                .collect();
            let rew: Vec<u8> = range
                .clone()
                .flat_map(|k| [k as f32, -(k as f32)])
                .flat_map(f32::to_le_bytes)
                .collect();
            assert_eq!(buffer.extend(&[&obs, &act, &rew]).unwrap(), n as usize);
        }
        drop(buffer);
        let data = std::fs::read(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        Pristine {
            schema_len: word(&data, H_SCHEMA_LEN) as usize,
            table: word(&data, H_TABLE) as usize,
            slots: word(&data, H_DATA) as usize,
            data,
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
    /// The reaper word says a gc removed it: attach reports it gone.
    Reaped,
}

/// Everything a user does with a handle works, or fails with its documented error.
fn exercise(buffer: &ReplayBuffer, full: bool) -> Result<(), TestCaseError> {
    let capacity = buffer.capacity();
    let n = buffer.len();
    prop_assert!(n <= capacity);
    let stats = buffer.stats();
    prop_assert_eq!(stats.capacity, capacity);
    prop_assert_eq!(stats.size, n);
    let _ = buffer.processes();
    let sizes: Vec<usize> = buffer.schema().fields().iter().map(|f| f.bytes).collect();
    let mut row: Vec<Vec<u8>> = sizes.iter().map(|&b| vec![0u8; b]).collect();
    for slot in 0..capacity {
        let mut out: Vec<&mut [u8]> = row.iter_mut().map(|v| v.as_mut_slice()).collect();
        if let Err(e) = buffer.read(slot, &mut out) {
            return Err(TestCaseError::fail(format!("read({slot}): {e}")));
        }
    }
    if !full {
        return Ok(());
    }
    let mut batch: Vec<Vec<u8>> = sizes.iter().map(|&b| vec![0u8; 4 * b]).collect();
    let mut out: Vec<&mut [u8]> = batch.iter_mut().map(|v| v.as_mut_slice()).collect();
    let (mut index, mut key) = ([0u64; 4], [0u64; 4]);
    match buffer.sample_into(&mut out, &mut index, &mut key) {
        Ok(()) => prop_assert!(n > 0 && index.iter().all(|&i| i < capacity)),
        Err(Error::Empty) => prop_assert_eq!(n, 0),
        Err(e) => return Err(TestCaseError::fail(format!("sample: {e}"))),
    }
    let columns: Vec<&[u8]> = row.iter().map(|v| v.as_slice()).collect();
    match buffer.push(&columns) {
        Ok(()) => {}
        // A forged insert counter can be exhausted.
        Err(Error::InvalidArgument(m)) if m.contains("exhausted") => {}
        Err(e) => return Err(TestCaseError::fail(format!("push: {e}"))),
    }
    let _ = buffer.stats();
    Ok(())
}

/// Writes `data` as the victim, inspects and attaches it: both must agree, fail only with
/// `Corrupt` naming the file (or `NotFound` for a reaped one), and give a usable buffer.
fn outcome(victim: &Victim, data: &[u8]) -> Result<Outcome, TestCaseError> {
    victim.write(data);
    let reaped = data.len() >= SCHEMA_TEXT && word(data, REAPER) == REAPED;
    let mut seen = Vec::new();
    for attach in [false, true] {
        let opened = if attach {
            ReplayBuffer::attach("victim", Some(&victim.dir))
        } else {
            ReplayBuffer::inspect("victim", Some(&victim.dir))
        };
        let got = match opened {
            Ok(buffer) => {
                if reaped {
                    prop_assert!(!attach, "attach of a reaped segment succeeded");
                    exercise(&buffer, false)?;
                    Outcome::Reaped
                } else {
                    exercise(&buffer, attach)?;
                    Outcome::Usable
                }
            }
            Err(e @ Error::Corrupt { .. }) => {
                let Error::Corrupt { path, .. } = &e else {
                    unreachable!()
                };
                prop_assert_eq!(path, &victim.path);
                prop_assert!(e.to_string().contains(&*victim.path.to_string_lossy()));
                Outcome::Corrupt
            }
            Err(Error::NotFound(_)) if attach && reaped => Outcome::Reaped,
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

#[test]
fn pristine_copy_attaches_and_matches_the_mirror() {
    let p = pristine();
    let victim = Victim::new("sanity");
    assert_eq!(outcome(&victim, &p.data).unwrap(), Outcome::Usable);
    victim.write(&p.data);
    let buffer = ReplayBuffer::attach("victim", Some(&victim.dir)).unwrap();
    assert_eq!(buffer.len(), CAPACITY);
    assert_eq!(buffer.stats().inserts, CAPACITY + 3);
    assert_eq!(buffer.stats().attached, 1);
    let rb = buffer.record_bytes() as u64;
    let (table, slot, data, total) = layout(CAPACITY, rb, p.schema_len as u64).unwrap();
    assert_eq!(
        [table, slot, data, total, rb, CAPACITY],
        [H_TABLE, H_SLOT, H_DATA, H_TOTAL, H_RECORD_BYTES, H_CAPACITY].map(|o| word(&p.data, o))
    );
    assert_eq!(total, p.data.len() as u64);
    assert_eq!(
        &p.data[SCHEMA_TEXT..SCHEMA_TEXT + p.schema_len],
        schema().encode().as_bytes()
    );
    assert_eq!(forge(&p.data, CAPACITY, None, rb, 0), p.data);
    assert_ne!(word(&p.data, RETIRED), 0, "the copy should carry counters");
}

/// Corrupt counters must not make `stats()` panic: the sums are of untrusted shared words.
#[test]
fn counters_near_overflow_do_not_panic() {
    let p = pristine();
    let victim = Victim::new("overflow");
    let mut data = p.data.clone();
    put(&mut data, RETIRED, u64::MAX);
    let entry = p.table + 5 * ENTRY_BYTES;
    put(&mut data, entry + 16, u64::MAX);
    victim.write(&data);
    let buffer = ReplayBuffer::inspect("victim", Some(&victim.dir)).unwrap();
    let _ = buffer.stats();
    let _ = buffer.info();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn truncated_is_corrupt(len in 0..pristine().data.len()) {
        let victim = Victim::new("truncated");
        prop_assert_eq!(outcome(&victim, &pristine().data[..len])?, Outcome::Corrupt);
    }

    #[test]
    fn extended_is_corrupt(extra in prop::collection::vec(any::<u8>(), 1..9000)) {
        let victim = Victim::new("extended");
        let mut data = pristine().data.clone();
        data.extend_from_slice(&extra);
        prop_assert_eq!(outcome(&victim, &data)?, Outcome::Corrupt);
    }

    #[test]
    fn foreign_files_are_corrupt(
        body in prop::collection::vec(any::<u8>(), 0..8192),
        heads in 0usize..4,
    ) {
        let victim = Victim::new("foreign");
        let mut data = body;
        let magic = u64::from_le_bytes(*b"SHMRPLY\0");
        for (i, w) in [magic, 1, 1].into_iter().take(heads).enumerate() {
            if data.len() >= 8 * (i + 1) {
                put(&mut data, 8 * i, w);
            }
        }
        prop_assert_eq!(outcome(&victim, &data)?, Outcome::Corrupt);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random bytes before the slots: a changed header or schema byte is refused,
    /// anything else (counters, padding, handle table) opens and works.
    #[test]
    fn random_bytes_before_the_slots(
        writes in prop::collection::vec((0..pristine().slots, any::<u8>()), 1..12),
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
            .any(|&o| o < H_END || (SCHEMA_TEXT..SCHEMA_TEXT + p.schema_len).contains(&o));
        let got = outcome(&victim, &data)?;
        if validated {
            prop_assert_eq!(got, Outcome::Corrupt, "changed {:?}", changed);
        } else {
            prop_assert_ne!(got, Outcome::Corrupt, "changed {:?}", changed);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 800, failure_persistence: None, ..ProptestConfig::default() })]

    /// A header or counter word set to a random or boundary value, checksum stale or resealed.
    #[test]
    fn header_and_counter_words(
        slot in prop_oneof![0usize..H_END / 8, 0usize..SCHEMA_TEXT / 8],
        value in boundary_or_any(),
        sealed in any::<bool>(),
    ) {
        let p = pristine();
        let victim = Victim::new("words");
        let offset = 8 * slot;
        // Debug builds panic on the sum in stats(): see counters_near_overflow_do_not_panic.
        prop_assume!(!(cfg!(debug_assertions) && (RETIRED..RETIRED + 40).contains(&offset)));
        let mut data = p.data.clone();
        put(&mut data, offset, value);
        if sealed {
            reseal(&mut data);
        }
        let got = outcome(&victim, &data)?;
        let unchecked = [H_CHECKSUM, H_SCHEMA_HASH, H_CREATOR, H_CREATED, 112, 120];
        if data == p.data {
            prop_assert_eq!(got, Outcome::Usable);
        } else if offset < H_END && !(sealed && unchecked.contains(&offset)) {
            prop_assert_eq!(got, Outcome::Corrupt);
        }
        if [H_MAGIC, H_VERSION, H_READY].contains(&offset) && data != p.data {
            prop_assert_eq!(got, Outcome::Corrupt);
        }
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
        let rb = word(&p.data, H_RECORD_BYTES);
        let data = forge(&p.data, capacity, None, rb, size_delta);
        let fits = layout(capacity, rb, p.schema_len as u64).is_some_and(|l| l.3 == data.len() as u64);
        let got = outcome(&victim, &data)?;
        prop_assert_eq!(got, if fits { Outcome::Usable } else { Outcome::Corrupt });
        if fits {
            let buffer = ReplayBuffer::inspect("victim", Some(&victim.dir)).unwrap();
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
        let data = if consistent {
            let rb = decoded.as_ref().map_or(word(&p.data, H_RECORD_BYTES), |s| s.record_bytes() as u64);
            forge(&p.data, CAPACITY, Some(&text), rb, 0)
        } else {
            let mut data = p.data.clone();
            data[SCHEMA_TEXT..SCHEMA_TEXT + p.schema_len].fill(0);
            let end = (SCHEMA_TEXT + text.len()).min(p.table);
            data[SCHEMA_TEXT..end].copy_from_slice(&text[..end - SCHEMA_TEXT]);
            put(&mut data, H_SCHEMA_LEN, text.len() as u64);
            reseal(&mut data);
            data
        };
        let got = outcome(&victim, &data)?;
        if schema.is_some() && consistent {
            prop_assert_eq!(got, Outcome::Usable);
            let buffer = ReplayBuffer::inspect("victim", Some(&victim.dir)).unwrap();
            prop_assert_eq!(buffer.schema(), schema.as_ref().unwrap());
        }
        if decoded.is_none() && (consistent || text.len() <= p.table - SCHEMA_TEXT) {
            prop_assert_eq!(got, Outcome::Corrupt);
        }
    }
}

/// Busy bit set and ticket field 0: no writer makes such a word (see
/// `busy_version_word_without_ticket_reads_as_no_record`).
fn busy_without_ticket(word: u64) -> bool {
    word & 1 == 1 && word >> 12 == 0
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random words in the slots (version words and records) of every slot but one: the
    /// buffer opens, garbage slots read as some record or as none, sampling finds the intact
    /// slot, and a writer is never blocked by a garbage "busy" word.
    #[test]
    fn garbage_in_slots(
        writes in prop::collection::vec((0..CAPACITY as usize, 0usize..8, any::<u64>()), 1..12),
        keep in 0..CAPACITY as usize,
    ) {
        let p = pristine();
        let victim = Victim::new("slots");
        let slot_bytes = word(&p.data, H_SLOT) as usize;
        let mut data = p.data.clone();
        for &(slot, w, value) in &writes {
            let w = w % (slot_bytes / 8);
            if slot == keep || (w == 0 && busy_without_ticket(value)) {
                continue;
            }
            put(&mut data, p.slots + slot * slot_bytes + 8 * w, value);
        }
        prop_assert_eq!(outcome(&victim, &data)?, Outcome::Usable);
    }
}

/// A version word of 1 (busy, owner entry 0, ticket field 0) names the reader's own live
/// handle as its writer, so `read` waits its full 5 s (and `ticket_of(word) + 1` overflows in
/// debug builds). Such a word only comes from corruption and must read as no record at once.
#[test]
fn busy_version_word_without_ticket_reads_as_no_record() {
    let p = pristine();
    let victim = Victim::new("busy0");
    let mut data = p.data.clone();
    put(&mut data, p.slots, 1);
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
