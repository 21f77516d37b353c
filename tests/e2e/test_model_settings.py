"""Model and server settings the README promises, end to end against the real binary:
`priority_aging_ms` (and its refusal), `max_concurrent_loads`, `load_timeout_seconds`, a failing
warm-up, `version_policy` (`latest`, `all`, `specific`), the `VERALTHEIM_*` environment between
the file and the flags, and the metrics' counts, quantiles, pending gauge and cache counters.

Order is made observable without sleeping: `cost` models with `busy: sleep` hold their single
instance while the test sets up the queue behind them, and the test waits for the pending
gauge (and the allocator's in-flight count) to say the stage is set before it goes on.

Most tests share one server (`settings`), each on its own repository models, so that the
counters each reads are its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import start_server, stop_server
from _helpers import (
    binary_path,
    fp32_input,
    http_get,
    infer_fp32,
    metric_value,
    poll,
    raises_status,
)

FP32_IN = [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [-1]}]


def params(**values) -> dict:
    return {k: {"string_value": str(v)} for k, v in values.items()}


def builtin_config(kind: str, max_batch_size: int = 8, **extra) -> dict:
    """A repository model backed by a built-in (`cost` sums rows; the others echo)."""
    parameters = extra.pop("parameters", {})
    return {
        "backend": "builtin",
        "max_batch_size": max_batch_size,
        "input": FP32_IN,
        "output": [
            {"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [1] if kind == "cost" else [-1]}
        ],
        "parameters": {**params(builtin=kind), **parameters},
        **extra,
    }


def add_model(repo: Path, name: str, config: dict, versions=(1,)) -> None:
    for v in versions:
        folder = repo / name / str(v)
        folder.mkdir(parents=True)
        (folder / "weights.bin").write_bytes(bytes(1000))
    (repo / name / "config.json").write_text(json.dumps(config))


def sleeping_cost(base_us: int, per_item_us: int, max_batch_size: int, **extra) -> dict:
    """`cost` that sleeps base_us + per_item_us x rows per batch: it holds its one instance
    while leaving the CPU to the rest of the test."""
    return builtin_config(
        "cost",
        max_batch_size,
        parameters=params(busy="sleep", base_us=base_us, per_item_us=per_item_us),
        **extra,
    )


def slow_warm_up(seconds: float) -> dict:
    """A model whose one warm-up request takes `seconds` (a load that takes that long)."""
    return sleeping_cost(
        int(seconds * 1e6), 0, 8,
        model_warmup=[{
            "name": "slowly", "batch_size": 1,
            "inputs": {"INPUT0": {"data_type": "TYPE_FP32", "dims": [4], "zero_data": True}},
        }],
    )


# Priority aging: one instance, batches that never take two of the queued requests (51 + 51 rows
# > 100), two levels with the low one as default.
PRIO_ROWS_BLOCKER, PRIO_ROWS = 100, 51


def prio_config(aging_ms: str | None = None) -> dict:
    extra = {} if aging_ms is None else {"priority_aging_ms": aging_ms}
    return builtin_config(
        "cost",
        100,
        parameters=params(busy="sleep", base_us=0, per_item_us=10_000, **extra),
        dynamic_batching={"priority_levels": 2, "default_priority_level": 2},
    )


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    base = tmp_path_factory.mktemp("settings-server")
    repo = base / "repo"
    for name, policy in [
        ("vlatest", {"latest": {"num_versions": 2}}),
        ("vall", {"all": {}}),
        ("vspecific", {"specific": {"versions": [1, 2]}}),
    ]:
        add_model(repo, name, builtin_config("identity", version_policy=policy), versions=(1, 2, 3))
    add_model(repo, "slow", slow_warm_up(2))
    add_model(repo, "quick", builtin_config("identity"))
    add_model(repo, "stray_warm_up", builtin_config("identity", model_warmup=[{
        "name": "stray", "batch_size": 1,
        "inputs": {"TEXT": {"data_type": "TYPE_FP32", "dims": [1], "zero_data": True}},
    }]))
    add_model(repo, "panicking_warm_up", builtin_config("fault", model_warmup=[{
        "name": "boom", "batch_size": 1,
        "inputs": {"INPUT0": {"data_type": "TYPE_FP32", "dims": [2], "zero_data": True}},
    }]))
    add_model(repo, "prio", prio_config())
    add_model(repo, "metered", builtin_config("identity"))
    add_model(repo, "timed", sleeping_cost(0, 2000, 16))
    add_model(repo, "held", sleeping_cost(600_000, 0, 1))
    add_model(repo, "cached", builtin_config("identity", response_cache={"enable": True}))
    loaded = ["identity", "cost", "vlatest", "vall", "vspecific", "metered", "timed", "held",
              "cached"]
    server = start_server(
        base,
        ["--max-concurrent-loads", "1", *[a for m in loaded for a in ("--load-model", m)]],
        models_dir=repo,
    )
    yield server
    stop_server(server)


# ---- helpers -----------------------------------------------------------------------------------


def metric(server, name: str, **labels: str) -> float:
    status, body = http_get(f"{server.http_url}/metrics")
    assert status == 200, f"/metrics answered {status}"
    value = metric_value(body, name, **labels)
    assert value is not None, f"no {name}{labels} in /metrics:\n{body[:3000]}"
    return value


def model_metric(server, name: str, model: str, **labels: str) -> float:
    return metric(server, name, model=model, version="1", **labels)


def wait_for(what: str, getter, done, timeout: float = 30):
    value = poll(getter, done, timeout=timeout, interval=0.01)
    assert done(value), f"waited {timeout} s for {what}; last: {value}"
    return value


def cli_json(server, *args: str):
    proc = subprocess.run(
        [str(binary_path()), *args, "--server", server.grpc_url, "--json"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, f"veraltheim {' '.join(args)}: {proc.stderr}"
    return json.loads(proc.stdout)


def holder(server, model: str) -> dict | None:
    """The allocator's entry for `model` (its reservation or charge), if it holds one."""
    for device in cli_json(server, "models", "memory"):
        for h in device["holders"]:
            if h["key"].split("#")[0] == model:
                return h
    return None


