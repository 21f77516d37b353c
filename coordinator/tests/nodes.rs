//! The node registry through the real binary: two coordinators on one PostgreSQL database list
//! each other READY with their capacity; a second process cannot take a live node's id; a node
//! killed with SIGKILL goes SUSPECT, then DEAD, and its id can be taken again; one stopped
//! cleanly is DEAD at once; a drained node
//! starts no new job while its running one finishes, and takes work again when undrained; a
//! coordinator on the embedded store lists (and drains) itself alone; `veraltheim nodes --json`.
//! Each test has a database of its own on the real PostgreSQL (see `common::pg`). States are
//! polled with a bound, never timed.

use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tonic::transport::Channel;
use veraltheim_proto::v1::{
    self, cluster_service_client::ClusterServiceClient, job_service_client::JobServiceClient,
};

mod common;

use common::pg::TestDb;
use common::{Server, command, wait_for};

/// The waiting reason of a job when every node of a cluster is drained (the scheduler's
/// `NO_NODE`).
const NO_NODE_REASON: &str = "no node takes jobs now";
/// The waiting reason of a job on a single node that is drained (the runner's `DRAINING`).
const DRAINING_REASON: &str = "this node is draining";

async fn start(db: &TestDb, id: &str, lease: &str, extra: &[&str]) -> Server {
    let mut args = vec![
        "--store",
        db.url.as_str(),
        "--node-id",
        id,
        "--lease-seconds",
        lease,
    ];
    args.extend_from_slice(extra);
    common::start(&args).await
}

async fn cluster(s: &Server) -> ClusterServiceClient<Channel> {
    ClusterServiceClient::new(common::channel(s).await)
}

async fn jobs(s: &Server) -> JobServiceClient<Channel> {
    JobServiceClient::new(common::channel(s).await)
}

