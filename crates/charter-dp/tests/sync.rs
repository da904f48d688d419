//! The data plane against a crafted control plane, over real sockets and real files:
//! Hello, ACK/NACK of every kind of snapshot, the cache across restarts, the clock mark,
//! reconnection, and what the status API says at each step.

mod common;

use std::fs;
use std::sync::Arc;
use std::time::Duration;

use charter_dp::cache::{self, CACHE_FILE};
use charter_dp::files::{CLOCK_MARK_FILE, NODE_ID_FILE};
use charter_dp::StaticLicense;
use charter_license::FixedClock;
use common::*;
use serde_json::Value;
use tempfile::TempDir;

const EPOCH: &str = "0b7d2c2e-5b8f-4f1e-9a43-3f0c1d6f0a01";
const OTHER_EPOCH: &str = "5d1e8a3c-7a2b-4c3d-8e4f-9a0b1c2d3e4f";

fn fixed(now: i64) -> Arc<FixedClock> {
    Arc::new(FixedClock::new(now))
}

#[tokio::test(flavor = "multi_thread")]
async fn hello_carries_the_node_and_its_id_is_stable_across_restarts() {
    let dir = TempDir::new().unwrap();
    let vendor = signer(1);
    let cp = FakeCp::start().await;
    let mut config = config(&cp.address(), dir.path(), keys(&vendor));
    config.labels.insert("zone".into(), "eu-west-1a".into());
    config.labels.insert("tier".into(), "edge".into());

    let dp = Dp::start(config.clone(), fixed(MARCH_2026)).await;
    let hello = cp.hello(1).await;
    let node_id = uuid::Uuid::parse_str(&hello.node_id).expect("node id is a UUID");
    assert_eq!(node_id.get_version_num(), 4);
    assert!(!hello.hostname.is_empty());
    assert_eq!(hello.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(
        hello.labels.get("zone").map(String::as_str),
        Some("eu-west-1a")
    );
    assert_eq!(hello.labels.get("tier").map(String::as_str), Some("edge"));
    assert_eq!(hello.cached_epoch, "");
    assert_eq!(hello.cached_revision, 0);
    assert_eq!(hello.upstream, "");
    let on_disk = fs::read_to_string(dir.path().join(NODE_ID_FILE)).unwrap();
    assert_eq!(on_disk.trim(), hello.node_id);

    let doc = license(&vendor, "key-1", "2026-01-01", "2099-12-31", &[]);
    assert!(cp.push(snapshot(EPOCH, 7, "lic-1", &doc)).await.accepted);
    let (_, status) = dp.get("/status").await;
    assert_eq!(status["node_id"], hello.node_id.as_str());
    dp.stop().await.unwrap();

    let dp = Dp::start(config, fixed(MARCH_2026)).await;
    let again = cp.hello(2).await;
    assert_eq!(
        again.node_id, hello.node_id,
        "the node id survives a restart"
    );
    assert_eq!(
        again.cached_epoch, EPOCH,
        "Hello reports the cached position"
    );
    assert_eq!(again.cached_revision, 7);
    dp.stop().await.unwrap();
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_accepted_snapshot_is_in_force_and_served() {
    let dir = TempDir::new().unwrap();
    let vendor = signer(1);
    let cp = FakeCp::start().await;
    let dp = Dp::start(
        config(&cp.address(), dir.path(), keys(&vendor)),
        fixed(MARCH_2026),
    )
    .await;
    cp.connected().await;

    let (code, ready) = dp.get("/status/ready").await;
    assert_eq!(code, 503, "not ready before a license: {ready}");
    assert_eq!(ready["ready"], false);
    assert!(
        ready["reason"].as_str().unwrap().contains(&cp.address()),
        "{ready}"
    );
    let unlicensed = dp.license().await;
    assert_eq!(unlicensed["status"], "unlicensed");
    assert_eq!(unlicensed["source"], Value::Null);
    assert_eq!(unlicensed["payload"], Value::Null);

    let doc = license(
        &vendor,
        "key-1",
        "2026-01-01",
        "2099-12-31",
        &["rbac", "vitals"],
    );
    let ack = cp.push(snapshot(EPOCH, 3, "lic-1", &doc)).await;
    assert!(ack.accepted, "{ack:?}");
    assert_eq!(ack.epoch, EPOCH);
    assert_eq!(ack.revision, 3);
    assert_eq!(ack.license_id, "lic-1");
    assert_eq!(ack.license_status, "valid");
    assert_eq!(ack.error_code, "");

    let l = dp.license().await;
    assert_eq!(l["status"], "valid");
    assert_eq!(l["source"], "cluster");
    assert_eq!(l["id"], "lic-1");
    assert_eq!(l["epoch"], EPOCH);
    assert_eq!(l["revision"], 3);
    assert_eq!(l["updated_at"], 1_700_000_003);
    assert_eq!(l["key_id"], vendor.key_id().to_string());
    assert_eq!(l["payload"]["license_key"], "key-1");
    assert_eq!(l["payload"]["features"][0], "rbac");
    assert!(l["days_left"].as_i64().unwrap() > 90);
    assert_eq!(l["warnings"], serde_json::json!([]));

    let (code, ready) = dp.get("/status/ready").await;
    assert_eq!((code, &ready), (200, &serde_json::json!({"ready": true})));
    let (code, status) = dp.get("/status").await;
    assert_eq!(code, 200);
    assert_eq!(status["license"], l);
    assert_eq!(status["control_plane"]["address"], cp.address());
    assert_eq!(status["control_plane"]["connected"], true);
    assert_eq!(status["control_plane"]["last_sync"], MARCH_2026);
    assert_eq!(status["control_plane"]["last_error"], Value::Null);

    let (code, f) = dp.get("/license/features/rbac").await;
    assert_eq!(
        (code, &f),
        (
            200,
            &serde_json::json!({"feature": "rbac", "allowed": true})
        )
    );
    let (code, f) = dp.get("/license/features/ai-gateway").await;
    assert_eq!(code, 403);
    assert_eq!(f["allowed"], false);
    assert!(
        f["message"]
            .as_str()
            .unwrap()
            .contains("not in the license"),
        "{f}"
    );

    let (code, metrics) = dp.get_text("/metrics").await;
    assert_eq!(code, 200);
    for line in [
        "charter_dp_license_status{status=\"valid\"} 1",
        "charter_dp_license_status{status=\"unlicensed\"} 0",
        "charter_dp_control_plane_connected 1",
        "charter_dp_snapshots_received_total 1",
        "charter_dp_snapshots_accepted_total 1",
        "charter_dp_snapshots_rejected_total 0",
        "charter_dp_reconnects_total 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing `{line}` in:\n{metrics}"
        );
    }
    assert!(metrics.contains("charter_dp_license_days_left "));

    let (code, body) = dp.get("/nope").await;
    assert_eq!(
        (code, body),
        (404, serde_json::json!({"message": "Not found"}))
    );

    let cached = cache::read(dir.path())
        .unwrap()
        .expect("the cache is written");
    assert_eq!(cached.epoch, EPOCH);
    assert_eq!(cached.revision, 3);
    assert_eq!(cached.license.unwrap().payload, doc);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &fs::metadata(dir.path().join(CACHE_FILE))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    dp.stop().await.unwrap();
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lower_revision_is_ignored_and_a_new_epoch_accepted() {
    let dir = TempDir::new().unwrap();
    let vendor = signer(1);
    let cp = FakeCp::start().await;
    let dp = Dp::start(
        config(&cp.address(), dir.path(), keys(&vendor)),
        fixed(MARCH_2026),
    )
    .await;
    cp.connected().await;
    let new = license(&vendor, "key-new", "2026-01-01", "2099-12-31", &[]);
    let old = license(&vendor, "key-old", "2025-01-01", "2099-06-30", &[]);
    assert!(cp.push(snapshot(EPOCH, 5, "lic-new", &new)).await.accepted);

    let ack = cp.push(snapshot(EPOCH, 4, "lic-old", &old)).await;
    assert!(!ack.accepted, "{ack:?}");
    assert_eq!(ack.error_code, "stale_revision");
    assert!(ack.error.contains("older than revision 5"), "{}", ack.error);
    assert_eq!(
        ack.license_id, "lic-new",
        "the Ack says what stays in force"
    );
    let l = dp.license().await;
    assert_eq!(
        (l["id"].as_str(), l["revision"].as_u64()),
        (Some("lic-new"), Some(5))
    );
    assert_eq!(
        cache::read(dir.path()).unwrap().unwrap().revision,
        5,
        "the cache is untouched"
    );

    let ack = cp.push(snapshot(EPOCH, 5, "lic-new", &new)).await;
    assert!(
        ack.accepted,
        "the same revision again is already applied: {ack:?}"
    );

    let ack = cp.push(snapshot(OTHER_EPOCH, 1, "lic-old", &old)).await;
    assert!(
        ack.accepted,
        "a new epoch (a rebuilt control plane) is accepted: {ack:?}"
    );
    let l = dp.license().await;
    assert_eq!(l["id"], "lic-old");
    assert_eq!(l["epoch"], OTHER_EPOCH);
    assert_eq!(l["revision"], 1);

    let (_, metrics) = dp.get_text("/metrics").await;
    assert!(
        metrics.contains("charter_dp_snapshots_rejected_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("charter_dp_snapshots_accepted_total 3"),
        "{metrics}"
    );
    dp.stop().await.unwrap();
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_license_that_does_not_verify_is_nacked_and_the_previous_one_stays() {
    let dir = TempDir::new().unwrap();
    let vendor = signer(1);
    let stranger = signer(9);
    let cp = FakeCp::start().await;
    let dp = Dp::start(
        config(&cp.address(), dir.path(), keys(&vendor)),
        fixed(MARCH_2026),
    )
    .await;
    cp.connected().await;
    let good = license(&vendor, "key-1", "2026-01-01", "2099-12-31", &[]);
    assert!(cp.push(snapshot(EPOCH, 1, "lic-1", &good)).await.accepted);

    let forged = license(&stranger, "key-2", "2026-01-01", "2099-12-31", &[]);
    let ack = cp.push(snapshot(EPOCH, 2, "lic-2", &forged)).await;
    assert!(!ack.accepted);
    assert_eq!(ack.error_code, "validation_fail");
    assert!(!ack.error.is_empty());
    assert_eq!(
        (ack.license_id.as_str(), ack.license_status.as_str()),
        ("lic-1", "valid")
    );

    let ack = cp.push(snapshot(EPOCH, 3, "lic-3", "{not json")).await;
    assert_eq!(
        (ack.accepted, ack.error_code.as_str()),
        (false, "invalid_license_json")
    );

    let future = license(&vendor, "key-4", "2026-06-01", "2099-12-31", &[]);
    let ack = cp.push(snapshot(EPOCH, 4, "lic-4", &future)).await;
    assert_eq!(
        (ack.accepted, ack.error_code.as_str()),
        (false, "invalid_expiration_date")
    );

    let l = dp.license().await;
    assert_eq!(
        (l["id"].as_str(), l["revision"].as_u64()),
        (Some("lic-1"), Some(1))
    );
    assert_eq!(cache::read(dir.path()).unwrap().unwrap().revision, 1);
    assert_eq!(dp.get("/status/ready").await.0, 200);
    dp.stop().await.unwrap();
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_snapshot_makes_the_node_unlicensed_also_after_a_restart() {
    let dir = TempDir::new().unwrap();
    let vendor = signer(1);
    let cp = FakeCp::start().await;
    let config = config(&cp.address(), dir.path(), keys(&vendor));
    let dp = Dp::start(config.clone(), fixed(MARCH_2026)).await;
    cp.connected().await;
    let doc = license(&vendor, "key-1", "2026-01-01", "2099-12-31", &["rbac"]);
    assert!(cp.push(snapshot(EPOCH, 1, "lic-1", &doc)).await.accepted);
    assert_eq!(dp.get("/status/ready").await.0, 200);

    let ack = cp.push(empty_snapshot(EPOCH, 2)).await;
    assert!(ack.accepted);
    assert_eq!(
        (ack.license_id.as_str(), ack.license_status.as_str()),
        ("", "unlicensed")
    );
    let l = dp.license().await;
    assert_eq!(l["status"], "unlicensed");
    assert_eq!(l["id"], Value::Null);
    assert_eq!(l["revision"], 2);
    let (code, ready) = dp.get("/status/ready").await;
    assert_eq!(code, 503);
    assert!(
        ready["reason"].as_str().unwrap().contains("unlicensed"),
        "{ready}"
    );
    let (code, f) = dp.get("/license/features/rbac").await;
    assert_eq!(code, 403);
    assert!(f["message"].as_str().unwrap().contains("unlicensed"), "{f}");
    let cached = cache::read(dir.path()).unwrap().unwrap();
    assert_eq!((cached.revision, cached.license), (2, None));
    dp.stop().await.unwrap();
    cp.stop().await;

    let dp = Dp::start(config, fixed(MARCH_2026)).await;
    let l = dp.license().await;
    assert_eq!(
        l["status"], "unlicensed",
        "boots unlicensed with the CP gone: {l}"
    );
    assert_eq!(l["revision"], 2);
    assert_eq!(dp.get("/status/ready").await.0, 503);
    dp.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_control_plane_gone_a_restart_enforces_the_cache() {
    let dir = TempDir::new().unwrap();
    let vendor = signer(1);
    let cp = FakeCp::start().await;
    let cp_addr = cp.addr;
    let config = config(&cp.address(), dir.path(), keys(&vendor));
    let dp = Dp::start(config.clone(), fixed(MARCH_2026)).await;
    cp.connected().await;
    let doc = license(&vendor, "key-1", "2026-01-01", "2099-12-31", &["rbac"]);
    assert!(cp.push(snapshot(EPOCH, 4, "lic-1", &doc)).await.accepted);
    dp.stop().await.unwrap();
    cp.stop().await;

    let dp = Dp::start(config, fixed(MARCH_2026)).await;
    let l = dp.license().await;
    assert_eq!(l["source"], "cache");
    assert_eq!(l["status"], "valid");
    assert_eq!(l["id"], "lic-1");
    assert_eq!(dp.get("/status/ready").await.0, 200, "ready from the cache");
    assert_eq!(dp.get("/license/features/rbac").await.0, 200);
    let status = eventually("a recorded connection error", WAIT, || async {
        let (_, status) = dp.get("/status").await;
        (!status["control_plane"]["last_error"].is_null()).then_some(status)
    })
    .await;
    assert_eq!(status["control_plane"]["connected"], false);
    assert_eq!(status["control_plane"]["last_sync"], Value::Null);
    assert!(
        status["control_plane"]["last_error"]
            .as_str()
            .unwrap()
            .contains(&cp_addr.to_string()),
        "the error names the address: {status}"
    );

    // The control plane comes back and confirms the cached revision: the source becomes
    // the cluster, without a new license.
    let cp = FakeCp::start_on(cp_addr).await;
    cp.on_connect(snapshot(EPOCH, 4, "lic-1", &doc));
    let ack = cp.ack(1).await;
    assert!(ack.accepted);
    let hello = cp.hello(1).await;
    assert_eq!(
        (hello.cached_epoch.as_str(), hello.cached_revision),
        (EPOCH, 4)
    );
    let l = eventually("source cluster", WAIT, || async {
        let l = dp.license().await;
        (l["source"] == "cluster").then_some(l)
    })
    .await;
    assert_eq!(l["id"], "lic-1");
    dp.stop().await.unwrap();
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_or_torn_cache_is_refused_and_the_node_starts_unlicensed() {
    let dir = TempDir::new().unwrap();
    let vendor = signer(1);
    let cp = FakeCp::start().await;
    let config = config(&cp.address(), dir.path(), keys(&vendor));
    let dp = Dp::start(config.clone(), fixed(MARCH_2026)).await;
    cp.connected().await;
    let doc = license(&vendor, "key-1", "2026-01-01", "2027-01-31", &[]);
    assert!(cp.push(snapshot(EPOCH, 1, "lic-1", &doc)).await.accepted);
    dp.stop().await.unwrap();
    cp.stop().await;

    let path = dir.path().join(CACHE_FILE);
    let original = fs::read_to_string(&path).unwrap();
    let tampered = original.replace("2027-01-31", "2099-01-31");
    assert_ne!(tampered, original, "the expiry date is in the cache");
    fs::write(&path, &tampered).unwrap();
    let dp = Dp::start(config.clone(), fixed(MARCH_2026)).await;
    let l = dp.license().await;
    assert_eq!(
        l["status"], "unlicensed",
        "a tampered cache is refused: {l}"
    );
    assert_eq!(l["revision"], Value::Null);
    assert_eq!(dp.get("/status/ready").await.0, 503);
    dp.stop().await.unwrap();

    fs::write(&path, &original[..original.len() / 2]).unwrap();
    let dp = Dp::start(config.clone(), fixed(MARCH_2026)).await;
    assert_eq!(
        dp.license().await["status"],
        "unlicensed",
        "a torn cache is refused"
    );
    dp.stop().await.unwrap();

    fs::write(&path, &original).unwrap();
    let dp = Dp::start(config, fixed(MARCH_2026)).await;
    assert_eq!(
        dp.license().await["source"],
        "cache",
        "the intact cache loads"
    );
    dp.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clock_set_backwards_does_not_revive_an_expired_license() {
    let dir = TempDir::new().unwrap();
    let vendor = signer(1);
    let cp = FakeCp::start().await;
    let config = config(&cp.address(), dir.path(), keys(&vendor));
    // Valid through 2026-06-30: in grace until 2026-07-30, expired after.
    let doc = license(&vendor, "key-1", "2026-01-01", "2026-06-30", &["rbac"]);

    let dp = Dp::start(config.clone(), fixed(MAY_2026)).await;
    cp.connected().await;
    let ack = cp.push(snapshot(EPOCH, 1, "lic-1", &doc)).await;
    assert_eq!(
        (ack.accepted, ack.license_status.as_str()),
        (true, "expiring")
    );
    assert_eq!(dp.license().await["days_left"], 60);

    // Time passes with no snapshot: the license expires with time.
    dp.clock.set(MAY_2026 + 70 * DAY);
    assert_eq!(dp.license().await["status"], "grace");
    assert_eq!(dp.get("/status/ready").await.0, 200, "grace still allows");
    dp.clock.set(SEPTEMBER_2026);
    let l = dp.license().await;
    assert_eq!(l["status"], "expired");
    assert!(
        l["warnings"][0].as_str().unwrap().contains("expired"),
        "{l}"
    );
    let (code, ready) = dp.get("/status/ready").await;
    assert_eq!(code, 503);
    assert!(
        ready["reason"].as_str().unwrap().starts_with("expired"),
        "{ready}"
    );
    let (code, f) = dp.get("/license/features/rbac").await;
    assert_eq!(code, 403);
    assert!(f["message"].as_str().unwrap().contains("expired"), "{f}");

    // The clock goes back: nothing changes.
    dp.clock.set(MAY_2026);
    assert_eq!(dp.license().await["status"], "expired");
    assert_eq!(dp.get("/status/ready").await.0, 503);

    // An expired but signed license is still accepted (its status denies).
    let ack = cp.push(snapshot(EPOCH, 2, "lic-1", &doc)).await;
    assert_eq!(
        (ack.accepted, ack.license_status.as_str()),
        (true, "expired")
    );
    dp.stop().await.unwrap();
    cp.stop().await;
    let mark: i64 = fs::read_to_string(dir.path().join(CLOCK_MARK_FILE))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(mark >= SEPTEMBER_2026, "the mark is persisted: {mark}");

    // A restart with the clock back and the control plane gone: still expired.
    let dp = Dp::start(config, fixed(MAY_2026)).await;
    let l = dp.license().await;
    assert_eq!(
        (l["source"].as_str(), l["status"].as_str()),
        (Some("cache"), Some("expired"))
    );
    assert_eq!(dp.get("/status/ready").await.0, 503);
    dp.stop().await.unwrap();
}

/// 2100-01-01T00:00:00Z.
const YEAR_2100: i64 = 4_102_444_800;

/// The persisted clock mark, if any.
fn clock_mark(dir: &std::path::Path) -> Option<i64> {
    fs::read_to_string(dir.join(CLOCK_MARK_FILE))
        .ok()
        .map(|text| text.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_caches_unsigned_received_at_moves_no_clock() {
    let dir = TempDir::new().unwrap();
    let vendor = signer(1);
    let cp = FakeCp::start().await;
    let config = config(&cp.address(), dir.path(), keys(&vendor));
    let dp = Dp::start(config.clone(), fixed(MARCH_2026)).await;
    cp.connected().await;
    let doc = license(&vendor, "key-1", "2026-01-01", "2027-12-31", &[]);
    assert!(cp.push(snapshot(EPOCH, 1, "lic-1", &doc)).await.accepted);
    dp.stop().await.unwrap();
    cp.stop().await;

    // The cache claims it was received in 2100; its license still verifies.
    let mut file = cache::read(dir.path()).unwrap().unwrap();
    file.received_at = YEAR_2100;
    cache::store(dir.path(), &file).unwrap();
    let dp = Dp::start(config.clone(), fixed(MARCH_2026)).await;
    let l = dp.license().await;
    assert_eq!(
        (l["source"].as_str(), l["status"].as_str()),
        (Some("cache"), Some("valid")),
        "judged at the node's clock, not at the cache's word: {l}"
    );
    assert_eq!(l["warnings"], serde_json::json!([]));
    dp.stop().await.unwrap();
    assert_eq!(clock_mark(dir.path()), Some(MARCH_2026));

    // The same claim in a cache that is refused (its license was altered) moves nothing
    // either.
    file.license.as_mut().unwrap().payload = doc.replace("key-1", "key-X");
    cache::store(dir.path(), &file).unwrap();
    let dp = Dp::start(config, fixed(MARCH_2026)).await;
    assert_eq!(dp.license().await["status"], "unlicensed");
    dp.stop().await.unwrap();
    assert_eq!(clock_mark(dir.path()), Some(MARCH_2026));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mark_a_day_ahead_is_a_warning_and_deleting_it_is_the_reset() {
    let dir = TempDir::new().unwrap();
    let vendor = signer(1);
    let cp = FakeCp::start().await;
    let config = config(&cp.address(), dir.path(), keys(&vendor));
    let dp = Dp::start(config.clone(), fixed(MARCH_2026)).await;
    cp.connected().await;
    let doc = license(&vendor, "key-1", "2026-01-01", "2027-12-31", &[]);
    assert!(cp.push(snapshot(EPOCH, 1, "lic-1", &doc)).await.accepted);
    dp.stop().await.unwrap();
    cp.stop().await;

    // A mark a day and a minute ahead is news; it still bounds the clock.
    fs::write(
        dir.path().join(CLOCK_MARK_FILE),
        format!("{}\n", MARCH_2026 + DAY + 60),
    )
    .unwrap();
    let dp = Dp::start(config.clone(), fixed(MARCH_2026)).await;
    let l = dp.license().await;
    assert_eq!(l["status"], "valid");
    let warnings = l["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 1, "{l}");
    let warning = warnings[0].as_str().unwrap();
    for needle in [
        "2026-03-02T12:01:00Z",
        "2026-03-01T12:00:00Z",
        CLOCK_MARK_FILE,
    ] {
        assert!(warning.contains(needle), "`{needle}` in: {warning}");
    }
    dp.stop().await.unwrap();

    // A mark in 2100 makes the license expired, and says why.
    fs::write(dir.path().join(CLOCK_MARK_FILE), format!("{YEAR_2100}\n")).unwrap();
    let dp = Dp::start(config.clone(), fixed(MARCH_2026)).await;
    let l = dp.license().await;
    assert_eq!(l["status"], "expired");
    assert!(
        l["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().contains("2100-01-01T00:00:00Z")),
        "{l}"
    );
    let (code, ready) = dp.get("/status/ready").await;
    assert_eq!(code, 503);
    assert!(
        ready["reason"].as_str().unwrap().contains("clock mark"),
        "{ready}"
    );
    dp.stop().await.unwrap();

    // The documented reset.
    fs::remove_file(dir.path().join(CLOCK_MARK_FILE)).unwrap();
    let dp = Dp::start(config, fixed(MARCH_2026)).await;
    let l = dp.license().await;
    assert_eq!(
        (l["status"].as_str(), &l["warnings"]),
        (Some("valid"), &serde_json::json!([]))
    );
    dp.stop().await.unwrap();
    assert_eq!(clock_mark(dir.path()), Some(MARCH_2026));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_empty_control_plane_never_displaces_the_license_held() {
    let dir = TempDir::new().unwrap();
    let vendor = signer(1);
    let cp = FakeCp::start().await;
    let addr = cp.addr;
    let config = config(&cp.address(), dir.path(), keys(&vendor));
    let dp = Dp::start(config.clone(), fixed(MARCH_2026)).await;
    cp.connected().await;
    let doc = license(&vendor, "key-1", "2026-01-01", "2099-12-31", &[]);
    assert!(cp.push(snapshot(EPOCH, 4, "lic-1", &doc)).await.accepted);

    let ack = cp.push(empty_snapshot(OTHER_EPOCH, 1)).await;
    assert!(!ack.accepted, "{ack:?}");
    assert_eq!(ack.error_code, "empty_control_plane");
    assert!(
        ack.error.contains(OTHER_EPOCH) && ack.error.contains("lic-1"),
        "{}",
        ack.error
    );
    assert_eq!(
        (ack.license_id.as_str(), ack.license_status.as_str()),
        ("lic-1", "valid"),
        "the Ack says what stays in force"
    );
    let l = dp.license().await;
    assert_eq!(
        (
            l["id"].as_str(),
            l["epoch"].as_str(),
            l["revision"].as_u64()
        ),
        (Some("lic-1"), Some(EPOCH), Some(4))
    );
    assert_eq!(dp.get("/status/ready").await.0, 200);
    let cached = cache::read(dir.path()).unwrap().unwrap();
    assert_eq!((cached.epoch.as_str(), cached.revision), (EPOCH, 4));
    dp.stop().await.unwrap();
    cp.stop().await;

    // Restarted from its cache, against the rebuilt control plane: still licensed.
    let cp = FakeCp::start_on(addr).await;
    cp.on_connect(empty_snapshot(OTHER_EPOCH, 1));
    let dp = Dp::start(config, fixed(MARCH_2026)).await;
    let ack = cp.ack(1).await;
    assert_eq!(
        (
            ack.accepted,
            ack.error_code.as_str(),
            ack.license_id.as_str()
        ),
        (false, "empty_control_plane", "lic-1")
    );
    assert_eq!(dp.license().await["id"], "lic-1");

    // A license added on the rebuilt control plane is taken (a new epoch), and deleting
    // the last license within that epoch unlicenses the node, as Kong does.
    let other = license(&vendor, "key-2", "2026-01-01", "2099-12-31", &[]);
    assert!(
        cp.push(snapshot(OTHER_EPOCH, 2, "lic-2", &other))
            .await
            .accepted
    );
    assert_eq!(dp.license().await["id"], "lic-2");
    let ack = cp.push(empty_snapshot(OTHER_EPOCH, 3)).await;
    assert!(ack.accepted, "{ack:?}");
    assert_eq!(dp.license().await["status"], "unlicensed");
    dp.stop().await.unwrap();
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn only_lower_revisions_for_the_wait_are_taken_with_revision_regressed() {
    let dir = TempDir::new().unwrap();
    let vendor = signer(1);
    let cp = FakeCp::start().await;
    let wait = Duration::from_millis(500);
    let mut config = config(&cp.address(), dir.path(), keys(&vendor));
    config.regression_wait = wait;
    let dp = Dp::start(config.clone(), fixed(MARCH_2026)).await;
    cp.connected().await;
    let doc = license(&vendor, "key-1", "2026-01-01", "2099-12-31", &[]);
    assert!(cp.push(snapshot(EPOCH, 5, "lic-1", &doc)).await.accepted);

    // A lower revision followed by a newer one within the wait: the newer one ends it.
    assert_eq!(
        cp.push(snapshot(EPOCH, 4, "lic-0", &doc)).await.error_code,
        "stale_revision"
    );
    assert!(cp.push(snapshot(EPOCH, 6, "lic-1", &doc)).await.accepted);
    // Absence can only be seen by waiting: twice the wait, and no Ack came.
    tokio::time::sleep(wait * 2).await;
    assert_eq!(cp.acks().len(), 3, "{:?}", cp.acks());
    dp.stop().await.unwrap();

    // What an altered cache says: the control plane's epoch and the largest revision.
    let mut file = cache::read(dir.path()).unwrap().unwrap();
    file.revision = u64::MAX;
    cache::store(dir.path(), &file).unwrap();
    let newer = license(&vendor, "key-2", "2026-01-01", "2099-12-31", &[]);
    cp.on_connect(snapshot(EPOCH, 7, "lic-2", &newer));
    let dp = Dp::start(config, fixed(MARCH_2026)).await;
    let ack = cp.ack(4).await;
    assert_eq!(
        (ack.accepted, ack.error_code.as_str(), ack.revision),
        (false, "stale_revision", 7),
        "ignored while the control plane may be lagging"
    );
    assert_eq!(dp.license().await["id"], "lic-1");
    let ack = cp.ack(5).await;
    assert_eq!(
        (ack.accepted, ack.error_code.as_str(), ack.revision),
        (true, "revision_regressed", 7),
        "taken after the wait: {ack:?}"
    );
    assert!(ack.error.contains("revision 7"), "{}", ack.error);
    assert_eq!(ack.license_id, "lic-2");
    let l = dp.license().await;
    assert_eq!(
        (
            l["id"].as_str(),
            l["revision"].as_u64(),
            l["source"].as_str()
        ),
        (Some("lic-2"), Some(7), Some("cluster"))
    );
    assert_eq!(cache::read(dir.path()).unwrap().unwrap().revision, 7);
    // From there on the ordinary rules hold again.
    let ack = cp.push(snapshot(EPOCH, 8, "lic-1", &doc)).await;
    assert_eq!((ack.accepted, ack.error_code.as_str()), (true, ""));
    dp.stop().await.unwrap();
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_data_plane_reconnects_when_the_control_plane_comes_back() {
    let dir = TempDir::new().unwrap();
    let vendor = signer(1);
    let cp = FakeCp::start().await;
    let addr = cp.addr;
    let dp = Dp::start(
        config(&cp.address(), dir.path(), keys(&vendor)),
        fixed(MARCH_2026),
    )
    .await;
    cp.connected().await;
    let first = license(&vendor, "key-1", "2026-01-01", "2099-12-31", &[]);
    assert!(cp.push(snapshot(EPOCH, 1, "lic-1", &first)).await.accepted);
    cp.stop().await;

    eventually("the DP to notice the CP is gone", WAIT, || async {
        let (_, status) = dp.get("/status").await;
        (status["control_plane"]["connected"] == false).then_some(())
    })
    .await;
    assert_eq!(
        dp.get("/status/ready").await.0,
        200,
        "ready stays 200 with the CP gone"
    );
    assert_eq!(dp.license().await["id"], "lic-1");

    let cp = FakeCp::start_on(addr).await;
    let second = license(&vendor, "key-2", "2026-01-01", "2099-12-31", &[]);
    cp.on_connect(snapshot(EPOCH, 2, "lic-2", &second));
    let ack = cp.ack(1).await;
    assert!(ack.accepted);
    assert_eq!(ack.license_id, "lic-2");
    assert_eq!(cp.hello(1).await.cached_revision, 1);
    let (_, status) = dp.get("/status").await;
    assert_eq!(status["control_plane"]["connected"], true);
    assert_eq!(status["license"]["id"], "lic-2");
    let (_, metrics) = dp.get_text("/metrics").await;
    assert!(
        !metrics.contains("charter_dp_reconnects_total 0"),
        "{metrics}"
    );
    dp.stop().await.unwrap();
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_static_license_wins_but_snapshots_are_still_acknowledged() {
    let dir = TempDir::new().unwrap();
    let vendor = signer(1);
    let cp = FakeCp::start().await;
    let mut config = config(&cp.address(), dir.path(), keys(&vendor));
    let pinned = license(&vendor, "static-key", "2026-01-01", "2099-12-31", &["rbac"]);
    config.static_license = Some(StaticLicense {
        origin: "test".into(),
        text: pinned,
    });
    let dp = Dp::start(config, fixed(MARCH_2026)).await;
    let l = dp.license().await;
    assert_eq!(
        (l["source"].as_str(), l["status"].as_str()),
        (Some("static"), Some("valid"))
    );
    assert_eq!(l["payload"]["license_key"], "static-key");
    assert_eq!(dp.get("/status/ready").await.0, 200);
    cp.connected().await;

    let cluster = license(&vendor, "cluster-key", "2026-01-01", "2099-12-31", &[]);
    let ack = cp.push(snapshot(EPOCH, 1, "lic-1", &cluster)).await;
    assert!(ack.accepted);
    assert_eq!(
        (ack.license_id.as_str(), ack.license_status.as_str()),
        ("", "valid")
    );
    let ack = cp.push(empty_snapshot(EPOCH, 2)).await;
    assert!(ack.accepted);
    let l = dp.license().await;
    assert_eq!(
        l["source"], "static",
        "the cluster never changes a static node"
    );
    assert_eq!(l["payload"]["license_key"], "static-key");
    assert_eq!(dp.get("/license/features/rbac").await.0, 200);
    dp.stop().await.unwrap();
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refusal_by_the_control_plane_is_reported() {
    let dir = TempDir::new().unwrap();
    let vendor = signer(1);
    let cp = FakeCp::start().await;
    cp.refuse(tonic::Status::failed_precondition(
        "data plane version 9.9.9 is newer than control plane 0.1.0; upgrade the control plane first",
    ));
    let dp = Dp::start(
        config(&cp.address(), dir.path(), keys(&vendor)),
        fixed(MARCH_2026),
    )
    .await;
    let status = eventually("the refusal in /status", WAIT, || async {
        let (_, status) = dp.get("/status").await;
        (!status["control_plane"]["last_error"].is_null()).then_some(status)
    })
    .await;
    let error = status["control_plane"]["last_error"].as_str().unwrap();
    assert!(
        error.contains("refused") && error.contains("upgrade the control plane"),
        "{error}"
    );
    assert_eq!(status["control_plane"]["connected"], false);
    // It keeps trying.
    cp.hello(2).await;
    dp.stop().await.unwrap();
    cp.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_data_plane_stops_promptly_while_disconnected() {
    let dir = TempDir::new().unwrap();
    let vendor = signer(1);
    // Nothing listens there.
    let dp = Dp::start(
        config("127.0.0.1:1", dir.path(), keys(&vendor)),
        fixed(MARCH_2026),
    )
    .await;
    assert_eq!(dp.license().await["status"], "unlicensed");
    tokio::time::sleep(Duration::from_millis(200)).await;
    dp.stop().await.unwrap();
}

#[test]
fn the_binary_refuses_a_bad_configuration_with_exit_64() {
    let dir = TempDir::new().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_charter-dp"))
            .args(args)
            .env_clear()
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let out = run(&["--cluster-insecure"]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("invalid configuration") && stderr.contains("--trusted-key"),
        "{stderr}"
    );

    let key = dir.path().join("vendor.pub");
    fs::write(&key, signer(1).trusted_key().to_pem()).unwrap();
    let key = key.to_str().unwrap();
    let out = run(&["--trusted-key", key]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--cluster-cert"), "{stderr}");

    let out = run(&["--trusted-key", key, "--cluster-insecure", "--bogus"]);
    assert_eq!(out.status.code(), Some(64));
}
