//! Who a process is, and whether it is provably dead.
//!
//! Liveness has three answers, and only positive evidence proves death:
//!
//! * [`Liveness::Dead`]: `kill(pid, 0)` says no such process (`ESRCH`), or `/proc/PID/stat`
//!   shows another process under that pid (another start time), or an exited thread group (a
//!   zombie with no thread left). These are checked only when the process named lives in *our*
//!   PID namespace: a pid from another namespace (a sidecar container sharing `/dev/shm`) means
//!   nothing here.
//! * [`Liveness::Alive`]: the process is there with the recorded start time.
//! * [`Liveness::Unknown`]: anything else: `/proc` cannot be read (a full fd table, ENOMEM,
//!   `hidepid`), another PID namespace, a process that exists but whose start time cannot be
//!   read. Callers treat it like alive: they wait, never take over, never collect.
//!
//! The handle table adds a kernel-held token on top of this (an OFD lock per handle entry,
//! see `platform::locks`), which proves death across namespaces; this module is the
//! second witness, for the one case the lock cannot decide (a child that inherited the lock's
//! file description through `fork` outlives its parent).
//!
//! `unsafe` here: registering the fork hook of [`pid`], and `kill(pid, 0)`.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Once;

/// Three-valued liveness: see the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    Dead,
    Unknown,
}

/// A process as recorded in shared memory: pid and start time in one word, plus the identity of
/// its PID namespace (0 when it could not be read).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    /// `pid` in the low 32 bits, the low 32 bits of its start time (clock ticks since boot,
    /// `/proc/PID/stat` field 22; 0 if it could not be read) in the high half.
    pub word: u64,
    /// Inode of `/proc/PID/ns/pid` (0 = unknown).
    pub namespace: u64,
}

impl Identity {
    pub fn pid(&self) -> u32 {
        (self.word & 0xffff_ffff) as u32
    }

    fn start(&self) -> u32 {
        (self.word >> 32) as u32
    }
}

static PID: AtomicU32 = AtomicU32::new(0);
/// How many `fork`s separate this process image from the first one (bumped in every child).
static FORK_GENERATION: AtomicU32 = AtomicU32::new(0);
/// False if the fork hook could not be registered: then nothing about the process is cached.
static CACHING: AtomicBool = AtomicBool::new(false);
static CURRENT_WORD: AtomicU64 = AtomicU64::new(0);
static CURRENT_NAMESPACE: AtomicU64 = AtomicU64::new(0);

fn install_fork_hook() {
    static ONCE: Once = Once::new();
    extern "C" fn forget() {
        FORK_GENERATION.fetch_add(1, Ordering::Relaxed);
        PID.store(0, Ordering::Relaxed);
        CURRENT_WORD.store(0, Ordering::Relaxed);
        CURRENT_NAMESPACE.store(0, Ordering::Relaxed);
    }
    ONCE.call_once(|| {
        // SAFETY: registers a plain function that only stores to atomics, which is all a fork
        // child handler may safely do; it stays valid for the life of the process.
        let status = unsafe { libc::pthread_atfork(None, None, Some(forget)) };
        CACHING.store(status == 0, Ordering::Release);
    });
}

/// This process's pid, without a system call each time: inserts and samples ask on every call
/// (to notice a handle inherited through `fork`), and glibc no longer caches it. The cache is
/// cleared in the child of every `fork`; if the fork hook cannot be registered, nothing is
/// cached.
pub fn pid() -> u32 {
    install_fork_hook();
    if !CACHING.load(Ordering::Acquire) {
        return std::process::id();
    }
    match PID.load(Ordering::Relaxed) {
        0 => {
            let pid = std::process::id();
            PID.store(pid, Ordering::Relaxed);
            pid
        }
        pid => pid,
    }
}

/// A token for "this process image": the pid and the number of `fork`s behind it. A handle
/// compares it with the token it recorded to notice it was inherited through `fork`; the fork
/// count keeps a grandchild that got a dead ancestor's pid back from passing for it.
pub fn image() -> u64 {
    let pid = pid();
    (u64::from(FORK_GENERATION.load(Ordering::Relaxed)) << 32) | u64::from(pid)
}

