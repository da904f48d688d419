//! Charter's control plane as a library: [`run`] serves the Kong-compatible admin API over
//! the durable license store on listeners the caller has already bound.

pub mod api;
pub mod auth;
pub mod config;
pub mod effective;
pub mod expiry;
pub mod metrics;
pub mod state;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use charter_license::Clock;
use charter_runtime::SystemClock;
use charter_store::{LicenseStore, SledStore};

pub use config::{Args, Config};
pub use state::AppState;

/// Listeners bound by the caller (so tests can bind `127.0.0.1:0`).
pub struct Listeners {
    /// The admin HTTP API.
    pub admin: tokio::net::TcpListener,
}

/// Opens the store and serves until `shutdown` completes, then drains in-flight requests.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    run_with_clock(config, listeners, Arc::new(SystemClock), shutdown).await
}

/// [`run`] with an injected clock.
pub async fn run_with_clock(
    config: Config,
    listeners: Listeners,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let data_dir = config.data_dir.clone();
    let store = tokio::task::spawn_blocking(move || SledStore::open(&data_dir))
        .await
        .context("opening the license store")?
        .with_context(|| format!("opening the license store in {}", config.data_dir.display()))?;
    let store: Arc<dyn LicenseStore> = Arc::new(store);
    tracing::info!(data_dir = %config.data_dir.display(), epoch = %store.epoch(),
        revision = store.revision().unwrap_or_default(), backend = store.backend_version(),
        "license store open");
    let key_ids: Vec<String> = config
        .trusted_keys
        .ids()
        .iter()
        .map(ToString::to_string)
        .collect();
    tracing::info!(trusted_keys = %key_ids.join(","), "trusted signing keys loaded");
    if let Some(license) = &config.static_license {
        tracing::warn!(origin = %license.origin,
            "static license configured: it is in force on this node and licenses stored through the admin API are not used here");
    }
    if config.tokens.is_none() {
        tracing::warn!(
            "no --admin-token-file: the admin API is open to anyone who can reach {}",
            config.admin_listen
        );
    }
    let state = AppState::new(
        store,
        config.trusted_keys,
        clock,
        config.static_license,
        config.tokens,
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let expiry = tokio::spawn(expiry::run(state.clone(), stop_rx));

    let addr = listeners
        .admin
        .local_addr()
        .context("reading the admin listener address")?;
    tracing::info!(%addr, "admin API listening");
    let app = api::router(state).into_make_service_with_connect_info::<SocketAddr>();
    let served = axum::serve(listeners.admin, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("serving the admin API");
    let _ = stop_tx.send(true);
    let _ = expiry.await;
    tracing::info!("control plane stopped");
    served
}
