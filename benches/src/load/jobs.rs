//! `veraltheim-load jobs`: durable job submissions per second, closed loop, with the baselines
//! measured in the same run:
//!
//! 1. **in-process, group commit** — `JobStore::submit` on a `RedbStore` with its default
//!    options (one committer thread merges concurrent batches into one transaction and one
//!    fsync), the same concurrency, in this process;
//! 2. **in-process, one commit per submission** — the same with `max_batches_per_commit = 1`:
//!    every submission waits for its own transaction and fsync (no group commit);
//! 3. **gRPC** — `SubmitJob` against the real `veraltheim serve` (started here on free loopback
//!    ports with `--max-running-jobs 1`, unless `--server` names one or more: the clients are
//!    then spread over them round robin), each acknowledged only once durable.
//!
//! So that the submitted jobs wait rather than run (this measures submissions, not process
//! starts), a first job (`sleep`) takes the coordinator's only running slot before the load
//! starts; every later job waits behind it. Each store lives in a fresh directory under
//! `--data-dir` (default: the system's temporary directory), on the disk being measured.
//!
//! **Cluster mode** (`--cluster-nodes N`): N coordinators (`serve --store URL --node-id nI
//! --lease-seconds L --max-running-jobs 1`) on one fresh PostgreSQL database (created from
//! `--pg`, dropped at the end: see [`super::pg`]), and, in the same run, the single redb
//! coordinator of run 3 as the baseline. Each round is then two runs, single node then cluster,
//! the same clients and jobs; the cluster's clients go round robin to the N nodes (client `c`
//! to node `c mod N`), so every node takes submits, and the leader puts every job in line. The
//! in-process runs are left out. The jobs wait as in the single node's case: N `sleep` jobs are
//! submitted first and the load starts only once all N run, one on each node (each node has
//! one slot, and the leader places a job only on a node with a free slot), so every later job
//! waits in the leader's line with every slot taken (the leader's `saturated` round, not a
//! placement, on each submit). Nothing is run or placed during the measurement. PostgreSQL's
//! CPU is that of every process named `postgres` on the machine (other databases' included).

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
use super::pg::{self, ScratchDb};
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
    /// Load these coordinators (HOST:PORT; repeat the flag or separate with commas) instead of
    /// starting one; the clients are spread over them round robin. Their jobs may then run.
    #[arg(long, value_delimiter = ',', conflicts_with = "cluster_nodes")]
    pub server: Vec<String>,
    /// Cluster mode: start this many coordinators on one fresh PostgreSQL database (see --pg)
    /// and load them together, against one redb coordinator started in the same run (see the
    /// module documentation). 0: off.
    #[arg(long, default_value_t = 0)]
    pub cluster_nodes: usize,
    /// The PostgreSQL URL the cluster's scratch database is created from and dropped through
    /// (`postgres://USER@HOST:PORT/DATABASE`).
    #[arg(long, default_value = pg::DEFAULT_ADMIN_URL)]
    pub pg: String,
    /// The cluster nodes' lease (`serve --lease-seconds`).
    #[arg(long, default_value_t = 3)]
    pub lease_seconds: u64,
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
    /// The coordinators loaded (their processes' CPU is `cpu.server_cores`); 0 in-process.
    pub servers: usize,
    /// PostgreSQL's processes, in cores (cluster mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres_cores: Option<f64>,
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

/// A round of cluster mode: the single redb node, then the cluster.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterRound {
    pub single: SubmitRun,
    pub cluster: SubmitRun,
    /// Cluster / single node, submissions per second.
    pub cluster_vs_single: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ClusterReport {
    pub nodes: usize,
    pub lease_seconds: u64,
    pub database: String,
    pub rounds: Vec<ClusterRound>,
}

#[derive(Clone, Debug, Serialize)]
pub struct JobsReport {
    pub concurrency: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    /// The three runs of each round (empty in cluster mode).
    pub rounds: Vec<SubmitRound>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterReport>,
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
            gpu_memory_bytes: 0,
        },
        max_retries: 0,
        deadline_seconds: None,
        ttl_seconds_after_finished: None,
        labels: [("bench".to_string(), "submit".to_string())].into(),
        idempotency_key: None,
        owner: None,
        pausable: None,
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
            gpu_memory_bytes: 0,
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
        servers: 0,
        postgres_cores: None,
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

