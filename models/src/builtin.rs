//! Built-in models that need no files: `identity` (echo), `cost` (simulated compute for tests and
//! benchmarks) and `fault` (panics on every batch, for supervision and chaos tests).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::ModelConfig;
use crate::error::Error;
use crate::limits::Limits;
use crate::model::Model;
use crate::tensor::Tensor;

/// The backend name built-in models carry in their configuration.
pub const BACKEND: &str = "builtin";

const IDENTITY: &str = r#"{
  "name": "identity", "backend": "builtin", "max_batch_size": 64,
  "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
  "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
  "dynamic_batching": {}
}"#;

const COST: &str = r#"{
  "name": "cost", "backend": "builtin", "max_batch_size": 64,
  "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
  "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [1]}],
  "dynamic_batching": {},
  "parameters": {"base_us": {"string_value": "500"}, "per_item_us": {"string_value": "50"}}
}"#;

const FAULT: &str = r#"{
  "name": "fault", "backend": "builtin", "max_batch_size": 8,
  "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
  "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
  "dynamic_batching": {}
}"#;

/// Names of the built-in models; `fault` only with fault injection enabled.
pub fn names(fault_injection: bool) -> Vec<&'static str> {
    let mut v = vec!["identity", "cost"];
    if fault_injection {
        v.push("fault");
    }
    v
}

/// The default configuration of a built-in model.
pub fn config(name: &str) -> Result<ModelConfig, Error> {
    let text = match name {
        "identity" => IDENTITY,
        "cost" => COST,
        "fault" => FAULT,
        other => return Err(Error::UnknownModel(other.to_string())),
    };
    ModelConfig::from_json(text)
}

/// Builds a built-in model from a (possibly overridden) configuration, within the default
/// [`Limits`].
pub fn instantiate(config: ModelConfig) -> Result<Arc<dyn Model>, Error> {
    instantiate_with(config, &Limits::default())
}

/// [`instantiate`] within `limits` (the `cost` model's simulated compute is bounded, so that one
/// configuration cannot hold an execution thread for an hour).
pub fn instantiate_with(config: ModelConfig, limits: &Limits) -> Result<Arc<dyn Model>, Error> {
    config.validate()?;
    // A repository model of backend `builtin` under another name says which one it is.
    let kind = config
        .parameter("builtin")
        .filter(|k| !k.is_empty())
        .unwrap_or(config.name.as_str())
        .to_string();
    let model: Arc<dyn Model> = match kind.as_str() {
        "identity" => Arc::new(Identity { config }),
        "cost" => {
            let base_us = config.parameter_u64("base_us", 500)?;
            let per_item_us = config.parameter_u64("per_item_us", 50)?;
            limits.check_cost(&config, base_us, per_item_us)?;
            let base = Duration::from_micros(base_us);
            let per_item = Duration::from_micros(per_item_us);
            let sleep = match config.parameter("busy").map(str::trim) {
                None | Some("" | "spin") => false,
                Some("sleep") => true,
                Some(other) => {
                    return Err(Error::InvalidConfig {
                        model: config.name.clone(),
                        reason: format!(
                            "parameter busy must be \"spin\" or \"sleep\", got {other:?}"
                        ),
                    });
                }
            };
            Arc::new(Cost {
                config,
                base,
                per_item,
                sleep,
            })
        }
        "fault" => Arc::new(Fault { config }),
        other => return Err(Error::UnknownModel(other.to_string())),
    };
    Ok(model)
}

/// Built-in models hold next to nothing; a `memory_bytes` parameter makes one claim a size, so
/// that the allocator's budgets and eviction can be exercised without real weights.
fn simulated_memory(config: &ModelConfig) -> u64 {
    config.parameter_u64("memory_bytes", 0).unwrap_or(0)
}

fn output_name(config: &ModelConfig) -> &str {
    config
        .output
        .first()
        .map(|o| o.name.as_str())
        .unwrap_or("OUTPUT0")
}

fn first_input<'a>(config: &ModelConfig, inputs: &'a [Tensor]) -> Result<&'a Tensor, Error> {
    inputs.first().ok_or_else(|| Error::Execution {
        model: config.name.clone(),
        reason: "no input tensor".into(),
    })
}

struct Identity {
    config: ModelConfig,
}

impl Model for Identity {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn memory_bytes(&self) -> Option<u64> {
        Some(simulated_memory(&self.config))
    }

    fn execute(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, Error> {
        let out = first_input(&self.config, inputs)?.clone();
        Ok(vec![out.renamed(output_name(&self.config))])
    }
}

/// Busy-computes `base + per_item × batch` and returns the sum of each row. With the `busy`
/// parameter `sleep` it sleeps that long instead: the execution thread is held as by a call into
/// an accelerator, while the CPU stays free.
struct Cost {
    config: ModelConfig,
    base: Duration,
    per_item: Duration,
    sleep: bool,
}

impl Model for Cost {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn memory_bytes(&self) -> Option<u64> {
        Some(simulated_memory(&self.config))
    }

