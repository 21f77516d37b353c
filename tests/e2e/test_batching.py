"""The fast path seen through the stock tritonclient against the `cost` model: batches form
under concurrency, priorities overtake, queue timeouts are honoured while the model is busy, a
full queue refuses fast, and the server stays healthy. Orderings are asserted, never durations."""

import json
import threading
import time

import numpy as np

from _helpers import cost_expected, fp32_input, raises_status


def load_cost(client, base_us: int, max_batch_size: int, **dynamic_batching) -> None:
    client.load_model(
        "cost",
        config=json.dumps(
            {
                "max_batch_size": max_batch_size,
                "dynamic_batching": dynamic_batching,
                "parameters": {
                    "base_us": {"string_value": str(base_us)},
                    "per_item_us": {"string_value": "0"},
                },
            }
        ),
    )


def run_in_threads(jobs):
    """Runs each (label, fn) in its own thread; returns labels in completion order and errors."""
    finished, errors, lock = [], {}, threading.Lock()

    def wrap(label, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported to the test
            with lock:
                errors[label] = e
        with lock:
            finished.append(label)

    threads = []
    for label, fn in jobs:
        t = threading.Thread(target=wrap, args=(label, fn))
        t.start()
        threads.append(t)
    for t in threads:
        t.join(timeout=60)
    return finished, errors


def test_batches_form_under_concurrency(own_server):
    client = own_server.client()
    load_cost(client, base_us=20_000, max_batch_size=16)
    before = client.get_inference_statistics("cost").model_stats[0]

    def worker(i):
        c = own_server.client()
        for j in range(5):
            data = np.full((1, 3), i * 10 + j, np.float32)
            out = c.infer("cost", [fp32_input(data)]).as_numpy("OUTPUT0")
            np.testing.assert_array_equal(out, cost_expected(data))

    _, errors = run_in_threads([(f"c{i}", lambda i=i: worker(i)) for i in range(16)])
    assert not errors, errors
    after = client.get_inference_statistics("cost").model_stats[0]
    items = after.inference_count - before.inference_count
    batches = after.execution_count - before.execution_count
    assert items == 80
    assert items / batches > 1.0, f"{items} items in {batches} batches: no batching happened"
    assert client.is_server_ready()


def test_a_higher_priority_request_overtakes(own_server):
    client = own_server.client()
    load_cost(client, base_us=600_000, max_batch_size=1, priority_levels=2, default_priority_level=2)
    x = fp32_input(np.ones((1, 2), np.float32))
    started = threading.Event()

    def busy():
        started.set()
        own_server.client().infer("cost", [x])

    t = threading.Thread(target=busy)
    t.start()
    started.wait()
    time.sleep(0.2)  # let the busy request start computing
    finished, errors = run_in_threads(
        [
            ("low", lambda: own_server.client().infer("cost", [x], priority=2)),
            ("high", lambda: (time.sleep(0.05), own_server.client().infer("cost", [x], priority=1))),
        ]
    )
    t.join(timeout=60)
    assert not errors, errors
    assert finished == ["high", "low"], finished
    with raises_status("INVALID_ARGUMENT", "priority"):
        client.infer("cost", [x], priority=7)


def test_a_queue_timeout_expires_while_the_model_is_busy(own_server):
    client = own_server.client()
    load_cost(client, base_us=300_000, max_batch_size=1)
    x = fp32_input(np.ones((1, 2), np.float32))

    def waiter():
        time.sleep(0.05)
        with raises_status("DEADLINE_EXCEEDED"):
            own_server.client().infer("cost", [x], timeout=20_000)  # µs, KServe `timeout`

    finished, errors = run_in_threads(
        [("busy", lambda: own_server.client().infer("cost", [x])), ("waiter", waiter)]
    )
    assert not errors, errors
    # the timed-out request was answered while the busy one still computed
    assert finished == ["waiter", "busy"], finished
    stats = client.get_inference_statistics("cost").model_stats[0]
    assert stats.inference_count == 1, "the expired request must never be computed"


def test_a_full_queue_refuses_and_the_server_stays_healthy(own_server):
    client = own_server.client()
    load_cost(
        client,
        base_us=200_000,
        max_batch_size=1,
        default_queue_policy={"max_queue_size": 2},
    )
    x = fp32_input(np.ones((1, 2), np.float32))
    outcomes = []
    lock = threading.Lock()

    def call():
        try:
            own_server.client().infer("cost", [x])
            result = "ok"
        except Exception as e:  # noqa: BLE001
            result = e.status()
        with lock:
            outcomes.append(result)

    _, errors = run_in_threads([(f"r{i}", call) for i in range(10)])
    assert not errors, errors
    refused = [o for o in outcomes if o == "StatusCode.RESOURCE_EXHAUSTED"]
    assert refused, outcomes
    assert set(outcomes) <= {"ok", "StatusCode.RESOURCE_EXHAUSTED"}, outcomes
    assert client.is_server_ready() and client.is_model_ready("cost")
    data = np.array([[1.0, 2.0]], np.float32)
    out = client.infer("cost", [fp32_input(data)]).as_numpy("OUTPUT0")
    np.testing.assert_array_equal(out, cost_expected(data))
