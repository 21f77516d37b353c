//! Configuration: embedded defaults < TOML file < `VERALTHEIM_*` environment < flags. The
//! defaults are the commented file that `veraltheim config default` prints, and that file is
//! also where each setting is declared, once: its key, its default, its description and its
//! flag, from which its environment variable is derived (`settings.rs`). So the documentation,
//! the flags and the behaviour cannot drift apart.
//!
//! A setting that may be unset (no limit, the automatic choice, no path) is an `Option` here,
//! and its doc comment says what unset means. Files written before these keys became optional
//! spelled "unset" as `0` or `""`; those spellings still mean unset.

mod settings;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

pub use settings::ServeArgs;
use settings::{CONFIG_ENV, Setting, settings};

pub const DEFAULT_TOML: &str = include_str!("default.toml");

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub logging: LoggingConfig,
    pub models: ModelsConfig,
    pub cache: CacheConfig,
    pub devices: DevicesConfig,
    pub jobs: JobsConfig,
    pub execution: ExecutionConfig,
    pub limits: LimitsConfig,
    pub storage: StorageConfig,
    pub cluster: ClusterConfig,
    pub bus: BusConfig,
    pub telemetry: TelemetryConfig,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub max_message_bytes: usize,
    pub shutdown_grace_seconds: u64,
    /// Requests per second per client on the gRPC API; `None`: no limit.
    #[serde(default, deserialize_with = "unset::zero")]
    pub rate_limit_per_second: Option<u32>,
    /// Burst above the rate per client; `None`: one second's worth.
    #[serde(default, deserialize_with = "unset::zero")]
    pub rate_limit_burst: Option<u32>,
    pub allow_client_shm: bool,
    /// Threads of the tokio runtime that serves the APIs; `None`: half the cores, at least one.
    #[serde(default, deserialize_with = "unset::zero")]
    pub runtime_threads: Option<usize>,
    /// Principals and roles; `None`: no authentication.
    #[serde(default, deserialize_with = "unset::empty_path")]
    pub auth_file: Option<PathBuf>,
    /// Serve without authentication on non-loopback addresses.
    pub insecure_no_auth: bool,
    /// `/metrics` without credentials.
    pub metrics_public: bool,
    /// Days audit records are kept; `None` (`0` in the file): forever.
    #[serde(default, deserialize_with = "unset::zero")]
    pub audit_retention_days: Option<u64>,
    /// `[server.tls]`: TLS on both ports; all unset: plaintext.
    #[serde(default)]
    pub tls: TlsConfig,
}

/// `[server.tls]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain (PEM); `None`: no TLS.
    #[serde(default, deserialize_with = "unset::empty_path")]
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    #[serde(default, deserialize_with = "unset::empty_path")]
    pub key_file: Option<PathBuf>,
    /// CAs that sign client certificates (mutual TLS); `None`: no client certificate asked.
    #[serde(default, deserialize_with = "unset::empty_path")]
    pub client_ca_file: Option<PathBuf>,
}

impl TlsConfig {
    /// The files TLS is served with, or `None` for plaintext; an incomplete setting is an error
    /// naming what is missing (checked when `serve` starts, not when the configuration is read,
    /// so that each key can be set on its own layer: the file, the environment or a flag).
    pub fn files(&self) -> anyhow::Result<Option<crate::tls::TlsFiles>> {
        match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => Ok(Some(crate::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.client_ca_file.clone(),
            })),
            (Some(_), None) => bail!(
                "server.tls.cert_file (--tls-cert) is set but server.tls.key_file (--tls-key) is not: TLS needs both"
            ),
            (None, Some(_)) => bail!(
                "server.tls.key_file (--tls-key) is set but server.tls.cert_file (--tls-cert) is not: TLS needs both"
            ),
            (None, None) if self.client_ca_file.is_some() => bail!(
                "server.tls.client_ca_file (--tls-client-ca) needs TLS: set server.tls.cert_file (--tls-cert) and server.tls.key_file (--tls-key) too"
            ),
            (None, None) => Ok(None),
        }
    }
}

