//! `veraltheim nodes`: the node registry (ListNodes) as a table or JSON, and `nodes drain ID`
//! (DrainNode; `--undo` lets the node take work again).

use serde_json::{Value, json};
use veraltheim_models::allocator::format_bytes;
use veraltheim_proto::v1::{self, cluster_service_client::ClusterServiceClient};

use super::{ClientArgs, connect, status_error};

#[derive(Clone, Debug, clap::Args)]
pub struct NodesArgs {
    #[command(subcommand)]
    pub command: Option<NodesCommand>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Clone, Debug, clap::Subcommand)]
pub enum NodesCommand {
    /// Drain a node: it starts no new job, its running jobs finish (needs system.admin).
    Drain {
        /// The node's id, as `veraltheim nodes` lists it.
        id: String,
        /// Let the node take work again.
        #[arg(long)]
        undo: bool,
    },
}

fn state_name(s: i32) -> String {
    v1::NodeState::try_from(s)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("NODE_STATE_")
                .to_string()
        })
        .unwrap_or_else(|_| s.to_string())
}

pub(crate) fn node_json(n: &v1::Node) -> Value {
    json!({
        "id": n.id,
        "address": n.address,
        "state": state_name(n.state),
        "labels": n.labels,
        "version": n.version,
        "capacity": {"cores": n.cores, "memory_bytes": n.memory_bytes, "gpus": n.gpus},
        "models": n.models,
        "running_jobs": n.running_jobs,
        "started_ms": n.started_ms,
        "last_heartbeat_ms": n.last_heartbeat_ms,
        "lease_expires_ms": n.lease_expires_ms,
        "lease_ms": n.lease_ms,
        "draining": n.draining,
        "admitting": n.admitting,
        "now_ms": n.now_ms,
    })
}

/// How long ago the last heartbeat was, by the registry's clock.
fn ago(n: &v1::Node) -> String {
    let ms = n.now_ms.saturating_sub(n.last_heartbeat_ms);
    format!("{:.1} s ago", ms as f64 / 1000.0)
}

fn print_table(nodes: &[v1::Node], self_id: &str) {
    println!(
        "{:<20} {:<24} {:<9} {:<14} {:>5} {:>10} {:>4} {:>5}  MODELS",
        "ID", "ADDRESS", "STATE", "HEARTBEAT", "CORES", "MEMORY", "GPUS", "JOBS"
    );
    for n in nodes {
        let id = if n.id == self_id {
            format!("{} *", n.id)
        } else {
            n.id.clone()
        };
        let models = if n.models.is_empty() {
            "-".to_string()
        } else {
            n.models.join(",")
        };
        println!(
            "{:<20} {:<24} {:<9} {:<14} {:>5} {:>10} {:>4} {:>5}  {}",
            id,
            n.address,
            state_name(n.state),
            ago(n),
            n.cores,
            format_bytes(n.memory_bytes),
            n.gpus,
            n.running_jobs,
            models
        );
    }
}

pub async fn nodes(args: NodesArgs) -> anyhow::Result<()> {
    let mut client = ClusterServiceClient::new(connect(&args.client).await?);
    let as_json = args.client.json;
    match args.command {
        None => {
            let r = client
                .list_nodes(v1::ListNodesRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            if as_json {
                let out = json!({
                    "self": r.self_id,
                    "shared": r.shared,
                    "leader": r.leader_id,
                    "leader_epoch": r.leader_epoch,
                    "nodes": r.nodes.iter().map(node_json).collect::<Vec<_>>(),
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                print_table(&r.nodes, &r.self_id);
                if r.leader_id.is_empty() {
                    println!("scheduler leader: none now");
                } else {
                    println!(
                        "scheduler leader: {} (epoch {})",
                        r.leader_id, r.leader_epoch
                    );
                }
            }
        }
        Some(NodesCommand::Drain { id, undo }) => {
            let r = client
                .drain_node(v1::DrainNodeRequest { node_id: id, undo })
                .await
                .map_err(status_error)?
                .into_inner();
            let node = r.node.unwrap_or_default();
            if as_json {
                println!("{}", serde_json::to_string_pretty(&node_json(&node))?);
            } else {
                let what = if undo {
                    "takes work again"
                } else if node.admitting {
                    "is drained (it applies the flag at its next lease renewal)"
                } else {
                    "is drained"
                };
                println!("node {} {what}: {}", node.id, state_name(node.state));
            }
        }
    }
    Ok(())
}
