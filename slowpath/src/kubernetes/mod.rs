//! The Kubernetes executor: one `batch/v1` Job per attempt of a command job.
//!
//! - **The Job** is named `vt-<job id>-<attempt>` and labelled [`LABEL_JOB_ID`] and
//!   [`LABEL_ATTEMPT`] (the pod template too, so pods carry them); `backoffLimit: 0` (the
//!   runner owns retries), `activeDeadlineSeconds` from the job's deadline,
//!   `ttlSecondsAfterFinished`, namespace, service account, node selector and tolerations from
//!   [`KubernetesConfig`]. Its one container, `job`, runs the job's image (or the configured
//!   default) with the job's command, environment and working directory, requesting and
//!   limited to the job's CPU, memory and `nvidia.com/gpu`.
//! - **The pod cannot take over its node** (Pod Security "restricted", checked by
//!   `deploy/validate.py`): it runs as a fixed non-root uid and gid ([`KubernetesConfig`]'s
//!   `run_as_user`/`run_as_group`; `runAsNonRoot`), all capabilities dropped, no privilege
//!   escalation, seccomp `RuntimeDefault`, a read-only root filesystem with an empty `/tmp`
//!   (unless the job asks for `writable_root`), no service-account token
//!   (`automountServiceAccountToken: false`: the namespace's accounts may hold rights the job
//!   must not have) and no service links in its environment.
//! - **Status** comes from two kube-runtime watchers (the Job and its pods, by those labels),
//!   which relist on `410 Gone` and follow bookmarks; [`classify`] reads them into an
//!   [`Outcome`]. A pod that cannot pull its image fails the attempt as an infrastructure
//!   failure at once (the Job itself would wait until its deadline), and the Job is deleted.
//! - **Cancel** deletes the Job with `propagationPolicy: Foreground`, so its pods go first.
//! - **Logs** come from the pod log API (`follow` while it runs).
//! - **Adoption**: after a restart, [`Executor::adopt`] lists the Jobs labelled with the job's
//!   id and re-attaches to the attempt that was running (finished or not) instead of starting a
//!   new one; a create answered `409 AlreadyExists` attaches to the Job of that attempt too.
//! - **Resilience**: every request passes one circuit breaker (a tower layer under kube's client,
//!   so the watchers' calls count too: [`breaker`]); our own calls retry transient failures
//!   (5xx, 429, transport errors) with exponential backoff (backon), never while the breaker is
//!   open. kube's built-in retry layer is turned off so that both see every failure.
//!
//! The client comes from `kube::Config::infer` (in-cluster service account or `KUBECONFIG`),
//! or from an explicit API URL ([`KubernetesConfig::api_url`]: the fake API server in tests).

pub mod breaker;
pub mod classify;
#[cfg(any(test, feature = "fake-k8s"))]
pub mod fake;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use futures::future::BoxFuture;
use futures::{AsyncReadExt, StreamExt};
use k8s_openapi::api::batch::v1::{Job, JobSpec as K8sJobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, Pod, PodSecurityContext, PodSpec,
    PodTemplateSpec, ResourceRequirements, SeccompProfile, SecurityContext,
    Toleration as K8sToleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use veraltheim_supervisor::{BreakerConfig, BreakerState, CircuitBreaker};

use crate::executor::{
    CommandRun, ExecError, Execution, Executor, LogChunk, LogSource, LogStream, Outcome,
};
use crate::job::{JobKind, JobSpec};
use crate::logcap::HeadTail;
use breaker::{BreakerLayer, breaker_open};
use classify::CONTAINER;

/// The label with the Veraltheim job id, on every Job and pod we create.
pub const LABEL_JOB_ID: &str = "veraltheim.io/job-id";
/// The label with the attempt number.
pub const LABEL_ATTEMPT: &str = "veraltheim.io/attempt";
/// The label with the job's name (for people and dashboards).
pub const LABEL_JOB_NAME: &str = "veraltheim.io/job-name";
/// `app.kubernetes.io/managed-by: veraltheim`.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";

/// A toleration put on every attempt's pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Toleration {
    pub key: String,
    /// `Exists` or `Equal` (empty: `Equal`).
    pub operator: String,
    pub value: String,
    /// `NoSchedule`, `PreferNoSchedule`, `NoExecute`, or empty for all.
    pub effect: String,
    pub toleration_seconds: Option<i64>,
}

