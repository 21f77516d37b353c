//! Authentication, roles, tenants and the audit log, against the real binary started with an
//! auth file (issue 13):
//!
//! - **every RPC** of both APIs, enumerated from the compiled descriptors, refuses a call with
//!   no token and one with a wrong token (UNAUTHENTICATED), health excepted: an RPC added later
//!   is covered without anyone listing it;
//! - a principal whose every verb is confined to other models and queues is refused
//!   (PERMISSION_DENIED) by every RPC that names a model, a queue, a job or the server, and sees
//!   nothing in the lists;
//! - allowed calls succeed; tenants see and touch only their own jobs; a revoked token stops
//!   working once the file changes, and a broken file keeps the old one in force;
//! - a load and a refusal appear as `audit.*` events and in the audit log;
//! - without an auth file the server refuses to listen beyond loopback.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use prost_reflect::{DynamicMessage, Kind, Value};
use tonic::Code;
use tonic::transport::Channel;
use veraltheim_proto::inference as pb;
use veraltheim_proto::v1::{
    self, cluster_service_client::ClusterServiceClient, job_service_client::JobServiceClient,
    model_service_client::ModelServiceClient, system_service_client::SystemServiceClient,
};

mod common;

use common::raw::{Method, Raw};
use common::{Server, channel, fp32, http_call, start};

const ALICE: &str = "alice-secret-token";
const CAROL: &str = "carol-secret-token";
const BOB: &str = "bob-secret-token";
const OPS: &str = "ops-secret-token";
const OUTSIDER: &str = "outsider-secret-token";
const READER: &str = "reader-secret-token";

