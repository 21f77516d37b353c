//! The ONNX Runtime backend: any ONNX graph as a [`Model`], and ONNX text encoders
//! ([`OnnxEncoder`]) under the shared sentence-embedding pipeline ([`crate::text`]).
//!
//! # The runtime
//!
//! ONNX Runtime is not linked: `libonnxruntime.so` is loaded once per process, at the first model
//! load, from [`OnnxOptions::library`] (the server's `models.onnxruntime_library`) or else from the
//! `ORT_DYLIB_PATH` environment variable. The `onnxruntime` PyPI wheel carries a suitable library
//! under `site-packages/onnxruntime/capi/`. A missing or unloadable library fails the model's load
//! with a [`Error::Load`] that says how to fix it; it never panics, and a failed attempt does
//! not stop a later one with a correct path from succeeding. Once a library is loaded it stays for
//! the life of the process (ONNX Runtime cannot be unloaded); a later, different path is ignored
//! with a warning. ONNX Runtime's own log goes to `tracing` (target `ort`, warnings and above).
//!
//! # A generic model
//!
//! [`load`] reads `model.onnx` from the model's folder (parameter `model_filename` names another
//! file in the same folder) and completes the configuration from the graph, as Triton's
//! auto-complete does:
//!
//! - no inputs and no outputs in the configuration: all of the graph's are filled in, with their
//!   element types and dimensions (-1 where the graph's dimension is dynamic). If then every
//!   input's and every output's first dimension is dynamic and `max_batch_size` is 0, the first
//!   dimension is taken as the batch dimension and `max_batch_size` becomes
//!   [`AUTO_MAX_BATCH_SIZE`] (32). Set `max_batch_size` explicitly to choose another bound.
//! - inputs or outputs listed: each must exist in the graph with the same element type and
//!   compatible dimensions (a configured size where the graph is dynamic is fine; a dynamic one
//!   where the graph is fixed is not). Every graph input must be configured; outputs may be a
//!   subset (only those are computed). An empty list is filled from the graph.
//! - with `max_batch_size > 0` every configured tensor's first graph dimension must be dynamic.
//!
//! Each instance of the model (`instance_group` counts) is its own ONNX Runtime session behind a
//! mutex; a batch takes a free one, or waits for one. Intra-op threads per session come from
//! [`OnnxOptions::intra_op_threads`], overridden by the model parameter `intra_op_threads`
//! (0 = ONNX Runtime's default: one per core).
//!
//! # Graph optimisation and its cache
//!
//! The level is set explicitly: parameter `onnx_optimization` = `none`, `basic` (ONNX Runtime's
//! level 1: constant folding, redundant nodes), `extended` (plus the transformer fusions:
//! attention, layer norm, GELU, MatMul+Add) or `all` (plus layout rewrites; the default). The
//! first load writes the optimised graph and a record of what it was made from beside the model
//! (`.model.onnx.all.optimized.onnx` / `.json`) when the folder is writable, else into
//! [`GraphCache::Beside`]'s folder (the server's `<data_dir>/onnx-cache`); later loads open it
//! without optimising again. The cache is keyed by the source graph's SHA-256, ONNX Runtime's build
//! string, the level and the CPU; a stale record (another key) or a corrupt graph (its length or
//! SHA-256 not the recorded one) is rebuilt, never used, and the log says which. A graph ONNX
//! Runtime cannot write back is served uncached.
//!
//! # A text encoder's reference check and sweep
//!
//! A text encoder optimised above `basic` is checked once per cached graph: three probe batches
//! of tokenized sentences run through it and through a `basic`-level session of the source graph;
//! if any real token's hidden value differs by more than `onnx_check_tolerance` (default
//! [`CHECK_TOLERANCE`], 1e-4), the model falls back to `basic` and the log says why. The result is
//! kept in the cache's record, so later loads do not run the reference again.
//!
//! Then, unless both are set (parameter `intra_op_threads` or the server's option, and an
//! `instance_group` count) or `onnx_sweep` is `false`, intra-op threads ∈ {1, 2, ONNX Runtime's
//! default} × instances ∈ {1, 2} (no more threads in all than cores; a set value is kept) are
//! each measured for [`SWEEP_PER_CANDIDATE`] on a batch of up to 16 sentences, within
//! [`SWEEP_BUDGET`] in all, and the fastest is served, unless one with more instances is within
//! [`FEWER_INSTANCES_MARGIN`] of it (then that one: served, more instances overlap the work around
//! each run that the sweep does not time; an instance count it picks becomes the effective
//! `instance_group` count). When only one arrangement fits (an `instance_group` count of 2 on
//! 2 cores, threads not set: one thread each), it is served without a measurement: ONNX
//! Runtime's default of a thread per core in every instance would put more threads than cores
//! to work. More instances favour throughput under load: a model served mostly one
//! request at a time answers sooner with one instance of all the cores' threads (set
//! `instance_group` count 1 and `intra_op_threads`; docs/PERFORMANCE.md, session 14). Generic
//! graphs are neither checked nor swept: there is no representative input to build for them.
//!
//! Every decision is in the log and in the effective configuration's parameters:
//! `onnx_optimization` (the level in use), `onnx_optimization_check`, `onnx_graph_cache`,
//! `onnx_intra_op_threads`, `onnx_instances` and `onnx_sweep_result` (the measured rates).
//!
//! # Copies
//!
//! A text encoder's INT64 ids are lent to ONNX Runtime (INT32 graphs get one narrowed copy) and
//! its hidden states are pooled straight from ONNX Runtime's output buffer
//! ([`crate::text::Encoder::encode_with`]); the pooled rows are then written once into the
//! response tensor. A generic model copies each input once into an ONNX Runtime tensor (the
//! request's bytes are not aligned for its element type) and each output once out of it.
//!
//! Element types: FP32, FP64, FP16, BF16, INT8/16/32/64, UINT8/16/32/64 and BOOL move as raw
//! little-endian bytes. BYTES is an ONNX string tensor (`TYPE_STRING` in the configuration), as
//! in Triton's ONNX Runtime backend: each element goes in as one string and comes out as its
//! bytes, unchanged and not necessarily UTF-8, so a graph may pass strings through (`Identity`)
//! or turn them into numbers and back (`Cast`). An element holding a NUL byte is refused: ONNX
//! Runtime's C API ends a string there.
//!
//! # A text encoder
//!
//! When the folder also holds `tokenizer.json` (the sentence-transformers layout) and the
//! configuration names none of the graph's inputs, [`load`] builds a
//! [`crate::text::SentenceEmbedder`] around an [`OnnxEncoder`] instead: inputs `input_ids`,
//! `attention_mask` and, when the graph has it, `token_type_ids`; output `last_hidden_state`, or
//! else the graph's first rank-3 output.

