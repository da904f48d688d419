//! The sled backend of [`LicenseStore`]: sled trees, and the write-ahead log
//! ([`crate::wal`]) `fdatasync`ed before any write is acknowledged.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use sha2::{Digest, Sha256};
use sled::{IVec, Tree};
use tokio::sync::watch;
use uuid::Uuid;

use crate::wal::{self, Appended, Entry, Op, TreeTag, Wal};
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
/// The LSN of the last write-ahead log record applied to sled; see [`crate::wal`].
const WAL_LSN_KEY: &[u8] = b"wal_lsn";

/// The file in which sled 0.34 keeps its log (all tree data), relative to the data dir.
const DB_FILE: &str = "db";
/// The directory in which sled 0.34 keeps values too large to inline in the log.
const BLOBS_DIR: &str = "blobs";

/// How many writes [`LicenseStore::changes_since`] remembers. A reader further behind
/// than this reads everything again.
pub(crate) const CHANGE_LOG_LEN: usize = 4096;

/// A [`LicenseStore`] in a sled 0.34 database in one directory, with a write-ahead log.
///
/// # Layout
///
/// Five trees: `licenses` (16 id bytes → JSON [`LicenseRecord`]), `checksums` (payload
/// checksum hex → 16 id bytes, the unique index on payloads), `meta` (`epoch` → 16 bytes,
/// `revision` and `wal_lsn` → big-endian `u64`), `usage` (telemetry per node) and
/// `data_planes` (the inventory, soft state). Next to sled's files, [`crate::wal`]'s
/// `charter.wal`.
///
/// # Durability
///
/// A write is acknowledged once it is durable in the write-ahead log: its changes (the
/// record, the index entry, the revision, or a node's usage) are one record there, written
/// and `fdatasync`ed, and only then applied to sled's trees in memory. The log is a file of
/// fixed size written full of zeros when it is made, so an append overwrites blocks the
/// file already has and its `fdatasync` writes the record and flushes the device cache:
/// one device round trip per write, with nothing else to commit. sled writes its own state
/// out in the background, with no guarantee relied on; on open, every record logged since
/// the last checkpoint is applied again, in order (see [`crate::wal`] for the format and the
/// replay rule). A crash at any point thus leaves every acknowledged write, each whole: a
/// write is in sled only once its record is durable, and a record is replayed whole. A
/// write too large for one record is refused ([`StoreError::TooLarge`]); the log (4 MiB)
/// holds the largest the admin API accepts (1 MiB bodies) with room to spare.
///
/// Why not sled alone: sled 0.34 makes a write durable only by flushing its whole log,
/// `pwrite` and `sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)` on its I/O thread pool,
/// which neither flushes the device's write cache nor persists the file's size, so each
/// write would also need an `fdatasync` of `db`: two device round trips and two thread
/// hand-offs. Its transactions also write out its I/O buffer twice each (`pin_log` in
/// `pagecache/mod.rs`), so the logged writes use plain inserts: the log lock keeps writers
/// apart, and the log, not a sled transaction, makes each write atomic across trees.
///
/// A checkpoint makes sled durable and starts the log's next generation: when the log is
/// full, after a failed append, on open (before the new log replaces the old), and when
/// the store is dropped (a clean close). It
/// flushes sled and then `fsync`s what sled 0.34.7 writes through (read in its source,
/// `config.rs`, `pagecache/iobuf.rs`, `pagecache/blob_io.rs`, `pagecache/snapshot.rs`):
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
/// durable entries are already the current ones and another fsync would write nothing.
/// Any new entry (a blob, a snapshot, a rename, which makes a new name or moves an inode)
/// is a change and gets its fsync. What this can miss is an entry created and removed again
/// while an fsync ran, which can reappear after a power cut; the same is true of any file
/// sled removes after a checkpoint, which sled never syncs either, and such a file (an old
/// snapshot or an unreferenced blob) is ignored on recovery.
///
/// On open the store also fsyncs `conf` (written by sled on creation without a sync), the
/// snapshot files, the directory, and the parent directory when the directory was created.
///
/// # Concurrency
///
/// Reads go straight to sled and run in parallel with everything; they see a write once it
/// is durable, and may see one being applied with some of its keys changed and others not
/// yet (for a few microseconds; the revision is applied after the record and its index
/// entry). Writes are serialised by the log's `std::sync::Mutex`, held from the reads a
/// write decides on until its new revision is published, so each write sees every earlier
/// one whole, the log's records are in LSN order, and the revision watch is fed in strictly
/// increasing order. It is a std mutex and not a Tokio one because nothing asynchronous
/// happens while it is held.
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
    /// touched with `log` locked (or during `open`), so its own lock is never contended.
    synced_dirs: Mutex<(SyncedDir, SyncedDir)>,
    epoch: Uuid,
    /// The write-ahead log and the next LSN. Its lock serialises writes; see the type's
    /// documentation for why. A poisoned lock is safe to take over: a write that panicked
    /// before its append changed nothing, one that panicked while being applied left
    /// `Log::unapplied` set, and an append that failed midway marks the log broken, so
    /// the next write checkpoints instead of appending after it.
    log: Mutex<Log>,
    revision_tx: watch::Sender<u64>,
    /// The published revision and the ids of the last writes, for
    /// [`LicenseStore::changes_since`]. Updated with `log` locked, after the write is
    /// durable; its own lock is held only to read or push.
    changes: Mutex<ChangeLog>,
    /// How many log records `open` applied again.
    replayed: usize,
}

