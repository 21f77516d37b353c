//! The serving layer's one error type. Every refusal names the model and what is wrong; its
//! [`ErrorKind`] is what a protocol maps to its own status (gRPC codes, HTTP statuses), in one
//! place per protocol.

use std::time::Duration;

use thiserror::Error;
use veraltheim_fastpath::InferError;
use veraltheim_models::ModelState;

/// What kind of failure an [`Error`] is, for mapping to a protocol's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request or the caller's configuration is wrong.
    InvalidArgument,
    /// No such model or version.
    NotFound,
    /// The model exists but cannot serve now (loading, unloading, failed).
    Unavailable,
    /// No room: a full queue, a memory budget, the load slots.
    ResourceExhausted,
    /// The caller's deadline, or the load time-out, passed.
    DeadlineExceeded,
    /// The server's fault: a backend failed or panicked.
    Internal,
}

#[derive(Debug, Error)]
pub enum Error {
    /// No model of that name; an empty name is the caller's mistake (INVALID_ARGUMENT).
    #[error("{}", not_found(.0))]
    NotFound(String),
    #[error("model '{name}' has no version '{version}' (it serves version {serving})")]
    NoSuchVersion {
        name: String,
        version: String,
        serving: u64,
    },
    #[error("model '{name}' is not ready (state {state}{})", if reason.is_empty() { String::new() } else { format!(": {reason}") })]
    NotReady {
        name: String,
        state: ModelState,
        reason: String,
    },
    #[error("failed to load model '{name}': {source}")]
    BadConfig {
        name: String,
        source: veraltheim_models::Error,
    },
    #[error("model '{name}' failed to load: {reason}")]
    LoadFailed { name: String, reason: String },
    #[error("cannot load model '{name}': {reason}")]
    NoRoom { name: String, reason: String },
    #[error("model '{name}' did not load within {}s (models.load_timeout_seconds)", timeout.as_secs())]
    LoadTimeout { name: String, timeout: Duration },
    #[error("model '{name}' waited {}s for a load slot; {max} loads run at once (models.max_concurrent_loads)", waited.as_secs())]
    LoadSlots {
        name: String,
        max: usize,
        waited: Duration,
    },
    /// A request that does not fit the model's configuration.
    #[error("{0}")]
    Invalid(String),
    /// The fast path's answer.
    #[error(transparent)]
    Infer(#[from] InferError),
    #[error("model '{0}' did not answer within the request's deadline")]
    NoAnswerInTime(String),
    #[error("model '{0}' dropped the request without an answer")]
    Dropped(String),
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NotFound(name) if name.is_empty() => ErrorKind::InvalidArgument,
            Error::NotFound(_) | Error::NoSuchVersion { .. } => ErrorKind::NotFound,
            Error::NotReady { .. } => ErrorKind::Unavailable,
            Error::BadConfig { .. } | Error::Invalid(_) => ErrorKind::InvalidArgument,
            Error::LoadFailed { .. } | Error::Dropped(_) => ErrorKind::Internal,
            Error::NoRoom { .. } | Error::LoadSlots { .. } => ErrorKind::ResourceExhausted,
            Error::LoadTimeout { .. } | Error::NoAnswerInTime(_) => ErrorKind::DeadlineExceeded,
            Error::Infer(e) => match e {
                InferError::QueueFull { .. } => ErrorKind::ResourceExhausted,
                InferError::DeadlineExceeded { .. } => ErrorKind::DeadlineExceeded,
                InferError::InvalidRequest { .. } => ErrorKind::InvalidArgument,
                InferError::Unavailable { .. } => ErrorKind::Unavailable,
                InferError::Backend { .. } | InferError::Panicked { .. } => ErrorKind::Internal,
            },
        }
    }

    /// A load refused or failed with `e`: the caller's own configuration (a bad parameter value,
    /// a path outside the model folder, a limit) is [`Error::BadConfig`] (INVALID_ARGUMENT,
    /// naming the field); anything else is [`Error::LoadFailed`].
    pub fn from_model(name: &str, e: veraltheim_models::Error) -> Self {
        match e.kind() {
            veraltheim_models::ErrorKind::InvalidArgument => Error::BadConfig {
                name: name.to_string(),
                source: e,
            },
            _ => Error::LoadFailed {
                name: name.to_string(),
                reason: e.to_string(),
            },
        }
    }

    /// Whether the caller should retry after a short back-off (a full queue).
    pub fn is_queue_full(&self) -> bool {
        matches!(self, Error::Infer(InferError::QueueFull { .. }))
    }
}

fn not_found(name: &str) -> String {
    if name.is_empty() {
        "the request names no model (its model name is empty)".into()
    } else {
        format!("unknown model '{name}'; `veraltheim models` lists the models this server knows")
    }
}
