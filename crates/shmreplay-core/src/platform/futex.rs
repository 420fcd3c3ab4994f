//! Sleeping on a 32-bit word of the segment until another process changes it: Linux futexes,
//! *shared* (no `FUTEX_PRIVATE_FLAG`: the waiters are in other processes, and the kernel keys
//! the queue by the file page, not by this process's address).

use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// Sleeps while `word` holds `expected`, for at most `timeout`. Returns on a wake, a change of
/// the word, a signal or the timeout alike: callers check their condition again either way.
pub(crate) fn wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let timeout = libc::timespec {
        tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: FUTEX_WAIT only reads the 4-byte aligned word at `word` (an `AtomicU32` that lives
    // for the call) and the timespec on our stack; it has no other effect on our memory. Its
    // errors (EAGAIN: the word changed; EINTR; ETIMEDOUT) all mean "check again".
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &timeout as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Wakes every process sleeping on `word`.
pub(crate) fn wake_all(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE reads no memory of ours: the address only names the wait queue.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}
