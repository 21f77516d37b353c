//! What only a shared database has: several stores (nodes) on one database, migrations, a lost
//! connection. Against the real PostgreSQL (see [`super::testdb`]).

use std::collections::BTreeSet;
use std::sync::Arc;

use super::testdb::{TestDb, admin};
use super::*;
use crate::store::tests::spec;

async fn open(db: &TestDb) -> PgJobStore {
    PgJobStore::connect(&db.url, PgOptions::default())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_racing_on_one_key_return_the_same_job() {
    let db = TestDb::new().await;
    // Started together: the migrations run once, under their lock.
    let (a, b) = tokio::join!(open(&db), open(&db));
    let nodes = [Arc::new(a), Arc::new(b)];
    for round in 0..5 {
        let mut tasks = Vec::new();
        for i in 0..16 {
            let node = nodes[i % 2].clone();
            tasks.push(tokio::spawn(async move {
                let mut s = spec("same", "q");
                s.idempotency_key = Some(format!("key-{round}"));
                node.submit(s).await.unwrap().id
            }));
        }
        let mut ids = BTreeSet::new();
        for t in tasks {
            ids.insert(t.await.unwrap());
        }
        assert_eq!(ids.len(), 1, "round {round}: {ids:?}");
    }
    // Without keys, both nodes' submits in the same milliseconds all get ids of their own.
    let mut tasks = Vec::new();
    for i in 0..40 {
        let node = nodes[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            node.submit(spec(&format!("j{i}"), "q")).await.unwrap().id
        }));
    }
    let mut ids = BTreeSet::new();
    for t in tasks {
        ids.insert(t.await.unwrap());
    }
    assert_eq!(ids.len(), 40);
    let (page, next) = nodes[1]
        .list(&ListFilter {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!((page.len(), next), (45, None));
    // One node's write is the other's read, and their read-modify-writes exclude each other.
    let id = ids.first().unwrap().clone();
    let (x, y) = tokio::join!(
        nodes[0].transition(&id, JobState::Admitted, "a"),
        nodes[1].transition(&id, JobState::Admitted, "b"),
    );
    assert!(x.is_ok() != y.is_ok(), "{x:?} {y:?}");
    assert_eq!(nodes[0].get(&id).await.unwrap().state, JobState::Admitted);
}

#[tokio::test]
async fn a_schema_newer_than_the_binary_is_refused() {
    let db = TestDb::new().await;
    drop(open(&db).await);
    // Opening again finds the schema current and changes nothing.
    drop(open(&db).await);
    let (client, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let versions: Vec<i32> = client
        .query("SELECT version FROM schema_version ORDER BY version", &[])
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
    client
        .execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[&(SCHEMA_VERSION + 1)],
        )
        .await
        .unwrap();
    let err = PgJobStore::connect(&db.url, PgOptions::default())
        .await
        .err()
        .expect("a newer schema is refused");
    assert!(
        matches!(err, StoreError::SchemaTooNew { found, known } if found == SCHEMA_VERSION + 1 && known == SCHEMA_VERSION),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("schema version {}", SCHEMA_VERSION + 1))
            && msg.contains(&format!("(version {SCHEMA_VERSION})")),
        "{msg}"
    );
}

#[tokio::test]
async fn a_bad_url_or_no_database_fails_clearly() {
    let err = PgJobStore::connect(
        "postgres://u:secret@127.0.0.1:5432/x?bogus=1",
        PgOptions::default(),
    )
    .await
    .err()
    .unwrap();
    let msg = err.to_string();
    assert!(msg.contains("invalid database URL"), "{msg}");
    assert!(!msg.contains("secret"), "the password is not shown: {msg}");
    // Nothing listens on port 1.
    let err = PgJobStore::connect("postgres://postgres@127.0.0.1:1/x", PgOptions::default())
        .await
        .err()
        .unwrap();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
}

/// Cuts the database off: no new connections, and every open one terminated.
async fn cut(db: &TestDb, allow: bool) {
    let admin = admin().await;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS {allow}",
            db.name
        ))
        .await
        .unwrap();
    if !allow {
        admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                &[&db.name],
            )
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_database_fails_writes_as_unavailable_and_recovers_by_itself() {
    let db = TestDb::new().await;
    let store = PgJobStore::connect(
        &db.url,
        PgOptions {
            pool_size: 4,
            timeout: Duration::from_secs(5),
        },
    )
    .await
    .unwrap();
    let mut acked = Vec::new();
    for i in 0..4 {
        acked.push(store.submit(spec(&format!("a{i}"), "q")).await.unwrap().id);
    }
    cut(&db, false).await;
    // Every operation fails as unavailable, none hangs, none is acknowledged.
    for i in 0..4 {
        let err = store
            .submit(spec(&format!("lost{i}"), "q"))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
        let err = store.get(&acked[0]).await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    }
    let err = store
        .transition(&acked[0], JobState::Cancelled, "x")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    // Back: the pool opens new connections by itself; every acknowledged job is there.
    cut(&db, true).await;
    let after = store.submit(spec("after", "q")).await.unwrap();
    acked.push(after.id);
    let (page, _) = store.list(&ListFilter::default()).await.unwrap();
    let ids: Vec<_> = page.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids, acked, "exactly the acknowledged jobs");
    assert_eq!(
        store
            .transition(&acked[0], JobState::Cancelled, "x")
            .await
            .unwrap()
            .state,
        JobState::Cancelled
    );
}

