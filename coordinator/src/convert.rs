//! Tensors between the wire and the models: KServe v2 (`inference`) and `veraltheim.v1` tensors
//! to and from [`Tensor`]. Every refusal names the input and says what is wrong.

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{Value, json};
use tonic::Status;
use veraltheim_models::{DataType, Tensor, TensorData, tensor::shape_from_wire};
use veraltheim_proto::inference::{self as kserve, model_infer_request::InferInputTensor};
use veraltheim_proto::v1;

use crate::shm::{SharedMemory, check_total, shm_ref};

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

/// Packs integers of any source width into `datatype`'s little-endian layout, refusing values
/// that do not fit rather than wrapping them.
fn pack_ints(
    name: &str,
    datatype: DataType,
    values: impl Iterator<Item = i128>,
) -> Result<Bytes, Status> {
    let Some((min, max)) = datatype.integer_range() else {
        return Err(invalid(format!(
            "input '{name}': {datatype} is not an integer type"
        )));
    };
    let width = datatype.element_size().unwrap_or(8);
    let mut buf = BytesMut::new();
    for v in values {
        if v < min || v > max {
            return Err(invalid(format!(
                "input '{name}': value {v} does not fit in {datatype}"
            )));
        }
        buf.put_slice(&v.to_le_bytes()[..width]);
    }
    Ok(buf.freeze())
}

fn unpack_ints(datatype: DataType, raw: &[u8]) -> Vec<i128> {
    let width = datatype.element_size().unwrap_or(8);
    let signed = matches!(
        datatype,
        DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64
    );
    raw.chunks_exact(width)
        .map(|c| {
            let fill = if signed && c[width - 1] & 0x80 != 0 {
                0xff
            } else {
                0
            };
            let mut b = [fill; 16];
            b[..width].copy_from_slice(c);
            i128::from_le_bytes(b)
        })
        .collect()
}

fn check_count(name: &str, shape: &[i64], n: usize) -> Result<(), Status> {
    let shape = shape_from_wire(name, shape).map_err(|e| invalid(e.to_string()))?;
    let expected: usize = shape.iter().product();
    if expected != n {
        return Err(invalid(format!(
            "input '{name}': {n} values given, but shape {shape:?} needs {expected}"
        )));
    }
    Ok(())
}

fn floats<T: Copy>(values: &[T], put: impl Fn(&mut BytesMut, T)) -> Bytes {
    let mut buf = BytesMut::with_capacity(values.len() * 8);
    for v in values {
        put(&mut buf, *v);
    }
    buf.freeze()
}

/// KServe typed `contents` to a tensor. Exactly the list matching the datatype may hold data.
fn kserve_typed(
    name: &str,
    datatype: DataType,
    shape: &[i64],
    c: &kserve::InferTensorContents,
) -> Result<Tensor, Status> {
    let lens = [
        ("bool_contents", c.bool_contents.len()),
        ("int_contents", c.int_contents.len()),
        ("int64_contents", c.int64_contents.len()),
        ("uint_contents", c.uint_contents.len()),
        ("uint64_contents", c.uint64_contents.len()),
        ("fp32_contents", c.fp32_contents.len()),
        ("fp64_contents", c.fp64_contents.len()),
        ("bytes_contents", c.bytes_contents.len()),
    ];
    let expected = match datatype {
        DataType::Bool => "bool_contents",
        DataType::Int8 | DataType::Int16 | DataType::Int32 => "int_contents",
        DataType::Int64 => "int64_contents",
        DataType::Uint8 | DataType::Uint16 | DataType::Uint32 => "uint_contents",
        DataType::Uint64 => "uint64_contents",
        DataType::Fp32 => "fp32_contents",
        DataType::Fp64 => "fp64_contents",
        DataType::Bytes => "bytes_contents",
        DataType::Fp16 | DataType::Bf16 => {
            return Err(invalid(format!(
                "input '{name}': {datatype} data must be sent in raw_input_contents"
            )));
        }
    };
    if let Some((other, _)) = lens.iter().find(|(f, n)| *n > 0 && *f != expected) {
        return Err(invalid(format!(
            "input '{name}': datatype {datatype} takes its data in {expected}, but {other} is set"
        )));
    }
    let count = lens
        .iter()
        .find(|(f, _)| *f == expected)
        .map_or(0, |(_, n)| *n);
    check_count(name, shape, count)?;
    let raw = match datatype {
        DataType::Bool => Bytes::from(c.bool_contents.iter().map(|b| *b as u8).collect::<Vec<_>>()),
        DataType::Int8 | DataType::Int16 | DataType::Int32 => {
            pack_ints(name, datatype, c.int_contents.iter().map(|v| *v as i128))?
        }
        DataType::Int64 => pack_ints(name, datatype, c.int64_contents.iter().map(|v| *v as i128))?,
        DataType::Uint8 | DataType::Uint16 | DataType::Uint32 => {
            pack_ints(name, datatype, c.uint_contents.iter().map(|v| *v as i128))?
        }
        DataType::Uint64 => {
            pack_ints(name, datatype, c.uint64_contents.iter().map(|v| *v as i128))?
        }
        DataType::Fp32 => floats(&c.fp32_contents, |b, v| b.put_f32_le(v)),
        DataType::Fp64 => floats(&c.fp64_contents, |b, v| b.put_f64_le(v)),
        DataType::Bytes => {
            let elements = c.bytes_contents.clone();
            return Tensor::from_elements(name, shape, elements)
                .map_err(|e| invalid(e.to_string()));
        }
        DataType::Fp16 | DataType::Bf16 => Bytes::new(),
    };
    Tensor::from_raw(name, datatype, shape, raw).map_err(|e| invalid(e.to_string()))
}

