//! `charter-bench fanout`: how fast a license change reaches N data planes, and what a
//! connected data plane costs the control plane, against a minimal tonic server (the
//! transport's floor) and etcd with a watcher per node ([`etcd`]), in plaintext and with
//! client-certificate TLS.
//!
//! For each N it starts a fresh release `charter-cp` (shared-mode mTLS on its cluster port,
//! certificates from `charterctl gen-cert`, as deployed), the baseline (`fanout-baseline`)
//! and the two etcds, all pinned with the servers, and this process holds the N simulated
//! nodes ([`sim`], [`etcd::Watchers`]). In each round N nodes connect to one server (the
//! data planes take their first snapshot); then a few updates (the CP: `POST /licenses` of
//! a new license; the baseline: `POST /push` of the same size; etcd: a `Put` of that
//! record), each timed from the request to each node's decoded update; the data planes
//! then verify, cache and acknowledge it, and the server's CPU time for the update is read
//! once it is idle again. Rounds rotate which server goes first.
//!
//! `fanout-ha`: the same fleet and updates on control planes A and B sharing one private
//! PostgreSQL database, and one on sled: written on A with the data planes on B, written on
//! B itself, and on the sled one.

mod etcd;
pub mod sim;

use std::cell::Cell;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context, Result};
use charter_license::{TrustedKeys, UnixTime};
use charter_proto::v1::Snapshot;
use charter_tls::{MtlsMode, TlsFiles};
use serde_json::json;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use crate::admin::record_id;
use crate::harness::{
    self, cpu_time_precise, free_port, median, percentile, progress, rss, spread, Bench, Common,
    Meter, Postgres, Server,
};
use crate::load::Http;
use crate::report::Report;

/// A server is idle again once it used less than this much CPU (beyond its background)
/// in an idle window.
const IDLE_CPU: Duration = Duration::from_millis(2);
/// The bound on waiting for a server to become idle.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Flags of `charter-bench fanout`.
#[derive(Debug, clap::Args, serde::Serialize)]
pub struct FanoutArgs {
    /// Numbers of data planes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000", value_parser = harness::range::<usize>(1, 100_000))]
    pub sizes: Vec<usize>,
    /// Rounds per N: each connects N data planes to each server in turn.
    #[arg(long, default_value_t = 3, value_parser = harness::range::<usize>(1, 100))]
    pub rounds: usize,
    /// Leave out the etcd peers (plaintext and client-certificate TLS).
    #[arg(long)]
    pub no_etcd: bool,
    #[command(flatten)]
    pub fleet: FleetArgs,
}

/// Flags of `charter-bench fanout-ha`.
#[derive(Debug, clap::Args, serde::Serialize)]
pub struct FanoutHaArgs {
    /// Numbers of data planes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000", value_parser = harness::range::<usize>(1, 100_000))]
    pub sizes: Vec<usize>,
    /// Rounds per N: each connects N data planes to CP B, then to the sled CP.
    #[arg(long, default_value_t = 5, value_parser = harness::range::<usize>(1, 100))]
    pub rounds: usize,
    /// Licenses stored before the data planes connect.
    #[arg(long, default_value_t = 200, value_parser = harness::range::<usize>(1, 10_000))]
    pub licenses: usize,
    #[command(flatten)]
    pub fleet: FleetArgs,
}

/// Flags of the fan-out benchmarks about the updates and the simulated data planes.
#[derive(Debug, clap::Args, serde::Serialize)]
pub struct FleetArgs {
    /// Updates timed per round of each kind.
    #[arg(long, default_value_t = 3, value_parser = harness::range::<usize>(1, 100))]
    pub updates: usize,
    /// Nodes that connect at once (the CP drops handshakes that stall beyond 256 in
    /// progress, so more at once on a busy core measures that refusal, not the fan-out).
    #[arg(long, default_value_t = 100, value_parser = harness::range::<usize>(1, 100_000))]
    pub batch: usize,
    /// Data planes per update whose durable cache write is timed (each into its own
    /// directory; every data plane's verification is timed).
    #[arg(long, default_value_t = 50)]
    pub cache_sample: usize,
    /// How long every data plane may take to receive a snapshot, in seconds.
    #[arg(long, default_value_t = 60, value_parser = harness::range::<u64>(1, 3600))]
    pub timeout_secs: u64,
    /// The window in which a server counts as idle again after an update (milliseconds;
    /// keep it above the CP's 1 s inventory flush for the CPU figures to include it).
    #[arg(long, default_value_t = 1200, value_parser = harness::range::<u64>(50, 10_000))]
    pub idle_window_ms: u64,
    #[command(flatten)]
    pub common: Common,
}

