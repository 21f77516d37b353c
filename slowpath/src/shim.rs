//! The job shim: what ties a local job's processes to the life of the coordinator.
//!
//! The local executor starts each attempt's command in a process group of its own. A
//! coordinator that dies without running its shutdown path (kill -9, the OOM killer) used to
//! leave that group running: another node (or this one, restarted) then ran the job again beside
//! the orphan. With a [`Shim`] the executor's child is not the job's program but this binary
//! again, in shim mode (`<binary> __job-shim --parent <pid> --report-fd <fd> -- <program> <arg0>
//! <args...>`), which the coordinator's `main` hands to [`main`] before doing anything else.
//! The executor starts the shim in a process group of its own, with the job's sandbox,
//! environment and stdio. The shim
//!
//! 1. blocks every signal (they wake its wait instead: see below), and asks the kernel for
//!    SIGHUP when its parent thread goes (`PR_SET_PDEATHSIG`);
//! 2. checks that its parent is the coordinator `--parent` names — one that died before step 1
//!    is seen here, and the shim ends at once, having started nothing;
//! 3. starts the program (`execvp`: looked up on the job's `PATH`, started as `arg0`) as its
//!    child, leading a new process group — the job's group — with the same stdio,
//!    environment, folder, user, rlimits and cgroup (everything the executor set up between
//!    fork and exec is the shim's and passes on), and no signal blocked;
//! 4. tells the executor through the report pipe that the program started, and its process
//!    group, or why it did not (the errno of the failed exec: a missing program is the same
//!    error as without the shim). The pipe stays open: it is the shim's lifeline, its other end
//!    held by the executor for as long as it watches the job;
//! 5. waits for the program, waking on any signal (SIGCHLD when the program ends, SIGHUP from
//!    the kernel) and every [`POLL`] at the latest. When its parent is no longer the
//!    coordinator (died: the shim was given to init or a subreaper), or the lifeline is cut
//!    (the coordinator died, or dropped the job without ending it), it sends SIGKILL to the
//!    job's group, reaps the program and ends;
//! 6. when the program ends, kills what it left in the job's group (while the program's zombie
//!    still holds the group's id, so the id cannot have gone to another group), reaps it, and
//!    ends the same way: the same exit code, or, for a program killed by signal S, S raised on
//!    itself (default action, core dumps off) — the executor sees what it saw without the shim.
//!
//! The executor kills the job's group (cancel, deadline, leftovers) as before, by the id the
//! shim reported; the shim, outside that group, survives the kill long enough to reap the
//! program, so no zombie of the program is left to init and its pid is gone when the cancel
//! returns, as without the shim. The shim has a group of its own, not the coordinator's, so that
//! a kill of the coordinator's group does not take the shims and leave the jobs.
//!
//! Why not `PR_SET_PDEATHSIG` on the job's program alone: it reaches only that one process, not
//! the children of `sh -c '...'`; it fires when the *thread* that forked the child ends (tokio
//! ends idle blocking threads), not only the process; and the kernel clears it when the child
//! changes its user (`run_as`). Here it is a wake-up only, set by the shim itself once it runs
//! as the job's user; the decision is `getppid()`, which names the coordinator as long as any of
//! its threads lives and changes the moment it dies, and the lifeline, which the kernel cuts
//! when the coordinator's last descriptor of it closes. The poll covers whatever the signal
//! misses. A per-node cgroup would also work, but needs cgroup v2 delegated to the server,
//! which `jobs.local.cgroup_dir` leaves optional.
//!
//! Why a second exec of this binary and not a fork without exec: a forked child of the
//! coordinator shares its whole address space copy-on-write, so every page the coordinator
//! writes afterwards (model weights loaded, caches) would be copied once per running job.
//!
//! Why through a descriptor: [`Shim::current_exe`] opens the running binary (`/proc/self/exe`)
//! once, and each attempt executes `/proc/self/fd/<n>`. The job's user need not be able to
//! reach the binary's folder (a `/root/...` install), and a binary replaced on disk by an
//! upgrade is not what a running coordinator starts as its shim: the shim is always the same
//! build as the coordinator. The kernel opens the file before it closes the descriptors marked
//! close-on-exec, so the descriptor stays close-on-exec and never reaches the shim. The file must
//! still be executable by the job's user ([`Shim::check_runnable_by`], checked at start).
//!
//! Signals: the shim blocks all of them and drops those it is sent (a service manager
//! signalling every process of the service reaches the program directly). Signals for the job
//! go to its group, which the shim is not in. The program starts with no signal blocked, and the
//! dispositions it would have got without the shim.
//!
//! What it costs: one more process per running job, counted against `max_processes` and the
//! job's cgroup like the job's own (measured with a debug build: 17 MB resident, 6 MB of it
//! anonymous, most of the rest this binary's pages shared with the coordinator); its start, an
//! exec of this large binary (50 jobs running `true`, one after another, on the shared 2-core
//! development machine, debug build: 4–6 ms each without the shim, 7–10 ms with it); a wake-up
//! every [`POLL`]. It needs about 60 MB of address space (the debug build): under a
//! smaller `max_address_space_bytes` it cannot start, and the executor's error says so.
//!
//! What it is not: a containment. The shim runs as the job's user, so the job may kill it (the
//! executor then sees the job ended by that signal and kills the group, as always) or leave the
//! group (`setsid`), and the job's environment is the shim's too (an `LD_PRELOAD` of the job's
//! own applies to it). Only a cgroup holds every process of a job for certain.

