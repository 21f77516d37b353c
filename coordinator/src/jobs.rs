//! Batch jobs through `veraltheim.v1.JobService`: the slow path's runner (durable store, scheduler,
//! and the executor `jobs.executor` names: local processes or Kubernetes Jobs) built from the
//! configuration, and the conversions between the wire and the slow path's types. The runner's
//! loop is the SlowPathOrchestrator in the supervision tree.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use futures::StreamExt;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use veraltheim_bus::Event;
use veraltheim_proto::v1::{self, job_service_server::JobService};
use veraltheim_slowpath::job::JobKind;
use veraltheim_slowpath::local::{Cgroups, Limits, RunAs, Sandbox, Shim};
use veraltheim_slowpath::runner::ClusterSelf;
use veraltheim_slowpath::runner::PauseObserver;
use veraltheim_slowpath::sandbox::effective_uid;
use veraltheim_slowpath::{
    AnyJobStore, Executor, GpuReservations, InferenceExecutor, JobBackend, JobRecord, JobSpec,
    JobState, KubernetesConfig, KubernetesExecutor, ListFilter, LocalExecutor, Observer, Pressure,
    QueueConfig, Quota, Resources, RetryPolicy, RunnerConfig, RunnerError, RunnerOn,
    SchedulerConfig, StoreError, Toleration,
};
use veraltheim_storage::RedbStore;
use veraltheim_supervisor::BreakerConfig;

use crate::auth::Caller;
use crate::config::{JobExecutorKind, JobsConfig, KubernetesJobsConfig, LocalJobsConfig};
use crate::stream::StreamOf;
use crate::telemetry::Telemetry;

/// The runner over the job store `storage.url` chose (the embedded store or PostgreSQL).
pub type JobRunner = RunnerOn<AnyJobStore<Arc<RedbStore>>>;

pub struct Jobs {
    pub runner: JobRunner,
    /// How many jobs entered each state since the coordinator started (`/metrics`).
    pub entered: Arc<StateCounters>,
    /// `jobs.default_ttl_seconds`: the TTL of a job submitted without one; `None`: kept.
    default_ttl: Option<u64>,
    /// Where inference jobs may read and write.
    paths: InferencePaths,
    /// What this node offers jobs: its scheduler's capacity and slots (what a cluster's leader
    /// places against).
    pub capacity: Resources,
    pub slots: usize,
}

impl crate::context::JobCounts for Jobs {
    fn live(&self) -> veraltheim_slowpath::LiveCounts {
        self.runner.live_counts()
    }

    fn entered(&self) -> Vec<(JobState, u64)> {
        self.entered.counts().collect()
    }

    fn paused(&self) -> usize {
        self.runner.paused_count()
    }

    fn cpu_capacity_millis(&self) -> u64 {
        self.runner.job_cpu_capacity()
    }
}

/// A count per job state (in [`JobState::ALL`]'s order).
#[derive(Debug, Default)]
pub struct StateCounters([AtomicU64; JobState::ALL.len()]);

