//! The real `charter-cp` admin API is strict about what it reads: only canonical UUIDs
//! name a license, a body field given twice is refused, the `Bearer` scheme matches in any
//! case, and every error answered before a route runs is JSON, but for the ones hyper
//! answers itself (the list in README.md), which these tests pin down over raw TCP.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use charter_tests::{http_with_headers, Body, Cp, Vendor};
use serde_json::{json, Value};
use tempfile::TempDir;

fn start(args: &[&str]) -> (TempDir, Vendor, Cp) {
    let dir = TempDir::new().expect("temp dir");
    let vendor = Vendor::new(dir.path(), 21);
    let key = vendor.public_key.to_string_lossy().into_owned();
    let mut all = vec!["--trusted-key", key.as_str()];
    all.extend_from_slice(args);
    let cp = Cp::start(dir.path(), &all);
    (dir, vendor, cp)
}

fn schema_violation(field: &str, message: &str) -> Value {
    json!({
        "code": 2,
        "name": "schema violation",
        "message": format!("schema violation ({field}: {message})"),
        "fields": {field: message},
    })
}

/// The ids of the stored licenses, in order.
fn stored_ids(cp: &Cp) -> Vec<String> {
    let list = cp.get("/licenses");
    assert_eq!(list.status, 200, "{}", list.body);
    list.json()["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|r| r["id"].as_str().expect("id").to_owned())
        .collect()
}

#[test]
fn only_canonical_uuids_name_a_license() {
    let (_dir, vendor, cp) = start(&[]);
    let id = cp.add(&vendor.valid("KEY-A"))["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let bare = id.replace('-', "");
    let expected = schema_violation("id", "expected a valid UUID");
    let write = json!({"payload": vendor.valid("KEY-B")});
    for form in [
        format!("urn:uuid:{id}"),
        format!("%7B{id}%7D"),
        bare.clone(),
        bare.to_uppercase(),
        "not-a-uuid".to_owned(),
    ] {
        let path = format!("/licenses/{form}");
        for (method, resp) in [
            ("GET", cp.get(&path)),
            ("PUT", cp.send_json("PUT", &path, &write)),
            ("PATCH", cp.send_json("PATCH", &path, &json!({}))),
            ("DELETE", cp.send("DELETE", &path)),
        ] {
            assert_eq!(resp.status, 400, "{method} {path}: {}", resp.body);
            assert_eq!(resp.json(), expected, "{method} {path}");
        }
        let resp = cp.send_json(
            "POST",
            "/licenses",
            &json!({"payload": vendor.valid("KEY-C"), "id": form}),
        );
        assert_eq!(
            (resp.status, resp.json()),
            (400, expected.clone()),
            "POST with id {form}"
        );
    }
    // The bare-hex DELETE that used to answer 204 deleted nothing: the license is there.
    assert_eq!(stored_ids(&cp), vec![id.clone()]);
    // Upper case is the same canonical form.
    let resp = cp.get(&format!("/licenses/{}", id.to_uppercase()));
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(resp.json()["id"], json!(id));
}

#[test]
fn a_body_field_given_twice_is_a_400_naming_it() {
    let (_dir, vendor, cp) = start(&[]);
    let id = cp.add(&vendor.valid("KEY-A"))["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let valid = vendor.valid("KEY-B");
    let quoted = serde_json::to_string(&valid).expect("a string");
    let encoded = form_encode(&valid);
    let bodies = [
        (
            "application/json",
            format!(r#"{{"payload":"bogus","payload":{quoted}}}"#),
        ),
        (
            "application/json",
            format!(r#"{{"payload":{quoted},"payload":"bogus"}}"#),
        ),
        (
            "application/x-www-form-urlencoded",
            format!("payload=bogus&payload={encoded}"),
        ),
        (
            "application/x-www-form-urlencoded",
            format!("payload={encoded}&payload=bogus"),
        ),
    ];
    let expected = schema_violation("payload", "given more than once");
    for (content_type, body) in &bodies {
        for (method, path) in [
            ("POST", "/licenses".to_owned()),
            ("PUT", format!("/licenses/{id}")),
            ("PATCH", format!("/licenses/{id}")),
        ] {
            let resp = http_with_headers(
                method,
                &cp.url(&path),
                Some(Body::Raw(
                    content_type.to_string(),
                    body.clone().into_bytes(),
                )),
                &[],
            )
            .expect("an answer");
            assert_eq!(
                (resp.status, resp.json()),
                (400, expected.clone()),
                "{method} {path} {content_type}: {body}"
            );
        }
    }
    assert_eq!(stored_ids(&cp), vec![id.clone()]);
    let record = cp.get(&format!("/licenses/{id}")).json();
    assert_eq!(record["payload"], json!(vendor.valid("KEY-A")));
}

fn form_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn the_bearer_scheme_is_case_insensitive() {
    let dir = TempDir::new().expect("temp dir");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "reader-token read\nwriter-token write\n").expect("tokens");
    let tokens = tokens.to_string_lossy().into_owned();
    let (_dir, vendor, cp) = start(&["--admin-token-file", &tokens]);
    for (n, (authorization, write, read)) in [
        ("Bearer writer-token", 201, 200),
        ("bearer writer-token", 201, 200),
        ("BEARER writer-token", 201, 200),
        ("bEaReR  writer-token", 201, 200),
        ("bearer reader-token", 403, 200),
        ("Basic writer-token", 401, 401),
        ("bearerwriter-token", 401, 401),
    ]
    .into_iter()
    .enumerate()
    {
        let resp = http_with_headers(
            "POST",
            &cp.url("/licenses"),
            Some(Body::Json(
                json!({"payload": vendor.valid(&format!("KEY-{n}"))}),
            )),
            &[("Authorization", authorization)],
        )
        .expect("an answer");
        assert_eq!(
            resp.status, write,
            "POST with {authorization:?}: {}",
            resp.body
        );
        let resp = http_with_headers(
            "GET",
            &cp.url("/licenses"),
            None,
            &[("Authorization", authorization)],
        )
        .expect("an answer");
        assert_eq!(
            resp.status, read,
            "GET with {authorization:?}: {}",
            resp.body
        );
    }
}

/// What a raw request got back.
#[derive(Debug)]
struct RawAnswer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawAnswer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `request` as is on a new connection (writing from another thread, since the
/// server may answer and close before reading it all) and reads the answer until the
/// server closes the connection. The write side stays open: hyper closes a connection
/// whose client half-closes before the answer.
fn raw(what: &str, addr: SocketAddr, request: Vec<u8>) -> RawAnswer {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut writer = stream.try_clone().expect("clone");
    let written = std::thread::spawn(move || {
        // The server may close first, after answering: a failed write is expected then.
        let _ = writer.write_all(&request);
    });
    let mut answer = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
            // A reset after the answer (the server closed with unread bytes) ends it too.
            Err(e) if !answer.is_empty() => {
                eprintln!("{what}: reading after {} bytes: {e}", answer.len());
                break;
            }
            Err(e) => panic!("{what}: no answer: {e}"),
        }
    }
    let _ = written.join();
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("{what}: no head in {:?}", String::from_utf8_lossy(&answer)));
    let head = String::from_utf8_lossy(&answer[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("{what}: no status in {head:?}"));
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    RawAnswer {
        status,
        headers,
        body: answer[end + 4..].to_vec(),
    }
}

/// A request head (and body) from lines, each ended with CRLF, then a blank line.
fn head(lines: &[&str], body: &str) -> Vec<u8> {
    let mut bytes = Vec::new();
    for line in lines {
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(b"\r\n");
    bytes.extend_from_slice(body.as_bytes());
    bytes
}

/// What an answer must carry.
enum Expect {
    /// Our JSON, its `message` starting with this.
    Json(&'static str),
    /// hyper's own answer: no body at all (README.md lists these).
    Bare,
}

#[test]
fn errors_before_any_route_are_json_unless_hyper_answers_them() {
    let (_dir, _vendor, cp) = start(&[]);
    let get = |target: &str, extra: &[&str]| {
        let request_line = format!("GET {target} HTTP/1.1");
        let mut lines = vec![request_line.as_str(), "Host: x", "Connection: close"];
        lines.extend_from_slice(extra);
        head(&lines, "")
    };
    let post = |extra: &[&str], body: &str| {
        let mut lines = vec![
            "POST /licenses HTTP/1.1",
            "Host: x",
            "Connection: close",
            "Content-Type: application/json",
        ];
        lines.extend_from_slice(extra);
        head(&lines, body)
    };
    let headers = |n: usize| -> Vec<String> { (0..n).map(|i| format!("x-h{i}: v")).collect() };
    // With Host and Connection, 63 more is 65 lines: over our 64.
    let ours_many = headers(63);
    // hyper stops at charter_runtime::http::MAX_REQUEST_HEADERS (1,000) lines.
    let hypers_many = headers(999);
    let between = headers(99);
    let big = |n: usize| format!("x-big: {}", "b".repeat(n));
    let cases: Vec<(&str, Vec<u8>, u16, Expect)> = vec![
        (
            "unknown path",
            get("/nowhere", &[]),
            404,
            Expect::Json("Not found"),
        ),
        (
            "unknown method",
            head(
                &["BREW /licenses HTTP/1.1", "Host: x", "Connection: close"],
                "",
            ),
            405,
            Expect::Json("Method not allowed"),
        ),
        (
            "body over 1 MiB, declared",
            post(&["Content-Length: 2000000"], ""),
            413,
            Expect::Json("Request body too large"),
        ),
        (
            "a chunked body that breaks the chunk framing",
            post(&["Transfer-Encoding: chunked"], "zz\r\n{}\r\n0\r\n\r\n"),
            400,
            Expect::Json("Cannot read request body"),
        ),
        (
            "two equal Content-Lengths (hyper keeps one)",
            post(&["Content-Length: 2", "Content-Length: 2"], "{}"),
            400,
            Expect::Json("schema violation (payload: required field missing)"),
        ),
        (
            "URI over 8 KiB",
            get(&format!("/licenses?pad={}", "a".repeat(9000)), &[]),
            414,
            Expect::Json("URI too long"),
        ),
        (
            "65 header lines",
            get("/licenses", &ref_all(&ours_many)),
            431,
            Expect::Json("Request headers too large"),
        ),
        (
            "40 KiB of headers",
            get("/licenses", &[big(40_000).as_str()]),
            431,
            Expect::Json("Request headers too large"),
        ),
        // hyper's own answers, before any of our code runs.
        (
            "URI over 65,534 bytes",
            get(&format!("/licenses?pad={}", "a".repeat(70_000)), &[]),
            414,
            Expect::Bare,
        ),
        (
            "101 header lines, ours to refuse",
            get("/licenses", &ref_all(&between)),
            431,
            Expect::Json("Request headers too large"),
        ),
        (
            "1,001 header lines",
            get("/licenses", &ref_all(&hypers_many)),
            431,
            Expect::Bare,
        ),
        (
            "a 1 MB head, past hyper's read buffer",
            get("/licenses", &[big(1_000_000).as_str()]),
            431,
            Expect::Bare,
        ),
        (
            "two different Content-Lengths",
            post(&["Content-Length: 2", "Content-Length: 3"], "{}"),
            400,
            Expect::Bare,
        ),
        (
            "a Content-Length that is no number",
            post(&["Content-Length: two"], "{}"),
            400,
            Expect::Bare,
        ),
        (
            "Transfer-Encoding not ending in chunked",
            post(&["Transfer-Encoding: gzip"], "{}"),
            400,
            Expect::Bare,
        ),
        (
            "Transfer-Encoding on HTTP/1.0",
            head(
                &[
                    "POST /licenses HTTP/1.0",
                    "Host: x",
                    "Transfer-Encoding: chunked",
                ],
                "0\r\n\r\n",
            ),
            400,
            Expect::Bare,
        ),
        (
            "a garbage request line",
            head(&["HELLO"], ""),
            400,
            Expect::Bare,
        ),
        (
            "an unknown HTTP version",
            head(&["GET /licenses HTTP/9.9", "Host: x"], ""),
            400,
            Expect::Bare,
        ),
        (
            "a header line without a name",
            get("/licenses", &["Bad Header: x"]),
            400,
            Expect::Bare,
        ),
        (
            "a folded header line",
            get("/licenses", &["X-A: a", " b"]),
            400,
            Expect::Bare,
        ),
    ];
    for (what, request, status, expect) in cases {
        let answer = raw(what, cp.addr, request);
        assert_eq!(answer.status, status, "{what}: {answer:?}");
        match expect {
            Expect::Json(message) => {
                assert_eq!(
                    answer.header("content-type"),
                    Some("application/json"),
                    "{what}"
                );
                let body: Value = serde_json::from_slice(&answer.body)
                    .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {:?}", answer.body));
                assert!(
                    body["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with(message)),
                    "{what}: {body}"
                );
            }
            Expect::Bare => {
                assert_eq!(answer.header("content-length"), Some("0"), "{what}");
                assert!(answer.body.is_empty(), "{what}: {:?}", answer.body);
                assert_eq!(answer.header("content-type"), None, "{what}");
            }
        }
    }
    // The control plane serves on.
    assert_eq!(cp.get("/licenses").status, 200);
}

fn ref_all(lines: &[String]) -> Vec<&str> {
    lines.iter().map(String::as_str).collect()
}
