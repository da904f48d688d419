//! The stored licenses at one store revision, in memory and immutable, indexed the ways the
//! control plane reads them (by id for the API, newest first for the license in force, by
//! checksum for duplicates).
//!
//! A write makes a new snapshot from the last one and the change; a reader holds an
//! `Arc<Snapshot>` and never sees a write half-applied.
//!
//! Each license is verified once: a license written through this process when it is
//! validated, one loaded from the store the first time something needs it (the license in
//! force is the newest that verifies, so a view verifies about one) or when the service's
//! background sweep reaches it. Start-up thus waits for reading the store, not for
//! verifying every license in it (100,000 signatures take seconds). An entry keeps its
//! verification in a `OnceLock`: a pure function of its record and the trusted keys,
//! computed once and shared by every snapshot that holds the entry.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::{Arc, OnceLock};

use charter_license::{TrustedKeys, VerifiedLicense};
use charter_store::{Changes, LicenseRecord, Loaded};
use uuid::Uuid;

/// One stored license.
#[derive(Debug)]
pub struct Entry {
    /// The record as the store holds it.
    pub record: LicenseRecord,
    /// Its verification against the trusted keys (`None` inside: it does not verify),
    /// once known.
    verification: OnceLock<Option<Arc<VerifiedLicense>>>,
    /// The record as a reader encodes it for its wire (the admin API's JSON), made once by
    /// the first reader that asks: the snapshot keeps the bytes without knowing their
    /// shape, so a page of records costs copies, not encodings.
    encoded: OnceLock<bytes::Bytes>,
}

impl Entry {
    /// A license not verified yet.
    pub fn unverified(record: LicenseRecord) -> Entry {
        Entry {
            record,
            verification: OnceLock::new(),
            encoded: OnceLock::new(),
        }
    }

    /// A license verified as `verified`.
    pub fn verified_as(record: LicenseRecord, verified: Arc<VerifiedLicense>) -> Entry {
        Entry {
            record,
            verification: OnceLock::from(Some(verified)),
            encoded: OnceLock::new(),
        }
    }

    /// Its verification, verifying it now if nothing has yet.
    pub fn verified(&self, keys: &TrustedKeys) -> Option<&Arc<VerifiedLicense>> {
        self.verification
            .get_or_init(|| keys.verify_text(&self.record.payload).ok().map(Arc::new))
            .as_ref()
    }

    /// The record encoded by `encode`, the first caller's encoding being kept. Every caller
    /// must pass the same encoding (there is one: the admin API's).
    pub fn encoded(&self, encode: impl FnOnce(&LicenseRecord) -> bytes::Bytes) -> bytes::Bytes {
        self.encoded.get_or_init(|| encode(&self.record)).clone()
    }

    /// Whether it is known not to verify (`None`: not verified yet).
    fn fails(&self) -> Option<bool> {
        self.verification.get().map(Option::is_none)
    }
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
    /// Every entry, verified or not, by [`recency`].
    by_recency: BTreeSet<RecencyKey>,
    /// How many licenses do not verify, once every entry's verification is known.
    unverified: Option<usize>,
    /// How many stored records could not be read at the last load.
    damaged: usize,
}

impl Snapshot {
    /// The snapshot of what the store loaded. A license `previous` holds with the same
    /// payload keeps its verification; the others are verified when first needed.
    pub fn build(loaded: Loaded, previous: Option<&Snapshot>) -> Snapshot {
        let mut snapshot = Snapshot::empty(loaded.epoch, loaded.revision);
        snapshot.damaged = loaded.damaged.len();
        for record in loaded.licenses {
            let known = previous
                .and_then(|p| p.by_id.get(&record.id))
                .filter(|e| e.record.payload == record.payload)
                .and_then(|e| e.verification.get().cloned());
            let entry = match known {
                Some(verification) => Entry {
                    record,
                    verification: OnceLock::from(verification),
                    encoded: OnceLock::new(),
                },
                None => Entry::unverified(record),
            };
            snapshot.insert(Arc::new(entry));
        }
        if snapshot.by_id.is_empty() {
            snapshot.unverified = Some(0);
        }
        snapshot
    }

