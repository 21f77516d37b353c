use std::sync::Arc;

/// The threads that run model code: a rayon pool shared by every model, so that compute is
/// bounded by the pool size however many models are loaded.
#[derive(Clone)]
pub struct ExecutionPool {
    pool: Arc<rayon::ThreadPool>,
}

impl ExecutionPool {
    /// `threads == 0` means one per available core.
    pub fn new(threads: usize) -> Result<Self, rayon::ThreadPoolBuildError> {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("veraltheim-exec-{i}"))
            .build()?;
        Ok(ExecutionPool {
            pool: Arc::new(pool),
        })
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    pub(crate) fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        self.pool.spawn(job);
    }
}
