//! The model configuration: the part of Triton's `ModelConfig` that Veraltheim uses, read from
//! and written to Triton's JSON form (what `tritonclient.load_model(config=...)` sends). Both
//! field spellings of the protobuf JSON mapping are accepted (`max_batch_size` and
//! `maxBatchSize`), and 64-bit integers may come as strings, as protobuf's JSON printer writes them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::datatype::DataType;
use crate::error::Error;

/// Largest `max_batch_size` accepted; a guard against configurations that would make the batcher
/// allocate without bound.
pub const MAX_BATCH_SIZE_LIMIT: u32 = 1 << 16;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelConfig {
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub platform: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub backend: String,
    #[serde(alias = "maxBatchSize", deserialize_with = "flex::u32")]
    pub max_batch_size: u32,
    pub input: Vec<TensorConfig>,
    pub output: Vec<TensorConfig>,
    #[serde(alias = "dynamicBatching", skip_serializing_if = "Option::is_none")]
    pub dynamic_batching: Option<DynamicBatching>,
    #[serde(alias = "instanceGroup", skip_serializing_if = "Vec::is_empty")]
    pub instance_group: Vec<InstanceGroup>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, Parameter>,
    /// Triton's per-model response cache switch; only for deterministic models.
    #[serde(alias = "responseCache", skip_serializing_if = "Option::is_none")]
    pub response_cache: Option<ResponseCache>,
    /// Which numbered version folders of a repository model serve (Triton's `version_policy`;
    /// default: the latest one).
    #[serde(alias = "versionPolicy", skip_serializing_if = "Option::is_none")]
    pub version_policy: Option<VersionPolicy>,
    /// The model file inside a version folder (Triton's `default_model_filename`; the backend's
    /// own default when empty, e.g. `model.onnx`).
    #[serde(
        alias = "defaultModelFilename",
        skip_serializing_if = "String::is_empty"
    )]
    pub default_model_filename: String,
    /// Requests run through the model before it is READY (Triton's `model_warmup`).
    #[serde(alias = "modelWarmup", skip_serializing_if = "Vec::is_empty")]
    pub model_warmup: Vec<ModelWarmup>,
    /// Veraltheim: a pinned model is never evicted to make room for another.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub pinned: bool,
    /// Veraltheim: a request for this model while it is not loaded loads it (the request waits
    /// within its deadline) instead of failing with "not ready".
    #[serde(alias = "loadOnDemand", skip_serializing_if = "std::ops::Not::not")]
    pub load_on_demand: bool,
}

/// Triton's version policy: one of `latest`, `all`, `specific`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VersionPolicy {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latest: Option<LatestVersions>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub all: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub specific: Option<SpecificVersions>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LatestVersions {
    #[serde(alias = "numVersions", deserialize_with = "flex::u32")]
    pub num_versions: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SpecificVersions {
    #[serde(deserialize_with = "flex::vec_i64")]
    pub versions: Vec<i64>,
}

/// One warm-up request (Triton's `ModelWarmup`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelWarmup {
    pub name: String,
    #[serde(alias = "batchSize", deserialize_with = "flex::u32")]
    pub batch_size: u32,
    pub inputs: BTreeMap<String, WarmupInput>,
    #[serde(skip_serializing_if = "is_zero_u32", deserialize_with = "flex::u32")]
    pub count: u32,
}

