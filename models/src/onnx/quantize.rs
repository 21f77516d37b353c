//! Dynamic int8 quantisation of an ONNX graph (`models import --quantize int8`) and its measured
//! accuracy against the FP32 graph it came from.
//!
//! # The rewrite ([`quantize_int8`])
//!
//! Every `MatMul` of the default domain whose second input is a constant FP32 matrix `W [K, N]`
//! (an initializer that is not also a graph input, its data in the file) becomes, at the same
//! place in the node list:
//!
//! ```text
//! DynamicQuantizeLinear(A)                 -> A_q (uint8), a_scale, a_zero  (once per distinct A)
//! MatMulInteger(A_q, W_q, a_zero, w_zero)  -> Y (int32)
//! Cast(Y, to = FLOAT)                      -> Y_f
//! Mul(a_scale, w_scale)                    -> s (FP32 [N])
//! Mul(Y_f, s)                              -> the MatMul's own output
//! ```
//!
//! - Weights are int8, symmetric, one scale per output column ([`quantize_columns`]):
//!   `w_scale[n] = max_k |W[k, n]| / 127` (1 for a column of zeros), `W_q = round(W / w_scale)`,
//!   `w_zero = 0`. Each weight is off by at most half its column's step.
//! - Activations are quantised at run time, per tensor (uint8 with a zero point), by the graph.
//! - Only standard operators are written (default-domain opset 11 or newer is required). ONNX
//!   Runtime fuses the pattern into its own `DynamicQuantizeMatMul` / `MatMulIntegerToFloat`
//!   kernels when it optimises the graph (extended level and above).
//! - The other 12 `MatMul`s of a BERT layer stack (attention's products of two activations) and
//!   anything that is not a `MatMul` stay FP32.
//! - A replaced FP32 initializer is dropped unless a node that stays still reads it, or the graph
//!   has subgraphs (`If`, `Loop`, `Scan` bodies may read outer names: then every one is kept).
//! - The model gains the metadata entry [`METADATA_KEY`] = [`METADATA_VALUE`]; a graph that has
//!   it already is refused (quantising twice would compound the error silently).
//!
//! The rewrite works on the protobuf wire format: it decodes the nodes, the graph's inputs, the
//! opset list and the initializers it replaces, and copies every other field byte for byte, so
//! what this code does not know (newer ONNX fields, doc strings, value infos, functions) survives.
//! Written by hand because no maintained Rust crate rewrites ONNX models (the ONNX readers on
//! crates.io decode into their own structs and drop the fields they do not know); the few ONNX
//! field numbers used here are the schema's (onnx/onnx.proto, IR version 10).
//!
//! # Accuracy ([`measure`])
//!
//! Both graphs embed the same fixed sentences ([`ACCURACY_SENTENCES`] plus three long
//! passages made from them, from a few tokens to past 200) through the sentence-embedding
//! pipeline as served, in batches of 16, and the cosine similarity of each pair of embeddings is
//! taken; the import records the minimum and the mean in the model's configuration. The
//! activations' scale is one per tensor, so per batch: a sentence's int8 embedding depends a
//! little on the other rows of its batch (on all-MiniLM-L6-v2 the shortest texts, of 3–5 tokens,
//! come out worst: cosine 0.95–0.96 to FP32, against a mean of 0.99).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use bytes::Bytes;
use prost::Message;

use super::{OnnxOptions, PARAM_MODEL_FILENAME, PARAM_SWEEP, load};
use crate::config::{ModelConfig, Parameter};
use crate::error::Error;
use crate::tensor::Tensor;

/// Metadata key a quantised graph carries (`ModelProto.metadata_props`).
pub const METADATA_KEY: &str = "veraltheim.quantization";
/// Its value for this rewrite.
pub const METADATA_VALUE: &str = "int8 dynamic, weights per column";

/// Model parameter written by the import: the quantisation applied (`int8`).
pub const PARAM_QUANTIZATION: &str = "quantization";
/// Model parameter written by the import: lowest cosine similarity to the FP32 graph.
pub const PARAM_COSINE_MIN: &str = "quantization_cosine_min";
/// Model parameter written by the import: mean cosine similarity to the FP32 graph.
pub const PARAM_COSINE_MEAN: &str = "quantization_cosine_mean";
/// Model parameter written by the import: how many sentences the cosines were measured on.
pub const PARAM_SENTENCES: &str = "quantization_sentences";
/// Model parameter written by the import: `MatMul`s quantised, of all in the graph.
pub const PARAM_MATMULS: &str = "quantization_matmuls";

