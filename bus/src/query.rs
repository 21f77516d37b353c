use std::any::TypeId;
use std::sync::Weak;

use tokio::sync::{mpsc, oneshot};

use crate::registry::{Handler, Handlers, Inner};
use crate::{BusError, Responder, TraceParent};

/// A question any number of handlers may answer; the asker gathers their replies.
///
/// ```
/// #[derive(Clone)]
/// struct FreeMemory;
/// impl veraltheim_bus::Query for FreeMemory {
///     const NAME: &'static str = "devices.free_memory";
///     type Reply = (String, u64);
/// }
/// ```
pub trait Query: Clone + Send + 'static {
    /// Unique name, used in errors and to find the handlers.
    const NAME: &'static str;
    /// What each handler answers.
    type Reply: Send + 'static;
}

/// One query as a handler receives it.
#[derive(Debug)]
pub struct QueryRequest<Q: Query> {
    /// The query.
    pub query: Q,
    /// The asker's trace context, if it had one.
    pub trace: Option<TraceParent>,
    /// Where this handler's reply goes.
    pub responder: Responder<Q::Reply>,
}

/// One handler's bounded inbox for query `Q`. Dropping it unregisters the handler.
#[derive(Debug)]
pub struct QueryInbox<Q: Query> {
    rx: mpsc::Receiver<QueryRequest<Q>>,
    id: u64,
    bus: Weak<Inner>,
}

impl<Q: Query> QueryInbox<Q> {
    /// The next query; `None` once the bus is gone.
    pub async fn recv(&mut self) -> Option<QueryRequest<Q>> {
        self.rx.recv().await
    }

    /// The next query if one is queued now.
    pub fn try_recv(&mut self) -> Option<QueryRequest<Q>> {
        self.rx.try_recv().ok()
    }
}

impl<Q: Query> Drop for QueryInbox<Q> {
    fn drop(&mut self) {
        if let Some(bus) = self.bus.upgrade() {
            Inner::remove_handler(&bus.queries, Q::NAME, self.id);
        }
    }
}

/// What a query gathered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryReplies<R> {
    /// The replies, in the order they arrived.
    pub replies: Vec<R>,
    /// Handlers the query was queued to.
    pub asked: usize,
    /// Handlers skipped because their inbox was full.
    pub busy: usize,
    /// Handlers asked that did not answer in time or dropped the query.
    pub unanswered: usize,
}

impl<R> QueryReplies<R> {
    /// Whether every registered handler answered.
    pub fn is_complete(&self) -> bool {
        self.busy == 0 && self.unanswered == 0
    }
}

impl Inner {
    pub(crate) fn register_query<Q: Query>(
        &self,
        capacity: usize,
        bus: Weak<Inner>,
    ) -> Result<QueryInbox<Q>, BusError> {
        if capacity == 0 {
            return Err(BusError::ZeroCapacity {
                what: "a query inbox",
            });
        }
        let mut queries = self.queries.write();
        let handlers = queries.entry(Q::NAME).or_insert_with(|| Handlers {
            type_id: TypeId::of::<Q>(),
            list: Vec::new(),
        });
        handlers.check_type::<Q>(Q::NAME)?;
        let (tx, rx) = mpsc::channel::<QueryRequest<Q>>(capacity);
        let id = self.next_id();
        handlers.list.push(Handler {
            id,
            sender: Box::new(tx),
        });
        Ok(QueryInbox { rx, id, bus })
    }

    pub(crate) fn query_senders<Q: Query>(
        &self,
    ) -> Result<Vec<mpsc::Sender<QueryRequest<Q>>>, BusError> {
        let queries = self.queries.read();
        let Some(handlers) = queries.get(Q::NAME) else {
            return Ok(Vec::new());
        };
        handlers.check_type::<Q>(Q::NAME)?;
        Ok(handlers
            .list
            .iter()
            .filter_map(|handler| {
                handler
                    .sender
                    .downcast_ref::<mpsc::Sender<QueryRequest<Q>>>()
            })
            .cloned()
            .collect())
    }
}

pub(crate) fn request<Q: Query>(
    query: Q,
    trace: Option<TraceParent>,
) -> (QueryRequest<Q>, oneshot::Receiver<Q::Reply>) {
    let (tx, rx) = oneshot::channel();
    (
        QueryRequest {
            query,
            trace,
            responder: Responder::new(tx),
        },
        rx,
    )
}
