//! The one error type of this crate. Each variant names what is wrong so that the API layer can
//! pass the message on verbatim, and [`Error::kind`] says what kind of failure it is, so that an
//! upper layer maps kinds to its statuses in one place instead of matching every variant.

use std::path::PathBuf;

use thiserror::Error;

use crate::datatype::{DataType, UnknownDatatype};
use crate::device::{DeviceId, DeviceReport, HolderState, format_bytes};

/// What kind of failure an [`Error`] is: the classes an upper layer turns into statuses (they
/// follow gRPC's codes of the same names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The caller gave something malformed: a tensor, a request, a configuration.
    InvalidArgument,
    /// What was asked for does not exist: a model folder, a built-in, memory a model holds.
    NotFound,
    /// It already exists: a key that already holds memory.
    AlreadyExists,
    /// The system is not in a state that allows it: a model's files or ONNX Runtime are missing
    /// or unusable, no allowed device is present, the model is being evicted.
    FailedPrecondition,
    /// No room: no device can hold the model, even after evicting idle ones.
    ResourceExhausted,
    /// A model failed while computing, or returned outputs that break the tensor invariant.
    Internal,
}

impl ErrorKind {
    /// The kind as gRPC spells the code of the same meaning (`INVALID_ARGUMENT`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "INVALID_ARGUMENT",
            ErrorKind::NotFound => "NOT_FOUND",
            ErrorKind::AlreadyExists => "ALREADY_EXISTS",
            ErrorKind::FailedPrecondition => "FAILED_PRECONDITION",
            ErrorKind::ResourceExhausted => "RESOURCE_EXHAUSTED",
            ErrorKind::Internal => "INTERNAL",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything that can go wrong in this crate: tensors, configurations, requests, models,
/// the allocator, the model repository and ONNX Runtime.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Error {
    // --- tensors -------------------------------------------------------------------------
    #[error("unknown datatype '{0}'")]
    UnknownDatatype(String),
    #[error("input '{name}': dimension {index} is {value}; dimensions must be non-negative")]
    NegativeDimension {
        name: String,
        index: usize,
        value: i64,
    },
    #[error("input '{name}': shape {shape:?} has too many elements")]
    ShapeOverflow { name: String, shape: Vec<i64> },
    #[error(
        "input '{name}': {actual} bytes of data, but shape {shape:?} of {datatype} needs {expected}"
    )]
    ByteLength {
        name: String,
        datatype: DataType,
        shape: Vec<usize>,
        expected: usize,
        actual: usize,
    },
    #[error("input '{name}': {actual} elements of data, but shape {shape:?} needs {expected}")]
    ElementCount {
        name: String,
        shape: Vec<usize>,
        expected: usize,
        actual: usize,
    },
    #[error("input '{name}': malformed BYTES data: {reason}")]
    MalformedBytes { name: String, reason: String },
    #[error("tensor '{name}': {reason}")]
    Incompatible { name: String, reason: String },

    // --- model configurations ------------------------------------------------------------
    #[error("model config is not valid JSON for a model configuration: {0}")]
    ConfigJson(String),
    #[error("model config for '{model}': {reason}")]
    InvalidConfig { model: String, reason: String },
    #[error("model '{0}' has no backend that Veraltheim knows")]
    UnknownModel(String),

    // --- requests ------------------------------------------------------------------------
    /// A request that does not match its model's inputs or outputs.
    #[error("{0}")]
    InvalidRequest(String),

    // --- models --------------------------------------------------------------------------
    /// A failure inside a model's execution, or outputs that break the tensor invariant.
    #[error("model '{model}' failed: {reason}")]
    Execution { model: String, reason: String },
    /// A model that cannot be built from its files (missing or malformed files, a runtime library
    /// that is not there). The reason says what is wrong and, where it can, how to fix it.
    #[error("model '{model}' cannot be loaded: {reason}")]
    Load { model: String, reason: String },
    /// ONNX Runtime could not be made ready. The message says how to fix it.
    #[error("{0}")]
    Runtime(String),

    // --- the allocator -------------------------------------------------------------------
    /// No allowed device can hold the model, even after evicting every idle model.
    #[error(
        "model '{model}' needs {} but no device can hold it: {}",
        format_bytes(*needed_bytes),
        join_reports(devices)
    )]
    NoRoom {
        /// The model's key.
        model: String,
        /// The bytes it needs.
        needed_bytes: u64,
        /// Every device it was allowed on (in id order: cpu, gpu0, …), with what holds it.
        devices: Vec<DeviceReport>,
    },
    /// The measured size of a loaded model does not fit on its device, even after evicting every
    /// idle model there. Its reservation stays; the caller unloads it and releases it.
    #[error(
        "model '{model}' takes {} once loaded (estimated {}) but {} cannot hold it: {device}",
        format_bytes(*measured_bytes),
        format_bytes(*estimated_bytes),
        device.device
    )]
    NoRoomAfterLoad {
        /// The model's key.
        model: String,
        /// The size it was admitted with.
        estimated_bytes: u64,
        /// The size it takes.
        measured_bytes: u64,
        /// Its device, with what else holds it (boxed: it keeps the error small).
        device: Box<DeviceReport>,
    },
    /// The model's placement allows no device that this machine has.
    #[error(
        "model '{model}' cannot be placed: it allows {allowed} but this machine has {}",
        join_devices(present)
    )]
    NoAllowedDevice {
        /// The model's key.
        model: String,
        /// The allowed devices in words.
        allowed: String,
        /// The devices present (with a non-zero capacity).
        present: Vec<DeviceId>,
    },
    /// The key already holds memory; a new version is admitted under a distinct key.
    #[error(
        "model '{model}' already holds memory on {device} ({state}); load a new version under a distinct key"
    )]
    AlreadyHeld {
        /// The model's key.
        model: String,
        /// Where it is.
        device: DeviceId,
        /// Where it stands.
        state: HolderState,
    },
    /// Fewer devices than an external holder asks for can hold it, even after evicting every
    /// idle model there.
    #[error(
        "'{key}' needs {size} on each of {wanted} device(s) but {found} can hold it now: {}",
        join_reports(devices)
    )]
    NoRoomExternal {
        /// The holder's key (`job:<id>`).
        key: String,
        /// What it takes on each device, in words.
        size: String,
        /// How many devices it asks for.
        wanted: u32,
        /// How many could hold it.
        found: u32,
        /// Every device it was allowed on (in id order), with what holds it.
        devices: Vec<DeviceReport>,
    },
    /// The key already holds an external reservation; it is released first.
    #[error("'{0}' already holds a reservation; release it first")]
    AlreadyReserved(String),
    /// The key holds no memory (never admitted, or released).
    #[error("model '{0}' holds no memory")]
    NotHeld(String),
    /// The model is being evicted and cannot be charged.
    #[error("model '{0}' is being evicted")]
    Evicting(String),

    // --- the model repository ------------------------------------------------------------
    /// The repository folder cannot be read.
    #[error("model repository {path}: {reason}")]
    Repository { path: PathBuf, reason: String },
    #[error("model '{name}' is not in the repository {root} (no folder {root}/{name})")]
    NotInRepository { name: String, root: PathBuf },
    /// A model folder whose configuration or versions cannot be used.
    #[error("model '{name}' ({path}): {reason}")]
    InvalidModelFolder {
        name: String,
        path: PathBuf,
        reason: String,
    },
    #[error("import from {src}: {reason}")]
    Import { src: PathBuf, reason: String },
    /// An ONNX graph the int8 rewrite cannot take (`onnx::quantize`).
    #[error("cannot quantise the graph: {0}")]
    Quantize(String),
}

