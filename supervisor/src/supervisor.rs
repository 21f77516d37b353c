//! The supervisor's task: it alone starts, watches, stops and restarts its children.

use std::{
    collections::VecDeque,
    future::{Future, poll_fn},
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::Arc,
    task::Poll,
    time::Duration,
};

use parking_lot::Mutex;
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::{JoinError, JoinHandle},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{
    ChildContext, ChildSpec, Error, EventHook, Exit, NodeKind, NodeState, Restart, Shutdown,
    Strategy, SupervisorEvent, SupervisorHandle, SupervisorSpec,
    handle::{ChildView, Inner, Shared},
    spec::{ChildKind, WorkerFn},
};

pub(crate) type Reply = oneshot::Sender<Result<(), Error>>;

pub(crate) enum Command {
    Start(ChildSpec, Reply),
    Terminate(String, Reply),
    Restart(String, Reply),
    Delete(String, Reply),
    Kill(String, Reply),
}

/// A child task's result: worker errors and supervisor failures are flattened to their text.
type Outcome = Result<Result<(), String>, JoinError>;

struct Running {
    task: JoinHandle<Result<(), String>>,
    token: CancellationToken,
    supervisor: Option<SupervisorHandle>,
    started_at: Instant,
}

struct Child {
    spec: ChildSpec,
    running: Option<Running>,
    restart_at: Option<Instant>,
    state: NodeState,
    restarts: u32,
    last_failure: Option<String>,
    backoff_attempt: u32,
}

impl Child {
    fn new(spec: ChildSpec) -> Self {
        Self {
            spec,
            running: None,
            restart_at: None,
            state: NodeState::Stopped,
            restarts: 0,
            last_failure: None,
            backoff_attempt: 0,
        }
    }

