"""Triton's system shared-memory extension with the stock tritonclient, over gRPC and HTTP:
regions registered by key, input and output tensors passed through them, and the errors for bad
regions (over HTTP with Triton's statuses: 400, 404 for a region not registered, 403 when off).
Off unless the server runs with --allow-client-shm."""

import contextlib
import os

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from _helpers import distinct_rows, fp32_input, raises_status


@pytest.fixture
def shm_server(server_factory):
    return server_factory(extra_args=["--allow-client-shm"])


@pytest.fixture
def regions():
    """Creates system shared-memory regions for a test and destroys them after it."""
    made = []

    def make(tag: str, byte_size: int):
        handle = shm.create_shared_memory_region(
            f"veraltheim_{tag}", f"/veraltheim_e2e_{tag}_{os.getpid()}", byte_size
        )
        made.append(handle)
        return handle

    yield make
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def key_of(tag: str) -> str:
    return f"/veraltheim_e2e_{tag}_{os.getpid()}"


def test_disabled_by_default_with_a_clear_message(grpc_client, regions):
    regions("off", 64)
    for call in (
        lambda: grpc_client.get_system_shared_memory_status(),
        lambda: grpc_client.register_system_shared_memory("off", key_of("off"), 64),
        lambda: grpc_client.unregister_system_shared_memory("off"),
    ):
        with raises_status("PERMISSION_DENIED", "--allow-client-shm"):
            call()
    inp = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
    inp.set_shared_memory("off", 16)
    with raises_status("PERMISSION_DENIED", "--allow-client-shm"):
        grpc_client.infer("identity", [inp])
    assert "system_shared_memory" not in grpc_client.get_server_metadata().extensions


def test_inputs_and_outputs_travel_through_shared_memory(shm_server, regions):
    client = shm_server.client()
    assert "system_shared_memory" in client.get_server_metadata().extensions
    data = distinct_rows(3, 4, seed=4100)
    nbytes = data.nbytes
    inp_region = regions("in", nbytes)
    # The output region is registered 64 bytes into its object, and the output written at an
    # offset inside the region.
    out_region = regions("out", 64 + 32 + nbytes)
    shm.set_shared_memory_region(inp_region, [data])
    client.register_system_shared_memory("in", key_of("in"), nbytes)
    client.register_system_shared_memory("out", key_of("out"), 32 + nbytes, offset=64)

    status = client.get_system_shared_memory_status(as_json=True)["regions"]
    assert {status["in"]["key"], status["out"]["key"]} == {key_of("in"), key_of("out")}
    assert int(status["out"]["offset"]) == 64 and int(status["out"]["byte_size"]) == 32 + nbytes

    inp = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
    inp.set_shared_memory("in", nbytes)
    out = grpcclient.InferRequestedOutput("OUTPUT0")
    out.set_shared_memory("out", nbytes, offset=32)
    result = client.infer("identity", [inp], outputs=[out])
    tensor = result.get_output("OUTPUT0")
    assert list(tensor.shape) == [3, 4]
    assert tensor.parameters["shared_memory_region"].string_param == "out"
    assert tensor.parameters["shared_memory_byte_size"].int64_param == nbytes
    got = shm.get_contents_as_numpy(out_region, np.float32, [3, 4], offset=64 + 32)
    np.testing.assert_array_equal(got, data)

    # The input from shared memory, the output back in the response.
    plain = client.infer("identity", [inp])
    np.testing.assert_array_equal(plain.as_numpy("OUTPUT0"), data)

    client.unregister_system_shared_memory()
    assert client.get_system_shared_memory_status(as_json=True).get("regions", {}) == {}


def test_bad_regions_and_references_are_refused_by_name(shm_server, regions):
    client = shm_server.client()
    data = distinct_rows(2, 4, seed=4200)
    regions("small", 16)
    regions("big", 256)
    shm.set_shared_memory_region(regions("data", data.nbytes), [data])
    with raises_status("INVALID_ARGUMENT", "past the end"):
        client.register_system_shared_memory("small", key_of("small"), 64)
    with raises_status("INVALID_ARGUMENT", "cannot open"):
        client.register_system_shared_memory("x", "/veraltheim_e2e_no_such_object", 16)
    with raises_status("INVALID_ARGUMENT", "not a shared-memory key"):
        client.register_system_shared_memory("x", "/../etc/passwd", 16)
    client.register_system_shared_memory("small", key_of("small"), 16)
    client.register_system_shared_memory("data", key_of("data"), data.nbytes)
    with raises_status("ALREADY_EXISTS", "small"):
        client.register_system_shared_memory("small", key_of("big"), 16)

    inp = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
    inp.set_shared_memory("small", data.nbytes)
    with raises_status("INVALID_ARGUMENT", "input 'INPUT0'", "past the end"):
        client.infer("identity", [inp])
    inp.set_shared_memory("nowhere", data.nbytes)
    with raises_status("NOT_FOUND", "nowhere"):
        client.infer("identity", [inp])

    out = grpcclient.InferRequestedOutput("OUTPUT0")
    out.set_shared_memory("small", 16)
    with raises_status("INVALID_ARGUMENT", "output 'OUTPUT0'", "holds 16"):
        client.infer("identity", [fp32_input(data)], outputs=[out])
    assert client.is_server_live()


