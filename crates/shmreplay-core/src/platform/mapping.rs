//! One shared-memory file mapped into this process: creation with the whole size reserved,
//! opening with ownership checks, and bounds-checked atomic access to its bytes.
//!
//! Every segment is mapped at an address aligned to the huge page size (2 MiB on x86-64), and a
//! new segment created with `huge_pages` has its pages moved to huge pages where the kernel can
//! (`MADV_COLLAPSE`, Linux 6.1+: it works on tmpfs even when `shmem_enabled` is `never`, the
//! usual setting, without root). Every process that maps such a file aligned then reaches it
//! through 2 MiB page-table entries: one TLB entry covers 512 times the memory, which is what
//! random sampling of a large buffer runs short of.
//!
//! Mapping, and turning mapped addresses into `&AtomicU64` and handing them to the copy
//! kernels, is the `unsafe` here. Every access is bounds-checked, so the layers above work with
//! byte offsets and cannot touch memory outside the mapping.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

use rustix::io::Errno;

use crate::error::{Error, Result};
use crate::platform::copy::Kernel;
use crate::platform::files::{self, RemoveOnDrop, Reserve};
use crate::platform::interrupt::Patience;
use crate::platform::memory::{Input, Output};

/// The size of a PMD-mapped huge page where the kernel does not say: x86-64's, and arm64's with
/// 4 KiB base pages.
const DEFAULT_HUGE_PAGE: usize = 2 << 20;
/// `madvise` advice: populate the range writable now (Linux 5.14+).
const MADV_POPULATE_WRITE: libc::c_int = 23;
/// `madvise` advice: back the range with huge pages now (Linux 6.1+).
const MADV_COLLAPSE: libc::c_int = 25;
/// Ranges given to one `madvise` call, so that Ctrl-C is noticed between them.
const ADVICE_CHUNK: usize = 64 << 20;

/// A shared, writable mapping of a whole file at a 2 MiB-aligned address; unmapped on drop.
#[derive(Debug)]
struct Mapping {
    start: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is shared memory that every thread (and process) reaches only through
// atomics and the copy kernels; the pointer is never freed while a `Mapping` exists.
unsafe impl Send for Mapping {}
// SAFETY: as for `Send`: `&Mapping` hands out nothing but the address.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `file` from its start. The address is 2 MiB-aligned (file offset
    /// and address congruent modulo 2 MiB), so that 2 MiB pages of the file can be mapped
    /// whole: `len + 2 MiB` of address space is reserved, the file mapped over its first
    /// aligned part, and the rest given back.
    fn new(file: &File, len: usize) -> std::io::Result<Mapping> {
        let huge = huge_page_size();
        let span = len
            .checked_add(huge)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: a new private anonymous mapping at an address the kernel picks: it replaces
        // nothing, and PROT_NONE with MAP_NORESERVE commits no memory.
        let reserved = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if reserved == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base = reserved as usize;
        let start = base.next_multiple_of(huge);
        let page = page_size();
        let end = start + len.next_multiple_of(page);
        // SAFETY: `[start, end)` lies inside the reservation made above, which this function
        // alone owns, so MAP_FIXED replaces nothing else: `base` is page-aligned, so
        // `start - base <= 2 MiB - page`, and `end - start < len + page`.
        let mapped = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                file.as_raw_fd(),
                0,
            )
        };
        let error = (mapped == libc::MAP_FAILED).then(std::io::Error::last_os_error);
        // Give back the reservation before `start` and after `end`. Not `[start, end)` if the
        // mapping failed: a failed MAP_FIXED may already have unmapped it (kernels before 6.12),
        // and another thread may have mapped something there since; at worst an error leaves
        // that much address space reserved, and no memory.
        for (address, bytes) in [(base, start - base), (end, base + span - end)] {
            if bytes > 0 {
                // SAFETY: a part of the reservation made above that MAP_FIXED did not touch,
                // which nothing else uses.
                unsafe { libc::munmap(address as *mut libc::c_void, bytes) };
            }
        }
        match (error, NonNull::new(mapped.cast::<u8>())) {
            (None, Some(start)) => Ok(Mapping { start, len }),
            (Some(e), _) => Err(e),
            (None, None) => Err(std::io::Error::from_raw_os_error(libc::EFAULT)),
        }
    }

    fn as_ptr(&self) -> *const u8 {
        self.start.as_ptr()
    }

    fn as_mut_ptr(&self) -> *mut u8 {
        self.start.as_ptr()
    }

    fn len(&self) -> usize {
        self.len
    }

    /// `madvise(advice)` over `[offset, offset + len)` (`offset` page-aligned).
    fn advise(&self, offset: usize, len: usize, advice: libc::c_int) -> std::io::Result<()> {
        assert!(offset % page_size() == 0 && offset.saturating_add(len) <= self.len);
        // SAFETY: the range lies inside this mapping (checked), and the two advices used here
        // (populate, collapse) change no byte of it: they only fill page tables or move the
        // same contents to huge pages.
        let result = unsafe { libc::madvise(self.as_mut_ptr().add(offset).cast(), len, advice) };
        if result == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made by `new`, unmapped once; nothing borrowed from it outlives
        // `self` (every reference handed out borrows the `Segment` that owns it).
        unsafe { libc::munmap(self.start.as_ptr().cast(), self.len) };
    }
}

