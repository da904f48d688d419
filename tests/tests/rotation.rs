//! Rotation without restarts: trusted signing keys, the cluster certificate and the admin
//! token file are re-read by running `charter-cp` and `charter-dp` processes when their
//! files change (a Kubernetes Secret update, symlink swap included) or on `SIGHUP`, and a
//! new set that does not load leaves the old one in force.

use std::fs;
use std::path::Path;
use std::time::Duration;

use charter_tests::{
    eventually, hangup, http_with_headers, run, Body, Cp, Dp, SecretMount, Vendor,
};
use serde_json::{json, Value};
use tempfile::TempDir;

/// Long enough for a poll of the files (every 2 s) on a busy machine.
const RELOAD: Duration = Duration::from_secs(20);

fn pem(vendor: &Vendor) -> Vec<u8> {
    fs::read(&vendor.public_key).expect("reading a public key")
}

fn id_of(record: &Value) -> String {
    record["id"].as_str().expect("id").to_owned()
}

/// How many lines of `log` contain every one of `needles`.
fn lines_with(log: &str, needles: &[&str]) -> usize {
    log.lines()
        .filter(|line| needles.iter().all(|n| line.contains(n)))
        .count()
}

fn wait_log(what: &str, log: impl Fn() -> String, needles: &[&str], count: usize) {
    eventually(what, RELOAD, || {
        (lines_with(&log(), needles) >= count).then_some(())
    });
}

fn ready(dp: &Dp) -> bool {
    dp.get("/status/ready").status == 200
}

#[test]
fn a_signing_key_rotates_across_a_running_cluster_with_no_gap() {
    let dir = TempDir::new().expect("temp dir");
    let old = Vendor::new(dir.path(), 51);
    let new = Vendor::new(dir.path(), 52);
    let mut keys = SecretMount::new(&dir.path().join("keys"), &[("trusted.pem", &pem(&old))]);
    let key_file = keys.path("trusted.pem");
    let cp = Cp::start(dir.path(), &["--trusted-key", &key_file.to_string_lossy()]);
    let dp = Dp::start(dir.path(), "dp", &cp, &key_file, &[]);
    let first = id_of(&cp.add(&old.valid("OLD-KEY")));
    dp.wait_license("the license signed with the old key", |l| {
        l["id"] == json!(first)
    });

    // Before the rotation the new key is not trusted.
    let refused = cp.send_json(
        "POST",
        "/licenses",
        &json!({ "payload": new.valid("TOO-EARLY") }),
    );
    assert_eq!(refused.status, 400, "{}", refused.body);

    // 1. Add the new key next to the old one, everywhere.
    let both = [pem(&old), pem(&new)].concat();
    keys.update(&[("trusted.pem", &both)]);
    let both_ids = format!("{},{}", old.key_id(), new.key_id());
    wait_log(
        "the CP to trust both keys",
        || cp.logs(),
        &["trusted signing keys reloaded", &both_ids],
        1,
    );
    wait_log(
        "the DP to trust both keys",
        || dp.logs(),
        &["trusted signing keys reloaded", &both_ids],
        1,
    );
    assert!(
        ready(&dp),
        "the data plane stays licensed while keys are added"
    );

    // 2. Sign with the new key and add the license: the data plane takes it.
    let second = id_of(&cp.add(&new.valid("NEW-KEY")));
    let license = dp.wait_license("the license signed with the new key", |l| {
        l["id"] == json!(second)
    });
    assert_eq!(license["key_id"], json!(new.key_id()), "{license}");
    assert_eq!(license["status"], "valid", "{license}");

    // 3. Remove the old key.
    keys.update(&[("trusted.pem", &pem(&new))]);
    let only_new = format!("trusted_keys={}", new.key_id());
    wait_log(
        "the CP to drop the old key",
        || cp.logs(),
        &["trusted signing keys reloaded", &only_new],
        1,
    );
    wait_log(
        "the DP to drop the old key",
        || dp.logs(),
        &["trusted signing keys reloaded", &only_new],
        1,
    );
    let refused = cp.send_json(
        "POST",
        "/licenses",
        &json!({ "payload": old.valid("OLD-AGAIN") }),
    );
    assert_eq!(
        refused.status, 400,
        "the old key is no longer trusted: {}",
        refused.body
    );
    // The stored license signed with the old key no longer verifies; the new one is in
    // force on both sides, with no restart and no moment unlicensed.
    eventually(
        "the old license to be verified again and ignored",
        RELOAD,
        || {
            let status = cp.get("/license/status").json();
            status["warnings"]
                .to_string()
                .contains("1 stored license(s) do not verify against the trusted keys")
                .then_some(())
        },
    );
    assert!(ready(&dp));
    assert_eq!(dp.license()["id"], json!(second));
    for log in [cp.logs(), dp.logs()] {
        assert_eq!(
            lines_with(&log, &["cannot reload"]),
            0,
            "every reload loaded:\n{log}"
        );
    }
}

