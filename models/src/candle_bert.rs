//! BERT-family sentence embedders on candle: `config.json` + `model.safetensors` (read through a
//! memory map) into candle-transformers' `BertModel`, wrapped in the shared
//! [`SentenceEmbedder`](crate::text::SentenceEmbedder) pipeline (tokenizer, pooling,
//! normalisation).
//!
//! Runs on the CPU by default; with the `cuda` feature a model can be placed on a GPU.
//! Padding never changes a sentence's embedding: `BertModel::forward` turns the attention mask
//! into an additive `f32::MIN` bias on the attention scores of padded keys, so after the softmax
//! real tokens never attend to padding, and pooling ignores the padded positions themselves.
//!
//! Memory: the weights go through a counting backend while `BertModel` loads, so the encoder
//! knows the bytes of every tensor it took (as placed: F32, on its device); that is what
//! [`Model::memory_bytes`] reports. Tensors of the file that BERT does not read (a pooler,
//! `position_ids`) are never placed and not counted.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Device, Shape, Tensor as CandleTensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use candle_transformers::models::bert::{BertModel, Config as BertConfig};

use crate::config::ModelConfig;
use crate::error::Error;
use crate::model::Model;
use crate::text::{Encoder, SentenceEmbedder, TokenBatch};

/// The backend name candle models carry in their configuration.
pub const BACKEND: &str = "candle";

/// A BERT encoder (`BertModel`) on a candle device: token ids in, last hidden state out.
pub struct CandleBertEncoder {
    /// Names the model in error messages.
    name: String,
    model: BertModel,
    config: BertConfig,
    device: Device,
    /// The bytes of the weights it holds (on `device`).
    weight_bytes: u64,
}

impl std::fmt::Debug for CandleBertEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CandleBertEncoder")
            .field("name", &self.name)
            .field("config", &self.config)
            .field("device", &self.device)
            .field("weight_bytes", &self.weight_bytes)
            .finish_non_exhaustive()
    }
}

impl CandleBertEncoder {
    /// Loads `<dir>/config.json` (a BERT configuration) and `<dir>/model.safetensors` onto
    /// `device`. Errors name the folder as the model.
    pub fn load(dir: &Path, device: Device) -> Result<CandleBertEncoder, Error> {
        let name = dir.file_name().map_or_else(
            || dir.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        Self::load_named(&name, dir, device)
    }

    /// [`load`](Self::load), with errors naming `model`.
    pub fn load_named(model: &str, dir: &Path, device: Device) -> Result<CandleBertEncoder, Error> {
        let fail = |reason: String| Error::load(model, reason);
        let config_file = dir.join("config.json");
        let text = std::fs::read_to_string(&config_file)
            .map_err(|e| fail(format!("cannot read {}: {e}", config_file.display())))?;
        let config: BertConfig = serde_json::from_str(&text).map_err(|e| {
            fail(format!(
                "{} is not a BERT configuration: {e}",
                config_file.display()
            ))
        })?;
        if let Some(kind) = &config.model_type
            && kind != "bert"
        {
            return Err(fail(format!(
                "{}: model_type is '{kind}'; the candle backend runs BERT models only",
                config_file.display()
            )));
        }
        if config.num_attention_heads == 0
            || config.hidden_size == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
        {
            return Err(fail(format!(
                "{}: hidden_size {} is not a positive multiple of num_attention_heads {}",
                config_file.display(),
                config.hidden_size,
                config.num_attention_heads
            )));
        }
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(fail(format!(
                "{} is missing (the candle backend reads safetensors weights only)",
                weights.display()
            )));
        }
        // SAFETY: the file is mapped read-only for the duration of loading; the weights are
        // copied into the device's memory and the map is dropped with the VarBuilder. A model
        // repository does not rewrite a model's files in place while it loads.
        let file = unsafe { candle_core::safetensors::MmapedSafetensors::new(&weights) }
            .map_err(|e| fail(format!("cannot map {}: {e}", weights.display())))?;
        Self::from_backend(model, config, Box::new(file), device)
            .map_err(|e| fail(format!("{}: {e}", weights.display())))
    }

    /// Builds the encoder from the weights `backend` gives, placed on `device` as F32, counting
    /// the bytes of every tensor the model takes.
    fn from_backend(
        model: &str,
        config: BertConfig,
        backend: Box<dyn SimpleBackend>,
        device: Device,
    ) -> candle_core::Result<CandleBertEncoder> {
        let taken = Arc::new(Mutex::new(BTreeMap::new()));
        let counting = Counting {
            inner: backend,
            taken: Arc::clone(&taken),
        };
        let vb = VarBuilder::from_backend(Box::new(counting), DType::F32, device.clone());
        let bert = BertModel::load(vb, &config)?;
        let weight_bytes = taken
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .fold(0u64, |sum: u64, b: &u64| sum.saturating_add(*b));
        Ok(CandleBertEncoder {
            name: model.to_string(),
            model: bert,
            config,
            device,
            weight_bytes,
        })
    }

