//! This coordinator as a node: its entry in the node registry, the `NodeRegistry` worker that
//! keeps it there, and `veraltheim.v1.ClusterService` (ListNodes, DrainNode).
//!
//! With a shared job database (`--store postgres://...`) the registry is its `nodes` table
//! (`veraltheim_slowpath::postgres::nodes`): the node registers at start (waiting, at most two
//! leases, while a live process holds its id), renews its lease every third of
//! `cluster.lease_seconds` from the database's clock, reports its models and running jobs with
//! each renewal, reads the drain flag back, and gives its id up at shutdown. Without one (the
//! embedded store, a single node) the registry is this node alone, in memory, so that the
//! command still answers.
//!
//! Draining: until a leader places jobs on nodes (the cluster's next step), every node runs
//! the jobs submitted to it, so a drained node's runner stops admitting: jobs submitted to it
//! wait QUEUED (saying why), jobs running on it finish. Jobs submitted to other nodes run
//! there as before. The flag lives in the registry: with a shared database it outlives a
//! restart of the node; on a single node it lasts as long as the process.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tonic::{Request, Response, Status};
use veraltheim_models::ModelState;
use veraltheim_proto::v1::{self, cluster_service_server::ClusterService};
use veraltheim_serving::ModelManager;
use veraltheim_slowpath::cluster::{NodeRecord, NodeReport, NodeState, node_state};
use veraltheim_slowpath::postgres::leader::{LeaderRow, Leadership, PgLeader};
use veraltheim_slowpath::postgres::nodes::{PgNodes, Registration, Renewal};
use veraltheim_slowpath::{StoreError, cluster::check_node_id};
use veraltheim_supervisor::{ChildContext, ChildSpec};

use crate::auth::Caller;
use crate::devices::Devices;
use crate::jobs::Jobs;

/// Where the registry is.
enum Registry {
    /// This node alone.
    Local,
    /// The shared database's `nodes` table.
    Shared(PgNodes),
}

/// This node's part in the registry. See the module documentation.
pub struct Cluster {
    id: String,
    address: String,
    labels: std::collections::BTreeMap<String, String>,
    lease: Duration,
    /// This process, as the registry tells it from another with the same id.
    incarnation: String,
    registry: Registry,
    /// The scheduler leader's row, with a shared database.
    leader: Option<PgLeader>,
    jobs: Arc<Jobs>,
    models: Arc<ModelManager>,
    devices: Arc<Devices>,
    /// When this process started (ms), for the single-node listing.
    started_ms: u64,
    /// The drain flag of a single node (the shared registry keeps its own).
    local_draining: Mutex<bool>,
}

/// What [`Cluster::new`] needs.
pub struct ClusterParts {
    pub id: String,
    pub address: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub lease: Duration,
    /// This process ([`new_incarnation`]).
    pub incarnation: String,
    pub nodes: Option<PgNodes>,
    pub leader: Option<PgLeader>,
    pub jobs: Arc<Jobs>,
    pub models: Arc<ModelManager>,
    pub devices: Arc<Devices>,
}

fn now_ms() -> u64 {
    crate::audit::now_ms()
}

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::Unavailable(m) => Status::unavailable(format!("node registry: {m}")),
        other => Status::internal(format!("node registry: {other}")),
    }
}

/// A name for this process that no other process of any node has: its pid, start time and
/// nanoseconds.
pub fn new_incarnation() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{}-{:x}-{nanos:x}", std::process::id(), now_ms())
}

/// How long the registry keeps the row of a node whose lease ended (then the leader deletes
/// it): long enough to see what happened to it, short enough that a cluster whose pods get new
/// ids does not list them forever.
const DEAD_ROW_KEPT: Duration = Duration::from_secs(24 * 3600);

/// How much sooner than its lease a node stops its attempts when it could not renew: a fifth
/// of the lease, at least 200 ms (clocks of node and database may run at slightly different
/// rates; the renewal's answer may be late).
fn lease_margin(lease: Duration) -> Duration {
    (lease / 5).max(Duration::from_millis(200))
}

