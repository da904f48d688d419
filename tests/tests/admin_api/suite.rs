//! End-to-end tests of the real `charter-cp` binary's admin API: every row of DESIGN.md's
//! admin table, success and each error, Kong's and Consul's documented flows, auth,
//! pagination, static license precedence, bad input, a drain and restart, metrics.
//!
//! One suite, two backends: `cp_api.rs` includes it on sled and `cp_api_postgres.rs` on
//! PostgreSQL, each setting `super::BACKEND`, so every body runs on both and expects the
//! same answers from each.

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use charter_tests::{eventually, http_with_headers, request, run, Body, Cp, Vendor};
use serde_json::{json, Value};
use tempfile::TempDir;

use super::BACKEND;

pub(crate) fn setup() -> (TempDir, Vendor) {
    let dir = TempDir::new().expect("temp dir");
    let vendor = Vendor::new(dir.path(), 11);
    (dir, vendor)
}

fn start(dir: &TempDir, vendor: &Vendor) -> Cp {
    let key = vendor.public_key.to_string_lossy().into_owned();
    Cp::start_on(BACKEND, dir.path(), &["--trusted-key", &key])
}

fn status_of(cp: &Cp) -> Value {
    let resp = cp.get("/license/status");
    assert_eq!(resp.status, 200, "{}", resp.body);
    resp.json()
}

