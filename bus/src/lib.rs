//! In-process messaging between Veraltheim's components: commands, events and queries.
//!
//! - **Commands** ([`Command`]) go to exactly one handler and get one reply. Registering a second
//!   handler for the same command is an error; sending to a command nobody handles is an error.
//! - **Events** ([`Event`]) fan out to every subscription whose pattern matches the event's
//!   dot-separated topic (`*` matches one segment, `>` one or more trailing segments).
//! - **Queries** ([`Query`]) go to every handler that answers them; the asker gathers the replies
//!   until all have answered or a timeout passes.
//!
//! Invariants: every queue is bounded, and what happens when one is full is a named policy
//! ([`WhenFull`]) chosen per subscription, never an accident of the channel type. Events carry the
//! W3C trace context of their cause. This crate knows nothing of models, gRPC or configuration
//! files; bridges to external brokers use the protobuf encoding of [`Event`]: the one to NATS
//! JetStream (feature `nats`) is `nats::NatsBridge`.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod bus;
mod command;
mod error;
mod event;
#[cfg(feature = "nats")]
pub mod nats;
mod policy;
mod query;
mod registry;
mod subscription;
mod topic;
mod trace;

pub use bus::{Bus, PublishReport};
pub use command::{Command, CommandInbox, CommandRequest, PendingReply, Responder};
pub use error::BusError;
pub use event::Event;
pub use policy::{SubscribeOptions, WhenFull};
pub use query::{Query, QueryInbox, QueryReplies, QueryRequest};
pub use subscription::{Delivery, Subscription, SubscriptionId, SubscriptionStats};
pub use topic::{Pattern, Topic, topic_segment};
pub use trace::{TraceParent, current_trace, with_trace};
