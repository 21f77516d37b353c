//! The worker against real built-in models on a real execution pool.

use std::sync::Arc;
use std::time::Duration;

use veraltheim_fastpath::{ExecutionPool, InferError, ModelWorker, Request, WorkerOptions};
use veraltheim_models::{Model, Tensor, builtin};

fn cost(base_us: u64, per_item_us: u64, extra: &str) -> Arc<dyn Model> {
    let over = format!(
        r#"{{"parameters":{{"base_us":{{"string_value":"{base_us}"}},"per_item_us":{{"string_value":"{per_item_us}"}}}}{extra}}}"#
    );
    builtin::instantiate(
        builtin::config("cost")
            .unwrap()
            .with_override(&over)
            .unwrap(),
    )
    .unwrap()
}

fn row(v: f32) -> Request {
    Request::new(
        vec![Tensor::from_f32("INPUT0", vec![1, 2], &[v, 1.0]).unwrap()],
        1,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_form_batches_and_get_their_own_rows() {
    let pool = ExecutionPool::new(2).unwrap();
    let worker = ModelWorker::start(cost(20_000, 0, ""), pool, &WorkerOptions::default());
    let receivers: Vec<_> = (0..40)
        .map(|i| worker.submit(row(i as f32)).unwrap())
        .collect();
    for (i, rx) in receivers.into_iter().enumerate() {
        let out = rx.await.unwrap().unwrap();
        assert_eq!(out.outputs[0].f32_values().unwrap(), vec![i as f32 + 1.0]);
    }
    let stats = worker.stats();
    assert_eq!(stats.inference_count, 40);
    assert_eq!(stats.success.count, 40);
    // 40 requests queued behind a 20 ms batch cannot all have run alone.
    assert!(stats.execution_count < 40, "{stats:?}");
    assert_eq!(stats.pending, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_expires_in_the_queue_while_the_model_is_busy() {
    let pool = ExecutionPool::new(2).unwrap();
    let worker = ModelWorker::start(cost(300_000, 0, ""), pool, &WorkerOptions::default());
    let busy = worker.submit(row(1.0)).unwrap();
    // Let the first batch start, so the second request has to wait behind it.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut late = row(2.0);
    late.timeout = Some(Duration::from_millis(10));
    let late = worker.submit(late).unwrap();
    let err = late.await.unwrap().unwrap_err();
    assert!(matches!(err, InferError::DeadlineExceeded { .. }), "{err}");
    assert!(busy.await.unwrap().is_ok());
    let stats = worker.stats();
    assert_eq!(
        stats.inference_count, 1,
        "the expired request must not be computed"
    );
    assert_eq!(stats.expired, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_at_once() {
    let pool = ExecutionPool::new(1).unwrap();
    let model = cost(
        200_000,
        0,
        // Batches of one: the batcher, running meanwhile on the other runtime thread, takes at
        // most one request off the queue (freeing its slot) before the 200 ms batch holds the
        // only instance. With larger batches it could take several and admit as many more.
        r#","max_batch_size":1,"dynamic_batching":{"default_queue_policy":{"max_queue_size":4}}"#,
    );
    let worker = ModelWorker::start(model, pool, &WorkerOptions::default());
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..20 {
        match worker.submit(row(i as f32)) {
            Ok(rx) => accepted.push(rx),
            Err(InferError::QueueFull { capacity, .. }) => {
                assert_eq!(capacity, 4);
                refused += 1;
            }
            Err(other) => panic!("unexpected {other}"),
        }
    }
    // At most the bound plus what the batcher already handed to the pool got in.
    assert!(accepted.len() <= 4 + 1, "accepted {}", accepted.len());
    assert!(refused >= 15);
    assert_eq!(worker.stats().rejected, refused);
    for rx in accepted {
        assert!(rx.await.unwrap().is_ok());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_backend_fails_only_its_batch() {
    let pool = ExecutionPool::new(2).unwrap();
    let fault = ModelWorker::start(
        builtin::instantiate(builtin::config("fault").unwrap()).unwrap(),
        pool.clone(),
        &WorkerOptions::default(),
    );
    let identity = ModelWorker::start(
        builtin::instantiate(builtin::config("identity").unwrap()).unwrap(),
        pool,
        &WorkerOptions::default(),
    );
    for _ in 0..3 {
        let err = fault.submit(row(1.0)).unwrap().await.unwrap().unwrap_err();
        match err {
            InferError::Panicked { message, .. } => assert!(message.contains("injected panic")),
            other => panic!("unexpected {other}"),
        }
        let ok = identity.submit(row(5.0)).unwrap().await.unwrap().unwrap();
        assert_eq!(ok.outputs[0].f32_values().unwrap(), vec![5.0, 1.0]);
    }
    assert_eq!(fault.stats().fail.count, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_request_is_never_computed() {
    let pool = ExecutionPool::new(1).unwrap();
    let worker = ModelWorker::start(cost(200_000, 0, ""), pool, &WorkerOptions::default());
    let first = worker.submit(row(1.0)).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(worker.submit(row(2.0)).unwrap());
    assert!(first.await.unwrap().is_ok());
    let after = worker.submit(row(3.0)).unwrap().await.unwrap().unwrap();
    assert_eq!(after.batch_size, 1);
    let stats = worker.stats();
    assert_eq!(stats.cancelled, 1);
    assert_eq!(stats.inference_count, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_finishes_queued_work_then_refuses() {
    let pool = ExecutionPool::new(1).unwrap();
    let worker = ModelWorker::start(cost(10_000, 0, ""), pool, &WorkerOptions::default());
    let queued: Vec<_> = (0..5)
        .map(|i| worker.submit(row(i as f32)).unwrap())
        .collect();
    worker.stop(Duration::from_secs(30)).await;
    for rx in queued {
        assert!(rx.await.unwrap().is_ok());
    }
    assert!(matches!(
        worker.submit(row(0.0)),
        Err(InferError::Unavailable { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_after_grace_fails_what_is_left() {
    let pool = ExecutionPool::new(1).unwrap();
    let worker = ModelWorker::start(
        cost(
            200_000,
            0,
            r#","dynamic_batching":{"max_queue_delay_microseconds":0}, "max_batch_size": 1"#,
        ),
        pool,
        &WorkerOptions::default(),
    );
    let queued: Vec<_> = (0..4)
        .map(|i| worker.submit(row(i as f32)).unwrap())
        .collect();
    worker.stop(Duration::from_millis(50)).await;
    let mut unavailable = 0;
    for rx in queued {
        if let Err(InferError::Unavailable { .. }) = rx.await.unwrap() {
            unavailable += 1;
        }
    }
    assert!(unavailable >= 2, "{unavailable}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_ends_with_the_backend_panic_and_queued_work_survives_it() {
    let pool = ExecutionPool::new(1).unwrap();
    let fault = Arc::new(ModelWorker::new(
        builtin::instantiate(builtin::config("fault").unwrap()).unwrap(),
        pool,
        &WorkerOptions::default(),
    ));
    let first = fault.submit(row(1.0)).unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let failure = fault.run(&cancel).await.unwrap_err();
    assert!(failure.0.contains("injected panic"), "{failure}");
    assert!(matches!(
        first.await.unwrap(),
        Err(InferError::Panicked { .. })
    ));

    // Nobody runs the loop now: stop must still answer what is queued, not leave it hanging.
    let queued = fault.submit(row(2.0)).unwrap();
    fault.stop(Duration::from_millis(20)).await;
    assert!(matches!(
        queued.await.unwrap(),
        Err(InferError::Unavailable { .. })
    ));
    assert!(fault.is_finished());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_run_returns_and_a_new_run_serves_the_queue() {
    let pool = ExecutionPool::new(1).unwrap();
    let worker = Arc::new(ModelWorker::new(
        cost(1_000, 0, ""),
        pool,
        &WorkerOptions::default(),
    ));
    let cancel = tokio_util::sync::CancellationToken::new();
    cancel.cancel();
    assert!(worker.run(&cancel).await.is_ok());
    let rx = worker.submit(row(4.0)).unwrap();
    let runner = {
        let worker = worker.clone();
        tokio::spawn(async move {
            worker
                .run(&tokio_util::sync::CancellationToken::new())
                .await
        })
    };
    assert_eq!(
        rx.await.unwrap().unwrap().outputs[0].f32_values().unwrap(),
        vec![5.0]
    );
    worker.stop(Duration::from_secs(10)).await;
    assert!(runner.await.unwrap().is_ok());
}

/// Completes the receivers and returns their labels in the order their answers arrived.
async fn arrival_order(
    rxs: Vec<(
        &'static str,
        tokio::sync::oneshot::Receiver<Result<veraltheim_fastpath::InferOutput, InferError>>,
    )>,
) -> Vec<&'static str> {
    let mut pending: Vec<_> = rxs
        .into_iter()
        .map(|(label, rx)| Box::pin(async move { (label, rx.await) }))
        .collect();
    let mut order = Vec::new();
    while !pending.is_empty() {
        let ((label, result), _, rest) = futures::future::select_all(pending).await;
        assert!(result.unwrap().is_ok(), "{label} failed");
        order.push(label);
        pending = rest;
    }
    order
}

fn prioritised(extra_queue_policy: &str) -> Arc<dyn Model> {
    cost(
        80_000,
        0,
        &format!(
            r#","max_batch_size":1,"dynamic_batching":{{"priority_levels":2,"default_priority_level":2{extra_queue_policy}}}"#
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_higher_priority_request_overtakes_queued_lower_ones() {
    let worker = ModelWorker::start(
        prioritised(""),
        ExecutionPool::new(1).unwrap(),
        &WorkerOptions::default(),
    );
    let busy = worker.submit(row(0.0)).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let low = worker.submit(row(1.0)).unwrap();
    let mut urgent = row(2.0);
    urgent.priority = 1;
    let high = worker.submit(urgent).unwrap();
    let order = arrival_order(vec![("busy", busy), ("low", low), ("high", high)]).await;
    assert_eq!(order, ["busy", "high", "low"]);
    let mut bad = row(3.0);
    bad.priority = 3;
    assert!(matches!(
        worker.submit(bad),
        Err(InferError::InvalidRequest { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_timeout_demotes_instead_of_refusing() {
    let model = prioritised(
        r#","default_queue_policy":{"timeout_action":"DELAY","default_timeout_microseconds":10000,"allow_timeout_override":true}"#,
    );
    let worker = ModelWorker::start(
        model,
        ExecutionPool::new(1).unwrap(),
        &WorkerOptions::default(),
    );
    let busy = worker.submit(row(0.0)).unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let demoted = worker.submit(row(1.0)).unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let mut patient = row(2.0);
    patient.timeout = Some(Duration::from_secs(60));
    let patient = worker.submit(patient).unwrap();
    let order = arrival_order(vec![
        ("busy", busy),
        ("demoted", demoted),
        ("patient", patient),
    ])
    .await;
    assert_eq!(order, ["busy", "patient", "demoted"]);
    let stats = worker.stats();
    assert_eq!(stats.expired, 0, "DELAY must not refuse");
    assert_eq!(stats.success.count, 3);
    assert!(stats.total_us.p50 >= stats.queue_us.p50);
    assert!(stats.compute_us.p50 > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_level_with_its_own_bound_fills_without_blocking_the_others() {
    let model = prioritised(r#","priority_queue_policy":{"2":{"max_queue_size":1}}"#);
    let worker = ModelWorker::start(
        model,
        ExecutionPool::new(1).unwrap(),
        &WorkerOptions::default(),
    );
    let busy = worker.submit(row(0.0)).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let queued_low = worker.submit(row(1.0)).unwrap();
    match worker.submit(row(2.0)) {
        Err(InferError::QueueFull { capacity, .. }) => assert_eq!(capacity, 1),
        other => panic!("expected the level-2 queue to be full, got {other:?}"),
    }
    let mut high = row(3.0);
    high.priority = 1;
    let high = worker.submit(high).unwrap();
    let order = arrival_order(vec![("busy", busy), ("low", queued_low), ("high", high)]).await;
    assert_eq!(order, ["busy", "high", "low"]);
    // the level's slot came back once its request left the queue
    assert!(worker.submit(row(4.0)).unwrap().await.unwrap().is_ok());
}

/// While the model is busy, queued batches are taken by the pool thread that finishes the one
/// before: neither a submit nor a finished batch wakes the batcher per batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_model_runs_its_queue_in_place_on_the_pool_thread() {
    let pool = ExecutionPool::new(2).unwrap();
    let model = cost(10_000, 0, r#","max_batch_size":1"#);
    let worker = ModelWorker::start(model, pool, &WorkerOptions::default());
    let first = worker.submit(row(0.0)).unwrap();
    // Let the first batch start, so the others queue behind the busy instance.
    tokio::time::sleep(Duration::from_millis(3)).await;
    let queued: Vec<_> = (1..=8)
        .map(|i| worker.submit(row(i as f32)).unwrap())
        .collect();
    assert!(first.await.unwrap().is_ok());
    for (i, rx) in queued.into_iter().enumerate() {
        let out = rx.await.unwrap().unwrap();
        assert_eq!(out.batch_size, 1);
        assert_eq!(out.outputs[0].f32_values().unwrap(), vec![i as f32 + 2.0]);
    }
    let stats = worker.stats();
    assert_eq!(stats.execution_count, 9);
    // The thread that ran the first batch takes the queued ones as they fall due: one job, or a
    // few when the batcher (sending answers meanwhile) holds the list at the moment a batch
    // ends; not one hand-off to the pool per batch.
    let jobs = worker.pool_jobs();
    assert!(jobs <= 3, "{jobs} pool jobs for 9 batches");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_outlives_its_batcher_still_answers() {
    // Answers normally go back through the batcher loop; when the loop has ended (cancelled
    // here, as the supervisor does on shutdown) the pool thread must send them itself.
    let pool = ExecutionPool::new(1).unwrap();
    let worker = Arc::new(ModelWorker::new(
        cost(100_000, 0, r#","max_batch_size":1"#),
        pool,
        &WorkerOptions::default(),
    ));
    let cancel = tokio_util::sync::CancellationToken::new();
    let batcher = {
        let (worker, cancel) = (worker.clone(), cancel.clone());
        tokio::spawn(async move { worker.run(&cancel).await })
    };
    let rx = worker.submit(row(3.0)).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        worker.stats().execution_count,
        0,
        "the batch should still be running"
    );
    cancel.cancel();
    assert_eq!(batcher.await.unwrap(), Ok(()));
    let out = tokio::time::timeout(Duration::from_secs(5), rx)
        .await
        .expect("no answer after the batcher ended")
        .expect("the answer was dropped")
        .unwrap();
    assert_eq!(out.outputs[0].f32_values().unwrap(), vec![4.0]);
}
