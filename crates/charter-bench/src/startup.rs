//! Start-up with many stored licenses: a store of N signed licenses is written in this
//! process (on a tmpfs, where fsync costs nothing, then copied to the work dir's disk),
//! and a release `charter-cp` is started on it, timed from spawn to `GET /status` 200, with
//! its resident memory once ready.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use charter_license::LicenseSigner;
use charter_store::{Change, LicenseRecord, SledStore, Store};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::procs::{self, Pinning, Server};

/// Flags of `charter-bench startup`.
#[derive(Debug, clap::Args)]
pub struct StartupArgs {
    /// Licenses in the store.
    #[arg(long, default_value_t = 100_000)]
    pub licenses: u32,
    /// Starts timed.
    #[arg(long, default_value_t = 3)]
    pub starts: usize,
    /// The charter-cp binary (a release build). Default: next to this executable.
    #[arg(long)]
    pub cp_bin: Option<PathBuf>,
    /// Directory for the run's temporary files (on the disk to measure).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

/// Runs the benchmark and prints its report on standard output.
pub fn main(args: StartupArgs) -> Result<()> {
    ensure!(
        (1..=1_000_000).contains(&args.licenses),
        "--licenses must be 1 to 1000000"
    );
    ensure!((1..=20).contains(&args.starts), "--starts must be 1 to 20");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = runtime.block_on(run(&args))?;
    print!("{report}");
    Ok(())
}

async fn run(args: &StartupArgs) -> Result<String> {
    let cp_bin = procs::binary(args.cp_bin.as_deref(), "charter-cp", "--cp-bin")?;
    let work = procs::work_dir(args.work_dir.as_deref())?;
    let root = tempfile::Builder::new()
        .prefix("charter-bench-startup-")
        .tempdir_in(&work)
        .with_context(|| format!("creating a temp dir in {}", work.display()))?;
    let signer = LicenseSigner::from_seed(rand::random());
    let key_path = root.path().join("signing.pub");
    std::fs::write(&key_path, signer.trusted_key().to_pem())
        .with_context(|| format!("writing {}", key_path.display()))?;

    let seed = tempfile::Builder::new()
        .prefix("charter-bench-seed-")
        .tempdir_in("/dev/shm")
        .context("creating a seed dir in /dev/shm")?;
    let seeded = Instant::now();
    seed_store(&seed.path().join("store"), &signer, args.licenses).await?;
    let seed_secs = seeded.elapsed().as_secs_f64();
    let data_dir = root.path().join("cp-data");
    copy_dir(&seed.path().join("store"), &data_dir)?;
    drop(seed);

    let mut starts = Vec::new();
    let mut rss = Vec::new();
    let (mut sweeps, mut rss_swept) = (Vec::new(), Vec::new());
    for _ in 0..args.starts {
        let started = Instant::now();
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
                    "127.0.0.1:0".into(),
                    "--cluster-insecure".into(),
                    "--trusted-key".into(),
                    key_path.clone().into(),
                ]
            },
            &Pinning::apply(false),
            root.path().join("charter-cp.log"),
            "/status",
        )
        .await?;
        starts.push(started.elapsed());
        rss.push(procs::rss(cp.pid())?);
        // Then the background verification of every license, and the memory after it.
        let log_path = root.path().join("charter-cp.log");
        let deadline = Instant::now() + std::time::Duration::from_secs(120);
        let swept = loop {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            // Each start writes its log afresh.
            if log.contains("every stored license verified") {
                break Some(started.elapsed());
            }
            if Instant::now() > deadline {
                break None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        let swept = swept.with_context(|| {
            format!(
                "the control plane did not verify every license within 120 s; its log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            )
        })?;
        sweeps.push(swept);
        rss_swept.push(procs::rss(cp.pid())?);
        drop(cp);
    }
    // The control plane's own account of the load, from the last start's log.
    let log = std::fs::read_to_string(root.path().join("charter-cp.log")).unwrap_or_default();
    let loads: Vec<String> = log
        .lines()
        .filter(|l| l.contains("stored licenses loaded"))
        .filter_map(|l| l.split("read_ms=").nth(1))
        .map(|rest| rest.replace(" build_ms=", "+").trim().to_owned())
        .collect();
    starts.sort();
    rss.sort();
    sweeps.sort();
    rss_swept.sort();
    Ok(format!(
        "Start-up with {} stored licenses (seeded in {seed_secs:.1} s; {} starts)\n\
         - spawn to GET /status 200: median {:.2} s (min {:.2}, max {:.2})\n\
         - resident memory once ready: median {:.0} MiB\n\
         - every license verified in the background: median {:.2} s from spawn, {:.0} MiB resident then\n\
         - the control plane's load (read ms + index ms): {}\n",
        args.licenses,
        args.starts,
        starts[starts.len() / 2].as_secs_f64(),
        starts[0].as_secs_f64(),
        starts[starts.len() - 1].as_secs_f64(),
        rss[rss.len() / 2] as f64 / (1024.0 * 1024.0),
        sweeps[sweeps.len() / 2].as_secs_f64(),
        rss_swept[rss_swept.len() / 2] as f64 / (1024.0 * 1024.0),
        loads.join(", "),
    ))
}

/// Writes `n` signed licenses into a fresh store at `dir`, one commit each.
async fn seed_store(dir: &Path, signer: &LicenseSigner, n: u32) -> Result<()> {
    let store = SledStore::open(dir).context("opening the seed store")?;
    let mut revision = 0;
    for i in 0..n {
        let Value::Object(payload) = json!({
            "admin_seats": "1",
            "customer": format!("Customer {i}"),
            "dataplanes": "10",
            "license_creation_date": "2026-01-01",
            "license_expiration_date": "2099-12-31",
            "license_key": format!("STARTUP-{i:07}"),
            "product_subscription": "Charter Enterprise",
            "support_plan": "None",
        }) else {
            unreachable!("an object literal")
        };
        let text = signer.sign(payload).context("signing")?.to_json();
        let record = LicenseRecord {
            id: Uuid::new_v4(),
            checksum: charter_store::checksum_of(&text),
            payload: text,
            created_at: 1_767_225_600,
            updated_at: 1_767_225_600 + i64::from(i),
            revision: revision + 1,
        };
        revision = store
            .commit(revision, Change::Put(record))
            .await
            .context("seeding")?;
    }
    store.close().await.context("closing the seed store")?;
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("listing {}", from.display()))? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}