impl StateCounters {
    fn add(&self, state: JobState) {
        if let Some(i) = JobState::ALL.iter().position(|s| *s == state) {
            self.0[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Each state with its count.
    pub fn counts(&self) -> impl Iterator<Item = (JobState, u64)> + '_ {
        JobState::ALL
            .iter()
            .zip(&self.0)
            .map(|(s, n)| (*s, n.load(Ordering::Relaxed)))
    }
}

/// The folders inference jobs may read from and write under (`jobs.inference_input_dirs`,
/// `jobs.inference_output_dir`), resolved at start. Without them any client could have the
/// server read any file it can (`--input /etc/passwd`, `/dev/zero`) or overwrite one.
#[derive(Clone, Debug)]
pub struct InferencePaths {
    inputs: Vec<PathBuf>,
    output: PathBuf,
}

impl InferencePaths {
    /// The configured folders, or `<data_dir>/inference` (created) for those unset. Each is
    /// resolved once, so the checks compare resolved paths with resolved paths.
    pub fn from_config(config: &JobsConfig, data_dir: &Path) -> anyhow::Result<Self> {
        let default = data_dir.join("inference");
        let resolve = |dir: &Path, key: &str| {
            std::fs::create_dir_all(dir)
                .and_then(|()| dir.canonicalize())
                .with_context(|| format!("{key}: cannot use the folder {}", dir.display()))
        };
        let inputs = if config.inference_input_dirs.is_empty() {
            vec![resolve(&default, "jobs.inference_input_dirs")?]
        } else {
            config
                .inference_input_dirs
                .iter()
                .map(|d| {
                    d.canonicalize().with_context(|| {
                        format!("jobs.inference_input_dirs: cannot resolve {}", d.display())
                    })
                })
                .collect::<anyhow::Result<_>>()?
        };
        let output = resolve(
            config.inference_output_dir.as_deref().unwrap_or(&default),
            "jobs.inference_output_dir",
        )?;
        Ok(InferencePaths { inputs, output })
    }

    fn allowed(&self) -> String {
        let inputs: Vec<_> = self
            .inputs
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        format!(
            "inputs under {}; output under {}",
            inputs.join(", "),
            self.output.display()
        )
    }

    /// The input and output paths of an inference job, resolved: the input must exist under one
    /// of the input folders, the output's folder must exist under the output folder and its
    /// name must not be a symlink or a folder. A relative path is taken under the (first)
    /// folder. Refused with INVALID_ARGUMENT naming the path and the allowed folders.
    pub fn check(&self, input: &str, output: &str) -> Result<(String, String), Status> {
        let refuse = |what: &str, path: &str, why: String| {
            Status::invalid_argument(format!(
                "inference job {what} path '{path}' {why} ({})",
                self.allowed()
            ))
        };
        let input_path = self.inputs[0].join(input);
        let resolved = input_path
            .canonicalize()
            .map_err(|e| refuse("input", input, format!("cannot be resolved: {e}")))?;
        if !self.inputs.iter().any(|d| resolved.starts_with(d)) {
            return Err(refuse(
                "input",
                input,
                format!(
                    "resolves to {}, outside the allowed folders",
                    resolved.display()
                ),
            ));
        }
        if !resolved.is_file() {
            return Err(refuse("input", input, "is not a regular file".into()));
        }
        let output_path = self.output.join(output);
        let name = match output_path.components().next_back() {
            Some(Component::Normal(name)) => name.to_owned(),
            _ => return Err(refuse("output", output, "does not name a file".into())),
        };
        let parent = output_path
            .parent()
            .unwrap_or(&self.output)
            .canonicalize()
            .map_err(|e| refuse("output", output, format!("has no folder: {e}")))?;
        let resolved_out = parent.join(name);
        if !resolved_out.starts_with(&self.output) {
            return Err(refuse(
                "output",
                output,
                format!(
                    "resolves to {}, outside the allowed folder",
                    resolved_out.display()
                ),
            ));
        }
        if let Ok(meta) = resolved_out.symlink_metadata()
            && !meta.is_file()
        {
            return Err(refuse(
                "output",
                output,
                "exists and is not a regular file".into(),
            ));
        }
        Ok((
            resolved.to_string_lossy().into_owned(),
            resolved_out.to_string_lossy().into_owned(),
        ))
    }
}

impl Jobs {
    /// The runner over `store`, with `capacity` (this machine's; on Kubernetes the configured
    /// one) shared by the configured queues.
    /// Every durable job change comes out of the returned receiver as a `jobs.<id>.state` event
    /// (for the QueueManager to publish).
    /// Inference jobs run through `inference`. With `telemetry`, each attempt that ends becomes
    /// a span. Local jobs that ask for GPUs get them, and their memory, from `gpus` (the model
    /// manager's allocator: `gpujobs.rs`); Kubernetes jobs' GPUs are the cluster's.
    /// Local command jobs follow the fast path's `pressure` (`crate::pressure`): the CPU
    /// capacity it leaves them, and pauses, told as `jobs.<id>.paused` / `jobs.<id>.resumed`
    /// events.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        config: &JobsConfig,
        store: AnyJobStore<Arc<RedbStore>>,
        data_dir: &Path,
        capacity: Resources,
        inference: Arc<dyn InferenceExecutor>,
        telemetry: Option<Arc<Telemetry>>,
        cluster: Option<ClusterSelf>,
        gpus: Option<Arc<dyn GpuReservations>>,
        pressure: tokio::sync::watch::Receiver<Pressure>,
    ) -> anyhow::Result<(Jobs, mpsc::Receiver<Event>)> {
        let (tx, rx) = mpsc::channel(JOB_EVENT_BACKLOG);
        let pause_tx = tx.clone();
        let on_pause: PauseObserver = Arc::new(move |r: &JobRecord| {
            if pause_tx.try_send(pause_event(r)).is_err() {
                tracing::warn!(job = %r.id, "job event backlog full; event dropped");
            }
        });
        let entered = Arc::new(StateCounters::default());
        let counters = entered.clone();
        let observer: Observer = Arc::new(move |r: &JobRecord| {
            // The store tells of a job once when it is submitted and once per transition, each
            // of which changes its state: one count per state entered.
            counters.add(r.state);
            if tx.try_send(job_event(r)).is_err() {
                tracing::warn!(job = %r.id, "job event backlog full; event dropped");
            }
            if let Some(t) = &telemetry {
                t.job_changed(r);
            }
        });
        let paths = InferencePaths::from_config(config, data_dir)?;
        let jobs_dir = data_dir.join("jobs");
        let (exec, capacity, default_running): (Arc<dyn Executor>, _, _) = match config.executor {
            JobExecutorKind::Local => {
                let sandbox = local_sandbox(&config.local)?;
                tracing::info!("{}", sandbox.describe());
                if sandbox.run_as.is_some() {
                    keep_from_jobs(data_dir)?;
                }
                if let Some(folder) = sandbox.unsearchable_ancestor(data_dir) {
                    tracing::warn!(
                        folder = %folder.display(),
                        jobs_dir = %jobs_dir.display(),
                        "jobs run as jobs.local.run_as cannot reach their folders (their HOME) by path: this folder is not searchable by that user. They still start in them, but $HOME/... fails: make it searchable (chmod o+x) or move storage.data_dir"
                    );
                }
                // Every job starts through this binary in shim mode, which kills the job's
                // process group if this process dies (slowpath/src/shim.rs). `Jobs::start` runs
                // in the `veraltheim` binary only (`server::serve`), whose `run` answers it.
                let shim = Shim::current_exe().context(
                    "cannot open this server's own executable (/proc/self/exe), through which local jobs start",
                )?;
                shim.check_runnable_by(sandbox.run_as.as_ref())
                    .map_err(|e| anyhow!("jobs.local.run_as: {e}"))?;
                (
                    Arc::new(
                        LocalExecutor::new(jobs_dir)
                            .with_max_log_bytes(config.max_log_bytes)
                            .with_nice(config.local.nice)
                            .with_idle_class(config.local.idle_class)
                            .with_sandbox(sandbox)
                            .with_shim(shim),
                    ),
                    capacity,
                    std::thread::available_parallelism().map_or(1, |n| n.get()),
                )
            }
            JobExecutorKind::Kubernetes => {
                let k = &config.kubernetes;
                let exec = KubernetesExecutor::connect(kubernetes_config(k, config.max_log_bytes))
                    .await
                    .context("cannot set up the Kubernetes executor")?;
                tracing::info!(
                    namespace = exec.namespace(),
                    "batch jobs run as Kubernetes Jobs"
                );
                let capacity = Resources {
                    cpu_millis: k.cpu_millis.unwrap_or(u64::MAX),
                    memory_bytes: k.memory_bytes.unwrap_or(u64::MAX),
                    gpus: k.gpus.unwrap_or(u32::MAX),
                    gpu_memory_bytes: 0,
                };
                (Arc::new(exec), capacity, KUBERNETES_RUNNING)
            }
        };
        let scheduler = SchedulerConfig {
            capacity,
            queues: config
                .queues
                .iter()
                .map(|q| QueueConfig {
                    name: q.name.clone(),
                    weight: q.weight.max(1),
                    quota: Quota {
                        cpu_millis: q.cpu_millis,
                        memory_bytes: q.memory_bytes,
                        gpus: q.gpus,
                    },
                })
                .collect(),
            priority_classes: config.priority_classes.clone(),
        };
        let max_running = config.max_running.unwrap_or(default_running);
        let node_capacity = scheduler.capacity.clone();
        let runner_config = RunnerConfig {
            scheduler,
            retry: RetryPolicy {
                initial_delay_ms: config.retry_initial_delay_ms,
                max_delay_ms: config.retry_max_delay_ms,
                ..RetryPolicy::default()
            },
            max_running,
            jitter_seed: std::process::id() as u64,
        };
        let store = store.with_observer(observer);
        let local = matches!(config.executor, JobExecutorKind::Local);
        let mut runner = match cluster {
            // One node of several: the leader places jobs on it (see slowpath's runner).
            Some(me) => RunnerOn::in_cluster(store, exec, Some(inference), runner_config, me)?,
            None => RunnerOn::with_executors(store, exec, Some(inference), runner_config)?,
        };
        if let Some(gpus) = gpus.filter(|_| local) {
            runner = runner.with_gpu_reservations(gpus);
        }
        // Local jobs share this node's cores with the fast path; Kubernetes pods run elsewhere.
        let runner = if local {
            runner
                .with_pressure(pressure, config.min_cpu_millis)
                .with_pause_observer(on_pause)
        } else {
            runner
        };
        // Jobs that were waiting or running when the coordinator last stopped line up again.
        runner.start().await?;
        Ok((
            Jobs {
                runner,
                entered,
                default_ttl: config.default_ttl_seconds,
                paths,
                capacity: node_capacity,
                slots: max_running,
            },
            rx,
        ))
    }
}

/// The local executor's sandbox from `[jobs.local]`, resolved now: the user and group, the
/// allowed programs, the cgroup folder. Whatever cannot be resolved is an error naming its key.
pub fn local_sandbox(l: &LocalJobsConfig) -> anyhow::Result<Sandbox> {
    let run_as = l
        .run_as
        .as_deref()
        .map(RunAs::resolve)
        .transpose()
        .map_err(|e| anyhow!("jobs.local.run_as: {e}"))?;
    let me = effective_uid();
    if let Some(r) = &run_as
        && me != 0
    {
        bail!(
            "jobs.local.run_as = \"{}\": only a server running as root can switch users, and this one runs as uid {me}; unset it (jobs then run as the server's user) or start the server as root",
            r.name
        );
    }
    if let Some(n) = l.max_open_files
        && let Some(most) = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
        && n > most
    {
        bail!(
            "jobs.local.max_open_files is {n}, above what the kernel allows a process (fs.nr_open = {most})"
        );
    }
    let limits = Limits {
        address_space_bytes: l.max_address_space_bytes,
        cpu_seconds: l.max_cpu_seconds,
        open_files: l.max_open_files,
        processes: l.max_processes,
    };
    if me != 0
        && let Some((key, value, hard)) = limits.above_own_hard()
    {
        bail!(
            "jobs.local.{key} is {value}, above this server's own hard limit ({hard}), which only root may raise: no job could start"
        );
    }
    let cgroups = l
        .cgroup_dir
        .as_deref()
        .map(Cgroups::open)
        .transpose()
        .map_err(|e| anyhow!("jobs.local.cgroup_dir: {e}"))?;
    let mut sandbox = Sandbox::default();
    sandbox.run_as = run_as;
    sandbox.limits = limits;
    sandbox.path = l.path.clone();
    sandbox.cgroups = cgroups;
    sandbox
        .with_allowed_commands(&l.allowed_commands)
        .map_err(|e| anyhow!("jobs.local.allowed_commands: {e}"))
}

/// With `jobs.local.run_as`, the data dir is the server's alone, not the jobs': every file the
/// server creates from now on is private (umask 077; jobs get 022 back), the data dir becomes
/// 0711 (the jobs' user passes through it to its folders under `jobs/`, and cannot list it),
/// and what is in it already (the job store, the inference folder) loses every permission of
/// group and others. Otherwise a job could read the job store, every tenant's specs and env.
fn keep_from_jobs(data_dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    // SAFETY: umask only sets this process's file-creation mask.
    unsafe {
        libc::umask(0o077);
    }
    let chmod = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).with_context(|| {
            format!(
                "jobs.local.run_as: cannot make {} private to the server",
                path.display()
            )
        })
    };
    chmod(data_dir, 0o711)?;
    let entries = std::fs::read_dir(data_dir)
        .with_context(|| format!("cannot read the data dir {}", data_dir.display()))?;
    for entry in entries {
        let entry = entry?;
        let meta = entry.metadata()?;
        if entry.file_name() != "jobs" && !meta.file_type().is_symlink() {
            chmod(&entry.path(), meta.permissions().mode() & 0o700)?;
        }
    }
    Ok(())
}

