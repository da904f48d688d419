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
//!
//! HTTP/2 to the upstream (h2c, prior knowledge) carries every request when `--upstream`
//! is `h2c://…`, and the requests of HTTP/2 clients when it is `http://…` and the
//! upstream speaks HTTP/2 (found out by a probe, [`speaks_h2c`], remembered for
//! [`PROBE_TTL`]); otherwise HTTP/2 clients are translated to HTTP/1.1. Multiplexed
//! connections ([`H2Upstream`], each up to [`H2_STREAMS_PER_CONNECTION`] streams) carry
//! them; trailers pass both ways, so gRPC works.
//!
//! An HTTP/1.1 upgrade (WebSocket) is sent on an upstream connection of its own; after a
//! 101 the two upgraded connections are spliced both ways ([`splice`]) until either side
//! closes or neither sends anything for [`TUNNEL_IDLE_TIMEOUT`]. 1xx responses
//! other than 101 are not forwarded: a hyper service returns one response per request,
//! and hyper's server sends no 1xx but its own `100 Continue`.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use charter_runtime::http::RequestBody;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Either, Empty, Full};
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::{http1, http2};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::upgrade::OnUpgrade;
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use crate::config::GateConfig;
use crate::state::Enforcement;
use crate::usage::Usage;

/// Kong's message for a request refused for want of a license.
pub const DENIED: &str = "Enterprise license missing or expired";

/// The answer to a request that has come back to the gate that forwarded it.
const LOOP: &str =
    "the request came back to this gate: its upstream leads to the gate again (a forwarding loop)";

/// Headers that belong to one hop and are never forwarded (RFC 9110 §7.6.1).
/// (`Trailer` is not one: it declares the trailer fields, which hyper's HTTP/1 encoder
/// sends only when declared.)
/// Names made once, at compile time: a name given as text is parsed at every use. A
/// `static`, not a `const`: a `const` array is made afresh, and dropped, wherever it is
/// used (messages are matched against these names by [`Fields::of`]). `Connection` comes
/// first.
static HOP_BY_HOP: [HeaderName; HOPS] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
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
/// Most header fields in an upstream's response head. nginx bounds the head by size
/// (`proxy_buffer_size`, one 4 KiB page by default), not by count: 256 fields of 16 bytes
/// fill that, shorter ones fit more. hyper sets aside room for this many on every response
/// it parses, so more costs every request (1,000 each way took about a fifth of the
/// gate's CPU); README.md says what the trade-off is.
pub const MAX_RESPONSE_HEADERS: usize = 256;
/// Most header fields in a client's request head (HTTP/1), for the same reason no more
/// than this: well past what clients send (the audit's 100 fields, a browser's 20).
pub const MAX_REQUEST_HEADERS: usize = 256;
/// The share of the process's file handles upgraded (spliced) connections may hold: each
/// holds two, and the client's no longer counts as one of the listener's connections.
const TUNNEL_SHARE: f64 = 1.0 / 8.0;
/// How long a spliced connection may carry nothing either way before the gate closes both
/// sides: a peer that vanished without closing would otherwise hold two file handles and
/// a place forever. nginx cuts WebSockets after 60 s without a read (`proxy_read_timeout`);
/// HAProxy's `timeout tunnel` is typically an hour; an application that pings its
/// WebSockets (as browsers' libraries do every 20 to 60 s) never sees this.
pub const TUNNEL_IDLE_TIMEOUT: Duration = Duration::from_secs(60 * 60);
/// How many [`HOP_BY_HOP`] names there are.
const HOPS: usize = 7;
/// Where `TE` is in [`HOP_BY_HOP`].
const TE: usize = 4;
/// Where `Upgrade` is in [`HOP_BY_HOP`].
const UPGRADE: usize = 6;
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// Headers about earlier hops that only a trusted proxy's word counts for: anyone else's
/// are dropped (the gate sets `X-Forwarded-For`, `-Proto` and `-Host` itself).
const CLAIMED_BY_PROXIES: [HeaderName; 5] = [
    header::FORWARDED,
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-real-ip"),
    X_FORWARDED_HOST,
];
/// How long the finding of whether an `http://` upstream speaks HTTP/2 holds.
const PROBE_TTL: Duration = Duration::from_secs(60);
/// How long an upstream may take to answer the probe's HTTP/2 preface.
const PROBE_WAIT: Duration = Duration::from_secs(2);
/// How often an HTTP/2 upstream connection is pinged, and how long an answer may take
/// before the connection counts as dead.
const H2_PING: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// The HTTP/2 receive window of each stream to the upstream (hyper's default, 2 MiB), and
/// of the connection: as much as HTTP/2 allows, so the connection's window never stalls
/// the other streams (see [`Gate::h2_sender`]).
const H2_STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const H2_CONNECTION_WINDOW: u32 = (1 << 31) - 1;
/// Streams in flight on one HTTP/2 upstream connection before the next request goes on
/// another: the least a server should allow (RFC 9113 §6.5.2), so the upstream's own limit
/// is seldom what a request waits for.
const H2_STREAMS_PER_CONNECTION: usize = 100;
/// Most HTTP/2 connections to the upstream.
const H2_MAX_CONNECTIONS: usize = 16;
/// How long after a failed dial of the HTTP/2 upstream requests fail at once.
const REDIAL_AFTER: Duration = Duration::from_secs(1);

/// The upstream a gate forwards to: `http://host[:port][/base]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `host[:port]` as given: the `Host` header the upstream gets.
    pub authority: String,
    /// `host:port` to connect to (port 80 when none is given).
    pub address: String,
    /// The host, as in the URL (an IPv6 address in brackets).
    pub host: String,
    /// The port (80 when none is given).
    pub port: u16,
    /// A path prefix, without the trailing slash ("" for none).
    pub base_path: String,
    /// `h2c://`: every request goes to the upstream over HTTP/2 with prior knowledge.
    pub http2: bool,
}

impl Upstream {
    /// Parses `--upstream`: `http://` (HTTP/1.1, and HTTP/2 for HTTP/2 clients when the
    /// upstream speaks it) or `h2c://` (HTTP/2 only). No TLS: the gate sits next to its
    /// service.
    pub fn parse(url: &str) -> Result<Upstream, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("--upstream `{url}` is not a URL: {e}"))?;
        let http2 = match uri.scheme_str() {
            Some("http") => false,
            Some("h2c") => true,
            Some(other) => {
                return Err(format!(
                    "--upstream `{url}`: scheme `{other}` is not supported; the gate forwards plain http (http://, or h2c:// for HTTP/2 only) to a service beside it"
                ))
            }
            None => return Err(format!("--upstream `{url}` needs a scheme, e.g. http://127.0.0.1:8080")),
        };
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
        let port = authority.port_u16().unwrap_or(80);
        Ok(Upstream {
            address: format!("{}:{port}", authority.host()),
            host: authority.host().to_owned(),
            port,
            authority: authority.to_string(),
            base_path: uri.path().trim_end_matches('/').to_owned(),
            http2,
        })
    }

    /// The URL as given back in logs and reports.
    pub fn url(&self) -> String {
        let scheme = if self.http2 { "h2c" } else { "http" };
        format!("{scheme}://{}{}", self.authority, self.base_path)
    }

    /// `location` (a `Location` or `Content-Location` value) as the client should see it
    /// when it points at this upstream (under its base path), over `http` or `https`: the
    /// same place at `{scheme}://{client_host}` (`scheme` is what the upstream was told
    /// in `X-Forwarded-Proto`), as nginx's default `proxy_redirect` does. `None` for any
    /// other value (relative, or another host), which is passed on as it is.
    pub fn rewrite_location(
        &self,
        location: &str,
        scheme: &str,
        client_host: &str,
    ) -> Option<String> {
        let (https, rest) = if location.get(..7)?.eq_ignore_ascii_case("http://") {
            (false, &location[7..])
        } else if location.get(..8)?.eq_ignore_ascii_case("https://") {
            (true, &location[8..])
        } else {
            return None;
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let authority: hyper::http::uri::Authority = rest[..end].parse().ok()?;
        // An `https` link without a port is one an upstream told `X-Forwarded-Proto:
        // https` built from the `Host` it got; an `http` one means port 80.
        let port_matches = match authority.port_u16() {
            Some(port) => port == self.port,
            None => https || self.port == 80,
        };
        // A link with credentials is not one the upstream built from its own address.
        if authority.as_str().contains('@')
            || !authority.host().eq_ignore_ascii_case(&self.host)
            || !port_matches
        {
            return None;
        }
        let path = rest[end..].strip_prefix(self.base_path.as_str())?;
        let path = match path.chars().next() {
            None => "/".to_owned(),
            Some('/') => path.to_owned(),
            Some('?' | '#') => format!("/{path}"),
            // `/api2` is not under the base path `/api`.
            Some(_) => return None,
        };
        Some(format!("{scheme}://{client_host}{path}"))
    }
}

