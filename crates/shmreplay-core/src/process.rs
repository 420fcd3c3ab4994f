//! Process identity that survives pid reuse, and liveness checks through `/proc`.
//!
//! A process is named by one 64-bit word: its pid in the low half and the low 32 bits of its
//! start time (clock ticks since boot, `/proc/PID/stat` field 22) in the high half. A recycled
//! pid has a different start time, so a dead owner is never mistaken for a live one.
//!
//! `unsafe` here: registering the fork hook of [`pid`] (and forking in its test).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Once, OnceLock};

static PID: AtomicU32 = AtomicU32::new(0);

/// This process's pid, without a system call each time: inserts and samples ask on every call
/// (to notice a handle inherited through `fork`), and glibc no longer caches it. The cache is
/// cleared in the child of every `fork`.
pub fn pid() -> u32 {
    static FORGET_IN_CHILD: Once = Once::new();
    extern "C" fn forget() {
        PID.store(0, Ordering::Relaxed);
    }
    FORGET_IN_CHILD.call_once(|| {
        // SAFETY: registers a plain function that only stores to an atomic, which is all a
        // fork child handler may safely do; it stays valid for the life of the process.
        unsafe { libc::pthread_atfork(None, None, Some(forget)) };
    });
    match PID.load(Ordering::Relaxed) {
        0 => {
            let pid = std::process::id();
            PID.store(pid, Ordering::Relaxed);
            pid
        }
        pid => pid,
    }
}

/// This process's identity word (recomputed after `fork`: the child has its own).
pub fn current() -> u64 {
    static CACHE: OnceLock<std::sync::Mutex<(u32, u64)>> = OnceLock::new();
    let pid = pid();
    let cache = CACHE.get_or_init(|| std::sync::Mutex::new((0, 0)));
    let mut cached = cache.lock().unwrap_or_else(|e| e.into_inner());
    if cached.0 != pid {
        let start = start_time(pid).unwrap_or(0);
        *cached = (pid, identity(pid, start));
    }
    cached.1
}

fn identity(pid: u32, start_ticks: u64) -> u64 {
    ((start_ticks & 0xffff_ffff) << 32) | u64::from(pid)
}

/// The pid named by an identity word.
pub fn pid_of(identity: u64) -> u32 {
    (identity & 0xffff_ffff) as u32
}

/// True if the process named by `identity` is still running (not exited, not a zombie, and
/// its pid not reused by another process).
pub fn is_alive(identity: u64) -> bool {
    let pid = pid_of(identity);
    match read_stat(pid) {
        Some((state, start)) => {
            !matches!(state, 'Z' | 'X' | 'x') && identity == self::identity(pid, start)
        }
        None => false,
    }
}

/// True if some process (not a zombie) has pid `pid`; for names that carry only a pid.
pub fn pid_is_running(pid: u32) -> bool {
    read_stat(pid).is_some_and(|(state, _)| !matches!(state, 'Z' | 'X' | 'x'))
}

fn start_time(pid: u32) -> Option<u64> {
    read_stat(pid).map(|(_, start)| start)
}

/// `(state, starttime)` from `/proc/PID/stat`.
fn read_stat(pid: u32) -> Option<(char, u64)> {
    if pid == 0 {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain anything, even ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    // `rest` starts at field 3 (state); starttime is field 22.
    let start = fields.nth(22 - 4)?.parse().ok()?;
    Some((state, start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_is_fresh_in_a_forked_child() {
        let parent = pid();
        // SAFETY: the child only reads an atomic, makes system calls and exits at once, all of
        // which is allowed after fork in a multi-threaded process.
        let child = unsafe { libc::fork() };
        if child == 0 {
            let fresh = pid() == std::process::id() && pid() != parent;
            // SAFETY: ends the forked child without running the parent's destructors.
            unsafe { libc::_exit(i32::from(!fresh)) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child; `status` outlives the call.
        assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }

    #[test]
    fn this_process_is_alive() {
        let me = current();
        assert_eq!(pid_of(me), std::process::id());
        assert_eq!(pid(), std::process::id());
        assert!(is_alive(me));
        // Same pid, another start time: a recycled pid is not us.
        assert!(!is_alive(me ^ (1 << 40)));
    }

    #[test]
    fn exited_child_is_dead() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let start = start_time(pid);
        child.wait().unwrap();
        assert!(!is_alive(identity(pid, start.unwrap_or(0))));
        assert!(!is_alive(0));
    }
}
