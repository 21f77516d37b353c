use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::batch::check_table_name;
use crate::store::RawEntry;
use crate::{Batch, Committed, Key, StorageError, Store};

/// A typed view of one table of a [`Store`]: keys of type `K` (ordered by their encoding, see
/// [`Key`]) and values of type `V` (stored as JSON).
///
/// ```
/// use veraltheim_storage::Table;
/// const JOBS: Table<str, String> = Table::new("jobs");
/// ```
pub struct Table<K: ?Sized, V> {
    name: &'static str,
    marker: PhantomData<fn(&K) -> V>,
}

impl<K: ?Sized, V> Clone for Table<K, V> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<K: ?Sized, V> Copy for Table<K, V> {}

impl<K: ?Sized, V> std::fmt::Debug for Table<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Table").field(&self.name).finish()
    }
}

impl<K: ?Sized, V> Table<K, V> {
    /// The table named `name` (1 to 128 bytes, no control characters; checked on use).
    pub const fn new(name: &'static str) -> Self {
        Self {
            name,
            marker: PhantomData,
        }
    }

    /// The table's name.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

impl<K: ?Sized, V: Serialize> Table<K, V> {
    pub(crate) fn encode_value(&self, value: &V) -> Result<Vec<u8>, StorageError> {
        serde_json::to_vec(value).map_err(|source| StorageError::Encode {
            table: self.name.to_owned(),
            source,
        })
    }
}

impl<K, V> Table<K, V>
where
    K: Key + ?Sized,
    V: Serialize + DeserializeOwned,
{
    /// The value under `key`.
    pub fn get<S: Store + ?Sized>(&self, store: &S, key: &K) -> Result<Option<V>, StorageError> {
        check_table_name(self.name)?;
        let key = key.encode();
        store
            .get(self.name, &key)?
            .map(|bytes| self.decode_value(&key, &bytes))
            .transpose()
    }

    /// Every entry with a key in `range`, in key order.
    pub fn range<'k, S, R>(&self, store: &S, range: R) -> Result<Vec<(K::Owned, V)>, StorageError>
    where
        S: Store + ?Sized,
        R: RangeBounds<&'k K>,
        K: 'k,
    {
        self.range_limit(store, range, usize::MAX)
    }

    /// The first `limit` entries with a key in `range`, in key order.
    pub fn range_limit<'k, S, R>(
        &self,
        store: &S,
        range: R,
        limit: usize,
    ) -> Result<Vec<(K::Owned, V)>, StorageError>
    where
        S: Store + ?Sized,
        R: RangeBounds<&'k K>,
        K: 'k,
    {
        let (lower, upper) = encode_range::<K, R>(&range);
        self.scan_encoded(store, as_ref(&lower), as_ref(&upper), limit)
    }

    /// The last `limit` entries with a key in `range`, in descending key order.
    pub fn range_limit_back<'k, S, R>(
        &self,
        store: &S,
        range: R,
        limit: usize,
    ) -> Result<Vec<(K::Owned, V)>, StorageError>
    where
        S: Store + ?Sized,
        R: RangeBounds<&'k K>,
        K: 'k,
    {
        let (lower, upper) = encode_range::<K, R>(&range);
        check_table_name(self.name)?;
        let rows = store.scan_back(self.name, as_ref(&lower), as_ref(&upper), limit)?;
        self.decode_rows(rows)
    }

    /// Every entry whose encoded key starts with `prefix`'s encoding, in key order.
    pub fn prefix<S: Store + ?Sized>(
        &self,
        store: &S,
        prefix: &K,
    ) -> Result<Vec<(K::Owned, V)>, StorageError> {
        let lower = prefix.encode();
        let upper = prefix_end(&lower);
        let upper = upper.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
        self.scan_encoded(store, Bound::Included(&lower), upper, usize::MAX)
    }

    /// Writes one entry in its own batch; resolves once durable.
    pub async fn put<S: Store + ?Sized>(
        &self,
        store: &S,
        key: &K,
        value: &V,
    ) -> Result<Committed, StorageError> {
        let mut batch = Batch::new();
        batch.put(self, key, value)?;
        store.commit(batch).await
    }

    /// Deletes one entry in its own batch; resolves once durable.
    pub async fn delete<S: Store + ?Sized>(
        &self,
        store: &S,
        key: &K,
    ) -> Result<Committed, StorageError> {
        let mut batch = Batch::new();
        batch.delete(self, key)?;
        store.commit(batch).await
    }

    /// [`Table::put`] for threads that are not async tasks.
    pub fn put_blocking<S: Store + ?Sized>(
        &self,
        store: &S,
        key: &K,
        value: &V,
    ) -> Result<Committed, StorageError> {
        let mut batch = Batch::new();
        batch.put(self, key, value)?;
        store.commit_blocking(batch)
    }

    /// [`Table::delete`] for threads that are not async tasks.
    pub fn delete_blocking<S: Store + ?Sized>(
        &self,
        store: &S,
        key: &K,
    ) -> Result<Committed, StorageError> {
        let mut batch = Batch::new();
        batch.delete(self, key)?;
        store.commit_blocking(batch)
    }

    fn decode_value(&self, key: &[u8], bytes: &[u8]) -> Result<V, StorageError> {
        serde_json::from_slice(bytes).map_err(|source| StorageError::Decode {
            table: self.name.to_owned(),
            key: K::describe(key),
            source,
        })
    }

    fn scan_encoded<S: Store + ?Sized>(
        &self,
        store: &S,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(K::Owned, V)>, StorageError> {
        check_table_name(self.name)?;
        let rows = store.scan(self.name, lower, upper, limit)?;
        self.decode_rows(rows)
    }

    fn decode_rows(&self, rows: Vec<RawEntry>) -> Result<Vec<(K::Owned, V)>, StorageError> {
        rows.into_iter()
            .map(|(key, value)| {
                let decoded = K::decode(&key).map_err(|reason| StorageError::KeyDecode {
                    table: self.name.to_owned(),
                    reason,
                })?;
                Ok((decoded, self.decode_value(&key, &value)?))
            })
            .collect()
    }
}

/// The bounds of a typed key range, encoded.
fn encode_range<'k, K, R>(range: &R) -> (Bound<Vec<u8>>, Bound<Vec<u8>>)
where
    K: Key + ?Sized + 'k,
    R: RangeBounds<&'k K>,
{
    let encode = |bound: Bound<&&'k K>| match bound {
        Bound::Included(key) => Bound::Included(key.encode().into_owned()),
        Bound::Excluded(key) => Bound::Excluded(key.encode().into_owned()),
        Bound::Unbounded => Bound::Unbounded,
    };
    (encode(range.start_bound()), encode(range.end_bound()))
}

fn as_ref(bound: &Bound<Vec<u8>>) -> Bound<&[u8]> {
    match bound {
        Bound::Included(key) => Bound::Included(key),
        Bound::Excluded(key) => Bound::Excluded(key),
        Bound::Unbounded => Bound::Unbounded,
    }
}

/// The smallest key greater than every key starting with `prefix`; `None` when there is none
/// (the prefix is empty or all `0xff`).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_skips_trailing_ff() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff]), None);
        assert_eq!(prefix_end(b""), None);
    }
}
