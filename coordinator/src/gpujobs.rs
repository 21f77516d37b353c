//! GPU jobs and GPU models under one memory budget: the slow path's
//! [`GpuReservations`] over the model manager, so that a local job that asks for GPUs holds its
//! memory in the model allocator (key `job:<id>`), placed and evicting by the same rules as a
//! model load (see `veraltheim_serving`'s manager and the allocator's documentation). The
//! runner of local jobs gets it (`jobs.rs`); a Kubernetes job's GPUs are the cluster's.

use std::sync::Arc;

use veraltheim_models::allocator::{DeviceId, ExternalSize, format_bytes};
use veraltheim_serving::ModelManager;
use veraltheim_slowpath::{GpuGrant, GpuReservations};

/// [`GpuReservations`] over the node's [`ModelManager`].
pub struct ManagerGpus {
    models: Arc<ModelManager>,
}

impl ManagerGpus {
    pub fn new(models: Arc<ModelManager>) -> Self {
        ManagerGpus { models }
    }

    /// The GPUs that take work now (a lost one has no capacity) and their budgets.
    fn budgets(&self) -> Vec<(u32, u64)> {
        self.models
            .memory()
            .into_iter()
            .filter_map(|d| match d.device {
                DeviceId::Gpu(id) if d.capacity_bytes > 0 => Some((id, d.budget_bytes)),
                _ => None,
            })
            .collect()
    }
}

/// What a job takes on each GPU: its bytes, or the whole GPU when it said none.
fn size(bytes_per_gpu: u64) -> ExternalSize {
    if bytes_per_gpu == 0 {
        ExternalSize::WholeDevice
    } else {
        ExternalSize::Bytes(bytes_per_gpu)
    }
}

impl GpuReservations for ManagerGpus {
    /// Refuses a job asking for more GPUs than this node has, or for more memory on each than
    /// the GPU budgets it would need hold even empty.
    fn check(&self, gpus: u32, bytes_per_gpu: u64) -> Result<(), String> {
        let budgets = self.budgets();
        let large_enough = budgets
            .iter()
            .filter(|(_, budget)| *budget >= bytes_per_gpu)
            .count();
        if large_enough >= gpus as usize {
            return Ok(());
        }
        let listed: Vec<String> = budgets
            .iter()
            .map(|(id, budget)| format!("gpu{id} {}", format_bytes(*budget)))
            .collect();
        Err(format!(
            "gpu memory {} on each of {gpus} GPU(s), but {large_enough} GPU budget(s) here are that large ({}; models.gpu_memory_reserve_bytes is kept off each)",
            format_bytes(bytes_per_gpu),
            if listed.is_empty() {
                "no GPU".to_string()
            } else {
                listed.join(", ")
            }
        ))
    }

    fn reserve(&self, job_id: &str, gpus: u32, bytes_per_gpu: u64) -> Result<GpuGrant, String> {
        let given = self
            .models
            .reserve_job_gpus(job_id, gpus, size(bytes_per_gpu))
            .map_err(|e| format!("waiting for GPU memory: {e}"))?;
        if !given.evicted.is_empty() {
            tracing::info!(job = job_id, evicted = ?given.evicted, "a GPU job evicts idle models");
        }
        let evictions = (!given.evicted.is_empty()).then(|| {
            let models = self.models.clone();
            let job = job_id.to_owned();
            let evicted = given.evicted;
            Box::pin(async move { models.unload_evicted(&evicted, &job).await })
                as futures::future::BoxFuture<'static, ()>
        });
        Ok(GpuGrant {
            gpus: given.gpus,
            evictions,
        })
    }

    fn release(&self, job_id: &str) {
        self.models.release_job_gpus(job_id);
    }