/// What an update is made on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// `POST /licenses` on the CP the data planes are connected to.
    Cp,
    /// `POST /push` on the baseline.
    Baseline,
    /// A `Put` of the watched key on etcd in plaintext.
    Etcd,
    /// The same on etcd with client-certificate TLS.
    EtcdTls,
    /// `fanout-ha`: `POST /licenses` on CP A, the data planes on CP B, one database.
    CrossCp,
    /// `fanout-ha`: `POST /licenses` on CP B itself.
    PgCp,
    /// `fanout-ha`: a CP on sled.
    SledCp,
}

impl Target {
    fn label(self) -> &'static str {
        match self {
            Target::Cp => "charter-cp",
            Target::Baseline => "baseline (tonic)",
            Target::Etcd => "etcd (plaintext)",
            Target::EtcdTls => "etcd (TLS)",
            Target::CrossCp => "written on CP A, DPs on CP B",
            Target::PgCp => "written on CP B, DPs on CP B",
            Target::SledCp => "one CP on sled",
        }
    }
}

/// The figures of one timed update, in milliseconds unless named otherwise: from sending
/// the request to the first, the median, the 99th percentile and the last node's decoded
/// update, and to the answer (201, or etcd's `Put` answer); the server's CPU time from the
/// request until it was back to its background rate (Acks and the inventory write
/// included, that background not); how busy the server and the simulator were (cores)
/// from the request to the last delivery (whichever is near 1 bounds the fan-out); and the
/// largest steal share of a CPU and other processes' cores during the update.
const FIGURES: &str = "first|p50|p99|last|answer|server CPU|server busy|sim busy|steal|other cores";
/// Where `last` is among the [`FIGURES`].
const LAST: usize = 3;
/// The costs of a kind of update at one N: the fleet's connect time, the server's memory
/// idle, with N connected, and per data plane, and the data plane's code on the snapshots
/// (verification, the durable cache write, refusals).
const COSTS: &str = "connect s|RSS idle MiB|RSS with N MiB|per DP KiB|verify p50 µs|verify p99 µs|\
                     cache write p50 µs|cache write p99 µs|refused";

/// Where an update's request goes: an admin or trigger port (each request on a connection
/// of its own, opened before the timing starts, as the CP closes connections idle for 30 s
/// and a fleet takes longer to connect), or etcd's `KV` service.
enum Conn {
    Http(SocketAddr),
    Etcd(etcd::KvClient),
}

/// The simulated nodes of one phase.
enum Fleet {
    /// Data planes on a `Cluster.Sync` stream each.
    Cluster(sim::Fleet),
    /// etcd watchers.
    Etcd(etcd::Watchers),
}

/// One kind of update at one N: what it is made on, the connection its trigger goes on,
/// and everything measured of it.
struct Kind {
    target: Target,
    conn: Conn,
    /// Each update's [`FIGURES`].
    updates: Vec<Vec<f64>>,
    connect_secs: Vec<f64>,
    rss_idle: u64,
    /// The largest RSS seen with N connected, after their updates.
    rss_connected: u64,
    verify: Vec<Duration>,
    cache_write: Vec<Duration>,
    refused: usize,
}

impl Kind {
    fn new(target: Target, conn: Conn) -> Kind {
        Kind {
            target,
            conn,
            updates: Vec::new(),
            connect_secs: Vec::new(),
            rss_idle: 0,
            rss_connected: 0,
            verify: Vec::new(),
            cache_write: Vec::new(),
            refused: 0,
        }
    }

    /// What it holds so far, to go back to with [`Kind::rewind`].
    fn mark(&self) -> Mark {
        Mark {
            lengths: [
                self.updates.len(),
                self.connect_secs.len(),
                self.verify.len(),
                self.cache_write.len(),
            ],
            refused: self.refused,
            rss_connected: self.rss_connected,
        }
    }

    /// Drops what was added since `mark`.
    fn rewind(&mut self, mark: Mark) {
        let [updates, connect, verify, cache_write] = mark.lengths;
        self.updates.truncate(updates);
        self.connect_secs.truncate(connect);
        self.verify.truncate(verify);
        self.cache_write.truncate(cache_write);
        (self.refused, self.rss_connected) = (mark.refused, mark.rss_connected);
    }

