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
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobsConfig {
    pub max_running: usize,
    pub priority_classes: Vec<String>,
    pub retry_initial_delay_ms: u64,
    pub retry_max_delay_ms: u64,
    pub queues: Vec<JobQueueConfig>,
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
    /// Batch jobs admitted or running at once (0 = one per core).
    #[arg(long, env = "VERALTHEIM_MAX_RUNNING_JOBS")]
    pub max_running_jobs: Option<usize>,
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
        if let Some(v) = args.max_running_jobs {
            c.jobs.max_running = v;
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
        if self.devices.sample_interval_ms < 100 {
            bail!(
                "devices.sample_interval_ms is {}; it must be at least 100",
                self.devices.sample_interval_ms
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
