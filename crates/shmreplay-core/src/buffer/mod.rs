//! [`ReplayBuffer`]: a ring of records in one segment, written and sampled by any number of
//! processes. This module holds the handle's life (create, open, register, fork, drop); the
//! writer, the sampler and the statistics have a module each.

pub(crate) mod episodes;
mod flow;
mod priority;
mod sampler;
mod stats;
mod writer;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::layout::schema::Schema;
use crate::layout::{self, Layout, Limiter, Sampler, ENTRY_BYTES, MAX_HANDLES};
use crate::platform::copy::Kernel;
use crate::platform::interrupt::Patience;
use crate::platform::liveness::{self, Identity, Liveness};
use crate::platform::locks::{LockFile, LockKind, LockRange};
use crate::platform::mapping::Segment;
use crate::protocol::gate::{self, Admission, SegmentLocks};
use crate::protocol::handles::{self, Counter, Entry};
use crate::protocol::slot;
use crate::registry::segment_path;

pub use priority::{PriorityOutputs, PriorityStats};
pub use stats::{SegmentInfo, Stats};
pub(crate) use writer::Leaves;
#[cfg(feature = "test-hooks")]
pub use writer::PauseAt;

/// How a call waits. An embedding runtime that must not wait while holding a lock of its own
/// (Python's GIL) passes a `Blocking` that releases it around `wait`; calls try everything
/// that needs no waiting first and enter `block` only when they would otherwise wait.
pub trait Blocking {
    /// Runs `wait`, which may take long (it polls the interrupt check).
    fn block(&mut self, wait: &mut (dyn FnMut() + Send));

    /// How long the call may wait for flow control (a rate limiter or a queue) before it fails
    /// with [`Error::Timeout`]: `None` (the default) waits until allowed, zero never waits.
    fn timeout(&self) -> Option<Duration> {
        None
    }
}

/// Waits in place: for callers that hold nothing another thread could need.
pub struct NoBlocking;

impl Blocking for NoBlocking {
    fn block(&mut self, wait: &mut (dyn FnMut() + Send)) {
        wait()
    }
}

/// Waits in place, for flow control at most the given time (`None`: until allowed).
pub struct WaitUpTo(pub Option<Duration>);

impl Blocking for WaitUpTo {
    fn block(&mut self, wait: &mut (dyn FnMut() + Send)) {
        wait()
    }

    fn timeout(&self) -> Option<Duration> {
        self.0
    }
}

/// Raw input and output columns (caller memory) for [`ReplayBuffer::extend_columns`] and
/// [`ReplayBuffer::sample_columns`].
pub use crate::platform::memory::{Input as InColumn, Output as OutColumn};

/// How long a writer waits for a slot whose writer is alive (or not provably dead) before it
/// gives up with [`Error::Contended`]; also the bound on sampling that finds no consistent row.
pub(crate) const WAIT_LIMIT: Duration = Duration::from_secs(10);

/// Lock byte of the attach/gc gate (see `protocol::gate`); entry `e` locks byte `ENTRY_LOCKS + e`.
const GATE_LOCK: LockRange = LockRange { start: 0, len: 1 };
const ENTRY_LOCKS: u64 = 8;
const ALL_ENTRY_LOCKS: LockRange = LockRange {
    start: ENTRY_LOCKS,
    len: MAX_HANDLES as u64,
};

pub(crate) fn entry_lock(entry: usize) -> LockRange {
    LockRange {
        start: ENTRY_LOCKS + entry as u64,
        len: 1,
    }
}

/// The lock a creator holds on its segment file from the moment the file exists.
pub(crate) const CREATOR_LOCK: LockRange = LockRange {
    start: ENTRY_LOCKS,
    len: 1,
};

/// 2^64 / golden ratio: consecutive multiples are far apart, for seeding generators.
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// Copy kernels of a schema's byte ranges (see `platform::copy`: one access width per range).
#[derive(Clone, Debug)]
pub(crate) struct CopyPlan {
    /// For staged records: the kernels of the whole record.
    record: Kernels,
    /// Otherwise: the kernels of each field.
    fields: Vec<Kernels>,
}

/// The kernels that copy one byte range into and out of the segment.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Kernels {
    load: Kernel,
    store: Kernel,
    /// Stores of rows a queue's consumers will take while they are still in the cache.
    store_read_soon: Kernel,
}

