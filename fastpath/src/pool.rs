use std::sync::Arc;

/// The threads that run model code: a rayon pool shared by every model, so that compute is
/// bounded by the pool size however many models are loaded.
///
/// A job that panics is contained: the pool has a panic handler, so a panic that escapes a job
/// is logged instead of aborting the process (rayon's default for a pool without a handler).
/// The worker's jobs also catch their own panics, to answer their callers and restart the model's
/// worker (`worker.rs`); the handler is the net under that.
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
            .panic_handler(|panic| {
                tracing::error!(
                    panic = %panic_message(&panic),
                    "an execution-pool job panicked; the pool carries on"
                );
            })
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

/// The message a panic carried, for logs and answers.
pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::ExecutionPool;

    #[test]
    fn a_panicking_job_leaves_the_process_and_the_pool_running() {
        let pool = ExecutionPool::new(1).unwrap();
        // Without a panic handler rayon aborts the process here, and the test binary with it.
        pool.spawn(|| panic!("a job outside any catch_unwind"));
        let (tx, rx) = mpsc::channel();
        pool.spawn(move || tx.send(42).unwrap());
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(42));
    }
}
