//! `charter-bench admin`: the admin API of a release `charter-cp`, as a separate process.
//!
//! - GET req/s of `GET /licenses/{id}`, `GET /licenses` (a page of 100) and
//!   `GET /licenses?size=10`, against an axum hello-world answering the same bytes, in
//!   interleaved rounds, each a window after a warm-up, over N keep-alive connections;
//! - the latency of sequential durable `POST /licenses` against the floor any durable write
//!   pays on the same store (a raw append+fsync on the data dir's filesystem; with
//!   `--postgres`, a bare autocommit `INSERT` into the private PostgreSQL server the CP
//!   stores in), and the CP's store called in this process (`SledStore`, `PgStore`), in
//!   interleaved blocks so all see the same disk conditions.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};
use charter_store::{Change, LicenseRecord, PgStore, SledStore, Store};
use serde_json::{json, Value};
use tokio_postgres::{Client, Statement};
use uuid::Uuid;

use crate::harness::{
    self, cpu_time_precise, pg_connect, progress, spread, tree_cpu_time, Bench, Common, Latency,
    Meter, Pinning, Postgres, Server, ServerRuntime,
};
use crate::load::{self, Http, LoadArgs, Window};
use crate::report::Report;

/// Writes are interleaved in blocks of this many (floor, POST, in-process store, repeat).
const WRITE_BLOCK: usize = 20;
/// Writes of each kind in the first block, a warm-up, not recorded.
const WRITE_WARMUP: usize = 10;

/// Which measurements a run makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Phase {
    /// GET throughput and durable writes.
    All,
    /// GET throughput only.
    Get,
    /// Durable writes only.
    Write,
}

/// Flags of `charter-bench admin`.
#[derive(Debug, clap::Args, serde::Serialize)]
pub struct AdminArgs {
    /// Which measurements to make. Default: `all`, or `write` with `--postgres` (reads are
    /// served from the same in-memory snapshot whatever the store).
    #[arg(long, value_enum)]
    pub phase: Option<Phase>,
    /// Store the CP's licenses in a private PostgreSQL server (started by the bench, as
    /// `nobody` when run as root) and compare its POSTs with a bare `INSERT` there.
    #[arg(long)]
    pub postgres: bool,
    /// Licenses stored before measuring (each write block deletes what it adds).
    #[arg(long, default_value_t = 200, value_parser = harness::range::<usize>(1, 10_000))]
    pub licenses: usize,
    /// Measured durable writes of each kind.
    #[arg(long, default_value_t = 200, value_parser = harness::range::<usize>(1, 100_000))]
    pub writes: usize,
    /// Bytes appended per raw write+fsync.
    #[arg(long, default_value_t = 1536, value_parser = harness::range::<usize>(1, 1 << 20))]
    pub fsync_bytes: usize,
    #[command(flatten)]
    pub load: LoadArgs,
    #[command(flatten)]
    pub common: Common,
}

/// Runs the admin benchmark.
pub fn main(args: AdminArgs) -> Result<Report> {
    let default = if args.postgres {
        Phase::Write
    } else {
        Phase::All
    };
    let phase = args.phase.unwrap_or(default);
    harness::run(args.common.clone(), true, async |bench| {
        let pg = match args.postgres {
            true => Some(Postgres::start(&bench.pinning).await?),
            false => None,
        };
        let cp = bench
            .start_cp(
                "cp-data",
                "127.0.0.1:0".parse()?,
                None,
                pg.as_ref().map(Postgres::url).as_deref(),
            )
            .await?;
        let mut report = Report::new("admin", &args, &bench.pinning);
        let store = pg
            .as_ref()
            .map_or("sled".to_owned(), |pg| pg.version.clone());
        report.set("store", store.into());
        progress(format_args!("seeding {} licenses", args.licenses));
        let nonce: u32 = rand::random();
        let mut conn = Http::connect(cp.addr()).await?;
        let mut ids = Vec::new();
        for i in 0..args.licenses {
            let answer = post(&mut conn, bench, &format!("SEED-{nonce:08x}-{i:06}")).await?;
            ids.push(record_id(&answer)?);
        }
        if phase != Phase::Write {
            gets(bench, &args.load, &cp, &ids, &mut report).await?;
        }
        if phase != Phase::Get {
            writes(bench, &args, &cp, pg.as_ref(), nonce, &mut report).await?;
        }
        Ok(report)
    })
}

