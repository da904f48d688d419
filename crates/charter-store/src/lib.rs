//! The control plane's storage: the narrow, async [`Store`] trait and its sled backend.
//!
//! This is the only crate that knows sled and PostgreSQL. The control plane keeps every license in an
//! in-memory snapshot and asks the store for four things only: load everything, commit a
//! change on top of a known revision, the data-plane inventory, and telemetry. The
//! PostgreSQL backend ([`PgStore`], several control planes on one database) implements the
//! same trait.
//!
//! **Architecture Invariant:** an acknowledged write is durable. No write method returns
//! `Ok` before the engine has made the change durable (for sled: one batch, then sled's
//! `flush` and an fsync of every file and directory in the data dir).
//!
//! **Architecture Invariant:** every license write bumps the store revision by exactly
//! one, in the same atomic write as the data it changes, so a revision names one state of
//! the store.
//!
//! **Architecture Invariant:** a write whose durability failed is never retried as if
//! nothing happened: the store refuses every later write ([`StoreError::Failed`]) until a
//! restart reads what is really on disk.
//!
//! **Architecture Invariant:** the store never reads the clock; callers pass times in.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

mod error;
mod legacy;
mod pg_url;
mod postgres;
mod sled;
mod sync;

#[cfg(test)]
mod pg_tests;
#[cfg(feature = "test-postgres")]
pub mod testing;
#[cfg(test)]
mod tests;

pub use crate::postgres::PgStore;
#[cfg(feature = "fault-injection")]
pub use crate::sled::Faults;
pub use crate::sled::SledStore;
pub use error::StoreError;

/// One stored license, as the admin API serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LicenseRecord {
    /// The record id, chosen by the caller (`POST` makes one, `PUT` names one).
    pub id: Uuid,
    /// The license document, as the client sent it.
    pub payload: String,
    /// SHA-256 of the license's canonical text (the compact document with sorted keys,
    /// which is what earlier releases stored as the payload), lowercase hex. Unique across
    /// the store, so one license is stored once whatever its whitespace or key order.
    pub checksum: String,
    /// Unix seconds when the record was first created; kept on replace.
    pub created_at: i64,
    /// Unix seconds of the last write to this record.
    pub updated_at: i64,
    /// The store revision of the write that last changed this record.
    pub revision: u64,
}

/// SHA-256 of a text, lowercase hex: a record's [`checksum`](LicenseRecord::checksum) is
/// that of its license's canonical text.
pub fn checksum_of(payload: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(payload.as_bytes()))
}

/// Everything the store holds of licenses: see [`Store::load`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// The store's epoch: a UUID made once when the store was created.
    pub epoch: Uuid,
    /// The revision of the last license write (0 for a fresh store).
    pub revision: u64,
    /// Every stored license that decodes, in ascending id order.
    pub licenses: Vec<LicenseRecord>,
    /// What is wrong with each stored record that does not decode (left out of
    /// `licenses`); restore the data from a backup.
    pub damaged: Vec<String>,
}

/// What changed in the store after a revision: see [`Store::changes_since`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes {
    /// The store's epoch.
    pub epoch: Uuid,
    /// The revision the changes lead to: the store's revision when they were read.
    pub revision: u64,
    /// Every record written after the base revision, as it is now, in ascending id order.
    pub written: Vec<LicenseRecord>,
    /// Every id deleted after the base revision and not written since.
    pub deleted: Vec<Uuid>,
}

/// One license write: see [`Store::commit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Creates the record, or replaces the one with its id. Its `revision` must be the
    /// revision the commit makes (the base + 1).
    Put(LicenseRecord),
    /// Removes the record with this id (which must exist).
    Delete(Uuid),
}

/// A data plane as the control plane last saw it: the cluster inventory.
///
/// Inventory is soft state, refreshed by every message a data plane sends: it is written
/// without waiting for the disk, does not move the revision, and a crash may lose its last
/// moments (the data planes report again when they reconnect).
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
    /// The control plane it is (or was last) connected to.
    #[serde(default)]
    pub control_plane: String,
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

