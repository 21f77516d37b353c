//! The node registry's data, as pure types: what a coordinator says of itself ([`NodeReport`]),
//! a node as the registry lists it ([`NodeRecord`]), and how its state follows from its lease
//! ([`node_state`]). Kept by `postgres::nodes::PgNodes` when several coordinators share a
//! database; a single node (the embedded store) lists only itself.
//!
//! Every time compared here comes from one clock: the database's `now()` when the registry is
//! shared (a node's own wall clock never decides another node's state), this process's clock
//! when it lists only itself.

use std::collections::BTreeMap;

/// A node's state in a listing, from its lease as of the registry's clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeState {
    /// Its lease is valid: it renewed within the last lease.
    Ready,
    /// Its lease lapsed less than one lease ago: late, maybe gone.
    Suspect,
    /// Its lease lapsed one lease ago or more, or it left at shutdown.
    Dead,
    /// Its lease is valid and it was drained: it starts no new job.
    Draining,
}

impl NodeState {
    pub const ALL: [NodeState; 4] = [
        NodeState::Ready,
        NodeState::Suspect,
        NodeState::Dead,
        NodeState::Draining,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Ready => "READY",
            NodeState::Suspect => "SUSPECT",
            NodeState::Dead => "DEAD",
            NodeState::Draining => "DRAINING",
        }
    }
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The state of a node whose lease of `lease_ms` ends at `lease_expires_ms`, at `now_ms` (all
/// from one clock, in ms): READY (or DRAINING, with the flag) while `now < expires`; SUSPECT
/// while the lease lapsed less than `lease_ms` ago; DEAD after. A lapsed lease wins over the
/// drain flag: a drained node that stopped renewing is SUSPECT, then DEAD.
pub fn node_state(now_ms: i64, lease_expires_ms: i64, lease_ms: i64, draining: bool) -> NodeState {
    if now_ms < lease_expires_ms {
        if draining {
            NodeState::Draining
        } else {
            NodeState::Ready
        }
    } else if now_ms.saturating_sub(lease_expires_ms) < lease_ms.max(1) {
        NodeState::Suspect
    } else {
        NodeState::Dead
    }
}

/// What a coordinator says of itself when it registers and at each renewal.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeReport {
    pub id: String,
    /// HOST:PORT of its gRPC API, as other nodes and clients reach it.
    pub address: String,
    pub labels: BTreeMap<String, String>,
    /// The binary's version.
    pub version: String,
    pub cores: u32,
    pub memory_bytes: u64,
    /// GPUs the device inventory sees (lost ones left out).
    pub gpus: u32,
    /// Models READY on it.
    pub models: Vec<String>,
    /// Jobs admitted or running on it.
    pub running_jobs: u32,
    /// Whether its runner admits new jobs now (false once it has applied a drain).
    pub admitting: bool,
    /// What the jobs placed on it may hold together (its job scheduler's capacity).
    pub job_capacity: crate::job::Resources,
    /// Most jobs placed on it at once.
    pub job_slots: u32,
}

/// A node as the registry lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRecord {
    /// What it said of itself at its last renewal.
    pub report: NodeReport,
    pub state: NodeState,
    /// Drained by an operator (`veraltheim nodes drain`).
    pub draining: bool,
    pub lease_ms: u64,
    /// Times in ms since the Unix epoch, by the registry's clock.
    pub started_ms: u64,
    pub last_heartbeat_ms: u64,
    pub lease_expires_ms: u64,
    /// The registry's clock when it was listed: what `state` was computed against.
    pub now_ms: u64,
    /// The process that holds the id (random per start).
    pub incarnation: String,
}

impl NodeRecord {
    /// Whether its lease is valid now (READY or DRAINING).
    pub fn is_live(&self) -> bool {
        matches!(self.state, NodeState::Ready | NodeState::Draining)
    }

    /// This node as a scheduler leader places jobs on it, if its lease is valid.
    pub fn member(&self) -> Option<Member> {
        self.is_live().then(|| Member {
            node: self.report.id.clone(),
            incarnation: self.incarnation.clone(),
            capacity: self.report.job_capacity.clone(),
            slots: self.report.job_slots as usize,
            admitting: self.report.admitting && !self.draining,
        })
    }
}

/// A cluster leader's right to write, as it holds it: its node, its process (registry
/// incarnation) and its epoch. A store that others share refuses a write made under a fence
/// that no longer holds ([`crate::StoreError::Fenced`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LeaderFence {
    pub node: String,
    pub incarnation: String,
    pub epoch: u64,
}

/// A live node as the scheduler leader sees it: its process and what it offers jobs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub node: String,
    pub incarnation: String,
    /// What jobs placed on it may hold together.
    pub capacity: crate::job::Resources,
    /// Most jobs placed on it at once.
    pub slots: usize,
    /// Whether it takes new jobs (false while drained); its placed jobs are not orphans either
    /// way.
    pub admitting: bool,
}