/// How the executor reaches the cluster and what it puts on every Job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubernetesConfig {
    /// The API server's URL; empty: `kube::Config::infer` (in-cluster, else `KUBECONFIG`).
    pub api_url: String,
    /// Where Jobs are created; empty: the inferred configuration's namespace.
    pub namespace: String,
    /// The pods' service account; empty: the namespace's default.
    pub service_account: String,
    pub node_selector: BTreeMap<String, String>,
    pub tolerations: Vec<Toleration>,
    /// Finished Jobs are deleted by Kubernetes after this long; `None`: kept.
    pub ttl_seconds_after_finished: Option<i32>,
    /// The image of command jobs that name none; empty: such jobs are refused.
    pub default_image: String,
    /// The uid and gid the pods' containers run as (never 0: `runAsNonRoot`); a fixed one, so
    /// that an image whose default user is root runs too.
    pub run_as_user: i64,
    pub run_as_group: i64,
    /// The circuit breaker in front of the API.
    pub breaker: BreakerConfig,
    /// Retries of one API call on a transient failure (after the first try).
    pub api_retries: usize,
    /// The first retry's delay, doubling (with jitter) up to `api_retry_max_delay`.
    pub api_retry_min_delay: Duration,
    pub api_retry_max_delay: Duration,
    /// How often a followed log whose pod has not started is looked at again.
    pub log_poll: Duration,
    /// What a reader of an attempt's log gets at most (`jobs.max_log_bytes`): the first and the
    /// last half of it, with a note of what was cut between them (the kubelet keeps the whole).
    pub max_log_bytes: u64,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            api_url: String::new(),
            namespace: String::new(),
            service_account: String::new(),
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            ttl_seconds_after_finished: Some(86_400),
            default_image: String::new(),
            run_as_user: DEFAULT_RUN_AS,
            run_as_group: DEFAULT_RUN_AS,
            breaker: BreakerConfig::default(),
            api_retries: 3,
            api_retry_min_delay: Duration::from_millis(200),
            api_retry_max_delay: Duration::from_secs(5),
            log_poll: Duration::from_secs(1),
            max_log_bytes: crate::local::DEFAULT_MAX_LOG_BYTES,
        }
    }
}

/// The default uid and gid of job pods: `nobody`/`nogroup` on most distributions.
pub const DEFAULT_RUN_AS: i64 = 65534;

/// The Job of attempt `attempt` of job `job_id`.
pub fn job_name(job_id: &str, attempt: u32) -> String {
    format!("vt-{job_id}-{attempt}")
}

/// The label selector of one attempt's Job and pods.
pub fn attempt_selector(job_id: &str, attempt: u32) -> String {
    format!("{LABEL_JOB_ID}={job_id},{LABEL_ATTEMPT}={attempt}")
}

struct Shared {
    client: Client,
    namespace: String,
    config: KubernetesConfig,
    breaker: Arc<CircuitBreaker>,
}

/// See the module documentation. Cheap to clone.
#[derive(Clone)]
pub struct KubernetesExecutor {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for KubernetesExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesExecutor")
            .field("namespace", &self.shared.namespace)
            .field("api_url", &self.shared.config.api_url)
            .finish()
    }
}

