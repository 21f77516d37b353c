"""Failure behaviour: a panicking backend, client deadlines. (CUDA shared memory, once
UNIMPLEMENTED here, is answered as Triton answers it without a GPU: test_triton_examples.py.)"""

import json
import queue
import subprocess
import time

import numpy as np
import pytest

from _helpers import (
    binary_path,
    cost_config,
    cost_expected,
    distinct_rows,
    fp32_input,
    infer_fp32,
    poll,
    raises_status,
)


def test_fault_model_internal_error_and_server_keeps_serving(grpc_client):
    for _ in range(3):  # repeated panics must not wear the server down
        with raises_status("INTERNAL") as box:
            grpc_client.infer("fault", [fp32_input(np.ones((2, 2), np.float32))])
        assert box[0].message(), "INTERNAL error without a message"
    data = distinct_rows(3, 3, seed=1100)
    np.testing.assert_array_equal(infer_fp32(grpc_client, "identity", data), data)
    assert grpc_client.is_server_live() is True
    assert grpc_client.is_server_ready() is True
    assert grpc_client.is_model_ready("identity") is True


def test_fault_in_stream_is_a_per_request_error(server):
    client = server.client()
    q: "queue.Queue" = queue.Queue()
    client.start_stream(callback=lambda result, error: q.put((result, error)))
    try:
        client.async_stream_infer("fault", [fp32_input(np.ones((1, 2), np.float32))], request_id="f")
        data = distinct_rows(1, 2, seed=1101)
        client.async_stream_infer("identity", [fp32_input(data)], request_id="i")
        items = [q.get(timeout=30) for _ in range(2)]
    finally:
        client.stop_stream()
    errors = [e for r, e in items if e is not None]
    results = [r for r, e in items if e is None]
    assert len(errors) == 1 and errors[0].message(), [str(e) for e in errors]
    assert [r.get_response().id for r in results] == ["i"]
    np.testing.assert_array_equal(results[0].as_numpy("OUTPUT0"), data)


def test_client_timeout_deadline_exceeded_and_server_healthy(own_server):
    client = own_server.client()
    # Each batch takes 2 s: a refusal that came only when the batch ended would take that long.
    client.load_model("cost", config=cost_config(base_us=2_000_000, per_item_us=0, max_batch_size=8))
    data = distinct_rows(1, 4, seed=1200)

    start = time.monotonic()
    with raises_status("DEADLINE_EXCEEDED"):
        infer_fp32(client, "cost", data, client_timeout=0.05)
    elapsed = time.monotonic() - start
    assert elapsed < 2.0, f"deadline of 50 ms reported after {elapsed:.2f} s, not before the batch ended"

    # The server is healthy: other models answer at once, and the slow model still
    # answers correctly when given enough time.
    assert client.is_server_live() is True
    ident = distinct_rows(2, 2, seed=1201)
    np.testing.assert_array_equal(infer_fp32(client, "identity", ident), ident)
    start = time.monotonic()
    np.testing.assert_array_equal(
        infer_fp32(client, "cost", data, client_timeout=30), cost_expected(data)
    )
    assert time.monotonic() - start >= 2.0  # busy-computes base_us = 2 s


def cost_in_flight_and_pending(srv) -> tuple[int, int]:
    """The `cost` model's requests held by the server and those waiting in its queue, read in
    that order (so one counted in flight and not queued is executing)."""
    memory = json.loads(cli("models", "memory", "--server", srv.grpc_url, "--json"))
    in_flight = sum(
        h["in_flight"] for d in memory for h in d["holders"] if h["key"].startswith("cost#")
    )
    stats = json.loads(cli("models", "stats", "cost", "--server", srv.grpc_url, "--json"))
    return in_flight, stats[0]["pending"]


def cli(*args: str) -> str:
    proc = subprocess.run(
        [str(binary_path()), *args], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, f"veraltheim {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def into(q: "queue.Queue"):
    """An `async_infer` callback that puts each (result, error) on `q`."""
    return lambda result, error: q.put((result, error))


def test_expired_requests_are_not_computed(own_server):
    """Requests whose deadline has passed while queued are dropped before compute
    (brief: expired or cancelled requests dropped before compute): while a 3 s batch holds
    the model, six 50 ms-deadline requests queue behind it; each gets DEADLINE_EXCEEDED, and
    none of them is ever executed (a request queued after them, answered, shows nothing of
    theirs ran: the model has one instance)."""
    client = own_server.client()
    client.load_model(
        "cost",
        config=json.dumps({
            "max_batch_size": 1,
            "parameters": {
                "base_us": {"string_value": "3000000"},
                "per_item_us": {"string_value": "0"},
                "busy": {"string_value": "sleep"},
            },
        }),
    )
    before = client.get_inference_statistics("cost").model_stats[0].execution_count
    held_data = distinct_rows(1, 2, seed=1203)
    held: "queue.Queue" = queue.Queue()
    client.async_infer("cost", [fp32_input(held_data)], callback=into(held))
    in_flight = poll(
        lambda: cost_in_flight_and_pending(own_server), lambda v: v == (1, 0), timeout=30
    )
    assert in_flight == (1, 0), f"the held batch never started executing: {in_flight}"

    answers: "queue.Queue" = queue.Queue()
    for _ in range(6):
        inp = [fp32_input(np.ones((1, 2), np.float32))]
        client.async_infer("cost", inp, callback=into(answers), client_timeout=0.05)
    for _ in range(6):
        result, error = answers.get(timeout=30)
        assert result is None and error is not None, result
        assert error.status() == "StatusCode.DEADLINE_EXCEEDED", (
            f"{error.status()}: {error.message()}"
        )

    result, error = held.get(timeout=30)
    assert error is None, error
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), cost_expected(held_data))
    # Queued after the six: answered only once nothing of theirs can still run.
    data = distinct_rows(1, 2, seed=1202)
    np.testing.assert_array_equal(infer_fp32(client, "cost", data), cost_expected(data))
    after = client.get_inference_statistics("cost").model_stats[0].execution_count
    assert after - before == 2, (
        f"{after - before - 2} of the 6 requests whose deadline passed in the queue were "
        "executed"
    )
