//! Slow-path scheduler micro-benchmarks: the time of one admission decision
//! (`Scheduler::schedule_at_most`) with many jobs queued. Target: ≤ 1 ms per decision with
//! 100,000 queued jobs. The baseline in the same run is the same decision with 1,000 queued
//! jobs, so `100000 / 1000` reads as how the decision scales with the backlog.
//!
//! Two decisions, as the runner asks them:
//! - `admit_one`: a slot and capacity are free; the decision admits the best queue head. The
//!   admitted job is then released and queued again (untimed), so the backlog stays the same.
//! - `saturated`: every slot is taken (`schedule_at_most(0)`), the round a busy runner runs on
//!   each submit or job end: nothing is admitted, every waiting job keeps a reason.
//!
//! The backlog: 4 queues (weights 1..4, one with a GPU quota), 3 priority classes and the empty
//! class, jobs spread round robin. Run: `cargo bench -p veraltheim-benches --bench scheduler`.
//!
//! A cluster's leader (issue 14's target: ≤ 5 ms per decision with 100,000 waiting jobs)
//! places the jobs on nodes (`Scheduler::set_nodes`), here 3, 16 and 100 (100 with the larger
//! backlog only), each of [`NODE_SLOTS`] slots, 16 cores, 64 GiB and 2 GPUs (a backlog job
//! holds half a core and 1 GiB, so the slots bind first). It runs `schedule()` with no bound of its own; the nodes' slots bound it:
//! - `scheduler_nodes_round/N_nodes`: every node's slots free; one round admits
//!   `N × NODE_SLOTS` jobs, each placed on the node whose dominant share after it is the
//!   smallest (then, untimed, they are released and queued again). Criterion's throughput line
//!   gives the admissions per second.
//! - `scheduler_nodes_saturated/N_nodes`: every node's slots taken; the round admits nothing
//!   and says why the queue heads wait (the head that finds no node gets one reason per node).

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use veraltheim_slowpath::scheduler::{NodeCapacity, Pending};
use veraltheim_slowpath::{QueueConfig, Quota, Resources, Scheduler, SchedulerConfig};

const QUEUES: [&str; 4] = ["batch", "research", "nightly", "adhoc"];
const CLASSES: [&str; 4] = ["high", "normal", "low", ""];

fn scheduler() -> Scheduler {
    let queues = QUEUES
        .iter()
        .enumerate()
        .map(|(i, name)| QueueConfig {
            name: (*name).to_owned(),
            weight: i as u32 + 1,
            quota: Quota {
                gpus: (i == 1).then_some(4),
                ..Quota::default()
            },
        })
        .collect();
    Scheduler::new(SchedulerConfig {
        capacity: Resources {
            cpu_millis: 64_000,
            memory_bytes: 256 << 30,
            gpus: 8,
            gpu_memory_bytes: 0,
        },
        queues,
        priority_classes: CLASSES[..3].iter().map(|c| (*c).to_owned()).collect(),
    })
    .expect("a valid configuration")
}

fn job(n: usize) -> Pending {
    Pending {
        id: format!("{:020}", n),
        queue: QUEUES[n % QUEUES.len()].to_owned(),
        priority_class: CLASSES[(n / QUEUES.len()) % CLASSES.len()].to_owned(),
        resources: Resources {
            cpu_millis: 500,
            memory_bytes: 1 << 30,
            gpus: 0,
            gpu_memory_bytes: 0,
        },
        tenant: String::new(),
    }
}

fn backlog(n: usize) -> Scheduler {
    let mut s = scheduler();
    for i in 0..n {
        s.enqueue(job(i)).expect("fits");
    }
    s
}

fn decisions(c: &mut Criterion) {
    let mut g = c.benchmark_group("scheduler_decision");
    for queued in [1_000usize, 100_000] {
        let mut s = backlog(queued);
        g.bench_with_input(BenchmarkId::new("admit_one", queued), &queued, |b, _| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let d = s.schedule_at_most(1);
                    total += t.elapsed();
                    for job in d.admitted {
                        s.release(&job.id);
                        s.enqueue(job).expect("fits again");
                    }
                }
                total
            })
        });
        assert_eq!(s.waiting_len(), queued);
        g.bench_with_input(BenchmarkId::new("saturated", queued), &queued, |b, _| {
            b.iter(|| s.schedule_at_most(0))
        });
    }
    g.finish();
}

/// Jobs one node runs at once in the `scheduler_nodes` group.
const NODE_SLOTS: usize = 16;

/// `n` nodes of [`NODE_SLOTS`] slots, 16 cores, 64 GiB and 2 GPUs each.
fn nodes(n: usize) -> Vec<NodeCapacity> {
    (0..n)
        .map(|i| NodeCapacity {
            id: format!("n{i}"),
            capacity: Resources {
                cpu_millis: 16_000,
                memory_bytes: 64 << 30,
                gpus: 2,
                gpu_memory_bytes: 0,
            },
            slots: NODE_SLOTS,
        })
        .collect()
}

fn leader_rounds(c: &mut Criterion) {
    for queued in [1_000usize, 100_000] {
        for n in [3usize, 16, 100] {
            if n * NODE_SLOTS > queued {
                // Every job would be admitted: no saturated round to measure.
                continue;
            }
            let mut s = backlog(queued);
            s.set_nodes(nodes(n));
            let slots = n * NODE_SLOTS;
            let mut g = c.benchmark_group("scheduler_nodes_round");
            g.throughput(Throughput::Elements(slots as u64));
            g.bench_with_input(
                BenchmarkId::new(format!("{n}_nodes"), queued),
                &queued,
                |b, _| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let t = Instant::now();
                            let d = s.schedule();
                            total += t.elapsed();
                            assert_eq!(d.admitted.len(), slots, "every slot is filled");
                            for job in d.admitted {
                                s.release(&job.id);
                                s.enqueue(job).expect("fits again");
                            }
                        }
                        total
                    })
                },
            );
            g.finish();
            assert_eq!((s.waiting_len(), s.admitted_len()), (queued, 0));
            // Every slot taken, as the leader's round on each submit of a busy cluster finds it.
            let full = s.schedule();
            assert_eq!(full.admitted.len(), slots);
            let mut g = c.benchmark_group("scheduler_nodes_saturated");
            g.bench_with_input(
                BenchmarkId::new(format!("{n}_nodes"), queued),
                &queued,
                |b, _| b.iter(|| s.schedule()),
            );
            g.finish();
            assert_eq!(s.admitted_len(), slots);
        }
    }
}

criterion_group!(benches, decisions, leader_rounds);
criterion_main!(benches);
