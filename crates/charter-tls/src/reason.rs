//! Plain-words reasons for failed handshakes, for an operator reading a log at 3 a.m.
//!
//! rustls reports what went wrong precisely but in its own vocabulary
//! (`ApplicationVerificationFailure`, `received fatal alert: UnknownCA`); these functions say
//! which certificate was refused, by whom, and what usually causes it.

use std::error::Error as StdError;

use rustls::{AlertDescription, CertificateError, Error};

use crate::pinned::NOT_PINNED;

/// Describes an error of the DP's side of a cluster connection and its causes on one line,
/// with TLS failures spelled out: "server refused our certificate (alert AccessDenied): in
/// shared mode: it is not the pinned cluster certificate" rather than "transport error".
///
/// Meant for the errors of a channel from [`crate::connect`], above all a `tonic::Status`
/// from a failed call: with TLS 1.3 the CP checks the DP's certificate after the DP
/// considers the handshake done, so a refused DP certificate shows up in the first call,
/// not in `connect`.
pub fn describe_error(err: &(dyn StdError + 'static)) -> String {
    describe_chain(err, "server")
}

/// [`describe_error`] naming the other side `peer` ("client", "server").
pub(crate) fn describe_chain(err: &(dyn StdError + 'static), peer: &str) -> String {
    let mut chain = Vec::new();
    let mut next = Some(err);
    while let Some(err) = next {
        chain.push(err);
        next = match err.downcast_ref::<std::io::Error>() {
            // `io::Error::source` skips the error it wraps, so step into it by hand.
            Some(io) => io.get_ref().map(|inner| inner as &(dyn StdError + 'static)),
            None => err.source(),
        };
    }
    let mut parts: Vec<String> = Vec::new();
    for err in chain {
        let text = match err.downcast_ref::<tonic::Status>() {
            // A status prints its source in its own message; take just the message.
            Some(status) => status.message().to_owned(),
            None => err.to_string(),
        };
        // The TLS failure is the root cause: say it in plain words and stop, since what
        // wraps it adds nothing.
        if let Some(tls) = rustls_error(err) {
            let raw = tls.to_string();
            parts.retain(|part| !part.contains(&raw));
            push(&mut parts, rustls_reason(tls, peer));
            break;
        }
        if let Some(alert) = alert_in_text(&text) {
            parts.retain(|part| !part.contains(ALERT_PREFIX));
            push(&mut parts, alert_reason(alert, peer));
            break;
        }
        push(&mut parts, text);
    }
    parts.join(": ")
}

/// Adds a part unless it only repeats the previous one (hyper and tonic often print their
/// cause in their own message).
fn push(parts: &mut Vec<String>, part: String) {
    if part.is_empty() {
        return;
    }
    if let Some(last) = parts.last() {
        if last == &part || last.ends_with(&part) {
            return;
        }
    }
    parts.push(part);
}

/// How rustls prints an alert it received.
const ALERT_PREFIX: &str = "received fatal alert: ";

/// The alert named in a message such as "received fatal alert: AccessDenied".
///
/// h2 cannot clone an I/O error, so when a connection fails it hands each waiting call a new
/// error carrying only the text: the rustls error itself is gone by then.
fn alert_in_text(text: &str) -> Option<AlertDescription> {
    const KNOWN: &[AlertDescription] = &[
        AlertDescription::CertificateRequired,
        AlertDescription::AccessDenied,
        AlertDescription::UnknownCA,
        AlertDescription::CertificateExpired,
        AlertDescription::UnsupportedCertificate,
        AlertDescription::BadCertificate,
        AlertDescription::CertificateUnknown,
        AlertDescription::DecryptError,
        AlertDescription::NoApplicationProtocol,
        AlertDescription::HandshakeFailure,
        AlertDescription::ProtocolVersion,
    ];
    let (_, name) = text.split_once(ALERT_PREFIX)?;
    let name = name.split(|c: char| !c.is_ascii_alphanumeric()).next()?;
    KNOWN
        .iter()
        .copied()
        .find(|alert| format!("{alert:?}") == name)
}

/// The rustls error this error is, or wraps directly in an `io::Error`.
fn rustls_error<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a Error> {
    err.downcast_ref::<Error>().or_else(|| {
        err.downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<Error>())
    })
}

/// Why a handshake failed, from an error tokio-rustls returned (an `io::Error` that wraps a
/// rustls error, or a plain I/O failure).
pub(crate) fn handshake_reason(err: &std::io::Error, peer: &str) -> String {
    if let Some(tls) = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<Error>())
    {
        return rustls_reason(tls, peer);
    }
    match err.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            format!("{peer} closed the connection during the handshake")
        }
        _ => describe_chain(err, peer),
    }
}

