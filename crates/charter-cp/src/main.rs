//! `charter-cp`: parses flags into a [`charter_cp::Config`] (exit 64 on a bad one, before
//! binding anything), binds the listeners and runs the control plane until SIGTERM.

use std::process::ExitCode;

use anyhow::Context;
use charter_cp::{Args, Config, Listeners};
use charter_license::Clock;
use charter_runtime::{init_tracing, parse_args, shutdown_signal, SystemClock, EXIT_BAD_CONFIG};

/// jemalloc instead of glibc's malloc. With thousands of data planes connected (a few
/// dozen small allocations each: HTTP/2, TLS, the stream) and a snapshot pushed to all,
/// glibc's resident memory grew with every update (+4 to 7 KiB per data plane over 5
/// updates at 3,000) and the updates' CPU had outliers of 3x (its heap consolidation);
/// jemalloc's stays flat, for about 1.2 MiB more when idle. mimalloc was tried too:
/// 14 KiB more per data plane and 44 MiB more idle.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let args: Args = match parse_args("charter-cp") {
        Ok(args) => args,
        Err(code) => return code,
    };
    let config = match Config::from_args(args, SystemClock.now()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("charter-cp: invalid configuration: {e:#}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    init_tracing(config.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("charter-cp: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("charter-cp: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let admin = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("binding the admin API on {}", config.admin_listen))?;
    let cluster = tokio::net::TcpListener::bind(config.cluster.listen)
        .await
        .with_context(|| format!("binding the cluster port on {}", config.cluster.listen))?;
    charter_cp::run(config, Listeners { admin, cluster }, shutdown_signal()).await
}
