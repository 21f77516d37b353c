//! Configuration: embedded defaults < TOML file < `VERALTHEIM_*` environment < flags. The
//! defaults are the commented file that `veraltheim config default` prints, parsed at start, so
//! the documentation and the behaviour cannot drift apart.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

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
    pub storage: StorageConfig,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub max_message_bytes: usize,
    pub shutdown_grace_seconds: u64,
    pub rate_limit_per_second: u32,
    pub rate_limit_burst: u32,
    pub allow_client_shm: bool,
    /// Threads of the tokio runtime that serves the APIs; 0 = half the cores, at least one.
    pub runtime_threads: usize,
}

impl ServerConfig {
    /// The runtime's worker threads: `runtime_threads`, or half the cores when it is 0. The
    /// runtime only moves bytes (model code runs on the execution pool), and on a small machine
    /// a runtime thread per core competes with the pool for every core: on 2 vCPUs one runtime
    /// thread served identity at c=64 with 18.5–19.4 µs of server CPU per request against
    /// 22–25 with two (docs/PERFORMANCE.md, session 4).
    pub fn runtime_worker_threads(&self) -> usize {
        match self.runtime_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
            n => n,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobsConfig {
    pub max_running: usize,
    pub priority_classes: Vec<String>,
    pub retry_initial_delay_ms: u64,
    pub retry_max_delay_ms: u64,
    pub default_ttl_seconds: u64,
    /// Requests one inference job keeps in flight.
    pub inference_concurrency: usize,
    /// Which executor runs command jobs.
    pub executor: JobExecutorKind,
    pub kubernetes: KubernetesJobsConfig,
    pub queues: Vec<JobQueueConfig>,
}

/// `jobs.executor`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum JobExecutorKind {
    /// Processes on this machine.
    Local,
    /// One `batch/v1` Job per attempt.
    Kubernetes,
}

/// `[jobs.kubernetes]`: the Kubernetes executor.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KubernetesJobsConfig {
    pub api_url: String,
    pub namespace: String,
    pub service_account: String,
    pub default_image: String,
    pub ttl_seconds_after_finished: i64,
    pub node_selector: Vec<String>,
    pub tolerations: Vec<TolerationConfig>,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub gpus: u32,
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

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobQueueConfig {
    pub name: String,
    pub weight: u32,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub gpus: u32,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DevicesConfig {
    pub simulate_gpus: String,
    pub sample_interval_ms: u64,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    pub max_bytes: u64,
    pub ttl_seconds: u64,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, clap::ValueEnum)]
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
    pub onnxruntime_library: String,
    pub onnx_intra_op_threads: usize,
    pub max_concurrent_loads: usize,
    pub load_timeout_seconds: u64,
    pub cpu_memory_bytes: u64,
    pub memory_reserve_bytes: u64,
    pub gpu_memory_reserve_bytes: u64,
    pub size_factor: f64,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExecutionConfig {
    pub threads: usize,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    pub data_dir: PathBuf,
}

/// `serve`'s flags; each one overrides its config key, and each reads `VERALTHEIM_<NAME>` from the
/// environment when the flag is absent.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file (see `veraltheim config default`).
    #[arg(long, env = "VERALTHEIM_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC listen address.
    #[arg(long, env = "VERALTHEIM_GRPC_ADDR")]
    pub grpc_addr: Option<SocketAddr>,
    /// HTTP (health, metrics) listen address.
    #[arg(long, env = "VERALTHEIM_HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// Model repository directory.
    #[arg(long, env = "VERALTHEIM_MODEL_REPOSITORY")]
    pub model_repository: Option<PathBuf>,
    /// Load this model at start (repeatable, or comma-separated in the environment); without it
    /// every built-in model is loaded.
    #[arg(
        long = "load-model",
        env = "VERALTHEIM_LOAD_MODEL",
        value_delimiter = ','
    )]
    pub load_model: Vec<String>,
    /// Directory for durable state.
    #[arg(long, env = "VERALTHEIM_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Threads of the runtime serving the APIs (0 = half the cores, at least one).
    #[arg(long, env = "VERALTHEIM_RUNTIME_THREADS")]
    pub runtime_threads: Option<usize>,
    /// Let clients register system shared-memory regions and pass tensors through them.
    #[arg(long, env = "VERALTHEIM_ALLOW_CLIENT_SHM", num_args = 0..=1, default_missing_value = "true")]
    pub allow_client_shm: Option<bool>,
    /// Serve the `fault` model, which panics on every request.
    #[arg(long, env = "VERALTHEIM_ENABLE_FAULT_INJECTION", num_args = 0..=1, default_missing_value = "true")]
    pub enable_fault_injection: Option<bool>,
    /// Log format.
    #[arg(long, env = "VERALTHEIM_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. `info` or `veraltheim=debug`.
    #[arg(long, env = "VERALTHEIM_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Largest gRPC message in bytes.
    #[arg(long, env = "VERALTHEIM_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Execution pool threads (0 = one per core).
    #[arg(long, env = "VERALTHEIM_EXECUTION_THREADS")]
    pub execution_threads: Option<usize>,
    /// Queue bound for models whose config sets none.
    #[arg(long, env = "VERALTHEIM_DEFAULT_MAX_QUEUE_SIZE")]
    pub default_max_queue_size: Option<usize>,
    /// Seconds in-flight work gets on SIGTERM/SIGINT.
    #[arg(long, env = "VERALTHEIM_SHUTDOWN_GRACE_SECONDS")]
    pub shutdown_grace_seconds: Option<u64>,
    /// Seconds an unload waits for queued and running requests.
    #[arg(long, env = "VERALTHEIM_UNLOAD_GRACE_SECONDS")]
    pub unload_grace_seconds: Option<u64>,
    /// Requests per second per client on the gRPC API (0 = no limit).
    #[arg(long, env = "VERALTHEIM_RATE_LIMIT_PER_SECOND")]
    pub rate_limit_per_second: Option<u32>,
    /// Burst above the rate per client (0 = one second's worth).
    #[arg(long, env = "VERALTHEIM_RATE_LIMIT_BURST")]
    pub rate_limit_burst: Option<u32>,
    /// Bytes the response cache may hold.
    #[arg(long, env = "VERALTHEIM_CACHE_MAX_BYTES")]
    pub cache_max_bytes: Option<u64>,
    /// Seconds a cached answer lives (0 = until evicted).
    #[arg(long, env = "VERALTHEIM_CACHE_TTL_SECONDS")]
    pub cache_ttl_seconds: Option<u64>,
    /// Simulate GPUs, COUNT x MEMORY, e.g. `2x80GiB`.
    #[arg(long, env = "VERALTHEIM_SIMULATE_GPUS")]
    pub simulate_gpus: Option<String>,
    /// Host and GPU sampling interval in milliseconds.
    #[arg(long, env = "VERALTHEIM_SAMPLE_INTERVAL_MS")]
    pub sample_interval_ms: Option<u64>,
    /// libonnxruntime.so for ONNX models (default: ORT_DYLIB_PATH).
    #[arg(long, env = "VERALTHEIM_ONNXRUNTIME_LIBRARY")]
    pub onnxruntime_library: Option<String>,
    /// ONNX Runtime intra-op threads per model instance (0 = its default).
    #[arg(long, env = "VERALTHEIM_ONNX_INTRA_OP_THREADS")]
    pub onnx_intra_op_threads: Option<usize>,
    /// Model loads running at once.
    #[arg(long, env = "VERALTHEIM_MAX_CONCURRENT_LOADS")]
    pub max_concurrent_loads: Option<usize>,
    /// Seconds a model load (including its wait for a slot and its warm-up) may take.
    #[arg(long, env = "VERALTHEIM_LOAD_TIMEOUT_SECONDS")]
    pub load_timeout_seconds: Option<u64>,
    /// Host memory models may use, in bytes (0 = the host's total memory).
    #[arg(long, env = "VERALTHEIM_CPU_MEMORY_BYTES")]
    pub cpu_memory_bytes: Option<u64>,
    /// Host memory kept from models, in bytes.
    #[arg(long, env = "VERALTHEIM_MEMORY_RESERVE_BYTES")]
    pub memory_reserve_bytes: Option<u64>,
    /// Memory kept from models on each GPU, in bytes.
    #[arg(long, env = "VERALTHEIM_GPU_MEMORY_RESERVE_BYTES")]
    pub gpu_memory_reserve_bytes: Option<u64>,
    /// A load is admitted on its files' size times this factor.
    #[arg(long, env = "VERALTHEIM_SIZE_FACTOR")]
    pub size_factor: Option<f64>,
    /// Batch jobs admitted or running at once (0 = one per core).
    #[arg(long, env = "VERALTHEIM_MAX_RUNNING_JOBS")]
    pub max_running_jobs: Option<usize>,
    /// Requests one batch inference job keeps in flight (its share of a model's queue).
    #[arg(long, env = "VERALTHEIM_INFERENCE_JOB_CONCURRENCY")]
    pub inference_job_concurrency: Option<usize>,
    /// What runs command jobs: `local` (processes here) or `kubernetes` (Jobs in a cluster).
    #[arg(long, env = "VERALTHEIM_JOBS_EXECUTOR")]
    pub jobs_executor: Option<JobExecutorKind>,
    /// Seconds a finished job is kept when it was submitted without a TTL (0 = kept).
    #[arg(long, env = "VERALTHEIM_DEFAULT_JOB_TTL_SECONDS")]
    pub default_job_ttl_seconds: Option<u64>,
}

