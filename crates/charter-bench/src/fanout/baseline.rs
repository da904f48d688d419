//! The fan-out baseline: a minimal tonic server of the same `Cluster` service in the style
//! of tonic's streaming example (`route_guide`'s `route_chat`): one task and one channel
//! per stream, each message encoded by tonic per stream. No store, no verification.
//!
//! It serves the cluster port with the same mTLS as the control plane
//! ([`charter_tls::server_config`], [`charter_tls::incoming`]) and the same tonic server
//! settings, and takes its trigger on a small HTTP port: `POST /push` with a license
//! record (`{"id","payload","created_at","updated_at"}`) sends a snapshot of it to every
//! stream and answers 201 once it is queued on all of them; `GET /ready` answers 200.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use charter_proto::v1::cluster_server::{Cluster, ClusterServer};
use charter_proto::v1::{
    control_plane_message, ControlPlaneMessage, DataPlaneMessage, License, Snapshot,
};
use charter_tls::{MtlsMode, TlsFiles};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Flags of the hidden `fanout-baseline` subcommand (started by `charter-bench fanout`).
#[derive(Debug, clap::Args)]
pub struct BaselineArgs {
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

type Message = Result<ControlPlaneMessage, Status>;

struct Shared {
    streams: Mutex<Vec<mpsc::Sender<Message>>>,
    current: Mutex<ControlPlaneMessage>,
    revision: Mutex<u64>,
}

#[derive(Clone)]
struct Baseline(Arc<Shared>);

/// The epoch the baseline's snapshots carry: a UUID's length, as the control plane's.
const EPOCH: &str = "00000000-0000-4000-8000-000000000000";

fn snapshot(revision: u64, license: Option<License>) -> ControlPlaneMessage {
    ControlPlaneMessage {
        msg: Some(control_plane_message::Msg::Snapshot(Snapshot {
            epoch: EPOCH.to_owned(),
            revision,
            license,
        })),
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
        let current = self
            .0
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        tx.send(Ok(current))
            .await
            .map_err(|_| Status::internal("stream closed"))?;
        self.0
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(tx.clone());
        // The stream's task: reads what the data plane sends (Acks) until it goes away.
        tokio::spawn(async move {
            while let Ok(Some(_)) = inbound.message().await {}
            drop(tx);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

async fn push(State(baseline): State<Baseline>, Json(record): Json<Value>) -> StatusCode {
    let license = License {
        id: record["id"].as_str().unwrap_or_default().to_owned(),
        payload: record["payload"].as_str().unwrap_or_default().to_owned(),
        created_at: record["created_at"].as_i64().unwrap_or_default(),
        updated_at: record["updated_at"].as_i64().unwrap_or_default(),
    };
    let revision = {
        let mut revision = baseline
            .0
            .revision
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *revision += 1;
        *revision
    };
    let message = snapshot(revision, Some(license));
    *baseline
        .0
        .current
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = message.clone();
    let streams = {
        let mut streams = baseline
            .0
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        streams.retain(|tx| !tx.is_closed());
        streams.clone()
    };
    for tx in streams {
        let _ = tx.send(Ok(message.clone())).await;
    }
    StatusCode::CREATED
}

/// Runs the baseline until killed.
pub fn main(args: BaselineArgs) -> Result<()> {
    charter_tls::install_default_provider();
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    runtime.block_on(async move {
        let baseline = Baseline(Arc::new(Shared {
            streams: Mutex::new(Vec::new()),
            current: Mutex::new(snapshot(0, None)),
            revision: Mutex::new(0),
        }));
        let files = TlsFiles {
            cert: args.cluster_cert,
            key: args.cluster_cert_key,
            ca: None,
        };
        let tls = charter_tls::server_config(MtlsMode::Shared, &files)
            .context("the cluster TLS configuration")?;
        let listener = tokio::net::TcpListener::bind(args.cluster_listen)
            .await
            .with_context(|| format!("binding {}", args.cluster_listen))?;
        let grpc = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .add_service(ClusterServer::new(baseline.clone()))
            .serve_with_incoming(charter_tls::incoming(listener, tls));
        let app = Router::new()
            .route("/ready", get(|| async { "ok" }))
            .route("/push", post(push))
            .with_state(baseline);
        let http = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        tokio::select! {
            served = grpc => served.context("the gRPC server"),
            served = std::future::IntoFuture::into_future(axum::serve(http, app)) => served.context("the trigger server"),
        }
    })
}
