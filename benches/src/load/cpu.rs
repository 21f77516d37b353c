//! Where the CPU went during a measured window, from Linux's `/proc`: the machine's busy time
//! (`/proc/stat`), this process's threads by name (`load-client` = the load generator,
//! `echo-server` = the in-process echo server) and the coordinator process with its threads
//! (`tokio-runtime-w` = gRPC and batching, `veraltheim-exec` = the execution pool). On a shared
//! machine this says how much of the cores the measurement actually had. Elsewhere than Linux,
//! nothing is sampled.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

/// Clock ticks per second of `/proc` times (USER_HZ, 100 on every Linux architecture we run).
pub const TICKS_PER_S: f64 = 100.0;

/// The thread-name prefix of the load generator's runtime (see the binary).
pub const CLIENT_THREADS: &str = "load-client";
/// The thread-name prefix of the echo server's runtime.
pub const ECHO_THREADS: &str = "echo-server";

/// `(comm, utime + stime)` of a `/proc/.../stat` line; the name may hold spaces or parentheses,
/// so the fields are found after the last `)`.
pub fn parse_stat(line: &str) -> Option<(String, u64)> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    let comm = line.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = line.get(close + 1..)?.split_whitespace().collect();
    // Fields after the name start at field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// `(busy, steal)` ticks of all CPUs from the first line of `/proc/stat`. Busy is everything but
/// idle and iowait, steal included (time the hypervisor gave our virtual CPUs to someone else).
pub fn parse_proc_stat(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    let steal = v.get(7).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), steal))
}

/// Ticks of each live thread of `pid`, by thread id, with its name. Keyed by id, so that a
/// thread that ends between two samples does not make the others' sum go backwards.
fn threads(pid: &str) -> BTreeMap<u64, (String, u64)> {
    let mut by_tid = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_tid;
    };
    for entry in dir.flatten() {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<u64>().ok())
        else {
            continue;
        };
        if let Ok(line) = std::fs::read_to_string(entry.path().join("stat"))
            && let Some((comm, ticks)) = parse_stat(&line)
        {
            by_tid.insert(tid, (comm, ticks));
        }
    }
    by_tid
}

type Threads = BTreeMap<u64, (String, u64)>;

/// Ticks each thread name gained between two readings, over the threads alive at the second
/// (a thread born in between counts from zero; one that ended in between is lost).
fn gained(after: &Threads, before: &Threads) -> BTreeMap<String, u64> {
    let mut by_name = BTreeMap::new();
    for (tid, (comm, ticks)) in after {
        let was = before.get(tid).map_or(0, |(_, t)| *t);
        *by_name.entry(comm.clone()).or_default() += ticks.saturating_sub(was);
    }
    by_name
}

fn with_prefix(m: &BTreeMap<String, u64>, prefix: &str) -> u64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v)
        .sum()
}

/// One reading.
#[derive(Clone, Debug)]
pub struct Sample {
    at: Instant,
    machine: Option<(u64, u64)>,
    own: Threads,
    /// The coordinator: its whole process (threads that ended included) and its live threads.
    server: Option<(u64, Threads)>,
}

/// Reads the machine, this process and (if given) the coordinator's process.
pub fn sample(server_pid: Option<u32>) -> Sample {
    let machine = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|t| parse_proc_stat(&t));
    let server = server_pid.and_then(|pid| {
        let line = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (_, total) = parse_stat(&line)?;
        Some((total, threads(&pid.to_string())))
    });
    Sample {
        at: Instant::now(),
        machine,
        own: threads("self"),
        server,
    }
}

/// A whole process's CPU ticks (its threads, ended ones included), if it is alive.
pub fn process_ticks(pid: u32) -> Option<u64> {
    let line = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&line).map(|(_, ticks)| ticks)
}

