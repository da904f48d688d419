//! End-to-end tests of a real cluster: `charter-cp` and `charter-dp` processes over
//! mTLS gRPC on loopback, with real sled stores and real caches in temp dirs.

use std::process::{Command, Stdio};
use std::time::Duration;

use charter_tests::{eventually, Cp, Dp, Vendor};
use serde_json::{json, Value};
use tempfile::TempDir;

fn setup() -> (TempDir, Vendor, Cp) {
    let dir = TempDir::new().expect("temp dir");
    let vendor = Vendor::new(dir.path(), 31);
    let key = vendor.public_key.to_string_lossy().into_owned();
    let cp = Cp::start(dir.path(), &["--trusted-key", &key]);
    (dir, vendor, cp)
}

fn id_of(record: &Value) -> String {
    record["id"].as_str().expect("id").to_owned()
}

fn shows(id: &str) -> impl Fn(&Value) -> bool + '_ {
    move |license| license["id"] == json!(id)
}

fn unlicensed(license: &Value) -> bool {
    license["status"] == "unlicensed"
}

fn data_planes(cp: &Cp) -> Vec<Value> {
    let resp = cp.get("/clustering/data-planes");
    assert_eq!(resp.status, 200, "{}", resp.body);
    resp.json()["data"].as_array().expect("data").clone()
}

#[test]
fn propagation_to_two_data_planes_newest_wins_and_deletes_fall_back() {
    let (dir, vendor, cp) = setup();
    let dp1 = Dp::start(
        dir.path(),
        "dp1",
        &cp,
        &vendor.public_key,
        &["--label", "zone=a"],
    );
    let dp2 = Dp::start(dir.path(), "dp2", &cp, &vendor.public_key, &[]);
    assert_eq!(
        dp1.get("/status/ready").status,
        503,
        "not ready before a license"
    );
    for dp in [&dp1, &dp2] {
        dp.wait_license("unlicensed", unlicensed);
    }

    let first = id_of(&cp.add(&vendor.valid("FIRST")));
    for dp in [&dp1, &dp2] {
        let license = dp.wait_license("the first license", shows(&first));
        assert_eq!(license["source"], "cluster");
        assert_eq!(license["status"], "valid");
        assert_eq!(license["key_id"], json!(vendor.key_id()));
        assert_eq!(license["payload"]["license_key"], "FIRST");
    }
    assert_eq!(dp1.get("/status/ready").status, 200);

    // A newer updated_at wins.
    std::thread::sleep(Duration::from_millis(1100));
    let second = id_of(&cp.add(&vendor.valid("SECOND")));
    for dp in [&dp1, &dp2] {
        dp.wait_license("the second license", shows(&second));
    }
    let planes = eventually("both data planes in sync", Duration::from_secs(10), || {
        let planes = data_planes(&cp);
        (planes.len() == 2
            && planes
                .iter()
                .all(|p| p["sync_status"] == "in_sync" && p["license_id"] == json!(second)))
        .then_some(planes)
    });
    let labelled = planes
        .iter()
        .find(|p| p["labels"]["zone"] == "a")
        .expect("dp1 with its label");
    assert_eq!(labelled["license_status"], "valid");
    assert!(labelled["ip"].as_str().expect("ip").starts_with("127."));
    assert!(labelled["last_seen"].as_i64() > Some(0));
    let report = cp.get("/license/report").json();
    assert_eq!(report["deployment_info"]["connected_dp_count"], 2);
    // The license allows one data plane; two are connected.
    assert!(cp.get("/license/status").json()["warnings"]
        .to_string()
        .contains("2 data planes are connected but the license allows 1"));

    // Deleting the newest falls back to the previous one.
    assert_eq!(
        cp.send("DELETE", &format!("/licenses/{second}")).status,
        204
    );
    for dp in [&dp1, &dp2] {
        dp.wait_license("the first license again", shows(&first));
    }
    // Deleting all makes the data planes unlicensed.
    assert_eq!(cp.send("DELETE", &format!("/licenses/{first}")).status, 204);
    for dp in [&dp1, &dp2] {
        dp.wait_license("unlicensed", unlicensed);
        assert_eq!(dp.get("/status/ready").status, 503);
    }
}

