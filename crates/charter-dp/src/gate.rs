//! Gate mode: a streaming HTTP/1.1 and HTTP/2 reverse proxy that forwards while the
//! license in force allows, answers 403 otherwise, and counts every forwarded request.
//!
//! The decision reads the in-memory enforcement state (a date comparison, no signature
//! check per request). Bodies stream both ways without buffering.
//!
//! Upstream connections: an HTTP/1.1 client connection carries one request at a time, so
//! it is given an upstream connection of its own (a [`Lane`]) for its whole life, taken
//! from a shared stack of idle connections when it sends its first request and put back
//! when it closes. A request then costs no pool lookup and no extra task; the shared
//! stack is touched once per client connection. HTTP/2 clients multiplex requests on one
//! connection, so theirs go through hyper-util's pooled client.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::state::Enforcement;
use crate::usage::Usage;

/// Kong's message for a request refused for want of a license.
pub const DENIED: &str = "Enterprise license missing or expired";

/// Headers that belong to one hop and are never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

type ProxyBody = BoxBody<Bytes, hyper::Error>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long an upstream connection may wait, idle, to be reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most idle upstream connections kept for reuse; more are closed.
const MAX_IDLE: usize = 256;
/// How long connecting to the upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The upstream a gate forwards to: `http://host:port[/base]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `host:port`.
    pub authority: String,
    /// A path prefix, without the trailing slash ("" for none).
    pub base_path: String,
}

