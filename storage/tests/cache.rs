//! The in-memory cache: counters, the byte bound, time to live, content-hash keys.

use std::sync::Arc;
use std::time::Duration;

use veraltheim_storage::{CacheConfig, ContentHash, KvCache};

fn config(max_bytes: u64, time_to_live: Option<Duration>) -> CacheConfig {
    CacheConfig {
        max_bytes,
        time_to_live,
    }
}

#[test]
fn counts_hits_misses_and_inserts() {
    let cache: KvCache<String, Vec<u8>> = KvCache::new(&config(1 << 20, None));
    assert_eq!(cache.get("a"), None);
    cache.insert("a".to_owned(), vec![1, 2, 3]);
    assert_eq!(cache.get("a"), Some(vec![1, 2, 3]));
    assert_eq!(cache.get("a"), Some(vec![1, 2, 3]));
    assert_eq!(cache.remove("a"), Some(vec![1, 2, 3]));
    assert_eq!(cache.get("a"), None);
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses, stats.inserts), (2, 2, 1));
    assert_eq!(
        (stats.evictions, stats.expirations, stats.entries),
        (0, 0, 0)
    );
}

#[test]
fn stays_within_its_byte_bound_and_counts_evictions() {
    let cache: KvCache<ContentHash, Vec<u8>> = KvCache::new(&config(1000, None));
    for n in 0u32..50 {
        // 32-byte key + 68-byte value = 100 bytes each: room for 10.
        cache.insert(ContentHash::of(&n.to_le_bytes()), vec![0; 68]);
    }
    let stats = cache.stats();
    assert!(stats.bytes <= 1000, "{stats:?}");
    assert!(stats.entries <= 10, "{stats:?}");
    assert_eq!(stats.bytes, stats.entries * 100);
    assert_eq!(
        stats.evictions,
        50 - stats.entries,
        "every entry not held was evicted"
    );
    assert!(stats.evictions >= 40);
}

#[test]
fn an_entry_larger_than_the_bound_is_not_kept() {
    let cache: KvCache<String, Vec<u8>> = KvCache::new(&config(100, None));
    cache.insert("huge".to_owned(), vec![0; 1000]);
    let stats = cache.stats();
    assert_eq!((stats.entries, stats.bytes, stats.evictions), (0, 0, 1));
    assert_eq!(cache.get("huge"), None);
}

#[test]
fn entries_expire_after_their_time_to_live() {
    let cache: KvCache<String, Vec<u8>> =
        KvCache::new(&config(1 << 20, Some(Duration::from_millis(20))));
    cache.insert("a".to_owned(), vec![1]);
    // moka reads its own clock; only a real wait lets the entry age.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(cache.get("a"), None);
    let stats = cache.stats();
    assert_eq!((stats.misses, stats.expirations, stats.entries), (1, 1, 0));
}

#[test]
fn caches_results_by_the_content_hash_of_the_request() {
    let cache: KvCache<ContentHash, Arc<Vec<u8>>> = KvCache::new(&config(1 << 20, None));
    let key = |model: &str, input: &[u8]| ContentHash::of_parts([model.as_bytes(), input]);
    cache.insert(key("minilm", b"hello"), Arc::new(vec![7; 16]));
    assert_eq!(
        cache.get(&key("minilm", b"hello")).as_deref(),
        Some(&vec![7; 16])
    );
    assert_eq!(cache.get(&key("minilm", b"hellO")), None);
    assert_eq!(
        cache.get(&key("minil", b"mhello")),
        None,
        "parts are framed"
    );
    assert_eq!(cache.stats().bytes, 32 + 16);
}

#[test]
fn clones_share_entries_and_clear_empties_them() {
    let cache: KvCache<String, String> = KvCache::new(&config(1 << 20, None));
    let other = cache.clone();
    other.insert("k".to_owned(), "v".to_owned());
    assert_eq!(cache.get("k").as_deref(), Some("v"));
    cache.clear();
    assert_eq!(other.stats().entries, 0);
}
