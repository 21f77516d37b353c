"""Path escapes (issue 13, item 6): nothing a client names and nothing in the model repository
reaches outside the repository. Each case asserts the exact status, then that the server still
serves."""

import json

import numpy as np

from _helpers import infer_fp32, raises_status

IDENTITY = {
    "backend": "builtin", "max_batch_size": 8,
    "parameters": {"builtin": {"string_value": "identity"}},
    "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
    "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
}


def still_serves(client):
    x = np.ones((1, 4), np.float32)
    np.testing.assert_array_equal(infer_fp32(client, "identity", x), x)


def test_names_and_symlinks_cannot_leave_the_repository(server_factory, tmp_path):
    models = tmp_path / "models"
    outside = tmp_path / "outside"
    (outside / "1").mkdir(parents=True)
    (outside / "config.json").write_text(json.dumps(IDENTITY))
    (outside / "secret").write_text("not for clients")
    models.mkdir()
    # A model folder that is a symlink to a folder outside the repository...
    (models / "linked").symlink_to(outside)
    # ...and a version folder whose file points outside.
    (models / "filelink" / "1").mkdir(parents=True)
    (models / "filelink" / "config.json").write_text(json.dumps(IDENTITY))
    (models / "filelink" / "1" / "model.onnx").symlink_to(outside / "secret")
    srv = server_factory(["--load-model", "identity"], models_dir=models)
    client = srv.client()

    for name in ["linked", "filelink"]:
        with raises_status("INVALID_ARGUMENT", "outside the model repository"):
            client.load_model(name)
        still_serves(client)
    # Names that are paths are no model's name.
    for name in ["../outside", "/etc", "..", "a/../../outside"]:
        with raises_status("NOT_FOUND"):
            client.load_model(name)
        still_serves(client)
    # A config override cannot name a model file or a warm-up file outside the folder.
    (models / "plain" / "1").mkdir(parents=True)
    (models / "plain" / "config.json").write_text(json.dumps(IDENTITY))
    client.load_model("plain")
    for override in [
        {"default_model_filename": "../../outside/secret"},
        {"model_warmup": [{"name": "w", "batch_size": 1, "inputs": {"INPUT0": {
            "data_type": "TYPE_FP32", "dims": [4], "input_data_file": "../../../outside/secret"}}}]},
    ]:
        with raises_status("INVALID_ARGUMENT"):
            client.load_model("plain", config=json.dumps(override))
        still_serves(client)
