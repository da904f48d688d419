//! The control plane without its transports: licenses, the license in force, the
//! data-plane inventory and usage. The admin API and the cluster server are both built on
//! [`Service`]; it knows neither HTTP nor gRPC, and maps nothing to a wire answer.
//!
//! The licenses live in one immutable [`Snapshot`] at a time. A write is decided on the
//! current snapshot, committed to the store on top of that snapshot's revision, and once
//! durable the next snapshot replaces it (one `watch` send, which also wakes the cluster
//! streams). Writes are serialised by one lock, and the store refuses a commit whose base
//! revision is stale, so each write is decided on every earlier write whole.

mod effective;
mod inventory;
mod snapshot;
mod telemetry;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use charter_license::{
    Clock, Evaluation, LicenseDocument, LicenseError, TrustedKeys, UnixTime, VerifiedLicense,
};
use charter_runtime::flags::StaticLicense;
use charter_store::{Change, LicenseRecord, NodeUsage, Store, StoreError};
use tokio::sync::watch;
use uuid::Uuid;

pub use effective::{InForce, View};
pub use inventory::Inventory;
pub use snapshot::{Entry, Snapshot};
pub use telemetry::TelemetryError;

/// How long a write keeps being decided again while other control planes of the store
/// come first (each time after a reload and a short random pause, so contending writers
/// spread out).
const WRITE_PATIENCE: Duration = Duration::from_secs(10);

/// Why a license write was refused. Nothing was written, except for
/// [`WriteError::Store`] with an unknown outcome.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The license does not validate (Kong's code and message).
    #[error("invalid license: {0}")]
    Invalid(LicenseError),
    /// The same payload is stored under another id.
    #[error("the same license payload is already stored as license {existing}")]
    DuplicatePayload {
        /// The id holding it.
        existing: Uuid,
    },
    /// A license with this id exists (a create that names an id).
    #[error("license {0} already exists")]
    IdExists(Uuid),
    /// No license has this id.
    #[error("license {0} not found")]
    NotFound(Uuid),
    /// A Consul `DELETE` that would leave the cluster without a valid license, or with
    /// nothing stored to delete.
    #[error("{0}")]
    Refused(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a license write stored.
#[derive(Debug, Clone)]
pub struct Written {
    /// The record as stored.
    pub record: LicenseRecord,
    /// Whether it replaced a record with the same id.
    pub replaced: bool,
    /// Its verification.
    pub verified: Arc<VerifiedLicense>,
    /// Its status at the time of the write.
    pub evaluation: Evaluation,
}

/// A validated license text, ready to store.
pub struct Valid {
    /// The document as the client sent it: stored and served as is.
    text: String,
    /// SHA-256 of the document's canonical text: how duplicates are found.
    checksum: String,
    verified: Arc<VerifiedLicense>,
    evaluation: Evaluation,
}

/// The canonical text of a license: the compact document with sorted keys. The same
/// license sent with other whitespace or key order has the same canonical text, and a
/// record's `checksum` is its SHA-256, so duplicates are found on it. Earlier releases
/// stored this text as the payload itself, checksummed as such: their records keep
/// finding the same duplicates.
pub fn canonical_text(document: &LicenseDocument) -> String {
    document.to_json()
}

/// The license document as the client wrote it: `text` itself or, for an admin-API record
/// (`{"payload":"…"}` as GET answers it, which the license parser also takes), the document
/// text its `payload` holds, as written there.
fn document_text(text: &str) -> String {
    match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text) {
        Ok(top) if !top.contains_key("license") => match top.get("payload") {
            Some(serde_json::Value::String(inner)) => document_text(inner),
            _ => text.to_owned(),
        },
        _ => text.to_owned(),
    }
}

/// The control plane's service; cheap to clone.
#[derive(Clone)]
pub struct Service(Arc<Inner>);

