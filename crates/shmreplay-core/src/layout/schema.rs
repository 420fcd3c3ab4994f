//! Record schemas: named fields of fixed dtype and shape, laid out in an 8-byte-aligned record.
//!
//! Every field starts on an 8-byte boundary and is padded to a multiple of 8 bytes, so each field
//! is a whole number of `u64` words in shared memory (DESIGN.md invariant 3) and the record stride
//! is a multiple of 8.

use crate::error::{Error, Result};

/// Element type of a field, named as numpy names it (`dtype.kind` + `dtype.itemsize`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    Bool,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    F16,
    F32,
    F64,
}

impl DType {
    const ALL: [DType; 12] = [
        DType::Bool,
        DType::U8,
        DType::U16,
        DType::U32,
        DType::U64,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::F16,
        DType::F32,
        DType::F64,
    ];

    /// The short numpy code: `"b1"`, `"u1"` … `"f8"` (little-endian is implied).
    pub fn code(self) -> &'static str {
        match self {
            DType::Bool => "b1",
            DType::U8 => "u1",
            DType::U16 => "u2",
            DType::U32 => "u4",
            DType::U64 => "u8",
            DType::I8 => "i1",
            DType::I16 => "i2",
            DType::I32 => "i4",
            DType::I64 => "i8",
            DType::F16 => "f2",
            DType::F32 => "f4",
            DType::F64 => "f8",
        }
    }

    pub fn from_code(code: &str) -> Result<DType> {
        DType::ALL
            .into_iter()
            .find(|d| d.code() == code)
            .ok_or_else(|| {
                Error::InvalidSchema(format!(
                    "unsupported dtype {code:?} (supported: bool, uint8-64, int8-64, float16/32/64)"
                ))
            })
    }

    pub fn size(self) -> usize {
        self.code()[1..]
            .parse()
            .expect("codes end in their byte size")
    }
}

/// One named field of a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Byte offset of the field inside a record (a multiple of 8).
    pub offset: usize,
    /// Payload bytes of one value of this field (`dtype.size() * prod(shape)`), unpadded.
    pub bytes: usize,
}

/// An ordered set of fields and the record layout derived from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schema {
    fields: Vec<Field>,
    record_bytes: usize,
}

pub const MAX_FIELDS: usize = 256;
pub const MAX_FIELD_NAME: usize = 64;
pub const MAX_NDIM: usize = 8;
/// Upper bound on one record; keeps every offset computation far from overflow.
pub const MAX_RECORD_BYTES: usize = 1 << 32;
/// Upper bound on the encoded schema text stored in the segment header.
pub const MAX_SCHEMA_TEXT: usize = 32 * 1024;

pub(crate) fn align8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

impl Schema {
    /// Builds a schema from `(name, dtype, shape)` triples, in record order.
    pub fn new<S: AsRef<str>>(fields: &[(S, DType, Vec<usize>)]) -> Result<Schema> {
        if fields.is_empty() {
            return Err(Error::InvalidSchema(
                "a schema needs at least one field".into(),
            ));
        }
        if fields.len() > MAX_FIELDS {
            return Err(Error::InvalidSchema(format!(
                "{} fields is more than the limit of {MAX_FIELDS}",
                fields.len()
            )));
        }
        let mut out = Vec::with_capacity(fields.len());
        let mut offset = 0usize;
        for (name, dtype, shape) in fields {
            let name = name.as_ref();
            validate_field_name(name)?;
            if out.iter().any(|f: &Field| f.name == name) {
                return Err(Error::InvalidSchema(format!(
                    "field {name:?} appears twice"
                )));
            }
            if shape.len() > MAX_NDIM {
                return Err(Error::InvalidSchema(format!(
                    "field {name:?}: {} dimensions is more than the limit of {MAX_NDIM}",
                    shape.len()
                )));
            }
            let too_big = || {
                Error::InvalidSchema(format!(
                    "field {name:?}: shape {shape:?} makes a record larger than {MAX_RECORD_BYTES} bytes"
                ))
            };
            let mut bytes = dtype.size();
            for &d in shape {
                if d == 0 {
                    return Err(Error::InvalidSchema(format!(
                        "field {name:?}: shape {shape:?} has a zero dimension"
                    )));
                }
                bytes = bytes
                    .checked_mul(d)
                    .filter(|&b| b <= MAX_RECORD_BYTES)
                    .ok_or_else(too_big)?;
            }
            out.push(Field {
                name: name.to_owned(),
                dtype: *dtype,
                shape: shape.clone(),
                offset,
                bytes,
            });
            offset += align8(bytes);
            if offset > MAX_RECORD_BYTES {
                return Err(too_big());
            }
        }
        Ok(Schema {
            fields: out,
            record_bytes: offset,
        })
    }

