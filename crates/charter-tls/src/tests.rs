//! Real handshakes on 127.0.0.1 between a tonic server fed by [`incoming`] and channels
//! from [`connect`], with certificates made in-process the way `charterctl gen-cert` makes
//! them.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use charter_proto::v1::cluster_client::ClusterClient;
use charter_proto::v1::cluster_server::{Cluster, ClusterServer};
use charter_proto::v1::control_plane_message::Msg;
use charter_proto::v1::{ControlPlaneMessage, DataPlaneMessage, TelemetryAck};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P384_SHA384,
};
use rustls::ClientConfig;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status, Streaming};

use crate::*;

// ---------------------------------------------------------------------------------------
// Certificates, as `charterctl gen-cert` makes them (crates/charterctl/src/cert.rs).

/// Where one test keeps its certificates.
struct Certs {
    dir: tempfile::TempDir,
}

/// A CA and its key, for signing `pki` certificates.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    path: PathBuf,
}

enum Validity {
    Current,
    Expired,
}

impl Certs {
    fn new() -> Certs {
        Certs {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, contents).expect("write");
        path
    }

    /// A `shared` mode cluster certificate: self-signed, SAN `charter-cluster`, serverAuth
    /// and clientAuth.
    fn shared(&self, tag: &str, validity: Validity) -> TlsFiles {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).expect("key");
        let mut params = leaf("charter-cluster", &["charter-cluster"], validity);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.self_signed(&key).expect("self-signed");
        TlsFiles {
            cert: self.write(&format!("{tag}.crt"), &cert.pem()),
            key: self.write(&format!("{tag}.key"), &key.serialize_pem()),
            ca: None,
        }
    }

    fn ca(&self, tag: &str) -> Ca {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).expect("key");
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "Charter cluster CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        set_validity(&mut params, Validity::Current);
        let cert = params.self_signed(&key).expect("self-signed");
        let path = self.write(&format!("{tag}.crt"), &cert.pem());
        Ca { cert, key, path }
    }

    /// A `pki` certificate signed by `ca`, with the CA file set.
    fn issue(
        &self,
        ca: &Ca,
        tag: &str,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> TlsFiles {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).expect("key");
        let mut params = leaf(names[0], names, Validity::Current);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &ca.cert, &ca.key).expect("signed");
        TlsFiles {
            cert: self.write(&format!("{tag}.crt"), &cert.pem()),
            key: self.write(&format!("{tag}.key"), &key.serialize_pem()),
            ca: Some(ca.path.clone()),
        }
    }

    /// A certificate signed by `ca` with no extended key usage extension at all.
    fn issue_without_usage(&self, ca: &Ca, tag: &str, names: &[&str]) -> TlsFiles {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).expect("key");
        let params = leaf(names[0], names, Validity::Current);
        let cert = params.signed_by(&key, &ca.cert, &ca.key).expect("signed");
        TlsFiles {
            cert: self.write(&format!("{tag}.crt"), &cert.pem()),
            key: self.write(&format!("{tag}.key"), &key.serialize_pem()),
            ca: Some(ca.path.clone()),
        }
    }

    /// The CP certificate, with `charterctl gen-cert --ca`'s default names.
    fn cp(&self, ca: &Ca, tag: &str) -> TlsFiles {
        self.issue(
            ca,
            tag,
            &["charter-cp", "localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    fn dp(&self, ca: &Ca, tag: &str) -> TlsFiles {
        self.issue(
            ca,
            tag,
            &["charter-dp"],
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }
}

fn leaf(cn: &str, names: &[&str], validity: Validity) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.subject_alt_names = names
        .iter()
        .map(|name| match name.parse() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName((*name).try_into().expect("dns name")),
        })
        .collect();
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.is_ca = IsCa::ExplicitNoCa;
    set_validity(&mut params, validity);
    params
}

fn set_validity(params: &mut CertificateParams, validity: Validity) {
    let now = OffsetDateTime::now_utc();
    let day = time::Duration::days(1);
    (params.not_before, params.not_after) = match validity {
        Validity::Current => (now - day, now + 365 * day),
        Validity::Expired => (now - 30 * day, now - day),
    };
}

// ---------------------------------------------------------------------------------------
// A server and a client speaking the real cluster protocol.

