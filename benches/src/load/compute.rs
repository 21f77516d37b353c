//! The compute ceiling: a built-in model's `Model::execute` called in-process on the caller's
//! thread, no server, no queue, on whole batches; reported as items (request rows) per second.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use veraltheim_models::{Tensor, builtin};

use super::args::Shape;

/// At most this many executions per batch size, besides the time bound.
const MAX_EXECUTIONS: u64 = 10_000_000;

#[derive(Clone, Debug, Serialize)]
pub struct ComputePoint {
    /// Requests per batch (each of `shape`'s first dimension rows).
    pub batch: usize,
    pub executions: u64,
    pub us_per_batch: f64,
    pub items_per_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ComputeReport {
    pub model: String,
    pub shape: String,
    pub points: Vec<ComputePoint>,
    pub best_batch: usize,
    pub best_items_per_s: f64,
}

/// The batch of `batch` requests of `shape`, concatenated along the first dimension.
fn batch_input(shape: &Shape, batch: usize) -> Tensor {
    let mut dims = shape.0.clone();
    dims[0] *= batch;
    let n: usize = dims.iter().product();
    let values: Vec<f32> = (0..n).map(|i| (i % 1024) as f32).collect();
    Tensor::from_f32("INPUT0", dims, &values).expect("the values fill the shape")
}

/// Executes the built-in `model` (its default configuration) on each batch size for about
/// `per_size`, after one unmeasured execution.
pub fn compute_ceiling(
    model: &str,
    shape: &Shape,
    batch_sizes: &[usize],
    per_size: Duration,
) -> anyhow::Result<ComputeReport> {
    let config =
        builtin::config(model).with_context(|| format!("'{model}' is not a built-in model"))?;
    let m = builtin::instantiate(config)?;
    let mut points = Vec::with_capacity(batch_sizes.len());
    for &batch in batch_sizes {
        let input = [batch_input(shape, batch)];
        m.execute(&input)?;
        let start = Instant::now();
        let mut executions = 0u64;
        while executions < MAX_EXECUTIONS {
            let out = m.execute(&input)?;
            std::hint::black_box(out);
            executions += 1;
            if start.elapsed() >= per_size {
                break;
            }
        }
        let secs = start.elapsed().as_secs_f64();
        let items = (executions as usize * batch * shape.rows()) as f64;
        points.push(ComputePoint {
            batch,
            executions,
            us_per_batch: secs * 1e6 / executions as f64,
            items_per_s: items / secs,
        });
    }
    let best = points
        .iter()
        .max_by(|a, b| a.items_per_s.total_cmp(&b.items_per_s))
        .context("no batch size")?;
    Ok(ComputeReport {
        model: model.to_string(),
        shape: shape.to_string(),
        best_batch: best.batch,
        best_items_per_s: best.items_per_s,
        points,
    })
}

impl ComputeReport {
    pub fn lines(&self) -> String {
        let mut s = String::new();
        for p in &self.points {
            s.push_str(&format!(
                "compute      {:<9} {:<6} batch {:>3}  {:>12.0} items/s  {:>9.2} µs/batch  ({} executions)\n",
                self.model, self.shape, p.batch, p.items_per_s, p.us_per_batch, p.executions
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_stack_rows() {
        let t = batch_input(&"1x16".parse().unwrap(), 8);
        assert_eq!(t.shape(), vec![8, 16]);
        assert_eq!(t.batch_size(), 8);
    }

    #[test]
    fn identity_ceiling_reports_each_size() {
        let r = compute_ceiling(
            "identity",
            &"1x4".parse().unwrap(),
            &[1, 8],
            Duration::from_millis(5),
        )
        .unwrap();
        assert_eq!(r.points.len(), 2);
        assert!(
            r.points
                .iter()
                .all(|p| p.executions > 0 && p.items_per_s > 0.0)
        );
        assert!([1, 8].contains(&r.best_batch));
    }

    #[test]
    fn unknown_model_is_refused() {
        let e = compute_ceiling(
            "nope",
            &"1x4".parse().unwrap(),
            &[1],
            Duration::from_millis(1),
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("nope"));
    }
}