#[test]
fn data_planes_keep_enforcing_without_the_control_plane() {
    let (dir, vendor, mut cp) = setup();
    let mut dp = Dp::start(dir.path(), "dp", &cp, &vendor.public_key, &[]);
    let first = id_of(&cp.add(&vendor.valid("CACHED")));
    dp.wait_license("the license", shows(&first));

    // The CP goes away: the DP keeps enforcing.
    cp.kill();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(dp.license()["id"], json!(first));
    assert_eq!(dp.get("/status/ready").status, 200);
    eventually(
        "the DP to notice the CP is gone",
        Duration::from_secs(15),
        || (dp.get("/status").json()["control_plane"]["connected"] == false).then_some(()),
    );

    // A DP restarted while the CP is down boots from its cache.
    dp.restart();
    let license = dp.license();
    assert_eq!(
        (license["id"].clone(), license["source"].clone()),
        (json!(first), json!("cache"))
    );
    assert_eq!(dp.get("/status/ready").status, 200);

    // The CP restarted on its data dir is rejoined, and new changes flow.
    cp.restart();
    std::thread::sleep(Duration::from_millis(1100));
    let second = id_of(&cp.add(&vendor.valid("AFTER-RESTART")));
    let license = dp.wait_license("the license added after the CP restart", shows(&second));
    assert_eq!(license["source"], "cluster");
}

