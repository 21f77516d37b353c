//! What each call needs: the verbs, the patterns of an auth file's `allow` entries, and
//! [`RULES`], the one table that maps every RPC and HTTP route to the verb it needs and the kind
//! of resource it acts on. The authentication layer looks a call up here; the handlers only say
//! which model, queue or job a call names (`Caller::model`, `Caller::job`...), never which verb
//! it needs. A method missing from the table is refused (a unit test holds the table against the
//! compiled descriptors, so a new RPC cannot be served without a rule).

use std::fmt;

/// What a caller may do. Each RPC needs one (see [`RULES`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verb {
    /// Run a model (ModelInfer, Infer, the streams, and inference jobs' model).
    Infer,
    /// Metadata, configs, statistics, lists, the status tree, GPUs, events, metrics.
    Read,
    /// Load and unload models.
    ModelsAdmin,
    /// Submit jobs to a queue.
    JobsSubmit,
    /// See the caller's own tenant's jobs (get, list, watch, logs).
    JobsRead,
    /// Cancel the caller's own tenant's jobs.
    JobsCancel,
    /// See and cancel every tenant's jobs.
    JobsAdmin,
    /// Fault injection (KillChild), draining nodes (DrainNode), shared-memory registration, log settings changes, events of
    /// every topic (audit included), the audit log.
    SystemAdmin,
}

impl Verb {
    pub const ALL: [Verb; 8] = [
        Verb::Infer,
        Verb::Read,
        Verb::ModelsAdmin,
        Verb::JobsSubmit,
        Verb::JobsRead,
        Verb::JobsCancel,
        Verb::JobsAdmin,
        Verb::SystemAdmin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Infer => "infer",
            Verb::Read => "read",
            Verb::ModelsAdmin => "models.admin",
            Verb::JobsSubmit => "jobs.submit",
            Verb::JobsRead => "jobs.read",
            Verb::JobsCancel => "jobs.cancel",
            Verb::JobsAdmin => "jobs.admin",
            Verb::SystemAdmin => "system.admin",
        }
    }

    /// This verb's bit in a [`VerbSet`].
    pub fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of verbs, one bit each.
pub type VerbSet = u8;

/// A name pattern of an `allow` entry: `*` (everything), `prefix*`, or an exact name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    Any,
    Prefix(String),
    Exact(String),
}

impl Pattern {
    /// Reads a pattern; `*` is allowed only alone or at the end.
    pub fn parse(text: &str) -> Result<Pattern, String> {
        if text.is_empty() {
            return Err("an empty pattern matches nothing".into());
        }
        if text == "*" {
            return Ok(Pattern::Any);
        }
        match text.find('*') {
            None => Ok(Pattern::Exact(text.to_string())),
            Some(i) if i == text.len() - 1 => Ok(Pattern::Prefix(text[..i].to_string())),
            Some(_) => Err(format!(
                "'{text}': `*` may only stand alone or end a pattern (a prefix match)"
            )),
        }
    }

    pub fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Prefix(p) => name.starts_with(p.as_str()),
            Pattern::Exact(e) => e == name,
        }
    }
}

/// The verbs a verb pattern of the file names: `*`, `jobs.*`, or one verb. An error names the
/// pattern and the verbs there are.
pub fn verbs_of(text: &str) -> Result<VerbSet, String> {
    let pattern = Pattern::parse(text)?;
    let set = Verb::ALL
        .iter()
        .filter(|v| pattern.matches(v.as_str()))
        .fold(0, |set, v| set | v.bit());
    if set == 0 {
        let known: Vec<&str> = Verb::ALL.iter().map(|v| v.as_str()).collect();
        return Err(format!(
            "unknown verb '{text}' (the verbs are {})",
            known.join(", ")
        ));
    }
    Ok(set)
}

/// One `allow` entry of a role, compiled: its verbs, and the models and queues it is confined
/// to (`None`: every one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allow {
    pub verbs: VerbSet,
    pub models: Option<Vec<Pattern>>,
    pub queues: Option<Vec<Pattern>>,
}

