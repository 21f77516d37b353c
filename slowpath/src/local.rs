//! The local executor: runs a command job as a child process of the coordinator.
//!
//! Each attempt runs in its own process group (`process_group(0)`), with stdin closed and stdout
//! and stderr written to `<jobs_dir>/<job id>/attempt-<n>.stdout|.stderr`. A cancel or the
//! deadline kills the whole group — the command and everything it started — with
//! `kill -KILL -- -<pgid>` (the `kill` program, so this crate needs no `unsafe` or libc), then
//! reaps the command. When the command exits by itself, whatever it left running in its group is
//! killed too, so no stray process outlives its job.
//!
//! The local executor ignores a command job's `image`: it runs the command on this machine,
//! with the coordinator's environment plus the job's `env`, in the job's `working_dir` (the
//! coordinator's own when empty).
//!
//! Output goes through a pipe to a copier task per stream, which keeps at most `max_log_bytes`
//! of it in the file: the first half as it comes (so `logs --follow` shows it live), the last
//! half in memory, and at the attempt's end a line saying how many bytes were cut, then that
//! tail. A job writing without end therefore costs a bounded file and bounded memory.
//!
//! It does not adopt: after a restart of the coordinator, a job that was running runs again
//! (the old process group, no longer the coordinator's child, is not found again).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use crate::executor::{CommandRun, ExecError, Outcome};
use crate::executor::{Execution, Executor, LogChunk, LogSource, LogStream};
use crate::logcap::HeadTail;

/// How often a followed log file is read again.
const LOG_POLL: Duration = Duration::from_millis(200);

/// The most bytes one [`LogChunk`] of [`LocalExecutor`]'s logs holds: a reader never holds a
/// whole log in memory, and a gRPC message stays far below any client's limit.
pub const LOG_CHUNK_BYTES: usize = 64 * 1024;

/// The default of [`LocalExecutor::with_max_log_bytes`].
pub const DEFAULT_MAX_LOG_BYTES: u64 = 16 * 1024 * 1024;

/// How long the copiers may go on draining output once the attempt's process group is gone:
/// a process that left the group (setsid) may hold the pipe open forever.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Runs command jobs as local processes; see the module documentation.
#[derive(Clone, Debug)]
pub struct LocalExecutor {
    jobs_dir: PathBuf,
    /// Bytes kept of each of an attempt's two outputs.
    max_log_bytes: u64,
    /// The attempts running now, as (job id, attempt): a followed log ends with its attempt.
    live: Arc<Mutex<HashSet<(String, u32)>>>,
}

impl LocalExecutor {
    /// An executor writing logs under `jobs_dir` (created as needed).
    pub fn new(jobs_dir: impl Into<PathBuf>) -> Self {
        Self {
            jobs_dir: jobs_dir.into(),
            max_log_bytes: DEFAULT_MAX_LOG_BYTES,
            live: Arc::default(),
        }
    }

    /// Keeps at most `bytes` of each of an attempt's stdout and stderr (head and tail, see the
    /// module documentation); at least 2 bytes.
    pub fn with_max_log_bytes(mut self, bytes: u64) -> Self {
        self.max_log_bytes = bytes.max(2);
        self
    }

    pub fn jobs_dir(&self) -> &Path {
        &self.jobs_dir
    }

    /// Where an attempt's stdout and stderr go.
    pub fn log_paths(&self, job_id: &str, attempt: u32) -> (PathBuf, PathBuf) {
        let dir = self.jobs_dir.join(job_id);
        (
            dir.join(format!("attempt-{attempt}.stdout")),
            dir.join(format!("attempt-{attempt}.stderr")),
        )
    }

    /// Runs one attempt to its end: exit, cancel (through `cancel`) or deadline.
    pub async fn run(
        &self,
        run: &CommandRun,
        cancel: &CancellationToken,
    ) -> Result<Outcome, ExecError> {
        let started = self.spawn(run)?;
        started.wait_for(cancel).await
    }

