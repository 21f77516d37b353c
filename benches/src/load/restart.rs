//! `veraltheim-load restart`: how long the slow path takes to come back with many jobs in its
//! durable store, measured on a store written here (a fixture) and copied afresh for each
//! measurement (so each one starts from the same file; the copy leaves it in the page cache,
//! as after a process restart, not a reboot).
//!
//! Fixtures, `--jobs` jobs each (default 100,000):
//! - `queued`: every job QUEUED — the worst case: all of them are live, recovered and put in
//!   line;
//! - `finished`: all finished (SUCCEEDED) but `--running` jobs that were RUNNING when the
//!   coordinator died — the usual case: a long history, a few jobs to take up again (each
//!   rewritten as QUEUED, one commit each).
//!
//! Measured, in this process: `RedbStore::open`, then `JobStore::recover` (reads the live jobs,
//! re-queues the interrupted ones), and on a second copy `Runner::start` (recover, then every
//! live job into the scheduler) — what the coordinator does before it serves. The baseline in
//! the same run is an empty store. With `--binary` (default on), also the real `veraltheim
//! serve`: from spawn to KServe ServerReady, on an empty data directory and on each fixture.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::Args;
use serde::Serialize;
use veraltheim_slowpath::store::{ACTIVE, HistoryEntry, JOBS};
use veraltheim_slowpath::{
    JobRecord, JobState, JobStore, LocalExecutor, QueueConfig, Quota, Resources, RetryPolicy,
    Runner, RunnerConfig, SchedulerConfig,
};
use veraltheim_storage::{Batch, RedbStore, Store, StoreOptions};

use super::coordinator::{Coordinator, default_binary};
use super::jobs::bench_spec;
use super::suite::median;