    fn kind(&self) -> NodeKind {
        match self.spec.kind {
            ChildKind::Worker(_) => NodeKind::Worker,
            ChildKind::Supervisor(_) => NodeKind::Supervisor,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let Some(backoff) = self.spec.backoff else {
            return Duration::ZERO;
        };
        let delay = backoff.delay(self.backoff_attempt);
        self.backoff_attempt = self.backoff_attempt.saturating_add(1);
        delay
    }
}

struct Supervisor {
    path: String,
    strategy: Strategy,
    max_restarts: u32,
    period: Duration,
    children: Vec<Child>,
    /// Instants of the restarts within the last `period`, oldest first.
    restarts: VecDeque<Instant>,
    hook: Option<EventHook>,
    shared: Arc<Mutex<Shared>>,
    token: CancellationToken,
    /// This supervisor's own handle and its tree's root, for its workers' contexts.
    me: SupervisorHandle,
    root: SupervisorHandle,
}

pub(crate) struct Spawned {
    pub(crate) handle: SupervisorHandle,
    pub(crate) task: JoinHandle<Result<(), String>>,
    pub(crate) started: oneshot::Receiver<Result<(), Error>>,
}

// `start` is the spec's method, defined here beside the code it runs, so that `spec` (the
// data of a tree) does not depend on this module (the running of one).
impl SupervisorSpec {
    /// Starts the tree: each child in order, nested supervisors with their own children before
    /// the next sibling. If a child fails to start, those already started are stopped in reverse
    /// order and the error names the child. Must be called within a tokio runtime.
    pub async fn start(self) -> Result<SupervisorHandle, Error> {
        start_root(self).await
    }
}

async fn start_root(spec: SupervisorSpec) -> Result<SupervisorHandle, Error> {
    spec.validate(&spec.name)?;
    let path = spec.name.clone();
    let Spawned {
        handle,
        task,
        started,
    } = spawn(spec, None, None, CancellationToken::new());
    match started.await {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => {
            let _ = task.await;
            Err(e)
        }
        Err(_) => Err(Error::Aborted { supervisor: path }),
    }
}

/// Spawns a supervisor's task; `started` reports once all its children have started (or one
/// failed to, after which the task stops the others and ends).
pub(crate) fn spawn(
    spec: SupervisorSpec,
    parent: Option<&str>,
    root: Option<SupervisorHandle>,
    token: CancellationToken,
) -> Spawned {
    let path = match parent {
        Some(parent) => format!("{parent}/{}", spec.name),
        None => spec.name.clone(),
    };
    let shared = Arc::new(Mutex::new(Shared {
        state: NodeState::Starting,
        last_failure: None,
        children: Vec::new(),
    }));
    let (commands, inbox) = mpsc::unbounded_channel();
    let (done_tx, done) = watch::channel(None);
    let (started_tx, started) = oneshot::channel();
    let handle = SupervisorHandle::new(Inner {
        path: path.clone(),
        name: spec.name.clone(),
        commands,
        token: token.clone(),
        shared: shared.clone(),
        done,
    });
    let supervisor = Supervisor {
        path,
        strategy: spec.strategy,
        max_restarts: spec.max_restarts,
        period: spec.period,
        children: spec.children.into_iter().map(Child::new).collect(),
        restarts: VecDeque::new(),
        hook: spec.on_event,
        shared,
        token,
        root: root.unwrap_or_else(|| handle.clone()),
        me: handle.clone(),
    };
    supervisor.publish();
    let task = tokio::spawn(async move {
        let result = supervisor.run(inbox, started_tx).await;
        done_tx.send_replace(Some(result.clone()));
        result.map_err(|e| e.to_string())
    });
    Spawned {
        handle,
        task,
        started,
    }
}

enum Step {
    Shutdown,
    Exit(usize, Outcome),
    Command(Option<Command>),
    RestartDue,
}

impl Supervisor {
    async fn run(
        mut self,
        mut inbox: mpsc::UnboundedReceiver<Command>,
        started: oneshot::Sender<Result<(), Error>>,
    ) -> Result<(), Error> {
        tracing::debug!(supervisor = %self.path, "starting");
        for i in 0..self.children.len() {
            if let Err(reason) = self.start_at(i, false).await {
                let err = Error::StartFailed {
                    supervisor: self.path.clone(),
                    child: self.children[i].spec.name.clone(),
                    reason,
                };
                self.stop_all().await;
                self.set_state(NodeState::Failed, Some(err.to_string()));
                let _ = started.send(Err(err.clone()));
                return Err(err);
            }
        }
        self.set_state(NodeState::Running, None);
        let _ = started.send(Ok(()));
        self.serve(&mut inbox).await
    }

    async fn serve(&mut self, inbox: &mut mpsc::UnboundedReceiver<Command>) -> Result<(), Error> {
        let token = self.token.clone();
        let mut inbox_open = true;
        loop {
            let next_restart = self.children.iter().filter_map(|c| c.restart_at).min();
            let step = tokio::select! {
                biased;
                () = token.cancelled() => Step::Shutdown,
                (i, outcome) = next_exit(&mut self.children) => Step::Exit(i, outcome),
                command = inbox.recv(), if inbox_open => Step::Command(command),
                () = sleep_until(next_restart) => Step::RestartDue,
            };
            match step {
                Step::Shutdown => {
                    tracing::debug!(supervisor = %self.path, "shutting down");
                    self.set_state(NodeState::Stopping, None);
                    self.stop_all().await;
                    self.set_state(NodeState::Stopped, None);
                    return Ok(());
                }
                Step::Exit(i, outcome) => {
                    self.on_exit(i, outcome).await?;
                    self.restart_due().await?;
                }
                Step::Command(Some(command)) => self.on_command(command).await,
                Step::Command(None) => inbox_open = false,
                Step::RestartDue => self.restart_due().await?,
            }
        }
    }

