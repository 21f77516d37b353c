use std::time::Duration;

/// Everything that can go wrong when starting, steering or waiting on a supervisor.
///
/// Supervisors are named by their path from the root (`System/Models`), children by name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The spec cannot be started as written (an empty or duplicate child name, a `/` in a name).
    #[error("invalid spec for supervisor `{supervisor}`: {reason}")]
    InvalidSpec {
        /// The supervisor whose spec is wrong.
        supervisor: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A child failed to start, so the supervisor start (or `start_child`/`restart_child`) failed.
    #[error("supervisor `{supervisor}` could not start child `{child}`: {reason}")]
    StartFailed {
        /// The supervisor that tried.
        supervisor: String,
        /// The child that did not start.
        child: String,
        /// Why.
        reason: String,
    },
    /// More restarts than allowed within the period: the supervisor stopped all its children
    /// and terminated, handing the failure to its parent.
    #[error(
        "supervisor `{supervisor}` reached its restart intensity (more than {max_restarts} \
         restarts within {period:?}); last failure, of `{child}`: {reason}"
    )]
    IntensityExceeded {
        /// The supervisor that gave up.
        supervisor: String,
        /// Its allowed restarts per period.
        max_restarts: u32,
        /// Its period.
        period: Duration,
        /// The child whose exit tipped it over.
        child: String,
        /// How that child exited.
        reason: String,
    },
    /// No child (or no nested supervisor, when resolving a path) of that name.
    #[error("supervisor `{supervisor}` has no child `{child}`")]
    NotFound {
        /// The supervisor searched.
        supervisor: String,
        /// The missing name.
        child: String,
    },
    /// `start_child` with a name already in use.
    #[error("supervisor `{supervisor}` already has a child `{child}`")]
    AlreadyPresent {
        /// The supervisor.
        supervisor: String,
        /// The name in use.
        child: String,
    },
    /// The operation needs a stopped child (`restart_child`, `delete_child`); terminate it first.
    #[error("child `{child}` of supervisor `{supervisor}` is running; terminate it first")]
    Running {
        /// The supervisor.
        supervisor: String,
        /// The running child.
        child: String,
    },
    /// The child is waiting out its restart backoff; terminate it first.
    #[error("child `{child}` of supervisor `{supervisor}` is waiting to be restarted")]
    Restarting {
        /// The supervisor.
        supervisor: String,
        /// The child about to be restarted.
        child: String,
    },
    /// `kill_child` on a child that is not running.
    #[error("child `{child}` of supervisor `{supervisor}` is not running")]
    NotRunning {
        /// The supervisor.
        supervisor: String,
        /// The child.
        child: String,
    },
    /// The supervisor has terminated and takes no more requests.
    #[error("supervisor `{supervisor}` has terminated")]
    Terminated {
        /// The supervisor.
        supervisor: String,
    },
    /// The supervisor's task was aborted (killed by its parent, or it panicked) before it could
    /// report how it ended.
    #[error("supervisor `{supervisor}` was aborted before it could stop cleanly")]
    Aborted {
        /// The supervisor.
        supervisor: String,
    },
}