use std::ffi::OsString;
use std::io::Write as _;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus};
use std::sync::Arc;
use std::time::Duration;

use crate::sandbox::RunAs;

/// The first argument that puts the binary in shim mode (hidden: not a command for people).
pub const ARG: &str = "__job-shim";

/// How often the shim checks its parent and lifeline when no signal woke it.
pub const POLL: Duration = Duration::from_millis(200);

/// The signal the kernel sends the shim when its parent thread ends (`PR_SET_PDEATHSIG`).
const PARENT_DEATH_SIGNAL: libc::c_int = libc::SIGHUP;

/// The exit code of a shim that could not start the program (as a shell's "not found").
const CANNOT_START: u8 = 127;

/// The exit code of a shim started wrongly (not by the executor).
const USAGE: u8 = 2;

/// The report's first byte: started (the job's process group follows, 4 bytes), an errno
/// follows (4 bytes), or a message follows (to the end of the pipe).
const STARTED: u8 = 0;
const ERRNO: u8 = 1;
const MESSAGE: u8 = 2;

/// The executable started as each attempt's shim, held open; see the module documentation.
#[derive(Clone, Debug)]
pub struct Shim {
    exe: Arc<OwnedFd>,
    /// Where it was opened from, for messages and the shim's `argv[0]`.
    path: PathBuf,
}

impl Shim {
    /// This process's own executable: the coordinator binary, which runs [`main`] when started
    /// with [`ARG`]. Only a binary that does may be used (not a test harness).
    pub fn current_exe() -> std::io::Result<Shim> {
        let path = std::fs::read_link("/proc/self/exe")?;
        Self::open_as(Path::new("/proc/self/exe"), path)
    }

    /// The executable at `path`, which must run [`main`] when started with [`ARG`].
    pub fn open(path: &Path) -> std::io::Result<Shim> {
        Self::open_as(path, path.to_owned())
    }

