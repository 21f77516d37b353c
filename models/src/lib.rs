//! Models: what a model is and how it computes. Tensors and their datatypes, the Triton-style
//! model configuration (and the repository it is read from), request validation against it, the
//! [`Model`] trait that every backend implements, and the backends: built-in (`identity`, `cost`,
//! `fault`), candle BERT sentence embedders (feature `candle`) and ONNX Runtime (feature `onnx`),
//! the latter two sharing the sentence-embedding pipeline of [`text`]. Also the device memory
//! allocator (budgets, LRU eviction, pins, load states) that decides where a model may load.
//!
//! Invariants: this crate knows nothing of gRPC (it does not depend on tonic; the descriptor it
//! reads `config.pbtxt` with is compiled by its `build.rs`), queues or batching policy. A
//! [`Model`] is called with a whole batch (inputs concatenated along the first dimension) on
//! whatever thread the caller chooses; it never blocks on I/O after loading. Every fallible public
//! function returns the one [`Error`], whose [`ErrorKind`] tells an upper layer which status it is.

pub mod allocator;
pub mod backend;
pub mod builtin;
#[cfg(feature = "candle")]
pub mod candle_bert;
pub mod config;
pub mod datatype;
pub mod device;
pub mod error;
pub mod limits;
pub mod model;
#[cfg(feature = "onnx")]
pub mod onnx;
pub mod repository;
pub mod schema;
pub mod state;
pub mod tensor;
pub mod text;
pub mod validate;
pub mod warmup;

pub use config::ModelConfig;
pub use datatype::DataType;
pub use error::{Error, ErrorKind};
pub use limits::Limits;
pub use model::{Model, TokenCount};
pub use state::ModelState;
pub use tensor::{Tensor, TensorData};

/// Entry points for the fuzz targets (`fuzz/fuzz_targets/`): arbitrary bytes into the parsers of
/// model configurations, which must refuse, never panic or allocate without bound.
#[doc(hidden)]
pub mod fuzz {
    /// A model configuration in JSON, read whole and applied as an override on a built-in's.
    pub fn config_json(data: &[u8]) {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        if let Ok(config) = crate::config::ModelConfig::from_json(text) {
            let _ = config.validate_declared();
            let _ = crate::limits::Limits::default().check_config(&config, 2);
        }
        if let Ok(base) = crate::builtin::config("cost")
            && let Ok(merged) = base.with_override(text)
        {
            let _ = crate::limits::Limits::default().check_config(&merged, 2);
        }
    }

    /// A Triton `config.pbtxt`.
    pub fn config_pbtxt(data: &[u8]) {
        if let Ok(text) = std::str::from_utf8(data) {
            let _ = crate::repository::config_from_pbtxt(text);
        }
    }
}
