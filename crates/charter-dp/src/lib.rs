//! Charter's data plane as a library: [`run`] loads what this node may enforce (static
//! license, else the verified cache, else nothing), keeps it in sync with the control
//! plane over the cluster protocol, and serves the local status API on a listener the
//! caller has already bound.
//!
//! **Invariant:** every license this crate enforces was verified here with the trusted
//! keys — from the control plane, the cache or the configuration alike — and is judged
//! again when they are reloaded (`rekey`).
//!
//! **Invariant:** what is in force is on disk first: the cache is written (atomically)
//! before the in-memory state is swapped, so a restart enforces what was enforced.

#![warn(missing_docs)]

/// This data plane's version, sent in `Hello` (the control plane checks it is compatible).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

mod api;
pub mod cache;
mod clock;
pub mod config;
mod expiry;
pub mod files;
mod gate;
mod metrics;
mod rekey;
pub mod state;
pub mod sync;
mod usage;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use charter_license::{Clock, TrustedKeys, UnixTime};
use charter_proto::v1::Hello;
use charter_runtime::SystemClock;
use tokio::sync::watch;

pub use config::{Args, Config, StaticLicense, Transport};

use crate::clock::NodeClock;
use crate::state::{ClusterHeld, Enforcement, HeldLicense, Source};

/// How often the clock mark is persisted (it is also persisted with every snapshot and
/// at shutdown).
pub const MARK_EVERY: Duration = Duration::from_secs(60);

/// Listeners bound by the caller (so tests can bind `127.0.0.1:0`).
pub struct Listeners {
    /// The local status API.
    pub status: tokio::net::TcpListener,
    /// The gate's proxy listener, in gate mode.
    pub proxy: Option<tokio::net::TcpListener>,
}

/// Runs the data plane until `shutdown` completes, with the wall clock.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    run_with_clock(config, listeners, Arc::new(SystemClock), shutdown).await
}

