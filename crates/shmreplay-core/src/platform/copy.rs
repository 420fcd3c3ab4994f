//! Copies between private buffers and live shared memory, without data races in Rust's sense.
//!
//! Record bytes in the segment may be written by another process while we read them (that is
//! what the seqlock detects afterwards), so they must never be touched through `&[u8]`,
//! `ptr::copy` or volatile reads: all of those are undefined behaviour on a race (Rust RFC 3301,
//! crossbeam#859). Two sound ways remain, both here:
//!
//! * [`words`] (portable, the reference): every access is a `Relaxed` `AtomicU64` load or store.
//! * the x86-64 kernels (`rep movsb`, AVX2 and AVX-512 loops, streaming stores), each one block
//!   of inline assembly. Inline assembly is opaque to the compiler, whose model of it is "some
//!   code that may perform any accesses the hardware could"; the hardware performs these
//!   copies as accesses that are single-copy atomic for every byte, which is at least a
//!   sequence of `Relaxed` `AtomicU8` accesses. This is the argument of the `atomic-memcpy` and
//!   `atomic-maybe-uninit` crates. They are much faster for large fields.
//!
//! **One access width per byte range.** Racing atomic accesses of different sizes to the same
//! bytes are undefined behaviour (rust-lang/rust#128778), so a byte range written with Rust
//! atomics must be read with Rust atomics of the same width, and one written by an assembly
//! kernel must be read by an assembly kernel: [`Kernel::for_load`], [`Kernel::for_store`] and
//! [`Kernel::for_store_read_soon`] split words from assembly by the range's length alone (the
//! word kernel below 256 bytes, assembly above), and the layout decides which ranges exist (the
//! whole record for small records, each field for large ones), so writer and reader always
//! agree. (`SHMREPLAY_COPY_KERNEL` overrides the split: every process attached to a buffer must
//! see the same value.)
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

/// Below this many bytes, the word loop beats the start-up cost of the assembly kernels.
#[cfg(target_arch = "x86_64")]
const ASM_MIN_BYTES: usize = 256;
/// Stores of at least this many bytes bypass the cache ([`Kernel::Stream`]) where that is the
/// default: an insert writes its record once and the writer never reads it back, so reading the
/// destination lines into the cache first (what an ordinary store does) only costs bandwidth.
#[cfg(target_arch = "x86_64")]
const STREAM_MIN_BYTES: usize = 16 << 10;

/// A copy kernel. Whether the word kernel or assembly copies a byte range is decided by the
/// range's *layout* (its length, see [`Kernel::for_load`] / [`Kernel::for_store`]), never by
/// the call site; a writer may only pick between assembly kernels ([`Kernel::for_store_read_soon`]).
///
/// One access width per byte range: a range is either copied by [`Kernel::Words`] on both
/// sides, or by assembly kernels on both sides. Assembly kernels may differ between the two
/// sides (a `rep movsb` read of what a vector loop wrote): each is opaque to the compiler, and
/// the hardware performs each of its accesses as (at least) single-copy-atomic bytes, so no
/// Rust-level access ever races one of a different width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// `Relaxed` `AtomicU64` loads and stores: portable, the reference.
    Words,
    /// `rep movsb` (x86-64): fast-strings microcode (ERMS/FSRM); the choice without AVX2.
    Movsb,
    /// A loop of 32-byte AVX2 moves (x86-64 with AVX2).
    Avx2,
    /// A loop of 64-byte AVX-512 moves (x86-64 with AVX-512F).
    Avx512,
    /// Stores: non-temporal vector stores that bypass the cache, then `sfence`; loads: the
    /// widest vector loop (x86-64 with AVX2).
    Stream,
}

impl Kernel {
    /// Every kernel, in the order of [`Kernel::name`]s.
    pub const ALL: [Kernel; 5] = [
        Kernel::Words,
        Kernel::Movsb,
        Kernel::Avx2,
        Kernel::Avx512,
        Kernel::Stream,
    ];

