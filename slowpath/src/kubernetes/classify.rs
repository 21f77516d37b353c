//! Reading a `batch/v1` Job and its pods into an [`Outcome`], as pure functions: no I/O.
//!
//! - Job `Complete` (or `status.succeeded`): [`Outcome::Exited`]`(0)`.
//! - Job `Failed` with reason `DeadlineExceeded`: [`Outcome::TimedOut`].
//! - Job `Failed` otherwise, by its newest pod: a disruption (the pod's `DisruptionTarget`
//!   condition, or a pod reason such as `Evicted`, `NodeLost`, `Preempting`, `Shutdown`) or a
//!   pod that is gone is an infrastructure failure; a container that terminated with a non-zero
//!   exit code is the job's own failure ([`Outcome::Exited`]).
//! - A pod stuck on its image (`ImagePullBackOff`, `InvalidImageName`, ...)
//!   never fails its Job by itself (it would wait until the deadline): [`pending_failure`] calls
//!   it an infrastructure failure, and the executor deletes the Job.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;

use crate::executor::Outcome;

/// The container every attempt's pod runs.
pub const CONTAINER: &str = "job";

/// Container waiting reasons that mean the attempt cannot start on this infrastructure. A first
/// `ErrImagePull` (or `CreateContainerError`) may pass; the kubelet's back-off after it does not.
const STUCK_REASONS: [&str; 4] = [
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
];

/// Pod-level reasons (`status.reason`) under which the node, not the command, ended the pod.
const DISRUPTION_REASONS: [&str; 9] = [
    "Evicted",
    "NodeLost",
    "Preempting",
    "Shutdown",
    "Terminated",
    "NodeShutdown",
    "UnexpectedAdmissionError",
    "NodeAffinity",
    "OutOfpods",
];

fn condition_true(job: &Job, kind: &str) -> Option<(String, String)> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    conditions
        .iter()
        .find(|c| c.type_ == kind && c.status == "True")
        .map(|c| {
            (
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default(),
            )
        })
}

/// Whether the Job has finished, and how; `None` while it runs (or waits for its pod).
pub fn finished(job: &Job, pods: &[Pod]) -> Option<Outcome> {
    let status = job.status.as_ref();
    if condition_true(job, "Complete").is_some()
        || status.and_then(|s| s.succeeded).unwrap_or(0) > 0
    {
        return Some(Outcome::Exited(0));
    }
    let (reason, message) = condition_true(job, "Failed")?;
    if reason == "DeadlineExceeded" {
        return Some(Outcome::TimedOut);
    }
    Some(failed_by_pod(&reason, &message, newest(pods)))
}

/// The newest pod (by creation time, then name).
pub fn newest(pods: &[Pod]) -> Option<&Pod> {
    pods.iter().max_by(|a, b| {
        let key = |p: &Pod| {
            (
                p.metadata.creation_timestamp.clone(),
                p.metadata.name.clone(),
            )
        };
        key(a).cmp(&key(b))
    })
}

fn failed_by_pod(job_reason: &str, job_message: &str, pod: Option<&Pod>) -> Outcome {
    let Some(pod) = pod else {
        return Outcome::Infrastructure(format!(
            "the Job failed ({job_reason}) and its pod is gone (node lost or pod deleted)"
        ));
    };
    if let Some(why) = disruption(pod) {
        return Outcome::Infrastructure(why);
    }
    if let Some(terminated) = container_state(pod).and_then(|s| s.terminated.as_ref()) {
        if terminated.exit_code != 0 {
            return Outcome::Exited(terminated.exit_code);
        }
        return Outcome::Infrastructure(format!(
            "the Job failed ({job_reason}) though its container exited with code 0"
        ));
    }
    if let Some(why) = pending_failure(pod) {
        return Outcome::Infrastructure(why);
    }
    Outcome::Infrastructure(format!(
        "the Job failed ({job_reason}: {job_message}) before its container ran"
    ))
}

fn container_state(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::ContainerState> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    statuses
        .iter()
        .find(|s| s.name == CONTAINER)
        .or_else(|| statuses.first())?
        .state
        .as_ref()
}