/// [`run`] with an injected wall clock. Decisions use `max(clock, persisted mark)`.
pub async fn run_with_clock(
    config: Config,
    listeners: Listeners,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let dir = config.data_dir.clone();
    files::create_data_dir(&dir)?;
    let node_id = files::node_id(&dir)?;
    let persisted_mark = files::read_clock_mark(&dir)?;
    let cache_file = match cache::read(&dir) {
        Ok(file) => file,
        Err(e) => {
            refused_cache(&e);
            None
        }
    };
    // The mark comes only from this node's clock readings: the cache's `received_at` is
    // an unsigned number in a file and moves nothing.
    let clock = Arc::new(NodeClock::new(clock, dir.clone(), persisted_mark));
    let now = clock.now();
    clock.persist();
    clock.report_mark_ahead();

    let static_license = match &config.static_license {
        None => None,
        Some(license) => {
            let (verified, _) = charter_license::validate(&license.text, &config.trusted_keys, now)
                .map_err(|e| anyhow!("static license from {} is refused: {e}", license.origin))?;
            tracing::warn!(origin = %license.origin, key_id = %verified.key_id,
                "static license configured: it is in force on this node and the cluster's licenses are not used here");
            Some(verified)
        }
    };
    let cached = cache_file.and_then(|file| load_cache(&dir, file, &config.trusted_keys, now));
    let key_ids: Vec<String> = config
        .trusted_keys
        .ids()
        .iter()
        .map(ToString::to_string)
        .collect();
    tracing::info!(trusted_keys = %key_ids.join(","), "trusted signing keys loaded");
    let enforcement = Arc::new(Enforcement::new(static_license, cached, clock.clone()));
    let in_force = enforcement.current();
    tracing::info!(%node_id, source = in_force.source.map_or("none", Source::as_str),
        status = %in_force.status, license = %in_force.name(), "data plane starting");
    if matches!(config.transport, Transport::Insecure) {
        tracing::warn!(control_plane = %config.control_plane,
            "--cluster-insecure: the cluster connection is plaintext and unauthenticated; for development only");
    }

    let usage = Arc::new(usage::Usage::open(&dir).context("opening the usage counts")?);
    let addresses: Vec<String> = config
        .control_plane
        .split(',')
        .map(|a| a.trim().to_owned())
        .filter(|a| !a.is_empty())
        .collect();
    let control_plane = Arc::new(sync::ControlPlaneStatus::new(
        addresses.first().map_or("", String::as_str),
    ));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (trusted_keys, tls) = reloaded(&config, stop_rx.clone())?;
    let cert_expiry = match &config.transport {
        config::Transport::Tls { files, .. } => {
            let expiry = charter_runtime::cert_expiry::CertExpiry::default();
            // Follows the certificate as reloaded, so the metric and the warnings are of
            // the certificate in use.
            tokio::spawn(charter_runtime::cert_expiry::watch(
                files.cert.clone(),
                clock.clone(),
                expiry.clone(),
                tls.clone(),
                stop_rx.clone(),
            ));
            Some(expiry)
        }
        config::Transport::Insecure => None,
    };
    let metrics = Arc::new(metrics::Metrics::with_cert_expiry(cert_expiry));
    let rejudged = rejudge_on_reload(
        trusted_keys.clone(),
        enforcement.clone(),
        dir.clone(),
        config.static_license.clone(),
    );
    let client = sync::SyncClient {
        addresses,
        current: std::sync::atomic::AtomicUsize::new(0),
        transport: config.transport.clone(),
        hello: Hello {
            node_id: node_id.to_string(),
            hostname: gethostname::gethostname().to_string_lossy().into_owned(),
            version: VERSION.to_owned(),
            labels: config.labels.clone().into_iter().collect(),
            cached_epoch: String::new(),
            cached_revision: 0,
            upstream: config
                .gate
                .as_ref()
                .map(|g| g.upstream.url())
                .unwrap_or_default(),
        },
        data_dir: dir.clone(),
        trusted_keys,
        rejudged,
        tls,
        enforcement: enforcement.clone(),
        clock: clock.clone(),
        control_plane: control_plane.clone(),
        metrics: metrics.clone(),
        usage: usage.clone(),
        telemetry_every: config.telemetry_interval,
        regression_wait: config.regression_wait,
    };
    let mut tasks = vec![
        tokio::spawn(client.run(stop_rx.clone())),
        tokio::spawn(expiry::run(enforcement.clone(), stop_rx.clone())),
        tokio::spawn(keep_mark(clock.clone(), stop_rx.clone())),
        tokio::spawn(keep_usage(usage.clone(), stop_rx.clone())),
    ];
    let status_stop = stop_rx.clone();
    match (&config.gate, listeners.proxy) {
        (Some(gate_config), Some(listener)) => {
            let addr = listener
                .local_addr()
                .context("reading the proxy listener address")?;
            tracing::info!(%addr, upstream = %gate_config.upstream.url(), "gate listening");
            let gate = Arc::new(gate::Gate::new(
                gate_config,
                node_id,
                enforcement.clone(),
                usage.clone(),
            ));
            tasks.push(tokio::spawn(gate::serve(listener, gate, stop_rx)));
        }
        (Some(_), None) => {
            return Err(anyhow!(
                "gate mode is configured but no proxy listener was bound"
            ))
        }
        (None, _) => drop(stop_rx),
    }

    let addr = listeners
        .status
        .local_addr()
        .context("reading the status listener address")?;
    tracing::info!(%addr, "status API listening");
    let app = api::router(api::ApiState {
        enforcement,
        control_plane,
        metrics,
        node_id: node_id.to_string(),
    });
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    // An eighth of the file handles at most: the gate and the cluster connection keep
    // theirs however many clients hold the status API.
    charter_runtime::http::serve_router(
        "status",
        listeners.status,
        charter_runtime::http::Limits::share_of_file_limit(0.125),
        app,
        status_stop,
    )
    .await;
    for task in tasks {
        let _ = task.await;
    }
    let _ = tokio::task::spawn_blocking(move || clock.persist()).await;
    match tokio::task::spawn_blocking(move || usage.persist()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "cannot save the usage counts at shutdown"),
        Err(e) => tracing::error!(error = %e, "usage save task failed at shutdown"),
    }
    tracing::info!("data plane stopped");
    Ok(())
}

/// How often gate usage counts are saved to the data dir (and at shutdown).
pub const USAGE_SAVE_EVERY: Duration = Duration::from_secs(1);

/// Saves the usage counts every second until `shutdown`.
async fn keep_usage(usage: Arc<usage::Usage>, mut shutdown: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(USAGE_SAVE_EVERY);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.changed() => return,
        }
        let usage = usage.clone();
        match tokio::task::spawn_blocking(move || usage.persist()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot save the usage counts; will retry"),
            Err(e) => tracing::error!(error = %e, "usage save task failed"),
        }
    }
}

