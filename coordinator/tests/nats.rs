//! Events across nodes through the real binary and the real NATS server with JetStream
//! (`VERALTHEIM_TEST_NATS`, default `nats://127.0.0.1:4222`; `scripts/test` starts it): two
//! coordinators with `--nats-url` and their own `--node-id`, on the embedded store, share a
//! stream of this test's own. A job submitted to one shows in the other's WatchEvents with the
//! node it ran on; each watcher sees its own events with its own node id; `GetStatus` reports
//! the bridge connected with its counters, and `/metrics` exports them. Waits are bounded,
//! never timed.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tonic::transport::Channel;
use veraltheim_proto::v1::{
    self, job_service_client::JobServiceClient, system_service_client::SystemServiceClient,
};

mod common;

use common::{Server, command};

/// Longest wait for anything: a bound for a hang, not a measure.
const BOUND: Duration = Duration::from_secs(60);

fn nats_url() -> String {
    std::env::var("VERALTHEIM_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_string())
}

async fn system(s: &Server) -> SystemServiceClient<Channel> {
    SystemServiceClient::new(common::channel(s).await)
}

/// Polls GetStatus until the bridge's state passes `pred`.
async fn bridge_until(
    s: &Server,
    what: &str,
    pred: impl Fn(&v1::NatsBridgeStatus) -> bool,
) -> v1::NatsBridgeStatus {
    let mut client = system(s).await;
    let end = Instant::now() + BOUND;
    loop {
        let status = client
            .get_status(v1::GetStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        let nats = status
            .nats
            .expect("a server with --nats-url reports its bridge");
        if pred(&nats) {
            return nats;
        }
        assert!(Instant::now() < end, "the bridge never {what}: {nats:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The next event on `events` whose topic is `topic` (bounded wait).
async fn event_on(events: &mut tonic::Streaming<v1::Event>, topic: &str) -> v1::Event {
    let end = Instant::now() + BOUND;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let e = tokio::time::timeout(left, events.message())
            .await
            .unwrap_or_else(|_| panic!("no event on {topic} within the bound"))
            .unwrap()
            .expect("the stream stays open");
        if e.topic == topic {
            return e;
        }
    }
}

/// Deletes a test's stream when dropped, whether the test passed or panicked.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let name = self.0.clone();
        // Its own thread and runtime: a Drop cannot await, and may run inside a runtime.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let client = async_nats::connect(nats_url()).await.ok()?;
                async_nats::jetstream::new(client)
                    .delete_stream(&name)
                    .await
                    .ok()
            })
        })
        .join();
    }
}

async fn watch(s: &Server) -> tonic::Streaming<v1::Event> {
    system(s)
        .await
        .watch_events(v1::WatchEventsRequest {
            topics: vec!["jobs.*.state".into()],
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn a_job_on_one_node_shows_in_the_other_nodes_events_with_its_node() {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let id = format!("{}_{nanos:x}", std::process::id());
    let stream = format!("VT_TEST_COORD_{id}");
    let _cleanup = Cleanup(stream.clone());
    let prefix = format!("vt-test.coord-{id}");
    let url = nats_url();
    let args = |node: &'static str| {
        vec![
            "--node-id".to_string(),
            node.to_string(),
            "--nats-url".to_string(),
            url.clone(),
            "--nats-stream".to_string(),
            stream.clone(),
            "--nats-subject-prefix".to_string(),
            prefix.clone(),
        ]
    };
    let (a_args, b_args) = (args("node-a"), args("node-b"));
    let a = common::start(&a_args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let b = common::start(&b_args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    // Both consume the stream before anything is published (a bridge delivers what is stored
    // after it connected).
    let sa = bridge_until(&a, "connected", |n| n.state == "connected").await;
    assert_eq!(
        (sa.url.as_str(), sa.stream.as_str()),
        (url.as_str(), stream.as_str())
    );
    bridge_until(&b, "connected", |n| n.state == "connected").await;
    let (mut on_a, mut on_b) = (watch(&a).await, watch(&b).await);

    let job = JobServiceClient::new(common::channel(&a).await)
        .submit_job(command("across", &["true"]))
        .await
        .unwrap()
        .into_inner();
    let topic = format!("jobs.{}.state", job.id);

    let here = event_on(&mut on_a, &topic).await;
    assert_eq!(
        here.node, "node-a",
        "a local event names this node: {here:?}"
    );
    let there = event_on(&mut on_b, &topic).await;
    assert_eq!(there.node, "node-a", "{there:?}");
    assert_eq!(
        there.attributes.get("node").map(String::as_str),
        Some("node-a")
    );
    assert_eq!(there.attributes.get("job"), Some(&job.id));
    assert_eq!(there.attributes.get("state"), here.attributes.get("state"));
    // The job runs to its end on A; B hears that too.
    loop {
        let e = event_on(&mut on_b, &topic).await;
        assert_eq!(e.node, "node-a");
        if e.attributes.get("state").map(String::as_str) == Some("SUCCEEDED") {
            break;
        }
    }

    let sb = bridge_until(&b, "counted what it received", |n| n.received >= 4).await;
    assert_eq!((sb.dropped_full, sb.dropped_failed), (0, 0), "{sb:?}");
    // A's four job events, and its models' states (each node loads the built-in models, whose
    // `models.*.state` events cross too).
    let sa = bridge_until(&a, "counted what it published", |n| n.published >= 4).await;
    assert_eq!((sa.dropped_full, sa.dropped_failed), (0, 0), "{sa:?}");

    // /metrics exports the same.
    let (code, metrics) = common::http_call(&b.http, "GET", "/metrics", None, "").await;
    assert_eq!(code, 200);
    assert!(
        metrics.contains("veraltheim_nats_bridge_connected 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("veraltheim_nats_bridge_received_total"),
        "{metrics}"
    );

    // The servers stop before their stream goes (the guard is dropped last).
    drop(a);
    drop(b);
}
