//! The models the coordinator knows, their load state, and their workers: loading builds the
//! backend off the async threads and starts a fast-path worker; unloading drains it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use parking_lot::RwLock;
use thiserror::Error;
use veraltheim_bus::{Bus, Event};
use veraltheim_fastpath::{ExecutionPool, ModelWorker, WorkerOptions};
use veraltheim_models::{ConfigError, ModelConfig, ModelState, builtin};
use veraltheim_supervisor::{Error as SupervisorError, SupervisorHandle};

use crate::tree::{FAST_PATH, model_child};

/// Every model has one version for now: the one it was loaded with.
pub const MODEL_VERSION: &str = "1";

#[derive(Debug, Error)]
pub enum ManagerError {
    #[error("unknown model '{0}'; `veraltheim models` lists the models this server knows")]
    NotFound(String),
    #[error("model '{name}' has no version '{version}' (it serves version {MODEL_VERSION})")]
    NoSuchVersion { name: String, version: String },
    #[error("model '{name}' is not ready (state {state}{})", if reason.is_empty() { String::new() } else { format!(": {reason}") })]
    NotReady {
        name: String,
        state: ModelState,
        reason: String,
    },
    #[error("cannot load model '{name}': {source}")]
    BadConfig { name: String, source: ConfigError },
    #[error("model '{name}' failed to load: {reason}")]
    LoadFailed { name: String, reason: String },
}

/// What the APIs show of a model.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub name: String,
    pub version: String,
    pub state: ModelState,
    pub reason: String,
    pub config: ModelConfig,
}

struct Entry {
    /// The configuration the model starts from; overrides apply on top of it.
    base: ModelConfig,
    /// The configuration in effect (or last tried).
    config: ModelConfig,
    state: ModelState,
    reason: String,
    worker: Option<Arc<ModelWorker>>,
    /// The worker's name under FastPathProcessor (`model:<name>#<generation>`).
    child: Option<String>,
}

pub struct ModelManager {
    pool: ExecutionPool,
    options: WorkerOptions,
    unload_grace: Duration,
    entries: RwLock<BTreeMap<String, Entry>>,
    /// Loads and unloads happen one at a time so that their state changes never interleave.
    ops: tokio::sync::Mutex<()>,
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

impl ModelManager {
    pub fn new(
        pool: ExecutionPool,
        options: WorkerOptions,
        unload_grace: Duration,
        fault_injection: bool,
        bus: Bus,
    ) -> Result<Self, ConfigError> {
        let mut entries = BTreeMap::new();
        for name in builtin::names(fault_injection) {
            let config = builtin::config(name)?;
            entries.insert(
                name.to_string(),
                Entry {
                    base: config.clone(),
                    config,
                    state: ModelState::NotLoaded,
                    reason: String::new(),
                    worker: None,
                    child: None,
                },
            );
        }
        Ok(ModelManager {
            pool,
            options,
            unload_grace,
            entries: RwLock::new(entries),
            ops: tokio::sync::Mutex::new(()),
            bus,
            tree: RwLock::new(None),
            generation: AtomicU64::new(0),
        })
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

    pub fn check_version(name: &str, version: &str) -> Result<(), ManagerError> {
        if version.is_empty() || version == MODEL_VERSION {
            Ok(())
        } else {
            Err(ManagerError::NoSuchVersion {
                name: name.to_string(),
                version: version.to_string(),
            })
        }
    }

    /// The worker of a READY model.
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
        Ok(Self::to_info(name, e))
    }

    pub fn list(&self) -> Vec<ModelInfo> {
        self.entries
            .read()
            .iter()
            .map(|(name, e)| Self::to_info(name, e))
            .collect()
    }

    fn to_info(name: &str, e: &Entry) -> ModelInfo {
        ModelInfo {
            name: name.to_string(),
            version: MODEL_VERSION.to_string(),
            state: e.state,
            reason: e.reason.clone(),
            config: e.config.clone(),
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

    /// Loads a model, or reloads it with a new configuration. The override (Triton's `config`
    /// JSON) applies to the model's base configuration. A reload that fails leaves the running
    /// version serving.
    pub async fn load(
        &self,
        name: &str,
        config_override: Option<&str>,
    ) -> Result<ModelInfo, ManagerError> {
        let _op = self.ops.lock().await;
        let (base, was_ready) = {
            let entries = self.entries.read();
            let e = entries
                .get(name)
                .ok_or_else(|| ManagerError::NotFound(name.to_string()))?;
            (e.base.clone(), e.state == ModelState::Ready)
        };
        let config = match config_override.filter(|s| !s.trim().is_empty()) {
            Some(json) => base.with_override(json),
            None => base.validate().map(|_| base.clone()),
        }
        .map_err(|source| ManagerError::BadConfig {
            name: name.to_string(),
            source,
        })?;
        if !was_ready {
            self.set_state(name, ModelState::Loading, "").await;
        }
        // Backends may read files and build large structures: keep that off the async threads.
        let built = tokio::task::spawn_blocking({
            let config = config.clone();
            move || builtin::instantiate(config)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        let model = match built {
            Ok(m) => m,
            Err(reason) => {
                if !was_ready {
                    self.set_state(name, ModelState::Failed, &reason).await;
                }
                return Err(ManagerError::LoadFailed {
                    name: name.to_string(),
                    reason,
                });
            }
        };
        let worker = Arc::new(ModelWorker::new(model, self.pool.clone(), &self.options));
        let child = format!(
            "model:{name}#{}",
            self.generation.fetch_add(1, Ordering::Relaxed) + 1
        );
        self.supervise(&child, worker.clone()).await;
        let (old, old_child) = {
            let mut entries = self.entries.write();
            let Some(e) = entries.get_mut(name) else {
                return Err(ManagerError::NotFound(name.to_string()));
            };
            e.config = config;
            e.state = ModelState::Ready;
            e.reason.clear();
            (e.worker.replace(worker), e.child.replace(child))
        };
        self.announce(
            name,
            ModelState::Ready,
            if old.is_some() { "reloaded" } else { "" },
        )
        .await;
        if let Some(old) = old {
            // Requests already queued on the old version finish there.
            let grace = self.unload_grace;
            let root = self.tree.read().clone();
            tokio::spawn(async move {
                old.stop(grace).await;
                if let Some(child) = old_child {
                    Self::unsupervise(root, &child).await;
                }
            });
        }
        self.info(name)
    }

    /// Unloads a model: new requests are refused at once, queued and running ones get the grace
    /// period to finish.
    pub async fn unload(&self, name: &str) -> Result<ModelInfo, ManagerError> {
        let _op = self.ops.lock().await;
        let worker = {
            let mut entries = self.entries.write();
            let e = entries
                .get_mut(name)
                .ok_or_else(|| ManagerError::NotFound(name.to_string()))?;
            e.state = ModelState::Unloading;
            (e.worker.take(), e.child.take())
        };
        self.announce(name, ModelState::Unloading, "").await;
        let (worker, child) = worker;
        if let Some(w) = worker {
            w.stop(self.unload_grace).await;
        }
        if let Some(child) = child {
            let root = self.tree.read().clone();
            Self::unsupervise(root, &child).await;
        }
        self.set_state(name, ModelState::NotLoaded, "unloaded")
            .await;
        self.info(name)
    }

    /// Stops every worker (server shutdown).
    pub async fn shutdown(&self, grace: Duration) {
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
            WorkerOptions::default(),
            Duration::from_secs(5),
            true,
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
}