impl KubernetesExecutor {
    /// A client for `config`. Makes no request: an API server that is down now is seen when
    /// the first job starts (and the breaker deals with it).
    pub async fn connect(config: KubernetesConfig) -> Result<Self, ExecError> {
        if config.run_as_user <= 0 || config.run_as_group < 0 {
            return Err(ExecError::Backend(format!(
                "job pods must run as a non-root uid (and a gid >= 0), not {}:{}",
                config.run_as_user, config.run_as_group
            )));
        }
        let mut kc = if config.api_url.is_empty() {
            kube::Config::infer().await.map_err(|e| {
                ExecError::Backend(format!(
                    "no Kubernetes configuration (in-cluster or KUBECONFIG): {e}"
                ))
            })?
        } else {
            let url = config.api_url.parse::<http::Uri>().map_err(|e| {
                ExecError::Backend(format!(
                    "Kubernetes API URL '{}' is not a URL: {e}",
                    config.api_url
                ))
            })?;
            kube::Config::new(url)
        };
        // Our retries (backon) and the breaker see every failure; kube's own retry layer would
        // hide them.
        kc.default_retry = false;
        let namespace = if config.namespace.is_empty() {
            kc.default_namespace.clone()
        } else {
            config.namespace.clone()
        };
        let breaker = Arc::new(CircuitBreaker::new(config.breaker));
        let client = kube::client::ClientBuilder::try_from(kc)
            .map_err(|e| ExecError::Backend(format!("cannot build the Kubernetes client: {e}")))?
            .with_layer(&BreakerLayer::new(breaker.clone()))
            .build();
        Ok(Self {
            shared: Arc::new(Shared {
                client,
                namespace,
                config,
                breaker,
            }),
        })
    }

    pub fn namespace(&self) -> &str {
        &self.shared.namespace
    }

    /// The breaker every API request passes.
    pub fn breaker(&self) -> &Arc<CircuitBreaker> {
        &self.shared.breaker
    }

