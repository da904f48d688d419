//! The baseline servers, each run as its own process (hidden subcommands) the way the
//! server it is compared with runs (a default multi-threaded Tokio runtime):
//!
//! - `hello`: an axum hello-world answering constant JSON bodies (`GET /record`,
//!   `GET /page`), so against the control plane only the handler's work differs;
//! - `relay`: a bare TCP relay to an upstream, with no HTTP at all: what any proxy on the
//!   gate's path costs (two more loopback hops, their reads, writes and wake-ups); with
//!   `--http`, the least an HTTP/1.1 proxy built on hyper does (each client connection
//!   gets an upstream connection of its own, each request is parsed, sent on and its
//!   response streamed back as it is): the floor of the gate, which is built on hyper;
//! - `fanout-baseline`: a minimal tonic server of the same `Cluster` service in the style
//!   of tonic's streaming example (one task and one channel per stream, each message
//!   encoded per stream; no store, no verification), with the control plane's mTLS and
//!   tonic settings. `POST /push` with a license record sends a snapshot of it to every
//!   stream and answers 201 once it is queued on all of them; `GET /ready` answers 200.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{ensure, Context, Result};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use charter_proto::v1::cluster_server::{Cluster, ClusterServer};
use charter_proto::v1::{
    control_plane_message, ControlPlaneMessage, DataPlaneMessage, License, Snapshot,
};
use charter_tls::{MtlsMode, TlsFiles};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Flags of the hidden `hello` subcommand.
#[derive(Debug, clap::Args)]
pub struct HelloArgs {
    /// Address to listen on (loopback only).
    #[arg(long)]
    pub listen: SocketAddr,
    /// The body of `GET /record`.
    #[arg(long)]
    pub record: PathBuf,
    /// The body of `GET /page`.
    #[arg(long)]
    pub page: PathBuf,
}

/// Flags of the hidden `relay` subcommand.
#[derive(Debug, clap::Args)]
pub struct RelayArgs {
    /// Address to listen on (loopback only).
    #[arg(long)]
    pub listen: SocketAddr,
    /// The upstream every connection is relayed to (loopback only).
    #[arg(long)]
    pub upstream: SocketAddr,
    /// Relay HTTP/1.1 requests with hyper instead of bytes.
    #[arg(long)]
    pub http: bool,
    /// With `--http`: the most header fields in a request or response head (hyper's limit,
    /// as the gate sets it). Default: hyper's own (100, kept on the stack).
    #[arg(long, requires = "http", value_parser = crate::harness::range::<usize>(1, 10_000))]
    pub max_headers: Option<usize>,
}

/// Flags of the hidden `fanout-baseline` subcommand.
#[derive(Debug, clap::Args)]
pub struct FanoutBaselineArgs {
    /// The trigger's HTTP address.
    #[arg(long)]
    pub listen: SocketAddr,
    /// The gRPC (cluster) address.
    #[arg(long)]
    pub cluster_listen: SocketAddr,
    /// The shared cluster certificate.
    #[arg(long)]
    pub cluster_cert: PathBuf,
    /// Its key.
    #[arg(long)]
    pub cluster_cert_key: PathBuf,
}

/// Runs `serve` on a runtime like `charter-cp`'s (`Runtime::new()`, one worker per CPU),
/// after checking `addrs` are loopback.
fn serve(addrs: &[SocketAddr], serve: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    serve_on(tokio::runtime::Runtime::new(), addrs, serve)
}

/// Runs `serve` on `runtime`, after checking `addrs` are loopback.
fn serve_on(
    runtime: std::io::Result<tokio::runtime::Runtime>,
    addrs: &[SocketAddr],
    serve: impl std::future::Future<Output = Result<()>>,
) -> Result<()> {
    for addr in addrs {
        ensure!(
            addr.ip().is_loopback(),
            "the baselines only use loopback, not {addr}"
        );
    }
    runtime
        .context("starting the async runtime")?
        .block_on(serve)
}

/// Serves the hello-world until killed.
pub fn hello(args: HelloArgs) -> Result<()> {
    let read =
        |path: &PathBuf| std::fs::read(path).with_context(|| format!("reading {}", path.display()));
    let (record, page) = (
        Bytes::from(read(&args.record)?),
        Bytes::from(read(&args.page)?),
    );
    let json = |body: Bytes| {
        move || std::future::ready(([(header::CONTENT_TYPE, "application/json")], body.clone()))
    };
    let app = Router::new()
        .route("/record", get(json(record)))
        .route("/page", get(json(page)));
    serve(&[args.listen], async move {
        let listener = TcpListener::bind(args.listen).await.context("binding")?;
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        axum::serve(listener, app).await.context("serving")
    })
}

