//! Where model workers' batcher loops run. The manager builds a worker and hands it to its
//! [`WorkerHost`]; the coordinator's host runs it as a child of the supervision tree's
//! FastPathProcessor (so a panicking batcher is restarted and counted), tests and tools run it on
//! a task of its own ([`Detached`]). The host is given to [`ModelManager::new`]: the manager
//! never learns about the tree, and nothing is attached after construction.
//!
//! [`ModelManager::new`]: crate::ModelManager::new

use std::sync::Arc;

use futures::future::BoxFuture;
use veraltheim_fastpath::ModelWorker;

/// Runs and stops model workers' batcher loops. `child` is the worker's unique name
/// (`model:<name>#<generation>`).
pub trait WorkerHost: Send + Sync + 'static {
    /// Starts running `worker`'s loop; returns once it runs (or is queued to run).
    fn start<'a>(&'a self, child: &'a str, worker: Arc<ModelWorker>) -> BoxFuture<'a, ()>;

    /// Forgets a worker that has been stopped (drained); its loop has ended or ends now.
    fn stop<'a>(&'a self, child: &'a str) -> BoxFuture<'a, ()>;
}

/// Runs each worker's loop on a task of its own, restarted in place after a panic
/// ([`ModelWorker::run_detached`]). For tests and tools without a supervision tree.
#[derive(Clone, Copy, Debug, Default)]
pub struct Detached;

impl WorkerHost for Detached {
    fn start<'a>(&'a self, _child: &'a str, worker: Arc<ModelWorker>) -> BoxFuture<'a, ()> {
        worker.run_detached();
        Box::pin(async {})
    }

    fn stop<'a>(&'a self, _child: &'a str) -> BoxFuture<'a, ()> {
        // A stopped worker's detached loop ends by itself.
        Box::pin(async {})
    }
}