impl Cluster {
    pub fn new(parts: ClusterParts) -> Arc<Self> {
        let started_ms = now_ms();
        Arc::new(Cluster {
            incarnation: parts.incarnation,
            leader: parts.leader,
            id: parts.id,
            address: parts.address,
            labels: parts.labels,
            lease: parts.lease,
            registry: match parts.nodes {
                Some(n) => Registry::Shared(n),
                None => Registry::Local,
            },
            jobs: parts.jobs,
            models: parts.models,
            devices: parts.devices,
            started_ms,
            local_draining: Mutex::new(false),
        })
    }

    fn shared(&self) -> bool {
        matches!(self.registry, Registry::Shared(_))
    }

    /// What this node says of itself now.
    fn report(&self) -> NodeReport {
        let snap = self.devices.snapshot();
        let mut models: Vec<String> = self
            .models
            .list()
            .into_iter()
            .filter(|m| m.state == ModelState::Ready)
            .map(|m| m.name)
            .collect();
        models.sort();
        NodeReport {
            id: self.id.clone(),
            address: self.address.clone(),
            labels: self.labels.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            cores: snap.host.cores,
            memory_bytes: snap.host.memory_total_bytes,
            gpus: snap.gpus.iter().filter(|g| !g.lost).count() as u32,
            models,
            running_jobs: u32::try_from(self.jobs.runner.live_counts().running).unwrap_or(u32::MAX),
            admitting: !self.jobs.runner.is_draining(),
            // Less what the fast path uses (crate::pressure): the leader places against it.
            job_capacity: veraltheim_slowpath::Resources {
                cpu_millis: self.jobs.runner.job_cpu_capacity(),
                ..self.jobs.capacity.clone()
            },
            job_slots: u32::try_from(self.jobs.slots).unwrap_or(u32::MAX),
        }
    }

    fn apply_draining(&self, draining: bool) {
        self.jobs.runner.set_draining(draining);
    }