/// The CPU ticks of every live process named `comm` (e.g. `postgres`: its server and each
/// connection's backend); a process that ended between two readings is lost from the second.
pub fn ticks_of_named(comm: &str) -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|line| parse_stat(&line))
        .filter(|(name, _)| name == comm)
        .map(|(_, ticks)| ticks)
        .sum()
}

/// CPU used between two samples, in cores (CPU-seconds per wall second).
#[derive(Clone, Debug, Default, Serialize)]
pub struct CpuUse {
    pub wall_s: f64,
    /// All CPUs' busy time (every process on the machine, and steal).
    pub machine_busy_cores: Option<f64>,
    /// Of which steal: our virtual CPUs were running someone else's VM.
    pub steal_cores: Option<f64>,
    /// The load generator's client threads.
    pub client_cores: f64,
    /// The server: the echo server's threads, or the whole coordinator process (`None` when it
    /// is neither, e.g. `run --server`).
    pub server_cores: Option<f64>,
    /// Busy time that was neither ours nor the server's: other tenants of the machine.
    pub others_cores: Option<f64>,
    /// The coordinator's threads by name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub server_threads: BTreeMap<String, f64>,
}

impl CpuUse {
    /// Between `before` and `after`; the server is the coordinator if sampled, else the echo
    /// server's threads of this process.
    pub fn between(before: &Sample, after: &Sample) -> CpuUse {
        let wall = after.at.duration_since(before.at).as_secs_f64();
        if wall <= 0.0 {
            return CpuUse::default();
        }
        let cores = |ticks: u64| ticks as f64 / TICKS_PER_S / wall;
        let own = gained(&after.own, &before.own);
        let client = cores(with_prefix(&own, CLIENT_THREADS));
        let mut server_threads = BTreeMap::new();
        let server = match (&before.server, &after.server) {
            (Some((b, bt)), Some((a, at))) => {
                for (name, ticks) in gained(at, bt) {
                    server_threads.insert(name, cores(ticks));
                }
                Some(cores(a.saturating_sub(*b)))
            }
            _ if after.own.values().any(|(k, _)| k.starts_with(ECHO_THREADS)) => {
                Some(cores(with_prefix(&own, ECHO_THREADS)))
            }
            _ => None,
        };
        let (machine, steal) = match (before.machine, after.machine) {
            (Some((bb, bs)), Some((ab, as_))) => (
                Some(cores(ab.saturating_sub(bb))),
                Some(cores(as_.saturating_sub(bs))),
            ),
            _ => (None, None),
        };
        // The echo server's threads are already in `own`.
        let ours = cores(own.values().sum())
            + if before.server.is_some() {
                server.unwrap_or(0.0)
            } else {
                0.0
            };
        CpuUse {
            wall_s: wall,
            machine_busy_cores: machine,
            steal_cores: steal,
            client_cores: client,
            server_cores: server,
            others_cores: machine.map(|m| (m - ours).max(0.0)),
            server_threads,
        }
    }

    /// Server CPU time per request, µs.
    pub fn server_us_per_request(&self, throughput_rps: f64) -> Option<f64> {
        let cores = self.server_cores?;
        (throughput_rps > 0.0).then(|| cores * 1e6 / throughput_rps)
    }

    /// Client and server CPU time per request, µs (what one request costs the machine).
    pub fn total_us_per_request(&self, throughput_rps: f64) -> Option<f64> {
        let server = self.server_cores?;
        (throughput_rps > 0.0).then(|| (server + self.client_cores) * 1e6 / throughput_rps)
    }