impl ServerConfig {
    /// Secure by default: without an auth file the server listens on loopback addresses only,
    /// unless `insecure_no_auth` says something in front of it authenticates callers. Checked
    /// by `serve` (not by every reader of the configuration, such as `config job-pod`).
    pub fn check_exposure(&self) -> anyhow::Result<()> {
        if self.auth_file.is_some() || self.insecure_no_auth {
            return Ok(());
        }
        let exposed: Vec<String> = [("gRPC", self.grpc_addr), ("HTTP", self.http_addr)]
            .into_iter()
            .filter(|(_, a)| !a.ip().is_loopback())
            .map(|(what, a)| format!("{what} on {a}"))
            .collect();
        if exposed.is_empty() {
            return Ok(());
        }
        bail!(
            "refusing to serve {} without authentication: anyone who can reach it could load \
             and unload models, run jobs (commands on this machine) and read every tenant's jobs. \
             Give --auth-file FILE (server.auth_file) with principals and roles \
             (docs/SECURITY.md), or listen on a loopback address (127.0.0.1), or, only when \
             something in front of the server authenticates every caller, pass \
             --insecure-no-auth (server.insecure_no_auth)",
            exposed.join(" and ")
        )
    }

    /// The runtime's worker threads: `runtime_threads`, or half the cores when it is unset. The
    /// runtime only moves bytes (model code runs on the execution pool), and on a small machine
    /// a runtime thread per core competes with the pool for every core: on 2 vCPUs one runtime
    /// thread served identity at c=64 with 18.5–19.4 µs of server CPU per request against
    /// 22–25 with two (docs/PERFORMANCE.md, session 4).
    pub fn runtime_worker_threads(&self) -> usize {
        self.runtime_threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
        })
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobsConfig {
    /// Jobs admitted or running at once; `None`: one per core (local), 64 (Kubernetes).
    #[serde(default, deserialize_with = "unset::zero")]
    pub max_running: Option<usize>,
    pub priority_classes: Vec<String>,
    pub retry_initial_delay_ms: u64,
    pub retry_max_delay_ms: u64,
    /// Seconds a finished job submitted without a TTL is kept; `None` (`0` in the file, since
    /// the key has a default): kept forever.
    #[serde(default, deserialize_with = "unset::zero")]
    pub default_ttl_seconds: Option<u64>,
    /// Requests one inference job keeps in flight.
    pub inference_concurrency: usize,
    /// The least CPU (millicores) the fast path's use leaves the job scheduler on this node
    /// (`veraltheim_slowpath::pressure`).
    pub min_cpu_millis: u64,
    /// Bytes kept of each of a command job attempt's outputs (head and tail).
    pub max_log_bytes: u64,
    /// Folders inference jobs may read from; empty: `<data_dir>/inference`.
    #[serde(default)]
    pub inference_input_dirs: Vec<PathBuf>,
    /// The folder inference jobs write under; `None`: `<data_dir>/inference`.
    #[serde(default, deserialize_with = "unset::empty_path")]
    pub inference_output_dir: Option<PathBuf>,
    /// Which executor runs command jobs.
    pub executor: JobExecutorKind,
    pub local: LocalJobsConfig,
    pub kubernetes: KubernetesJobsConfig,
    pub queues: Vec<JobQueueConfig>,
}

/// `jobs.executor`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum JobExecutorKind {
    /// Processes on this machine.
    Local,
    /// One `batch/v1` Job per attempt.
    Kubernetes,
}

/// `[jobs.local]`: what local command jobs may touch.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LocalJobsConfig {
    /// `USER:GROUP` the jobs run as; `None`: the server's user.
    #[serde(default, deserialize_with = "unset::empty")]
    pub run_as: Option<String>,
    /// The only programs jobs may start; empty: any.
    #[serde(default)]
    pub allowed_commands: Vec<String>,
    /// The jobs' PATH.
    pub path: String,
    /// RLIMIT_AS of each job process, in bytes; `None`: the server's.
    #[serde(default, deserialize_with = "unset::zero")]
    pub max_address_space_bytes: Option<u64>,
    /// RLIMIT_CPU of each job process, in seconds; `None`: the server's.
    #[serde(default, deserialize_with = "unset::zero")]
    pub max_cpu_seconds: Option<u64>,
    /// RLIMIT_NOFILE of each job process; `None`: the server's.
    #[serde(default, deserialize_with = "unset::zero")]
    pub max_open_files: Option<u64>,
    /// RLIMIT_NPROC of the jobs' user; `None`: the server's.
    #[serde(default, deserialize_with = "unset::zero")]
    pub max_processes: Option<u64>,
    /// A delegated cgroup v2 folder for per-attempt cgroups; `None`: none.
    #[serde(default, deserialize_with = "unset::empty_path")]
    pub cgroup_dir: Option<PathBuf>,
    /// The nice value (0 to 19) every attempt runs at.
    pub nice: i32,
    /// Whether every attempt runs in Linux's idle scheduling class (`SCHED_IDLE`).
    pub idle_class: bool,
}

