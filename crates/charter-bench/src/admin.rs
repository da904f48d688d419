//! `charter-bench admin`: the admin API benchmark.
//!
//! One run starts the real `charter-cp` (a release build) and a hello-world axum server as
//! separate processes on loopback, seeds licenses, then measures
//!
//! - req/s of `GET /licenses/{id}`, `GET /licenses` (default page of 100) and
//!   `GET /licenses?size=10` against the hello-world answering a record-sized body, in
//!   interleaved rounds, each a fixed window after a warm-up, over N keep-alive connections;
//! - the latency of sequential durable `POST /licenses` against a raw write+fsync loop on
//!   the same filesystem (and, to show where the time goes, `SledStore::insert` called
//!   in-process), interleaved in blocks so all three see the same disk conditions;
//!
//! and prints a table with the verdict on each goal. With `--postgres` the CP stores in a
//! private PostgreSQL server the bench starts, and its POSTs are compared with a bare
//! autocommit `INSERT` into that server (and `PgStore::commit` in-process) instead.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use charter_license::LicenseSigner;
use hyper::{Method, StatusCode, Uri};
use serde_json::{json, Map, Value};

use crate::load::{self, ClientKind, Conn, LoadShape, Throughput, OTHER_LOAD_LIMIT, STEAL_LIMIT};
use crate::pg::Postgres;
use crate::procs::{self, Pinning, Server};
use crate::stats::{self, Latency};
use crate::writes::Durable;

/// GET req/s must be at least this fraction of the hello-world's.
const GET_GOAL: f64 = 0.7;
/// Where the two hello-world baselines sit among the GET targets.
const RECORD_HELLO: usize = 0;
const PAGE_HELLO: usize = 4;
/// The POST p50 must be at most this multiple of the raw write+fsync p50…
const POST_GOAL: f64 = 2.0;
/// …and on PostgreSQL, at most this multiple of a bare `INSERT`'s.
const POST_GOAL_PG: f64 = 1.5;
/// Bytes the disk may write per durable write (data, journal and metadata blocks) before a
/// write block counts as disturbed by other processes' I/O: a fsync's journal commit
/// carries every other file's pending data too, so others' writes slow ours.
const DISK_LIMIT_PER_WRITE: u64 = 64 * 1024;
/// The pause after a write block's clean-up, so the CP's background work on it is done.
const SETTLE: Duration = Duration::from_millis(100);
/// The pause before measuring a disturbed window again.
const RETRY_PAUSE: Duration = Duration::from_secs(2);
/// Writes are interleaved in blocks of this many (raw, POST, in-process store, repeat).
const WRITE_BLOCK: usize = 20;
/// Writes of each kind done before the measured ones (one block), not recorded.
const WRITE_WARMUP: usize = 10;

/// Which measurements a run makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Phase {
    /// GET throughput and durable writes.
    All,
    /// GET throughput only.
    Get,
    /// Durable writes only.
    Write,
}

impl Phase {
    fn gets(self) -> bool {
        matches!(self, Phase::All | Phase::Get)
    }

    fn writes(self) -> bool {
        matches!(self, Phase::All | Phase::Write)
    }
}

/// Flags of `charter-bench admin`.
#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// The charter-cp binary to measure (a release build). Default: `charter-cp` next to
    /// this executable.
    #[arg(long)]
    pub cp_bin: Option<PathBuf>,
    /// Concurrent keep-alive connections of the GET load, one request in flight on each.
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// Which measurements to make (the goals are judged on `all`). Default: `all`, or
    /// `write` with `--postgres` (reads are served from the same in-memory snapshot
    /// whatever the store).
    #[arg(long, value_enum)]
    pub phase: Option<Phase>,
    /// Store the CP's licenses in a private PostgreSQL server (started by the bench, as
    /// `nobody` when run as root) and compare its POSTs with a bare `INSERT` there.
    #[arg(long)]
    pub postgres: bool,
    /// The load generator's HTTP client.
    #[arg(long, value_enum, default_value_t = ClientKind::Lean)]
    pub client: ClientKind,
    /// Length of each GET measurement window, in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub duration_secs: f64,
    /// Load before each window, in seconds (connections are opened in it).
    #[arg(long, default_value_t = 1.0)]
    pub warmup_secs: f64,
    /// Times a GET window or a write block is measured again when something outside the
    /// bench disturbed it (other processes' CPU or disk use, or the hypervisor's steal).
    #[arg(long, default_value_t = 3)]
    pub retries: usize,
    /// Rounds of GET measurements; each round measures every target once, in turn.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Licenses stored before measuring (each write block deletes what it adds).
    #[arg(long, default_value_t = 200)]
    pub licenses: usize,
    /// Measured durable writes of each kind (POSTs, raw fsyncs, in-process inserts).
    #[arg(long, default_value_t = 200)]
    pub writes: usize,
    /// Bytes appended per raw write+fsync.
    #[arg(long, default_value_t = 1536)]
    pub fsync_bytes: usize,
    /// Directory for the run's temporary files (the CP's data dir and the raw fsync file
    /// share it, so they share a filesystem). Default: the system temp dir.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Do not pin the servers and the load generator to separate CPUs.
    #[arg(long)]
    pub no_pin: bool,
}