#[test]
fn licenses_table_every_row() {
    let (dir, vendor) = setup();
    let cp = start(&dir, &vendor);

    // GET /licenses: empty.
    let list = cp.get("/licenses");
    assert_eq!(list.status, 200);
    assert_eq!(list.json()["data"], json!([]));
    assert_eq!(list.json()["next"], Value::Null);

    // POST /licenses: 201 with a record.
    let doc = vendor.valid("KEY-A");
    let record = cp.add(&doc);
    let id = record["id"].as_str().expect("id").to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok());
    assert_eq!(record["payload"], json!(doc));
    assert_eq!(record["checksum"].as_str().map(str::len), Some(64));
    assert_eq!(record["created_at"], record["updated_at"]);

    // POST the same payload: 409, in Kong's unique-violation shape.
    let dup = cp.send_json("POST", "/licenses", &json!({"payload": doc}));
    assert_eq!(dup.status, 409, "{}", dup.body);
    assert_eq!(dup.json()["name"], "unique constraint violation");
    assert!(dup.body.contains(&id));
    // The same license with other whitespace and key order is the same payload.
    let reformatted =
        serde_json::to_string_pretty(&serde_json::from_str::<Value>(&doc).expect("json"))
            .expect("pretty");
    assert_eq!(
        cp.send_json("POST", "/licenses", &json!({"payload": reformatted}))
            .status,
        409
    );

    // POST errors.
    let bad = cp.send_json(
        "POST",
        "/licenses",
        &json!({"payload": doc.replace("Example", "Exemple")}),
    );
    assert_eq!(bad.status, 400);
    assert_eq!(
        bad.json()["message"],
        "Unable to validate license: validation_fail"
    );
    let not_json = cp.send_json("POST", "/licenses", &json!({"payload": "nope"}));
    assert_eq!(
        not_json.json()["message"],
        "Unable to validate license: invalid_license_json"
    );
    let missing = cp.send_json("POST", "/licenses", &json!({}));
    assert_eq!(missing.status, 400);
    assert_eq!(
        missing.json(),
        json!({"code": 2, "name": "schema violation",
               "message": "schema violation (payload: required field missing)",
               "fields": {"payload": "required field missing"}})
    );
    let wrong_type = cp.send_json("POST", "/licenses", &json!({"payload": 5}));
    assert_eq!(wrong_type.json()["fields"]["payload"], "expected a string");
    let unknown = cp.send_json(
        "POST",
        "/licenses",
        &json!({"payload": doc, "color": "red"}),
    );
    assert_eq!(unknown.json()["fields"]["color"], "unknown field");
    let raw = request(
        "POST",
        &cp.url("/licenses"),
        Some(Body::Raw("application/json".into(), b"{bad".to_vec())),
    );
    assert_eq!(raw.status, 400);
    assert_eq!(raw.json()["message"], "Cannot parse JSON body");

    // GET /licenses/{id}.
    let got = cp.get(&format!("/licenses/{id}"));
    assert_eq!(got.status, 200);
    assert_eq!(got.json(), record);
    let absent = cp.get(&format!("/licenses/{}", uuid::Uuid::new_v4()));
    assert_eq!(
        (absent.status, absent.json()),
        (404, json!({"message": "Not found"}))
    );
    // An id that is not a canonical UUID is a schema violation, as in Kong.
    assert_eq!(cp.get("/licenses/not-a-uuid").status, 400);

    // PUT /licenses/{id}: create with that id, then replace keeping created_at.
    let put_id = uuid::Uuid::new_v4().to_string();
    let doc_b = vendor.valid("KEY-B");
    let created = cp.send_json(
        "PUT",
        &format!("/licenses/{put_id}"),
        &json!({"payload": doc_b}),
    );
    assert_eq!(created.status, 200, "{}", created.body);
    assert_eq!(created.json()["id"], json!(put_id));
    std::thread::sleep(Duration::from_millis(1100));
    let doc_c = vendor.valid("KEY-C");
    let replaced = cp.send_json(
        "PUT",
        &format!("/licenses/{put_id}"),
        &json!({"payload": doc_c}),
    );
    assert_eq!(replaced.status, 200);
    assert_eq!(replaced.json()["created_at"], created.json()["created_at"]);
    assert!(replaced.json()["updated_at"].as_i64() > created.json()["updated_at"].as_i64());
    assert_eq!(replaced.json()["payload"], json!(doc_c));
    assert_eq!(
        cp.send_json("PUT", "/licenses/nope", &json!({"payload": doc_c}))
            .json()["fields"]["id"],
        "expected a valid UUID"
    );
    assert_eq!(
        cp.send_json(
            "PUT",
            &format!("/licenses/{put_id}"),
            &json!({"payload": "{}"})
        )
        .status,
        400
    );
    // PUT of a payload stored under another id: 409.
    assert_eq!(
        cp.send_json(
            "PUT",
            &format!("/licenses/{put_id}"),
            &json!({"payload": doc})
        )
        .status,
        409
    );
    // PUT /licenses: 405.
    let put_collection = cp.send_json("PUT", "/licenses", &json!({"payload": doc}));
    assert_eq!(
        (put_collection.status, put_collection.json()),
        (405, json!({"message": "Method not allowed"}))
    );

    // PATCH /licenses/{id}: updated_at moves; unknown id 404; invalid license 400.
    std::thread::sleep(Duration::from_millis(1100));
    let patched = cp.send_json(
        "PATCH",
        &format!("/licenses/{id}"),
        &json!({"payload": vendor.valid("KEY-A2")}),
    );
    assert_eq!(patched.status, 200, "{}", patched.body);
    assert!(patched.json()["updated_at"].as_i64() > record["updated_at"].as_i64());
    assert_eq!(patched.json()["created_at"], record["created_at"]);
    assert_eq!(
        cp.send_json(
            "PATCH",
            &format!("/licenses/{}", uuid::Uuid::new_v4()),
            &json!({"payload": vendor.valid("X")})
        )
        .status,
        404
    );
    assert_eq!(
        cp.send_json(
            "PATCH",
            &format!("/licenses/{id}"),
            &json!({"payload": "garbage"})
        )
        .status,
        400
    );

    // DELETE /licenses/{id}: 204, then 404 on GET; deleting again is still 204.
    assert_eq!(cp.send("DELETE", &format!("/licenses/{id}")).status, 204);
    assert_eq!(cp.get(&format!("/licenses/{id}")).status, 404);
    assert_eq!(cp.send("DELETE", &format!("/licenses/{id}")).status, 204);
    assert_eq!(cp.send("DELETE", "/licenses/not-a-uuid").status, 400);

    // Unknown routes and methods.
    assert_eq!(
        cp.get("/nothing-here").json(),
        json!({"message": "Not found"})
    );
    assert_eq!(cp.send("DELETE", "/licenses").status, 405);
}

