//! The ONNX Runtime backend: any ONNX graph as a [`Model`], and ONNX text encoders
//! ([`OnnxEncoder`]) under the shared sentence-embedding pipeline ([`crate::text`]).
//!
//! # The runtime
//!
//! ONNX Runtime is not linked: `libonnxruntime.so` is loaded once per process, at the first model
//! load, from [`OnnxOptions::library`] (the server's `models.onnxruntime_library`) or else from the
//! `ORT_DYLIB_PATH` environment variable. The `onnxruntime` PyPI wheel carries a suitable library
//! under `site-packages/onnxruntime/capi/`. A missing or unloadable library fails the model's load
//! with a [`ModelError::Load`] that says how to fix it; it never panics, and a failed attempt does
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
//! little-endian bytes. BYTES (ONNX strings) is refused, at load for a graph that uses it and at
//! execution for a BYTES tensor.
//!
//! # A text encoder
//!
//! When the folder also holds `tokenizer.json` (the sentence-transformers layout) and the
//! configuration names none of the graph's inputs, [`load`] builds a
//! [`crate::text::SentenceEmbedder`] around an [`OnnxEncoder`] instead: inputs `input_ids`,
//! `attention_mask` and, when the graph has it, `token_type_ids`; output `last_hidden_state`, or
//! else the graph's first rank-3 output.

use std::borrow::Cow;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, TryLockError};

use bytes::Bytes;
use ort::environment::Environment;
use ort::logging::{LogLevel, LoggerFunction};
use ort::memory::Allocator;
use ort::session::{
    HasSelectedOutputs, OutputSelector, RunOptions, Session, SessionInputValue, SessionOutputs,
};
use ort::value::{
    DynTensor, DynTensorValueType, DynValue, TensorElementType, TensorRef, ValueType,
};

use crate::config::{ModelConfig, TensorConfig};
use crate::datatype::DataType;
use crate::error::{ModelError, TensorError};
use crate::model::Model;
use crate::tensor::{Tensor, TensorData};
use crate::text::{Encoder, TokenBatch};

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

const HOW_TO_FIX: &str = "set ORT_DYLIB_PATH (or models.onnxruntime_library) to libonnxruntime.so.* \
     — `pip install onnxruntime==1.32.0` puts it under site-packages/onnxruntime/capi/";

/// How the backend finds and configures ONNX Runtime.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OnnxOptions {
    /// Path of `libonnxruntime.so.*`; `None`: the `ORT_DYLIB_PATH` environment variable.
    pub library: Option<PathBuf>,
    /// Intra-op threads per session; 0 leaves ONNX Runtime's default (one per core).
    pub intra_op_threads: usize,
}

/// Why ONNX Runtime could not be made ready. The message says how to fix it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RuntimeError(String);

/// The ONNX Runtime library this process loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeInfo {
    /// The library's absolute path.
    pub library: PathBuf,
}

struct Runtime {
    env: Environment,
    library: PathBuf,
}

/// The process's one runtime; `None` until a load succeeds (a failed one leaves it `None`).
static RUNTIME: Mutex<Option<Arc<Runtime>>> = Mutex::new(None);

/// Loads ONNX Runtime if this process has not yet, from `library` or else `ORT_DYLIB_PATH`, and
/// says which library is in use. Safe to call any number of times, from any thread; never panics.
pub fn init_runtime(library: Option<&Path>) -> Result<RuntimeInfo, RuntimeError> {
    runtime(library).map(|rt| RuntimeInfo {
        library: rt.library.clone(),
    })
}

fn runtime(library: Option<&Path>) -> Result<Arc<Runtime>, RuntimeError> {
    let mut slot = RUNTIME.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(rt) = slot.as_ref() {
        if let Some(wanted) = library
            && std::path::absolute(wanted).ok().as_deref() != Some(rt.library.as_path())
        {
            tracing::warn!(
                loaded = %rt.library.display(),
                requested = %wanted.display(),
                "ONNX Runtime is already loaded from another library; keeping it"
            );
        }
        return Ok(Arc::clone(rt));
    }
    let path = match library {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => match std::env::var_os(LIBRARY_ENV) {
            Some(v) if !v.is_empty() => PathBuf::from(v),
            _ => {
                return Err(RuntimeError(format!(
                    "ONNX Runtime library not found: {HOW_TO_FIX}"
                )));
            }
        },
    };
    // An absolute path keeps `ort` from resolving it against the executable's folder (which it
    // does with `expect`).
    let path = std::path::absolute(&path).map_err(|e| {
        RuntimeError(format!(
            "ONNX Runtime library path '{}' is unusable ({e}): {HOW_TO_FIX}",
            path.display()
        ))
    })?;
    if !path.is_file() {
        return Err(RuntimeError(format!(
            "ONNX Runtime library not found at '{}': {HOW_TO_FIX}",
            path.display()
        )));
    }
    let built = catch_unwind(AssertUnwindSafe(|| build_environment(&path))).unwrap_or_else(|p| {
        Err(format!(
            "ONNX Runtime panicked while loading: {}",
            panic_message(p.as_ref())
        ))
    });
    let env = built.map_err(|reason| {
        RuntimeError(format!(
            "ONNX Runtime library at '{}' cannot be used: {reason}. It must be the shared \
             library of ONNX Runtime 1.{} or later; {HOW_TO_FIX}",
            path.display(),
            ort::MINOR_VERSION
        ))
    })?;
    tracing::info!(library = %path.display(), "ONNX Runtime loaded");
    let rt = Arc::new(Runtime { env, library: path });
    *slot = Some(Arc::clone(&rt));
    Ok(rt)
}

