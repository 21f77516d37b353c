"""Answers that come from the running server, not fixed values, as the stock tritonclient and
our CLI see them: a model's memory per device in the statistics, and the models `veraltheim gpus`
lists on each (simulated) GPU."""

import json
import os
import subprocess

BIN = os.environ["VERALTHEIM_BIN"]
MIB = 2**20


def gpus_json(srv) -> list[dict]:
    out = subprocess.run([BIN, "gpus", "--json", "--server", srv.grpc_url],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_statistics_and_gpus_show_where_models_hold_memory(server_factory):
    srv = server_factory(["--simulate-gpus", "2x16GiB"])
    client = srv.client()
    # identity must run on GPU 1 (a built-in may sit on a simulated GPU); cost on the CPU.
    client.load_model("identity", config=json.dumps({
        "instance_group": [{"kind": "KIND_GPU", "count": 1, "gpus": [1]}],
        "parameters": {"memory_bytes": {"string_value": str(64 * MIB)}},
    }))
    client.load_model("cost", config=json.dumps({
        "parameters": {"memory_bytes": {"string_value": str(2 * MIB)}},
    }))

    def memory_usage(model: str) -> list[tuple[str, int, int]]:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"]
        assert len(stats) == 1, stats
        # int64/uint64 come as strings in tritonclient's JSON.
        return [(m["type"], int(m.get("id", 0)), int(m["byte_size"]))
                for m in stats[0].get("memory_usage", [])]

    assert memory_usage("identity") == [("GPU", 1, 64 * MIB)]
    assert memory_usage("cost") == [("CPU", 0, 2 * MIB)]

    gpus = gpus_json(srv)
    assert [(g["index"], g["models"]) for g in gpus] == [(0, []), (1, ["identity"])]
    assert gpus[1]["placed_models"] == [{"name": "identity", "bytes": 64 * MIB, "state": "READY"}]

    client.unload_model("identity")
    gpus = gpus_json(srv)
    assert [(g["index"], g["models"], g["placed_models"]) for g in gpus] == [(0, [], []), (1, [], [])]