impl Config {
    #[cfg(test)]
    pub fn defaults() -> anyhow::Result<Config> {
        toml::from_str(DEFAULT_TOML).context("the embedded default configuration is invalid")
    }

    /// Defaults, then the file (if any); every key of the file must be known.
    pub fn from_file(path: Option<&Path>) -> anyhow::Result<Config> {
        let mut value: toml::Table = toml::from_str(DEFAULT_TOML)?;
        if let Some(path) = path {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?;
            let file: toml::Table = toml::from_str(&text)
                .with_context(|| format!("config file {} is not valid TOML", path.display()))?;
            merge(&mut value, file);
        }
        let config: Config = toml::Value::Table(value)
            .try_into()
            .with_context(|| match path {
                Some(p) => format!("config file {} has a bad setting", p.display()),
                None => "bad default config".to_string(),
            })?;
        Ok(config)
    }

    /// The configuration `serve` runs with.
    pub fn resolve(args: &ServeArgs) -> anyhow::Result<Config> {
        let mut c = Config::from_file(args.config.as_deref())?;
        if let Some(v) = args.grpc_addr {
            c.server.grpc_addr = v;
        }
        if let Some(v) = args.http_addr {
            c.server.http_addr = v;
        }
        if let Some(v) = &args.model_repository {
            c.models.repository = v.clone();
        }
        if !args.load_model.is_empty() {
            c.models.load = args.load_model.clone();
        }
        if let Some(v) = &args.data_dir {
            c.storage.data_dir = v.clone();
        }
        if let Some(v) = args.runtime_threads {
            c.server.runtime_threads = v;
        }
        if let Some(v) = args.allow_client_shm {
            c.server.allow_client_shm = v;
        }
        if let Some(v) = args.enable_fault_injection {
            c.models.enable_fault_injection = v;
        }
        if let Some(v) = args.log_format {
            c.logging.format = v;
        }
        if let Some(v) = &args.log_level {
            c.logging.level = v.clone();
        }
        if let Some(v) = args.max_message_bytes {
            c.server.max_message_bytes = v;
        }
        if let Some(v) = args.execution_threads {
            c.execution.threads = v;
        }
        if let Some(v) = args.default_max_queue_size {
            c.models.default_max_queue_size = v;
        }
        if let Some(v) = args.shutdown_grace_seconds {
            c.server.shutdown_grace_seconds = v;
        }
        if let Some(v) = args.unload_grace_seconds {
            c.models.unload_grace_seconds = v;
        }
        if let Some(v) = args.rate_limit_per_second {
            c.server.rate_limit_per_second = v;
        }
        if let Some(v) = args.rate_limit_burst {
            c.server.rate_limit_burst = v;
        }
        if let Some(v) = args.cache_max_bytes {
            c.cache.max_bytes = v;
        }
        if let Some(v) = args.cache_ttl_seconds {
            c.cache.ttl_seconds = v;
        }
        if let Some(v) = &args.simulate_gpus {
            c.devices.simulate_gpus = v.clone();
        }
        if let Some(v) = args.sample_interval_ms {
            c.devices.sample_interval_ms = v;
        }
        if let Some(v) = &args.onnxruntime_library {
            c.models.onnxruntime_library = v.clone();
        }
        if let Some(v) = args.onnx_intra_op_threads {
            c.models.onnx_intra_op_threads = v;
        }
        if let Some(v) = args.max_concurrent_loads {
            c.models.max_concurrent_loads = v;
        }
        if let Some(v) = args.load_timeout_seconds {
            c.models.load_timeout_seconds = v;
        }
        if let Some(v) = args.cpu_memory_bytes {
            c.models.cpu_memory_bytes = v;
        }
        if let Some(v) = args.memory_reserve_bytes {
            c.models.memory_reserve_bytes = v;
        }
        if let Some(v) = args.gpu_memory_reserve_bytes {
            c.models.gpu_memory_reserve_bytes = v;
        }
        if let Some(v) = args.size_factor {
            c.models.size_factor = v;
        }
        if let Some(v) = args.inference_job_concurrency {
            c.jobs.inference_concurrency = v;
        }
        if let Some(v) = args.max_running_jobs {
            c.jobs.max_running = v;
        }
        if let Some(v) = args.jobs_executor {
            c.jobs.executor = v;
        }
        if let Some(v) = args.default_job_ttl_seconds {
            c.jobs.default_ttl_seconds = v;
        }
        c.validate()?;
        Ok(c)
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
        if self.jobs.kubernetes.breaker_failure_threshold == 0 {
            bail!("jobs.kubernetes.breaker_failure_threshold must be at least 1");
        }
        if self.devices.sample_interval_ms < 100 {
            bail!(
                "devices.sample_interval_ms is {}; it must be at least 100",
                self.devices.sample_interval_ms
            );
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
        if self.models.default_max_queue_size == 0 {
            bail!("models.default_max_queue_size must be at least 1");
        }
        if self.server.grpc_addr == self.server.http_addr {
            bail!(
                "server.grpc_addr and server.http_addr are both {}",
                self.server.grpc_addr
            );
        }
        Ok(())
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn embedded_defaults_parse() {
        let c = Config::defaults().unwrap();
        assert_eq!(c.server.grpc_addr.to_string(), "127.0.0.1:8001");
        assert_eq!(c.server.http_addr.to_string(), "127.0.0.1:8002");
        assert!(c.models.load.is_empty());
    }

    #[test]
    fn runtime_threads_default_to_half_the_cores_and_follow_the_flag() {
        let c = Config::defaults().unwrap();
        assert_eq!(c.server.runtime_threads, 0);
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(c.server.runtime_worker_threads(), (cores / 2).max(1));
        let args = ServeArgs {
            runtime_threads: Some(3),
            ..Default::default()
        };
        let c = Config::resolve(&args).unwrap();
        assert_eq!(c.server.runtime_worker_threads(), 3);
    }

    #[test]
    fn file_then_flags_override_in_order() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            f,
            "[server]\ngrpc_addr = \"127.0.0.1:9001\"\nshutdown_grace_seconds = 3\n[models]\nload = [\"cost\"]"
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(f.path().to_path_buf()),
            shutdown_grace_seconds: Some(7),
            ..Default::default()
        };
        let c = Config::resolve(&args).unwrap();
        assert_eq!(c.server.grpc_addr.to_string(), "127.0.0.1:9001");
        assert_eq!(c.server.shutdown_grace_seconds, 7);
        assert_eq!(c.models.load, vec!["cost".to_string()]);
        // untouched keys keep their defaults
        assert_eq!(c.server.http_addr.to_string(), "127.0.0.1:8002");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "[server]\ngrpc_adr = \"x\"").unwrap();
        let err = format!("{:#}", Config::from_file(Some(f.path())).unwrap_err());
        assert!(err.contains("grpc_adr"), "{err}");
        let args = ServeArgs {
            max_message_bytes: Some(10),
            ..Default::default()
        };
        let err = Config::resolve(&args).unwrap_err().to_string();
        assert!(err.contains("max_message_bytes"), "{err}");
    }
}

