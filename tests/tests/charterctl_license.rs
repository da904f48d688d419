//! End-to-end tests of `charterctl license`: the real binary against a real control plane
//! (and, for answers a control plane never gives, a small fake server), judged by its exit
//! code, what it prints and what the control plane stores.
//!
//! The contract (README, `charterctl license --help`): a table by default, the API's JSON
//! with `--json`; on failure nothing on stdout, one line on stderr with the request, the
//! status and the API's message, and an exit code per kind: 1 a 400, 2 a local error, 3 no
//! answer, 4 a 401, 5 a 403, 6 a 404, 7 a 409, 8 anything else.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use charter_tests::{bin, free_port, payload, Cp, Vendor};
use serde_json::{json, Value};
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// One finished run of `charterctl`.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `charterctl` with `args`, the environment variables `envs` (every `CHARTER_*` of
/// the test's own environment removed first, so it cannot stand in for a flag) and,
/// when given, `stdin`.
fn ctl(args: &[&str], envs: &[(&str, &str)], stdin: Option<&str>) -> Run {
    let mut command = Command::new(bin("charterctl"));
    command
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("CHARTER_") {
            command.env_remove(name);
        }
    }
    command.envs(envs.iter().copied());
    let mut child = command.spawn().expect("starting charterctl");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("a stdin pipe");
        pipe.write_all(text.as_bytes())
            .expect("writing charterctl's stdin");
    }
    let output = child.wait_with_output().expect("waiting for charterctl");
    Run {
        code: output.status.code().expect("charterctl ended by a signal"),
        stdout: String::from_utf8(output.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8(output.stderr).expect("stderr is UTF-8"),
    }
}

/// A control plane and a vendor whose key it trusts, in one temp dir, and how
/// `charterctl license` reaches it.
struct Setup {
    dir: TempDir,
    vendor: Vendor,
    cp: Cp,
    /// `--admin-url` of the control plane.
    url: String,
}

impl Setup {
    /// A control plane without tokens.
    fn new() -> Setup {
        Setup::with_args(&[])
    }

    /// A control plane with `reader-token read` and `writer-token write`.
    fn with_tokens() -> Setup {
        let dir = tempfile::tempdir().expect("a temp dir");
        let tokens = dir.path().join("tokens");
        std::fs::write(&tokens, "reader-token read\nwriter-token write\n").expect("tokens");
        Setup::in_dir(dir, &["--admin-token-file", &tokens.to_string_lossy()])
    }

    fn with_args(args: &[&str]) -> Setup {
        Setup::in_dir(tempfile::tempdir().expect("a temp dir"), args)
    }

