//! The web console (`GET /ui`) in a real browser: a real control plane with admin tokens
//! and a real data plane in gate mode, the page opened in headless Chromium, and what a
//! person would see checked on each page: the customer and days left, the data plane in
//! the table, a bar per month with the gate's traffic counted, a license added through the
//! form and in force, a license with a bad signature refused with Kong's code, a read
//! token that cannot delete, and no sign-in without a token file. A screenshot of each
//! page goes to `target/console-screenshots/`.

#[path = "console/browser.rs"]
mod browser;

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use browser::Browser;
use charter_tests::{eventually, free_port, http, http_with_headers, Body, Cp, Dp, Resp, Vendor};
use serde_json::{json, Value};
use tempfile::TempDir;

const WRITE_TOKEN: &str = "console-write-token";
const READ_TOKEN: &str = "console-read-token";
/// Requests sent through the gate: the usage the console must show.
const GATED: u64 = 7;

/// A request to the admin API with a token.
fn call(cp: &Cp, token: &str, method: &str, path: &str, body: Option<Body>) -> Resp {
    http_with_headers(method, &cp.url(path), body, &[("Kong-Admin-Token", token)])
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn get(cp: &Cp, path: &str) -> Value {
    let resp = call(cp, WRITE_TOKEN, "GET", path, None);
    assert_eq!(resp.status, 200, "GET {path}: {}", resp.body);
    resp.json()
}

/// `YYYY-MM-DD`, `days` from today (UTC).
fn day(days: i64) -> String {
    (time::OffsetDateTime::now_utc().date() + time::Duration::days(days)).to_string()
}

/// Where the screenshots go: `target/console-screenshots`, beside the built binaries.
fn screenshots_dir() -> PathBuf {
    let bin = charter_tests::bin("charter-cp");
    bin.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/charter-cp")
        .join("console-screenshots")
}

/// An upstream that answers every request with 200, for the gate to forward to.
async fn upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new().fallback(|| async { "ok" });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

/// The scenario mixes the harness's blocking helpers (ureq, bounded polling with thread
/// sleeps) with fantoccini's async calls. `block_on` runs it on the test's own thread, so a
/// blocking call never stalls the runtime's workers, which serve the upstream and the
/// WebDriver connection meanwhile.
#[test]
fn the_console_shows_the_cluster_and_drives_the_license_api_in_a_browser() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(scenario());
}

