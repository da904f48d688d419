//! The simulated data planes: N connections from this one process, each its own TCP
//! connection, TLS session (the cluster certificate, as a deployed data plane holds it)
//! and `Cluster.Sync` stream, speaking the real protocol with the generated client.
//!
//! A stream's task only stamps each snapshot with the instant it was decoded and hands
//! it to the driver; the driver verifies and caches snapshots with the data plane's own
//! code ([`charter_dp::state::decide`], [`charter_dp::cache::store`]) after the fan-out
//! is timed, and answers each with an `Ack` as a data plane does. Real data planes verify
//! in parallel on their own machines; doing it inline here, serially, would add every
//! earlier data plane's verification to the later ones' delivery times.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use charter_dp::state::{decide, ClusterHeld, Decision};
use charter_license::{TrustedKeys, UnixTime};
use charter_proto::v1::cluster_client::ClusterClient;
use charter_proto::v1::{
    control_plane_message, data_plane_message, Ack, ControlPlaneMessage, Counter, DataPlaneMessage,
    Hello, Ping, Snapshot, Telemetry,
};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// The bound on one connection's TCP connect, TLS handshake, HTTP/2 handshake and the
/// answer to its `Sync` call.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// What a stream's task reports to the driver.
pub enum Event {
    /// A snapshot, stamped when the generated client had decoded it.
    Snapshot {
        dp: usize,
        at: Instant,
        snapshot: Snapshot,
    },
    /// A telemetry report was acknowledged (durable on the control plane).
    TelemetryAck { dp: usize, seq: u64 },
    /// The stream ended (the server closed it, or it failed).
    Closed { dp: usize, error: String },
}

/// One simulated data plane's side of its stream.
struct Link {
    /// Sends Acks on the request stream.
    tx: mpsc::Sender<DataPlaneMessage>,
    /// What the data plane holds (the last snapshot it accepted).
    held: Option<ClusterHeld>,
}

/// N connected simulated data planes.
pub struct Fleet {
    links: Vec<Link>,
    events: mpsc::UnboundedReceiver<Event>,
    tasks: JoinSet<()>,
}

/// Per-DP cost of handling one snapshot, as the data plane's own code does it.
#[derive(Default)]
pub struct Handling {
    /// `decide`: parse, Ed25519 verification, terms and status at now, the new held state.
    pub verify: Vec<Duration>,
    /// `cache::store` for the sampled data planes: serialise, temp file, fsync, rename,
    /// fsync the directory.
    pub cache_write: Vec<Duration>,
    /// Snapshots the data plane refused (should be none).
    pub refused: usize,
}

impl Fleet {
    /// Connects `n` data planes to the cluster port `target`, `batch` at a time, from
    /// source address `source` (a fresh loopback address per fleet, so earlier fleets'
    /// connections in TIME_WAIT never exhaust the ephemeral ports), each saying Hello as
    /// node `{prefix}-{i}`.
    pub async fn connect(
        target: SocketAddr,
        source: IpAddr,
        tls: Arc<rustls::ClientConfig>,
        n: usize,
        batch: usize,
        prefix: &str,
    ) -> Result<Fleet> {
        let (events_tx, events) = mpsc::unbounded_channel();
        let mut links: Vec<Option<Link>> = (0..n).map(|_| None).collect();
        let mut tasks = JoinSet::new();
        let connector = TlsConnector::from(tls);
        for start in (0..n).step_by(batch.max(1)) {
            let mut connecting = JoinSet::new();
            for dp in start..(start + batch).min(n) {
                let connector = connector.clone();
                let hello = hello(format!("{prefix}-{dp}"));
                connecting.spawn(async move {
                    let opened = tokio::time::timeout(
                        CONNECT_TIMEOUT,
                        open(target, source, connector, hello),
                    )
                    .await
                    .map_err(|_| anyhow!("no stream within {CONNECT_TIMEOUT:?}"))
                    .and_then(|r| r);
                    (dp, opened)
                });
            }
            while let Some(joined) = connecting.join_next().await {
                let (dp, opened) = joined.context("a connecting task failed")?;
                let (tx, mut inbound) =
                    opened.with_context(|| format!("connecting data plane {dp} to {target}"))?;
                let events = events_tx.clone();
                let pings = tx.clone();
                tasks.spawn(async move {
                    // A data plane pings every 30 s, from 30 s after it connected; the
                    // control plane drops a stream that is silent for 45 s.
                    let mut ping = tokio::time::interval_at(
                        Instant::now() + charter_dp::sync::PING_EVERY,
                        charter_dp::sync::PING_EVERY,
                    );
                    let error = loop {
                        let message = tokio::select! {
                            message = inbound.message() => message,
                            _ = ping.tick() => {
                                let ping = DataPlaneMessage {
                                    msg: Some(data_plane_message::Msg::Ping(Ping {})),
                                };
                                if pings.send(ping).await.is_err() {
                                    break "the request stream closed".to_owned();
                                }
                                continue;
                            }
                        };
                        match message {
                            Ok(Some(ControlPlaneMessage {
                                msg: Some(control_plane_message::Msg::Snapshot(snapshot)),
                            })) => {
                                let at = Instant::now();
                                if events.send(Event::Snapshot { dp, at, snapshot }).is_err() {
                                    return;
                                }
                            }
                            Ok(Some(ControlPlaneMessage {
                                msg: Some(control_plane_message::Msg::TelemetryAck(ack)),
                            })) => {
                                let seq = ack.seq;
                                if events.send(Event::TelemetryAck { dp, seq }).is_err() {
                                    return;
                                }
                            }
                            Ok(Some(_)) => {}
                            Ok(None) => break "the server ended the stream".to_owned(),
                            Err(status) => break status.to_string(),
                        }
                    };
                    let _ = events.send(Event::Closed { dp, error });
                });
                links[dp] = Some(Link { tx, held: None });
            }
        }
        let links = links
            .into_iter()
            .enumerate()
            .map(|(dp, link)| link.with_context(|| format!("data plane {dp} did not connect")))
            .collect::<Result<Vec<_>>>()?;
        Ok(Fleet {
            links,
            events,
            tasks,
        })
    }

