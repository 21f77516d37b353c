//! `veraltheim jobs submit`: the job's spec from flags, from a TOML job file (`-f job.toml`), or
//! both — each flag given on the command line overrides the file's value (`--env` and `--label`
//! override key by key). Unknown keys in the file are refused by name.
//!
//! ```toml
//! name = "nightly-embed"          # --name
//! queue = "research"              # --queue
//! priority = "high"               # --priority (a priority class)
//! max_retries = 3                 # --max-retries
//! deadline = "2h"                 # --deadline: seconds, or a number with s, m, h or d
//! ttl = "7d"                      # --ttl: kept this long after it finished, then deleted
//! idempotency_key = "nightly-2026-11-27"   # --idempotency-key
//! pausable = true                 # --pausable true|false: may be paused while a latency
//!                                 # objective is at risk (unset: lowest priority class only)
//!
//! [resources]
//! cpu = "1.5"                     # --cpu: cores (1.5) or millicores ("500m")
//! memory = "2Gi"                  # --memory: bytes, or a number with Ki, Mi, Gi, K, M or G
//! gpu = 1                         # --gpu: how many GPUs
//! gpu_memory = "8Gi"              # --gpu-memory: memory on each GPU, held in the models'
//!                                 # budget while it runs here (none said: the whole GPU)
//!
//! [labels]                        # --label KEY=VALUE
//! team = "search"
//!
//! [command]                       # a command job; or [inference], not both
//! image = "python:3.12"           # --image (the Kubernetes executor's; local runs ignore it)
//! command = ["python", "train.py"]   # -- CMD ARGS...
//! working_dir = "/srv/train"      # --working-dir
//! env = { EPOCHS = "3" }          # --env KEY=VALUE
//! writable_root = false           # --writable-root (Kubernetes: the root filesystem is
//!                                 # read-only unless the job asks)
//!
//! # [inference]                   # a batch inference job
//! # model = "minilm"              # --model
//! # input = "in.jsonl"            # --input
//! # output = "out.jsonl"          # --output
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context as _, anyhow, bail};
use serde::Deserialize;
use veraltheim_proto::v1;

