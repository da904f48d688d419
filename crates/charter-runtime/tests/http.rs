//! The guarded accept loop (`charter_runtime::http`) over real loopback sockets: who is
//! closed at the connection cap and who never is, a request body that stops arriving,
//! and a loop whose shutdown sender is gone.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::routing::{get, post};
use axum::Router;
use charter_runtime::http::{serve_router, Limits, EVICT_AFTER};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::timeout;

/// A bound no correct run comes near, so a hang fails instead of blocking the suite.
const PATIENCE: Duration = Duration::from_secs(20);

const CAP: usize = 4;

/// `/fast` answers at once, `/hold` when the test adds a permit to the gate, `/echo`
/// reads the whole body first (408 when the body stalls).
fn router(gate: Arc<Semaphore>) -> Router {
    Router::new()
        .route("/fast", get(|| async { "ok" }))
        .route(
            "/hold",
            get(|State(gate): State<Arc<Semaphore>>| async move {
                gate.acquire().await.expect("gate").forget();
                "released"
            }),
        )
        .route(
            "/echo",
            post(|body: axum::body::Body| async move {
                match axum::body::to_bytes(body, 1 << 20).await {
                    Ok(bytes) => (axum::http::StatusCode::OK, format!("{} bytes", bytes.len())),
                    Err(e) => (axum::http::StatusCode::REQUEST_TIMEOUT, format!("{e}")),
                }
            }),
        )
        .with_state(gate)
}

struct Server {
    addr: std::net::SocketAddr,
    gate: Arc<Semaphore>,
    stop: Option<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

async fn start(idle: Duration) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let (stop, stopped) = watch::channel(false);
    let limits = Limits {
        idle,
        max_connections: CAP,
        max_headers: charter_runtime::http::MAX_REQUEST_HEADERS,
    };
    let task = tokio::spawn(serve_router(
        "test",
        listener,
        limits,
        router(gate.clone()),
        stopped,
    ));
    Server {
        addr,
        gate,
        stop: Some(stop),
        task,
    }
}

/// Sends a request on `stream` and reads one response (bodies here are small and sent
/// with a Content-Length); its status and body, or why there is none.
async fn exchange(stream: &mut TcpStream, request: &str) -> Result<(u16, String), String> {
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    read_response(stream).await
}

