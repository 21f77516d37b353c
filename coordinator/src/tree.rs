//! The coordinator as a supervision tree (the seed's design):
//!
//! ```text
//! SystemSupervisor
//! ├── OrchestrationSupervisor   KubernetesSupervisor, LocalExecutor, NodeRegistry, ResourceMonitor
//! ├── MessageBusSupervisor      QueueManager, EventRouter, NatsBridge (with --nats-url)
//! ├── StorageSupervisor         KVCacheManager, PersistenceManager, AuditLog
//! ├── AICoordinatorSupervisor   FastPathProcessor (one supervisor per loaded model), SlowPathOrchestrator
//! └── API                       AuthFile (with an auth file), grpc, http
//! ```
//!
//! Children start in this order and stop in reverse, so on shutdown the API stops taking work
//! before the models drain. `SlowPathOrchestrator` runs the job runner (scheduler and the
//! executor `jobs.executor` names: local processes or Kubernetes Jobs); `QueueManager` publishes
//! job state changes on the bus; `NatsBridge` carries the bridged topics' events to and from
//! NATS JetStream (`veraltheim_bus::nats`: an outage is its state, not its failure; a panic is
//! restarted here, its buffer and counters kept); `KubernetesSupervisor` and `LocalExecutor`
//! hold their places in the tree (the executors supervise their own watchers and processes).
//!
//! Model workers reach the tree through [`TreeHost`], the model manager's
//! [`WorkerHost`]: FastPathProcessor's first child, `ModelHost`, takes its supervisor's handle
//! from its own context and starts every model's supervisor beside itself — at once for a new
//! model, and all of them again whenever FastPathProcessor comes back from a restart (it
//! restarts from its spec, without the children added at run time).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use veraltheim_bus::{Bus, Event};
use veraltheim_storage::{RedbStore, Store};
use veraltheim_supervisor::{
    Backoff, BoxError, ChildContext, ChildSpec, Restart, Shutdown, SupervisorEvent,
    SupervisorHandle, SupervisorSpec,
};

use std::collections::BTreeMap;

use parking_lot::Mutex;
use veraltheim_fastpath::ModelWorker;
use veraltheim_serving::{ModelManager, ResponseCache, WorkerHost};
use veraltheim_supervisor::Error as SupervisorError;

use crate::devices::Devices;
use crate::jobs::JobRunner;

const FAST_PATH_NAME: &str = "FastPathProcessor";

/// Supervisor events waiting for the EventRouter; beyond it they are dropped (and logged), since
/// the hook that produces them must never block a supervisor.
const EVENT_BACKLOG: usize = 4096;

type BoxFuture = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>;

/// What the API workers serve: built by the caller, each call serves until the token fires.
pub type ServeFn = Arc<dyn Fn(ChildContext) -> BoxFuture + Send + Sync>;

pub struct TreeParts {
    pub bus: Bus,
    pub models: Arc<ModelManager>,
    pub host: Arc<TreeHost>,
    pub devices: Arc<Devices>,
    pub cache: ResponseCache,
    pub store: Arc<RedbStore>,
    pub jobs: JobRunner,
    pub job_events: mpsc::Receiver<Event>,
    pub grpc: ServeFn,
    pub http: ServeFn,
    /// The audit log's writer (`crate::audit`), in the StorageSupervisor.
    pub audit_log: ChildSpec,
    /// Keeps this node in the node registry (`crate::cluster`), in the OrchestrationSupervisor.
    pub node_registry: ChildSpec,
    /// Samples this process's CPU for the job runner (`crate::pressure`), in the
    /// AICoordinatorSupervisor.
    pub pressure: ChildSpec,
    /// Re-reads the auth file when it changes (with authentication on), in the API supervisor.
    pub auth_file: Option<ChildSpec>,
    /// The bridge of events to NATS JetStream (with `--nats-url`), in the MessageBusSupervisor.
    pub nats_bridge: Option<Arc<veraltheim_bus::nats::NatsBridge>>,
    /// Reads the models' latency objectives (`crate::objectives`), in the AICoordinatorSupervisor.
    pub objectives: ChildSpec,
    pub shutdown_grace: Duration,
}

/// A worker that holds its place in the tree and does nothing until stopped.
fn idle(name: &str) -> ChildSpec {
    ChildSpec::worker(name, |ctx: ChildContext| async move {
        ctx.cancelled().await;
        Ok(())
    })
}

/// A supervisor restarted in a tight loop would spend its parent's whole restart intensity in
/// milliseconds; a short growing delay lets what it depends on (a file lock, a port) come free.
fn subsystem(spec: SupervisorSpec) -> ChildSpec {
    ChildSpec::supervisor(spec).backoff(
        Backoff::exponential(Duration::from_millis(100), Duration::from_secs(5))
            .reset_after(Duration::from_secs(30)),
    )
}

