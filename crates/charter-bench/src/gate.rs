//! `charter-bench gate`: the gate's throughput and added latency against the same upstream
//! called directly.
//!
//! One run starts the real `charter-cp` (a release build) with its cluster port on
//! shared-mode mTLS (certificates made by `charterctl gen-cert`), adds a freshly signed
//! license, starts the hello-world upstream, a bare TCP relay (`relay.rs`) and `charter-dp`
//! in gate mode in front of it, waits until the data plane's `GET /status/ready` answers
//! 200, then measures `GET /record` directly against the upstream, through the relay and
//! through the gate, in interleaved rounds, at one connection (latency) and at N keep-alive
//! connections (throughput): req/s and the p50 and p99 of every request's latency in each
//! window. It prints the medians over the rounds with their extremes, the throughput ratio
//! (gate / direct), the added p99 (gate p99 − direct p99) and the verdict on each goal, and
//! the same for the relay: what a proxy that does no HTTP work reaches on this machine.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use bytes::{Bytes, BytesMut};
use charter_license::LicenseSigner;
use hyper::{Method, StatusCode, Uri};
use serde_json::{json, Map, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::load::{Conn, OTHER_LOAD_LIMIT, REQUEST_TIMEOUT, STEAL_LIMIT};
use crate::procs::{self, Pinning, Server};
use crate::stats::{self, Latency};

/// Gate req/s must be at least this fraction of the direct req/s.
const THROUGHPUT_GOAL: f64 = 0.8;
/// The gate may add at most this much to the p99 latency, in microseconds.
const ADDED_P99_GOAL_MICROS: f64 = 200.0;
/// Most requests one connection sends in one window (a bound on the loop besides time).
const MAX_REQUESTS_PER_CONNECTION: usize = 50_000_000;
/// The pause before measuring a disturbed window again.
const RETRY_PAUSE: Duration = Duration::from_secs(2);

/// Flags of `charter-bench gate`.
#[derive(Debug, clap::Args)]
pub struct GateArgs {
    /// The charter-cp binary (a release build). Default: next to this executable.
    #[arg(long)]
    pub cp_bin: Option<PathBuf>,
    /// The charter-dp binary measured (a release build). Default: next to this executable.
    #[arg(long)]
    pub dp_bin: Option<PathBuf>,
    /// The charterctl binary that makes the cluster certificates. Default: next to this
    /// executable.
    #[arg(long)]
    pub ctl_bin: Option<PathBuf>,
    /// Concurrent keep-alive connections of the throughput load (the latency load uses 1).
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// Length of each measurement window, in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub duration_secs: f64,
    /// Load before each window, in seconds (connections are opened in it).
    #[arg(long, default_value_t = 1.0)]
    pub warmup_secs: f64,
    /// Rounds; each round measures direct and gate once at each concurrency, in turn.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Times a window disturbed by other processes' CPU use is measured again.
    #[arg(long, default_value_t = 3)]
    pub retries: usize,
    /// Plaintext cluster port (`--cluster-insecure`) instead of shared-mode mTLS.
    #[arg(long)]
    pub cluster_insecure: bool,
    /// Directory for the run's temporary files. Default: the system temp dir.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Do not pin the servers and the load generator to separate CPUs.
    #[arg(long)]
    pub no_pin: bool,
}

struct Settings {
    cp_bin: PathBuf,
    dp_bin: PathBuf,
    ctl_bin: PathBuf,
    self_bin: PathBuf,
    connections: usize,
    warmup: Duration,
    duration: Duration,
    rounds: usize,
    retries: usize,
    insecure: bool,
    work_dir: PathBuf,
    /// CPUs of the machine, read before this process is pinned to one.
    cpus: usize,
}

impl Settings {
    fn from_args(args: &GateArgs) -> Result<Settings> {
        crate::load::check_flags(
            args.connections,
            args.duration_secs,
            args.warmup_secs,
            args.rounds,
            args.retries,
        )?;
        let self_bin = std::env::current_exe().context("locating this executable")?;
        let work_dir = procs::work_dir(args.work_dir.as_deref())?;
        Ok(Settings {
            cp_bin: procs::binary(args.cp_bin.as_deref(), "charter-cp", "--cp-bin")?,
            dp_bin: procs::binary(args.dp_bin.as_deref(), "charter-dp", "--dp-bin")?,
            ctl_bin: procs::binary(args.ctl_bin.as_deref(), "charterctl", "--ctl-bin")?,
            self_bin,
            connections: args.connections,
            warmup: Duration::from_secs_f64(args.warmup_secs),
            duration: Duration::from_secs_f64(args.duration_secs),
            rounds: args.rounds,
            retries: args.retries,
            insecure: args.cluster_insecure,
            work_dir,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        })
    }
}

/// Runs the gate benchmark and prints its report on standard output.
pub fn main(args: GateArgs) -> Result<()> {
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

/// One measured window.
#[derive(Debug, Clone)]
struct Sample {
    rps: f64,
    latency: Latency,
    /// CPU time of the serving processes (upstream, plus the gate or the relay when through
    /// one) per request, in microseconds.
    server_micros: f64,
    /// The proxy's (gate's or relay's) own CPU time per request, in microseconds (0 when
    /// direct).
    proxy_micros: f64,
    /// The load generator's (this process's) CPU time per request, in microseconds.
    client_micros: f64,
    other_cores: f64,
    steal: f64,
}

impl Sample {
    fn disturbed(&self) -> bool {
        self.other_cores > OTHER_LOAD_LIMIT || self.steal > STEAL_LIMIT
    }
}

/// Where the load is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// To the upstream itself.
    Direct,
    /// Through the bare TCP relay (`relay.rs`): what any proxy on this path costs.
    Relay,
    /// Through charter-dp's gate.
    Gate,
}

impl Path {
    const ALL: [Path; 3] = [Path::Direct, Path::Relay, Path::Gate];

    fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Relay => "through a bare relay",
            Path::Gate => "through the gate",
        }
    }
}

