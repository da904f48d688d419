//! An in-memory copy of the stored licenses, kept up to date from the store's change log
//! ([`LicenseStore::changes_since`]): each record with its API JSON, encoded once, and its
//! verification. Reads (`GET /licenses`, `GET /licenses/{id}`) and the license in force
//! ([`AppState::view`](crate::AppState::view), which the cluster publisher computes after
//! every write) then cost a lookup instead of decoding and checking every stored record.
//!
//! Only what does not depend on the time is kept here: statuses are evaluated at `now` by
//! [`effective::select`] on every view.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use bytes::Bytes;
use charter_license::{TrustedKeys, VerifiedLicense};
use charter_store::{LicenseRecord, LicenseStore, StoreError};
use uuid::Uuid;

use crate::effective::VerifyCache;

/// One stored license.
#[derive(Debug)]
pub struct Entry {
    /// The record as the store holds it.
    pub record: LicenseRecord,
    /// The record as the admin API answers it, encoded once.
    pub json: Bytes,
    /// Its verification against the trusted keys; `None` if it does not verify.
    pub verified: Option<Arc<VerifiedLicense>>,
}

/// The order in which the selection considers verified licenses: most recent
/// `updated_at`, then the higher revision, then the higher id (the last of equal keys in
/// id order, which is what `select_effective` over records in id order picks).
type RecencyKey = (i64, u64, Uuid);

fn recency(record: &LicenseRecord) -> RecencyKey {
    (record.updated_at, record.revision, record.id)
}

/// The copy at one published store revision.
#[derive(Default)]
pub struct Index {
    /// The store revision this copy reflects; `None` before the first load. Every record
    /// written up to it is here as of that write or later.
    revision: Option<u64>,
    by_id: BTreeMap<Uuid, Arc<Entry>>,
    /// The verified entries, by [`recency`].
    by_recency: BTreeSet<RecencyKey>,
    /// How many stored licenses do not verify.
    unverified: usize,
    /// Bodies of `GET /licenses` pages answered at this revision, by (after, size), so a
    /// page is assembled once per revision; emptied by every refresh. A std `Mutex`: held
    /// only to look up or insert, never while a body is built.
    pages: Mutex<PageCache>,
}

/// Page bodies, with their total size to bound the memory they take.
#[derive(Default)]
struct PageCache {
    bodies: HashMap<(Option<Uuid>, usize), Bytes>,
    bytes: usize,
}

/// The most page bytes kept; past it the cache starts over (pages are rebuilt on demand).
const PAGE_CACHE_BYTES: usize = 8 << 20;

impl Index {
    /// The published store revision this copy reflects: every write up to it is here (a
    /// record may be newer still, never older). 0 before the first load.
    pub fn revision(&self) -> u64 {
        self.revision.unwrap_or(0)
    }

    /// The entry with this id.
    pub fn get(&self, id: Uuid) -> Option<&Arc<Entry>> {
        self.by_id.get(&id)
    }

    /// Up to `limit` entries with ids above `after`, in id order (the order of
    /// [`LicenseStore::list`]), and the id to continue after when there are more.
    pub fn page(&self, after: Option<Uuid>, limit: usize) -> (Vec<Arc<Entry>>, Option<Uuid>) {
        let limit = limit.max(1);
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut range = self.by_id.range((lower, Bound::Unbounded));
        let entries: Vec<Arc<Entry>> = range.by_ref().take(limit).map(|(_, e)| e.clone()).collect();
        let next = match range.next() {
            Some(_) => entries.last().map(|e| e.record.id),
            None => None,
        };
        (entries, next)
    }

    /// The body of the page `(after, size)` (see [`page`](Index::page)), made by `build`
    /// from the page's entries and next id the first time it is asked for at this
    /// revision, and then reused.
    pub fn page_body(
        &self,
        after: Option<Uuid>,
        size: usize,
        build: impl FnOnce(&[Arc<Entry>], Option<Uuid>) -> Bytes,
    ) -> Bytes {
        let key = (after, size);
        if let Some(body) = self.pages().bodies.get(&key) {
            return body.clone();
        }
        let (entries, next) = self.page(after, size);
        let body = build(&entries, next);
        let mut pages = self.pages();
        if pages.bytes + body.len() > PAGE_CACHE_BYTES {
            *pages = PageCache::default();
        }
        pages.bytes += body.len();
        if let Some(old) = pages.bodies.insert(key, body.clone()) {
            pages.bytes -= old.len();
        }
        body
    }

