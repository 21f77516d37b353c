//! The response cache: for models whose config sets `response_cache { enable: true }` (Triton's
//! switch, meant for deterministic models), identical requests are answered from memory. The key
//! is a content hash of the model, its configuration in effect, every input (name, datatype,
//! shape, data) and the requested outputs, so a reload with another configuration never serves
//! an old answer. Bounded by bytes and time to live (moka, through `storage::KvCache`).

use std::sync::Arc;
use std::time::Duration;

use veraltheim_models::Tensor;
use veraltheim_storage::{ByteSize, CacheConfig, CacheStats, ContentHash, ContentHasher, KvCache};

pub struct Cached {
    pub outputs: Vec<Tensor>,
}

impl ByteSize for Cached {
    fn byte_size(&self) -> usize {
        self.outputs
            .iter()
            .map(|t| t.byte_size() + t.name().len() + 64)
            .sum()
    }
}

#[derive(Clone)]
pub struct ResponseCache {
    cache: KvCache<ContentHash, Arc<Cached>>,
}

impl ResponseCache {
    /// `ttl`: how long an answer lives; `None`: until evicted.
    pub fn new(max_bytes: u64, ttl: Option<Duration>) -> Self {
        ResponseCache {
            cache: KvCache::new(&CacheConfig {
                max_bytes,
                time_to_live: ttl.filter(|t| !t.is_zero()),
            }),
        }
    }

    pub fn key(
        model: &str,
        config_json: &str,
        inputs: &[Tensor],
        outputs: &[String],
    ) -> ContentHash {
        let mut h = ContentHasher::new()
            .part(model.as_bytes())
            .part(config_json.as_bytes());
        for t in inputs {
            let shape: Vec<u8> = t
                .shape()
                .iter()
                .flat_map(|d| (*d as u64).to_le_bytes())
                .collect();
            h = h
                .part(t.name().as_bytes())
                .part(t.datatype().as_str().as_bytes())
                .part(&shape)
                .part(&t.to_raw());
        }
        for o in outputs {
            h = h.part(o.as_bytes());
        }
        h.finish()
    }

    pub fn get(&self, key: &ContentHash) -> Option<Arc<Cached>> {
        self.cache.get(key)
    }

    pub fn insert(&self, key: ContentHash, outputs: Vec<Tensor>) {
        self.cache.insert(key, Arc::new(Cached { outputs }));
    }

    pub fn clear(&self) {
        self.cache.clear();
    }

    pub fn stats(&self) -> CacheStats {
        self.cache.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_covers_data_shape_config_and_outputs() {
        let a = Tensor::from_f32("INPUT0", vec![1, 2], &[1.0, 2.0]).unwrap();
        let b = Tensor::from_f32("INPUT0", vec![2, 1], &[1.0, 2.0]).unwrap();
        let c = Tensor::from_f32("INPUT0", vec![1, 2], &[1.0, 3.0]).unwrap();
        let k = |t: &Tensor, cfg: &str, out: &[String]| {
            ResponseCache::key("m", cfg, std::slice::from_ref(t), out)
        };
        let base = k(&a, "{}", &[]);
        assert_eq!(base, k(&a, "{}", &[]));
        assert_ne!(base, k(&b, "{}", &[]), "shape");
        assert_ne!(base, k(&c, "{}", &[]), "data");
        assert_ne!(base, k(&a, "{\"x\":1}", &[]), "config");
        assert_ne!(base, k(&a, "{}", &["OUTPUT0".into()]), "outputs");
    }

    #[test]
    fn stores_and_counts() {
        let cache = ResponseCache::new(1 << 20, Some(Duration::from_secs(60)));
        let key = ResponseCache::key("m", "", &[], &[]);
        assert!(cache.get(&key).is_none());
        cache.insert(
            key,
            vec![Tensor::from_f32("OUTPUT0", vec![1], &[7.0]).unwrap()],
        );
        assert_eq!(
            cache.get(&key).unwrap().outputs[0].f32_values().unwrap(),
            vec![7.0]
        );
        let s = cache.stats();
        assert_eq!((s.hits, s.misses), (1, 1));
    }
}
