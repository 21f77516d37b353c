use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;

use crate::{BusError, Topic, TraceParent};

/// Something that happened, published on a topic.
///
/// It is a protobuf message (field numbers fixed below) so that bridges to external brokers can
/// carry it unchanged: [`Event::to_protobuf`] and [`Event::from_protobuf`].
#[derive(Clone, PartialEq, Eq, Message)]
pub struct Event {
    /// Dot-separated topic, e.g. `jobs.42.state`.
    #[prost(string, tag = "1")]
    pub topic: String,
    /// When it happened, in milliseconds since the Unix epoch.
    #[prost(uint64, tag = "2")]
    pub time_ms: u64,
    /// What happened, for people.
    #[prost(string, tag = "3")]
    pub message: String,
    /// What happened, for programs.
    #[prost(btree_map = "string, string", tag = "4")]
    pub attributes: BTreeMap<String, String>,
    /// W3C trace context of the cause; empty when unknown.
    #[prost(string, tag = "5")]
    pub traceparent: String,
}

impl Event {
    /// An event on `topic` stamped with the current time. The topic is checked at publish time.
    pub fn new(topic: impl Into<String>, message: impl Into<String>) -> Self {
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| {
                u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
            });
        Self {
            topic: topic.into(),
            time_ms,
            message: message.into(),
            attributes: BTreeMap::new(),
            traceparent: String::new(),
        }
    }

    /// Adds one attribute.
    pub fn with_attribute(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.insert(key.into(), value.into());
        self
    }

    /// Sets the trace context of the cause.
    pub fn with_trace(mut self, trace: TraceParent) -> Self {
        self.traceparent = trace.to_string();
        self
    }

    /// The trace context, if the event has a valid one.
    pub fn trace(&self) -> Option<TraceParent> {
        TraceParent::parse(&self.traceparent).ok()
    }

    /// The protobuf encoding.
    pub fn to_protobuf(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    /// Decodes and checks an event from a protobuf encoding (e.g. from an external broker).
    pub fn from_protobuf(bytes: &[u8]) -> Result<Self, BusError> {
        let event = Self::decode(bytes).map_err(|error| BusError::Decode {
            reason: error.to_string(),
        })?;
        event.validate()?;
        Ok(event)
    }

    pub(crate) fn validate(&self) -> Result<(), BusError> {
        Topic::parse(&self.topic)?;
        if !self.traceparent.is_empty() {
            TraceParent::parse(&self.traceparent)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protobuf_round_trip_keeps_every_field() {
        let trace = TraceParent::new([7; 16], [9; 8], true).expect("non-zero ids");
        let event = Event::new("jobs.42.state", "job 42 is running")
            .with_attribute("state", "running")
            .with_attribute("queue", "default")
            .with_trace(trace);
        let bytes = event.to_protobuf();
        let back = Event::from_protobuf(&bytes).expect("our own encoding decodes");
        assert_eq!(back, event);
        assert_eq!(back.trace(), Some(trace));
        assert_eq!(
            back.attributes.get("queue").map(String::as_str),
            Some("default")
        );
    }

    #[test]
    fn the_wire_format_uses_the_documented_field_numbers() {
        let mut event = Event::new("a", "");
        event.time_ms = 1;
        // field 1 (string) "a", then field 2 (varint) 1
        assert_eq!(event.to_protobuf(), vec![0x0a, 0x01, b'a', 0x10, 0x01]);
    }

    #[test]
    fn decoding_rejects_garbage_and_bad_topics() {
        assert!(matches!(
            Event::from_protobuf(&[0x0a, 0x05, b'a']),
            Err(BusError::Decode { .. })
        ));
        let bad = Event::new("jobs..state", "").to_protobuf();
        assert!(matches!(
            Event::from_protobuf(&bad),
            Err(BusError::InvalidTopic { .. })
        ));
    }
}
