//! The job store's behaviour, run against every backend: the key-value store (in memory) and,
//! with the `postgres` feature, a real PostgreSQL database of the test's own.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use veraltheim_storage::MemoryStore;

use super::*;
use crate::store::tests::spec;
use crate::store::{Clock, FailureKind, MAX_PAGE_BYTES};

/// Where a test's jobs live; [`Db::open`] again is a restart.
pub(crate) enum Db {
    Memory(Arc<MemoryStore>),
    #[cfg(feature = "postgres")]
    Postgres(crate::postgres::testdb::TestDb),
}

impl Db {
    async fn open(&self, clock: Clock) -> AnyJobStore<Arc<MemoryStore>> {
        match self {
            Db::Memory(m) => AnyJobStore::Kv(JobStore::with_clock(m.clone(), clock)),
            #[cfg(feature = "postgres")]
            Db::Postgres(db) => AnyJobStore::Postgres(
                crate::postgres::PgJobStore::connect(&db.url, Default::default())
                    .await
                    .unwrap()
                    .with_clock(clock),
            ),
        }
    }
}

/// One test per backend for each named function.
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use super::*;

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn memory() {
                    super::$name(Db::Memory(Arc::new(MemoryStore::new()))).await;
                }

                #[cfg(feature = "postgres")]
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    let db = crate::postgres::testdb::TestDb::new().await;
                    super::$name(Db::Postgres(db)).await;
                }
            }
        )*
    };
}

on_every_backend!(
    submit_assigns_time_ordered_ids_and_persists,
    invalid_specs_write_nothing_and_unknown_ids_are_not_found,
    idempotency_keys_are_each_tenants_own,
    list_filters_and_pages_both_ways,
    pages_are_bounded_by_bytes,
    updates_go_through_the_lifecycle_and_tell_the_observer,
    concurrent_submits_and_updates_lose_nothing,
    finished_jobs_expire_after_their_ttl,
    recover_requeues_admitted_and_running_jobs,
    pauses_are_marked_without_a_change_of_state_and_closed_by_one,
);

fn fixed_clock(ms: u64) -> (Clock, Arc<AtomicU64>) {
    let t = Arc::new(AtomicU64::new(ms));
    let t2 = t.clone();
    (Arc::new(move || t2.load(Ordering::SeqCst)), t)
}

const T0: u64 = 1_700_000_000_000;

async fn submit_assigns_time_ordered_ids_and_persists(db: Db) {
    let store = db.open(fixed_clock(T0).0).await;
    let a = store.submit_traced(spec("a", "q"), None).await.unwrap();
    let b = store
        .submit_traced(spec("b", "q"), Some("00-trace".into()))
        .await
        .unwrap();
    assert_eq!(a.id, "00017000000000000000");
    assert_eq!(b.id, "00017000000000000001");
    assert_eq!((a.state, a.history.len()), (JobState::Queued, 1));
    drop(store);
    let store = db.open(fixed_clock(T0).0).await;
    assert_eq!(store.get(&a.id).await.unwrap(), a);
    let b2 = store.get(&b.id).await.unwrap();
    assert_eq!(b2.traceparent.as_deref(), Some("00-trace"));
    // A restart with the clock where it was does not reuse an id.
    let c = store.submit_traced(spec("c", "q"), None).await.unwrap();
    assert!(c.id > b.id, "{} after {}", c.id, b.id);
}

async fn invalid_specs_write_nothing_and_unknown_ids_are_not_found(db: Db) {
    let store = db.open(fixed_clock(T0).0).await;
    let err = store
        .submit_traced(spec("-bad", "q"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Job(_)), "{err}");
    let (page, next) = store.list(&ListFilter::default()).await.unwrap();
    assert!(page.is_empty() && next.is_none());
    let err = store.get("nope").await.unwrap_err();
    assert_eq!(err.to_string(), "no job with id 'nope'");
    let err = store
        .transition("00017000000000000000", JobState::Cancelled, "x")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");
    let bad = ListFilter {
        page_token: "xyz".into(),
        ..Default::default()
    };
    assert!(matches!(
        store.list(&bad).await,
        Err(StoreError::InvalidPageToken(_))
    ));
}

fn owned(name: &str, tenant: &str) -> JobSpec {
    let mut s = spec(name, "q");
    s.owner = Some(crate::job::Owner {
        principal: format!("{tenant}-user"),
        tenant: tenant.into(),
    });
    s
}