/// A block of addresses (`ADDRESS/PREFIX`, or one address) whose peers the gate trusts
/// as proxies: their `X-Forwarded-For` is appended to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses one `--trusted-proxy` value.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address.parse().map_err(|_| {
            format!("--trusted-proxy `{text}`: `{address}` is not an IPv4 or IPv6 address")
        })?;
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(|| {
                    format!("--trusted-proxy `{text}`: the prefix length must be a number from 0 to {bits}")
                })?,
        };
        let masked = mask(network, prefix);
        if masked != network {
            return Err(format!(
                "--trusted-proxy `{text}` has address bits set beyond its /{prefix} prefix; write {masked}/{prefix}"
            ));
        }
        Ok(Cidr { network, prefix })
    }

    /// Whether `ip` is in this block (an IPv4 address seen as IPv6, `::ffff:a.b.c.d`,
    /// counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        ip.is_ipv4() == self.network.is_ipv4() && mask(ip, self.prefix) == self.network
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// `ip` with all but its first `prefix` bits cleared.
fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let keep = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((u32::from(v4) & keep).into())
        }
        IpAddr::V6(v6) => {
            let keep = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((u128::from(v6) & keep).into())
        }
    }
}

/// The body sent upstream: the client's, or none (a request without one, or one sent
/// again, see [`Gate::forward`]).
type UpstreamBody = Either<Outgoing, Empty<Bytes>>;
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
    /// The client's address as `X-Forwarded-For` text, made once per connection.
    peer_ip: HeaderValue,
    /// The upstream timeout's timer, reused by the connection's requests one after
    /// another (see [`Lane::timer`]).
    timer: Mutex<Option<std::pin::Pin<Box<tokio::time::Sleep>>>>,
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

    /// A timer for a request's upstream timeout: the connection's, unless another of its
    /// requests (HTTP/2) has it, then a new one. A timer made for each request is put in
    /// the runtime's timer wheel and taken out again every time; one reset to a later
    /// deadline stays in place (tokio moves it when its first deadline comes).
    fn timer(&self) -> std::pin::Pin<Box<tokio::time::Sleep>> {
        self.timer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .unwrap_or_else(|| Box::pin(tokio::time::sleep(Duration::ZERO)))
    }

    /// Gives back a timer from [`Lane::timer`].
    fn put_timer(&self, timer: std::pin::Pin<Box<tokio::time::Sleep>>) {
        *self.timer.lock().unwrap_or_else(PoisonError::into_inner) = Some(timer);
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        if let Some(sender) = self.take() {
            self.idle.give_back(sender);
        }
    }
}

/// The HTTP/2 connections to the upstream, dialled when needed (see [`Gate::h2_sender`]),
/// and (for an `http://` upstream) whether the upstream speaks HTTP/2.
#[derive(Default)]
struct H2Upstream {
    /// Held across a dial, so concurrent requests wait for one new connection, not open
    /// many.
    sender: tokio::sync::Mutex<H2Connections>,
    /// What the last definite probe found, and when.
    speaks: Mutex<Option<(bool, Instant)>>,
    /// Held while probing, so one probe runs at a time.
    probing: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct H2Connections {
    /// In the order dialled; requests go on the first with a stream to spare.
    open: Vec<H2Connection>,
    /// When the last dial failed, and why.
    failed: Option<(Instant, String)>,
}

struct H2Connection {
    sender: http2::SendRequest<UpstreamBody>,
    /// Its streams in flight: one for each [`H2Stream`] alive.
    streams: Arc<AtomicUsize>,
    /// When a request last went on it.
    used: Instant,
}

/// A stream in flight on an HTTP/2 upstream connection, counted while this (and its
/// clones) live: from the request until the response body is done with ([`Returning`]).
#[derive(Clone)]
struct H2Stream {
    _count: Arc<H2StreamCount>,
}

struct H2StreamCount(Arc<AtomicUsize>);

impl H2Stream {
    fn new(streams: &Arc<AtomicUsize>) -> H2Stream {
        streams.fetch_add(1, Ordering::Relaxed);
        H2Stream {
            _count: Arc::new(H2StreamCount(streams.clone())),
        }
    }
}

impl Drop for H2StreamCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a request goes upstream.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    /// On the client connection's own HTTP/1.1 connection (target in origin form).
    Lane,
    /// Through the pooled HTTP/1.1 client (absolute form).
    Pooled,
    /// On a new HTTP/1.1 connection of its own, to be spliced after a 101 (origin form).
    Upgrade,
    /// On the shared HTTP/2 connection (absolute form, the authority as `:authority`).
    Http2,
}

/// A running gate's shared parts.
pub struct Gate {
    upstream: Upstream,
    /// The `Host` header the upstream gets (unless the client's is preserved).
    upstream_host: HeaderValue,
    /// Send the client's `Host` to the upstream instead of the upstream's.
    preserve_host: bool,
    /// Peers whose `X-Forwarded-For` is appended to; any other's is replaced.
    trusted_proxies: Vec<Cidr>,
    /// For HTTP/2 clients, and HTTP/1.x clients beyond [`MAX_LANES`].
    client: Client<HttpConnector, UpstreamBody>,
    /// For lanes.
    idle: Arc<IdleConnections>,
    /// The places for lanes.
    places: Arc<Semaphore>,
    /// The places for upgraded (spliced) connections.
    tunnels: Arc<Semaphore>,
    /// HTTP/2 to the upstream.
    h2: H2Upstream,
    /// How long an HTTP/1.x client connection may stay idle.
    client_idle_timeout: Duration,
    /// How long a spliced connection may stay idle ([`TUNNEL_IDLE_TIMEOUT`]).
    tunnel_idle_timeout: Duration,
    enforcement: Arc<Enforcement>,
    usage: Arc<Usage>,
    timeout: Duration,
    /// Its name in `Via`.
    via: Via,
    /// When a loop was last logged as a warning, and how many came since.
    loops: Mutex<LoopLog>,
}

/// A loop is logged as a warning at most once in [`LOOP_WARN_EVERY`]: a loop comes back
/// with every request, and a log line each would flood the log.
#[derive(Default)]
struct LoopLog {
    warned: Option<Instant>,
    since: u64,
}

const LOOP_WARN_EVERY: Duration = Duration::from_secs(60);

impl Gate {
    /// A gate as `config` says for the data plane `node`, deciding with `enforcement` and
    /// counting into `usage`.
    pub fn new(
        config: &GateConfig,
        node: Uuid,
        enforcement: Arc<Enforcement>,
        usage: Arc<Usage>,
    ) -> Gate {
        Gate::with_limits(
            config,
            node,
            enforcement,
            usage,
            MAX_LANES,
            CLIENT_IDLE_TIMEOUT,
        )
    }

    /// A gate with other limits than [`MAX_LANES`] and [`CLIENT_IDLE_TIMEOUT`] (tests).
    pub(crate) fn with_limits(
        config: &GateConfig,
        node: Uuid,
        enforcement: Arc<Enforcement>,
        usage: Arc<Usage>,
        max_lanes: usize,
        client_idle_timeout: Duration,
    ) -> Gate {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(IDLE_TIMEOUT)
            .http1_max_headers(MAX_RESPONSE_HEADERS)
            .build(connector);
        let upstream = config.upstream.clone();
        Gate {
            // `Upstream::parse` took the authority from a parsed URI, so it is a valid value.
            upstream_host: HeaderValue::from_str(&upstream.authority)
                .unwrap_or_else(|_| HeaderValue::from_static("localhost")),
            upstream,
            preserve_host: config.preserve_host,
            trusted_proxies: config.trusted_proxies.clone(),
            client,
            idle: Arc::default(),
            places: Arc::new(Semaphore::new(max_lanes)),
            tunnels: Arc::new(Semaphore::new(
                charter_runtime::http::Limits::share_of_file_limit(TUNNEL_SHARE).max_connections,
            )),
            h2: H2Upstream::default(),
            client_idle_timeout,
            tunnel_idle_timeout: TUNNEL_IDLE_TIMEOUT,
            enforcement,
            usage,
            timeout: config.timeout,
            via: Via::of(node),
            loops: Mutex::default(),
        }
    }

