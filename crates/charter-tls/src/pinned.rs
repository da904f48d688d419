//! Certificate verifiers for `shared` mode: the peer must present exactly the cluster
//! certificate this side loaded.
//!
//! Pinning decides *which* certificate is acceptable; everything else is still checked the
//! ordinary webpki way, with the pinned certificate as its own (only) trust anchor: its
//! signature, its validity dates (an expired cluster certificate is refused), its extended
//! key usage, and the handshake signature that proves the peer holds the private key.
//! Names are not checked: both sides hold the same certificate, so there is nothing a name
//! would add.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};
use rustls::{Error, SignatureScheme};

/// The error both verifiers return for a certificate other than the pinned one. It is the
/// only use of `ApplicationVerificationFailure` in this crate, which is how
/// [`crate::describe_error`] knows to call it a pin mismatch. The peer receives an
/// `access_denied` alert.
pub(crate) const NOT_PINNED: CertificateError = CertificateError::ApplicationVerificationFailure;

fn pinned_roots(pinned: &CertificateDer<'static>) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    roots.add(pinned.clone())?;
    Ok(roots)
}

/// The CP's verifier: requires a client certificate and accepts only the pinned one.
#[derive(Debug)]
pub(crate) struct PinnedClientVerifier {
    pinned: CertificateDer<'static>,
    /// Checks dates, clientAuth usage and handshake signatures against the pinned
    /// certificate as trust anchor.
    webpki: Arc<dyn ClientCertVerifier>,
}

impl PinnedClientVerifier {
    /// A verifier that accepts only `pinned`, ready for a `ServerConfig`.
    pub(crate) fn build(
        pinned: CertificateDer<'static>,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Arc<dyn ClientCertVerifier>, Error> {
        let webpki = WebPkiClientVerifier::builder_with_provider(
            Arc::new(pinned_roots(&pinned)?),
            provider.clone(),
        )
        .build()
        // The builder fails only without roots or with a bad CRL; there is one root
        // and no CRL, but report rather than panic should that ever change.
        .map_err(|err| Error::General(err.to_string()))?;
        Ok(Arc::new(PinnedClientVerifier { pinned, webpki }))
    }
}

impl ClientCertVerifier for PinnedClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        if end_entity.as_ref() != self.pinned.as_ref() {
            return Err(NOT_PINNED.into());
        }
        // Whatever else the client sent is irrelevant: the pinned certificate is its own
        // anchor.
        self.webpki.verify_client_cert(end_entity, &[], now)
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

/// The DP's verifier: accepts only a server presenting the pinned certificate.
#[derive(Debug)]
pub(crate) struct PinnedServerVerifier {
    pinned: CertificateDer<'static>,
    roots: RootCertStore,
    provider: Arc<CryptoProvider>,
}

impl PinnedServerVerifier {
    /// A verifier that accepts only `pinned`.
    pub(crate) fn new(
        pinned: CertificateDer<'static>,
        provider: Arc<CryptoProvider>,
    ) -> Result<PinnedServerVerifier, Error> {
        Ok(PinnedServerVerifier {
            roots: pinned_roots(&pinned)?,
            pinned,
            provider,
        })
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        if end_entity.as_ref() != self.pinned.as_ref() {
            return Err(NOT_PINNED.into());
        }
        // Dates, serverAuth usage and the self-signature, but deliberately not the name.
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &ParsedCertificate::try_from(end_entity)?,
            &self.roots,
            &[],
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
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
        rustls::crypto::verify_tls13_signature(
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