async fn idempotency_keys_are_each_tenants_own(db: Db) {
    let store = db.open(fixed_clock(T0).0).await;
    let mut s = spec("a", "q");
    s.idempotency_key = Some("k1".into());
    let first = store.submit_traced(s.clone(), None).await.unwrap();
    let again = store.submit_traced(s.clone(), None).await.unwrap();
    assert_eq!(first, again);
    s.name = "other".into();
    let err = store.submit_traced(s, None).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::IdempotencyConflict { existing, .. } if *existing == first.id),
        "{err}"
    );
    // One key in two tenants is two jobs; a key without a tenant is a third.
    let mut a = owned("same", "a");
    a.idempotency_key = Some("k".into());
    let mut b = owned("same", "b");
    b.idempotency_key = Some("k".into());
    let ja = store.submit_traced(a.clone(), None).await.unwrap();
    let jb = store.submit_traced(b, None).await.unwrap();
    assert_ne!(ja.id, jb.id);
    assert_eq!(store.submit_traced(a, None).await.unwrap().id, ja.id);
    let names = |tenant: Option<&str>| ListFilter {
        tenant: tenant.map(str::to_owned),
        ..Default::default()
    };
    let (page, _) = store.list(&names(Some("a"))).await.unwrap();
    assert_eq!(page, std::slice::from_ref(&ja));
    let (page, _) = store.list(&names(None)).await.unwrap();
    assert_eq!(page.len(), 3);
}

async fn list_filters_and_pages_both_ways(db: Db) {
    let store = db.open(fixed_clock(T0).0).await;
    let mut ids = Vec::new();
    for i in 0..10 {
        let mut s = spec(&format!("j{i}"), if i % 2 == 0 { "even" } else { "odd" });
        s.labels
            .insert("team".into(), if i < 5 { "a" } else { "b" }.into());
        // A NUL in a label (PostgreSQL text cannot hold one) still lists and filters exactly.
        s.labels.insert("odd\0key".into(), format!("v\0{}", i % 3));
        ids.push(store.submit_traced(s, None).await.unwrap().id);
    }
    store
        .transition(&ids[0], JobState::Cancelled, "by user")
        .await
        .unwrap();
    for (newest_first, size) in [(false, 3), (true, 4)] {
        let mut seen = Vec::new();
        let mut filter = ListFilter {
            page_size: size,
            newest_first,
            ..Default::default()
        };
        loop {
            let (page, next) = store.list(&filter).await.unwrap();
            assert!(page.len() <= size);
            seen.extend(page.into_iter().map(|r| r.id));
            match next {
                Some(t) => filter.page_token = t,
                None => break,
            }
        }
        let mut want = ids.clone();
        if newest_first {
            want.reverse();
        }
        assert_eq!(seen, want);
    }
    let filter = ListFilter {
        queue: Some("even".into()),
        newest_first: true,
        page_size: 2,
        ..Default::default()
    };
    let (page, next) = store.list(&filter).await.unwrap();
    let names: Vec<_> = page.iter().map(|r| r.spec.name.as_str()).collect();
    assert_eq!(names, ["j8", "j6"]);
    assert!(next.is_some());
    let filter = ListFilter {
        queue: Some("even".into()),
        labels: [("team".to_string(), "a".to_string())].into(),
        states: [JobState::Queued].into(),
        ..Default::default()
    };
    let (page, next) = store.list(&filter).await.unwrap();
    let names: Vec<_> = page.iter().map(|r| r.spec.name.as_str()).collect();
    assert_eq!(names, ["j2", "j4"]);
    assert!(next.is_none());
    let filter = ListFilter {
        labels: [("odd\0key".to_string(), "v\x001".to_string())].into(),
        ..Default::default()
    };
    let (page, _) = store.list(&filter).await.unwrap();
    let names: Vec<_> = page.iter().map(|r| r.spec.name.as_str()).collect();
    assert_eq!(names, ["j1", "j4", "j7"]);
    let filter = ListFilter {
        states: [JobState::Cancelled, JobState::Succeeded].into(),
        ..Default::default()
    };
    let (page, _) = store.list(&filter).await.unwrap();
    assert_eq!(page.iter().map(|r| &r.id).collect::<Vec<_>>(), [&ids[0]]);
}

