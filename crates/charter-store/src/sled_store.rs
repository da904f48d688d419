//! The sled backend of [`LicenseStore`]: three trees, one transaction per write, and an
//! explicit fsync before any write is acknowledged.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use sha2::{Digest, Sha256};
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::{Transactional, Tree};
use tokio::sync::watch;
use uuid::Uuid;

use crate::{
    Changes, DataPlaneRecord, LicenseRecord, LicenseStore, NodeUsage, Page, PutOutcome, StoreError,
};

/// Reported by [`LicenseStore::backend_version`]; must match the sled version in Cargo.toml.
const BACKEND_VERSION: &str = "sled 0.34.7";

const LICENSES_TREE: &str = "licenses";
const CHECKSUMS_TREE: &str = "checksums";
const META_TREE: &str = "meta";
const DATA_PLANES_TREE: &str = "data_planes";
const USAGE_TREE: &str = "usage";

const EPOCH_KEY: &[u8] = b"epoch";
const REVISION_KEY: &[u8] = b"revision";

/// The file in which sled 0.34 keeps its log (all tree data), relative to the data dir.
const DB_FILE: &str = "db";
/// The directory in which sled 0.34 keeps values too large to inline in the log.
const BLOBS_DIR: &str = "blobs";

/// How many writes [`LicenseStore::changes_since`] remembers. A reader further behind
/// than this reads everything again.
pub(crate) const CHANGE_LOG_LEN: usize = 4096;

/// The result type of a transaction closure: our error, or sled's conflict/storage signal.
type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

/// A [`LicenseStore`] in a sled 0.34 database in one directory.
///
/// # Layout
///
/// Three trees: `licenses` (16 id bytes → JSON [`LicenseRecord`]), `checksums` (payload
/// checksum hex → 16 id bytes, the unique index on payloads) and `meta` (`epoch` → 16
/// bytes, `revision` → big-endian `u64`). Every write is one multi-tree sled transaction
/// that changes the record, the index and the revision together, so a crash never leaves
/// one without the others.
///
/// # Durability
///
/// `Db::flush` in sled 0.34 is not enough on Linux: it writes the log with
/// `sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)`, which pushes the data pages to the
/// device but neither flushes the device's write cache nor persists file metadata (such as
/// the file length when the log grows), so a power cut can still lose acknowledged writes.
/// So after every committed write this store calls `flush` and then `fsync`s what sled
/// 0.34.7 writes through (read in its source, `config.rs`, `pagecache/iobuf.rs`,
/// `pagecache/blob_io.rs`, `pagecache/snapshot.rs`):
///
/// - `db`, the log holding every tree. It is synced through a second descriptor opened
///   here: `fdatasync` acts on the inode, whichever descriptor it is called on. (sled locks
///   the file with `flock`, which a second descriptor neither takes nor releases.)
///   `fdatasync` and not `fsync`: it persists the data and the metadata needed to read it
///   back (the file's size and block map), and skips only timestamps, which nothing reads.
/// - every file in `blobs/` and `blobs/` itself: log entries larger than a quarter of a
///   log segment (about 128 KiB by default; a large payload, or a tree node holding many
///   records) are written there with `write_all` and no sync at all.
///   Blob files are never rewritten, so fsyncing those already on disk is nearly free.
/// - the data directory, so that snapshot renames (`snap.*`, fsynced by sled itself but
///   renamed without a directory sync) and new entries are durable too.
///
/// A directory is fsynced only when its entries changed since its last fsync
/// ([`SyncedDir`]). A directory's fsync persists its entries, the names and the inodes
/// they point to, and nothing else: file contents and sizes are made durable by the
/// files' own syncs above. So when a directory lists the same (name, inode) pairs as it
/// did before an fsync that completed, and did not change while that fsync ran, its
/// durable entries are already the current ones and another fsync would write nothing;
/// on ext4 it would still cost a device cache flush, a third of a write's time. Any new
/// entry (a blob, a snapshot, a rename, which makes a new name or moves an inode) is a
/// change and gets its fsync before the write is acknowledged. What this can miss is an
/// entry created and removed again while an fsync ran, which can reappear after a power
/// cut; the same is true of any file sled removes after the last write before a crash,
/// which sled never syncs either, and such a file (an old snapshot or an unreferenced
/// blob) is ignored on recovery.
///
/// On open the store also fsyncs `conf` (written by sled on creation without a sync), the
/// snapshot files, the directory, and the parent directory when the directory was created.
///
/// # Concurrency
///
/// Reads go straight to sled and run in parallel with everything. Writes are serialised by
/// a `std::sync::Mutex` held from the transaction until the new revision is published.
/// sled's transactions would be safe without it (they retry on conflict, and every write
/// conflicts on the revision key anyway, so there is no parallelism to lose), but holding
/// it keeps three things simple: the revision watch is fed in strictly increasing order,
/// each write's flush and fsync cover exactly its own transaction, and conflicting writers
/// do not spin in sled's retry loop. It is a std mutex and not a Tokio one because nothing
/// asynchronous happens while it is held. License writes are rare, so one fsync per write
/// is cheap enough.
pub struct SledStore {
    pub(crate) db: sled::Db,
    pub(crate) licenses: Tree,
    pub(crate) checksums: Tree,
    pub(crate) meta: Tree,
    data_planes: Tree,
    usage: Tree,
    dir: PathBuf,
    /// A second descriptor on sled's `db` file, used only to fsync it.
    db_file: File,
    /// The entries of the data directory and of `blobs/` at their last fsync; only ever
    /// touched with `write_lock` held (or during `open`), so its own lock is never
    /// contended.
    synced_dirs: Mutex<(SyncedDir, SyncedDir)>,
    epoch: Uuid,
    /// Serialises writes; see the type's documentation for why. The guarded state lives in
    /// sled, so a poisoned lock is safe to take over: every transaction either committed
    /// whole or not at all.
    write_lock: Mutex<()>,
    revision_tx: watch::Sender<u64>,
    /// The published revision and the ids of the last writes, for
    /// [`LicenseStore::changes_since`]. Updated under `write_lock`, after the write is
    /// durable; its own lock is held only to read or push.
    changes: Mutex<ChangeLog>,
}

