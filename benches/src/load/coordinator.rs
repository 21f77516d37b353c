//! The real coordinator as the suite's third target: `veraltheim serve` started as a child
//! process on free loopback ports with `--log-level warn`, polled until KServe `ServerReady` (and
//! `ModelReady` for each model) says so, asked for `ModelStatistics`, and stopped with SIGTERM.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tonic::transport::Channel;
use veraltheim_proto::inference::{
    self as pb, grpc_inference_service_client::GrpcInferenceServiceClient,
};
use veraltheim_proto::v1::{self, model_service_client::ModelServiceClient};

/// How long the coordinator gets to become ready, and to exit after SIGTERM.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// The default coordinator binary: `veraltheim` beside this executable (the same target
/// directory), or one level up when this executable is a test under `deps/`.
pub fn default_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate this executable")?;
    let dir = exe.parent().context("this executable has no directory")?;
    let name = format!("veraltheim{}", std::env::consts::EXE_SUFFIX);
    let candidates = [Some(dir.join(&name)), dir.parent().map(|p| p.join(&name))];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "no '{name}' next to {} (build it into the same target dir, or pass --veraltheim-bin)",
                exe.display()
            )
        })
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A model's cumulative counters, as KServe `ModelStatistics` reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Requests executed (`inference_count`).
    pub inferences: u64,
    /// Batches executed (`execution_count`).
    pub executions: u64,
    /// Time in `Model::execute`, summed over batches (Σ `batch_stats[].compute_infer.ns`).
    pub batch_compute_ns: u64,
    /// Requests and their summed time from enqueue to the start of their batch
    /// (`inference_stats.queue`).
    pub queue: (u64, u64),
    /// Successful requests and their summed time from the handler to the batch's end
    /// (`inference_stats.success`).
    pub success: (u64, u64),
    /// Text models: padded and real tokens executed (v1 `ModelStatistics`; 0 for others).
    pub tokens: (u64, u64),
}

/// What the server did between two readings of [`Counts`].
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct ServerSide {
    pub inferences: u64,
    pub executions: u64,
    /// Requests per executed batch.
    pub average_batch: Option<f64>,
    /// Mean time a request waited from enqueue to its batch's start, µs.
    pub mean_queue_us: Option<f64>,
    /// Mean time of a successful request inside the server (handler to batch end), µs.
    pub mean_in_server_us: Option<f64>,
    /// Share of the window the model spent in `execute` (one instance: 1.0 = always busy).
    pub execute_busy: Option<f64>,
    /// Text models: padded ÷ real tokens of the batches executed in the window.
    pub padded_per_real: Option<f64>,
}

fn mean_us(after: (u64, u64), before: (u64, u64)) -> Option<f64> {
    let n = after.0.checked_sub(before.0)?;
    let ns = after.1.checked_sub(before.1)?;
    (n > 0).then(|| ns as f64 / n as f64 / 1000.0)
}

impl Counts {
    /// Average batch size between two readings (`None` when nothing executed in between).
    pub fn average_batch_since(&self, before: &Counts) -> Option<f64> {
        let i = self.inferences.checked_sub(before.inferences)?;
        let e = self.executions.checked_sub(before.executions)?;
        (e > 0).then(|| i as f64 / e as f64)
    }

    /// The server's side of a window of `window` seconds that ended with `self`.
    pub fn since(&self, before: &Counts, window_s: f64) -> ServerSide {
        let busy = self
            .batch_compute_ns
            .checked_sub(before.batch_compute_ns)
            .filter(|_| window_s > 0.0)
            .map(|ns| ns as f64 / 1e9 / window_s);
        ServerSide {
            inferences: self.inferences.saturating_sub(before.inferences),
            executions: self.executions.saturating_sub(before.executions),
            average_batch: self.average_batch_since(before),
            mean_queue_us: mean_us(self.queue, before.queue),
            mean_in_server_us: mean_us(self.success, before.success),
            execute_busy: busy,
            padded_per_real: self
                .tokens
                .1
                .checked_sub(before.tokens.1)
                .filter(|&real| real > 0)
                .map(|real| self.tokens.0.saturating_sub(before.tokens.0) as f64 / real as f64),
        }
    }
}