    /// Starts the process group of an attempt.
    fn spawn(&self, run: &CommandRun) -> Result<LocalExecution, ExecError> {
        let (program, args) = run.command.split_first().ok_or(ExecError::EmptyCommand)?;
        let (out_path, err_path) = self.log_paths(&run.job_id, run.attempt);
        let dir = self.jobs_dir.join(&run.job_id);
        std::fs::create_dir_all(&dir).map_err(|source| ExecError::Logs {
            path: dir.clone(),
            source,
        })?;
        let create = |path: &PathBuf| {
            std::fs::File::create(path).map_err(|source| ExecError::Logs {
                path: path.clone(),
                source,
            })
        };
        let stdout = create(&out_path)?;
        let stderr = create(&err_path)?;

        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .envs(&run.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if !run.working_dir.is_empty() {
            cmd.current_dir(&run.working_dir);
        }
        let mut child = cmd.spawn().map_err(|source| ExecError::Spawn {
            program: program.clone(),
            source,
        })?;
        let stop = CancellationToken::new();
        let mut copiers = Vec::new();
        if let Some(pipe) = child.stdout.take() {
            let log = CappedLog::new(stdout, self.max_log_bytes);
            copiers.push(tokio::spawn(copy_capped(pipe, log, stop.clone())));
        }
        if let Some(pipe) = child.stderr.take() {
            let log = CappedLog::new(stderr, self.max_log_bytes);
            copiers.push(tokio::spawn(copy_capped(pipe, log, stop.clone())));
        }
        // The child is its own group's leader: its pid is the group id. A child not yet waited
        // for always has one.
        let pgid = child.id().ok_or_else(|| {
            ExecError::Wait(std::io::Error::other("the started command has no pid"))
        })?;
        tracing::debug!(job = %run.job_id, attempt = run.attempt, pgid, "started");
        let key = (run.job_id.clone(), run.attempt);
        self.live.lock().insert(key.clone());
        Ok(LocalExecution {
            child,
            pgid,
            // A deadline too far to represent is no deadline (never a panic in the runner).
            deadline: run.deadline.and_then(|d| Instant::now().checked_add(d)),
            copiers,
            stop_copiers: stop,
            live: LiveGuard {
                set: self.live.clone(),
                key,
            },
        })
    }
}

/// Takes an attempt out of the live set when its execution ends (or is dropped).
struct LiveGuard {
    set: Arc<Mutex<HashSet<(String, u32)>>>,
    key: (String, u32),
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.set.lock().remove(&self.key);
    }
}

/// A running process group.
struct LocalExecution {
    child: tokio::process::Child,
    pgid: u32,
    deadline: Option<Instant>,
    /// The tasks copying stdout and stderr into the log files.
    copiers: Vec<JoinHandle<()>>,
    stop_copiers: CancellationToken,
    live: LiveGuard,
}

impl LocalExecution {
    async fn wait_for(mut self, cancel: &CancellationToken) -> Result<Outcome, ExecError> {
        let pgid = self.pgid;
        let deadline = async {
            match self.deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let outcome = tokio::select! {
            status = self.child.wait() => {
                let status = status.map_err(ExecError::Wait)?;
                // Whatever the command left running in its group goes with it.
                kill_group(pgid).await;
                self.finish_logs().await;
                return Ok(outcome_of(status));
            }
            () = cancel.cancelled() => Outcome::Cancelled,
            () = deadline => Outcome::TimedOut,
        };
        // Kill the group while the leader is not yet reaped, so its pgid cannot be reused.
        kill_group(pgid).await;
        let _ = self.child.start_kill();
        self.child.wait().await.map_err(ExecError::Wait)?;
        self.finish_logs().await;
        tracing::debug!(job = %self.live.key.0, attempt = self.live.key.1, ?outcome, "killed");
        Ok(outcome)
    }

    /// Waits for the copiers to write the logs' ends (before the attempt leaves the live set,
    /// so a follower's last read sees them); after [`DRAIN_GRACE`] they are told to stop.
    async fn finish_logs(&mut self) {
        let mut copiers = std::mem::take(&mut self.copiers);
        let all = futures::future::join_all(copiers.iter_mut());
        if tokio::time::timeout(DRAIN_GRACE, all).await.is_err() {
            self.stop_copiers.cancel();
            futures::future::join_all(copiers).await;
        }
    }
}

/// One output of an attempt, kept to a size ([`HeadTail`]): the head is written through, the
/// tail is written with a note of what was cut by [`CappedLog::finish`].
struct CappedLog {
    file: std::fs::File,
    cap: HeadTail,
}

impl CappedLog {
    fn new(file: std::fs::File, max: u64) -> Self {
        CappedLog {
            file,
            cap: HeadTail::new(max),
        }
    }

    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        use std::io::Write as _;
        let head = self.cap.push(data);
        self.file.write_all(head)
    }

    fn finish(mut self) -> std::io::Result<()> {
        use std::io::Write as _;
        self.file.write_all(&self.cap.finish())?;
        self.file.flush()
    }
}

/// Copies `pipe` into `log` until the end of the output or `stop`, then writes the log's end.
/// A write error (disk full) ends the copy; the pipe is still drained so the job does not block
/// on a full pipe.
async fn copy_capped(
    mut pipe: impl AsyncRead + Unpin,
    mut log: CappedLog,
    stop: CancellationToken,
) {
    let mut buf = vec![0u8; LOG_CHUNK_BYTES];
    let mut failed = false;
    loop {
        let n = tokio::select! {
            n = pipe.read(&mut buf) => n,
            () = stop.cancelled() => break,
        };
        match n {
            Ok(0) | Err(_) => break,
            Ok(n) if !failed => {
                if let Err(e) = log.write(&buf[..n]) {
                    tracing::warn!(error = %e, "a job's log cannot be written; its output is dropped");
                    failed = true;
                }
            }
            Ok(_) => {}
        }
    }
    if !failed && let Err(e) = log.finish() {
        tracing::warn!(error = %e, "the end of a job's log cannot be written");
    }
}