/// `[jobs.kubernetes]`: the Kubernetes executor.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KubernetesJobsConfig {
    /// The API server; `None`: in-cluster configuration, else KUBECONFIG.
    #[serde(default, deserialize_with = "unset::empty")]
    pub api_url: Option<String>,
    /// The Jobs' namespace; `None`: the client configuration's.
    #[serde(default, deserialize_with = "unset::empty")]
    pub namespace: Option<String>,
    /// The pods' service account; `None`: the namespace's default.
    #[serde(default, deserialize_with = "unset::empty")]
    pub service_account: Option<String>,
    /// Image of command jobs that name none; `None`: such jobs are refused.
    #[serde(default, deserialize_with = "unset::empty")]
    pub default_image: Option<String>,
    /// The uid and gid of the jobs' containers (a uid of 0 is refused).
    pub run_as_user: i64,
    pub run_as_group: i64,
    /// Seconds Kubernetes keeps a finished Job; `None` (`-1` in the file, since the key has a
    /// default): kept.
    #[serde(default, deserialize_with = "unset::negative")]
    pub ttl_seconds_after_finished: Option<i64>,
    pub node_selector: Vec<String>,
    pub tolerations: Vec<TolerationConfig>,
    /// CPU all Kubernetes jobs may hold, in millicores; `None`: no limit.
    #[serde(default, deserialize_with = "unset::zero")]
    pub cpu_millis: Option<u64>,
    /// Memory all Kubernetes jobs may hold, in bytes; `None`: no limit.
    #[serde(default, deserialize_with = "unset::zero")]
    pub memory_bytes: Option<u64>,
    /// GPUs all Kubernetes jobs may hold; `None`: no limit.
    #[serde(default, deserialize_with = "unset::zero")]
    pub gpus: Option<u32>,
    pub breaker_failure_threshold: u32,
    pub breaker_open_ms: u64,
    pub api_retries: usize,
}

/// One of `jobs.kubernetes.tolerations`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TolerationConfig {
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub operator: String,
    #[serde(default)]
    pub value: String,
    #[serde(default)]
    pub effect: String,
    #[serde(default)]
    pub toleration_seconds: Option<i64>,
}

