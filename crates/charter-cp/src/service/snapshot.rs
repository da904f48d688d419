//! The stored licenses at one store revision, in memory and immutable: each verified once
//! when it enters a snapshot, and indexed the ways the control plane reads them (by id for
//! the API, newest first for the license in force, by checksum for duplicates).
//!
//! A write makes a new snapshot from the last one and the change; a reader holds an
//! `Arc<Snapshot>` and never sees a write half-applied.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::Arc;

use charter_license::{TrustedKeys, VerifiedLicense};
use charter_store::{LicenseRecord, Loaded};
use uuid::Uuid;

/// One stored license.
#[derive(Debug)]
pub struct Entry {
    /// The record as the store holds it.
    pub record: LicenseRecord,
    /// Its verification against the trusted keys; `None` if it does not verify.
    pub verified: Option<Arc<VerifiedLicense>>,
}

/// The order in which the selection considers verified licenses: most recent
/// `updated_at`, then the higher revision, then the higher id.
type RecencyKey = (i64, u64, Uuid);

fn recency(record: &LicenseRecord) -> RecencyKey {
    (record.updated_at, record.revision, record.id)
}

/// A checksum as bytes (a record's hex checksum decoded), so cloning the index copies no
/// strings. A checksum that is not 64 hex digits (never written by this release) keeps its
/// first 32 bytes of text, which still tells it apart from every real one.
type ChecksumKey = [u8; 32];

fn checksum_key(checksum: &str) -> ChecksumKey {
    let mut key = [0u8; 32];
    if hex::decode_to_slice(checksum, &mut key).is_err() {
        let bytes = checksum.as_bytes();
        let n = bytes.len().min(32);
        key = [0xff; 32];
        key[..n].copy_from_slice(&bytes[..n]);
    }
    key
}

/// The stored licenses at one revision of one store.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The store's epoch.
    pub epoch: Uuid,
    /// The store revision this snapshot is: every license write up to it, none after.
    pub revision: u64,
    by_id: BTreeMap<Uuid, Arc<Entry>>,
    by_checksum: HashMap<ChecksumKey, Uuid>,
    by_recency: BTreeSet<RecencyKey>,
    unverified: usize,
}

impl Snapshot {
    /// The snapshot of what the store loaded, verifying each license (on every core) unless
    /// `previous` already verified the same payload.
    pub fn build(loaded: Loaded, keys: &TrustedKeys, previous: Option<&Snapshot>) -> Snapshot {
        let known = |record: &LicenseRecord| {
            let previous = previous?;
            let id = previous.by_checksum.get(&checksum_key(&record.checksum))?;
            let entry = previous.by_id.get(id)?;
            (entry.record.payload == record.payload).then(|| entry.verified.clone())
        };
        let records = loaded.licenses;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = records.len().div_ceil(threads).max(1);
        let entries: Vec<Entry> = std::thread::scope(|scope| {
            let workers: Vec<_> = records
                .chunks(chunk)
                .map(|chunk| {
                    scope.spawn(move || {
                        chunk
                            .iter()
                            .map(|record| Entry {
                                verified: known(record).unwrap_or_else(|| {
                                    keys.verify_text(&record.payload).ok().map(Arc::new)
                                }),
                                record: record.clone(),
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                // A worker only verifies and clones; a panic there is a bug worth the
                // crash of start-up rather than a snapshot missing licenses.
                .flat_map(|w| w.join().expect("verifying stored licenses"))
                .collect()
        });
        let mut snapshot = Snapshot::empty(loaded.epoch, loaded.revision);
        for entry in entries {
            snapshot.insert(Arc::new(entry));
        }
        snapshot
    }

    fn empty(epoch: Uuid, revision: u64) -> Snapshot {
        Snapshot {
            epoch,
            revision,
            by_id: BTreeMap::new(),
            by_checksum: HashMap::new(),
            by_recency: BTreeSet::new(),
            unverified: 0,
        }
    }

    /// This snapshot with `entry` put (created or replaced) at `revision`.
    pub fn with_put(&self, revision: u64, entry: Entry) -> Snapshot {
        let mut next = self.clone();
        next.revision = revision;
        next.remove(entry.record.id);
        next.insert(Arc::new(entry));
        next
    }

    /// This snapshot with the license `id` deleted at `revision`.
    pub fn with_delete(&self, revision: u64, id: Uuid) -> Snapshot {
        let mut next = self.clone();
        next.revision = revision;
        next.remove(id);
        next
    }

    fn insert(&mut self, entry: Arc<Entry>) {
        let record = &entry.record;
        self.by_checksum
            .insert(checksum_key(&record.checksum), record.id);
        if entry.verified.is_some() {
            self.by_recency.insert(recency(record));
        } else {
            self.unverified += 1;
        }
        self.by_id.insert(record.id, entry);
    }

    fn remove(&mut self, id: Uuid) {
        let Some(old) = self.by_id.remove(&id) else {
            return;
        };
        let key = checksum_key(&old.record.checksum);
        if self.by_checksum.get(&key) == Some(&id) {
            self.by_checksum.remove(&key);
        }
        if old.verified.is_some() {
            self.by_recency.remove(&recency(&old.record));
        } else {
            self.unverified -= 1;
        }
    }

    /// The license with this id.
    pub fn get(&self, id: Uuid) -> Option<&Arc<Entry>> {
        self.by_id.get(&id)
    }

    /// The id of the license whose payload has this checksum.
    pub fn holder_of(&self, checksum: &str) -> Option<Uuid> {
        self.by_checksum.get(&checksum_key(checksum)).copied()
    }

    /// How many licenses are stored.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no license is stored.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Up to `limit` licenses with ids above `after`, in id order, and the id to continue
    /// after when there are more.
    pub fn page(&self, after: Option<Uuid>, limit: usize) -> (Vec<&Arc<Entry>>, Option<Uuid>) {
        let limit = limit.max(1);
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut range = self.by_id.range((lower, Bound::Unbounded));
        let entries: Vec<&Arc<Entry>> = range.by_ref().take(limit).map(|(_, e)| e).collect();
        let next = match range.next() {
            Some(_) => entries.last().map(|e| e.record.id),
            None => None,
        };
        (entries, next)
    }

    /// The verified licenses, newest first (see [`RecencyKey`]).
    pub fn newest_first(
        &self,
    ) -> impl Iterator<Item = (&LicenseRecord, &Arc<VerifiedLicense>)> + Clone {
        self.by_recency.iter().rev().filter_map(|(_, _, id)| {
            let entry = self.by_id.get(id)?;
            Some((&entry.record, entry.verified.as_ref()?))
        })
    }

    /// How many stored licenses do not verify.
    pub fn unverified(&self) -> usize {
        self.unverified
    }
}
