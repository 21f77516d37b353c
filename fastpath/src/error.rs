use std::time::Duration;

use thiserror::Error;

/// Why a request got no result.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum InferError {
    #[error(
        "model '{model}' queue is full ({capacity} requests waiting); retry after a short backoff"
    )]
    QueueFull { model: String, capacity: usize },
    #[error("request to model '{model}' expired after waiting {waited:?} in the queue")]
    DeadlineExceeded { model: String, waited: Duration },
    #[error("model '{model}' is unavailable: {reason}")]
    Unavailable { model: String, reason: String },
    #[error("request to model '{model}' is invalid: {reason}")]
    InvalidRequest { model: String, reason: String },
    #[error("model '{model}' failed: {message}")]
    Backend { model: String, message: String },
    #[error("model '{model}' panicked while executing the batch: {message}")]
    Panicked { model: String, message: String },
}