struct Inner {
    store: Arc<dyn Store>,
    /// The trusted keys, replaced whole when they are reloaded ([`Service::set_keys`]).
    /// A std mutex: it is only held to clone or swap the `Arc`.
    keys: std::sync::Mutex<Arc<TrustedKeys>>,
    clock: Arc<dyn Clock>,
    static_license: Option<StaticLicense>,
    /// This control plane's name in the inventory (`control_plane`): its host name.
    name: String,
    snapshots: watch::Sender<Arc<Snapshot>>,
    /// Serialises license writes (and reloads): a write decides, commits and publishes
    /// with it held. A Tokio mutex, held across the store's `.await`.
    writing: tokio::sync::Mutex<()>,
    inventory: Inventory,
    telemetry: telemetry::Sender,
}

/// The service's background work, returned by [`Service::start`]: run it until shutdown.
pub struct Tasks {
    service: Service,
    telemetry: telemetry::Receiver,
}

impl Service {
    /// Loads the store into the first snapshot and makes the service of the control plane
    /// called `name`.
    pub async fn start(
        store: Arc<dyn Store>,
        keys: TrustedKeys,
        clock: Arc<dyn Clock>,
        static_license: Option<StaticLicense>,
        name: String,
    ) -> Result<(Service, Tasks), StoreError> {
        let started = std::time::Instant::now();
        let loaded = store.load().await?;
        let read_ms = started.elapsed().as_millis() as u64;
        for damage in &loaded.damaged {
            tracing::error!(error = %damage, "a stored license cannot be read and is left out; restore the data dir from a backup or delete the license");
        }
        let snapshot = tokio::task::spawn_blocking(move || Snapshot::build(loaded, None))
            .await
            .map_err(|e| StoreError::Backend {
                context: "indexing the stored licenses".to_owned(),
                source: Box::new(e),
            })?;
        tracing::info!(
            licenses = snapshot.len(),
            read_ms,
            build_ms = started.elapsed().as_millis() as u64 - read_ms,
            "stored licenses loaded"
        );
        let (telemetry, receiver) = telemetry::channel();
        let service = Service(Arc::new(Inner {
            store,
            keys: std::sync::Mutex::new(Arc::new(keys)),
            clock,
            static_license,
            name,
            snapshots: watch::Sender::new(Arc::new(snapshot)),
            writing: tokio::sync::Mutex::new(()),
            inventory: Inventory::default(),
            telemetry,
        }));
        let tasks = Tasks {
            service: service.clone(),
            telemetry: receiver,
        };
        Ok((service, tasks))
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.0.store
    }

    /// The current time from the injected clock.
    pub fn now(&self) -> UnixTime {
        self.0.clock.now()
    }

