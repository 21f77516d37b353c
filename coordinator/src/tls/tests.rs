use std::net::SocketAddr;

use axum::routing::get;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::oneshot;

use super::*;

/// A certificate authority that signs server and client certificates.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
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

    /// (certificate PEM, key PEM) with `cn` as common name and `sans` as DNS names.
    fn leaf(&self, cn: impl Into<DnValue>, sans: &[&str], client: bool) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    // Replaced as a rotation would: a new file renamed over the old one.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

/// Server files signed by `ca` (and, for mutual TLS, `client_ca`'s certificate) in `dir`.
fn server_files(dir: &Path, ca: &Ca, client_ca: Option<&Ca>) -> TlsFiles {
    let (cert, key) = ca.leaf("server", &["localhost"], false);
    TlsFiles {
        cert: write(dir, "server.crt", &cert),
        key: write(dir, "server.key", &key),
        client_ca: client_ca.map(|c| write(dir, "client-ca.crt", &c.pem)),
    }
}

fn names_of(cert_pem: &str) -> Vec<String> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    let cert = webpki::EndEntityCert::try_from(&der).unwrap();
    let mut names: Vec<String> = common_name(cert.subject()).into_iter().collect();
    names.extend(cert.valid_dns_names().map(str::to_string));
    names
}

#[test]
fn the_common_name_comes_first_then_the_dns_names_in_each_string_type() {
    let ca = Ca::new("names");
    let (cert, _) = ca.leaf("alice", &["alice.example", "a.example"], true);
    assert_eq!(names_of(&cert), ["alice", "alice.example", "a.example"]);
    for cn in [
        DnValue::PrintableString("bob-1".try_into().unwrap()),
        DnValue::Ia5String("bob-1".try_into().unwrap()),
        DnValue::BmpString("bob-1".try_into().unwrap()),
        DnValue::Utf8String("bob-1".into()),
    ] {
        let (cert, _) = ca.leaf(cn.clone(), &[], true);
        assert_eq!(names_of(&cert), ["bob-1"], "{cn:?}");
    }
    // Without a common name: the DNS names alone.
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["svc.example".to_string()]).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "org");
    let cert = params.signed_by(&key, &ca.issuer).unwrap().pem();
    assert_eq!(names_of(&cert), ["svc.example"]);
}