#[test]
fn the_cluster_certificate_swaps_under_a_running_cluster() {
    let dir = TempDir::new().expect("temp dir");
    let vendor = Vendor::new(dir.path(), 53);
    let old_certs = charter_tests::cluster_certs(dir.path());
    let new_certs = dir.path().join("certs-new");
    let made = run(
        "charterctl",
        &["gen-cert", "--out-dir", &new_certs.to_string_lossy()],
    );
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let files = |certs: &Path| {
        [
            fs::read(certs.join("cluster.crt")).expect("reading a certificate"),
            fs::read(certs.join("cluster.key")).expect("reading a key"),
        ]
    };
    let [crt, key] = files(&old_certs);
    let mut tls = SecretMount::new(
        &dir.path().join("tls"),
        &[("cluster.crt", &crt), ("cluster.key", &key)],
    );
    let cp = Cp::start(
        dir.path(),
        &[
            "--trusted-key",
            &vendor.public_key.to_string_lossy(),
            "--cluster-cert",
            &tls.path("cluster.crt").to_string_lossy(),
            "--cluster-cert-key",
            &tls.path("cluster.key").to_string_lossy(),
        ],
    );
    let running = Dp::start_at(
        dir.path(),
        "running",
        &[cp.cluster_addr],
        &old_certs,
        &vendor.public_key,
        &[],
    );
    let first = id_of(&cp.add(&vendor.valid("FIRST")));
    running.wait_license("the first license", |l| l["id"] == json!(first));

    let [crt, key] = files(&new_certs);
    tls.update(&[("cluster.crt", &crt), ("cluster.key", &key)]);
    wait_log(
        "the CP to load the new certificate",
        || cp.logs(),
        &["reloaded the cluster certificate"],
        1,
    );

    // A data plane with the new certificate connects.
    let joining = Dp::start_at(
        dir.path(),
        "joining",
        &[cp.cluster_addr],
        &new_certs,
        &vendor.public_key,
        &[],
    );
    joining.wait_license("the first license over the new certificate", |l| {
        l["id"] == json!(first)
    });
    // The running data plane's stream stayed up: it gets the next license over it.
    let second = id_of(&cp.add(&vendor.valid("SECOND")));
    for dp in [&running, &joining] {
        dp.wait_license("the second license", |l| l["id"] == json!(second));
    }
    assert_eq!(
        running.get("/status").json()["control_plane"]["connected"],
        true
    );
    assert_eq!(
        lines_with(&running.logs(), &["connected to the control plane"]),
        1,
        "the running data plane never reconnected:\n{}",
        running.logs()
    );
    // A data plane still holding the old certificate is refused now.
    let _late = Dp::start_at(
        dir.path(),
        "late",
        &[cp.cluster_addr],
        &old_certs,
        &vendor.public_key,
        &[],
    );
    wait_log(
        "the CP to refuse the old certificate",
        || cp.logs(),
        &["cluster TLS handshake failed"],
        1,
    );
}