    fn jobs(&self) -> Api<Job> {
        Api::namespaced(self.shared.client.clone(), &self.shared.namespace)
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.shared.client.clone(), &self.shared.namespace)
    }

    /// One API call, retried on transient failures with exponential backoff; never while the
    /// breaker is open (that error comes back at once).
    async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, kube::Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, kube::Error>>,
    {
        let c = &self.shared.config;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(c.api_retry_min_delay)
            .with_max_delay(c.api_retry_max_delay)
            .with_max_times(c.api_retries)
            .with_jitter();
        f.retry(backoff)
            .when(transient)
            .notify(|e, delay| {
                tracing::debug!(call = what, error = %e, ?delay, "Kubernetes API call failed; retrying");
            })
            .await
    }

    /// The Job of attempt `run`.
    pub fn job_object(&self, run: &CommandRun) -> Result<Job, ExecError> {
        job_object(&self.shared.config, &self.shared.namespace, run)
    }
    fn execution(&self, job: &Job, job_id: &str, attempt: u32) -> Box<dyn Execution> {
        Box::new(KubeExecution {
            exec: self.clone(),
            name: job.name_any(),
            job_id: job_id.to_owned(),
            attempt,
        })
    }

    /// Deletes a Job with foreground propagation (its pods go before it); a Job already gone is
    /// not an error.
    async fn delete_job(&self, name: &str) -> Result<(), ExecError> {
        let jobs = self.jobs();
        let dp = DeleteParams::foreground();
        match self.call("delete Job", || jobs.delete(name, &dp)).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(exec_error("delete the Job", e)),
        }
    }

    /// Streams the logs of an attempt's pod into `tx`; see [`Executor::logs`].
    async fn pump_logs(
        &self,
        job_id: &str,
        attempt: u32,
        follow: bool,
        tx: &mpsc::Sender<Result<LogChunk, ExecError>>,
    ) -> Result<(), ExecError> {
        let pods = self.pods();
        let jobs = self.jobs();
        let lp = ListParams::default().labels(&attempt_selector(job_id, attempt));
        let name = job_name(job_id, attempt);
        // Set once the attempt is over: one more look for a pod to read, then the end.
        let mut last_look = false;
        loop {
            let list = self
                .call("list pods", || pods.list(&lp))
                .await
                .map_err(|e| exec_error("list the attempt's pods", e))?;
            let pod = classify::newest(&list.items)
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Pending"));
            let follow = follow && !last_look;
            if let Some(pod) = pod {
                let params = LogParams {
                    container: Some(CONTAINER.to_owned()),
                    follow,
                    ..Default::default()
                };
                let pod_name = pod.name_any();
                match self
                    .call("read logs", || pods.log_stream(&pod_name, &params))
                    .await
                {
                    Ok(reader) => {
                        let mut reader = Box::pin(reader);
                        let mut buf = vec![0u8; 16 * 1024];
                        let mut cap = HeadTail::new(self.shared.config.max_log_bytes.max(2));
                        let send = |data: Vec<u8>| {
                            tx.send(Ok(LogChunk {
                                source: LogSource::Combined,
                                data,
                            }))
                        };
                        loop {
                            let n = reader.read(&mut buf).await.map_err(|e| {
                                ExecError::Backend(format!("reading the pod's log: {e}"))
                            })?;
                            if n == 0 {
                                let rest = cap.finish();
                                if !rest.is_empty() {
                                    let _ = send(rest).await;
                                }
                                return Ok(());
                            }
                            let head = cap.push(&buf[..n]);
                            // Past the head nothing is sent until the end: the tail is kept.
                            if !head.is_empty() && send(head.to_vec()).await.is_err() {
                                return Ok(()); // the reader went away
                            }
                        }
                    }
                    // The container has not started ("waiting to start"): wait as below.
                    Err(kube::Error::Api(s)) if s.code == 400 && follow => {}
                    Err(kube::Error::Api(s)) if s.code == 400 => return Ok(()),
                    Err(e) => return Err(exec_error("read the pod's log", e)),
                }
            } else if !follow {
                return Ok(());
            }
            // Nothing to read yet: wait, unless the attempt is over (or gone).
            let job = self
                .call("get Job", || jobs.get_opt(&name))
                .await
                .map_err(|e| exec_error("get the Job", e))?;
            let over = job.is_none_or(|j| {
                j.metadata.deletion_timestamp.is_some() || classify::finished(&j, &[]).is_some()
            });
            if over {
                last_look = true;
                continue;
            }
            if tx.is_closed() {
                return Ok(());
            }
            tokio::time::sleep(self.shared.config.log_poll).await;
        }
    }
}