    fn in_dir(dir: TempDir, args: &[&str]) -> Setup {
        let vendor = Vendor::new(dir.path(), 16);
        let key = vendor.public_key.to_string_lossy().into_owned();
        let mut all = vec!["--trusted-key", key.as_str()];
        all.extend_from_slice(args);
        let cp = Cp::start(dir.path(), &all);
        let url = format!("http://{}", cp.addr);
        Setup {
            dir,
            vendor,
            cp,
            url,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a file in the temp dir and returns its path as a string.
    fn write(&self, name: &str, contents: &str) -> String {
        let path = self.path(name);
        std::fs::write(&path, contents).expect("writing a file");
        path.to_string_lossy().into_owned()
    }

    /// A signed license for `license_key` expiring on `expires`, written to `NAME.json`, as
    /// `charterctl sign` writes it (with a final newline).
    fn license(&self, license_key: &str, expires: &str) -> (String, String) {
        let document = self
            .vendor
            .sign(payload(license_key, "2020-01-01", expires));
        let path = self.write(&format!("{license_key}.json"), &format!("{document}\n"));
        (path, document)
    }

    /// `charterctl license ARGS --admin-url URL` with extra environment variables.
    fn ctl_env(&self, args: &[&str], envs: &[(&str, &str)]) -> Run {
        let mut all = vec!["license"];
        all.extend_from_slice(args);
        all.extend(["--admin-url", &self.url]);
        ctl(&all, envs, None)
    }

    fn ctl(&self, args: &[&str]) -> Run {
        self.ctl_env(args, &[])
    }

    /// Like [`Setup::ctl`], and asserts exit 0 and an empty stderr.
    fn ok(&self, args: &[&str]) -> Run {
        self.ok_env(args, &[])
    }

    fn ok_env(&self, args: &[&str], envs: &[(&str, &str)]) -> Run {
        let run = self.ctl_env(args, envs);
        assert_ok(&run, args);
        run
    }
}

#[track_caller]
fn assert_ok(run: &Run, args: &[&str]) {
    assert!(
        run.code == 0 && run.stderr.is_empty(),
        "{args:?}: expected success, got {run:?}"
    );
}

/// Asserts a failure with exit `code`, nothing on stdout and one `charterctl: error: ` line
/// on stderr, which it returns.
#[track_caller]
fn assert_fails(run: &Run, code: i32, args: &[&str]) -> String {
    assert_eq!(run.code, code, "{args:?}: {run:?}");
    assert!(
        run.stdout.is_empty(),
        "{args:?}: stdout on failure: {run:?}"
    );
    assert!(
        run.stderr.starts_with("charterctl: error: ")
            && run.stderr.ends_with('\n')
            && run.stderr.lines().count() == 1,
        "{args:?}: expected one error line, got {:?}",
        run.stderr
    );
    assert!(!run.stderr.contains("panicked"), "{run:?}");
    run.stderr.trim_end().to_owned()
}

/// Asserts every needle is in `haystack`.
#[track_caller]
fn contains_all(haystack: &str, needles: &[&str]) {
    for needle in needles {
        assert!(
            haystack.contains(needle),
            "expected `{needle}` in:\n{haystack}"
        );
    }
}

/// The rows of a licenses table (the header checked and dropped), split on runs of two or
/// more spaces.
#[track_caller]
fn table_rows(stdout: &str) -> Vec<Vec<String>> {
    let mut lines = stdout.lines();
    let header = lines.next().expect("a header line");
    assert_eq!(
        split_cells(header),
        [
            "ID",
            "CUSTOMER",
            "STATUS",
            "EXPIRES",
            "DAYS LEFT",
            "UPDATED"
        ],
        "{stdout}"
    );
    lines.map(split_cells).collect()
}

fn split_cells(line: &str) -> Vec<String> {
    line.split("  ")
        .map(str::trim)
        .filter(|cell| !cell.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The value of a `name  value` line of `status` or `report`.
#[track_caller]
fn line_value(stdout: &str, name: &str) -> String {
    stdout
        .lines()
        .find_map(|line| {
            line.strip_prefix(name)
                .filter(|rest| rest.starts_with("  "))
                .map(|rest| rest.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no `{name}` line in:\n{stdout}"))
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// A server that answers every request with the response `answer` gives for its
/// request target, and records the targets; for answers a control plane never gives.
struct Fake {
    url: String,
    targets: Arc<Mutex<Vec<String>>>,
}

impl Fake {
    fn start(answer: impl Fn(&str) -> String + Send + 'static) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding a fake server");
        let url = format!("http://{}", listener.local_addr().expect("its address"));
        let targets = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&targets);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().expect("a second handle"));
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                // The rest of the head, then the body, read whole so closing the
                // connection never resets it before the client has the answer.
                let mut length = 0;
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    if let Some((name, value)) = line.split_once(':') {
                        if name.eq_ignore_ascii_case("content-length") {
                            length = value.trim().parse().unwrap_or(0);
                        }
                    }
                    line.clear();
                }
                let mut body = vec![0; length];
                if reader.read_exact(&mut body).is_err() {
                    continue;
                }
                let target = request_line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or_default()
                    .to_owned();
                seen.lock().expect("the targets").push(target.clone());
                let _ = stream.write_all(answer(&target).as_bytes());
            }
        });
        Fake { url, targets }
    }

    fn targets(&self) -> Vec<String> {
        self.targets.lock().expect("the targets").clone()
    }
}

/// An HTTP/1.1 response that closes the connection.
fn response(status: &str, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

// ---------------------------------------------------------------------------------------
// Every subcommand
// ---------------------------------------------------------------------------------------

#[test]
fn every_subcommand_against_a_real_control_plane() {
    let s = Setup::new();

    // An empty store.
    let run = s.ok(&["list"]);
    assert_eq!(run.stdout, format!("no licenses stored at {}\n", s.url));
    let run = s.ok(&["list", "--json"]);
    assert_eq!(parse(&run.stdout), json!({"data": [], "next": null}));
    let run = s.ok(&["status"]);
    assert_eq!(line_value(&run.stdout, "status"), "unlicensed");

    // add FILE: one row, in force, the dates of the payload.
    let (first, first_document) = s.license("ACME-0001", "2099-12-31");
    let run = s.ok(&["add", &first]);
    let rows = table_rows(&run.stdout);
    assert_eq!(rows.len(), 1, "{}", run.stdout);
    let first_id = rows[0][0].clone();
    assert_eq!(s.cp.stored_ids(), HashSet::from([first_id.clone()]));
    assert_eq!(rows[0][1], "Example Company, Inc");
    assert_eq!(rows[0][2], "valid (in force)");
    assert_eq!(rows[0][3], "2099-12-31");
    assert!(rows[0][4].parse::<i64>().expect("days left") > 20_000);
    assert!(rows[0][5].ends_with('Z'), "updated is RFC 3339: {rows:?}");
    // The payload went as the file's text.
    let stored = s.cp.get(&format!("/licenses/{first_id}")).json();
    let document: Value = parse(stored["payload"].as_str().expect("payload"));
    assert_eq!(document, parse(&first_document));

    // add --json: the record as the API returned it.
    let (second, _) = s.license("ACME-0002", "2026-01-31");
    let run = s.ok(&["add", &second, "--json"]);
    let record = parse(&run.stdout);
    let second_id = record["id"].as_str().expect("an id").to_owned();
    assert_eq!(record, s.cp.get(&format!("/licenses/{second_id}")).json());
    for field in ["payload", "created_at", "updated_at"] {
        assert!(record.get(field).is_some(), "{field} in {record}");
    }

    // get ID, as a table and as the API's JSON, byte for byte.
    let run = s.ok(&["get", &second_id]);
    let rows = table_rows(&run.stdout);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0][0], second_id);
    assert_eq!(rows[0][3], "2026-01-31");
    let run = s.ok(&["--json", "get", &second_id]);
    assert_eq!(
        run.stdout.trim_end(),
        s.cp.get(&format!("/licenses/{second_id}")).body.trim_end()
    );

    // replace ID FILE: the new payload under the same id, created_at kept.
    let (renewal, renewal_document) = s.license("ACME-0002-R", "2098-06-30");
    let run = s.ok(&["replace", &second_id, &renewal]);
    let rows = table_rows(&run.stdout);
    assert_eq!(
        (rows[0][0].as_str(), rows[0][3].as_str()),
        (second_id.as_str(), "2098-06-30")
    );
    let replaced = s.cp.get(&format!("/licenses/{second_id}")).json();
    assert_eq!(replaced["created_at"], record["created_at"]);
    assert_eq!(
        parse(replaced["payload"].as_str().expect("payload")),
        parse(&renewal_document)
    );

    // replace with `-` reads standard input, and a new id stores a new license (PUT).
    let third_id = "3b2f6b1e-8f7a-4d8e-9c1a-1f2e3d4c5b6a";
    let third_document = s
        .vendor
        .sign(payload("ACME-0003", "2026-01-01", "2097-01-01"));
    let mut args = vec!["license", "replace", third_id, "-", "--admin-url", &s.url];
    let run = ctl(&args, &[], Some(&third_document));
    assert_ok(&run, &args);
    assert_eq!(table_rows(&run.stdout)[0][0], third_id);

    // list: every license, the one in force marked, and the same as /license/status says.
    let run = s.ok(&["list"]);
    let rows = table_rows(&run.stdout);
    let listed: HashSet<String> = rows.iter().map(|row| row[0].clone()).collect();
    assert_eq!(listed, s.cp.stored_ids());
    assert_eq!(listed.len(), 3);
    let in_force: Vec<&Vec<String>> = rows
        .iter()
        .filter(|row| row[2].ends_with(" (in force)"))
        .collect();
    assert_eq!(in_force.len(), 1, "{}", run.stdout);
    let status = s.cp.get("/license/status").json();
    assert_eq!(
        status["license"]["id"].as_str(),
        Some(in_force[0][0].as_str())
    );
    let run = s.ok(&["list", "--json"]);
    let page = parse(&run.stdout);
    assert_eq!(page["next"], Value::Null);
    assert_eq!(page["data"].as_array().expect("data").len(), 3);

    // status: the license in force, and --json as the API's JSON.
    let run = s.ok(&["status"]);
    assert_eq!(line_value(&run.stdout, "status"), "valid");
    assert_eq!(line_value(&run.stdout, "source"), "store");
    assert_eq!(
        line_value(&run.stdout, "id"),
        status["license"]["id"].as_str().expect("an id")
    );
    assert_eq!(line_value(&run.stdout, "key id"), s.vendor.key_id());
    assert!(
        !run.stdout.contains("ACME-000"),
        "the raw license key is never shown: {}",
        run.stdout
    );
    let run = s.ok(&["status", "--json"]);
    assert_eq!(parse(&run.stdout), s.cp.get("/license/status").json());

    // report: Kong's fields as lines, the counters as a table; --json as the API's JSON.
    let run = s.ok(&["report"]);
    let report = s.cp.get("/license/report").json();
    assert_eq!(
        line_value(&run.stdout, "license key"),
        report["license_key"].as_str().expect("license_key")
    );
    assert_eq!(line_value(&run.stdout, "connected data planes"), "0");
    assert!(
        run.stdout
            .lines()
            .any(|line| split_cells(line) == ["MONTH", "REQUESTS"]),
        "{}",
        run.stdout
    );
    let run = s.ok(&["report", "--json"]);
    assert_eq!(parse(&run.stdout), report);
    let run = s.ok(&["report", "--by-dataplane", "--json"]);
    assert!(
        parse(&run.stdout)["dataplanes"].is_array(),
        "{}",
        run.stdout
    );
    let run = s.ok(&["report", "--by-dataplane"]);
    assert!(run.stdout.contains("DATA PLANE  MONTH"), "{}", run.stdout);

    // delete ID: gone; deleting it again succeeds, as Kong's DELETE does.
    let run = s.ok(&["delete", &second_id]);
    assert_eq!(run.stdout, format!("deleted license {second_id}\n"));
    assert!(!s.cp.stored_ids().contains(&second_id));
    let run = s.ok(&["delete", &second_id, "--json"]);
    assert_eq!(run.stdout, "", "a 204 has no JSON to print");

    // A record saved with `get --json` adds back: the document inside it is sent.
    let saved = s.ok(&["get", third_id, "--json"]).stdout;
    s.ok(&["delete", third_id]);
    args = vec!["license", "add", "-", "--admin-url", &s.url, "--json"];
    let run = ctl(&args, &[], Some(&saved));
    assert_ok(&run, &args);
    let readded = parse(&run.stdout);
    assert_ne!(
        readded["id"].as_str(),
        Some(third_id),
        "POST makes a new id"
    );
    assert_eq!(
        parse(readded["payload"].as_str().expect("payload")),
        parse(&third_document)
    );
}

/// The status column is judged from each license's dates; which license is in force is
/// the control plane's word (DESIGN: the most recent `updated_at` among those that verify,
/// expired or not), and `status` carries its warning.
#[test]
fn expired_licenses_are_judged_and_the_control_plane_names_the_one_in_force() {
    let s = Setup::new();
    let (valid, _) = s.license("ACME-VALID", "2099-12-31");
    let (expired, _) = s.license("ACME-OLD", "2026-01-02");
    let valid_id = table_rows(&s.ok(&["add", &valid]).stdout)[0][0].clone();
    // Accepted (201) as Kong accepts it; the newest, so in force, and expired.
    let rows = table_rows(&s.ok(&["add", &expired]).stdout);
    let expired_id = rows[0][0].clone();
    assert_eq!(rows[0][2], "expired (in force)", "{rows:?}");
    assert!(rows[0][4].starts_with('-'), "negative days left: {rows:?}");
    let rows = table_rows(&s.ok(&["list"]).stdout);
    assert_eq!(rows.len(), 2);
    for row in &rows {
        let want = if row[0] == valid_id {
            "valid"
        } else {
            "expired (in force)"
        };
        assert_eq!(row[2], want, "{rows:?}");
    }
    let run = s.ok(&["status"]);
    assert_eq!(line_value(&run.stdout, "status"), "expired");
    assert_eq!(line_value(&run.stdout, "id"), expired_id);
    assert!(
        run.stdout.lines().any(|line| line.starts_with("warning  ")),
        "the control plane's warnings are shown: {}",
        run.stdout
    );
    // Deleting it puts the valid one back in force.
    s.ok(&["delete", &expired_id]);
    let rows = table_rows(&s.ok(&["list"]).stdout);
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0][0].as_str(), rows[0][2].as_str()),
        (valid_id.as_str(), "valid (in force)")
    );
}

