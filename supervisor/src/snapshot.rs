use std::fmt;

/// Whether a node supervises others or does work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeKind {
    /// A supervisor (with children of its own).
    Supervisor,
    /// A worker task.
    Worker,
}

/// Where a node is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeState {
    /// Being started.
    Starting,
    /// Started and not yet exited.
    Running,
    /// Exited; a restart is scheduled (waiting out its backoff, or being started again).
    Restarting,
    /// Being stopped by its supervisor.
    Stopping,
    /// Stopped and not to be restarted: terminated, a transient child that exited normally, or a
    /// supervisor that shut down cleanly.
    Stopped,
    /// Ended by a failure and not restarted (a supervisor past its restart intensity, a child that
    /// failed to start).
    Failed,
}

impl NodeState {
    /// The lower-case name (`running`, `restarting`...).
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Starting => "starting",
            NodeState::Running => "running",
            NodeState::Restarting => "restarting",
            NodeState::Stopping => "stopping",
            NodeState::Stopped => "stopped",
            NodeState::Failed => "failed",
        }
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One node of a supervision tree at one moment, with its children.
///
/// `restarts` and `last_failure` are kept by the node's supervisor, so they survive the node's
/// restarts; the root has no supervisor and reports 0 restarts and its own failure, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSnapshot {
    /// The node's name.
    pub name: String,
    /// Supervisor or worker.
    pub kind: NodeKind,
    /// Its state.
    pub state: NodeState,
    /// How many times its supervisor has restarted it.
    pub restarts: u32,
    /// Its last failure (error chain, panic message, `killed`), if it ever failed.
    pub last_failure: Option<String>,
    /// Its children in start order (empty for workers and for supervisors that are not running).
    pub children: Vec<NodeSnapshot>,
}

impl NodeSnapshot {
    /// The direct child of that name.
    pub fn child(&self, name: &str) -> Option<&NodeSnapshot> {
        self.children.iter().find(|c| c.name == name)
    }

    /// The descendant at a `/`-separated path relative to this node (`""` is this node).
    pub fn find(&self, path: &str) -> Option<&NodeSnapshot> {
        path.split('/')
            .filter(|s| !s.is_empty())
            .try_fold(self, |node, name| node.child(name))
    }
}