/// The validated settings of a run.
struct Settings {
    phase: Phase,
    postgres: bool,
    cp_bin: PathBuf,
    self_bin: PathBuf,
    shape: LoadShape,
    rounds: usize,
    retries: usize,
    licenses: usize,
    writes: usize,
    fsync_bytes: usize,
    work_dir: PathBuf,
    cpus: usize,
}

impl Settings {
    fn from_args(args: &AdminArgs) -> Result<Settings> {
        load::check_flags(
            args.connections,
            args.duration_secs,
            args.warmup_secs,
            args.rounds,
            args.retries,
        )?;
        ensure!(
            (1..=10_000).contains(&args.licenses),
            "--licenses must be 1 to 10000"
        );
        ensure!(
            (1..=100_000).contains(&args.writes),
            "--writes must be 1 to 100000"
        );
        ensure!(
            (1..=1 << 20).contains(&args.fsync_bytes),
            "--fsync-bytes must be 1 to 1048576"
        );
        let self_bin = std::env::current_exe().context("locating this executable")?;
        let cp_bin = procs::binary(args.cp_bin.as_deref(), "charter-cp", "--cp-bin")?;
        let work_dir = procs::work_dir(args.work_dir.as_deref())?;
        let default_phase = if args.postgres {
            Phase::Write
        } else {
            Phase::All
        };
        Ok(Settings {
            phase: args.phase.unwrap_or(default_phase),
            postgres: args.postgres,
            cp_bin,
            self_bin,
            shape: LoadShape {
                connections: args.connections,
                warmup: Duration::from_secs_f64(args.warmup_secs),
                duration: Duration::from_secs_f64(args.duration_secs),
                client: args.client,
            },
            rounds: args.rounds,
            retries: args.retries,
            licenses: args.licenses,
            writes: args.writes,
            fsync_bytes: args.fsync_bytes,
            work_dir,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        })
    }
}

/// Runs the admin benchmark and prints its report on standard output.
pub fn main(args: AdminArgs) -> Result<()> {
    let settings = Settings::from_args(&args)?;
    // Read the clock tick rate now, not inside the first measurement window.
    procs::cpu_time(std::process::id())?;
    // Before any runtime exists, so every thread of this process is pinned.
    let pinning = Pinning::apply(!args.no_pin);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = runtime.block_on(run(&settings, &pinning))?;
    print!("{report}");
    Ok(())
}

/// One GET target of the throughput table.
struct Target {
    label: &'static str,
    on_cp: bool,
    uris: Arc<[Uri]>,
    /// The target whose req/s the goal compares with, as an index into the targets: the
    /// hello-world answering the same bytes, the same way. `None` for the baselines.
    judged_against: Option<usize>,
    samples: Vec<Throughput>,
}

