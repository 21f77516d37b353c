"""The model repository and the real backends, end to end with the stock tritonclient:
`veraltheim models import` of all-MiniLM-L6-v2 (candle, and ONNX Runtime from its ONNX export),
embeddings equal to the float64 reference, load/unload/reload, load on the first request, the
memory budget (refusal with the budget named, LRU eviction), and ONNX Runtime missing.

The model files come from scripts/provision-models (run by scripts/test):
$VERALTHEIM_MINILM_DIR and $VERALTHEIM_MINILM_ONNX, defaulting to .cache/models/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from _helpers import REPO_ROOT, binary_path, infer_fp32

TOLERANCE = 1e-4
MINILM_DIR = Path(
    os.environ.get("VERALTHEIM_MINILM_DIR", REPO_ROOT / ".cache/models/all-MiniLM-L6-v2")
)
MINILM_ONNX = Path(
    os.environ.get("VERALTHEIM_MINILM_ONNX", REPO_ROOT / ".cache/models/all-MiniLM-L6-v2.onnx")
)
REFERENCE = json.loads((REPO_ROOT / "testdata/minilm-reference.json").read_text())


def need_minilm() -> None:
    if not (MINILM_DIR / "model.safetensors").is_file() or not MINILM_ONNX.is_file():
        pytest.fail(
            f"all-MiniLM-L6-v2 not provisioned at {MINILM_DIR} / {MINILM_ONNX}: "
            "run scripts/provision-models (scripts/test does)",
            pytrace=False,
        )


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(binary_path()), *args], capture_output=True, text=True, timeout=120
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"veraltheim {' '.join(args)} failed: {proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def minilm_repo(tmp_path_factory) -> Path:
    """A repository with MiniLM imported twice: `minilm` (candle), `minilm_onnx` (ONNX Runtime)."""
    need_minilm()
    repo = tmp_path_factory.mktemp("repo")
    out = cli("models", "import", str(MINILM_DIR), "--name", "minilm", "--repository", str(repo))
    assert Path(out.stdout.strip()) == repo / "minilm"
    cli(
        "models", "import", str(MINILM_DIR), "--name", "minilm_onnx", "--repository", str(repo),
        "--backend", "onnxruntime", "--onnx", str(MINILM_ONNX),
    )
    return repo


def embed(client, model: str, texts: list[str]) -> np.ndarray:
    data = np.array([[t.encode("utf-8")] for t in texts], dtype=object)
    inp = grpcclient.InferInput("TEXT", [len(texts), 1], "BYTES")
    inp.set_data_from_numpy(data)
    result = client.infer(model, [inp])
    out = result.as_numpy("EMBEDDING")
    assert out is not None, result.get_response()
    return out


def assert_reference(emb: np.ndarray, items: list[dict]) -> None:
    assert emb.shape == (len(items), 384)
    for row, item in zip(emb, items):
        diff = np.abs(row - np.asarray(item["embedding"], dtype=np.float64)).max()
        assert diff <= TOLERANCE, f"{item['text'][:40]!r}: max diff {diff:.2e}"


def assert_memory_found(srv, model: str) -> int:
    """Checks how the allocator found the memory of `model` (loaded on the CPU) and that the
    figure is plausible for MiniLM's weights; returns it. Candle counts the tensors it holds
    ("reported"): all of the weights file but its header and unused tensors. ONNX Runtime
    cannot count, so the process's growth during the load is charged ("measured"): at least
    half the .onnx file, at most four times it. "estimate" (nothing measured) fails."""
    memory = json.loads(cli("models", "memory", "--server", srv.grpc_url, "--json").stdout)
    cpu = next(d for d in memory if d["device"] == "cpu")
    holder = next(h for h in cpu["holders"] if h["key"].split("#")[0] == model)
    assert holder["state"] == "READY", holder
    got = holder["bytes"]
    if model == "minilm":
        weights = (MINILM_DIR / "model.safetensors").stat().st_size
        assert holder["measurement"] == "reported", holder
        assert 0.9 * weights <= got <= weights, (got, weights, holder)
    else:
        weights = MINILM_ONNX.stat().st_size
        assert holder["measurement"] == "measured", holder
        assert 0.5 * weights <= got <= 4 * weights, (got, weights, holder)
    return got


def test_import_refuses_bad_sources(tmp_path):
    proc = cli("models", "import", str(tmp_path), "--name", "x", "--repository",
               str(tmp_path / "repo"), check=False)
    assert proc.returncode != 0
    assert "sentence-transformers layout" in proc.stderr
    need_minilm()
    proc = cli("models", "import", str(MINILM_DIR), "--name", "x", "--repository",
               str(tmp_path / "repo"), "--backend", "onnxruntime", check=False)
    assert proc.returncode != 0 and "--onnx" in proc.stderr


def test_an_int8_import_is_served_with_its_measured_accuracy(server_factory, tmp_path):
    """`models import --quantize int8`: the graph's weight matrices become int8, the import
    measures the cosine to the FP32 graph and writes it into the config, which the served model
    reports; the embeddings stay close to the float64 reference (not within 1e-4: int8)."""
    need_minilm()
    repo = tmp_path / "repo"
    base = ["models", "import", str(MINILM_DIR), "--repository", str(repo)]
    proc = cli(*base, "--name", "bad", "--quantize", "int4", "--backend", "onnxruntime",
               "--onnx", str(MINILM_ONNX), check=False)
    assert proc.returncode != 0 and "expected int8" in proc.stderr, proc.stderr
    proc = cli(*base, "--name", "bad", "--quantize", "int8", check=False)
    assert proc.returncode != 0 and "needs --backend onnxruntime" in proc.stderr, proc.stderr
    assert not (repo / "bad" / "1").exists()
    out = cli(*base, "--name", "minilm_int8", "--backend", "onnxruntime",
              "--onnx", str(MINILM_ONNX), "--quantize", "int8")
    assert "int8: 36 of 48 MatMul quantised" in out.stderr, out.stderr
    assert Path(out.stdout.strip()) == repo / "minilm_int8"
    written = json.loads((repo / "minilm_int8" / "config.json").read_text())["parameters"]
    cos_min = float(written["quantization_cosine_min"]["string_value"])
    cos_mean = float(written["quantization_cosine_mean"]["string_value"])
    # Measured: min 0.9515 (the shortest texts), mean 0.991; a broken rewrite is far below.
    assert 0.9 < cos_min <= cos_mean < 1.0 and cos_mean > 0.98, written

    srv = server_factory(["--load-model", "minilm_int8"], models_dir=repo)
    client = srv.client()
    served = client.get_model_config("minilm_int8", as_json=True)["config"]["parameters"]
    assert served["quantization"]["string_value"] == "int8", served
    assert float(served["quantization_cosine_min"]["string_value"]) == cos_min
    items = REFERENCE["items"]
    emb = embed(client, "minilm_int8", [i["text"] for i in items])
    for row, item in zip(emb, items):
        ref = np.asarray(item["embedding"], dtype=np.float64)
        cos = float(row @ ref / (np.linalg.norm(row) * np.linalg.norm(ref)))
        assert cos > 0.9, f"{item['text'][:40]!r}: cosine {cos:.4f} to the reference"


@pytest.mark.parametrize("model", ["minilm", "minilm_onnx"])
def test_embeddings_equal_the_reference(server_factory, minilm_repo, model):
    srv = server_factory(["--load-model", model], models_dir=minilm_repo)
    client = srv.client()
    items = REFERENCE["items"]
    # One request with every sentence: mixed lengths, one padded batch.
    assert_reference(embed(client, model, [i["text"] for i in items]), items)
    # One by one: padding must not change a sentence's embedding.
    for item in items[:3] + items[-2:]:
        assert_reference(embed(client, model, [item["text"]]), [item])
    e = embed(client, model, [items[0]["text"], items[1]["text"]])
    assert abs(float(e[0] @ e[1]) - float(REFERENCE["cosine_sentence0_sentence1"])) < 1e-3
    meta = client.get_model_metadata(model)
    assert [i.name for i in meta.inputs] == ["TEXT"] and meta.inputs[0].datatype == "BYTES"
    assert meta.outputs[0].name == "EMBEDDING" and list(meta.outputs[0].shape) == [-1, 384]
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index[model].state == "READY" and index[model].version == "1"
    assert_memory_found(srv, model)


def test_load_unload_reload_and_load_on_first_request(server_factory, minilm_repo):
    srv = server_factory(["--load-model", "identity"], models_dir=minilm_repo)
    client = srv.client()
    assert not client.is_model_ready("minilm_onnx")
    # Imported models load on their first request (load_on_demand), within its deadline.
    text = REFERENCE["items"][0]
    assert_reference(embed(client, "minilm_onnx", [text["text"]]), [text])
    assert client.is_model_ready("minilm_onnx")
    client.unload_model("minilm_onnx")
    assert not client.is_model_ready("minilm_onnx")
    client.load_model("minilm_onnx")
    assert client.is_model_ready("minilm_onnx")
    # A reload with a bad config keeps the old version serving.
    with pytest.raises(InferenceServerException) as err:
        client.load_model("minilm_onnx", config=json.dumps({"input": [
            {"name": "WRONG", "data_type": "TYPE_STRING", "dims": [1]}]}))
    assert "WRONG" in str(err.value)
    assert client.is_model_ready("minilm_onnx")
    assert_reference(embed(client, "minilm_onnx", [text["text"]]), [text])
    # An override naming one field works on a model whose inputs come from its files.
    client.load_model("minilm_onnx", config=json.dumps({"dynamic_batching": None}))
    config = client.get_model_config("minilm_onnx").config
    assert not config.HasField("dynamic_batching") and config.input[0].name == "TEXT"
    assert_reference(embed(client, "minilm_onnx", [text["text"]]), [text])
    models = json.loads(cli("models", "--server", srv.grpc_url, "--json").stdout)
    m = {x["name"]: x for x in models}["minilm_onnx"]
    assert m["state"] == "READY" and m["device"] == "cpu"
    # Charged what its load measured (not the estimate), after four loads and an unload.
    assert m["memory_bytes"] == assert_memory_found(srv, "minilm_onnx")


def test_a_model_too_big_for_the_budget_is_refused_naming_it(server_factory, minilm_repo):
    # 64 MiB for models: MiniLM's files alone are ~90 MB.
    srv = server_factory(
        ["--load-model", "identity", "--cpu-memory-bytes", str(64 << 20),
         "--memory-reserve-bytes", "0"],
        models_dir=minilm_repo,
    )
    client = srv.client()
    with pytest.raises(InferenceServerException) as err:
        client.load_model("minilm")
    msg = str(err.value)
    assert "RESOURCE_EXHAUSTED" in msg or "StatusCode.RESOURCE_EXHAUSTED" in repr(err.value), msg
    assert "cpu budget" in msg and "64.0 MiB" in msg, msg
    assert infer_fp32(client, "identity", np.ones((1, 4), np.float32)).shape == (1, 4)


def test_eviction_under_a_small_budget(server_factory, tmp_path):
    """Built-in-backed repository models that claim 100 MiB each, in a 250 MiB budget."""
    repo = tmp_path / "repo"
    for name, pinned in [("a", True), ("b", False), ("c", False)]:
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.json").write_text(json.dumps({
            "backend": "builtin", "max_batch_size": 8, "pinned": pinned,
            "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
            "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
            "parameters": {"builtin": {"string_value": "identity"},
                           "memory_bytes": {"string_value": str(100 << 20)}},
        }))
    srv = server_factory(
        ["--load-model", "a", "--load-model", "b", "--cpu-memory-bytes", str(250 << 20),
         "--memory-reserve-bytes", "0"],
        models_dir=repo,
    )
    client = srv.client()
    assert client.is_model_ready("a") and client.is_model_ready("b")
    client.load_model("c")
    assert client.is_model_ready("c")
    assert not client.is_model_ready("b"), "b (idle, unpinned) should have been evicted"
    assert client.is_model_ready("a"), "a is pinned"
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert "evicted to make room for 'c'" in index["b"].reason
    memory = json.loads(cli("models", "memory", "--server", srv.grpc_url, "--json").stdout)
    cpu = next(d for d in memory if d["device"] == "cpu")
    assert cpu["held_bytes"] == 200 << 20
    assert sorted(h["key"].split("#")[0] for h in cpu["holders"]) == ["a", "c"]


def test_onnx_models_fail_clearly_without_onnx_runtime(server_factory, minilm_repo):
    env = {k: v for k, v in os.environ.items() if k != "ORT_DYLIB_PATH"}
    srv = server_factory(["--load-model", "identity"], models_dir=minilm_repo, env=env)
    client = srv.client()
    with pytest.raises(InferenceServerException) as err:
        client.load_model("minilm_onnx")
    assert "ORT_DYLIB_PATH" in str(err.value)
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["minilm_onnx"].state == "UNAVAILABLE"
    assert "ORT_DYLIB_PATH" in index["minilm_onnx"].reason
    # The rest of the server runs.
    assert infer_fp32(client, "identity", np.ones((1, 4), np.float32)).shape == (1, 4)


ONNX_TEST = Path(
    os.environ.get("VERALTHEIM_ONNX_TEST_DIR", REPO_ROOT / ".cache/models/onnx-test")
)


def test_a_triton_repository_with_config_pbtxt_serves(server_factory, tmp_path):
    """A model folder as Triton users have them: config.pbtxt (text format, list fields without
    colons), version folders, model.onnx; dynamic batching and two instances."""
    graph = ONNX_TEST / "add_mul" / "model.onnx"
    if not graph.is_file():
        pytest.fail(f"{graph} missing: run scripts/provision-models", pytrace=False)
    repo = tmp_path / "repo"
    for v in ("1", "2"):
        (repo / "add_mul" / v).mkdir(parents=True)
        shutil.copy(graph, repo / "add_mul" / v / "model.onnx")
    (repo / "add_mul" / "config.pbtxt").write_text(
        """