/// This process's identity. A start time or namespace that cannot be read now is recorded as
/// unknown (0) and read again next time: a failure is never cached.
pub fn current() -> Identity {
    let pid = pid();
    let cached = CURRENT_WORD.load(Ordering::Acquire);
    if cached != 0 && cached as u32 == pid && CACHING.load(Ordering::Acquire) {
        return Identity {
            word: cached,
            namespace: CURRENT_NAMESPACE.load(Ordering::Acquire),
        };
    }
    let start = read_stat(pid).ok().map_or(0, |s| s.start as u32);
    let namespace = our_namespace().unwrap_or(0);
    let identity = Identity {
        word: (u64::from(start) << 32) | u64::from(pid),
        namespace,
    };
    if start != 0 && namespace != 0 {
        CURRENT_NAMESPACE.store(namespace, Ordering::Release);
        CURRENT_WORD.store(identity.word, Ordering::Release);
    }
    identity
}

/// The inode of this process's PID namespace.
fn our_namespace() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid").ok().map(|m| m.ino())
}

/// Whether the process `who` is provably dead, alive, or neither (see the module docs).
pub fn liveness(who: Identity) -> Liveness {
    let pid = who.pid();
    if who.word == 0 {
        return Liveness::Dead; // names no process: nobody can be acting under it
    }
    if pid == 0 || pid > i32::MAX as u32 {
        return Liveness::Unknown; // damaged: we cannot tell whose it was
    }
    if who.namespace == 0 || our_namespace() != Some(who.namespace) {
        return Liveness::Unknown;
    }
    match signal_zero(pid) {
        Probe::Gone => return Liveness::Dead,
        Probe::Unknown => return Liveness::Unknown,
        Probe::Exists => {}
    }
    match read_stat(pid) {
        Ok(stat) => {
            if who.start() != 0 && stat.start as u32 != who.start() {
                Liveness::Dead // the pid was reused by another process
            } else if who.start() == 0 {
                Liveness::Unknown // exists, but we cannot tell whether it is the same process
            } else if matches!(stat.state, 'Z' | 'X' | 'x') {
                zombie_liveness(pid)
            } else {
                Liveness::Alive
            }
        }
        // Gone between the two questions; or hidden (`hidepid`) while `kill` saw it.
        Err(ErrorKind::NotFound) if signal_zero(pid) == Probe::Gone => Liveness::Dead,
        Err(_) => Liveness::Unknown,
    }
}