/// The tensors of a KServe request, raw or typed.
/// Inputs that name a shared-memory region (`shared_memory_region`, …) are read from it and
/// have no entry in `raw`; together they may take at most `max_shm_bytes`, checked before
/// anything is copied (bytes in the message itself are bounded by the message size).
pub fn kserve_inputs(
    inputs: Vec<InferInputTensor>,
    raw: Vec<Bytes>,
    shm: &SharedMemory,
    max_shm_bytes: u64,
) -> Result<Vec<Tensor>, Status> {
    let places = inputs
        .iter()
        .map(|i| shm_ref("input", &i.name, &i.parameters))
        .collect::<Result<Vec<_>, _>>()?;
    check_total(places.iter().flatten(), max_shm_bytes)?;
    let in_request = places.iter().filter(|p| p.is_none()).count();
    if !raw.is_empty() && raw.len() != in_request {
        return Err(invalid(format!(
            "raw_input_contents has {} entries but the request has {in_request} inputs not in shared memory; send one per such input, in order",
            raw.len(),
        )));
    }
    let mut raw = raw.into_iter();
    let mut out = Vec::with_capacity(inputs.len());
    for (input, place) in inputs.into_iter().zip(places) {
        let name = input.name.as_str();
        let datatype: DataType = input.datatype.parse().map_err(|_| {
            invalid(format!(
                "input '{name}': unknown datatype '{}' (expected one of BOOL, UINT8..UINT64, INT8..INT64, FP16, FP32, FP64, BF16, BYTES)",
                input.datatype
            ))
        })?;
        if let Some(place) = place {
            let bytes = shm.read(&format!("input '{name}'"), &place)?;
            out.push(
                Tensor::from_raw(name, datatype, &input.shape, bytes)
                    .map_err(|e| invalid(e.to_string()))?,
            );
            continue;
        }
        let typed = input.contents.as_ref();
        let has_typed = typed.is_some_and(|c| {
            !(c.bool_contents.is_empty()
                && c.int_contents.is_empty()
                && c.int64_contents.is_empty()
                && c.uint_contents.is_empty()
                && c.uint64_contents.is_empty()
                && c.fp32_contents.is_empty()
                && c.fp64_contents.is_empty()
                && c.bytes_contents.is_empty())
        });
        let tensor = match (raw.next(), typed) {
            (Some(_), Some(_)) if has_typed => {
                return Err(invalid(format!(
                    "input '{name}': data is given both in raw_input_contents and in contents; use one"
                )));
            }
            (Some(bytes), _) => Tensor::from_raw(name, datatype, &input.shape, bytes)
                .map_err(|e| invalid(e.to_string()))?,
            (None, Some(c)) if has_typed => kserve_typed(name, datatype, &input.shape, c)?,
            (None, _) => {
                let shape =
                    shape_from_wire(name, &input.shape).map_err(|e| invalid(e.to_string()))?;
                if shape.iter().product::<usize>() != 0 {
                    return Err(invalid(format!(
                        "input '{name}': no data given (neither raw_input_contents nor contents)"
                    )));
                }
                Tensor::from_raw(name, datatype, &input.shape, Bytes::new())
                    .map_err(|e| invalid(e.to_string()))?
            }
        };
        out.push(tensor);
    }
    Ok(out)
}

pub fn shape_to_wire(shape: &[usize]) -> Vec<i64> {
    shape.iter().map(|d| *d as i64).collect()
}

