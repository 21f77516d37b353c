//! The local executor: runs a command job as a child process of the coordinator.
//!
//! Each attempt runs in its own process group (`process_group(0)`), with stdin closed and stdout
//! and stderr written to `<jobs_dir>/<job id>/attempt-<n>.stdout|.stderr` (mode 0600: the
//! server's, not the jobs'). A cancel or the deadline kills the whole group — the command and
//! everything it started — with `kill -KILL -- -<pgid>` (the `kill` program), then reaps the
//! command. When the command exits by itself, whatever it left running in its group is killed
//! too, so no stray process outlives its job.
//!
//! What the command may touch is the executor's [`Sandbox`] (`[jobs.local]`, see
//! docs/SECURITY.md, "Jobs and the host"): it runs as the configured unprivileged user and group
//! (`run_as`), with a clean environment — `PATH` (the sandbox's), `HOME` (its folder) and the
//! job's own `env`, nothing of the server's — under the configured rlimits, with
//! `no_new_privs`, optionally in a cgroup of its own, and only if its program is on the
//! allow-list (when there is one). Its folder is `<jobs_dir>/<job id>/work` (mode 0700, owned by
//! the job's user, kept across attempts, deleted with the job); it starts there, or in its
//! `working_dir`: relative to that folder (made as needed), or absolute (entered as the job's
//! user, so it must be one that user may enter).
//!
//! The local executor ignores a command job's `image` and `writable_root`.
//!
//! Output goes through a pipe to a copier task per stream, which keeps at most `max_log_bytes`
//! of it in the file: the first half as it comes (so `logs --follow` shows it live), the last
//! half in memory, and at the attempt's end a line saying how many bytes were cut, then that
//! tail. A job writing without end therefore costs a bounded file and bounded memory.
//!
//! With a [`Shim`] ([`LocalExecutor::with_shim`]; the coordinator always gives its own binary)
//! the executor's child is the job shim (the `shim` module): it starts the command as its own
//! child, leading the job's process group (the shim says which), ends as the command ends, and
//! kills the group when the coordinator dies (kill -9, the OOM killer) — a job never outlives
//! the node that ran it, so its next attempt, here after a restart or on another node, never
//! runs beside an orphan. The group kills above are the same, by the id the shim gave; a cancel
//! then waits for the shim to reap the command and end. Without a shim (the crate's own tests,
//! which have no such binary) the command is the child, and outlives a killed coordinator.
//! An execution dropped before its end (its runner task gone) kills its group too.
//!
//! It does not adopt: after a restart of the coordinator, a job that was running runs again
//! (its old process group died with the coordinator, or, without the shim, is not found again).
//!
//! **Sharing the cores with the fast path.** Every attempt runs at the executor's nice value
//! ([`LocalExecutor::with_nice`]; the coordinator's `jobs.local.nice`, 10 by default), set
//! between fork and exec (`setpriority`) and inherited by the shim and everything the command
//! starts, so the coordinator's execution pool (nice 0) goes first when both want a core; with
//! [`LocalExecutor::with_idle_class`] (the coordinator's `jobs.local.idle_class`, on by default)
//! they also run in Linux's idle scheduling class (`SCHED_IDLE`), so that they get only the time
//! no server thread wants, not the tenth of a contended core that nice 10 still leaves them. No
//! cgroup `cpu.weight` is written: the attempts' cgroups (`jobs.local.cgroup_dir`) are siblings of
//! one another, not of the server's, so their weight would only rank jobs among themselves; an
//! operator who delegates the folder can lower its own `cpu.weight` against the server's.
//! An attempt waited for with [`Execution::wait_pausable`] is paused by SIGSTOP to its process
//! group and resumed by SIGCONT (the shim, outside the group, keeps watching its lifeline); its
//! deadline moves later by the time paused. A cancel or deadline kills a paused group as any
//! other (SIGKILL ends stopped processes) and sends SIGCONT after it; the group killed when the
//! command ends, when the execution is dropped, or by the shim when the coordinator dies, is
//! killed the same way: no stopped process outlives its job.

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
use crate::job::{JobKind, JobSpec};
use crate::logcap::HeadTail;
pub use crate::sandbox::{Cgroups, Limits, RunAs, Sandbox};
pub use crate::shim::Shim;

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

/// How long a cancel or a deadline waits for the shim to end by itself once the job's group is
/// killed (it does at once, unless stopped) before it kills the shim too.
const SHIM_GRACE: Duration = Duration::from_secs(5);