/// Whether local command jobs may run as they are configured, given whether authentication is
/// on (`server.auth_file`). A server running as root with authentication on must name
/// `jobs.local.run_as`: anyone allowed `jobs.submit` could otherwise run commands as root.
/// Without authentication (on loopback, or with `--insecure-no-auth`) that is only warned
/// about, as is a server whose jobs run as its own user, able to read its files.
pub fn check_run_as(config: &JobsConfig, auth_on: bool) -> anyhow::Result<()> {
    check_run_as_for(config, auth_on, effective_uid())
}

fn check_run_as_for(config: &JobsConfig, auth_on: bool, euid: u32) -> anyhow::Result<()> {
    if config.executor != JobExecutorKind::Local || config.local.run_as.is_some() {
        return Ok(());
    }
    if euid == 0 && auth_on {
        bail!(
            "the server runs as root with authentication on (server.auth_file) and jobs.local.run_as is unset: anyone allowed jobs.submit could run commands as root. Set jobs.local.run_as (--jobs-run-as), e.g. \"nobody:nogroup\", or set jobs.executor = \"kubernetes\""
        );
    }
    if euid == 0 {
        tracing::warn!(
            "local command jobs run as root: set jobs.local.run_as (--jobs-run-as), e.g. \"nobody:nogroup\", before anyone else can reach this server"
        );
    } else if auth_on {
        tracing::warn!(
            uid = euid,
            "local command jobs run as the server's own user and can read its files (TLS key, auth file, job store); run the server as root with jobs.local.run_as, or use the Kubernetes executor"
        );
    }
    Ok(())
}