/// The last published revision and the recent writes: `(revision, id)`, consecutive
/// revisions ending at `revision`, at most [`CHANGE_LOG_LEN`].
pub(crate) struct ChangeLog {
    revision: u64,
    writes: VecDeque<(u64, Uuid)>,
}

impl ChangeLog {
    /// An empty log at `revision`.
    pub(crate) fn new(revision: u64) -> ChangeLog {
        ChangeLog {
            revision,
            writes: VecDeque::new(),
        }
    }

    pub(crate) fn publish(&mut self, revision: u64, id: Uuid) {
        // A write whose commit succeeded but whose flush failed was never published; its
        // revision is missing here, so forget what came before rather than leave a gap.
        if self.revision.checked_add(1) != Some(revision) {
            self.writes.clear();
        }
        if self.writes.len() == CHANGE_LOG_LEN {
            self.writes.pop_front();
        }
        self.writes.push_back((revision, id));
        self.revision = revision;
    }

    pub(crate) fn since(&self, revision: u64) -> Changes {
        let ids = if revision == self.revision {
            Some(Vec::new())
        } else if revision < self.revision
            && self
                .writes
                .front()
                .is_some_and(|(first, _)| *first <= revision + 1)
        {
            Some(
                self.writes
                    .iter()
                    .filter(|(r, _)| *r > revision)
                    .map(|(_, id)| *id)
                    .collect(),
            )
        } else {
            // Too far back, or a revision this store never published.
            None
        };
        Changes {
            revision: self.revision,
            ids,
        }
    }
}