#[test]
fn sighup_reloads_and_a_broken_file_keeps_the_old_set() {
    let dir = TempDir::new().expect("temp dir");
    let vendor = Vendor::new(dir.path(), 54);
    let tokens = dir.path().join("tokens");
    fs::write(&tokens, "first-token write\n").expect("writing tokens");
    let cp = Cp::start(
        dir.path(),
        &[
            "--trusted-key",
            &vendor.public_key.to_string_lossy(),
            "--admin-token-file",
            &tokens.to_string_lossy(),
        ],
    );
    let dp = Dp::start(dir.path(), "dp", &cp, &vendor.public_key, &[]);
    let with = |token: &str| {
        http_with_headers(
            "GET",
            &cp.url("/licenses"),
            None,
            &[("Kong-Admin-Token", token)],
        )
        .expect("GET /licenses")
        .status
    };
    assert_eq!(with("first-token"), 200);

    // SIGHUP reloads, even with nothing changed, and ends neither process.
    hangup(cp.pid().expect("cp pid"));
    hangup(dp.pid().expect("dp pid"));
    wait_log(
        "the CP to reload on SIGHUP",
        || cp.logs(),
        &["reloaded the admin tokens", "SIGHUP"],
        1,
    );
    wait_log(
        "the CP to reload its keys on SIGHUP",
        || cp.logs(),
        &["reloaded the trusted keys", "SIGHUP"],
        1,
    );
    wait_log(
        "the DP to reload on SIGHUP",
        || dp.logs(),
        &["reloaded the trusted keys", "SIGHUP"],
        1,
    );
    wait_log(
        "the DP to reload its certificate on SIGHUP",
        || dp.logs(),
        &["reloaded the cluster certificate", "SIGHUP"],
        1,
    );
    assert_eq!(with("first-token"), 200, "the CP still serves after SIGHUP");
    assert_eq!(
        dp.get("/status").status,
        200,
        "the DP still serves after SIGHUP"
    );

    // A new token file takes effect, on SIGHUP as soon as it is sent.
    fs::write(&tokens, "second-token write\n").expect("writing tokens");
    hangup(cp.pid().expect("cp pid"));
    eventually("the new token to work", Duration::from_secs(20), || {
        (with("second-token") == 200).then_some(())
    });
    assert_eq!(with("first-token"), 401, "the old token is gone");

    // A broken file is refused with an ERROR and the set in use stays.
    fs::write(&tokens, "not a token line at all\n").expect("writing tokens");
    wait_log(
        "the CP to refuse the broken token file",
        || cp.logs(),
        &["ERROR", "cannot reload the admin tokens"],
        1,
    );
    assert_eq!(with("second-token"), 200, "the tokens in use stay");
    fs::write(
        &vendor.public_key,
        "-----BEGIN PUBLIC KEY-----\nbroken\n-----END PUBLIC KEY-----\n",
    )
    .expect("breaking the key file");
    wait_log(
        "the CP to refuse the broken key file",
        || cp.logs(),
        &["ERROR", "cannot reload the trusted keys"],
        1,
    );
    wait_log(
        "the DP to refuse the broken key file",
        || dp.logs(),
        &["ERROR", "cannot reload the trusted keys"],
        1,
    );
    // Both still verify with the key they had: a license signed with it is taken.
    let added = http_with_headers(
        "POST",
        &cp.url("/licenses"),
        Some(Body::Json(
            json!({ "payload": vendor.valid("AFTER-BREAK") }),
        )),
        &[("Kong-Admin-Token", "second-token")],
    )
    .expect("POST /licenses");
    assert_eq!(added.status, 201, "{}", added.body);
    let id = id_of(&added.json());
    dp.wait_license("the license added after the broken file", |l| {
        l["id"] == json!(id)
    });
}

/// The value of `charter_cluster_cert_expiry_timestamp_seconds` in a `/metrics` body.
fn cert_expiry(metrics: &str) -> Option<i64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("charter_cluster_cert_expiry_timestamp_seconds "))
        .and_then(|v| v.trim().parse().ok())
}

/// A shared-mode cluster certificate and key (PEM) valid until `not_after` (Unix seconds).
fn expiring_cert(not_after: i64) -> (Vec<u8>, Vec<u8>) {
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair};
    let at = |unix: i64| time::OffsetDateTime::from_unix_timestamp(unix).expect("a time");
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec!["charter-cluster".to_owned()]).expect("params");
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = at(not_after - 60 * 86_400);
    params.not_after = at(not_after);
    let cert = params.self_signed(&key).expect("self-signed");
    (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
}

#[test]
fn the_certificate_expiry_watch_follows_a_rotated_certificate() {
    let dir = TempDir::new().expect("temp dir");
    let vendor = Vendor::new(dir.path(), 55);
    let certs = dir.path().join("certs-3y");
    let made = run(
        "charterctl",
        &["gen-cert", "--out-dir", &certs.to_string_lossy()],
    );
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let read = |name: &str| fs::read(certs.join(name)).expect("reading a cert file");
    let mut tls = SecretMount::new(
        &dir.path().join("tls"),
        &[
            ("cluster.crt", &read("cluster.crt")),
            ("cluster.key", &read("cluster.key")),
        ],
    );
    let (crt, key) = (tls.path("cluster.crt"), tls.path("cluster.key"));
    let tls_args = [
        "--cluster-cert",
        &*crt.to_string_lossy(),
        "--cluster-cert-key",
        &*key.to_string_lossy(),
    ]
    .map(str::to_owned);
    let tls_args: Vec<&str> = tls_args.iter().map(String::as_str).collect();
    let mut cp_args = vec!["--trusted-key", vendor.public_key.to_str().expect("utf-8")];
    cp_args.extend(&tls_args);
    let cp = Cp::start(dir.path(), &cp_args);
    let dp = Dp::start_at(
        dir.path(),
        "dp",
        &[cp.cluster_addr],
        &certs,
        &vendor.public_key,
        &tls_args,
    );
    let first = id_of(&cp.add(&vendor.valid("CERT-ROTATION")));
    dp.wait_license("the license", |l| l["id"] == json!(first));
    let before = cert_expiry(&cp.get("/metrics").body).expect("the CP exports the expiry");
    assert_eq!(cert_expiry(&dp.get("/metrics").body), Some(before));
    for log in [cp.logs(), dp.logs()] {
        assert_eq!(
            lines_with(&log, &["the cluster certificate expires soon"]),
            0
        );
    }

    // Rotate to a certificate that expires in 10 days (whole seconds).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let not_after = now + 10 * 86_400;
    assert_ne!(not_after, before);
    let (new_crt, new_key) = expiring_cert(not_after);
    tls.update(&[("cluster.crt", &new_crt), ("cluster.key", &new_key)]);
    for (side, metrics) in [
        (
            "CP",
            Box::new(|| cp.get("/metrics").body) as Box<dyn Fn() -> String>,
        ),
        ("DP", Box::new(|| dp.get("/metrics").body)),
    ] {
        eventually(&format!("the {side}'s metric to follow"), RELOAD, || {
            (cert_expiry(&metrics()) == Some(not_after)).then_some(())
        });
    }
    // And the warnings: the new certificate expires within 30 days.
    for (side, log) in [
        ("CP", Box::new(|| cp.logs()) as Box<dyn Fn() -> String>),
        ("DP", Box::new(|| dp.logs())),
    ] {
        wait_log(
            &format!("the {side} to warn of the new certificate"),
            log,
            &[
                "WARN",
                "the cluster certificate expires soon",
                "days_left=9",
            ],
            1,
        );
    }
    // The cluster still works over the new certificate.
    let second = id_of(&cp.add(&vendor.valid("CERT-ROTATION-2")));
    dp.wait_license("the second license", |l| l["id"] == json!(second));
}