    /// Logs a request from `peer` that came back to this gate (see [`LoopLog`]).
    fn log_loop(&self, peer: SocketAddr) {
        let mut log = self.loops.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if log
            .warned
            .is_some_and(|at| now.duration_since(at) < LOOP_WARN_EVERY)
        {
            log.since += 1;
            drop(log);
            tracing::debug!(%peer, "a request came back to the gate: answered 508");
            return;
        }
        let since = std::mem::take(&mut log.since);
        log.warned = Some(now);
        drop(log);
        tracing::warn!(
            %peer,
            via = self.via.name,
            more_since_last_warning = since,
            "a request came back to the gate that forwarded it (its Via names this gate): \
             answered 508 Loop Detected. Does the upstream lead back to the gate, or does \
             another data plane share this node id (a copied data directory)? Warned at \
             most once a minute."
        );
    }

    /// The same gate with spliced connections closed after `idle` without traffic (tests).
    #[cfg(test)]
    pub(crate) fn with_tunnel_idle_timeout(mut self, idle: Duration) -> Gate {
        self.tunnel_idle_timeout = idle;
        self
    }

    /// A lane for a new client connection from `peer`.
    fn lane(&self, peer: SocketAddr) -> Arc<Lane> {
        Arc::new(Lane {
            idle: self.idle.clone(),
            held: Mutex::new(Held::default()),
            // An IP address's text is always a valid header value.
            peer_ip: HeaderValue::from_str(&peer.ip().to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            timer: Mutex::new(None),
        })
    }

    /// Answers one client request. Owns what it uses, so the service returns this future
    /// itself rather than one more around it.
    async fn handle(
        self: Arc<Self>,
        mut request: Request<RequestBody>,
        peer: SocketAddr,
        lane: Arc<Lane>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let fields = Fields::of(request.headers());
        // gRPC clients read the gate's own answers as gRPC statuses.
        let grpc = fields.content_type && is_grpc(&request);
        let json = |status, message: &str| answer(grpc, status, message);
        // One reading of the clock for the decision and for the count (a forwarded
        // request counts in the month it arrived in, once it is answered).
        let now = self.enforcement.now();
        if !self.enforcement.allows(now) {
            return Ok(json(StatusCode::FORBIDDEN, DENIED));
        }
        // A gate in front of one service is no forward proxy: no tunnels to elsewhere.
        if request.method() == hyper::Method::CONNECT {
            return Ok(json(
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is not supported: the gate forwards to its upstream only",
            ));
        }
        // A request this gate has forwarded before has come back to it: each hop would
        // forward it once more, on a connection of its own, until a header limit ends it.
        if fields.via && self.via.named_in(request.headers()) {
            self.log_loop(peer);
            return Ok(json(StatusCode::LOOP_DETECTED, LOOP));
        }
        // An HTTP/1.1 upgrade (WebSocket) gets an upstream connection of its own, which
        // is spliced to the client's once the upstream answers 101.
        let upgrade = if wants_upgrade(&request, &fields) {
            match self.tunnels.clone().try_acquire_owned() {
                Ok(place) => Some((hyper::upgrade::on(&mut request), place)),
                Err(_) => {
                    tracing::warn!(%peer, "too many upgraded connections: upgrade refused");
                    return Ok(json(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the gate holds as many upgraded connections as it can; try again later",
                    ));
                }
            }
        } else {
            None
        };
        // HTTP/2 when the upstream wants it, or when the client speaks it and the upstream
        // does too; else HTTP/1.x clients go through their lane, HTTP/2 clients and
        // HTTP/1.x clients beyond the lane limit through the pool.
        let route = if upgrade.is_some() {
            Route::Upgrade
        } else if self.upstream.http2
            || (request.version() == Version::HTTP_2 && Box::pin(self.upstream_speaks_h2()).await)
        {
            Route::Http2
        } else if request.version() == Version::HTTP_2 || !lane.admitted(&self.places) {
            Route::Pooled
        } else {
            Route::Lane
        };
        let client_host = client_host(&request);
        let (request, sent, pending, scheme) = match self.upstream_request(
            request,
            &fields,
            peer,
            &lane.peer_ip,
            client_host.as_ref(),
            route,
        ) {
            Ok(forwarded) => forwarded,
            Err(e) => {
                tracing::info!(%peer, error = %e, "request not forwarded");
                return Ok(json(
                    StatusCode::BAD_REQUEST,
                    "the request target cannot be forwarded",
                ));
            }
        };
        // Where the client sees the upstream: the scheme the upstream was told, and the
        // host the client asked for.
        let client = (scheme, client_host);
        // The other routes' futures are boxed: this future is as large as the largest
        // it holds, and it is moved (copied) as a whole on every request.
        let forwarded = async {
            match route {
                Route::Upgrade => Box::pin(self.forward_upgrade(request)).await,
                Route::Pooled => Box::pin(self.forward_pooled(request)).await,
                Route::Lane => self.forward(&lane, request).await,
                Route::Http2 => Box::pin(self.forward_h2(request)).await,
            }
        };
        // The upstream timeout counts from when the request body has all been handed to
        // the upstream connection: a slow upload is the client's, not the upstream's.
        let mut timer = lane.timer();
        let deadline = async {
            if let Some((opened, sent)) = sent {
                // Until the upstream asks for the body's first piece (its connection, or
                // its HTTP/2 stream, is open) the wait is the upstream's; from then until
                // the body has all been sent it is the client's upload.
                if tokio::time::timeout(self.timeout, opened).await.is_err() {
                    return;
                }
                let _ = sent.await;
            }
            // The timer is left at an earlier request's deadline, and moved on only when
            // that comes while this request is awaited (see `HeadSleep` in
            // `charter_runtime::http`): a reset works out the timer wheel's tick.
            let deadline = tokio::time::Instant::now() + self.timeout;
            if timer.deadline() > deadline {
                timer.as_mut().reset(deadline);
            }
            loop {
                timer.as_mut().await;
                if timer.deadline() >= deadline {
                    break;
                }
                timer.as_mut().reset(deadline);
            }
        };
        let answered = tokio::select! {
            biased;
            answered = forwarded => Some(answered),
            () = deadline => None,
        };
        lane.put_timer(timer);
        match answered {
            Some(Ok(mut response)) => {
                self.usage.count(now);
                if let Some((client, place)) = upgrade {
                    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                        let upstream = hyper::upgrade::on(&mut response);
                        let idle = self.tunnel_idle_timeout;
                        tokio::spawn(splice(client, upstream, place, idle));
                    }
                }
                Ok(self.client_response(response, &client, pending))
            }
            Some(Err(e)) => Ok(self.failed(&e, peer, grpc)),
            None => {
                tracing::warn!(upstream = %self.upstream.url(), timeout = ?self.timeout, "upstream timed out");
                Ok(json(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!(
                        "the upstream service did not answer within {} s",
                        self.timeout.as_secs()
                    ),
                ))
            }
        }
    }

    /// The client's answer for a request the upstream did not answer: a short message
    /// for the client, the details in the log.
    fn failed(&self, e: &BoxError, peer: SocketAddr, grpc: bool) -> Response<ProxyBody> {
        let json = |status, message: &str| answer(grpc, status, message);
        if let Some(stalled) = body_stalled(&**e) {
            tracing::info!(%peer, "{stalled}: request dropped");
            return json(StatusCode::REQUEST_TIMEOUT, &stalled.to_string());
        }
        let url = self.upstream.url();
        if hyper_error(&**e).is_some_and(hyper::Error::is_parse_too_large) {
            tracing::warn!(upstream = %url, error = %describe(e), max_headers = MAX_RESPONSE_HEADERS, "the upstream's response header is larger than the gate accepts");
            return json(
                StatusCode::BAD_GATEWAY,
                &format!("the upstream service's response header is larger than the gate accepts (at most {MAX_RESPONSE_HEADERS} fields)"),
            );
        }
        tracing::warn!(upstream = %url, error = %describe(e), "upstream request failed");
        json(
            StatusCode::BAD_GATEWAY,
            "the upstream service is unavailable",
        )
    }

