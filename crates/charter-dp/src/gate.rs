//! Gate mode: a streaming HTTP/1.1 and HTTP/2 reverse proxy that forwards while the
//! license in force allows, answers 403 otherwise, and counts every forwarded request.
//!
//! The decision reads the in-memory enforcement state (a date comparison, no signature
//! check per request). Bodies stream both ways without buffering.
//!
//! Upstream connections: an HTTP/1.x client connection carries one request at a time, so
//! it is given an upstream connection of its own (a [`Lane`]) for its whole life, taken
//! from a shared stack of idle connections when it sends its first request and put back
//! when it closes. A request then costs no pool lookup and no extra task; the shared
//! stack is touched once per client connection. At most [`MAX_LANES`] client connections
//! hold a lane; the requests of the others, and of HTTP/2 clients (which multiplex
//! requests on one connection), go through hyper-util's pooled client. An HTTP/1.x client
//! connection that sends no request for [`CLIENT_IDLE_TIMEOUT`] is closed, so idle
//! clients do not hold upstream connections (nor a slow client's header a task) for long.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use charter_runtime::http::RequestBody;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Either, Empty, Full};
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

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
/// Most client connections holding an upstream connection of their own.
pub const MAX_LANES: usize = 512;
/// How long a given-back upstream connection may take to become ready for reuse.
const READY_WAIT: Duration = Duration::from_secs(1);
/// How long a client connection may wait before (or while) sending a request's header.
pub const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The upstream a gate forwards to: `http://host[:port][/base]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `host[:port]` as given: the `Host` header the upstream gets.
    pub authority: String,
    /// `host:port` to connect to (port 80 when none is given).
    pub address: String,
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
            .ok_or_else(|| format!("--upstream `{url}` has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!(
                "--upstream `{url}`: credentials in the URL are not supported"
            ));
        }
        if uri.query().is_some() {
            return Err(format!("--upstream `{url}` must not have a query string"));
        }
        Ok(Upstream {
            address: format!(
                "{}:{}",
                authority.host(),
                authority.port_u16().unwrap_or(80)
            ),
            authority: authority.to_string(),
            base_path: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// The URL as given back in logs and reports.
    pub fn url(&self) -> String {
        format!("http://{}{}", self.authority, self.base_path)
    }
}

/// The body sent upstream: the client's, or none (a request sent again, see
/// [`Gate::forward`]).
type UpstreamBody = Either<RequestBody, Empty<Bytes>>;
type Sender = http1::SendRequest<UpstreamBody>;

/// Idle HTTP/1.1 connections to the upstream, the least recently used at the bottom.
#[derive(Default)]
struct IdleConnections {
    stack: Mutex<Vec<(Sender, Instant)>>,
}

impl IdleConnections {
    /// The most recently used idle connection that is still open and young enough.
    fn take(&self) -> Option<Sender> {
        let mut stack = self.lock();
        while let Some((sender, since)) = stack.pop() {
            if since.elapsed() < IDLE_TIMEOUT && sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    /// Keeps `sender` for reuse (it can take a request now: the last response was read to
    /// its end and the upstream kept the connection open).
    fn put(&self, sender: Sender) {
        let now = Instant::now();
        let mut stack = self.lock();
        // In time order, so the expired ones are at the bottom.
        let expired =
            stack.partition_point(|(_, since)| now.duration_since(*since) >= IDLE_TIMEOUT);
        stack.drain(..expired);
        if stack.len() >= MAX_IDLE {
            stack.remove(0);
        }
        stack.push((sender, now));
    }

    /// Keeps `sender` for reuse once it is ready, if it becomes so soon: the connection's
    /// task marks it ready a moment after the last response ends, which may be just after
    /// its client connection closed. Dropping a sender closes its connection.
    fn give_back(self: &Arc<Self>, mut sender: Sender) {
        if sender.is_ready() {
            return self.put(sender);
        }
        if sender.is_closed() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let idle = self.clone();
            runtime.spawn(async move {
                if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, sender.ready()).await {
                    idle.put(sender);
                }
            });
        }
    }

    /// Closes the connections idle for too long, and forgets those the upstream closed.
    fn sweep(&self) {
        self.lock()
            .retain(|(sender, since)| since.elapsed() < IDLE_TIMEOUT && !sender.is_closed());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Sender, Instant)>> {
        self.stack.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// An HTTP/1.x client connection's upstream connection, held from its first forwarded
/// request until it closes, then given back to the idle stack. At most [`MAX_LANES`]
/// client connections hold one at a time; the others' requests use the pooled client.
struct Lane {
    idle: Arc<IdleConnections>,
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    sender: Option<Sender>,
    /// One of the gate's [`MAX_LANES`] places, taken at the first request.
    place: Option<OwnedSemaphorePermit>,
}

impl Lane {
    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether this client connection has (or now gets) a lane of its own.
    fn admitted(&self, places: &Arc<Semaphore>) -> bool {
        let mut held = self.lock();
        if held.place.is_none() {
            held.place = places.clone().try_acquire_owned().ok();
        }
        held.place.is_some()
    }

    fn take(&self) -> Option<Sender> {
        self.lock().sender.take()
    }

    fn put(&self, sender: Sender) {
        self.lock().sender = Some(sender);
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        if let Some(sender) = self.take() {
            self.idle.give_back(sender);
        }
    }
}

/// A running gate's shared parts.
pub struct Gate {
    upstream: Upstream,
    /// For HTTP/2 clients, and HTTP/1.x clients beyond [`MAX_LANES`].
    client: Client<HttpConnector, UpstreamBody>,
    /// For lanes.
    idle: Arc<IdleConnections>,
    /// The places for lanes.
    places: Arc<Semaphore>,
    /// How long an HTTP/1.x client connection may stay idle.
    client_idle_timeout: Duration,
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
        Gate::with_limits(
            upstream,
            enforcement,
            usage,
            timeout,
            MAX_LANES,
            CLIENT_IDLE_TIMEOUT,
        )
    }

    /// A gate with other limits than [`MAX_LANES`] and [`CLIENT_IDLE_TIMEOUT`] (tests).
    pub(crate) fn with_limits(
        upstream: Upstream,
        enforcement: Arc<Enforcement>,
        usage: Arc<Usage>,
        timeout: Duration,
        max_lanes: usize,
        client_idle_timeout: Duration,
    ) -> Gate {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(IDLE_TIMEOUT)
            .build(connector);
        Gate {
            upstream,
            client,
            idle: Arc::default(),
            places: Arc::new(Semaphore::new(max_lanes)),
            client_idle_timeout,
            enforcement,
            usage,
            timeout,
        }
    }

    /// A lane for a new client connection.
    fn lane(&self) -> Arc<Lane> {
        Arc::new(Lane {
            idle: self.idle.clone(),
            held: Mutex::new(Held::default()),
        })
    }

    async fn handle(
        &self,
        request: Request<RequestBody>,
        peer: SocketAddr,
        lane: &Lane,
    ) -> Result<Response<ProxyBody>, Infallible> {
        if !self.enforcement.allows_now() {
            return Ok(json(StatusCode::FORBIDDEN, DENIED));
        }
        // HTTP/1.x clients go through their lane; HTTP/2 clients, and HTTP/1.x clients
        // beyond the lane limit, through the pool.
        let pooled = request.version() == Version::HTTP_2 || !lane.admitted(&self.places);
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
            Ok(Err(e)) if body_stalled(&*e).is_some() => {
                let stalled = body_stalled(&*e)
                    .map(ToString::to_string)
                    .unwrap_or_default();
                tracing::info!(%peer, "{stalled}: request dropped");
                Ok(json(StatusCode::REQUEST_TIMEOUT, &stalled))
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
    /// one. On a reused connection that turns out closed, the request is sent once more on
    /// a new connection when the upstream cannot have acted on it: it was never written,
    /// or the connection closed before any answer (an upstream's idle timeout firing as
    /// the request arrived) and the request has no body and is idempotent (RFC 9110
    /// §9.2.2). Otherwise the error is returned.
    async fn forward(
        &self,
        lane: &Lane,
        mut request: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, BoxError> {
        let mut reused = lane.take().or_else(|| self.idle.take());
        loop {
            let (mut sender, fresh) = match reused.take() {
                Some(sender) => (sender, false),
                None => (self.connect().await?, true),
            };
            if !fresh {
                if let Err(e) = sender.ready().await {
                    tracing::debug!(error = %e, "an idle upstream connection had closed");
                    continue;
                }
            }
            let again =
                (!fresh && request.method().is_idempotent() && request.body().is_end_stream())
                    .then(|| without_body(&request));
            match sender.try_send_request(request).await {
                Ok(response) => {
                    lane.put(sender);
                    return Ok(response);
                }
                Err(mut e) => {
                    if let Some(unsent) = e.take_message() {
                        if !fresh {
                            request = unsent;
                            continue;
                        }
                    }
                    let error = e.into_error();
                    match again {
                        Some(again) if error.is_incomplete_message() => {
                            tracing::debug!(error = %error, "a reused upstream connection closed under an idempotent request; sending it again");
                            request = again;
                        }
                        _ => return Err(error.into()),
                    }
                }
            }
        }
    }

    /// A new HTTP/1.1 connection to the upstream; its I/O runs in a task of its own until
    /// the connection closes or its sender is dropped.
    async fn connect(&self) -> Result<Sender, BoxError> {
        let address = &self.upstream.address;
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
            .await
            .map_err(|_| format!("connecting to {address} timed out after {CONNECT_TIMEOUT:?}"))?
            .map_err(|e| format!("cannot connect to {address}: {e}"))?;
        stream
            .set_nodelay(true)
            .map_err(|e| format!("cannot set TCP_NODELAY on the connection to {address}: {e}"))?;
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
        request: Request<RequestBody>,
        peer: SocketAddr,
        absolute: bool,
    ) -> Result<Request<UpstreamBody>, String> {
        let (mut parts, body) = request.into_parts();
        let original_host = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| parts.uri.authority().map(|a| a.to_string()));
        let base = &self.upstream.base_path;
        let path_and_query = match parts.uri.path_and_query().map_or("/", |pq| pq.as_str()) {
            // `OPTIONS *` asks about the server: about the base path when there is one.
            "*" if !base.is_empty() => "",
            "*" => "*",
            // An absolute-form target with no path (`http://host?x=1`).
            pq if pq.starts_with('?') => &format!("/{pq}"),
            pq => pq,
        };
        let target = if absolute {
            let path = if path_and_query == "*" {
                ""
            } else {
                path_and_query
            };
            format!("http://{}{base}{path}", self.upstream.authority)
        } else {
            format!("{base}{path_and_query}")
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
        Ok(Request::from_parts(parts, Either::Left(body)))
    }
}

