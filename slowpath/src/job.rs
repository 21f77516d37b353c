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
    /// GPU memory the job takes on each of its `gpus`, in bytes; 0: the whole of each GPU.
    /// On a node whose runner has [`crate::gpu::GpuReservations`] (local jobs), it is held in
    /// the model allocator's budget while an attempt runs. Not a scheduler dimension (node
    /// capacities leave it 0). Records written before the field existed read as 0.
    #[serde(default)]
    pub gpu_memory_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobKind {
    Command {
        image: String,
        command: Vec<String>,
        env: BTreeMap<String, String>,
        working_dir: String,
        /// Kubernetes: the container's root filesystem is writable (it is read-only otherwise,
        /// with an empty `/tmp`). The local executor ignores it. Records written before the
        /// field existed read as false.
        #[serde(default)]
        writable_root: bool,
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
    /// Who submitted the job, when the server authenticates its callers: the job is its
    /// tenant's (listed, read and cancelled by that tenant only, unless `jobs.admin`), and its
    /// idempotency key is the tenant's own. `None` without authentication; records written
    /// before the field existed read as `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    /// Whether the job may be paused (SIGSTOP of its process group) while a latency objective
    /// of the fast path is at risk; `None`: the default, which pauses jobs of the lowest
    /// priority class only (see [`crate::pressure::pausable`]). Only local command jobs are
    /// ever paused. Records written before the field existed read as `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pausable: Option<bool>,
}

/// The principal that submitted a job, and its tenant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub principal: String,
    pub tenant: String,
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

/// Most labels a job may carry. Labels are stored with the job and sent in every `ListJobs`
/// page that holds it, so their size bounds the store and the pages (issue 18, case 4).
pub const MAX_LABELS: usize = 64;
/// Most bytes of one label's key plus its value.
pub const MAX_LABEL_BYTES: usize = 1024;
/// Most environment variables of a command job.
pub const MAX_ENV_VARS: usize = 256;
/// Most arguments of a command job (the program included).
pub const MAX_ARGS: usize = 1024;
/// Most bytes of a job spec's variable-length text altogether (labels, env, argv, paths, image);
/// a record stays small enough that a page of them, and the store, stay bounded.
pub const MAX_SPEC_BYTES: usize = 64 * 1024;
/// Most bytes of one path, image or model name in a spec (Linux's PATH_MAX).
pub const MAX_FIELD_BYTES: usize = 4096;

impl JobSpec {
    /// Bytes of the spec's variable-length text: what its size in the store and on the wire
    /// grows with.
    pub fn text_bytes(&self) -> usize {
        let labels: usize = self.labels.iter().map(|(k, v)| k.len() + v.len()).sum();
        let kind = match &self.kind {
            JobKind::Command {
                image,
                command,
                env,
                working_dir,
                ..
            } => {
                image.len()
                    + working_dir.len()
                    + command.iter().map(String::len).sum::<usize>()
                    + env.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
            }
            JobKind::Inference {
                model,
                input_path,
                output_path,
            } => model.len() + input_path.len() + output_path.len(),
        };
        self.name.len()
            + self.queue.len()
            + self.priority_class.len()
            + self.idempotency_key.as_ref().map_or(0, String::len)
            + labels
            + kind
    }

    /// The size limits above: counts first, then each field, then the whole.
    fn check_sizes(&self) -> Result<(), JobError> {
        let too = |what: String| Err(JobError::InvalidSpec(what));
        if self.labels.len() > MAX_LABELS {
            return too(format!(
                "{} labels are above the limit of {MAX_LABELS}",
                self.labels.len()
            ));
        }
        if let Some((k, v)) = self
            .labels
            .iter()
            .find(|(k, v)| k.len() + v.len() > MAX_LABEL_BYTES)
        {
            return too(format!(
                "label '{}' has {} bytes (key and value), above the limit of {MAX_LABEL_BYTES}",
                k.chars().take(64).collect::<String>(),
                k.len() + v.len()
            ));
        }
        if let Some(key) = &self.idempotency_key
            && key.len() > MAX_LABEL_BYTES
        {
            return too(format!(
                "idempotency_key has {} bytes, above the limit of {MAX_LABEL_BYTES}",
                key.len()
            ));
        }
        let fields: Vec<(&str, &String)> = match &self.kind {
            JobKind::Command {
                image,
                command,
                env,
                working_dir,
                ..
            } => {
                if command.len() > MAX_ARGS {
                    return too(format!(
                        "the command has {} arguments, above the limit of {MAX_ARGS}",
                        command.len()
                    ));
                }
                if env.len() > MAX_ENV_VARS {
                    return too(format!(
                        "{} environment variables are above the limit of {MAX_ENV_VARS}",
                        env.len()
                    ));
                }
                vec![("image", image), ("working_dir", working_dir)]
            }
            JobKind::Inference {
                model,
                input_path,
                output_path,
            } => vec![
                ("model", model),
                ("input_path", input_path),
                ("output_path", output_path),
            ],
        };
        if let Some((what, v)) = fields.iter().find(|(_, v)| v.len() > MAX_FIELD_BYTES) {
            return too(format!(
                "{what} has {} bytes, above the limit of {MAX_FIELD_BYTES}",
                v.len()
            ));
        }
        let total = self.text_bytes();
        if total > MAX_SPEC_BYTES {
            return too(format!(
                "the spec's labels, env, command and paths have {total} bytes, above the limit of {MAX_SPEC_BYTES}"
            ));
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), JobError> {
        self.check_sizes()?;
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
        if self.resources.gpu_memory_bytes > 0 && self.resources.gpus == 0 {
            return Err(JobError::InvalidSpec(format!(
                "gpu_memory_bytes {} needs gpus of at least 1 (it is the memory on each GPU)",
                self.resources.gpu_memory_bytes
            )));
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
            owner: None,
            pausable: None,
            kind: JobKind::Command {
                image: "busybox".into(),
                command: vec!["true".into()],
                env: BTreeMap::new(),
                working_dir: String::new(),
                writable_root: false,
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
            writable_root: false,
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
        // GPU memory is per GPU: it needs GPUs.
        let mut s = spec();
        s.resources.gpu_memory_bytes = 1 << 30;
        let err = s.validate().unwrap_err().to_string();
        assert!(
            err.contains("gpu_memory_bytes 1073741824 needs gpus"),
            "{err}"
        );
        s.resources.gpus = 1;
        assert!(s.validate().is_ok());
    }

    #[test]
    fn records_written_before_gpu_memory_existed_read_as_zero() {
        let old = r#"{"cpu_millis":100,"memory_bytes":0,"gpus":1}"#;
        let r: Resources = serde_json::from_str(old).unwrap();
        assert_eq!((r.gpus, r.gpu_memory_bytes), (1, 0));
    }

    #[test]
    fn oversized_specs_are_refused_by_limit() {
        let refused = |s: &JobSpec, needle: &str| {
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        };
        let mut s = spec();
        s.labels = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), "v".into()))
            .collect();
        refused(&s, "labels are above the limit");
        let mut s = spec();
        s.labels.insert("big".into(), "x".repeat(900_000));
        refused(&s, "label 'big' has 900003 bytes");
        let mut s = spec();
        let many = |n: usize| (0..n).map(|i| i.to_string()).collect::<Vec<_>>();
        s.kind = JobKind::Command {
            image: String::new(),
            command: many(MAX_ARGS + 1),
            env: BTreeMap::new(),
            working_dir: String::new(),
            writable_root: false,
        };
        refused(&s, "arguments, above the limit");
        s.kind = JobKind::Command {
            image: String::new(),
            command: vec!["x".repeat(MAX_SPEC_BYTES)],
            env: BTreeMap::new(),
            working_dir: String::new(),
            writable_root: false,
        };
        refused(&s, "bytes, above the limit of 65536");
        s.kind = JobKind::Command {
            image: String::new(),
            command: vec!["true".into()],
            env: many(MAX_ENV_VARS + 1)
                .into_iter()
                .map(|k| (k, String::new()))
                .collect(),
            working_dir: String::new(),
            writable_root: false,
        };
        refused(&s, "environment variables are above");
        s.kind = JobKind::Inference {
            model: "m".into(),
            input_path: "/".repeat(MAX_FIELD_BYTES + 1),
            output_path: "o".into(),
        };
        refused(&s, "input_path has 4097 bytes");
        // At the limits a spec passes.
        let mut s = spec();
        s.labels = (0..MAX_LABELS)
            .map(|i| (format!("k{i}"), "v".repeat(500)))
            .collect();
        assert!(s.validate().is_ok());
    }
}
