//! Which backend builds a model: the configuration's `backend` (or Triton's `platform`) names it.
//!
//! | `backend`      | `platform`          | files in the version folder                               |
//! |----------------|---------------------|-----------------------------------------------------------|
//! | `builtin`      |                     | none (`identity`, `cost`, `fault`; `parameters.builtin` picks one for another name) |
//! | `candle`       |                     | sentence-transformers layout: `config.json`, `model.safetensors`, `tokenizer.json`, `1_Pooling/` |
//! | `onnxruntime`  | `onnxruntime_onnx`  | `model.onnx` (or `default_model_filename`); plus `tokenizer.json` etc. for a text embedder |

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::allocator::{DeviceId, Placement};
use crate::builtin;
use crate::config::ModelConfig;
use crate::error::Error;
use crate::model::Model;

/// Process-wide settings the backends need.
#[derive(Clone, Debug, Default)]
pub struct BackendOptions {
    /// `libonnxruntime.so`; `ORT_DYLIB_PATH` when unset.
    pub onnxruntime_library: Option<PathBuf>,
    /// ONNX Runtime intra-op threads per session (0: its default, or a text encoder's sweep).
    pub intra_op_threads: usize,
    /// Where ONNX Runtime's optimised graphs are cached when a model's folder is not writable
    /// (the server's `<data_dir>/onnx-cache`); `None`: only beside the model.
    pub onnx_cache_dir: Option<PathBuf>,
    /// Bounds on what a configuration may ask for (the built-in `cost` model's compute).
    pub limits: crate::limits::Limits,
    /// The GPUs are simulated (`--simulate-gpus`): a built-in model placed on one (by
    /// `instance_group` `KIND_GPU`) is built there, so that placement, budgets and eviction on
    /// GPUs can be exercised on a machine without any. Built-ins compute on the CPU and claim the
    /// memory they are told (`memory_bytes`) wherever they are placed, and a simulated GPU has no
    /// hardware for them to miss. Every other backend is still refused on a GPU it cannot use.
    pub simulated_gpus: bool,
}

/// The backend a configuration names, normalised (`onnxruntime_onnx` platform → `onnxruntime`).
pub fn backend_name(config: &ModelConfig) -> &str {
    match (config.backend.as_str(), config.platform.as_str()) {
        ("", "onnxruntime_onnx") | ("onnxruntime" | "onnx" | "ort", _) => "onnxruntime",
        ("", "") => builtin::BACKEND,
        (b, _) if !b.is_empty() => b,
        (_, p) => p,
    }
}

/// The backends this build has.
pub fn available() -> Vec<&'static str> {
    let mut v = vec![builtin::BACKEND];
    if cfg!(feature = "candle") {
        v.push("candle");
    }
    if cfg!(feature = "onnx") {
        v.push("onnxruntime");
    }
    v
}

/// Whether this build can run the configuration's backend on a GPU (candle with the `cuda`
/// feature). The allocator only offers GPUs to models that can use them.
pub fn supports_gpu(config: &ModelConfig) -> bool {
    backend_name(config) == "candle" && cfg!(feature = "cuda")
}

/// Whether the configuration's backend says what its models hold ([`Model::memory_bytes`]):
/// built-ins claim a size, candle counts its tensors' bytes. Others (ONNX Runtime, whose
/// allocations are its own) are measured by whoever loads them.
pub fn reports_memory(config: &ModelConfig) -> bool {
    let backend = backend_name(config);
    backend == builtin::BACKEND || backend == "candle"
}

/// Where a configuration allows its model to run (Triton's `instance_group.kind` and
/// `gpus`).
pub fn placement(config: &ModelConfig) -> Placement {
    let kinds: Vec<&str> = config
        .instance_group
        .iter()
        .map(|g| g.kind.as_str())
        .collect();
    let gpus: Vec<u32> = config
        .instance_group
        .iter()
        .flat_map(|g| g.gpus.iter())
        .filter_map(|g| u32::try_from(*g).ok())
        .collect();
    // KIND_GPU on a backend without GPU execution stays gpu-only: the load is refused with a
    // message naming the constraint rather than silently run on the CPU.
    let mut placement = if kinds.contains(&"KIND_GPU") {
        Placement::gpu_only()
    } else if kinds.contains(&"KIND_CPU") || !supports_gpu(config) {
        Placement::cpu_only()
    } else {
        Placement::default()
    };
    if !gpus.is_empty() {
        placement.gpu_ids = Some(gpus);
    }
    placement
}