    fn open_as(open: &Path, path: PathBuf) -> std::io::Result<Shim> {
        let file = std::fs::File::open(open)?;
        if !file.metadata()?.is_file() {
            return Err(std::io::Error::other(format!(
                "{} is not a file",
                path.display()
            )));
        }
        Ok(Shim {
            exe: Arc::new(above_stdio(file.into())?),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `run_as` (the jobs' user; `None`: the server's own, which runs this binary
    /// already) may execute the shim, judged by the file's mode bits as the kernel will (its
    /// folders do not matter: it is executed through its descriptor). The error says what to do.
    pub fn check_runnable_by(&self, run_as: Option<&RunAs>) -> Result<(), String> {
        let Some(r) = run_as else { return Ok(()) };
        let meta = std::fs::File::from(self.exe.try_clone().map_err(|e| e.to_string())?)
            .metadata()
            .map_err(|e| format!("cannot read {}: {e}", self.path.display()))?;
        let bit = if meta.uid() == r.uid {
            0o100
        } else if meta.gid() == r.gid {
            0o010
        } else {
            0o001
        };
        if meta.mode() & bit == 0 {
            return Err(format!(
                "local jobs start through this server's own executable {} (the job shim, run as the jobs' user), which {r} may not execute (mode {:o}): make it executable by that user (e.g. chmod o+x)",
                self.path.display(),
                meta.mode() & 0o7777
            ));
        }
        Ok(())
    }

    /// The command that starts `program` (looked up on the job's `PATH` unless it has a `/`)
    /// as `arg0` with `args` through the shim, and the pipe on which the shim says whether the
    /// program started. The caller sets up the rest (environment, stdio, a process group of its
    /// own, user) as for the program itself, calls [`keep_across_exec`] with
    /// [`Report::child_fd`] between fork and exec, spawns, then [`Report::read`]s.
    pub(crate) fn command(
        &self,
        program: &Path,
        arg0: &str,
        args: &[String],
    ) -> std::io::Result<(tokio::process::Command, Report)> {
        let (reader, writer) = std::io::pipe()?;
        let writer = above_stdio(writer.into())?;
        let mut cmd =
            tokio::process::Command::new(format!("/proc/self/fd/{}", self.exe.as_raw_fd()));
        cmd.arg0(&self.path)
            .arg(ARG)
            .arg("--parent")
            .arg(std::process::id().to_string())
            .arg("--report-fd")
            .arg(writer.as_raw_fd().to_string())
            .arg("--")
            .arg(program)
            .arg(arg0)
            .args(args);
        Ok((
            cmd,
            Report {
                reader: reader.into(),
                writer: Some(writer),
            },
        ))
    }
}

/// `fd`, or a duplicate of it numbered 3 or above (close-on-exec): between fork and exec the
/// child's stdio is put on 0, 1 and 2, which would replace a descriptor that had one of those
/// numbers (only when the server itself was started with one of them closed).
fn above_stdio(fd: OwnedFd) -> std::io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: fcntl on a descriptor we own; the new one is ours alone.
    let dup = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if dup < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `dup` was just opened by fcntl and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(dup) })
}

/// In the child between fork and exec: lets `fd` (close-on-exec, as every descriptor Rust
/// opens) reach the exec'd program. One `fcntl`, async-signal-safe.
pub(crate) fn keep_across_exec(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor number touches no memory; in the child only.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The executor's end of the shim's report.
pub(crate) struct Report {
    reader: OwnedFd,
    /// The shim's end, closed here once the shim is started ([`Report::read`]).
    writer: Option<OwnedFd>,
}

/// The kind of a [`Report::read`] error when the shim ended without a report (killed, or
/// unable to run at all: an address-space limit too small for it, a usage error).
pub(crate) const SILENT: std::io::ErrorKind = std::io::ErrorKind::UnexpectedEof;

/// The most bytes a report has (a message is cut to fit).
const REPORT_MAX: usize = 1024;

/// The shim's report, read: the job's process group and the lifeline (dropping it tells the
/// shim to kill the job).
pub(crate) struct Started {
    pub(crate) pgid: u32,
    pub(crate) lifeline: OwnedFd,
}

impl Report {
    /// The shim's end's number, to pass to [`keep_across_exec`].
    pub(crate) fn child_fd(&self) -> RawFd {
        self.writer.as_ref().map_or(-1, |w| w.as_raw_fd())
    }

    /// Whether the shim started the program: its process group, or the error of its start (an
    /// OS error as the program's exec failed, or what went wrong in the shim). Call once the
    /// shim is spawned; waits until the shim has written its report, or ended without one.
    pub(crate) async fn read(mut self) -> std::io::Result<Started> {
        // Ours closed first: the end of the pipe is then the shim's close, or its death.
        drop(self.writer.take());
        let pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(self.reader)?;
        let mut data = Vec::new();
        let mut buf = [0u8; 256];
        while !complete(&data) && data.len() <= REPORT_MAX {
            pipe.readable().await?;
            match pipe.try_read(&mut buf) {
                Ok(0) => break,
                Ok(n) => data.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        let pgid = parse_report(&data)?;
        Ok(Started {
            pgid,
            lifeline: pipe.into_nonblocking_fd()?,
        })
    }
}

/// Whether `data` is a whole report without waiting for the end of the pipe.
fn complete(data: &[u8]) -> bool {
    matches!(data, [STARTED | ERRNO, _, _, _, _, ..])
}

fn parse_report(data: &[u8]) -> std::io::Result<u32> {
    let garbled = || std::io::Error::other("the job shim's report is garbled");
    match data {
        [STARTED, rest @ ..] => match <[u8; 4]>::try_from(rest) {
            Ok(b) if u32::from_le_bytes(b) > 1 => Ok(u32::from_le_bytes(b)),
            _ => Err(garbled()),
        },
        [ERRNO, errno @ ..] => match <[u8; 4]>::try_from(errno) {
            Ok(b) => Err(std::io::Error::from_raw_os_error(i32::from_le_bytes(b))),
            Err(_) => Err(garbled()),
        },
        [MESSAGE, text @ ..] => Err(std::io::Error::other(format!(
            "the job shim failed: {}",
            String::from_utf8_lossy(text)
        ))),
        // Its status says more: `SILENT` tells the executor to add it.
        [] => Err(std::io::Error::new(
            SILENT,
            "the job shim ended before it started the program",
        )),
        _ => Err(garbled()),
    }
}

fn report_bytes(result: Result<u32, &std::io::Error>) -> Vec<u8> {
    let mut v = Vec::new();
    match result {
        Ok(pgid) => {
            v.push(STARTED);
            v.extend_from_slice(&pgid.to_le_bytes());
        }
        Err(e) => match e.raw_os_error() {
            Some(errno) => {
                v.push(ERRNO);
                v.extend_from_slice(&errno.to_le_bytes());
            }
            None => {
                v.push(MESSAGE);
                let text = e.to_string();
                let mut cut = text.len().min(REPORT_MAX - 1);
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                v.extend_from_slice(&text.as_bytes()[..cut]);
            }
        },
    }
    v
}

/// The shim's arguments (after [`ARG`]).
#[derive(Debug, PartialEq, Eq)]
struct Args {
    parent: u32,
    report_fd: RawFd,
    program: OsString,
    arg0: OsString,
    args: Vec<OsString>,
}

fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Args, String> {
    let mut it = args.into_iter();
    let mut number = |flag: &str| -> Result<u64, String> {
        match it.next() {
            Some(f) if f == flag => {}
            other => return Err(format!("expected {flag}, found {other:?}")),
        }
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        value
            .to_str()
            .and_then(|v| v.parse().ok())
            .ok_or(format!("{flag} {value:?} is not a number"))
    };
    let parent = number("--parent")?;
    let report_fd = number("--report-fd")?;
    match it.next() {
        Some(s) if s == "--" => {}
        other => return Err(format!("expected --, found {other:?}")),
    }
    let program = it.next().ok_or("no program")?;
    let arg0 = it.next().ok_or("no arg0")?;
    Ok(Args {
        parent: u32::try_from(parent).map_err(|_| "--parent is out of range")?,
        report_fd: RawFd::try_from(report_fd).map_err(|_| "--report-fd is out of range")?,
        program,
        arg0,
        args: it.collect(),
    })
}

/// How the program ended, as the shim will end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    Exit(u8),
    Signal(libc::c_int),
}

fn ending(status: ExitStatus) -> Ending {
    match (status.code(), status.signal()) {
        // An exit code is the low 8 bits of what the program gave `exit`.
        (Some(code), _) => Ending::Exit(code as u8),
        (None, Some(signal)) => Ending::Signal(signal),
        // Neither: not an ended process (stopped, continued), which `wait` does not return.
        (None, None) => Ending::Exit(255),
    }
}

/// Shim mode: `args` are the arguments after [`ARG`]. Returns (or ends the process) as the
/// program ended; see the module documentation. Writes to stderr (the job's log) only when it
/// was started wrongly.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let args = match parse_args(args) {
        Ok(a) => a,
        Err(e) => return usage(&e),
    };
    // SAFETY: the executor passed this descriptor open for us; nothing else in this process
    // owns it (it was opened before `main`). Checked to be open before it is taken.
    if args.report_fd < 3 {
        return usage("--report-fd must not be stdin, stdout or stderr");
    }
    let mut report = unsafe {
        if libc::fcntl(args.report_fd, libc::F_GETFD) < 0 {
            return usage("--report-fd is not an open descriptor");
        }
        std::fs::File::from_raw_fd(args.report_fd)
    };
    block_signals();
    // SAFETY: prctl with integers, and a NUL-terminated name it copies.
    unsafe {
        // Its name in `ps` (executed as /proc/self/fd/<n>, the kernel named it "<n>").
        libc::prctl(libc::PR_SET_NAME, c"vt-job-shim".as_ptr());
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            PARENT_DEATH_SIGNAL as libc::c_ulong,
            0,
            0,
            0,
        );
    }
    if parent_gone(args.parent) {
        // Nothing started, nobody to tell.
        die_killed();
    }
    let started = start(&args, &report);
    let told = report.write_all(&report_bytes(started.as_ref().map(|child| child.id())));
    let mut child = match started {
        Ok(child) => child,
        Err(_) => return ExitCode::from(CANNOT_START),
    };
    // The group's id is the program's pid (it leads the group it was started in).
    let pgid = child.id();
    if told.is_err() {
        // The executor is gone already (EPIPE): nobody will watch this job.
        abandon(pgid, &mut child);
    }
    loop {
        match exited(pgid) {
            Ok(true) => {
                // Whatever the program left in its group goes with it, while its zombie holds
                // the group's id.
                kill_group(pgid);
                return match child.wait() {
                    Ok(status) => end_as(ending(status)),
                    Err(_) => ExitCode::from(255),
                };
            }
            Ok(false) => {}
            Err(e) => {
                // Cannot happen for our own child; the job cannot be watched, so it ends.
                eprintln!("veraltheim job shim: cannot wait for the program: {e}");
                abandon(pgid, &mut child);
            }
        }
        if parent_gone(args.parent) || lifeline_cut(&report) {
            abandon(pgid, &mut child);
        }
        wait_for_signal(POLL);
    }
}