async fn run(settings: &Settings, pinning: &Pinning) -> Result<String> {
    let root = tempfile::Builder::new()
        .prefix("charter-bench-")
        .tempdir_in(&settings.work_dir)
        .with_context(|| format!("creating a temp dir in {}", settings.work_dir.display()))?;
    let dir = root.path();
    let signer = LicenseSigner::from_seed(rand::random());
    let key_path = dir.join("signing.pub");
    std::fs::write(&key_path, signer.trusted_key().to_pem())
        .with_context(|| format!("writing {}", key_path.display()))?;
    let data_dir = dir.join("cp-data");

    let pg = if settings.postgres {
        progress(format_args!("starting PostgreSQL"));
        Some(Postgres::start(pinning).await?)
    } else {
        None
    };
    let mut report = String::new();
    write_header(&mut report, settings, pinning, dir, pg.as_ref())?;

    progress(format_args!("starting {}", settings.cp_bin.display()));
    let cp = {
        let data_dir = data_dir.clone();
        let database: Vec<OsString> = match &pg {
            Some(pg) => vec!["--database-url".into(), pg.url().into()],
            None => Vec::new(),
        };
        Server::start(
            "charter-cp",
            &settings.cp_bin,
            move |addr| {
                let mut args: Vec<OsString> = vec![
                    "--data-dir".into(),
                    data_dir.clone().into(),
                    "--admin-listen".into(),
                    addr.to_string().into(),
                    "--trusted-key".into(),
                    key_path.clone().into(),
                    // The cluster port is not measured; keep it on loopback, on any free
                    // port, and without certificates.
                    "--cluster-listen".into(),
                    "127.0.0.1:0".into(),
                    "--cluster-insecure".into(),
                ];
                args.extend(database.iter().cloned());
                args
            },
            pinning,
            dir.join("charter-cp.log"),
            "/status",
        )
        .await?
    };

    progress(format_args!("seeding {} licenses", settings.licenses));
    let nonce: u32 = rand::random();
    let mut conn = Conn::connect(cp.addr()).await?;
    let licenses_uri: Uri = Uri::from_static("/licenses");
    let mut ids = Vec::with_capacity(settings.licenses);
    for i in 0..settings.licenses {
        let body = post_body(&signer, &format!("SEED-{nonce:08x}-{i:06}"))?;
        let (status, answer) = conn
            .request(Method::POST, &licenses_uri, Some(body))
            .await?;
        ensure_created(status, &answer)?;
        ids.push(record_id(&answer)?);
    }

    drop(conn);

    let targets = if settings.phase.gets() {
        let targets = measure_gets(settings, pinning, &cp, dir, &ids).await?;
        write_throughput(&mut report, settings, &targets)?;
        targets
    } else {
        Vec::new()
    };
    let writes = if settings.phase.writes() {
        let writes =
            measure_writes(settings, pinning, &signer, &cp, dir, pg.as_ref(), nonce).await?;
        write_writes(&mut report, &writes)?;
        Some(writes)
    } else {
        None
    };
    drop(cp);
    write_verdicts(&mut report, &targets, writes.as_ref())?;
    Ok(report)
}

/// Starts the hello-world and measures every GET target in interleaved rounds.
async fn measure_gets(
    settings: &Settings,
    pinning: &Pinning,
    cp: &Server,
    dir: &Path,
    ids: &[String],
) -> Result<Vec<Target>> {
    let mut conn = Conn::connect(cp.addr()).await?;
    let licenses_uri = Uri::from_static("/licenses");
    // The hello-world answers exactly the bytes the CP answers, so only the work behind
    // them differs.
    let record_body = conn
        .get_ok(&format!("/licenses/{}", ids[0]).parse()?)
        .await?;
    let page_body = conn.get_ok(&licenses_uri).await?;
    let record_file = dir.join("record.json");
    let page_file = dir.join("page.json");
    std::fs::write(&record_file, &record_body).context("writing the record body")?;
    std::fs::write(&page_file, &page_body).context("writing the page body")?;
    drop(conn);

    progress(format_args!("starting the hello-world baseline"));
    let hello = Server::start(
        "hello-world",
        &settings.self_bin,
        move |addr| {
            let args: [OsString; 7] = [
                "hello".into(),
                "--listen".into(),
                addr.to_string().into(),
                "--record".into(),
                record_file.clone().into(),
                "--page".into(),
                page_file.clone().into(),
            ];
            args.into()
        },
        pinning,
        dir.join("hello.log"),
        "/record",
    )
    .await?;

    let id_uris: Vec<Uri> = ids
        .iter()
        .map(|id| format!("/licenses/{id}").parse())
        .collect::<Result<_, _>>()
        .context("building license URIs")?;
    let mut targets = vec![
        Target {
            label: "hello-world (record body)",
            on_cp: false,
            uris: Arc::from(vec![Uri::from_static("/record")]),
            judged_against: None,
            samples: Vec::new(),
        },
        Target {
            label: "GET /licenses/{id}",
            on_cp: true,
            uris: Arc::from(id_uris),
            judged_against: Some(RECORD_HELLO),
            samples: Vec::new(),
        },
        Target {
            label: "GET /licenses (size 100)",
            on_cp: true,
            uris: Arc::from(vec![licenses_uri.clone()]),
            // 66 KiB: against the hello-world answering those bytes. The record
            // hello-world is in the table too; with this body it is itself at about 0.5x.
            judged_against: Some(PAGE_HELLO),
            samples: Vec::new(),
        },
        Target {
            label: "GET /licenses?size=10",
            on_cp: true,
            uris: Arc::from(vec![Uri::from_static("/licenses?size=10")]),
            // No hello-world answers these 6.8 KiB; the record one is the stricter.
            judged_against: Some(RECORD_HELLO),
            samples: Vec::new(),
        },
        Target {
            label: "hello-world (page body)",
            on_cp: false,
            uris: Arc::from(vec![Uri::from_static("/page")]),
            judged_against: None,
            samples: Vec::new(),
        },
    ];
    ensure!(
        targets[RECORD_HELLO].label == "hello-world (record body)"
            && targets[PAGE_HELLO].label == "hello-world (page body)",
        "the hello-world baselines moved in the target list"
    );
    for round in 1..=settings.rounds {
        for target in &mut targets {
            let server = if target.on_cp { cp } else { &hello };
            let mut attempt = 0;
            let sample = loop {
                attempt += 1;
                let sample = load::measure(
                    server.addr(),
                    target.uris.clone(),
                    settings.shape,
                    server.pid(),
                )
                .await
                .with_context(|| format!("measuring {}", target.label))?;
                progress(format_args!(
                    "round {round}/{}: {:<26} {:>9.0} req/s (server process {:.2} cores, load generator {:.2}, other processes {:.2}, steal {:.0}%; CPUs busy {})",
                    settings.rounds,
                    target.label,
                    sample.rps(),
                    sample.server_cores,
                    sample.client_cores,
                    sample.other_cores,
                    sample.steal * 100.0,
                    format_busy(&sample.cpu_busy),
                ));
                if !sample.disturbed() || attempt > settings.retries {
                    break sample;
                }
                progress(format_args!(
                    "something outside the bench disturbed that window; measuring it again ({attempt}/{})",
                    settings.retries
                ));
                tokio::time::sleep(RETRY_PAUSE).await;
            };
            target.samples.push(sample);
        }
    }
    drop(hello);
    Ok(targets)
}

