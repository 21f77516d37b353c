use std::{fmt, future::Future, pin::Pin, sync::Arc, time::Duration};

use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::{Error, EventHook, SupervisorEvent, SupervisorHandle};

/// The error a worker returns; its `Display` (and sources) become the failure text.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
pub(crate) type WorkerFn =
    Arc<dyn Fn(ChildContext) -> BoxFuture<Result<(), BoxError>> + Send + Sync>;

/// Which children a supervisor restarts when one of them must be restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Only that child.
    #[default]
    OneForOne,
    /// All children: the others are stopped in reverse start order, then all start in order.
    OneForAll,
    /// That child and those started after it: stopped in reverse order, started in order.
    RestForOne,
}

/// When a child that exited is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Restart {
    /// Always, whatever the exit.
    #[default]
    Permanent,
    /// Only after an abnormal exit (an `Err`, a panic, a kill); a normal exit leaves it stopped.
    Transient,
    /// Never; the child is forgotten once it exits.
    Temporary,
}

/// How a supervisor stops a child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Abort at once, without cancelling first.
    Brutal,
    /// Cancel the child's token, then abort it if it has not returned within this time.
    Timeout(Duration),
    /// Cancel the child's token and wait as long as it takes (the default for supervisors, which
    /// stop their own children within their own limits).
    Infinity,
}

/// Exponential delay before restarting a child: `initial`, doubled per consecutive restart, at
/// most `max`. The count starts over once the child has run for `reset_after` (default `max`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    reset_after: Duration,
}

impl Backoff {
    /// `initial`, `2 × initial`, `4 × initial`... capped at `max`.
    pub fn exponential(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            reset_after: max,
        }
    }

    /// How long a child must run before its next restart waits only `initial` again.
    pub fn reset_after(mut self, after: Duration) -> Self {
        self.reset_after = after;
        self
    }

    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.min(31);
        self.initial.saturating_mul(factor).min(self.max)
    }

    pub(crate) fn resets_after(&self) -> Duration {
        self.reset_after
    }
}

/// What a worker gets on each (re)start: its name, its cancellation token, a way to say that
/// it is ready (see [`ChildSpec::ready_timeout`]), and handles on its supervisor and on the root
/// of its tree — as an OTP process may call `supervisor:start_child/2` on its own supervisor, a
/// worker may manage its siblings, and one that serves the tree's status can read it, without
/// anyone handing it a handle after the tree has started.
#[derive(Clone)]
pub struct ChildContext {
    name: Arc<str>,
    token: CancellationToken,
    ready: Arc<Mutex<Option<oneshot::Sender<()>>>>,
    supervisor: SupervisorHandle,
    root: SupervisorHandle,
}

impl ChildContext {
    pub(crate) fn new(
        name: &str,
        token: CancellationToken,
        supervisor: SupervisorHandle,
        root: SupervisorHandle,
    ) -> Self {
        Self {
            name: name.into(),
            token,
            ready: Arc::new(Mutex::new(None)),
            supervisor,
            root,
        }
    }

    pub(crate) fn expecting_ready(self, ready: Option<oneshot::Sender<()>>) -> Self {
        *self.ready.lock() = ready;
        self
    }

    /// The supervisor this worker runs under (this incarnation of it).
    pub fn supervisor(&self) -> &SupervisorHandle {
        &self.supervisor
    }

    /// The root of the tree this worker runs in.
    pub fn root(&self) -> &SupervisorHandle {
        &self.root
    }

    /// The child's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The token the supervisor cancels to ask this child to stop.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Resolves when the supervisor asks this child to stop; return soon after.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }

    /// Whether the supervisor has asked this child to stop.
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Tells the supervisor that start-up is done. Only meaningful with
    /// [`ChildSpec::ready_timeout`]; later calls do nothing.
    pub fn ready(&self) {
        if let Some(tx) = self.ready.lock().take() {
            // The supervisor may have given up waiting already; it then aborts this task.
            let _ = tx.send(());
        }
    }
}

impl fmt::Debug for ChildContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildContext")
            .field("name", &self.name)
            .field("cancelled", &self.token.is_cancelled())
            .finish()
    }
}

#[derive(Clone)]
pub(crate) enum ChildKind {
    Worker(WorkerFn),
    Supervisor(Box<SupervisorSpec>),
}

/// One child of a supervisor: what to run, when to restart it, how to stop it.
#[derive(Clone)]
pub struct ChildSpec {
    pub(crate) name: String,
    pub(crate) kind: ChildKind,
    pub(crate) restart: Restart,
    pub(crate) shutdown: Shutdown,
    pub(crate) backoff: Option<Backoff>,
    pub(crate) ready_timeout: Option<Duration>,
}

