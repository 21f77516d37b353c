//! The contract between a backend and whoever executes it.

use crate::config::ModelConfig;
use crate::error::Error;
use crate::tensor::Tensor;

/// A loaded model, ready to compute.
///
/// `execute` receives one tensor per configured input, in configuration order, each holding the
/// whole batch (requests concatenated along the first dimension when the model batches). It
/// returns one tensor per configured output, in configuration order, with as many rows as the
/// batch. It runs on an execution-pool thread and may take as long as the compute takes; it must
/// not block on I/O. A panic is contained by the caller and fails only this batch.
pub trait Model: Send + Sync + 'static {
    fn config(&self) -> &ModelConfig;

    fn execute(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, Error>;

    /// A cheap check of one request's inputs before it is queued (it runs on an async thread:
    /// a scan, no compute), for what the backend cannot take although the configuration allows
    /// it. A refusal (the reason, naming the input) fails that request alone with
    /// INVALID_ARGUMENT, instead of the whole batch it would have joined.
    fn check_request(&self, _inputs: &[Tensor]) -> Result<(), String> {
        Ok(())
    }

    /// The memory the loaded model holds, when the backend knows it. `None` lets the loader
    /// measure it (the process's resident memory growth during the load).
    fn memory_bytes(&self) -> Option<u64> {
        None
    }

    /// For text models with a tokenizer: the tokens of one request as the model will see them
    /// (after truncation, special tokens included), counted by its own tokenizer when the
    /// request arrives. `None`: the model has no tokens (the batcher then batches it without
    /// regard to length). A refusal (the reason, naming the input) fails that request alone.
    /// Tokenizes: tens of µs per sentence, so the caller runs large requests off its async
    /// threads.
    fn request_tokens(&self, _inputs: &[Tensor]) -> Option<Result<TokenCount, String>> {
        None
    }

    /// For text models with a tokenizer: the tokens each text costs the model (after
    /// truncation, special tokens included), counted by the model's own tokenizer. `None`: the
    /// model has no tokenizer. Tokenizes, so it belongs on a blocking thread, not an async one.
    fn count_tokens(&self, _texts: &[&str]) -> Option<Result<Vec<usize>, Error>> {
        None
    }
}

/// The tokens of one request of a text model: its longest row, which the whole batch it joins is
/// padded to at least, and the real tokens of all its rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenCount {
    pub longest: usize,
    pub total: usize,
}