    /// The bytes of the weights this encoder holds on its device (each tensor it took, once).
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The BERT configuration read from `config.json`.
    pub fn bert_config(&self) -> &BertConfig {
        &self.config
    }

    fn fail(&self, reason: impl std::fmt::Display) -> Error {
        Error::execution(&self.name, reason)
    }

    /// Converts one `[batch, seq]` field to u32 ids below `limit`, naming the field on error.
    fn ids(&self, field: &str, values: &[i64], limit: usize) -> Result<Vec<u32>, Error> {
        values
            .iter()
            .enumerate()
            .map(|(at, &v)| {
                u32::try_from(v)
                    .ok()
                    .filter(|&u| (u as usize) < limit)
                    .ok_or_else(|| {
                        self.fail(format!(
                            "{field}[{at}] is {v}, outside 0..{limit} of the model's \
                             configuration"
                        ))
                    })
            })
            .collect()
    }
}

/// A weights source that records, per tensor name, the bytes of each tensor it hands out as
/// placed (after the conversion to the asked dtype, on the asked device). A name asked twice
/// counts once: the model holds one copy.
struct Counting {
    inner: Box<dyn SimpleBackend>,
    taken: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl Counting {
    fn record(&self, name: &str, tensor: &CandleTensor) {
        let bytes =
            (tensor.elem_count() as u64).saturating_mul(tensor.dtype().size_in_bytes() as u64);
        self.taken
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string(), bytes);
    }
}