    /// How many data planes.
    pub fn len(&self) -> usize {
        self.links.len()
    }

    /// Waits until every data plane has received a snapshot that `wanted` accepts
    /// (others, such as the one sent at connect time when an update was already on its
    /// way, are skipped), within `timeout`. Returns each data plane's snapshot and the
    /// instant it was decoded.
    pub async fn receive(
        &mut self,
        wanted: impl Fn(&Snapshot) -> bool,
        timeout: Duration,
    ) -> Result<Vec<(Instant, Snapshot)>> {
        let mut got: Vec<Option<(Instant, Snapshot)>> = (0..self.len()).map(|_| None).collect();
        let mut missing = self.len();
        let deadline = Instant::now() + timeout;
        while missing > 0 {
            let event = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .map_err(|_| {
                    anyhow!(
                        "{missing} of {} data planes did not receive the snapshot within {timeout:?}",
                        self.len()
                    )
                })?
                .context("every stream task ended")?;
            match event {
                Event::Snapshot { dp, at, snapshot } => {
                    if wanted(&snapshot) && got[dp].is_none() {
                        got[dp] = Some((at, snapshot));
                        missing -= 1;
                    }
                }
                Event::TelemetryAck { .. } => {}
                Event::Closed { dp, error } => {
                    bail!("the stream of data plane {dp} ended: {error}")
                }
            }
        }
        Ok(got.into_iter().flatten().collect())
    }