/// A running `veraltheim serve`; killed (SIGKILL) if dropped before [`Coordinator::stop`].
pub struct Coordinator {
    child: Option<Child>,
    grpc: SocketAddr,
    http: SocketAddr,
    dir: PathBuf,
}

impl Coordinator {
    pub async fn start(
        binary: &Path,
        models: &[String],
        execution_threads: usize,
    ) -> anyhow::Result<Coordinator> {
        Self::start_with(binary, models, execution_threads, None, &[]).await
    }

    /// [`Coordinator::start`] on `data_dir` (default: a fresh one, removed when it is dropped;
    /// a given one is kept), with `extra` arguments for `serve`.
    pub async fn start_with(
        binary: &Path,
        models: &[String],
        execution_threads: usize,
        data_dir: Option<&Path>,
        extra: &[String],
    ) -> anyhow::Result<Coordinator> {
        Self::start_in(binary, models, execution_threads, data_dir, None, extra).await
    }

    /// [`Coordinator::start_with`] serving `repository` (default: an empty `models/` in the
    /// scratch directory); `models` are loaded at start.
    pub async fn start_in(
        binary: &Path,
        models: &[String],
        execution_threads: usize,
        data_dir: Option<&Path>,
        repository: Option<&Path>,
        extra: &[String],
    ) -> anyhow::Result<Coordinator> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("veraltheim-load-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let mut http_port = free_port()?;
        while http_port == grpc.port() {
            // The kernel may hand the port just released out again.
            http_port = free_port()?;
        }
        let http: SocketAddr = format!("127.0.0.1:{http_port}").parse()?;
        let mut cmd = Command::new(binary);
        cmd.arg("serve")
            .arg("--grpc-addr")
            .arg(grpc.to_string())
            .arg("--http-addr")
            .arg(http.to_string())
            .arg("--log-level")
            .arg("warn")
            .arg("--data-dir")
            .arg(data_dir.map_or_else(|| dir.join("data"), Path::to_path_buf))
            .arg("--model-repository")
            .arg(repository.map_or_else(|| dir.join("models"), Path::to_path_buf))
            .args(extra);
        for m in models {
            cmd.arg("--load-model").arg(m);
        }
        if execution_threads > 0 {
            cmd.arg("--execution-threads")
                .arg(execution_threads.to_string());
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let mut c = Coordinator {
            child: Some(child),
            grpc,
            http,
            dir,
        };
        c.wait_ready(models).await?;
        Ok(c)
    }

    pub fn addr(&self) -> SocketAddr {
        self.grpc
    }

    /// The HTTP port (KServe REST, OpenAI embeddings, metrics).
    pub fn http_addr(&self) -> SocketAddr {
        self.http
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// A new connection to the server's gRPC port (KServe and v1 services alike).
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(Channel::from_shared(format!("http://{}", self.grpc))?
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await?)
    }

    async fn client(&self) -> anyhow::Result<GrpcInferenceServiceClient<Channel>> {
        Ok(GrpcInferenceServiceClient::new(self.channel().await?))
    }

    async fn ready(&self, models: &[String]) -> anyhow::Result<bool> {
        let mut c = self.client().await?;
        if !c
            .server_ready(pb::ServerReadyRequest {})
            .await?
            .into_inner()
            .ready
        {
            return Ok(false);
        }
        for m in models {
            let r = c
                .model_ready(pb::ModelReadyRequest {
                    name: m.clone(),
                    version: String::new(),
                })
                .await?;
            if !r.into_inner().ready {
                return Ok(false);
            }
        }
        Ok(true)
    }

    async fn wait_ready(&mut self, models: &[String]) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("the coordinator exited before it was ready: {status}");
            }
            if matches!(self.ready(models).await, Ok(true)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the coordinator at {} was not ready within {:?}",
                    self.grpc,
                    READY_TIMEOUT
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The model's counters, through the KServe `ModelStatistics` RPC.
    pub async fn counts(&self, model: &str) -> anyhow::Result<Counts> {
        let r = self
            .client()
            .await?
            .model_statistics(pb::ModelStatisticsRequest {
                name: model.to_string(),
                version: String::new(),
            })
            .await?
            .into_inner();
        let s = r
            .model_stats
            .into_iter()
            .find(|s| s.name == model)
            .with_context(|| format!("no statistics for '{model}'"))?;
        let tokens = ModelServiceClient::new(self.channel().await?)
            .get_model_statistics(v1::GetModelStatisticsRequest {
                name: model.to_string(),
            })
            .await?
            .into_inner()
            .models
            .into_iter()
            .find(|m| m.name == model)
            .map_or((0, 0), |m| (m.padded_tokens, m.real_tokens));
        let pair = |d: Option<pb::StatisticDuration>| d.map_or((0, 0), |d| (d.count, d.ns));
        let stats = s.inference_stats.unwrap_or_default();
        Ok(Counts {
            inferences: s.inference_count,
            executions: s.execution_count,
            batch_compute_ns: s
                .batch_stats
                .iter()
                .filter_map(|b| b.compute_infer.as_ref())
                .map(|d| d.ns)
                .sum(),
            queue: pair(stats.queue),
            success: pair(stats.success),
            tokens,
        })
    }

    /// SIGKILL now (no shutdown path: a crash, as the failover benchmark wants), and reaps it.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        let mut child = self.child.take().context("already stopped")?;
        child.kill().context("cannot kill the coordinator")?;
        child.wait().context("cannot reap the coordinator")?;
        Ok(())
    }

