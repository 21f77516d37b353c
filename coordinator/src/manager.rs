//! The models the coordinator knows, their load state, and their workers.
//!
//! Models come from two places: the built-in ones (`identity`, `cost`, `fault`) and the model
//! repository (`--model-repository`, one folder per model). Loading a model
//! 1. re-reads its folder (config + serving version) and applies the caller's override,
//! 2. waits for a load slot (at most `max_concurrent_loads` at once),
//! 3. asks the allocator for room on a device (estimated size: the version folder's files ×
//!    `size_factor`), unloading the idle models it evicts,
//! 4. builds the backend and runs the warm-up requests off the async threads, within
//!    `load_timeout`,
//! 5. charges the measured size (what the backend reports, else the process's resident memory
//!    growth during the load, else the estimate), starts a fast-path worker under the supervision tree,
//!    and only then marks the model READY. A reload that fails leaves the old version serving.
//!
//! Requests hold the model in the allocator while they run (an idle model is one with no request
//! in flight), so a model with requests in flight is never evicted.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use parking_lot::{Mutex, RwLock};
use thiserror::Error;
use veraltheim_bus::{Bus, Event};
use veraltheim_devices::GpuInfo;
use veraltheim_fastpath::{ExecutionPool, ModelWorker, WorkerOptions};
use veraltheim_models::allocator::{
    Allocator, Budget, DeviceId, DeviceUsage, LoadRequest, Placement, estimate_bytes, format_bytes,
};
use veraltheim_models::backend::{self, BackendOptions};
use veraltheim_models::repository::{RepoModel, Repository};
use veraltheim_models::{Model, ModelConfig, ModelState, builtin, warmup};
use veraltheim_supervisor::{Error as SupervisorError, SupervisorHandle};

use crate::tree::{FAST_PATH, model_child};

/// The version built-in models serve.
pub const BUILTIN_VERSION: u64 = 1;

#[derive(Debug, Error)]
pub enum ManagerError {
    #[error("unknown model '{0}'; `veraltheim models` lists the models this server knows")]
    NotFound(String),
    #[error("model '{name}' has no version '{version}' (it serves version {serving})")]
    NoSuchVersion {
        name: String,
        version: String,
        serving: u64,
    },
    #[error("model '{name}' is not ready (state {state}{})", if reason.is_empty() { String::new() } else { format!(": {reason}") })]
    NotReady {
        name: String,
        state: ModelState,
        reason: String,
    },
    #[error("cannot load model '{name}': {source}")]
    BadConfig {
        name: String,
        source: veraltheim_models::Error,
    },
    #[error("model '{name}' failed to load: {reason}")]
    LoadFailed { name: String, reason: String },
    #[error("cannot load model '{name}': {reason}")]
    NoRoom { name: String, reason: String },
    #[error("model '{name}' did not load within {}s (models.load_timeout_seconds)", timeout.as_secs())]
    LoadTimeout { name: String, timeout: Duration },
    #[error("model '{name}' waited {}s for a load slot; {max} loads run at once (models.max_concurrent_loads)", waited.as_secs())]
    LoadSlots {
        name: String,
        max: usize,
        waited: Duration,
    },
}

/// What the APIs show of a model.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub name: String,
    pub version: String,
    pub state: ModelState,
    pub reason: String,
    pub config: ModelConfig,
    /// Where it runs and what it holds there, when loaded.
    pub device: Option<DeviceId>,
    pub memory_bytes: u64,
    /// Every version folder (repository models).
    pub versions: Vec<u64>,
}

/// How the manager loads models.
#[derive(Clone, Debug)]
pub struct ManagerOptions {
    pub worker: WorkerOptions,
    pub unload_grace: Duration,
    pub fault_injection: bool,
    /// The model repository, if any.
    pub repository: Option<PathBuf>,
    pub backend: BackendOptions,
    pub max_concurrent_loads: usize,
    pub load_timeout: Duration,
    /// One budget per device.
    pub budgets: Vec<Budget>,
    /// Reserve of a GPU that appears after start (the start-up GPUs have theirs in `budgets`).
    pub gpu_reserve_bytes: u64,
    /// A load is admitted on its files' size times this factor.
    pub size_factor: f64,
}

