//! Letting an embedding runtime stop a long call: the Python binding installs a check that asks
//! the interpreter whether Ctrl-C (or another signal handler) wants the call to end.
//!
//! Calls that can wait or run long (creating a large segment, a writer waiting for the previous
//! writer of its slot, a sampler redrawing busy slots) poll [`Patience::interrupted`], which
//! runs the installed check at most every [`POLL`], and then fail with [`Error::Interrupted`].
//!
//! [`Error::Interrupted`]: crate::Error::Interrupted

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How often a waiting or long call asks the installed check.
pub const POLL: Duration = Duration::from_millis(20);

static CHECK: OnceLock<fn() -> bool> = OnceLock::new();

/// Installs the process-wide check; it returns true when the current call should stop. Only the
/// first installation counts. Without one, calls are never interrupted.
pub fn set_check(check: fn() -> bool) {
    let _ = CHECK.set(check);
}

/// Polls the installed check no more often than every [`POLL`].
pub(crate) struct Patience {
    next_poll: Instant,
}

impl Patience {
    pub(crate) fn new() -> Patience {
        Patience {
            next_poll: Instant::now() + POLL,
        }
    }

    /// True once the installed check asked to stop.
    pub(crate) fn interrupted(&mut self) -> bool {
        let now = Instant::now();
        if now < self.next_poll {
            return false;
        }
        self.next_poll = now + POLL;
        CHECK.get().is_some_and(|check| check())
    }
}
