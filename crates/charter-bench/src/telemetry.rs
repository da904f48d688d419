//! `charter-bench telemetry`: N simulated data planes (the fan-out simulator: real
//! protocol, mTLS, one connection each) send `Telemetry` reports to a release
//! `charter-cp`, all at once, round after round: reports durably applied (acknowledged)
//! per second. The usage report must then hold every report exactly once. With
//! `--postgres`, the CP stores them in a private PostgreSQL server.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use charter_tls::MtlsMode;
use serde_json::Value;

use crate::fanout::sim::Fleet;
use crate::harness::{self, cpu_time_precise, free_port, spread, Common, Postgres};
use crate::load::Http;
use crate::report::Report;

/// Flags of `charter-bench telemetry`.
#[derive(Debug, clap::Args, serde::Serialize)]
pub struct TelemetryArgs {
    /// Simulated data planes, each on its own connection.
    #[arg(long, default_value_t = 2000, value_parser = harness::range::<usize>(1, 20_000))]
    pub nodes: usize,
    /// Reports each data plane sends (one round each, every data plane at once).
    #[arg(long, default_value_t = 10, value_parser = harness::range::<u64>(1, 1000))]
    pub rounds: u64,
    /// Store in a private PostgreSQL server (started by the bench) instead of sled.
    #[arg(long)]
    pub postgres: bool,
    #[command(flatten)]
    pub common: Common,
}

/// Runs the telemetry benchmark.
pub fn main(args: TelemetryArgs) -> Result<Report> {
    harness::run(args.common.clone(), true, async |bench| {
        let certs = bench.make_certs()?;
        let tls = charter_tls::client_config(MtlsMode::Shared, &certs)
            .context("the simulator's TLS configuration")?;
        let cluster = free_port()?;
        let pg = match args.postgres {
            true => Some(Postgres::start(&bench.pinning).await?),
            false => None,
        };
        let url = pg.as_ref().map(Postgres::url);
        let cp = bench
            .start_cp("cp-data", cluster, Some(&certs), url.as_deref())
            .await?;
        let mut fleet = Fleet::connect(
            cluster,
            "127.0.0.1".parse()?,
            tls,
            args.nodes,
            500,
            "ingest",
        )
        .await?;
        // Every data plane first takes the snapshot sent at connect time, as a real one does.
        fleet.receive(|_| true, Duration::from_secs(60)).await?;
        let bucket = "2026-12";
        let cpu_before = cpu_time_precise(cp.pid())?;
        let started = Instant::now();
        let mut rounds = Vec::new();
        for seq in 1..=args.rounds {
            let round = Instant::now();
            fleet
                .report_all(seq, bucket, Duration::from_secs(120))
                .await?;
            rounds.push(round.elapsed().as_secs_f64() * 1e3);
        }
        let seconds = started.elapsed().as_secs_f64();
        let cpu = cpu_time_precise(cp.pid())?.saturating_sub(cpu_before);
        let reports = args.nodes as u64 * args.rounds;
        // Exactly once: the report's counter for the bucket is the number of reports.
        let usage: Value = serde_json::from_slice(
            &Http::connect(cp.addr())
                .await?
                .get_ok("/license/report")
                .await?,
        )?;
        let counted = usage["counters"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["bucket"] == bucket)
            .and_then(|c| c["request_count"].as_u64())
            .unwrap_or(0);
        ensure!(
            counted == reports,
            "the control plane counted {counted} requests for {reports} reports"
        );
        fleet.close().await;

        let mut report = Report::new("telemetry", &args, &bench.pinning);
        report.set("round_ms", rounds.clone().into());
        let title = format!(
            "Telemetry ingest: {} data planes x {} rounds, {}",
            args.nodes,
            args.rounds,
            if args.postgres { "PostgreSQL" } else { "sled" }
        );
        report.table(
            title,
            "reports|counted|reports/s|seconds|round ms|min|max|CP CPU µs/report",
        );
        let cpu_per_report = cpu.as_secs_f64() * 1e6 / reports as f64;
        let figures = [counted as f64, reports as f64 / seconds, seconds];
        report.row(
            reports.to_string(),
            figures
                .into_iter()
                .chain(spread(rounds))
                .chain([cpu_per_report]),
        );
        Ok(report)
    })
}
