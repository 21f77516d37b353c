"""What NVIDIA's tritonclient examples do, done here with the stock clients against ONNX models
standing in for Triton's example repository, checking the outcomes the examples check:

- simple_grpc_shm_client: system shared memory cleaned up first, inputs and outputs through
  registered regions, the regions' status, unregistering;
- simple_grpc_cudashm_client, its first part: unregistering CUDA shared memory (all, and a
  name) before anything else is OK and the status is an empty list; registering a CUDA region
  is refused saying why (no GPU memory is shared here), over gRPC and HTTP;
- simple_grpc_string_infer_client: BYTES tensors holding numbers, summed and subtracted by an
  ONNX graph (Cast to INT32, Add / Sub, Cast back to STRING), over gRPC and HTTP;
- simple_identity with BYTES, as the explicit-byte-content examples send it: raw bytes, typed
  `bytes_contents`, empty and non-UTF-8 elements;
- simple_grpc_model_control: the index, load, a malformed configuration override refused with
  "failed to load" in the message, a good override applied (max_batch_size as a string, as the
  example sends it), unload, an unknown model refused with "failed to load";
- reuse_infer_objects_client: the same InferInput / InferRequestedOutput objects used for
  inferences through shared memory, then without, then through it again, over gRPC and HTTP.

The models (testdata/onnx_models.py, written by scripts/provision-models into
.cache/models/onnx-test/): `simple` (INT32 [batch, 16] add/sub), `simple_string` (the same on
strings), `simple_identity` (STRING [batch, n] Identity). Each is served from a Triton-style
folder (config.pbtxt, version folder, model.onnx).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, triton_to_np_dtype

from _helpers import REPO_ROOT, raises_status

ONNX_TEST = Path(
    os.environ.get("VERALTHEIM_ONNX_TEST_DIR", REPO_ROOT / ".cache/models/onnx-test")
)

CONFIGS = {
    "simple": """
name: "simple"
backend: "onnxruntime"
max_batch_size: 8
input [
  { name: "INPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "INPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
]
output [
  { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
  { name: "OUTPUT1" data_type: TYPE_INT32 dims: [ 16 ] }
]
""",
    "simple_string": """
name: "simple_string"
backend: "onnxruntime"
max_batch_size: 8
input [
  { name: "INPUT0" data_type: TYPE_STRING dims: [ 16 ] },
  { name: "INPUT1" data_type: TYPE_STRING dims: [ 16 ] }
]
output [
  { name: "OUTPUT0" data_type: TYPE_STRING dims: [ 16 ] },
  { name: "OUTPUT1" data_type: TYPE_STRING dims: [ 16 ] }
]
""",
    "simple_identity": """
name: "simple_identity"
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_STRING dims: [ -1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_STRING dims: [ -1 ] } ]
""",
}
MODELS = list(CONFIGS)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The stand-in example repository: Triton-style folders around the test graphs."""
    root = tmp_path_factory.mktemp("triton-examples")
    for name, config in CONFIGS.items():
        graph = ONNX_TEST / name / "model.onnx"
        if not graph.is_file():
            pytest.fail(f"{graph} missing: run scripts/provision-models", pytrace=False)
        (root / name / "1").mkdir(parents=True)
        shutil.copy(graph, root / name / "1" / "model.onnx")
        (root / name / "config.pbtxt").write_text(config)
    return root


def serve(server_factory, repo: Path):
    args = ["--allow-client-shm"]
    for m in MODELS:
        args += ["--load-model", m]
    return server_factory(args, models_dir=repo)


@pytest.fixture
def srv(server_factory, repo):
    return serve(server_factory, repo)


def http_of(srv) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url=f"127.0.0.1:{srv.http_port}")


class Regions:
    """System shared-memory objects made by a test, destroyed after it."""

    def __init__(self):
        self.made = []

    def key(self, tag: str) -> str:
        return f"/veraltheim_examples_{tag}_{os.getpid()}"

    def make(self, tag: str, byte_size: int):
        handle = shm.create_shared_memory_region(tag, self.key(tag), byte_size)
        self.made.append(handle)
        return handle


@pytest.fixture
def regions():
    r = Regions()
    yield r
    for handle in r.made:
        shm.destroy_shared_memory_region(handle)