/// `jobs submit`'s flags. Every one is optional so that a job file can supply it.
#[derive(Clone, Debug, Default, PartialEq, clap::Args)]
pub struct SubmitArgs {
    /// A TOML job file (`-` reads standard input); flags given here override its values.
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// The job's name [default: job].
    #[arg(long)]
    pub name: Option<String>,
    /// Its queue [default: default].
    #[arg(long)]
    pub queue: Option<String>,
    /// Priority class (see `jobs.priority_classes` in the configuration).
    #[arg(long)]
    pub priority: Option<String>,
    /// CPU, in cores (`1.5`) or millicores (`500m`).
    #[arg(long)]
    pub cpu: Option<String>,
    /// Memory, in bytes or with a suffix (`512Mi`, `2Gi`, `1G`).
    #[arg(long)]
    pub memory: Option<String>,
    /// GPUs, a count.
    #[arg(long)]
    pub gpu: Option<u32>,
    /// Memory on each GPU (`8Gi`): held in the models' memory budget while the job runs on
    /// this node [default: the whole GPU].
    #[arg(long)]
    pub gpu_memory: Option<String>,
    /// Retries after a failure of the job's own (exit code) [default: 0].
    #[arg(long)]
    pub max_retries: Option<u32>,
    /// How long an attempt may run before it is killed (TIMED_OUT), time paused not counted:
    /// seconds, or a number with s, m, h or d.
    #[arg(long, visible_alias = "deadline-seconds")]
    pub deadline: Option<String>,
    /// How long the job is kept once finished, then deleted with its logs: seconds, or a number
    /// with s, m, h or d [default: the server's `jobs.default_ttl_seconds`].
    #[arg(long)]
    pub ttl: Option<String>,
    /// A repeated submit with the same key returns the same job.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Whether the job may be paused (SIGSTOP, then SIGCONT; its deadline moves by the time
    /// paused) while a model's latency objective is at risk [default: only jobs of the lowest
    /// priority class may]. Local command jobs only.
    #[arg(long, value_name = "true|false")]
    pub pausable: Option<bool>,
    /// KEY=VALUE, repeatable.
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// Container image (used by the Kubernetes executor; local runs ignore it).
    #[arg(long)]
    pub image: Option<String>,
    /// KEY=VALUE, repeatable.
    #[arg(long = "env")]
    pub env: Vec<String>,
    /// The command's working directory.
    #[arg(long)]
    pub working_dir: Option<String>,
    /// Kubernetes: give the container a writable root filesystem (it is read-only otherwise,
    /// with an empty /tmp). Local runs ignore it.
    #[arg(long)]
    pub writable_root: bool,
    /// Batch inference: the model.
    #[arg(long)]
    pub model: Option<String>,
    /// Batch inference: the input file (JSON lines).
    #[arg(long)]
    pub input: Option<String>,
    /// Batch inference: the output file (JSON lines).
    #[arg(long)]
    pub output: Option<String>,
    /// The command and its arguments, after `--`.
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// A job file, as written. See the module documentation.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    pub name: Option<String>,
    pub queue: Option<String>,
    pub priority: Option<String>,
    pub max_retries: Option<u32>,
    pub deadline: Option<toml::Value>,
    pub ttl: Option<toml::Value>,
    pub idempotency_key: Option<String>,
    pub pausable: Option<bool>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub resources: Option<ResourcesFile>,
    pub command: Option<CommandFile>,
    pub inference: Option<InferenceFile>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ResourcesFile {
    pub cpu: Option<toml::Value>,
    pub memory: Option<toml::Value>,
    pub gpu: Option<u32>,
    pub gpu_memory: Option<toml::Value>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CommandFile {
    pub image: Option<String>,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<String>,
    pub writable_root: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InferenceFile {
    pub model: Option<String>,
    pub input: Option<String>,
    pub output: Option<String>,
}

impl JobFile {
    /// Parses a job file's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> anyhow::Result<JobFile> {
        let file: JobFile =
            toml::from_str(text).with_context(|| format!("job file {origin} is not valid"))?;
        if file.command.is_some() && file.inference.is_some() {
            bail!(
                "job file {origin} has both [command] and [inference]: a job is one or the other"
            );
        }
        Ok(file)
    }

    /// Reads and parses `path` (`-`: standard input).
    pub fn read(path: &std::path::Path) -> anyhow::Result<JobFile> {
        let (text, origin) = if path.as_os_str() == "-" {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .context("cannot read the job file from standard input")?;
            (text, "<stdin>".to_string())
        } else {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read job file {}", path.display()))?;
            (text, path.display().to_string())
        };
        JobFile::parse(&text, &origin)
    }
}

/// CPU in millicores from cores (`1.5`) or millicores (`500m`); `what` names it in errors.
pub fn parse_cpu(s: &str, what: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let parsed = match s.strip_suffix('m') {
        Some(m) => m.parse::<u64>().ok(),
        None => s
            .parse::<f64>()
            .ok()
            .filter(|c| c.is_finite() && *c >= 0.0 && *c < 1e12)
            .map(|c| (c * 1000.0).round() as u64),
    };
    parsed.ok_or_else(|| anyhow!("{what} '{s}': expected cores (1.5) or millicores (500m)"))
}

/// Bytes, plain or with a Ki/Mi/Gi/K/M/G suffix; `what` names it in errors.
pub fn parse_bytes(s: &str, what: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let units: [(&str, u64); 6] = [
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
        ("G", 1_000_000_000),
        ("M", 1_000_000),
        ("K", 1_000),
    ];
    let (digits, mult) = units
        .iter()
        .find_map(|(u, m)| s.strip_suffix(u).map(|d| (d, *m)))
        .unwrap_or((s, 1));
    digits
        .parse::<u64>()
        .ok()
        .and_then(|d| d.checked_mul(mult))
        .ok_or_else(|| anyhow!("{what} '{s}': expected bytes or a number with Ki/Mi/Gi/K/M/G"))
}

/// Seconds, plain or with an s/m/h/d suffix; `what` names it in errors.
pub fn parse_seconds(s: &str, what: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (digits, mult) = [("s", 1u64), ("m", 60), ("h", 3600), ("d", 86_400)]
        .iter()
        .find_map(|(u, m)| s.strip_suffix(u).map(|d| (d, *m)))
        .unwrap_or((s, 1));
    digits
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|d| d.checked_mul(mult))
        .ok_or_else(|| anyhow!("{what} '{s}': expected seconds, or a number with s, m, h or d"))
}

/// A file value that may be a number or a string (`cpu = 2`, `cpu = "500m"`), as text.
fn value_text(v: &toml::Value, what: &str) -> anyhow::Result<String> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) if *i >= 0 => Ok(i.to_string()),
        toml::Value::Float(f) if *f >= 0.0 => Ok(f.to_string()),
        other => bail!("{what} = {other}: expected a non-negative number or a string"),
    }
}

