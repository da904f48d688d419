//! Making what sled wrote durable without knowing sled's files: after sled's own `flush`,
//! every regular file and directory under the data dir that changed since its last sync
//! is synced (files with `fdatasync`, directories with `fsync`).
//!
//! Each sync costs a device cache flush even when there is nothing to write, so what did
//! not change is skipped, by rules that cannot miss a change:
//!
//! - A directory is fsynced when its entries (name → inode) differ from those it had at
//!   its last fsync: a directory's fsync persists its entries and nothing else.
//! - A file is synced unless its inode, size, modification and change times are those it
//!   had at its last sync and those times were already more than [`SETTLED`] old when that
//!   sync began. A write advances the times (the kernel's coarse clock ticks in a few
//!   milliseconds at most), so a file written after a sync shows new times, unless it was
//!   written within the same tick as an earlier write that the sync already covered:
//!   hence only times older than [`SETTLED`] at the sync are trusted.
//!
//! Entries owned by another user than the data dir (`lost+found` at the root of a
//! mount, say) are not the store's and are left alone.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::StoreError;

/// How old a file's times must be at a sync to be trusted afterwards.
const SETTLED: Duration = Duration::from_millis(100);

/// What each file and directory looked like when it was last synced.
#[derive(Debug, Default)]
pub(crate) struct Synced {
    files: HashMap<PathBuf, Stamp>,
    dirs: HashMap<PathBuf, Vec<(OsString, u64)>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    len: u64,
    /// The later of the modification and change times, in nanoseconds since the epoch.
    changed: i128,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Stamp {
            ino: meta.ino(),
            len: meta.size(),
            changed: ns(meta.mtime(), meta.mtime_nsec()).max(ns(meta.ctime(), meta.ctime_nsec())),
        }
    }
}

/// A sync call, which tests make fail.
pub(crate) type SyncFn<'a> = &'a dyn Fn(&File, &Path, bool) -> Result<(), StoreError>;

impl Synced {
    /// Syncs what changed under `dir` (see the module documentation). Forgets everything
    /// on failure, so the next call syncs all again.
    pub(crate) fn sync(&mut self, dir: &Path, sync: SyncFn<'_>) -> Result<(), StoreError> {
        let owner = std::fs::metadata(dir)
            .map_err(io_error(dir, "reading"))?
            .uid();
        let result = self.sync_dir(dir, owner, sync);
        if result.is_err() {
            *self = Synced::default();
        }
        result
    }

    fn sync_dir(&mut self, dir: &Path, owner: u32, sync: SyncFn<'_>) -> Result<(), StoreError> {
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_error(dir, "listing"))? {
            let entry = entry.map_err(io_error(dir, "listing"))?;
            let path = entry.path();
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(meta) => meta,
                // Removed meanwhile (sled dropping an old file): nothing to sync.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error(&path, "reading")(e)),
            };
            if meta.uid() != owner {
                continue;
            }
            entries.push((entry.file_name(), meta.ino()));
            if meta.is_dir() {
                self.sync_dir(&path, owner, sync)?;
            } else if meta.is_file() {
                self.sync_file(&path, &meta, sync)?;
            }
        }
        entries.sort();
        if self.dirs.get(dir) != Some(&entries) {
            let handle = File::open(dir).map_err(io_error(dir, "opening"))?;
            sync(&handle, dir, true)?;
            self.dirs.insert(dir.to_path_buf(), entries);
        }
        Ok(())
    }

    fn sync_file(
        &mut self,
        path: &Path,
        meta: &std::fs::Metadata,
        sync: SyncFn<'_>,
    ) -> Result<(), StoreError> {
        let stamp = Stamp::of(meta);
        if self.files.get(path) == Some(&stamp) {
            return Ok(());
        }
        let started = now_ns();
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_error(path, "opening")(e)),
        };
        // The times as of the sync (a write between the listing and here shows).
        let stamp = Stamp::of(&file.metadata().map_err(io_error(path, "reading"))?);
        sync(&file, path, false)?;
        if started - stamp.changed > SETTLED.as_nanos() as i128 {
            self.files.insert(path.to_path_buf(), stamp);
        } else {
            self.files.remove(path);
        }
        Ok(())
    }
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

pub(crate) fn io_error<'a>(
    path: &'a Path,
    what: &'static str,
) -> impl Fn(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        context: format!("{what} {}", path.display()),
        source,
    }
}
