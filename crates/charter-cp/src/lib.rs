//! Charter's control plane as a library: [`run`] serves the Kong-compatible admin API over
//! the durable license store on listeners the caller has already bound.

//!
//! The crate is layered, each layer using only those below it:
//! `service` (licenses in one snapshot, inventory, usage; no transport) ← `api` (the
//! admin HTTP API) and `cluster` (the gRPC `Sync` server) and `expiry` ← `run`.
//!
//! Its public surface is what the binary and the tests need: [`run`], [`Config`],
//! [`Args`], [`Listeners`], and [`api::auth::Tokens`] (parsed by the configuration).

mod api;
mod cluster;
pub mod config;
mod expiry;
mod service;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use anyhow::{Context, Result};
use charter_license::Clock;
use charter_runtime::SystemClock;
use charter_store::{SledStore, Store};

pub use api::auth::{TokenFileError, Tokens};
pub use config::{Args, Config};

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
    let store: Arc<dyn Store> = match &config.storage {
        config::Storage::Embedded(dir) => {
            let data_dir = dir.clone();
            let store = tokio::task::spawn_blocking(move || SledStore::open(&data_dir))
                .await
                .context("opening the license store")?
                .with_context(|| format!("opening the license store in {}", dir.display()))?;
            Arc::new(store)
        }
        config::Storage::Postgres(url) => {
            let store = open_postgres(url, &listeners.admin).await?;
            tracing::info!(sslmode = store.sslmode(), "connected to PostgreSQL");
            Arc::new(store)
        }
    };
    let key_ids: Vec<String> = config
        .trusted_keys
        .ids()
        .iter()
        .map(ToString::to_string)
        .collect();
    tracing::info!(trusted_keys = %key_ids.join(","), "trusted signing keys loaded");
    let started = std::time::Instant::now();
    let name = gethostname::gethostname().to_string_lossy().into_owned();
    let loaded = service::Service::start(
        store.clone(),
        config.trusted_keys.clone(),
        clock.clone(),
        config.static_license.clone(),
        name,
    )
    .await
    .context("loading the stored licenses");
    let (service, tasks) = match loaded {
        Ok(started) => started,
        Err(e) => {
            if let Err(closing) = store.close().await {
                tracing::warn!(error = %closing, "closing the license store");
            }
            return Err(e);
        }
    };
    let snapshot = service.snapshot();
    tracing::info!(storage = ?config.storage, epoch = %snapshot.epoch, revision = snapshot.revision,
        licenses = snapshot.len(), backend = store.backend_version(),
        load_ms = started.elapsed().as_millis() as u64, "license store open");
    // Every exit from here on, an error included, stops the tasks and closes the store
    // explicitly (`serve` returns before anything is closed).
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let background = tokio::spawn(tasks.run(stop_rx.clone()));
    let served = serve(
        &config, listeners, &service, clock, stop_tx, stop_rx, shutdown,
    )
    .await;
    let _ = background.await;
    // The streams have ended and recorded their data planes as disconnected: write the
    // last inventory rows and close the store.
    let closed = service.close().await;
    tracing::info!("control plane stopped");
    served?;
    closed.context("closing the license store")
}

/// Connects to PostgreSQL, retrying (1 s, doubling to 10 s) while the database cannot be
/// reached: a control plane started during a database outage waits for it, its admin
/// listener answering 503 `{"message":"database unavailable"}` to everything meanwhile
/// (so `/status` tells load balancers and probes).
async fn open_postgres(
    url: &str,
    admin: &tokio::net::TcpListener,
) -> Result<charter_store::PgStore> {
    let mut wait = std::time::Duration::from_secs(1);
    let mut unavailable: Option<api::Unavailable> = None;
    loop {
        match charter_store::PgStore::open(url).await {
            Ok(store) => {
                if let Some(server) = unavailable {
                    server.stop().await;
                }
                return Ok(store);
            }
            Err(e @ charter_store::StoreError::Unavailable { .. }) => {
                tracing::error!(error = %e, retry_in_s = wait.as_secs(),
                    "cannot reach the database; the control plane waits for it");
                if unavailable.is_none() {
                    unavailable =
                        Some(api::Unavailable::serve(admin).context(
                            "answering on the admin listener while the database is down",
                        )?);
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(10));
            }
            Err(e) => return Err(e).context("opening the PostgreSQL store"),
        }
    }
}

