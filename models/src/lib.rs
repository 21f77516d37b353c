//! Models: what a model is and how it computes. Tensors and their datatypes, the Triton-style
//! model configuration, request validation against it, the [`Model`] trait that every backend
//! implements, and the built-in backends (`identity`, `cost`, `fault`).
//!
//! Invariants: this crate knows nothing of gRPC, queues or batching policy. A [`Model`] is called
//! with a whole batch (inputs concatenated along the first dimension) on whatever thread the caller
//! chooses; it never blocks on I/O after loading.

pub mod allocator;
pub mod backend;
pub mod builtin;
#[cfg(feature = "candle")]
pub mod candle_bert;
pub mod config;
pub mod datatype;
pub mod error;
pub mod model;
#[cfg(feature = "onnx")]
pub mod onnx;
pub mod repository;
pub mod state;
pub mod tensor;
pub mod text;
pub mod validate;
pub mod warmup;

pub use config::ModelConfig;
pub use datatype::DataType;
pub use error::{ConfigError, InvalidRequest, ModelError, TensorError};
pub use model::Model;
pub use state::ModelState;
pub use tensor::{Tensor, TensorData};