/// Answers every `sync` with one `TelemetryAck` whose `seq` is the length of the client
/// certificate the server saw, proving the certificate reaches handlers.
struct Echo;

#[tonic::async_trait]
impl Cluster for Echo {
    type SyncStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<ControlPlaneMessage, Status>> + Send>>;

    async fn sync(
        &self,
        request: Request<Streaming<DataPlaneMessage>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        if remote_addr(&request).is_none() {
            return Err(Status::internal("no remote address"));
        }
        let seen = peer_certificates(&request)
            .and_then(|certs| certs.first().map(|cert| cert.len()))
            .unwrap_or(0);
        let ack = ControlPlaneMessage {
            msg: Some(Msg::TelemetryAck(TelemetryAck { seq: seen as u64 })),
        };
        Ok(Response::new(Box::pin(tokio_stream::once(Ok(ack)))))
    }
}

async fn start_server(config: Arc<rustls::ServerConfig>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(
        Server::builder()
            .add_service(ClusterServer::new(Echo))
            .serve_with_incoming(incoming(listener, config)),
    );
    addr
}

/// One `sync` call: the `seq` answered, or the status.
async fn call(channel: Channel) -> Result<u64, Status> {
    let exchange = async {
        let outbound = tokio_stream::iter([DataPlaneMessage::default()]);
        let mut inbound = ClusterClient::new(channel)
            .sync(outbound)
            .await?
            .into_inner();
        match inbound.message().await? {
            Some(ControlPlaneMessage {
                msg: Some(Msg::TelemetryAck(ack)),
            }) => Ok(ack.seq),
            other => Err(Status::internal(format!("unexpected answer {other:?}"))),
        }
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .unwrap_or_else(|_| Err(Status::deadline_exceeded("no answer within 5s")))
}

/// Connects and calls once; the `seq` answered, or what went wrong as an operator reads it.
async fn connect_and_call(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    server_name: &str,
) -> Result<u64, String> {
    let channel = connect(&addr.to_string(), config, server_name)
        .await
        .map_err(|err| err.to_string())?;
    call(channel)
        .await
        .map_err(|status| describe_error(&status))
}

/// The DER length of the first certificate in a file, which [`Echo`] answers with.
fn cert_len(files: &TlsFiles) -> u64 {
    files::certificates(&files.cert).expect("certificate")[0].len() as u64
}

/// How a hand-made client checks the server.
enum Trust<'a> {
    /// Pins the cluster certificate in this file, as `shared` mode does.
    Pinned(&'a Path),
    /// Trusts the CA in this file, as `pki` mode does.
    Ca(&'a Path),
}

/// A client configuration `client_config` cannot make: no certificate at all, or a
/// certificate that differs from the pinned one, or TLS 1.2 only.
fn custom_client(
    trust: Trust<'_>,
    identity: Option<&TlsFiles>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .expect("versions");
    let builder = match trust {
        Trust::Pinned(path) => {
            let pinned = files::certificates(path).expect("certificate")[0].clone();
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(
                    pinned::PinnedServerVerifier::new(pinned, provider).expect("verifier"),
                ))
        }
        Trust::Ca(path) => builder.with_root_certificates(roots(path).expect("roots")),
    };
    let mut config = match identity {
        Some(files) => builder
            .with_client_auth_cert(
                files::certificates(&files.cert).expect("certificate"),
                files::private_key(&files.key).expect("key"),
            )
            .expect("client certificate"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

// ---------------------------------------------------------------------------------------
// Capturing the server's log, to check the reasons it gives.

/// Everything logged while the guard lives. Tests run on a current-thread runtime, so the
/// server's spawned tasks log on the test's thread and reach its default subscriber.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned()
    }

    fn clear(&self) {
        self.0.lock().expect("lock").clear();
    }

    /// Waits (bounded) for a WARN line containing `needle`: the server logs after the
    /// client may already have seen the alert.
    async fn eventually_warns(&self, needle: &str) {
        for _ in 0..200 {
            if self.warnings().iter().any(|line| line.contains(needle)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no WARN line containing {needle:?} in:\n{}", self.text());
    }

    fn warnings(&self) -> Vec<String> {
        self.text()
            .lines()
            .filter(|line| line.contains(" WARN "))
            .map(str::to_owned)
            .collect()
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Accepted connections.

#[tokio::test]
async fn shared_mode_connects_and_handlers_see_the_client_certificate() {
    let certs = Certs::new();
    let cluster = certs.shared("cluster", Validity::Current);
    let addr = start_server(server_config(MtlsMode::Shared, &cluster).unwrap()).await;

    // Names are not checked in shared mode: the pin is the identity.
    for name in ["charter-cluster", "anything-else", "127.0.0.1"] {
        let client = client_config(MtlsMode::Shared, &cluster).unwrap();
        assert_eq!(
            connect_and_call(addr, client, name).await,
            Ok(cert_len(&cluster)),
            "server name {name}"
        );
    }
}

#[tokio::test]
async fn shared_mode_works_over_tls_1_2() {
    // TLS 1.2 takes the other signature path in the pinned verifiers, and refuses a client
    // certificate during the handshake rather than after it.
    let certs = Certs::new();
    let cluster = certs.shared("cluster", Validity::Current);
    let other = certs.shared("other", Validity::Current);
    let addr = start_server(server_config(MtlsMode::Shared, &cluster).unwrap()).await;
    let tls12 = &[&rustls::version::TLS12];

    let good = custom_client(Trust::Pinned(&cluster.cert), Some(&cluster), tls12);
    assert_eq!(
        connect_and_call(addr, good, "charter-cluster").await,
        Ok(cert_len(&cluster))
    );
    let wrong = custom_client(Trust::Pinned(&cluster.cert), Some(&other), tls12);
    let err = connect_and_call(addr, wrong, "charter-cluster")
        .await
        .unwrap_err();
    assert!(
        err.contains("server refused our certificate (alert AccessDenied)"),
        "{err}"
    );
}

#[tokio::test]
async fn pki_mode_connects_by_any_name_in_the_cp_certificate() {
    let certs = Certs::new();
    let ca = certs.ca("ca");
    let cp = certs.cp(&ca, "cp");
    let dp = certs.dp(&ca, "dp");
    let addr = start_server(server_config(MtlsMode::Pki, &cp).unwrap()).await;

    for name in ["charter-cp", "localhost", "127.0.0.1"] {
        let client = client_config(MtlsMode::Pki, &dp).unwrap();
        assert_eq!(
            connect_and_call(addr, client, name).await,
            Ok(cert_len(&dp)),
            "server name {name}"
        );
    }
}

#[tokio::test]
async fn insecure_mode_speaks_plaintext_http2() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        Server::builder()
            .add_service(ClusterServer::new(Echo))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let channel = connect_insecure(&addr.to_string()).await.unwrap();
    // No TLS, so no client certificate reaches the handler.
    assert_eq!(call(channel).await.map_err(|s| s.to_string()), Ok(0));
}

// ---------------------------------------------------------------------------------------
// Refused connections: what the client is told, and what the server logs.

/// A refusal: the client's error (from `connect` or the first call) contains `client`, and
/// the server logs a WARN containing `server`.
async fn check_refused(
    server: Arc<rustls::ServerConfig>,
    client: Arc<ClientConfig>,
    server_name: &str,
    expect_client: &str,
    expect_server: &str,
) {
    let (logs, _guard) = Logs::capture();
    let addr = start_server(server).await;
    let err = connect_and_call(addr, client, server_name)
        .await
        .expect_err("the connection should have been refused");
    assert!(
        err.contains(expect_client),
        "client error {err:?} should contain {expect_client:?}"
    );
    logs.eventually_warns(expect_server).await;
    let warning = logs.warnings().join("\n");
    assert!(warning.contains("peer=127.0.0.1:"), "{warning}");
}

#[tokio::test]
async fn shared_mode_refuses_a_client_without_certificate() {
    let certs = Certs::new();
    let cluster = certs.shared("cluster", Validity::Current);
    check_refused(
        server_config(MtlsMode::Shared, &cluster).unwrap(),
        custom_client(Trust::Pinned(&cluster.cert), None, rustls::ALL_VERSIONS),
        "charter-cluster",
        "server requires a certificate and none was sent",
        "client presented no certificate",
    )
    .await;
}

#[tokio::test]
async fn shared_mode_server_refuses_another_cluster_certificate() {
    // The client trusts the server (it pins the server's certificate) but presents a
    // certificate from another `gen-cert`.
    let certs = Certs::new();
    let cluster = certs.shared("cluster", Validity::Current);
    let other = certs.shared("other", Validity::Current);
    check_refused(
        server_config(MtlsMode::Shared, &cluster).unwrap(),
        custom_client(Trust::Pinned(&cluster.cert), Some(&other), rustls::ALL_VERSIONS),
        "charter-cluster",
        "server refused our certificate (alert AccessDenied): in shared mode: it is not the pinned cluster certificate",
        "client certificate is not the pinned cluster certificate",
    )
    .await;
}

#[tokio::test]
async fn shared_mode_client_refuses_another_cluster_certificate() {
    let certs = Certs::new();
    let cluster = certs.shared("cluster", Validity::Current);
    let other = certs.shared("other", Validity::Current);
    check_refused(
        server_config(MtlsMode::Shared, &cluster).unwrap(),
        client_config(MtlsMode::Shared, &other).unwrap(),
        "charter-cluster",
        "server certificate is not the pinned cluster certificate",
        "client refused our certificate (alert AccessDenied)",
    )
    .await;
}

#[tokio::test]
async fn shared_mode_refuses_an_expired_cluster_certificate() {
    let certs = Certs::new();
    let expired = certs.shared("cluster", Validity::Expired);
    check_refused(
        server_config(MtlsMode::Shared, &expired).unwrap(),
        client_config(MtlsMode::Shared, &expired).unwrap(),
        "charter-cluster",
        "server certificate is outside its validity period: certificate expired",
        "client refused our certificate (alert CertificateExpired)",
    )
    .await;
}

#[tokio::test]
async fn pki_mode_refuses_a_wrong_server_name() {
    let certs = Certs::new();
    let ca = certs.ca("ca");
    check_refused(
        server_config(MtlsMode::Pki, &certs.cp(&ca, "cp")).unwrap(),
        client_config(MtlsMode::Pki, &certs.dp(&ca, "dp")).unwrap(),
        "cp.example.com",
        "server certificate does not match --cluster-server-name: certificate not valid for name \"cp.example.com\"",
        "client refused our certificate (alert BadCertificate)",
    )
    .await;
}

#[tokio::test]
async fn pki_mode_refuses_a_dp_certificate_from_another_ca() {
    let certs = Certs::new();
    let ca = certs.ca("ca");
    let rogue_ca = certs.ca("rogue-ca");
    let mut rogue_dp = certs.dp(&rogue_ca, "rogue-dp");
    // The rogue DP trusts the real CA, so it accepts the CP; only the CP can refuse.
    rogue_dp.ca = Some(ca.path.clone());
    check_refused(
        server_config(MtlsMode::Pki, &certs.cp(&ca, "cp")).unwrap(),
        client_config(MtlsMode::Pki, &rogue_dp).unwrap(),
        "charter-cp",
        // Both CAs are called "Charter cluster CA", as every `gen-cert --ca` names its CA,
        // so the CP finds the name and then the signature fails.
        "server refused our certificate (alert DecryptError): a signature did not verify (in pki mode: is it signed by another CA?)",
        "client certificate is not signed by the trusted CA (BadSignature",
    )
    .await;
}

#[tokio::test]
async fn pki_mode_refuses_a_client_certificate_without_client_auth() {
    let certs = Certs::new();
    let ca = certs.ca("ca");
    let cp = certs.cp(&ca, "cp");
    check_refused(
        server_config(MtlsMode::Pki, &cp).unwrap(),
        // The CP's own certificate (serverAuth only) used as a DP certificate.
        client_config(MtlsMode::Pki, &cp).unwrap(),
        "charter-cp",
        "server refused our certificate (alert UnsupportedCertificate)",
        "client certificate is not made for this role",
    )
    .await;
}

#[tokio::test]
async fn pki_mode_refuses_a_server_certificate_without_server_auth() {
    let certs = Certs::new();
    let ca = certs.ca("ca");
    // A DP certificate (clientAuth only) used as the CP's certificate.
    let mut dp_as_cp = certs.issue(
        &ca,
        "dp-as-cp",
        &["charter-cp"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    dp_as_cp.ca = Some(ca.path.clone());
    check_refused(
        server_config(MtlsMode::Pki, &dp_as_cp).unwrap(),
        client_config(MtlsMode::Pki, &certs.dp(&ca, "dp")).unwrap(),
        "charter-cp",
        "server certificate is not made for this role",
        "client refused our certificate (alert UnsupportedCertificate)",
    )
    .await;
}

#[tokio::test]
async fn pki_mode_refuses_a_client_certificate_with_no_extended_key_usage() {
    let certs = Certs::new();
    let ca = certs.ca("ca");
    let bare = certs.issue_without_usage(&ca, "bare-dp", &["charter-dp"]);
    check_refused(
        server_config(MtlsMode::Pki, &certs.cp(&ca, "cp")).unwrap(),
        client_config(MtlsMode::Pki, &bare).unwrap(),
        "charter-cp",
        "server refused our certificate",
        "client certificate is not made for this role",
    )
    .await;
}

#[tokio::test]
async fn pki_mode_refuses_a_server_certificate_with_no_extended_key_usage() {
    let certs = Certs::new();
    let ca = certs.ca("ca");
    let bare = certs.issue_without_usage(&ca, "bare-cp", &["charter-cp"]);
    check_refused(
        server_config(MtlsMode::Pki, &bare).unwrap(),
        client_config(MtlsMode::Pki, &certs.dp(&ca, "dp")).unwrap(),
        "charter-cp",
        "server certificate is not made for this role",
        "client refused our certificate",
    )
    .await;
}

#[tokio::test]
async fn pki_mode_refuses_a_client_without_certificate() {
    let certs = Certs::new();
    let ca = certs.ca("ca");
    check_refused(
        server_config(MtlsMode::Pki, &certs.cp(&ca, "cp")).unwrap(),
        custom_client(Trust::Ca(&ca.path), None, rustls::ALL_VERSIONS),
        "charter-cp",
        "server requires a certificate and none was sent",
        "client presented no certificate",
    )
    .await;
}

#[tokio::test]
async fn incoming_keeps_serving_good_clients_around_bad_ones() {
    let (logs, _guard) = Logs::capture();
    let certs = Certs::new();
    let cluster = certs.shared("cluster", Validity::Current);
    let addr = start_server(server_config(MtlsMode::Shared, &cluster).unwrap()).await;
    let good = || client_config(MtlsMode::Shared, &cluster).unwrap();

    // A client that connects and says nothing holds no one up while it waits out its
    // handshake timeout.
    let _silent = TcpStream::connect(addr).await.unwrap();
    // A plaintext client (one side forgot --cluster-insecure, or the other added it).
    let mut plaintext = TcpStream::connect(addr).await.unwrap();
    plaintext
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    // A TCP probe: connects and closes. Not a failed handshake, so no warning.
    drop(TcpStream::connect(addr).await.unwrap());
    // A client without a certificate.
    let anonymous = custom_client(Trust::Pinned(&cluster.cert), None, rustls::ALL_VERSIONS);
    assert!(connect_and_call(addr, anonymous, "charter-cluster")
        .await
        .is_err());

    assert_eq!(
        connect_and_call(addr, good(), "charter-cluster").await,
        Ok(cert_len(&cluster))
    );
    logs.eventually_warns("client presented no certificate")
        .await;
    logs.eventually_warns("client did not speak TLS as expected")
        .await;
    // The server closes the plaintext connection rather than leaving it hanging.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(2), plaintext.read_to_end(&mut rest));
    assert!(read.await.is_ok(), "plaintext connection left open");
    assert_eq!(logs.warnings().len(), 2, "{}", logs.text());

    // Several good clients at once, all still served.
    logs.clear();
    let calls: Vec<_> = (0..5)
        .map(|_| tokio::spawn(connect_and_call(addr, good(), "charter-cluster")))
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), Ok(cert_len(&cluster)));
    }
    assert!(logs.warnings().is_empty(), "{}", logs.text());
}

#[tokio::test]
async fn a_flood_of_stalled_handshakes_does_not_keep_a_good_client_out() {
    let (logs, _guard) = Logs::capture();
    let certs = Certs::new();
    let cluster = certs.shared("cluster", Validity::Current);
    let addr = start_server(server_config(MtlsMode::Shared, &cluster).unwrap()).await;
    // More peers than handshakes are allowed at once, all connecting and saying nothing.
    let mut stalled = Vec::new();
    for _ in 0..300 {
        stalled.push(TcpStream::connect(addr).await.unwrap());
    }
    // Before the fix the good client waited behind them for the whole handshake timeout
    // (10 s); now the oldest stalled ones make room after a second.
    let good = client_config(MtlsMode::Shared, &cluster).unwrap();
    let call = tokio::time::timeout(
        HANDSHAKE_TIMEOUT - Duration::from_secs(2),
        connect_and_call(addr, good, "charter-cluster"),
    )
    .await;
    assert_eq!(call, Ok(Ok(cert_len(&cluster))));
    logs.eventually_warns("no TLS handshake yet, and others waiting")
        .await;
    drop(stalled);
}

// ---------------------------------------------------------------------------------------
// Configuration errors name what is wrong and where.

#[test]
fn bad_files_and_names_give_errors_that_say_what_and_where() {
    let certs = Certs::new();
    let cluster = certs.shared("cluster", Validity::Current);
    let other = certs.shared("other", Validity::Current);
    let ca = certs.ca("ca");
    let missing = certs.path("missing.crt");
    let garbage = certs.write("garbage.crt", "this is not a certificate\n");
    let truncated = certs.write("truncated.crt", "-----BEGIN CERTIFICATE-----\nMIIB\n");
    let files = |cert: &Path, key: &Path, ca: Option<&Path>| TlsFiles {
        cert: cert.to_owned(),
        key: key.to_owned(),
        ca: ca.map(Path::to_owned),
    };

    fn check(mode: MtlsMode, files: TlsFiles, expected: &[&str]) {
        let server = server_config(mode, &files)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        let client = client_config(mode, &files)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        for message in [server, client] {
            for part in expected {
                assert!(
                    message.contains(part),
                    "{message:?} should contain {part:?}"
                );
            }
        }
    }
    let shown = |path: &Path| path.display().to_string();

    check(
        MtlsMode::Shared,
        files(&missing, &cluster.key, None),
        &["cannot read", &shown(&missing), "No such file"],
    );
    check(
        MtlsMode::Shared,
        files(&garbage, &cluster.key, None),
        &["no certificate in", &shown(&garbage)],
    );
    check(
        MtlsMode::Shared,
        files(&truncated, &cluster.key, None),
        &[&shown(&truncated), "is not valid PEM", "no END line"],
    );
    // Certificate and key swapped.
    check(
        MtlsMode::Shared,
        files(&cluster.cert, &cluster.cert, None),
        &["no private key in", &shown(&cluster.cert)],
    );
    check(
        MtlsMode::Shared,
        files(&cluster.cert, &other.key, None),
        &[
            &shown(&cluster.cert),
            &shown(&other.key),
            "keys may not be consistent",
        ],
    );
    check(
        MtlsMode::Pki,
        files(&cluster.cert, &cluster.key, None),
        &["pki mode needs the cluster CA certificate (--cluster-ca-cert)"],
    );
    check(
        MtlsMode::Pki,
        files(&cluster.cert, &cluster.key, Some(&garbage)),
        &["no certificate in", &shown(&garbage)],
    );
    // The CA file itself is fine here; only the mode's needs differ.
    assert!(server_config(
        MtlsMode::Pki,
        &files(&cluster.cert, &cluster.key, Some(&ca.path))
    )
    .is_ok());
}

#[tokio::test]
async fn bad_addresses_and_names_are_refused_before_connecting() {
    let certs = Certs::new();
    let cluster = certs.shared("cluster", Validity::Current);
    let client = client_config(MtlsMode::Shared, &cluster).unwrap();

    let err = connect("127.0.0.1:1", client.clone(), "not a name!")
        .await
        .unwrap_err();
    assert!(matches!(err, TlsError::ServerName { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("`not a name!` is not a valid server name"),
        "{err}"
    );

    let err = connect("no spaces allowed:1", client.clone(), "charter-cluster")
        .await
        .unwrap_err();
    assert!(matches!(err, TlsError::Address { .. }), "{err}");

    // Nothing listens on a freshly closed port.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = connect(&format!("127.0.0.1:{port}"), client, "charter-cluster")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!(
            "cannot connect to the control plane at 127.0.0.1:{port}"
        )) && err.to_lowercase().contains("refused"),
        "{err}"
    );
}

#[test]
fn installing_the_default_provider_twice_is_harmless() {
    install_default_provider();
    install_default_provider();
    assert!(rustls::crypto::CryptoProvider::get_default().is_some());
}