/// Starts the hello-world and measures every GET target in interleaved rounds.
async fn gets(
    bench: &Bench,
    load: &LoadArgs,
    cp: &Server,
    ids: &[String],
    report: &mut Report,
) -> Result<()> {
    // The hello-world answers exactly the bytes the CP answers, so only the work behind
    // them differs.
    let mut conn = Http::connect(cp.addr()).await?;
    let record = conn.get_ok(&format!("/licenses/{}", ids[0])).await?;
    let hello = bench
        .start_hello(&record, &conn.get_ok("/licenses").await?)
        .await?;
    let id_uris: Vec<String> = ids.iter().map(|id| format!("/licenses/{id}")).collect();
    let one = |uri: &str| vec![uri.to_owned()];
    let targets: [(&str, &Server, Vec<String>); 5] = [
        ("hello-world (record body)", &hello, one("/record")),
        ("GET /licenses/{id}", cp, id_uris),
        ("GET /licenses (size 100)", cp, one("/licenses")),
        ("GET /licenses?size=10", cp, one("/licenses?size=10")),
        ("hello-world (page body)", &hello, one("/page")),
    ];
    let mut samples: Vec<Vec<Window>> = vec![Vec::new(); targets.len()];
    for round in 1..=load.rounds {
        for ((label, server, uris), samples) in targets.iter().zip(&mut samples) {
            let requests: Arc<[Vec<u8>]> = uris
                .iter()
                .map(|u| Http::encode(server.addr(), "GET", u, None))
                .collect();
            let watched = [server.pid()];
            let window = harness::retrying(
                load.retries,
                label,
                async || load::measure(server.addr(), &requests, load, &watched).await,
                |w| w.usage.disturbed(),
            )
            .await?;
            progress(format_args!(
                "round {round}/{}: {label:<26} {:>9.0} req/s",
                load.rounds,
                window.rps()
            ));
            samples.push(window);
        }
    }
    let series: Vec<(String, Vec<Window>)> = targets
        .iter()
        .map(|t| t.0.to_owned())
        .zip(samples)
        .collect();
    let rps = |index: usize| load::median_of(&series[index].1, Window::rps);
    let title = format!(
        "GET: {} connections, median (min, max) of {} rounds",
        load.connections, load.rounds
    );
    // Against the hello-world answering a record, and the one answering the page.
    load::table(
        report,
        title,
        &series,
        "server",
        "x hello record|x hello page",
        |i| vec![rps(i) / rps(0), rps(i) / rps(4)],
    );
    Ok(())
}

