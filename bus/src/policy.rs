use crate::BusError;

/// What happens to an event published to a subscription whose queue is full.
///
/// Chosen per subscription, so one slow consumer's policy decides its own fate and nobody else's
/// (except under [`WhenFull::Block`], which is the point of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WhenFull {
    /// The publisher waits until the subscriber makes room. Nothing is lost; a slow subscriber
    /// slows every publisher of its topics. For consumers that must see everything (the job
    /// store's watchers). A dropped subscription releases waiting publishers.
    Block,
    /// The oldest queued event is dropped to make room for the new one: the subscriber keeps the
    /// newest events and learns how many it missed ([`crate::Delivery::missed_before`], the
    /// `lagged` counter). For state feeds where only the latest matters (dashboards, GPU usage).
    DropOldest,
    /// The new event is dropped for this subscriber only and counted (`dropped` counter); the
    /// publish reports the subscription as full. For consumers that prefer a gap to a stall.
    Reject,
}

/// How a subscription queues: its bound and its policy when full. Neither has a default, so
/// every subscriber states both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeOptions {
    pub(crate) capacity: usize,
    pub(crate) when_full: WhenFull,
    pub(crate) name: Option<String>,
}

impl SubscribeOptions {
    /// At most `capacity` events queued (at least 1), handled by `when_full` beyond that.
    pub fn new(capacity: usize, when_full: WhenFull) -> Self {
        Self {
            capacity,
            when_full,
            name: None,
        }
    }

    /// A label shown in [`crate::SubscriptionStats`], to tell subscriptions apart in metrics.
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The queue bound.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The policy when full.
    pub fn when_full(&self) -> WhenFull {
        self.when_full
    }

    pub(crate) fn validate(&self) -> Result<(), BusError> {
        if self.capacity == 0 {
            return Err(BusError::ZeroCapacity {
                what: "a subscription queue",
            });
        }
        Ok(())
    }
}