/// A zombie thread-group leader is dead only once no thread of its group runs any more: a
/// leader that called `pthread_exit` stays a zombie while its other threads work on.
fn zombie_liveness(pid: u32) -> Liveness {
    match std::fs::read_dir(format!("/proc/{pid}/task")) {
        Ok(tasks) => {
            let others = tasks
                .flatten()
                .filter(|t| t.file_name().to_str() != Some(&pid.to_string()))
                .count();
            if others > 0 {
                Liveness::Alive
            } else {
                Liveness::Dead
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Liveness::Dead,
        Err(_) => Liveness::Unknown,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Probe {
    Exists,
    Gone,
    Unknown,
}

/// `kill(pid, 0)`: ESRCH is the kernel saying no process has this pid in our namespace.
/// Unlike `/proc`, it needs no file descriptor and ignores `hidepid`.
fn signal_zero(pid: u32) -> Probe {
    // SAFETY: signal 0 only checks for existence and permission; nothing is delivered.
    let status = unsafe { libc::kill(pid as libc::pid_t, 0) };
    if status == 0 {
        return Probe::Exists;
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::ESRCH) => Probe::Gone,
        Some(libc::EPERM) => Probe::Exists,
        _ => Probe::Unknown,
    }
}

/// True unless the process with this pid is provably gone (for names that carry only a pid,
/// such as the hidden files of a segment being created).
pub fn pid_may_be_running(pid: u32) -> bool {
    pid != 0 && pid <= i32::MAX as u32 && signal_zero(pid) != Probe::Gone
}

struct Stat {
    state: char,
    start: u64,
}

use std::io::ErrorKind;

/// `(state, starttime)` from `/proc/PID/stat`.
fn read_stat(pid: u32) -> Result<Stat, ErrorKind> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| e.kind())?;
    // The command name (field 2) is in parentheses and may contain anything, even ')'.
    let parse = || {
        let rest = &text[text.rfind(')')? + 1..];
        let mut fields = rest.split_ascii_whitespace();
        let state = fields.next()?.chars().next()?;
        // `rest` starts at field 3 (state); starttime is field 22.
        let start = fields.nth(22 - 4)?.parse().ok()?;
        Some(Stat { state, start })
    };
    parse().ok_or(ErrorKind::InvalidData)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_is_fresh_in_a_forked_child() {
        let parent = pid();
        let parent_identity = current();
        // SAFETY: the child only reads atomics, makes system calls and exits at once, all of
        // which is allowed after fork in a multi-threaded process.
        let child = unsafe { libc::fork() };
        if child == 0 {
            let fresh = pid() == std::process::id()
                && pid() != parent
                && current().word != parent_identity.word;
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
        assert_eq!(me.pid(), std::process::id());
        assert_ne!(me.namespace, 0);
        assert_eq!(liveness(me), Liveness::Alive);
        // Same pid, another start time: a recycled pid is not us.
        let recycled = Identity {
            word: me.word ^ (1 << 40),
            ..me
        };
        assert_eq!(liveness(recycled), Liveness::Dead);
        // Another PID namespace: the pid means nothing here.
        let foreign = Identity {
            namespace: me.namespace ^ 1,
            ..me
        };
        assert_eq!(liveness(foreign), Liveness::Unknown);
        // Unknown start time: existence alone does not prove it is the same process.
        let startless = Identity {
            word: me.word & 0xffff_ffff,
            ..me
        };
        assert_eq!(liveness(startless), Liveness::Unknown);
    }

    #[test]
    fn exited_child_is_dead() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let start = read_stat(pid).map_or(0, |s| s.start as u32);
        child.wait().unwrap();
        let who = Identity {
            word: (u64::from(start) << 32) | u64::from(pid),
            namespace: current().namespace,
        };
        assert_eq!(liveness(who), Liveness::Dead);
        assert!(!pid_may_be_running(pid));
    }

    #[test]
    fn a_leader_that_exited_while_its_threads_run_is_alive() {
        let mut ready = [0 as libc::c_int; 2];
        // SAFETY: a pipe into an array of two descriptors.
        assert_eq!(unsafe { libc::pipe(ready.as_mut_ptr()) }, 0);
        // SAFETY: the child only makes raw system calls and starts a raw thread; nothing of the
        // parent's state is used, no destructor or lock is involved.
        let child = unsafe { libc::fork() };
        if child == 0 {
            extern "C" fn worker(arg: *mut libc::c_void) -> *mut libc::c_void {
                // SAFETY: `arg` is the write end of the pipe; the thread ends the whole process
                // after a bounded sleep, so nothing outlives the test.
                unsafe {
                    libc::write(arg as libc::c_int, [1u8].as_ptr().cast(), 1);
                    libc::sleep(3);
                    libc::_exit(0)
                }
            }
            let mut thread: libc::pthread_t = 0;
            // SAFETY: a plain thread running `worker`; then the leader thread alone exits
            // (`SYS_exit`, not `exit_group`, and no destructors): it becomes a zombie while its
            // other thread runs on.
            unsafe {
                libc::pthread_create(
                    &mut thread,
                    std::ptr::null(),
                    worker,
                    ready[1] as usize as *mut _,
                );
                libc::syscall(libc::SYS_exit, 0);
            }
        }
        // SAFETY: our copy of the write end is not needed.
        unsafe { libc::close(ready[1]) };
        let mut byte = 0u8;
        // SAFETY: reads one byte into a local; returns 0 at once if the child died first.
        let got = unsafe { libc::read(ready[0], (&mut byte as *mut u8).cast(), 1) };
        let start = read_stat(child as u32).map(|s| s.start as u32).unwrap_or(0);
        let who = Identity {
            word: (u64::from(start) << 32) | child as u64,
            namespace: current().namespace,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while read_stat(child as u32).map(|s| s.state) != Ok('Z')
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let zombie = read_stat(child as u32).map(|s| s.state) == Ok('Z');
        let while_running = liveness(who);
        let mut status = 0;
        // SAFETY: ends and reaps our own child, whatever happened above.
        unsafe {
            libc::kill(child, libc::SIGKILL);
            libc::waitpid(child, &mut status, 0);
            libc::close(ready[0]);
        }
        assert_eq!(got, 1, "the child's thread started");
        assert!(zombie, "the leader is a zombie");
        assert_eq!(
            while_running,
            Liveness::Alive,
            "its other thread still runs"
        );
        assert_eq!(liveness(who), Liveness::Dead);
    }

    #[test]
    fn an_exited_unreaped_process_is_dead() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let start = read_stat(pid).map(|s| s.start as u32);
        // Not reaped yet: a zombie (once it exited).
        let who = Identity {
            word: (u64::from(start.unwrap_or(0)) << 32) | u64::from(pid),
            namespace: current().namespace,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while read_stat(pid).map(|s| s.state) != Ok('Z') && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if start.is_ok() {
            assert_eq!(liveness(who), Liveness::Dead, "an exited zombie is dead");
        }
        child.wait().unwrap();
    }
}
