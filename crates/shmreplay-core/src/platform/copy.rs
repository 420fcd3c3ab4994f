//! Copies between private buffers and live shared memory, without data races in Rust's sense.
//!
//! Record bytes in the segment may be written by another process while we read them (that is
//! what the seqlock detects afterwards), so they must never be touched through `&[u8]`,
//! `ptr::copy` or volatile reads: all of those are undefined behaviour on a race (Rust RFC 3301,
//! crossbeam#859). Two sound ways remain, both here:
//!
//! * [`words`] (portable, the reference): every access is a `Relaxed` `AtomicU64` load or store.
//! * [`movsb`] (x86-64): `rep movsb` in inline assembly. Inline assembly is opaque to the
//!   compiler, whose model of it is "some code that may perform any accesses the hardware
//!   could"; the hardware performs `rep movsb` as byte-sized accesses, each of them
//!   single-copy atomic on x86, which is exactly a sequence of `Relaxed` `AtomicU8` accesses.
//!   This is the argument of the `atomic-memcpy` and `atomic-maybe-uninit` crates. It is much
//!   faster for large fields (it moves whole cache lines with fast-strings microcode).
//!
//! **One access width per byte range.** Racing atomic accesses of different sizes to the same
//! bytes are undefined behaviour (rust-lang/rust#128778), so a byte range written by one kernel
//! must be read by the same kernel: [`Kernel::for_len`] picks the kernel from the range's length
//! alone, and the layout decides which ranges exist (the whole record for small records, each
//! field for large ones), so writer and reader always agree.
//!
//! **The hardware half of the seqlock.** A writer's record stores must become visible no later
//! than its commit store (a `Release` store of the slot's version word, an ordinary `mov` on
//! x86). The stores of one `rep movsb` may be reordered among themselves, but string stores are
//! not reordered with a later ordinary store (Intel SDM vol. 3, §8.2.4 "Fast-String Operation
//! and Out-of-Order Stores"; AMD APM vol. 2 §7.4 likewise), so the commit publishes them all.
//! On the reader's side the `Acquire` fence after the copy orders its loads, string loads
//! included, before the validating load of the version word.
//!
//! The private side is ordinary memory owned by the caller, reached through raw pointers (it
//! may belong to numpy arrays that other references alias). Shared-side pointers are 8-byte
//! aligned and fields are padded to 8 bytes in the record, so a word-wise copy may always touch
//! the whole last word.

/// Below this many bytes, the word loop beats `rep movsb`'s start-up cost.
#[cfg(target_arch = "x86_64")]
const MOVSB_MIN_BYTES: usize = 256;

/// A copy kernel. Which one copies a byte range is decided by the range's *layout* (its
/// length, see [`Kernel::for_len`]), never by the call site, so that every access to a byte
/// range of a record has the same width in this process: writers and readers of a field both
/// ask `for_len(field bytes)` (or of the whole record, for records copied whole).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// `Relaxed` `AtomicU64` loads and stores: portable, the reference.
    Words,
    /// `rep movsb` (x86-64 only).
    Movsb,
}

impl Kernel {
    /// The kernel for a range of `len` bytes: the one forced by the environment variable
    /// `SHMREPLAY_COPY_KERNEL` (`words` or `movsb`; read once per process, for tests and
    /// benchmarks), else the fastest for that length on this CPU.
    ///
    /// Processes that force different kernels may copy the same bytes with different access
    /// widths. Each access is still single-copy atomic in hardware and the seqlock discards
    /// any copy that raced a write, so no torn record is ever returned; forcing is meant for
    /// tests and benchmarks, where all processes of a run force the same kernel.
    pub fn for_len(len: usize) -> Kernel {
        match forced() {
            Some(kernel) => kernel,
            #[cfg(target_arch = "x86_64")]
            None if len >= MOVSB_MIN_BYTES => Kernel::Movsb,
            None => Kernel::Words,
        }
    }