fn restart_backoff() -> Backoff {
    Backoff::exponential(Duration::from_millis(10), Duration::from_secs(1))
        .reset_after(Duration::from_secs(30))
}

/// The model manager's [`WorkerHost`] in the server: each model worker runs under its own
/// supervisor beside `ModelHost` in FastPathProcessor.
#[derive(Default)]
pub struct TreeHost {
    state: Mutex<HostState>,
}

#[derive(Default)]
struct HostState {
    /// FastPathProcessor's running incarnation, as `ModelHost` last saw it start.
    fast_path: Option<SupervisorHandle>,
    /// Every worker the manager runs now, by child name.
    workers: BTreeMap<String, Arc<ModelWorker>>,
}

impl TreeHost {
    pub fn new() -> Self {
        Self::default()
    }
}

async fn attach(fast_path: &SupervisorHandle, child: &str, worker: Arc<ModelWorker>) {
    match fast_path.start_child(model_child(child, worker)).await {
        Ok(()) | Err(SupervisorError::AlreadyPresent { .. }) => {}
        // FastPathProcessor is between incarnations: `ModelHost` attaches the worker when it
        // comes back.
        Err(e) => tracing::info!(child, error = %e, "model worker waits for FastPathProcessor"),
    }
}

impl WorkerHost for TreeHost {
    fn start<'a>(
        &'a self,
        child: &'a str,
        worker: Arc<ModelWorker>,
    ) -> futures::future::BoxFuture<'a, ()> {
        // Registered and read under one lock with `ModelHost`'s start: whichever comes second
        // attaches the worker (twice is harmless: AlreadyPresent).
        let fast_path = {
            let mut state = self.state.lock();
            state.workers.insert(child.to_string(), worker.clone());
            state.fast_path.clone()
        };
        Box::pin(async move {
            if let Some(fast_path) = fast_path {
                attach(&fast_path, child, worker).await;
            }
        })
    }

    fn stop<'a>(&'a self, child: &'a str) -> futures::future::BoxFuture<'a, ()> {
        let fast_path = {
            let mut state = self.state.lock();
            state.workers.remove(child);
            state.fast_path.clone()
        };
        Box::pin(async move {
            if let Some(fast_path) = fast_path {
                let _ = fast_path.terminate_child(child).await;
                let _ = fast_path.delete_child(child).await;
            }
        })
    }
}

/// FastPathProcessor's first child: tells the [`TreeHost`] which incarnation of its supervisor
/// runs, and (re)attaches every running model worker to it.
fn model_host(host: Arc<TreeHost>) -> ChildSpec {
    ChildSpec::worker("ModelHost", move |ctx: ChildContext| {
        let host = host.clone();
        async move {
            let fast_path = ctx.supervisor().clone();
            let workers: Vec<_> = {
                let mut state = host.state.lock();
                state.fast_path = Some(fast_path.clone());
                state
                    .workers
                    .iter()
                    .map(|(c, w)| (c.clone(), w.clone()))
                    .collect()
            };
            for (child, worker) in workers {
                tracing::info!(child, "attaching model worker");
                attach(&fast_path, &child, worker).await;
            }
            ctx.cancelled().await;
            Ok(())
        }
    })
    .backoff(restart_backoff())
}

/// The supervisor of one loaded model: its batcher loop, restarted after a backend panic.
fn model_child(child: &str, worker: Arc<veraltheim_fastpath::ModelWorker>) -> ChildSpec {
    let batcher = ChildSpec::worker("batcher", move |ctx: ChildContext| {
        let worker = worker.clone();
        async move {
            worker
                .run(ctx.token())
                .await
                .map_err(|e| Box::new(e) as BoxError)
        }
    })
    // A drained worker ends normally and stays ended; a panic restarts it.
    .restart(Restart::Transient)
    .backoff(restart_backoff());
    ChildSpec::supervisor(
        SupervisorSpec::new(child)
            .intensity(5, Duration::from_secs(10))
            .child(batcher),
    )
    .restart(Restart::Transient)
    .backoff(Backoff::exponential(
        Duration::from_millis(100),
        Duration::from_secs(5),
    ))
}

