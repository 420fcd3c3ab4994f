//! One shared-memory file mapped into this process: creation with the whole size reserved,
//! opening with ownership checks, and bounds-checked atomic access to its bytes.
//!
//! This is the only module besides [`crate::copy`] with `unsafe` code: turning mapped addresses
//! into `&AtomicU64` and handing them to the copy kernels. Every access is bounds-checked here,
//! so the rest of the crate works with byte offsets and cannot touch memory outside the mapping.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

use memmap2::{Advice, MmapRaw};
use rustix::fs::{FallocateFlags, OFlags};
use rustix::io::Errno;

use crate::copy;
use crate::error::{Error, Result};
use crate::interrupt::Patience;
use crate::process;

/// A mapped segment file. The file descriptor is closed once mapped: a buffer costs its
/// process one mapping and no descriptor, whatever its capacity.
#[derive(Debug)]
pub(crate) struct Segment {
    map: MmapRaw,
    /// `(device, inode)` of the file mapped: tells whether a path still names this segment.
    file_id: (u64, u64),
}

/// Free bytes for an unprivileged writer on the filesystem holding `dir`.
pub(crate) fn free_bytes(dir: &Path) -> Result<u64> {
    let stat =
        rustix::fs::statvfs(dir).map_err(|e| Error::io(format!("statvfs {}", dir.display()), e))?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

impl Segment {
    /// Creates the segment file `path` of `size` bytes, mode 0600, with all its space reserved
    /// (so that no later page fault can SIGBUS for lack of space), mapped and prefaulted.
    ///
    /// The file is built under a hidden temporary name, initialised by `init`, and only then
    /// renamed to `path` without replacing anything: whoever finds a file at `path` finds a
    /// complete segment. Nothing is left behind on error.
    pub(crate) fn create(path: &Path, size: u64, init: impl FnOnce(&Segment)) -> Result<Segment> {
        let dir = path.parent().unwrap_or(Path::new("/"));
        if path.exists() {
            return Err(Error::AlreadyExists(path.to_owned()));
        }
        let free = free_bytes(dir)?;
        let no_space = || Error::InsufficientSpace {
            path: path.to_owned(),
            needed: size,
            free,
        };
        if size > free {
            return Err(no_space());
        }
        let (temp, file) = create_temporary(path)?;
        let remove_on_error = RemoveOnDrop(Some(temp.clone()));
        // The umask may have cleared bits of 0600 but never adds any; make it exact.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(format!("chmod {}", temp.display()), e))?;
        let mut patience = Patience::new();
        reserve(&file, size, &mut patience).map_err(|e| match e {
            Reserve::Interrupted => Error::Interrupted,
            Reserve::Failed(Errno::NOSPC | Errno::FBIG | Errno::NOMEM) => no_space(),
            Reserve::Failed(e) => {
                Error::io(format!("reserve {size} bytes for {}", path.display()), e)
            }
        })?;
        let segment = Segment::map(&file, &temp)?;
        segment.prefault(&mut patience)?;
        init(&segment);
        publish(&temp, path)?;
        remove_on_error.disarm();
        Ok(segment)
    }

    /// Opens and maps an existing segment file owned by this user.
    pub(crate) fn open(path: &Path, min_size: u64) -> Result<Segment> {
        // Never through a symbolic link: in a shared directory like /dev/shm anyone can plant
        // one under a buffer's name.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(OFlags::NOFOLLOW.bits() as i32)
            .open(path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Error::NotFound(path.to_owned()),
                std::io::ErrorKind::PermissionDenied => Error::PermissionDenied {
                    path: path.to_owned(),
                    reason: "the segment belongs to another user (mode 0600)".into(),
                },
                _ if e.raw_os_error() == Some(Errno::LOOP.raw_os_error()) => {
                    Error::PermissionDenied {
                        path: path.to_owned(),
                        reason: "it is a symbolic link, which shmreplay never follows".into(),
                    }
                }
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
        Segment::map(&file, path)
    }

    fn map(file: &File, path: &Path) -> Result<Segment> {
        let meta = file
            .metadata()
            .map_err(|e| Error::io(format!("stat {}", path.display()), e))?;
        let map =
            MmapRaw::map_raw(file).map_err(|e| Error::io(format!("mmap {}", path.display()), e))?;
        Ok(Segment {
            map,
            file_id: (meta.dev(), meta.ino()),
        })
    }

    /// True if `path` (not followed if a link) is the file this segment maps.
    pub(crate) fn is_at(&self, path: &Path) -> bool {
        std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == self.file_id)
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Fills this process's page tables for the whole mapping now, so that inserts and samples
    /// do not take a page fault on every 4 KiB they touch for the first time (8x slower first
    /// writes of Atari records, measured). Best effort: kernels before 5.14 lack the advice.
    ///
    /// Done in chunks, polling `patience` in between: a 5.6 GB segment takes seconds.
    pub(crate) fn prefault(&self, patience: &mut Patience) -> Result<()> {
        const CHUNK: usize = 64 << 20;
        for offset in (0..self.map.len()).step_by(CHUNK) {
            if patience.interrupted() {
                return Err(Error::Interrupted);
            }
            let len = CHUNK.min(self.map.len() - offset);
            if self
                .map
                .advise_range(Advice::PopulateWrite, offset, len)
                .is_err()
            {
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

    /// Copies `dst.len()` bytes at byte `offset` out of the segment.
    pub(crate) fn load(&self, offset: usize, dst: &mut [u8]) {
        self.check(offset, dst.len());
        // SAFETY: in bounds including the padded last word (checked), 8-aligned, atomic-only.
        unsafe { copy::load(dst, self.map.as_ptr().add(offset)) }
    }

    /// Copies `src` into the segment at byte `offset` (zeroing the padding of its last word).
    pub(crate) fn store(&self, offset: usize, src: &[u8]) {
        self.check(offset, src.len());
        // SAFETY: as in `load`; padding belongs to the record being written.
        unsafe { copy::store(self.map.as_mut_ptr().add(offset), src) }
    }
}

/// Reserves `size` bytes of `file` for real: `fallocate` where the filesystem has it, else
/// writing zeros (a bare `ftruncate` reserves nothing on tmpfs).
///
/// On tmpfs the zeros are written even after `fallocate`: tmpfs clears fallocated pages lazily,
/// one 4 KiB page fault at a time, and for a 5.6 GB segment that took 11.9 s against 2.2 s for
/// `fallocate` + writing zeros + prefaulting the mapping (measured on the development machine).
fn reserve(file: &File, size: u64, patience: &mut Patience) -> std::result::Result<(), Reserve> {
    match rustix::fs::fallocate(file, FallocateFlags::empty(), 0, size) {
        Ok(()) if !is_tmpfs(file) => Ok(()),
        Ok(()) | Err(Errno::OPNOTSUPP) => write_zeros(file, size, patience),
        Err(e) => Err(Reserve::Failed(e)),
    }
}

/// Why [`reserve`] stopped.
enum Reserve {
    Failed(Errno),
    Interrupted,
}

fn is_tmpfs(file: &File) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    // `f_type`'s integer type differs between targets.
    #[allow(clippy::unnecessary_cast)]
    rustix::fs::fstatfs(file).is_ok_and(|s| s.f_type as i64 == TMPFS_MAGIC)
}

fn write_zeros(
    file: &File,
    size: u64,
    patience: &mut Patience,
) -> std::result::Result<(), Reserve> {
    use std::os::unix::fs::FileExt;
    let zeros = vec![0u8; 4 << 20];
    let mut offset = 0;
    while offset < size {
        if patience.interrupted() {
            return Err(Reserve::Interrupted);
        }
        let n = (size - offset).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], offset)
            .map_err(|e| Reserve::Failed(Errno::from_io_error(&e).unwrap_or(Errno::IO)))?;
        offset += n as u64;
    }
    Ok(())
}

/// Creates (exclusively, mode 0600) a hidden file next to `path` for a segment being built,
/// named `.{file name}.{pid}-{random}.creating`. The random part is unpredictable, so that
/// nobody can block a creation by planting files under the names it will use.
fn create_temporary(path: &Path) -> Result<(PathBuf, File)> {
    let file_name = path
        .file_name()
        .map_or_else(Default::default, |n| n.to_string_lossy());
    let mut last_error = None;
    for _ in 0..16 {
        let mut random = [0u8; 8];
        rustix::rand::getrandom(&mut random, rustix::rand::GetRandomFlags::empty())
            .map_err(|e| Error::io("getrandom", e))?;
        let temp = path.with_file_name(format!(
            ".{file_name}.{}-{:016x}.creating",
            process::pid(),
            u64::from_ne_bytes(random)
        ));
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
        {
            Ok(file) => return Ok((temp, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last_error = Some(e),
            Err(e) => return Err(Error::io(format!("create {}", temp.display()), e)),
        }
    }
    Err(Error::io(
        format!("create a temporary file next to {}", path.display()),
        last_error.expect("16 attempts"),
    ))
}

/// The hidden files in `dir` that creators which died mid-create left behind (see
/// [`temporary_path`]): only this user's, and only those whose creating process is gone.
pub(crate) fn abandoned_temporaries(dir: &Path) -> Vec<PathBuf> {
    let me = rustix::process::geteuid().as_raw();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(creator_of_temporary) else {
                return false;
            };
            entry.metadata().is_ok_and(|m| m.uid() == me && m.is_file())
                && !process::pid_is_running(pid)
        })
        .map(|entry| entry.path())
        .collect()
}

/// The creating pid named in a temporary file name `.{segment}.{pid}-{call}.creating`.
fn creator_of_temporary(file_name: &str) -> Option<u32> {
    let middle = file_name.strip_prefix('.')?.strip_suffix(".creating")?;
    let (_, tag) = middle.rsplit_once('.')?;
    tag.split_once('-')?.0.parse().ok()
}

/// Renames `temp` to `path` unless `path` exists, atomically (`renameat2(RENAME_NOREPLACE)`;
/// on filesystems without it, `link` + `unlink`, which is just as exclusive).
fn publish(temp: &Path, path: &Path) -> Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    let exists = || Error::AlreadyExists(path.to_owned());
    match renameat_with(CWD, temp, CWD, path, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(Errno::EXIST) => Err(exists()),
        Err(Errno::INVAL | Errno::NOSYS) => match std::fs::hard_link(temp, path) {
            Ok(()) => {
                let _ = std::fs::remove_file(temp);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(exists()),
            Err(e) => Err(Error::io(format!("link {}", path.display()), e)),
        },
        Err(e) => Err(Error::io(format!("rename to {}", path.display()), e)),
    }
}

/// Removes a half-made file unless disarmed.
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!(
            "shmreplay-segment-test-{tag}-{}",
            std::process::id()
        ))
    }

    #[test]
    fn create_is_exclusive_private_and_reserved() {
        let path = temp_path("create");
        let seg = Segment::create(&path, 1 << 16, |s| {
            s.word(0).store(7, std::sync::atomic::Ordering::Relaxed)
        })
        .unwrap();
        assert_eq!(seg.len(), 1 << 16);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert!(
            meta.blocks() * 512 >= 1 << 16,
            "space must be reserved, not sparse"
        );
        assert!(matches!(
            Segment::create(&path, 1 << 16, |_| ()),
            Err(Error::AlreadyExists(_))
        ));
        seg.word(8).store(42, std::sync::atomic::Ordering::Relaxed);
        let again = Segment::open(&path, 4096).unwrap();
        assert_eq!(again.word(8).load(std::sync::atomic::Ordering::Relaxed), 42);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn segment_appears_only_once_initialised_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("shmreplay-publish-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("shmreplay.x");
        let seg = Segment::create(&path, 4096, |s| {
            assert!(
                !path.exists(),
                "the segment is visible before init finished"
            );
            s.word(0).store(1, std::sync::atomic::Ordering::Relaxed);
        })
        .unwrap();
        assert_eq!(seg.len(), 4096);
        let again = Segment::create(&path, 4096, |_| panic!("must not initialise"));
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
        let err = Segment::create(&path, u64::MAX / 2, |_| ()).unwrap_err();
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

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn access_outside_the_mapping_panics() {
        let path = temp_path("bounds");
        let seg = Segment::create(&path, 4096, |_| ()).unwrap();
        std::fs::remove_file(&path).unwrap();
        seg.load(4090, &mut [0u8; 8]);
    }
}