/// Runs command jobs as local processes; see the module documentation.
#[derive(Clone, Debug)]
pub struct LocalExecutor {
    jobs_dir: PathBuf,
    /// Bytes kept of each of an attempt's two outputs.
    max_log_bytes: u64,
    /// The attempts running now, as (job id, attempt): a followed log ends with its attempt.
    live: Arc<Mutex<HashSet<(String, u32)>>>,
    /// Who the jobs run as, with what; see the module documentation.
    sandbox: Arc<Sandbox>,
    /// What leads each attempt's process group and runs the command; `None`: the command.
    shim: Option<Shim>,
    /// The nice value every attempt runs at ([`LocalExecutor::with_nice`]).
    nice: i32,
    /// Whether attempts run in the kernel's idle class ([`LocalExecutor::with_idle_class`]).
    idle_class: bool,
}

impl LocalExecutor {
    /// An executor writing logs under `jobs_dir` (created as needed).
    pub fn new(jobs_dir: impl Into<PathBuf>) -> Self {
        Self {
            jobs_dir: jobs_dir.into(),
            max_log_bytes: DEFAULT_MAX_LOG_BYTES,
            live: Arc::default(),
            sandbox: Arc::default(),
            shim: None,
            nice: 0,
            idle_class: false,
        }
    }

    /// Runs every attempt at nice value `nice` (0 to 19; outside, clamped to it): a lower CPU
    /// weight than the coordinator's own threads. 0, the default: the server's own.
    pub fn with_nice(mut self, nice: i32) -> Self {
        self.nice = nice.clamp(0, 19);
        self
    }

    /// The nice value attempts run at.
    pub fn nice(&self) -> i32 {
        self.nice
    }

    /// With `true`, every attempt runs in Linux's idle scheduling class (`SCHED_IDLE`): it gets
    /// a core only when no thread of the normal class wants it, and a thread of the server that
    /// wakes takes the core from it at once. At nice 10 alone a spinning job still takes about a
    /// tenth of a core that an execution-pool thread wants (CFS weights 110 against 1024).
    pub fn with_idle_class(mut self, idle: bool) -> Self {
        self.idle_class = idle;
        self
    }

    /// Starts every attempt through `shim`, so that its process group dies with this process
    /// (see the module documentation). `shim` must be a binary that runs the `shim` module's
    /// `main` when started with its `ARG`: the coordinator's own.
    pub fn with_shim(mut self, shim: Shim) -> Self {
        self.shim = Some(shim);
        self
    }

    /// Runs the jobs in `sandbox` (by default: as the server's user, with a clean environment
    /// and the default PATH, no limits, any program).
    pub fn with_sandbox(mut self, sandbox: Sandbox) -> Self {
        self.sandbox = Arc::new(sandbox);
        self
    }

    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
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

    /// The folder a job runs in (its `HOME`), kept across its attempts.
    pub fn work_dir(&self, job_id: &str) -> PathBuf {
        self.jobs_dir.join(job_id).join("work")
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
        let started = self.spawn(run).await?;
        started.wait_for(cancel, None).await
    }