# --- simple_grpc_shm_client and the first part of simple_grpc_cudashm_client ----------------


def test_shared_memory_example_flow(srv, regions):
    client = srv.client()
    # Both examples clean up before they start: nothing registered, both answer OK.
    client.unregister_system_shared_memory()
    client.unregister_cuda_shared_memory()
    assert len(client.get_system_shared_memory_status().regions) == 0
    assert len(client.get_cuda_shared_memory_status().regions) == 0

    a = np.arange(16, dtype=np.int32)
    b = np.full(16, 3, dtype=np.int32)
    size = a.nbytes
    # The inputs one after the other in one region, the outputs likewise in another.
    ins = regions.make("in", 2 * size)
    outs = regions.make("out", 2 * size)
    shm.set_shared_memory_region(ins, [a])
    shm.set_shared_memory_region(ins, [b], offset=size)
    client.register_system_shared_memory("in", regions.key("in"), 2 * size)
    client.register_system_shared_memory("out", regions.key("out"), 2 * size)
    status = client.get_system_shared_memory_status(as_json=True)["regions"]
    assert {k: int(v["byte_size"]) for k, v in status.items()} == {"in": 2 * size, "out": 2 * size}

    inputs = [grpcclient.InferInput(f"INPUT{i}", [1, 16], "INT32") for i in (0, 1)]
    inputs[0].set_shared_memory("in", size)
    inputs[1].set_shared_memory("in", size, offset=size)
    outputs = [grpcclient.InferRequestedOutput(f"OUTPUT{i}") for i in (0, 1)]
    outputs[0].set_shared_memory("out", size)
    outputs[1].set_shared_memory("out", size, offset=size)
    result = client.infer("simple", inputs, outputs=outputs)
    for i, want in ((0, a + b), (1, a - b)):
        out = result.get_output(f"OUTPUT{i}")
        assert out is not None and list(out.shape) == [1, 16] and out.datatype == "INT32"
        got = shm.get_contents_as_numpy(outs, triton_to_np_dtype(out.datatype), out.shape,
                                        offset=i * size)
        np.testing.assert_array_equal(got[0], want)

    client.unregister_system_shared_memory("in")
    assert list(client.get_system_shared_memory_status(as_json=True)["regions"]) == ["out"]
    client.unregister_system_shared_memory()
    assert len(client.get_system_shared_memory_status().regions) == 0


def test_cuda_shared_memory_answers_as_triton_without_a_gpu(srv, regions):
    client = srv.client()
    client.unregister_cuda_shared_memory()
    client.unregister_cuda_shared_memory("never_registered")
    assert client.get_cuda_shared_memory_status(as_json=True).get("regions", {}) == {}
    with raises_status("NOT_FOUND", "'gpu_region'"):
        client.get_cuda_shared_memory_status("gpu_region")
    handle = base64.b64encode(b"\0" * 64)
    with raises_status("INVALID_ARGUMENT", "failed to register", "'gpu_region'",
                       "not supported", "system shared memory"):
        client.register_cuda_shared_memory("gpu_region", handle, 0, 64)
    # A system region of the same name is not a CUDA one.
    regions.make("sys", 64)
    client.register_system_shared_memory("sys", regions.key("sys"), 64)
    with raises_status("NOT_FOUND", "system shared memory"):
        client.get_cuda_shared_memory_status("sys")
    client.unregister_cuda_shared_memory()
    assert len(client.get_system_shared_memory_status().regions) == 1
    # No extension is advertised for what cannot be registered.
    extensions = client.get_server_metadata().extensions
    assert "system_shared_memory" in extensions and "cuda_shared_memory" not in extensions

    # The same over HTTP (tritonclient.http's calls and Triton's routes).
    h = http_of(srv)
    try:
        h.unregister_cuda_shared_memory()
        h.unregister_cuda_shared_memory("never_registered")
        assert h.get_cuda_shared_memory_status() == []
        with pytest.raises(InferenceServerException) as e:
            h.get_cuda_shared_memory_status("gpu_region")
        assert "'gpu_region'" in e.value.message() and e.value.status() == "404"
        with pytest.raises(InferenceServerException) as e:
            h.register_cuda_shared_memory("gpu_region", handle, 0, 64)
        assert e.value.status() == "400"
        assert "failed to register" in e.value.message() and "not supported" in e.value.message()
    finally:
        h.close()


