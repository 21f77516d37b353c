"""Answers that come from the running server, not fixed values, as the stock tritonclient and
our CLI see them: the log settings (read from the flags, changed at run time), the trace settings
(UNIMPLEMENTED, with the reason), a model's memory per device in the statistics, and the models
`veraltheim gpus` lists on each (simulated) GPU."""

import json
import os
import subprocess

from _helpers import raises_status

BIN = os.environ["VERALTHEIM_BIN"]
MIB = 2**20


def settings(answer: dict) -> dict:
    """tritonclient's JSON of a LogSettingsResponse → {name: value}."""
    return {k: next(iter(v.values())) for k, v in answer["settings"].items()}


def model_state_lines(log: str, model: str) -> list[str]:
    return [line for line in log.splitlines() if "model state" in line and f'"{model}"' in line]


def test_log_settings_follow_the_flags_and_change_the_running_log(server_factory):
    srv = server_factory(["--log-level", "debug"])
    client = srv.client()
    assert settings(client.get_log_settings(as_json=True)) == {
        "log_verbose_level": 1,  # --log-level debug (the old answer was 0 whatever the flag)
        "log_info": True,
        "log_warning": True,
        "log_error": True,
        "log_format": "text",  # --log-format text (conftest)
        "log_file": "",
    }
    quiet = settings(client.update_log_settings({"log_verbose_level": 0, "log_info": False},
                                                as_json=True))
    assert (quiet["log_verbose_level"], quiet["log_info"], quiet["log_warning"]) == (0, False, True)
    assert settings(client.get_log_settings(as_json=True)) == quiet

    # The built-ins were loaded at start; a load now reloads one. Its state lines are written
    # before the load is answered: none while info is off, some once it is on again.
    quiet_from = len(srv.log())
    client.load_model("cost")
    assert model_state_lines(srv.log()[quiet_from:], "cost") == []
    loud = settings(client.update_log_settings({"log_info": True}, as_json=True))
    assert loud["log_info"] is True
    loud_from = len(srv.log())
    client.load_model("identity")
    assert model_state_lines(srv.log()[loud_from:], "identity"), srv.log_tail()

    # A setting that cannot change is refused by name, and nothing changes.
    with raises_status("INVALID_ARGUMENT", "log_format"):
        client.update_log_settings({"log_info": False, "log_format": "ISO8601"})
    with raises_status("INVALID_ARGUMENT", "log_file"):
        client.update_log_settings({"log_file": "/tmp/veraltheim.log"})
    assert settings(client.get_log_settings(as_json=True)) == loud


def test_trace_settings_are_unimplemented_and_say_why(grpc_client):
    with raises_status("UNIMPLEMENTED", "trace", "LogSettings"):
        grpc_client.get_trace_settings()
    with raises_status("UNIMPLEMENTED", "trace", "LogSettings"):
        grpc_client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]})


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
