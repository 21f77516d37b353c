"""TLS and mutual TLS end to end: the stock `tritonclient.grpc` with `ssl=True` (and a client
certificate for mutual TLS) infers over TLS, HTTP health answers over https, and clients that
speak plaintext, present no certificate or one from another CA are refused. Certificates are
made here with `cryptography`."""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import ssl
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from tritonclient.utils import InferenceServerException

from _helpers import http_get, infer_fp32
from conftest import ClientTls


class Ca:
    """A certificate authority that signs server and client certificates into `dir`."""

    def __init__(self, dir: Path, name: str):
        self.dir = dir
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.name = subject
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.file = dir / f"{name.replace(' ', '-')}.crt"
        self.file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, file_name: str, cn: str, sans: list[x509.GeneralName], usage) -> tuple[Path, Path]:
        """A certificate for `cn` with `sans`; (certificate file, key file)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_file = self.dir / f"{file_name}.crt"
        key_file = self.dir / f"{file_name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_file, key_file

    def server(self) -> tuple[Path, Path]:
        return self.issue(
            "server",
            "veraltheim",
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
            ExtendedKeyUsageOID.SERVER_AUTH,
        )

    def client(self, name: str) -> tuple[Path, Path]:
        return self.issue(name, name, [x509.DNSName(f"{name}.example")], ExtendedKeyUsageOID.CLIENT_AUTH)


def tls_client(server, **kwargs) -> grpcclient.InferenceServerClient:
    c = grpcclient.InferenceServerClient(url=server.grpc_url, ssl=True, **kwargs)
    server._clients.append(c)
    return c


def infers(client) -> None:
    """The identity model answers through `client`."""
    x = np.array([[1.5, -2.0, 3.25]], dtype=np.float32)
    np.testing.assert_array_equal(infer_fp32(client, "identity", x), x)


def refused(client) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as excinfo:
        client.is_server_ready()
    return excinfo.value


@pytest.fixture
def pki(tmp_path):
    """A server CA with its server certificate, and a client CA with a client `alice`."""
    dir = tmp_path / "pki"
    dir.mkdir()
    server_ca = Ca(dir, "server CA")
    client_ca = Ca(dir, "client CA")
    return {
        "dir": dir,
        "server_ca": server_ca,
        "client_ca": client_ca,
        "server": server_ca.server(),
        "alice": client_ca.client("alice"),
    }


def test_tritonclient_infers_over_tls_and_plaintext_is_refused(server_factory, pki):
    cert, key = pki["server"]
    ca = pki["server_ca"].file
    srv = server_factory(
        extra_args=["--tls-cert", str(cert), "--tls-key", str(key)], tls=ClientTls(ca)
    )

    client = tls_client(srv, root_certificates=str(ca))
    assert client.is_server_ready()
    assert client.get_server_metadata().name == "veraltheim"
    infers(client)

    # A client that does not trust the server's CA, and a plaintext client.
    other = Ca(pki["dir"], "other CA")
    refused(tls_client(srv, root_certificates=str(other.file)))
    plain = srv.client()
    refused(plain)

    # HTTP over TLS; plaintext HTTP to the same port gets no answer.
    status, _ = http_get(f"{srv.http_url}/v2/health/ready", context=ClientTls(ca).ssl_context())
    assert status == 200
    assert srv.http_url.startswith("https://")
    with pytest.raises((OSError, http.client.HTTPException)):
        http_get(f"http://127.0.0.1:{srv.http_port}/v2/health/ready", timeout=5.0)
    # The server is unharmed by the refused clients.
    infers(client)


def test_tritonclient_with_a_client_certificate_over_mutual_tls(server_factory, pki):
    cert, key = pki["server"]
    ca = pki["server_ca"].file
    alice_cert, alice_key = pki["alice"]
    srv = server_factory(
        extra_args=[
            "--tls-cert", str(cert),
            "--tls-key", str(key),
            "--tls-client-ca", str(pki["client_ca"].file),
        ],
        tls=ClientTls(ca, alice_cert, alice_key),
    )
    alice = tls_client(
        srv,
        root_certificates=str(ca),
        private_key=str(alice_key),
        certificate_chain=str(alice_cert),
    )
    assert alice.is_server_ready()
    infers(alice)

    # No client certificate, and a certificate from a CA the server does not trust for clients.
    refused(tls_client(srv, root_certificates=str(ca)))
    mallory_cert, mallory_key = pki["server_ca"].client("mallory")
    refused(
        tls_client(
            srv,
            root_certificates=str(ca),
            private_key=str(mallory_key),
            certificate_chain=str(mallory_cert),
        )
    )

    # HTTP health over mutual TLS: with alice's certificate, and refused without one.
    url = f"{srv.http_url}/v2/health/ready"
    status, _ = http_get(url, context=ClientTls(ca, alice_cert, alice_key).ssl_context())
    assert status == 200
    # Refused in the handshake: with TLS 1.3 the client reads the server's alert.
    with pytest.raises((urllib.error.URLError, ssl.SSLError)) as excinfo:
        http_get(url, context=ClientTls(ca).ssl_context())
    assert "CERTIFICATE_REQUIRED" in str(excinfo.value), excinfo.value
    with pytest.raises((urllib.error.URLError, ssl.SSLError)) as excinfo:
        http_get(url, context=ClientTls(ca, mallory_cert, mallory_key).ssl_context())
    assert "UNKNOWN_CA" in str(excinfo.value), excinfo.value
    infers(alice)
