//! Loading and unloading: the steps of the module documentation of [`super`].

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use veraltheim_fastpath::ModelWorker;
use veraltheim_models::allocator::{DeviceId, LoadRequest, estimate_bytes, format_bytes};
use veraltheim_models::backend::{self, BackendOptions};
use veraltheim_models::repository::RepoModel;
use veraltheim_models::{Model, ModelConfig, ModelState, warmup};

/// The model parameter that sets a latency objective ([`veraltheim_fastpath::SloConfig`]).
pub const SLO_PARAMETER: &str = "latency_slo_p99_ms";

use super::{
    BUILTIN_VERSION, Measurement, MemoryCharge, ModelInfo, ModelManager, Source, key_model,
};
use crate::Error;
use crate::gauge::MemoryGauge;

impl ModelManager {
    /// The configuration a load starts from: a repository model's folder is read again (so an
    /// edited config or a new version folder takes effect), a built-in's is fixed.
    fn base_for_load(&self, name: &str) -> Result<(ModelConfig, Option<RepoModel>), Error> {
        self.refresh();
        let source = {
            let entries = self.entries.read();
            let e = entries
                .get(name)
                .ok_or_else(|| Error::NotFound(name.to_string()))?;
            if e.source == Source::Builtin {
                return Ok((e.base.clone(), None));
            }
            e.source
        };
        debug_assert_eq!(source, Source::Repository);
        let Some(repo) = &self.repository else {
            return Err(Error::NotFound(name.to_string()));
        };
        let m = repo.model(name).map_err(|e| Error::from_model(name, e))?;
        if let Some(entry) = self.entries.write().get_mut(name) {
            entry.base = m.config.clone();
            entry.versions = m.versions.clone();
        }
        Ok((m.config.clone(), Some(m)))
    }

    /// Loads a model, or reloads it (a new version or a new configuration). The override
    /// (Triton's `config` JSON) applies to the model's base configuration. A reload that fails
    /// leaves the running version serving.
    pub async fn load(
        &self,
        name: &str,
        config_override: Option<&str>,
    ) -> Result<ModelInfo, Error> {
        self.load_if_needed(name, config_override, false).await
    }

    /// [`Self::load`]; with `unless_ready`, a model found READY once its turn comes (another
    /// request's load won) is left as it is, so that many first requests cause one load.
    pub(super) async fn load_if_needed(
        &self,
        name: &str,
        config_override: Option<&str>,
        unless_ready: bool,
    ) -> Result<ModelInfo, Error> {
        let op = {
            let entries = self.entries.read();
            match entries.get(name) {
                Some(e) => e.op.clone(),
                None => {
                    drop(entries);
                    self.refresh();
                    self.entries
                        .read()
                        .get(name)
                        .ok_or_else(|| Error::NotFound(name.to_string()))?
                        .op
                        .clone()
                }
            }
        };
        let _op = op.lock().await;
        let was_ready = self.info(name)?.state == ModelState::Ready;
        if was_ready && unless_ready {
            return self.info(name);
        }
        let (base, repo_model) = match self.base_for_load(name) {
            Ok((mut base, repo_model)) => {
                if let Some(ms) = self.options.latency_slo_ms.get(name)
                    && base.parameter(SLO_PARAMETER).is_none()
                {
                    base.parameters.insert(
                        SLO_PARAMETER.to_string(),
                        veraltheim_models::config::Parameter {
                            string_value: ms.to_string(),
                        },
                    );
                }
                (base, repo_model)
            }
            Err(e) => {
                if !was_ready {
                    self.set_state(name, ModelState::Failed, &e.to_string())
                        .await;
                }
                return Err(e);
            }
        };
        // The limits are checked before anything is built or allocated: a field that sizes an
        // allocation, a loop or a thread count is refused here by name.
        let limits = &self.options.backend.limits;
        let config = match config_override.filter(|s| !s.trim().is_empty()) {
            Some(json) => base.with_override(json),
            None => base.validate_declared().map(|_| base.clone()),
        }
        .and_then(|c| limits.check_config(&c, self.pool.threads()).map(|()| c))
        // The fast path reads `priority_aging_ms` when it builds the worker; a value that is not
        // a number is refused here by name instead of silently becoming the default.
        .and_then(|c| c.parameter_u64("priority_aging_ms", 0).map(|_| c))
        // Likewise the latency objective and the background levels (veraltheim_fastpath::slo),
        // the bounds on batches run on the caller's thread (`inline_execution_us`,
        // `inline_min_gap_us`) and on the batcher task (`batcher_execution_us`), and the
        // length-aware batching parameters (veraltheim_fastpath's batcher).
        .and_then(|c| {
            veraltheim_fastpath::SloConfig::from_config(&c)
                .and_then(|_| veraltheim_fastpath::background_levels(&c))
                .and_then(|_| veraltheim_fastpath::inline_bound(&c, None))
                .and_then(|_| veraltheim_fastpath::inline_min_gap(&c))
                .and_then(|_| veraltheim_fastpath::batcher_bound(&c, None))
                .and_then(|_| veraltheim_fastpath::check_length_parameters(&c))
                .map(|_| c.clone())
                .map_err(|reason| veraltheim_models::Error::InvalidConfig {
                    model: c.name.clone(),
                    reason,
                })
        })
        .map_err(|source| Error::BadConfig {
            name: name.to_string(),
            source,
        })?;
        let version = repo_model.as_ref().map_or(BUILTIN_VERSION, |m| m.serving);
        let dir = repo_model.as_ref().map(|m| m.version_dir());
        if !was_ready {
            self.set_state(name, ModelState::Loading, "").await;
        }
        let result = self.build(name, config, dir, version, was_ready).await;
        match result {
            Ok(info) => Ok(info),
            Err(e) => {
                if !was_ready {
                    self.set_state(name, ModelState::Failed, &e.to_string())
                        .await;
                }
                Err(e)
            }
        }
    }