    /// The upstream's response as the client gets it: hop-by-hop headers dropped (but
    /// an upgrade's), `Location` and `Content-Location` that point at the upstream
    /// rewritten to the address the client used, `Via` added.
    fn client_response(
        &self,
        response: Response<Incoming>,
        (scheme, client_host): &(&str, Option<HeaderValue>),
        pending: Option<Pending>,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = response.into_parts();
        let mut fields = Fields::of(&parts.headers);
        let upgrade = (parts.status == StatusCode::SWITCHING_PROTOCOLS)
            .then(|| parts.headers.get(header::UPGRADE).cloned())
            .flatten();
        if strip_hop_by_hop(&mut parts.headers, fields.hops) {
            fields = Fields::of(&parts.headers);
        }
        if let Some(upgrade) = upgrade {
            parts.headers.insert(header::UPGRADE, upgrade);
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        let host = client_host.as_ref().filter(|_| fields.location);
        if let Some(host) = host.and_then(|h| h.to_str().ok()) {
            for name in [header::LOCATION, header::CONTENT_LOCATION] {
                let rewritten = parts
                    .headers
                    .get(&name)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| self.upstream.rewrite_location(v, scheme, host));
                if let Some(rewritten) = rewritten.and_then(|r| HeaderValue::from_str(&r).ok()) {
                    parts.headers.insert(name, rewritten);
                }
            }
        }
        parts
            .headers
            .append(header::VIA, self.via.value(parts.version));
        let body = Returning {
            inner: body,
            pending,
            _stream: parts.extensions.remove::<H2Stream>(),
        };
        Response::from_parts(parts, body.boxed())
    }

    /// Sends an upgrade request on a new upstream connection of its own, which can be
    /// taken over once the upstream answers 101.
    async fn forward_upgrade(
        &self,
        request: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, BoxError> {
        let (mut sender, connection) = self.dial().await?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender.send_request(request).await?)
    }

    /// Sends `request` through the pooled client. An idempotent request without a body
    /// that a (reused) connection closed under before any answer is sent once more on a
    /// new connection, as [`Gate::forward`] does.
    async fn forward_pooled(
        &self,
        request: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, BoxError> {
        let again = (request.method().is_idempotent() && request.body().is_end_stream())
            .then(|| without_body(&request));
        match self.client.request(request).await {
            Ok(response) => Ok(response),
            Err(e) => match again {
                Some(mut again)
                    if hyper_error(&e).is_some_and(hyper::Error::is_incomplete_message) =>
                {
                    tracing::debug!(error = %describe(&BoxError::from(e)), "a pooled upstream connection closed under an idempotent request; sending it again");
                    // A connection of our own takes the request in origin form.
                    let target = again.uri().path_and_query().map_or_else(
                        || Uri::from_static("/"),
                        |pq| {
                            pq.as_str()
                                .parse()
                                .unwrap_or_else(|_| Uri::from_static("/"))
                        },
                    );
                    *again.uri_mut() = target;
                    let mut sender = self.connect().await?;
                    Ok(sender.send_request(again).await?)
                }
                _ => Err(e.into()),
            },
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
                // Boxed: dialling is rare, and its future would make every request's larger.
                None => (Box::pin(self.connect()).await?, true),
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

    /// Sends `request` on an HTTP/2 connection to the upstream ([`Gate::h2_sender`];
    /// hyper queues it while that connection is at the upstream's stream limit; the
    /// upstream timeout runs meanwhile, see
    /// [`Gate::handle`]). A request the connection never sent (it had closed)
    /// is sent on a new one, whatever its method; one the upstream refused unprocessed
    /// (`REFUSED_STREAM`, or a GOAWAY it arrived after) is sent again when it has no body.
    /// Any other failure is the client's answer: the upstream may have acted on it.
    async fn forward_h2(
        &self,
        request: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, BoxError> {
        let again = request
            .body()
            .is_end_stream()
            .then(|| without_body(&request));
        let (mut sender, stream) = self.h2_sender().await?;
        tokio::time::timeout(self.timeout, sender.ready())
            .await
            .map_err(|_| {
                format!(
                    "no stream free on the HTTP/2 upstream connection within {} s",
                    self.timeout.as_secs()
                )
            })??;
        // The stream is counted on its connection while the response body lives.
        let counted = |mut response: Response<Incoming>, stream: H2Stream| {
            response.extensions_mut().insert(stream);
            response
        };
        let error = match sender.try_send_request(request).await {
            Ok(response) => return Ok(counted(response, stream)),
            Err(mut e) => match e.take_message() {
                Some(unsent) => {
                    tracing::debug!(error = %e.error(), "the HTTP/2 upstream connection closed before the request was sent; sending it on a new one");
                    let (mut sender, stream) = self.h2_sender().await?;
                    return Ok(counted(sender.send_request(unsent).await?, stream));
                }
                None => e.into_error(),
            },
        };
        drop(stream);
        let refused = find::<h2::Error>(&error).is_some_and(|e| {
            e.reason() == Some(h2::Reason::REFUSED_STREAM) || (e.is_go_away() && e.is_remote())
        });
        match again {
            Some(again) if refused => {
                tracing::debug!(error = %error, "the HTTP/2 upstream refused a request unprocessed; sending it again");
                let (mut sender, stream) = self.h2_sender().await?;
                Ok(counted(sender.send_request(again).await?, stream))
            }
            _ => Err(error.into()),
        }
    }

    /// An HTTP/2 connection to the upstream for one more stream, and that stream's count
    /// on it: the first open connection with fewer than [`H2_STREAMS_PER_CONNECTION`]
    /// streams in flight, else a new one (up to [`H2_MAX_CONNECTIONS`]; beyond, the least
    /// busy, where the stream waits for the upstream's limit). So an upstream's limit on
    /// concurrent streams (commonly 100 to 250) does not hold back long streams beyond it,
    /// such as gRPC streaming calls. A connection other than the first that has carried
    /// nothing for [`IDLE_TIMEOUT`] is let go. A dial that failed less than
    /// [`REDIAL_AFTER`] ago fails the requests meanwhile at once (when no connection is
    /// open), so a dead upstream does not queue them behind dials.
    async fn h2_sender(&self) -> Result<(http2::SendRequest<UpstreamBody>, H2Stream), BoxError> {
        let mut held = self.h2.sender.lock().await;
        let mut first = true;
        // The first open connection stays; others while busy or lately used.
        held.open.retain(|c| {
            !c.sender.is_closed()
                && (std::mem::take(&mut first)
                    || c.streams.load(Ordering::Relaxed) > 0
                    || c.used.elapsed() < IDLE_TIMEOUT)
        });
        let spare = held
            .open
            .iter()
            .position(|c| c.streams.load(Ordering::Relaxed) < H2_STREAMS_PER_CONNECTION);
        let least_busy =
            || (0..held.open.len()).min_by_key(|&i| held.open[i].streams.load(Ordering::Relaxed));
        let chosen = match spare {
            Some(i) => Some(i),
            None if held.open.len() >= H2_MAX_CONNECTIONS => least_busy(),
            None => match &held.failed {
                Some((at, _)) if at.elapsed() < REDIAL_AFTER => least_busy(),
                _ => None,
            },
        };
        if let Some(i) = chosen {
            let connection = &mut held.open[i];
            connection.used = Instant::now();
            return Ok((
                connection.sender.clone(),
                H2Stream::new(&connection.streams),
            ));
        }
        if let Some((at, error)) = &held.failed {
            if at.elapsed() < REDIAL_AFTER {
                return Err(error.clone().into());
            }
        }
        let dialled = async {
            let stream = self.tcp().await?;
            // Flow control per stream only: a client that stops reading its download
            // holds its own stream's window, never the connection's (which every client
            // shares).
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(H2_PING)
                .keep_alive_timeout(H2_PING_TIMEOUT)
                .initial_stream_window_size(H2_STREAM_WINDOW)
                .initial_connection_window_size(H2_CONNECTION_WINDOW)
                .max_header_list_size(charter_runtime::http::MAX_HEADER_LIST_SIZE)
                .handshake(TokioIo::new(stream))
                .await?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "HTTP/2 upstream connection ended with an error");
                }
            });
            Ok::<_, BoxError>(sender)
        };
        match dialled.await {
            Ok(sender) => {
                let streams = Arc::new(AtomicUsize::new(0));
                let stream = H2Stream::new(&streams);
                held.failed = None;
                held.open.push(H2Connection {
                    sender: sender.clone(),
                    streams,
                    used: Instant::now(),
                });
                Ok((sender, stream))
            }
            Err(e) => {
                held.failed = Some((Instant::now(), describe(&e)));
                Err(e)
            }
        }
    }

