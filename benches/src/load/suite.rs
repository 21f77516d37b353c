//! `veraltheim-load suite`: the baselines and the coordinator in one run, same payload and load,
//! and the ratios between them.

use std::path::PathBuf;

use anyhow::Context as _;
use serde::Serialize;
use tokio::sync::oneshot;

use super::args::{LoadSpec, Mode, SuiteArgs, compute_plan};
use super::client::run_load;
use super::compute::{ComputeReport, compute_ceiling};
use super::coordinator::{Coordinator, ServerSide, default_binary};
use super::echo::EchoServer;
use super::report::LoadReport;

/// The targets for the first model's closed loop against the echo server.
pub const TARGET_THROUGHPUT_RATIO: f64 = 0.85;
pub const TARGET_P99_RATIO: f64 = 1.5;

#[derive(Clone, Debug, Serialize)]
pub struct Against {
    /// Coordinator throughput / echo throughput.
    pub throughput_ratio: f64,
    /// Coordinator p99 / echo p99.
    pub p99_ratio: f64,
    pub p50_ratio: f64,
    /// Echo (client + server) CPU µs per request / coordinator (client + server) CPU µs per
    /// request: the throughput ratio the two would have with the same CPU, which other tenants
    /// of a shared machine disturb much less than throughput itself.
    pub equal_cpu_throughput_ratio: Option<f64>,
}

/// One echo-server run; `round` pairs it with the coordinator run that follows it.
#[derive(Clone, Debug, Serialize)]
pub struct EchoRun {
    pub round: usize,
    pub load: LoadReport,
}

