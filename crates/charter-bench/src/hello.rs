//! The hello-world baseline: an axum server that answers constant JSON bodies, run as its
//! own process the way `charter-cp` runs (a default multi-threaded Tokio runtime,
//! `axum::serve` with connect info), so the only difference left is the handler's work.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use axum::http::header;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;

/// Flags of the hidden `hello` subcommand.
#[derive(Debug, clap::Args)]
pub struct HelloArgs {
    /// Address to listen on (loopback only).
    #[arg(long)]
    pub listen: SocketAddr,
    /// The body of `GET /record`: the bytes of one license record as the CP answers it.
    #[arg(long)]
    pub record: PathBuf,
    /// The body of `GET /page`: the bytes of one `GET /licenses` page as the CP answers it.
    #[arg(long)]
    pub page: PathBuf,
}

/// Serves until killed.
pub fn main(args: HelloArgs) -> Result<()> {
    anyhow::ensure!(
        args.listen.ip().is_loopback(),
        "the hello server only listens on loopback, not {}",
        args.listen
    );
    let record = Bytes::from(
        std::fs::read(&args.record)
            .with_context(|| format!("reading the record body {}", args.record.display()))?,
    );
    let page = Bytes::from(
        std::fs::read(&args.page)
            .with_context(|| format!("reading the page body {}", args.page.display()))?,
    );
    // The same runtime as charter-cp's main: `Runtime::new()`, one worker per CPU it may use.
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(serve(args.listen, record, page))
}

async fn serve(listen: SocketAddr, record: Bytes, page: Bytes) -> Result<()> {
    let json = |body: Bytes| {
        move || std::future::ready(([(header::CONTENT_TYPE, "application/json")], body.clone()))
    };
    let app = Router::new()
        .route("/record", get(json(record)))
        .route("/page", get(json(page)));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await
    .context("serving")
}
