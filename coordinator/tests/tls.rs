//! TLS through the real binary (`serve --tls-cert/--tls-key/--tls-client-ca`): gRPC and HTTP over
//! TLS, plaintext refused, mutual TLS refusing clients without a certificate from the client CA,
//! the names of a client certificate seen by the server, certificate rotation without a restart,
//! clear start-up errors, and the CLI's `--ca/--cert/--key`. Certificates are made here (rcgen).

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use veraltheim_proto::inference::{
    self as kserve, grpc_inference_service_client::GrpcInferenceServiceClient,
};

mod common;

/// A certificate authority.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

/// A certificate and its key, as PEM.
struct Pair {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    fn leaf(&self, cn: &str, sans: &[&str], usage: ExtendedKeyUsagePurpose) -> Pair {
        let key = KeyPair::generate().unwrap();
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A server certificate for 127.0.0.1 and localhost.
    fn server(&self) -> Pair {
        self.leaf(
            "veraltheim",
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    fn client(&self, cn: &str, sans: &[&str]) -> Pair {
        self.leaf(cn, sans, ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// Writes `text` to `dir/name` as a rotation would: a new file renamed over the old one.
fn put(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.new"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

/// A server started with TLS flags, its log lines (JSON) read as they come.
struct TlsServer {
    child: Child,
    grpc: String,
    http: String,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TlsServer {
    /// Starts `serve` with `extra` flags (in `dir`, which it owns) and waits until it answers
    /// Health over TLS with `ready_tls`.
    async fn start(dir: tempfile::TempDir, extra: &[&str], ready_tls: ClientTlsConfig) -> Self {
        let (mut command, grpc, http) = common::serve_command(
            dir.path(),
            &[
                &[
                    "--log-format",
                    "json",
                    "--log-level",
                    "info,veraltheim::tls=debug",
                ],
                extra,
            ]
            .concat(),
            None,
        );
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = TlsServer {
            child,
            grpc,
            http,
            lines,
            seen: Vec::new(),
            _dir: dir,
        };
        let started = Instant::now();
        loop {
            if let Ok(ch) = server.channel(ready_tls.clone()).await
                && GrpcInferenceServiceClient::new(ch)
                    .server_ready(kserve::ServerReadyRequest {})
                    .await
                    .is_ok_and(|r| r.into_inner().ready)
            {
                return server;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                server.drain();
                panic!(
                    "the server exited before it was ready: {status}\n{}",
                    server.seen.join("\n")
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "server did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A new connection to the gRPC port over TLS.
    async fn channel(&self, tls: ClientTlsConfig) -> Result<Channel, tonic::transport::Error> {
        Channel::from_shared(format!("https://{}", self.grpc))
            .unwrap()
            .tls_config(tls)?
            .connect()
            .await
    }

    /// Moves the log lines written so far into `seen`.
    fn drain(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
    }

    /// Waits (30 s at most) for a log line with every one of `parts`.
    fn wait_for_line(&mut self, parts: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(line) = self
                .seen
                .iter()
                .find(|l| parts.iter().all(|p| l.contains(p)))
            {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!(
                    "no log line with {parts:?}; the log:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Whether a log line with every one of `parts` has been written (without waiting).
    fn logged(&mut self, parts: &[&str]) -> bool {
        self.drain();
        self.seen
            .iter()
            .any(|l| parts.iter().all(|p| l.contains(p)))
    }
}

fn trusting(ca: &Ca) -> ClientTlsConfig {
    ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca.pem))
}

fn with_identity(tls: ClientTlsConfig, pair: &Pair) -> ClientTlsConfig {
    tls.identity(Identity::from_pem(&pair.cert, &pair.key))
}

/// One KServe call on a new TLS connection: the model's answer, or the status.
async fn infer_once(server: &TlsServer, tls: ClientTlsConfig) -> Result<Vec<u8>, tonic::Status> {
    let ch = server
        .channel(tls)
        .await
        .map_err(|e| tonic::Status::unavailable(format!("{e:?}")))?;
    infer_on(ch).await
}

async fn infer_on(ch: Channel) -> Result<Vec<u8>, tonic::Status> {
    let raw: Vec<u8> = [1.5f32, -2.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let r = GrpcInferenceServiceClient::new(ch)
        .model_infer(kserve::ModelInferRequest {
            model_name: "identity".into(),
            inputs: vec![kserve::model_infer_request::InferInputTensor {
                name: "INPUT0".into(),
                datatype: "FP32".into(),
                shape: vec![1, 2],
                ..Default::default()
            }],
            raw_input_contents: vec![raw.into()],
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(r.raw_output_contents
        .first()
        .map(|b| b.to_vec())
        .unwrap_or_default())
}

fn expected() -> Vec<u8> {
    [1.5f32, -2.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

/// `GET path` over TLS (HTTP/1.1) to `addr`, trusting `ca`: the whole response, or the error
/// that ended the exchange.
async fn https_get(addr: &str, ca: &Ca, path: &str) -> Result<String, String> {
    https_get_as(addr, ca, None, path).await
}

/// [`https_get`] with a client certificate.
async fn https_get_as(
    addr: &str,
    ca: &Ca,
    identity: Option<&Pair>,
    path: &str,
) -> Result<String, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match identity {
        Some(pair) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(pair.cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(pair.key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
    tls.write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    tls.read_to_string(&mut response)
        .await
        .map_err(|e| e.to_string())?;
    Ok(response)
}

/// The CLI (`veraltheim health`) against `server` with `args`: its exit status and stderr.
fn cli_health(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_veraltheim"))
        .arg("health")
        .args(args)
        .env_remove("VERALTHEIM_SERVER")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn grpc_http_and_the_cli_work_over_tls_and_plaintext_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server CA");
    let pair = ca.server();
    let cert = put(dir.path(), "tls.crt", &pair.cert);
    let key = put(dir.path(), "tls.key", &pair.key);
    let ca_file = put(dir.path(), "ca.crt", &ca.pem);
    let (cert, key, ca_path) = (
        cert.to_str().unwrap().to_string(),
        key.to_str().unwrap().to_string(),
        ca_file.to_str().unwrap().to_string(),
    );
    let server = TlsServer::start(
        dir,
        &["--tls-cert", &cert, "--tls-key", &key],
        trusting(&ca),
    )
    .await;

    assert_eq!(
        infer_once(&server, trusting(&ca)).await.unwrap(),
        expected()
    );
    // A client trusting another CA refuses the server.
    let other = Ca::new("other CA");
    assert!(server.channel(trusting(&other)).await.is_err());

    // Plaintext gRPC to the TLS port fails.
    let plain = Channel::from_shared(format!("http://{}", server.grpc))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    let refused = match plain.connect().await {
        Ok(ch) => infer_on(ch).await.unwrap_err(),
        Err(e) => tonic::Status::unavailable(e.to_string()),
    };
    assert!(
        matches!(
            refused.code(),
            Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
        ),
        "{refused:?}"
    );

    // HTTP: health over TLS; plaintext gets no HTTP answer.
    let ready = https_get(&server.http, &ca, "/v2/health/ready")
        .await
        .unwrap();
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let mut tcp = tokio::net::TcpStream::connect(&server.http).await.unwrap();
    tcp.write_all(b"GET /v2/health/ready HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    let _ = tcp.read_to_end(&mut reply).await;
    assert!(!reply.starts_with(b"HTTP/"), "{reply:?}");

    // The CLI: https:// or a bare address with --ca.
    let https = format!("https://{}", server.grpc);
    let (ok, err) = cli_health(&["--server", &https, "--ca", &ca_path]);
    assert!(ok, "{err}");
    let (ok, err) = cli_health(&["--server", &server.grpc, "--ca", &ca_path]);
    assert!(ok, "{err}");
    // Without --ca the system's CAs do not know this one; plaintext is refused.
    let (ok, _) = cli_health(&["--server", &https]);
    assert!(!ok);
    let (ok, _) = cli_health(&["--server", &server.grpc]);
    assert!(!ok);
    let (ok, err) = cli_health(&[
        "--server",
        &format!("http://{}", server.grpc),
        "--ca",
        &ca_path,
    ]);
    assert!(!ok && err.contains("https://"), "{err}");
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_certificate_from_the_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let pair = server_ca.server();
    let alice = client_ca.client("alice", &["alice.example"]);
    let paths: Vec<String> = [
        ("tls.crt", &pair.cert),
        ("tls.key", &pair.key),
        ("client-ca.crt", &client_ca.pem),
        ("ca.crt", &server_ca.pem),
        ("alice.crt", &alice.cert),
        ("alice.key", &alice.key),
    ]
    .iter()
    .map(|(name, text)| put(dir.path(), name, text).to_str().unwrap().to_string())
    .collect();
    let [cert, key, client_ca_file, ca_file, alice_cert, alice_key] = &paths[..] else {
        unreachable!()
    };
    let mut server = TlsServer::start(
        dir,
        &[
            "--tls-cert",
            cert,
            "--tls-key",
            key,
            "--tls-client-ca",
            client_ca_file,
        ],
        with_identity(trusting(&server_ca), &alice),
    )
    .await;

    // A client certificate from the client CA: served, and the server saw its names.
    assert_eq!(
        infer_once(&server, with_identity(trusting(&server_ca), &alice))
            .await
            .unwrap(),
        expected()
    );
    let line = server.wait_for_line(&["TLS client certificate verified", "alice.example"]);
    assert!(line.contains(r#"\"alice\", \"alice.example\""#), "{line}");

    // No client certificate: refused in the handshake (with TLS 1.3 the client learns it from
    // the server's alert, on its first read).
    let e = https_get_as(&server.http, &server_ca, None, "/v2/health/ready")
        .await
        .unwrap_err();
    assert!(e.contains("CertificateRequired"), "{e}");
    let refused = infer_once(&server, trusting(&server_ca)).await.unwrap_err();
    assert!(
        matches!(
            refused.code(),
            Code::Unavailable | Code::Cancelled | Code::Unknown
        ),
        "{refused:?}"
    );
    // A certificate signed by another CA (here the server's own): refused.
    let mallory = server_ca.client("mallory", &[]);
    let e = https_get_as(&server.http, &server_ca, Some(&mallory), "/v2/health/ready")
        .await
        .unwrap_err();
    assert!(e.contains("UnknownCA"), "{e}");
    let refused = infer_once(&server, with_identity(trusting(&server_ca), &mallory))
        .await
        .unwrap_err();
    assert!(
        matches!(
            refused.code(),
            Code::Unavailable | Code::Cancelled | Code::Unknown
        ),
        "{refused:?}"
    );
    assert!(!server.logged(&["TLS client certificate verified", "mallory"]));
    let ready = https_get_as(&server.http, &server_ca, Some(&alice), "/v2/health/ready")
        .await
        .unwrap();
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    // The server is unharmed.
    assert_eq!(
        infer_once(&server, with_identity(trusting(&server_ca), &alice))
            .await
            .unwrap(),
        expected()
    );

    // The CLI with --cert and --key.
    let https = format!("https://{}", server.grpc);
    let (ok, err) = cli_health(&[
        "--server", &https, "--ca", ca_file, "--cert", alice_cert, "--key", alice_key,
    ]);
    assert!(ok, "{err}");
    let (ok, _) = cli_health(&["--server", &https, "--ca", ca_file]);
    assert!(!ok, "no client certificate, yet health answered");
}

#[tokio::test]
async fn renewed_certificates_are_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let first = Ca::new("first CA");
    let pair = first.server();
    let cert = put(dir.path(), "tls.crt", &pair.cert);
    let key = put(dir.path(), "tls.key", &pair.key);
    let files = dir.path().to_path_buf();
    let mut server = TlsServer::start(
        dir,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        trusting(&first),
    )
    .await;
    // A connection made before the rotation.
    let before = server.channel(trusting(&first)).await.unwrap();
    assert_eq!(infer_on(before.clone()).await.unwrap(), expected());

    // A broken certificate file: logged when a connection makes the server look, and the
    // previous certificate is kept.
    put(
        &files,
        "tls.crt",
        "-----BEGIN CERTIFICATE-----\nnot base64\n",
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server.logged(&["TLS files changed but cannot be used"]) {
        assert!(Instant::now() < deadline, "{}", server.seen.join("\n"));
        assert_eq!(
            infer_once(&server, trusting(&first)).await.unwrap(),
            expected(),
            "the previous certificate must stay in use"
        );
    }
    assert_eq!(
        infer_once(&server, trusting(&first)).await.unwrap(),
        expected()
    );

    // The renewal: a new certificate from a new CA, then its key.
    let second = Ca::new("second CA");
    let renewed = second.server();
    put(&files, "tls.crt", &renewed.cert);
    put(&files, "tls.key", &renewed.key);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match infer_once(&server, trusting(&second)).await {
            Ok(answer) => {
                assert_eq!(answer, expected());
                break;
            }
            Err(e) => assert!(
                Instant::now() < deadline,
                "the renewed certificate was never served: {e:?}\n{}",
                server.seen.join("\n")
            ),
        }
    }
    assert!(server.logged(&["TLS files changed: new connections use the new certificate"]));
    // New connections get the new certificate only; the old connection keeps working; the
    // process never stopped.
    assert!(server.channel(trusting(&first)).await.is_err());
    assert_eq!(infer_on(before).await.unwrap(), expected());
    assert!(server.child.try_wait().unwrap().is_none());
}

#[test]
fn unusable_tls_files_stop_the_start_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("ca");
    let pair = ca.server();
    let other = ca.server();
    let cert = put(dir.path(), "tls.crt", &pair.cert);
    let key = put(dir.path(), "tls.key", &pair.key);
    let wrong_key = put(dir.path(), "other.key", &other.key);
    let missing = dir.path().join("missing.crt");
    let start = |args: &[&Path]| {
        let mut flags: Vec<&str> = Vec::new();
        for (flag, path) in ["--tls-cert", "--tls-key", "--tls-client-ca"]
            .iter()
            .zip(args)
        {
            flags.push(flag);
            flags.push(path.to_str().unwrap());
        }
        let (mut command, _, _) = common::serve_command(dir.path(), &flags, None);
        let out = command.output().unwrap();
        assert!(!out.status.success(), "{flags:?} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = start(&[&missing, &key]);
    assert!(
        e.contains(missing.to_str().unwrap()) && e.contains("cannot read"),
        "{e}"
    );
    let e = start(&[&cert, &wrong_key]);
    assert!(
        e.contains(wrong_key.to_str().unwrap()) && e.contains("does not match"),
        "{e}"
    );
    let e = start(&[&cert, &key, &missing]);
    assert!(
        e.contains(missing.to_str().unwrap()) && e.contains("client CA"),
        "{e}"
    );
    // A key without its certificate.
    let (mut command, _, _) =
        common::serve_command(dir.path(), &["--tls-key", key.to_str().unwrap()], None);
    let out = command.output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("--tls-cert"), "{e}");
    // The key's PEM is a key, not a certificate: the certificate flag given the key file.
    let e = start(&[&key, &key]);
    assert!(e.contains("no PEM certificate"), "{e}");
}