#[test]
fn a_tampered_cache_is_refused() {
    let (dir, vendor, cp) = setup();
    let mut dp = Dp::start(dir.path(), "dp", &cp, &vendor.public_key, &[]);
    let id = id_of(&cp.add(&vendor.valid("TAMPER-ME")));
    dp.wait_license("the license", shows(&id));
    drop(cp);
    dp.kill();
    let cache = std::fs::read_dir(&dp.data_dir)
        .expect("data dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| std::fs::read_to_string(p).is_ok_and(|t| t.contains("TAMPER-ME")))
        .expect("a cache file holding the license");
    let text = std::fs::read_to_string(&cache).expect("read cache");
    std::fs::write(&cache, text.replace("TAMPER-ME", "TAMPERED!")).expect("tamper");
    dp.restart();
    let license = dp.license();
    assert_eq!(
        license["status"], "unlicensed",
        "a tampered cache must not be used: {license}"
    );
    assert_eq!(dp.get("/status/ready").status, 503);
    assert!(
        dp.logs().contains("validation_fail"),
        "the refusal is logged with its code: {}",
        dp.logs()
    );
}

#[test]
fn a_data_plane_that_does_not_trust_the_key_nacks_and_stays_unlicensed() {
    let (dir, vendor, cp) = setup();
    let stranger = Vendor::new(dir.path(), 77);
    let dp = Dp::start(dir.path(), "dp", &cp, &stranger.public_key, &[]);
    cp.add(&vendor.valid("NOT-FOR-YOU"));
    let plane = eventually("the NACK in the inventory", Duration::from_secs(10), || {
        data_planes(&cp).into_iter().find(|p| {
            p["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("validation_fail"))
        })
    });
    assert_eq!(plane["sync_status"], "rejected");
    assert_eq!(dp.license()["status"], "unlicensed");
    assert_eq!(dp.get("/status/ready").status, 503);
}

#[test]
fn mtls_refuses_a_foreign_certificate() {
    let (dir, vendor, cp) = setup();
    // A certificate from another `gen-cert`.
    let other = charter_tests::cluster_certs(&dir.path().join("other"));
    let dp = Dp::start(
        dir.path(),
        "dp",
        &cp,
        &vendor.public_key,
        &charter_tests::shared_tls_args(&other)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    cp.add(&vendor.valid("SECRET"));
    eventually(
        "a handshake failure in both logs",
        Duration::from_secs(15),
        || {
            let (cp_log, dp_log) = (cp.logs().to_lowercase(), dp.logs().to_lowercase());
            (cp_log.contains("handshake")
                && (dp_log.contains("certificate") || dp_log.contains("handshake")))
            .then_some(())
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        dp.license()["status"],
        "unlicensed",
        "no license delivered over a refused connection"
    );
    assert!(
        data_planes(&cp).is_empty(),
        "a refused peer never reaches the inventory"
    );
}

#[test]
fn mtls_refuses_a_client_without_a_certificate() {
    let (_dir, _vendor, cp) = setup();
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &cp.cluster_addr.to_string(),
            "-alpn",
            "h2",
            "-CAfile",
        ])
        .arg(cp.certs.join("cluster.crt"))
        .stdin(Stdio::null())
        .output()
        .expect("running openssl s_client");
    let _ = out;
    eventually(
        "the CP to log the certificate-less client",
        Duration::from_secs(10),
        || {
            let log = cp.logs().to_lowercase();
            log.contains("presented no certificate").then_some(())
        },
    );
}

#[test]
fn pki_mode_checks_the_server_name() {
    let dir = TempDir::new().expect("temp dir");
    let vendor = Vendor::new(dir.path(), 41);
    let certs = charter_tests::cluster_certs(dir.path());
    let path = |name: &str| certs.join(name).to_string_lossy().into_owned();
    let key = vendor.public_key.to_string_lossy().into_owned();
    let cp = Cp::start(
        dir.path(),
        &[
            "--trusted-key",
            &key,
            "--cluster-mtls",
            "pki",
            "--cluster-cert",
            &path("cp.crt"),
            "--cluster-cert-key",
            &path("cp.key"),
            "--cluster-ca-cert",
            &path("ca.crt"),
        ],
    );
    let id = id_of(&cp.add(&vendor.valid("PKI")));
    let dp_args = |name: &'static str| -> Vec<String> {
        vec![
            "--cluster-mtls".into(),
            "pki".into(),
            "--cluster-cert".into(),
            path("dp.crt"),
            "--cluster-cert-key".into(),
            path("dp.key"),
            "--cluster-ca-cert".into(),
            path("ca.crt"),
            "--cluster-server-name".into(),
            name.into(),
        ]
    };
    let wrong = dp_args("not-the-cp.example");
    let wrong_dp = Dp::start(
        dir.path(),
        "wrong",
        &cp,
        &vendor.public_key,
        &wrong.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let right = dp_args("charter-cp");
    let right_dp = Dp::start(
        dir.path(),
        "right",
        &cp,
        &vendor.public_key,
        &right.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    right_dp.wait_license("the license over pki mTLS", shows(&id));
    eventually(
        "the wrong server name in the DP log",
        Duration::from_secs(15),
        || {
            wrong_dp
                .logs()
                .to_lowercase()
                .contains("not-the-cp.example")
                .then_some(())
        },
    );
    assert_eq!(wrong_dp.license()["status"], "unlicensed");
}

/// The license key of the license in the DP's cache file, verified with the vendor key.
fn cached_license_key(dp: &Dp, vendor: &Vendor) -> String {
    fn find_payload(value: &Value) -> Option<String> {
        match value {
            Value::Object(map) => map
                .get("payload")
                .and_then(Value::as_str)
                .filter(|p| p.contains("\"license\""))
                .map(str::to_owned)
                .or_else(|| map.values().find_map(find_payload)),
            _ => None,
        }
    }
    let cache = std::fs::read_dir(&dp.data_dir)
        .expect("data dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| std::fs::read_to_string(p).is_ok_and(|t| t.contains("KILL-")))
        .expect("a cache file");
    let text = std::fs::read_to_string(&cache).expect("read cache");
    let value: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("torn cache {}: {e}: {text}", cache.display()));
    let payload = find_payload(&value).expect("a license in the cache");
    let pem = std::fs::read_to_string(&vendor.public_key).expect("key");
    let keys = charter_license::TrustedKeys::new([
        charter_license::TrustedKey::from_pem(&pem).expect("key")
    ]);
    let verified = keys
        .verify_text(&payload)
        .expect("the cached license verifies");
    verified.terms.license_key
}

#[test]
fn cache_survives_sigkill_during_updates() {
    let (dir, vendor, cp) = setup();
    let mut dp = Dp::start(dir.path(), "dp", &cp, &vendor.public_key, &[]);
    let first = id_of(&cp.add(&vendor.valid("KILL-0")));
    dp.wait_license("the first license", shows(&first));
    let mut held = 0;
    for cycle in 1..=20u64 {
        // Change the license in force, and kill the DP while it may be writing its cache.
        cp.add(&vendor.valid(&format!("KILL-{cycle}")));
        std::thread::sleep(Duration::from_millis(cycle * 7 % 40));
        dp.kill();
        let key = cached_license_key(&dp, &vendor);
        let n: u64 = key
            .trim_start_matches("KILL-")
            .parse()
            .expect("a KILL-n key");
        assert!(
            n == cycle || n == held,
            "cycle {cycle}: the cache holds {key}, neither the old (KILL-{held}) nor the new one"
        );
        dp.restart();
        dp.wait_license("the newest license", |l| {
            l["payload"]["license_key"] == json!(format!("KILL-{cycle}"))
        });
        held = cycle;
    }
}

#[test]
fn an_older_stream_of_a_reconnected_data_plane_does_not_mark_it_disconnected() {
    let (dir, vendor, cp) = setup();
    let mut first = Dp::start(dir.path(), "first", &cp, &vendor.public_key, &[]);
    // Killed, not stopped: its connection just goes away, as when a node dies.
    first.wait_license("unlicensed", unlicensed);
    let node = eventually(
        "the data plane in the inventory",
        Duration::from_secs(20),
        || {
            data_planes(&cp)
                .first()
                .filter(|p| p["sync_status"] == "in_sync")
                .map(|p| p["id"].as_str().expect("id").to_owned())
        },
    );
    // A second process with the same node id: the control plane's registration of the
    // node moves to the new stream, as when a data plane reconnects while its old
    // connection has not been noticed as gone yet.
    let second_dir = dir.path().join("second-data");
    std::fs::create_dir_all(&second_dir).expect("data dir");
    std::fs::copy(first.data_dir.join("node-id"), second_dir.join("node-id"))
        .expect("copying the node id");
    let second = Dp::start(dir.path(), "second", &cp, &vendor.public_key, &[]);
    second.wait_license("unlicensed", unlicensed);
    eventually(
        "the node's stream replaced",
        Duration::from_secs(20),
        || (cp.logs().matches("data plane connected").count() >= 2).then_some(()),
    );
    // The new stream has taken the snapshot (its row goes through "syncing" to "in_sync").
    eventually("the new stream in sync", Duration::from_secs(20), || {
        data_planes(&cp)
            .first()
            .filter(|p| p["sync_status"] == "in_sync")
            .map(|_| ())
    });
    first.kill();
    eventually("the old stream ended", Duration::from_secs(20), || {
        cp.logs()
            .contains("an older stream of a reconnected data plane ended")
            .then_some(())
    });
    let planes = data_planes(&cp);
    assert_eq!(planes.len(), 1, "{planes:?}");
    assert_eq!(planes[0]["id"], json!(node));
    assert_eq!(
        planes[0]["sync_status"], "in_sync",
        "the live stream's row stays: {planes:?}"
    );
    // The live one killed too: its stream ends with its connection, and the node is
    // recorded as gone at once, not after the 45 s liveness timeout.
    let mut second = second;
    second.kill();
    eventually(
        "the node recorded as disconnected",
        Duration::from_secs(10),
        || {
            let planes = data_planes(&cp);
            (planes.len() == 1 && planes[0]["sync_status"] == "disconnected").then_some(())
        },
    );
}

#[test]
fn a_control_plane_with_a_static_license_sends_it_and_never_a_stored_one() {
    let dir = TempDir::new().expect("temp dir");
    let vendor = Vendor::new(dir.path(), 32);
    let key = vendor.public_key.to_string_lossy().into_owned();
    let static_path = dir.path().join("static.json");
    std::fs::write(&static_path, vendor.valid("STATIC-CP")).expect("write");
    let cp = Cp::start(
        dir.path(),
        &[
            "--trusted-key",
            &key,
            "--license-path",
            &static_path.to_string_lossy(),
        ],
    );
    let dp = Dp::start(dir.path(), "dp", &cp, &vendor.public_key, &[]);
    let first = dp.wait_license("the control plane's static license", |l| {
        l["payload"]["license_key"] == "STATIC-CP"
    });
    assert_eq!(first["source"], "cluster", "{first}");

    // A stored license is stored, and not sent: the data plane keeps the static one.
    let stored = cp.add(&vendor.valid("STORED-ON-STATIC-CP"));
    assert_eq!(cp.get("/licenses").json()["data"][0]["id"], stored["id"]);
    let status = cp.get("/license/status").json();
    assert!(
        status["warnings"]
            .to_string()
            .contains("licenses stored through the admin API are not used here"),
        "{status}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    let license = dp.license();
    assert_eq!(license["payload"]["license_key"], "STATIC-CP", "{license}");
    assert_eq!(
        license["id"], first["id"],
        "the same static license, the same id"
    );

    // Consul's DELETE there is refused and changes nothing.
    let delete = charter_tests::request("DELETE", &cp.url("/v1/operator/license"), None);
    assert_eq!(delete.status, 400, "{}", delete.body);
    assert!(delete.body.contains("static"), "{}", delete.body);
    assert_eq!(cp.get(&format!("/licenses/{}", id_of(&stored))).status, 200);
    assert_eq!(dp.license()["payload"]["license_key"], "STATIC-CP");
}