#[test]
fn form_bodies_work_like_json() {
    let (dir, vendor) = setup();
    let cp = start(&dir, &vendor);
    let doc = vendor.valid("FORM-1");
    let created = cp.send_form("POST", "/licenses", &[("payload", &doc)]);
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.json()["id"].as_str().expect("id").to_owned();
    assert_eq!(
        cp.send_form("POST", "/licenses", &[("payload", &doc)])
            .status,
        409
    );
    let patched = cp.send_form(
        "PATCH",
        &format!("/licenses/{id}"),
        &[("payload", &vendor.valid("FORM-2"))],
    );
    assert_eq!(patched.status, 200, "{}", patched.body);
    let missing = cp.send_form("POST", "/licenses", &[("other", "x")]);
    assert_eq!(missing.status, 400);
    assert_eq!(
        missing.json()["fields"]["payload"],
        "required field missing"
    );
    let xml = request(
        "POST",
        &cp.url("/licenses"),
        Some(Body::Raw("application/xml".into(), b"<a/>".to_vec())),
    );
    assert_eq!(xml.status, 415);
}

#[test]
fn pagination_over_260_licenses() {
    let (dir, vendor) = setup();
    let cp = start(&dir, &vendor);
    let mut ids = HashSet::new();
    for i in 0..260 {
        ids.insert(
            cp.add(&vendor.valid(&format!("PAGE-{i}")))["id"]
                .as_str()
                .expect("id")
                .to_owned(),
        );
    }
    let mut seen = Vec::new();
    let mut path = "/licenses?size=100".to_owned();
    let mut pages = 0;
    loop {
        let page = cp.get(&path);
        assert_eq!(page.status, 200, "{path}: {}", page.body);
        let page = page.json();
        for record in page["data"].as_array().expect("data") {
            seen.push(record["id"].as_str().expect("id").to_owned());
        }
        pages += 1;
        match page["next"].as_str() {
            Some(next) => {
                assert!(
                    next.starts_with("/licenses?offset=") && next.ends_with("&size=100"),
                    "{next}"
                );
                assert_eq!(page["data"].as_array().map(Vec::len), Some(100));
                path = next.to_owned();
            }
            None => break,
        }
        assert!(pages < 10, "pagination does not end");
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 260, "no record seen twice");
    assert_eq!(seen.iter().cloned().collect::<HashSet<_>>(), ids);
    // Default size is 100; bounds and bad offsets are Kong's errors.
    assert_eq!(
        cp.get("/licenses").json()["data"].as_array().map(Vec::len),
        Some(100)
    );
    assert_eq!(
        cp.get("/licenses?size=1000").json()["data"]
            .as_array()
            .map(Vec::len),
        Some(260)
    );
    for bad in ["0", "1001", "abc", "-1"] {
        let resp = cp.get(&format!("/licenses?size={bad}"));
        assert_eq!(resp.status, 400, "size={bad}");
        assert_eq!(
            resp.json()["message"],
            "size must be an integer between 1 and 1000"
        );
    }
    let bad_offset = cp.get("/licenses?offset=!!!");
    assert_eq!(bad_offset.status, 400);
    assert_eq!(bad_offset.json()["name"], "invalid offset");
}

/// Kong's Licenses Examples (seed 003), replayed with HTTPie as the docs do.
#[test]
fn seed_003_flow_with_httpie() {
    let http_bin = charter_tests::workspace_root().join(".venv/bin/http");
    assert!(
        http_bin.exists(),
        "{} is missing: run scripts/install-deps",
        http_bin.display()
    );
    let (dir, vendor) = setup();
    let cp = start(&dir, &vendor);
    let port = format!(":{}", cp.addr.port());
    let http = |args: &[&str]| -> (u16, Value) {
        let out = Command::new(&http_bin)
            .args(["--ignore-stdin", "--print=hb", "--pretty=none"])
            .args(args)
            .output()
            .expect("running httpie");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let status: u16 = text
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in: {text}"));
        let body = text
            .split("\r\n\r\n")
            .nth(1)
            .or_else(|| text.split("\n\n").nth(1))
            .unwrap_or("")
            .trim();
        let json = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
        };
        (status, json)
    };
    let list = |base: &str| http(&["GET", &format!("{base}/licenses")]);
    // List: does not contain any licenses.
    let (status, body) = list(&port);
    assert_eq!(
        (status, &body["data"], &body["next"]),
        (200, &json!([]), &Value::Null)
    );
    // Add a license: auto-generated id.
    let doc = vendor.license(
        "00141000017ODj3AAG_a1V41000004wT0OEAU",
        "2026-01-01",
        "2099-12-31",
    );
    let (status, added) = http(&[
        "POST",
        &format!("{port}/licenses"),
        &format!("payload={doc}"),
    ]);
    assert_eq!(status, 201, "{added}");
    let id = added["id"].as_str().expect("id").to_owned();
    // Add a license: manual id, by PUT.
    let manual = "e8201120-4ee3-4f3c-b1c9-3a1f43df1e0c";
    let doc2 = vendor.valid("MANUAL-ID");
    let (status, put) = http(&[
        "PUT",
        &format!("{port}/licenses/{manual}"),
        &format!("payload={doc2}"),
    ]);
    assert_eq!((status, put["id"].as_str()), (200, Some(manual)), "{put}");
    // Update a license.
    let doc3 = vendor.valid("UPDATED");
    let (status, patched) = http(&[
        "PATCH",
        &format!("{port}/licenses/{id}"),
        &format!("payload={doc3}"),
    ]);
    assert_eq!((status, &patched["payload"]), (200, &json!(doc3)));
    // List: contains both.
    let (status, body) = list(&port);
    assert_eq!(
        (status, body["data"].as_array().map(Vec::len)),
        (200, Some(2))
    );
    // Get one.
    let (status, one) = http(&["GET", &format!("{port}/licenses/{manual}")]);
    assert_eq!((status, &one["payload"]), (200, &json!(doc2)));
    // Delete.
    let (status, _) = http(&["DELETE", &format!("{port}/licenses/{id}")]);
    assert_eq!(status, 204);
    let (status, body) = http(&["GET", &format!("{port}/licenses/{id}")]);
    assert_eq!((status, body), (404, json!({"message": "Not found"})));
}

