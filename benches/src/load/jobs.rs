//! `veraltheim-load jobs`: durable job submissions per second, closed loop, with the baselines
//! measured in the same run:
//!
//! 1. **in-process, group commit** — `JobStore::submit` on a `RedbStore` with its default
//!    options (one committer thread merges concurrent batches into one transaction and one
//!    fsync), the same concurrency, in this process;
//! 2. **in-process, one commit per submission** — the same with `max_batches_per_commit = 1`:
//!    every submission waits for its own transaction and fsync (no group commit);
//! 3. **gRPC** — `SubmitJob` against the real `veraltheim serve` (started here on free loopback
//!    ports with `--max-running-jobs 1`, unless `--server` names one), each acknowledged only
//!    once durable.
//!
//! So that the submitted jobs wait rather than run (this measures submissions, not process
//! starts), a first job (`sleep`) takes the coordinator's only running slot before the load
//! starts; every later job waits behind it. Each store lives in a fresh directory under
//! `--data-dir` (default: the system's temporary directory), on the disk being measured.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use serde::Serialize;
use tonic::transport::Channel;
use veraltheim_proto::v1::{self, job_service_client::JobServiceClient};
use veraltheim_slowpath::job::JobKind;
use veraltheim_slowpath::{JobSpec, JobStore, Resources};
use veraltheim_storage::{RedbStore, Store, StoreOptions};

use super::coordinator::{Coordinator, default_binary};
use super::cpu::{self, CpuUse};
use super::report::{Latency, Recorder, code_name, throughput};