#[test]
fn list_follows_next_through_every_page() {
    let s = Setup::new();
    for n in 0..5 {
        s.cp.add(&s.vendor.valid(&format!("ACME-PAGE-{n}")));
    }
    // The API does page at this size, so the command must follow `next`.
    let first_page = s.cp.get("/licenses?size=2").json();
    assert!(first_page["next"].is_string(), "{first_page}");

    let run = s.ok(&["list", "--page-size", "2", "--json"]);
    let page = parse(&run.stdout);
    assert_eq!(page["next"], Value::Null);
    let ids: Vec<&str> = page["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|r| r["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids.len(), 5, "no record twice: {ids:?}");
    assert_eq!(
        ids.iter().map(|id| id.to_string()).collect::<HashSet<_>>(),
        s.cp.stored_ids()
    );

    let rows = table_rows(&s.ok(&["list", "--page-size", "2"]).stdout);
    assert_eq!(rows.len(), 5);
    let rows = table_rows(&s.ok(&["list", "--page-size", "1000"]).stdout);
    assert_eq!(rows.len(), 5);

    for bad in ["0", "1001", "x"] {
        let args = ["list", "--page-size", bad];
        let line = assert_fails(&s.ctl(&args), 2, &args);
        assert!(line.contains("--page-size"), "{line}");
    }
}

