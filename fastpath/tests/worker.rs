//! The worker against real built-in models on a real execution pool.
//!
//! Tests that depend on what runs when use a [`Gated`] backend: each batch says "I am executing"
//! on a channel and waits for the test's go-ahead, so the order of events is set by the test,
//! not by sleeps that hope the pool has got that far.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use veraltheim_fastpath::{
    ExecutionPool, InferError, ModelWorker, Request, SpanRef, WorkerOptions,
};
use veraltheim_models::{Model, ModelConfig, Tensor, TokenCount, builtin};

/// The built-in `cost` model's configuration with these parameters (a JSON object's members).
fn config(params: &str) -> ModelConfig {
    builtin::config("cost")
        .unwrap()
        .with_override(&format!(r#"{{"parameters":{{{params}}}}}"#))
        .unwrap()
}

/// The built-in `cost` model with `over` laid over its configuration.
fn cost_model(over: &str) -> Arc<dyn Model> {
    builtin::instantiate(
        builtin::config("cost")
            .unwrap()
            .with_override(over)
            .unwrap(),
    )
    .unwrap()
}

fn cost(base_us: u64, per_item_us: u64, extra: &str) -> Arc<dyn Model> {
    let over = format!(
        r#"{{"parameters":{{"base_us":{{"string_value":"{base_us}"}},"per_item_us":{{"string_value":"{per_item_us}"}}}}{extra}}}"#
    );
    cost_model(&over)
}

/// The built-in `cost` model sleeping `per_item_us` a row, with these string parameters (a
/// latency objective's, for instance).
fn cost_with(per_item_us: u64, params: &[(&str, &str)]) -> Arc<dyn Model> {
    let mut p = format!(
        r#""base_us":{{"string_value":"0"}},"per_item_us":{{"string_value":"{per_item_us}"}},"busy":{{"string_value":"sleep"}}"#
    );
    for (k, v) in params {
        p.push_str(&format!(r#","{k}":{{"string_value":"{v}"}}"#));
    }
    let over = format!(r#"{{"parameters":{{{p}}}}}"#);
    cost_model(&over)
}

fn row(v: f32) -> Request {
    Request::new(
        vec![Tensor::from_f32("INPUT0", vec![1, 2], &[v, 1.0]).unwrap()],
        1,
    )
}

/// A backend for tests that order events: each batch reports that it is executing (the first
/// value of each of its rows, which names the requests) and then waits until the test lets it
/// finish; then it computes what the wrapped model computes.
struct Gated {
    inner: Arc<dyn Model>,
    started: mpsc::UnboundedSender<Vec<f32>>,
    release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl Model for Gated {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }

    fn execute(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, veraltheim_models::Error> {
        let values = inputs[0].f32_values()?;
        let width = inputs[0].shape()[1..].iter().product::<usize>().max(1);
        let _ = self
            .started
            .send(values.chunks(width).map(|r| r[0]).collect());
        // An error means the test dropped its sender: the gate is open for good.
        let _ = self.release.lock().unwrap().recv();
        self.inner.execute(inputs)
    }
}

/// The test's side of a [`Gated`] backend.
struct Gate {
    started: mpsc::UnboundedReceiver<Vec<f32>>,
    release: Option<std::sync::mpsc::Sender<()>>,
}

impl Gate {
    /// Waits until the next batch is executing; returns the first values of its rows.
    async fn started(&mut self) -> Vec<f32> {
        tokio::time::timeout(Duration::from_secs(30), self.started.recv())
            .await
            .expect("no batch started executing within 30 s")
            .expect("the model is gone")
    }

    /// Lets one batch (the executing one, or else the next) finish.
    fn release(&self) {
        self.release
            .as_ref()
            .expect("the gate is already open")
            .send(())
            .unwrap();
    }

    /// Lets every batch, now and from now on, finish without waiting.
    fn open(&mut self) {
        self.release = None;
    }
}

fn gated(inner: Arc<dyn Model>) -> (Arc<dyn Model>, Gate) {
    let (started_tx, started) = mpsc::unbounded_channel();
    let (release, release_rx) = std::sync::mpsc::channel();
    let model = Gated {
        inner,
        started: started_tx,
        release: std::sync::Mutex::new(release_rx),
    };
    let gate = Gate {
        started,
        release: Some(release),
    };
    (Arc::new(model), gate)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_form_batches_and_get_their_own_rows() {
    let pool = ExecutionPool::new(2).unwrap();
    let (model, mut gate) = gated(cost(0, 0, ""));
    let worker = ModelWorker::start(model, pool, &WorkerOptions::default());
    let mut receivers = vec![worker.submit(row(0.0)).unwrap()];
    assert_eq!(gate.started().await, [0.0]);
    // 39 requests arrive while the first batch holds the model's only instance.
    receivers.extend((1..40).map(|i| worker.submit(row(i as f32)).unwrap()));
    gate.open();
    for (i, rx) in receivers.into_iter().enumerate() {
        let out = rx.await.unwrap().unwrap();
        assert_eq!(out.outputs[0].f32_values().unwrap(), vec![i as f32 + 1.0]);
        assert_eq!(out.batch_size, if i == 0 { 1 } else { 39 });
    }
    assert_eq!(
        gate.started().await,
        (1..40).map(|i| i as f32).collect::<Vec<_>>(),
        "the queued requests run as one batch, in order"
    );
    let stats = worker.stats();
    assert_eq!(stats.inference_count, 40);
    assert_eq!(stats.success.count, 40);
    assert_eq!(stats.execution_count, 2, "{stats:?}");
    assert_eq!(stats.pending, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_records_its_trace_only_when_it_holds_a_traced_request() {
    let pool = ExecutionPool::new(2).unwrap();
    let (model, mut gate) = gated(cost(0, 0, ""));
    let worker = ModelWorker::start(model, pool, &WorkerOptions::default());
    let span = |n: u8| SpanRef {
        trace_id: [n; 16],
        span_id: [n; 8],
    };
    let traced = |v: f32, n: u8| {
        let mut r = row(v);
        r.span = Some(span(n));
        r
    };
    // An untraced batch: nothing recorded.
    let first = worker.submit(row(0.0)).unwrap();
    assert_eq!(gate.started().await, [0.0]);
    // While it runs, two traced requests and an untraced one queue up: the next batch.
    let queued = [
        worker.submit(traced(1.0, 1)).unwrap(),
        worker.submit(row(2.0)).unwrap(),
        worker.submit(traced(3.0, 3)).unwrap(),
    ];
    gate.open();
    assert!(first.await.unwrap().unwrap().batch.is_none());
    let [one, two, three] = queued;
    let (one, two, three) = (
        one.await.unwrap().unwrap(),
        two.await.unwrap().unwrap(),
        three.await.unwrap().unwrap(),
    );
    assert!(two.batch.is_none(), "an untraced request carries no trace");
    let batch = one
        .batch
        .expect("a traced request carries its batch's trace");
    assert!(
        std::sync::Arc::ptr_eq(&batch, three.batch.as_ref().unwrap()),
        "one trace per batch"
    );
    assert_eq!(
        batch.links,
        vec![span(1), span(3)],
        "the traced requests, in order"
    );
    assert_eq!((batch.requests, batch.rows), (3, 3));
    assert!(
        batch.start <= batch.infer_start
            && batch.infer_start <= batch.infer_end
            && batch.infer_end <= batch.done
    );
    assert_eq!(batch.wall(batch.start), batch.started_at);
    // The queue wait the answer reports ends where the batch starts.
    assert!(one.queue > Duration::ZERO && one.compute == batch.done - batch.start);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_expires_in_the_queue_while_the_model_is_busy() {
    let pool = ExecutionPool::new(2).unwrap();
    let (model, mut gate) = gated(cost(0, 0, ""));
    let worker = ModelWorker::start(model, pool, &WorkerOptions::default());
    let busy = worker.submit(row(1.0)).unwrap();
    assert_eq!(gate.started().await, [1.0]);
    // The model's only instance is held: this request can only wait, and its time runs out.
    let mut late = row(2.0);
    late.timeout = Some(Duration::from_millis(10));
    let late = worker.submit(late).unwrap();
    let err = late.await.unwrap().unwrap_err();
    assert!(matches!(err, InferError::DeadlineExceeded { .. }), "{err}");
    gate.open();
    assert!(busy.await.unwrap().is_ok());
    let stats = worker.stats();
    assert_eq!(
        stats.inference_count, 1,
        "the expired request must not be computed"
    );
    assert_eq!(stats.execution_count, 1);
    assert_eq!(stats.expired, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_at_once() {
    let pool = ExecutionPool::new(1).unwrap();
    let (model, mut gate) = gated(cost(
        0,
        0,
        r#","dynamic_batching":{"default_queue_policy":{"max_queue_size":4}}"#,
    ));
    let worker = ModelWorker::start(model, pool, &WorkerOptions::default());
    let first = worker.submit(row(0.0)).unwrap();
    // Executing: it has left the queue, whose four places are all free again.
    assert_eq!(gate.started().await, [0.0]);
    let mut accepted = vec![first];
    let mut refused = 0;
    for i in 1..20 {
        match worker.submit(row(i as f32)) {
            Ok(rx) => accepted.push(rx),
            Err(InferError::QueueFull { capacity, .. }) => {
                assert_eq!(capacity, 4);
                refused += 1;
            }
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert_eq!(accepted.len(), 1 + 4, "the executing one and a full queue");
    assert_eq!(refused, 15);
    assert_eq!(worker.stats().rejected, 15);
    assert_eq!(worker.stats().pending, 4);
    gate.open();
    for (i, rx) in accepted.into_iter().enumerate() {
        let out = rx.await.unwrap().unwrap();
        assert_eq!(out.outputs[0].f32_values().unwrap(), vec![i as f32 + 1.0]);
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
    let (model, mut gate) = gated(cost(0, 0, ""));
    let worker = ModelWorker::start(model, pool, &WorkerOptions::default());
    let first = worker.submit(row(1.0)).unwrap();
    assert_eq!(gate.started().await, [1.0]);
    // Queued behind the executing batch, then abandoned by its caller.
    drop(worker.submit(row(2.0)).unwrap());
    gate.open();
    assert!(first.await.unwrap().is_ok());
    let after = worker.submit(row(3.0)).unwrap().await.unwrap().unwrap();
    assert_eq!(after.batch_size, 1);
    assert_eq!(
        gate.started().await,
        [3.0],
        "the abandoned request must never reach the backend"
    );
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
    let (model, mut gate) = gated(cost(
        0,
        0,
        r#","dynamic_batching":{"max_queue_delay_microseconds":0}, "max_batch_size": 1"#,
    ));
    let worker = ModelWorker::start(model, pool, &WorkerOptions::default());
    let queued: Vec<_> = (0..4)
        .map(|i| worker.submit(row(i as f32)).unwrap())
        .collect();
    assert_eq!(gate.started().await, [0.0]);
    // The first batch is held past the grace: the three behind it cannot run in time.
    worker.stop(Duration::from_millis(50)).await;
    gate.open();
    let mut results = Vec::new();
    for rx in queued {
        results.push(match rx.await.unwrap() {
            Ok(_) => "ok",
            Err(InferError::Unavailable { .. }) => "unavailable",
            Err(other) => panic!("unexpected {other}"),
        });
    }
    assert_eq!(
        results,
        ["ok", "unavailable", "unavailable", "unavailable"],
        "the executing batch finishes, the queued ones fail"
    );
    assert_eq!(worker.stats().inference_count, 1);
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

/// A model with two priority levels (default 2) and batches of one, behind a [`Gate`].
fn prioritised(extra_queue_policy: &str) -> (Arc<dyn Model>, Gate) {
    gated(cost(
        0,
        0,
        &format!(
            r#","max_batch_size":1,"dynamic_batching":{{"priority_levels":2,"default_priority_level":2{extra_queue_policy}}}"#
        ),
    ))
}

/// Awaits every answer and checks it is the cost model's for its row (the row's sum).
async fn all_answered(
    rxs: Vec<tokio::sync::oneshot::Receiver<Result<veraltheim_fastpath::InferOutput, InferError>>>,
    values: &[f32],
) {
    for (rx, v) in rxs.into_iter().zip(values) {
        let out = rx.await.unwrap().unwrap_or_else(|e| panic!("{v}: {e}"));
        assert_eq!(out.outputs[0].f32_values().unwrap(), vec![v + 1.0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_higher_priority_request_overtakes_queued_lower_ones() {
    let (model, mut gate) = prioritised("");
    let worker = ModelWorker::start(
        model,
        ExecutionPool::new(1).unwrap(),
        &WorkerOptions::default(),
    );
    let busy = worker.submit(row(0.0)).unwrap();
    assert_eq!(gate.started().await, [0.0]);
    let low = worker.submit(row(1.0)).unwrap();
    let mut urgent = row(2.0);
    urgent.priority = 1;
    let high = worker.submit(urgent).unwrap();
    gate.open();
    assert_eq!(
        gate.started().await,
        [2.0],
        "the high-priority one goes first"
    );
    assert_eq!(gate.started().await, [1.0]);
    all_answered(vec![busy, low, high], &[0.0, 1.0, 2.0]).await;
    let mut bad = row(3.0);
    bad.priority = 3;
    assert!(matches!(
        worker.submit(bad),
        Err(InferError::InvalidRequest { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_timeout_demotes_instead_of_refusing() {
    let (model, mut gate) = prioritised(
        r#","default_queue_policy":{"timeout_action":"DELAY","default_timeout_microseconds":10000,"allow_timeout_override":true}"#,
    );
    let worker = ModelWorker::start(
        model,
        ExecutionPool::new(1).unwrap(),
        &WorkerOptions::default(),
    );
    let busy = worker.submit(row(0.0)).unwrap();
    assert_eq!(gate.started().await, [0.0]);
    let demoted = worker.submit(row(1.0)).unwrap();
    let queued_by = tokio::time::Instant::now();
    // What is tested is the clock: once its 10 ms queue timeout has run out, the request is
    // demoted. Wait for that instant itself; the model stays held meanwhile, so nothing else
    // can happen in between.
    tokio::time::sleep_until(queued_by + Duration::from_millis(10)).await;
    let mut patient = row(2.0);
    patient.timeout = Some(Duration::from_secs(60));
    let patient = worker.submit(patient).unwrap();
    gate.open();
    assert_eq!(
        gate.started().await,
        [2.0],
        "the request within its time goes first"
    );
    assert_eq!(gate.started().await, [1.0], "the demoted one still runs");
    all_answered(vec![busy, demoted, patient], &[0.0, 1.0, 2.0]).await;
    let stats = worker.stats();
    assert_eq!(stats.expired, 0, "DELAY must not refuse");
    assert_eq!(stats.success.count, 3);
    assert!(stats.total_us.p50 >= stats.queue_us.p50);
    assert!(stats.compute_us.p50 > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_level_with_its_own_bound_fills_without_blocking_the_others() {
    let (model, mut gate) = prioritised(r#","priority_queue_policy":{"2":{"max_queue_size":1}}"#);
    let worker = ModelWorker::start(
        model,
        ExecutionPool::new(1).unwrap(),
        &WorkerOptions::default(),
    );
    let busy = worker.submit(row(0.0)).unwrap();
    // Executing: it has given its level's place back.
    assert_eq!(gate.started().await, [0.0]);
    let queued_low = worker.submit(row(1.0)).unwrap();
    match worker.submit(row(2.0)) {
        Err(InferError::QueueFull { capacity, .. }) => assert_eq!(capacity, 1),
        other => panic!("expected the level-2 queue to be full, got {other:?}"),
    }
    let mut high = row(3.0);
    high.priority = 1;
    let high = worker.submit(high).unwrap();
    gate.open();
    assert_eq!(gate.started().await, [3.0]);
    assert_eq!(gate.started().await, [1.0]);
    all_answered(vec![busy, queued_low, high], &[0.0, 1.0, 3.0]).await;
    // the level's slot came back once its request left the queue
    assert!(worker.submit(row(4.0)).unwrap().await.unwrap().is_ok());
}

/// While the model is busy, queued batches are taken by the pool thread that finishes the one
/// before: neither a submit nor a finished batch wakes the batcher per batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_model_runs_its_queue_in_place_on_the_pool_thread() {
    let pool = ExecutionPool::new(2).unwrap();
    let (model, mut gate) = gated(cost(0, 0, r#","max_batch_size":1"#));
    let worker = ModelWorker::start(model, pool, &WorkerOptions::default());
    let first = worker.submit(row(0.0)).unwrap();
    assert_eq!(gate.started().await, [0.0]);
    // The others queue behind the busy instance.
    let mut answers = vec![first];
    answers.extend((1..=8).map(|i| worker.submit(row(i as f32)).unwrap()));
    // One batch at a time: each is let go, answered, and the next one is seen executing.
    for (i, rx) in answers.into_iter().enumerate() {
        gate.release();
        let out = rx.await.unwrap().unwrap();
        assert_eq!(out.batch_size, 1);
        assert_eq!(out.outputs[0].f32_values().unwrap(), vec![i as f32 + 1.0]);
        if i < 8 {
            assert_eq!(gate.started().await, [i as f32 + 1.0]);
        }
    }
    let stats = worker.stats();
    assert_eq!(stats.execution_count, 9);
    // The thread that ran the first batch takes each queued one when it finishes the one
    // before: one job. A few more only if the batcher, woken to send the answers, held the
    // list at the very moment a batch ended; never one hand-off to the pool per batch.
    let jobs = worker.pool_jobs();
    assert!(jobs <= 3, "{jobs} pool jobs for 9 batches");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_outlives_its_batcher_still_answers() {
    // Answers normally go back through the batcher loop; when the loop has ended (cancelled
    // here, as the supervisor does on shutdown) the pool thread must send them itself.
    let pool = ExecutionPool::new(1).unwrap();
    let (model, mut gate) = gated(cost(0, 0, r#","max_batch_size":1"#));
    let worker = Arc::new(ModelWorker::new(model, pool, &WorkerOptions::default()));
    let cancel = tokio_util::sync::CancellationToken::new();
    let batcher = {
        let (worker, cancel) = (worker.clone(), cancel.clone());
        tokio::spawn(async move { worker.run(&cancel).await })
    };
    let rx = worker.submit(row(3.0)).unwrap();
    assert_eq!(gate.started().await, [3.0]);
    assert_eq!(
        worker.stats().execution_count,
        0,
        "the batch is held executing"
    );
    cancel.cancel();
    assert_eq!(batcher.await.unwrap(), Ok(()));
    gate.open();
    let out = tokio::time::timeout(Duration::from_secs(30), rx)
        .await
        .expect("no answer after the batcher ended")
        .expect("the answer was dropped")
        .unwrap();
    assert_eq!(out.outputs[0].f32_values().unwrap(), vec![4.0]);
}

/// A backend that refuses, before queuing, requests whose first value is negative.
struct Picky(Arc<dyn Model>);

impl Model for Picky {
    fn config(&self) -> &ModelConfig {
        self.0.config()
    }

    fn execute(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, veraltheim_models::Error> {
        self.0.execute(inputs)
    }

    fn check_request(&self, inputs: &[Tensor]) -> Result<(), String> {
        match inputs[0].f32_values() {
            Ok(v) if v[0] < 0.0 => Err(format!("input '{}' is negative", inputs[0].name())),
            _ => Ok(()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_backend_refuses_fails_alone_before_the_queue() {
    let pool = ExecutionPool::new(2).unwrap();
    let worker = ModelWorker::start(
        Arc::new(Picky(cost(0, 0, ""))),
        pool,
        &WorkerOptions::default(),
    );
    let e = worker.submit(row(-1.0)).expect_err("refused at submit");
    match &e {
        InferError::InvalidRequest { reason, .. } => {
            assert!(reason.contains("'INPUT0' is negative"), "{reason}")
        }
        other => panic!("not InvalidRequest: {other:?}"),
    }
    let out = worker.submit(row(2.0)).unwrap().await.unwrap().unwrap();
    assert_eq!(out.outputs[0].f32_values().unwrap(), vec![3.0]);
    assert_eq!(worker.stats().execution_count, 1);
}

/// A model that records the thread each batch runs on and spins for `spin_us` per batch (set
/// by the test), then answers as the wrapped model does.
struct Timed {
    inner: Arc<dyn Model>,
    spin_us: Arc<std::sync::atomic::AtomicU64>,
    threads: Arc<std::sync::Mutex<Vec<std::thread::Thread>>>,
}

impl Model for Timed {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }

    fn execute(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, veraltheim_models::Error> {
        self.threads.lock().unwrap().push(std::thread::current());
        let spin = Duration::from_micros(self.spin_us.load(std::sync::atomic::Ordering::Relaxed));
        let start = std::time::Instant::now();
        while start.elapsed() < spin {
            std::hint::spin_loop();
        }
        self.inner.execute(inputs)
    }
}

struct TimedHandle {
    spin_us: Arc<std::sync::atomic::AtomicU64>,
    threads: Arc<std::sync::Mutex<Vec<std::thread::Thread>>>,
}

impl TimedHandle {
    fn spin(&self, us: u64) {
        self.spin_us.store(us, std::sync::atomic::Ordering::Relaxed);
    }

    fn last_thread(&self) -> std::thread::ThreadId {
        self.threads.lock().unwrap().last().unwrap().id()
    }

    /// Whether any of the last `n` batches ran on an execution-pool thread.
    fn pool_ran_one_of_last(&self, n: usize) -> bool {
        let threads = self.threads.lock().unwrap();
        threads[threads.len().saturating_sub(n)..]
            .iter()
            .any(|t| t.name().is_some_and(|n| n.starts_with("veraltheim-exec")))
    }
}

fn timed(extra: &str, spin_us: u64) -> (ModelWorker, TimedHandle) {
    timed_model(cost(0, 0, extra), spin_us)
}

fn timed_model(inner: Arc<dyn Model>, spin_us: u64) -> (ModelWorker, TimedHandle) {
    let spin = Arc::new(std::sync::atomic::AtomicU64::new(spin_us));
    let threads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let model = Timed {
        inner,
        spin_us: spin.clone(),
        threads: threads.clone(),
    };
    let worker = ModelWorker::start(
        Arc::new(model),
        ExecutionPool::new(2).unwrap(),
        &WorkerOptions::default(),
    );
    (
        worker,
        TimedHandle {
            spin_us: spin,
            threads,
        },
    )
}

/// The `cost` model with no cost, counted fast up to `inline_us` per batch: tests that need a
/// batch to count as fast use a bound far above what a trivial batch takes even on a busy
/// machine, and make a batch slow by spinning past it. Requests sent one after the other
/// in-process arrive microseconds apart, so these tests turn the arrival-gap rule off
/// (`inline_min_gap_us` 0); [`inline_cost_gap`] keeps it.
fn inline_cost(inline_us: u64, extra: &str) -> Arc<dyn Model> {
    inline_cost_gap(inline_us, 0, extra)
}

fn inline_cost_gap(inline_us: u64, gap_us: u64, extra: &str) -> Arc<dyn Model> {
    let config = builtin::config("cost")
        .unwrap()
        .with_override(&format!(
            r#"{{"parameters":{{"inline_execution_us":{{"string_value":"{inline_us}"}},"inline_min_gap_us":{{"string_value":"{gap_us}"}}}}{extra}}}"#
        ))
        .unwrap();
    builtin::instantiate(config).unwrap()
}

/// The inline bound of the tests that need batches to count as fast: 50 ms.
const TEST_INLINE_US: u64 = 50_000;

/// Sends `n` requests one after the other, each answered before the next; checks the answers.
async fn one_by_one(worker: &ModelWorker, n: usize) {
    spaced(worker, n, Duration::ZERO).await;
}

/// Submits `n` requests at once, then checks that each is answered with its own row.
async fn all_at_once(worker: &ModelWorker, n: usize) {
    let answers: Vec<_> = (0..n)
        .map(|i| worker.submit(row(i as f32)).unwrap())
        .collect();
    for (i, rx) in answers.into_iter().enumerate() {
        let out = rx.await.unwrap().unwrap();
        assert_eq!(out.outputs[0].f32_values().unwrap(), vec![i as f32 + 1.0]);
    }
}

/// [`one_by_one`], with `pause` before each request.
async fn spaced(worker: &ModelWorker, n: usize, pause: Duration) {
    for i in 0..n {
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        let out = worker
            .submit(row(i as f32))
            .unwrap()
            .await
            .unwrap()
            .unwrap();
        assert_eq!(out.outputs[0].f32_values().unwrap(), vec![i as f32 + 1.0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_idle_model_runs_a_lone_request_on_the_callers_thread() {
    let (worker, model) = timed_model(inline_cost(TEST_INLINE_US, ""), 0);
    // Until INLINE_STREAK batches have shown the model fast, every batch goes to the pool.
    one_by_one(&worker, veraltheim_fastpath::INLINE_STREAK as usize).await;
    assert_eq!(worker.inline_runs(), 0);
    let jobs = worker.pool_jobs();
    // Now a lone request runs inside `submit`, on this thread: its answer is there at once.
    let mut rx = worker.submit(row(7.0)).unwrap();
    assert_eq!(model.last_thread(), std::thread::current().id());
    let out = rx
        .try_recv()
        .expect("answered before submit returned")
        .unwrap();
    assert_eq!(out.outputs[0].f32_values().unwrap(), vec![8.0]);
    assert_eq!(worker.inline_runs(), 1);
    assert_eq!(worker.pool_jobs(), jobs);
    // Many callers at once still get their own rows, whichever way each ran.
    all_at_once(&worker, 64).await;
    let stats = worker.stats();
    assert_eq!(stats.success.count, 64 + 1 + 64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_model_never_runs_on_the_callers_thread() {
    // 1 ms per batch, five times the default bound (a spin takes at least that long).
    let (worker, model) = timed("", 1_000);
    one_by_one(&worker, 2 * veraltheim_fastpath::INLINE_STREAK as usize).await;
    assert_eq!(worker.inline_runs(), 0);
    assert_ne!(model.last_thread(), std::thread::current().id());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_inline_batch_turns_inline_off_until_twice_the_streak() {
    let streak = veraltheim_fastpath::INLINE_STREAK as usize;
    let (worker, model) = timed_model(inline_cost(TEST_INLINE_US, ""), 0);
    one_by_one(&worker, streak + 1).await;
    assert_eq!(worker.inline_runs(), 1);
    // The model turns slow: the next lone request still runs inline (nothing said otherwise)...
    model.spin(TEST_INLINE_US + 10_000);
    one_by_one(&worker, 1).await;
    assert_eq!(worker.inline_runs(), 2);
    // ...and from then on the pool runs its batches, fast or not, until 2 × INLINE_STREAK fast
    // batches in a row have been seen.
    one_by_one(&worker, 3).await;
    model.spin(0);
    one_by_one(&worker, 2 * streak).await;
    assert_eq!(worker.inline_runs(), 2);
    one_by_one(&worker, 1).await;
    assert_eq!(worker.inline_runs(), 3);
    assert_eq!(model.last_thread(), std::thread::current().id());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_model_whose_requests_come_too_close_together_does_not_run_inline() {
    // The arrival-gap rule at 5 ms, above the 1 ms a gap counts at most: however the requests
    // are spaced, none runs inline (the average itself is tested in `worker.rs`). With the rule
    // at 0 the same requests run inline (`a_fast_idle_model_runs_a_lone_request_...`).
    let streak = veraltheim_fastpath::INLINE_STREAK as usize;
    let (worker, model) = timed_model(inline_cost_gap(TEST_INLINE_US, 5_000, ""), 0);
    one_by_one(&worker, streak).await;
    spaced(&worker, 4, Duration::from_millis(2)).await;
    assert_eq!(worker.inline_runs(), 0);
    assert_ne!(model.last_thread(), std::thread::current().id());
}

#[test]
fn inline_min_gap_us_is_read_and_a_bad_value_is_named() {
    assert_eq!(
        veraltheim_fastpath::inline_min_gap(&config("")),
        Ok(veraltheim_fastpath::DEFAULT_INLINE_MIN_GAP)
    );
    assert_eq!(
        veraltheim_fastpath::inline_min_gap(&config(r#""inline_min_gap_us":{"string_value":"0"}"#)),
        Ok(Duration::ZERO)
    );
    let err = veraltheim_fastpath::inline_min_gap(&config(
        r#""inline_min_gap_us":{"string_value":"soon"}"#,
    ))
    .unwrap_err();
    assert!(
        err.contains("inline_min_gap_us") && err.contains("'soon'"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_delay_or_inline_execution_us_0_keeps_batches_on_the_pool() {
    let streak = veraltheim_fastpath::INLINE_STREAK as usize;
    // With a queue delay the batching policy waits for company: no request runs alone inline.
    let (delayed, _) = timed_model(
        inline_cost(
            TEST_INLINE_US,
            r#","dynamic_batching":{"max_queue_delay_microseconds":200}"#,
        ),
        0,
    );
    one_by_one(&delayed, streak + 8).await;
    assert_eq!(delayed.inline_runs(), 0);
    let (off, _) = timed_model(inline_cost(0, ""), 0);
    one_by_one(&off, streak + 8).await;
    assert_eq!(off.inline_runs(), 0);
}

#[test]
fn inline_and_batcher_execution_us_are_read_and_a_bad_value_is_named() {
    type Bound = fn(&ModelConfig, Option<Duration>) -> Result<Option<Duration>, String>;
    let bounds: [(&str, Bound); 2] = [
        ("inline_execution_us", veraltheim_fastpath::inline_bound),
        ("batcher_execution_us", veraltheim_fastpath::batcher_bound),
    ];
    for (name, bound) in bounds {
        let param = |v: &str| config(&format!(r#""{name}":{{"string_value":"{v}"}}"#));
        // Without the parameter, the server's default (`models.{name}`).
        let nine = Some(Duration::from_micros(9));
        assert_eq!(bound(&config(""), nine), Ok(nine), "{name}");
        assert_eq!(bound(&config(""), None), Ok(None), "{name}");
        assert_eq!(
            bound(&param("50"), None),
            Ok(Some(Duration::from_micros(50))),
            "{name}"
        );
        assert_eq!(bound(&param("0"), nine), Ok(None), "{name}");
        let err = bound(&param("fast"), None).unwrap_err();
        assert!(err.contains(name) && err.contains("'fast'"), "{err}");
    }
}

/// The `cost` model with no cost, never run inline, its batches counted tiny up to `batcher_us`
/// (`batcher_execution_us`; 0: never on the batcher task).
fn batcher_cost(batcher_us: u64) -> Arc<dyn Model> {
    let config = builtin::config("cost")
        .unwrap()
        .with_override(&format!(
            r#"{{"parameters":{{"inline_execution_us":{{"string_value":"0"}},"batcher_execution_us":{{"string_value":"{batcher_us}"}}}}}}"#
        ))
        .unwrap();
    builtin::instantiate(config).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_measured_tiny_runs_its_batches_on_the_batcher_task() {
    let streak = veraltheim_fastpath::INLINE_STREAK as usize;
    let (worker, model) = timed_model(batcher_cost(TEST_INLINE_US), 0);
    // Until INLINE_STREAK batches have shown the model tiny, the pool runs them.
    one_by_one(&worker, streak).await;
    assert_eq!(worker.batcher_runs(), 0);
    assert!(model.pool_ran_one_of_last(1));
    let jobs = worker.pool_jobs();
    // Then every batch runs on the batcher task: one at a time, and many callers at once, each
    // answered with its own row.
    one_by_one(&worker, 4).await;
    assert_eq!(worker.batcher_runs(), 4);
    all_at_once(&worker, 64).await;
    let stats = worker.stats();
    assert_eq!(stats.success.count, (streak + 4 + 64) as u64);
    let on_batcher = worker.batcher_runs();
    assert_eq!(worker.pool_jobs(), jobs, "no batch went to the pool");
    assert!(!model.pool_ran_one_of_last(on_batcher as usize));
    assert_eq!(stats.execution_count, streak as u64 + on_batcher);
    assert_eq!(worker.inline_runs(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_batch_on_the_batcher_task_sends_the_next_ones_to_the_pool() {
    // A 5-ms bound against the average batch time: a trivial batch is far below it even on a
    // busy machine, and one of 100 ms lifts the average (weight 1/8) to 12.5 ms.
    let streak = veraltheim_fastpath::INLINE_STREAK as usize;
    let (worker, model) = timed_model(batcher_cost(5_000), 0);
    one_by_one(&worker, streak + 1).await;
    assert_eq!(worker.batcher_runs(), 1);
    // The model turns slow: its next batch still runs on the batcher (nothing said otherwise)...
    model.spin(100_000);
    one_by_one(&worker, 1).await;
    assert_eq!(worker.batcher_runs(), 2);
    // ...and then the pool runs its batches until the average is back within the bound: after
    // ln(12.5 / 5) / ln(8/7) ≈ 6.9 trivial batches.
    model.spin(0);
    one_by_one(&worker, 5).await;
    assert_eq!(worker.batcher_runs(), 2);
    assert!(model.pool_ran_one_of_last(1));
    one_by_one(&worker, 20).await;
    assert!(worker.batcher_runs() > 2);
    assert!(!model.pool_ran_one_of_last(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batcher_kept_busy_with_tiny_batches_still_ends_when_cancelled() {
    // A batcher that runs its batches itself goes round again without waiting while requests
    // keep coming; cancellation must still end it (the supervisor cancels on shutdown).
    let streak = veraltheim_fastpath::INLINE_STREAK as usize;
    let worker = Arc::new(ModelWorker::new(
        batcher_cost(TEST_INLINE_US),
        ExecutionPool::new(1).unwrap(),
        &WorkerOptions::default(),
    ));
    let cancel = tokio_util::sync::CancellationToken::new();
    let batcher = {
        let (worker, cancel) = (worker.clone(), cancel.clone());
        tokio::spawn(async move { worker.run(&cancel).await })
    };
    one_by_one(&worker, streak).await;
    // A feeder that keeps 64 to 128 requests waiting, so that the queue never runs dry (it
    // holds their receivers: an abandoned request is dropped, not computed).
    let feeder = {
        let worker = worker.clone();
        tokio::spawn(async move {
            let mut waiting = Vec::new();
            loop {
                let next: Vec<_> = (0..64)
                    .filter_map(|i| worker.submit(row(i as f32)).ok())
                    .collect();
                for rx in std::mem::replace(&mut waiting, next) {
                    let _ = rx.await;
                }
            }
        })
    };
    tokio::time::timeout(Duration::from_secs(30), async {
        while worker.batcher_runs() < 100 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("100 batches did not run on the batcher");
    cancel.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(10), batcher).await;
    feeder.abort();
    assert_eq!(
        ended
            .expect("the batcher did not end after cancel")
            .unwrap(),
        Ok(())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batcher_execution_us_0_keeps_batches_on_the_pool() {
    let streak = veraltheim_fastpath::INLINE_STREAK as usize;
    let (off, model) = timed_model(batcher_cost(0), 0);
    one_by_one(&off, streak + 8).await;
    assert_eq!(off.batcher_runs(), 0);
    assert!(model.pool_ran_one_of_last(1));
}

/// A stand-in for a text model: row `[id, tokens]` costs `tokens` tokens (a negative count is
/// text its tokenizer refuses). It counts tokens, so the worker batches it by length.
struct Words(Arc<dyn Model>);

impl Model for Words {
    fn config(&self) -> &ModelConfig {
        self.0.config()
    }

    fn execute(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, veraltheim_models::Error> {
        self.0.execute(inputs)
    }

    fn count_tokens(&self, texts: &[&str]) -> Option<Result<Vec<usize>, veraltheim_models::Error>> {
        Some(Ok(texts.iter().map(|t| t.len()).collect()))
    }

    fn request_tokens(&self, inputs: &[Tensor]) -> Option<Result<TokenCount, String>> {
        let values = inputs[0].f32_values().map_err(|e| e.to_string());
        Some(values.and_then(|v| {
            let counts: Vec<f32> = v.chunks(2).map(|r| r[1]).collect();
            if counts.iter().any(|&c| c < 0.0) {
                return Err(format!("input '{}' is not text", inputs[0].name()));
            }
            Ok(TokenCount {
                longest: counts.iter().map(|&c| c as usize).max().unwrap_or(0),
                total: counts.iter().map(|&c| c as usize).sum(),
            })
        }))
    }
}

/// A gated text stand-in over `inner` whose only instance holds sentence 0 (10 tokens): what
/// is submitted next queues up until the test releases the gate. Returns sentence 0's answer.
async fn words_held(
    inner: Arc<dyn Model>,
) -> (
    ModelWorker,
    Gate,
    tokio::sync::oneshot::Receiver<Result<veraltheim_fastpath::InferOutput, InferError>>,
) {
    let (gated_model, mut gate) = gated(inner);
    let worker = ModelWorker::start(
        Arc::new(Words(gated_model)),
        ExecutionPool::new(2).unwrap(),
        &WorkerOptions::default(),
    );
    let first = worker.submit(sentence(0.0, 10.0)).unwrap();
    assert_eq!(gate.started().await, [0.0]);
    (worker, gate, first)
}

fn sentence(id: f32, tokens: f32) -> Request {
    Request::new(
        vec![Tensor::from_f32("INPUT0", vec![1, 2], &[id, tokens]).unwrap()],
        1,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_requests_are_batched_by_length_and_their_tokens_counted() {
    let (worker, mut gate, first) = words_held(cost(0, 0, "")).await;
    let mut receivers = vec![first];
    // Short and long sentences alternate while the first batch holds the only instance.
    receivers.extend((1..=12).map(|i| {
        let tokens = if i % 2 == 1 { 10.0 } else { 40.0 };
        worker.submit(sentence(i as f32, tokens)).unwrap()
    }));
    // Text the tokenizer refuses is refused alone, at once.
    match worker.submit(sentence(99.0, -1.0)) {
        Err(InferError::InvalidRequest { reason, .. }) => {
            assert!(reason.contains("not text"), "{reason}")
        }
        other => panic!("expected InvalidRequest, got {other:?}"),
    }
    gate.open();
    for rx in receivers {
        rx.await.unwrap().unwrap();
    }
    assert_eq!(
        gate.started().await,
        [1.0, 3.0, 5.0, 7.0, 9.0, 11.0],
        "the oldest waiting request anchors; the others of its length join it"
    );
    assert_eq!(gate.started().await, [2.0, 4.0, 6.0, 8.0, 10.0, 12.0]);
    let stats = worker.stats();
    assert_eq!(stats.execution_count, 3, "{stats:?}");
    assert_eq!(stats.real_tokens, 10 + 6 * 10 + 6 * 40);
    assert_eq!(
        stats.padded_tokens, stats.real_tokens,
        "no batch was padded"
    );

    // Counted by the caller beforehand (as the server does for large requests): kept as given.
    let mut counted = sentence(20.0, 7.0);
    assert!(
        !worker.counts_tokens_off_runtime(&counted),
        "a small request"
    );
    worker.count_tokens_of(&mut counted).unwrap();
    assert_eq!(
        counted.tokens,
        Some(TokenCount {
            longest: 7,
            total: 7
        })
    );
    worker.submit(counted).unwrap().await.unwrap().unwrap();
    assert_eq!(worker.stats().real_tokens, 10 + 6 * 10 + 6 * 40 + 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_without_tokens_count_none() {
    let pool = ExecutionPool::new(2).unwrap();
    let worker = ModelWorker::start(cost(0, 0, ""), pool, &WorkerOptions::default());
    let mut r = row(1.0);
    worker.count_tokens_of(&mut r).unwrap();
    assert_eq!(r.tokens, None);
    assert!(!worker.counts_tokens_off_runtime(&r));
    worker.submit(r).unwrap().await.unwrap().unwrap();
    let stats = worker.stats();
    assert_eq!((stats.real_tokens, stats.padded_tokens), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batcher_waiting_out_a_queue_delay_sleeps_instead_of_spinning() {
    // One request waits out a 300 ms queue delay with the instance free: the batcher takes the
    // instance, the policy says wait, the instance goes back. It must then sleep until the
    // delay is due, not wake itself again and again.
    let (worker, _) = timed(
        r#","dynamic_batching":{"max_queue_delay_microseconds":300000}"#,
        0,
    );
    let before = worker.batcher_rounds();
    let rx = worker.submit(row(1.0)).unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let rounds = worker.batcher_rounds() - before;
    // A handful of wake-ups (the submit, the wait's timer); a spinning batcher makes millions.
    assert!(
        rounds < 50,
        "{rounds} batcher rounds while one request waited"
    );
    let out = rx.await.unwrap().unwrap();
    assert_eq!(out.outputs[0].f32_values().unwrap(), vec![2.0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_batch_is_formed_of_similar_lengths_out_of_all_that_wait() {
    // A text model with a latency objective; 80 background sentences of 10 and 40 tokens,
    // alternating, 10 ms per row. The controller starts at 1 in flight and allows 8 from its
    // first tick (100 ms): from then on each background batch is shown all that wait and takes
    // 8 of one length. (Shown only the 8 oldest, it found 4 of the front's length among them:
    // batches of 4.)
    let pool = ExecutionPool::new(2).unwrap();
    let model = cost_with(
        10_000,
        &[
            ("latency_slo_p99_ms", "1000"),
            ("background_max_in_flight", "8"),
            ("background_step", "8"),
            ("background_batch_ms", "1000"),
        ],
    );
    let worker = ModelWorker::start(Arc::new(Words(model)), pool, &WorkerOptions::default());
    let receivers: Vec<_> = (0..80)
        .map(|i| {
            let mut r = sentence(i as f32, if i % 2 == 0 { 10.0 } else { 40.0 });
            r.background = true;
            worker.submit(r).unwrap()
        })
        .collect();
    let mut sizes = Vec::new();
    for rx in receivers {
        let out = tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .expect("an answer within 30 s")
            .unwrap()
            .unwrap();
        sizes.push(out.batch_size);
    }
    assert!(
        sizes.iter().all(|&s| s <= 8),
        "held to the limit: {sizes:?}"
    );
    assert!(
        sizes.iter().filter(|&&s| s == 8).count() >= 48,
        "batches of 8 of one length: {sizes:?}"
    );
    let stats = worker.stats();
    assert_eq!(
        stats.padded_tokens, stats.real_tokens,
        "no background batch was padded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_online_batch_is_filled_with_background_rows_of_its_length_unless_told_not_to() {
    // A text model with a latency objective holds its only instance on an online sentence while
    // background sentences of 10 and 40 tokens and one online sentence of 10 queue up. The
    // online sentence runs next, filled with background rows of its length (never with a 40),
    // as many as the controller's limit leaves room for: at least 1 (it starts at 1 and cannot
    // fall with every request far within the objective), at most 8. With `background_fill`
    // false it runs alone.
    for fill in [true, false] {
        let value = fill.to_string();
        let (worker, mut gate, first) = words_held(cost_with(
            0,
            &[
                ("latency_slo_p99_ms", "60000"),
                ("background_max_in_flight", "8"),
                ("background_step", "8"),
                ("background_fill", &value),
            ],
        ))
        .await;
        let mut receivers = vec![first];
        receivers.extend((100..120).map(|i| {
            let mut r = sentence(i as f32, if i % 2 == 0 { 10.0 } else { 40.0 });
            r.background = true;
            worker.submit(r).unwrap()
        }));
        receivers.push(worker.submit(sentence(1.0, 10.0)).unwrap());
        gate.release();
        let next = gate.started().await;
        assert_eq!(next[0], 1.0, "the online sentence runs next: {next:?}");
        let background = &next[1..];
        if fill {
            assert!(
                (1..=8).contains(&background.len()),
                "filled within the limit: {next:?}"
            );
            assert!(
                background
                    .iter()
                    .all(|&id| id >= 100.0 && (id as u32).is_multiple_of(2)),
                "only background sentences of its length: {next:?}"
            );
        } else {
            assert!(background.is_empty(), "not filled: {next:?}");
        }
        gate.open();
        for rx in receivers {
            rx.await.unwrap().unwrap();
        }
        let stats = worker.stats();
        assert_eq!(
            stats.padded_tokens, stats.real_tokens,
            "no batch was padded"
        );
        let slo = worker.slo().unwrap();
        assert_eq!(slo.in_flight, 0, "{slo:?}");
    }
}

/// [`Words`] whose batch costs `per_token` for each padded token (rows × the longest row), as a
/// transformer on a CPU does.
struct PaddedCost {
    words: Words,
    per_token: Duration,
}

impl Model for PaddedCost {
    fn config(&self) -> &ModelConfig {
        self.words.config()
    }

    fn execute(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, veraltheim_models::Error> {
        let values = inputs[0].f32_values()?;
        let counts: Vec<usize> = values.chunks(2).map(|r| r[1] as usize).collect();
        let padded = counts.len() * counts.iter().copied().max().unwrap_or(0);
        std::thread::sleep(self.per_token * padded as u32);
        self.words.execute(inputs)
    }

    fn count_tokens(&self, texts: &[&str]) -> Option<Result<Vec<usize>, veraltheim_models::Error>> {
        self.words.count_tokens(texts)
    }

    fn request_tokens(&self, inputs: &[Tensor]) -> Option<Result<TokenCount, String>> {
        self.words.request_tokens(inputs)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_batch_of_background_rows_is_held_to_the_padded_tokens_its_time_allows() {
    // 0.2 ms per padded token, 40 ms per batch holding background rows: 200 tokens. Short
    // sentences (10 tokens, 2 ms a row) first: the cost per row the controller learns from
    // them allows 20 rows. Then long ones (80 tokens, 16 ms a row): held to their tokens,
    // their batches take at most 2 (160 tokens), not 20 rows (320 ms).
    let model = PaddedCost {
        words: Words(cost_with(
            0,
            &[
                ("latency_slo_p99_ms", "60000"),
                ("background_max_in_flight", "64"),
                ("background_step", "64"),
                ("background_batch_ms", "40"),
            ],
        )),
        per_token: Duration::from_micros(200),
    };
    let worker = ModelWorker::start(
        Arc::new(model),
        ExecutionPool::new(2).unwrap(),
        &WorkerOptions::default(),
    );
    let phase = |first: usize, n: usize, tokens: f32| {
        (first..first + n)
            .map(|i| {
                let mut r = sentence(i as f32, tokens);
                r.background = true;
                worker.submit(r).unwrap()
            })
            .collect::<Vec<_>>()
    };
    let mut short = Vec::new();
    for rx in phase(0, 200, 10.0) {
        short.push(rx.await.unwrap().unwrap().batch_size);
    }
    assert!(
        short.iter().any(|&n| n > 2),
        "short sentences ran in batches of more than 2: {short:?}"
    );
    let slo = worker.slo().unwrap();
    assert!(
        slo.batch_rows.is_some_and(|r| r > 2),
        "by rows alone, more than 2 would join: {slo:?}"
    );
    let mut long = Vec::new();
    for rx in phase(1000, 20, 80.0) {
        long.push(rx.await.unwrap().unwrap().batch_size);
    }
    assert!(
        long.iter().all(|&n| n <= 2),
        "long sentences held to 200 padded tokens a batch: {long:?}"
    );
}
