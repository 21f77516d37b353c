"""Large tensors through the KServe API: in the request (raw_input_contents) against Triton's
system shared memory, with the stock tritonclient, in the same run.

Usage (a server started with --allow-client-shm and the identity model loaded):
    .venv/bin/python benches/python/shm_vs_raw.py --url 127.0.0.1:8001 [--mib 1 4 16] [--n 100]
Prints, per tensor size, requests per second and p50 latency of each way and their ratio.
"""

import argparse
import os
import time

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm


def timed(fn, n):
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t)
    lat.sort()
    return n / sum(lat), lat[len(lat) // 2] * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="127.0.0.1:8001")
    ap.add_argument("--mib", type=float, nargs="+", default=[1, 4, 16])
    ap.add_argument("--n", type=int, default=100)
    args = ap.parse_args()
    client = grpcclient.InferenceServerClient(args.url)
    client.unregister_system_shared_memory()
    for mib in args.mib:
        cols = int(mib * 1024 * 1024 / 4)
        data = np.random.default_rng(1).random((1, cols), dtype=np.float32)
        nbytes = data.nbytes
        key = f"/veraltheim_bench_{os.getpid()}"
        region = shm.create_shared_memory_region("bench_in", key + "_in", nbytes)
        out_region = shm.create_shared_memory_region("bench_out", key + "_out", nbytes)
        try:
            shm.set_shared_memory_region(region, [data])
            client.register_system_shared_memory("bench_in", key + "_in", nbytes)
            client.register_system_shared_memory("bench_out", key + "_out", nbytes)

            raw_in = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
            raw_in.set_data_from_numpy(data)

            def raw():
                out = client.infer("identity", [raw_in]).as_numpy("OUTPUT0")
                assert out.shape == data.shape

            shm_in = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
            shm_in.set_shared_memory("bench_in", nbytes)
            shm_out = grpcclient.InferRequestedOutput("OUTPUT0")
            shm_out.set_shared_memory("bench_out", nbytes)

            def via_shm():
                client.infer("identity", [shm_in], outputs=[shm_out])
                out = shm.get_contents_as_numpy(out_region, np.float32, list(data.shape))
                assert out.shape == data.shape

            raw()
            via_shm()
            np.testing.assert_array_equal(
                shm.get_contents_as_numpy(out_region, np.float32, list(data.shape)), data
            )
            r_rate, r_p50 = timed(raw, args.n)
            s_rate, s_p50 = timed(via_shm, args.n)
            print(
                f"{mib:g} MiB: raw {r_rate:.0f} req/s p50 {r_p50:.2f} ms | "
                f"shm {s_rate:.0f} req/s p50 {s_p50:.2f} ms | shm/raw throughput x{s_rate / r_rate:.2f}"
            )
        finally:
            client.unregister_system_shared_memory()
            shm.destroy_shared_memory_region(region)
            shm.destroy_shared_memory_region(out_region)


if __name__ == "__main__":
    main()
