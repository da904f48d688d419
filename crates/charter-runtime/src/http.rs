//! Serving HTTP on a listener without letting clients hold the process: the accept loop and
//! connection driver every HTTP listener of Charter uses (the control plane's admin API,
//! the data plane's status API and gate).
//!
//! - **Connections are capped** ([`Limits::max_connections`], a share of the process's
//!   file limit), so a flood of connections on one listener cannot take the file handles
//!   another listener (the cluster port) needs. A connection accepted at the cap waits for
//!   a slot, and the loop accepts no other meanwhile (the rest wait in the kernel's
//!   backlog); while it waits, the connection idle the longest (no request in flight for
//!   at least [`EVICT_AFTER`]) is asked to close, as nginx reuses idle keep-alive
//!   connections. A connection is never closed to make room for itself, nor before it
//!   has had [`EVICT_AFTER`] to send its first request.
//! - **Idle connections are closed** after [`Limits::idle`]: an HTTP/1 connection that has
//!   not sent a complete request head by then (a new one, or one between requests) is
//!   closed by hyper's header timer; any connection (HTTP/2 too) with no request in flight
//!   for that long is shut down gracefully, and closed outright when still open
//!   [`Limits::idle`] later.
//! - **A request body that stops arriving fails**: a handler that waits [`Limits::idle`]
//!   for the next piece of a request body gets an error instead ([`RequestBody`]), so a
//!   client trickling a body cannot hold a connection (and its request "in flight") for
//!   ever. A slow download is never cut: only the client's silence counts.
//! - **Request heads as large as nginx takes**: up to [`Limits::max_headers`] fields in
//!   HTTP/1 ([`MAX_REQUEST_HEADERS`] unless the listener says otherwise) and
//!   [`MAX_HEADER_LIST_SIZE`] bytes of them in HTTP/2; a larger head is a 431.
//! - **An accept error never ends the loop**: it is logged and retried after a pause (out
//!   of file handles, the usual one, passes as connections close).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

/// How long a connection may stay without a request in flight (or an HTTP/1 connection
/// without a complete request head) before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Most header fields in a request head (HTTP/1; hyper's default is 100). nginx bounds a
/// request head by size (`large_client_header_buffers`, 4 × 8 KiB), not by count, and a
/// head of that size holds this many short fields at most about.
pub const MAX_REQUEST_HEADERS: usize = 1000;

/// Most bytes of header fields in an HTTP/2 request (`SETTINGS_MAX_HEADER_LIST_SIZE`;
/// hyper's default is 16 KiB), nginx's 4 × 8 KiB and more.
pub const MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;

/// How long a connection must have been without a request in flight before it may be
/// closed to make room for a new one at the cap.
pub const EVICT_AFTER: Duration = Duration::from_secs(1);

/// How often a connection waiting for a slot at the cap looks again for one to close.
const EVICT_RETRY: Duration = Duration::from_millis(250);

/// How long to wait after an accept error before accepting again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// File handles kept out of every listener's share, for the store, logs, the cluster
/// port's handshakes and the data plane's cache.
const RESERVED_FILES: usize = 64;

/// What one listener allows its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Close a connection idle this long.
    pub idle: Duration,
    /// Accept at most this many connections at once.
    pub max_connections: usize,
    /// Most header fields in an HTTP/1 request head. hyper sets aside room for this many
    /// on every request it parses (a heap block of 32 bytes per field beyond 100), so a
    /// listener on a hot path takes fewer.
    pub max_headers: usize,
}

impl Limits {
    /// The idle timeout of [`IDLE_TIMEOUT`] and `share` of the process's open-file limit
    /// (less a reserve) as the connection cap, at least 4.
    pub fn share_of_file_limit(share: f64) -> Limits {
        let usable = file_limit().saturating_sub(RESERVED_FILES) as f64;
        Limits {
            idle: IDLE_TIMEOUT,
            max_connections: ((usable * share) as usize).max(4),
            max_headers: MAX_REQUEST_HEADERS,
        }
    }
}