// ---------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------

#[test]
fn tokens_from_a_file_or_the_environment() {
    let s = Setup::with_tokens();
    let (license, _) = s.license("ACME-TOKENS", "2099-12-31");

    // No token: 401, the API's message, and how to pass one.
    let args = ["list"];
    let line = assert_fails(&s.ctl(&args), 4, &args);
    contains_all(
        &line,
        &[
            &format!("GET {}/licenses?size=1000 answered 401: ", s.url),
            "Invalid credentials. Token or User credentials required",
            "no token was sent: pass --admin-token-file FILE or set CHARTER_ADMIN_TOKEN",
        ],
    );

    // A token the control plane does not know: 401, naming where it came from, not itself.
    let run = s.ctl_env(&["status"], &[("CHARTER_ADMIN_TOKEN", "wrong-token")]);
    let line = assert_fails(&run, 4, &["status"]);
    contains_all(
        &line,
        &["answered 401", "the token from CHARTER_ADMIN_TOKEN"],
    );
    assert!(!line.contains("wrong-token"), "the token leaked: {line}");

    // A read token reads: list, get, status, report.
    let reader = [("CHARTER_ADMIN_TOKEN", "reader-token")];
    let id = s.cp_add_with_token(&license);
    let rows = table_rows(&s.ok_env(&["list"], &reader).stdout);
    assert_eq!(rows.len(), 1);
    s.ok_env(&["get", &id], &reader);
    s.ok_env(&["status"], &reader);
    s.ok_env(&["report"], &reader);

    // ... but cannot write: 403 with the API's message, and nothing changes.
    let (other, _) = s.license("ACME-TOKENS-2", "2099-12-31");
    let args = ["add", other.as_str()];
    let line = assert_fails(&s.ctl_env(&args, &reader), 5, &args);
    contains_all(
        &line,
        &[
            &format!("POST {}/licenses answered 403: ", s.url),
            "Forbidden: this token is read-only; the request needs a write token",
        ],
    );
    for args in [
        vec!["delete", id.as_str()],
        vec!["replace", id.as_str(), other.as_str()],
    ] {
        let line = assert_fails(&s.ctl_env(&args, &reader), 5, &args);
        assert!(line.contains("answered 403"), "{line}");
    }
    assert_eq!(s.stored_with_token().len(), 1);

    // A write token from --admin-token-file writes; it wins over CHARTER_ADMIN_TOKEN.
    let writer_file = s.write("writer.token", "writer-token\n");
    let run = s.ok_env(
        &["add", &other, "--admin-token-file", &writer_file],
        &reader,
    );
    assert_eq!(table_rows(&run.stdout).len(), 1);
    // The control plane's own `TOKEN write` line, through CHARTER_ADMIN_TOKEN_FILE.
    let cp_form = s.write("cp-form.token", "# the writer\nwriter-token write\n");
    s.ok_env(&["delete", &id], &[("CHARTER_ADMIN_TOKEN_FILE", &cp_form)]);
    assert_eq!(s.stored_with_token().len(), 1);

    // A token file that does not give one token is a local error (2), token unprinted.
    let both = s.write("both.token", "reader-token read\nwriter-token write\n");
    let args = ["list", "--admin-token-file", both.as_str()];
    let line = assert_fails(&s.ctl(&args), 2, &args);
    contains_all(&line, &["holds 2 tokens", &both]);
    assert!(!line.contains("writer-token"), "the token leaked: {line}");
    let missing = s.path("missing.token").to_string_lossy().into_owned();
    let args = ["list", "--admin-token-file", missing.as_str()];
    let line = assert_fails(&s.ctl(&args), 2, &args);
    assert!(
        line.contains(&format!("reading --admin-token-file {missing}")),
        "{line}"
    );
}