impl Default for ManagerOptions {
    fn default() -> Self {
        ManagerOptions {
            worker: WorkerOptions::default(),
            unload_grace: Duration::from_secs(10),
            fault_injection: false,
            repository: None,
            backend: BackendOptions::default(),
            max_concurrent_loads: 2,
            load_timeout: Duration::from_secs(120),
            budgets: vec![Budget::new(DeviceId::Cpu, 64 << 30, 0)],
            gpu_reserve_bytes: 0,
            size_factor: 1.5,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Builtin,
    Repository,
}

struct Entry {
    source: Source,
    /// The configuration the model starts from; overrides apply on top of it.
    base: ModelConfig,
    /// The configuration in effect (or last tried).
    config: ModelConfig,
    /// The serving (or last tried) version.
    version: u64,
    versions: Vec<u64>,
    state: ModelState,
    reason: String,
    worker: Option<Arc<ModelWorker>>,
    /// The worker's name under FastPathProcessor (`model:<name>#<generation>`), which is also the
    /// key the allocator holds its memory under (`<name>#<generation>`).
    child: Option<String>,
    key: Option<String>,
    /// One load or unload of this model at a time.
    op: Arc<tokio::sync::Mutex<()>>,
}

impl Entry {
    fn new(source: Source, config: ModelConfig, version: u64, versions: Vec<u64>) -> Self {
        Entry {
            source,
            base: config.clone(),
            config,
            version,
            versions,
            state: ModelState::NotLoaded,
            reason: String::new(),
            worker: None,
            child: None,
            key: None,
            op: Arc::new(tokio::sync::Mutex::new(())),
        }
    }
}

/// A request's hold on a model: while it lives the model counts as busy and is not evicted.
pub struct InFlight {
    allocator: Arc<Mutex<Allocator>>,
    key: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.allocator.lock().finish(&self.key);
    }
}

pub struct ModelManager {
    pool: ExecutionPool,
    options: ManagerOptions,
    repository: Option<Repository>,
    entries: RwLock<BTreeMap<String, Entry>>,
    allocator: Arc<Mutex<Allocator>>,
    load_slots: Arc<tokio::sync::Semaphore>,
    /// State changes are published as `models.<name>.state`.
    bus: Bus,
    /// The supervision tree's root, once it runs; model workers are its children.
    tree: RwLock<Option<SupervisorHandle>>,
    generation: AtomicU64,
}

/// A model name as one topic segment: characters a topic cannot hold become `_`.
pub fn topic_segment(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c == '.' || c == '*' || c == '>' || c.is_whitespace() || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// The model an allocator key (`<name>#<generation>`) belongs to.
fn key_model(key: &str) -> &str {
    key.rsplit_once('#').map_or(key, |(name, _)| name)
}

/// This process's resident memory, for measuring what a load took.
fn resident_bytes() -> u64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Where a configuration allows its model to run (Triton's `instance_group.kind` and `gpus`).
fn placement_of(config: &ModelConfig) -> Placement {
    let kinds: Vec<&str> = config
        .instance_group
        .iter()
        .map(|g| g.kind.as_str())
        .collect();
    let gpus: Vec<u32> = config
        .instance_group
        .iter()
        .flat_map(|g| g.gpus.iter())
        .filter_map(|g| u32::try_from(*g).ok())
        .collect();
    // KIND_GPU on a backend without GPU execution stays gpu-only: the load is refused with a
    // message naming the constraint rather than silently run on the CPU.
    let mut placement = if kinds.contains(&"KIND_GPU") {
        Placement::gpu_only()
    } else if kinds.contains(&"KIND_CPU") || !backend::supports_gpu(config) {
        Placement::cpu_only()
    } else {
        Placement::default()
    };
    if !gpus.is_empty() {
        placement.gpu_ids = Some(gpus);
    }
    placement
}

impl ModelManager {
    pub fn new(
        pool: ExecutionPool,
        options: ManagerOptions,
        bus: Bus,
    ) -> Result<Self, veraltheim_models::Error> {
        let mut entries = BTreeMap::new();
        for name in builtin::names(options.fault_injection) {
            let config = builtin::config(name)?;
            entries.insert(
                name.to_string(),
                Entry::new(
                    Source::Builtin,
                    config,
                    BUILTIN_VERSION,
                    vec![BUILTIN_VERSION],
                ),
            );
        }
        let repository = options.repository.as_ref().map(Repository::new);
        let manager = ModelManager {
            pool,
            allocator: Arc::new(Mutex::new(Allocator::new(options.budgets.clone()))),
            load_slots: Arc::new(tokio::sync::Semaphore::new(
                options.max_concurrent_loads.max(1),
            )),
            options,
            repository,
            entries: RwLock::new(entries),
            bus,
            tree: RwLock::new(None),
            generation: AtomicU64::new(0),
        };
        manager.refresh();
        Ok(manager)
    }

    /// Re-reads the repository: new folders become known (NOT_LOADED), broken ones show their
    /// error as the reason. Models already known keep their state.
    pub fn refresh(&self) {
        let Some(repo) = &self.repository else { return };
        let names = match repo.names() {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "model repository not readable");
                return;
            }
        };
        let mut entries = self.entries.write();
        for name in names {
            if entries
                .get(&name)
                .is_some_and(|e| e.source == Source::Builtin)
            {
                tracing::warn!(model = %name, "repository folder shadowed by the built-in model of that name");
                continue;
            }
            if entries.contains_key(&name) {
                continue;
            }
            let entry = match repo.model(&name) {
                Ok(m) => Entry::new(Source::Repository, m.config, m.serving, m.versions),
                Err(e) => {
                    let mut entry = Entry::new(
                        Source::Repository,
                        ModelConfig {
                            name: name.clone(),
                            ..Default::default()
                        },
                        0,
                        Vec::new(),
                    );
                    entry.reason = e.to_string();
                    entry
                }
            };
            entries.insert(name, entry);
        }
    }

    /// From now on, model workers run under the tree's FastPathProcessor.
    pub fn attach_tree(&self, root: SupervisorHandle) {
        *self.tree.write() = Some(root);
    }
    /// Runs a worker's batcher loop: under the tree when there is one, else on its own task
    /// (restarted in place after a panic).
    async fn supervise(&self, child: &str, worker: Arc<ModelWorker>) {
        let root = self.tree.read().clone();
        let Some(root) = root else {
            worker.run_detached();
            return;
        };
        // FastPathProcessor may be between incarnations (its parent restarting): retry briefly;
        // if it stays away, the EventRouter re-attaches the workers when it starts.
        let attach = || {
            let (root, worker) = (root.clone(), worker.clone());
            async move {
                match root
                    .supervisor(FAST_PATH)?
                    .start_child(model_child(child, worker))
                    .await
                {
                    Ok(()) | Err(SupervisorError::AlreadyPresent { .. }) => Ok(()),
                    Err(e) => Err(e),
                }
            }
        };
        let attached = attach
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(10))
                    .with_max_delay(Duration::from_millis(500))
                    .with_max_times(10),
            )
            .await;
        if let Err(e) = attached {
            tracing::warn!(child, error = %e, "model worker not supervised yet");
        }
    }

    /// Takes a drained worker's supervisor out of the tree.
    async fn unsupervise(root: Option<SupervisorHandle>, child: &str) {
        let Some(root) = root else { return };
        if let Ok(fast_path) = root.supervisor(FAST_PATH) {
            let _ = fast_path.terminate_child(child).await;
            let _ = fast_path.delete_child(child).await;
        }
    }

    /// Puts every running model's worker back under FastPathProcessor, after that supervisor
    /// was restarted (it comes back from its spec, without the children added at run time).
    pub async fn reattach_workers(&self) {
        let running: Vec<(String, Arc<ModelWorker>)> = self
            .entries
            .read()
            .values()
            .filter_map(|e| Some((e.child.clone()?, e.worker.clone()?)))
            .collect();
        for (child, worker) in running {
            tracing::info!(child, "re-attaching model worker");
            self.supervise(&child, worker).await;
        }
    }

    pub fn names(&self) -> Vec<String> {
        self.entries.read().keys().cloned().collect()
    }

    /// Whether the API may address this version of the model ("" = the serving one).
    pub fn check_version(&self, name: &str, version: &str) -> Result<(), ManagerError> {
        let entries = self.entries.read();
        let e = entries
            .get(name)
            .ok_or_else(|| ManagerError::NotFound(name.to_string()))?;
        if version.is_empty() || version == e.version.to_string() {
            Ok(())
        } else {
            Err(ManagerError::NoSuchVersion {
                name: name.to_string(),
                version: version.to_string(),
                serving: e.version,
            })
        }
    }

    /// The version a model serves (or last tried), as the APIs spell it.
    pub fn version_of(&self, name: &str) -> String {
        self.entries
            .read()
            .get(name)
            .map_or_else(|| BUILTIN_VERSION.to_string(), |e| e.version.to_string())
    }

    /// The worker of a READY model (for statistics and metadata; requests use [`Self::acquire`]).
    pub fn worker(&self, name: &str) -> Result<Arc<ModelWorker>, ManagerError> {
        let entries = self.entries.read();
        let entry = entries
            .get(name)
            .ok_or_else(|| ManagerError::NotFound(name.to_string()))?;
        match (&entry.worker, entry.state) {
            (Some(w), ModelState::Ready) => Ok(w.clone()),
            _ => Err(ManagerError::NotReady {
                name: name.to_string(),
                state: entry.state,
                reason: entry.reason.clone(),
            }),
        }
    }

    /// The worker of a READY model plus a hold that keeps it from being evicted while the
    /// request runs.
    pub fn acquire(&self, name: &str) -> Result<(Arc<ModelWorker>, InFlight), ManagerError> {
        let entries = self.entries.read();
        let entry = entries
            .get(name)
            .ok_or_else(|| ManagerError::NotFound(name.to_string()))?;
        let not_ready = || ManagerError::NotReady {
            name: name.to_string(),
            state: entry.state,
            reason: entry.reason.clone(),
        };
        match (&entry.worker, &entry.key, entry.state) {
            (Some(w), Some(key), ModelState::Ready) => {
                if !self.allocator.lock().acquire(key) {
                    return Err(ManagerError::NotReady {
                        name: name.to_string(),
                        state: ModelState::Unloading,
                        reason: "being evicted".into(),
                    });
                }
                Ok((
                    w.clone(),
                    InFlight {
                        allocator: self.allocator.clone(),
                        key: key.clone(),
                    },
                ))
            }
            _ => Err(not_ready()),
        }
    }

    /// [`Self::acquire`], loading the model first when it is not loaded and its configuration
    /// sets `load_on_demand` (the request waits for the load until its deadline).
    pub async fn acquire_or_load(
        &self,
        name: &str,
        deadline: Option<Instant>,
    ) -> Result<(Arc<ModelWorker>, InFlight), ManagerError> {
        match self.acquire(name) {
            Err(e) if self.loads_on_demand_after(name, &e) => {
                let load = async {
                    match self.load_if_needed(name, None, true).await {
                        Ok(_) => Ok(()),
                        // Someone else's load may have won meanwhile.
                        Err(e) => self.acquire(name).map(|_| ()).map_err(|_| e),
                    }
                };
                match deadline {
                    Some(at) => {
                        tokio::time::timeout_at(at.into(), load)
                            .await
                            .map_err(|_| ManagerError::NotReady {
                                name: name.to_string(),
                                state: ModelState::Loading,
                                reason: "still loading when the request's deadline passed".into(),
                            })??
                    }
                    None => load.await?,
                }
                self.acquire(name)
            }
            other => other,
        }
    }

    /// Whether a request that [`Self::acquire`] refused with `e` should wait for an on-demand
    /// load of `name` ([`Self::acquire_or_load`]).
    pub fn loads_on_demand_after(&self, name: &str, e: &ManagerError) -> bool {
        matches!(
            e,
            ManagerError::NotReady {
                state: ModelState::NotLoaded | ModelState::Loading,
                ..
            }
        ) && self.loads_on_demand(name)
    }

    fn loads_on_demand(&self, name: &str) -> bool {
        self.entries
            .read()
            .get(name)
            .is_some_and(|e| e.base.load_on_demand)
    }

    pub fn workers(&self) -> Vec<Arc<ModelWorker>> {
        self.entries
            .read()
            .values()
            .filter_map(|e| e.worker.clone())
            .collect()
    }

    pub fn info(&self, name: &str) -> Result<ModelInfo, ManagerError> {
        let entries = self.entries.read();
        let e = entries
            .get(name)
            .ok_or_else(|| ManagerError::NotFound(name.to_string()))?;
        Ok(self.to_info(name, e))
    }

    /// Every known model. Folders added to the repository since the last refresh show only after
    /// [`Self::refresh`] (the listing APIs call it; metrics scrapes do not read the disk).
    pub fn list(&self) -> Vec<ModelInfo> {
        self.entries
            .read()
            .iter()
            .map(|(name, e)| self.to_info(name, e))
            .collect()
    }

    /// Each device's budget and what holds it.
    /// Follows the GPUs as the inventory last read them: each GPU's capacity becomes its total
    /// less what other processes hold there ([`Allocator::follow_device`]); a lost GPU gets
    /// none, so nothing new is placed on it. GPUs that were not there at start stay unused.
    pub fn follow_gpus(&self, gpus: &[GpuInfo]) {
        let mut allocator = self.allocator.lock();
        for g in gpus {
            let device = DeviceId::Gpu(g.index);
            if g.lost {
                allocator.set_capacity(device, 0);
            } else if !allocator.follow_device(device, g.memory_total_bytes, g.memory_used_bytes) {
                // A GPU that was not there at start (a driver restart, a MIG change): it gets a
                // budget now, with the configured reserve, and models may be placed there.
                allocator.set_budget(Budget::new(
                    device,
                    g.memory_total_bytes,
                    self.options.gpu_reserve_bytes,
                ));
                allocator.follow_device(device, g.memory_total_bytes, g.memory_used_bytes);
                tracing::info!(gpu = g.index, name = %g.name, "a GPU appeared; it now has a memory budget");
            }
        }
    }

    pub fn memory(&self) -> Vec<DeviceUsage> {
        self.allocator.lock().snapshot()
    }

    fn to_info(&self, name: &str, e: &Entry) -> ModelInfo {
        let held = e.key.as_ref().and_then(|k| self.allocator.lock().holder(k));
        ModelInfo {
            name: name.to_string(),
            version: e.version.to_string(),
            state: e.state,
            reason: e.reason.clone(),
            config: e.config.clone(),
            device: held.as_ref().map(|(d, _)| *d),
            memory_bytes: held.map_or(0, |(_, u)| u.bytes),
            versions: e.versions.clone(),
        }
    }

    async fn set_state(&self, name: &str, state: ModelState, reason: &str) {
        if let Some(e) = self.entries.write().get_mut(name) {
            e.state = state;
            e.reason = reason.to_string();
        }
        self.announce(name, state, reason).await;
    }

    async fn announce(&self, name: &str, state: ModelState, reason: &str) {
        tracing::info!(model = name, state = %state, reason, "model state");
        let message = if reason.is_empty() {
            format!("model {name} is {state}")
        } else {
            format!("model {name} is {state}: {reason}")
        };
        let event = Event::new(format!("models.{}.state", topic_segment(name)), message)
            .with_attribute("model", name)
            .with_attribute("state", state.as_str())
            .with_attribute("reason", reason);
        if let Err(e) = self.bus.publish(event).await {
            tracing::warn!(model = name, error = %e, "model state event not published");
        }
    }

    /// The configuration a load starts from: a repository model's folder is read again (so an
    /// edited config or a new version folder takes effect), a built-in's is fixed.
    fn base_for_load(&self, name: &str) -> Result<(ModelConfig, Option<RepoModel>), ManagerError> {
        self.refresh();
        let source = {
            let entries = self.entries.read();
            let e = entries
                .get(name)
                .ok_or_else(|| ManagerError::NotFound(name.to_string()))?;
            if e.source == Source::Builtin {
                return Ok((e.base.clone(), None));
            }
            e.source
        };
        debug_assert_eq!(source, Source::Repository);
        let Some(repo) = &self.repository else {
            return Err(ManagerError::NotFound(name.to_string()));
        };
        let m = repo.model(name).map_err(|e| ManagerError::LoadFailed {
            name: name.to_string(),
            reason: e.to_string(),
        })?;
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
    ) -> Result<ModelInfo, ManagerError> {
        self.load_if_needed(name, config_override, false).await
    }

    /// [`Self::load`]; with `unless_ready`, a model found READY once its turn comes (another
    /// request's load won) is left as it is, so that many first requests cause one load.
    async fn load_if_needed(
        &self,
        name: &str,
        config_override: Option<&str>,
        unless_ready: bool,
    ) -> Result<ModelInfo, ManagerError> {
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
                        .ok_or_else(|| ManagerError::NotFound(name.to_string()))?
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
            Ok(b) => b,
            Err(e) => {
                if !was_ready {
                    self.set_state(name, ModelState::Failed, &e.to_string())
                        .await;
                }
                return Err(e);
            }
        };
        let config = match config_override.filter(|s| !s.trim().is_empty()) {
            Some(json) => base.with_override(json),
            None => base.validate_declared().map(|_| base.clone()),
        }
        .map_err(|source| ManagerError::BadConfig {
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
    ) -> Result<ModelInfo, ManagerError> {
        let started = Instant::now();
        let timeout = self.options.load_timeout;
        let _slot = tokio::time::timeout(timeout, self.load_slots.clone().acquire_owned())
            .await
            .map_err(|_| ManagerError::LoadSlots {
                name: name.to_string(),
                max: self.options.max_concurrent_loads.max(1),
                waited: timeout,
            })?
            .map_err(|_| ManagerError::LoadFailed {
                name: name.to_string(),
                reason: "the server is shutting down".into(),
            })?;
        let estimate = match &dir {
            Some(d) => estimate_bytes(d, self.options.size_factor).map_err(|e| {
                ManagerError::LoadFailed {
                    name: name.to_string(),
                    reason: format!("cannot read {}: {e}", d.display()),
                }
            })?,
            None => 0,
        };
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let key = format!("{name}#{generation}");
        let old_key = self.entries.read().get(name).and_then(|e| e.key.clone());
        let mut request = LoadRequest::new(key.clone(), estimate)
            .with_placement(placement_of(&config))
            .with_pinned(config.pinned);
        if let Some(old) = &old_key {
            request = request.with_keep(old.clone());
        }
        let admission =
            self.allocator
                .lock()
                .admit(&request)
                .map_err(|e| ManagerError::NoRoom {
                    name: name.to_string(),
                    reason: e.to_string(),
                })?;
        self.evict(&admission.evict, name).await;
        let device = admission.device;
        tracing::info!(model = name, %device, estimate = %format_bytes(estimate), "loading");
        let before = resident_bytes();
        let backend_options = self.options.backend.clone();
        let built = tokio::task::spawn_blocking({
            let config = config.clone();
            let dir = dir.clone();
            move || -> Result<Arc<dyn Model>, String> {
                let model = backend::instantiate(config, dir.as_deref(), device, &backend_options)
                    .map_err(|e| e.to_string())?;
                warmup::run(model.as_ref(), dir.as_deref())
                    .map_err(|e| format!("warm-up failed: {e}"))?;
                Ok(model)
            }
        });
        let remaining = timeout.saturating_sub(started.elapsed());
        let outcome = match tokio::time::timeout(remaining, built).await {
            Err(_) => Err(ManagerError::LoadTimeout {
                name: name.to_string(),
                timeout,
            }),
            Ok(Err(join)) => Err(ManagerError::LoadFailed {
                name: name.to_string(),
                reason: format!("the backend panicked while loading: {join}"),
            }),
            Ok(Ok(Err(reason))) => Err(ManagerError::LoadFailed {
                name: name.to_string(),
                reason,
            }),
            Ok(Ok(Ok(model))) => Ok(model),
        };
        let model = match outcome {
            Ok(m) => m,
            Err(e) => {
                self.allocator.lock().release(&key);
                return Err(e);
            }
        };
        let measured = match model.memory_bytes() {
            Some(bytes) => bytes,
            None => match resident_bytes().saturating_sub(before) {
                0 => estimate,
                grew => grew,
            },
        };
        let charged = self.allocator.lock().charge(&key, measured);
        match charged {
            Ok(victims) => self.evict(&victims, name).await,
            Err(e) => {
                self.allocator.lock().release(&key);
                return Err(ManagerError::NoRoom {
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
        self.supervise(&child, worker.clone()).await;
        let (old, old_child) = {
            let mut entries = self.entries.write();
            let Some(e) = entries.get_mut(name) else {
                self.allocator.lock().release(&key);
                return Err(ManagerError::NotFound(name.to_string()));
            };
            e.config = effective;
            e.version = version;
            e.state = ModelState::Ready;
            e.reason.clear();
            e.key = Some(key);
            (e.worker.replace(worker), e.child.replace(child))
        };
        self.announce(
            name,
            ModelState::Ready,
            if was_ready { "reloaded" } else { "" },
        )
        .await;
        tracing::info!(model = name, %device, measured = %format_bytes(measured), took_ms = started.elapsed().as_millis() as u64, "loaded");
        if let Some(old) = old {
            // Requests already queued on the old version finish there.
            let grace = self.options.unload_grace;
            let root = self.tree.read().clone();
            let allocator = self.allocator.clone();
            tokio::spawn(async move {
                old.stop(grace).await;
                if let Some(child) = old_child {
                    Self::unsupervise(root, &child).await;
                }
                if let Some(old_key) = old_key {
                    allocator.lock().release(&old_key);
                }
            });
        }
        self.info(name)
    }

    /// Unloads the models the allocator evicted (they are idle: no request in flight).
    async fn evict(&self, victims: &[String], for_model: &str) {
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
                    let root = self.tree.read().clone();
                    Self::unsupervise(root, &child).await;
                }
                self.set_state(&name, ModelState::NotLoaded, &reason).await;
            }
            self.allocator.lock().release(key);
        }
    }

    /// Unloads a model: new requests are refused at once, queued and running ones get the grace
    /// period to finish, then are failed with a message saying the model was unloaded.
    pub async fn unload(&self, name: &str) -> Result<ModelInfo, ManagerError> {
        let op = self
            .entries
            .read()
            .get(name)
            .ok_or_else(|| ManagerError::NotFound(name.to_string()))?
            .op
            .clone();
        let _op = op.lock().await;
        let (worker, child, key) = {
            let mut entries = self.entries.write();
            let e = entries
                .get_mut(name)
                .ok_or_else(|| ManagerError::NotFound(name.to_string()))?;
            e.state = ModelState::Unloading;
            (e.worker.take(), e.child.take(), e.key.take())
        };
        self.announce(name, ModelState::Unloading, "").await;
        if let Some(w) = worker {
            w.stop(self.options.unload_grace).await;
        }
        if let Some(child) = child {
            let root = self.tree.read().clone();
            Self::unsupervise(root, &child).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn manager() -> ModelManager {
        ModelManager::new(
            ExecutionPool::new(1).unwrap(),
            ManagerOptions {
                unload_grace: Duration::from_secs(5),
                fault_injection: true,
                ..ManagerOptions::default()
            },
            Bus::new(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn state_changes_are_published_in_order() {
        let m = manager();
        let mut sub = m
            .bus
            .subscribe(
                "models.cost.>",
                veraltheim_bus::SubscribeOptions::new(16, veraltheim_bus::WhenFull::Reject),
            )
            .unwrap();
        m.load("cost", None).await.unwrap();
        m.unload("cost").await.unwrap();
        let mut states = Vec::new();
        for _ in 0..4 {
            let e = tokio::time::timeout(Duration::from_secs(5), sub.recv())
                .await
                .unwrap_or_else(|_| panic!("only got {states:?}"))
                .unwrap();
            states.push(e.attributes["state"].clone());
        }
        assert_eq!(states, ["LOADING", "READY", "UNLOADING", "NOT_LOADED"]);
    }

    #[tokio::test]
    async fn load_unload_reload_cycle() {
        let m = manager();
        assert!(matches!(
            m.worker("cost"),
            Err(ManagerError::NotReady { .. })
        ));
        let info = m.load("cost", None).await.unwrap();
        assert_eq!(info.state, ModelState::Ready);
        assert!(m.worker("cost").is_ok());
        let info = m
            .load("cost", Some(r#"{"max_batch_size": 8}"#))
            .await
            .unwrap();
        assert_eq!(info.config.max_batch_size, 8);
        assert_eq!(m.worker("cost").unwrap().config().max_batch_size, 8);
        let info = m.unload("cost").await.unwrap();
        assert_eq!(info.state, ModelState::NotLoaded);
        assert!(m.worker("cost").is_err());
    }

    #[tokio::test]
    async fn a_bad_reload_keeps_the_old_version_serving() {
        let m = manager();
        m.load("cost", None).await.unwrap();
        let err = m
            .load(
                "cost",
                Some(r#"{"parameters":{"base_us":{"string_value":"slow"}}}"#),
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("base_us"), "{err}");
        assert_eq!(m.info("cost").unwrap().state, ModelState::Ready);
        assert_eq!(m.worker("cost").unwrap().config().max_batch_size, 64);
        let err = m.load("cost", Some("not json")).await.unwrap_err();
        assert!(matches!(err, ManagerError::BadConfig { .. }));
    }

    #[tokio::test]
    async fn a_failed_first_load_is_failed_with_its_reason() {
        let m = manager();
        let err = m
            .load(
                "cost",
                Some(r#"{"parameters":{"per_item_us":{"string_value":"x"}}}"#),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, ManagerError::LoadFailed { .. }));
        let info = m.info("cost").unwrap();
        assert_eq!(info.state, ModelState::Failed);
        assert!(info.reason.contains("per_item_us"));
        assert!(matches!(
            m.load("nope", None).await,
            Err(ManagerError::NotFound(_))
        ));
    }

    struct Repo(std::path::PathBuf);

    impl Drop for Repo {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A repository of built-in-backed models: (name, builtin, memory_bytes, extra config JSON
    /// fields, version folders, bytes of files in the last version).
    /// (name, builtin, memory_bytes, extra config JSON, version folders, bytes in the last).
    type RepoModelSpec<'a> = (&'a str, &'a str, u64, &'a str, &'a [u64], usize);

    fn repo(models: &[RepoModelSpec<'_>]) -> Repo {
        static N: AtomicU64 = AtomicU64::new(0);
        let root = std::env::temp_dir().join(format!(
            "veraltheim-manager-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        for (name, kind, memory, extra, versions, file_bytes) in models {
            let dir = root.join(name);
            std::fs::create_dir_all(&dir).unwrap();
            let mut config = builtin::config(kind).unwrap();
            config.name = String::new();
            config.parameters.insert(
                "builtin".into(),
                veraltheim_models::config::Parameter {
                    string_value: kind.to_string(),
                },
            );
            config.parameters.insert(
                "memory_bytes".into(),
                veraltheim_models::config::Parameter {
                    string_value: memory.to_string(),
                },
            );
            let mut json: serde_json::Value = serde_json::from_str(&config.to_json()).unwrap();
            let extra: serde_json::Value =
                serde_json::from_str(if extra.is_empty() { "{}" } else { extra }).unwrap();
            for (k, v) in extra.as_object().unwrap() {
                json[k] = v.clone();
            }
            std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
            for v in *versions {
                std::fs::create_dir_all(dir.join(v.to_string())).unwrap();
            }
            if let Some(last) = versions.last() {
                std::fs::write(
                    dir.join(last.to_string()).join("weights"),
                    vec![0u8; *file_bytes],
                )
                .unwrap();
            }
        }
        Repo(root)
    }

    fn with_repo(repo: &Repo, cpu_bytes: u64) -> ModelManager {
        ModelManager::new(
            ExecutionPool::new(1).unwrap(),
            ManagerOptions {
                unload_grace: Duration::from_secs(5),
                repository: Some(repo.0.clone()),
                budgets: vec![Budget::new(DeviceId::Cpu, cpu_bytes, 0)],
                size_factor: 1.0,
                ..ManagerOptions::default()
            },
            Bus::new(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn a_gpu_that_appears_after_start_gets_a_budget_and_a_lost_one_none() {
        let m = ModelManager::new(
            ExecutionPool::new(1).unwrap(),
            ManagerOptions {
                gpu_reserve_bytes: 1 << 30,
                ..ManagerOptions::default()
            },
            Bus::new(),
        )
        .unwrap();
        let gpu0 = |m: &ModelManager| {
            m.memory()
                .into_iter()
                .find(|u| u.device == DeviceId::Gpu(0))
        };
        assert!(gpu0(&m).is_none(), "no GPU at start");
        let gpu = GpuInfo {
            index: 0,
            name: "late".into(),
            memory_total_bytes: 16 << 30,
            memory_used_bytes: 2 << 30,
            ..GpuInfo::default()
        };
        m.follow_gpus(std::slice::from_ref(&gpu));
        let usage = gpu0(&m).expect("the GPU that appeared has a budget");
        assert_eq!(usage.reserve_bytes, 1 << 30);
        // Capacity less what others hold (2 GiB), less the reserve.
        assert_eq!(usage.budget_bytes, (16 << 30) - (2 << 30) - (1 << 30));
        m.follow_gpus(&[GpuInfo { lost: true, ..gpu }]);
        assert_eq!(gpu0(&m).unwrap().budget_bytes, 0);
    }

    #[tokio::test]
    async fn repository_models_serve_their_latest_version() {
        let r = repo(&[
            ("a", "identity", 10, "", &[1, 2], 0),
            (
                "pinned_v1",
                "identity",
                10,
                r#"{"version_policy":{"specific":{"versions":[1]}}}"#,
                &[1, 2],
                0,
            ),
        ]);
        let m = with_repo(&r, 1000);
        assert!(m.names().contains(&"a".to_string()));
        let info = m.load("a", None).await.unwrap();
        assert_eq!(info.version, "2");
        assert_eq!(info.versions, [1, 2]);
        assert_eq!(info.device, Some(DeviceId::Cpu));
        assert_eq!(info.memory_bytes, 10);
        assert!(m.check_version("a", "2").is_ok());
        assert!(matches!(
            m.check_version("a", "1"),
            Err(ManagerError::NoSuchVersion { serving: 2, .. })
        ));
        assert_eq!(m.load("pinned_v1", None).await.unwrap().version, "1");
        // A new version folder serves at the next load.
        std::fs::create_dir_all(r.0.join("a/3")).unwrap();
        assert_eq!(m.load("a", None).await.unwrap().version, "3");
    }

    #[tokio::test]
    async fn eviction_is_least_recently_used_and_spares_pinned_and_busy_models() {
        let r = repo(&[
            ("a", "identity", 100, r#"{"pinned": true}"#, &[1], 0),
            ("b", "identity", 100, "", &[1], 0),
            ("c", "identity", 100, "", &[1], 0),
            ("d", "identity", 100, "", &[1], 0),
        ]);
        let m = with_repo(&r, 300);
        for name in ["a", "b", "c"] {
            m.load(name, None).await.unwrap();
        }
        // b is used after c: c is now the least recently used unpinned model.
        drop(m.acquire("b").unwrap());
        m.load("d", None).await.unwrap();
        let c = m.info("c").unwrap();
        assert_eq!(c.state, ModelState::NotLoaded);
        assert!(
            c.reason.contains("evicted to make room for 'd'"),
            "{}",
            c.reason
        );
        assert_eq!(m.info("a").unwrap().state, ModelState::Ready);
        assert_eq!(m.info("b").unwrap().state, ModelState::Ready);
        // With b and d busy and a pinned, nothing can make room for c.
        let _b = m.acquire("b").unwrap();
        let _d = m.acquire("d").unwrap();
        let err = m.load("c", None).await.unwrap_err();
        assert!(matches!(err, ManagerError::NoRoom { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("cpu budget") && msg.contains("pinned"),
            "{msg}"
        );
        assert_eq!(m.info("c").unwrap().state, ModelState::Failed);
        let held: u64 = m.memory().iter().map(|d| d.held_bytes).sum();
        assert_eq!(held, 300);
    }

    #[tokio::test]
    async fn a_model_too_big_for_the_budget_is_refused_by_its_estimate() {
        let r = repo(&[("big", "identity", 0, "", &[1], 4096)]);
        let m = with_repo(&r, 1024);
        let err = m.load("big", None).await.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ManagerError::NoRoom { .. }), "{msg}");
        assert!(
            msg.contains("4.00 KiB") && msg.contains("cpu budget"),
            "{msg}"
        );
        assert!(m.memory()[0].holders.is_empty());
    }

    #[tokio::test]
    async fn load_on_demand_loads_at_the_first_request_only_when_allowed() {
        let r = repo(&[
            (
                "lazy",
                "identity",
                0,
                r#"{"load_on_demand": true}"#,
                &[1],
                0,
            ),
            ("strict", "identity", 0, "", &[1], 0),
        ]);
        let m = with_repo(&r, 1000);
        let (worker, _hold) = m
            .acquire_or_load("lazy", Some(Instant::now() + Duration::from_secs(10)))
            .await
            .unwrap();
        assert_eq!(worker.name(), "lazy");
        assert_eq!(m.info("lazy").unwrap().state, ModelState::Ready);
        assert!(matches!(
            m.acquire_or_load("strict", None).await,
            Err(ManagerError::NotReady { .. })
        ));
    }

    #[tokio::test]
    async fn many_first_requests_cause_one_load() {
        let r = repo(&[(
            "lazy",
            "identity",
            0,
            r#"{"load_on_demand": true}"#,
            &[1],
            0,
        )]);
        let m = Arc::new(with_repo(&r, 1000));
        let mut sub = m
            .bus
            .subscribe(
                "models.lazy.state",
                veraltheim_bus::SubscribeOptions::new(64, veraltheim_bus::WhenFull::Reject),
            )
            .unwrap();
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let m = m.clone();
                tokio::spawn(async move { m.acquire_or_load("lazy", None).await.map(|_| ()) })
            })
            .collect();
        for c in calls {
            c.await.unwrap().unwrap();
        }
        let mut states = Vec::new();
        while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(200), sub.recv()).await {
            states.push(e.attributes["state"].clone());
        }
        assert_eq!(
            states,
            ["LOADING", "READY"],
            "one load, not one per request"
        );
    }

    #[tokio::test]
    async fn broken_folders_are_listed_with_their_reason_and_fail_to_load() {
        let r = repo(&[("ok", "identity", 0, "", &[1], 0)]);
        std::fs::create_dir_all(r.0.join("broken")).unwrap();
        std::fs::write(r.0.join("broken/config.json"), "{oops").unwrap();
        let m = with_repo(&r, 1000);
        let broken = m.info("broken").unwrap();
        assert!(
            broken.reason.contains("not valid JSON"),
            "{}",
            broken.reason
        );
        let err = m.load("broken", None).await.unwrap_err();
        assert!(err.to_string().contains("not valid JSON"), "{err}");
        assert_eq!(m.info("broken").unwrap().state, ModelState::Failed);
        // Fixed on disk: the next load reads it again.
        std::fs::write(
            r.0.join("broken/config.json"),
            std::fs::read_to_string(r.0.join("ok/config.json")).unwrap(),
        )
        .unwrap();
        std::fs::create_dir_all(r.0.join("broken/1")).unwrap();
        assert_eq!(
            m.load("broken", None).await.unwrap().state,
            ModelState::Ready
        );
    }
}
