//! Memory of numpy arrays and scalars seen as bytes: the binding's only `unsafe` code.

use numpy::npyffi::PY_ARRAY_API;
use numpy::{PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// The bytes of a C-contiguous numpy array, checked for what copying into or out of it needs.
///
/// # Safety
/// Nothing else reads or writes the array's memory while the returned slice lives: the array is
/// fresh (the Python package allocates outputs), or it is an input only read here. Outputs of
/// one call are also checked not to overlap each other ([`disjoint`]).
// numpy memory is reached through a shared `Bound`; exclusivity is the documented contract.
#[allow(clippy::mut_from_ref)]
unsafe fn array_bytes<'a>(
    array: &'a Bound<'_, PyUntypedArray>,
    writable: bool,
) -> PyResult<&'a mut [u8]> {
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
    if len == 0 {
        return Ok(&mut []);
    }
    // SAFETY: a C-contiguous array owns `len` bytes at `data`, kept alive by `array` for 'a;
    // exclusive use during the call is this function's contract.
    Ok(unsafe { std::slice::from_raw_parts_mut(data, len) })
}

/// An input column: a read-only view of the caller's array.
pub(crate) fn input_bytes_of<'a>(array: &'a Bound<'_, PyUntypedArray>) -> PyResult<&'a [u8]> {
    // SAFETY: only read; the GIL-holding caller keeps the array alive for the call.
    unsafe { array_bytes(array, false) }.map(|b| &*b)
}

pub(crate) fn input_bytes<'a>(arrays: &'a [Bound<'_, PyUntypedArray>]) -> PyResult<Vec<&'a [u8]>> {
    arrays.iter().map(input_bytes_of).collect()
}

/// Output arrays, checked writable and pairwise disjoint.
#[allow(clippy::mut_from_ref)] // see `array_bytes`
pub(crate) fn output_bytes<'a>(
    arrays: &'a [Bound<'_, PyUntypedArray>],
) -> PyResult<Vec<&'a mut [u8]>> {
    // SAFETY: outputs are arrays the Python package has just allocated; `disjoint` rejects the
    // same memory passed twice, so the slices never alias.
    let outputs = arrays
        .iter()
        .map(|a| unsafe { array_bytes(a, true) })
        .collect::<PyResult<Vec<_>>>()?;
    disjoint(&outputs)?;
    Ok(outputs)
}

fn disjoint(slices: &[&mut [u8]]) -> PyResult<()> {
    let mut ranges: Vec<(usize, usize)> = slices
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| (s.as_ptr() as usize, s.as_ptr() as usize + s.len()))
        .collect();
    ranges.sort_unstable();
    if ranges.windows(2).any(|w| w[1].0 < w[0].1) {
        return Err(PyValueError::new_err("output arrays overlap"));
    }
    Ok(())
}

pub(crate) fn as_u64s(bytes: &mut [u8]) -> PyResult<&mut [u64]> {
    // SAFETY: every bit pattern is a valid u64, and `align_to_mut` only puts aligned,
    // whole words in the middle part.
    let (head, words, tail) = unsafe { bytes.align_to_mut::<u64>() };
    if !head.is_empty() || !tail.is_empty() {
        return Err(PyValueError::new_err(
            "index and key must be aligned uint64 arrays",
        ));
    }
    Ok(words)
}

/// The value of a numpy scalar (`np.float32(0.5)`, `np.bool_(True)`...) whose dtype has numpy
/// kind `kind` and `size` bytes, as little-endian bytes; `None` for anything else.
pub(crate) fn numpy_scalar_bytes(
    value: &Bound<'_, PyAny>,
    kind: u8,
    size: usize,
) -> Option<[u8; 8]> {
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
    let fits = descr.kind() == kind
        && descr.itemsize() == size
        && matches!(descr.byteorder(), b'=' | b'|')
        && size <= 8;
    if !fits {
        return None;
    }
    let mut bytes = [0u8; 8];
    // SAFETY: the scalar's dtype is `size` <= 8 bytes (checked), so its C value fits `bytes`.
    unsafe { PY_ARRAY_API.PyArray_ScalarAsCtype(py, obj, bytes.as_mut_ptr().cast()) };
    Some(bytes)
}
