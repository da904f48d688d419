//! End-to-end tests of gate mode: a real `charter-dp` in front of a real upstream on
//! loopback, licensed by a real `charter-cp` (or a static license), and the usage counts
//! that reach the control plane's report exactly once.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use charter_tests::{
    eventually, free_port, http, http_with_headers, Body as ReqBody, Cp, Dp, Resp, Vendor,
};
use serde_json::{json, Value};
use tempfile::TempDir;

/// An upstream on loopback: `/echo/...` answers what it received (and the port of the
/// connection it came on), `/close` answers it too but closes the connection after,
/// `/status/{code}` answers that status, `/large/{bytes}` a streamed body, `/slow` after 3 s.
struct Upstream {
    addr: SocketAddr,
    _runtime: tokio::runtime::Runtime,
}

async fn echo(ConnectInfo(peer): ConnectInfo<SocketAddr>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 64 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let headers: serde_json::Map<String, Value> = parts
        .headers
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or(""))))
        .collect();
    let answer = json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_len": body.len(),
        "body_head": String::from_utf8_lossy(&body[..body.len().min(64)]),
        "peer_port": peer.port(),
    });
    ([("x-upstream", "yes")], axum::Json(answer)).into_response()
}

async fn close(peer: ConnectInfo<SocketAddr>, request: Request) -> Response {
    let mut response = echo(peer, request).await;
    response.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    response
}

async fn status(Path(code): Path<u16>) -> Response {
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::IM_A_TEAPOT);
    (code, format!("status {code}")).into_response()
}

async fn large(Path(bytes): Path<usize>) -> Response {
    let chunk = vec![b'x'; 64 * 1024];
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..bytes / chunk.len())
        .map(|_| Ok(chunk.clone()))
        .collect();
    Response::new(Body::from_stream(tokio_stream::iter(chunks)))
}

async fn slow() -> &'static str {
    tokio::time::sleep(Duration::from_secs(3)).await;
    "late"
}

impl Upstream {
    fn start() -> Upstream {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new()
            .route("/status/{code}", any(status))
            .route("/large/{bytes}", any(large))
            .route("/slow", any(slow))
            .route("/close", any(close))
            .fallback(echo);
        runtime.spawn(async move {
            let _ = axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await;
        });
        Upstream {
            addr,
            _runtime: runtime,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A data plane in gate mode in front of `upstream`.
fn gate(
    dir: &TempDir,
    name: &str,
    cp: &Cp,
    vendor: &Vendor,
    upstream: &str,
    extra: &[&str],
) -> (Dp, SocketAddr) {
    let proxy = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy_arg = proxy.to_string();
    let mut args = vec![
        "--proxy-listen",
        &proxy_arg,
        "--upstream",
        upstream,
        "--telemetry-interval",
        "1",
    ];
    args.extend_from_slice(extra);
    let dp = Dp::start(dir.path(), name, cp, &vendor.public_key, &args);
    (dp, proxy)
}

fn through(
    proxy: SocketAddr,
    method: &str,
    path: &str,
    body: Option<ReqBody>,
    headers: &[(&str, &str)],
) -> Resp {
    http_with_headers(method, &format!("http://{proxy}{path}"), body, headers)
        .expect("the gate answers")
}

fn setup() -> (TempDir, Vendor, Cp, Upstream) {
    let dir = TempDir::new().expect("temp dir");
    let vendor = Vendor::new(dir.path(), 51);
    let key = vendor.public_key.to_string_lossy().into_owned();
    let cp = Cp::start(dir.path(), &["--trusted-key", &key]);
    (dir, vendor, cp, Upstream::start())
}

#[test]
fn gate_forwards_only_while_licensed_and_switches_within_a_second() {
    let (dir, vendor, cp, upstream) = setup();
    let (dp, proxy) = gate(&dir, "gate", &cp, &vendor, &upstream.url(), &[]);

    // Unlicensed: Kong's 403.
    let denied = through(proxy, "GET", "/echo", None, &[]);
    assert_eq!(denied.status, 403);
    assert_eq!(
        denied.json(),
        json!({"message": "Enterprise license missing or expired"})
    );

    // Licensed: forwarded within a second of the license being added.
    let record = cp.add(&vendor.valid("GATE"));
    let started = Instant::now();
    eventually("the gate to open", Duration::from_secs(5), || {
        (through(proxy, "GET", "/echo", None, &[]).status == 200).then_some(())
    });
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "opened after {:?}",
        started.elapsed()
    );

    // Method, path, query, headers and body pass through; hop-by-hop headers do not.
    let body = ReqBody::Raw("text/plain".into(), b"hello upstream".to_vec());
    let resp = through(
        proxy,
        "PUT",
        "/echo/a/b?x=1&y=two",
        Some(body),
        &[
            ("x-custom", "kept"),
            ("connection", "keep-alive, x-drop"),
            ("x-drop", "gone"),
        ],
    );
    assert_eq!(resp.status, 200, "{}", resp.body);
    let seen = resp.json();
    assert_eq!(seen["method"], "PUT");
    assert_eq!(seen["path"], "/echo/a/b");
    assert_eq!(seen["query"], "x=1&y=two");
    assert_eq!(seen["body_head"], "hello upstream");
    assert_eq!(seen["headers"]["x-custom"], "kept");
    assert!(
        seen["headers"].get("x-drop").is_none(),
        "a header named in Connection is hop-by-hop: {seen}"
    );
    assert_eq!(seen["headers"]["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "http");
    assert_eq!(
        seen["headers"]["x-forwarded-host"],
        json!(proxy.to_string())
    );
    // Status codes pass through.
    for code in [201, 404, 418, 500, 503] {
        assert_eq!(
            through(proxy, "GET", &format!("/status/{code}"), None, &[]).status,
            code
        );
    }
    // A large body streams through both ways.
    let big = vec![b'y'; 8 * 1024 * 1024];
    let resp = through(
        proxy,
        "POST",
        "/echo/upload",
        Some(ReqBody::Raw("application/octet-stream".into(), big)),
        &[],
    );
    assert_eq!(resp.json()["body_len"], 8 * 1024 * 1024);
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}",
        ])
        .arg(format!("http://{proxy}/large/{}", 32 * 1024 * 1024))
        .output()
        .expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("200 {}", 32 * 1024 * 1024)
    );
    // HTTP/2 (cleartext, prior knowledge) clients are served too.
    let out = Command::new("curl")
        .args([
            "-s",
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
        ])
        .arg(format!("http://{proxy}/echo/h2"))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200 2");