impl SimpleBackend for Counting {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<CandleTensor> {
        let tensor = self.inner.get(shape, name, init, dtype, device)?;
        self.record(name, &tensor);
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<CandleTensor> {
        let tensor = self.inner.get_unchecked(name, dtype, device)?;
        self.record(name, &tensor);
        Ok(tensor)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

impl Encoder for CandleBertEncoder {
    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    fn memory_bytes(&self) -> Option<u64> {
        Some(self.weight_bytes)
    }

    fn encode(&self, batch: &TokenBatch) -> Result<Vec<f32>, Error> {
        let (rows, seq) = (batch.batch, batch.seq);
        let Some(n) = rows.checked_mul(seq) else {
            return Err(self.fail(format!("a batch of {rows} × {seq} tokens is too large")));
        };
        for (field, len) in [
            ("input_ids", batch.input_ids.len()),
            ("attention_mask", batch.attention_mask.len()),
            ("token_type_ids", batch.token_type_ids.len()),
        ] {
            if len != n {
                return Err(self.fail(format!(
                    "{field} has {len} values for a batch of {rows} × {seq} tokens"
                )));
            }
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        if seq > self.config.max_position_embeddings {
            return Err(self.fail(format!(
                "{seq} tokens is more than the model's {} positions",
                self.config.max_position_embeddings
            )));
        }
        let ids = self.ids("input_ids", &batch.input_ids, self.config.vocab_size)?;
        let types = self.ids(
            "token_type_ids",
            &batch.token_type_ids,
            self.config.type_vocab_size,
        )?;
        let mask = self.ids("attention_mask", &batch.attention_mask, 2)?;
        let run = || -> candle_core::Result<Vec<f32>> {
            let ids = CandleTensor::from_vec(ids, (rows, seq), &self.device)?;
            let types = CandleTensor::from_vec(types, (rows, seq), &self.device)?;
            let mask = CandleTensor::from_vec(mask, (rows, seq), &self.device)?;
            let hidden = self.model.forward(&ids, &types, Some(&mask))?;
            hidden.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
        };
        run().map_err(|e| self.fail(format!("candle BERT forward failed: {e}")))
    }
}

/// The candle device for `gpu`: the CPU for `None`; CUDA device `i` for `Some(i)` when built with
/// the `cuda` feature, an error naming the missing feature otherwise.
pub fn device(model: &str, gpu: Option<usize>) -> Result<Device, Error> {
    match gpu {
        None => Ok(Device::Cpu),
        #[cfg(feature = "cuda")]
        Some(i) => Device::new_cuda(i)
            .map_err(|e| Error::load(model, format!("cannot open CUDA device {i}: {e}"))),
        #[cfg(not(feature = "cuda"))]
        Some(i) => Err(Error::load(
            model,
            format!(
                "GPU {i} was asked for, but Veraltheim was built without the cuda feature \
                 (rebuild with `--features cuda` to run candle models on a GPU)"
            ),
        )),
    }
}

/// Loads a sentence-transformers BERT model folder (`config.json`, `model.safetensors`,
/// `tokenizer.json`, optional `1_Pooling/`, `sentence_bert_config.json`, `modules.json`) as a
/// [`SentenceEmbedder`] on candle, on the CPU or (`gpu`, `cuda` feature) a CUDA device.
/// The configuration is completed as [`SentenceEmbedder::new`] describes.
pub fn load(config: ModelConfig, dir: &Path, gpu: Option<usize>) -> Result<Arc<dyn Model>, Error> {
    let device = device(&config.name, gpu)?;
    let encoder = CandleBertEncoder::load_named(&config.name, dir, device)?;
    Ok(Arc::new(SentenceEmbedder::new(config, dir, encoder)?))
}

#[cfg(test)]
mod tests {
    use candle_nn::VarMap;

    use super::*;

    /// A tiny BERT with random weights: enough to check the input handling and that padding
    /// does not change the real tokens' hidden states.
    fn tiny() -> CandleBertEncoder {
        let config = BertConfig {
            vocab_size: 12,
            hidden_size: 8,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 16,
            max_position_embeddings: 6,
            ..BertConfig::default()
        };
        CandleBertEncoder::from_backend("tiny", config, Box::new(VarMap::new()), Device::Cpu)
            .unwrap()
    }

    fn batch(rows: &[&[i64]], seq: usize) -> TokenBatch {
        let mut b = TokenBatch {
            batch: rows.len(),
            seq,
            ..TokenBatch::default()
        };
        for row in rows {
            b.input_ids.extend(row.iter().copied());
            b.input_ids.extend(std::iter::repeat_n(0, seq - row.len()));
            b.attention_mask.extend(std::iter::repeat_n(1, row.len()));
            b.attention_mask
                .extend(std::iter::repeat_n(0, seq - row.len()));
        }
        b.token_type_ids = vec![0; rows.len() * seq];
        b
    }

    /// The real thing: run on a machine with an NVIDIA GPU (`cargo test -p veraltheim-models
    /// --features cuda --lib -- --ignored gpu`). A BERT the size of all-MiniLM-L6-v2 with random
    /// weights runs on the CPU and, with the same weights, on CUDA device 0; the hidden states
    /// must agree. Prints both times for a batch of 64 × 128 tokens.
    #[cfg(feature = "cuda")]
    #[test]
    #[ignore = "needs an NVIDIA GPU and driver"]
    fn gpu_encodes_like_the_cpu() {
        let config = BertConfig {
            vocab_size: 30522,
            hidden_size: 384,
            num_hidden_layers: 6,
            num_attention_heads: 12,
            intermediate_size: 1536,
            max_position_embeddings: 512,
            ..BertConfig::default()
        };
        let vars = VarMap::new();
        let cpu = CandleBertEncoder::from_backend(
            "cpu",
            config.clone(),
            Box::new(vars.clone()),
            Device::Cpu,
        )
        .unwrap();
        let cuda = device("gpu", Some(0)).expect("CUDA device 0");
        let weights: std::collections::HashMap<String, CandleTensor> = vars
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().to_device(&cuda).unwrap()))
            .collect();
        let gpu = CandleBertEncoder::from_backend("gpu", config, Box::new(weights), cuda).unwrap();
        assert!(gpu.device().is_cuda());

        let rows: Vec<Vec<i64>> = (0..64)
            .map(|r| {
                (0..(16 + r % 112))
                    .map(|t| ((r * 131 + t * 17) % 30000 + 100) as i64)
                    .collect()
            })
            .collect();
        let refs: Vec<&[i64]> = rows.iter().map(Vec::as_slice).collect();
        let b = batch(&refs, 128);
        let time = |enc: &CandleBertEncoder| {
            enc.encode(&b).unwrap(); // warm-up (kernel loading on the GPU)
            let start = std::time::Instant::now();
            let out = enc.encode(&b).unwrap();
            (out, start.elapsed())
        };
        let (on_cpu, cpu_time) = time(&cpu);
        let (on_gpu, gpu_time) = time(&gpu);
        assert_eq!(on_cpu.len(), on_gpu.len());
        let worst = on_cpu
            .iter()
            .zip(&on_gpu)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        println!(
            "batch 64 × 128 tokens: cpu {cpu_time:?}, gpu {gpu_time:?}; largest difference {worst:e}"
        );
        assert!(worst < 1e-3, "GPU and CPU differ by {worst}");
    }

    #[test]
    fn memory_is_the_bytes_of_the_weights_taken() {
        let enc = tiny();
        // vocab 12, hidden 8, 6 positions, 2 token types, 2 layers, intermediate 16; all F32.
        let (h, i) = (8u64, 16u64);
        let embeddings = 12 * h + 6 * h + 2 * h + 2 * h;
        let layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h;
        assert_eq!(enc.weight_bytes(), 4 * (embeddings + 2 * layer));
        assert_eq!(enc.memory_bytes(), Some(enc.weight_bytes()));
    }

    #[test]
    fn padding_does_not_change_real_tokens() {
        let enc = tiny();
        let alone = enc.encode(&batch(&[&[2, 5, 3]], 3)).unwrap();
        let padded = enc
            .encode(&batch(&[&[2, 7, 7, 8, 3], &[2, 5, 3]], 5))
            .unwrap();
        assert_eq!(alone.len(), 3 * 8);
        assert_eq!(padded.len(), 2 * 5 * 8);
        let second = &padded[5 * 8..5 * 8 + 3 * 8];
        for (a, p) in alone.iter().zip(second) {
            assert!((a - p).abs() < 1e-5, "{alone:?}\nvs\n{second:?}");
        }
        // The check can fail: without the mask, the padded run differs.
        let mut unmasked = batch(&[&[2, 7, 7, 8, 3], &[2, 5, 3]], 5);
        unmasked.attention_mask = vec![1; 10];
        let differs = enc.encode(&unmasked).unwrap();
        assert!(
            alone
                .iter()
                .zip(&differs[5 * 8..5 * 8 + 3 * 8])
                .any(|(a, d)| (a - d).abs() > 1e-4)
        );
    }

    #[test]
    fn bad_batches_are_errors_not_panics() {
        let enc = tiny();
        let mut b = batch(&[&[2, 3]], 2);
        b.input_ids[1] = 12;
        let e = enc.encode(&b).unwrap_err().to_string();
        assert!(e.contains("input_ids[1] is 12, outside 0..12"), "{e}");
        let mut b = batch(&[&[2, 3]], 2);
        b.token_type_ids[0] = -1;
        let e = enc.encode(&b).unwrap_err().to_string();
        assert!(e.contains("token_type_ids[0] is -1"), "{e}");
        let mut b = batch(&[&[2, 3]], 2);
        b.attention_mask.pop();
        let e = enc.encode(&b).unwrap_err().to_string();
        assert!(e.contains("attention_mask has 1 values"), "{e}");
        let e = enc
            .encode(&batch(&[&[1, 1, 1, 1, 1, 1, 1]], 7))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("7 tokens is more than the model's 6 positions"),
            "{e}"
        );
        assert!(enc.encode(&TokenBatch::default()).unwrap().is_empty());
    }

