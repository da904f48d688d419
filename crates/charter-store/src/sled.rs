//! The sled backend of [`Store`]: one sled database in the data dir, made durable by
//! sled's own means before any write is acknowledged.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use sled::Tree;
use tokio::sync::watch;
use uuid::Uuid;

use crate::sync::{io_error, Synced};
use crate::{
    legacy, Change, DataPlaneRecord, LicenseRecord, Loaded, NodeUsage, Report, Store, StoreError,
};

/// Reported by [`Store::backend_version`]; must match the sled version in Cargo.toml.
const BACKEND_VERSION: &str = "sled 0.34.7";

const LICENSES_TREE: &str = "licenses";
const CHECKSUMS_TREE: &str = "checksums";
const META_TREE: &str = "meta";
const DATA_PLANES_TREE: &str = "data_planes";
const USAGE_TREE: &str = "usage";

const EPOCH_KEY: &[u8] = b"epoch";
const REVISION_KEY: &[u8] = b"revision";

/// A [`Store`] in a sled 0.34 database in one directory.
///
/// # Layout
///
/// Five trees: `licenses` (16 id bytes → JSON [`LicenseRecord`]), `checksums` (payload
/// checksum hex → 16 id bytes), `meta` (`epoch` → 16 bytes, `revision` → big-endian
/// `u64`), `usage` (node id → JSON [`NodeUsage`]) and `data_planes` (node id → JSON
/// [`DataPlaneRecord`], soft state). Keys and values are data only: a node id is a key,
/// never parsed back as anything else.
///
/// # Durability
///
/// A license write is one sled transaction over `licenses`, `checksums` and `meta`
/// carrying the record and the revision bump; telemetry is one transaction over `usage`.
/// Before the write returns, the store calls sled's `flush` and then syncs every file and
/// directory under the data dir that changed ([`crate::sync`]): sled's flush ends in
/// `sync_file_range`, which neither flushes the device's write cache nor persists a file's
/// size, and the syncs do both. The store does not know which files sled keeps. sled's
/// background flush is off, so no write of sled's reaches the disk (and no writeback error
/// is reported) outside these syncs. If the flush or
/// an fsync fails, what reached the disk is unknown (the kernel reports a writeback error
/// once): the store then refuses every write ([`StoreError::Failed`]) until a restart
/// reads what is really there.
///
/// # Concurrency
///
/// Durable writes are serialised by one `std::sync::Mutex` ([`Writer`]), held from the
/// revision check to the end of the fsyncs. It is a std mutex and not a Tokio one because
/// it is only taken on the blocking pool, where nothing asynchronous happens.
#[derive(Clone)]
pub struct SledStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    licenses: Tree,
    checksums: Tree,
    meta: Tree,
    data_planes: Tree,
    usage: Tree,
    dir: PathBuf,
    epoch: Uuid,
    writer: Mutex<Writer>,
    /// Whether the store takes writes; its own lock, held only to read or set it, so a
    /// health check never waits for a write's syncs.
    health: Mutex<Health>,
    revisions: watch::Sender<u64>,
    #[cfg(feature = "fault-injection")]
    faults: Faults,
}

/// The write lock's state.
struct Writer {
    /// The revision of the last durable license write.
    revision: u64,
    /// What the last syncs covered.
    synced: Synced,
}

/// Whether the store takes writes.
#[derive(Default)]
struct Health {
    /// Why the store refuses writes, once a write failed to reach the disk.
    failed: Option<String>,
    closed: bool,
}

impl Health {
    fn usable(&self) -> Result<(), StoreError> {
        if self.closed {
            return Err(StoreError::Closed);
        }
        match &self.failed {
            Some(why) => Err(StoreError::Failed(why.clone())),
            None => Ok(()),
        }
    }
}

/// Faults a test can switch on in a running store (feature `fault-injection`).
#[cfg(feature = "fault-injection")]
#[derive(Debug, Default)]
pub struct Faults {
    fail_fsync: std::sync::atomic::AtomicBool,
}

#[cfg(feature = "fault-injection")]
impl Faults {
    /// Makes every later fsync of the store fail with `EIO` (or work again).
    pub fn fail_fsync(&self, fail: bool) {
        self.fail_fsync
            .store(fail, std::sync::atomic::Ordering::SeqCst);
    }
}

