//! Letting an embedding runtime stop a long call: the Python binding installs a check that asks
//! the interpreter whether Ctrl-C (or another signal handler) wants the call to end.
//!
//! Calls that can wait or run long (creating a large segment, a writer waiting for the previous
//! writer of its slot, a sampler redrawing busy slots) poll the check through `Patience`, which
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

/// Polls the installed check no more often than every [`POLL`], starting [`POLL`] after its
/// first question (so a call that never waits never reads the clock).
pub(crate) struct Patience {
    next_poll: Option<Instant>,
}

impl Patience {
    pub(crate) fn new() -> Patience {
        Patience { next_poll: None }
    }

    /// Asks the installed check right now.
    pub(crate) fn interrupted_now() -> bool {
        CHECK.get().is_some_and(|check| check())
    }

    /// True once the installed check asked to stop.
    pub(crate) fn interrupted(&mut self) -> bool {
        let now = Instant::now();
        match self.next_poll {
            Some(next) if now >= next => {}
            Some(_) => return false,
            None => {
                self.next_poll = Some(now + POLL);
                return false;
            }
        }
        self.next_poll = Some(now + POLL);
        CHECK.get().is_some_and(|check| check())
    }
}
