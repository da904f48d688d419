//! Helpers for the data plane's integration tests: a crafted in-process control plane
//! (a real gRPC server on 127.0.0.1 whose snapshots the test chooses and which records
//! the data plane's Hellos and Acks), a data plane run in-process on a `FixedClock`,
//! signed test licenses and a tiny HTTP client.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use charter_dp::{Config, Listeners};
use charter_license::{FixedClock, LicenseSigner, TrustedKeys};
use charter_proto::v1::cluster_server::{Cluster, ClusterServer};
use charter_proto::v1::{
    control_plane_message, data_plane_message, Ack, ControlPlaneMessage, DataPlaneMessage, Hello,
    License, Snapshot,
};
use charter_tls::{MtlsMode, TlsFiles};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// 2026-03-01T12:00:00Z.
pub const MARCH_2026: i64 = 1_772_366_400;
/// 2026-05-01T12:00:00Z.
pub const MAY_2026: i64 = 1_777_636_800;
/// 2026-09-01T12:00:00Z.
pub const SEPTEMBER_2026: i64 = 1_788_264_000;
/// One day in seconds.
pub const DAY: i64 = 86_400;

/// A test vendor key.
pub fn signer(seed: u8) -> LicenseSigner {
    LicenseSigner::from_seed([seed; 32])
}

/// The trusted key set of one vendor.
pub fn keys(signer: &LicenseSigner) -> TrustedKeys {
    TrustedKeys::new([signer.trusted_key()])
}

/// A Kong-shaped payload with `features`.
pub fn payload(
    license_key: &str,
    created: &str,
    expires: &str,
    features: &[&str],
) -> Map<String, Value> {
    let Value::Object(map) = json!({
        "admin_seats": "1",
        "customer": "Example Company, Inc",
        "dataplanes": "1",
        "license_creation_date": created,
        "license_expiration_date": expires,
        "license_key": license_key,
        "product_subscription": "Charter Enterprise",
        "support_plan": "None",
        "features": features,
    }) else {
        unreachable!("an object literal")
    };
    map
}

/// A signed license document.
pub fn license(
    signer: &LicenseSigner,
    license_key: &str,
    created: &str,
    expires: &str,
    features: &[&str],
) -> String {
    signer
        .sign(payload(license_key, created, expires, features))
        .expect("test payload has Kong's shape")
        .to_json()
}

/// A snapshot carrying a license record.
pub fn snapshot(epoch: &str, revision: u64, id: &str, document: &str) -> Snapshot {
    Snapshot {
        epoch: epoch.to_owned(),
        revision,
        license: Some(License {
            id: id.to_owned(),
            payload: document.to_owned(),
            created_at: 1_700_000_000,
            updated_at: 1_700_000_000 + revision as i64,
        }),
    }
}

/// A snapshot of an unlicensed cluster.
pub fn empty_snapshot(epoch: &str, revision: u64) -> Snapshot {
    Snapshot {
        epoch: epoch.to_owned(),
        revision,
        license: None,
    }
}

/// Polls `check` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The default bound for waits.
pub const WAIT: Duration = Duration::from_secs(10);

type Outbound = mpsc::Sender<Result<ControlPlaneMessage, Status>>;

#[derive(Default)]
struct Shared {
    hellos: Mutex<Vec<Hello>>,
    acks: Mutex<Vec<Ack>>,
    streams: Mutex<Vec<Outbound>>,
    on_connect: Mutex<Option<Snapshot>>,
    refuse: Mutex<Option<Status>>,
}

#[derive(Clone)]
struct Service(Arc<Shared>);

type SyncStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<ControlPlaneMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Cluster for Service {
    type SyncStream = SyncStream;

    async fn sync(
        &self,
        request: Request<Streaming<DataPlaneMessage>>,
    ) -> Result<Response<SyncStream>, Status> {
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(DataPlaneMessage {
                msg: Some(data_plane_message::Msg::Hello(hello)),
            }) => hello,
            other => panic!("the data plane must speak Hello first, sent {other:?}"),
        };
        self.0.hellos.lock().unwrap().push(hello);
        if let Some(status) = self.0.refuse.lock().unwrap().clone() {
            return Err(status);
        }
        let (tx, rx) = mpsc::channel(16);
        if let Some(snapshot) = self.0.on_connect.lock().unwrap().clone() {
            tx.try_send(Ok(message(snapshot))).unwrap();
        }
        self.0.streams.lock().unwrap().push(tx);
        let shared = self.0.clone();
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                if let Some(data_plane_message::Msg::Ack(ack)) = message.msg {
                    shared.acks.lock().unwrap().push(ack);
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn message(snapshot: Snapshot) -> ControlPlaneMessage {
    ControlPlaneMessage {
        msg: Some(control_plane_message::Msg::Snapshot(snapshot)),
    }
}

/// A crafted control plane serving plaintext gRPC on 127.0.0.1.
pub struct FakeCp {
    /// Its address.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl FakeCp {
    /// Starts on a free port.
    pub async fn start() -> FakeCp {
        FakeCp::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts on `addr` (to come back where a stopped one was).
    pub async fn start_on(addr: SocketAddr) -> FakeCp {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("binding the fake control plane");
        let addr = listener.local_addr().unwrap();
        FakeCp::serve(addr, TcpListenerStream::new(listener))
    }

    /// Starts on a free port, serving mutual TLS with the shared cluster certificate in
    /// `files` (as a real control plane in `shared` mode does).
    pub async fn start_tls(files: &TlsFiles) -> FakeCp {
        let config =
            charter_tls::server_config(MtlsMode::Shared, files).expect("server TLS config");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        FakeCp::serve(addr, charter_tls::incoming(listener, config))
    }

    fn serve<I, IO, IE>(addr: SocketAddr, incoming: I) -> FakeCp
    where
        I: tokio_stream::Stream<Item = Result<IO, IE>> + Send + 'static,
        IO: tokio::io::AsyncRead
            + tokio::io::AsyncWrite
            + tonic::transport::server::Connected
            + Unpin
            + Send
            + 'static,
        IO::ConnectInfo: Clone + Send + Sync + 'static,
        IE: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let shared = Arc::new(Shared::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let service = Service(shared.clone());
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(ClusterServer::new(service))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await
                .expect("serving the fake control plane");
        });
        FakeCp {
            addr,
            shared,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The address as `HOST:PORT`.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// Sends this snapshot first on every new stream.
    pub fn on_connect(&self, snapshot: Snapshot) {
        *self.shared.on_connect.lock().unwrap() = Some(snapshot);
    }

    /// Answers every new stream with this status after its Hello.
    pub fn refuse(&self, status: Status) {
        *self.shared.refuse.lock().unwrap() = Some(status);
    }

    /// Sends a snapshot on every open stream.
    pub async fn send(&self, snapshot: Snapshot) {
        let streams = self.shared.streams.lock().unwrap().clone();
        assert!(!streams.is_empty(), "no data plane is connected to send to");
        for stream in streams {
            let _ = stream.send(Ok(message(snapshot.clone()))).await;
        }
    }

    /// The Hellos received so far.
    pub fn hellos(&self) -> Vec<Hello> {
        self.shared.hellos.lock().unwrap().clone()
    }

    /// The Acks received so far.
    pub fn acks(&self) -> Vec<Ack> {
        self.shared.acks.lock().unwrap().clone()
    }

    /// Waits for the `n`th Hello (1-based) and returns it.
    pub async fn hello(&self, n: usize) -> Hello {
        eventually(&format!("Hello #{n}"), WAIT, || async {
            self.hellos().get(n - 1).cloned()
        })
        .await
    }

    /// Waits until a data plane holds an open stream.
    pub async fn connected(&self) {
        eventually("a data plane stream", WAIT, || async {
            self.shared
                .streams
                .lock()
                .unwrap()
                .iter()
                .any(|s| !s.is_closed())
                .then_some(())
        })
        .await
    }

    /// Waits for the `n`th Ack (1-based) and returns it.
    pub async fn ack(&self, n: usize) -> Ack {
        eventually(&format!("Ack #{n}"), WAIT, || async {
            self.acks().get(n - 1).cloned()
        })
        .await
    }

    /// Sends a snapshot and waits for its Ack (the next one).
    pub async fn push(&self, snapshot: Snapshot) -> Ack {
        let n = self.acks().len() + 1;
        self.send(snapshot).await;
        self.ack(n).await
    }

    /// Ends every stream and stops serving.
    pub async fn stop(mut self) {
        self.shared.streams.lock().unwrap().clear();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            if tokio::time::timeout(WAIT, task).await.is_err() {
                panic!("the fake control plane did not stop");
            }
        }
    }
}

/// A data plane run in-process.
pub struct Dp {
    /// The status API address.
    pub addr: SocketAddr,
    /// Its wall clock.
    pub clock: Arc<FixedClock>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Dp {
    /// Runs `charter_dp::run_with_clock` with `config` and `clock`.
    pub async fn start(config: Config, clock: Arc<FixedClock>) -> Dp {
        let status = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = status.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(charter_dp::run_with_clock(
            config,
            Listeners {
                status,
                proxy: None,
            },
            clock.clone(),
            async {
                let _ = stopped.await;
            },
        ));
        Dp {
            addr,
            clock,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops it and returns what `run` returned.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().unwrap();
        tokio::time::timeout(WAIT, task)
            .await
            .expect("the data plane stops within the bound")
            .expect("the data plane task does not panic")
    }

    /// `GET path` → status and JSON body.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let (status, body) = self.get_text(path).await;
        let value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"));
        (status, value)
    }

    /// `GET /license`.
    pub async fn license(&self) -> Value {
        let (status, body) = self.get("/license").await;
        assert_eq!(status, 200, "GET /license is always 200: {body}");
        body
    }

    /// `GET path` → status and body text.
    pub async fn get_text(&self, path: &str) -> (u16, String) {
        http_get(self.addr, path).await
    }
}

/// A minimal HTTP/1.1 GET over a real socket.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connecting to the status API");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8(response).expect("utf-8 response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("a complete HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    (status, body.to_owned())
}

/// A data plane configuration against `cp` with `dir` as data dir.
pub fn config(cp: &str, dir: &Path, keys: TrustedKeys) -> Config {
    Config::new(cp, dir, keys)
}
