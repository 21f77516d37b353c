"""Authentication, roles, tenants and the audit log with the stock `tritonclient` (issue 13):
the server runs with an auth file whose token hashes come from `veraltheim auth hash-token`;
clients send `authorization: Bearer <token>` through tritonclient's `headers=`, the CLI
through `--token` / `VERALTHEIM_TOKEN`.

Allowed calls succeed; no token, a wrong token, a revoked token (the file rewritten), a
principal outside its models or queues and tenant A reading tenant B's job each get their exact
status, and the server stays healthy. A load and a refusal appear as `audit.*` events
(`veraltheim events --topic 'audit.>'`) and in `veraltheim audit`.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from _helpers import binary_path, fp32_input, http_get, raises_status

BIN = str(binary_path())

TOKENS = {
    "alice": "alice-e2e-token-7f3a",
    "bob": "bob-e2e-token-91c2",
    "ops": "ops-e2e-token-0d5e",
}
TENANTS = {"alice": "search", "bob": "ads", "ops": "platform"}
ROLES = {"alice": "user", "bob": "user", "ops": "admin"}

ROLES_TOML = """
[[role]]
name = "user"
allow = [
  { verbs = ["infer", "read"], models = ["identity"] },
  { verbs = ["jobs.submit", "jobs.read", "jobs.cancel"], queues = ["default"] },
]

[[role]]
name = "admin"
allow = [{ verbs = ["*"] }]
"""


def hash_line(token: str) -> str:
    """The line `veraltheim auth hash-token` prints for `token`."""
    proc = subprocess.run([BIN, "auth", "hash-token"], input=token + "\n",
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith('token_sha256 = "') and len(line) == len('token_sha256 = ""') + 64, line
    assert token not in line
    return line


def auth_file(names: list[str]) -> str:
    parts = []
    for name in names:
        parts.append(
            f'[[principal]]\nname = "{name}"\ntenant = "{TENANTS[name]}"\n'
            f'roles = ["{ROLES[name]}"]\n{hash_line(TOKENS[name])}\n'
        )
    return "\n".join(parts) + ROLES_TOML


def bearer(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer {TOKENS[name]}"}


@pytest.fixture
def secured(server_factory, tmp_path):
    path = tmp_path / "auth.toml"
    path.write_text(auth_file(["alice", "bob", "ops"]))
    # A root server with authentication must name the user local jobs run as.
    srv = server_factory(extra_args=["--auth-file", str(path), "--jobs-run-as", "nobody:nogroup"])
    srv.auth_path = path
    return srv


def cli(server, *args: str, token: str | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin"}
    if token is not None:
        env["VERALTHEIM_TOKEN"] = token
    at = args.index("--") if "--" in args else len(args)
    argv = [BIN, *args[:at], "--server", server.grpc_url, *args[at:]]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)


class EventWatch:
    """`veraltheim events --json` for `topics`, as `token`, read line by line on a thread."""

    def __init__(self, server, topics: list[str], token: str):
        args = [BIN, "events", "--json", "--server", server.grpc_url, "--token", token]
        for t in topics:
            args += ["--topic", t]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)

    def registered(self, trigger) -> None:
        """Calls `trigger` (which causes an event the watch sees) until one arrives: from
        then on the watch sees every event. Drops what the triggers caused."""
        for _ in range(100):
            trigger()
            try:
                self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            while not self.lines.empty():
                self.lines.get()
            return
        pytest.fail(f"{self.proc.args}: no event arrived: {self.stderr()}")

    def next(self, timeout: float = 30) -> dict:
        try:
            return json.loads(self.lines.get(timeout=timeout))
        except queue.Empty:
            pytest.fail(f"{self.proc.args}: no event in {timeout} s: {self.stderr()}")

    def next_on(self, topic: str, timeout: float = 30) -> dict:
        """The next event on `topic`, skipping others (a trigger's late ones)."""
        while True:
            event = self.next(timeout)
            if event["topic"] == topic:
                return event

    def stderr(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.stderr.read()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def refused_probe(client):
    """A call alice may not make: an `audit.read` refusal event each time."""
    def probe():
        try:
            client.get_server_metadata(headers=bearer("alice"))
        except Exception:
            pass
    return probe


def infer_identity(client, **kwargs) -> np.ndarray:
    arr = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    result = client.infer("identity", [fp32_input(arr)], **kwargs)
    out = result.as_numpy("OUTPUT0")
    np.testing.assert_array_equal(out, arr)
    return out


def assert_healthy(server):
    client = server.client()
    assert client.is_server_live() and client.is_server_ready()
    infer_identity(client, headers=bearer("alice"))


def test_allowed_calls_succeed_with_the_token_in_headers(secured):
    client = secured.client()
    # Health needs no token.
    assert client.is_server_live()
    assert client.is_server_ready()
    status, _ = http_get(f"{secured.http_url}/v2/health/ready")
    assert status == 200
    headers = bearer("alice")
    assert client.is_model_ready("identity", headers=headers)
    meta = client.get_model_metadata("identity", headers=headers)
    assert meta.name == "identity"
    infer_identity(client, headers=headers)
    # The repository index shows alice the models her role reads, and no other.
    index = client.get_model_repository_index(headers=headers)
    assert [m.name for m in index.models] == ["identity"]
    # The operator reads the server's metadata and loads models.
    ops = bearer("ops")
    assert client.get_server_metadata(headers=ops).name == "veraltheim"
    client.load_model("cost", headers=ops)
    assert client.is_model_ready("cost", headers=ops)


def test_the_http_client_sends_its_token_in_headers_too(secured):
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{secured.http_port}")
    try:
        arr = np.array([[4.0, 5.0]], dtype=np.float32)
        inp = httpclient.InferInput("INPUT0", list(arr.shape), "FP32")
        inp.set_data_from_numpy(arr)
        result = client.infer("identity", [inp], headers=bearer("alice"))
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), arr)
        with pytest.raises(InferenceServerException) as err:
            client.infer("identity", [inp])
        assert "authentication required" in str(err.value), err.value
        with pytest.raises(InferenceServerException) as err:
            client.infer("cost", [inp], headers=bearer("alice"))
        assert "'alice' may not infer on model 'cost'" in str(err.value), err.value
        # Health over HTTP needs no token.
        assert client.is_server_live() and client.is_server_ready()
    finally:
        client.close()