#[derive(Args, Debug, Clone)]
pub struct RestartArgs {
    /// Jobs in each fixture store.
    #[arg(long, default_value_t = 100_000)]
    pub jobs: usize,
    /// Of the `finished` fixture's jobs, how many were RUNNING when it stopped.
    #[arg(long, default_value_t = 1_000)]
    pub running: usize,
    /// Measurements of each kind; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Also time the real `veraltheim serve` from spawn to ready.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub binary: bool,
    /// The coordinator binary (default: `veraltheim` next to this executable).
    #[arg(long)]
    pub veraltheim_bin: Option<PathBuf>,
    /// Where fixtures and copies are written (default: the temporary directory).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// Medians over the rounds, in milliseconds.
#[derive(Clone, Debug, Serialize)]
pub struct RestartRow {
    pub fixture: String,
    pub jobs: usize,
    pub live: usize,
    pub file_mib: f64,
    pub open_ms: f64,
    pub recover_ms: f64,
    /// `Runner::start`: recover, then the live jobs into the scheduler.
    pub runner_start_ms: f64,
    /// open + `Runner::start`: the slow path's share of a restart.
    pub restart_ms: f64,
    /// The real binary, spawn to ready.
    pub binary_ready_ms: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RestartReport {
    pub rounds: usize,
    pub rows: Vec<RestartRow>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn record(i: usize, base_ms: u64, state: JobState) -> JobRecord {
    let created = base_ms + i as u64 / 10;
    let id = format!("{:016}{:04}", base_ms + i as u64 / 10_000, i % 10_000);
    let mut history = vec![HistoryEntry {
        state: JobState::Queued,
        time_ms: created,
        reason: "submitted".into(),
    }];
    let path: &[(JobState, &str)] = match state {
        JobState::Running => &[
            (JobState::Admitted, "admitted"),
            (JobState::Running, "running"),
        ],
        JobState::Succeeded => &[
            (JobState::Admitted, "admitted"),
            (JobState::Running, "running"),
            (JobState::Succeeded, "exited with code 0"),
        ],
        _ => &[],
    };
    for (s, reason) in path {
        history.push(HistoryEntry {
            state: *s,
            time_ms: created + 1,
            reason: (*reason).into(),
        });
    }
    let reason = history.last().map(|h| h.reason.clone()).unwrap_or_default();
    let ran = state != JobState::Queued;
    JobRecord {
        id,
        spec: bench_spec(i as u64),
        state,
        reason,
        attempt: u32::from(ran),
        created_ms: created,
        started_ms: ran.then_some(created + 1),
        finished_ms: (state == JobState::Succeeded).then_some(created + 1),
        exit_code: (state == JobState::Succeeded).then_some(0),
        app_failures: 0,
        infra_failures: 0,
        retry_at_ms: None,
        history,
        traceparent: None,
        placement: None,
        cancel_requested: false,
        pauses: Default::default(),
    }
}

/// Writes a fixture store at `path`: `jobs` jobs, of which `state_of(i)` says each one's state.
async fn write_fixture(
    path: &Path,
    jobs: usize,
    state_of: impl Fn(usize) -> JobState,
) -> anyhow::Result<usize> {
    let store = RedbStore::open(path, StoreOptions::default())?;
    let base = now_ms().saturating_sub(86_400_000);
    let mut live = 0;
    let mut batch = Batch::new();
    for i in 0..jobs {
        let rec = record(i, base, state_of(i));
        batch.put(&JOBS, rec.id.as_str(), &rec)?;
        if !rec.state.is_terminal() {
            batch.put(&ACTIVE, rec.id.as_str(), &())?;
            live += 1;
        }
        if batch.len() >= 2_000 {
            store.commit(std::mem::take(&mut batch)).await?;
        }
    }
    if !batch.is_empty() {
        store.commit(batch).await?;
    }
    store.close()?;
    Ok(live)
}

fn runner_config() -> RunnerConfig {
    RunnerConfig {
        scheduler: SchedulerConfig {
            capacity: Resources {
                cpu_millis: 2_000,
                memory_bytes: 8 << 30,
                gpus: 0,
                gpu_memory_bytes: 0,
            },
            queues: vec![QueueConfig {
                name: "default".into(),
                weight: 1,
                quota: Quota::default(),
            }],
            priority_classes: vec!["high".into(), "normal".into(), "low".into()],
        },
        retry: RetryPolicy::default(),
        max_running: 2,
        jitter_seed: 1,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One measurement on a fresh copy of `fixture`: (open, recover, live) or, with `runner`,
/// (open, Runner::start, live).
async fn measure(
    fixture: &Path,
    scratch: &Path,
    runner: bool,
) -> anyhow::Result<(Duration, Duration, usize)> {
    let copy = scratch.join("copy.redb");
    let _ = std::fs::remove_file(&copy);
    if fixture.exists() {
        std::fs::copy(fixture, &copy).with_context(|| format!("copy {}", fixture.display()))?;
    }
    let t = Instant::now();
    let store = RedbStore::open(&copy, StoreOptions::default())?;
    let open = t.elapsed();
    let jobs = JobStore::new(store);
    let (took, live) = if runner {
        let logs = scratch.join("logs");
        let runner = Runner::new(jobs, LocalExecutor::new(logs), runner_config())?;
        let t = Instant::now();
        runner.start().await?;
        (t.elapsed(), 0)
    } else {
        let t = Instant::now();
        let live = jobs.recover().await?;
        (t.elapsed(), live.len())
    };
    Ok((open, took, live))
}

async fn binary_ready(binary: &Path, fixture: &Path, scratch: &Path) -> anyhow::Result<Duration> {
    let data = scratch.join("data");
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data)?;
    if fixture.exists() {
        std::fs::copy(fixture, data.join("state.redb"))?;
    }
    let t = Instant::now();
    let c = Coordinator::start_with(
        binary,
        &["identity".to_string()],
        0,
        Some(&data),
        &["--max-running-jobs".into(), "1".into()],
    )
    .await?;
    let took = t.elapsed();
    c.stop().await?;
    Ok(took)
}

pub async fn restart(args: &RestartArgs) -> anyhow::Result<RestartReport> {
    if args.rounds == 0 || args.rounds > super::args::MAX_ROUNDS {
        bail!("--rounds must be 1 to {}", super::args::MAX_ROUNDS);
    }
    if args.jobs > 10_000_000 || args.running > args.jobs {
        bail!("--jobs must be at most 10,000,000 and --running at most --jobs");
    }
    let base = args.data_dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base)?;
    let dir = tempfile::Builder::new()
        .prefix("veraltheim-restart-")
        .tempdir_in(&base)?;
    let binary = if args.binary {
        Some(match &args.veraltheim_bin {
            Some(b) => b.clone(),
            None => default_binary()?,
        })
    } else {
        None
    };
    let running = args.running;
    let fixtures = [
        ("empty (baseline)", dir.path().join("empty.redb"), 0usize),
        ("queued", dir.path().join("queued.redb"), args.jobs),
        ("finished", dir.path().join("finished.redb"), args.jobs),
    ];
    let mut rows = Vec::new();
    for (name, path, jobs) in &fixtures {
        let live = match *name {
            "queued" => write_fixture(path, *jobs, |_| JobState::Queued).await?,
            "finished" => {
                // The interrupted ones spread through the history.
                let every = (jobs / running.max(1)).max(1);
                write_fixture(path, *jobs, |i| {
                    if running > 0 && i % every == 0 && i / every < running {
                        JobState::Running
                    } else {
                        JobState::Succeeded
                    }
                })
                .await?
            }
            _ => 0,
        };
        let file_mib = std::fs::metadata(path).map_or(0.0, |m| m.len() as f64 / (1 << 20) as f64);
        let scratch = dir.path().join("scratch");
        std::fs::create_dir_all(&scratch)?;
        let (mut open, mut recover, mut start, mut total, mut ready) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.rounds {
            let (o, r, n) = measure(path, &scratch, false).await?;
            if n != live {
                bail!("{name}: recover found {n} live jobs, the fixture has {live}");
            }
            open.push(ms(o));
            recover.push(ms(r));
            let (o, s, _) = measure(path, &scratch, true).await?;
            start.push(ms(s));
            total.push(ms(o + s));
            if let Some(b) = &binary {
                ready.push(ms(binary_ready(b, path, &scratch).await?));
            }
        }
        rows.push(RestartRow {
            fixture: (*name).to_string(),
            jobs: *jobs,
            live,
            file_mib,
            open_ms: median(&open),
            recover_ms: median(&recover),
            runner_start_ms: median(&start),
            restart_ms: median(&total),
            binary_ready_ms: (!ready.is_empty()).then(|| median(&ready)),
        });
    }
    Ok(RestartReport {
        rounds: args.rounds,
        rows,
    })
}

impl RestartReport {
    pub fn text(&self) -> String {
        let mut out = format!(
            "slow-path restart, medians of {} rounds (ms)\n{:<17} {:>8} {:>8} {:>8} {:>8} {:>9} {:>13} {:>10} {:>13}\n",
            self.rounds,
            "fixture",
            "jobs",
            "live",
            "MiB",
            "open",
            "recover",
            "Runner::start",
            "restart",
            "binary ready"
        );
        for r in &self.rows {
            out.push_str(&format!(
                "{:<17} {:>8} {:>8} {:>8.1} {:>8.1} {:>9.1} {:>13.1} {:>10.1} {:>13}\n",
                r.fixture,
                r.jobs,
                r.live,
                r.file_mib,
                r.open_ms,
                r.recover_ms,
                r.runner_start_ms,
                r.restart_ms,
                r.binary_ready_ms
                    .map_or("-".to_string(), |b| format!("{b:.1}"))
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_small_fixture_recovers_what_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.redb");
        let live = write_fixture(&path, 50, |i| {
            if i % 10 == 0 {
                JobState::Running
            } else {
                JobState::Succeeded
            }
        })
        .await
        .unwrap();
        assert_eq!(live, 5);
        let scratch = dir.path().join("s");
        std::fs::create_dir_all(&scratch).unwrap();
        let (_, _, n) = measure(&path, &scratch, false).await.unwrap();
        assert_eq!(n, 5);
        let store = JobStore::new(
            RedbStore::open(scratch.join("copy.redb"), StoreOptions::default()).unwrap(),
        );
        let (all, _) = store
            .list(&veraltheim_slowpath::ListFilter {
                page_size: 1000,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(all.len(), 50);
        let queued = all.iter().filter(|r| r.state == JobState::Queued).count();
        assert_eq!(queued, 5, "the interrupted jobs were put back in line");
    }
}