/// The Job of attempt `run` under `config`, in `namespace`: what [`KubernetesExecutor`] creates
/// (`veraltheim config job-pod` prints it, for `deploy/validate.py`).
pub fn job_object(
    config: &KubernetesConfig,
    namespace: &str,
    run: &CommandRun,
) -> Result<Job, ExecError> {
    let c = config;
    let image = if run.image.is_empty() {
        &c.default_image
    } else {
        &run.image
    };
    if image.is_empty() {
        return Err(ExecError::Rejected(NO_IMAGE.into()));
    }
    if run.command.is_empty() {
        return Err(ExecError::EmptyCommand);
    }
    let name = job_name(&run.job_id, run.attempt);
    let mut labels = BTreeMap::from([
        (LABEL_JOB_ID.to_owned(), run.job_id.clone()),
        (LABEL_ATTEMPT.to_owned(), run.attempt.to_string()),
        (LABEL_MANAGED_BY.to_owned(), "veraltheim".to_owned()),
    ]);
    if !run.job_name.is_empty() {
        labels.insert(LABEL_JOB_NAME.to_owned(), run.job_name.clone());
    }
    let mut amounts = BTreeMap::new();
    let r = &run.resources;
    if r.cpu_millis > 0 {
        amounts.insert("cpu".to_owned(), Quantity(format!("{}m", r.cpu_millis)));
    }
    if r.memory_bytes > 0 {
        amounts.insert("memory".to_owned(), Quantity(r.memory_bytes.to_string()));
    }
    if r.gpus > 0 {
        amounts.insert("nvidia.com/gpu".to_owned(), Quantity(r.gpus.to_string()));
    }
    // Requests equal limits: the job gets what the scheduler admitted it with, no more
    // (and extended resources such as GPUs require it).
    let resources = (!amounts.is_empty()).then(|| ResourceRequirements {
        requests: Some(amounts.clone()),
        limits: Some(amounts),
        ..Default::default()
    });
    let container = Container {
        name: CONTAINER.to_owned(),
        image: Some(image.clone()),
        command: Some(run.command.clone()),
        env: (!run.env.is_empty()).then(|| {
            run.env
                .iter()
                .map(|(k, v)| EnvVar {
                    name: k.clone(),
                    value: Some(v.clone()),
                    ..Default::default()
                })
                .collect()
        }),
        working_dir: (!run.working_dir.is_empty()).then(|| run.working_dir.clone()),
        resources,
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            read_only_root_filesystem: Some(!run.writable_root),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: None,
            }),
            ..Default::default()
        }),
        // A read-only root still has a writable, empty /tmp.
        volume_mounts: (!run.writable_root).then(|| {
            vec![VolumeMount {
                name: TMP_VOLUME.to_owned(),
                mount_path: "/tmp".to_owned(),
                ..Default::default()
            }]
        }),
        ..Default::default()
    };
    let tolerations = c
        .tolerations
        .iter()
        .map(|t| K8sToleration {
            key: (!t.key.is_empty()).then(|| t.key.clone()),
            operator: (!t.operator.is_empty()).then(|| t.operator.clone()),
            value: (!t.value.is_empty()).then(|| t.value.clone()),
            effect: (!t.effect.is_empty()).then(|| t.effect.clone()),
            toleration_seconds: t.toleration_seconds,
        })
        .collect::<Vec<_>>();
    let pod = PodSpec {
        restart_policy: Some("Never".to_owned()),
        service_account_name: (!c.service_account.is_empty()).then(|| c.service_account.clone()),
        node_selector: (!c.node_selector.is_empty()).then(|| c.node_selector.clone()),
        tolerations: (!tolerations.is_empty()).then_some(tolerations),
        containers: vec![container],
        // The job gets no API credentials: the namespace's service accounts (the default one
        // included) may hold rights a job must not have.
        automount_service_account_token: Some(false),
        // Nor the addresses of every Service in the namespace in its environment.
        enable_service_links: Some(false),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(c.run_as_user),
            run_as_group: Some(c.run_as_group),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        volumes: (!run.writable_root).then(|| {
            vec![Volume {
                name: TMP_VOLUME.to_owned(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Default::default()
            }]
        }),
        ..Default::default()
    };
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels.clone()),
            ..Default::default()
        },
        spec: Some(K8sJobSpec {
            backoff_limit: Some(0),
            active_deadline_seconds: run
                .deadline
                .map(|d| i64::try_from(d.as_secs().max(1)).unwrap_or(i64::MAX)),
            ttl_seconds_after_finished: c.ttl_seconds_after_finished,
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(pod),
            },
            ..Default::default()
        }),
        status: None,
    })
}

/// The emptyDir volume mounted at `/tmp` of a pod whose root filesystem is read-only.
const TMP_VOLUME: &str = "tmp";

const NO_IMAGE: &str = "a command job on Kubernetes needs an image: give the job one, or set jobs.kubernetes.default_image";