impl Execution for LocalExecution {
    fn describe(&self) -> String {
        format!("process group {}", self.pgid)
    }

    fn wait(
        self: Box<Self>,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, Result<Outcome, ExecError>> {
        Box::pin(async move { self.wait_for(&cancel).await })
    }
}

impl Executor for LocalExecutor {
    fn name(&self) -> &'static str {
        "local"
    }

    fn log_dir(&self, job_id: &str) -> Option<PathBuf> {
        Some(self.jobs_dir.join(job_id))
    }

    fn start<'a>(
        &'a self,
        run: &'a CommandRun,
    ) -> BoxFuture<'a, Result<Box<dyn Execution>, ExecError>> {
        Box::pin(async move { Ok(Box::new(self.spawn(run)?) as Box<dyn Execution>) })
    }

    /// Reads the attempt's two files; with `follow`, again every 200 ms until the attempt is no
    /// longer running in this executor, then once more for what was written just before its end.
    fn logs(&self, job_id: &str, attempt: u32, follow: bool) -> LogStream {
        let (stdout, stderr) = self.log_paths(job_id, attempt);
        let live = self.live.clone();
        let key = (job_id.to_owned(), attempt);
        let files = [
            (stdout, 0u64, LogSource::Stdout),
            (stderr, 0u64, LogSource::Stderr),
        ];
        Box::pin(futures::stream::unfold(
            (files, false),
            move |(mut files, mut last_pass)| {
                let live = live.clone();
                let key = key.clone();
                async move {
                    loop {
                        for (path, offset, source) in files.iter_mut() {
                            let chunk = read_chunk(path, *offset).await;
                            if !chunk.is_empty() {
                                *offset += chunk.len() as u64;
                                let chunk = LogChunk {
                                    source: *source,
                                    data: chunk,
                                };
                                return Some((Ok(chunk), (files, last_pass)));
                            }
                        }
                        if last_pass {
                            return None;
                        }
                        if !follow || !live.lock().contains(&key) {
                            last_pass = true;
                            continue;
                        }
                        tokio::time::sleep(LOG_POLL).await;
                    }
                }
            },
        ))
    }
}

/// Up to [`LOG_CHUNK_BYTES`] of the file at `path` from `offset`; empty when there is nothing
/// more (or no file yet).
async fn read_chunk(path: &Path, offset: u64) -> Vec<u8> {
    let read = async {
        let mut file = tokio::fs::File::open(path).await?;
        file.seek(std::io::SeekFrom::Start(offset)).await?;
        let mut data = Vec::new();
        file.take(LOG_CHUNK_BYTES as u64)
            .read_to_end(&mut data)
            .await?;
        Ok::<_, std::io::Error>(data)
    };
    read.await.unwrap_or_default()
}

fn outcome_of(status: ExitStatus) -> Outcome {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => Outcome::Exited(code),
        (None, Some(sig)) => Outcome::Signalled(sig),
        (None, None) => Outcome::Exited(-1),
    }
}

