//! The configuration's layers (defaults < file < environment < flags), every setting through
//! each of them, and the checks on values.

use std::ffi::OsString;
use std::io::Write;

use super::settings::Kind;
use super::*;

/// No environment: these tests must not depend on the shell that runs them.
fn no_env(_: &str) -> Option<OsString> {
    None
}

fn resolve(args: &[&str]) -> anyhow::Result<Config> {
    Config::resolve_with(&ServeArgs::parse(args)?, no_env)
}

fn file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    write!(f, "{text}").unwrap();
    f
}

#[test]
fn embedded_defaults_parse() {
    let c = Config::defaults().unwrap();
    assert_eq!(c.server.grpc_addr.to_string(), "127.0.0.1:8001");
    assert_eq!(c.server.http_addr.to_string(), "127.0.0.1:8002");
    assert!(c.models.load.is_empty());
    assert_eq!(c, resolve(&[]).unwrap());
}

#[test]
fn runtime_threads_default_to_half_the_cores_and_follow_the_flag() {
    let c = Config::defaults().unwrap();
    assert_eq!(c.server.runtime_threads, None);
    let cores = std::thread::available_parallelism().unwrap().get();
    assert_eq!(c.server.runtime_worker_threads(), (cores / 2).max(1));
    let c = resolve(&["--runtime-threads", "3"]).unwrap();
    assert_eq!(c.server.runtime_worker_threads(), 3);
}

#[test]
fn file_then_flags_override_in_order() {
    let f = file(
        "[server]\ngrpc_addr = \"127.0.0.1:9001\"\nshutdown_grace_seconds = 3\n[models]\nload = [\"cost\"]\n",
    );
    let path = f.path().to_str().unwrap();
    let c = resolve(&["--config", path, "--shutdown-grace-seconds", "7"]).unwrap();
    assert_eq!(c.server.grpc_addr.to_string(), "127.0.0.1:9001");
    assert_eq!(c.server.shutdown_grace_seconds, 7);
    assert_eq!(c.models.load, vec!["cost".to_string()]);
    // untouched keys keep their defaults
    assert_eq!(c.server.http_addr.to_string(), "127.0.0.1:8002");
}