    /// The median over the updates of figure `index`.
    fn median(&self, index: usize) -> f64 {
        median(&self.updates.iter().map(|u| u[index]).collect::<Vec<_>>()).unwrap_or(f64::NAN)
    }

    /// The [`COSTS`] at N data planes.
    fn costs(&self, n: usize) -> Vec<f64> {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let us = |s: &[Duration], p| {
            percentile(&sorted(s), p).map_or(f64::NAN, |d| d.as_secs_f64() * 1e6)
        };
        vec![
            median(&self.connect_secs).unwrap_or(f64::NAN),
            mib(self.rss_idle),
            mib(self.rss_connected),
            self.rss_connected.saturating_sub(self.rss_idle) as f64 / 1024.0 / n as f64,
            us(&self.verify, 50.0),
            us(&self.verify, 99.0),
            us(&self.cache_write, 50.0),
            us(&self.cache_write, 99.0),
            self.refused as f64,
        ]
    }
}

/// What a [`Kind`] held at some point (see [`Kind::mark`]).
struct Mark {
    lengths: [usize; 4],
    refused: usize,
    rss_connected: u64,
}

/// What the simulated nodes of a phase failed at, with the kind of update it was: a
/// connection not made, a stream that ended, an update not received in time. Such a round
/// is left out (see [`Failures`]); anything else ends the run.
#[derive(Debug, Clone, Copy)]
struct NodeLost(Target);

impl std::fmt::Display for NodeLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: a node failed", self.0.label())
    }
}

fn sorted(samples: &[Duration]) -> Vec<Duration> {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted
}

/// The tables of one N: the median of each figure over the updates of each kind, then the
/// spread of the last delivery, each kind's against `kinds[reference]` and against etcd
/// with TLS (when it ran), and the costs.
fn tables(report: &mut Report, n: usize, kinds: &[Kind], reference: usize) {
    report.table(
        format!("N = {n}: median over each kind's updates (ms from the request)"),
        &format!("update|updates|{FIGURES}"),
    );
    for kind in kinds {
        let medians = (0..FIGURES.split('|').count()).map(|i| kind.median(i));
        let updates = kind.updates.len() as f64;
        report.row(kind.target.label(), std::iter::once(updates).chain(medians));
    }
    let base = &kinds[reference];
    let etcd = kinds.iter().find(|k| k.target == Target::EtcdTls);
    report.table(
        format!("N = {n}: spread of the last, ratios, and costs"),
        &format!(
            "update|last min|last max|x {} last|x etcd TLS last|x etcd TLS per DP|{COSTS}",
            base.target.label()
        ),
    );
    let per_dp = |k: &Kind| k.costs(n)[3];
    for kind in kinds {
        let [_, min, max] = spread(kind.updates.iter().map(|u| u[LAST]));
        let ratios = [
            kind.median(LAST) / base.median(LAST),
            etcd.map_or(f64::NAN, |e| kind.median(LAST) / e.median(LAST)),
            etcd.map_or(f64::NAN, |e| per_dp(kind) / per_dp(e)),
        ];
        report.row(
            kind.target.label(),
            [min, max].into_iter().chain(ratios).chain(kind.costs(n)),
        );
    }
    let kinds = kinds
        .iter()
        .map(|k| json!({ "update": k.target.label(), "updates": k.updates, "costs": k.costs(n) }));
    let figures = json!({ "figures": FIGURES.split('|').collect::<Vec<_>>(), "costs": COSTS.split('|').collect::<Vec<_>>(),
                          "kinds": kinds.collect::<Vec<_>>() });
    report.set(&format!("n_{n}"), figures);
}

/// A run's fleet settings and what its updates share.
struct Run<'a> {
    bench: &'a Bench,
    fleet: &'a FleetArgs,
    certs: TlsFiles,
    tls: Arc<rustls::ClientConfig>,
    keys: TrustedKeys,
    /// Fleets connected so far (each gets a source address of its own).
    fleets: Cell<u32>,
    /// Licenses made so far.
    licenses: Cell<u32>,
}

