//! The HTTP side of the bench: a minimal HTTP/1.1 keep-alive client (the request written
//! on the socket, the answer's head parsed with httparse, the body read by its
//! Content-Length), and the one load generator: a closed loop over N such connections. The
//! client is lean so that the load generator, on one core, costs less per request than the
//! cheapest server it drives (hyper's client cost about 15 % more CPU per request).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use bytes::{Buf, Bytes, BytesMut};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::harness::{self, median, spread, Latency, Meter, Usage};
use crate::report::Report;

/// Longest any one request may take before the bench gives up on it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest response head the client accepts.
const MAX_HEAD: usize = 16 * 1024;

/// One HTTP/1.1 keep-alive connection to a loopback server.
pub struct Http {
    stream: TcpStream,
    buf: BytesMut,
    addr: SocketAddr,
}

impl Http {
    /// Connects, with `TCP_NODELAY` as any HTTP client does.
    pub async fn connect(addr: SocketAddr) -> Result<Http> {
        ensure!(
            addr.ip().is_loopback(),
            "the bench only talks to loopback, not {addr}"
        );
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true).context("setting TCP_NODELAY")?;
        Ok(Http {
            stream,
            buf: BytesMut::with_capacity(64 * 1024),
            addr,
        })
    }

    /// A request's bytes, for [`measure`] or [`Http::request`].
    pub fn encode(addr: SocketAddr, method: &str, uri: &str, json_body: Option<&[u8]>) -> Vec<u8> {
        let mut request = format!("{method} {uri} HTTP/1.1\r\nhost: {addr}\r\n");
        if let Some(body) = json_body {
            request += &format!(
                "content-type: application/json\r\ncontent-length: {}\r\n",
                body.len()
            );
        }
        let mut bytes = (request + "\r\n").into_bytes();
        bytes.extend_from_slice(json_body.unwrap_or_default());
        bytes
    }

    /// Sends one request and reads the whole answer, within [`REQUEST_TIMEOUT`]: its status
    /// and body.
    pub async fn request(
        &mut self,
        method: &str,
        uri: &str,
        json_body: Option<&[u8]>,
    ) -> Result<(u16, Bytes)> {
        let request = Http::encode(self.addr, method, uri, json_body);
        let exchange = async {
            let (status, head, body) = self.exchange(&request).await?;
            let mut answer = self.buf.split_to(head + body);
            answer.advance(head);
            Ok::<_, anyhow::Error>((status, answer.freeze()))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| anyhow!("{method} {uri}: no answer within {REQUEST_TIMEOUT:?}"))?
            .with_context(|| format!("{method} {uri} to {}", self.addr))
    }

    /// `GET uri`, which must answer 200; returns the body.
    pub async fn get_ok(&mut self, uri: &str) -> Result<Bytes> {
        self.expect("GET", uri, None, 200).await
    }

    /// `method uri` with `json_body`, which must answer `status`; returns the body.
    pub async fn expect(
        &mut self,
        method: &str,
        uri: &str,
        json_body: Option<&[u8]>,
        status: u16,
    ) -> Result<Bytes> {
        let (got, body) = self.request(method, uri, json_body).await?;
        ensure!(
            got == status,
            "{method} {uri} answered {got}: {}",
            String::from_utf8_lossy(&body)
        );
        Ok(body)
    }

    /// Writes `request` and reads one answer into the buffer: its status, head length
    /// and body length. The loop is closed, so nothing follows the answer.
    async fn exchange(&mut self, request: &[u8]) -> Result<(u16, usize, usize)> {
        self.stream
            .write_all(request)
            .await
            .context("sending a request")?;
        let (status, head, body) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(head) = response
                .parse(&self.buf)
                .context("parsing an answer's head")?
            {
                let status = response.code.unwrap_or(0);
                let length = response
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| {
                        std::str::from_utf8(h.value)
                            .ok()?
                            .trim()
                            .parse::<usize>()
                            .ok()
                    });
                // Only a 204 or a 304 may come without a length: we never read to the close.
                let body = match length {
                    Some(length) => length,
                    None if matches!(status, 204 | 304) => 0,
                    None => bail!("an answer ({status}) without a Content-Length"),
                };
                break (status, head, body);
            }
            ensure!(
                self.buf.len() < MAX_HEAD,
                "an answer's head over {MAX_HEAD} bytes"
            );
            self.read_more().await?;
        };
        while self.buf.len() < head + body {
            self.read_more().await?;
        }
        Ok((status, head, body))
    }

    async fn read_more(&mut self) -> Result<()> {
        self.buf.reserve(64 * 1024);
        let n = self
            .stream
            .read_buf(&mut self.buf)
            .await
            .context("reading")?;
        ensure!(n > 0, "the server closed the connection");
        Ok(())
    }
}

