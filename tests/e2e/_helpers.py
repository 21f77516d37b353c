"""Small helpers shared by the end-to-end tests (not tests themselves)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

REPO_ROOT = Path(__file__).resolve().parents[2]


def binary_path() -> Path:
    env = os.environ.get("VERALTHEIM_BIN")
    path = Path(env) if env else REPO_ROOT / "target" / "debug" / "veraltheim"
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.fail(
            f"veraltheim binary not found or not executable at {path} "
            "(build it with `cargo build --workspace`, or set VERALTHEIM_BIN)",
            pytrace=False,
        )
    return path


def fp32_input(arr: np.ndarray, name: str = "INPUT0") -> grpcclient.InferInput:
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    inp = grpcclient.InferInput(name, list(arr.shape), "FP32")
    inp.set_data_from_numpy(arr)
    return inp


def infer_fp32(client, model: str, arr: np.ndarray, **kwargs) -> np.ndarray:
    """Infer a single FP32 input INPUT0 and return OUTPUT0."""
    result = client.infer(model, [fp32_input(arr)], **kwargs)
    out = result.as_numpy("OUTPUT0")
    assert out is not None, f"{model}: response has no OUTPUT0: {result.get_response()}"
    return out


def cost_expected(arr: np.ndarray) -> np.ndarray:
    return np.asarray(arr, dtype=np.float32).sum(axis=1, keepdims=True)


def distinct_rows(rows: int, cols: int, seed: int) -> np.ndarray:
    """Values that are exact in FP32 and whose row sums are exact in any order."""
    rng = np.random.default_rng(seed)
    return (rng.integers(-512, 512, size=(rows, cols)) * 0.5).astype(np.float32)


@contextlib.contextmanager
def raises_status(code: str, *fragments: str):
    """Expect an InferenceServerException with status StatusCode.<code> whose message
    contains every fragment. Yields a one-element list that holds the exception."""
    box: list[InferenceServerException] = []
    with pytest.raises(InferenceServerException) as excinfo:
        yield box
    err = excinfo.value
    box.append(err)
    assert err.status() == f"StatusCode.{code}", (
        f"expected {code}, got {err.status()}: {err.message()}"
    )
    msg = err.message() or ""
    for frag in fragments:
        assert frag in msg, f"{code} message does not mention {frag!r}: {msg!r}"


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    """Call a raw stub method and return the RpcError it must raise."""
    try:
        resp = fn(*args, **kwargs)
    except grpc.RpcError as err:
        return err
    pytest.fail(f"expected the call to fail, but it returned: {resp}")


def assert_rpc_error(err: grpc.RpcError, code: grpc.StatusCode, *fragments: str) -> None:
    assert err.code() == code, f"expected {code}, got {err.code()}: {err.details()}"
    details = err.details() or ""
    for frag in fragments:
        assert frag in details, f"{code} message does not mention {frag!r}: {details!r}"


def raw_request(
    arr: np.ndarray,
    model: str = "identity",
    name: str = "INPUT0",
    datatype: str = "FP32",
    shape: list[int] | None = None,
    request_id: str = "",
) -> service_pb2.ModelInferRequest:
    """A ModelInferRequest the way tritonclient builds it (raw_input_contents)."""
    arr = np.ascontiguousarray(arr)
    req = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    tensor = req.inputs.add()
    tensor.name = name
    tensor.datatype = datatype
    tensor.shape.extend(list(arr.shape) if shape is None else shape)
    req.raw_input_contents.append(arr.tobytes())
    return req


def typed_request(
    arr: np.ndarray, model: str = "identity", request_id: str = ""
) -> service_pb2.ModelInferRequest:
    """A ModelInferRequest carrying FP32 data in contents.fp32_contents (typed)."""
    arr = np.asarray(arr, dtype=np.float32)
    req = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    tensor = req.inputs.add()
    tensor.name = "INPUT0"
    tensor.datatype = "FP32"
    tensor.shape.extend(arr.shape)
    tensor.contents.fp32_contents.extend(arr.ravel().tolist())
    return req


def response_output(resp: service_pb2.ModelInferResponse, name: str = "OUTPUT0") -> np.ndarray:
    """Decode an FP32 output from a raw response, whichever form the server used
    (raw_output_contents or typed contents)."""
    for idx, out in enumerate(resp.outputs):
        if out.name != name:
            continue
        assert out.datatype == "FP32", f"{name} datatype {out.datatype}"
        shape = list(out.shape)
        if len(resp.raw_output_contents) > 0:
            assert len(resp.raw_output_contents) == len(resp.outputs), (
                "raw_output_contents must have one entry per output"
            )
            data = np.frombuffer(resp.raw_output_contents[idx], dtype="<f4")
        else:
            data = np.asarray(out.contents.fp32_contents, dtype=np.float32)
        assert data.size == int(np.prod(shape)), (
            f"{name}: {data.size} elements for shape {shape}"
        )
        return data.reshape(shape)
    pytest.fail(f"response has no output {name}: {resp}")


def poll(getter, done, timeout: float = 3.0, interval: float = 0.05):
    """Call getter() until done(value) or timeout; return the last value. Gives
    counters that a server may update just after answering a moment to settle."""
    deadline = time.monotonic() + timeout
    value = getter()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(interval)
        value = getter()
    return value


_METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """All samples of metric `name` in Prometheus text format."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _METRIC_LINE.match(line)
        if not m or m.group(1) != name:
            continue
        labels = dict(_LABEL.findall(m.group(3) or ""))
        samples.append((labels, float(m.group(4))))
    return samples


def metric_value(text: str, name: str, **labels: str) -> float | None:
    for sample_labels, value in metric_samples(text, name):
        if all(sample_labels.get(k) == v for k, v in labels.items()):
            return value
    return None


def cost_config(base_us: int, per_item_us: int, max_batch_size: int = 8) -> str:
    return json.dumps(
        {
            "max_batch_size": max_batch_size,
            "parameters": {
                "base_us": {"string_value": str(base_us)},
                "per_item_us": {"string_value": str(per_item_us)},
            },
        }
    )


def http_get(url: str, timeout: float = 5.0, context=None) -> tuple[int, str]:
    """(status, body) of a GET; HTTP error statuses are returned, not raised. `context`: the
    ssl.SSLContext of an https URL."""
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode("utf-8", "replace")