/// Runs `fanout`.
pub fn main(args: FanoutArgs) -> Result<Report> {
    with_run(
        "fanout",
        &args,
        &args.sizes,
        &args.fleet,
        async |run, report| {
            if !args.no_etcd {
                etcd::check_installed()?;
            }
            let mut failed = Failures::default();
            for &n in &args.sizes {
                let cp = run.start_cp(&format!("cp-data-{n}"), None).await?;
                let cluster = free_port()?;
                let certs = harness::cluster_flags(Some(&run.certs));
                let baseline = run
                    .bench
                    .start("baseline.log", "charter-bench", "/ready", |addr| {
                        let (listen, cluster) = (addr.to_string(), cluster.to_string());
                        let args = [
                            "fanout-baseline",
                            "--listen",
                            &listen,
                            "--cluster-listen",
                            &cluster,
                        ];
                        args.map(Into::into)
                            .into_iter()
                            .chain(certs.iter().cloned())
                            .collect()
                    })
                    .await?;
                let kinds = [
                    Kind::new(Target::Cp, Conn::Http(cp.0.addr())),
                    Kind::new(Target::Baseline, Conn::Http(baseline.addr())),
                ];
                let mut servers = vec![(&cp.0, cp.1), (&baseline, cluster)];
                let mut kinds = Vec::from(kinds);
                let etcds = match args.no_etcd {
                    true => Vec::new(),
                    false => vec![
                        etcd::start(run.bench, &format!("etcd-{n}"), None).await?,
                        etcd::start(run.bench, &format!("etcd-tls-{n}"), Some(&run.certs)).await?,
                    ],
                };
                for ((server, client), target) in etcds.iter().zip([Target::Etcd, Target::EtcdTls])
                {
                    let tls =
                        (target == Target::EtcdTls).then(|| TlsConnector::from(run.tls.clone()));
                    let conn = Conn::Etcd(etcd::put_client(*client, tls).await?);
                    kinds.push(Kind::new(target, conn));
                    servers.push((server, *client));
                }
                for (kind, (server, _)) in kinds.iter_mut().zip(&servers) {
                    // A license in force before anything connects, as in a running cluster.
                    run.trigger(kind.target, &mut kind.conn).await?;
                    background(server.pid(), run.idle_window()).await?;
                    kind.rss_idle = rss(server.pid())?;
                }
                for round in 0..args.rounds {
                    // Rotate which server goes first.
                    let count = kinds.len();
                    for slot in (0..count).map(|i| (i + round) % count) {
                        progress(format_args!(
                            "N={n} round {}/{}: {}",
                            round + 1,
                            args.rounds,
                            kinds[slot].target.label()
                        ));
                        let phase = run.phase(n, servers[slot], &mut kinds[slot..=slot], &[0]);
                        failed.note(n, round, phase.await)?;
                    }
                }
                tables(report, n, &kinds, 1);
            }
            failed.report(report);
            Ok(())
        },
    )
}