impl SledStore {
    /// Opens the store in `dir`, creating the directory (mode 0700) and a fresh store with
    /// a new epoch if needed. An existing store keeps its epoch and revision.
    pub fn open(dir: &Path) -> Result<SledStore, StoreError> {
        let created = !dir.exists();
        create_private_dir(dir)?;

        let db = open_sled(dir)?;
        let open_tree = |name: &str| {
            db.open_tree(name)
                .map_err(|e| backend(format!("opening tree {name} in {}", dir.display()), e))
        };
        let licenses = open_tree(LICENSES_TREE)?;
        let checksums = open_tree(CHECKSUMS_TREE)?;
        let meta = open_tree(META_TREE)?;
        let data_planes = open_tree(DATA_PLANES_TREE)?;
        let usage = open_tree(USAGE_TREE)?;

        let (epoch, revision) = init_meta(&meta)?;

        let db_path = dir.join(DB_FILE);
        let db_file = File::open(&db_path).map_err(|source| StoreError::Io {
            context: format!("opening {} to fsync it", db_path.display()),
            source,
        })?;

        let store = SledStore {
            db,
            licenses,
            checksums,
            meta,
            data_planes,
            usage,
            dir: dir.to_path_buf(),
            db_file,
            synced_dirs: Mutex::new((SyncedDir::default(), SyncedDir::default())),
            epoch,
            write_lock: Mutex::new(()),
            revision_tx: watch::Sender::new(revision),
            changes: Mutex::new(ChangeLog::new(revision)),
        };

        // The first open writes `conf`, the log and possibly the epoch; make all of it
        // durable before anyone relies on this epoch.
        store.make_durable()?;
        sync_regular_files(dir)?;
        if created {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_path(parent)?;
            }
        }
        Ok(store)
    }

    /// Flushes sled's buffers and fsyncs every file a write may have touched; see
    /// "Durability" on [`SledStore`].
    fn make_durable(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(|e| {
            backend(
                format!("flushing sled database in {}", self.dir.display()),
                e,
            )
        })?;
        let db_path = self.dir.join(DB_FILE);
        self.db_file.sync_data().map_err(|source| StoreError::Io {
            context: format!("fsyncing {}", db_path.display()),
            source,
        })?;
        let mut synced = self
            .synced_dirs
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (data, blobs_synced) = &mut *synced;
        let blobs = self.dir.join(BLOBS_DIR);
        if blobs.is_dir() {
            let listing = list_dir(&blobs)?;
            for (name, _, is_file) in &listing {
                if *is_file {
                    sync_file_unless_gone(&blobs.join(name))?;
                }
            }
            blobs_synced.sync(&blobs, listing)?;
        }
        data.sync(&self.dir, list_dir(&self.dir)?)
    }

    /// Runs one write: takes the write lock, runs `tx` as one transaction over the three
    /// trees, and, if it reports a new revision, makes it durable and publishes it.
    ///
    /// `tx` returns the value for the caller and `Some((new_revision, id))` if it wrote the
    /// license `id`, `None` if it changed nothing.
    fn write<T>(
        &self,
        tx: impl Fn(&Trees) -> TxResult<(T, Option<(u64, Uuid)>)>,
    ) -> Result<T, StoreError> {
        let _guard = self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (value, new_revision) = (&self.licenses, &self.checksums, &self.meta)
            .transaction(|(licenses, checksums, meta)| {
                tx(&Trees {
                    licenses,
                    checksums,
                    meta,
                })
            })
            .map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => backend("committing a write".to_string(), e),
            })?;
        if let Some((revision, id)) = new_revision {
            self.make_durable()?;
            self.changes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .publish(revision, id);
            self.revision_tx.send_replace(revision);
        }
        Ok(value)
    }

    /// The shared body of `put` and `patch`.
    fn upsert(
        &self,
        id: Uuid,
        payload: &str,
        now: i64,
        must_exist: bool,
    ) -> Result<(LicenseRecord, PutOutcome), StoreError> {
        let checksum = checksum_of(payload);
        self.write(|t| {
            let old = match t.licenses.get(id.as_bytes())? {
                Some(bytes) => Some(decode_record(id.as_bytes(), &bytes).or_else(abort)?),
                None if must_exist => return abort(StoreError::NotFound(id)),
                None => None,
            };
            if let Some(holder) = t.checksums.get(checksum.as_bytes())? {
                let holder =
                    decode_id(CHECKSUMS_TREE, checksum.as_bytes(), &holder).or_else(abort)?;
                if holder != id {
                    return abort(StoreError::DuplicatePayload { existing: holder });
                }
            }
            let revision = bump_revision(t.meta)?;
            let (created_at, outcome) = match &old {
                Some(old) => {
                    if old.checksum != checksum {
                        remove_index_entry(t.checksums, &old.checksum, id)?;
                    }
                    (old.created_at, PutOutcome::Replaced)
                }
                None => (now, PutOutcome::Created),
            };
            let record = LicenseRecord {
                id,
                payload: payload.to_string(),
                checksum: checksum.clone(),
                created_at,
                updated_at: now,
                revision,
            };
            store_record(t, &record)?;
            Ok(((record, outcome), Some((revision, id))))
        })
    }
}