/// The latencies of the three kinds of durable write.
struct Writes {
    /// The labels of the baseline's row and of the in-process store's.
    labels: (String, &'static str),
    /// Whether the CP stored in PostgreSQL (the baseline is then a bare `INSERT`).
    postgres: bool,
    /// The raw write+fsync (or the bare `INSERT`) on the servers' core: the baseline.
    raw: Latency,
    /// The same on the load generator's core, for comparison.
    raw_client_core: Latency,
    post: Latency,
    store: Latency,
    /// Licenses in the CP's store when each block starts.
    stored: usize,
    /// Blocks measured again because something disturbed them.
    remeasured: usize,
    /// The worst disturbance among the blocks kept: other processes' CPU use in cores,
    /// the largest steal share of any CPU, and the most bytes the disk wrote in a block.
    other_cores: f64,
    steal: f64,
    disk_bytes: Option<u64>,
    /// The CP's CPU time per POST (median over the blocks kept), which includes work a
    /// write triggers in the background.
    cp_cpu_per_post: Duration,
    /// PostgreSQL's CPU time per POST, from the first POST of a block to the 201 of its
    /// last (median over the blocks kept).
    pg_cpu_per_post: Option<Duration>,
}

/// One block's samples of each kind.
#[derive(Default)]
struct Block {
    raw: Vec<Duration>,
    raw_client_core: Vec<Duration>,
    post: Vec<Duration>,
    store: Vec<Duration>,
}

async fn measure_writes(
    settings: &Settings,
    pinning: &Pinning,
    signer: &LicenseSigner,
    cp: &Server,
    dir: &Path,
    pg: Option<&Postgres>,
    nonce: u32,
) -> Result<Writes> {
    let mut durable = match pg {
        Some(pg) => {
            let text = signer
                .sign(payload(&format!("BARE-{nonce:08x}-000000")))
                .context("signing a bench license")?
                .to_json();
            Durable::postgres(pg, pinning, text).await?
        }
        None => {
            let durable = Durable::sled(dir, settings.fsync_bytes)?;
            let same_fs = std::fs::metadata(dir.join("cp-data"))?.dev()
                == std::fs::metadata(dir.join("raw-fsync"))?.dev();
            ensure!(
                same_fs,
                "the raw fsync file and the CP's data dir are on different filesystems"
            );
            durable
        }
    };
    let pg_cpu = || pg.map(Postgres::cpu_time).transpose();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut conn = Conn::connect(cp.addr()).await?;
    let uri = Uri::from_static("/licenses");
    progress(format_args!(
        "{} durable writes of each kind, interleaved in blocks of {WRITE_BLOCK}",
        settings.writes
    ));

    let device = procs::device_of(pg.map_or(dir, Postgres::data_dir));
    let disk_written = || device.as_deref().and_then(procs::device_bytes_written);
    let blocks = settings.writes.div_ceil(WRITE_BLOCK);
    let mut kept = Block::default();
    let mut next_key = 0;
    let mut remeasured = 0;
    let (mut other_cores, mut steal) = (0.0, 0.0);
    let mut disk_bytes = None;
    let mut cp_cpu_per_post = Vec::new();
    let mut pg_cpu_per_post = Vec::new();
    // The first block is a warm-up; each block may be measured again up to `retries` times.
    let mut kept_blocks = 0;
    let mut warmed_up = false;
    for _ in 0..(1 + blocks * (1 + settings.retries)) {
        if kept_blocks == blocks {
            break;
        }
        let size = if warmed_up {
            WRITE_BLOCK.min(settings.writes - kept.post.len())
        } else {
            WRITE_WARMUP
        };
        // Sign before timing: the POST latency is the server's, not ours.
        let mut bodies = Vec::with_capacity(size);
        let mut texts = Vec::with_capacity(size);
        for _ in 0..size {
            next_key += 1;
            bodies.push(post_body(
                signer,
                &format!("POST-{nonce:08x}-{next_key:06}"),
            )?);
            let document = signer
                .sign(payload(&format!("STORE-{nonce:08x}-{next_key:06}")))
                .context("signing a bench license")?;
            texts.push(document.to_json());
        }

        let started = std::time::Instant::now();
        let cpus_before = procs::cpu_counters()?;
        let ours_before = procs::cpu_time(cp.pid())?
            + procs::cpu_time(std::process::id())?
            + pg_cpu()?.unwrap_or_default();
        let disk_before = disk_written();
        // The raw loop and the in-process store run on the CP's core, like the POSTs they
        // are compared with, while this thread waits; nothing else of the bench is in
        // flight meanwhile, so no request waits on them. The raw loop also runs here, on
        // the load generator's core, for the report.
        let [raw, raw_client_core] = durable.floor(pinning, size).await?;
        let mut block = Block {
            raw,
            raw_client_core,
            ..Block::default()
        };
        let cp_cpu_before = procs::cpu_time_precise(cp.pid())?;
        let pg_cpu_before = pg_cpu()?;
        let mut created = Vec::with_capacity(size);
        for body in bodies {
            let started = std::time::Instant::now();
            let (status, answer) = conn.request(Method::POST, &uri, Some(body)).await?;
            let elapsed = started.elapsed();
            ensure_created(status, &answer)?;
            block.post.push(elapsed);
            created.push(record_id(&answer)?);
        }
        let block_pg_cpu = pg_cpu()?
            .zip(pg_cpu_before)
            .map(|(after, before)| after.saturating_sub(before) / size as u32);
        // Sampled after the store block, so background work the POSTs started has had its
        // time to finish.
        let cp_cpu = |before| -> Result<Duration> {
            Ok(procs::cpu_time_precise(cp.pid())?.saturating_sub(before))
        };
        block.store = durable.store(pinning, texts, now).await?;
        let block_cp_cpu = cp_cpu(cp_cpu_before)? / u32::try_from(size).unwrap_or(u32::MAX);
        let seconds = started.elapsed().as_secs_f64();
        let cpus_after = procs::cpu_counters()?;
        let ours = (procs::cpu_time(cp.pid())?
            + procs::cpu_time(std::process::id())?
            + pg_cpu()?.unwrap_or_default())
        .saturating_sub(ours_before);
        let block_other = (procs::charged_cores(&cpus_before, &cpus_after, seconds)
            - ours.as_secs_f64() / seconds)
            .max(0.0);
        let block_steal = procs::max_steal_between(&cpus_before, &cpus_after);
        let block_disk = disk_written()
            .zip(disk_before)
            .map(|(after, before)| after.saturating_sub(before));
        // Delete what the block added, untimed, so every block POSTs into a store of the
        // seeded size: the CP's cost per write may grow with the licenses it holds.
        for id in created {
            let (status, answer) = conn
                .request(Method::DELETE, &format!("/licenses/{id}").parse()?, None)
                .await?;
            ensure!(
                status == StatusCode::NO_CONTENT,
                "DELETE /licenses/{id} answered {status}: {}",
                String::from_utf8_lossy(&answer)
            );
        }
        // Let the work those deletes started in the CP finish before the next block.
        tokio::time::sleep(SETTLE).await;

        if !warmed_up {
            warmed_up = true;
            continue;
        }
        let disturbed = block_other > OTHER_LOAD_LIMIT
            || block_steal > STEAL_LIMIT
            || block_disk.is_some_and(|b| b > DISK_LIMIT_PER_WRITE * 3 * size as u64);
        if disturbed && remeasured < blocks * settings.retries {
            remeasured += 1;
            progress(format_args!(
                "write block disturbed (other processes {block_other:.2} cores, steal {:.0}%, disk wrote {}); measuring it again",
                block_steal * 100.0,
                block_disk.map_or("?".to_owned(), format_mib),
            ));
            tokio::time::sleep(RETRY_PAUSE).await;
            continue;
        }
        other_cores = f64::max(other_cores, block_other);
        steal = f64::max(steal, block_steal);
        disk_bytes = disk_bytes.max(block_disk);
        cp_cpu_per_post.push(block_cp_cpu.as_secs_f64());
        pg_cpu_per_post.extend(block_pg_cpu.map(|d| d.as_secs_f64()));
        kept.raw.extend(block.raw);
        kept.raw_client_core.extend(block.raw_client_core);
        kept.post.extend(block.post);
        kept.store.extend(block.store);
        kept_blocks += 1;
    }
    let summary = |samples: &[Duration]| Latency::of(samples).context("no write samples");
    Ok(Writes {
        labels: durable.labels(),
        postgres: pg.is_some(),
        raw: summary(&kept.raw)?,
        raw_client_core: summary(&kept.raw_client_core)?,
        post: summary(&kept.post)?,
        store: summary(&kept.store)?,
        stored: settings.licenses,
        remeasured,
        other_cores,
        steal,
        disk_bytes,
        cp_cpu_per_post: Duration::from_secs_f64(stats::median(&cp_cpu_per_post).unwrap_or(0.0)),
        pg_cpu_per_post: stats::median(&pg_cpu_per_post).map(Duration::from_secs_f64),
    })
}

/// A license payload with Kong's fields and a unique key.
fn payload(key: &str) -> Map<String, Value> {
    let value = json!({
        "admin_seats": "1",
        "customer": format!("Bench Customer {key}"),
        "dataplanes": "1",
        "license_creation_date": "2025-01-01",
        "license_expiration_date": "2035-12-31",
        "license_key": key,
        "product_subscription": "Charter Enterprise",
        "support_plan": "None",
    });
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// The JSON body of a `POST /licenses` for a freshly signed license.
fn post_body(signer: &LicenseSigner, key: &str) -> Result<Bytes> {
    let document = signer
        .sign(payload(key))
        .context("signing a bench license")?;
    let body = serde_json::to_vec(&json!({ "payload": document.to_json() }))
        .context("encoding a POST body")?;
    Ok(Bytes::from(body))
}

/// The `id` of the record in a POST answer.
fn record_id(answer: &[u8]) -> Result<String> {
    let record: Value = serde_json::from_slice(answer).context("parsing a POST answer")?;
    record["id"]
        .as_str()
        .map(str::to_owned)
        .context("a POST answer without an id")
}

fn ensure_created(status: StatusCode, answer: &[u8]) -> Result<()> {
    if status != StatusCode::CREATED {
        bail!(
            "POST /licenses answered {status}: {}",
            String::from_utf8_lossy(answer)
        );
    }
    Ok(())
}

fn progress(message: std::fmt::Arguments<'_>) {
    eprintln!("charter-bench: {message}");
}

fn write_header(
    out: &mut String,
    s: &Settings,
    pinning: &Pinning,
    dir: &Path,
    pg: Option<&Postgres>,
) -> Result<()> {
    let command: Vec<String> = std::env::args().collect();
    writeln!(out, "charter-bench admin")?;
    writeln!(out, "  command:     {}", command.join(" "))?;
    writeln!(out, "  charter-cp:  {}", s.cp_bin.display())?;
    writeln!(
        out,
        "  machine:     {} CPUs ({}), Linux {}",
        s.cpus,
        cpu_model(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    )?;
    writeln!(out, "  placement:   {}", pinning.describe())?;
    if let Some(pg) = pg {
        writeln!(
            out,
            "  store:       {} (pinned with the servers)",
            pg.describe()
        )?;
    }
    writeln!(
        out,
        "  work dir:    {} ({})",
        dir.display(),
        filesystem_of(dir)
    )?;
    if cfg!(debug_assertions) || s.cp_bin.components().any(|c| c.as_os_str() == "debug") {
        writeln!(
            out,
            "  WARNING:     a debug build is being measured; use release builds (scripts/bench)"
        )?;
    }
    Ok(())
}

fn write_throughput(out: &mut String, s: &Settings, targets: &[Target]) -> Result<()> {
    writeln!(out)?;
    writeln!(
        out,
        "GET throughput: {} keep-alive connections ({:?} client), {:.1} s windows after {:.1} s warm-up, {} interleaved rounds",
        s.shape.connections,
        s.shape.client,
        s.shape.duration.as_secs_f64(),
        s.shape.warmup.as_secs_f64(),
        s.rounds
    )?;
    writeln!(
        out,
        "  {:<26} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}",
        "target",
        "req/s",
        "min",
        "max",
        "vs hello",
        "body",
        "server",
        "µs/req",
        "loadgen",
        "CPUs busy"
    )?;
    let hello = median_rps(&targets[0]);
    for target in targets {
        let rps = median_rps(target);
        let rates: Vec<f64> = target.samples.iter().map(Throughput::rps).collect();
        let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
        let max = rates.iter().copied().fold(0.0, f64::max);
        let server: Vec<f64> = target.samples.iter().map(|t| t.server_cores).collect();
        let client: Vec<f64> = target.samples.iter().map(|t| t.client_cores).collect();
        let cost: Vec<f64> = target
            .samples
            .iter()
            .map(Throughput::server_micros)
            .collect();
        // The busy CPUs of the median round.
        let busy = target
            .samples
            .iter()
            .min_by(|a, b| (a.rps() - rps).abs().total_cmp(&(b.rps() - rps).abs()))
            .map(|t| format_busy(&t.cpu_busy))
            .unwrap_or_default();
        writeln!(
            out,
            "  {:<26} {:>8.0} {:>8.0} {:>8.0} {:>7.2}x {:>8} {:>8.2} {:>8.1} {:>8.2} {:>9}",
            target.label,
            rps,
            min,
            max,
            rps / hello,
            format_bytes(target.samples.first().map_or(0, Throughput::body_size)),
            stats::median(&server).unwrap_or(0.0),
            stats::median(&cost).unwrap_or(0.0),
            stats::median(&client).unwrap_or(0.0),
            busy,
        )?;
    }
    writeln!(
        out,
        "  req/s: median of the rounds (min, max: the extremes); body: bytes per answer;\n  \
         server, loadgen: CPU time of each process in cores (median); µs/req: the server's\n  \
         CPU time per request (median; kernel network work in softirq not included); CPUs\n  \
         busy: each CPU's busy share in the median round, softirq and steal included"
    )?;
    let samples = || targets.iter().flat_map(|t| &t.samples);
    let other = samples().map(|t| t.other_cores).fold(0.0, f64::max);
    let steal = samples().map(|t| t.steal).fold(0.0, f64::max);
    let disturbed = samples().filter(|t| t.disturbed()).count();
    writeln!(
        out,
        "  outside the bench, in the windows kept: other processes up to {other:.2} cores, steal up to {:.0}% of a CPU",
        steal * 100.0
    )?;
    if disturbed > 0 {
        writeln!(
            out,
            "  WARNING: {disturbed} window(s) kept although disturbed (retries ran out); rerun on a quiet machine"
        )?;
    }
    Ok(())
}

fn write_writes(out: &mut String, w: &Writes) -> Result<()> {
    writeln!(out)?;
    writeln!(
        out,
        "Durable writes: {} sequential writes of each kind after {WRITE_WARMUP} warm-up, interleaved in blocks of {WRITE_BLOCK}, same filesystem",
        w.post.count
    )?;
    writeln!(
        out,
        "  {:<38} {:>9} {:>9} {:>9} {:>9} {:>12}",
        "write", "p50", "p99", "mean", "max", "p50 vs raw"
    )?;
    let rows = [
        (w.labels.0.clone(), w.raw),
        (
            "  the same on the load generator's CPU".to_owned(),
            w.raw_client_core,
        ),
        ("POST /licenses (201, durable)".to_owned(), w.post),
        (format!("  of which {} alone", w.labels.1), w.store),
    ];
    for (label, latency) in rows {
        writeln!(
            out,
            "  {:<38} {:>9} {:>9} {:>9} {:>9} {:>11.2}x",
            label,
            format_duration(latency.p50),
            format_duration(latency.p99),
            format_duration(latency.mean),
            format_duration(latency.max),
            ratio(latency.p50, w.raw.p50),
        )?;
    }
    writeln!(
        out,
        "  ({} alone: the CP's store called in this process, no HTTP and no signature check)",
        w.labels.1
    )?;
    writeln!(
        out,
        "  each block POSTs into a store of {} licenses (it deletes its own, untimed, after); \
         the CP used {} of CPU per POST (median of the blocks)",
        w.stored,
        format_duration(w.cp_cpu_per_post)
    )?;
    if let Some(pg) = w.pg_cpu_per_post {
        writeln!(
            out,
            "  PostgreSQL used {} of CPU per POST (its processes, from a block's first POST to its last 201)",
            format_duration(pg)
        )?;
    }
    writeln!(
        out,
        "  outside the bench, in the blocks kept: other processes up to {:.2} cores, steal up to {:.0}% of a CPU, \
         the disk wrote up to {} per block of {WRITE_BLOCK}x3 writes; {} block(s) measured again",
        w.other_cores,
        w.steal * 100.0,
        w.disk_bytes.map_or("?".to_owned(), format_mib),
        w.remeasured
    )?;
    let disk_limit = DISK_LIMIT_PER_WRITE * 3 * WRITE_BLOCK as u64;
    if w.other_cores > OTHER_LOAD_LIMIT
        || w.steal > STEAL_LIMIT
        || w.disk_bytes.is_some_and(|b| b > disk_limit)
    {
        writeln!(
            out,
            "  WARNING: some blocks kept were disturbed (retries ran out); rerun on a quiet machine"
        )?;
    }
    Ok(())
}

fn write_verdicts(out: &mut String, targets: &[Target], writes: Option<&Writes>) -> Result<()> {
    writeln!(out)?;
    writeln!(out, "Goals")?;
    for target in targets {
        let Some(baseline) = target.judged_against.and_then(|i| targets.get(i)) else {
            continue;
        };
        let ratio = median_rps(target) / median_rps(baseline).max(f64::MIN_POSITIVE);
        writeln!(
            out,
            "  {:<40} {:>6.2}x {} (goal >= {GET_GOAL}x): {}",
            target.label,
            ratio,
            baseline.label,
            verdict(ratio >= GET_GOAL)
        )?;
    }
    if let Some(w) = writes {
        let post = ratio(w.post.p50, w.raw.p50);
        let (baseline, goal) = if w.postgres {
            ("bare INSERT", POST_GOAL_PG)
        } else {
            ("raw fsync  ", POST_GOAL)
        };
        writeln!(
            out,
            "  {:<40} {:>6.2}x {baseline} (goal <= {goal}x): {}",
            "POST /licenses p50",
            post,
            verdict(post <= goal)
        )?;
    }
    Ok(())
}

/// Each CPU's busy share, as "97% 64%".
fn format_busy(busy: &[f64]) -> String {
    busy.iter()
        .map(|b| format!("{:.0}%", b * 100.0))
        .collect::<Vec<_>>()
        .join(" ")
}

fn verdict(met: bool) -> &'static str {
    if met {
        "MET"
    } else {
        "MISSED"
    }
}

fn median_rps(target: &Target) -> f64 {
    let rates: Vec<f64> = target.samples.iter().map(Throughput::rps).collect();
    stats::median(&rates).unwrap_or(0.0)
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(f64::MIN_POSITIVE)
}

fn format_duration(d: Duration) -> String {
    let micros = d.as_secs_f64() * 1e6;
    if micros < 1000.0 {
        format!("{micros:.0} µs")
    } else {
        format!("{:.2} ms", micros / 1000.0)
    }
}

fn format_mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0))
}

fn format_bytes(n: u64) -> String {
    if n < 10 * 1024 {
        format!("{n} B")
    } else {
        format!("{:.0} KiB", n as f64 / 1024.0)
    }
}

/// The CPU model from `/proc/cpuinfo`, or "unknown CPU".
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

/// The type and device of the filesystem holding `path`.
fn filesystem_of(path: &Path) -> String {
    procs::mount_of(path).map_or_else(
        || "unknown filesystem".to_owned(),
        |(device, kind)| format!("{kind} on {device}"),
    )
}
