//! The durable-write baselines: a raw append+fsync loop, the floor any durable write on
//! this disk pays, and a `SledStore` commit called in-process, which separates the store's
//! own cost from the HTTP and license-verification cost of `POST /licenses`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use std::sync::atomic::{AtomicU64, Ordering};

use charter_store::{Change, LicenseRecord, SledStore, Store};
use uuid::Uuid;

/// Appends `record_bytes` to one file and fsyncs it (`File::sync_all`, i.e. `fsync(2)`),
/// one record per call: what a minimal write-ahead log does per acknowledged write.
pub struct RawFsync {
    file: File,
    record: Vec<u8>,
}

impl RawFsync {
    /// Creates the log file in `dir`.
    pub fn create(dir: &Path, record_bytes: usize) -> Result<RawFsync> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("raw-fsync.log");
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        // Make the file's own creation durable first, so the loop measures appends only.
        file.sync_all()
            .with_context(|| format!("fsyncing {}", path.display()))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("fsyncing {}", dir.display()))?;
        let record = (0..record_bytes)
            .map(|i| b"0123456789abcdef"[i % 16])
            .collect();
        Ok(RawFsync { file, record })
    }

    /// One write+fsync, timed.
    pub fn once(&mut self) -> Result<Duration> {
        let started = Instant::now();
        self.file
            .write_all(&self.record)
            .context("appending to the raw fsync log")?;
        self.file.sync_all().context("fsyncing the raw fsync log")?;
        Ok(started.elapsed())
    }
}

/// The control plane's store, opened in this process on the same disk.
pub struct InProcessStore {
    store: SledStore,
    revision: AtomicU64,
}

impl InProcessStore {
    /// Opens a fresh store in `dir`.
    pub fn open(dir: &Path) -> Result<InProcessStore> {
        let store = SledStore::open(dir)
            .with_context(|| format!("opening an in-process store in {}", dir.display()))?;
        Ok(InProcessStore {
            store,
            revision: AtomicU64::new(0),
        })
    }

    /// Inserts each license text, one durable commit each, timed, on a runtime made on this
    /// thread (so the store's blocking thread inherits this thread's CPU pinning).
    pub fn insert_all(&self, texts: &[String], now: i64) -> Result<Vec<Duration>> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a runtime for the in-process store")?;
        texts
            .iter()
            .map(|text| runtime.block_on(self.insert(text, now)))
            .collect()
    }

    async fn insert(&self, payload: &str, now: i64) -> Result<Duration> {
        let base = self.revision.load(Ordering::SeqCst);
        let record = LicenseRecord {
            id: Uuid::new_v4(),
            payload: payload.to_owned(),
            checksum: charter_store::checksum_of(payload),
            created_at: now,
            updated_at: now,
            revision: base + 1,
        };
        let started = Instant::now();
        let revision = self
            .store
            .commit(base, Change::Put(record))
            .await
            .context("committing to the in-process store")?;
        let elapsed = started.elapsed();
        self.revision.store(revision, Ordering::SeqCst);
        Ok(elapsed)
    }
}
