//! The fast path of `add` and `extend`: `{field: value}` turned into column bytes without
//! numpy's conversion machinery, for the values where that is trivially right. A numpy array
//! already of the field's dtype and shape, or a Python bool, int or float that the field's
//! dtype holds exactly as numpy would convert it, or a numpy scalar of the field's dtype.
//! Anything else (another dtype, a list, a value out of range) is declined, and the Python package converts and
//! validates it with numpy's rules and reports errors in numpy's terms.

use numpy::{PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyString};
use shmreplay_core::{DType, Field, InColumn, Schema};

/// The bytes of one field's column: an array's memory, or converted from a Python scalar.
pub(crate) enum Column<'a> {
    Borrowed(InColumn<'a>),
    Scalar([u8; 8], usize),
}

impl Column<'_> {
    pub(crate) fn input(&self) -> InColumn<'_> {
        match self {
            Column::Borrowed(input) => *input,
            Column::Scalar(bytes, len) => InColumn::from_slice(&bytes[..*len]),
        }
    }
}

/// The columns of `values` in schema order, for `rows` rows (`None`: one row given without a
/// leading dimension, as `add` takes it), or `None` to decline.
/// `names` are the schema's field names; `arrays` keeps the arrays borrowed from alive for the
/// columns' lifetime.
pub(crate) fn columns<'a, 'py>(
    schema: &Schema,
    names: &[Py<PyString>],
    values: &Bound<'py, PyDict>,
    rows: Option<usize>,
    arrays: &'a mut Vec<Bound<'py, PyUntypedArray>>,
) -> Option<Vec<Column<'a>>> {
    if values.len() != schema.fields().len() {
        return None;
    }
    let mut columns = Vec::with_capacity(schema.fields().len());
    let mut scalars = Vec::new();
    for (i, (field, name)) in schema.fields().iter().zip(names).enumerate() {
        let value = values.get_item(name.bind(values.py())).ok()??;
        if let Ok(array) = value.cast::<PyUntypedArray>() {
            if !array_fits(array, field, rows) {
                return None;
            }
            arrays.push(array.clone());
        } else if rows.is_none() && field.shape.is_empty() {
            scalars.push((i, scalar_bytes(&value, field.dtype)?));
        } else {
            return None;
        }
    }
    let arrays: &'a Vec<_> = arrays;
    let mut arrays = arrays.iter();
    let mut scalars = scalars.into_iter().peekable();
    for i in 0..schema.fields().len() {
        match scalars.next_if(|(j, _)| *j == i) {
            Some((_, (bytes, len))) => columns.push(Column::Scalar(bytes, len)),
            None => columns.push(Column::Borrowed(
                crate::arrays::input_of(arrays.next()?).ok()?,
            )),
        }
    }
    Some(columns)
}

/// An array of exactly the field's dtype (native byte order), C-contiguous, of shape
/// `(rows, *shape)` (or `shape` for one row without a leading dimension).
fn array_fits(array: &Bound<'_, PyUntypedArray>, field: &Field, rows: Option<usize>) -> bool {
    let dtype = array.dtype();
    let code = field.dtype.code().as_bytes();
    let shape = array.shape();
    let shape_fits = match rows {
        None => shape == field.shape.as_slice(),
        Some(n) => shape.first() == Some(&n) && &shape[1..] == field.shape.as_slice(),
    };
    shape_fits
        && array.is_c_contiguous()
        && dtype.kind() == code[0]
        && dtype.itemsize() == field.dtype.size()
        && matches!(dtype.byteorder(), b'=' | b'|')
}

/// A Python bool, int or float as the little-endian bytes numpy would store for it in a
/// `dtype` field under `same_kind` casting, or `None` where numpy refuses or rounds.
fn scalar_bytes(value: &Bound<'_, PyAny>, dtype: DType) -> Option<([u8; 8], usize)> {
    let mut bytes = [0u8; 8];
    let size = dtype.size();
    let mut put = |le: &[u8]| bytes[..le.len()].copy_from_slice(le);
    if value.is_exact_instance_of::<PyBool>() {
        let b = value.is_truthy().ok()?;
        match dtype {
            DType::F16 => return None,
            DType::F32 => put(&f32::from(u8::from(b)).to_le_bytes()),
            DType::F64 => put(&f64::from(u8::from(b)).to_le_bytes()),
            _ => put(&[u8::from(b)]),
        }
    } else if value.is_exact_instance_of::<PyInt>() {
        let n: i64 = value.extract().ok()?;
        match dtype {
            DType::Bool | DType::F16 => return None,
            // numpy converts the int64 it makes of a Python int, rounding to nearest.
            DType::F32 => put(&(n as f32).to_le_bytes()),
            DType::F64 => put(&(n as f64).to_le_bytes()),
            int => {
                let (min, max) = int_range(int);
                if i128::from(n) < min || i128::from(n) > max {
                    return None;
                }
                put(&n.to_le_bytes()[..size]);
            }
        }
    } else if value.is_exact_instance_of::<PyFloat>() {
        let x: f64 = value.extract().ok()?;
        match dtype {
            DType::F32 => put(&(x as f32).to_le_bytes()),
            DType::F64 => put(&x.to_le_bytes()),
            _ => return None,
        }
    } else {
        // A numpy scalar of exactly the field's dtype (e.g. an environment's np.float32).
        let code = dtype.code().as_bytes();
        return crate::arrays::numpy_scalar_bytes(value, code[0], size).map(|b| (b, size));
    }
    Some((bytes, size))
}

fn int_range(dtype: DType) -> (i128, i128) {
    let bits = 8 * dtype.size() as u32;
    if dtype.code().starts_with('u') {
        (0, (1i128 << bits) - 1)
    } else {
        (-(1i128 << (bits - 1)), (1i128 << (bits - 1)) - 1)
    }
}
