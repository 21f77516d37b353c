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
    # A model the server knows but that cannot serve now is UNAVAILABLE (NOT_FOUND is for a
    # name it does not know; docs/ARCHITECTURE.md, "A request's way").
    with raises_status("UNAVAILABLE", "'cost'", "not ready", "unloaded"):
        infer_fp32(client, "cost", data)
    entry = index_by_name(client).get("cost")
    assert entry is not None, "an unloaded model stays listed in the repository index"
    # As Triton lists an unloaded model.
    assert (entry.get("state"), entry.get("reason")) == ("UNAVAILABLE", "unloaded"), entry
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
    default_max_batch = client.get_model_config("cost").config.max_batch_size
    assert default_max_batch > 4
    client.load_model("cost", config=json.dumps({"max_batch_size": 4}))
    config = client.get_model_config("cost").config
    assert config.max_batch_size == 4
    data = distinct_rows(4, 2, seed=1003)
    np.testing.assert_array_equal(infer_fp32(client, "cost", data), cost_expected(data))
    five = distinct_rows(5, 2, seed=1004)
    with raises_status("INVALID_ARGUMENT"):
        infer_fp32(client, "cost", five)

    # A plain load reloads the model from its own configuration: the override is gone and the
    # model serves on, now taking batches of five.
    client.load_model("cost")
    assert client.is_model_ready("cost") is True
    assert client.get_model_config("cost").config.max_batch_size == default_max_batch
    assert index_by_name(client)["cost"].get("state") == "READY"
    np.testing.assert_array_equal(infer_fp32(client, "cost", five), cost_expected(five))
    np.testing.assert_array_equal(infer_fp32(client, "cost", data), cost_expected(data))


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
    # README: "an unknown model NOT_FOUND".
    assert err.status() == "StatusCode.NOT_FOUND", f"{err.status()}: {err.message()}"
    assert "'no-such-model'" in (err.message() or ""), err.message()
    assert client.is_server_ready() is True

