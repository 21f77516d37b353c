//! Bounds on what a request or a model configuration may ask for. Each bound keeps one client
//! from making the process allocate, loop or hold execution threads without end: a field that
//! sizes an allocation or a loop is checked against these before it is used. The coordinator
//! fills this struct from its `[limits]` configuration section; this crate never reads a file.

use crate::config::ModelConfig;
use crate::error::Error;

/// The limits a load and a request are checked against (see `[limits]` in the coordinator's
/// default configuration for what each protects).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most elements of one tensor, and the largest single dimension (a zero elsewhere in the
    /// shape must not let a huge dimension through to code that sizes something by it).
    pub max_tensor_elements: usize,
    /// Most bytes of all input tensors of one request together (shared-memory inputs included).
    pub max_request_bytes: usize,
    /// Most repetitions of one `model_warmup` entry.
    pub max_warmup_count: u32,
    /// Largest `dynamic_batching.max_queue_delay_microseconds`.
    pub max_queue_delay_us: u64,
    /// Most execution instances (`instance_group` counts summed) of one model; the load also
    /// refuses more than the execution pool's threads, whichever is lower. `None`: the pool's.
    pub max_model_instances: Option<usize>,
    /// Largest queue bound of a model (`max_queue_size` of its default and per-level queue
    /// policies): the queue's slots are allocated when the model loads.
    pub max_queue_size: u32,
    /// Most `dynamic_batching.priority_levels`: per-level state is allocated for each.
    pub max_priority_levels: u64,
    /// Most simulated compute of one batch of the built-in `cost` model
    /// (`base_us + per_item_us × max_batch_size`), in microseconds.
    pub max_builtin_cost_us: u64,
}

impl Default for Limits {
    /// The same values as the coordinator's default configuration.
    fn default() -> Self {
        Limits {
            max_tensor_elements: 1 << 27,
            max_request_bytes: 1 << 30,
            max_warmup_count: 1000,
            max_queue_delay_us: 1_000_000,
            max_model_instances: None,
            max_queue_size: 1 << 16,
            max_priority_levels: 1024,
            max_builtin_cost_us: 10_000_000,
        }
    }
}

impl Limits {
    /// Checks a tensor's shape: every dimension and the element count (checked multiplication)
    /// at most `max_tensor_elements`. `what` names the tensor in the message.
    pub fn check_shape(&self, what: &str, shape: &[usize]) -> Result<usize, String> {
        let cap = self.max_tensor_elements;
        let mut count: usize = 1;
        for &d in shape {
            if d > cap {
                return Err(format!(
                    "{what}: dimension {d} of shape {shape:?} is above limits.max_tensor_elements ({cap})"
                ));
            }
            count = count.checked_mul(d).filter(|c| *c <= cap).ok_or_else(|| {
                format!(
                    "{what}: shape {shape:?} has more than limits.max_tensor_elements ({cap}) elements"
                )
            })?;
        }
        Ok(count)
    }

    /// Checks what of a model's configuration sizes an allocation, a loop or a thread count,
    /// before the model is built. `pool_threads` is the execution pool's size. The error names
    /// the field and the limit, and is of kind `InvalidArgument` (the caller's configuration).
    pub fn check_config(&self, config: &ModelConfig, pool_threads: usize) -> Result<(), Error> {
        let invalid = |reason: String| Error::InvalidConfig {
            model: config.name.clone(),
            reason,
        };
        if let Some(db) = &config.dynamic_batching
            && db.max_queue_delay_microseconds > self.max_queue_delay_us
        {
            return Err(invalid(format!(
                "dynamic_batching.max_queue_delay_microseconds {} is above limits.max_queue_delay_us ({})",
                db.max_queue_delay_microseconds, self.max_queue_delay_us
            )));
        }
        if let Some(db) = &config.dynamic_batching {
            if db.priority_levels > self.max_priority_levels {
                return Err(invalid(format!(
                    "dynamic_batching.priority_levels {} is above limits.max_priority_levels ({})",
                    db.priority_levels, self.max_priority_levels
                )));
            }
            let queues = db
                .default_queue_policy
                .iter()
                .map(|q| ("default_queue_policy".to_string(), q))
                .chain(
                    db.priority_queue_policy
                        .iter()
                        .map(|(level, q)| (format!("priority_queue_policy[{level}]"), q)),
                );
            for (which, q) in queues {
                if q.max_queue_size > self.max_queue_size {
                    return Err(invalid(format!(
                        "dynamic_batching.{which}.max_queue_size {} is above limits.max_queue_size ({})",
                        q.max_queue_size, self.max_queue_size
                    )));
                }
            }
        }
        let instances = config
            .instance_group
            .iter()
            .try_fold(0u64, |n, g| n.checked_add(u64::from(g.count.max(1))))
            .unwrap_or(u64::MAX);
        let pool = pool_threads.max(1);
        let (cap, why) = match self.max_model_instances {
            Some(m) if m < pool => (m, "limits.max_model_instances"),
            _ => (pool, "the execution pool's threads (execution.threads)"),
        };
        if instances > cap as u64 {
            return Err(invalid(format!(
                "instance_group counts add up to {instances} instances, above {why} ({cap}): \
                 one model may not hold every execution thread"
            )));
        }
        for w in &config.model_warmup {
            if w.count > self.max_warmup_count {
                return Err(invalid(format!(
                    "model_warmup '{}' count {} is above limits.max_warmup_count ({})",
                    w.name, w.count, self.max_warmup_count
                )));
            }
            for (input, data) in &w.inputs {
                let mut shape = Vec::with_capacity(data.dims.len() + 1);
                if config.batching() {
                    shape.push(w.batch_size.max(1) as usize);
                }
                for &d in &data.dims {
                    // Negative dims are refused with their own message when the warm-up is built.
                    shape.push(usize::try_from(d).unwrap_or(0));
                }
                self.check_shape(
                    &format!("model_warmup '{}' input '{input}' dims", w.name),
                    &shape,
                )
                .map_err(invalid)?;
            }
        }
        Ok(())
    }