impl Kernels {
    fn for_len(len: usize) -> Kernels {
        Kernels {
            load: Kernel::for_load(len),
            store: Kernel::for_store(len),
            store_read_soon: Kernel::for_store_read_soon(len),
        }
    }

    fn store(&self, read_soon: bool) -> Kernel {
        if read_soon {
            self.store_read_soon
        } else {
            self.store
        }
    }
}

impl CopyPlan {
    fn new(schema: &Schema, layout: &Layout) -> CopyPlan {
        CopyPlan {
            record: Kernels::for_len(layout.record_bytes),
            fields: schema
                .fields()
                .iter()
                .map(|f| Kernels::for_len(f.bytes))
                .collect(),
        }
    }
}

/// This handle's state in the calling process: serialises its writers and owns its lock file
/// and handle-table entry.
#[derive(Debug)]
struct Handle {
    /// The process image (`liveness::image`) the lock file and entry belong to (another one
    /// after `fork`).
    image: u64,
    entry: Option<usize>,
}

/// Options for creating or opening a buffer; see [`ReplayBuffer::builder`].
#[derive(Clone, Debug)]
pub struct Builder {
    name: String,
    dir: Option<PathBuf>,
    capacity: Option<u64>,
    schema: Option<Schema>,
    sampler: Sampler,
    limiter: Option<Limiter>,
    seed: Option<u64>,
    huge_pages: bool,
}

impl Builder {
    /// The directory of the segment file (default `/dev/shm`).
    pub fn dir(mut self, dir: impl AsRef<Path>) -> Builder {
        self.dir = Some(dir.as_ref().to_owned());
        self
    }

    /// The directory, if any (`None` keeps the default).
    pub fn dir_opt(mut self, dir: Option<&Path>) -> Builder {
        self.dir = dir.map(Path::to_owned);
        self
    }

    /// Number of slots (create only).
    pub fn capacity(mut self, capacity: u64) -> Builder {
        self.capacity = Some(capacity);
        self
    }

    /// The record schema (create only).
    pub fn schema(mut self, schema: Schema) -> Builder {
        self.schema = Some(schema);
        self
    }

    /// How the buffer samples (create only; default [`Sampler::Uniform`]).
    pub fn sampler(mut self, sampler: Sampler) -> Builder {
        self.sampler = sampler;
        self
    }

    /// The rate limiter (create only; default none: nothing waits). A [`Sampler::Queue`] has
    /// its own flow control and takes none.
    pub fn limiter(mut self, limiter: Option<Limiter>) -> Builder {
        self.limiter = limiter;
        self
    }

    /// Seeds the handle's random draws (create, open or inspect; default none: a fresh
    /// sequence per handle and per process). See [`ReplayBuffer::reseed`].
    pub fn seed(mut self, seed: u64) -> Builder {
        self.seed = Some(seed);
        self
    }

    /// The seed, if any (`None` keeps the default: unseeded).
    pub fn seed_opt(mut self, seed: Option<u64>) -> Builder {
        self.seed = seed;
        self
    }

    /// Backs the new segment with 2 MiB pages where the kernel can (create only; default
    /// false). Random sampling of a large buffer then takes fewer TLB misses, in every process
    /// that attaches it: `sample(256)` at 1M control slots took 25.4 µs instead of 29.8 µs on
    /// the development VM (README, "Big buffers: huge pages"). It costs time at creation, when
    /// the kernel moves the pages (about 3 s per GiB measured there). Needs Linux 6.1+
    /// (`MADV_COLLAPSE`) and a tmpfs (as `/dev/shm`); no root, and whatever the system's
    /// `shmem_enabled` says unless it is `deny`. Where the kernel refuses, the buffer works on
    /// ordinary pages: see [`ReplayBuffer::huge_page_bytes`].
    pub fn huge_pages(mut self, huge_pages: bool) -> Builder {
        self.huge_pages = huge_pages;
        self
    }

    /// Creates the buffer. Fails with [`Error::AlreadyExists`] if the name is taken and
    /// [`Error::InsufficientSpace`] if the filesystem cannot hold it (nothing is left behind).
    pub fn create(self) -> Result<ReplayBuffer> {
        self.create_ring(None)
    }

    /// Creates the ring: a plain one, or an episode buffer's (whose schema already holds the
    /// metadata fields).
    fn create_ring(self, episodes: Option<layout::EpisodeSpec>) -> Result<ReplayBuffer> {
        let seed = self.seed;
        Ok(seeded(ReplayBuffer::create_at(self, episodes)?, seed))
    }