def test_no_token_and_a_wrong_token_are_unauthenticated(secured):
    client = secured.client()
    arr = np.ones((1, 3), dtype=np.float32)
    with raises_status("UNAUTHENTICATED", "authorization: Bearer"):
        client.infer("identity", [fp32_input(arr)])
    with raises_status("UNAUTHENTICATED", "unknown or revoked token"):
        client.infer("identity", [fp32_input(arr)],
                     headers={"authorization": "Bearer not-the-token"})
    with raises_status("UNAUTHENTICATED"):
        client.get_model_metadata("identity")
    status, _ = http_get(f"{secured.http_url}/metrics")
    assert status == 401
    assert_healthy(secured)


def test_a_principal_outside_its_models_is_permission_denied_naming_verb_and_model(secured):
    client = secured.client()
    headers = bearer("alice")
    arr = np.ones((1, 3), dtype=np.float32)
    with raises_status("PERMISSION_DENIED", "'alice' may not infer on model 'cost'"):
        client.infer("cost", [fp32_input(arr)], headers=headers)
    with raises_status("PERMISSION_DENIED", "'alice' may not models.admin on model 'identity'"):
        client.unload_model("identity", headers=headers)
    with raises_status("PERMISSION_DENIED", "'alice' may not read on the server"):
        client.get_server_metadata(headers=headers)
    # A stream answers each request in-band: the refusal, then the allowed one.
    results = []
    done = threading.Event()

    def callback(result, error):
        results.append((result, error))
        if len(results) == 2:
            done.set()

    client.start_stream(callback, headers=headers)
    client.async_stream_infer("cost", [fp32_input(arr)])
    client.async_stream_infer("identity", [fp32_input(arr)])
    assert done.wait(30), results
    client.stop_stream()
    assert results[0][1] is not None and "permission denied" in str(results[0][1]), results[0]
    assert results[1][1] is None, results[1]
    np.testing.assert_array_equal(results[1][0].as_numpy("OUTPUT0"), arr)
    assert_healthy(secured)