    /// Sends telemetry report `seq` (one request counted in `bucket`) from every data
    /// plane at once, and waits until each is acknowledged, within `timeout`.
    pub async fn report_all(&mut self, seq: u64, bucket: &str, timeout: Duration) -> Result<()> {
        for link in &self.links {
            let report = DataPlaneMessage {
                msg: Some(data_plane_message::Msg::Telemetry(Telemetry {
                    seq,
                    counters: vec![Counter {
                        bucket: bucket.to_owned(),
                        request_count: 1,
                    }],
                })),
            };
            link.tx
                .send(report)
                .await
                .map_err(|_| anyhow!("a request stream closed"))?;
        }
        let mut acked = vec![false; self.len()];
        let mut missing = self.len();
        let deadline = Instant::now() + timeout;
        while missing > 0 {
            let event = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .map_err(|_| {
                    anyhow!("{missing} telemetry reports were not acknowledged within {timeout:?}")
                })?
                .context("every stream task ended")?;
            match event {
                Event::TelemetryAck { dp, seq: got } if got == seq && !acked[dp] => {
                    acked[dp] = true;
                    missing -= 1;
                }
                Event::Closed { dp, error } => {
                    bail!("the stream of data plane {dp} ended: {error}")
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Handles each data plane's snapshot as a data plane does: `decide` (verification),
    /// the cache write for the data planes in `sample` (each into its own directory under
    /// `cache_root`), then the Ack. Timed per data plane, serially.
    pub async fn handle(
        &mut self,
        received: Vec<(Instant, Snapshot)>,
        keys: &TrustedKeys,
        now: UnixTime,
        sample: usize,
        cache_root: &Path,
    ) -> Result<Handling> {
        let mut handling = Handling::default();
        let every = (self.len() / sample.max(1)).max(1);
        for (dp, (_, snapshot)) in received.into_iter().enumerate() {
            let link = &mut self.links[dp];
            let started = std::time::Instant::now();
            let decision = decide(link.held.as_ref(), &snapshot, keys, now);
            let verified = started.elapsed();
            let ack = match decision {
                Decision::Apply(new) => {
                    handling.verify.push(verified);
                    if dp % every == 0 && handling.cache_write.len() < sample {
                        let dir = cache_root.join(format!("dp-{dp}"));
                        std::fs::create_dir_all(&dir)
                            .with_context(|| format!("creating {}", dir.display()))?;
                        let file = new.to_cache();
                        let started = std::time::Instant::now();
                        charter_dp::cache::store(&dir, &file)
                            .with_context(|| format!("writing the cache in {}", dir.display()))?;
                        handling.cache_write.push(started.elapsed());
                    }
                    let ack = ack(&snapshot, true, "", "");
                    link.held = Some(*new);
                    ack
                }
                Decision::AlreadyApplied => ack(&snapshot, true, "", ""),
                Decision::Stale { held } => {
                    handling.refused += 1;
                    ack(
                        &snapshot,
                        false,
                        "stale_revision",
                        &format!("older than revision {held}"),
                    )
                }
                Decision::Reject(e) => {
                    handling.refused += 1;
                    ack(&snapshot, false, e.code.as_str(), &e.message)
                }
            };
            // A full queue or a closed stream shows up as the server's missing Acks.
            let _ = link.tx.try_send(DataPlaneMessage {
                msg: Some(data_plane_message::Msg::Ack(ack)),
            });
        }
        Ok(handling)
    }

    /// Closes every stream and connection.
    pub async fn close(mut self) {
        self.links.clear();
        self.tasks.shutdown().await;
    }
}

fn hello(node_id: String) -> Hello {
    Hello {
        node_id,
        hostname: "charter-bench-sim".to_owned(),
        version: charter_dp::VERSION.to_owned(),
        labels: Default::default(),
        cached_epoch: String::new(),
        cached_revision: 0,
        upstream: String::new(),
    }
}

fn ack(snapshot: &Snapshot, accepted: bool, code: &str, error: &str) -> Ack {
    Ack {
        epoch: snapshot.epoch.clone(),
        revision: snapshot.revision,
        accepted,
        error_code: code.to_owned(),
        error: error.to_owned(),
        license_id: snapshot
            .license
            .as_ref()
            .map(|l| l.id.clone())
            .unwrap_or_default(),
        license_status: if snapshot.license.is_some() {
            "valid"
        } else {
            "unlicensed"
        }
        .to_owned(),
    }
}

/// One data plane's connection and `Sync` call, as `charter_tls::connect` and the data
/// plane's sync client make them, but bound to `source`.
async fn open(
    target: SocketAddr,
    source: IpAddr,
    connector: TlsConnector,
    hello: Hello,
) -> Result<(
    mpsc::Sender<DataPlaneMessage>,
    tonic::Streaming<ControlPlaneMessage>,
)> {
    let channel = channel(target, source, connector).await?;
    let (tx, rx) = mpsc::channel(8);
    tx.send(DataPlaneMessage {
        msg: Some(data_plane_message::Msg::Hello(hello)),
    })
    .await
    .map_err(|_| anyhow!("the request stream closed"))?;
    let response = ClusterClient::new(channel)
        .sync(ReceiverStream::new(rx))
        .await
        .map_err(|status| anyhow!("Sync refused: {status}"))?;
    Ok((tx, response.into_inner()))
}

async fn channel(target: SocketAddr, source: IpAddr, connector: TlsConnector) -> Result<Channel> {
    let name = ServerName::try_from("charter-cluster").context("the server name")?;
    let connect = tower::service_fn(move |_: Uri| {
        let (connector, name) = (connector.clone(), name.clone());
        async move {
            let socket = match target {
                SocketAddr::V4(_) => TcpSocket::new_v4()?,
                SocketAddr::V6(_) => TcpSocket::new_v6()?,
            };
            socket.bind(SocketAddr::new(source, 0))?;
            socket.set_nodelay(true)?;
            let tcp = socket.connect(target).await?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, io::Error>(TokioIo::new(tls))
        }
    });
    Endpoint::from_shared(format!("http://{target}"))
        .context("the endpoint")?
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .connect_with_connector(connect)
        .await
        .map_err(|e| anyhow!("{}", charter_tls::describe_error(&e)))
}
