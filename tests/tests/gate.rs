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
    eventually, free_port, http, http_with_headers, refused_port, Body as ReqBody, Cp, Dp, Resp,
    Vendor,
};
use serde_json::{json, Value};
use tempfile::TempDir;

/// An upstream on loopback: `/echo/...` answers what it received (and the port of the
/// connection it came on), `/close` answers it too but closes the connection after,
/// `/status/{code}` answers that status, `/large/{bytes}` a streamed body, `/slow` after 3 s,
/// `/redirect` a 302 to its own address, `/headers/{count}` that many header fields,
/// `/trailers` the request's trailers and trailers of its own.
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

/// A redirect to the upstream's own address, as an upstream that builds absolute links
/// from its `Host` header does.
async fn redirect(request: Request) -> Response {
    let host = request
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("none")
        .to_owned();
    Response::builder()
        .status(StatusCode::FOUND)
        .header("location", format!("http://{host}/echo/target?x=1"))
        .header("content-location", format!("http://{host}/redirect"))
        .body(Body::empty())
        .expect("response")
}

/// A response with `count` extra header fields.
async fn many_headers(Path(count): Path<usize>) -> Response {
    let mut response = Response::builder();
    for i in 0..count {
        response = response.header(format!("x-header-{i}"), "v");
    }
    response.body(Body::from("many")).expect("response")
}

/// Answers, in a chunked body, the request's trailers as JSON, and then trailers of its
/// own (`x-checksum`, declared in `Trailer`).
async fn trailers(request: Request) -> Response {
    use http_body_util::BodyExt;
    let collected = request.into_body().collect().await;
    let received: serde_json::Map<String, Value> = collected
        .ok()
        .and_then(|c| c.trailers().cloned())
        .unwrap_or_default()
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or(""))))
        .collect();
    let mut sent = axum::http::HeaderMap::new();
    sent.insert("x-checksum", axum::http::HeaderValue::from_static("c0ffee"));
    let frames = [
        Ok::<_, std::io::Error>(hyper::body::Frame::data(hyper::body::Bytes::from(
            Value::Object(received).to_string(),
        ))),
        Ok(hyper::body::Frame::trailers(sent)),
    ];
    let body = http_body_util::StreamBody::new(tokio_stream::iter(frames));
    Response::builder()
        .header("trailer", "x-checksum")
        .body(Body::new(body))
        .expect("response")
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
            .route("/redirect", any(redirect))
            .route("/headers/{count}", any(many_headers))
            .route("/trailers", any(trailers))
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
    let dead = format!("http://127.0.0.1:{}", refused_port());
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

/// One request on a new connection (`Connection: close` is added): the status, the
/// header fields (names in lower case) and the body.
fn exchange(proxy: SocketAddr, head: &str, body: &[u8]) -> (u16, Vec<(String, String)>, String) {
    let mut stream = TcpStream::connect(proxy).expect("connect to the gate");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let head = head.trim_end_matches("\r\n");
    write!(stream, "{head}\r\nconnection: close\r\n\r\n").expect("send head");
    stream.write_all(body).expect("send body");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).expect("read to the close");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete head in {answer:?}"));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {answer:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

fn field<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// The request heads a test upstream has seen, one list of header fields each.
type Heads = std::sync::Arc<std::sync::Mutex<Vec<Vec<(String, String)>>>>;