def index_entry(client, model: str):
    entries = [m for m in client.get_model_repository_index().models if m.name == model]
    assert len(entries) == 1, entries
    return entries[0]


class Answers:
    """Answers of async requests, in the order they came."""

    def __init__(self):
        self.lock = threading.Lock()
        self.order: list[tuple[str, object]] = []

    def callback(self, label: str):
        def record(result, error):
            with self.lock:
                self.order.append((label, error))
        return record

    def count(self) -> int:
        with self.lock:
            return len(self.order)

    def labels(self) -> list[str]:
        with self.lock:
            assert all(err is None for _, err in self.order), self.order
            return [label for label, _ in self.order]


# ---- version_policy -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, serving", [("vlatest", "3"), ("vall", "3"), ("vspecific", "2")]
)
def test_one_version_serves_the_highest_the_policy_selects(settings, model, serving):
    c = settings.client()
    assert c.is_model_ready(model) and c.is_model_ready(model, serving)
    for other in {"1", "2", "3"} - {serving}:
        assert not c.is_model_ready(model, other), f"{model} version {other} is ready"
        with raises_status("NOT_FOUND", f"no version '{other}'", f"serves version {serving}"):
            c.infer(model, [fp32_input(np.ones((1, 2)))], model_version=other)
    assert list(c.get_model_metadata(model).versions) == [serving]
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(infer_fp32(c, model, data, model_version=serving), data)
    entry = index_entry(c, model)
    assert (entry.version, entry.state) == (serving, "READY"), entry
    got = cli_json(settings, "models", "get", model)
    assert (got["version"], got["versions"]) == (serving, ["1", "2", "3"]), got


def test_the_version_policy_is_reported_as_configured(settings):
    c = settings.client()
    assert c.get_model_config("vlatest").config.version_policy.latest.num_versions == 2
    assert c.get_model_config("vall").config.version_policy.HasField("all")
    assert list(c.get_model_config("vspecific").config.version_policy.specific.versions) == [1, 2]


# ---- loads: max_concurrent_loads, load_timeout_seconds, warm-up ------------------------------------


def test_a_load_beyond_max_concurrent_loads_waits_for_the_slot(settings):
    """The server runs with --max-concurrent-loads 1; `slow`'s warm-up takes 2 s."""
    errors: dict[str, Exception | None] = {}

    def load(name: str) -> threading.Thread:
        def run():
            client = settings.client()
            try:
                client.load_model(name)
                errors[name] = None
            except Exception as err:  # reported below
                errors[name] = err
        thread = threading.Thread(target=run)
        thread.start()
        return thread

    c = settings.client()
    slow = load("slow")
    # `slow` holds the slot once it has a memory reservation: it is building.
    wait_for("slow to build", lambda: holder(settings, "slow"), lambda h: h is not None)
    quick = load("quick")
    wait_for("quick's load to arrive", lambda: index_entry(c, "quick").state, lambda s: s == "LOADING")
    # While `slow` still builds, `quick` waits for the slot: no reservation, nothing built.
    slow_holder, quick_holder = holder(settings, "slow"), holder(settings, "quick")
    assert slow_holder is not None and slow_holder["state"] == "LOADING", (
        f"slow finished before the check could be made: {slow_holder}"
    )
    assert quick_holder is None, f"quick loads beside slow: {quick_holder}"
    assert index_entry(c, "quick").state == "LOADING"
    slow.join(60)
    quick.join(60)
    assert errors == {"slow": None, "quick": None}, errors
    assert c.is_model_ready("slow") and c.is_model_ready("quick")


