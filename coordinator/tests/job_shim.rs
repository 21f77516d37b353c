//! The job shim (slowpath/src/shim.rs) through the real binary: a killed coordinator takes its
//! jobs' process groups with it, and a command run through the shim ends, writes and sees what
//! it did without it (exit code, signal, output, environment, signal mask, arg0, errors).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use veraltheim_proto::v1::{self, job_service_client::JobServiceClient};
use veraltheim_slowpath::local::{LocalExecutor, RunAs, Sandbox, Shim};
use veraltheim_slowpath::{CommandRun, ExecError, Executor as _, Outcome};

mod common;

use common::{command, wait_for};

fn shim() -> Shim {
    Shim::open(Path::new(env!("CARGO_BIN_EXE_veraltheim"))).unwrap()
}

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
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("the executor did not finish in 30 s")
}

/// `/proc/<pid>/stat` as (state, ppid, pgrp); `None` when the process is gone.
fn stat(pid: u32) -> Option<(char, u32, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name (in parentheses, which may hold anything): state ppid pgrp ...
    let mut rest = text.rsplit_once(')')?.1.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    let pgrp = rest.next()?.parse().ok()?;
    Some((state, ppid, pgrp))
}

/// The processes of group `pgid` that still run (zombies have ended).
fn group_members(pgid: u32) -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&pid| stat(pid).is_some_and(|(state, _, pgrp)| pgrp == pgid && state != 'Z'))
        .collect();
    pids.sort();
    pids
}

