//! The fan-out's etcd peer: what many teams would use to push a small value to many nodes,
//! one key in etcd and a watcher per node. etcd (Debian's `etcd-server`) runs as a single
//! member, in plaintext or with client-certificate TLS (the cluster certificate on both
//! sides, as the control plane's shared-mode mTLS); each simulated node holds its own
//! connection and `Watch` stream on the key, and an update is one `Put` of a license-sized
//! value. The client is generated from the part of etcd's API in `proto/etcd.proto`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use charter_tls::TlsFiles;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::sim::{channel, connect_all, take_each};
use crate::harness::{free_port, Bench, Server};

mod pb {
    tonic::include_proto!("etcdserverpb");
}

use pb::watch_client::WatchClient;
use pb::watch_request::RequestUnion;
use pb::{PutRequest, WatchCreateRequest, WatchRequest};

/// A client of etcd's `KV` service.
pub type KvClient = pb::kv_client::KvClient<Channel>;

/// The key every node watches.
const KEY: &[u8] = b"/charter/license";

/// Checks that the `etcd` binary is on the path.
pub fn check_installed() -> Result<()> {
    let out = std::process::Command::new("etcd").arg("--version").output();
    ensure!(
        out.is_ok_and(|o| o.status.success()),
        "no etcd on the path: install it (apt-get install etcd-server; scripts/bench does it \
         when missing), or pass --no-etcd"
    );
    Ok(())
}

/// Starts a single-member etcd placed like the servers, storing in `name` in the run's
/// dir, with client-certificate TLS on its client port when `certs` is given; its client
/// address. Readiness is `GET /health` on its plaintext metrics port.
pub async fn start(
    bench: &Bench,
    name: &str,
    certs: Option<&TlsFiles>,
) -> Result<(Server, SocketAddr)> {
    let (client, peer) = (free_port()?, free_port()?);
    let scheme = if certs.is_some() { "https" } else { "http" };
    let mut tls = Vec::new();
    if let Some(certs) = certs {
        let path = |p: &std::path::Path| p.display().to_string();
        tls = vec![
            format!("--cert-file={}", path(&certs.cert)),
            format!("--key-file={}", path(&certs.key)),
            "--client-cert-auth".to_owned(),
            format!("--trusted-ca-file={}", path(&certs.cert)),
        ];
    }
    let data = bench.path().join(name);
    let server = bench
        .start(&format!("{name}.log"), "etcd", "/health", |metrics| {
            let args = [
                format!("--name={name}"),
                format!("--data-dir={}", data.display()),
                format!("--listen-client-urls={scheme}://{client}"),
                format!("--advertise-client-urls={scheme}://{client}"),
                format!("--listen-peer-urls=http://{peer}"),
                format!("--initial-advertise-peer-urls=http://{peer}"),
                format!("--initial-cluster={name}=http://{peer}"),
                format!("--listen-metrics-urls=http://{metrics}"),
                "--log-level=warn".to_owned(),
            ];
            args.into_iter()
                .chain(tls.iter().cloned())
                .map(Into::into)
                .collect()
        })
        .await?;
    Ok((server, client))
}

/// A client for the updates' `Put`s, on a connection of its own.
pub async fn put_client(target: SocketAddr, tls: Option<TlsConnector>) -> Result<KvClient> {
    let source = IpAddr::from([127, 0, 0, 1]);
    Ok(pb::kv_client::KvClient::new(
        channel(target, source, tls).await?,
    ))
}

/// Puts `value` under the watched key; the revision it made.
pub async fn put(client: &mut KvClient, value: Vec<u8>) -> Result<i64> {
    let request = PutRequest {
        key: KEY.to_vec(),
        value,
    };
    let answer = client
        .put(request)
        .await
        .map_err(|s| anyhow!("etcd Put: {s}"))?;
    answer
        .into_inner()
        .header
        .map(|h| h.revision)
        .context("etcd answered a Put without a header")
}