    fn gpus_of(&self, job_id: &str) -> Vec<u32> {
        self.models.job_gpus(job_id)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use veraltheim_fastpath::ExecutionPool;
    use veraltheim_models::ModelState;
    use veraltheim_models::allocator::Budget;
    use veraltheim_models::backend::BackendOptions;
    use veraltheim_serving::{ManagerDeps, ManagerOptions};

    use super::*;

    const GIB: u64 = 1 << 30;

    /// A model manager with two simulated GPUs of 16 GiB (fakes: built-ins may be placed there).
    fn models() -> Arc<ModelManager> {
        Arc::new(
            ModelManager::new(
                ManagerOptions {
                    unload_grace: Duration::from_secs(1),
                    budgets: vec![
                        Budget::new(DeviceId::Cpu, 64 * GIB, 0),
                        Budget::new(DeviceId::Gpu(0), 16 * GIB, 0),
                        Budget::new(DeviceId::Gpu(1), 16 * GIB, 0),
                    ],
                    backend: BackendOptions {
                        simulated_gpus: true,
                        ..BackendOptions::default()
                    },
                    ..ManagerOptions::default()
                },
                ManagerDeps::detached(ExecutionPool::new(1).unwrap()),
            )
            .unwrap(),
        )
    }

    fn on_gpu(id: u32, bytes: u64) -> String {
        format!(
            r#"{{"instance_group":[{{"kind":"KIND_GPU","count":1,"gpus":[{id}]}}],"parameters":{{"memory_bytes":{{"string_value":"{bytes}"}}}}}}"#
        )
    }

    #[test]
    fn a_job_no_gpu_here_could_hold_is_refused_by_its_numbers() {
        let gpus = ManagerGpus::new(models());
        assert!(gpus.check(2, 16 * GIB).is_ok());
        assert!(gpus.check(1, 0).is_ok(), "a whole GPU");
        let err = gpus.check(1, 17 * GIB).unwrap_err();
        assert_eq!(
            err,
            "gpu memory 17.0 GiB on each of 1 GPU(s), but 0 GPU budget(s) here are that large (gpu0 16.0 GiB, gpu1 16.0 GiB; models.gpu_memory_reserve_bytes is kept off each)"
        );
        assert!(
            gpus.check(3, GIB)
                .unwrap_err()
                .contains("but 2 GPU budget(s)")
        );
    }

    #[tokio::test]
    async fn a_job_gets_the_gpu_with_most_room_evicting_idle_models_and_frees_it() {
        let models = models();
        let gpus = ManagerGpus::new(models.clone());
        models
            .load("identity", Some(&on_gpu(0, 10 * GIB)))
            .await
            .unwrap();
        models
            .load("cost", Some(&on_gpu(1, 4 * GIB)))
            .await
            .unwrap();
        // gpu1 has most room (12 GiB).
        let grant = gpus.reserve("1", 1, 8 * GIB).unwrap();
        assert_eq!(grant.gpus, [1]);
        assert!(grant.evictions.is_none());
        assert_eq!(gpus.gpus_of("1"), [1]);
        // 6 GiB free on gpu0, 4 on gpu1: a whole GPU evicts the model on gpu0 (gpu1's job
        // cannot be evicted), unloaded by the grant's evictions before the job starts.
        let grant = gpus.reserve("2", 1, 0).unwrap();
        assert_eq!(grant.gpus, [0]);
        grant.evictions.expect("a model to unload").await;
        assert_eq!(
            models.info("identity").unwrap().state,
            ModelState::NotLoaded
        );
        // The job waits, and the reason names the devices and the jobs there.
        // No room for 9 GiB: gpu0 is the job's whole, gpu1 would have 8 without its model.
        let why = gpus.reserve("3", 1, 9 * GIB).unwrap_err();
        assert!(
            why.starts_with("waiting for GPU memory: 'job:3' needs 9.00 GiB on each of 1 device(s) but 0 can hold it now")
                && why.contains("job:2 (16.0 GiB, not a model, never evicted)")
                && why.contains("job:1 (8.00 GiB"),
            "{why}"
        );
        gpus.release("2");
        gpus.release("1");
        assert!(gpus.gpus_of("1").is_empty() && models.job_holders().is_empty());
        assert_eq!(gpus.reserve("3", 2, GIB).unwrap().gpus.len(), 2);
    }
}