mod encoder;
mod graph;
pub mod matmul;
mod model;
mod optimize;
pub mod profile;
pub mod quantize;
mod runtime;
mod session;
mod tune;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::ModelConfig;
use crate::error::Error;
use crate::model::Model;

pub use encoder::OnnxEncoder;
pub use model::OnnxModel;
pub use optimize::{GraphCache, Level};
pub use runtime::{RuntimeInfo, init_runtime};
pub use tune::{CHECK_TOLERANCE, FEWER_INSTANCES_MARGIN, SWEEP_BUDGET, SWEEP_PER_CANDIDATE};

use graph::{Graph, complete_config};
use runtime::runtime;
use session::open_sessions;

#[cfg(target_endian = "big")]
compile_error!("the ONNX Runtime backend moves tensor data as little-endian bytes");

/// The environment variable that names `libonnxruntime.so` when no explicit path is given.
pub const LIBRARY_ENV: &str = "ORT_DYLIB_PATH";
/// The graph file in a model's folder unless the parameter `model_filename` names another.
pub const DEFAULT_MODEL_FILENAME: &str = "model.onnx";
/// Model parameter: the graph file's name inside the model's folder.
pub const PARAM_MODEL_FILENAME: &str = "model_filename";
/// Model parameter: intra-op threads per session (overrides [`OnnxOptions::intra_op_threads`]).
pub const PARAM_INTRA_OP_THREADS: &str = "intra_op_threads";
/// Model parameter: the graph optimisation level asked for (`none`, `basic`, `extended`, `all`;
/// default `all`); in the effective configuration, the level in use.
pub const PARAM_OPTIMIZATION: &str = "onnx_optimization";
/// Model parameter: the reference check's tolerance (default [`CHECK_TOLERANCE`], 1e-4).
pub const PARAM_CHECK_TOLERANCE: &str = "onnx_check_tolerance";
/// Effective parameter: the reference check of the optimised graph and its outcome.
pub const PARAM_CHECK: &str = "onnx_optimization_check";
/// Effective parameter: what the graph cache did (hit, built, not cached and why).
pub const PARAM_GRAPH_CACHE: &str = "onnx_graph_cache";
/// Model parameter: `false` turns the thread and instance sweep of a text encoder off.
pub const PARAM_SWEEP: &str = "onnx_sweep";
/// Effective parameter: the sweep's choice and measured rates (or why it did not run).
pub const PARAM_SWEEP_RESULT: &str = "onnx_sweep_result";
/// Effective parameter: intra-op threads per session in use (`default (N)`: ONNX Runtime's).
pub const PARAM_INTRA_OP_THREADS_CHOSEN: &str = "onnx_intra_op_threads";
/// Effective parameter: sessions (instances) in use.
pub const PARAM_INSTANCES: &str = "onnx_instances";
/// The `max_batch_size` given to a graph whose inputs and outputs all start with a dynamic
/// dimension, when its configuration names no tensors and sets no `max_batch_size`.
pub const AUTO_MAX_BATCH_SIZE: u32 = 32;

