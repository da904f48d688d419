//! The verified license cache: the last snapshot this data plane accepted, in one JSON file
//! in the data dir, so it keeps enforcing across restarts while the control plane is away.
//!
//! The file is written atomically (see [`crate::files::write_atomic`]) and trusted for
//! nothing: every load verifies the license again with the trusted keys.

use std::path::{Path, PathBuf};

use charter_license::{Evaluation, LicenseError, TrustedKeys, UnixTime, VerifiedLicense};
use serde::{Deserialize, Serialize};

use crate::files::{self, FileError};

/// The cache file's name in the data dir.
pub const CACHE_FILE: &str = "license-cache.json";
/// The version of the file's layout.
pub const CACHE_FORMAT: u32 = 1;

/// The cache file: the cluster position and license of the last accepted snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheFile {
    /// Layout version, [`CACHE_FORMAT`].
    pub format: u32,
    /// The control plane's store epoch.
    pub epoch: String,
    /// The store revision of the snapshot.
    pub revision: u64,
    /// The cluster's license; `None` when the cluster was unlicensed.
    pub license: Option<CachedLicense>,
    /// When the snapshot was accepted (Unix seconds, by this node's monotonic clock). For
    /// people reading the file: it is not signed, so it moves no clock.
    pub received_at: UnixTime,
}

/// A license record as the control plane sent it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedLicense {
    /// The record id on the control plane.
    pub id: String,
    /// The license document text, exactly as received (what the signature covers).
    pub payload: String,
    /// Record creation time (Unix seconds).
    pub created_at: UnixTime,
    /// Record update time (Unix seconds).
    pub updated_at: UnixTime,
}

/// The cache could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Reading or writing failed.
    #[error(transparent)]
    File(#[from] FileError),
    /// The file is not a cache this version understands.
    #[error("{} is not a license cache: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The cached license does not verify (tampered, or signed by a key no longer trusted).
    #[error("{}: the cached license is refused: {source}", path.display())]
    Unverifiable {
        /// The file.
        path: PathBuf,
        /// Why the license was refused.
        source: LicenseError,
    },
}

impl CacheError {
    /// A short code for logs: Kong's validation code for a refused license, else
    /// `cache_unreadable` or `cache_corrupt`.
    pub fn code(&self) -> &'static str {
        match self {
            CacheError::File(_) => "cache_unreadable",
            CacheError::Corrupt { .. } => "cache_corrupt",
            CacheError::Unverifiable { source, .. } => source.code.as_str(),
        }
    }
}

/// What a verified cache holds.
#[derive(Debug, Clone)]
pub struct LoadedCache {
    /// The file as read.
    pub file: CacheFile,
    /// The license, verified, with its evaluation at load time; `None` when the cluster
    /// was unlicensed.
    pub license: Option<(VerifiedLicense, Evaluation)>,
}

/// The cache file's path in `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(CACHE_FILE)
}

/// Writes the cache atomically and durably: after this returns, a crash or power cut
/// leaves exactly this cache; a crash during it leaves the previous one.
pub fn store(dir: &Path, cache: &CacheFile) -> Result<(), CacheError> {
    // Serializing plain strings and numbers cannot fail.
    let mut bytes = serde_json::to_vec_pretty(cache).unwrap_or_default();
    bytes.push(b'\n');
    files::write_atomic(dir, CACHE_FILE, &bytes)?;
    Ok(())
}

/// Reads the cache without judging the license, `None` when there is none.
pub fn read(dir: &Path) -> Result<Option<CacheFile>, CacheError> {
    let path = path(dir);
    let Some(text) = files::read_optional(&path)? else {
        return Ok(None);
    };
    let file: CacheFile = serde_json::from_str(&text).map_err(|e| CacheError::Corrupt {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if file.format != CACHE_FORMAT {
        return Err(CacheError::Corrupt {
            path,
            reason: format!(
                "layout version {} (this data plane reads {CACHE_FORMAT})",
                file.format
            ),
        });
    }
    Ok(Some(file))
}

/// Reads the cache and verifies its license at `now`, `None` when there is no cache.
pub fn load(
    dir: &Path,
    keys: &TrustedKeys,
    now: UnixTime,
) -> Result<Option<LoadedCache>, CacheError> {
    let Some(file) = read(dir)? else {
        return Ok(None);
    };
    verify(dir, file, keys, now).map(Some)
}

/// Verifies a cache file's license at `now`.
pub fn verify(
    dir: &Path,
    file: CacheFile,
    keys: &TrustedKeys,
    now: UnixTime,
) -> Result<LoadedCache, CacheError> {
    let license = match &file.license {
        None => None,
        Some(cached) => Some(
            charter_license::validate(&cached.payload, keys, now).map_err(|source| {
                CacheError::Unverifiable {
                    path: path(dir),
                    source,
                }
            })?,
        ),
    };
    Ok(LoadedCache { file, license })
}
