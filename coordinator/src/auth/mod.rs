//! Authentication and authorisation of every call.
//!
//! One tower layer ([`grpc_layer`], [`http_layer`]) stands in front of both gRPC services and
//! the HTTP routes. Per request it looks the path up in [`rules::RULES`]; health paths pass
//! untouched. Otherwise it finds the caller — a bearer token (`authorization: Bearer <token>`,
//! its SHA-256 compared in constant time with every principal's) or, without a token, the names
//! of a verified mTLS client certificate ([`crate::peer::PeerCertNames`], which the TLS acceptor
//! inserts) — and refuses with UNAUTHENTICATED when there is none. A rule on the server as a
//! whole is decided here; for the others the layer hands the handler a [`Caller`], and the
//! handler names what the call acts on (`Caller::model`, `Caller::job`, ...): the verb always
//! comes from the table. A refusal is PERMISSION_DENIED naming the verb and the resource, never
//! the rules, and every refusal and every state-changing call is audited (`crate::audit`).
//!
//! Without an auth file (`server.auth_file`) every call is allowed, as before; the layer still
//! runs, so that state-changing calls are audited (as "anonymous") and handlers find a
//! [`Caller`]. The file is re-read when its content changes ([`Auth::worker`]): a revoked token
//! stops working within a second, and a file that no longer reads keeps the table in force and
//! logs why.

pub mod client;
pub mod file;
pub mod rules;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use parking_lot::Mutex;
use subtle::ConstantTimeEq;
use tonic::Status;
use veraltheim_bus::{Bus, Event, TraceParent};
use veraltheim_supervisor::{ChildContext, ChildSpec};

use crate::audit::{Audit, AuditRecord, now_ms};
use crate::peer::PeerCertNames;
pub use file::{Principal, Table};
use rules::{Resource, Rule, Verb, grants, grants_somewhere, rule_of};

/// How often the auth file is read again to see whether it changed.
const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// The principals in force, and where they come from.
pub struct Auth {
    /// `None`: authentication is off.
    file: Option<PathBuf>,
    table: ArcSwap<Table>,
    /// The file's content last read (in force, or refused), so a change is seen once.
    last: Mutex<Vec<u8>>,
}

/// The SHA-256 of a token, as the auth file holds it.
pub fn sha256(token: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// What one [`Auth::reload`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    Unchanged,
    /// The new file is in force, with this many principals.
    Reloaded(usize),
    /// The new content was refused (the error); the table in force stays.
    Refused(String),
}

impl Auth {
    /// Authentication off: every call allowed.
    pub fn off() -> Auth {
        Auth {
            file: None,
            table: ArcSwap::from_pointee(Table::default()),
            last: Mutex::new(Vec::new()),
        }
    }

