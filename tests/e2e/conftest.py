"""End-to-end fixtures: start the real `veraltheim` binary and talk to it with the
stock `tritonclient` (KServe v2 / Triton gRPC protocol) and plain HTTP.

The binary comes from $VERALTHEIM_BIN (scripts/test sets it), falling back to
<repo>/target/debug/veraltheim.

Fixtures
--------
server            one server for the whole session (read-only tests share it)
server_factory    start extra servers with their own data dir, flags, model repository,
                  environment and TLS client settings (for tests
                  that load/unload/reconfigure models, or shut the server down);
                  every server it started is stopped at the end of the test
grpc_client       a tritonclient.grpc.InferenceServerClient bound to `server`
stub              the raw generated gRPC stub (tritonclient's own service_pb2_grpc)
                  bound to `server`, for requests the high-level API cannot build
"""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc

from _helpers import binary_path, http_get

READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0
# tritonclient's own default channel limits, so the client never is the one refusing.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
]


def free_port() -> int:
    """A port that was free a moment ago (bind port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ClientTls:
    """How a client reaches a server started with TLS: the CA file (PEM) that signs the
    server's certificate and, for mutual TLS, the client's certificate and key files."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        read = lambda p: p.read_bytes() if p else None  # noqa: E731
        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca),
            private_key=read(self.key),
            certificate_chain=read(self.cert),
        )

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        if self.cert:
            ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx


@dataclass
class Server:
    """One running `veraltheim serve` process."""

    proc: subprocess.Popen
    grpc_port: int
    http_port: int
    data_dir: Path
    log_path: Path
    args: list[str]
    _clients: list = field(default_factory=list)
    # Set when the server serves TLS: how the fixtures' own calls reach it.
    tls: ClientTls | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"

    def log_tail(self, chars: int = 6000) -> str:
        text = self.log()
        return text[-chars:]

    def client(self, **kwargs) -> grpcclient.InferenceServerClient:
        c = grpcclient.InferenceServerClient(url=self.grpc_url, **kwargs)
        self._clients.append(c)
        return c

    def channel(self) -> grpc.Channel:
        ch = grpc.insecure_channel(self.grpc_url, options=CHANNEL_OPTIONS)
        self._clients.append(ch)
        return ch

    def stub(self) -> service_pb2_grpc.GRPCInferenceServiceStub:
        return service_pb2_grpc.GRPCInferenceServiceStub(self.channel())

    def close_clients(self) -> None:
        for c in self._clients:
            try:
                c.close()
            except Exception:
                pass
        self._clients.clear()

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Poll gRPC ServerReady and HTTP /v2/health/ready until both say ready."""
        deadline = time.monotonic() + timeout
        if self.tls:
            channel = grpc.secure_channel(
                self.grpc_url, self.tls.grpc_credentials(), options=CHANNEL_OPTIONS
            )
        else:
            channel = grpc.insecure_channel(self.grpc_url, options=CHANNEL_OPTIONS)
        try:
            self._wait_ready(service_pb2_grpc.GRPCInferenceServiceStub(channel), deadline)
        finally:
            channel.close()

    def _wait_ready(self, stub, deadline: float) -> None:
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"veraltheim exited with code {self.proc.returncode} before it was "
                    f"ready; args: {self.args}\n--- server output ---\n{self.log_tail()}"
                )
            try:
                grpc_ready = stub.ServerReady(
                    service_pb2.ServerReadyRequest(), timeout=1.0
                ).ready
                status, _ = http_get(
                    f"{self.http_url}/v2/health/ready",
                    timeout=1.0,
                    context=self.tls.ssl_context() if self.tls else None,
                )
                if grpc_ready and status == 200:
                    return
                last = f"gRPC ready={grpc_ready}, HTTP ready status={status}"
            except grpc.RpcError as err:
                last = f"gRPC {err.code()}: {err.details()}"
            except OSError as err:
                last = f"HTTP {err}"
            time.sleep(0.1)
        raise RuntimeError(
            f"veraltheim not ready after {READY_TIMEOUT_S:.0f} s (last: {last}); args: "
            f"{self.args}\n--- server output ---\n{self.log_tail()}"
        )

    def terminate(self, grace: float = STOP_GRACE_S) -> int:
        """SIGTERM, then SIGKILL after `grace` seconds. Returns the exit code."""
        self.close_clients()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


def start_server(
    base_dir: Path,
    extra_args: list[str] | None = None,
    models_dir: Path | None = None,
    env: dict[str, str] | None = None,
    tls: ClientTls | None = None,
) -> Server:
    """Start `veraltheim serve` on fresh ports; retry if a port got taken meanwhile.
    `models_dir` is the model repository (default: an empty one in `base_dir`); `env`
    replaces the server's environment when given; `tls` is how to reach a server whose
    `extra_args` turn TLS on."""
    binary = binary_path()
    base_dir.mkdir(parents=True, exist_ok=True)
    data_dir = base_dir / "data"
    models_dir = models_dir or base_dir / "models"
    data_dir.mkdir(exist_ok=True)
    models_dir.mkdir(exist_ok=True)
    last_error: Exception | None = None
    for attempt in range(3):
        grpc_port, http_port = free_port(), free_port()
        while http_port == grpc_port:
            http_port = free_port()
        args = [
            str(binary),
            "serve",
            "--grpc-addr", f"127.0.0.1:{grpc_port}",
            "--http-addr", f"127.0.0.1:{http_port}",
            "--data-dir", str(data_dir),
            "--model-repository", str(models_dir),
            "--enable-fault-injection",
            "--log-format", "text",
            *(extra_args or []),
        ]
        log_path = base_dir / f"server-{attempt}.log"
        log_file = open(log_path, "wb")
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=base_dir,
            env=env,
        )
        log_file.close()
        server = Server(proc, grpc_port, http_port, data_dir, log_path, args, tls=tls)
        try:
            server.wait_ready()
            return server
        except RuntimeError as err:
            last_error = err
            server.terminate(grace=2)
            if "in use" not in server.log().lower():
                break  # not a port race: don't hide the real failure
    pytest.fail(str(last_error), pytrace=False)


def stop_server(server: Server) -> None:
    code = server.terminate()
    assert server.proc.poll() is not None, "veraltheim did not exit after SIGKILL"
    # Not asserting code == 0 here (a SIGKILLed server would be reported by the
    # dedicated shutdown test); keep it visible in the log of a failing test.
    print(f"veraltheim on :{server.grpc_port} exited with {code}")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("shared-server"))
    yield srv
    stop_server(srv)


@pytest.fixture
def server_factory(tmp_path):
    """Start private servers: `server_factory(extra_args=[...])`."""
    started: list[Server] = []

    def factory(
        extra_args: list[str] | None = None,
        models_dir: Path | None = None,
        env: dict[str, str] | None = None,
        tls: ClientTls | None = None,
    ) -> Server:
        srv = start_server(
            tmp_path / f"server{len(started)}", extra_args, models_dir, env, tls
        )
        started.append(srv)
        return srv

    yield factory
    for srv in started:
        stop_server(srv)


@pytest.fixture
def own_server(server_factory) -> Server:
    """A private server for a test that mutates models (load/unload/config)."""
    return server_factory()


@pytest.fixture
def grpc_client(server):
    c = grpcclient.InferenceServerClient(url=server.grpc_url)
    yield c
    c.close()


@pytest.fixture
def stub(server):
    ch = grpc.insecure_channel(server.grpc_url, options=CHANNEL_OPTIONS)
    yield service_pb2_grpc.GRPCInferenceServiceStub(ch)
    ch.close()


@pytest.fixture(autouse=True)
def _server_log_on_failure(request):
    """On a failing test, print the tail of the shared server's log."""
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed and "server" in request.fixturenames:
        srv = request.getfixturevalue("server")
        print(f"--- shared veraltheim log (tail) ---\n{srv.log_tail(3000)}")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