def test_an_object_truncated_while_requests_run_gives_errors_not_a_crash(shm_server, regions):
    """The client shrinks its object below the registered region and grows it back while
    requests read from it and write to it. Each request succeeds or gets FAILED_PRECONDITION
    naming the region; the server never dies (a mapped object touched past its end would be a
    SIGBUS), and it serves the region again once the object has its length back."""
    import threading

    client = shm_server.client()
    data = distinct_rows(64, 256, seed=4300)
    nbytes = data.nbytes
    shm.set_shared_memory_region(regions("tin", nbytes), [data])
    regions("tout", nbytes)
    client.register_system_shared_memory("tin", key_of("tin"), nbytes)
    client.register_system_shared_memory("tout", key_of("tout"), nbytes)

    stop = threading.Event()

    def truncate_and_restore():
        paths = [f"/dev/shm{key_of('tin')}", f"/dev/shm{key_of('tout')}"]
        while not stop.is_set():
            for path in paths:
                os.truncate(path, 16)
            for path in paths:
                os.truncate(path, nbytes)

    truncator = threading.Thread(target=truncate_and_restore)
    truncator.start()
    ok, refused = 0, 0
    try:
        for _ in range(300):
            inp = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
            inp.set_shared_memory("tin", nbytes)
            out = grpcclient.InferRequestedOutput("OUTPUT0")
            out.set_shared_memory("tout", nbytes)
            try:
                client.infer("identity", [inp], outputs=[out])
                ok += 1
            except grpcclient.InferenceServerException as err:
                assert err.status() == "StatusCode.FAILED_PRECONDITION", err.message()
                assert "region 'tin'" in err.message() or "region 'tout'" in err.message()
                refused += 1
            if ok >= 5 and refused >= 5:
                break
    finally:
        stop.set()
        truncator.join()
    assert refused > 0, f"no request met a truncated object ({ok} succeeded)"
    assert shm_server.proc.poll() is None, "the server died"

    # The object has its length back: the same regions serve again.
    os.truncate(f"/dev/shm{key_of('tin')}", nbytes)
    with open(f"/dev/shm{key_of('tin')}", "r+b") as f:
        f.write(data.tobytes())
    inp = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
    inp.set_shared_memory("tin", nbytes)
    result = client.infer("identity", [inp])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)
    assert client.is_server_live()


# --- Over HTTP/REST: the same registry, Triton's routes and statuses ---------------------------


def http_of(srv) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url=f"127.0.0.1:{srv.http_port}")


@contextlib.contextmanager
def http_refused(status: int, *fragments: str):
    """Expect tritonclient.http to raise for an answer with HTTP `status` whose error message
    holds every fragment."""
    with pytest.raises(InferenceServerException) as e:
        yield
    assert e.value.status() == str(status), f"expected {status}: {e.value}"
    for fragment in fragments:
        assert fragment in (e.value.message() or ""), f"{fragment!r} not in {e.value.message()!r}"


def test_http_disabled_by_default_with_a_clear_message(server, regions):
    regions("hoff", 64)
    h = http_of(server)
    try:
        for call in (
            lambda: h.get_system_shared_memory_status(),
            lambda: h.get_system_shared_memory_status("hoff"),
            lambda: h.register_system_shared_memory("hoff", key_of("hoff"), 64),
            lambda: h.unregister_system_shared_memory(),
            lambda: h.unregister_system_shared_memory("hoff"),
        ):
            with http_refused(403, "--allow-client-shm"):
                call()
        inp = httpclient.InferInput("INPUT0", [1, 4], "FP32")
        inp.set_shared_memory("hoff", 16)
        with http_refused(403, "--allow-client-shm"):
            h.infer("identity", [inp])
        assert "system_shared_memory" not in h.get_server_metadata()["extensions"]
    finally:
        h.close()


