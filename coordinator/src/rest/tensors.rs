//! KServe v2 inference requests and responses in their HTTP form: a JSON header, optionally
//! followed by binary tensor data (Triton's binary-data extension: the request says where the
//! JSON ends with `Inference-Header-Content-Length`, each binary input its size with the
//! `binary_data_size` parameter; outputs asked for with `binary_data` come back the same way).
//!
//! JSON tensor data is packed into the tensor's little-endian bytes while it is parsed (when the
//! input names its datatype before its data, as clients do), so a large JSON body costs its
//! packed size, not a tree of JSON values.

use std::fmt;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use veraltheim_models::{DataType, Tensor, TensorData};
use veraltheim_serving::InferCall;

use super::{RestError, shm_refusal};
use crate::shm::{SharedMemory, ShmRef, check_total, shm_ref_json};

/// The header that says how many bytes of the body are the JSON header.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// A request's JSON header.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestJson {
    #[serde(default)]
    id: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<InputJson>,
    #[serde(default)]
    outputs: Vec<OutputJson>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputJson {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

/// One input: its data is packed as it is parsed when its datatype came first.
struct InputJson {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    parameters: Map<String, Value>,
    data: Option<Packed>,
}

/// The values of a JSON `data` array (nested or flat), row-major.
enum Packed {
    /// Little-endian elements of a fixed-size datatype.
    Fixed { datatype: DataType, bytes: BytesMut },
    /// BYTES elements.
    Elements(Vec<Bytes>),
    /// Values read before the datatype was known; packed once it is.
    Loose(Vec<Leaf>),
}

enum Leaf {
    Bool(bool),
    Int(i64),
    Uint(u64),
    Float(f64),
    Str(String),
}

impl fmt::Display for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Leaf::Bool(b) => write!(f, "{b}"),
            Leaf::Int(v) => write!(f, "{v}"),
            Leaf::Uint(v) => write!(f, "{v}"),
            Leaf::Float(v) => write!(f, "{v}"),
            Leaf::Str(s) => write!(f, "{s:?}"),
        }
    }
}

impl Packed {
    fn new(datatype: Option<DataType>) -> Packed {
        match datatype {
            None => Packed::Loose(Vec::new()),
            Some(DataType::Bytes) => Packed::Elements(Vec::new()),
            Some(datatype) => Packed::Fixed {
                datatype,
                bytes: BytesMut::new(),
            },
        }
    }

    fn count(&self) -> usize {
        match self {
            Packed::Fixed { datatype, bytes } => bytes.len() / datatype.element_size().unwrap_or(1),
            Packed::Elements(e) => e.len(),
            Packed::Loose(l) => l.len(),
        }
    }

    /// Adds one value, refusing one that the datatype cannot hold exactly.
    fn push(&mut self, leaf: Leaf) -> Result<(), String> {
        let (datatype, bytes) = match self {
            Packed::Loose(l) => {
                l.push(leaf);
                return Ok(());
            }
            Packed::Elements(e) => {
                return match leaf {
                    Leaf::Str(s) => {
                        e.push(Bytes::from(s));
                        Ok(())
                    }
                    other => Err(format!("{other} is not a string (BYTES data are strings)")),
                };
            }
            Packed::Fixed { datatype, bytes } => (*datatype, bytes),
        };
        let not = |leaf: &Leaf, what: &str| format!("{leaf} is not {what}");
        match datatype {
            DataType::Bool => match leaf {
                Leaf::Bool(b) => bytes.put_u8(u8::from(b)),
                other => return Err(not(&other, "a boolean (true or false)")),
            },
            DataType::Fp32 | DataType::Fp64 => {
                let v = match leaf {
                    Leaf::Int(v) => v as f64,
                    Leaf::Uint(v) => v as f64,
                    Leaf::Float(v) => v,
                    other => return Err(not(&other, "a number")),
                };
                if datatype == DataType::Fp32 {
                    bytes.put_f32_le(v as f32);
                } else {
                    bytes.put_f64_le(v);
                }
            }
            DataType::Fp16 | DataType::Bf16 => {
                return Err(format!(
                    "{datatype} data cannot be given as JSON numbers; send it as binary data \
                     (parameters.binary_data_size)"
                ));
            }
            DataType::Bytes => unreachable!("BYTES data are elements"),
            int => {
                let v: i128 = match leaf {
                    Leaf::Int(v) => v.into(),
                    Leaf::Uint(v) => v.into(),
                    other => return Err(not(&other, "an integer")),
                };
                let (min, max) = int.integer_range().unwrap_or((0, u64::MAX.into()));
                if v < min || v > max {
                    return Err(format!("value {v} does not fit in {int}"));
                }
                let width = int.element_size().unwrap_or(8);
                bytes.put_slice(&v.to_le_bytes()[..width]);
            }
        }
        Ok(())
    }