    /// SIGTERM, then wait for the exit (SIGKILL after the stop timeout).
    pub async fn stop(mut self) -> anyhow::Result<ExitStatus> {
        let mut child = self.child.take().context("already stopped")?;
        let term = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        if !matches!(term, Ok(s) if s.success()) {
            let _ = child.kill();
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let status = child.wait()?;
                bail!("the coordinator did not exit within {STOP_TIMEOUT:?} of SIGTERM ({status})");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn average_batch_is_a_ratio_of_deltas() {
        let before = Counts {
            inferences: 100,
            executions: 50,
            ..Default::default()
        };
        let after = Counts {
            inferences: 1100,
            executions: 90,
            ..Default::default()
        };
        assert_eq!(after.average_batch_since(&before), Some(25.0));
        assert_eq!(before.average_batch_since(&before), None);
        assert_eq!(before.average_batch_since(&after), None);
    }

    #[test]
    fn server_side_of_a_window() {
        let before = Counts {
            inferences: 10,
            executions: 5,
            batch_compute_ns: 1_000_000,
            queue: (10, 50_000),
            success: (10, 100_000),
            tokens: (1_000, 900),
        };
        let after = Counts {
            inferences: 110,
            executions: 9,
            batch_compute_ns: 1_501_000_000,
            queue: (110, 20_050_000),
            success: (110, 40_100_000),
            tokens: (2_100, 1_900),
        };
        let s = after.since(&before, 2.0);
        assert_eq!(s.inferences, 100);
        assert_eq!(s.executions, 4);
        assert_eq!(s.average_batch, Some(25.0));
        assert_eq!(s.mean_queue_us, Some(200.0));
        assert_eq!(s.mean_in_server_us, Some(400.0));
        assert_eq!(s.execute_busy, Some(0.75));
        assert_eq!(s.padded_per_real, Some(1.1));
        let empty = before.since(&before, 0.0);
        assert_eq!(empty.mean_queue_us, None);
        assert_eq!(empty.execute_busy, None);
        assert_eq!(empty.padded_per_real, None);
    }
}
