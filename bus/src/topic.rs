use std::fmt;

use crate::BusError;

/// Longest topic or pattern accepted, in bytes.
pub const MAX_TOPIC_LEN: usize = 256;
/// Most segments a topic or pattern may have.
pub const MAX_SEGMENTS: usize = 32;

/// A validated event topic: dot-separated, non-empty segments such as `jobs.42.state`.
///
/// A segment holds no `.`, `*`, `>`, whitespace or control character.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Topic(String);

impl Topic {
    /// Checks `topic` and keeps it.
    pub fn parse(topic: &str) -> Result<Self, BusError> {
        validate_topic(topic)?;
        Ok(Self(topic.to_owned()))
    }

    /// The topic as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The topic's segments in order.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('.')
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub(crate) fn validate_topic(topic: &str) -> Result<(), BusError> {
    let fail = |reason| {
        Err(BusError::InvalidTopic {
            topic: topic.to_owned(),
            reason,
        })
    };
    if let Some(reason) = shape_problem(topic) {
        return fail(reason);
    }
    for segment in topic.split('.') {
        if segment.contains(['*', '>']) {
            return fail("wildcards `*` and `>` belong in subscription patterns, not in topics");
        }
        if let Some(reason) = segment_problem(segment) {
            return fail(reason);
        }
    }
    Ok(())
}

fn shape_problem(text: &str) -> Option<&'static str> {
    if text.is_empty() {
        Some("it is empty")
    } else if text.len() > MAX_TOPIC_LEN {
        Some("it is longer than 256 bytes")
    } else if text.split('.').count() > MAX_SEGMENTS {
        Some("it has more than 32 segments")
    } else {
        None
    }
}

fn segment_problem(segment: &str) -> Option<&'static str> {
    if segment.is_empty() {
        Some("it has an empty segment (leading, trailing or doubled `.`)")
    } else if segment.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("it contains whitespace or a control character")
    } else {
        None
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `*`: exactly one segment.
    One,
    /// `>`: one or more trailing segments.
    Rest,
}

/// A validated subscription pattern: a topic whose segments may also be `*` (exactly one
/// segment) or, as the last segment only, `>` (one or more segments).
///
/// `jobs.*.state` matches `jobs.42.state` but not `jobs.42.state.old`; `models.>` matches
/// `models.a` and `models.a.loaded` but not `models`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    raw: String,
    segments: Vec<Segment>,
}

