"""Model repository control: unload, load, load with a config override.
Every test here mutates models, so each one runs against its own server."""

import json
import time

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from _helpers import cost_config, cost_expected, distinct_rows, infer_fp32, raises_status


def index_by_name(client):
    index = client.get_model_repository_index(as_json=True)
    return {m["name"]: m for m in index.get("models", [])}


def test_unload_then_load_cost(own_server):
    client = own_server.client()
    data = distinct_rows(2, 3, seed=1000)
    np.testing.assert_array_equal(infer_fp32(client, "cost", data), cost_expected(data))

    client.unload_model("cost")
    assert client.is_model_ready("cost") is False
    with pytest.raises(InferenceServerException) as excinfo:
        infer_fp32(client, "cost", data)
    assert excinfo.value.status() in (
        "StatusCode.UNAVAILABLE",
        "StatusCode.NOT_FOUND",
        "StatusCode.FAILED_PRECONDITION",
    ), f"{excinfo.value.status()}: {excinfo.value.message()}"
    assert "cost" in (excinfo.value.message() or "")
    entry = index_by_name(client).get("cost")
    assert entry is not None, "an unloaded model stays listed in the repository index"
    assert entry.get("state") != "READY", entry
    # Other models are not affected.
    assert client.is_model_ready("identity") is True
    np.testing.assert_array_equal(infer_fp32(client, "identity", data), data)

    client.load_model("cost")
    assert client.is_model_ready("cost") is True
    assert index_by_name(client)["cost"].get("state") == "READY"
    np.testing.assert_array_equal(infer_fp32(client, "cost", data), cost_expected(data))


def test_load_cost_with_config_override(own_server):
    client = own_server.client()
    assert client.get_model_config("cost").config.max_batch_size != 8

    client.load_model("cost", config=cost_config(base_us=20000, per_item_us=100, max_batch_size=8))
    assert client.is_model_ready("cost") is True
    config = client.get_model_config("cost").config
    assert config.max_batch_size == 8
    assert config.parameters["base_us"].string_value == "20000"
    assert config.parameters["per_item_us"].string_value == "100"
    # Fields the override did not name keep their defaults.
    assert [i.name for i in config.input] == ["INPUT0"]
    assert [o.name for o in config.output] == ["OUTPUT0"]

    eight = distinct_rows(8, 3, seed=1001)
    start = time.monotonic()
    np.testing.assert_array_equal(infer_fp32(client, "cost", eight), cost_expected(eight))
    elapsed = time.monotonic() - start
    # The model busy-computes base_us + per_item_us * batch >= 20.8 ms: a lower bound
    # only, showing the new parameters took effect (the default would take ~0.9 ms).
    assert elapsed >= 0.0208, f"cost with base_us=20000 answered in {elapsed * 1000:.1f} ms"

    nine = distinct_rows(9, 3, seed=1002)
    with raises_status("INVALID_ARGUMENT"):
        infer_fp32(client, "cost", nine)


def test_load_override_then_plain_load_keeps_model_serving(own_server):
    client = own_server.client()
    client.load_model("cost", config=json.dumps({"max_batch_size": 4}))
    config = client.get_model_config("cost").config
    assert config.max_batch_size == 4
    data = distinct_rows(4, 2, seed=1003)
    np.testing.assert_array_equal(infer_fp32(client, "cost", data), cost_expected(data))
    with raises_status("INVALID_ARGUMENT"):
        infer_fp32(client, "cost", distinct_rows(5, 2, seed=1004))


def test_load_with_invalid_config_json(own_server):
    client = own_server.client()
    with pytest.raises(InferenceServerException) as excinfo:
        client.load_model("cost", config="{not json")
    assert excinfo.value.status() == "StatusCode.INVALID_ARGUMENT", (
        f"{excinfo.value.status()}: {excinfo.value.message()}"
    )
    # A failed load must not take the serving model down.
    data = distinct_rows(2, 2, seed=1005)
    np.testing.assert_array_equal(infer_fp32(client, "cost", data), cost_expected(data))


def test_load_unknown_model_fails_clearly(own_server):
    client = own_server.client()
    with pytest.raises(InferenceServerException) as excinfo:
        client.load_model("no-such-model")
    err = excinfo.value
    assert err.status() != "StatusCode.OK"
    assert "no-such-model" in (err.message() or ""), f"{err.status()}: {err.message()}"
    assert client.is_server_ready() is True