fn usage(what: &str) -> ExitCode {
    eprintln!(
        "veraltheim {ARG}: {what}; this mode is for the local job executor only (usage: {ARG} --parent PID --report-fd FD -- PROGRAM ARG0 [ARGS...])"
    );
    ExitCode::from(USAGE)
}

/// Starts the program, leading a new process group; the report's descriptor is closed in it.
fn start(args: &Args, report: &std::fs::File) -> std::io::Result<std::process::Child> {
    // SAFETY: fcntl on our own descriptor.
    if unsafe { libc::fcntl(report.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Stdio, environment and folder are inherited. std puts SIGPIPE (ignored in every Rust
    // program) back to its default in the child, but leaves the signal mask as it is: all
    // blocked here, so it is emptied between fork and exec.
    // SAFETY: the set is initialised here, before the fork.
    let none = unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        none
    };
    let mut cmd = std::process::Command::new(&args.program);
    cmd.arg0(&args.arg0).args(&args.args).process_group(0);
    // SAFETY: in the child the closure makes one async-signal-safe call, on a set prepared
    // before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::other("cannot unblock the signals"));
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Whether the program (`pid`) has ended, without reaping it: its zombie keeps its pid, and
/// so its group's id, from being reused.
fn exited(pid: u32) -> std::io::Result<bool> {
    // SAFETY: waitid writes only the siginfo we own, zeroed first (si_pid stays 0 when nothing
    // has ended).
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let rc = libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(info.si_pid() != 0)
    }
}

/// Blocks every signal that can be blocked: they stay pending until [`wait_for_signal`] takes
/// them, so none is lost between a check and the wait, and none ends the shim.
fn block_signals() {
    // SAFETY: the set is initialised by sigfillset before use; the calls touch only it.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
    }
}

/// Takes one pending signal, waiting up to `timeout` for one.
fn wait_for_signal(timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: the set is initialised by sigfillset; sigtimedwait accepts a null siginfo.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigtimedwait(&all, std::ptr::null_mut(), &ts);
    }
}