/// One of `jobs.queues`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobQueueConfig {
    pub name: String,
    pub weight: u32,
    /// Quota of CPU in millicores; `None`: none.
    #[serde(default, deserialize_with = "unset::zero")]
    pub cpu_millis: Option<u64>,
    /// Quota of memory in bytes; `None`: none.
    #[serde(default, deserialize_with = "unset::zero")]
    pub memory_bytes: Option<u64>,
    /// Quota of GPUs; `None`: none.
    #[serde(default, deserialize_with = "unset::zero")]
    pub gpus: Option<u32>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DevicesConfig {
    /// Simulated GPUs, COUNT x MEMORY; `None`: real GPUs through NVML, or none.
    #[serde(default, deserialize_with = "unset::empty")]
    pub simulate_gpus: Option<String>,
    pub sample_interval_ms: u64,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    pub max_bytes: u64,
    /// Seconds an answer stays cached; `None` (`0` in the file, since the key has a default):
    /// until evicted.
    #[serde(default, deserialize_with = "unset::zero")]
    pub ttl_seconds: Option<u64>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoggingConfig {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelsConfig {
    pub repository: PathBuf,
    pub load: Vec<String>,
    pub enable_fault_injection: bool,
    pub default_max_queue_size: usize,
    pub unload_grace_seconds: u64,
    /// libonnxruntime for ONNX models; `None`: the ORT_DYLIB_PATH environment variable.
    #[serde(default, deserialize_with = "unset::empty_path")]
    pub onnxruntime_library: Option<PathBuf>,
    /// ONNX Runtime intra-op threads per model instance; `None`: its default (one per core).
    #[serde(default, deserialize_with = "unset::zero")]
    pub onnx_intra_op_threads: Option<usize>,
    pub max_concurrent_loads: usize,
    pub load_timeout_seconds: u64,
    /// Host memory for CPU models, in bytes; `None`: the host's total memory.
    #[serde(default, deserialize_with = "unset::zero")]
    pub cpu_memory_bytes: Option<u64>,
    pub memory_reserve_bytes: u64,
    pub gpu_memory_reserve_bytes: u64,
    pub size_factor: f64,
    /// `MODEL=MS` entries: latency objectives (p99) for models whose configuration sets none.
    pub latency_slo: Vec<String>,
    /// Batches of models measured this fast may run on the receiving thread (0: never).
    pub inline_execution_us: u64,
    /// Batches of models measured this fast may run on their batcher task (0: never).
    pub batcher_execution_us: u64,
}

impl ModelsConfig {
    /// The latency objectives of `latency_slo`, by model; an error names the bad entry.
    pub fn latency_slo_ms(&self) -> Result<std::collections::BTreeMap<String, u64>, String> {
        self.latency_slo
            .iter()
            .map(|entry| {
                let bad = |why: &str| {
                    format!("models.latency_slo entry '{entry}': {why} (expected MODEL=MILLISECONDS, e.g. minilm=100)")
                };
                let (model, ms) = entry.split_once('=').ok_or_else(|| bad("no '='"))?;
                let model = model.trim();
                if model.is_empty() {
                    return Err(bad("no model name"));
                }
                let ms: u64 = ms
                    .trim()
                    .parse()
                    .ok()
                    .filter(|&ms| ms > 0)
                    .ok_or_else(|| bad("the objective is not a positive number of milliseconds"))?;
                Ok((model.to_string(), ms))
            })
            .collect()
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExecutionConfig {
    /// Threads of the execution pool; `None`: one per core.
    #[serde(default, deserialize_with = "unset::zero")]
    pub threads: Option<usize>,
}

/// `[limits]`: bounds on what one request or one model configuration may ask for (the default
/// file says what each protects). Passed down as typed structs; the crates below never read
/// this file.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_tensor_elements: usize,
    pub max_request_bytes: usize,
    pub max_warmup_count: u32,
    pub max_queue_delay_us: u64,
    /// Most instances of one model; `None`: the execution pool's threads.
    #[serde(default, deserialize_with = "unset::zero")]
    pub max_model_instances: Option<usize>,
    pub max_queue_size: u32,
    pub max_priority_levels: u64,
    pub max_builtin_cost_us: u64,
    pub max_watch_topics: usize,
    pub max_topic_pattern_bytes: usize,
}

impl LimitsConfig {
    /// The limits the model crates check loads and requests against.
    pub fn models(&self) -> veraltheim_models::Limits {
        veraltheim_models::Limits {
            max_tensor_elements: self.max_tensor_elements,
            max_request_bytes: self.max_request_bytes,
            max_warmup_count: self.max_warmup_count,
            max_queue_delay_us: self.max_queue_delay_us,
            max_model_instances: self.max_model_instances,
            max_queue_size: self.max_queue_size,
            max_priority_levels: self.max_priority_levels,
            max_builtin_cost_us: self.max_builtin_cost_us,
        }
    }

    /// The limits the API checks before it allocates for a call.
    pub fn api(&self) -> crate::context::ApiLimits {
        crate::context::ApiLimits {
            max_watch_topics: self.max_watch_topics,
            max_topic_pattern_bytes: self.max_topic_pattern_bytes,
        }
    }
}

/// `[bus]`: the bridge of this node's events to NATS JetStream (`veraltheim_bus::nats`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BusConfig {
    /// The NATS server(s); `None`: no bridge.
    #[serde(default, deserialize_with = "unset::empty")]
    pub nats_url: Option<String>,
    /// Topic patterns bridged, both ways.
    pub bridge_topics: Vec<String>,
    /// The JetStream stream.
    pub nats_stream: String,
    /// Events go to `<nats_subject_prefix>.<topic>`.
    pub nats_subject_prefix: String,
    /// Events buffered before new ones are dropped.
    pub nats_buffer: usize,
}

impl BusConfig {
    /// The bridge's options for node `node`, or `None` without `nats_url`.
    pub fn bridge(&self, node: &str) -> Option<veraltheim_bus::nats::BridgeOptions> {
        let url = self.nats_url.as_ref()?;
        let mut options = veraltheim_bus::nats::BridgeOptions::new(url.trim(), node);
        options.stream = self.nats_stream.clone();
        options.subject_prefix = self.nats_subject_prefix.clone();
        options.topics = self.bridge_topics.clone();
        options.buffer = self.nats_buffer;
        Some(options)
    }

    /// Checks the bridge's settings, naming the key at fault: all of them, with a bridge or
    /// without (so that a mistake shows before the bridge is turned on). The node id is checked
    /// with `[cluster]`.
    fn validate(&self) -> anyhow::Result<()> {
        use veraltheim_bus::nats::BridgeOption;
        let mut options = self.clone();
        // Without a bridge the other keys are checked all the same, against a valid URL.
        options
            .nats_url
            .get_or_insert_with(|| "nats://127.0.0.1:4222".to_string());
        let Some(options) = options.bridge("node") else {
            return Ok(());
        };
        if let Err(e) = options.validate() {
            let key = match e.option {
                BridgeOption::Url => "bus.nats_url (--nats-url)",
                BridgeOption::Stream => "bus.nats_stream (--nats-stream)",
                BridgeOption::SubjectPrefix => "bus.nats_subject_prefix (--nats-subject-prefix)",
                BridgeOption::Topics if e.value.is_empty() => {
                    bail!("bus.bridge_topics (--bridge-topics) is empty: {}", e.reason)
                }
                BridgeOption::Topics => "bus.bridge_topics (--bridge-topics) entry",
                BridgeOption::Buffer => "bus.nats_buffer (--nats-buffer)",
                BridgeOption::Node => "cluster.node_id (--node-id)",
            };
            bail!("{key} {:?}: {}", e.value, e.reason);
        }
        Ok(())
    }
}

/// `[telemetry]`: traces.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// The OTLP/gRPC receiver spans are exported to; `None`: no spans are made.
    #[serde(default, deserialize_with = "unset::empty")]
    pub otlp_endpoint: Option<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    pub data_dir: PathBuf,
    /// The PostgreSQL database batch jobs live in (`--store`); `None`: the embedded store.
    #[serde(default, deserialize_with = "unset::empty")]
    pub url: Option<String>,
    /// Most connections to that database at once.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
}

fn default_pool_size() -> usize {
    8
}

/// `[cluster]`: this node in the node registry.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's id; `None`: the host name.
    #[serde(default, deserialize_with = "unset::empty")]
    pub node_id: Option<String>,
    /// HOST:PORT others reach this node's gRPC API at; `None`: from `server.grpc_addr`
    /// ([`ClusterConfig::advertised`]).
    #[serde(default, deserialize_with = "unset::empty")]
    pub advertise_addr: Option<String>,
    pub lease_seconds: u64,
    /// "KEY=VALUE" entries.
    #[serde(default)]
    pub labels: Vec<String>,
}