    /// Makes the job's folders: `<jobs_dir>` and `<jobs_dir>/<id>` searchable but not listable
    /// by others (0711, so the job's user reaches its own folder and no other job's logs), and
    /// `<jobs_dir>/<id>/work`, 0700 and owned by the job's user.
    fn make_dirs(&self, job_id: &str) -> Result<(PathBuf, PathBuf), ExecError> {
        use std::os::unix::fs::PermissionsExt as _;
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| ExecError::Logs { path, source }
        };
        let jobs_dir = std::path::absolute(&self.jobs_dir).map_err(io(&self.jobs_dir))?;
        let dir = jobs_dir.join(job_id);
        let work = dir.join("work");
        std::fs::create_dir_all(&work).map_err(io(&work))?;
        for (path, mode) in [(&jobs_dir, 0o711), (&dir, 0o711), (&work, 0o700)] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(io(path))?;
        }
        if let Some(r) = &self.sandbox.run_as {
            // `<id>` is the server's and not writable by the job, so `work` is the folder made
            // above, not something the job put in its place.
            std::os::unix::fs::lchown(&work, Some(r.uid), Some(r.gid)).map_err(io(&work))?;
        }
        Ok((dir, work))
    }

    /// Starts the process group of an attempt; with a shim, returns once the shim has started
    /// the command.
    async fn spawn(&self, run: &CommandRun) -> Result<LocalExecution, ExecError> {
        let (name, args) = run.command.split_first().ok_or(ExecError::EmptyCommand)?;
        // Checked again: the allow-list (or the files on PATH) may have changed since submit.
        let program = self
            .sandbox
            .program(&run.command)
            .map_err(ExecError::Rejected)?;
        let (out_path, err_path) = self.log_paths(&run.job_id, run.attempt);
        let (_, work) = self.make_dirs(&run.job_id)?;
        let create = |path: &PathBuf| {
            use std::os::unix::fs::OpenOptionsExt as _;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(path)
                .map_err(|source| ExecError::Logs {
                    path: path.clone(),
                    source,
                })
        };
        let stdout = create(&out_path)?;
        let stderr = create(&err_path)?;
        let cgroup = match &self.sandbox.cgroups {
            Some(c) => Some(
                c.create(
                    &format!("{}-{}", run.job_id, run.attempt),
                    run.resources.memory_bytes,
                    run.resources.cpu_millis,
                )
                .map_err(|e| ExecError::Backend(format!("cannot make the job's cgroup: {e}")))?,
            ),
            None => None,
        };
        let entry = self
            .sandbox
            .entry(&work, &run.working_dir, cgroup.as_deref())
            .map_err(ExecError::Rejected)?;

        let (mut cmd, report) = match &self.shim {
            None => {
                let mut cmd = tokio::process::Command::new(&program);
                cmd.arg0(name).args(args);
                (cmd, None)
            }
            Some(shim) => {
                let (cmd, report) =
                    shim.command(&program, name, args)
                        .map_err(|source| ExecError::Spawn {
                            program: name.clone(),
                            source,
                        })?;
                (cmd, Some(report))
            }
        };
        let report_fd = report.as_ref().map(|r| r.child_fd());
        let (nice, idle_class) = (self.nice, self.idle_class);
        cmd.env_clear()
            .env("PATH", &self.sandbox.path)
            .env("HOME", &work)
            .envs(&run.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            // The shim, dropped, is left to end by itself: it kills the job's group first
            // (the lifeline, cut by the drop, tells it to) and reaps the command.
            .kill_on_drop(report.is_none());
        // SAFETY: `setpriority`, `sched_setscheduler`, `Entry::enter` and `keep_across_exec`
        // make only async-signal-safe system calls on memory prepared here, as a closure run
        // between fork and exec must.
        unsafe {
            cmd.pre_exec(move || {
                // Before `enter` may drop the server's user: lowering one's own priority is
                // allowed to anyone, but the order keeps it certain.
                if nice != 0 && libc::setpriority(libc::PRIO_PROCESS, 0, nice) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let param = libc::sched_param { sched_priority: 0 };
                if idle_class && libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                entry.enter()?;
                if let Some(fd) = report_fd {
                    crate::shim::keep_across_exec(fd)?;
                }
                Ok(())
            });
        }
        let spawned = cmd.spawn().map_err(|source| ExecError::Spawn {
            program: name.clone(),
            source,
        });
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                if let Some(cg) = &cgroup {
                    Cgroups::remove(cg);
                }
                return Err(e);
            }
        };
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
        let (pgid, lifeline) = match report {
            // The child is its own group's leader: its pid is the group id. A child not yet
            // waited for always has one.
            None => {
                let pgid = child.id().ok_or_else(|| {
                    ExecError::Wait(std::io::Error::other("the started command has no pid"))
                })?;
                (pgid, None)
            }
            // The shim's child leads the job's group; the shim says which. Dropped while
            // waiting for it, the shim sees its lifeline cut and kills what it started.
            Some(report) => match report.read().await {
                Ok(started) => (started.pgid, Some(started.lifeline)),
                Err(source) => {
                    let _ = child.start_kill();
                    let status = child.wait().await.ok();
                    finish_copiers(&mut copiers, &stop).await;
                    if let Some(cg) = &cgroup {
                        Cgroups::remove(cg);
                    }
                    return Err(ExecError::Spawn {
                        program: name.clone(),
                        source: self.shim_error(source, status),
                    });
                }
            },
        };
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
            cgroup,
            live: LiveGuard {
                set: self.live.clone(),
                key,
            },
            lifeline,
            ended: false,
        })
    }

    /// Why the shim did not start the command: what it reported or, when it ended without a
    /// report, how it ended and what may have stopped it.
    fn shim_error(&self, report: std::io::Error, status: Option<ExitStatus>) -> std::io::Error {
        match (report.kind(), status) {
            (crate::shim::SILENT, Some(status)) => {
                let limit = match self.sandbox.limits.address_space_bytes {
                    Some(bytes) => {
                        format!("; does it fit jobs.local.max_address_space_bytes ({bytes})?")
                    }
                    None => String::new(),
                };
                std::io::Error::new(report.kind(), format!("{report} ({status}{limit})"))
            }
            _ => report,
        }
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
    /// The attempt's cgroup (`jobs.local.cgroup_dir`), removed at its end.
    cgroup: Option<PathBuf>,
    live: LiveGuard,
    /// With a shim: the executor's end of its report pipe, whose closing (with this execution)
    /// tells the shim to kill the job's group.
    lifeline: Option<std::os::fd::OwnedFd>,
    /// Whether the group was dealt with (waited for, killed); if not, dropping the execution
    /// kills it.
    ended: bool,
}

impl Drop for LocalExecution {
    fn drop(&mut self) {
        if !self.ended {
            // The runner's task went away mid-attempt: nothing will wait for this group. Its
            // leader is not reaped yet by us (its `Child` is dropped after this) nor, with a
            // shim, by the shim (which waits for the lifeline, dropped after this too), unless
            // it ended just now.
            kill_group_now(self.pgid);
        }
    }
}

