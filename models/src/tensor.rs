//! A named, typed, shaped tensor, with its data kept as little-endian bytes (what both wire
//! protocols carry) so that moving it between the API and a backend copies nothing.

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

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<usize>,
    pub data: TensorData,
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
    /// Builds a tensor from raw wire content, checking that the data matches the shape.
    pub fn from_raw(
        name: &str,
        datatype: DataType,
        shape: &[i64],
        raw: Bytes,
    ) -> Result<Self, Error> {
        let shape = shape_from_wire(name, shape)?;
        let expected = element_count(&shape);
        let data = match datatype.element_size() {
            Some(size) => {
                let expected_bytes = expected * size;
                if raw.len() != expected_bytes {
                    return Err(Error::ByteLength {
                        name: name.to_string(),
                        datatype,
                        shape,
                        expected: expected_bytes,
                        actual: raw.len(),
                    });
                }
                TensorData::Fixed(raw)
            }
            None => {
                let elements = parse_length_prefixed(name, &raw)?;
                if elements.len() != expected {
                    return Err(Error::ElementCount {
                        name: name.to_string(),
                        shape,
                        expected,
                        actual: elements.len(),
                    });
                }
                TensorData::Bytes(elements)
            }
        };
        Ok(Tensor {
            name: name.to_string(),
            datatype,
            shape,
            data,
        })
    }

    /// Builds a BYTES tensor from its elements.
    pub fn from_elements(name: &str, shape: &[i64], elements: Vec<Bytes>) -> Result<Self, Error> {
        let shape = shape_from_wire(name, shape)?;
        let expected = element_count(&shape);
        if elements.len() != expected {
            return Err(Error::ElementCount {
                name: name.to_string(),
                shape,
                expected,
                actual: elements.len(),
            });
        }
        Ok(Tensor {
            name: name.to_string(),
            datatype: DataType::Bytes,
            shape,
            data: TensorData::Bytes(elements),
        })
    }

    pub fn from_f32(name: &str, shape: Vec<usize>, values: &[f32]) -> Self {
        let mut buf = BytesMut::with_capacity(values.len() * 4);
        for v in values {
            buf.put_f32_le(*v);
        }
        Tensor {
            name: name.to_string(),
            datatype: DataType::Fp32,
            shape,
            data: TensorData::Fixed(buf.freeze()),
        }
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
            rows += p.shape[0];
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
        Ok(Tensor {
            name: first.name.clone(),
            datatype: first.datatype,
            shape,
            data,
        })
    }

    /// Splits along the first dimension into parts of `sizes` rows; the inverse of [`concat`].
    ///
    /// [`concat`]: Tensor::concat
    pub fn split(&self, sizes: &[usize]) -> Result<Vec<Tensor>, Error> {
        let rows = self.shape.first().copied().unwrap_or(0);
        if sizes.iter().sum::<usize>() != rows {
            return Err(Error::Incompatible {
                name: self.name.clone(),
                reason: format!(
                    "output has {rows} rows, but the batch asked for {}",
                    sizes.iter().sum::<usize>()
                ),
            });
        }
        if sizes.len() == 1 {
            return Ok(vec![self.clone()]);
        }
        let per_row: usize = self.shape[1..].iter().product();
        let mut out = Vec::with_capacity(sizes.len());
        let mut row = 0;
        for &n in sizes {
            let mut shape = self.shape.clone();
            shape[0] = n;
            let data = match &self.data {
                TensorData::Fixed(b) => {
                    let row_bytes = per_row * self.datatype.element_size().unwrap_or(1);
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
        let a = Tensor::from_f32("x", vec![1, 2], &[1.0, 2.0]);
        let b = Tensor::from_f32("x", vec![1, 3], &[1.0, 2.0, 3.0]);
        assert!(Tensor::concat(&[&a, &b]).is_err());
    }

    proptest! {
        #[test]
        fn split_inverts_concat(rows in proptest::collection::vec(1usize..4, 1..6), width in 1usize..5) {
            let parts: Vec<Tensor> = rows.iter().enumerate().map(|(i, &r)| {
                let values: Vec<f32> = (0..r * width).map(|v| (i * 100 + v) as f32).collect();
                Tensor::from_f32("x", vec![r, width], &values)
            }).collect();
            let refs: Vec<&Tensor> = parts.iter().collect();
            let joined = Tensor::concat(&refs).unwrap();
            prop_assert_eq!(joined.shape[0], rows.iter().sum::<usize>());
            let back = joined.split(&rows).unwrap();
            prop_assert_eq!(back, parts);
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