    /// The kernels this build can run on this CPU.
    pub fn available() -> &'static [Kernel] {
        #[cfg(target_arch = "x86_64")]
        return &[Kernel::Words, Kernel::Movsb];
        #[cfg(not(target_arch = "x86_64"))]
        return &[Kernel::Words];
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Words => "words",
            Kernel::Movsb => "movsb",
        }
    }

    /// Copies `len` bytes from shared memory at `src` to private memory at `dst`.
    ///
    /// # Safety
    /// `src` is 8-byte aligned and valid for reads of `len` rounded up to a multiple of 8, and
    /// every concurrent access to those bytes is atomic (this module or `AtomicU64`); `dst` is
    /// valid for writes of `len` bytes, and nothing else accesses it during the call.
    #[inline]
    pub unsafe fn load(self, dst: *mut u8, src: *const u8, len: usize) {
        match self {
            // SAFETY: forwarded contract.
            Kernel::Words => unsafe { words::load(dst, src, len) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: forwarded contract.
            Kernel::Movsb => unsafe { movsb::copy(dst, src, len) },
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Movsb => unreachable!("movsb is never chosen off x86-64"),
        }
    }

    /// Copies `len` bytes from private memory at `src` into shared memory at `dst`.
    ///
    /// # Safety
    /// `dst` is 8-byte aligned and valid for writes of `len` rounded up to a multiple of 8; the
    /// bytes past `len` up to that bound are padding that may be overwritten with zeros; every
    /// concurrent access to those bytes is atomic; `src` is valid for reads of `len` bytes and
    /// not written during the call.
    #[inline]
    pub unsafe fn store(self, dst: *mut u8, src: *const u8, len: usize) {
        match self {
            // SAFETY: forwarded contract.
            Kernel::Words => unsafe { words::store(dst, src, len) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: forwarded contract.
            Kernel::Movsb => unsafe { movsb::copy(dst, src, len) },
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Movsb => unreachable!("movsb is never chosen off x86-64"),
        }
    }
}

fn forced() -> Option<Kernel> {
    static FORCED: std::sync::OnceLock<Option<Kernel>> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| {
        let name = std::env::var("SHMREPLAY_COPY_KERNEL").ok()?;
        Kernel::available()
            .iter()
            .copied()
            .find(|k| k.name() == name.trim())
    })
}

/// The portable kernel: `Relaxed` `AtomicU64` accesses only.
pub mod words {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

    /// # Safety
    /// As [`super::Kernel::load`].
    #[inline]
    pub unsafe fn load(dst: *mut u8, src: *const u8, len: usize) {
        let src = src.cast::<u64>();
        let whole = len / 8;
        for i in 0..whole {
            // SAFETY: `src + i` is aligned and in bounds by the contract; `from_ptr` requires
            // that all concurrent accesses be atomic, which the contract also states.
            let word = unsafe { AtomicU64::from_ptr(src.add(i).cast_mut()) }.load(Relaxed);
            // SAFETY: `dst` is valid for `len` bytes (contract); unaligned private memory.
            unsafe {
                dst.add(8 * i)
                    .cast::<[u8; 8]>()
                    .write_unaligned(word.to_le_bytes())
            };
        }
        let tail = len % 8;
        if tail != 0 {
            // SAFETY: as above; the contract covers the whole last word.
            let word = unsafe { AtomicU64::from_ptr(src.add(whole).cast_mut()) }.load(Relaxed);
            for k in 0..tail {
                // SAFETY: `8 * whole + k < len`.
                unsafe { dst.add(8 * whole + k).write((word >> (8 * k)) as u8) };
            }
        }
    }

