//! Batch jobs through `veraltheim.v1.JobService`: the slow path's runner (durable store, scheduler,
//! and the executor `jobs.executor` names: local processes or Kubernetes Jobs) built from the
//! configuration, and the conversions between the wire and the slow path's types. The runner's
//! loop is the SlowPathOrchestrator in the supervision tree.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use veraltheim_bus::Event;
use veraltheim_proto::v1::{self, job_service_server::JobService};
use veraltheim_slowpath::job::JobKind;
use veraltheim_slowpath::{
    Executor, InferenceExecutor, JobRecord, JobSpec, JobState, JobStore, KubernetesConfig,
    KubernetesExecutor, ListFilter, LocalExecutor, Observer, QueueConfig, Quota, Resources,
    RetryPolicy, Runner, RunnerConfig, RunnerError, SchedulerConfig, StoreError, Toleration,
};
use veraltheim_storage::RedbStore;
use veraltheim_supervisor::BreakerConfig;

use crate::config::{JobExecutorKind, JobsConfig, KubernetesJobsConfig};
use crate::stream::StreamOf;

pub type JobRunner = Runner<Arc<RedbStore>>;

pub struct Jobs {
    pub runner: JobRunner,
    /// `jobs.default_ttl_seconds`: the TTL of a job submitted without one; `None`: kept.
    default_ttl: Option<u64>,
}

