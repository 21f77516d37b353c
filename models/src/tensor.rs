//! A named, typed, shaped tensor, with its data kept as little-endian bytes (what both wire
//! protocols carry) so that moving it between the API and a backend copies nothing.
//!
//! Invariant, enforced by every constructor (the fields are private): the data matches the
//! shape. Fixed-size datatypes hold exactly product(shape) × element size bytes (computed with
//! checked arithmetic, so a shape whose size overflows is refused); BYTES holds exactly
//! product(shape) elements, each short enough for its 4-byte length prefix. [`Tensor::split`],
//! [`Tensor::to_raw`] and the wire encoders rely on it and never index out of bounds.

use bytes::{BufMut, Bytes, BytesMut};

use crate::datatype::DataType;
use crate::error::Error;

#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    /// Fixed-size elements, little-endian, row-major.
    Fixed(Bytes),
    /// One entry per element of a BYTES tensor.
    Bytes(Vec<Bytes>),
}

/// A tensor whose data matches its shape (see the module documentation). Build it with
/// [`Tensor::new`] or one of the other constructors; read it with the accessors.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    name: String,
    datatype: DataType,
    shape: Vec<usize>,
    data: TensorData,
}

/// Checks a wire shape: no negative dimension, and an element count that fits in memory sizes.
pub fn shape_from_wire(name: &str, shape: &[i64]) -> Result<Vec<usize>, Error> {
    let mut out = Vec::with_capacity(shape.len());
    let mut count: usize = 1;
    for (index, &value) in shape.iter().enumerate() {
        let dim = usize::try_from(value).map_err(|_| Error::NegativeDimension {
            name: name.to_string(),
            index,
            value,
        })?;
        count = count
            .checked_mul(dim)
            .filter(|c| *c <= isize::MAX as usize / 8)
            .ok_or_else(|| Error::ShapeOverflow {
                name: name.to_string(),
                shape: shape.to_vec(),
            })?;
        out.push(dim);
    }
    Ok(out)
}

/// Splits KServe raw BYTES content (each element a 4-byte little-endian length, then the bytes).
pub fn parse_length_prefixed(name: &str, raw: &Bytes) -> Result<Vec<Bytes>, Error> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < raw.len() {
        let Some(len_bytes) = raw.get(at..at + 4) else {
            return Err(Error::MalformedBytes {
                name: name.to_string(),
                reason: format!("truncated length prefix at byte {at}"),
            });
        };
        let len =
            u32::from_le_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]) as usize;
        let start = at + 4;
        let end = start
            .checked_add(len)
            .filter(|e| *e <= raw.len())
            .ok_or_else(|| Error::MalformedBytes {
                name: name.to_string(),
                reason: format!(
                    "element at byte {at} claims {len} bytes but only {} remain",
                    raw.len() - start
                ),
            })?;
        out.push(raw.slice(start..end));
        at = end;
    }
    Ok(out)
}