// ONNX's `TensorProto.DataType` values used here.
pub(super) const FLOAT: i32 = 1;
const INT8: i32 = 3;
// `AttributeProto.AttributeType`: INT, and the two that carry subgraphs.
const ATTR_INT: i32 = 2;
const ATTR_GRAPH: i32 = 5;
const ATTR_GRAPHS: i32 = 10;
/// `DynamicQuantizeLinear` came with opset 11 (`MatMulInteger` with 10).
const MIN_OPSET: i64 = 11;

// Field numbers of the messages this rewrite walks through.
const MODEL_GRAPH: u32 = 7;
const MODEL_OPSET_IMPORT: u32 = 8;
const MODEL_METADATA: u32 = 14;
const GRAPH_NODE: u32 = 1;
const GRAPH_INITIALIZER: u32 = 5;
const GRAPH_INPUT: u32 = 11;

#[derive(Clone, PartialEq, Message)]
pub(super) struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    output: Vec<String>,
    #[prost(string, tag = "3")]
    name: String,
    #[prost(string, tag = "4")]
    op_type: String,
    #[prost(message, repeated, tag = "5")]
    attribute: Vec<AttributeProto>,
    #[prost(string, tag = "7")]
    domain: String,
}

#[derive(Clone, PartialEq, Message)]
struct AttributeProto {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(int64, tag = "3")]
    i: i64,
    #[prost(int32, tag = "20")]
    r#type: i32,
}

#[derive(Clone, PartialEq, Message)]
struct TensorProto {
    #[prost(int64, repeated, packed = "false", tag = "1")]
    dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    data_type: i32,
    #[prost(float, repeated, tag = "4")]
    float_data: Vec<f32>,
    #[prost(string, tag = "8")]
    name: String,
    #[prost(bytes = "vec", tag = "9")]
    raw_data: Vec<u8>,
    #[prost(message, repeated, tag = "13")]
    external_data: Vec<StringStringEntryProto>,
    #[prost(int32, tag = "14")]
    data_location: i32,
}

/// A `TensorProto` read for its name only: decoding it skips the data without copying it.
#[derive(Clone, PartialEq, Message)]
struct TensorName {
    #[prost(string, tag = "8")]
    name: String,
}

#[derive(Clone, PartialEq, Message)]
struct ValueInfoProto {
    #[prost(string, tag = "1")]
    name: String,
}

#[derive(Clone, PartialEq, Message)]
struct OperatorSetIdProto {
    #[prost(string, tag = "1")]
    domain: String,
    #[prost(int64, tag = "2")]
    version: i64,
}

#[derive(Clone, PartialEq, Message)]
struct StringStringEntryProto {
    #[prost(string, tag = "1")]
    key: String,
    #[prost(string, tag = "2")]
    value: String,
}

/// What [`quantize_int8`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quantized {
    /// The rewritten model file.
    pub bytes: Vec<u8>,
    /// `MatMul`s replaced.
    pub matmuls: usize,
    /// `MatMul`s in the graph, replaced or not.
    pub matmuls_total: usize,
    /// Distinct weight matrices quantised.
    pub weights: usize,
}

/// One field of a protobuf message as it lies in the buffer.
struct Field<'a> {
    number: u32,
    /// The whole field, key included: copied as is when the rewrite leaves it alone.
    raw: &'a [u8],
    /// A length-delimited field's payload (empty for the other wire types).
    body: &'a [u8],
}

// Varints by hand: prost's own helpers live in a hidden module that is not its public API.
fn read_varint(buf: &mut &[u8]) -> Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = buf.split_first().ok_or("a varint runs past the end")?;
        *buf = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("a varint is longer than 10 bytes".into())
}