impl Setup {
    /// `POST /licenses` with the write token, expecting 201; returns the id.
    fn cp_add_with_token(&self, file: &str) -> String {
        let document = std::fs::read_to_string(file).expect("the license file");
        let resp = charter_tests::http_with_headers(
            "POST",
            &self.cp.url("/licenses"),
            Some(charter_tests::Body::Json(json!({ "payload": document }))),
            &[("Kong-Admin-Token", "writer-token")],
        )
        .expect("an answer");
        assert_eq!(resp.status, 201, "{}", resp.body);
        resp.json()["id"].as_str().expect("an id").to_owned()
    }

    /// The stored ids, read with the read token.
    fn stored_with_token(&self) -> HashSet<String> {
        let resp = charter_tests::http_with_headers(
            "GET",
            &self.cp.url("/licenses?size=1000"),
            None,
            &[("Kong-Admin-Token", "reader-token")],
        )
        .expect("an answer");
        assert_eq!(resp.status, 200, "{}", resp.body);
        resp.json()["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|r| r["id"].as_str().expect("id").to_owned())
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// Errors: the API's message and an exit code per kind
// ---------------------------------------------------------------------------------------

#[test]
fn api_errors_carry_the_message_and_their_exit_code() {
    let s = Setup::new();
    let (license, document) = s.license("ACME-ERRORS", "2099-12-31");
    let id = table_rows(&s.ok(&["add", &license]).stdout)[0][0].clone();

    // 404: a missing id.
    let missing = "00000000-0000-4000-8000-000000000000";
    for json in [false, true] {
        let mut args = vec!["get", missing];
        if json {
            args.push("--json");
        }
        let line = assert_fails(&s.ctl(&args), 6, &args);
        assert_eq!(
            line,
            format!(
                "charterctl: error: GET {}/licenses/{missing} answered 404: Not found",
                s.url
            )
        );
    }

    // 409: the same license again, naming the one stored.
    let args = ["add", license.as_str()];
    let line = assert_fails(&s.ctl(&args), 7, &args);
    contains_all(&line, &["answered 409: ", "already stored as license", &id]);
    let stdin_args = ["license", "add", "-", "--admin-url", &s.url];
    let run = ctl(&stdin_args, &[], Some(&document));
    assert_fails(&run, 7, &stdin_args);

    // 400: a license that does not verify, and an id that is not a UUID.
    let tampered = s.write(
        "tampered.json",
        &document.replace("Example Company", "Exemple Company"),
    );
    let args = ["add", tampered.as_str()];
    let line = assert_fails(&s.ctl(&args), 1, &args);
    assert!(
        line.contains("answered 400: Unable to validate license: validation_fail"),
        "{line}"
    );
    let args = ["replace", id.as_str(), tampered.as_str()];
    assert_fails(&s.ctl(&args), 1, &args);
    let args = ["get", "not-a-uuid"];
    let line = assert_fails(&s.ctl(&args), 1, &args);
    assert!(line.contains("answered 400: schema violation"), "{line}");
    // An id is one path segment: it cannot reach another route.
    let args = ["get", "../license/status"];
    let line = assert_fails(&s.ctl(&args), 1, &args);
    assert!(
        line.contains("/licenses/..%2Flicense%2Fstatus answered 400"),
        "{line}"
    );
    assert_eq!(s.cp.stored_ids(), HashSet::from([id.clone()]));

    // Local errors (2): a missing or empty file, an empty id.
    let absent = s.path("absent.json").to_string_lossy().into_owned();
    let args = ["add", absent.as_str()];
    let line = assert_fails(&s.ctl(&args), 2, &args);
    assert!(
        line.contains(&format!("reading license {absent}")),
        "{line}"
    );
    let empty = s.write("empty.json", "\n");
    let args = ["add", empty.as_str()];
    let line = assert_fails(&s.ctl(&args), 2, &args);
    assert!(line.contains("is empty"), "{line}");
    let args = ["delete", ""];
    let line = assert_fails(&s.ctl(&args), 2, &args);
    assert!(line.contains("is not a license id"), "{line}");
    assert_eq!(s.cp.stored_ids(), HashSet::from([id]));
}

#[test]
fn an_unreachable_control_plane_names_the_url_tried() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    for args in [
        vec!["license", "list", "--admin-url", url.as_str()],
        vec!["license", "status", "--admin-url", url.as_str()],
        vec![
            "license",
            "get",
            "00000000-0000-4000-8000-000000000000",
            "--admin-url",
            url.as_str(),
        ],
    ] {
        let line = assert_fails(&ctl(&args, &[], None), 3, &args);
        contains_all(
            &line,
            &[
                &format!("cannot reach the admin API at {url} ("),
                "Connection refused",
                "is charter-cp running",
            ],
        );
    }
    // CHARTER_ADMIN_URL names it as well as the flag, with or without a trailing slash.
    let args = ["license", "list"];
    let run = ctl(&args, &[("CHARTER_ADMIN_URL", &format!("{url}/"))], None);
    let line = assert_fails(&run, 3, &args);
    assert!(
        line.contains(&format!("(GET {url}/licenses?size=1000: ")),
        "{line}"
    );
    // The default is the control plane's default admin address.
    let run = ctl(&["license", "--help"], &[], None);
    assert!(
        run.stdout.contains("[default: http://127.0.0.1:8001]")
            && run.stdout.contains("[env: CHARTER_ADMIN_URL=]"),
        "{}",
        run.stdout
    );
}

#[test]
fn bad_admin_urls_are_local_errors() {
    for (url, message) in [
        (
            "127.0.0.1:8001",
            "has no scheme; write it as http://127.0.0.1:8001",
        ),
        ("https://127.0.0.1:8001", "https is not supported"),
        ("http://user:pw@127.0.0.1:8001", "carries credentials"),
    ] {
        let args = ["license", "list", "--admin-url", url];
        let line = assert_fails(&ctl(&args, &[], None), 2, &args);
        assert!(line.contains(message), "{line}");
        assert!(!line.contains("pw@"), "credentials echoed: {line}");
    }
}

#[test]
fn answers_a_control_plane_never_gives_are_exit_8() {
    // A 503 with Charter's JSON message.
    let fake = Fake::start(|_| {
        response(
            "503 Service Unavailable",
            "application/json",
            r#"{"message":"database unavailable"}"#,
        )
    });
    let args = ["license", "add", "-", "--admin-url", &fake.url];
    let line = assert_fails(&ctl(&args, &[], Some("{}")), 8, &args);
    assert!(
        line.ends_with("answered 503: database unavailable"),
        "{line}"
    );

    // Something that is not the admin API at all.
    let fake = Fake::start(|_| response("200 OK", "text/html", "<html>hello</html>"));
    let args = ["license", "status", "--admin-url", &fake.url];
    let line = assert_fails(&ctl(&args, &[], None), 8, &args);
    contains_all(
        &line,
        &["not JSON", "<html>hello</html>", "is --admin-url a Charter"],
    );

    // A redirect is not followed (it could carry the token elsewhere).
    let fake = Fake::start(|_| {
        "HTTP/1.1 302 Found\r\nlocation: http://elsewhere.example/\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            .to_owned()
    });
    let args = ["license", "list", "--admin-url", &fake.url];
    let line = assert_fails(&ctl(&args, &[("CHARTER_ADMIN_TOKEN", "t")], None), 8, &args);
    assert!(
        line.contains("a redirect to http://elsewhere.example/"),
        "{line}"
    );
    assert_eq!(fake.targets().len(), 1, "one request, not followed");
}

#[test]
fn next_pages_stay_below_a_path_prefix() {
    // An admin API published under a prefix (a reverse proxy) returns `next` as Kong does,
    // a path from its own root: each page is asked for below the prefix.
    let fake = Fake::start(|target| {
        let body = match target {
            "/charter/licenses?size=1000" => {
                json!({"data": [{"id": "a"}], "next": "/licenses?offset=b&size=1000", "offset": "b"})
            }
            "/charter/licenses?offset=b&size=1000" => json!({"data": [{"id": "b"}], "next": null}),
            _ => {
                return response(
                    "404 Not Found",
                    "application/json",
                    r#"{"message":"Not found"}"#,
                )
            }
        };
        response("200 OK", "application/json", &body.to_string())
    });
    let prefixed = format!("{}/charter/", fake.url);
    let args = ["license", "list", "--json", "--admin-url", &prefixed];
    let run = ctl(&args, &[], None);
    assert_ok(&run, &args);
    assert_eq!(
        parse(&run.stdout),
        json!({"data": [{"id": "a"}, {"id": "b"}], "next": null})
    );
    assert_eq!(
        fake.targets(),
        [
            "/charter/licenses?size=1000",
            "/charter/licenses?offset=b&size=1000"
        ]
    );

    // A `next` that comes round again is refused rather than followed forever.
    let fake = Fake::start(|_| {
        let body = json!({"data": [], "next": "/licenses?offset=x&size=1000"});
        response("200 OK", "application/json", &body.to_string())
    });
    let args = ["license", "list", "--admin-url", &fake.url];
    let line = assert_fails(&ctl(&args, &[], None), 8, &args);
    assert!(line.contains("a `next` page it already gave"), "{line}");
}

/// The token travels as `Kong-Admin-Token`: what DESIGN names, checked on the wire.
#[test]
fn the_token_is_sent_as_kong_admin_token() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let head = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("a connection");
        let mut reader = BufReader::new(stream.try_clone().expect("a handle"));
        let mut head = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("a head line");
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push_str(&line);
        }
        let body = r#"{"status":"unlicensed","license":null,"source":null,"warnings":[]}"#;
        stream
            .write_all(response("200 OK", "application/json", body).as_bytes())
            .expect("answering");
        head
    });
    let dir = tempfile::tempdir().expect("a temp dir");
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-token\n").expect("the token file");
    let token = token.to_string_lossy().into_owned();
    let args = [
        "license",
        "status",
        "--admin-url",
        &url,
        "--admin-token-file",
        &token,
    ];
    let run = ctl(&args, &[], None);
    assert_ok(&run, &args);
    let head = head.join().expect("the fake server");
    assert!(
        head.lines()
            .any(|line| line.eq_ignore_ascii_case("kong-admin-token: s3cret-token")),
        "{head}"
    );
    assert!(
        head.starts_with("GET /license/status HTTP/1.1\r\n"),
        "{head}"
    );
}