/// The process's soft limit on open files (`RLIMIT_NOFILE`), from `/proc/self/limits`;
/// 1024 when it cannot be read.
pub fn file_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_owned))
        })
        .and_then(|soft| soft.parse().ok())
        .unwrap_or(1024)
}

/// Accepts connections on `listener` under `limits` and serves each with the service
/// `make` returns for its peer, until `shutdown` turns true; then stops accepting, lets
/// every connection finish what it is doing (each is told to close) and returns.
/// `name` names the listener in the log.
///
/// At the cap, the connection idle the longest (no request in flight) is closed to make
/// room, as nginx reuses idle keep-alive connections; when none is idle, new connections
/// wait in the backlog until one ends.
pub async fn serve<M, S, B>(
    name: &'static str,
    listener: TcpListener,
    limits: Limits,
    make: M,
    mut shutdown: watch::Receiver<bool>,
) where
    M: Fn(SocketAddr) -> S,
    S: hyper::service::Service<Request<RequestBody>, Response = Response<B>, Error = Infallible>
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let live = Arc::new(Live::default());
    let mut warned_full = false;
    loop {
        if *shutdown.borrow() {
            break;
        }
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(listener = name, error = %e, "cannot accept a connection; retrying");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            changed = shutdown.changed() => match changed {
                Ok(()) => continue,
                // The sender is gone: nobody can tell this loop to stop any more, so stop.
                Err(_) => break,
            },
        };
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                warned_full = false;
                slot
            }
            Err(_) => {
                if !warned_full {
                    tracing::warn!(
                        listener = name,
                        max = limits.max_connections,
                        "connection limit reached: closing the longest-idle connections to make room"
                    );
                    warned_full = true;
                }
                match wait_for_slot(&slots, &live, &mut shutdown).await {
                    Some(slot) => slot,
                    // Shutting down: the waiting connection is dropped unserved.
                    None => break,
                }
            }
        };
        // Small answers matter more than packet counts; failing only costs latency.
        let _ = stream.set_nodelay(true);
        let service = make(peer);
        let (id, activity, evict) = live.register();
        let (live, shutdown) = (live.clone(), shutdown.clone());
        tokio::spawn(async move {
            drive(stream, service, limits, shutdown, activity, evict).await;
            live.unregister(id);
            drop(slot);
        });
    }
    // Every connection returns its slot when it ends.
    let _ = slots.acquire_many(limits.max_connections as u32).await;
}

/// Waits for a free slot for a connection accepted at the cap, asking the longest-idle
/// connection to close now and every [`EVICT_RETRY`] while none is free (none may be idle
/// long enough yet). `None` when `shutdown` turns true (or its sender is gone) first.
async fn wait_for_slot(
    slots: &Arc<Semaphore>,
    live: &Live,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    let mut retry = tokio::time::interval(EVICT_RETRY);
    loop {
        tokio::select! {
            slot = slots.clone().acquire_owned() => return slot.ok(),
            _ = retry.tick() => {
                live.evict_longest_idle();
            }
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    return None;
                }
            }
        }
    }
}

/// The connections of one listener, to find the longest-idle one at the cap.
#[derive(Default)]
struct Live {
    connections: std::sync::Mutex<(u64, std::collections::HashMap<u64, Connection>)>,
}

struct Connection {
    activity: Arc<Activity>,
    evict: Arc<tokio::sync::Notify>,
    /// Told to close to make room (it stays listed until it has).
    evicted: bool,
}

impl Live {
    fn register(&self) -> (u64, Arc<Activity>, Arc<tokio::sync::Notify>) {
        let mut guard = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        let (next, connections) = &mut *guard;
        *next += 1;
        let activity = Arc::new(Activity::born_now());
        let evict = Arc::new(tokio::sync::Notify::new());
        connections.insert(
            *next,
            Connection {
                activity: activity.clone(),
                evict: evict.clone(),
                evicted: false,
            },
        );
        (*next, activity, evict)
    }

    fn unregister(&self, id: u64) {
        let mut guard = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        guard.1.remove(&id);
    }