async fn pages_are_bounded_by_bytes(db: Db) {
    let store = db.open(fixed_clock(T0).0).await;
    let mut ids = Vec::new();
    for i in 0..40 {
        let mut s = spec(&format!("j{i}"), "q");
        s.labels = (0..60)
            .map(|l| (format!("l{l:02}"), "x".repeat(996)))
            .collect();
        ids.push(store.submit_traced(s, None).await.unwrap().id);
    }
    let mut filter = ListFilter::default();
    let mut seen = Vec::new();
    loop {
        let (page, next) = store.list(&filter).await.unwrap();
        let bytes: usize = page.iter().map(JobRecord::wire_bytes).sum();
        assert!(bytes <= MAX_PAGE_BYTES, "{bytes}");
        assert!(!page.is_empty() && page.len() < 40, "{}", page.len());
        seen.extend(page.into_iter().map(|r| r.id));
        match next {
            Some(t) => filter.page_token = t,
            None => break,
        }
    }
    assert_eq!(seen, ids);
}

async fn updates_go_through_the_lifecycle_and_tell_the_observer(db: Db) {
    use JobState::*;
    let (clock, t) = fixed_clock(1_000);
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let store = db.open(clock).await.with_observer({
        let seen = seen.clone();
        Arc::new(move |r: &JobRecord| seen.lock().push(r.state))
    });
    let id = store.submit_traced(spec("a", "q"), None).await.unwrap().id;
    store.transition(&id, Admitted, "admitted").await.unwrap();
    t.store(2_000, Ordering::SeqCst);
    let rec = store.transition(&id, Running, "started").await.unwrap();
    assert_eq!((rec.attempt, rec.started_ms), (1, Some(2_000)));
    let rec = store
        .update(&id, |_| {
            Ok(Change {
                exit_code: Some(3),
                failure: Some(FailureKind::Application),
                retry_at_ms: Some(99),
                ..Change::to(RetryWait, "exit 3")
            })
        })
        .await
        .unwrap();
    assert_eq!((rec.app_failures, rec.infra_failures), (1, 0));
    assert_eq!(rec.retry_at_ms, Some(99));
    let rec = store.transition(&id, Queued, "retry").await.unwrap();
    assert_eq!(rec.retry_at_ms, None);
    store.transition(&id, Admitted, "").await.unwrap();
    store.transition(&id, Running, "").await.unwrap();
    t.store(3_000, Ordering::SeqCst);
    let rec = store
        .update(&id, |_| {
            Ok(Change {
                exit_code: Some(0),
                ..Change::to(Succeeded, "exit 0")
            })
        })
        .await
        .unwrap();
    assert_eq!(
        (rec.finished_ms, rec.exit_code, rec.attempt),
        (Some(3_000), Some(0), 2)
    );
    let states: Vec<_> = rec.history.iter().map(|h| h.state).collect();
    assert_eq!(
        states,
        [
            Queued, Admitted, Running, RetryWait, Queued, Admitted, Running, Succeeded
        ]
    );
    assert_eq!(store.get(&id).await.unwrap(), rec);
    // Terminal is final, and an illegal edge writes nothing and tells no one.
    let err = store.transition(&id, Running, "again").await.unwrap_err();
    assert_eq!(err.to_string(), "job cannot go from SUCCEEDED to RUNNING");
    assert_eq!(store.get(&id).await.unwrap(), rec);
    assert_eq!(*seen.lock(), states);
}

async fn concurrent_submits_and_updates_lose_nothing(db: Db) {
    let store = Arc::new(db.open(fixed_clock(T0).0).await);
    let mut tasks = Vec::new();
    for i in 0..40 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = spec(&format!("j{i}"), "q");
            if i >= 30 {
                s.name = "same".into();
                s.idempotency_key = Some("once".into());
            }
            store.submit_traced(s, None).await.unwrap().id
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    let once: BTreeSet<_> = ids[30..].iter().cloned().collect();
    assert_eq!(once.len(), 1, "one job for one idempotency key");
    let all: BTreeSet<_> = ids.iter().cloned().collect();
    assert_eq!(all.len(), 31);
    let (page, next) = store.list(&ListFilter::default()).await.unwrap();
    assert!(next.is_none());
    let listed: Vec<_> = page.into_iter().map(|r| r.id).collect();
    assert_eq!(listed, all.iter().cloned().collect::<Vec<_>>());

    // Racing writers of one job: exactly one moves it from QUEUED to ADMITTED.
    let id = ids[0].clone();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (store, id) = (store.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            store.transition(&id, JobState::Admitted, "race").await
        }));
    }
    let mut won = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => won += 1,
            Err(e) => assert_eq!(e.to_string(), "job cannot go from ADMITTED to ADMITTED"),
        }
    }
    assert_eq!(won, 1);
    assert_eq!(store.get(&id).await.unwrap().history.len(), 2);
}

