//! The fast path of `add` and `extend`: `{field: value}` turned into column bytes without
//! numpy's conversion machinery. A numpy array of the field's shape, a numpy scalar, or a
//! Python bool, int or float is taken when its conversion to the field's dtype is one numpy's
//! `same_kind` casting allows, and stored as exactly the bytes `np.asarray(value).astype(dtype)`
//! makes: an array or scalar of the field's dtype as it is, others converted element by element
//! here (bool to 0/1; integers to integers when every value fits; integers and floats to floats
//! rounding to nearest even).
//!
//! Anything else is declined (`put` returns False), and the Python package converts and
//! validates it with numpy's rules and reports errors in numpy's terms: lists, other dtypes
//! (big-endian, complex...), casts `same_kind` refuses (float to int, signed to unsigned, to
//! bool), integers out of the field's range (ValueError there, never wrapped here), and float
//! conversions numpy reports through `np.errstate` (overflow to inf, underflow, signalling
//! NaNs), so that numpy warns or raises about them exactly as it would.

use std::mem::size_of;

use numpy::{PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString};
use shmreplay_core::{DType, Field, InColumn, Schema};

use crate::arrays::{Element, Source};

/// The bytes of one field's column: an array's memory, or converted from a Python scalar,
/// numpy scalar or array of another dtype.
pub(crate) enum Column<'a> {
    Borrowed(InColumn<'a>),
    Scalar([u8; 8], usize),
    Converted(Vec<u8>),
}

impl Column<'_> {
    pub(crate) fn input(&self) -> InColumn<'_> {
        match self {
            Column::Borrowed(input) => *input,
            Column::Scalar(bytes, len) => InColumn::from_slice(&bytes[..*len]),
            Column::Converted(bytes) => InColumn::from_slice(bytes),
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
    for (field, name) in schema.fields().iter().zip(names) {
        let value = values.get_item(name.bind(values.py())).ok()??;
        if let Ok(array) = value.cast::<PyUntypedArray>() {
            let dtype = array_dtype(array, field, rows)?;
            if dtype == field.dtype {
                arrays.push(array.clone());
                // An empty placeholder until all the arrays are in `arrays` (below).
                columns.push(Column::Borrowed(InColumn::from_slice(&[])));
            } else {
                let source = Source::of_array(array)?;
                let mut bytes = vec![0u8; source.count(dtype.size()) * field.dtype.size()];
                convert(dtype, field.dtype, source, &mut bytes)?;
                columns.push(Column::Converted(bytes));
            }
        } else if rows.is_none() && field.shape.is_empty() {
            let (bytes, len) = scalar_bytes(&value, field.dtype)?;
            columns.push(Column::Scalar(bytes, len));
        } else if let (Some(n), true) = (rows, field.shape.is_empty()) {
            columns.push(Column::Converted(list_bytes(&value, n, field.dtype)?));
        } else {
            return None;
        }
    }
    let arrays: &'a Vec<_> = arrays;
    let mut arrays = arrays.iter();
    for column in &mut columns {
        if let Column::Borrowed(input) = column {
            *input = crate::arrays::input_of(arrays.next()?).ok()?;
        }
    }
    Some(columns)
}

/// A list of `rows` Python scalars of one type (all bool, all int or all float) for a scalar
/// field, as the bytes numpy would store for it: numpy makes such a list a bool, int64 or
/// float64 array, which converts as each element does on its own. Mixed types (numpy would
/// pick a common dtype, rounding twice) and anything else are declined.
fn list_bytes(value: &Bound<'_, PyAny>, rows: usize, dtype: DType) -> Option<Vec<u8>> {
    let list = value.cast::<PyList>().ok()?;
    // numpy makes an empty list a float64 array, which no bool or integer field accepts.
    if list.len() != rows || rows == 0 {
        return None;
    }
    let kind = |item: &Bound<'_, PyAny>| {
        if item.is_exact_instance_of::<PyBool>() {
            Some(0)
        } else if item.is_exact_instance_of::<PyInt>() {
            // Beyond int64 numpy picks uint64, float64 or object for the whole list.
            item.extract::<i64>().ok().map(|_| 1)
        } else if item.is_exact_instance_of::<PyFloat>() {
            Some(2)
        } else {
            None
        }
    };
    let mut first = None;
    let mut bytes = Vec::with_capacity(rows * dtype.size());
    for item in list.iter() {
        let k = kind(&item)?;
        if *first.get_or_insert(k) != k {
            return None;
        }
        let (value, len) = scalar_bytes(&item, dtype)?;
        bytes.extend_from_slice(&value[..len]);
    }
    Some(bytes)
}