    /// The principals of `path`; an error names the file and what is wrong in it.
    pub fn from_file(path: &Path) -> anyhow::Result<Auth> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read the auth file {}", path.display()))?;
        let table =
            parse(&bytes).map_err(|e| anyhow::anyhow!("auth file {}: {e}", path.display()))?;
        Ok(Auth {
            file: Some(path.to_path_buf()),
            table: ArcSwap::from_pointee(table),
            last: Mutex::new(bytes),
        })
    }

    /// Whether calls are authenticated.
    pub fn enabled(&self) -> bool {
        self.file.is_some()
    }

    /// Reads the file again; a new content that reads replaces the table in force.
    pub fn reload(&self) -> Reload {
        let Some(path) = &self.file else {
            return Reload::Unchanged;
        };
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => {
                let mut last = self.last.lock();
                // Said once, not every second: an empty "last" marks it.
                if last.is_empty() {
                    return Reload::Unchanged;
                }
                last.clear();
                return Reload::Refused(format!("cannot read {}: {e}", path.display()));
            }
        };
        {
            let mut last = self.last.lock();
            if *last == bytes {
                return Reload::Unchanged;
            }
            last.clone_from(&bytes);
        }
        match parse(&bytes) {
            Ok(table) => {
                let n = table.principals.len();
                self.table.store(Arc::new(table));
                Reload::Reloaded(n)
            }
            Err(e) => Reload::Refused(e),
        }
    }

    /// The `AuthFile` worker: reads the file every second and puts a changed one in force,
    /// logging it and publishing `auth.reloaded` (or `auth.reload_failed`, keeping the table
    /// in force).
    pub fn worker(self: Arc<Self>, bus: Bus) -> ChildSpec {
        ChildSpec::worker("AuthFile", move |ctx: ChildContext| {
            let (auth, bus) = (self.clone(), bus.clone());
            async move {
                loop {
                    tokio::select! {
                        _ = ctx.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(RELOAD_EVERY) => {}
                    }
                    let file = auth
                        .file
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default();
                    let a = auth.clone();
                    let outcome = tokio::task::spawn_blocking(move || a.reload()).await?;
                    let event = match outcome {
                        Reload::Unchanged => continue,
                        Reload::Reloaded(n) => {
                            tracing::info!(%file, principals = n, "auth file reloaded");
                            Event::new("auth.reloaded", format!("{file}: {n} principals"))
                                .with_attribute("file", &file)
                                .with_attribute("principals", n.to_string())
                        }
                        Reload::Refused(e) => {
                            tracing::error!(%file, error = %e, "auth file refused; the previous one stays in force");
                            Event::new("auth.reload_failed", format!("{file}: {e}"))
                                .with_attribute("file", &file)
                                .with_attribute("error", &e)
                        }
                    };
                    if let Err(e) = bus.publish(event).await {
                        tracing::warn!(error = %e, "auth event not published");
                    }
                }
            }
        })
    }

    fn by_token(&self, token: &str) -> Option<Arc<Principal>> {
        let hash = sha256(token.as_bytes());
        let table = self.table.load();
        // Every principal is compared, whichever matches: the time taken says nothing of
        // which one (or how much of a hash) matched.
        let mut found = None;
        for p in &table.principals {
            if let Some(h) = &p.token_sha256
                && bool::from(h.ct_eq(&hash))
            {
                found = Some(p.clone());
            }
        }
        found
    }

    fn by_cert(&self, names: &PeerCertNames) -> Option<Arc<Principal>> {
        let table = self.table.load();
        // The common name first, then the DNS names, in the certificate's order.
        names.0.iter().find_map(|name| {
            table
                .principals
                .iter()
                .find(|p| p.client_cert_cn.as_deref() == Some(name.as_str()))
                .cloned()
        })
    }

    /// The principal a request's credentials name, or why there is none.
    fn authenticate(
        &self,
        headers: &http::HeaderMap,
        certs: Option<&PeerCertNames>,
    ) -> Result<Arc<Principal>, &'static str> {
        if let Some(value) = headers.get(http::header::AUTHORIZATION) {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| {
                    let (scheme, token) = v.split_once(' ')?;
                    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
                })
                .filter(|t| !t.is_empty())
                .ok_or("the authorization metadata is not `Bearer <token>`")?;
            return self.by_token(token).ok_or("unknown or revoked token");
        }
        match certs {
            Some(names) if !names.0.is_empty() => self
                .by_cert(names)
                .ok_or("the client certificate names no principal"),
            _ => Err(
                "authentication required: send the metadata `authorization: Bearer <token>` \
                 (or connect with the client certificate of a known principal)",
            ),
        }
    }
}

fn parse(bytes: &[u8]) -> Result<Table, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "the file is not UTF-8".to_string())?;
    Table::parse(text)
}

/// Which protocol a layer guards: refusals are gRPC statuses or HTTP answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    Http,
}

/// The state of the authentication layer.
pub struct Gate {
    pub auth: Arc<Auth>,
    pub audit: Audit,
    /// `server.metrics_public`: `/metrics` without credentials.
    pub metrics_public: bool,
    pub protocol: Protocol,
}

impl Gate {
    /// The rule of `path` and the path as the table spells it (no copy for a known one).
    fn rule(&self, path: &str) -> (Option<Rule>, Cow<'static, str>) {
        match rule_of(path) {
            Some((p, Rule::Server(Verb::Read))) if p == "/metrics" && self.metrics_public => {
                (Some(Rule::Open), Cow::Borrowed(p))
            }
            Some((p, rule)) => (Some(rule), Cow::Borrowed(p)),
            None => (None, Cow::Owned(path.chars().take(256).collect())),
        }
    }

