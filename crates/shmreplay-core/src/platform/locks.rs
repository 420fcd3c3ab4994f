//! Kernel-held tokens: open-file-description (OFD) byte-range locks on a segment file.
//!
//! Why locks and not only pids: the kernel drops every lock of a file description when the
//! last descriptor referring to it is closed, which happens when its process dies, however it
//! dies, and after the process's memory is gone (`exit_mm` runs before `exit_files`), so a
//! released lock proves that no store of the holder can still land. It works across PID
//! namespaces (two containers sharing `/dev/shm` see each other's locks on the same inode)
//! and needs no file descriptor to ask (`F_OFD_GETLK` on one we already hold), so a full fd
//! table cannot turn "alive" into "dead". iceoryx2 argues the same for its per-node `flock`
//! (`iceoryx2-cal/src/monitoring/file_lock.rs`); byte ranges give one token per handle entry
//! on the one file.
//!
//! The locks are advisory: they never affect reads and writes of the mapping. Lock byte
//! offsets are just names (see [`LockRange`]); they may lie past the end of the file.
//!
//! OFD locks belong to the file description, not the process: a child created by `fork`
//! shares its parent's descriptions, and with them its locks. Handles reopen the file in the
//! child before they lock or ask anything (see `buffer`), and a lock held through an
//! inherited description keeps counting as held, which is what keeps a buffer alive for a
//! worker that inherited its launcher's handle.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};

use crate::error::{Error, Result};

/// A range of lock bytes: `len` bytes from `start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LockRange {
    pub start: u64,
    pub len: u64,
}

/// Shared (many holders) or exclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LockKind {
    Shared,
    Exclusive,
}

/// A file description of a segment, opened by this process, used for its locks.
#[derive(Debug)]
pub(crate) struct LockFile {
    fd: OwnedFd,
}

impl LockFile {
    pub(crate) fn new(file: File) -> LockFile {
        LockFile { fd: file.into() }
    }

    /// A new file description of the same file (same inode, even if unlinked meanwhile), so
    /// that a forked child gets locks of its own instead of sharing its parent's.
    pub(crate) fn reopen(&self) -> Result<LockFile> {
        let path = format!("/proc/self/fd/{}", self.fd.as_raw_fd());
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io("reopen the segment file after fork", e))?;
        let same = |f: &File| {
            use std::os::unix::fs::MetadataExt;
            let ours = rustix::fs::fstat(&self.fd).ok();
            f.metadata()
                .ok()
                .zip(ours)
                .is_some_and(|(m, o)| m.dev() == o.st_dev && m.ino() == o.st_ino)
        };
        if !same(&file) {
            return Err(Error::io(
                "reopen the segment file after fork",
                std::io::Error::other("/proc/self/fd named another file"),
            ));
        }
        Ok(LockFile::new(file))
    }

    /// True while the file is still linked into some directory.
    pub(crate) fn is_linked(&self) -> Result<bool> {
        let stat = rustix::fs::fstat(&self.fd).map_err(|e| Error::io("fstat segment", e))?;
        Ok(stat.st_nlink > 0)
    }

    /// Takes the lock without waiting: false if another file description holds a conflicting
    /// one.
    pub(crate) fn try_lock(&self, range: LockRange, kind: LockKind) -> Result<bool> {
        let lock_type = match kind {
            LockKind::Shared => libc::F_RDLCK,
            LockKind::Exclusive => libc::F_WRLCK,
        };
        match self.fcntl(libc::F_OFD_SETLK, lock_type, range) {
            Ok(_) => Ok(true),
            Err(e) if e == libc::EAGAIN || e == libc::EACCES => Ok(false),
            Err(e) => Err(lock_error("lock", e)),
        }
    }

    pub(crate) fn unlock(&self, range: LockRange) {
        // Unlocking cannot fail for a valid descriptor and range; if it did, the lock would go
        // with the descriptor anyway.
        let _ = self.fcntl(libc::F_OFD_SETLK, libc::F_UNLCK, range);
    }

    /// True if another file description holds a lock that conflicts with an exclusive one on
    /// `range` (our own description's locks never conflict with it).
    pub(crate) fn held_by_others(&self, range: LockRange) -> Result<bool> {
        self.fcntl(libc::F_OFD_GETLK, libc::F_WRLCK, range)
            .map(|found| found != libc::F_UNLCK)
            .map_err(|e| lock_error("query lock", e))
    }

    /// `fcntl(fd, command, flock{type, range})`; returns the lock type left in the struct.
    fn fcntl(
        &self,
        command: libc::c_int,
        lock_type: libc::c_int,
        range: LockRange,
    ) -> std::result::Result<libc::c_int, i32> {
        let too_far = |v: u64| i64::try_from(v).map_err(|_| libc::EINVAL);
        // SAFETY: `flock` is plain data; zeroed is a valid value (l_pid must be 0 for OFD locks).
        let mut lock: libc::flock = unsafe { std::mem::zeroed() };
        lock.l_type = lock_type as libc::c_short;
        lock.l_whence = libc::SEEK_SET as libc::c_short;
        lock.l_start = too_far(range.start)?;
        lock.l_len = too_far(range.len)?;
        // SAFETY: a valid descriptor we own, a command that takes a `struct flock *`, and a
        // pointer to a live, initialised struct that outlives the call.
        let status = unsafe { libc::fcntl(self.fd.as_raw_fd(), command, &mut lock) };
        if status == -1 {
            return Err(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO));
        }
        Ok(libc::c_int::from(lock.l_type))
    }
}

fn lock_error(what: &str, errno: i32) -> Error {
    Error::io(
        format!("{what} on the segment file"),
        std::io::Error::from_raw_os_error(errno),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const BYTE: LockRange = LockRange { start: 7, len: 1 };

    fn file() -> (std::path::PathBuf, File) {
        let path = std::env::temp_dir().join(format!(
            "shmreplay-locks-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        (path, file)
    }

    #[test]
    fn descriptions_conflict_and_release_on_close() {
        let (path, f) = file();
        let a = LockFile::new(f);
        let b = a.reopen().unwrap();
        assert!(a.try_lock(BYTE, LockKind::Exclusive).unwrap());
        assert!(!b.try_lock(BYTE, LockKind::Shared).unwrap());
        assert!(b.held_by_others(BYTE).unwrap());
        assert!(!a.held_by_others(BYTE).unwrap(), "own locks never conflict");
        drop(a);
        assert!(!b.held_by_others(BYTE).unwrap(), "closing releases");
        assert!(b.try_lock(BYTE, LockKind::Exclusive).unwrap());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn shared_locks_coexist_and_exclude_exclusive() {
        let (path, f) = file();
        let a = LockFile::new(f);
        let b = a.reopen().unwrap();
        let c = a.reopen().unwrap();
        assert!(a.try_lock(BYTE, LockKind::Shared).unwrap());
        assert!(b.try_lock(BYTE, LockKind::Shared).unwrap());
        assert!(!c.try_lock(BYTE, LockKind::Exclusive).unwrap());
        a.unlock(BYTE);
        b.unlock(BYTE);
        assert!(c.try_lock(BYTE, LockKind::Exclusive).unwrap());
        let far = LockRange {
            start: 1 << 40,
            len: 1024,
        };
        assert!(a.try_lock(far, LockKind::Exclusive).unwrap(), "past EOF");
        assert!(c.held_by_others(far).unwrap());
        std::fs::remove_file(path).unwrap();
    }
}