    /// Tells the connection idle the longest, if it has been for [`EVICT_AFTER`] at least,
    /// to close; whether there was one. A connection told so is no longer a candidate.
    fn evict_longest_idle(&self) -> bool {
        let mut guard = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        let longest = guard
            .1
            .iter()
            .filter(|(_, c)| !c.evicted)
            .map(|(id, c)| (c.activity.idle_for(), *id))
            .filter(|(idle, _)| *idle >= EVICT_AFTER)
            .max();
        match longest.and_then(|(_, id)| guard.1.get_mut(&id)) {
            Some(connection) => {
                connection.evicted = true;
                connection.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Serves one connection (HTTP/1.1 or HTTP/2 cleartext) until it ends, it is idle for
/// `idle`, `evict` is notified, or `shutdown` turns true.
async fn drive<S, B>(
    stream: TcpStream,
    service: S,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
    activity: Arc<Activity>,
    evict: Arc<tokio::sync::Notify>,
) where
    S: hyper::service::Service<Request<RequestBody>, Response = Response<B>, Error = Infallible>
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (idle, max_headers) = (limits.idle, limits.max_headers);
    let counted = Counted {
        inner: Arc::new(service),
        activity: activity.clone(),
        idle,
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(HeadTimer::default())
        .header_read_timeout(idle)
        .max_headers(max_headers);
    // No HTTP/2 keep-alive pings: a PING queued behind a slow download would not be
    // answered in time and would cut the download; idleness is judged by requests.
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_LIST_SIZE);
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), counted);
    tokio::pin!(connection);
    // The connection's task polls the connection and the control word only: the
    // watcher's futures (two `Notify` waits, each taking a lock, and a timer) would
    // otherwise be polled at every wake-up of this task, several times per request.
    let control = Arc::new(Control::default());
    let watcher = tokio::spawn(watch_connection(
        control.clone(),
        limits.idle,
        shutdown,
        activity,
        evict,
    ));
    let _watcher = AbortOnDrop(watcher);
    loop {
        tokio::select! {
            biased;
            _ = connection.as_mut() => return,
            told = std::future::poll_fn(|cx| control.poll(cx)) => {
                if told & DROP != 0 {
                    return;
                }
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

/// What a connection's watcher ([`watch_connection`]) tells its task ([`drive`]):
/// [`CLOSE`] (close gracefully: finish the request in flight, take no more) and [`DROP`]
/// (close now), as bits of one word, and the task's waker.
#[derive(Default)]
struct Control {
    told: AtomicU8,
    waker: atomic_waker::AtomicWaker,
}

/// Close the connection gracefully.
const CLOSE: u8 = 1;
/// Drop the connection now.
const DROP: u8 = 2;

impl Control {
    fn tell(&self, what: u8) {
        self.told.fetch_or(what, Ordering::AcqRel);
        self.waker.wake();
    }

    /// What the watcher told since the last time, once it told anything.
    fn poll(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<u8> {
        if self.told.load(Ordering::Acquire) == 0 {
            self.waker.register(cx.waker());
            // Told between the load and the registration: not woken for it.
            if self.told.load(Ordering::Acquire) == 0 {
                return std::task::Poll::Pending;
            }
        }
        std::task::Poll::Ready(self.told.swap(0, Ordering::AcqRel))
    }
}

/// Aborts a task when dropped: a connection's watcher ends with the connection.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Watches one connection, in a task of its own, and tells its task through `control`
/// when to close: gracefully when `evict` is notified, `shutdown` turns true, or it has
/// been `idle` that long; at once when told to close to make room and still idle
/// [`EVICT_AFTER`] later, or told to close and still open a whole `idle` later.
async fn watch_connection(
    control: Arc<Control>,
    idle: Duration,
    mut shutdown: watch::Receiver<bool>,
    activity: Arc<Activity>,
    evict: Arc<tokio::sync::Notify>,
) {
    // However the watcher ends (a panic too), the connection is not left unwatched.
    let _drop = TellOnDrop(control.clone());
    // When the connection was told to close (graceful shutdown), if it was.
    let mut closing: Option<tokio::time::Instant> = None;
    let close = |closing: &mut Option<tokio::time::Instant>| {
        control.tell(CLOSE);
        *closing = Some(tokio::time::Instant::now());
    };
    let mut check = tokio::time::interval(idle / 4);
    // Told to close to make room: closed outright after EVICT_AFTER unless a request has
    // slipped in meanwhile (it then gets until the usual deadline).
    let evicting = tokio::time::sleep(Duration::MAX / 4);
    tokio::pin!(evicting);
    let mut evicted = false;
    loop {
        tokio::select! {
            () = evict.notified(), if closing.is_none() => {
                close(&mut closing);
                evicting.as_mut().reset(tokio::time::Instant::now() + EVICT_AFTER);
                evicted = true;
            }
            () = evicting.as_mut(), if evicted => {
                if activity.in_flight.load(Ordering::Acquire) == 0 {
                    break;
                }
                evicted = false;
            }
            _ = shutdown.changed(), if closing.is_none() => close(&mut closing),
            _ = check.tick() => {
                match closing {
                    // Told to close and still open a whole period later: drop it.
                    Some(since) if since.elapsed() >= idle => break,
                    Some(_) => {}
                    None if activity.idle_for() >= idle => close(&mut closing),
                    None => {}
                }
            }
        }
    }
}

/// Tells a connection's task to drop the connection when the watcher ends.
struct TellOnDrop(Arc<Control>);

impl Drop for TellOnDrop {
    fn drop(&mut self) {
        self.0.tell(DROP);
    }
}

/// hyper's timer for an HTTP/1 connection, which times the reading of each request head
/// with it: one tokio timer per connection, for every head. hyper asks for a new sleep
/// for every request; a tokio timer made for each would be put in the runtime's timer
/// wheel and taken out again every time (a lock each), while one left at an earlier
/// head's deadline is moved on only when that deadline comes ([`HeadSleep`]).
#[derive(Clone, Default)]
struct HeadTimer {
    timer: Arc<std::sync::Mutex<Option<std::pin::Pin<Box<tokio::time::Sleep>>>>>,
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> std::pin::Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(std::time::Instant::now() + duration)
    }

    fn sleep_until(
        &self,
        deadline: std::time::Instant,
    ) -> std::pin::Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HeadSleep {
            deadline: deadline.into(),
            timer: self.timer.clone(),
        })
    }
}

/// A sleep until `deadline` on a connection's [`HeadTimer`].
struct HeadSleep {
    deadline: tokio::time::Instant,
    timer: Arc<std::sync::Mutex<Option<std::pin::Pin<Box<tokio::time::Sleep>>>>>,
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let mut timer = self.timer.lock().unwrap_or_else(|p| p.into_inner());
        let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(self.deadline)));
        // Each head's deadline is later than the one before: the timer is left at the
        // earlier one, and moved on only when that comes while this head is awaited (a
        // reset works out the timer wheel's tick, every time).
        if timer.deadline() > self.deadline {
            timer.as_mut().reset(self.deadline);
        }
        loop {
            std::task::ready!(timer.as_mut().poll(cx));
            if timer.deadline() >= self.deadline {
                return std::task::Poll::Ready(());
            }
            timer.as_mut().reset(self.deadline);
        }
    }
}