    pub fn fields(&self) -> &[Field] {
        &self.fields
    }

    /// The record stride in shared memory: the sum of the 8-byte-padded fields.
    pub fn record_bytes(&self) -> usize {
        self.record_bytes
    }

    /// The canonical text stored in the segment: one `name:code:d0,d1,…` line per field.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        for f in &self.fields {
            let dims: Vec<String> = f.shape.iter().map(|d| d.to_string()).collect();
            text.push_str(&format!(
                "{}:{}:{}\n",
                f.name,
                f.dtype.code(),
                dims.join(",")
            ));
        }
        text
    }

    /// Parses [`Schema::encode`]'s text; anything else is an error, never a panic.
    pub fn decode(text: &str) -> Result<Schema> {
        let bad = |why: String| Error::InvalidSchema(format!("stored schema is malformed: {why}"));
        let mut fields = Vec::new();
        for line in text.lines() {
            let mut parts = line.split(':');
            let (Some(name), Some(code), Some(dims), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(bad(format!("line {line:?}")));
            };
            let shape = if dims.is_empty() {
                Vec::new()
            } else {
                dims.split(',')
                    .map(|d| {
                        d.parse::<usize>()
                            .map_err(|_| bad(format!("dimension {d:?}")))
                    })
                    .collect::<Result<Vec<_>>>()?
            };
            fields.push((name.to_owned(), DType::from_code(code)?, shape));
        }
        let schema = Schema::new(&fields)?;
        if schema.encode() != text {
            return Err(bad("not in canonical form".into()));
        }
        Ok(schema)
    }

    /// FNV-1a of the canonical text: identifies a schema in the header.
    pub fn hash(&self) -> u64 {
        fnv1a(self.encode().as_bytes())
    }
}

pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn validate_field_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok
        || name.len() > MAX_FIELD_NAME
        || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(Error::InvalidSchema(format!(
            "field name {name:?} must be an identifier ([A-Za-z_][A-Za-z0-9_]*, at most \
             {MAX_FIELD_NAME} characters)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn atari() -> Schema {
        Schema::new(&[
            ("obs", DType::U8, vec![4, 84, 84]),
            ("action", DType::I32, vec![]),
            ("reward", DType::F32, vec![]),
            ("next_obs", DType::U8, vec![4, 84, 84]),
            ("done", DType::Bool, vec![]),
        ])
        .unwrap()
    }

    #[test]
    fn layout_pads_every_field_to_eight_bytes() {
        let s = atari();
        let offsets: Vec<usize> = s.fields().iter().map(|f| f.offset).collect();
        assert_eq!(offsets, vec![0, 28224, 28232, 28240, 56464]);
        assert_eq!(s.record_bytes(), 56472);
        assert_eq!(s.fields()[2].bytes, 4);
    }

    #[test]
    fn encode_decode_round_trip() {
        let s = atari();
        assert_eq!(Schema::decode(&s.encode()).unwrap(), s);
        assert_eq!(s.encode().lines().next(), Some("obs:u1:4,84,84"));
    }

    #[test]
    fn rejects_bad_schemas() {
        let empty: [(&str, DType, Vec<usize>); 0] = [];
        assert!(Schema::new(&empty).is_err());
        assert!(Schema::new(&[("a", DType::U8, vec![]), ("a", DType::U8, vec![])]).is_err());
        assert!(Schema::new(&[("1a", DType::U8, vec![])]).is_err());
        assert!(Schema::new(&[("a b", DType::U8, vec![])]).is_err());
        assert!(Schema::new(&[("a", DType::U8, vec![0])]).is_err());
        assert!(Schema::new(&[("a", DType::F64, vec![1 << 20, 1 << 20])]).is_err());
        assert!(Schema::new(&[("a", DType::U8, vec![usize::MAX, 2])]).is_err());
    }

    #[test]
    fn decode_rejects_garbage() {
        for text in [
            "",
            "obs",
            "obs:u1",
            "obs:q9:",
            "obs:u1:x\n",
            "obs:u1:\nobs:u1:\n",
            "obs:u1:1",
        ] {
            assert!(Schema::decode(text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn dtype_codes_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_code(d.code()).unwrap(), d);
        }
        assert_eq!(DType::F16.size(), 2);
        assert_eq!(DType::Bool.size(), 1);
    }
}