/// The dtype of an array that has the field's shape, `(rows, *shape)` (or `shape` for one row
/// without a leading dimension), is C-contiguous and of a dtype the fast path reads (bool, int,
/// uint or float of a supported size, native byte order).
fn array_dtype(
    array: &Bound<'_, PyUntypedArray>,
    field: &Field,
    rows: Option<usize>,
) -> Option<DType> {
    let shape = array.shape();
    let shape_fits = match rows {
        None => shape == field.shape.as_slice(),
        Some(n) => shape.first() == Some(&n) && &shape[1..] == field.shape.as_slice(),
    };
    if !shape_fits || !array.is_c_contiguous() {
        return None;
    }
    let dtype = array.dtype();
    if !matches!(dtype.byteorder(), b'=' | b'|') {
        return None;
    }
    numpy_dtype(dtype.kind(), dtype.itemsize())
}

/// The core's dtype of numpy kind `kind` (`b'f'`...) and `size` bytes.
fn numpy_dtype(kind: u8, size: usize) -> Option<DType> {
    Some(match (kind, size) {
        (b'b', 1) => DType::Bool,
        (b'u', 1) => DType::U8,
        (b'u', 2) => DType::U16,
        (b'u', 4) => DType::U32,
        (b'u', 8) => DType::U64,
        (b'i', 1) => DType::I8,
        (b'i', 2) => DType::I16,
        (b'i', 4) => DType::I32,
        (b'i', 8) => DType::I64,
        (b'f', 2) => DType::F16,
        (b'f', 4) => DType::F32,
        (b'f', 8) => DType::F64,
        _ => return None,
    })
}

/// A Python bool, int or float, or a numpy scalar, as the native-order bytes numpy would store
/// for it in a `dtype` field, or `None` to decline (see the module's doc).
fn scalar_bytes(value: &Bound<'_, PyAny>, dtype: DType) -> Option<([u8; 8], usize)> {
    let size = dtype.size();
    // The value as numpy sees it: its dtype and the bytes of its value in that dtype.
    let (from, bytes): (DType, [u8; 8]) = if value.is_exact_instance_of::<PyBool>() {
        (
            DType::Bool,
            [u8::from(value.is_truthy().ok()?), 0, 0, 0, 0, 0, 0, 0],
        )
    } else if value.is_exact_instance_of::<PyInt>() {
        // numpy makes an int64 of a Python int, or a uint64 of one only that holds. Into an
        // integer field, the Python package takes any int the field holds, not only `same_kind`
        // casts (-1 into uint8 is refused as out of range, not as signed to unsigned): so does
        // this. Larger ints are declined.
        let (from, n): (DType, i128) = match value.extract::<i64>() {
            Ok(n) => (DType::I64, n.into()),
            Err(_) => (DType::U64, value.extract::<u64>().ok()?.into()),
        };
        if is_int(dtype) {
            let mut out = [0u8; 8];
            to_int(dtype, std::iter::once(n), &mut out[..size], |n| n)?;
            return Some((out, size));
        }
        // In range of its numpy dtype (checked above), so the casts below keep it.
        match from {
            DType::I64 => (from, (n as i64).to_ne_bytes()),
            _ => (from, (n as u64).to_ne_bytes()),
        }
    } else if value.is_exact_instance_of::<PyFloat>() {
        (DType::F64, value.extract::<f64>().ok()?.to_ne_bytes())
    } else {
        let (kind, from_size, bytes) = crate::arrays::numpy_scalar(value)?;
        (numpy_dtype(kind, from_size)?, bytes)
    };
    if from == dtype {
        return Some((bytes, size));
    }
    let mut out = [0u8; 8];
    convert(
        from,
        dtype,
        Source::of_bytes(&bytes[..from.size()]),
        &mut out[..size],
    )?;
    Some((out, size))
}

fn is_int(dtype: DType) -> bool {
    matches!(dtype.code().as_bytes()[0], b'i' | b'u')
}

fn is_unsigned(dtype: DType) -> bool {
    dtype.code().as_bytes()[0] == b'u'
}

// ------------------------------------------------------------------------------ conversion

