//! The sync client: one `Cluster.Sync` stream to the control plane at a time. It says
//! Hello, pings every 30 s, applies or refuses each snapshot (see [`crate::state::decide`])
//! and answers it with an Ack; when the stream fails it keeps enforcing what it holds and
//! reconnects with jittered exponential backoff (1 s to 30 s).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use charter_license::{TrustedKeys, UnixTime};
use charter_proto::v1::cluster_client::ClusterClient;
use charter_proto::v1::{
    control_plane_message, data_plane_message, Ack, ControlPlaneMessage, Counter, DataPlaneMessage,
    Hello, Ping, Snapshot, Telemetry,
};
use charter_tls::TlsError;
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::cache;
use crate::clock::NodeClock;
use crate::config::Transport;
use crate::metrics::Metrics;
use crate::state::{
    decide_regressed, judge, ClusterHeld, Decision, Enforcement, LowerRevisions, Source, Verdict,
};
use crate::usage::Usage;

/// How often the data plane pings the control plane (which marks it gone after 45 s).
pub const PING_EVERY: Duration = Duration::from_secs(30);
/// The first reconnection delay.
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// The longest reconnection delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The delay before reconnection attempt number `failures` (0 for the first), with
/// `jitter` in `[0, 1]`: the base doubles from 1 s up to 30 s, and the delay is 80 % to
/// 100 % of it (never under 1 s), so data planes cut off together do not return together.
pub fn backoff(failures: u32, jitter: f64) -> Duration {
    let base = BACKOFF_MIN
        .saturating_mul(2u32.saturating_pow(failures.min(16)))
        .min(BACKOFF_MAX);
    base.mul_f64(0.8 + 0.2 * jitter.clamp(0.0, 1.0))
        .max(BACKOFF_MIN)
}

/// The connection to the control plane as `GET /status` reports it.
#[derive(Debug)]
pub struct ControlPlaneStatus {
    /// The address connected to (or tried) last.
    address: Mutex<String>,
    // A std mutex: it guards a few plain fields and is never held across an await.
    inner: Mutex<Connection>,
}

#[derive(Debug, Default)]
struct Connection {
    connected: bool,
    last_sync: Option<UnixTime>,
    last_error: Option<String>,
}

