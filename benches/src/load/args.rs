//! The command line of `veraltheim-load` and its validation into a [`LoadSpec`]. Every run is
//! bounded: durations, counts, concurrency and rates have upper limits checked here.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Longest measured window or warm-up a run accepts, seconds.
pub const MAX_DURATION_S: f64 = 3600.0;
pub const MAX_CONCURRENCY: usize = 4096;
pub const MAX_RATE: f64 = 1_000_000.0;
/// Most requests one open-loop schedule may hold.
pub const MAX_SCHEDULED: f64 = 100_000_000.0;
pub const MAX_OUTSTANDING: usize = 100_000;
pub const MAX_CHANNELS: usize = 1024;
/// Largest request tensor, elements (64 MiB of FP32).
pub const MAX_ELEMENTS: usize = 16 << 20;
pub const MAX_BATCH: usize = 4096;
pub const MAX_ROUNDS: usize = 20;

const AFTER_HELP: &str = "\
Targets: `run` loads one server (--server HOST:PORT speaking KServe ModelInfer, or --echo for the \
in-process echo server). `suite` measures, in one process and one run: (1) the gRPC ceiling — a \
bare tonic unary echo server (tonic's transport server, no queue) started in-process on a free \
loopback port, answering ModelInfer by echoing the inputs as outputs; (2) the compute ceiling — \
the model's `Model::execute` called in-process on batches (items/s); (3) the coordinator — the \
real `veraltheim serve` started on free loopback ports (--log-level warn), loaded with the same \
payload and concurrency, its ModelStatistics read over each measured window, then stopped with \
SIGTERM. Both servers stay up for the whole suite; the first model's closed loop runs --rounds \
times, each round an echo run then a coordinator run, and the ratios coordinator/echo are taken \
per round (the targets use the medians). CPU use of the client, the server and the rest of the \
machine over each window comes from /proc (Linux).

Closed loop (--concurrency N): N clients, each with one request in flight, sharing one HTTP/2 \
channel per --clients-per-channel clients. Open loop (--rate R): request i is due at i/R s; its \
latency counts from that due time (no coordinated omission); at most --max-outstanding requests \
are in flight, and a due request beyond that is shed by the client and counted as client_shed. \
Latency: hdrhistogram, µs, 3 significant figures. All runs stop by themselves.";

/// veraltheim-load: end-to-end load generator for Veraltheim's KServe ModelInfer RPC, with
/// in-run baselines (a bare tonic echo server, the model in-process).
#[derive(Parser, Debug)]
#[command(name = "veraltheim-load", version, after_long_help = AFTER_HELP)]
pub struct Cli {
    /// Tokio worker threads of the load generator (0 = one per core).
    #[arg(long, global = true, default_value_t = 0)]
    pub client_threads: usize,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Load one server (or the in-process echo server) and report.
    Run(RunArgs),
    /// Echo baseline, compute baseline and the coordinator, same payload and load, with ratios.
    Suite(SuiteArgs),
    /// The compute ceiling only: `Model::execute` in-process on batches, items/s.
    Compute(ComputeArgs),
    /// Durable job submissions per second: in-process into the job store with and without
    /// group commit, then SubmitJob through gRPC against `veraltheim serve`; with
    /// `--cluster-nodes N`, through N coordinators on one PostgreSQL against one on redb.
    Jobs(super::jobs::JobsArgs),
    /// A cluster's failover: kill -9 of the scheduler leader, then the time to a new leader
    /// and to the dead node's jobs moved on, against lease + 2 s.
    Failover(super::failover::FailoverArgs),
    /// Slow-path restart time with many jobs in the store: open, recover, scheduler, and the
    /// real binary from spawn to ready.
    Restart(super::restart::RestartArgs),
    /// A sentence embedder (all-MiniLM-L6-v2): in-process at its best batch size, served by
    /// `veraltheim serve` with batching on, then reloaded with batching off; all against the
    /// FLOP ceiling (FP32 GEMM rate ÷ the model's FLOPs per token) measured in the same run.
    Text(super::text::TextArgs),
    /// Offers several times the sustainable load to a `cost` model with a bounded queue:
    /// memory, latency of the admitted requests against max queue delay + 2 × one batch's
    /// compute, and how fast the rest are refused.
    Overload(super::overload::OverloadArgs),
    /// Online inference with a latency objective beside a batch inference job and a CPU-bound
    /// command job: online alone, with strict priority only, and with the controller.
    Cosched(super::cosched::CoschedArgs),
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// KServe gRPC server, HOST:PORT, or https://HOST:PORT for TLS (see --ca).
    #[arg(long, required_unless_present = "echo", conflicts_with = "echo")]
    pub server: Option<String>,
    /// Start the bare tonic echo server in-process on a free loopback port and load it.
    #[arg(long)]
    pub echo: bool,
    #[command(flatten)]
    pub load: LoadOpts,
    #[command(flatten)]
    pub tls: TlsOpts,
    /// How requests travel: `grpc` (KServe ModelInfer), `http` (KServe REST, JSON tensors) or
    /// `http-binary` (KServe REST with the binary-data extension). With http, --server is the
    /// HTTP port (plain HTTP/1.1, one keep-alive connection per client; closed loop only).
    #[arg(long, value_enum, default_value = "grpc", conflicts_with = "echo")]
    pub protocol: super::http::Protocol,
    /// Print one JSON object instead of a text line.
    #[arg(long)]
    pub json: bool,
}

