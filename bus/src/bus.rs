use std::fmt;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::Instant;

use crate::registry::Inner;
use crate::subscription::{Outcome, Shared};
use crate::{
    BusError, Command, CommandInbox, Event, Pattern, PendingReply, Query, QueryInbox, QueryReplies,
    SubscribeOptions, Subscription, SubscriptionId, SubscriptionStats, command, current_trace,
    query,
};

/// The in-process bus. Cheap to clone; every clone is the same bus. When the last clone is
/// dropped, subscriptions drain and end, and handler inboxes end.
#[derive(Clone, Default)]
pub struct Bus {
    inner: Arc<Inner>,
}

/// What one publish did, per subscription policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishReport {
    /// Subscriptions whose pattern matched the topic.
    pub matched: usize,
    /// Subscriptions that queued the event.
    pub queued: usize,
    /// Of those, subscriptions that dropped their oldest event to make room
    /// ([`crate::WhenFull::DropOldest`]).
    pub dropped_oldest: usize,
    /// Subscriptions that were full and did not get the event ([`crate::WhenFull::Reject`]).
    pub rejected: Vec<SubscriptionId>,
    /// Subscriptions that went away during the publish.
    pub closed: usize,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Publishes `event` to every matching subscription, each under its own [`crate::WhenFull`]
    /// policy; waits only on full [`crate::WhenFull::Block`] subscriptions.
    ///
    /// An event without a trace context takes the current one ([`crate::with_trace`]). Dropping
    /// the returned future part-way may leave the event delivered to some subscriptions only.
    pub async fn publish(&self, mut event: Event) -> Result<PublishReport, BusError> {
        if event.traceparent.is_empty()
            && let Some(trace) = current_trace()
        {
            event.traceparent = trace.to_string();
        }
        event.validate()?;
        let targets: Vec<Arc<Shared>> = self
            .inner
            .subscriptions
            .read()
            .iter()
            .filter(|shared| shared.wants(&event))
            .cloned()
            .collect();
        let event = Arc::new(event);
        let mut report = PublishReport {
            matched: targets.len(),
            ..PublishReport::default()
        };
        for target in targets {
            match target.offer(&event).await {
                Outcome::Queued => report.queued += 1,
                Outcome::QueuedDroppingOldest => {
                    report.queued += 1;
                    report.dropped_oldest += 1;
                }
                Outcome::Rejected => report.rejected.push(target.id),
                Outcome::Closed => report.closed += 1,
            }
        }
        Ok(report)
    }

    /// Subscribes to the topics matching `pattern` (see [`Pattern`]).
    pub fn subscribe(
        &self,
        pattern: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription, BusError> {
        self.subscribe_with(pattern, None, options)
    }

    /// Subscribes to the events whose topic matches `pattern` and that `accept` takes. An event
    /// `accept` refuses never reaches the queue, so it takes no room there and counts in none of
    /// the subscription's counters (the NATS bridge takes only its topics, and leaves out the
    /// events that came from other nodes).
    ///
    /// `accept` runs in every matching publish, under the bus's subscription lock: it must be
    /// quick and must neither block nor touch the bus.
    pub fn subscribe_where(
        &self,
        pattern: &str,
        options: SubscribeOptions,
        accept: impl Fn(&Event) -> bool + Send + Sync + 'static,
    ) -> Result<Subscription, BusError> {
        self.subscribe_with(pattern, Some(Box::new(accept)), options)
    }

    fn subscribe_with(
        &self,
        pattern: &str,
        accept: Option<crate::subscription::Accept>,
        options: SubscribeOptions,
    ) -> Result<Subscription, BusError> {
        let pattern = Pattern::parse(pattern)?;
        options.validate()?;
        let id = SubscriptionId(self.inner.next_id());
        let shared = Arc::new(Shared::new(id, pattern, accept, options));
        self.inner.subscriptions.write().push(Arc::clone(&shared));
        let registry: Weak<Inner> = Arc::downgrade(&self.inner);
        Ok(Subscription::new(shared, registry))
    }

    /// Counters of every live subscription.
    pub fn subscriptions(&self) -> Vec<SubscriptionStats> {
        self.inner
            .subscriptions
            .read()
            .iter()
            .map(|shared| shared.stats())
            .collect()
    }

    /// Becomes the one handler of command `C`, with an inbox of `capacity` commands.
    ///
    /// Fails with [`BusError::HandlerAlreadyRegistered`] while another inbox for `C` lives.
    pub fn handle_commands<C: Command>(
        &self,
        capacity: usize,
    ) -> Result<CommandInbox<C>, BusError> {
        self.inner
            .register_command::<C>(capacity, Arc::downgrade(&self.inner))
    }

    /// Sends `command` to its handler and waits for the reply, first waiting for room in the
    /// handler's inbox if it is full. Wrap it in a timeout, or use [`Bus::try_send`] to shed
    /// load instead of waiting.
    pub async fn send<C: Command>(&self, command: C) -> Result<C::Reply, BusError> {
        let sender = self.inner.command_sender::<C>()?;
        let (request, reply) = command::request(command, current_trace());
        sender
            .send(request)
            .await
            .map_err(|_| BusError::NoHandler { command: C::NAME })?;
        reply.await
    }

    /// Queues `command` if the handler's inbox has room, failing at once with
    /// [`BusError::InboxFull`] otherwise; the reply is awaited separately.
    pub fn try_send<C: Command>(&self, command: C) -> Result<PendingReply<C::Reply>, BusError> {
        let sender = self.inner.command_sender::<C>()?;
        let (request, reply) = command::request(command, current_trace());
        match sender.try_send(request) {
            Ok(()) => Ok(reply),
            Err(TrySendError::Full(_)) => Err(BusError::InboxFull {
                command: C::NAME,
                capacity: sender.max_capacity(),
            }),
            Err(TrySendError::Closed(_)) => Err(BusError::NoHandler { command: C::NAME }),
        }
    }

    /// Adds a handler of query `Q`, with an inbox of `capacity` queries. Any number may answer.
    pub fn answer_queries<Q: Query>(&self, capacity: usize) -> Result<QueryInbox<Q>, BusError> {
        self.inner
            .register_query::<Q>(capacity, Arc::downgrade(&self.inner))
    }

    /// Asks every handler of `Q` and gathers replies until all have answered or `timeout` has
    /// passed. Handlers whose inbox is full are skipped and counted as busy rather than waited
    /// for. With no handler the result is empty at once.
    pub async fn query<Q: Query>(
        &self,
        query: Q,
        timeout: Duration,
    ) -> Result<QueryReplies<Q::Reply>, BusError> {
        let deadline = Instant::now() + timeout;
        let senders = self.inner.query_senders::<Q>()?;
        let trace = current_trace();
        let mut pending = FuturesUnordered::new();
        let mut busy = 0;
        for sender in senders {
            let (request, reply) = query::request(query.clone(), trace);
            match sender.try_send(request) {
                Ok(()) => pending.push(reply),
                Err(TrySendError::Full(_)) => busy += 1,
                // The handler went away after we looked it up; it is no longer registered.
                Err(TrySendError::Closed(_)) => {}
            }
        }
        let asked = pending.len();
        let mut replies = Vec::with_capacity(asked);
        let mut unanswered = 0;
        loop {
            match tokio::time::timeout_at(deadline, pending.next()).await {
                Ok(Some(Ok(reply))) => replies.push(reply),
                Ok(Some(Err(_dropped))) => unanswered += 1,
                Ok(None) => break,
                Err(_elapsed) => {
                    unanswered += pending.len();
                    break;
                }
            }
        }
        Ok(QueryReplies {
            replies,
            asked,
            busy,
            unanswered,
        })
    }
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bus")
            .field("subscriptions", &self.inner.subscriptions.read().len())
            .field("commands", &self.inner.commands.read().len())
            .field("queries", &self.inner.queries.read().len())
            .finish()
    }
}
