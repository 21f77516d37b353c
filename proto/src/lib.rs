//! The wire contracts of Veraltheim, generated from `protos/`: `inference` is the KServe v2 /
//! Triton gRPC protocol (compatible with the stock `tritonclient`), `veraltheim::v1` is our own
//! API. This crate holds no logic; conversions live with the code that needs them.

#![allow(clippy::all, clippy::pedantic)]

/// The KServe v2 / Triton inference protocol (`package inference`).
pub mod inference {
    tonic::include_proto!("inference");
}

/// Veraltheim's own API (`package veraltheim.v1`).
pub mod veraltheim {
    pub mod v1 {
        tonic::include_proto!("veraltheim.v1");
    }
}

pub use veraltheim::v1;

/// Every file above as an encoded `google.protobuf.FileDescriptorSet`: the services, methods and
/// messages of both APIs, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));
