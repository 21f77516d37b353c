use std::{fmt, sync::Arc};

/// How a child's task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// It returned `Ok(())` on its own.
    Normal,
    /// Its supervisor stopped it and it returned in time.
    Shutdown,
    /// Its supervisor stopped it and had to abort it (`Shutdown::Brutal`, or the timeout passed).
    Aborted,
    /// It returned an error (the error and its sources, joined by `: `).
    Failed(String),
    /// It panicked (the panic message).
    Panicked(String),
    /// [`SupervisorHandle::kill_child`](crate::SupervisorHandle::kill_child) aborted it.
    Killed,
}

impl Exit {
    /// Whether this exit is a failure in OTP's sense: transient children are restarted after
    /// these, and only these.
    pub fn is_abnormal(&self) -> bool {
        matches!(self, Exit::Failed(_) | Exit::Panicked(_) | Exit::Killed)
    }

    /// The failure text recorded as a node's `last_failure`, if this exit is a failure.
    pub fn failure(&self) -> Option<String> {
        match self {
            Exit::Failed(reason) => Some(reason.clone()),
            Exit::Panicked(message) => Some(format!("panicked: {message}")),
            Exit::Killed => Some("killed".to_owned()),
            Exit::Normal | Exit::Shutdown | Exit::Aborted => None,
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Normal => f.write_str("exited normally"),
            Exit::Shutdown => f.write_str("shut down"),
            Exit::Aborted => f.write_str("aborted at shutdown"),
            Exit::Failed(reason) => write!(f, "failed: {reason}"),
            Exit::Panicked(message) => write!(f, "panicked: {message}"),
            Exit::Killed => f.write_str("killed"),
        }
    }
}

/// What a supervisor reports to its [`EventHook`]. `supervisor` is the supervisor's path from the
/// root (`System/Models`); `child` is the child's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SupervisorEvent {
    /// A child started (at supervisor start, `start_child` or `restart_child`).
    ChildStarted {
        /// The supervisor's path.
        supervisor: String,
        /// The child.
        child: String,
    },
    /// A child was restarted by its supervisor's strategy.
    ChildRestarted {
        /// The supervisor's path.
        supervisor: String,
        /// The child.
        child: String,
        /// How many times this child has now been restarted.
        restarts: u32,
    },
    /// A child could not be started.
    ChildStartFailed {
        /// The supervisor's path.
        supervisor: String,
        /// The child.
        child: String,
        /// Why.
        reason: String,
    },
    /// A child's task ended, on its own or stopped by its supervisor.
    ChildExited {
        /// The supervisor's path.
        supervisor: String,
        /// The child.
        child: String,
        /// How it ended.
        exit: Exit,
    },
    /// The supervisor exceeded its restart intensity and is terminating; its parent decides next.
    Escalated {
        /// The supervisor's path.
        supervisor: String,
        /// The failure it terminates with.
        reason: String,
    },
}

/// A callback invoked by a supervisor's task for every [`SupervisorEvent`]. It runs inline in the
/// supervisor, so it must be quick and must not block (forward to a channel); a panic in it is
/// caught and logged. Nested supervisors without a hook of their own inherit their parent's.
pub type EventHook = Arc<dyn Fn(SupervisorEvent) + Send + Sync>;
