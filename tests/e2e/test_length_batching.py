"""Length-aware batching of a text model (fastpath/src/batcher.rs): long and short sentences
sent together, concurrently, come back each with its own embedding (the one the same sentence
gets alone, within 1e-4) and its own request id; the server counts the real and padded tokens
it executed (v1 ModelStatistics fields 18 and 19, `models stats`, /metrics).

MiniLM on ONNX Runtime, as test_models.py provisions it."""

from __future__ import annotations

import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tokenizers import Tokenizer

from _helpers import http_get
from conftest import start_server, stop_server
from test_models import MINILM_DIR, MINILM_ONNX, TOLERANCE, cli, embed, need_minilm

MODEL = "minilm_onnx"
WORDS = (
    "the model batches sentences of similar lengths together so that padding costs little "
    "while every request keeps its deadline and nobody waits forever behind the others"
).split()


def sentences() -> list[str]:
    """Short phrases, sentences of 10–80 characters, long paragraphs and one past the token
    limit (truncated by the model), in a fixed order."""
    rng = random.Random(19)
    out = ["Hi.", "OK", "héllo wörld", "Yes, of course."]
    for n in range(2, 16):
        out.append(" ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + ".")
    for n in (40, 90, 400):
        out.append(" ".join(rng.choice(WORDS) for _ in range(n)) + ".")
    return out


def token_counts(texts: list[str]) -> list[int]:
    """What MiniLM's own tokenizer makes of each text (special tokens in, truncated)."""
    tok = Tokenizer.from_file(str(MINILM_DIR / "tokenizer.json"))
    limit = json.loads((MINILM_DIR / "sentence_bert_config.json").read_text())["max_seq_length"]
    tok.no_padding()
    tok.enable_truncation(limit)
    return [len(tok.encode(t).ids) for t in texts]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    need_minilm()
    repo = tmp_path_factory.mktemp("repo")
    cli(
        "models", "import", str(MINILM_DIR), "--name", MODEL, "--repository", str(repo),
        "--backend", "onnxruntime", "--onnx", str(MINILM_ONNX),
    )
    # A batching delay long enough that concurrent requests of every length wait together.
    config_file = Path(repo / MODEL / "config.json")
    config = json.loads(config_file.read_text())
    config["dynamic_batching"] = {"max_queue_delay_microseconds": 20000}
    config_file.write_text(json.dumps(config))
    s = start_server(tmp_path_factory.mktemp("len"), ["--load-model", MODEL], models_dir=repo)
    yield s
    stop_server(s)


def stats(srv) -> dict:
    out = cli("models", "stats", MODEL, "--server", srv.grpc_url, "--json").stdout
    return next(m for m in json.loads(out) if m["name"] == MODEL)


def test_mixed_lengths_sent_together_each_get_their_own_answer(srv):
    texts = sentences()
    alone = {t: embed(srv.client(), MODEL, [t])[0] for t in texts}
    before = stats(srv)

    # Every sentence four times, shuffled, from 32 threads at once; one request each, with an id.
    work = [(f"req-{i}", t) for i, t in enumerate(texts * 4)]
    random.Random(7).shuffle(work)
    local = threading.local()

    def send(item):
        rid, text = item
        if not hasattr(local, "client"):
            local.client = srv.client()
        inp = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[text.encode("utf-8")]], dtype=object))
        result = local.client.infer(MODEL, [inp], request_id=rid)
        return rid, text, result.get_response().id, result.as_numpy("EMBEDDING")

    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(send, work))

    assert len(answers) == len(work)
    for rid, text, answered_id, emb in answers:
        assert answered_id == rid, f"{rid} answered as {answered_id}"
        assert emb.shape == (1, 384)
        diff = np.abs(emb[0] - alone[text]).max()
        assert diff <= TOLERANCE, f"{text[:40]!r} ({rid}): max diff {diff:.2e} from alone"

    # The server counted exactly the real tokens of what it ran, and padded no fewer.
    after = stats(srv)
    real = after["real_tokens"] - before["real_tokens"]
    padded = after["padded_tokens"] - before["padded_tokens"]
    assert real == sum(token_counts([t for _, t in work])), (real, padded)
    assert padded >= real


def test_rows_of_mixed_lengths_in_large_requests_keep_their_order(srv):
    # Requests of many rows (over the 256 bytes counted on the runtime: these are counted on
    # a blocking thread) beside single short ones, concurrently.
    texts = sentences()
    alone = np.stack([embed(srv.client(), MODEL, [t])[0] for t in texts])
    rows = texts * 3
    order = list(range(len(rows)))
    random.Random(3).shuffle(order)
    assert sum(len(rows[i].encode()) for i in order) > 256

    def big(_):
        return embed(srv.client(), MODEL, [rows[i] for i in order])

    def small(i):
        return embed(srv.client(), MODEL, [texts[i % 4]])

    with ThreadPoolExecutor(max_workers=8) as pool:
        bigs = [pool.submit(big, n) for n in range(3)]
        smalls = [pool.submit(small, n) for n in range(24)]
        for f in bigs:
            got = f.result()
            want = np.stack([alone[i % len(texts)] for i in order])
            assert np.abs(got - want).max() <= TOLERANCE
        for n, f in enumerate(smalls):
            assert np.abs(f.result()[0] - alone[n % 4]).max() <= TOLERANCE


def test_token_counters_show_in_stats_and_metrics(srv):
    embed(srv.client(), MODEL, ["Hi.", "A much longer sentence than the first one, by far."])
    s = stats(srv)
    assert s["real_tokens"] > 0 and s["padded_tokens"] >= s["real_tokens"], s
    table = cli("models", "stats", MODEL, "--server", srv.grpc_url).stdout
    assert "PADDED/REAL" in table, table
    status, body = http_get(f"{srv.http_url}/metrics")
    assert status == 200
    for family in ("veraltheim_inference_padded_tokens_total", "veraltheim_inference_real_tokens_total"):
        line = next(
            (ln for ln in body.splitlines() if ln.startswith(family) and f'model="{MODEL}"' in ln),
            None,
        )
        assert line is not None, f"{family} missing"
        assert float(line.rsplit(" ", 1)[1]) > 0, line


def test_text_that_is_not_utf8_is_refused_alone(srv):
    inp = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[b"\xff\xfe"]], dtype=object))
    with pytest.raises(Exception) as err:
        srv.client().infer(MODEL, [inp])
    assert "UTF-8" in str(err.value), err.value