/// Longest lease, in seconds.
const MAX_LEASE_SECONDS: u64 = 3600;

impl ClusterConfig {
    /// The labels as a map (validated: each entry is KEY=VALUE with a key).
    pub fn label_map(&self) -> std::collections::BTreeMap<String, String> {
        self.labels
            .iter()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The address this node advertises: `advertise_addr` when given; else `grpc_addr`, unless
    /// that listens on every address: then `host:port` on a single node (`shared` false), and an
    /// error with a shared registry, where other nodes would dial it.
    pub fn advertised(
        &self,
        grpc_addr: SocketAddr,
        host: &str,
        shared: bool,
    ) -> anyhow::Result<String> {
        if let Some(a) = &self.advertise_addr {
            return Ok(a.clone());
        }
        if !grpc_addr.ip().is_unspecified() {
            return Ok(grpc_addr.to_string());
        }
        if shared {
            bail!(
                "server.grpc_addr is {grpc_addr}, which no other node can dial: give the address this node is reached at with --advertise-addr HOST:PORT (cluster.advertise_addr)"
            );
        }
        Ok(format!("{host}:{}", grpc_addr.port()))
    }

    fn validate(&self) -> anyhow::Result<()> {
        if let Some(id) = &self.node_id {
            veraltheim_slowpath::cluster::check_node_id(id)
                .map_err(|e| anyhow::anyhow!("cluster.node_id: {e}"))?;
        }
        if let Some(a) = &self.advertise_addr {
            check_advertise_addr(a)?;
        }
        if !(1..=MAX_LEASE_SECONDS).contains(&self.lease_seconds) {
            bail!(
                "cluster.lease_seconds is {}; it must be 1 to {MAX_LEASE_SECONDS}",
                self.lease_seconds
            );
        }
        if let Some(bad) = self
            .labels
            .iter()
            .find(|s| s.split_once('=').is_none_or(|(k, _)| k.is_empty()))
        {
            bail!("cluster.labels entry '{bad}' is not KEY=VALUE");
        }
        Ok(())
    }
}

/// An advertised address is HOST:PORT with a host other nodes can dial: a name or an address,
/// not an unspecified one (0.0.0.0, ::), and a port from 1.
fn check_advertise_addr(a: &str) -> anyhow::Result<()> {
    let bad = |why: &str| {
        anyhow::anyhow!(
            "cluster.advertise_addr '{a}' {why}; give HOST:PORT that other nodes can dial, e.g. node-1.example:8001"
        )
    };
    let (host, port) = a.rsplit_once(':').ok_or_else(|| bad("has no port"))?;
    let port: u16 = port.parse().map_err(|_| bad("has no valid port"))?;
    if port == 0 {
        return Err(bad("has port 0"));
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.is_empty() {
        return Err(bad("has no host"));
    }
    if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
        if ip.is_unspecified() {
            return Err(bad(
                "is an unspecified address (it means \"every address\" to a listener, and nothing to a client)",
            ));
        }
    } else if bare.contains(':') || bare.contains('/') || bare.chars().any(char::is_whitespace) {
        return Err(bad("has no valid host"));
    }
    Ok(())
}

/// The spellings of "unset" in files written before these keys were optional (and, for keys
/// with a default, the only way a file can unset them: TOML has no null).
mod unset {
    use std::path::PathBuf;