/// The samples of one (concurrency, path) pair.
struct Series {
    connections: usize,
    path: Path,
    samples: Vec<Sample>,
}

async fn run(settings: &Settings, pinning: &Pinning) -> Result<String> {
    let root = tempfile::Builder::new()
        .prefix("charter-bench-gate-")
        .tempdir_in(&settings.work_dir)
        .with_context(|| format!("creating a temp dir in {}", settings.work_dir.display()))?;
    let dir = root.path();
    let signer = LicenseSigner::from_seed(rand::random());
    let key_path = dir.join("signing.pub");
    std::fs::write(&key_path, signer.trusted_key().to_pem())
        .with_context(|| format!("writing {}", key_path.display()))?;

    let cluster_flags: Vec<OsString> = if settings.insecure {
        vec!["--cluster-insecure".into()]
    } else {
        let certs = dir.join("certs");
        progress(format_args!(
            "making cluster certificates with charterctl gen-cert"
        ));
        let out = Command::new(&settings.ctl_bin)
            .arg("gen-cert")
            .arg("--out-dir")
            .arg(&certs)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", settings.ctl_bin.display()))?;
        ensure!(
            out.status.success(),
            "charterctl gen-cert failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        vec![
            "--cluster-cert".into(),
            certs.join("cluster.crt").into(),
            "--cluster-cert-key".into(),
            certs.join("cluster.key").into(),
        ]
    };
    let cluster_addr = free_port()?;

    let mut report = String::new();
    write_header(&mut report, settings, pinning)?;

    progress(format_args!("starting {}", settings.cp_bin.display()));
    let cp = {
        let data_dir = dir.join("cp-data");
        let key_path = key_path.clone();
        let cluster_flags = cluster_flags.clone();
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
                    "--cluster-listen".into(),
                    cluster_addr.to_string().into(),
                ];
                args.extend(cluster_flags.iter().cloned());
                args
            },
            pinning,
            dir.join("charter-cp.log"),
            "/status",
        )
        .await?
    };

    progress(format_args!("adding a license"));
    let mut conn = Conn::connect(cp.addr()).await?;
    let document = signer
        .sign(payload("GATE-BENCH"))
        .context("signing the bench license")?;
    let body = serde_json::to_vec(&json!({ "payload": document.to_json() }))
        .context("encoding a POST body")?;
    let (status, answer) = conn
        .request(
            Method::POST,
            &Uri::from_static("/licenses"),
            Some(Bytes::from(body)),
        )
        .await?;
    if status != StatusCode::CREATED {
        bail!(
            "POST /licenses answered {status}: {}",
            String::from_utf8_lossy(&answer)
        );
    }
    // The upstream answers a license record's bytes, as a realistic small JSON body.
    let record_file = dir.join("record.json");
    std::fs::write(&record_file, &answer).context("writing the record body")?;
    drop(conn);

    progress(format_args!("starting the hello-world upstream"));
    let upstream = Server::start(
        "upstream (hello-world)",
        &settings.self_bin,
        move |addr| {
            let args: [OsString; 7] = [
                "hello".into(),
                "--listen".into(),
                addr.to_string().into(),
                "--record".into(),
                record_file.clone().into(),
                "--page".into(),
                record_file.clone().into(),
            ];
            args.into()
        },
        pinning,
        dir.join("hello.log"),
        "/record",
    )
    .await?;

    progress(format_args!(
        "starting the bare relay in front of the upstream"
    ));
    let relay = {
        let upstream_addr = upstream.addr();
        Server::start(
            "bare relay",
            &settings.self_bin,
            move |addr| {
                let args: [OsString; 5] = [
                    "relay".into(),
                    "--listen".into(),
                    addr.to_string().into(),
                    "--upstream".into(),
                    upstream_addr.to_string().into(),
                ];
                args.into()
            },
            pinning,
            dir.join("relay.log"),
            "/record",
        )
        .await?
    };

    progress(format_args!(
        "starting {} in gate mode; waiting for /status/ready",
        settings.dp_bin.display()
    ));
    let proxy_addr = free_port()?;
    let gate = {
        let data_dir = dir.join("dp-data");
        let upstream_url = format!("http://{}", upstream.addr());
        Server::start(
            "charter-dp",
            &settings.dp_bin,
            move |addr| {
                let mut args: Vec<OsString> = vec![
                    "--control-plane".into(),
                    cluster_addr.to_string().into(),
                    "--data-dir".into(),
                    data_dir.clone().into(),
                    "--status-listen".into(),
                    addr.to_string().into(),
                    "--trusted-key".into(),
                    key_path.clone().into(),
                    "--proxy-listen".into(),
                    proxy_addr.to_string().into(),
                    "--upstream".into(),
                    upstream_url.clone().into(),
                ];
                args.extend(cluster_flags.iter().cloned());
                args
            },
            pinning,
            dir.join("charter-dp.log"),
            "/status/ready",
        )
        .await?
    };

    // The gate must forward the upstream's answer unchanged.
    let record = Uri::from_static("/record");
    let direct_body = Conn::connect(upstream.addr())
        .await?
        .get_ok(&record)
        .await?;
    let gate_body = Conn::connect(proxy_addr).await?.get_ok(&record).await?;
    ensure!(
        direct_body == gate_body,
        "the gate answered a different body than the upstream"
    );

    let mut series = Vec::new();
    for connections in [1, settings.connections] {
        for path in Path::ALL {
            series.push(Series {
                connections,
                path,
                samples: Vec::new(),
            });
        }
    }
    let request: Arc<[u8]> =
        Arc::from(format!("GET /record HTTP/1.1\r\nhost: {}\r\n\r\n", upstream.addr()).as_bytes());
    for round in 1..=settings.rounds {
        // Alternate which path goes first, so neither always follows the other.
        let order: Vec<usize> = if round % 2 == 1 {
            (0..series.len()).collect()
        } else {
            (0..series.len()).rev().collect()
        };
        for index in order {
            let entry = &mut series[index];
            let (target, proxy_pid) = match entry.path {
                Path::Direct => (upstream.addr(), None),
                Path::Relay => (relay.addr(), Some(relay.pid())),
                Path::Gate => (proxy_addr, Some(gate.pid())),
            };
            let mut attempt = 0;
            let sample = loop {
                attempt += 1;
                let sample = measure(
                    target,
                    request.clone(),
                    entry.connections,
                    settings,
                    upstream.pid(),
                    proxy_pid,
                )
                .await
                .with_context(|| format!("measuring {}", label(entry)))?;
                progress(format_args!(
                    "round {round}/{}: {:<24} {:>8.0} req/s, p50 {}, p99 {} (servers {:.1} µs/req, load generator {:.1} µs/req; other processes {:.2} cores, steal {:.0}%)",
                    settings.rounds,
                    label(entry),
                    sample.rps,
                    format_micros(micros(sample.latency.p50)),
                    format_micros(micros(sample.latency.p99)),
                    sample.server_micros,
                    sample.client_micros,
                    sample.other_cores,
                    sample.steal * 100.0,
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
            entry.samples.push(sample);
        }
    }
    drop(gate);
    drop(relay);
    drop(upstream);
    drop(cp);
    write_results(&mut report, settings, &series)?;
    Ok(report)
}

fn label(series: &Series) -> String {
    format!("{} x{}", series.path.name(), series.connections)
}

/// A closed loop of `GET /record` over `connections` keep-alive connections to `addr`:
/// req/s and every request's latency inside the window after the warm-up.
async fn measure(
    addr: SocketAddr,
    request: Arc<[u8]>,
    connections: usize,
    settings: &Settings,
    upstream_pid: u32,
    proxy_pid: Option<u32>,
) -> Result<Sample> {
    let window_start = Instant::now() + settings.warmup;
    let window_end = window_start + settings.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        tasks.spawn(timed_loop(addr, request.clone(), window_start, window_end));
    }
    let servers_cpu = || -> Result<(Duration, Duration)> {
        let gate = match proxy_pid {
            Some(pid) => procs::cpu_time(pid)?,
            None => Duration::ZERO,
        };
        Ok((procs::cpu_time(upstream_pid)? + gate, gate))
    };

    tokio::time::sleep_until(window_start).await;
    let (servers_before, gate_before) = servers_cpu()?;
    let client_before = procs::cpu_time(std::process::id())?;
    let cpus_before = procs::cpu_counters()?;
    tokio::time::sleep_until(window_end).await;
    let (servers_after, gate_after) = servers_cpu()?;
    let client_after = procs::cpu_time(std::process::id())?;
    let cpus_after = procs::cpu_counters()?;

    let mut latencies = Vec::new();
    let collect = async {
        while let Some(joined) = tasks.join_next().await {
            latencies.extend(joined.context("a load connection task failed")??);
        }
        Ok::<_, anyhow::Error>(())
    };
    tokio::time::timeout(REQUEST_TIMEOUT, collect)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "load connections did not finish within {REQUEST_TIMEOUT:?} of the window's end"
            )
        })??;
    let latency = Latency::of(&latencies).context("no request completed in the window")?;
    let seconds = settings.duration.as_secs_f64();
    let requests = latencies.len() as f64;
    let servers = servers_after.saturating_sub(servers_before).as_secs_f64();
    let gate = gate_after.saturating_sub(gate_before).as_secs_f64();
    let client = client_after.saturating_sub(client_before).as_secs_f64();
    let charged = procs::charged_cores(&cpus_before, &cpus_after, seconds);
    Ok(Sample {
        rps: requests / seconds,
        latency,
        server_micros: servers * 1e6 / requests,
        proxy_micros: gate * 1e6 / requests,
        client_micros: client * 1e6 / requests,
        other_cores: (charged - (servers + client) / seconds).max(0.0),
        steal: procs::max_steal_between(&cpus_before, &cpus_after),
    })
}