async fn scenario() {
    let dir = TempDir::new().expect("temp dir");
    let vendor = Vendor::new(dir.path(), 73);
    let key = vendor.public_key.to_string_lossy().into_owned();
    let tokens = dir.path().join("tokens");
    fs::write(&tokens, format!("{WRITE_TOKEN} write\n{READ_TOKEN} read\n")).expect("tokens");
    let cp = Cp::start(
        dir.path(),
        &[
            "--trusted-key",
            &key,
            "--admin-token-file",
            &tokens.to_string_lossy(),
        ],
    );

    // A license in its last 90 days, so the page has a phase and a warning to show.
    let expiring = vendor.license("console-key-expiring", &day(-300), &day(60));
    let added = call(
        &cp,
        WRITE_TOKEN,
        "POST",
        "/licenses",
        Some(Body::Json(json!({ "payload": expiring }))),
    );
    assert_eq!(added.status, 201, "{}", added.body);
    let expiring_id = added.json()["id"].as_str().expect("id").to_owned();

    // A data plane in gate mode, and traffic through it.
    let upstream = upstream().await;
    let proxy = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let dp = Dp::start(
        dir.path(),
        "edge",
        &cp,
        &vendor.public_key,
        &[
            "--proxy-listen",
            &proxy.to_string(),
            "--upstream",
            &format!("http://{upstream}"),
            "--telemetry-interval",
            "1",
            "--label",
            "region=eu-west",
        ],
    );
    dp.wait_license("the license", |l| l["status"] == "expiring");
    for i in 0..GATED {
        let resp = http("GET", &format!("http://{proxy}/hello/{i}"), None).expect("the gate");
        assert_eq!(resp.status, 200, "{}", resp.body);
    }
    let month = time::OffsetDateTime::now_utc();
    let month = format!("{:04}-{:02}", month.year(), u8::from(month.month()));
    eventually(
        "the gate's traffic in the report",
        Duration::from_secs(20),
        || {
            let report = get(&cp, "/license/report");
            let counted: u64 = report["counters"]
                .as_array()?
                .iter()
                .map(|c| c["request_count"].as_u64().unwrap_or(0))
                .sum();
            (counted == GATED).then_some(())
        },
    );
    let plane = eventually("the data plane in sync", Duration::from_secs(20), || {
        let planes = get(&cp, "/clustering/data-planes");
        let plane = planes["data"].get(0)?.clone();
        (plane["sync_status"] == "in_sync").then_some(plane)
    });
    let status = get(&cp, "/license/status");
    let report = get(&cp, "/license/report");

    let shots = screenshots_dir();
    let browser = Browser::start(&shots).await;

    // Sign-in: the control plane asks for a token; a wrong one is refused with the API's
    // message.
    browser.goto(&cp.url("/ui")).await;
    browser.wait_displayed("#login-form").await;
    browser.wait_for("#login-title", "Sign in").await;
    browser.screenshot("sign-in").await;
    browser.type_into("#token", "not-a-token").await;
    browser.click("#login-form button[type=submit]").await;
    browser
        .wait_text("#login-error", "the refusal", |t| {
            t.contains("That token is not accepted: Invalid credentials")
        })
        .await;
    browser.type_into("#token", WRITE_TOKEN).await;
    browser.click("#login-form button[type=submit]").await;

    // The license in force: customer, days left, status, hashed key, the key that verified
    // it, the timeline and the warnings, as the API says them.
    let license = &status["license"];
    browser
        .wait_for("#license-customer", "Example Company, Inc")
        .await;
    browser
        .wait_for("#access-note", "Signed in with a write token")
        .await;
    let days_left = license["days_left"].as_i64().expect("days_left");
    assert!((59..=61).contains(&days_left), "{status}");
    browser
        .wait_for("#license-days-left", &days_left.to_string())
        .await;
    browser.wait_for("#license-status", "expiring").await;
    browser.wait_for("#license-expires", &day(60)).await;
    let hashed = report["license_key"].as_str().expect("license_key");
    browser.wait_for("#license-key", hashed).await;
    browser.wait_for("#license-key-id", &vendor.key_id()).await;
    let page = browser.client.source().await.expect("page source");
    assert!(
        !page.contains("console-key-expiring"),
        "the raw license key is on the page"
    );
    browser
        .wait_text("#timeline-caption", "the timeline", |t| {
            t.contains("is in the expiring phase")
                && t.contains(&format!("{days_left} days before the license expires"))
        })
        .await;
    let warnings = status["warnings"].as_array().expect("warnings");
    assert!(!warnings.is_empty(), "{status}");
    for (i, warning) in warnings.iter().enumerate() {
        let css = format!("#warnings li:nth-child({})", i + 1);
        browser
            .wait_for(&css, warning.as_str().expect("a string"))
            .await;
    }
    browser.screenshot("license").await;

    // Data planes: the gate's data plane in the table, with its counts.
    browser.click("#nav a[href='#data-planes']").await;
    let hostname = plane["hostname"].as_str().expect("hostname");
    browser
        .wait_text("#dp-body tr:first-child th", "the data plane", |t| {
            t.starts_with(hostname)
        })
        .await;
    browser
        .wait_for("#dp-body tr:first-child td.sync", "in sync")
        .await;
    browser
        .wait_for("#dp-body tr:first-child td.license", "expiring")
        .await;
    browser
        .wait_for("#dp-counts li[data-state='in_sync']", "1 in sync")
        .await;
    browser
        .wait_text("#dp-body tr:first-child", "the label", |t| {
            t.contains("region=eu-west")
        })
        .await;
    browser.screenshot("data-planes").await;

    // Usage: a bar per month of the report, the gate's requests on this month's; then the
    // data plane's own, on demand from its row.
    browser.click("#nav a[href='#usage']").await;
    let months = report["counters"].as_array().expect("counters").len();
    browser
        .wait_count("#usage-chart rect.bar", "a bar per month", |n| n == months)
        .await;
    browser
        .wait_for(
            &format!("#usage-chart g[data-bucket='{month}'] text.value"),
            &GATED.to_string(),
        )
        .await;
    browser.click("#nav a[href='#data-planes']").await;
    browser
        .click("#dp-body tr:first-child button.show-usage")
        .await;
    browser
        .wait_count("#usage-dp-chart rect.bar", "the data plane's bars", |n| {
            n >= 1
        })
        .await;
    browser
        .wait_for(
            &format!("#usage-dp-chart g[data-bucket='{month}'] text.value"),
            &GATED.to_string(),
        )
        .await;
    browser.screenshot("usage").await;
    browser.scroll_to("#usage-dp-title").await;
    browser.screenshot("usage-data-plane").await;

    // Licenses: the one stored, in force.
    browser.click("#nav a[href='#licenses']").await;
    let row = format!("#licenses-body tr[data-id='{expiring_id}']");
    browser
        .wait_text(&format!("{row} td.force"), "the license in force", |t| {
            t.starts_with("In force")
        })
        .await;

    // A license whose payload was changed after signing: refused with Kong's code, shown
    // as the API says it.
    let tampered = vendor
        .license("console-key-new", &day(-1), "2099-12-31")
        .replace("Example Company, Inc", "Tampered Company");
    let refusal = call(
        &cp,
        WRITE_TOKEN,
        "POST",
        "/licenses",
        Some(Body::Json(json!({ "payload": tampered }))),
    );
    assert_eq!(refusal.status, 400, "{}", refusal.body);
    let message = refusal.json()["message"]
        .as_str()
        .expect("message")
        .to_owned();
    assert_eq!(message, "Unable to validate license: validation_fail");
    browser.type_into("#add-text", &tampered).await;
    browser.click("#add-button").await;
    browser
        .wait_text("#add-error", "the refusal", |t| t.starts_with(&message))
        .await;
    browser.screenshot("licenses-refused").await;

    // A newer license chosen as a file: added, and in force.
    let mut payload = charter_tests::payload("console-key-new", &day(-1), "2099-12-31");
    payload.insert("customer".into(), json!("Newer Customer Ltd"));
    let newer = dir.path().join("newer-license.json");
    fs::write(&newer, vendor.sign(payload)).expect("license file");
    browser
        .type_into("#add-file", &newer.to_string_lossy())
        .await;
    browser.click("#add-button").await;
    browser
        .wait_text("#add-done", "the license added", |t| {
            t.starts_with("Added Newer Customer Ltd")
        })
        .await;
    browser.wait_for("#add-error", "").await;
    browser
        .wait_count("#licenses-body tr", "two licenses", |n| n == 2)
        .await;
    let newer_row = "#licenses-body tr.in-force";
    browser
        .wait_text(
            &format!("{newer_row} th"),
            "the new license in force",
            |t| t == "Newer Customer Ltd",
        )
        .await;
    browser
        .wait_text(
            &format!("{row} td.force"),
            "the old one not in force",
            |t| t.starts_with("No"),
        )
        .await;
    browser
        .wait_for(&format!("{newer_row} td.status"), "valid")
        .await;
    browser.screenshot("licenses").await;

    // Replace it with a renewal, pasted into the confirmation dialog.
    let mut renewal = charter_tests::payload("console-key-new", &day(-1), "2098-06-30");
    renewal.insert("customer".into(), json!("Newer Customer Ltd"));
    browser.click(&format!("{newer_row} button.replace")).await;
    browser.wait_displayed("#replace-dialog").await;
    browser
        .type_into("#replace-input", &vendor.sign(renewal))
        .await;
    browser.click("#replace-confirm").await;
    browser
        .wait_for(&format!("{newer_row} td:nth-of-type(2)"), "2098-06-30")
        .await;
    assert!(!browser.displayed("#replace-dialog").await);

    // Delete the old one, through the confirmation dialog.
    browser.click(&format!("{row} button.delete")).await;
    browser.wait_displayed("#delete-dialog").await;
    browser
        .wait_text("#delete-text", "the confirmation", |t| {
            t.contains(&expiring_id)
        })
        .await;
    browser.click("#delete-confirm").await;
    browser
        .wait_count("#licenses-body tr", "one license left", |n| n == 1)
        .await;
    assert_eq!(cp.stored_ids_with(WRITE_TOKEN).len(), 1);

    // The license page follows: the new customer, valid.
    browser.click("#nav a[href='#license']").await;
    browser
        .wait_for("#license-customer", "Newer Customer Ltd")
        .await;
    browser.wait_for("#license-status", "valid").await;

    // A read token sees everything and cannot write: the write controls say so.
    browser.click("#sign-out").await;
    browser.wait_displayed("#login-form").await;
    browser.type_into("#token", READ_TOKEN).await;
    browser.click("#login-form button[type=submit]").await;
    browser
        .wait_for("#access-note", "Signed in with a read token")
        .await;
    browser
        .wait_for("#license-customer", "Newer Customer Ltd")
        .await;
    browser.click("#nav a[href='#licenses']").await;
    browser
        .wait_count("#licenses-body tr", "the license", |n| n == 1)
        .await;
    browser
        .wait_text("#write-note", "the read-only note", |t| {
            t.starts_with("This token can read only")
        })
        .await;
    assert!(!browser.enabled("#licenses-body button.delete").await);
    assert!(!browser.enabled("#licenses-body button.replace").await);
    assert!(!browser.enabled("#add-button").await);
    assert!(!browser.enabled("#add-text").await);
    // Nothing the write token's session did is left on the page.
    browser.wait_for("#add-done", "").await;
    browser.screenshot("licenses-read-only").await;
    assert_eq!(cp.stored_ids_with(READ_TOKEN).len(), 1);

    // Pages of 20, following the API's `offset`.
    for i in 0..20 {
        let document = vendor.license(&format!("console-key-page-{i}"), &day(-1), "2097-01-01");
        let added = call(
            &cp,
            WRITE_TOKEN,
            "POST",
            "/licenses",
            Some(Body::Json(json!({ "payload": document }))),
        );
        assert_eq!(added.status, 201, "{}", added.body);
    }
    browser.click("#nav a[href='#license']").await;
    browser.click("#nav a[href='#licenses']").await;
    browser
        .wait_count("#licenses-body tr", "a first page of 20", |n| n == 20)
        .await;
    assert!(!browser.enabled("#licenses-prev").await);
    browser.click("#licenses-next").await;
    browser
        .wait_count("#licenses-body tr", "the last license", |n| n == 1)
        .await;
    browser.wait_for("#licenses-page", "Page 2").await;
    assert!(!browser.enabled("#licenses-next").await);
    browser.click("#licenses-prev").await;
    browser
        .wait_count("#licenses-body tr", "the first page again", |n| n == 20)
        .await;

    // Without a token file (loopback only) there is no sign-in.
    let open_dir = TempDir::new().expect("temp dir");
    let open_cp = Cp::start(open_dir.path(), &["--trusted-key", &key]);
    browser.goto(&open_cp.url("/ui#license")).await;
    browser
        .wait_for("#access-note", "No admin token configured (loopback only)")
        .await;
    browser.wait_for("#license-status", "unlicensed").await;
    assert!(!browser.displayed("#login-form").await);
    assert!(!browser.displayed("#sign-out").await);

    browser.close().await;
    drop(dp);
}

/// Every license id a control plane with tokens lists.
trait StoredWith {
    fn stored_ids_with(&self, token: &str) -> Vec<String>;
}

impl StoredWith for Cp {
    fn stored_ids_with(&self, token: &str) -> Vec<String> {
        let page = call(self, token, "GET", "/licenses?size=1000", None);
        assert_eq!(page.status, 200, "{}", page.body);
        page.json()["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|r| r["id"].as_str().expect("id").to_owned())
            .collect()
    }
}
