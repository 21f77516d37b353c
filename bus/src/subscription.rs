use std::collections::VecDeque;
use std::fmt;
use std::pin::pin;
use std::sync::{Arc, Weak};

use futures::Stream;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::{Event, Pattern, SubscribeOptions, WhenFull};

/// Identifies a subscription for as long as the bus lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SubscriptionId(pub(crate) u64);

impl fmt::Display for SubscriptionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sub-{}", self.0)
    }
}

/// One received event, and how many events this subscription lost just before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The event.
    pub event: Event,
    /// Events lost to [`WhenFull::DropOldest`] or [`WhenFull::Reject`] between the previous
    /// delivery and this one.
    pub missed_before: u64,
}

/// Counters of one subscription, for metrics and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionStats {
    /// The subscription.
    pub id: SubscriptionId,
    /// Its pattern.
    pub pattern: String,
    /// Its label, if given.
    pub name: Option<String>,
    /// Its policy when full.
    pub when_full: WhenFull,
    /// Its queue bound.
    pub capacity: usize,
    /// Events now queued.
    pub queued: usize,
    /// Events put in its queue.
    pub delivered: u64,
    /// Events the subscriber has taken out.
    pub received: u64,
    /// Events pushed out of the full queue by newer ones ([`WhenFull::DropOldest`]).
    pub lagged: u64,
    /// Events not queued because the queue was full ([`WhenFull::Reject`]).
    pub dropped: u64,
    /// Publishes that had to wait for room ([`WhenFull::Block`]).
    pub blocked: u64,
}

struct Entry {
    event: Arc<Event>,
    missed_before: u64,
}

struct State {
    queue: VecDeque<Entry>,
    /// Events lost after the last queued entry; charged to the next one queued.
    missed_at_tail: u64,
    closed: bool,
    delivered: u64,
    received: u64,
    lagged: u64,
    dropped: u64,
    blocked: u64,
}

/// What one publish did to one subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Queued,
    /// Queued, after dropping the oldest queued event.
    QueuedDroppingOldest,
    Rejected,
    Closed,
}

/// A subscription's own test of an event its pattern matched (see [`crate::Bus::subscribe_where`]).
pub(crate) type Accept = Box<dyn Fn(&Event) -> bool + Send + Sync>;

/// The queue shared by a subscription and the bus's publishers.
pub(crate) struct Shared {
    pub(crate) id: SubscriptionId,
    pub(crate) pattern: Pattern,
    accept: Option<Accept>,
    options: SubscribeOptions,
    state: Mutex<State>,
    readable: Notify,
    writable: Notify,
}

impl Shared {
    pub(crate) fn new(
        id: SubscriptionId,
        pattern: Pattern,
        accept: Option<Accept>,
        options: SubscribeOptions,
    ) -> Self {
        Self {
            id,
            pattern,
            accept,
            state: Mutex::new(State {
                queue: VecDeque::with_capacity(options.capacity.min(1024)),
                missed_at_tail: 0,
                closed: false,
                delivered: 0,
                received: 0,
                lagged: 0,
                dropped: 0,
                blocked: 0,
            }),
            options,
            readable: Notify::new(),
            writable: Notify::new(),
        }
    }

    /// Whether this subscription takes `event`: its pattern matches the topic and its own test,
    /// if any, passes.
    pub(crate) fn wants(&self, event: &Event) -> bool {
        self.pattern.matches(&event.topic)
            && self.accept.as_ref().is_none_or(|accept| accept(event))
    }

    pub(crate) async fn offer(&self, event: &Arc<Event>) -> Outcome {
        match self.options.when_full {
            WhenFull::Block => self.offer_waiting(event).await,
            WhenFull::DropOldest | WhenFull::Reject => self.offer_now(event),
        }
    }

    fn offer_now(&self, event: &Arc<Event>) -> Outcome {
        let mut state = self.state.lock();
        if state.closed {
            return Outcome::Closed;
        }
        let mut outcome = Outcome::Queued;
        if state.queue.len() >= self.options.capacity {
            if self.options.when_full == WhenFull::Reject {
                state.dropped += 1;
                state.missed_at_tail += 1;
                return Outcome::Rejected;
            }
            let oldest = state.queue.pop_front();
            let lost = oldest.map_or(0, |entry| entry.missed_before + 1);
            match state.queue.front_mut() {
                Some(next) => next.missed_before += lost,
                None => state.missed_at_tail += lost,
            }
            state.lagged += 1;
            outcome = Outcome::QueuedDroppingOldest;
        }
        Self::push(&mut state, event);
        drop(state);
        self.readable.notify_one();
        outcome
    }