/// Converts the elements of `source` (of dtype `from`) to dtype `to` into `out` (exactly the
/// converted size), as numpy's `astype` does, or returns `None` (with `out` partly written) for a
/// cast numpy's `same_kind` refuses, an integer out of range, or a float conversion that raises
/// a floating-point flag in numpy (overflow, underflow, invalid).
fn convert(from: DType, to: DType, source: Source<'_>, out: &mut [u8]) -> Option<()> {
    use DType::*;
    match from {
        Bool => from_bool(to, source.elements::<u8>(), out),
        U8 => from_int(to, source.elements::<u8>(), out),
        U16 => from_int(to, source.elements::<u16>(), out),
        U32 => from_int(to, source.elements::<u32>(), out),
        U64 => from_int(to, source.elements::<u64>(), out),
        I8 => from_int(to, source.elements::<i8>(), out),
        I16 => from_int(to, source.elements::<i16>(), out),
        I32 => from_int(to, source.elements::<i32>(), out),
        I64 => from_int(to, source.elements::<i64>(), out),
        F16 => from_float(to, source.elements::<u16>().map(widen_f16), out),
        F32 => from_float(to, source.elements::<u32>().map(widen_f32), out),
        F64 => from_float(to, source.elements::<u64>().map(widen_f64), out),
    }
}

/// Writes `f` of every element of `from` into consecutive `D`s of `out`.
#[inline]
fn fill<S, D: Element>(
    from: impl Iterator<Item = S>,
    out: &mut [u8],
    f: impl Fn(S) -> Option<D>,
) -> Option<()> {
    for (s, chunk) in from.zip(out.chunks_exact_mut(size_of::<D>())) {
        chunk.copy_from_slice(f(s)?.ne_bytes().as_ref());
    }
    Some(())
}

/// Integers into an integer field: `f` gives each element's value, stored if it fits.
#[inline]
fn to_int<S>(
    to: DType,
    from: impl Iterator<Item = S>,
    out: &mut [u8],
    f: impl Fn(S) -> i128,
) -> Option<()> {
    use DType::*;
    match to {
        U8 => fill(from, out, |s| u8::try_from(f(s)).ok()),
        U16 => fill(from, out, |s| u16::try_from(f(s)).ok()),
        U32 => fill(from, out, |s| u32::try_from(f(s)).ok()),
        U64 => fill(from, out, |s| u64::try_from(f(s)).ok()),
        I8 => fill(from, out, |s| i8::try_from(f(s)).ok()),
        I16 => fill(from, out, |s| i16::try_from(f(s)).ok()),
        I32 => fill(from, out, |s| i32::try_from(f(s)).ok()),
        I64 => fill(from, out, |s| i64::try_from(f(s)).ok()),
        Bool | F16 | F32 | F64 => None,
    }
}

/// numpy's bool: a byte, any nonzero one true (converted to 1; kept as is into a bool field).
fn from_bool(to: DType, from: impl Iterator<Item = u8>, out: &mut [u8]) -> Option<()> {
    match to {
        DType::Bool => fill(from, out, Some),
        DType::F16 => fill(from, out, |b| Some(if b != 0 { F16_ONE } else { 0u16 })),
        DType::F32 => fill(from, out, |b| Some(f32::from(u8::from(b != 0)).to_bits())),
        DType::F64 => fill(from, out, |b| Some(f64::from(u8::from(b != 0)).to_bits())),
        int => to_int(int, from, out, |b| i128::from(b != 0)),
    }
}

/// An integer element type.
trait Int: Element + Into<i128> {
    const SIGNED: bool;
    fn to_f32(self) -> f32;
    fn to_f64(self) -> f64;
}

macro_rules! ints {
    ($($t:ty: $signed:expr),*) => {$(
        impl Int for $t {
            const SIGNED: bool = $signed;
            // Rust's integer-to-float `as` rounds to nearest, ties to even, as numpy's C casts do.
            #[inline]
            fn to_f32(self) -> f32 {
                self as f32
            }
            #[inline]
            fn to_f64(self) -> f64 {
                self as f64
            }
        }
    )*};
}
ints!(u8: false, u16: false, u32: false, u64: false, i8: true, i16: true, i32: true, i64: true);

fn from_int<S: Int>(to: DType, from: impl Iterator<Item = S>, out: &mut [u8]) -> Option<()> {
    match to {
        // numpy's `same_kind` refuses int to bool, and signed to unsigned (whatever the values).
        DType::Bool => None,
        to if S::SIGNED && is_unsigned(to) => None,
        DType::F16 => fill(from, out, |s| f16_of_int(s.into())),
        DType::F32 => fill(from, out, |s| Some(s.to_f32().to_bits())),
        DType::F64 => fill(from, out, |s| Some(s.to_f64().to_bits())),
        int => to_int(int, from, out, |s| s.into()),
    }
}

/// Floats (widened exactly to f64; `None` for a signalling NaN) into a float field.
fn from_float(to: DType, from: impl Iterator<Item = Option<f64>>, out: &mut [u8]) -> Option<()> {
    match to {
        DType::F16 => fill(from, out, |x| f16_of(x?)),
        DType::F32 => fill(from, out, |x| f32_of(x?)),
        DType::F64 => fill(from, out, |x| Some(x?.to_bits())),
        // numpy's `same_kind` refuses float to int or bool.
        _ => None,
    }
}

