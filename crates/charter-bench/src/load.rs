//! The HTTP side of the bench: a keep-alive hyper connection for single requests, and the
//! closed-loop load generator that measures req/s over N such connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::procs;

/// Longest any one request may take before the bench gives up on it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Most requests one connection sends in one measurement, so the loop is bounded in count
/// as well as in time (far above what one loopback connection can do in a minute).
const MAX_REQUESTS_PER_CONNECTION: usize = 50_000_000;

/// One HTTP/1.1 keep-alive connection to a loopback server.
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
    host: HeaderValue,
}

impl Conn {
    /// Connects (with `TCP_NODELAY`, as any HTTP client does) and does the HTTP/1 handshake.
    pub async fn connect(addr: SocketAddr) -> Result<Conn> {
        anyhow::ensure!(
            addr.ip().is_loopback(),
            "the bench only talks to loopback, not {addr}"
        );
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true).context("setting TCP_NODELAY")?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .with_context(|| format!("HTTP/1 handshake with {addr}"))?;
        // The connection task ends when `sender` is dropped or the server hangs up.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let host = HeaderValue::from_str(&addr.to_string()).context("building the Host header")?;
        Ok(Conn { sender, host })
    }

    /// Sends one request and reads the whole response, within [`REQUEST_TIMEOUT`].
    pub async fn request(
        &mut self,
        method: Method,
        uri: &Uri,
        json_body: Option<Bytes>,
    ) -> Result<(StatusCode, Bytes)> {
        tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.request_inner(method.clone(), uri, json_body),
        )
        .await
        .map_err(|_| anyhow!("{method} {uri}: no answer within {REQUEST_TIMEOUT:?}"))?
    }

    async fn request_inner(
        &mut self,
        method: Method,
        uri: &Uri,
        json_body: Option<Bytes>,
    ) -> Result<(StatusCode, Bytes)> {
        let mut request = Request::builder()
            .method(method.clone())
            .uri(uri.clone())
            .header(HOST, self.host.clone());
        if json_body.is_some() {
            request = request.header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        let request = request
            .body(Full::new(json_body.unwrap_or_default()))
            .context("building a request")?;
        self.sender
            .ready()
            .await
            .with_context(|| format!("{method} {uri}: connection closed"))?;
        let response = self
            .sender
            .send_request(request)
            .await
            .with_context(|| format!("{method} {uri}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .with_context(|| format!("{method} {uri}: reading the response body"))?
            .to_bytes();
        Ok((status, body))
    }

    /// `GET uri`, which must answer 200; returns the body.
    pub async fn get_ok(&mut self, uri: &Uri) -> Result<Bytes> {
        let (status, body) = self.request(Method::GET, uri, None).await?;
        if status != StatusCode::OK {
            bail!(
                "GET {uri} answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        Ok(body)
    }
}

/// What the load generator saw in one measurement window.
#[derive(Debug, Clone)]
pub struct Throughput {
    /// Requests completed (200, body read) inside the window.
    pub requests: u64,
    /// Response body bytes of those requests.
    pub body_bytes: u64,
    /// The window's length.
    pub window: Duration,
    /// CPU time the server process used in the window, in cores (1.0 = one core busy).
    pub server_cores: f64,
    /// CPU time this process (the load generator) used in the window, in cores.
    pub client_cores: f64,
    /// How busy each CPU of the machine was in the window (0 to 1), counting what no
    /// process is charged for, such as the loopback network's softirq work.
    pub cpu_busy: Vec<f64>,
    /// CPU time, in cores, that processes other than the server and the load generator
    /// used in the window: anything else running on the machine disturbs the figures.
    pub other_cores: f64,
    /// The largest share of the window any CPU lost to the hypervisor (steal time).
    pub steal: f64,
}

impl Throughput {
    /// Whether something outside the bench took CPU time during the window: other
    /// processes, or the hypervisor (steal).
    pub fn disturbed(&self) -> bool {
        self.other_cores > OTHER_LOAD_LIMIT || self.steal > STEAL_LIMIT
    }
}

/// Other processes' CPU use, in cores, above which a window counts as disturbed (process
/// CPU time is counted in 10 ms ticks, so a little noise is normal).
pub const OTHER_LOAD_LIMIT: f64 = 0.1;
/// Steal time share of any CPU above which a window counts as disturbed.
pub const STEAL_LIMIT: f64 = 0.03;

impl Throughput {
    /// Requests per second.
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.window.as_secs_f64()
    }

    /// The server's CPU time per request, in microseconds.
    pub fn server_micros(&self) -> f64 {
        if self.requests == 0 {
            return 0.0;
        }
        self.server_cores * self.window.as_secs_f64() * 1e6 / self.requests as f64
    }

    /// Mean response body size.
    pub fn body_size(&self) -> u64 {
        self.body_bytes.checked_div(self.requests).unwrap_or(0)
    }
}

/// Which HTTP client the load generator uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientKind {
    /// A minimal HTTP/1.1 keep-alive client: a pre-encoded request written on the socket,
    /// the answer's head parsed with httparse, the body counted by its Content-Length. It
    /// costs the load generator about 15 % less CPU per request than hyper's client, which
    /// is what keeps the hello-world, the cheapest server, server-bound rather than
    /// client-bound when the load generator has one core.
    Lean,
    /// hyper's HTTP/1 client connection (`hyper::client::conn::http1`).
    Hyper,
}

/// How to drive one measurement.
#[derive(Debug, Clone, Copy)]
pub struct LoadShape {
    /// Concurrent keep-alive connections, each with one request in flight.
    pub connections: usize,
    /// Load before the window starts (connections are set up in it).
    pub warmup: Duration,
    /// The measured window.
    pub duration: Duration,
    /// The client.
    pub client: ClientKind,
}

/// Runs a closed loop of GETs over `shape.connections` connections to `addr`, each
/// connection cycling through `uris` from its own starting point, and counts the requests
/// that complete inside the window after the warm-up. `server_pid` is sampled for CPU time.
pub async fn measure(
    addr: SocketAddr,
    uris: Arc<[Uri]>,
    shape: LoadShape,
    server_pid: u32,
) -> Result<Throughput> {
    anyhow::ensure!(!uris.is_empty(), "no URIs to request");
    let begin = Instant::now();
    let window_start = begin + shape.warmup;
    let window_end = window_start + shape.duration;
    let mut tasks = tokio::task::JoinSet::new();
    let requests: Arc<[Vec<u8>]> = uris
        .iter()
        .map(|uri| format!("GET {uri} HTTP/1.1\r\nhost: {addr}\r\n\r\n").into_bytes())
        .collect();
    for index in 0..shape.connections {
        let first = index * uris.len() / shape.connections;
        match shape.client {
            ClientKind::Lean => tasks.spawn(lean_loop(
                addr,
                requests.clone(),
                first,
                window_start,
                window_end,
            )),
            ClientKind::Hyper => tasks.spawn(hyper_loop(
                addr,
                uris.clone(),
                first,
                window_start,
                window_end,
            )),
        };
    }

    tokio::time::sleep_until(window_start).await;
    let server_before = procs::cpu_time(server_pid)?;
    let client_before = procs::cpu_time(std::process::id())?;
    let cpus_before = procs::cpu_counters()?;
    tokio::time::sleep_until(window_end).await;
    let server_after = procs::cpu_time(server_pid)?;
    let client_after = procs::cpu_time(std::process::id())?;
    let cpus_after = procs::cpu_counters()?;

    let mut requests = 0;
    let mut body_bytes = 0;
    let collect = async {
        while let Some(joined) = tasks.join_next().await {
            let (n, bytes) = joined.context("a load connection task failed")??;
            requests += n;
            body_bytes += bytes;
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::time::timeout(REQUEST_TIMEOUT, collect)
        .await
        .map_err(|_| {
            anyhow!(
                "load connections did not finish within {REQUEST_TIMEOUT:?} of the window's end"
            )
        })??;
    let seconds = shape.duration.as_secs_f64();
    let server_cores = server_after.saturating_sub(server_before).as_secs_f64() / seconds;
    let client_cores = client_after.saturating_sub(client_before).as_secs_f64() / seconds;
    let charged = procs::charged_cores(&cpus_before, &cpus_after, seconds);
    Ok(Throughput {
        requests,
        body_bytes,
        window: shape.duration,
        server_cores,
        client_cores,
        cpu_busy: procs::busy_between(&cpus_before, &cpus_after),
        other_cores: (charged - server_cores - client_cores).max(0.0),
        steal: procs::max_steal_between(&cpus_before, &cpus_after),
    })
}

/// One hyper connection's closed loop: returns the requests and body bytes completed in
/// the window.
async fn hyper_loop(
    addr: SocketAddr,
    uris: Arc<[Uri]>,
    first: usize,
    window_start: Instant,
    window_end: Instant,
) -> Result<(u64, u64)> {
    let mut conn = Conn::connect(addr).await?;
    let mut counted = 0;
    let mut bytes = 0;
    for step in 0..MAX_REQUESTS_PER_CONNECTION {
        if Instant::now() >= window_end {
            break;
        }
        let uri = &uris[(first + step) % uris.len()];
        // No per-request timer here (it would cost the load generator a timer per
        // request); `measure` bounds the whole loop instead.
        let (status, body) = conn.request_inner(Method::GET, uri, None).await?;
        if status != StatusCode::OK {
            bail!(
                "GET {uri} answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        let done = Instant::now();
        if done >= window_start && done < window_end {
            counted += 1;
            bytes += body.len() as u64;
        }
    }
    Ok((counted, bytes))
}

/// The largest response head the lean client accepts.
const MAX_HEAD: usize = 16 * 1024;

/// One lean connection's closed loop: returns the requests and body bytes completed in the
/// window.
async fn lean_loop(
    addr: SocketAddr,
    requests: Arc<[Vec<u8>]>,
    first: usize,
    window_start: Instant,
    window_end: Instant,
) -> Result<(u64, u64)> {
    ensure!(
        addr.ip().is_loopback(),
        "the bench only talks to loopback, not {addr}"
    );
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true).context("setting TCP_NODELAY")?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut counted = 0;
    let mut bytes = 0;
    for step in 0..MAX_REQUESTS_PER_CONNECTION {
        if Instant::now() >= window_end {
            break;
        }
        let request = &requests[(first + step) % requests.len()];
        stream
            .write_all(request)
            .await
            .with_context(|| format!("sending a request to {addr}"))?;
        let body_len = read_response(&mut stream, &mut buf)
            .await
            .with_context(|| format!("reading an answer from {addr}"))?;
        let done = Instant::now();
        if done >= window_start && done < window_end {
            counted += 1;
            bytes += body_len as u64;
        }
    }
    Ok((counted, bytes))
}

/// Reads one whole response (which must be a 200 with a Content-Length) and returns its
/// body length. The loop is closed, so nothing follows it in the buffer.
pub(crate) async fn read_response(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<usize> {
    let (head_len, body_len) = loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(buf).context("parsing a response head")? {
            httparse::Status::Complete(head_len) => {
                let status = response.code.unwrap_or(0);
                ensure!(status == 200, "answered {status}, not 200");
                let body_len = response
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok())
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .context("a response without a Content-Length")?;
                break (head_len, body_len);
            }
            httparse::Status::Partial => {
                ensure!(
                    buf.len() < MAX_HEAD,
                    "a response head over {MAX_HEAD} bytes"
                );
                read_more(stream, buf).await?;
            }
        }
    };
    while buf.len() < head_len + body_len {
        read_more(stream, buf).await?;
    }
    buf.advance(head_len + body_len);
    Ok(body_len)
}

async fn read_more(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<()> {
    buf.reserve(64 * 1024);
    let n = stream.read_buf(buf).await.context("reading")?;
    ensure!(n > 0, "the server closed the connection");
    Ok(())
}

/// Checks the flags every throughput benchmark shares.
pub fn check_flags(
    connections: usize,
    duration_secs: f64,
    warmup_secs: f64,
    rounds: usize,
    retries: usize,
) -> Result<()> {
    anyhow::ensure!(
        (1..=1024).contains(&connections),
        "--connections must be 1 to 1024"
    );
    anyhow::ensure!(
        (0.1..=600.0).contains(&duration_secs),
        "--duration-secs must be 0.1 to 600"
    );
    anyhow::ensure!(
        (0.0..=60.0).contains(&warmup_secs),
        "--warmup-secs must be 0 to 60"
    );
    anyhow::ensure!((1..=50).contains(&rounds), "--rounds must be 1 to 50");
    anyhow::ensure!(retries <= 10, "--retries must be 0 to 10");
    Ok(())
}