#[test]
fn unknown_keys_and_bad_values_are_named() {
    let f = file("[server]\ngrpc_adr = \"x\"\n");
    let err = format!("{:#}", Config::from_file(Some(f.path())).unwrap_err());
    assert!(err.contains("grpc_adr"), "{err}");
    let err = resolve(&["--max-message-bytes", "10"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_message_bytes"), "{err}");
    // A value of the wrong shape names the flag or the variable it came from.
    let err = resolve(&["--grpc-addr", "nowhere"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("--grpc-addr (server.grpc_addr)"), "{err}");
    let err = resolve(&["--shutdown-grace-seconds", "soon"])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--shutdown-grace-seconds") && err.contains("soon"),
        "{err}"
    );
    let env = |name: &str| (name == "VERALTHEIM_LOG_FORMAT").then(|| OsString::from("xml"));
    let err = Config::resolve_with(&ServeArgs::default(), env)
        .unwrap_err()
        .to_string();
    assert!(err.contains("VERALTHEIM_LOG_FORMAT"), "{err}");
}

#[test]
fn the_old_spellings_of_unset_still_mean_unset() {
    let f = file(
        "[server]\nrate_limit_per_second = 0\nruntime_threads = 0\n[models]\nonnxruntime_library = \"\"\ncpu_memory_bytes = 0\n[devices]\nsimulate_gpus = \"\"\n[cache]\nttl_seconds = 0\n[jobs]\nmax_running = 0\ndefault_ttl_seconds = 0\n[jobs.kubernetes]\nnamespace = \"\"\nttl_seconds_after_finished = -1\ngpus = 0\n",
    );
    let c = resolve(&["--config", f.path().to_str().unwrap()]).unwrap();
    assert_eq!(c.server.rate_limit_per_second, None);
    assert_eq!(c.server.runtime_threads, None);
    assert_eq!(c.models.onnxruntime_library, None);
    assert_eq!(c.models.cpu_memory_bytes, None);
    assert_eq!(c.devices.simulate_gpus, None);
    assert_eq!(c.cache.ttl_seconds, None);
    assert_eq!(c.jobs.max_running, None);
    assert_eq!(c.jobs.default_ttl_seconds, None);
    let k = &c.jobs.kubernetes;
    assert_eq!(
        (&k.namespace, k.ttl_seconds_after_finished, k.gpus),
        (&None, None, None)
    );
    // And from a flag, through the same reading.
    let c = resolve(&["--cpu-memory-bytes", "0", "--simulate-gpus", ""]).unwrap();
    assert_eq!(
        (c.models.cpu_memory_bytes, c.devices.simulate_gpus),
        (None, None)
    );
}

/// A value for `s` other than its default, valid for the checks in `validate`, as a user would
/// type it after the flag.
fn sample(s: &Setting) -> String {
    let by_key = match s.key.as_str() {
        "server.grpc_addr" => Some("127.0.0.1:9101"),
        "server.http_addr" => Some("127.0.0.1:9102"),
        "logging.format" => Some("json"),
        "jobs.executor" => Some("kubernetes"),
        "devices.simulate_gpus" => Some("2x1GiB"),
        "cluster.node_id" => Some("node-7"),
        "cluster.advertise_addr" => Some("node-7.example:9001"),
        "cluster.labels" => Some("zone=a,gpu=h100"),
        "bus.nats_url" => Some("nats://127.0.0.1:4222"),
        "bus.bridge_topics" => Some("jobs.>,models.*.state"),
        "bus.nats_stream" => Some("OTHER_EVENTS"),
        "bus.nats_subject_prefix" => Some("other.events"),
        "jobs.local.nice" => Some("15"),
        "jobs.kubernetes.node_selector" => Some("pool=gpu,zone=a"),
        "jobs.kubernetes.tolerations" => {
            Some(r#"[{ key = "nvidia.com/gpu", operator = "Exists", effect = "NoSchedule" }]"#)
        }
        "jobs.queues" => Some(r#"[{ name = "batch", weight = 2, gpus = 1 }]"#),
        "models.latency_slo" => Some("identity=50,cost=200"),
        _ => None,
    };
    if let Some(v) = by_key {
        return v.to_string();
    }
    match (s.kind, &s.default) {
        (Kind::Integer, Some(toml::Value::Integer(n))) => (n * 2 + 1).to_string(),
        (Kind::Integer, _) => "7".into(),
        (Kind::Float, Some(toml::Value::Float(f))) => (f * 2.0).to_string(),
        (Kind::Float, _) => "2.5".into(),
        (Kind::Bool, Some(toml::Value::Boolean(b))) => (!b).to_string(),
        (Kind::Bool, _) => "true".into(),
        (Kind::List, _) => "first,second".into(),
        (Kind::Text, _) => format!("/srv/{}", s.flag),
    }
}

/// The keys of a table, dotted, down to values (a list of tables is one key).
fn keys(table: &toml::Table, prefix: &str, out: &mut Vec<String>) {
    for (name, value) in table {
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        match value {
            toml::Value::Table(t) => keys(t, &key, out),
            _ => out.push(key),
        }
    }
}

#[test]
fn every_key_of_the_default_file_can_be_set_by_file_environment_and_flag() {
    let defaults = Config::defaults().unwrap();
    // Every key `config default` prints is a setting: those with a default, and those shown
    // commented out (settings.rs reads them as settings unset by default).
    let mut printed = Vec::new();
    keys(&toml::from_str(DEFAULT_TOML).unwrap(), "", &mut printed);
    for key in &printed {
        assert!(
            settings().iter().any(|s| &s.key == key),
            "{key} has no flag"
        );
    }
    assert!(
        settings().len() > printed.len(),
        "the unset keys are settings too"
    );

    for s in settings() {
        let raw = sample(s);
        let value = s.value(std::slice::from_ref(&raw)).unwrap();
        let mut table = toml::Table::new();
        set(&mut table, &s.key, value);
        let f = file(&toml::to_string(&table).unwrap());
        let by_file = resolve(&["--config", f.path().to_str().unwrap()])
            .unwrap_or_else(|e| panic!("{} by file: {e:#}", s.key));
        let env = |name: &str| (name == s.env).then(|| OsString::from(&raw));
        let by_env = Config::resolve_with(&ServeArgs::default(), env)
            .unwrap_or_else(|e| panic!("{} by {}: {e:#}", s.key, s.env));
        let flag = format!("--{}", s.flag);
        let by_flag = resolve(&[flag.as_str(), raw.as_str()])
            .unwrap_or_else(|e| panic!("{} by {flag}: {e:#}", s.key));
        assert_ne!(by_file, defaults, "{} = {raw} changed nothing", s.key);
        assert_eq!(by_file, by_env, "{}: the file and {} differ", s.key, s.env);
        assert_eq!(by_file, by_flag, "{}: the file and {flag} differ", s.key);
    }
}

#[test]
fn the_environment_beats_the_file_and_a_flag_beats_the_environment() {
    let f = file(
        "[server]\ngrpc_addr = \"127.0.0.1:9001\"\nallow_client_shm = false\n[models]\nload = [\"a\"]\nsize_factor = 3.0\n",
    );
    let path = f.path().to_str().unwrap().to_string();
    let env = |name: &str| -> Option<OsString> {
        Some(
            match name {
                "VERALTHEIM_CONFIG" => path.as_str(),
                "VERALTHEIM_GRPC_ADDR" => "127.0.0.1:9002",
                "VERALTHEIM_ALLOW_CLIENT_SHM" => "true",
                "VERALTHEIM_LOAD_MODEL" => "b,c",
                _ => return None,
            }
            .into(),
        )
    };
    let c = Config::resolve_with(&ServeArgs::default(), env).unwrap();
    assert_eq!(c.server.grpc_addr.to_string(), "127.0.0.1:9002");
    assert!(c.server.allow_client_shm);
    assert_eq!(c.models.load, ["b", "c"]);
    assert_eq!(
        c.models.size_factor, 3.0,
        "the file, named by VERALTHEIM_CONFIG, is read"
    );

    let args = ServeArgs::parse(&[
        "--grpc-addr",
        "127.0.0.1:9003",
        "--allow-client-shm",
        "false",
        "--load-model",
        "d",
        "--load-model",
        "e",
    ])
    .unwrap();
    let c = Config::resolve_with(&args, env).unwrap();
    assert_eq!(c.server.grpc_addr.to_string(), "127.0.0.1:9003");
    assert!(!c.server.allow_client_shm);
    assert_eq!(c.models.load, ["d", "e"]);
    // A bare boolean flag means true.
    let c = resolve(&["--allow-client-shm"]).unwrap();
    assert!(c.server.allow_client_shm);
}

#[test]
fn the_example_in_deploy_parses() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/veraltheim.toml");
    let c = Config::from_file(Some(&path)).unwrap();
    assert_eq!(c.models.default_max_queue_size, 4096);
    // In the shipped deployment jobs become pods; none runs in the coordinator's container,
    // which holds a service-account token that may create pods.
    assert_eq!(c.jobs.executor, JobExecutorKind::Kubernetes);
}

#[test]
fn the_local_jobs_section_is_read_and_checked() {
    let l = Config::defaults().unwrap().jobs.local;
    assert_eq!((l.run_as, l.cgroup_dir), (None, None));
    assert!(l.allowed_commands.is_empty());
    assert_eq!(l.path, veraltheim_slowpath::sandbox::DEFAULT_PATH);
    assert_eq!(
        (l.max_open_files, l.max_processes),
        (Some(4096), Some(4096))
    );
    assert_eq!((l.max_address_space_bytes, l.max_cpu_seconds), (None, None));
    let f = file(
        r#"[jobs.local]
run_as = "nobody:nogroup"
allowed_commands = ["python3", "/usr/bin/env"]
max_address_space_bytes = 8589934592
max_cpu_seconds = 600
max_processes = 0
"#,
    );
    let path = f.path().to_str().unwrap();
    let l = resolve(&["--config", path]).unwrap().jobs.local;
    assert_eq!(l.run_as.as_deref(), Some("nobody:nogroup"));
    assert_eq!(l.allowed_commands, ["python3", "/usr/bin/env"]);
    assert_eq!(l.max_address_space_bytes, Some(8 << 30));
    assert_eq!(l.max_cpu_seconds, Some(600));
    assert_eq!(l.max_processes, None, "0 means unset");
    let l = resolve(&[
        "--config",
        path,
        "--jobs-run-as",
        "daemon:daemon",
        "--jobs-allowed-commands",
        "sh,cat",
    ])
    .unwrap()
    .jobs
    .local;
    assert_eq!(l.run_as.as_deref(), Some("daemon:daemon"));
    assert_eq!(l.allowed_commands, ["sh", "cat"]);

    let err = resolve(&["--jobs-path", "/usr/bin:bin"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("jobs.local.path '/usr/bin:bin'"), "{err}");
    let err = resolve(&["--kubernetes-run-as-user", "0"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("jobs.kubernetes.run_as_user is 0"), "{err}");
    let err = resolve(&["--kubernetes-run-as-group", "-1"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("jobs.kubernetes.run_as_group is -1"), "{err}");
    let k = resolve(&["--kubernetes-run-as-user", "1000"])
        .unwrap()
        .jobs
        .kubernetes;
    assert_eq!((k.run_as_user, k.run_as_group), (1000, 65534));
}

#[test]
fn the_executor_and_its_kubernetes_section_are_read_and_checked() {
    let c = Config::defaults().unwrap();
    assert_eq!(c.jobs.executor, JobExecutorKind::Local);
    assert_eq!(c.jobs.kubernetes.ttl_seconds_after_finished, Some(86400));
    let f = file(
        r#"[jobs]
executor = "kubernetes"
[jobs.kubernetes]
namespace = "batch"
node_selector = ["pool=gpu"]
tolerations = [{ key = "nvidia.com/gpu", operator = "Exists", effect = "NoSchedule" }]
gpus = 4
"#,
    );
    let path = f.path().to_str().unwrap();
    let c = resolve(&["--config", path]).unwrap();
    assert_eq!(c.jobs.executor, JobExecutorKind::Kubernetes);
    let k = &c.jobs.kubernetes;
    assert_eq!((k.namespace.as_deref(), k.gpus), (Some("batch"), Some(4)));
    assert_eq!(k.node_selector, ["pool=gpu"]);
    assert_eq!(k.tolerations[0].operator, "Exists");
    // Untouched keys keep their defaults, and the flag wins over the file.
    assert_eq!(k.api_retries, 3);
    let c = resolve(&["--config", path, "--jobs-executor", "local"]).unwrap();
    assert_eq!(c.jobs.executor, JobExecutorKind::Local);

    let bad = file("[jobs.kubernetes]\nnode_selector = [\"pool\"]\n");
    let err = resolve(&["--config", bad.path().to_str().unwrap()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("node_selector entry 'pool'"), "{err}");
}

#[test]
fn tls_takes_a_certificate_with_its_key() {
    let c = resolve(&[]).unwrap();
    assert_eq!(c.server.tls.files().unwrap(), None);
    let c = resolve(&["--tls-cert", "/c.pem", "--tls-key", "/k.pem"]).unwrap();
    let files = c.server.tls.files().unwrap().unwrap();
    assert_eq!(
        (files.cert, files.key, files.client_ca),
        ("/c.pem".into(), "/k.pem".into(), None)
    );
    let f = file(
        "[server.tls]\ncert_file = \"/c.pem\"\nkey_file = \"/k.pem\"\nclient_ca_file = \"/ca.pem\"\n",
    );
    let c = resolve(&["--config", f.path().to_str().unwrap()]).unwrap();
    let files = c.server.tls.files().unwrap().unwrap();
    assert_eq!(files.client_ca, Some("/ca.pem".into()));
    for (args, missing) in [
        (&["--tls-cert", "/c.pem"][..], "--tls-key"),
        (&["--tls-key", "/k.pem"][..], "--tls-cert"),
        (&["--tls-client-ca", "/ca.pem"][..], "--tls-cert"),
    ] {
        let e = resolve(args)
            .unwrap()
            .server
            .tls
            .files()
            .unwrap_err()
            .to_string();
        assert!(e.contains(missing), "{args:?}: {e}");
    }
}

#[test]
fn cluster_settings_have_defaults_flags_and_checks() {
    let c = resolve(&[]).unwrap();
    assert_eq!(c.cluster.node_id, None);
    assert_eq!(c.cluster.advertise_addr, None);
    assert_eq!(c.cluster.lease_seconds, 10);
    assert!(c.cluster.labels.is_empty());
    let c = resolve(&[
        "--node-id",
        "node-7",
        "--advertise-addr",
        "node-7.example:9001",
        "--lease-seconds",
        "2",
        "--node-labels",
        "zone=a",
        "--node-labels",
        "gpu=h100",
    ])
    .unwrap();
    assert_eq!(c.cluster.node_id.as_deref(), Some("node-7"));
    assert_eq!(
        c.cluster.advertise_addr.as_deref(),
        Some("node-7.example:9001")
    );
    assert_eq!(c.cluster.lease_seconds, 2);
    assert_eq!(
        c.cluster.label_map(),
        [
            ("gpu".to_string(), "h100".to_string()),
            ("zone".to_string(), "a".to_string())
        ]
        .into()
    );
    for (args, says) in [
        (&["--node-id", "a b"][..], "cluster.node_id"),
        (&["--lease-seconds", "0"][..], "cluster.lease_seconds"),
        (&["--lease-seconds", "3601"][..], "cluster.lease_seconds"),
        (&["--node-labels", "novalue"][..], "not KEY=VALUE"),
        (&["--advertise-addr", "0.0.0.0:8001"][..], "unspecified"),
        (&["--advertise-addr", "[::]:8001"][..], "unspecified"),
        (&["--advertise-addr", "node-1"][..], "no port"),
        (&["--advertise-addr", "node-1:0"][..], "port 0"),
        (&["--advertise-addr", ":8001"][..], "no host"),
    ] {
        let e = format!("{:#}", resolve(args).unwrap_err());
        assert!(e.contains(says), "{args:?}: {e}");
    }
}

#[test]
fn bus_settings_have_defaults_flags_and_checks() {
    let c = resolve(&[]).unwrap();
    assert_eq!(c.bus.nats_url, None);
    assert_eq!(c.bus.bridge("node-1"), None, "no URL, no bridge");
    assert_eq!(
        c.bus.bridge_topics,
        ["jobs.>", "models.>", "devices.>", "nodes.>", "audit.>"]
    );
    let c = resolve(&[
        "--nats-url",
        "nats://127.0.0.1:4222",
        "--nats-stream",
        "T1",
        "--nats-subject-prefix",
        "t1.events",
        "--bridge-topics",
        "jobs.>,models.*.state",
        "--nats-buffer",
        "5",
    ])
    .unwrap();
    let b = c.bus.bridge("node-1").expect("a URL, a bridge");
    assert_eq!(b.url, "nats://127.0.0.1:4222");
    assert_eq!((b.node.as_str(), b.stream.as_str()), ("node-1", "T1"));
    assert_eq!(b.subject_prefix, "t1.events");
    assert_eq!(b.topics, ["jobs.>", "models.*.state"]);
    assert_eq!(b.buffer, 5);
    // An empty URL is the old spelling of unset.
    assert_eq!(resolve(&["--nats-url", ""]).unwrap().bus.nats_url, None);
    for (args, says) in [
        (
            &["--nats-url", "http://127.0.0.1:4222"][..],
            "bus.nats_url (--nats-url)",
        ),
        (&["--nats-url", "nats://a,,nats://b"][..], "bus.nats_url"),
        (
            &["--bridge-topics", "jobs.>.x"][..],
            "bus.bridge_topics (--bridge-topics) entry \"jobs.>.x\"",
        ),
        (
            &["--bridge-topics", "[]"][..],
            "bus.bridge_topics (--bridge-topics) is empty",
        ),
        (
            &["--nats-stream", "a.b"][..],
            "bus.nats_stream (--nats-stream)",
        ),
        (
            &["--nats-subject-prefix", "a.>"][..],
            "bus.nats_subject_prefix",
        ),
        (
            &["--nats-buffer", "0"][..],
            "bus.nats_buffer (--nats-buffer)",
        ),
    ] {
        let e = format!("{:#}", resolve(args).unwrap_err());
        assert!(e.contains(says), "{args:?}: {e}");
    }
}

#[test]
fn the_advertised_address_defaults_to_the_grpc_address_unless_it_is_every_address() {
    let c = resolve(&[]).unwrap().cluster;
    let local: SocketAddr = "127.0.0.1:8001".parse().unwrap();
    let every: SocketAddr = "0.0.0.0:8001".parse().unwrap();
    assert_eq!(c.advertised(local, "h", true).unwrap(), "127.0.0.1:8001");
    // A single node: its host name, nobody dials it.
    assert_eq!(c.advertised(every, "h", false).unwrap(), "h:8001");
    // With a shared registry other nodes would: refused, saying what to give.
    let e = c.advertised(every, "h", true).unwrap_err().to_string();
    assert!(e.contains("--advertise-addr"), "{e}");
    let c = resolve(&["--advertise-addr", "n.example:1"])
        .unwrap()
        .cluster;
    assert_eq!(c.advertised(every, "h", true).unwrap(), "n.example:1");
}

#[test]
fn a_jobs_nice_value_outside_0_to_19_is_refused_by_name() {
    for bad in ["-5", "20"] {
        let f = file(&format!("[jobs.local]\nnice = {bad}\n"));
        let err = resolve(&["--config", f.path().to_str().unwrap()]).unwrap_err();
        assert!(
            format!("{err:#}").contains(&format!("jobs.local.nice is {bad}; it must be 0 to 19")),
            "{err:#}"
        );
    }
    let config = resolve(&["--jobs-nice", "0", "--jobs-min-cpu-millis", "500"]).unwrap();
    assert_eq!(
        (config.jobs.local.nice, config.jobs.min_cpu_millis),
        (0, 500)
    );
    let defaults = Config::defaults().unwrap();
    assert_eq!(
        (defaults.jobs.local.nice, defaults.jobs.min_cpu_millis),
        (10, 0)
    );
}
