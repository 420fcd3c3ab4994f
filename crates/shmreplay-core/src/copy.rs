//! Copies between private buffers and live shared memory, without data races in Rust's sense.
//!
//! Record bytes in the segment may be written by another process while we read them (that is
//! what the seqlock detects afterwards), so they must never be touched through `&[u8]`, `ptr::copy`
//! or volatile reads: all of those are undefined behaviour on a race (Rust RFC 3301,
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
//! The private side (`&[u8]` / `&mut [u8]`) is ordinary memory owned by the caller.
//! Shared-side pointers are 8-byte aligned and fields are padded to 8 bytes in the record, so a
//! word-wise copy may always touch the whole last word.

/// Below this many bytes, the word loop beats `rep movsb`'s start-up cost.
#[cfg(target_arch = "x86_64")]
const MOVSB_MIN_BYTES: usize = 256;

/// Copies `dst.len()` bytes from shared memory at `src` into `dst`.
///
/// # Safety
/// `src` is 8-byte aligned and valid for reads of `dst.len()` rounded up to a multiple of 8, and
/// every concurrent access to those bytes is atomic (this module or `AtomicU64`).
#[inline]
pub unsafe fn load(dst: &mut [u8], src: *const u8) {
    #[cfg(target_arch = "x86_64")]
    if dst.len() >= MOVSB_MIN_BYTES {
        // SAFETY: forwarded contract.
        return unsafe { movsb::load(dst, src) };
    }
    // SAFETY: forwarded contract.
    unsafe { words::load(dst, src) }
}

/// Copies `src` into shared memory at `dst`.
///
/// # Safety
/// `dst` is 8-byte aligned and valid for writes of `src.len()` rounded up to a multiple of 8;
/// the bytes past `src.len()` up to that bound are padding that may be overwritten with zeros;
/// every concurrent access to those bytes is atomic.
#[inline]
pub unsafe fn store(dst: *mut u8, src: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    if src.len() >= MOVSB_MIN_BYTES {
        // SAFETY: forwarded contract.
        return unsafe { movsb::store(dst, src) };
    }
    // SAFETY: forwarded contract.
    unsafe { words::store(dst, src) }
}

/// The portable kernel: `Relaxed` `AtomicU64` accesses only.
pub mod words {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

    /// See [`super::load`]; same contract.
    ///
    /// # Safety
    /// As [`super::load`].
    #[inline]
    pub unsafe fn load(dst: &mut [u8], src: *const u8) {
        let src = src.cast::<u64>();
        let mut chunks = dst.chunks_exact_mut(8);
        let mut i = 0;
        for chunk in &mut chunks {
            // SAFETY: `src + i` is aligned and in bounds by the contract; `from_ptr` requires
            // that all concurrent accesses be atomic, which the contract also states.
            let word = unsafe { AtomicU64::from_ptr(src.add(i).cast_mut()) }.load(Relaxed);
            chunk.copy_from_slice(&word.to_le_bytes());
            i += 1;
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            // SAFETY: as above; the contract covers the whole last word.
            let word = unsafe { AtomicU64::from_ptr(src.add(i).cast_mut()) }.load(Relaxed);
            for (k, byte) in tail.iter_mut().enumerate() {
                *byte = (word >> (8 * k)) as u8;
            }
        }
    }

    /// See [`super::store`]; same contract.
    ///
    /// # Safety
    /// As [`super::store`].
    #[inline]
    pub unsafe fn store(dst: *mut u8, src: &[u8]) {
        let dst = dst.cast::<u64>();
        let mut chunks = src.chunks_exact(8);
        let mut i = 0;
        for chunk in &mut chunks {
            let word = u64::from_le_bytes(chunk.try_into().expect("8-byte chunk"));
            // SAFETY: `dst + i` is aligned, in bounds, and only accessed atomically (contract).
            unsafe { AtomicU64::from_ptr(dst.add(i)) }.store(word, Relaxed);
            i += 1;
        }
        let tail = chunks.remainder();
        if !tail.is_empty() {
            // Assembled in a register: going through a byte array on the stack costs a failed
            // store-to-load forwarding stall, which was half the time of a 64-row insert.
            let word = tail
                .iter()
                .rev()
                .fold(0u64, |w, &b| (w << 8) | u64::from(b));
            // SAFETY: as above; the rest of the last word is padding (contract).
            unsafe { AtomicU64::from_ptr(dst.add(i)) }.store(word, Relaxed);
        }
    }
}

/// The x86-64 kernel: `rep movsb` (see the module docs for why this is sound).
#[cfg(target_arch = "x86_64")]
pub mod movsb {
    use std::arch::asm;

    /// # Safety
    /// As [`super::load`].
    #[inline]
    pub unsafe fn load(dst: &mut [u8], src: *const u8) {
        // SAFETY: `rep movsb` copies rcx bytes from [rsi] to [rdi] with the direction flag clear
        // (guaranteed by the ABI on function entry and never changed by Rust code); both ranges
        // are valid by the contract and `dst` is exclusively ours. The shared side is accessed
        // as atomic bytes (module docs).
        unsafe {
            asm!(
                "rep movsb",
                inout("rcx") dst.len() => _,
                inout("rdi") dst.as_mut_ptr() => _,
                inout("rsi") src => _,
                options(nostack, preserves_flags)
            );
        }
    }

    /// # Safety
    /// As [`super::store`].
    #[inline]
    pub unsafe fn store(dst: *mut u8, src: &[u8]) {
        // SAFETY: as in `load`, with the roles swapped; only `src.len()` bytes are written.
        unsafe {
            asm!(
                "rep movsb",
                inout("rcx") src.len() => _,
                inout("rdi") dst => _,
                inout("rsi") src.as_ptr() => _,
                options(nostack, preserves_flags)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    type Kernel = (unsafe fn(&mut [u8], *const u8), unsafe fn(*mut u8, &[u8]));

    fn kernels() -> Vec<(&'static str, Kernel)> {
        let mut k: Vec<(&'static str, Kernel)> = vec![
            ("dispatch", (super::load, super::store)),
            ("words", (super::words::load, super::words::store)),
        ];
        #[cfg(target_arch = "x86_64")]
        k.push(("movsb", (super::movsb::load, super::movsb::store)));
        k
    }

    #[test]
    fn every_kernel_round_trips_every_length() {
        for (name, (load, store)) in kernels() {
            for len in [0usize, 1, 3, 7, 8, 9, 15, 16, 255, 256, 257, 1000, 28224] {
                let shared: Vec<AtomicU64> = (0..len.div_ceil(8) + 1)
                    .map(|_| AtomicU64::new(u64::MAX))
                    .collect();
                let base = shared.as_ptr().cast::<u8>().cast_mut();
                let input: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
                let mut output = vec![0u8; len];
                // SAFETY: `shared` is aligned, large enough, and only accessed atomically.
                unsafe {
                    store(base, &input);
                    load(&mut output, base);
                }
                assert_eq!(input, output, "{name} kernel, {len} bytes");
                // The word after the padded field is untouched.
                let guard = shared[len.div_ceil(8)].load(std::sync::atomic::Ordering::Relaxed);
                assert_eq!(
                    guard,
                    u64::MAX,
                    "{name} kernel wrote past the field, {len} bytes"
                );
            }
        }
    }
}
