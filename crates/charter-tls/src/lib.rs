//! Mutual TLS for the cluster protocol: rustls configurations for the `shared` and `pki`
//! modes, the control plane's stream of TLS connections and the data plane's tonic channel.
//!
//! In `shared` mode both sides load the one cluster certificate and key and each accepts
//! only a peer presenting that very certificate (byte for byte); names are not checked, but
//! validity dates and handshake signatures are. In `pki` mode both sides trust a CA: the CP
//! requires a client certificate with the clientAuth usage, and the DP checks the CP's
//! certificate (serverAuth) against a server name.
//!
//! Every configuration names the ring provider explicitly, so nothing here depends on the
//! process-wide default; [`install_default_provider`] is for other rustls users in the
//! process.
//!
//! It also builds the control plane's TLS configuration for PostgreSQL ([`database_client_config`]).

#![warn(missing_docs)]

mod client;
mod database;
mod files;
mod incoming;
mod pinned;
mod reason;
mod usage;

use std::path::PathBuf;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

pub use client::{connect, connect_insecure};
pub use database::{database_client_config, DatabaseTlsFiles, DatabaseVerify};
pub use incoming::{
    incoming, incoming_reloadable, ClusterConnectInfo, ClusterStream, HANDSHAKE_TIMEOUT,
};
pub use reason::describe_error;
/// The rustls version whose configurations this crate builds.
pub use rustls;

/// The ALPN protocol both sides offer: gRPC runs over HTTP/2 only.
const ALPN_H2: &[u8] = b"h2";

/// Installs rustls' ring provider as the process default; idempotent, call at start-up.
pub fn install_default_provider() {
    // `install_default` fails only when a provider is already installed, which is what
    // "idempotent" asks for: the first one stays.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// How the cluster's two sides authenticate each other (`--cluster-mtls`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MtlsMode {
    /// Both sides present the one cluster certificate and each pins it.
    Shared,
    /// Both sides trust a CA; the CP needs serverAuth, the DP clientAuth.
    Pki,
}

/// The files one side loads: its certificate (chain) and key, and in `pki` mode the CA.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain, the side's own certificate first (`--cluster-cert`).
    pub cert: PathBuf,
    /// PEM private key, PKCS#8, PKCS#1 or SEC1 (`--cluster-cert-key`).
    pub key: PathBuf,
    /// PEM CA certificate(s) (`--cluster-ca-cert`); required in `pki` mode, ignored in
    /// `shared` mode.
    pub ca: Option<PathBuf>,
}

/// Why a TLS configuration could not be built or a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A file has PEM markers but is not well-formed PEM.
    #[error("{} is not valid PEM: {reason}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A file meant to hold certificates holds none.
    #[error(
        "no certificate in {}: expected a PEM `BEGIN CERTIFICATE` block",
        path.display()
    )]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A file meant to hold a private key holds none.
    #[error(
        "no private key in {}: expected a PEM `BEGIN PRIVATE KEY` (or `RSA`/`EC PRIVATE KEY`) block",
        path.display()
    )]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// `pki` mode was asked for without a CA certificate.
    #[error("pki mode needs the cluster CA certificate (--cluster-ca-cert)")]
    MissingCa,
    /// The name to check the server's certificate against is not a DNS name or IP address.
    #[error("`{name}` is not a valid server name (a DNS name or an IP address): {reason}")]
    ServerName {
        /// The name given.
        name: String,
        /// What rustls said.
        reason: String,
    },
    /// rustls refused the certificates or key (say, a key that does not match the certificate).
    #[error("{context}: {source}")]
    Rustls {
        /// What was being done, naming the files.
        context: String,
        /// What rustls said.
        source: rustls::Error,
    },
    /// The CA file could not be used to verify client certificates.
    #[error("cannot verify client certificates with the CA in {}: {source}", path.display())]
    ClientVerifier {
        /// The CA file.
        path: PathBuf,
        /// What rustls said.
        source: rustls::server::VerifierBuilderError,
    },
    /// The address is not `host:port`.
    #[error("`{addr}` is not a valid control plane address (expected host:port): {source}")]
    Address {
        /// The address given.
        addr: String,
        /// What tonic said.
        source: tonic::transport::Error,
    },
    /// A TLS setting cannot be used as given (the database's TLS parameters).
    #[error("{0}")]
    Config(String),
    /// Connecting (TCP, TLS handshake or HTTP/2 set-up) failed.
    #[error("cannot connect to the control plane at {addr}: {reason}")]
    Connect {
        /// The address.
        addr: String,
        /// The whole cause, with TLS failures spelled out (see [`describe_error`]).
        reason: String,
    },
}

