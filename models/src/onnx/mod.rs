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
mod model;
mod runtime;
mod session;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::ModelConfig;
use crate::error::Error;
use crate::model::Model;

pub use encoder::OnnxEncoder;
pub use model::OnnxModel;
pub use runtime::{RuntimeInfo, init_runtime};

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
/// The `max_batch_size` given to a graph whose inputs and outputs all start with a dynamic
/// dimension, when its configuration names no tensors and sets no `max_batch_size`.
pub const AUTO_MAX_BATCH_SIZE: u32 = 32;

/// How the backend finds and configures ONNX Runtime.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OnnxOptions {
    /// Path of `libonnxruntime.so.*`; `None`: the `ORT_DYLIB_PATH` environment variable.
    pub library: Option<PathBuf>,
    /// Intra-op threads per session; 0 leaves ONNX Runtime's default (one per core).
    pub intra_op_threads: usize,
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
    let threads = config
        .parameter_u64(PARAM_INTRA_OP_THREADS, options.intra_op_threads as u64)
        .map_err(|e| Error::load(&name, e))?;
    let threads = usize::try_from(threads).map_err(|_| {
        Error::load(
            &name,
            format!("parameter '{PARAM_INTRA_OP_THREADS}' is too large"),
        )
    })?;
    let rt = runtime(options.library.as_deref()).map_err(|e| Error::load(&name, e))?;
    let sessions = open_sessions(&rt, &name, &file, config.instance_count(), threads)?;
    let graph = Graph::of(&sessions[0]);
    let text = dir.join("tokenizer.json").is_file()
        && !config
            .input
            .iter()
            .any(|t| graph.inputs.iter().any(|g| g.name == t.name));
    if text {
        let encoder = OnnxEncoder::from_sessions(&name, dir, sessions, &graph)?;
        let embedder = crate::text::SentenceEmbedder::new(config, dir, encoder)?;
        return Ok(Arc::new(embedder));
    }
    let config = complete_config(config, &graph).map_err(|e| Error::load(&name, e))?;
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
