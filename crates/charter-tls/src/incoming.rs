//! The CP's stream of TLS connections for `tonic::transport::Server::serve_with_incoming`.
//!
//! Accepting and handshaking happen in tasks of their own, one per connection, so a peer that
//! stalls or fails its handshake never holds up the others, and the stream never ends
//! because of one bad peer. Finished streams reach the server through a bounded channel.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use std::collections::HashMap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::Connected;
use tracing::{debug, warn};

use crate::reason::handshake_reason;

/// How long a client has to complete its TLS handshake before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long to pause after `accept` itself fails (typically out of file descriptors), so
/// the loop does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Finished handshakes waiting for the server to pick them up.
const QUEUE: usize = 64;

/// Handshakes in progress at once, so peers that connect and stall cannot take every file
/// handle. A connection accepted beyond waits for a slot (the rest wait in the kernel's
/// backlog) while the oldest handshake in progress, once [`STALLED_AFTER`] old, is dropped
/// to make room: a real peer's handshake takes milliseconds, so peers that connect and
/// stall cannot keep the others out.
const MAX_HANDSHAKES: usize = 256;

/// How old a handshake in progress must be before it may be dropped to make room.
const STALLED_AFTER: Duration = Duration::from_secs(1);

/// How often a connection waiting for a handshake slot looks again for a stalled one.
const STALLED_RETRY: Duration = Duration::from_millis(250);

/// How long a refused client gets to read the alert and close its side.
const LINGER: Duration = Duration::from_secs(1);

type Item = Result<ClusterStream, io::Error>;

/// A cluster connection after its TLS handshake, as [`incoming`] yields it.
///
/// Its connection info ([`ClusterConnectInfo`]) carries the client's certificate chain
/// shared with every other connection that presented the same chain (in `shared` mode,
/// all of them), instead of a copy per connection as tonic's `TlsStream` info makes:
/// about half a KiB less per connected data plane.
pub struct ClusterStream {
    tls: TlsStream<TcpStream>,
    certs: Option<Certs>,
}

type Certs = Arc<Vec<rustls::pki_types::CertificateDer<'static>>>;

/// What a request over a [`ClusterStream`] knows of its connection (in the request's
/// extensions; read it with [`crate::remote_addr`] and [`crate::peer_certificates`]).
#[derive(Debug, Clone)]
pub struct ClusterConnectInfo {
    pub(crate) tcp: tonic::transport::server::TcpConnectInfo,
    pub(crate) certs: Option<Certs>,
}

impl Connected for ClusterStream {
    type ConnectInfo = ClusterConnectInfo;

    fn connect_info(&self) -> ClusterConnectInfo {
        ClusterConnectInfo {
            tcp: self.tls.get_ref().0.connect_info(),
            certs: self.certs.clone(),
        }
    }
}

impl tokio::io::AsyncRead for ClusterStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for ClusterStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

/// The certificate chain clients presented last, shared with the connections that present
/// the same one.
#[derive(Default)]
struct LastChain(std::sync::Mutex<Option<Certs>>);

impl LastChain {
    fn share(&self, chain: Option<&[rustls::pki_types::CertificateDer<'static>]>) -> Option<Certs> {
        let chain = chain?;
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match &*last {
            Some(certs) if certs.as_slice() == chain => Some(certs.clone()),
            _ => {
                let certs: Certs = Arc::new(chain.to_vec());
                *last = Some(certs.clone());
                Some(certs)
            }
        }
    }
}

/// Accepts TCP connections and runs TLS handshakes concurrently (one slow or failing peer
/// never blocks the others; handshake timeout [`HANDSHAKE_TIMEOUT`]), yielding finished
/// streams for `tonic::transport::Server::serve_with_incoming`.
///
/// A failed handshake is logged at WARN with the peer address and the reason (for example
/// "client presented no certificate", "client certificate is not the pinned cluster
/// certificate") and skipped. A connection closed before sending anything (a TCP probe) is
/// logged at DEBUG only. A failing `accept` is logged and retried. The stream never yields
/// an error and ends only when dropped; dropping it closes the listener.
///
/// The accept loop starts on the first poll, inside whatever Tokio runtime polls it.
/// Handlers can read the client's address and certificates with [`crate::remote_addr`] and
/// [`crate::peer_certificates`].
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> impl futures_core::Stream<Item = Item> + Send + 'static {
    incoming_reloadable(listener, tokio::sync::watch::channel(config).1)
}

