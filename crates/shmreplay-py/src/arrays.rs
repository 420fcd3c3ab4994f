//! Memory of numpy arrays and scalars seen as bytes: the binding's only `unsafe` code.

use std::marker::PhantomData;
use std::mem::size_of;

use numpy::npyffi::PY_ARRAY_API;
use numpy::{PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use shmreplay_core::{InColumn, OutColumn};

/// The address and byte length of a C-contiguous numpy array, checked for what copying into
/// or out of it needs. No Rust reference to its memory is ever formed: other views of the same
/// memory may exist (overlapping inputs, arrays other threads hold), so copies reach it through
/// the core's raw [`InColumn`] / [`OutColumn`] ranges.
fn array_memory(array: &Bound<'_, PyUntypedArray>, writable: bool) -> PyResult<(*mut u8, usize)> {
    if !array.is_c_contiguous() {
        return Err(PyValueError::new_err(
            "arrays passed to shmreplay._core must be C-contiguous",
        ));
    }
    let len = array.shape().iter().product::<usize>() * array.dtype().itemsize();
    let raw = array.as_array_ptr();
    // SAFETY: `raw` points to a live ndarray object (we hold a reference to it); reading its
    // header fields under the GIL is how numpy's own C API accesses them.
    let (data, flags) = unsafe { ((*raw).fields.data.cast::<u8>(), (*raw).fields.flags) };
    if writable && flags & numpy::npyffi::NPY_ARRAY_WRITEABLE == 0 {
        return Err(PyValueError::new_err("output array is read-only"));
    }
    Ok((data, len))
}

/// An input column: a read-only view of the caller's array, valid while `array` is borrowed.
pub(crate) fn input_of<'a>(array: &'a Bound<'_, PyUntypedArray>) -> PyResult<InColumn<'a>> {
    let (data, len) = array_memory(array, false)?;
    // SAFETY: a C-contiguous array owns `len` bytes at `data`; the borrow of `array` (a strong
    // reference) keeps it alive for 'a, and numpy cannot free or move the data of an array
    // that has other references (`resize` refuses). Only reads go through it.
    Ok(unsafe { InColumn::from_raw(data, len) })
}

pub(crate) fn inputs<'a>(arrays: &'a [Bound<'_, PyUntypedArray>]) -> PyResult<Vec<InColumn<'a>>> {
    arrays.iter().map(input_of).collect()
}

/// Output arrays, checked writable and pairwise disjoint.
pub(crate) fn outputs<'a>(arrays: &'a [Bound<'_, PyUntypedArray>]) -> PyResult<Vec<OutColumn<'a>>> {
    let memory = arrays
        .iter()
        .map(|a| array_memory(a, true))
        .collect::<PyResult<Vec<_>>>()?;
    disjoint(&memory)?;
    Ok(memory
        .into_iter()
        // SAFETY: as in `input_of`, and writable (checked); `disjoint` rejects overlapping
        // outputs, so no byte is written through two of them.
        .map(|(data, len)| unsafe { OutColumn::from_raw(data, len) })
        .collect())
}

fn disjoint(memory: &[(*mut u8, usize)]) -> PyResult<()> {
    let mut ranges: Vec<(usize, usize)> = memory
        .iter()
        .filter(|(_, len)| *len > 0)
        .map(|&(data, len)| (data as usize, data as usize + len))
        .collect();
    ranges.sort_unstable();
    if ranges.windows(2).any(|w| w[1].0 < w[0].1) {
        return Err(PyValueError::new_err("output arrays overlap"));
    }
    Ok(())
}

/// A numpy scalar (`np.float64(0.5)`, `np.int64(3)`, `np.bool_(True)`...) of a bool, integer or
/// float dtype of at most 8 bytes: its dtype's numpy kind (`b'b'`, `b'i'`, `b'u'`, `b'f'`) and
/// size, and its value's native-order bytes (the first `size` of them). `None` for anything else.
pub(crate) fn numpy_scalar(value: &Bound<'_, PyAny>) -> Option<(u8, usize, [u8; 8])> {
    let py = value.py();
    let obj = value.as_ptr();
    // SAFETY: `obj` is a live object (borrowed from `value`); the numpy C API is initialised
    // by `PY_ARRAY_API` on first use, and these calls take any object under the GIL.
    if unsafe { PY_ARRAY_API.PyArray_CheckAnyScalarExact(py, obj) } == 0 {
        return None;
    }
    // SAFETY: `obj` is a numpy scalar (checked); the call returns a new reference to its
    // dtype, which `from_owned_ptr_or_opt` takes over (and releases).
    let descr = unsafe {
        Bound::from_owned_ptr_or_opt(py, PY_ARRAY_API.PyArray_DescrFromScalar(py, obj).cast())?
    }
    .cast_into::<numpy::PyArrayDescr>()
    .ok()?;
    let (kind, size) = (descr.kind(), descr.itemsize());
    let fits = matches!(kind, b'b' | b'i' | b'u' | b'f')
        && size <= 8
        && matches!(descr.byteorder(), b'=' | b'|');
    if !fits {
        return None;
    }
    let mut bytes = [0u8; 8];
    // SAFETY: the scalar's dtype is a plain number of `size` <= 8 bytes (checked; not a
    // flexible type, of which the call would copy a pointer), so its C value fits `bytes`.
    unsafe { PY_ARRAY_API.PyArray_ScalarAsCtype(py, obj, bytes.as_mut_ptr().cast()) };
    Some((kind, size, bytes))
}

/// Plain numbers as the elements of an input are read.
///
/// # Safety
/// Every bit pattern of `size_of::<Self>()` bytes is a valid value of the type (no `bool`,
/// `char`, references or padding).
pub(crate) unsafe trait Element: Copy {
    type Bytes: AsRef<[u8]>;
    fn ne_bytes(self) -> Self::Bytes;
}

macro_rules! elements {
    ($($t:ty),*) => {$(
        // SAFETY: a primitive integer: every bit pattern is a value.
        unsafe impl Element for $t {
            type Bytes = [u8; size_of::<$t>()];
            fn ne_bytes(self) -> Self::Bytes {
                self.to_ne_bytes()
            }
        }
    )*};
}
elements!(u8, u16, u32, u64, i8, i16, i32, i64);

/// The bytes of an input to convert: a C-contiguous array's memory or a scalar's value, read
/// element by element through raw unaligned reads (as the copies of [`InColumn`], no Rust
/// reference to an array's memory is formed: another thread may write it meanwhile).
#[derive(Clone, Copy)]
pub(crate) struct Source<'a> {
    data: *const u8,
    len: usize,
    _borrow: PhantomData<&'a [u8]>,
}

impl<'a> Source<'a> {
    /// The memory of `array` (checked C-contiguous), valid while `array` is borrowed.
    pub(crate) fn of_array(array: &'a Bound<'_, PyUntypedArray>) -> Option<Source<'a>> {
        let (data, len) = array_memory(array, false).ok()?;
        Some(Source {
            data,
            len,
            _borrow: PhantomData,
        })
    }

    pub(crate) fn of_bytes(bytes: &'a [u8]) -> Source<'a> {
        Source {
            data: bytes.as_ptr(),
            len: bytes.len(),
            _borrow: PhantomData,
        }
    }

    /// Number of elements of `size` bytes.
    pub(crate) fn count(&self, size: usize) -> usize {
        self.len / size
    }

    /// The input read as consecutive `T`s (whole ones: a trailing partial element is ignored).
    pub(crate) fn elements<T: Element>(self) -> Elements<'a, T> {
        Elements {
            data: self.data,
            next: 0,
            count: self.count(size_of::<T>()),
            _borrow: PhantomData,
        }
    }
}

pub(crate) struct Elements<'a, T> {
    data: *const u8,
    next: usize,
    count: usize,
    _borrow: PhantomData<&'a [T]>,
}

impl<T: Element> Iterator for Elements<'_, T> {
    type Item = T;

    #[inline]
    fn next(&mut self) -> Option<T> {
        if self.next == self.count {
            return None;
        }
        // SAFETY: element `next` < `count` lies inside the `len` readable bytes at `data`,
        // which the borrow of the source (an array, by a strong reference, or a byte slice)
        // keeps alive; the read is unaligned-tolerant and every bit pattern is a `T`.
        let value = unsafe {
            self.data
                .add(self.next * size_of::<T>())
                .cast::<T>()
                .read_unaligned()
        };
        self.next += 1;
        Some(value)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.count - self.next;
        (left, Some(left))
    }
}
