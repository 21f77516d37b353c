//! Errors of this crate. Each names what is wrong so that the API layer can pass it on verbatim.

use thiserror::Error;

/// A tensor that cannot be built or does not fit where it is used.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TensorError {
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
        datatype: String,
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
}

/// A model configuration that cannot be used.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ConfigError {
    #[error("model config is not valid JSON for a model configuration: {0}")]
    Json(String),
    #[error("model config for '{model}': {reason}")]
    Invalid { model: String, reason: String },
    #[error("model '{0}' has no backend that Veraltheim knows")]
    UnknownModel(String),
}

/// A failure inside a model's execution.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ModelError {
    #[error("model '{model}' failed: {reason}")]
    Execution { model: String, reason: String },
    #[error(transparent)]
    Tensor(#[from] TensorError),
    /// A model that cannot be built from its files (missing or malformed files, a runtime library
    /// that is not there). The reason says what is wrong and, where it can, how to fix it.
    #[error("model '{model}' cannot be loaded: {reason}")]
    Load { model: String, reason: String },
}

impl ModelError {
    pub fn load(model: &str, reason: impl std::fmt::Display) -> Self {
        ModelError::Load {
            model: model.to_string(),
            reason: reason.to_string(),
        }
    }

    pub fn execution(model: &str, reason: impl std::fmt::Display) -> Self {
        ModelError::Execution {
            model: model.to_string(),
            reason: reason.to_string(),
        }
    }
}

/// A request that does not match its model's inputs or outputs.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{0}")]
pub struct InvalidRequest(pub String);
