//! Warm-up: the requests a configuration's `model_warmup` describes, run through a freshly built
//! model before it is marked READY (Triton's semantics: zeros, random data, or raw bytes from a
//! file in the model's `warmup/` folder; `count` repetitions; `batch_size` rows when batching).

use std::path::Path;

use bytes::Bytes;

use crate::config::{ModelConfig, ModelWarmup, WarmupInput};
use crate::datatype::DataType;
use crate::error::Error;
use crate::model::Model;
use crate::tensor::Tensor;

/// Runs every warm-up request of the model's configuration. `version_dir` is the serving
/// version's folder; `input_data_file`s are read from `<model folder>/warmup/`.
pub fn run(model: &dyn Model, version_dir: Option<&Path>) -> Result<(), Error> {
    let config = model.config();
    for warmup in &config.model_warmup {
        let inputs = build_inputs(config, warmup, version_dir)?;
        for _ in 0..warmup.count.max(1) {
            model.execute(&inputs).map_err(|e| {
                Error::execution(&config.name, format!("warm-up '{}': {e}", warmup.name))
            })?;
        }
    }
    Ok(())
}

/// The inputs of one warm-up request, in the configuration's input order.
pub fn build_inputs(
    config: &ModelConfig,
    warmup: &ModelWarmup,
    version_dir: Option<&Path>,
) -> Result<Vec<Tensor>, Error> {
    // Every reason below is about the caller's configuration (names, dims, the file it points
    // at): INVALID_ARGUMENT naming the warm-up, not a model that cannot be built.
    let fail = |reason: String| Error::InvalidConfig {
        model: config.name.clone(),
        reason: format!("model_warmup '{}': {reason}", warmup.name),
    };
    if let Some(extra) = warmup
        .inputs
        .keys()
        .find(|k| !config.input.iter().any(|i| &i.name == *k))
    {
        return Err(fail(format!("the model has no input '{extra}'")));
    }
    let mut tensors = Vec::with_capacity(config.input.len());
    for input in &config.input {
        let Some(data) = warmup.inputs.get(&input.name) else {
            if input.optional {
                continue;
            }
            return Err(fail(format!("no data for input '{}'", input.name)));
        };
        let datatype = DataType::from_config_name(&data.data_type)
            .map_err(|_| fail(format!("unknown data_type '{}'", data.data_type)))?;
        if let Ok(declared) = DataType::from_config_name(&input.data_type)
            && declared != datatype
        {
            return Err(fail(format!(
                "input '{}' is {} in the model, the warm-up gives {}",
                input.name, input.data_type, data.data_type
            )));
        }
        if data.dims.iter().any(|d| *d < 0) {
            return Err(fail(format!(
                "input '{}' has dims {:?}; warm-up dims must be concrete",
                input.name, data.dims
            )));
        }
        let mut shape = Vec::with_capacity(data.dims.len() + 1);
        if config.batching() {
            shape.push(i64::from(warmup.batch_size.max(1)));
        }
        shape.extend_from_slice(&data.dims);
        // Checked: the configured limits are enforced before a load, but this function must not
        // overflow (or allocate without bound) whoever calls it.
        let elements = shape
            .iter()
            .try_fold(1usize, |n, d| n.checked_mul(usize::try_from(*d).ok()?))
            .filter(|n| *n <= isize::MAX as usize / 8)
            .ok_or_else(|| {
                fail(format!(
                    "input '{}' has too many elements: shape {shape:?}",
                    input.name
                ))
            })?;
        let tensor = make_tensor(&input.name, datatype, &shape, elements, data, version_dir)
            .map_err(fail)?;
        tensors.push(tensor);
    }
    Ok(tensors)
}

fn make_tensor(
    name: &str,
    datatype: DataType,
    shape: &[i64],
    elements: usize,
    data: &WarmupInput,
    version_dir: Option<&Path>,
) -> Result<Tensor, String> {
    if !data.input_data_file.is_empty() {
        let file = Path::new(&data.input_data_file);
        if file.is_absolute() || file.components().any(|c| c.as_os_str() == "..") {
            return Err(format!(
                "input_data_file '{}' must be a plain name inside warmup/",
                data.input_data_file
            ));
        }
        let model_dir = version_dir
            .and_then(Path::parent)
            .ok_or("input_data_file needs a model folder")?;
        let path = model_dir.join("warmup").join(file);
        let raw = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        return Tensor::from_raw(name, datatype, shape, Bytes::from(raw))
            .map_err(|e| e.to_string());
    }
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    match datatype.element_size() {
        Some(size) => {
            let mut raw = vec![0u8; elements * size];
            if data.random_data {
                fill_random(datatype, &mut raw, &mut rng);
            }
            Tensor::from_raw(name, datatype, shape, Bytes::from(raw)).map_err(|e| e.to_string())
        }
        None => {
            let words = [
                "the", "model", "warms", "up", "with", "a", "few", "short", "words",
            ];
            let items = (0..elements)
                .map(|_| {
                    if data.random_data {
                        let n = 3 + (rng.next() % 10) as usize;
                        let text: Vec<&str> = (0..n)
                            .map(|_| words[(rng.next() % words.len() as u64) as usize])
                            .collect();
                        Bytes::from(text.join(" "))
                    } else {
                        Bytes::new()
                    }
                })
                .collect();
            Tensor::from_elements(name, shape, items).map_err(|e| e.to_string())
        }
    }
}

