//! The pressure feed: what the fast path tells the slow path about this node's cores
//! (`veraltheim_slowpath::Pressure`), on a `tokio::sync::watch` channel the job runner follows
//! (`RunnerOn::with_pressure`; the rules it applies are in `veraltheim_slowpath::pressure`).
//!
//! - **CPU.** The `PressureSampler` worker (in the AICoordinatorSupervisor) reads this
//!   process's CPU time (`CLOCK_PROCESS_CPUTIME_ID`: every thread of the coordinator — the
//!   execution pool, the tokio workers, in-process batch inference) every [`SAMPLE_EVERY`] and
//!   publishes `fast_path_cpu_millis`, its average over the last [`WINDOW`]
//!   ([`CpuWindow`]). Command jobs are other processes (started through the job shim), so
//!   they are not counted. A restarted sampler starts a new window.
//! - **Objectives at risk.** [`PressureFeed::set_at_risk`] keeps one reason per model (the
//!   node's `ObjectiveWatch`, `crate::objectives`, calls it as a model's latency objective
//!   comes at risk and as it is kept again); `at_risk` is their union, in model order (`model a: why; model b: why`), and
//!   `at_risk_gpus` the union of their GPUs. A value equal to the one published is not
//!   published again, so followers wake only on a change.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;
use veraltheim_slowpath::Pressure;
use veraltheim_supervisor::{ChildContext, ChildSpec};

/// How often the process's CPU time is read.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// What `fast_path_cpu_millis` averages over.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Owns the pressure's sender; see the module documentation. Shared as an `Arc`.
pub struct PressureFeed {
    tx: watch::Sender<Pressure>,
    /// Each model at risk: why, and its GPUs.
    at_risk: Mutex<BTreeMap<String, (String, Vec<u32>)>>,
}

impl PressureFeed {
    pub fn new() -> Arc<Self> {
        Arc::new(PressureFeed {
            tx: watch::Sender::new(Pressure::default()),
            at_risk: Mutex::new(BTreeMap::new()),
        })
    }

    /// A receiver of the pressure, for the job runner.
    pub fn subscribe(&self) -> watch::Receiver<Pressure> {
        self.tx.subscribe()
    }

    /// The pressure as published now.
    #[allow(dead_code)] // For the status tree and tests (issue 17).
    pub fn current(&self) -> Pressure {
        self.tx.borrow().clone()
    }

    /// Model `model`'s latency objective is at risk for `why` (`Some`), on `gpus` (inventory
    /// indices; empty for a CPU model), or no longer (`None`: the model is removed).
    pub fn set_at_risk(&self, model: &str, why: Option<String>, gpus: &[u32]) {
        let mut models = self.at_risk.lock();
        match why {
            Some(why) => {
                models.insert(model.to_owned(), (why, gpus.to_vec()));
            }
            None => {
                models.remove(model);
            }
        }
        let at_risk = (!models.is_empty()).then(|| {
            models
                .iter()
                .map(|(m, (why, _))| format!("model {m}: {why}"))
                .collect::<Vec<_>>()
                .join("; ")
        });
        let at_risk_gpus: Vec<u32> = models
            .values()
            .flat_map(|(_, g)| g.iter().copied())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        // Sent under the lock, so two callers publish in the order they changed the map.
        self.tx.send_if_modified(|p| {
            let changed = p.at_risk != at_risk || p.at_risk_gpus != at_risk_gpus;
            p.at_risk = at_risk;
            p.at_risk_gpus = at_risk_gpus;
            changed
        });
    }

    fn set_cpu(&self, millis: u64) {
        self.tx.send_if_modified(|p| {
            let changed = p.fast_path_cpu_millis != millis;
            p.fast_path_cpu_millis = millis;
            changed
        });
    }

    /// The `PressureSampler` worker; see the module documentation. A process whose CPU time
    /// cannot be read (never on Linux) publishes nothing and says so once.
    pub fn worker(self: &Arc<Self>) -> ChildSpec {
        let feed = self.clone();
        ChildSpec::worker("PressureSampler", move |ctx: ChildContext| {
            let feed = feed.clone();
            async move {
                let start = tokio::time::Instant::now();
                let mut window = CpuWindow::new(WINDOW);
                let mut warned = false;
                loop {
                    match process_cpu_time() {
                        Ok(cpu) => {
                            if let Some(millis) = window.push(start.elapsed(), cpu) {
                                feed.set_cpu(millis);
                            }
                        }
                        Err(e) if !warned => {
                            tracing::warn!(error = %e, "cannot read this process's CPU time: the job CPU capacity does not follow the fast path");
                            warned = true;
                        }
                        Err(_) => {}
                    }
                    tokio::select! {
                        _ = ctx.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(SAMPLE_EVERY) => {}
                    }
                }
            }
        })
    }
}