fn key_values(items: &[String], flag: &str) -> anyhow::Result<Vec<(String, String)>> {
    items
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow!("{flag} '{kv}': expected KEY=VALUE"))
        })
        .collect()
}

/// The spec to submit: the file's values (if any), then the flags over them, then the
/// defaults for what neither gave.
pub fn build_spec(args: &SubmitArgs, file: Option<JobFile>) -> anyhow::Result<v1::JobSpec> {
    let file = file.unwrap_or_default();
    let res = file.resources.clone().unwrap_or_default();
    let cpu_millis = match (&args.cpu, &res.cpu) {
        (Some(flag), _) => parse_cpu(flag, "--cpu")?,
        (None, Some(v)) => parse_cpu(&value_text(v, "resources.cpu")?, "resources.cpu")?,
        (None, None) => 0,
    };
    let memory_bytes = match (&args.memory, &res.memory) {
        (Some(flag), _) => parse_bytes(flag, "--memory")?,
        (None, Some(v)) => parse_bytes(&value_text(v, "resources.memory")?, "resources.memory")?,
        (None, None) => 0,
    };
    let gpu_memory_bytes = match (&args.gpu_memory, &res.gpu_memory) {
        (Some(flag), _) => parse_bytes(flag, "--gpu-memory")?,
        (None, Some(v)) => parse_bytes(
            &value_text(v, "resources.gpu_memory")?,
            "resources.gpu_memory",
        )?,
        (None, None) => 0,
    };
    let seconds =
        |flag: &Option<String>, value: &Option<toml::Value>, name: &str| match (flag, value) {
            (Some(f), _) => parse_seconds(f, &format!("--{name}")),
            (None, Some(v)) => parse_seconds(&value_text(v, name)?, name),
            (None, None) => Ok(0),
        };
    let deadline_seconds = seconds(&args.deadline, &file.deadline, "deadline")?;
    let ttl_seconds_after_finished = seconds(&args.ttl, &file.ttl, "ttl")?;
    let mut labels = file.labels.clone();
    labels.extend(key_values(&args.labels, "--label")?);

    let kind = kind(args, &file)?;
    Ok(v1::JobSpec {
        name: args
            .name
            .clone()
            .or(file.name)
            .unwrap_or_else(|| "job".into()),
        queue: args
            .queue
            .clone()
            .or(file.queue)
            .unwrap_or_else(|| "default".into()),
        priority_class: args.priority.clone().or(file.priority).unwrap_or_default(),
        resources: Some(v1::Resources {
            cpu_millis,
            memory_bytes,
            gpus: args.gpu.or(res.gpu).unwrap_or(0),
            gpu_memory_bytes,
        }),
        max_retries: args.max_retries.or(file.max_retries).unwrap_or(0),
        deadline_seconds,
        ttl_seconds_after_finished,
        labels: labels.into_iter().collect(),
        idempotency_key: args
            .idempotency_key
            .clone()
            .or(file.idempotency_key)
            .unwrap_or_default(),
        pausable: args.pausable.or(file.pausable),
        kind: Some(kind),
    })
}