    /// Whether the upstream speaks HTTP/2: `h2c://` says so; for `http://` the last
    /// probe's finding while it is younger than [`PROBE_TTL`], else a new probe (one at
    /// a time). Only a definite answer is remembered: a probe that could not connect or
    /// got no answer keeps the previous finding (none: HTTP/1.1 for this request).
    async fn upstream_speaks_h2(&self) -> bool {
        if self.upstream.http2 {
            return true;
        }
        let known = || {
            *self
                .h2
                .speaks
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        };
        let fresh = |k: Option<(bool, Instant)>| k.filter(|(_, since)| since.elapsed() < PROBE_TTL);
        if let Some((speaks, _)) = fresh(known()) {
            return speaks;
        }
        let _probing = self.h2.probing.lock().await;
        if let Some((speaks, _)) = fresh(known()) {
            return speaks;
        }
        let found = match self.tcp().await {
            Ok(stream) => speaks_h2c(stream).await,
            Err(_) => None,
        };
        let mut speaks = self
            .h2
            .speaks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let http2 = match found {
            Some(found) => {
                *speaks = Some((found, Instant::now()));
                found
            }
            None => speaks.is_some_and(|(found, _)| found),
        };
        tracing::info!(upstream = %self.upstream.url(), http2, answered = found.is_some(), "probed whether the upstream speaks HTTP/2 (h2c)");
        http2
    }

    /// A new HTTP/1.1 connection to the upstream; its I/O runs in a task of its own until
    /// the connection closes or its sender is dropped.
    async fn connect(&self) -> Result<Sender, BoxError> {
        let (sender, connection) = self.dial().await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Opens an HTTP/1.1 connection to the upstream; the caller runs its I/O.
    async fn dial(
        &self,
    ) -> Result<(Sender, http1::Connection<TokioIo<TcpStream>, UpstreamBody>), BoxError> {
        let stream = self.tcp().await?;
        Ok(http1::Builder::new()
            .max_headers(MAX_RESPONSE_HEADERS)
            .handshake(TokioIo::new(stream))
            .await?)
    }

    /// A new TCP connection to the upstream, with `TCP_NODELAY`.
    async fn tcp(&self) -> Result<TcpStream, BoxError> {
        let address = &self.upstream.address;
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
            .await
            .map_err(|_| format!("connecting to {address} timed out after {CONNECT_TIMEOUT:?}"))?
            .map_err(|e| format!("cannot connect to {address}: {e}"))?;
        stream
            .set_nodelay(true)
            .map_err(|e| format!("cannot set TCP_NODELAY on the connection to {address}: {e}"))?;
        Ok(stream)
    }

    /// Rewrites a client request for the upstream: same method, path, query, headers and
    /// streamed body; hop-by-hop headers dropped (but an upgrade's); `Host` set to the
    /// upstream's (or kept, with `--preserve-host`); `X-Forwarded-*` and `Via` added. The
    /// target is in origin form (`/path?query`) for a lane or an upgrade, in absolute form
    /// for the pooled client and HTTP/2 (whose authority is the `Host` the upstream gets,
    /// sent as `:authority`); `TE: trailers` goes on over HTTP/2 (gRPC servers want it).
    /// With the request come a signal for when its body has all been sent and the handle
    /// to drop that body if the response ends first (none without a body).
    fn upstream_request(
        &self,
        request: Request<RequestBody>,
        fields: &Fields,
        peer: SocketAddr,
        peer_ip: &HeaderValue,
        client_host: Option<&HeaderValue>,
        route: Route,
    ) -> Result<Forwarded, String> {
        let (mut parts, body) = request.into_parts();
        let trailers = fields.hops[TE]
            && parts
                .headers
                .get_all(header::TE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
        let host = match client_host {
            Some(host) if self.preserve_host => host.clone(),
            _ => self.upstream_host.clone(),
        };
        let base = &self.upstream.base_path;
        let path_and_query = match parts.uri.path_and_query().map_or("/", |pq| pq.as_str()) {
            // `OPTIONS *` asks about the server: about the base path when there is one.
            "*" if !base.is_empty() => "",
            "*" => "*",
            // An absolute-form target with no path (`http://host?x=1`).
            pq if pq.starts_with('?') => &format!("/{pq}"),
            pq => pq,
        };
        // An origin-form target forwarded in origin form with no base path is the
        // client's as it is: no need to write it out and parse it again.
        let unchanged = matches!(route, Route::Lane | Route::Upgrade)
            && base.is_empty()
            && parts.uri.scheme().is_none()
            && parts.uri.authority().is_none()
            && parts
                .uri
                .path_and_query()
                .is_some_and(|pq| pq.as_str() == path_and_query);
        let target = match route {
            _ if unchanged => String::new(),
            Route::Lane | Route::Upgrade => format!("{base}{path_and_query}"),
            Route::Pooled | Route::Http2 => {
                let path = if path_and_query == "*" {
                    ""
                } else {
                    path_and_query
                };
                let authority = match route {
                    // The Host becomes the `:authority`: a host and port, nothing more.
                    Route::Http2 => host
                        .to_str()
                        .ok()
                        .and_then(|h| h.parse::<hyper::http::uri::Authority>().ok())
                        .filter(|a| !a.as_str().contains('@'))
                        .ok_or("the Host header is not a host[:port]")?
                        .to_string(),
                    _ => self.upstream.authority.clone(),
                };
                format!("http://{authority}{base}{path}")
            }
        };
        if !unchanged {
            parts.uri = target
                .parse()
                .map_err(|e| format!("cannot forward to {target}: {e}"))?;
        }
        let received = parts.version;
        // Each client's requests are translated to the version the upstream gets.
        parts.version = match route {
            Route::Http2 => Version::HTTP_2,
            _ => Version::HTTP_11,
        };
        let upgrade = (route == Route::Upgrade)
            .then(|| parts.headers.get(header::UPGRADE).cloned())
            .flatten();
        let fields = if strip_hop_by_hop(&mut parts.headers, fields.hops) {
            Fields::of(&parts.headers)
        } else {
            *fields
        };
        let headers = &mut parts.headers;
        // Room for the fields added below at once (hyper's map has room for the client's
        // only): a map grows by moving every field.
        headers.reserve(6);
        if let Some(upgrade) = upgrade {
            headers.insert(header::UPGRADE, upgrade);
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        // `TE` is hop-by-hop: the gate says on its own hop what the client said on its,
        // that trailers are welcome (an HTTP/1.1 upstream may send them only then; RFC
        // 9110 §10.1.4 wants the `te` connection option beside it).
        if trailers && route != Route::Upgrade {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
            if route != Route::Http2 {
                headers.insert(header::CONNECTION, HeaderValue::from_static("te"));
            }
        }
        let trusted = self.trusted_proxies.iter().any(|c| c.contains(peer.ip()));
        let previous: Vec<&str> = if trusted {
            headers
                .get_all(X_FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect()
        } else {
            Vec::new()
        };
        if previous.is_empty() {
            headers.insert(X_FORWARDED_FOR, peer_ip.clone());
        } else {
            let client_ip = peer_ip.to_str().unwrap_or_default();
            let forwarded_for = format!("{}, {client_ip}", previous.join(", "));
            if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
                headers.insert(X_FORWARDED_FOR, value);
            }
        }
        // A trusted proxy's own scheme and host stand (it knows whether the client came
        // over TLS, and which name it used, as Kong's `trusted_ips` lets them); anyone
        // else's claims about earlier hops are dropped.
        if !trusted && fields.claimed {
            for name in CLAIMED_BY_PROXIES {
                headers.remove(name);
            }
        }
        // Where the client sees the upstream: the scheme the upstream is told.
        let scheme = if trusted && fields.forwarded_proto {
            match headers.get(X_FORWARDED_PROTO).map(HeaderValue::as_bytes) {
                Some(p) if p.eq_ignore_ascii_case(b"https") => "https",
                _ => "http",
            }
        } else {
            headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
            "http"
        };
        if let Some(host) = client_host.filter(|_| !(trusted && fields.forwarded_host)) {
            headers.insert(X_FORWARDED_HOST, host.clone());
        }
        // Over HTTP/2 the authority is in the target (`:authority`).
        if route == Route::Http2 {
            headers.remove(header::HOST);
        } else {
            headers.insert(header::HOST, host);
        }
        headers.append(header::VIA, self.via.value(received));
        let (body, sent, pending) = if body.is_end_stream() {
            (Either::Right(Empty::new()), None, None)
        } else {
            let pending: Pending = Arc::new(Mutex::new(Some(body)));
            let (opened, opened_rx) = oneshot::channel();
            let (sent, sent_rx) = oneshot::channel();
            let outgoing = Outgoing {
                body: pending.clone(),
                opened: Some(opened),
                sent: Some(sent),
            };
            (
                Either::Left(outgoing),
                Some((opened_rx, sent_rx)),
                Some(pending),
            )
        };
        Ok((Request::from_parts(parts, body), sent, pending, scheme))
    }
}

/// A request on its way upstream, the signal that its body has all been sent, the body's
/// handle, and the scheme the upstream is told the client used (see
/// [`Gate::upstream_request`]).
type Forwarded = (
    Request<UpstreamBody>,
    Option<(oneshot::Receiver<()>, oneshot::Receiver<()>)>,
    Option<Pending>,
    &'static str,
);

/// A client's request body while it is sent upstream, shared with the response so the
/// response can drop it (see [`Returning`]).
type Pending = Arc<Mutex<Option<RequestBody>>>;

fn lock_pending(pending: &Pending) -> std::sync::MutexGuard<'_, Option<RequestBody>> {
    pending.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The client's request body on its way upstream: it says when it has all been handed to
/// the upstream connection (the upstream timeout starts then), and fails once the
/// response has ended first and dropped it.
struct Outgoing {
    body: Pending,
    /// Told when the upstream first asks for the body.
    opened: Option<oneshot::Sender<()>>,
    sent: Option<oneshot::Sender<()>>,
}

/// Why an [`Outgoing`] body ended early.
#[derive(Debug)]
struct CutOff;

impl std::fmt::Display for CutOff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the response ended before the request body was all sent")
    }
}

impl std::error::Error for CutOff {}

impl hyper::body::Body for Outgoing {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        let this = self.get_mut();
        if let Some(opened) = this.opened.take() {
            let _ = opened.send(());
        }
        let mut body = lock_pending(&this.body);
        let Some(inner) = body.as_mut() else {
            return Poll::Ready(Some(Err(Box::new(CutOff))));
        };
        let polled = std::pin::Pin::new(&mut *inner).poll_frame(cx);
        let done = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => inner.is_end_stream(),
            _ => false,
        };
        drop(body);
        if done {
            if let Some(sent) = this.sent.take() {
                let _ = sent.send(());
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        lock_pending(&self.body)
            .as_ref()
            .is_some_and(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        lock_pending(&self.body)
            .as_ref()
            .map_or_else(hyper::body::SizeHint::default, |b| b.size_hint())
    }
}

/// The upstream's response body on its way to the client. When it is dropped (the
/// response sent to its end, or the client gone), the client's request body is dropped if the upstream has not taken it all: an
/// upstream may answer before reading the request (a refusal), and the client must not
/// be left sending into a connection nobody reads. Dropped, an HTTP/2 client's request
/// stream is reset and an HTTP/1 client's connection closed after the response.
struct Returning {
    inner: Incoming,
    pending: Option<Pending>,
    /// The stream's count on its HTTP/2 upstream connection, if it came over one.
    _stream: Option<H2Stream>,
}

impl Returning {
    fn finish(&mut self) {
        if let Some(pending) = self.pending.take() {
            let body = lock_pending(&pending).take();
            drop(body);
        }
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        self.finish();
    }
}

impl hyper::body::Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        // The client's body is dropped when this body is, once the response has been sent
        // to its end: dropped any earlier, an HTTP/2 stream would be reset with CANCEL
        // (the response not finished) rather than NO_ERROR, and the client would discard
        // the response.
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Whether `request` asks to switch protocols (RFC 9110 §7.8): HTTP/1.1 with `Upgrade`
/// and `Connection: upgrade`.
fn wants_upgrade<B>(request: &Request<B>, fields: &Fields) -> bool {
    request.version() == Version::HTTP_11
        && fields.hops[UPGRADE]
        && fields.hops[0]
        && request
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// The address the client used: its `Host`, or the authority of an HTTP/2 request.
fn client_host<B>(request: &Request<B>) -> Option<HeaderValue> {
    match request.headers().get(header::HOST) {
        Some(host) => Some(host.clone()),
        None => request
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
    }
}

/// Splices an upgraded client connection to its upgraded upstream connection, both ways,
/// until either side closes, or neither has sent anything for `idle`. `place` is one of
/// the gate's places for such connections.
async fn splice(
    client: OnUpgrade,
    upstream: OnUpgrade,
    place: OwnedSemaphorePermit,
    idle: Duration,
) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(error = %e, "an upgraded connection could not be taken over");
            return;
        }
    };
    let moved = Arc::new(AtomicU64::new(0));
    let mut client = Metered(TokioIo::new(client), moved.clone());
    let mut upstream = Metered(TokioIo::new(upstream), moved.clone());
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    // Checked every half `idle`: closed after `idle` to 1.5 `idle` of silence.
    let half = idle / 2;
    let mut check = tokio::time::interval_at(tokio::time::Instant::now() + half, half);
    // Ticks missed while this task waited are not made up at once, which would count
    // silence that was only the task's own wait.
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut seen, mut quiet) = (0, 0);
    loop {
        tokio::select! {
            copied = &mut copy => {
                match copied {
                    Ok((up, down)) => tracing::debug!(up, down, "upgraded connection closed"),
                    Err(e) => tracing::debug!(error = %e, "upgraded connection ended with an error"),
                }
                break;
            }
            _ = check.tick() => {
                let now = moved.load(Ordering::Relaxed);
                quiet = if now == seen { quiet + 1 } else { 0 };
                seen = now;
                if quiet == 2 {
                    tracing::debug!(?idle, "upgraded connection idle: closed");
                    break;
                }
            }
        }
    }
    drop(place);
}