name: "add_mul"
backend: "onnxruntime"
max_batch_size: 16
input [
  { name: "A" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "B" data_type: TYPE_FP32 dims: [ 4 ] }
]
output [
  { name: "SUM" data_type: TYPE_FP32 dims: [ 4 ] },
  { name: "PRODUCT" data_type: TYPE_FP32 dims: [ 4 ] }
]
dynamic_batching { max_queue_delay_microseconds: 500 }
instance_group [ { count: 2 kind: KIND_CPU } ]
version_policy: { specific: { versions: [ 1 ] } }
model_warmup [ {
  name: "zeros" batch_size: 2
  inputs { key: "A" value: { data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } }
  inputs { key: "B" value: { data_type: TYPE_FP32 dims: [ 4 ] random_data: true } }
} ]
"""
    )
    srv = server_factory(["--load-model", "add_mul"], models_dir=repo)
    client = srv.client()
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.full((2, 4), 2.0, np.float32)
    ins = []
    for name, arr in (("A", a), ("B", b)):
        x = grpcclient.InferInput(name, [2, 4], "FP32")
        x.set_data_from_numpy(arr)
        ins.append(x)
    result = client.infer("add_mul", ins)
    np.testing.assert_array_equal(result.as_numpy("SUM"), a + b)
    np.testing.assert_array_equal(result.as_numpy("PRODUCT"), a * b)
    config = client.get_model_config("add_mul").config
    assert config.max_batch_size == 16 and config.instance_group[0].count == 2
    assert list(config.version_policy.specific.versions) == [1]
    assert config.model_warmup[0].name == "zeros"
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["add_mul"].version == "1"
    assert client.is_model_ready("add_mul", "1") and not client.is_model_ready("add_mul", "2")


def test_batch_inference_jobs_run_through_the_model_with_progress(server_factory, minilm_repo, tmp_path):
    """`jobs submit --model --input --output`: JSON lines in, JSON lines out, in input order, a
    bad line reported in place without failing the job; the job reaches SUCCEEDED."""
    # Inference jobs read and write only under the configured folders (issue 18, case 7).
    srv = server_factory(["--load-model", "identity",
                          "--inference-input-dirs", str(tmp_path),
                          "--inference-output-dir", str(tmp_path)], models_dir=minilm_repo)
    items = REFERENCE["items"][:5]
    src = tmp_path / "in.jsonl"
    src.write_text(
        "\n".join(json.dumps({"text": i["text"]}) for i in items) + "\n"
        + json.dumps({"text": 42}) + "\n"
    )
    out = tmp_path / "out.jsonl"
    job = cli("jobs", "submit", "--server", srv.grpc_url, "--name", "embed",
              "--model", "minilm_onnx", "--input", str(src), "--output", str(out)).stdout.strip()
    watched = cli("jobs", "watch", job, "--server", srv.grpc_url, check=False)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    got = json.loads(cli("jobs", "get", job, "--server", srv.grpc_url, "--json").stdout)
    assert got["state"] == "SUCCEEDED" and got["progress"] == 1.0, got
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert [l["line"] for l in lines] == list(range(6))
    emb = np.array([l["outputs"]["EMBEDDING"]["data"] for l in lines[:5]], dtype=np.float64)
    assert_reference(emb, items)
    assert "must be a string" in lines[5]["error"]
    # An unknown model fails the job with the reason.
    job = cli("jobs", "submit", "--server", srv.grpc_url, "--model", "nope",
              "--input", str(src), "--output", str(tmp_path / "x.jsonl")).stdout.strip()
    assert cli("jobs", "watch", job, "--server", srv.grpc_url, check=False).returncode != 0
    got = json.loads(cli("jobs", "get", job, "--server", srv.grpc_url, "--json").stdout)
    assert got["state"] == "FAILED" and "nope" in got["reason"], got
    assert not (tmp_path / "x.jsonl").exists()