    // The license is deleted: denied again within a second.
    let id = record["id"].as_str().expect("id");
    assert_eq!(cp.send("DELETE", &format!("/licenses/{id}")).status, 204);
    let started = Instant::now();
    eventually("the gate to close", Duration::from_secs(5), || {
        (through(proxy, "GET", "/echo", None, &[]).status == 403).then_some(())
    });
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "closed after {:?}",
        started.elapsed()
    );
    drop(dp);
}

/// One keep-alive HTTP/1.1 client connection.
struct KeepAlive {
    reader: BufReader<TcpStream>,
}

impl KeepAlive {
    fn connect(addr: SocketAddr) -> KeepAlive {
        let stream = TcpStream::connect(addr).expect("connect to the gate");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        KeepAlive {
            reader: BufReader::new(stream),
        }
    }

    /// `GET path` on this connection: the status and the JSON body.
    fn get(&mut self, path: &str) -> (u16, Value) {
        self.send("GET", path, b"")
    }

    /// `method target` with `body` on this connection: the status and the JSON body.
    fn send(&mut self, method: &str, target: &str, body: &[u8]) -> (u16, Value) {
        let head = format!(
            "{method} {target} HTTP/1.1\r\nhost: gate.test\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let stream = self.reader.get_mut();
        stream.write_all(head.as_bytes()).expect("send");
        stream.write_all(body).expect("send body");
        let mut status_line = String::new();
        self.reader
            .read_line(&mut status_line)
            .expect("status line");
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let mut length = 0;
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).expect("header line");
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().expect("content-length");
                }
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).expect("body");
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }
}