/// The shape of the load, shared by the benchmarks that drive HTTP servers.
#[derive(Debug, Clone, clap::Args, serde::Serialize)]
pub struct LoadArgs {
    /// Concurrent keep-alive connections, each with one request in flight.
    #[arg(long, default_value_t = 32, value_parser = harness::range::<usize>(1, 1024))]
    pub connections: usize,
    /// Length of each measurement window, in seconds.
    #[arg(long, default_value_t = 5.0, value_parser = secs)]
    pub duration_secs: f64,
    /// Load before each window, in seconds (connections are opened in it).
    #[arg(long, default_value_t = 1.0, value_parser = secs)]
    pub warmup_secs: f64,
    /// Rounds; each measures every target once, in turn.
    #[arg(long, default_value_t = 3, value_parser = harness::range::<usize>(1, 50))]
    pub rounds: usize,
    /// Times a window is measured again when something outside the bench disturbed it
    /// (other processes' CPU or disk use, or the hypervisor's steal).
    #[arg(long, default_value_t = 3, value_parser = harness::range::<usize>(0, 10))]
    pub retries: usize,
}

/// The parser of a flag's seconds, from 0 to 600.
fn secs(text: &str) -> Result<f64, String> {
    let secs: f64 = text.parse().map_err(|e| format!("{e}"))?;
    match (0.0..=600.0).contains(&secs) {
        true => Ok(secs),
        false => Err("must be 0 to 600 seconds".to_owned()),
    }
}

/// What the load generator saw in one window.
#[derive(Debug, Clone)]
pub struct Window {
    /// Requests sent and answered inside the window.
    pub requests: u64,
    /// Their response body bytes.
    pub body_bytes: u64,
    /// Their latencies.
    pub latency: Latency,
    /// CPU use in the window, of the watched processes given to [`measure`] in order.
    pub usage: Usage,
}

impl Window {
    /// Requests per second.
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.usage.seconds
    }

    /// The latency percentile `p` (50 or 99) in microseconds.
    pub fn micros(&self, p: u8) -> f64 {
        let latency = if p == 50 {
            self.latency.p50
        } else {
            self.latency.p99
        };
        latency.as_secs_f64() * 1e6
    }

    /// CPU time per request, in microseconds, of the watched processes `indices`.
    fn per_request(&self, indices: std::ops::Range<usize>) -> f64 {
        let cpu: f64 = self.usage.watched[indices]
            .iter()
            .map(Duration::as_secs_f64)
            .sum();
        cpu * 1e6 / self.requests.max(1) as f64
    }
}

/// The median over `windows` of `f`.
pub fn median_of(windows: &[Window], f: impl Fn(&Window) -> f64) -> f64 {
    median(&windows.iter().map(f).collect::<Vec<_>>()).unwrap_or(f64::NAN)
}