async fn finished_jobs_expire_after_their_ttl(db: Db) {
    use JobState::*;
    let (clock, t) = fixed_clock(1_000_000);
    let store = db.open(clock.clone()).await;
    let with_ttl = |name: &str, ttl: Option<u64>, key: Option<&str>| {
        let mut s = spec(name, "q");
        s.ttl_seconds_after_finished = ttl;
        s.idempotency_key = key.map(str::to_owned);
        s
    };
    let short = store
        .submit_traced(with_ttl("short", Some(10), Some("k")), None)
        .await
        .unwrap()
        .id;
    let long = store
        .submit_traced(with_ttl("long", Some(60), None), None)
        .await
        .unwrap()
        .id;
    let forever = store
        .submit_traced(with_ttl("forever", None, None), None)
        .await
        .unwrap()
        .id;
    let live = store
        .submit_traced(with_ttl("live", Some(1), None), None)
        .await
        .unwrap()
        .id;
    assert_eq!(store.next_expiry_ms(), Some(0), "unknown before a sweep");
    let none = store.delete_expired(1_000_000, 10).await.unwrap();
    assert_eq!(none, Expired::default());

    t.store(2_000_000, Ordering::SeqCst);
    for id in [&short, &long, &forever] {
        store.transition(id, Cancelled, "by user").await.unwrap();
    }
    assert_eq!(store.next_expiry_ms(), Some(2_010_000));
    let r = store.delete_expired(2_009_999, 10).await.unwrap();
    assert!(r.deleted.is_empty());
    assert_eq!(r.next_ms, Some(2_010_000));
    let r = store.delete_expired(2_010_000, 10).await.unwrap();
    assert_eq!(r.deleted, std::slice::from_ref(&short));
    assert_eq!(r.next_ms, Some(2_060_000));
    assert!(matches!(
        store.get(&short).await,
        Err(StoreError::NotFound(_))
    ));
    let again = store
        .submit_traced(with_ttl("short", Some(10), Some("k")), None)
        .await
        .unwrap();
    assert_ne!(again.id, short, "the key is free again: a new job");
    drop(store);

    // After a restart the sweep reads what is due from the store.
    let store = db.open(clock).await;
    let r = store.delete_expired(10_000_000, 10).await.unwrap();
    assert_eq!(r.deleted, std::slice::from_ref(&long));
    assert_eq!(r.next_ms, None);
    assert_eq!(store.get(&forever).await.unwrap().state, Cancelled);
    assert_eq!(store.get(&live).await.unwrap().state, Queued);

    // At most `limit` at a time, in expiry order, saying more are due.
    let mut ids = Vec::new();
    for i in 0..5 {
        let id = store
            .submit_traced(with_ttl(&format!("j{i}"), Some(0), None), None)
            .await
            .unwrap()
            .id;
        t.store(20_000_000 + i, Ordering::SeqCst);
        store.transition(&id, Cancelled, "").await.unwrap();
        ids.push(id);
    }
    let r = store.delete_expired(30_000_000, 2).await.unwrap();
    assert_eq!(r.deleted, ids[..2]);
    assert_eq!(
        r.next_ms,
        Some(20_000_002),
        "already due: the caller goes on"
    );
    let r = store.delete_expired(30_000_000, 10).await.unwrap();
    assert_eq!(r.deleted, ids[2..]);
    assert_eq!(r.next_ms, None);
}

