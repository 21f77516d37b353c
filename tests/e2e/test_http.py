"""KServe v2 over HTTP/REST with the stock `tritonclient.http`: the same checks as the gRPC
client where they make sense, and the two clients' answers compared with each other.

Metadata, readiness, configuration, inference (JSON tensors and the binary-data extension, FP32,
INT64 and BYTES), errors as Triton sends them over HTTP (JSON `{"error": ...}` with 400 / 404 /
503), the model repository (load with a config override, unload), statistics after inferences,
and the real MiniLM model answering over HTTP what it answers over gRPC.
"""

from __future__ import annotations

import json
import struct
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from _helpers import cost_expected, distinct_rows, infer_fp32, poll
from conftest import start_server, stop_server
from test_models import embed, minilm_repo  # noqa: F401  (minilm_repo: a fixture)


def http_client(srv) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url=f"127.0.0.1:{srv.http_port}")


@pytest.fixture
def client(server):
    c = http_client(server)
    yield c
    c.close()


def raw(srv, method: str, path: str, body: bytes | None = None, headers=None):
    """(status, headers, body) of one HTTP request; error statuses are returned, not raised."""
    req = urllib.request.Request(
        f"{srv.http_url}{path}", data=body, method=method, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def raises_http(status: int, *fragments: str):
    """Expect an InferenceServerException with HTTP status `status` whose message holds every
    fragment (tritonclient.http puts the server's JSON "error" in the message)."""

    class Check:
        def __enter__(self):
            self.ctx = pytest.raises(InferenceServerException)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            err = self.info.value
            assert err.status() == str(status), f"expected {status}, got {err.status()}: {err}"
            for f in fragments:
                assert f in (err.message() or ""), f"{f!r} not in {err.message()!r}"
            return handled

    return Check()


def fp32_in(arr: np.ndarray, binary: bool, name: str = "INPUT0") -> httpclient.InferInput:
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    inp = httpclient.InferInput(name, list(arr.shape), "FP32")
    inp.set_data_from_numpy(arr, binary_data=binary)
    return inp


def add_model(repo: Path, name: str, config: dict) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "1" / "weights.bin").write_bytes(bytes(100))
    (repo / name / "config.json").write_text(json.dumps(config))


def identity_of(datatype: str) -> dict:
    """The built-in identity (it echoes any tensor) declared for `datatype`."""
    tensor = {"data_type": f"TYPE_{'STRING' if datatype == 'BYTES' else datatype}", "dims": [-1]}
    return {
        "backend": "builtin",
        "max_batch_size": 8,
        "input": [{"name": "INPUT0", **tensor}],
        "output": [{"name": "OUTPUT0", **tensor}],
        "parameters": {"builtin": {"string_value": "identity"}},
    }


@pytest.fixture(scope="module")
def typed_server(tmp_path_factory):
    """A server with identity models for INT64 and BYTES."""
    base = tmp_path_factory.mktemp("http-typed")
    repo = base / "models"
    repo.mkdir()
    add_model(repo, "identity_int64", identity_of("INT64"))
    add_model(repo, "identity_bytes", identity_of("BYTES"))
    srv = start_server(base, models_dir=repo)
    yield srv
    stop_server(srv)


# -------------------------------------------------------------------------------------------
# Metadata, readiness, configuration


def test_live_ready_and_server_metadata(client, grpc_client):
    assert client.is_server_live() is True
    assert client.is_server_ready() is True
    meta = client.get_server_metadata()
    grpc_meta = grpc_client.get_server_metadata(as_json=True)
    assert meta["name"] == grpc_meta["name"] == "veraltheim"
    assert meta["version"] == grpc_meta["version"]
    assert "binary_tensor_data" in meta["extensions"]
    assert "model_repository" in meta["extensions"]