/// What a call acts on, for a decision and for the audit log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resource<'a> {
    /// A model by name.
    Model(&'a str),
    /// A job queue by name.
    Queue(&'a str),
    /// The server as a whole (its metadata, status, devices, settings, fault injection).
    Server,
}

impl fmt::Display for Resource<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resource::Model(m) => write!(f, "model '{m}'"),
            Resource::Queue(q) => write!(f, "queue '{q}'"),
            Resource::Server => f.write_str("the server"),
        }
    }
}

/// Whether `allows` grant `verb` on `resource`. An entry grants its verbs on the models and
/// queues it names (all of them when it names none); a verb on the server as a whole is granted
/// only by an entry that is confined to neither models nor queues, so that
/// `{ verbs = ["*"], models = ["x"] }` gives everything on model x and nothing on the server.
pub fn grants(allows: &[Allow], verb: Verb, resource: &Resource<'_>) -> bool {
    let any = |list: &Option<Vec<Pattern>>, name: &str| {
        list.as_ref()
            .is_none_or(|ps| ps.iter().any(|p| p.matches(name)))
    };
    allows.iter().any(|a| {
        a.verbs & verb.bit() != 0
            && match resource {
                Resource::Model(m) => any(&a.models, m),
                Resource::Queue(q) => any(&a.queues, q),
                Resource::Server => a.models.is_none() && a.queues.is_none(),
            }
    })
}

/// Whether `allows` grant `verb` on anything at all (some model, queue, or the server).
pub fn grants_somewhere(allows: &[Allow], verb: Verb) -> bool {
    allows.iter().any(|a| a.verbs & verb.bit() != 0)
}

/// How a call is decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Health and the status page's files: open to everyone, no credentials read.
    Open,
    /// The verb on the server as a whole: decided by the layer before the handler runs.
    Server(Verb),
    /// The verb on the model the request names (the handler calls `Caller::model`, per message
    /// on a stream); a request naming no model lists models, filtered with `Caller::sees_model`.
    Model(Verb),
    /// SubmitJob: `jobs.submit` on the job's queue and, for an inference job, `infer` on its
    /// model (`Caller::submit`).
    Submit,
    /// The verb on one job (`Caller::job`): the job's queue, and the caller's tenant's job, or
    /// `jobs.admin` on its queue for another tenant's.
    Job(Verb),
    /// ListJobs: the caller's tenant's jobs in the queues it may `jobs.read`, and every
    /// tenant's in the queues it may `jobs.admin` (`Caller::jobs_visible`).
    JobList,
    /// WatchEvents: `read` on the server; `audit.*` topics need `system.admin` and other
    /// tenants' job events `jobs.admin` (`Caller::sees_event`).
    Events,
    /// LogSettings: `read` to read them, `system.admin` to change them (`Caller::settings`).
    LogSettings,
}

impl Rule {
    /// The verb named in audit records and refusals when the layer decides.
    pub fn verb(self) -> Option<Verb> {
        match self {
            Rule::Open => None,
            Rule::Server(v) | Rule::Model(v) | Rule::Job(v) => Some(v),
            Rule::Submit => Some(Verb::JobsSubmit),
            Rule::JobList => Some(Verb::JobsRead),
            Rule::Events | Rule::LogSettings => Some(Verb::Read),
        }
    }
}

use Verb::*;

