"""ModelInfer on the built-in models, through tritonclient (raw contents) and through
the generated stub (raw and typed contents). Shared server."""

import grpc
import numpy as np
import tritonclient.grpc as grpcclient

from _helpers import (
    assert_rpc_error,
    cost_expected,
    distinct_rows,
    fp32_input,
    infer_fp32,
    raises_status,
    raw_request,
    response_output,
    rpc_error,
    typed_request,
)


def test_identity_single_row(grpc_client):
    data = np.array([[1.5, -2.25, 3.0, 0.0]], dtype=np.float32)
    out = infer_fp32(grpc_client, "identity", data)
    assert out.dtype == np.float32
    assert out.shape == (1, 4)
    np.testing.assert_array_equal(out, data)


def test_identity_batch_of_rows(grpc_client):
    data = distinct_rows(7, 5, seed=1)
    out = infer_fp32(grpc_client, "identity", data)
    assert out.shape == (7, 5)
    np.testing.assert_array_equal(out, data)


def test_identity_max_batch_and_wide_rows(grpc_client):
    data = distinct_rows(64, 1000, seed=2)
    out = infer_fp32(grpc_client, "identity", data)
    np.testing.assert_array_equal(out, data)


def test_identity_special_float_values_roundtrip(grpc_client):
    data = np.array(
        [[np.inf, -np.inf, -0.0, np.finfo(np.float32).max, np.finfo(np.float32).tiny]],
        dtype=np.float32,
    )
    out = infer_fp32(grpc_client, "identity", data)
    assert out.tobytes() == data.tobytes()  # bit-exact, including -0.0


def test_identity_response_metadata(grpc_client):
    data = distinct_rows(2, 3, seed=3)
    result = grpc_client.infer(
        "identity", [fp32_input(data)], model_version="1", request_id="req-abc-42"
    )
    resp = result.get_response()
    assert resp.model_name == "identity"
    assert resp.model_version == "1"
    assert resp.id == "req-abc-42"
    assert [(o.name, o.datatype, list(o.shape)) for o in resp.outputs] == [
        ("OUTPUT0", "FP32", [2, 3])
    ]


def test_identity_requested_output(grpc_client):
    data = distinct_rows(3, 2, seed=4)
    result = grpc_client.infer(
        "identity", [fp32_input(data)], outputs=[grpcclient.InferRequestedOutput("OUTPUT0")]
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)


def test_cost_row_sums(grpc_client):
    data = distinct_rows(5, 9, seed=5)
    out = infer_fp32(grpc_client, "cost", data)
    assert out.dtype == np.float32
    assert out.shape == (5, 1)
    np.testing.assert_array_equal(out, cost_expected(data))


def test_cost_single_row(grpc_client):
    data = np.array([[1.0, 2.0, 3.5, -0.5]], dtype=np.float32)
    out = infer_fp32(grpc_client, "cost", data)
    np.testing.assert_array_equal(out, np.array([[6.0]], dtype=np.float32))


def test_raw_stub_identity_raw_contents(stub):
    data = distinct_rows(4, 3, seed=6)
    resp = stub.ModelInfer(raw_request(data, request_id="raw-1"))
    assert resp.id == "raw-1"
    np.testing.assert_array_equal(response_output(resp), data)


def test_raw_stub_identity_typed_contents(stub):
    data = distinct_rows(3, 4, seed=7)
    resp = stub.ModelInfer(typed_request(data, request_id="typed-1"))
    assert resp.id == "typed-1"
    np.testing.assert_array_equal(response_output(resp), data)


def test_raw_stub_cost_typed_contents(stub):
    data = distinct_rows(6, 2, seed=8)
    resp = stub.ModelInfer(typed_request(data, model="cost"))
    np.testing.assert_array_equal(response_output(resp), cost_expected(data))


def test_unknown_model_not_found(grpc_client):
    with raises_status("NOT_FOUND", "no-such-model"):
        infer_fp32(grpc_client, "no-such-model", np.zeros((1, 2), dtype=np.float32))


def test_raw_stub_unknown_model_not_found(stub):
    req = raw_request(np.zeros((1, 2), dtype=np.float32), model="no-such-model")
    assert_rpc_error(rpc_error(stub.ModelInfer, req), grpc.StatusCode.NOT_FOUND, "no-such-model")


def test_empty_model_name_rejected(stub):
    req = raw_request(np.zeros((1, 2), dtype=np.float32), model="")
    err = rpc_error(stub.ModelInfer, req)
    assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (
        f"{err.code()}: {err.details()}"
    )


def test_infer_after_errors_still_correct(grpc_client):
    """A burst of bad requests must not disturb the next good one."""
    for _ in range(5):
        with raises_status("INVALID_ARGUMENT"):
            grpc_client.infer(
                "identity", [fp32_input(np.zeros((1, 2), np.float32), name="WRONG")]
            )
    data = distinct_rows(2, 2, seed=9)
    np.testing.assert_array_equal(infer_fp32(grpc_client, "identity", data), data)