/// What woke [`LocalExecution::wait_for`].
enum Waited {
    Ended(std::io::Result<ExitStatus>),
    Stop(Outcome),
    /// The pause was asked or lifted (`still`: its sender is still there).
    PauseChanged {
        still: bool,
    },
}

impl LocalExecution {
    /// Waits for the attempt's end (see [`Execution::wait_pausable`]); with `paused`, stops
    /// its group while it holds `true`. The signals are sent from here only, before the group's
    /// leader is reaped, so they never reach a group that took its id since.
    async fn wait_for(
        mut self,
        cancel: &CancellationToken,
        mut paused: Option<tokio::sync::watch::Receiver<bool>>,
    ) -> Result<Outcome, ExecError> {
        let pgid = self.pgid;
        let mut deadline = self.deadline;
        // When the group was stopped, while it is.
        let mut stopped: Option<Instant> = None;
        let outcome = loop {
            let want = paused.as_ref().is_some_and(|p| *p.borrow());
            match (want, stopped) {
                (true, None) => {
                    signal_group(pgid, libc::SIGSTOP);
                    stopped = Some(Instant::now());
                    tracing::debug!(job = %self.live.key.0, pgid, "paused");
                }
                (false, Some(at)) => {
                    signal_group(pgid, libc::SIGCONT);
                    stopped = None;
                    // The deadline counts running time: it moves by the pause.
                    deadline = deadline.and_then(|d| d.checked_add(at.elapsed()));
                    tracing::debug!(job = %self.live.key.0, pgid, "resumed");
                }
                _ => {}
            }
            let running_deadline = deadline.filter(|_| stopped.is_none());
            let deadline_passed = async {
                match running_deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let pause_changed = async {
                match paused.as_mut() {
                    Some(p) => p.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let event = tokio::select! {
                status = self.child.wait() => Waited::Ended(status),
                () = cancel.cancelled() => Waited::Stop(Outcome::Cancelled),
                () = deadline_passed => Waited::Stop(Outcome::TimedOut),
                still = pause_changed => Waited::PauseChanged { still },
            };
            match event {
                Waited::Ended(status) => {
                    // Reaped: from here its pgid is no longer certainly the group's (`Drop`).
                    self.ended = true;
                    let status = status.map_err(ExecError::Wait)?;
                    // Whatever the command left running in its group goes with it (stopped
                    // or not: SIGKILL ends a stopped process).
                    kill_group(pgid).await;
                    self.finish_logs().await;
                    self.remove_cgroup();
                    return Ok(outcome_of(status));
                }
                Waited::Stop(outcome) => break outcome,
                // Nobody may pause it any more: it runs to its end.
                Waited::PauseChanged { still: false } => paused = None,
                Waited::PauseChanged { still: true } => {}
            }
        };
        // Kill the group while the leader is not yet reaped, so its pgid cannot be reused (with
        // a shim, the leader is the shim's child, reaped by the shim once it ends).
        kill_group(pgid).await;
        if stopped.is_some() {
            // SIGKILL ends stopped processes too; continuing them as well leaves nothing
            // stopped whatever the kernel does with the kill.
            signal_group(pgid, libc::SIGCONT);
        }
        self.ended = true;
        if self.lifeline.is_some() {
            // The shim ends by itself once it has reaped the command: killed first, it would
            // leave the command's zombie to init, its pid still there after the cancel.
            if tokio::time::timeout(SHIM_GRACE, self.child.wait())
                .await
                .is_err()
            {
                let _ = self.child.start_kill();
            }
        } else {
            let _ = self.child.start_kill();
        }
        self.child.wait().await.map_err(ExecError::Wait)?;
        self.finish_logs().await;
        self.remove_cgroup();
        tracing::debug!(job = %self.live.key.0, attempt = self.live.key.1, ?outcome, "killed");
        Ok(outcome)
    }

    fn remove_cgroup(&mut self) {
        if let Some(cg) = self.cgroup.take() {
            Cgroups::remove(&cg);
        }
    }

    /// Waits for the copiers to write the logs' ends (before the attempt leaves the live set,
    /// so a follower's last read sees them); after [`DRAIN_GRACE`] they are told to stop.
    async fn finish_logs(&mut self) {
        finish_copiers(&mut self.copiers, &self.stop_copiers).await;
    }
}

/// Waits for `copiers` to write the logs' ends; after [`DRAIN_GRACE`] they are told to stop.
async fn finish_copiers(copiers: &mut Vec<JoinHandle<()>>, stop: &CancellationToken) {
    let mut copiers = std::mem::take(copiers);
    let all = futures::future::join_all(copiers.iter_mut());
    if tokio::time::timeout(DRAIN_GRACE, all).await.is_err() {
        stop.cancel();
        futures::future::join_all(copiers).await;
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
        Box::pin(async move { self.wait_for(&cancel, None).await })
    }

    fn can_pause(&self) -> bool {
        true
    }

    fn wait_pausable(
        self: Box<Self>,
        cancel: CancellationToken,
        paused: tokio::sync::watch::Receiver<bool>,
    ) -> BoxFuture<'static, Result<Outcome, ExecError>> {
        Box::pin(async move { self.wait_for(&cancel, Some(paused)).await })
    }
}

impl Executor for LocalExecutor {
    fn name(&self) -> &'static str {
        "local"
    }

    /// A command job's program must be on `jobs.local.allowed_commands` (when set).
    fn check(&self, spec: &JobSpec) -> Result<(), String> {
        match &spec.kind {
            JobKind::Command { command, env, .. } => self.sandbox.check(command, env),
            JobKind::Inference { .. } => Ok(()),
        }
    }

    fn log_dir(&self, job_id: &str) -> Option<PathBuf> {
        Some(self.jobs_dir.join(job_id))
    }

    fn start<'a>(
        &'a self,
        run: &'a CommandRun,
    ) -> BoxFuture<'a, Result<Box<dyn Execution>, ExecError>> {
        Box::pin(async move { Ok(Box::new(self.spawn(run).await?) as Box<dyn Execution>) })
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

/// `signal` (SIGSTOP, SIGCONT) to every process of group `pgid`. A group already empty is not an
/// error; another failure is logged.
fn signal_group(pgid: u32, signal: libc::c_int) {
    // Never 0 or 1: kill(0) is the server's own group, kill(-1) every process it may signal.
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    if pgid <= 1 {
        return;
    }
    // SAFETY: kill with integers touches no memory.
    if unsafe { libc::kill(-pgid, signal) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            tracing::warn!(pgid, signal, error = %e, "cannot signal a job's process group");
        }
    }
}

