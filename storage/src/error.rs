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
    /// The disk holding the store is full (ENOSPC, or a quota): nothing was written. The store
    /// reopens its file by itself at the next commit, so writes succeed again once space is free.
    #[error("the disk holding the store is full ({action}: {message}); free space and retry")]
    Full {
        /// What it was doing.
        action: &'static str,
        /// The system's own words.
        message: String,
    },
    /// The file under the database failed a read or a write (or failed one before: redb then
    /// refuses every later transaction). The store reopens its file at the next commit.
    #[error("the store's file failed to {action}: {message}")]
    Io {
        /// What it was doing.
        action: &'static str,
        /// The system's own words.
        message: String,
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

    /// A redb error, told apart: a full disk is [`StorageError::Full`], another failure of the
    /// file (now or before) [`StorageError::Io`], anything else a backend failure.
    pub(crate) fn from_redb(action: &'static str, error: impl Into<redb::Error>) -> Self {
        let error: redb::Error = error.into();
        match &error {
            redb::Error::Io(io) if is_disk_full(io) => Self::Full {
                action,
                message: io.to_string(),
            },
            redb::Error::Io(io) => Self::Io {
                action,
                message: io.to_string(),
            },
            redb::Error::PreviousIo => Self::Io {
                action,
                message: error.to_string(),
            },
            _ => Self::backend(action, error),
        }
    }

    /// Whether the database's file may be unusable after this error until it is reopened
    /// (redb refuses every later transaction after a failed write: "previous I/O error").
    pub(crate) fn needs_reopen(&self) -> bool {
        matches!(self, Self::Full { .. } | Self::Io { .. })
    }
}

/// ENOSPC, or EDQUOT (a quota is a full disk for this user).
fn is_disk_full(error: &std::io::Error) -> bool {
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    error.kind() == std::io::ErrorKind::StorageFull
        || matches!(error.raw_os_error(), Some(ENOSPC | EDQUOT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_of_the_file_are_told_apart_by_kind_not_by_text() {
        let full = StorageError::from_redb(
            "commit",
            redb::Error::Io(std::io::Error::from_raw_os_error(28)),
        );
        assert!(matches!(full, StorageError::Full { .. }) && full.needs_reopen());
        let io = StorageError::from_redb(
            "commit",
            redb::Error::Io(std::io::Error::from_raw_os_error(5)),
        );
        assert!(
            matches!(io, StorageError::Io { .. }) && io.needs_reopen(),
            "{io}"
        );
        let before = StorageError::from_redb("begin a write transaction", redb::Error::PreviousIo);
        assert!(matches!(before, StorageError::Io { .. }) && before.needs_reopen());
        // Not the file's fault, whatever its words say.
        let other = StorageError::from_redb(
            "open a table for writing",
            redb::Error::TableDoesNotExist("I/O error".into()),
        );
        assert!(matches!(other, StorageError::Backend { .. }) && !other.needs_reopen());
    }
}