/// One side of a spliced connection, counting the bytes read from it into a total shared
/// with the other side.
struct Metered<T>(T, Arc<AtomicU64>);

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Metered<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.0).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        self.1.fetch_add(read, Ordering::Relaxed);
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Metered<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Whether the server at the other end of `stream` speaks HTTP/2 with prior knowledge
/// (RFC 9113 §3.4): it answers the client's connection preface (the magic and an empty
/// SETTINGS frame) with a SETTINGS frame on stream 0; an HTTP/1.x server answers with an
/// error status line. `None` when it answered nothing within [`PROBE_WAIT`] (closed, or
/// busy): no finding.
async fn speaks_h2c(mut stream: TcpStream) -> Option<bool> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
    let probe = async {
        stream.write_all(PREFACE).await?;
        let mut head = [0u8; 9];
        let mut got = 0;
        while got < head.len() {
            match stream.read(&mut head[got..]).await? {
                0 => break,
                n => got += n,
            }
        }
        Ok::<_, std::io::Error>(match got {
            0 => None,
            // A frame header: 24-bit length, type (4 = SETTINGS), flags, 31-bit stream id.
            9 => Some(head[3] == 4 && head[5..] == [0, 0, 0, 0]),
            _ => Some(false),
        })
    };
    tokio::time::timeout(PROBE_WAIT, probe).await.ok()?.ok()?
}

/// The gate's `Via` entries (RFC 9110 §7.6.3): the protocol a message was received with
/// and the gate's pseudonym, `charter-` and the first 8 hex digits of its data plane's
/// node id. A request whose `Via` already names this gate has come back to it (a loop);
/// several gates in a row name themselves apart.
struct Via {
    name: &'static str,
    /// For HTTP/1.0, HTTP/1.1 and HTTP/2: static, so that a clone per message is a copy
    /// of a pointer (no reference count).
    values: [HeaderValue; 3],
}

impl Via {
    /// A gate lives as long as its process, so its name and values are leaked to be
    /// `'static` (some 80 bytes).
    fn of(node: Uuid) -> Via {
        let name: &'static str = format!("charter-{}", &node.simple().to_string()[..8]).leak();
        // `charter-` and hex digits: always a valid value.
        let value = |protocol: &str| HeaderValue::from_static(format!("{protocol} {name}").leak());
        Via {
            values: [value("1.0"), value("1.1"), value("2")],
            name,
        }
    }

    /// The entry for a message received with `version`.
    fn value(&self, version: Version) -> HeaderValue {
        self.values[match version {
            Version::HTTP_10 => 0,
            Version::HTTP_2 => 2,
            _ => 1,
        }]
        .clone()
    }