    /// # Safety
    /// As [`super::Kernel::store`].
    #[inline]
    pub unsafe fn store(dst: *mut u8, src: *const u8, len: usize) {
        let dst = dst.cast::<u64>();
        let whole = len / 8;
        for i in 0..whole {
            // SAFETY: `src` is valid for `len` bytes (contract); unaligned private memory.
            let word =
                u64::from_le_bytes(unsafe { src.add(8 * i).cast::<[u8; 8]>().read_unaligned() });
            // SAFETY: `dst + i` is aligned, in bounds, and only accessed atomically (contract).
            unsafe { AtomicU64::from_ptr(dst.add(i)) }.store(word, Relaxed);
        }
        let tail = len % 8;
        if tail != 0 {
            // Assembled in a register: going through a byte array on the stack costs a failed
            // store-to-load forwarding stall, which was half the time of a 64-row insert.
            let mut word = 0u64;
            for k in (0..tail).rev() {
                // SAFETY: `8 * whole + k < len`.
                word = (word << 8) | u64::from(unsafe { src.add(8 * whole + k).read() });
            }
            // SAFETY: as above; the rest of the last word is padding (contract).
            unsafe { AtomicU64::from_ptr(dst.add(whole)) }.store(word, Relaxed);
        }
    }
}

/// The x86-64 kernel: `rep movsb` (see the module docs for why this is sound).
#[cfg(target_arch = "x86_64")]
pub mod movsb {
    use std::arch::asm;

    /// Copies `len` bytes from `src` to `dst`, either of which may be shared memory.
    ///
    /// # Safety
    /// As [`super::Kernel::load`] or [`super::Kernel::store`], whichever side is shared.
    #[inline]
    pub unsafe fn copy(dst: *mut u8, src: *const u8, len: usize) {
        // SAFETY: `rep movsb` copies rcx bytes from [rsi] to [rdi] with the direction flag clear
        // (guaranteed by the ABI on function entry and never changed by Rust code); both ranges
        // are valid by the contract and the private side is exclusively ours. The shared side
        // is accessed as atomic bytes (module docs).
        unsafe {
            asm!(
                "rep movsb",
                inout("rcx") len => _,
                inout("rdi") dst => _,
                inout("rsi") src => _,
                options(nostack, preserves_flags)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Kernel;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_kernel_round_trips_every_length() {
        for &kernel in Kernel::available() {
            for len in [0usize, 1, 3, 7, 8, 9, 15, 16, 255, 256, 257, 1000, 28224] {
                let shared: Vec<AtomicU64> = (0..len.div_ceil(8) + 1)
                    .map(|_| AtomicU64::new(u64::MAX))
                    .collect();
                let base = shared.as_ptr().cast::<u8>().cast_mut();
                let input: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
                let mut output = vec![0u8; len];
                // SAFETY: `shared` is aligned, large enough, and only accessed atomically.
                unsafe {
                    kernel.store(base, input.as_ptr(), len);
                    kernel.load(output.as_mut_ptr(), base, len);
                }
                assert_eq!(input, output, "{kernel:?} kernel, {len} bytes");
                // The word after the padded field is untouched.
                let guard = shared[len.div_ceil(8)].load(std::sync::atomic::Ordering::Relaxed);
                assert_eq!(
                    guard,
                    u64::MAX,
                    "{kernel:?} kernel wrote past the field, {len} bytes"
                );
            }
        }
    }

    #[test]
    fn kernels_agree_with_each_other() {
        // What one kernel stores, every other kernel loads back identically.
        for len in [1usize, 8, 100, 256, 4096 + 3] {
            let input: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            for &writer in Kernel::available() {
                for &reader in Kernel::available() {
                    let shared: Vec<AtomicU64> =
                        (0..len.div_ceil(8)).map(|_| AtomicU64::new(0)).collect();
                    let base = shared.as_ptr().cast::<u8>().cast_mut();
                    let mut output = vec![0u8; len];
                    // SAFETY: as above; no other thread touches `shared`.
                    unsafe {
                        writer.store(base, input.as_ptr(), len);
                        reader.load(output.as_mut_ptr(), base, len);
                    }
                    assert_eq!(input, output, "{writer:?} -> {reader:?}, {len} bytes");
                }
            }
        }
    }
}