/// Waits (up to `bound`) until every job of `ids` runs; the nodes they run on, in order.
async fn wait_running(
    client: &mut JobServiceClient<Channel>,
    ids: &[String],
    bound: Duration,
) -> anyhow::Result<Vec<String>> {
    let deadline = Instant::now() + bound;
    loop {
        let mut nodes = Vec::with_capacity(ids.len());
        let mut waiting = None;
        for id in ids {
            let job = client
                .get_job(v1::GetJobRequest { id: id.clone() })
                .await?
                .into_inner();
            if job.state == v1::JobState::Running as i32 {
                nodes.push(job.node);
            } else {
                waiting = Some(job);
                break;
            }
        }
        let Some(job) = waiting else {
            return Ok(nodes);
        };
        if Instant::now() > deadline {
            bail!(
                "the blocking job {} is not running after {bound:?}: {job:?}",
                job.id
            );
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

/// Where client `client` of `concurrency` goes among `servers` servers with
/// `per_channel` clients to a connection: (server, connection on it). Round robin over the
/// servers (client `c` to server `c mod servers`), then in order onto that server's
/// connections.
pub fn spread(client: usize, servers: usize, per_channel: usize) -> (usize, usize) {
    let servers = servers.max(1);
    (client % servers, (client / servers) / per_channel.max(1))
}

/// The connections server `server` needs for its share of `concurrency` clients.
pub fn channels_on(server: usize, servers: usize, concurrency: usize, per_channel: usize) -> usize {
    let servers = servers.max(1);
    let clients = concurrency / servers + usize::from(server < concurrency % servers);
    clients.div_ceil(per_channel.max(1))
}

/// Coordinators' CPU between two readings: the sum over `pids` of whole-process ticks.
fn coordinators_ticks(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|p| cpu::process_ticks(*p)).sum()
}

/// SubmitJob against `addrs` (clients round robin; see [`spread`]), whose processes are
/// `pids` (for their CPU; empty when not started here). With `postgres`, PostgreSQL's
/// processes are sampled too and left out of `others`.
async fn grpc(
    args: &JobsArgs,
    target: &str,
    addrs: &[String],
    pids: &[u32],
    postgres: bool,
) -> anyhow::Result<SubmitRun> {
    if addrs.is_empty() {
        bail!("no coordinator to load");
    }
    let per = args.clients_per_channel.max(1);
    let mut channels: Vec<Vec<Channel>> = Vec::with_capacity(addrs.len());
    for (i, addr) in addrs.iter().enumerate() {
        let n = channels_on(i, addrs.len(), args.concurrency, per).max(1);
        let mut on = Vec::with_capacity(n);
        for _ in 0..n {
            on.push(
                channel(addr)
                    .await
                    .with_context(|| format!("cannot connect to {addr}"))?,
            );
        }
        channels.push(on);
    }
    let servers = addrs.len();
    // One coordinator: its threads by name, as before; several: their processes' totals.
    let one = (pids.len() == 1).then(|| pids[0]);
    let cpu_before = cpu::sample(one);
    let (coord_before, pg_before) = (coordinators_ticks(pids), cpu::ticks_of_named("postgres"));
    let (rec, window) = closed_loop(
        args.concurrency,
        Duration::from_secs_f64(args.warmup),
        Duration::from_secs_f64(args.duration),
        move |client, n| {
            let (server, ch) = spread(client, servers, per);
            let on = &channels[server];
            let mut c = JobServiceClient::new(on[ch % on.len()].clone());
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
    let cpu_after = cpu::sample(one);
    let (coord_after, pg_after) = (coordinators_ticks(pids), cpu::ticks_of_named("postgres"));
    let mut cpu = CpuUse::between(&cpu_before, &cpu_after);
    let cores =
        |ticks: u64| (cpu.wall_s > 0.0).then(|| ticks as f64 / cpu::TICKS_PER_S / cpu.wall_s);
    let pg_cores = if postgres {
        cores(pg_after.saturating_sub(pg_before))
    } else {
        None
    };
    if pids.len() > 1 {
        cpu.server_cores = cores(coord_after.saturating_sub(coord_before));
        cpu.others_cores = cpu
            .others_cores
            .map(|o| (o - cpu.server_cores.unwrap_or(0.0)).max(0.0));
    }
    if let Some(p) = pg_cores {
        cpu.others_cores = cpu.others_cores.map(|o| (o - p).max(0.0));
    }
    let mut run = run_of(target, &rec, window, cpu, None);
    run.servers = servers;
    run.postgres_cores = pg_cores;
    Ok(run)
}

fn binary(args: &JobsArgs) -> anyhow::Result<PathBuf> {
    match &args.veraltheim_bin {
        Some(b) => Ok(b.clone()),
        None => default_binary(),
    }
}

/// A `sleep` job that outlives the run: it holds a running slot.
fn blocker(total_s: f64) -> v1::SubmitJobRequest {
    v1::SubmitJobRequest {
        spec: Some(v1::JobSpec {
            name: "blocker".into(),
            kind: Some(v1::job_spec::Kind::Command(v1::CommandJob {
                command: vec!["sleep".into(), format!("{}", total_s.ceil() as u64 + 60)],
                ..Default::default()
            })),
            ..Default::default()
        }),
    }
}

/// The real coordinator, its one running slot taken by a `sleep` job so that the load's jobs
/// wait.
async fn start_coordinator(args: &JobsArgs, total_s: f64) -> anyhow::Result<Coordinator> {
    let coordinator = Coordinator::start_with(
        &binary(args)?,
        &["identity".to_string()],
        0,
        None,
        &["--max-running-jobs".into(), "1".into()],
    )
    .await?;
    let mut client = JobServiceClient::new(channel(&coordinator.addr().to_string()).await?);
    let blocker = client.submit_job(blocker(total_s)).await?.into_inner();
    wait_running(&mut client, &[blocker.id], Duration::from_secs(30)).await?;
    Ok(coordinator)
}

/// `nodes` coordinators on one scratch database, each node's one slot taken by a `sleep` job
/// (see the module documentation).
pub struct Cluster {
    pub nodes: Vec<Coordinator>,
    pub db: ScratchDb,
}

impl Cluster {
    /// Starts `nodes` coordinators named `n1`… on a fresh database from `admin`, with lease
    /// `lease_seconds` and `slots` running jobs each. With `stagger`, a random pause of up to
    /// that long comes before each node after the first (so that the nodes' lease renewals fall
    /// at random points of each other's cycles, not at the spacing of their starts).
    pub async fn start(
        binary: &Path,
        admin: &str,
        nodes: usize,
        lease_seconds: u64,
        slots: usize,
        stagger: Option<Duration>,
    ) -> anyhow::Result<Cluster> {
        let db = ScratchDb::create(admin).await?;
        let mut started = Vec::with_capacity(nodes);
        for i in 1..=nodes {
            if let Some(max) = stagger.filter(|_| i > 1) {
                let ms = random_ms(u64::try_from(max.as_millis()).unwrap_or(u64::MAX));
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let extra = [
                "--store".to_string(),
                db.url().to_owned(),
                "--node-id".into(),
                format!("n{i}"),
                "--lease-seconds".into(),
                lease_seconds.to_string(),
                "--max-running-jobs".into(),
                slots.to_string(),
            ];
            let node = Coordinator::start_with(binary, &["identity".to_string()], 0, None, &extra)
                .await
                .with_context(|| format!("cluster node n{i}"))?;
            started.push(node);
        }
        Ok(Cluster { nodes: started, db })
    }

    pub fn addrs(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr().to_string()).collect()
    }

    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().filter_map(Coordinator::pid).collect()
    }

    /// Stops every node (SIGTERM), then drops the database.
    pub async fn stop(self) -> anyhow::Result<()> {
        let mut first_error = None;
        for n in self.nodes {
            if let Err(e) = n.stop().await {
                first_error.get_or_insert(e);
            }
        }
        let dropped = self.db.drop_now().await;
        match first_error {
            Some(e) => Err(e),
            None => dropped,
        }
    }
}

/// A pseudo-random number in `0..max` (from the clock's nanoseconds: nothing to seed, and
/// good enough to spread a phase); 0 when `max` is 0.
pub fn random_ms(max: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    u64::from(nanos) % max.max(1)
}

/// The cluster of cluster mode, every node's one slot taken by a blocker.
async fn start_cluster(args: &JobsArgs, total_s: f64) -> anyhow::Result<Cluster> {
    let cluster = Cluster::start(
        &binary(args)?,
        &args.pg,
        args.cluster_nodes,
        args.lease_seconds,
        1,
        None,
    )
    .await?;
    let mut clients = Vec::new();
    for addr in cluster.addrs() {
        clients.push(JobServiceClient::new(channel(&addr).await?));
    }
    let mut ids = Vec::new();
    for i in 0..args.cluster_nodes {
        let n = clients.len();
        let job = clients[i % n]
            .submit_job(blocker(total_s))
            .await?
            .into_inner();
        ids.push(job.id);
    }
    // The leader places a blocker on a node once that node is a live member it knows of.
    let mut on = wait_running(&mut clients[0], &ids, Duration::from_secs(60)).await?;
    on.sort();
    on.dedup();
    if on.len() != args.cluster_nodes {
        bail!(
            "the {} blockers run on {} nodes ({on:?}), not one on each",
            args.cluster_nodes,
            on.len()
        );
    }
    Ok(cluster)
}

fn check_args(args: &JobsArgs) -> anyhow::Result<()> {
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
    if args.cluster_nodes > MAX_CLUSTER_NODES {
        bail!("--cluster-nodes must be 0 (off) to {MAX_CLUSTER_NODES}");
    }
    if !(1..=MAX_LEASE_SECONDS).contains(&args.lease_seconds) {
        bail!("--lease-seconds must be 1 to {MAX_LEASE_SECONDS}");
    }
    if args.server.iter().any(|s| s.trim().is_empty()) {
        bail!("--server: an empty address");
    }
    Ok(())
}

/// Most coordinators cluster mode starts.
pub const MAX_CLUSTER_NODES: usize = 16;
/// The longest lease the benchmarks take (the coordinator's own bound is larger).
pub const MAX_LEASE_SECONDS: u64 = 60;

pub async fn jobs(args: &JobsArgs) -> anyhow::Result<JobsReport> {
    check_args(args)?;
    if args.cluster_nodes > 0 {
        return cluster_jobs(args).await;
    }
    let base = args.data_dir.clone().unwrap_or_else(std::env::temp_dir);
    let per_run = args.duration + args.warmup;
    let coordinator = if args.server.is_empty() {
        Some(start_coordinator(args, per_run * args.rounds as f64 + 10.0).await?)
    } else {
        None
    };
    let (addrs, pids) = match &coordinator {
        Some(c) => (vec![c.addr().to_string()], c.pid().into_iter().collect()),
        None => (args.server.clone(), Vec::new()),
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
        let grpc = grpc(args, "grpc SubmitJob", &addrs, &pids, false).await?;
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
        cluster: None,
    })
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// Cluster mode (see the module documentation).
async fn cluster_jobs(args: &JobsArgs) -> anyhow::Result<JobsReport> {
    let per_run = args.duration + args.warmup;
    let total = 2.0 * per_run * args.rounds as f64 + 30.0;
    let single = start_coordinator(args, total).await?;
    let cluster = start_cluster(args, total).await?;
    let single_addr = vec![single.addr().to_string()];
    let single_pid: Vec<u32> = single.pid().into_iter().collect();
    let (addrs, pids) = (cluster.addrs(), cluster.pids());
    let mut rounds = Vec::new();
    let mut failed = None;
    for _ in 0..args.rounds {
        let one = grpc(
            args,
            "grpc SubmitJob, 1 node (redb)",
            &single_addr,
            &single_pid,
            true,
        );
        let one = match one.await {
            Ok(r) => r,
            Err(e) => {
                failed = Some(e);
                break;
            }
        };
        let target = format!("grpc SubmitJob, {} nodes (PostgreSQL)", addrs.len());
        let many = match grpc(args, &target, &addrs, &pids, true).await {
            Ok(r) => r,
            Err(e) => {
                failed = Some(e);
                break;
            }
        };
        rounds.push(ClusterRound {
            cluster_vs_single: ratio(many.per_second, one.per_second),
            single: one,
            cluster: many,
        });
    }
    let database = cluster.db.name().to_owned();
    let stopped = single.stop().await.map(drop);
    let cluster_stopped = cluster.stop().await;
    if let Some(e) = failed {
        return Err(e);
    }
    stopped?;
    cluster_stopped?;
    Ok(JobsReport {
        concurrency: args.concurrency,
        duration_s: args.duration,
        warmup_s: args.warmup,
        rounds: Vec::new(),
        cluster: Some(ClusterReport {
            nodes: args.cluster_nodes,
            lease_seconds: args.lease_seconds,
            database,
            rounds,
        }),
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
        let client = if self.servers > 0 {
            format!("  client {:.2} cores", self.cpu.client_cores)
        } else {
            String::new()
        };
        let server = self
            .cpu
            .server_cores
            .filter(|_| self.servers > 0)
            .map_or(String::new(), |c| format!("  server(s) {c:.2} cores"));
        let pg = self
            .postgres_cores
            .map_or(String::new(), |c| format!("  postgres {c:.2} cores"));
        format!(
            "  {:<46} {:>8.0}/s  p50 {:>6} µs  p99 {:>7} µs  errors {}{per_commit}{client}{server}{pg}{others}",
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
        if let Some(c) = &self.cluster {
            out.push_str(&format!(
                "cluster: {} nodes on PostgreSQL (database {}, lease {} s), clients round robin; baseline: 1 node on redb\n",
                c.nodes, c.database, c.lease_seconds
            ));
            for (i, r) in c.rounds.iter().enumerate() {
                out.push_str(&format!("round {}\n", i + 1));
                for run in [&r.single, &r.cluster] {
                    out.push_str(&run.line());
                    out.push('\n');
                }
                out.push_str(&format!(
                    "  cluster / single node = {:.3}\n",
                    r.cluster_vs_single
                ));
            }
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

    #[test]
    fn clients_go_round_robin_to_the_servers_and_fill_their_connections() {
        for (servers, concurrency, per) in [(1, 64, 16), (3, 64, 16), (3, 7, 2), (16, 5, 4)] {
            let mut clients = vec![0usize; servers];
            let mut on_channel = std::collections::BTreeMap::new();
            for c in 0..concurrency {
                let (s, ch) = spread(c, servers, per);
                assert_eq!(s, c % servers);
                assert!(
                    ch < channels_on(s, servers, concurrency, per),
                    "{c}: {s}/{ch}"
                );
                clients[s] += 1;
                *on_channel.entry((s, ch)).or_insert(0usize) += 1;
            }
            // As even as can be, and no connection over its share.
            let (lo, hi) = (clients.iter().min(), clients.iter().max());
            assert!(hi.unwrap() - lo.unwrap() <= 1, "{clients:?}");
            assert!(on_channel.values().all(|n| *n <= per), "{on_channel:?}");
            let total: usize = (0..servers)
                .map(|s| channels_on(s, servers, concurrency, per))
                .sum();
            assert_eq!(total, on_channel.len(), "every connection is used");
        }
        assert_eq!(
            spread(5, 0, 0),
            (0, 5),
            "no server or per-channel bound: as one"
        );
    }

    fn parse(argv: &[&str]) -> Result<JobsArgs, clap::Error> {
        use clap::Parser as _;
        let cli = super::super::args::Cli::try_parse_from(
            ["veraltheim-load", "jobs"].iter().chain(argv).copied(),
        )?;
        match cli.command {
            super::super::args::Command::Jobs(a) => Ok(a),
            other => panic!("not jobs: {other:?}"),
        }
    }

    #[test]
    fn several_servers_and_the_cluster_options() {
        let a = parse(&["--server", "127.0.0.1:1,127.0.0.1:2", "--server", "h:3"]).unwrap();
        assert_eq!(a.server, ["127.0.0.1:1", "127.0.0.1:2", "h:3"]);
        assert_eq!((a.cluster_nodes, a.lease_seconds), (0, 3));
        check_args(&a).unwrap();
        let a = parse(&["--cluster-nodes", "3", "--pg", "postgres://u@db:5432/x"]).unwrap();
        assert_eq!(
            (a.cluster_nodes, a.pg.as_str()),
            (3, "postgres://u@db:5432/x")
        );
        check_args(&a).unwrap();
        // A cluster is started here or servers are given, not both.
        assert!(parse(&["--cluster-nodes", "3", "--server", "h:1"]).is_err());
        for (argv, flag) in [
            (&["--cluster-nodes", "17"][..], "--cluster-nodes"),
            (
                &["--cluster-nodes", "3", "--lease-seconds", "0"],
                "--lease-seconds",
            ),
            (&["--server", "h:1,"], "--server"),
            (&["--concurrency", "0"], "--concurrency"),
        ] {
            let e = check_args(&parse(argv).unwrap()).unwrap_err().to_string();
            assert!(e.contains(flag), "{argv:?}: {e}");
        }
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