    /// The tensor these values make with `datatype` and `shape`.
    fn into_tensor(self, name: &str, datatype: DataType, shape: &[i64]) -> Result<Tensor, String> {
        let packed = match self {
            Packed::Loose(leaves) => {
                let mut p = Packed::new(Some(datatype));
                for leaf in leaves {
                    p.push(leaf)?;
                }
                p
            }
            p => p,
        };
        let dims =
            veraltheim_models::tensor::shape_from_wire(name, shape).map_err(|e| e.to_string())?;
        let needed: usize = dims.iter().product();
        if packed.count() != needed {
            return Err(format!(
                "{} values given, but shape {shape:?} needs {needed}",
                packed.count()
            ));
        }
        let data = match packed {
            Packed::Fixed { bytes, .. } => TensorData::Fixed(bytes.freeze()),
            Packed::Elements(e) => TensorData::Bytes(e),
            Packed::Loose(_) => unreachable!("packed above"),
        };
        Tensor::new(name, datatype, dims, data).map_err(|e| e.to_string())
    }
}

/// Reads one JSON value of a `data` array into the [`Packed`] values: arrays (at any depth) are
/// walked, scalars are pushed.
impl<'de> DeserializeSeed<'de> for &mut Packed {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for &mut Packed {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("tensor data: an array of numbers, booleans or strings (nested or flat)")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(&mut *self)?.is_some() {}
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.push(Leaf::Bool(v)).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.push(Leaf::Int(v)).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.push(Leaf::Uint(v)).map_err(E::custom)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.push(Leaf::Float(v)).map_err(E::custom)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.push(Leaf::Str(v.to_string())).map_err(E::custom)
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<(), E> {
        self.push(Leaf::Str(v)).map_err(E::custom)
    }
}

/// The `data` of an input, packed for `datatype` when it is known.
struct DataSeed(Option<DataType>);

impl<'de> DeserializeSeed<'de> for DataSeed {
    type Value = Packed;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Packed, D::Error> {
        let mut packed = Packed::new(self.0);
        d.deserialize_seq(&mut packed)?;
        Ok(packed)
    }
}

impl<'de> Deserialize<'de> for InputJson {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = InputJson;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an input tensor: {\"name\", \"shape\", \"datatype\", \"data\" or parameters.binary_data_size}")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<InputJson, A::Error> {
                let mut name: Option<String> = None;
                let mut shape = None;
                let mut datatype: Option<String> = None;
                let mut parameters = None;
                let mut data = None;
                while let Some(key) = map.next_key::<String>()? {
                    let twice = || de::Error::custom(format!("input field `{key}` given twice"));
                    match key.as_str() {
                        "name" if name.is_none() => name = Some(map.next_value()?),
                        "shape" if shape.is_none() => shape = Some(map.next_value()?),
                        "datatype" if datatype.is_none() => datatype = Some(map.next_value()?),
                        "parameters" if parameters.is_none() => {
                            parameters = Some(map.next_value()?)
                        }
                        "data" if data.is_none() => {
                            let known = datatype.as_deref().and_then(|d| d.parse().ok());
                            let packed = map.next_value_seed(DataSeed(known)).map_err(|e| {
                                de::Error::custom(format!(
                                    "input '{}': {e}",
                                    name.as_deref().unwrap_or("?")
                                ))
                            })?;
                            data = Some(packed);
                        }
                        "name" | "shape" | "datatype" | "parameters" | "data" => {
                            return Err(twice());
                        }
                        other => {
                            return Err(de::Error::unknown_field(
                                other,
                                &["name", "shape", "datatype", "parameters", "data"],
                            ));
                        }
                    }
                }
                Ok(InputJson {
                    name: name.ok_or_else(|| de::Error::missing_field("name"))?,
                    shape: shape.ok_or_else(|| de::Error::missing_field("shape"))?,
                    datatype: datatype.ok_or_else(|| de::Error::missing_field("datatype"))?,
                    parameters: parameters.unwrap_or_default(),
                    data,
                })
            }
        }
        d.deserialize_map(V)
    }
}

/// A parameter that must be a non-negative integer.
fn unsigned(where_: &str, key: &str, v: &Value) -> Result<u64, RestError> {
    v.as_u64().ok_or_else(|| {
        RestError::bad_request(format!(
            "{where_}: parameter '{key}' must be a non-negative integer, not {v}"
        ))
    })
}

fn boolean(where_: &str, key: &str, v: &Value) -> Result<bool, RestError> {
    v.as_bool().ok_or_else(|| {
        RestError::bad_request(format!(
            "{where_}: parameter '{key}' must be true or false, not {v}"
        ))
    })
}

/// A parsed inference request: the call, and how its answer is to be given.
pub struct Parsed {
    pub call: InferCall,
    pub reply: Reply,
}

/// How the outputs are answered: for each output the caller named, whether it wants it as
/// binary data (outputs not named follow `binary_data_output`), and the outputs to be written
/// to shared memory (checked against the registered regions already).
pub struct Reply {
    pub binary: Vec<(String, bool)>,
    pub binary_by_default: bool,
    pub to_shm: Vec<(String, ShmRef)>,
}

