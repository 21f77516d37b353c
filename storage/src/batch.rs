use serde::Serialize;

use crate::{Key, StorageError, Table};

/// One write in a [`Batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Sets `key` to `value` in `table`.
    Put {
        /// Table name.
        table: String,
        /// Encoded key.
        key: Vec<u8>,
        /// Encoded value.
        value: Vec<u8>,
    },
    /// Removes `key` from `table` (nothing if absent).
    Delete {
        /// Table name.
        table: String,
        /// Encoded key.
        key: Vec<u8>,
    },
}

impl Op {
    /// The table written.
    pub fn table(&self) -> &str {
        match self {
            Self::Put { table, .. } | Self::Delete { table, .. } => table,
        }
    }
}

/// Writes committed together: all of them or none, applied in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    ops: Vec<Op>,
}

impl Batch {
    /// An empty batch. Committing it waits for earlier writes to be durable.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a typed put.
    pub fn put<K, V>(
        &mut self,
        table: &Table<K, V>,
        key: &K,
        value: &V,
    ) -> Result<&mut Self, StorageError>
    where
        K: Key + ?Sized,
        V: Serialize,
    {
        let value = table.encode_value(value)?;
        self.put_raw(table.name(), key.encode().into_owned(), value)
    }

    /// Adds a typed delete.
    pub fn delete<K, V>(&mut self, table: &Table<K, V>, key: &K) -> Result<&mut Self, StorageError>
    where
        K: Key + ?Sized,
    {
        self.delete_raw(table.name(), key.encode().into_owned())
    }

    /// Adds a put of bytes.
    pub fn put_raw(
        &mut self,
        table: &str,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> Result<&mut Self, StorageError> {
        check_table_name(table)?;
        self.ops.push(Op::Put {
            table: table.to_owned(),
            key: key.into(),
            value: value.into(),
        });
        Ok(self)
    }

    /// Adds a delete by bytes.
    pub fn delete_raw(
        &mut self,
        table: &str,
        key: impl Into<Vec<u8>>,
    ) -> Result<&mut Self, StorageError> {
        check_table_name(table)?;
        self.ops.push(Op::Delete {
            table: table.to_owned(),
            key: key.into(),
        });
        Ok(self)
    }

    /// The writes, in order.
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// Number of writes.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether there are no writes.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Longest table name accepted, in bytes.
pub const MAX_TABLE_NAME: usize = 128;

pub(crate) fn check_table_name(name: &str) -> Result<(), StorageError> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.len() > MAX_TABLE_NAME {
        "it is longer than 128 bytes"
    } else if name.chars().any(char::is_control) {
        "it contains a control character"
    } else {
        return Ok(());
    };
    Err(StorageError::InvalidTableName {
        name: name.to_owned(),
        reason,
    })
}
