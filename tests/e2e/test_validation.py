"""Bad input gets a clear status naming what is wrong (shared server unless noted).

Requests tritonclient's high-level API refuses to build are built with its own
generated protobuf modules (same wire format)."""

import subprocess

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from _helpers import (
    binary_path,
    assert_rpc_error,
    distinct_rows,
    fp32_input,
    infer_fp32,
    raises_status,
    raw_request,
    rpc_error,
    typed_request,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def test_wrong_datatype_fp64(grpc_client):
    data = np.ones((1, 3), dtype=np.float64)
    inp = grpcclient.InferInput("INPUT0", [1, 3], "FP64")
    inp.set_data_from_numpy(data)
    with raises_status("INVALID_ARGUMENT", "INPUT0"):
        grpc_client.infer("identity", [inp])


def test_wrong_datatype_int32(grpc_client):
    inp = grpcclient.InferInput("INPUT0", [2, 2], "INT32")
    inp.set_data_from_numpy(np.arange(4, dtype=np.int32).reshape(2, 2))
    with raises_status("INVALID_ARGUMENT", "INPUT0"):
        grpc_client.infer("identity", [inp])


def test_bytes_datatype_rejected_by_fp32_model(grpc_client):
    """No built-in BYTES model yet: BYTES sent to identity must be refused as a
    datatype mismatch naming the input (tritonclient encodes BYTES raw, each element
    as a 4-byte little-endian length + bytes)."""
    data = np.array([[b"hello", b"w\x00rld"]], dtype=np.object_)
    inp = grpcclient.InferInput("INPUT0", [1, 2], "BYTES")
    inp.set_data_from_numpy(data)
    with raises_status("INVALID_ARGUMENT", "INPUT0") as box:
        grpc_client.infer("identity", [inp])
    msg = box[0].message()
    assert "BYTES" in msg or "FP32" in msg, f"message does not name the datatypes: {msg!r}"


def test_bytes_typed_contents_rejected(stub):
    req = raw_request(np.zeros((1, 1), np.float32))
    del req.raw_input_contents[:]
    tensor = req.inputs[0]
    tensor.datatype = "BYTES"
    del tensor.shape[:]
    tensor.shape.extend([1, 2])
    tensor.contents.bytes_contents.extend([b"a", b"bc"])
    assert_rpc_error(rpc_error(stub.ModelInfer, req), INVALID, "INPUT0")


def test_unknown_datatype_string(stub):
    req = raw_request(np.zeros((1, 2), np.float32), datatype="FLOAT99")
    assert_rpc_error(rpc_error(stub.ModelInfer, req), INVALID, "INPUT0")


def test_wrong_input_name(grpc_client):
    inp = fp32_input(np.zeros((1, 2), np.float32), name="NOT_AN_INPUT")
    with raises_status("INVALID_ARGUMENT", "NOT_AN_INPUT"):
        grpc_client.infer("identity", [inp])


def test_missing_input(stub):
    req = raw_request(np.zeros((1, 2), np.float32))
    del req.inputs[:]
    del req.raw_input_contents[:]
    assert_rpc_error(rpc_error(stub.ModelInfer, req), INVALID, "INPUT0")


def test_duplicate_input(stub):
    data = np.zeros((1, 2), np.float32)
    req = raw_request(data)
    dup = req.inputs.add()
    dup.CopyFrom(req.inputs[0])
    req.raw_input_contents.append(data.tobytes())
    assert_rpc_error(rpc_error(stub.ModelInfer, req), INVALID, "INPUT0")


def test_raw_byte_length_does_not_match_shape(stub):
    # shape says 1x4 FP32 = 16 bytes, only 12 are sent
    req = raw_request(np.zeros((1, 3), np.float32), shape=[1, 4])
    assert_rpc_error(rpc_error(stub.ModelInfer, req), INVALID, "INPUT0")


def test_raw_byte_length_too_long(stub):
    req = raw_request(np.zeros((1, 5), np.float32), shape=[1, 4])
    assert_rpc_error(rpc_error(stub.ModelInfer, req), INVALID, "INPUT0")


def test_raw_and_typed_contents_together(stub):
    data = np.ones((1, 2), np.float32)
    req = raw_request(data)
    req.inputs[0].contents.fp32_contents.extend([1.0, 1.0])
    assert_rpc_error(rpc_error(stub.ModelInfer, req), INVALID, "INPUT0")


def test_typed_contents_count_mismatch(stub):
    req = typed_request(np.ones((2, 2), np.float32))
    req.inputs[0].contents.fp32_contents.append(5.0)  # 5 values for a 2x2 tensor
    assert_rpc_error(rpc_error(stub.ModelInfer, req), INVALID, "INPUT0")


def test_typed_contents_wrong_field_for_datatype(stub):
    req = typed_request(np.ones((1, 2), np.float32))
    req.inputs[0].contents.ClearField("fp32_contents")
    req.inputs[0].contents.int_contents.extend([1, 2])  # FP32 declared, INT32 sent
    assert_rpc_error(rpc_error(stub.ModelInfer, req), INVALID, "INPUT0")


def test_more_raw_contents_than_inputs(stub):
    data = np.zeros((1, 2), np.float32)
    req = raw_request(data)
    req.raw_input_contents.append(data.tobytes())
    err = rpc_error(stub.ModelInfer, req)
    assert err.code() == INVALID, f"{err.code()}: {err.details()}"


def test_negative_dimension(stub):
    req = raw_request(np.zeros((1, 3), np.float32), shape=[1, -3])
    assert_rpc_error(rpc_error(stub.ModelInfer, req), INVALID, "INPUT0")


def test_overflowing_dimensions(stub):
    # 64 * 2^62 elements overflows i64; 2^62 * 4 bytes overflows u64.
    req = raw_request(np.zeros((1, 2), np.float32), shape=[64, 2**62])
    assert_rpc_error(rpc_error(stub.ModelInfer, req), INVALID, "INPUT0")
    req = raw_request(np.zeros((1, 2), np.float32), shape=[1, 2**62])
    assert_rpc_error(rpc_error(stub.ModelInfer, req), INVALID, "INPUT0")


def test_wrong_rank(stub):
    req = raw_request(np.zeros(4, np.float32), shape=[4])
    assert_rpc_error(rpc_error(stub.ModelInfer, req), INVALID, "INPUT0")


def test_batch_larger_than_max_batch_size(grpc_client):
    with raises_status("INVALID_ARGUMENT") as box:
        grpc_client.infer("identity", [fp32_input(np.zeros((65, 2), np.float32))])
    msg = box[0].message()
    assert "64" in msg or "batch" in msg.lower(), f"message does not explain the limit: {msg!r}"


def test_unknown_requested_output(grpc_client):
    with raises_status("INVALID_ARGUMENT", "NOT_AN_OUTPUT"):
        grpc_client.infer(
            "identity",
            [fp32_input(np.zeros((1, 2), np.float32))],
            outputs=[grpcclient.InferRequestedOutput("NOT_AN_OUTPUT")],
        )


def _supports_max_message_flag() -> bool:
    out = subprocess.run(
        [str(binary_path()), "serve", "--help"], capture_output=True, text=True, timeout=30
    )
    return "--max-message-bytes" in (out.stdout + out.stderr)


def test_message_over_configured_limit_resource_exhausted(server_factory):
    if not _supports_max_message_flag():
        pytest.fail("`veraltheim serve --help` has no --max-message-bytes flag")
    srv = server_factory(["--max-message-bytes", "1048576"])
    client = srv.client()
    big = np.zeros((64, 8192), np.float32)  # 2 MiB of raw input
    with raises_status("RESOURCE_EXHAUSTED"):
        client.infer("identity", [fp32_input(big)])
    # The server stays up and still answers requests under the limit.
    small = distinct_rows(4, 16, seed=11)
    np.testing.assert_array_equal(infer_fp32(client, "identity", small), small)
    assert client.is_server_live()


def test_message_over_default_limit_resource_exhausted(grpc_client):
    """Default limit: 64 MiB. 64 x 262160 FP32 = 67,112,960 bytes > 67,108,864."""
    big = np.zeros((64, 262160), np.float32)
    with raises_status("RESOURCE_EXHAUSTED"):
        grpc_client.infer("identity", [fp32_input(big)])
    small = distinct_rows(2, 2, seed=12)
    np.testing.assert_array_equal(infer_fp32(grpc_client, "identity", small), small)