    /// Decides what the layer can decide; on success the request carries its [`Caller`].
    fn admit(&self, request: &mut Request) -> Result<(), Status> {
        // HTTP routes have parameters (`/v2/models/{name}/infer`): the rule is the route's, as
        // the router matched it (the layer runs after routing). gRPC methods are exact paths.
        let matched = request.extensions().get::<MatchedPath>();
        // An HTTP path that no route matches (answered 404 by the router's fallback).
        let unrouted = self.protocol == Protocol::Http && matched.is_none();
        let path = match (self.protocol, matched) {
            (Protocol::Http, Some(route)) => route.as_str(),
            _ => request.uri().path(),
        };
        let (rule, action) = self.rule(path);
        if rule == Some(Rule::Open) {
            return Ok(());
        }
        // Kept raw: formatted only when a record is written.
        let peer = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0);
        let trace_id = request
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| TraceParent::parse(v).ok())
            .map(|t| t.trace_id());
        let mut caller = CallerInner {
            principal: None,
            enforced: self.auth.enabled(),
            rule: rule.unwrap_or(Rule::Open),
            action,
            peer,
            trace_id,
            audit: self.audit.clone(),
        };
        if caller.enforced {
            let certs = request.extensions().get::<PeerCertNames>();
            match self.auth.authenticate(request.headers(), certs) {
                Ok(p) => caller.principal = Some(p),
                Err(why) => {
                    let verb = rule.and_then(Rule::verb);
                    caller.record(verb, "server".into(), "UNAUTHENTICATED", why);
                    return Err(Status::unauthenticated(why));
                }
            }
            let Some(rule) = rule else {
                // A route or method without a rule is not served to anyone (a route added
                // without one fails its tests rather than open a hole).
                if unrouted {
                    // An authenticated caller asked for a path no route has: the router's
                    // fallback answers 404 naming it (it serves nothing, so needs no rule).
                    return Ok(());
                }
                return Err(match self.protocol {
                    Protocol::Http => Status::permission_denied(format!(
                        "{}: this route has no access rule",
                        caller.action
                    )),
                    Protocol::Grpc => {
                        Status::unimplemented(format!("{}: no such method", caller.action))
                    }
                });
            };
            caller.precheck(rule)?;
        }
        request.extensions_mut().insert(Caller(Arc::new(caller)));
        Ok(())
    }
}

/// The layer in front of the gRPC services: refusals are gRPC statuses.
pub async fn grpc_layer(
    State(gate): State<Arc<Gate>>,
    mut request: Request,
    next: Next,
) -> Response {
    match gate.admit(&mut request) {
        Ok(()) => next.run(request).await,
        Err(status) => status.into_http(),
    }
}

/// The layer in front of the HTTP routes: 401 (with `WWW-Authenticate: Bearer`) or 403.
pub async fn http_layer(
    State(gate): State<Arc<Gate>>,
    mut request: Request,
    next: Next,
) -> Response {
    match gate.admit(&mut request) {
        Ok(()) => next.run(request).await,
        Err(status) => {
            let code = match status.code() {
                tonic::Code::Unauthenticated => http::StatusCode::UNAUTHORIZED,
                tonic::Code::PermissionDenied => http::StatusCode::FORBIDDEN,
                _ => http::StatusCode::NOT_FOUND,
            };
            // The same body as every other HTTP refusal: `{"error": "..."}`, as Triton sends.
            let mut r = crate::refusal::refusal(request.uri().path(), code, status.message());
            if code == http::StatusCode::UNAUTHORIZED {
                r.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Bearer"),
                );
            }
            r
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Who makes a call, as the layer found it, with the rule of the method called: what handlers
/// ask before they act. Present on every request past the layer (health excepted).
#[derive(Clone)]
pub struct Caller(Arc<CallerInner>);

struct CallerInner {
    /// `None` without authentication.
    principal: Option<Arc<Principal>>,
    /// Whether authentication is on (then `principal` is set).
    enforced: bool,
    rule: Rule,
    action: Cow<'static, str>,
    peer: Option<SocketAddr>,
    trace_id: Option<[u8; 16]>,
    audit: Audit,
}

/// What a principal may see of the jobs (ListJobs).
pub struct JobsView<'a> {
    caller: &'a Caller,
    /// The store's filter: only this tenant's jobs (`None`: every tenant's).
    pub tenant: Option<String>,
}

impl JobsView<'_> {
    /// Whether a job of `queue` and `tenant` is shown.
    pub fn shows(&self, queue: &str, tenant: Option<&str>) -> bool {
        self.caller.may_see_job(queue, tenant)
    }
}

impl CallerInner {
    fn name(&self) -> &str {
        self.principal
            .as_ref()
            .map_or("anonymous", |p| p.name.as_str())
    }