/// A WebSocket echo server (tokio-tungstenite) on loopback: it echoes every text and
/// binary message, and keeps the request head of each handshake for the test to see.
fn websocket_upstream(runtime: &tokio::runtime::Runtime) -> (SocketAddr, Heads) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::handshake::server::{
        ErrorResponse, Request as WsRequest, Response as WsResponse,
    };

    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let heads = seen.clone();
    runtime.spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let heads = heads.clone();
            tokio::spawn(async move {
                // tokio-tungstenite's callback type, with its large error, is not ours.
                #[allow(clippy::result_large_err)]
                let record = |request: &WsRequest,
                              response: WsResponse|
                 -> Result<WsResponse, ErrorResponse> {
                    let head = request
                        .headers()
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                        .collect();
                    heads.lock().expect("lock").push(head);
                    Ok(response)
                };
                let Ok(mut socket) = tokio_tungstenite::accept_hdr_async(stream, record).await
                else {
                    return;
                };
                while let Some(Ok(message)) = socket.next().await {
                    if (message.is_text() || message.is_binary())
                        && socket.send(message).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

#[test]
fn websockets_are_spliced_through_the_gate_and_counted_once() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let (dir, vendor, cp, _upstream) = setup();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (ws, heads) = websocket_upstream(&runtime);
    let (dp, proxy) = gate(&dir, "ws", &cp, &vendor, &format!("http://{ws}"), &[]);

    // Unlicensed: the handshake is refused with the 403, before the upstream sees it.
    let refused = runtime.block_on(tokio_tungstenite::connect_async(format!(
        "ws://{proxy}/socket"
    )));
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403)
        }
        other => panic!("expected a 403, got {other:?}"),
    }
    assert!(heads.lock().expect("lock").is_empty());

    cp.add(&vendor.valid("WS"));
    dp.wait_license("the license", |l| l["status"] == "valid");
    runtime.block_on(async {
        let (mut socket, response) =
            tokio_tungstenite::connect_async(format!("ws://{proxy}/socket?room=1"))
                .await
                .expect("the WebSocket handshake through the gate");
        assert_eq!(response.status(), 101);
        assert_eq!(response.headers()["via"], dp.via("1.1").as_str());
        for i in 0..20 {
            let text = format!("hello {i}");
            socket
                .send(Message::text(text.clone()))
                .await
                .expect("send");
            let echoed = socket.next().await.expect("an answer").expect("a message");
            assert_eq!(echoed, Message::text(text));
        }
        // A large binary message crosses both ways.
        let big = vec![7u8; 4 * 1024 * 1024];
        socket
            .send(Message::binary(big.clone()))
            .await
            .expect("send");
        let echoed = socket.next().await.expect("an answer").expect("a message");
        assert_eq!(echoed.into_data().len(), big.len());
        socket.close(None).await.expect("close");
    });
    let head = heads.lock().expect("lock")[0].clone();
    assert_eq!(field(&head, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(field(&head, "upgrade"), ["websocket"]);
    assert_eq!(field(&head, "via"), [dp.via("1.1")]);

    // The WebSocket session was one request.
    eventually(
        "the session's count in the report",
        Duration::from_secs(10),
        || (report_total(&cp) == 1).then_some(()),
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(report_total(&cp), 1, "a WebSocket session is one request");
}

#[test]
fn the_upstream_timeout_does_not_count_a_slow_upload() {
    let (dir, vendor, cp, upstream) = setup();
    cp.add(&vendor.valid("UPLOAD"));
    let (dp, proxy) = gate(
        &dir,
        "upload",
        &cp,
        &vendor,
        &upstream.url(),
        &["--upstream-timeout", "1"],
    );
    dp.wait_license("the license", |l| l["status"] == "valid");
    // Half the body, a pause twice the upstream timeout, the other half: the upstream is
    // healthy and answers as soon as it has it all.
    let mut stream = TcpStream::connect(proxy).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    stream
        .write_all(b"POST /echo/upload HTTP/1.1\r\nhost: gate.test\r\ncontent-length: 20\r\nconnection: close\r\n\r\n0123456789")
        .expect("send");
    std::thread::sleep(Duration::from_secs(2));
    stream.write_all(b"abcdefghij").expect("send the rest");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"body_len\":20"), "{answer}");
    // An upstream slow to answer a request sent in full still gets the 504.
    let resp = through(
        proxy,
        "POST",
        "/slow",
        Some(ReqBody::Raw("text/plain".into(), b"x".to_vec())),
        &[],
    );
    assert_eq!(resp.status, 504, "{}", resp.body);
}

/// An upstream that answers each request with its header lines as the body, then closes.
fn head_counting_upstream() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().take(16) {
            let Ok(stream) = stream else { return };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                let _ = write!(
                    reader.get_mut(),
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{head}",
                    head.len()
                );
            });
        }
    });
    addr
}