/// Worth retrying: a 5xx or 429 answer, or no answer at all; never an open breaker.
fn transient(e: &kube::Error) -> bool {
    if breaker_open(e).is_some() {
        return false;
    }
    match e {
        kube::Error::Api(s) => s.code >= 500 || s.code == 429,
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

/// A kube error as an [`ExecError`] for the call `what`.
fn exec_error(what: &str, e: kube::Error) -> ExecError {
    if let Some(open) = breaker_open(&e) {
        return ExecError::Unavailable {
            reason: format!("Kubernetes API unavailable ({open}); cannot {what}"),
            retry_after: open.retry_after,
        };
    }
    match &e {
        kube::Error::Api(s) if s.code >= 500 || s.code == 429 => ExecError::Unavailable {
            reason: format!(
                "Kubernetes API unavailable: cannot {what}: HTTP {} {}: {}",
                s.code, s.reason, s.message
            ),
            retry_after: None,
        },
        kube::Error::Api(s) => ExecError::Rejected(format!(
            "Kubernetes refused to {what}: HTTP {} {}: {}",
            s.code, s.reason, s.message
        )),
        kube::Error::HyperError(_) | kube::Error::Service(_) => ExecError::Unavailable {
            reason: format!("Kubernetes API unreachable: cannot {what}: {e}"),
            retry_after: None,
        },
        _ => ExecError::Backend(format!("cannot {what}: {e}")),
    }
}

fn label(job: &Job, key: &str) -> Option<String> {
    job.metadata.labels.as_ref()?.get(key).cloned()
}

impl Executor for KubernetesExecutor {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn check(&self, spec: &JobSpec) -> Result<(), String> {
        match &spec.kind {
            JobKind::Inference { .. } => {
                Err("inference jobs do not run on the Kubernetes executor".into())
            }
            JobKind::Command { image, .. }
                if image.is_empty() && self.shared.config.default_image.is_empty() =>
            {
                Err(NO_IMAGE.into())
            }
            JobKind::Command { .. } => Ok(()),
        }
    }

    fn unavailable(&self) -> Option<String> {
        (self.shared.breaker.state() == BreakerState::Open)
            .then(|| "waiting for the Kubernetes API: its circuit breaker is open".to_owned())
    }

    fn start<'a>(
        &'a self,
        run: &'a CommandRun,
    ) -> BoxFuture<'a, Result<Box<dyn Execution>, ExecError>> {
        Box::pin(async move {
            let job = self.job_object(run)?;
            let name = job.name_any();
            let jobs = self.jobs();
            let pp = PostParams::default();
            match self.call("create Job", || jobs.create(&pp, &job)).await {
                Ok(created) => {
                    tracing::info!(job = %run.job_id, attempt = run.attempt, k8s_job = %name, "Kubernetes Job created");
                    Ok(self.execution(&created, &run.job_id, run.attempt))
                }
                Err(kube::Error::Api(s)) if s.is_already_exists() => {
                    // Created before: by a retry whose first answer was lost, or by a
                    // coordinator that died before it recorded the attempt. Attach to it if
                    // it is this attempt's.
                    let existing = self
                        .call("get Job", || jobs.get(&name))
                        .await
                        .map_err(|e| exec_error("get the existing Job", e))?;
                    let ours = label(&existing, LABEL_JOB_ID).as_deref() == Some(&run.job_id)
                        && label(&existing, LABEL_ATTEMPT) == Some(run.attempt.to_string());
                    if !ours {
                        return Err(ExecError::Rejected(format!(
                            "a Job named {name} exists in namespace {} and is not attempt {} of job {}",
                            self.shared.namespace, run.attempt, run.job_id
                        )));
                    }
                    tracing::info!(job = %run.job_id, attempt = run.attempt, k8s_job = %name, "Kubernetes Job existed already (409); adopted");
                    Ok(self.execution(&existing, &run.job_id, run.attempt))
                }
                Err(e) => Err(exec_error("create the Job", e)),
            }
        })
    }

    fn adopts(&self) -> bool {
        true
    }

    /// Lists the Jobs labelled with the job's id: the one of `run.attempt` is adopted (running
    /// or finished); any other attempt's Job still running is deleted (it was superseded).
    fn adopt<'a>(
        &'a self,
        run: &'a CommandRun,
    ) -> BoxFuture<'a, Result<Option<Box<dyn Execution>>, ExecError>> {
        Box::pin(async move {
            let jobs = self.jobs();
            let lp = ListParams::default().labels(&format!("{LABEL_JOB_ID}={}", run.job_id));
            let list = self
                .call("list Jobs", || jobs.list(&lp))
                .await
                .map_err(|e| exec_error("list the job's Jobs", e))?;
            let mut adopted = None;
            for job in list.items {
                let attempt = label(&job, LABEL_ATTEMPT).and_then(|a| a.parse::<u32>().ok());
                if attempt == Some(run.attempt) && job.metadata.deletion_timestamp.is_none() {
                    adopted = Some(job);
                } else if job.metadata.deletion_timestamp.is_none()
                    && classify::finished(&job, &[]).is_none()
                {
                    tracing::warn!(job = %run.job_id, k8s_job = %job.name_any(), "deleting a superseded attempt's Job");
                    if let Err(e) = self.delete_job(&job.name_any()).await {
                        tracing::warn!(k8s_job = %job.name_any(), error = %e, "cannot delete a superseded Job");
                    }
                }
            }
            Ok(adopted.map(|job| {
                tracing::info!(job = %run.job_id, attempt = run.attempt, k8s_job = %job.name_any(), "adopted a running Kubernetes Job");
                self.execution(&job, &run.job_id, run.attempt)
            }))
        })
    }

    fn logs(&self, job_id: &str, attempt: u32, follow: bool) -> LogStream {
        let (tx, rx) = mpsc::channel(16);
        let exec = self.clone();
        let job_id = job_id.to_owned();
        tokio::spawn(async move {
            if let Err(e) = exec.pump_logs(&job_id, attempt, follow, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        }))
    }
}