    fn pages(&self) -> std::sync::MutexGuard<'_, PageCache> {
        // Only ever holds finished bodies, so a poisoned lock is still consistent.
        self.pages.lock().unwrap_or_else(PoisonError::into_inner)
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

    fn remove(&mut self, id: Uuid) {
        if let Some(old) = self.by_id.remove(&id) {
            if old.verified.is_some() {
                self.by_recency.remove(&recency(&old.record));
            } else {
                self.unverified -= 1;
            }
        }
    }

    fn insert(&mut self, entry: Entry) {
        let id = entry.record.id;
        self.remove(id);
        if entry.verified.is_some() {
            self.by_recency.insert(recency(&entry.record));
        } else {
            self.unverified += 1;
        }
        self.by_id.insert(id, Arc::new(entry));
    }
}

/// The in-memory copy of the stored licenses; see the module documentation.
#[derive(Default)]
pub struct Catalog {
    /// A std `RwLock`, not a Tokio one: nothing asynchronous happens while it is held.
    /// Readers hold it while they look; a refresh holds it for writing while it reads
    /// the changed records from the store.
    index: RwLock<Index>,
}

impl Catalog {
    /// Brings the copy up to the store's latest published revision, then calls `f` on it.
    ///
    /// A write is published before the store's write method returns, so a read that
    /// starts after a write was acknowledged sees that write (or a later one).
    pub fn read<T>(
        &self,
        store: &dyn LicenseStore,
        keys: &TrustedKeys,
        verify: &VerifyCache,
        f: impl FnOnce(&Index) -> T,
    ) -> Result<T, StoreError> {
        {
            let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(revision) = index.revision {
                if store
                    .changes_since(revision)
                    .ids
                    .is_some_and(|ids| ids.is_empty())
                {
                    return Ok(f(&index));
                }
            }
        }
        // A panic mid-refresh leaves entries each of which is a record as stored at some
        // revision, and the index's revision unmoved, so the next refresh repairs it.
        let mut index = self.index.write().unwrap_or_else(PoisonError::into_inner);
        refresh(&mut index, store, keys, verify)?;
        Ok(f(&index))
    }
}

/// Re-reads what changed since the index's revision, or everything when the store's log
/// does not reach back that far (or on the first load).
fn refresh(
    index: &mut Index,
    store: &dyn LicenseStore,
    keys: &TrustedKeys,
    verify: &VerifyCache,
) -> Result<(), StoreError> {
    // No store publishes revision `u64::MAX`, so asking from there means "start over".
    let changes = store.changes_since(index.revision.unwrap_or(u64::MAX));
    match changes.ids {
        Some(ids) => {
            let mut seen = BTreeSet::new();
            for id in ids {
                if !seen.insert(id) {
                    continue;
                }
                // Read as stored now, which may be newer than `changes.revision`: that is
                // fine, the next refresh reads it again.
                match store.get(id)? {
                    Some(record) => index.insert(entry(record, keys, verify)),
                    None => index.remove(id),
                }
            }
        }
        None => {
            let mut fresh = Index::default();
            for record in store.all()? {
                fresh.insert(entry(record, keys, verify));
            }
            *index = fresh;
        }
    }
    index.revision = Some(changes.revision);
    *index
        .pages
        .get_mut()
        .unwrap_or_else(PoisonError::into_inner) = PageCache::default();
    Ok(())
}

fn entry(record: LicenseRecord, keys: &TrustedKeys, verify: &VerifyCache) -> Entry {
    Entry {
        json: crate::api::record_body(&record),
        verified: verify.verify(keys, &record),
        record,
    }
}

#[cfg(test)]
mod tests;