    /// Attaches to the existing buffer, after validating everything in its header. An
    /// episode buffer is refused: open it with [`EpisodeBuffer`](episodes::EpisodeBuffer).
    pub fn open(self) -> Result<ReplayBuffer> {
        let buffer = self.open_any()?;
        buffer.refuse_episodes("open")?;
        Ok(buffer)
    }

    /// Attaches to the existing buffer, whatever its kind.
    fn open_any(self) -> Result<ReplayBuffer> {
        let buffer = ReplayBuffer::open(&self.name, self.dir.as_deref(), true)?;
        Ok(seeded(buffer, self.seed))
    }

    /// Opens the buffer just to look at it: not counted as attached, no prefaulting; it
    /// registers if it is used to write or sample.
    pub fn inspect(self) -> Result<ReplayBuffer> {
        let buffer = ReplayBuffer::open(&self.name, self.dir.as_deref(), false)?;
        Ok(seeded(buffer, self.seed))
    }
}

/// A shared-memory replay buffer: a ring of `capacity` fixed-size records that any number of
/// processes write and sample concurrently. See the crate docs for an example.
#[derive(Debug)]
pub struct ReplayBuffer {
    segment: Segment,
    schema: Schema,
    layout: Layout,
    copy: CopyPlan,
    name: String,
    path: PathBuf,
    handle: Mutex<Handle>,
    /// The file description holding this handle's locks; replaced in a forked child.
    lock_file: RwLock<Arc<LockFile>>,
    /// The process image `lock_file` belongs to, readable without locking.
    lock_image: AtomicU64,
    /// The registration (see [`registration_word`]), readable without locking (0: none).
    registered: AtomicU64,
    /// The state of this handle's generator: each sampling call takes the next one.
    rng: AtomicU64,
    /// Whether `rng` was seeded ([`ReplayBuffer::reseed`]): then the draws do not depend on
    /// the process.
    seeded: AtomicBool,
    /// When this handle next looks for tree changes left half-done by dead processes
    /// (nanoseconds since `clock`).
    repair_due: AtomicU64,
    /// When this handle next looks for waiters of dead processes (see `flow`).
    waiters_check_due: AtomicU64,
    clock: Instant,
    /// `(entry, owner)` of dead processes whose tree changes this process has repaired without
    /// being able to reset them (their entry lock is held by a forked child that lives on).
    repaired: Mutex<Vec<(usize, u64)>>,
}

impl ReplayBuffer {
    /// Options for creating or opening buffer `name`.
    pub fn builder(name: &str) -> Builder {
        Builder {
            name: name.to_owned(),
            dir: None,
            capacity: None,
            schema: None,
            sampler: Sampler::Uniform,
            limiter: None,
            seed: None,
            huge_pages: false,
        }
    }

    /// Creates buffer `name` in `dir` (default `/dev/shm`); see [`Builder::create`].
    pub fn create(
        name: &str,
        dir: Option<&Path>,
        capacity: u64,
        schema: Schema,
    ) -> Result<ReplayBuffer> {
        Self::builder(name)
            .dir_opt(dir)
            .capacity(capacity)
            .schema(schema)
            .create()
    }

    /// Attaches to existing buffer `name` in `dir`; see [`Builder::open`].
    pub fn attach(name: &str, dir: Option<&Path>) -> Result<ReplayBuffer> {
        Self::builder(name).dir_opt(dir).open()
    }

    /// Opens buffer `name` just to look at it; see [`Builder::inspect`].
    pub fn inspect(name: &str, dir: Option<&Path>) -> Result<ReplayBuffer> {
        Self::open(name, dir, false)
    }

