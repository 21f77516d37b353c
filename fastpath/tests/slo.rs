//! A model with a latency objective, end to end through the worker: background requests are held
//! to the controller's limit and go behind online ones; an objective that online work alone
//! breaks drives background work to zero, and the statistics say why. (The controller's rules
//! themselves are tested on a simulated clock in `src/slo.rs`.)

use std::sync::Arc;
use std::time::Duration;

use veraltheim_fastpath::{ExecutionPool, InferOutput, ModelWorker, Request, WorkerOptions};
use veraltheim_models::{Model, Tensor, builtin};

/// The built-in `cost` model sleeping `base_us` + `per_item_us` per row, with `extra` parameters.
fn cost(base_us: u64, per_item_us: u64, extra: &str) -> Arc<dyn Model> {
    let config = builtin::config("cost")
        .unwrap()
        .with_override(&format!(
            r#"{{"parameters":{{"base_us":{{"string_value":"{base_us}"}},"per_item_us":{{"string_value":"{per_item_us}"}},"busy":{{"string_value":"sleep"}}{extra}}}}}"#
        ))
        .unwrap();
    builtin::instantiate(config).unwrap()
}

fn slo(ms: u64, max_in_flight: u64) -> String {
    format!(
        r#","latency_slo_p99_ms":{{"string_value":"{ms}"}},"background_max_in_flight":{{"string_value":"{max_in_flight}"}}"#
    )
}

fn request(background: bool) -> Request {
    let mut r = Request::new(
        vec![Tensor::from_f32("INPUT0", vec![1, 1], &[1.0]).unwrap()],
        1,
    );
    r.background = background;
    r
}

async fn answer(
    rx: tokio::sync::oneshot::Receiver<Result<InferOutput, veraltheim_fastpath::InferError>>,
) -> InferOutput {
    tokio::time::timeout(Duration::from_secs(30), rx)
        .await
        .expect("an answer within 30 s")
        .unwrap()
        .unwrap()
}