/// [`incoming`] whose configuration can change while it runs: each accepted connection
/// is handshaken with the configuration `config` holds at that moment, so a rotated
/// certificate is used by new handshakes while the connections already up stay as they are.
pub fn incoming_reloadable(
    listener: TcpListener,
    config: tokio::sync::watch::Receiver<Arc<rustls::ServerConfig>>,
) -> impl futures_core::Stream<Item = Item> + Send + 'static {
    let (tx, rx) = mpsc::channel(QUEUE);
    Incoming {
        start: Some((listener, config, tx)),
        rx,
    }
}

type Config = tokio::sync::watch::Receiver<Arc<rustls::ServerConfig>>;

struct Incoming {
    /// What the accept loop needs, until the first poll spawns it.
    start: Option<(TcpListener, Config, mpsc::Sender<Item>)>,
    rx: mpsc::Receiver<Item>,
}

impl futures_core::Stream for Incoming {
    type Item = Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        if let Some((listener, config, tx)) = self.start.take() {
            tokio::spawn(accept_loop(listener, config, tx));
        }
        self.rx.poll_recv(cx)
    }
}

async fn accept_loop(listener: TcpListener, config: Config, tx: mpsc::Sender<Item>) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let pending = Arc::new(Pending::default());
    let chains = Arc::new(LastChain::default());
    let mut warned_full = false;
    loop {
        let accepted = tokio::select! {
            // The server dropped the stream: stop, and release the port.
            () = tx.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                warn!(error = %err, "cannot accept a cluster connection; retrying");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let slot = match handshakes.clone().try_acquire_owned() {
            Ok(slot) => {
                warned_full = false;
                slot
            }
            Err(_) => {
                if !warned_full {
                    warn!(
                        max = MAX_HANDSHAKES,
                        "cluster TLS handshakes in progress at the limit: dropping the oldest ones that stall"
                    );
                    warned_full = true;
                }
                let mut retry = tokio::time::interval(STALLED_RETRY);
                loop {
                    tokio::select! {
                        () = tx.closed() => return,
                        slot = handshakes.clone().acquire_owned() => match slot {
                            Ok(slot) => break slot,
                            Err(_) => return,
                        },
                        _ = retry.tick() => pending.drop_oldest_stalled(),
                    }
                }
            }
        };
        let (id, cancel) = pending.register();
        // The configuration loaded last: a rotated certificate from the next handshake on.
        let acceptor = TlsAcceptor::from(config.borrow().clone());
        let (tx, pending, chains) = (tx.clone(), pending.clone(), chains.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = handshake(acceptor, tcp, peer, tx, &chains) => {}
                () = cancel.notified() => {
                    warn!(%peer, reason = "no TLS handshake yet, and others waiting",
                        "cluster TLS handshake failed; connection dropped");
                }
            }
            pending.unregister(id);
            drop(slot);
        });
    }
}

/// When a handshake began, and how to cancel it.
type Began = (Instant, Arc<Notify>);

/// The handshakes in progress, by when each began.
#[derive(Default)]
struct Pending {
    handshakes: std::sync::Mutex<(u64, HashMap<u64, Began>)>,
}

impl Pending {
    fn register(&self) -> (u64, Arc<Notify>) {
        let mut guard = self.handshakes.lock().unwrap_or_else(|p| p.into_inner());
        let (next, handshakes) = &mut *guard;
        *next += 1;
        let cancel = Arc::new(Notify::new());
        handshakes.insert(*next, (Instant::now(), cancel.clone()));
        (*next, cancel)
    }

    fn unregister(&self, id: u64) {
        let mut guard = self.handshakes.lock().unwrap_or_else(|p| p.into_inner());
        guard.1.remove(&id);
    }

    /// Cancels the oldest handshake in progress if it began [`STALLED_AFTER`] ago or more.
    fn drop_oldest_stalled(&self) {
        let mut guard = self.handshakes.lock().unwrap_or_else(|p| p.into_inner());
        let oldest = guard
            .1
            .iter()
            .map(|(id, (began, _))| (*began, *id))
            .filter(|(began, _)| began.elapsed() >= STALLED_AFTER)
            .min();
        if let Some((_, cancel)) = oldest.and_then(|(_, id)| guard.1.remove(&id)) {
            cancel.notify_one();
        }
    }
}