impl hyper::rt::Sleep for HeadSleep {}

/// When a connection last had a request in flight.
#[derive(Default)]
struct Activity {
    in_flight: AtomicUsize,
    /// When the connection was accepted or its last request started or ended.
    last: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl Activity {
    /// A connection just accepted: its idle time counts from now.
    fn born_now() -> Activity {
        Activity {
            in_flight: AtomicUsize::new(0),
            last: std::sync::Mutex::new(Some(tokio::time::Instant::now())),
        }
    }

    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(tokio::time::Instant::now());
    }

    /// How long the connection has had no request in flight (zero while one is).
    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.map_or(Duration::ZERO, |last| last.elapsed())
    }
}

/// Counts a request in flight from its call until its response body has been sent (or
/// dropped).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: &Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.touch();
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Counted<S> {
    inner: Arc<S>,
    activity: Arc<Activity>,
    /// How long a request body may keep the handler waiting.
    idle: Duration,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Counted<S>
where
    S: hyper::service::Service<Request<RequestBody>, Response = Response<B>, Error = Infallible>,
    S::Future: Send + 'static,
    B: Body + Unpin,
{
    type Response = Response<Tracked<B>>;
    type Error = Infallible;
    type Future = CountedFuture<S::Future>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let in_flight = InFlight::start(&self.activity);
        let idle = self.idle;
        // Boxed once, where it is made: hyper moves the service's future into its own
        // place, and a large future (the gate's) costs a copy at every move.
        let response = Box::pin(
            self.inner
                .call(request.map(|body| RequestBody::new(body, idle))),
        );
        CountedFuture {
            response,
            in_flight: Some(in_flight),
        }
    }
}