/// Submits `n` background requests at once and returns the batch size each ran in.
async fn background_batches(worker: &ModelWorker, n: usize) -> Vec<usize> {
    let rxs: Vec<_> = (0..n)
        .map(|_| worker.submit(request(true)).unwrap())
        .collect();
    let mut sizes = Vec::new();
    for rx in rxs {
        sizes.push(answer(rx).await.batch_size);
    }
    sizes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_requests_are_held_to_the_limit() {
    let pool = ExecutionPool::new(2).unwrap();
    // The largest limit is 1: however many wait, one background request runs at a time.
    let held = ModelWorker::start(
        cost(2_000, 0, &slo(1_000, 1)),
        pool.clone(),
        &WorkerOptions::default(),
    );
    let sizes = background_batches(&held, 20).await;
    assert!(sizes.iter().all(|&s| s == 1), "{sizes:?}");
    let o = held.slo().expect("the model has an objective");
    assert_eq!((o.limit, o.max_limit, o.in_flight), (1, 1, 0));

    // The same model without an objective batches them (strict priority only).
    let free = ModelWorker::start(cost(2_000, 0, ""), pool, &WorkerOptions::default());
    let sizes = background_batches(&free, 20).await;
    assert!(sizes.iter().any(|&s| s > 1), "{sizes:?}");
    assert!(free.slo().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_online_request_waits_for_at_most_the_batch_already_running() {
    let pool = ExecutionPool::new(2).unwrap();
    for objective in [true, false] {
        // One request per batch, 50 ms each; ten background requests are queued before one
        // online request.
        let extra = if objective {
            slo(10_000, 4)
        } else {
            String::new()
        };
        let config = builtin::config("cost")
            .unwrap()
            .with_override(&format!(
                r#"{{"max_batch_size":1,"parameters":{{"base_us":{{"string_value":"50000"}},"per_item_us":{{"string_value":"0"}},"busy":{{"string_value":"sleep"}}{extra}}}}}"#
            ))
            .unwrap();
        let model = builtin::instantiate(config).unwrap();
        let worker = ModelWorker::start(model, pool.clone(), &WorkerOptions::default());
        let background: Vec<_> = (0..10)
            .map(|_| worker.submit(request(true)).unwrap())
            .collect();
        tokio::time::sleep(Duration::from_millis(5)).await;
        answer(worker.submit(request(false)).unwrap()).await;
        // Batches finish 50 ms apart: read at once, this is the online request's own batch.
        let executed = worker.stats().execution_count;
        if objective {
            // Only the background batch already running went first.
            assert_eq!(executed, 2);
        } else {
            // Without an objective the model has one level: the online request waits its turn.
            assert_eq!(executed, 11);
        }
        for rx in background {
            answer(rx).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_objective_online_work_alone_breaks_stops_background_work_and_says_why() {
    let pool = ExecutionPool::new(2).unwrap();
    // Every request takes 20 ms; the objective is 5 ms: nothing background work does can help.
    let worker = Arc::new(ModelWorker::start(
        cost(20_000, 0, &slo(5, 8)),
        pool,
        &WorkerOptions::default(),
    ));
    let background: Vec<_> = (0..50)
        .map(|_| worker.submit(request(true)).unwrap())
        .collect();
    let mut reason = String::new();
    for _ in 0..300 {
        answer(worker.submit(request(false)).unwrap()).await;
        let o = worker.slo().unwrap();
        if o.limit == 0 && o.in_flight == 0 && o.reason.contains("cannot be met") {
            assert!(o.at_risk);
            assert!(o.shrinks >= 1);
            reason = o.reason;
            break;
        }
    }
    assert!(reason.contains("above the objective 5.0 ms"), "{reason:?}");
    // Background work now waits: the requests left queued are not run while online work goes on.
    let before = worker.stats().inference_count;
    for _ in 0..5 {
        answer(worker.submit(request(false)).unwrap()).await;
    }
    assert_eq!(worker.stats().inference_count, before + 5);
    assert!(worker.slo().unwrap().limit == 0);
    drop(background);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_rows_per_batch_follow_their_measured_time_online_batch_or_not() {
    let pool = ExecutionPool::new(2).unwrap();
    // 2 ms per row, at most `batch_ms` of rows per batch holding background rows; online
    // batches filled with them.
    let model = |batch_ms: u64| {
        let extra = format!(
            r#"{},"background_batch_ms":{{"string_value":"{batch_ms}"}},"background_step":{{"string_value":"4"}},"background_fill":{{"string_value":"true"}}"#,
            slo(1_000, 64)
        );
        ModelWorker::start(
            cost(0, 2_000, &extra),
            pool.clone(),
            &WorkerOptions::default(),
        )
    };
    // 10 ms of background rows per batch allow at most 5 rows.
    let bounded = model(10);
    // The limit grows by 4 every 100 ms (`background_step`) while nothing online runs.
    let sizes = background_batches(&bounded, 200).await;
    assert!(sizes.iter().all(|&s| s <= 5), "{sizes:?}");
    assert!(
        sizes.iter().any(|&s| s >= 3),
        "the limit never grew: {sizes:?}"
    );
    let o = bounded.slo().unwrap();
    assert!(o.batch_rows.is_some_and(|r| (1..=5).contains(&r)), "{o:?}");
    assert!(o.limit <= 5, "{o:?}");

    // With a whole second per batch, the same load grows past 5 rows per batch.
    let loose = model(1000);
    let sizes = background_batches(&loose, 200).await;
    assert!(sizes.iter().any(|&s| s > 5), "{sizes:?}");

    // An online request that arrives while background work waits runs in a batch filled with
    // background rows, its own row counted against the same bound.
    let waiting: Vec<_> = (0..40)
        .map(|_| bounded.submit(request(true)).unwrap())
        .collect();
    tokio::time::sleep(Duration::from_millis(5)).await;
    for _ in 0..3 {
        let online = answer(bounded.submit(request(false)).unwrap()).await;
        assert!((1..=5).contains(&online.batch_size), "{online:?}");
    }
    for rx in waiting {
        assert!(answer(rx).await.batch_size <= 5);
    }
}