/// Serves the admin API and the cluster port until `shutdown` (or a failure), then
/// signals `stop` and waits for every task that uses the service to end.
async fn serve(
    config: &Config,
    listeners: Listeners,
    service: &service::Service,
    clock: Arc<dyn Clock>,
    stop_tx: tokio::sync::watch::Sender<bool>,
    stop_rx: tokio::sync::watch::Receiver<bool>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
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
    let hub = cluster::Hub::new(service);
    let stop_tx = Arc::new(stop_tx);
    let signal = stop_tx.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = signal.send(true);
    });
    // Whatever happens below, the tasks are told to stop when this function returns.
    struct StopOnReturn(Arc<tokio::sync::watch::Sender<bool>>);
    impl Drop for StopOnReturn {
        fn drop(&mut self) {
            let _ = self.0.send(true);
        }
    }
    let _stop_on_return = StopOnReturn(stop_tx);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let keys = reload_keys(config, service, stop_rx.clone());
    let expiry = tokio::spawn(expiry::run(service.clone(), stop_rx.clone()));
    let publisher = tokio::spawn(cluster::publish(
        service.clone(),
        hub.clone(),
        stop_rx.clone(),
    ));
    let tasks = async {
        let _ = keys.await;
        let _ = expiry.await;
        let _ = publisher.await;
    };

    let served = async {
        let cluster_addr = listeners
            .cluster
            .local_addr()
            .context("reading the cluster listener address")?;
        let cluster_service = charter_proto::shared::cluster_server::ClusterServer::new(
            cluster::ClusterService::new(service.clone(), hub.clone(), stop_rx.clone()),
        );
        let grpc = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .add_service(cluster_service);
        // With TLS, the certificate in use as last (re)loaded: the expiry watch follows it.
        let mut cluster_tls = None;
        let cluster_server = match &config.cluster.tls {
            None => {
                tracing::warn!(addr = %cluster_addr,
                    "--cluster-insecure: the cluster port speaks plaintext gRPC with no authentication; use only for development");
                let incoming = PlainIncoming {
                    listener: listeners.cluster,
                    pause: None,
                };
                tokio::spawn(grpc.serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone())))
            }
            Some((mode, files)) => {
                let tls = charter_tls::server_config(*mode, files).context("cluster TLS")?;
                tracing::info!(addr = %cluster_addr, mode = ?mode, "cluster server listening (mTLS)");
                let (mode, reloaded) = (*mode, files.clone());
                let paths = [Some(&files.cert), Some(&files.key), files.ca.as_ref()]
                    .into_iter()
                    .flatten()
                    .cloned()
                    .collect();
                // New handshakes take the certificate loaded last; streams already up
                // keep theirs.
                let tls = charter_runtime::reload::watch(
                    "cluster certificate",
                    paths,
                    tls,
                    move || charter_tls::server_config(mode, &reloaded).context("cluster TLS"),
                    stop_rx.clone(),
                );
                cluster_tls = Some(tls.clone());
                let incoming = charter_tls::incoming_reloadable(listeners.cluster, tls);
                tokio::spawn(grpc.serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone())))
            }
        };
        let addr = listeners
            .admin
            .local_addr()
            .context("reading the admin listener address")?;
        tracing::info!(%addr, "admin API listening");
        let cert_expiry = config.cluster.tls.as_ref().map(|(_, files)| {
            let expiry = charter_runtime::cert_expiry::CertExpiry::default();
            tokio::spawn(charter_runtime::cert_expiry::watch(
                files.cert.clone(),
                clock.clone(),
                expiry.clone(),
                cluster_tls.clone(),
                stop_rx.clone(),
            ));
            expiry
        });
        let tokens = match (&config.tokens, &config.admin_token_file) {
            (Some(tokens), Some(path)) => {
                let path = path.clone();
                Some(charter_runtime::reload::watch(
                    "admin tokens",
                    vec![path.clone()],
                    Arc::new(tokens.clone()),
                    move || config::load_tokens(&path).map(Arc::new),
                    stop_rx.clone(),
                ))
            }
            (Some(tokens), None) => Some(tokio::sync::watch::channel(Arc::new(tokens.clone())).1),
            (None, _) => None,
        };
        let api = api::ApiState::with_cert_expiry(service.clone(), tokens, cert_expiry);
        // A quarter of the file handles at most: a flood of admin connections leaves the
        // cluster port and the store theirs.
        charter_runtime::http::serve_router(
            "admin",
            listeners.admin,
            charter_runtime::http::Limits::share_of_file_limit(0.25),
            api::router(api),
            stop_rx.clone(),
        )
        .await;
        // The admin API ended: the cluster server stops too.
        drop(_stop_on_return);
        cluster_server
            .await
            .context("cluster server task")?
            .context("serving the cluster port")
    };
    let served: Result<()> = served.await;
    tasks.await;
    served
}