fn write_varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
    if buf.len() < n {
        return Err(format!(
            "a field of {n} bytes runs past the end ({} left)",
            buf.len()
        ));
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

/// Splits a message into its fields, in file order.
fn fields(mut buf: &[u8]) -> Result<Vec<Field<'_>>, String> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let start = buf;
        let key = read_varint(&mut buf)?;
        let number = u32::try_from(key >> 3).map_err(|_| "a field number is too large")?;
        let body = match key & 7 {
            0 => {
                read_varint(&mut buf)?;
                &[][..]
            }
            1 => {
                take(&mut buf, 8)?;
                &[][..]
            }
            2 => {
                let n = read_varint(&mut buf)?;
                take(
                    &mut buf,
                    usize::try_from(n).map_err(|_| "a length is too large")?,
                )?
            }
            5 => {
                take(&mut buf, 4)?;
                &[][..]
            }
            w => {
                return Err(format!(
                    "field {number} has wire type {w} (groups are not ONNX)"
                ));
            }
        };
        let used = start.len() - buf.len();
        out.push(Field {
            number,
            raw: &start[..used],
            body,
        });
    }
    Ok(out)
}

/// Appends field `number` holding `payload` (length-delimited).
fn put_message(number: u32, payload: &[u8], out: &mut Vec<u8>) {
    write_varint((u64::from(number) << 3) | 2, out);
    write_varint(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

/// Int8 per column, symmetric: `w` is row-major `[k, n]`; returns `(q, scale)` with `q` row-major
/// `[k, n]` in -127..=127 and one scale per column (1 for a column of zeros), so that
/// `|q[i, j] · scale[j] − w[i, j]| ≤ scale[j] / 2`. `Err` names a non-finite weight.
pub fn quantize_columns(w: &[f32], k: usize, n: usize) -> Result<(Vec<i8>, Vec<f32>), Error> {
    if w.len() != k * n {
        return Err(Error::Quantize(format!(
            "{} values for a [{k}, {n}] matrix",
            w.len()
        )));
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(Error::Quantize(format!(
            "value {} at [{}, {}]",
            w[i],
            i / n,
            i % n
        )));
    }
    let mut scale = vec![0f32; n];
    for row in w.chunks_exact(n.max(1)) {
        for (s, v) in scale.iter_mut().zip(row) {
            *s = s.max(v.abs());
        }
    }
    for s in &mut scale {
        *s = if *s > 0.0 { *s / 127.0 } else { 1.0 };
    }
    let q = w
        .chunks_exact(n.max(1))
        .flat_map(|row| {
            row.iter()
                .zip(&scale)
                .map(|(v, s)| (v / s).round().clamp(-127.0, 127.0) as i8)
        })
        .collect();
    Ok((q, scale))
}

/// A weight matrix the rewrite replaces: its FP32 values, shape and the names of what replaces it.
struct Weight {
    k: usize,
    n: usize,
    values: Vec<f32>,
    names: Option<[String; 3]>,
}

/// Names not yet used in the graph.
struct Names(HashSet<String>);

impl Names {
    fn fresh(&mut self, base: String) -> String {
        let mut name = base.clone();
        let mut i = 1;
        while self.0.contains(&name) {
            name = format!("{base}_{i}");
            i += 1;
        }
        self.0.insert(name.clone());
        name
    }
}

pub(super) fn tensor(name: &str, dims: &[usize], data_type: i32, raw: Vec<u8>) -> Vec<u8> {
    TensorProto {
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type,
        name: name.to_string(),
        raw_data: raw,
        ..Default::default()
    }
    .encode_to_vec()
}

pub(super) fn node(op: &str, name: String, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        name,
        op_type: op.into(),
        ..Default::default()
    }
}

/// Decodes an initializer's FP32 matrix, or says why it is not one this rewrite takes.
fn matrix_of(t: &TensorProto) -> Result<Weight, String> {
    if t.data_type != FLOAT {
        return Err(format!("element type {} is not FP32", t.data_type));
    }
    if t.data_location == 1 || !t.external_data.is_empty() {
        return Err("its data is in an external file".into());
    }
    let &[k, n] = t.dims.as_slice() else {
        return Err(format!("it has {} dimensions, not 2", t.dims.len()));
    };
    let (k, n) = (
        usize::try_from(k).map_err(|_| "a negative dimension")?,
        usize::try_from(n).map_err(|_| "a negative dimension")?,
    );
    let values: Vec<f32> = if !t.raw_data.is_empty() {
        if t.raw_data.len() != 4 * k * n {
            return Err(format!(
                "{} bytes of data for [{k}, {n}] FP32",
                t.raw_data.len()
            ));
        }
        t.raw_data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    } else {
        if t.float_data.len() != k * n {
            return Err(format!(
                "{} values of data for [{k}, {n}]",
                t.float_data.len()
            ));
        }
        t.float_data.clone()
    };
    Ok(Weight {
        k,
        n,
        values,
        names: None,
    })
}

/// Rewrites the ONNX model `model` (a `.onnx` file's bytes) as described in the module
/// documentation. `Err` says why the model cannot be quantised (not an ONNX model, an opset
/// older than 11, already quantised, no `MatMul` with a constant FP32 matrix).
pub fn quantize_int8(model: &[u8]) -> Result<Quantized, Error> {
    rewrite_model(model).map_err(Error::Quantize)
}

fn rewrite_model(model: &[u8]) -> Result<Quantized, String> {
    let top = fields(model).map_err(|e| format!("not an ONNX model: {e}"))?;
    let graphs: Vec<&Field> = top.iter().filter(|f| f.number == MODEL_GRAPH).collect();
    let [graph] = graphs.as_slice() else {
        return Err(format!(
            "not an ONNX model: {} graphs (field {MODEL_GRAPH})",
            graphs.len()
        ));
    };
    let mut opset = None;
    for f in top.iter().filter(|f| f.number == MODEL_OPSET_IMPORT) {
        let o = OperatorSetIdProto::decode(f.body).map_err(|e| format!("opset_import: {e}"))?;
        if o.domain.is_empty() || o.domain == "ai.onnx" {
            opset = Some(o.version);
        }
    }
    match opset {
        Some(v) if v >= MIN_OPSET => {}
        Some(v) => {
            return Err(format!(
                "the graph's opset is {v}; int8 quantisation needs {MIN_OPSET} or newer \
                 (DynamicQuantizeLinear)"
            ));
        }
        None => return Err("the model imports no default-domain opset".into()),
    }
    for f in top.iter().filter(|f| f.number == MODEL_METADATA) {
        let e = StringStringEntryProto::decode(f.body).map_err(|e| format!("metadata: {e}"))?;
        if e.key == METADATA_KEY {
            return Err(format!("the graph is already quantised ({})", e.value));
        }
    }

    let (new_graph, stats) = rewrite_graph(graph.body)?;
    let mut out = Vec::with_capacity(model.len() / 3);
    for f in &top {
        if f.number == MODEL_GRAPH {
            put_message(MODEL_GRAPH, &new_graph, &mut out);
        } else {
            out.extend_from_slice(f.raw);
        }
    }
    let mark = StringStringEntryProto {
        key: METADATA_KEY.into(),
        value: METADATA_VALUE.into(),
    };
    put_message(MODEL_METADATA, &mark.encode_to_vec(), &mut out);
    Ok(Quantized {
        bytes: out,
        ..stats
    })
}

fn rewrite_graph(graph: &[u8]) -> Result<(Vec<u8>, Quantized), String> {
    let fields = fields(graph).map_err(|e| format!("graph: {e}"))?;
    let mut nodes = Vec::new();
    let mut inputs = HashSet::new();
    let mut names = HashSet::new();
    // name → index of its field, for the initializers
    let mut initializers: HashMap<String, usize> = HashMap::new();
    for (i, f) in fields.iter().enumerate() {
        match f.number {
            GRAPH_NODE => {
                let n = NodeProto::decode(f.body).map_err(|e| format!("a node: {e}"))?;
                names.extend(n.input.iter().chain(&n.output).cloned());
                names.insert(n.name.clone());
                nodes.push((i, n));
            }
            GRAPH_INPUT => {
                let v = ValueInfoProto::decode(f.body).map_err(|e| format!("an input: {e}"))?;
                names.insert(v.name.clone());
                inputs.insert(v.name);
            }
            GRAPH_INITIALIZER => {
                // Only the name here: the data of those replaced is decoded below.
                let t = TensorName::decode(f.body).map_err(|e| format!("an initializer: {e}"))?;
                names.insert(t.name.clone());
                initializers.insert(t.name, i);
            }
            _ => {}
        }
    }
    let mut names = Names(names);
    let subgraphs = nodes.iter().any(|(_, n)| {
        n.attribute
            .iter()
            .any(|a| a.r#type == ATTR_GRAPH || a.r#type == ATTR_GRAPHS)
    });
    let is_matmul = |n: &NodeProto| {
        n.op_type == "MatMul"
            && (n.domain.is_empty() || n.domain == "ai.onnx")
            && n.input.len() == 2
    };
    let matmuls_total = nodes.iter().filter(|(_, n)| is_matmul(n)).count();

    // The weights this rewrite takes, decoded once each.
    let mut weights: HashMap<String, Weight> = HashMap::new();
    let mut replaced = HashSet::new();
    for (i, n) in &nodes {
        if !is_matmul(n) || inputs.contains(&n.input[1]) {
            continue;
        }
        let w = &n.input[1];
        let Some(&at) = initializers.get(w) else {
            continue;
        };
        if !weights.contains_key(w) {
            let t = TensorProto::decode(fields[at].body).map_err(|e| format!("{w}: {e}"))?;
            match matrix_of(&t) {
                Ok(m) => {
                    weights.insert(w.clone(), m);
                }
                // Not a matrix this rewrite takes (another type, external data): left FP32.
                Err(_) => continue,
            }
        }
        replaced.insert(*i);
    }
    if replaced.is_empty() {
        return Err(format!(
            "nothing to quantise: none of the graph's {matmuls_total} MatMul nodes multiplies by \
             a constant FP32 matrix"
        ));
    }
    let initializer_at: HashMap<usize, &String> =
        initializers.iter().map(|(name, &at)| (at, name)).collect();
    // FP32 weights something else still reads are kept.
    let mut still_read: HashSet<&str> = HashSet::new();
    for (i, n) in &nodes {
        if !replaced.contains(i) {
            still_read.extend(n.input.iter().map(String::as_str));
        }
    }

    let mut out = Vec::with_capacity(graph.len() / 3);
    let mut quantized_inputs: HashMap<String, [String; 3]> = HashMap::new();
    let mut new_initializers = Vec::new();
    for (i, f) in fields.iter().enumerate() {
        match f.number {
            GRAPH_NODE if replaced.contains(&i) => {
                // `nodes` is in field order.
                let at = nodes
                    .binary_search_by_key(&i, |(at, _)| *at)
                    .expect("a node field");
                let n = &nodes[at].1;
                let (a, w, y) = (&n.input[0], &n.input[1], &n.output[0]);
                let label = if n.name.is_empty() { y } else { &n.name };
                let weight = weights.get_mut(w).expect("a decoded weight");
                let [wq, ws, wz] = match &weight.names {
                    Some(names) => names.clone(),
                    None => {
                        let (q, scale) = quantize_columns(&weight.values, weight.k, weight.n)
                            .map_err(|e| match e {
                                Error::Quantize(reason) => format!("{w}: {reason}"),
                                other => format!("{w}: {other}"),
                            })?;
                        let made = [
                            names.fresh(format!("{w}.int8")),
                            names.fresh(format!("{w}.int8_scale")),
                            names.fresh(format!("{w}.int8_zero")),
                        ];
                        let (k, cols) = (weight.k, weight.n);
                        let bytes = q.iter().map(|&v| v as u8).collect();
                        new_initializers.push(tensor(&made[0], &[k, cols], INT8, bytes));
                        let raw = scale.iter().flat_map(|s| s.to_le_bytes()).collect();
                        new_initializers.push(tensor(&made[1], &[cols], FLOAT, raw));
                        new_initializers.push(tensor(&made[2], &[cols], INT8, vec![0; cols]));
                        weight.names = Some(made.clone());
                        made
                    }
                };
                if !quantized_inputs.contains_key(a) {
                    let q = [
                        names.fresh(format!("{a}.quant")),
                        names.fresh(format!("{a}.quant_scale")),
                        names.fresh(format!("{a}.quant_zero")),
                    ];
                    let dq = node(
                        "DynamicQuantizeLinear",
                        names.fresh(format!("{label}.quantize_input")),
                        &[a],
                        &[&q[0], &q[1], &q[2]],
                    );
                    put_message(GRAPH_NODE, &dq.encode_to_vec(), &mut out);
                    quantized_inputs.insert(a.clone(), q);
                }
                let [aq, as_, az] = &quantized_inputs[a];
                let y32 = names.fresh(format!("{y}.int32"));
                let yf = names.fresh(format!("{y}.int32_float"));
                let s = names.fresh(format!("{y}.scale"));
                let mut cast = node(
                    "Cast",
                    names.fresh(format!("{label}.cast")),
                    &[&y32],
                    &[&yf],
                );
                cast.attribute.push(AttributeProto {
                    name: "to".into(),
                    i: i64::from(FLOAT),
                    r#type: ATTR_INT,
                });
                let replacement = [
                    node(
                        "MatMulInteger",
                        names.fresh(format!("{label}.int8")),
                        &[aq, &wq, az, &wz],
                        &[&y32],
                    ),
                    cast,
                    node(
                        "Mul",
                        names.fresh(format!("{label}.scale")),
                        &[as_, &ws],
                        &[&s],
                    ),
                    node(
                        "Mul",
                        names.fresh(format!("{label}.dequantize")),
                        &[&yf, &s],
                        &[y],
                    ),
                ];
                for n in replacement {
                    put_message(GRAPH_NODE, &n.encode_to_vec(), &mut out);
                }
            }
            GRAPH_INITIALIZER => {
                // Every decoded weight is read by a replaced node (it was decoded for one).
                let dropped = initializer_at.get(&i).is_some_and(|name| {
                    !subgraphs
                        && weights.contains_key(name.as_str())
                        && !still_read.contains(name.as_str())
                });
                if !dropped {
                    out.extend_from_slice(f.raw);
                }
            }
            _ => out.extend_from_slice(f.raw),
        }
    }
    for t in &new_initializers {
        put_message(GRAPH_INITIALIZER, t, &mut out);
    }
    let stats = Quantized {
        bytes: Vec::new(),
        matmuls: replaced.len(),
        matmuls_total,
        // Every decoded weight was decoded for a replaced node, and quantised there.
        weights: weights.len(),
    };
    Ok((out, stats))
}

/// Sentences the accuracy is measured on: short and long, questions, numbers, punctuation, two
/// languages. With the three passages [`accuracy_texts`] adds, from a few tokens to past 200.
pub const ACCURACY_SENTENCES: [&str; 40] = [
    "Hello!",
    "Thanks a lot.",
    "Where is the station?",
    "The cat sleeps on the warm windowsill.",
    "A man is riding a white horse along the beach at sunset.",
    "Stock markets fell sharply after the central bank raised interest rates again.",
    "How do I reset my password if I no longer have access to my email account?",
    "The quick brown fox jumps over the lazy dog.",
    "Our team shipped the new release on Friday, two days ahead of schedule.",
    "It rained all weekend, so we stayed inside and played board games.",
    "Please send the signed contract back by the end of the month.",
    "Heavy snow closed the mountain pass for three days in January.",
    "The recipe calls for 250 g of flour, two eggs and a pinch of salt.",
    "Can you recommend a good book about the history of mathematics?",
    "The patient reported mild headaches and trouble sleeping for two weeks.",
    "Error 503: the service is temporarily unavailable, try again later.",
    "She plays the violin in the city orchestra every Thursday evening.",
    "Two children are building a sandcastle near the water.",
    "The library will be closed on public holidays.",
    "Researchers trained the model on ten million sentence pairs.",
    "I'm not sure this is the right answer, but it's worth a try.",
    "The train to Berlin leaves from platform 7 at 14:32.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "My neighbour's dog barks whenever the postman walks by.",
    "What time does the museum open on Sundays?",
    "The committee approved the budget after a long and heated debate.",
    "A woman is slicing tomatoes in a small kitchen.",
    "The bridge was built in 1889 and restored a century later.",
    "Ich habe heute keine Zeit, vielleicht morgen.",
    "Le chat dort sur le canapé depuis ce matin.",
    "Prices rose 3.2% in October, the fastest pace this year.",
    "Don't forget to water the plants while I'm away!",
    "The software update fixes a bug that drained the battery overnight.",
    "Several volunteers cleaned the park on Saturday morning.",
    "Is there a pharmacy open late near the city centre?",
    "The lecture covers graphs, trees and shortest-path algorithms.",
    "He missed the bus and had to walk to work in the rain.",
    "The river flooded the lower fields after a week of storms.",
    "OK",
    "New York, Paris and Tokyo are among the most visited cities in the world.",
];

/// [`ACCURACY_SENTENCES`] and three passages of 5, 10 and 25 of them joined.
pub fn accuracy_texts() -> Vec<String> {
    let mut texts: Vec<String> = ACCURACY_SENTENCES.iter().map(|s| s.to_string()).collect();
    for n in [5, 10, 25] {
        texts.push(ACCURACY_SENTENCES[3..3 + n].join(" "));
    }
    texts
}

/// Cosine similarities of two graphs' embeddings over the same sentences.
#[derive(Clone, Debug, PartialEq)]
pub struct Accuracy {
    pub sentences: usize,
    pub cosine_min: f64,
    pub cosine_mean: f64,
}

impl Accuracy {
    /// The model parameters the import records (the `quantization_cosine_*` ones).
    pub fn parameters(&self) -> [(&'static str, String); 3] {
        [
            (PARAM_COSINE_MIN, format!("{:.6}", self.cosine_min)),
            (PARAM_COSINE_MEAN, format!("{:.6}", self.cosine_mean)),
            (PARAM_SENTENCES, self.sentences.to_string()),
        ]
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    dot / (na * nb)
}

/// Embeds [`accuracy_texts`] with the text model in `dir` twice, once with graph file
/// `reference` and once with `candidate` (both file names inside `dir`), as served (the graph
/// optimised at the default level, no graph cache written, no sweep), and compares them.
pub fn measure(
    dir: &Path,
    reference: &str,
    candidate: &str,
    options: &OnnxOptions,
) -> Result<Accuracy, Error> {
    let texts = accuracy_texts();
    let options = OnnxOptions {
        cache: super::GraphCache::Off,
        ..options.clone()
    };
    let embed = |file: &str| -> Result<(Vec<f32>, usize), Error> {
        let mut config = ModelConfig {
            name: format!("accuracy-check ({file})"),
            backend: "onnxruntime".into(),
            max_batch_size: 16,
            ..Default::default()
        };
        for (key, value) in [(PARAM_MODEL_FILENAME, file), (PARAM_SWEEP, "false")] {
            config.parameters.insert(
                key.into(),
                Parameter {
                    string_value: value.into(),
                },
            );
        }
        let model = load(config, dir, &options)?;
        let mut values = Vec::new();
        let mut dim = 0;
        for chunk in texts.chunks(16) {
            let elements = chunk
                .iter()
                .map(|t| Bytes::copy_from_slice(t.as_bytes()))
                .collect();
            let input =
                Tensor::from_elements(crate::text::TEXT_INPUT, &[chunk.len() as i64, 1], elements)?;
            let out = model.execute(&[input])?;
            let first = out
                .first()
                .ok_or_else(|| Error::load(&model.config().name, "the model returned no output"))?;
            dim = first.shape().get(1).copied().unwrap_or(0);
            values.extend(first.f32_values()?);
        }
        Ok((values, dim))
    };
    let (a, dim) = embed(reference)?;
    let (b, dim_b) = embed(candidate)?;
    if dim == 0 || dim != dim_b || a.len() != b.len() {
        return Err(Error::load(
            candidate,
            format!("its embeddings ({dim_b} wide) do not match the reference's ({dim} wide)"),
        ));
    }
    let cosines: Vec<f64> = a
        .chunks_exact(dim)
        .zip(b.chunks_exact(dim))
        .map(|(x, y)| cosine(x, y))
        .collect();
    Ok(Accuracy {
        sentences: cosines.len(),
        cosine_min: cosines.iter().copied().fold(f64::INFINITY, f64::min),
        cosine_mean: cosines.iter().sum::<f64>() / cosines.len() as f64,
    })
}

#[cfg(test)]
mod tests;
