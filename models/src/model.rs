//! The contract between a backend and whoever executes it.

use crate::config::ModelConfig;
use crate::error::ModelError;
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

    fn execute(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, ModelError>;
}