    /// Steps 2–5 of a load (see the module documentation).
    async fn build(
        &self,
        name: &str,
        config: ModelConfig,
        dir: Option<PathBuf>,
        version: u64,
        was_ready: bool,
    ) -> Result<ModelInfo, Error> {
        let started = Instant::now();
        let timeout = self.options.load_timeout;
        let slot = tokio::time::timeout(timeout, self.load_slots.clone().acquire_owned())
            .await
            .map_err(|_| Error::LoadSlots {
                name: name.to_string(),
                max: self.options.max_concurrent_loads.max(1),
                waited: timeout,
            })?
            .map_err(|_| Error::LoadFailed {
                name: name.to_string(),
                reason: "the server is shutting down".into(),
            })?;
        let estimate = match &dir {
            Some(d) => {
                estimate_bytes(d, self.options.size_factor).map_err(|e| Error::LoadFailed {
                    name: name.to_string(),
                    reason: format!("cannot read {}: {e}", d.display()),
                })?
            }
            None => 0,
        };
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let key = format!("{name}#{generation}");
        let old_key = self.entries.read().get(name).and_then(|e| e.key.clone());
        let mut request = LoadRequest::new(key.clone(), estimate)
            .with_placement(backend::placement(&config))
            .with_pinned(config.pinned);
        if let Some(old) = &old_key {
            request = request.with_keep(old.clone());
        }
        let admission = self
            .allocator
            .lock()
            .admit(&request)
            .map_err(|e| Error::NoRoom {
                name: name.to_string(),
                reason: e.to_string(),
            })?;
        self.evict(&admission.evict, name).await;
        let device = admission.device;
        tracing::info!(model = name, %device, estimate = %format_bytes(estimate), "loading");
        let build = Build {
            config: config.clone(),
            dir,
            device,
            backend: self.options.backend.clone(),
            gauge: self.gauge.clone(),
            measuring: (!backend::reports_memory(&config)).then(|| self.measuring_lock(device)),
        };
        let outcome = self
            .run_build(
                name,
                build,
                key.clone(),
                slot,
                timeout.saturating_sub(started.elapsed()),
            )
            .await;
        let (model, measured) = match outcome {
            Ok(built) => built,
            // The build still runs and frees the reservation when it ends.
            Err(e @ Error::LoadTimeout { .. }) => return Err(e),
            Err(e) => {
                self.allocator.lock().release(&key);
                return Err(e);
            }
        };
        let memory = match measured {
            Some((bytes, how)) => MemoryCharge {
                estimate_bytes: estimate,
                charged_bytes: bytes,
                how,
            },
            None => MemoryCharge {
                estimate_bytes: estimate,
                charged_bytes: estimate,
                how: Measurement::Estimate,
            },
        };
        let charged = self.allocator.lock().charge(&key, memory.charged_bytes);
        match charged {
            Ok(victims) => self.evict(&victims, name).await,
            Err(e) => {
                self.allocator.lock().release(&key);
                return Err(Error::NoRoom {
                    name: name.to_string(),
                    reason: e.to_string(),
                });
            }
        }
        let effective = model.config().clone();
        let worker = Arc::new(ModelWorker::new(
            model,
            self.pool.clone(),
            &self.options.worker,
        ));
        let child = format!("model:{name}#{generation}");
        self.host.start(&child, worker.clone()).await;
        let (old, old_child) = {
            let mut entries = self.entries.write();
            let Some(e) = entries.get_mut(name) else {
                self.allocator.lock().release(&key);
                return Err(Error::NotFound(name.to_string()));
            };
            e.config = effective;
            e.version = version;
            e.state = ModelState::Ready;
            e.reason.clear();
            e.key = Some(key);
            e.memory = Some(memory);
            (e.worker.replace(worker), e.child.replace(child))
        };
        self.announce(
            name,
            ModelState::Ready,
            if was_ready { "reloaded" } else { "" },
        )
        .await;
        tracing::info!(model = name, %device, charged = %format_bytes(memory.charged_bytes), how = memory.how.as_str(), took_ms = started.elapsed().as_millis() as u64, "loaded");
        if let Some(old) = old {
            // Requests already queued on the old version finish there.
            let grace = self.options.unload_grace;
            let host = self.host.clone();
            let allocator = self.allocator.clone();
            tokio::spawn(async move {
                old.stop(grace).await;
                if let Some(child) = old_child {
                    host.stop(&child).await;
                }
                if let Some(old_key) = old_key {
                    allocator.lock().release(&old_key);
                }
            });
        }
        self.info(name)
    }

