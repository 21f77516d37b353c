//! Batch jobs in PostgreSQL through the real binary (`--store postgres://...`): submit, list,
//! cancel; a kill -9 and a start of another coordinator (its own data folder) on the same
//! database that finds every job; a database that goes away (UNAVAILABLE with a retry
//! pushback, then back by itself); a schema newer than the binary refused at start. Each test
//! has a database of its own on the real PostgreSQL (`VERALTHEIM_TEST_PG`, default
//! `postgres://postgres@127.0.0.1:5432/test`), dropped at the end.

use std::process::Stdio;
use std::time::Duration;

use tonic::transport::Channel;
use veraltheim_proto::v1::{self, job_service_client::JobServiceClient};

mod common;

use common::pg::TestDb;
use common::{command, wait_for};

async fn start(db: &TestDb) -> (common::Server, JobServiceClient<Channel>) {
    // A short lease: a coordinator started after a kill -9 has the same node id (the host
    // name), and waits for the killed one's lease to lapse.
    let server = common::start(&["--store", &db.url, "--lease-seconds", "2"]).await;
    let ch = common::channel(&server).await;
    (server, JobServiceClient::new(ch))
}

fn keyed(name: &str, argv: &[&str], key: &str) -> v1::SubmitJobRequest {
    let mut req = command(name, argv);
    req.spec.as_mut().unwrap().idempotency_key = key.into();
    req
}

async fn ids(jobs: &mut JobServiceClient<Channel>) -> Vec<(String, i32)> {
    let list = jobs
        .list_jobs(v1::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    list.jobs.into_iter().map(|j| (j.id, j.state)).collect()
}

#[tokio::test]
async fn jobs_live_in_postgres_across_coordinators_and_restarts() {
    let db = TestDb::new("jobs").await;
    let (quick, long, held);
    {
        let (mut server, mut jobs) = start(&db).await;
        quick = jobs
            .submit_job(keyed("quick", &["true"], "k1"))
            .await
            .unwrap()
            .into_inner();
        long = jobs
            .submit_job(command("long", &["sleep", "30"]))
            .await
            .unwrap()
            .into_inner();
        wait_for(&mut jobs, &quick.id, v1::JobState::Succeeded).await;
        wait_for(&mut jobs, &long.id, v1::JobState::Running).await;
        jobs.cancel_job(v1::CancelJobRequest {
            id: long.id.clone(),
        })
        .await
        .unwrap();
        wait_for(&mut jobs, &long.id, v1::JobState::Cancelled).await;
        held = jobs
            .submit_job(command("held", &["sleep", "30"]))
            .await
            .unwrap()
            .into_inner();
        wait_for(&mut jobs, &held.id, v1::JobState::Running).await;
        assert_eq!(
            ids(&mut jobs).await,
            [
                (quick.id.clone(), v1::JobState::Succeeded as i32),
                (long.id.clone(), v1::JobState::Cancelled as i32),
                (held.id.clone(), v1::JobState::Running as i32),
            ]
        );
        // kill -9: no shutdown path runs.
        server.child.kill().unwrap();
        server.child.wait().unwrap();
    }
    // Another coordinator, with a data folder of its own: everything is in the database.
    let (_server, mut jobs) = start(&db).await;
    // Until the new process's leader moves it on, the job still shows the lost attempt.
    let bound = std::time::Instant::now() + Duration::from_secs(60);
    let again = loop {
        let j = wait_for(&mut jobs, &held.id, v1::JobState::Running).await;
        if j.attempt >= 2 {
            break j;
        }
        assert!(std::time::Instant::now() < bound, "never ran again: {j:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        again.attempt, 2,
        "the interrupted job runs again: {again:?}"
    );
    assert!(again.infra_failures >= 1, "{again:?}");
    let listed = ids(&mut jobs).await;
    assert_eq!(
        listed.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(),
        [quick.id.clone(), long.id.clone(), held.id.clone()]
    );
    assert_eq!(listed[0].1, v1::JobState::Succeeded as i32);
    assert_eq!(listed[1].1, v1::JobState::Cancelled as i32);
    // The idempotency key is the database's: the same job, not a new one.
    let same = jobs
        .submit_job(keyed("quick", &["true"], "k1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(same.id, quick.id);
    jobs.cancel_job(v1::CancelJobRequest {
        id: held.id.clone(),
    })
    .await
    .unwrap();
    wait_for(&mut jobs, &held.id, v1::JobState::Cancelled).await;

    // The database goes away: submits fail as UNAVAILABLE with a retry pushback.
    db.allow(false).await;
    for _ in 0..3 {
        let err = jobs
            .submit_job(command("lost", &["true"]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        assert!(
            err.metadata().get("grpc-retry-pushback-ms").is_some(),
            "{err:?}"
        );
    }
    // It comes back: the coordinator reconnects by itself.
    db.allow(true).await;
    let after = jobs
        .submit_job(command("after", &["true"]))
        .await
        .unwrap()
        .into_inner();
    wait_for(&mut jobs, &after.id, v1::JobState::Succeeded).await;
    assert_eq!(
        ids(&mut jobs).await.len(),
        4,
        "nothing from the outage was kept"
    );
}

#[tokio::test]
async fn a_database_with_a_newer_schema_is_refused_at_start() {
    let db = TestDb::new("jobs").await;
    // A first start makes the schema.
    drop(start(&db).await);
    let (client, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let known: i32 = client
        .query_one("SELECT max(version) FROM schema_version", &[])
        .await
        .unwrap()
        .get(0);
    client
        .execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[&(known + 1)],
        )
        .await
        .unwrap();
    drop(client);
    let dir = tempfile::tempdir().unwrap();
    let (mut command, _, _) = common::serve_command(dir.path(), &["--store", &db.url], None);
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::task::spawn_blocking(move || {
            command
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .output()
                .unwrap()
        }),
    )
    .await
    .expect("the server exits")
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("schema version {}", known + 1))
            && stderr.contains(&format!("(version {known})")),
        "{stderr}"
    );
}
