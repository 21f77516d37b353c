//! The hardware limit a served text model is measured against (issue 19): the machine's FP32
//! matrix-multiply rate at the model's shapes, and the model's FLOPs per token.
//!
//! - **FLOPs per token** from the model folder's `config.json` (`hidden_size` h,
//!   `intermediate_size` i, `num_hidden_layers` L, each a positive integer, else a clear error
//!   naming the field): the linear layers of a BERT encoder layer are Q, K, V and the attention
//!   output (4 of h×h) and the feed-forward pair (h×i and i×h), so one token costs
//!   `2 × (4·h·h + 2·h·i)` FLOPs per layer, × L (21.2 MFLOP for all-MiniLM-L6-v2: h = 384,
//!   i = 1536, L = 6). Attention's sequence-dependent part (Q·Kᵀ and the weights × V) is
//!   `4·h·s` per token per layer for a sequence of s tokens; it is reported separately
//!   ([`ModelFlops::attention_per_token`]) and left out of the ceiling, as are embeddings, layer
//!   norms, softmax and GELU.
//! - **GEMM rate**: row-major `tokens×k · k×n` FP32 products at the encoder's three shapes
//!   (`tokens×h · h×h`, `tokens×h · h×i`, `tokens×i · i×h`), on as many threads as the served
//!   model computes on (its intra-op threads × its instances, at most the cores; one per core
//!   for ONNX Runtime's default), each measured with two libraries, the faster one's rate
//!   counting: the `gemm` crate and ONNX Runtime's own `MatMul`
//!   ([`veraltheim_models::onnx::matmul`]). The ceiling is the best the machine was seen to do,
//!   not what one library does: the `gemm` crate as built here has no AVX-512 kernels (its
//!   `x86-v4` feature would also reach candle's matmul; see the benches' Cargo.toml), and on a
//!   2-core AVX-512 Xeon it did 186 GFLOP/s where ONNX Runtime's `MatMul` did 328–354: the
//!   ceiling from `gemm` alone was half of the machine's, and a served rate came out at 1.07 of
//!   it. Each shape is run for its share of the time in slices of at least one product; its
//!   rate is the best slice's (on a shared machine the best slice is the closest to what the
//!   cores can do). The report gives each shape's GFLOP/s with both libraries', the best, and
//!   the layer mix (4 h×h, 1 h×i, 1 i×h products: total FLOPs ÷ total time at each shape's
//!   rate).
//! - **Ceiling**: sentences/s = best GEMM rate ÷ (linear FLOPs per token × mean tokens per
//!   sentence); tokens/s = best GEMM rate ÷ linear FLOPs per token. A served rate is reported
//!   as a share of it.
//!
//! `gemm` was chosen over `matrixmultiply` (with its `threading` feature) because it was as
//! fast or faster at these shapes on the 2-core development machine and takes its thread count
//! per call, where `matrixmultiply` reads it once from the environment.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Serialize;
use veraltheim_models::onnx::matmul::fill;

/// Most rows (tokens) of the GEMM benchmark.
pub const MAX_GEMM_TOKENS: usize = 65_536;
/// Slices each shape's time is cut into (at least one product each).
const SLICES: u32 = 5;

/// FLOPs of the model's encoder, from its `config.json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelFlops {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    /// FLOPs of the linear layers per token, all layers: `2·(4·h·h + 2·h·i)·L`.
    pub linear_per_token: f64,
}

impl ModelFlops {
    /// Reads `config.json` in the model folder `dir`.
    pub fn from_dir(dir: &Path) -> anyhow::Result<ModelFlops> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let config: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        Self::from_config(&config).with_context(|| format!("{}", path.display()))
    }

    /// From a HuggingFace BERT-style config (`hidden_size`, `intermediate_size`,
    /// `num_hidden_layers`).
    pub fn from_config(config: &serde_json::Value) -> anyhow::Result<ModelFlops> {
        let field = |name: &str| -> anyhow::Result<usize> {
            match config.get(name) {
                None | Some(serde_json::Value::Null) => {
                    bail!("{name} is missing (needed for the model's FLOPs per token)")
                }
                Some(v) => match v.as_u64() {
                    Some(n) if (1..=u64::from(u32::MAX)).contains(&n) => Ok(n as usize),
                    _ => bail!("{name} is {v}, not a positive integer"),
                },
            }
        };
        let (h, i, l) = (
            field("hidden_size")?,
            field("intermediate_size")?,
            field("num_hidden_layers")?,
        );
        let (hf, i_f, lf) = (h as f64, i as f64, l as f64);
        Ok(ModelFlops {
            hidden_size: h,
            intermediate_size: i,
            num_hidden_layers: l,
            linear_per_token: 2.0 * (4.0 * hf * hf + 2.0 * hf * i_f) * lf,
        })
    }

    /// Attention's sequence-dependent FLOPs per token, all layers, in a sequence of `seq`
    /// tokens (padding included): `4·h·seq·L`.
    pub fn attention_per_token(&self, seq: f64) -> f64 {
        4.0 * self.hidden_size as f64 * seq * self.num_hidden_layers as f64
    }

    /// The encoder's matrix products for `tokens` rows, with how many of each a layer does.
    pub fn shapes(&self, tokens: usize) -> Vec<(GemmShape, u32)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        vec![
            (
                GemmShape {
                    m: tokens,
                    k: h,
                    n: h,
                },
                4,
            ),
            (
                GemmShape {
                    m: tokens,
                    k: h,
                    n: i,
                },
                1,
            ),
            (
                GemmShape {
                    m: tokens,
                    k: i,
                    n: h,
                },
                1,
            ),
        ]
    }
}