impl Upstream {
    /// Parses `--upstream`. Only `http://` is supported: the gate sits next to its service.
    pub fn parse(url: &str) -> Result<Upstream, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("--upstream `{url}` is not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => {
                return Err(format!(
                    "--upstream `{url}`: scheme `{other}` is not supported; the gate forwards plain http to a service beside it"
                ))
            }
            None => return Err(format!("--upstream `{url}` needs a scheme, e.g. http://127.0.0.1:8080")),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("--upstream `{url}` has no host"))?
            .to_string();
        if uri.query().is_some() {
            return Err(format!("--upstream `{url}` must not have a query string"));
        }
        Ok(Upstream {
            authority,
            base_path: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// The URL as given back in logs and reports.
    pub fn url(&self) -> String {
        format!("http://{}{}", self.authority, self.base_path)
    }
}

/// Idle HTTP/1.1 connections to the upstream, the most recently used on top.
#[derive(Default)]
struct IdleConnections {
    stack: Mutex<Vec<(http1::SendRequest<Incoming>, Instant)>>,
}

impl IdleConnections {
    /// The most recently used idle connection that is still open and young enough.
    fn take(&self) -> Option<http1::SendRequest<Incoming>> {
        let mut stack = self.stack.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some((sender, since)) = stack.pop() {
            if since.elapsed() < IDLE_TIMEOUT && sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    /// Keeps `sender` for reuse if it can take a request now (the last response was read
    /// to its end and the upstream kept the connection open). Dropping a sender closes
    /// its connection.
    fn put(&self, sender: http1::SendRequest<Incoming>) {
        if !sender.is_ready() {
            return;
        }
        let mut stack = self.stack.lock().unwrap_or_else(PoisonError::into_inner);
        Self::prune(&mut stack);
        if stack.len() >= MAX_IDLE {
            // The least recently used is at the bottom.
            stack.remove(0);
        }
        stack.push((sender, Instant::now()));
    }

    /// Closes the connections idle for too long, and forgets those the upstream closed.
    fn sweep(&self) {
        Self::prune(&mut self.stack.lock().unwrap_or_else(PoisonError::into_inner));
    }

    fn prune(stack: &mut Vec<(http1::SendRequest<Incoming>, Instant)>) {
        stack.retain(|(sender, since)| since.elapsed() < IDLE_TIMEOUT && !sender.is_closed());
    }
}

/// An HTTP/1.1 client connection's upstream connection, held from its first forwarded
/// request until it closes, then given back to the idle stack.
struct Lane {
    gate: Arc<Gate>,
    sender: Mutex<Option<http1::SendRequest<Incoming>>>,
}

impl Lane {
    fn take(&self) -> Option<http1::SendRequest<Incoming>> {
        self.sender
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn put(&self, sender: http1::SendRequest<Incoming>) {
        *self.sender.lock().unwrap_or_else(PoisonError::into_inner) = Some(sender);
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        if let Some(sender) = self.take() {
            self.gate.idle.put(sender);
        }
    }
}

/// A running gate's shared parts.
pub struct Gate {
    upstream: Upstream,
    /// For HTTP/2 clients.
    client: Client<HttpConnector, Incoming>,
    /// For HTTP/1.1 clients' lanes.
    idle: IdleConnections,
    enforcement: Arc<Enforcement>,
    usage: Arc<Usage>,
    timeout: Duration,
}

impl Gate {
    /// A gate for `upstream` deciding with `enforcement` and counting into `usage`;
    /// `timeout` bounds the wait for the upstream's response headers.
    pub fn new(
        upstream: Upstream,
        enforcement: Arc<Enforcement>,
        usage: Arc<Usage>,
        timeout: Duration,
    ) -> Gate {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Gate {
            upstream,
            client,
            idle: IdleConnections::default(),
            enforcement,
            usage,
            timeout,
        }
    }

    /// A lane for a new client connection.
    fn lane(self: &Arc<Self>) -> Arc<Lane> {
        Arc::new(Lane {
            gate: self.clone(),
            sender: Mutex::new(None),
        })
    }

    async fn handle(
        &self,
        request: Request<Incoming>,
        peer: SocketAddr,
        lane: &Lane,
    ) -> Result<Response<ProxyBody>, Infallible> {
        if !self.enforcement.allows_now() {
            return Ok(json(StatusCode::FORBIDDEN, DENIED));
        }
        // HTTP/1.x clients go through their lane, HTTP/2 clients through the pool.
        let pooled = request.version() == Version::HTTP_2;
        let request = match self.upstream_request(request, peer, pooled) {
            Ok(request) => request,
            Err(message) => return Ok(json(StatusCode::BAD_REQUEST, &message)),
        };
        let forwarded = async {
            if pooled {
                self.client.request(request).await.map_err(BoxError::from)
            } else {
                self.forward(lane, request).await
            }
        };
        match tokio::time::timeout(self.timeout, forwarded).await {
            Ok(Ok(response)) => {
                self.usage.count(self.enforcement.now());
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Ok(Response::from_parts(parts, body.boxed()))
            }
            Ok(Err(e)) => {
                tracing::warn!(upstream = %self.upstream.url(), error = %e, "upstream request failed");
                Ok(json(
                    StatusCode::BAD_GATEWAY,
                    &format!(
                        "upstream {} unavailable: {}",
                        self.upstream.url(),
                        describe(&e)
                    ),
                ))
            }
            Err(_) => {
                tracing::warn!(upstream = %self.upstream.url(), timeout = ?self.timeout, "upstream timed out");
                Ok(json(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!(
                        "upstream {} did not answer within {:?}",
                        self.upstream.url(),
                        self.timeout
                    ),
                ))
            }
        }
    }

    /// Sends `request` on the lane's upstream connection, or on an idle one, or on a new
    /// one. A request the upstream never received (its connection had just closed) is
    /// sent once more on a new connection; one it may have received is not.
    async fn forward(
        &self,
        lane: &Lane,
        mut request: Request<Incoming>,
    ) -> Result<Response<Incoming>, BoxError> {
        let mut sender = match lane.take().or_else(|| self.idle.take()) {
            Some(sender) => sender,
            None => self.connect().await?,
        };
        for attempt in 0..2 {
            if attempt > 0 || sender.ready().await.is_err() {
                sender = self.connect().await?;
            }
            match sender.try_send_request(request).await {
                Ok(response) => {
                    lane.put(sender);
                    return Ok(response);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if attempt == 0 => request = unsent,
                    _ => return Err(e.into_error().into()),
                },
            }
        }
        Err("the upstream closed two connections before taking the request".into())
    }

    /// A new HTTP/1.1 connection to the upstream; its I/O runs in a task of its own until
    /// the connection closes or its sender is dropped.
    async fn connect(&self) -> Result<http1::SendRequest<Incoming>, BoxError> {
        let authority = &self.upstream.authority;
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(authority))
            .await
            .map_err(|_| format!("connecting to {authority} timed out after {CONNECT_TIMEOUT:?}"))?
            .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Rewrites a client request for the upstream: same method, path, query, headers and
    /// streamed body; hop-by-hop headers dropped; `X-Forwarded-*` added. The target is in
    /// origin form (`/path?query`) for a lane, in absolute form for the pooled client.
    fn upstream_request(
        &self,
        request: Request<Incoming>,
        peer: SocketAddr,
        absolute: bool,
    ) -> Result<Request<Incoming>, String> {
        let (mut parts, body) = request.into_parts();
        let original_host = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| parts.uri.authority().map(|a| a.to_string()));
        let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let target = if absolute {
            format!(
                "http://{}{}{}",
                self.upstream.authority, self.upstream.base_path, path_and_query
            )
        } else {
            format!("{}{}", self.upstream.base_path, path_and_query)
        };
        parts.uri = target
            .parse()
            .map_err(|e| format!("cannot forward to {target}: {e}"))?;
        // The upstream speaks HTTP/1.1; HTTP/2 clients are translated.
        parts.version = hyper::Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        let headers = &mut parts.headers;
        let client_ip = peer.ip().to_string();
        let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(previous) => format!("{previous}, {client_ip}"),
            None => client_ip,
        };
        insert(headers, "x-forwarded-for", &forwarded_for);
        insert(headers, "x-forwarded-proto", "http");
        if let Some(host) = original_host {
            insert(headers, "x-forwarded-host", &host);
        }
        insert(headers, "host", &self.upstream.authority);
        Ok(Request::from_parts(parts, body))
    }
}

fn insert(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(HeaderName::from_static(name), value);
    }
}

/// Drops hop-by-hop headers, including those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

fn describe(e: &BoxError) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

fn json(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({ "message": message }).to_string();
    let mut response = Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Serves the gate on `listener` (HTTP/1.1 and HTTP/2 cleartext) until `shutdown`.
pub async fn serve(listener: TcpListener, gate: Arc<Gate>, mut shutdown: watch::Receiver<bool>) {
    let mut sweep = tokio::time::interval(IDLE_TIMEOUT / 4);
    loop {
        let (stream, peer) = tokio::select! {
            _ = sweep.tick() => {
                gate.idle.sweep();
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment rather than spin.
                    tracing::warn!(error = %e, "gate cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let (gate, lane) = (gate.clone(), gate.lane());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let (gate, lane) = (gate.clone(), lane.clone());
                async move { gate.handle(request, peer, &lane).await }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "gate connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls() {
        assert_eq!(
            Upstream::parse("http://127.0.0.1:8080").expect("ok"),
            Upstream {
                authority: "127.0.0.1:8080".into(),
                base_path: String::new()
            }
        );
        assert_eq!(
            Upstream::parse("http://svc:80/api/").expect("ok").base_path,
            "/api"
        );
        assert!(Upstream::parse("https://svc")
            .unwrap_err()
            .contains("not supported"));
        assert!(Upstream::parse("svc:80").is_err());
        assert!(Upstream::parse("http://svc/?a=b")
            .unwrap_err()
            .contains("query"));
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-private"),
        );
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        headers.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert_eq!(headers["x-kept"], "yes");
    }
}