#[test]
fn a_client_connection_keeps_its_upstream_connection_and_idle_ones_are_reused() {
    let (dir, vendor, cp, upstream) = setup();
    cp.add(&vendor.valid("LANES"));
    let (dp, proxy) = gate(&dir, "lanes", &cp, &vendor, &upstream.url(), &[]);
    dp.wait_license("the license", |l| l["status"] == "valid");

    // Requests on one client connection go over one upstream connection.
    let mut client = KeepAlive::connect(proxy);
    let ports: Vec<Value> = (0..3)
        .map(|i| {
            let (status, seen) = client.get(&format!("/echo/{i}"));
            assert_eq!(status, 200, "{seen}");
            assert_eq!(seen["path"], format!("/echo/{i}"));
            seen["peer_port"].clone()
        })
        .collect();
    assert!(ports[0].is_u64(), "{ports:?}");
    assert!(ports.iter().all(|p| *p == ports[0]), "{ports:?}");
    // A body on the reused connection; an absolute-form target with no path.
    let (status, seen) = client.send("POST", "/echo/body", b"twelve bytes");
    assert_eq!((status, &seen["body_len"]), (200, &json!(12)), "{seen}");
    assert_eq!(seen["peer_port"], ports[0]);
    let (status, seen) = client.get("http://gate.test?x=1");
    assert_eq!(status, 200, "{seen}");
    assert_eq!(
        (&seen["path"], &seen["query"]),
        (&json!("/"), &json!("x=1"))
    );

    // Two client connections taking turns keep one upstream connection each (a pool
    // shared per request would hand both the same, most recently used, one).
    let mut other = KeepAlive::connect(proxy);
    let turns: Vec<(Value, Value)> = (0..2)
        .map(|_| {
            (
                client.get("/echo/a").1["peer_port"].clone(),
                other.get("/echo/b").1["peer_port"].clone(),
            )
        })
        .collect();
    assert_eq!(turns[0], turns[1], "{turns:?}");
    assert_ne!(turns[0].0, turns[0].1, "{turns:?}");
    drop(other);

    // An HTTP/1.0 client, answered and closed.
    let mut old = TcpStream::connect(proxy).expect("connect");
    old.write_all(b"GET /echo/old HTTP/1.0\r\n\r\n")
        .expect("send");
    let mut answer = String::new();
    old.read_to_string(&mut answer).expect("read to the close");
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    assert!(answer.contains("\"path\":\"/echo/old\""), "{answer}");

    // An upstream that closes its connection after each answer: every request on the
    // same client connection is still forwarded, each on a new upstream connection.
    let closed: Vec<Value> = (0..3)
        .map(|_| {
            let (status, seen) = client.get("/close");
            assert_eq!(status, 200, "{seen}");
            seen["peer_port"].clone()
        })
        .collect();
    assert!(
        closed[0] != closed[1] && closed[1] != closed[2],
        "{closed:?}"
    );
    drop(client);

    // Client connections that come one after another reuse the idle upstream connection
    // the previous one gave back when it closed.
    let mut previous = None;
    eventually(
        "a new client connection to reuse an idle upstream connection",
        Duration::from_secs(5),
        || {
            let (status, seen) = KeepAlive::connect(proxy).get("/echo/fresh");
            assert_eq!(status, 200, "{seen}");
            let port = seen["peer_port"].clone();
            let reused = previous.as_ref() == Some(&port);
            previous = Some(port);
            std::thread::sleep(Duration::from_millis(50));
            reused.then_some(())
        },
    );
}

/// An upstream that answers the first request on each connection and closes the
/// connection, unanswered, when the second arrives: as an upstream whose keep-alive
/// timeout fires just as a request reaches a reused connection.
fn dropping_upstream() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate().take(64) {
            let Ok(stream) = stream else { return };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':') {
                        if name.eq_ignore_ascii_case("content-length") {
                            length = value.trim().parse().unwrap_or(0);
                        }
                    }
                }
                let mut body = vec![0; length];
                let _ = reader.read_exact(&mut body);
                let answer = format!("{{\"connection\":{n}}}");
                let _ = write!(
                    reader.get_mut(),
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
                    answer.len()
                );
                // Wait for the next request, then close without answering it.
                let _ = reader.fill_buf();
            });
        }
    });
    addr
}

#[test]
fn a_request_lost_on_a_reused_connection_is_sent_again_only_if_idempotent() {
    let (dir, vendor, cp, _upstream) = setup();
    cp.add(&vendor.valid("AGAIN"));
    let upstream = format!("http://{}", dropping_upstream());
    let (dp, proxy) = gate(&dir, "again", &cp, &vendor, &upstream, &[]);
    dp.wait_license("the license", |l| l["status"] == "valid");
    let mut client = KeepAlive::connect(proxy);
    let (status, first) = client.get("/one");
    assert_eq!(status, 200, "{first}");
    // Lost on the reused connection: a GET is sent again, on a new connection.
    let (status, second) = client.get("/two");
    assert_eq!(status, 200, "{second}");
    assert_ne!(first["connection"], second["connection"]);
    // A POST is not: the upstream might have acted on it.
    let (status, refused) = client.send("POST", "/three", b"{}");
    assert_eq!(status, 502, "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.contains("unavailable")),
        "{refused}"
    );
}