/// The three trees as seen inside one transaction.
struct Trees<'a> {
    licenses: &'a TransactionalTree,
    checksums: &'a TransactionalTree,
    meta: &'a TransactionalTree,
}

impl LicenseStore for SledStore {
    fn epoch(&self) -> Uuid {
        self.epoch
    }

    fn revision(&self) -> Result<u64, StoreError> {
        let bytes = self
            .meta
            .get(REVISION_KEY)
            .map_err(|e| backend("reading the revision".to_string(), e))?;
        match bytes {
            Some(bytes) => decode_revision(&bytes),
            None => Err(StoreError::Corrupt(
                "tree meta has no revision key".to_string(),
            )),
        }
    }

    fn backend_version(&self) -> &'static str {
        BACKEND_VERSION
    }

    fn get(&self, id: Uuid) -> Result<Option<LicenseRecord>, StoreError> {
        let bytes = self
            .licenses
            .get(id.as_bytes())
            .map_err(|e| backend(format!("reading license {id}"), e))?;
        bytes
            .map(|bytes| decode_record(id.as_bytes(), &bytes))
            .transpose()
    }

    fn list(&self, after: Option<Uuid>, limit: usize) -> Result<Page, StoreError> {
        let limit = limit.max(1);
        let lower = match &after {
            Some(after) => Bound::Excluded(after.as_bytes().as_slice()),
            None => Bound::Unbounded,
        };
        let mut records = Vec::new();
        let mut more = false;
        for item in self.licenses.range::<&[u8], _>((lower, Bound::Unbounded)) {
            let (key, value) = item.map_err(|e| backend("listing licenses".to_string(), e))?;
            if records.len() == limit {
                more = true;
                break;
            }
            records.push(decode_record(&key, &value)?);
        }
        let next = if more {
            records.last().map(|r| r.id)
        } else {
            None
        };
        Ok(Page { records, next })
    }

    fn all(&self) -> Result<Vec<LicenseRecord>, StoreError> {
        self.licenses
            .iter()
            .map(|item| {
                let (key, value) = item.map_err(|e| backend("listing licenses".to_string(), e))?;
                decode_record(&key, &value)
            })
            .collect()
    }

    fn count(&self) -> Result<u64, StoreError> {
        // A usize always fits in a u64 on the platforms sled supports (32 and 64 bit).
        Ok(self.licenses.len() as u64)
    }

    fn insert(&self, id: Uuid, payload: &str, now: i64) -> Result<LicenseRecord, StoreError> {
        let checksum = checksum_of(payload);
        self.write(|t| {
            if t.licenses.get(id.as_bytes())?.is_some() {
                return abort(StoreError::IdExists(id));
            }
            if let Some(holder) = t.checksums.get(checksum.as_bytes())? {
                let existing =
                    decode_id(CHECKSUMS_TREE, checksum.as_bytes(), &holder).or_else(abort)?;
                return abort(StoreError::DuplicatePayload { existing });
            }
            let revision = bump_revision(t.meta)?;
            let record = LicenseRecord {
                id,
                payload: payload.to_string(),
                checksum: checksum.clone(),
                created_at: now,
                updated_at: now,
                revision,
            };
            store_record(t, &record)?;
            Ok((record, Some((revision, id))))
        })
    }

    fn put(
        &self,
        id: Uuid,
        payload: &str,
        now: i64,
    ) -> Result<(LicenseRecord, PutOutcome), StoreError> {
        self.upsert(id, payload, now, false)
    }

    fn patch(&self, id: Uuid, payload: &str, now: i64) -> Result<LicenseRecord, StoreError> {
        self.upsert(id, payload, now, true)
            .map(|(record, _)| record)
    }

    fn delete(&self, id: Uuid) -> Result<Option<LicenseRecord>, StoreError> {
        self.write(|t| {
            let Some(bytes) = t.licenses.remove(id.as_bytes())? else {
                return Ok((None, None));
            };
            let old = decode_record(id.as_bytes(), &bytes).or_else(abort)?;
            remove_index_entry(t.checksums, &old.checksum, id)?;
            let revision = bump_revision(t.meta)?;
            Ok((Some(old), Some((revision, id))))
        })
    }

    fn put_data_plane(&self, record: &DataPlaneRecord) -> Result<(), StoreError> {
        let value = serde_json::to_vec(record)
            .map_err(|e| StoreError::Corrupt(format!("encoding data plane {}: {e}", record.id)))?;
        self.data_planes
            .insert(record.id.as_bytes(), value)
            .map_err(|e| backend(format!("recording data plane {}", record.id), e))?;
        Ok(())
    }

    fn put_data_planes(&self, records: &[DataPlaneRecord]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for record in records {
            let value = serde_json::to_vec(record).map_err(|e| {
                StoreError::Corrupt(format!("encoding data plane {}: {e}", record.id))
            })?;
            batch.insert(record.id.as_bytes(), value);
        }
        self.data_planes
            .apply_batch(batch)
            .map_err(|e| backend(format!("recording {} data planes", records.len()), e))
    }

    fn data_planes(&self) -> Result<Vec<DataPlaneRecord>, StoreError> {
        self.data_planes
            .iter()
            .map(|entry| {
                let (key, value) =
                    entry.map_err(|e| backend("reading data planes".to_string(), e))?;
                serde_json::from_slice(&value).map_err(|e| {
                    StoreError::Corrupt(format!(
                        "data plane {} in tree {DATA_PLANES_TREE}: {e}",
                        display_key(&key)
                    ))
                })
            })
            .collect()
    }

    fn apply_telemetry(
        &self,
        node_id: &str,
        seq: u64,
        counters: &[(String, u64)],
    ) -> Result<bool, StoreError> {
        // Serialised with license writes: one fsync covers exactly one applied report.
        let _guard = self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let decode = |value: &[u8]| -> Result<NodeUsage, StoreError> {
            serde_json::from_slice(value).map_err(|e| {
                StoreError::Corrupt(format!("usage of {node_id} in tree {USAGE_TREE}: {e}"))
            })
        };
        let mut usage = match self
            .usage
            .get(node_id.as_bytes())
            .map_err(|e| backend(format!("reading usage of {node_id}"), e))?
        {
            Some(value) => decode(&value)?,
            None => NodeUsage {
                node_id: node_id.to_owned(),
                ..NodeUsage::default()
            },
        };
        if seq <= usage.last_seq {
            return Ok(false);
        }
        usage.last_seq = seq;
        for (bucket, count) in counters {
            let total = usage.buckets.entry(bucket.clone()).or_default();
            *total = total.saturating_add(*count);
        }
        let value = serde_json::to_vec(&usage)
            .map_err(|e| StoreError::Corrupt(format!("encoding usage of {node_id}: {e}")))?;
        self.usage
            .insert(node_id.as_bytes(), value)
            .map_err(|e| backend(format!("recording usage of {node_id}"), e))?;
        self.make_durable()?;
        Ok(true)
    }

    fn usage(&self) -> Result<Vec<NodeUsage>, StoreError> {
        self.usage
            .iter()
            .map(|entry| {
                let (key, value) = entry.map_err(|e| backend("reading usage".to_string(), e))?;
                serde_json::from_slice(&value).map_err(|e| {
                    StoreError::Corrupt(format!(
                        "usage of {} in tree {USAGE_TREE}: {e}",
                        display_key(&key)
                    ))
                })
            })
            .collect()
    }

    fn purge_data_planes(&self, last_seen_before: i64) -> Result<usize, StoreError> {
        let mut purged = 0;
        for entry in self.data_planes.iter() {
            let (key, value) = entry.map_err(|e| backend("reading data planes".to_string(), e))?;
            let record: DataPlaneRecord = serde_json::from_slice(&value).map_err(|e| {
                StoreError::Corrupt(format!(
                    "data plane {} in tree {DATA_PLANES_TREE}: {e}",
                    display_key(&key)
                ))
            })?;
            if record.last_seen < last_seen_before {
                // Only if it is still the row read: a data plane that came back meanwhile
                // has a fresh row, which stays.
                let swapped = self
                    .data_planes
                    .compare_and_swap(&key, Some(&value), None::<&[u8]>)
                    .map_err(|e| backend(format!("purging data plane {}", record.id), e))?;
                if swapped.is_ok() {
                    purged += 1;
                }
            }
        }
        Ok(purged)
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision_tx.subscribe()
    }

    fn changes_since(&self, revision: u64) -> Changes {
        self.changes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .since(revision)
    }
}