    use serde::{Deserialize, Deserializer};

    pub fn zero<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de> + Default + PartialEq,
    {
        Ok(Option::<T>::deserialize(d)?.filter(|v| *v != T::default()))
    }

    pub fn negative<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        Ok(Option::<i64>::deserialize(d)?.filter(|v| *v >= 0))
    }

    pub fn empty<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Ok(Option::<String>::deserialize(d)?.filter(|v| !v.trim().is_empty()))
    }

    pub fn empty_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
        Ok(empty(d)?.map(PathBuf::from))
    }
}

/// Where a value came from, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Environment,
    Flag,
}

impl Source {
    fn name(self, s: &Setting) -> String {
        match self {
            Source::Environment => s.env.clone(),
            Source::Flag => format!("--{}", s.flag),
        }
    }
}

impl Config {
    #[cfg(test)]
    pub fn defaults() -> anyhow::Result<Config> {
        toml::from_str(DEFAULT_TOML).context("the embedded default configuration is invalid")
    }

    /// Defaults, then the file (if any); every key of the file must be known.
    #[cfg(test)]
    pub fn from_file(path: Option<&Path>) -> anyhow::Result<Config> {
        let value = Self::table(path)?;
        toml::Value::Table(value)
            .try_into()
            .with_context(|| match path {
                Some(p) => format!("config file {} has a bad setting", p.display()),
                None => "bad default config".to_string(),
            })
    }

    /// The defaults with the file (if any) merged over them.
    fn table(path: Option<&Path>) -> anyhow::Result<toml::Table> {
        let mut value: toml::Table = toml::from_str(DEFAULT_TOML)?;
        if let Some(path) = path {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?;
            let file: toml::Table = toml::from_str(&text)
                .with_context(|| format!("config file {} is not valid TOML", path.display()))?;
            merge(&mut value, file);
        }
        Ok(value)
    }

    /// The configuration `serve` runs with, from its flags and this process's environment.
    pub fn resolve(args: &ServeArgs) -> anyhow::Result<Config> {
        Self::resolve_with(args, |name| std::env::var_os(name))
    }

