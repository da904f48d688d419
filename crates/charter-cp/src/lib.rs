//! Charter's control plane as a library: [`run`] serves the Kong-compatible admin API over
//! the durable license store on listeners the caller has already bound.

pub mod api;
pub mod auth;
pub mod catalog;
pub mod cluster;
pub mod config;
pub mod effective;
pub mod expiry;
pub mod inventory;
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
    /// The gRPC cluster server.
    pub cluster: tokio::net::TcpListener,
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
    let replayed = store.replayed();
    let store: Arc<dyn LicenseStore> = Arc::new(store);
    tracing::info!(data_dir = %config.data_dir.display(), epoch = %store.epoch(),
        revision = store.revision().unwrap_or_default(), backend = store.backend_version(),
        replayed, "license store open");
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
    let hub = cluster::hub(&state).context("computing the first snapshot")?;
    state.set_hub(hub.clone());

    // One shutdown signal, fanned out to every server and task.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let expiry = tokio::spawn(expiry::run(state.clone(), stop_rx.clone()));
    let publisher = tokio::spawn(cluster::publish(
        state.clone(),
        hub.clone(),
        stop_rx.clone(),
    ));
    let inventory = tokio::spawn(
        hub.inventory()
            .clone()
            .run(state.store().clone(), stop_rx.clone()),
    );

    let cluster_addr = listeners
        .cluster
        .local_addr()
        .context("reading the cluster listener address")?;
    let service = charter_proto::shared::cluster_server::ClusterServer::new(
        cluster::ClusterService::new(state.clone(), hub.clone(), stop_rx.clone()),
    );
    let grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .add_service(service);
    let cluster_server = match &config.cluster.tls {
        None => {
            tracing::warn!(addr = %cluster_addr,
                "--cluster-insecure: the cluster port speaks plaintext gRPC with no authentication; use only for development");
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listeners.cluster);
            tokio::spawn(grpc.serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone())))
        }
        Some((mode, files)) => {
            let tls = charter_tls::server_config(*mode, files).context("cluster TLS")?;
            tracing::info!(addr = %cluster_addr, mode = ?mode, "cluster server listening (mTLS)");
            let incoming = charter_tls::incoming(listeners.cluster, tls);
            tokio::spawn(grpc.serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone())))
        }
    };

    let addr = listeners
        .admin
        .local_addr()
        .context("reading the admin listener address")?;
    tracing::info!(%addr, "admin API listening");
    let app = api::router(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let served = axum::serve(listeners.admin, app)
        .with_graceful_shutdown(stopped(stop_rx.clone()))
        .await
        .context("serving the admin API");
    let cluster_served = cluster_server.await;
    let _ = expiry.await;
    let _ = publisher.await;
    let _ = inventory.await;
    // The streams have ended and recorded their data planes as disconnected.
    if let Err(e) = hub.inventory().flush(state.store().as_ref()) {
        tracing::warn!(error = %e, "cannot record the data planes' last state in the inventory");
    }
    tracing::info!("control plane stopped");
    served?;
    cluster_served
        .context("cluster server task")?
        .context("serving the cluster port")
}
