//! End-to-end tests of a data plane that an unsigned number must not wedge (issue #15,
//! items 2 to 4): the cache's `received_at` never moves the clock mark, the cache's
//! revision never freezes the node against its own control plane, and a control plane
//! rebuilt with an empty store never unlicenses the data planes. Real `charter-cp` and
//! `charter-dp` processes over mTLS on loopback, with real caches in temp dirs.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use charter_tests::{eventually, Cp, Dp, Vendor};
use serde_json::{json, Value};
use tempfile::TempDir;

/// 2100-01-01T00:00:00Z.
const YEAR_2100: i64 = 4_102_444_800;
/// The data plane's cache file (`charter_dp::cache::CACHE_FILE`).
const CACHE_FILE: &str = "license-cache.json";
/// The data plane's clock mark file (`charter_dp::files::CLOCK_MARK_FILE`).
const CLOCK_MARK_FILE: &str = "clock-mark";

fn setup() -> (TempDir, Vendor, Cp) {
    let dir = TempDir::new().expect("temp dir");
    let vendor = Vendor::new(dir.path(), 41);
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

fn data_planes(cp: &Cp) -> Vec<Value> {
    let resp = cp.get("/clustering/data-planes");
    assert_eq!(resp.status, 200, "{}", resp.body);
    resp.json()["data"].as_array().expect("data").clone()
}

fn cache_path(dp: &Dp) -> PathBuf {
    dp.data_dir.join(CACHE_FILE)
}

/// Rewrites the data plane's cache file (stopped first) with `edit` applied to its JSON.
fn edit_cache(dp: &Dp, edit: impl FnOnce(&mut Value)) {
    let path = cache_path(dp);
    let mut cache: Value =
        serde_json::from_str(&fs::read_to_string(&path).expect("read the cache")).expect("JSON");
    edit(&mut cache);
    fs::write(&path, serde_json::to_vec_pretty(&cache).unwrap()).expect("write the cache");
}

/// The persisted clock mark.
fn clock_mark(dp: &Dp) -> i64 {
    fs::read_to_string(dp.data_dir.join(CLOCK_MARK_FILE))
        .expect("a clock mark")
        .trim()
        .parse()
        .expect("Unix seconds")
}

/// Now, by this machine's clock.
fn wall_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Waits up to `timeout` until `/license` satisfies `check`.
fn wait_license(dp: &Dp, what: &str, timeout: Duration, check: impl Fn(&Value) -> bool) -> Value {
    eventually(what, timeout, || {
        let license = dp.license();
        check(&license).then_some(license)
    })
}

#[test]
fn the_caches_received_at_never_moves_the_clock_and_a_mark_ahead_is_reported() {
    let (dir, vendor, cp) = setup();
    let mut dp = Dp::start(dir.path(), "dp", &cp, &vendor.public_key, &[]);
    // Expires mid-2099: judged in 2100, it would be past its grace period.
    let id = id_of(&cp.add(&vendor.license("MARK", "2026-01-01", "2099-06-30")));
    dp.wait_license("the license", shows(&id));

    // A cache that claims it was received in 2100; its license still verifies.
    dp.kill();
    let before = dp.logs().len();
    edit_cache(&dp, |cache| cache["received_at"] = json!(YEAR_2100));
    dp.restart();
    let license = dp.license();
    // The cache is taken (its license verifies); the control plane may already have
    // sent the same license by the time /license answers, so either source will do.
    let logs = dp.logs()[before..].to_owned();
    assert!(logs.contains("license cache verified"), "{logs}");
    assert!(!logs.contains("license cache refused"), "{logs}");
    assert_eq!(
        license["status"], "valid",
        "the cache's word moves no clock: {license}"
    );
    assert!(
        matches!(license["source"].as_str(), Some("cache" | "cluster")),
        "{license}"
    );
    assert_eq!(license["warnings"], json!([]));
    assert!(clock_mark(&dp) < YEAR_2100 - 86_400, "{}", clock_mark(&dp));

    // The same claim in a cache that is refused (its license altered).
    dp.kill();
    edit_cache(&dp, |cache| {
        let payload = cache["license"]["payload"].as_str().unwrap().to_owned();
        cache["license"]["payload"] = json!(payload.replace("MARK", "MORK"));
        cache["received_at"] = json!(YEAR_2100);
    });
    dp.restart();
    assert!(dp.logs().contains("license cache refused"));
    let license = dp.wait_license("the license from the control plane", shows(&id));
    assert_eq!(license["status"], "valid", "{license}");
    assert!(clock_mark(&dp) < YEAR_2100 - 86_400, "{}", clock_mark(&dp));

    // A mark in 2100 in the clock-mark file itself (a clock once wrong, or an altered
    // file): an ERROR with both dates, and a warning in /license.
    dp.kill();
    let before = dp.logs().len();
    fs::write(dp.data_dir.join(CLOCK_MARK_FILE), format!("{YEAR_2100}\n")).unwrap();
    dp.restart();
    let license = dp.license();
    assert_eq!(license["status"], "expired", "{license}");
    let warnings = license["warnings"].to_string();
    let today = charter_license::rfc3339(wall_now())[..10].to_owned();
    for needle in ["2100-01-01T00:00:00Z", &today, CLOCK_MARK_FILE] {
        assert!(warnings.contains(needle), "`{needle}` in: {warnings}");
    }
    let logs = dp.logs()[before..].to_owned();
    let error = logs
        .lines()
        .find(|l| l.contains("ERROR") && l.contains("clock mark"))
        .unwrap_or_else(|| panic!("an ERROR about the clock mark in:\n{logs}"));
    assert!(
        error.contains("2100-01-01T00:00:00Z") && error.contains(&today),
        "both dates in: {error}"
    );

    // The documented reset: delete the file and restart.
    dp.kill();
    fs::remove_file(dp.data_dir.join(CLOCK_MARK_FILE)).unwrap();
    dp.restart();
    let license = dp.license();
    assert_eq!(
        (license["status"].as_str(), &license["warnings"]),
        (Some("valid"), &json!([])),
        "{license}"
    );
    assert!(clock_mark(&dp) < YEAR_2100 - 86_400);
}

/// The one test that waits out the 60 s of DESIGN's revision rule on the real binary.
#[test]
fn a_cache_claiming_the_largest_revision_yields_to_the_control_plane_after_60_s() {
    let (dir, vendor, cp) = setup();
    let mut dp = Dp::start(dir.path(), "dp", &cp, &vendor.public_key, &[]);
    let first = id_of(&cp.add(&vendor.valid("FIRST")));
    dp.wait_license("the first license", shows(&first));

    // The cache claims the control plane's epoch at the largest revision.
    dp.kill();
    edit_cache(&dp, |cache| cache["revision"] = json!(u64::MAX));
    let started = std::time::Instant::now();
    dp.restart();
    let license = dp.license();
    assert_eq!(
        (license["id"].as_str(), license["source"].as_str()),
        (Some(first.as_str()), Some("cache"))
    );
    std::thread::sleep(Duration::from_millis(1100));
    let second = id_of(&cp.add(&vendor.valid("SECOND")));

    // Ignored at first: the control plane may be lagging.
    eventually("the stale_revision NACK", Duration::from_secs(20), || {
        data_planes(&cp).into_iter().find(|p| {
            p["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("stale_revision"))
        })
    });
    assert_eq!(dp.license()["id"], json!(first));

    // After 60 s of nothing newer, the control plane's snapshot is taken.
    let license = wait_license(
        &dp,
        "the second license, taken after 60 s",
        Duration::from_secs(100),
        shows(&second),
    );
    assert!(
        started.elapsed() >= Duration::from_secs(59),
        "not before the wait: {:?}",
        started.elapsed()
    );
    assert_eq!(license["source"], "cluster");
    let revision = license["revision"].as_u64().expect("a revision");
    assert!(revision < 100, "the control plane's revision: {revision}");
    let cached: Value =
        serde_json::from_str(&fs::read_to_string(cache_path(&dp)).unwrap()).unwrap();
    assert_eq!(cached["revision"], json!(revision), "the cache follows");
    let logs = dp.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("WARN") && l.contains("revision regressed")),
        "a WARN says so:\n{logs}"
    );
    let plane = eventually("the data plane in sync", Duration::from_secs(10), || {
        data_planes(&cp)
            .into_iter()
            .find(|p| p["sync_status"] == "in_sync" && p["license_revision"] == json!(revision))
    });
    assert_eq!(plane["license_id"], json!(second));

    // And from there on, the control plane's changes flow as usual.
    std::thread::sleep(Duration::from_millis(1100));
    let third = id_of(&cp.add(&vendor.valid("THIRD")));
    dp.wait_license("the third license, at once", shows(&third));
}