/// An HTTP inference request (header and body) for `model`/`version` as an inference call.
/// Inputs whose parameters name a shared-memory region (`shared_memory_region`,
/// `shared_memory_byte_size`, optional `shared_memory_offset`) are read from it, as over gRPC:
/// together at most `max_shm_bytes`, checked before anything is read.
pub fn parse_request(
    model: String,
    version: String,
    headers: &HeaderMap,
    body: Bytes,
    received: Instant,
    shm: &SharedMemory,
    max_shm_bytes: u64,
) -> Result<Parsed, RestError> {
    let json_len = match headers.get(HEADER_LENGTH) {
        None => body.len(),
        Some(v) => {
            let n = v
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    RestError::bad_request(format!(
                        "header Inference-Header-Content-Length must be a byte count, not {v:?}"
                    ))
                })?;
            if n > body.len() {
                return Err(RestError::bad_request(format!(
                    "header Inference-Header-Content-Length says the JSON is {n} bytes, but the \
                     body has only {}",
                    body.len()
                )));
            }
            n
        }
    };
    let request: RequestJson = serde_json::from_slice(&body[..json_len])
        .map_err(|e| RestError::bad_request(format!("the inference request is not valid: {e}")))?;
    let mut binary = body.slice(json_len..);

    let mut priority = 0;
    let mut timeout = None;
    let mut binary_by_default = false;
    for (key, value) in &request.parameters {
        let at = "request";
        match key.as_str() {
            "priority" => {
                priority = u32::try_from(unsigned(at, key, value)?).map_err(|_| {
                    RestError::bad_request("request: parameter 'priority' is out of range")
                })?
            }
            "timeout" => {
                let us = unsigned(at, key, value)?;
                if us > 0 {
                    timeout = Some(Duration::from_micros(us));
                }
            }
            "binary_data_output" => binary_by_default = boolean(at, key, value)?,
            "sequence_id" => {
                let set = match value {
                    Value::Number(n) => n.as_u64() != Some(0) && n.as_i64() != Some(0),
                    Value::String(s) => !s.is_empty(),
                    _ => false,
                };
                if set {
                    return Err(RestError::bad_request(format!(
                        "model '{model}' does not use sequence batching; the request must not \
                         set sequence_id"
                    )));
                }
            }
            _ => {}
        }
    }

    let places = request
        .inputs
        .iter()
        .map(|i| shm_ref_json("input", &i.name, &i.parameters))
        .collect::<Result<Vec<_>, _>>()
        .map_err(shm_refusal)?;
    check_total(places.iter().flatten(), max_shm_bytes).map_err(shm_refusal)?;
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for (input, place) in request.inputs.into_iter().zip(places) {
        let name = input.name;
        let at = format!("input '{name}'");
        let datatype: DataType = input.datatype.parse().map_err(|_| {
            RestError::bad_request(format!(
                "{at}: unknown datatype '{}' (expected one of BOOL, UINT8..UINT64, INT8..INT64, \
                 FP16, FP32, FP64, BF16, BYTES)",
                input.datatype
            ))
        })?;
        let binary_size = input
            .parameters
            .get("binary_data_size")
            .map(|v| unsigned(&at, "binary_data_size", v))
            .transpose()?;
        if let Some(place) = place {
            if input.data.is_some() || binary_size.is_some() {
                return Err(RestError::bad_request(format!(
                    "{at}: data is given both in shared memory (shared_memory_region) and in the \
                     request (\"data\" or binary_data_size); use one"
                )));
            }
            let bytes = shm.read(&at, &place).map_err(shm_refusal)?;
            inputs.push(
                Tensor::from_raw(&name, datatype, &input.shape, bytes)
                    .map_err(|e| RestError::bad_request(e.to_string()))?,
            );
            continue;
        }
        let tensor = match (binary_size, input.data) {
            (Some(_), Some(_)) => {
                return Err(RestError::bad_request(format!(
                    "{at}: data is given both as JSON and as binary data (binary_data_size); use one"
                )));
            }
            (Some(size), None) => {
                let size = usize::try_from(size)
                    .ok()
                    .filter(|s| *s <= binary.len())
                    .ok_or_else(|| {
                        RestError::bad_request(format!(
                            "{at}: binary_data_size is {size}, but only {} bytes of binary data \
                             remain in the body",
                            binary.len()
                        ))
                    })?;
                let bytes = binary.split_to(size);
                Tensor::from_raw(&name, datatype, &input.shape, bytes)
                    .map_err(|e| RestError::bad_request(e.to_string()))?
            }
            (None, Some(packed)) => packed
                .into_tensor(&name, datatype, &input.shape)
                .map_err(|e| RestError::bad_request(format!("{at}: {e}")))?,
            (None, None) => Packed::new(Some(datatype))
                .into_tensor(&name, datatype, &input.shape)
                .map_err(|_| {
                    RestError::bad_request(format!(
                        "{at}: no data given (neither \"data\" nor parameters.binary_data_size)"
                    ))
                })?,
        };
        inputs.push(tensor);
    }
    if !binary.is_empty() {
        return Err(RestError::bad_request(format!(
            "the body has {} bytes of binary data that no input's binary_data_size accounts for",
            binary.len()
        )));
    }

    let mut outputs = Vec::with_capacity(request.outputs.len());
    let mut binary_choice = Vec::with_capacity(request.outputs.len());
    let mut to_shm = Vec::new();
    for o in request.outputs {
        let at = format!("output '{}'", o.name);
        let mut wants_binary = binary_by_default;
        for (key, value) in &o.parameters {
            match key.as_str() {
                "binary_data" => wants_binary = boolean(&at, key, value)?,
                "classification" => {
                    return Err(RestError::bad_request(format!(
                        "{at}: parameter 'classification' is not supported; ask for the output \
                         itself and rank it on the client"
                    )));
                }
                _ => {}
            }
        }
        if let Some(place) = shm_ref_json("output", &o.name, &o.parameters).map_err(shm_refusal)? {
            shm.check(&at, &place).map_err(shm_refusal)?;
            to_shm.push((o.name.clone(), place));
        }
        binary_choice.push((o.name.clone(), wants_binary));
        outputs.push(o.name);
    }

    Ok(Parsed {
        call: InferCall {
            model,
            version,
            id: request.id,
            inputs,
            outputs,
            priority,
            timeout,
            deadline: None,
            received,
            trace: super::traceparent(headers),
            background: false,
        },
        reply: Reply {
            binary: binary_choice,
            binary_by_default,
            to_shm,
        },
    })
}