/// How often and how long [`open_sled`] retries while sled's lock on the database is taken.
const LOCK_RETRY_INTERVAL: Duration = Duration::from_millis(20);
const LOCK_RETRIES: u32 = 100;

/// Opens the sled database in `dir`, waiting up to about two seconds for its file lock.
///
/// sled 0.34 takes an exclusive `flock` on `db` and fails at once if it is taken. Dropping
/// a `sled::Db` does not release that lock synchronously: sled's background threads hold
/// the file until they wind down (sled issues #1234 and #1289), so reopening a store right
/// after closing it in the same process, as a restart or a test does, can fail spuriously.
/// The wait is bounded, so a data directory really used by another process still fails
/// quickly, with an error that says so.
fn open_sled(dir: &Path) -> Result<sled::Db, StoreError> {
    let mut retries = 0;
    loop {
        match sled::Config::new().path(dir).open() {
            Ok(db) => return Ok(db),
            Err(e) if is_lock_contention(&e) && retries < LOCK_RETRIES => {
                retries += 1;
                std::thread::sleep(LOCK_RETRY_INTERVAL);
            }
            Err(e) if is_lock_contention(&e) => {
                return Err(backend(
                    format!(
                        "opening sled database in {} (is another charter-cp using this data \
                         directory?)",
                        dir.display()
                    ),
                    e,
                ))
            }
            Err(e) => {
                return Err(backend(
                    format!("opening sled database in {}", dir.display()),
                    e,
                ))
            }
        }
    }
}

