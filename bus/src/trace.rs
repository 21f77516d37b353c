use std::fmt;
use std::future::Future;

use crate::BusError;

tokio::task_local! {
    static CURRENT: TraceParent;
}

/// A W3C trace context (`traceparent` header, version `00`): which trace an event or a request
/// belongs to, and which span caused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    trace_id: [u8; 16],
    parent_id: [u8; 8],
    flags: u8,
}

impl TraceParent {
    /// Builds a context from ids. All-zero ids are invalid in W3C trace context.
    pub fn new(trace_id: [u8; 16], parent_id: [u8; 8], sampled: bool) -> Result<Self, BusError> {
        let value = || Self::format_parts(&trace_id, &parent_id, u8::from(sampled));
        if trace_id == [0; 16] {
            return Err(BusError::InvalidTraceparent {
                value: value(),
                reason: "the trace id is all zeros",
            });
        }
        if parent_id == [0; 8] {
            return Err(BusError::InvalidTraceparent {
                value: value(),
                reason: "the parent id is all zeros",
            });
        }
        Ok(Self {
            trace_id,
            parent_id,
            flags: u8::from(sampled),
        })
    }

    /// Parses a `traceparent` header value.
    ///
    /// Versions above `00` are accepted when their first four fields have the `00` shape, as the
    /// W3C spec asks of parsers; the context is then kept as version `00`.
    pub fn parse(value: &str) -> Result<Self, BusError> {
        let fail = |reason| {
            Err(BusError::InvalidTraceparent {
                value: value.to_owned(),
                reason,
            })
        };
        let mut fields = value.split('-');
        let (Some(version), Some(trace), Some(parent), Some(flags)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return fail("it does not have four `-`-separated fields");
        };
        let Some(version) = decode_hex::<1>(version) else {
            return fail("the version is not two lowercase hex digits");
        };
        match version[0] {
            0xff => return fail("version ff is forbidden"),
            0x00 if fields.next().is_some() => return fail("version 00 has exactly four fields"),
            _ => {}
        }
        let Some(trace_id) = decode_hex::<16>(trace) else {
            return fail("the trace id is not 32 lowercase hex digits");
        };
        let Some(parent_id) = decode_hex::<8>(parent) else {
            return fail("the parent id is not 16 lowercase hex digits");
        };
        let Some(flags) = decode_hex::<1>(flags) else {
            return fail("the flags are not two lowercase hex digits");
        };
        if trace_id == [0; 16] {
            return fail("the trace id is all zeros");
        }
        if parent_id == [0; 8] {
            return fail("the parent id is all zeros");
        }
        Ok(Self {
            trace_id,
            parent_id,
            flags: flags[0],
        })
    }

    /// The 16-byte trace id.
    pub fn trace_id(&self) -> [u8; 16] {
        self.trace_id
    }

    /// The 8-byte id of the span that caused this.
    pub fn parent_id(&self) -> [u8; 8] {
        self.parent_id
    }

    /// Whether the caller sampled (records) this trace.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The same trace, caused by another span.
    pub fn child(&self, parent_id: [u8; 8]) -> Result<Self, BusError> {
        Self::new(self.trace_id, parent_id, self.sampled())
    }

    fn format_parts(trace_id: &[u8], parent_id: &[u8], flags: u8) -> String {
        let mut out = String::with_capacity(55);
        out.push_str("00-");
        push_hex(&mut out, trace_id);
        out.push('-');
        push_hex(&mut out, parent_id);
        out.push('-');
        push_hex(&mut out, &[flags]);
        out
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&Self::format_parts(
            &self.trace_id,
            &self.parent_id,
            self.flags,
        ))
    }
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
}

fn decode_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    let bytes = text.as_bytes();
    if bytes.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (slot, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *slot = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

/// Runs `future` with `trace` as the current trace context: events it publishes without a
/// context of their own, and commands and queries it sends, carry `trace`.
pub async fn with_trace<F: Future>(trace: TraceParent, future: F) -> F::Output {
    CURRENT.scope(trace, future).await
}

/// The trace context set by [`with_trace`] around the running task, if any.
pub fn current_trace() -> Option<TraceParent> {
    CURRENT.try_with(|trace| *trace).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn round_trips_the_w3c_example() {
        let parsed = TraceParent::parse(SAMPLE).expect("the W3C example is valid");
        assert!(parsed.sampled());
        assert_eq!(
            parsed.parent_id(),
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert_eq!(parsed.to_string(), SAMPLE);
        let built = TraceParent::new(parsed.trace_id(), parsed.parent_id(), true)
            .expect("non-zero ids are valid");
        assert_eq!(built, parsed);
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(
                matches!(
                    TraceParent::parse(bad),
                    Err(BusError::InvalidTraceparent { .. })
                ),
                "{bad:?} should be rejected"
            );
        }
        let future = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future";
        assert!(TraceParent::parse(future).is_ok());
    }

    #[tokio::test]
    async fn the_current_context_is_scoped_to_the_future() {
        let trace = TraceParent::parse(SAMPLE).expect("valid");
        assert_eq!(current_trace(), None);
        let inside = with_trace(trace, async { current_trace() }).await;
        assert_eq!(inside, Some(trace));
        assert_eq!(current_trace(), None);
    }
}