    /// A child's task ended without being asked to.
    async fn on_exit(&mut self, i: usize, outcome: Outcome) -> Result<(), Error> {
        let Some(running) = self.children[i].running.take() else {
            return Ok(());
        };
        let exit = match outcome {
            Ok(Ok(())) => Exit::Normal,
            Ok(Err(reason)) => Exit::Failed(reason),
            Err(e) if e.is_panic() => Exit::Panicked(panic_message(e)),
            Err(_) => Exit::Killed,
        };
        let child = &mut self.children[i];
        let name = child.spec.name.clone();
        if exit.is_abnormal() {
            tracing::warn!(supervisor = %self.path, child = %name, %exit, "child failed");
        } else {
            tracing::info!(supervisor = %self.path, child = %name, %exit, "child exited");
        }
        if let Some(failure) = exit.failure() {
            child.last_failure = Some(failure);
        }
        if let Some(backoff) = child.spec.backoff
            && running.started_at.elapsed() >= backoff.resets_after()
        {
            child.backoff_attempt = 0;
        }
        let restart = match child.spec.restart {
            Restart::Permanent => true,
            Restart::Transient => exit.is_abnormal(),
            Restart::Temporary => false,
        };
        let abnormal = exit.is_abnormal();
        let reason = exit.to_string();
        if restart {
            child.state = NodeState::Restarting;
        } else {
            if child.spec.restart == Restart::Temporary {
                self.children.remove(i);
            } else {
                child.state = if abnormal {
                    NodeState::Failed
                } else {
                    NodeState::Stopped
                };
            }
        }
        self.publish();
        self.emit(SupervisorEvent::ChildExited {
            supervisor: self.path.clone(),
            child: name,
            exit,
        });
        if restart {
            self.schedule_restart(i, reason).await?;
        }
        Ok(())
    }

    /// Child `i` has to be restarted: count the restart against the intensity, stop the rest of
    /// its group (by strategy) in reverse order and schedule the group's start in order.
    async fn schedule_restart(&mut self, i: usize, reason: String) -> Result<(), Error> {
        if !self.record_restart(Instant::now()) {
            let err = Error::IntensityExceeded {
                supervisor: self.path.clone(),
                max_restarts: self.max_restarts,
                period: self.period,
                child: self.children[i].spec.name.clone(),
                reason,
            };
            tracing::error!(supervisor = %self.path, error = %err, "escalating");
            self.children[i].state = NodeState::Failed;
            self.set_state(NodeState::Stopping, None);
            self.emit(SupervisorEvent::Escalated {
                supervisor: self.path.clone(),
                reason: err.to_string(),
            });
            self.stop_all().await;
            self.set_state(NodeState::Failed, Some(err.to_string()));
            return Err(err);
        }
        let delay = self.children[i].next_delay();
        let group = match self.strategy {
            Strategy::OneForOne => i..i + 1,
            Strategy::OneForAll => 0..self.children.len(),
            Strategy::RestForOne => i..self.children.len(),
        };
        for j in group.clone().rev() {
            if j != i {
                self.terminate(j).await;
            }
        }
        if !delay.is_zero() {
            tracing::info!(
                supervisor = %self.path,
                child = %self.children[i].spec.name,
                ?delay,
                "restart backing off"
            );
        }
        let at = Instant::now() + delay;
        for child in &mut self.children[group.clone()] {
            if child.spec.restart != Restart::Temporary {
                child.restart_at = Some(at);
                child.state = NodeState::Restarting;
            }
        }
        // Temporary children stopped with their group are forgotten, as in OTP.
        let mut j = 0;
        self.children.retain(|child| {
            let stopped_temporary = group.contains(&j) && child.spec.restart == Restart::Temporary;
            j += 1;
            !stopped_temporary
        });
        self.publish();
        Ok(())
    }

    /// Sliding window: the restart at `now` is allowed if at most `max_restarts` restarts
    /// (this one included) fall within `[now - period, now]`.
    fn record_restart(&mut self, now: Instant) -> bool {
        let threshold = now.checked_sub(self.period);
        while let (Some(&oldest), Some(threshold)) = (self.restarts.front(), threshold) {
            if oldest >= threshold {
                break;
            }
            self.restarts.pop_front();
        }
        self.restarts.push_back(now);
        self.restarts.len() <= self.max_restarts as usize
    }