/// One connection's closed loop: the latency of each request that completed in the window.
async fn timed_loop(
    addr: SocketAddr,
    request: Arc<[u8]>,
    window_start: Instant,
    window_end: Instant,
) -> Result<Vec<Duration>> {
    ensure!(
        addr.ip().is_loopback(),
        "the bench only talks to loopback, not {addr}"
    );
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true).context("setting TCP_NODELAY")?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut latencies = Vec::new();
    for _ in 0..MAX_REQUESTS_PER_CONNECTION {
        let sent = Instant::now();
        if sent >= window_end {
            break;
        }
        stream
            .write_all(&request)
            .await
            .with_context(|| format!("sending a request to {addr}"))?;
        crate::load::read_response(&mut stream, &mut buf)
            .await
            .with_context(|| format!("reading an answer from {addr}"))?;
        let done = Instant::now();
        if sent >= window_start && done < window_end {
            latencies.push(done - sent);
        }
    }
    Ok(latencies)
}

/// A loopback port free right now.
fn free_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    listener.local_addr().context("reading the probe's address")
}

/// A license payload with Kong's fields, in force for years.
fn payload(key: &str) -> Map<String, Value> {
    let value = json!({
        "admin_seats": "1",
        "customer": "Bench Customer",
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

fn progress(message: std::fmt::Arguments<'_>) {
    eprintln!("charter-bench: {message}");
}

fn write_header(out: &mut String, s: &Settings, pinning: &Pinning) -> Result<()> {
    let command: Vec<String> = std::env::args().collect();
    writeln!(out, "charter-bench gate")?;
    writeln!(out, "  command:     {}", command.join(" "))?;
    writeln!(out, "  charter-dp:  {}", s.dp_bin.display())?;
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
    writeln!(
        out,
        "  cluster:     {}",
        if s.insecure {
            "plaintext (--cluster-insecure)"
        } else {
            "shared-mode mTLS (charterctl gen-cert)"
        }
    )?;
    if cfg!(debug_assertions) || s.dp_bin.components().any(|c| c.as_os_str() == "debug") {
        writeln!(
            out,
            "  WARNING:     a debug build is being measured; use release builds (scripts/bench gate)"
        )?;
    }
    Ok(())
}

fn write_results(out: &mut String, s: &Settings, series: &[Series]) -> Result<()> {
    writeln!(out)?;
    writeln!(
        out,
        "GET /record (a {}-round interleaved run, {:.1} s windows after {:.1} s warm-up, keep-alive connections)",
        s.rounds,
        s.duration.as_secs_f64(),
        s.warmup.as_secs_f64()
    )?;
    writeln!(
        out,
        "  {:<22} {:>22} {:>24} {:>24} {:>10} {:>10}",
        "path", "req/s (min-max)", "p50 (min-max)", "p99 (min-max)", "servers", "of which proxy"
    )?;
    for entry in series {
        let rps: Vec<f64> = entry.samples.iter().map(|x| x.rps).collect();
        let p50: Vec<f64> = entry
            .samples
            .iter()
            .map(|x| micros(x.latency.p50))
            .collect();
        let p99: Vec<f64> = entry
            .samples
            .iter()
            .map(|x| micros(x.latency.p99))
            .collect();
        let server: Vec<f64> = entry.samples.iter().map(|x| x.server_micros).collect();
        let gate: Vec<f64> = entry.samples.iter().map(|x| x.proxy_micros).collect();
        writeln!(
            out,
            "  {:<22} {:>22} {:>24} {:>24} {:>10} {:>10}",
            label(entry),
            format!("{:.0} ({:.0}-{:.0})", med(&rps), min(&rps), max(&rps)),
            format!(
                "{} ({}-{})",
                format_micros(med(&p50)),
                format_micros(min(&p50)),
                format_micros(max(&p50))
            ),
            format!(
                "{} ({}-{})",
                format_micros(med(&p99)),
                format_micros(min(&p99)),
                format_micros(max(&p99))
            ),
            format!("{:.1} µs", med(&server)),
            if entry.path == Path::Direct {
                "-".to_owned()
            } else {
                format!("{:.1} µs", med(&gate))
            },
        )?;
    }
    writeln!(
        out,
        "  medians of the rounds (min-max: the extremes); p50, p99: of every request's latency in a window;\n  \
         servers: CPU time of the upstream plus, through a proxy, the proxy's, per request (median);\n  \
         of which proxy: charter-dp's or the relay's share; the bare relay copies bytes with no HTTP,\n  \
         so it costs what any proxy on this path must (two more loopback hops and their wake-ups)"
    )?;
    let samples = || series.iter().flat_map(|x| &x.samples);
    let other = samples().map(|x| x.other_cores).fold(0.0, f64::max);
    let steal = samples().map(|x| x.steal).fold(0.0, f64::max);
    let disturbed = samples().filter(|x| x.disturbed()).count();
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

    writeln!(out)?;
    writeln!(out, "Goals")?;
    for triple in series.chunks(Path::ALL.len()) {
        let [direct, relay, gate] = triple else {
            continue;
        };
        let rps = |x: &Series| med(&x.samples.iter().map(|x| x.rps).collect::<Vec<_>>());
        let p99 = |x: &Series| {
            med(&x
                .samples
                .iter()
                .map(|x| micros(x.latency.p99))
                .collect::<Vec<_>>())
        };
        let p50 = |x: &Series| {
            med(&x
                .samples
                .iter()
                .map(|x| micros(x.latency.p50))
                .collect::<Vec<_>>())
        };
        let ratio = |x: &Series| rps(x) / rps(direct).max(f64::MIN_POSITIVE);
        let added = |x: &Series| p99(x) - p99(direct);
        writeln!(
            out,
            "  {:>3} connection(s): throughput {:>5.2}x direct (goal >= {THROUGHPUT_GOAL}x): {:<6}  added p99 {:>7} (goal <= {ADDED_P99_GOAL_MICROS:.0} µs): {:<6}  (added p50 {})",
            direct.connections,
            ratio(gate),
            verdict(ratio(gate) >= THROUGHPUT_GOAL),
            format_micros(added(gate)),
            verdict(added(gate) <= ADDED_P99_GOAL_MICROS),
            format_micros(p50(gate) - p50(direct)),
        )?;
        writeln!(
            out,
            "      the bare relay:      {:>5.2}x direct, added p99 {:>7}, added p50 {}  (a proxy doing no HTTP work; the gate has {:.2}x its throughput)",
            ratio(relay),
            format_micros(added(relay)),
            format_micros(p50(relay) - p50(direct)),
            rps(gate) / rps(relay).max(f64::MIN_POSITIVE),
        )?;
    }
    if disturbed > 0 {
        writeln!(
            out,
            "  (verdicts from disturbed windows: the p99s then measure the other processes, not the gate)"
        )?;
    }
    Ok(())
}

fn verdict(met: bool) -> &'static str {
    if met {
        "MET"
    } else {
        "MISSED"
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn format_micros(micros: f64) -> String {
    if micros.abs() < 1000.0 {
        format!("{micros:.0} µs")
    } else {
        format!("{:.2} ms", micros / 1000.0)
    }
}

fn med(values: &[f64]) -> f64 {
    stats::median(values).unwrap_or(0.0)
}

fn min(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NEG_INFINITY, f64::max)
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