# --- simple_grpc_string_infer_client ----------------------------------------------------------


def string_inputs(module, a: np.ndarray, b: np.ndarray, **binary):
    ins = []
    for i, values in enumerate((a, b)):
        arr = np.array([str(x).encode() for x in values], dtype=np.object_).reshape(1, 16)
        x = module.InferInput(f"INPUT{i}", [1, 16], "BYTES")
        x.set_data_from_numpy(arr, **binary)
        ins.append(x)
    return ins


def as_ints(arr: np.ndarray) -> np.ndarray:
    return np.array([int(x) for x in arr.reshape(-1)], dtype=np.int64).reshape(arr.shape)


def test_string_infer_example(srv):
    a = np.arange(-8, 8, dtype=np.int32)
    b = np.ones(16, dtype=np.int32)
    client = srv.client()
    meta = client.get_model_metadata("simple_string")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("INPUT0", "BYTES", [-1, 16]), ("INPUT1", "BYTES", [-1, 16])
    ]
    outputs = [grpcclient.InferRequestedOutput(f"OUTPUT{i}") for i in (0, 1)]
    result = client.infer("simple_string", string_inputs(grpcclient, a, b), outputs=outputs)
    sums, diffs = result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1")
    assert sums.shape == (1, 16) and sums.dtype == np.object_
    assert result.get_output("OUTPUT0").datatype == "BYTES"
    np.testing.assert_array_equal(as_ints(sums)[0], a + b)
    np.testing.assert_array_equal(as_ints(diffs)[0], a - b)

    # Over HTTP: JSON tensors and the binary extension.
    h = http_of(srv)
    try:
        for binary in (False, True):
            outs = [httpclient.InferRequestedOutput(f"OUTPUT{i}", binary_data=binary)
                    for i in (0, 1)]
            r = h.infer("simple_string",
                        string_inputs(httpclient, a, b, binary_data=binary), outputs=outs)
            np.testing.assert_array_equal(as_ints(r.as_numpy("OUTPUT0"))[0], a + b)
            np.testing.assert_array_equal(as_ints(r.as_numpy("OUTPUT1"))[0], a - b)
    finally:
        h.close()


def test_a_string_that_is_not_a_number_fails_the_request_not_the_server(srv):
    client = srv.client()
    a = np.array([b"1"] * 15 + [b"sixteen"], dtype=np.object_).reshape(1, 16)
    ins = []
    for i in (0, 1):
        x = grpcclient.InferInput(f"INPUT{i}", [1, 16], "BYTES")
        x.set_data_from_numpy(a)
        ins.append(x)
    with raises_status("INTERNAL", "simple_string", "ONNX Runtime"):
        client.infer("simple_string", ins)
    assert client.is_model_ready("simple_string")


# --- simple_identity: BYTES in, the same bytes out ---------------------------------------------

ELEMENTS = [b"", b"hello", "naïve café ✓".encode(), bytes([0xFF, 0xFE, 0x80]), b"x" * 1000]


def test_identity_returns_bytes_unchanged_raw_and_typed(srv):
    client = srv.client()
    arr = np.array(ELEMENTS, dtype=np.object_).reshape(1, len(ELEMENTS))
    x = grpcclient.InferInput("INPUT0", list(arr.shape), "BYTES")
    x.set_data_from_numpy(arr)
    got = client.infer("simple_identity", [x]).as_numpy("OUTPUT0")
    assert got.shape == arr.shape and list(got.reshape(-1)) == ELEMENTS

    # Typed contents (`bytes_contents`), as the explicit-byte-content examples send them.
    stub = srv.stub()
    req = service_pb2.ModelInferRequest(model_name="simple_identity")
    t = req.inputs.add(name="INPUT0", datatype="BYTES", shape=[2, 2])
    t.contents.bytes_contents.extend([b"a", b"", b"\x00\x01"[1:], "é".encode()])
    resp = stub.ModelInfer(req)
    out = resp.outputs[0]
    assert (out.name, out.datatype, list(out.shape)) == ("OUTPUT0", "BYTES", [2, 2])
    raw = resp.raw_output_contents[0]
    elements, at = [], 0
    while at < len(raw):
        n = int.from_bytes(raw[at:at + 4], "little")
        elements.append(raw[at + 4:at + 4 + n])
        at += 4 + n
    assert elements == [b"a", b"", b"\x01", "é".encode()]

    # Over HTTP, with the binary-data extension.
    h = http_of(srv)
    try:
        r = h.infer("simple_identity", [http_input(arr)])
        assert list(r.as_numpy("OUTPUT0").reshape(-1)) == ELEMENTS
    finally:
        h.close()