#[derive(Args, Debug, Clone)]
pub struct JobsArgs {
    /// Clients, each with one submission in flight.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Measured seconds of each run (after the warm-up).
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Rounds, each the three runs in turn (in-process group commit, in-process one commit per
    /// submission, gRPC); ratios are per round.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// gRPC clients sharing one HTTP/2 channel (connection).
    #[arg(long, default_value_t = 16)]
    pub clients_per_channel: usize,
    /// The coordinator binary (default: `veraltheim` next to this executable).
    #[arg(long)]
    pub veraltheim_bin: Option<PathBuf>,
    /// Load this coordinator (HOST:PORT) instead of starting one; its jobs may then run.
    #[arg(long)]
    pub server: Option<String>,
    /// Where the in-process stores are created (default: the temporary directory).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// One run: throughput, latency, and the machine around it.
#[derive(Clone, Debug, Serialize)]
pub struct SubmitRun {
    pub target: String,
    pub submissions: u64,
    pub errors: u64,
    pub per_second: f64,
    pub latency: Latency,
    /// Submissions per write transaction (in-process runs: from the store's counters).
    pub batches_per_commit: Option<f64>,
    pub cpu: CpuUse,
}

#[derive(Clone, Debug, Serialize)]
pub struct SubmitRound {
    pub group_commit: SubmitRun,
    pub one_commit_each: SubmitRun,
    pub grpc: SubmitRun,
    /// gRPC / in-process group commit.
    pub grpc_vs_in_process: f64,
    /// In-process group commit / one commit per submission.
    pub group_commit_gain: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct JobsReport {
    pub concurrency: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub rounds: Vec<SubmitRound>,
}

/// The job every submission carries: small, valid, and never run here.
pub fn bench_spec(n: u64) -> JobSpec {
    JobSpec {
        name: format!("bench-{n}"),
        queue: "default".into(),
        priority_class: String::new(),
        resources: Resources {
            cpu_millis: 1,
            memory_bytes: 0,
            gpus: 0,
        },
        max_retries: 0,
        deadline_seconds: None,
        ttl_seconds_after_finished: None,
        labels: [("bench".to_string(), "submit".to_string())].into(),
        idempotency_key: None,
        owner: None,
        kind: JobKind::Command {
            image: String::new(),
            command: vec!["true".into()],
            env: Default::default(),
            working_dir: String::new(),
            writable_root: false,
        },
    }
}

fn wire_spec(n: u64) -> v1::JobSpec {
    v1::JobSpec {
        name: format!("bench-{n}"),
        queue: "default".into(),
        resources: Some(v1::Resources {
            cpu_millis: 1,
            memory_bytes: 0,
            gpus: 0,
        }),
        labels: [("bench".to_string(), "submit".to_string())].into(),
        kind: Some(v1::job_spec::Kind::Command(v1::CommandJob {
            command: vec!["true".into()],
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// `concurrency` clients call `op(client, n)` back to back for `warmup + duration`; the
/// submissions that complete within the measured window are counted (so that none in flight
/// at its edges is lost or counted twice), with their latency.
pub async fn closed_loop<F, Fut>(
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    op: F,
) -> anyhow::Result<(Recorder, Duration)>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let from = start + warmup;
    let end = from + duration;
    let mut tasks = Vec::with_capacity(concurrency);
    for client in 0..concurrency.max(1) {
        let (op, next) = (op.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut rec = Recorder::new();
            loop {
                let sent = Instant::now();
                if sent >= end {
                    return rec;
                }
                let n = next.fetch_add(1, Ordering::Relaxed);
                let result = op(client, n).await;
                let done = Instant::now();
                if done >= from && done < end {
                    match result {
                        Ok(()) => rec.ok(done - sent),
                        Err(e) => rec.error(&e),
                    }
                }
            }
        }));
    }
    let mut all = Recorder::new();
    for t in tasks {
        all.merge(&t.await.context("a client task failed")?);
    }
    Ok((all, duration))
}

fn run_of(
    target: &str,
    rec: &Recorder,
    window: Duration,
    cpu: CpuUse,
    batches_per_commit: Option<f64>,
) -> SubmitRun {
    SubmitRun {
        target: target.to_string(),
        submissions: rec.successes(),
        errors: rec.error_total(),
        per_second: throughput(rec.successes(), window),
        latency: rec.latency(),
        batches_per_commit,
        cpu,
    }
}

/// A fresh directory under `base` for one store.
fn scratch(base: &Path, what: &str) -> anyhow::Result<tempfile::TempDir> {
    std::fs::create_dir_all(base).with_context(|| format!("cannot create {}", base.display()))?;
    tempfile::Builder::new()
        .prefix(&format!("veraltheim-jobs-{what}-"))
        .tempdir_in(base)
        .with_context(|| format!("cannot create a directory in {}", base.display()))
}

/// In-process submissions into a fresh redb store opened with `options`.
async fn in_process(
    args: &JobsArgs,
    base: &Path,
    target: &str,
    options: StoreOptions,
) -> anyhow::Result<SubmitRun> {
    let dir = scratch(base, "store")?;
    let path = dir.path().join("state.redb");
    let store = Arc::new(JobStore::new(
        RedbStore::open(&path, options).with_context(|| format!("open {}", path.display()))?,
    ));
    let before = store.inner().stats();
    let cpu_before = cpu::sample(None);
    let (rec, window) = closed_loop(
        args.concurrency,
        Duration::from_secs_f64(args.warmup),
        Duration::from_secs_f64(args.duration),
        {
            let store = store.clone();
            move |_, n| {
                let store = store.clone();
                async move {
                    store
                        .submit(bench_spec(n))
                        .await
                        .map(drop)
                        .map_err(|e| format!("STORE: {e}"))
                }
            }
        },
    )
    .await?;
    let cpu = CpuUse::between(&cpu_before, &cpu::sample(None));
    let after = store.inner().stats();
    let commits = after.commits.saturating_sub(before.commits);
    let batches = after.batches.saturating_sub(before.batches);
    let per_commit = (commits > 0).then(|| batches as f64 / commits as f64);
    Ok(run_of(target, &rec, window, cpu, per_commit))
}

async fn wait_running(client: &mut JobServiceClient<Channel>, id: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let job = client
            .get_job(v1::GetJobRequest { id: id.into() })
            .await?
            .into_inner();
        if job.state == v1::JobState::Running as i32 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the blocking job {id} is not running after 30 s: {job:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn channel(addr: &str) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?)
}

/// SubmitJob against `addr` (whose process is `pid`, for its CPU).
async fn grpc(args: &JobsArgs, addr: &str, pid: Option<u32>) -> anyhow::Result<SubmitRun> {
    let n_channels = args
        .concurrency
        .div_ceil(args.clients_per_channel.max(1))
        .max(1);
    let mut channels = Vec::with_capacity(n_channels);
    for _ in 0..n_channels {
        channels.push(channel(addr).await?);
    }
    let per = args.clients_per_channel.max(1);
    let cpu_before = cpu::sample(pid);
    let (rec, window) = closed_loop(
        args.concurrency,
        Duration::from_secs_f64(args.warmup),
        Duration::from_secs_f64(args.duration),
        move |client, n| {
            let mut c = JobServiceClient::new(channels[(client / per) % channels.len()].clone());
            async move {
                c.submit_job(v1::SubmitJobRequest {
                    spec: Some(wire_spec(n)),
                })
                .await
                .map(drop)
                .map_err(|s| code_name(s.code()).to_string())
            }
        },
    )
    .await?;
    let cpu = CpuUse::between(&cpu_before, &cpu::sample(pid));
    Ok(run_of("grpc SubmitJob", &rec, window, cpu, None))
}

/// The real coordinator, its one running slot taken by a `sleep` job so that the load's jobs
/// wait.
async fn start_coordinator(args: &JobsArgs, total_s: f64) -> anyhow::Result<Coordinator> {
    let binary = match &args.veraltheim_bin {
        Some(b) => b.clone(),
        None => default_binary()?,
    };
    let coordinator = Coordinator::start_with(
        &binary,
        &["identity".to_string()],
        0,
        None,
        &["--max-running-jobs".into(), "1".into()],
    )
    .await?;
    let mut client = JobServiceClient::new(channel(&coordinator.addr().to_string()).await?);
    let blocker = client
        .submit_job(v1::SubmitJobRequest {
            spec: Some(v1::JobSpec {
                name: "blocker".into(),
                kind: Some(v1::job_spec::Kind::Command(v1::CommandJob {
                    command: vec!["sleep".into(), format!("{}", total_s.ceil() as u64 + 60)],
                    ..Default::default()
                })),
                ..Default::default()
            }),
        })
        .await?
        .into_inner();
    wait_running(&mut client, &blocker.id).await?;
    Ok(coordinator)
}

pub async fn jobs(args: &JobsArgs) -> anyhow::Result<JobsReport> {
    if args.concurrency == 0 || args.concurrency > super::args::MAX_CONCURRENCY {
        bail!(
            "--concurrency must be 1 to {}",
            super::args::MAX_CONCURRENCY
        );
    }
    for (name, v) in [("--duration", args.duration), ("--warmup", args.warmup)] {
        if !(0.0..=super::args::MAX_DURATION_S).contains(&v) || (name == "--duration" && v == 0.0) {
            bail!("{name} {v} is out of range");
        }
    }
    if args.rounds == 0 || args.rounds > super::args::MAX_ROUNDS {
        bail!("--rounds must be 1 to {}", super::args::MAX_ROUNDS);
    }
    let base = args.data_dir.clone().unwrap_or_else(std::env::temp_dir);
    let per_run = args.duration + args.warmup;
    let coordinator = match &args.server {
        Some(_) => None,
        None => Some(start_coordinator(args, per_run * args.rounds as f64 + 10.0).await?),
    };
    let (addr, pid) = match (&args.server, &coordinator) {
        (Some(addr), _) => (addr.clone(), None),
        (None, Some(c)) => (c.addr().to_string(), c.pid()),
        (None, None) => bail!("no coordinator to load"),
    };
    let mut rounds = Vec::new();
    for _ in 0..args.rounds {
        let group = in_process(
            args,
            &base,
            "in-process JobStore::submit, group commit",
            StoreOptions::default(),
        )
        .await?;
        let single = in_process(
            args,
            &base,
            "in-process JobStore::submit, one commit each",
            StoreOptions {
                max_batches_per_commit: 1,
                ..StoreOptions::default()
            },
        )
        .await?;
        let grpc = grpc(args, &addr, pid).await?;
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        rounds.push(SubmitRound {
            grpc_vs_in_process: ratio(grpc.per_second, group.per_second),
            group_commit_gain: ratio(group.per_second, single.per_second),
            group_commit: group,
            one_commit_each: single,
            grpc,
        });
    }
    if let Some(c) = coordinator {
        c.stop().await?;
    }
    Ok(JobsReport {
        concurrency: args.concurrency,
        duration_s: args.duration,
        warmup_s: args.warmup,
        rounds,
    })
}

impl SubmitRun {
    fn line(&self) -> String {
        let per_commit = self
            .batches_per_commit
            .map_or(String::new(), |b| format!("  {b:.1} submissions/commit"));
        let others = self
            .cpu
            .others_cores
            .map_or(String::new(), |o| format!("  others {o:.2} cores"));
        format!(
            "  {:<46} {:>8.0}/s  p50 {:>6} µs  p99 {:>7} µs  errors {}{per_commit}{others}",
            self.target, self.per_second, self.latency.p50_us, self.latency.p99_us, self.errors
        )
    }
}

impl JobsReport {
    pub fn text(&self) -> String {
        let mut out = format!(
            "durable job submissions: closed loop, {} clients, {} s measured after {} s warm-up\n",
            self.concurrency, self.duration_s, self.warmup_s
        );
        for (i, r) in self.rounds.iter().enumerate() {
            out.push_str(&format!("round {}\n", i + 1));
            for run in [&r.group_commit, &r.one_commit_each, &r.grpc] {
                out.push_str(&run.line());
                out.push('\n');
            }
            out.push_str(&format!(
                "  gRPC / in-process group commit = {:.3}; group commit / one commit each = {:.2}\n",
                r.grpc_vs_in_process, r.group_commit_gain
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bench_job_is_valid_on_both_sides() {
        bench_spec(7).validate().unwrap();
        let w = wire_spec(7);
        assert_eq!(w.name, "bench-7");
        assert!(matches!(w.kind, Some(v1::job_spec::Kind::Command(_))));
    }

    #[tokio::test]
    async fn the_closed_loop_counts_only_the_window() {
        let (rec, window) = closed_loop(
            4,
            Duration::from_millis(50),
            Duration::from_millis(200),
            |_, n| async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                if n % 10 == 0 {
                    Err("X".to_string())
                } else {
                    Ok(())
                }
            },
        )
        .await
        .unwrap();
        assert_eq!(window, Duration::from_millis(200));
        // 4 clients × ~200 ms / 5 ms each at most; some counted as errors.
        assert!(
            rec.successes() > 0 && rec.successes() <= 4 * 41,
            "{}",
            rec.successes()
        );
        assert!(rec.errors().get("X").copied().unwrap_or(0) > 0);
    }
}