fn report(id: &str) -> crate::cluster::NodeReport {
    crate::cluster::NodeReport {
        id: id.into(),
        address: format!("{id}.example:8001"),
        labels: [("zone".to_string(), "a".to_string())].into(),
        version: "1.2.3".into(),
        cores: 8,
        memory_bytes: 16 << 30,
        gpus: 2,
        models: vec!["identity".into()],
        running_jobs: 1,
        admitting: true,
        job_capacity: crate::job::Resources {
            cpu_millis: 4000,
            memory_bytes: 8 << 30,
            gpus: 1,
            gpu_memory_bytes: 0,
        },
        job_slots: 3,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_registry_keeps_leases_by_the_database_clock() {
    use crate::cluster::NodeState;
    use nodes::{Registration, Renewal};
    let db = TestDb::new().await;
    let nodes = open(&db).await.nodes();
    let lease = Duration::from_secs(30);
    assert_eq!(
        nodes.register(&report("a"), "inc-1", lease).await.unwrap(),
        Registration::Registered { draining: false }
    );
    let listed = nodes.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    let a = &listed[0];
    assert_eq!(a.report, report("a"));
    assert_eq!(a.state, NodeState::Ready);
    assert_eq!(a.lease_ms, 30_000);
    // The lease is the database's now() plus the lease, to the millisecond.
    assert_eq!(a.lease_expires_ms, a.last_heartbeat_ms + 30_000);
    assert!(a.now_ms >= a.last_heartbeat_ms);

    // Another process with the same id waits while the lease holds.
    match nodes.register(&report("a"), "inc-2", lease).await.unwrap() {
        Registration::Held {
            address,
            remaining_ms,
        } => {
            assert_eq!(address, "a.example:8001");
            assert!(remaining_ms > 0 && remaining_ms <= 30_000, "{remaining_ms}");
        }
        other => panic!("{other:?}"),
    }

    // Drained by an operator: the flag comes back with the renewal, and the listing shows it.
    assert!(nodes.set_draining("a", true).await.unwrap());
    assert!(!nodes.set_draining("nobody", true).await.unwrap());
    let mut busy = report("a");
    busy.running_jobs = 3;
    busy.admitting = false;
    // Its fast path took CPU: the capacity it offers jobs follows at the renewal.
    busy.job_capacity.cpu_millis = 1500;
    assert_eq!(
        nodes.renew(&busy, "inc-1").await.unwrap(),
        Renewal::Renewed { draining: true }
    );
    let a = nodes.get("a").await.unwrap().unwrap();
    assert_eq!(
        (
            a.state,
            a.report.running_jobs,
            a.report.admitting,
            a.report.job_capacity.cpu_millis
        ),
        (NodeState::Draining, 3, false, 1500)
    );
    assert_eq!(nodes.get("nobody").await.unwrap(), None);

    // A lease that lapsed (moved back in the database, not by sleeping): SUSPECT, then DEAD.
    let admin_db = {
        let (client, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    };
    admin_db
        .execute(
            "UPDATE nodes SET lease_expires = now() - interval '1 second' WHERE id = 'a'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        nodes.get("a").await.unwrap().unwrap().state,
        NodeState::Suspect
    );
    admin_db
        .execute(
            "UPDATE nodes SET lease_expires = now() - interval '31 seconds' WHERE id = 'a'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        nodes.get("a").await.unwrap().unwrap().state,
        NodeState::Dead
    );

    // Its lease lapsed: another process takes the id (the drain flag stays), and the first
    // one learns at its next renewal that it lost it.
    assert_eq!(
        nodes.register(&report("a"), "inc-2", lease).await.unwrap(),
        Registration::Registered { draining: true }
    );
    assert_eq!(
        nodes.renew(&report("a"), "inc-1").await.unwrap(),
        Renewal::Lost
    );
    assert!(nodes.set_draining("a", false).await.unwrap());
    assert_eq!(
        nodes.renew(&report("a"), "inc-2").await.unwrap(),
        Renewal::Renewed { draining: false }
    );

    // Leaving at shutdown: DEAD at once, and the id is free.
    nodes.leave("a", "inc-2").await.unwrap();
    assert_eq!(
        nodes.get("a").await.unwrap().unwrap().state,
        NodeState::Dead
    );
    assert_eq!(
        nodes.register(&report("a"), "inc-3", lease).await.unwrap(),
        Registration::Registered { draining: false }
    );
    nodes.register(&report("b"), "inc-b", lease).await.unwrap();
    let ids: Vec<String> = nodes
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.report.id)
        .collect();
    assert_eq!(ids, ["a", "b"]);
}

/// Leadership by the database's clock, and fencing: once a newer epoch holds the row, an
/// older leader's write is refused in its own transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_lost_its_lease_cannot_write_and_epochs_only_grow() {
    use crate::cluster::LeaderFence;
    use leader::Leadership;
    let db = TestDb::new().await;
    let store = open(&db).await;
    let lead = store.leader();
    let long = Duration::from_secs(30);
    let Leadership::Leader { fence: a, .. } =
        lead.acquire_or_renew("a", "a-1", long).await.unwrap()
    else {
        panic!("the free row is taken");
    };
    assert_eq!(a.epoch, 1);
    // b cannot take a valid lease; a renews it and keeps its epoch.
    let follower = lead.acquire_or_renew("b", "b-1", long).await.unwrap();
    assert!(
        matches!(&follower, Leadership::Follower { node, epoch: 1, remaining_ms }
            if node == "a" && *remaining_ms > 25_000),
        "{follower:?}"
    );
    assert!(matches!(
        lead.acquire_or_renew("a", "a-1", long).await.unwrap(),
        Leadership::Leader { fence, .. } if fence == a
    ));
    let job = store.submit(spec("j", "q")).await.unwrap();
    let placed = store
        .update_as_leader(&job.id, &a, |_| Ok(Change::to(JobState::Admitted, "by a")))
        .await
        .unwrap();
    assert_eq!(placed.state, JobState::Admitted);

    // a's lease ends (as if it had paused past it); b takes over with the next epoch.
    lead.resign(&a).await.unwrap();
    let Leadership::Leader { fence: b, .. } =
        lead.acquire_or_renew("b", "b-1", long).await.unwrap()
    else {
        panic!("b does not take the ended lease");
    };
    assert_eq!(b.epoch, 2);
    // a's write is refused, and writes nothing.
    let err = store
        .update_as_leader(&job.id, &a, |_| {
            Ok(Change::to(JobState::Queued, "by a, late"))
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Fenced(_)), "{err}");
    assert_eq!(store.get(&job.id).await.unwrap().state, JobState::Admitted);
    // A fence with b's epoch but another process is no leader either.
    let forged = LeaderFence {
        incarnation: "a-1".into(),
        ..b.clone()
    };
    assert!(matches!(
        store
            .update_as_leader(&job.id, &forged, |_| Ok(Change::to(JobState::Queued, "x")))
            .await,
        Err(StoreError::Fenced(_))
    ));
    store
        .update_as_leader(&job.id, &b, |_| Ok(Change::to(JobState::Queued, "by b")))
        .await
        .unwrap();
    // a comes back: it is a follower; should it take the row later, it gets a new epoch.
    assert!(matches!(
        lead.acquire_or_renew("a", "a-1", long).await.unwrap(),
        Leadership::Follower { epoch: 2, .. }
    ));
    lead.resign(&b).await.unwrap();
    let Leadership::Leader { fence: a2, .. } =
        lead.acquire_or_renew("a", "a-1", long).await.unwrap()
    else {
        panic!("a does not take the ended lease");
    };
    assert_eq!(a2.epoch, 3);
    assert!(matches!(
        store
            .update_as_leader(&job.id, &a, |_| Ok(Change::to(JobState::Admitted, "x")))
            .await,
        Err(StoreError::Fenced(_))
    ));
}

/// Property, with real concurrency: two nodes keep taking a short lease from each other and
/// writing as leader; in the job's history (commit order) the writers' epochs never go back,
/// and every write that was acknowledged is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_writes_commit_in_epoch_order_while_leadership_flips() {
    use leader::Leadership;
    let db = TestDb::new().await;
    let store = std::sync::Arc::new(open(&db).await);
    let id = store.submit(spec("j", "q")).await.unwrap().id;
    let mut tasks = Vec::new();
    for node in ["a", "b"] {
        let store = store.clone();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            let lead = store.leader();
            let mut acknowledged = Vec::new();
            for i in 0..60u32 {
                let lease = Duration::from_millis(20 + u64::from(i % 3) * 15);
                if let Leadership::Leader { fence, .. } = lead
                    .acquire_or_renew(node, &format!("{node}-1"), lease)
                    .await
                    .unwrap()
                {
                    let reason = format!("epoch {} {node} {i}", fence.epoch);
                    let r = reason.clone();
                    let written = store
                        .update_as_leader(&id, &fence, move |rec| {
                            let to = if rec.state == JobState::Queued {
                                JobState::Admitted
                            } else {
                                JobState::Queued
                            };
                            Ok(Change::to(to, r))
                        })
                        .await;
                    match written {
                        Ok(_) => acknowledged.push(reason),
                        Err(StoreError::Fenced(_)) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
                tokio::time::sleep(Duration::from_millis(u64::from(i % 4) * 7)).await;
            }
            acknowledged
        }));
    }
    let mut acknowledged = Vec::new();
    for t in tasks {
        acknowledged.extend(t.await.unwrap());
    }
    let history = store.get(&id).await.unwrap().history;
    let epochs: Vec<u64> = history
        .iter()
        .skip(1)
        .map(|h| h.reason.split(' ').nth(1).unwrap().parse().unwrap())
        .collect();
    assert!(epochs.windows(2).all(|w| w[0] <= w[1]), "{epochs:?}");
    assert!(
        epochs.last().copied().unwrap_or(0) >= 2,
        "leadership flipped: {epochs:?}"
    );
    let written: Vec<&str> = history.iter().skip(1).map(|h| h.reason.as_str()).collect();
    assert_eq!(written.len(), acknowledged.len());
    for a in &acknowledged {
        assert!(
            written.contains(&a.as_str()),
            "{a} was acknowledged but is not there"
        );
    }
}