/// A row-major product `m×k · k×n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct GemmShape {
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

impl GemmShape {
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.k as f64 * self.n as f64
    }
}

/// The `gemm` crate, as the report names it.
pub const GEMM_CRATE: &str = "gemm 0.19";
/// ONNX Runtime's `MatMul` (its MLAS kernels), as the report names it.
pub const ONNX_RUNTIME: &str = "ONNX Runtime MatMul";

/// One shape's measured rate.
#[derive(Clone, Debug, Serialize)]
pub struct GemmPoint {
    pub shape: GemmShape,
    /// Products of this shape in one encoder layer.
    pub per_layer: u32,
    /// Products timed by the faster library.
    pub products: u64,
    /// The faster library's best slice.
    pub gflops: f64,
    /// The faster library ([`GEMM_CRATE`] or [`ONNX_RUNTIME`]).
    pub library: &'static str,
    /// The `gemm` crate's best slice.
    pub gemm_crate_gflops: f64,
    /// ONNX Runtime's best slice, or why it could not be measured.
    pub onnx_runtime_gflops: Result<f64, String>,
}

/// The GEMM benchmark's result.
#[derive(Clone, Debug, Serialize)]
pub struct GemmReport {
    pub threads: usize,
    pub tokens: usize,
    pub shapes: Vec<GemmPoint>,
    /// The best shape's GFLOP/s: the ceiling's rate.
    pub best_gflops: f64,
    /// A layer's products at each shape's rate: total FLOPs ÷ total time.
    pub layer_mix_gflops: f64,
}