/// This process's CPU time so far, all its threads, user and system.
pub fn process_cpu_time() -> std::io::Result<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given, which lives on this stack.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u32::try_from(ts.tv_nsec).unwrap_or(0);
    Ok(Duration::new(secs, nanos))
}

/// The CPU a process used over a sliding window, from samples of its CPU time: millicores,
/// i.e. CPU time per wall time × 1000 (2000: two cores busy).
#[derive(Debug)]
pub struct CpuWindow {
    window: Duration,
    /// (when, CPU time then), oldest first.
    samples: VecDeque<(Duration, Duration)>,
}

impl CpuWindow {
    pub fn new(window: Duration) -> Self {
        CpuWindow {
            window,
            samples: VecDeque::new(),
        }
    }

    /// Adds the sample `cpu` (CPU time so far) taken at `at` (any monotonic clock's reading,
    /// later than the last one) and returns the average over the window it covers: from the
    /// oldest sample no more than the window before `at` (the first sample gives `None`).
    pub fn push(&mut self, at: Duration, cpu: Duration) -> Option<u64> {
        if self.samples.back().is_some_and(|(last, _)| *last >= at) {
            return None;
        }
        self.samples.push_back((at, cpu));
        // Keep one sample at or before the window's start: the average covers all of it.
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|(t, _)| at.saturating_sub(*t) >= self.window)
        {
            self.samples.pop_front();
        }
        let (t0, c0) = *self.samples.front()?;
        let wall = at.saturating_sub(t0);
        if wall.is_zero() {
            return None;
        }
        let used = cpu.saturating_sub(c0);
        Some((used.as_nanos() * 1000 / wall.as_nanos()) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    #[test]
    fn the_cpu_is_averaged_over_the_window() {
        let mut w = CpuWindow::new(s(10));
        assert_eq!(w.push(s(0), ms(0)), None);
        // One core busy for a second: 1000 millicores.
        assert_eq!(w.push(s(1), ms(1000)), Some(1000));
        // Then idle for a second: half of it over two.
        assert_eq!(w.push(s(2), ms(1000)), Some(500));
        // Two cores busy for 8 s: (1000 + 16000) / 10 s.
        assert_eq!(w.push(s(10), ms(17_000)), Some(1700));
        // The window slides: from 1 s to 11 s, idle in the last one: 16000 / 10 s.
        assert_eq!(w.push(s(11), ms(17_000)), Some(1600));
        // Idle long enough, and the busy seconds leave the window.
        for t in 12..=21 {
            w.push(s(t), ms(17_000));
        }
        assert_eq!(w.push(s(22), ms(17_000)), Some(0));
        // A sample out of order is ignored.
        assert_eq!(w.push(s(22), ms(99_000)), None);
    }

    #[test]
    fn a_late_sample_covers_the_time_since_the_last_one() {
        // A sampler delayed past the window still averages over the time it covers.
        let mut w = CpuWindow::new(s(10));
        w.push(s(0), ms(0));
        assert_eq!(w.push(s(30), ms(3000)), Some(100));
    }

    #[test]
    fn models_at_risk_are_merged_and_removed() {
        let feed = PressureFeed::new();
        let mut rx = feed.subscribe();
        feed.set_at_risk(
            "b",
            Some("p99 120 ms above the 100 ms objective".into()),
            &[1],
        );
        feed.set_at_risk("a", Some("p99 90 ms, 90% of the objective".into()), &[1, 0]);
        let p = feed.current();
        assert_eq!(
            p.at_risk.as_deref(),
            Some(
                "model a: p99 90 ms, 90% of the objective; model b: p99 120 ms above the 100 ms objective"
            )
        );
        assert_eq!(p.at_risk_gpus, vec![0, 1]);
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        // The same again is not a change.
        feed.set_at_risk("a", Some("p99 90 ms, 90% of the objective".into()), &[0, 1]);
        assert!(!rx.has_changed().unwrap());
        feed.set_at_risk("b", None, &[]);
        let p = feed.current();
        assert_eq!(
            p.at_risk.as_deref(),
            Some("model a: p99 90 ms, 90% of the objective")
        );
        assert_eq!(p.at_risk_gpus, vec![0, 1]);
        feed.set_at_risk("a", None, &[]);
        assert_eq!(feed.current(), Pressure::default());
        // Removing a model not at risk changes nothing.
        rx.borrow_and_update();
        feed.set_at_risk("c", None, &[]);
        assert!(!rx.has_changed().unwrap());
    }

    #[test]
    fn this_process_cpu_time_grows_with_work() {
        let before = process_cpu_time().unwrap();
        let mut x = 0u64;
        // Work until the clock moves: bounded by the clock's resolution, not by a time.
        while process_cpu_time().unwrap() == before {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        assert!(process_cpu_time().unwrap() > before);
    }
}
