//! The layer in front of a stand-in router, and the decisions handlers ask for.

use std::collections::BTreeMap;

use tower::ServiceExt;

use super::*;
use crate::audit::Writer;

const ALICE: &str = "alice-token";
const BOB: &str = "bob-token";
const OPS: &str = "ops-token";

fn hash(token: &str) -> String {
    sha256(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn file_text(alice_token: &str) -> String {
    format!(
        r#"
[[principal]]
name = "alice"
tenant = "search"
roles = ["user"]
token_sha256 = "{}"

[[principal]]
name = "bob"
tenant = "ads"
roles = ["user"]
token_sha256 = "{}"

[[principal]]
name = "ops"
tenant = "platform"
roles = ["admin"]
token_sha256 = "{}"
client_cert_cn = "ops.example.com"

[[role]]
name = "user"
allow = [
  {{ verbs = ["infer", "read"], models = ["identity", "minilm*"] }},
  {{ verbs = ["jobs.submit", "jobs.read", "jobs.cancel"], queues = ["default"] }},
]

[[role]]
name = "admin"
allow = [{{ verbs = ["*"] }}]
"#,
        hash(alice_token),
        hash(BOB),
        hash(OPS)
    )
}

struct Setup {
    _dir: tempfile::TempDir,
    path: PathBuf,
    auth: Arc<Auth>,
    writer: Writer,
    grpc: axum::Router,
    http: axum::Router,
}

fn setup(enabled: bool) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("auth.toml");
    std::fs::write(&path, file_text(ALICE)).unwrap();
    let auth = Arc::new(if enabled {
        Auth::from_file(&path).unwrap()
    } else {
        Auth::off()
    });
    let store = Arc::new(
        veraltheim_storage::RedbStore::open(dir.path().join("s.redb"), Default::default()).unwrap(),
    );
    let (audit, writer) = Audit::new(store, Bus::new(), None);
    let gate = |protocol| {
        Arc::new(Gate {
            auth: auth.clone(),
            audit: audit.clone(),
            metrics_public: false,
            protocol,
        })
    };
    // The handler answers with who it was told the caller is.
    let who = |request: axum::extract::Request| async move {
        match request.extensions().get::<Caller>() {
            Some(c) => format!("{}/{}", c.principal(), c.tenant().unwrap_or("-")),
            None => "no caller".to_string(),
        }
    };
    let mut grpc = axum::Router::new();
    for (path, _) in rules::RULES
        .iter()
        .filter(|(p, _)| p.starts_with("/inference") || p.starts_with("/veraltheim"))
    {
        grpc = grpc.route(path, axum::routing::post(who));
    }
    let grpc = grpc.layer(axum::middleware::from_fn_with_state(
        gate(Protocol::Grpc),
        grpc_layer,
    ));
    let http = axum::Router::new()
        .route("/metrics", axum::routing::get(who))
        .route("/v2/health/ready", axum::routing::get(who))
        .layer(axum::middleware::from_fn_with_state(
            gate(Protocol::Http),
            http_layer,
        ));
    Setup {
        _dir: dir,
        path,
        auth,
        writer,
        grpc,
        http,
    }
}

/// A call's outcome: `Ok(body)` or the refusal's status.
async fn call(
    router: &axum::Router,
    path: &str,
    headers: &[(&str, &str)],
    certs: Option<&[&str]>,
) -> Result<String, Status> {
    let mut request = axum::http::Request::post(path);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let mut request = request.body(axum::body::Body::empty()).unwrap();
    if let Some(names) = certs {
        request
            .extensions_mut()
            .insert(PeerCertNames(names.iter().map(|n| n.to_string()).collect()));
    }
    request
        .extensions_mut()
        .insert(ConnectInfo("10.1.2.3:4567".parse::<SocketAddr>().unwrap()));
    let response = router.clone().oneshot(request).await.unwrap();
    if let Some(status) = Status::from_header_map(response.headers())
        && status.code() != tonic::Code::Ok
    {
        return Err(status);
    }
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    Ok(String::from_utf8(body.to_vec()).unwrap())
}

fn bearer(token: &str) -> (&'static str, String) {
    ("authorization", format!("Bearer {token}"))
}

const INFER: &str = "/inference.GRPCInferenceService/ModelInfer";
const LIVE: &str = "/inference.GRPCInferenceService/ServerLive";
const METADATA: &str = "/inference.GRPCInferenceService/ServerMetadata";
const KILL: &str = "/veraltheim.v1.SystemService/KillChild";

#[tokio::test]
async fn without_an_auth_file_every_call_passes_as_anonymous() {
    let s = setup(false);
    for path in [INFER, METADATA, KILL] {
        assert_eq!(call(&s.grpc, path, &[], None).await.unwrap(), "anonymous/-");
    }
    // A token is not even looked at.
    let (k, v) = bearer("whatever");
    assert_eq!(
        call(&s.grpc, INFER, &[(k, &v)], None).await.unwrap(),
        "anonymous/-"
    );
    assert!(
        s.writer.take().is_empty(),
        "nothing refused, nothing changed"
    );
}

#[tokio::test]
async fn calls_without_known_credentials_are_unauthenticated_and_audited() {
    let s = setup(true);
    let e = call(&s.grpc, INFER, &[], None).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(
        e.message().contains("authorization: Bearer"),
        "{}",
        e.message()
    );
    let (k, v) = bearer("not-a-token");
    let e = call(&s.grpc, INFER, &[(k, &v)], None).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(
        e.message().contains("unknown or revoked token"),
        "{}",
        e.message()
    );
    let e = call(&s.grpc, INFER, &[("authorization", "Basic YTpi")], None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(
        e.message().contains("not `Bearer <token>`"),
        "{}",
        e.message()
    );
    // A certificate naming nobody is no principal either.
    let e = call(&s.grpc, INFER, &[], Some(&["stranger"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let records = s.writer.take();
    assert_eq!(records.len(), 4);
    for r in &records {
        assert_eq!(r.result, "UNAUTHENTICATED");
        assert_eq!(r.principal, "anonymous");
        assert_eq!(r.verb, "infer");
        assert_eq!(r.action, INFER);
        assert_eq!(r.peer, "10.1.2.3:4567");
    }
    // Health stays open, with nothing recorded.
    assert!(call(&s.grpc, LIVE, &[], None).await.is_ok());
    assert!(s.writer.take().is_empty());
}

#[tokio::test]
async fn tokens_and_certificates_name_their_principals() {
    let s = setup(true);
    let (k, v) = bearer(ALICE);
    assert_eq!(
        call(&s.grpc, INFER, &[(k, &v)], None).await.unwrap(),
        "alice/search"
    );
    let (k, v) = bearer(BOB);
    assert_eq!(
        call(&s.grpc, INFER, &[(k, &v)], None).await.unwrap(),
        "bob/ads"
    );
    // The scheme is case-insensitive, as HTTP says.
    let lower = format!("bearer {BOB}");
    assert_eq!(
        call(&s.grpc, INFER, &[("authorization", &lower)], None)
            .await
            .unwrap(),
        "bob/ads"
    );
    // mTLS: the certificate's names, the CN or a DNS name.
    assert_eq!(
        call(&s.grpc, KILL, &[], Some(&["other-cn", "ops.example.com"]))
            .await
            .unwrap(),
        "ops/platform"
    );
    // A token, when given, decides (a wrong one is not rescued by a certificate).
    let (k, v) = bearer("wrong");
    let e = call(&s.grpc, KILL, &[(k, &v)], Some(&["ops.example.com"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
}

#[tokio::test]
async fn server_verbs_are_decided_by_the_layer_naming_verb_and_resource() {
    let s = setup(true);
    let (k, v) = bearer(ALICE);
    let e = call(&s.grpc, KILL, &[(k, &v)], None).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        e.message(),
        "permission denied: 'alice' may not system.admin on the server"
    );
    // The user role's read is confined to models: not the server's metadata.
    let e = call(&s.grpc, METADATA, &[(k, &v)], None).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(
        e.message().contains("read on the server"),
        "{}",
        e.message()
    );
    // Rules on a model are the handler's to decide (it knows which model): they pass.
    assert_eq!(
        call(
            &s.grpc,
            "/veraltheim.v1.ModelService/LoadModel",
            &[(k, &v)],
            None
        )
        .await
        .unwrap(),
        "alice/search"
    );
    let records = s.writer.take();
    assert_eq!(records.len(), 2);
    assert!(records.iter().all(|r| r.result == "PERMISSION_DENIED"
        && r.principal == "alice"
        && r.tenant == "search"));
    assert_eq!(records[0].verb, "system.admin");
    assert_eq!(records[0].resource, "server");
    // An operator passes; a method with no rule is not served.
    let (k, v) = bearer(OPS);
    assert_eq!(
        call(&s.grpc, KILL, &[(k, &v)], None).await.unwrap(),
        "ops/platform"
    );
    let e = call(
        &s.grpc,
        "/inference.GRPCInferenceService/Nope",
        &[(k, &v)],
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented);
}

#[tokio::test]
async fn http_metrics_need_read_and_health_is_open() {
    let s = setup(true);
    let get = |path: &str, token: Option<&str>| {
        let mut r = axum::http::Request::get(path);
        if let Some(t) = token {
            r = r.header("authorization", format!("Bearer {t}"));
        }
        s.http
            .clone()
            .oneshot(r.body(axum::body::Body::empty()).unwrap())
    };
    let r = get("/metrics", None).await.unwrap();
    assert_eq!(r.status(), http::StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers()[http::header::WWW_AUTHENTICATE], "Bearer");
    assert_eq!(
        get("/metrics", Some(ALICE)).await.unwrap().status(),
        http::StatusCode::FORBIDDEN
    );
    assert_eq!(
        get("/metrics", Some(OPS)).await.unwrap().status(),
        http::StatusCode::OK
    );
    assert_eq!(
        get("/v2/health/ready", None).await.unwrap().status(),
        http::StatusCode::OK
    );
}

#[tokio::test]
async fn a_changed_file_is_put_in_force_and_a_broken_one_refused() {
    let s = setup(true);
    let (k, v) = bearer(ALICE);
    assert_eq!(s.auth.reload(), Reload::Unchanged);
    // Alice's token is rotated: the old one stops working.
    std::fs::write(&s.path, file_text("alice-new")).unwrap();
    assert_eq!(s.auth.reload(), Reload::Reloaded(3));
    let e = call(&s.grpc, INFER, &[(k, &v)], None).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let (k2, v2) = bearer("alice-new");
    assert!(call(&s.grpc, INFER, &[(k2, &v2)], None).await.is_ok());
    // A broken file is refused, naming what is wrong; the table in force stays.
    std::fs::write(&s.path, file_text("x").replace("\"read\"", "\"raed\"")).unwrap();
    match s.auth.reload() {
        Reload::Refused(e) => assert!(e.contains("unknown verb 'raed'"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.auth.reload(), Reload::Unchanged, "said once");
    assert!(call(&s.grpc, INFER, &[(k2, &v2)], None).await.is_ok());
    // A file gone (a Secret being replaced) keeps the table too.
    std::fs::remove_file(&s.path).unwrap();
    assert!(matches!(s.auth.reload(), Reload::Refused(e) if e.contains("cannot read")));
    assert_eq!(s.auth.reload(), Reload::Unchanged);
    assert!(call(&s.grpc, INFER, &[(k2, &v2)], None).await.is_ok());
    std::fs::write(&s.path, file_text(ALICE)).unwrap();
    assert_eq!(s.auth.reload(), Reload::Reloaded(3));
}

/// The caller a layer with `rule` would hand a handler, for `token`.
fn caller(s: &Setup, token: &str, rule: Rule) -> Caller {
    let mut headers = http::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
    let principal = s.auth.authenticate(&headers, None).unwrap();
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (audit, _) = Audit::new(
        Arc::new(
            veraltheim_storage::RedbStore::open(
                s._dir.path().join(format!("{n}.redb")),
                Default::default(),
            )
            .unwrap(),
        ),
        Bus::new(),
        None,
    );
    Caller(Arc::new(CallerInner {
        principal: Some(principal),
        enforced: true,
        rule,
        action: Cow::Borrowed("test"),
        peer: None,
        trace_id: None,
        audit,
    }))
}

#[tokio::test]
async fn handlers_decisions_follow_models_queues_and_tenants() {
    let s = setup(true);
    let alice = caller(&s, ALICE, Rule::Model(Verb::Infer));
    assert!(alice.model("minilm_onnx").is_ok());
    let e = alice.model("cost").unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        e.message(),
        "permission denied: 'alice' may not infer on model 'cost'"
    );
    assert!(alice.sees_model("identity") && !alice.sees_model("cost"));
    // A handler asking another kind of decision than its rule makes is refused.
    assert_eq!(
        alice
            .job("1", "default", Some("search"))
            .unwrap_err()
            .code(),
        tonic::Code::Internal
    );

    let submit = caller(&s, ALICE, Rule::Submit);
    assert!(submit.submit("default", None).is_ok());
    assert!(submit.submit("default", Some("identity")).is_ok());
    let e = submit.submit("gpu", None).unwrap_err();
    assert!(
        e.message().contains("jobs.submit on queue 'gpu'"),
        "{}",
        e.message()
    );
    let e = submit.submit("default", Some("cost")).unwrap_err();
    assert!(
        e.message().contains("infer on model 'cost'"),
        "{}",
        e.message()
    );

    let read = caller(&s, ALICE, Rule::Job(Verb::JobsRead));
    assert!(read.job("1", "default", Some("search")).is_ok());
    let e = read.job("2", "default", Some("ads")).unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        e.message(),
        "permission denied: 'alice' may not jobs.admin on queue 'default' (job '2' belongs to another tenant)"
    );
    // A job submitted without authentication belongs to no tenant.
    assert!(read.job("3", "default", None).is_err());
    assert!(read.job("4", "gpu", Some("search")).is_err());
    let admin = caller(&s, OPS, Rule::Job(Verb::JobsCancel));
    assert!(admin.job("2", "default", Some("ads")).is_ok());
    assert!(admin.job("3", "default", None).is_ok());

    let list = caller(&s, ALICE, Rule::JobList);
    let view = list.jobs_view();
    assert_eq!(view.tenant.as_deref(), Some("search"));
    assert!(view.shows("default", Some("search")));
    assert!(!view.shows("gpu", Some("search")));
    let ops = caller(&s, OPS, Rule::JobList);
    assert_eq!(ops.jobs_view().tenant, None, "jobs.admin sees every tenant");

    let events = caller(&s, ALICE, Rule::Events);
    let attrs = |tenant: &str| {
        BTreeMap::from([
            ("queue".to_string(), "default".to_string()),
            ("tenant".to_string(), tenant.to_string()),
        ])
    };
    assert!(events.sees_event("jobs.1.state", &attrs("search")));
    assert!(!events.sees_event("jobs.2.state", &attrs("ads")));
    assert!(!events.sees_event("audit.infer", &BTreeMap::new()));
    assert!(events.sees_event("models.identity.state", &BTreeMap::new()));
    assert!(events.watch("models.>").is_ok());
    assert!(
        events.watch(">").is_ok(),
        "audit events are left out, not the watch"
    );
    let e = events.watch("audit.>").unwrap_err();
    assert!(e.message().contains("system.admin"), "{}", e.message());
    let ops = caller(&s, OPS, Rule::Events);
    assert!(ops.watch("audit.>").is_ok());
    assert!(ops.sees_event("audit.infer", &BTreeMap::new()));
    assert!(ops.sees_event("jobs.2.state", &attrs("ads")));

    let settings = caller(&s, ALICE, Rule::LogSettings);
    assert!(settings.settings(false).is_ok());
    assert!(settings.settings(true).is_err());
}

#[test]
fn status_codes_are_named_as_grpc_spells_them() {
    assert_eq!(code_name(tonic::Code::Ok), "OK");
    assert_eq!(
        code_name(tonic::Code::PermissionDenied),
        "PERMISSION_DENIED"
    );
    assert_eq!(code_name(tonic::Code::Unauthenticated), "UNAUTHENTICATED");
    assert_eq!(code_name(tonic::Code::InvalidArgument), "INVALID_ARGUMENT");
}