    fn record(&self, verb: Option<Verb>, resource: String, result: &str, message: &str) {
        self.audit.record(AuditRecord {
            time_ms: now_ms(),
            principal: self.name().to_string(),
            tenant: self
                .principal
                .as_ref()
                .map(|p| p.tenant.clone())
                .unwrap_or_default(),
            verb: verb.map_or("none", Verb::as_str).to_string(),
            resource,
            result: result.to_string(),
            action: self.action.to_string(),
            peer: self.peer.map(|p| p.to_string()).unwrap_or_default(),
            trace_id: self.trace_id.map(|t| hex(&t)).unwrap_or_default(),
            message: message.chars().take(1024).collect(),
            suppressed_before: 0,
        });
    }

    fn allows(&self) -> &[rules::Allow] {
        self.principal.as_ref().map_or(&[], |p| p.allows.as_slice())
    }

    /// PERMISSION_DENIED naming the verb and the resource; audited.
    fn deny(&self, verb: Verb, resource: &Resource<'_>, label: String, why: &str) -> Status {
        let message = format!(
            "permission denied: '{}' may not {verb} on {resource}{why}",
            self.name()
        );
        self.record(Some(verb), label, "PERMISSION_DENIED", &message);
        Status::permission_denied(message)
    }

    fn decide(&self, verb: Verb, resource: Resource<'_>) -> Result<(), Status> {
        if !self.enforced || grants(self.allows(), verb, &resource) {
            return Ok(());
        }
        let label = label(&resource);
        Err(self.deny(verb, &resource, label, ""))
    }

    /// What the layer decides before the handler runs: the rules on the server as a whole.
    /// The others name a model, a queue or a job that only the handler knows (and which the
    /// refusal and its audit record name).
    fn precheck(&self, rule: Rule) -> Result<(), Status> {
        match rule {
            Rule::Server(v) => self.decide(v, Resource::Server),
            Rule::Events | Rule::LogSettings => self.decide(Verb::Read, Resource::Server),
            Rule::Open | Rule::Model(_) | Rule::Submit | Rule::Job(_) | Rule::JobList => Ok(()),
        }
    }
}

fn label(resource: &Resource<'_>) -> String {
    match resource {
        Resource::Model(m) => format!("model:{m}"),
        Resource::Queue(q) => format!("queue:{q}"),
        Resource::Server => "server".into(),
    }
}

/// The refusal of a handler asking for a decision its method's rule does not make: a
/// programming error, refused rather than allowed.
fn mismatch(action: &str, asked: &str) -> Status {
    Status::internal(format!(
        "{action}: asked for a {asked} decision its access rule does not make"
    ))
}