/// TLS to the server of `run --server`.
#[derive(Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOpts {
    /// TLS: the CA certificates (PEM) that sign the server's certificate; makes a bare
    /// HOST:PORT https.
    #[arg(long, value_name = "FILE", conflicts_with = "echo")]
    pub ca: Option<PathBuf>,
    /// Mutual TLS: the client's certificate (PEM), with --key.
    #[arg(long, value_name = "FILE", requires = "key", conflicts_with = "echo")]
    pub cert: Option<PathBuf>,
    /// Mutual TLS: the private key (PEM) of --cert.
    #[arg(long, value_name = "FILE", requires = "cert", conflicts_with = "echo")]
    pub key: Option<PathBuf>,
    /// A bearer token sent with every request (`authorization: Bearer ...`), for a server with
    /// an auth file.
    #[arg(
        long,
        env = "VERALTHEIM_TOKEN",
        hide_env_values = true,
        conflicts_with = "echo"
    )]
    pub token: Option<String>,
}

impl TlsOpts {
    /// The URL of `addr` (HOST:PORT or a URL): https when it says so or when --ca is given.
    pub fn url(&self, addr: &str) -> Result<String, String> {
        let url = if addr.contains("://") {
            addr.to_string()
        } else if self.ca.is_some() {
            format!("https://{addr}")
        } else {
            format!("http://{addr}")
        };
        let https = url.starts_with("https://");
        if !https && !url.starts_with("http://") {
            return Err(format!(
                "--server {addr}: give HOST:PORT or https://HOST:PORT"
            ));
        }
        if https && self.ca.is_none() {
            return Err("--server https://…: give the server's CA with --ca".into());
        }
        if !https && (self.ca.is_some() || self.cert.is_some()) {
            return Err(format!(
                "--ca, --cert and --key are for TLS: use https:// (got {url})"
            ));
        }
        Ok(url)
    }
}

/// The request and the load; shared by `run` and `suite`.
#[derive(Args, Debug, Clone)]
pub struct LoadOpts {
    /// Model name in each request.
    #[arg(long, default_value = "identity")]
    pub model: String,
    /// Shape of the FP32 input INPUT0 (first dimension = batch rows), sent as raw_input_contents.
    #[arg(long, default_value = "1x16")]
    pub shape: Shape,
    /// Closed loop: this many clients, each with one request in flight.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Open loop: requests per second on a fixed schedule.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Closed loop: clients sharing one HTTP/2 channel (connection).
    #[arg(long, default_value_t = 16)]
    pub clients_per_channel: usize,
    /// Open loop: HTTP/2 channels the requests are spread over (round robin).
    #[arg(long, default_value_t = 4)]
    pub channels: usize,
    /// Open loop: requests in flight at most; a due request beyond it is shed by the client.
    #[arg(long, default_value_t = 1024)]
    pub max_outstanding: usize,
    /// Seconds before the client abandons a request (counted as CLIENT_TIMEOUT; no grpc-timeout
    /// header is sent, so the server's path is not changed by it).
    #[arg(long, default_value_t = 10.0)]
    pub request_timeout: f64,
}