    /// The lock that serialises measured builds on `device`.
    fn measuring_lock(&self, device: DeviceId) -> Arc<tokio::sync::Mutex<()>> {
        self.measuring.lock().entry(device).or_default().clone()
    }

    /// Step 4: builds and warms the model on a blocking thread, within `remaining`. The build
    /// cannot be interrupted, so it runs on a task that owns the load slot and, once the caller
    /// has stopped waiting (time-out), also the memory reservation `key`: both stay held until
    /// the build really ends, then the half-built model is dropped and both are released.
    async fn run_build(
        &self,
        name: &str,
        build: Build,
        key: String,
        slot: tokio::sync::OwnedSemaphorePermit,
        remaining: Duration,
    ) -> Result<Built, Error> {
        let (tx, mut rx) = tokio::sync::oneshot::channel::<Result<Built, Error>>();
        let allocator = self.allocator.clone();
        let model_name = name.to_string();
        tokio::spawn(async move {
            let _slot = slot;
            let _measuring = match &build.measuring {
                Some(lock) => Some(lock.clone().lock_owned().await),
                None => None,
            };
            let result = match tokio::task::spawn_blocking(move || build.run()).await {
                Ok(Ok(built)) => Ok(built),
                Ok(Err(e)) => Err(Error::from_model(&model_name, e)),
                Err(join) => Err(Error::LoadFailed {
                    name: model_name.clone(),
                    reason: format!("the backend panicked while loading: {join}"),
                }),
            };
            if let Err(unclaimed) = tx.send(result) {
                // Given up on (time-out): nobody will serve this model; free what it held.
                drop(unclaimed);
                allocator.lock().release(&key);
                tracing::info!(model = %model_name, "a timed-out load ended; its reservation and load slot are free again");
            }
        });
        match tokio::time::timeout(remaining, &mut rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::LoadFailed {
                name: name.to_string(),
                reason: "the load task ended without an answer".into(),
            }),
            Err(_) => {
                // From here the build task frees the reservation, unless its answer came in
                // just now (then it is ours to use).
                rx.close();
                match rx.try_recv() {
                    Ok(result) => result,
                    Err(_) => Err(Error::LoadTimeout {
                        name: name.to_string(),
                        timeout: self.options.load_timeout,
                    }),
                }
            }
        }
    }

    /// Unloads the models the allocator evicted (they are idle: no request in flight).
    pub(super) async fn evict(&self, victims: &[String], for_model: &str) {
        for key in victims {
            let name = key_model(key).to_string();
            let taken = {
                let mut entries = self.entries.write();
                match entries.get_mut(&name) {
                    Some(e) if e.key.as_deref() == Some(key.as_str()) => {
                        e.state = ModelState::Unloading;
                        e.key = None;
                        Some((e.worker.take(), e.child.take()))
                    }
                    _ => None,
                }
            };
            if let Some((worker, child)) = taken {
                let reason = format!("evicted to make room for '{for_model}'");
                self.announce(&name, ModelState::Unloading, &reason).await;
                if let Some(w) = worker {
                    w.stop(self.options.unload_grace).await;
                }
                if let Some(child) = child {
                    self.host.stop(&child).await;
                }
                self.set_state(&name, ModelState::NotLoaded, &reason).await;
            }
            self.allocator.lock().release(key);
        }
    }

    /// Unloads a model: new requests are refused at once, queued and running ones get the grace
    /// period to finish, then are failed with a message saying the model was unloaded.
    pub async fn unload(&self, name: &str) -> Result<ModelInfo, Error> {
        let op = self
            .entries
            .read()
            .get(name)
            .ok_or_else(|| Error::NotFound(name.to_string()))?
            .op
            .clone();
        let _op = op.lock().await;
        let (worker, child, key) = {
            let mut entries = self.entries.write();
            let e = entries
                .get_mut(name)
                .ok_or_else(|| Error::NotFound(name.to_string()))?;
            e.state = ModelState::Unloading;
            (e.worker.take(), e.child.take(), e.key.take())
        };
        self.announce(name, ModelState::Unloading, "").await;
        if let Some(w) = worker {
            w.stop(self.options.unload_grace).await;
        }
        if let Some(child) = child {
            self.host.stop(&child).await;
        }
        if let Some(key) = key {
            self.allocator.lock().release(&key);
        }
        self.set_state(name, ModelState::NotLoaded, "unloaded")
            .await;
        self.info(name)
    }

    /// Stops every worker (server shutdown).
    pub async fn shutdown(&self, grace: Duration) {
        self.load_slots.close();
        let workers: Vec<_> = {
            let mut entries = self.entries.write();
            entries
                .values_mut()
                .filter_map(|e| {
                    e.state = ModelState::Unloading;
                    e.worker.take()
                })
                .collect()
        };
        futures::future::join_all(workers.iter().map(|w| w.stop(grace))).await;
    }
}

