//! The relay baseline of the gate benchmark: a bare TCP relay that copies bytes between
//! each client connection and a connection of its own to the upstream, with no HTTP at
//! all. It costs what any proxy on the gate's path must (two more loopback TCP hops, a
//! read and a write each way per request, the wake-ups), so its throughput is the
//! ceiling a proxy can reach on this machine and its added latency the floor. It runs the
//! way `charter-dp` runs (a default multi-threaded Tokio runtime, `TCP_NODELAY` both ways).

use std::net::SocketAddr;

use anyhow::{ensure, Context, Result};
use tokio::net::{TcpListener, TcpStream};

/// Flags of the hidden `relay` subcommand.
#[derive(Debug, clap::Args)]
pub struct RelayArgs {
    /// Address to listen on (loopback only).
    #[arg(long)]
    pub listen: SocketAddr,
    /// The upstream every connection is relayed to (loopback only).
    #[arg(long)]
    pub upstream: SocketAddr,
}

/// Serves until killed.
pub fn main(args: RelayArgs) -> Result<()> {
    for addr in [args.listen, args.upstream] {
        ensure!(
            addr.ip().is_loopback(),
            "the relay only uses loopback, not {addr}"
        );
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(serve(args.listen, args.upstream))
}

async fn serve(listen: SocketAddr, upstream: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    loop {
        let (client, peer) = listener.accept().await.context("accepting")?;
        tokio::spawn(async move {
            if let Err(e) = relay(client, upstream).await {
                eprintln!("relay: connection from {peer}: {e:#}");
            }
        });
    }
}

async fn relay(mut client: TcpStream, upstream: SocketAddr) -> Result<()> {
    client.set_nodelay(true).context("setting TCP_NODELAY")?;
    let mut server = TcpStream::connect(upstream)
        .await
        .with_context(|| format!("connecting to {upstream}"))?;
    server.set_nodelay(true).context("setting TCP_NODELAY")?;
    tokio::io::copy_bidirectional(&mut client, &mut server)
        .await
        .context("copying")?;
    Ok(())
}