    /// The configuration from `args` and the environment `env` gives: defaults < file <
    /// environment < flags.
    fn resolve_with(
        args: &ServeArgs,
        env: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> anyhow::Result<Config> {
        let text = |name: &str| -> anyhow::Result<Option<String>> {
            env(name)
                .map(|v| {
                    v.into_string()
                        .map_err(|_| anyhow::anyhow!("{name} is not valid UTF-8"))
                })
                .transpose()
        };
        let path = match &args.config {
            Some(p) => Some(p.clone()),
            None => text(CONFIG_ENV)?
                .filter(|p| !p.is_empty())
                .map(PathBuf::from),
        };
        let mut table = Self::table(path.as_deref())?;
        let mut overrides: Vec<(Source, &Setting, toml::Value)> = Vec::new();
        for s in settings() {
            if let Some(raw) = text(&s.env)? {
                overrides.push((
                    Source::Environment,
                    s,
                    Self::value(Source::Environment, s, &[raw])?,
                ));
            }
        }
        for (s, raw) in &args.flags {
            overrides.push((Source::Flag, *s, Self::value(Source::Flag, s, raw)?));
        }
        // In order: a flag's value lands after (over) the same key's environment value.
        for (_, s, value) in &overrides {
            set(&mut table, &s.key, value.clone());
        }
        let config: Config = match toml::Value::Table(table).try_into() {
            Ok(c) => c,
            Err(e) => return Err(Self::blame(&overrides, path.as_deref(), e)),
        };
        config.validate()?;
        Ok(config)
    }

    fn value(source: Source, s: &Setting, raw: &[String]) -> anyhow::Result<toml::Value> {
        s.value(raw)
            .map_err(|e| anyhow::anyhow!("{} ({}): {e}", source.name(s), s.key))
    }

    /// Names the flag or variable whose value cannot be read, when one alone cannot be.
    fn blame(
        overrides: &[(Source, &Setting, toml::Value)],
        path: Option<&Path>,
        e: toml::de::Error,
    ) -> anyhow::Error {
        let defaults = || toml::from_str::<toml::Table>(DEFAULT_TOML).ok();
        for (source, s, value) in overrides.iter().rev() {
            let Some(mut alone) = defaults() else { break };
            set(&mut alone, &s.key, value.clone());
            if let Err(e) = toml::Value::Table(alone).try_into::<Config>() {
                return anyhow::anyhow!("{} ({}): {e}", source.name(s), s.key);
            }
        }
        anyhow::Error::new(e).context(match path {
            Some(p) => format!("config file {} has a bad setting", p.display()),
            None => "bad configuration".to_string(),
        })
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.server.max_message_bytes < 1024 {
            bail!(
                "server.max_message_bytes is {}; it must be at least 1024",
                self.server.max_message_bytes
            );
        }
        if self.jobs.queues.is_empty() {
            bail!("jobs.queues is empty: jobs need at least one queue");
        }
        if let Some(bad) = self
            .jobs
            .kubernetes
            .node_selector
            .iter()
            .find(|s| s.split_once('=').is_none_or(|(k, _)| k.is_empty()))
        {
            bail!("jobs.kubernetes.node_selector entry '{bad}' is not KEY=VALUE");
        }
        let k = &self.jobs.kubernetes;
        if !(1..=i64::from(i32::MAX)).contains(&k.run_as_user) {
            bail!(
                "jobs.kubernetes.run_as_user is {}; job pods run as a non-root uid, 1 to {}",
                k.run_as_user,
                i32::MAX
            );
        }
        if !(0..=i64::from(i32::MAX)).contains(&k.run_as_group) {
            bail!(
                "jobs.kubernetes.run_as_group is {}; it must be 0 to {}",
                k.run_as_group,
                i32::MAX
            );
        }
        let l = &self.jobs.local;
        if l.path.split(':').any(|dir| !dir.starts_with('/')) {
            bail!(
                "jobs.local.path '{}' must be absolute folders separated by ':' (a relative one would be looked up from each job's folder)",
                l.path
            );
        }
        if self.jobs.kubernetes.breaker_failure_threshold == 0 {
            bail!("jobs.kubernetes.breaker_failure_threshold must be at least 1");
        }
        if self.devices.sample_interval_ms < 100 {
            bail!(
                "devices.sample_interval_ms is {}; it must be at least 100",
                self.devices.sample_interval_ms
            );
        }
        if !(0..=19).contains(&l.nice) {
            bail!(
                "jobs.local.nice is {}; it must be 0 to 19 (jobs may only run at a lower priority than the server)",
                l.nice
            );
        }
        if self.jobs.max_log_bytes < 1024 {
            bail!("jobs.max_log_bytes must be at least 1024");
        }
        if self.jobs.inference_concurrency == 0 {
            bail!("jobs.inference_concurrency must be at least 1");
        }
        if self.models.max_concurrent_loads == 0 {
            bail!("models.max_concurrent_loads must be at least 1");
        }
        if self.models.load_timeout_seconds == 0 {
            bail!("models.load_timeout_seconds must be at least 1");
        }
        if !(self.models.size_factor.is_finite() && self.models.size_factor > 0.0) {
            bail!(
                "models.size_factor is {}; it must be a positive number",
                self.models.size_factor
            );
        }
        if let Err(e) = self.models.latency_slo_ms() {
            bail!("{e}");
        }
        if self.models.default_max_queue_size == 0 {
            bail!("models.default_max_queue_size must be at least 1");
        }
        // A limit of 0 would refuse everything; an unset one is spelled out in the file.
        let l = &self.limits;
        for (key, value) in [
            ("max_tensor_elements", l.max_tensor_elements as u64),
            ("max_request_bytes", l.max_request_bytes as u64),
            ("max_warmup_count", u64::from(l.max_warmup_count)),
            ("max_queue_size", u64::from(l.max_queue_size)),
            ("max_priority_levels", l.max_priority_levels),
            ("max_builtin_cost_us", l.max_builtin_cost_us),
            ("max_watch_topics", l.max_watch_topics as u64),
            ("max_topic_pattern_bytes", l.max_topic_pattern_bytes as u64),
        ] {
            if value == 0 {
                bail!("limits.{key} must be at least 1");
            }
        }
        // Counts that become threads, tasks or preallocated slots: far above any machine's, a
        // value is a mistake that would abort the process (a thread or slot vector of 2^63).
        let m = &self.models;
        for (key, value, most) in [
            (
                "server.runtime_threads",
                self.server.runtime_threads,
                MAX_THREADS,
            ),
            ("execution.threads", self.execution.threads, MAX_THREADS),
            (
                "models.onnx_intra_op_threads",
                m.onnx_intra_op_threads,
                MAX_THREADS,
            ),
            (
                "models.max_concurrent_loads",
                Some(m.max_concurrent_loads),
                MAX_THREADS,
            ),
            (
                "jobs.inference_concurrency",
                Some(self.jobs.inference_concurrency),
                MAX_THREADS,
            ),
            ("jobs.max_running", self.jobs.max_running, MAX_RUNNING_JOBS),
            (
                "models.default_max_queue_size",
                Some(m.default_max_queue_size),
                l.max_queue_size as usize,
            ),
        ] {
            if let Some(v) = value
                && v > most
            {
                bail!("{key} is {v}; it must be at most {most}");
            }
        }
        // Durations are added to clocks (an instant plus 2^63 seconds panics) and handed to
        // caches that refuse absurd ones: ten years is more than any of them needs.
        let k = &self.jobs.kubernetes;
        for (key, seconds) in [
            (
                "server.shutdown_grace_seconds",
                Some(self.server.shutdown_grace_seconds),
            ),
            ("models.unload_grace_seconds", Some(m.unload_grace_seconds)),
            ("models.load_timeout_seconds", Some(m.load_timeout_seconds)),
            ("cache.ttl_seconds", self.cache.ttl_seconds),
            ("jobs.default_ttl_seconds", self.jobs.default_ttl_seconds),
            (
                "jobs.retry_initial_delay_ms",
                Some(self.jobs.retry_initial_delay_ms / 1000),
            ),
            (
                "jobs.retry_max_delay_ms",
                Some(self.jobs.retry_max_delay_ms / 1000),
            ),
            (
                "devices.sample_interval_ms",
                Some(self.devices.sample_interval_ms / 1000),
            ),
            (
                "jobs.kubernetes.breaker_open_ms",
                Some(k.breaker_open_ms / 1000),
            ),
            (
                "jobs.kubernetes.ttl_seconds_after_finished",
                k.ttl_seconds_after_finished.map(|t| t.unsigned_abs()),
            ),
        ] {
            if let Some(v) = seconds
                && v > MAX_DURATION_SECONDS
            {
                bail!(
                    "{key} is longer than ten years ({MAX_DURATION_SECONDS} s), the most any duration may be"
                );
            }
        }
        if let Some(days) = self.server.audit_retention_days
            && days > MAX_DURATION_SECONDS / 86_400
        {
            bail!(
                "server.audit_retention_days is {days}; it must be at most {} (ten years)",
                MAX_DURATION_SECONDS / 86_400
            );
        }
        self.cluster.validate()?;
        self.bus.validate()?;
        if self.server.grpc_addr == self.server.http_addr {
            bail!(
                "server.grpc_addr and server.http_addr are both {}",
                self.server.grpc_addr
            );
        }
        Ok(())
    }
}

/// Most threads of any pool, and most loads or inference-job requests at once.
const MAX_THREADS: usize = 1024;
/// Longest duration of any setting: ten years.
const MAX_DURATION_SECONDS: u64 = 10 * 365 * 24 * 3600;
/// Most jobs running at once on this node.
const MAX_RUNNING_JOBS: usize = 65_536;

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Sets the dotted `key` in `table`, making the tables on the way.
fn set(table: &mut toml::Table, key: &str, value: toml::Value) {
    let mut parts: Vec<&str> = key.split('.').collect();
    let Some(last) = parts.pop() else { return };
    let mut t = table;
    for part in parts {
        let entry = t
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(next) = entry else {
            return;
        };
        t = next;
    }
    t.insert(last.to_string(), value);
}

#[cfg(test)]
mod tests;