fn event_for(e: &SupervisorEvent) -> Option<Event> {
    let (topic, message, supervisor, child, extra): (
        &str,
        String,
        &str,
        &str,
        Vec<(&str, String)>,
    ) = match e {
        SupervisorEvent::ChildStarted { .. } => return None,
        SupervisorEvent::ChildRestarted {
            supervisor,
            child,
            restarts,
        } => (
            "supervisor.restarted",
            format!("{supervisor}/{child} restarted ({restarts} restarts)"),
            supervisor,
            child,
            vec![("restarts", restarts.to_string())],
        ),
        SupervisorEvent::ChildStartFailed {
            supervisor,
            child,
            reason,
        } => (
            "supervisor.start_failed",
            format!("{supervisor}/{child} failed to start: {reason}"),
            supervisor,
            child,
            vec![("reason", reason.clone())],
        ),
        SupervisorEvent::ChildExited {
            supervisor,
            child,
            exit,
        } if exit.is_abnormal() => (
            "supervisor.failed",
            format!("{supervisor}/{child} {exit}"),
            supervisor,
            child,
            vec![("reason", exit.to_string())],
        ),
        SupervisorEvent::ChildExited { .. } => return None,
        SupervisorEvent::Escalated { supervisor, reason } => (
            "supervisor.escalated",
            format!("{supervisor} gave up: {reason}"),
            supervisor,
            "",
            vec![("reason", reason.clone())],
        ),
    };
    let mut event = Event::new(topic, message)
        .with_attribute("supervisor", supervisor)
        .with_attribute("child", child);
    for (k, v) in extra {
        event = event.with_attribute(k, v);
    }
    Some(event)
}

/// Forwards supervisor events to the bus.
fn event_router(rx: mpsc::Receiver<SupervisorEvent>, bus: Bus) -> ChildSpec {
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    ChildSpec::worker("EventRouter", move |ctx: ChildContext| {
        let (rx, bus) = (rx.clone(), bus.clone());
        async move {
            let mut rx = rx.lock().await;
            loop {
                let e = tokio::select! {
                    _ = ctx.cancelled() => return Ok(()),
                    e = rx.recv() => match e {
                        Some(e) => e,
                        None => return Ok(()),
                    },
                };
                if let Some(event) = event_for(&e)
                    && let Err(err) = bus.publish(event).await
                {
                    tracing::warn!(error = %err, "supervisor event not published");
                }
            }
        }
    })
    .backoff(restart_backoff())
}

/// Carries events to and from NATS JetStream until stopped. NATS being away is the bridge's
/// state (it reconnects and buffers by itself); only a panic ends it early, and then it is
/// restarted with the same buffer and counters.
fn nats_bridge(bridge: Arc<veraltheim_bus::nats::NatsBridge>) -> ChildSpec {
    ChildSpec::worker("NatsBridge", move |ctx: ChildContext| {
        let bridge = bridge.clone();
        async move {
            bridge.run(ctx.cancelled()).await;
            Ok(())
        }
    })
    .backoff(restart_backoff())
}

/// The durable store's keeper. The store is opened once at start (so that the slow path can
/// recover its jobs before anything runs); this worker reports its commit statistics. The
/// StorageSupervisor stops after the API and the AICoordinator (reverse start order), so no job
/// or model write is still in flight when it goes.
fn persistence(store: Arc<RedbStore>) -> ChildSpec {
    ChildSpec::worker("PersistenceManager", move |ctx: ChildContext| {
        let store = store.clone();
        async move {
            loop {
                tokio::select! {
                    _ = ctx.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                }
                let s = store.stats();
                tracing::debug!(
                    commits = s.commits,
                    batches = s.batches,
                    queued = s.queued,
                    "store"
                );
            }
        }
    })
    .backoff(restart_backoff())
}

/// Publishes the slow path's job state changes on the bus, in the order they became durable.
fn queue_manager(rx: mpsc::Receiver<Event>, bus: Bus) -> ChildSpec {
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    ChildSpec::worker("QueueManager", move |ctx: ChildContext| {
        let (rx, bus) = (rx.clone(), bus.clone());
        async move {
            let mut rx = rx.lock().await;
            loop {
                let event = tokio::select! {
                    _ = ctx.cancelled() => return Ok(()),
                    e = rx.recv() => match e {
                        Some(e) => e,
                        None => return Ok(()),
                    },
                };
                if let Err(err) = bus.publish(event).await {
                    tracing::warn!(error = %err, "job event not published");
                }
            }
        }
    })
    .backoff(restart_backoff())
}

/// The slow path's scheduling loop.
fn slow_path(runner: JobRunner) -> ChildSpec {
    ChildSpec::worker("SlowPathOrchestrator", move |ctx: ChildContext| {
        let runner = runner.clone();
        async move {
            runner.run(ctx.token().clone()).await;
            Ok(())
        }
    })
    .backoff(restart_backoff())
}

