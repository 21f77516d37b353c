//! ONNX Runtime's own account of where a text encoder's time goes: the kernel time of each
//! operator type over a number of runs at one batch shape, from ONNX Runtime's profiler.
//!
//! It answers a question the FLOP ceiling cannot: how much of the backend's time is spent in
//! the matrix products the ceiling counts, and how much elsewhere (GELU, layer norm, the bias
//! and residual additions, softmax, reshapes, the executor between nodes). A served rate can
//! approach the ceiling only as far as the products' share of the run's wall time allows, even
//! if every product ran at the ceiling's GEMM rate.
//!
//! - The session is opened from the model's graph file at the model's requested optimisation
//!   level (the rewrites the served session has), with the given intra-op threads and ONNX
//!   Runtime's profiler on, writing its JSON into a scratch folder the caller owns; the file is
//!   read and removed before this returns. The graph cache is not used: the session optimises
//!   the source graph itself, to the same result (the cache only saves that time at a load).
//! - The batch is `rows × seq` ids of real tokens (attention mask 1): padding costs what real
//!   tokens cost, so the shape is what matters.
//! - Two runs warm the session up; `runs` more are profiled. The profile's `Node` events whose
//!   name ends in `_kernel_time` are summed per operator type (`args.op_name`); the warm-up runs
//!   are left out by counting only the last `runs` calls of each node.
//! - [`MATMUL_OPS`] names the operator types that do matrix products, fused or quantised.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use ort::session::Session;
use serde::Deserialize;

use super::encoder::OnnxEncoder;
use super::graph::Graph;
use super::runtime::runtime;
use super::session::{Spec, open_session};
use super::tune::requested_level;
use super::{OnnxOptions, model_file};
use crate::config::ModelConfig;
use crate::error::Error;
use crate::text::{Encoder, TokenBatch};

/// Operator types whose kernels are matrix products (plain, fused with a scale or transpose,
/// with a bias, or quantised).
pub const MATMUL_OPS: &[&str] = &[
    "MatMul",
    "FusedMatMul",
    "Gemm",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "QGemm",
    "MatMulNBits",
];

/// Warm-up runs before the profiled ones.
const WARMUP_RUNS: u32 = 2;
/// Most profiled runs.
pub const MAX_PROFILE_RUNS: u32 = 1000;

/// The kernel time of one operator type over the profiled runs.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct OpTime {
    pub op: String,
    pub micros: u64,
    /// Kernel calls over the profiled runs.
    pub calls: u64,
}

/// A profile of `runs` runs of a `rows × seq` batch.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EncoderProfile {
    pub rows: usize,
    pub seq: usize,
    pub runs: u32,
    /// Intra-op threads of the profiled session (0: ONNX Runtime's default).
    pub intra_op_threads: usize,
    /// Wall time of the profiled runs, measured around `run` (profiler overhead included).
    pub wall_micros: u64,
    /// Every operator type, the largest kernel time first.
    pub ops: Vec<OpTime>,
}

impl EncoderProfile {
    /// Kernel time of all operator types.
    pub fn kernel_micros(&self) -> u64 {
        self.ops.iter().map(|o| o.micros).sum()
    }

    /// Kernel time of the matrix products ([`MATMUL_OPS`]).
    pub fn matmul_micros(&self) -> u64 {
        self.ops
            .iter()
            .filter(|o| MATMUL_OPS.contains(&o.op.as_str()))
            .map(|o| o.micros)
            .sum()
    }

    /// The products' share of the runs' wall time (0 when nothing was timed).
    pub fn matmul_share_of_wall(&self) -> f64 {
        share(self.matmul_micros(), self.wall_micros)
    }

    /// The products' share of the kernel time.
    pub fn matmul_share_of_kernels(&self) -> f64 {
        share(self.matmul_micros(), self.kernel_micros())
    }
}

