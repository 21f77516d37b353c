use std::borrow::Borrow;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use moka::notification::RemovalCause;
use moka::sync::Cache;

use crate::ContentHash;

/// How many bytes a cache key or value holds, for the cache's size bound.
///
/// Approximate is fine; it should grow with the real heap use.
pub trait ByteSize {
    /// Bytes held.
    fn byte_size(&self) -> usize;
}

impl ByteSize for Vec<u8> {
    fn byte_size(&self) -> usize {
        self.len()
    }
}

impl ByteSize for String {
    fn byte_size(&self) -> usize {
        self.len()
    }
}

impl ByteSize for Arc<[u8]> {
    fn byte_size(&self) -> usize {
        self.len()
    }
}

impl ByteSize for Arc<str> {
    fn byte_size(&self) -> usize {
        self.len()
    }
}

impl ByteSize for ContentHash {
    fn byte_size(&self) -> usize {
        self.as_bytes().len()
    }
}

impl ByteSize for u64 {
    fn byte_size(&self) -> usize {
        8
    }
}

impl<T: ByteSize> ByteSize for Arc<T> {
    fn byte_size(&self) -> usize {
        T::byte_size(self)
    }
}

/// The bounds of a [`KvCache`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// Most bytes (keys and values, by [`ByteSize`]) held at once; beyond it entries are evicted.
    pub max_bytes: u64,
    /// How long an entry lives after it is inserted; `None` for no limit.
    pub time_to_live: Option<Duration>,
}

/// Counters of a [`KvCache`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups that found a live entry.
    pub hits: u64,
    /// Lookups that found nothing.
    pub misses: u64,
    /// Entries inserted (including replacements).
    pub inserts: u64,
    /// Entries evicted to keep within `max_bytes` (including entries too large to admit).
    pub evictions: u64,
    /// Entries removed because their time to live passed.
    pub expirations: u64,
    /// Entries now held.
    pub entries: u64,
    /// Bytes now held, by [`ByteSize`].
    pub bytes: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    inserts: AtomicU64,
    evictions: AtomicU64,
    expirations: AtomicU64,
}

/// A concurrent in-memory cache bounded by bytes and time to live. Cheap to clone; clones share
/// the entries.
///
/// Eviction follows moka's TinyLFU policy: under pressure, a new entry that is unlikely to be
/// used again may be refused in favour of frequently used ones (counted as an eviction).
pub struct KvCache<K, V> {
    cache: Cache<K, V>,
    counters: Arc<Counters>,
}

impl<K, V> Clone for KvCache<K, V> {
    fn clone(&self) -> Self {
        Self {
            cache: self.cache.clone(),
            counters: Arc::clone(&self.counters),
        }
    }
}

impl<K, V> KvCache<K, V>
where
    K: Hash + Eq + ByteSize + Send + Sync + 'static,
    V: Clone + ByteSize + Send + Sync + 'static,
{
    /// An empty cache within `config`'s bounds.
    pub fn new(config: &CacheConfig) -> Self {
        let counters = Arc::new(Counters::default());
        let listener_counters = Arc::clone(&counters);
        let mut builder = Cache::builder()
            .max_capacity(config.max_bytes)
            .weigher(|key: &K, value: &V| {
                u32::try_from(key.byte_size().saturating_add(value.byte_size())).unwrap_or(u32::MAX)
            })
            .eviction_listener(move |_key, _value, cause| match cause {
                RemovalCause::Size => {
                    listener_counters.evictions.fetch_add(1, Ordering::Relaxed);
                }
                RemovalCause::Expired => {
                    listener_counters
                        .expirations
                        .fetch_add(1, Ordering::Relaxed);
                }
                RemovalCause::Explicit | RemovalCause::Replaced => {}
            });
        if let Some(ttl) = config.time_to_live {
            builder = builder.time_to_live(ttl);
        }
        Self {
            cache: builder.build(),
            counters,
        }
    }

    /// The value cached for `key`, counting a hit or a miss.
    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let found = self.cache.get(key);
        let counter = if found.is_some() {
            &self.counters.hits
        } else {
            &self.counters.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Caches `value` under `key`, replacing any earlier value.
    pub fn insert(&self, key: K, value: V) {
        self.counters.inserts.fetch_add(1, Ordering::Relaxed);
        self.cache.insert(key, value);
    }

    /// Removes and returns the value under `key`.
    pub fn remove<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.cache.remove(key)
    }

    /// Removes every entry.
    pub fn clear(&self) {
        self.cache.invalidate_all();
        self.cache.run_pending_tasks();
    }

    /// Counters, after finishing pending housekeeping so that sizes and evictions are current.
    pub fn stats(&self) -> CacheStats {
        self.cache.run_pending_tasks();
        CacheStats {
            hits: self.counters.hits.load(Ordering::Relaxed),
            misses: self.counters.misses.load(Ordering::Relaxed),
            inserts: self.counters.inserts.load(Ordering::Relaxed),
            evictions: self.counters.evictions.load(Ordering::Relaxed),
            expirations: self.counters.expirations.load(Ordering::Relaxed),
            entries: self.cache.entry_count(),
            bytes: self.cache.weighted_size(),
        }
    }
}

impl<K, V> std::fmt::Debug for KvCache<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("entries", &self.cache.entry_count())
            .field("bytes", &self.cache.weighted_size())
            .finish()
    }
}