#[cfg(test)]
mod deploy_example {
    #[test]
    fn the_example_in_deploy_parses() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/veraltheim.toml");
        let c = super::Config::from_file(Some(&path)).unwrap();
        assert_eq!(c.models.default_max_queue_size, 4096);
    }
}

#[cfg(test)]
mod kubernetes_jobs {
    use std::io::Write;

    use super::*;

    #[test]
    fn the_executor_and_its_kubernetes_section_are_read_and_checked() {
        let c = Config::defaults().unwrap();
        assert_eq!(c.jobs.executor, JobExecutorKind::Local);
        assert_eq!(c.jobs.kubernetes.ttl_seconds_after_finished, 86400);
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            f,
            r#"[jobs]
executor = "kubernetes"
[jobs.kubernetes]
namespace = "batch"
node_selector = ["pool=gpu"]
tolerations = [{{ key = "nvidia.com/gpu", operator = "Exists", effect = "NoSchedule" }}]
gpus = 4"#
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(f.path().to_path_buf()),
            ..Default::default()
        };
        let c = Config::resolve(&args).unwrap();
        assert_eq!(c.jobs.executor, JobExecutorKind::Kubernetes);
        let k = &c.jobs.kubernetes;
        assert_eq!((k.namespace.as_str(), k.gpus), ("batch", 4));
        assert_eq!(k.node_selector, ["pool=gpu"]);
        assert_eq!(k.tolerations[0].operator, "Exists");
        // Untouched keys keep their defaults, and the flag wins over the file.
        assert_eq!(k.api_retries, 3);
        let args = ServeArgs {
            config: Some(f.path().to_path_buf()),
            jobs_executor: Some(JobExecutorKind::Local),
            ..Default::default()
        };
        assert_eq!(
            Config::resolve(&args).unwrap().jobs.executor,
            JobExecutorKind::Local
        );

        let mut bad = tempfile::NamedTempFile::new().unwrap();
        writeln!(bad, "[jobs.kubernetes]\nnode_selector = [\"pool\"]").unwrap();
        let args = ServeArgs {
            config: Some(bad.path().to_path_buf()),
            ..Default::default()
        };
        let err = Config::resolve(&args).unwrap_err().to_string();
        assert!(err.contains("node_selector entry 'pool'"), "{err}");
    }
}