    /// Whether an entry of `headers`' `Via` names this gate as its recipient: entries are
    /// `received-protocol RWS received-by [RWS comment]`, split at commas outside a
    /// comment (a comment may hold commas, nested parentheses and `\`-escapes); bytes
    /// beyond ASCII (obs-text, allowed in comments) are taken as they are.
    fn named_in(&self, headers: &HeaderMap) -> bool {
        headers
            .get_all(header::VIA)
            .iter()
            .any(|value| via_names(value.as_bytes(), self.name))
    }
}

/// Whether an entry of the `Via` field value `value` was received by `name`.
fn via_names(value: &[u8], name: &str) -> bool {
    let received_by = |entry: &[u8]| {
        entry
            .split(|b| *b == b' ' || *b == b'\t')
            .filter(|word| !word.is_empty())
            .nth(1)
            .is_some_and(|by| by.eq_ignore_ascii_case(name.as_bytes()))
    };
    let (mut depth, mut escaped, mut start) = (0usize, false, 0);
    for (i, &b) in value.iter().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if depth > 0 => escaped = true,
            b'(' => depth += 1,
            b')' => depth = depth.saturating_sub(1),
            b',' if depth == 0 => {
                if received_by(&value[start..i]) {
                    return true;
                }
                start = i + 1;
            }
            _ => {}
        }
    }
    received_by(&value[start..])
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

/// What a message's header fields hold of the names the gate acts on, found in one pass
/// over the names: matching a name's text mostly ends at its length, while looking a
/// name up in the map hashes it (and a `const` array of names compared against is made
/// afresh, and dropped, at every use).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Fields {
    /// Which of [`HOP_BY_HOP`] are present.
    hops: [bool; HOPS],
    /// Any of [`CLAIMED_BY_PROXIES`].
    claimed: bool,
    /// `X-Forwarded-Proto`.
    forwarded_proto: bool,
    /// `X-Forwarded-Host`.
    forwarded_host: bool,
    /// `Location` or `Content-Location`.
    location: bool,
    /// `Content-Type`.
    content_type: bool,
    /// `Via`.
    via: bool,
}

impl Fields {
    fn of(headers: &HeaderMap) -> Fields {
        let mut fields = Fields::default();
        for name in headers.keys() {
            // The names of `HOP_BY_HOP` in its order, and of `CLAIMED_BY_PROXIES`
            // (a unit test holds the three lists together).
            match name.as_str() {
                "connection" => fields.hops[0] = true,
                "keep-alive" => fields.hops[1] = true,
                "proxy-authenticate" => fields.hops[2] = true,
                "proxy-authorization" => fields.hops[3] = true,
                "te" => fields.hops[TE] = true,
                "transfer-encoding" => fields.hops[5] = true,
                "upgrade" => fields.hops[UPGRADE] = true,
                "forwarded" | "x-forwarded-port" | "x-forwarded-prefix" | "x-real-ip" => {
                    fields.claimed = true;
                }
                "x-forwarded-host" => {
                    fields.claimed = true;
                    fields.forwarded_host = true;
                }
                "x-forwarded-proto" => fields.forwarded_proto = true,
                "location" | "content-location" => fields.location = true,
                "content-type" => fields.content_type = true,
                "via" => fields.via = true,
                _ => {}
            }
        }
        fields
    }
}

/// Drops hop-by-hop headers (those of [`HOP_BY_HOP`] that `hops` says are present), and
/// those the `Connection` header names; whether it named any (what [`Fields::of`] found
/// may then be gone).
#[must_use]
fn strip_hop_by_hop(headers: &mut HeaderMap, hops: [bool; HOPS]) -> bool {
    let mut named = Vec::new();
    // `Connection` (the first) names the others a message has. Its usual token,
    // `keep-alive`, is hop-by-hop anyway (dropped below): it is passed over before any
    // name is made.
    if hops[0] {
        let tokens = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            // A value that is just that token is not split into tokens.
            .filter(|v| !v.eq_ignore_ascii_case("keep-alive"))
            .flat_map(|v| v.split(','))
            .map(str::trim);
        for token in tokens {
            if token.is_empty() || token.eq_ignore_ascii_case("keep-alive") {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                if !HOP_BY_HOP.contains(&name) {
                    named.push(name);
                }
            }
        }
        for name in &named {
            headers.remove(name);
        }
    }
    if hops.contains(&true) {
        for (name, present) in HOP_BY_HOP.iter().zip(hops) {
            if present {
                headers.remove(name);
            }
        }
    }
    !named.is_empty()
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

/// The first error of `e`'s chain of type `T`.
fn find<'a, T: std::error::Error + 'static>(
    mut e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    loop {
        if let Some(found) = e.downcast_ref() {
            return Some(found);
        }
        e = e.source()?;
    }
}

/// The client's stalled body, when that is why a request to the upstream failed.
fn body_stalled<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a charter_runtime::http::BodyStalled> {
    find(e)
}

/// The HTTP error under `e`, if there is one.
fn hyper_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a hyper::Error> {
    find(e)
}

/// Whether `request` is a gRPC call (`content-type: application/grpc[+proto|;…]`).
fn is_grpc<B>(request: &Request<B>) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .filter(|v| v.to_str().is_ok())
        .is_some_and(|v| match v.as_bytes().split_at_checked(GRPC.len()) {
            Some((media, rest)) => {
                media.eq_ignore_ascii_case(GRPC) && matches!(rest.first(), None | Some(b'+' | b';'))
            }
            None => false,
        })
}

/// The gate's own answer with `status` and `message`: JSON `{"message"}`, or for a gRPC
/// call a gRPC status, as a gRPC client reads no other error (see [`grpc_status`]).
fn answer(grpc: bool, status: StatusCode, message: &str) -> Response<ProxyBody> {
    if grpc {
        grpc_status(status, message)
    } else {
        json(status, message)
    }
}