/// The same request with no body, to send again.
fn without_body(request: &Request<UpstreamBody>) -> Request<UpstreamBody> {
    let mut again = Request::new(Either::Right(Empty::new()));
    *again.method_mut() = request.method().clone();
    *again.uri_mut() = request.uri().clone();
    *again.version_mut() = request.version();
    *again.headers_mut() = request.headers().clone();
    again
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

/// The client's stalled body, when that is why a request to the upstream failed.
fn body_stalled<'a>(
    mut e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a charter_runtime::http::BodyStalled> {
    loop {
        if let Some(stalled) = e.downcast_ref() {
            return Some(stalled);
        }
        e = e.source()?;
    }
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

/// Serves the gate on `listener` (HTTP/1.1 and HTTP/2 cleartext) until `shutdown`, with
/// the accept loop every HTTP listener uses (`charter_runtime::http`): connections capped
/// at a third of the file handles (each may hold an upstream connection too), idle ones
/// closed after the client idle timeout, accept errors retried.
pub async fn serve(listener: TcpListener, gate: Arc<Gate>, shutdown: watch::Receiver<bool>) {
    let sweeper = {
        let (gate, mut shutdown) = (gate.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut sweep = tokio::time::interval(IDLE_TIMEOUT / 4);
            loop {
                tokio::select! {
                    _ = sweep.tick() => gate.idle.sweep(),
                    _ = shutdown.changed() => return,
                }
            }
        })
    };
    let limits = charter_runtime::http::Limits {
        idle: gate.client_idle_timeout,
        ..charter_runtime::http::Limits::share_of_file_limit(1.0 / 3.0)
    };
    let make = move |peer: SocketAddr| {
        let (gate, lane) = (gate.clone(), gate.lane());
        hyper::service::service_fn(move |request| {
            let (gate, lane) = (gate.clone(), lane.clone());
            async move { gate.handle(request, peer, &lane).await }
        })
    };
    charter_runtime::http::serve("gate", listener, limits, make, shutdown).await;
    let _ = sweeper.await;
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
                address: "127.0.0.1:8080".into(),
                base_path: String::new()
            }
        );
        // No port: the Host header stays as given, the connection goes to port 80.
        let bare = Upstream::parse("http://my-app/api").expect("ok");
        assert_eq!(
            (bare.authority.as_str(), bare.address.as_str()),
            ("my-app", "my-app:80")
        );
        assert_eq!(
            Upstream::parse("http://[::1]:9000").expect("ok").address,
            "[::1]:9000"
        );
        assert!(Upstream::parse("http://user:pw@svc:80")
            .unwrap_err()
            .contains("credentials"));
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
