"""The `veraltheim` command-line client against a real server, as the README shows it:
`infer` (table and `--json`), `health`, `models load/get/stats/unload`, `jobs cancel`,
`jobs logs --follow`, `config default` and `gpus --watch` (simulated GPUs).

One server for the module (its own, so that loading and unloading `cost` here disturbs no
other module); each test leaves the models as it found them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import tomllib

import pytest

from conftest import free_port, start_server, stop_server
from _helpers import REPO_ROOT, binary_path, poll

BIN = str(binary_path())
GIB = 1 << 30


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = start_server(
        tmp_path_factory.mktemp("cli-server"),
        ["--simulate-gpus", "2x80GiB", "--sample-interval-ms", "200"],
    )
    yield server
    stop_server(server)


def with_server(server, args: tuple[str, ...]) -> list[str]:
    """`args` with `--server`, placed before a `--` (what follows it is a job's command)."""
    args = list(args)
    at = args.index("--") if "--" in args else len(args)
    return [BIN, *args[:at], "--server", server.grpc_url, *args[at:]]


def cli(server, *args: str, ok: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        with_server(server, args), capture_output=True, text=True, timeout=timeout
    )
    if ok:
        assert proc.returncode == 0, (
            f"veraltheim {' '.join(args)} exited {proc.returncode}: {proc.stderr}"
        )
    return proc


def cli_json(server, *args: str):
    return json.loads(cli(server, *args, "--json").stdout)


def read_lines(proc: subprocess.Popen, n: int, timeout: float = 30) -> list[str]:
    """The next `n` lines of a running command's stdout, waiting at most `timeout` seconds."""
    got: list[str] = []
    reader = threading.Thread(
        target=lambda: got.extend(proc.stdout.readline() for _ in range(n)), daemon=True
    )
    reader.start()
    reader.join(timeout)
    assert not reader.is_alive(), f"{proc.args}: {len(got)} of {n} lines after {timeout} s"
    return got


# ---- infer -----------------------------------------------------------------------------


def test_infer_prints_each_output_its_values_and_the_timing(srv):
    out = cli(srv, "infer", "identity", "-i", "[[1, 2, 3, 4]]").stdout.splitlines()
    assert out[0] == "OUTPUT0 FP32 [1, 4]", out
    assert json.loads(out[1]) == [[1.0, 2.0, 3.0, 4.0]], out
    assert re.fullmatch(r"batch 1  queue \d+ µs  compute \d+ µs  total \d+ µs", out[2]), out
    assert len(out) == 3, out
    # NAME=JSON names the input; the nesting gives the shape.
    out = cli(srv, "infer", "cost", "-i", "INPUT0=[[1,2],[3,4]]").stdout.splitlines()
    assert out[0] == "OUTPUT0 FP32 [2, 1]", out
    assert json.loads(out[1]) == [[3.0], [7.0]], out
    assert out[2].startswith("batch 2  "), out


def test_infer_json_gives_outputs_batch_and_real_timings(srv):
    got = cli_json(srv, "infer", "cost", "-i", "INPUT0=[[1,2],[3,4]]")
    assert got["model"] == "cost" and got["version"] == "1", got
    assert got["outputs"] == [
        {"name": "OUTPUT0", "datatype": "FP32", "shape": [2, 1], "data": [[3.0], [7.0]]}
    ], got
    assert got["batch_size"] == 2, got
    timing = got["timing"]
    # `cost` busy-computes base_us + per_item_us x rows (500 + 50 x 2 by default): the compute
    # time reported is at least that, and queue and compute lie within the total.
    assert timing["compute_us"] >= 600, timing
    assert timing["queue_us"] + timing["compute_us"] <= timing["total_us"], timing


def test_infer_refusals_exit_non_zero_naming_the_problem(srv):
    proc = cli(srv, "infer", "no_such_model", "-i", "[[1]]", ok=False)
    assert proc.returncode == 1 and proc.stdout == "", proc
    assert "NotFound" in proc.stderr and "no_such_model" in proc.stderr, proc.stderr
    proc = cli(srv, "infer", "identity", "-i", "[[1, 2], [3]]", ok=False)
    assert proc.returncode == 1, proc
    assert "ragged array" in proc.stderr, proc.stderr


# ---- health ----------------------------------------------------------------------------


def test_health_exits_zero_when_live_and_ready_and_one_when_unreachable(srv):
    version = subprocess.run(
        [BIN, "--version"], capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    proc = cli(srv, "health")
    assert proc.stdout.strip() == f"live: true  ready: true  version: {version}", proc.stdout
    assert cli_json(srv, "health") == {"live": True, "ready": True, "version": version}
    nobody = f"127.0.0.1:{free_port()}"
    proc = subprocess.run(
        [BIN, "health", "--server", nobody], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1, proc
    assert "cannot reach the coordinator" in proc.stderr and nobody in proc.stderr, proc.stderr


def test_health_exits_one_while_the_server_is_live_but_not_ready(tmp_path):
    """Ready comes once the start-up loads are done; here one model's warm-up takes 4 s."""
    repo = tmp_path / "models"
    (repo / "slow" / "1").mkdir(parents=True)
    (repo / "slow" / "config.json").write_text(json.dumps({
        "backend": "builtin", "max_batch_size": 8,
        "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [1]}],
        "parameters": {k: {"string_value": v} for k, v in {
            "builtin": "cost", "busy": "sleep", "base_us": "4000000", "per_item_us": "0"}.items()},
        "model_warmup": [{"name": "slowly", "batch_size": 1, "inputs": {
            "INPUT0": {"data_type": "TYPE_FP32", "dims": [1], "zero_data": True}}}],
    }))
    address = f"127.0.0.1:{free_port()}"
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen(
        [BIN, "serve", "--grpc-addr", address, "--http-addr", f"127.0.0.1:{free_port()}",
         "--data-dir", str(tmp_path / "data"), "--model-repository", str(repo),
         "--load-model", "slow"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
    )
    log.close()

    def health() -> subprocess.CompletedProcess:
        return subprocess.run([BIN, "health", "--server", address, "--json"],
                              capture_output=True, text=True, timeout=60)

    try:
        # Until the server listens, health cannot reach it; then it is live, not yet ready.
        first = poll(health, lambda p: "cannot reach" not in p.stderr, timeout=60, interval=0.05)
        assert "cannot reach" not in first.stderr, (tmp_path / "server.log").read_text()
        assert first.returncode == 1, first
        assert json.loads(first.stdout)["live"] is True, first
        assert json.loads(first.stdout)["ready"] is False, (
            f"ready before the 4 s warm-up ended: {first}"
        )
        ready = poll(health, lambda p: p.returncode == 0, timeout=60, interval=0.1)
        assert ready.returncode == 0 and json.loads(ready.stdout)["ready"] is True, ready
    finally:
        server.terminate()
        server.wait(timeout=30)


# ---- models load / get / stats / unload -----------------------------------------------------


def row(table: str, name: str) -> list[str]:
    """The cells of `name`'s row in a `models` table (the REASON column may hold spaces)."""
    for line in table.splitlines()[1:]:
        cells = line.split()
        if cells and cells[0] == name:
            return cells
    raise AssertionError(f"no row for {name} in:\n{table}")


def test_models_load_get_stats_and_unload(srv, tmp_path):
    override = {"max_batch_size": 8, "parameters": {"base_us": {"string_value": "2000"}}}
    loaded = cli(srv, "models", "load", "cost", "--config", json.dumps(override)).stdout
    assert loaded.splitlines()[0].split()[:6] == [
        "NAME", "VERSION", "STATE", "BACKEND", "MAX_BATCH", "DEVICE"
    ], loaded
    assert row(loaded, "cost")[:5] == ["cost", "1", "READY", "builtin", "8"], loaded

    got = cli_json(srv, "models", "get", "cost")
    assert got["state"] == "READY" and got["max_batch_size"] == 8, got
    assert got["config"]["max_batch_size"] == 8, got
    assert got["config"]["parameters"]["base_us"]["string_value"] == "2000", got
    assert got["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, -1]}], got
    # Without --json: the row, then the configuration as JSON.
    text = cli(srv, "models", "get", "cost").stdout
    assert row(text, "cost")[2] == "READY", text
    assert json.loads(text[text.index("{"):]) == got["config"], text

    # Statistics count from the load: three requests of two rows, one batch each.
    for i in range(3):
        cli(srv, "infer", "cost", "-i", f"[[{i}, 1], [2, 3]]")
    stats = cli_json(srv, "models", "stats", "cost")
    assert len(stats) == 1 and stats[0]["name"] == "cost", stats
    s = stats[0]
    assert (s["success"], s["failure"], s["inference_count"], s["execution_count"]) == (
        3, 0, 6, 3,
    ), s
    assert s["pending"] == 0 and s["last_inference_ms"] > 0, s
    # Compute is at least the 2000 µs base the override set.
    assert s["avg_compute_us"] >= 2000 and 0 < s["p50_us"] <= s["p99_us"], s
    table = cli(srv, "models", "stats").stdout
    assert row(table, "cost")[1:5] == ["3", "0", "6", "3"], table
    assert row(table, "identity"), table

    # @FILE reads the override from a file.
    path = tmp_path / "override.json"
    path.write_text(json.dumps({"max_batch_size": 4}))
    assert row(cli(srv, "models", "load", "cost", "--config", f"@{path}").stdout, "cost")[4] == "4"
    bad = cli(srv, "models", "load", "cost", "--config", '{"max_batch_sise": 8}', ok=False)
    assert bad.returncode == 1 and "InvalidArgument" in bad.stderr, bad
    assert "max_batch_sise" in bad.stderr, bad.stderr

    unloaded = cli(srv, "models", "unload", "cost").stdout
    cells = row(unloaded, "cost")
    assert cells[2] == "NOT_LOADED" and cells[-1] == "unloaded", unloaded
    refused = cli(srv, "infer", "cost", "-i", "[[1]]", ok=False)
    assert refused.returncode == 1 and "Unavailable" in refused.stderr, refused.stderr
    assert row(cli(srv, "models").stdout, "cost")[2] == "NOT_LOADED"

    # A plain load brings back the built-in configuration.
    assert row(cli(srv, "models", "load", "cost").stdout, "cost")[:5] == [
        "cost", "1", "READY", "builtin", "64"
    ]
    assert cli_json(srv, "infer", "cost", "-i", "[[5]]")["outputs"][0]["data"] == [[5.0]]


# ---- jobs cancel / logs --follow --------------------------------------------------------------


def job_state(server, job_id: str) -> str:
    return cli_json(server, "jobs", "get", job_id)["state"]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_jobs_cancel_stops_a_running_job_and_prints_its_end(srv, tmp_path):
    pid_file = tmp_path / "pid"
    job = cli(
        srv, "jobs", "submit", "--name", "sleeper", "--",
        "sh", "-c", f"echo $$ > {pid_file}.tmp && mv {pid_file}.tmp {pid_file} && exec sleep 600",
    ).stdout.strip()
    poll(lambda: pid_file.exists(), bool, timeout=60)
    assert pid_file.exists(), f"job {job} never started: {job_state(srv, job)}"
    pid = int(pid_file.read_text())
    assert job_state(srv, job) == "RUNNING"

    cancelled = cli_json(srv, "jobs", "cancel", job)
    assert [(j["id"], j["state"]) for j in cancelled] == [(job, "CANCELLED")], cancelled
    assert cancelled[0]["reason"] == "cancelled", cancelled
    assert not pid_alive(pid), f"the job's process {pid} still runs after the cancel"
    assert job_state(srv, job) == "CANCELLED"
    # A job that has ended cannot be cancelled again.
    again = cli(srv, "jobs", "cancel", job, ok=False)
    assert again.returncode == 1 and "FailedPrecondition" in again.stderr, again
    assert "CANCELLED" in again.stderr, again.stderr
    # The table form, for a job cancelled whether or not it has started yet.
    other = cli(srv, "jobs", "submit", "--", "sleep", "600").stdout.strip()
    assert row(cli(srv, "jobs", "cancel", other).stdout, other)[3] == "CANCELLED"
    missing = cli(srv, "jobs", "cancel", "00000000000000000000", ok=False)
    assert missing.returncode == 1 and "NotFound" in missing.stderr, missing


def test_jobs_logs_follow_streams_while_running_and_ends_with_the_job(srv, tmp_path):
    go = tmp_path / "go"
    script = (
        f"echo one; echo err-one >&2; while [ ! -e {go} ]; do sleep 0.05; done; "
        "echo two; echo err-two >&2; echo three"
    )
    job = cli(srv, "jobs", "submit", "--name", "talker", "--", "sh", "-c", script).stdout.strip()
    follow = subprocess.Popen(
        with_server(srv, ("jobs", "logs", job, "--follow")),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        # The first line arrives while the job still waits for `go`: the log is followed live.
        assert read_lines(follow, 1) == ["one\n"]
        assert job_state(srv, job) == "RUNNING"
        go.touch()
        out, err = follow.communicate(timeout=60)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    assert follow.returncode == 0, err
    assert out == "two\nthree\n", out
    assert err == "err-one\nerr-two\n", err
    assert job_state(srv, job) == "SUCCEEDED"
    # Without --follow, the whole log of the finished job at once.
    done = cli(srv, "jobs", "logs", job)
    assert (done.stdout, done.stderr) == ("one\ntwo\nthree\n", "err-one\nerr-two\n"), done


# ---- config default -----------------------------------------------------------------------


def test_config_default_prints_the_default_file_each_key_with_its_flag(srv):
    printed = subprocess.run(
        [BIN, "config", "default"], capture_output=True, text=True, check=True
    ).stdout
    default_toml = REPO_ROOT / "coordinator/src/default.toml"
    assert tomllib.loads(printed) == tomllib.loads(default_toml.read_text())
    help_text = subprocess.run(
        [BIN, "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    # Every key, set or shown commented out (unset by default), has its flag named at the end
    # of its description; `serve --help` lists that flag with its VERALTHEIM_ variable.
    # ([[jobs.queues]] entries are fields of one list-valued setting, --job-queues.)
    section, comment, flags = "", [], []
    for line in printed.splitlines():
        if line.startswith("["):
            section, comment = line, []
            continue
        key = re.fullmatch(r"(?:# )?([a-z_]+) = .*", line)
        if key and section != "[[jobs.queues]]":
            flag = re.search(r"\((--[a-z-]+)\)$", comment[-1] if comment else "")
            assert flag, f"{section} {key.group(1)} has no (--flag) in its description"
            flags.append(flag.group(1))
            comment = []
        elif line.startswith("#"):
            comment.append(line)
        else:
            comment = []
    assert len(flags) > 50 and "--grpc-addr" in flags, flags
    for flag in flags:
        env = "VERALTHEIM_" + flag[2:].upper().replace("-", "_")
        assert re.search(rf"^\s+{flag} .*\n.*\[env: {env}\]", help_text, re.M), (
            f"serve --help lacks {flag} with [env: {env}]"
        )


# ---- gpus --watch ---------------------------------------------------------------------------


def assert_two_simulated_gpus(snapshot: list[dict]) -> None:
    assert [g["index"] for g in snapshot] == [0, 1], snapshot
    for g in snapshot:
        assert g["simulated"] is True and g["lost"] is False, g
        assert g["memory_total_bytes"] == 80 * GIB, g
        assert g["memory_used_bytes"] + g["memory_free_bytes"] == g["memory_total_bytes"], g


def test_gpus_watch_prints_a_snapshot_per_interval_until_stopped(srv):
    watch = subprocess.Popen(
        with_server(srv, ("gpus", "--watch", "--json")),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        snapshots = [json.loads(line) for line in read_lines(watch, 2)]
        for s in snapshots:
            assert_two_simulated_gpus(s)
        # Stopping the reader (a closed pipe, as `| head -n 2` does) ends the watch quietly.
        watch.stdout.close()
        code = watch.wait(timeout=30)
        err = watch.stderr.read()
        assert code == 0, err
        assert err == "", err
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    # --count stops it by itself; without --json, one table per snapshot.
    counted = cli(srv, "gpus", "--watch", "--count", "2", "--json").stdout.splitlines()
    assert len(counted) == 2, counted
    for line in counted:
        assert_two_simulated_gpus(json.loads(line))
    table = cli(srv, "gpus").stdout.splitlines()
    assert table[0].split()[:2] == ["GPU", "NAME"], table
    assert len(table) == 3 and all("(simulated)" in t and "80.0 GiB" in t for t in table[1:]), table