def http_input(arr: np.ndarray) -> httpclient.InferInput:
    x = httpclient.InferInput("INPUT0", list(arr.shape), np_to_triton_dtype(arr.dtype))
    x.set_data_from_numpy(arr, binary_data=True)
    return x


def test_a_nul_byte_is_refused_by_name(srv):
    client = srv.client()
    arr = np.array([b"ok", b"nul\x00inside"], dtype=np.object_).reshape(1, 2)
    x = grpcclient.InferInput("INPUT0", [1, 2], "BYTES")
    x.set_data_from_numpy(arr)
    with raises_status("INVALID_ARGUMENT", "'INPUT0'", "NUL"):
        client.infer("simple_identity", [x])


# --- simple_grpc_model_control -------------------------------------------------------------------


def test_model_control_example(server_factory, repo):
    srv = server_factory([], models_dir=repo)
    client = srv.client()
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert set(MODELS) <= set(index), sorted(index)
    client.load_model("simple")
    assert client.is_model_ready("simple")

    # A configuration that is not JSON: refused, saying "failed to load" as Triton does, with
    # our own reason after it; the model keeps serving.
    with raises_status("INVALID_ARGUMENT", "failed to load", "'simple'", "JSON") as box:
        client.load_model("simple", config='"parameters": {"config": {{"max_batch_size": "16"}}}')
    assert box[0].message().count("failed to load") == 1, box[0].message()
    assert client.is_model_ready("simple")

    # The example's good override: max_batch_size as a string.
    client.load_model("simple", config='{"max_batch_size":"16"}')
    assert client.get_model_config("simple").config.max_batch_size == 16
    assert client.is_model_ready("simple")

    client.unload_model("simple")
    assert not client.is_model_ready("simple")

    with raises_status("NOT_FOUND", "failed to load", "'wrong_model_name'"):
        client.load_model("wrong_model_name")
    assert client.is_server_live()

    # The same answers over HTTP.
    h = http_of(srv)
    try:
        h.load_model("simple")
        for config, fragment in (('{"max_batch_size": 16', "JSON"), ('{"nope": 1}', "nope")):
            with pytest.raises(InferenceServerException) as e:
                h.load_model("simple", config=config)
            assert e.value.status() == "400", e.value
            assert "failed to load" in e.value.message() and fragment in e.value.message()
        with pytest.raises(InferenceServerException) as e:
            h.load_model("wrong_model_name")
        assert e.value.status() == "404" and "failed to load" in e.value.message()
        assert h.is_model_ready("simple")
    finally:
        h.close()


# --- reuse_infer_objects_client ------------------------------------------------------------------


