"""Supervision seen from outside: a panicking backend's worker is restarted by the tree, the
restart shows in `veraltheim status --json`, and the CLI's kill/events commands work."""

import json
import os
import subprocess
import time

import numpy as np

from _helpers import fp32_input, raises_status

BIN = os.environ["VERALTHEIM_BIN"]


def cli(server, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    host_port = server.grpc_url
    return subprocess.run(
        [BIN, *args, "--server", host_port],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def find(node: dict, name_prefix: str) -> dict | None:
    if node["name"].startswith(name_prefix):
        return node
    for child in node["children"]:
        hit = find(child, name_prefix)
        if hit is not None:
            return hit
    return None


def status(server) -> dict:
    out = cli(server, "status", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["root"]


def test_backend_panic_restarts_the_worker_and_status_counts_it(own_server):
    client = own_server.client()
    before = find(status(own_server), "model:fault")
    assert before is not None, "the fault model has no node in the tree"
    for _ in range(2):
        with raises_status("INTERNAL"):
            client.infer("fault", [fp32_input(np.ones((1, 2), np.float32))])
    # each restart waits out a short backoff: poll until both have happened
    deadline = time.monotonic() + 10
    while True:
        batcher = find(status(own_server), "model:fault")["children"][0]
        if batcher["restarts"] >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert batcher["name"] == "batcher"
    assert batcher["restarts"] == 2, batcher
    assert "injected panic" in (batcher["last_failure"] or ""), batcher
    # the other models' workers were not touched
    identity = find(status(own_server), "model:identity")["children"][0]
    assert identity["restarts"] == 0 and identity["state"] == "running"


def test_kill_restarts_the_child_and_events_report_it(own_server):
    events = subprocess.Popen(
        [BIN, "events", "--topic", "supervisor.>", "--count", "1", "--json",
         "--server", own_server.grpc_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # give the watcher time to subscribe before the kill
        time.sleep(0.5)
        out = cli(own_server, "kill", "MessageBusSupervisor/QueueManager")
        assert out.returncode == 0, out.stderr
        line, err = events.communicate(timeout=20)
    finally:
        events.kill()
    event = json.loads(line.splitlines()[0])
    assert event["topic"].startswith("supervisor."), event
    assert event["attributes"]["child"] == "QueueManager", event
    # the restart waits out a short backoff: poll for it
    deadline = time.monotonic() + 10
    while True:
        node = find(status(own_server), "QueueManager")
        if (node["restarts"] >= 1 and node["state"] == "running") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert node["restarts"] == 1 and node["last_failure"] == "killed", node
    assert node["state"] == "running", node
    assert own_server.client().is_server_ready()


def test_kill_of_an_unknown_path_is_not_found(own_server):
    out = cli(own_server, "kill", "Nope/Nothing")
    assert out.returncode != 0
    assert "NotFound" in out.stderr, out.stderr
