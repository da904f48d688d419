//! License storage for the control plane: the [`LicenseStore`] trait and its sled backend.
//!
//! This is the only crate that knows sled. The control plane codes against
//! [`LicenseStore`], so a PostgreSQL backend (several CP replicas, change fan-out by
//! `LISTEN/NOTIFY`) can be added later without touching the admin API or the sync code.
//!
//! **Architecture Invariant:** an acknowledged write is durable. No write method returns
//! `Ok` before the change is on the device: written to the store's write-ahead log and
//! `fdatasync`ed (see [`SledStore`]).
//!
//! **Architecture Invariant:** every license write bumps the store revision by exactly one,
//! in the same log record as the data it changes, so after a crash a revision always names
//! one state of the store.
//!
//! **Architecture Invariant:** the store never reads the clock; callers pass `now`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

mod error;
mod sled_store;
mod wal;

#[cfg(test)]
mod tests;

pub use error::StoreError;
pub use sled_store::SledStore;

/// One stored license, as the admin API serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LicenseRecord {
    /// The record id, chosen by the caller (`POST` makes one, `PUT` names one).
    pub id: Uuid,
    /// The license document, exactly as it was submitted.
    pub payload: String,
    /// SHA-256 of the payload bytes, lowercase hex. Unique across the store.
    pub checksum: String,
    /// Unix seconds when the record was first created; kept on replace.
    pub created_at: i64,
    /// Unix seconds of the last write to this record.
    pub updated_at: i64,
    /// The store revision of the write that last changed this record.
    pub revision: u64,
}

/// One page of [`LicenseStore::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The records of this page, in ascending id order.
    pub records: Vec<LicenseRecord>,
    /// The id to pass as `after` for the next page, `None` when this page is the last.
    pub next: Option<Uuid>,
}

/// A data plane as the control plane last saw it: the cluster inventory.
///
/// Inventory is soft state, refreshed by every message a data plane sends: it is written
/// without the fsync that license writes get (sled flushes it within half a second), does
/// not move the revision, and a crash may lose its last moments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPlaneRecord {
    /// The data plane's persisted node id.
    pub id: String,
    /// The peer address it connected from.
    pub ip: String,
    /// Its host name.
    pub hostname: String,
    /// Its version.
    pub version: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Unix seconds of its last message.
    pub last_seen: i64,
    /// `in_sync`, `syncing`, `rejected`, `version_incompatible` or `disconnected`.
    pub sync_status: String,
    /// The license it runs, if any.
    pub license_id: Option<String>,
    /// The store revision of the last snapshot it accepted.
    pub license_revision: u64,
    /// Its license status (`valid`, `expiring`, …, `unlicensed`).
    pub license_status: String,
    /// Its last refusal or error, if any.
    pub last_error: Option<String>,
    /// The upstream it gates, or empty.
    pub upstream: String,
}

/// Request counts a data plane reported, as applied by the control plane.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeUsage {
    /// The data plane's node id.
    pub node_id: String,
    /// The highest telemetry `seq` applied; a report with this `seq` or lower is a resend.
    pub last_seq: u64,
    /// Request counts by UTC month (`YYYY-MM`).
    pub buckets: BTreeMap<String, u64>,
}

/// The license ids written since a revision: see [`LicenseStore::changes_since`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes {
    /// The latest published revision (that of the last durable write).
    pub revision: u64,
    /// The ids written after the revision asked about and up to `revision`, oldest first
    /// (an id written twice appears twice); `None` when the store no longer remembers that
    /// far back, so the caller must read everything again.
    pub ids: Option<Vec<Uuid>>,
}

/// What [`LicenseStore::put`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// No record had that id; one was created.
    Created,
    /// A record with that id existed and was replaced (`created_at` kept).
    Replaced,
}

