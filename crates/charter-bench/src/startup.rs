//! `charter-bench startup`: a store of N signed licenses is written in this process (on a
//! tmpfs, where fsync costs nothing, then copied to the work dir's disk), and a release
//! `charter-cp` is started on it, unpinned, timed from spawn to `GET /status` 200 and to
//! its log's "every stored license verified", with its resident memory at both.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use charter_license::LicenseSigner;
use charter_store::{Change, LicenseRecord, SledStore, Store};
use serde_json::json;
use uuid::Uuid;

use crate::harness::{self, rss, spread, Common};
use crate::report::Report;

/// Flags of `charter-bench startup`.
#[derive(Debug, clap::Args, serde::Serialize)]
pub struct StartupArgs {
    /// Licenses in the store.
    #[arg(long, default_value_t = 100_000, value_parser = harness::range::<u32>(1, 1_000_000))]
    pub licenses: u32,
    /// Starts timed.
    #[arg(long, default_value_t = 3, value_parser = harness::range::<usize>(1, 20))]
    pub starts: usize,
    #[command(flatten)]
    pub common: Common,
}

/// Runs the start-up benchmark.
pub fn main(args: StartupArgs) -> Result<Report> {
    // Start-up uses every core the control plane is given: no pinning.
    harness::run(args.common.clone(), false, async |bench| {
        let seed = tempfile::Builder::new()
            .prefix("charter-bench-seed-")
            .tempdir_in("/dev/shm")
            .context("creating a seed dir in /dev/shm")?;
        let seeded = Instant::now();
        seed_store(&seed.path().join("store"), &bench.signer, args.licenses).await?;
        let seed_secs = seeded.elapsed().as_secs_f64();
        copy_dir(&seed.path().join("store"), &bench.path().join("cp-data"))?;
        drop(seed);

        let mut starts = Vec::new();
        for _ in 0..args.starts {
            let started = Instant::now();
            let cp = bench
                .start_cp("cp-data", "127.0.0.1:0".parse()?, None, None)
                .await?;
            let ready = started.elapsed().as_secs_f64();
            let rss_ready = rss(cp.pid())?;
            // Then the background verification of every license, and the memory after it.
            let deadline = started + Duration::from_secs(120);
            while !cp.log().contains("every stored license verified") {
                ensure!(
                    Instant::now() < deadline,
                    "the control plane did not verify every license within 120 s; its log:\n{}",
                    cp.log()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // The control plane's own account of the load.
            let load = cp
                .log()
                .lines()
                .filter(|l| l.contains("stored licenses loaded"))
                .filter_map(|l| l.split("read_ms=").nth(1))
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(", ");
            starts.push(json!({ "ready_s": ready, "rss_ready_bytes": rss_ready, "verified_s": started.elapsed().as_secs_f64(),
                                "rss_verified_bytes": rss(cp.pid())?, "cp_load_log": load }));
        }
        let mut report = Report::new("startup", &args, &bench.pinning);
        report.set("seed_secs", seed_secs.into());
        report.set("starts", starts.clone().into());
        report.table(
            format!(
                "Start-up with {} stored licenses, median (min-max) of {} starts",
                args.licenses, args.starts
            ),
            "figure|median|min|max",
        );
        for (label, key, scale) in [
            ("spawn to GET /status 200, s", "ready_s", 1.0),
            (
                "resident memory once ready, MiB",
                "rss_ready_bytes",
                1024.0 * 1024.0,
            ),
            ("every license verified, s from spawn", "verified_s", 1.0),
            (
                "resident memory then, MiB",
                "rss_verified_bytes",
                1024.0 * 1024.0,
            ),
        ] {
            report.row(
                label,
                spread(
                    starts
                        .iter()
                        .filter_map(|s| s[key].as_f64())
                        .map(|x| x / scale),
                ),
            );
        }
        Ok(report)
    })
}

/// Writes `n` signed licenses into a fresh store at `dir`, one commit each.
async fn seed_store(dir: &Path, signer: &LicenseSigner, n: u32) -> Result<()> {
    let store = SledStore::open(dir).context("opening the seed store")?;
    let mut revision = 0;
    for i in 0..n {
        let text = signer
            .sign(harness::payload(&format!("STARTUP-{i:07}"), 10))?
            .to_json();
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
