//! `veraltheim-load`: the end-to-end load generator (see `src/bin/veraltheim-load.rs` and
//! `veraltheim-load --help`). Load is KServe `ModelInfer` over tonic; the baselines are measured
//! in the same run: a bare tonic echo server (the gRPC ceiling) and the model in-process (the
//! compute ceiling). Slow-path modes sit beside it: `jobs` (durable submissions per second,
//! against the job store in-process with and without group commit; with `--cluster-nodes N`,
//! through N coordinators on one PostgreSQL against one redb node), `restart` (the slow path's
//! restart time with many jobs in the store) and `failover` (a cluster's time to a new scheduler
//! leader and to the lost node's jobs moved on, after a kill -9 of the leader). `text` measures
//! a sentence embedder served against the same model in-process, against the server with
//! batching off and against the FLOP ceiling of the machine ([`ceiling`]). `cosched` runs
//! online inference with a latency objective beside a batch inference job and a CPU-bound
//! command job (issue 17); both draw their sentences from [`sentences`].

pub mod args;
pub mod ceiling;
pub mod client;
pub mod compute;
pub mod coordinator;
pub mod cosched;
pub mod cpu;
pub mod echo;
pub mod failover;
pub mod http;
pub mod jobs;
pub mod overload;
pub mod pg;
pub mod report;
pub mod restart;
pub mod schedule;
pub mod sentences;
pub mod suite;
pub mod text;