/// Rounds whose nodes failed ([`NodeLost`]): noted and left out, so one
/// broken stream among thousands does not throw away the rounds measured before it. More
/// than [`Failures::MOST`] end the run.
#[derive(Default)]
struct Failures(Vec<(usize, usize, &'static str, String)>);

impl Failures {
    const MOST: usize = 3;

    /// Notes `phase`'s failure in round `round` at N = `n` if its nodes failed
    /// ([`NodeLost`]); any other failure is the run's.
    fn note(&mut self, n: usize, round: usize, phase: Result<()>) -> Result<()> {
        let Err(e) = phase else { return Ok(()) };
        let Some(&NodeLost(target)) = e.downcast_ref::<NodeLost>() else {
            return Err(e);
        };
        progress(format_args!(
            "N={n} round {}: {} failed, left out: {e:#}",
            round + 1,
            target.label()
        ));
        self.0
            .push((n, round + 1, target.label(), format!("{e:#}")));
        ensure!(
            self.0.len() <= Self::MOST,
            "more than {} rounds failed; the last: {e:#}",
            Self::MOST
        );
        Ok(())
    }

    fn report(&self, report: &mut Report) {
        let failed = self.0.iter().map(|(n, round, target, error)| {
            json!({ "n": n, "round": round, "update": target, "error": error })
        });
        report.set("failed_rounds", failed.collect());
        if !self.0.is_empty() {
            report.table("Rounds that failed and are left out", "update|N|round");
            for (n, round, target, _) in &self.0 {
                report.row(*target, [*n as f64, *round as f64]);
            }
        }
    }
}

/// Runs `fanout-ha`.
pub fn ha_main(args: FanoutHaArgs) -> Result<Report> {
    with_run(
        "fanout-ha",
        &args,
        &args.sizes,
        &args.fleet,
        async |run, report| {
            let mut failed = Failures::default();
            for &n in &args.sizes {
                progress(format_args!(
                    "N={n}: starting PostgreSQL and the control planes"
                ));
                let pg = Postgres::start(&run.bench.pinning).await?;
                let a = run
                    .start_cp(&format!("cp-a-{n}"), Some(pg.url().as_str()))
                    .await?;
                let b = run
                    .start_cp(&format!("cp-b-{n}"), Some(pg.url().as_str()))
                    .await?;
                let sled = run.start_cp(&format!("cp-sled-{n}"), None).await?;
                let mut kinds = [
                    Kind::new(Target::CrossCp, Conn::Http(a.0.addr())),
                    Kind::new(Target::PgCp, Conn::Http(b.0.addr())),
                    Kind::new(Target::SledCp, Conn::Http(sled.0.addr())),
                ];
                progress(format_args!(
                    "N={n}: storing {} licenses through A and on the sled CP",
                    args.licenses
                ));
                for kind in [0, 2] {
                    for _ in 0..args.licenses {
                        let Kind { target, conn, .. } = &mut kinds[kind];
                        run.trigger(*target, conn).await?;
                    }
                }
                for (kind, server) in kinds.iter_mut().zip([&b.0, &b.0, &sled.0]) {
                    kind.rss_idle = rss(server.pid())?;
                }
                for round in 0..args.rounds {
                    progress(format_args!("N={n} round {}/{}", round + 1, args.rounds));
                    // The data planes on B, written on A and on B; neither kind always first.
                    let turns = if round % 2 == 0 { [0, 1] } else { [1, 0] };
                    let phase = run.phase(n, (&b.0, b.1), &mut kinds[..2], &turns);
                    failed.note(n, round, phase.await)?;
                    let phase = run.phase(n, (&sled.0, sled.1), &mut kinds[2..], &[0]);
                    failed.note(n, round, phase.await)?;
                }
                report.set(&format!("postgres_{n}"), pg.version.clone().into());
                tables(report, n, &kinds, 1);
            }
            failed.report(report);
            Ok(())
        },
    )
}

/// Checks the flags, sets up the run (certificates, the simulator's TLS) and runs `body`.
fn with_run(
    name: &str,
    settings: &impl serde::Serialize,
    sizes: &[usize],
    fleet: &FleetArgs,
    body: impl AsyncFnOnce(&Run<'_>, &mut Report) -> Result<()>,
) -> Result<Report> {
    harness::run(fleet.common.clone(), true, async |bench| {
        let (_, hard) = rlimit::Resource::NOFILE.get()?;
        let needed = sizes.iter().max().copied().unwrap_or(0) as u64 + 512;
        ensure!(hard >= needed, "this run needs {needed} open files per process but the hard limit is {hard}; raise it (ulimit -Hn) or pass smaller --sizes");
        let certs = bench.make_certs()?;
        let tls = charter_tls::client_config(MtlsMode::Shared, &certs)
            .context("the simulator's TLS configuration")?;
        let run = Run {
            bench,
            fleet,
            certs,
            tls,
            keys: TrustedKeys::new([bench.signer.trusted_key()]),
            fleets: Cell::new(0),
            licenses: Cell::new(0),
        };
        let mut report = Report::new(name, settings, &bench.pinning);
        report.set("open_files", hard.into());
        body(&run, &mut report).await?;
        Ok(report)
    })
}

impl Run<'_> {
    fn idle_window(&self) -> Duration {
        Duration::from_millis(self.fleet.idle_window_ms)
    }

    /// A CP storing in `data` in the run's dir, or in the database at `database_url`; with
    /// its cluster address.
    async fn start_cp(
        &self,
        data: &str,
        database_url: Option<&str>,
    ) -> Result<(Server, SocketAddr)> {
        let cluster = free_port()?;
        Ok((
            self.bench
                .start_cp(data, cluster, Some(&self.certs), database_url)
                .await?,
            cluster,
        ))
    }

    /// One fleet against one server: connect, first snapshot, the timed updates (each
    /// round of `turns` makes one update of each kind, in that order), close. A phase
    /// that fails leaves no figure behind, and the server idle again.
    async fn phase(
        &self,
        n: usize,
        server: (&Server, SocketAddr),
        kinds: &mut [Kind],
        turns: &[usize],
    ) -> Result<()> {
        let marks: Vec<Mark> = kinds.iter().map(Kind::mark).collect();
        let mut fleet = None;
        let done = self.measure(n, server, kinds, turns, &mut fleet).await;
        match fleet {
            Some(Fleet::Cluster(fleet)) => fleet.close().await,
            Some(Fleet::Etcd(watchers)) => watchers.close().await,
            None => {}
        }
        background(server.0.pid(), self.idle_window()).await?;
        if done.is_err() {
            for (kind, mark) in kinds.iter_mut().zip(marks) {
                kind.rewind(mark);
            }
        }
        done
    }

    /// [`Run::phase`]'s work, its fleet in `fleet`. What the nodes fail at (connecting,
    /// receiving) is marked [`NodeLost`].
    async fn measure(
        &self,
        n: usize,
        (server, cluster): (&Server, SocketAddr),
        kinds: &mut [Kind],
        turns: &[usize],
        fleet: &mut Option<Fleet>,
    ) -> Result<()> {
        let pid = server.pid();
        let fleet_no = self.fleets.get();
        self.fleets.set(fleet_no + 1);
        // 127.0.1.1, 127.0.1.2, …: a fresh source address per fleet, so earlier fleets'
        // connections in TIME_WAIT never exhaust the ephemeral ports.
        let source = IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            1 + (fleet_no / 250) as u8,
            1 + (fleet_no % 250) as u8,
        ));
        let timeout = Duration::from_secs(self.fleet.timeout_secs);
        let started = Instant::now();
        let cache_root = self.bench.path().join("dp-caches");
        let (batch, tls) = (self.fleet.batch, self.tls.clone());
        let lost = NodeLost(kinds[0].target);
        let fleet = fleet.insert(match kinds[0].target {
            Target::Etcd | Target::EtcdTls => {
                let tls = (kinds[0].target == Target::EtcdTls).then_some(tls);
                let watchers = etcd::Watchers::connect(cluster, source, tls, n, batch).await;
                Fleet::Etcd(watchers.context(lost)?)
            }
            _ => {
                let prefix = format!("sim-{fleet_no}");
                let connected = sim::Fleet::connect(cluster, source, tls, n, batch, &prefix);
                let mut fleet = connected.await.context(lost)?;
                let first = fleet.receive(|_| true, timeout).await;
                fleet.handle(first.context(lost)?, &self.keys, now(), 0, &cache_root)?;
                Fleet::Cluster(fleet)
            }
        });
        for kind in kinds.iter_mut() {
            kind.connect_secs.push(started.elapsed().as_secs_f64());
        }
        for &turn in (0..self.fleet.updates).flat_map(|_| turns) {
            let kind = &mut kinds[turn];
            let background = background(pid, self.idle_window()).await?;
            let me = std::process::id();
            let (cpu_before, sim_before) = (cpu_time_precise(pid)?, cpu_time_precise(me)?);
            let meter = Meter::start(&[], &[])?;
            let (id, sent, answered) = self.trigger(kind.target, &mut kind.conn).await?;
            let lost = NodeLost(kind.target);
            let (received, snapshots) = match &mut *fleet {
                Fleet::Cluster(fleet) => {
                    let wanted = |s: &Snapshot| s.license.as_ref().is_some_and(|l| l.id == id);
                    let received = fleet.receive(wanted, timeout).await.context(lost)?;
                    (received.iter().map(|(at, _)| *at).collect(), Some(received))
                }
                Fleet::Etcd(watchers) => {
                    let received = watchers.receive(id.parse()?, timeout).await;
                    (received.context(lost)?, None)
                }
            };
            let window = sent.elapsed().as_secs_f64();
            let busy = |pid, before| -> Result<f64> {
                Ok(cpu_time_precise(pid)?.saturating_sub(before).as_secs_f64() / window)
            };
            let busy = [busy(pid, cpu_before)?, busy(me, sim_before)?];
            let mut deliveries: Vec<Duration> = received
                .iter()
                .map(|at| at.saturating_duration_since(sent))
                .collect();
            deliveries.sort();
            if let (Fleet::Cluster(fleet), Some(snapshots)) = (&mut *fleet, snapshots) {
                let sample = self.fleet.cache_sample;
                let handling = fleet.handle(snapshots, &self.keys, now(), sample, &cache_root)?;
                kind.verify.extend(handling.verify);
                kind.cache_write.extend(handling.cache_write);
                kind.refused += handling.refused;
            }
            wait_idle(pid, background, self.idle_window()).await?;
            let usage = meter.stop()?;
            // What the update cost, without what the pings cost meanwhile.
            let pings = Duration::from_secs_f64(background * sent.elapsed().as_secs_f64());
            let server_cpu = cpu_time_precise(pid)?
                .saturating_sub(cpu_before)
                .saturating_sub(pings);
            let ms = |d: Option<&Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
            let p = |p| ms(percentile(&deliveries, p).as_ref());
            kind.updates.push(vec![
                ms(deliveries.first()),
                p(50.0),
                p(99.0),
                p(100.0),
                ms(Some(&(answered - sent))),
                ms(Some(&server_cpu)),
                busy[0],
                busy[1],
                usage.steal,
                usage.other_cores,
            ]);
            kind.rss_connected = kind.rss_connected.max(rss(pid)?);
        }
        Ok(())
    }

    /// Makes the server send a new license to every stream; returns the license id, the
    /// instant the request was sent and the instant the 201 was read.
    async fn trigger(&self, target: Target, conn: &mut Conn) -> Result<(String, Instant, Instant)> {
        let serial = self.licenses.get();
        self.licenses.set(serial + 1);
        let key = format!("FANOUT-{serial:08}-{:016x}", rand::random::<u64>());
        let payload = self
            .bench
            .signer
            .sign(harness::payload(&key, 100_000))?
            .to_json();
        let sent_id = uuid::Uuid::new_v4().to_string();
        let (uri, body) = match target {
            Target::Baseline | Target::Etcd | Target::EtcdTls => (
                "/push",
                json!({ "id": sent_id, "payload": payload, "created_at": now(), "updated_at": now() }),
            ),
            _ => ("/licenses", json!({ "payload": payload })),
        };
        let body = serde_json::to_vec(&body)?;
        let (id, sent) = match conn {
            Conn::Http(addr) => {
                let mut http = Http::connect(*addr).await?;
                let sent = Instant::now();
                let answer = http.expect("POST", uri, Some(&body), 201).await?;
                match target {
                    Target::Baseline => (sent_id, sent),
                    _ => (record_id(&answer)?, sent),
                }
            }
            // The record the baseline pushes, as etcd's value.
            Conn::Etcd(client) => {
                let sent = Instant::now();
                (etcd::put(client, body).await?.to_string(), sent)
            }
        };
        Ok((id, sent, Instant::now()))
    }
}