/// A tensor's values as a JSON array (flat, row-major), as Triton writes them. FP16 and BF16
/// are written as the numbers they hold; NaN and infinities have no JSON form and are written as
/// `null` (ask for binary data to get them).
struct JsonData<'a>(&'a Tensor);

impl Serialize for JsonData<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let t = self.0;
        let mut seq = s.serialize_seq(Some(t.element_count()))?;
        match t.data() {
            TensorData::Bytes(elements) => {
                for e in elements {
                    let text = std::str::from_utf8(e).map_err(|_| {
                        serde::ser::Error::custom(format!(
                            "output '{}' holds bytes that are not UTF-8, which JSON cannot carry; \
                             ask for it as binary data (parameters.binary_data = true)",
                            t.name()
                        ))
                    })?;
                    seq.serialize_element(text)?;
                }
            }
            TensorData::Fixed(raw) => {
                let datatype = t.datatype();
                let width = datatype.element_size().unwrap_or(1);
                for c in raw.chunks_exact(width) {
                    let mut b = [0u8; 8];
                    b[..width].copy_from_slice(c);
                    let u = u64::from_le_bytes(b);
                    // Sign-extends an integer `width` bytes wide.
                    let signed = |bits: u32| ((u << (64 - bits)) as i64) >> (64 - bits);
                    match datatype {
                        DataType::Bool => seq.serialize_element(&(u != 0))?,
                        DataType::Uint8
                        | DataType::Uint16
                        | DataType::Uint32
                        | DataType::Uint64 => seq.serialize_element(&u)?,
                        DataType::Int8 => seq.serialize_element(&signed(8))?,
                        DataType::Int16 => seq.serialize_element(&signed(16))?,
                        DataType::Int32 => seq.serialize_element(&signed(32))?,
                        DataType::Int64 => seq.serialize_element(&(u as i64))?,
                        DataType::Fp32 => seq.serialize_element(&f32::from_bits(u as u32))?,
                        DataType::Fp64 => seq.serialize_element(&f64::from_bits(u))?,
                        DataType::Fp16 => seq.serialize_element(&f16_to_f32(u as u16))?,
                        DataType::Bf16 => {
                            seq.serialize_element(&f32::from_bits((u as u32) << 16))?
                        }
                        DataType::Bytes => unreachable!("BYTES tensors hold elements"),
                    }
                }
            }
        }
        seq.end()
    }
}