impl Pattern {
    /// Checks `pattern` and compiles it.
    pub fn parse(pattern: &str) -> Result<Self, BusError> {
        let fail = |reason| {
            Err(BusError::InvalidPattern {
                pattern: pattern.to_owned(),
                reason,
            })
        };
        if let Some(reason) = shape_problem(pattern) {
            return fail(reason);
        }
        let count = pattern.split('.').count();
        let mut segments = Vec::with_capacity(count);
        for (index, segment) in pattern.split('.').enumerate() {
            let compiled = match segment {
                "*" => Segment::One,
                ">" if index + 1 == count => Segment::Rest,
                ">" => return fail("`>` may only be the last segment"),
                s if s.contains(['*', '>']) => {
                    return fail("`*` and `>` must stand alone as a whole segment");
                }
                s => {
                    if let Some(reason) = segment_problem(s) {
                        return fail(reason);
                    }
                    Segment::Literal(s.to_owned())
                }
            };
            segments.push(compiled);
        }
        Ok(Self {
            raw: pattern.to_owned(),
            segments,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// Whether `topic` matches. `topic` is taken as a valid topic; an invalid one may match a
    /// wildcard but never a literal segment it lacks.
    pub fn matches(&self, topic: &str) -> bool {
        let mut parts = topic.split('.');
        for segment in &self.segments {
            match segment {
                Segment::Rest => return parts.next().is_some(),
                Segment::One => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Segment::Literal(literal) => {
                    if parts.next() != Some(literal.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_matching_table() {
        let table: &[(&str, &str, bool)] = &[
            ("jobs.42.state", "jobs.42.state", true),
            ("jobs.42.state", "jobs.43.state", false),
            ("jobs.*.state", "jobs.42.state", true),
            ("jobs.*.state", "jobs.42.progress", false),
            ("jobs.*.state", "jobs.state", false),
            ("jobs.*.state", "jobs.42.state.old", false),
            ("jobs.*.state", "jobs.1.2.state", false),
            ("*", "jobs", true),
            ("*", "jobs.42", false),
            ("*.*", "jobs.42", true),
            ("models.>", "models.a", true),
            ("models.>", "models.a.loaded", true),
            ("models.>", "models", false),
            ("models.>", "modelsx.a", false),
            ("models.>", "jobs.a", false),
            (">", "anything", true),
            (">", "any.thing.at.all", true),
            ("*.state.>", "jobs.state.queued.now", true),
            ("*.state.>", "jobs.state", false),
            ("jobs", "jobs.42", false),
            ("jobs.42", "jobs", false),
        ];
        for &(pattern, topic, expected) in table {
            let compiled = Pattern::parse(pattern).expect("table patterns are valid");
            Topic::parse(topic).expect("table topics are valid");
            assert_eq!(
                compiled.matches(topic),
                expected,
                "pattern {pattern:?} against topic {topic:?}"
            );
        }
    }

    #[test]
    fn invalid_topics_are_rejected_with_a_reason() {
        let long = "a.".repeat(40) + "a";
        let too_long = "a".repeat(MAX_TOPIC_LEN + 1);
        for bad in [
            "",
            ".jobs",
            "jobs.",
            "jobs..state",
            "jobs.*.state",
            "models.>",
            "jo*bs",
            "jobs.4 2",
            "jobs.\n",
            long.as_str(),
            too_long.as_str(),
        ] {
            match Topic::parse(bad) {
                Err(BusError::InvalidTopic { topic, reason }) => {
                    assert_eq!(topic, bad);
                    assert!(!reason.is_empty());
                }
                other => panic!("topic {bad:?} should be rejected, got {other:?}"),
            }
        }
        for good in [
            "jobs",
            "jobs.42.state",
            "models.all-MiniLM-L6-v2.loaded",
            "a_b:c",
        ] {
            assert!(Topic::parse(good).is_ok(), "{good:?} is a valid topic");
        }
    }

    #[test]
    fn invalid_patterns_are_rejected_with_a_reason() {
        for bad in [
            "",
            "jobs.>.state",
            "jobs.a*",
            "jobs.>x",
            "jobs..x",
            ". ",
            "*.",
        ] {
            match Pattern::parse(bad) {
                Err(BusError::InvalidPattern { pattern, reason }) => {
                    assert_eq!(pattern, bad);
                    assert!(!reason.is_empty());
                }
                other => panic!("pattern {bad:?} should be rejected, got {other:?}"),
            }
        }
        let message = Pattern::parse("jobs.>.state")
            .expect_err("`>` in the middle is invalid")
            .to_string();
        assert!(message.contains("last segment"), "{message}");
    }
}

/// A name (a model's, a job's) as one topic segment: the characters a segment cannot hold
/// (`.`, the wildcards `*` and `>`, whitespace, control characters) become `_`.
pub fn topic_segment(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c == '.' || c == '*' || c == '>' || c.is_whitespace() || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod segment_tests {
    use super::{Topic, topic_segment};

    #[test]
    fn any_name_becomes_one_valid_segment() {
        for name in [
            "minilm",
            "a.b",
            "x*y>z",
            "with space",
            "tab\tand\u{7}bell",
            "",
        ] {
            let segment = topic_segment(name);
            assert!(!segment.contains('.'), "{segment}");
            if !name.is_empty() {
                let topic = format!("models.{segment}.state");
                assert_eq!(
                    Topic::parse(&topic).unwrap().segments().count(),
                    3,
                    "{topic}"
                );
            }
        }
        assert_eq!(topic_segment("a.b*c"), "a_b_c");
    }
}