#[derive(Args, Debug, Clone)]
pub struct SuiteArgs {
    /// The coordinator binary (default: `veraltheim` next to this executable).
    #[arg(long)]
    pub veraltheim_bin: Option<PathBuf>,
    /// Models loaded against the coordinator, comma-separated (the echo baseline runs once, with
    /// the first model's name; compute ceilings for each).
    #[arg(long, value_delimiter = ',', default_value = "identity,cost")]
    pub models: Vec<String>,
    /// Shape of INPUT0.
    #[arg(long, default_value = "1x16")]
    pub shape: Shape,
    /// Closed-loop clients.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Also run an open loop at this rate (req/s) against echo and the coordinator (first model).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Rounds of the first model's closed loop, each an echo run then a coordinator run (on a
    /// shared machine, adjacent pairs keep the ratios honest); the targets use the medians.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Measured seconds of each load run.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Warm-up seconds of each load run.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    #[arg(long, default_value_t = 16)]
    pub clients_per_channel: usize,
    /// Open loop: channels.
    #[arg(long, default_value_t = 4)]
    pub channels: usize,
    /// Open loop: requests in flight at most.
    #[arg(long, default_value_t = 1024)]
    pub max_outstanding: usize,
    #[arg(long, default_value_t = 10.0)]
    pub request_timeout: f64,
    /// Batch sizes of the compute ceiling.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    pub batch_sizes: Vec<usize>,
    /// Seconds of compute measurement per batch size.
    #[arg(long, default_value_t = 0.5)]
    pub compute_duration: f64,
    /// Tokio worker threads of the echo server (0 = one per core, tokio's default; the
    /// coordinator's runtime has half the cores, at least one: `serve --runtime-threads`).
    #[arg(long, default_value_t = 0)]
    pub echo_threads: usize,
    /// Passed to `veraltheim serve --execution-threads` (0 = its default, one per core).
    #[arg(long, default_value_t = 0)]
    pub execution_threads: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ComputeArgs {
    /// Built-in model (`identity` or `cost` with its default parameters).
    #[arg(long, default_value = "identity")]
    pub model: String,
    /// Shape of one request's INPUT0; its first dimension is multiplied by the batch size.
    #[arg(long, default_value = "1x16")]
    pub shape: Shape,
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    pub batch_sizes: Vec<usize>,
    /// Seconds per batch size.
    #[arg(long, default_value_t = 0.5)]
    pub compute_duration: f64,
    #[arg(long)]
    pub json: bool,
}

/// A tensor shape written `1x16`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape(pub Vec<usize>);

impl Shape {
    pub fn elements(&self) -> usize {
        self.0.iter().product()
    }

    pub fn rows(&self) -> usize {
        self.0.first().copied().unwrap_or(1)
    }
}

impl FromStr for Shape {
    type Err = String;

    fn from_str(s: &str) -> Result<Shape, String> {
        let dims: Vec<usize> = s
            .split(['x', 'X'])
            .map(|d| {
                d.trim()
                    .parse::<usize>()
                    .map_err(|_| format!("shape '{s}': '{d}' is not a dimension"))
            })
            .collect::<Result<_, _>>()?;
        if dims.is_empty() || dims.len() > 8 {
            return Err(format!("shape '{s}' must have 1 to 8 dimensions"));
        }
        if dims.contains(&0) {
            return Err(format!("shape '{s}' has a zero dimension"));
        }
        let elements = dims
            .iter()
            .try_fold(1usize, |a, d| a.checked_mul(*d))
            .filter(|n| *n <= MAX_ELEMENTS);
        if elements.is_none() {
            return Err(format!("shape '{s}' has more than {MAX_ELEMENTS} elements"));
        }
        Ok(Shape(dims))
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s: Vec<String> = self.0.iter().map(|d| d.to_string()).collect();
        f.write_str(&s.join("x"))
    }
}

/// How the load is applied.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    Closed {
        concurrency: usize,
        clients_per_channel: usize,
    },
    Open {
        rate: f64,
        channels: usize,
        max_outstanding: usize,
    },
}

impl Mode {
    /// HTTP/2 channels (connections) the run opens.
    pub fn channels(&self) -> usize {
        match *self {
            Mode::Closed {
                concurrency,
                clients_per_channel,
            } => concurrency.div_ceil(clients_per_channel),
            Mode::Open { channels, .. } => channels,
        }
    }
}