const F16_ONE: u16 = 0x3c00;
/// The smallest positive normal float16, 2**-14.
const F16_MIN_NORMAL: f64 = 6.103515625e-05;

// A NaN's payload (its sign and the top mantissa bits, the quiet bit included) is kept through
// the conversions as the hardware (f32 <-> f64) and numpy's float16 routines keep it; the bits
// are moved by hand, not through float arithmetic. A signalling NaN, which the hardware reports
// as invalid and quiets (and numpy's float16 routines do not), is declined.

fn widen_f64(bits: u64) -> Option<f64> {
    let x = f64::from_bits(bits);
    (!x.is_nan() || bits & (1 << 51) != 0).then_some(x)
}

fn widen_f32(bits: u32) -> Option<f64> {
    let x = f32::from_bits(bits);
    if !x.is_nan() {
        // Exact (and through the hardware, as numpy's cast: subnormals as it treats them).
        return Some(f64::from(x));
    }
    if bits & (1 << 22) == 0 {
        return None;
    }
    let sign = u64::from(bits >> 31) << 63;
    Some(f64::from_bits(
        sign | 0x7ff0_0000_0000_0000 | (u64::from(bits & 0x007f_ffff) << 29),
    ))
}

fn widen_f16(h: u16) -> Option<f64> {
    let sign = u64::from(h >> 15) << 63;
    let exp = u64::from((h >> 10) & 0x1f);
    let mant = u64::from(h & 0x3ff);
    Some(match exp {
        // Zero and subnormals: mant * 2**-24, exact.
        0 => {
            let x = mant as f64 * (1.0 / 16_777_216.0);
            if sign != 0 {
                -x
            } else {
                x
            }
        }
        0x1f if mant != 0 && mant & 0x200 == 0 => return None,
        0x1f => f64::from_bits(sign | 0x7ff0_0000_0000_0000 | (mant << 42)),
        _ => f64::from_bits(sign | ((exp + 1023 - 15) << 52) | (mant << 42)),
    })
}

/// numpy's float64 to float32 cast (the hardware's: to nearest, ties to even), declining where
/// it raises a flag: a finite value rounding to inf (overflow), or a nonzero one below the
/// smallest normal float32 (underflow; a superset: numpy reports only inexact ones).
fn f32_of(x: f64) -> Option<u32> {
    if x.is_nan() {
        let bits = x.to_bits();
        let sign = ((bits >> 63) as u32) << 31;
        return Some(sign | 0x7f80_0000 | ((bits >> 29) as u32 & 0x007f_ffff));
    }
    let y = x as f32;
    let overflow = y.is_infinite() && x.is_finite();
    let underflow = x != 0.0 && x.abs() < f64::from(f32::MIN_POSITIVE);
    (!overflow && !underflow).then(|| y.to_bits())
}

/// numpy's float to float16 cast (`npy_doublebits_to_halfbits`: to nearest, ties to even), of an
/// exactly widened value, declining where numpy raises a flag: overflow to inf, or a nonzero
/// value below the smallest normal float16 (underflow; a superset, as for float32).
fn f16_of(x: f64) -> Option<u16> {
    let bits = x.to_bits();
    let sign = ((bits >> 48) & 0x8000) as u16;
    if x.is_nan() {
        // The quiet bit (51) lands on float16's (9): never the payload 0 of an infinity.
        return Some(sign | 0x7c00 | ((bits >> 42) & 0x3ff) as u16);
    }
    if x.is_infinite() || x == 0.0 {
        return Some(sign | if x.is_infinite() { 0x7c00 } else { 0 });
    }
    if x.abs() < F16_MIN_NORMAL {
        return None;
    }
    // A normal float64 >= 2**-14: exponent >= -14. Above 15 it overflows.
    let exp = ((bits >> 52) & 0x7ff) as i64 - 1023;
    if exp > 15 {
        return None;
    }
    let mant = bits & ((1 << 52) - 1);
    let mut h = (((exp + 15) as u64) << 10) | (mant >> 42);
    let rest = mant & ((1 << 42) - 1);
    let half = 1 << 41;
    if rest > half || (rest == half && h & 1 == 1) {
        h += 1; // a carry out of the mantissa bumps the exponent, as it should
    }
    (h < 0x7c00).then_some(sign | h as u16)
}

/// An integer into float16 (numpy rounds it to float32 first: exact below 2**24, and all larger
/// integers overflow float16 either way).
fn f16_of_int(n: i128) -> Option<u16> {
    if n.unsigned_abs() >= 65520 {
        return None; // rounds to inf: overflow
    }
    f16_of(n as f64)
}
