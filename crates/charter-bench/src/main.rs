//! `charter-bench`: benchmarks of Charter against baselines on the same machine.
//!
//! `fanout` measures how fast a license change reaches N simulated data planes (real
//! protocol, real mTLS) against a minimal tonic server, and the CP's memory per data plane;
//! `fanout-ha`, how fast a license written on one control plane reaches the data planes of
//! another on the same PostgreSQL, against a write on that one itself.
//!
//! `admin` measures the control plane's admin API (the real `charter-cp` release binary,
//! as a separate process) against an axum hello-world served the same way, and its durable
//! `POST /licenses` latency against a raw write+fsync loop on the same disk (with
//! `--postgres`: against a bare `INSERT` into the PostgreSQL it stores in). See
//! BENCHMARKS.md at the repository root for what the figures mean.

mod admin;
mod fanout;
mod gate;
mod hello;
mod ingest;
mod load;
mod pg;
mod procs;
mod relay;
mod startup;
mod stats;
mod writes;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "charter-bench",
    about = "Benchmarks of Charter's control plane against baselines"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Admin API: GET req/s against an axum hello-world, durable POST latency against
    /// raw write+fsync.
    Admin(admin::AdminArgs),
    /// Gate mode: GET req/s and latency through charter-dp's gate against the same
    /// upstream called directly.
    Gate(gate::GateArgs),
    /// Cluster fan-out: how fast a license change reaches N data planes over mTLS, and
    /// what each costs the control plane, against a minimal tonic server.
    Fanout(fanout::FanoutArgs),
    /// Cluster fan-out across control planes on one PostgreSQL database: a license written
    /// on one reaching the data planes of another, against a write on that one itself.
    FanoutHa(fanout::FanoutHaArgs),
    /// Telemetry ingest: reports per second durably applied from N simulated data planes
    /// sending at once.
    Telemetry(ingest::IngestArgs),
    /// Start-up of the control plane with many stored licenses: time to ready and memory.
    Startup(startup::StartupArgs),
    /// The fan-out baseline server (started by `fanout`; not for direct use).
    #[command(hide = true)]
    FanoutBaseline(fanout::BaselineArgs),
    /// The hello-world baseline server (started by `admin`; not for direct use).
    #[command(hide = true)]
    Hello(hello::HelloArgs),
    /// The bare TCP relay baseline (started by `gate`; not for direct use).
    #[command(hide = true)]
    Relay(relay::RelayArgs),
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Command::Admin(args) => admin::main(args),
        Command::Gate(args) => gate::main(args),
        Command::Fanout(args) => fanout::main(args),
        Command::FanoutHa(args) => fanout::ha_main(args),
        Command::Telemetry(args) => ingest::main(args),
        Command::Startup(args) => startup::main(args),
        Command::FanoutBaseline(args) => fanout::baseline_main(args),
        Command::Hello(args) => hello::main(args),
        Command::Relay(args) => relay::main(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("charter-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
