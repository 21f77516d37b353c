use std::{fmt, sync::Arc};

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    ChildSpec, Error, NodeKind, NodeSnapshot, NodeState,
    supervisor::{Command, Reply},
};

/// What a supervisor's task publishes for handles to read without asking it.
pub(crate) struct Shared {
    pub(crate) state: NodeState,
    pub(crate) last_failure: Option<String>,
    pub(crate) children: Vec<ChildView>,
}

#[derive(Clone)]
pub(crate) struct ChildView {
    pub(crate) name: String,
    pub(crate) kind: NodeKind,
    pub(crate) state: NodeState,
    pub(crate) restarts: u32,
    pub(crate) last_failure: Option<String>,
    /// The current incarnation of a nested supervisor, while it runs.
    pub(crate) supervisor: Option<SupervisorHandle>,
}

pub(crate) struct Inner {
    pub(crate) path: String,
    pub(crate) name: String,
    pub(crate) commands: mpsc::UnboundedSender<Command>,
    pub(crate) token: CancellationToken,
    pub(crate) shared: Arc<Mutex<Shared>>,
    pub(crate) done: watch::Receiver<Option<Result<(), Error>>>,
}

/// A cheap, cloneable handle on a running supervisor. Dropping it does not stop the supervisor:
/// call [`shutdown`](Self::shutdown).
///
/// Methods taking a `path` accept a child's name or a `/`-separated path through nested
/// supervisors, relative to this one (`"Models/model:minilm"`).
#[derive(Clone)]
pub struct SupervisorHandle {
    inner: Arc<Inner>,
}

impl SupervisorHandle {
    pub(crate) fn new(inner: Inner) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The supervisor's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The supervisor's path from the root of its tree (`System/Models`).
    pub fn path(&self) -> &str {
        &self.inner.path
    }

    /// The tree under this supervisor as it is now. Never waits on the supervisor's task.
    pub fn snapshot(&self) -> NodeSnapshot {
        let (state, last_failure, views) = {
            let shared = self.inner.shared.lock();
            (
                shared.state,
                shared.last_failure.clone(),
                shared.children.clone(),
            )
        };
        let children = views
            .into_iter()
            .map(|view| NodeSnapshot {
                children: view
                    .supervisor
                    .map(|sup| sup.snapshot().children)
                    .unwrap_or_default(),
                name: view.name,
                kind: view.kind,
                state: view.state,
                restarts: view.restarts,
                last_failure: view.last_failure,
            })
            .collect();
        NodeSnapshot {
            name: self.inner.name.clone(),
            kind: NodeKind::Supervisor,
            state,
            restarts: 0,
            last_failure,
            children,
        }
    }

    /// The running nested supervisor at `path` (`""` is this one). A restarted supervisor is a
    /// new incarnation: resolve the path again rather than keeping the old handle.
    pub fn supervisor(&self, path: &str) -> Result<SupervisorHandle, Error> {
        let mut current = self.clone();
        for name in path.split('/').filter(|s| !s.is_empty()) {
            let next = current
                .inner
                .shared
                .lock()
                .children
                .iter()
                .find(|c| c.name == name)
                .and_then(|c| c.supervisor.clone());
            current = next.ok_or_else(|| Error::NotFound {
                supervisor: current.path().to_owned(),
                child: name.to_owned(),
            })?;
        }
        Ok(current)
    }

    /// Adds a child at the end of this supervisor's children and starts it (OTP's
    /// `start_child`). If it fails to start it is not kept.
    pub async fn start_child(&self, spec: ChildSpec) -> Result<(), Error> {
        self.request(|reply| Command::Start(spec, reply)).await
    }

    /// Stops a child by its shutdown rule; it stays in the spec (stopped) unless temporary.
    /// Stopping a child that is not running is not an error.
    pub async fn terminate_child(&self, path: &str) -> Result<(), Error> {
        let (sup, name) = self.resolve(path)?;
        sup.request(|reply| Command::Terminate(name, reply)).await
    }

    /// Starts a stopped child again (a manual restart: it does not count towards the intensity).
    pub async fn restart_child(&self, path: &str) -> Result<(), Error> {
        let (sup, name) = self.resolve(path)?;
        sup.request(|reply| Command::Restart(name, reply)).await
    }

    /// Forgets a stopped child.
    pub async fn delete_child(&self, path: &str) -> Result<(), Error> {
        let (sup, name) = self.resolve(path)?;
        sup.request(|reply| Command::Delete(name, reply)).await
    }

    /// Aborts a running child as if it had crashed ([`Exit::Killed`](crate::Exit::Killed), an
    /// abnormal exit): its supervisor then applies its restart rules. For chaos tests.
    pub async fn kill_child(&self, path: &str) -> Result<(), Error> {
        let (sup, name) = self.resolve(path)?;
        sup.request(|reply| Command::Kill(name, reply)).await
    }

    /// Stops all children in reverse start order and waits for the supervisor to terminate;
    /// returns how it ended (an error if it had already failed). On a nested supervisor this is
    /// an exit like any other for its parent, which may restart it: use the parent's
    /// `terminate_child` to stop it for good.
    pub async fn shutdown(&self) -> Result<(), Error> {
        self.inner.token.cancel();
        self.wait().await
    }

    /// Waits until the supervisor terminates: `Ok` after a shutdown, the error after a failure
    /// (restart intensity exceeded).
    pub async fn wait(&self) -> Result<(), Error> {
        let mut done = self.inner.done.clone();
        // `wait_for` looks at the current value before reporting a closed channel, so a result
        // sent just before the task ended is still seen.
        let result = done
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|value| (*value).clone());
        result.unwrap_or_else(|| {
            Err(Error::Aborted {
                supervisor: self.path().to_owned(),
            })
        })
    }

    /// Whether the supervisor has terminated (or its task is gone).
    pub fn is_terminated(&self) -> bool {
        self.inner.done.borrow().is_some() || self.inner.commands.is_closed()
    }

    fn resolve(&self, path: &str) -> Result<(SupervisorHandle, String), Error> {
        let path = path.trim_matches('/');
        match path.rsplit_once('/') {
            Some((parent, name)) => Ok((self.supervisor(parent)?, name.to_owned())),
            None => Ok((self.clone(), path.to_owned())),
        }
    }

    async fn request(&self, command: impl FnOnce(Reply) -> Command) -> Result<(), Error> {
        let terminated = || Error::Terminated {
            supervisor: self.path().to_owned(),
        };
        let (reply, answer) = oneshot::channel();
        self.inner
            .commands
            .send(command(reply))
            .map_err(|_| terminated())?;
        answer.await.map_err(|_| terminated())?
    }
}

impl fmt::Debug for SupervisorHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SupervisorHandle")
            .field("path", &self.inner.path)
            .field("state", &self.inner.shared.lock().state)
            .finish()
    }
}
