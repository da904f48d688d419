//! The data plane over mutual TLS (`shared` mode): it syncs with a control plane that
//! holds the same cluster certificate, and reports a clear error for another one.

mod common;

use std::path::Path;
use std::sync::Arc;

use charter_dp::Transport;
use charter_license::FixedClock;
use charter_tls::{MtlsMode, TlsFiles};
use common::*;
use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair};
use tempfile::TempDir;

/// A self-signed cluster certificate like `charterctl gen-cert` makes.
fn cluster_cert(dir: &Path, tag: &str) -> TlsFiles {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["charter-cluster".to_owned()]).unwrap();
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.self_signed(&key).unwrap();
    let files = TlsFiles {
        cert: dir.join(format!("{tag}.crt")),
        key: dir.join(format!("{tag}.key")),
        ca: None,
    };
    std::fs::write(&files.cert, cert.pem()).unwrap();
    std::fs::write(&files.key, key.serialize_pem()).unwrap();
    files
}

fn shared(files: TlsFiles) -> Transport {
    Transport::Tls {
        mode: MtlsMode::Shared,
        files,
        server_name: charter_dp::config::SHARED_SERVER_NAME.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_data_plane_syncs_over_mutual_tls_with_the_shared_certificate() {
    charter_tls::install_default_provider();
    let dir = TempDir::new().unwrap();
    let certs = cluster_cert(dir.path(), "cluster");
    let cp = FakeCp::start_tls(&certs).await;
    let vendor = signer(1);
    let doc = license(&vendor, "key-1", "2026-01-01", "2099-12-31", &[]);
    cp.on_connect(snapshot("epoch", 1, "lic-1", &doc));

    let mut config = config(&cp.address(), &dir.path().join("dp"), keys(&vendor));
    config.transport = shared(certs);
    let dp = Dp::start(config, Arc::new(FixedClock::new(MARCH_2026))).await;
    let ack = cp.ack(1).await;
    assert!(ack.accepted, "{ack:?}");
    let l = dp.license().await;
    assert_eq!(
        (l["source"].as_str(), l["id"].as_str()),
        (Some("cluster"), Some("lic-1"))
    );
    dp.stop().await.unwrap();
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn another_cluster_certificate_is_refused_with_a_clear_error() {
    charter_tls::install_default_provider();
    let dir = TempDir::new().unwrap();
    let cp = FakeCp::start_tls(&cluster_cert(dir.path(), "cluster")).await;
    let vendor = signer(1);
    let mut config = config(&cp.address(), &dir.path().join("dp"), keys(&vendor));
    config.transport = shared(cluster_cert(dir.path(), "other"));
    let dp = Dp::start(config, Arc::new(FixedClock::new(MARCH_2026))).await;
    let status = eventually("a TLS error in /status", WAIT, || async {
        let (_, status) = dp.get("/status").await;
        (!status["control_plane"]["last_error"].is_null()).then_some(status)
    })
    .await;
    let error = status["control_plane"]["last_error"].as_str().unwrap();
    assert!(error.contains("pinned cluster certificate"), "{error}");
    assert_eq!(status["control_plane"]["connected"], false);
    assert!(cp.hellos().is_empty(), "no Hello gets through");
    dp.stop().await.unwrap();
    cp.stop().await;
}