/// `veraltheim config job-pod`: the `batch/v1` Job that the Kubernetes executor would create
/// under `config` for an example command job (asking for a writable root filesystem when
/// `writable_root`), as JSON. `deploy/validate.py` checks it against Pod Security "restricted".
pub fn example_job_object(config: &JobsConfig, writable_root: bool) -> anyhow::Result<String> {
    let k = kubernetes_config(&config.kubernetes, config.max_log_bytes);
    let run = veraltheim_slowpath::CommandRun {
        job_id: "00000000000000000001".into(),
        job_name: "example".into(),
        attempt: 1,
        // A job naming no image takes the configured default.
        image: if k.default_image.is_empty() {
            "busybox:1.36".into()
        } else {
            String::new()
        },
        command: vec!["sh".into(), "-c".into(), "echo hello".into()],
        writable_root,
        resources: Resources {
            cpu_millis: 500,
            memory_bytes: 256 << 20,
            gpus: 0,
            gpu_memory_bytes: 0,
        },
        deadline: Some(Duration::from_secs(3600)),
        ..Default::default()
    };
    let namespace = if k.namespace.is_empty() {
        "default".to_owned()
    } else {
        k.namespace.clone()
    };
    let job = veraltheim_slowpath::kubernetes::job_object(&k, &namespace, &run)
        .map_err(|e| anyhow!("{e}"))?;
    Ok(serde_json::to_string_pretty(&job)?)
}

/// `jobs.max_running` unset on Kubernetes: the cluster, not this machine, runs the jobs; each
/// running one costs the coordinator two watches.
const KUBERNETES_RUNNING: usize = 64;

fn kubernetes_config(k: &KubernetesJobsConfig, max_log_bytes: u64) -> KubernetesConfig {
    KubernetesConfig {
        // The executor's own spelling of unset is "".
        api_url: k.api_url.clone().unwrap_or_default(),
        namespace: k.namespace.clone().unwrap_or_default(),
        service_account: k.service_account.clone().unwrap_or_default(),
        node_selector: k
            .node_selector
            .iter()
            .filter_map(|s| s.split_once('='))
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
            .collect(),
        tolerations: k
            .tolerations
            .iter()
            .map(|t| Toleration {
                key: t.key.clone(),
                operator: t.operator.clone(),
                value: t.value.clone(),
                effect: t.effect.clone(),
                toleration_seconds: t.toleration_seconds,
            })
            .collect(),
        ttl_seconds_after_finished: k
            .ttl_seconds_after_finished
            .and_then(|t| i32::try_from(t).ok()),
        default_image: k.default_image.clone().unwrap_or_default(),
        run_as_user: k.run_as_user,
        run_as_group: k.run_as_group,
        breaker: BreakerConfig::new(
            k.breaker_failure_threshold,
            Duration::from_millis(k.breaker_open_ms.max(1)),
            Duration::from_secs(60),
        ),
        api_retries: k.api_retries,
        max_log_bytes,
        ..KubernetesConfig::default()
    }
}

/// Job events waiting for the QueueManager; beyond it they are dropped (and logged), since the
/// store's observer must never block a commit.
const JOB_EVENT_BACKLOG: usize = 4096;

pub fn job_event(r: &JobRecord) -> Event {
    Event::new(
        format!("jobs.{}.state", r.id),
        format!(
            "job {} ({}) is {}: {}",
            r.id, r.spec.name, r.state, r.reason
        ),
    )
    .with_attribute("job", &r.id)
    .with_attribute("name", &r.spec.name)
    .with_attribute("queue", &r.spec.queue)
    .with_attribute("state", r.state.as_str())
    .with_attribute("reason", &r.reason)
    .with_attribute("attempt", r.attempt.to_string())
    // Who may see the event: its tenant (WatchEvents leaves other tenants' jobs out).
    .with_attribute(
        "tenant",
        r.spec.owner.as_ref().map_or("", |o| o.tenant.as_str()),
    )
    .with_attribute(
        "principal",
        r.spec.owner.as_ref().map_or("", |o| o.principal.as_str()),
    )
}

/// A job's pause or resume as a `jobs.<id>.paused` / `jobs.<id>.resumed` event (its state
/// stays RUNNING: `jobs.<id>.state` does not fire).
pub fn pause_event(r: &JobRecord) -> Event {
    let paused = r.pauses.is_paused();
    let message = if paused {
        format!(
            "job {} ({}) is paused: {}",
            r.id, r.spec.name, r.pauses.reason
        )
    } else {
        format!(
            "job {} ({}) is resumed; paused {} ms in all",
            r.id, r.spec.name, r.pauses.paused_ms
        )
    };
    Event::new(
        format!(
            "jobs.{}.{}",
            r.id,
            if paused { "paused" } else { "resumed" }
        ),
        message,
    )
    .with_attribute("job", &r.id)
    .with_attribute("name", &r.spec.name)
    .with_attribute("queue", &r.spec.queue)
    .with_attribute("state", r.state.as_str())
    .with_attribute("reason", &r.pauses.reason)
    .with_attribute("paused_ms", r.pauses.paused_ms.to_string())
    .with_attribute("pauses", r.pauses.count.to_string())
    .with_attribute("attempt", r.attempt.to_string())
    .with_attribute(
        "tenant",
        r.spec.owner.as_ref().map_or("", |o| o.tenant.as_str()),
    )
    .with_attribute(
        "principal",
        r.spec.owner.as_ref().map_or("", |o| o.principal.as_str()),
    )
}

fn job_status(e: RunnerError) -> Status {
    use veraltheim_slowpath::scheduler::SchedError;
    let msg = e.to_string();
    match e {
        RunnerError::Schedule(SchedError::Config(_)) => Status::internal(msg),
        RunnerError::Schedule(_) | RunnerError::Rejected { .. } => Status::invalid_argument(msg),
        RunnerError::Store(s) => store_status(s),
    }
}