/// Why the node (not the command) ended this pod, if it did.
pub fn disruption(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    if let Some(c) = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "DisruptionTarget" && c.status == "True")
    {
        return Some(format!(
            "pod {} disrupted: {}{}",
            pod.metadata.name.as_deref().unwrap_or("?"),
            c.reason.as_deref().unwrap_or("DisruptionTarget"),
            c.message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        ));
    }
    let reason = status.reason.as_deref()?;
    DISRUPTION_REASONS.contains(&reason).then(|| {
        format!(
            "pod {} {}{}",
            pod.metadata.name.as_deref().unwrap_or("?"),
            reason,
            status
                .message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        )
    })
}

/// Why a pod that has not started never will on its own (its image cannot be pulled, its
/// container cannot be created), if so.
pub fn pending_failure(pod: &Pod) -> Option<String> {
    let waiting = container_state(pod)?.waiting.as_ref()?;
    let reason = waiting.reason.as_deref()?;
    STUCK_REASONS.contains(&reason).then(|| {
        let what = if reason.contains("Image") {
            "image pull error"
        } else {
            "container cannot be created"
        };
        format!(
            "{what}: {reason}{}",
            waiting
                .message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        )
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus,
        PodCondition, PodStatus,
    };

    use super::*;

    fn job(kind: &str, reason: &str) -> Job {
        Job {
            status: Some(JobStatus {
                conditions: Some(vec![JobCondition {
                    type_: kind.into(),
                    status: "True".into(),
                    reason: Some(reason.into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn pod(state: ContainerState, reason: Option<&str>, disrupted: bool) -> Pod {
        Pod {
            status: Some(PodStatus {
                reason: reason.map(Into::into),
                conditions: disrupted.then(|| {
                    vec![PodCondition {
                        type_: "DisruptionTarget".into(),
                        status: "True".into(),
                        reason: Some("TerminationByKubelet".into()),
                        ..Default::default()
                    }]
                }),
                container_statuses: Some(vec![ContainerStatus {
                    name: CONTAINER.into(),
                    state: Some(state),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn terminated(code: i32) -> ContainerState {
        ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: code,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn waiting(reason: &str) -> ContainerState {
        ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.into()),
                message: Some("back-off pulling image".into()),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn complete_deadline_and_exit_codes() {
        assert_eq!(
            finished(&job("Complete", ""), &[]),
            Some(Outcome::Exited(0))
        );
        assert_eq!(
            finished(&job("Failed", "DeadlineExceeded"), &[]),
            Some(Outcome::TimedOut)
        );
        let p = pod(terminated(3), None, false);
        assert_eq!(
            finished(&job("Failed", "BackoffLimitExceeded"), &[p]),
            Some(Outcome::Exited(3))
        );
        assert_eq!(finished(&Job::default(), &[]), None);
        // A condition that is not True does not count.
        let mut j = job("Complete", "");
        j.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].status = "False".into();
        assert_eq!(finished(&j, &[]), None);
    }

    #[test]
    fn disruptions_and_lost_pods_are_the_infrastructures_fault() {
        let failed = job("Failed", "BackoffLimitExceeded");
        // Evicted: a non-zero exit code, but the kubelet killed it.
        let evicted = pod(terminated(137), Some("Evicted"), false);
        assert!(matches!(
            finished(&failed, &[evicted]),
            Some(Outcome::Infrastructure(why)) if why.contains("Evicted")
        ));
        let disrupted = pod(terminated(137), None, true);
        assert!(matches!(
            finished(&failed, &[disrupted]),
            Some(Outcome::Infrastructure(why)) if why.contains("TerminationByKubelet")
        ));
        assert!(matches!(
            finished(&failed, &[]),
            Some(Outcome::Infrastructure(why)) if why.contains("pod is gone")
        ));
    }

    #[test]
    fn image_pull_errors_are_seen_while_pending() {
        let stuck = pod(waiting("ImagePullBackOff"), None, false);
        let why = pending_failure(&stuck).unwrap();
        assert!(
            why.starts_with("image pull error: ImagePullBackOff"),
            "{why}"
        );
        for passing in ["ContainerCreating", "ErrImagePull"] {
            assert_eq!(pending_failure(&pod(waiting(passing), None, false)), None);
        }
    }
}