impl Error {
    /// What kind of failure this is (see [`ErrorKind`]).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::UnknownDatatype(_)
            | Error::NegativeDimension { .. }
            | Error::ShapeOverflow { .. }
            | Error::ByteLength { .. }
            | Error::ElementCount { .. }
            | Error::MalformedBytes { .. }
            | Error::Incompatible { .. }
            | Error::ConfigJson(_)
            | Error::InvalidConfig { .. }
            | Error::InvalidRequest(_)
            | Error::InvalidModelFolder { .. }
            | Error::Import { .. }
            | Error::Quantize(_) => ErrorKind::InvalidArgument,
            Error::UnknownModel(_) | Error::NotHeld(_) | Error::NotInRepository { .. } => {
                ErrorKind::NotFound
            }
            Error::AlreadyHeld { .. } | Error::AlreadyReserved(_) => ErrorKind::AlreadyExists,
            Error::Load { .. }
            | Error::Runtime(_)
            | Error::NoAllowedDevice { .. }
            | Error::Evicting(_)
            | Error::Repository { .. } => ErrorKind::FailedPrecondition,
            Error::NoRoom { .. } | Error::NoRoomAfterLoad { .. } | Error::NoRoomExternal { .. } => {
                ErrorKind::ResourceExhausted
            }
            Error::Execution { .. } => ErrorKind::Internal,
        }
    }

    /// A model that cannot be built: [`Error::Load`].
    pub fn load(model: &str, reason: impl std::fmt::Display) -> Self {
        Error::Load {
            model: model.to_string(),
            reason: reason.to_string(),
        }
    }

    /// A failure while computing: [`Error::Execution`].
    pub fn execution(model: &str, reason: impl std::fmt::Display) -> Self {
        Error::Execution {
            model: model.to_string(),
            reason: reason.to_string(),
        }
    }

    /// An output `model` computed that is not a valid tensor (its bytes disagree with its shape,
    /// say): an [`Error::Execution`] naming the model, whatever the tensor error was, since the
    /// fault is the backend's and not the caller's.
    pub fn bad_output(model: &str, error: Error) -> Self {
        Error::execution(model, format!("it returned an invalid output: {error}"))
    }
}