def test_a_principal_outside_its_queues_and_tenant_a_reading_tenant_bs_job(secured):
    # Bob submits a job to his tenant's queue; alice may not read, follow or cancel it.
    out = cli(secured, "jobs", "submit", "--name", "bobs", "--", "sleep", "30",
              token=TOKENS["bob"])
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip()
    for args in (("jobs", "get", job), ("jobs", "logs", job), ("jobs", "cancel", job),
                 ("jobs", "watch", job)):
        out = cli(secured, *args, token=TOKENS["alice"])
        assert out.returncode != 0, (args, out.stdout)
        assert "PermissionDenied" in out.stderr, (args, out.stderr)
        assert "belongs to another tenant" in out.stderr, (args, out.stderr)
    listed = json.loads(cli(secured, "jobs", "list", "--json", token=TOKENS["alice"]).stdout)
    assert [j["id"] for j in listed] == []
    # Bob sees it; a queue outside his role is refused naming it.
    got = json.loads(cli(secured, "jobs", "get", job, "--json", token=TOKENS["bob"]).stdout)
    assert got["id"] == job
    out = cli(secured, "jobs", "submit", "--queue", "gpu", "--", "true", token=TOKENS["bob"])
    assert out.returncode != 0
    assert "PermissionDenied" in out.stderr and "jobs.submit on queue 'gpu'" in out.stderr, out.stderr
    # The operator (jobs.admin) may cancel it.
    out = cli(secured, "jobs", "cancel", job, token=TOKENS["ops"])
    assert out.returncode == 0, out.stderr
    assert "CANCELLED" in out.stdout
    assert_healthy(secured)


def test_a_revoked_token_stops_working_once_the_file_is_rewritten(secured):
    client = secured.client()
    infer_identity(client, headers=bearer("bob"))
    # The reload is an event: wait for it rather than for time to pass.
    watch = EventWatch(secured, ["auth.>", "audit.read"], TOKENS["ops"])
    try:
        watch.registered(refused_probe(client))
        secured.auth_path.write_text(auth_file(["alice", "ops"]))
        event = watch.next_on("auth.reloaded")
    finally:
        watch.close()
    assert event["attributes"]["principals"] == "2", event
    arr = np.ones((1, 3), dtype=np.float32)
    with raises_status("UNAUTHENTICATED", "unknown or revoked token"):
        client.infer("identity", [fp32_input(arr)], headers=bearer("bob"))
    assert_healthy(secured)