/// One rustls error in plain words; `peer` names the other side.
pub(crate) fn rustls_reason(err: &Error, peer: &str) -> String {
    match err {
        Error::NoCertificatesPresented => format!("{peer} presented no certificate"),
        Error::InvalidCertificate(cert) => certificate_reason(cert, peer),
        Error::AlertReceived(alert) => alert_reason(*alert, peer),
        Error::InvalidMessage(_)
        | Error::InappropriateMessage { .. }
        | Error::InappropriateHandshakeMessage { .. } => {
            format!("{peer} did not speak TLS as expected (is it using --cluster-insecure?): {err}")
        }
        Error::NoApplicationProtocol => {
            format!("{peer} does not offer HTTP/2 (ALPN h2), so it cannot speak gRPC")
        }
        err => err.to_string(),
    }
}

fn certificate_reason(err: &CertificateError, peer: &str) -> String {
    match err {
        err if *err == NOT_PINNED => format!(
            "{peer} certificate is not the pinned cluster certificate \
             (shared mode: both sides must load the same cluster.crt)"
        ),
        // Two CAs from separate `gen-cert --ca` runs share a name, so a certificate from the
        // wrong one usually fails its signature check rather than the issuer look-up.
        #[allow(deprecated)]
        CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
            "{peer} certificate is not signed by the trusted CA ({err:?}; \
             pki mode: it must be issued by the CA in --cluster-ca-cert)"
        ),
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            format!(
                "{peer} certificate is not made for this role ({err}); \
                 the CP needs serverAuth, the DP clientAuth"
            )
        }
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            format!("{peer} certificate does not match --cluster-server-name: {err}")
        }
        CertificateError::Expired
        | CertificateError::ExpiredContext { .. }
        | CertificateError::NotValidYet
        | CertificateError::NotValidYetContext { .. } => {
            format!("{peer} certificate is outside its validity period: {err}")
        }
        err => format!("{peer} certificate refused: {err}"),
    }
}

fn alert_reason(alert: AlertDescription, peer: &str) -> String {
    let why = match alert {
        AlertDescription::CertificateRequired => {
            return format!("{peer} requires a certificate and none was sent");
        }
        AlertDescription::AccessDenied => {
            "in shared mode: it is not the pinned cluster certificate"
        }
        AlertDescription::UnknownCA => "it is not signed by a CA the peer trusts",
        AlertDescription::CertificateExpired => {
            "it is expired or not yet valid (check the dates and both clocks)"
        }
        AlertDescription::UnsupportedCertificate => {
            "its key usage does not allow this role (the CP needs serverAuth, the DP clientAuth)"
        }
        AlertDescription::BadCertificate | AlertDescription::CertificateUnknown => {
            "in pki mode: does --cluster-server-name match a name in the CP certificate?"
        }
        AlertDescription::DecryptError => {
            "a signature did not verify (in pki mode: is it signed by another CA?)"
        }
        AlertDescription::NoApplicationProtocol => {
            return format!("{peer} does not accept HTTP/2 (ALPN h2)");
        }
        alert => return format!("{peer} aborted the handshake (alert {alert:?})"),
    };
    format!("{peer} refused our certificate (alert {alert:?}): {why}")
}