    /// Starts every child whose restart time has come, in start order. A child that fails to
    /// start is a failure like any other and goes through the restart rules again.
    async fn restart_due(&mut self) -> Result<(), Error> {
        loop {
            let now = Instant::now();
            let Some(j) = self
                .children
                .iter()
                .position(|c| c.restart_at.is_some_and(|at| at <= now))
            else {
                return Ok(());
            };
            self.children[j].restart_at = None;
            self.children[j].restarts = self.children[j].restarts.saturating_add(1);
            if let Err(reason) = self.start_at(j, true).await {
                self.schedule_restart(j, format!("failed to restart: {reason}"))
                    .await?;
            }
        }
    }

    async fn start_at(&mut self, i: usize, is_restart: bool) -> Result<(), String> {
        let spec = self.children[i].spec.clone();
        self.children[i].state = NodeState::Starting;
        self.publish();
        let token = CancellationToken::new();
        let started = match spec.kind {
            ChildKind::Worker(factory) => start_worker(
                factory,
                ChildContext::new(
                    &spec.name,
                    token.clone(),
                    self.me.clone(),
                    self.root.clone(),
                ),
                spec.ready_timeout,
            )
            .await
            .map(|task| (task, None)),
            ChildKind::Supervisor(mut nested) => {
                if nested.on_event.is_none() {
                    nested.on_event = self.hook.clone();
                }
                start_nested(*nested, &self.path, self.root.clone(), token.clone()).await
            }
        };
        let child = &mut self.children[i];
        match started {
            Ok((task, supervisor)) => {
                child.running = Some(Running {
                    task,
                    token,
                    supervisor,
                    started_at: Instant::now(),
                });
                child.state = NodeState::Running;
                let restarts = child.restarts;
                self.publish();
                tracing::debug!(supervisor = %self.path, child = %spec.name, "child started");
                self.emit(if is_restart {
                    SupervisorEvent::ChildRestarted {
                        supervisor: self.path.clone(),
                        child: spec.name,
                        restarts,
                    }
                } else {
                    SupervisorEvent::ChildStarted {
                        supervisor: self.path.clone(),
                        child: spec.name,
                    }
                });
                Ok(())
            }
            Err(reason) => {
                child.state = NodeState::Failed;
                child.last_failure = Some(reason.clone());
                self.publish();
                tracing::warn!(supervisor = %self.path, child = %spec.name, %reason, "child failed to start");
                self.emit(SupervisorEvent::ChildStartFailed {
                    supervisor: self.path.clone(),
                    child: spec.name,
                    reason: reason.clone(),
                });
                Err(reason)
            }
        }
    }

    /// Stops child `i` by its shutdown rule (a pending restart is cancelled).
    async fn terminate(&mut self, i: usize) {
        let child = &mut self.children[i];
        let was_pending = child.restart_at.take().is_some();
        let Some(Running {
            mut task, token, ..
        }) = child.running.take()
        else {
            if was_pending {
                child.state = NodeState::Stopped;
                self.publish();
            }
            return;
        };
        child.state = NodeState::Stopping;
        let shutdown = child.spec.shutdown;
        let name = child.spec.name.clone();
        self.publish();
        let outcome = match shutdown {
            Shutdown::Brutal => {
                task.abort();
                (&mut task).await
            }
            Shutdown::Timeout(limit) => {
                token.cancel();
                match tokio::time::timeout(limit, &mut task).await {
                    Ok(outcome) => outcome,
                    Err(_) => {
                        tracing::warn!(supervisor = %self.path, child = %name, ?limit, "child ignored cancellation; aborting");
                        task.abort();
                        (&mut task).await
                    }
                }
            }
            Shutdown::Infinity => {
                token.cancel();
                (&mut task).await
            }
        };
        let exit = match outcome {
            Ok(Ok(())) => Exit::Shutdown,
            Ok(Err(reason)) => Exit::Failed(reason),
            Err(e) if e.is_panic() => Exit::Panicked(panic_message(e)),
            Err(_) => Exit::Aborted,
        };
        let child = &mut self.children[i];
        child.state = NodeState::Stopped;
        if let Some(failure) = exit.failure() {
            child.last_failure = Some(failure);
        }
        self.publish();
        self.emit(SupervisorEvent::ChildExited {
            supervisor: self.path.clone(),
            child: name,
            exit,
        });
    }

