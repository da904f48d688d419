//! TLS from a control plane to PostgreSQL, as libpq's `sslmode` means it.
//!
//! libpq's modes differ in what they check, not in how they encrypt: `prefer` and
//! `require` encrypt without authenticating the server (unless a root certificate is
//! given, when `require` acts as `verify-ca`); `verify-ca` checks the server's chain
//! against the given roots; `verify-full` checks the chain and that the certificate names
//! the host connected to. A client certificate is sent when one is given.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, Error, RootCertStore};
use rustls::{SignatureScheme, DEFAULT_VERSIONS};

use crate::{files, TlsError};

/// What the client checks of the database server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseVerify {
    /// Nothing: the connection is encrypted, the server not authenticated (`prefer`,
    /// `require` without a root certificate).
    Nothing,
    /// Its chain, against the root certificates (`verify-ca`).
    Chain,
    /// Its chain and that it names the host (`verify-full`).
    Full,
}

/// The files of a database TLS configuration (libpq's `sslrootcert`, `sslcert`, `sslkey`).
#[derive(Debug, Clone, Default)]
pub struct DatabaseTlsFiles {
    /// PEM root certificate(s) the server's chain must lead to.
    pub root: Option<PathBuf>,
    /// PEM client certificate chain, sent when the server asks.
    pub cert: Option<PathBuf>,
    /// PEM private key of the client certificate.
    pub key: Option<PathBuf>,
}

/// The rustls configuration of a connection to PostgreSQL that checks `verify` of the
/// server. `Chain` and `Full` need `files.root`; a client certificate needs both
/// `files.cert` and `files.key`.
pub fn database_client_config(
    verify: DatabaseVerify,
    files: &DatabaseTlsFiles,
) -> Result<ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match verify {
        DatabaseVerify::Nothing => Arc::new(EncryptOnly {
            provider: provider.clone(),
        }),
        DatabaseVerify::Chain | DatabaseVerify::Full => {
            let Some(root) = &files.root else {
                return Err(TlsError::Config(
                    "verifying the database server needs its root certificate: add sslrootcert=PATH to the URL".to_owned(),
                ));
            };
            let mut roots = RootCertStore::empty();
            for cert in files::certificates(root)? {
                roots.add(cert).map_err(|e| {
                    TlsError::Config(format!(
                        "{} is not a usable root certificate: {e}",
                        root.display()
                    ))
                })?;
            }
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| TlsError::Config(format!("database roots: {e}")))?;
            if verify == DatabaseVerify::Full {
                webpki
            } else {
                Arc::new(ChainOnly { webpki })
            }
        }
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(DEFAULT_VERSIONS)
        .map_err(|e| TlsError::Config(format!("database TLS versions: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match (&files.cert, &files.key) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert), Some(key)) => {
            let chain = files::certificates(cert)?;
            let key = files::private_key(key)?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                TlsError::Config(format!(
                    "the database client certificate {}: {e}",
                    cert.display()
                ))
            })
        }
        _ => Err(TlsError::Config(
            "a database client certificate needs both sslcert and sslkey".to_owned(),
        )),
    }
}

/// `prefer` and `require`: any certificate, but the handshake's signatures still checked,
/// so the session is encrypted to whoever holds the certificate's key.
#[derive(Debug)]
struct EncryptOnly {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `verify-ca`: the chain, dates and usage checked as usual; a name that does not match
/// the host is accepted.
#[derive(Debug)]
struct ChainOnly {
    webpki: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}