/// A gRPC "Trailers-Only" response: HTTP 200 whose head carries `grpc-status` (the code
/// gRPC maps `status` to, in its HTTP-to-gRPC table) and `grpc-message`, with no body.
fn grpc_status(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let code: u16 = match status.as_u16() {
        400 => 13,                   // INTERNAL
        401 => 16,                   // UNAUTHENTICATED
        403 => 7,                    // PERMISSION_DENIED
        404 => 12,                   // UNIMPLEMENTED
        429 | 502 | 503 | 504 => 14, // UNAVAILABLE
        _ => 2,                      // UNKNOWN
    };
    // grpc-message is percent-encoded: printable ASCII but `%` as it is.
    let encoded: String = message
        .bytes()
        .map(|b| match b {
            b' '..=b'~' if b != b'%' => char::from(b).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let mut response = Response::new(Empty::new().map_err(|e| match e {}).boxed());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from(code));
    if let Ok(message) = HeaderValue::from_str(&encoded) {
        headers.insert("grpc-message", message);
    }
    response
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
        max_headers: MAX_REQUEST_HEADERS,
        ..charter_runtime::http::Limits::share_of_file_limit(1.0 / 3.0)
    };
    let make = move |peer: SocketAddr| {
        let (gate, lane) = (gate.clone(), gate.lane(peer));
        hyper::service::service_fn(move |request| gate.clone().handle(request, peer, lane.clone()))
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
                host: "127.0.0.1".into(),
                port: 8080,
                base_path: String::new(),
                http2: false,
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
        let h2c = Upstream::parse("h2c://grpc:50051").expect("ok");
        assert!(h2c.http2 && h2c.address == "grpc:50051");
        assert_eq!(h2c.url(), "h2c://grpc:50051");
        assert!(!Upstream::parse("http://svc").expect("ok").http2);
        assert!(Upstream::parse("https://svc")
            .unwrap_err()
            .contains("not supported"));
        assert!(Upstream::parse("svc:80").is_err());
        assert!(Upstream::parse("http://svc/?a=b")
            .unwrap_err()
            .contains("query"));
    }

    #[test]
    fn locations_at_the_upstream_point_at_the_gate() {
        let check_as = |scheme: &str, upstream: &str, location: &str, expected: Option<&str>| {
            let upstream = Upstream::parse(upstream).expect("url");
            assert_eq!(
                upstream
                    .rewrite_location(location, scheme, "gate.test:8000")
                    .as_deref(),
                expected,
                "{location} from {upstream:?}"
            );
        };
        let check = |upstream: &str, location: &str, expected: Option<&str>| {
            check_as("http", upstream, location, expected);
        };
        let up = "http://127.0.0.1:9000";
        check(
            up,
            "http://127.0.0.1:9000/get?a=1#top",
            Some("http://gate.test:8000/get?a=1#top"),
        );
        check(up, "HTTP://127.0.0.1:9000", Some("http://gate.test:8000/"));
        check(
            up,
            "http://127.0.0.1:9000?x",
            Some("http://gate.test:8000/?x"),
        );
        check(up, "http://127.0.0.1:9001/get", None);
        check(up, "http://example.com/get", None);
        // An upstream told `X-Forwarded-Proto: https` links over https, with the port of
        // the Host it got or none; the client gets the scheme the upstream was told.
        check_as(
            "https",
            up,
            "https://127.0.0.1:9000/get",
            Some("https://gate.test:8000/get"),
        );
        check_as(
            "https",
            up,
            "https://127.0.0.1/get",
            Some("https://gate.test:8000/get"),
        );
        check_as("https", up, "https://127.0.0.1:9001/get", None);
        check_as("https", up, "https://example.com/get", None);
        check(up, "http://127.0.0.1/get", None);
        check(up, "/relative", None);
        check(up, "http://user@127.0.0.1:9000/get", None);
        // No port means 80, either way round; host names compare without case.
        check(
            "http://App",
            "http://app:80/x",
            Some("http://gate.test:8000/x"),
        );
        check(
            "http://app:80",
            "http://APP/x",
            Some("http://gate.test:8000/x"),
        );
        // Under a base path only, which the client does not see.
        let api = "http://app/api";
        check(
            api,
            "http://app/api/v1?q",
            Some("http://gate.test:8000/v1?q"),
        );
        check(api, "http://app/api", Some("http://gate.test:8000/"));
        check(api, "http://app/api2", None);
        check(api, "http://app/other", None);
        check(
            "http://[::1]:9000",
            "http://[::1]:9000/x",
            Some("http://gate.test:8000/x"),
        );
    }

    #[test]
    fn trusted_proxy_blocks() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let block = Cidr::parse("10.1.0.0/16").expect("cidr");
        assert!(block.contains(ip("10.1.200.3")));
        assert!(block.contains(ip("::ffff:10.1.0.1")));
        assert!(!block.contains(ip("10.2.0.1")));
        assert!(!block.contains(ip("::1")));
        let one = Cidr::parse("127.0.0.1").expect("cidr");
        assert!(one.contains(ip("127.0.0.1")) && !one.contains(ip("127.0.0.2")));
        assert!(Cidr::parse("0.0.0.0/0")
            .expect("all")
            .contains(ip("8.8.8.8")));
        let v6 = Cidr::parse("fd00::/8").expect("cidr");
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        assert_eq!(v6.to_string(), "fd00::/8");
        let refused = |text: &str, says: &str| {
            let e = Cidr::parse(text).expect_err(text);
            assert!(e.contains(says), "{text}: {e}");
        };
        refused("10.1.2.3/16", "write 10.1.0.0/16");
        refused("10.0.0.0/33", "from 0 to 32");
        refused("fd00::/129", "from 0 to 128");
        refused("10.0.0.0/x", "prefix length");
        refused("proxy.local/24", "not an IPv4 or IPv6 address");
        refused("", "not an IPv4 or IPv6 address");
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
        // A second `Connection` line, tokens in any case, empty ones, and one naming a
        // field hop-by-hop anyway.
        headers.append(
            "connection",
            HeaderValue::from_static("Close,, X-Other ,TE"),
        );
        headers.insert("x-other", HeaderValue::from_static("2"));
        headers.insert("te", HeaderValue::from_static("trailers"));
        // A field named as a connection option `close` (the name is reserved for it).
        headers.insert("close", HeaderValue::from_static("3"));
        let hops = Fields::of(&headers).hops;
        assert!(
            strip_hop_by_hop(&mut headers, hops),
            "Connection named fields"
        );
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert_eq!(headers["x-kept"], "yes");
    }

    /// `Fields::of` matches names by their text: it must know every name of the lists
    /// the gate acts on, in `HOP_BY_HOP`'s order, and nothing else.
    #[test]
    fn fields_know_the_names_the_gate_acts_on() {
        let only = |name: &HeaderName| {
            let mut headers = HeaderMap::new();
            headers.insert(name.clone(), HeaderValue::from_static("1"));
            Fields::of(&headers)
        };
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            let mut hops = [false; HOPS];
            hops[i] = true;
            assert_eq!(
                only(name),
                Fields {
                    hops,
                    ..Fields::default()
                },
                "{name}"
            );
        }
        assert_eq!(HOP_BY_HOP[TE], header::TE);
        for name in &CLAIMED_BY_PROXIES {
            let fields = only(name);
            assert!(fields.claimed, "{name}");
            assert_eq!(fields.forwarded_host, name == X_FORWARDED_HOST, "{name}");
        }
        assert!(only(&X_FORWARDED_PROTO).forwarded_proto);
        assert!(!only(&X_FORWARDED_FOR).claimed);
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            assert_eq!(
                only(&name),
                Fields {
                    location: true,
                    ..Fields::default()
                }
            );
        }
        assert_eq!(
            only(&header::CONTENT_TYPE),
            Fields {
                content_type: true,
                ..Fields::default()
            }
        );
        assert_eq!(
            only(&header::VIA),
            Fields {
                via: true,
                ..Fields::default()
            }
        );
        for name in [header::HOST, HeaderName::from_static("x-kept")] {
            assert_eq!(only(&name), Fields::default(), "{name}");
        }
    }

    #[test]
    fn via_names_this_gate_only_as_a_recipient() {
        let node = Uuid::parse_str("1a2b3c4d-0000-4000-8000-000000000000").expect("uuid");
        let via = Via::of(node);
        assert_eq!(via.value(Version::HTTP_11), "1.1 charter-1a2b3c4d");
        assert_eq!(via.value(Version::HTTP_2), "2 charter-1a2b3c4d");
        assert_eq!(via.value(Version::HTTP_10), "1.0 charter-1a2b3c4d");
        let named = |values: &[&'static str]| {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append(header::VIA, HeaderValue::from_static(v));
            }
            via.named_in(&headers)
        };
        assert!(named(&["1.1 charter-1a2b3c4d"]));
        assert!(named(&["1.0 lb, HTTP/1.1 CHARTER-1A2B3C4D (note)"]));
        assert!(named(&["1.1 lb", "2  charter-1a2b3c4d"]));
        // A comma inside a comment (nested, or escaped) does not start an entry; one
        // after it does.
        assert!(named(&["1.1 lb (a, (b, c) \\) d), 1.1\tcharter-1a2b3c4d"]));
        // Bytes beyond ASCII in another entry's comment (obs-text) are no reason to
        // miss this gate's entry.
        let mut headers = HeaderMap::new();
        headers.append(
            header::VIA,
            HeaderValue::from_bytes(b"1.1 lb (caf\xe9), 1.1 charter-1a2b3c4d").expect("obs-text"),
        );
        assert!(via.named_in(&headers));
        for other in [
            "1.1 charter-1a2b3c4e",
            "1.1 charter-1a2b3c4d0",
            "1.1 charter",
            "charter-1a2b3c4d",
            "1.1 lb (charter-1a2b3c4d)",
            "1.1 lb (note, 1.1 charter-1a2b3c4d (x))",
            "1.1 lb (note \\) , 1.1 charter-1a2b3c4d )",
            "",
        ] {
            assert!(!named(&[other]), "{other}");
        }
        assert!(!named(&[]));
    }

    #[test]
    fn grpc_calls_are_known_by_their_content_type() {
        let with = |content_type: &'static str| {
            let request = Request::builder()
                .header(header::CONTENT_TYPE, content_type)
                .body(())
                .expect("a request");
            is_grpc(&request)
        };
        for grpc in [
            "application/grpc",
            "Application/GRPC+proto",
            "application/grpc;charset=utf-8",
        ] {
            assert!(with(grpc), "{grpc}");
        }
        for other in [
            "application/grpcx",
            "application/json",
            "application/grp",
            "",
        ] {
            assert!(!with(other), "{other}");
        }
        assert!(!is_grpc(&Request::new(())));
        // Not text: not taken for gRPC.
        let opaque = Request::builder()
            .header(
                header::CONTENT_TYPE,
                HeaderValue::from_bytes(b"application/grpc;x=\xe9").expect("a value"),
            )
            .body(())
            .expect("a request");
        assert!(!is_grpc(&opaque));
    }
}
