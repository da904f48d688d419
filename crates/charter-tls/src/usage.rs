//! `pki` mode's extended key usage, required rather than implied: webpki accepts a
//! certificate with no extended key usage extension for any purpose (RFC 5280), but DESIGN
//! says the CP's certificate must name serverAuth and a DP's clientAuth. These verifiers
//! check that first and then verify the usual webpki way.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};

/// The role a certificate must name in its extended key usage.
#[derive(Debug, Clone, Copy)]
enum Role {
    Server,
    Client,
}

/// Refuses `cert` unless its extended key usage names `role`'s purpose.
fn require(cert: &CertificateDer<'_>, role: Role) -> Result<(), Error> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let usage = parsed
        .extended_key_usage()
        .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let named = usage.is_some_and(|usage| match role {
        Role::Server => usage.value.server_auth,
        Role::Client => usage.value.client_auth,
    });
    if named {
        Ok(())
    } else {
        Err(Error::InvalidCertificate(CertificateError::InvalidPurpose))
    }
}

/// The CP's verifier of DP certificates: clientAuth named, then webpki.
#[derive(Debug)]
pub(crate) struct RequireClientAuth(pub(crate) Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for RequireClientAuth {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        // webpki first, so a certificate from another CA is reported as that.
        let verified = self.0.verify_client_cert(end_entity, intermediates, now)?;
        require(end_entity, Role::Client)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The DP's verifier of the CP's certificate: serverAuth named, then webpki.
#[derive(Debug)]
pub(crate) struct RequireServerAuth(pub(crate) Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for RequireServerAuth {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let verified = self.0.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        require(end_entity, Role::Server)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
