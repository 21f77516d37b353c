//! ONNX Runtime's own FP32 matrix product (MLAS) measured alone: one `MatMul` node, `A · B` with
//! `A` an `m×k` input and `B` a constant `k×n` weight, as the encoder's linear layers are.
//!
//! The text benchmark's ceiling (`veraltheim-load text`) is the machine's best FP32 GEMM rate at
//! the model's shapes. A GEMM crate compiled for a portable target may not use every vector unit
//! the CPU has (the `gemm` crate's AVX-512 kernels need a nightly compiler): on an AVX-512
//! machine ONNX Runtime's products then outrun it, and a ceiling measured with it alone is too
//! low. Measuring the backend's own kernel too, and taking the faster, keeps the ceiling the
//! machine's.
//!
//! - The graph is written here, in memory (ONNX's protobuf field numbers; opset 13, IR version
//!   8); nothing is read from or written to disk.
//! - The session runs at ONNX Runtime's full optimisation level with `threads` intra-op threads
//!   (0: its default, a thread per core) and ONNX Runtime's default spinning, as a served
//!   session does.
//! - One run warms up (packing the weight, allocating); then `slices` slices of `time ÷ slices`
//!   each, at least one run each; the rate is the best slice's, as the `gemm` benchmark does.
//!   Each run allocates its output, as a served run does.

use std::time::{Duration, Instant};

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::TensorRef;
use prost::Message;

use super::quantize::{FLOAT, NodeProto, node, tensor};
use super::runtime::runtime;
use crate::error::Error;

/// The name errors carry.
const NAME: &str = "matmul-benchmark";
/// Most values in one operand (a 1 GiB buffer of f32).
pub const MAX_VALUES: usize = 1 << 28;

#[derive(Clone, PartialEq, Message)]
struct ModelProto {
    #[prost(int64, tag = "1")]
    ir_version: i64,
    #[prost(message, optional, tag = "7")]
    graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "8")]
    opset_import: Vec<OpsetId>,
}

#[derive(Clone, PartialEq, Message)]
struct OpsetId {
    #[prost(string, tag = "1")]
    domain: String,
    #[prost(int64, tag = "2")]
    version: i64,
}

#[derive(Clone, PartialEq, Message)]
struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    node: Vec<NodeProto>,
    #[prost(string, tag = "2")]
    name: String,
    /// Encoded `TensorProto`s (an embedded message and bytes share one wire format).
    #[prost(bytes = "vec", repeated, tag = "5")]
    initializer: Vec<Vec<u8>>,
    #[prost(message, repeated, tag = "11")]
    input: Vec<TypedValue>,
    #[prost(message, repeated, tag = "12")]
    output: Vec<TypedValue>,
}

/// `ValueInfoProto` with its type: ONNX Runtime needs the graph's inputs and outputs typed.
#[derive(Clone, PartialEq, Message)]
struct TypedValue {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(message, optional, tag = "2")]
    r#type: Option<TypeProto>,
}

#[derive(Clone, PartialEq, Message)]
struct TypeProto {
    #[prost(message, optional, tag = "1")]
    tensor_type: Option<TensorType>,
}

#[derive(Clone, PartialEq, Message)]
struct TensorType {
    #[prost(int32, tag = "1")]
    elem_type: i32,
    #[prost(message, optional, tag = "2")]
    shape: Option<ShapeProto>,
}

#[derive(Clone, PartialEq, Message)]
struct ShapeProto {
    #[prost(message, repeated, tag = "1")]
    dim: Vec<Dimension>,
}

#[derive(Clone, PartialEq, Message)]
struct Dimension {
    #[prost(int64, tag = "1")]
    dim_value: i64,
}

fn fp32_value(name: &str, dims: &[usize]) -> TypedValue {
    TypedValue {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorType {
                elem_type: FLOAT,
                shape: Some(ShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| Dimension {
                            dim_value: d as i64,
                        })
                        .collect(),
                }),
            }),
        }),
    }
}

/// Deterministic operand values in [-1, 1) (no denormals, no NaN); the `text` benchmark's
/// `gemm` products use the same.
pub fn fill(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|x| {
            let v = (x as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
            (v % 2048) as f32 / 1024.0 - 1.0
        })
        .collect()
}

/// The model `Y = A · B`: `A` an `[m, k]` input, `B` a constant `[k, n]` of `b`.
fn matmul_model(m: usize, k: usize, n: usize, b: &[f32]) -> Vec<u8> {
    let raw = b.iter().flat_map(|v| v.to_le_bytes()).collect();
    ModelProto {
        ir_version: 8,
        graph: Some(GraphProto {
            node: vec![node("MatMul", "product".into(), &["A", "B"], &["Y"])],
            name: "matmul".into(),
            initializer: vec![tensor("B", &[k, n], FLOAT, raw)],
            input: vec![fp32_value("A", &[m, k])],
            output: vec![fp32_value("Y", &[m, n])],
        }),
        opset_import: vec![OpsetId {
            domain: String::new(),
            version: 13,
        }],
    }
    .encode_to_vec()
}

/// Compares up to 16 entries of `y = a · b` (spread over the matrix) with a dot product in f64.
fn check_entries(
    a: &[f32],
    b: &[f32],
    (m, k, n): (usize, usize, usize),
    y: &[f32],
) -> Result<(), String> {
    let entries = (m * n).min(16);
    for e in 0..entries {
        let at = e * (m * n) / entries;
        let (i, j) = (at / n, at % n);
        let want: f64 = (0..k)
            .map(|t| f64::from(a[i * k + t]) * f64::from(b[t * n + j]))
            .sum();
        let got = f64::from(y[at]);
        // FP32 accumulation over k terms in [-1, 1): far within k × 1e-6.
        if (got - want).abs() > 1e-6 * k as f64 + 1e-4 {
            return Err(format!(
                "the product's entry [{i}, {j}] is {got}, expected {want}"
            ));
        }
    }
    Ok(())
}