/// Whether sled failed to take its file lock. sled 0.34.7 reports this only as an
/// `io::ErrorKind::Other` with this text (`Config::try_lock` in `config.rs`), so the text is
/// all there is to match.
fn is_lock_contention(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

/// Reads the epoch and revision, writing a new epoch and revision 0 if the store is new.
fn init_meta(meta: &Tree) -> Result<(Uuid, u64), StoreError> {
    let fresh_epoch = Uuid::new_v4();
    meta.transaction(|meta| {
        let revision = meta.get(REVISION_KEY)?;
        match meta.get(EPOCH_KEY)? {
            Some(epoch) => {
                let epoch = decode_id(META_TREE, EPOCH_KEY, &epoch).or_else(abort)?;
                let Some(revision) = revision else {
                    return abort(StoreError::Corrupt(
                        "tree meta has an epoch but no revision key".to_string(),
                    ));
                };
                Ok((epoch, decode_revision(&revision).or_else(abort)?))
            }
            None if revision.is_some() => abort(StoreError::Corrupt(
                "tree meta has a revision but no epoch key".to_string(),
            )),
            None => {
                meta.insert(EPOCH_KEY, fresh_epoch.as_bytes().as_slice())?;
                meta.insert(REVISION_KEY, &0u64.to_be_bytes())?;
                Ok((fresh_epoch, 0))
            }
        }
    })
    .map_err(|e| match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => backend("initialising the store epoch".to_string(), e),
    })
}