/// An attempt's output kept for other nodes: pieces in order, a retried piece kept once,
/// pages after a given piece, and gone with the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_output_reads_in_order_and_goes_with_its_job() {
    let db = TestDb::new().await;
    let store = open(&db).await;
    let id = store.submit(spec("j", "q")).await.unwrap().id;
    store
        .append_log(&id, 1, 0, "stdout", b"one ")
        .await
        .unwrap();
    store
        .append_log(&id, 1, 1, "stderr", b"two ")
        .await
        .unwrap();
    // A retry of a piece that was stored changes nothing.
    store
        .append_log(&id, 1, 1, "stderr", b"dup ")
        .await
        .unwrap();
    store
        .append_log(&id, 1, 2, "stdout", b"three")
        .await
        .unwrap();
    store
        .append_log(&id, 2, 0, "stdout", b"other attempt")
        .await
        .unwrap();
    let all = store.read_logs(&id, 1, None, 10).await.unwrap();
    let text: Vec<(u32, &str, &[u8])> = all
        .iter()
        .map(|p| (p.seq, p.stream.as_str(), p.data.as_slice()))
        .collect();
    assert_eq!(
        text,
        [
            (0, "stdout", &b"one "[..]),
            (1, "stderr", &b"two "[..]),
            (2, "stdout", &b"three"[..])
        ]
    );
    let page = store.read_logs(&id, 1, Some(0), 1).await.unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].seq, 1);
    assert!(
        store
            .read_logs(&id, 1, Some(2), 10)
            .await
            .unwrap()
            .is_empty()
    );
    // Deleted with the job (here by hand; the expiry sweep deletes the same way).
    let client = store.client().await.unwrap();
    client
        .execute("DELETE FROM jobs WHERE id = $1", &[&id])
        .await
        .unwrap();
    assert!(store.read_logs(&id, 2, None, 10).await.unwrap().is_empty());
}

/// Rows of nodes gone for longer than the bound are deleted; live and recent ones stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_forgets_nodes_gone_longer_than_the_bound() {
    let db = TestDb::new().await;
    let store = open(&db).await;
    let nodes = store.nodes();
    let lease = Duration::from_secs(30);
    for id in ["live", "recent", "old"] {
        nodes.register(&report(id), id, lease).await.unwrap();
    }
    let client = store.client().await.unwrap();
    client
        .batch_execute(
            "UPDATE nodes SET lease_expires = now() - interval '1 hour' WHERE id = 'recent';
            UPDATE nodes SET lease_expires = now() - interval '25 hours' WHERE id = 'old';",
        )
        .await
        .unwrap();
    assert_eq!(
        nodes.prune(Duration::from_secs(24 * 3600)).await.unwrap(),
        1
    );
    let left: Vec<String> = nodes
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.report.id)
        .collect();
    assert_eq!(left, ["live", "recent"]);
}