    fn execute(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, Error> {
        let input = first_input(&self.config, inputs)?;
        let start = Instant::now();
        let rows = input.batch_size();
        let values = input.f32_values()?;
        let width = input
            .shape()
            .get(1..)
            .map_or(1, |d| d.iter().product::<usize>());
        let sums: Vec<f32> = if width == 0 {
            vec![0.0; rows]
        } else {
            values.chunks(width).map(|row| row.iter().sum()).collect()
        };
        // Saturating: the limits bound both values, but a model built outside them must not panic.
        let n = u32::try_from(rows).unwrap_or(u32::MAX);
        let busy = self.base.saturating_add(self.per_item.saturating_mul(n));
        if self.sleep {
            std::thread::sleep(busy.saturating_sub(start.elapsed()));
        }
        // By default a spin, not a sleep: the point is to occupy an execution-pool thread and
        // its core like real CPU compute.
        while start.elapsed() < busy {
            std::hint::spin_loop();
        }
        let sums = Tensor::from_f32(output_name(&self.config), vec![rows, 1], &sums)
            .map_err(|e| Error::bad_output(&self.config.name, e))?;
        Ok(vec![sums])
    }
}

struct Fault {
    config: ModelConfig,
}

impl Model for Fault {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn memory_bytes(&self) -> Option<u64> {
        Some(simulated_memory(&self.config))
    }

    fn execute(&self, _inputs: &[Tensor]) -> Result<Vec<Tensor>, Error> {
        panic!(
            "fault model: injected panic in backend '{}'",
            self.config.name
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_config_is_valid() {
        for name in names(true) {
            let c = config(name).unwrap();
            c.validate().unwrap();
            assert_eq!(c.name, name);
            instantiate(c).unwrap();
        }
        assert!(config("nope").is_err());
    }

    #[test]
    fn cost_sleeps_when_told_and_refuses_an_unknown_busy_mode() {
        let over = |busy: &str| {
            config("cost")
                .unwrap()
                .with_override(&format!(
                    r#"{{"parameters":{{"base_us":{{"string_value":"3000"}},"per_item_us":{{"string_value":"0"}},"busy":{{"string_value":"{busy}"}}}}}}"#
                ))
                .unwrap()
        };
        let m = instantiate(over("sleep")).unwrap();
        let input = Tensor::from_f32("INPUT0", vec![1, 2], &[1.0, 2.0]).unwrap();
        let start = Instant::now();
        let out = m.execute(std::slice::from_ref(&input)).unwrap();
        assert!(start.elapsed() >= Duration::from_millis(3));
        assert_eq!(out[0].f32_values().unwrap(), vec![3.0]);
        let e = instantiate(over("nap")).err().unwrap().to_string();
        assert!(e.contains("busy") && e.contains("nap"), "{e}");
    }

    #[test]
    fn identity_echoes() {
        let m = instantiate(config("identity").unwrap()).unwrap();
        let input = Tensor::from_f32("INPUT0", vec![2, 2], &[1.0, 2.0, 3.0, 4.0]).unwrap();
        let out = m.execute(std::slice::from_ref(&input)).unwrap();
        assert_eq!(out[0].name(), "OUTPUT0");
        assert_eq!(out[0].data(), input.data());
        assert_eq!(out[0].shape(), input.shape());
    }

    #[test]
    fn cost_sums_rows_and_takes_its_time() {
        let c = config("cost")
            .unwrap()
            .with_override(r#"{"parameters":{"base_us":{"string_value":"2000"},"per_item_us":{"string_value":"0"}}}"#)
            .unwrap();
        let m = instantiate(c).unwrap();
        let input =
            Tensor::from_f32("INPUT0", vec![2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let start = Instant::now();
        let out = m.execute(&[input]).unwrap();
        // A lower bound only: the spin cannot finish early, however loaded the machine is.
        assert!(start.elapsed() >= Duration::from_micros(2000));
        assert_eq!(out[0].shape(), vec![2, 1]);
        assert_eq!(out[0].f32_values().unwrap(), vec![6.0, 15.0]);
    }

    #[test]
    fn cost_refuses_an_hour_of_compute_by_name() {
        // The case that held the pool for an hour: base_us 3,600,000,000 with busy=sleep.
        let c = config("cost")
            .unwrap()
            .with_override(r#"{"parameters":{"base_us":{"string_value":"3600000000"},"busy":{"string_value":"sleep"}}}"#)
            .unwrap();
        let err = instantiate(c).err().expect("refused");
        assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument, "{err}");
        assert!(
            err.to_string().contains("limits.max_builtin_cost_us"),
            "{err}"
        );
        // per_item_us × max_batch_size overflowing u64 is refused, not wrapped.
        let c = config("cost")
            .unwrap()
            .with_override(
                r#"{"parameters":{"per_item_us":{"string_value":"18446744073709551615"}}}"#,
            )
            .unwrap();
        assert!(instantiate(c).is_err());
    }

    #[test]
    fn cost_rejects_bad_parameters() {
        let c = config("cost")
            .unwrap()
            .with_override(r#"{"parameters":{"base_us":{"string_value":"-1"}}}"#)
            .unwrap();
        let err = instantiate(c).err().unwrap();
        assert!(err.to_string().contains("base_us"), "{err}");
    }

    #[test]
    fn fault_panics() {
        let m = instantiate(config("fault").unwrap()).unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            m.execute(&[Tensor::from_f32("INPUT0", vec![1, 1], &[1.0]).unwrap()])
        }));
        assert!(r.is_err());
    }
}