/// A tensor as a KServe output (data goes to `raw_output_contents`).
pub fn kserve_output(t: &Tensor) -> kserve::model_infer_response::InferOutputTensor {
    kserve::model_infer_response::InferOutputTensor {
        name: t.name().to_string(),
        datatype: t.datatype().as_str().to_string(),
        shape: shape_to_wire(t.shape()),
        parameters: Default::default(),
        contents: None,
    }
}

pub fn v1_datatype(d: DataType) -> v1::DataType {
    let index = DataType::ALL.iter().position(|x| *x == d).unwrap_or(0) as i32 + 1;
    v1::DataType::try_from(index).unwrap_or(v1::DataType::Unspecified)
}

pub fn from_v1_datatype(name: &str, d: i32) -> Result<DataType, Status> {
    usize::try_from(d - 1)
        .ok()
        .and_then(|i| DataType::ALL.get(i).copied())
        .ok_or_else(|| {
            invalid(format!(
                "input '{name}': datatype {d} is not a known DataType"
            ))
        })
}

/// A `veraltheim.v1` tensor to a tensor.
pub fn from_v1(t: v1::Tensor) -> Result<Tensor, Status> {
    let name = t.name.as_str();
    let datatype = from_v1_datatype(name, t.datatype)?;
    match t.data {
        Some(v1::tensor::Data::Raw(raw)) => {
            Tensor::from_raw(name, datatype, &t.shape, raw).map_err(|e| invalid(e.to_string()))
        }
        Some(v1::tensor::Data::Values(v)) => {
            let contents = kserve::InferTensorContents {
                bool_contents: v.bools,
                int_contents: Vec::new(),
                int64_contents: Vec::new(),
                uint_contents: Vec::new(),
                uint64_contents: Vec::new(),
                fp32_contents: v.fp32,
                fp64_contents: v.fp64,
                bytes_contents: v.bytes,
            };
            let ints = v.ints;
            let uints = v.uints;
            if !ints.is_empty() || !uints.is_empty() {
                let wrong = if !ints.is_empty() && !uints.is_empty() {
                    true
                } else if !ints.is_empty() {
                    !matches!(
                        datatype,
                        DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64
                    )
                } else {
                    !matches!(
                        datatype,
                        DataType::Uint8 | DataType::Uint16 | DataType::Uint32 | DataType::Uint64
                    )
                };
                if wrong
                    || contents.bool_contents.len()
                        + contents.fp32_contents.len()
                        + contents.fp64_contents.len()
                        + contents.bytes_contents.len()
                        > 0
                {
                    return Err(invalid(format!(
                        "input '{name}': the values given do not match datatype {datatype}"
                    )));
                }
                check_count(name, &t.shape, ints.len() + uints.len())?;
                let raw = if ints.is_empty() {
                    pack_ints(name, datatype, uints.into_iter().map(i128::from))?
                } else {
                    pack_ints(name, datatype, ints.into_iter().map(i128::from))?
                };
                return Tensor::from_raw(name, datatype, &t.shape, raw)
                    .map_err(|e| invalid(e.to_string()));
            }
            kserve_typed(name, datatype, &t.shape, &contents)
        }
        None => {
            let shape = shape_from_wire(name, &t.shape).map_err(|e| invalid(e.to_string()))?;
            if shape.iter().product::<usize>() != 0 {
                return Err(invalid(format!("input '{name}': no data given")));
            }
            Tensor::from_raw(name, datatype, &t.shape, Bytes::new())
                .map_err(|e| invalid(e.to_string()))
        }
    }
}

/// A tensor as a `veraltheim.v1` tensor, raw or as typed values.
pub fn to_v1(t: &Tensor, raw: bool) -> v1::Tensor {
    let data = if raw || matches!(t.datatype(), DataType::Fp16 | DataType::Bf16) {
        v1::tensor::Data::Raw(t.to_raw())
    } else {
        let mut v = v1::TensorValues::default();
        match (&t.data(), t.datatype()) {
            (TensorData::Bytes(e), _) => v.bytes = e.clone(),
            (TensorData::Fixed(b), DataType::Bool) => v.bools = b.iter().map(|x| *x != 0).collect(),
            (TensorData::Fixed(b), DataType::Fp32) => {
                v.fp32 = b
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            }
            (TensorData::Fixed(b), DataType::Fp64) => {
                v.fp64 = b
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect()
            }
            (
                TensorData::Fixed(b),
                d @ (DataType::Uint8 | DataType::Uint16 | DataType::Uint32 | DataType::Uint64),
            ) => v.uints = unpack_ints(d, b).into_iter().map(|x| x as u64).collect(),
            (TensorData::Fixed(b), d) => {
                v.ints = unpack_ints(d, b).into_iter().map(|x| x as i64).collect()
            }
        }
        v1::tensor::Data::Values(v)
    };
    v1::Tensor {
        name: t.name().to_string(),
        datatype: v1_datatype(t.datatype()) as i32,
        shape: shape_to_wire(t.shape()),
        data: Some(data),
    }
}