#[test]
fn grace_forwards_and_expired_denies() {
    let (dir, vendor, cp, upstream) = setup();
    let today = time_today();
    let in_grace = vendor.license("GRACE", "2020-01-01", &days_from(today, -10));
    let expired = vendor.license("EXPIRED", "2020-01-01", &days_from(today, -40));
    let grace_file = dir.path().join("grace.json");
    let expired_file = dir.path().join("expired.json");
    std::fs::write(&grace_file, in_grace).expect("write");
    std::fs::write(&expired_file, expired).expect("write");
    let (_grace_dp, grace_proxy) = gate(
        &dir,
        "grace",
        &cp,
        &vendor,
        &upstream.url(),
        &["--license-path", &grace_file.to_string_lossy()],
    );
    let (_expired_dp, expired_proxy) = gate(
        &dir,
        "expired",
        &cp,
        &vendor,
        &upstream.url(),
        &["--license-path", &expired_file.to_string_lossy()],
    );
    assert_eq!(
        through(grace_proxy, "GET", "/echo", None, &[]).status,
        200,
        "grace still allows"
    );
    let denied = through(expired_proxy, "GET", "/echo", None, &[]);
    assert_eq!(
        (denied.status, denied.json()["message"].clone()),
        (403, json!("Enterprise license missing or expired"))
    );
}

#[test]
fn upstream_down_or_slow_is_a_json_error_and_the_gate_stays_up() {
    let (dir, vendor, cp, upstream) = setup();
    cp.add(&vendor.valid("UP"));
    let dead = format!("http://127.0.0.1:{}", free_port());
    let (dp, proxy) = gate(&dir, "dead", &cp, &vendor, &dead, &[]);
    dp.wait_license("the license", |l| l["status"] == "valid");
    let resp = through(proxy, "GET", "/anything", None, &[]);
    assert_eq!(resp.status, 502, "{}", resp.body);
    assert!(resp.json()["message"]
        .as_str()
        .expect("message")
        .contains("unavailable"));
    assert_eq!(dp.get("/status").status, 200, "the DP stays up");

    let (slow_dp, slow_proxy) = gate(
        &dir,
        "slow",
        &cp,
        &vendor,
        &upstream.url(),
        &["--upstream-timeout", "1"],
    );
    slow_dp.wait_license("the license", |l| l["status"] == "valid");
    let resp = through(slow_proxy, "GET", "/slow", None, &[]);
    assert_eq!(resp.status, 504, "{}", resp.body);
    assert!(resp.json()["message"].is_string());
}

fn report_total(cp: &Cp) -> u64 {
    cp.get("/license/report").json()["counters"]
        .as_array()
        .expect("counters")
        .iter()
        .map(|c| c["request_count"].as_u64().expect("count"))
        .sum()
}

#[test]
fn every_forwarded_request_is_counted_exactly_once() {
    let (dir, vendor, mut cp, upstream) = setup();
    cp.add(&vendor.valid("COUNT"));
    let (mut dp, proxy) = gate(&dir, "counter", &cp, &vendor, &upstream.url(), &[]);
    dp.wait_license("the license", |l| l["status"] == "valid");
    let mut sent = 0u64;
    let mut send = |n: u64| {
        for _ in 0..n {
            assert_eq!(through(proxy, "GET", "/echo/count", None, &[]).status, 200);
        }
        sent += n;
        sent
    };
    send(40);
    eventually(
        "the first counts in the report",
        Duration::from_secs(10),
        || (report_total(&cp) == 40).then_some(()),
    );

    // The DP stops gracefully and comes back: nothing lost, nothing twice.
    send(25);
    let status = Command::new("kill")
        .args(["-TERM", &dp_pid(&dp)])
        .status()
        .expect("kill");
    assert!(status.success());
    std::thread::sleep(Duration::from_millis(500));
    dp.restart();
    dp.wait_license("the license", |l| l["status"] == "valid");

    // The CP is killed outright and comes back while the DP keeps counting.
    cp.kill();
    let total = send(30);
    cp.restart();
    eventually(
        "the counts after both restarts",
        Duration::from_secs(20),
        || (report_total(&cp) == total).then_some(()),
    );

    // A cut connection: counts made meanwhile still arrive once.
    cp.kill();
    let total = send(15);
    std::thread::sleep(Duration::from_millis(1500));
    cp.restart();
    eventually(
        "the counts after a cut connection",
        Duration::from_secs(20),
        || (report_total(&cp) == total).then_some(()),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(report_total(&cp), total, "no request counted twice");
    let by_dp = cp.get("/license/report?by=dataplane").json();
    assert_eq!(by_dp["dataplanes"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        by_dp["services_count"], 1,
        "the gated upstream is a service"
    );
    let _ = http("GET", &upstream.url(), None);
}

fn dp_pid(dp: &Dp) -> String {
    dp.pid().expect("running").to_string()
}

fn time_today() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
        / 86_400
}

/// The date `offset` days from day number `today` (days since 1970-01-01), as YYYY-MM-DD.
fn days_from(today: i64, offset: i64) -> String {
    let out = Command::new("date")
        .args([
            "-u",
            "-d",
            &format!("@{}", (today + offset) * 86_400),
            "+%Y-%m-%d",
        ])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
