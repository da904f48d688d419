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

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::reason::handshake_reason;

/// How long a client has to complete its TLS handshake before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long to pause after `accept` itself fails (typically out of file descriptors), so
/// the loop does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Finished handshakes waiting for the server to pick them up.
const QUEUE: usize = 64;

/// Handshakes in progress at once; beyond, new connections wait in the kernel's backlog,
/// so peers that connect and stall cannot take every file handle.
const MAX_HANDSHAKES: usize = 256;

/// How long a refused client gets to read the alert and close its side.
const LINGER: Duration = Duration::from_secs(1);

type Item = Result<TlsStream<TcpStream>, io::Error>;

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
    let (tx, rx) = mpsc::channel(QUEUE);
    Incoming {
        start: Some((listener, TlsAcceptor::from(config), tx)),
        rx,
    }
}

struct Incoming {
    /// What the accept loop needs, until the first poll spawns it.
    start: Option<(TcpListener, TlsAcceptor, mpsc::Sender<Item>)>,
    rx: mpsc::Receiver<Item>,
}

impl futures_core::Stream for Incoming {
    type Item = Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        if let Some((listener, acceptor, tx)) = self.start.take() {
            tokio::spawn(accept_loop(listener, acceptor, tx));
        }
        self.rx.poll_recv(cx)
    }
}

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, tx: mpsc::Sender<Item>) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let slot = tokio::select! {
            () = tx.closed() => return,
            slot = handshakes.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            // The server dropped the stream: stop, and release the port.
            () = tx.closed() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    handshake(acceptor, tcp, peer, tx).await;
                    drop(slot);
                });
            }
            Err(err) => {
                warn!(error = %err, "cannot accept a cluster connection; retrying");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
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
) {
    // gRPC messages are small and latency matters more than packet count. Failing to set
    // the option only costs latency, so it is not worth refusing the connection over.
    if let Err(err) = tcp.set_nodelay(true) {
        debug!(%peer, error = %err, "cannot set TCP_NODELAY on a cluster connection");
    }
    let outcome = tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt(&acceptor, tcp)).await;
    let (err, tcp) = match outcome {
        Ok(Outcome::Ready(stream)) => {
            // The send fails only when the server has stopped listening; the stream is
            // then dropped.
            let _ = tx.send(Ok(*stream)).await;
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
