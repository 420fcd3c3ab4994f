//! [`ReplayBuffer`]: the ring of records in one segment, its header, its handle table.
//!
//! Segment layout (all offsets in bytes, every region 8-aligned):
//!
//! ```text
//! 0       header words (magic, layout version, ready flag, checksum, sizes, offsets)
//! 128     insert cursor (own cache lines: every insert touches it)
//! 256     filled-slot count
//! 384     counters folded in from handles that closed or died
//! 448     reaper: the `gc` deciding to remove the segment, or REAPED once it decided
//! 512     schema text
//! table   MAX_OWNERS handle entries of 128 bytes: owner identity, ticket being written, counters
//! slots   capacity slots: the slot's version word (its seqlock, see `slot`), then its record
//!         (records of 1 KiB or more start on the slot's second cache line, and their slots
//!         are whole cache lines)
//! ```
//!
//! The version word sits right before its record, not in an array of its own: a random read
//! then touches one page and as few cache lines as possible (192 bytes, three lines, for the
//! 184-byte control record). Large records are cache-line aligned instead: `rep movsb` stores
//! them 13% faster than at an 8-byte offset (9.2 vs 8.0 GB/s for Atari frames, measured).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::interrupt::Patience;
use crate::process;
use crate::schema::{fnv1a, Schema, MAX_SCHEMA_TEXT};
use crate::segment::{self, Segment};
use crate::slot::{self, Busy, Claim};

/// Where segments live unless a directory is given: POSIX shared memory.
pub const DEFAULT_DIR: &str = "/dev/shm";
/// Segment files are named `shmreplay.<name>`.
pub const FILE_PREFIX: &str = "shmreplay.";
pub const MAX_NAME_LEN: usize = 200;
pub const MAX_CAPACITY: u64 = 1 << 40;
/// Live handles (in any process) a buffer can have at once.
pub const MAX_HANDLES: usize = slot::MAX_OWNERS;

const MAGIC: u64 = u64::from_le_bytes(*b"SHMRPLY\0");
const LAYOUT_VERSION: u64 = 2;
const READY: u64 = 1;

// Header words.
const H_MAGIC: usize = 0;
const H_VERSION: usize = 8;
const H_READY: usize = 16;
const H_CHECKSUM: usize = 24;
/// Words from here up to `H_END` are covered by the checksum (with the schema text).
const H_CAPACITY: usize = 32;
const H_RECORD_BYTES: usize = 40;
const H_SCHEMA_LEN: usize = 48;
const H_SCHEMA_HASH: usize = 56;
const H_TABLE_OFFSET: usize = 64;
const H_SLOT_BYTES: usize = 72;
const H_DATA_OFFSET: usize = 80;
const H_TOTAL_BYTES: usize = 88;
const H_CREATOR: usize = 96;
const H_CREATED_UNIX_NS: usize = 104;
const H_END: usize = 128;
const CURSOR: usize = 128;
const FILLED: usize = 256;
const RETIRED: usize = 384;
const REAPER: usize = 448;
const SCHEMA_TEXT: usize = 512;
/// The reaper word once a `gc` has decided to remove the segment (no process has this identity).
const REAPED: u64 = u64::MAX;
/// How long an attach waits for a `gc` that is deciding about the segment.
const REAPER_PATIENCE: Duration = Duration::from_secs(2);

const ENTRY_BYTES: usize = 128;
/// Records from this size on start on a cache line of their own (see the module docs).
const ALIGNED_RECORD_BYTES: usize = 1024;
/// Records up to this size are copied whole, through a private staging buffer, instead of one
/// copy per field: for 184-byte records, sampling got 2x faster (measured at 10M slots).
const STAGED_RECORD_BYTES: usize = 256;
/// How many rows ahead `sample_into` prefetches.
const PREFETCH_AHEAD: usize = 16;
/// 2^64 / golden ratio: consecutive multiples are far apart, for seeding generators.
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
const E_OWNER: usize = 0;
const E_WRITING: usize = 8;
const E_COUNTERS: usize = 16;

/// Per-handle event counters, summed over all handles by [`ReplayBuffer::stats`].
#[derive(Clone, Copy, Debug)]
enum Counter {
    Inserts,
    Samples,
    Retries,
    Recovered,
    Superseded,
}
const COUNTERS: [Counter; 5] = [
    Counter::Inserts,
    Counter::Samples,
    Counter::Retries,
    Counter::Recovered,
    Counter::Superseded,
];

/// Where everything is in a segment of a given capacity and schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    capacity: usize,
    record_bytes: usize,
    schema_len: usize,
    table_offset: usize,
    /// Version word, padding for large records, record.
    slot_bytes: usize,
    /// Where the record starts in its slot.
    record_in_slot: usize,
    data_offset: usize,
    total_bytes: usize,
}

impl Layout {
    /// Records copied whole through a private buffer (see [`STAGED_RECORD_BYTES`]).
    fn staged(&self) -> bool {
        self.record_bytes <= STAGED_RECORD_BYTES
    }