async fn nodes(client: &mut ClusterServiceClient<Channel>) -> v1::ListNodesResponse {
    client
        .list_nodes(v1::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
}

async fn node(client: &mut ClusterServiceClient<Channel>, id: &str) -> v1::Node {
    nodes(client)
        .await
        .nodes
        .into_iter()
        .find(|n| n.id == id)
        .unwrap_or_else(|| panic!("node {id} is not listed"))
}

/// Polls node `id` until `pred` holds (60 s at most, then fails with the node).
async fn until(
    client: &mut ClusterServiceClient<Channel>,
    id: &str,
    what: &str,
    mut pred: impl FnMut(&v1::Node) -> bool,
) -> v1::Node {
    let bound = Instant::now() + Duration::from_secs(60);
    loop {
        let n = node(client, id).await;
        if pred(&n) {
            return n;
        }
        assert!(Instant::now() < bound, "node {id} never {what}: {n:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn state(n: &v1::Node) -> v1::NodeState {
    v1::NodeState::try_from(n.state).unwrap()
}

/// `veraltheim nodes ARGS... --server S`.
fn cli(server: &Server, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_veraltheim"))
        .arg("nodes")
        .args(args)
        .args(["--server", &server.grpc])
        .env_remove("VERALTHEIM_SERVER")
        .output()
        .unwrap()
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "the CLI failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// Polls a job until its waiting reason says no node takes it; it must still be QUEUED.
async fn held_by_the_drain(client: &mut JobServiceClient<Channel>, id: &str, why: &str) -> v1::Job {
    let bound = Instant::now() + Duration::from_secs(30);
    loop {
        let job = client
            .get_job(v1::GetJobRequest { id: id.into() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(job.state, v1::JobState::Queued as i32, "{job:?}");
        if job.reason.contains(why) {
            return job;
        }
        assert!(Instant::now() < bound, "never held by the drain: {job:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn two_nodes_list_each_other_and_a_killed_one_goes_suspect_then_dead() {
    let db = TestDb::new("nodes").await;
    let a = start(&db, "a", "2", &["--node-labels", "zone=x"]).await;
    let mut b = start(&db, "b", "2", &["--simulate-gpus", "2x1GiB"]).await;
    let mut ca = cluster(&a).await;

    let listed = nodes(&mut ca).await;
    assert_eq!(listed.self_id, "a");
    assert!(listed.shared);
    let ids: Vec<&str> = listed.nodes.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(ids, ["a", "b"]);
    for (n, server) in listed.nodes.iter().zip([&a, &b]) {
        assert_eq!(state(n), v1::NodeState::Ready, "{n:?}");
        assert_eq!(n.address, server.grpc, "the gRPC address is advertised");
        assert!(n.cores > 0 && n.memory_bytes > 0, "{n:?}");
        assert_eq!(n.version, env!("CARGO_PKG_VERSION"));
        assert!(
            n.lease_ms == 2000 && n.last_heartbeat_ms <= n.now_ms,
            "{n:?}"
        );
        assert!(n.admitting && !n.draining, "{n:?}");
    }
    assert_eq!(listed.nodes[1].gpus, 2, "b's inventory: two simulated GPUs");
    assert_eq!(
        listed.nodes[0].labels,
        [("zone".to_string(), "x".to_string())].into()
    );
    // Loaded models come with the renewals.
    until(&mut ca, "b", "reported its models", |n| {
        n.models.iter().any(|m| m == "identity")
    })
    .await;

    // The CLI on the other node lists the same.
    let out = json_of(&cli(&b, &["--json"]));
    assert_eq!(out["self"], "b");
    assert_eq!(out["shared"], true);
    let listed = out["nodes"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[1]["id"], "b");
    assert_eq!(listed[1]["state"], "READY");
    assert_eq!(listed[1]["capacity"]["gpus"], 2);
    assert!(listed[1]["capacity"]["cores"].as_u64().unwrap() > 0);
    assert!(
        listed[1]["models"]
            .as_array()
            .unwrap()
            .contains(&"identity".into())
    );
    assert_eq!(listed[1]["running_jobs"], 0);
    assert!(listed[1]["last_heartbeat_ms"].as_u64().unwrap() > 0);

    // A second process cannot take b's id while b renews its lease: it waits two leases, then
    // gives up, saying why.
    let dir = tempfile::tempdir().unwrap();
    let (mut twin, _, _) = common::serve_command(
        dir.path(),
        &["--store", &db.url, "--node-id", "b", "--lease-seconds", "2"],
        None,
    );
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::task::spawn_blocking(move || {
            twin.stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()
                .unwrap()
        }),
    )
    .await
    .expect("the second process exits")
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("node id 'b' is held by a live node") && stderr.contains("--node-id"),
        "{stderr}"
    );

    // kill -9: b stops renewing. SUSPECT first (lapsed less than a lease ago), then DEAD.
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    // Every listing until DEAD is checked against the rule, by the database's clock it carries;
    // SUSPECT must be seen unless no listing fell into its window (a stalled test machine).
    let mut seen = Vec::new();
    let dead = until(&mut ca, "b", "died", |n| {
        seen.push(n.clone());
        state(n) == v1::NodeState::Dead
    })
    .await;
    for n in &seen {
        let lapsed = n.now_ms >= n.lease_expires_ms;
        let want = match (lapsed, n.now_ms >= n.lease_expires_ms + n.lease_ms) {
            (false, _) => v1::NodeState::Ready,
            (true, false) => v1::NodeState::Suspect,
            (true, true) => v1::NodeState::Dead,
        };
        assert_eq!(state(n), want, "{n:?}");
        assert_eq!(
            n.last_heartbeat_ms, dead.last_heartbeat_ms,
            "no heartbeat after the kill"
        );
    }
    let in_window =
        |n: &v1::Node| n.now_ms >= n.lease_expires_ms && n.now_ms < n.lease_expires_ms + n.lease_ms;
    let suspect = seen.iter().find(|n| in_window(n));
    let last_ready = seen.iter().rev().find(|n| state(n) == v1::NodeState::Ready);
    match (suspect, last_ready) {
        (Some(s), _) => assert_eq!(state(s), v1::NodeState::Suspect, "{s:?}"),
        // No listing fell between the lapse and death: the one before was READY and the next
        // DEAD, a gap longer than the window.
        (None, Some(r)) => assert!(
            dead.now_ms - r.now_ms >= dead.lease_ms,
            "SUSPECT never seen: {seen:?}"
        ),
        (None, None) => assert!(
            dead.now_ms >= dead.lease_expires_ms + dead.lease_ms,
            "{dead:?}"
        ),
    }

    // Its lease lapsed: a new process takes the id.
    let mut b2 = start(&db, "b", "2", &[]).await;
    let again = until(&mut ca, "b", "came back", |n| {
        state(n) == v1::NodeState::Ready
    })
    .await;
    assert!(again.started_ms > dead.last_heartbeat_ms, "{again:?}");

    // A clean stop (SIGTERM) leaves the registry before the process exits: DEAD at once.
    // SAFETY: a plain kill(2) of our own child.
    assert_eq!(
        unsafe { libc::kill(b2.child.id() as i32, libc::SIGTERM) },
        0
    );
    assert!(b2.child.wait().unwrap().success());
    let left = node(&mut ca, "b").await;
    assert_eq!(state(&left), v1::NodeState::Dead, "{left:?}");
}

#[tokio::test]
async fn a_drained_node_starts_no_new_job_and_lets_its_running_one_finish() {
    let db = TestDb::new("nodes").await;
    let a = start(&db, "a", "1", &[]).await;
    let b = start(&db, "b", "1", &[]).await;
    let mut ca = cluster(&a).await;
    let mut jb = jobs(&b).await;

    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("go");
    let script = format!("while [ ! -e {} ]; do sleep 0.05; done", flag.display());
    let running = jb
        .submit_job(command("running", &["sh", "-c", &script]))
        .await
        .unwrap()
        .into_inner();
    let running_now = wait_for(&mut jb, &running.id, v1::JobState::Running).await;
    // The leader placed it on one of the two; the other is `free`.
    let busy = running_now.node.clone();
    let free = if busy == "a" { "b" } else { "a" };
    assert!(busy == "a" || busy == "b", "{running_now:?}");
    until(&mut ca, &busy, "reported its running job", |n| {
        n.running_jobs == 1
    })
    .await;

    // Drained through the other node's API: the flag is in the registry at once, and the node
    // applies it at its next renewal.
    let other_api = if busy == "a" { &b } else { &a };
    let drained = json_of(&cli(other_api, &["drain", &busy, "--json"]));
    assert_eq!(drained["id"], busy.as_str());
    assert_eq!(drained["state"], "DRAINING");
    assert_eq!(drained["draining"], true);
    until(&mut ca, &busy, "stopped admitting", |n| !n.admitting).await;

    // New work goes to the node that is not drained, whichever node takes the submit; the
    // running job finishes where it is.
    for api in [&a, &b] {
        let mut client = jobs(api).await;
        let after = client
            .submit_job(command("after", &["true"]))
            .await
            .unwrap()
            .into_inner();
        let done = wait_for(&mut client, &after.id, v1::JobState::Succeeded).await;
        assert_eq!(done.node, free, "{done:?}");
    }
    std::fs::write(&flag, b"").unwrap();
    let finished = wait_for(&mut jb, &running.id, v1::JobState::Succeeded).await;
    assert_eq!(finished.node, busy);
    let busy_now = until(&mut ca, &busy, "reported no running job", |n| {
        n.running_jobs == 0
    })
    .await;
    assert_eq!(state(&busy_now), v1::NodeState::Draining);

    // Both drained: a job waits, and the leader says why.
    json_of(&cli(&a, &["drain", free, "--json"]));
    until(&mut ca, free, "stopped admitting", |n| !n.admitting).await;
    let leader = nodes(&mut ca).await.leader_id;
    let leader_api = if leader == "a" { &a } else { &b };
    let mut jl = jobs(leader_api).await;
    let held = jl
        .submit_job(command("held", &["true"]))
        .await
        .unwrap()
        .into_inner();
    held_by_the_drain(&mut jl, &held.id, NO_NODE_REASON).await;

    // An unknown node is named as such; the table says who is who.
    let out = cli(&a, &["drain", "nobody"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("NotFound") && stderr.contains("'nobody'"),
        "{stderr}"
    );
    let out = cli(&a, &[]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("ID "), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("a *") && l.contains("DRAINING")),
        "{table}"
    );
    assert!(
        table.contains(&format!("scheduler leader: {leader} (epoch ")),
        "{table}"
    );

    // Undrained: the held job runs.
    let undone = json_of(&cli(&a, &["drain", free, "--undo", "--json"]));
    assert_eq!(undone["draining"], false);
    let ran = wait_for(&mut jl, &held.id, v1::JobState::Succeeded).await;
    assert_eq!(ran.node, free);
}

#[tokio::test]
async fn a_node_on_the_embedded_store_lists_and_drains_itself() {
    let server = common::start(&["--node-id", "solo"]).await;
    let out = json_of(&cli(&server, &["--json"]));
    assert_eq!(out["self"], "solo");
    assert_eq!(out["shared"], false);
    let listed = out["nodes"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{out}");
    assert_eq!(listed[0]["id"], "solo");
    assert_eq!(listed[0]["state"], "READY");
    assert_eq!(listed[0]["address"], server.grpc.as_str());
    assert_eq!(listed[0]["lease_ms"], 10_000, "the default lease");
    assert!(listed[0]["capacity"]["cores"].as_u64().unwrap() > 0);

    // Only itself to drain.
    let out = cli(&server, &["drain", "other"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("NotFound") && stderr.contains("'solo'"),
        "{stderr}"
    );
    let out = cli(&server, &["drain", "solo"]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("DRAINING"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let mut js = jobs(&server).await;
    let held = js
        .submit_job(command("held", &["true"]))
        .await
        .unwrap()
        .into_inner();
    held_by_the_drain(&mut js, &held.id, DRAINING_REASON).await;
    let out = json_of(&cli(&server, &["--json"]));
    assert_eq!(out["nodes"][0]["state"], "DRAINING");
    assert_eq!(out["nodes"][0]["admitting"], false);
    assert!(cli(&server, &["drain", "solo", "--undo"]).status.success());
    wait_for(&mut js, &held.id, v1::JobState::Succeeded).await;
}
