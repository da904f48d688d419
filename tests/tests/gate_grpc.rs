//! End-to-end tests of the gate with HTTP/2 upstreams: a real tonic gRPC service behind a
//! real `charter-dp` gate (unary, server-streaming and client-streaming calls, the status
//! in trailers, a refusal without a license), and which HTTP version reaches an upstream
//! for each kind of client and `--upstream` scheme.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;

use axum::extract::Request;
use axum::routing::any;
use axum::Router;
use charter_tests::{free_port, http_with_headers, refused_port, Cp, Dp, Vendor};
use futures_util::{Stream, StreamExt};
use tempfile::TempDir;
use tonic::{Code, Status, Streaming};

mod echo {
    tonic::include_proto!("charter.test.echo.v1");
}

use echo::echo_client::EchoClient;
use echo::echo_server::{Echo, EchoServer};
use echo::{Heard, Number, Upto, Words};

/// The service: answers with what it saw, counts, sums.
struct Service;

fn metadata(request: &tonic::metadata::MetadataMap, name: &str) -> String {
    request
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

#[tonic::async_trait]
impl Echo for Service {
    async fn say(&self, request: tonic::Request<Words>) -> Result<tonic::Response<Heard>, Status> {
        let headers = request.metadata();
        let heard = Heard {
            via: metadata(headers, "via"),
            forwarded_for: metadata(headers, "x-forwarded-for"),
            te: metadata(headers, "te"),
            text: request.into_inner().text,
        };
        let mut response = tonic::Response::new(heard);
        response
            .metadata_mut()
            .insert("x-served-by", "echo".parse().expect("ascii"));
        Ok(response)
    }

    type CountStream = Pin<Box<dyn Stream<Item = Result<Number, Status>> + Send>>;

    async fn count(
        &self,
        request: tonic::Request<Upto>,
    ) -> Result<tonic::Response<Self::CountStream>, Status> {
        let Upto { n, fail_with } = request.into_inner();
        let numbers =
            futures_util::stream::iter(1..=u64::from(n)).map(|value| Ok(Number { value }));
        let end = (!fail_with.is_empty()).then(|| Err(Status::failed_precondition(fail_with)));
        let stream = numbers.chain(futures_util::stream::iter(end));
        Ok(tonic::Response::new(Box::pin(stream)))
    }

    async fn sum(
        &self,
        request: tonic::Request<Streaming<Number>>,
    ) -> Result<tonic::Response<Number>, Status> {
        let mut numbers = request.into_inner();
        let mut value = 0;
        while let Some(number) = numbers.next().await {
            value += number?.value;
        }
        Ok(tonic::Response::new(Number { value }))
    }
}

/// A listener on a free loopback port, on `runtime`.
fn listen(runtime: &tokio::runtime::Runtime) -> (tokio::net::TcpListener, SocketAddr) {
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    (listener, addr)
}

/// Serves every connection `listener` accepts with `serve`, each in a task of its own.
fn each_connection<F: std::future::Future<Output = ()> + Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    listener: tokio::net::TcpListener,
    serve: impl Fn(tokio::net::TcpStream) -> F + Send + 'static,
) {
    runtime.spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream));
        }
    });
}

/// The gRPC service on a loopback port, HTTP/2 only (tonic's default), on its own runtime.
fn grpc_upstream(runtime: &tokio::runtime::Runtime) -> SocketAddr {
    let (listener, addr) = listen(runtime);
    runtime.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(Service))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    addr
}

/// A control plane with a valid license, and a data plane gating `upstream`.
fn gate(dir: &TempDir, name: &str, cp: &Cp, vendor: &Vendor, upstream: &str) -> (Dp, SocketAddr) {
    let proxy = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy_arg = proxy.to_string();
    let args = ["--proxy-listen", &proxy_arg, "--upstream", upstream];
    let dp = Dp::start(dir.path(), name, cp, &vendor.public_key, &args);
    (dp, proxy)
}