/// Writes the record and its index entry.
fn store_record(t: &Trees, record: &LicenseRecord) -> TxResult<()> {
    let json = serde_json::to_vec(record).map_err(|e| {
        // Serialising a struct of strings and integers cannot fail; map it anyway rather
        // than panic.
        ConflictableTransactionError::Abort(StoreError::Backend(format!(
            "encoding license {}: {e}",
            record.id
        )))
    })?;
    t.licenses.insert(record.id.as_bytes().as_slice(), json)?;
    t.checksums
        .insert(record.checksum.as_bytes(), record.id.as_bytes().as_slice())?;
    Ok(())
}

/// Removes `checksum → id` from the index, leaving the entry alone if it names another id
/// (which would mean the index was already wrong; never take another record's entry).
fn remove_index_entry(checksums: &TransactionalTree, checksum: &str, id: Uuid) -> TxResult<()> {
    if let Some(holder) = checksums.get(checksum.as_bytes())? {
        if holder.as_ref() == id.as_bytes().as_slice() {
            checksums.remove(checksum.as_bytes())?;
        }
    }
    Ok(())
}

/// Increments the stored revision and returns the new value.
fn bump_revision(meta: &TransactionalTree) -> TxResult<u64> {
    let current = match meta.get(REVISION_KEY)? {
        Some(bytes) => decode_revision(&bytes).or_else(abort)?,
        None => {
            return abort(StoreError::Corrupt(
                "tree meta has no revision key".to_string(),
            ))
        }
    };
    let Some(next) = current.checked_add(1) else {
        return abort(StoreError::Corrupt(format!(
            "revision {current} cannot be incremented"
        )));
    };
    meta.insert(REVISION_KEY, &next.to_be_bytes())?;
    Ok(next)
}

/// Decodes a stored record and checks it against its key and its own checksum.
fn decode_record(key: &[u8], value: &[u8]) -> Result<LicenseRecord, StoreError> {
    let id = decode_id(LICENSES_TREE, key, key)?;
    let record: LicenseRecord = serde_json::from_slice(value).map_err(|e| {
        StoreError::Corrupt(format!(
            "tree {LICENSES_TREE} key {id}: record is not valid JSON: {e}"
        ))
    })?;
    if record.id != id {
        return Err(StoreError::Corrupt(format!(
            "tree {LICENSES_TREE} key {id}: record has id {}",
            record.id
        )));
    }
    if !checksum_matches(&record.payload, &record.checksum) {
        return Err(StoreError::Corrupt(format!(
            "tree {LICENSES_TREE} key {id}: checksum does not match the payload"
        )));
    }
    Ok(record)
}

/// Decodes 16 stored bytes as a UUID; `tree` and `key` name the place for the error.
fn decode_id(tree: &str, key: &[u8], value: &[u8]) -> Result<Uuid, StoreError> {
    Uuid::from_slice(value).map_err(|_| {
        StoreError::Corrupt(format!(
            "tree {tree} key {}: expected a 16-byte id, found {} bytes",
            display_key(key),
            value.len()
        ))
    })
}

fn decode_revision(bytes: &[u8]) -> Result<u64, StoreError> {
    let arr: [u8; 8] = bytes.try_into().map_err(|_| {
        StoreError::Corrupt(format!(
            "tree {META_TREE} key revision: expected 8 bytes, found {}",
            bytes.len()
        ))
    })?;
    Ok(u64::from_be_bytes(arr))
}

/// A key for an error message: the UUID for 16-byte keys, the text for UTF-8 keys, else hex.
fn display_key(key: &[u8]) -> String {
    if let Ok(id) = Uuid::from_slice(key) {
        return id.to_string();
    }
    match std::str::from_utf8(key) {
        Ok(text) => text.to_string(),
        Err(_) => format!("0x{}", hex::encode(key)),
    }
}

/// SHA-256 of the payload bytes, lowercase hex.
pub(crate) fn checksum_of(payload: &str) -> String {
    hex::encode(Sha256::digest(payload.as_bytes()))
}