def test_a_load_past_load_timeout_seconds_fails_and_keeps_its_slot_until_the_build_ends(
    server_factory, tmp_path
):
    repo = tmp_path / "repo"
    add_model(repo, "slow", slow_warm_up(4))
    add_model(repo, "quick", builtin_config("identity"))
    srv = server_factory(
        ["--load-timeout-seconds", "1", "--max-concurrent-loads", "1", "--load-model", "identity"],
        models_dir=repo,
    )
    c = srv.client()
    with raises_status("DEADLINE_EXCEEDED", "'slow' did not load within 1s",
                       "models.load_timeout_seconds"):
        c.load_model("slow")
    assert not c.is_model_ready("slow")
    entry = index_entry(c, "slow")
    assert entry.state == "UNAVAILABLE" and "did not load within 1s" in entry.reason, entry
    with raises_status("UNAVAILABLE", "slow"):
        c.infer("slow", [fp32_input(np.ones((1, 4)))])
    # The build cannot be interrupted: it keeps its reservation and the only load slot, so the
    # next load waits its second for the slot and is refused.
    assert holder(srv, "slow") is not None
    with raises_status("RESOURCE_EXHAUSTED", "'quick' waited 1s for a load slot",
                       "models.max_concurrent_loads"):
        c.load_model("quick")
    # Once the build ends its model is dropped, not half-loaded, and the slot is free.
    wait_for("slow's build to end", lambda: holder(srv, "slow"), lambda h: h is None)
    assert not c.is_model_ready("slow") and index_entry(c, "slow").state == "UNAVAILABLE"
    c.load_model("quick")
    assert c.is_model_ready("quick")


@pytest.mark.parametrize(
    "model, code, fragments",
    [
        # The warm-up does not fit the model: the caller's configuration, named.
        ("stray_warm_up", "INVALID_ARGUMENT", ["model_warmup 'stray'", "no input 'TEXT'"]),
        # The model fails while running it (the `fault` backend panics): the server's side.
        ("panicking_warm_up", "INTERNAL", ["'panicking_warm_up' failed to load", "panicked"]),
    ],
)
def test_a_failing_warm_up_fails_the_load_and_leaves_nothing_loaded(
    settings, model, code, fragments
):
    c = settings.client()
    with raises_status(code, *fragments):
        c.load_model(model)
    assert not c.is_model_ready(model)
    entry = index_entry(c, model)
    assert entry.state == "UNAVAILABLE" and fragments[-1] in entry.reason, entry
    with raises_status("UNAVAILABLE", model):
        c.infer(model, [fp32_input(np.ones((1, 2)))])
    assert holder(settings, model) is None


def test_a_reload_whose_warm_up_fails_keeps_the_old_version_serving(settings):
    c = settings.client()
    before = c.get_model_config("cost").config
    stray = {"model_warmup": [{"name": "stray", "batch_size": 1, "inputs": {
        "TEXT": {"data_type": "TYPE_FP32", "dims": [1], "zero_data": True}}}]}
    with raises_status("INVALID_ARGUMENT", "model_warmup 'stray'"):
        c.load_model("cost", config=json.dumps(stray))
    assert c.is_model_ready("cost")
    assert c.get_model_config("cost").config == before
    np.testing.assert_array_equal(
        infer_fp32(c, "cost", np.array([[1, 2], [3, 4]], np.float32)), [[3], [7]]
    )


# ---- priority_aging_ms -------------------------------------------------------------------------


