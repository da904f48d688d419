//! The one error type of the store, saying what went wrong and to which record or file.

use uuid::Uuid;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// There is no license record with this id.
    #[error("license {0} not found")]
    NotFound(Uuid),

    /// A record with this id already exists (returned by `insert`).
    #[error("license {0} already exists")]
    IdExists(Uuid),

    /// The same payload (same SHA-256) is already stored under another id.
    #[error("the same license payload is already stored as license {existing}")]
    DuplicatePayload {
        /// The id of the record that holds the payload.
        existing: Uuid,
    },

    /// The write is larger than the store's write-ahead log can hold in one record; nothing
    /// was written. The admin API's body limit keeps every write well under it.
    #[error("the write is {bytes} bytes, more than the {limit} bytes the store can log at once")]
    TooLarge {
        /// The size of the write's log record.
        bytes: u64,
        /// The largest record the log holds.
        limit: u64,
    },

    /// Stored data cannot be decoded or breaks an invariant of the store; the message
    /// names the tree and key. Restore the data directory from a backup.
    #[error("license store data is corrupt: {0}")]
    Corrupt(String),

    /// The storage engine failed; the text is the engine's own error.
    #[error("license store backend failed: {0}")]
    Backend(String),

    /// A file-system operation on the data directory failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done to which path, e.g. `fsyncing /var/lib/charter/db`.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}
