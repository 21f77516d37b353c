"""Failure behaviour: a panicking backend, unimplemented RPCs, client deadlines."""

import queue
import time

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from _helpers import (
    assert_rpc_error,
    cost_config,
    cost_expected,
    distinct_rows,
    fp32_input,
    infer_fp32,
    raises_status,
    rpc_error,
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


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda c: c.get_cuda_shared_memory_status(), id="cuda_status"),
        pytest.param(lambda c: c.unregister_cuda_shared_memory("region0"), id="cuda_unregister"),
    ],
)
def test_cuda_shared_memory_rpcs_unimplemented(grpc_client, call):
    with raises_status("UNIMPLEMENTED", "system shared memory") as box:
        call(grpc_client)
    assert len(box[0].message() or "") > 5, f"no clear message: {box[0].message()!r}"


def test_cuda_shared_memory_register_unimplemented(stub):
    req = service_pb2.CudaSharedMemoryRegisterRequest(
        name="region0", raw_handle=b"\x00" * 64, device_id=0, byte_size=64
    )
    err = rpc_error(stub.CudaSharedMemoryRegister, req)
    assert_rpc_error(err, grpc.StatusCode.UNIMPLEMENTED)
    assert err.details(), "UNIMPLEMENTED without a message"


def test_client_timeout_deadline_exceeded_and_server_healthy(own_server):
    client = own_server.client()
    client.load_model("cost", config=cost_config(base_us=300000, per_item_us=0, max_batch_size=8))
    data = distinct_rows(1, 4, seed=1200)

    start = time.monotonic()
    with raises_status("DEADLINE_EXCEEDED"):
        infer_fp32(client, "cost", data, client_timeout=0.05)
    elapsed = time.monotonic() - start
    assert elapsed < 1.0, f"deadline of 50 ms reported after {elapsed:.2f} s"

    # The server is healthy: other models answer at once, and the slow model still
    # answers correctly when given enough time.
    assert client.is_server_live() is True
    ident = distinct_rows(2, 2, seed=1201)
    np.testing.assert_array_equal(infer_fp32(client, "identity", ident), ident)
    start = time.monotonic()
    np.testing.assert_array_equal(
        infer_fp32(client, "cost", data, client_timeout=30), cost_expected(data)
    )
    assert time.monotonic() - start >= 0.3  # busy-computes base_us = 300 ms


def test_expired_requests_are_not_computed(own_server):
    """Requests whose deadline has passed while queued are dropped before compute
    (brief: expired or cancelled requests dropped before compute): fire several
    50 ms-deadline requests at a 300 ms model, then count its executions."""
    client = own_server.client()
    client.load_model("cost", config=cost_config(base_us=300000, per_item_us=0, max_batch_size=1))
    before = client.get_inference_statistics("cost").model_stats[0].execution_count
    for _ in range(6):
        inp = [fp32_input(np.ones((1, 2), np.float32))]
        client.async_infer("cost", inp, callback=lambda r, e: None, client_timeout=0.05)
    time.sleep(1.5)  # enough for the first (possibly started) execution to finish
    after = client.get_inference_statistics("cost").model_stats[0].execution_count
    assert after - before <= 2, (
        f"{after - before} executions for 6 requests whose 50 ms deadline had expired"
    )
    data = distinct_rows(1, 2, seed=1202)
    np.testing.assert_array_equal(infer_fp32(client, "cost", data), cost_expected(data))