/// Every RPC of both gRPC APIs and every HTTP route, with its rule. `/metrics` is
/// `Server(Read)` unless `server.metrics_public` (see `Gate::rule`).
pub const RULES: &[(&str, Rule)] = &[
    // KServe v2 / Triton
    ("/inference.GRPCInferenceService/ServerLive", Rule::Open),
    ("/inference.GRPCInferenceService/ServerReady", Rule::Open),
    (
        "/inference.GRPCInferenceService/ModelReady",
        Rule::Model(Read),
    ),
    (
        "/inference.GRPCInferenceService/ServerMetadata",
        Rule::Server(Read),
    ),
    (
        "/inference.GRPCInferenceService/ModelMetadata",
        Rule::Model(Read),
    ),
    (
        "/inference.GRPCInferenceService/ModelInfer",
        Rule::Model(Infer),
    ),
    (
        "/inference.GRPCInferenceService/ModelStreamInfer",
        Rule::Model(Infer),
    ),
    (
        "/inference.GRPCInferenceService/ModelConfig",
        Rule::Model(Read),
    ),
    (
        "/inference.GRPCInferenceService/ModelStatistics",
        Rule::Model(Read),
    ),
    (
        "/inference.GRPCInferenceService/RepositoryIndex",
        Rule::Model(Read),
    ),
    (
        "/inference.GRPCInferenceService/RepositoryModelLoad",
        Rule::Model(ModelsAdmin),
    ),
    (
        "/inference.GRPCInferenceService/RepositoryModelUnload",
        Rule::Model(ModelsAdmin),
    ),
    (
        "/inference.GRPCInferenceService/SystemSharedMemoryStatus",
        Rule::Server(SystemAdmin),
    ),
    (
        "/inference.GRPCInferenceService/SystemSharedMemoryRegister",
        Rule::Server(SystemAdmin),
    ),
    (
        "/inference.GRPCInferenceService/SystemSharedMemoryUnregister",
        Rule::Server(SystemAdmin),
    ),
    (
        "/inference.GRPCInferenceService/CudaSharedMemoryStatus",
        Rule::Server(SystemAdmin),
    ),
    (
        "/inference.GRPCInferenceService/CudaSharedMemoryRegister",
        Rule::Server(SystemAdmin),
    ),
    (
        "/inference.GRPCInferenceService/CudaSharedMemoryUnregister",
        Rule::Server(SystemAdmin),
    ),
    (
        "/inference.GRPCInferenceService/TraceSetting",
        Rule::Server(SystemAdmin),
    ),
    (
        "/inference.GRPCInferenceService/LogSettings",
        Rule::LogSettings,
    ),
    // veraltheim.v1
    ("/veraltheim.v1.InferenceService/Infer", Rule::Model(Infer)),
    (
        "/veraltheim.v1.InferenceService/InferStream",
        Rule::Model(Infer),
    ),
    ("/veraltheim.v1.ModelService/ListModels", Rule::Model(Read)),
    ("/veraltheim.v1.ModelService/GetModel", Rule::Model(Read)),
    (
        "/veraltheim.v1.ModelService/LoadModel",
        Rule::Model(ModelsAdmin),
    ),
    (
        "/veraltheim.v1.ModelService/UnloadModel",
        Rule::Model(ModelsAdmin),
    ),
    (
        "/veraltheim.v1.ModelService/GetModelStatistics",
        Rule::Model(Read),
    ),
    (
        "/veraltheim.v1.ModelService/GetModelMemory",
        Rule::Server(Read),
    ),
    ("/veraltheim.v1.SystemService/Health", Rule::Open),
    ("/veraltheim.v1.SystemService/GetStatus", Rule::Server(Read)),
    ("/veraltheim.v1.SystemService/WatchEvents", Rule::Events),
    (
        "/veraltheim.v1.SystemService/KillChild",
        Rule::Server(SystemAdmin),
    ),
    (
        "/veraltheim.v1.SystemService/ListAuditEvents",
        Rule::Server(SystemAdmin),
    ),
    ("/veraltheim.v1.JobService/SubmitJob", Rule::Submit),
    ("/veraltheim.v1.JobService/GetJob", Rule::Job(JobsRead)),
    ("/veraltheim.v1.JobService/ListJobs", Rule::JobList),
    ("/veraltheim.v1.JobService/CancelJob", Rule::Job(JobsCancel)),
    ("/veraltheim.v1.JobService/WatchJob", Rule::Job(JobsRead)),
    ("/veraltheim.v1.JobService/JobLogs", Rule::Job(JobsRead)),
    (
        "/veraltheim.v1.ResourceService/GetResources",
        Rule::Server(Read),
    ),
    (
        "/veraltheim.v1.ResourceService/WatchResources",
        Rule::Server(Read),
    ),
    // The node registry (`cluster.rs`): listing is a read; draining changes what a node runs.
    (
        "/veraltheim.v1.ClusterService/ListNodes",
        Rule::Server(Read),
    ),
    (
        "/veraltheim.v1.ClusterService/DrainNode",
        Rule::Server(SystemAdmin),
    ),
    // HTTP (routes as the router spells them)
    ("/v2/health/live", Rule::Open),
    ("/v2/health/ready", Rule::Open),
    ("/live", Rule::Open),
    ("/ready", Rule::Open),
    ("/metrics", Rule::Server(Read)),
    // KServe v2 over HTTP (`rest/kserve.rs`)
    ("/v2", Rule::Server(Read)),
    ("/v2/models/stats", Rule::Model(Read)),
    ("/v2/models/{name}", Rule::Model(Read)),
    ("/v2/models/{name}/versions/{version}", Rule::Model(Read)),
    ("/v2/models/{name}/ready", Rule::Model(Read)),
    (
        "/v2/models/{name}/versions/{version}/ready",
        Rule::Model(Read),
    ),
    ("/v2/models/{name}/config", Rule::Model(Read)),
    (
        "/v2/models/{name}/versions/{version}/config",
        Rule::Model(Read),
    ),
    ("/v2/models/{name}/stats", Rule::Model(Read)),
    (
        "/v2/models/{name}/versions/{version}/stats",
        Rule::Model(Read),
    ),
    ("/v2/models/{name}/infer", Rule::Model(Infer)),
    (
        "/v2/models/{name}/versions/{version}/infer",
        Rule::Model(Infer),
    ),
    ("/v2/repository/index", Rule::Model(Read)),
    (
        "/v2/repository/models/{name}/load",
        Rule::Model(ModelsAdmin),
    ),
    (
        "/v2/repository/models/{name}/unload",
        Rule::Model(ModelsAdmin),
    ),
    // System shared memory over HTTP (`rest/kserve.rs`), as over gRPC
    ("/v2/systemsharedmemory/status", Rule::Server(SystemAdmin)),
    (
        "/v2/systemsharedmemory/region/{name}/status",
        Rule::Server(SystemAdmin),
    ),
    (
        "/v2/systemsharedmemory/region/{name}/register",
        Rule::Server(SystemAdmin),
    ),
    (
        "/v2/systemsharedmemory/unregister",
        Rule::Server(SystemAdmin),
    ),
    (
        "/v2/systemsharedmemory/region/{name}/unregister",
        Rule::Server(SystemAdmin),
    ),
    // CUDA shared memory over HTTP (`rest/kserve.rs`), as over gRPC
    ("/v2/cudasharedmemory/status", Rule::Server(SystemAdmin)),
    (
        "/v2/cudasharedmemory/region/{name}/status",
        Rule::Server(SystemAdmin),
    ),
    (
        "/v2/cudasharedmemory/region/{name}/register",
        Rule::Server(SystemAdmin),
    ),
    ("/v2/cudasharedmemory/unregister", Rule::Server(SystemAdmin)),
    (
        "/v2/cudasharedmemory/region/{name}/unregister",
        Rule::Server(SystemAdmin),
    ),
    // OpenAI-compatible embeddings (`rest/openai.rs`)
    ("/v1/embeddings", Rule::Model(Infer)),
    ("/v1/models", Rule::Model(Read)),
    ("/v1/models/{model}", Rule::Model(Read)),
    // The status page (`page/`): its files hold no data and are open (a browser cannot send
    // a token with a navigation; docs/SECURITY.md), its data needs what the gRPC calls it
    // mirrors need: GetStatus/GetResources, ListJobs and JobLogs.
    ("/", Rule::Open),
    ("/page/app.js", Rule::Open),
    ("/page/style.css", Rule::Open),
    ("/api/status", Rule::Server(Read)),
    ("/api/jobs", Rule::JobList),
    ("/api/jobs/{id}/logs", Rule::Job(JobsRead)),
];