fn store_status(e: StoreError) -> Status {
    let msg = e.to_string();
    match e {
        StoreError::NotFound(_) => Status::not_found(msg),
        StoreError::Job(veraltheim_slowpath::JobError::InvalidSpec(_))
        | StoreError::InvalidPageToken(_) => Status::invalid_argument(msg),
        StoreError::Job(_) | StoreError::IdempotencyConflict { .. } => {
            Status::failed_precondition(msg)
        }
        // A full disk is a resource the operator can free (and the store recovers by itself
        // once it is): RESOURCE_EXHAUSTED, not "unavailable".
        StoreError::Storage(veraltheim_storage::StorageError::Full { .. }) => {
            Status::resource_exhausted(msg)
        }
        StoreError::Storage(_) => Status::unavailable(msg),
        // The job database cannot be reached: nothing was acknowledged; try again later.
        StoreError::Unavailable(_) => {
            let mut s = Status::unavailable(msg);
            s.metadata_mut().insert(
                "grpc-retry-pushback-ms",
                tonic::metadata::MetadataValue::from_static(DATABASE_PUSHBACK_MS),
            );
            s
        }
        // A write this node may no longer make (its placement moved on): the state changed
        // under the caller, who may look again.
        StoreError::Fenced(_) | StoreError::MovedOn { .. } => Status::aborted(msg),
        StoreError::SchemaTooNew { .. } | StoreError::Database(_) => Status::internal(msg),
    }
}

/// How long a client should back off while the job database cannot be reached (gRPC's retry
/// pushback convention, as for a full queue): long enough for a reconnect to be tried.
const DATABASE_PUSHBACK_MS: &str = "1000";

fn state_to_wire(s: JobState) -> v1::JobState {
    match s {
        JobState::Queued => v1::JobState::Queued,
        JobState::Admitted => v1::JobState::Admitted,
        JobState::Running => v1::JobState::Running,
        JobState::RetryWait => v1::JobState::RetryWait,
        JobState::Succeeded => v1::JobState::Succeeded,
        JobState::Failed => v1::JobState::Failed,
        JobState::Cancelled => v1::JobState::Cancelled,
        JobState::TimedOut => v1::JobState::TimedOut,
    }
}

fn state_from_wire(s: i32) -> Result<JobState, Status> {
    Ok(match v1::JobState::try_from(s) {
        Ok(v1::JobState::Queued) => JobState::Queued,
        Ok(v1::JobState::Admitted) => JobState::Admitted,
        Ok(v1::JobState::Running) => JobState::Running,
        Ok(v1::JobState::RetryWait) => JobState::RetryWait,
        Ok(v1::JobState::Succeeded) => JobState::Succeeded,
        Ok(v1::JobState::Failed) => JobState::Failed,
        Ok(v1::JobState::Cancelled) => JobState::Cancelled,
        Ok(v1::JobState::TimedOut) => JobState::TimedOut,
        _ => {
            return Err(Status::invalid_argument(format!(
                "job state {s} is not a known JobState"
            )));
        }
    })
}

fn spec_from_wire(s: v1::JobSpec) -> Result<JobSpec, Status> {
    let kind = match s.kind {
        Some(v1::job_spec::Kind::Command(c)) => JobKind::Command {
            image: c.image,
            command: c.command,
            env: c.env.into_iter().collect(),
            working_dir: c.working_dir,
            writable_root: c.writable_root,
        },
        Some(v1::job_spec::Kind::Inference(i)) => JobKind::Inference {
            model: i.model,
            input_path: i.input_path,
            output_path: i.output_path,
        },
        None => {
            return Err(Status::invalid_argument(
                "job spec has no kind: give `command` or `inference`",
            ));
        }
    };
    let r = s.resources.unwrap_or_default();
    Ok(JobSpec {
        name: s.name,
        queue: if s.queue.is_empty() {
            "default".into()
        } else {
            s.queue
        },
        priority_class: s.priority_class,
        resources: Resources {
            cpu_millis: r.cpu_millis,
            memory_bytes: r.memory_bytes,
            gpus: r.gpus,
            gpu_memory_bytes: r.gpu_memory_bytes,
        },
        max_retries: s.max_retries,
        deadline_seconds: (s.deadline_seconds > 0).then_some(s.deadline_seconds),
        ttl_seconds_after_finished: (s.ttl_seconds_after_finished > 0)
            .then_some(s.ttl_seconds_after_finished),
        labels: s.labels.into_iter().collect(),
        idempotency_key: (!s.idempotency_key.is_empty()).then_some(s.idempotency_key),
        kind,
        // The caller's, set by SubmitJob: the wire spec has no say in who owns a job.
        owner: None,
        pausable: s.pausable,
    })
}

fn spec_to_wire(s: &JobSpec) -> v1::JobSpec {
    v1::JobSpec {
        name: s.name.clone(),
        queue: s.queue.clone(),
        priority_class: s.priority_class.clone(),
        resources: Some(v1::Resources {
            cpu_millis: s.resources.cpu_millis,
            memory_bytes: s.resources.memory_bytes,
            gpus: s.resources.gpus,
            gpu_memory_bytes: s.resources.gpu_memory_bytes,
        }),
        max_retries: s.max_retries,
        deadline_seconds: s.deadline_seconds.unwrap_or(0),
        ttl_seconds_after_finished: s.ttl_seconds_after_finished.unwrap_or(0),
        labels: s.labels.clone().into_iter().collect(),
        idempotency_key: s.idempotency_key.clone().unwrap_or_default(),
        pausable: s.pausable,
        kind: Some(match &s.kind {
            JobKind::Command {
                image,
                command,
                env,
                working_dir,
                writable_root,
            } => v1::job_spec::Kind::Command(v1::CommandJob {
                image: image.clone(),
                command: command.clone(),
                env: env.clone().into_iter().collect(),
                working_dir: working_dir.clone(),
                writable_root: *writable_root,
            }),
            JobKind::Inference {
                model,
                input_path,
                output_path,
            } => v1::job_spec::Kind::Inference(v1::InferenceJob {
                model: model.clone(),
                input_path: input_path.clone(),
                output_path: output_path.clone(),
            }),
        }),
    }
}