/// A durable change of a job some node committed, as the shared store announces it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobNotice {
    Changed {
        id: String,
        state: crate::job::JobState,
        /// The node it is placed on, if any.
        node: Option<String>,
        cancel_requested: bool,
    },
    /// Announcements may have been missed (the listener reconnected): look at everything again.
    Resync,
}

impl JobNotice {
    /// Parses `<id> <STATE> <node or empty> <true|false>`, the payload the store's trigger
    /// sends.
    pub fn parse(payload: &str) -> Option<Self> {
        let mut parts = payload.split(' ');
        let id = parts.next()?.to_owned();
        let state = parts.next()?;
        let state = crate::job::JobState::ALL
            .into_iter()
            .find(|s| s.as_str() == state)?;
        let node = parts.next()?;
        let cancel_requested = parts.next()? == "true";
        Some(JobNotice::Changed {
            id,
            state,
            node: (!node.is_empty()).then(|| node.to_owned()),
            cancel_requested,
        })
    }
}

/// One stored piece of an attempt's output (see `JobBackend::append_log`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogPiece {
    pub seq: u32,
    /// `stdout`, `stderr`, `combined`, or [`LOG_END`].
    pub stream: String,
    pub data: Vec<u8>,
}

/// The stream name of the piece a node stores after an attempt's last output.
pub const LOG_END: &str = "end";

/// One live job in a leader's reconcile: its id, state and node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveEntry {
    pub id: String,
    pub state: crate::job::JobState,
    pub node: Option<String>,
}

/// A node id: 1 to 253 bytes of letters, digits, `.`, `-` and `_` (a host name fits).
pub fn check_node_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("a node id is empty".into());
    }
    if id.len() > 253 {
        return Err(format!(
            "a node id of {} bytes is longer than 253 (a host name's most)",
            id.len()
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        return Err(format!(
            "node id '{id}' holds {c:?}: only letters, digits, '.', '-' and '_' are allowed"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_lease_is_ready_or_draining() {
        assert_eq!(node_state(1_000, 1_001, 10_000, false), NodeState::Ready);
        assert_eq!(node_state(1_000, 1_001, 10_000, true), NodeState::Draining);
        assert_eq!(node_state(0, 10_000, 10_000, false), NodeState::Ready);
    }

    #[test]
    fn a_lapsed_lease_is_suspect_for_one_lease_then_dead() {
        let lease = 10_000;
        let expires = 50_000;
        // The moment it ends, it is lapsed.
        assert_eq!(
            node_state(expires, expires, lease, false),
            NodeState::Suspect
        );
        assert_eq!(
            node_state(expires + lease - 1, expires, lease, false),
            NodeState::Suspect
        );
        assert_eq!(
            node_state(expires + lease, expires, lease, false),
            NodeState::Dead
        );
        assert_eq!(
            node_state(expires + 100 * lease, expires, lease, false),
            NodeState::Dead
        );
        // The drain flag does not hide a lapsed lease.
        assert_eq!(
            node_state(expires, expires, lease, true),
            NodeState::Suspect
        );
        assert_eq!(
            node_state(expires + lease, expires, lease, true),
            NodeState::Dead
        );
    }

    #[test]
    fn extreme_times_do_not_overflow() {
        assert_eq!(node_state(i64::MAX, i64::MIN, 1, false), NodeState::Dead);
        assert_eq!(node_state(i64::MIN, i64::MAX, 1, false), NodeState::Ready);
        // A zero lease (never configured so) still gives an order: lapsed is dead.
        assert_eq!(node_state(5, 5, 0, false), NodeState::Suspect);
        assert_eq!(node_state(6, 5, 0, false), NodeState::Dead);
    }

    #[test]
    fn job_notices_parse_the_trigger_payload() {
        use crate::job::JobState;
        assert_eq!(
            JobNotice::parse("00017000000000000001 ADMITTED node-a false"),
            Some(JobNotice::Changed {
                id: "00017000000000000001".into(),
                state: JobState::Admitted,
                node: Some("node-a".into()),
                cancel_requested: false,
            })
        );
        assert_eq!(
            JobNotice::parse("00017000000000000001 RETRY_WAIT  true"),
            Some(JobNotice::Changed {
                id: "00017000000000000001".into(),
                state: JobState::RetryWait,
                node: None,
                cancel_requested: true,
            })
        );
        assert_eq!(JobNotice::parse("x NOPE a false"), None);
        assert_eq!(JobNotice::parse("x QUEUED"), None);
    }

    #[test]
    fn node_ids_are_host_name_like() {
        assert!(check_node_id("node-1.example_a").is_ok());
        assert!(check_node_id("").unwrap_err().contains("empty"));
        assert!(check_node_id(&"a".repeat(254)).unwrap_err().contains("253"));
        assert!(check_node_id(&"a".repeat(253)).is_ok());
        assert!(check_node_id("a b").unwrap_err().contains("' '"));
        assert!(check_node_id("é").is_err());
    }
}
