//! End-to-end tests of `charterctl`: the real binary, run in a temporary directory and
//! judged by its exit code, what it prints and the files it writes.
//!
//! The contract: exit 0 on success, 1 when a license is refused (`verify`, `inspect`), 2 on
//! any other error. An error is one line on stderr starting `charterctl: `, never a panic.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use charter_tests::bin;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use x509_parser::pem::{parse_x509_pem, Pem};
use x509_parser::prelude::{FromDer, GeneralName, SubjectPublicKeyInfo, X509Certificate};

/// The OID of Ed25519 keys (RFC 8410).
const ED25519_OID: &str = "1.3.101.112";

/// Seconds in a day.
const DAY: i64 = 24 * 60 * 60;

/// Validity of every certificate `gen-cert` makes: three years.
const CERT_DAYS: i64 = 1095;

/// A far-future expiration, so a license signed now is `valid` on the real clock.
const FAR_FUTURE: &str = "2099-12-31";

/// The fixed expiration date the status tests judge against with `--at`.
const EXPIRY: &str = "2030-06-30";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A temporary working directory in which `charterctl` runs, so relative paths in the
/// arguments name files in it.
struct Ctl {
    dir: TempDir,
}

/// One finished run of `charterctl`.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Ctl {
    fn new() -> Ctl {
        Ctl {
            dir: tempfile::tempdir().expect("creating a temporary directory"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, contents: &str) {
        let path = self.path(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).expect("creating a parent directory");
        }
        fs::write(&path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    fn write_json(&self, name: &str, value: &Value) {
        self.write(name, &value.to_string());
    }

    fn read(&self, name: &str) -> String {
        let path = self.path(name);
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    }

    fn read_json(&self, name: &str) -> Value {
        serde_json::from_str(&self.read(name)).unwrap_or_else(|e| panic!("{name} is not JSON: {e}"))
    }

    /// The permission bits of a file.
    fn mode(&self, name: &str) -> u32 {
        let path = self.path(name);
        let meta = fs::metadata(&path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
        meta.permissions().mode() & 0o777
    }

    /// The names of the entries of a directory, hidden ones included (a leftover temp file
    /// shows up here).
    fn list(&self, dir: &str) -> BTreeSet<String> {
        fs::read_dir(self.path(dir))
            .expect("listing a directory")
            .map(|entry| {
                entry
                    .expect("a directory entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }

    /// Runs `charterctl` in the directory with the given arguments and no standard input.
    fn run(&self, args: &[&str]) -> Run {
        self.run_with_stdin(args, None)
    }

    /// Runs `charterctl`, optionally feeding `stdin`. `CHARTER_*` variables are removed so
    /// the caller's environment cannot stand in for a missing flag, and `RUST_BACKTRACE` is
    /// set so a panic could not go unnoticed.
    fn run_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Run {
        let mut command = Command::new(bin("charterctl"));
        command
            .args(args)
            .current_dir(self.dir.path())
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

    /// Runs `charterctl` and asserts success: exit 0 and nothing on stderr.
    fn ok(&self, args: &[&str]) -> Run {
        let run = self.run(args);
        assert_ok(&run, args);
        run
    }

    /// Runs `charterctl` and asserts it fails with `code` and a single error line, which it
    /// returns.
    fn fails(&self, code: i32, args: &[&str]) -> String {
        let run = self.run(args);
        assert_error(&run, code, args)
    }

    /// Runs `charterctl verify` (or `inspect`) and asserts the license is refused with
    /// `code`: exit 1 and `charterctl: FILE refused: CODE: …`. Returns the line.
    fn refused(&self, args: &[&str], validation_code: &str) -> String {
        let line = self.fails(1, args);
        let file = args.last().expect("the license file is the last argument");
        let prefix = format!("charterctl: {file} refused: {validation_code}: ");
        assert!(
            line.starts_with(&prefix),
            "{args:?}: expected `{prefix}…`, got: {line}"
        );
        line
    }

    /// `keygen --out-dir DIR`; returns the key id it announces, checked against the id
    /// computed here from the public key it wrote.
    fn keygen(&self, dir: &str) -> String {
        let run = self.ok(&["keygen", "--out-dir", dir]);
        let announced = run
            .stdout
            .trim_end()
            .rsplit_once("key id ")
            .map(|(_, id)| id.to_owned())
            .unwrap_or_else(|| panic!("keygen names no key id: {}", run.stdout));
        assert_eq!(announced, key_id(&self.read(&format!("{dir}/signing.pub"))));
        announced
    }

    /// Writes `payload` to `{name}.payload.json`, signs it with `key` and writes the
    /// document to `{name}.json`. Returns the document.
    fn sign(&self, key: &str, name: &str, payload: &Value) -> Value {
        let payload_file = format!("{name}.payload.json");
        self.write_json(&payload_file, payload);
        let run = self.ok(&["sign", "--key", key, &payload_file]);
        self.write(&format!("{name}.json"), &run.stdout);
        serde_json::from_str(&run.stdout).expect("sign prints JSON")
    }
}

fn assert_ok(run: &Run, args: &[&str]) {
    assert_eq!(run.code, 0, "{args:?} failed: {run:?}");
    assert_eq!(run.stderr, "", "{args:?} wrote to stderr on success");
}

/// Asserts a failed run: exit `code`, nothing on stdout, and one line on stderr that starts
/// `charterctl: ` and is no panic. Returns the line.
fn assert_error(run: &Run, code: i32, args: &[&str]) -> String {
    assert_eq!(run.code, code, "{args:?}: wrong exit code: {run:?}");
    assert_eq!(run.stdout, "", "{args:?}: printed to stdout on failure");
    assert_no_panic(run, args);
    assert!(
        run.stderr.ends_with('\n'),
        "{args:?}: stderr is not a finished line: {run:?}"
    );
    assert_eq!(
        run.stderr.lines().count(),
        1,
        "{args:?}: stderr is not one line: {:?}",
        run.stderr
    );
    assert!(
        run.stderr.starts_with("charterctl: "),
        "{args:?}: stderr does not start with `charterctl: `: {:?}",
        run.stderr
    );
    run.stderr.trim_end().to_owned()
}

fn assert_no_panic(run: &Run, args: &[&str]) {
    for marker in ["panicked", "RUST_BACKTRACE", "stack backtrace"] {
        assert!(
            !run.stderr.contains(marker),
            "{args:?}: stderr shows a panic: {}",
            run.stderr
        );
    }
}

/// `verify --trusted-key keys/signing.pub` and then `rest`: the key most tests make.
fn verify_args<'a>(rest: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["verify", "--trusted-key", "keys/signing.pub"];
    args.extend_from_slice(rest);
    args
}

/// Asserts `text` contains every one of `parts`.
fn assert_contains(text: &str, parts: &[&str]) {
    for part in parts {
        assert!(text.contains(part), "expected `{part}` in: {text}");
    }
}

/// A set of names, to compare with a directory listing or the names in a certificate.
fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// A Kong-shaped license payload, created 2024-01-01, expiring on `expiration`.
fn payload(expiration: &str) -> Value {
    json!({
        "admin_seats": "1",
        "customer": "Example Company, Inc",
        "dataplanes": "1",
        "license_creation_date": "2024-01-01",
        "license_expiration_date": expiration,
        "license_key": "00141000017ODj3AAG_a1V41000004wT0OEAU",
        "product_subscription": "Konnect Enterprise",
        "support_plan": "None"
    })
}

/// A copy of a license document with one payload field set to a new value.
fn with_field(document: &Value, field: &str, value: Value) -> Value {
    let mut copy = document.clone();
    copy["license"]["payload"][field] = value;
    copy
}

/// A file of the license crate's committed test data.
fn testdata(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../crates/charter-license/testdata")
        .join(name)
        .to_str()
        .expect("a UTF-8 path")
        .to_owned()
}

/// Decodes the first PEM block of `text`.
fn pem(text: &str) -> Pem {
    parse_x509_pem(text.as_bytes()).expect("a PEM block").1
}

/// The key id of an Ed25519 public key as DESIGN.md defines it, computed here rather than
/// taken from charterctl: the first 16 hex characters of SHA-256 of the raw 32 bytes.
fn key_id(public_pem: &str) -> String {
    let block = pem(public_pem);
    assert_eq!(block.label, "PUBLIC KEY");
    let (_, spki) = SubjectPublicKeyInfo::from_der(&block.contents).expect("an SPKI public key");
    assert_eq!(
        spki.algorithm.algorithm.to_id_string(),
        ED25519_OID,
        "not an Ed25519 key"
    );
    let raw = &spki.subject_public_key.data;
    assert_eq!(raw.len(), 32);
    Sha256::digest(raw)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

// ---------------------------------------------------------------------------------------
// The user journey
// ---------------------------------------------------------------------------------------

/// What a newcomer does: make a key pair, sign a license, verify it, see a tampered copy
/// refused, and make the cluster certificate.
#[test]
fn user_journey() {
    let ctl = Ctl::new();
    let key_id = ctl.keygen("keys");

    let document = ctl.sign("keys/signing.key", "license", &payload(FAR_FUTURE));
    assert_eq!(document["license"]["payload"], payload(FAR_FUTURE));

    let run = ctl.ok(&verify_args(&["license.json"]));
    assert!(run.stdout.starts_with("valid: "), "{}", run.stdout);
    assert_contains(
        &run.stdout,
        &[
            "Example Company, Inc",
            &format!("verified by key {key_id}"),
            FAR_FUTURE,
        ],
    );

    // The customer raises their own data plane allowance.
    let tampered = with_field(&document, "dataplanes", json!("100"));
    ctl.write_json("tampered.json", &tampered);
    let line = ctl.refused(&verify_args(&["tampered.json"]), "validation_fail");
    assert_contains(&line, &[&key_id]);

    let run = ctl.ok(&["inspect", "license.json"]);
    assert_contains(&run.stdout, &["customer: Example Company, Inc", FAR_FUTURE]);

    let run = ctl.ok(&["gen-cert", "--out-dir", "certs"]);
    assert_contains(&run.stdout, &["cluster.crt", "cluster.key", "1095 days"]);
    assert_eq!(ctl.list("certs"), names(&["cluster.crt", "cluster.key"]));
}

// ---------------------------------------------------------------------------------------
// keygen
// ---------------------------------------------------------------------------------------

#[test]
fn keygen_writes_a_pem_key_pair_with_safe_modes() {
    let ctl = Ctl::new();
    // The directory and its parents are created.
    let run = ctl.ok(&["keygen", "--out-dir", "vendor/keys"]);
    assert_contains(
        &run.stdout,
        &["vendor/keys/signing.key", "vendor/keys/signing.pub"],
    );
    assert!(
        !run.stdout.contains("PRIVATE KEY"),
        "keygen printed the private key"
    );
    assert_eq!(
        ctl.list("vendor/keys"),
        names(&["signing.key", "signing.pub"])
    );

    let private = ctl.read("vendor/keys/signing.key");
    let public = ctl.read("vendor/keys/signing.pub");
    assert!(
        private.starts_with("-----BEGIN PRIVATE KEY-----\n"),
        "{private}"
    );
    assert!(
        private.trim_end().ends_with("-----END PRIVATE KEY-----"),
        "{private}"
    );
    assert!(
        public.starts_with("-----BEGIN PUBLIC KEY-----\n"),
        "{public}"
    );
    assert!(
        public.trim_end().ends_with("-----END PUBLIC KEY-----"),
        "{public}"
    );
    // A PKCS#8 Ed25519 key names the Ed25519 OID (06 03 2b 65 70) and holds the 32-byte
    // seed, in 48 bytes (v1) or 83 with the public key (v2).
    let pkcs8 = pem(&private).contents;
    assert!(
        [48, 83].contains(&pkcs8.len()),
        "not a PKCS#8 Ed25519 key: {pkcs8:?}"
    );
    assert!(
        pkcs8
            .windows(5)
            .any(|w| w == [0x06, 0x03, 0x2b, 0x65, 0x70]),
        "not Ed25519"
    );
    assert!(
        run.stdout.contains(&key_id(&public)),
        "keygen's key id is not the public key's"
    );

    assert_eq!(ctl.mode("vendor/keys/signing.key"), 0o600);
    assert_eq!(ctl.mode("vendor/keys/signing.pub"), 0o644);
}

#[test]
fn keygen_refuses_to_overwrite_without_force() {
    let ctl = Ctl::new();
    let first_id = ctl.keygen("keys");
    let private = ctl.read("keys/signing.key");
    let public = ctl.read("keys/signing.pub");

    let line = ctl.fails(2, &["keygen", "--out-dir", "keys"]);
    assert_contains(&line, &["keys/signing.key", "already exists", "--force"]);
    assert_eq!(
        ctl.read("keys/signing.key"),
        private,
        "the refused keygen changed the key"
    );
    assert_eq!(ctl.read("keys/signing.pub"), public);

    // Only the public half left behind still counts as a key pair in the way.
    let ctl2 = Ctl::new();
    ctl2.write("keys/signing.pub", &public);
    let line = ctl2.fails(2, &["keygen", "--out-dir", "keys"]);
    assert_contains(&line, &["keys/signing.pub", "already exists"]);

    let run = ctl.ok(&["keygen", "--out-dir", "keys", "--force"]);
    let new_public = ctl.read("keys/signing.pub");
    assert_ne!(
        ctl.read("keys/signing.key"),
        private,
        "--force kept the old private key"
    );
    assert_ne!(new_public, public, "--force kept the old public key");
    let second_id = key_id(&new_public);
    assert_ne!(second_id, first_id);
    assert!(run.stdout.contains(&second_id), "{}", run.stdout);
    assert_eq!(ctl.mode("keys/signing.key"), 0o600);
    assert_eq!(ctl.mode("keys/signing.pub"), 0o644);
    assert_eq!(ctl.list("keys"), names(&["signing.key", "signing.pub"]));
}

// ---------------------------------------------------------------------------------------
// sign
// ---------------------------------------------------------------------------------------

#[test]
fn sign_prints_a_document_that_verifies() {
    let ctl = Ctl::new();
    let key_id = ctl.keygen("keys");
    let mut signed = payload(FAR_FUTURE);
    signed["features"] = json!(["rbac", "gate"]);
    let document = ctl.sign("keys/signing.key", "license", &signed);

    // Kong's shape, exactly.
    let license = document["license"]
        .as_object()
        .expect("`license` is an object");
    assert_eq!(
        license.keys().collect::<Vec<_>>(),
        ["payload", "signature", "version"]
    );
    assert_eq!(license["payload"], signed);
    assert_eq!(license["version"], "1");
    let signature = license["signature"]
        .as_str()
        .expect("the signature is a string");
    assert_eq!(signature.len(), 128);
    assert!(signature
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    assert_eq!(
        ctl.read("license.json").lines().count(),
        1,
        "compact output is one line"
    );

    let run = ctl.ok(&verify_args(&["license.json"]));
    assert!(run.stdout.starts_with("valid: "), "{}", run.stdout);
    assert!(run.stdout.contains(&key_id), "{}", run.stdout);

    // --pretty changes only the layout: the same document, and it verifies too.
    let run = ctl.ok(&[
        "sign",
        "--key",
        "keys/signing.key",
        "--pretty",
        "license.payload.json",
    ]);
    assert!(
        run.stdout.lines().count() > 5,
        "--pretty is not pretty: {}",
        run.stdout
    );
    ctl.write("pretty.json", &run.stdout);
    assert_eq!(ctl.read_json("pretty.json"), document);
    ctl.ok(&verify_args(&["pretty.json"]));

    // The signature covers the canonical payload: key order and spacing of the input
    // do not change it.
    let reordered: Vec<String> = signed
        .as_object()
        .expect("an object")
        .iter()
        .rev()
        .map(|(k, v)| format!("\n   {}  :  {v}", json!(k)))
        .collect();
    ctl.write(
        "reordered.json",
        &format!("{{{}\n}}\n", reordered.join(" ,")),
    );
    let run = ctl.ok(&["sign", "--key", "keys/signing.key", "reordered.json"]);
    let again: Value = serde_json::from_str(&run.stdout).expect("sign prints JSON");
    assert_eq!(again, document, "the same payload signed differently");

    // The extra `features` field is signed like any other.
    let tampered = with_field(&document, "features", json!(["rbac", "gate", "unlimited"]));
    ctl.write_json("tampered.json", &tampered);
    ctl.refused(&verify_args(&["tampered.json"]), "validation_fail");
}

#[test]
fn sign_reads_the_payload_from_standard_input() {
    let ctl = Ctl::new();
    ctl.keygen("keys");
    let args = ["sign", "--key", "keys/signing.key", "-"];
    let run = ctl.run_with_stdin(&args, Some(&payload(FAR_FUTURE).to_string()));
    assert_ok(&run, &args);
    ctl.write("license.json", &run.stdout);
    ctl.ok(&verify_args(&["license.json"]));
}

#[test]
fn sign_refuses_bad_keys_and_payloads() {
    let ctl = Ctl::new();
    ctl.keygen("keys");
    let good = payload(FAR_FUTURE);
    ctl.write_json("payload.json", &good);
    ctl.write("not-json.json", "admin_seats: 1\n");
    ctl.write_json("array.json", &json!([good]));
    let document = ctl.sign("keys/signing.key", "document", &good);
    ctl.write_json("whole-document.json", &document);
    let mut no_key = good.clone();
    no_key
        .as_object_mut()
        .expect("an object")
        .remove("license_key");
    ctl.write_json("no-license-key.json", &no_key);
    let mut bad_date = good.clone();
    bad_date["license_expiration_date"] = json!("31/12/2099");
    ctl.write_json("bad-date.json", &bad_date);
    let mut inverted = good.clone();
    inverted["license_expiration_date"] = json!("2023-12-31");
    ctl.write_json("inverted.json", &inverted);

    let cases: &[(&str, &str, &[&str])] = &[
        (
            "missing.key",
            "payload.json",
            &["reading signing key", "missing.key"],
        ),
        (
            "keys/signing.pub",
            "payload.json",
            &["keys/signing.pub", "not an Ed25519 private key"],
        ),
        (
            "payload.json",
            "payload.json",
            &["payload.json", "private key"],
        ),
        (
            "keys/signing.key",
            "missing.json",
            &["reading payload", "missing.json"],
        ),
        (
            "keys/signing.key",
            "not-json.json",
            &["not-json.json", "not valid JSON"],
        ),
        (
            "keys/signing.key",
            "array.json",
            &["array.json", "must be a JSON object"],
        ),
        (
            "keys/signing.key",
            "whole-document.json",
            &["whole-document.json", "already a license document"],
        ),
        (
            "keys/signing.key",
            "no-license-key.json",
            &[
                "no-license-key.json",
                "invalid_license_format",
                "license_key",
            ],
        ),
        (
            "keys/signing.key",
            "bad-date.json",
            &[
                "bad-date.json",
                "invalid_expiration_date",
                "license_expiration_date",
                "31/12/2099",
            ],
        ),
        (
            "keys/signing.key",
            "inverted.json",
            &["inverted.json", "invalid_expiration_date", "before"],
        ),
    ];
    for (key, payload, expected) in cases {
        let line = ctl.fails(2, &["sign", "--key", key, payload]);
        assert_contains(&line, expected);
    }
}

// ---------------------------------------------------------------------------------------
// verify
// ---------------------------------------------------------------------------------------

#[test]
fn verify_reports_the_status_on_a_given_day() {
    let ctl = Ctl::new();
    let key_id = ctl.keygen("keys");
    ctl.sign("keys/signing.key", "license", &payload(EXPIRY));

    // (day, status, what the expiry part says); EXPIRY is 2030-06-30.
    let cases = [
        ("2024-01-01", "valid", "(2372 days left)"),
        ("2030-03-31", "valid", "(91 days left)"),
        ("2030-04-01", "expiring", "(90 days left)"),
        ("2030-06-30", "expiring", "(0 days left)"),
        ("2030-07-01", "grace", "expired 2030-06-30 (1 day"),
        ("2030-07-30", "grace", "(30 days ago)"),
        ("2030-07-31", "expired", "(31 days ago)"),
        ("2031-06-30", "expired", "(365 days ago)"),
    ];
    for (day, status, expiry) in cases {
        let run = ctl.ok(&verify_args(&["--at", day, "license.json"]));
        let first = run.stdout.lines().next().unwrap_or_default();
        assert!(
            first.starts_with(&format!("{status}: ")),
            "at {day}: expected {status}: {first}"
        );
        assert_contains(
            first,
            &[&format!("verified by key {key_id}"), EXPIRY, expiry],
        );
        // Anything short of `valid` comes with a warning for the operator.
        assert_eq!(
            run.stdout.contains("warning: "),
            status != "valid",
            "at {day}: {}",
            run.stdout
        );
    }
    // Before its creation date a license is not in force.
    let line = ctl.refused(
        &verify_args(&["--at", "2023-12-31", "license.json"]),
        "invalid_expiration_date",
    );
    assert_contains(&line, &["2024-01-01", "future"]);
}

#[test]
fn verify_accepts_an_admin_api_record_and_standard_input() {
    let ctl = Ctl::new();
    let key_id = ctl.keygen("keys");
    ctl.sign("keys/signing.key", "license", &payload(FAR_FUTURE));
    // What Kong's `GET /licenses/{id}` returns: the document as a string in `payload`.
    let record = json!({
        "id": "30b4edb7-0847-4f65-af90-efbed8b0161f",
        "payload": ctl.read("license.json"),
        "created_at": 1_500_508_800,
        "updated_at": 1_500_508_800
    });
    ctl.write_json("record.json", &record);
    let run = ctl.ok(&verify_args(&["record.json"]));
    assert!(run.stdout.starts_with("valid: "), "{}", run.stdout);
    assert!(run.stdout.contains(&key_id), "{}", run.stdout);

    // A tampered document inside a record is refused the same way.
    let tampered = with_field(
        &ctl.read_json("license.json"),
        "customer",
        json!("Someone Else"),
    );
    ctl.write_json(
        "tampered-record.json",
        &json!({ "payload": tampered.to_string() }),
    );
    ctl.refused(&verify_args(&["tampered-record.json"]), "validation_fail");

    let args = ["verify", "--trusted-key", "keys/signing.pub", "-"];
    let run = ctl.run_with_stdin(&args, Some(&ctl.read("license.json")));
    assert_ok(&run, &args);
    assert!(run.stdout.starts_with("valid: "), "{}", run.stdout);
}

#[test]
fn verify_trusts_a_set_of_keys_for_rotation() {
    let ctl = Ctl::new();
    let old_id = ctl.keygen("old");
    let new_id = ctl.keygen("new");
    ctl.sign("new/signing.key", "license", &payload(FAR_FUTURE));

    // During a rotation both keys are trusted: the new one verifies the re-signed license.
    let run = ctl.ok(&[
        "verify",
        "--trusted-key",
        "old/signing.pub",
        "--trusted-key",
        "new/signing.pub",
        "license.json",
    ]);
    assert!(run.stdout.starts_with("valid: "), "{}", run.stdout);
    assert!(
        run.stdout.contains(&format!("verified by key {new_id}")),
        "{}",
        run.stdout
    );
    assert!(!run.stdout.contains(&old_id), "{}", run.stdout);

    // The old key alone does not verify it, and the refusal names the keys that were tried.
    let line = ctl.refused(
        &["verify", "--trusted-key", "old/signing.pub", "license.json"],
        "validation_fail",
    );
    assert_contains(&line, &[&old_id]);
}

#[test]
fn verify_the_committed_vector_and_kong_seed() {
    let ctl = Ctl::new();
    let vector_pub = testdata("vector.pub");
    let vector_id = key_id(&fs::read_to_string(&vector_pub).expect("reading vector.pub"));

    let vector = testdata("vector.license.json");
    let run = ctl.ok(&[
        "verify",
        "--trusted-key",
        &vector_pub,
        "--at",
        "2026-06-01",
        &vector,
    ]);
    assert!(run.stdout.starts_with("valid: "), "{}", run.stdout);
    assert_contains(
        &run.stdout,
        &[
            "Charter Test Vector, Inc",
            &format!("verified by key {vector_id}"),
            "2099-12-31",
        ],
    );
    // And on today's clock too.
    ctl.ok(&["verify", "--trusted-key", &vector_pub, &vector]);

    // Kong's seed license has the right shape but was signed by a key we do not have.
    let kong = testdata("kong-seed-license.json");
    let line = ctl.refused(
        &["verify", "--trusted-key", &vector_pub, &kong],
        "validation_fail",
    );
    assert_contains(&line, &[&vector_id]);
}

#[test]
fn verify_refuses_bad_licenses_with_their_codes() {
    let ctl = Ctl::new();
    ctl.keygen("keys");
    ctl.keygen("other");
    let document = ctl.sign("keys/signing.key", "license", &payload(FAR_FUTURE));
    ctl.sign("other/signing.key", "foreign", &payload(FAR_FUTURE));

    ctl.write("not-json.json", "{\"license\": ");
    ctl.write_json("array.json", &json!([document]));
    ctl.write_json("bare-payload.json", &payload(FAR_FUTURE));
    let mut no_signature = document.clone();
    no_signature["license"]
        .as_object_mut()
        .expect("an object")
        .remove("signature");
    ctl.write_json("no-signature.json", &no_signature);
    let mut short_signature = document.clone();
    short_signature["license"]["signature"] = json!("abcd");
    ctl.write_json("short-signature.json", &short_signature);
    let mut version_2 = document.clone();
    version_2["license"]["version"] = json!("2");
    ctl.write_json("version-2.json", &version_2);
    ctl.write_json("record-not-string.json", &json!({ "payload": document }));

    // Each tampering of a signed field breaks the signature.
    let mut flipped = document.clone();
    let signature = document["license"]["signature"]
        .as_str()
        .expect("a signature");
    let first = if signature.starts_with('0') { "1" } else { "0" };
    flipped["license"]["signature"] = json!(format!("{first}{}", &signature[1..]));
    ctl.write_json("tampered-signature.json", &flipped);
    ctl.write_json(
        "tampered-expiry.json",
        &with_field(&document, "license_expiration_date", json!("2199-12-31")),
    );
    ctl.write_json(
        "tampered-seats.json",
        &with_field(&document, "admin_seats", json!("1000")),
    );
    ctl.write_json(
        "tampered-added.json",
        &with_field(&document, "features", json!(["rbac"])),
    );
    let mut removed = document.clone();
    removed["license"]["payload"]
        .as_object_mut()
        .expect("an object")
        .remove("support_plan");
    ctl.write_json("tampered-removed.json", &removed);

    let cases = [
        ("not-json.json", "invalid_license_json"),
        ("array.json", "invalid_license_format"),
        ("bare-payload.json", "invalid_license_format"),
        ("no-signature.json", "invalid_license_format"),
        ("short-signature.json", "invalid_license_format"),
        ("version-2.json", "invalid_license_format"),
        ("record-not-string.json", "invalid_license_format"),
        ("foreign.json", "validation_fail"),
        ("tampered-signature.json", "validation_fail"),
        ("tampered-expiry.json", "validation_fail"),
        ("tampered-seats.json", "validation_fail"),
        ("tampered-added.json", "validation_fail"),
        ("tampered-removed.json", "validation_fail"),
    ];
    for (file, code) in cases {
        ctl.refused(&verify_args(&[file]), code);
    }
    // The untampered original still verifies: the refusals above are the edits' doing.
    ctl.ok(&verify_args(&["license.json"]));
}

#[test]
fn verify_fails_on_bad_arguments() {
    let ctl = Ctl::new();
    ctl.keygen("keys");
    ctl.sign("keys/signing.key", "license", &payload(FAR_FUTURE));

    let line = ctl.fails(2, &verify_args(&["missing.json"]));
    assert_contains(&line, &["reading license", "missing.json"]);

    let line = ctl.fails(
        2,
        &["verify", "--trusted-key", "missing.pub", "license.json"],
    );
    assert_contains(&line, &["reading trusted key", "missing.pub"]);

    // A file that is not a public key, including the private half by mistake.
    for not_a_key in ["license.json", "keys/signing.key"] {
        let line = ctl.fails(2, &["verify", "--trusted-key", not_a_key, "license.json"]);
        assert_contains(&line, &[not_a_key, "not an Ed25519 public key"]);
    }

    for day in ["2030-02-30", "yesterday", "30-06-2030"] {
        let line = ctl.fails(2, &verify_args(&["--at", day, "license.json"]));
        assert_contains(&line, &[&format!("--at `{day}`"), "YYYY-MM-DD"]);
    }

    // A usage error is clap's: exit 2 and a message naming the missing flag.
    let args = ["verify", "license.json"];
    let run = ctl.run(&args);
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(run.stdout, "");
    assert_no_panic(&run, &args);
    assert_contains(&run.stderr, &["--trusted-key"]);
}

// ---------------------------------------------------------------------------------------
// inspect
// ---------------------------------------------------------------------------------------

#[test]
fn inspect_shows_fields_and_days_left_without_a_key() {
    let ctl = Ctl::new();
    ctl.keygen("keys");
    ctl.sign("keys/signing.key", "license", &payload(EXPIRY));

    let run = ctl.ok(&["inspect", "--at", "2030-04-01", "license.json"]);
    assert_contains(
        &run.stdout,
        &[
            "customer: Example Company, Inc",
            "product_subscription: Konnect Enterprise",
            "license_expiration_date: 2030-06-30",
            "not checked",
            "expires: 2030-06-30",
            "90 days left",
        ],
    );
    let run = ctl.ok(&["inspect", "--at", "2030-07-31", "license.json"]);
    assert_contains(&run.stdout, &["expired: 2030-06-30", "31 days ago"]);

    // No key is needed, so a license nobody here can verify is shown too, as a record.
    let seed = fs::read_to_string(testdata("kong-seed-license.json")).expect("reading the seed");
    ctl.write_json("record.json", &json!({ "payload": seed }));
    let run = ctl.ok(&["inspect", "--at", "2017-07-20", "record.json"]);
    assert_contains(
        &run.stdout,
        &[
            "customer: Example Company, Inc",
            "expires: 2017-07-20",
            "0 days left",
        ],
    );
}

#[test]
fn inspect_refuses_what_is_not_a_license() {
    let ctl = Ctl::new();
    ctl.write("not-json.json", "-----BEGIN PUBLIC KEY-----\n");
    ctl.refused(&["inspect", "not-json.json"], "invalid_license_json");
    ctl.write_json("payload.json", &payload(EXPIRY));
    ctl.refused(&["inspect", "payload.json"], "invalid_license_format");

    let line = ctl.fails(2, &["inspect", "missing.json"]);
    assert_contains(&line, &["reading license", "missing.json"]);
    ctl.write_json("license.json", &json!({}));
    let line = ctl.fails(2, &["inspect", "--at", "tomorrow", "license.json"]);
    assert_contains(&line, &["--at `tomorrow`"]);
}

// ---------------------------------------------------------------------------------------
// gen-cert
// ---------------------------------------------------------------------------------------

/// A certificate file, read and decoded; parse it with [`Pem::parse_x509`].
fn cert_pem(ctl: &Ctl, name: &str) -> Pem {
    let block = pem(&ctl.read(name));
    assert_eq!(block.label, "CERTIFICATE", "{name}");
    block
}

/// The (serverAuth, clientAuth) extended key usages of a certificate.
fn eku(cert: &X509Certificate<'_>) -> (bool, bool) {
    let ext = cert
        .extended_key_usage()
        .expect("a well-formed extended key usage")
        .expect("an extended key usage");
    (ext.value.server_auth, ext.value.client_auth)
}

/// The names a certificate is for, as `DNS:name` and `IP:address`.
fn sans(cert: &X509Certificate<'_>) -> BTreeSet<String> {
    let ext = cert
        .subject_alternative_name()
        .expect("a well-formed subject alternative name")
        .expect("subject alternative names");
    ext.value
        .general_names
        .iter()
        .map(|name| match name {
            GeneralName::DNSName(dns) => format!("DNS:{dns}"),
            GeneralName::IPAddress(ip) => match <[u8; 4]>::try_from(*ip) {
                Ok(v4) => format!("IP:{}", Ipv4Addr::from(v4)),
                Err(_) => format!("IP:{ip:?}"),
            },
            other => panic!("unexpected subject alternative name {other:?}"),
        })
        .collect()
}

/// Asserts a certificate was made between `before` and `after` (Unix seconds): valid from a
/// day earlier, for three years.
fn assert_validity(name: &str, cert: &X509Certificate<'_>, before: i64, after: i64) {
    let not_before = cert.validity().not_before.timestamp();
    let not_after = cert.validity().not_after.timestamp();
    assert!(
        (before - DAY - 1..=after - DAY + 1).contains(&not_before),
        "{name}: not_before {not_before} is not a day before the run ({before}..{after})"
    );
    assert!(
        (before + CERT_DAYS * DAY - 1..=after + CERT_DAYS * DAY + 1).contains(&not_after),
        "{name}: not_after {not_after} is not {CERT_DAYS} days after the run ({before}..{after})"
    );
    assert!(cert.validity().is_valid(), "{name} is not valid now");
}

/// Asserts the key files are private PKCS#8 PEM keys with mode 0600, and the certificates
/// mode 0644.
fn assert_files(ctl: &Ctl, dir: &str, stems: &[&str]) {
    for stem in stems {
        let key = format!("{dir}/{stem}.key");
        assert_eq!(pem(&ctl.read(&key)).label, "PRIVATE KEY", "{key}");
        assert_eq!(ctl.mode(&key), 0o600, "{key}");
        assert_eq!(ctl.mode(&format!("{dir}/{stem}.crt")), 0o644, "{stem}.crt");
    }
}

#[test]
fn gen_cert_makes_the_shared_cluster_certificate() {
    let ctl = Ctl::new();
    let before = unix_now();
    let run = ctl.ok(&["gen-cert", "--out-dir", "certs"]);
    let after = unix_now();
    assert_contains(
        &run.stdout,
        &["certs/cluster.crt", "certs/cluster.key", "valid 1095 days"],
    );
    assert_eq!(ctl.list("certs"), names(&["cluster.crt", "cluster.key"]));
    assert_files(&ctl, "certs", &["cluster"]);

    let block = cert_pem(&ctl, "certs/cluster.crt");
    let cert = block.parse_x509().expect("cluster.crt parses");
    assert_validity("cluster.crt", &cert, before, after);
    // Both sides present the same certificate: it must serve and authenticate clients.
    assert_eq!(
        eku(&cert),
        (true, true),
        "cluster.crt needs serverAuth and clientAuth"
    );
    assert!(!cert.is_ca(), "the shared cluster certificate is not a CA");
    assert_eq!(
        cert.issuer().as_raw(),
        cert.subject().as_raw(),
        "not self-signed"
    );
    cert.verify_signature(None)
        .expect("cluster.crt is signed by its own key");
}

#[test]
fn gen_cert_with_ca_makes_a_pki() {
    let ctl = Ctl::new();
    let before = unix_now();
    let run = ctl.ok(&["gen-cert", "--out-dir", "pki", "--ca"]);
    let after = unix_now();
    assert_contains(
        &run.stdout,
        &["pki/ca.crt", "pki/cp.crt", "pki/dp.crt", "1095 days"],
    );
    let stems = ["cluster", "ca", "cp", "dp"];
    let expected: BTreeSet<String> = stems
        .iter()
        .flat_map(|s| [format!("{s}.crt"), format!("{s}.key")])
        .collect();
    assert_eq!(ctl.list("pki"), expected);
    assert_files(&ctl, "pki", &stems);

    let ca_block = cert_pem(&ctl, "pki/ca.crt");
    let ca = ca_block.parse_x509().expect("ca.crt parses");
    assert_validity("ca.crt", &ca, before, after);
    assert!(ca.is_ca(), "ca.crt is not a CA");
    let usage = ca
        .key_usage()
        .expect("a well-formed key usage")
        .expect("a key usage");
    assert!(
        usage.value.key_cert_sign(),
        "ca.crt may not sign certificates"
    );
    ca.verify_signature(None).expect("ca.crt is self-signed");

    let cp_block = cert_pem(&ctl, "pki/cp.crt");
    let dp_block = cert_pem(&ctl, "pki/dp.crt");
    let cp = cp_block.parse_x509().expect("cp.crt parses");
    let dp = dp_block.parse_x509().expect("dp.crt parses");
    for (name, leaf) in [("cp.crt", &cp), ("dp.crt", &dp)] {
        assert_validity(name, leaf, before, after);
        assert!(!leaf.is_ca(), "{name} must not be a CA");
        assert_eq!(
            leaf.issuer().as_raw(),
            ca.subject().as_raw(),
            "{name} is not issued by the CA"
        );
        leaf.verify_signature(Some(ca.public_key()))
            .unwrap_or_else(|e| panic!("{name} is not signed by the CA's key: {e}"));
    }
    assert_eq!(eku(&cp), (true, false), "cp.crt is for serving only");
    assert_eq!(
        eku(&dp),
        (false, true),
        "dp.crt is for client authentication only"
    );
    assert_eq!(
        sans(&cp),
        names(&["DNS:charter-cp", "DNS:localhost", "IP:127.0.0.1"])
    );
    assert_eq!(sans(&dp), names(&["DNS:charter-dp"]));

    // The shared certificate comes with it, and is not issued by the CA.
    let cluster_block = cert_pem(&ctl, "pki/cluster.crt");
    let cluster = cluster_block.parse_x509().expect("cluster.crt parses");
    assert_eq!(eku(&cluster), (true, true));
    assert!(cluster.verify_signature(Some(ca.public_key())).is_err());
}

#[test]
fn gen_cert_puts_custom_names_in_the_cp_certificate() {
    let ctl = Ctl::new();
    ctl.ok(&[
        "gen-cert",
        "--out-dir",
        "pki",
        "--ca",
        "--cp-name",
        "cp.example.internal",
        "--cp-name",
        "10.1.2.3",
    ]);
    let block = cert_pem(&ctl, "pki/cp.crt");
    let cp = block.parse_x509().expect("cp.crt parses");
    let sans = sans(&cp);
    assert!(sans.contains("DNS:cp.example.internal"), "{sans:?}");
    // An address is an IP SAN: a DNS SAN would not match a connection made by address.
    assert!(sans.contains("IP:10.1.2.3"), "{sans:?}");
}

#[test]
fn gen_cert_refuses_to_overwrite_without_force() {
    let ctl = Ctl::new();
    ctl.ok(&["gen-cert", "--out-dir", "certs"]);
    let cert = ctl.read("certs/cluster.crt");
    let key = ctl.read("certs/cluster.key");

    let line = ctl.fails(2, &["gen-cert", "--out-dir", "certs"]);
    assert_contains(&line, &["certs/cluster.crt", "already exists", "--force"]);
    // Adding a PKI next to an existing shared certificate also needs --force.
    let line = ctl.fails(2, &["gen-cert", "--out-dir", "certs", "--ca"]);
    assert_contains(&line, &["already exists", "--force"]);
    assert_eq!(
        ctl.read("certs/cluster.crt"),
        cert,
        "a refused gen-cert changed the certificate"
    );
    assert_eq!(ctl.read("certs/cluster.key"), key);
    assert_eq!(ctl.list("certs"), names(&["cluster.crt", "cluster.key"]));

    ctl.ok(&["gen-cert", "--out-dir", "certs", "--force"]);
    assert_ne!(
        ctl.read("certs/cluster.crt"),
        cert,
        "--force kept the old certificate"
    );
    assert_ne!(
        ctl.read("certs/cluster.key"),
        key,
        "--force kept the old key"
    );
    assert_files(&ctl, "certs", &["cluster"]);
    assert_eq!(ctl.list("certs"), names(&["cluster.crt", "cluster.key"]));
}

#[test]
fn gen_cert_refuses_a_bad_cp_name() {
    let ctl = Ctl::new();
    for bad in ["not a name!", "bad..name", ""] {
        let line = ctl.fails(
            2,
            &["gen-cert", "--out-dir", "pki", "--ca", "--cp-name", bad],
        );
        assert_contains(
            &line,
            &[&format!("`{bad}`"), "not a valid DNS name or IP address"],
        );
        // Nothing is written, so the corrected command needs no --force.
        let written = ctl.path("pki").exists() && !ctl.list("pki").is_empty();
        assert!(!written, "a refused gen-cert wrote {:?}", ctl.list("pki"));
    }
}
