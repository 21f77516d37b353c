//! `veraltheim-load`: the end-to-end load generator (see `src/bin/veraltheim-load.rs` and
//! `veraltheim-load --help`). Load is KServe `ModelInfer` over tonic; the baselines are measured
//! in the same run: a bare tonic echo server (the gRPC ceiling) and the model in-process (the
//! compute ceiling).

pub mod args;
pub mod client;
pub mod compute;
pub mod coordinator;
pub mod cpu;
pub mod echo;
pub mod report;
pub mod schedule;
pub mod suite;