fn setup() -> (TempDir, Vendor, Cp) {
    let dir = TempDir::new().expect("temp dir");
    let vendor = Vendor::new(dir.path(), 61);
    let key = vendor.public_key.to_string_lossy().into_owned();
    let cp = Cp::start(dir.path(), &["--trusted-key", &key]);
    (dir, vendor, cp)
}

async fn client(proxy: SocketAddr) -> EchoClient<tonic::transport::Channel> {
    EchoClient::connect(format!("http://{proxy}"))
        .await
        .expect("connect to the gate")
}

/// Every kind of call, through a gate in front of the gRPC service; `via` is the gate's
/// `Via` entry for HTTP/2.
async fn calls_pass(proxy: SocketAddr, via: &str) {
    let mut echo = client(proxy).await;

    let response = echo
        .say(Words {
            text: "hello".into(),
        })
        .await
        .expect("a unary call through the gate");
    assert_eq!(
        response
            .metadata()
            .get("x-served-by")
            .map(|v| v.to_str().ok()),
        Some(Some("echo")),
        "the service's response headers reach the client"
    );
    assert_eq!(
        response.metadata().get("via").and_then(|v| v.to_str().ok()),
        Some(via),
        "the gate adds Via to the response"
    );
    let heard = response.into_inner();
    assert_eq!(heard.text, "hello");
    assert_eq!(heard.via, via, "the gate adds Via to the request");
    assert_eq!(heard.forwarded_for, "127.0.0.1");
    assert_eq!(
        heard.te, "trailers",
        "gRPC's TE: trailers reaches the service"
    );

    // A stream that ends well: every message, then OK in the trailers.
    let mut stream = echo
        .count(Upto {
            n: 3,
            fail_with: String::new(),
        })
        .await
        .expect("a server-streaming call")
        .into_inner();
    let mut got = Vec::new();
    while let Some(number) = stream.message().await.expect("no error") {
        got.push(number.value);
    }
    assert_eq!(got, [1, 2, 3]);

    // A stream that ends in an error after its messages: the status is in the trailers.
    let mut stream = echo
        .count(Upto {
            n: 200,
            fail_with: "enough".into(),
        })
        .await
        .expect("a server-streaming call")
        .into_inner();
    let mut got = 0;
    let status = loop {
        match stream.message().await {
            Ok(Some(number)) => {
                got += 1;
                assert_eq!(number.value, got);
            }
            Ok(None) => panic!("the stream ended without the service's error status"),
            Err(status) => break status,
        }
    };
    assert_eq!(got, 200, "every message before the status");
    assert_eq!(
        (status.code(), status.message()),
        (Code::FailedPrecondition, "enough")
    );

    // A client stream, large enough to need flow control on the way.
    let numbers = futures_util::stream::iter((1..=20_000u64).map(|value| Number { value }));
    let sum = echo
        .sum(numbers)
        .await
        .expect("a client-streaming call")
        .into_inner();
    assert_eq!(sum.value, 20_000 * 20_001 / 2);
}

#[test]
fn a_grpc_service_works_behind_the_gate_over_h2c_or_http() {
    let (dir, vendor, cp) = setup();
    cp.add(&vendor.valid("GRPC"));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let service = grpc_upstream(&runtime);
    // `h2c://` says HTTP/2; with `http://` the gate finds out that the service speaks it.
    for (name, upstream) in [
        ("h2c", format!("h2c://{service}")),
        ("http", format!("http://{service}")),
    ] {
        let (dp, proxy) = gate(&dir, name, &cp, &vendor, &upstream);
        dp.wait_license("the license", |l| l["status"] == "valid");
        runtime.block_on(calls_pass(proxy, &dp.via("2")));
        if name == "http" {
            assert!(
                dp.logs().contains("http2=true"),
                "the probe's finding is logged: {}",
                dp.logs()
            );
        }
    }
}

