//! `charter-dp`: parses flags into a [`charter_dp::Config`] (exit 64 on a bad one, before
//! binding anything), binds the status listener and runs the data plane until SIGTERM.

use std::process::ExitCode;

use anyhow::Context;
use charter_dp::{Args, Config, Listeners};
use charter_license::Clock;
use charter_runtime::{init_tracing, parse_args, shutdown_signal, SystemClock, EXIT_BAD_CONFIG};

/// jemalloc instead of glibc's malloc, as `charter-cp`. Every forwarded request allocates
/// its future (2.5 KiB) and hyper's two header buffers per head (8 KiB each at the gate's
/// 256-field limits): sizes above glibc's per-thread cache (1 KiB), each a trip through
/// its arenas, while jemalloc's thread cache keeps them up to 32 KiB.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let args: Args = match parse_args("charter-dp") {
        Ok(args) => args,
        Err(code) => return code,
    };
    let config = match Config::from_args(args, SystemClock.now()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("charter-dp: invalid configuration: {e:#}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    init_tracing(config.log_format);
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("charter-dp: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("charter-dp: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The async runtime: one thread when the process may run on one CPU only (its affinity,
/// as `taskset` sets it, or a CPU quota), else one worker per CPU. On one CPU a
/// multi-threaded runtime still has one worker, and costs more per request than a
/// single-threaded one: measured in front of a fixed-answer nginx on the same CPU, about a
/// fifth more CPU per proxied request, half again as many involuntary context switches,
/// and a quarter fewer requests per second. `TOKIO_WORKER_THREADS` keeps the
/// multi-threaded runtime with that many workers.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let one_cpu = std::thread::available_parallelism().is_ok_and(|n| n.get() == 1);
    if one_cpu && std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        tracing::info!("one CPU to run on: a single-threaded async runtime");
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Runtime::new()
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let status = tokio::net::TcpListener::bind(config.status_listen)
        .await
        .with_context(|| format!("binding the status API on {}", config.status_listen))?;
    let proxy = match &config.gate {
        Some(gate) => Some(
            tokio::net::TcpListener::bind(gate.listen)
                .await
                .with_context(|| format!("binding the gate on {}", gate.listen))?,
        ),
        None => None,
    };
    charter_dp::run(config, Listeners { status, proxy }, shutdown_signal()).await
}
