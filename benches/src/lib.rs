//! Shared pieces of Veraltheim's benchmarks. The criterion benches live in `benches/`; each
//! measures one layer against the layer below it, so that a result reads as an overhead. The
//! end-to-end load generator `veraltheim-load` lives in [`load`].

pub mod load;

use veraltheim_fastpath::Request;
use veraltheim_models::Tensor;

/// A one-row FP32 request of `width` values for `identity` or `cost`.
pub fn fp32_request(width: usize) -> Request {
    let values: Vec<f32> = (0..width).map(|i| i as f32).collect();
    let input =
        Tensor::from_f32("INPUT0", vec![1, width], &values).expect("the values fill the shape");
    Request::new(vec![input], 1)
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_has_one_row() {
        let r = super::fp32_request(16);
        assert_eq!(r.rows, 1);
        assert_eq!(r.inputs[0].shape(), vec![1, 16]);
    }
}