#[test]
fn a_control_plane_rebuilt_empty_does_not_unlicense_the_fleet() {
    let (dir, vendor, mut cp) = setup();
    let dp1 = Dp::start(dir.path(), "dp1", &cp, &vendor.public_key, &[]);
    let dp2 = Dp::start(dir.path(), "dp2", &cp, &vendor.public_key, &[]);
    let kept = id_of(&cp.add(&vendor.valid("KEPT")));
    for dp in [&dp1, &dp2] {
        dp.wait_license("the license", shows(&kept));
    }

    // The control plane comes back with an empty data dir: a new epoch, no license.
    cp.kill();
    fs::remove_dir_all(&cp.data_dir).expect("removing the CP's data dir");
    cp.restart();
    let planes = eventually(
        "both data planes NACKing empty_control_plane",
        Duration::from_secs(45),
        || {
            let planes = data_planes(&cp);
            (planes.len() == 2
                && planes.iter().all(|p| {
                    p["last_error"]
                        .as_str()
                        .is_some_and(|e| e.starts_with("empty_control_plane"))
                }))
            .then_some(planes)
        },
    );
    for plane in &planes {
        assert_eq!(plane["sync_status"], "rejected", "{plane}");
        assert_eq!(
            plane["license_id"],
            json!(kept),
            "what it enforces: {plane}"
        );
        assert_eq!(plane["license_status"], "valid", "{plane}");
    }
    for dp in [&dp1, &dp2] {
        let license = dp.license();
        assert_eq!(
            (license["id"].as_str(), license["status"].as_str()),
            (Some(kept.as_str()), Some("valid")),
            "{license}"
        );
        assert_eq!(dp.get("/status/ready").status, 200);
        assert!(
            dp.logs()
                .contains("a control plane with a new, empty store offers no license"),
            "{}",
            dp.logs()
        );
    }

    // A license added on the rebuilt control plane is taken (a new epoch) ...
    let fresh = id_of(&cp.add(&vendor.valid("FRESH")));
    for dp in [&dp1, &dp2] {
        dp.wait_license("the rebuilt control plane's license", shows(&fresh));
    }
    eventually("both in sync", Duration::from_secs(10), || {
        let planes = data_planes(&cp);
        (planes.len() == 2
            && planes
                .iter()
                .all(|p| p["sync_status"] == "in_sync" && p["last_error"].is_null()))
        .then_some(())
    });
    // ... and deleting the last license within that epoch unlicenses, as Kong does.
    assert_eq!(cp.send("DELETE", &format!("/licenses/{fresh}")).status, 204);
    for dp in [&dp1, &dp2] {
        dp.wait_license("unlicensed", |l| l["status"] == "unlicensed");
        assert_eq!(dp.get("/status/ready").status, 503);
    }
}
