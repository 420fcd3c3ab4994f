use std::path::PathBuf;

/// Everything that can go wrong in shmreplay. Every variant names what to fix; callers match
/// on the variant, never on the message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid buffer name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("invalid schema: {0}")]
    InvalidSchema(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("a replay buffer already exists at {0}")]
    AlreadyExists(PathBuf),
    #[error("no replay buffer at {0}")]
    NotFound(PathBuf),
    #[error(
        "not enough space for replay buffer {path}: needs {needed} bytes ({needed_h}), only {free} \
         bytes ({free_h}) free on that filesystem. Fix: give the container more shared memory \
         (Docker `--shm-size=…`, Kubernetes: an `emptyDir` with `medium: Memory` mounted at \
         /dev/shm), lower `capacity`, or pass `path=` to a directory on a larger filesystem",
        needed_h = human_bytes(*.needed),
        free_h = human_bytes(*.free)
    )]
    InsufficientSpace {
        path: PathBuf,
        needed: u64,
        free: u64,
    },
    #[error("{path} is not a usable shmreplay segment: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("permission denied for {path}: {reason}")]
    PermissionDenied { path: PathBuf, reason: String },
    #[error("the replay buffer is empty: nothing to sample yet")]
    Empty,
    #[error("slot {index} is out of range for capacity {capacity}")]
    IndexOutOfRange { index: u64, capacity: u64 },
    /// A wait outlasted its bound: a slot held by a live (or not provably dead) writer, a gc
    /// deciding about the buffer, or sampling that found no consistent row.
    #[error("{0}")]
    Contended(String),
    #[error(
        "all {0} handle entries of this buffer are in use by live processes; close some handles"
    )]
    TooManyHandles(usize),
    /// The call needs another sampler than the buffer's (priorities on a uniform buffer).
    #[error("{0}")]
    WrongSampler(String),
    #[error("interrupted")]
    Interrupted,
    /// Flow control did not allow the call within its timeout; nothing was inserted or taken.
    #[error("{0}")]
    Timeout(String),
    /// The buffer was shut down and the call could not proceed at once; nothing was inserted
    /// or taken.
    #[error("the replay buffer was shut down: calls that would wait fail")]
    Shutdown,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: impl Into<std::io::Error>) -> Self {
        Error::Io {
            context: context.into(),
            source: source.into(),
        }
    }
}

/// `1536` -> `"1.5 KiB"`: byte counts in messages people read.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