/// Flattens a nested JSON array into its shape and leaves; ragged arrays are refused.
pub fn flatten(v: &Value) -> Result<(Vec<i64>, Vec<Value>), String> {
    match v {
        Value::Array(items) => {
            let mut shape = None;
            let mut leaves = Vec::new();
            for item in items {
                let (s, l) = flatten(item)?;
                match &shape {
                    None => shape = Some(s),
                    Some(prev) if *prev != s => {
                        return Err(format!("ragged array: rows of shapes {prev:?} and {s:?}"));
                    }
                    Some(_) => {}
                }
                leaves.extend(l);
            }
            let mut full = vec![items.len() as i64];
            full.extend(shape.unwrap_or_default());
            Ok((full, leaves))
        }
        leaf => Ok((Vec::new(), vec![leaf.clone()])),
    }
}

/// A nested JSON array as a `veraltheim.v1` tensor of typed values (the nesting gives the
/// shape); used by the CLI's `infer -i` and by batch inference jobs' input lines.
pub fn json_to_v1(name: &str, datatype: i32, value: &Value) -> Result<v1::Tensor, String> {
    let (shape, leaves) = flatten(value).map_err(|e| format!("input '{name}': {e}"))?;
    let dt = v1::DataType::try_from(datatype).unwrap_or(v1::DataType::Unspecified);
    let type_name = dt.as_str_name().trim_start_matches("DATA_TYPE_");
    let mut values = v1::TensorValues::default();
    let bad = |v: &Value| format!("input '{name}': {v} is not a {type_name}");
    for leaf in &leaves {
        use v1::DataType as D;
        match dt {
            D::Bool => values.bools.push(leaf.as_bool().ok_or_else(|| bad(leaf))?),
            D::Int8 | D::Int16 | D::Int32 | D::Int64 => {
                values.ints.push(leaf.as_i64().ok_or_else(|| bad(leaf))?)
            }
            D::Uint8 | D::Uint16 | D::Uint32 | D::Uint64 => {
                values.uints.push(leaf.as_u64().ok_or_else(|| bad(leaf))?)
            }
            D::Fp32 => values
                .fp32
                .push(leaf.as_f64().ok_or_else(|| bad(leaf))? as f32),
            D::Fp64 => values.fp64.push(leaf.as_f64().ok_or_else(|| bad(leaf))?),
            D::Bytes => values.bytes.push(Bytes::from(
                leaf.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| leaf.to_string()),
            )),
            _ => {
                return Err(format!(
                    "input '{name}': {type_name} values cannot be given as JSON"
                ));
            }
        }
    }
    Ok(v1::Tensor {
        name: name.to_string(),
        datatype,
        shape,
        data: Some(v1::tensor::Data::Values(values)),
    })
}