/// The CP side: requires and verifies a client certificate. ALPN "h2".
pub fn server_config(
    mode: MtlsMode,
    files: &TlsFiles,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let certs = files::certificates(&files.cert)?;
    let key = files::private_key(&files.key)?;
    // `certificates` never returns an empty list, so `certs[0]` (the side's own
    // certificate, which shared mode pins) exists.
    let verifier = match mode {
        MtlsMode::Shared => pinned::PinnedClientVerifier::build(certs[0].clone(), &provider)
            .map_err(|source| TlsError::Rustls {
                context: format!(
                    "pinning the cluster certificate in {}",
                    files.cert.display()
                ),
                source,
            })?,
        MtlsMode::Pki => {
            let ca = files.ca.as_ref().ok_or(TlsError::MissingCa)?;
            let webpki =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider.clone())
                    .build()
                    .map_err(|source| TlsError::ClientVerifier {
                        path: ca.clone(),
                        source,
                    })?;
            Arc::new(usage::RequireClientAuth(webpki))
        }
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            context: "choosing TLS versions".to_owned(),
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::Rustls {
            context: key_context(files),
            source,
        })?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The DP side: presents its certificate and verifies the CP's. ALPN "h2".
pub fn client_config(
    mode: MtlsMode,
    files: &TlsFiles,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let certs = files::certificates(&files.cert)?;
    let key = files::private_key(&files.key)?;
    // `certificates` never returns an empty list, so `certs[0]` exists.
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            context: "choosing TLS versions".to_owned(),
            source,
        })?;
    let builder = match mode {
        MtlsMode::Shared => {
            let verifier = pinned::PinnedServerVerifier::new(certs[0].clone(), provider).map_err(
                |source| TlsError::Rustls {
                    context: format!(
                        "pinning the cluster certificate in {}",
                        files.cert.display()
                    ),
                    source,
                },
            )?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
        }
        MtlsMode::Pki => {
            let ca = files.ca.as_ref().ok_or(TlsError::MissingCa)?;
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots(ca)?),
                provider,
            )
            .build()
            .map_err(|source| {
                TlsError::Config(format!(
                    "cannot verify the control plane's certificate with the CA in {}: {source}",
                    ca.display()
                ))
            })?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(usage::RequireServerAuth(webpki)))
        }
    };
    let mut config = builder
        .with_client_auth_cert(certs, key)
        .map_err(|source| TlsError::Rustls {
            context: key_context(files),
            source,
        })?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Gets the remote address of the connection a request came over, for TLS streams from
/// [`incoming`] as well as plain TCP (`--cluster-insecure`).
pub fn remote_addr<T>(request: &tonic::Request<T>) -> Option<std::net::SocketAddr> {
    match request.extensions().get::<ClusterConnectInfo>() {
        Some(info) => info.tcp.remote_addr(),
        None => request.remote_addr(),
    }
}

/// Gets the certificate chain the client presented (its own certificate first), for
/// requests that came over a stream from [`incoming`]; `None` over plain TCP.
pub fn peer_certificates<T>(
    request: &tonic::Request<T>,
) -> Option<Arc<Vec<rustls::pki_types::CertificateDer<'static>>>> {
    match request.extensions().get::<ClusterConnectInfo>() {
        Some(info) => info.certs.clone(),
        None => request.peer_certs(),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn key_context(files: &TlsFiles) -> String {
    format!(
        "using the certificate in {} with the key in {}",
        files.cert.display(),
        files.key.display()
    )
}

/// A root store holding every certificate in the CA file.
fn roots(path: &std::path::Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in files::certificates(path)? {
        roots.add(cert).map_err(|source| TlsError::Rustls {
            context: format!("using the CA certificate in {}", path.display()),
            source,
        })?;
    }
    Ok(roots)
}

#[cfg(test)]
mod tests;