fn element_count(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    /// The checked constructor: refuses data that does not match `datatype` and `shape` (see the
    /// module documentation), naming the tensor.
    pub fn new(
        name: impl Into<String>,
        datatype: DataType,
        shape: Vec<usize>,
        data: TensorData,
    ) -> Result<Self, Error> {
        let name = name.into();
        let overflow = |name: &str, shape: &[usize]| Error::ShapeOverflow {
            name: name.to_string(),
            shape: shape
                .iter()
                .map(|&d| i64::try_from(d).unwrap_or(i64::MAX))
                .collect(),
        };
        let Some(count) = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)) else {
            return Err(overflow(&name, &shape));
        };
        match (&data, datatype.element_size()) {
            (TensorData::Fixed(bytes), Some(size)) => {
                let Some(expected) = count.checked_mul(size) else {
                    return Err(overflow(&name, &shape));
                };
                if bytes.len() != expected {
                    return Err(Error::ByteLength {
                        name,
                        datatype,
                        shape,
                        expected,
                        actual: bytes.len(),
                    });
                }
            }
            (TensorData::Bytes(elements), None) => {
                if elements.len() != count {
                    return Err(Error::ElementCount {
                        name,
                        shape,
                        expected: count,
                        actual: elements.len(),
                    });
                }
                if let Some(at) = elements
                    .iter()
                    .position(|e| u32::try_from(e.len()).is_err())
                {
                    return Err(Error::MalformedBytes {
                        name,
                        reason: format!(
                            "element {at} is {} bytes, more than a 4-byte length prefix can say",
                            elements[at].len()
                        ),
                    });
                }
            }
            (TensorData::Fixed(_), None) => {
                return Err(Error::Incompatible {
                    name,
                    reason: format!("{datatype} needs one entry per element, not raw bytes"),
                });
            }
            (TensorData::Bytes(_), Some(_)) => {
                return Err(Error::Incompatible {
                    name,
                    reason: format!("{datatype} needs raw bytes, not BYTES elements"),
                });
            }
        }
        Ok(Tensor {
            name,
            datatype,
            shape,
            data,
        })
    }

    /// Builds a tensor from raw wire content (BYTES elements length-prefixed), checking the wire
    /// shape and that the data matches it.
    pub fn from_raw(
        name: &str,
        datatype: DataType,
        shape: &[i64],
        raw: Bytes,
    ) -> Result<Self, Error> {
        let shape = shape_from_wire(name, shape)?;
        let data = match datatype.element_size() {
            Some(_) => TensorData::Fixed(raw),
            None => TensorData::Bytes(parse_length_prefixed(name, &raw)?),
        };
        Tensor::new(name, datatype, shape, data)
    }

    /// Builds a BYTES tensor from its elements.
    pub fn from_elements(name: &str, shape: &[i64], elements: Vec<Bytes>) -> Result<Self, Error> {
        let shape = shape_from_wire(name, shape)?;
        Tensor::new(name, DataType::Bytes, shape, TensorData::Bytes(elements))
    }

    /// Builds an FP32 tensor from its values (row-major).
    pub fn from_f32(name: &str, shape: Vec<usize>, values: &[f32]) -> Result<Self, Error> {
        let mut buf = BytesMut::with_capacity(values.len().saturating_mul(4));
        for v in values {
            buf.put_f32_le(*v);
        }
        Tensor::new(name, DataType::Fp32, shape, TensorData::Fixed(buf.freeze()))
    }

    /// The same tensor under another name (the invariant does not depend on the name).
    pub fn renamed(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The tensor's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The element type.
    pub fn datatype(&self) -> DataType {
        self.datatype
    }

    /// The dimensions.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The data, which matches the shape.
    pub fn data(&self) -> &TensorData {
        &self.data
    }

    /// Takes the tensor apart: name, datatype, shape and data.
    pub fn into_parts(self) -> (String, DataType, Vec<usize>, TensorData) {
        (self.name, self.datatype, self.shape, self.data)
    }

    pub fn element_count(&self) -> usize {
        element_count(&self.shape)
    }

    /// The first dimension: the number of batch items for a batching model.
    pub fn batch_size(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    pub fn byte_size(&self) -> usize {
        match &self.data {
            TensorData::Fixed(b) => b.len(),
            TensorData::Bytes(elements) => elements.iter().map(|e| e.len() + 4).sum(),
        }
    }

    /// The data as KServe raw content (BYTES elements length-prefixed).
    pub fn to_raw(&self) -> Bytes {
        match &self.data {
            TensorData::Fixed(b) => b.clone(),
            TensorData::Bytes(elements) => {
                let mut buf = BytesMut::with_capacity(self.byte_size());
                for e in elements {
                    buf.put_u32_le(e.len() as u32);
                    buf.put_slice(e);
                }
                buf.freeze()
            }
        }
    }

    /// The values of an FP32 tensor.
    pub fn f32_values(&self) -> Result<Vec<f32>, Error> {
        match (&self.data, self.datatype) {
            (TensorData::Fixed(b), DataType::Fp32) => Ok(b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()),
            _ => Err(Error::Incompatible {
                name: self.name.clone(),
                reason: format!("expected FP32 data, found {}", self.datatype),
            }),
        }
    }

    /// Concatenates tensors along the first dimension. All parts must agree on name, datatype
    /// and every dimension but the first.
    pub fn concat(parts: &[&Tensor]) -> Result<Tensor, Error> {
        let Some(first) = parts.first() else {
            return Err(Error::Incompatible {
                name: String::new(),
                reason: "nothing to concatenate".into(),
            });
        };
        if parts.len() == 1 {
            return Ok((*first).clone());
        }
        if first.shape.is_empty() {
            return Err(Error::Incompatible {
                name: first.name.clone(),
                reason: "a scalar has no batch dimension".into(),
            });
        }
        let mut rows = 0;
        for p in parts {
            if p.datatype != first.datatype || p.shape.get(1..) != first.shape.get(1..) {
                return Err(Error::Incompatible {
                    name: first.name.clone(),
                    reason: format!(
                        "cannot batch {} {:?} with {} {:?}",
                        first.datatype, first.shape, p.datatype, p.shape
                    ),
                });
            }
            rows = p.shape[0]
                .checked_add(rows)
                .ok_or_else(|| Error::Incompatible {
                    name: first.name.clone(),
                    reason: "the batch has too many rows".into(),
                })?;
        }
        let mut shape = first.shape.clone();
        shape[0] = rows;
        let data = match &first.data {
            TensorData::Fixed(_) => {
                let total = parts.iter().map(|p| p.byte_size()).sum();
                let mut buf = BytesMut::with_capacity(total);
                for p in parts {
                    if let TensorData::Fixed(b) = &p.data {
                        buf.put_slice(b);
                    }
                }
                TensorData::Fixed(buf.freeze())
            }
            TensorData::Bytes(_) => TensorData::Bytes(
                parts
                    .iter()
                    .flat_map(|p| match &p.data {
                        TensorData::Bytes(e) => e.clone(),
                        TensorData::Fixed(_) => Vec::new(),
                    })
                    .collect(),
            ),
        };
        Tensor::new(first.name.clone(), first.datatype, shape, data)
    }

    /// Splits along the first dimension into parts of `sizes` rows; the inverse of [`concat`].
    /// The parts are slices of this tensor's data, valid because the tensor is (the invariant):
    /// the only check is that `sizes` adds up to the rows.
    ///
    /// [`concat`]: Tensor::concat
    pub fn split(&self, sizes: &[usize]) -> Result<Vec<Tensor>, Error> {
        let rows = self.shape.first().copied().unwrap_or(0);
        let asked = sizes.iter().try_fold(0usize, |sum, &n| sum.checked_add(n));
        if asked != Some(rows) {
            return Err(Error::Incompatible {
                name: self.name.clone(),
                reason: format!(
                    "output has {rows} rows, but the batch asked for {}",
                    sizes.iter().map(|&n| n as u128).sum::<u128>()
                ),
            });
        }
        if sizes.len() == 1 {
            return Ok(vec![self.clone()]);
        }
        if self.shape.is_empty() {
            return Err(Error::Incompatible {
                name: self.name.clone(),
                reason: "a scalar has no batch dimension".into(),
            });
        }
        // The invariant bounds these by the data's length when there is a row; with no rows
        // every part is empty, so an overflow there (a shape like [0, 2^40, 2^40]) is moot.
        let per_row = self.shape[1..]
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .unwrap_or(0);
        let row_bytes = per_row
            .checked_mul(self.datatype.element_size().unwrap_or(1))
            .unwrap_or(0);
        let mut out = Vec::with_capacity(sizes.len());
        let mut row = 0;
        for &n in sizes {
            let mut shape = self.shape.clone();
            shape[0] = n;
            let data = match &self.data {
                TensorData::Fixed(b) => {
                    TensorData::Fixed(b.slice(row * row_bytes..(row + n) * row_bytes))
                }
                TensorData::Bytes(e) => {
                    TensorData::Bytes(e[row * per_row..(row + n) * per_row].to_vec())
                }
            };
            out.push(Tensor {
                name: self.name.clone(),
                datatype: self.datatype,
                shape,
                data,
            });
            row += n;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn raw_fixed_checks_length() {
        let ok = Tensor::from_raw("x", DataType::Fp32, &[2, 2], Bytes::from(vec![0u8; 16]));
        assert!(ok.is_ok());
        let err =
            Tensor::from_raw("x", DataType::Fp32, &[2, 2], Bytes::from(vec![0u8; 15])).unwrap_err();
        assert!(matches!(
            err,
            Error::ByteLength {
                expected: 16,
                actual: 15,
                ..
            }
        ));
        assert!(err.to_string().contains("'x'"));
    }

    #[test]
    fn negative_and_overflowing_shapes_are_refused() {
        assert!(matches!(
            shape_from_wire("in", &[1, -3]),
            Err(Error::NegativeDimension {
                index: 1,
                value: -3,
                ..
            })
        ));
        assert!(matches!(
            shape_from_wire("in", &[i64::MAX, i64::MAX]),
            Err(Error::ShapeOverflow { .. })
        ));
    }

    #[test]
    fn bytes_round_trip_and_malformed() {
        let t = Tensor::from_elements(
            "s",
            &[2, 1],
            vec![Bytes::from_static(b"ab"), Bytes::from_static(b"")],
        )
        .unwrap();
        let raw = t.to_raw();
        assert_eq!(raw.len(), 4 + 2 + 4);
        let back = Tensor::from_raw("s", DataType::Bytes, &[2, 1], raw).unwrap();
        assert_eq!(back, t);
        let bad = Bytes::from(vec![9, 0, 0, 0, 1]);
        assert!(matches!(
            Tensor::from_raw("s", DataType::Bytes, &[1], bad),
            Err(Error::MalformedBytes { .. })
        ));
        let count = Tensor::from_raw("s", DataType::Bytes, &[3], t.to_raw());
        assert!(matches!(
            count,
            Err(Error::ElementCount {
                expected: 3,
                actual: 2,
                ..
            })
        ));
    }

    #[test]
    fn concat_refuses_mismatched_rows() {
        let a = Tensor::from_f32("x", vec![1, 2], &[1.0, 2.0]).unwrap();
        let b = Tensor::from_f32("x", vec![1, 3], &[1.0, 2.0, 3.0]).unwrap();
        assert!(Tensor::concat(&[&a, &b]).is_err());
    }

    #[test]
    fn new_refuses_data_that_does_not_match_the_shape() {
        let e = Tensor::new(
            "out",
            DataType::Fp32,
            vec![2, 3],
            TensorData::Fixed(Bytes::from(vec![0u8; 20])),
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                Error::ByteLength {
                    expected: 24,
                    actual: 20,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("'out'"), "{e}");
        let e = Tensor::new(
            "s",
            DataType::Bytes,
            vec![3],
            TensorData::Bytes(vec![Bytes::new(); 2]),
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                Error::ElementCount {
                    expected: 3,
                    actual: 2,
                    ..
                }
            ),
            "{e}"
        );
        // The data's form must be the datatype's.
        let e = Tensor::new(
            "x",
            DataType::Bytes,
            vec![4],
            TensorData::Fixed(Bytes::from(vec![0u8; 4])),
        )
        .unwrap_err();
        assert!(matches!(e, Error::Incompatible { .. }), "{e}");
        let e = Tensor::new(
            "x",
            DataType::Uint8,
            vec![1],
            TensorData::Bytes(vec![Bytes::new()]),
        )
        .unwrap_err();
        assert!(matches!(e, Error::Incompatible { .. }), "{e}");
        let e = Tensor::from_f32("x", vec![2, 2], &[1.0, 2.0, 3.0]).unwrap_err();
        assert!(matches!(e, Error::ByteLength { .. }), "{e}");
    }

    #[test]
    fn new_refuses_shapes_whose_size_overflows() {
        // The element count overflows...
        let e = Tensor::new(
            "x",
            DataType::Uint8,
            vec![usize::MAX, 2],
            TensorData::Fixed(Bytes::new()),
        )
        .unwrap_err();
        assert!(matches!(e, Error::ShapeOverflow { .. }), "{e}");
        // ...or only count × element size does.
        let e = Tensor::new(
            "x",
            DataType::Fp64,
            vec![usize::MAX / 4],
            TensorData::Fixed(Bytes::new()),
        )
        .unwrap_err();
        assert!(matches!(e, Error::ShapeOverflow { .. }), "{e}");
        // A zero dimension makes any other dimension harmless.
        let empty = Tensor::new(
            "x",
            DataType::Fp32,
            vec![0, usize::MAX],
            TensorData::Fixed(Bytes::new()),
        )
        .unwrap();
        assert_eq!(empty.element_count(), 0);
        assert_eq!(empty.split(&[0, 0]).unwrap().len(), 2);
    }

    #[test]
    fn split_of_a_scalar_is_an_error_not_a_panic() {
        let scalar = Tensor::from_f32("x", vec![], &[1.0]).unwrap();
        assert!(scalar.split(&[0, 0]).is_err());
        assert!(scalar.split(&[1]).is_err());
        assert!(
            scalar.split(&[usize::MAX, 1]).is_err(),
            "sizes that overflow"
        );
    }

    proptest! {
        #[test]
        fn split_inverts_concat(rows in proptest::collection::vec(1usize..4, 1..6), width in 1usize..5) {
            let parts: Vec<Tensor> = rows.iter().enumerate().map(|(i, &r)| {
                let values: Vec<f32> = (0..r * width).map(|v| (i * 100 + v) as f32).collect();
                Tensor::from_f32("x", vec![r, width], &values).unwrap()
            }).collect();
            let refs: Vec<&Tensor> = parts.iter().collect();
            let joined = Tensor::concat(&refs).unwrap();
            prop_assert_eq!(joined.shape[0], rows.iter().sum::<usize>());
            let back = joined.split(&rows).unwrap();
            prop_assert_eq!(back, parts);
        }

        #[test]
        fn new_accepts_exactly_the_matching_byte_length(
            shape in proptest::collection::vec(0usize..5, 0..4),
            datatype in proptest::sample::select(DataType::ALL.to_vec()),
            delta in -3i64..3,
        ) {
            let count: usize = shape.iter().product();
            match datatype.element_size() {
                Some(size) => {
                    let len = (count * size) as i64 + delta;
                    prop_assume!(len >= 0);
                    let data = TensorData::Fixed(Bytes::from(vec![0u8; len as usize]));
                    let made = Tensor::new("t", datatype, shape.clone(), data);
                    prop_assert_eq!(made.is_ok(), delta == 0);
                    if let Ok(t) = made {
                        prop_assert_eq!(t.byte_size(), count * size);
                        prop_assert_eq!(t.shape(), &shape[..]);
                    }
                }
                None => {
                    let n = count as i64 + delta;
                    prop_assume!(n >= 0);
                    let data = TensorData::Bytes(vec![Bytes::from_static(b"ab"); n as usize]);
                    let made = Tensor::new("t", datatype, shape.clone(), data);
                    prop_assert_eq!(made.is_ok(), delta == 0);
                    if let Ok(t) = made {
                        // Well-formed: its raw form parses back to the same tensor.
                        let wire: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
                        let back = Tensor::from_raw("t", datatype, &wire, t.to_raw()).unwrap();
                        prop_assert_eq!(back, t);
                    }
                }
            }
        }

        #[test]
        fn split_inverts_concat_for_bytes(rows in proptest::collection::vec(1usize..4, 1..6)) {
            let parts: Vec<Tensor> = rows.iter().enumerate().map(|(i, &r)| {
                let e = (0..r).map(|j| Bytes::from(format!("{i}-{j}"))).collect();
                Tensor::from_elements("t", &[r as i64, 1], e).unwrap()
            }).collect();
            let refs: Vec<&Tensor> = parts.iter().collect();
            let joined = Tensor::concat(&refs).unwrap();
            prop_assert_eq!(joined.split(&rows).unwrap(), parts);
        }
    }
}