/// SIGKILL to every process of group `pgid`. A group already empty is not an error.
async fn kill_group(pgid: u32) {
    let result = tokio::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    if let Err(e) = result {
        tracing::warn!(pgid, error = %e, "cannot run kill for a process group");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt as _;

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    fn run(id: &str, command: Vec<String>) -> CommandRun {
        CommandRun {
            job_id: id.into(),
            attempt: 1,
            command,
            ..Default::default()
        }
    }

    /// Bounds a test that would otherwise hang if a kill did not work.
    async fn within<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(20), f)
            .await
            .expect("the executor did not finish in 20 s")
    }

    /// Whether `pid` is gone (or a zombie, which no longer runs).
    fn is_dead(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        }
    }

    async fn wait_dead(pid: u32) -> bool {
        for _ in 0..100 {
            if is_dead(pid) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    #[tokio::test]
    async fn success_captures_logs_env_and_working_dir() {
        let dir = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        let exec = LocalExecutor::new(dir.path());
        let mut r = run("job1", sh("echo out $GREETING; pwd; echo err >&2"));
        r.env.insert("GREETING".into(), "hello".into());
        r.working_dir = work.path().to_string_lossy().into_owned();
        let outcome = within(exec.run(&r, &CancellationToken::new()))
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Exited(0));
        let (out, err) = exec.log_paths("job1", 1);
        let out = std::fs::read_to_string(out).unwrap();
        let canonical = work.path().canonicalize().unwrap();
        assert_eq!(out, format!("out hello\n{}\n", canonical.display()));
        assert_eq!(std::fs::read_to_string(err).unwrap(), "err\n");
    }

    #[tokio::test]
    async fn a_log_keeps_its_head_and_tail_and_says_what_was_cut() {
        let dir = tempfile::tempdir().unwrap();
        let exec = LocalExecutor::new(dir.path()).with_max_log_bytes(64 * 1024);
        // 2 MB of numbered lines on stdout, a short line on stderr.
        let r = run(
            "big",
            sh("seq 1 300000 | sed 's/^/line /'; echo done; echo small >&2"),
        );
        let outcome = within(exec.run(&r, &CancellationToken::new()))
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Exited(0));
        let (out, err) = exec.log_paths("big", 1);
        let out = std::fs::read_to_string(out).unwrap();
        assert!(out.len() < 64 * 1024 + 200, "{}", out.len());
        assert!(out.starts_with("line 1\nline 2\n"), "{}", &out[..40]);
        assert!(out.ends_with("line 300000\ndone\n"));
        assert!(
            out.contains("bytes of this output were cut here (jobs.max_log_bytes)]"),
            "no note of the cut"
        );
        assert_eq!(std::fs::read_to_string(err).unwrap(), "small\n");

        // Read back in bounded chunks that add up to the file.
        let chunks: Vec<_> = exec.logs("big", 1, false).collect().await;
        let mut stdout = Vec::new();
        for c in chunks {
            let c = c.unwrap();
            assert!(c.data.len() <= LOG_CHUNK_BYTES);
            if c.source == LogSource::Stdout {
                stdout.extend(c.data);
            }
        }
        assert_eq!(String::from_utf8(stdout).unwrap(), out);
    }

    #[tokio::test]
    async fn a_non_zero_exit_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let exec = LocalExecutor::new(dir.path());
        let outcome = within(exec.run(&run("j", sh("exit 3")), &CancellationToken::new()))
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Exited(3));
        let outcome = within(exec.run(&run("j", sh("kill -TERM $$")), &CancellationToken::new()))
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Signalled(15));
    }

    #[tokio::test]
    async fn a_missing_program_or_empty_command_is_an_executor_error() {
        let dir = tempfile::tempdir().unwrap();
        let exec = LocalExecutor::new(dir.path());
        let err = exec
            .run(
                &run("j", vec!["/no/such/program".into()]),
                &CancellationToken::new(),
            )
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot start '/no/such/program'"),
            "{err}"
        );
        let err = exec
            .run(&run("j", vec![]), &CancellationToken::new())
            .await
            .unwrap_err();
        assert!(matches!(err, ExecError::EmptyCommand));
    }

    #[tokio::test]
    async fn cancel_kills_the_child_and_its_grandchild() {
        let dir = tempfile::tempdir().unwrap();
        let exec = LocalExecutor::new(dir.path());
        let pidfile = dir.path().join("grandchild.pid");
        let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let cancel = CancellationToken::new();
        let r = run("j", sh(&script));
        let task = {
            let exec = exec.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move { exec.run(&r, &cancel).await })
        };
        let mut pid = None;
        for _ in 0..200 {
            if let Some(p) = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
            {
                pid = Some(p);
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let pid = pid.expect("the script wrote its grandchild's pid");
        assert!(!is_dead(pid), "the grandchild runs before the cancel");
        cancel.cancel();
        let outcome = within(task).await.unwrap().unwrap();
        assert_eq!(outcome, Outcome::Cancelled);
        assert!(wait_dead(pid).await, "grandchild {pid} survived the cancel");
    }

    #[tokio::test]
    async fn the_deadline_kills_the_group_as_timed_out() {
        let dir = tempfile::tempdir().unwrap();
        let exec = LocalExecutor::new(dir.path());
        let mut r = run("j", sh("echo started; sleep 30"));
        r.deadline = Some(Duration::from_secs(2));
        let outcome = within(exec.run(&r, &CancellationToken::new()))
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::TimedOut);
        let out = std::fs::read_to_string(exec.log_paths("j", 1).0).unwrap();
        assert_eq!(out, "started\n");
    }

    #[tokio::test]
    async fn processes_left_behind_by_a_finished_command_are_killed() {
        let dir = tempfile::tempdir().unwrap();
        let exec = LocalExecutor::new(dir.path());
        let pidfile = dir.path().join("orphan.pid");
        let script = format!("sleep 30 & echo $! > {}; exit 0", pidfile.display());
        let outcome = within(exec.run(&run("j", sh(&script)), &CancellationToken::new()))
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Exited(0));
        let pid: u32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(wait_dead(pid).await, "orphan {pid} outlived its job");
    }
}