/// An IEEE 754 half-precision value as f32 (exact: every f16 is an f32).
fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let frac = u32::from(h & 0x3ff);
    let bits = match (exp, frac) {
        (0, 0) => sign,
        // Subnormal: frac × 2^-24, exact in f32.
        (0, f) => {
            let v = f as f32 * 2f32.powi(-24);
            return if sign == 0 { v } else { -v };
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | ((e + 127 - 15) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

#[derive(Serialize)]
struct OutputHeader<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [usize],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<OutputParameters<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<JsonData<'a>>,
}

/// Where an output's data is when it is not in the JSON: after it (binary data), or in the
/// shared-memory place the request gave.
#[derive(Serialize)]
#[serde(untagged)]
enum OutputParameters<'a> {
    Binary {
        binary_data_size: usize,
    },
    SharedMemory {
        shared_memory_region: &'a str,
        shared_memory_byte_size: usize,
        #[serde(skip_serializing_if = "is_zero")]
        shared_memory_offset: u64,
    },
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

#[derive(Serialize)]
struct ResponseHeader<'a> {
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    id: &'a str,
    outputs: Vec<OutputHeader<'a>>,
}

/// The HTTP answer to an inference: JSON, or JSON followed by the binary outputs (with
/// `Inference-Header-Content-Length`). Outputs the request asked for in shared memory are
/// written there and answered with where they are (region, size, offset) and no data, as
/// Triton answers them.
pub fn response(
    model: &str,
    version: &str,
    id: &str,
    outputs: &[Tensor],
    reply: &Reply,
    shm: &SharedMemory,
) -> Result<Response, RestError> {
    let mut raw: Vec<Bytes> = Vec::new();
    let mut headers = Vec::with_capacity(outputs.len());
    for t in outputs {
        let binary = reply
            .binary
            .iter()
            .find(|(n, _)| n == t.name())
            .map_or(reply.binary_by_default, |(_, b)| *b);
        let in_shm = reply.to_shm.iter().find(|(n, _)| n == t.name());
        let (parameters, data) = if let Some((_, place)) = in_shm {
            let bytes = t.to_raw();
            shm.write(&format!("output '{}'", t.name()), place, &bytes)
                .map_err(shm_refusal)?;
            (
                Some(OutputParameters::SharedMemory {
                    shared_memory_region: &place.region,
                    shared_memory_byte_size: bytes.len(),
                    shared_memory_offset: place.offset,
                }),
                None,
            )
        } else if binary {
            let bytes = t.to_raw();
            let size = bytes.len();
            raw.push(bytes);
            (
                Some(OutputParameters::Binary {
                    binary_data_size: size,
                }),
                None,
            )
        } else {
            (None, Some(JsonData(t)))
        };
        headers.push(OutputHeader {
            name: t.name(),
            datatype: t.datatype().as_str(),
            shape: t.shape(),
            parameters,
            data,
        });
    }
    let header = ResponseHeader {
        model_name: model,
        model_version: version,
        id,
        outputs: headers,
    };
    let json = serde_json::to_vec(&header).map_err(|e| RestError::bad_request(e.to_string()))?;
    if raw.is_empty() {
        return Ok((
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            json,
        )
            .into_response());
    }
    let json_len = json.len();
    let mut body = BytesMut::with_capacity(json_len + raw.iter().map(Bytes::len).sum::<usize>());
    body.extend_from_slice(&json);
    for r in &raw {
        body.extend_from_slice(r);
    }
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (
                header::HeaderName::from_static(HEADER_LENGTH),
                HeaderValue::from(json_len),
            ),
        ],
        body.freeze(),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str, binary: &[u8]) -> Result<Parsed, RestError> {
        let mut headers = HeaderMap::new();
        let mut body = json.as_bytes().to_vec();
        if !binary.is_empty() {
            headers.insert(HEADER_LENGTH, HeaderValue::from(json.len()));
            body.extend_from_slice(binary);
        }
        parse_request(
            "m".into(),
            String::new(),
            &headers,
            Bytes::from(body),
            Instant::now(),
            &SharedMemory::new(false),
            1 << 20,
        )
    }

    fn err(json: &str, binary: &[u8]) -> String {
        let e = parse(json, binary).err().expect("refused");
        assert_eq!(
            e.status,
            axum::http::StatusCode::BAD_REQUEST,
            "{}",
            e.message
        );
        e.message
    }

    #[test]
    fn json_data_nested_or_flat_packs_into_the_datatype() {
        let p = parse(
            r#"{"inputs":[{"name":"a","shape":[2,2],"datatype":"INT16","data":[[1,-2],[3,4]]},
                          {"name":"b","shape":[3],"datatype":"FP32","data":[1.5,2,-3]},
                          {"name":"c","shape":[2],"datatype":"BYTES","data":["x","héllo"]},
                          {"name":"d","shape":[2],"datatype":"BOOL","data":[true,false]}]}"#,
            &[],
        )
        .unwrap();
        let [a, b, c, d] = &p.call.inputs[..] else {
            panic!()
        };
        assert_eq!(a.to_raw().as_ref(), &[1, 0, 0xfe, 0xff, 3, 0, 4, 0]);
        assert_eq!(a.shape(), &[2, 2]);
        assert_eq!(b.f32_values().unwrap(), vec![1.5, 2.0, -3.0]);
        assert_eq!(
            c.data(),
            &TensorData::Bytes(vec![Bytes::from("x"), Bytes::from("héllo")])
        );
        assert_eq!(d.to_raw().as_ref(), &[1, 0]);
    }

    #[test]
    fn data_before_its_datatype_is_packed_afterwards() {
        let p = parse(
            r#"{"inputs":[{"data":[7,8],"name":"a","shape":[2],"datatype":"UINT8"}]}"#,
            &[],
        )
        .unwrap();
        assert_eq!(p.call.inputs[0].to_raw().as_ref(), &[7, 8]);
        let m = err(
            r#"{"inputs":[{"data":[300],"name":"a","shape":[1],"datatype":"UINT8"}]}"#,
            &[],
        );
        assert!(m.contains("input 'a'") && m.contains("300"), "{m}");
    }

    #[test]
    fn binary_inputs_follow_the_json_in_order() {
        let json = r#"{"id":"r1","inputs":[
            {"name":"a","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}},
            {"name":"b","shape":[1],"datatype":"INT64","data":[5]},
            {"name":"c","shape":[2],"datatype":"BYTES","parameters":{"binary_data_size":10}}],
            "outputs":[{"name":"x","parameters":{"binary_data":true}},{"name":"y"}],
            "parameters":{"priority":2,"timeout":1000}}"#;
        let mut bin = Vec::new();
        bin.extend(1.0f32.to_le_bytes());
        bin.extend(2.0f32.to_le_bytes());
        bin.extend(1u32.to_le_bytes());
        bin.extend(b"p");
        bin.extend(1u32.to_le_bytes());
        bin.extend(b"q");
        let p = parse(json, &bin).unwrap();
        assert_eq!(p.call.id, "r1");
        assert_eq!(p.call.priority, 2);
        assert_eq!(p.call.timeout, Some(Duration::from_micros(1000)));
        assert_eq!(p.call.inputs[0].f32_values().unwrap(), vec![1.0, 2.0]);
        assert_eq!(p.call.inputs[1].to_raw().as_ref(), &5i64.to_le_bytes());
        assert_eq!(
            p.call.inputs[2].data(),
            &TensorData::Bytes(vec![Bytes::from("p"), Bytes::from("q")])
        );
        assert_eq!(p.call.outputs, vec!["x", "y"]);
        assert_eq!(
            p.reply.binary,
            vec![("x".into(), true), ("y".into(), false)]
        );
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let cases: &[(&str, &[u8], &str)] = &[
            ("{", b"", "not valid"),
            (r#"{"inputs":[],"bogus":1}"#, b"", "unknown field `bogus`"),
            (
                r#"{"inputs":[{"name":"a","shape":[3],"datatype":"FP32","data":[1,2]}]}"#,
                b"",
                "input 'a': 2 values given, but shape [3] needs 3",
            ),
            (
                r#"{"inputs":[{"name":"a","shape":[1],"datatype":"FLOAT","data":[1]}]}"#,
                b"",
                "unknown datatype 'FLOAT'",
            ),
            (
                r#"{"inputs":[{"name":"a","shape":[1],"datatype":"INT32","data":[1.5]}]}"#,
                b"",
                "1.5 is not an integer",
            ),
            (
                r#"{"inputs":[{"name":"a","shape":[1],"datatype":"FP32","data":["x"]}]}"#,
                b"",
                "is not a number",
            ),
            (
                r#"{"inputs":[{"name":"a","shape":[1],"datatype":"FP16","data":[1]}]}"#,
                b"",
                "binary data",
            ),
            (
                r#"{"inputs":[{"name":"a","shape":[1],"datatype":"FP32"}]}"#,
                b"",
                "no data given",
            ),
            (
                r#"{"inputs":[{"name":"a","shape":[-1],"datatype":"FP32","data":[]}]}"#,
                b"",
                "input 'a'",
            ),
            (
                r#"{"inputs":[{"name":"a","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":9}}]}"#,
                &[0; 8],
                "only 8 bytes",
            ),
            (
                r#"{"inputs":[{"name":"a","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":4}}]}"#,
                &[0; 6],
                "2 bytes of binary data",
            ),
            (
                r#"{"inputs":[{"name":"a","shape":[1],"datatype":"FP32","data":[1],"parameters":{"shared_memory_region":"r"}}]}"#,
                b"",
                "shared_memory_region and shared_memory_byte_size must be given together",
            ),
            (
                r#"{"inputs":[{"name":"a","shape":[1],"datatype":"FP32","parameters":{"shared_memory_region":"r","shared_memory_byte_size":-4}}]}"#,
                b"",
                "input 'a': parameter 'shared_memory_byte_size' must be a non-negative integer",
            ),
            (
                r#"{"inputs":[{"name":"a","shape":[1],"datatype":"FP32","parameters":{"shared_memory_region":7,"shared_memory_byte_size":4}}]}"#,
                b"",
                "shared_memory_region must be a region name",
            ),
            (
                r#"{"inputs":[{"name":"a","shape":[1],"datatype":"FP32","parameters":{"shared_memory_region":"r","shared_memory_byte_size":1048576}},{"name":"b","shape":[1],"datatype":"FP32","parameters":{"shared_memory_region":"r","shared_memory_byte_size":1}}]}"#,
                b"",
                "more than limits.max_request_bytes (1048576)",
            ),
            (
                r#"{"inputs":[],"outputs":[{"name":"o","parameters":{"classification":3}}]}"#,
                b"",
                "classification",
            ),
            (
                r#"{"inputs":[],"parameters":{"sequence_id":7}}"#,
                b"",
                "sequence_id",
            ),
            (
                r#"{"inputs":[],"parameters":{"priority":-1}}"#,
                b"",
                "non-negative integer",
            ),
        ];
        for (json, bin, want) in cases {
            let m = err(json, bin);
            assert!(m.contains(want), "{json}: {m:?} should contain {want:?}");
        }
        // A header length past the end of the body.
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_LENGTH, HeaderValue::from(100));
        let e = parse_request(
            "m".into(),
            String::new(),
            &headers,
            Bytes::from_static(b"{}"),
            Instant::now(),
            &SharedMemory::new(false),
            1 << 20,
        )
        .err()
        .unwrap();
        assert!(e.message.contains("only 2"), "{}", e.message);
    }

    #[test]
    fn json_output_of_every_datatype_reads_back_its_values() {
        let t =
            |d: DataType, raw: Vec<u8>| Tensor::from_raw("o", d, &[2], Bytes::from(raw)).unwrap();
        let json = |t: &Tensor| serde_json::to_string(&JsonData(t)).unwrap();
        assert_eq!(json(&t(DataType::Int8, vec![0xff, 7])), "[-1,7]");
        assert_eq!(
            json(&t(
                DataType::Int32,
                [(-5i32).to_le_bytes(), 9i32.to_le_bytes()].concat()
            )),
            "[-5,9]"
        );
        assert_eq!(
            json(&t(
                DataType::Uint64,
                [u64::MAX.to_le_bytes(), 1u64.to_le_bytes()].concat()
            )),
            format!("[{},1]", u64::MAX)
        );
        assert_eq!(json(&t(DataType::Bool, vec![1, 0])), "[true,false]");
        assert_eq!(
            json(&t(
                DataType::Fp32,
                [0.1f32.to_le_bytes(), f32::NAN.to_le_bytes()].concat()
            )),
            "[0.1,null]"
        );
        // FP16 1.5 = 0x3e00, -2^-24 (the smallest subnormal) = 0x8001; BF16 -2.5 = 0xc020.
        let halves: Vec<f32> = serde_json::from_str(&json(&t(
            DataType::Fp16,
            [0x3e00u16.to_le_bytes(), 0x8001u16.to_le_bytes()].concat(),
        )))
        .unwrap();
        assert_eq!(halves, vec![1.5, -(2f32.powi(-24))]);
        assert_eq!(
            json(&t(
                DataType::Bf16,
                [0xc020u16.to_le_bytes(), 0u16.to_le_bytes()].concat()
            )),
            "[-2.5,0.0]"
        );
        let not_utf8 = Tensor::from_elements("o", &[1], vec![Bytes::from_static(&[0xff])]).unwrap();
        let e = serde_json::to_string(&JsonData(&not_utf8)).unwrap_err();
        assert!(e.to_string().contains("binary_data"), "{e}");
    }

    #[test]
    fn f16_covers_zero_normal_subnormal_infinity_and_nan() {
        assert_eq!(f16_to_f32(0x0000), 0.0);
        assert!(f16_to_f32(0x8000).is_sign_negative());
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x03ff), 1023.0 * 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
        assert_eq!(f16_to_f32(0xfc00), f32::NEG_INFINITY);
        assert!(f16_to_f32(0x7e00).is_nan());
    }

    #[tokio::test]
    async fn binary_outputs_follow_the_json_header() {
        let a = Tensor::from_f32("a", vec![2], &[1.0, 2.0]).unwrap();
        let b = Tensor::from_elements("b", &[1], vec![Bytes::from_static(b"hi")]).unwrap();
        let reply = Reply {
            binary: vec![("b".into(), false)],
            binary_by_default: true,
            to_shm: vec![],
        };
        let r = response("m", "1", "", &[a, b], &reply, &SharedMemory::new(false)).unwrap();
        let len: usize = r.headers()[HEADER_LENGTH]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        let header: Value = serde_json::from_slice(&body[..len]).unwrap();
        assert_eq!(header["outputs"][0]["parameters"]["binary_data_size"], 8);
        assert_eq!(header["outputs"][1]["data"], serde_json::json!(["hi"]));
        assert!(header.get("id").is_none());
        assert_eq!(
            &body[len..],
            [1.0f32.to_le_bytes(), 2.0f32.to_le_bytes()].concat()
        );
    }

    /// A shared-memory object of `len` bytes in /dev/shm, registered as region `r` of a server
    /// that allows client shared memory; removed on drop.
    struct Region {
        path: std::path::PathBuf,
        shm: SharedMemory,
    }

    impl Region {
        fn new(tag: &str, len: u64) -> Self {
            let name = format!("veraltheim-rest-test-{tag}-{}", std::process::id());
            let path = std::path::PathBuf::from("/dev/shm").join(&name);
            std::fs::File::create(&path).unwrap().set_len(len).unwrap();
            let shm = SharedMemory::new(true);
            shm.register("r", &format!("/{name}"), 0, len).unwrap();
            Region { path, shm }
        }
    }

    impl Drop for Region {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn parse_with(shm: &SharedMemory, json: &str) -> Result<Parsed, RestError> {
        parse_request(
            "m".into(),
            String::new(),
            &HeaderMap::new(),
            Bytes::from(json.to_string()),
            Instant::now(),
            shm,
            1 << 20,
        )
    }

    #[tokio::test]
    async fn shared_memory_inputs_are_read_and_outputs_written_where_the_request_says() {
        let region = Region::new("rt", 64);
        let values = [1.5f32, -2.0, 3.25];
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::os::unix::fs::FileExt::write_all_at(
            &std::fs::File::options()
                .write(true)
                .open(&region.path)
                .unwrap(),
            &raw,
            8,
        )
        .unwrap();
        let p = parse_with(
            &region.shm,
            r#"{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","parameters":
                {"shared_memory_region":"r","shared_memory_byte_size":12,"shared_memory_offset":8}}],
               "outputs":[{"name":"y","parameters":{"binary_data":false,
                "shared_memory_region":"r","shared_memory_byte_size":16,"shared_memory_offset":32}},
                {"name":"z"}]}"#,
        )
        .unwrap();
        assert_eq!(p.call.inputs[0].f32_values().unwrap(), values.to_vec());
        assert_eq!(p.call.inputs[0].shape(), &[1, 3]);
        assert_eq!(p.reply.to_shm.len(), 1);

        let y = Tensor::from_f32("y", vec![1, 3], &values).unwrap();
        let z = Tensor::from_f32("z", vec![1], &[9.0]).unwrap();
        let r = response("m", "1", "", &[y, z], &p.reply, &region.shm).unwrap();
        assert!(r.headers().get(HEADER_LENGTH).is_none());
        let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        let header: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            header["outputs"][0]["parameters"],
            serde_json::json!({"shared_memory_region": "r", "shared_memory_byte_size": 12,
                               "shared_memory_offset": 32})
        );
        assert!(header["outputs"][0].get("data").is_none());
        assert_eq!(header["outputs"][1]["data"], serde_json::json!([9.0]));
        let file = std::fs::read(&region.path).unwrap();
        assert_eq!(&file[32..44], &raw[..]);
    }

    #[test]
    fn shared_memory_references_are_refused_with_tritons_statuses() {
        use axum::http::StatusCode;
        let region = Region::new("bad", 16);
        let input = |params: &str| {
            format!(
                r#"{{"inputs":[{{"name":"x","shape":[4],"datatype":"FP32","parameters":{params}}}]}}"#
            )
        };
        let refused = |shm: &SharedMemory, json: &str| parse_with(shm, json).err().unwrap();
        // Not registered: 404, naming the region.
        let e = refused(
            &region.shm,
            &input(r#"{"shared_memory_region":"nowhere","shared_memory_byte_size":16}"#),
        );
        assert_eq!(e.status, StatusCode::NOT_FOUND, "{}", e.message);
        assert!(e.message.contains("'nowhere'"), "{}", e.message);
        // Past the region's end: 400, naming the input.
        let e = refused(
            &region.shm,
            &input(
                r#"{"shared_memory_region":"r","shared_memory_byte_size":16,"shared_memory_offset":4}"#,
            ),
        );
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(
            e.message.contains("input 'x'") && e.message.contains("past the end"),
            "{}",
            e.message
        );
        // Data in the request as well as in shared memory: 400.
        let e = refused(
            &region.shm,
            r#"{"inputs":[{"name":"x","shape":[4],"datatype":"FP32","data":[1,2,3,4],
                "parameters":{"shared_memory_region":"r","shared_memory_byte_size":16}}]}"#,
        );
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("use one"), "{}", e.message);
        // An output place past the region's end: 400, before anything runs; an output region
        // not registered: 404.
        let out = |params: &str| {
            format!(
                r#"{{"inputs":[{{"name":"x","shape":[1],"datatype":"FP32","data":[1]}}],
                    "outputs":[{{"name":"y","parameters":{params}}}]}}"#
            )
        };
        let e = refused(
            &region.shm,
            &out(r#"{"shared_memory_region":"r","shared_memory_byte_size":32}"#),
        );
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("output 'y'"), "{}", e.message);
        let e = refused(
            &region.shm,
            &out(r#"{"shared_memory_region":"gone","shared_memory_byte_size":4}"#),
        );
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        // A server without client shared memory: 403, saying how to enable it.
        let e = refused(
            &SharedMemory::new(false),
            &input(r#"{"shared_memory_region":"r","shared_memory_byte_size":16}"#),
        );
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        assert!(e.message.contains("--allow-client-shm"), "{}", e.message);
        assert_eq!(e.code, Some(tonic::Code::PermissionDenied));
    }
}
