"""Many clients at once: every answer goes to the client that asked (shared server)."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tritonclient.grpc as grpcclient

from _helpers import cost_expected, fp32_input, poll

CLIENTS = 16
REQUESTS_PER_CLIENT = 50


def worker(url: str, worker_id: int) -> list[str]:
    problems = []
    client = grpcclient.InferenceServerClient(url=url)
    try:
        for i in range(REQUESTS_PER_CLIENT):
            rows = 1 + (worker_id + i) % 4
            # Distinct per (worker, request): any cross-talk shows up as a mismatch.
            data = (
                np.arange(rows * 6, dtype=np.float32).reshape(rows, 6)
                + worker_id * 100000
                + i * 100
            )
            model = "cost" if i % 10 == 9 else "identity"
            rid = f"w{worker_id}-r{i}"
            result = client.infer(model, [fp32_input(data)], request_id=rid)
            out = result.as_numpy("OUTPUT0")
            expected = cost_expected(data) if model == "cost" else data
            if result.get_response().id != rid:
                problems.append(f"{rid}: response id {result.get_response().id!r}")
            if out is None or out.shape != expected.shape or not np.array_equal(out, expected):
                problems.append(f"{rid} ({model}): wrong output {out!r}")
    except Exception as err:  # report, don't hide, any transport/status error
        problems.append(f"worker {worker_id}: {type(err).__name__}: {err}")
    finally:
        client.close()
    return problems


def test_concurrent_clients_get_their_own_results(server, grpc_client):
    before = grpc_client.get_inference_statistics("identity").model_stats[0]
    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        futures = [pool.submit(worker, server.grpc_url, w) for w in range(CLIENTS)]
        problems = [p for f in futures for p in f.result(timeout=120)]
    assert not problems, f"{len(problems)} problems, first: {problems[:5]}"
    identity_requests = CLIENTS * (REQUESTS_PER_CLIENT - REQUESTS_PER_CLIENT // 10)
    base = before.inference_stats.success.count
    after = poll(
        lambda: grpc_client.get_inference_statistics("identity").model_stats[0],
        lambda s: s.inference_stats.success.count - base >= identity_requests,
    )
    grown = after.inference_stats.success.count - base
    assert grown == identity_requests, f"identity success grew by {grown}, sent {identity_requests}"
    # Dynamic batching under load: at most one execution per request.
    assert after.execution_count - before.execution_count <= grown