def test_http_inputs_and_outputs_travel_through_shared_memory(shm_server, regions):
    h = http_of(shm_server)
    try:
        assert "system_shared_memory" in h.get_server_metadata()["extensions"]
        data = distinct_rows(3, 4, seed=4400)
        nbytes = data.nbytes
        inp_region = regions("hin", nbytes)
        # The output region starts 64 bytes into its object; the output goes 32 bytes into it.
        out_region = regions("hout", 64 + 32 + nbytes)
        shm.set_shared_memory_region(inp_region, [data])
        h.unregister_system_shared_memory()
        h.register_system_shared_memory("hin", key_of("hin"), nbytes)
        h.register_system_shared_memory("hout", key_of("hout"), 32 + nbytes, offset=64)

        status = {r["name"]: r for r in h.get_system_shared_memory_status()}
        assert status == {
            "hin": {"name": "hin", "key": key_of("hin"), "offset": 0, "byte_size": nbytes},
            "hout": {"name": "hout", "key": key_of("hout"), "offset": 64,
                     "byte_size": 32 + nbytes},
        }
        assert h.get_system_shared_memory_status("hin") == [status["hin"]]

        inp = httpclient.InferInput("INPUT0", list(data.shape), "FP32")
        inp.set_shared_memory("hin", nbytes)
        out = httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)
        out.set_shared_memory("hout", nbytes, offset=32)
        result = h.infer("identity", [inp], outputs=[out])
        tensor = result.get_output("OUTPUT0")
        assert tensor["shape"] == [3, 4] and tensor["datatype"] == "FP32"
        assert "data" not in tensor
        assert tensor["parameters"] == {
            "shared_memory_region": "hout",
            "shared_memory_byte_size": nbytes,
            "shared_memory_offset": 32,
        }
        got = shm.get_contents_as_numpy(out_region, np.float32, [3, 4], offset=64 + 32)
        np.testing.assert_array_equal(got, data)

        # The input from shared memory, the output back in the response (binary, and JSON).
        for binary in (True, False):
            plain = h.infer("identity", [inp], outputs=[
                httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)])
            np.testing.assert_array_equal(plain.as_numpy("OUTPUT0"), data)

        # What gRPC registered, HTTP sees, and the other way round: one registry.
        g = shm_server.client()
        assert set(g.get_system_shared_memory_status(as_json=True)["regions"]) == {"hin", "hout"}
        h.unregister_system_shared_memory("hin")
        assert list(g.get_system_shared_memory_status(as_json=True)["regions"]) == ["hout"]
        with http_refused(404, "'hin'"):
            h.get_system_shared_memory_status("hin")
        h.unregister_system_shared_memory("hin")  # an unknown name is not an error
        h.unregister_system_shared_memory()
        assert h.get_system_shared_memory_status() == []
    finally:
        h.close()


def test_http_bad_regions_and_references_are_refused_by_name(shm_server, regions):
    h = http_of(shm_server)
    try:
        data = distinct_rows(2, 4, seed=4500)
        regions("hsmall", 16)
        regions("hbig", 256)
        shm.set_shared_memory_region(regions("hdata", data.nbytes), [data])
        with http_refused(400, "past the end"):
            h.register_system_shared_memory("hsmall", key_of("hsmall"), 64)
        with http_refused(400, "cannot open"):
            h.register_system_shared_memory("x", "/veraltheim_e2e_no_such_object", 16)
        with http_refused(400, "not a shared-memory key"):
            h.register_system_shared_memory("x", "/../etc/passwd", 16)
        h.register_system_shared_memory("hsmall", key_of("hsmall"), 16)
        h.register_system_shared_memory("hdata", key_of("hdata"), data.nbytes)
        with http_refused(400, "'hsmall'", "already registered"):
            h.register_system_shared_memory("hsmall", key_of("hbig"), 16)

        inp = httpclient.InferInput("INPUT0", list(data.shape), "FP32")
        inp.set_shared_memory("hsmall", data.nbytes)
        with http_refused(400, "input 'INPUT0'", "past the end"):
            h.infer("identity", [inp])
        # An offset that puts the data past the region's end.
        inp.set_shared_memory("hdata", data.nbytes, offset=8)
        with http_refused(400, "input 'INPUT0'", "offset 8", "past the end"):
            h.infer("identity", [inp])
        inp.set_shared_memory("nowhere", data.nbytes)
        with http_refused(404, "'nowhere'"):
            h.infer("identity", [inp])

        plain = httpclient.InferInput("INPUT0", list(data.shape), "FP32")
        plain.set_data_from_numpy(data)
        out = httpclient.InferRequestedOutput("OUTPUT0")
        out.set_shared_memory("hsmall", 16)
        with http_refused(400, "output 'OUTPUT0'", "holds 16"):
            h.infer("identity", [plain], outputs=[out])
        out.set_shared_memory("gone", 16)
        with http_refused(404, "'gone'"):
            h.infer("identity", [plain], outputs=[out])
        assert h.is_server_live()
    finally:
        h.close()