    /// Client CPU time per request, µs.
    pub fn client_us_per_request(&self, throughput_rps: f64) -> Option<f64> {
        (throughput_rps > 0.0).then(|| self.client_cores * 1e6 / throughput_rps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stat_lines_with_odd_names() {
        let line = "4242 (tokio-runtime-w) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 8 0";
        assert_eq!(parse_stat(line), Some(("tokio-runtime-w".to_string(), 300)));
        let line = "7 (a (b) c) R 1 2 3 4 5 6 7 8 9 10 3 4 0 0";
        assert_eq!(parse_stat(line), Some(("a (b) c".to_string(), 7)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn proc_stat_busy_excludes_idle_and_iowait() {
        let text = "cpu  100 0 50 800 40 5 5 7 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n";
        assert_eq!(parse_proc_stat(text), Some((167, 7)));
        assert_eq!(parse_proc_stat("intr 1 2"), None);
    }

    #[test]
    fn use_between_samples_in_cores() {
        let t0 = Instant::now();
        let mk = |at, machine, client, echo| Sample {
            at,
            machine: Some((machine, machine / 10)),
            own: BTreeMap::from([
                (1, ("load-client".to_string(), client)),
                (2, ("echo-server".to_string(), echo)),
            ]),
            server: None,
        };
        let before = mk(t0, 1000, 10, 20);
        let after = mk(t0 + Duration::from_secs(2), 1380, 110, 220);
        let u = CpuUse::between(&before, &after);
        // 100 ticks over 2 s = 0.5 core; 200 ticks = 1 core; machine 380 ticks = 1.9 cores.
        assert!((u.client_cores - 0.5).abs() < 1e-9);
        assert!((u.server_cores.unwrap() - 1.0).abs() < 1e-9);
        assert!((u.machine_busy_cores.unwrap() - 1.9).abs() < 1e-9);
        assert!((u.steal_cores.unwrap() - 0.19).abs() < 1e-9);
        assert!((u.others_cores.unwrap() - 0.4).abs() < 1e-9);
        assert!((u.server_us_per_request(10_000.0).unwrap() - 100.0).abs() < 1e-9);
    }

    #[test]
    fn coordinator_threads_are_split_by_exact_name() {
        let t0 = Instant::now();
        let mk = |at, total, tokio, exec| Sample {
            at,
            machine: None,
            own: BTreeMap::new(),
            server: Some((
                total,
                BTreeMap::from([
                    (1, ("veraltheim".to_string(), 1)),
                    (2, ("tokio-runtime-w".to_string(), tokio)),
                    (3, ("veraltheim-exec".to_string(), exec)),
                ]),
            )),
        };
        let u = CpuUse::between(
            &mk(t0, 100, 40, 50),
            &mk(t0 + Duration::from_secs(1), 250, 120, 120),
        );
        assert!((u.server_cores.unwrap() - 1.5).abs() < 1e-9);
        assert!((u.server_threads["tokio-runtime-w"] - 0.8).abs() < 1e-9);
        assert!((u.server_threads["veraltheim-exec"] - 0.7).abs() < 1e-9);
        assert_eq!(u.server_threads["veraltheim"], 0.0);
        assert!(u.machine_busy_cores.is_none() && u.others_cores.is_none());
    }

    #[test]
    fn a_thread_that_ended_does_not_cancel_the_others() {
        let t0 = Instant::now();
        let before = Sample {
            at: t0,
            machine: None,
            // Thread 9 (a finished blocking-pool thread) had used a lot.
            own: BTreeMap::from([
                (1, ("load-client".to_string(), 100)),
                (9, ("load-client".to_string(), 5000)),
            ]),
            server: None,
        };
        let after = Sample {
            at: t0 + Duration::from_secs(1),
            machine: None,
            // Thread 1 gained 50; thread 9 is gone; thread 12 was born and used 30.
            own: BTreeMap::from([
                (1, ("load-client".to_string(), 150)),
                (12, ("load-client".to_string(), 30)),
            ]),
            server: None,
        };
        let u = CpuUse::between(&before, &after);
        assert!((u.client_cores - 0.8).abs() < 1e-9, "{u:?}");
        assert!(u.server_cores.is_none());
    }

    #[test]
    fn this_process_is_sampled_on_linux() {
        let s = sample(None);
        if cfg!(target_os = "linux") {
            assert!(s.machine.is_some());
            assert!(!s.own.is_empty());
        }
    }
}