/// An attempt's Job, followed through watches.
struct KubeExecution {
    exec: KubernetesExecutor,
    name: String,
    job_id: String,
    attempt: u32,
}

/// One event of the two watches.
enum Seen {
    Job(Box<watcher::Event<Job>>),
    Pod(Box<watcher::Event<Pod>>),
    Error(Box<watcher::Error>),
}

impl Seen {
    fn job(r: Result<watcher::Event<Job>, watcher::Error>) -> Seen {
        r.map_or_else(|e| Seen::Error(Box::new(e)), |e| Seen::Job(Box::new(e)))
    }

    fn pod(r: Result<watcher::Event<Pod>, watcher::Error>) -> Seen {
        r.map_or_else(|e| Seen::Error(Box::new(e)), |e| Seen::Pod(Box::new(e)))
    }
}

impl KubeExecution {
    async fn follow(self, cancel: CancellationToken) -> Result<Outcome, ExecError> {
        let selector = attempt_selector(&self.job_id, self.attempt);
        let config = watcher::Config::default().labels(&selector);
        let job_events = watcher(self.exec.jobs(), config.clone())
            .default_backoff()
            .map(Seen::job)
            .boxed();
        let pod_events = watcher(self.exec.pods(), config)
            .default_backoff()
            .map(Seen::pod)
            .boxed();
        let mut events = futures::stream::select(job_events, pod_events);
        // The Job as last seen; `listing` buffers a relist until it is complete.
        let mut job: Option<Job> = None;
        let mut job_listing: Option<Option<Job>> = None;
        let mut pods: BTreeMap<String, Pod> = BTreeMap::new();
        let mut pod_listing: Option<BTreeMap<String, Pod>> = None;
        let mut errors = 0u32;
        loop {
            let seen = tokio::select! {
                biased;
                () = cancel.cancelled() => return self.cancel().await,
                seen = events.next() => seen,
            };
            let Some(seen) = seen else {
                return Err(ExecError::Backend("the Kubernetes watch ended".into()));
            };
            match seen {
                Seen::Job(event) => match *event {
                    watcher::Event::Init => job_listing = Some(None),
                    watcher::Event::InitApply(j) => job_listing = Some(Some(j)),
                    watcher::Event::InitDone => match job_listing.take().flatten() {
                        Some(j) => job = Some(j),
                        None => return Ok(self.gone()),
                    },
                    watcher::Event::Apply(j) => job = Some(j),
                    watcher::Event::Delete(_) => return Ok(self.gone()),
                },
                Seen::Pod(event) => match *event {
                    watcher::Event::Init => pod_listing = Some(BTreeMap::new()),
                    watcher::Event::InitApply(p) => {
                        pod_listing
                            .get_or_insert_with(BTreeMap::new)
                            .insert(p.name_any(), p);
                    }
                    watcher::Event::InitDone => pods = pod_listing.take().unwrap_or_default(),
                    watcher::Event::Apply(p) => {
                        pods.insert(p.name_any(), p);
                    }
                    watcher::Event::Delete(p) => {
                        pods.remove(&p.name_any());
                    }
                },
                Seen::Error(e) => {
                    errors += 1;
                    // The watcher relists (410 Gone) and retries with backoff by itself.
                    if errors.is_power_of_two() {
                        tracing::warn!(k8s_job = %self.name, error = %e, errors, "watch error");
                    }
                    continue;
                }
            }
            let Some(j) = &job else { continue };
            if j.metadata.deletion_timestamp.is_some() {
                continue; // deleted by someone else: its end comes as a Delete
            }
            let pod_list: Vec<Pod> = pods.values().cloned().collect();
            if let Some(outcome) = classify::finished(j, &pod_list) {
                let outcome = match outcome {
                    Outcome::Exited(0) | Outcome::TimedOut => outcome,
                    // The pods' watch may lag behind the Job's: read them afresh.
                    _ => match self.fresh_pods().await {
                        Some(fresh) => classify::finished(j, &fresh).unwrap_or(outcome),
                        None => outcome,
                    },
                };
                tracing::info!(k8s_job = %self.name, ?outcome, "Kubernetes Job finished");
                return Ok(outcome);
            }
            if let Some(why) = pod_list.iter().find_map(classify::pending_failure) {
                tracing::warn!(k8s_job = %self.name, %why, "attempt cannot start; deleting its Job");
                if let Err(e) = self.exec.delete_job(&self.name).await {
                    tracing::warn!(k8s_job = %self.name, error = %e, "cannot delete the Job");
                }
                return Ok(Outcome::Infrastructure(why));
            }
        }
    }

