"""Local command jobs cannot take over the host (issue 13, item 5), through the real binary and
its CLI: with `jobs.local.run_as` a job runs as nobody:nogroup and cannot read a file only root
can read; it sees none of the server's environment; the configured rlimits are in force in it;
a program off `jobs.local.allowed_commands` is refused at submit; a user that does not exist
stops the server at start, by name.

The server runs as root here (as in CI), which is what `run_as` needs: without root these tests
fail, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from _helpers import binary_path, poll
from conftest import free_port, start_server, stop_server

BIN = str(binary_path())
SECRET = "hunter2-not-for-jobs"


@pytest.fixture(autouse=True)
def _root():
    assert os.geteuid() == 0, "these tests start servers that run jobs as nobody: run them as root"


@pytest.fixture
def files():
    """A folder anyone may enter, holding a file only root can read and one anyone can."""
    folder = open_folder("vt-isolation-")
    secret = folder / "root-only-file"
    secret.write_text("root's secret\n")
    secret.chmod(0o600)
    public = folder / "public-file"
    public.write_text("for everyone\n")
    public.chmod(0o644)
    yield secret, public
    shutil.rmtree(folder)


def cli(server, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    at = args.index("--") if "--" in args else len(args)
    argv = [BIN, *args[:at], "--server", server.grpc_url, *args[at:]]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if ok:
        assert proc.returncode == 0, f"{argv} exited {proc.returncode}: {proc.stderr}"
    return proc


def run_job(server, *command: str) -> tuple[dict, str, str]:
    """Submits `command`, waits for its end (`jobs watch` returns with it), and returns the job
    and its log (stdout, stderr)."""
    job_id = cli(server, "jobs", "submit", "--", *command).stdout.strip()
    cli(server, "jobs", "watch", job_id, ok=False)
    job = json.loads(cli(server, "jobs", "get", job_id, "--json").stdout)
    logs = cli(server, "jobs", "logs", job_id)
    return job, logs.stdout, logs.stderr


def open_folder(prefix: str) -> Path:
    """A new folder under /tmp that anyone may enter (pytest's tmp_path lies under a 0700
    folder, which nobody could not pass to reach a job's folder by its path)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o755)
    return folder


@pytest.fixture
def jailed():
    """A server whose local jobs run as nobody:nogroup with a few rlimits, started with a
    secret-looking variable in its environment, its data dir where nobody may pass."""
    base = open_folder("vt-jailed-")
    server = start_server(
        base,
        ["--jobs-run-as", "nobody:nogroup", "--jobs-max-open-files", "256",
         "--jobs-max-cpu-seconds", "600"],
        env={**os.environ, "DATABASE_PASSWORD": SECRET},
    )
    yield server
    stop_server(server)
    shutil.rmtree(base)


def test_a_job_cannot_read_a_file_only_root_can_read(jailed, server_factory, files):
    secret, public = files
    job, out, err = run_job(jailed, "cat", str(secret))
    assert (job["state"], job["exit_code"]) == ("FAILED", 1), job
    assert f"cat: {secret}: Permission denied" in err, err
    assert "root's secret" not in out + err
    # The same server's jobs read what anyone may: the refusal was the file's mode.
    job, out, _ = run_job(jailed, "cat", str(public))
    assert (job["state"], out) == ("SUCCEEDED", "for everyone\n"), job
    # Without run_as (the server's user, root here) the same job reads the secret: the refusal
    # above is run_as's doing.
    plain = server_factory()
    job, out, _ = run_job(plain, "cat", str(secret))
    assert (job["state"], out) == ("SUCCEEDED", "root's secret\n"), job


def test_a_job_cannot_read_the_servers_own_files(jailed):
    """The job store holds every tenant's jobs (their env included): the server's alone."""
    data = jailed.data_dir
    store = data / "state.redb"
    assert store.is_file()
    job, out, err = run_job(jailed, "sh", "-c", f"ls {data}; cat {store} | wc -c")
    assert "Permission denied" in err, (job, out, err)
    assert out.strip().splitlines()[-1] == "0", out
    assert store.stat().st_mode & 0o077 == 0
    assert data.stat().st_mode & 0o777 == 0o711


def test_a_job_runs_as_nobody_and_sees_none_of_the_servers_environment(jailed):
    job, log, _ = run_job(jailed, "sh", "-c", "id -un; id -gn; env")
    assert job["state"] == "SUCCEEDED", (job, log)
    lines = log.splitlines()
    assert lines[:2] == ["nobody", "nogroup"], log
    assert SECRET not in log and "DATABASE_PASSWORD" not in log, log
    names = {line.split("=", 1)[0] for line in lines[2:] if "=" in line}
    # The clean environment, plus what sh itself sets, plus the device variables that hide every
    # GPU from a job that asked for none (slowpath/src/gpu.rs).
    gpu_names = {"CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"}
    assert {"PATH", "HOME"} | gpu_names <= names <= {
        "PATH", "HOME", "PWD", "SHLVL", "_", "OLDPWD"} | gpu_names, names
    assert "CUDA_VISIBLE_DEVICES=" in lines and "NVIDIA_VISIBLE_DEVICES=void" in lines, log
    home = next(l.split("=", 1)[1] for l in lines if l.startswith("HOME="))
    assert home.endswith(f"/jobs/{job['id']}/work"), home


def test_a_job_has_its_own_folder_which_goes_with_the_job(jailed):
    import pwd
    nobody = pwd.getpwnam("nobody")
    job, out, err = run_job(jailed, "sh", "-c", "pwd; echo data > $HOME/result")
    assert job["state"] == "SUCCEEDED", (job, err)
    work = jailed.data_dir / "jobs" / job["id"] / "work"
    assert out == f"{work.absolute()}\n", out
    # the job's, and no one else's: 0700, nobody:nogroup; what it wrote is nobody's too
    st = work.stat()
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o700, nobody.pw_uid, nobody.pw_gid)
    assert (work / "result").stat().st_uid == nobody.pw_uid

    # Once a job expires (ttl 1 s) its record, logs and folder are deleted together.
    short = cli(jailed, "jobs", "submit", "--ttl", "1", "--", "sh", "-c",
                "echo data > $HOME/result").stdout.strip()
    cli(jailed, "jobs", "watch", short, ok=False)
    folder = jailed.data_dir / "jobs" / short
    still_there = poll(lambda: folder.exists(), lambda exists: not exists, timeout=60)
    assert not still_there, f"{folder} outlived its job"
    missing = cli(jailed, "jobs", "get", short, ok=False)
    assert "NotFound" in missing.stderr, missing


