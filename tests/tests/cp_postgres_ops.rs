//! A control plane and its PostgreSQL: started while the database is down it waits,
//! answering 503 until the database comes, and it reaches the database over TLS verified
//! as libpq's `sslmode` says. Real processes and a real PostgreSQL started by the test.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use charter_store::testing::TestPostgres;
use charter_tests::{bin, eventually, run, Cp, Dp, Vendor};
use serde_json::json;
use tempfile::TempDir;

#[test]
fn a_control_plane_started_while_the_database_is_down_waits_answering_503() {
    let tmp = TempDir::new().expect("temp dir");
    let mut pg = TestPostgres::start();
    let url = pg.url();
    pg.stop_immediately();
    let vendor = Vendor::new(tmp.path(), 8);
    let key = vendor.public_key.to_str().expect("utf-8 path");
    let cp = Cp::start(tmp.path(), &["--trusted-key", key, "--database-url", &url]);

    // Up, not ready: every route answers 503 with the reason, and the process stays.
    let status = cp.get("/status");
    assert_eq!(status.status, 503, "{}", status.body);
    assert_eq!(status.json()["message"], "database unavailable");
    let write = cp.send_json(
        "POST",
        "/licenses",
        &json!({"payload": vendor.valid("WAIT-1")}),
    );
    assert_eq!(write.status, 503, "{}", write.body);
    // Each 503 closes its connection, so the client's next one reaches the real API.
    let raw = {
        use std::io::{Read, Write};
        let authority = cp
            .url("/")
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let mut stream = std::net::TcpStream::connect(&authority).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        stream
            .write_all(b"GET /licenses HTTP/1.1\r\nHost: cp\r\n\r\n")
            .unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).expect("the server closes");
        raw.to_ascii_lowercase()
    };
    assert!(raw.starts_with("http/1.1 503"), "{raw}");
    assert!(raw.contains("connection: close"), "{raw}");
    assert!(
        cp.logs().contains("cannot reach the database"),
        "{}",
        cp.logs()
    );

    // The database comes: the same process becomes ready and serves.
    pg.launch();
    eventually(
        "/status 200 once the database is up",
        Duration::from_secs(30),
        || (cp.get("/status").status == 200).then_some(()),
    );
    let write = cp.send_json(
        "POST",
        "/licenses",
        &json!({"payload": vendor.valid("WAIT-2")}),
    );
    assert_eq!(write.status, 201, "{}", write.body);
    let id = write.json()["id"].as_str().expect("id").to_owned();
    let dp = Dp::start(tmp.path(), "dp", &cp, &vendor.public_key, &[]);
    dp.wait_license("the license written after the wait", |l| {
        l["id"] == id.as_str()
    });
}

/// `charterctl gen-cert --ca` in `dir`: a CA and a server certificate (`cp.crt`) for
/// localhost and 127.0.0.1.
fn certificates(dir: &Path) -> PathBuf {
    let out = run(
        "charterctl",
        &[
            "gen-cert",
            "--ca",
            "--out-dir",
            dir.to_str().expect("utf-8 path"),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.to_owned()
}

#[test]
fn a_control_plane_reaches_postgres_over_verified_tls() {
    let tmp = TempDir::new().expect("temp dir");
    let db_certs = certificates(&tmp.path().join("db-certs"));
    let other_certs = certificates(&tmp.path().join("other-certs"));
    let read = |name: &str| std::fs::read_to_string(db_certs.join(name)).expect(name);
    let pg = TestPostgres::start_with_tls(&read("cp.crt"), &read("cp.key"));
    let vendor = Vendor::new(tmp.path(), 9);
    let key = vendor.public_key.to_str().expect("utf-8 path");
    let url = |ca: &Path| {
        format!(
            "{}?sslmode=verify-full&sslrootcert={}",
            pg.url(),
            ca.join("ca.crt").display()
        )
    };

    // The server's certificate verifies against its CA and names 127.0.0.1.
    let dir_a = tmp.path().join("a");
    std::fs::create_dir_all(&dir_a).unwrap();
    let a = Cp::start(
        &dir_a,
        &["--trusted-key", key, "--database-url", &url(&db_certs)],
    );
    eventually("/status 200 over TLS", Duration::from_secs(20), || {
        (a.get("/status").status == 200).then_some(())
    });
    let logs = a.logs();
    assert!(
        logs.contains("connected to PostgreSQL") && logs.contains("verify-full"),
        "{logs}"
    );
    let write = a.send_json(
        "POST",
        "/licenses",
        &json!({"payload": vendor.valid("TLS-1")}),
    );
    assert_eq!(write.status, 201, "{}", write.body);

    // Another CA's root: the control plane never talks to that server, and says why.
    let dir_b = tmp.path().join("b");
    std::fs::create_dir_all(&dir_b).unwrap();
    let b = Cp::start(
        &dir_b,
        &["--trusted-key", key, "--database-url", &url(&other_certs)],
    );
    let logs = eventually(
        "the database error in the log",
        Duration::from_secs(20),
        || {
            let logs = b.logs();
            logs.contains("cannot reach the database").then_some(logs)
        },
    );
    assert!(
        logs.contains("error performing TLS handshake: invalid peer certificate"),
        "{logs}"
    );
    assert_eq!(b.get("/status").status, 503);

    // A root certificate file that does not exist is a configuration error: one line, 64.
    let out = Command::new(bin("charter-cp"))
        .args(["--data-dir", &tmp.path().join("c").to_string_lossy()])
        .args(["--cluster-insecure", "--trusted-key", key, "--database-url"])
        .arg(format!(
            "{}?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
            pg.url()
        ))
        .stdin(Stdio::null())
        .output()
        .expect("running charter-cp");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("--database-url: cannot read /nonexistent/ca.pem"),
        "{stderr}"
    );
}