#[test]
fn the_gate_s_own_answers_to_grpc_calls_are_grpc_statuses() {
    let (dir, vendor, cp) = setup();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let service = grpc_upstream(&runtime);
    let say = |proxy| {
        runtime
            .block_on(async { client(proxy).await.say(Words { text: "hi".into() }).await })
            .expect_err("refused")
    };
    // No license: PERMISSION_DENIED with Kong's message (before, tonic failed to decode
    // the JSON body of a 403 and reported INTERNAL).
    let (dp, proxy) = gate(
        &dir,
        "unlicensed",
        &cp,
        &vendor,
        &format!("h2c://{service}"),
    );
    dp.wait_license("no license", |l| l["status"] == "unlicensed");
    let status = say(proxy);
    assert_eq!(
        (status.code(), status.message()),
        (
            Code::PermissionDenied,
            "Enterprise license missing or expired"
        ),
        "{status:?}"
    );
    // Licensed, with the upstream down: UNAVAILABLE.
    cp.add(&vendor.valid("GRPC-DOWN"));
    let closed = SocketAddr::from(([127, 0, 0, 1], refused_port()));
    let (dp, proxy) = gate(&dir, "down", &cp, &vendor, &format!("h2c://{closed}"));
    dp.wait_license("the license", |l| l["status"] == "valid");
    let status = say(proxy);
    assert_eq!(
        (status.code(), status.message()),
        (Code::Unavailable, "the upstream service is unavailable"),
        "{status:?}"
    );
}