fn job_to_wire(jobs: &Jobs, r: &JobRecord) -> v1::Job {
    let waiting = matches!(r.state, JobState::Queued);
    let reason = waiting
        .then(|| jobs.runner.waiting_reason(&r.id))
        .flatten()
        .unwrap_or_else(|| r.reason.clone());
    let progress = match jobs.runner.progress(&r.id) {
        _ if r.state == JobState::Succeeded => 1.0,
        Some((done, total)) if total > 0 && !r.state.is_terminal() => done as f64 / total as f64,
        _ => 0.0,
    };
    v1::Job {
        id: r.id.clone(),
        spec: Some(spec_to_wire(&r.spec)),
        state: state_to_wire(r.state) as i32,
        reason,
        attempt: r.attempt,
        progress,
        created_ms: r.created_ms,
        started_ms: r.started_ms.unwrap_or(0),
        finished_ms: r.finished_ms.unwrap_or(0),
        exit_code: r.exit_code.unwrap_or(0),
        app_failures: r.app_failures,
        infra_failures: r.infra_failures,
        principal: r
            .spec
            .owner
            .as_ref()
            .map(|o| o.principal.clone())
            .unwrap_or_default(),
        tenant: r
            .spec
            .owner
            .as_ref()
            .map(|o| o.tenant.clone())
            .unwrap_or_default(),
        node: r
            .placement
            .as_ref()
            .map(|p| p.node.clone())
            .unwrap_or_default(),
        leader_epoch: r.placement.as_ref().map_or(0, |p| p.epoch),
        paused: r.pauses.is_paused(),
        paused_since_ms: r.pauses.since_ms.unwrap_or(0),
        paused_reason: r.pauses.reason.clone(),
        paused_ms: r.pauses.total_ms(jobs.runner.store().now_ms()),
        pauses: r.pauses.count,
    }
}

/// `veraltheim.v1.JobService` over the slow path's runner.
#[derive(Clone)]
pub struct JobsApi {
    jobs: Arc<Jobs>,
}

impl JobsApi {
    pub fn new(jobs: Arc<Jobs>) -> Self {
        JobsApi { jobs }
    }
}

/// The most bytes of one JobLogs message.
const LOG_CHUNK_BYTES: usize = veraltheim_slowpath::local::LOG_CHUNK_BYTES;

/// How often WatchJob and `logs --follow` look for changes.
const POLL: Duration = Duration::from_millis(200);

#[tonic::async_trait]
impl JobService for JobsApi {
    async fn submit_job(
        &self,
        request: Request<v1::SubmitJobRequest>,
    ) -> Result<Response<v1::Job>, Status> {
        let caller = Caller::of(&request)?;
        let outcome = self.submit(&caller, request).await;
        let resource = match &outcome {
            Ok(job) => format!("job:{}", job.get_ref().id),
            Err(_) => "job:".into(),
        };
        // A refusal of the caller was recorded when it was made.
        if !matches!(&outcome, Err(s) if s.code() == tonic::Code::PermissionDenied) {
            caller.audit(resource, &outcome);
        }
        outcome
    }

    async fn get_job(
        &self,
        request: Request<v1::GetJobRequest>,
    ) -> Result<Response<v1::Job>, Status> {
        let jobs = &*self.jobs;
        let rec = self.authorised(&request, &request.get_ref().id).await?;
        Ok(Response::new(job_to_wire(jobs, &rec)))
    }

