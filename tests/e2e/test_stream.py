"""ModelStreamInfer: tritonclient's start_stream/async_stream_infer and the raw stream."""

import queue

import numpy as np
import pytest

from _helpers import (
    cost_expected,
    distinct_rows,
    fp32_input,
    infer_fp32,
    raw_request,
    response_output,
    typed_request,
)

TIMEOUT_S = 30


def collect(q: "queue.Queue", n: int):
    items = []
    for _ in range(n):
        try:
            items.append(q.get(timeout=TIMEOUT_S))
        except queue.Empty:
            pytest.fail(f"stream: got {len(items)} of {n} responses within {TIMEOUT_S} s")
    return items


@pytest.fixture
def stream_client(server):
    client = server.client()
    responses: "queue.Queue" = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    yield client, responses
    client.stop_stream()


def test_stream_responses_carry_request_ids_and_data(stream_client):
    client, responses = stream_client
    sent = {}
    for i in range(20):
        data = distinct_rows(1 + i % 4, 3, seed=100 + i)
        rid = f"stream-{i}"
        sent[rid] = data
        client.async_stream_infer("identity", [fp32_input(data)], request_id=rid)
    got = {}
    for result, error in collect(responses, len(sent)):
        assert error is None, f"unexpected stream error: {error}"
        rid = result.get_response().id
        assert rid in sent, f"response with unknown request id {rid!r}"
        assert rid not in got, f"two responses for {rid!r}"
        got[rid] = result.as_numpy("OUTPUT0")
    assert set(got) == set(sent)
    for rid, data in sent.items():
        np.testing.assert_array_equal(got[rid], data, err_msg=rid)


def test_stream_mixed_models(stream_client):
    client, responses = stream_client
    a = distinct_rows(3, 4, seed=201)
    b = distinct_rows(2, 5, seed=202)
    client.async_stream_infer("identity", [fp32_input(a)], request_id="id-a")
    client.async_stream_infer("cost", [fp32_input(b)], request_id="cost-b")
    got = {}
    for result, error in collect(responses, 2):
        assert error is None, f"unexpected stream error: {error}"
        resp = result.get_response()
        got[resp.id] = (resp.model_name, result.as_numpy("OUTPUT0"))
    assert got["id-a"][0] == "identity"
    np.testing.assert_array_equal(got["id-a"][1], a)
    assert got["cost-b"][0] == "cost"
    np.testing.assert_array_equal(got["cost-b"][1], cost_expected(b))


def test_stream_error_reported_for_that_request_and_stream_continues(stream_client):
    client, responses = stream_client
    good = {}
    for i in range(3):
        good[f"ok-{i}"] = distinct_rows(2, 2, seed=300 + i)
        client.async_stream_infer("identity", [fp32_input(good[f"ok-{i}"])], request_id=f"ok-{i}")
    client.async_stream_infer(
        "identity",
        [fp32_input(np.zeros((1, 2), np.float32), name="BAD_INPUT_NAME")],
        request_id="bad-1",
    )
    for i in range(3, 6):
        good[f"ok-{i}"] = distinct_rows(2, 2, seed=300 + i)
        client.async_stream_infer("identity", [fp32_input(good[f"ok-{i}"])], request_id=f"ok-{i}")

    items = collect(responses, len(good) + 1)
    errors = [e for r, e in items if e is not None]
    results = [r for r, e in items if e is None]
    assert len(errors) == 1, f"expected exactly one error, got {[str(e) for e in errors]}"
    assert "BAD_INPUT_NAME" in errors[0].message(), errors[0].message()
    got = {r.get_response().id: r.as_numpy("OUTPUT0") for r in results}
    assert set(got) == set(good)
    for rid, data in good.items():
        np.testing.assert_array_equal(got[rid], data, err_msg=rid)

    # The stream is still usable after the error.
    late = distinct_rows(1, 3, seed=399)
    client.async_stream_infer("identity", [fp32_input(late)], request_id="after-error")
    [(result, error)] = collect(responses, 1)
    assert error is None, f"stream broken after a request error: {error}"
    assert result.get_response().id == "after-error"
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), late)


def test_stream_unknown_model_error_continues(stream_client):
    client, responses = stream_client
    client.async_stream_infer(
        "no-such-model", [fp32_input(np.zeros((1, 1), np.float32))], request_id="nm"
    )
    data = distinct_rows(1, 2, seed=401)
    client.async_stream_infer("identity", [fp32_input(data)], request_id="ok")
    items = collect(responses, 2)
    errors = [e for r, e in items if e is not None]
    results = [r for r, e in items if e is None]
    assert len(errors) == 1 and "no-such-model" in errors[0].message(), [str(e) for e in errors]
    assert [r.get_response().id for r in results] == ["ok"]
    np.testing.assert_array_equal(results[0].as_numpy("OUTPUT0"), data)


def test_raw_stream_typed_raw_and_error_attribution(stub):
    """The raw wire: typed and raw requests on one stream; the error response for a bad
    request names the input and can be attributed to that request (its id in
    infer_response.id, as Triton does, or in the message)."""
    a = distinct_rows(2, 3, seed=501)
    b = distinct_rows(3, 2, seed=502)
    bad = raw_request(np.zeros((1, 3), np.float32), shape=[1, 4], request_id="raw-bad")
    requests = [
        raw_request(a, request_id="raw-a"),
        bad,
        typed_request(b, request_id="typed-b"),
    ]
    responses = list(stub.ModelStreamInfer(iter(requests), timeout=TIMEOUT_S))
    assert len(responses) == 3, responses
    ok = {r.infer_response.id: r for r in responses if not r.error_message}
    errs = [r for r in responses if r.error_message]
    assert set(ok) == {"raw-a", "typed-b"}
    np.testing.assert_array_equal(response_output(ok["raw-a"].infer_response), a)
    np.testing.assert_array_equal(response_output(ok["typed-b"].infer_response), b)
    assert len(errs) == 1
    err = errs[0]
    assert "INPUT0" in err.error_message, err.error_message
    assert err.infer_response.id == "raw-bad" or "raw-bad" in err.error_message, (
        f"stream error cannot be attributed to its request: {err}"
    )


def test_raw_stream_fifty_requests_all_answered(stub):
    sent = {f"r{i}": distinct_rows(1, 8, seed=600 + i) for i in range(50)}
    requests = (raw_request(d, request_id=rid) for rid, d in sent.items())
    responses = list(stub.ModelStreamInfer(requests, timeout=TIMEOUT_S))
    assert all(not r.error_message for r in responses), [r.error_message for r in responses]
    got = {r.infer_response.id: response_output(r.infer_response) for r in responses}
    assert set(got) == set(sent) and len(responses) == len(sent)
    for rid, data in sent.items():
        np.testing.assert_array_equal(got[rid], data, err_msg=rid)


def test_unary_still_works_after_streams(grpc_client):
    data = distinct_rows(2, 2, seed=700)
    np.testing.assert_array_equal(infer_fp32(grpc_client, "identity", data), data)