/// The write-ahead log as the store uses it.
struct Log {
    wal: Wal,
    /// The LSN of the next durable write; above every LSN in sled and in the log.
    next_lsn: u64,
    /// Set while a logged write is applied to sled, and left set if that fails or panics:
    /// then sled holds part of a durable write, and the store refuses further writes,
    /// which would be computed from that state, until a restart replays it whole (see
    /// [`SledStore::apply`]).
    unapplied: bool,
    /// Checkpoints made since `open`.
    checkpoints: u64,
}

/// Settings tests change; [`SledStore::open`] uses the defaults.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tuning {
    /// The size of the write-ahead log file.
    pub(crate) wal_capacity: u64,
    /// sled's background flush interval (`None`: none, so sled makes nothing durable
    /// between checkpoints, though it may still write its buffers out; tests use that).
    pub(crate) sled_flush_every_ms: Option<u64>,
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning {
            wal_capacity: wal::DEFAULT_CAPACITY,
            // sled's own default.
            sled_flush_every_ms: Some(500),
        }
    }
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
        // Should a durable write ever go unpublished (the store refuses writes after one
        // fails to apply), its revision would be missing here: forget what came before
        // rather than leave a gap.
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
        SledStore::open_tuned(dir, Tuning::default())
    }

    /// [`SledStore::open`] with other settings.
    pub(crate) fn open_tuned(dir: &Path, tuning: Tuning) -> Result<SledStore, StoreError> {
        let created = !dir.exists();
        create_private_dir(dir)?;

        let db = open_sled(dir, tuning.sled_flush_every_ms)?;
        let open_tree = |name: &str| {
            db.open_tree(name)
                .map_err(|e| backend(format!("opening tree {name} in {}", dir.display()), e))
        };
        let licenses = open_tree(LICENSES_TREE)?;
        let checksums = open_tree(CHECKSUMS_TREE)?;
        let meta = open_tree(META_TREE)?;
        let data_planes = open_tree(DATA_PLANES_TREE)?;
        let usage = open_tree(USAGE_TREE)?;

        // The writes logged since the last checkpoint first, all of them, in order (see
        // "Replay" in `wal`), then the epoch and revision they may have moved.
        let entries = wal::recover(dir)?;
        for entry in &entries {
            apply_ops([&licenses, &checksums, &meta, &usage], entry)?;
        }
        let replayed = entries.len();
        let applied = read_wal_lsn(&meta)?;
        let last_lsn = entries.last().map_or(applied, |e| e.lsn.max(applied));

        let (epoch, revision) = init_meta(&meta)?;

        let db_path = dir.join(DB_FILE);
        let db_file = File::open(&db_path).map_err(|source| StoreError::Io {
            context: format!("opening {} to fsync it", db_path.display()),
            source,
        })?;

        // The first open writes `conf`, the log and possibly the epoch, and a replay
        // wrote what the log held: make all of it durable, blobs included, before the log
        // is replaced. A new, empty log is also the only place records of an older
        // generation can never follow the current ones.
        let synced_dirs = Mutex::new((SyncedDir::default(), SyncedDir::default()));
        make_durable(&db, dir, &db_file, &synced_dirs)?;
        let wal = Wal::create(dir, tuning.wal_capacity)?;

        let store = SledStore {
            db,
            licenses,
            checksums,
            meta,
            data_planes,
            usage,
            dir: dir.to_path_buf(),
            db_file,
            synced_dirs,
            epoch,
            log: Mutex::new(Log {
                wal,
                next_lsn: last_lsn + 1,
                unapplied: false,
                checkpoints: 0,
            }),
            revision_tx: watch::Sender::new(revision),
            changes: Mutex::new(ChangeLog::new(revision)),
            replayed,
        };
        // `Wal::create` fsynced the directory with the new log in it; `conf` and the
        // snapshots are sled's files written without a sync.
        sync_regular_files(dir)?;
        if created {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_path(parent)?;
            }
        }
        Ok(store)
    }

    /// How many write-ahead log records `open` applied to sled again: the writes logged
    /// since the last checkpoint before the store was last closed or crashed.
    pub fn replayed(&self) -> usize {
        self.replayed
    }

    /// See [`make_durable`].
    fn make_durable(&self) -> Result<(), StoreError> {
        make_durable(&self.db, &self.dir, &self.db_file, &self.synced_dirs)
    }

    /// Runs one write: locks the log, lets `write` read the trees and say what to change,
    /// makes the changes durable in the write-ahead log, applies them to sled, and
    /// publishes the new revision if `write` reports one.
    ///
    /// `write` makes its changes through [`Trees`], which only records them, and returns
    /// the value for the caller and `Some((new_revision, id))` if it wrote the license
    /// `id`. An error it returns changes nothing.
    ///
    /// The log comes first, so a change is in sled only once it is durable: readers never
    /// see a write that a crash could take back, and a write whose append fails leaves
    /// nothing in sled (its record may still have reached the disk: then a crash before the
    /// next write's checkpoint replays it, so the outcome of a failed write is unknown).
    fn write<T>(
        &self,
        write: impl FnOnce(&Trees) -> Result<(T, Option<(u64, Uuid)>), StoreError>,
    ) -> Result<T, StoreError> {
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        if log.unapplied {
            return Err(StoreError::Backend(
                "an earlier write is durable but could not be applied; restart the control \
                 plane to recover it from the write-ahead log"
                    .to_string(),
            ));
        }
        if log.wal.is_broken() {
            // An append failed: start a new generation before anything else is logged, so
            // whatever part of that record reached the disk is never replayed.
            self.checkpoint(&mut log)?;
        }
        let trees = Trees {
            licenses: &self.licenses,
            checksums: &self.checksums,
            meta: &self.meta,
            usage: &self.usage,
            ops: RefCell::new(Vec::new()),
        };
        let (value, new_revision) = write(&trees)?;
        let mut ops = trees.ops.into_inner();
        if ops.is_empty() {
            return Ok(value);
        }
        // The revision after the data it names, for readers during `apply` (a stable sort,
        // and keys of different trees never interact, so the outcome is the same).
        ops.sort_by_key(|op| op.tree == TreeTag::Meta);
        // Taken for good even if the append fails, so no two records share an LSN.
        let lsn = log.next_lsn;
        log.next_lsn += 1;
        // Last, so that a state of sled that has this LSN has all of its changes.
        ops.push(Op {
            tree: TreeTag::Meta,
            key: WAL_LSN_KEY.into(),
            value: Some(lsn.to_be_bytes().as_slice().into()),
        });
        let entry = Entry { lsn, ops };
        if log.wal.append(&entry)? == Appended::Full {
            // This generation has no room left: make sled hold everything logged so far,
            // and log this write in the next one, where it fits (`append` refuses a record
            // larger than an empty log).
            self.checkpoint(&mut log)?;
            if log.wal.append(&entry)? == Appended::Full {
                return Err(StoreError::Backend(
                    "the write-ahead log refused a record after a checkpoint".to_string(),
                ));
            }
        }
        // Set until the apply has finished, also if it panics: a half-applied write must
        // not be built on (see `Log::unapplied`).
        log.unapplied = true;
        self.apply(&entry)?;
        log.unapplied = false;
        if let Some((revision, id)) = new_revision {
            self.changes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .publish(revision, id);
            self.revision_tx.send_replace(revision);
        }
        Ok(value)
    }

    /// Makes sled durable, then starts a new generation of the log, whose records sled
    /// now holds.
    fn checkpoint(&self, log: &mut Log) -> Result<(), StoreError> {
        self.make_durable()?;
        log.wal.restart()?;
        log.checkpoints += 1;
        Ok(())
    }

    /// Checkpoints made since `open`.
    #[cfg(test)]
    pub(crate) fn checkpoints(&self) -> u64 {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .checkpoints
    }

    /// Applies a logged write's changes to sled, in order.
    ///
    /// If sled fails here (it does not fail in-memory updates short of a broken database),
    /// the write is durable in the log but not in sled; the caller gets the error, and the
    /// store refuses further writes (`Log::unapplied`), which would be computed without it,
    /// until a restart replays it.
    fn apply(&self, entry: &Entry) -> Result<(), StoreError> {
        apply_ops(
            [&self.licenses, &self.checksums, &self.meta, &self.usage],
            entry,
        )
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
            let old = match t.get(TreeTag::Licenses, id.as_bytes())? {
                Some(bytes) => Some(decode_record(id.as_bytes(), &bytes)?),
                None if must_exist => return Err(StoreError::NotFound(id)),
                None => None,
            };
            if let Some(holder) = t.get(TreeTag::Checksums, checksum.as_bytes())? {
                let holder = decode_id(CHECKSUMS_TREE, checksum.as_bytes(), &holder)?;
                if holder != id {
                    return Err(StoreError::DuplicatePayload { existing: holder });
                }
            }
            let revision = bump_revision(t)?;
            let (created_at, outcome) = match &old {
                Some(old) => {
                    if old.checksum != checksum {
                        remove_index_entry(t, &old.checksum, id)?;
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

/// The logged trees as one write sees them: its reads see the trees with its own changes
/// so far, and its changes, made through [`Trees::insert`] and [`Trees::remove`], are only
/// recorded, for [`SledStore::write`] to log and then apply.
struct Trees<'a> {
    licenses: &'a Tree,
    checksums: &'a Tree,
    meta: &'a Tree,
    usage: &'a Tree,
    ops: RefCell<Vec<Op>>,
}

impl Trees<'_> {
    fn get(&self, tree: TreeTag, key: &[u8]) -> Result<Option<IVec>, StoreError> {
        if let Some(op) = self
            .ops
            .borrow()
            .iter()
            .rev()
            .find(|op| op.tree == tree && op.key == key)
        {
            return Ok(op.value.clone());
        }
        let source = match tree {
            TreeTag::Licenses => self.licenses,
            TreeTag::Checksums => self.checksums,
            TreeTag::Meta => self.meta,
            TreeTag::Usage => self.usage,
        };
        source
            .get(key)
            .map_err(|e| backend(format!("reading {}", display_key(key)), e))
    }

    fn insert(&self, tree: TreeTag, key: &[u8], value: impl Into<IVec>) {
        self.ops.borrow_mut().push(Op {
            tree,
            key: key.into(),
            value: Some(value.into()),
        });
    }

    fn remove(&self, tree: TreeTag, key: &[u8]) {
        self.ops.borrow_mut().push(Op {
            tree,
            key: key.into(),
            value: None,
        });
    }
}

/// Applies `entry`'s changes to the trees, indexed by [`TreeTag`], in order.
fn apply_ops(trees: [&Tree; 4], entry: &Entry) -> Result<(), StoreError> {
    for op in &entry.ops {
        let tree = trees[op.tree as usize];
        let done = match &op.value {
            Some(value) => tree.insert(&op.key, value.clone()).map(drop),
            None => tree.remove(&op.key).map(drop),
        };
        done.map_err(|e| {
            backend(
                format!("applying write {} to {}", entry.lsn, display_key(&op.key)),
                e,
            )
        })?;
    }
    Ok(())
}

/// A clean close checkpoints: sled then holds every write on its own, so the next open has
/// nothing to replay, and a binary without the log (an earlier release, after a rollback)
/// finds every acknowledged write in sled. A close that cannot checkpoint (or a crash)
/// leaves the log to be replayed, as always.
impl Drop for SledStore {
    fn drop(&mut self) {
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        if log.unapplied {
            // sled holds part of a write: only a replay of the log makes it whole.
            return;
        }
        let _ = self.checkpoint(&mut log);
    }
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
            if t.get(TreeTag::Licenses, id.as_bytes())?.is_some() {
                return Err(StoreError::IdExists(id));
            }
            if let Some(holder) = t.get(TreeTag::Checksums, checksum.as_bytes())? {
                let existing = decode_id(CHECKSUMS_TREE, checksum.as_bytes(), &holder)?;
                return Err(StoreError::DuplicatePayload { existing });
            }
            let revision = bump_revision(t)?;
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
            let Some(bytes) = t.get(TreeTag::Licenses, id.as_bytes())? else {
                return Ok((None, None));
            };
            let old = decode_record(id.as_bytes(), &bytes)?;
            t.remove(TreeTag::Licenses, id.as_bytes());
            remove_index_entry(t, &old.checksum, id)?;
            let revision = bump_revision(t)?;
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
        // Logged like a license write, without moving the revision.
        let key = node_id.as_bytes();
        self.write(|t| {
            let mut usage = match t.get(TreeTag::Usage, key)? {
                Some(value) => serde_json::from_slice(&value).map_err(|e| {
                    StoreError::Corrupt(format!("usage of {node_id} in tree {USAGE_TREE}: {e}"))
                })?,
                None => NodeUsage {
                    node_id: node_id.to_owned(),
                    ..NodeUsage::default()
                },
            };
            if seq <= usage.last_seq {
                return Ok((false, None));
            }
            usage.last_seq = seq;
            for (bucket, count) in counters {
                let total = usage.buckets.entry(bucket.clone()).or_default();
                *total = total.saturating_add(*count);
            }
            let value = serde_json::to_vec(&usage)
                .map_err(|e| StoreError::Corrupt(format!("encoding usage of {node_id}: {e}")))?;
            t.insert(TreeTag::Usage, key, value);
            Ok((true, None))
        })
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
fn open_sled(dir: &Path, flush_every_ms: Option<u64>) -> Result<sled::Db, StoreError> {
    let mut retries = 0;
    loop {
        match sled::Config::new()
            .path(dir)
            .flush_every_ms(flush_every_ms)
            .open()
        {
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

/// Flushes sled's buffers and fsyncs every file sled may have written since; see
/// "Durability" on [`SledStore`]. `synced_dirs` are the data directory's and `blobs/`'s
/// entries at their last fsync.
fn make_durable(
    db: &sled::Db,
    dir: &Path,
    db_file: &File,
    synced_dirs: &Mutex<(SyncedDir, SyncedDir)>,
) -> Result<(), StoreError> {
    db.flush()
        .map_err(|e| backend(format!("flushing sled database in {}", dir.display()), e))?;
    db_file.sync_data().map_err(|source| StoreError::Io {
        context: format!("fsyncing {}", dir.join(DB_FILE).display()),
        source,
    })?;
    let mut synced = synced_dirs.lock().unwrap_or_else(PoisonError::into_inner);
    let (data, blobs_synced) = &mut *synced;
    let blobs = dir.join(BLOBS_DIR);
    if blobs.is_dir() {
        let listing = list_dir(&blobs)?;
        for (name, _, is_file) in &listing {
            if *is_file {
                sync_file_unless_gone(&blobs.join(name))?;
            }
        }
        blobs_synced.sync(&blobs, listing)?;
    }
    data.sync(dir, list_dir(dir)?)
}

/// The LSN of the last logged write sled holds, 0 before the first.
fn read_wal_lsn(meta: &Tree) -> Result<u64, StoreError> {
    match meta
        .get(WAL_LSN_KEY)
        .map_err(|e| backend("reading the write-ahead log position".to_string(), e))?
    {
        Some(bytes) => {
            let bytes: [u8; 8] = bytes.as_ref().try_into().map_err(|_| {
                StoreError::Corrupt(format!(
                    "tree {META_TREE} key wal_lsn: {} bytes, expected 8",
                    bytes.len()
                ))
            })?;
            Ok(u64::from_be_bytes(bytes))
        }
        None => Ok(0),
    }
}

/// Reads the epoch and revision, writing a new epoch and revision 0 if the store is new.
fn init_meta(meta: &Tree) -> Result<(Uuid, u64), StoreError> {
    let read = |key: &[u8]| {
        meta.get(key)
            .map_err(|e| backend("reading the store epoch".to_string(), e))
    };
    match (read(EPOCH_KEY)?, read(REVISION_KEY)?) {
        (Some(epoch), Some(revision)) => Ok((
            decode_id(META_TREE, EPOCH_KEY, &epoch)?,
            decode_revision(&revision)?,
        )),
        (Some(_), None) => Err(StoreError::Corrupt(
            "tree meta has an epoch but no revision key".to_string(),
        )),
        (None, Some(_)) => Err(StoreError::Corrupt(
            "tree meta has a revision but no epoch key".to_string(),
        )),
        (None, None) => {
            // One batch, so a crash never leaves one key without the other. `open` holds
            // sled's lock on the directory, so nothing else writes meantime.
            let epoch = Uuid::new_v4();
            let mut batch = sled::Batch::default();
            batch.insert(EPOCH_KEY, epoch.as_bytes().as_slice());
            batch.insert(REVISION_KEY, 0u64.to_be_bytes().as_slice());
            meta.apply_batch(batch)
                .map_err(|e| backend("initialising the store epoch".to_string(), e))?;
            Ok((epoch, 0))
        }
    }
}

/// Writes the record and its index entry.
fn store_record(t: &Trees, record: &LicenseRecord) -> Result<(), StoreError> {
    let json = serde_json::to_vec(record).map_err(|e| {
        // Serialising a struct of strings and integers cannot fail; map it anyway rather
        // than panic.
        StoreError::Backend(format!("encoding license {}: {e}", record.id))
    })?;
    t.insert(TreeTag::Licenses, record.id.as_bytes(), json);
    t.insert(
        TreeTag::Checksums,
        record.checksum.as_bytes(),
        record.id.as_bytes().as_slice(),
    );
    Ok(())
}

/// Removes `checksum → id` from the index, leaving the entry alone if it names another id
/// (which would mean the index was already wrong; never take another record's entry).
fn remove_index_entry(t: &Trees, checksum: &str, id: Uuid) -> Result<(), StoreError> {
    if let Some(holder) = t.get(TreeTag::Checksums, checksum.as_bytes())? {
        if holder.as_ref() == id.as_bytes().as_slice() {
            t.remove(TreeTag::Checksums, checksum.as_bytes());
        }
    }
    Ok(())
}

/// Increments the stored revision and returns the new value.
fn bump_revision(t: &Trees) -> Result<u64, StoreError> {
    let current = match t.get(TreeTag::Meta, REVISION_KEY)? {
        Some(bytes) => decode_revision(&bytes)?,
        None => {
            return Err(StoreError::Corrupt(
                "tree meta has no revision key".to_string(),
            ))
        }
    };
    let Some(next) = current.checked_add(1) else {
        return Err(StoreError::Corrupt(format!(
            "revision {current} cannot be incremented"
        )));
    };
    t.insert(TreeTag::Meta, REVISION_KEY, next.to_be_bytes().as_slice());
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
