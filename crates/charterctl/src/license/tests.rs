//! Unit tests of `charterctl license`: flag and token parsing, error mapping and what is
//! printed, without a control plane (tests/tests/charterctl_license.rs runs a real one).

use charter_license::LicenseSigner;
use serde_json::{json, Map, Value};
use time::macros::date;

use super::client::{
    api_message, base_url, id_segment, redacted, token_of_file, FailureKind, Token,
};
use super::payload_of;
use super::render::{judge, records_table, report_text, status_text};

#[test]
fn token_files() {
    #[track_caller]
    fn check(text: &str, expected: Result<&str, &str>) {
        match (token_of_file(text), expected) {
            (Ok(token), Ok(want)) => assert_eq!(token, want, "{text:?}"),
            (Err(e), Err(want)) => {
                let e = format!("{e:#}");
                assert!(e.contains(want), "{text:?}: {e}");
                assert!(!e.contains("s3cret"), "the token leaked into {e}");
            }
            (got, want) => panic!("{text:?}: got {got:?}, want {want:?}"),
        }
    }
    check("s3cret\n", Ok("s3cret"));
    check("  s3cret  ", Ok("s3cret"));
    check("# the write token\n\ns3cret\n", Ok("s3cret"));
    check("s3cret write\n", Ok("s3cret"));
    check("s3cret read", Ok("s3cret"));
    check("", Err("holds no token"));
    check("# only a comment\n\n", Err("holds no token"));
    check("s3cret write\nother read\n", Err("holds 2 tokens"));
    check("s3cret admin", Err("alone on its line"));
    check("s3cret write extra", Err("alone on its line"));
    check("s3cr\u{e9}t", Err("HTTP header cannot carry"));
}