#[test]
fn header_limits_are_at_least_nginx_s() {
    let (dir, vendor, cp, upstream) = setup();
    cp.add(&vendor.valid("HEADERS"));
    let (dp, proxy) = gate(&dir, "headers", &cp, &vendor, &upstream.url(), &[]);
    dp.wait_license("the license", |l| l["status"] == "valid");

    // 150 request header fields reach the upstream (one that reads any number; axum's
    // stops at 100).
    let lines = head_counting_upstream();
    let (counting_dp, counting) = gate(
        &dir,
        "counting",
        &cp,
        &vendor,
        &format!("http://{lines}"),
        &[],
    );
    counting_dp.wait_license("the license", |l| l["status"] == "valid");
    let mut head = String::from("GET /many HTTP/1.1\r\nhost: gate.test\r\n");
    for i in 0..150 {
        head.push_str(&format!("x-field-{i}: {i}\r\n"));
    }
    let (status, _, body) = exchange(counting, &head, b"");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("x-field-149: 149"), "{body}");

    // 150 response header fields reach the client.
    let (status, headers, body) =
        exchange(proxy, "GET /headers/150 HTTP/1.1\r\nhost: gate.test", b"");
    assert_eq!((status, body.as_str()), (200, "many"));
    assert_eq!(field(&headers, "x-header-149"), ["v"]);

    // 256 fields each way, not one more: a request over it is a 431, a response a 502
    // that says so.
    let mut head = String::from("GET /many HTTP/1.1\r\nhost: gate.test\r\n");
    for i in 0..256 {
        head.push_str(&format!("x-field-{i}: {i}\r\n"));
    }
    assert_eq!(exchange(counting, &head, b"").0, 431, "257 request fields");
    let (status, _, body) = exchange(proxy, "GET /headers/250 HTTP/1.1\r\nhost: gate.test", b"");
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = exchange(proxy, "GET /headers/257 HTTP/1.1\r\nhost: gate.test", b"");
    assert_eq!(status, 502, "{body}");
    let message = serde_json::from_str::<Value>(&body).expect("json")["message"].clone();
    assert!(
        message
            .as_str()
            .is_some_and(|m| m.contains("response header is larger than the gate accepts")),
        "{message}"
    );
}

#[test]
fn redirects_to_the_upstream_point_at_the_gate_and_the_host_can_be_preserved() {
    let (dir, vendor, cp, upstream) = setup();
    cp.add(&vendor.valid("LOCATION"));
    let (dp, proxy) = gate(&dir, "location", &cp, &vendor, &upstream.url(), &[]);
    dp.wait_license("the license", |l| l["status"] == "valid");
    // The upstream builds its links from the Host it gets (its own address): they are
    // rewritten to the address the client used.
    let (status, headers, _) =
        exchange(proxy, "GET /redirect HTTP/1.1\r\nhost: gate.test:8443", b"");
    assert_eq!(status, 302);
    assert_eq!(
        field(&headers, "location"),
        ["http://gate.test:8443/echo/target?x=1"]
    );
    assert_eq!(
        field(&headers, "content-location"),
        ["http://gate.test:8443/redirect"]
    );
    // The scheme is the one the upstream is told: an untrusted client's claim of https
    // is not believed...
    let (_, headers, _) = exchange(
        proxy,
        "GET /redirect HTTP/1.1\r\nhost: gate.test:8443\r\nx-forwarded-proto: https",
        b"",
    );
    assert_eq!(
        field(&headers, "location"),
        ["http://gate.test:8443/echo/target?x=1"]
    );
    let (_, headers, body) = exchange(
        proxy,
        "GET /echo/host HTTP/1.1\r\nhost: gate.test:8443",
        b"",
    );
    let seen: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(seen["headers"]["host"], json!(upstream.addr.to_string()));
    assert_eq!(seen["headers"]["x-forwarded-host"], "gate.test:8443");
    assert_eq!(field(&headers, "via"), [dp.via("1.1")]);
    assert_eq!(seen["headers"]["via"], dp.via("1.1"));

    // --preserve-host: the upstream gets the client's Host, and builds links with it.
    let (preserving_dp, preserving) = gate(
        &dir,
        "preserving",
        &cp,
        &vendor,
        &upstream.url(),
        &["--preserve-host"],
    );
    preserving_dp.wait_license("the license", |l| l["status"] == "valid");
    let (_, _, body) = exchange(
        preserving,
        "GET /echo/host HTTP/1.1\r\nhost: gate.test:8443",
        b"",
    );
    let seen: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(seen["headers"]["host"], "gate.test:8443");
    let (status, headers, _) = exchange(
        preserving,
        "GET /redirect HTTP/1.1\r\nhost: gate.test:8443",
        b"",
    );
    assert_eq!(status, 302);
    assert_eq!(
        field(&headers, "location"),
        ["http://gate.test:8443/echo/target?x=1"]
    );

    // ...a trusted proxy's is (it ended the client's TLS), in any case.
    let (trusting_dp, trusting) = gate(
        &dir,
        "trusting",
        &cp,
        &vendor,
        &upstream.url(),
        &["--trusted-proxy", "127.0.0.0/8"],
    );
    trusting_dp.wait_license("the license", |l| l["status"] == "valid");
    for (claimed, scheme) in [("HTTPS", "https"), ("http", "http")] {
        let (_, headers, _) = exchange(
            trusting,
            &format!(
                "GET /redirect HTTP/1.1\r\nhost: gate.test:8443\r\nx-forwarded-proto: {claimed}"
            ),
            b"",
        );
        assert_eq!(
            field(&headers, "location"),
            [format!("{scheme}://gate.test:8443/echo/target?x=1")]
        );
    }
}