/// The durable writes, in blocks: the floor on the servers' core, the POSTs, and the
/// in-process store; each block then deletes what it added, untimed.
async fn writes(
    bench: &Bench,
    args: &AdminArgs,
    cp: &Server,
    pg: Option<&Postgres>,
    nonce: u32,
    report: &mut Report,
) -> Result<()> {
    let pinning = &bench.pinning;
    let text = |key: String| -> Result<String> {
        Ok(bench.signer.sign(harness::payload(&key, 1))?.to_json())
    };
    let durable = match pg {
        Some(pg) => Durable::postgres(pg, pinning, text(format!("BARE-{nonce:08x}"))?).await?,
        None => Durable::sled(bench.path(), pinning, args.fsync_bytes)?,
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut conn = Http::connect(cp.addr()).await?;
    let roots: Vec<u32> = pg.map(|pg| pg.postmaster).into_iter().collect();
    let pg_cpu = || tree_cpu_time(&roots);
    progress(format_args!(
        "{} durable writes of each kind, in blocks of {WRITE_BLOCK}",
        args.writes
    ));
    let [mut floor, mut posts, mut stored] = [(); 3].map(|_| Vec::new());
    let (mut blocks, mut remeasured, mut key) = (Vec::new(), 0, 0);
    let mut warm = false;
    while posts.len() < args.writes {
        let size = if warm {
            WRITE_BLOCK.min(args.writes - posts.len())
        } else {
            WRITE_WARMUP
        };
        // Sign before timing: the POST latency is the server's, not ours.
        let mut bodies = Vec::new();
        let mut texts = Vec::new();
        for _ in 0..size {
            key += 1;
            bodies.push(post_body(bench, &format!("POST-{nonce:08x}-{key:06}"))?);
            texts.push(text(format!("STORE-{nonce:08x}-{key:06}"))?);
        }
        let meter = Meter::start(&[], &roots)?;
        let block_floor = durable.floor(size).await?;
        let (cp_before, pg_before) = (cpu_time_precise(cp.pid())?, pg_cpu()?);
        let mut block_posts = Vec::new();
        let mut created = Vec::new();
        for body in &bodies {
            let started = Instant::now();
            let answer = conn.expect("POST", "/licenses", Some(body), 201).await?;
            block_posts.push(started.elapsed());
            created.push(record_id(&answer)?);
        }
        let pg_per_post = pg_cpu()?.saturating_sub(pg_before) / size as u32;
        let block_stored = durable.store(texts, now).await?;
        // Sampled after the store block, so background work the POSTs started has had its
        // time to finish.
        let cp_per_post = cpu_time_precise(cp.pid())?.saturating_sub(cp_before) / size as u32;
        let usage = meter.stop()?;
        for id in created {
            conn.expect("DELETE", &format!("/licenses/{id}"), None, 204)
                .await?;
        }
        // Let the work those deletes started in the CP finish before the next block.
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !std::mem::replace(&mut warm, true) {
            continue;
        }
        if usage.disturbed() && remeasured < args.writes.div_ceil(WRITE_BLOCK) * args.load.retries {
            remeasured += 1;
            progress(format_args!("write block disturbed (other processes {:.2} cores, steal {:.0}%); measuring it again", usage.other_cores, usage.steal * 100.0));
            continue;
        }
        blocks.push(
            json!({ "usage": usage.to_json(), "cp_cpu_per_post_us": cp_per_post.as_secs_f64() * 1e6,
                            "pg_cpu_per_post_us": pg.map(|_| pg_per_post.as_secs_f64() * 1e6) }),
        );
        floor.extend(block_floor);
        posts.extend(block_posts);
        stored.extend(block_stored);
    }
    let (floor_label, store_label) = durable.labels.clone();
    let title = format!(
        "Durable writes: {} of each kind, in blocks of {WRITE_BLOCK}, into a store of {} licenses",
        posts.len(),
        args.licenses
    );
    report.table(title, "write|p50 µs|p99 µs|mean µs|max µs|x floor p50");
    let floor_p50 = Latency::of(&floor).context("no write samples")?.p50;
    let mut latencies = serde_json::Map::new();
    for (label, samples) in [
        (floor_label.as_str(), &floor),
        ("POST /licenses (201, durable)", &posts),
        (store_label, &stored),
    ] {
        let l = Latency::of(samples).context("no write samples")?;
        let ratio = l.p50.as_secs_f64() / floor_p50.as_secs_f64();
        report.row(
            label,
            [l.p50, l.p99, l.mean, l.max]
                .map(|d| d.as_secs_f64() * 1e6)
                .into_iter()
                .chain([ratio]),
        );
        latencies.insert(label.to_owned(), l.to_json());
    }
    report.table(
        "Per POST, and what disturbed the blocks kept",
        "figure|median|min|max",
    );
    for (label, key) in [
        ("CP CPU per POST µs", "cp_cpu_per_post_us"),
        ("PostgreSQL CPU per POST µs", "pg_cpu_per_post_us"),
    ] {
        report.row(label, spread(blocks.iter().filter_map(|b| b[key].as_f64())));
    }
    for (label, key) in [("other processes cores", "other_cores"), ("steal", "steal")] {
        report.row(
            label,
            spread(blocks.iter().filter_map(|b| b["usage"][key].as_f64())),
        );
    }
    report.row(
        "blocks measured again",
        [remeasured as f64, f64::NAN, f64::NAN],
    );
    report.set("write_latencies", latencies.into());
    report.set("write_blocks", blocks.into());
    Ok(())
}

async fn post(conn: &mut Http, bench: &Bench, key: &str) -> Result<bytes::Bytes> {
    conn.expect("POST", "/licenses", Some(&post_body(bench, key)?), 201)
        .await
}

/// The JSON body of a `POST /licenses` for a freshly signed license.
fn post_body(bench: &Bench, key: &str) -> Result<Vec<u8>> {
    let document = bench
        .signer
        .sign(harness::payload(key, 1))
        .context("signing a bench license")?;
    Ok(serde_json::to_vec(
        &json!({ "payload": document.to_json() }),
    )?)
}

/// The `id` of the record in an answer.
pub fn record_id(answer: &[u8]) -> Result<String> {
    let record: Value = serde_json::from_slice(answer).context("parsing an answer")?;
    record["id"]
        .as_str()
        .map(str::to_owned)
        .context("an answer without an id")
}

/// The store the control plane under test writes to, with its baselines: the floor any
/// durable write there pays, and the CP's own store opened in this process (which tells the
/// store's cost from the HTTP and license-verification cost of `POST /licenses`). Both run
/// where the CP runs: the floor on a thread on the servers' core, the store on a runtime
/// placed there.
struct Durable {
    /// The floor's label and the in-process store's.
    labels: (String, &'static str),
    runtime: ServerRuntime,
    floor: Floor,
    store: Arc<InProcessStore>,
}

enum Floor {
    /// Appends a record to one file and fsyncs it: what a minimal write-ahead log does per
    /// acknowledged write.
    Fsync(Arc<Mutex<(File, Vec<u8>)>>),
    /// An autocommit `INSERT` of a license-sized row with a prepared statement: one round
    /// trip and one write-ahead log flush per write.
    Insert(Arc<BareInsert>),
}

/// `n` appends and fsyncs, each timed.
fn fsyncs(log: &Mutex<(File, Vec<u8>)>, n: usize) -> Result<Vec<Duration>> {
    let mut log = log
        .lock()
        .map_err(|_| anyhow!("the raw fsync log is poisoned"))?;
    let (file, record) = &mut *log;
    let mut times = Vec::new();
    for _ in 0..n {
        let started = Instant::now();
        file.write_all(record)?;
        file.sync_all()?;
        times.push(started.elapsed());
    }
    Ok(times)
}

impl Durable {
    fn sled(dir: &Path, pinning: &Pinning, record_bytes: usize) -> Result<Durable> {
        let path = dir.join("raw-fsync.log");
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        // Make the file's creation durable first, so the loop measures appends only.
        file.sync_all()?;
        File::open(dir).and_then(|d| d.sync_all())?;
        let record = (0..record_bytes)
            .map(|i| b"0123456789abcdef"[i % 16])
            .collect();
        let runtime = pinning.server_runtime()?;
        let store =
            SledStore::open(&dir.join("store-inproc")).context("opening the in-process store")?;
        Ok(Durable {
            labels: (
                format!("raw write({record_bytes} B) + fsync"),
                "SledStore::insert alone",
            ),
            runtime,
            floor: Floor::Fsync(Arc::new(Mutex::new((file, record)))),
            store: Arc::new(InProcessStore::new(store)),
        })
    }

    async fn postgres(pg: &Postgres, pinning: &Pinning, payload: String) -> Result<Durable> {
        let runtime = pinning.server_runtime()?;
        // The store gets a database of its own, so its revisions do not move the CP's.
        let (url, store_url) = (pg.url(), pg.create_database("bench_store").await?);
        let bytes = payload.len();
        let server = runtime
            .run(async move { BareInsert::connect(&url, payload).await })
            .await??;
        let store = runtime
            .run(async move { PgStore::open(&store_url).await })
            .await??;
        Ok(Durable {
            labels: (
                format!("bare INSERT ({bytes} B text, autocommit)"),
                "PgStore::commit alone",
            ),
            runtime,
            floor: Floor::Insert(Arc::new(server)),
            store: Arc::new(InProcessStore::new(store)),
        })
    }

    /// `n` writes of the floor on the servers' core, each timed.
    async fn floor(&self, n: usize) -> Result<Vec<Duration>> {
        match &self.floor {
            Floor::Fsync(log) => {
                let log = log.clone();
                self.runtime.run(async move { fsyncs(&log, n) }).await?
            }
            Floor::Insert(insert) => {
                let insert = insert.clone();
                self.runtime
                    .run(async move { insert.times(n).await })
                    .await?
            }
        }
    }

    /// Each of `texts` committed to the in-process store, timed.
    async fn store(&self, texts: Vec<String>, now: i64) -> Result<Vec<Duration>> {
        let store = self.store.clone();
        self.runtime
            .run(async move {
                let mut times = Vec::new();
                for text in &texts {
                    times.push(store.insert(text, now).await?);
                }
                Ok(times)
            })
            .await?
    }
}

struct BareInsert {
    client: Client,
    statement: Statement,
    payload: String,
}

impl BareInsert {
    /// Connects (the connection runs on the current runtime) and makes the table.
    async fn connect(url: &str, payload: String) -> Result<BareInsert> {
        let client = pg_connect(url).await?;
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS bench_bare_insert (id uuid PRIMARY KEY, payload text NOT NULL, \
                 created_at bigint NOT NULL, updated_at bigint NOT NULL, revision bigint NOT NULL)",
            )
            .await?;
        let statement = client
            .prepare("INSERT INTO bench_bare_insert (id, payload, created_at, updated_at, revision) VALUES ($1, $2, $3, $4, $5)")
            .await?;
        Ok(BareInsert {
            client,
            statement,
            payload,
        })
    }

    async fn times(&self, n: usize) -> Result<Vec<Duration>> {
        let mut times = Vec::new();
        for i in 0..n {
            let (id, at) = (Uuid::new_v4(), i as i64);
            let started = Instant::now();
            self.client
                .execute(&self.statement, &[&id, &self.payload, &at, &at, &at])
                .await?;
            times.push(started.elapsed());
        }
        Ok(times)
    }
}

/// The control plane's store, opened in this process.
struct InProcessStore {
    store: Box<dyn Store>,
    revision: AtomicU64,
}

impl InProcessStore {
    fn new(store: impl Store + 'static) -> InProcessStore {
        InProcessStore {
            store: Box::new(store),
            revision: AtomicU64::new(0),
        }
    }

    async fn insert(&self, payload: &str, now: i64) -> Result<Duration> {
        let base = self.revision.load(Ordering::SeqCst);
        let record = LicenseRecord {
            id: Uuid::new_v4(),
            payload: payload.to_owned(),
            checksum: charter_store::checksum_of(payload),
            created_at: now,
            updated_at: now,
            revision: base + 1,
        };
        let started = Instant::now();
        let revision = self.store.commit(base, Change::Put(record)).await?;
        let elapsed = started.elapsed();
        self.revision.store(revision, Ordering::SeqCst);
        Ok(elapsed)
    }
}