/// Storage of license records, with a revision counter that names each state of the store.
///
/// Every write method returns `Ok` only once the change is durable (it survives a power
/// cut), bumps [`revision`](LicenseStore::revision) by exactly one, and then publishes the
/// new revision to the receivers made by [`subscribe`](LicenseStore::subscribe). A write that returns `Err`
/// changed nothing, except when making it durable or applying it failed midway: then its
/// outcome is unknown, as with any request whose answer was lost (it may have reached the
/// disk and appear after a restart).
pub trait LicenseStore: Send + Sync + 'static {
    /// The UUID made once when this store was created; persisted, so a rebuilt store
    /// (new epoch) can be told apart from an old one that went back in time.
    fn epoch(&self) -> Uuid;

    /// The current revision: 0 for a fresh store, +1 for every successful write.
    fn revision(&self) -> Result<u64, StoreError>;

    /// The backend and its version, for reports, e.g. `"sled 0.34.7"`.
    fn backend_version(&self) -> &'static str;

    /// The record with this id, if any.
    fn get(&self, id: Uuid) -> Result<Option<LicenseRecord>, StoreError>;

    /// Up to `limit` records with ids strictly greater than `after` (all records when
    /// `after` is `None`), in ascending order of the id bytes. The order is stable, so
    /// following [`Page::next`] visits every record exactly once when nothing is written
    /// meanwhile. A `limit` of 0 is treated as 1 so that paging always makes progress.
    fn list(&self, after: Option<Uuid>, limit: usize) -> Result<Page, StoreError>;

    /// Every record, in ascending id order.
    fn all(&self) -> Result<Vec<LicenseRecord>, StoreError>;

    /// How many records are stored.
    fn count(&self) -> Result<u64, StoreError>;

    /// Creates a record with this id.
    ///
    /// Fails with [`StoreError::IdExists`] if the id is taken, else with
    /// [`StoreError::DuplicatePayload`] if the same payload is stored under any id.
    fn insert(&self, id: Uuid, payload: &str, now: i64) -> Result<LicenseRecord, StoreError>;

    /// Creates a record with this id, or replaces the one there (keeping its `created_at`,
    /// setting `updated_at` to `now`). Replacing a record with its own payload is allowed
    /// and moves `updated_at`. Fails with [`StoreError::DuplicatePayload`] if the payload
    /// is stored under another id.
    fn put(
        &self,
        id: Uuid,
        payload: &str,
        now: i64,
    ) -> Result<(LicenseRecord, PutOutcome), StoreError>;

    /// Replaces the payload of an existing record, like [`put`](LicenseStore::put), but
    /// fails with [`StoreError::NotFound`] if there is no record with this id.
    fn patch(&self, id: Uuid, payload: &str, now: i64) -> Result<LicenseRecord, StoreError>;

    /// Deletes the record with this id and returns it; `Ok(None)` if there was none (which
    /// is not a write: the revision does not move).
    fn delete(&self, id: Uuid) -> Result<Option<LicenseRecord>, StoreError>;

    /// A receiver of the current revision, updated after every durable write. The cluster
    /// sync code waits on it to push new snapshots.
    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64>;

    /// Which license ids were written after `revision`, as of the latest published
    /// revision, so a reader can keep an in-memory copy of the licenses up to date by
    /// re-reading only those ids. A write is published (here and to
    /// [`subscribe`](LicenseStore::subscribe)) after it is durable and before the write
    /// method returns, so once a write has returned, `changes_since` reports it.
    /// Cheap when nothing changed: no allocation, one uncontended lock.
    fn changes_since(&self, revision: u64) -> Changes;

    /// Records a data plane (insert or replace by id). Soft state: see [`DataPlaneRecord`].
    fn put_data_plane(&self, record: &DataPlaneRecord) -> Result<(), StoreError>;

    /// Records several data planes at once (insert or replace by id), all or none.
    fn put_data_planes(&self, records: &[DataPlaneRecord]) -> Result<(), StoreError>;

    /// Every recorded data plane, by id.
    fn data_planes(&self) -> Result<Vec<DataPlaneRecord>, StoreError>;

    /// Applies one telemetry report of a data plane exactly once: if `seq` is above the
    /// node's last applied `seq`, adds `counters` (bucket, count) to its totals, durably
    /// (like a license write, but without moving the revision), and
    /// returns `true`; a resend (`seq` not above the last) changes nothing and returns
    /// `false`. Either way the caller may acknowledge `seq`.
    fn apply_telemetry(
        &self,
        node_id: &str,
        seq: u64,
        counters: &[(String, u64)],
    ) -> Result<bool, StoreError>;

    /// Every data plane's applied usage, by node id.
    fn usage(&self) -> Result<Vec<NodeUsage>, StoreError>;

    /// Removes data planes last seen before `last_seen_before`; returns how many.
    fn purge_data_planes(&self, last_seen_before: i64) -> Result<usize, StoreError>;
}