/// How the backend finds and configures ONNX Runtime.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OnnxOptions {
    /// Path of `libonnxruntime.so.*`; `None`: the `ORT_DYLIB_PATH` environment variable.
    pub library: Option<PathBuf>,
    /// Intra-op threads per session; 0 leaves ONNX Runtime's default (one per core), or, for a
    /// text encoder, lets the sweep choose.
    pub intra_op_threads: usize,
    /// Where optimised graphs are cached (default: beside the model when its folder is writable).
    pub cache: GraphCache,
}

/// The intra-op threads per session a loaded model runs on, from its effective parameter
/// [`PARAM_INTRA_OP_THREADS_CHOSEN`]: a count, or `default (N)` for ONNX Runtime's default of N
/// (one per core). `None` when the parameter is absent or unreadable.
pub fn intra_op_threads_in_use(config: &ModelConfig) -> Option<usize> {
    let v = config.parameter(PARAM_INTRA_OP_THREADS_CHOSEN)?.trim();
    v.parse().ok().or_else(|| {
        v.strip_prefix("default (")?
            .strip_suffix(')')?
            .trim()
            .parse()
            .ok()
    })
}

/// Loads an ONNX model from `dir`: a generic [`Model`] over the graph, or, when `dir` holds
/// `tokenizer.json` and the configuration names none of the graph's inputs, a sentence embedder
/// (see the module documentation for both, and for how the configuration is completed).
pub fn load(
    config: ModelConfig,
    dir: &Path,
    options: &OnnxOptions,
) -> Result<Arc<dyn Model>, Error> {
    let name = config.name.clone();
    let file = model_file(&config, dir)?;
    let threads = tune::explicit_threads(&config, options)?;
    let level = tune::requested_level(&config)?;
    let rt = runtime(options.library.as_deref()).map_err(|e| Error::load(&name, e))?;
    let mut prepared = tune::prepare(
        &rt,
        &name,
        &file,
        level,
        &options.cache,
        threads.unwrap_or(0),
    )?;
    let spec = session::Spec {
        file: &prepared.file,
        level: prepared.open_at,
        intra_op_threads: threads.unwrap_or(0),
        save_optimized: None,
        profile: None,
    };
    let first = match prepared.first.take() {
        Some(s) => s,
        None => session::open_session(&rt, &name, &spec)?,
    };
    let graph = Graph::of(&first);
    let text = dir.join("tokenizer.json").is_file()
        && !config
            .input
            .iter()
            .any(|t| graph.inputs.iter().any(|g| g.name == t.name));
    if text {
        prepared.first = Some(first);
        let (encoder, decisions) = tune::text_encoder(&rt, &config, dir, &file, options, prepared)?;
        let mut config = config;
        decisions.apply(&mut config);
        let embedder = crate::text::SentenceEmbedder::new(config, dir, encoder)?;
        return Ok(Arc::new(embedder));
    }
    let mut sessions = vec![first];
    if config.instance_count() > 1 {
        sessions.extend(open_sessions(
            &rt,
            &name,
            &spec,
            config.instance_count() - 1,
        )?);
    }
    let mut config = complete_config(config, &graph).map_err(|e| Error::load(&name, e))?;
    tracing::info!(model = %name, level = prepared.level.name(), cache = %prepared.cache_note, "ONNX graph");
    let mut decisions = tune::Decisions::default();
    decisions
        .params
        .insert(PARAM_OPTIMIZATION.into(), prepared.level.name().into());
    decisions.params.insert(
        PARAM_CHECK.into(),
        "not checked: a generic graph has no representative input".into(),
    );
    decisions
        .params
        .insert(PARAM_GRAPH_CACHE.into(), prepared.cache_note);
    decisions.apply(&mut config);
    Ok(Arc::new(OnnxModel::new(config, &graph, sessions)?))
}