    /// Registers this node (nothing to do on a single node). While another live process holds
    /// the id, waits for its lease to lapse; after two leases of waiting, fails saying who
    /// holds it.
    pub async fn register(&self) -> anyhow::Result<()> {
        let Registry::Shared(nodes) = &self.registry else {
            return Ok(());
        };
        let give_up = tokio::time::Instant::now() + 2 * self.lease;
        let mut told = false;
        loop {
            let sent = tokio::time::Instant::now();
            match nodes
                .register(&self.report(), &self.incarnation, self.lease)
                .await?
            {
                Registration::Registered { draining } => {
                    self.apply_draining(draining);
                    self.leased(sent);
                    tracing::info!(
                        node = %self.id,
                        address = %self.address,
                        lease_seconds = self.lease.as_secs(),
                        draining,
                        "registered in the node registry"
                    );
                    return Ok(());
                }
                Registration::Held {
                    address,
                    remaining_ms,
                } => {
                    if tokio::time::Instant::now() >= give_up {
                        anyhow::bail!(
                            "node id '{}' is held by a live node at {address} that keeps renewing its lease: give this one another --node-id (cluster.node_id)",
                            self.id
                        );
                    }
                    if !told {
                        tracing::warn!(
                            node = %self.id,
                            holder = %address,
                            remaining_ms,
                            "this node id is held by another process until its lease lapses; waiting"
                        );
                        told = true;
                    }
                    let wait = Duration::from_millis(remaining_ms.saturating_add(20))
                        .min(self.lease / 3)
                        .max(Duration::from_millis(20));
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// The `NodeRegistry` worker: renews the lease every third of it and applies the drain
    /// flag; at shutdown, gives the id up. A database that does not answer is logged and tried
    /// again at the next renewal (the node shows SUSPECT meanwhile); a lost id (another
    /// process took it after this one's lease lapsed) fails the worker, whose restart registers
    /// again.
    pub fn worker(self: &Arc<Self>) -> ChildSpec {
        let cluster = self.clone();
        ChildSpec::worker("NodeRegistry", move |ctx: ChildContext| {
            let cluster = cluster.clone();
            async move {
                let Registry::Shared(nodes) = &cluster.registry else {
                    ctx.cancelled().await;
                    return Ok(());
                };
                // A restart re-registers (a no-op for the row this process holds).
                tokio::select! {
                    _ = ctx.cancelled() => return Ok(()),
                    r = cluster.register() => r?,
                }
                let every = cluster.lease / 3;
                cluster.lead_and_list(nodes).await;
                loop {
                    tokio::select! {
                        _ = ctx.cancelled() => break,
                        _ = tokio::time::sleep(every) => {}
                    }
                    let sent = tokio::time::Instant::now();
                    match nodes.renew(&cluster.report(), &cluster.incarnation).await {
                        Ok(Renewal::Renewed { draining }) => {
                            cluster.apply_draining(draining);
                            cluster.leased(sent);
                            cluster.lead_and_list(nodes).await;
                        }
                        Ok(Renewal::Lost) => {
                            return Err(format!(
                                "node id '{}' was taken by another process after this one's lease lapsed",
                                cluster.id
                            )
                            .into());
                        }
                        Err(e) => {
                            tracing::warn!(node = %cluster.id, error = %e, "lease not renewed; trying again");
                        }
                    }
                }
                if let (Some(fence), Some(leader)) =
                    (cluster.jobs.runner.leadership(), &cluster.leader)
                {
                    let _ = cluster.jobs.runner.set_leader(None).await;
                    if let Err(e) = leader.resign(&fence).await {
                        tracing::warn!(error = %e, "could not give the scheduler leadership up");
                    }
                }
                if let Err(e) = nodes.leave(&cluster.id, &cluster.incarnation).await {
                    tracing::warn!(node = %cluster.id, error = %e, "could not leave the node registry");
                }
                Ok(())
            }
        })
        .backoff(
            veraltheim_supervisor::Backoff::exponential(
                Duration::from_millis(100),
                Duration::from_secs(5),
            )
            .reset_after(Duration::from_secs(30)),
        )
    }

    /// The lease was renewed by a call sent at `sent`: this node may run attempts until one
    /// lease after it, less the margin.
    fn leased(&self, sent: tokio::time::Instant) {
        self.jobs
            .runner
            .set_lease(sent + self.lease - lease_margin(self.lease));
    }

    /// With a renewed lease: takes or keeps the scheduler leadership if it is free or this
    /// node's, and tells the runner the live nodes. A database that does not answer is tried
    /// again at the next renewal (a leader's writes are fenced meanwhile).
    async fn lead_and_list(&self, nodes: &PgNodes) {
        let Some(leader) = &self.leader else {
            return;
        };
        match nodes.list().await {
            Ok(list) => {
                let members: Vec<_> = list.iter().filter_map(NodeRecord::member).collect();
                self.jobs.runner.set_members(&members);
            }
            Err(e) => tracing::warn!(error = %e, "cannot list the nodes"),
        }
        match leader
            .acquire_or_renew(&self.id, &self.incarnation, self.lease)
            .await
        {
            Ok(Leadership::Leader { fence, .. }) => {
                if let Err(e) = self.jobs.runner.set_leader(Some(fence)).await {
                    tracing::warn!(error = %e, "cannot take up the scheduler leadership yet");
                }
                // The leader forgets nodes long gone.
                match nodes.prune(DEAD_ROW_KEPT).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(nodes = n, "forgot nodes gone for a day"),
                    Err(e) => tracing::warn!(error = %e, "cannot prune the node registry"),
                }
            }
            Ok(Leadership::Follower { .. }) => {
                let _ = self.jobs.runner.set_leader(None).await;
            }
            Err(e) => tracing::warn!(error = %e, "cannot reach the leader row"),
        }
    }

    /// The scheduler leader as the shared database says, if one holds a valid lease; a
    /// single node leads itself (epoch 0).
    pub async fn leader(&self) -> Option<LeaderRow> {
        let Some(leader) = &self.leader else {
            return Some(LeaderRow {
                node: self.id.clone(),
                epoch: 0,
                remaining_ms: u64::MAX,
                since_ms: self.started_ms,
            });
        };
        leader
            .current()
            .await
            .ok()
            .filter(|l| l.remaining_ms > 0 && !l.node.is_empty())
    }

    /// Every node the registry knows, by id.
    pub async fn list(&self) -> Result<Vec<NodeRecord>, Status> {
        match &self.registry {
            Registry::Shared(nodes) => nodes.list().await.map_err(store_status),
            Registry::Local => Ok(vec![self.local_record()]),
        }
    }

    /// This node as the single-node registry lists it: its lease always valid (it answers).
    fn local_record(&self) -> NodeRecord {
        let now = now_ms();
        let lease_ms = self.lease.as_millis() as u64;
        let draining = *self.local_draining.lock();
        NodeRecord {
            report: self.report(),
            state: node_state(
                now as i64,
                (now + lease_ms) as i64,
                lease_ms as i64,
                draining,
            ),
            draining,
            lease_ms,
            started_ms: self.started_ms,
            last_heartbeat_ms: now,
            lease_expires_ms: now + lease_ms,
            now_ms: now,
            incarnation: self.incarnation.clone(),
        }
    }

    /// Sets (or with `undo` clears) node `id`'s drain flag; returns the node after.
    pub async fn drain(&self, id: &str, undo: bool) -> Result<NodeRecord, Status> {
        check_node_id(id).map_err(Status::invalid_argument)?;
        let draining = !undo;
        match &self.registry {
            Registry::Local => {
                if id != self.id {
                    return Err(Status::not_found(format!(
                        "no node '{id}': this coordinator runs alone (no shared --store) and is node '{}'",
                        self.id
                    )));
                }
                *self.local_draining.lock() = draining;
                self.apply_draining(draining);
                Ok(self.local_record())
            }
            Registry::Shared(nodes) => {
                if !nodes
                    .set_draining(id, draining)
                    .await
                    .map_err(store_status)?
                {
                    return Err(Status::not_found(format!("no node '{id}' is registered")));
                }
                // This node applies its own at once; another applies it at its next renewal.
                if id == self.id {
                    self.apply_draining(draining);
                }
                tracing::info!(node = %id, draining, "drain flag set");
                nodes
                    .get(id)
                    .await
                    .map_err(store_status)?
                    .ok_or_else(|| Status::not_found(format!("no node '{id}' is registered")))
            }
        }
    }
}

fn wire_state(s: NodeState) -> v1::NodeState {
    match s {
        NodeState::Ready => v1::NodeState::Ready,
        NodeState::Suspect => v1::NodeState::Suspect,
        NodeState::Dead => v1::NodeState::Dead,
        NodeState::Draining => v1::NodeState::Draining,
    }
}

fn wire(n: NodeRecord) -> v1::Node {
    v1::Node {
        id: n.report.id,
        address: n.report.address,
        state: wire_state(n.state) as i32,
        labels: n.report.labels.into_iter().collect(),
        version: n.report.version,
        cores: n.report.cores,
        memory_bytes: n.report.memory_bytes,
        gpus: n.report.gpus,
        models: n.report.models,
        running_jobs: n.report.running_jobs,
        started_ms: n.started_ms,
        last_heartbeat_ms: n.last_heartbeat_ms,
        lease_expires_ms: n.lease_expires_ms,
        lease_ms: n.lease_ms,
        draining: n.draining,
        admitting: n.report.admitting,
        now_ms: n.now_ms,
    }
}

/// `veraltheim.v1.ClusterService`.
#[derive(Clone)]
pub struct ClusterApi {
    cluster: Arc<Cluster>,
}

impl ClusterApi {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Self { cluster }
    }
}

#[tonic::async_trait]
impl ClusterService for ClusterApi {
    async fn list_nodes(
        &self,
        _: Request<v1::ListNodesRequest>,
    ) -> Result<Response<v1::ListNodesResponse>, Status> {
        let nodes = self.cluster.list().await?;
        let leader = self.cluster.leader().await;
        Ok(Response::new(v1::ListNodesResponse {
            nodes: nodes.into_iter().map(wire).collect(),
            self_id: self.cluster.id.clone(),
            shared: self.cluster.shared(),
            leader_id: leader.as_ref().map(|l| l.node.clone()).unwrap_or_default(),
            leader_epoch: leader.map_or(0, |l| l.epoch),
        }))
    }

    async fn drain_node(
        &self,
        request: Request<v1::DrainNodeRequest>,
    ) -> Result<Response<v1::DrainNodeResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        // The id as given, cut (an audit record must not carry a 64 KiB name).
        let shown: String = r.node_id.chars().take(253).collect();
        let outcome = self.cluster.drain(&r.node_id, r.undo).await.map(|n| {
            Response::new(v1::DrainNodeResponse {
                node: Some(wire(n)),
            })
        });
        caller.audit(format!("node:{shown}"), &outcome);
        outcome
    }
}