impl ChildSpec {
    /// A worker. `factory` is called afresh on every (re)start; the task ends when its future
    /// does: `Ok(())` is a normal exit, `Err` or a panic a failure. Defaults: permanent,
    /// `Shutdown::Timeout(5 s)` (OTP's default for workers), no backoff, started once spawned.
    pub fn worker<F, Fut>(name: impl Into<String>, factory: F) -> Self
    where
        F: Fn(ChildContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        let factory: WorkerFn = Arc::new(move |ctx| Box::pin(factory(ctx)));
        Self {
            name: name.into(),
            kind: ChildKind::Worker(factory),
            restart: Restart::Permanent,
            shutdown: Shutdown::Timeout(Duration::from_secs(5)),
            backoff: None,
            ready_timeout: None,
        }
    }

    /// A nested supervisor, named after its spec. Defaults: permanent, `Shutdown::Infinity`.
    /// Each restart starts it afresh from `spec`: children added to it at runtime are not kept.
    pub fn supervisor(spec: SupervisorSpec) -> Self {
        Self {
            name: spec.name.clone(),
            kind: ChildKind::Supervisor(Box::new(spec)),
            restart: Restart::Permanent,
            shutdown: Shutdown::Infinity,
            backoff: None,
            ready_timeout: None,
        }
    }

    /// Sets the restart type.
    pub fn restart(mut self, restart: Restart) -> Self {
        self.restart = restart;
        self
    }

    /// Sets how the child is stopped.
    pub fn shutdown(mut self, shutdown: Shutdown) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// Waits before each restart of this child (and, under one-for-all or rest-for-one, before
    /// restarting the group its failure stopped).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = Some(backoff);
        self
    }

    /// For workers: the start is only complete once the worker calls [`ChildContext::ready`];
    /// exiting first, or not calling it within `limit`, is a start failure (which fails the
    /// supervisor's own start, or `start_child`). Without it a worker counts as started once
    /// spawned. Ignored for supervisors, whose start completes when their children's does.
    pub fn ready_timeout(mut self, limit: Duration) -> Self {
        self.ready_timeout = Some(limit);
        self
    }

    /// The child's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("ChildSpec");
        d.field("name", &self.name);
        match &self.kind {
            ChildKind::Worker(_) => d.field("kind", &"worker"),
            ChildKind::Supervisor(spec) => d.field("supervisor", spec),
        };
        d.field("restart", &self.restart)
            .field("shutdown", &self.shutdown)
            .field("backoff", &self.backoff)
            .field("ready_timeout", &self.ready_timeout)
            .finish()
    }
}

/// A supervisor: its children in start order, its strategy and its restart intensity.
#[derive(Clone)]
pub struct SupervisorSpec {
    pub(crate) name: String,
    pub(crate) strategy: Strategy,
    pub(crate) max_restarts: u32,
    pub(crate) period: Duration,
    pub(crate) children: Vec<ChildSpec>,
    pub(crate) on_event: Option<EventHook>,
}

impl SupervisorSpec {
    /// A supervisor with no children, one-for-one, and OTP's default intensity (1 restart in 5 s).
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            strategy: Strategy::OneForOne,
            max_restarts: 1,
            period: Duration::from_secs(5),
            children: Vec::new(),
            on_event: None,
        }
    }

    /// Sets the restart strategy.
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// At most `max_restarts` restarts within any window of `period`; one more and the supervisor
    /// stops its children and fails.
    pub fn intensity(mut self, max_restarts: u32, period: Duration) -> Self {
        self.max_restarts = max_restarts;
        self.period = period;
        self
    }

    /// Appends a child (children start in the order they are added).
    pub fn child(mut self, child: ChildSpec) -> Self {
        self.children.push(child);
        self
    }

    /// Sets the event callback, inherited by nested supervisors that have none.
    pub fn on_event(mut self, hook: impl Fn(SupervisorEvent) + Send + Sync + 'static) -> Self {
        self.on_event = Some(Arc::new(hook));
        self
    }

    /// The supervisor's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn validate(&self, path: &str) -> Result<(), Error> {
        let invalid = |reason: String| Error::InvalidSpec {
            supervisor: path.to_owned(),
            reason,
        };
        validate_name(&self.name).map_err(invalid)?;
        for (i, child) in self.children.iter().enumerate() {
            validate_name(&child.name).map_err(invalid)?;
            if self.children[..i].iter().any(|c| c.name == child.name) {
                return Err(invalid(format!("two children are named `{}`", child.name)));
            }
            if let ChildKind::Supervisor(spec) = &child.kind {
                spec.validate(&format!("{path}/{}", spec.name))?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for SupervisorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SupervisorSpec")
            .field("name", &self.name)
            .field("strategy", &self.strategy)
            .field("max_restarts", &self.max_restarts)
            .field("period", &self.period)
            .field("children", &self.children)
            .field("on_event", &self.on_event.is_some())
            .finish()
    }
}

/// Names become path segments, so they must be non-empty and free of `/`.
pub(crate) fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        Err("a name is empty".to_owned())
    } else if name.contains('/') {
        Err(format!("name `{name}` contains `/`, the path separator"))
    } else {
        Ok(())
    }
}