    /// This snapshot with no verification known: after the trusted keys changed, every
    /// license is verified again with the new ones.
    pub fn unverified_copy(&self) -> Snapshot {
        let mut next = Snapshot::empty(self.epoch, self.revision);
        next.damaged = self.damaged;
        for entry in self.by_id.values() {
            next.insert(Arc::new(Entry::unverified(entry.record.clone())));
        }
        if next.by_id.is_empty() {
            next.unverified = Some(0);
        }
        next
    }

    fn empty(epoch: Uuid, revision: u64) -> Snapshot {
        Snapshot {
            epoch,
            revision,
            by_id: BTreeMap::new(),
            by_checksum: HashMap::new(),
            by_recency: BTreeSet::new(),
            unverified: None,
            damaged: 0,
        }
    }

    /// This snapshot with `entry` (verified) put, created or replaced, at `revision`.
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

    /// This snapshot moved to `changes.revision` by another writer's changes: the records
    /// written replace or join those held, the ids deleted go. An entry whose payload did
    /// not change keeps its verification.
    pub fn with_changes(&self, changes: Changes) -> Snapshot {
        let mut next = self.clone();
        next.revision = changes.revision;
        for id in &changes.deleted {
            next.remove(*id);
        }
        // Remove every written id first, so a checksum that moved between two records in
        // these changes ends up with its new holder.
        let known: Vec<Option<Option<Arc<VerifiedLicense>>>> = changes
            .written
            .iter()
            .map(|record| {
                let old = next.by_id.get(&record.id)?;
                (old.record.payload == record.payload)
                    .then(|| old.verification.get().cloned())
                    .flatten()
            })
            .collect();
        for record in &changes.written {
            next.remove(record.id);
        }
        for (record, known) in changes.written.into_iter().zip(known) {
            let entry = match known {
                Some(verification) => Entry {
                    record,
                    verification: OnceLock::from(verification),
                    encoded: OnceLock::new(),
                },
                None => Entry::unverified(record),
            };
            next.insert(Arc::new(entry));
        }
        if next.by_id.is_empty() {
            next.unverified = Some(0);
        }
        next
    }

    /// Verifies every license not verified yet, on every core, and returns this snapshot
    /// with the count of those that do not verify.
    pub fn verify_all(&self, keys: &TrustedKeys) -> Snapshot {
        let entries: Vec<&Arc<Entry>> = self.by_id.values().collect();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = entries.len().div_ceil(threads).max(1);
        std::thread::scope(|scope| {
            for chunk in entries.chunks(chunk) {
                scope.spawn(move || {
                    for entry in chunk {
                        entry.verified(keys);
                    }
                });
            }
        });
        let unverified = entries.iter().filter(|e| e.fails() == Some(true)).count();
        Snapshot {
            unverified: Some(unverified),
            ..self.clone()
        }
    }

    fn insert(&mut self, entry: Arc<Entry>) {
        let record = &entry.record;
        self.by_checksum
            .insert(checksum_key(&record.checksum), record.id);
        self.by_recency.insert(recency(record));
        if let Some(count) = &mut self.unverified {
            match entry.fails() {
                Some(fails) => *count += usize::from(fails),
                None => self.unverified = None,
            }
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
        self.by_recency.remove(&recency(&old.record));
        if let Some(count) = &mut self.unverified {
            // A known count means every entry's verification is known.
            *count -= usize::from(old.fails() == Some(true));
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

    /// The verified licenses, newest first (see [`RecencyKey`]), verifying each one the
    /// iteration reaches that was not verified yet.
    pub fn newest_first<'a>(
        &'a self,
        keys: &'a TrustedKeys,
    ) -> impl Iterator<Item = (&'a LicenseRecord, &'a Arc<VerifiedLicense>)> + Clone + 'a {
        self.by_recency.iter().rev().filter_map(move |(_, _, id)| {
            let entry = self.by_id.get(id)?;
            Some((&entry.record, entry.verified(keys)?))
        })
    }

    /// How many stored licenses do not verify, once every license has been verified.
    pub fn unverified(&self) -> Option<usize> {
        self.unverified
    }

    /// How many stored records could not be read at the last load.
    pub fn damaged(&self) -> usize {
        self.damaged
    }

    /// Whether every license's verification is known.
    pub fn fully_verified(&self) -> bool {
        self.unverified.is_some()
    }
}