/// Whether the process that started the shim has died (the shim was given to init or a
/// subreaper).
fn parent_gone(parent: u32) -> bool {
    // SAFETY: getppid cannot fail and touches no memory.
    let now = unsafe { libc::getppid() };
    u32::try_from(now).ok() != Some(parent)
}

/// Whether the executor's end of the report pipe is closed: the pipe's write end then polls
/// as an error.
fn lifeline_cut(report: &std::fs::File) -> bool {
    let mut fd = libc::pollfd {
        fd: report.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: poll reads and writes the one pollfd we own; timeout 0 does not block.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    n > 0 && fd.revents & (libc::POLLERR | libc::POLLHUP) != 0
}

/// SIGKILL to process group `pgid` (never 0 or 1: this process's own group, every process).
fn kill_group(pgid: u32) {
    if let Ok(pgid) = libc::pid_t::try_from(pgid)
        && pgid > 1
    {
        // SAFETY: kill with integers touches no memory.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

/// The coordinator is gone: the job's group is killed, the program reaped, and the shim ends as
/// killed.
fn abandon(pgid: u32, child: &mut std::process::Child) -> ! {
    kill_group(pgid);
    let _ = child.wait();
    die_killed()
}

fn die_killed() -> ! {
    // SAFETY: kill and getpid with integers touch no memory.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    // Not reached.
    std::process::exit(128 + libc::SIGKILL)
}

/// Ends the shim as the program ended.
fn end_as(ending: Ending) -> ExitCode {
    match ending {
        Ending::Exit(code) => ExitCode::from(code),
        Ending::Signal(signal) => {
            // SAFETY: plain system calls on this process with initialised arguments.
            unsafe {
                // The program's core (if any) is the program's; the shim leaves none.
                libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
                let none = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::setrlimit(libc::RLIMIT_CORE, &none);
                libc::signal(signal, libc::SIG_DFL);
                let mut one: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut one);
                libc::sigaddset(&mut one, signal);
                libc::pthread_sigmask(libc::SIG_UNBLOCK, &one, std::ptr::null_mut());
                libc::raise(signal);
            }
            // Still here: a signal whose default is not to end a process (it cannot have ended
            // the program either); as a shell reports it.
            ExitCode::from(128u8.wrapping_add(signal as u8))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn arguments_are_read_in_their_one_order() {
        let a = parse_args(os(&[
            "--parent",
            "42",
            "--report-fd",
            "7",
            "--",
            "/bin/sh",
            "sh",
            "-c",
            "exit 3",
        ]))
        .unwrap();
        assert_eq!(
            a,
            Args {
                parent: 42,
                report_fd: 7,
                program: "/bin/sh".into(),
                arg0: "sh".into(),
                args: os(&["-c", "exit 3"]),
            }
        );
        // Arguments that look like the shim's own after `--` are the program's.
        let a = parse_args(os(&[
            "--parent",
            "1",
            "--report-fd",
            "3",
            "--",
            "p",
            "p",
            "--",
            "--parent",
        ]))
        .unwrap();
        assert_eq!(a.args, os(&["--", "--parent"]));

        let err = |v: &[&str]| parse_args(os(v)).unwrap_err();
        assert!(err(&[]).contains("expected --parent"));
        assert!(err(&["--parent", "x"]).contains("is not a number"));
        assert!(err(&["--parent", "1", "--report-fd"]).contains("needs a value"));
        assert!(err(&["--parent", "1", "--report-fd", "3", "p"]).contains("expected --"));
        assert!(err(&["--parent", "1", "--report-fd", "3", "--"]).contains("no program"));
        assert!(err(&["--parent", "1", "--report-fd", "3", "--", "p"]).contains("no arg0"));
        assert!(
            err(&[
                "--parent",
                "99999999999",
                "--report-fd",
                "3",
                "--",
                "p",
                "p"
            ])
            .contains("out of range")
        );
    }

    #[test]
    fn the_shim_ends_with_the_programs_code_or_signal() {
        // Raw wait statuses: an exit code in the second byte; a signal in the low 7 bits, with
        // 0x80 when it dumped core.
        assert_eq!(ending(ExitStatus::from_raw(0)), Ending::Exit(0));
        assert_eq!(ending(ExitStatus::from_raw(3 << 8)), Ending::Exit(3));
        assert_eq!(ending(ExitStatus::from_raw(255 << 8)), Ending::Exit(255));
        assert_eq!(
            ending(ExitStatus::from_raw(libc::SIGTERM)),
            Ending::Signal(15)
        );
        assert_eq!(
            ending(ExitStatus::from_raw(libc::SIGKILL)),
            Ending::Signal(9)
        );
        assert_eq!(
            ending(ExitStatus::from_raw(0x80 | libc::SIGSEGV)),
            Ending::Signal(libc::SIGSEGV)
        );
    }

    #[test]
    fn a_report_carries_a_start_an_errno_or_a_message() {
        let round =
            |r: Result<u32, std::io::Error>| parse_report(&report_bytes(r.as_ref().copied()));
        assert_eq!(round(Ok(4242)).unwrap(), 4242);
        assert!(complete(&report_bytes(Ok(4242))));
        let e = round(Err(std::io::Error::from_raw_os_error(libc::ENOENT))).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        // The same words as the exec's own error without the shim.
        assert_eq!(
            e.to_string(),
            std::io::Error::from_raw_os_error(libc::ENOENT).to_string()
        );
        let e = round(Err(std::io::Error::other("nul byte in program"))).unwrap_err();
        assert_eq!(e.to_string(), "the job shim failed: nul byte in program");
        // A message is read to the end of the pipe; a long one is cut (on a character
        // boundary) to fit.
        assert!(!complete(&report_bytes(Err(&std::io::Error::other("x")))));
        let long = "é".repeat(REPORT_MAX);
        assert!(report_bytes(Err(&std::io::Error::other(long))).len() <= REPORT_MAX);

        let silent = parse_report(&[]).unwrap_err();
        assert_eq!(silent.kind(), SILENT);
        assert_eq!(
            silent.to_string(),
            "the job shim ended before it started the program"
        );
        let garbled = |data: &[u8]| parse_report(data).unwrap_err().to_string();
        assert!(garbled(&[ERRNO, 1]).contains("garbled"));
        assert!(garbled(&[STARTED, 1, 0]).contains("garbled"));
        // Never a group the shim did not make: 0 and 1 are this process's own group and init's.
        assert!(garbled(&report_bytes(Ok(1))).contains("garbled"));
        assert!(garbled(&report_bytes(Ok(0))).contains("garbled"));
        assert!(garbled(&[9]).contains("garbled"));
    }

    #[test]
    fn only_a_user_who_may_execute_the_file_may_be_the_shims() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bin");
        std::fs::write(&file, "#!/bin/sh\n").unwrap();
        let meta = std::fs::metadata(&file).unwrap();
        let shim = Shim::open(&file).unwrap();
        let user = |uid, gid| RunAs {
            name: "u".into(),
            uid,
            gid,
        };
        let (owner, group) = (meta.uid(), meta.gid());
        let stranger = user(owner.wrapping_add(1000), group.wrapping_add(1000));
        let set =
            |mode| std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        set(0o750);
        assert!(shim.check_runnable_by(Some(&user(owner, group))).is_ok());
        assert!(
            shim.check_runnable_by(Some(&user(owner + 1, group)))
                .is_ok()
        );
        let err = shim.check_runnable_by(Some(&stranger)).unwrap_err();
        assert!(err.contains("may not execute (mode 750)"), "{err}");
        assert!(err.contains(&file.display().to_string()), "{err}");
        // The server's own user: it runs the binary already.
        assert!(shim.check_runnable_by(None).is_ok());
        set(0o755);
        assert!(shim.check_runnable_by(Some(&stranger)).is_ok());
        set(0o644);
        assert!(shim.check_runnable_by(Some(&user(owner, group))).is_err());
    }
}
