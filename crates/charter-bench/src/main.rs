//! `charter-bench`: benchmarks of Charter against baselines on the same machine, each
//! printing a short table of its figures, or with `--json` every figure of the run.
//! BENCHMARKS.md at the repository root says what they measure and what the figures mean.

mod admin;
mod baselines;
mod fanout;
mod gate;
mod harness;
mod load;
mod report;
mod startup;
mod telemetry;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "charter-bench",
    about = "Benchmarks of Charter against baselines"
)]
struct Args {
    /// Print every figure of the run as one JSON object instead of the text tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Admin API: GET req/s against an axum hello-world, durable POST latency against a
    /// raw write+fsync (with --postgres: a bare INSERT).
    Admin(admin::AdminArgs),
    /// Gate mode: GET req/s and latency through charter-dp's gate, through a bare relay,
    /// and from the upstream directly.
    Gate(gate::GateArgs),
    /// Cluster fan-out: a license change reaching N data planes over mTLS, and what each
    /// costs the control plane, against a minimal tonic server.
    Fanout(fanout::FanoutArgs),
    /// Cluster fan-out across control planes on one PostgreSQL database.
    FanoutHa(fanout::FanoutHaArgs),
    /// Telemetry ingest: reports per second durably applied from N data planes at once.
    Telemetry(telemetry::TelemetryArgs),
    /// Start-up of the control plane with many stored licenses: time to ready and memory.
    Startup(startup::StartupArgs),
    /// The fan-out baseline server (started by `fanout`).
    #[command(hide = true)]
    FanoutBaseline(baselines::FanoutBaselineArgs),
    /// The hello-world baseline server (started by `admin` and `gate`).
    #[command(hide = true)]
    Hello(baselines::HelloArgs),
    /// The bare TCP relay baseline (started by `gate`).
    #[command(hide = true)]
    Relay(baselines::RelayArgs),
}

fn main() -> ExitCode {
    let args = Args::parse();
    let report = match args.command {
        Command::Admin(args) => admin::main(args).map(Some),
        Command::Gate(args) => gate::main(args).map(Some),
        Command::Fanout(args) => fanout::main(args).map(Some),
        Command::FanoutHa(args) => fanout::ha_main(args).map(Some),
        Command::Telemetry(args) => telemetry::main(args).map(Some),
        Command::Startup(args) => startup::main(args).map(Some),
        Command::FanoutBaseline(args) => baselines::fanout_baseline(args).map(|()| None),
        Command::Hello(args) => baselines::hello(args).map(|()| None),
        Command::Relay(args) => baselines::relay(args).map(|()| None),
    };
    match report {
        Ok(report) => {
            if let Some(report) = report {
                report.print(args.json);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("charter-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