/// Re-reads the `--trusted-key` files on `SIGHUP` or when they change, and hands a set
/// that loads to the service, which verifies every stored license again with it. Ends
/// when `stop` turns true.
fn reload_keys(
    config: &Config,
    service: &service::Service,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let files = config.trusted_key_files.clone();
    if files.is_empty() {
        // Keys given in the configuration, not by files: nothing to re-read.
        return tokio::spawn(async {});
    }
    let mut keys = charter_runtime::reload::watch(
        "trusted keys",
        files.clone(),
        config.trusted_keys.clone(),
        move || charter_runtime::flags::load_trusted_keys(&files),
        stop,
    );
    let service = service.clone();
    tokio::spawn(async move {
        // The watcher ends at shutdown, and this loop with it.
        while keys.changed().await.is_ok() {
            let next = keys.borrow_and_update().clone();
            let ids: Vec<String> = next.ids().iter().map(ToString::to_string).collect();
            tracing::info!(trusted_keys = %ids.join(","),
                "trusted signing keys reloaded; verifying every stored license again");
            service.set_keys(next).await;
        }
    })
}

/// The plaintext cluster port's connections (`--cluster-insecure`): an accept error (out of
/// file handles) is logged and accepting resumes after a pause, never ending the stream
/// nor spinning.
struct PlainIncoming {
    listener: tokio::net::TcpListener,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl tokio_stream::Stream for PlainIncoming {
    type Item = std::io::Result<tokio::net::TcpStream>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(pause) = &mut self.pause {
                std::task::ready!(pause.as_mut().poll(cx));
                self.pause = None;
            }
            match std::task::ready!(self.listener.poll_accept(cx)) {
                Ok((stream, _)) => return Poll::Ready(Some(Ok(stream))),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a cluster connection; retrying");
                    self.pause = Some(Box::pin(tokio::time::sleep(Duration::from_millis(50))));
                }
            }
        }
    }
}

/// Entry points for the fuzz targets in `fuzz/`, built only with the `fuzzing` feature:
/// not an API. They reach the admin API's body reader and the checks the cluster server
/// applies to a decoded `Hello` without making those modules public.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    use axum::body::Body;
    use axum::http::{header, HeaderMap, HeaderValue};
    use serde_json::{Map, Value};

    pub use crate::api::{canonical_uuid, ApiError, BODY_LIMIT};
    pub use crate::cluster::{compatible, valid_node_id};

    /// This control plane's version, which a data plane's `Hello` is checked against.
    pub const VERSION: &str = env!("CARGO_PKG_VERSION");

    /// The admin API's body reader (`read_fields`) on a whole in-memory body, with the
    /// request's `Content-Type` when given. A value that cannot be a header value is left
    /// out, as hyper refuses such a request before any handler sees it.
    pub fn read_fields(
        content_type: Option<&[u8]>,
        body: &[u8],
    ) -> Result<Map<String, Value>, ApiError> {
        let mut headers = HeaderMap::new();
        if let Some(value) = content_type.and_then(|v| HeaderValue::from_bytes(v).ok()) {
            headers.insert(header::CONTENT_TYPE, value);
        }
        let body = Body::from(body.to_vec());
        let reading = std::pin::pin!(crate::api::read_fields(&headers, body));
        match reading.poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(fields) => fields,
            // A body already in memory is complete, so the reader has nothing to wait for:
            // waiting here would be a bug worth a crash report.
            Poll::Pending => panic!("reading an in-memory body waited"),
        }
    }
}