/// Consul's `/v1/operator/license` (seed 004): GET, PUT, DELETE.
#[test]
fn seed_004_consul_flow() {
    let (dir, vendor) = setup();
    let cp = start(&dir, &vendor);
    let empty = cp.get("/v1/operator/license").json();
    assert_eq!(
        (empty["Valid"].clone(), empty["License"].clone()),
        (json!(false), Value::Null)
    );

    let mut first = charter_tests::payload("CONSUL-1", "2026-01-01", "2099-12-31");
    first.insert("features".into(), json!(["rbac", "gate"]));
    let first = vendor.sign(first);
    let put = request(
        "PUT",
        &cp.url("/v1/operator/license"),
        Some(Body::Raw("text/plain".into(), first.clone().into_bytes())),
    );
    assert_eq!(put.status, 200, "{}", put.body);
    let put = put.json();
    assert_eq!(put["Valid"], true);
    let license = &put["License"];
    assert_eq!(license["customer_id"], "Example Company, Inc");
    assert_eq!(license["installation_id"], "*");
    assert_eq!(license["issue_time"], "2026-01-01T00:00:00Z");
    assert_eq!(license["expiration_time"], "2099-12-31T23:59:59.999Z");
    assert_eq!(license["product"], "Charter Enterprise");
    assert_eq!(license["features"], json!(["rbac", "gate"]));
    assert_eq!(license["temporary"], false);
    let first_id = license["license_id"].as_str().expect("id").to_owned();
    assert_eq!(
        cp.get(&format!("/licenses/{first_id}")).status,
        200,
        "stored like any license"
    );

    // ?signed=1 returns the raw document.
    let signed = cp.get("/v1/operator/license?signed=1");
    assert_eq!(
        signed.json(),
        serde_json::from_str::<Value>(&first).expect("json")
    );

    std::thread::sleep(Duration::from_millis(1100));
    let second = vendor.valid("CONSUL-2");
    let put2 = request(
        "PUT",
        &cp.url("/v1/operator/license"),
        Some(Body::Raw("application/json".into(), second.into_bytes())),
    );
    let second_id = put2.json()["License"]["license_id"]
        .as_str()
        .expect("id")
        .to_owned();
    assert_ne!(second_id, first_id);
    assert_eq!(
        cp.get("/v1/operator/license").json()["License"]["license_id"],
        json!(second_id)
    );

    // DELETE removes the license in force; the previous one takes over.
    let deleted = cp.send("DELETE", "/v1/operator/license");
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    assert_eq!(deleted.json()["License"]["license_id"], json!(first_id));
    assert_eq!(cp.get(&format!("/licenses/{second_id}")).status, 404);
    // Deleting the last valid license is refused and changes nothing.
    let refused = cp.send("DELETE", "/v1/operator/license");
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(refused.json()["message"]
        .as_str()
        .expect("message")
        .contains("no valid license"));
    assert_eq!(cp.get(&format!("/licenses/{first_id}")).status, 200);

    // A bad license on PUT is refused with the validation code.
    let bad = request(
        "PUT",
        &cp.url("/v1/operator/license"),
        Some(Body::Raw("text/plain".into(), b"{\"license\":{}}".to_vec())),
    );
    assert_eq!(bad.status, 400);
    assert!(bad.json()["message"]
        .as_str()
        .expect("message")
        .contains("invalid_license_format"));
}