async fn read_response(stream: &mut TcpStream) -> Result<(u16, String), String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                let status = text[9..12]
                    .parse()
                    .map_err(|_| format!("status in {text}"))?;
                return Ok((status, text[end + 4..end + 4 + length].to_owned()));
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) => return Err(format!("closed after {} bytes", buf.len())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

const FAST: &str = "GET /fast HTTP/1.1\r\nHost: t\r\n\r\n";
const HOLD: &str = "GET /hold HTTP/1.1\r\nHost: t\r\n\r\n";

/// Whether the peer has closed `stream` (reads end or fail within `wait`).
async fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        timeout(wait, stream.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn connections_up_to_the_cap_are_never_closed_before_their_first_request() {
    let server = start(Duration::from_secs(30)).await;
    let mut streams = Vec::new();
    for _ in 0..CAP {
        streams.push(TcpStream::connect(server.addr).await.expect("connect"));
    }
    // Within EVICT_AFTER of their accept, a little later than the last accept: each of the
    // four is served, none was closed to make room for the others.
    tokio::time::sleep(EVICT_AFTER / 4).await;
    for (i, stream) in streams.iter_mut().enumerate() {
        let answer = timeout(PATIENCE, exchange(stream, FAST))
            .await
            .expect("in time");
        assert_eq!(answer, Ok((200, "ok".to_owned())), "connection {i}");
    }
}

#[tokio::test]
async fn at_the_cap_a_new_connection_takes_the_place_of_the_longest_idle_one() {
    let server = start(Duration::from_secs(30)).await;
    let mut streams = Vec::new();
    for _ in 0..CAP {
        let mut stream = TcpStream::connect(server.addr).await.expect("connect");
        assert_eq!(
            exchange(&mut stream, FAST).await,
            Ok((200, "ok".to_owned()))
        );
        streams.push(stream);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(EVICT_AFTER + Duration::from_millis(200)).await;
    // The newest of the four is used again, so it is not the one to go.
    assert_eq!(
        exchange(&mut streams[CAP - 1], FAST).await,
        Ok((200, "ok".to_owned()))
    );

    let mut newcomer = TcpStream::connect(server.addr).await.expect("connect");
    let answer = timeout(PATIENCE, exchange(&mut newcomer, FAST))
        .await
        .expect("in time");
    assert_eq!(answer, Ok((200, "ok".to_owned())));
    // The first connection was idle the longest: it is the one closed.
    assert!(
        closed_within(&mut streams[0], PATIENCE).await,
        "the longest-idle one is closed"
    );
    for (i, stream) in streams.iter_mut().enumerate().skip(1) {
        let answer = timeout(PATIENCE, exchange(stream, FAST))
            .await
            .expect("in time");
        assert_eq!(answer, Ok((200, "ok".to_owned())), "connection {i} stays");
    }
}

#[tokio::test]
async fn at_the_cap_busy_connections_stay_and_the_new_one_waits_its_turn() {
    let server = start(Duration::from_secs(30)).await;
    let mut streams = Vec::new();
    for _ in 0..CAP {
        let mut stream = TcpStream::connect(server.addr).await.expect("connect");
        stream.write_all(HOLD.as_bytes()).await.expect("write");
        streams.push(stream);
    }
    // Every slot has a request in flight, long past EVICT_AFTER.
    tokio::time::sleep(EVICT_AFTER * 2).await;
    let mut newcomer = TcpStream::connect(server.addr).await.expect("connect");
    newcomer.write_all(FAST.as_bytes()).await.expect("write");
    let waited = timeout(EVICT_AFTER * 2, read_response(&mut newcomer)).await;
    assert!(
        waited.is_err(),
        "no slot is free, so no answer yet: {waited:?}"
    );

    // One held request ends: its connection stays open (keep-alive), idle, so the
    // newcomer gets a slot once that one has been idle EVICT_AFTER.
    server.gate.add_permits(1);
    let mut released = None;
    for (i, stream) in streams.iter_mut().enumerate() {
        if let Ok(answer) = timeout(Duration::from_millis(500), read_response(stream)).await {
            assert_eq!(answer, Ok((200, "released".to_owned())));
            released = Some(i);
            break;
        }
    }
    let released = released.expect("one held request answered");
    let answer = timeout(PATIENCE, read_response(&mut newcomer))
        .await
        .expect("in time");
    assert_eq!(answer, Ok((200, "ok".to_owned())));
    assert!(closed_within(&mut streams[released], PATIENCE).await);
    // The three still busy were never touched.
    server.gate.add_permits(CAP);
    for (i, stream) in streams.iter_mut().enumerate() {
        if i != released {
            let answer = timeout(PATIENCE, read_response(stream))
                .await
                .expect("in time");
            assert_eq!(answer, Ok((200, "released".to_owned())), "connection {i}");
        }
    }
}

#[tokio::test]
async fn a_request_body_that_stops_arriving_fails_after_the_idle_time() {
    let idle = Duration::from_secs(1);
    let server = start(idle).await;
    // A complete body is read whatever its pace within the idle time.
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    stream
        .write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nab")
        .await
        .unwrap();
    tokio::time::sleep(idle / 2).await;
    stream.write_all(b"cd").await.unwrap();
    let answer = timeout(PATIENCE, read_response(&mut stream))
        .await
        .expect("in time");
    assert_eq!(answer, Ok((200, "4 bytes".to_owned())));

    // Two bytes of ten, then nothing: the handler gets an error, the client a 408.
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    stream
        .write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nab")
        .await
        .unwrap();
    let (status, body) = timeout(PATIENCE, read_response(&mut stream))
        .await
        .expect("in time")
        .expect("an answer");
    assert_eq!(status, 408, "{body}");
    assert!(
        body.contains("sent nothing of the request body for 1 s"),
        "{body}"
    );
}

#[tokio::test]
async fn the_loop_ends_when_its_shutdown_sender_is_gone() {
    let mut server = start(Duration::from_secs(30)).await;
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    assert_eq!(
        exchange(&mut stream, FAST).await,
        Ok((200, "ok".to_owned()))
    );
    drop(stream);
    drop(server.stop.take());
    timeout(PATIENCE, &mut server.task)
        .await
        .expect("the loop returns rather than spinning")
        .expect("no panic");
}

#[tokio::test]
async fn shutdown_lets_a_request_in_flight_finish() {
    let mut server = start(Duration::from_secs(30)).await;
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    stream.write_all(HOLD.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.stop.as_ref().unwrap().send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.gate.add_permits(1);
    let answer = timeout(PATIENCE, read_response(&mut stream))
        .await
        .expect("in time");
    assert_eq!(answer, Ok((200, "released".to_owned())));
    timeout(PATIENCE, &mut server.task)
        .await
        .expect("stops")
        .expect("no panic");
}