/// The response cache's owner: a (re)start begins with an empty cache, as an OTP process
/// restarts from its initial state.
fn cache_manager(cache: ResponseCache) -> ChildSpec {
    ChildSpec::worker("KVCacheManager", move |ctx: ChildContext| {
        let cache = cache.clone();
        async move {
            cache.clear();
            ctx.cancelled().await;
            Ok(())
        }
    })
    .backoff(restart_backoff())
}

/// Samples the devices, publishes what changed and lets the allocator follow the GPUs' memory.
fn resource_monitor(devices: Arc<Devices>, bus: Bus, models: Arc<ModelManager>) -> ChildSpec {
    ChildSpec::worker("ResourceMonitor", move |ctx: ChildContext| {
        let (devices, bus, models) = (devices.clone(), bus.clone(), models.clone());
        async move {
            loop {
                devices.sample_and_publish(&bus).await;
                models.follow_gpus(&devices.snapshot().gpus);
                tokio::select! {
                    _ = ctx.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(devices.interval()) => {}
                }
            }
        }
    })
    .backoff(restart_backoff())
}

fn server(name: &str, serve: ServeFn, grace: Duration) -> ChildSpec {
    ChildSpec::worker(name, move |ctx: ChildContext| {
        let serve = serve.clone();
        async move { serve(ctx).await.map_err(|e| e.into()) }
    })
    .shutdown(Shutdown::Timeout(grace + Duration::from_secs(1)))
    .backoff(restart_backoff())
}

/// Starts the tree; returns its root.
pub async fn start(parts: TreeParts) -> anyhow::Result<SupervisorHandle> {
    let (tx, rx) = mpsc::channel(EVENT_BACKLOG);
    let hook = move |e: SupervisorEvent| {
        match &e {
            SupervisorEvent::ChildRestarted {
                supervisor,
                child,
                restarts,
            } => {
                tracing::warn!(%supervisor, %child, restarts, "child restarted")
            }
            SupervisorEvent::ChildExited {
                supervisor,
                child,
                exit,
            } if exit.is_abnormal() => {
                tracing::warn!(%supervisor, %child, %exit, "child failed")
            }
            SupervisorEvent::Escalated { supervisor, reason } => {
                tracing::error!(%supervisor, %reason, "supervisor gave up")
            }
            _ => {}
        }
        if tx.try_send(e).is_err() {
            tracing::warn!("supervisor event backlog full; event dropped");
        }
    };
    let grace = parts.shutdown_grace;
    // Past its intensity the root gives up and the process exits with an error, for the
    // process manager (systemd, Kubernetes) to restart it: that is the top of the escalation.
    let root = SupervisorSpec::new("SystemSupervisor")
        .intensity(10, Duration::from_secs(60))
        .on_event(hook)
        .child(subsystem(
            SupervisorSpec::new("OrchestrationSupervisor")
                .intensity(10, Duration::from_secs(60))
                .child(idle("KubernetesSupervisor"))
                .child(idle("LocalExecutor"))
                .child(parts.node_registry)
                .child(resource_monitor(
                    parts.devices.clone(),
                    parts.bus.clone(),
                    parts.models.clone(),
                )),
        ))
        .child(subsystem({
            let bus = SupervisorSpec::new("MessageBusSupervisor")
                .intensity(10, Duration::from_secs(60))
                .child(queue_manager(parts.job_events, parts.bus.clone()))
                .child(event_router(rx, parts.bus.clone()));
            match parts.nats_bridge {
                Some(bridge) => bus.child(nats_bridge(bridge)),
                None => bus,
            }
        }))
        .child(subsystem(
            SupervisorSpec::new("StorageSupervisor")
                .intensity(10, Duration::from_secs(60))
                .child(cache_manager(parts.cache.clone()))
                .child(persistence(parts.store.clone()))
                .child(parts.audit_log.backoff(restart_backoff())),
        ))
        .child(subsystem(
            SupervisorSpec::new("AICoordinatorSupervisor")
                .intensity(10, Duration::from_secs(60))
                .child(subsystem(
                    // Each model has its own restart intensity below; this one only guards
                    // against a storm across models.
                    SupervisorSpec::new(FAST_PATH_NAME)
                        .intensity(50, Duration::from_secs(60))
                        .child(model_host(parts.host.clone())),
                ))
                .child(parts.pressure.backoff(restart_backoff()))
                .child(slow_path(parts.jobs.clone()))
                .child(parts.objectives.backoff(restart_backoff())),
        ))
        .child(subsystem({
            let api = SupervisorSpec::new("API").intensity(10, Duration::from_secs(60));
            let api = match parts.auth_file {
                Some(watcher) => api.child(watcher.backoff(restart_backoff())),
                None => api,
            };
            api.child(server("grpc", parts.grpc, grace))
                .child(server("http", parts.http, grace))
        }))
        .start()
        .await?;
    Ok(root)
}