/// How a handshake attempt ended.
enum Outcome {
    /// The handshake completed.
    Ready(Box<TlsStream<TcpStream>>),
    /// The peer closed the connection without sending a byte.
    Closed,
    /// The handshake failed; the connection is handed back to be closed gracefully.
    Failed(io::Error, TcpStream),
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    tx: mpsc::Sender<Item>,
    chains: &LastChain,
) {
    // gRPC messages are small and latency matters more than packet count. Failing to set
    // the option only costs latency, so it is not worth refusing the connection over.
    if let Err(err) = tcp.set_nodelay(true) {
        debug!(%peer, error = %err, "cannot set TCP_NODELAY on a cluster connection");
    }
    let outcome = tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt(&acceptor, tcp)).await;
    let (err, tcp) = match outcome {
        Ok(Outcome::Ready(tls)) => {
            let certs = chains.share(tls.get_ref().1.peer_certificates());
            let stream = ClusterStream { tls: *tls, certs };
            // The send fails only when the server has stopped listening; the stream is
            // then dropped.
            let _ = tx.send(Ok(stream)).await;
            return;
        }
        Ok(Outcome::Closed) => {
            debug!(%peer, "cluster connection closed before the TLS handshake began");
            return;
        }
        Ok(Outcome::Failed(err, tcp)) => (err, tcp),
        Err(_) => {
            warn!(
                %peer,
                reason = %format!("no TLS handshake within {}s", HANDSHAKE_TIMEOUT.as_secs()),
                "cluster TLS handshake failed; connection dropped"
            );
            return;
        }
    };
    let reason = handshake_reason(&err, "client");
    warn!(%peer, %reason, "cluster TLS handshake failed; connection dropped");
    close_gracefully(tcp).await;
}

async fn attempt(acceptor: &TlsAcceptor, tcp: TcpStream) -> Outcome {
    // Load balancer and Kubernetes TCP probes connect and close; they are not failed
    // handshakes and should not fill the log with warnings.
    match tcp.peek(&mut [0u8; 1]).await {
        Ok(0) => return Outcome::Closed,
        Ok(_) => {}
        Err(err) => return Outcome::Failed(err, tcp),
    }
    match acceptor.accept(tcp).into_fallible().await {
        Ok(stream) => Outcome::Ready(Box::new(stream)),
        Err((err, tcp)) => Outcome::Failed(err, tcp),
    }
}

/// Closes a connection whose handshake failed so that the client reads the TLS alert
/// explaining why. Dropping the socket at once would make the kernel answer with a reset
/// whenever the client's first bytes of HTTP/2 are still unread, and a reset can discard the
/// alert before the client reads it: the DP would log "connection reset" instead of "the
/// server refused our certificate".
async fn close_gracefully(mut tcp: TcpStream) {
    let linger = async {
        tcp.shutdown().await?;
        let mut sink = [0u8; 4096];
        while tcp.read(&mut sink).await? > 0 {}
        Ok::<_, io::Error>(())
    };
    // Errors and a client that never closes only mean the alert may not be read; the
    // connection goes away regardless.
    let _ = tokio::time::timeout(LINGER, linger).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::CertificateDer;

    #[test]
    fn connections_presenting_the_same_chain_share_one_copy() {
        let chains = LastChain::default();
        let a = vec![CertificateDer::from(vec![1u8, 2, 3])];
        let b = vec![CertificateDer::from(vec![4u8, 5])];
        assert!(chains.share(None).is_none());
        let first = chains.share(Some(&a)).expect("a chain");
        let second = chains.share(Some(&a)).expect("a chain");
        assert!(Arc::ptr_eq(&first, &second), "the same chain: one copy");
        assert_eq!(first.as_slice(), a.as_slice());
        let other = chains.share(Some(&b)).expect("a chain");
        assert_eq!(other.as_slice(), b.as_slice(), "another chain is its own");
        let third = chains.share(Some(&a)).expect("a chain");
        assert_eq!(third.as_slice(), a.as_slice());
    }
}