    #[test]
    fn missing_or_wrong_files_are_load_errors() {
        let dir =
            std::env::temp_dir().join(format!("veraltheim-candle-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = CandleBertEncoder::load(&dir, Device::Cpu).unwrap_err();
        assert!(matches!(e, Error::Load { .. }));
        assert!(e.to_string().contains("config.json"), "{e}");
        std::fs::write(dir.join("config.json"), r#"{"hidden_size": 8}"#).unwrap();
        let e = CandleBertEncoder::load(&dir, Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a BERT configuration"), "{e}");
        let mut config = serde_json::to_value(BertConfigJson::default()).unwrap();
        config["model_type"] = "roberta".into();
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let e = CandleBertEncoder::load(&dir, Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("model_type is 'roberta'"), "{e}");
        config["model_type"] = "bert".into();
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let e = CandleBertEncoder::load(&dir, Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.safetensors is missing"), "{e}");
        std::fs::write(dir.join("model.safetensors"), b"not safetensors").unwrap();
        let e = CandleBertEncoder::load(&dir, Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.safetensors"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_gpu_without_the_cuda_feature_is_a_clear_error() {
        let config = crate::text::default_config("minilm", BACKEND, 384);
        let e = load(config, Path::new("/nonexistent"), Some(0))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("model 'minilm'"), "{e}");
        assert!(e.contains("built without the cuda feature"), "{e}");
    }

    /// candle's `Config` is not `Serialize`; this is the same JSON shape for writing test files.
    #[derive(serde::Serialize)]
    struct BertConfigJson {
        vocab_size: usize,
        hidden_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        intermediate_size: usize,
        hidden_act: &'static str,
        hidden_dropout_prob: f64,
        max_position_embeddings: usize,
        type_vocab_size: usize,
        initializer_range: f64,
        layer_norm_eps: f64,
        pad_token_id: usize,
        model_type: &'static str,
    }

    impl Default for BertConfigJson {
        fn default() -> Self {
            BertConfigJson {
                vocab_size: 12,
                hidden_size: 8,
                num_hidden_layers: 1,
                num_attention_heads: 2,
                intermediate_size: 16,
                hidden_act: "gelu",
                hidden_dropout_prob: 0.1,
                max_position_embeddings: 6,
                type_vocab_size: 2,
                initializer_range: 0.02,
                layer_norm_eps: 1e-12,
                pad_token_id: 0,
                model_type: "bert",
            }
        }
    }
}
