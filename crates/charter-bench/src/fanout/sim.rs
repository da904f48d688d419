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
use charter_proto::v1::control_plane_message::Msg as FromCp;
use charter_proto::v1::data_plane_message::Msg as ToCp;
use charter_proto::v1::{Ack, ControlPlaneMessage, Counter, DataPlaneMessage, Hello, Ping};
use charter_proto::v1::{Snapshot, Telemetry};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Streaming;

/// The bound on one connection's TCP connect, TLS handshake, HTTP/2 handshake and the
/// answer to its first call (`Sync`, or etcd's `Watch`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts per connection: a server under load may drop a handshake that stalls (the
/// CP's and the baseline's TLS acceptor does beyond 256 in progress).
const CONNECT_ATTEMPTS: usize = 3;

/// What a stream's task reports to the driver.
enum Event {
    /// A snapshot, stamped when the generated client had decoded it.
    Snapshot(usize, Instant, Snapshot),
    /// A telemetry report was acknowledged (durable on the control plane).
    TelemetryAck(usize, u64),
    /// The stream ended (the server closed it, or it failed).
    Closed(usize, String),
}

/// One simulated data plane's side of its stream: where its messages go, and what it
/// holds (the last snapshot it accepted).
struct Link {
    tx: mpsc::Sender<DataPlaneMessage>,
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
    /// source address `source`, each saying Hello as node `{prefix}-{i}`.
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
        let open = |dp| open(target, source, connector.clone(), format!("{prefix}-{dp}"));
        connect_all(n, batch, open, |dp, (tx, inbound)| {
            tasks.spawn(stream(dp, tx.clone(), inbound, events_tx.clone()));
            links[dp] = Some(Link { tx, held: None });
        })
        .await
        .with_context(|| format!("connecting data planes to {target}"))?;
        let links = links
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .context("a data plane did not connect")?;
        Ok(Fleet {
            links,
            events,
            tasks,
        })
    }

    /// Takes events until `take` has accepted one from every data plane, within `timeout`.
    async fn take(
        &mut self,
        timeout: Duration,
        what: &str,
        mut take: impl FnMut(Event) -> Option<usize>,
    ) -> Result<()> {
        take_each(&mut self.events, self.links.len(), timeout, what, |event| {
            if let Event::Closed(dp, error) = event {
                bail!("the stream of data plane {dp} ended: {error}");
            }
            Ok(take(event))
        })
        .await
    }

    /// Waits until every data plane has received a snapshot that `wanted` accepts
    /// (others, such as the one sent at connect time when an update was already on its
    /// way, are skipped), within `timeout`: each data plane's snapshot and the instant it
    /// was decoded.
    pub async fn receive(
        &mut self,
        wanted: impl Fn(&Snapshot) -> bool,
        timeout: Duration,
    ) -> Result<Vec<(Instant, Snapshot)>> {
        let mut got: Vec<Option<(Instant, Snapshot)>> =
            (0..self.links.len()).map(|_| None).collect();
        self.take(timeout, "snapshot", |event| match event {
            Event::Snapshot(dp, at, snapshot) if wanted(&snapshot) && got[dp].is_none() => {
                got[dp] = Some((at, snapshot));
                Some(dp)
            }
            _ => None,
        })
        .await?;
        Ok(got.into_iter().flatten().collect())
    }

    /// Sends telemetry report `seq` (one request counted in `bucket`) from every data
    /// plane at once, and waits until each is acknowledged, within `timeout`.
    pub async fn report_all(&mut self, seq: u64, bucket: &str, timeout: Duration) -> Result<()> {
        for link in &self.links {
            let counters = vec![Counter {
                bucket: bucket.to_owned(),
                request_count: 1,
            }];
            let report = DataPlaneMessage {
                msg: Some(ToCp::Telemetry(Telemetry { seq, counters })),
            };
            link.tx
                .send(report)
                .await
                .map_err(|_| anyhow!("a request stream closed"))?;
        }
        self.take(timeout, "telemetry acknowledgement", |event| match event {
            Event::TelemetryAck(dp, got) if got == seq => Some(dp),
            _ => None,
        })
        .await
    }

    /// Handles each data plane's snapshot as a data plane does: `decide` (verification),
    /// the cache write for up to `sample` data planes spread over the fleet (each into its
    /// own directory under `cache_root`), then the Ack. Timed per data plane, serially.
    pub fn handle(
        &mut self,
        received: Vec<(Instant, Snapshot)>,
        keys: &TrustedKeys,
        now: UnixTime,
        sample: usize,
        cache_root: &Path,
    ) -> Result<Handling> {
        let mut handling = Handling::default();
        let every = (self.links.len() / sample.max(1)).max(1);
        for (dp, (_, snapshot)) in received.into_iter().enumerate() {
            let link = &mut self.links[dp];
            let started = std::time::Instant::now();
            let decision = decide(link.held.as_ref(), &snapshot, keys, now);
            let verified = started.elapsed();
            let refusal = match decision {
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
                    link.held = Some(*new);
                    None
                }
                Decision::AlreadyApplied => None,
                Decision::Stale { held } => Some((
                    "stale_revision".to_owned(),
                    format!("older than revision {held}"),
                )),
                Decision::Reject(e) => Some((e.code.as_str().to_owned(), e.message)),
            };
            handling.refused += usize::from(refusal.is_some());
            let (error_code, error) = refusal.clone().unwrap_or_default();
            let license = snapshot.license.as_ref();
            let ack = Ack {
                epoch: snapshot.epoch.clone(),
                revision: snapshot.revision,
                accepted: refusal.is_none(),
                error_code,
                error,
                license_id: license.map(|l| l.id.clone()).unwrap_or_default(),
                license_status: if license.is_some() {
                    "valid"
                } else {
                    "unlicensed"
                }
                .to_owned(),
            };
            // A full queue or a closed stream shows up as the server's missing Acks.
            let _ = link.tx.try_send(DataPlaneMessage {
                msg: Some(ToCp::Ack(ack)),
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

/// Takes items from `events` until `take` has accepted one from each of `n` nodes (it
/// names the node, or fails on an item that ends the wait), within `timeout`.
pub async fn take_each<E>(
    events: &mut mpsc::UnboundedReceiver<E>,
    n: usize,
    timeout: Duration,
    what: &str,
    mut take: impl FnMut(E) -> Result<Option<usize>>,
) -> Result<()> {
    let mut done = vec![false; n];
    let mut missing = n;
    let deadline = Instant::now() + timeout;
    while missing > 0 {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .map_err(|_| anyhow!("{missing} of {n} nodes: no {what} within {timeout:?}"))?
            .context("every stream task ended")?;
        if let Some(node) = take(event)? {
            if !std::mem::replace(&mut done[node], true) {
                missing -= 1;
            }
        }
    }
    Ok(())
}

/// Opens `n` connections, `batch` at a time, with `open(i)` (each within
/// [`CONNECT_TIMEOUT`], tried up to [`CONNECT_ATTEMPTS`] times, as a node that is refused
/// connects again), and hands each to `opened(i, connection)` once it is up.
pub async fn connect_all<T: Send + 'static, F>(
    n: usize,
    batch: usize,
    open: impl Fn(usize) -> F,
    mut opened: impl FnMut(usize, T),
) -> Result<()>
where
    F: std::future::Future<Output = Result<T>> + Send + 'static,
{
    for start in (0..n).step_by(batch.max(1)) {
        let mut connecting = JoinSet::new();
        for i in start..(start + batch).min(n) {
            let attempts: Vec<_> = (0..CONNECT_ATTEMPTS).map(|_| open(i)).collect();
            connecting.spawn(async move {
                let mut error = anyhow!("no attempt");
                for attempt in attempts {
                    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
                        Ok(Ok(connection)) => return (i, Ok(connection)),
                        Ok(Err(e)) => error = e,
                        Err(_) => error = anyhow!("not up within {CONNECT_TIMEOUT:?}"),
                    }
                }
                (i, Err(error))
            });
        }
        while let Some(joined) = connecting.join_next().await {
            let (i, result) = joined.context("a connecting task failed")?;
            opened(i, result.with_context(|| format!("node {i}"))?);
        }
    }
    Ok(())
}

/// One data plane's stream: hands each snapshot and telemetry Ack to the driver, and
/// pings every 30 s from 30 s after it connected, as a data plane does (the control plane
/// drops a stream that is silent for 45 s).
async fn stream(
    dp: usize,
    pings: mpsc::Sender<DataPlaneMessage>,
    mut inbound: Streaming<ControlPlaneMessage>,
    events: mpsc::UnboundedSender<Event>,
) {
    let every = charter_dp::sync::PING_EVERY;
    let mut ping = tokio::time::interval_at(Instant::now() + every, every);
    let error = loop {
        let message = tokio::select! {
            message = inbound.message() => message,
            _ = ping.tick() => {
                if pings.send(DataPlaneMessage { msg: Some(ToCp::Ping(Ping {})) }).await.is_err() {
                    break "the request stream closed".to_owned();
                }
                continue;
            }
        };
        let event = match message {
            Ok(Some(ControlPlaneMessage {
                msg: Some(FromCp::Snapshot(snapshot)),
            })) => Event::Snapshot(dp, Instant::now(), snapshot),
            Ok(Some(ControlPlaneMessage {
                msg: Some(FromCp::TelemetryAck(ack)),
            })) => Event::TelemetryAck(dp, ack.seq),
            Ok(Some(_)) => continue,
            Ok(None) => break "the server ended the stream".to_owned(),
            Err(status) => break status.to_string(),
        };
        if events.send(event).is_err() {
            return;
        }
    };
    let _ = events.send(Event::Closed(dp, error));
}

/// One data plane's connection and `Sync` call, as `charter_tls::connect` and the data
/// plane's sync client make them, but bound to `source`.
async fn open(
    target: SocketAddr,
    source: IpAddr,
    connector: TlsConnector,
    node_id: String,
) -> Result<(
    mpsc::Sender<DataPlaneMessage>,
    Streaming<ControlPlaneMessage>,
)> {
    let channel = channel(target, source, Some(connector)).await?;
    let (tx, rx) = mpsc::channel(8);
    let hello = Hello {
        node_id,
        hostname: "charter-bench-sim".to_owned(),
        version: charter_dp::VERSION.to_owned(),
        ..Hello::default()
    };
    tx.send(DataPlaneMessage {
        msg: Some(ToCp::Hello(hello)),
    })
    .await
    .map_err(|_| anyhow!("the request stream closed"))?;
    let response = ClusterClient::new(channel)
        .sync(ReceiverStream::new(rx))
        .await
        .map_err(|status| anyhow!("Sync refused: {status}"))?;
    Ok((tx, response.into_inner()))
}

/// A connection's byte stream, TLS or plaintext.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// An HTTP/2 connection to `target` from `source` (port chosen by the kernel), over TLS
/// with `tls` (the cluster certificate, server name `charter-cluster`) or in plaintext:
/// one simulated node's own connection, whichever server it goes to.
pub async fn channel(
    target: SocketAddr,
    source: IpAddr,
    tls: Option<TlsConnector>,
) -> Result<Channel> {
    let name = ServerName::try_from("charter-cluster").context("the server name")?;
    let connect = tower::service_fn(move |_: Uri| {
        let (tls, name) = (tls.clone(), name.clone());
        async move {
            let socket = match target {
                SocketAddr::V4(_) => TcpSocket::new_v4()?,
                SocketAddr::V6(_) => TcpSocket::new_v6()?,
            };
            socket.bind(SocketAddr::new(source, 0))?;
            socket.set_nodelay(true)?;
            let tcp = socket.connect(target).await?;
            let io: Box<dyn Io> = match tls {
                Some(tls) => Box::new(tls.connect(name, tcp).await?),
                None => Box::new(tcp),
            };
            Ok::<_, io::Error>(TokioIo::new(io))
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