/// The data of one warm-up input: zeros, random values, or a file under the model's `warmup/`
/// folder holding the raw bytes (Triton's `input_data_file`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WarmupInput {
    #[serde(alias = "dataType")]
    pub data_type: String,
    #[serde(deserialize_with = "flex::vec_i64")]
    pub dims: Vec<i64>,
    #[serde(alias = "zeroData", skip_serializing_if = "std::ops::Not::not")]
    pub zero_data: bool,
    #[serde(alias = "randomData", skip_serializing_if = "std::ops::Not::not")]
    pub random_data: bool,
    #[serde(alias = "inputDataFile", skip_serializing_if = "String::is_empty")]
    pub input_data_file: String,
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ResponseCache {
    pub enable: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TensorConfig {
    pub name: String,
    #[serde(alias = "dataType")]
    pub data_type: String,
    /// Dimensions without the batch dimension; -1 is variable.
    #[serde(deserialize_with = "flex::vec_i64")]
    pub dims: Vec<i64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub optional: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DynamicBatching {
    #[serde(
        alias = "preferredBatchSize",
        deserialize_with = "flex::vec_u32",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub preferred_batch_size: Vec<u32>,
    #[serde(alias = "maxQueueDelayMicroseconds", deserialize_with = "flex::u64")]
    pub max_queue_delay_microseconds: u64,
    #[serde(alias = "preserveOrdering")]
    pub preserve_ordering: bool,
    #[serde(alias = "priorityLevels", deserialize_with = "flex::u64")]
    pub priority_levels: u64,
    #[serde(alias = "defaultPriorityLevel", deserialize_with = "flex::u64")]
    pub default_priority_level: u64,
    #[serde(alias = "defaultQueuePolicy", skip_serializing_if = "Option::is_none")]
    pub default_queue_policy: Option<QueuePolicy>,
    /// Queue policy per priority level (keys are levels, written as strings in JSON).
    #[serde(
        alias = "priorityQueuePolicy",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub priority_queue_policy: BTreeMap<String, QueuePolicy>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct QueuePolicy {
    /// `REJECT` or `DELAY`.
    #[serde(alias = "timeoutAction")]
    pub timeout_action: String,
    #[serde(alias = "defaultTimeoutMicroseconds", deserialize_with = "flex::u64")]
    pub default_timeout_microseconds: u64,
    #[serde(alias = "allowTimeoutOverride")]
    pub allow_timeout_override: bool,
    /// 0: the server's default bound (a queue is never unbounded).
    #[serde(alias = "maxQueueSize", deserialize_with = "flex::u32")]
    pub max_queue_size: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct InstanceGroup {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// `KIND_AUTO`, `KIND_CPU`, `KIND_GPU`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(deserialize_with = "flex::u32")]
    pub count: u32,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<i32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Parameter {
    #[serde(alias = "stringValue")]
    pub string_value: String,
}

impl ModelConfig {
    pub fn from_json(text: &str) -> Result<Self, Error> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::ConfigJson(e.to_string()))?;
        crate::schema::check_fields(&value)?;
        serde_json::from_value(value).map_err(|e| Error::ConfigJson(e.to_string()))
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Applies a Triton-style JSON override on top of this configuration: every top-level field
    /// the override names replaces this one's, the rest is kept (so `{"max_batch_size": 8}` is
    /// enough to change one setting). The model's name cannot be changed.
    pub fn with_override(&self, override_json: &str) -> Result<Self, Error> {
        let over: serde_json::Value =
            serde_json::from_str(override_json).map_err(|e| Error::ConfigJson(e.to_string()))?;
        crate::schema::check_fields(&over)?;
        let serde_json::Value::Object(over) = over else {
            return Err(Error::ConfigJson(
                "the config override must be a JSON object".into(),
            ));
        };
        let mut base = serde_json::to_value(self).map_err(|e| Error::ConfigJson(e.to_string()))?;
        let Some(base_map) = base.as_object_mut() else {
            return Err(Error::ConfigJson(
                "internal: config is not an object".into(),
            ));
        };
        for (key, value) in over {
            let key = crate::schema::snake_case(&key);
            if key == "name"
                && value
                    .as_str()
                    .is_some_and(|n| !n.is_empty() && n != self.name)
            {
                return Err(Error::InvalidConfig {
                    model: self.name.clone(),
                    reason: format!(
                        "the override names model '{}'",
                        value.as_str().unwrap_or("")
                    ),
                });
            }
            base_map.insert(key, value);
        }
        let merged: ModelConfig =
            serde_json::from_value(base).map_err(|e| Error::ConfigJson(e.to_string()))?;
        // Inputs may still be missing: backends that read them from the model file complete them.
        merged.validate_declared()?;
        Ok(merged)
    }

    /// Checks the configuration for what would make serving it fail later.
    pub fn validate(&self) -> Result<(), Error> {
        self.validate_declared()?;
        if self.input.is_empty() {
            return Err(Error::InvalidConfig {
                model: self.name.clone(),
                reason: "the model declares no input".into(),
            });
        }
        Ok(())
    }

    /// [`validate`](Self::validate) without requiring inputs: for a configuration that a backend
    /// completes from the model file (ONNX graphs, text embedders), checked before loading.
    pub fn validate_declared(&self) -> Result<(), Error> {
        let invalid = |reason: String| Error::InvalidConfig {
            model: self.name.clone(),
            reason,
        };
        if self.name.is_empty() {
            return Err(invalid("the model has no name".into()));
        }
        // Whatever the backend: a configuration never names a file outside the model's folder.
        let file = self.default_model_filename.as_str();
        if !file.is_empty()
            && (std::path::Path::new(file)
                .file_name()
                .is_none_or(|n| n != file)
                || file == "..")
        {
            return Err(invalid(format!(
                "default_model_filename is '{file}'; it must be a file name inside the model's folder"
            )));
        }
        if self.max_batch_size > MAX_BATCH_SIZE_LIMIT {
            return Err(invalid(format!(
                "max_batch_size {} is above the limit of {MAX_BATCH_SIZE_LIMIT}",
                self.max_batch_size
            )));
        }
        for (kind, list) in [("input", &self.input), ("output", &self.output)] {
            let mut seen = std::collections::BTreeSet::new();
            for t in list.iter() {
                if t.name.is_empty() {
                    return Err(invalid(format!("an {kind} has no name")));
                }
                if !seen.insert(t.name.as_str()) {
                    return Err(invalid(format!("{kind} '{}' is declared twice", t.name)));
                }
                DataType::from_config_name(&t.data_type).map_err(|_| {
                    invalid(format!(
                        "{kind} '{}' has unknown data_type '{}' (expected e.g. TYPE_FP32)",
                        t.name, t.data_type
                    ))
                })?;
                if let Some(d) = t.dims.iter().find(|d| **d < -1) {
                    return Err(invalid(format!("{kind} '{}' has dimension {d}", t.name)));
                }
            }
        }
        if let Some(db) = &self.dynamic_batching {
            for &p in &db.preferred_batch_size {
                if p == 0 || p > self.max_batch_size.max(1) {
                    return Err(invalid(format!(
                        "preferred_batch_size {p} must be between 1 and max_batch_size {}",
                        self.max_batch_size
                    )));
                }
            }
            for policy in db
                .default_queue_policy
                .iter()
                .chain(db.priority_queue_policy.values())
            {
                match policy.timeout_action.as_str() {
                    "" | "REJECT" | "DELAY" => {}
                    other => {
                        return Err(invalid(format!(
                            "timeout_action '{other}' is not REJECT or DELAY"
                        )));
                    }
                }
            }
            if db.priority_levels > 0
                && !(1..=db.priority_levels).contains(&db.default_priority_level)
            {
                return Err(invalid(format!(
                    "default_priority_level {} must be between 1 and priority_levels {}",
                    db.default_priority_level, db.priority_levels
                )));
            }
            for key in db.priority_queue_policy.keys() {
                let level: u64 = key.parse().map_err(|_| {
                    invalid(format!(
                        "priority_queue_policy key '{key}' is not a level number"
                    ))
                })?;
                if level == 0 || level > db.priority_levels {
                    return Err(invalid(format!(
                        "priority_queue_policy names level {level}, outside 1..={}",
                        db.priority_levels
                    )));
                }
            }
        }
        if let Some(policy) = &self.version_policy {
            let chosen = [
                policy.latest.is_some(),
                policy.all.is_some(),
                policy.specific.is_some(),
            ];
            if chosen.iter().filter(|c| **c).count() > 1 {
                return Err(invalid(
                    "version_policy must name one of latest, all, specific".into(),
                ));
            }
            if let Some(s) = &policy.specific
                && let Some(v) = s.versions.iter().find(|v| **v < 1)
            {
                return Err(invalid(format!(
                    "version_policy.specific names version {v}; versions are positive integers"
                )));
            }
        }
        for w in &self.model_warmup {
            for (input, data) in &w.inputs {
                let sources = data.zero_data as u8
                    + data.random_data as u8
                    + !data.input_data_file.is_empty() as u8;
                if sources != 1 {
                    return Err(invalid(format!(
                        "model_warmup '{}' input '{input}' must set exactly one of zero_data, random_data, input_data_file",
                        w.name
                    )));
                }
                DataType::from_config_name(&data.data_type).map_err(|_| {
                    invalid(format!(
                        "model_warmup '{}' input '{input}' has unknown data_type '{}'",
                        w.name, data.data_type
                    ))
                })?;
            }
        }
        for (key, p) in &self.parameters {
            if key.is_empty() {
                return Err(invalid(format!(
                    "a parameter has no name (value '{}')",
                    p.string_value
                )));
            }
        }
        Ok(())
    }

    /// Whether requests carry a batch dimension (Triton: `max_batch_size > 0`).
    pub fn batching(&self) -> bool {
        self.max_batch_size > 0
    }

    /// An input's or output's full shape as clients see it (batch dimension first when batching).
    pub fn full_shape(&self, tensor: &TensorConfig) -> Vec<i64> {
        let mut shape = Vec::with_capacity(tensor.dims.len() + 1);
        if self.batching() {
            shape.push(-1);
        }
        shape.extend_from_slice(&tensor.dims);
        shape
    }

    pub fn datatype_of(tensor: &TensorConfig) -> DataType {
        DataType::from_config_name(&tensor.data_type).unwrap_or(DataType::Bytes)
    }

    /// Number of batches the model may execute at once (`instance_group` counts, at least 1).
    pub fn instance_count(&self) -> usize {
        let n: u32 = self.instance_group.iter().map(|g| g.count.max(1)).sum();
        n.max(1) as usize
    }

    /// Whether responses of this model may be served from the response cache.
    pub fn cache_enabled(&self) -> bool {
        self.response_cache.as_ref().is_some_and(|c| c.enable)
    }

    pub fn parameter(&self, key: &str) -> Option<&str> {
        self.parameters.get(key).map(|p| p.string_value.as_str())
    }

    /// A numeric parameter, with a message naming it when it does not parse.
    pub fn parameter_u64(&self, key: &str, default: u64) -> Result<u64, Error> {
        match self.parameter(key) {
            None | Some("") => Ok(default),
            Some(v) => v.trim().parse().map_err(|_| Error::InvalidConfig {
                model: self.name.clone(),
                reason: format!("parameter '{key}' is '{v}', not a non-negative integer"),
            }),
        }
    }
}

/// Integers that protobuf's JSON mapping may write as numbers or as strings.
mod flex {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Num {
        I(i64),
        U(u64),
        S(String),
    }

    fn to_i128<E: Error>(n: Num) -> Result<i128, E> {
        match n {
            Num::I(v) => Ok(v as i128),
            Num::U(v) => Ok(v as i128),
            Num::S(s) => s
                .trim()
                .parse::<i128>()
                .map_err(|_| E::custom(format!("'{s}' is not an integer"))),
        }
    }

    fn conv<T: TryFrom<i128>, E: Error>(v: i128) -> Result<T, E> {
        T::try_from(v).map_err(|_| E::custom(format!("{v} is out of range")))
    }

    pub fn u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        conv(to_i128(Num::deserialize(d)?)?)
    }

    pub fn u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        conv(to_i128(Num::deserialize(d)?)?)
    }

    pub fn vec_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<i64>, D::Error> {
        Vec::<Num>::deserialize(d)?
            .into_iter()
            .map(|n| conv(to_i128(n)?))
            .collect()
    }

    pub fn vec_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
        Vec::<Num>::deserialize(d)?
            .into_iter()
            .map(|n| conv(to_i128(n)?))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> ModelConfig {
        ModelConfig::from_json(
            r#"{"name":"cost","max_batch_size":64,
                "input":[{"name":"INPUT0","data_type":"TYPE_FP32","dims":[-1]}],
                "output":[{"name":"OUTPUT0","data_type":"TYPE_FP32","dims":[1]}],
                "dynamic_batching":{},
                "parameters":{"base_us":{"string_value":"100"}}}"#,
        )
        .unwrap()
    }

    #[test]
    fn every_field_veraltheim_writes_is_in_the_schema() {
        // What GetModel / ModelConfig answer must load again as an override unchanged (a client
        // edits the config it was given and sends it back), so every field our structs write,
        // at every depth, is one the schema knows.
        let mut c = base();
        c.pinned = true;
        c.load_on_demand = true;
        c.default_model_filename = "model.onnx".into();
        c.response_cache = Some(ResponseCache { enable: true });
        // A oneof: each member written on its own passes the schema; one is kept.
        for policy in [
            VersionPolicy {
                all: Some(serde_json::json!({})),
                ..Default::default()
            },
            VersionPolicy {
                specific: Some(SpecificVersions { versions: vec![1] }),
                ..Default::default()
            },
        ] {
            crate::schema::check_fields(&serde_json::json!({ "version_policy": policy })).unwrap();
        }
        c.version_policy = Some(VersionPolicy {
            latest: Some(LatestVersions { num_versions: 2 }),
            ..Default::default()
        });
        c.input[0].optional = true;
        c.instance_group = vec![InstanceGroup {
            name: "g".into(),
            kind: "KIND_CPU".into(),
            count: 1,
            gpus: vec![0],
        }];
        let queue = QueuePolicy {
            timeout_action: "REJECT".into(),
            default_timeout_microseconds: 1,
            allow_timeout_override: true,
            max_queue_size: 1,
        };
        c.dynamic_batching = Some(DynamicBatching {
            default_queue_policy: Some(queue.clone()),
            priority_queue_policy: [("1".to_string(), queue)].into(),
            priority_levels: 2,
            default_priority_level: 1,
            ..Default::default()
        });
        c.model_warmup = vec![ModelWarmup {
            name: "w".into(),
            batch_size: 1,
            count: 2,
            inputs: [(
                "INPUT0".to_string(),
                WarmupInput {
                    data_type: "TYPE_FP32".into(),
                    dims: vec![1],
                    zero_data: true,
                    ..Default::default()
                },
            )]
            .into(),
        }];
        let written = serde_json::to_value(&c).unwrap();
        crate::schema::check_fields(&written).unwrap();
        // The other members of the warm-up input's data oneof.
        let mut other = c.clone();
        let input = other.model_warmup[0].inputs.get_mut("INPUT0").unwrap();
        input.zero_data = false;
        input.random_data = true;
        input.input_data_file = "f".into();
        crate::schema::check_fields(&serde_json::to_value(&other).unwrap()).unwrap();
        assert_eq!(base().with_override(&written.to_string()).unwrap(), c);
    }

    #[test]
    fn reads_both_json_spellings_and_string_integers() {
        let c = ModelConfig::from_json(
            r#"{"name":"m","maxBatchSize":8,"input":[{"name":"a","dataType":"TYPE_INT64","dims":["-1","3"]}],
                "dynamicBatching":{"maxQueueDelayMicroseconds":"250","preferredBatchSize":[4,8]}}"#,
        )
        .unwrap();
        assert_eq!(c.max_batch_size, 8);
        assert_eq!(c.input[0].dims, vec![-1, 3]);
        let db = c.dynamic_batching.unwrap();
        assert_eq!(db.max_queue_delay_microseconds, 250);
        assert_eq!(db.preferred_batch_size, vec![4, 8]);
    }

    #[test]
    fn an_unknown_field_is_refused_by_name_and_tritons_fields_are_not() {
        let e = ModelConfig::from_json(r#"{"name":"m","max_batch_sise":8}"#).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument);
        let text = e.to_string();
        assert!(
            text.contains("'max_batch_sise'") && text.contains("max_batch_size"),
            "{text}"
        );
        let e = base()
            .with_override(r#"{"max_batch_sise": 8}"#)
            .unwrap_err();
        assert!(e.to_string().contains("'max_batch_sise'"), "{e}");
        // Triton fields Veraltheim ignores still load, in either spelling.
        ModelConfig::from_json(
            r#"{"name":"m","optimization":{},"sequenceBatching":{},"metric_tags":{}}"#,
        )
        .unwrap();
    }

    #[test]
    fn override_replaces_named_fields_only() {
        let c = base()
            .with_override(
                r#"{"maxBatchSize": 4, "parameters": {"base_us": {"stringValue": "7"}}}"#,
            )
            .unwrap();
        assert_eq!(c.max_batch_size, 4);
        assert_eq!(c.parameter("base_us"), Some("7"));
        assert_eq!(c.input, base().input);
        assert!(c.dynamic_batching.is_some());
    }

    #[test]
    fn override_errors_name_the_problem() {
        let e = base().with_override(r#"{"name":"other"}"#).unwrap_err();
        assert!(e.to_string().contains("other"), "{e}");
        let e = base().with_override("[1]").unwrap_err();
        assert!(e.to_string().contains("JSON object"), "{e}");
        let e = base()
            .with_override(r#"{"dynamic_batching":{"preferred_batch_size":[128]}}"#)
            .unwrap_err();
        assert!(e.to_string().contains("preferred_batch_size 128"), "{e}");
        let e = base()
            .with_override(r#"{"input":[{"name":"x","data_type":"TYPE_FLOAT"}]}"#)
            .unwrap_err();
        assert!(e.to_string().contains("TYPE_FLOAT"), "{e}");
        for file in ["../../etc/passwd", "/etc/passwd", "..", "a/b.onnx"] {
            let e = base()
                .with_override(&format!(r#"{{"default_model_filename":"{file}"}}"#))
                .unwrap_err();
            assert!(
                e.to_string().contains("default_model_filename"),
                "{file}: {e}"
            );
        }
        assert!(
            base()
                .with_override(r#"{"default_model_filename":"model.onnx"}"#)
                .is_ok()
        );
    }

    #[test]
    fn parameters_parse_with_messages() {
        let c = base();
        assert_eq!(c.parameter_u64("base_us", 0).unwrap(), 100);
        assert_eq!(c.parameter_u64("missing", 5).unwrap(), 5);
        let bad = c
            .with_override(r#"{"parameters":{"base_us":{"string_value":"fast"}}}"#)
            .unwrap();
        assert!(
            bad.parameter_u64("base_us", 0)
                .unwrap_err()
                .to_string()
                .contains("fast")
        );
    }

    #[test]
    fn shapes_and_instances() {
        let c = base();
        assert_eq!(c.full_shape(&c.input[0]), vec![-1, -1]);
        assert_eq!(c.instance_count(), 1);
        let c = c
            .with_override(r#"{"instance_group":[{"count":2},{"count":1}]}"#)
            .unwrap();
        assert_eq!(c.instance_count(), 3);
        let round = ModelConfig::from_json(&c.to_json()).unwrap();
        assert_eq!(round, c);
    }
}

#[cfg(test)]
mod priority_tests {
    use super::*;

    fn with(db: &str) -> Result<ModelConfig, Error> {
        ModelConfig::from_json(
            r#"{"name": "m", "max_batch_size": 4,
                "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
                "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [-1]}]}"#,
        )
        .unwrap()
        .with_override(&format!(r#"{{"dynamic_batching": {db}}}"#))
    }

    #[test]
    fn priority_settings_are_checked() {
        assert!(with(r#"{"priority_levels": 3, "default_priority_level": 2}"#).is_ok());
        let e = with(r#"{"priority_levels": 3, "default_priority_level": 4}"#).unwrap_err();
        assert!(e.to_string().contains("default_priority_level 4"), "{e}");
        let e = with(r#"{"priority_levels": 2, "default_priority_level": 1, "priority_queue_policy": {"3": {}}}"#)
            .unwrap_err();
        assert!(e.to_string().contains("level 3"), "{e}");
        let e = with(r#"{"default_queue_policy": {"timeout_action": "DROP"}}"#).unwrap_err();
        assert!(e.to_string().contains("DROP"), "{e}");
    }
}
