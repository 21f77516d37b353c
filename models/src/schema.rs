//! The schema of a model configuration: Triton's `inference.ModelConfig`, compiled from the
//! `proto` crate's `protos/inference/model_config.proto` by this crate's `build.rs`, plus the two
//! fields of Veraltheim's own ([`OWN_FIELDS`]).
//!
//! Rules:
//! - A configuration in JSON (a `config.json` file, or the override of a load) is checked against
//!   the schema *at every depth* before it is read: a field Triton does not define, anywhere,
//!   is refused naming its path (`dynamic_batching.max_queue_delay_micros`) with a "did you mean"
//!   hint. A misspelt field silently ignored would serve a model configured otherwise than asked.
//! - Both spellings of protobuf's JSON mapping are accepted (`max_batch_size`, `maxBatchSize`).
//! - Triton fields that Veraltheim does not use are accepted (and ignored), so that Triton's
//!   configurations keep loading.
//! - Values are not checked here (types and ranges are the `config` module's and the limits' work);
//!   a value of the wrong JSON type is skipped by this walk and refused by the typed read.
//! - Map keys are free (`parameters`, `metric_tags`); the map's *values* are checked when they are
//!   messages.
//!
//! Hand-written walk rather than `prost_reflect`'s own JSON deserialiser with
//! `deny_unknown_fields`: that one stops at the first error without the field's path, and refuses
//! our own top-level fields.

use std::sync::OnceLock;

use prost_reflect::{DescriptorPool, Kind, MessageDescriptor};
use serde_json::{Map, Value};

use crate::error::Error;

/// The compiled descriptor set of `inference/model_config.proto` (a `FileDescriptorSet`).
pub(crate) const MODEL_CONFIG_DESCRIPTOR: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/model_config.bin"));

/// Top-level fields that are Veraltheim's, not Triton's.
pub const OWN_FIELDS: &[&str] = &["pinned", "load_on_demand"];

/// `inference.ModelConfig`, decoded once.
pub fn model_config() -> Result<MessageDescriptor, Error> {
    static DESCRIPTOR: OnceLock<Result<MessageDescriptor, String>> = OnceLock::new();
    DESCRIPTOR
        .get_or_init(|| {
            let pool = DescriptorPool::decode(MODEL_CONFIG_DESCRIPTOR)
                .map_err(|e| format!("the model config descriptors do not decode: {e}"))?;
            pool.get_message_by_name("inference.ModelConfig")
                .ok_or_else(|| "inference.ModelConfig is not among the descriptors".to_string())
        })
        .clone()
        .map_err(|e| Error::ConfigJson(format!("internal: {e}")))
}

