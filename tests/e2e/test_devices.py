"""The device inventory from outside: `veraltheim gpus --json` and the DCGM-named metrics, with
simulated GPUs (this machine has no GPU)."""

import json
import os
import subprocess

from _helpers import http_get, metric_samples

BIN = os.environ["VERALTHEIM_BIN"]


def gpus(srv, *flags: str) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [BIN, "gpus", *flags, "--server", srv.grpc_url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return out


def test_gpus_json_and_dcgm_metrics_with_simulated_gpus(server_factory):
    srv = server_factory(["--simulate-gpus", "2x16GiB"])
    listed = json.loads(gpus(srv, "--json").stdout)
    assert [g["index"] for g in listed] == [0, 1]
    for g in listed:
        for key in ("index", "name", "uuid", "memory_total_bytes", "memory_used_bytes",
                    "utilization_percent", "simulated"):
            assert key in g, (key, g)
        assert g["simulated"] is True
        assert g["memory_total_bytes"] == 16 * 2**30
    # The table marks each of them too.
    rows = gpus(srv).stdout.splitlines()[1:]
    assert len(rows) == 2 and all("(simulated)" in row for row in rows), rows
    status, text = http_get(f"{srv.http_url}/metrics")
    assert status == 200
    free = metric_samples(text, "DCGM_FI_DEV_FB_FREE")
    assert sorted(labels["gpu"] for labels, _ in free) == ["0", "1"]
    assert all(labels["UUID"].startswith("GPU-sim-") for labels, _ in free)
    assert all(value == 16 * 1024 for _, value in free), free


def test_no_gpus_is_not_an_error(server):
    """Without --simulate-gpus the inventory is what NVML finds. On a machine without GPUs
    (this one) that is an empty list and the probe's reason, and not an error; where NVML
    finds GPUs, none of them is marked simulated."""
    listed = json.loads(gpus(server, "--json").stdout)
    table = gpus(server).stdout
    if not listed:
        assert table.startswith("no GPUs ("), table
        assert table.strip() != "no GPUs ()", "no reason given"
    else:
        assert all(g["simulated"] is False for g in listed), listed
        assert "(simulated)" not in table, table