/// A command job or an inference job, from the file's section and the flags of that kind.
fn kind(args: &SubmitArgs, file: &JobFile) -> anyhow::Result<v1::job_spec::Kind> {
    let command_flags = !args.command.is_empty()
        || args.image.is_some()
        || !args.env.is_empty()
        || args.working_dir.is_some()
        || args.writable_root;
    let inference_flags = args.model.is_some() || args.input.is_some() || args.output.is_some();
    if command_flags && inference_flags {
        bail!(
            "a job is a command (-- CMD, --image, --env, --working-dir, --writable-root) or an inference \
             (--model, --input, --output), not both"
        );
    }
    let is_command = match (&file.command, &file.inference) {
        (Some(_), _) if inference_flags => bail!(
            "the job file describes a command job; --model, --input and --output are for \
             inference jobs"
        ),
        (_, Some(_)) if command_flags => bail!(
            "the job file describes an inference job; -- CMD, --image, --env and --working-dir \
             are for command jobs"
        ),
        (Some(_), _) => true,
        (_, Some(_)) => false,
        (None, None) if command_flags => true,
        (None, None) if inference_flags => false,
        (None, None) => bail!(
            "nothing to run: give a command after `--`, --model/--input/--output, or a job file \
             with -f"
        ),
    };
    if is_command {
        let c = file.command.clone().unwrap_or_default();
        let command = if args.command.is_empty() {
            c.command
        } else {
            args.command.clone()
        };
        if command.is_empty() {
            bail!(
                "a command job needs a command: give it after `--` or as `command = [...]` in \
                 [command]"
            );
        }
        let mut env = c.env;
        env.extend(key_values(&args.env, "--env")?);
        Ok(v1::job_spec::Kind::Command(v1::CommandJob {
            image: args.image.clone().or(c.image).unwrap_or_default(),
            command,
            env: env.into_iter().collect(),
            working_dir: args
                .working_dir
                .clone()
                .or(c.working_dir)
                .unwrap_or_default(),
            writable_root: args.writable_root || c.writable_root.unwrap_or(false),
        }))
    } else {
        let i = file.inference.clone().unwrap_or_default();
        let model = args.model.clone().or(i.model).unwrap_or_default();
        let input = args.input.clone().or(i.input).unwrap_or_default();
        let output = args.output.clone().or(i.output).unwrap_or_default();
        let missing: Vec<&str> = [("model", &model), ("input", &input), ("output", &output)]
            .into_iter()
            .filter(|(_, v)| v.is_empty())
            .map(|(k, _)| k)
            .collect();
        if !missing.is_empty() {
            bail!(
                "an inference job needs a model, an input and an output; missing: {}",
                missing.join(", ")
            );
        }
        Ok(v1::job_spec::Kind::Inference(v1::InferenceJob {
            model,
            input_path: input,
            output_path: output,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
name = "nightly-embed"
queue = "research"
priority = "high"
max_retries = 3
deadline = "2h"
ttl = 600
idempotency_key = "nightly-1"

[resources]
cpu = "1.5"
memory = "2Gi"
gpu = 1
gpu_memory = "8Gi"

[labels]
team = "search"
tier = "batch"

[command]
image = "python:3.12"
command = ["python", "train.py"]
working_dir = "/srv/train"
env = { EPOCHS = "3", SEED = "1" }
writable_root = true
"#;

    fn parse(text: &str) -> anyhow::Result<JobFile> {
        JobFile::parse(text, "job.toml")
    }

    fn command_of(spec: &v1::JobSpec) -> &v1::CommandJob {
        match &spec.kind {
            Some(v1::job_spec::Kind::Command(c)) => c,
            other => panic!("not a command job: {other:?}"),
        }
    }

    #[test]
    fn a_full_file_gives_every_field() {
        let spec = build_spec(&SubmitArgs::default(), Some(parse(FULL).unwrap())).unwrap();
        assert_eq!(spec.name, "nightly-embed");
        assert_eq!(spec.queue, "research");
        assert_eq!(spec.priority_class, "high");
        assert_eq!(spec.max_retries, 3);
        assert_eq!(spec.deadline_seconds, 7200);
        assert_eq!(spec.ttl_seconds_after_finished, 600);
        assert_eq!(spec.idempotency_key, "nightly-1");
        assert_eq!(
            spec.resources,
            Some(v1::Resources {
                cpu_millis: 1500,
                memory_bytes: 2 << 30,
                gpus: 1,
                gpu_memory_bytes: 8 << 30,
            })
        );
        assert_eq!(spec.labels.len(), 2);
        assert_eq!(spec.labels["team"], "search");
        let c = command_of(&spec);
        assert_eq!(c.image, "python:3.12");
        assert_eq!(c.command, ["python", "train.py"]);
        assert_eq!(c.working_dir, "/srv/train");
        assert_eq!(c.env["EPOCHS"], "3");
        assert!(c.writable_root);
        // Unless the file or the flag asks, the root stays read-only.
        let plain = SubmitArgs {
            command: vec!["true".into()],
            ..SubmitArgs::default()
        };
        assert!(!command_of(&build_spec(&plain, None).unwrap()).writable_root);
        let asked = SubmitArgs {
            writable_root: true,
            ..plain
        };
        assert!(command_of(&build_spec(&asked, None).unwrap()).writable_root);
    }

    #[test]
    fn flags_override_the_file_and_maps_merge_key_by_key() {
        let args = SubmitArgs {
            name: Some("override".into()),
            cpu: Some("250m".into()),
            gpu_memory: Some("512Mi".into()),
            ttl: Some("1d".into()),
            max_retries: Some(0),
            env: vec!["EPOCHS=5".into(), "NEW=x".into()],
            labels: vec!["tier=online".into()],
            command: vec!["sh".into(), "-c".into(), "true".into()],
            ..Default::default()
        };
        let spec = build_spec(&args, Some(parse(FULL).unwrap())).unwrap();
        assert_eq!(spec.name, "override");
        assert_eq!(spec.queue, "research", "not given as a flag: the file's");
        assert_eq!(spec.max_retries, 0, "an explicit 0 overrides the file's 3");
        assert_eq!(spec.ttl_seconds_after_finished, 86_400);
        let r = spec.resources.unwrap();
        assert_eq!((r.cpu_millis, r.memory_bytes), (250, 2 << 30));
        assert_eq!((r.gpus, r.gpu_memory_bytes), (1, 512 << 20));
        assert_eq!(spec.labels["tier"], "online");
        assert_eq!(spec.labels["team"], "search");
        let c = command_of(&spec);
        assert_eq!(c.command, ["sh", "-c", "true"]);
        assert_eq!(c.image, "python:3.12");
        assert_eq!(c.env["EPOCHS"], "5");
        assert_eq!(c.env["SEED"], "1");
        assert_eq!(c.env["NEW"], "x");
    }

    #[test]
    fn flags_alone_give_the_defaults_for_the_rest() {
        let args = SubmitArgs {
            command: vec!["true".into()],
            ..Default::default()
        };
        let spec = build_spec(&args, None).unwrap();
        assert_eq!(
            (spec.name.as_str(), spec.queue.as_str()),
            ("job", "default")
        );
        assert_eq!(spec.priority_class, "");
        assert_eq!(
            (spec.deadline_seconds, spec.ttl_seconds_after_finished),
            (0, 0)
        );
        assert_eq!(spec.resources, Some(v1::Resources::default()));
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        for (text, key) in [
            ("nmae = \"x\"", "nmae"),
            ("[resources]\ncpus = 2", "cpus"),
            ("[command]\ncmd = [\"true\"]", "cmd"),
            (
                "[inference]\nmodel = \"m\"\ninput_path = \"a\"",
                "input_path",
            ),
            ("[kubernetes]\nx = 1", "kubernetes"),
        ] {
            let err = format!("{:#}", parse(text).unwrap_err());
            assert!(err.contains(&format!("`{key}`")), "{key}: {err}");
            assert!(err.contains("job.toml"), "{err}");
        }
    }

    #[test]
    fn bad_values_and_contradictions_are_explained() {
        let err = |text: &str, args: SubmitArgs| {
            let file = parse(text);
            let err = file.and_then(|f| build_spec(&args, Some(f))).unwrap_err();
            format!("{err:#}")
        };
        let cmd = |argv: &[&str]| SubmitArgs {
            command: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let e = err("[resources]\ncpu = \"lots\"", cmd(&["true"]));
        assert!(e.contains("resources.cpu 'lots'"), "{e}");
        let e = err("[resources]\nmemory = -1", cmd(&["true"]));
        assert!(e.contains("resources.memory = -1"), "{e}");
        let e = err("ttl = \"3 weeks\"", cmd(&["true"]));
        assert!(e.contains("ttl '3 weeks'"), "{e}");
        let e = err("max_retries = \"three\"", cmd(&["true"]));
        assert!(e.contains("max_retries"), "{e}");
        let e = err(
            "[command]\ncommand = [\"true\"]\n[inference]\nmodel = \"m\"",
            SubmitArgs::default(),
        );
        assert!(e.contains("both [command] and [inference]"), "{e}");
        let e = err(
            "[inference]\nmodel = \"m\"\ninput = \"i\"\noutput = \"o\"",
            cmd(&["true"]),
        );
        assert!(e.contains("describes an inference job"), "{e}");
        let e = err("[command]\nimage = \"busybox\"", SubmitArgs::default());
        assert!(e.contains("needs a command"), "{e}");
        let e = err("name = \"x\"", SubmitArgs::default());
        assert!(e.contains("nothing to run"), "{e}");
        let e = err(
            "[inference]\nmodel = \"m\"",
            SubmitArgs {
                input: Some("in.jsonl".into()),
                ..Default::default()
            },
        );
        assert!(e.ends_with("missing: output"), "{e}");
        let e = err(
            "",
            SubmitArgs {
                env: vec!["NOEQUALS".into()],
                command: vec!["true".into()],
                ..Default::default()
            },
        );
        assert!(e.contains("--env 'NOEQUALS'"), "{e}");
    }

    #[test]
    fn the_readme_example_parses() {
        let text = r#"
name = "nightly-embed"
queue = "default"
priority = "high"
max_retries = 3
deadline = "2h"
ttl = "7d"
idempotency_key = "nightly-2026-11-27"
labels = { team = "search" }
resources = { cpu = "1.5", memory = "2Gi", gpu = 0 }

[command]
image = "python:3.12"
command = ["python", "train.py"]
env = { EPOCHS = "3" }
working_dir = "/srv/train"
"#;
        let spec = build_spec(&SubmitArgs::default(), Some(parse(text).unwrap())).unwrap();
        assert_eq!(spec.ttl_seconds_after_finished, 604_800);
        assert_eq!(spec.resources.unwrap().cpu_millis, 1500);
        assert_eq!(command_of(&spec).env["EPOCHS"], "3");
    }

    #[test]
    fn an_inference_job_from_file_and_flags() {
        let file = parse("[inference]\nmodel = \"minilm\"\ninput = \"in.jsonl\"").unwrap();
        let args = SubmitArgs {
            output: Some("out.jsonl".into()),
            ..Default::default()
        };
        let spec = build_spec(&args, Some(file)).unwrap();
        assert_eq!(
            spec.kind,
            Some(v1::job_spec::Kind::Inference(v1::InferenceJob {
                model: "minilm".into(),
                input_path: "in.jsonl".into(),
                output_path: "out.jsonl".into(),
            }))
        );
    }

    #[test]
    fn quantities_parse_in_their_units() {
        assert_eq!(parse_cpu("500m", "cpu").unwrap(), 500);
        assert_eq!(parse_cpu("2", "cpu").unwrap(), 2000);
        assert_eq!(parse_cpu("0.25", "cpu").unwrap(), 250);
        assert!(parse_cpu("-1", "cpu").is_err());
        assert!(parse_cpu("NaN", "cpu").is_err());
        assert_eq!(parse_bytes("512Mi", "memory").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1G", "memory").unwrap(), 1_000_000_000);
        assert!(parse_bytes("99999999999Gi", "memory").is_err());
        assert_eq!(parse_seconds("90", "ttl").unwrap(), 90);
        assert_eq!(parse_seconds("10m", "ttl").unwrap(), 600);
        assert_eq!(parse_seconds("2h", "ttl").unwrap(), 7200);
        assert_eq!(parse_seconds("7d", "ttl").unwrap(), 604_800);
        assert!(parse_seconds("1w", "ttl").is_err());
        let file = parse("[resources]\ncpu = 2\nmemory = 1024").unwrap();
        let spec = build_spec(
            &SubmitArgs {
                command: vec!["true".into()],
                ..Default::default()
            },
            Some(file),
        )
        .unwrap();
        let r = spec.resources.unwrap();
        assert_eq!((r.cpu_millis, r.memory_bytes), (2000, 1024));
    }
}