/// What the data plane re-reads on `SIGHUP` or when the files change: the trusted keys
/// (every snapshot is verified with the set loaded last) and, with TLS, the cluster
/// certificate (each new connection takes the configuration loaded last; the stream up
/// stays as it is). A new set that does not load leaves the one in use.
#[allow(clippy::type_complexity)]
fn reloaded(
    config: &Config,
    stop: watch::Receiver<bool>,
) -> Result<(
    watch::Receiver<TrustedKeys>,
    Option<watch::Receiver<Arc<charter_tls::rustls::ClientConfig>>>,
)> {
    let keys = if config.trusted_key_files.is_empty() {
        watch::channel(config.trusted_keys.clone()).1
    } else {
        let files = config.trusted_key_files.clone();
        charter_runtime::reload::watch(
            "trusted keys",
            files.clone(),
            config.trusted_keys.clone(),
            move || charter_runtime::flags::load_trusted_keys(&files),
            stop.clone(),
        )
    };
    let tls = match &config.transport {
        Transport::Tls { mode, files, .. } => {
            let (mode, files) = (*mode, files.clone());
            let first = charter_tls::client_config(mode, &files).context("cluster TLS")?;
            let paths = [Some(&files.cert), Some(&files.key), files.ca.as_ref()]
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            Some(charter_runtime::reload::watch(
                "cluster certificate",
                paths,
                first,
                move || charter_tls::client_config(mode, &files).context("cluster TLS"),
                stop,
            ))
        }
        Transport::Insecure => None,
    };
    Ok((keys, tls))
}

/// Judges every license this node holds again each time the trusted keys are reloaded
/// ([`rekey`]), then counts one up in the returned channel, so the sync client judges the
/// control plane's last snapshot again with the same keys. The count ends (its sender is
/// dropped) when the keys' watch ends, at shutdown.
fn rejudge_on_reload(
    mut keys: watch::Receiver<TrustedKeys>,
    enforcement: Arc<Enforcement>,
    dir: std::path::PathBuf,
    static_license: Option<StaticLicense>,
) -> watch::Receiver<u64> {
    let (tx, rx) = watch::channel(0u64);
    tokio::spawn(async move {
        while keys.changed().await.is_ok() {
            let next = keys.borrow_and_update().clone();
            let ids: Vec<String> = next.ids().iter().map(ToString::to_string).collect();
            tracing::info!(trusted_keys = %ids.join(","), "trusted signing keys reloaded");
            let rejudged = rekey::rejudge(&enforcement, &dir, static_license.as_ref(), &next).await;
            if rejudged != rekey::Rejudged::default() {
                let in_force = enforcement.current();
                tracing::info!(source = in_force.source.map_or("none", state::Source::as_str),
                    status = %in_force.status, license = %in_force.name(),
                    "licenses judged again with the reloaded keys");
            }
            tx.send_modify(|count| *count += 1);
        }
    });
    rx
}

/// Verifies the cache read at start into what the cluster gave this node, or refuses it.
fn load_cache(
    dir: &Path,
    file: cache::CacheFile,
    keys: &TrustedKeys,
    now: UnixTime,
) -> Option<ClusterHeld> {
    match cache::verify(dir, file, keys, now) {
        Ok(loaded) => {
            let file = &loaded.file;
            tracing::info!(path = %cache::path(dir).display(), epoch = %file.epoch, revision = file.revision,
                license = %file.license.as_ref().map_or("none (the cluster was unlicensed)", |l| l.id.as_str()),
                "license cache verified");
            Some(held_from_cache(loaded, Source::Cache))
        }
        Err(e) => {
            refused_cache(&e);
            None
        }
    }
}

/// What a verified cache gives this node, as held from `source`.
fn held_from_cache(loaded: cache::LoadedCache, source: Source) -> ClusterHeld {
    let cache::LoadedCache { file, license } = loaded;
    let license = file
        .license
        .clone()
        .zip(license)
        .map(|(record, (verified, _))| HeldLicense {
            record: Some(record),
            verified,
        });
    ClusterHeld {
        epoch: file.epoch,
        revision: file.revision,
        license,
        source,
        received_at: file.received_at,
    }
}

fn refused_cache(e: &cache::CacheError) {
    tracing::error!(
        code = e.code(),
        "license cache refused, starting unlicensed until the control plane sends a license: {e}"
    );
}

/// Persists the clock mark every [`MARK_EVERY`] until `shutdown` fires, and reports a mark
/// more than a day ahead of the wall clock (once a day while it lasts).
async fn keep_mark(clock: Arc<NodeClock>, mut shutdown: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(MARK_EVERY);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.changed() => return,
        }
        clock.report_mark_ahead();
        let clock = clock.clone();
        let _ = tokio::task::spawn_blocking(move || clock.persist()).await;
    }
}

/// Entry points for the fuzz targets in `fuzz/`, built only with the `fuzzing` feature:
/// not an API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    use std::path::Path;

    use charter_license::{TrustedKeys, UnixTime};

    use crate::state::ClusterHeld;

    /// The start-up load of the license cache in `dir`, as [`crate::run`] does it: read,
    /// then verified with `keys` at `now`. `None` when there is no cache or it is refused.
    pub fn load_cache(dir: &Path, keys: &TrustedKeys, now: UnixTime) -> Option<ClusterHeld> {
        match crate::cache::read(dir) {
            Ok(file) => file.and_then(|file| crate::load_cache(dir, file, keys, now)),
            Err(e) => {
                crate::refused_cache(&e);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests;