impl SledStore {
    /// Opens the store in `dir`, creating the directory (mode 0700) and a fresh store with
    /// a new epoch if needed. An existing store keeps its epoch and revision.
    pub fn open(dir: &Path) -> Result<SledStore, StoreError> {
        let created = !dir.exists();
        create_private_dir(dir)?;
        // sled takes its lock on the data dir first, so an old release still running on
        // it is found before its log is looked at.
        let db = open_when_released(dir).map_err(|e| {
                if is_locked(&e) {
                    StoreError::Corrupt(format!(
                        "{} is in use by another process (is another control plane running on this data dir?)",
                        dir.display()
                    ))
                } else {
                    backend(format!("opening the sled database in {}", dir.display()), e)
                }
            })?;
        legacy::check(dir)?;
        let open_tree = |name: &str| {
            db.open_tree(name)
                .map_err(|e| backend(format!("opening tree {name} in {}", dir.display()), e))
        };
        let meta = open_tree(META_TREE)?;
        let (epoch, revision) = init_meta(&meta)?;
        let inner = Inner {
            licenses: open_tree(LICENSES_TREE)?,
            checksums: open_tree(CHECKSUMS_TREE)?,
            meta,
            data_planes: open_tree(DATA_PLANES_TREE)?,
            usage: open_tree(USAGE_TREE)?,
            db,
            dir: dir.to_path_buf(),
            epoch,
            writer: Mutex::new(Writer {
                revision,
                synced: Synced::default(),
            }),
            health: Mutex::new(Health::default()),
            revisions: watch::Sender::new(revision),
            #[cfg(feature = "fault-injection")]
            faults: Faults::default(),
        };
        // A new store's epoch, sled's own first files and the removal of an old log are
        // made durable before anything is built on them.
        inner.make_durable(&mut inner.writer())?;
        if created {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                let handle = File::open(parent).map_err(io_error(parent, "opening"))?;
                inner.fsync(&handle, parent, true)?;
            }
        }
        Ok(SledStore {
            inner: Arc::new(inner),
        })
    }

    /// The store's epoch.
    pub fn epoch(&self) -> Uuid {
        self.inner.epoch
    }

    /// The faults a test can switch on.
    #[cfg(feature = "fault-injection")]
    pub fn faults(&self) -> &Faults {
        &self.inner.faults
    }

    /// Runs `f`, which waits for the disk (sled's calls and the syncs), without stalling
    /// the runtime. On a multi-threaded runtime (the binary's) it runs on this thread in
    /// `block_in_place`, which first hands this worker's other tasks to another thread, so
    /// a write's own path has no thread hand-off and its answer leaves as soon as it is
    /// durable. Elsewhere (a current-thread runtime in tests) it goes to the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        let flavor = tokio::runtime::Handle::current().runtime_flavor();
        if flavor == tokio::runtime::RuntimeFlavor::MultiThread {
            return tokio::task::block_in_place(|| f(&inner));
        }
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Backend {
                context: "running a store operation".to_owned(),
                source: Box::new(e),
            })?
    }
}

impl Inner {
    fn writer(&self) -> MutexGuard<'_, Writer> {
        // A panic while the lock was held left the store marked failed if it happened
        // after a write began (see `durable_write`), so the state is still meaningful.
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn health(&self) -> MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn usable(&self) -> Result<(), StoreError> {
        self.health().usable()
    }

    /// Runs `write` (one sled transaction) and makes it durable, with the writer locked.
    /// Any failure from the transaction on marks the store failed: sled may hold part of
    /// it in memory and the disk may hold it or not.
    fn durable_write<T>(
        &self,
        writer: &mut Writer,
        write: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.usable()?;
        self.health().failed = Some("a write was interrupted".to_owned());
        let result = write().and_then(|value| {
            self.make_durable(writer)?;
            Ok(value)
        });
        let failed = match &result {
            Ok(_) => None,
            // Found before anything was written: the transaction aborted.
            Err(StoreError::Corrupt(_)) => None,
            Err(e) => Some(e.to_string()),
        };
        self.health().failed = failed;
        result
    }

    /// Flushes sled and syncs what changed under the data dir.
    fn make_durable(&self, writer: &mut Writer) -> Result<(), StoreError> {
        self.db.flush().map_err(|e| {
            backend(
                format!("flushing the sled database in {}", self.dir.display()),
                e,
            )
        })?;
        writer.synced.sync(&self.dir, &|file, path, is_dir| {
            self.fsync(file, path, is_dir)
        })
    }