/// This data plane's row in the control plane's inventory.
fn inventory_row(cp: &Cp) -> Value {
    let rows = cp.get("/clustering/data-planes").json();
    rows["data"][0].clone()
}

#[test]
fn a_data_plane_judges_its_license_again_when_its_keys_change() {
    let dir = TempDir::new().expect("temp dir");
    let old = Vendor::new(dir.path(), 56);
    let new = Vendor::new(dir.path(), 57);
    let newest = Vendor::new(dir.path(), 58);
    // The control plane trusts all three keys from the start; only the data plane's keys
    // change.
    let cp_keys = dir.path().join("cp-trusted.pem");
    fs::write(&cp_keys, [pem(&old), pem(&new), pem(&newest)].concat()).expect("cp keys");
    let cp = Cp::start(dir.path(), &["--trusted-key", &cp_keys.to_string_lossy()]);
    let mut keys = SecretMount::new(&dir.path().join("dp-keys"), &[("trusted.pem", &pem(&old))]);
    let dp = Dp::start(dir.path(), "dp", &cp, &keys.path("trusted.pem"), &[]);
    let first = id_of(&cp.add(&old.valid("OLD-KEY")));
    dp.wait_license("the license signed with the old key", |l| {
        l["id"] == json!(first) && l["status"] == "valid"
    });

    // 1. The old key is removed from the data plane: the license it holds no longer
    // verifies, so it is no longer in force, as at start-up with these keys.
    keys.update(&[("trusted.pem", &pem(&new))]);
    let license = dp.wait_license("the license to be refused", |l| l["status"] == "unlicensed");
    assert!(license["id"].is_null(), "{license}");
    assert_eq!(dp.get("/status/ready").status, 503);
    wait_log(
        "the DP to say why",
        || dp.logs(),
        &[
            "ERROR",
            "the license held is refused by the trusted keys now loaded",
        ],
        1,
    );
    // Its Ack tells the control plane.
    eventually("the inventory to show the refusal", RELOAD, || {
        let row = inventory_row(&cp);
        (row["license_status"] == "unlicensed" && row["sync_status"] == "rejected").then_some(())
    });

    // 2. A license signed with a key the data plane does not trust yet is refused...
    let third = id_of(&cp.add(&newest.valid("NEWEST-KEY")));
    wait_log(
        "the DP to refuse the license of the untrusted key",
        || dp.logs(),
        &["license from the control plane refused", "validation_fail"],
        2,
    );
    assert_eq!(dp.license()["status"], "unlicensed");
    // ... and taken once the key is added, with no new snapshot and no reconnection.
    keys.update(&[("trusted.pem", &[pem(&new), pem(&newest)].concat())]);
    let license = dp.wait_license("the license of the newly trusted key", |l| {
        l["id"] == json!(third) && l["status"] == "valid"
    });
    assert_eq!(license["key_id"], json!(newest.key_id()), "{license}");
    assert_eq!(dp.get("/status/ready").status, 200);
    eventually("the inventory to show it in force", RELOAD, || {
        let row = inventory_row(&cp);
        (row["license_id"] == json!(third) && row["sync_status"] == "in_sync").then_some(())
    });
    assert_eq!(
        lines_with(&dp.logs(), &["connected to the control plane"]),
        1,
        "the data plane never reconnected:\n{}",
        dp.logs()
    );
}