/// The future of a [`Counted`] service's call: the inner service's response, its body
/// [`Tracked`].
pub struct CountedFuture<F> {
    response: std::pin::Pin<Box<F>>,
    in_flight: Option<InFlight>,
}

impl<F, B> Future for CountedFuture<F>
where
    F: Future<Output = Result<Response<B>, Infallible>>,
{
    type Output = Result<Response<Tracked<B>>, Infallible>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let Ok(response) = std::task::ready!(self.response.as_mut().poll(cx));
        let in_flight = self.in_flight.take();
        std::task::Poll::Ready(Ok(response.map(|body| Tracked {
            inner: body,
            in_flight,
        })))
    }
}

/// A response body that keeps its request counted in flight until it ends.
pub struct Tracked<B> {
    inner: B,
    in_flight: Option<InFlight>,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(None | Some(Err(_))) = &polled {
            self.in_flight = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A request's body as [`serve`] hands it to the service: hyper's body, failing with
/// [`BodyStalled`] when the handler has waited [`Limits::idle`] for its next piece (the
/// client has sent nothing since). The wait counts only while the handler waits for the
/// body, so a handler slow to read it is never blamed on the client.
pub struct RequestBody {
    inner: Incoming,
    idle: Duration,
    /// Armed while the last poll found nothing ready.
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    waiting: bool,
}

impl RequestBody {
    fn new(inner: Incoming, idle: Duration) -> RequestBody {
        RequestBody {
            inner,
            idle,
            stalled: None,
            waiting: false,
        }
    }
}

/// The error of a [`RequestBody`] whose client stopped sending it.
#[derive(Debug)]
pub struct BodyStalled(pub Duration);

impl std::fmt::Display for BodyStalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the client sent nothing of the request body for {} s",
            self.0.as_secs()
        )
    }
}

impl std::error::Error for BodyStalled {}

impl Body for RequestBody {
    type Data = hyper::body::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.waiting = false;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let deadline = tokio::time::Instant::now() + this.idle;
                let sleep = match &mut this.stalled {
                    Some(sleep) => {
                        if !this.waiting {
                            sleep.as_mut().reset(deadline);
                        }
                        sleep
                    }
                    None => this
                        .stalled
                        .insert(Box::pin(tokio::time::sleep_until(deadline))),
                };
                this.waiting = true;
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyStalled(this.idle))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// [`serve`] for an axum `Router`: each request carries its peer as
/// `axum::extract::ConnectInfo<SocketAddr>`, as `into_make_service_with_connect_info` gives.
pub async fn serve_router(
    name: &'static str,
    listener: TcpListener,
    limits: Limits,
    router: axum::Router,
    shutdown: watch::Receiver<bool>,
) {
    let make = move |peer: SocketAddr| {
        let router = router.clone();
        hyper::service::service_fn(move |mut request: Request<RequestBody>| {
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            let router = router.clone();
            async move {
                use tower::ServiceExt;
                router.oneshot(request.map(axum::body::Body::new)).await
            }
        })
    };
    serve(name, listener, limits, make, shutdown).await;
}