    /// `fsync` for a directory, `fdatasync` for a file (its data and what is needed to
    /// read it back, its size; not its times).
    fn fsync(&self, file: &File, path: &Path, is_dir: bool) -> Result<(), StoreError> {
        #[cfg(feature = "fault-injection")]
        if self
            .faults
            .fail_fsync
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(io_error(path, "fsyncing")(
                std::io::Error::from_raw_os_error(5), // EIO
            ));
        }
        if is_dir {
            file.sync_all()
        } else {
            file.sync_data()
        }
        .map_err(io_error(path, "fsyncing"))
    }

    fn load(&self) -> Result<Loaded, StoreError> {
        // With the writer locked, so the records and the revision are one state.
        let writer = self.writer();
        self.usable()?;
        let mut licenses = Vec::with_capacity(self.licenses.len());
        let mut damaged = Vec::new();
        for item in self.licenses.iter() {
            let (key, value) = item.map_err(|e| backend("reading licenses".to_owned(), e))?;
            match decode_record(&key, &value) {
                Ok(record) => licenses.push(record),
                Err(e) => damaged.push(e.to_string()),
            }
        }
        Ok(Loaded {
            epoch: self.epoch,
            revision: writer.revision,
            licenses,
            damaged,
        })
    }

    fn commit(&self, base: u64, change: Change) -> Result<u64, StoreError> {
        let mut writer = self.writer();
        self.usable()?;
        if writer.revision != base {
            return Err(StoreError::Conflict {
                expected: base,
                actual: writer.revision,
            });
        }
        let next = base + 1;
        let put = match change {
            Change::Put(mut record) => {
                record.revision = next;
                let json = serde_json::to_vec(&record).map_err(|e| {
                    StoreError::Corrupt(format!("encoding license {}: {e}", record.id))
                })?;
                Ok((record, json))
            }
            Change::Delete(id) => Err(id),
        };
        let trees = (&self.licenses, &self.checksums, &self.meta);
        self.durable_write(&mut writer, || {
            trees
                .transaction(|(licenses, checksums, meta)| {
                    let id = match &put {
                        Ok((record, _)) => record.id,
                        Err(id) => *id,
                    };
                    // The old record's index entry goes, unless it names another id.
                    if let Some(old) = licenses.get(id.as_bytes())? {
                        let old = decode_record(id.as_bytes(), &old).map_err(abort)?;
                        if checksums.get(old.checksum.as_bytes())?.as_deref()
                            == Some(id.as_bytes().as_slice())
                        {
                            checksums.remove(old.checksum.as_bytes())?;
                        }
                    }
                    match &put {
                        Ok((record, json)) => {
                            licenses.insert(id.as_bytes().as_slice(), json.as_slice())?;
                            checksums
                                .insert(record.checksum.as_bytes(), id.as_bytes().as_slice())?;
                        }
                        Err(_) => {
                            licenses.remove(id.as_bytes().as_slice())?;
                        }
                    }
                    meta.insert(REVISION_KEY, next.to_be_bytes().as_slice())?;
                    Ok(())
                })
                .map_err(transaction_error)
        })?;
        writer.revision = next;
        self.revisions.send_replace(next);
        Ok(next)
    }

    fn apply_telemetry(&self, reports: Vec<Report>) -> Result<Vec<bool>, StoreError> {
        let mut writer = self.writer();
        self.durable_write(&mut writer, || {
            self.usage
                .transaction(|usage| {
                    let mut applied = Vec::with_capacity(reports.len());
                    // Reports of one node in this batch see each other's effect.
                    let mut seen: std::collections::HashMap<&str, NodeUsage> =
                        std::collections::HashMap::new();
                    for report in &reports {
                        let node = report.node_id.as_str();
                        let current = match seen.remove(node) {
                            Some(current) => current,
                            None => match usage.get(node.as_bytes())? {
                                Some(value) => serde_json::from_slice(&value).map_err(|e| {
                                    abort(StoreError::Corrupt(format!(
                                        "tree {USAGE_TREE}: usage of {node:?}: {e}"
                                    )))
                                })?,
                                None => NodeUsage {
                                    node_id: node.to_owned(),
                                    ..NodeUsage::default()
                                },
                            },
                        };
                        let mut current = current;
                        let fresh = report.seq > current.last_seq;
                        if fresh {
                            current.last_seq = report.seq;
                            for (bucket, count) in &report.counters {
                                let total = current.buckets.entry(bucket.clone()).or_default();
                                *total = total.saturating_add(*count);
                            }
                        }
                        applied.push(fresh);
                        seen.insert(node, current);
                    }
                    for (node, current) in &seen {
                        let value = serde_json::to_vec(current).map_err(|e| {
                            abort(StoreError::Corrupt(format!(
                                "encoding usage of {node:?}: {e}"
                            )))
                        })?;
                        usage.insert(node.as_bytes(), value)?;
                    }
                    Ok(applied)
                })
                .map_err(transaction_error)
        })
    }

    /// Read with the writer locked, so telemetry committed in sled's memory but not yet
    /// durable (acknowledged) is never shown.
    fn usage(&self) -> Result<Vec<NodeUsage>, StoreError> {
        let _writer = self.writer();
        self.usable()?;
        self.usage
            .iter()
            .map(|item| {
                let (key, value) = item.map_err(|e| backend("reading usage".to_owned(), e))?;
                serde_json::from_slice(&value).map_err(|e| {
                    StoreError::Corrupt(format!(
                        "tree {USAGE_TREE}: usage of {:?}: {e}",
                        String::from_utf8_lossy(&key)
                    ))
                })
            })
            .collect()
    }

    /// Inventory writes are soft state: one batch, not waited for on the disk.
    fn put_data_planes(&self, records: &[DataPlaneRecord]) -> Result<(), StoreError> {
        self.usable()?;
        let mut batch = sled::Batch::default();
        for record in records {
            let value = serde_json::to_vec(record).map_err(|e| {
                StoreError::Corrupt(format!("encoding data plane {:?}: {e}", record.id))
            })?;
            batch.insert(record.id.as_bytes(), value);
        }
        self.data_planes
            .apply_batch(batch)
            .map_err(|e| backend("recording data planes".to_owned(), e))
    }

    fn data_planes(&self) -> Result<Vec<DataPlaneRecord>, StoreError> {
        self.data_planes
            .iter()
            .map(|item| {
                let (key, value) =
                    item.map_err(|e| backend("reading data planes".to_owned(), e))?;
                serde_json::from_slice(&value).map_err(|e| {
                    StoreError::Corrupt(format!(
                        "tree {DATA_PLANES_TREE}: data plane {:?}: {e}",
                        String::from_utf8_lossy(&key)
                    ))
                })
            })
            .collect()
    }

    fn purge_data_planes(&self, last_seen_before: i64) -> Result<usize, StoreError> {
        self.usable()?;
        let mut batch = sled::Batch::default();
        let mut purged = 0;
        for record in self.data_planes()? {
            if record.last_seen < last_seen_before {
                batch.remove(record.id.as_bytes());
                purged += 1;
            }
        }
        self.data_planes
            .apply_batch(batch)
            .map_err(|e| backend("purging data planes".to_owned(), e))?;
        Ok(purged)
    }

    fn close(&self) -> Result<(), StoreError> {
        let mut writer = self.writer();
        let failed = {
            let mut health = self.health();
            if health.closed {
                return Ok(());
            }
            health.closed = true;
            health.failed.is_some()
        };
        if failed {
            // Nothing more is made durable on top of an unknown state.
            return Ok(());
        }
        // The inventory, written without waiting, is made durable too.
        self.make_durable(&mut writer)
    }
}