#[test]
fn truncated_or_malformed_subjects_give_no_name() {
    // SET { SEQUENCE { OID 2.5.4.3, UTF8String "ab" } }
    let good = [
        0x31, 0x0b, 0x30, 0x09, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x02, b'a', b'b',
    ];
    assert_eq!(common_name(&good).as_deref(), Some("ab"));
    for cut in 0..good.len() {
        assert_eq!(common_name(&good[..cut]), None, "cut at {cut}");
    }
    // A length longer than what follows, and a length of five bytes.
    assert_eq!(common_name(&[0x31, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    assert_eq!(common_name(&[0x31, 0x85, 0, 0, 0, 0, 1, 0]), None);
    // Not a SET.
    assert_eq!(common_name(&[0x30, 0x00]), None);
}

fn load_error(files: &TlsFiles) -> String {
    match files.load() {
        Ok(_) => panic!("{files:?} loaded"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn unusable_files_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("ca");
    let files = server_files(dir.path(), &ca, Some(&ca));
    files.load().unwrap();

    let missing = dir.path().join("nope.crt");
    let e = load_error(&TlsFiles {
        cert: missing.clone(),
        ..files.clone()
    });
    assert!(
        e.contains(&missing.display().to_string()) && e.contains("cannot read"),
        "{e}"
    );

    // A key where the certificate should be.
    let e = load_error(&TlsFiles {
        cert: files.key.clone(),
        ..files.clone()
    });
    assert!(
        e.contains(&files.key.display().to_string()) && e.contains("no PEM certificate"),
        "{e}"
    );

    let garbage = write(dir.path(), "garbage.key", "not a key\n");
    let e = load_error(&TlsFiles {
        key: garbage.clone(),
        ..files.clone()
    });
    assert!(
        e.contains(&garbage.display().to_string()) && e.contains("private key"),
        "{e}"
    );

    // Another certificate's key.
    let (_, other_key) = ca.leaf("other", &["localhost"], false);
    let other = write(dir.path(), "other.key", &other_key);
    let e = load_error(&TlsFiles {
        key: other.clone(),
        ..files.clone()
    });
    assert!(
        e.contains(&other.display().to_string())
            && e.contains(&files.cert.display().to_string())
            && e.contains("does not match"),
        "{e}"
    );

    let empty_ca = write(dir.path(), "empty-ca.crt", "");
    let e = load_error(&TlsFiles {
        client_ca: Some(empty_ca.clone()),
        ..files.clone()
    });
    assert!(
        e.contains(&empty_ca.display().to_string()) && e.contains("client CA"),
        "{e}"
    );
}

#[test]
fn changed_files_are_read_again_and_broken_ones_keep_the_previous_config() {
    let dir = tempfile::tempdir().unwrap();
    let files = server_files(dir.path(), &Ca::new("first"), None);
    // Every call checks the files.
    let tls = Tls::with_interval(files.clone(), Duration::ZERO).unwrap();
    let first = tls.config();
    assert!(Arc::ptr_eq(&first, &tls.config()), "nothing changed");

    // A half-written certificate: logged, the previous configuration stays.
    write(
        dir.path(),
        "server.crt",
        "-----BEGIN CERTIFICATE-----\nAAAA",
    );
    assert!(Arc::ptr_eq(&first, &tls.config()));
    assert!(Arc::ptr_eq(&first, &tls.config()));

    // The new pair, written one file after the other: the certificate alone does not match
    // the old key (kept), then both are read.
    let second = Ca::new("second");
    let (cert, key) = second.leaf("server", &["localhost"], false);
    write(dir.path(), "server.crt", &cert);
    assert!(Arc::ptr_eq(&first, &tls.config()));
    write(dir.path(), "server.key", &key);
    let renewed = tls.config();
    assert!(!Arc::ptr_eq(&first, &renewed), "the new pair was not read");
    assert!(Arc::ptr_eq(&renewed, &tls.config()));

    // With the usual interval, a change right after a check waits for the next one.
    let slow = Tls::load(files).unwrap();
    let before = slow.config();
    let (cert, key) = Ca::new("third").leaf("server", &["localhost"], false);
    write(dir.path(), "server.crt", &cert);
    write(dir.path(), "server.key", &key);
    assert!(Arc::ptr_eq(&before, &slow.config()));
}

/// A client config trusting `ca`, with `identity` (cert PEM, key PEM) as its certificate.
fn client_config(ca: &Ca, identity: Option<&(String, String)>) -> Arc<rustls::ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    Arc::new(match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    })
}

/// GET `/who` over TLS with HTTP/1.1; the response, or the error that ended the exchange.
async fn who(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<String, String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"GET /who HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    tls.read_to_string(&mut response)
        .await
        .map_err(|e| e.to_string())?;
    Ok(response)
}

/// A router that answers `/who` with what the request's extensions say about the caller.
fn who_router() -> axum::Router {
    axum::Router::new().route(
        "/who",
        get(
            |ConnectInfo(peer): ConnectInfo<SocketAddr>,
             names: Option<axum::Extension<PeerCertNames>>| async move {
                let names = names.map(|n| n.0.0.join(",")).unwrap_or_default();
                format!("peer={} names=[{names}]", peer.ip())
            },
        ),
    )
}

#[tokio::test]
async fn mutual_tls_requests_carry_the_peer_address_and_certificate_names() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let tls = Arc::new(Tls::load(server_files(dir.path(), &server_ca, Some(&client_ca))).unwrap());
    assert!(tls.mutual());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, who_router(), tls, async move {
        let _ = stopped.await;
    }));

    let alice = client_ca.leaf("alice", &["alice.example"], true);
    let answer = who(addr, client_config(&server_ca, Some(&alice)))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.ends_with("peer=127.0.0.1 names=[alice,alice.example]"),
        "{answer}"
    );

    // No certificate: refused in the handshake (TLS 1.3 reports it on the first read).
    let e = who(addr, client_config(&server_ca, None))
        .await
        .unwrap_err();
    assert!(e.contains("CertificateRequired"), "{e}");
    // A certificate from a CA the server does not trust.
    let mallory = server_ca.leaf("mallory", &[], true);
    let e = who(addr, client_config(&server_ca, Some(&mallory)))
        .await
        .unwrap_err();
    assert!(
        e.contains("UnknownCA") || e.contains("BadCertificate"),
        "{e}"
    );
    // Plaintext to the TLS port gets no HTTP answer.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /who HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    let _ = tcp.read_to_end(&mut reply).await;
    assert!(!reply.starts_with(b"HTTP/"), "{reply:?}");

    // The failed handshakes did not disturb the server.
    let answer = who(addr, client_config(&server_ca, Some(&alice)))
        .await
        .unwrap();
    assert!(answer.contains("names=[alice,alice.example]"), "{answer}");

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn without_a_client_ca_no_certificate_is_asked_and_no_names_are_set() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server CA");
    let tls = Arc::new(Tls::load(server_files(dir.path(), &ca, None)).unwrap());
    assert!(!tls.mutual());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, who_router(), tls, async move {
        let _ = stopped.await;
    }));
    let answer = who(addr, client_config(&ca, None)).await.unwrap();
    assert!(answer.ends_with("peer=127.0.0.1 names=[]"), "{answer}");
    // A client trusting another CA refuses the server.
    let e = who(addr, client_config(&Ca::new("other"), None))
        .await
        .unwrap_err();
    assert!(e.contains("UnknownIssuer"), "{e}");
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn shutdown_lets_an_open_connection_finish_its_request() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server CA");
    let tls = Arc::new(Tls::load(server_files(dir.path(), &ca, None)).unwrap());
    let (entered_tx, entered_rx) = oneshot::channel::<()>();
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let gate = Arc::new(Mutex::new(Some((entered_tx, release_rx))));
    let router = axum::Router::new().route(
        "/slow",
        get(move || {
            let gate = gate.lock().take();
            async move {
                if let Some((entered, release)) = gate {
                    let _ = entered.send(());
                    let _ = release.await;
                }
                "done"
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, router, tls, async move {
        let _ = stopped.await;
    }));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut conn = tokio_rustls::TlsConnector::from(client_config(&ca, None))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    conn.write_all(b"GET /slow HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    entered_rx.await.unwrap();
    stop.send(()).unwrap();
    // The server stops listening...
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "the server kept listening");
        tokio::task::yield_now().await;
    }
    // ...but waits for the request in flight...
    assert!(
        !server.is_finished(),
        "the server stopped before its request finished"
    );
    release_tx.send(()).unwrap();
    // ...which is answered, and the connection then closed.
    let mut response = String::new();
    conn.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("done"), "{response}");
    server.await.unwrap().unwrap();
}

