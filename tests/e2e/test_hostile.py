"""Hostile input, each case from issue 18 as a regression test: the exact status is asserted,
and the server must still serve afterwards (a crash, a hang or a poisoned job system fails the
test). The cases that need their own configuration start their own server."""

from __future__ import annotations

import subprocess

import grpc
import numpy as np

from _helpers import binary_path, infer_fp32

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
SUBMIT_JOB = "/veraltheim.v1.JobService/SubmitJob"


def raw_call(server, method: str, payload: bytes) -> grpc.RpcError:
    """Sends bytes that are not the message the method expects; returns the error."""
    call = server.channel().unary_unary(
        method, request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    try:
        call(payload, timeout=10)
    except grpc.RpcError as e:
        return e
    raise AssertionError(f"{method} accepted {payload!r}")


def still_serves(server) -> None:
    out = infer_fp32(server.client(), "identity", np.ones((1, 4), np.float32))
    assert out.tolist() == [[1.0, 1.0, 1.0, 1.0]]


def test_malformed_protobuf_is_invalid_argument(server):
    # A length-delimited field whose length runs past the end of the message.
    err = raw_call(server, MODEL_INFER, b"\x0a\xff\xff\xff\x0f")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert "decode" in err.details()
    still_serves(server)


def test_a_string_that_is_not_utf8_is_invalid_argument(server):
    # ModelInferRequest.model_name (field 1, a string) holding bytes that are not UTF-8.
    err = raw_call(server, MODEL_INFER, b"\x0a\x02\xff\xfe")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    still_serves(server)


def test_a_deadline_past_any_clock_is_refused_at_submit(server):
    """`jobs submit --deadline 18446744073709551615 -- true` was accepted, panicked in the
    scheduler and blocked a running slot for good, across restarts."""
    run = subprocess.run(
        [str(binary_path()), "jobs", "submit", "--server", server.grpc_url,
         "--deadline", "18446744073709551615", "--", "true"],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode != 0, run.stdout
    assert "InvalidArgument" in run.stderr or "invalid argument" in run.stderr.lower(), run.stderr
    assert "deadline" in run.stderr, run.stderr
    # The job system still takes and runs work.
    job = subprocess.run(
        [str(binary_path()), "jobs", "submit", "--server", server.grpc_url, "--", "true"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()
    watched = subprocess.run(
        [str(binary_path()), "jobs", "watch", job, "--server", server.grpc_url],
        capture_output=True, text=True, timeout=60,
    )
    assert watched.returncode == 0, watched.stdout + watched.stderr
    still_serves(server)


def test_a_log_reader_that_goes_away_does_not_kill_the_server(tmp_path):
    """`veraltheim serve 2>&1 | head -c 100` aborted the server (SIGABRT) once `head` exited and
    the next log line met a closed pipe. Now the line is dropped and counted."""
    import socket
    import time
    import urllib.request

    import tritonclient.grpc as grpcclient

    def port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    grpc_port, http_port = port(), port()
    proc = subprocess.Popen(
        [str(binary_path()), "serve", "--grpc-addr", f"127.0.0.1:{grpc_port}",
         "--http-addr", f"127.0.0.1:{http_port}", "--data-dir", str(tmp_path / "data"),
         "--model-repository", str(tmp_path / "models"), "--load-model", "identity",
         "--log-level", "debug"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        proc.stdout.read(100)  # what `head -c 100` does...
        proc.stdout.close()    # ...before it exits
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        deadline = time.monotonic() + 60

        def ready() -> bool:
            try:
                return client.is_server_ready()
            except Exception:  # not listening yet
                return False

        while not ready():
            assert proc.poll() is None, f"the server died: exit {proc.returncode}"
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.1)
        # Plenty of log lines, every one of them into the closed pipe.
        for _ in range(5):
            client.unload_model("identity")
            client.load_model("identity")
        out = infer_fp32(client, "identity", np.ones((1, 4), np.float32))
        assert out.tolist() == [[1.0, 1.0, 1.0, 1.0]]
        assert proc.poll() is None, f"the server died: exit {proc.returncode}"
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5).read().decode()
        dropped = [l for l in metrics.splitlines() if l.startswith("veraltheim_log_lines_dropped_total")]
        assert dropped and float(dropped[0].split()[-1]) > 0, dropped
    finally:
        proc.terminate()
        proc.wait(timeout=30)