@pytest.mark.parametrize("model", ["identity", "cost"])
def test_model_metadata_equals_the_grpc_answer(client, grpc_client, model):
    meta = client.get_model_metadata(model)
    g = grpc_client.get_model_metadata(model, as_json=True)
    assert meta["name"] == g["name"] == model
    assert meta["versions"] == g["versions"] == ["1"]
    assert meta["platform"] == g["platform"]
    for side in ("inputs", "outputs"):
        assert [(t["name"], t["datatype"], t["shape"]) for t in meta[side]] == [
            (t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in g[side]
        ]
    assert client.get_model_metadata(model, model_version="1")["name"] == model
    with raises_http(404, "version '7'"):
        client.get_model_metadata(model, model_version="7")


def test_model_ready(client):
    assert client.is_model_ready("identity") is True
    assert client.is_model_ready("identity", model_version="1") is True
    assert client.is_model_ready("identity", model_version="2") is False
    assert client.is_model_ready("no-such-model") is False


def test_model_config_equals_the_grpc_answer(client, grpc_client):
    config = client.get_model_config("cost")
    g = grpc_client.get_model_config("cost", as_json=True)["config"]
    assert config["name"] == g["name"] == "cost"
    assert config["max_batch_size"] == g["max_batch_size"] == 64
    assert config["backend"] == g["backend"]
    for side in ("input", "output"):
        assert [(t["name"], t["data_type"], t["dims"]) for t in config[side]] == [
            (t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in g[side]
        ]
    assert config["parameters"] == g["parameters"]
    assert config["instance_group"][0]["kind"] == g["instance_group"][0]["kind"] == "KIND_CPU"
    assert config["version_policy"] == {"latest": {"num_versions": 1}}


def test_repository_index_equals_the_grpc_answer(client, grpc_client):
    index = {m["name"]: m for m in client.get_model_repository_index()}
    g = {m["name"]: m for m in grpc_client.get_model_repository_index(as_json=True)["models"]}
    assert set(index) == set(g)
    for name, m in index.items():
        assert (m["state"], m["version"]) == (g[name]["state"], g[name]["version"]), name
    assert index["identity"]["state"] == "READY"


# -------------------------------------------------------------------------------------------
# Inference


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_infer_identity_fp32_json_and_binary(client, grpc_client, binary_in, binary_out):
    data = distinct_rows(3, 5, seed=4101)
    out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary_out)
    result = client.infer("identity", [fp32_in(data, binary_in)], outputs=[out], request_id="r7")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)
    response = result.get_response()
    assert response["model_name"] == "identity" and response["model_version"] == "1"
    assert response["id"] == "r7"
    assert ("binary_data_size" in response["outputs"][0].get("parameters", {})) == binary_out
    np.testing.assert_array_equal(
        result.as_numpy("OUTPUT0"), infer_fp32(grpc_client, "identity", data)
    )


def test_infer_without_outputs_answers_all_in_binary(client):
    data = distinct_rows(2, 3, seed=4102)
    result = client.infer("identity", [fp32_in(data, True)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)
    assert result.get_response()["outputs"][0]["parameters"]["binary_data_size"] == data.nbytes


def test_infer_cost_over_http(client):
    data = distinct_rows(4, 6, seed=4103)
    result = client.infer("cost", [fp32_in(data, False)], outputs=[
        httpclient.InferRequestedOutput("OUTPUT0", binary_data=False)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), cost_expected(data))


@pytest.mark.parametrize("binary", [True, False])
def test_infer_identity_int64(typed_server, binary):
    client = http_client(typed_server)
    data = np.array([[2**62 + 1, -(2**63), 0, 2**63 - 1]], dtype=np.int64)
    inp = httpclient.InferInput("INPUT0", list(data.shape), "INT64")
    inp.set_data_from_numpy(data, binary_data=binary)
    out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)
    result = client.infer("identity_int64", [inp], outputs=[out])
    got = result.as_numpy("OUTPUT0")
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, data)
    # The same over gRPC.
    g = grpcclient.InferenceServerClient(url=typed_server.grpc_url)
    ginp = grpcclient.InferInput("INPUT0", list(data.shape), "INT64")
    ginp.set_data_from_numpy(data)
    np.testing.assert_array_equal(g.infer("identity_int64", [ginp]).as_numpy("OUTPUT0"), got)
    g.close()
    client.close()


@pytest.mark.parametrize("binary", [True, False])
def test_infer_identity_bytes(typed_server, binary):
    client = http_client(typed_server)
    data = np.array([["hello".encode(), "wörld ✓".encode(), b""]], dtype=np.object_)
    inp = httpclient.InferInput("INPUT0", list(data.shape), "BYTES")
    inp.set_data_from_numpy(data, binary_data=binary)
    out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)
    result = client.infer("identity_bytes", [inp], outputs=[out])
    got = result.as_numpy("OUTPUT0")
    assert got.shape == data.shape
    # tritonclient decodes binary BYTES to bytes and JSON BYTES to str.
    as_bytes = [x if isinstance(x, bytes) else x.encode() for x in got.ravel()]
    assert as_bytes == list(data.ravel())
    client.close()


def test_bytes_that_are_not_utf8_travel_as_binary_and_are_refused_as_json(typed_server):
    client = http_client(typed_server)
    data = np.array([[b"\xff\xfe", b"ok"]], dtype=np.object_)
    inp = httpclient.InferInput("INPUT0", [1, 2], "BYTES")
    inp.set_data_from_numpy(data, binary_data=True)
    result = client.infer("identity_bytes", [inp], outputs=[
        httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)])
    assert list(result.as_numpy("OUTPUT0").ravel()) == [b"\xff\xfe", b"ok"]
    with raises_http(400, "not UTF-8", "binary_data"):
        client.infer("identity_bytes", [inp], outputs=[
            httpclient.InferRequestedOutput("OUTPUT0", binary_data=False)])
    client.close()