/// Random values that are valid for the type (floats in [0, 1), small integers, booleans).
fn fill_random(datatype: DataType, raw: &mut [u8], rng: &mut XorShift) {
    match datatype {
        DataType::Fp32 => {
            for chunk in raw.chunks_exact_mut(4) {
                let v = (rng.next() % 1_000_000) as f32 / 1_000_000.0;
                chunk.copy_from_slice(&v.to_le_bytes());
            }
        }
        DataType::Fp64 => {
            for chunk in raw.chunks_exact_mut(8) {
                let v = (rng.next() % 1_000_000) as f64 / 1_000_000.0;
                chunk.copy_from_slice(&v.to_le_bytes());
            }
        }
        DataType::Bool => raw.iter_mut().for_each(|b| *b = (rng.next() & 1) as u8),
        // Integers: small non-negative values, valid as token ids or indices in most models.
        _ => {
            let size = datatype.element_size().unwrap_or(1);
            for chunk in raw.chunks_exact_mut(size) {
                chunk[0] = (rng.next() % 100) as u8;
            }
        }
    }
}

/// A tiny deterministic generator: warm-up data need not be cryptographic or even good, only
/// varied, and pulling `rand` into this crate for it is not worth it.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting {
        config: ModelConfig,
        calls: AtomicUsize,
        rows: AtomicUsize,
    }

    impl Model for Counting {
        fn config(&self) -> &ModelConfig {
            &self.config
        }
        fn execute(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, Error> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.rows.store(inputs[0].batch_size(), Ordering::SeqCst);
            Ok(vec![])
        }
    }

    fn with_warmup(json: &str) -> ModelConfig {
        builtin::config("identity")
            .unwrap()
            .with_override(&format!(r#"{{"model_warmup": {json}}}"#))
            .unwrap()
    }

    #[test]
    fn runs_each_warmup_count_times_with_its_batch() {
        let config = with_warmup(
            r#"[{"name":"z","batch_size":4,"count":3,"inputs":{"INPUT0":{"data_type":"TYPE_FP32","dims":[16],"random_data":true}}}]"#,
        );
        let m = Counting {
            config,
            calls: AtomicUsize::new(0),
            rows: AtomicUsize::new(0),
        };
        run(&m, None).unwrap();
        assert_eq!(m.calls.load(Ordering::SeqCst), 3);
        assert_eq!(m.rows.load(Ordering::SeqCst), 4);
        let t = &build_inputs(&m.config, &m.config.model_warmup[0], None).unwrap()[0];
        assert_eq!(t.shape(), vec![4, 16]);
        let v = t.f32_values().unwrap();
        assert!(v.iter().all(|x| (0.0..1.0).contains(x)) && v.iter().any(|x| *x > 0.0));
    }

    #[test]
    fn bad_warmups_name_the_problem() {
        let config = with_warmup(
            r#"[{"name":"w","inputs":{"NOPE":{"data_type":"TYPE_FP32","dims":[1],"zero_data":true}}}]"#,
        );
        let e = build_inputs(&config, &config.model_warmup[0], None).unwrap_err();
        assert!(e.to_string().contains("no input 'NOPE'"), "{e}");
        let config = with_warmup(
            r#"[{"name":"w","inputs":{"INPUT0":{"data_type":"TYPE_FP32","dims":[-1],"zero_data":true}}}]"#,
        );
        let e = build_inputs(&config, &config.model_warmup[0], None).unwrap_err();
        assert!(e.to_string().contains("concrete"), "{e}");
        let config = with_warmup(
            r#"[{"name":"w","inputs":{"INPUT0":{"data_type":"TYPE_FP32","dims":[2],"input_data_file":"../x"}}}]"#,
        );
        let e = build_inputs(&config, &config.model_warmup[0], None).unwrap_err();
        assert!(e.to_string().contains("inside warmup/"), "{e}");
        // Another type than the model's input: the caller's configuration, not a model fault.
        let config = with_warmup(
            r#"[{"name":"w","inputs":{"INPUT0":{"data_type":"TYPE_INT32","dims":[2],"zero_data":true}}}]"#,
        );
        let e = build_inputs(&config, &config.model_warmup[0], None).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument, "{e}");
        assert!(
            e.to_string()
                .contains("is TYPE_FP32 in the model, the warm-up gives TYPE_INT32"),
            "{e}"
        );
        let e = builtin::config("identity")
            .unwrap()
            .with_override(r#"{"model_warmup":[{"name":"w","inputs":{"INPUT0":{"data_type":"TYPE_FP32","dims":[1]}}}]}"#)
            .unwrap_err();
        assert!(e.to_string().contains("exactly one of"), "{e}");
    }

    #[test]
    fn reads_raw_data_from_the_warmup_folder() {
        let root = std::env::temp_dir().join(format!("veraltheim-warmup-{}", std::process::id()));
        std::fs::create_dir_all(root.join("m/1")).unwrap();
        std::fs::create_dir_all(root.join("m/warmup")).unwrap();
        let values: Vec<u8> = [1.5f32, 2.5].iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(root.join("m/warmup/in.bin"), values).unwrap();
        let config = with_warmup(
            r#"[{"name":"f","batch_size":1,"inputs":{"INPUT0":{"data_type":"TYPE_FP32","dims":[2],"input_data_file":"in.bin"}}}]"#,
        );
        let t =
            &build_inputs(&config, &config.model_warmup[0], Some(&root.join("m/1"))).unwrap()[0];
        assert_eq!(t.f32_values().unwrap(), vec![1.5, 2.5]);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
