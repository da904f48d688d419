//! `charter-dp`: parses flags into a [`charter_dp::Config`] (exit 64 on a bad one, before
//! binding anything), binds the status listener and runs the data plane until SIGTERM.

use std::process::ExitCode;

use anyhow::Context;
use charter_dp::{Args, Config, Listeners};
use charter_license::Clock;
use charter_runtime::{init_tracing, parse_args, shutdown_signal, SystemClock, EXIT_BAD_CONFIG};

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
    let runtime = match tokio::runtime::Runtime::new() {
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
