//! Both sides watch their own cluster certificate: a certificate that expires within 30
//! days is logged at start as a warning naming the date, and both `/metrics` export its
//! `notAfter` as `charter_cluster_cert_expiry_timestamp_seconds`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use charter_tests::{eventually, Cp, Dp, Vendor};
use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair};
use serde_json::json;
use tempfile::TempDir;

#[test]
fn a_cluster_certificate_expiring_soon_is_logged_and_exported_on_both_sides() {
    let tmp = TempDir::new().expect("temp dir");
    // A shared-mode cluster certificate, valid for 10 more days (whole seconds).
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let not_after = now + 10 * 86_400;
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec!["charter-cluster".to_owned()]).expect("params");
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = time_of(now - 86_400);
    params.not_after = time_of(not_after);
    let cert = params.self_signed(&key).expect("self-signed");
    let certs = tmp.path().join("certs");
    std::fs::create_dir_all(&certs).expect("certs dir");
    std::fs::write(certs.join("cluster.crt"), cert.pem()).expect("cert");
    std::fs::write(certs.join("cluster.key"), key.serialize_pem()).expect("key");

    let vendor = Vendor::new(tmp.path(), 13);
    let cp = Cp::start(
        tmp.path(),
        &["--trusted-key", vendor.public_key.to_str().expect("utf-8")],
    );
    let post = cp.send_json(
        "POST",
        "/licenses",
        &json!({"payload": vendor.valid("CERT-1")}),
    );
    assert_eq!(post.status, 201, "{}", post.body);
    let dp = Dp::start(tmp.path(), "dp", &cp, &vendor.public_key, &[]);
    dp.wait_license("the license over the expiring certificate", |l| {
        l["status"] == "valid"
    });

    let line = format!("charter_cluster_cert_expiry_timestamp_seconds {not_after}");
    let cp_metrics = cp.get("/metrics").body;
    assert!(cp_metrics.contains(&line), "{cp_metrics}");
    let dp_metrics = dp.get("/metrics").body;
    assert!(dp_metrics.contains(&line), "{dp_metrics}");

    for (side, logs) in [("CP", cp.logs()), ("DP", dp.logs())] {
        let line = logs
            .lines()
            .find(|l| l.contains("WARN") && l.contains("the cluster certificate expires soon"))
            .unwrap_or_else(|| panic!("no expiry warning in the {side} log:\n{logs}"));
        let days_left: i64 = line
            .split("days_left=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no days_left in {line}"));
        assert!((9..=10).contains(&days_left), "{side}: {line}");
    }
    // A plaintext cluster port has no certificate: no expiry to export.
    let plain_dir = tmp.path().join("plain");
    std::fs::create_dir_all(&plain_dir).expect("dir");
    let plain = Cp::start(
        &plain_dir,
        &[
            "--cluster-insecure",
            "--trusted-key",
            vendor.public_key.to_str().expect("utf-8"),
        ],
    );
    eventually("plain /metrics", Duration::from_secs(5), || {
        let body = plain.get("/metrics").body;
        body.contains("charter_licenses_stored").then_some(())
    });
    assert!(!plain
        .get("/metrics")
        .body
        .contains("charter_cluster_cert_expiry_timestamp_seconds"));
}

fn time_of(unix: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix).expect("a representable time")
}