/// A `veraltheim.v1` tensor's values as flat JSON (raw contents as a placeholder string).
pub fn v1_values_json(t: &v1::Tensor) -> Vec<Value> {
    match &t.data {
        Some(v1::tensor::Data::Values(v)) => {
            let mut out: Vec<Value> = Vec::new();
            out.extend(v.bools.iter().map(|x| json!(x)));
            out.extend(v.ints.iter().map(|x| json!(x)));
            out.extend(v.uints.iter().map(|x| json!(x)));
            out.extend(v.fp32.iter().map(|x| json!(x)));
            out.extend(v.fp64.iter().map(|x| json!(x)));
            out.extend(v.bytes.iter().map(|x| json!(String::from_utf8_lossy(x))));
            out
        }
        Some(v1::tensor::Data::Raw(r)) => vec![json!(format!("<{} raw bytes>", r.len()))],
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(name: &str, datatype: &str, shape: Vec<i64>) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape,
            parameters: Default::default(),
            contents: None,
        }
    }

    #[test]
    fn shared_memory_inputs_over_the_request_limit_are_refused_before_any_read() {
        use kserve::infer_parameter::ParameterChoice;
        let in_shm = |name: &str, bytes: u64| {
            let mut i = input(name, "FP32", vec![1, 2]);
            let param = |c| kserve::InferParameter {
                parameter_choice: Some(c),
            };
            i.parameters.insert(
                "shared_memory_region".into(),
                param(ParameterChoice::StringParam("r".into())),
            );
            i.parameters.insert(
                "shared_memory_byte_size".into(),
                param(ParameterChoice::Uint64Param(bytes)),
            );
            i
        };
        // The server does not even allow shared memory here: reaching the read would be
        // PERMISSION_DENIED, so INVALID_ARGUMENT shows the sizes were checked first.
        let shm = SharedMemory::new(false);
        let err =
            kserve_inputs(vec![in_shm("a", 60), in_shm("b", 60)], vec![], &shm, 100).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        assert!(err.message().contains("limits.max_request_bytes"), "{err}");
        let err = kserve_inputs(
            vec![in_shm("a", u64::MAX), in_shm("b", 2)],
            vec![],
            &shm,
            100,
        )
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        let err =
            kserve_inputs(vec![in_shm("a", 40), in_shm("b", 60)], vec![], &shm, 100).unwrap_err();
        assert_ne!(
            err.code(),
            tonic::Code::InvalidArgument,
            "within the limit: {err}"
        );
    }

    #[test]
    fn raw_and_typed_agree() {
        let raw: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let a = kserve_inputs(
            vec![input("x", "FP32", vec![1, 2])],
            vec![Bytes::from(raw)],
            &SharedMemory::new(false),
            u64::MAX,
        )
        .unwrap();
        let mut typed = input("x", "FP32", vec![1, 2]);
        typed.contents = Some(kserve::InferTensorContents {
            fp32_contents: vec![1.0, 2.0],
            ..Default::default()
        });
        let b = kserve_inputs(vec![typed], vec![], &SharedMemory::new(false), u64::MAX).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn refusals_name_the_input() {
        let mut both = input("in0", "FP32", vec![1]);
        both.contents = Some(kserve::InferTensorContents {
            fp32_contents: vec![1.0],
            ..Default::default()
        });
        let cases: Vec<(Vec<InferInputTensor>, Vec<Bytes>, &str)> = vec![
            (vec![both], vec![Bytes::from(vec![0u8; 4])], "both"),
            (
                vec![input("in0", "FLOAT", vec![1])],
                vec![],
                "unknown datatype 'FLOAT'",
            ),
            (
                vec![input("in0", "FP32", vec![2])],
                vec![Bytes::from(vec![0u8; 4])],
                "needs 8",
            ),
            (
                vec![input("in0", "FP32", vec![-1])],
                vec![Bytes::new()],
                "non-negative",
            ),
            (
                vec![input("in0", "FP32", vec![1 << 40, 1 << 40])],
                vec![Bytes::new()],
                "too many",
            ),
            (vec![input("in0", "FP32", vec![1])], vec![], "no data"),
            (
                vec![input("in0", "FP32", vec![1])],
                vec![Bytes::new(), Bytes::new()],
                "2 entries",
            ),
        ];
        for (inputs, raw, want) in cases {
            let err = kserve_inputs(inputs, raw, &SharedMemory::new(false), u64::MAX).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(
                err.message().contains(want),
                "{} should contain {want}",
                err.message()
            );
            if want != "2 entries" {
                assert!(err.message().contains("in0"), "{}", err.message());
            }
        }
    }

    #[test]
    fn typed_integers_are_range_checked() {
        let mut t = input("i", "INT8", vec![2]);
        t.contents = Some(kserve::InferTensorContents {
            int_contents: vec![1, 300],
            ..Default::default()
        });
        let err = kserve_inputs(vec![t], vec![], &SharedMemory::new(false), u64::MAX).unwrap_err();
        assert!(err.message().contains("300"), "{}", err.message());
        let mut t = input("i", "INT8", vec![2]);
        t.contents = Some(kserve::InferTensorContents {
            fp32_contents: vec![1.0, 2.0],
            ..Default::default()
        });
        let err = kserve_inputs(vec![t], vec![], &SharedMemory::new(false), u64::MAX).unwrap_err();
        assert!(err.message().contains("int_contents"), "{}", err.message());
    }

    #[test]
    fn v1_round_trip_for_every_datatype() {
        for d in DataType::ALL {
            let t = match d.element_size() {
                Some(size) => {
                    let raw: Vec<u8> = (0..size * 3).map(|i| (i * 37 % 251) as u8).collect();
                    let raw = if d == DataType::Bool {
                        vec![1, 0, 1]
                    } else {
                        raw
                    };
                    Tensor::from_raw("t", d, &[3], Bytes::from(raw)).unwrap()
                }
                None => {
                    Tensor::from_elements("t", &[3], vec![Bytes::from_static(b"a"); 3]).unwrap()
                }
            };
            for raw in [true, false] {
                let back = from_v1(to_v1(&t, raw)).unwrap();
                assert_eq!(back, t, "{d} raw={raw}");
            }
        }
    }
}
