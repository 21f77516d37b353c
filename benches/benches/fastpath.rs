//! Fast-path micro-benchmarks: the batcher's decision, and a request's round trip through a
//! model worker (queue → batcher → execution pool → reply) with `identity`, whose compute is a
//! copy, so the figure is the fast path's own overhead. Run: `cargo bench -p veraltheim-benches`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use veraltheim_benches::fp32_request;
use veraltheim_fastpath::{BatchPolicy, ExecutionPool, Item, ModelWorker, WorkerOptions};
use veraltheim_models::builtin;

fn plan(c: &mut Criterion) {
    let policy = BatchPolicy {
        max_batch_size: 64,
        dynamic: true,
        preferred: vec![8, 16, 32],
        max_delay: Duration::from_micros(100),
        ..BatchPolicy::default()
    };
    let t0 = Instant::now();
    let key = 0u8;
    let items: Vec<Item<'_, u8>> = (0..64)
        .map(|i| Item::new(t0 + Duration::from_nanos(i), 1, &key))
        .collect();
    let mut g = c.benchmark_group("batcher_plan");
    for n in [1usize, 8, 64] {
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("{n}_waiting"), |b| {
            b.iter(|| policy.plan(std::hint::black_box(&items[..n]), t0))
        });
    }
    g.finish();
}

fn round_trip(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let pool = ExecutionPool::new(1).expect("pool");
    let worker = rt.block_on(async {
        ModelWorker::start(
            builtin::instantiate(builtin::config("identity").expect("config")).expect("model"),
            pool,
            &WorkerOptions::default(),
        )
    });
    let model = builtin::instantiate(builtin::config("identity").expect("config")).expect("model");
    let mut g = c.benchmark_group("worker_round_trip");
    // Baselines in the same run: the model called directly (compute ceiling), and the bare
    // mechanism a worker cannot avoid (a hop to a pool thread and a oneshot back).
    g.throughput(Throughput::Elements(1));
    g.bench_function("baseline_direct_execute", |b| {
        b.iter(|| {
            let r = fp32_request(16);
            model.execute(&r.inputs).expect("ok")
        })
    });
    let bare_pool = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("pool"),
    );
    // The callers run as tasks on the runtime, as the server's request handlers do: a caller
    // outside it (`block_on`) would add a wake-up of its own thread to every answer.
    let hop = {
        let (pool, m) = (bare_pool.clone(), model.clone());
        move || {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let m = m.clone();
            pool.spawn(move || {
                let r = fp32_request(16);
                let _ = tx.send(m.execute(&r.inputs));
            });
            async move {
                rx.await.expect("answered").expect("ok");
            }
        }
    };
    let worker = Arc::new(worker);
    let one = {
        let worker = worker.clone();
        move || {
            let rx = worker.submit(fp32_request(16)).expect("admitted");
            async move {
                rx.await.expect("answered").expect("ok");
            }
        }
    };
    g.bench_function("baseline_pool_hop_and_oneshot", |b| {
        b.iter_custom(|iters| time_calls(&rt, iters, None, hop.clone()))
    });
    g.bench_function("identity_1x16_1_producers", |b| {
        b.iter_custom(|iters| time_calls(&rt, iters, None, one.clone()))
    });
    g.throughput(Throughput::Elements(16));
    g.bench_function("identity_1x16_16_producers", |b| {
        b.iter_custom(|iters| {
            let worker = worker.clone();
            in_task(&rt, async move {
                let start = Instant::now();
                for _ in 0..iters {
                    // Each producer its own task, as each gRPC call is in the server.
                    let calls: Vec<_> = (0..16)
                        .map(|_| {
                            let rx = worker.submit(fp32_request(16)).expect("admitted");
                            tokio::spawn(async move {
                                rx.await.expect("answered").expect("ok");
                            })
                        })
                        .collect();
                    for call in futures::future::join_all(calls).await {
                        call.expect("producer task");
                    }
                }
                start.elapsed()
            })
        })
    });
    g.finish();

    // At low load every request finds the runtime and the pool asleep: a pause (untimed) before
    // each call lets them park, so the hop includes waking them, as it does in a quiet server.
    let mut g = c.benchmark_group("worker_round_trip_after_idle");
    g.throughput(Throughput::Elements(1))
        .warm_up_time(Duration::from_millis(20))
        .measurement_time(Duration::from_millis(100))
        .sample_size(10);
    let idle = Some(Duration::from_millis(1));
    g.bench_function("baseline_pool_hop_and_oneshot", |b| {
        b.iter_custom(|iters| time_calls(&rt, iters, idle, hop.clone()))
    });
    g.bench_function("identity_1x16_1_producers", |b| {
        b.iter_custom(|iters| time_calls(&rt, iters, idle, one.clone()))
    });
    g.finish();
}

/// Times `iters` calls of `op` in a task on `rt`; with `idle`, pauses that long before each
/// call, outside the timing.
fn time_calls<F, Fut>(
    rt: &tokio::runtime::Runtime,
    iters: u64,
    idle: Option<Duration>,
    mut op: F,
) -> Duration
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    in_task(rt, async move {
        let mut timed = Duration::ZERO;
        for _ in 0..iters {
            if let Some(pause) = idle {
                tokio::time::sleep(pause).await;
            }
            let start = Instant::now();
            op().await;
            timed += start.elapsed();
        }
        timed
    })
}

/// Runs `f` as a task on `rt` and returns what it measured.
fn in_task(
    rt: &tokio::runtime::Runtime,
    f: impl std::future::Future<Output = Duration> + Send + 'static,
) -> Duration {
    rt.block_on(async { tokio::spawn(f).await.expect("bench task") })
}

criterion_group!(benches, plan, round_trip);
criterion_main!(benches);