#[test]
fn effective_license_is_newest_verified_and_status_explains() {
    let (dir, vendor) = setup();
    let cp = start(&dir, &vendor);
    assert_eq!(status_of(&cp)["status"], "unlicensed");
    let valid = cp.add(&vendor.valid("RENEWAL"));
    assert_eq!(status_of(&cp)["license"]["id"], valid["id"]);
    assert_eq!(status_of(&cp)["license"]["key_id"], json!(vendor.key_id()));
    std::thread::sleep(Duration::from_millis(1100));
    // An expired but validly signed license is accepted (201), logged as a warning, and
    // being the newest it is in force, with a warning that another one is valid.
    let expired = cp.add(&vendor.license("STALE", "2020-01-01", "2021-01-01"));
    assert!(cp.logs().contains("has expired"), "logs: {}", cp.logs());
    let status = status_of(&cp);
    assert_eq!(status["license"]["id"], expired["id"]);
    assert_eq!(status["status"], "expired");
    let warnings = status["warnings"].to_string();
    assert!(
        warnings.contains("another stored license has not"),
        "{warnings}"
    );
    // PATCH with no payload moves updated_at and puts the valid one back in force.
    std::thread::sleep(Duration::from_millis(1100));
    let id = valid["id"].as_str().expect("id");
    assert_eq!(
        cp.send_json("PATCH", &format!("/licenses/{id}"), &json!({}))
            .status,
        200
    );
    assert_eq!(status_of(&cp)["license"]["id"], valid["id"]);
    assert_eq!(status_of(&cp)["status"], "valid");
    // A license signed by an untrusted key never gets in.
    let stranger = Vendor::new(dir.path(), 99);
    assert_eq!(
        cp.send_json(
            "POST",
            "/licenses",
            &json!({"payload": stranger.valid("X")})
        )
        .status,
        400
    );
}

#[test]
fn report_has_kong_fields_and_no_raw_secrets() {
    let (dir, vendor) = setup();
    let cp = start(&dir, &vendor);
    let unlicensed = cp.get("/license/report").json();
    assert_eq!(unlicensed["license_key"], "UNLICENSED");
    cp.add(&vendor.valid("SECRET-LICENSE-KEY-123"));
    let resp = cp.get("/license/report");
    assert_eq!(resp.status, 200);
    let report = resp.json();
    assert_eq!(report["counters"], json!([]));
    assert!(report["db_version"]
        .as_str()
        .expect("db_version")
        .starts_with(BACKEND.db_version_prefix()));
    assert!(report["kong_version"].is_string());
    let key = report["license_key"].as_str().expect("license_key");
    assert!(key.len() >= 16 && key != "UNLICENSED");
    assert!(
        !resp.body.contains("SECRET-LICENSE-KEY-123"),
        "raw license key leaked: {}",
        resp.body
    );
    assert_eq!(report["rbac_users"], 0);
    assert_eq!(report["services_count"], 0);
    assert_eq!(report["workspaces_count"], 1);
    assert!(report["system_info"]["cores"].as_u64() >= Some(1));
    assert!(report["system_info"]["uname"].is_string());
    let hostname = String::from_utf8(Command::new("hostname").output().expect("hostname").stdout)
        .expect("utf-8");
    assert!(!resp.body.contains(hostname.trim()), "raw hostname leaked");
    assert_eq!(
        report["deployment_info"],
        json!({"type": "hybrid", "connected_dp_count": 0})
    );
    assert_eq!(report["licensed_dataplanes"], 1);
}