/// Whether sled could not open because another handle holds the data dir's lock.
fn is_locked(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

/// How long opening waits for the data dir's lock, held by a store of this process that
/// was just closed: sled's own I/O threads keep its file, and so the lock, a moment after
/// the last handle is dropped. Another process holding it is refused after this wait.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens sled in `dir`, waiting up to [`LOCK_WAIT`] for its lock.
fn open_when_released(dir: &Path) -> sled::Result<sled::Db> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match sled::Config::new().path(dir).flush_every_ms(None).open() {
            Err(e) if is_locked(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            opened => return opened,
        }
    }
}

#[async_trait::async_trait]
impl Store for SledStore {
    fn backend_version(&self) -> &str {
        BACKEND_VERSION
    }

    async fn load(&self) -> Result<Loaded, StoreError> {
        self.blocking(Inner::load).await
    }

    async fn commit(&self, base: u64, change: Change) -> Result<u64, StoreError> {
        self.blocking(move |inner| inner.commit(base, change)).await
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.revisions.subscribe()
    }

    async fn apply_telemetry(&self, reports: Vec<Report>) -> Result<Vec<bool>, StoreError> {
        self.blocking(move |inner| inner.apply_telemetry(reports))
            .await
    }

    async fn usage(&self) -> Result<Vec<NodeUsage>, StoreError> {
        self.blocking(Inner::usage).await
    }

