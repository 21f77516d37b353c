//! Checks a request's tensors against the model's configuration before it is queued, so that a
//! bad request is refused at the door with a message naming the input, and a backend only ever
//! sees inputs it declared.

use crate::config::ModelConfig;
use crate::error::Error;
use crate::limits::Limits;
use crate::tensor::Tensor;

/// Validates `inputs` against `config` and returns them in the model's input order, together with
/// the request's batch size (1 for a model that does not batch).
/// Every tensor's shape and the request's bytes are checked against `limits` first: a shape
/// with zero elements carries no data, so its dimensions are bounded only here.
pub fn validate_inputs(
    config: &ModelConfig,
    inputs: Vec<Tensor>,
    limits: &Limits,
) -> Result<(Vec<Tensor>, usize), Error> {
    let model = &config.name;
    let mut bytes: usize = 0;
    for tensor in &inputs {
        limits
            .check_shape(&format!("input '{}'", tensor.name()), tensor.shape())
            .map_err(Error::InvalidRequest)?;
        bytes = bytes
            .checked_add(tensor.byte_size())
            .filter(|b| *b <= limits.max_request_bytes)
            .ok_or_else(|| {
                Error::InvalidRequest(format!(
                    "the request's inputs hold more than limits.max_request_bytes ({}) bytes",
                    limits.max_request_bytes
                ))
            })?;
    }
    let expected_names = || {
        config
            .input
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut slots: Vec<Option<Tensor>> = vec![None; config.input.len()];
    for tensor in inputs {
        let Some(index) = config.input.iter().position(|i| i.name == tensor.name()) else {
            return Err(Error::InvalidRequest(format!(
                "unexpected input '{}' for model '{model}' (its inputs: {})",
                tensor.name(),
                expected_names()
            )));
        };
        if slots[index].is_some() {
            return Err(Error::InvalidRequest(format!(
                "input '{}' is given more than once",
                tensor.name()
            )));
        }
        slots[index] = Some(tensor);
    }

    let mut batch: Option<usize> = None;
    let mut ordered = Vec::with_capacity(slots.len());
    for (spec, slot) in config.input.iter().zip(slots) {
        let Some(tensor) = slot else {
            if spec.optional {
                continue;
            }
            return Err(Error::InvalidRequest(format!(
                "missing input '{}' for model '{model}'",
                spec.name
            )));
        };
        let want = ModelConfig::datatype_of(spec);
        if tensor.datatype() != want {
            return Err(Error::InvalidRequest(format!(
                "input '{}': datatype {} does not match model '{model}', which expects {want}",
                tensor.name(),
                tensor.datatype()
            )));
        }
        let dims: &[usize] = if config.batching() {
            let Some((&rows, rest)) = tensor.shape().split_first() else {
                return Err(Error::InvalidRequest(format!(
                    "input '{}': shape [] has no batch dimension; model '{model}' expects {:?}",
                    tensor.name(),
                    config.full_shape(spec)
                )));
            };
            if rows == 0 || rows > config.max_batch_size as usize {
                return Err(Error::InvalidRequest(format!(
                    "input '{}': batch size {rows} is outside 1..={} (max_batch_size of model '{model}')",
                    tensor.name(),
                    config.max_batch_size
                )));
            }
            match batch {
                None => batch = Some(rows),
                Some(b) if b != rows => {
                    return Err(Error::InvalidRequest(format!(
                        "input '{}': batch size {rows} differs from the other inputs' {b}",
                        tensor.name()
                    )));
                }
                Some(_) => {}
            }
            rest
        } else {
            tensor.shape()
        };
        let fits = dims.len() == spec.dims.len()
            && dims
                .iter()
                .zip(&spec.dims)
                .all(|(&d, &want)| want < 0 || d as i64 == want);
        if !fits {
            return Err(Error::InvalidRequest(format!(
                "input '{}': shape {:?} does not match model '{model}', which expects {:?}",
                tensor.name(),
                tensor.shape(),
                config.full_shape(spec)
            )));
        }
        ordered.push(tensor);
    }
    Ok((ordered, batch.unwrap_or(1)))
}

/// Checks that every requested output exists.
pub fn validate_outputs(config: &ModelConfig, requested: &[String]) -> Result<(), Error> {
    for name in requested {
        if !config.output.iter().any(|o| &o.name == name) {
            return Err(Error::InvalidRequest(format!(
                "unknown output '{name}' requested from model '{}' (its outputs: {})",
                config.name,
                config
                    .output
                    .iter()
                    .map(|o| o.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin;

    fn identity() -> ModelConfig {
        builtin::config("identity").unwrap()
    }

    fn t(name: &str, shape: Vec<usize>) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::from_f32(name, shape, &vec![1.0; n]).unwrap()
    }

    #[test]
    fn accepts_matching_input() {
        let (inputs, batch) = validate_inputs(
            &identity(),
            vec![t("INPUT0", vec![3, 16])],
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(batch, 3);
        assert_eq!(inputs.len(), 1);
    }

    #[test]
    fn refusals_name_the_input() {
        let c = identity();
        let cases = [
            (vec![t("FOO", vec![1, 4])], "unexpected input 'FOO'"),
            (vec![], "missing input 'INPUT0'"),
            (vec![t("INPUT0", vec![4])], "does not match"),
            (vec![t("INPUT0", vec![65, 1])], "batch size 65"),
            (vec![t("INPUT0", vec![0, 1])], "batch size 0"),
            (
                vec![t("INPUT0", vec![1, 1]), t("INPUT0", vec![1, 1])],
                "more than once",
            ),
        ];
        for (inputs, want) in cases {
            let err = validate_inputs(&c, inputs, &Limits::default()).unwrap_err();
            assert!(
                err.to_string().contains(want),
                "{err} should contain {want}"
            );
        }
        let fp32 = t("INPUT0", vec![1, 2]);
        let wrong = Tensor::new(
            "INPUT0",
            crate::DataType::Int32,
            vec![1, 2],
            fp32.data().clone(),
        )
        .unwrap();
        let err = validate_inputs(&c, vec![wrong], &Limits::default()).unwrap_err();
        assert!(err.to_string().contains("datatype INT32"), "{err}");
    }

    #[test]
    fn shapes_and_bytes_beyond_the_limits_are_refused_by_name() {
        let c = identity();
        // Zero elements, so no data: only the limit bounds the huge dimension.
        let empty = Tensor::from_raw(
            "INPUT0",
            crate::DataType::Fp32,
            &[1, 0, 1 << 40],
            bytes::Bytes::new(),
        )
        .unwrap();
        let err = validate_inputs(&c, vec![empty], &Limits::default()).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument);
        assert!(
            err.to_string().contains("limits.max_tensor_elements"),
            "{err}"
        );
        let small = Limits {
            max_request_bytes: 16,
            ..Limits::default()
        };
        let err = validate_inputs(&c, vec![t("INPUT0", vec![1, 8])], &small).unwrap_err();
        assert!(
            err.to_string().contains("limits.max_request_bytes"),
            "{err}"
        );
    }

    #[test]
    fn outputs_must_exist() {
        assert!(validate_outputs(&identity(), &["OUTPUT0".into()]).is_ok());
        let err = validate_outputs(&identity(), &["OUT".into()]).unwrap_err();
        assert!(err.to_string().contains("'OUT'"));
    }
}