#[test]
fn admin_tokens() {
    let (dir, vendor) = setup();
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        "# admin tokens\nreader-token read\nwriter-token write\n",
    )
    .expect("write tokens");
    let key = vendor.public_key.to_string_lossy().into_owned();
    let cp = Cp::start_on(
        BACKEND,
        dir.path(),
        &[
            "--trusted-key",
            &key,
            "--admin-token-file",
            &tokens.to_string_lossy(),
        ],
    );
    let call = |method: &str, path: &str, headers: &[(&str, &str)], body: Option<Body>| {
        http_with_headers(method, &cp.url(path), body, headers).expect("answer")
    };
    let doc = || {
        Some(Body::Json(
            json!({"payload": vendor.valid(&uuid::Uuid::new_v4().to_string())}),
        ))
    };
    // /status is open; everything else needs a token.
    assert_eq!(call("GET", "/status", &[], None).status, 200);
    for path in [
        "/licenses",
        "/license/report",
        "/license/status",
        "/metrics",
        "/v1/operator/license",
    ] {
        assert_eq!(call("GET", path, &[], None).status, 401, "{path}");
    }
    assert_eq!(
        call("GET", "/licenses", &[("Kong-Admin-Token", "wrong")], None).status,
        401
    );
    assert_eq!(
        call(
            "GET",
            "/licenses",
            &[("Kong-Admin-Token", "reader-token")],
            None
        )
        .status,
        200
    );
    assert_eq!(
        call(
            "GET",
            "/licenses",
            &[("Authorization", "Bearer reader-token")],
            None
        )
        .status,
        200
    );
    // A read token cannot write; a write token can, by either header.
    let forbidden = call(
        "POST",
        "/licenses",
        &[("Kong-Admin-Token", "reader-token")],
        doc(),
    );
    assert_eq!(forbidden.status, 403, "{}", forbidden.body);
    assert_eq!(
        call(
            "POST",
            "/licenses",
            &[("Kong-Admin-Token", "writer-token")],
            doc()
        )
        .status,
        201
    );
    assert_eq!(
        call(
            "POST",
            "/licenses",
            &[("Authorization", "Bearer writer-token")],
            doc()
        )
        .status,
        201
    );
    assert_eq!(
        call(
            "DELETE",
            "/v1/operator/license",
            &[("Kong-Admin-Token", "reader-token")],
            None
        )
        .status,
        403
    );
    assert_eq!(
        call(
            "GET",
            "/license/report",
            &[("Kong-Admin-Token", "reader-token")],
            None
        )
        .json()["rbac_users"],
        2
    );
}

#[test]
fn static_license_wins_on_this_node() {
    let (dir, vendor) = setup();
    let key = vendor.public_key.to_string_lossy().into_owned();
    let static_doc = vendor.valid("STATIC-KEY");
    let path = dir.path().join("static.json");
    std::fs::write(&path, &static_doc).expect("write");
    let cp = Cp::start_on(
        BACKEND,
        dir.path(),
        &[
            "--trusted-key",
            &key,
            "--license-path",
            &path.to_string_lossy(),
        ],
    );
    let status = status_of(&cp);
    assert_eq!(
        (
            status["source"].clone(),
            status["license"]["license_key"].clone()
        ),
        (json!("static"), json!("STATIC-KEY"))
    );
    cp.add(&vendor.valid("STORED-KEY"));
    let status = status_of(&cp);
    assert_eq!(
        status["license"]["license_key"], "STATIC-KEY",
        "stored licenses are ignored on this node"
    );
    assert!(status["warnings"].to_string().contains("static license"));
    drop(cp);
    // The same through CHARTER_LICENSE_DATA.
    let dir2 = TempDir::new().expect("temp dir");
    let cp = Cp::start_on_with_env(
        BACKEND,
        dir2.path(),
        &["--trusted-key", &key],
        &[("CHARTER_LICENSE_DATA", &static_doc)],
    );
    assert_eq!(status_of(&cp)["source"], "static");
}