impl Jobs {
    /// The runner over `store`, with `capacity` (this machine's; on Kubernetes the configured
    /// one) shared by the configured queues.
    /// Every durable job change comes out of the returned receiver as a `jobs.<id>.state` event
    /// (for the QueueManager to publish).
    /// Inference jobs run through `inference`.
    pub async fn start(
        config: &JobsConfig,
        store: Arc<RedbStore>,
        data_dir: &Path,
        capacity: Resources,
        inference: Arc<dyn InferenceExecutor>,
    ) -> anyhow::Result<(Jobs, mpsc::Receiver<Event>)> {
        let (tx, rx) = mpsc::channel(JOB_EVENT_BACKLOG);
        let observer: Observer = Arc::new(move |r: &JobRecord| {
            if tx.try_send(job_event(r)).is_err() {
                tracing::warn!(job = %r.id, "job event backlog full; event dropped");
            }
        });
        let jobs_dir = data_dir.join("jobs");
        let (exec, capacity, default_running): (Arc<dyn Executor>, _, _) = match config.executor {
            JobExecutorKind::Local => (
                Arc::new(LocalExecutor::new(jobs_dir)),
                capacity,
                std::thread::available_parallelism().map_or(1, |n| n.get()),
            ),
            JobExecutorKind::Kubernetes => {
                let k = &config.kubernetes;
                let exec = KubernetesExecutor::connect(kubernetes_config(k))
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
        let runner = Runner::with_executors(
            JobStore::new(store).with_observer(observer),
            exec,
            Some(inference),
            RunnerConfig {
                scheduler,
                retry: RetryPolicy {
                    initial_delay_ms: config.retry_initial_delay_ms,
                    max_delay_ms: config.retry_max_delay_ms,
                    ..RetryPolicy::default()
                },
                max_running,
                jitter_seed: std::process::id() as u64,
            },
        )?;
        // Jobs that were waiting or running when the coordinator last stopped line up again.
        runner.start().await?;
        Ok((
            Jobs {
                runner,
                default_ttl: config.default_ttl_seconds,
            },
            rx,
        ))
    }
}

/// `jobs.max_running` unset on Kubernetes: the cluster, not this machine, runs the jobs; each
/// running one costs the coordinator two watches.
const KUBERNETES_RUNNING: usize = 64;

fn kubernetes_config(k: &KubernetesJobsConfig) -> KubernetesConfig {
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
        breaker: BreakerConfig::new(
            k.breaker_failure_threshold,
            Duration::from_millis(k.breaker_open_ms.max(1)),
            Duration::from_secs(60),
        ),
        api_retries: k.api_retries,
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
        StoreError::Storage(_) => Status::unavailable(msg),
    }
}

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
        },
        max_retries: s.max_retries,
        deadline_seconds: (s.deadline_seconds > 0).then_some(s.deadline_seconds),
        ttl_seconds_after_finished: (s.ttl_seconds_after_finished > 0)
            .then_some(s.ttl_seconds_after_finished),
        labels: s.labels.into_iter().collect(),
        idempotency_key: (!s.idempotency_key.is_empty()).then_some(s.idempotency_key),
        kind,
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
        }),
        max_retries: s.max_retries,
        deadline_seconds: s.deadline_seconds.unwrap_or(0),
        ttl_seconds_after_finished: s.ttl_seconds_after_finished.unwrap_or(0),
        labels: s.labels.clone().into_iter().collect(),
        idempotency_key: s.idempotency_key.clone().unwrap_or_default(),
        kind: Some(match &s.kind {
            JobKind::Command {
                image,
                command,
                env,
                working_dir,
            } => v1::job_spec::Kind::Command(v1::CommandJob {
                image: image.clone(),
                command: command.clone(),
                env: env.clone().into_iter().collect(),
                working_dir: working_dir.clone(),
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

/// How often WatchJob and `logs --follow` look for changes.
const POLL: Duration = Duration::from_millis(200);

#[tonic::async_trait]
impl JobService for JobsApi {
    async fn submit_job(
        &self,
        request: Request<v1::SubmitJobRequest>,
    ) -> Result<Response<v1::Job>, Status> {
        let jobs = &*self.jobs;
        let spec = request
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("SubmitJobRequest has no spec"))?;
        let mut spec = spec_from_wire(spec)?;
        // The server's default TTL is resolved at submit, so a job keeps the TTL it was
        // accepted with (GetJob shows it) whatever the configuration says later.
        spec.ttl_seconds_after_finished = spec.ttl_seconds_after_finished.or(jobs.default_ttl);
        let rec = jobs.runner.submit(spec).await.map_err(job_status)?;
        Ok(Response::new(job_to_wire(jobs, &rec)))
    }

    async fn get_job(
        &self,
        request: Request<v1::GetJobRequest>,
    ) -> Result<Response<v1::Job>, Status> {
        let jobs = &*self.jobs;
        let rec = jobs
            .runner
            .store()
            .get(&request.get_ref().id)
            .map_err(store_status)?;
        Ok(Response::new(job_to_wire(jobs, &rec)))
    }

    async fn list_jobs(
        &self,
        request: Request<v1::ListJobsRequest>,
    ) -> Result<Response<v1::ListJobsResponse>, Status> {
        let jobs = &*self.jobs;
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
        };
        let (records, next) = jobs.runner.store().list(&filter).map_err(store_status)?;
        Ok(Response::new(v1::ListJobsResponse {
            jobs: records.iter().map(|r| job_to_wire(jobs, r)).collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn cancel_job(
        &self,
        request: Request<v1::CancelJobRequest>,
    ) -> Result<Response<v1::Job>, Status> {
        let jobs = &*self.jobs;
        let rec = jobs
            .runner
            .cancel(&request.get_ref().id)
            .await
            .map_err(job_status)?;
        Ok(Response::new(job_to_wire(jobs, &rec)))
    }

    type WatchJobStream = StreamOf<v1::Job>;

    async fn watch_job(
        &self,
        request: Request<v1::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let id = request.into_inner().id;
        self.jobs.runner.store().get(&id).map_err(store_status)?;
        let api = self.clone();
        let stream = async_stream_unfold(api, id);
        Ok(Response::new(stream))
    }

    type JobLogsStream = StreamOf<v1::LogChunk>;

    async fn job_logs(
        &self,
        request: Request<v1::JobLogsRequest>,
    ) -> Result<Response<Self::JobLogsStream>, Status> {
        let r = request.into_inner();
        let jobs = &*self.jobs;
        jobs.runner.store().get(&r.id).map_err(store_status)?;
        let api = self.clone();
        let (id, follow) = (r.id, r.follow);
        // The attempt to read: the latest; when following a job that has not started, the
        // first, once it starts.
        let attempt = async move {
            loop {
                let jobs = &*api.jobs;
                let rec = jobs.runner.store().get(&id).map_err(store_status)?;
                if rec.attempt > 0 || rec.state.is_terminal() || !follow {
                    let logs = jobs.runner.executor().logs(&id, rec.attempt.max(1), follow);
                    return Ok::<_, Status>(logs);
                }
                tokio::time::sleep(POLL).await;
            }
        };
        let stream = futures::stream::once(attempt).flat_map(|logs| match logs {
            Ok(logs) => logs
                .map(|chunk| {
                    chunk
                        .map(|c| v1::LogChunk {
                            stream: c.source.as_str().into(),
                            data: c.data.into(),
                        })
                        .map_err(|e| Status::unavailable(format!("job logs: {e}")))
                })
                .boxed(),
            Err(status) => futures::stream::once(async move { Err(status) }).boxed(),
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// WatchJob's stream: the job now, then each change, until a terminal state.
fn async_stream_unfold(api: JobsApi, id: String) -> StreamOf<v1::Job> {
    Box::pin(futures::stream::unfold(
        (api, id, None::<(i32, String, u32, u32)>, false),
        |(api, id, last, ended)| async move {
            if ended {
                return None;
            }
            loop {
                let jobs = &*api.jobs;
                let rec = match jobs.runner.store().get(&id) {
                    Ok(r) => r,
                    Err(e) => return Some((Err(store_status(e)), (api, id, last, true))),
                };
                let job = job_to_wire(jobs, &rec);
                // Progress in steps of 1%: a change shows, a busy job does not flood the stream.
                let step = (job.progress * 100.0) as u32;
                let key = (job.state, job.reason.clone(), job.attempt, step);
                if last.as_ref() != Some(&key) {
                    let ended = rec.state.is_terminal();
                    return Some((Ok(job), (api, id, Some(key), ended)));
                }
                tokio::time::sleep(POLL).await;
            }
        },
    ))
}