/// A model built and warmed, with what it was measured to hold.
type Built = (Arc<dyn Model>, Option<(u64, Measurement)>);

/// Everything step 4 needs on its blocking thread.
struct Build {
    config: ModelConfig,
    dir: Option<PathBuf>,
    device: DeviceId,
    backend: BackendOptions,
    gauge: Arc<dyn MemoryGauge>,
    /// Held while building when the backend cannot report its memory.
    measuring: Option<Arc<tokio::sync::Mutex<()>>>,
}

impl Build {
    fn run(self) -> Result<Built, veraltheim_models::Error> {
        let measure = || {
            crate::gauge::trim_c_heap();
            self.gauge.held_bytes(self.device)
        };
        let before = self.measuring.is_some().then(measure).flatten();
        let model =
            backend::instantiate(self.config, self.dir.as_deref(), self.device, &self.backend)?;
        warmup::run(model.as_ref(), self.dir.as_deref())?;
        let measured = match model.memory_bytes() {
            Some(bytes) => Some((bytes, Measurement::Reported)),
            None => before.and_then(|before| {
                let after = measure()?;
                // No growth seen (pages freed earlier and reused): nothing was measured.
                let grew = after.saturating_sub(before);
                (grew > 0).then_some((grew, Measurement::Growth))
            }),
        };
        Ok((model, measured))
    }
}
