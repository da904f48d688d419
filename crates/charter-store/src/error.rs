//! The one error type of the store, saying what went wrong and to which record or file.

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store's revision is no longer the one the write was decided on; nothing was
    /// written.
    #[error("the store moved from revision {expected} to {actual} meanwhile")]
    Conflict {
        /// The revision the write was decided on.
        expected: u64,
        /// The store's revision now.
        actual: u64,
    },

    /// An earlier write failed while being made durable, so what is on disk is unknown;
    /// the store takes no writes until a restart reads it again.
    #[error("the store refuses writes since an earlier write failed to reach the disk ({0}); restart the control plane")]
    Failed(String),

    /// The store was closed.
    #[error("the store is closed")]
    Closed,

    /// Stored data cannot be decoded or breaks an invariant of the store; the message
    /// names the tree and key. Restore the data directory from a backup.
    #[error("license store data is corrupt: {0}")]
    Corrupt(String),

    /// The database server cannot serve now (PostgreSQL: no connection, it was lost, no
    /// answer within the store's timeout, or the database takes no writes: a standby).
    /// Nothing changed, unless the connection was lost while a write committed: then the
    /// outcome is unknown until the next read.
    #[error("{context}: the database is unavailable: {source}")]
    Unavailable {
        /// What was being done.
        context: String,
        /// The client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A setting of the store cannot be used as given (say, a database URL's TLS
    /// parameters); the message says which and why.
    #[error("{0}")]
    Config(String),

    /// The storage engine failed.
    #[error("{context}: {source}")]
    Backend {
        /// What was being done, e.g. `flushing the sled database in /var/lib/charter`.
        context: String,
        /// The engine's own error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

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

impl StoreError {
    /// Whether the failed write may still have reached the disk (the engine failed while
    /// making it durable), as opposed to one that certainly changed nothing.
    pub fn is_unknown_outcome(&self) -> bool {
        matches!(
            self,
            StoreError::Backend { .. } | StoreError::Io { .. } | StoreError::Unavailable { .. }
        )
    }
}
