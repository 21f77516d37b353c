//! The process's one ONNX Runtime: `libonnxruntime.so` loaded at the first model load (see the
//! backend's documentation in [`super`]), its environment, and its log routed to `tracing`.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use ort::environment::Environment;
use ort::logging::{LogLevel, LoggerFunction};

use super::LIBRARY_ENV;
use crate::error::Error;

const HOW_TO_FIX: &str = "set ORT_DYLIB_PATH (or models.onnxruntime_library) to libonnxruntime.so.* \
     — `pip install onnxruntime==1.32.0` puts it under site-packages/onnxruntime/capi/";

/// The ONNX Runtime library this process loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeInfo {
    /// The library's absolute path.
    pub library: PathBuf,
}

pub(super) struct Runtime {
    pub(super) env: Environment,
    library: PathBuf,
}

/// The process's one runtime; `None` until a load succeeds (a failed one leaves it `None`).
static RUNTIME: Mutex<Option<Arc<Runtime>>> = Mutex::new(None);

/// Loads ONNX Runtime if this process has not yet, from `library` or else `ORT_DYLIB_PATH`, and
/// says which library is in use. Safe to call any number of times, from any thread; never panics.
pub fn init_runtime(library: Option<&Path>) -> Result<RuntimeInfo, Error> {
    runtime(library).map(|rt| RuntimeInfo {
        library: rt.library.clone(),
    })
}

pub(super) fn runtime(library: Option<&Path>) -> Result<Arc<Runtime>, Error> {
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
                return Err(Error::Runtime(format!(
                    "ONNX Runtime library not found: {HOW_TO_FIX}"
                )));
            }
        },
    };
    // An absolute path keeps `ort` from resolving it against the executable's folder (which it
    // does with `expect`).
    let path = std::path::absolute(&path).map_err(|e| {
        Error::Runtime(format!(
            "ONNX Runtime library path '{}' is unusable ({e}): {HOW_TO_FIX}",
            path.display()
        ))
    })?;
    if !path.is_file() {
        return Err(Error::Runtime(format!(
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
        Error::Runtime(format!(
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
