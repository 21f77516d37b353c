//! Starting the real `veraltheim` binary for the integration tests.

#![allow(dead_code)]

pub mod pg;
pub mod raw;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use veraltheim_proto::v1::{
    self, job_service_client::JobServiceClient, system_service_client::SystemServiceClient,
};

/// A running server; killed (SIGKILL) when dropped, with its temporary directory removed.
pub struct Server {
    pub child: Child,
    pub grpc: String,
    /// The HTTP address (health paths, metrics).
    pub http: String,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// A server started by the caller, owning `dir` (removed when it is dropped).
    pub fn adopt(child: Child, grpc: String, http: String, dir: tempfile::TempDir) -> Server {
        Server {
            child,
            grpc,
            http,
            _dir: Some(dir),
        }
    }

    /// The server's temporary directory.
    pub fn dir(&self) -> &Path {
        self._dir.as_ref().map_or(Path::new("."), |d| d.path())
    }
}

/// A port nobody in this test process has been given yet. The port is free when it is
/// returned but not held (the server binds it later), so another process may still take it in
/// between: `start_with` retries the start on fresh ports when the server says so.
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::sync::Mutex;
    // Without this set, two calls in a row (a server's gRPC and HTTP ports, or two tests
    // running at once) can be handed the same just-released port by the kernel.
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if given.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
}

/// Starts a server with its own temporary data directory; returns once Health says ready.
pub async fn start(extra: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_path_buf();
    let mut server = start_in(&data, extra).await;
    server._dir = Some(dir);
    server
}

/// Starts a server on `data` (kept after it stops, for restart tests).
pub async fn start_in(data: &Path, extra: &[&str]) -> Server {
    start_with(data, extra, None).await
}

/// Starts a server whose address space is limited to `bytes` (RLIMIT_AS, what `prlimit --as`
/// sets): a runaway allocation makes it abort, failing the test, instead of exhausting the
/// machine.
pub async fn start_limited(extra: &[&str], bytes: u64) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_path_buf();
    let mut server = start_with(&data, extra, Some(bytes)).await;
    server._dir = Some(dir);
    server
}

/// The `serve` command of a test server (ports, data dir and repository filled in).
pub fn serve_command(
    data: &Path,
    extra: &[&str],
    address_space: Option<u64>,
) -> (Command, String, String) {
    let grpc = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    let mut command = Command::new(env!("CARGO_BIN_EXE_veraltheim"));
    command
        .args(["serve", "--grpc-addr", &grpc])
        .args(["--http-addr", &http])
        .arg("--data-dir")
        .arg(data.join("data"))
        .arg("--model-repository")
        .arg(PathBuf::from(data).join("models"))
        .args(extra);
    if let Some(bytes) = address_space {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: bytes,
                    rlim_max: bytes,
                };
                if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    (command, grpc, http)
}

/// The last `lines` lines of a server's log, for a failure message.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

async fn start_with(data: &Path, extra: &[&str], address_space: Option<u64>) -> Server {
    // The server's stderr goes to a file beside its data directory: shown when the start
    // fails, and read for a port that another process took between free_port and the bind.
    let log = data.join("server.stderr");
    std::fs::create_dir_all(data).unwrap();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (mut command, grpc, http) = serve_command(data, extra, address_space);
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = command
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let server = Server {
            child,
            grpc,
            http,
            _dir: None,
        };
        match wait_ready(server).await {
            Ok(server) => return server,
            Err(status) => {
                let tail = log_tail(&log, 20);
                let port_taken = tail.contains("cannot listen") && tail.contains("in use");
                assert!(
                    port_taken && attempt < 3,
                    "the server exited before it was ready: {status}; its stderr ends:\n{tail}"
                );
            }
        }
    }
}

/// Waits until `server` answers Health with ready; the exit status if it exits first.
async fn wait_ready(mut server: Server) -> Result<Server, std::process::ExitStatus> {
    let started = Instant::now();
    loop {
        if let Ok(ch) = Channel::from_shared(format!("http://{}", server.grpc))
            .unwrap()
            .connect()
            .await
        {
            let ready = SystemServiceClient::new(ch)
                .health(v1::HealthRequest {})
                .await
                .is_ok_and(|r| r.into_inner().ready);
            if ready {
                return Ok(server);
            }
        }
        if let Ok(Some(status)) = server.child.try_wait() {
            return Err(status);
        }
        assert!(
            // A bound for a hung start, not a measure of speed: a loaded 2-core machine can
            // take tens of seconds to start a debug build.
            started.elapsed() < Duration::from_secs(120),
            "server did not become ready in 120 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn channel(s: &Server) -> Channel {
    Channel::from_shared(format!("http://{}", s.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A command job: `argv` run as is (local: a process; Kubernetes: the container's command).
pub fn command(name: &str, argv: &[&str]) -> v1::SubmitJobRequest {
    v1::SubmitJobRequest {
        spec: Some(v1::JobSpec {
            name: name.into(),
            kind: Some(v1::job_spec::Kind::Command(v1::CommandJob {
                command: argv.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            })),
            ..Default::default()
        }),
    }
}

/// Polls the job until it is in `state` (30 s at most, then fails the test with the job).
pub async fn wait_for(
    client: &mut JobServiceClient<Channel>,
    id: &str,
    state: v1::JobState,
) -> v1::Job {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let job = client
            .get_job(v1::GetJobRequest { id: id.into() })
            .await
            .unwrap()
            .into_inner();
        if job.state == state as i32 {
            return job;
        }
        assert!(
            Instant::now() < until,
            "job {id} never reached {state:?}: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An FP32 tensor of `veraltheim.v1` with the given shape and values.
pub fn fp32(name: &str, shape: Vec<i64>, values: Vec<f32>) -> v1::Tensor {
    v1::Tensor {
        name: name.into(),
        datatype: v1::DataType::Fp32 as i32,
        shape,
        data: Some(v1::tensor::Data::Values(v1::TensorValues {
            fp32: values,
            ..Default::default()
        })),
    }
}

/// One HTTP/1.1 call (`connection: close`): the status, the header block and the body.
pub async fn http_exchange(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    tcp.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{auth}\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer}"));
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .map_or((answer.clone(), String::new()), |(h, b)| {
            (h.to_string(), b.to_string())
        });
    (status, head, body)
}

/// One HTTP/1.1 call: the status and the body.
pub async fn http_call(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let (status, _, body) = http_exchange(addr, method, path, token, body).await;
    (status, body)
}