/// SIGKILL to every process of group `pgid`, at once (for `Drop`). A group already empty is
/// not an error.
fn kill_group_now(pgid: u32) {
    // Never 0 or 1: kill(0) is the server's own group, kill(-1) every process it may signal.
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    if pgid > 1 {
        // SAFETY: kill with integers touches no memory.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
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

    /// The executor's tests of `run_as` switch users, which only root may do: without root they
    /// fail, saying so, rather than pass without testing anything.
    fn nobody() -> RunAs {
        assert_eq!(
            crate::sandbox::effective_uid(),
            0,
            "this test runs jobs as nobody:nogroup, which needs the test to run as root"
        );
        RunAs::resolve("nobody:nogroup").unwrap()
    }

    /// A folder every user may enter, whatever the umask.
    fn open_tempdir() -> tempfile::TempDir {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    async fn output(exec: &LocalExecutor, r: &CommandRun) -> (Outcome, String, String) {
        let outcome = within(exec.run(r, &CancellationToken::new()))
            .await
            .unwrap();
        let (out, err) = exec.log_paths(&r.job_id, r.attempt);
        (
            outcome,
            std::fs::read_to_string(out).unwrap(),
            std::fs::read_to_string(err).unwrap(),
        )
    }

    #[tokio::test]
    async fn a_job_run_as_nobody_cannot_read_a_file_only_root_can_read() {
        use std::os::unix::fs::PermissionsExt as _;
        let files = open_tempdir();
        let secret = files.path().join("root-only");
        std::fs::write(&secret, "root's secret\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let public = files.path().join("public");
        std::fs::write(&public, "for everyone\n").unwrap();
        std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o644)).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let mut sandbox = Sandbox::default();
        sandbox.run_as = Some(nobody());
        let exec = LocalExecutor::new(dir.path()).with_sandbox(sandbox);
        let r = run("j", vec!["cat".into(), secret.to_string_lossy().into()]);
        let (outcome, out, err) = output(&exec, &r).await;
        assert_eq!(outcome, Outcome::Exited(1), "{out}{err}");
        assert_eq!(out, "");
        assert!(err.contains("Permission denied"), "{err}");

        // The same job reads what nobody may read: the refusal was the file's mode.
        let r = run("k", vec!["cat".into(), public.to_string_lossy().into()]);
        let (outcome, out, _) = output(&exec, &r).await;
        assert_eq!(
            (outcome, out.as_str()),
            (Outcome::Exited(0), "for everyone\n")
        );

        // Without run_as the server's user (root here) runs it, and reads the file.
        let exec = LocalExecutor::new(dir.path());
        let r = run("l", vec!["cat".into(), secret.to_string_lossy().into()]);
        let (outcome, out, _) = output(&exec, &r).await;
        assert_eq!(
            (outcome, out.as_str()),
            (Outcome::Exited(0), "root's secret\n")
        );
    }

    #[tokio::test]
    async fn a_job_runs_as_its_user_without_privileges_in_its_own_folder() {
        let dir = tempfile::tempdir().unwrap();
        let user = nobody();
        let mut sandbox = Sandbox::default();
        sandbox.run_as = Some(user.clone());
        let exec = LocalExecutor::new(dir.path()).with_sandbox(sandbox);
        let script = "grep -E '^(Uid|Gid|Groups|NoNewPrivs|CapEff):' /proc/self/status; \
                      pwd; echo home=$HOME; echo made > here";
        let (outcome, out, err) = output(&exec, &run("j", sh(script))).await;
        assert_eq!(outcome, Outcome::Exited(0), "{err}");
        let field = |name: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {out}"))
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        let (uid, gid) = (user.uid.to_string(), user.gid.to_string());
        // Real, effective, saved and filesystem ids are all the job's user's.
        assert_eq!(field("Uid:"), [&*uid; 4]);
        assert_eq!(field("Gid:"), [&*gid; 4]);
        // No supplementary group of the server's is kept.
        assert_eq!(field("Groups:"), [&*gid]);
        assert_eq!(field("NoNewPrivs:"), ["1"]);
        assert_eq!(field("CapEff:"), ["0000000000000000"]);

        let work = std::path::absolute(exec.work_dir("j")).unwrap();
        assert!(
            out.contains(&format!("{}\nhome={}\n", work.display(), work.display())),
            "{out}"
        );
        use std::os::unix::fs::MetadataExt as _;
        let made = std::fs::metadata(work.join("here")).unwrap();
        assert_eq!((made.uid(), made.gid()), (user.uid, user.gid));
        let meta = std::fs::metadata(&work).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (user.uid, 0o700));
        // The logs are the server's alone.
        let log = std::fs::metadata(exec.log_paths("j", 1).0).unwrap();
        assert_eq!((log.uid(), log.mode() & 0o777), (0, 0o600));

        // A relative working_dir is made under the job's folder, by the job's user.
        let mut r = run("j", sh("pwd; touch file"));
        r.attempt = 2;
        r.working_dir = "sub/dir".into();
        let (outcome, out, err) = output(&exec, &r).await;
        assert_eq!(outcome, Outcome::Exited(0), "{err}");
        assert_eq!(out, format!("{}\n", work.join("sub/dir").display()));
        assert_eq!(
            std::fs::metadata(work.join("sub/dir/file")).unwrap().uid(),
            user.uid
        );

        // An absolute one is entered as the job's user: one it may not enter is refused.
        use std::os::unix::fs::PermissionsExt as _;
        let private = tempfile::tempdir().unwrap();
        std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let mut r = run("j", sh("pwd"));
        r.attempt = 3;
        r.working_dir = private.path().to_string_lossy().into_owned();
        let err = exec.run(&r, &CancellationToken::new()).await.unwrap_err();
        assert!(err.to_string().contains("Permission denied"), "{err}");
    }

    #[tokio::test]
    async fn a_job_sees_none_of_the_servers_environment() {
        // This process (the "server") has variables of its own: cargo's at least.
        let server_vars: Vec<String> = std::env::vars()
            .map(|(k, _)| k)
            .filter(|k| k != "PATH" && k != "HOME")
            .collect();
        assert!(!server_vars.is_empty(), "the test process has no variables");
        let dir = tempfile::tempdir().unwrap();
        let mut sandbox = Sandbox::default();
        sandbox.path = "/usr/bin:/bin".into();
        let exec = LocalExecutor::new(dir.path()).with_sandbox(sandbox);
        let mut r = run("j", vec!["env".into()]);
        r.env.insert("GREETING".into(), "hello".into());
        let (outcome, out, err) = output(&exec, &r).await;
        assert_eq!(outcome, Outcome::Exited(0), "{err}");
        let mut seen: Vec<&str> = out.lines().collect();
        seen.sort();
        let home = std::path::absolute(exec.work_dir("j")).unwrap();
        assert_eq!(
            seen,
            [
                "GREETING=hello",
                &*format!("HOME={}", home.display()),
                "PATH=/usr/bin:/bin"
            ]
        );
    }

    #[tokio::test]
    async fn the_configured_rlimits_are_in_force_in_the_job() {
        let dir = tempfile::tempdir().unwrap();
        let mut sandbox = Sandbox::default();
        sandbox.run_as = Some(nobody());
        sandbox.limits = Limits {
            address_space_bytes: Some(8 << 30),
            cpu_seconds: Some(1234),
            open_files: Some(321),
            processes: Some(4321),
        };
        let exec = LocalExecutor::new(dir.path()).with_sandbox(sandbox);
        let (outcome, out, err) =
            output(&exec, &run("j", sh("cat /proc/self/limits; ulimit -n"))).await;
        assert_eq!(outcome, Outcome::Exited(0), "{err}");
        let limit = |name: &str| {
            let line = out
                .lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("no {name} in {out}"));
            line[name.len()..]
                .split_whitespace()
                .take(2)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        let as_bytes = (8u64 << 30).to_string();
        assert_eq!(limit("Max address space"), [&*as_bytes; 2]);
        // SIGXCPU at the soft limit, SIGKILL 5 s later.
        assert_eq!(limit("Max cpu time"), ["1234", "1239"]);
        assert_eq!(limit("Max open files"), ["321", "321"]);
        assert_eq!(limit("Max processes"), ["4321", "4321"]);
        assert_eq!(out.lines().last(), Some("321"));
    }

    #[tokio::test]
    async fn a_program_off_the_allow_list_is_refused_at_submit_and_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let sandbox = Sandbox::default()
            .with_allowed_commands(&["echo".into()])
            .unwrap();
        let exec = LocalExecutor::new(dir.path()).with_sandbox(sandbox);
        let spec = |argv: &[&str]| JobSpec {
            name: "j".into(),
            queue: "default".into(),
            priority_class: String::new(),
            resources: Default::default(),
            max_retries: 0,
            deadline_seconds: None,
            ttl_seconds_after_finished: None,
            labels: Default::default(),
            idempotency_key: None,
            owner: None,
            pausable: None,
            kind: JobKind::Command {
                image: String::new(),
                command: argv.iter().map(|s| s.to_string()).collect(),
                env: Default::default(),
                working_dir: String::new(),
                writable_root: false,
            },
        };
        assert_eq!(
            exec.check(&spec(&["cat", "/etc/passwd"])),
            Err("command 'cat' is not allowed (jobs.local.allowed_commands)".into())
        );
        assert!(exec.check(&spec(&["echo", "hi"])).is_ok());
        // At start too: what runs is the allowed file, found on the jobs' PATH.
        let err = exec
            .run(&run("j", vec!["cat".into()]), &CancellationToken::new())
            .await
            .unwrap_err();
        assert!(err.is_permanent(), "{err}");
        assert!(err.to_string().contains("'cat' is not allowed"), "{err}");
        let (outcome, out, _) = output(&exec, &run("k", vec!["echo".into(), "hi".into()])).await;
        assert_eq!((outcome, out.as_str()), (Outcome::Exited(0), "hi\n"));
    }

    /// Field `n` (from 1, as `man proc` counts) of `/proc/<pid>/stat`, read from its text.
    fn stat_field(stat: &str, n: usize) -> String {
        // Fields 1 and 2 are the pid and "(comm)", which may hold spaces.
        let (_, rest) = stat.rsplit_once(')').expect("a stat line");
        rest.split_whitespace()
            .nth(n - 3)
            .unwrap_or_else(|| panic!("no field {n} in {stat}"))
            .to_owned()
    }

    /// The state letter of `pid` (`R`, `S`, `T` for stopped...), or `None` once it is gone.
    fn proc_state(pid: u32) -> Option<String> {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .map(|stat| stat_field(&stat, 3))
    }

    /// Whether group `pgid` is stopped: a process of it is stopped and none runs or sleeps (a
    /// shell that vforked a child stopped before its exec waits in `D` for it).
    fn frozen(pgid: u32) -> bool {
        let mut states = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            if stat.contains(')') && stat_field(&stat, 5) == pgid.to_string() {
                states.push(stat_field(&stat, 3));
            }
        }
        states.iter().any(|s| s == "T")
            && states.iter().all(|s| matches!(s.as_str(), "T" | "t" | "D"))
    }

    /// Polls `pred` every 25 ms for up to 20 s; whether it came true.
    async fn eventually(mut pred: impl FnMut() -> bool) -> bool {
        for _ in 0..800 {
            if pred() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    }

    /// Lines in `path` (0 when it does not exist yet).
    fn lines(path: &Path) -> usize {
        std::fs::read_to_string(path).map_or(0, |s| s.lines().count())
    }

    /// A script that writes its pid to `pid`, then appends a line to `counter` every 50 ms.
    fn counting(pid: &Path, counter: &Path) -> Vec<String> {
        sh(&format!(
            "echo $$ > {}; while true; do echo tick >> {}; sleep 0.05; done",
            pid.display(),
            counter.display()
        ))
    }

    /// The process group an execution describes.
    fn pgid_of(execution: &dyn Execution) -> u32 {
        let describe = execution.describe();
        describe
            .strip_prefix("process group ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no process group in '{describe}'"))
    }

    async fn pid_in(path: &Path) -> u32 {
        let mut pid = None;
        assert!(
            eventually(|| {
                pid = std::fs::read_to_string(path)
                    .ok()
                    .and_then(|s| s.trim().parse().ok());
                pid.is_some()
            })
            .await,
            "the job never wrote its pid"
        );
        pid.unwrap()
    }

    #[tokio::test]
    async fn attempts_run_at_the_configured_nice_value() {
        let dir = tempfile::tempdir().unwrap();
        let own = stat_field(&std::fs::read_to_string("/proc/self/stat").unwrap(), 19);
        for (exec, want) in [
            (LocalExecutor::new(dir.path()).with_nice(7), "7".to_string()),
            // Beyond the range: the lowest priority there is.
            (
                LocalExecutor::new(dir.path()).with_nice(40),
                "19".to_string(),
            ),
            // 0, the default: the server's own.
            (LocalExecutor::new(dir.path()), own),
        ] {
            // The job reads its own stat: field 19 is its nice value.
            let (outcome, out, err) = output(&exec, &run("j", sh("cat /proc/$$/stat"))).await;
            assert_eq!(outcome, Outcome::Exited(0), "{err}");
            assert_eq!(stat_field(&out, 19), want, "{out}");
        }
    }

    #[tokio::test]
    async fn attempts_run_in_the_idle_scheduling_class_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let own = stat_field(&std::fs::read_to_string("/proc/self/stat").unwrap(), 41);
        for (exec, want) in [
            (
                LocalExecutor::new(dir.path()).with_idle_class(true),
                libc::SCHED_IDLE.to_string(),
            ),
            // Off, the default: the server's own class.
            (LocalExecutor::new(dir.path()), own),
        ] {
            // Field 41 of a process's stat is its scheduling policy; the shell's children
            // inherit it, as every process a job starts does.
            let (outcome, out, err) = output(&exec, &run("j", sh("cat /proc/$$/stat"))).await;
            assert_eq!(outcome, Outcome::Exited(0), "{err}");
            assert_eq!(stat_field(&out, 41), want, "{out}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_paused_attempt_stops_progressing_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let (pidfile, counter) = (dir.path().join("pid"), dir.path().join("counter"));
        let exec = LocalExecutor::new(dir.path().join("jobs"));
        let execution = exec
            .start(&run("j", counting(&pidfile, &counter)))
            .await
            .unwrap();
        assert!(execution.can_pause());
        let (pause, paused) = tokio::sync::watch::channel(false);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(execution.wait_pausable(cancel.clone(), paused));
        let pid = pid_in(&pidfile).await;
        assert!(
            eventually(|| lines(&counter) >= 2).await,
            "the job never counted"
        );

        pause.send_replace(true);
        assert!(
            eventually(|| frozen(pid)).await,
            "the job was not stopped: {:?}",
            proc_state(pid)
        );
        // Stopped, its whole group writes nothing more.
        let stopped_at = lines(&counter);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            lines(&counter),
            stopped_at,
            "a stopped job went on counting"
        );
        assert!(!task.is_finished());

        pause.send_replace(false);
        assert!(
            eventually(|| lines(&counter) > stopped_at + 2).await,
            "the job did not go on after the resume"
        );
        assert!(!frozen(pid));

        // Paused again, then cancelled: the stopped group dies, nothing is left stopped.
        pause.send_replace(true);
        assert!(eventually(|| frozen(pid)).await);
        cancel.cancel();
        let outcome = within(task).await.unwrap().unwrap();
        assert_eq!(outcome, Outcome::Cancelled);
        assert!(
            wait_dead(pid).await,
            "the paused job {pid} survived its cancel"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn time_paused_does_not_count_against_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let exec = LocalExecutor::new(dir.path().join("jobs"));
        let mut r = run(
            "j",
            sh(&format!("echo $$ > {}; sleep 60", pidfile.display())),
        );
        r.deadline = Some(Duration::from_secs(1));
        let execution = exec.start(&r).await.unwrap();
        let started = std::time::Instant::now();
        // Paused from the start (before it may even write its pid), for longer than the whole
        // deadline.
        let pid = pgid_of(&*execution);
        let (pause, paused) = tokio::sync::watch::channel(true);
        let task = tokio::spawn(execution.wait_pausable(CancellationToken::new(), paused));
        assert!(eventually(|| frozen(pid)).await);
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(
            !task.is_finished(),
            "the deadline fired while the attempt was paused"
        );
        pause.send_replace(false);
        let outcome = within(task).await.unwrap().unwrap();
        assert_eq!(outcome, Outcome::TimedOut);
        // It ran its second after the pause, not before it.
        assert!(started.elapsed() >= Duration::from_millis(3500));
        assert!(wait_dead(pid).await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pause_sender_that_goes_away_resumes_the_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let (pidfile, counter) = (dir.path().join("pid"), dir.path().join("counter"));
        let exec = LocalExecutor::new(dir.path().join("jobs"));
        let execution = exec
            .start(&run("j", counting(&pidfile, &counter)))
            .await
            .unwrap();
        let pid = pgid_of(&*execution);
        let (pause, paused) = tokio::sync::watch::channel(true);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(execution.wait_pausable(cancel.clone(), paused));
        assert!(eventually(|| frozen(pid)).await);
        let stopped_at = lines(&counter);
        drop(pause);
        assert!(
            eventually(|| lines(&counter) > stopped_at + 2).await,
            "the job stayed stopped with nobody to resume it"
        );
        cancel.cancel();
        assert_eq!(within(task).await.unwrap().unwrap(), Outcome::Cancelled);
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