    fn new(capacity: u64, record_bytes: usize, schema_len: usize) -> Result<Layout> {
        if capacity == 0 || capacity > MAX_CAPACITY {
            return Err(Error::InvalidArgument(format!(
                "capacity must be between 1 and {MAX_CAPACITY}, got {capacity}"
            )));
        }
        if schema_len > MAX_SCHEMA_TEXT {
            return Err(Error::InvalidSchema(format!(
                "the schema text takes {schema_len} bytes, more than the limit of {MAX_SCHEMA_TEXT}"
            )));
        }
        let too_big = || {
            Error::InvalidArgument(format!(
                "capacity {capacity} × {record_bytes}-byte records is too large"
            ))
        };
        let capacity = usize::try_from(capacity).map_err(|_| too_big())?;
        let table_offset = (SCHEMA_TEXT + schema_len).next_multiple_of(ENTRY_BYTES);
        let data_offset = (table_offset + MAX_HANDLES * ENTRY_BYTES).next_multiple_of(4096);
        let record_in_slot = if record_bytes >= ALIGNED_RECORD_BYTES {
            64
        } else {
            8
        };
        let slot_bytes = record_bytes
            .checked_add(record_in_slot)
            .and_then(|s| s.checked_next_multiple_of(record_in_slot))
            .ok_or_else(too_big)?;
        let total_bytes = capacity
            .checked_mul(slot_bytes)
            .and_then(|d| d.checked_add(data_offset))
            .filter(|&t| t as u64 <= i64::MAX as u64)
            .ok_or_else(too_big)?;
        Ok(Layout {
            capacity,
            record_bytes,
            schema_len,
            table_offset,
            slot_bytes,
            record_in_slot,
            data_offset,
            total_bytes,
        })
    }
}

/// A live view of one segment's counters (approximate while other processes are running).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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
    /// Slots taken over from a writer that died while writing them.
    pub recovered: u64,
    /// Inserts dropped because a newer insert had already taken their slot.
    pub superseded: u64,
    /// Live handles, over all processes.
    pub attached: u64,
}

/// One segment found by [`list`].
#[derive(Clone, Debug, PartialEq, Eq)]
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
    /// No live process holds a handle and its creator is gone: [`remove_stale`] removes it.
    pub stale: bool,
}

/// A file named like a segment that cannot be opened as one (damaged, or from another version).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unreadable {
    pub name: String,
    pub path: PathBuf,
    pub reason: String,
}

/// What [`list`] found in a directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    pub buffers: Vec<SegmentInfo>,
    pub unreadable: Vec<Unreadable>,
}

/// The handle-table entry this handle writes its counters and claims into, registered by the
/// process that uses it (a handle inherited through `fork` registers anew in the child).
#[derive(Debug)]
struct Registration {
    pid: u32,
    entry: usize,
}

/// A shared-memory replay buffer: a ring of `capacity` fixed-size records that any number of
/// processes write and sample concurrently. See the crate docs for an example.
#[derive(Debug)]
pub struct ReplayBuffer {
    segment: Segment,
    schema: Schema,
    layout: Layout,
    name: String,
    path: PathBuf,
    registration: Mutex<Option<Registration>>,
    /// `pid << 32 | entry` of `registration`, readable without the lock (samplers only count).
    registered: AtomicU64,
    rng: AtomicU64,
}

/// Checks a buffer name: 1 to 200 characters of `[A-Za-z0-9._-]`, not starting with `.`.
pub fn validate_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_NAME_LEN {
        Some("it is longer than 200 characters")
    } else if name.starts_with('.') {
        Some("it starts with '.'")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        Some("only letters, digits, '.', '_' and '-' are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// The file backing buffer `name` in `dir` (default [`DEFAULT_DIR`]). The name is validated,
/// so the file is always directly inside `dir`.
pub fn segment_path(name: &str, dir: Option<&Path>) -> Result<PathBuf> {
    validate_name(name)?;
    let dir = dir.unwrap_or(Path::new(DEFAULT_DIR));
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(dir.join(format!("{FILE_PREFIX}{name}"))),
        Ok(_) => Err(Error::io(
            format!("{} is not a directory", dir.display()),
            std::io::Error::from_raw_os_error(rustix::io::Errno::NOTDIR.raw_os_error()),
        )),
        Err(e) => Err(Error::io(format!("no directory {}", dir.display()), e)),
    }
}

/// A fresh name, unique on this machine with overwhelming probability.
pub fn unique_name() -> String {
    let mut rng = Rng(unix_nanos() ^ u64::from(std::process::id()).rotate_left(32));
    format!("rb-{}-{:012x}", std::process::id(), rng.next() >> 16)
}

/// Removes buffer `name` from `dir`. Processes that have it mapped keep using it until they close.
pub fn remove(name: &str, dir: Option<&Path>) -> Result<()> {
    let path = segment_path(name, dir)?;
    std::fs::remove_file(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound(path),
        _ => Error::io(format!("remove {}", path.display()), e),
    })
}