/// Checks every field name of a JSON model configuration against the schema (rules above).
pub fn check_fields(config: &Value) -> Result<(), Error> {
    let Value::Object(map) = config else {
        return Ok(());
    };
    let root = model_config()?;
    let triton: Map<String, Value> = map
        .iter()
        .filter(|(k, _)| !OWN_FIELDS.contains(&snake_case(k).as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    walk(&root, &triton, "")
}

fn walk(message: &MessageDescriptor, map: &Map<String, Value>, path: &str) -> Result<(), Error> {
    for (key, value) in map {
        let Some(field) = message
            .get_field_by_name(key)
            .or_else(|| message.get_field_by_json_name(key))
        else {
            return Err(unknown(message, key, path));
        };
        let here = if path.is_empty() {
            field.name().to_string()
        } else {
            format!("{path}.{}", field.name())
        };
        let Kind::Message(inner) = field.kind() else {
            continue;
        };
        if field.is_map() {
            let Kind::Message(values) = inner.map_entry_value_field().kind() else {
                continue;
            };
            if let Value::Object(entries) = value {
                for (k, v) in entries {
                    if let Value::Object(m) = v {
                        walk(&values, m, &format!("{here}[{k}]"))?;
                    }
                }
            }
        } else if field.is_list() {
            if let Value::Array(items) = value {
                for (i, v) in items.iter().enumerate() {
                    if let Value::Object(m) = v {
                        walk(&inner, m, &format!("{here}[{i}]"))?;
                    }
                }
            }
        } else if let Value::Object(m) = value {
            walk(&inner, m, &here)?;
        }
    }
    Ok(())
}

fn unknown(message: &MessageDescriptor, key: &str, path: &str) -> Error {
    let snake = snake_case(key);
    let mut names: Vec<String> = message.fields().map(|f| f.name().to_string()).collect();
    if path.is_empty() {
        names.extend(OWN_FIELDS.iter().map(|s| s.to_string()));
    }
    // Close in spelling, or the same word cut short (`max_queue_delay_micros`).
    let hint = names
        .iter()
        .map(|n| (edit_distance(n, &snake), n))
        .filter(|(d, n)| *d <= 2 || (snake.len() >= 6 && n.starts_with(snake.as_str())))
        .min()
        .map(|(_, n)| format!(" (did you mean '{n}'?)"))
        .unwrap_or_default();
    let full = if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    };
    Error::ConfigJson(format!(
        "unknown field '{full}' in the model configuration{hint}"
    ))
}

/// Levenshtein distance of two short ASCII names, for the "did you mean" hint.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// `maxBatchSize` → `max_batch_size` (protobuf's JSON names back to field names).
pub(crate) fn snake_case(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    for c in key.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(json: &str) -> String {
        let value: Value = serde_json::from_str(json).unwrap();
        let e = check_fields(&value).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument, "{e}");
        e.to_string()
    }

    fn accepted(json: &str) {
        let value: Value = serde_json::from_str(json).unwrap();
        check_fields(&value).unwrap_or_else(|e| panic!("{json}: {e}"));
    }

    #[test]
    fn an_unknown_field_at_any_depth_is_refused_by_its_path() {
        let e = refused(r#"{"dynamic_batching":{"max_queue_delay_micros":100}}"#);
        assert!(
            e.contains("'dynamic_batching.max_queue_delay_micros'")
                && e.contains("did you mean 'max_queue_delay_microseconds'"),
            "{e}"
        );
        let e = refused(r#"{"instanceGroup":[{"count":1},{"cuont":2}]}"#);
        assert!(
            e.contains("'instance_group[1].cuont'") && e.contains("'count'"),
            "{e}"
        );
        let e = refused(
            r#"{"model_warmup":[{"name":"w","inputs":{"INPUT0":{"dims":[1],"zero_date":true}}}]}"#,
        );
        assert!(
            e.contains("'model_warmup[0].inputs[INPUT0].zero_date'") && e.contains("zero_data"),
            "{e}"
        );
        let e = refused(r#"{"parameters":{"k":{"string_value":"1","int_value":2}}}"#);
        assert!(e.contains("'parameters[k].int_value'"), "{e}");
        let e = refused(r#"{"max_batch_sise":8}"#);
        assert!(
            e.contains("'max_batch_sise'") && e.contains("'max_batch_size'"),
            "{e}"
        );
        // Far from every name: no hint.
        let e = refused(r#"{"version_policy":{"newest":{}}}"#);
        assert!(!e.contains("did you mean"), "{e}");
    }

    #[test]
    fn tritons_fields_in_both_spellings_and_our_own_pass() {
        accepted(
            r#"{"name":"m","maxBatchSize":8,"pinned":true,"loadOnDemand":true,
                "input":[{"name":"a","dataType":"TYPE_FP32","dims":["-1"],"reshape":{"shape":[1]}}],
                "dynamicBatching":{"maxQueueDelayMicroseconds":"250","preferredBatchSize":[4],
                    "priorityQueuePolicy":{"1":{"timeoutAction":"REJECT","maxQueueSize":4}}},
                "optimization":{"graph":{"level":1}},"sequence_batching":{},
                "metric_tags":{"anything":"goes"},
                "versionPolicy":{"specific":{"versions":[1,2]}}}"#,
        );
        // Values of the wrong type are the typed reader's to refuse, not this walk's.
        accepted(r#"{"dynamic_batching":3,"input":"x"}"#);
        accepted("[]");
    }
}
