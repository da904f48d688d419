//! HTTP listeners that clients cannot hold: with a low open-file limit (`prlimit`), a flood
//! of idle and half-sent connections on the control plane's admin port or the data
//! plane's status port neither takes the process's file handles (the cluster port keeps
//! working, a data plane connects) nor keeps `/status` from answering, and an idle
//! connection is closed after 30 s.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use charter_tests::{
    bin, cluster_certs, eventually, free_port, http, shared_tls_args, Cp, Dp, Vendor,
};
use serde_json::json;
use tempfile::TempDir;

/// The open-file limit the flooded process runs with.
const FILE_LIMIT: &str = "256";

/// Connections the test holds open: several times what a listener of a process with
/// [`FILE_LIMIT`] file handles accepts at once.
const FLOOD: usize = 300;

/// Starts `binary` under `prlimit --nofile`, logging to `log`, and waits for `/status` on
/// `status` to answer.
fn start_limited(binary: &str, args: &[String], status: SocketAddr, log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("log file");
    let mut child = Command::new("prlimit")
        .arg(format!("--nofile={FILE_LIMIT}:{FILE_LIMIT}"))
        .arg("--")
        .arg(bin(binary))
        .args(args)
        .env_remove("CHARTER_LICENSE_DATA")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawning under prlimit");
    eventually(
        &format!("{binary} /status"),
        Duration::from_secs(20),
        || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{binary} exited: {status}");
            }
            http("GET", &format!("http://{status}/status"), None)
                .ok()
                .map(|_| ())
        },
    );
    child
}

/// Opens [`FLOOD`] connections to `addr` that send nothing, and 20 that send half a
/// request head; all are kept open by the caller.
fn flood(addr: SocketAddr) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for n in 0..FLOOD + 20 {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(mut stream) => {
                if n >= FLOOD {
                    let _ = stream.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n");
                }
                held.push(stream);
            }
            // The backlog is full: the flood is as big as it gets.
            Err(_) => break,
        }
    }
    assert!(held.len() > 100, "only {} connections opened", held.len());
    held
}

/// `/status` answers on fresh connections while the flood is held, well before the idle
/// timeout (30 s) could have freed anything: the listener closes idle connections to
/// make room.
fn status_answers_during_the_flood(status: SocketAddr) {
    let started = Instant::now();
    let answered = eventually("/status during the flood", Duration::from_secs(60), || {
        http("GET", &format!("http://{status}/status"), None).ok()
    });
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "/status took {:?} (status {}): the flood held the listener until the idle timeout",
        started.elapsed(),
        answered.status
    );
}

/// An idle connection is closed by the server within the idle timeout (30 s) and a margin.
fn idle_connection_is_closed(addr: SocketAddr) {
    let mut idle = TcpStream::connect(addr).expect("an idle connection");
    idle.write_all(b"GET /status HTTP/1.1\r\n")
        .expect("half a head");
    idle.set_read_timeout(Some(Duration::from_secs(50)))
        .expect("read timeout");
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let mut received = Vec::new();
    loop {
        match idle.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "the half-sent connection was still open after {:?}: {e}",
                started.elapsed()
            ),
        }
    }
    let text = String::from_utf8_lossy(&received);
    assert!(
        !text.contains("200 OK"),
        "a half-sent head was answered: {text}"
    );
}

#[test]
fn a_flood_of_idle_admin_connections_takes_neither_status_nor_the_cluster_port() {
    let tmp = TempDir::new().expect("temp dir");
    let vendor = Vendor::new(tmp.path(), 11);
    let certs = cluster_certs(tmp.path());
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let cluster = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut args = vec![
        "--data-dir".to_owned(),
        tmp.path().join("cp-data").to_string_lossy().into_owned(),
        "--admin-listen".to_owned(),
        admin.to_string(),
        "--cluster-listen".to_owned(),
        cluster.to_string(),
        "--trusted-key".to_owned(),
        vendor.public_key.to_string_lossy().into_owned(),
    ];
    args.extend(shared_tls_args(&certs));
    let mut cp = start_limited("charter-cp", &args, admin, &tmp.path().join("cp.log"));
    let post = http(
        "POST",
        &format!("http://{admin}/licenses"),
        Some(charter_tests::Body::Json(
            json!({"payload": vendor.valid("FLOOD-1")}),
        )),
    )
    .expect("POST");
    assert_eq!(post.status, 201, "{}", post.body);
    let id = post.json()["id"].as_str().expect("id").to_owned();

    let held = flood(admin);
    status_answers_during_the_flood(admin);
    // The cluster port still has file handles: a data plane connects and is licensed.
    let dp = Dp::start_at(
        tmp.path(),
        "dp",
        &[cluster],
        &certs,
        &vendor.public_key,
        &[],
    );
    dp.wait_license("the license, during the flood", |l| l["id"] == id.as_str());
    idle_connection_is_closed(admin);
    drop(held);
    assert!(
        cp.try_wait().expect("wait").is_none(),
        "the control plane exited"
    );
    let log = std::fs::read_to_string(tmp.path().join("cp.log")).unwrap_or_default();
    assert!(log.contains("connection limit reached"), "{log}");
    assert!(!log.contains("Too many open files"), "{log}");
    let _ = cp.kill();
    let _ = cp.wait();
}

#[test]
fn a_flood_of_idle_status_connections_does_not_cut_a_data_plane_off() {
    let tmp = TempDir::new().expect("temp dir");
    let vendor = Vendor::new(tmp.path(), 12);
    let key = vendor.public_key.to_str().expect("utf-8 path");
    let cp = Cp::start(tmp.path(), &["--trusted-key", key]);
    let status = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut args = vec![
        "--data-dir".to_owned(),
        tmp.path().join("dp-data").to_string_lossy().into_owned(),
        "--status-listen".to_owned(),
        status.to_string(),
        "--control-plane".to_owned(),
        cp.cluster_addr.to_string(),
        "--trusted-key".to_owned(),
        key.to_owned(),
    ];
    args.extend(shared_tls_args(&cp.certs));
    let mut dp = start_limited("charter-dp", &args, status, &tmp.path().join("dp.log"));

    let held = flood(status);
    status_answers_during_the_flood(status);
    // The data plane still hears its control plane: a license written now reaches it.
    let post = cp.send_json(
        "POST",
        "/licenses",
        &json!({"payload": vendor.valid("FLOOD-2")}),
    );
    assert_eq!(post.status, 201, "{}", post.body);
    let id = post.json()["id"].as_str().expect("id").to_owned();
    eventually(
        "the data plane holds the new license",
        Duration::from_secs(20),
        || {
            let license = http("GET", &format!("http://{status}/license"), None).ok()?;
            (license.json()["id"] == id.as_str()).then_some(())
        },
    );
    idle_connection_is_closed(status);
    drop(held);
    assert!(
        dp.try_wait().expect("wait").is_none(),
        "the data plane exited"
    );
    let _ = dp.kill();
    let _ = dp.wait();
}
