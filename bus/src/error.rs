use thiserror::Error;

/// Everything that can go wrong on the bus, each with what the caller can do about it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BusError {
    /// A published topic is malformed.
    #[error("invalid topic {topic:?}: {reason}")]
    InvalidTopic {
        /// The topic as given.
        topic: String,
        /// What rule it breaks.
        reason: &'static str,
    },
    /// A subscription pattern is malformed.
    #[error("invalid subscription pattern {pattern:?}: {reason}")]
    InvalidPattern {
        /// The pattern as given.
        pattern: String,
        /// What rule it breaks.
        reason: &'static str,
    },
    /// A trace context is not in W3C `traceparent` form.
    #[error(
        "invalid traceparent {value:?}: {reason} \
         (expected 00-<32 lowercase hex trace id>-<16 lowercase hex span id>-<2 hex flags>)"
    )]
    InvalidTraceparent {
        /// The value as given.
        value: String,
        /// What rule it breaks.
        reason: &'static str,
    },
    /// A queue was asked to hold nothing.
    #[error("the capacity of {what} must be at least 1")]
    ZeroCapacity {
        /// Which queue.
        what: &'static str,
    },
    /// A command already has its one handler.
    #[error("command {command:?} already has a handler; a command is served by exactly one")]
    HandlerAlreadyRegistered {
        /// The command's name.
        command: &'static str,
    },
    /// Nobody handles this command (never registered, or its handler stopped).
    #[error("no handler is registered for command {command:?}")]
    NoHandler {
        /// The command's name.
        command: &'static str,
    },
    /// Two different Rust types use the same command or query name.
    #[error(
        "{name:?} is registered with a different Rust type; give each command and query type its own NAME"
    )]
    TypeMismatch {
        /// The shared name.
        name: &'static str,
    },
    /// The handler's inbox is full; the command was not queued.
    #[error("the inbox of command {command:?} is full ({capacity} pending); retry later")]
    InboxFull {
        /// The command's name.
        command: &'static str,
        /// The inbox's capacity.
        capacity: usize,
    },
    /// The handler took the command but dropped it without replying.
    #[error("the handler of command {command:?} stopped without replying")]
    HandlerDropped {
        /// The command's name.
        command: &'static str,
    },
    /// Bytes from outside are not a valid protobuf [`crate::Event`].
    #[error("cannot decode an event: {reason}")]
    Decode {
        /// Why.
        reason: String,
    },
}