#[derive(Clone, Debug, Serialize)]
pub struct CoordinatorRun {
    pub round: usize,
    pub load: LoadReport,
    /// The coordinator's ModelStatistics over the measured window: average batch
    /// (Δinference_count / Δexecution_count), queue and in-server times, execute busy share.
    pub server: ServerSide,
    pub vs_echo: Option<Against>,
    /// Items served per second / the in-process model's best items per second.
    pub vs_compute: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Targets {
    pub model: String,
    pub concurrency: usize,
    /// Each round's coordinator/echo ratios; the verdicts use their medians.
    pub throughput_ratios: Vec<f64>,
    pub p99_ratios: Vec<f64>,
    /// Each round's throughput ratio at equal CPU (see [`Against`]), and their median.
    pub equal_cpu_throughput_ratios: Vec<f64>,
    pub equal_cpu_throughput_ratio: f64,
    pub throughput_ratio: f64,
    pub throughput_met: bool,
    pub p99_ratio: f64,
    pub p99_met: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct SuiteReport {
    pub cores: usize,
    pub veraltheim_bin: String,
    pub compute: Vec<ComputeReport>,
    pub echo: Vec<EchoRun>,
    pub coordinator: Vec<CoordinatorRun>,
    pub targets: Option<Targets>,
}

/// The median (mean of the middle two for an even count); NaN for none.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn mode_name(spec: &LoadSpec) -> String {
    match spec.mode {
        Mode::Closed { concurrency, .. } => format!("closed c={concurrency}"),
        Mode::Open { rate, .. } => format!("open {rate}/s"),
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { f64::NAN }
}

/// `run` against the echo `baseline` (same mode).
pub fn against(run: &LoadReport, baseline: &LoadReport) -> Against {
    Against {
        throughput_ratio: ratio(run.throughput_rps, baseline.throughput_rps),
        p99_ratio: ratio(
            run.latency_us.p99_us as f64,
            baseline.latency_us.p99_us as f64,
        ),
        p50_ratio: ratio(
            run.latency_us.p50_us as f64,
            baseline.latency_us.p50_us as f64,
        ),
        equal_cpu_throughput_ratio: run.cpu.as_ref().zip(baseline.cpu.as_ref()).and_then(
            |(r, b)| {
                Some(ratio(
                    b.total_us_per_request(baseline.throughput_rps)?,
                    r.total_us_per_request(run.throughput_rps)?,
                ))
            },
        ),
    }
}

fn same_load(a: &LoadReport, b: &LoadReport) -> bool {
    a.mode == b.mode && a.concurrency == b.concurrency && a.rate == b.rate && a.shape == b.shape
}

pub async fn suite(args: &SuiteArgs) -> anyhow::Result<SuiteReport> {
    args.validate().map_err(anyhow::Error::msg)?;
    let binary: PathBuf = match &args.veraltheim_bin {
        Some(p) => p.clone(),
        None => default_binary()?,
    };
    let say = |s: &str| {
        if !args.json {
            eprintln!("# {s}");
        }
    };
    let (batch_sizes, per_size) =
        compute_plan(&args.batch_sizes, args.compute_duration).map_err(anyhow::Error::msg)?;

    // 1. Compute ceilings, with nothing else running.
    let mut compute = Vec::new();
    for m in &args.models {
        say(&format!("compute ceiling of '{m}'"));
        let (m, shape, sizes) = (m.clone(), args.shape.clone(), batch_sizes.clone());
        let r = tokio::task::spawn_blocking(move || compute_ceiling(&m, &shape, &sizes, per_size))
            .await??;
        compute.push(r);
    }

    // 2. The servers: the echo server (gRPC ceiling) and the coordinator, both up for the whole
    //    run; the first model's closed loop alternates between them round by round, so that
    //    each coordinator figure has an echo figure measured just before it on the same machine.
    let first = &args.models[0];
    let echo_server = EchoServer::start(args.echo_threads)?;
    let echo_addr = echo_server.addr().to_string();
    say(&format!(
        "echo server (tonic transport server) on {echo_addr}"
    ));
    let coordinator = Coordinator::start(&binary, &args.models, args.execution_threads)
        .await
        .with_context(|| format!("starting {}", binary.display()))?;
    let addr = coordinator.addr().to_string();
    say(&format!("coordinator {} on {addr}", binary.display()));

    let mut echo: Vec<EchoRun> = Vec::new();
    let mut runs: Vec<CoordinatorRun> = Vec::new();
    let (closed, open) = args.specs(first).map_err(anyhow::Error::msg)?;
    // (round, spec, also against echo)
    let mut plan: Vec<(usize, LoadSpec, bool)> = Vec::new();
    for round in 1..=args.rounds {
        plan.push((round, closed.clone(), true));
    }
    if let Some(open) = open {
        plan.push((1, open, true));
    }
    for m in args.models.iter().skip(1) {
        plan.push((1, args.specs(m).map_err(anyhow::Error::msg)?.0, false));
    }
    for (round, spec, with_echo) in plan {
        if with_echo {
            say(&format!(
                "round {round}: echo, {} {}",
                spec.model,
                mode_name(&spec)
            ));
            let load = run_load("echo", &echo_addr, &spec, None, None).await?;
            echo.push(EchoRun { round, load });
        }
        say(&format!(
            "round {round}: coordinator, {} {}",
            spec.model,
            mode_name(&spec)
        ));
        let m = spec.model.clone();
        let (tx, rx) = oneshot::channel();
        let at_start = async {
            let _ = rx.await;
            coordinator.counts(&m).await
        };
        let (load, before) = tokio::join!(
            run_load("coordinator", &addr, &spec, coordinator.pid(), Some(tx)),
            at_start
        );
        let load = load?;
        let before = before.unwrap_or_default();
        let after = coordinator.counts(&m).await.unwrap_or_default();
        let window = load.cpu.as_ref().map_or(load.window_s, |c| c.wall_s);
        // The echo run of the same round and load; for the other models, the first model's
        // echo run (same payload shape and concurrency).
        let baseline = echo
            .iter()
            .filter(|e| e.round == round && same_load(&e.load, &load))
            .map(|e| &e.load)
            .next_back();
        let best = compute.iter().find(|c| c.model == m);
        let items_per_s = load.throughput_rps * args.shape.rows() as f64;
        runs.push(CoordinatorRun {
            round,
            server: after.since(&before, window),
            vs_echo: baseline.map(|b| against(&load, b)),
            vs_compute: best.map(|c| ratio(items_per_s, c.best_items_per_s)),
            load,
        });
    }
    let status = coordinator.stop().await?;
    if !status.success() {
        eprintln!("warning: the coordinator exited with {status} after SIGTERM");
    }
    echo_server.stop()?;

    let pairs: Vec<&Against> = runs
        .iter()
        .filter(|r| &r.load.model == first && r.load.mode == "closed")
        .filter_map(|r| r.vs_echo.as_ref())
        .collect();
    let targets = (!pairs.is_empty()).then(|| {
        let tput: Vec<f64> = pairs.iter().map(|a| a.throughput_ratio).collect();
        let p99: Vec<f64> = pairs.iter().map(|a| a.p99_ratio).collect();
        let eq: Vec<f64> = pairs
            .iter()
            .map(|a| a.equal_cpu_throughput_ratio.unwrap_or(f64::NAN))
            .collect();
        let (t, p) = (median(&tput), median(&p99));
        Targets {
            model: first.clone(),
            concurrency: args.concurrency,
            throughput_ratio: t,
            throughput_met: t >= TARGET_THROUGHPUT_RATIO,
            p99_ratio: p,
            p99_met: p <= TARGET_P99_RATIO,
            throughput_ratios: tput,
            p99_ratios: p99,
            equal_cpu_throughput_ratio: median(&eq),
            equal_cpu_throughput_ratios: eq,
        }
    });
    Ok(SuiteReport {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        veraltheim_bin: binary.display().to_string(),
        compute,
        echo,
        coordinator: runs,
        targets,
    })
}

impl SuiteReport {
    pub fn text(&self) -> String {
        let mut s = String::new();
        for c in &self.compute {
            s.push_str(&c.lines());
        }
        for r in &self.coordinator {
            for e in self
                .echo
                .iter()
                .filter(|e| e.round == r.round && same_load(&e.load, &r.load))
                .filter(|e| r.load.model == e.load.model)
            {
                s.push_str(&format!("[{}] {}\n", e.round, e.load.line()));
            }
            s.push_str(&format!("[{}] {}\n", r.round, r.load.line()));
            let mut extra = Vec::new();
            if let Some(a) = &r.vs_echo {
                extra.push(format!(
                    "vs echo: throughput ×{:.3} (at equal CPU ×{}), p50 ×{:.2}, p99 ×{:.2}",
                    a.throughput_ratio,
                    a.equal_cpu_throughput_ratio
                        .map_or("?".to_string(), |x| format!("{x:.3}")),
                    a.p50_ratio,
                    a.p99_ratio
                ));
            }
            if let Some(v) = r.vs_compute {
                if v >= 0.001 {
                    extra.push(format!("served/compute-ceiling ×{v:.3}"));
                } else {
                    extra.push(format!("served/compute-ceiling ×{v:.1e}"));
                }
            }
            let v = &r.server;
            if let Some(b) = v.average_batch {
                extra.push(format!(
                    "average batch {b:.2} ({} inferences / {} executions)",
                    v.inferences, v.executions
                ));
            }
            let opt = |x: Option<f64>| x.map_or("?".to_string(), |x| format!("{x:.0}"));
            extra.push(format!(
                "server: queue {} µs, in-server {} µs (means), execute busy {}",
                opt(v.mean_queue_us),
                opt(v.mean_in_server_us),
                v.execute_busy
                    .map_or("?".to_string(), |b| format!("{:.0}%", b * 100.0))
            ));
            s.push_str(&format!("                 {}\n", extra.join("; ")));
        }
        if let Some(t) = &self.targets {
            let yes = |b: bool| if b { "met" } else { "NOT met" };
            let list = |v: &[f64]| {
                v.iter()
                    .map(|x| format!("{x:.3}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            s.push_str(&format!(
                "targets ({} c={}, median of {} round(s); throughput ratios {}; at equal CPU {}; p99 ratios {}): throughput ×{:.3} (at equal CPU ×{:.3}) (≥ {TARGET_THROUGHPUT_RATIO}: {}), p99 ×{:.2} (≤ {TARGET_P99_RATIO}: {})\n",
                t.model,
                t.concurrency,
                t.throughput_ratios.len(),
                list(&t.throughput_ratios),
                list(&t.equal_cpu_throughput_ratios),
                list(&t.p99_ratios),
                t.throughput_ratio,
                t.equal_cpu_throughput_ratio,
                yes(t.throughput_met),
                t.p99_ratio,
                yes(t.p99_met)
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::report::Latency;

    fn rep(rps: f64, p50: u64, p99: u64) -> LoadReport {
        LoadReport {
            target: "x".into(),
            model: "identity".into(),
            shape: "1x16".into(),
            mode: "closed",
            concurrency: Some(64),
            rate: None,
            channels: 4,
            window_s: 1.0,
            requests: rps as u64,
            throughput_rps: rps,
            latency_us: Latency {
                p50_us: p50,
                p99_us: p99,
                ..Default::default()
            },
            errors: Default::default(),
            error_latency_us: None,
            client_shed: None,
            send_lag_us: None,
            cpu: None,
            payload_requests: Vec::new(),
        }
    }

    #[test]
    fn ratios_are_run_over_baseline() {
        let a = against(&rep(8000.0, 300, 1500), &rep(10000.0, 200, 1000));
        assert_eq!(a.throughput_ratio, 0.8);
        assert_eq!(a.p99_ratio, 1.5);
        assert_eq!(a.p50_ratio, 1.5);
        assert!(
            against(&rep(1.0, 1, 1), &rep(0.0, 0, 0))
                .throughput_ratio
                .is_nan()
        );
    }

    #[test]
    fn equal_cpu_ratio_compares_cpu_per_request() {
        use crate::load::cpu::CpuUse;
        let with_cpu = |rps: f64, client: f64, server: f64| {
            let mut r = rep(rps, 1, 1);
            r.cpu = Some(CpuUse {
                wall_s: 1.0,
                client_cores: client,
                server_cores: Some(server),
                ..Default::default()
            });
            r
        };
        // Echo: 2 cores for 50 000 req/s = 40 µs per request; coordinator: 1.5 cores for
        // 25 000 req/s = 60 µs per request: at equal CPU it would serve 40/60 of the echo.
        let a = against(&with_cpu(25_000.0, 0.5, 1.0), &with_cpu(50_000.0, 1.0, 1.0));
        assert_eq!(a.throughput_ratio, 0.5);
        assert!((a.equal_cpu_throughput_ratio.unwrap() - 40.0 / 60.0).abs() < 1e-9);
        assert!(
            against(&rep(1.0, 1, 1), &rep(1.0, 1, 1))
                .equal_cpu_throughput_ratio
                .is_none()
        );
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[0.8]), 0.8);
        assert!(median(&[]).is_nan());
        assert_eq!(median(&[f64::NAN, 1.0]), 1.0);
    }

    #[test]
    fn baselines_match_only_the_same_load() {
        let a = rep(1.0, 1, 1);
        let mut b = rep(2.0, 2, 2);
        assert!(same_load(&a, &b));
        b.concurrency = Some(8);
        assert!(!same_load(&a, &b));
    }
}