    async fn put_data_planes(&self, records: Arc<[DataPlaneRecord]>) -> Result<(), StoreError> {
        self.blocking(move |inner| inner.put_data_planes(&records))
            .await
    }

    async fn data_planes(&self) -> Result<Vec<DataPlaneRecord>, StoreError> {
        self.blocking(Inner::data_planes).await
    }

    async fn purge_data_planes(&self, last_seen_before: i64) -> Result<usize, StoreError> {
        self.blocking(move |inner| inner.purge_data_planes(last_seen_before))
            .await
    }

    async fn check(&self) -> Result<(), StoreError> {
        self.inner.usable()
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.blocking(Inner::close).await
    }
}

fn transaction_error(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => backend("writing a sled transaction".to_owned(), e),
    }
}

fn abort(e: StoreError) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Abort(e)
}

fn backend(context: String, e: sled::Error) -> StoreError {
    StoreError::Backend {
        context,
        source: Box::new(e),
    }
}

/// Creates `dir` (and its parents) with mode 0700 if it does not exist.
fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_error(dir, "creating"))
}

/// Reads the epoch and revision, writing a new epoch and revision 0 if the store is new.
fn init_meta(meta: &Tree) -> Result<(Uuid, u64), StoreError> {
    let read = |key: &[u8]| {
        meta.get(key)
            .map_err(|e| backend("reading the store epoch".to_owned(), e))
    };
    match (read(EPOCH_KEY)?, read(REVISION_KEY)?) {
        (Some(epoch), Some(revision)) => Ok((
            decode_id(META_TREE, EPOCH_KEY, &epoch)?,
            decode_revision(&revision)?,
        )),
        (Some(_), None) => Err(StoreError::Corrupt(
            "tree meta has an epoch but no revision key".to_owned(),
        )),
        (None, Some(_)) => Err(StoreError::Corrupt(
            "tree meta has a revision but no epoch key".to_owned(),
        )),
        (None, None) => {
            // One batch, so a crash never leaves one key without the other.
            let epoch = Uuid::new_v4();
            let mut batch = sled::Batch::default();
            batch.insert(EPOCH_KEY, epoch.as_bytes().as_slice());
            batch.insert(REVISION_KEY, 0u64.to_be_bytes().as_slice());
            meta.apply_batch(batch)
                .map_err(|e| backend("initialising the store epoch".to_owned(), e))?;
            Ok((epoch, 0))
        }
    }
}

fn decode_revision(bytes: &[u8]) -> Result<u64, StoreError> {
    let bytes: [u8; 8] = bytes.try_into().map_err(|_| {
        StoreError::Corrupt(format!(
            "tree {META_TREE} key revision: {} bytes, expected 8",
            bytes.len()
        ))
    })?;
    Ok(u64::from_be_bytes(bytes))
}

fn decode_id(tree: &str, key: &[u8], value: &[u8]) -> Result<Uuid, StoreError> {
    Uuid::from_slice(value).map_err(|_| {
        StoreError::Corrupt(format!(
            "tree {tree} key {}: {} bytes, expected a 16-byte id",
            String::from_utf8_lossy(key),
            value.len()
        ))
    })
}

/// Decodes a stored record and checks it against its key.
fn decode_record(key: &[u8], value: &[u8]) -> Result<LicenseRecord, StoreError> {
    let id = Uuid::from_slice(key).map_err(|_| {
        StoreError::Corrupt(format!(
            "tree {LICENSES_TREE}: a key of {} bytes, expected a 16-byte id",
            key.len()
        ))
    })?;
    let record: LicenseRecord = serde_json::from_slice(value)
        .map_err(|e| StoreError::Corrupt(format!("tree {LICENSES_TREE} record {id}: {e}")))?;
    if record.id != id {
        return Err(StoreError::Corrupt(format!(
            "tree {LICENSES_TREE}: record {id} holds id {}",
            record.id
        )));
    }
    Ok(record)
}