def test_curl_style_json_request(server):
    """A plain JSON request, as curl sends it: the answer is JSON with the values."""
    body = json.dumps({"inputs": [
        {"name": "INPUT0", "shape": [1, 3], "datatype": "FP32", "data": [[1, 2.5, -3]]}]})
    status, headers, answer = raw(server, "POST", "/v2/models/identity/infer", body.encode())
    assert status == 200, answer
    assert headers["Content-Type"] == "application/json"
    out = json.loads(answer)["outputs"][0]
    assert (out["name"], out["datatype"], out["shape"], out["data"]) == (
        "OUTPUT0", "FP32", [1, 3], [1.0, 2.5, -3.0])


def test_binary_request_built_by_hand(server):
    """The binary-data extension byte by byte: JSON header, then the tensor's bytes."""
    header = json.dumps({
        "inputs": [{"name": "INPUT0", "shape": [1, 2], "datatype": "FP32",
                    "parameters": {"binary_data_size": 8}}],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
    }).encode()
    body = header + struct.pack("<2f", 0.5, -4.0)
    status, headers, answer = raw(
        server, "POST", "/v2/models/identity/infer", body,
        {"Inference-Header-Content-Length": str(len(header))})
    assert status == 200, answer
    n = int(headers["Inference-Header-Content-Length"])
    out = json.loads(answer[:n])["outputs"][0]
    assert out["parameters"]["binary_data_size"] == 8
    assert struct.unpack("<2f", answer[n:]) == (0.5, -4.0)


# -------------------------------------------------------------------------------------------
# Errors


def test_unknown_model_is_404_with_a_json_error(client, server):
    with raises_http(404, "'no-such-model'"):
        client.infer("no-such-model", [fp32_in(np.ones((1, 2)), True)])
    with raises_http(404, "'no-such-model'"):
        client.get_model_metadata("no-such-model")
    with raises_http(404, "'no-such-model'"):
        client.get_model_config("no-such-model")
    status, headers, body = raw(server, "GET", "/v2/models/no-such-model/ready")
    assert status == 404
    assert headers["Content-Type"] == "application/json"
    assert "'no-such-model'" in json.loads(body)["error"]


def test_unknown_routes_and_methods_are_json_errors(server):
    status, headers, body = raw(server, "GET", "/v2/no/such/route")
    assert status == 404
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body)["error"] == "GET /v2/no/such/route: no such route"
    status, headers, body = raw(server, "DELETE", "/v2/models/identity")
    assert status == 405
    assert json.loads(body)["error"] == "/v2/models/identity does not take DELETE"
    # Under /v1/ in OpenAI's error shape, which the `openai` package reads.
    status, _, body = raw(server, "GET", "/v1/no-such-thing")
    assert status == 404
    assert json.loads(body)["error"]["message"] == "GET /v1/no-such-thing: no such route"