/// Whether `checksum` is [`checksum_of`] `payload`, compared without building the hex
/// string: every read checks every record it decodes, so this is on the hot path of
/// `GET /licenses`.
fn checksum_matches(payload: &str, checksum: &str) -> bool {
    let mut hex = [0u8; 64];
    // 32 digest bytes always fit in 64 hex digits; on the impossible error, report a mismatch.
    hex::encode_to_slice(Sha256::digest(payload.as_bytes()), &mut hex).is_ok()
        && hex.as_slice() == checksum.as_bytes()
}

/// Turns an error into a transaction abort, for `.or_else(abort)` on a `Result`.
fn abort<T>(e: StoreError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

fn backend(context: String, e: sled::Error) -> StoreError {
    StoreError::Backend(format!("{context}: {e}"))
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| StoreError::Io {
            context: format!("creating data directory {}", dir.display()),
            source,
        })
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
        context: format!("creating data directory {}", dir.display()),
        source,
    })
}

/// fsyncs a file or directory by path.
fn sync_path(path: &Path) -> Result<(), StoreError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|source| StoreError::Io {
            context: format!("fsyncing {}", path.display()),
            source,
        })
}

/// The entries of a directory as last fsynced: see "Durability" on [`SledStore`].
#[derive(Default)]
pub(crate) struct SyncedDir {
    /// The entries listed just before the last fsync, if they were still the same just
    /// after it; `None` before the first fsync, or after one during which they changed.
    pub(crate) listing: Option<Listing>,
}

/// A directory's entries: (name, inode number, whether it is a regular file), by name.
pub(crate) type Listing = Vec<(OsString, u64, bool)>;

impl SyncedDir {
    /// fsyncs `dir`, whose entries are now `listing`, unless they are those of the last
    /// fsync.
    pub(crate) fn sync(&mut self, dir: &Path, listing: Listing) -> Result<(), StoreError> {
        // Without inode numbers (not Unix) a replaced file would look unchanged.
        if cfg!(unix) && self.listing.as_ref() == Some(&listing) {
            return Ok(());
        }
        self.listing = None;
        sync_path(dir)?;
        if list_dir(dir)? == listing {
            self.listing = Some(listing);
        }
        Ok(())
    }
}

/// Lists `dir`'s entries, sorted by name.
pub(crate) fn list_dir(dir: &Path) -> Result<Listing, StoreError> {
    let io = |source| StoreError::Io {
        context: format!("listing {}", dir.display()),
        source,
    };
    let mut listing = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let is_file = entry.file_type().is_ok_and(|kind| kind.is_file());
        listing.push((entry.file_name(), inode(&entry), is_file));
    }
    listing.sort_unstable();
    Ok(listing)
}

#[cfg(unix)]
fn inode(entry: &std::fs::DirEntry) -> u64 {
    std::os::unix::fs::DirEntryExt::ino(entry)
}

#[cfg(not(unix))]
fn inode(_: &std::fs::DirEntry) -> u64 {
    0
}

/// fsyncs a file, unless it vanished meanwhile (sled removes old snapshots and collected
/// blobs; a removed file needs no sync).
fn sync_file_unless_gone(path: &Path) -> Result<(), StoreError> {
    match File::open(path).and_then(|f| f.sync_all()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StoreError::Io {
            context: format!("fsyncing {}", path.display()),
            source,
        }),
    }
}

/// fsyncs every regular file directly in `dir`. A file that vanishes meanwhile (sled
/// removes old snapshots and collected blobs) needs no sync.
fn sync_regular_files(dir: &Path) -> Result<(), StoreError> {
    let entries = std::fs::read_dir(dir).map_err(|source| StoreError::Io {
        context: format!("listing {} to fsync its files", dir.display()),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| StoreError::Io {
            context: format!("listing {} to fsync its files", dir.display()),
            source,
        })?;
        match entry.file_type() {
            Ok(kind) if kind.is_file() => {}
            _ => continue,
        }
        sync_file_unless_gone(&entry.path())?;
    }
    Ok(())
}