async fn recover_requeues_admitted_and_running_jobs(db: Db) {
    use JobState::*;
    let (queued, admitted, running, done);
    {
        let store = db.open(fixed_clock(T0).0).await;
        queued = store.submit_traced(spec("q", "q"), None).await.unwrap().id;
        admitted = store.submit_traced(spec("a", "q"), None).await.unwrap().id;
        running = store.submit_traced(spec("r", "q"), None).await.unwrap().id;
        done = store.submit_traced(spec("d", "q"), None).await.unwrap().id;
        store.transition(&admitted, Admitted, "").await.unwrap();
        for s in [Admitted, Running] {
            store.transition(&running, s, "").await.unwrap();
        }
        store.transition(&done, Cancelled, "").await.unwrap();
    }
    let store = db.open(fixed_clock(T0 + 5).0).await;
    // An executor that adopts keeps RUNNING jobs running.
    let live = store.recover_adopting().await.unwrap();
    let states: Vec<_> = live.iter().map(|r| (r.id.clone(), r.state)).collect();
    assert_eq!(
        states,
        [
            (queued.clone(), Queued),
            (admitted.clone(), Queued),
            (running.clone(), Running)
        ]
    );
    let live = store.recover().await.unwrap();
    let ids: Vec<_> = live.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids, [queued.clone(), admitted.clone(), running.clone()]);
    assert!(live.iter().all(|r| r.state == Queued));
    let r = store.get(&running).await.unwrap();
    assert_eq!(r.reason, "coordinator restarted; attempt 2");
    let states: Vec<_> = r.history.iter().map(|h| h.state).collect();
    assert_eq!(states, [Queued, Admitted, Running, RetryWait, Queued]);
    assert_eq!((r.app_failures, r.infra_failures), (0, 0));
    assert_eq!(store.get(&done).await.unwrap().state, Cancelled);
    let new = store.submit_traced(spec("n", "q"), None).await.unwrap().id;
    assert!(new > done);
}

async fn pauses_are_marked_without_a_change_of_state_and_closed_by_one(db: Db) {
    use JobState::*;
    let (clock, t) = fixed_clock(1_000);
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let store = db.open(clock).await.with_observer({
        let seen = seen.clone();
        Arc::new(move |r: &JobRecord| seen.lock().push(r.state))
    });
    let id = store.submit_traced(spec("a", "q"), None).await.unwrap().id;
    // Only a running job is paused.
    assert_eq!(
        store
            .mark_paused(&id, Some("at risk".into()), None)
            .await
            .unwrap(),
        None
    );
    store.transition(&id, Admitted, "admitted").await.unwrap();
    store.transition(&id, Running, "started").await.unwrap();

    t.store(2_000, Ordering::SeqCst);
    let rec = store
        .mark_paused(&id, Some("model m: at risk".into()), None)
        .await
        .unwrap()
        .expect("paused");
    assert_eq!(rec.state, Running);
    assert_eq!(rec.pauses.since_ms, Some(2_000));
    assert_eq!(
        (rec.pauses.reason.as_str(), rec.pauses.count),
        ("model m: at risk", 1)
    );
    assert_eq!(
        rec.pauses.total_ms(2_500),
        500,
        "an open pause counts up to now"
    );
    // Paused again while paused: nothing to write.
    assert_eq!(
        store
            .mark_paused(&id, Some("again".into()), None)
            .await
            .unwrap(),
        None
    );
    // Durable as returned.
    assert_eq!(store.get(&id).await.unwrap(), rec);

    t.store(2_700, Ordering::SeqCst);
    let rec = store
        .mark_paused(&id, None, None)
        .await
        .unwrap()
        .expect("resumed");
    assert_eq!(rec.pauses.since_ms, None);
    assert_eq!((rec.pauses.paused_ms, rec.pauses.count), (700, 1));
    assert!(rec.pauses.reason.is_empty());
    assert_eq!(store.mark_paused(&id, None, None).await.unwrap(), None);

    // A job placed elsewhere than the marker says is left alone.
    let elsewhere = crate::store::Placement {
        node: "other".into(),
        incarnation: "i".into(),
        epoch: 1,
        seq: 1,
    };
    assert_eq!(
        store
            .mark_paused(&id, Some("x".into()), Some(elsewhere))
            .await
            .unwrap(),
        None
    );

    // Paused again, then the job ends: its end closes the pause.
    t.store(3_000, Ordering::SeqCst);
    store
        .mark_paused(&id, Some("again".into()), None)
        .await
        .unwrap()
        .expect("paused");
    t.store(3_400, Ordering::SeqCst);
    let rec = store.transition(&id, Cancelled, "cancelled").await.unwrap();
    assert_eq!(rec.pauses.since_ms, None);
    assert_eq!((rec.pauses.paused_ms, rec.pauses.count), (1_100, 2));
    assert_eq!(store.get(&id).await.unwrap(), rec);
    // No history entry for a pause, and the observer saw state changes only.
    let states: Vec<_> = rec.history.iter().map(|h| h.state).collect();
    assert_eq!(states, [Queued, Admitted, Running, Cancelled]);
    assert_eq!(*seen.lock(), states);
}