fn join_reports(devices: &[DeviceReport]) -> String {
    let parts: Vec<String> = devices.iter().map(ToString::to_string).collect();
    parts.join("; ")
}

fn join_devices(devices: &[DeviceId]) -> String {
    if devices.is_empty() {
        return "no devices".to_string();
    }
    let parts: Vec<String> = devices.iter().map(ToString::to_string).collect();
    parts.join(", ")
}

impl From<UnknownDatatype> for Error {
    fn from(e: UnknownDatatype) -> Self {
        Error::UnknownDatatype(e.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_stays_small() {
        // Results of this type travel through every call; a large error slows the Ok path too
        // (and clippy's result_large_err refuses it in callers' enums).
        assert!(
            std::mem::size_of::<Error>() <= 80,
            "{}",
            std::mem::size_of::<Error>()
        );
    }

    #[test]
    fn kinds_follow_who_is_at_fault() {
        let bad_input = Error::ByteLength {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape: vec![2],
            expected: 8,
            actual: 7,
        };
        assert_eq!(bad_input.kind(), ErrorKind::InvalidArgument);
        // The same fault in a backend's output is the backend's, not the caller's.
        let output = Error::bad_output("m", bad_input);
        assert_eq!(output.kind(), ErrorKind::Internal);
        assert!(
            output.to_string().starts_with("model 'm' failed:"),
            "{output}"
        );
        assert!(output.to_string().contains("7 bytes of data"), "{output}");
        assert_eq!(
            Error::load("m", "no file").kind(),
            ErrorKind::FailedPrecondition
        );
        assert_eq!(Error::NotHeld("m".into()).kind(), ErrorKind::NotFound);
        let no_room = Error::NoRoom {
            model: "m".into(),
            needed_bytes: 1,
            devices: Vec::new(),
        };
        assert_eq!(no_room.kind(), ErrorKind::ResourceExhausted);
        assert_eq!(
            ErrorKind::ResourceExhausted.to_string(),
            "RESOURCE_EXHAUSTED"
        );
    }
}