/// The graph file of a model: `dir/model.onnx` or the parameter `model_filename`, which must be a
/// plain file name (no folders), so that a configuration cannot reach outside the model's folder.
pub(super) fn model_file(config: &ModelConfig, dir: &Path) -> Result<PathBuf, Error> {
    // Triton's `default_model_filename` first, then our parameter.
    let file = match config.parameter(PARAM_MODEL_FILENAME) {
        _ if !config.default_model_filename.is_empty() => config.default_model_filename.as_str(),
        None | Some("") => DEFAULT_MODEL_FILENAME,
        Some(f) => f,
    };
    let plain = Path::new(file).file_name().is_some_and(|n| n == file) && file != "..";
    if !plain {
        // The caller's config names a path outside the folder: INVALID_ARGUMENT, by name.
        return Err(Error::InvalidConfig {
            model: config.name.clone(),
            reason: format!(
                "parameter '{PARAM_MODEL_FILENAME}' is '{file}'; it must be a file name inside the \
                 model's folder"
            ),
        });
    }
    let path = dir.join(file);
    if !path.is_file() {
        return Err(Error::load(
            &config.name,
            format!(
                "no ONNX graph at '{}' (the model's folder must hold {DEFAULT_MODEL_FILENAME}, \
                 or parameter '{PARAM_MODEL_FILENAME}' must name the file)",
                path.display()
            ),
        ));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str) -> ModelConfig {
        ModelConfig {
            name: name.into(),
            ..ModelConfig::default()
        }
    }

    #[test]
    fn model_filename_must_stay_in_the_folder() {
        let mut c = named("m");
        for bad in ["../x.onnx", "/etc/passwd", "a/b.onnx", ".."] {
            c.parameters.insert(
                PARAM_MODEL_FILENAME.into(),
                crate::config::Parameter {
                    string_value: bad.into(),
                },
            );
            let e = model_file(&c, Path::new("/nonexistent")).unwrap_err();
            assert!(e.to_string().contains("file name inside"), "{bad}: {e}");
        }
    }
}