#[test]
fn token_sources() {
    let dir = std::env::temp_dir().join(format!("charterctl-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("token");
    std::fs::write(&file, "from-file\n").unwrap();

    let token = Token::load(Some(&file), Some("from-env".into())).unwrap();
    assert_eq!(
        format!("{token:?}"),
        format!("Some(Token(from --admin-token-file {}))", file.display()),
        "the file wins, and Debug never shows the token"
    );
    let token = Token::load(None, Some("  from-env \n".into())).unwrap();
    assert_eq!(
        format!("{token:?}"),
        "Some(Token(from CHARTER_ADMIN_TOKEN))"
    );
    assert!(Token::load(None, Some("   ".into())).unwrap().is_none());
    assert!(Token::load(None, None).unwrap().is_none());

    let missing = dir.join("missing");
    let e = Token::load(Some(&missing), None).unwrap_err();
    assert!(
        format!("{e:#}").starts_with(&format!("reading --admin-token-file {}", missing.display())),
        "{e:#}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn admin_urls() {
    #[track_caller]
    fn check(url: &str, expected: Result<&str, &str>) {
        match (base_url(url), expected) {
            (Ok(base), Ok(want)) => assert_eq!(base, want, "{url}"),
            (Err(e), Err(want)) => assert!(e.to_string().contains(want), "{url}: {e}"),
            (got, want) => panic!("{url}: got {got:?}, want {want:?}"),
        }
    }
    check("http://127.0.0.1:8001", Ok("http://127.0.0.1:8001"));
    check("http://127.0.0.1:8001/", Ok("http://127.0.0.1:8001"));
    check("HTTP://LOCALHOST:8001", Ok("http://localhost:8001"));
    check("http://[::1]:8001", Ok("http://[::1]:8001"));
    check("http://cp.example/admin/", Ok("http://cp.example/admin"));
    check(
        "127.0.0.1:8001",
        Err("has no scheme; write it as http://127.0.0.1:8001"),
    );
    check("https://cp.example", Err("https is not supported"));
    check("ftp://cp.example", Err("scheme `ftp` is not supported"));
    check(
        "http://admin:pw@cp.example",
        Err("`http://***@cp.example` carries credentials"),
    );
    check(
        "admin:pw@cp.example:8001",
        Err("`***@cp.example:8001` has no scheme"),
    );
    check("http://cp.example/?size=1", Err("has a query or fragment"));
    check("http://", Err("is not a URL"));
}

#[test]
fn redacted_urls() {
    for (url, shown) in [
        ("http://127.0.0.1:8001", "http://127.0.0.1:8001"),
        ("http://u:p@h:1/x@y", "http://***@h:1/x@y"),
        ("http://u@h", "http://***@h"),
        ("u:p@h:1", "***@h:1"),
        ("http://h/path?a=b@c", "http://h/path?a=b@c"),
    ] {
        assert_eq!(redacted(url), shown, "{url}");
    }
}

#[test]
fn id_segments() {
    let uuid = "a208bb79-105c-4afe-bd21-a19f5ad550b7";
    assert_eq!(id_segment(uuid).unwrap(), uuid);
    assert_eq!(id_segment("a/b").unwrap(), "a%2Fb");
    assert_eq!(id_segment("a b?c#d").unwrap(), "a%20b%3Fc%23d");
    assert_eq!(id_segment("{x}").unwrap(), "%7Bx%7D");
    assert_eq!(id_segment("é").unwrap(), "%C3%A9");
    for bad in ["", ".", ".."] {
        let e = id_segment(bad).unwrap_err();
        assert!(e.to_string().contains("is not a license id"), "{e}");
    }
}

#[test]
fn exit_codes_are_distinct() {
    use FailureKind::*;
    let table = [
        (400, Invalid, 1),
        (401, Unauthorized, 4),
        (403, Forbidden, 5),
        (404, NotFound, 6),
        (409, Conflict, 7),
        (405, Other, 8),
        (413, Other, 8),
        (500, Other, 8),
        (503, Other, 8),
    ];
    for (status, kind, code) in table {
        assert_eq!(FailureKind::of_status(status), kind, "{status}");
        assert_eq!(kind.exit_code(), code, "{kind:?}");
    }
    assert_eq!(Unreachable.exit_code(), 3);
    let mut codes: Vec<u8> = [
        Invalid,
        Unreachable,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        Other,
    ]
    .iter()
    .map(|k| k.exit_code())
    .collect();
    codes.sort_unstable();
    codes.dedup();
    assert_eq!(codes.len(), 7);
    assert!(
        !codes.contains(&0) && !codes.contains(&2),
        "0 and 2 mean success and a local error"
    );
}

#[test]
fn api_messages() {
    assert_eq!(api_message(r#"{"message":"Not found"}"#), "Not found");
    assert_eq!(
        api_message(
            r#"{"detail":"license is not valid JSON","message":"Unable to validate license: invalid_license_json"}"#
        ),
        "Unable to validate license: invalid_license_json (license is not valid JSON)"
    );
    assert_eq!(api_message(""), "no body");
    assert_eq!(
        api_message("<html>\n <b>Bad gateway</b>\n</html>"),
        "`<html> <b>Bad gateway</b> </html>`"
    );
    let long = "x".repeat(500);
    let quoted = api_message(&long);
    assert_eq!(quoted, format!("`{}…`", "x".repeat(200)));
    assert_eq!(api_message(r#"{"error":"nope"}"#), r#"`{"error":"nope"}`"#);
}

#[test]
fn payloads_of_files() {
    let document = r#"{"license":{"payload":{},"signature":"ab","version":"1"}}"#;
    assert_eq!(payload_of(document.to_owned()), document);
    let record = json!({"id": "x", "payload": document}).to_string();
    assert_eq!(payload_of(record), document);
    assert_eq!(payload_of("not json".to_owned()), "not json");
    let odd = r#"{"payload":{"not":"a string"}}"#;
    assert_eq!(payload_of(odd.to_owned()), odd);
}

fn payload(created: &str, expires: &str) -> Map<String, Value> {
    let Value::Object(map) = json!({
        "admin_seats": "1",
        "customer": "Example Company, Inc",
        "dataplanes": "1",
        "license_creation_date": created,
        "license_expiration_date": expires,
        "license_key": "ACME-0001",
        "product_subscription": "Charter Enterprise",
        "support_plan": "None",
    }) else {
        unreachable!("an object literal")
    };
    map
}

fn document(created: &str, expires: &str) -> String {
    LicenseSigner::from_seed([7; 32])
        .sign(payload(created, expires))
        .expect("a Kong-shaped payload")
        .to_json()
}

#[test]
fn statuses_from_dates() {
    let today = date!(2026 - 06 - 01);
    let table = [
        ("2026-01-01", "2026-12-31", "valid"),
        ("2026-01-01", "2026-08-31", "valid"),
        ("2026-01-01", "2026-08-30", "expiring"),
        ("2026-01-01", "2026-06-01", "expiring"),
        ("2026-01-01", "2026-05-31", "grace"),
        ("2026-01-01", "2026-05-02", "grace"),
        ("2026-01-01", "2026-05-01", "expired"),
        ("2026-06-02", "2027-06-01", "invalid_expiration_date"),
    ];
    for (created, expires, want) in table {
        let document =
            charter_license::LicenseDocument::parse(&document(created, expires)).unwrap();
        let terms = document.terms().unwrap();
        assert_eq!(judge(&terms, today), want, "{created}..{expires}");
    }
}

#[test]
fn the_records_table() {
    let today = date!(2026 - 06 - 01);
    let records = [
        json!({"id": "11111111-1111-1111-1111-111111111111", "payload": document("2026-01-01", "2027-12-31"),
               "created_at": 1_780_000_000, "updated_at": 1_780_000_000}),
        json!({"id": "22222222-2222-2222-2222-222222222222", "payload": document("2026-01-01", "2026-05-20"),
               "created_at": 1_780_000_000, "updated_at": 1_780_086_400}),
        json!({"id": "33333333-3333-3333-3333-333333333333", "payload": "{}", "updated_at": null}),
    ];
    let table = records_table(
        &records,
        today,
        Some("11111111-1111-1111-1111-111111111111"),
    );
    let want = "\
ID                                    CUSTOMER              STATUS                  EXPIRES     DAYS LEFT  UPDATED
11111111-1111-1111-1111-111111111111  Example Company, Inc  valid (in force)        2027-12-31  578        2026-05-28T20:26:40Z
22222222-2222-2222-2222-222222222222  Example Company, Inc  grace                   2026-05-20  -12        2026-05-29T20:26:40Z
33333333-3333-3333-3333-333333333333  -                     invalid_license_format  -           -          -
";
    assert_eq!(table, want);
    let table = records_table(&records[..1], today, None);
    assert!(
        table.lines().nth(1).unwrap().contains("  valid  "),
        "{table}"
    );
}

#[test]
fn the_status_lines() {
    let status = json!({
        "license": {"admin_seats": "1", "customer": "Example Company, Inc", "dataplanes": "1",
                    "days_left": 394, "id": "a208bb79-105c-4afe-bd21-a19f5ad550b7",
                    "key_id": "70fa90d4a9ba4132", "license_creation_date": "2026-01-01",
                    "license_expiration_date": "2027-12-31", "license_key": "ACME-0001",
                    "product_subscription": "Charter Enterprise", "source": "store",
                    "support_plan": "None", "updated_at": 1_780_000_000},
        "source": "store", "status": "valid",
        "warnings": ["stored licenses are not in use"],
    });
    let want = "\
status       valid
source       store
id           a208bb79-105c-4afe-bd21-a19f5ad550b7
customer     Example Company, Inc
product      Charter Enterprise
expires      2027-12-31 (394 days left)
data planes  1
key id       70fa90d4a9ba4132
updated      2026-05-28T20:26:40Z
warning      stored licenses are not in use
";
    let text = status_text(&status);
    assert_eq!(text, want);
    assert!(
        !text.contains("ACME-0001"),
        "the raw license key is never shown"
    );

    let unlicensed =
        json!({"license": null, "source": null, "status": "unlicensed", "warnings": []});
    assert_eq!(status_text(&unlicensed), "status  unlicensed\n");
    let expired = json!({"status": "grace", "source": "store",
                         "license": {"license_expiration_date": "2026-05-20", "days_left": -12}});
    assert!(
        status_text(&expired).contains("expires      2026-05-20 (12 days ago)\n"),
        "{}",
        status_text(&expired)
    );
}

#[test]
fn the_report_lines() {
    let report = json!({
        "counters": [{"bucket": "2026-05", "request_count": 12}, {"bucket": "2026-06", "request_count": 0}],
        "db_version": "sled 0.34.7",
        "deployment_info": {"connected_dp_count": 2, "type": "hybrid"},
        "kong_version": "0.1.0",
        "license_key": "4ce93c68f968e8bbc2fc36b5cf8e6fa3",
        "licensed_dataplanes": 3,
        "rbac_users": 2,
        "services_count": 1,
        "system_info": {"cores": 2, "hostname": "f87fc752", "uname": "Linux x86_64"},
        "workspaces_count": 1,
    });
    let want = "\
license key            4ce93c68f968e8bbc2fc36b5cf8e6fa3
licensed data planes   3
connected data planes  2
services               1
admin tokens           2
version                0.1.0 (sled 0.34.7)
system                 Linux x86_64, 2 cores, host f87fc752

MONTH    REQUESTS
2026-05  12
2026-06  0
";
    assert_eq!(report_text(&report), want);

    let mut by_plane = report.clone();
    by_plane["dataplanes"] = json!([
        {"id": "dp-1", "counters": [{"bucket": "2026-05", "request_count": 12}]},
        {"id": "dp-2", "counters": []},
    ]);
    let text = report_text(&by_plane);
    assert!(
        text.ends_with("\nDATA PLANE  MONTH    REQUESTS\ndp-1        2026-05  12\n"),
        "{text}"
    );
    // An unlicensed control plane's report has nulls: shown as `-`, never a panic.
    let unlicensed =
        json!({"license_key": "UNLICENSED", "licensed_dataplanes": null, "counters": []});
    assert!(report_text(&unlicensed).contains("licensed data planes   -\n"));
}

#[test]
fn the_help_lists_the_exit_codes() {
    use clap::CommandFactory;
    let help = crate::Args::command()
        .find_subcommand_mut("license")
        .expect("the license command")
        .render_long_help()
        .to_string();
    for line in [
        "  3  the admin API could not be reached",
        "  5  403: a read token used for a write",
        "  7  409: that license is already stored",
    ] {
        assert!(help.contains(line), "{help}");
    }
}
