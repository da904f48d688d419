//! Telemetry ingest: N simulated data planes (the fan-out simulator: real protocol, mTLS,
//! one connection each) send `Telemetry` reports to a release `charter-cp`, all at once,
//! round after round; the figure is reports durably applied (acknowledged) per second.
//! The usage report is then checked to hold every report exactly once.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use charter_license::LicenseSigner;
use charter_tls::{MtlsMode, TlsFiles};
use hyper::Method;

use crate::fanout::sim::Fleet;
use crate::load::Conn;
use crate::procs::{self, Pinning, Server};

/// Flags of `charter-bench telemetry`.
#[derive(Debug, clap::Args)]
pub struct IngestArgs {
    /// Simulated data planes, each on its own connection.
    #[arg(long, default_value_t = 2000)]
    pub nodes: usize,
    /// Reports each data plane sends (one round each, every data plane at once).
    #[arg(long, default_value_t = 10)]
    pub rounds: u64,
    /// The charter-cp binary (a release build). Default: next to this executable.
    #[arg(long)]
    pub cp_bin: Option<PathBuf>,
    /// The charterctl binary that makes the cluster certificate. Default: next to this
    /// executable.
    #[arg(long)]
    pub ctl_bin: Option<PathBuf>,
    /// Directory for the run's temporary files (on the disk to measure).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Do not pin the control plane and the simulator to separate CPUs.
    #[arg(long)]
    pub no_pin: bool,
}

/// Runs the benchmark and prints its report on standard output.
pub fn main(args: IngestArgs) -> Result<()> {
    ensure!(
        (1..=20_000).contains(&args.nodes),
        "--nodes must be 1 to 20000"
    );
    ensure!(
        (1..=1000).contains(&args.rounds),
        "--rounds must be 1 to 1000"
    );
    let (_, hard) = rlimit::Resource::NOFILE
        .get()
        .context("reading the open-files limit")?;
    rlimit::Resource::NOFILE
        .set(hard, hard)
        .context("raising the open-files limit")?;
    charter_tls::install_default_provider();
    let pinning = Pinning::apply(!args.no_pin);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = runtime.block_on(run(&args, &pinning))?;
    print!("{report}");
    Ok(())
}

async fn run(args: &IngestArgs, pinning: &Pinning) -> Result<String> {
    let cp_bin = procs::binary(args.cp_bin.as_deref(), "charter-cp", "--cp-bin")?;
    let ctl_bin = procs::binary(args.ctl_bin.as_deref(), "charterctl", "--ctl-bin")?;
    let work = procs::work_dir(args.work_dir.as_deref())?;
    let root = tempfile::Builder::new()
        .prefix("charter-bench-telemetry-")
        .tempdir_in(&work)
        .with_context(|| format!("creating a temp dir in {}", work.display()))?;
    let dir = root.path();
    let out = Command::new(&ctl_bin)
        .args(["gen-cert", "--out-dir"])
        .arg(dir.join("certs"))
        .output()
        .with_context(|| format!("running {}", ctl_bin.display()))?;
    ensure!(
        out.status.success(),
        "charterctl gen-cert failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let certs = TlsFiles {
        cert: dir.join("certs/cluster.crt"),
        key: dir.join("certs/cluster.key"),
        ca: None,
    };
    let tls = charter_tls::client_config(MtlsMode::Shared, &certs)
        .context("the simulator's TLS configuration")?;
    let key_path = dir.join("signing.pub");
    std::fs::write(
        &key_path,
        LicenseSigner::from_seed(rand::random())
            .trusted_key()
            .to_pem(),
    )
    .with_context(|| format!("writing {}", key_path.display()))?;
    let cluster = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free port for the cluster listener")?;
    let data_dir = dir.join("cp-data");
    let cp = Server::start(
        "charter-cp",
        &cp_bin,
        |addr| -> Vec<OsString> {
            vec![
                "--data-dir".into(),
                data_dir.clone().into(),
                "--admin-listen".into(),
                addr.to_string().into(),
                "--cluster-listen".into(),
                cluster.to_string().into(),
                "--trusted-key".into(),
                key_path.clone().into(),
                "--cluster-cert".into(),
                certs.cert.clone().into(),
                "--cluster-cert-key".into(),
                certs.key.clone().into(),
            ]
        },
        pinning,
        dir.join("charter-cp.log"),
        "/status",
    )
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
    let cpu_before = procs::cpu_time_precise(cp.pid())?;
    let started = Instant::now();
    let mut rounds = Vec::new();
    for seq in 1..=args.rounds {
        let round = Instant::now();
        fleet
            .report_all(seq, bucket, Duration::from_secs(120))
            .await?;
        rounds.push(round.elapsed());
    }
    let elapsed = started.elapsed();
    let cpu = procs::cpu_time_precise(cp.pid())?.saturating_sub(cpu_before);
    let reports = args.nodes as u64 * args.rounds;

    // Exactly once: the report's counter for the bucket is the number of reports.
    let mut conn = Conn::connect(cp.addr()).await?;
    let (status, body) = conn
        .request(Method::GET, &"/license/report".parse()?, None)
        .await?;
    ensure!(status == 200, "GET /license/report answered {status}");
    let report: serde_json::Value = serde_json::from_slice(&body)?;
    let counted = report["counters"]
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

    rounds.sort();
    let rate = reports as f64 / elapsed.as_secs_f64();
    Ok(format!(
        "Telemetry ingest: {} data planes x {} rounds = {reports} reports ({})\n\
         - {rate:.0} reports/s durably applied ({:.2} s in all; a round's median {:.1} ms, slowest {:.1} ms)\n\
         - control plane CPU {:.1} us per report; every report counted exactly once ({counted})\n",
        args.nodes,
        args.rounds,
        pinning.describe(),
        elapsed.as_secs_f64(),
        rounds[rounds.len() / 2].as_secs_f64() * 1e3,
        rounds[rounds.len() - 1].as_secs_f64() * 1e3,
        cpu.as_secs_f64() * 1e6 / reports as f64,
    ))
}
