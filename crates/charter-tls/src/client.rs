//! The DP's tonic channel to the CP: TCP, then TLS with the DP's configuration, then HTTP/2.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::reason::describe_chain;
use crate::TlsError;

/// The bound on TCP connect plus TLS handshake, for the first connection and reconnections.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often an HTTP/2 PING checks that the CP is still there, also while no call is active,
/// so a vanished CP (or a middlebox that dropped the connection) is noticed.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// A tonic channel to `addr` ("host:port") over TLS, checking the server against
/// `server_name` (pki mode; in shared mode any name is fine, pass "charter-cluster").
///
/// The first connection is made before this returns, so an unreachable CP or a refused
/// server certificate is reported here ([`TlsError::Connect`], with the TLS reason spelled
/// out). After that the channel reconnects by itself when the connection drops.
///
/// With TLS 1.3 the CP checks the DP's certificate after the DP considers the handshake
/// done, so a DP certificate the CP refuses shows up as the first call's error; pass that
/// error to [`crate::describe_error`] for the reason.
pub async fn connect(
    addr: &str,
    config: Arc<rustls::ClientConfig>,
    server_name: &str,
) -> Result<Channel, TlsError> {
    let name =
        ServerName::try_from(server_name.to_owned()).map_err(|err| TlsError::ServerName {
            name: server_name.to_owned(),
            reason: err.to_string(),
        })?;
    let connector = TlsConnector::from(config);
    let target = addr.to_owned();
    let connect = tower::service_fn(move |_: Uri| {
        let (connector, name, target) = (connector.clone(), name.clone(), target.clone());
        async move {
            let tcp = TcpStream::connect(target.as_str()).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, io::Error>(TokioIo::new(tls))
        }
    });
    endpoint(addr)?
        .connect_with_connector(connect)
        .await
        .map_err(|err| TlsError::Connect {
            addr: addr.to_owned(),
            reason: describe_chain(&err, "server"),
        })
}

/// Plaintext HTTP/2 (`--cluster-insecure`, development only).
pub async fn connect_insecure(addr: &str) -> Result<Channel, TlsError> {
    endpoint(addr)?
        .connect()
        .await
        .map_err(|err| TlsError::Connect {
            addr: addr.to_owned(),
            reason: describe_chain(&err, "server"),
        })
}

fn endpoint(addr: &str) -> Result<Endpoint, TlsError> {
    // The scheme is `http` even over TLS: the connector does TLS itself, and tonic would
    // want its own TLS configuration for `https`.
    let endpoint =
        Endpoint::from_shared(format!("http://{addr}")).map_err(|source| TlsError::Address {
            addr: addr.to_owned(),
            source,
        })?;
    Ok(endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true))
}
