//! Buffers by name: where their files live, listing them, removing them, and collecting the
//! stale ones (`gc`) without ever removing one that a live process holds.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::buffer::{seeded_rng, GateLocks, ReplayBuffer, SegmentInfo, CREATOR_LOCK};
use crate::error::{Error, Result};
use crate::platform::files;
use crate::protocol::gate::{self, Verdict};

/// Where segments live unless a directory is given: POSIX shared memory.
pub const DEFAULT_DIR: &str = "/dev/shm";
/// Segment files are named `shmreplay.<name>`.
pub const FILE_PREFIX: &str = "shmreplay.";
pub const MAX_NAME_LEN: usize = 200;

/// A file named like a segment that cannot be opened as one (damaged, or from another version).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Unreadable {
    pub name: String,
    pub path: PathBuf,
    pub reason: String,
}

/// What [`list`] found in a directory.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct Listing {
    pub buffers: Vec<SegmentInfo>,
    pub unreadable: Vec<Unreadable>,
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
    let mut rng = seeded_rng();
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

/// Removes the segment file at `path` only if it is still the file `file_id` (`(device,
/// inode)`, see [`ReplayBuffer::file_id`]): [`Error::NotFound`] if it is gone or its name now
/// belongs to another buffer, which is left alone. For handles that outlive their mapping.
pub fn remove_segment(path: &Path, file_id: (u64, u64)) -> Result<()> {
    files::remove_if_same(path, file_id)
}

/// The buffers of this user in `dir` (default [`DEFAULT_DIR`]), sorted by name, and the files
/// of this user named like segments that cannot be opened as one. Other users' files are left
/// out before their names are even looked at.
pub fn list(dir: Option<&Path>) -> Result<Listing> {
    let mut listing = Listing::default();
    for (name, path) in own_segment_files(dir)? {
        match ReplayBuffer::inspect(&name, path.parent()) {
            Ok(buffer) => listing.buffers.push(buffer.info()),
            // Removed meanwhile, or replaced by another user's file: not ours to list.
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

/// `(name, path)` of every regular file of this user in `dir` named like a segment. Names that
/// are not valid buffer names are kept (they are listed as unreadable, escaped by whoever
/// prints them).
fn own_segment_files(dir: Option<&Path>) -> Result<Vec<(String, PathBuf)>> {
    let dir = dir.unwrap_or(Path::new(DEFAULT_DIR));
    let me = rustix::process::geteuid().as_raw();
    let entries =
        std::fs::read_dir(dir).map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
    Ok(entries
        .flatten()
        .filter(|entry| {
            entry
                .metadata()
                .is_ok_and(|m| m.uid() == me && !m.file_type().is_symlink())
        })
        .filter_map(|entry| {
            let file_name = entry.file_name();
            let name = file_name.to_str()?.strip_prefix(FILE_PREFIX)?.to_owned();
            Some((name, entry.path()))
        })
        .collect())
}

/// Removes the stale buffers of this user in `dir` (default [`DEFAULT_DIR`]): those that no
/// process holds a handle to and whose creator is provably gone. Returns their names; with
/// `dry_run`, only names them. Also removes the hidden files of creators that died while
/// creating a segment.
///
/// However many `gc` and attach calls run at once, a buffer some live process holds is never
/// removed (see `protocol::gate`), and a race with another `gc` is not an error: the buffer is
/// skipped, or already gone.
pub fn remove_stale(dir: Option<&Path>, dry_run: bool) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for (name, path) in own_segment_files(dir)? {
        let Ok(buffer) = ReplayBuffer::inspect(&name, path.parent()) else {
            continue;
        };
        if dry_run {
            if buffer.info().stale {
                removed.push(name);
            }
            continue;
        }
        let lock = buffer.current_lock_file();
        let verdict = gate::reap(
            &GateLocks(&lock),
            || buffer.creator_is_gone(),
            || match files::remove_if_same(&path, buffer.file_id()) {
                Ok(()) => Ok(true),
                Err(Error::NotFound(_)) => Ok(false),
                Err(e) => Err(e),
            },
        )?;
        if verdict == Verdict::Removed {
            removed.push(name);
        }
    }
    removed.sort();
    if !dry_run {
        let dir = dir.unwrap_or(Path::new(DEFAULT_DIR));
        for temporary in files::abandoned_temporaries(dir, CREATOR_LOCK) {
            let _ = std::fs::remove_file(temporary);
        }
    }
    Ok(removed)
}