/// A value seen by one watcher: which, when it was decoded, and its revision; or the end of
/// its stream.
enum Seen {
    Put(usize, Instant, i64),
    Closed(usize, String),
}

/// N nodes, each with its own connection and watch on the key.
pub struct Watchers {
    n: usize,
    seen: mpsc::UnboundedReceiver<Seen>,
    tasks: JoinSet<()>,
}

impl Watchers {
    /// Connects `n` watchers to `target` from `source`, `batch` at a time; each one's watch
    /// is created when this returns.
    pub async fn connect(
        target: SocketAddr,
        source: IpAddr,
        tls: Option<Arc<rustls::ClientConfig>>,
        n: usize,
        batch: usize,
    ) -> Result<Watchers> {
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let tls = tls.map(TlsConnector::from);
        let mut tasks = JoinSet::new();
        let open = |_| watch(target, source, tls.clone());
        connect_all(n, batch, open, |node, (requests, inbound)| {
            tasks.spawn(stream(node, requests, inbound, seen_tx.clone()));
        })
        .await
        .with_context(|| format!("connecting watchers to etcd at {target}"))?;
        Ok(Watchers { n, seen, tasks })
    }

    /// Waits until every watcher has seen `revision`, within `timeout`: the instant each
    /// decoded it.
    pub async fn receive(&mut self, revision: i64, timeout: Duration) -> Result<Vec<Instant>> {
        let mut got: Vec<Option<Instant>> = vec![None; self.n];
        let what = format!("revision {revision}");
        take_each(&mut self.seen, self.n, timeout, &what, |seen| match seen {
            Seen::Put(node, at, put) if put == revision => {
                got[node].get_or_insert(at);
                Ok(Some(node))
            }
            Seen::Put(..) => Ok(None),
            Seen::Closed(node, error) => bail!("the watch of node {node} ended: {error}"),
        })
        .await?;
        Ok(got.into_iter().flatten().collect())
    }

    /// Closes every watch and connection.
    pub async fn close(mut self) {
        self.tasks.shutdown().await;
    }
}

type Opened = (
    mpsc::Sender<WatchRequest>,
    tonic::Streaming<pb::WatchResponse>,
);

/// One node's connection and watch on the key, created.
async fn watch(target: SocketAddr, source: IpAddr, tls: Option<TlsConnector>) -> Result<Opened> {
    let channel = channel(target, source, tls).await?;
    let (tx, rx) = mpsc::channel(1);
    let create = WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: KEY.to_vec(),
        })),
    };
    tx.send(create)
        .await
        .map_err(|_| anyhow!("the request stream closed"))?;
    let mut inbound = WatchClient::new(channel)
        .watch(ReceiverStream::new(rx))
        .await
        .map_err(|s| anyhow!("Watch refused: {s}"))?
        .into_inner();
    let created = inbound.message().await.map_err(|s| anyhow!("Watch: {s}"))?;
    ensure!(
        created.is_some_and(|r| r.created),
        "etcd did not create the watch"
    );
    Ok((tx, inbound))
}

/// One watcher's stream: hands each put's revision to the driver. It holds the request
/// side open, as a watching client does.
async fn stream(
    node: usize,
    _requests: mpsc::Sender<WatchRequest>,
    mut inbound: tonic::Streaming<pb::WatchResponse>,
    seen: mpsc::UnboundedSender<Seen>,
) {
    let error = loop {
        match inbound.message().await {
            Ok(Some(response)) if response.canceled => {
                break format!("canceled: {}", response.cancel_reason)
            }
            Ok(Some(response)) => {
                let at = Instant::now();
                for kv in response.events.into_iter().filter_map(|e| e.kv) {
                    if seen.send(Seen::Put(node, at, kv.mod_revision)).is_err() {
                        return;
                    }
                }
            }
            Ok(None) => break "etcd ended the stream".to_owned(),
            Err(status) => break status.to_string(),
        }
    };
    let _ = seen.send(Seen::Closed(node, error));
}
