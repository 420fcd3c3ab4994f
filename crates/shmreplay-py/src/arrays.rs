//! Memory of numpy arrays and scalars seen as bytes: the binding's only `unsafe` code.

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