/// The buffers of this user in `dir` (default [`DEFAULT_DIR`]), sorted by name, and the files
/// named like segments that cannot be opened as one. Other users' files are left out.
pub fn list(dir: Option<&Path>) -> Result<Listing> {
    let mut listing = Listing::default();
    for (name, path, opened) in segments(dir)? {
        match opened {
            Ok(buffer) => listing.buffers.push(buffer.info()),
            Err(Error::PermissionDenied { .. } | Error::NotFound(_)) => {}
            Err(e) => listing.unreadable.push(Unreadable {
                name,
                path,
                reason: match e {
                    Error::Corrupt { reason, .. } => reason,
                    e => e.to_string(),
                },
            }),
        }
    }
    listing.buffers.sort_by(|a, b| a.name.cmp(&b.name));
    listing.unreadable.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(listing)
}

/// Every file named like a segment in `dir` (default [`DEFAULT_DIR`]), opened with
/// [`ReplayBuffer::inspect`]: `(name, path, the handle or why it could not be opened)`.
fn segments(
    dir: Option<&Path>,
) -> Result<impl Iterator<Item = (String, PathBuf, Result<ReplayBuffer>)>> {
    let dir = dir.unwrap_or(Path::new(DEFAULT_DIR)).to_owned();
    let entries =
        std::fs::read_dir(&dir).map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
    Ok(entries.flatten().filter_map(move |entry| {
        let file_name = entry.file_name();
        let name = file_name.to_str()?.strip_prefix(FILE_PREFIX)?.to_owned();
        let opened = ReplayBuffer::inspect(&name, Some(&dir));
        Some((name, entry.path(), opened))
    }))
}

/// Removes the stale buffers of this user in `dir` (default [`DEFAULT_DIR`]): those that no
/// live process holds and whose creator is gone. Returns their names; with `dry_run`, only
/// names them. Also removes the hidden files of creators that died while creating a segment.
///
/// A buffer some process attaches while this runs is never removed: the attacher registers its
/// handle, then checks the segment's reaper word; this function claims the reaper word, then
/// checks the handles (both sequentially consistent, so at least one sees the other).
pub fn remove_stale(dir: Option<&Path>, dry_run: bool) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for (name, _, opened) in segments(dir)? {
        let Ok(buffer) = opened else { continue };
        // `reap` decides again once it holds the reaper word; this spares live buffers it.
        if buffer.info().stale && (dry_run || buffer.reap()?) {
            removed.push(name);
        }
    }
    removed.sort();
    if !dry_run {
        for temporary in segment::abandoned_temporaries(dir.unwrap_or(Path::new(DEFAULT_DIR))) {
            let _ = std::fs::remove_file(temporary);
        }
    }
    Ok(removed)
}

impl ReplayBuffer {
    /// Creates buffer `name` in `dir` (default `/dev/shm`) with `capacity` records of `schema`.
    ///
    /// Fails with [`Error::AlreadyExists`] if the name is taken and [`Error::InsufficientSpace`]
    /// if the filesystem cannot hold it (nothing is left behind then).
    pub fn create(
        name: &str,
        dir: Option<&Path>,
        capacity: u64,
        schema: Schema,
    ) -> Result<ReplayBuffer> {
        let path = segment_path(name, dir)?;
        let text = schema.encode();
        let layout = Layout::new(capacity, schema.record_bytes(), text.len())?;
        let me = process::current();
        // The creator's handle is registered before the segment is published, so that no `gc`
        // ever sees it without a live holder.
        let segment = Segment::create(&path, layout.total_bytes as u64, |segment| {
            write_header(segment, &schema, &layout, &text);
            segment
                .word(layout.table_offset + E_OWNER)
                .store(me, Ordering::Release);
        })?;
        let buffer = ReplayBuffer::from_parts(segment, schema, layout, name, path);
        buffer.adopt(&mut buffer.lock_registration(), process::pid_of(me), 0);
        Ok(buffer)
    }

    /// Attaches to existing buffer `name` in `dir`, after validating everything in its header.
    pub fn attach(name: &str, dir: Option<&Path>) -> Result<ReplayBuffer> {
        ReplayBuffer::open(name, dir, true)
    }

    /// Opens buffer `name` just to look at it (schema, stats, processes): without counting as
    /// an attached handle and without prefaulting the mapping. It can still write and sample;
    /// it registers on first use.
    pub fn inspect(name: &str, dir: Option<&Path>) -> Result<ReplayBuffer> {
        ReplayBuffer::open(name, dir, false)
    }

    fn open(name: &str, dir: Option<&Path>, register: bool) -> Result<ReplayBuffer> {
        let path = segment_path(name, dir)?;
        let segment = Segment::open(&path, SCHEMA_TEXT as u64)?;
        let (schema, layout) = read_header(&segment, &path)?;
        let buffer = ReplayBuffer::from_parts(segment, schema, layout, name, &path);
        if register {
            buffer.register()?;
            buffer.segment.prefault(&mut Patience::new())?;
        }
        Ok(buffer)
    }