/// Serves the relay until killed.
pub fn relay(args: RelayArgs) -> Result<()> {
    let (upstream, http, max_headers) = (args.upstream, args.http, args.max_headers);
    // The runtime charter-dp's gate picks: one thread when pinned to one CPU.
    let runtime = match std::thread::available_parallelism().is_ok_and(|n| n.get() == 1) {
        true => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        false => tokio::runtime::Runtime::new(),
    };
    serve_on(runtime, &[args.listen, upstream], async move {
        let listener = TcpListener::bind(args.listen).await.context("binding")?;
        loop {
            let (mut client, peer) = listener.accept().await.context("accepting")?;
            tokio::spawn(async move {
                let relayed = async {
                    client.set_nodelay(true)?;
                    let mut server = TcpStream::connect(upstream).await?;
                    server.set_nodelay(true)?;
                    if http {
                        return http_relay(client, server, max_headers)
                            .await
                            .map_err(std::io::Error::other);
                    }
                    tokio::io::copy_bidirectional(&mut client, &mut server)
                        .await
                        .map(drop)
                };
                if let Err(e) = relayed.await {
                    eprintln!("relay: connection from {peer}: {e}");
                }
            });
        }
    })
}

/// Serves `client`'s HTTP/1.1 requests by sending each on `server` with hyper, as they
/// are, and streaming the response back.
async fn http_relay(
    client: TcpStream,
    server: TcpStream,
    max_headers: Option<usize>,
) -> hyper::Result<()> {
    use hyper_util::rt::TokioIo;
    let mut client_builder = hyper::client::conn::http1::Builder::new();
    let mut server_builder = hyper::server::conn::http1::Builder::new();
    if let Some(max) = max_headers {
        client_builder.max_headers(max);
        server_builder.max_headers(max);
    }
    let (sender, connection) = client_builder.handshake(TokioIo::new(server)).await?;
    tokio::spawn(connection);
    let sender = Arc::new(tokio::sync::Mutex::new(sender));
    let service = hyper::service::service_fn(move |request| {
        let sender = sender.clone();
        async move {
            let mut sender = sender.lock().await;
            sender.ready().await?;
            sender.send_request(request).await
        }
    });
    server_builder
        .serve_connection(TokioIo::new(client), service)
        .await
}

type Message = Result<ControlPlaneMessage, Status>;

#[derive(Clone, Default)]
struct Baseline(Arc<Mutex<Shared>>);

#[derive(Default)]
struct Shared {
    streams: Vec<mpsc::Sender<Message>>,
    revision: u64,
    license: Option<License>,
}

impl Baseline {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Shared {
    fn current(&self) -> ControlPlaneMessage {
        ControlPlaneMessage {
            msg: Some(control_plane_message::Msg::Snapshot(Snapshot {
                // A UUID's length, as the control plane's epoch.
                epoch: "00000000-0000-4000-8000-000000000000".to_owned(),
                revision: self.revision,
                license: self.license.clone(),
            })),
        }
    }
}

#[tonic::async_trait]
impl Cluster for Baseline {
    type SyncStream = ReceiverStream<Message>;

    async fn sync(
        &self,
        request: Request<Streaming<DataPlaneMessage>>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let mut inbound = request.into_inner();
        // Hello first, as the protocol says; its content does not matter here.
        inbound.message().await?;
        let (tx, rx) = mpsc::channel(4);
        let current = self.lock().current();
        tx.send(Ok(current))
            .await
            .map_err(|_| Status::internal("stream closed"))?;
        self.lock().streams.push(tx.clone());
        // The stream's task: reads what the data plane sends (Acks) until it goes away.
        tokio::spawn(async move {
            while let Ok(Some(_)) = inbound.message().await {}
            drop(tx);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

async fn push(State(baseline): State<Baseline>, Json(record): Json<Value>) -> StatusCode {
    let field = |name: &str| record[name].as_str().unwrap_or_default().to_owned();
    let (message, streams) = {
        let mut shared = baseline.lock();
        shared.revision += 1;
        shared.license = Some(License {
            id: field("id"),
            payload: field("payload"),
            created_at: record["created_at"].as_i64().unwrap_or_default(),
            updated_at: record["updated_at"].as_i64().unwrap_or_default(),
        });
        shared.streams.retain(|tx| !tx.is_closed());
        (shared.current(), shared.streams.clone())
    };
    for tx in streams {
        let _ = tx.send(Ok(message.clone())).await;
    }
    StatusCode::CREATED
}

/// Serves the fan-out baseline until killed.
pub fn fanout_baseline(args: FanoutBaselineArgs) -> Result<()> {
    charter_tls::install_default_provider();
    let files = TlsFiles {
        cert: args.cluster_cert,
        key: args.cluster_cert_key,
        ca: None,
    };
    let tls = charter_tls::server_config(MtlsMode::Shared, &files)
        .context("the cluster TLS configuration")?;
    serve(&[args.listen, args.cluster_listen], async move {
        let baseline = Baseline::default();
        let listener = TcpListener::bind(args.cluster_listen)
            .await
            .context("binding the cluster port")?;
        let grpc = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .add_service(ClusterServer::new(baseline.clone()))
            .serve_with_incoming(charter_tls::incoming(listener, tls));
        let app = Router::new()
            .route("/ready", get(|| async { "ok" }))
            .route("/push", post(push))
            .with_state(baseline);
        let http = TcpListener::bind(args.listen)
            .await
            .context("binding the trigger port")?;
        tokio::select! {
            served = grpc => served.context("the gRPC server"),
            served = std::future::IntoFuture::into_future(axum::serve(http, app)) => served.context("the trigger server"),
        }
    })
}
