"""OpenAI-compatible embeddings with the stock `openai` package: the vectors equal the KServe
(gRPC) answers for the same sentences, base64 carries the same floats, `usage` holds the model's
own token counts, `/v1/models` lists the embedding models, and refusals are 400/404 JSON in
OpenAI's error shape. Both real backends serve: MiniLM on candle and on ONNX Runtime.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
from tokenizers import Tokenizer

from conftest import start_server, stop_server
from test_models import MINILM_DIR, embed, minilm_repo  # noqa: F401  (minilm_repo: a fixture)

MODELS = ["minilm", "minilm_onnx"]
TEXTS = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog.",
    "Embeddings map sentences to vectors; similar meanings land close together.",
    "héllo wörld",
]


@pytest.fixture(scope="module")
def srv(tmp_path_factory, minilm_repo):  # noqa: F811
    s = start_server(
        tmp_path_factory.mktemp("openai"),
        ["--load-model", "minilm", "--load-model", "minilm_onnx", "--load-model", "identity"],
        models_dir=minilm_repo,
    )
    yield s
    stop_server(s)


@pytest.fixture
def client(srv):
    c = openai.OpenAI(base_url=f"{srv.http_url}/v1", api_key="not-checked", max_retries=0)
    yield c
    c.close()


def post(srv, path: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"{srv.http_url}{path}", data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def token_counts(texts: list[str]) -> list[int]:
    """The tokens MiniLM's own tokenizer gives each text: special tokens included, truncated at
    the model's max_seq_length (what the model sees)."""
    tok = Tokenizer.from_file(str(MINILM_DIR / "tokenizer.json"))
    limit = json.loads((MINILM_DIR / "sentence_bert_config.json").read_text())["max_seq_length"]
    tok.no_padding()
    tok.enable_truncation(limit)
    return [len(tok.encode(t).ids) for t in texts]


@pytest.mark.parametrize("model", MODELS)
def test_vectors_equal_the_kserve_answers(srv, client, model):
    over_grpc = embed(srv.client(), model, TEXTS)
    # The openai package asks for base64 and decodes it itself.
    r = client.embeddings.create(model=model, input=TEXTS)
    assert r.model == model and r.object == "list"
    assert [d.index for d in r.data] == list(range(len(TEXTS)))
    got = np.array([d.embedding for d in r.data], dtype=np.float32)
    np.testing.assert_array_equal(got, over_grpc)
    # And as floats.
    r = client.embeddings.create(model=model, input=TEXTS, encoding_format="float")
    np.testing.assert_array_equal(np.array([d.embedding for d in r.data], np.float32), over_grpc)


def test_base64_decodes_to_the_same_floats(srv):
    over_grpc = embed(srv.client(), "minilm_onnx", TEXTS)
    status, floats = post(srv, "/v1/embeddings", {"model": "minilm_onnx", "input": TEXTS,
                                                  "encoding_format": "float"})
    assert status == 200, floats
    status, coded = post(srv, "/v1/embeddings", {"model": "minilm_onnx", "input": TEXTS,
                                                 "encoding_format": "base64"})
    assert status == 200, coded
    for f, b, g in zip(floats["data"], coded["data"], over_grpc):
        assert isinstance(b["embedding"], str)
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.array(f["embedding"], dtype=np.float32))
        np.testing.assert_array_equal(decoded, g)
        assert f["object"] == b["object"] == "embedding"


def test_usage_counts_the_models_tokens(client):
    texts = TEXTS + ["token " * 400]  # past the 256-token limit: counted as truncated
    r = client.embeddings.create(model="minilm_onnx", input=texts)
    expected = sum(token_counts(texts))
    assert r.usage.prompt_tokens == expected
    assert r.usage.total_tokens == expected
    r = client.embeddings.create(model="minilm", input="hello")
    assert r.usage.prompt_tokens == token_counts(["hello"])[0] == 3


def test_a_single_string_is_one_embedding(srv, client):
    r = client.embeddings.create(model="minilm", input="A single sentence.")
    assert len(r.data) == 1 and r.data[0].index == 0
    np.testing.assert_array_equal(
        np.array(r.data[0].embedding, dtype=np.float32),
        embed(srv.client(), "minilm", ["A single sentence."])[0],
    )


def test_more_texts_than_one_batch_keep_their_order(srv, client):
    texts = [f"Sentence number {i} is about {'cats' if i % 2 else 'boats'}." for i in range(150)]
    r = client.embeddings.create(model="minilm_onnx", input=texts)
    assert [d.index for d in r.data] == list(range(150))
    got = np.array([d.embedding for d in r.data], dtype=np.float32)
    # The server sends at most max_batch_size (64) texts per call; the same chunks over gRPC.
    g = srv.client()
    over_grpc = np.concatenate([embed(g, "minilm_onnx", texts[i:i + 64]) for i in (0, 64, 128)])
    np.testing.assert_allclose(got, over_grpc, atol=1e-6)
    assert r.usage.prompt_tokens == sum(token_counts(texts))


def test_dimensions_only_as_the_model_makes_them(client):
    r = client.embeddings.create(model="minilm", input="x", dimensions=384)
    assert len(r.data[0].embedding) == 384
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="minilm", input="x", dimensions=128)
    assert e.value.status_code == 400
    assert "384" in e.value.message and "cannot shorten" in e.value.message
    assert e.value.param == "dimensions"


def test_models_lists_the_embedding_models(client):
    listed = {m.id: m for m in client.models.list()}
    assert set(listed) == {"minilm", "minilm_onnx"}, listed
    assert all(m.object == "model" and m.owned_by == "veraltheim" for m in listed.values())
    assert client.models.retrieve("minilm_onnx").id == "minilm_onnx"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("identity")
    assert "BYTES" in e.value.message


def test_unknown_model_is_404_in_openais_shape(srv, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="no-such-model", input="x")
    assert e.value.status_code == 404
    assert e.value.code == "model_not_found" and e.value.type == "invalid_request_error"
    assert "'no-such-model'" in e.value.message
    status, body = post(srv, "/v1/embeddings", {"model": "no-such-model", "input": "x"})
    assert status == 404
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_models_that_are_not_text_embedders_are_400_naming_why(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="identity", input="x")
    assert "takes FP32 input 'INPUT0'" in e.value.message and "BYTES" in e.value.message
    assert e.value.param == "model"


@pytest.mark.parametrize("tokens", [[101, 7592, 102], [[101, 7592, 102], [101, 102]]])
def test_token_arrays_are_refused_clearly(client, tokens):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="minilm", input=tokens)
    assert "token ids" in e.value.message and e.value.param == "input"


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"model": "minilm", "input": "x", "encoding_format": "int8"}, "'encoding_format'"),
        ({"model": "minilm", "input": []}, "empty list"),
        ({"model": "minilm", "input": ["a", 3.5]}, "token ids"),
        ({"model": "minilm", "input": ["a", None]}, "'input'[1] is null"),
        ({"model": "minilm", "input": "x", "temperature": 1}, "unknown field `temperature`"),
        ({"input": "x"}, "missing field `model`"),
        (b"{not json", "not valid"),
    ],
)
def test_bad_requests_are_400_in_openais_shape(srv, body, fragment):
    status, answer = post(srv, "/v1/embeddings", body)
    assert status == 400, answer
    error = answer["error"]
    assert error["type"] == "invalid_request_error"
    assert fragment in error["message"], error