/// The CPU time per second a process uses while nothing happens but its data planes'
/// pings and HTTP/2 keep-alives: waits until two consecutive idle windows used about the
/// same, within [`IDLE_TIMEOUT`].
async fn background(pid: u32, window: Duration) -> Result<f64> {
    let deadline = Instant::now() + IDLE_TIMEOUT;
    let mut last = cpu_time_precise(pid)?;
    let mut previous: Option<Duration> = None;
    loop {
        tokio::time::sleep(window).await;
        let now = cpu_time_precise(pid)?;
        let used = now.saturating_sub(last);
        last = now;
        let close = |a: Duration, b: Duration| a <= b.mul_f64(1.25) + IDLE_CPU;
        if let Some(previous) = previous.filter(|&p| close(used, p) && close(p, used)) {
            return Ok(used.min(previous).as_secs_f64() / window.as_secs_f64());
        }
        ensure!(
            Instant::now() < deadline,
            "process {pid} did not settle within {IDLE_TIMEOUT:?}"
        );
        previous = Some(used);
    }
}

/// Waits until the process is back to its `background` CPU rate (within 25 % plus
/// [`IDLE_CPU`] per idle window): its work on the last change (Acks, the inventory
/// write, closed streams) is done.
async fn wait_idle(pid: u32, background: f64, window: Duration) -> Result<()> {
    let deadline = Instant::now() + IDLE_TIMEOUT;
    let allowed = Duration::from_secs_f64(background * window.as_secs_f64() * 1.25) + IDLE_CPU;
    let mut last = cpu_time_precise(pid)?;
    loop {
        tokio::time::sleep(window).await;
        let now = cpu_time_precise(pid)?;
        if now.saturating_sub(last) <= allowed {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "process {pid} did not become idle within {IDLE_TIMEOUT:?}"
        );
        last = now;
    }
}

fn now() -> UnixTime {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as UnixTime)
}