def test_bad_shape_and_bad_data_are_400(client, server):
    # (tritonclient checks shapes itself, so the mismatches are sent by hand.)
    # Binary data that does not fill the shape.
    header = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 12}}]}).encode()
    status, _, body = raw(server, "POST", "/v2/models/identity/infer", header + bytes(12),
                          {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and "INPUT0" in json.loads(body)["error"], body
    # JSON values that do not fill the shape.
    request = {"inputs": [{"name": "INPUT0", "shape": [2, 2], "datatype": "FP32",
                           "data": [1, 2, 3]}]}
    status, _, body = raw(server, "POST", "/v2/models/identity/infer",
                          json.dumps(request).encode())
    assert status == 400, body
    assert "input 'INPUT0': 3 values given, but shape [2, 2] needs 4" in json.loads(body)["error"]
    # A datatype the model does not take (the model's own check, as over gRPC).
    inp = httpclient.InferInput("INPUT0", [1, 2], "INT32")
    inp.set_data_from_numpy(np.ones((1, 2), dtype=np.int32), binary_data=True)
    with raises_http(400, "INPUT0", "INT32"):
        client.infer("identity", [inp])
    # More rows than the model's max_batch_size.
    with raises_http(400, "max_batch_size"):
        client.infer("identity", [fp32_in(np.ones((65, 1)), True)])


def test_malformed_bodies_are_400_and_name_the_problem(server):
    for body, headers, fragment in [
        (b"{", {}, "not valid"),
        (b'{"inputs": 5}', {}, "invalid type"),
        (b'{"inputs": [], "extra": 1}', {}, "unknown field `extra`"),
        (b"{}", {"Inference-Header-Content-Length": "99"}, "only 2"),
        (b"{}", {"Inference-Header-Content-Length": "-1"}, "byte count"),
    ]:
        status, _, answer = raw(server, "POST", "/v2/models/identity/infer", body, headers)
        assert status == 400, (body, answer)
        assert fragment in json.loads(answer)["error"], answer


def test_a_body_over_the_message_limit_is_413(server_factory):
    srv = server_factory(["--max-message-bytes", "4096"])
    data = np.ones((1, 2048), dtype=np.float32)  # 8 KiB of binary data
    client = http_client(srv)
    with raises_http(413, "server.max_message_bytes (4096)"):
        client.infer("identity", [fp32_in(data, True)])
    # Under the limit it serves.
    small = distinct_rows(1, 8, seed=4104)
    np.testing.assert_array_equal(
        client.infer("identity", [fp32_in(small, True)]).as_numpy("OUTPUT0"), small)
    client.close()


# -------------------------------------------------------------------------------------------
# The model repository


def test_load_with_config_override_then_unload_and_reload(own_server):
    client = http_client(own_server)
    client.load_model("cost", config=json.dumps({"max_batch_size": 4}))
    assert client.get_model_config("cost")["max_batch_size"] == 4
    four = distinct_rows(4, 2, seed=4105)
    result = client.infer("cost", [fp32_in(four, True)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), cost_expected(four))
    with raises_http(400, "max_batch_size"):
        client.infer("cost", [fp32_in(distinct_rows(5, 2, seed=4106), True)])
    with raises_http(400, "JSON"):
        client.load_model("cost", config="{not json")
    # The failed load left the model serving.
    assert client.is_model_ready("cost") is True
    with raises_http(404, "'no-such-model'"):
        client.load_model("no-such-model")

    client.unload_model("cost")
    assert client.is_model_ready("cost") is False
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert index["cost"]["state"] == "UNAVAILABLE"
    status, _, body = raw(own_server, "GET", "/v2/models/cost/ready")
    assert status == 503 and "not ready" in json.loads(body)["error"]
    with raises_http(503, "'cost'"):
        client.infer("cost", [fp32_in(four, True)])
    ready_only = [m["name"] for m in json.loads(
        raw(own_server, "POST", "/v2/repository/index", b'{"ready": true}')[2])]
    assert "cost" not in ready_only and "identity" in ready_only

    client.load_model("cost")
    assert client.is_model_ready("cost") is True
    assert client.get_model_config("cost")["max_batch_size"] == 64
    client.close()


# -------------------------------------------------------------------------------------------
# Statistics


def test_statistics_count_http_inferences_like_grpc_ones(own_server):
    client = http_client(own_server)
    grpc = own_server.client()
    for i in range(5):
        data = distinct_rows(2, 3, seed=4200 + i)
        client.infer("identity", [fp32_in(data, i % 2 == 0)])
    infer_fp32(grpc, "identity", distinct_rows(1, 3, seed=4210))

    def stats():
        return client.get_inference_statistics("identity")["model_stats"][0]

    s = poll(stats, lambda s: s["inference_stats"]["success"]["count"] == 6)
    assert s["name"] == "identity" and s["version"] == "1"
    assert s["inference_stats"]["success"]["count"] == 6
    assert s["inference_count"] == 5 * 2 + 1
    assert s["inference_stats"]["fail"]["count"] == 0
    assert s["last_inference"] > 0
    g = grpc.get_inference_statistics("identity", as_json=True)["model_stats"][0]
    assert int(g["inference_stats"]["success"]["count"]) == 6
    assert int(g["inference_count"]) == s["inference_count"]
    every = client.get_inference_statistics()["model_stats"]
    assert {"identity", "cost"} <= {m["name"] for m in every}
    client.close()


# -------------------------------------------------------------------------------------------
# The real model


def test_minilm_onnx_over_http_equals_the_grpc_answer(server_factory, minilm_repo):  # noqa: F811
    srv = server_factory(["--load-model", "minilm_onnx"], models_dir=minilm_repo)
    texts = ["The cat sat on the mat.", "A quick brown fox jumps over the lazy dog.", "héllo"]
    over_grpc = embed(srv.client(), "minilm_onnx", texts)
    client = http_client(srv)
    data = np.array([[t.encode()] for t in texts], dtype=np.object_)
    for binary in (True, False):
        inp = httpclient.InferInput("TEXT", [len(texts), 1], "BYTES")
        inp.set_data_from_numpy(data, binary_data=binary)
        out = httpclient.InferRequestedOutput("EMBEDDING", binary_data=binary)
        got = client.infer("minilm_onnx", [inp], outputs=[out]).as_numpy("EMBEDDING")
        assert got.shape == (3, 384)
        np.testing.assert_array_equal(got.astype(np.float32), over_grpc)
    meta = client.get_model_metadata("minilm_onnx")
    assert meta["inputs"][0]["datatype"] == "BYTES"
    assert meta["outputs"][0]["shape"] == [-1, 384]
    client.close()