/// An upstream that answers with the HTTP version it received and the authority (or
/// `Host`) it was asked for, over HTTP/1.1 and HTTP/2 (axum serves both).
fn version_upstream(runtime: &tokio::runtime::Runtime) -> SocketAddr {
    async fn answer(request: Request) -> String {
        let host = request
            .uri()
            .authority()
            .map(|a| a.to_string())
            .or_else(|| {
                request
                    .headers()
                    .get("host")
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        format!("{:?} {host}", request.version())
    }
    let (listener, addr) = listen(runtime);
    runtime.spawn(async move { axum::serve(listener, Router::new().fallback(any(answer))).await });
    addr
}

/// The same, HTTP/1.x only (as gunicorn or a plain nginx server would be).
fn http1_only_upstream(runtime: &tokio::runtime::Runtime) -> SocketAddr {
    let (listener, addr) = listen(runtime);
    each_connection(runtime, listener, |stream| async move {
        let service = hyper::service::service_fn(|request: hyper::Request<_>| async move {
            let body = format!("{:?}", request.version());
            Ok::<_, Infallible>(hyper::Response::new(http_body_util::Full::new(
                hyper::body::Bytes::from(body),
            )))
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
            .await;
    });
    addr
}

/// `GET /` over one HTTP/2 (prior knowledge) connection: the status and the body.
fn http2_get(proxy: SocketAddr) -> (u16, String) {
    use http_body_util::{BodyExt, Empty};
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
        let request = hyper::Request::builder()
            .uri(format!("http://{proxy}/"))
            .body(Empty::<hyper::body::Bytes>::new())
            .expect("request");
        let response = sender.send_request(request).await.expect("an answer");
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    })
}

fn http1_get(proxy: SocketAddr, headers: &[(&str, &str)]) -> String {
    let response = http_with_headers("GET", &format!("http://{proxy}/"), None, headers)
        .expect("the gate answers");
    assert_eq!(response.status, 200, "{}", response.body);
    response.body
}

#[test]
fn each_client_reaches_the_upstream_in_the_http_version_the_upstream_speaks() {
    let (dir, vendor, cp) = setup();
    cp.add(&vendor.valid("VERSIONS"));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let both = version_upstream(&runtime);
    let http1 = http1_only_upstream(&runtime);

    // `http://` in front of an upstream that speaks both: HTTP/1.1 clients stay HTTP/1.1,
    // HTTP/2 clients get HTTP/2.
    let (dp, proxy) = gate(&dir, "both", &cp, &vendor, &format!("http://{both}"));
    dp.wait_license("the license", |l| l["status"] == "valid");
    assert_eq!(http1_get(proxy, &[]), format!("HTTP/1.1 {both}"));
    assert_eq!(http2_get(proxy), (200, format!("HTTP/2.0 {both}")));

    // `h2c://`: every client's requests go over HTTP/2; `--preserve-host` sends the
    // client's host as the authority.
    let (dp, proxy) = gate(&dir, "h2c", &cp, &vendor, &format!("h2c://{both}"));
    dp.wait_license("the license", |l| l["status"] == "valid");
    assert_eq!(http1_get(proxy, &[]), format!("HTTP/2.0 {both}"));
    assert_eq!(http2_get(proxy), (200, format!("HTTP/2.0 {both}")));
    let proxy_arg = SocketAddr::from(([127, 0, 0, 1], free_port())).to_string();
    let preserving = Dp::start(
        dir.path(),
        "preserve",
        &cp,
        &vendor.public_key,
        &[
            "--proxy-listen",
            &proxy_arg,
            "--upstream",
            &format!("h2c://{both}"),
            "--preserve-host",
        ],
    );
    preserving.wait_license("the license", |l| l["status"] == "valid");
    let proxy: SocketAddr = proxy_arg.parse().expect("addr");
    assert_eq!(
        http1_get(proxy, &[("Host", "app.example:8443")]),
        "HTTP/2.0 app.example:8443"
    );

    // `http://` in front of an HTTP/1.x-only upstream: HTTP/2 clients are translated,
    // and the probe's finding is logged.
    let (dp, proxy) = gate(&dir, "http1", &cp, &vendor, &format!("http://{http1}"));
    dp.wait_license("the license", |l| l["status"] == "valid");
    assert_eq!(http2_get(proxy), (200, "HTTP/1.1".to_owned()));
    assert_eq!(http1_get(proxy, &[]), "HTTP/1.1");
    assert!(dp.logs().contains("http2=false"), "{}", dp.logs());
}

/// An HTTP/2-only upstream that takes one stream at a time (`SETTINGS_MAX_CONCURRENT_STREAMS`
/// 1) and answers nothing: its one stream stays taken.
fn one_stream_upstream(runtime: &tokio::runtime::Runtime) -> SocketAddr {
    let (listener, addr) = listen(runtime);
    each_connection(runtime, listener, |stream| async move {
        let service = hyper::service::service_fn(|_: hyper::Request<_>| async {
            tokio::time::sleep(std::time::Duration::from_secs(120)).await;
            Ok::<_, Infallible>(hyper::Response::new(http_body_util::Empty::<
                hyper::body::Bytes,
            >::new()))
        });
        let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .max_concurrent_streams(1)
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
            .await;
    });
    addr
}

#[test]
fn a_request_waiting_for_a_free_http2_stream_gets_504_in_the_upstream_timeout() {
    use std::io::Write as _;
    let (dir, vendor, cp) = setup();
    cp.add(&vendor.valid("STREAMS"));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let upstream = one_stream_upstream(&runtime);
    let proxy = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy_arg = proxy.to_string();
    let dp = Dp::start(
        dir.path(),
        "streams",
        &cp,
        &vendor.public_key,
        &[
            "--proxy-listen",
            &proxy_arg,
            "--upstream",
            &format!("h2c://{upstream}"),
            "--upstream-timeout",
            "2",
        ],
    );
    dp.wait_license("the license", |l| l["status"] == "valid");
    // A slow upload takes the upstream's only stream and keeps it: the client is still
    // sending, so no timeout runs for it.
    let mut slow = std::net::TcpStream::connect(proxy).expect("connect");
    write!(
        slow,
        "POST /slow HTTP/1.1\r\nhost: gate.test\r\ncontent-length: 100\r\n\r\n0123456789"
    )
    .expect("write");
    std::thread::sleep(std::time::Duration::from_millis(500));
    // A whole request with a body now waits for a stream: 504 within the upstream timeout
    // (before, it waited as long as the slow upload held the stream).
    let started = std::time::Instant::now();
    let answer = http_with_headers(
        "POST",
        &format!("http://{proxy}/queued"),
        Some(charter_tests::Body::Json(
            serde_json::json!({"waiting": true}),
        )),
        &[],
    )
    .expect("the gate answers");
    assert_eq!(answer.status, 504, "{}", answer.body);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    drop(slow);
}