def test_the_configured_rlimits_are_in_force_in_the_job(jailed):
    job, log, _ = run_job(jailed, "cat", "/proc/self/limits")
    assert job["state"] == "SUCCEEDED", (job, log)
    limits = {}
    for line in log.splitlines()[1:]:
        name, soft, hard = line[:26].strip(), *line[26:].split()[:2]
        limits[name] = (soft, hard)
    assert limits["Max open files"] == ("256", "256"), log
    assert limits["Max cpu time"] == ("600", "605"), log
    # the default of jobs.local.max_processes
    assert limits["Max processes"] == ("4096", "4096"), log


def test_a_command_off_the_allow_list_is_refused_at_submit(server_factory, files):
    _, public = files
    srv = server_factory(extra_args=["--jobs-allowed-commands", "cat,env"])
    refused = cli(srv, "jobs", "submit", "--", "sh", "-c", "cat /etc/shadow", ok=False)
    assert refused.returncode != 0
    assert "InvalidArgument" in refused.stderr, refused.stderr
    assert "command 'sh' is not allowed" in refused.stderr, refused.stderr
    # Its full path is the same program, still refused; an allowed one runs.
    sh = shutil.which("sh")
    refused = cli(srv, "jobs", "submit", "--", sh, "-c", "true", ok=False)
    assert f"command '{sh}' is not allowed" in refused.stderr, refused.stderr
    job, out, _ = run_job(srv, "cat", str(public))
    assert (job["state"], out) == ("SUCCEEDED", "for everyone\n"), job
    # The dynamic loader's variables would run other code inside an allowed program.
    refused = cli(srv, "jobs", "submit", "--env", "LD_PRELOAD=/tmp/x.so", "--", "cat", str(public),
                  ok=False)
    assert "LD_PRELOAD is not allowed" in refused.stderr, refused.stderr


def test_an_unknown_user_or_root_stops_the_server_at_start_by_name(tmp_path):
    def serve(run_as: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [BIN, "serve", "--jobs-run-as", run_as, "--data-dir", str(tmp_path / "data"),
             "--model-repository", str(tmp_path), "--grpc-addr", f"127.0.0.1:{free_port()}",
             "--http-addr", f"127.0.0.1:{free_port()}"],
            capture_output=True, text=True, timeout=60,
        )

    out = serve("no-such-user-vt:nogroup")
    assert out.returncode != 0, out
    assert "jobs.local.run_as: no user named 'no-such-user-vt'" in out.stderr, out.stderr
    out = serve("root")
    assert out.returncode != 0, out
    assert "jobs.local.run_as" in out.stderr and "root's rights" in out.stderr, out.stderr