    async fn stop_all(&mut self) {
        for i in (0..self.children.len()).rev() {
            self.terminate(i).await;
        }
    }

    async fn on_command(&mut self, command: Command) {
        match command {
            Command::Start(spec, reply) => {
                let result = self.start_dynamic(spec).await;
                let _ = reply.send(result);
            }
            Command::Terminate(name, reply) => {
                let result = self
                    .index_of(&name)
                    .map(|i| (i, self.children[i].spec.restart));
                if let Ok((i, restart)) = result {
                    self.terminate(i).await;
                    if restart == Restart::Temporary {
                        self.children.remove(i);
                        self.publish();
                    }
                }
                let _ = reply.send(result.map(drop));
            }
            Command::Restart(name, reply) => {
                let result = match self.stopped_index_of(&name) {
                    Ok(i) => self
                        .start_at(i, false)
                        .await
                        .map_err(|reason| self.start_failed(name, reason)),
                    Err(e) => Err(e),
                };
                let _ = reply.send(result);
            }
            Command::Delete(name, reply) => {
                let result = self.stopped_index_of(&name).map(|i| {
                    self.children.remove(i);
                    self.publish();
                });
                let _ = reply.send(result);
            }
            Command::Kill(name, reply) => {
                let result = self.index_of(&name).and_then(|i| {
                    match &self.children[i].running {
                        // The exit is seen by `serve` and handled like any crash.
                        Some(running) => {
                            running.task.abort();
                            Ok(())
                        }
                        None => Err(Error::NotRunning {
                            supervisor: self.path.clone(),
                            child: name,
                        }),
                    }
                });
                let _ = reply.send(result);
            }
        }
    }

    async fn start_dynamic(&mut self, spec: ChildSpec) -> Result<(), Error> {
        let path = format!("{}/{}", self.path, spec.name);
        crate::spec::validate_name(&spec.name).map_err(|reason| Error::InvalidSpec {
            supervisor: self.path.clone(),
            reason,
        })?;
        if let ChildKind::Supervisor(nested) = &spec.kind {
            nested.validate(&path)?;
        }
        if self.children.iter().any(|c| c.spec.name == spec.name) {
            return Err(Error::AlreadyPresent {
                supervisor: self.path.clone(),
                child: spec.name,
            });
        }
        let name = spec.name.clone();
        self.children.push(Child::new(spec));
        let i = self.children.len() - 1;
        self.start_at(i, false).await.map_err(|reason| {
            self.children.remove(i);
            self.publish();
            self.start_failed(name, reason)
        })
    }

    fn start_failed(&self, child: String, reason: String) -> Error {
        Error::StartFailed {
            supervisor: self.path.clone(),
            child,
            reason,
        }
    }

    fn index_of(&self, name: &str) -> Result<usize, Error> {
        self.children
            .iter()
            .position(|c| c.spec.name == name)
            .ok_or_else(|| Error::NotFound {
                supervisor: self.path.clone(),
                child: name.to_owned(),
            })
    }

    fn stopped_index_of(&self, name: &str) -> Result<usize, Error> {
        let i = self.index_of(name)?;
        let child = &self.children[i];
        let (supervisor, name) = (self.path.clone(), name.to_owned());
        if child.running.is_some() {
            Err(Error::Running {
                supervisor,
                child: name,
            })
        } else if child.restart_at.is_some() {
            Err(Error::Restarting {
                supervisor,
                child: name,
            })
        } else {
            Ok(i)
        }
    }

    fn set_state(&self, state: NodeState, failure: Option<String>) {
        let mut shared = self.shared.lock();
        shared.state = state;
        if failure.is_some() {
            shared.last_failure = failure;
        }
    }

    fn publish(&self) {
        let views = self
            .children
            .iter()
            .map(|c| ChildView {
                name: c.spec.name.clone(),
                kind: c.kind(),
                state: c.state,
                restarts: c.restarts,
                last_failure: c.last_failure.clone(),
                supervisor: c.running.as_ref().and_then(|r| r.supervisor.clone()),
            })
            .collect();
        self.shared.lock().children = views;
    }