#[test]
fn on_one_cpu_the_gate_runs_single_threaded_and_serves_http1_and_http2_clients() {
    let (dir, vendor, cp, upstream) = setup();
    cp.add(&vendor.valid("ONE-CPU"));
    let (mut dp, proxy) = gate(&dir, "one-cpu", &cp, &vendor, &upstream.url(), &[]);
    dp.restart_on_one_cpu();
    dp.wait_license("the license", |l| l["status"] == "valid");
    assert!(
        dp.logs().contains("a single-threaded async runtime"),
        "{}",
        dp.logs()
    );
    // Clients at once, each with requests one after another on its connection.
    let clients: Vec<_> = (0..8)
        .map(|c| {
            std::thread::spawn(move || {
                (0..10)
                    .map(|i| through(proxy, "GET", &format!("/echo/{c}/{i}"), None, &[]).status)
                    .collect::<Vec<u16>>()
            })
        })
        .collect();
    for client in clients {
        assert_eq!(client.join().expect("a client"), vec![200; 10]);
    }
    // An HTTP/2 client's requests on one connection, a POST with a body among them.
    let answers = over_one_http2_connection(proxy, &[("GET", "/echo/a"), ("POST", "/echo/b")]);
    assert_eq!(answers.iter().map(|a| a.0).collect::<Vec<_>>(), [200, 200]);
    assert!(answers[1].1.contains(r#""body_len":2"#), "{answers:?}");
    // Still counted and reported, from the one thread.
    eventually(
        "the requests in the report",
        Duration::from_secs(10),
        || (report_total(&cp) == 82).then_some(()),
    );
}

#[test]
fn http1_trailers_pass_both_ways_when_the_client_accepts_them() {
    let (dir, vendor, cp, upstream) = setup();
    cp.add(&vendor.valid("TRAILERS"));
    let (dp, proxy) = gate(&dir, "trailers", &cp, &vendor, &upstream.url(), &[]);
    dp.wait_license("the license", |l| l["status"] == "valid");
    // A chunked upload declaring and ending with a trailer; the client accepts trailers.
    let head = "POST /trailers HTTP/1.1\r\nhost: gate.test\r\nte: trailers\r\n\
                transfer-encoding: chunked\r\ntrailer: x-upload-digest";
    let body = b"5\r\nhello\r\n0\r\nx-upload-digest: d1\r\n\r\n";
    let (status, headers, body) = exchange(proxy, head, body);
    assert_eq!(status, 200, "{body}");
    assert_eq!(field(&headers, "transfer-encoding"), ["chunked"]);
    // The upstream got the request's trailer...
    assert!(body.contains(r#"{"x-upload-digest":"d1"}"#), "{body:?}");
    // ...and its own came back after the last chunk.
    let (_, after_last) = body.split_once("\r\n0\r\n").expect("the last chunk");
    assert_eq!(after_last, "x-checksum: c0ffee\r\n\r\n", "{body:?}");
}

#[test]
fn forwarded_for_is_trusted_only_from_trusted_proxies_and_errors_stay_terse() {
    let (dir, vendor, cp, upstream) = setup();
    cp.add(&vendor.valid("XFF"));
    let (dp, proxy) = gate(&dir, "xff", &cp, &vendor, &upstream.url(), &[]);
    let (trusting_dp, trusting) = gate(
        &dir,
        "trusting",
        &cp,
        &vendor,
        &upstream.url(),
        &[
            "--trusted-proxy",
            "10.0.0.0/8",
            "--trusted-proxy",
            "127.0.0.0/8",
        ],
    );
    dp.wait_license("the license", |l| l["status"] == "valid");
    trusting_dp.wait_license("the license", |l| l["status"] == "valid");
    let claimed = [
        ("x-forwarded-for", "203.0.113.9"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "shop.example"),
        ("x-forwarded-port", "443"),
        ("x-real-ip", "203.0.113.9"),
        ("forwarded", "for=203.0.113.9;proto=https"),
    ];
    // From an untrusted peer the client's own X-Forwarded-* are replaced or dropped...
    let seen = through(proxy, "GET", "/echo/xff", None, &claimed).json();
    assert_eq!(seen["headers"]["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "http");
    assert_ne!(seen["headers"]["x-forwarded-host"], "shop.example");
    for dropped in ["x-forwarded-port", "x-real-ip", "forwarded"] {
        assert!(seen["headers"][dropped].is_null(), "{dropped}: {seen}");
    }
    // (also when the request has no Host for the gate to put in its place)
    let (_, _, body) = exchange(
        proxy,
        "GET /echo/xff HTTP/1.0\r\nx-forwarded-host: shop.example",
        b"",
    );
    let seen: Value = serde_json::from_str(&body).expect("json");
    assert!(seen["headers"]["x-forwarded-host"].is_null(), "{seen}");
    // ...from a trusted one X-Forwarded-For is appended to, and the rest kept.
    let seen = through(trusting, "GET", "/echo/xff", None, &claimed).json();
    assert_eq!(seen["headers"]["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "https");
    assert_eq!(seen["headers"]["x-forwarded-host"], "shop.example");
    assert_eq!(seen["headers"]["x-forwarded-port"], "443");
    assert_eq!(seen["headers"]["forwarded"], "for=203.0.113.9;proto=https");
    // A trusted proxy that says nothing of them gets the gate's own.
    let seen = through(trusting, "GET", "/echo/xff", None, &[]).json();
    assert_eq!(seen["headers"]["x-forwarded-proto"], "http");
    assert!(seen["headers"]["x-forwarded-host"].is_string(), "{seen}");
    // Fields its own `Connection` names are for its hop only: the gate's stand instead.
    let hop_only = [
        ("connection", "X-Forwarded-Proto, x-forwarded-host"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "shop.example"),
    ];
    let seen = through(trusting, "GET", "/echo/xff", None, &hop_only).json();
    assert_eq!(seen["headers"]["x-forwarded-proto"], "http", "{seen}");
    let host = &seen["headers"]["x-forwarded-host"];
    assert!(host.is_string() && host != "shop.example", "{seen}");

    // An unreachable upstream: a short message, its address only in the log.
    let dead = format!("http://127.0.0.1:{}", refused_port());
    let (dead_dp, dead_proxy) = gate(&dir, "dead", &cp, &vendor, &dead, &[]);
    dead_dp.wait_license("the license", |l| l["status"] == "valid");
    let resp = through(dead_proxy, "GET", "/anything", None, &[]);
    assert_eq!(resp.status, 502);
    assert_eq!(
        resp.json(),
        json!({"message": "the upstream service is unavailable"})
    );
    eventually("the details in the log", Duration::from_secs(5), || {
        let logs = dead_dp.logs();
        (logs.contains("upstream request failed") && logs.contains(&dead)).then_some(())
    });
}

#[test]
fn a_request_that_comes_back_to_its_gate_is_a_508_and_a_chain_of_gates_is_no_loop() {
    let (dir, vendor, cp, _upstream) = setup();
    cp.add(&vendor.valid("LOOP"));
    // A gate whose upstream is its own proxy port: the first hop comes back to it.
    let port = free_port();
    let own = format!("127.0.0.1:{port}");
    let looping = Dp::start(
        dir.path(),
        "looping",
        &cp,
        &vendor.public_key,
        &[
            "--proxy-listen",
            &own,
            "--upstream",
            &format!("http://{own}"),
        ],
    );
    looping.wait_license("the license", |l| l["status"] == "valid");
    let (status, headers, body) = exchange(
        SocketAddr::from(([127, 0, 0, 1], port)),
        "GET /echo/loop HTTP/1.1\r\nhost: gate.test",
        b"",
    );
    assert_eq!(status, 508, "{headers:?} {body}");
    let message: Value = serde_json::from_str(&body).expect("a JSON body");
    assert_eq!(
        message,
        json!({"message": "the request came back to this gate: its upstream leads to the gate again (a forwarding loop)"})
    );
    // One hop: the gate's second pass answered 508, and its first forwarded that answer.
    assert_eq!(field(&headers, "via"), [looping.via("1.1")]);
    eventually("the loop in the log", Duration::from_secs(5), || {
        looping
            .logs()
            .contains("a request came back to the gate that forwarded it")
            .then_some(())
    });

    // An HTTP/2 client's request comes back the same way.
    let answers = over_one_http2_connection(
        SocketAddr::from(([127, 0, 0, 1], port)),
        &[("GET", "/echo/loop")],
    );
    assert_eq!(answers[0].0, 508, "{}", answers[0].1);

    // Two gates in a row name themselves apart: no loop. The last one's upstream answers
    // with the request head it was sent.
    let heads = head_counting_upstream();
    let (last_dp, last) = gate(&dir, "last", &cp, &vendor, &format!("http://{heads}"), &[]);
    let (first_dp, first) = gate(&dir, "first", &cp, &vendor, &format!("http://{last}"), &[]);
    last_dp.wait_license("the license", |l| l["status"] == "valid");
    first_dp.wait_license("the license", |l| l["status"] == "valid");
    let (first_via, last_via) = (first_dp.via("1.1"), last_dp.via("1.1"));
    assert_ne!(first_via, last_via);
    let (status, headers, body) =
        exchange(first, "GET /echo/chain HTTP/1.1\r\nhost: gate.test", b"");
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("GET /echo/chain HTTP/1.1\r\n"), "{body}");
    // The upstream was sent both gates' entries, the first gate's first.
    let sent: Vec<&str> = body
        .lines()
        .filter_map(|line| line.split_once(':'))
        .filter(|(name, _)| name.eq_ignore_ascii_case("via"))
        .map(|(_, value)| value.trim())
        .collect();
    assert_eq!(sent, [first_via.as_str(), last_via.as_str()], "{body}");
    // The answer names both, nearest the upstream first.
    assert_eq!(
        field(&headers, "via"),
        [last_via.as_str(), first_via.as_str()]
    );
    // The first gate's own entry, sent to it by a client, is a loop for it only.
    let back = format!(
        "GET /echo/chain HTTP/1.1\r\nhost: gate.test\r\nvia: 1.0 other, {}",
        first_via.to_uppercase()
    );
    assert_eq!(exchange(first, &back, b"").0, 508);
    assert_eq!(exchange(last, &back, b"").0, 200);
}

/// Sends `requests` (method, path) one after another on one HTTP/2 (prior knowledge)
/// connection to `proxy`: each one's status and body. A POST carries `{}`.
fn over_one_http2_connection(proxy: SocketAddr, requests: &[(&str, &str)]) -> Vec<(u16, String)> {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let stream = tokio::net::TcpStream::connect(proxy)
            .await
            .expect("connect");
        let (mut sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .expect("HTTP/2 handshake");
        tokio::spawn(connection);
        let mut answers = Vec::new();
        for (method, path) in requests {
            let body = if *method == "POST" {
                Bytes::from_static(b"{}")
            } else {
                Bytes::new()
            };
            let request = hyper::Request::builder()
                .method(*method)
                .uri(format!("http://{proxy}{path}"))
                .body(Full::new(body))
                .expect("request");
            let response = sender.send_request(request).await.expect("an answer");
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            answers.push((status, String::from_utf8_lossy(&body).into_owned()));
        }
        answers
    })
}

#[test]
fn a_lost_request_on_a_pooled_connection_is_sent_again_only_if_idempotent() {
    let (dir, vendor, cp, _upstream) = setup();
    cp.add(&vendor.valid("POOLED"));
    let upstream = format!("http://{}", dropping_upstream());
    let (dp, proxy) = gate(&dir, "pooled", &cp, &vendor, &upstream, &[]);
    dp.wait_license("the license", |l| l["status"] == "valid");
    // HTTP/2 clients go through the pool: the second request goes on the pooled
    // connection, which the upstream drops unanswered; the GET is sent again, on a new
    // connection (of its own, closed after). A POST that meets the same (on the pooled
    // connection the third GET opened) is not: the upstream might have acted on it. The
    // upstream's first connection is the gate's probe of whether it speaks HTTP/2 (it
    // does not), so the requests' connections count from 1.
    let answers = over_one_http2_connection(
        proxy,
        &[
            ("GET", "/one"),
            ("GET", "/two"),
            ("GET", "/three"),
            ("POST", "/four"),
        ],
    );
    let answer = |n: u32| (200, format!("{{\"connection\":{n}}}"));
    assert_eq!(
        answers[..3],
        [answer(1), answer(2), answer(3)],
        "{answers:?}"
    );
    assert_eq!(answers[3].0, 502, "{answers:?}");
}

#[test]
fn an_http2_upload_the_upstream_refuses_unread_never_hangs() {
    let (dir, vendor, cp, _upstream) = setup();
    cp.add(&vendor.valid("REFUSE"));
    // An upstream that answers 403 as soon as it has a request head, and then reads
    // nothing more on that connection (nor closes it). Note: this guards the behaviour
    // but does not reproduce the hang reported with nginx's `return` (issue 17, item 5):
    // the gate before the change passes it too (hyper's client stops sending a body once
    // a complete response has arrived), as it does with an upstream that answers first
    // and then reads and discards the body.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().take(8) {
            let Ok(stream) = stream else { return };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                }
                let _ = reader
                    .get_mut()
                    .write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 7\r\n\r\ndenied!");
                std::thread::sleep(Duration::from_secs(120));
            });
        }
    });
    let (dp, proxy) = gate(&dir, "refuse", &cp, &vendor, &format!("http://{addr}"), &[]);
    dp.wait_license("the license", |l| l["status"] == "valid");
    // More than every buffer on the way holds (the client's stream window, the sockets').
    let upload = dir.path().join("upload.bin");
    std::fs::write(&upload, vec![b'u'; 64 * 1024 * 1024]).expect("write");
    let started = Instant::now();
    let out = Command::new("curl")
        .args([
            "-s",
            "--http2-prior-knowledge",
            "-m",
            "60",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg("--data-binary")
        .arg(format!("@{}", upload.display()))
        .arg(format!("http://{proxy}/upload"))
        .output()
        .expect("curl");
    // The gate sends the 403, then resets the stream with NO_ERROR (RFC 9113 §8.1: the
    // client must not discard the response for it). curl 7.88 shows the 403 or, when the
    // reset overtakes the response in its loop, reports the reset (exit 92). Either way
    // the upload has ended; before, it hung at the stream window.
    assert_ne!(
        out.status.code(),
        Some(28),
        "curl timed out: the upload hung"
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown == "403" || out.status.code() == Some(92), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(60));
}