    /// The kernel that copies a range of `len` bytes out of the segment: the one forced by the
    /// environment variable `SHMREPLAY_COPY_KERNEL` (a [`Kernel::name`]; read once per
    /// process, for tests and benchmarks), else the default for that length on this CPU.
    pub fn for_load(len: usize) -> Kernel {
        Self::choose(len, false)
    }

    /// The kernel that copies a range of `len` bytes into the segment; see [`Kernel::for_load`].
    pub fn for_store(len: usize) -> Kernel {
        Self::choose(len, true)
    }

    /// The kernel that copies a range of `len` bytes into the segment when another process
    /// will read it back soon (a queue whose consumers are less than [`cache_reach`] bytes
    /// behind): ordinary stores, which leave the lines in the cache for that reader, where
    /// [`Kernel::for_store`] would bypass it. Always an assembly kernel where `for_store` is
    /// one, so a range keeps one access width.
    pub fn for_store_read_soon(len: usize) -> Kernel {
        Self::choose(len, false)
    }

    fn choose(len: usize, store: bool) -> Kernel {
        if let Some(kernel) = forced() {
            return kernel;
        }
        #[cfg(target_arch = "x86_64")]
        if len >= ASM_MIN_BYTES {
            let cpu = cpu();
            // Stores of large ranges: non-temporal where the CPU has the vector stores.
            if store && len >= STREAM_MIN_BYTES && cpu.avx2 {
                return Kernel::Stream;
            }
            // Otherwise the widest vector loop: on the development machine (Intel Xeon with
            // FSRM and AVX-512) it gathered Atari rows faster than `rep movsb`; on AMD, glibc
            // prefers vector loops too.
            return if cpu.avx512 {
                Kernel::Avx512
            } else if cpu.avx2 {
                Kernel::Avx2
            } else {
                Kernel::Movsb
            };
        }
        let _ = (len, store);
        Kernel::Words
    }

