use std::path::PathBuf;

use thiserror::Error;

/// Everything that can go wrong in storage, each with what the caller can do about it.
#[derive(Debug, Error)]
pub enum StorageError {
    /// The database file could not be opened or created.
    #[error("cannot open the store at {path}: {source} (is another process using it?)")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: redb::DatabaseError,
    },
    /// The embedded database failed an operation.
    #[error("the store failed to {action}: {message}")]
    Backend {
        /// What it was doing.
        action: &'static str,
        /// The database's own words.
        message: String,
    },
    /// A table name is unusable.
    #[error("invalid table name {name:?}: {reason}")]
    InvalidTableName {
        /// The name as given.
        name: String,
        /// What rule it breaks.
        reason: &'static str,
    },
    /// A value could not be serialized.
    #[error("cannot encode a value for table {table:?}: {source}")]
    Encode {
        /// The table.
        table: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A stored value does not deserialize as the table's value type.
    #[error(
        "cannot decode the value at key {key} in table {table:?}: {source} \
         (was it written with another value type?)"
    )]
    Decode {
        /// The table.
        table: String,
        /// The key, printed.
        key: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A stored key does not decode as the table's key type.
    #[error(
        "cannot decode a key in table {table:?}: {reason} (was it written with another key type?)"
    )]
    KeyDecode {
        /// The table.
        table: String,
        /// Why.
        reason: &'static str,
    },
    /// Too many batches are waiting for the committer; the batch was not queued.
    #[error("the store is overloaded: {limit} batches are already waiting to commit; retry later")]
    Overloaded {
        /// The queue bound.
        limit: usize,
    },
    /// The store was closed; nothing more can be written.
    #[error("the store is closed")]
    Closed,
}

impl StorageError {
    pub(crate) fn backend(action: &'static str, error: impl std::fmt::Display) -> Self {
        Self::Backend {
            action,
            message: error.to_string(),
        }
    }
}