    fn create_at(options: Builder, episodes: Option<layout::EpisodeSpec>) -> Result<ReplayBuffer> {
        let Builder {
            name,
            dir,
            capacity: Some(capacity),
            schema: Some(schema),
            sampler,
            limiter,
            huge_pages,
            ..
        } = options
        else {
            return Err(Error::InvalidArgument(
                "creating a buffer needs a capacity and a schema".into(),
            ));
        };
        let path = segment_path(&name, dir.as_deref())?;
        let text = schema.encode();
        let mut layout = Layout::new(
            capacity,
            schema.record_bytes(),
            text.len(),
            sampler,
            limiter,
        )?;
        if let Some(spec) = episodes {
            layout = layout.with_episodes(spec)?;
        }
        check_atomics(&layout)?;
        let me = liveness::current();
        // The creator's lock and entry are taken before the segment is published, so that no
        // gc ever sees it without a live holder.
        let take_creator_lock = |file: &File| {
            let lock = LockFile::new(
                file.try_clone()
                    .map_err(|e| Error::io("dup segment fd", e))?,
            );
            if lock.try_lock(CREATOR_LOCK, LockKind::Exclusive)? {
                Ok(())
            } else {
                Err(Error::io(
                    "lock a new segment",
                    std::io::Error::other("the new file is locked by someone else"),
                ))
            }
        };
        let (segment, file) = Segment::create(
            &path,
            layout.total_bytes as u64,
            huge_pages,
            take_creator_lock,
            |segment| {
                layout::write_header(segment, &schema, &layout, &text, me, unix_nanos());
                write_owner(segment, &layout, 0, me);
                segment
                    .word(control(&layout, layout::C_ENTRIES_USED))
                    .store(1, Ordering::Release);
                Ok(())
            },
        )?;
        // The lock belongs to the file description, which the duplicate shares with `file`:
        // closing the duplicate leaves it held by `file`, which the handle keeps.
        let buffer = ReplayBuffer::from_parts(segment, file, schema, layout, &name, path);
        {
            let mut handle = buffer.lock_handle(&mut NoBlocking)?;
            handle.entry = Some(0);
            buffer.publish_registration(handle.image, 0);
        }
        Ok(buffer)
    }

    fn open(name: &str, dir: Option<&Path>, register: bool) -> Result<ReplayBuffer> {
        let path = segment_path(name, dir)?;
        let (segment, file) = Segment::open(&path, layout::MIN_SEGMENT_BYTES)?;
        let (schema, layout) = layout::read_header(&segment, &path)?;
        check_atomics(&layout)?;
        crate::platform::files::ensure_allocated(&file, &path, layout.total_bytes as u64)?;
        let buffer = ReplayBuffer::from_parts(segment, file, schema, layout, name, path);
        if register {
            let mut handle = buffer.lock_handle(&mut NoBlocking)?;
            buffer.prepare(&mut handle, &mut NoBlocking, true, true)?;
            drop(handle);
            buffer.segment.prefault(&mut Patience::new())?;
        }
        Ok(buffer)
    }