/// Adds a table of `series` (a label, and its windows, one a round) to `report`: medians
/// over the rounds with the spread of req/s and p99, the cores used by the first watched
/// server (named by `first`: the one called directly), then the columns of `compare`
/// (named by `compared`) for each series by index; and every window's figures to its JSON.
pub fn table(
    report: &mut Report,
    title: String,
    series: &[(String, Vec<Window>)],
    first: &str,
    compared: &str,
    compare: impl Fn(usize) -> Vec<f64>,
) {
    report.table(
        title,
        &format!("target|req/s|min|max|p50 µs|p99 µs|min|max|body B|{first} cores|servers µs/req|proxy µs/req|loadgen µs/req|other cores|steal|{compared}"),
    );
    for (index, (label, windows)) in series.iter().enumerate() {
        let servers = windows.first().map_or(1, |w| w.usage.watched.len() - 1);
        let worst = |f: fn(&Window) -> f64| windows.iter().map(f).fold(0.0, f64::max);
        let mut row: Vec<f64> = spread(windows.iter().map(Window::rps)).into();
        row.push(median_of(windows, |w| w.micros(50)));
        row.extend(spread(windows.iter().map(|w| w.micros(99))));
        row.extend([
            median_of(windows, |w| w.body_bytes as f64 / w.requests.max(1) as f64),
            median_of(windows, |w| w.usage.cores(0)),
            median_of(windows, |w| w.per_request(0..servers)),
            if servers > 1 {
                median_of(windows, |w| w.per_request(1..servers))
            } else {
                f64::NAN
            },
            median_of(windows, |w| w.per_request(servers..servers + 1)),
            worst(|w| w.usage.other_cores),
            worst(|w| w.usage.steal),
        ]);
        row.extend(compare(index));
        report.row(label.clone(), row);
    }
    let windows = series.iter().map(|(label, windows)| {
        let windows = windows.iter().map(|w| {
            json!({ "requests": w.requests, "rps": w.rps(), "body_bytes": w.body_bytes, "latency": w.latency.to_json(),
                    "watched_cpu_s": w.usage.watched.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(), "usage": w.usage.to_json() })
        });
        json!({ "target": label, "windows": windows.collect::<Vec<_>>() })
    });
    report.set("windows", windows.collect());
}

/// Runs a closed loop over `load.connections` connections to `addr`, each cycling through
/// `requests` (encoded with [`Http::encode`]) from its own starting point, and keeps the
/// requests sent and answered (200) inside the window after the warm-up, with the CPU use
/// of the `servers` and of this process (watched in that order) in it.
pub async fn measure(
    addr: SocketAddr,
    requests: &Arc<[Vec<u8>]>,
    load: &LoadArgs,
    servers: &[u32],
) -> Result<Window> {
    ensure!(!requests.is_empty(), "no requests to send");
    let start = Instant::now() + Duration::from_secs_f64(load.warmup_secs);
    let end = start + Duration::from_secs_f64(load.duration_secs);
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..load.connections {
        let requests = requests.clone();
        let first = index * requests.len() / load.connections;
        tasks.spawn(async move {
            let mut conn = Http::connect(addr).await?;
            let (mut latencies, mut bytes) = (Vec::new(), 0);
            for step in first.. {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let (status, head, body) = conn.exchange(&requests[step % requests.len()]).await?;
                conn.buf.advance(head + body);
                ensure!(status == 200, "a load request to {addr} answered {status}");
                let done = Instant::now();
                if sent >= start && done < end {
                    latencies.push(done - sent);
                    bytes += body as u64;
                }
            }
            Ok::<_, anyhow::Error>((latencies, bytes))
        });
    }
    tokio::time::sleep_until(start).await;
    let watched: Vec<u32> = servers
        .iter()
        .copied()
        .chain([std::process::id()])
        .collect();
    let meter = Meter::start(&watched, &[])?;
    tokio::time::sleep_until(end).await;
    let usage = meter.stop()?;
    let (mut latencies, mut body_bytes) = (Vec::new(), 0);
    let collect = async {
        while let Some(joined) = tasks.join_next().await {
            let (l, b) = joined.context("a load connection task failed")??;
            latencies.extend(l);
            body_bytes += b;
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
    Ok(Window {
        requests: latencies.len() as u64,
        body_bytes,
        latency: Latency::of(&latencies).context("no request completed in the window")?,
        usage,
    })
}
