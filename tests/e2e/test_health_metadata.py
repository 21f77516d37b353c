"""Server and model health, metadata, config and the repository index (shared server)."""

import grpc
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from _helpers import assert_rpc_error, http_get, raises_status, rpc_error


def test_server_live_and_ready(grpc_client):
    assert grpc_client.is_server_live() is True
    assert grpc_client.is_server_ready() is True


def test_http_health_endpoints(server):
    live_status, _ = http_get(f"{server.http_url}/v2/health/live")
    ready_status, _ = http_get(f"{server.http_url}/v2/health/ready")
    assert live_status == 200
    assert ready_status == 200
    missing_status, _ = http_get(f"{server.http_url}/v2/health/no-such-endpoint")
    assert missing_status == 404


def test_server_metadata(grpc_client):
    meta = grpc_client.get_server_metadata()
    assert meta.name == "veraltheim"
    assert meta.version, "server metadata must carry a version"
    as_json = grpc_client.get_server_metadata(as_json=True)
    assert as_json["name"] == "veraltheim"
    assert as_json["version"] == meta.version


def test_model_ready_builtin_models(grpc_client):
    assert grpc_client.is_model_ready("identity") is True
    assert grpc_client.is_model_ready("identity", model_version="1") is True
    assert grpc_client.is_model_ready("cost") is True
    assert grpc_client.is_model_ready("fault") is True  # --enable-fault-injection


def test_model_ready_unknown_model(grpc_client):
    try:
        ready = grpc_client.is_model_ready("no-such-model")
    except InferenceServerException as err:
        assert err.status() == "StatusCode.NOT_FOUND", f"{err.status()}: {err.message()}"
        assert "no-such-model" in (err.message() or "")
    else:
        assert ready is False


def test_model_metadata_identity(grpc_client):
    meta = grpc_client.get_model_metadata("identity")
    assert meta.name == "identity"
    assert "1" in list(meta.versions)
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("INPUT0", "FP32", [-1, -1])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("OUTPUT0", "FP32", [-1, -1])
    ]


def test_model_metadata_cost(grpc_client):
    meta = grpc_client.get_model_metadata("cost")
    assert meta.name == "cost"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("INPUT0", "FP32", [-1, -1])
    ]
    assert [(t.name, t.datatype) for t in meta.outputs] == [("OUTPUT0", "FP32")]
    out_shape = list(meta.outputs[0].shape)
    assert len(out_shape) == 2 and out_shape[0] == -1, f"cost OUTPUT0 shape {out_shape}"


def test_model_metadata_unknown_model(grpc_client):
    with raises_status("NOT_FOUND", "no-such-model"):
        grpc_client.get_model_metadata("no-such-model")


def test_model_config_identity(grpc_client):
    config = grpc_client.get_model_config("identity").config
    assert config.name == "identity"
    assert config.max_batch_size == 64
    assert [i.name for i in config.input] == ["INPUT0"]
    assert [o.name for o in config.output] == ["OUTPUT0"]
    from tritonclient.grpc import model_config_pb2

    assert config.input[0].data_type == model_config_pb2.TYPE_FP32
    assert config.output[0].data_type == model_config_pb2.TYPE_FP32


def test_model_config_dims_agree_with_metadata(grpc_client):
    """Triton rule: with max_batch_size > 0 the config `dims` leave out the batch
    dimension, and the metadata shape is [-1] + dims."""
    config = grpc_client.get_model_config("identity").config
    meta = grpc_client.get_model_metadata("identity")
    assert config.max_batch_size > 0
    assert [-1] + list(config.input[0].dims) == list(meta.inputs[0].shape), (
        f"config dims {list(config.input[0].dims)} vs metadata shape "
        f"{list(meta.inputs[0].shape)}"
    )
    assert [-1] + list(config.output[0].dims) == list(meta.outputs[0].shape)


def test_model_config_json_and_unknown(grpc_client):
    as_json = grpc_client.get_model_config("cost", as_json=True)
    assert as_json["config"]["name"] == "cost"
    with raises_status("NOT_FOUND", "no-such-model"):
        grpc_client.get_model_config("no-such-model")


def test_repository_index_lists_builtin_models_ready(grpc_client):
    index = grpc_client.get_model_repository_index(as_json=True)
    by_name = {m["name"]: m for m in index.get("models", [])}
    for name in ("identity", "cost"):
        assert name in by_name, f"{name} missing from repository index: {index}"
        assert by_name[name].get("state") == "READY", by_name[name]


def test_raw_server_live_ready_messages(stub):
    """The same RPCs through the generated stub (the exact wire messages)."""
    assert stub.ServerLive(service_pb2.ServerLiveRequest()).live is True
    assert stub.ServerReady(service_pb2.ServerReadyRequest()).ready is True
    err = rpc_error(
        stub.ModelMetadata, service_pb2.ModelMetadataRequest(name="no-such-model")
    )
    assert_rpc_error(err, grpc.StatusCode.NOT_FOUND, "no-such-model")
