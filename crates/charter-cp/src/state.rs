//! The shared state of the admin API: the store, the trusted keys, the injected clock,
//! and the cached verification of stored licenses.

use std::sync::{Arc, OnceLock};

use charter_license::{Clock, TrustedKeys, UnixTime};
use charter_store::{LicenseStore, StoreError};

use crate::api::ApiError;
use crate::auth::Tokens;
use crate::catalog::{Catalog, Entry, Index};
use crate::cluster::Hub;
use crate::config::StaticLicense;
use crate::effective::{self, VerifyCache, View};
use crate::metrics::Metrics;

/// Cheap to clone: everything lives behind one `Arc`.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

struct Inner {
    store: Arc<dyn LicenseStore>,
    keys: TrustedKeys,
    clock: Arc<dyn Clock>,
    static_license: Option<StaticLicense>,
    tokens: Option<Tokens>,
    metrics: Metrics,
    verify_cache: VerifyCache,
    /// The stored licenses in memory, refreshed from the store's change log.
    catalog: Catalog,
    /// Serialises the Consul face's check-then-delete, so two concurrent DELETEs cannot
    /// together remove the last valid license. A Tokio mutex, because it is held across
    /// the store write, an `.await` (see [`AppState::write`]).
    consul_lock: tokio::sync::Mutex<()>,
    hostname: String,
    /// The cluster server's hub, set once at start-up (it needs the state to exist first).
    hub: OnceLock<Arc<Hub>>,
}

impl AppState {
    /// Builds the state.
    pub fn new(
        store: Arc<dyn LicenseStore>,
        keys: TrustedKeys,
        clock: Arc<dyn Clock>,
        static_license: Option<StaticLicense>,
        tokens: Option<Tokens>,
    ) -> AppState {
        AppState(Arc::new(Inner {
            store,
            keys,
            clock,
            static_license,
            tokens,
            metrics: Metrics::new(),
            verify_cache: VerifyCache::default(),
            catalog: Catalog::default(),
            consul_lock: tokio::sync::Mutex::new(()),
            hostname: gethostname::gethostname().to_string_lossy().into_owned(),
            hub: OnceLock::new(),
        }))
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn LicenseStore> {
        &self.0.store
    }

    /// The trusted keys.
    pub fn keys(&self) -> &TrustedKeys {
        &self.0.keys
    }

    /// The current time from the injected clock.
    pub fn now(&self) -> UnixTime {
        self.0.clock.now()
    }

    /// Admin tokens, when configured.
    pub fn tokens(&self) -> Option<&Tokens> {
        self.0.tokens.as_ref()
    }

    /// The static license, when configured.
    pub fn static_license(&self) -> Option<&StaticLicense> {
        self.0.static_license.as_ref()
    }

    /// Metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// This machine's host name (only ever shown hashed).
    pub fn hostname(&self) -> &str {
        &self.0.hostname
    }

    /// Sets the cluster hub (once).
    pub fn set_hub(&self, hub: Arc<Hub>) {
        let _ = self.0.hub.set(hub);
    }

    /// Every data plane in the inventory, with what the streams recorded and the store
    /// has not written yet.
    pub fn data_planes(
        &self,
    ) -> Result<Vec<charter_store::DataPlaneRecord>, charter_store::StoreError> {
        match self.0.hub.get() {
            Some(hub) => hub.inventory().all(self.store().as_ref()),
            None => self.store().data_planes(),
        }
    }

    /// How many data planes are connected now.
    pub fn connected_data_planes(&self) -> usize {
        self.0.hub.get().map_or(0, |hub| hub.connected_count())
    }

    /// The Consul face's write lock.
    pub fn consul_lock(&self) -> &tokio::sync::Mutex<()> {
        &self.0.consul_lock
    }

    /// Reads the in-memory copy of the stored licenses, brought up to date first: it
    /// reflects every write acknowledged before the call.
    pub fn catalog<T>(&self, f: impl FnOnce(&Index) -> T) -> Result<T, StoreError> {
        self.0
            .catalog
            .read(self.0.store.as_ref(), &self.0.keys, &self.0.verify_cache, f)
    }

    /// Remembers that the license text `text` verified, before it is stored: see
    /// [`VerifyCache::remember`].
    pub fn remember_verified(&self, text: &str, verified: &charter_license::VerifiedLicense) {
        self.0.verify_cache.remember(text, verified);
    }

    /// The stored license with this id, with its API JSON.
    pub fn record(&self, id: uuid::Uuid) -> Result<Option<Arc<Entry>>, StoreError> {
        self.catalog(|index| index.get(id).cloned())
    }

    /// The license situation now. Costs about one license evaluation, whatever the number
    /// of stored licenses (see [`effective::select`]).
    pub fn view(&self) -> Result<View, StoreError> {
        Ok(self.view_with_revision()?.0)
    }

    /// The license situation now, and the published store revision it reflects: every
    /// write up to that revision is in the view (a record may be newer, never older). The
    /// cluster labels its snapshots with it, so a snapshot's revision is never ahead of
    /// its content. (A change of the license in force that only time makes keeps the
    /// revision; data planes apply a snapshot of the same revision with another license.)
    pub fn view_with_revision(&self) -> Result<(View, u64), StoreError> {
        let now = self.now();
        let static_license = self.0.static_license.as_ref();
        let (view, revision) = self.catalog(|index| {
            let view = effective::select(
                index.newest_first(),
                index.unverified(),
                &self.0.keys,
                static_license,
                now,
            );
            (view, index.revision())
        })?;
        Ok((self.with_cluster_warnings(view), revision))
    }

    /// The license situation now if the store held `records`.
    pub fn view_of(&self, records: Vec<charter_store::LicenseRecord>) -> Result<View, StoreError> {
        let view = effective::compute(
            records,
            &self.0.keys,
            &self.0.verify_cache,
            self.0.static_license.as_ref(),
            self.now(),
        );
        Ok(self.with_cluster_warnings(view))
    }

    fn with_cluster_warnings(&self, mut view: View) -> View {
        let connected = self.connected_data_planes() as u64;
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

    /// Runs a store write, which waits for the disk, without stalling the runtime.
    ///
    /// On the multi-threaded runtime (the binary's) it runs on this thread inside
    /// `block_in_place`, which hands this worker's other tasks to another thread first: the
    /// request's own path then has no thread hand-off, and its response is written as soon
    /// as the write returns. Elsewhere (a current-thread runtime in tests) it goes to the
    /// blocking pool.
    pub async fn write<T: Send + 'static>(
        &self,
        op: impl FnOnce(&dyn LicenseStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let store = self.0.store.clone();
        let flavor = tokio::runtime::Handle::current().runtime_flavor();
        let result = if flavor == tokio::runtime::RuntimeFlavor::MultiThread {
            // A panic in the store answers 500, as it does from the blocking pool, instead
            // of unwinding through the connection's task.
            tokio::task::block_in_place(|| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| op(store.as_ref())))
            })
            .map_err(|_| ApiError::Internal("the store write panicked".to_string()))?
        } else {
            tokio::task::spawn_blocking(move || op(store.as_ref()))
                .await
                .map_err(|e| ApiError::Internal(format!("store task failed: {e}")))?
        };
        result.map_err(ApiError::from)
    }
}