/// Loads the library and creates the process's environment (ONNX Runtime allows one).
fn build_environment(path: &Path) -> Result<Environment, String> {
    let builder = ort::init_from(path).map_err(|e| e.to_string())?;
    let logger: LoggerFunction = Arc::new(|level, category, id, location, message| match level {
        LogLevel::Verbose => {
            tracing::trace!(target: "ort", category, id, location, "{message}")
        }
        LogLevel::Info => tracing::debug!(target: "ort", category, id, location, "{message}"),
        LogLevel::Warning => tracing::warn!(target: "ort", category, id, location, "{message}"),
        LogLevel::Error | LogLevel::Fatal => {
            tracing::error!(target: "ort", category, id, location, "{message}")
        }
    });
    let env = builder
        .with_name("veraltheim")
        .with_telemetry(false)
        .with_logger(logger)
        .build()
        .map_err(|e| e.to_string())?;
    env.set_log_level(LogLevel::Warning);
    Ok(env)
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

/// Loads an ONNX model from `dir`: a generic [`Model`] over the graph, or, when `dir` holds
/// `tokenizer.json` and the configuration names none of the graph's inputs, a sentence embedder
/// (see the module documentation for both, and for how the configuration is completed).
pub fn load(
    config: ModelConfig,
    dir: &Path,
    options: &OnnxOptions,
) -> Result<Arc<dyn Model>, ModelError> {
    let name = config.name.clone();
    let file = model_file(&config, dir)?;
    let threads = config
        .parameter_u64(PARAM_INTRA_OP_THREADS, options.intra_op_threads as u64)
        .map_err(|e| ModelError::load(&name, e))?;
    let threads = usize::try_from(threads).map_err(|_| {
        ModelError::load(
            &name,
            format!("parameter '{PARAM_INTRA_OP_THREADS}' is too large"),
        )
    })?;
    let rt = runtime(options.library.as_deref()).map_err(|e| ModelError::load(&name, e))?;
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
    let config = complete_config(config, &graph).map_err(|e| ModelError::load(&name, e))?;
    Ok(Arc::new(OnnxModel::new(config, &graph, sessions)?))
}

/// The graph file of a model: `dir/model.onnx` or the parameter `model_filename`, which must be a
/// plain file name (no folders), so that a configuration cannot reach outside the model's folder.
fn model_file(config: &ModelConfig, dir: &Path) -> Result<PathBuf, ModelError> {
    // Triton's `default_model_filename` first, then our parameter.
    let file = match config.parameter(PARAM_MODEL_FILENAME) {
        _ if !config.default_model_filename.is_empty() => config.default_model_filename.as_str(),
        None | Some("") => DEFAULT_MODEL_FILENAME,
        Some(f) => f,
    };
    let plain = Path::new(file).file_name().is_some_and(|n| n == file) && file != "..";
    if !plain {
        return Err(ModelError::load(
            &config.name,
            format!(
                "parameter '{PARAM_MODEL_FILENAME}' is '{file}'; it must be a file name inside the \
                 model's folder"
            ),
        ));
    }
    let path = dir.join(file);
    if !path.is_file() {
        return Err(ModelError::load(
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

fn open_sessions(
    rt: &Runtime,
    model: &str,
    file: &Path,
    count: usize,
    intra_op_threads: usize,
) -> Result<Vec<Session>, ModelError> {
    let fail = |e: &dyn fmt::Display| {
        ModelError::load(
            model,
            format!("ONNX Runtime cannot open '{}': {e}", file.display()),
        )
    };
    let mut builder = Session::builder(&rt.env).map_err(|e| fail(&e))?;
    if intra_op_threads > 0 {
        builder = builder
            .with_intra_threads(intra_op_threads)
            .map_err(|e| fail(&e))?;
    }
    (0..count.max(1))
        .map(|_| builder.commit_from_file(file).map_err(|e| fail(&e)))
        .collect()
}

/// A graph input or output as ONNX Runtime describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct GraphTensor {
    name: String,
    /// `Err` describes a value this backend cannot move (a sequence, a map, an exotic type).
    datatype: Result<DataType, String>,
    /// Dimensions, -1 where dynamic.
    dims: Vec<i64>,
}

/// A graph's inputs and outputs, in graph order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Graph {
    inputs: Vec<GraphTensor>,
    outputs: Vec<GraphTensor>,
}

impl Graph {
    fn of(session: &Session) -> Graph {
        let describe = |o: &ort::value::Outlet| GraphTensor {
            name: o.name().to_string(),
            datatype: match o.dtype() {
                ValueType::Tensor { ty, .. } => datatype_of(*ty)
                    .ok_or_else(|| format!("element type {ty} has no KServe datatype")),
                other => Err(format!("{other:?} is not a tensor")),
            },
            dims: match o.dtype() {
                ValueType::Tensor { shape, .. } => shape.iter().map(|d| (*d).max(-1)).collect(),
                _ => Vec::new(),
            },
        };
        Graph {
            inputs: session.inputs().iter().map(describe).collect(),
            outputs: session.outputs().iter().map(describe).collect(),
        }
    }
}

/// ONNX element type → our datatype (`None`: none of ours matches).
fn datatype_of(ty: TensorElementType) -> Option<DataType> {
    Some(match ty {
        TensorElementType::Float32 => DataType::Fp32,
        TensorElementType::Float64 => DataType::Fp64,
        TensorElementType::Float16 => DataType::Fp16,
        TensorElementType::Bfloat16 => DataType::Bf16,
        TensorElementType::Int64 => DataType::Int64,
        TensorElementType::Int32 => DataType::Int32,
        TensorElementType::Int16 => DataType::Int16,
        TensorElementType::Int8 => DataType::Int8,
        TensorElementType::Uint64 => DataType::Uint64,
        TensorElementType::Uint32 => DataType::Uint32,
        TensorElementType::Uint16 => DataType::Uint16,
        TensorElementType::Uint8 => DataType::Uint8,
        TensorElementType::Bool => DataType::Bool,
        TensorElementType::String => DataType::Bytes,
        _ => return None,
    })
}

/// Our datatype → ONNX element type (`None` for BYTES, which this backend does not move).
fn element_type_of(datatype: DataType) -> Option<TensorElementType> {
    Some(match datatype {
        DataType::Fp32 => TensorElementType::Float32,
        DataType::Fp64 => TensorElementType::Float64,
        DataType::Fp16 => TensorElementType::Float16,
        DataType::Bf16 => TensorElementType::Bfloat16,
        DataType::Int64 => TensorElementType::Int64,
        DataType::Int32 => TensorElementType::Int32,
        DataType::Int16 => TensorElementType::Int16,
        DataType::Int8 => TensorElementType::Int8,
        DataType::Uint64 => TensorElementType::Uint64,
        DataType::Uint32 => TensorElementType::Uint32,
        DataType::Uint16 => TensorElementType::Uint16,
        DataType::Uint8 => TensorElementType::Uint8,
        DataType::Bool => TensorElementType::Bool,
        DataType::Bytes => return None,
    })
}

/// Completes and checks `config` against the graph (the rules are in the module documentation).
/// The error names the tensor at fault.
pub(crate) fn complete_config(
    mut config: ModelConfig,
    graph: &Graph,
) -> Result<ModelConfig, String> {
    for (kind, list) in [("input", &graph.inputs), ("output", &graph.outputs)] {
        for t in list {
            match &t.datatype {
                Err(why) => {
                    return Err(format!(
                        "the graph's {kind} '{}' cannot be served: {why}",
                        t.name
                    ));
                }
                Ok(DataType::Bytes)
                    if kind == "input"
                        || config.output.is_empty()
                        || config.output.iter().any(|c| c.name == t.name) =>
                {
                    return Err(format!(
                        "the graph's {kind} '{}' is a string tensor (BYTES); the ONNX Runtime \
                         backend moves only fixed-size types",
                        t.name
                    ));
                }
                Ok(_) => {}
            }
        }
    }
    if config.input.is_empty()
        && config.output.is_empty()
        && config.max_batch_size == 0
        && graph
            .inputs
            .iter()
            .chain(&graph.outputs)
            .all(|t| t.dims.first() == Some(&-1))
    {
        config.max_batch_size = AUTO_MAX_BATCH_SIZE;
    }
    let batching = config.batching();
    let fill = |list: &[GraphTensor]| -> Vec<TensorConfig> {
        list.iter()
            .map(|t| TensorConfig {
                name: t.name.clone(),
                data_type: t
                    .datatype
                    .as_ref()
                    .map(|d| d.config_name())
                    .unwrap_or_default(),
                dims: t.dims[usize::from(batching).min(t.dims.len())..].to_vec(),
                optional: false,
            })
            .collect()
    };
    if config.input.is_empty() {
        config.input = fill(&graph.inputs);
    }
    if config.output.is_empty() {
        config.output = fill(&graph.outputs);
    }
    for (kind, configured, in_graph) in [
        ("input", &config.input, &graph.inputs),
        ("output", &config.output, &graph.outputs),
    ] {
        for c in configured.iter() {
            check_tensor(kind, c, in_graph, batching, config.max_batch_size)?;
        }
    }
    if let Some(missing) = graph
        .inputs
        .iter()
        .find(|g| !config.input.iter().any(|c| c.name == g.name))
    {
        return Err(format!(
            "the graph's input '{}' is missing from the configuration (ONNX Runtime needs every \
             input)",
            missing.name
        ));
    }
    if config.platform.is_empty() && config.backend.is_empty() {
        config.platform = "onnxruntime_onnx".to_string();
        config.backend = "onnxruntime".to_string();
    }
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

fn check_tensor(
    kind: &str,
    c: &TensorConfig,
    graph: &[GraphTensor],
    batching: bool,
    max_batch_size: u32,
) -> Result<(), String> {
    let Some(g) = graph.iter().find(|g| g.name == c.name) else {
        let names: Vec<&str> = graph.iter().map(|g| g.name.as_str()).collect();
        return Err(format!(
            "{kind} '{}' is not in the graph (its {kind}s: {})",
            c.name,
            names.join(", ")
        ));
    };
    let configured = DataType::from_config_name(&c.data_type).map_err(|_| {
        format!(
            "{kind} '{}' has unknown data_type '{}'",
            c.name, c.data_type
        )
    })?;
    let actual = g
        .datatype
        .clone()
        .map_err(|why| format!("{kind} '{}': {why}", c.name))?;
    if configured != actual {
        return Err(format!(
            "{kind} '{}' is {} in the configuration but {} in the graph",
            c.name,
            configured.config_name(),
            actual.config_name()
        ));
    }
    let graph_dims = if batching {
        match g.dims.split_first() {
            Some((-1, rest)) => rest,
            Some((first, _)) => {
                return Err(format!(
                    "{kind} '{}' has a fixed first dimension {first} in the graph; with \
                     max_batch_size {max_batch_size} it must be dynamic (or set max_batch_size 0)",
                    c.name
                ));
            }
            None => {
                return Err(format!(
                    "{kind} '{}' is a scalar in the graph; with max_batch_size {max_batch_size} it \
                     needs a batch dimension (or set max_batch_size 0)",
                    c.name
                ));
            }
        }
    } else {
        &g.dims[..]
    };
    let compatible = graph_dims.len() == c.dims.len()
        && graph_dims
            .iter()
            .zip(&c.dims)
            .all(|(g, c)| *g == -1 || g == c);
    if !compatible {
        return Err(format!(
            "{kind} '{}' has dims {:?} in the configuration but {:?} in the graph{}",
            c.name,
            c.dims,
            graph_dims,
            if batching {
                " (without the batch dimension)"
            } else {
                ""
            }
        ));
    }
    Ok(())
}

/// The sessions of one model, one per instance, each taken by one batch at a time.
struct SessionPool {
    slots: Vec<Mutex<Slot>>,
    next: AtomicUsize,
}

struct Slot {
    session: Session,
    /// Selects the outputs to compute (ONNX Runtime prunes the rest of the graph).
    run_options: RunOptions<HasSelectedOutputs>,
}

impl SessionPool {
    fn new<'a>(
        model: &str,
        sessions: Vec<Session>,
        outputs: impl Iterator<Item = &'a str> + Clone,
    ) -> Result<SessionPool, ModelError> {
        let slots = sessions
            .into_iter()
            .map(|session| {
                let selector = outputs
                    .clone()
                    .fold(OutputSelector::no_default(), |s, name| s.with(name));
                let run_options = RunOptions::new()
                    .map_err(|e| ModelError::load(model, format!("ONNX Runtime: {e}")))?
                    .with_outputs(selector);
                Ok(Mutex::new(Slot {
                    session,
                    run_options,
                }))
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(SessionPool {
            slots,
            next: AtomicUsize::new(0),
        })
    }

    /// Runs `f` on a free session, or waits for one (starting from a rotating slot so that
    /// concurrent batches spread over the instances).
    fn with<R>(&self, f: impl FnOnce(&mut Slot) -> R) -> R {
        let n = self.slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        for i in 0..n {
            match self.slots[(start + i) % n].try_lock() {
                Ok(mut slot) => return f(&mut slot),
                // A panic while running leaves the session itself intact; keep using it.
                Err(TryLockError::Poisoned(p)) => return f(&mut p.into_inner()),
                Err(TryLockError::WouldBlock) => {}
            }
        }
        let mut slot = self.slots[start]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        f(&mut slot)
    }
}

/// A configured input or output and its ONNX element type.
struct Bound {
    name: String,
    datatype: DataType,
    element: TensorElementType,
}

/// A generic ONNX graph served as configured (see the module documentation).
pub struct OnnxModel {
    config: ModelConfig,
    inputs: Vec<Bound>,
    outputs: Vec<Bound>,
    pool: SessionPool,
}

impl OnnxModel {
    fn new(
        config: ModelConfig,
        graph: &Graph,
        sessions: Vec<Session>,
    ) -> Result<OnnxModel, ModelError> {
        let bind = |list: &[TensorConfig]| -> Result<Vec<Bound>, ModelError> {
            list.iter()
                .map(|t| {
                    let datatype = ModelConfig::datatype_of(t);
                    let element = element_type_of(datatype).ok_or_else(|| {
                        ModelError::load(&config.name, format!("'{}' is BYTES", t.name))
                    })?;
                    Ok(Bound {
                        name: t.name.clone(),
                        datatype,
                        element,
                    })
                })
                .collect()
        };
        let inputs = bind(&config.input)?;
        let outputs = bind(&config.output)?;
        debug_assert!(
            outputs
                .iter()
                .all(|o| graph.outputs.iter().any(|g| g.name == o.name))
        );
        let pool = SessionPool::new(
            &config.name,
            sessions,
            outputs.iter().map(|o| o.name.as_str()),
        )?;
        Ok(OnnxModel {
            config,
            inputs,
            outputs,
            pool,
        })
    }

    fn input_value(&self, t: &Tensor, bound: &Bound) -> Result<DynTensor, ModelError> {
        let incompatible = |reason: String| {
            ModelError::Tensor(TensorError::Incompatible {
                name: bound.name.clone(),
                reason,
            })
        };
        let TensorData::Fixed(raw) = &t.data else {
            return Err(incompatible(format!(
                "BYTES data cannot go to the ONNX Runtime backend, which takes only fixed-size \
                 types (this input is {})",
                bound.datatype
            )));
        };
        if t.datatype != bound.datatype {
            return Err(incompatible(format!(
                "the model takes {}, not {}",
                bound.datatype, t.datatype
            )));
        }
        let size = t.datatype.element_size().unwrap_or(1);
        let expected = t.element_count().checked_mul(size);
        if expected != Some(raw.len()) {
            return Err(incompatible(format!(
                "{} bytes of data for shape {:?} of {}",
                raw.len(),
                t.shape,
                t.datatype
            )));
        }
        let shape = t
            .shape
            .iter()
            .map(|&d| i64::try_from(d))
            .collect::<Result<Vec<i64>, _>>()
            .map_err(|_| incompatible(format!("shape {:?} is too large", t.shape)))?;
        let ort_err =
            |e: ort::Error| ModelError::execution(&self.config.name, format!("ONNX Runtime: {e}"));
        let mut value =
            DynTensor::new(&Allocator::default(), bound.element, shape).map_err(ort_err)?;
        if !raw.is_empty() {
            let dst = value.data_ptr_mut().cast::<u8>();
            if dst.is_null() {
                return Err(ModelError::execution(
                    &self.config.name,
                    format!("ONNX Runtime gave no buffer for input '{}'", bound.name),
                ));
            }
            // SAFETY: `value` is a CPU tensor of `bound.element` with `t.shape`, so its buffer
            // holds element_count × element size bytes, which is `raw.len()` (checked above); the
            // buffers are distinct allocations.
            unsafe { std::ptr::copy_nonoverlapping(raw.as_ptr(), dst, raw.len()) };
            if bound.datatype == DataType::Bool {
                // SAFETY: the same buffer, initialised just above; BOOL must be 0 or 1 in ONNX
                // Runtime (a C++ bool), while the wire allows any non-zero byte for true.
                let bools = unsafe { std::slice::from_raw_parts_mut(dst, raw.len()) };
                bools.iter_mut().for_each(|b| *b = u8::from(*b != 0));
            }
        }
        Ok(value)
    }
}

impl Model for OnnxModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn execute(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, ModelError> {
        let name = &self.config.name;
        if inputs.len() != self.inputs.len() {
            let expected: Vec<&str> = self.inputs.iter().map(|b| b.name.as_str()).collect();
            return Err(ModelError::execution(
                name,
                format!(
                    "expected {} inputs ({}), got {}",
                    expected.len(),
                    expected.join(", "),
                    inputs.len()
                ),
            ));
        }
        let rows = if self.config.batching() {
            let rows = inputs.first().map(Tensor::batch_size).unwrap_or(0);
            if let Some(t) = inputs.iter().find(|t| t.batch_size() != rows) {
                return Err(ModelError::execution(
                    name,
                    format!(
                        "input '{}' has {} rows, but the batch has {rows}",
                        t.name,
                        t.batch_size()
                    ),
                ));
            }
            if rows > self.config.max_batch_size as usize {
                return Err(ModelError::execution(
                    name,
                    format!(
                        "a batch of {rows} is more than max_batch_size {}",
                        self.config.max_batch_size
                    ),
                ));
            }
            Some(rows)
        } else {
            None
        };
        let mut values: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
            Vec::with_capacity(inputs.len());
        for (t, bound) in inputs.iter().zip(&self.inputs) {
            values.push((
                Cow::Borrowed(bound.name.as_str()),
                self.input_value(t, bound)?.into(),
            ));
        }
        self.pool.with(|slot| {
            let Slot {
                session,
                run_options,
            } = slot;
            let mut outputs = session
                .run_with_options(values, run_options)
                .map_err(|e| ModelError::execution(name, format!("ONNX Runtime: {e}")))?;
            self.outputs
                .iter()
                .map(|bound| {
                    let t = take_output(name, &mut outputs, bound)?;
                    if let Some(rows) = rows
                        && t.shape.first() != Some(&rows)
                    {
                        return Err(ModelError::execution(
                            name,
                            format!(
                                "output '{}' has shape {:?}, not {rows} rows like the batch",
                                bound.name, t.shape
                            ),
                        ));
                    }
                    Ok(t)
                })
                .collect()
        })
    }
}

/// Moves one output out of ONNX Runtime's results into our tensor (one copy of its bytes).
fn take_output(
    model: &str,
    outputs: &mut SessionOutputs<'_>,
    bound: &Bound,
) -> Result<Tensor, ModelError> {
    let fail =
        |reason: String| ModelError::execution(model, format!("output '{}': {reason}", bound.name));
    let value: DynValue = outputs
        .remove(&bound.name)
        .ok_or_else(|| fail("ONNX Runtime returned no such output".into()))?;
    let tensor = value
        .downcast::<DynTensorValueType>()
        .map_err(|e| fail(format!("not a tensor ({e})")))?;
    let ValueType::Tensor { ty, shape, .. } = tensor.dtype() else {
        return Err(fail("not a tensor".into()));
    };
    if *ty != bound.element {
        return Err(fail(format!(
            "ONNX Runtime returned {ty}, the configuration says {}",
            bound.datatype
        )));
    }
    let dims = shape
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<usize>, _>>()
        .map_err(|_| fail(format!("shape {shape} has a negative dimension")))?;
    let len = ty
        .byte_size(shape.num_elements())
        .ok_or_else(|| fail(format!("{ty} has no fixed size")))?;
    if !tensor.memory_info().is_cpu_accessible() {
        return Err(fail("the data is not in CPU memory".into()));
    }
    let data = if len == 0 {
        Bytes::new()
    } else {
        let src = tensor.data_ptr().cast::<u8>();
        if src.is_null() {
            return Err(fail("ONNX Runtime gave no data".into()));
        }
        // SAFETY: a CPU-accessible, contiguous tensor of `ty` and `shape` holds `len` bytes at
        // `src`; `tensor` keeps them alive for the copy.
        Bytes::copy_from_slice(unsafe { std::slice::from_raw_parts(src, len) })
    };
    Ok(Tensor {
        name: bound.name.clone(),
        datatype: bound.datatype,
        shape: dims,
        data: TensorData::Fixed(data),
    })
}

/// The transformer of a text-embedding model on ONNX Runtime: `input_ids`, `attention_mask` and
/// (when the graph has it) `token_type_ids` in, as INT64 or INT32 `[batch, seq]`;
/// `last_hidden_state` (or else the graph's first rank-3 output) out, FP32 `[batch, seq, hidden]`.
pub struct OnnxEncoder {
    model: String,
    pool: SessionPool,
    /// Whether the graph takes `token_type_ids`.
    token_type_ids: bool,
    /// The element type of the id inputs (INT64 or INT32).
    ids: TensorElementType,
    output: String,
    hidden_size: usize,
}

impl OnnxEncoder {
    /// Opens `dir/model.onnx` (or the `model_filename` parameter's file) as an encoder, one session
    /// per instance of `config`; `options` as for [`load`]. `config` is only read here.
    pub fn new(
        config: &ModelConfig,
        dir: &Path,
        options: &OnnxOptions,
    ) -> Result<OnnxEncoder, ModelError> {
        let name = &config.name;
        let file = model_file(config, dir)?;
        let threads = config
            .parameter_u64(PARAM_INTRA_OP_THREADS, options.intra_op_threads as u64)
            .map_err(|e| ModelError::load(name, e))?;
        let rt = runtime(options.library.as_deref()).map_err(|e| ModelError::load(name, e))?;
        let sessions = open_sessions(
            &rt,
            name,
            &file,
            config.instance_count(),
            usize::try_from(threads).unwrap_or(0),
        )?;
        let graph = Graph::of(&sessions[0]);
        OnnxEncoder::from_sessions(name, dir, sessions, &graph)
    }

    fn from_sessions(
        model: &str,
        dir: &Path,
        sessions: Vec<Session>,
        graph: &Graph,
    ) -> Result<OnnxEncoder, ModelError> {
        let fail = |reason: String| ModelError::load(model, format!("as a text encoder: {reason}"));
        let input = |n: &str| graph.inputs.iter().find(|g| g.name == n);
        let mut ids = None;
        for n in ["input_ids", "attention_mask", "token_type_ids"] {
            let Some(g) = input(n) else {
                if n == "token_type_ids" {
                    continue;
                }
                return Err(fail(format!("the graph has no input '{n}'")));
            };
            let ty = match g.datatype {
                Ok(DataType::Int64) => TensorElementType::Int64,
                Ok(DataType::Int32) => TensorElementType::Int32,
                ref other => {
                    return Err(fail(format!(
                        "input '{n}' is {other:?}; it must be INT64 or INT32"
                    )));
                }
            };
            if g.dims.len() != 2 {
                return Err(fail(format!(
                    "input '{n}' has dims {:?}; it must be [batch, sequence]",
                    g.dims
                )));
            }
            if *ids.get_or_insert(ty) != ty {
                return Err(fail("the id inputs differ in element type".into()));
            }
        }
        if let Some(other) = graph
            .inputs
            .iter()
            .find(|g| !["input_ids", "attention_mask", "token_type_ids"].contains(&g.name.as_str()))
        {
            return Err(fail(format!(
                "the graph also needs input '{}', which a tokenizer does not give",
                other.name
            )));
        }
        let output = graph
            .outputs
            .iter()
            .find(|g| g.name == "last_hidden_state")
            .or_else(|| graph.outputs.iter().find(|g| g.dims.len() == 3))
            .ok_or_else(|| {
                fail("the graph has no output 'last_hidden_state' nor any rank-3 output".into())
            })?;
        if output.datatype != Ok(DataType::Fp32) || output.dims.len() != 3 {
            return Err(fail(format!(
                "output '{}' must be FP32 [batch, sequence, hidden]; it is {:?} {:?}",
                output.name, output.datatype, output.dims
            )));
        }
        let hidden_size = match output.dims[2] {
            d if d > 0 => d as usize,
            _ => hidden_size_from_config(dir).ok_or_else(|| {
                fail(format!(
                    "output '{}' has a dynamic hidden size and {}/config.json gives no hidden_size",
                    output.name,
                    dir.display()
                ))
            })?,
        };
        let pool = SessionPool::new(model, sessions, std::iter::once(output.name.as_str()))?;
        Ok(OnnxEncoder {
            model: model.to_string(),
            pool,
            token_type_ids: input("token_type_ids").is_some(),
            ids: ids.unwrap_or(TensorElementType::Int64),
            output: output.name.clone(),
            hidden_size,
        })
    }

    /// One `[batch, seq]` id input as an ONNX Runtime value; INT64 data is lent, not copied.
    fn ids_value<'a>(
        &self,
        values: &'a [i64],
        batch: &TokenBatch,
    ) -> Result<SessionInputValue<'a>, ModelError> {
        let shape = vec![batch.batch, batch.seq];
        let err = |e: ort::Error| ModelError::execution(&self.model, format!("ONNX Runtime: {e}"));
        if values.len() != batch.batch * batch.seq {
            return Err(ModelError::execution(
                &self.model,
                format!(
                    "token batch holds {} ids for [{}, {}]",
                    values.len(),
                    batch.batch,
                    batch.seq
                ),
            ));
        }
        Ok(match self.ids {
            TensorElementType::Int32 => {
                let narrowed = values
                    .iter()
                    .map(|&v| i32::try_from(v))
                    .collect::<Result<Vec<i32>, _>>()
                    .map_err(|_| {
                        ModelError::execution(&self.model, "a token id does not fit INT32")
                    })?;
                ort::value::Tensor::from_array((shape, narrowed))
                    .map_err(err)?
                    .into()
            }
            _ => TensorRef::from_array_view((shape, values))
                .map_err(err)?
                .into(),
        })
    }
}

/// `hidden_size` from a Hugging Face `config.json`, if there is one.
fn hidden_size_from_config(dir: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json.get("hidden_size")?
        .as_u64()
        .and_then(|v| usize::try_from(v).ok())
}

impl Encoder for OnnxEncoder {
    fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    fn encode(&self, batch: &TokenBatch) -> Result<Vec<f32>, ModelError> {
        let mut values: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = vec![
            ("input_ids".into(), self.ids_value(&batch.input_ids, batch)?),
            (
                "attention_mask".into(),
                self.ids_value(&batch.attention_mask, batch)?,
            ),
        ];
        if self.token_type_ids {
            values.push((
                "token_type_ids".into(),
                self.ids_value(&batch.token_type_ids, batch)?,
            ));
        }
        let fail = |reason: String| ModelError::execution(&self.model, reason);
        self.pool.with(|slot| {
            let Slot {
                session,
                run_options,
            } = slot;
            let outputs = session
                .run_with_options(values, run_options)
                .map_err(|e| fail(format!("ONNX Runtime: {e}")))?;
            let value = outputs
                .get(&self.output)
                .ok_or_else(|| fail(format!("ONNX Runtime returned no '{}'", self.output)))?;
            let (shape, data) = value
                .try_extract_tensor::<f32>()
                .map_err(|e| fail(format!("output '{}': {e}", self.output)))?;
            let want = [batch.batch, batch.seq, self.hidden_size].map(|d| d as i64);
            if shape[..] != want[..] {
                return Err(fail(format!(
                    "output '{}' has shape {shape}, expected {want:?}",
                    self.output
                )));
            }
            Ok(data.to_vec())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, datatype: DataType, dims: &[i64]) -> GraphTensor {
        GraphTensor {
            name: name.into(),
            datatype: Ok(datatype),
            dims: dims.to_vec(),
        }
    }

    fn add_mul() -> Graph {
        Graph {
            inputs: vec![
                t("A", DataType::Fp32, &[-1, 4]),
                t("B", DataType::Fp32, &[-1, 4]),
            ],
            outputs: vec![
                t("SUM", DataType::Fp32, &[-1, 4]),
                t("PRODUCT", DataType::Fp32, &[-1, 4]),
            ],
        }
    }

    fn named(name: &str) -> ModelConfig {
        ModelConfig {
            name: name.into(),
            ..ModelConfig::default()
        }
    }

    #[test]
    fn empty_config_is_filled_and_batches_when_all_first_dims_are_dynamic() {
        let c = complete_config(named("m"), &add_mul()).unwrap();
        assert_eq!(c.max_batch_size, AUTO_MAX_BATCH_SIZE);
        assert_eq!(c.input.len(), 2);
        assert_eq!(c.input[0].name, "A");
        assert_eq!(c.input[0].data_type, "TYPE_FP32");
        assert_eq!(c.input[0].dims, vec![4]);
        assert_eq!(c.output[1].name, "PRODUCT");
        assert_eq!(c.full_shape(&c.output[1]), vec![-1, 4]);
        assert_eq!(c.backend, "onnxruntime");
    }

    #[test]
    fn fixed_first_dim_does_not_batch() {
        let g = Graph {
            inputs: vec![t("X", DataType::Fp32, &[2, 3])],
            outputs: vec![t("Y", DataType::Fp32, &[-1, 3])],
        };
        let c = complete_config(named("m"), &g).unwrap();
        assert_eq!(c.max_batch_size, 0);
        assert_eq!(c.input[0].dims, vec![2, 3]);
        assert_eq!(c.output[0].dims, vec![-1, 3]);
    }

    #[test]
    fn explicit_max_batch_size_is_kept_and_needs_dynamic_first_dims() {
        let mut c = named("m");
        c.max_batch_size = 8;
        let done = complete_config(c.clone(), &add_mul()).unwrap();
        assert_eq!(done.max_batch_size, 8);
        assert_eq!(done.input[1].dims, vec![4]);
        let g = Graph {
            inputs: vec![t("X", DataType::Fp32, &[2, 3])],
            outputs: vec![t("Y", DataType::Fp32, &[2, 3])],
        };
        let e = complete_config(c, &g).unwrap_err();
        assert!(
            e.contains("'X'") && e.contains("fixed first dimension 2"),
            "{e}"
        );
    }

    #[test]
    fn listed_tensors_are_checked_by_name_type_and_dims() {
        let base = |input: &str| {
            ModelConfig::from_json(&format!(
                r#"{{"name":"m","max_batch_size":4,"input":[{input}]}}"#
            ))
            .unwrap()
        };
        let ok = base(
            r#"{"name":"A","data_type":"TYPE_FP32","dims":[4]},{"name":"B","data_type":"TYPE_FP32","dims":[4]}"#,
        );
        let done = complete_config(ok, &add_mul()).unwrap();
        assert_eq!(done.output.len(), 2, "outputs filled from the graph");

        // A size where the graph is dynamic is fine; a dynamic one where it is fixed is not.
        let dynamic = Graph {
            inputs: vec![t("X", DataType::Fp32, &[-1, -1])],
            outputs: vec![t("Y", DataType::Fp32, &[-1, -1])],
        };
        let fixed = base(r#"{"name":"X","data_type":"TYPE_FP32","dims":[7]}"#);
        assert_eq!(
            complete_config(fixed, &dynamic).unwrap().input[0].dims,
            vec![7]
        );
        let e = complete_config(
            base(
                r#"{"name":"A","data_type":"TYPE_FP32","dims":[4]},{"name":"B","data_type":"TYPE_FP32","dims":[-1]}"#,
            ),
            &add_mul(),
        )
        .unwrap_err();
        assert!(
            e.contains("'B'") && e.contains("[-1]") && e.contains("[4]"),
            "{e}"
        );

        let e = complete_config(
            base(r#"{"name":"C","data_type":"TYPE_FP32","dims":[4]}"#),
            &add_mul(),
        )
        .unwrap_err();
        assert!(e.contains("'C'") && e.contains("A, B"), "{e}");

        let e = complete_config(
            base(
                r#"{"name":"A","data_type":"TYPE_INT64","dims":[4]},{"name":"B","data_type":"TYPE_FP32","dims":[4]}"#,
            ),
            &add_mul(),
        )
        .unwrap_err();
        assert!(
            e.contains("'A'") && e.contains("TYPE_INT64") && e.contains("TYPE_FP32"),
            "{e}"
        );

        let e = complete_config(
            base(
                r#"{"name":"A","data_type":"TYPE_FP32","dims":[5]},{"name":"B","data_type":"TYPE_FP32","dims":[4]}"#,
            ),
            &add_mul(),
        )
        .unwrap_err();
        assert!(e.contains("'A'") && e.contains("[5]"), "{e}");

        let e = complete_config(
            base(r#"{"name":"A","data_type":"TYPE_FP32","dims":[4]}"#),
            &add_mul(),
        )
        .unwrap_err();
        assert!(e.contains("'B'") && e.contains("missing"), "{e}");
    }

    #[test]
    fn string_and_unsupported_graph_tensors_are_refused_by_name() {
        let g = Graph {
            inputs: vec![t("S", DataType::Bytes, &[-1])],
            outputs: vec![t("T", DataType::Fp32, &[-1])],
        };
        let e = complete_config(named("m"), &g).unwrap_err();
        assert!(e.contains("'S'") && e.contains("BYTES"), "{e}");
        let g = Graph {
            inputs: vec![GraphTensor {
                name: "Q".into(),
                datatype: Err("element type c64 has no KServe datatype".into()),
                dims: vec![-1],
            }],
            outputs: vec![t("T", DataType::Fp32, &[-1])],
        };
        let e = complete_config(named("m"), &g).unwrap_err();
        assert!(e.contains("'Q'") && e.contains("c64"), "{e}");
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

    #[test]
    fn element_types_round_trip() {
        for d in DataType::ALL {
            match element_type_of(d) {
                Some(e) => assert_eq!(datatype_of(e), Some(d)),
                None => assert_eq!(d, DataType::Bytes),
            }
        }
    }
}