#[test]
fn the_client_endpoint_follows_the_scheme_and_the_tls_flags() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("ca");
    let ca_file = write(dir.path(), "ca.crt", &ca.pem);
    let (cert, key) = ca.leaf("alice", &[], true);
    let cert_file = write(dir.path(), "alice.crt", &cert);
    let key_file = write(dir.path(), "alice.key", &key);

    let e = client_endpoint("127.0.0.1:1", None, None, None).unwrap();
    assert_eq!(e.uri().scheme_str(), Some("http"));
    let e = client_endpoint("127.0.0.1:1", Some(&ca_file), None, None).unwrap();
    assert_eq!(e.uri().scheme_str(), Some("https"));
    let e = client_endpoint("https://localhost:1", None, None, None).unwrap();
    assert_eq!(e.uri().scheme_str(), Some("https"));
    client_endpoint(
        "https://localhost:1",
        Some(&ca_file),
        Some(&cert_file),
        Some(&key_file),
    )
    .unwrap();

    let err = |r: anyhow::Result<tonic::transport::Endpoint>| format!("{:#}", r.unwrap_err());
    let e = err(client_endpoint("http://h:1", Some(&ca_file), None, None));
    assert!(e.contains("https://"), "{e}");
    let e = err(client_endpoint("h:1", None, Some(&cert_file), None));
    assert!(e.contains("--cert and --key"), "{e}");
    let missing = dir.path().join("missing.crt");
    let e = err(client_endpoint("h:1", Some(&missing), None, None));
    assert!(
        e.contains("--ca") && e.contains(&missing.display().to_string()),
        "{e}"
    );
    let e = err(client_endpoint("h:1", Some(&key_file), None, None));
    assert!(e.contains("no PEM certificate"), "{e}");
    let e = err(client_endpoint(
        "h:1",
        Some(&ca_file),
        Some(&cert_file),
        Some(&cert_file),
    ));
    assert!(e.contains("--key") && e.contains("private key"), "{e}");
}