/// A validated load run.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadSpec {
    pub model: String,
    pub shape: Shape,
    pub mode: Mode,
    pub warmup: Duration,
    pub duration: Duration,
    pub request_timeout: Duration,
    /// TLS to the server (`run` only; none by default).
    pub tls: TlsOpts,
    /// gRPC unless a command says otherwise (`run --protocol`, `text --protocol`).
    pub protocol: super::http::Protocol,
}

fn seconds(name: &str, v: f64, allow_zero: bool) -> Result<Duration, String> {
    let ok = v.is_finite() && v <= MAX_DURATION_S && (v > 0.0 || (allow_zero && v == 0.0));
    if ok {
        Ok(Duration::from_secs_f64(v))
    } else {
        let low = if allow_zero { "0 ≤" } else { "0 <" };
        Err(format!(
            "--{name} must be {low} seconds ≤ {MAX_DURATION_S}, got {v}"
        ))
    }
}

impl LoadOpts {
    /// Checks every bound and picks the mode; the message names the offending flag.
    pub fn spec(&self) -> Result<LoadSpec, String> {
        if self.model.trim().is_empty() {
            return Err("--model must not be empty".into());
        }
        let duration = seconds("duration", self.duration, false)?;
        let warmup = seconds("warmup", self.warmup, true)?;
        let request_timeout = seconds("request-timeout", self.request_timeout, false)?;
        let mode = match (self.concurrency, self.rate) {
            (Some(_), Some(_)) => {
                return Err(
                    "give --concurrency (closed loop) or --rate (open loop), not both".into(),
                );
            }
            (None, None) => {
                return Err("give --concurrency N (closed loop) or --rate R (open loop)".into());
            }
            (Some(c), None) => {
                if c == 0 || c > MAX_CONCURRENCY {
                    return Err(format!(
                        "--concurrency must be 1..={MAX_CONCURRENCY}, got {c}"
                    ));
                }
                if self.clients_per_channel == 0 {
                    return Err("--clients-per-channel must be at least 1".into());
                }
                Mode::Closed {
                    concurrency: c,
                    clients_per_channel: self.clients_per_channel,
                }
            }
            (None, Some(r)) => {
                if !(r.is_finite() && r > 0.0 && r <= MAX_RATE) {
                    return Err(format!("--rate must be > 0 and ≤ {MAX_RATE}, got {r}"));
                }
                if r * (self.duration + self.warmup) > MAX_SCHEDULED {
                    return Err(format!(
                        "--rate × (--warmup + --duration) schedules more than {MAX_SCHEDULED} requests"
                    ));
                }
                if self.channels == 0 || self.channels > MAX_CHANNELS {
                    return Err(format!("--channels must be 1..={MAX_CHANNELS}"));
                }
                if self.max_outstanding == 0 || self.max_outstanding > MAX_OUTSTANDING {
                    return Err(format!("--max-outstanding must be 1..={MAX_OUTSTANDING}"));
                }
                Mode::Open {
                    rate: r,
                    channels: self.channels,
                    max_outstanding: self.max_outstanding,
                }
            }
        };
        if mode.channels() > MAX_CHANNELS {
            return Err(format!("more than {MAX_CHANNELS} channels"));
        }
        Ok(LoadSpec {
            model: self.model.clone(),
            shape: self.shape.clone(),
            mode,
            warmup,
            duration,
            request_timeout,
            tls: TlsOpts::default(),
            protocol: super::http::Protocol::Grpc,
        })
    }
}

/// Validated compute-ceiling parameters.
pub fn compute_plan(
    batch_sizes: &[usize],
    compute_duration: f64,
) -> Result<(Vec<usize>, Duration), String> {
    if batch_sizes.is_empty() {
        return Err("--batch-sizes must name at least one size".into());
    }
    if let Some(b) = batch_sizes.iter().find(|b| **b == 0 || **b > MAX_BATCH) {
        return Err(format!("batch size {b} is not in 1..={MAX_BATCH}"));
    }
    let d = seconds("compute-duration", compute_duration, false)?;
    Ok((batch_sizes.to_vec(), d))
}

