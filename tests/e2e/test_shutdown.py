"""Graceful shutdown on SIGTERM (each test starts its own server)."""

import signal
import socket
import subprocess
import threading
import time

import numpy as np

from _helpers import cost_config, cost_expected, distinct_rows, infer_fp32


def port_closed(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_sigterm_exits_zero(server_factory):
    srv = server_factory()
    client = srv.client()
    data = distinct_rows(2, 2, seed=1300)
    np.testing.assert_array_equal(infer_fp32(client, "identity", data), data)
    client.close()

    srv.proc.send_signal(signal.SIGTERM)
    try:
        code = srv.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"no exit within 15 s of SIGTERM\n--- server output ---\n{srv.log_tail()}"
        ) from None
    assert code == 0, f"exit code {code} after SIGTERM\n--- server output ---\n{srv.log_tail()}"
    assert port_closed(srv.grpc_port) and port_closed(srv.http_port)


def test_sigterm_lets_in_flight_request_finish(server_factory):
    """Graceful means: a request already being computed gets its answer."""
    srv = server_factory()
    client = srv.client()
    client.load_model("cost", config=cost_config(base_us=1000000, per_item_us=0))
    data = distinct_rows(1, 3, seed=1301)
    outcome = {}

    def call():
        try:
            outcome["out"] = infer_fp32(client, "cost", data, client_timeout=30)
        except Exception as err:  # reported below
            outcome["err"] = err

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.3)  # the 1 s computation is under way
    srv.proc.send_signal(signal.SIGTERM)
    t.join(timeout=20)
    code = srv.proc.wait(timeout=15)
    assert "err" not in outcome, f"in-flight request failed on shutdown: {outcome['err']}"
    np.testing.assert_array_equal(outcome["out"], cost_expected(data))
    assert code == 0, f"exit code {code}\n--- server output ---\n{srv.log_tail()}"