    /// True if this CPU can run the kernel.
    pub fn is_available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let cpu = cpu();
            match self {
                Kernel::Words | Kernel::Movsb => true,
                Kernel::Avx2 | Kernel::Stream => cpu.avx2,
                Kernel::Avx512 => cpu.avx512,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Kernel::Words
        }
    }

    /// The kernels this build can run on this CPU.
    pub fn available() -> Vec<Kernel> {
        Kernel::ALL
            .into_iter()
            .filter(|k| k.is_available())
            .collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Words => "words",
            Kernel::Movsb => "movsb",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512 => "avx512",
            Kernel::Stream => "stream",
        }
    }

    /// The kernel named `name` if this CPU can run it.
    pub fn from_name(name: &str) -> Option<Kernel> {
        Kernel::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .filter(|k| k.is_available())
    }

    /// Copies `len` bytes from shared memory at `src` to private memory at `dst`.
    ///
    /// # Safety
    /// `src` is 8-byte aligned and valid for reads of `len` rounded up to a multiple of 8, and
    /// every concurrent access to those bytes is atomic (this module or `AtomicU64`); `dst` is
    /// valid for writes of `len` bytes, and nothing else accesses it during the call. The
    /// kernel is available on this CPU.
    #[inline]
    pub unsafe fn load(self, dst: *mut u8, src: *const u8, len: usize) {
        // SAFETY (all arms): forwarded contract; the vector kernels' CPU features are
        // guaranteed by the contract (`is_available`).
        match self {
            Kernel::Words => unsafe { words::load(dst, src, len) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Movsb => unsafe { x86::movsb(dst, src, len) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { x86::avx2(dst, src, len) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { x86::avx512(dst, src, len) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Stream if cpu().avx512 => unsafe { x86::avx512(dst, src, len) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Stream => unsafe { x86::avx2(dst, src, len) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("only the word kernel exists off x86-64"),
        }
    }

    /// Copies `len` bytes from private memory at `src` into shared memory at `dst`.
    ///
    /// # Safety
    /// `dst` is 8-byte aligned and valid for writes of `len` rounded up to a multiple of 8; the
    /// bytes past `len` up to that bound are padding that may be overwritten with zeros; every
    /// concurrent access to those bytes is atomic; `src` is valid for reads of `len` bytes and
    /// not written during the call. The kernel is available on this CPU.
    #[inline]
    pub unsafe fn store(self, dst: *mut u8, src: *const u8, len: usize) {
        // SAFETY (all arms): as in `load`.
        match self {
            Kernel::Words => unsafe { words::store(dst, src, len) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Movsb => unsafe { x86::movsb(dst, src, len) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { x86::avx2(dst, src, len) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { x86::avx512(dst, src, len) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Stream if cpu().avx512 => unsafe { x86::stream512(dst, src, len) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Stream => unsafe { x86::stream256(dst, src, len) },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("only the word kernel exists off x86-64"),
        }
    }
}

/// What the kernels' choice depends on, read once.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug)]
struct Cpu {
    avx2: bool,
    avx512: bool,
}

#[cfg(target_arch = "x86_64")]
fn cpu() -> Cpu {
    static CPU: std::sync::OnceLock<Cpu> = std::sync::OnceLock::new();
    *CPU.get_or_init(|| Cpu {
        avx2: std::arch::is_x86_feature_detected!("avx2"),
        avx512: std::arch::is_x86_feature_detected!("avx512f"),
    })
}

/// A description of the kernels of this process: which exist, which was forced, and which
/// each range size gets, for benchmark reports.
pub fn describe() -> Vec<(String, String)> {
    let names = |ks: Vec<Kernel>| ks.iter().map(|k| k.name()).collect::<Vec<_>>().join(",");
    let mut out = vec![
        ("available".to_owned(), names(Kernel::available())),
        (
            "forced".to_owned(),
            forced().map_or("none", Kernel::name).to_owned(),
        ),
    ];
    for len in [64usize, 1024, 28_224] {
        out.push((
            format!("load {len} B"),
            Kernel::for_load(len).name().to_owned(),
        ));
        out.push((
            format!("store {len} B"),
            Kernel::for_store(len).name().to_owned(),
        ));
    }
    out.push((
        "store read soon 28224 B".to_owned(),
        Kernel::for_store_read_soon(28_224).name().to_owned(),
    ));
    out.push(("cache reach".to_owned(), cache_reach().to_string()));
    out
}

/// How many bytes written ahead of a reader it still finds in the cache: an eighth of the
/// largest cache the kernel reports for CPU 0 (`/sys/devices/system/cpu/cpu0/cache`), 4 MiB if
/// it reports none, and between 64 KiB and 256 MiB whatever it reports. An eighth, because the
/// cache is shared with everything else the processes touch: on the development machine (a VM
/// shown a 480 MiB L3) ordinary stores delivered Atari rows faster with up to 57 MB between
/// writer and reader and slower from 115 MB on. On a CPU with a 32 MiB L3 the reach is 4 MiB,
/// 74 Atari rows of 56 KB.
pub fn cache_reach() -> usize {
    static REACH: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *REACH.get_or_init(|| reach_of(largest_cache()))
}

fn reach_of(largest_cache: Option<usize>) -> usize {
    largest_cache.map_or(4 << 20, |bytes| (bytes / 8).clamp(64 << 10, 256 << 20))
}

/// The size of the largest cache of CPU 0, from sysfs (`index*/size`, e.g. "32768K").
fn largest_cache() -> Option<usize> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    dir.filter_map(|entry| {
        let size = std::fs::read_to_string(entry.ok()?.path().join("size")).ok()?;
        parse_cache_size(&size).filter(|&bytes| bytes > 0)
    })
    .max()
}

fn parse_cache_size(text: &str) -> Option<usize> {
    let text = text.trim();
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, ""),
    };
    let scale = match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return None,
    };
    digits.parse::<usize>().ok()?.checked_mul(scale)
}

fn forced() -> Option<Kernel> {
    static FORCED: std::sync::OnceLock<Option<Kernel>> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| {
        let name = std::env::var("SHMREPLAY_COPY_KERNEL").ok()?;
        Kernel::from_name(name.trim())
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

/// The x86-64 kernels, each one opaque inline-assembly block.
///
/// Why they are sound on shared memory (see the module docs): the compiler treats an asm block
/// as unknown code that may do whatever accesses the hardware could, so no Rust-level data
/// race exists; the hardware performs `rep movsb` as byte accesses and vector moves as
/// accesses of up to their width that are never torn below a byte, each single-copy atomic, so
/// the shared side sees a sequence of (at least) `Relaxed` byte-atomic accesses, as
/// `atomic-memcpy` and `atomic-maybe-uninit` argue. Ordering with the slot's version word:
/// ordinary and string stores are ordered before the later commit store (x86-TSO; Intel SDM
/// vol. 3 §8.2.4 for fast strings); non-temporal stores are not, so the streaming kernels end
/// with `sfence`, which orders them before every later store, the commit included.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;

    /// `rep movsb`: `len` bytes from `src` to `dst`.
    ///
    /// # Safety
    /// As [`super::Kernel::load`] / [`super::Kernel::store`], for whichever side is shared.
    #[inline]
    pub unsafe fn movsb(dst: *mut u8, src: *const u8, len: usize) {
        // SAFETY: copies rcx bytes from [rsi] to [rdi] with the direction flag clear (the ABI
        // guarantees it on entry and Rust code never sets it); both ranges are valid (contract).
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

    /// 128 bytes per iteration in 32-byte unaligned AVX2 moves, then 32 at a time, then the
    /// tail with `rep movsb`.
    ///
    /// # Safety
    /// As [`movsb`], on a CPU with AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn avx2(dst: *mut u8, src: *const u8, len: usize) {
        // SAFETY: reads exactly `len` bytes from `src` and writes exactly `len` bytes to `dst`
        // (each loop runs while at least its step remains; the tail copies the rest), both
        // valid (contract); the CPU has AVX2 (contract and target feature).
        unsafe {
            asm!(
                "cmp rcx, 128",
                "jb 3f",
                "2:",
                "vmovdqu ymm0, [rsi]",
                "vmovdqu ymm1, [rsi + 32]",
                "vmovdqu ymm2, [rsi + 64]",
                "vmovdqu ymm3, [rsi + 96]",
                "vmovdqu [rdi], ymm0",
                "vmovdqu [rdi + 32], ymm1",
                "vmovdqu [rdi + 64], ymm2",
                "vmovdqu [rdi + 96], ymm3",
                "add rsi, 128",
                "add rdi, 128",
                "sub rcx, 128",
                "cmp rcx, 128",
                "jae 2b",
                "3:",
                "cmp rcx, 32",
                "jb 5f",
                "4:",
                "vmovdqu ymm0, [rsi]",
                "vmovdqu [rdi], ymm0",
                "add rsi, 32",
                "add rdi, 32",
                "sub rcx, 32",
                "cmp rcx, 32",
                "jae 4b",
                "5:",
                "rep movsb",
                "vzeroupper",
                inout("rcx") len => _,
                inout("rdi") dst => _,
                inout("rsi") src => _,
                out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
                options(nostack)
            );
        }
    }

    /// 256 bytes per iteration in 64-byte unaligned AVX-512 moves, then 64 at a time, then the
    /// tail with `rep movsb`.
    ///
    /// # Safety
    /// As [`movsb`], on a CPU with AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn avx512(dst: *mut u8, src: *const u8, len: usize) {
        // SAFETY: as in `avx2`, with 64-byte moves; the CPU has AVX-512F (contract).
        unsafe {
            asm!(
                "cmp rcx, 256",
                "jb 3f",
                "2:",
                "vmovdqu64 zmm0, [rsi]",
                "vmovdqu64 zmm1, [rsi + 64]",
                "vmovdqu64 zmm2, [rsi + 128]",
                "vmovdqu64 zmm3, [rsi + 192]",
                "vmovdqu64 [rdi], zmm0",
                "vmovdqu64 [rdi + 64], zmm1",
                "vmovdqu64 [rdi + 128], zmm2",
                "vmovdqu64 [rdi + 192], zmm3",
                "add rsi, 256",
                "add rdi, 256",
                "sub rcx, 256",
                "cmp rcx, 256",
                "jae 2b",
                "3:",
                "cmp rcx, 64",
                "jb 5f",
                "4:",
                "vmovdqu64 zmm0, [rsi]",
                "vmovdqu64 [rdi], zmm0",
                "add rsi, 64",
                "add rdi, 64",
                "sub rcx, 64",
                "cmp rcx, 64",
                "jae 4b",
                "5:",
                "rep movsb",
                "vzeroupper",
                inout("rcx") len => _,
                inout("rdi") dst => _,
                inout("rsi") src => _,
                out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
                options(nostack)
            );
        }
    }

    /// Non-temporal stores, 32 bytes wide: the head up to the destination's next 32-byte
    /// boundary with `rep movsb`, then 128 bytes per iteration of `vmovntdq` (which needs an
    /// aligned destination) from unaligned loads, the tail with `rep movsb`, and `sfence`.
    ///
    /// # Safety
    /// As [`movsb`] with `dst` the shared side, on a CPU with AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn stream256(dst: *mut u8, src: *const u8, len: usize) {
        // SAFETY: head = min(len, bytes to the next 32-byte boundary of dst), copied first, so
        // every `vmovntdq` address is 32-byte aligned; then whole 128-byte blocks, then the
        // rest: exactly `len` bytes each way, in the valid ranges (contract).
        unsafe {
            asm!(
                "mov rdx, rdi",
                "neg rdx",
                "and rdx, 31",
                "cmp rdx, rcx",
                "cmova rdx, rcx",
                "sub rcx, rdx",
                "xchg rcx, rdx",
                "rep movsb",
                "mov rcx, rdx",
                "cmp rcx, 128",
                "jb 3f",
                "2:",
                "vmovdqu ymm0, [rsi]",
                "vmovdqu ymm1, [rsi + 32]",
                "vmovdqu ymm2, [rsi + 64]",
                "vmovdqu ymm3, [rsi + 96]",
                "vmovntdq [rdi], ymm0",
                "vmovntdq [rdi + 32], ymm1",
                "vmovntdq [rdi + 64], ymm2",
                "vmovntdq [rdi + 96], ymm3",
                "add rsi, 128",
                "add rdi, 128",
                "sub rcx, 128",
                "cmp rcx, 128",
                "jae 2b",
                "3:",
                "rep movsb",
                "sfence",
                "vzeroupper",
                inout("rcx") len => _,
                inout("rdi") dst => _,
                inout("rsi") src => _,
                out("rdx") _,
                out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
                options(nostack)
            );
        }
    }

    /// Non-temporal stores, 64 bytes wide (as [`stream256`] with AVX-512 and 64-byte
    /// alignment, 256 bytes per iteration).
    ///
    /// # Safety
    /// As [`movsb`] with `dst` the shared side, on a CPU with AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn stream512(dst: *mut u8, src: *const u8, len: usize) {
        // SAFETY: as in `stream256`, with a 64-byte aligned destination for `vmovntdq zmm`.
        unsafe {
            asm!(
                "mov rdx, rdi",
                "neg rdx",
                "and rdx, 63",
                "cmp rdx, rcx",
                "cmova rdx, rcx",
                "sub rcx, rdx",
                "xchg rcx, rdx",
                "rep movsb",
                "mov rcx, rdx",
                "cmp rcx, 256",
                "jb 3f",
                "2:",
                "vmovdqu64 zmm0, [rsi]",
                "vmovdqu64 zmm1, [rsi + 64]",
                "vmovdqu64 zmm2, [rsi + 128]",
                "vmovdqu64 zmm3, [rsi + 192]",
                "vmovntdq [rdi], zmm0",
                "vmovntdq [rdi + 64], zmm1",
                "vmovntdq [rdi + 128], zmm2",
                "vmovntdq [rdi + 192], zmm3",
                "add rsi, 256",
                "add rdi, 256",
                "sub rcx, 256",
                "cmp rcx, 256",
                "jae 2b",
                "3:",
                "rep movsb",
                "sfence",
                "vzeroupper",
                inout("rcx") len => _,
                inout("rdi") dst => _,
                inout("rsi") src => _,
                out("rdx") _,
                out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
                options(nostack)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Kernel;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_kernel_round_trips_every_length_at_every_word_offset() {
        let lengths = [
            0usize, 1, 3, 7, 8, 9, 15, 16, 31, 33, 63, 65, 127, 129, 255, 256, 257, 300, 511, 513,
            1000, 4096, 28_224, 40_000,
        ];
        for kernel in Kernel::available() {
            for (len, offset) in lengths
                .into_iter()
                .flat_map(|l| (0..8).map(move |o| (l, o)))
            {
                // `offset` words into a 64-byte aligned block: every alignment a destination
                // can have (the streaming kernels align it themselves).
                let words = offset + len.div_ceil(8) + 1 + 8;
                let block: Vec<AtomicU64> = (0..words).map(|_| AtomicU64::new(u64::MAX)).collect();
                let skip = (block.as_ptr() as usize).next_multiple_of(64) - block.as_ptr() as usize;
                let shared = &block[skip / 8 + offset..];
                let base = shared.as_ptr().cast::<u8>().cast_mut();
                let input: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
                let mut output = vec![0u8; len];
                // SAFETY: `shared` is aligned, large enough, and only accessed atomically.
                unsafe {
                    kernel.store(base, input.as_ptr(), len);
                    kernel.load(output.as_mut_ptr(), base, len);
                }
                assert_eq!(
                    input, output,
                    "{kernel:?} kernel, {len} bytes at word {offset}"
                );
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
    fn a_range_read_soon_keeps_its_access_width() {
        // Words and assembly never meet on one range, whichever store a writer picks.
        for len in [0usize, 8, 255, 256, 1000, 16 << 10, 28_224, 1 << 20] {
            let (store, soon, load) = (
                Kernel::for_store(len),
                Kernel::for_store_read_soon(len),
                Kernel::for_load(len),
            );
            let words = |k: Kernel| k == Kernel::Words;
            assert_eq!(
                words(store),
                words(soon),
                "{len} bytes: {store:?} / {soon:?}"
            );
            assert_eq!(
                words(store),
                words(load),
                "{len} bytes: {store:?} / {load:?}"
            );
            if super::forced().is_none() {
                assert_ne!(
                    soon,
                    Kernel::Stream,
                    "{len} bytes read soon must stay cached"
                );
            }
        }
    }

    #[test]
    fn cache_sizes_parse_as_sysfs_writes_them() {
        use super::parse_cache_size;
        assert_eq!(parse_cache_size("32768K\n"), Some(32 << 20));
        assert_eq!(parse_cache_size("491520K"), Some(480 << 20));
        assert_eq!(parse_cache_size("2M"), Some(2 << 20));
        assert_eq!(parse_cache_size("4096"), Some(4096));
        for bad in ["", "K", "12X", "-1K", "99999999999999999999K"] {
            assert_eq!(parse_cache_size(bad), None, "{bad:?}");
        }
        use super::reach_of;
        assert_eq!(reach_of(None), 4 << 20, "no cache reported: 4 MiB");
        assert_eq!(reach_of(Some(32 << 20)), 4 << 20, "an eighth");
        assert_eq!(reach_of(Some(4 << 10)), 64 << 10, "at least 64 KiB");
        assert_eq!(reach_of(Some(1 << 40)), 256 << 20, "at most 256 MiB");
        assert!((64 << 10..=256 << 20).contains(&super::cache_reach()));
    }

    #[test]
    fn kernels_agree_with_each_other() {
        // What one kernel stores, every other kernel loads back identically.
        assert!(Kernel::available().contains(&Kernel::Words));
        for len in [1usize, 8, 100, 256, 4096 + 3, 28_224] {
            let input: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            for writer in Kernel::available() {
                for reader in Kernel::available() {
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
