use std::any::TypeId;
use std::future::Future;
use std::pin::Pin;
use std::sync::Weak;
use std::task::{Context, Poll};

use tokio::sync::{mpsc, oneshot};

use crate::registry::{Handler, Handlers, Inner};
use crate::{BusError, TraceParent};

/// A request served by exactly one handler, which replies once.
///
/// ```
/// struct LoadModel { name: String }
/// impl veraltheim_bus::Command for LoadModel {
///     const NAME: &'static str = "models.load";
///     type Reply = Result<(), String>;
/// }
/// ```
pub trait Command: Send + 'static {
    /// Unique name, used in errors and to find the handler.
    const NAME: &'static str;
    /// What the handler answers.
    type Reply: Send + 'static;
}

/// The handler's side of a reply. Dropping it unanswered fails the sender with
/// [`BusError::HandlerDropped`].
#[derive(Debug)]
pub struct Responder<R> {
    tx: oneshot::Sender<R>,
}

impl<R> Responder<R> {
    pub(crate) fn new(tx: oneshot::Sender<R>) -> Self {
        Self { tx }
    }

    /// Sends the reply; gives it back if the asker stopped waiting.
    pub fn send(self, reply: R) -> Result<(), R> {
        self.tx.send(reply)
    }

    /// Whether the asker stopped waiting, so the work can be skipped.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// One command as its handler receives it.
#[derive(Debug)]
pub struct CommandRequest<C: Command> {
    /// The command.
    pub command: C,
    /// The sender's trace context (see [`crate::with_trace`]), if it had one.
    pub trace: Option<TraceParent>,
    /// Where the reply goes.
    pub responder: Responder<C::Reply>,
}

/// The single handler's bounded inbox for command `C`. Dropping it unregisters the handler;
/// commands still queued then fail with [`BusError::HandlerDropped`].
#[derive(Debug)]
pub struct CommandInbox<C: Command> {
    rx: mpsc::Receiver<CommandRequest<C>>,
    id: u64,
    bus: Weak<Inner>,
}

impl<C: Command> CommandInbox<C> {
    /// The next command; `None` once the bus is gone.
    pub async fn recv(&mut self) -> Option<CommandRequest<C>> {
        self.rx.recv().await
    }

    /// The next command if one is queued now.
    pub fn try_recv(&mut self) -> Option<CommandRequest<C>> {
        self.rx.try_recv().ok()
    }
}

impl<C: Command> Drop for CommandInbox<C> {
    fn drop(&mut self) {
        if let Some(bus) = self.bus.upgrade() {
            Inner::remove_handler(&bus.commands, C::NAME, self.id);
        }
    }
}

/// A reply on its way from a command's handler.
#[derive(Debug)]
#[must_use = "the reply is lost unless awaited"]
pub struct PendingReply<R> {
    rx: oneshot::Receiver<R>,
    command: &'static str,
}

impl<R> Future for PendingReply<R> {
    type Output = Result<R, BusError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let command = self.command;
        Pin::new(&mut self.rx)
            .poll(cx)
            .map_err(|_| BusError::HandlerDropped { command })
    }
}

impl Inner {
    pub(crate) fn register_command<C: Command>(
        &self,
        capacity: usize,
        bus: Weak<Inner>,
    ) -> Result<CommandInbox<C>, BusError> {
        if capacity == 0 {
            return Err(BusError::ZeroCapacity {
                what: "a command inbox",
            });
        }
        let mut commands = self.commands.write();
        if let Some(existing) = commands.get(C::NAME) {
            existing.check_type::<C>(C::NAME)?;
            return Err(BusError::HandlerAlreadyRegistered { command: C::NAME });
        }
        let (tx, rx) = mpsc::channel::<CommandRequest<C>>(capacity);
        let id = self.next_id();
        commands.insert(
            C::NAME,
            Handlers {
                type_id: TypeId::of::<C>(),
                list: vec![Handler {
                    id,
                    sender: Box::new(tx),
                }],
            },
        );
        Ok(CommandInbox { rx, id, bus })
    }

    pub(crate) fn command_sender<C: Command>(
        &self,
    ) -> Result<mpsc::Sender<CommandRequest<C>>, BusError> {
        let commands = self.commands.read();
        let handlers = commands
            .get(C::NAME)
            .ok_or(BusError::NoHandler { command: C::NAME })?;
        handlers.check_type::<C>(C::NAME)?;
        handlers
            .list
            .first()
            .and_then(|handler| {
                handler
                    .sender
                    .downcast_ref::<mpsc::Sender<CommandRequest<C>>>()
            })
            .cloned()
            .ok_or(BusError::NoHandler { command: C::NAME })
    }
}

pub(crate) fn request<C: Command>(
    command: C,
    trace: Option<TraceParent>,
) -> (CommandRequest<C>, PendingReply<C::Reply>) {
    let (tx, rx) = oneshot::channel();
    let request = CommandRequest {
        command,
        trace,
        responder: Responder::new(tx),
    };
    (
        request,
        PendingReply {
            rx,
            command: C::NAME,
        },
    )
}