/// The rule of `path`, with the path as [`RULES`] holds it; `None` for a path no API serves.
/// Looked up in a map built once: this runs for every call.
pub fn rule_of(path: &str) -> Option<(&'static str, Rule)> {
    static MAP: std::sync::OnceLock<std::collections::HashMap<&'static str, Rule>> =
        std::sync::OnceLock::new();
    let map = MAP.get_or_init(|| RULES.iter().copied().collect());
    map.get_key_value(path).map(|(p, r)| (*p, *r))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(verbs: &[&str], models: Option<&[&str]>, queues: Option<&[&str]>) -> Allow {
        let list =
            |l: Option<&[&str]>| l.map(|l| l.iter().map(|p| Pattern::parse(p).unwrap()).collect());
        Allow {
            verbs: verbs.iter().fold(0, |s, v| s | verbs_of(v).unwrap()),
            models: list(models),
            queues: list(queues),
        }
    }

    #[test]
    fn every_rpc_of_both_apis_has_a_rule() {
        let pool =
            prost_reflect::DescriptorPool::decode(veraltheim_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut rpcs = 0;
        for service in pool.services() {
            for m in service.methods() {
                let path = format!("/{}/{}", service.full_name(), m.name());
                assert!(rule_of(&path).is_some(), "{path} has no rule in RULES");
                rpcs += 1;
            }
        }
        assert!(rpcs > 40, "only {rpcs} RPCs found");
        // And no rule names a method that does not exist (a typo would leave the real one
        // without a rule).
        for (path, _) in RULES {
            if path.starts_with("/inference.") || path.starts_with("/veraltheim.") {
                let (service, method) = path[1..].rsplit_once('/').unwrap();
                let s = pool.get_service_by_name(service).expect(path);
                assert!(s.methods().any(|m| m.name() == method), "{path}");
            }
        }
    }

    #[test]
    fn verb_patterns_expand_and_unknown_verbs_are_named() {
        assert_eq!(verbs_of("*").unwrap().count_ones(), 8);
        let jobs = verbs_of("jobs.*").unwrap();
        assert_eq!(jobs.count_ones(), 4);
        assert!(jobs & JobsAdmin.bit() != 0 && jobs & Infer.bit() == 0);
        assert_eq!(verbs_of("infer").unwrap(), Infer.bit());
        let e = verbs_of("infre").unwrap_err();
        assert!(e.contains("'infre'") && e.contains("models.admin"), "{e}");
        assert!(verbs_of("nothing*").is_err());
        assert!(verbs_of("jo*bs").unwrap_err().contains("prefix"));
    }

    #[test]
    fn patterns_match_exactly_by_prefix_or_all() {
        assert!(Pattern::parse("minilm*").unwrap().matches("minilm_onnx"));
        assert!(!Pattern::parse("minilm*").unwrap().matches("mini"));
        assert!(Pattern::parse("identity").unwrap().matches("identity"));
        assert!(!Pattern::parse("identity").unwrap().matches("identity2"));
        assert!(Pattern::parse("*").unwrap().matches(""));
        assert!(Pattern::parse("").is_err());
        assert!(Pattern::parse("*x").is_err());
    }

    #[test]
    fn entries_grant_their_verbs_on_their_models_and_queues_only() {
        let user = [
            allow(&["infer", "read"], Some(&["identity", "minilm*"]), None),
            allow(
                &["jobs.submit", "jobs.read", "jobs.cancel"],
                None,
                Some(&["default"]),
            ),
        ];
        assert!(grants(&user, Infer, &Resource::Model("identity")));
        assert!(grants(&user, Read, &Resource::Model("minilm_onnx")));
        assert!(!grants(&user, Infer, &Resource::Model("cost")));
        assert!(!grants(&user, ModelsAdmin, &Resource::Model("identity")));
        assert!(grants(&user, JobsSubmit, &Resource::Queue("default")));
        assert!(!grants(&user, JobsSubmit, &Resource::Queue("gpu")));
        assert!(!grants(&user, JobsAdmin, &Resource::Queue("default")));
        // Confined entries grant nothing on the server as a whole.
        assert!(!grants(&user, Read, &Resource::Server));
        let confined_star = [allow(&["*"], Some(&["x"]), None)];
        assert!(grants(&confined_star, ModelsAdmin, &Resource::Model("x")));
        assert!(!grants(&confined_star, SystemAdmin, &Resource::Server));
        let admin = [allow(&["*"], None, None)];
        for v in Verb::ALL {
            assert!(grants(&admin, v, &Resource::Server));
            assert!(grants(&admin, v, &Resource::Model("any")));
            assert!(grants(&admin, v, &Resource::Queue("any")));
        }
        assert!(grants_somewhere(&user, Read));
        assert!(!grants_somewhere(&user, SystemAdmin));
    }
}
