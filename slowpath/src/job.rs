//! A job's specification and lifecycle.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum JobError {
    #[error("job spec: {0}")]
    InvalidSpec(String),
    #[error("job cannot go from {from} to {to}")]
    IllegalTransition { from: JobState, to: JobState },
}

/// The lifecycle: QUEUED → ADMITTED → RUNNING → SUCCEEDED | FAILED | CANCELLED | TIMED_OUT, with
/// RETRY_WAIT between attempts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    Queued,
    Admitted,
    Running,
    RetryWait,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
}

impl JobState {
    pub const ALL: [JobState; 8] = [
        JobState::Queued,
        JobState::Admitted,
        JobState::Running,
        JobState::RetryWait,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::TimedOut,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::TimedOut
        )
    }

    fn allows(self, to: JobState) -> bool {
        use JobState::*;
        match (self, to) {
            (from, _) if from.is_terminal() => false,
            // Cancellation and deadlines end a job from any live state.
            (_, Cancelled | TimedOut) => true,
            (Queued, Admitted) => true,
            (Admitted, Running) => true,
            // An admitted job whose start fails (e.g. image pull error) may retry or fail.
            (Admitted | Running, RetryWait | Failed) => true,
            (Running, Succeeded) => true,
            (RetryWait, Queued) => true,
            // A coordinator restart puts jobs that were admitted but not started back in line.
            (Admitted, Queued) => true,
            _ => false,
        }
    }

    /// The next state, or an error naming the illegal edge.
    pub fn transition(self, to: JobState) -> Result<JobState, JobError> {
        if self.allows(to) {
            Ok(to)
        } else {
            Err(JobError::IllegalTransition { from: self, to })
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "QUEUED",
            JobState::Admitted => "ADMITTED",
            JobState::Running => "RUNNING",
            JobState::RetryWait => "RETRY_WAIT",
            JobState::Succeeded => "SUCCEEDED",
            JobState::Failed => "FAILED",
            JobState::Cancelled => "CANCELLED",
            JobState::TimedOut => "TIMED_OUT",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a job asks for while it runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub gpus: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobKind {
    Command {
        image: String,
        command: Vec<String>,
        env: BTreeMap<String, String>,
        working_dir: String,
    },
    Inference {
        model: String,
        input_path: String,
        output_path: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub name: String,
    pub queue: String,
    pub priority_class: String,
    pub resources: Resources,
    pub max_retries: u32,
    pub deadline_seconds: Option<u64>,
    /// Seconds a finished job (and its logs) is kept before it is deleted; `None`: kept.
    /// Records written before the field existed read as `None`.
    #[serde(default)]
    pub ttl_seconds_after_finished: Option<u64>,
    pub labels: BTreeMap<String, String>,
    pub idempotency_key: Option<String>,
    pub kind: JobKind,
}

/// Names follow the Kubernetes label-value rules, since a job's name and queue end up on pods.
fn check_name(what: &str, value: &str) -> Result<(), JobError> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(JobError::InvalidSpec(format!(
            "{what} '{value}' must be 1-63 characters of letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        )))
    }
}

/// Most retries a job may ask for; beyond it a failing job would occupy the queue for hours.
pub const MAX_RETRIES_LIMIT: u32 = 100;

/// The longest deadline a job may ask for (a year): beyond it a deadline is refused at submit
/// rather than overflow a clock once the job runs.
pub const MAX_DEADLINE_SECONDS: u64 = 366 * 24 * 3600;

impl JobSpec {
    pub fn validate(&self) -> Result<(), JobError> {
        check_name("name", &self.name)?;
        check_name("queue", &self.queue)?;
        if !self.priority_class.is_empty() {
            check_name("priority class", &self.priority_class)?;
        }
        if self.max_retries > MAX_RETRIES_LIMIT {
            return Err(JobError::InvalidSpec(format!(
                "max_retries {} is above the limit of {MAX_RETRIES_LIMIT}",
                self.max_retries
            )));
        }
        match self.deadline_seconds {
            Some(0) => {
                return Err(JobError::InvalidSpec(
                    "deadline_seconds must be positive when given".into(),
                ));
            }
            Some(d) if d > MAX_DEADLINE_SECONDS => {
                return Err(JobError::InvalidSpec(format!(
                    "deadline_seconds {d} is above the limit of {MAX_DEADLINE_SECONDS} (a year)"
                )));
            }
            _ => {}
        }
        match &self.kind {
            JobKind::Command { command, .. } if command.is_empty() => Err(JobError::InvalidSpec(
                "a command job needs a command to run".into(),
            )),
            JobKind::Inference {
                model,
                input_path,
                output_path,
            } if model.is_empty() || input_path.is_empty() || output_path.is_empty() => {
                Err(JobError::InvalidSpec(
                    "an inference job needs a model, an input path and an output path".into(),
                ))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JobSpec {
        JobSpec {
            name: "nightly-embed".into(),
            queue: "research".into(),
            priority_class: String::new(),
            resources: Resources::default(),
            max_retries: 3,
            deadline_seconds: None,
            ttl_seconds_after_finished: None,
            labels: BTreeMap::new(),
            idempotency_key: None,
            kind: JobKind::Command {
                image: "busybox".into(),
                command: vec!["true".into()],
                env: BTreeMap::new(),
                working_dir: String::new(),
            },
        }
    }

    #[test]
    fn the_happy_path_and_retries_are_legal() {
        use JobState::*;
        let path = [
            Queued, Admitted, Running, RetryWait, Queued, Admitted, Running, Succeeded,
        ];
        let mut s = path[0];
        for next in &path[1..] {
            s = s.transition(*next).unwrap();
        }
        assert_eq!(s, Succeeded);
    }

    #[test]
    fn terminal_states_are_final_and_shortcuts_illegal() {
        for from in JobState::ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in JobState::ALL {
                assert!(from.transition(to).is_err(), "{from} -> {to}");
            }
        }
        let err = JobState::Queued
            .transition(JobState::Succeeded)
            .unwrap_err();
        assert_eq!(err.to_string(), "job cannot go from QUEUED to SUCCEEDED");
        assert!(JobState::Queued.transition(JobState::Running).is_err());
        assert!(JobState::RetryWait.transition(JobState::Running).is_err());
    }

    #[test]
    fn every_live_state_can_be_cancelled() {
        for from in JobState::ALL.into_iter().filter(|s| !s.is_terminal()) {
            assert_eq!(
                from.transition(JobState::Cancelled),
                Ok(JobState::Cancelled)
            );
        }
    }

    #[test]
    fn specs_are_validated_with_reasons() {
        assert!(spec().validate().is_ok());
        let mut s = spec();
        s.name = "-bad".into();
        assert!(s.validate().unwrap_err().to_string().contains("'-bad'"));
        let mut s = spec();
        s.kind = JobKind::Command {
            image: String::new(),
            command: vec![],
            env: BTreeMap::new(),
            working_dir: String::new(),
        };
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("needs a command")
        );
        let mut s = spec();
        s.max_retries = 1000;
        assert!(s.validate().is_err());
        let mut s = spec();
        s.deadline_seconds = Some(0);
        assert!(s.validate().is_err());
        s.deadline_seconds = Some(u64::MAX);
        let err = s.validate().unwrap_err().to_string();
        assert!(
            err.contains("deadline_seconds") && err.contains("limit"),
            "{err}"
        );
        s.deadline_seconds = Some(MAX_DEADLINE_SECONDS);
        assert!(s.validate().is_ok());
        s.deadline_seconds = Some(0);
        assert!(s.validate().is_err());
    }
}