impl ControlPlaneStatus {
    /// Not connected yet, to `address`.
    pub fn new(address: &str) -> ControlPlaneStatus {
        ControlPlaneStatus {
            address: Mutex::new(address.to_owned()),
            inner: Mutex::new(Connection::default()),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The control plane's address (the one connected to, or tried last).
    pub fn address(&self) -> String {
        self.address
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_address(&self, address: &str) {
        *self.address.lock().unwrap_or_else(PoisonError::into_inner) = address.to_owned();
    }

    /// Whether the sync stream is open.
    pub fn is_connected(&self) -> bool {
        self.with(|c| c.connected)
    }

    fn set_connected(&self, connected: bool) {
        self.with(|c| c.connected = connected);
    }

    fn record_sync(&self, now: UnixTime) {
        self.with(|c| c.last_sync = Some(now));
    }

    fn record_error(&self, error: Option<String>) {
        self.with(|c| c.last_error = error);
    }

    /// The `control_plane` object of `GET /status`.
    pub fn to_json(&self) -> Value {
        self.with(|c| {
            json!({
                "address": self.address(),
                "connected": c.connected,
                "last_sync": c.last_sync,
                "last_error": c.last_error,
            })
        })
    }
}

/// Why a sync stream ended (other than shutdown).
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The TLS files could not be loaded into a client configuration.
    #[error("cluster TLS configuration: {0}")]
    Tls(TlsError),
    /// No connection (TCP, TLS or HTTP/2).
    #[error("{0}")]
    Connect(TlsError),
    /// The control plane refused this data plane (FAILED_PRECONDITION, e.g. its version).
    #[error("the control plane refused this data plane: {0}")]
    Refused(String),
    /// The stream failed with a gRPC status.
    #[error("sync stream failed: {0}")]
    Stream(String),
    /// The control plane ended the stream.
    #[error("the control plane closed the sync stream")]
    Closed,
}

impl SyncError {
    fn from_status(status: tonic::Status) -> SyncError {
        if status.code() == tonic::Code::FailedPrecondition {
            return SyncError::Refused(status.message().to_owned());
        }
        let mut reason = format!("{} ({})", status.message(), status.code().description());
        if let Some(source) = std::error::Error::source(&status) {
            reason.push_str(": ");
            reason.push_str(&charter_tls::describe_error(source));
        }
        SyncError::Stream(reason)
    }
}

/// Everything the sync client needs.
pub struct SyncClient {
    /// The control planes' `HOST:PORT`s, tried in turn: after a failed or lost connection
    /// the next one is tried (behind a Kubernetes Service one address is enough).
    pub addresses: Vec<String>,
    /// Which of `addresses` is used now.
    pub current: std::sync::atomic::AtomicUsize,
    /// Plaintext or mutual TLS.
    pub transport: Transport,
    /// The Hello to send (its cached epoch and revision are filled in at each connect).
    pub hello: Hello,
    /// Where the cache is written.
    pub data_dir: PathBuf,
    /// Keys trusted to sign licenses, as last loaded (the files are reloaded when they
    /// change).
    pub trusted_keys: watch::Receiver<TrustedKeys>,
    /// Counts up each time the licenses held were judged again with reloaded keys; the
    /// control plane's last snapshot is then judged again too.
    pub rejudged: watch::Receiver<u64>,
    /// The cluster TLS configuration as last loaded, with [`Transport::Tls`].
    pub tls: Option<watch::Receiver<Arc<charter_tls::rustls::ClientConfig>>>,
    /// The enforcement state.
    pub enforcement: Arc<Enforcement>,
    /// The node's clock, whose mark is persisted with every snapshot.
    pub clock: Arc<NodeClock>,
    /// What `GET /status` reports of the connection.
    pub control_plane: Arc<ControlPlaneStatus>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Gate usage counts, reported as telemetry.
    pub usage: Arc<Usage>,
    /// How often usage is reported.
    pub telemetry_every: Duration,
    /// How long lower revisions from the connected control plane are ignored before its
    /// snapshot is taken ([`crate::state::REGRESSION_WAIT`]).
    pub regression_wait: Duration,
}

/// How a snapshot was answered.
enum Answer {
    /// Applied (or already held).
    Accepted,
    /// Applied, with a code and a note for the control plane (`revision_regressed`).
    Noted(&'static str, String),
    /// Refused with a code and why; what was held stays in force.
    Refused(&'static str, String),
}

/// How long a stopping data plane waits for its last usage report to be acknowledged.
const FINAL_TELEMETRY_WAIT: Duration = Duration::from_secs(3);

impl SyncClient {
    /// The control plane address used now.
    fn address(&self) -> &str {
        let current = self.current.load(std::sync::atomic::Ordering::Relaxed);
        self.addresses
            .get(current % self.addresses.len().max(1))
            .map_or("", String::as_str)
    }

    /// Moves to the next control plane of the list (after a failed or lost connection).
    fn fail_over(&self) {
        if self.addresses.len() > 1 {
            self.current
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.control_plane.set_address(self.address());
        }
    }

    /// Syncs until `shutdown` fires, reconnecting for ever.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut failures: u32 = 0;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let mut got_snapshot = false;
            let result = self.session(&mut shutdown, &mut got_snapshot).await;
            self.control_plane.set_connected(false);
            let error = match result {
                Ok(()) => return,
                Err(e) => e,
            };
            if got_snapshot {
                failures = 0;
            }
            let delay = backoff(failures, rand::thread_rng().gen::<f64>());
            failures = failures.saturating_add(1);
            let retry = format!("{:.1}", delay.as_secs_f64());
            match &error {
                SyncError::Refused(message) => {
                    tracing::error!(address = %self.address(), retry_in_s = %retry,
                    "the control plane refused this data plane: {message}; the license held stays in force")
                }
                SyncError::Tls(_) => {
                    tracing::error!(address = %self.address(), retry_in_s = %retry,
                    "cannot connect to the control plane: {error}; fix the cluster certificate files")
                }
                _ => tracing::warn!(address = %self.address(), retry_in_s = %retry,
                    "cannot sync with the control plane: {error}; the license held stays in force"),
            }
            self.control_plane.record_error(Some(error.to_string()));
            self.fail_over();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => return,
            }
            self.metrics.reconnects.inc();
        }
    }

    /// One stream, until it fails (`Err`) or `shutdown` fires (`Ok`).
    async fn session(
        &self,
        shutdown: &mut watch::Receiver<bool>,
        got_snapshot: &mut bool,
    ) -> Result<(), SyncError> {
        let channel = tokio::select! {
            channel = self.connect() => channel?,
            _ = shutdown.changed() => return Ok(()),
        };
        let mut client = ClusterClient::new(channel);
        let (tx, rx) = mpsc::channel::<DataPlaneMessage>(16);
        let send = |tx: &mpsc::Sender<DataPlaneMessage>, msg| {
            let tx = tx.clone();
            async move {
                tx.send(DataPlaneMessage { msg: Some(msg) })
                    .await
                    .map_err(|_| SyncError::Stream("the request stream was closed".to_owned()))
            }
        };
        // Hello goes first; it is queued before the call starts, so it is the first frame.
        send(&tx, data_plane_message::Msg::Hello(self.hello())).await?;
        let response = tokio::select! {
            response = client.sync(ReceiverStream::new(rx)) => response.map_err(SyncError::from_status)?,
            _ = shutdown.changed() => return Ok(()),
        };
        self.control_plane.set_connected(true);
        self.control_plane.record_error(None);
        tracing::info!(address = %self.address(), node_id = %self.hello.node_id, "connected to the control plane");
        let mut inbound = response.into_inner();
        let start = Instant::now() + PING_EVERY;
        let mut ping = tokio::time::interval_at(start, PING_EVERY);
        let mut telemetry = tokio::time::interval(self.telemetry_every);
        // Per stream: only the control plane connected to now can outwait the revision rule.
        let mut lower = LowerRevisions::default();
        // The control plane's latest snapshot on this stream, judged again when the keys
        // are reloaded (a license refused before may verify now, and the Ack says what this
        // node enforces after the reload).
        let mut last: Option<Snapshot> = None;
        let mut rejudged = self.rejudged.clone();
        rejudged.mark_unchanged();
        let mut reloading = true;
        loop {
            let regression = lower.deadline(self.regression_wait);
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(ControlPlaneMessage { msg: Some(control_plane_message::Msg::Snapshot(snapshot)) })) => {
                        *got_snapshot = true;
                        self.metrics.snapshots_received.inc();
                        self.control_plane.record_sync(self.enforcement.now());
                        last = Some(snapshot.clone());
                        let ack = self.handle_snapshot(snapshot, &mut lower).await;
                        send(&tx, data_plane_message::Msg::Ack(ack)).await?;
                    }
                    Ok(Some(ControlPlaneMessage { msg: Some(control_plane_message::Msg::TelemetryAck(ack)) })) => {
                        self.acknowledge(ack.seq).await;
                    }
                    Ok(Some(ControlPlaneMessage { msg: None })) => {
                        tracing::debug!("empty message from the control plane ignored");
                    }
                    Ok(None) => return Err(SyncError::Closed),
                    Err(status) => return Err(SyncError::from_status(status)),
                },
                _ = tokio::time::sleep_until(regression.unwrap_or_else(Instant::now)), if regression.is_some() => {
                    if let Some(snapshot) = lower.due(Instant::now(), self.regression_wait) {
                        let ack = self.take_regressed(snapshot).await;
                        send(&tx, data_plane_message::Msg::Ack(ack)).await?;
                    }
                }
                changed = rejudged.changed(), if reloading => {
                    // The count ends at shutdown (or never runs without key files).
                    reloading = changed.is_ok();
                    if let Some(snapshot) = last.clone().filter(|_| reloading) {
                        tracing::debug!(epoch = %snapshot.epoch, revision = snapshot.revision,
                            "judging the control plane's last snapshot again with the reloaded keys");
                        let ack = self.handle_snapshot(snapshot, &mut lower).await;
                        send(&tx, data_plane_message::Msg::Ack(ack)).await?;
                    }
                }
                _ = ping.tick() => send(&tx, data_plane_message::Msg::Ping(Ping {})).await?,
                _ = telemetry.tick() => {
                    if let Some(report) = self.next_report().await {
                        send(&tx, data_plane_message::Msg::Telemetry(report)).await?;
                    }
                }
                _ = shutdown.changed() => {
                    self.final_report(&tx, &mut inbound).await;
                    return Ok(());
                }
            }
        }
    }

    /// The usage report to send now, if there are counts (frozen and saved first).
    async fn next_report(&self) -> Option<Telemetry> {
        let usage = self.usage.clone();
        match tokio::task::spawn_blocking(move || usage.next_batch()).await {
            Ok(Ok(Some(batch))) => Some(Telemetry {
                seq: batch.seq,
                counters: batch
                    .counters
                    .into_iter()
                    .map(|(bucket, request_count)| Counter {
                        bucket,
                        request_count,
                    })
                    .collect(),
            }),
            Ok(Ok(None)) => None,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot save the usage report before sending it; will retry");
                None
            }
            Err(e) => {
                tracing::error!(error = %e, "usage report task failed");
                None
            }
        }
    }

    /// The control plane has applied report `seq`: drop it.
    async fn acknowledge(&self, seq: u64) {
        let usage = self.usage.clone();
        match tokio::task::spawn_blocking(move || usage.acknowledge(seq)).await {
            Ok(Ok(true)) => tracing::debug!(seq, "usage report acknowledged"),
            Ok(Ok(false)) => tracing::debug!(seq, "acknowledgement of a report no longer pending"),
            Ok(Err(e)) => {
                tracing::error!(seq, error = %e, "cannot save the acknowledged usage report; it will be sent again and not counted twice")
            }
            Err(e) => tracing::error!(error = %e, "usage acknowledgement task failed"),
        }
    }

    /// At shutdown: send what is counted and wait (bounded) for its acknowledgement. What
    /// is not acknowledged stays on disk and is sent after the restart.
    async fn final_report(
        &self,
        tx: &mpsc::Sender<DataPlaneMessage>,
        inbound: &mut tonic::Streaming<ControlPlaneMessage>,
    ) {
        let Some(report) = self.next_report().await else {
            return;
        };
        let seq = report.seq;
        let sent = tx
            .send(DataPlaneMessage {
                msg: Some(data_plane_message::Msg::Telemetry(report)),
            })
            .await;
        if sent.is_err() {
            return;
        }
        let wait = async {
            while let Ok(Some(message)) = inbound.message().await {
                if let Some(control_plane_message::Msg::TelemetryAck(ack)) = message.msg {
                    self.acknowledge(ack.seq).await;
                    if ack.seq == seq {
                        return;
                    }
                }
            }
        };
        if tokio::time::timeout(FINAL_TELEMETRY_WAIT, wait)
            .await
            .is_err()
        {
            tracing::warn!(seq, "the last usage report was not acknowledged before shutdown; it is kept and sent after restart");
        }
    }

    /// The keys trusted now.
    fn keys(&self) -> TrustedKeys {
        self.trusted_keys.borrow().clone()
    }

    async fn connect(&self) -> Result<Channel, SyncError> {
        match &self.transport {
            Transport::Insecure => charter_tls::connect_insecure(self.address())
                .await
                .map_err(SyncError::Connect),
            Transport::Tls {
                mode,
                files,
                server_name,
            } => {
                // Each connection takes the configuration loaded last, so renewed
                // certificate files are picked up without a restart.
                let config = match &self.tls {
                    Some(tls) => tls.borrow().clone(),
                    None => charter_tls::client_config(*mode, files).map_err(SyncError::Tls)?,
                };
                charter_tls::connect(self.address(), config, server_name)
                    .await
                    .map_err(SyncError::Connect)
            }
        }
    }

    /// The Hello for a new stream, with the cluster position this node holds.
    fn hello(&self) -> Hello {
        let held = self.enforcement.cluster();
        Hello {
            cached_epoch: held.as_ref().map(|h| h.epoch.clone()).unwrap_or_default(),
            cached_revision: held.as_ref().map_or(0, |h| h.revision),
            ..self.hello.clone()
        }
    }

    /// Applies or refuses a snapshot and says so in the Ack. A lower revision of the held
    /// epoch is noted in `lower` (taken once the wait is over); anything else ends the wait.
    async fn handle_snapshot(&self, snapshot: Snapshot, lower: &mut LowerRevisions) -> Ack {
        // Judged and applied with one set of keys: a reload waits for the swap, then
        // judges what was swapped in.
        let judging = self.enforcement.judging().await;
        let now = self.enforcement.now();
        let held = self.enforcement.cluster();
        let (epoch, revision) = (snapshot.epoch.clone(), snapshot.revision);
        let verdict = judge(held.as_deref(), &snapshot, &self.keys(), now);
        let answer = match verdict {
            Verdict::EmptyControlPlane { held_epoch } => {
                lower.clear();
                let kept = held
                    .as_ref()
                    .and_then(|h| h.license.as_ref())
                    .and_then(|l| l.record.as_ref())
                    .map_or_else(String::new, |r| r.id.clone());
                let error = format!(
                    "epoch {epoch} has no license: this control plane's store is new and empty (rebuilt, or its data lost); this data plane keeps license {kept} of epoch {held_epoch} in force until the control plane has a license; add one there"
                );
                tracing::warn!(%epoch, revision, %held_epoch, license = %kept,
                    "a control plane with a new, empty store offers no license: {error}");
                Answer::Refused("empty_control_plane", error)
            }
            Verdict::Decided(Decision::Stale { held }) => {
                let wait = self.regression_wait;
                if lower.deadline(self.regression_wait).is_none() {
                    tracing::warn!(%epoch, revision, held,
                        "the control plane offers revision {revision} of epoch {epoch}, older than revision {held} this data plane holds; ignored while it may be lagging, taken if it offers nothing newer for {wait:?}");
                } else {
                    tracing::debug!(%epoch, revision, held, "another lower revision offered");
                }
                lower.offered(snapshot, Instant::now());
                Answer::Refused("stale_revision", format!(
                    "revision {revision} of epoch {epoch} is older than revision {held} this data plane holds; ignored (a control plane cannot go back in time within an epoch), unless the control plane offers nothing newer for {wait:?}"
                ))
            }
            Verdict::Decided(decision) => {
                lower.clear();
                self.settle(decision, &snapshot, held).await
            }
        };
        drop(judging);
        self.answer(epoch, revision, answer).await
    }

    /// The control plane this node is connected to offered only lower revisions of the held
    /// epoch for [`SyncClient::regression_wait`]: its store went back, or this node's cache
    /// was altered. Its latest snapshot is taken (still verified), and the Ack says
    /// `revision_regressed`.
    async fn take_regressed(&self, snapshot: Snapshot) -> Ack {
        let judging = self.enforcement.judging().await;
        let now = self.enforcement.now();
        let held = self.enforcement.cluster();
        let held_revision = held.as_ref().map_or(0, |h| h.revision);
        let (epoch, revision) = (snapshot.epoch.clone(), snapshot.revision);
        let answer = match decide_regressed(held.as_deref(), &snapshot, &self.keys(), now) {
            Decision::Apply(new) => {
                let note = format!(
                    "the control plane offered only revision {revision} of epoch {epoch} for {:?} while this data plane held revision {held_revision}: its store went back, or this node's cache was altered; its snapshot is taken",
                    self.regression_wait
                );
                tracing::warn!(%epoch, revision, held = held_revision, "revision regressed: {note}");
                self.apply(*new).await;
                Answer::Noted("revision_regressed", note)
            }
            decision => self.settle(decision, &snapshot, held).await,
        };
        drop(judging);
        self.answer(epoch, revision, answer).await
    }

    /// Carries out a decision on a snapshot (applies it, or says why not).
    async fn settle(
        &self,
        decision: Decision,
        snapshot: &Snapshot,
        held: Option<Arc<ClusterHeld>>,
    ) -> Answer {
        let (epoch, revision) = (&snapshot.epoch, snapshot.revision);
        match decision {
            Decision::Stale { held } => Answer::Refused(
                "stale_revision",
                format!("revision {revision} of epoch {epoch} is older than revision {held} this data plane holds; ignored"),
            ),
            Decision::AlreadyApplied => {
                if let Some(held) = held.filter(|h| h.source == Source::Cache) {
                    // The control plane confirms what the cache held.
                    self.enforcement.set_cluster(ClusterHeld {
                        source: Source::Cluster,
                        ..(*held).clone()
                    });
                }
                tracing::debug!(%epoch, revision, "snapshot already applied");
                Answer::Accepted
            }
            Decision::Reject(e) => {
                tracing::error!(%epoch, revision, code = %e.code,
                    license = %snapshot.license.as_ref().map_or("", |l| l.id.as_str()),
                    "license from the control plane refused: {}; the previous license stays in force", e.message);
                Answer::Refused(e.code.as_str(), e.message)
            }
            Decision::Apply(new) => {
                // Persists the clock mark along with the cache.
                self.apply(*new).await;
                Answer::Accepted
            }
        }
    }

    /// The Ack of snapshot `epoch`/`revision`, with the license in force after it. The clock
    /// mark is persisted here when no cache write did it (a write in the same second as the
    /// cache's is skipped).
    async fn answer(&self, epoch: String, revision: u64, answer: Answer) -> Ack {
        let clock = self.clock.clone();
        let _ = tokio::task::spawn_blocking(move || clock.persist()).await;
        if matches!(answer, Answer::Refused(..)) {
            self.metrics.snapshots_rejected.inc();
        } else {
            self.metrics.snapshots_accepted.inc();
        }
        let in_force = self.enforcement.current();
        let (accepted, error_code, error) = match answer {
            Answer::Accepted => (true, String::new(), String::new()),
            Answer::Noted(code, note) => (true, code.to_owned(), note),
            Answer::Refused(code, error) => (false, code.to_owned(), error),
        };
        Ack {
            epoch,
            revision,
            accepted,
            error_code,
            error,
            license_id: in_force.license_id().to_owned(),
            license_status: in_force.status.as_str().to_owned(),
        }
    }

    /// Writes the cache (and the clock mark), then swaps the state.
    async fn apply(&self, new: ClusterHeld) {
        let file = new.to_cache();
        let dir = self.data_dir.clone();
        let clock = self.clock.clone();
        let written = tokio::task::spawn_blocking(move || {
            clock.persist();
            cache::store(&dir, &file)
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            // The license verified, so it is enforced anyway: refusing a renewal because
            // the disk is full would deny traffic for nothing. A restart would boot from
            // the older cache until the control plane is reached.
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot write the license cache; the new license is in force but a restart without the control plane would use the previous one");
                self.control_plane
                    .record_error(Some(format!("cannot write the license cache: {e}")));
            }
            Err(e) => tracing::error!(error = %e, "the license cache write task failed"),
        }
        let (epoch, revision) = (new.epoch.clone(), new.revision);
        let license = new.license.as_ref().map(|l| {
            (
                l.record.as_ref().map_or(String::new(), |r| r.id.clone()),
                l.verified.key_id.to_string(),
            )
        });
        let was_licensed = self
            .enforcement
            .cluster()
            .is_some_and(|h| h.license.is_some());
        self.enforcement.set_cluster(new);
        let in_force = self.enforcement.current();
        match (license, self.enforcement.has_static()) {
            (_, true) => tracing::info!(%epoch, revision,
                "cluster snapshot cached; the static license stays in force on this node"),
            (Some((id, key_id)), false) => tracing::info!(%epoch, revision, license = %id, %key_id,
                status = %in_force.status, "license from the control plane accepted and in force"),
            (None, false) if was_licensed => tracing::warn!(%epoch, revision,
                "the control plane says the cluster is unlicensed now: this data plane denies licensed use from now on"),
            (None, false) => tracing::info!(%epoch, revision,
                "the cluster is unlicensed: add a license on the control plane"),
        }
    }
}
