//! Process plumbing shared by Charter's binaries: the wall clock, one-line flag errors
//! with the exit code for a bad configuration, log set-up, the shutdown signal, and the
//! guarded HTTP accept loop every HTTP listener uses ([`http`]), and re-reading rotated
//! files on `SIGHUP` or when they change ([`reload`]).
//!
//! This is the one place a Charter process reads the wall clock; everything downstream
//! takes a [`charter_license::Clock`].

pub mod cert_expiry;
pub mod flags;
pub mod http;
pub mod reload;

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use charter_license::{Clock, UnixTime};
use clap::{Parser, ValueEnum};

/// The exit code for a bad configuration, before any port is bound (DESIGN.md).
pub const EXIT_BAD_CONFIG: u8 = 64;

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> UnixTime {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    }
}

/// Log output format (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Parses flags. `--help`/`--version` print and exit 0; a bad flag prints one line
/// (`NAME: what is wrong`) and exits [`EXIT_BAD_CONFIG`].
pub fn parse_args<A: Parser>(name: &str) -> Result<A, ExitCode> {
    match A::try_parse() {
        Ok(args) => Ok(args),
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            Err(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{name}: {} (see {name} --help)", one_line(&e));
            Err(ExitCode::from(EXIT_BAD_CONFIG))
        }
    }
}

/// Clap's error text up to its usage section, on one line.
pub fn one_line(e: &clap::Error) -> String {
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

/// Logs to stderr in the chosen format; the level comes from `CHARTER_LOG` (default
/// `info`). Colour only when stderr is a terminal.
pub fn init_tracing(format: LogFormat) {
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

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
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