    async fn fresh_pods(&self) -> Option<Vec<Pod>> {
        let pods = self.exec.pods();
        let lp = ListParams::default().labels(&attempt_selector(&self.job_id, self.attempt));
        self.exec
            .call("list pods", || pods.list(&lp))
            .await
            .ok()
            .map(|l| l.items)
    }

    fn gone(&self) -> Outcome {
        Outcome::Infrastructure(format!(
            "the Kubernetes Job {} disappeared (deleted outside Veraltheim)",
            self.name
        ))
    }

    /// Deletes the Job (foreground), trying until the API takes the request.
    async fn cancel(&self) -> Result<Outcome, ExecError> {
        let mut delay = Duration::from_millis(500);
        loop {
            match self.exec.delete_job(&self.name).await {
                Ok(()) => {
                    tracing::info!(k8s_job = %self.name, "Kubernetes Job deleted (cancel)");
                    return Ok(Outcome::Cancelled);
                }
                Err(e) => {
                    tracing::warn!(k8s_job = %self.name, error = %e, "cannot delete the Job for a cancel; trying again");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}

impl Execution for KubeExecution {
    fn describe(&self) -> String {
        format!(
            "Kubernetes Job {}/{}",
            self.exec.shared.namespace, self.name
        )
    }

    fn wait(
        self: Box<Self>,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, Result<Outcome, ExecError>> {
        Box::pin(self.follow(cancel))
    }
}