impl SuiteArgs {
    /// The closed-loop spec of one model, and the open-loop spec if `--rate` was given.
    pub fn specs(&self, model: &str) -> Result<(LoadSpec, Option<LoadSpec>), String> {
        let mut opts = LoadOpts {
            model: model.to_string(),
            shape: self.shape.clone(),
            concurrency: Some(self.concurrency),
            rate: None,
            duration: self.duration,
            warmup: self.warmup,
            clients_per_channel: self.clients_per_channel,
            channels: self.channels,
            max_outstanding: self.max_outstanding,
            request_timeout: self.request_timeout,
        };
        let closed = opts.spec()?;
        let open = match self.rate {
            Some(r) => {
                opts.concurrency = None;
                opts.rate = Some(r);
                Some(opts.spec()?)
            }
            None => None,
        };
        Ok((closed, open))
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.models.is_empty() {
            return Err("--models must name at least one model".into());
        }
        if self.rounds == 0 || self.rounds > MAX_ROUNDS {
            return Err(format!("--rounds must be 1..={MAX_ROUNDS}"));
        }
        for m in &self.models {
            self.specs(m)?;
        }
        compute_plan(&self.batch_sizes, self.compute_duration)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("veraltheim-load").chain(args.iter().copied())).unwrap()
    }

    fn run_opts(args: &[&str]) -> LoadOpts {
        let mut v = vec!["run", "--echo"];
        v.extend_from_slice(args);
        match parse(&v).command {
            Command::Run(r) => r.load,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn shapes_parse_and_print() {
        let s: Shape = "1x16".parse().unwrap();
        assert_eq!(s, Shape(vec![1, 16]));
        assert_eq!(s.to_string(), "1x16");
        assert_eq!(s.elements(), 16);
        assert_eq!(s.rows(), 1);
        assert_eq!("4X3x2".parse::<Shape>().unwrap().elements(), 24);
        for bad in [
            "",
            "1x",
            "0x16",
            "ax2",
            "1x-2",
            "100000x100000",
            "1x1x1x1x1x1x1x1x1",
        ] {
            assert!(bad.parse::<Shape>().is_err(), "{bad}");
        }
    }

    #[test]
    fn closed_loop_defaults() {
        let spec = run_opts(&["--concurrency", "64"]).spec().unwrap();
        assert_eq!(spec.model, "identity");
        assert_eq!(spec.shape, Shape(vec![1, 16]));
        assert_eq!(
            spec.mode,
            Mode::Closed {
                concurrency: 64,
                clients_per_channel: 16
            }
        );
        assert_eq!(spec.mode.channels(), 4);
        assert_eq!(spec.duration, Duration::from_secs(5));
        assert_eq!(spec.warmup, Duration::from_secs(1));
    }

    #[test]
    fn channels_round_up() {
        let spec = run_opts(&["--concurrency", "17"]).spec().unwrap();
        assert_eq!(spec.mode.channels(), 2);
        let spec = run_opts(&["--concurrency", "1"]).spec().unwrap();
        assert_eq!(spec.mode.channels(), 1);
    }

    #[test]
    fn open_loop() {
        let spec = run_opts(&["--rate", "2500", "--max-outstanding", "10"])
            .spec()
            .unwrap();
        assert_eq!(
            spec.mode,
            Mode::Open {
                rate: 2500.0,
                channels: 4,
                max_outstanding: 10
            }
        );
    }

    #[test]
    fn a_mode_is_required_and_exclusive() {
        let e = run_opts(&[]).spec().unwrap_err();
        assert!(e.contains("--concurrency") && e.contains("--rate"), "{e}");
        let e = run_opts(&["--concurrency", "4", "--rate", "10"])
            .spec()
            .unwrap_err();
        assert!(e.contains("not both"), "{e}");
    }

    #[test]
    fn bounds_are_checked() {
        let cases: &[(&[&str], &str)] = &[
            (&["--concurrency", "0"], "--concurrency"),
            (&["--concurrency", "5000"], "--concurrency"),
            (&["--concurrency", "4", "--duration", "0"], "--duration"),
            (&["--concurrency", "4", "--duration", "inf"], "--duration"),
            (&["--concurrency", "4", "--duration", "4000"], "--duration"),
            (&["--concurrency", "4", "--warmup=-1"], "--warmup"),
            (
                &["--concurrency", "4", "--request-timeout", "0"],
                "--request-timeout",
            ),
            (
                &["--concurrency", "4", "--clients-per-channel", "0"],
                "--clients-per-channel",
            ),
            (&["--rate", "0"], "--rate"),
            (&["--rate", "NaN"], "--rate"),
            (&["--rate", "2000000"], "--rate"),
            (
                &["--rate", "900000", "--duration", "3000"],
                "schedules more",
            ),
            (&["--rate", "10", "--channels", "0"], "--channels"),
            (
                &["--rate", "10", "--max-outstanding", "0"],
                "--max-outstanding",
            ),
            (&["--concurrency", "4", "--model", " "], "--model"),
        ];
        for (args, flag) in cases {
            let e = run_opts(args).spec().unwrap_err();
            assert!(e.contains(flag), "{args:?}: {e}");
        }
        // Zero warm-up is allowed.
        assert!(
            run_opts(&["--concurrency", "4", "--warmup", "0"])
                .spec()
                .is_ok()
        );
    }

    #[test]
    fn run_needs_a_target() {
        assert!(Cli::try_parse_from(["veraltheim-load", "run", "--concurrency", "1"]).is_err());
        assert!(
            Cli::try_parse_from([
                "veraltheim-load",
                "run",
                "--echo",
                "--server",
                "127.0.0.1:1"
            ])
            .is_err()
        );
        let c = parse(&["run", "--server", "127.0.0.1:8001", "--concurrency", "1"]);
        assert!(matches!(
            c.command,
            Command::Run(RunArgs {
                server: Some(_),
                ..
            })
        ));
    }

    #[test]
    fn suite_defaults_and_validation() {
        let Command::Suite(s) = parse(&["suite"]).command else {
            panic!()
        };
        assert_eq!(s.models, vec!["identity", "cost"]);
        assert_eq!(s.concurrency, 64);
        assert_eq!(s.batch_sizes, vec![1, 8, 32, 64]);
        s.validate().unwrap();
        let (closed, open) = s.specs("cost").unwrap();
        assert_eq!(closed.model, "cost");
        assert!(open.is_none());

        let Command::Suite(s) = parse(&["suite", "--rate", "1000", "--batch-sizes", "1,0"]).command
        else {
            panic!()
        };
        assert!(s.validate().unwrap_err().contains("batch size 0"));
        let (_, open) = s.specs("identity").unwrap();
        assert!(matches!(open.unwrap().mode, Mode::Open { rate, .. } if rate == 1000.0));
        let Command::Suite(s) = parse(&["suite", "--rounds", "0"]).command else {
            panic!()
        };
        assert!(s.validate().unwrap_err().contains("--rounds"));
    }

    #[test]
    fn compute_plan_bounds() {
        assert!(compute_plan(&[], 0.5).is_err());
        assert!(compute_plan(&[1, 5000], 0.5).is_err());
        assert!(compute_plan(&[1], 0.0).is_err());
        let (b, d) = compute_plan(&[1, 8], 0.25).unwrap();
        assert_eq!(b, vec![1, 8]);
        assert_eq!(d, Duration::from_millis(250));
    }

    #[test]
    fn tls_options_pick_the_scheme_and_need_a_server() {
        let run = |args: &[&str]| match parse(args).command {
            Command::Run(r) => r,
            other => panic!("{other:?}"),
        };
        let r = run(&["run", "--server", "h:1", "--concurrency", "1"]);
        assert_eq!(r.tls.url("h:1").unwrap(), "http://h:1");
        let r = run(&[
            "run",
            "--server",
            "h:1",
            "--ca",
            "ca.pem",
            "--concurrency",
            "1",
        ]);
        assert_eq!(r.tls.url("h:1").unwrap(), "https://h:1");
        assert_eq!(r.tls.url("https://h:1").unwrap(), "https://h:1");
        assert!(r.tls.url("http://h:1").unwrap_err().contains("https://"));
        let r = run(&["run", "--server", "https://h:1", "--concurrency", "1"]);
        assert!(r.tls.url("https://h:1").unwrap_err().contains("--ca"));
        let r = run(&[
            "run",
            "--server",
            "h:1",
            "--ca",
            "a",
            "--cert",
            "c",
            "--key",
            "k",
            "--concurrency",
            "1",
        ]);
        assert_eq!(r.tls.key.as_deref(), Some(std::path::Path::new("k")));
        let no = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("veraltheim-load").chain(args.iter().copied()))
                .is_err()
        };
        assert!(no(&["run", "--echo", "--ca", "a", "--concurrency", "1"]));
        assert!(no(&[
            "run",
            "--server",
            "h:1",
            "--cert",
            "c",
            "--concurrency",
            "1"
        ]));
    }
}
