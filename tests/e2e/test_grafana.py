"""deploy/grafana/veraltheim.json, the Grafana dashboard: its shape (a Prometheus datasource
variable used by every panel, the panels the README promises) and, against a real server with
simulated GPUs after an inference and a job, that every metric any of its PromQL expressions
reads is one that /metrics exports with at least one sample.
"""

from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import pytest

from _helpers import (
    REPO_ROOT,
    binary_path,
    distinct_rows,
    http_get,
    infer_fp32,
    metric_value,
    poll,
)

DASHBOARD = REPO_ROOT / "deploy/grafana/veraltheim.json"

# PromQL words that are not metric names: aggregations, functions are told apart by the `(`
# that follows them, these by what they are.
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "and", "or", "unless", "inf", "nan",
}
# Clauses whose parentheses hold label names, not metrics.
LABEL_LISTS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a `label_values(metric, label)` variable query)
    reads: identifiers that are not functions, keywords, label names, durations or variables."""
    m = re.fullmatch(r"\s*label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*).*\)\s*", expr)
    if m:
        return {m.group(1)}
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)        # strings (label values)
    text = re.sub(r"\{[^}]*\}", "", text)                  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)                 # range selectors, subqueries
    text = re.sub(r"\$\{?[a-zA-Z_][a-zA-Z0-9_]*\}?", "", text)  # dashboard variables
    text = LABEL_LISTS.sub("", text)
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        word = m.group(0)
        rest = text[m.end():].lstrip()
        before = text[: m.start()]
        if rest.startswith("("):  # a function or an aggregation
            continue
        if word.lower() in KEYWORDS:
            continue
        if re.search(r"[0-9.]$", before):  # the exponent of a number such as 1e6
            continue
        names.add(word)
    return names


def test_metric_names_are_pulled_out_of_promql():
    assert metric_names(
        'histogram_quantile(0.99, sum by (model, le) (rate(x_bucket{model=~"$model"}[$__rate_interval])))'
    ) == {"x_bucket"}
    assert metric_names(
        "sum by (model) (rate(a{m=\"x\"}[5m])) / sum without (gpu) (b) / 1e6 > 0"
    ) == {"a", "b"}
    assert metric_names("label_values(nv_inference_request_success, model)") == {
        "nv_inference_request_success"
    }
    assert metric_names("max(up offset 5m) and on (job) other") == {"up", "other"}


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(where, expression) for every PromQL expression: panel targets and variable queries."""
    found = []
    for p in panels(dashboard):
        for t in p.get("targets", []):
            found.append((f"panel '{p['title']}' {t['refId']}", t["expr"]))
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]
            found.append((f"variable '{v['name']}'", q["query"] if isinstance(q, dict) else q))
    return found


def test_the_dashboard_uses_a_prometheus_datasource_variable_and_has_the_promised_panels():
    d = load_dashboard()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    want = {"type": "prometheus", "uid": "${datasource}"}
    for p in panels(d):
        if p["type"] == "row":
            continue
        assert p["datasource"] == want, p["title"]
        assert p["targets"], f"panel '{p['title']}' has no query"
        for t in p["targets"]:
            assert t["datasource"] == want, p["title"]
    titles = {p["title"] for p in panels(d)}
    for promised in ("Request rate", "Latency quantiles", "Queue depth", "Batch size",
                     "Model memory", "GPU memory", "GPU utilisation", "Jobs by state", "Restarts"):
        assert promised in titles, f"no panel '{promised}'"
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "panel ids repeat"


def exported(text: str) -> set[str]:
    """The names of the samples in a /metrics answer (histogram series by their full name)."""
    names = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    return names


def test_every_metric_the_dashboard_reads_is_exported(server_factory, tmp_path):
    srv = server_factory(["--simulate-gpus", "1x16GiB", "--sample-interval-ms", "200"])
    client = srv.client()
    data = distinct_rows(2, 4, seed=5100)
    np.testing.assert_array_equal(infer_fp32(client, "identity", data), data)
    job = subprocess.run(
        [str(binary_path()), "jobs", "submit", "--server", srv.grpc_url, "--name", "grafana",
         "--", "true"],
        capture_output=True, text=True, timeout=60,
    )
    assert job.returncode == 0, job.stderr
    job_id = job.stdout.strip()

    def state() -> str:
        out = subprocess.run(
            [str(binary_path()), "jobs", "get", job_id, "--server", srv.grpc_url, "--json"],
            capture_output=True, text=True, timeout=60,
        )
        return json.loads(out.stdout)["state"]

    assert poll(state, lambda s: s == "SUCCEEDED", timeout=60) == "SUCCEEDED"

    status, text = http_get(f"{srv.http_url}/metrics")
    assert status == 200
    have = exported(text)
    used = {}
    for where, expr in expressions(load_dashboard()):
        for name in metric_names(expr):
            used.setdefault(name, where)
    assert len(used) >= 15, sorted(used)
    missing = {name: where for name, where in used.items() if name not in have}
    assert not missing, f"read by the dashboard, not exported by /metrics: {missing}"

    # The new families carry what the panels expect of them.
    assert metric_value(text, "veraltheim_jobs_entered_total", state="SUCCEEDED") == 1
    assert metric_value(text, "veraltheim_jobs_entered_total", state="QUEUED") == 1
    assert metric_value(text, "veraltheim_jobs", state="RUNNING") == 0
    assert metric_value(
        text, "veraltheim_inference_request_duration_seconds_count", model="identity"
    ) == 1
    assert metric_value(
        text, "veraltheim_inference_request_duration_seconds_bucket", model="identity", le="+Inf"
    ) == 1
    assert metric_value(text, "veraltheim_supervisor_restarts_total", path="API/grpc") == 0
    assert metric_value(text, "DCGM_FI_DEV_GPU_UTIL", gpu="0") is not None

    # A restart injected into the gRPC server shows in the restarts panel's counter.
    kill = subprocess.run(
        [str(binary_path()), "kill", "API/grpc", "--server", srv.grpc_url],
        capture_output=True, text=True, timeout=60,
    )
    assert kill.returncode == 0, kill.stderr

    def restarts() -> float | None:
        return metric_value(http_get(f"{srv.http_url}/metrics")[1],
                            "veraltheim_supervisor_restarts_total", path="API/grpc")

    assert poll(restarts, lambda n: n == 1, timeout=30) == 1