/// `c = a · b`, row-major (`a` m×k, `b` k×n, `c` m×n), on the current rayon pool with `threads`
/// threads. An error if a buffer's length does not match its shape.
pub fn multiply(
    s: GemmShape,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    threads: usize,
) -> anyhow::Result<()> {
    for (name, len, want) in [
        ("a", a.len(), s.m * s.k),
        ("b", b.len(), s.k * s.n),
        ("c", c.len(), s.m * s.n),
    ] {
        if len != want {
            bail!("GEMM {s:?}: {name} holds {len} values, not {want}");
        }
    }
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the three buffers hold exactly m×k, k×n and m×n values (checked above), the
    // strides are those of row-major storage of these shapes, and `c` is borrowed mutably so
    // it aliases neither input.
    unsafe {
        gemm::gemm(
            s.m,
            s.n,
            s.k,
            c.as_mut_ptr(),
            1,
            s.n as isize,
            false,
            a.as_ptr(),
            1,
            s.k as isize,
            b.as_ptr(),
            1,
            s.n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

/// Measures one shape for about `time`: the best of [`SLICES`] slices, each of at least one
/// product. The first product (page faults, packing buffers) is not timed.
pub fn measure_shape(
    shape: GemmShape,
    threads: usize,
    time: Duration,
) -> anyhow::Result<(u64, f64)> {
    if shape.m == 0 || shape.k == 0 || shape.n == 0 {
        bail!("empty GEMM shape {shape:?}");
    }
    let threads = threads.max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("gemm-bench-{i}"))
        .build()
        .context("cannot start the GEMM threads")?;
    let a = fill(shape.m * shape.k, 1);
    let b = fill(shape.k * shape.n, 2);
    let mut c = vec![0f32; shape.m * shape.n];
    pool.install(|| -> anyhow::Result<(u64, f64)> {
        multiply(shape, &a, &b, &mut c, threads)?;
        let slice = time / SLICES;
        let mut best = 0f64;
        let mut total = 0u64;
        for _ in 0..SLICES {
            let start = Instant::now();
            let mut n = 0u64;
            loop {
                multiply(shape, &a, &b, &mut c, threads)?;
                n += 1;
                if start.elapsed() >= slice {
                    break;
                }
            }
            let secs = start.elapsed().as_secs_f64().max(1e-9);
            best = best.max(shape.flops() * n as f64 / secs / 1e9);
            total += n;
        }
        std::hint::black_box(&c);
        Ok((total, best))
    })
}

/// ONNX Runtime's `MatMul` at `shape` on `threads` intra-op threads for about `time`:
/// `(products, best slice's GFLOP/s)`, or why it could not run (no library, say).
pub fn measure_onnx_runtime(
    shape: GemmShape,
    threads: usize,
    time: Duration,
    library: Option<&Path>,
) -> Result<(u64, f64), String> {
    veraltheim_models::onnx::matmul::matmul_rate(
        (shape.m, shape.k, shape.n),
        threads.max(1),
        time,
        SLICES,
        library,
    )
    .map(|r| (r.products, r.gflops))
    .map_err(|e| e.to_string())
}

/// The GEMM benchmark at `flops`' shapes for `tokens` rows, `per_shape` each with each library:
/// the `gemm` crate, and ONNX Runtime's `MatMul` (from `library`, else `ORT_DYLIB_PATH`). A
/// shape's rate is the faster library's: the ceiling is the best the machine was seen to do.
pub fn measure(
    flops: &ModelFlops,
    tokens: usize,
    threads: usize,
    per_shape: Duration,
    library: Option<&Path>,
) -> anyhow::Result<GemmReport> {
    if tokens == 0 || tokens > MAX_GEMM_TOKENS {
        bail!("--gemm-tokens must be 1..={MAX_GEMM_TOKENS}, got {tokens}");
    }
    let mut shapes = Vec::with_capacity(3);
    for (shape, per_layer) in flops.shapes(tokens) {
        let (crate_products, crate_gflops) = measure_shape(shape, threads, per_shape)?;
        let onnx = measure_onnx_runtime(shape, threads, per_shape, library);
        shapes.push(faster(
            shape,
            per_layer,
            (crate_products, crate_gflops),
            onnx,
        ));
    }
    let best_gflops = shapes.iter().map(|p| p.gflops).fold(0.0, f64::max);
    let (work, time) = shapes.iter().fold((0.0, 0.0), |(w, t), p| {
        let f = p.shape.flops() * p.per_layer as f64;
        (w + f, t + f / p.gflops)
    });
    Ok(GemmReport {
        threads: threads.max(1),
        tokens,
        shapes,
        best_gflops,
        layer_mix_gflops: if time > 0.0 { work / time } else { 0.0 },
    })
}

/// One shape's point: the faster of the `gemm` crate's and ONNX Runtime's rates.
fn faster(
    shape: GemmShape,
    per_layer: u32,
    (crate_products, crate_gflops): (u64, f64),
    onnx: Result<(u64, f64), String>,
) -> GemmPoint {
    let (library, products, gflops) = match &onnx {
        Ok((products, gflops)) if *gflops > crate_gflops => (ONNX_RUNTIME, *products, *gflops),
        _ => (GEMM_CRATE, crate_products, crate_gflops),
    };
    GemmPoint {
        shape,
        per_layer,
        products,
        gflops,
        library,
        gemm_crate_gflops: crate_gflops,
        onnx_runtime_gflops: onnx.map(|(_, g)| g),
    }
}

/// What the hardware allows: the GEMM rate over the model's FLOPs.
#[derive(Clone, Debug, Serialize)]
pub struct Ceiling {
    pub gemm: GemmReport,
    pub flops: ModelFlops,
    /// Attention's sequence-dependent FLOPs per token at the mean sentence length (not in the
    /// ceiling).
    pub attention_per_token_at_mean: f64,
    /// best GEMM rate ÷ linear FLOPs per token.
    pub tokens_per_s: f64,
    /// tokens_per_s ÷ mean tokens per sentence.
    pub sentences_per_s: f64,
}

impl Ceiling {
    pub fn new(gemm: GemmReport, flops: ModelFlops, mean_tokens: f64) -> Ceiling {
        let tokens_per_s = gemm.best_gflops * 1e9 / flops.linear_per_token;
        Ceiling {
            attention_per_token_at_mean: flops.attention_per_token(mean_tokens),
            sentences_per_s: if mean_tokens > 0.0 {
                tokens_per_s / mean_tokens
            } else {
                0.0
            },
            tokens_per_s,
            gemm,
            flops,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shape_takes_the_faster_library_and_keeps_both_rates() {
        let shape = GemmShape { m: 8, k: 4, n: 2 };
        let p = faster(shape, 4, (100, 90.0), Ok((150, 130.0)));
        assert_eq!(
            (p.library, p.products, p.gflops),
            (ONNX_RUNTIME, 150, 130.0)
        );
        assert_eq!(
            (p.gemm_crate_gflops, p.onnx_runtime_gflops.clone()),
            (90.0, Ok(130.0))
        );
        let p = faster(shape, 4, (100, 90.0), Ok((80, 70.0)));
        assert_eq!((p.library, p.products, p.gflops), (GEMM_CRATE, 100, 90.0));
        // ONNX Runtime missing: the crate's rate, and the reason kept.
        let p = faster(shape, 1, (100, 90.0), Err("no library".into()));
        assert_eq!((p.library, p.gflops), (GEMM_CRATE, 90.0));
        assert_eq!(p.onnx_runtime_gflops, Err("no library".to_string()));
    }

    #[test]
    fn fill_stays_in_range() {
        assert!(fill(10_000, 3).iter().all(|v| (-1.0..1.0).contains(v)));
    }
}
