//! The admin API suite (`admin_api/suite.rs`) on the embedded sled backend, and the
//! configuration refusals, which happen before any store is opened: a bad configuration
//! exits 64 with one line and creates nothing in the data dir.

use std::process::Command;

use charter_tests::{Backend, Vendor};
use tempfile::TempDir;

/// The backend the suite runs on.
const BACKEND: Backend = Backend::Sled;

#[path = "admin_api/suite.rs"]
mod suite;

use suite::setup;

fn refused_config(dir: &TempDir, args: &[&str], envs: &[(&str, &str)], expected: &str) {
    let mut command = Command::new(charter_tests::bin("charter-cp"));
    command
        .args(["--data-dir", &dir.path().join("refused").to_string_lossy()])
        .args(args)
        .env_remove("CHARTER_LICENSE_DATA")
        .stdin(std::process::Stdio::null());
    for (k, v) in envs {
        command.env(k, v);
    }
    let out = command.output().expect("running charter-cp");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "one line for {args:?}: {stderr}"
    );
    assert!(
        stderr.contains(expected),
        "{args:?}: expected {expected:?} in {stderr}"
    );
    assert!(
        !dir.path().join("refused").exists(),
        "nothing created for a refused configuration"
    );
}

#[test]
fn bad_configuration_exits_64_with_one_line() {
    let (dir, vendor) = setup();
    let key = vendor.public_key.to_string_lossy().into_owned();
    let port = charter_tests::free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    refused_config(&dir, &["--admin-listen", &listen], &[], "no --trusted-key");
    refused_config(
        &dir,
        &["--trusted-key", "/nonexistent.pub"],
        &[],
        "/nonexistent.pub",
    );
    let not_a_key = dir.path().join("not-a-key.pub");
    std::fs::write(&not_a_key, "hello").expect("write");
    refused_config(
        &dir,
        &["--trusted-key", &not_a_key.to_string_lossy()],
        &[],
        "not an Ed25519 public key",
    );
    refused_config(
        &dir,
        &["--trusted-key", &key, "--admin-listen", "0.0.0.0:0"],
        &[],
        "non-loopback",
    );
    refused_config(
        &dir,
        &[
            "--trusted-key",
            &key,
            "--cluster-insecure",
            "--database-url",
            "postgres://u@h:notaport/db",
        ],
        &[],
        "--database-url is not a PostgreSQL URL",
    );
    let url_file = dir.path().join("database-url");
    std::fs::write(&url_file, "postgres://u@127.0.0.1:5432/db\n").expect("write");
    refused_config(
        &dir,
        &[
            "--trusted-key",
            &key,
            "--cluster-insecure",
            "--database-url",
            "postgres://u@127.0.0.1:5432/db",
            "--database-url-file",
            &url_file.to_string_lossy(),
        ],
        &[],
        "not both",
    );
    refused_config(
        &dir,
        &["--trusted-key", &key, "--admin-listen", "nowhere"],
        &[],
        "--admin-listen",
    );
    let bad_tokens = dir.path().join("tokens");
    std::fs::write(&bad_tokens, "tok admin\n").expect("write");
    refused_config(
        &dir,
        &[
            "--trusted-key",
            &key,
            "--admin-token-file",
            &bad_tokens.to_string_lossy(),
        ],
        &[],
        "line 1",
    );
    refused_config(
        &dir,
        &["--trusted-key", &key, "--bogus-flag"],
        &[],
        "--bogus-flag",
    );
    refused_config(
        &dir,
        &["--trusted-key", &key, "--log-format", "xml"],
        &[],
        "xml",
    );
    let stranger = Vendor::new(dir.path(), 98);
    let foreign = dir.path().join("foreign.json");
    std::fs::write(&foreign, stranger.valid("FOREIGN")).expect("write");
    refused_config(
        &dir,
        &[
            "--trusted-key",
            &key,
            "--license-path",
            &foreign.to_string_lossy(),
        ],
        &[],
        "validation_fail",
    );
    refused_config(
        &dir,
        &["--trusted-key", &key],
        &[("CHARTER_LICENSE_DATA", "not json")],
        "invalid_license_json",
    );
    let no_certs = |extra: &[&str]| -> Vec<String> {
        let mut args = vec![
            "--trusted-key".to_owned(),
            key.clone(),
            "--admin-listen".to_owned(),
            listen.clone(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let args = no_certs(&[]);
    refused_config(
        &dir,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[],
        "--cluster-cert",
    );
    let garbage = dir.path().join("garbage.crt");
    std::fs::write(&garbage, "not a certificate").expect("write");
    let g = garbage.to_string_lossy().into_owned();
    let args = no_certs(&["--cluster-cert", &g, "--cluster-cert-key", &g]);
    refused_config(
        &dir,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[],
        "garbage.crt",
    );
    let args = no_certs(&[
        "--cluster-mtls",
        "pki",
        "--cluster-cert",
        &g,
        "--cluster-cert-key",
        &g,
    ]);
    refused_config(
        &dir,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[],
        "--cluster-ca-cert",
    );
    // Flags read environment variables too.
    refused_config(
        &dir,
        &[],
        &[
            ("CHARTER_TRUSTED_KEY", &key),
            ("CHARTER_ADMIN_LISTEN", "0.0.0.0:1"),
        ],
        "non-loopback",
    );
}
