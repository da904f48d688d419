//! `charter-cp`: parses flags into a [`charter_cp::Config`] (exit 64 on a bad one, before
//! binding anything), binds the listeners and runs the control plane until SIGTERM.

use std::process::ExitCode;

use charter_cp::{Args, Config, Listeners, LogFormat, SystemClock};
use charter_license::Clock;
use clap::Parser;

/// sysexits' EX_CONFIG-like code for a bad configuration, as DESIGN.md asks.
const EXIT_BAD_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("charter-cp: {} (see charter-cp --help)", one_line(&e));
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
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
    use anyhow::Context;
    let admin = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("binding the admin API on {}", config.admin_listen))?;
    charter_cp::run(config, Listeners { admin }, shutdown_signal()).await
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; stop with SIGINT");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining and stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining and stopping"),
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CHARTER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Clap's error text up to its usage section, on one line.
fn one_line(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let text: Vec<&str> = rendered
        .lines()
        .take_while(|l| !l.starts_with("Usage:"))
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("For more information") && !l.starts_with("tip:")
        })
        .collect();
    let text = text.join(" ");
    text.strip_prefix("error: ").unwrap_or(&text).to_owned()
}