    async fn offer_waiting(&self, event: &Arc<Event>) -> Outcome {
        let mut waited = false;
        loop {
            // Registered before looking at the queue, so a receiver making room in between
            // still wakes us.
            let mut room = pin!(self.writable.notified());
            room.as_mut().enable();
            {
                let mut state = self.state.lock();
                if state.closed {
                    return Outcome::Closed;
                }
                if state.queue.len() < self.options.capacity {
                    Self::push(&mut state, event);
                    drop(state);
                    self.readable.notify_one();
                    return Outcome::Queued;
                }
                if !waited {
                    waited = true;
                    state.blocked += 1;
                }
            }
            room.await;
        }
    }

    fn push(state: &mut State, event: &Arc<Event>) {
        let missed_before = std::mem::take(&mut state.missed_at_tail);
        state.queue.push_back(Entry {
            event: Arc::clone(event),
            missed_before,
        });
        state.delivered += 1;
    }

    fn take(&self) -> Result<Option<Entry>, Closed> {
        let mut state = self.state.lock();
        match state.queue.pop_front() {
            Some(entry) => {
                state.received += 1;
                drop(state);
                self.writable.notify_waiters();
                Ok(Some(entry))
            }
            None if state.closed => Err(Closed),
            None => Ok(None),
        }
    }

    pub(crate) fn close(&self) {
        self.state.lock().closed = true;
        self.readable.notify_one();
        self.writable.notify_waiters();
    }

    pub(crate) fn stats(&self) -> SubscriptionStats {
        let state = self.state.lock();
        SubscriptionStats {
            id: self.id,
            pattern: self.pattern.as_str().to_owned(),
            name: self.options.name.clone(),
            when_full: self.options.when_full,
            capacity: self.options.capacity,
            queued: state.queue.len(),
            delivered: state.delivered,
            received: state.received,
            lagged: state.lagged,
            dropped: state.dropped,
            blocked: state.blocked,
        }
    }
}

struct Closed;

/// Whom a subscription tells that it is gone (the bus's registry). A trait, so that this module
/// does not depend on the registry, which holds the subscriptions.
pub(crate) trait Unsubscribe: Send + Sync {
    fn remove_subscription(&self, id: SubscriptionId);
}

/// A stream of the events matching one pattern, queued under its [`WhenFull`] policy.
///
/// Dropping it unsubscribes and releases publishers waiting on it.
pub struct Subscription {
    shared: Arc<Shared>,
    bus: Weak<dyn Unsubscribe>,
}

impl Subscription {
    pub(crate) fn new(shared: Arc<Shared>, bus: Weak<dyn Unsubscribe>) -> Self {
        Self { shared, bus }
    }

    /// This subscription's id.
    pub fn id(&self) -> SubscriptionId {
        self.shared.id
    }

    /// The pattern it matches.
    pub fn pattern(&self) -> &Pattern {
        &self.shared.pattern
    }

    /// The next event; `None` once the bus is gone and the queue is drained.
    pub async fn recv(&mut self) -> Option<Event> {
        self.recv_delivery().await.map(|delivery| delivery.event)
    }

    /// The next event with the count of events lost just before it.
    pub async fn recv_delivery(&mut self) -> Option<Delivery> {
        loop {
            match self.shared.take() {
                Ok(Some(entry)) => return Some(Self::delivery(entry)),
                Err(Closed) => return None,
                Ok(None) => self.shared.readable.notified().await,
            }
        }
    }

    /// The next event if one is queued now.
    pub fn try_recv(&mut self) -> Option<Delivery> {
        match self.shared.take() {
            Ok(Some(entry)) => Some(Self::delivery(entry)),
            Ok(None) | Err(Closed) => None,
        }
    }

    /// This subscription's counters.
    pub fn stats(&self) -> SubscriptionStats {
        self.shared.stats()
    }

    /// The queue itself, for a holder that reads its counters while another task receives.
    #[cfg(feature = "nats")]
    pub(crate) fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    /// The subscription as a [`Stream`] of events.
    pub fn into_stream(self) -> impl Stream<Item = Event> + Send + 'static {
        futures::stream::unfold(self, |mut subscription| async move {
            let event = subscription.recv().await?;
            Some((event, subscription))
        })
    }

    fn delivery(entry: Entry) -> Delivery {
        Delivery {
            event: Arc::unwrap_or_clone(entry.event),
            missed_before: entry.missed_before,
        }
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.shared.id)
            .field("pattern", &self.shared.pattern.as_str())
            .finish()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.shared.close();
        if let Some(bus) = self.bus.upgrade() {
            bus.remove_subscription(self.shared.id);
        }
    }
}