fn sha256_hex(token: &str) -> String {
    // The CLI's own helper, so the test checks the line an operator would paste.
    let out = Command::new(env!("CARGO_BIN_EXE_veraltheim"))
        .args(["auth", "hash-token"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(format!("{token}\n").as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success());
    let line = String::from_utf8(out.stdout).unwrap();
    let hash = line
        .trim()
        .strip_prefix("token_sha256 = \"")
        .and_then(|l| l.strip_suffix('"'))
        .unwrap_or_else(|| panic!("not a token_sha256 line: {line:?}"));
    assert_eq!(hash.len(), 64);
    hash.to_string()
}

/// The auth file of these tests; `with_bob: false` is the same file with bob revoked.
fn auth_file(with_bob: bool) -> String {
    let principal = |name: &str, tenant: &str, role: &str, token: &str| {
        format!(
            "[[principal]]\nname = \"{name}\"\ntenant = \"{tenant}\"\nroles = [\"{role}\"]\ntoken_sha256 = \"{}\"\n\n",
            sha256_hex(token)
        )
    };
    let mut text = String::new();
    text.push_str(&principal("alice", "search", "user", ALICE));
    text.push_str(&principal("carol", "search", "user", CAROL));
    if with_bob {
        text.push_str(&principal("bob", "ads", "user", BOB));
    }
    text.push_str(&principal("ops", "platform", "admin", OPS));
    text.push_str(&principal("outsider", "elsewhere", "confined", OUTSIDER));
    text.push_str(&principal("reader", "platform", "reader", READER));
    text.push_str(
        r#"
[[role]]
name = "user"
allow = [
  { verbs = ["infer", "read"], models = ["identity"] },
  { verbs = ["jobs.submit", "jobs.read", "jobs.cancel"], queues = ["default"] },
]

[[role]]
name = "admin"
allow = [{ verbs = ["*"] }]

[[role]]
name = "reader"
allow = [{ verbs = ["read"] }]

[[role]]
name = "confined"
allow = [{ verbs = ["*"], models = ["zzz*"], queues = ["zzz*"] }]
"#,
    );
    text
}

struct Secured {
    server: Server,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

async fn start_secured(extra: &[&str]) -> Secured {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("auth.toml");
    std::fs::write(&file, auth_file(true)).unwrap();
    // With authentication on, a root server must name the user local jobs run as.
    let mut args = vec![
        "--auth-file",
        file.to_str().unwrap(),
        "--jobs-run-as",
        "nobody:nogroup",
    ];
    args.extend_from_slice(extra);
    let server = start(&args).await;
    Secured {
        server,
        file,
        _dir: dir,
    }
}

fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

fn infer_request(model: &str) -> v1::InferRequest {
    v1::InferRequest {
        model: model.into(),
        inputs: vec![fp32("INPUT0", vec![1, 1], vec![2.0])],
        ..Default::default()
    }
}

async fn infer(ch: &Channel, model: &str, token: Option<&str>) -> Result<(), tonic::Status> {
    v1::inference_service_client::InferenceServiceClient::new(ch.clone())
        .infer(with_token(infer_request(model), token))
        .await
        .map(|_| ())
}

// ---------------------------------------------------------------------------------------------
// Raw calls to any method

fn methods() -> Vec<Method> {
    let out = common::raw::methods();
    assert!(out.len() > 40, "only {} methods", out.len());
    out
}

/// What a call came to: `Ok(first message or None)`, or its status. A stream still open after
/// its first message is not waited on.
async fn raw_call(
    ch: &Channel,
    method: &Method,
    payload: Bytes,
    token: Option<&str>,
) -> Result<Option<Bytes>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready().await.unwrap();
    let path: http::uri::PathAndQuery = method.path.parse().unwrap();
    let answer = async {
        if method.client_streaming {
            let requests = tokio_stream::iter(vec![payload]);
            let mut stream = grpc
                .streaming(with_token(requests, token), path, Raw)
                .await?
                .into_inner();
            stream.message().await
        } else if method.server_streaming {
            let mut stream = grpc
                .server_streaming(with_token(payload, token), path, Raw)
                .await?
                .into_inner();
            // A watch says nothing until something happens: an open stream is an admitted call.
            match tokio::time::timeout(Duration::from_secs(2), stream.message()).await {
                Ok(r) => r,
                Err(_) => Ok(None),
            }
        } else {
            grpc.unary(with_token(payload, token), path, Raw)
                .await
                .map(|r| Some(r.into_inner()))
        }
    };
    tokio::time::timeout(Duration::from_secs(20), answer)
        .await
        .unwrap_or_else(|_| panic!("{} hung", method.path))
}

const HEALTH: [&str; 3] = ["ServerLive", "ServerReady", "Health"];

#[tokio::test]
async fn every_rpc_refuses_calls_without_valid_credentials_except_health() {
    let s = start_secured(&[]).await;
    let ch = channel(&s.server).await;
    for method in methods() {
        let open = HEALTH.contains(&method.name.as_str());
        for token in [None, Some("not-a-token")] {
            let outcome = raw_call(&ch, &method, Bytes::new(), token).await;
            if open {
                assert!(outcome.is_ok(), "{} {token:?}: {outcome:?}", method.path);
            } else {
                let status = outcome.expect_err(&method.path);
                assert_eq!(
                    status.code(),
                    Code::Unauthenticated,
                    "{} {token:?}: {status:?}",
                    method.path
                );
            }
        }
    }
    // The server is healthy and serves a caller with a token.
    infer(&ch, "identity", Some(ALICE)).await.unwrap();
}

/// An empty message of `method` with the strings that name what it acts on set: models to
/// `identity`, jobs to `job`, queues to `default`, paths in the tree to `API/http`.
fn naming(method: &Method, job: &str) -> Bytes {
    if method.name == "SubmitJob" {
        return common::command("confined", &["true"])
            .encode_to_vec()
            .into();
    }
    let mut m = DynamicMessage::new(method.input.clone());
    for field in method.input.fields() {
        if field.is_list() || field.is_map() || !matches!(field.kind(), Kind::String) {
            continue;
        }
        let value = match field.name() {
            "name" | "model_name" | "model" => "identity",
            "id" => job,
            "queue" => "default",
            "path" => "API/http",
            _ => continue,
        };
        m.set_field(&field, Value::String(value.into()));
    }
    if method.name == "LogSettings" {
        // A change: the system.admin part of LogSettings.
        return pb::LogSettingsRequest {
            settings: [(
                "log_info".to_string(),
                pb::log_settings_request::SettingValue {
                    parameter_choice: Some(
                        pb::log_settings_request::setting_value::ParameterChoice::BoolParam(true),
                    ),
                },
            )]
            .into(),
        }
        .encode_to_vec()
        .into();
    }
    m.encode_to_vec().into()
}

#[tokio::test]
async fn a_principal_confined_to_other_models_and_queues_is_refused_everywhere() {
    let s = start_secured(&["--enable-fault-injection"]).await;
    let ch = channel(&s.server).await;
    // A job of another tenant, in the default queue.
    let job = JobServiceClient::new(ch.clone())
        .submit_job(with_token(common::command("ops-job", &["true"]), Some(OPS)))
        .await
        .unwrap()
        .into_inner();
    for method in methods() {
        let outcome = raw_call(&ch, &method, naming(&method, &job.id), Some(OUTSIDER)).await;
        let what = &method.path;
        match method.name.as_str() {
            name if HEALTH.contains(&name) => assert!(outcome.is_ok(), "{what}: {outcome:?}"),
            // Lists answer, showing nothing the principal may not see.
            "ListModels" => {
                let r = v1::ListModelsResponse::decode(outcome.unwrap().unwrap()).unwrap();
                assert!(r.models.is_empty(), "{what}: {r:?}");
            }
            "RepositoryIndex" => {
                let r = pb::RepositoryIndexResponse::decode(outcome.unwrap().unwrap()).unwrap();
                assert!(r.models.is_empty(), "{what}: {r:?}");
            }
            "ListJobs" => {
                let r = v1::ListJobsResponse::decode(outcome.unwrap().unwrap()).unwrap();
                assert!(r.jobs.is_empty(), "{what}: {r:?}");
            }
            // Streams of requests answer each message in-band.
            "ModelStreamInfer" => {
                let r = pb::ModelStreamInferResponse::decode(outcome.unwrap().unwrap()).unwrap();
                assert!(
                    r.error_message.starts_with("permission denied"),
                    "{what}: {r:?}"
                );
            }
            "InferStream" => {
                let r = v1::InferStreamResponse::decode(outcome.unwrap().unwrap()).unwrap();
                match r.result {
                    Some(v1::infer_stream_response::Result::Error(e)) => {
                        assert_eq!(e.code, Code::PermissionDenied as i32, "{what}: {e:?}")
                    }
                    other => panic!("{what}: {other:?}"),
                }
            }
            _ => {
                let status = outcome.expect_err(what);
                assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
                assert!(
                    status
                        .message()
                        .starts_with("permission denied: 'outsider' may not "),
                    "{what}: {}",
                    status.message()
                );
            }
        }
    }
    // Nothing was done: the job still exists and runs to its end; the tree is intact.
    let mut jobs = JobServiceClient::new(ch.clone());
    let done = wait_for(&mut jobs, &job.id, v1::JobState::Succeeded, OPS).await;
    assert_eq!(done.tenant, "platform");
    infer(&ch, "identity", Some(ALICE)).await.unwrap();
}

/// Polls the job (as `token`) until it is in `state` (30 s at most).
async fn wait_for(
    jobs: &mut JobServiceClient<Channel>,
    id: &str,
    state: v1::JobState,
    token: &str,
) -> v1::Job {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let job = jobs
            .get_job(with_token(v1::GetJobRequest { id: id.into() }, Some(token)))
            .await
            .unwrap()
            .into_inner();
        if job.state == state as i32 {
            return job;
        }
        assert!(
            Instant::now() < until,
            "job {id} never reached {state:?}: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn allowed_calls_succeed_and_tenants_see_and_touch_only_their_own_jobs() {
    let s = start_secured(&[
        "--job-queues",
        r#"[{ name = "default", weight = 1 }, { name = "gpu", weight = 1 }]"#,
    ])
    .await;
    let ch = channel(&s.server).await;
    // Inference within the role's models, and not beyond.
    infer(&ch, "identity", Some(ALICE)).await.unwrap();
    let e = infer(&ch, "cost", Some(ALICE)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(
        e.message(),
        "permission denied: 'alice' may not infer on model 'cost'"
    );
    let e = ModelServiceClient::new(ch.clone())
        .load_model(with_token(
            v1::LoadModelRequest {
                name: "identity".into(),
                ..Default::default()
            },
            Some(ALICE),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("models.admin"), "{}", e.message());
    // The model list shows the role's models only.
    let models = ModelServiceClient::new(ch.clone())
        .list_models(with_token(v1::ListModelsRequest::default(), Some(ALICE)))
        .await
        .unwrap()
        .into_inner()
        .models;
    let names: Vec<_> = models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["identity"]);

    // Jobs: alice submits in her queue, not in another.
    let mut jobs = JobServiceClient::new(ch.clone());
    let mine = jobs
        .submit_job(with_token(
            common::command("alice-job", &["sleep", "30"]),
            Some(ALICE),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (mine.principal.as_str(), mine.tenant.as_str()),
        ("alice", "search")
    );
    let mut gpu = common::command("gpu-job", &["true"]);
    gpu.spec.as_mut().unwrap().queue = "gpu".into();
    let e = jobs
        .submit_job(with_token(gpu, Some(ALICE)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("jobs.submit on queue 'gpu'"),
        "{}",
        e.message()
    );
    let theirs = jobs
        .submit_job(with_token(common::command("bob-job", &["true"]), Some(BOB)))
        .await
        .unwrap()
        .into_inner();

    // Bob (tenant ads) cannot read, watch, follow or cancel alice's job.
    let denied = |r: Result<(), tonic::Status>| {
        let e = r.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(
            e.message().contains("belongs to another tenant"),
            "{}",
            e.message()
        );
    };
    let get = |id: &str, token: &str| {
        let mut jobs = jobs.clone();
        let id = id.to_string();
        let token = token.to_string();
        async move {
            jobs.get_job(with_token(v1::GetJobRequest { id }, Some(&token)))
                .await
                .map(|r| r.into_inner())
        }
    };
    denied(get(&mine.id, BOB).await.map(|_| ()));
    denied(
        jobs.clone()
            .cancel_job(with_token(
                v1::CancelJobRequest {
                    id: mine.id.clone(),
                },
                Some(BOB),
            ))
            .await
            .map(|_| ()),
    );
    denied(
        jobs.clone()
            .watch_job(with_token(
                v1::WatchJobRequest {
                    id: mine.id.clone(),
                },
                Some(BOB),
            ))
            .await
            .map(|_| ()),
    );
    denied(
        jobs.clone()
            .job_logs(with_token(
                v1::JobLogsRequest {
                    id: mine.id.clone(),
                    follow: false,
                },
                Some(BOB),
            ))
            .await
            .map(|_| ()),
    );
    // Carol, of alice's tenant, sees it; the lists show each tenant its own.
    assert_eq!(get(&mine.id, CAROL).await.unwrap().id, mine.id);
    let listed = |token: &'static str| {
        let mut jobs = jobs.clone();
        async move {
            let mut ids: Vec<String> = jobs
                .list_jobs(with_token(v1::ListJobsRequest::default(), Some(token)))
                .await
                .unwrap()
                .into_inner()
                .jobs
                .into_iter()
                .map(|j| j.id)
                .collect();
            ids.sort();
            ids
        }
    };
    assert_eq!(listed(ALICE).await, std::slice::from_ref(&mine.id));
    assert_eq!(listed(BOB).await, std::slice::from_ref(&theirs.id));
    let mut both = vec![mine.id.clone(), theirs.id.clone()];
    both.sort();
    assert_eq!(listed(OPS).await, both, "jobs.admin sees every tenant's");
    // Alice's own job is hers to cancel; the job still ran until then.
    let cancelled = jobs
        .cancel_job(with_token(
            v1::CancelJobRequest {
                id: mine.id.clone(),
            },
            Some(ALICE),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.id, mine.id);

    // The forged tenant header changes nothing: bob still sees his own only.
    let mut forged = with_token(v1::ListJobsRequest::default(), Some(BOB));
    forged
        .metadata_mut()
        .insert("x-veraltheim-tenant", "search".parse().unwrap());
    let ids: Vec<String> = jobs
        .list_jobs(forged)
        .await
        .unwrap()
        .into_inner()
        .jobs
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(ids, std::slice::from_ref(&theirs.id));
}

/// Waits for the first event on `topic` from a watch opened before the change.
async fn next_event(stream: &mut tonic::Streaming<v1::Event>, topic: &str) -> v1::Event {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let e = stream.message().await.unwrap().expect("the watch ended");
            if e.topic == topic {
                return e;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {topic} event"))
}

async fn watch(ch: &Channel, topics: &[&str], token: &str) -> tonic::Streaming<v1::Event> {
    SystemServiceClient::new(ch.clone())
        .watch_events(with_token(
            v1::WatchEventsRequest {
                topics: topics.iter().map(|t| t.to_string()).collect(),
            },
            Some(token),
        ))
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn a_revoked_token_stops_working_and_a_broken_file_keeps_the_old_one() {
    let s = start_secured(&[]).await;
    let ch = channel(&s.server).await;
    infer(&ch, "identity", Some(BOB)).await.unwrap();
    let mut events = watch(&ch, &["auth.>"], OPS).await;
    std::fs::write(&s.file, auth_file(false)).unwrap();
    let e = next_event(&mut events, "auth.reloaded").await;
    assert_eq!(e.attributes["principals"], "5");
    let e = infer(&ch, "identity", Some(BOB)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(
        e.message().contains("unknown or revoked token"),
        "{}",
        e.message()
    );
    infer(&ch, "identity", Some(ALICE)).await.unwrap();
    // A file with a mistake is refused by name; what was in force stays.
    std::fs::write(
        &s.file,
        auth_file(true).replace("\"infer\"", "\"inference\""),
    )
    .unwrap();
    let e = next_event(&mut events, "auth.reload_failed").await;
    assert!(
        e.attributes["error"].contains("unknown verb 'inference'"),
        "{e:?}"
    );
    infer(&ch, "identity", Some(ALICE)).await.unwrap();
    assert_eq!(
        infer(&ch, "identity", Some(BOB)).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    // The server stayed healthy throughout.
    let health = SystemServiceClient::new(ch.clone())
        .health(v1::HealthRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(health.live && health.ready);
}

#[tokio::test]
async fn loads_and_refusals_are_audited_on_the_bus_and_in_the_log() {
    let s = start_secured(&[]).await;
    let ch = channel(&s.server).await;
    // Only system.admin watches the audit topics.
    let e = SystemServiceClient::new(ch.clone())
        .watch_events(with_token(
            v1::WatchEventsRequest {
                topics: vec!["audit.>".into()],
            },
            Some(ALICE),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let mut audit = watch(&ch, &["audit.>"], OPS).await;
    let mut everything = watch(&ch, &[">"], OPS).await;
    let mut models = ModelServiceClient::new(ch.clone());
    let mut load = with_token(
        v1::LoadModelRequest {
            name: "identity".into(),
            ..Default::default()
        },
        Some(OPS),
    );
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    load.metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    models.load_model(load).await.unwrap();
    let e = next_event(&mut audit, "audit.models.admin").await;
    for (k, v) in [
        ("principal", "ops"),
        ("tenant", "platform"),
        ("verb", "models.admin"),
        ("resource", "model:identity"),
        ("result", "OK"),
        ("action", "/veraltheim.v1.ModelService/LoadModel"),
        ("trace_id", "4bf92f3577b34da6a3ce929d0e0e4736"),
    ] {
        assert_eq!(
            e.attributes.get(k).map(String::as_str),
            Some(v),
            "{k}: {e:?}"
        );
    }
    assert!(e.attributes["peer"].starts_with("127.0.0.1:"), "{e:?}");
    // A refusal: alice may not unload.
    let refused = models
        .unload_model(with_token(
            v1::UnloadModelRequest {
                name: "identity".into(),
            },
            Some(ALICE),
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let e = next_event(&mut audit, "audit.models.admin").await;
    assert_eq!(e.attributes["principal"], "alice");
    assert_eq!(e.attributes["result"], "PERMISSION_DENIED");
    assert_eq!(e.attributes["resource"], "model:identity");
    // And a call without a token.
    let e = infer(&ch, "identity", None).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = next_event(&mut audit, "audit.infer").await;
    assert_eq!(e.attributes["principal"], "anonymous");
    assert_eq!(e.attributes["result"], "UNAUTHENTICATED");
    // A watch of every topic got the lifecycle events, not the audit records: up to a state
    // change caused after all of the above was published, none of them reached it.
    models
        .load_model(with_token(
            v1::LoadModelRequest {
                name: "cost".into(),
                ..Default::default()
            },
            Some(OPS),
        ))
        .await
        .unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(30), async {
        let mut seen = Vec::new();
        loop {
            let e = everything
                .message()
                .await
                .unwrap()
                .expect("the watch ended");
            let done = e.topic == "models.cost.state";
            seen.push(e.topic);
            if done {
                return seen;
            }
        }
    })
    .await
    .expect("the load's state event");
    assert!(
        seen.iter().any(|t| t == "models.identity.state"),
        "{seen:?}"
    );
    assert!(!seen.iter().any(|t| t.starts_with("audit.")), "{seen:?}");

    // The same records are kept: the audit log lists them, oldest first (system.admin only).
    let mut system = SystemServiceClient::new(ch.clone());
    let e = system
        .list_audit_events(with_token(
            v1::ListAuditEventsRequest::default(),
            Some(ALICE),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Each event above was published once its record was stored.
    let kept = system
        .list_audit_events(with_token(v1::ListAuditEventsRequest::default(), Some(OPS)))
        .await
        .unwrap()
        .into_inner()
        .events;
    let summary: Vec<(String, String, String)> = kept
        .iter()
        .filter(|e| e.resource == "model:identity" || e.verb == "infer")
        .map(|e| (e.principal.clone(), e.verb.clone(), e.result.clone()))
        .collect();
    let expected = [
        ("ops", "models.admin", "OK"),
        ("alice", "models.admin", "PERMISSION_DENIED"),
        ("anonymous", "infer", "UNAUTHENTICATED"),
    ]
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()));
    assert_eq!(summary, expected);
    // `veraltheim audit --json` prints them, one object per line.
    let out = cli(&s.server, &["audit", "--json", "--since", "1h"], Some(OPS));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["principal"] == "alice" && l["result"] == "PERMISSION_DENIED"),
        "{lines:?}"
    );
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn cli(server: &Server, args: &[&str], token: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_veraltheim"));
    c.args(args)
        .args(["--server", &server.grpc])
        .env_remove("VERALTHEIM_SERVER")
        .env_remove("VERALTHEIM_TOKEN");
    if let Some(t) = token {
        c.env("VERALTHEIM_TOKEN", t);
    }
    c.output().unwrap()
}

#[tokio::test]
async fn the_cli_sends_its_token_from_the_flag_or_the_environment() {
    let s = start_secured(&[]).await;
    let out = cli(&s.server, &["models", "list"], None);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("Unauthenticated"),
        "{}",
        text(&out.stderr)
    );
    let out = cli(&s.server, &["models", "list", "--token", ALICE], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("identity"));
    assert!(!text(&out.stdout).contains("cost"), "{}", text(&out.stdout));
    let out = cli(&s.server, &["models", "list"], Some(OPS));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("cost"));
    let out = cli(&s.server, &["status"], Some(ALICE));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("may not read on the server"),
        "{}",
        text(&out.stderr)
    );
    // Health needs no token.
    let out = cli(&s.server, &["health"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

async fn http_status(addr: &str, path: &str, token: Option<&str>) -> u16 {
    http_call(addr, "GET", path, token, "").await.0
}

/// Every REST route (KServe v2 over HTTP and the OpenAI embeddings), with a request naming
/// `model` where the route names one.
fn rest_calls(model: &str) -> Vec<(&'static str, String, String)> {
    let infer = r#"{"inputs":[{"name":"INPUT0","shape":[1,1],"datatype":"FP32","data":[1.0]}]}"#;
    vec![
        ("GET", "/v2".into(), String::new()),
        ("GET", format!("/v2/models/{model}"), String::new()),
        (
            "GET",
            format!("/v2/models/{model}/versions/1"),
            String::new(),
        ),
        ("GET", format!("/v2/models/{model}/ready"), String::new()),
        (
            "GET",
            format!("/v2/models/{model}/versions/1/ready"),
            String::new(),
        ),
        ("GET", format!("/v2/models/{model}/config"), String::new()),
        (
            "GET",
            format!("/v2/models/{model}/versions/1/config"),
            String::new(),
        ),
        ("GET", format!("/v2/models/{model}/stats"), String::new()),
        (
            "GET",
            format!("/v2/models/{model}/versions/1/stats"),
            String::new(),
        ),
        ("POST", format!("/v2/models/{model}/infer"), infer.into()),
        (
            "POST",
            format!("/v2/models/{model}/versions/1/infer"),
            infer.into(),
        ),
        (
            "POST",
            format!("/v2/repository/models/{model}/load"),
            String::new(),
        ),
        (
            "POST",
            format!("/v2/repository/models/{model}/unload"),
            String::new(),
        ),
        (
            "POST",
            "/v1/embeddings".into(),
            format!(r#"{{"model":"{model}","input":"hi"}}"#),
        ),
        ("GET", format!("/v1/models/{model}"), String::new()),
        // System and CUDA shared memory: system.admin on the server, as over gRPC.
        ("GET", "/v2/systemsharedmemory/status".into(), String::new()),
        (
            "GET",
            "/v2/systemsharedmemory/region/r/status".into(),
            String::new(),
        ),
        (
            "POST",
            "/v2/systemsharedmemory/region/r/register".into(),
            r#"{"key":"/veraltheim-auth-probe","offset":0,"byte_size":64}"#.into(),
        ),
        (
            "POST",
            "/v2/systemsharedmemory/unregister".into(),
            String::new(),
        ),
        (
            "POST",
            "/v2/systemsharedmemory/region/r/unregister".into(),
            String::new(),
        ),
        ("GET", "/v2/cudasharedmemory/status".into(), String::new()),
        (
            "GET",
            "/v2/cudasharedmemory/region/r/status".into(),
            String::new(),
        ),
        (
            "POST",
            "/v2/cudasharedmemory/region/r/register".into(),
            r#"{"byte_size":64}"#.into(),
        ),
        (
            "POST",
            "/v2/cudasharedmemory/unregister".into(),
            String::new(),
        ),
        (
            "POST",
            "/v2/cudasharedmemory/region/r/unregister".into(),
            String::new(),
        ),
        // Lists, filtered.
        ("GET", "/v2/models/stats".into(), String::new()),
        ("POST", "/v2/repository/index".into(), String::new()),
        ("GET", "/v1/models".into(), String::new()),
    ]
}

#[tokio::test]
async fn every_rest_route_authenticates_and_authorises_like_grpc() {
    let s = start_secured(&[]).await;
    let http = &s.server.http;
    for (method, path, body) in rest_calls("identity") {
        let (status, _) = http_call(http, method, &path, None, &body).await;
        assert_eq!(status, 401, "{method} {path} without a token");
        let (status, _) = http_call(http, method, &path, Some("wrong"), &body).await;
        assert_eq!(status, 401, "{method} {path} with a wrong token");
    }
    // The confined principal is refused wherever a model is named, and sees nothing in lists.
    for (method, path, body) in rest_calls("identity") {
        let (status, answer) = http_call(http, method, &path, Some(OUTSIDER), &body).await;
        if path == "/v2/models/stats" || path == "/v2/repository/index" || path == "/v1/models" {
            assert_eq!(status, 200, "{method} {path}: {answer}");
            assert!(!answer.contains("identity"), "{method} {path}: {answer}");
        } else {
            assert_eq!(status, 403, "{method} {path}: {answer}");
            assert!(
                answer.contains("permission denied: 'outsider' may not"),
                "{method} {path}: {answer}"
            );
        }
    }
    // Refusals are JSON: Triton's `{"error": "..."}`, OpenAI's shape under /v1/.
    let (_, answer) = http_call(http, "GET", "/v2/models/identity", None, "").await;
    let body: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("token"),
        "{answer}"
    );
    let (_, answer) = http_call(http, "GET", "/v1/models", None, "").await;
    let body: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert!(body["error"]["message"].is_string(), "{answer}");
    // A path no route has: 401 without a token (nothing is told to a stranger), 404 with one;
    // a route asked with a method it does not take: 405. Both as JSON naming what is wrong.
    let (status, _) = http_call(http, "GET", "/v2/no/such/route", None, "").await;
    assert_eq!(status, 401);
    let (status, answer) = http_call(http, "GET", "/v2/no/such/route", Some(ALICE), "").await;
    assert_eq!(status, 404, "{answer}");
    let body: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(body["error"], "GET /v2/no/such/route: no such route");
    let (status, answer) = http_call(http, "DELETE", "/v2/models/identity", Some(ALICE), "").await;
    assert_eq!(status, 405, "{answer}");
    let body: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(body["error"], "/v2/models/identity does not take DELETE");
    // Alice infers over HTTP within her role, and may not load.
    let (status, answer) = http_call(
        http,
        "POST",
        "/v2/models/identity/infer",
        Some(ALICE),
        r#"{"inputs":[{"name":"INPUT0","shape":[1,1],"datatype":"FP32","data":[3.0]}]}"#,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = http_call(
        http,
        "POST",
        "/v2/repository/models/identity/load",
        Some(ALICE),
        "",
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    assert!(
        answer.contains("'alice' may not models.admin on model 'identity'"),
        "{answer}"
    );
    let (_, answer) = http_call(http, "POST", "/v2/repository/index", Some(ALICE), "").await;
    let names: Vec<String> = serde_json::from_str::<Vec<serde_json::Value>>(&answer)
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["identity"]);
    // A load over HTTP is audited like one over gRPC.
    let ch = channel(&s.server).await;
    let mut audit = watch(&ch, &["audit.models.admin"], OPS).await;
    let (status, answer) = http_call(
        http,
        "POST",
        "/v2/repository/models/cost/load",
        Some(OPS),
        "",
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    // The refusals above may still be on their way to the watch: the operator's record follows.
    let e = loop {
        let e = next_event(&mut audit, "audit.models.admin").await;
        if e.attributes["result"] != "UNAUTHENTICATED"
            && e.attributes["result"] != "PERMISSION_DENIED"
        {
            break e;
        }
    };
    assert_eq!(e.attributes["principal"], "ops");
    assert_eq!(e.attributes["resource"], "model:cost");
    assert_eq!(e.attributes["result"], "OK");
    assert_eq!(e.attributes["action"], "/v2/repository/models/{name}/load");
}

#[tokio::test]
async fn system_shared_memory_over_http_needs_system_admin_and_is_audited_like_grpc() {
    let s = start_secured(&["--allow-client-shm"]).await;
    let http = &s.server.http;
    let key = format!("/veraltheim-auth-shm-{}", std::process::id());
    let path = format!("/dev/shm{key}");
    std::fs::File::create(&path).unwrap().set_len(64).unwrap();
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _remove = Remove(path);
    let ch = channel(&s.server).await;
    let mut audit = watch(&ch, &["audit.system.admin"], OPS).await;
    let body = format!(r#"{{"key":"{key}","offset":0,"byte_size":64}}"#);
    let register = "/v2/systemsharedmemory/region/r/register";
    let (status, answer) = http_call(http, "POST", register, Some(ALICE), &body).await;
    assert_eq!(status, 403, "{answer}");
    assert!(answer.contains("'alice' may not system.admin"), "{answer}");
    let (status, answer) = http_call(http, "POST", register, Some(OPS), &body).await;
    assert_eq!(status, 200, "{answer}");
    // A second registration of the name: 400 as Triton answers it, audited as ALREADY_EXISTS
    // as over gRPC.
    let (status, answer) = http_call(http, "POST", register, Some(OPS), &body).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("already registered"), "{answer}");
    // Alice is refused by the authentication layer (on the server); the operator's calls are
    // recorded on the region, as gRPC's SystemSharedMemoryRegister records them.
    let mut results = Vec::new();
    while results.len() < 3 {
        let e = next_event(&mut audit, "audit.system.admin").await;
        if e.attributes["action"] == "/v2/systemsharedmemory/region/{name}/register" {
            results.push((
                e.attributes["principal"].clone(),
                e.attributes["resource"].clone(),
                e.attributes["result"].clone(),
            ));
        }
    }
    let row = |p: &str, r: &str, x: &str| (p.to_string(), r.to_string(), x.to_string());
    assert_eq!(
        results,
        [
            row("alice", "server", "PERMISSION_DENIED"),
            row("ops", "shared_memory:r", "OK"),
            row("ops", "shared_memory:r", "ALREADY_EXISTS"),
        ]
    );
    let (status, answer) =
        http_call(http, "GET", "/v2/systemsharedmemory/status", Some(OPS), "").await;
    assert_eq!(status, 200, "{answer}");
    let regions: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(
        regions,
        serde_json::json!([{"name": "r", "key": key, "offset": 0, "byte_size": 64}])
    );
    let (status, answer) = http_call(
        http,
        "POST",
        "/v2/systemsharedmemory/region/r/unregister",
        Some(OPS),
        "",
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = http_call(
        http,
        "GET",
        "/v2/systemsharedmemory/region/r/status",
        Some(OPS),
        "",
    )
    .await;
    assert_eq!(status, 404, "{answer}");
}

/// Submits a job that prints `from-<name>`, as the principal of `token`; its id.
async fn submit_echo(jobs: &mut JobServiceClient<Channel>, name: &str, token: &str) -> String {
    let argv = ["sh".to_string(), "-c".into(), format!("echo from-{name}")];
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    jobs.submit_job(with_token(common::command(name, &argv), Some(token)))
        .await
        .unwrap()
        .into_inner()
        .id
}

/// The ids of the jobs `/api/jobs` lists for `token` (the status page's list).
async fn page_jobs(http: &str, token: &str) -> Vec<String> {
    let (status, body) = http_call(http, "GET", "/api/jobs", Some(token), "").await;
    assert_eq!(status, 200, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    doc["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn the_status_page_data_needs_the_rights_of_the_calls_it_mirrors() {
    let s = start_secured(&[]).await;
    let http = &s.server.http;
    // The page's files hold no data: open, like health (the token is pasted into the page).
    for path in ["/", "/page/app.js", "/page/style.css"] {
        assert_eq!(http_status(http, path, None).await, 200, "{path}");
    }
    // Its data is not.
    for path in [
        "/api/status",
        "/api/jobs",
        "/api/jobs/00000000000000000000/logs",
    ] {
        let (status, body) = http_call(http, "GET", path, None, "").await;
        assert_eq!(status, 401, "{path}: {body}");
        assert!(body.contains("authentication required"), "{path}: {body}");
        assert_eq!(
            http_status(http, path, Some("wrong")).await,
            401,
            "{path} with a wrong token"
        );
    }
    // The tree, models and GPUs need `read` on the server, as GetStatus does: alice's `read`
    // is confined to a model.
    let (status, body) = http_call(http, "GET", "/api/status", Some(ALICE), "").await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("'alice' may not read on the server"),
        "{body}"
    );
    let (status, body) = http_call(http, "GET", "/api/status", Some(OPS), "").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("SystemSupervisor"), "{body}");

    // Jobs: each tenant sees its own, the admin every tenant's (ListJobs' code).
    let mut jobs = JobServiceClient::new(channel(&s.server).await);
    let alices = submit_echo(&mut jobs, "alices", ALICE).await;
    let bobs = submit_echo(&mut jobs, "bobs", BOB).await;
    assert_eq!(page_jobs(http, ALICE).await, [alices.as_str()]);
    // Carol is in alice's tenant: she sees the tenant's job.
    assert_eq!(page_jobs(http, CAROL).await, [alices.as_str()]);
    assert_eq!(page_jobs(http, BOB).await, [bobs.as_str()]);
    assert_eq!(page_jobs(http, OPS).await, [bobs.as_str(), alices.as_str()]);
    assert!(page_jobs(http, OUTSIDER).await.is_empty());
    // Logs: one's own tenant's job, not another's (JobLogs' code).
    let logs = |id: &str| format!("/api/jobs/{id}/logs");
    let (status, body) = http_call(http, "GET", &logs(&alices), Some(ALICE), "").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_call(http, "GET", &logs(&bobs), Some(ALICE), "").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("belongs to another tenant"), "{body}");
    assert!(!body.contains("from-bobs"), "{body}");
    let (status, _) = http_call(http, "GET", &logs(&bobs), Some(OPS), "").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn metrics_need_read_unless_public_and_health_is_open() {
    let s = start_secured(&[]).await;
    let http = &s.server.http;
    assert_eq!(http_status(http, "/metrics", None).await, 401);
    assert_eq!(http_status(http, "/metrics", Some("wrong")).await, 401);
    assert_eq!(http_status(http, "/metrics", Some(ALICE)).await, 403);
    assert_eq!(http_status(http, "/metrics", Some(OPS)).await, 200);
    for path in ["/v2/health/live", "/v2/health/ready", "/live", "/ready"] {
        assert_eq!(http_status(http, path, None).await, 200, "{path}");
    }
    let public = start_secured(&["--metrics-public"]).await;
    assert_eq!(
        http_status(&public.server.http, "/metrics", None).await,
        200
    );
}

#[tokio::test]
async fn the_rate_limit_is_per_tenant_once_callers_are_authenticated() {
    let s = start_secured(&["--rate-limit-per-second", "1", "--rate-limit-burst", "1"]).await;
    let ch = channel(&s.server).await;
    infer(&ch, "identity", Some(ALICE)).await.unwrap();
    // Carol is of alice's tenant: one bucket for both.
    let e = infer(&ch, "identity", Some(CAROL)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().contains("client 'tenant search'"),
        "{}",
        e.message()
    );
    // Bob's tenant has its own, from the same address.
    infer(&ch, "identity", Some(BOB)).await.unwrap();
}

fn serve_until_exit(args: &[&str], data: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_veraltheim"))
        .arg("serve")
        .args(args)
        .arg("--data-dir")
        .arg(data.join("data"))
        .arg("--model-repository")
        .arg(data.join("models"))
        .output()
        .unwrap()
}

#[tokio::test]
async fn without_an_auth_file_only_loopback_addresses_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let grpc = format!("0.0.0.0:{}", common::free_port());
    let http = format!("127.0.0.1:{}", common::free_port());
    let out = serve_until_exit(&["--grpc-addr", &grpc, "--http-addr", &http], dir.path());
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    let refusal = format!("refusing to serve gRPC on {grpc} without authentication");
    for part in [
        refusal.as_str(),
        "--auth-file",
        "loopback",
        "--insecure-no-auth",
    ] {
        assert!(err.contains(part), "{part}: {err}");
    }
    // The operator's explicit choice is honoured: it starts and serves.
    let port = common::free_port();
    let grpc = format!("0.0.0.0:{port}");
    let child = Command::new(env!("CARGO_BIN_EXE_veraltheim"))
        .arg("serve")
        .args([
            "--grpc-addr",
            &grpc,
            "--http-addr",
            &http,
            "--insecure-no-auth",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--model-repository")
        .arg(dir.path().join("models"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let local = format!("127.0.0.1:{port}");
    let mut server = Server::adopt(child, local.clone(), http, tempfile::tempdir().unwrap());
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(ch) = Channel::from_shared(format!("http://{local}"))
            .unwrap()
            .connect()
            .await
            && infer(&ch, "identity", None).await.is_ok()
        {
            break;
        }
        assert!(
            server.child.try_wait().unwrap().is_none(),
            "the server exited with --insecure-no-auth"
        );
        assert!(Instant::now() < until, "the server never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_queues_quota_is_each_tenants_own() {
    let s = start_secured(&[
        "--job-queues",
        r#"[{ name = "default", weight = 1, cpu_millis = 500 }]"#,
    ])
    .await;
    let ch = channel(&s.server).await;
    let mut jobs = JobServiceClient::new(ch.clone());
    let half_core = |name: &str| {
        let mut r = common::command(name, &["sleep", "30"]);
        r.spec.as_mut().unwrap().resources = Some(v1::Resources {
            cpu_millis: 500,
            ..Default::default()
        });
        r
    };
    let submitter = jobs.clone();
    let submit = |name: &str, token: &str| {
        let mut jobs = submitter.clone();
        let request = with_token(half_core(name), Some(token));
        async move { jobs.submit_job(request).await.unwrap().into_inner() }
    };
    let first = submit("alice-1", ALICE).await;
    wait_for(&mut jobs, &first.id, v1::JobState::Running, ALICE).await;
    // Alice's tenant is at the queue's quota; carol shares the tenant, so she waits too.
    let second = submit("carol-1", CAROL).await;
    // Bob's tenant has the quota to itself: his job runs although alice's waits.
    let bobs = submit("bob-1", BOB).await;
    wait_for(&mut jobs, &bobs.id, v1::JobState::Running, BOB).await;
    let waiting = wait_for(&mut jobs, &second.id, v1::JobState::Queued, CAROL).await;
    assert_eq!(
        waiting.reason,
        "quota cpu 500/500m in queue default for tenant search (needs 500m)"
    );
    for (id, token) in [(&first.id, ALICE), (&second.id, CAROL), (&bobs.id, BOB)] {
        jobs.cancel_job(with_token(
            v1::CancelJobRequest { id: id.clone() },
            Some(token),
        ))
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn a_broken_auth_file_stops_the_start_naming_the_file_and_the_mistake() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("auth.toml");
    std::fs::write(
        &file,
        auth_file(true).replace("roles = [\"admin\"]", "rolez = [\"admin\"]"),
    )
    .unwrap();
    let out = serve_until_exit(&["--auth-file", file.to_str().unwrap()], dir.path());
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains(file.to_str().unwrap()), "{err}");
    assert!(err.contains("unknown field `rolez`"), "{err}");
    let out = serve_until_exit(
        &[
            "--auth-file",
            dir.path().join("missing.toml").to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("cannot read the auth file"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn listing_nodes_needs_read_and_draining_needs_system_admin_and_is_audited() {
    let s = start_secured(&["--node-id", "n1"]).await;
    let ch = channel(&s.server).await;
    let mut cluster = ClusterServiceClient::new(ch.clone());
    let list = |token| with_token(v1::ListNodesRequest {}, Some(token));
    let drain = |token, undo| {
        with_token(
            v1::DrainNodeRequest {
                node_id: "n1".into(),
                undo,
            },
            Some(token),
        )
    };
    // Alice reads models only, not the server.
    let e = cluster.list_nodes(list(ALICE)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let nodes = cluster.list_nodes(list(READER)).await.unwrap().into_inner();
    assert_eq!(nodes.self_id, "n1");
    assert_eq!(nodes.nodes.len(), 1);
    // Reading is not draining.
    let e = cluster.drain_node(drain(READER, false)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let n = cluster
        .drain_node(drain(OPS, false))
        .await
        .unwrap()
        .into_inner()
        .node
        .unwrap();
    assert_eq!(n.state, v1::NodeState::Draining as i32);
    cluster.drain_node(drain(OPS, true)).await.unwrap();
    // Records are stored by the audit writer in the background: polled, with a bound.
    let bound = Instant::now() + Duration::from_secs(30);
    let drains = loop {
        let kept = SystemServiceClient::new(ch.clone())
            .list_audit_events(with_token(v1::ListAuditEventsRequest::default(), Some(OPS)))
            .await
            .unwrap()
            .into_inner()
            .events;
        let drains: Vec<(String, String, String, String)> = kept
            .iter()
            .filter(|e| e.action.ends_with("/DrainNode"))
            .map(|e| {
                (
                    e.principal.clone(),
                    e.verb.clone(),
                    e.resource.clone(),
                    e.result.clone(),
                )
            })
            .collect();
        if drains.len() >= 3 {
            break drains;
        }
        assert!(Instant::now() < bound, "{drains:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let expected = [
        ("reader", "system.admin", "PERMISSION_DENIED"),
        ("ops", "system.admin", "OK"),
        ("ops", "system.admin", "OK"),
    ];
    assert_eq!(drains.len(), expected.len(), "{drains:?}");
    for (got, (who, verb, result)) in drains.iter().zip(expected) {
        assert_eq!(
            (got.0.as_str(), got.1.as_str(), got.3.as_str()),
            (who, verb, result)
        );
    }
    // The handler names the node it changed.
    assert_eq!(drains[1].2, "node:n1", "{drains:?}");
}