    /// Checks the built-in `cost` model's simulated compute per batch.
    pub fn check_cost(
        &self,
        config: &ModelConfig,
        base_us: u64,
        per_item_us: u64,
    ) -> Result<(), Error> {
        let rows = u64::from(config.max_batch_size.max(1));
        let total = per_item_us
            .checked_mul(rows)
            .and_then(|p| p.checked_add(base_us));
        match total {
            Some(t) if t <= self.max_builtin_cost_us => Ok(()),
            _ => Err(Error::InvalidConfig {
                model: config.name.clone(),
                reason: format!(
                    "parameters base_us {base_us} + per_item_us {per_item_us} × max_batch_size {rows} \
                     is above limits.max_builtin_cost_us ({})",
                    self.max_builtin_cost_us
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    /// A batching model with one FP32 input (the shape of the built-in `cost`), with `over`.
    fn cost(over: &str) -> ModelConfig {
        ModelConfig::from_json(
            r#"{"name": "cost", "backend": "builtin", "max_batch_size": 64,
                "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
                "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [1]}],
                "dynamic_batching": {}}"#,
        )
        .unwrap()
        .with_override(over)
        .unwrap()
    }

    fn refused(c: &ModelConfig, pool: usize, field: &str) {
        let e = Limits::default().check_config(c, pool).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        assert!(e.to_string().contains(field), "{e} should name {field}");
    }

    #[test]
    fn shapes_are_bounded_by_dimension_and_by_count() {
        let l = Limits::default();
        assert_eq!(l.check_shape("t", &[4, 16]), Ok(64));
        assert_eq!(l.check_shape("t", &[]), Ok(1));
        // A zero elsewhere does not let a huge dimension through.
        assert!(l.check_shape("t", &[0, 1 << 40]).is_err());
        // The product overflows usize: refused, not wrapped or panicked.
        assert!(l.check_shape("t", &[1 << 26, 1 << 26, 1 << 26]).is_err());
        let e = l.check_shape("t", &[1 << 14, 1 << 14]).unwrap_err();
        assert!(e.contains("limits.max_tensor_elements"), "{e}");
    }

    #[test]
    fn a_huge_warmup_dim_or_count_is_refused_by_name() {
        // The case that aborted the process: dims [1125899906842624] in a warm-up.
        let c = cost(
            r#"{"model_warmup":[{"name":"w","batch_size":1,"inputs":{"INPUT0":{"data_type":"TYPE_FP32","dims":[1125899906842624],"zero_data":true}}}]}"#,
        );
        refused(&c, 2, "model_warmup 'w' input 'INPUT0' dims");
        let c = cost(
            r#"{"model_warmup":[{"name":"w","count":2147483648,"inputs":{"INPUT0":{"data_type":"TYPE_FP32","dims":[1],"zero_data":true}}}]}"#,
        );
        refused(&c, 2, "limits.max_warmup_count");
    }

    #[test]
    fn queue_delay_and_instances_are_bounded() {
        let c =
            cost(r#"{"dynamic_batching":{"max_queue_delay_microseconds":"9223372036854775808"}}"#);
        refused(&c, 2, "max_queue_delay_microseconds");
        let c = cost(r#"{"instance_group":[{"count":8,"kind":"KIND_CPU"}]}"#);
        refused(&c, 2, "execution.threads");
        let c = cost(r#"{"instance_group":[{"count":2,"kind":"KIND_CPU"}]}"#);
        assert!(Limits::default().check_config(&c, 2).is_ok());
        let capped = Limits {
            max_model_instances: Some(1),
            ..Limits::default()
        };
        let e = capped.check_config(&c, 2).unwrap_err();
        assert!(e.to_string().contains("limits.max_model_instances"), "{e}");
    }

    #[test]
    fn queue_sizes_and_priority_levels_are_bounded() {
        // Each of these aborted the process at load (found by the hostile probe).
        let c =
            cost(r#"{"dynamic_batching":{"default_queue_policy":{"max_queue_size":4294967295}}}"#);
        refused(
            &c,
            2,
            "dynamic_batching.default_queue_policy.max_queue_size",
        );
        let c = cost(
            r#"{"dynamic_batching":{"priority_levels":2,"default_priority_level":1,
                "priority_queue_policy":{"2":{"max_queue_size":100000}}}}"#,
        );
        refused(
            &c,
            2,
            "dynamic_batching.priority_queue_policy[2].max_queue_size",
        );
        let c = cost(
            r#"{"dynamic_batching":{"priority_levels":"4294967296","default_priority_level":1}}"#,
        );
        refused(&c, 2, "limits.max_priority_levels");
        // At the limits they load.
        let c = cost(
            r#"{"dynamic_batching":{"priority_levels":1024,"default_priority_level":1,
                "default_queue_policy":{"max_queue_size":65536}}}"#,
        );
        assert!(Limits::default().check_config(&c, 2).is_ok());
    }
}