def served_order(server, aging_ms: str) -> list[str]:
    """Loads `prio` with `priority_aging_ms` = aging_ms, then: a blocker A (level 1) runs; a
    low-priority L (level 2) queues behind it; then two high-priority H1, H2 (level 1), each
    sent once the one before it is queued. Returns the order the four were answered in."""
    c = server.client()
    c.load_model("prio", config=json.dumps(prio_config(aging_ms)))
    answers = Answers()

    def send(label: str, rows: int, priority: int) -> None:
        c.async_infer("prio", [fp32_input(np.ones((rows, 1)))], answers.callback(label),
                      priority=priority)

    def pending() -> float:
        return model_metric(server, "nv_inference_pending_request_count", "prio")

    def in_flight() -> int:
        h = holder(server, "prio")
        return h["in_flight"] if h else 0

    send("A", PRIO_ROWS_BLOCKER, 1)
    # A runs once it holds the model and the queue is empty again (it sleeps for 1 s).
    wait_for("A to run", lambda: (in_flight(), pending()), lambda v: v == (1, 0))
    send("L", PRIO_ROWS, 2)
    wait_for("L to queue", pending, lambda v: v == 1)
    send("H1", PRIO_ROWS, 1)
    wait_for("H1 to queue", pending, lambda v: v == 2)
    send("H2", PRIO_ROWS, 1)
    # All three wait while A still runs (nothing answered yet, read after the gauge).
    wait_for("the queue behind A", lambda: (pending(), answers.count()), lambda v: v == (3, 0))
    wait_for("all answers", answers.count, lambda n: n == 4, timeout=60)
    return answers.labels()


def test_priority_aging_serves_an_aged_low_priority_request_before_newer_high_ones(settings):
    # Aged by 1 ms, the low-priority request has risen to level 1 by the time A ends, where
    # it arrived before H1 and H2.
    assert served_order(settings, "1") == ["A", "L", "H1", "H2"]
    # Without aging within the test (10 minutes a level), level 1 goes first.
    assert served_order(settings, "600000") == ["A", "H1", "H2", "L"]


def test_priority_aging_ms_that_is_not_a_number_is_refused_by_name(settings):
    c = settings.client()
    with raises_status("INVALID_ARGUMENT", "priority_aging_ms", "'soon'"):
        c.load_model("prio", config=json.dumps(prio_config("soon")))
    with raises_status("INVALID_ARGUMENT", "priority_aging_ms", "'-5'"):
        c.load_model("prio", config=json.dumps(prio_config("-5")))


# ---- metrics --------------------------------------------------------------------------------------


def test_metrics_count_exactly_the_requests_rows_and_batches(settings):
    c = settings.client()
    names = ["nv_inference_request_success", "nv_inference_request_failure",
             "nv_inference_count", "nv_inference_exec_count"]

    def counts():
        return [model_metric(settings, n, "metered") for n in names]

    before = counts()
    for i in range(5):
        data = np.full((3, 2), i, np.float32)
        np.testing.assert_array_equal(infer_fp32(c, "metered", data), data)
    after = wait_for("5 successes", counts, lambda v: v[0] >= before[0] + 5)
    # One at a time: each request is its own batch of 3 rows.
    assert [a - b for a, b in zip(after, before)] == [5, 0, 15, 5], (before, after)


def test_metrics_quantiles_are_those_of_the_requests_served(settings):
    """`timed` sleeps 2 ms per row. Ten requests of 1..10 rows; the compute and queue times each
    answer reports (`infer --json`) are what the summaries are built from, so each quantile is
    the matching order statistic, within the histogram's 1% precision."""
    summaries = ["nv_inference_request_summary_us", "nv_inference_queue_summary_us",
                 "nv_inference_compute_infer_summary_us"]
    quantiles = ["0.5", "0.9", "0.99", "0.999"]

    def read():
        return {
            s: [model_metric(settings, s, "timed", quantile=q) for q in quantiles]
            for s in summaries
        }

    assert all(v == [0, 0, 0, 0] for v in read().values()), "nothing served yet"
    compute, queued = [], []
    for rows in range(1, 11):
        got = cli_json(settings, "infer", "timed", "-i", json.dumps([[1.0]] * rows))
        assert got["outputs"][0]["data"] == [[1.0]] * rows and got["batch_size"] == rows, got
        compute.append(got["timing"]["compute_us"])
        queued.append(got["timing"]["queue_us"])
        # A sleep of 2 ms per row: compute is at least that.
        assert compute[-1] >= 2000 * rows, got
    values = wait_for("the tenth request", read, lambda v: v[summaries[2]][-1] > 0)
    # Order statistics of 10 values: p50 the 5th, p90 the 9th, p99 and p99.9 the 10th.
    ranks = [5, 9, 10, 10]
    for summary, served in [(summaries[2], compute), (summaries[1], queued)]:
        ordered = sorted(max(v, 1) for v in served)
        for q, rank, got in zip(quantiles, ranks, values[summary]):
            want = ordered[rank - 1]
            assert want <= got <= want * 1.01 + 1, (
                f"{summary} quantile {q} is {got}; the served values were {ordered}"
            )
    total = values[summaries[0]]
    assert total == sorted(total), total
    # Each request's end-to-end time holds its compute time, so every quantile does too.
    assert all(t >= c for t, c in zip(total, values[summaries[2]])), values