    /// This control plane's name in the inventory.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The licenses now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.0.snapshots.borrow().clone()
    }

    /// A receiver of every new snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.0.snapshots.subscribe()
    }

    /// The keys trusted now.
    pub fn keys(&self) -> Arc<TrustedKeys> {
        // A poisoned lock still holds a whole `Arc`: the swap cannot be left half done.
        self.0
            .keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Trusts `keys` from now on (they were reloaded). Every stored license is verified
    /// again: the snapshot is republished with no verification known, so readers verify
    /// what they need with the new keys at once and the sweep does the rest.
    pub async fn set_keys(&self, keys: TrustedKeys) {
        let _writing = self.0.writing.lock().await;
        *self
            .0
            .keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(keys);
        let unverified = self.snapshot().unverified_copy();
        self.0.snapshots.send_replace(Arc::new(unverified));
    }

    /// The data-plane inventory.
    pub fn inventory(&self) -> &Inventory {
        &self.0.inventory
    }

    /// The license situation of `snapshot` now.
    pub fn view_of(&self, snapshot: &Snapshot) -> View {
        let keys = self.keys();
        let mut view = effective::select(
            snapshot.newest_first(&keys),
            snapshot.unverified().unwrap_or(0),
            &keys,
            self.0.static_license.as_ref(),
            self.now(),
        );
        if snapshot.damaged() > 0 {
            view.warnings.push(format!(
                "{} stored license(s) cannot be read and are left out (see the log); restore the data dir from a backup",
                snapshot.damaged()
            ));
        }
        let connected = self.0.inventory.connected_count() as u64;
        let allowed = view
            .stored_in_force
            .as_ref()
            .and_then(|f| f.verified.terms.dataplanes);
        if let Some(allowed) = allowed.filter(|allowed| connected > *allowed) {
            view.warnings.push(format!(
                "{connected} data planes are connected but the license allows {allowed}"
            ));
        }
        view
    }

    /// The license situation now.
    pub fn view(&self) -> View {
        self.view_of(&self.snapshot())
    }

    /// Validates a license text now. The text stored is the document exactly as sent (Kong
    /// returns `payload` as it was given); its checksum is that of the canonical text, so
    /// the same license with other whitespace or key order is still a duplicate.
    pub fn validate(&self, text: &str) -> Result<Valid, WriteError> {
        let (verified, evaluation) = charter_license::validate(text, &self.keys(), self.now())
            .map_err(WriteError::Invalid)?;
        Ok(Valid {
            text: document_text(text),
            checksum: charter_store::checksum_of(&canonical_text(&verified.document)),
            verified: Arc::new(verified),
            evaluation,
        })
    }

    /// Stores a new license (`POST /licenses`), under `id` or a new one.
    pub async fn create(&self, id: Option<Uuid>, valid: Valid) -> Result<Written, WriteError> {
        let id = id.unwrap_or_else(Uuid::new_v4);
        self.write(|snapshot| {
            if snapshot.get(id).is_some() {
                return Err(WriteError::IdExists(id));
            }
            self.put_decision(snapshot, id, &valid)
        })
        .await
    }

    /// Creates or replaces the license `id` (`PUT /licenses/{id}`).
    pub async fn put(&self, id: Uuid, valid: Valid) -> Result<Written, WriteError> {
        self.write(|snapshot| self.put_decision(snapshot, id, &valid))
            .await
    }

    /// Replaces the payload of the existing license `id`, or with `None` stores its own
    /// payload again, which moves `updated_at` and so puts it in force (`PATCH`). The
    /// stored payload is read in the write, so a concurrent write is never undone.
    pub async fn patch(&self, id: Uuid, valid: Option<Valid>) -> Result<Written, WriteError> {
        self.write(|snapshot| {
            let Some(entry) = snapshot.get(id) else {
                return Err(WriteError::NotFound(id));
            };
            match &valid {
                Some(valid) => self.put_decision(snapshot, id, valid),
                None => {
                    let valid = self.validate(&entry.record.payload)?;
                    self.put_decision(snapshot, id, &valid)
                }
            }
        })
        .await
    }

    /// Deletes the license `id`; `None` when there was none (nothing is written).
    pub async fn delete(&self, id: Uuid) -> Result<Option<LicenseRecord>, WriteError> {
        self.write_or_nothing(|snapshot| {
            Ok(snapshot
                .get(id)
                .map(|entry| (Change::Delete(id), None, entry.record.clone())))
        })
        .await
    }

    /// Installs a license through the Consul face: stored as new, or, when the same
    /// payload is stored, that record's `updated_at` moves so it is in force either way.
    pub async fn install(&self, valid: Valid) -> Result<Written, WriteError> {
        let fresh = Uuid::new_v4();
        self.write(|snapshot| {
            let id = snapshot.holder_of(&valid.checksum).unwrap_or(fresh);
            self.put_decision(snapshot, id, &valid)
        })
        .await
    }

    /// Deletes the stored license in force (Consul's `DELETE`), so the next one takes
    /// over; refused, changing nothing, when that would leave no valid license, or when a
    /// static license is in force here. Decided in the write, against every other write.
    /// Returns the deleted record and the revision of the delete.
    pub async fn uninstall(&self) -> Result<(LicenseRecord, u64), WriteError> {
        let deleted = self
            .write_or_nothing(|snapshot| {
                if let Some(license) = &self.0.static_license {
                    return Err(WriteError::Refused(format!(
                        "the license in force on this node is static (from {}); remove the static configuration to manage licenses here",
                        license.origin
                    )));
                }
                let view = self.view_of(snapshot);
                let Some(target) = view.stored_in_force.and_then(|f| f.record) else {
                    return Err(WriteError::Refused(
                        "no stored license to delete: install one first".to_owned(),
                    ));
                };
                let now = self.now();
                let keys = self.keys();
                let remains_valid = snapshot
                    .newest_first(&keys)
                    .filter(|(record, _)| record.id != target.id)
                    .find_map(|(_, verified)| verified.evaluate(now).ok())
                    .is_some_and(|e| e.status.allows());
                if !remains_valid {
                    return Err(WriteError::Refused(format!(
                        "deleting license {} would leave no valid license; install another license first",
                        target.id
                    )));
                }
                let revision = snapshot.revision + 1;
                Ok(Some((Change::Delete(target.id), None, (target, revision))))
            })
            .await?;
        // `write_or_nothing` only answers `None` when the decision wrote nothing.
        deleted.ok_or_else(|| WriteError::Refused("nothing was deleted".to_owned()))
    }

    fn put_decision(
        &self,
        snapshot: &Snapshot,
        id: Uuid,
        valid: &Valid,
    ) -> Result<(Change, Option<Entry>, Written), WriteError> {
        let checksum = valid.checksum.clone();
        if let Some(existing) = snapshot.holder_of(&checksum).filter(|holder| *holder != id) {
            return Err(WriteError::DuplicatePayload { existing });
        }
        let now = self.now();
        let old = snapshot.get(id);
        let record = LicenseRecord {
            id,
            payload: valid.text.clone(),
            checksum,
            created_at: old.map_or(now, |e| e.record.created_at),
            updated_at: now,
            revision: snapshot.revision + 1,
        };
        let entry = Entry::verified_as(record.clone(), valid.verified.clone());
        let written = Written {
            record: record.clone(),
            replaced: old.is_some(),
            verified: valid.verified.clone(),
            evaluation: valid.evaluation.clone(),
        };
        Ok((Change::Put(record), Some(entry), written))
    }

    async fn write<T>(
        &self,
        decide: impl Fn(&Snapshot) -> Result<(Change, Option<Entry>, T), WriteError>,
    ) -> Result<T, WriteError> {
        self.write_or_nothing(|snapshot| decide(snapshot).map(Some))
            .await?
            .ok_or_else(|| WriteError::Refused("nothing was written".to_owned()))
    }

    /// Decides a write on the current snapshot (`None`: nothing to write), commits it on
    /// top of that snapshot's revision and publishes the next snapshot. When another
    /// writer of the store came first, loads again and decides again.
    async fn write_or_nothing<T>(
        &self,
        decide: impl Fn(&Snapshot) -> Result<Option<(Change, Option<Entry>, T)>, WriteError>,
    ) -> Result<Option<T>, WriteError> {
        let _writing = self.0.writing.lock().await;
        let deadline = tokio::time::Instant::now() + WRITE_PATIENCE;
        let mut conflicts: u32 = 0;
        loop {
            let snapshot = self.snapshot();
            let Some((change, entry, out)) = decide(&snapshot)? else {
                return Ok(None);
            };
            let id = match &change {
                Change::Put(record) => record.id,
                Change::Delete(id) => *id,
            };
            match self.0.store.commit(snapshot.revision, change).await {
                Ok(revision) => {
                    let next = match entry {
                        Some(entry) => snapshot.with_put(revision, entry),
                        None => snapshot.with_delete(revision, id),
                    };
                    self.0.snapshots.send_replace(Arc::new(next));
                    return Ok(Some(out));
                }
                Err(e @ StoreError::Conflict { .. }) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(e.into());
                    }
                    conflicts = conflicts.saturating_add(1);
                    self.catch_up_locked().await?;
                    let most = 1u64 << conflicts.min(6);
                    let pause = rand::random::<u64>() % (most * 1000);
                    tokio::time::sleep(Duration::from_micros(pause)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Moves the snapshot to the store's revision when the store moved away from it:
    /// ahead (another process wrote), behind (a database restored from an older backup),
    /// or to another epoch.
    pub async fn catch_up(&self) -> Result<(), StoreError> {
        let _writing = self.0.writing.lock().await;
        let snapshot = self.snapshot();
        let revision = *self.0.store.subscribe().borrow();
        let epoch_moved = self
            .0
            .store
            .seen_epoch()
            .is_some_and(|epoch| epoch != snapshot.epoch);
        if revision != snapshot.revision || epoch_moved {
            self.catch_up_locked().await?;
        }
        Ok(())
    }

    /// Applies what changed in the store since the snapshot's revision, or loads
    /// everything when the store cannot tell (it is behind the snapshot, or its epoch
    /// changed).
    async fn catch_up_locked(&self) -> Result<(), StoreError> {
        let snapshot = self.snapshot();
        match self.0.store.changes_since(snapshot.revision).await? {
            Some(changes) if changes.epoch == snapshot.epoch => {
                if changes.revision != snapshot.revision {
                    let next = snapshot.with_changes(changes);
                    self.0.snapshots.send_replace(Arc::new(next));
                }
                Ok(())
            }
            _ => self.reload_locked().await,
        }
    }

    async fn reload_locked(&self) -> Result<(), StoreError> {
        let loaded = self.0.store.load().await?;
        let previous = self.snapshot();
        let next = tokio::task::spawn_blocking(move || Snapshot::build(loaded, Some(&previous)))
            .await
            .map_err(|e| StoreError::Backend {
                context: "indexing the stored licenses".to_owned(),
                source: Box::new(e),
            })?;
        self.0.snapshots.send_replace(Arc::new(next));
        Ok(())
    }

    /// Verifies every license of the current snapshot not verified yet, off the runtime's
    /// threads, then publishes the snapshot with the count of those that do not verify
    /// (for the warning), unless a write replaced it meanwhile (the next sweep does).
    async fn sweep(&self) {
        let snapshot = self.snapshot();
        if snapshot.fully_verified() {
            return;
        }
        let keys = self.keys();
        let started = std::time::Instant::now();
        let sweeping = keys.clone();
        let swept = match tokio::task::spawn_blocking(move || snapshot.verify_all(&sweeping)).await
        {
            Ok(swept) => swept,
            Err(e) => {
                tracing::error!(error = %e, "verifying the stored licenses failed");
                return;
            }
        };
        let _writing = self.0.writing.lock().await;
        // Keys reloaded meanwhile republished the snapshot to be verified again with the
        // new keys: this sweep's work is stale then.
        let same_keys = Arc::ptr_eq(&self.keys(), &keys);
        if same_keys
            && self.snapshot().revision == swept.revision
            && !self.snapshot().fully_verified()
        {
            tracing::info!(
                licenses = swept.len(),
                unverified = swept.unverified().unwrap_or(0),
                ms = started.elapsed().as_millis() as u64,
                "every stored license verified"
            );
            self.0.snapshots.send_replace(Arc::new(swept));
        }
    }

    /// Applies one telemetry report exactly once, durably, in a write shared with the
    /// reports that arrive at the same time; `true` if it was new.
    pub async fn apply_telemetry(
        &self,
        report: charter_store::Report,
    ) -> Result<bool, TelemetryError> {
        self.0.telemetry.apply(report).await
    }

    /// Every data plane's applied usage.
    pub async fn usage(&self) -> Result<Vec<NodeUsage>, StoreError> {
        self.0.store.usage().await
    }

    /// Whether this control plane runs the chores of the whole store now (see
    /// [`Store::leads_chores`]).
    pub fn leads_chores(&self) -> bool {
        self.0.store.leads_chores()
    }

    /// Whether a static license is configured on this node.
    pub fn has_static_license(&self) -> bool {
        self.0.static_license.is_some()
    }

    /// The static license configured on this node, if any.
    pub fn static_license(&self) -> Option<&StaticLicense> {
        self.0.static_license.as_ref()
    }

    /// Whether the store can take writes.
    pub async fn health(&self) -> Result<(), StoreError> {
        self.0.store.check().await
    }

    /// Every data plane in the inventory, with what the streams recorded and the store
    /// has not written yet.
    pub async fn data_planes(&self) -> Result<Vec<charter_store::DataPlaneRecord>, StoreError> {
        self.0.inventory.all(self.0.store.as_ref()).await
    }

    /// Writes the last inventory rows and closes the store: call once, after every
    /// stream has ended.
    pub async fn close(&self) -> Result<(), StoreError> {
        if let Err(e) = self.0.inventory.flush(self.0.store.as_ref()).await {
            tracing::warn!(error = %e, "cannot record the data planes' last state in the inventory");
        }
        self.0.store.close().await
    }
}

impl Tasks {
    /// Runs the service's background work until `shutdown` fires: telemetry group
    /// commits, inventory writes, purging old data planes, and following writes made to
    /// the store by other processes.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let service = self.service;
        tokio::join!(
            telemetry::run(service.0.store.clone(), self.telemetry, shutdown.clone()),
            service
                .0
                .inventory
                .run(service.0.store.clone(), shutdown.clone()),
            purge(service.clone(), shutdown.clone()),
            follow(service.clone(), shutdown.clone()),
            sweep(service.clone(), shutdown),
        );
    }
}

/// Inventory rows are purged this long after a data plane was last seen.
pub const PURGE_AFTER: Duration = Duration::from_secs(14 * 24 * 3600);

async fn purge(service: Service, mut shutdown: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(Duration::from_secs(600));
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.changed() => return,
        }
        // One control plane of a shared store purges for all.
        if !service.leads_chores() {
            continue;
        }
        let cutoff = service.now() - PURGE_AFTER.as_secs() as i64;
        match service
            .0
            .inventory
            .purge(service.0.store.as_ref(), cutoff)
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "purged data planes not seen for 14 days"),
            Err(e) => tracing::warn!(error = %e, "cannot purge old data planes"),
        }
    }
}