/// One telemetry report of a data plane: see [`Store::apply_telemetry`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The data plane's node id.
    pub node_id: String,
    /// The report's sequence number.
    pub seq: u64,
    /// Request counts by UTC month (`YYYY-MM`).
    pub counters: Vec<(String, u64)>,
}

/// The control plane's storage. Implementations are cheap to share (`Arc<dyn Store>`).
///
/// A write that returns `Err` changed nothing, except when the engine failed while making
/// it durable ([`StoreError::is_unknown_outcome`]): then the outcome is unknown, as with
/// any request whose answer was lost. The sled backend then takes no more writes until a
/// restart ([`StoreError::Failed`]); a backend whose engine reports the outcome later (a
/// database server) may take writes again, and a caller that lost track loads again.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// The backend and its version, for reports, e.g. `"sled 0.34.7"`.
    fn backend_version(&self) -> &str;

    /// Every stored license with the epoch and the revision they are at: one consistent
    /// state of the store.
    async fn load(&self) -> Result<Loaded, StoreError>;

    /// What changed after revision `base`, read as one consistent state of the store, so
    /// a reader at `base` can move to the store's revision without loading everything.
    /// `None` when the store cannot tell (it no longer remembers deletions that old, or
    /// does not keep them at all): load instead.
    async fn changes_since(&self, base: u64) -> Result<Option<Changes>, StoreError> {
        let _ = base;
        Ok(None)
    }

    /// Applies `change` on top of revision `base` and returns the new revision (`base + 1`)
    /// once durable. Fails with [`StoreError::Conflict`], changing nothing, when the
    /// store's revision is no longer `base` (another writer came first: load again and
    /// decide again).
    async fn commit(&self, base: u64, change: Change) -> Result<u64, StoreError>;

    /// A receiver of the newest revision committed to the store, by this process or by
    /// another sharing the store; a reader that holds another one catches up. It may go
    /// down: a shared database restored from an older backup.
    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64>;

    /// The store's epoch as last seen, for a store that can be replaced under a running
    /// process (a shared database recreated): a reader holding another epoch loads again,
    /// whatever the revision. `None` when the store cannot change epoch (the default).
    fn seen_epoch(&self) -> Option<Uuid> {
        None
    }

    /// Applies telemetry reports exactly once each, all in one durable write: a report
    /// whose `seq` is above its node's last applied `seq` adds its counters to the node's
    /// totals (`true`); a resend changes nothing (`false`). Reports of one node apply in
    /// the order given. Either way the caller may acknowledge each `seq` once this returns.
    async fn apply_telemetry(&self, reports: Vec<Report>) -> Result<Vec<bool>, StoreError>;

    /// Every data plane's applied usage, by node id.
    async fn usage(&self) -> Result<Vec<NodeUsage>, StoreError>;

    /// Records data planes (insert or replace by id; of the same id given twice, the later
    /// stands), all or none. Soft state: see [`DataPlaneRecord`]. Shared, so a caller can
    /// keep the rows to retry without a copy.
    async fn put_data_planes(&self, records: Arc<[DataPlaneRecord]>) -> Result<(), StoreError>;

    /// Every recorded data plane.
    async fn data_planes(&self) -> Result<Vec<DataPlaneRecord>, StoreError>;

    /// Removes data planes last seen before `last_seen_before`; returns how many.
    async fn purge_data_planes(&self, last_seen_before: i64) -> Result<usize, StoreError>;

    /// Whether this process should run the chores of the whole store now (purging old
    /// data planes, the daily expiry log): `true` in exactly one process sharing the store
    /// at a time, as far as the store can tell, and always in a store of one process.
    fn leads_chores(&self) -> bool {
        true
    }

    /// Whether the store can take writes now (for health checks).
    async fn check(&self) -> Result<(), StoreError>;

    /// Makes everything durable and releases the store; later calls fail.
    async fn close(&self) -> Result<(), StoreError>;
}