/// The size of a PMD-mapped huge page, as the kernel says (2 MiB where it does not): what
/// `huge_pages` segments are moved to, and what every mapping is aligned to.
pub fn huge_page_size() -> usize {
    static SIZE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SIZE.get_or_init(|| {
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .filter(|size| size.is_power_of_two() && *size >= page_size())
            .unwrap_or(DEFAULT_HUGE_PAGE)
    })
}

fn page_size() -> usize {
    // SAFETY: sysconf reads a constant of the system.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        size if size > 0 => size as usize,
        _ => 4096,
    }
}

/// A mapped segment file. The mapping stays valid after the file is closed or unlinked; the
/// handle keeps one descriptor of the file for its locks (see `locks`).
#[derive(Debug)]
pub(crate) struct Segment {
    map: Mapping,
    /// `(device, inode)` of the file mapped: tells whether a path still names this segment.
    file_id: (u64, u64),
}

impl Segment {
    /// Creates the segment file `path` of `size` bytes, mode 0600, with all its space reserved
    /// (so that no later page fault can SIGBUS for lack of space), mapped and prefaulted.
    ///
    /// The file is built under a hidden temporary name, initialised by `init`, and only then
    /// renamed to `path` without replacing anything: whoever finds a file at `path` finds a
    /// complete segment. Nothing is left behind on error.
    ///
    /// `lock` gets the file as soon as it exists, to take the creator's locks before the long
    /// reservation; `init` fills in the mapping before anyone can see it. With `huge_pages`,
    /// the pages are moved to 2 MiB pages first (see [`Segment::collapse`]).
    pub(crate) fn create(
        path: &Path,
        size: u64,
        huge_pages: bool,
        lock: impl FnOnce(&File) -> Result<()>,
        init: impl FnOnce(&Segment) -> Result<()>,
    ) -> Result<(Segment, File)> {
        let dir = path.parent().unwrap_or(Path::new("/"));
        if path.exists() {
            return Err(Error::AlreadyExists(path.to_owned()));
        }
        let free = files::free_bytes(dir)?;
        let no_space = || Error::InsufficientSpace {
            path: path.to_owned(),
            needed: size,
            free,
        };
        if size > free {
            return Err(no_space());
        }
        let (temp, file) = files::create_temporary(path)?;
        let remove_on_error = RemoveOnDrop(Some(temp.clone()));
        lock(&file)?;
        // The umask may have cleared bits of 0600 but never adds any; make it exact.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(format!("chmod {}", temp.display()), e))?;
        let mut patience = Patience::new();
        files::reserve(&file, size, &mut patience).map_err(|e| match e {
            Reserve::Interrupted => Error::Interrupted,
            Reserve::Failed(Errno::NOSPC | Errno::FBIG | Errno::NOMEM) => no_space(),
            Reserve::Failed(e) => {
                Error::io(format!("reserve {size} bytes for {}", path.display()), e)
            }
        })?;
        let segment = Segment::map(&file, &temp)?;
        segment.prefault(&mut patience)?;
        if huge_pages {
            segment.collapse(&mut patience)?;
        }
        init(&segment)?;
        files::publish(&temp, path)?;
        remove_on_error.disarm();
        Ok((segment, file))
    }