/// Verifies the stored licenses in the background whenever a snapshot holds some that
/// were not verified yet (after start-up, and after a reload).
async fn sweep(service: Service, mut shutdown: watch::Receiver<bool>) {
    let mut snapshots = service.subscribe();
    loop {
        let current = snapshots.borrow_and_update().clone();
        if !current.fully_verified() {
            tokio::select! {
                () = service.sweep() => {}
                _ = shutdown.changed() => return,
            }
            // Swept and published, or a write came first: look again. (Only a failed
            // sweep leaves the same snapshot unverified; then wait for the next one.)
            if service.snapshot().revision != current.revision
                || service.snapshot().fully_verified()
            {
                continue;
            }
        }
        tokio::select! {
            changed = snapshots.changed() => if changed.is_err() { return },
            _ = shutdown.changed() => return,
        }
    }
}

/// How long [`follow`] waits at most between two attempts to catch up.
const CATCH_UP_RETRY_MAX: Duration = Duration::from_secs(5);

/// Catches the snapshot up whenever the store's revision moves away from it without this
/// process writing (another control plane on the same store, or a restore to an older
/// revision); a failed attempt is retried (0.1 s, doubling to 5 s) until it succeeds, so a
/// change is never left behind.
async fn follow(service: Service, mut shutdown: watch::Receiver<bool>) {
    let mut revisions = service.0.store.subscribe();
    loop {
        tokio::select! {
            changed = revisions.changed() => if changed.is_err() { return },
            _ = shutdown.changed() => return,
        }
        let mut wait = Duration::from_millis(100);
        let mut failures = 0u32;
        loop {
            match service.catch_up().await {
                Ok(()) => {
                    if failures > 0 {
                        tracing::info!(
                            attempts = failures + 1,
                            revision = service.snapshot().revision,
                            "caught up with the licenses written by another control plane"
                        );
                    }
                    break;
                }
                Err(e) => {
                    if failures == 0 {
                        tracing::error!(error = %e, "cannot read licenses written by another control plane; retrying until it works");
                    }
                    failures = failures.saturating_add(1);
                }
            }
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
            wait = (wait * 2).min(CATCH_UP_RETRY_MAX);
        }
    }
}