    fn emit(&self, event: SupervisorEvent) {
        if let Some(hook) = &self.hook
            && std::panic::catch_unwind(AssertUnwindSafe(|| hook(event))).is_err()
        {
            tracing::error!(supervisor = %self.path, "the event hook panicked");
        }
    }
}

impl Drop for Supervisor {
    /// Reached with children still running only when this supervisor's task is aborted: take
    /// the subtree down with it rather than leave orphans.
    fn drop(&mut self) {
        for child in &self.children {
            if let Some(running) = &child.running {
                running.task.abort();
            }
        }
        let mut shared = self.shared.lock();
        if !matches!(shared.state, NodeState::Stopped | NodeState::Failed) {
            shared.state = NodeState::Failed;
            shared.last_failure = Some("aborted".to_owned());
        }
    }
}

async fn start_worker(
    factory: WorkerFn,
    ctx: ChildContext,
    ready_timeout: Option<Duration>,
) -> Result<JoinHandle<Result<(), String>>, String> {
    let (ready_tx, ready) = oneshot::channel();
    let ctx = ctx.expecting_ready(ready_timeout.map(|_| ready_tx));
    // The factory runs inside the task so that a panic in it is a child failure too.
    let mut task =
        tokio::spawn(async move { factory(ctx).await.map_err(|e| error_chain(e.as_ref())) });
    let Some(limit) = ready_timeout else {
        return Ok(task);
    };
    tokio::select! {
        biased;
        signalled = ready => {
            if signalled.is_ok() {
                return Ok(task);
            }
            // Every context is gone without a signal: the worker can never become ready.
            task.abort();
            Err(match (&mut task).await {
                Ok(Ok(())) => "exited before signalling ready".to_owned(),
                Ok(Err(reason)) => reason,
                Err(e) if e.is_panic() => format!("panicked: {}", panic_message(e)),
                Err(_) => "dropped its context without signalling ready".to_owned(),
            })
        }
        outcome = &mut task => Err(match outcome {
            Ok(Ok(())) => "exited before signalling ready".to_owned(),
            Ok(Err(reason)) => reason,
            Err(e) if e.is_panic() => format!("panicked: {}", panic_message(e)),
            Err(_) => "aborted while starting".to_owned(),
        }),
        () = tokio::time::sleep(limit) => {
            task.abort();
            let _ = (&mut task).await;
            Err(format!("not ready within {limit:?}"))
        }
    }
}

async fn start_nested(
    spec: SupervisorSpec,
    parent: &str,
    root: SupervisorHandle,
    token: CancellationToken,
) -> Result<(JoinHandle<Result<(), String>>, Option<SupervisorHandle>), String> {
    let Spawned {
        handle,
        task,
        started,
    } = spawn(spec, Some(parent), Some(root), token);
    match started.await {
        Ok(Ok(())) => Ok((task, Some(handle))),
        Ok(Err(e)) => {
            let _ = task.await;
            Err(e.to_string())
        }
        Err(_) => Err(match task.await {
            Err(e) if e.is_panic() => format!("panicked: {}", panic_message(e)),
            _ => "supervisor task ended while starting".to_owned(),
        }),
    }
}

/// The first child task to end, by index. Children are few (tens), so a scan per wake-up is
/// cheaper than keeping a separate set of join handles in step with `children`.
fn next_exit(children: &mut [Child]) -> impl Future<Output = (usize, Outcome)> + '_ {
    poll_fn(move |cx| {
        for (i, child) in children.iter_mut().enumerate() {
            if let Some(running) = child.running.as_mut()
                && let Poll::Ready(outcome) = Pin::new(&mut running.task).poll(cx)
            {
                return Poll::Ready((i, outcome));
            }
        }
        Poll::Pending
    })
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn panic_message(error: JoinError) -> String {
    match error.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic with a non-string payload".to_owned()),
        Err(e) => e.to_string(),
    }
}
