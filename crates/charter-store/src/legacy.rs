//! Data dirs written by releases that kept a write-ahead log of their own (`charter.wal`).
//!
//! Those releases applied every logged write to sled and, on a clean shutdown, made sled
//! durable and started an empty log generation. So a log whose current generation holds no
//! record has nothing sled lacks and is removed; a log that still holds records (the
//! process was killed) or whose header does not check is refused with one line saying how
//! to recover, rather than dropping acknowledged writes. Nothing here replays a log.

use std::path::Path;

use crate::StoreError;

/// The old log's file name in the data dir.
pub(crate) const WAL_FILE: &str = "charter.wal";
/// The old format: a header (`MAGIC`, generation `u64` LE, CRC-32 of both) in the first
/// block; records from `RECORDS_AT` on, each starting with its generation.
const MAGIC: &[u8; 8] = b"CHWAL\x00\x00\x01";
const RECORDS_AT: usize = 4096;

/// Removes an old log that holds nothing (`true`: the caller fsyncs the directory), or
/// refuses the data dir.
pub(crate) fn check(dir: &Path) -> Result<bool, StoreError> {
    let path = dir.join(WAL_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(StoreError::Io {
                context: format!("reading {}", path.display()),
                source,
            })
        }
    };
    let refuse = |why: &str| {
        Err(StoreError::Corrupt(format!(
            "{} {why}: start the previous release (0.1.x with the write-ahead log) on this \
             data dir once and stop it with SIGTERM, which moves every write into sled, then \
             start this release",
            path.display()
        )))
    };
    let Some(generation) = header_generation(&bytes) else {
        return refuse("has a damaged header, so it may hold acknowledged writes");
    };
    let first = bytes.get(RECORDS_AT..RECORDS_AT + 8);
    if first == Some(generation.to_le_bytes().as_slice()) {
        return refuse("still holds writes of an earlier release that was not shut down cleanly");
    }
    std::fs::remove_file(&path).map_err(|source| StoreError::Io {
        context: format!("removing {}", path.display()),
        source,
    })?;
    Ok(true)
}

/// The generation of a header that checks.
fn header_generation(bytes: &[u8]) -> Option<u64> {
    let header = bytes.get(..20)?;
    if &header[..8] != MAGIC || crc32fast::hash(&header[..16]).to_le_bytes() != header[16..20] {
        return None;
    }
    Some(u64::from_le_bytes(header[8..16].try_into().ok()?))
}

/// An old log's bytes: a header of `generation`, and a first record of `record_generation`
/// (if any) at the start of the records. For tests.
#[cfg(test)]
pub(crate) fn old_log(generation: u64, record_generation: Option<u64>) -> Vec<u8> {
    let mut bytes = vec![0u8; RECORDS_AT * 2];
    bytes[..8].copy_from_slice(MAGIC);
    bytes[8..16].copy_from_slice(&generation.to_le_bytes());
    let crc = crc32fast::hash(&bytes[..16]);
    bytes[16..20].copy_from_slice(&crc.to_le_bytes());
    if let Some(g) = record_generation {
        bytes[RECORDS_AT..RECORDS_AT + 8].copy_from_slice(&g.to_le_bytes());
        bytes[RECORDS_AT + 8..RECORDS_AT + 16].copy_from_slice(&1u64.to_le_bytes());
    }
    bytes
}