/// Builds a model. `dir` is the serving version's folder (None for built-in models). Runs file
/// I/O and may take seconds: call it off the async threads.
pub fn instantiate(
    config: ModelConfig,
    dir: Option<&Path>,
    device: DeviceId,
    options: &BackendOptions,
) -> Result<Arc<dyn Model>, Error> {
    let name = config.name.clone();
    let backend = backend_name(&config).to_string();
    // A backend switched by the caller's config (a built-in given `backend: onnxruntime`) is
    // the caller's error, named by its field: INVALID_ARGUMENT, not a failed build.
    let need_dir = || {
        dir.ok_or_else(|| Error::InvalidConfig {
            model: name.clone(),
            reason: format!("backend '{backend}' needs a model folder; a built-in model has none"),
        })
    };
    // A model is never quietly run somewhere other than where it was placed (a built-in on a
    // simulated GPU runs nowhere else: there is no GPU).
    let simulated_builtin = options.simulated_gpus && backend == builtin::BACKEND;
    if let DeviceId::Gpu(g) = device
        && !supports_gpu(&config)
        && !simulated_builtin
    {
        let why = match backend.as_str() {
            b if b == builtin::BACKEND => format!("built-in models run on the CPU, not gpu{g}"),
            "onnxruntime" => format!(
                "the onnxruntime backend runs on the CPU only (its CUDA execution provider is \
                 not wired), not gpu{g}: use instance_group kind KIND_CPU, or the candle backend"
            ),
            _ => format!(
                "placed on gpu{g} but this build has no GPU execution (build with --features cuda)"
            ),
        };
        return Err(Error::load(&name, why));
    }
    match backend.as_str() {
        b if b == builtin::BACKEND => {
            // The caller's own configuration errors keep their kind (INVALID_ARGUMENT naming the
            // field); anything else is a model that cannot be built.
            builtin::instantiate_with(config, &options.limits).map_err(|e| match e.kind() {
                crate::ErrorKind::InvalidArgument => e,
                _ => Error::load(&name, e),
            })
        }
        #[cfg(feature = "candle")]
        "candle" => {
            let gpu = match device {
                DeviceId::Cpu => None,
                DeviceId::Gpu(g) => Some(g as usize),
            };
            crate::candle_bert::load(config, need_dir()?, gpu)
        }
        #[cfg(feature = "onnx")]
        "onnxruntime" => {
            let onnx = crate::onnx::OnnxOptions {
                library: options.onnxruntime_library.clone(),
                intra_op_threads: options.intra_op_threads,
                cache: crate::onnx::GraphCache::Beside(options.onnx_cache_dir.clone()),
            };
            crate::onnx::load(config, need_dir()?, &onnx)
        }
        other => {
            let _ = (&options, need_dir);
            Err(Error::InvalidConfig {
                model: name.clone(),
                reason: format!(
                    "backend '{other}' is not available in this build (available: {})",
                    available().join(", ")
                ),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_normalise() {
        let mut c = ModelConfig::default();
        assert_eq!(backend_name(&c), "builtin");
        c.platform = "onnxruntime_onnx".into();
        assert_eq!(backend_name(&c), "onnxruntime");
        c.backend = "candle".into();
        assert_eq!(backend_name(&c), "candle");
    }

    #[test]
    fn unknown_backends_and_missing_folders_are_load_errors() {
        let mut c = builtin::config("identity").unwrap();
        c.backend = "tensorrt".into();
        let e = instantiate(c, None, DeviceId::Cpu, &BackendOptions::default())
            .err()
            .unwrap();
        assert!(e.to_string().contains("'tensorrt' is not available"), "{e}");
        assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument);
        // A built-in switched to a backend that needs files: the caller's config, by name.
        let mut c = builtin::config("identity").unwrap();
        c.backend = "onnxruntime".into();
        if let Err(e) = instantiate(c, None, DeviceId::Cpu, &BackendOptions::default()) {
            assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument, "{e}");
            assert!(e.to_string().contains("backend"), "{e}");
        }
        let c = builtin::config("identity").unwrap();
        let e = instantiate(
            c.clone(),
            None,
            DeviceId::Gpu(0),
            &BackendOptions::default(),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("CPU"), "{e}");
        assert!(instantiate(c.clone(), None, DeviceId::Cpu, &BackendOptions::default()).is_ok());
        // On simulated GPUs a built-in may be placed on one (there is no hardware to miss).
        let simulated = BackendOptions {
            simulated_gpus: true,
            ..BackendOptions::default()
        };
        assert!(instantiate(c, None, DeviceId::Gpu(0), &simulated).is_ok());
    }

    #[test]
    fn an_onnxruntime_model_placed_on_a_gpu_is_refused_not_run_on_the_cpu() {
        // With or without `cuda`: ONNX Runtime's CUDA execution provider is not wired, so a
        // GPU placement must fail by name rather than load and quietly compute on the CPU.
        let c = ModelConfig {
            name: "embedder".into(),
            platform: "onnxruntime_onnx".into(),
            ..Default::default()
        };
        let dir = std::env::temp_dir();
        let e = instantiate(c, Some(&dir), DeviceId::Gpu(1), &BackendOptions::default())
            .err()
            .unwrap();
        let msg = e.to_string();
        assert!(msg.contains("embedder"), "{msg}");
        assert!(msg.contains("gpu1") && msg.contains("KIND_CPU"), "{msg}");
        // Simulated GPUs do not change that: only built-ins may sit on one.
        let simulated = BackendOptions {
            simulated_gpus: true,
            ..BackendOptions::default()
        };
        let c = ModelConfig {
            name: "embedder".into(),
            platform: "onnxruntime_onnx".into(),
            ..Default::default()
        };
        let e = instantiate(c, Some(&dir), DeviceId::Gpu(1), &simulated)
            .err()
            .unwrap();
        assert!(e.to_string().contains("KIND_CPU"), "{e}");
    }
}