def test_a_load_and_a_refusal_are_audited(secured):
    client = secured.client()
    watch = EventWatch(secured, ["audit.>"], TOKENS["ops"])
    try:
        watch.registered(refused_probe(client))
        client.load_model("identity", headers=bearer("ops"))
        with raises_status("PERMISSION_DENIED"):
            client.unload_model("identity", headers=bearer("alice"))
        load = watch.next_on("audit.models.admin")
        refusal = watch.next_on("audit.models.admin")
    finally:
        watch.close()
    assert load["topic"] == "audit.models.admin"
    assert load["attributes"]["principal"] == "ops"
    assert load["attributes"]["tenant"] == "platform"
    assert load["attributes"]["resource"] == "model:identity"
    assert load["attributes"]["result"] == "OK"
    assert load["attributes"]["peer"].startswith("127.0.0.1:")
    assert refusal["attributes"]["principal"] == "alice"
    assert refusal["attributes"]["result"] == "PERMISSION_DENIED"
    # Kept in the store: `veraltheim audit` lists them (system.admin only).
    out = cli(secured, "audit", "--json", token=TOKENS["alice"])
    assert out.returncode != 0 and "PermissionDenied" in out.stderr, out.stderr
    out = cli(secured, "audit", "--json", "--since", "1h", token=TOKENS["ops"])
    assert out.returncode == 0, out.stderr
    kept = [json.loads(line) for line in out.stdout.splitlines()]
    assert any(r["principal"] == "ops" and r["verb"] == "models.admin" and r["result"] == "OK"
               for r in kept), kept
    assert any(r["principal"] == "alice" and r["result"] == "PERMISSION_DENIED" for r in kept), kept
    assert_healthy(secured)


def test_without_an_auth_file_a_public_address_is_refused_with_what_to_do(tmp_path):
    proc = subprocess.run(
        [BIN, "serve", "--grpc-addr", "0.0.0.0:0", "--http-addr", "127.0.0.1:0",
         "--data-dir", str(tmp_path / "data"), "--model-repository", str(tmp_path / "models")],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    for part in ("without authentication", "--auth-file", "loopback", "--insecure-no-auth"):
        assert part in proc.stderr, proc.stderr


def test_mutual_tls_names_a_principal_by_its_certificate_and_a_token_still_decides(
        server_factory, tmp_path):
    from conftest import ClientTls
    from test_tls import Ca, tls_client

    pki = tmp_path / "pki"
    pki.mkdir()
    server_ca, client_ca = Ca(pki, "server CA"), Ca(pki, "client CA")
    cert, key = server_ca.server()
    carol = client_ca.client("carol")        # CN carol, DNS SAN carol.example
    dave = client_ca.client("dave")          # known by its DNS name only
    stranger = client_ca.client("stranger")  # signed by the CA, named in no principal
    auth = tmp_path / "auth.toml"
    auth.write_text(
        '[[principal]]\nname = "carol"\ntenant = "search"\nroles = ["user"]\n'
        'client_cert_cn = "carol"\n\n'
        '[[principal]]\nname = "dave"\ntenant = "ads"\nroles = ["user"]\n'
        'client_cert_cn = "dave.example"\n\n'
        + auth_file(["bob"]))
    srv = server_factory(
        extra_args=["--tls-cert", str(cert), "--tls-key", str(key),
                    "--tls-client-ca", str(client_ca.file), "--auth-file", str(auth),
                    "--jobs-run-as", "nobody:nogroup"],
        tls=ClientTls(server_ca.file, *carol))

    def client(pair):
        return tls_client(srv, root_certificates=str(server_ca.file),
                          certificate_chain=str(pair[0]), private_key=str(pair[1]))

    arr = np.ones((1, 3), dtype=np.float32)
    # The certificate alone names carol: her role's model answers, another is refused by name.
    infer_identity(client(carol))
    with raises_status("PERMISSION_DENIED", "'carol' may not infer on model 'cost'"):
        client(carol).infer("cost", [fp32_input(arr)])
    # A DNS name of the certificate matches too.
    infer_identity(client(dave))
    # A valid certificate that names no principal is no principal.
    with raises_status("UNAUTHENTICATED", "client certificate names no principal"):
        client(stranger).infer("identity", [fp32_input(arr)])
    # A token decides when one is sent: over carol's connection, bob's token is bob.
    with raises_status("PERMISSION_DENIED", "'bob' may not infer on model 'cost'"):
        client(carol).infer("cost", [fp32_input(arr)], headers=bearer("bob"))
    with raises_status("UNAUTHENTICATED", "unknown or revoked token"):
        client(carol).infer("identity", [fp32_input(arr)],
                            headers={"authorization": "Bearer wrong"})
    infer_identity(client(carol))
