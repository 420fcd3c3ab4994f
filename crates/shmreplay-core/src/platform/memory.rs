//! The caller's memory, as copies see it: raw byte ranges, never Rust references.
//!
//! An embedding runtime hands us memory it does not give up: numpy arrays that other Python
//! threads may hold, inputs that overlap each other (`obs` and `next_obs` as two views of one
//! frame stack), outputs the caller reuses. A `&mut [u8]` over such memory while the
//! interpreter lock is released would assert an exclusivity nobody guarantees, so the copies
//! reach caller memory through these raw ranges, with every offset bounds-checked here.

use std::marker::PhantomData;

/// Bytes a copy reads from (an input column); may alias other inputs.
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    ptr: *const u8,
    len: usize,
    _borrow: PhantomData<&'a [u8]>,
}

// SAFETY: an `Input` is a read-only view; sending it to another thread is as safe as sending
// the `&[u8]` (or the raw memory) it was made from, which its constructors require.
unsafe impl Send for Input<'_> {}
// SAFETY: as above; only reads go through it.
unsafe impl Sync for Input<'_> {}

impl<'a> Input<'a> {
    pub fn from_slice(bytes: &'a [u8]) -> Input<'a> {
        Input {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
            _borrow: PhantomData,
        }
    }

    /// # Safety
    /// `ptr` is valid for reads of `len` bytes for `'a`, and nothing frees that memory meanwhile.
    /// Other views may read (and, at the caller's own risk, write) it.
    pub unsafe fn from_raw(ptr: *const u8, len: usize) -> Input<'a> {
        Input {
            ptr,
            len,
            _borrow: PhantomData,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address of byte `start` of a range of `len` bytes inside this input.
    pub(crate) fn range(&self, start: usize, len: usize) -> *const u8 {
        assert!(
            start.checked_add(len).is_some_and(|end| end <= self.len),
            "input range {start}+{len} out of bounds ({} bytes)",
            self.len
        );
        self.ptr.wrapping_add(start)
    }

    /// Copies `dst.len()` bytes from `start` into private memory.
    pub(crate) fn read_into(&self, start: usize, dst: &mut [u8]) {
        let src = self.range(start, dst.len());
        // SAFETY: in bounds (checked); `dst` is an exclusive private slice, so the ranges do
        // not overlap.
        unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) }
    }
}

/// Bytes a copy writes to (an output column); never read.
#[derive(Debug)]
pub struct Output<'a> {
    ptr: *mut u8,
    len: usize,
    _borrow: PhantomData<&'a mut [u8]>,
}

// SAFETY: as for `Input`; writes go only to the range the constructor vouched for.
unsafe impl Send for Output<'_> {}
// SAFETY: as above.
unsafe impl Sync for Output<'_> {}

impl<'a> Output<'a> {
    pub fn from_slice(bytes: &'a mut [u8]) -> Output<'a> {
        Output {
            ptr: bytes.as_mut_ptr(),
            len: bytes.len(),
            _borrow: PhantomData,
        }
    }

    /// # Safety
    /// `ptr` is valid for writes of `len` bytes for `'a`, nothing frees that memory meanwhile,
    /// and no other output of the same call overlaps it.
    pub unsafe fn from_raw(ptr: *mut u8, len: usize) -> Output<'a> {
        Output {
            ptr,
            len,
            _borrow: PhantomData,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The address of byte `start` of a range of `len` bytes inside this output.
    pub(crate) fn range(&self, start: usize, len: usize) -> *mut u8 {
        assert!(
            start.checked_add(len).is_some_and(|end| end <= self.len),
            "output range {start}+{len} out of bounds ({} bytes)",
            self.len
        );
        self.ptr.wrapping_add(start)
    }

    /// Copies `src` into this output at `start`.
    pub(crate) fn write(&self, start: usize, src: &[u8]) {
        let dst = self.range(start, src.len());
        // SAFETY: in bounds (checked); `src` is private memory, distinct from caller outputs.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) }
    }
}