impl Caller {
    /// The caller of `request`, as the layer left it. A request that did not pass the layer is
    /// refused (INTERNAL): handlers never run unguarded.
    pub fn of<T>(request: &tonic::Request<T>) -> Result<Caller, Status> {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| Status::internal("the call did not pass the authentication layer"))
    }

    /// The caller as stored with a request's `http` extensions (the rate limiter).
    pub fn from_extensions(ext: &http::Extensions) -> Option<&Caller> {
        ext.get::<Caller>()
    }

    /// The principal's name; "anonymous" without authentication.
    pub fn principal(&self) -> &str {
        self.0.name()
    }

    /// The principal's tenant; `None` without authentication.
    pub fn tenant(&self) -> Option<&str> {
        self.0.principal.as_ref().map(|p| p.tenant.as_str())
    }

    /// The verb of a `Model` rule on `name` (ModelInfer, LoadModel, ...).
    pub fn model(&self, name: &str) -> Result<(), Status> {
        match self.0.rule {
            Rule::Model(v) => self.0.decide(v, Resource::Model(name)),
            _ if !self.0.enforced => Ok(()),
            _ => Err(mismatch(&self.0.action, "model")),
        }
    }

    /// Whether a listing shows model `name` (the `Model` rule's verb on it).
    pub fn sees_model(&self, name: &str) -> bool {
        match self.0.rule {
            _ if !self.0.enforced => true,
            Rule::Model(v) => grants(self.0.allows(), v, &Resource::Model(name)),
            _ => false,
        }
    }

    /// SubmitJob: `jobs.submit` on `queue`, and `infer` on the model of an inference job.
    pub fn submit(&self, queue: &str, model: Option<&str>) -> Result<(), Status> {
        if !self.0.enforced {
            return Ok(());
        }
        if self.0.rule != Rule::Submit {
            return Err(mismatch(&self.0.action, "submit"));
        }
        self.0.decide(Verb::JobsSubmit, Resource::Queue(queue))?;
        match model {
            Some(m) => self.0.decide(Verb::Infer, Resource::Model(m)),
            None => Ok(()),
        }
    }

    fn may_see_job(&self, queue: &str, tenant: Option<&str>) -> bool {
        if !self.0.enforced {
            return true;
        }
        let allows = self.0.allows();
        let own = tenant.is_some() && tenant == self.tenant();
        (own && grants(allows, Verb::JobsRead, &Resource::Queue(queue)))
            || grants(allows, Verb::JobsAdmin, &Resource::Queue(queue))
    }

    /// The `Job` rule's verb on job `id` of `queue`, owned by `tenant`: the caller's tenant's
    /// job with the verb on its queue, or any tenant's with `jobs.admin` on its queue.
    pub fn job(&self, id: &str, queue: &str, tenant: Option<&str>) -> Result<(), Status> {
        if !self.0.enforced {
            return Ok(());
        }
        let Rule::Job(verb) = self.0.rule else {
            return Err(mismatch(&self.0.action, "job"));
        };
        let allows = self.0.allows();
        let own = tenant.is_some() && tenant == self.tenant();
        let resource = Resource::Queue(queue);
        if (own && grants(allows, verb, &resource)) || grants(allows, Verb::JobsAdmin, &resource) {
            return Ok(());
        }
        let label = format!("job:{id}");
        Err(if own {
            self.0
                .deny(verb, &resource, label, &format!(" (job '{id}')"))
        } else {
            self.0.deny(
                Verb::JobsAdmin,
                &resource,
                label,
                &format!(" (job '{id}' belongs to another tenant)"),
            )
        })
    }

    /// ListJobs: which jobs the caller sees.
    pub fn jobs_view(&self) -> JobsView<'_> {
        let admin = grants_somewhere(self.0.allows(), Verb::JobsAdmin);
        JobsView {
            caller: self,
            tenant: match self.tenant() {
                Some(t) if !admin => Some(t.to_string()),
                _ => None,
            },
        }
    }

    /// WatchEvents: a pattern that can only match audit topics needs `system.admin`.
    pub fn watch(&self, pattern: &str) -> Result<(), Status> {
        if !self.0.enforced || !(pattern == "audit" || pattern.starts_with("audit.")) {
            return Ok(());
        }
        if grants(self.0.allows(), Verb::SystemAdmin, &Resource::Server) {
            return Ok(());
        }
        Err(self.0.deny(
            Verb::SystemAdmin,
            &Resource::Server,
            format!("topic:{pattern}"),
            &format!(" (events '{pattern}')"),
        ))
    }

    /// Whether the caller sees an event: `audit.*` needs `system.admin`; a job's events need
    /// what seeing the job needs; everything else `read` on the server (granted already).
    pub fn sees_event(
        &self,
        topic: &str,
        attributes: &std::collections::BTreeMap<String, String>,
    ) -> bool {
        if !self.0.enforced || grants(self.0.allows(), Verb::SystemAdmin, &Resource::Server) {
            return true;
        }
        if topic.starts_with("audit.") || topic.starts_with("auth.") {
            return false;
        }
        if topic.starts_with("jobs.") {
            let queue = attributes.get("queue").map_or("", String::as_str);
            let tenant = attributes
                .get("tenant")
                .map(String::as_str)
                .filter(|t| !t.is_empty());
            return self.may_see_job(queue, tenant);
        }
        true
    }

    /// LogSettings: reading needs `read` (checked by the layer), changing `system.admin`.
    pub fn settings(&self, changing: bool) -> Result<(), Status> {
        if !changing {
            return Ok(());
        }
        self.0.decide(Verb::SystemAdmin, Resource::Server)
    }

    /// Records the outcome of a state-changing call on `resource` (`model:NAME`, `job:ID`...).
    pub fn audit<T>(&self, resource: impl Into<String>, outcome: &Result<T, Status>) {
        let (result, message) = match outcome {
            Ok(_) => ("OK".to_string(), String::new()),
            Err(s) => (code_name(s.code()), s.message().to_string()),
        };
        self.audit_result(resource, &result, &message);
    }

    /// [`Caller::audit`] with the result named by the caller (`OK`, a gRPC code's name).
    pub fn audit_result(&self, resource: impl Into<String>, result: &str, message: &str) {
        let verb = match self.0.rule {
            // A change of the log settings is the system.admin part of LogSettings.
            Rule::LogSettings => Some(Verb::SystemAdmin),
            r => r.verb(),
        };
        self.0.record(verb, resource.into(), result, message);
    }
}

/// A status code's name as gRPC spells it (`PERMISSION_DENIED`).
pub fn code_name(code: tonic::Code) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

#[cfg(test)]
mod tests;