#[test]
fn bad_input_never_crashes_and_nothing_is_lost() {
    let (dir, vendor) = setup();
    let cp = start(&dir, &vendor);
    let kept = cp.add(&vendor.valid("KEEP-ME"));
    let huge = vec![b'a'; 2 * 1024 * 1024];
    let too_large = http_with_headers(
        "POST",
        &cp.url("/licenses"),
        Some(Body::Raw("application/json".into(), huge)),
        &[],
    );
    if let Ok(resp) = too_large {
        assert_eq!(resp.status, 413, "{}", resp.body);
    }
    let cases: Vec<(&str, &str, Body)> = vec![
        (
            "POST",
            "/licenses",
            Body::Raw("application/json".into(), b"{\"payload\":".to_vec()),
        ),
        (
            "POST",
            "/licenses",
            Body::Raw("application/json".into(), b"[1,2]".to_vec()),
        ),
        (
            "POST",
            "/licenses",
            Body::Raw("application/json".into(), b"\xff\xfe".to_vec()),
        ),
        (
            "POST",
            "/licenses",
            Body::Json(json!({"payload": {"license": {}}})),
        ),
        (
            "POST",
            "/licenses",
            Body::Json(json!({"payload": "x", "id": 7})),
        ),
        (
            "POST",
            "/licenses",
            Body::Json(json!({"payload": vendor.valid("Y"), "id": "not-uuid"})),
        ),
        (
            "POST",
            "/licenses",
            Body::Raw(
                "application/x-www-form-urlencoded".into(),
                b"payload=%ZZ".to_vec(),
            ),
        ),
        ("PUT", "/licenses/%00", Body::Json(json!({"payload": "x"}))),
        (
            "PATCH",
            "/licenses/12345",
            Body::Json(json!({"payload": "x"})),
        ),
        (
            "PUT",
            "/v1/operator/license",
            Body::Raw("text/plain".into(), b"\xff".to_vec()),
        ),
        (
            "GET",
            "/licenses?size=99999999999999999999999",
            Body::Raw("text/plain".into(), vec![]),
        ),
    ];
    for (method, path, body) in cases {
        let resp =
            http_with_headers(method, &cp.url(path), Some(body.clone()), &[]).expect("an answer");
        assert!(
            (400..500).contains(&resp.status),
            "{method} {path} {body:?}: {} {}",
            resp.status,
            resp.body
        );
        assert!(
            resp.content_type.contains("json"),
            "{method} {path}: JSON error body, got {}",
            resp.content_type
        );
        let _ = resp.json();
    }
    assert_eq!(cp.get("/status").status, 200, "still up");
    assert_eq!(
        cp.get(&format!("/licenses/{}", kept["id"].as_str().expect("id")))
            .status,
        200,
        "nothing lost"
    );
}

#[test]
fn sigterm_drains_and_exits_zero_and_data_survives_restart() {
    let (dir, vendor) = setup();
    let mut cp = start(&dir, &vendor);
    let record = cp.add(&vendor.valid("DURABLE"));
    let epoch = cp.get("/status").json()["database"]["epoch"].clone();
    let status = cp.terminate();
    assert!(status.success(), "exit status {status}");
    cp.restart();
    let id = record["id"].as_str().expect("id");
    assert_eq!(cp.get(&format!("/licenses/{id}")).json(), record);
    let health = cp.get("/status").json();
    assert_eq!(
        health["database"]["epoch"], epoch,
        "the store's epoch survives a restart"
    );
    assert_eq!(health["database"]["revision"], 1);
}

#[test]
fn metrics_count_requests_by_route_and_show_license_gauges() {
    let (dir, vendor) = setup();
    let cp = start(&dir, &vendor);
    cp.add(&vendor.license("METRICS", "2026-01-01", "2099-12-31"));
    let _ = cp.get(&format!("/licenses/{}", uuid::Uuid::new_v4()));
    let text = eventually("metrics", Duration::from_secs(5), || {
        let text = cp.get("/metrics").body;
        text.contains("route=\"/licenses/{id}\"").then_some(text)
    });
    assert!(
        text.contains(
            "charter_http_requests_total{method=\"POST\",route=\"/licenses\",status=\"201\"} 1"
        ),
        "{text}"
    );
    assert!(text.contains("status=\"404\""), "{text}");
    assert!(
        text.contains("charter_http_request_duration_seconds_bucket"),
        "{text}"
    );
    assert!(text.contains("charter_licenses_stored 1"), "{text}");
    assert!(text.contains("charter_license_days_left"), "{text}");
    assert!(
        text.contains("charter_license_status{status=\"valid\"} 1"),
        "{text}"
    );
}

#[test]
fn charterctl_verifies_an_admin_api_record() {
    let (dir, vendor) = setup();
    let cp = start(&dir, &vendor);
    let record = cp.add(&vendor.valid("ROUNDTRIP"));
    let path = dir.path().join("record.json");
    std::fs::write(&path, record.to_string()).expect("write");
    let out = run(
        "charterctl",
        &[
            "verify",
            "--trusted-key",
            &vendor.public_key.to_string_lossy(),
            &path.to_string_lossy(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("valid:"));
}