/// Kills group `pgid` when dropped: a failing test leaves no 600 s sleeps behind.
struct KillGroupOnDrop(u32);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        let Ok(pgid) = libc::pid_t::try_from(self.0) else {
            return;
        };
        if pgid > 1 {
            // SAFETY: kill with integers touches no memory.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

/// Waits (30 s at most) until `path` holds a number.
async fn read_pid(path: &Path) -> u32 {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(pid) = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return pid;
        }
        assert!(
            Instant::now() < until,
            "{} never held a pid",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Issue 14, item 4: a node that dies by kill -9 takes its jobs' process groups with it, so the
/// job's next attempt (on another node, or here after a restart) never runs beside an orphan.
#[tokio::test]
async fn a_killed_server_takes_its_jobs_process_groups_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("sh.pid");
    let mut server = common::start(&[]).await;
    let mut jobs = JobServiceClient::new(common::channel(&server).await);
    // A shell with two children in the background, as a job that starts workers would be.
    let script = format!(
        "sleep 600 & sleep 600 & echo $$ > {}; wait",
        pidfile.display()
    );
    let job = jobs
        .submit_job(command("workers", &["sh", "-c", &script]))
        .await
        .unwrap()
        .into_inner();
    wait_for(&mut jobs, &job.id, v1::JobState::Running).await;
    let sh = read_pid(&pidfile).await;
    let (_, parent, pgid) = stat(sh).expect("the job's shell runs");
    let _cleanup = KillGroupOnDrop(pgid);
    // The shell and both sleeps.
    let members = group_members(pgid);
    assert!(
        members.len() >= 3 && members.contains(&sh),
        "the job's group {pgid} is {members:?}"
    );

    // kill -9: no shutdown path runs, nothing of the server's kills the group.
    server.child.kill().unwrap();
    server.child.wait().unwrap();

    // A bound for a stuck kill, not a measure of speed.
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let left = group_members(pgid);
        // The shell's parent (the shim) ends too.
        if left.is_empty() && is_dead(parent) {
            break;
        }
        assert!(
            Instant::now() < until,
            "20 s after the server's kill -9 its job's processes {left:?} (of {members:?}, group {pgid}; the shell's parent {parent}) still run"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Outcome, stdout and stderr of `r` on `exec`.
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

/// Executors over the same sandbox, without and with the shim.
fn both(sandbox: Sandbox) -> (tempfile::TempDir, LocalExecutor, LocalExecutor) {
    let dir = tempfile::tempdir().unwrap();
    let plain = LocalExecutor::new(dir.path().join("plain")).with_sandbox(sandbox.clone());
    let shimmed = LocalExecutor::new(dir.path().join("shim"))
        .with_sandbox(sandbox)
        .with_shim(shim());
    (dir, plain, shimmed)
}

#[tokio::test]
async fn through_the_shim_a_command_ends_writes_and_sees_what_it_did_without_it() {
    let (_dir, plain, shimmed) = both(Sandbox::default());
    let mut envrun = run("env", vec!["env".into()]);
    envrun.env.insert("GREETING".into(), "hello".into());
    let cases = [
        (
            run("code", sh("echo out; echo err >&2; exit 3")),
            Outcome::Exited(3),
        ),
        (
            run("term", sh("kill -TERM $$")),
            Outcome::Signalled(libc::SIGTERM),
        ),
        (
            run("segv", sh("kill -SEGV $$")),
            Outcome::Signalled(libc::SIGSEGV),
        ),
        (
            run("kill", sh("kill -KILL $$")),
            Outcome::Signalled(libc::SIGKILL),
        ),
        (run("big", sh("exit 255")), Outcome::Exited(255)),
        // The signals the program starts with: none blocked, the same ones ignored.
        (
            run(
                "mask",
                vec![
                    "grep".into(),
                    "-E".into(),
                    "^Sig(Blk|Ign)".into(),
                    "/proc/self/status".into(),
                ],
            ),
            Outcome::Exited(0),
        ),
        (envrun, Outcome::Exited(0)),
    ];
    for (r, expected) in cases {
        let without = output(&plain, &r).await;
        let with = output(&shimmed, &r).await;
        assert_eq!(with.0, expected, "{}: {with:?}", r.job_id);
        let home = |exec: &LocalExecutor| {
            std::path::absolute(exec.work_dir(&r.job_id))
                .unwrap()
                .display()
                .to_string()
        };
        // The job's folder is the only difference between the two executors.
        let with_out = with.1.replace(&home(&shimmed), "HOME");
        let without_out = without.1.replace(&home(&plain), "HOME");
        assert_eq!(
            (with.0, with_out, with.2),
            (without.0, without_out, without.2),
            "{}",
            r.job_id
        );
    }
    let mask = std::fs::read_to_string(shimmed.log_paths("mask", 1).0).unwrap();
    assert!(mask.contains("SigBlk:\t0000000000000000\n"), "{mask}");
    let env = std::fs::read_to_string(shimmed.log_paths("env", 1).0).unwrap();
    let mut vars: Vec<&str> = env.lines().map(|l| l.split('=').next().unwrap()).collect();
    vars.sort();
    assert_eq!(vars, ["GREETING", "HOME", "PATH"], "{env}");
}

#[tokio::test]
async fn through_the_shim_a_program_that_cannot_start_is_the_same_error() {
    use std::os::unix::fs::PermissionsExt as _;
    let (dir, plain, shimmed) = both(Sandbox::default());
    let not_executable = dir.path().join("data.txt");
    std::fs::write(&not_executable, "not a program\n").unwrap();
    std::fs::set_permissions(&not_executable, std::fs::Permissions::from_mode(0o644)).unwrap();
    for argv in [
        vec!["/no/such/program".to_owned()],
        vec!["no-such-program-vt".to_owned()],
        vec![not_executable.to_string_lossy().into_owned()],
    ] {
        let r = run("j", argv.clone());
        let without = plain.run(&r, &CancellationToken::new()).await.unwrap_err();
        let with = shimmed
            .run(&r, &CancellationToken::new())
            .await
            .unwrap_err();
        assert!(matches!(with, ExecError::Spawn { .. }), "{with:?}");
        assert_eq!(with.to_string(), without.to_string(), "{argv:?}");
    }
    // The words themselves.
    let r = run("j", vec!["/no/such/program".into()]);
    let err = shimmed
        .run(&r, &CancellationToken::new())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot start '/no/such/program': No such file or directory (os error 2)"
    );
}

/// The shim is this (large) binary: it needs tens of MB of address space where `true` needs a
/// few. Under a smaller `max_address_space_bytes` it cannot run, and the error says so.
#[tokio::test]
async fn a_shim_that_cannot_run_under_the_jobs_limits_says_what_may_be_wrong() {
    let mut sandbox = Sandbox::default();
    sandbox.limits.address_space_bytes = Some(16 << 20);
    let (_dir, plain, shimmed) = both(sandbox);
    let r = run("j", vec!["true".into()]);
    let outcome = plain.run(&r, &CancellationToken::new()).await.unwrap();
    assert_eq!(outcome, Outcome::Exited(0));
    let err = shimmed
        .run(&r, &CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("cannot start 'true': the job shim ended before it started the program ("),
        "{err}"
    );
    assert!(
        err.ends_with("; does it fit jobs.local.max_address_space_bytes (16777216)?)"),
        "{err}"
    );
}

#[tokio::test]
async fn through_the_shim_the_allowed_file_runs_under_its_given_name() {
    let sandbox = Sandbox::default()
        .with_allowed_commands(&["sh".into()])
        .unwrap();
    let (_dir, plain, shimmed) = both(sandbox);
    // The allow-list resolves `sh` to its file; the program still sees `sh` as argv[0].
    let r = run("j", sh("tr '\\0' ' ' < /proc/$$/cmdline"));
    let with = output(&shimmed, &r).await;
    assert_eq!(with, output(&plain, &r).await);
    assert_eq!(
        with,
        (
            Outcome::Exited(0),
            "sh -c tr '\\0' ' ' < /proc/$$/cmdline ".into(),
            String::new()
        )
    );
    let err = shimmed
        .run(&run("k", vec!["cat".into()]), &CancellationToken::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("'cat' is not allowed"), "{err}");
}

/// Whether `pid` is gone (or a zombie, which no longer runs).
fn is_dead(pid: u32) -> bool {
    stat(pid).is_none_or(|(state, _, _)| state == 'Z')
}

async fn wait_dead(pid: u32) -> bool {
    for _ in 0..200 {
        if is_dead(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn through_the_shim_cancel_deadline_and_leftovers_kill_the_whole_group() {
    let dir = tempfile::tempdir().unwrap();
    let exec = LocalExecutor::new(dir.path().join("jobs")).with_shim(shim());

    // Cancel: the shell, its child, and the shim above them.
    let pidfile = dir.path().join("child.pid");
    let script = format!("sleep 60 & echo $! > {}; wait", pidfile.display());
    let cancel = CancellationToken::new();
    let execution = exec.start(&run("c", sh(&script))).await.unwrap();
    let group: u32 = execution
        .describe()
        .strip_prefix("process group ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{}", execution.describe()));
    let task = tokio::spawn(execution.wait(cancel.clone()));
    let child = read_pid(&pidfile).await;
    let (_, sh_pid, pgrp) = stat(child).unwrap();
    assert_eq!(
        (pgrp, sh_pid),
        (group, group),
        "the shell leads the job's group, its child in it"
    );
    let (_, shim_pid, _) = stat(sh_pid).unwrap();
    let (_, _, shim_group) = stat(shim_pid).unwrap();
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{shim_pid}/comm")).unwrap(),
        "vt-job-shim\n",
        "the shell is the shim's child"
    );
    assert_ne!(shim_group, group, "the shim is outside the job's group");
    cancel.cancel();
    assert_eq!(within(task).await.unwrap().unwrap(), Outcome::Cancelled);
    // The shell was reaped before the cancel returned (by the shim, which ended after it), as
    // without the shim: no zombie of it is left to init.
    assert_eq!(
        stat(sh_pid),
        None,
        "the shell is still there after the cancel"
    );
    for pid in [child, shim_pid] {
        assert!(wait_dead(pid).await, "{pid} survived the cancel");
    }

    // The deadline: as timed out, with the output so far.
    let mut r = run("d", sh("echo started; sleep 60"));
    r.deadline = Some(Duration::from_secs(2));
    let (outcome, out, _) = output(&exec, &r).await;
    assert_eq!((outcome, out.as_str()), (Outcome::TimedOut, "started\n"));

    // What a command leaves in its group when it exits goes with it.
    let pidfile = dir.path().join("orphan.pid");
    let script = format!("sleep 60 & echo $! > {}; exit 0", pidfile.display());
    let (outcome, _, _) = output(&exec, &run("l", sh(&script))).await;
    assert_eq!(outcome, Outcome::Exited(0));
    let orphan = read_pid(&pidfile).await;
    assert!(wait_dead(orphan).await, "{orphan} outlived its job");
}

/// A dropped execution (its runner task gone) kills its group: with the shim, killing the
/// leader alone would leave the command running.
#[tokio::test]
async fn a_dropped_execution_kills_its_group() {
    let dir = tempfile::tempdir().unwrap();
    let exec = LocalExecutor::new(dir.path().join("jobs")).with_shim(shim());
    let pidfile = dir.path().join("sh.pid");
    let script = format!("echo $$ > {}; sleep 60", pidfile.display());
    let execution = exec.start(&run("j", sh(&script))).await.unwrap();
    let sh_pid = read_pid(&pidfile).await;
    let (_, shim_pid, _) = stat(sh_pid).unwrap();
    assert!(!is_dead(sh_pid));
    drop(execution);
    assert!(
        wait_dead(sh_pid).await,
        "the command outlived its dropped execution"
    );
    assert!(wait_dead(shim_pid).await, "the shim outlived the command");
}

/// Whether group `pgid` is stopped: a process of it is stopped and none runs or sleeps (a shell
/// that vforked a child stopped before its exec waits in `D` for it).
fn frozen(pgid: u32) -> bool {
    let states: Vec<char> = group_members(pgid)
        .into_iter()
        .filter_map(|pid| stat(pid).map(|(state, _, _)| state))
        .collect();
    states.contains(&'T') && states.iter().all(|s| matches!(s, 'T' | 't' | 'D'))
}

/// Polls `pred` every 25 ms for up to 20 s (a bound for a stuck signal, not a measure of
/// speed); whether it came true.
async fn eventually(mut pred: impl FnMut() -> bool) -> bool {
    for _ in 0..800 {
        if pred() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |s| s.lines().count())
}

/// Issue 17 item 3, through the shim: a paused job's group is stopped (the shim, outside it,
/// is not: it keeps watching its lifeline), resumes, and a cancel while paused leaves nothing
/// behind, stopped or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_shim_a_paused_job_stops_resumes_and_dies_when_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let exec = LocalExecutor::new(dir.path().join("jobs")).with_shim(shim());
    let (pidfile, counter) = (dir.path().join("sh.pid"), dir.path().join("count"));
    let script = format!(
        "echo $$ > {}; while true; do echo tick >> {}; sleep 0.05; done",
        pidfile.display(),
        counter.display()
    );
    let execution = exec.start(&run("p", sh(&script))).await.unwrap();
    assert!(execution.can_pause());
    let (pause, paused) = tokio::sync::watch::channel(false);
    let cancel = CancellationToken::new();
    let task = tokio::spawn(execution.wait_pausable(cancel.clone(), paused));
    let sh_pid = read_pid(&pidfile).await;
    let _cleanup = KillGroupOnDrop(sh_pid);
    let (_, shim_pid, _) = stat(sh_pid).unwrap();
    assert!(
        eventually(|| lines(&counter) >= 2).await,
        "the job never counted"
    );

    pause.send_replace(true);
    assert!(
        eventually(|| frozen(sh_pid)).await,
        "the job's group was not stopped: {:?}",
        group_members(sh_pid)
    );
    assert_ne!(
        stat(shim_pid).map(|s| s.0),
        Some('T'),
        "the shim was stopped too"
    );
    let stopped_at = lines(&counter);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(lines(&counter), stopped_at, "a paused job went on");

    pause.send_replace(false);
    assert!(
        eventually(|| lines(&counter) > stopped_at + 2).await,
        "the job did not go on after the resume"
    );

    pause.send_replace(true);
    assert!(eventually(|| frozen(sh_pid)).await);
    let members = group_members(sh_pid);
    cancel.cancel();
    assert_eq!(within(task).await.unwrap().unwrap(), Outcome::Cancelled);
    for pid in members.into_iter().chain([shim_pid]) {
        assert!(
            wait_dead(pid).await,
            "{pid} survived the cancel of a paused job"
        );
    }
    assert_eq!(group_members(sh_pid), Vec::<u32>::new());
}

/// A coordinator that dies while its job is paused (kill -9: nothing resumes the job) leaves no
/// stopped orphan: the shim, whose lifeline is cut, kills the stopped group.
#[test]
fn a_shim_whose_lifeline_is_cut_kills_a_stopped_group() {
    use std::io::Read as _;
    use std::os::unix::process::ExitStatusExt as _;
    let (mut shim, mut reader) =
        spawn_shim(std::process::id(), &["sh", "sh", "-c", "sleep 60 & wait"]);
    let mut report = [0u8; 5];
    reader.read_exact(&mut report).unwrap();
    assert_eq!(report[0], 0, "the shim started the program: {report:?}");
    let pgid = u32::from_le_bytes(report[1..].try_into().unwrap());
    let _cleanup = KillGroupOnDrop(pgid);
    let until = Instant::now() + Duration::from_secs(30);
    while group_members(pgid).len() < 2 {
        assert!(
            Instant::now() < until,
            "the job's group {pgid} never held sh and sleep"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Paused, as the executor pauses it.
    // SAFETY: kill with integers touches no memory.
    assert_eq!(
        unsafe { libc::kill(-(pgid as libc::pid_t), libc::SIGSTOP) },
        0
    );
    while !frozen(pgid) {
        assert!(
            Instant::now() < until,
            "the job's group {pgid} never stopped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        shim.try_wait().unwrap(),
        None,
        "the shim waits with the job"
    );

    drop(reader);
    assert_eq!(wait_ended(&mut shim).signal(), Some(libc::SIGKILL));
    assert_eq!(group_members(pgid), Vec::<u32>::new());
}

/// The local executor's tests of `run_as` switch users, which only root may do.
fn nobody() -> RunAs {
    assert_eq!(
        veraltheim_slowpath::sandbox::effective_uid(),
        0,
        "this test runs jobs as nobody:nogroup, which needs the test to run as root"
    );
    RunAs::resolve("nobody:nogroup").unwrap()
}

/// The shim runs as the job's user, executed through its descriptor: a binary in a folder that
/// user cannot enter still starts.
#[tokio::test]
async fn the_shim_runs_as_the_jobs_user_from_a_folder_that_user_cannot_enter() {
    use std::os::unix::fs::PermissionsExt as _;
    let user = nobody();
    let closed = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    std::fs::set_permissions(closed.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let bin: PathBuf = closed.path().join("veraltheim");
    // A second name for the same file (no copy of a large binary), or a copy across devices.
    if std::fs::hard_link(env!("CARGO_BIN_EXE_veraltheim"), &bin).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_veraltheim"), &bin).unwrap();
    }
    let shim = Shim::open(&bin).unwrap();
    shim.check_runnable_by(Some(&user)).unwrap();
    let jobs = tempfile::tempdir().unwrap();
    std::fs::set_permissions(jobs.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut sandbox = Sandbox::default();
    sandbox.run_as = Some(user.clone());
    let exec = LocalExecutor::new(jobs.path())
        .with_sandbox(sandbox)
        .with_shim(shim);
    let script = "cat /proc/$PPID/comm; \
                  grep -E '^(Uid|NoNewPrivs):' /proc/$PPID/status /proc/$$/status | cut -d: -f2-";
    let (outcome, out, err) = output(&exec, &run("j", sh(script))).await;
    assert_eq!(outcome, Outcome::Exited(0), "{out}{err}");
    let uid = user.uid;
    assert_eq!(
        out,
        format!(
            "vt-job-shim\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nNoNewPrivs:\t1\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nNoNewPrivs:\t1\n"
        )
    );
}

/// The shim binary started as the executor starts it, leading a process group of its own,
/// with `parent` as the coordinator it names; the read end of its report pipe.
fn spawn_shim(parent: u32, argv: &[&str]) -> (std::process::Child, std::io::PipeReader) {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::process::CommandExt as _;
    let (reader, writer) = std::io::pipe().unwrap();
    let fd = writer.as_raw_fd();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_veraltheim"));
    cmd.arg("__job-shim")
        .args(["--parent", &parent.to_string()])
        .args(["--report-fd", &fd.to_string(), "--"])
        .args(argv)
        .stdout(std::process::Stdio::piped())
        .process_group(0);
    // SAFETY: one fcntl between fork and exec, async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let shim = cmd.spawn().unwrap();
    drop(writer);
    (shim, reader)
}

/// Waits (20 s at most: a bound for a shim that never ends, not a measure of speed) for `shim`.
fn wait_ended(shim: &mut std::process::Child) -> std::process::ExitStatus {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = shim.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < until, "the shim did not end in 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The shim's report pipe is its lifeline: when the executor's end closes (the coordinator
/// died, or dropped the job without ending it), the shim kills the job's group and ends.
#[test]
fn a_shim_whose_lifeline_is_cut_kills_the_jobs_group() {
    use std::io::Read as _;
    use std::os::unix::process::ExitStatusExt as _;
    let (mut shim, mut reader) =
        spawn_shim(std::process::id(), &["sh", "sh", "-c", "sleep 60 & wait"]);
    let mut report = [0u8; 5];
    reader.read_exact(&mut report).unwrap();
    assert_eq!(report[0], 0, "the shim started the program: {report:?}");
    let pgid = u32::from_le_bytes(report[1..].try_into().unwrap());
    let _cleanup = KillGroupOnDrop(pgid);
    let until = Instant::now() + Duration::from_secs(30);
    while group_members(pgid).len() < 2 {
        assert!(
            Instant::now() < until,
            "the job's group {pgid} never held sh and sleep"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        shim.try_wait().unwrap(),
        None,
        "the shim waits with the job"
    );

    drop(reader);
    assert_eq!(wait_ended(&mut shim).signal(), Some(libc::SIGKILL));
    assert_eq!(group_members(pgid), Vec::<u32>::new());
}

/// A shim whose parent is not the one it was told (its coordinator died before it ran) starts
/// nothing; one called by hand says what it is for.
#[test]
fn a_shim_without_its_coordinator_starts_nothing() {
    use std::io::Read as _;
    use std::os::unix::process::ExitStatusExt as _;
    let (mut shim, mut reader) = spawn_shim(1, &["sh", "sh", "-c", "echo started"]);
    assert_eq!(wait_ended(&mut shim).signal(), Some(libc::SIGKILL));
    let mut out = String::new();
    shim.stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(out, "", "the program ran");
    let mut report = Vec::new();
    reader.read_to_end(&mut report).unwrap();
    assert_eq!(report, b"", "nobody to tell");

    // Called by hand, without its arguments or with stdio as its report: a usage error.
    let bin = env!("CARGO_BIN_EXE_veraltheim");
    for (args, says) in [
        (&["__job-shim"][..], "expected --parent"),
        (
            &[
                "__job-shim",
                "--parent",
                "1",
                "--report-fd",
                "1",
                "--",
                "true",
                "true",
            ][..],
            "--report-fd must not be stdin, stdout or stderr",
        ),
    ] {
        let out = std::process::Command::new(bin).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{stderr}");
    }
}

/// How much the shim adds to a job's start: 50 jobs running `true`, one after another, with and
/// without it. A measurement to read, not a check: `cargo test --test job_shim -- --ignored
/// --nocapture`.
#[tokio::test]
#[ignore]
async fn measure_the_shims_cost_on_50_trivial_jobs() {
    let (_dir, plain, shimmed) = both(Sandbox::default());
    for round in 0..3 {
        for (name, exec) in [("without", &plain), ("with", &shimmed)] {
            let started = Instant::now();
            for i in 0..50 {
                let r = run(&format!("{round}-{i}"), vec!["true".into()]);
                let outcome = exec.run(&r, &CancellationToken::new()).await.unwrap();
                assert_eq!(outcome, Outcome::Exited(0));
            }
            let took = started.elapsed();
            println!(
                "round {round}: 50 jobs {name} the shim: {:.1} ms ({:.2} ms per job)",
                took.as_secs_f64() * 1e3,
                took.as_secs_f64() * 1e3 / 50.0
            );
        }
    }
}