def test_pending_counts_the_requests_waiting_behind_a_busy_instance(settings):
    """`held` runs one request at a time (max_batch_size 1, one instance) for 0.6 s each."""
    c = settings.client()
    answers = Answers()

    def pending() -> float:
        return model_metric(settings, "nv_inference_pending_request_count", "held")

    assert pending() == 0
    for label in "abc":
        c.async_infer("held", [fp32_input(np.ones((1, 2)))], answers.callback(label))
    # While the first runs and none is answered, the other two wait: exactly 2 (the running
    # one is not pending). The answer count is read after the gauge.
    wait_for("two requests waiting", lambda: (pending(), answers.count()), lambda v: v == (2, 0))
    wait_for("all answers", answers.count, lambda n: n == 3, timeout=60)
    assert sorted(answers.labels()) == ["a", "b", "c"]
    wait_for("an empty queue", pending, lambda v: v == 0)


def test_cache_counters_count_hits_misses_and_entries(settings):
    c = settings.client()
    names = ["veraltheim_response_cache_hits_total", "veraltheim_response_cache_misses_total",
             "veraltheim_response_cache_entries"]

    def cache():
        return [metric(settings, n) for n in names]

    def model_counts():
        return [model_metric(settings, n, "cached")
                for n in ("nv_inference_request_success", "nv_inference_count")]

    cache0, model0 = cache(), model_counts()
    x = np.array([[1, 2], [3, 4]], np.float32)
    y = np.array([[5, 6], [7, 8]], np.float32)
    np.testing.assert_array_equal(infer_fp32(c, "cached", x), x)
    after_miss = wait_for("a miss", cache, lambda v: v[1] >= cache0[1] + 1)
    assert [a - b for a, b in zip(after_miss, cache0)] == [0, 1, 1], (cache0, after_miss)
    # The same request again: answered from the cache.
    np.testing.assert_array_equal(infer_fp32(c, "cached", x), x)
    after_hit = wait_for("a hit", cache, lambda v: v[0] >= cache0[0] + 1)
    assert [a - b for a, b in zip(after_hit, cache0)] == [1, 1, 1], (cache0, after_hit)
    np.testing.assert_array_equal(infer_fp32(c, "cached", y), y)
    after_other = wait_for("another miss", cache, lambda v: v[1] >= cache0[1] + 2)
    assert [a - b for a, b in zip(after_other, cache0)] == [1, 2, 2], (cache0, after_other)
    # Three successes, but the hit never reached the model: 2 x 2 rows computed.
    model1 = wait_for("3 successes", model_counts, lambda v: v[0] >= model0[0] + 3)
    assert [a - b for a, b in zip(model1, model0)] == [3, 4], (model0, model1)


# ---- configuration: file < environment < flags ---------------------------------------------


def test_the_environment_beats_the_file_and_a_flag_beats_the_environment(server_factory, tmp_path):
    config = tmp_path / "veraltheim.toml"
    config.write_text(
        "[limits]\nmax_queue_delay_us = 1234\nmax_builtin_cost_us = 4000\nmax_warmup_count = 3\n"
    )
    env = {**os.environ, "VERALTHEIM_MAX_BUILTIN_COST_US": "5000",
           "VERALTHEIM_MAX_WARMUP_COUNT": "5"}
    srv = server_factory(
        ["--config", str(config), "--max-warmup-count", "7", "--load-model", "identity"], env=env
    )
    c = srv.client()

    def load_cost(**override) -> None:
        c.load_model("cost", config=json.dumps(override))

    def warm_up(count: int) -> list:
        return [{"name": "w", "count": count, "batch_size": 1, "inputs": {
            "INPUT0": {"data_type": "TYPE_FP32", "dims": [1], "zero_data": True}}}]

    # Only the file sets max_queue_delay_us: its value is in force.
    with raises_status("INVALID_ARGUMENT", "limits.max_queue_delay_us (1234)"):
        load_cost(dynamic_batching={"max_queue_delay_microseconds": 2000})
    # The file and the environment set max_builtin_cost_us: the environment's 5000 wins.
    with raises_status("INVALID_ARGUMENT", "limits.max_builtin_cost_us (5000)"):
        load_cost(parameters=params(base_us=5500, per_item_us=0))
    load_cost(parameters=params(base_us=4500, per_item_us=0))
    assert c.is_model_ready("cost")
    # File, environment and flag set max_warmup_count: the flag's 7 wins.
    with raises_status("INVALID_ARGUMENT", "limits.max_warmup_count (7)"):
        load_cost(model_warmup=warm_up(8))
    load_cost(model_warmup=warm_up(7))
    assert c.is_model_ready("cost")