/// What [`matmul_rate`] measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MatMulRate {
    /// Products timed (the warm-up run not counted).
    pub products: u64,
    /// The best slice's rate, GFLOP/s (`2·m·k·n` FLOPs per product).
    pub gflops: f64,
}

/// ONNX Runtime's FP32 `MatMul` of `[m, k] · [k, n]` on `threads` intra-op threads (0: ONNX
/// Runtime's default) for about `time`, in `slices` slices; the library is loaded as
/// [`super::init_runtime`] does.
pub fn matmul_rate(
    (m, k, n): (usize, usize, usize),
    threads: usize,
    time: Duration,
    slices: u32,
    library: Option<&std::path::Path>,
) -> Result<MatMulRate, Error> {
    let fail = |reason: String| Error::load(NAME, reason);
    if m == 0 || k == 0 || n == 0 {
        return Err(fail(format!("empty product shape {m}×{k} · {k}×{n}")));
    }
    if m.saturating_mul(k) > MAX_VALUES
        || k.saturating_mul(n) > MAX_VALUES
        || m.saturating_mul(n) > MAX_VALUES
    {
        return Err(fail(format!(
            "product shape {m}×{k} · {k}×{n} holds more than {MAX_VALUES} values in an operand"
        )));
    }
    if slices == 0 {
        return Err(fail("slices must be at least 1".into()));
    }
    let rt = runtime(library)?;
    let ort_err = |e: &dyn std::fmt::Display| fail(format!("ONNX Runtime: {e}"));
    let (a, b) = (fill(m * k, 1), fill(k * n, 2));
    let model = matmul_model(m, k, n, &b);
    let mut builder = Session::builder(&rt.env)
        .map_err(|e| ort_err(&e))?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(|e| ort_err(&e))?;
    if threads > 0 {
        builder = builder
            .with_intra_threads(threads)
            .map_err(|e| ort_err(&e))?;
    }
    let mut session = builder
        .commit_from_memory(&model)
        .map_err(|e| ort_err(&e))?;
    let shape = vec![m, k];
    // The warm-up run's product is checked at a few entries against a plain dot product, so
    // that what is timed is the product asked for.
    let mut checked = false;
    let mut run = |session: &mut Session| -> Result<(), Error> {
        let input = TensorRef::from_array_view((shape.clone(), &a[..])).map_err(|e| ort_err(&e))?;
        let outputs = session
            .run(ort::inputs!["A" => input])
            .map_err(|e| ort_err(&e))?;
        let (out_shape, data) = outputs
            .get("Y")
            .ok_or_else(|| fail("ONNX Runtime returned no 'Y'".into()))?
            .try_extract_tensor::<f32>()
            .map_err(|e| ort_err(&e))?;
        if out_shape[..] != [m as i64, n as i64] || data.len() != m * n {
            return Err(fail(format!(
                "the product came back with shape {out_shape}, expected [{m}, {n}]"
            )));
        }
        if !checked {
            check_entries(&a, &b, (m, k, n), data).map_err(fail)?;
            checked = true;
        }
        std::hint::black_box(data);
        Ok(())
    };
    run(&mut session)?;
    let flops = 2.0 * m as f64 * k as f64 * n as f64;
    let slice = time / slices;
    let (mut best, mut products) = (0f64, 0u64);
    for _ in 0..slices {
        let start = Instant::now();
        let mut count = 0u64;
        loop {
            run(&mut session)?;
            count += 1;
            if start.elapsed() >= slice {
                break;
            }
        }
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        best = best.max(flops * count as f64 / secs / 1e9);
        products += count;
    }
    Ok(MatMulRate {
        products,
        gflops: best,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_declares_typed_shapes_and_a_constant_weight() {
        let model = matmul_model(4, 3, 2, &[0.5; 6]);
        let decoded = ModelProto::decode(&model[..]).expect("decodes");
        let graph = decoded.graph.expect("a graph");
        assert_eq!(graph.input[0], fp32_value("A", &[4, 3]));
        assert_eq!(graph.output[0], fp32_value("Y", &[4, 2]));
        assert_eq!(graph.initializer.len(), 1);
        assert_eq!(decoded.opset_import[0].version, 13);
    }

    #[test]
    fn a_wrong_entry_of_the_product_is_named() {
        // [1, 2] · [3, 4]ᵀ = 11.
        let (a, b) = ([1.0, 2.0], [3.0, 4.0]);
        assert_eq!(check_entries(&a, &b, (1, 2, 1), &[11.0]), Ok(()));
        let e = check_entries(&a, &b, (1, 2, 1), &[12.0]).unwrap_err();
        assert!(e.contains("[0, 0] is 12"), "{e}");
    }

    #[test]
    fn bad_shapes_are_named_before_the_runtime_is_loaded() {
        let e = matmul_rate((0, 3, 2), 1, Duration::from_millis(1), 1, None).unwrap_err();
        assert!(e.to_string().contains("empty product shape"), "{e}");
        let e =
            matmul_rate((1 << 20, 1 << 10, 2), 1, Duration::from_millis(1), 1, None).unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
        let e = matmul_rate((2, 2, 2), 1, Duration::from_millis(1), 0, None).unwrap_err();
        assert!(e.to_string().contains("slices"), "{e}");
    }
}