fn share(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// One event of ONNX Runtime's profile (Chrome trace format); only the fields read.
#[derive(Deserialize)]
struct Event {
    #[serde(default)]
    cat: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    dur: u64,
    #[serde(default)]
    args: EventArgs,
}

#[derive(Deserialize, Default)]
struct EventArgs {
    #[serde(default)]
    op_name: String,
}

/// Sums the kernel times of a profile's JSON per operator type, keeping only the last `runs`
/// calls of each node (the earlier ones are the warm-up's).
fn kernel_times(json: &str, runs: u32) -> Result<Vec<OpTime>, String> {
    let events: Vec<Event> = serde_json::from_str(json)
        .map_err(|e| format!("the profile is not a JSON array of events: {e}"))?;
    // Each node's kernel durations, in the order they ran.
    let mut nodes: BTreeMap<&str, (&str, Vec<u64>)> = BTreeMap::new();
    for e in &events {
        if e.cat == "Node"
            && let Some(node) = e.name.strip_suffix("_kernel_time")
        {
            nodes
                .entry(node)
                .or_insert_with(|| (e.args.op_name.as_str(), Vec::new()))
                .1
                .push(e.dur);
        }
    }
    if nodes.is_empty() {
        return Err("the profile holds no kernel times".into());
    }
    let mut ops: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for (op, durations) in nodes.values() {
        let last = &durations[durations.len().saturating_sub(runs as usize)..];
        let entry = ops.entry(op).or_default();
        entry.0 += last.iter().sum::<u64>();
        entry.1 += last.len() as u64;
    }
    let mut out: Vec<OpTime> = ops
        .into_iter()
        .map(|(op, (micros, calls))| OpTime {
            op: if op.is_empty() { "(unnamed)" } else { op }.to_string(),
            micros,
            calls,
        })
        .collect();
    out.sort_by(|a, b| b.micros.cmp(&a.micros).then_with(|| a.op.cmp(&b.op)));
    Ok(out)
}

/// A `rows × seq` batch of real tokens (ids spread over a BERT vocabulary's ordinary range).
fn batch_of(rows: usize, seq: usize) -> TokenBatch {
    let n = rows * seq;
    TokenBatch {
        batch: rows,
        seq,
        input_ids: (0..n).map(|i| 1000 + (i as i64 * 7919) % 20_000).collect(),
        attention_mask: vec![1; n],
        token_type_ids: vec![0; n],
    }
}

/// Profiles the text encoder of the model in `dir` (configuration `config`) on `runs` runs of a
/// `rows × seq` batch with `options.intra_op_threads` threads; ONNX Runtime writes its profile
/// under `scratch`, which must exist.
pub fn profile_encoder(
    config: &ModelConfig,
    dir: &Path,
    options: &OnnxOptions,
    rows: usize,
    seq: usize,
    runs: u32,
    scratch: &Path,
) -> Result<EncoderProfile, Error> {
    let name = &config.name;
    let fail = |reason: String| Error::load(name, format!("profiling: {reason}"));
    if rows == 0 || seq == 0 {
        return Err(fail(format!(
            "the batch must have rows and tokens; got {rows} × {seq}"
        )));
    }
    if runs == 0 || runs > MAX_PROFILE_RUNS {
        return Err(fail(format!(
            "runs must be 1..={MAX_PROFILE_RUNS}; got {runs}"
        )));
    }
    if !scratch.is_dir() {
        return Err(fail(format!(
            "the scratch folder {} is not a folder",
            scratch.display()
        )));
    }
    let file = model_file(config, dir)?;
    let rt = runtime(options.library.as_deref()).map_err(|e| Error::load(name, e))?;
    let prefix = scratch.join("ort-profile");
    let session = open_session(
        &rt,
        name,
        &Spec {
            file: &file,
            level: requested_level(config)?,
            intra_op_threads: options.intra_op_threads,
            save_optimized: None,
            profile: Some(&prefix),
        },
    )?;
    let graph = Graph::of(&session);
    let encoder = OnnxEncoder::from_sessions(name, dir, vec![session], &graph)?;
    let batch = batch_of(rows, seq);
    let mut sink = |_: &[f32]| {};
    for _ in 0..WARMUP_RUNS {
        encoder.encode_with(&batch, &mut sink)?;
    }
    let started = Instant::now();
    for _ in 0..runs {
        encoder.encode_with(&batch, &mut sink)?;
    }
    let wall_micros = started.elapsed().as_micros() as u64;
    let mut sessions: Vec<Session> = encoder.into_sessions();
    let session = sessions
        .first_mut()
        .ok_or_else(|| fail("the encoder gave no session back".into()))?;
    let path = session
        .end_profiling()
        .map_err(|e| fail(format!("ONNX Runtime: {e}")))?;
    let path = Path::new(&path);
    let read = std::fs::read_to_string(path);
    let _ = std::fs::remove_file(path);
    let json = read.map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?;
    Ok(EncoderProfile {
        rows,
        seq,
        runs,
        intra_op_threads: options.intra_op_threads,
        wall_micros,
        ops: kernel_times(&json, runs).map_err(fail)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(node: &str, op: &str, dur: u64) -> String {
        format!(
            r#"{{"cat":"Node","name":"{node}_kernel_time","dur":{dur},"args":{{"op_name":"{op}"}}}}"#
        )
    }

    #[test]
    fn kernel_times_sum_the_last_runs_of_each_node_per_operator_type() {
        // Two runs of warm-up then two profiled: the first two calls of each node are left out.
        let mut events = vec![
            r#"{"cat":"Session","name":"model_loading_uri","dur":500}"#.to_string(),
            r#"{"cat":"Node","name":"mm1_fence_before","dur":3,"args":{"op_name":"MatMul"}}"#
                .to_string(),
        ];
        for run in 0..4u64 {
            events.push(event("mm1", "MatMul", 100 + run));
            events.push(event("mm2", "MatMul", 200 + run));
            events.push(event("gelu", "BiasGelu", 10 + run));
        }
        let json = format!("[{}]", events.join(","));
        let ops = kernel_times(&json, 2).unwrap();
        assert_eq!(
            ops,
            vec![
                OpTime {
                    op: "MatMul".into(),
                    micros: 102 + 103 + 202 + 203,
                    calls: 4
                },
                OpTime {
                    op: "BiasGelu".into(),
                    micros: 12 + 13,
                    calls: 2
                },
            ]
        );
        let profile = EncoderProfile {
            rows: 1,
            seq: 1,
            runs: 2,
            intra_op_threads: 1,
            wall_micros: 1000,
            ops,
        };
        assert_eq!(profile.kernel_micros(), 635);
        assert_eq!(profile.matmul_micros(), 610);
        assert!((profile.matmul_share_of_wall() - 0.61).abs() < 1e-12);
        assert!((profile.matmul_share_of_kernels() - 610.0 / 635.0).abs() < 1e-12);
    }

    #[test]
    fn a_profile_without_kernel_times_or_not_json_is_refused_by_name() {
        let e = kernel_times(r#"[{"cat":"Session","name":"x","dur":1}]"#, 1).unwrap_err();
        assert!(e.contains("no kernel times"), "{e}");
        let e = kernel_times("{", 1).unwrap_err();
        assert!(e.contains("not a JSON array"), "{e}");
    }

    #[test]
    fn bad_arguments_are_refused_before_anything_opens() {
        let config = ModelConfig {
            name: "m".into(),
            ..Default::default()
        };
        let dir = std::env::temp_dir();
        let options = OnnxOptions::default();
        let e = profile_encoder(&config, &dir, &options, 0, 4, 1, &dir).unwrap_err();
        assert!(e.to_string().contains("0 × 4"), "{e}");
        let e = profile_encoder(&config, &dir, &options, 1, 4, 0, &dir).unwrap_err();
        assert!(e.to_string().contains("runs must be"), "{e}");
        let missing = dir.join("veraltheim-no-such-folder-for-profiling");
        let e = profile_encoder(&config, &dir, &options, 1, 4, 1, &missing).unwrap_err();
        assert!(e.to_string().contains("is not a folder"), "{e}");
    }
}