def test_reuse_infer_objects_example(srv, regions):
    client = srv.client()
    client.unregister_system_shared_memory()
    client.unregister_cuda_shared_memory()
    a = np.arange(16, dtype=np.int32)
    b = np.ones(16, dtype=np.int32)
    size = a.nbytes
    handles = {}
    for tag, data in (("in0", a), ("in1", b), ("out0", None), ("out1", None)):
        handles[tag] = regions.make(tag, size)
        if data is not None:
            shm.set_shared_memory_region(handles[tag], [data])
        client.register_system_shared_memory(tag, regions.key(tag), size)

    inputs = [grpcclient.InferInput(f"INPUT{i}", [1, 16], "INT32") for i in (0, 1)]
    outputs = [grpcclient.InferRequestedOutput(f"OUTPUT{i}") for i in (0, 1)]

    def round_trip(use_shm: bool):
        x, y = (a, b) if use_shm else (a, b * 2)
        if use_shm:
            inputs[0].set_shared_memory("in0", size)
            inputs[1].set_shared_memory("in1", size)
            outputs[0].set_shared_memory("out0", size)
            outputs[1].set_shared_memory("out1", size)
        else:
            inputs[0].set_data_from_numpy(x.reshape(1, 16))
            inputs[1].set_data_from_numpy(y.reshape(1, 16))
            outputs[0].unset_shared_memory()
            outputs[1].unset_shared_memory()
        result = client.infer("simple", inputs, outputs=outputs)
        got = []
        for i in (0, 1):
            out = result.get_output(f"OUTPUT{i}")
            assert out is not None, f"OUTPUT{i} missing"
            if use_shm:
                got.append(shm.get_contents_as_numpy(
                    handles[f"out{i}"], triton_to_np_dtype(out.datatype), out.shape))
            else:
                got.append(result.as_numpy(f"OUTPUT{i}"))
        np.testing.assert_array_equal(got[0][0], x + y)
        np.testing.assert_array_equal(got[1][0], x - y)

    for use_shm in (True, False, True):
        round_trip(use_shm)
    client.unregister_system_shared_memory()

    # The example's HTTP form: the same with tritonclient.http's objects, through shared
    # memory, then with the data in the request (JSON and binary), then through it again.
    h = http_of(srv)
    try:
        h.unregister_system_shared_memory()
        h.unregister_cuda_shared_memory()
        for tag in ("in0", "in1", "out0", "out1"):
            h.register_system_shared_memory(tag, regions.key(tag), size)
        assert sorted(r["name"] for r in h.get_system_shared_memory_status()) == [
            "in0", "in1", "out0", "out1"]
        ins = [httpclient.InferInput(f"INPUT{i}", [1, 16], "INT32") for i in (0, 1)]
        outs = [httpclient.InferRequestedOutput(f"OUTPUT{i}", binary_data=True) for i in (0, 1)]
        for k, use_shm in enumerate((True, False, True), start=1):
            # Fresh results each round: the regions are cleared before a round through them.
            for tag in ("out0", "out1"):
                shm.set_shared_memory_region(handles[tag], [np.zeros(16, dtype=np.int32)])
            y = b * k
            if use_shm:
                shm.set_shared_memory_region(handles["in1"], [y])
                ins[0].set_shared_memory("in0", size)
                ins[1].set_shared_memory("in1", size)
                outs[0].set_shared_memory("out0", size)
                outs[1].set_shared_memory("out1", size)
            else:
                ins[0].set_data_from_numpy(a.reshape(1, 16), binary_data=False)
                ins[1].set_data_from_numpy(y.reshape(1, 16))
                outs[0].unset_shared_memory()
                outs[1].unset_shared_memory()
            r = h.infer("simple", ins, outputs=outs)
            for i, want in ((0, a + y), (1, a - y)):
                out = r.get_output(f"OUTPUT{i}")
                assert out is not None, f"OUTPUT{i} missing"
                if use_shm:
                    assert "data" not in out
                    assert out["parameters"]["shared_memory_region"] == f"out{i}"
                    got = shm.get_contents_as_numpy(
                        handles[f"out{i}"], triton_to_np_dtype(out["datatype"]), out["shape"])
                else:
                    got = r.as_numpy(f"OUTPUT{i}")
                np.testing.assert_array_equal(got[0], want)
        h.unregister_system_shared_memory()
        assert h.get_system_shared_memory_status() == []
    finally:
        h.close()


def test_simple_model_config_is_the_examples(srv):
    """The stand-in `simple` reports what Triton's example model does: INT32 [-1, 16] in and
    out, max_batch_size 8 (the examples send [1, 16])."""
    client = srv.client()
    config = client.get_model_config("simple", as_json=True)["config"]
    assert config["max_batch_size"] == 8
    assert [(t["name"], t["data_type"]) for t in config["input"]] == [
        ("INPUT0", "TYPE_INT32"), ("INPUT1", "TYPE_INT32")
    ]
    assert json.loads(json.dumps(config["output"]))[0]["dims"] == ["16"]