    fn from_parts(
        segment: Segment,
        file: File,
        schema: Schema,
        layout: Layout,
        name: &str,
        path: PathBuf,
    ) -> Self {
        // Handles made in the same nanosecond still draw different streams.
        static HANDLES: AtomicU64 = AtomicU64::new(0);
        let seed = unix_nanos() ^ HANDLES.fetch_add(1, Ordering::Relaxed).wrapping_mul(GOLDEN);
        let image = liveness::image();
        ReplayBuffer {
            copy: CopyPlan::new(&schema, &layout),
            segment,
            schema,
            layout,
            name: name.to_owned(),
            path,
            handle: Mutex::new(Handle { image, entry: None }),
            lock_file: RwLock::new(Arc::new(LockFile::new(file))),
            lock_image: AtomicU64::new(image),
            registered: AtomicU64::new(0),
            rng: AtomicU64::new(seed),
            seeded: AtomicBool::new(false),
            repair_due: AtomicU64::new(0),
            waiters_check_due: AtomicU64::new(0),
            clock: Instant::now(),
            repaired: Mutex::new(Vec::new()),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this is the ring of an episode buffer.
    pub fn holds_episodes(&self) -> bool {
        self.layout.episodes.is_some()
    }

    /// Refuses `what` on the ring of an episode buffer: records written or read as plain rows
    /// would bypass its episode metadata.
    fn refuse_episodes(&self, what: &str) -> Result<()> {
        if self.holds_episodes() {
            return Err(Error::InvalidArgument(format!(
                "{} is an EpisodeBuffer: {what} it with EpisodeBuffer, not ReplayBuffer",
                self.name
            )));
        }
        Ok(())
    }

    /// The segment file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `(device, inode)` of the segment file this handle mapped.
    pub fn file_id(&self) -> (u64, u64) {
        self.segment.file_id()
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

    /// Bytes of this process's mapping of the segment that are mapped with 2 MiB pages (see
    /// [`Builder::huge_pages`]); `None` where `/proc/self/smaps` cannot be read. A handle from
    /// [`ReplayBuffer::inspect`] counts only the pages it has touched.
    pub fn huge_page_bytes(&self) -> Option<u64> {
        self.segment.huge_page_bytes()
    }

    /// Removes the segment file if it is still the one this handle mapped ([`Error::NotFound`]
    /// if it was removed, or if its name now belongs to another buffer, which is left alone).
    /// Mappings (this one included) stay valid until closed.
    pub fn unlink(&self) -> Result<()> {
        crate::platform::files::remove_if_same(&self.path, self.file_id())
    }

    // ---- the handle in this process ----

    /// Locks this handle's state, waiting (through `blocking`, interruptibly) if another
    /// thread holds it: writes through one handle are serialised.
    fn lock_handle(&self, blocking: &mut dyn Blocking) -> Result<MutexGuard<'_, Handle>> {
        let started = Instant::now();
        loop {
            match self.handle.try_lock() {
                Ok(guard) => return Ok(guard),
                Err(std::sync::TryLockError::Poisoned(p)) => return Ok(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
            let mut interrupted = false;
            blocking.block(&mut || {
                let mut patience = Patience::new();
                let mut pause = Backoff::new();
                // Wait until the holder lets go (not holding it: we retake it outside).
                while matches!(
                    self.handle.try_lock(),
                    Err(std::sync::TryLockError::WouldBlock)
                ) {
                    if patience.interrupted() {
                        interrupted = true;
                        return;
                    }
                    if started.elapsed() > WAIT_LIMIT {
                        return;
                    }
                    pause.wait();
                }
            });
            if interrupted {
                return Err(Error::Interrupted);
            }
            if started.elapsed() > WAIT_LIMIT {
                return Err(self.handle_busy());
            }
        }
    }

    /// Why this handle's state stayed locked past the bound: another thread of this process
    /// is in a long call, or (after `fork`) a thread of the parent was, and it does not exist
    /// here to let go.
    fn handle_busy(&self) -> Error {
        Error::Contended(format!(
            "{}: this handle stayed busy for {} s: another thread is in a long call on it, or \
             the handle was inherited through fork while a thread of the parent was using it \
             (attach anew in the child: ReplayBuffer.attach(name))",
            self.name,
            WAIT_LIMIT.as_secs()
        ))
    }

    /// The lock file slot, for replacing it in a forked child; bounded like `lock_handle`.
    fn write_lock_file(&self) -> Result<std::sync::RwLockWriteGuard<'_, Arc<LockFile>>> {
        let started = Instant::now();
        loop {
            match self.lock_file.try_write() {
                Ok(guard) => return Ok(guard),
                Err(std::sync::TryLockError::Poisoned(p)) => return Ok(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) if started.elapsed() > WAIT_LIMIT => {
                    return Err(self.handle_busy())
                }
                Err(std::sync::TryLockError::WouldBlock) => {
                    std::thread::sleep(Duration::from_micros(200))
                }
            }
        }
    }

    /// The entry of this handle in the calling process, registering it first if needed
    /// (a new handle, or one inherited through `fork`).
    fn ensure_registered(&self, blocking: &mut dyn Blocking) -> Result<usize> {
        if let Some(entry) = self.registered_entry() {
            return Ok(entry);
        }
        let mut handle = self.lock_handle(blocking)?;
        self.prepare(&mut handle, blocking, true, false)
            .map(|e| e.expect("registered"))
    }

    /// The entry registered for the calling process, if any (no locking).
    fn registered_entry(&self) -> Option<usize> {
        let word = self.registered.load(Ordering::Acquire);
        let entry = (word & 0xffff) as usize;
        (entry != 0 && word == registration_word(liveness::image(), entry - 1)).then(|| entry - 1)
    }

    fn publish_registration(&self, image: u64, entry: usize) {
        self.registered
            .store(registration_word(image, entry), Ordering::Release);
    }

    /// Makes the handle usable by the calling process: after `fork`, a lock file of its own
    /// (and a new entry if the parent's handle had one); with `register`, an entry.
    ///
    /// `attaching`: this is `attach` itself, which must not register in a file a gc has just
    /// removed; a handle that already held the buffer (an `inspect` handle starting to write,
    /// a forked child's inherited handle) may keep using it after an unlink.
    fn prepare(
        &self,
        handle: &mut Handle,
        blocking: &mut dyn Blocking,
        register: bool,
        attaching: bool,
    ) -> Result<Option<usize>> {
        let me = liveness::image();
        let forked = handle.image != me;
        let needs_entry = register || (forked && handle.entry.is_some());
        if forked {
            // Until the child has locks of its own it keeps the inherited description (and
            // with it the parent's entry lock): the buffer stays held meanwhile.
            let fresh = Arc::new(self.current_lock_file().reopen()?);
            if needs_entry {
                let entry = self.register_with(&fresh, false, blocking)?;
                handle.entry = Some(entry);
                self.publish_registration(me, entry);
            } else {
                handle.entry = None;
                self.registered.store(0, Ordering::Release);
            }
            *self.write_lock_file()? = fresh;
            self.lock_image.store(me, Ordering::Release);
            handle.image = me;
        } else if needs_entry && handle.entry.is_none() {
            let entry = self.register_with(&self.current_lock_file(), attaching, blocking)?;
            handle.entry = Some(entry);
            self.publish_registration(me, entry);
        }
        Ok(handle.entry)
    }

    pub(crate) fn current_lock_file(&self) -> Arc<LockFile> {
        self.lock_file
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The lock file of the calling process (reopened first in a forked child).
    fn locks(&self, blocking: &mut dyn Blocking) -> Result<Arc<LockFile>> {
        if self.lock_image.load(Ordering::Acquire) != liveness::image() {
            let mut handle = self.lock_handle(blocking)?;
            self.prepare(&mut handle, blocking, false, false)?;
        }
        Ok(self.current_lock_file())
    }

    /// Takes a handle entry through `lock` (see `protocol::gate` for why under the gate).
    fn register_with(
        &self,
        lock: &LockFile,
        require_linked: bool,
        blocking: &mut dyn Blocking,
    ) -> Result<usize> {
        let locks = GateLocks(lock);
        let mut outcome = None;
        let started = Instant::now();
        loop {
            match gate::admit(&locks, require_linked, || self.take_entry(lock))? {
                Admission::Admitted(entry) => return Ok(entry),
                Admission::Removed => return Err(Error::NotFound(self.path.clone())),
                Admission::Busy => {}
            }
            if started.elapsed() > WAIT_LIMIT {
                return Err(Error::Contended(format!(
                    "{}: a gc has been deciding about this buffer for {} s (is it stopped?)",
                    self.path.display(),
                    WAIT_LIMIT.as_secs()
                )));
            }
            // A gc decides in microseconds; wait for it outside the embedder's lock.
            blocking.block(&mut || {
                std::thread::sleep(Duration::from_micros(200));
                outcome = Some(Patience::interrupted_now());
            });
            if outcome == Some(true) {
                return Err(Error::Interrupted);
            }
        }
    }

    /// Locks the first entry nobody holds and makes it ours. An entry whose dead owner left a
    /// slot half-overwritten stays out of use until that slot is taken over (its missing
    /// record must stay visible in the size); one whose dead owner committed a first fill it
    /// did not count is settled first.
    fn take_entry(&self, lock: &LockFile) -> Result<usize> {
        let me = liveness::current();
        for e in 0..MAX_HANDLES {
            if !lock.try_lock(entry_lock(e), LockKind::Exclusive)? {
                continue;
            }
            let entry = self.entry(e);
            if entry.holds_overwrite(|t| self.seq_of_ticket(t)) {
                lock.unlock(entry_lock(e));
                continue;
            }
            if let (_, 1) = entry.size_terms(|t| self.seq_of_ticket(t)) {
                let intent = entry.intent.load(Ordering::Acquire);
                if let Some(t) = handles::intent_ticket(intent) {
                    entry.settle(slot::committed_first(t, e));
                }
            }
            entry.end();
            // A dead owner's queue claim: its tickets are skipped from now on. Its waiters.
            self.entry_word(e, handles::E_QUEUE_CLAIM)
                .store(0, Ordering::SeqCst);
            self.forget_waiters_of(e);
            // Its dead owner may have been changing priorities: finish that first.
            self.repair_entry(e, true);
            write_owner(&self.segment, &self.layout, e, me);
            self.word(self.control(layout::C_ENTRIES_USED))
                .fetch_max(e as u64 + 1, Ordering::AcqRel);
            return Ok(e);
        }
        Err(Error::TooManyHandles(MAX_HANDLES))
    }

    // ---- liveness of other handles ----

    /// Whether the writer named in busy word `word` can never finish: see [`Orphan`].
    fn orphan(&self, word: u64, lock: &LockFile) -> Orphan {
        if !slot::names_a_ticket(word) {
            return Orphan::Yes; // damaged or forged: no writer ever stores such a word
        }
        let e = slot::owner_of(word);
        let intent = self.entry(e).intent.load(Ordering::Acquire);
        if handles::intent_ticket(intent) != Some(slot::ticket_of(word)) {
            // The entry's writer announces every ticket before claiming its slot and moves on
            // only after committing it, so this slot's writer is gone (dead, or its entry
            // reused since). Callers re-check that the slot still holds `word`.
            return Orphan::Yes;
        }
        match self.entry_liveness(e, lock) {
            Liveness::Dead => Orphan::Yes,
            other => Orphan::No(other),
        }
    }

    /// Whether the process holding entry `e` is provably dead: its entry lock is free (the
    /// kernel drops it when the process dies), or it held the lock through a description a
    /// forked child shares and its own pid is provably gone.
    fn entry_liveness(&self, e: usize, lock: &LockFile) -> Liveness {
        if self.registered_entry() == Some(e) {
            return Liveness::Alive;
        }
        match lock.held_by_others(entry_lock(e)) {
            Ok(false) => Liveness::Dead,
            Ok(true) => liveness::liveness(self.owner(e)),
            Err(_) => match liveness::liveness(self.owner(e)) {
                Liveness::Dead => Liveness::Dead,
                _ => Liveness::Unknown,
            },
        }
    }

    fn owner(&self, e: usize) -> Identity {
        Identity {
            word: self.entry_word(e, handles::E_OWNER).load(Ordering::Acquire),
            namespace: self
                .entry_word(e, handles::E_NAMESPACE)
                .load(Ordering::Acquire),
        }
    }

    // ---- addressing ----

    fn word(&self, offset: usize) -> &AtomicU64 {
        self.segment.word(offset)
    }

    fn control(&self, word: usize) -> usize {
        control(&self.layout, word)
    }

    fn slot_offset(&self, index: usize) -> usize {
        self.layout.slots_offset + index * self.layout.slot_bytes
    }

    fn seq(&self, index: usize) -> &AtomicU64 {
        self.word(self.slot_offset(index))
    }

    fn seq_of_ticket(&self, ticket: u64) -> &AtomicU64 {
        self.seq((ticket % self.capacity()) as usize)
    }

    fn record_offset(&self, index: usize) -> usize {
        self.slot_offset(index) + self.layout.record_in_slot
    }

    fn entry_word(&self, entry: usize, offset: usize) -> &AtomicU64 {
        self.word(entry_offset(&self.layout, entry) + offset)
    }

    fn entry(&self, e: usize) -> Entry<'_> {
        Entry {
            index: e,
            intent: self.entry_word(e, handles::E_INTENT),
            firsts: self.entry_word(e, handles::E_FIRSTS),
        }
    }

    /// True at most once per `every` for this handle (and `next`, the time of the next one in
    /// nanoseconds since `clock`): for the periodic checks ordinary calls make.
    fn due(&self, next: &AtomicU64, every: Duration) -> bool {
        let now = self.clock.elapsed().as_nanos() as u64;
        let due = next.load(Ordering::Relaxed);
        now >= due
            && next
                .compare_exchange(
                    due,
                    now + every.as_nanos() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// Entries ever registered (the table is scanned up to here).
    fn entries_used(&self) -> usize {
        (self
            .word(self.control(layout::C_ENTRIES_USED))
            .load(Ordering::Acquire) as usize)
            .min(MAX_HANDLES)
    }

    fn count(&self, entry: usize, counter: Counter, n: u64) {
        if n > 0 {
            self.entry_word(entry, counter.offset())
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

    /// Seeds this handle's random draws: from now on, its sampling calls draw one fixed
    /// sequence, the same for every handle seeded with `seed` (in any process), so that two
    /// handles seeded alike draw the same rows from a buffer in the same state.
    ///
    /// The seed is this handle's only, never shared through the buffer. A seeded handle's
    /// draws do not depend on the process: a forked child using a handle inherited after the
    /// seed repeats its parent's draws unless it reseeds. Each call takes the next state
    /// atomically, so calls from several threads on one handle draw distinct rows, but which
    /// thread gets which is not reproducible. A slot found mid-write is redrawn, which takes
    /// draws from the sequence: draws reproduce on a buffer nobody writes while they are made.
    pub fn reseed(&self, seed: u64) {
        // Mixed first, so that seeds differing by a multiple of the per-call step still give
        // unrelated sequences.
        self.rng.store(mix64(seed), Ordering::Relaxed);
        self.seeded.store(true, Ordering::Relaxed);
    }

    /// A generator for one call, distinct per call and per handle. Unseeded, also per process
    /// (a forked child starts with its parent's state and must not repeat its draws); seeded,
    /// the same in every process (see [`reseed`](Self::reseed)).
    fn rng_for_call(&self) -> Rng {
        let state = self.rng.fetch_add(GOLDEN, Ordering::Relaxed);
        let mut rng = if self.seeded.load(Ordering::Relaxed) {
            Rng(state)
        } else {
            Rng(state ^ u64::from(liveness::pid()).rotate_left(40))
        };
        rng.next();
        rng
    }
}

/// Prioritized buffers need 128-bit atomics that work across processes: lock-free ones
/// (`cmpxchg16b`, which every x86-64 CPU of the last 15 years has).
fn check_atomics(layout: &Layout) -> Result<()> {
    if layout.priority.is_some() && !portable_atomic::AtomicU128::is_lock_free() {
        return Err(Error::WrongSampler(
            "prioritized buffers need lock-free 128-bit atomics (cmpxchg16b), which this CPU \
             lacks"
                .into(),
        ));
    }
    Ok(())
}

/// What [`ReplayBuffer::orphan`] found about a busy slot's writer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Orphan {
    /// It can never finish: the slot may be taken over (or read as holding no record).
    Yes,
    /// It may still be copying (alive, or not provably dead).
    No(Liveness),
}

/// The kernel locks of one segment, as the handshake of `protocol::gate` sees them.
pub(crate) struct GateLocks<'a>(pub &'a LockFile);

impl SegmentLocks for GateLocks<'_> {
    fn try_gate(&self, exclusive: bool) -> Result<bool> {
        let kind = if exclusive {
            LockKind::Exclusive
        } else {
            LockKind::Shared
        };
        self.0.try_lock(GATE_LOCK, kind)
    }
    fn release_gate(&self) {
        self.0.unlock(GATE_LOCK);
    }
    fn try_all_entries(&self) -> Result<bool> {
        self.0.try_lock(ALL_ENTRY_LOCKS, LockKind::Exclusive)
    }
    fn release_all_entries(&self) {
        self.0.unlock(ALL_ENTRY_LOCKS);
    }
    fn is_linked(&self) -> Result<bool> {
        self.0.is_linked()
    }
}

/// A registration in one word: the process image's fork count (low 16 bits) and pid, and the
/// entry + 1 (so that 0 means none).
fn registration_word(image: u64, entry: usize) -> u64 {
    let forks = (image >> 32) & 0xffff;
    let pid = image & 0xffff_ffff;
    forks << 48 | pid << 16 | (entry as u64 + 1)
}

fn control(layout: &Layout, word: usize) -> usize {
    layout.control_offset + word
}

fn entry_offset(layout: &Layout, entry: usize) -> usize {
    layout.handles_offset + entry * ENTRY_BYTES
}

fn write_owner(segment: &Segment, layout: &Layout, entry: usize, me: Identity) {
    let at = entry_offset(layout, entry);
    segment
        .word(at + handles::E_NAMESPACE)
        .store(me.namespace, Ordering::Release);
    segment
        .word(at + handles::E_OWNER)
        .store(me.word, Ordering::Release);
}

pub(crate) fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Spin a little, then yield, then sleep up to a millisecond: for waits that are usually short
/// (a writer finishing its copy) but may last (a stopped process).
pub(crate) struct Backoff(u32);

impl Backoff {
    pub(crate) fn new() -> Backoff {
        Backoff(0)
    }

    pub(crate) fn wait(&mut self) {
        self.0 = self.0.saturating_add(1);
        match self.0 {
            0..=15 => std::hint::spin_loop(),
            16..=63 => std::thread::yield_now(),
            n => std::thread::sleep(Duration::from_micros(u64::from((n - 63).min(1000)))),
        }
    }
}

/// wyrand: a tiny, fast generator; plenty for drawing slot indices.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) ^ t) as u64
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is below 2^-40 for any ring size).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// splitmix64's finaliser: a bijection of `u64` that scatters nearby inputs.
fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `buffer`, its draws seeded with `seed` if there is one.
fn seeded(buffer: ReplayBuffer, seed: Option<u64>) -> ReplayBuffer {
    if let Some(seed) = seed {
        buffer.reseed(seed);
    }
    buffer
}

/// A fresh generator seeded from the clock and the pid.
pub(crate) fn seeded_rng() -> Rng {
    Rng(unix_nanos() ^ u64::from(std::process::id()).rotate_left(32))
}