    fn from_parts(
        segment: Segment,
        schema: Schema,
        layout: Layout,
        name: &str,
        path: impl Into<PathBuf>,
    ) -> Self {
        // Handles made in the same nanosecond still draw different streams.
        static HANDLES: AtomicU64 = AtomicU64::new(0);
        let seed = unix_nanos() ^ HANDLES.fetch_add(1, Ordering::Relaxed).wrapping_mul(GOLDEN);
        ReplayBuffer {
            segment,
            schema,
            layout,
            name: name.to_owned(),
            path: path.into(),
            registration: Mutex::new(None),
            registered: AtomicU64::new(0),
            rng: AtomicU64::new(seed),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The segment file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    pub fn capacity(&self) -> u64 {
        self.layout.capacity as u64
    }

    /// Bytes of one record in shared memory (fields padded to 8 bytes).
    pub fn record_bytes(&self) -> usize {
        self.layout.record_bytes
    }

    /// Bytes of the whole segment.
    pub fn segment_bytes(&self) -> u64 {
        self.layout.total_bytes as u64
    }

    /// Slots that hold a committed record.
    pub fn len(&self) -> u64 {
        self.word(FILLED)
            .load(Ordering::Relaxed)
            .min(self.capacity())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes the segment file; mappings (this one included) stay valid until closed.
    pub fn unlink(&self) -> Result<()> {
        std::fs::remove_file(&self.path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound(self.path.clone()),
            _ => Error::io(format!("remove {}", self.path.display()), e),
        })
    }

    /// Inserts one record: `fields[i]` holds the bytes of schema field `i`.
    pub fn push(&self, fields: &[&[u8]]) -> Result<()> {
        self.extend(fields).map(|_| ())
    }

    /// Inserts `n` records given column-wise: `columns[i]` holds `n` consecutive values of schema
    /// field `i` (`n * field.bytes` bytes). The records take `n` consecutive tickets; if `n`
    /// exceeds the capacity only the last `capacity` are written. Returns `n`.
    ///
    /// Everything is validated before the first byte is written.
    ///
    /// A writer waits only for the previous writer of a slot it claims (one lap older, still
    /// copying). If the installed [`interrupt`](crate::interrupt) check fires meanwhile, it
    /// stops with [`Error::Interrupted`]: the rows before that slot were inserted, the rest not.
    pub fn extend(&self, columns: &[&[u8]]) -> Result<usize> {
        self.insert(columns, None)
    }

    /// [`extend`](Self::extend), calling `pause(slot)` after the first field of the first row
    /// is copied, while the slot is still claimed. For tests that kill a writer mid-copy.
    #[doc(hidden)]
    pub fn extend_pausing(&self, columns: &[&[u8]], pause: &mut dyn FnMut(u64)) -> Result<usize> {
        self.insert(columns, Some(pause))
    }

    fn insert(&self, columns: &[&[u8]], mut pause: Option<&mut dyn FnMut(u64)>) -> Result<usize> {
        let n = self.rows_in(columns.iter().map(|c| c.len()), "column")?;
        if n == 0 {
            return Ok(0);
        }
        let registration = self.registration()?;
        let entry = registration.as_ref().expect("registered").entry;
        let cursor = self.word(CURSOR);
        if cursor.load(Ordering::Relaxed) > slot::MAX_TICKET - n as u64 {
            return Err(Error::InvalidArgument(
                "the insert counter of this buffer is exhausted".into(),
            ));
        }
        let first_ticket = cursor.fetch_add(n as u64, Ordering::Relaxed);
        let writing = self.entry_word(entry, E_WRITING);
        // Rows that the same call overwrites at once are never written: they count as superseded.
        let skipped = n.saturating_sub(self.layout.capacity);
        let (mut inserted, mut recovered, mut superseded) = (0u64, 0u64, skipped as u64);
        let mut patience = Patience::new();
        let mut interrupted = false;
        for row in skipped..n {
            let ticket = first_ticket + row as u64;
            let index = (ticket % self.capacity()) as usize;
            if row + PREFETCH_AHEAD < n {
                self.prefetch(((ticket + PREFETCH_AHEAD as u64) % self.capacity()) as usize);
            }
            let seq = self.seq(index);
            // Published by the claim's Release CAS; `is_orphaned` reads it. Release: a reader
            // that sees this newer mark also sees the commit of our previous ticket.
            writing.store(ticket + 1, Ordering::Release);
            let on_busy = |word| {
                if patience.interrupted() {
                    Busy::GiveUp
                } else if self.is_orphaned(word) {
                    Busy::TakeOver
                } else {
                    Busy::Wait
                }
            };
            match slot::claim(seq, ticket, entry, on_busy) {
                Claim::Superseded => superseded += 1,
                Claim::GaveUp => {
                    interrupted = true;
                    break;
                }
                Claim::Acquired {
                    first,
                    recovered: took_over,
                } => {
                    let record = self.record_offset(index);
                    let fields = self.schema.fields().iter().zip(columns);
                    if self.layout.staged() && pause.is_none() {
                        // Small records: assembled privately, then stored with one copy.
                        let mut staged = [0u8; STAGED_RECORD_BYTES];
                        for (field, column) in fields {
                            staged[field.offset..field.offset + field.bytes].copy_from_slice(
                                &column[row * field.bytes..(row + 1) * field.bytes],
                            );
                        }
                        self.segment
                            .store(record, &staged[..self.layout.record_bytes]);
                    } else {
                        for (i, (field, column)) in fields.enumerate() {
                            let value = &column[row * field.bytes..(row + 1) * field.bytes];
                            self.segment.store(record + field.offset, value);
                            if i == 0 && row == skipped {
                                if let Some(pause) = pause.as_mut() {
                                    pause(index as u64);
                                }
                            }
                        }
                    }
                    slot::commit(seq, ticket);
                    if first {
                        self.word(FILLED).fetch_add(1, Ordering::Relaxed);
                    }
                    inserted += 1;
                    recovered += u64::from(took_over);
                }
            }
        }
        writing.store(0, Ordering::Release);
        self.count(entry, Counter::Inserts, inserted);
        self.count(entry, Counter::Recovered, recovered);
        self.count(entry, Counter::Superseded, superseded);
        if interrupted {
            return Err(Error::Interrupted);
        }
        Ok(n)
    }

    /// Draws `index.len()` records uniformly with replacement from the committed slots into
    /// `out` (`out[i]` takes the rows of schema field `i`, row after row), writing each row's
    /// slot into `index` and insert ticket into `key`. Torn or in-progress slots are redrawn.
    pub fn sample_into(
        &self,
        out: &mut [&mut [u8]],
        index: &mut [u64],
        key: &mut [u64],
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
        if n == 0 {
            return Ok(());
        }
        if self.is_empty() {
            return Err(Error::Empty);
        }
        let entry = self.counting_entry()?;
        let mut rng = self.rng_for_call();
        let mut retries = 0u64;
        let mut started = None;
        let mut patience = Patience::new();
        // Slots past the cursor were never claimed. Read once per call (writers hammer that
        // cache line), and again after a miss while the ring is still filling.
        let claimed_slots = || {
            self.word(CURSOR)
                .load(Ordering::Relaxed)
                .min(self.capacity())
        };
        let mut claimed = claimed_slots();
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
        for row in 0..n {
            if let Some(&ahead) = index.get(row + PREFETCH_AHEAD) {
                self.prefetch(ahead as usize);
            }
            let mut slot_index = index[row] as usize;
            let mut misses = 0u64;
            key[row] = loop {
                if let Some(ticket) = self.try_read(slot_index, out, row) {
                    break ticket;
                }
                retries += 1;
                misses += 1;
                if claimed < self.capacity() {
                    claimed = claimed_slots();
                }
                slot_index = rng.below(claimed) as usize;
                if misses % 1024 == 0 {
                    std::thread::yield_now();
                    if patience.interrupted() {
                        self.count(entry, Counter::Retries, retries);
                        return Err(Error::Interrupted);
                    }
                    if started.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(10)
                    {
                        self.count(entry, Counter::Retries, retries);
                        return Err(Error::Contended(format!(
                            "sample: no consistent row after {misses} draws in 10 s: every slot drawn \
                             was being written; use a larger capacity"
                        )));
                    }
                }
            };
            index[row] = slot_index as u64;
        }
        self.count(entry, Counter::Samples, n as u64);
        self.count(entry, Counter::Retries, retries);
        Ok(())
    }

    /// Copies slot `index` into `out` (`out[i]` holds one value of field `i`), returning its
    /// ticket, or `None` if the slot holds no record: never written, or its writer died while
    /// writing it (the next insert into the slot recovers it). Waits (briefly) for a live writer.
    pub fn read(&self, index: u64, out: &mut [&mut [u8]]) -> Result<Option<u64>> {
        if index >= self.capacity() {
            return Err(Error::InvalidArgument(format!(
                "slot {index} is out of range for capacity {}",
                self.capacity()
            )));
        }
        if self.rows_in(out.iter().map(|o| o.len()), "output")? != 1 {
            return Err(Error::InvalidArgument(
                "read takes outputs of exactly one row".into(),
            ));
        }
        let index = index as usize;
        let started = Instant::now();
        let mut patience = Patience::new();
        let mut attempt = 0u64;
        loop {
            attempt += 1;
            let word = self.seq(index).load(Ordering::Acquire);
            if word == 0 {
                return Ok(None);
            }
            if let Some(ticket) = self.try_read(index, out, 0) {
                return Ok(Some(ticket));
            }
            // Orphaned, and still the same busy word: the writer did not just move on.
            // Asking reads /proc: only once the slot has stayed busy for a while.
            if attempt % 64 == 0
                && slot::is_busy(word)
                && self.is_orphaned(word)
                && self.seq(index).load(Ordering::Acquire) == word
            {
                return Ok(None);
            }
            if started.elapsed() > Duration::from_secs(5) {
                return Err(Error::Contended(format!(
                    "slot {index} stayed busy for 5 s"
                )));
            }
            if patience.interrupted() {
                return Err(Error::Interrupted);
            }
            std::thread::yield_now();
        }
    }

    /// Starts loading slot `index`'s version word and record into the cache.
    fn prefetch(&self, index: usize) {
        self.segment
            .prefetch(self.slot_offset(index), self.layout.slot_bytes);
    }

    /// One seqlock read of slot `index` into row `row` of `out`: its ticket, if consistent.
    fn try_read(&self, index: usize, out: &mut [&mut [u8]], row: usize) -> Option<u64> {
        let seq = self.seq(index);
        let begun = slot::read_begin(seq)?;
        let record = self.record_offset(index);
        if self.layout.staged() {
            // Small records: one copy of the whole record, then split into fields once valid.
            let mut staged = [0u8; STAGED_RECORD_BYTES];
            let staged = &mut staged[..self.layout.record_bytes];
            self.segment.load(record, staged);
            if !slot::read_validate(seq, begun) {
                return None;
            }
            for (field, dst) in self.schema.fields().iter().zip(out.iter_mut()) {
                dst[row * field.bytes..(row + 1) * field.bytes]
                    .copy_from_slice(&staged[field.offset..field.offset + field.bytes]);
            }
            return Some(slot::ticket_of(begun));
        }
        for (field, dst) in self.schema.fields().iter().zip(out.iter_mut()) {
            let dst = &mut dst[row * field.bytes..(row + 1) * field.bytes];
            self.segment.load(record + field.offset, dst);
        }
        slot::read_validate(seq, begun).then(|| slot::ticket_of(begun))
    }

    /// Counters summed over every handle that ever used the buffer.
    pub fn stats(&self) -> Stats {
        let mut totals = [0u64; COUNTERS.len()];
        // Wrapping: the counters live in shared memory, which anyone with access may scribble.
        for (i, total) in totals.iter_mut().enumerate() {
            *total = self.word(RETIRED + 8 * i).load(Ordering::Relaxed);
        }
        for entry in 0..MAX_HANDLES {
            for (i, total) in totals.iter_mut().enumerate() {
                *total = total.wrapping_add(
                    self.entry_word(entry, E_COUNTERS + 8 * i)
                        .load(Ordering::Relaxed),
                );
            }
        }
        let [inserts, samples, retries, recovered, superseded] = totals;
        Stats {
            capacity: self.capacity(),
            size: self.len(),
            inserts,
            samples,
            retries,
            recovered,
            superseded,
            attached: self.live_owners().count() as u64,
        }
    }

    /// Pids of the live processes holding handles to this buffer, sorted, without repeats.
    pub fn processes(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.live_owners().map(process::pid_of).collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// What [`list`] reports about this buffer.
    pub fn info(&self) -> SegmentInfo {
        let stats = self.stats();
        let creator = self.word(H_CREATOR).load(Ordering::Relaxed);
        SegmentInfo {
            name: self.name.clone(),
            path: self.path.clone(),
            capacity: stats.capacity,
            size: stats.size,
            bytes: self.segment_bytes(),
            record_bytes: self.layout.record_bytes as u64,
            attached: stats.attached,
            creator_pid: process::pid_of(creator),
            stale: stats.attached == 0 && !process::is_alive(creator),
        }
    }

    // ---- internals ----

    /// Identities of the live processes named in the handle table (one per handle).
    fn live_owners(&self) -> impl Iterator<Item = u64> + '_ {
        (0..MAX_HANDLES)
            // SeqCst: pairs with `register` against `reap` (see `remove_stale`).
            .map(|e| self.entry_word(e, E_OWNER).load(Ordering::SeqCst))
            .filter(|&owner| owner != 0 && process::is_alive(owner))
    }

    /// Removes the segment file if the buffer is stale, unless another `gc` is at it. Returns
    /// whether it removed it.
    fn reap(&self) -> Result<bool> {
        let reaper = self.word(REAPER);
        // REAPED names no process: a gc that died after deciding is finished here.
        let current = reaper.load(Ordering::SeqCst);
        if current != 0 && process::is_alive(current) {
            return Ok(false);
        }
        let me = process::current();
        if reaper
            .compare_exchange(current, me, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Ok(false);
        }
        if !self.info().stale {
            reaper.store(0, Ordering::SeqCst);
            return Ok(false);
        }
        reaper.store(REAPED, Ordering::SeqCst);
        if !self.segment.is_at(&self.path) {
            return Ok(false);
        }
        self.unlink()?;
        Ok(true)
    }

    /// Called right after registering: fails if a `gc` removed (or is removing) the segment.
    fn check_not_reaped(&self) -> Result<()> {
        let reaper = self.word(REAPER);
        let started = Instant::now();
        let mut patience = Patience::new();
        loop {
            match reaper.load(Ordering::SeqCst) {
                REAPED => return Err(Error::NotFound(self.path.clone())),
                // A gc that died while deciding removed nothing.
                r if r == 0 || !process::is_alive(r) => return Ok(()),
                // A gc decides in milliseconds (it either saw our handle or removes the file);
                // a word that names a live process for longer was forged, not written by a gc.
                _ if started.elapsed() > REAPER_PATIENCE => return Ok(()),
                _ if patience.interrupted() => return Err(Error::Interrupted),
                _ => std::thread::sleep(Duration::from_micros(200)),
            }
        }
    }

    fn word(&self, offset: usize) -> &AtomicU64 {
        self.segment.word(offset)
    }

    fn slot_offset(&self, index: usize) -> usize {
        self.layout.data_offset + index * self.layout.slot_bytes
    }

    fn seq(&self, index: usize) -> &AtomicU64 {
        self.word(self.slot_offset(index))
    }

    fn record_offset(&self, index: usize) -> usize {
        self.slot_offset(index) + self.layout.record_in_slot
    }

    fn entry_word(&self, entry: usize, offset: usize) -> &AtomicU64 {
        self.word(self.layout.table_offset + entry * ENTRY_BYTES + offset)
    }

    fn count(&self, entry: usize, counter: Counter, n: u64) {
        if n > 0 {
            self.entry_word(entry, E_COUNTERS + 8 * counter as usize)
                .fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Validates per-field byte lengths against the schema; returns the common row count.
    fn rows_in(&self, lengths: impl ExactSizeIterator<Item = usize>, what: &str) -> Result<usize> {
        let fields = self.schema.fields();
        if lengths.len() != fields.len() {
            return Err(Error::InvalidArgument(format!(
                "expected one {what} per field ({}), got {}",
                fields.len(),
                lengths.len()
            )));
        }
        let mut rows = None;
        for (field, len) in fields.iter().zip(lengths) {
            if len % field.bytes != 0 {
                return Err(Error::InvalidArgument(format!(
                    "field {:?}: {len} bytes is not a whole number of {}-byte values",
                    field.name, field.bytes
                )));
            }
            let n = len / field.bytes;
            match rows {
                None => rows = Some(n),
                Some(r) if r != n => {
                    return Err(Error::InvalidArgument(format!(
                        "field {:?} has {n} rows, field {:?} has {r}",
                        field.name, fields[0].name
                    )))
                }
                Some(_) => {}
            }
        }
        Ok(rows.unwrap_or(0))
    }

    /// True if the writer named in busy seq word `word` can no longer finish: its handle entry
    /// moved on to other work or was released, or its process is dead. A writer that finished
    /// this slot also "moved on": callers re-check that the slot still holds `word`.
    fn is_orphaned(&self, word: u64) -> bool {
        if !slot::names_a_ticket(word) {
            return true; // forged or damaged: no writer ever stores such a word
        }
        let entry = slot::owner_of(word);
        let owner = self.entry_word(entry, E_OWNER).load(Ordering::Acquire);
        let writing = self.entry_word(entry, E_WRITING).load(Ordering::Acquire);
        writing != slot::ticket_of(word).wrapping_add(1) || owner == 0 || !process::is_alive(owner)
    }

    /// This handle's entry, registered for the calling process (again after a `fork`).
    fn registration(&self) -> Result<MutexGuard<'_, Option<Registration>>> {
        let guard = self.lock_registration();
        if guard.as_ref().is_some_and(|r| r.pid == process::pid()) {
            return Ok(guard);
        }
        drop(guard);
        self.register()?;
        Ok(self.lock_registration())
    }

    /// The entry to count this process's samples in, without waiting for a writer of this handle.
    fn counting_entry(&self) -> Result<usize> {
        let registered = self.registered.load(Ordering::Acquire);
        if registered >> 32 == u64::from(process::pid()) {
            return Ok((registered & 0xffff_ffff) as usize);
        }
        Ok(self.registration()?.as_ref().expect("registered").entry)
    }

    /// Takes a free handle entry, or one whose process died (folding its counters into the
    /// retired totals first).
    fn register(&self) -> Result<()> {
        let me = process::current();
        let mut slot = self.lock_registration();
        for reclaim_dead in [false, true] {
            for entry in 0..MAX_HANDLES {
                let owner_word = self.entry_word(entry, E_OWNER);
                let owner = owner_word.load(Ordering::Acquire);
                let free = owner == 0 || (reclaim_dead && !process::is_alive(owner));
                if !free {
                    continue;
                }
                // SeqCst: see `remove_stale`.
                if owner_word
                    .compare_exchange(owner, me, Ordering::SeqCst, Ordering::Relaxed)
                    .is_ok()
                {
                    self.retire_counters(entry);
                    self.entry_word(entry, E_WRITING)
                        .store(0, Ordering::Release);
                    if let Err(e) = self.check_not_reaped() {
                        self.release(entry);
                        return Err(e);
                    }
                    self.adopt(&mut slot, process::pid_of(me), entry);
                    return Ok(());
                }
            }
        }
        Err(Error::TooManyHandles(MAX_HANDLES))
    }

    fn lock_registration(&self) -> MutexGuard<'_, Option<Registration>> {
        self.registration.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes handle-table entry `entry`, registered by process `pid`, this handle's.
    fn adopt(&self, slot: &mut Option<Registration>, pid: u32, entry: usize) {
        *slot = Some(Registration { pid, entry });
        self.registered
            .store(u64::from(pid) << 32 | entry as u64, Ordering::Release);
    }

    /// Gives handle-table entry `entry` back, its counters folded into the retired totals.
    fn release(&self, entry: usize) {
        self.retire_counters(entry);
        self.entry_word(entry, E_WRITING)
            .store(0, Ordering::Relaxed);
        self.entry_word(entry, E_OWNER).store(0, Ordering::Release);
    }

    fn retire_counters(&self, entry: usize) {
        for i in 0..COUNTERS.len() {
            let n = self
                .entry_word(entry, E_COUNTERS + 8 * i)
                .swap(0, Ordering::Relaxed);
            if n > 0 {
                self.word(RETIRED + 8 * i).fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// A generator for one call, distinct per call, per handle and per process (a forked child
    /// starts with its parent's state and must not repeat its draws).
    fn rng_for_call(&self) -> Rng {
        let state = self.rng.fetch_add(GOLDEN, Ordering::Relaxed);
        let mut rng = Rng(state ^ u64::from(process::pid()).rotate_left(40));
        rng.next();
        rng
    }
}

impl Drop for ReplayBuffer {
    /// Releases this handle's entry, if this process registered it.
    fn drop(&mut self) {
        let registration = self
            .registration
            .get_mut()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(r) = registration.take() {
            if r.pid == process::pid() {
                self.release(r.entry);
            }
        }
    }
}

/// Fills in a new segment's header; the ready flag goes last.
fn write_header(segment: &Segment, schema: &Schema, layout: &Layout, schema_text: &str) {
    let header = [
        (H_CAPACITY, layout.capacity as u64),
        (H_RECORD_BYTES, layout.record_bytes as u64),
        (H_SCHEMA_LEN, layout.schema_len as u64),
        (H_SCHEMA_HASH, schema.hash()),
        (H_TABLE_OFFSET, layout.table_offset as u64),
        (H_SLOT_BYTES, layout.slot_bytes as u64),
        (H_DATA_OFFSET, layout.data_offset as u64),
        (H_TOTAL_BYTES, layout.total_bytes as u64),
        (H_CREATOR, process::current()),
        (H_CREATED_UNIX_NS, unix_nanos()),
    ];
    for (offset, value) in header {
        segment.word(offset).store(value, Ordering::Relaxed);
    }
    segment.store(SCHEMA_TEXT, schema_text.as_bytes());
    let sum = checksum(segment, schema_text.as_bytes());
    segment.word(H_CHECKSUM).store(sum, Ordering::Relaxed);
    segment
        .word(H_VERSION)
        .store(LAYOUT_VERSION, Ordering::Relaxed);
    segment.word(H_MAGIC).store(MAGIC, Ordering::Relaxed);
    // Release: whoever sees READY (Acquire) sees the whole header.
    segment.word(H_READY).store(READY, Ordering::Release);
}

/// Checks everything `attach` relies on before trusting a single offset of the segment.
fn read_header(segment: &Segment, path: &Path) -> Result<(Schema, Layout)> {
    let corrupt = |reason: String| Error::Corrupt {
        path: path.to_owned(),
        reason,
    };
    let word = |offset| segment.word(offset).load(Ordering::Relaxed);
    if word(H_MAGIC) != MAGIC {
        return Err(corrupt(
            "wrong magic number (not a shmreplay segment)".into(),
        ));
    }
    if word(H_VERSION) != LAYOUT_VERSION {
        return Err(corrupt(format!(
            "layout version {} (this shmreplay reads version {LAYOUT_VERSION})",
            word(H_VERSION)
        )));
    }
    // Segments are published complete (see `Segment::create`): not ready means damaged.
    if segment.word(H_READY).load(Ordering::Acquire) != READY {
        return Err(corrupt("its ready flag is not set".into()));
    }
    let schema_len = word(H_SCHEMA_LEN);
    if schema_len > MAX_SCHEMA_TEXT as u64 || SCHEMA_TEXT as u64 + schema_len > segment.len() as u64
    {
        return Err(corrupt(format!(
            "schema length {schema_len} is out of range"
        )));
    }
    let mut text = vec![0u8; schema_len as usize];
    segment.load(SCHEMA_TEXT, &mut text);
    if checksum(segment, &text) != word(H_CHECKSUM) {
        return Err(corrupt(
            "header checksum mismatch (the header was overwritten or damaged)".into(),
        ));
    }
    let text = String::from_utf8(text).map_err(|_| corrupt("schema is not UTF-8".into()))?;
    let schema = Schema::decode(&text).map_err(|e| corrupt(e.to_string()))?;
    if schema.hash() != word(H_SCHEMA_HASH) {
        return Err(corrupt("schema hash mismatch".into()));
    }
    let layout = Layout::new(word(H_CAPACITY), schema.record_bytes(), text.len())
        .map_err(|e| corrupt(e.to_string()))?;
    let stored = [
        (H_RECORD_BYTES, layout.record_bytes),
        (H_TABLE_OFFSET, layout.table_offset),
        (H_SLOT_BYTES, layout.slot_bytes),
        (H_DATA_OFFSET, layout.data_offset),
        (H_TOTAL_BYTES, layout.total_bytes),
    ];
    for (offset, expected) in stored {
        if word(offset) != expected as u64 {
            return Err(corrupt(format!(
                "header word at byte {offset} is {}, the schema and capacity imply {expected}",
                word(offset)
            )));
        }
    }
    if segment.len() != layout.total_bytes {
        return Err(corrupt(format!(
            "file is {} bytes, its header says {}",
            segment.len(),
            layout.total_bytes
        )));
    }
    Ok((schema, layout))
}

/// FNV-1a over the checksummed header words and the schema text.
fn checksum(segment: &Segment, schema_text: &[u8]) -> u64 {
    let mut bytes = Vec::with_capacity(H_END - H_CAPACITY + schema_text.len());
    for offset in (H_CAPACITY..H_END).step_by(8) {
        bytes.extend_from_slice(&segment.word(offset).load(Ordering::Relaxed).to_le_bytes());
    }
    bytes.extend_from_slice(schema_text);
    fnv1a(&bytes)
}

fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// wyrand: a tiny, fast generator; plenty for drawing slot indices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) ^ t) as u64
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is below 2^-40 for any ring size).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}
