//! `charter-bench fanout-ha`: how fast a license written on one control plane reaches the
//! data planes of another on the same PostgreSQL database, against the same write made on
//! that control plane itself, in the same run.
//!
//! For each N it starts a private PostgreSQL server ([`crate::pg`]), control planes A and
//! B on it and, for comparison, one on sled, all pinned with the servers, and stores
//! `--licenses` licenses through A (and as many on the sled CP). In each round N simulated
//! data planes ([`super::sim`]) connect to B and take turns of updates: `POST /licenses`
//! on A, which B learns of from PostgreSQL (`LISTEN`/`NOTIFY`, or its once-a-second read of
//! the revision) and loads, and `POST /licenses` on B; then N connect to the sled CP for
//! its updates. Each update is timed from sending the request to the last data plane's
//! decoded snapshot.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use super::{
    median_of, ms, progress, ratio, spread, FleetArgs, Measured, Run, Settings, Target, Update,
    Writer,
};
use crate::load::Conn;
use crate::pg::Postgres;

/// A write on another control plane may reach B's data planes at most this much later
/// than a write on B itself (median over the updates).
const CROSS_GOAL: Duration = Duration::from_millis(50);

/// Flags of `charter-bench fanout-ha`.
#[derive(Debug, clap::Args)]
pub struct FanoutHaArgs {
    /// Numbers of data planes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    pub sizes: Vec<usize>,
    /// Rounds per N: each connects N data planes to CP B, then to the sled CP.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Updates timed per round of each kind (written on A, on B, on the sled CP).
    #[arg(long, default_value_t = 3)]
    pub updates: usize,
    /// Licenses stored before the data planes connect.
    #[arg(long, default_value_t = 200)]
    pub licenses: usize,
    #[command(flatten)]
    pub fleet: FleetArgs,
}

/// Runs the benchmark and prints its report on standard output.
pub fn main(args: FanoutHaArgs) -> Result<()> {
    ensure!(
        (1..=10_000).contains(&args.licenses),
        "--licenses must be 1 to 10000"
    );
    let no_pin = args.fleet.no_pin;
    let mut settings = Settings::new(args.sizes, args.rounds, args.updates, args.fleet)?;
    settings.ha = true;
    settings.licenses = args.licenses;
    super::execute(&settings, no_pin)
}

/// What one N measured.
pub(super) struct HaMeasured {
    /// Written on A, data planes on B.
    cross: Measured,
    /// Written on B, data planes on B.
    single: Measured,
    /// Written on the sled CP, data planes on it.
    sled: Measured,
    /// The PostgreSQL server.
    postgres: String,
    /// Licenses stored before the rounds.
    licenses: usize,
}

impl Run<'_> {
    /// The three kinds of update at N data planes, in rounds.
    pub(super) async fn measure_ha(&self, n: usize) -> Result<HaMeasured> {
        progress(format_args!(
            "N={n}: starting PostgreSQL and the control planes"
        ));
        let pg = Postgres::start(self.pinning).await?;
        let url = pg.url();
        let dir = |name: &str| self.dir.join(format!("{name}-{n}"));
        let a = self.start_cp(&dir("cp-a"), Some(&url)).await?;
        let b = self.start_cp(&dir("cp-b"), Some(&url)).await?;
        let sled = self.start_cp(&dir("cp-sled"), None).await?;
        let mut on_a = Conn::connect(a.server.addr()).await?;
        let mut on_b = Conn::connect(b.server.addr()).await?;
        let mut on_sled = Conn::connect(sled.server.addr()).await?;
        progress(format_args!(
            "N={n}: storing {} licenses",
            self.settings.licenses
        ));
        for conn in [&mut on_a, &mut on_sled] {
            for _ in 0..self.settings.licenses {
                self.trigger(Target::Cp, conn).await?;
            }
        }
        let mut measured = HaMeasured {
            cross: Measured::default(),
            single: Measured::default(),
            sled: Measured::default(),
            postgres: pg.describe(),
            licenses: self.settings.licenses,
        };
        for round in 0..self.settings.rounds {
            progress(format_args!(
                "N={n} round {}/{}: data planes on CP B, written on A and on B",
                round + 1,
                self.settings.rounds
            ));
            let mut writers = [
                Writer {
                    target: Target::CrossCp,
                    conn: &mut on_a,
                    measured: &mut measured.cross,
                },
                Writer {
                    target: Target::PgCp,
                    conn: &mut on_b,
                    measured: &mut measured.single,
                },
            ];
            // Neither kind always follows the other.
            if round % 2 == 1 {
                writers.reverse();
            }
            self.phase(n, &b, &mut writers)
                .await
                .with_context(|| format!("CP B with {n} data planes"))?;
            progress(format_args!(
                "N={n} round {}/{}: {}",
                round + 1,
                self.settings.rounds,
                Target::SledCp.label()
            ));
            let writer = Writer {
                target: Target::SledCp,
                conn: &mut on_sled,
                measured: &mut measured.sled,
            };
            self.phase(n, &sled, &mut [writer])
                .await
                .with_context(|| format!("the sled CP with {n} data planes"))?;
        }
        Ok(measured)
    }
}

/// The report of one N.
pub(super) fn write(out: &mut String, n: usize, m: &HaMeasured) -> Result<()> {
    writeln!(
        out,
        "\nN = {n} data planes, {} licenses stored; {}",
        m.licenses, m.postgres
    )?;
    writeln!(
        out,
        "  from sending POST /licenses to the last data plane's decoded snapshot, median (min–max) over {} updates of each kind; to its 201 and to the first data plane's, median",
        m.cross.updates.len()
    )?;
    writeln!(
        out,
        "  {:<30} {:>26} {:>9} {:>9} {:>11}",
        "update", "last data plane", "201", "first", "CPU/update"
    )?;
    for (target, measured) in [
        (Target::CrossCp, &m.cross),
        (Target::PgCp, &m.single),
        (Target::SledCp, &m.sled),
    ] {
        let median = |f: fn(&Update) -> Duration| ms(median_of(measured.updates.iter().map(f)));
        writeln!(
            out,
            "  {:<30} {:>26} {:>9} {:>9} {:>11}",
            target.label(),
            spread(&measured.updates, |u| u.last_from_request),
            median(|u| u.answered_from_request),
            median(|u| u.first_from_request),
            median(|u| u.server_cpu),
        )?;
    }
    let (cross, single, sled) = (
        m.cross.median_last_from_request(),
        m.single.median_last_from_request(),
        m.sled.median_last_from_request(),
    );
    let added = cross.as_secs_f64() - single.as_secs_f64();
    writeln!(
        out,
        "  (CPU/update: the data planes' CP, B or the sled one, from the request until it is idle again)"
    )?;
    writeln!(
        out,
        "  written on A against on B: {:+.1} ms at the median ({:.2}x); on B against the sled CP: {:.2}x",
        added * 1e3,
        ratio(cross, single),
        ratio(single, sled),
    )?;
    let refused: usize = [&m.cross, &m.single, &m.sled]
        .iter()
        .map(|m| m.refused)
        .sum();
    if refused > 0 {
        writeln!(out, "  REFUSED snapshots: {refused}")?;
    }
    super::write_disturbance(out, [&m.cross, &m.single, &m.sled])?;
    writeln!(
        out,
        "\nGoal (N = {n}): written on another CP at most {} later than on the data planes' own, at the median: {:+.1} ms, {}",
        ms(CROSS_GOAL),
        added * 1e3,
        if added <= CROSS_GOAL.as_secs_f64() {
            "met"
        } else {
            "MISSED"
        }
    )?;
    Ok(())
}