    async fn list_jobs(
        &self,
        request: Request<v1::ListJobsRequest>,
    ) -> Result<Response<v1::ListJobsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let states = r
            .states
            .iter()
            .map(|s| state_from_wire(*s))
            .collect::<Result<BTreeSet<_>, _>>()?;
        let filter = ListFilter {
            states,
            queue: (!r.queue.is_empty()).then_some(r.queue),
            labels: r.labels.into_iter().collect(),
            page_size: r.page_size as usize,
            page_token: r.page_token,
            ..ListFilter::default()
        };
        let (jobs, next) = self.list_for(&caller, filter).await?;
        Ok(Response::new(v1::ListJobsResponse {
            jobs,
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn cancel_job(
        &self,
        request: Request<v1::CancelJobRequest>,
    ) -> Result<Response<v1::Job>, Status> {
        let jobs = &*self.jobs;
        let caller = Caller::of(&request)?;
        let id = &request.get_ref().id;
        self.authorised(&request, id).await?;
        let outcome = jobs
            .runner
            .cancel(id)
            .await
            .map_err(job_status)
            .map(|rec| Response::new(job_to_wire(jobs, &rec)));
        caller.audit(format!("job:{id}"), &outcome);
        outcome
    }

    type WatchJobStream = StreamOf<v1::Job>;

    async fn watch_job(
        &self,
        request: Request<v1::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let id = request.get_ref().id.clone();
        self.authorised(&request, &id).await?;
        let api = self.clone();
        let stream = async_stream_unfold(api, id);
        Ok(Response::new(stream))
    }

    type JobLogsStream = StreamOf<v1::LogChunk>;

    async fn job_logs(
        &self,
        request: Request<v1::JobLogsRequest>,
    ) -> Result<Response<Self::JobLogsStream>, Status> {
        self.authorised(&request, &request.get_ref().id).await?;
        let r = request.into_inner();
        let attempt = self.clone().attempt_logs(r.id, r.follow);
        let stream = futures::stream::once(attempt).flat_map(|logs| match logs {
            // Whatever an executor hands over (a pod log can come in one piece), each message
            // carries at most LOG_CHUNK_BYTES, far below any client's message limit.
            Ok(logs) => logs
                .flat_map(|chunk| {
                    let pieces: Vec<Result<v1::LogChunk, Status>> = match chunk {
                        Ok(c) => c
                            .data
                            .chunks(LOG_CHUNK_BYTES)
                            .map(|piece| {
                                Ok(v1::LogChunk {
                                    stream: c.source.as_str().into(),
                                    data: piece.to_vec().into(),
                                })
                            })
                            .collect(),
                        Err(e) => vec![Err(Status::unavailable(format!("job logs: {e}")))],
                    };
                    futures::stream::iter(pieces)
                })
                .boxed(),
            Err(status) => futures::stream::once(async move { Err(status) }).boxed(),
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

fn owner_tenant(r: &JobRecord) -> Option<&str> {
    r.spec.owner.as_ref().map(|o| o.tenant.as_str())
}

impl JobsApi {
    /// The job `id`, once the caller may do what its method does to it (`Caller::job`).
    async fn authorised<T>(&self, request: &Request<T>, id: &str) -> Result<JobRecord, Status> {
        self.authorised_for(&Caller::of(request)?, id).await
    }

    /// The job `id`, once `caller` may do what its call does to it (`Caller::job`): GetJob,
    /// JobLogs and the like over gRPC, and their HTTP counterparts (the status page).
    pub async fn authorised_for(&self, caller: &Caller, id: &str) -> Result<JobRecord, Status> {
        let rec = self
            .jobs
            .runner
            .store()
            .get(id)
            .await
            .map_err(store_status)?;
        caller.job(id, &rec.spec.queue, owner_tenant(&rec))?;
        Ok(rec)
    }

    /// ListJobs for `caller`: one page of `filter`'s jobs as the wire shows them, confined to
    /// what the caller may see (`Caller::jobs_view`: its tenant's jobs in the queues it may
    /// `jobs.read`, every tenant's in those it may `jobs.admin`), and the next page's token.
    /// `filter.tenant` is set here, never by the caller of this function.
    pub async fn list_for(
        &self,
        caller: &Caller,
        mut filter: ListFilter,
    ) -> Result<(Vec<v1::Job>, Option<String>), Status> {
        let jobs = &*self.jobs;
        let view = caller.jobs_view();
        filter.tenant = view.tenant.clone();
        let (records, next) = jobs
            .runner
            .store()
            .list(&filter)
            .await
            .map_err(store_status)?;
        // A page may come out shorter than asked: the jobs of queues the caller may not read
        // are left out, and the page token still leads on.
        let visible = records
            .iter()
            .filter(|r| view.shows(&r.spec.queue, owner_tenant(r)))
            .map(|r| job_to_wire(jobs, r))
            .collect();
        Ok((visible, next))
    }

    /// A job as the wire shows it (its progress and waiting reason as of now).
    pub fn wire(&self, rec: &JobRecord) -> v1::Job {
        job_to_wire(&self.jobs, rec)
    }

    /// The output of job `id`'s latest attempt (with `follow`, what comes until it ends; a
    /// job that has not started is waited for, and its first attempt read once it starts).
    /// The caller has been authorised already ([`Self::authorised_for`]).
    pub async fn attempt_logs(
        self,
        id: String,
        follow: bool,
    ) -> Result<veraltheim_slowpath::LogStream, Status> {
        loop {
            let jobs = &*self.jobs;
            let rec = jobs.runner.store().get(&id).await.map_err(store_status)?;
            if rec.attempt > 0 || rec.state.is_terminal() || !follow {
                // In a cluster, an attempt another node ran is read from the store.
                return Ok(jobs.runner.logs(&rec, rec.attempt.max(1), follow));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// SubmitJob once the caller is known: checked, owned by the caller, authorised, stored.
    async fn submit(
        &self,
        caller: &Caller,
        request: Request<v1::SubmitJobRequest>,
    ) -> Result<Response<v1::Job>, Status> {
        let jobs = &*self.jobs;
        // Kept with the job: its attempts' spans continue the submitter's trace.
        let trace = crate::context::traceparent(request.metadata()).map(|t| t.to_string());
        let spec = request
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("SubmitJobRequest has no spec"))?;
        let mut spec = spec_from_wire(spec)?;
        let model = match &spec.kind {
            JobKind::Inference { model, .. } => Some(model.as_str()),
            JobKind::Command { .. } => None,
        };
        caller.submit(&spec.queue, model)?;
        if let Some(tenant) = caller.tenant() {
            spec.owner = Some(veraltheim_slowpath::Owner {
                principal: caller.principal().to_string(),
                tenant: tenant.to_string(),
            });
        }
        // Sizes first (cheap, and a huge path is not worth resolving), then the paths.
        spec.validate()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let JobKind::Inference {
            input_path,
            output_path,
            ..
        } = &mut spec.kind
        {
            // The job keeps the resolved paths, so a symlink swapped in later along the way
            // changes nothing.
            let (input, output) = jobs.paths.check(input_path, output_path)?;
            *input_path = input;
            *output_path = output;
        }
        // The server's default TTL is resolved at submit, so a job keeps the TTL it was
        // accepted with (GetJob shows it) whatever the configuration says later.
        spec.ttl_seconds_after_finished = spec.ttl_seconds_after_finished.or(jobs.default_ttl);
        let rec = jobs
            .runner
            .submit_traced(spec, trace)
            .await
            .map_err(job_status)?;
        Ok(Response::new(job_to_wire(jobs, &rec)))
    }
}

/// WatchJob's stream: the job now, then each change, until a terminal state.
fn async_stream_unfold(api: JobsApi, id: String) -> StreamOf<v1::Job> {
    Box::pin(futures::stream::unfold(
        (api, id, None::<(i32, String, u32, u32, bool)>, false),
        |(api, id, last, ended)| async move {
            if ended {
                return None;
            }
            loop {
                let jobs = &*api.jobs;
                let rec = match jobs.runner.store().get(&id).await {
                    Ok(r) => r,
                    Err(e) => return Some((Err(store_status(e)), (api, id, last, true))),
                };
                let job = job_to_wire(jobs, &rec);
                // Progress in steps of 1%: a change shows, a busy job does not flood the stream.
                // A pause or a resume shows too.
                let step = (job.progress * 100.0) as u32;
                let key = (job.state, job.reason.clone(), job.attempt, step, job.paused);
                if last.as_ref() != Some(&key) {
                    let ended = rec.state.is_terminal();
                    return Some((Ok(job), (api, id, Some(key), ended)));
                }
                tokio::time::sleep(POLL).await;
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn jobs_config() -> JobsConfig {
        Config::defaults().unwrap().jobs
    }

    #[test]
    fn root_with_authentication_must_name_a_user_for_local_jobs() {
        let config = jobs_config();
        let err = check_run_as_for(&config, true, 0).unwrap_err().to_string();
        assert!(
            err.contains("runs as root with authentication on")
                && err.contains("jobs.local.run_as"),
            "{err}"
        );
        // Without authentication it is a warning; a non-root server cannot switch users.
        assert!(check_run_as_for(&config, false, 0).is_ok());
        assert!(check_run_as_for(&config, true, 1000).is_ok());
        let mut named = jobs_config();
        named.local.run_as = Some("nobody:nogroup".into());
        assert!(check_run_as_for(&named, true, 0).is_ok());
        // Jobs that become pods do not run here at all.
        let mut pods = jobs_config();
        pods.executor = JobExecutorKind::Kubernetes;
        assert!(check_run_as_for(&pods, true, 0).is_ok());
    }

    #[test]
    fn the_local_sandbox_is_resolved_at_start_with_errors_naming_the_key() {
        let mut l = jobs_config().local;
        l.run_as = Some("nobody:nogroup".into());
        l.allowed_commands = vec!["sh".into()];
        l.max_cpu_seconds = Some(60);
        let sandbox = local_sandbox(&l).unwrap();
        let run_as = sandbox.run_as.as_ref().unwrap();
        assert_ne!((run_as.uid, run_as.gid), (0, 0));
        assert_eq!(sandbox.allowed_commands(), Some(vec!["sh"]));
        assert_eq!(sandbox.limits.cpu_seconds, Some(60));
        assert!(
            sandbox.describe().contains("only sh"),
            "{}",
            sandbox.describe()
        );

        let err = |l: &LocalJobsConfig| local_sandbox(l).unwrap_err().to_string();
        let mut bad = jobs_config().local;
        bad.run_as = Some("no-such-user-vt".into());
        assert!(
            err(&bad).starts_with("jobs.local.run_as: no user named 'no-such-user-vt'"),
            "{}",
            err(&bad)
        );
        let mut bad = jobs_config().local;
        bad.allowed_commands = vec!["no-such-tool-vt".into()];
        assert!(
            err(&bad).starts_with("jobs.local.allowed_commands: 'no-such-tool-vt'"),
            "{}",
            err(&bad)
        );
        let mut bad = jobs_config().local;
        let not_a_cgroup = tempfile::tempdir().unwrap();
        bad.cgroup_dir = Some(not_a_cgroup.path().to_owned());
        assert!(
            err(&bad).starts_with("jobs.local.cgroup_dir:")
                && err(&bad).contains("not a cgroup v2"),
            "{}",
            err(&bad)
        );
        let mut bad = jobs_config().local;
        bad.max_open_files = Some(u64::MAX / 2);
        assert!(
            err(&bad).contains("jobs.local.max_open_files") && err(&bad).contains("fs.nr_open"),
            "{}",
            err(&bad)
        );
    }

    #[test]
    fn the_example_job_pod_is_restricted_and_follows_the_configuration() {
        let mut config = jobs_config();
        config.kubernetes.run_as_user = 1234;
        config.kubernetes.namespace = Some("batch".into());
        let job: serde_json::Value =
            serde_json::from_str(&example_job_object(&config, false).unwrap()).unwrap();
        assert_eq!(job["apiVersion"], "batch/v1");
        assert_eq!(job["kind"], "Job");
        assert_eq!(job["metadata"]["namespace"], "batch");
        let pod = &job["spec"]["template"]["spec"];
        assert_eq!(pod["automountServiceAccountToken"], false);
        assert_eq!(pod["securityContext"]["runAsUser"], 1234);
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        let c = &pod["containers"][0]["securityContext"];
        assert_eq!(c["readOnlyRootFilesystem"], true);
        assert_eq!(c["capabilities"]["drop"][0], "ALL");
        let job: serde_json::Value =
            serde_json::from_str(&example_job_object(&config, true).unwrap()).unwrap();
        let c = &job["spec"]["template"]["spec"]["containers"][0]["securityContext"];
        assert_eq!(c["readOnlyRootFilesystem"], false);
    }

    #[tokio::test]
    async fn pauses_are_their_own_events_and_show_on_the_wire() {
        use veraltheim_slowpath::JobStore;
        use veraltheim_storage::MemoryStore;
        let store = JobStore::new(MemoryStore::new());
        let wire = v1::JobSpec {
            name: "embed".into(),
            pausable: Some(false),
            kind: Some(v1::job_spec::Kind::Command(v1::CommandJob {
                command: vec!["true".into()],
                ..Default::default()
            })),
            ..Default::default()
        };
        let spec = spec_from_wire(wire).unwrap();
        assert_eq!(spec.pausable, Some(false));
        assert_eq!(spec_to_wire(&spec).pausable, Some(false));
        let mut rec = store.submit(spec).await.unwrap();
        rec.state = JobState::Running;
        rec.pauses.since_ms = Some(1_000);
        rec.pauses.reason = "model minilm: p99 above the objective".into();
        rec.pauses.count = 2;
        rec.pauses.paused_ms = 300;
        let e = pause_event(&rec);
        assert_eq!(e.topic, format!("jobs.{}.paused", rec.id));
        assert_eq!(e.attributes["reason"], rec.pauses.reason);
        assert_eq!(e.attributes["state"], "RUNNING");
        assert_eq!(e.attributes["pauses"], "2");
        assert!(
            e.message.contains("is paused: model minilm"),
            "{}",
            e.message
        );
        rec.pauses.since_ms = None;
        rec.pauses.reason.clear();
        rec.pauses.paused_ms = 700;
        let e = pause_event(&rec);
        assert_eq!(e.topic, format!("jobs.{}.resumed", rec.id));
        assert_eq!(e.attributes["paused_ms"], "700");
        assert!(e.message.contains("paused 700 ms in all"), "{}", e.message);
    }
}
