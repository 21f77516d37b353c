//! What the fast path tells the slow path about the node's cores: [`Pressure`], published by the
//! coordinator on a `tokio::sync::watch` channel and followed by the runner
//! (`RunnerOn::with_pressure`).
//!
//! Two rules follow from it, both applied by the runner:
//!
//! 1. **Capacity.** The job scheduler's CPU capacity on this node is the configured one less what
//!    the fast path (the coordinator process: online requests, batch inference jobs) used over
//!    the last window, never below a floor ([`job_cpu_capacity`]). Only admission follows it:
//!    a running job is never stopped because the capacity fell below what the running jobs
//!    hold. A job that waits for CPU says so, with what the fast path took
//!    ([`lowered_note`]).
//! 2. **Pause.** While [`Pressure::at_risk`] is set (a latency objective is at risk), the running
//!    local command jobs that may be paused ([`pausable`]) are stopped (SIGSTOP of their
//!    process group) and continued (SIGCONT) once it clears. A job's state stays RUNNING; its
//!    record says that it is paused, since when, and the time paused so far. No PAUSED state:
//!    a paused job still holds its resources and its slot, is cancelled, times out and ends
//!    exactly as a running one (every edge out of RUNNING applies), and a state would add edges
//!    to every path (recovery, adoption, a cluster's placements) for what is a flag of the
//!    running attempt. Its deadline counts running time only: it moves later by each pause.
//!
//! Which jobs may be paused: a job's spec says so (`pausable`); without it, a job of the lowest
//! priority class a job can have (the empty class, which ranks below every configured one; or,
//! with classes configured, the last of them) may be paused, and a job of any higher class may
//! not. Pausing is a preemption-like act on someone's work: as in Kueue, where only lower
//! priority workloads are preempted, a job submitted at a higher class is left alone unless it
//! opts in, while best-effort work (no class, or the lowest) is what the objective may push
//! aside unless it opts out.

use std::time::Duration;

/// What the fast path asks of the slow path now; see the module documentation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pressure {
    /// Millicores the fast path (the coordinator process) used, averaged over the last window.
    pub fast_path_cpu_millis: u64,
    /// Set while a latency objective is at risk: names the model(s) and why. Running local jobs
    /// are paused (SIGSTOP of their process group) while it is set and resumed after.
    pub at_risk: Option<String>,
    /// GPUs (inventory indices) on which a model with an objective is at risk: GPU jobs on
    /// those devices are paused too (item 4). Empty: none.
    pub at_risk_gpus: Vec<u32>,
}

/// The least time between two pause decisions of the runner (pause, then resume, or the
/// reverse): a flapping signal does not stop and continue jobs faster than this.
pub const MIN_PAUSE_FLIP: Duration = Duration::from_millis(500);

/// The CPU (millicores) the job scheduler may give jobs on a node configured with `configured`
/// while the fast path uses `fast_path`: what the fast path leaves, but never less than `floor`
/// (nor more than `configured`, whatever the floor).
pub fn job_cpu_capacity(configured: u64, fast_path: u64, floor: u64) -> u64 {
    configured
        .saturating_sub(fast_path)
        .max(floor.min(configured))
}

/// The words a job waiting for CPU gets appended when the fast path lowered the capacity:
/// `the fast path uses 1500m of the configured 3500m`. `None` when it did not lower it.
pub fn lowered_note(configured: u64, capacity: u64) -> Option<String> {
    (capacity < configured).then(|| {
        format!(
            "the fast path uses {}m of the configured {configured}m",
            configured - capacity
        )
    })
}

/// Whether a job may be paused: its spec's choice (`explicit`), or by default whether its
/// priority class is the lowest one a job can have: the empty class, or the last of the
/// configured `classes`.
pub fn pausable(explicit: Option<bool>, class: &str, classes: &[String]) -> bool {
    explicit.unwrap_or_else(|| class.is_empty() || classes.last().is_some_and(|c| c == class))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_capacity_is_what_the_fast_path_leaves_never_below_the_floor() {
        assert_eq!(job_cpu_capacity(4000, 0, 0), 4000);
        assert_eq!(job_cpu_capacity(4000, 1500, 0), 2500);
        assert_eq!(job_cpu_capacity(4000, 4000, 0), 0);
        // The fast path may use more than the jobs were configured (other cores).
        assert_eq!(job_cpu_capacity(2000, 7000, 0), 0);
        assert_eq!(job_cpu_capacity(2000, 7000, 500), 500);
        assert_eq!(job_cpu_capacity(2000, 1000, 500), 1000);
        // A floor above the configured capacity gives no more than configured.
        assert_eq!(job_cpu_capacity(2000, 0, 9000), 2000);
        assert_eq!(job_cpu_capacity(u64::MAX, 5, 0), u64::MAX - 5);
    }

    #[test]
    fn the_note_says_what_the_fast_path_took_only_when_it_took_some() {
        assert_eq!(lowered_note(4000, 4000), None);
        assert_eq!(
            lowered_note(3500, 2000).as_deref(),
            Some("the fast path uses 1500m of the configured 3500m")
        );
    }

    #[test]
    fn by_default_only_the_lowest_class_is_paused() {
        let classes = vec!["high".to_string(), "batch".to_string()];
        assert!(pausable(None, "", &classes));
        assert!(pausable(None, "batch", &classes));
        assert!(!pausable(None, "high", &classes));
        assert!(pausable(None, "", &[]));
        // The spec's choice wins both ways.
        assert!(pausable(Some(true), "high", &classes));
        assert!(!pausable(Some(false), "", &classes));
    }
}
