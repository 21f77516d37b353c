"""ModelStatistics and the Prometheus /metrics endpoint (shared server: every check
compares before/after deltas; pytest runs these tests one at a time)."""

import time

import numpy as np

from _helpers import (
    distinct_rows,
    fp32_input,
    http_get,
    infer_fp32,
    metric_value,
    poll,
    raises_status,
)


def model_stats(client, model):
    resp = client.get_inference_statistics(model)
    stats = [s for s in resp.model_stats if s.name == model]
    assert len(stats) >= 1, f"no statistics for {model}: {resp}"
    return stats[0]


def test_statistics_count_requests_items_and_executions(grpc_client):
    before = model_stats(grpc_client, "identity")
    n_requests, rows = 7, 3
    for i in range(n_requests):
        data = distinct_rows(rows, 4, seed=800 + i)
        np.testing.assert_array_equal(infer_fp32(grpc_client, "identity", data), data)

    base = before.inference_stats.success.count
    after = poll(
        lambda: model_stats(grpc_client, "identity"),
        lambda s: s.inference_stats.success.count - base >= n_requests,
    )
    d_success = after.inference_stats.success.count - base
    d_items = after.inference_count - before.inference_count
    d_exec = after.execution_count - before.execution_count
    assert d_success == n_requests, f"success.count grew by {d_success}, sent {n_requests}"
    # Triton: inference_count counts batch items (rows), execution_count batches run.
    assert d_items == n_requests * rows, f"inference_count grew by {d_items}"
    assert 1 <= d_exec <= n_requests, f"execution_count grew by {d_exec}"
    assert after.inference_stats.success.ns > before.inference_stats.success.ns
    assert after.inference_stats.compute_infer.count > before.inference_stats.compute_infer.count
    now_ms = time.time() * 1000
    assert abs(now_ms - after.last_inference) < 10 * 60 * 1000, (
        f"last_inference {after.last_inference} is not a recent ms timestamp"
    )


def test_statistics_failed_request_counts_as_fail(grpc_client):
    before = model_stats(grpc_client, "fault")
    with raises_status("INTERNAL"):
        grpc_client.infer("fault", [fp32_input(np.ones((1, 2), np.float32))])
    base = before.inference_stats.fail.count
    after = poll(
        lambda: model_stats(grpc_client, "fault"),
        lambda s: s.inference_stats.fail.count > base,
    )
    assert after.inference_stats.fail.count - base == 1
    assert after.inference_stats.success.count == before.inference_stats.success.count


def test_statistics_all_models_and_unknown(grpc_client):
    infer_fp32(grpc_client, "cost", np.ones((1, 2), np.float32))
    resp = grpc_client.get_inference_statistics()
    names = {s.name for s in resp.model_stats}
    assert {"identity", "cost"} <= names, names
    with raises_status("NOT_FOUND", "no-such-model"):
        grpc_client.get_inference_statistics("no-such-model")


def identity_metric(server, name):
    status, body = http_get(f"{server.http_url}/metrics")
    assert status == 200, f"/metrics answered {status}"
    value = metric_value(body, name, model="identity", version="1")
    assert value is not None, (
        f'no {name}{{model="identity",version="1"}} in /metrics:\n{body[:3000]}'
    )
    return value


def test_metrics_count_identity_requests(server, grpc_client):
    infer_fp32(grpc_client, "identity", np.ones((1, 2), np.float32))
    name = "nv_inference_request_success"
    before = poll(lambda: identity_metric(server, name), lambda v: v > 0)
    assert before > 0
    n = 5
    for i in range(n):
        infer_fp32(grpc_client, "identity", distinct_rows(2, 2, seed=900 + i))
    after = poll(lambda: identity_metric(server, name), lambda v: v >= before + n)
    assert after - before == n, f"{name} grew by {after - before}, sent {n}"


def test_metrics_inference_and_exec_counts_present(server, grpc_client):
    infer_fp32(grpc_client, "identity", np.ones((3, 2), np.float32))
    for name in ("nv_inference_count", "nv_inference_exec_count"):
        value = poll(lambda: identity_metric(server, name), lambda v: v > 0)
        assert value > 0, f"{name} for identity is {value}"
    _, body = http_get(f"{server.http_url}/metrics")
    assert "# TYPE nv_inference_request_success counter" in body, body[:2000]