    /// Opens and maps an existing segment file owned by this user; returns the open file too.
    pub(crate) fn open(path: &Path, min_size: u64) -> Result<(Segment, File)> {
        // Never through a symbolic link: in a shared directory like /dev/shm anyone can plant
        // one under a buffer's name.
        let file = files::open_nofollow(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound(path.to_owned()),
            std::io::ErrorKind::PermissionDenied => Error::PermissionDenied {
                path: path.to_owned(),
                reason: "the segment belongs to another user (mode 0600)".into(),
            },
            _ if e.raw_os_error() == Some(Errno::LOOP.raw_os_error()) => Error::PermissionDenied {
                path: path.to_owned(),
                reason: "it is a symbolic link, which shmreplay never follows".into(),
            },
            // A directory, a socket, a device without a driver.
            _ if [Errno::ISDIR, Errno::NXIO, Errno::NODEV]
                .iter()
                .any(|errno| e.raw_os_error() == Some(errno.raw_os_error())) =>
            {
                Error::Corrupt {
                    path: path.to_owned(),
                    reason: "not a regular file".into(),
                }
            }
            _ => Error::io(format!("open {}", path.display()), e),
        })?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
        let corrupt = |reason: String| Error::Corrupt {
            path: path.to_owned(),
            reason,
        };
        if !meta.file_type().is_file() {
            return Err(corrupt("not a regular file".into()));
        }
        let me = rustix::process::geteuid().as_raw();
        if meta.uid() != me {
            return Err(Error::PermissionDenied {
                path: path.to_owned(),
                reason: format!(
                    "owned by uid {}, not by this process's uid {me}",
                    meta.uid()
                ),
            });
        }
        if meta.len() < min_size || meta.len() % 8 != 0 || usize::try_from(meta.len()).is_err() {
            return Err(corrupt(format!(
                "file size {} is not a segment size",
                meta.len()
            )));
        }
        let segment = Segment::map(&file, path)?;
        Ok((segment, file))
    }

    fn map(file: &File, path: &Path) -> Result<Segment> {
        let meta = file
            .metadata()
            .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
        let len = usize::try_from(meta.len()).map_err(|_| Error::Corrupt {
            path: path.to_owned(),
            reason: format!("file size {} does not fit in memory", meta.len()),
        })?;
        let map = Mapping::new(file, len)
            .map_err(|e| Error::io(format!("mmap {}", path.display()), e))?;
        Ok(Segment {
            map,
            file_id: (meta.dev(), meta.ino()),
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Fills this process's page tables for the whole mapping now, so that inserts and samples
    /// do not take a page fault on every 4 KiB they touch for the first time (8x slower first
    /// writes of Atari records, measured). Best effort: kernels before 5.14 lack the advice.
    pub(crate) fn prefault(&self, patience: &mut Patience) -> Result<()> {
        self.advise_in_chunks(
            self.map.len(),
            MADV_POPULATE_WRITE,
            patience,
            |result, _| result.is_ok(),
        )
    }

    /// Moves every whole 2 MiB stretch of the segment to a 2 MiB page. Random access then
    /// takes a TLB miss per 2 MiB instead of per 4 KiB, in this process and in every process
    /// that maps the file (aligned, as `Mapping` does). Slow: the kernel copies every page into
    /// fresh memory (about 3 s per GiB in the development VM). Best effort: the kernel may lack
    /// the advice (before 6.1), refuse it (`shmem_enabled` set to `deny`, a filesystem that is
    /// not tmpfs) or find no free 2 MiB of memory; the segment then stays on whatever pages it
    /// has, which changes nothing but speed.
    fn collapse(&self, patience: &mut Patience) -> Result<()> {
        let huge = huge_page_size();
        let mut collapsed = false;
        self.advise_in_chunks(
            self.map.len() / huge * huge,
            MADV_COLLAPSE,
            patience,
            |result, again| {
                // Busy pages, or no huge page free right now (EAGAIN; some kernels say EINVAL for
                // a page momentarily referenced): once more, then on to the next stretch.
                match result.or_else(|_| again()) {
                    Ok(()) => collapsed = true,
                    // Refused from the start: not supported here, no later stretch would do better.
                    Err(e) if !collapsed => {
                        return ![libc::EINVAL, libc::EPERM]
                            .contains(&e.raw_os_error().unwrap_or(0))
                    }
                    Err(_) => {}
                }
                true
            },
        )
    }

    /// `madvise(advice)` over `[0, end)` in chunks of whole huge pages, polling `patience`
    /// in between (a 5.6 GB segment takes seconds). `go_on(result, again)` gets each chunk's
    /// result and a way to advise that chunk once more; it returns whether to go on.
    fn advise_in_chunks(
        &self,
        end: usize,
        advice: libc::c_int,
        patience: &mut Patience,
        mut go_on: impl FnMut(std::io::Result<()>, &dyn Fn() -> std::io::Result<()>) -> bool,
    ) -> Result<()> {
        let chunk = ADVICE_CHUNK.next_multiple_of(huge_page_size());
        for offset in (0..end).step_by(chunk) {
            if patience.interrupted() {
                return Err(Error::Interrupted);
            }
            let len = chunk.min(end - offset);
            let advise = || self.map.advise(offset, len, advice);
            if !go_on(advise(), &advise) {
                break;
            }
        }
        Ok(())
    }

    /// Panics unless `[offset, offset + len)` lies inside the mapping and `offset` is 8-aligned.
    /// Offsets come from a validated layout, so a failure here is a bug, never bad input.
    fn check(&self, offset: usize, len: usize) {
        let end = offset.checked_add(len.next_multiple_of(8));
        assert!(
            offset % 8 == 0 && end.is_some_and(|end| end <= self.map.len()),
            "segment access out of bounds: offset {offset}, {len} bytes, mapping {} bytes",
            self.map.len()
        );
    }

    /// The 64-bit word at byte `offset`.
    pub(crate) fn word(&self, offset: usize) -> &AtomicU64 {
        self.check(offset, 8);
        // SAFETY: in bounds and 8-aligned (checked; the mapping is page-aligned). The mapping
        // lives as long as `self`, and every process accesses segment memory only atomically
        // (this type and `copy`), which is what `from_ptr` requires. The file is never shrunk
        // while mapped: only `ReplayBuffer::create` sizes it, before anyone can attach.
        unsafe { AtomicU64::from_ptr(self.map.as_mut_ptr().add(offset).cast()) }
    }

    /// The 32-bit word at byte `offset` (4-aligned): the futex words of flow control, which
    /// are only ever accessed as 32-bit words.
    pub(crate) fn word32(&self, offset: usize) -> &AtomicU32 {
        assert!(
            offset % 4 == 0
                && offset
                    .checked_add(4)
                    .is_some_and(|end| end <= self.map.len()),
            "segment access out of bounds: 32-bit word at {offset}, mapping {} bytes",
            self.map.len()
        );
        // SAFETY: as in `word`, for 4 bytes at a 4-aligned offset (checked).
        unsafe { AtomicU32::from_ptr(self.map.as_mut_ptr().add(offset).cast()) }
    }

    /// The `count` 64-bit words from byte `offset` on (one bounds check for all of them).
    pub(crate) fn words(&self, offset: usize, count: usize) -> &[AtomicU64] {
        self.check(offset, count * 8);
        // SAFETY: as in `word`, for each of the `count` consecutive words (in bounds, checked
        // above): `AtomicU64` has the size and alignment of `u64`, so they form a slice.
        unsafe {
            std::slice::from_raw_parts(self.map.as_mut_ptr().add(offset).cast::<AtomicU64>(), count)
        }
    }

    /// The 16-byte atomic at byte `offset` (16-aligned): a priority-tree leaf.
    pub(crate) fn cell(&self, offset: usize) -> &portable_atomic::AtomicU128 {
        self.check(offset, 16);
        debug_assert_eq!(offset % 16, 0);
        debug_assert!(portable_atomic::AtomicU128::is_lock_free());
        // SAFETY: in bounds and 16-aligned (checked above and by the layout, whose sections
        // start on 128-byte boundaries; the mapping is page-aligned). The mapping lives as long
        // as `self`, every process accesses these cells only through this type, and the
        // instructions are lock-free (a prioritized buffer is opened only then), so they are atomic across processes too (a
        // lock-based fallback would be private to one process).
        unsafe { portable_atomic::AtomicU128::from_ptr(self.map.as_mut_ptr().add(offset).cast()) }
    }

    /// Asks the CPU to start loading the cache lines of `[offset, offset + len)` (the first
    /// 256 bytes at most: the hardware prefetcher follows a longer sequential copy by itself).
    /// A hint only: it changes no memory and never faults, even outside the mapping.
    pub(crate) fn prefetch(&self, offset: usize, len: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let end = offset.saturating_add(len.min(256));
            for line in (offset & !63..end).step_by(64) {
                let address = self.map.as_ptr().wrapping_add(line);
                // SAFETY: a prefetch has no architectural effect: it reads nothing into the
                // program and cannot fault, whatever the address.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(address.cast()) };
            }
        }
    }

    /// Copies `len` bytes at byte `offset` out of the segment into `dst` at byte `start`.
    pub(crate) fn load_to(
        &self,
        offset: usize,
        dst: &Output<'_>,
        start: usize,
        len: usize,
        kernel: Kernel,
    ) {
        self.check(offset, len);
        let dst = dst.range(start, len);
        // SAFETY: the shared side is in bounds including the padded last word (checked),
        // 8-aligned, and accessed only atomically by everyone; the output range is checked and
        // vouched for by the `Output`'s constructor.
        unsafe { kernel.load(dst, self.map.as_ptr().add(offset), len) }
    }

    /// Copies `len` bytes of `src` from byte `start` into the segment at byte `offset` (zeroing
    /// the padding of the last word).
    pub(crate) fn store_from(
        &self,
        offset: usize,
        src: &Input<'_>,
        start: usize,
        len: usize,
        kernel: Kernel,
    ) {
        self.check(offset, len);
        let src = src.range(start, len);
        // SAFETY: as in `load_to`; the padding belongs to the record being written.
        unsafe { kernel.store(self.map.as_mut_ptr().add(offset), src, len) }
    }

    /// Copies `bytes` into the segment at `offset` with `kernel`.
    pub(crate) fn store_bytes(&self, offset: usize, bytes: &[u8], kernel: Kernel) {
        self.store_from(offset, &Input::from_slice(bytes), 0, bytes.len(), kernel);
    }

    /// Copies `dst.len()` bytes at `offset` out of the segment with `kernel`.
    pub(crate) fn load_bytes(&self, offset: usize, dst: &mut [u8], kernel: Kernel) {
        let len = dst.len();
        self.load_to(offset, &Output::from_slice(dst), 0, len, kernel);
    }

    pub(crate) fn file_id(&self) -> (u64, u64) {
        self.file_id
    }

    /// Bytes of this process's mapping of the segment that are mapped with 2 MiB pages, as
    /// `/proc/self/smaps` tells (`None` if it cannot be read). Only pages this process has
    /// touched count: an attached handle has touched them all (it prefaults).
    pub(crate) fn huge_page_bytes(&self) -> Option<u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let start = format!("{:x}-", self.map.as_ptr() as usize);
        let mut lines = smaps.lines().skip_while(|line| !line.starts_with(&start));
        lines.next()?;
        let kib = lines
            // The next mapping's header line has no colon right after its first word.
            .take_while(|line| {
                line.split_whitespace()
                    .next()
                    .is_some_and(|w| w.ends_with(':'))
            })
            .filter(|line| {
                line.starts_with("ShmemPmdMapped:") || line.starts_with("FilePmdMapped:")
            })
            .filter_map(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
        Some(kib * 1024)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn temp_path(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "shmreplay-segment-test-{tag}-{}",
            std::process::id()
        ))
    }

    #[test]
    fn create_is_exclusive_private_and_reserved() {
        let path = temp_path("create");
        let (seg, _) = Segment::create(
            &path,
            1 << 16,
            false,
            |_| Ok(()),
            |s| {
                s.word(0).store(7, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(seg.len(), 1 << 16);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert!(
            meta.blocks() * 512 >= 1 << 16,
            "space must be reserved, not sparse"
        );
        assert!(matches!(
            Segment::create(&path, 1 << 16, false, |_| Ok(()), |_| Ok(())),
            Err(Error::AlreadyExists(_))
        ));
        seg.word(8).store(42, std::sync::atomic::Ordering::Relaxed);
        let (again, _) = Segment::open(&path, 4096).unwrap();
        assert_eq!(again.word(8).load(std::sync::atomic::Ordering::Relaxed), 42);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn segment_appears_only_once_initialised_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("shmreplay-publish-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("shmreplay.x");
        let (seg, _) = Segment::create(
            &path,
            4096,
            false,
            |_| Ok(()),
            |s| {
                assert!(
                    !path.exists(),
                    "the segment is visible before init finished"
                );
                s.word(0).store(1, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(seg.len(), 4096);
        let again = Segment::create(
            &path,
            4096,
            false,
            |_| Ok(()),
            |_| panic!("must not initialise"),
        );
        assert!(matches!(again, Err(Error::AlreadyExists(_))));
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("shmreplay.x")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn too_big_fails_cleanly() {
        let path = temp_path("huge");
        let err = Segment::create(&path, u64::MAX / 2, false, |_| Ok(()), |_| Ok(())).unwrap_err();
        assert!(matches!(err, Error::InsufficientSpace { .. }), "{err}");
        assert!(!path.exists());
    }

    #[test]
    fn open_rejects_small_files() {
        let path = temp_path("small");
        std::fs::write(&path, b"hello").unwrap();
        assert!(matches!(
            Segment::open(&path, 4096),
            Err(Error::Corrupt { .. })
        ));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            Segment::open(&path, 4096),
            Err(Error::NotFound(_))
        ));
    }

    /// Whether this kernel can give a tmpfs file 2 MiB pages without a mount option:
    /// `MADV_COLLAPSE` (Linux 6.1+), unless `shmem_enabled` is `deny`.
    fn kernel_collapses_tmpfs() -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut numbers = release
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse::<u32>().ok());
        let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
        let shmem = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
            .unwrap_or_default();
        version >= (6, 1) && !shmem.contains("[deny]") && !shmem.is_empty()
    }

    #[test]
    fn mappings_are_2mib_aligned() {
        let path = temp_path("aligned");
        let (seg, _) =
            Segment::create(&path, (3 << 20) + 8, false, |_| Ok(()), |_| Ok(())).unwrap();
        assert_eq!(seg.map.as_ptr() as usize % huge_page_size(), 0);
        let (again, _) = Segment::open(&path, 4096).unwrap();
        assert_eq!(again.map.as_ptr() as usize % huge_page_size(), 0);
        // Both map the same bytes, through the last word of the odd-sized tail.
        let last = (3 << 20) as usize;
        seg.word(last)
            .store(0x5eed, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            again.word(last).load(std::sync::atomic::Ordering::Relaxed),
            0x5eed
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn huge_pages_back_a_new_tmpfs_segment_for_every_process_that_maps_it() {
        let path = PathBuf::from(format!(
            "/dev/shm/shmreplay-segment-test-huge-{}",
            std::process::id()
        ));
        let huge = huge_page_size();
        if huge > 2 << 20 {
            return; // 32 MiB or 512 MiB huge pages (arm64 with 16 or 64 KiB pages): too big here
        }
        let size = 4 * huge as u64 + 64;
        let (seg, _) = Segment::create(
            &path,
            size,
            true,
            |_| Ok(()),
            |s| {
                s.word(8).store(77, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            },
        )
        .unwrap();
        let (other, _) = Segment::open(&path, 4096).unwrap();
        other.prefault(&mut Patience::new()).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(other.word(8).load(std::sync::atomic::Ordering::Relaxed), 77);
        let (mine, theirs) = (
            seg.huge_page_bytes().unwrap(),
            other.huge_page_bytes().unwrap(),
        );
        if kernel_collapses_tmpfs() {
            // Whole 2 MiB stretches of the 8 MiB + 64 B (all four unless memory is too
            // fragmented: best effort), the same ones in both processes; the odd tail stays on
            // 4 KiB pages.
            assert_eq!(mine, theirs);
            assert!(
                mine >= huge as u64 && mine <= 4 * huge as u64 && mine % huge as u64 == 0,
                "{mine}"
            );
        } else {
            assert_eq!(
                (mine, theirs),
                (0, 0),
                "no huge pages expected on this kernel"
            );
        }
        // Without asking, a new segment stays on the system's default pages.
        let plain = PathBuf::from(format!(
            "/dev/shm/shmreplay-segment-test-plain-{}",
            std::process::id()
        ));
        let (seg, _) = Segment::create(&plain, 8 << 20, false, |_| Ok(()), |_| Ok(())).unwrap();
        std::fs::remove_file(&plain).unwrap();
        let shmem = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
            .unwrap_or_default();
        if shmem.contains("[never]") || shmem.contains("[deny]") {
            assert_eq!(seg.huge_page_bytes(), Some(0));
        }
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn access_outside_the_mapping_panics() {
        let path = temp_path("bounds");
        let (seg, _) = Segment::create(&path, 4096, false, |_| Ok(()), |_| Ok(())).unwrap();
        std::fs::remove_file(&path).unwrap();
        seg.load_bytes(4090, &mut [0u8; 8], Kernel::Words);
    }
}
