//! `charter-bench gate`: `GET /record` from an upstream called directly, through a bare
//! TCP relay, through `charter-dp` in gate mode (connected to a release `charter-cp` over
//! shared-mode mTLS, holding a freshly signed license), and through its peers, nginx and
//! HAProxy, configured as an operator would (one worker or thread, keep-alive to the
//! upstream, no access log, the same forwarding headers). Every server runs on the
//! servers' core. Two upstreams: nginx answering a fixed 17-byte JSON (so the proxies' own
//! cost dominates) and the axum hello-world answering a license record. Interleaved rounds
//! at one connection (latency) and at N keep-alive connections (throughput): req/s, the
//! p50 and p99 of every request's latency in each window, and the CPU time per request of
//! the upstream and of the proxy.
//!
//! With `--callgrind`, nothing is timed: each proxy runs in turn under valgrind's callgrind
//! and the user-space instructions it executes per request are counted, a measure a busy
//! or slow-waking host does not disturb (the kernel's share is not in it).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::json;

use crate::harness::{self, free_port, progress, Bench, Common, Server};
use crate::load::{self, Http, LoadArgs, Window};
use crate::report::Report;

/// Flags of `charter-bench gate`.
#[derive(Debug, clap::Args, serde::Serialize)]
pub struct GateArgs {
    /// Plaintext cluster port (`--cluster-insecure`) instead of shared-mode mTLS.
    #[arg(long)]
    pub cluster_insecure: bool,
    /// The upstreams to measure behind: `nginx` (a fixed 17-byte JSON), `hello` (the axum
    /// hello-world answering a license record).
    #[arg(long, value_delimiter = ',', default_values_t = [Case::Nginx, Case::Hello])]
    pub upstreams: Vec<Case>,
    /// The hyper relay's header-field limit (the gate's is 256 each way). Default: hyper's
    /// own, 100, which costs it less per message.
    #[arg(long, value_parser = harness::range::<usize>(1, 10_000))]
    pub relay_max_headers: Option<usize>,
    /// Count each proxy's user-space instructions per request under valgrind's callgrind
    /// (`scripts/bench` installs valgrind) instead of timing windows.
    #[arg(long)]
    pub callgrind: bool,
    /// With `--callgrind`: the requests counted for each proxy (over four keep-alive
    /// connections, after a fifth as many to warm up).
    #[arg(long, requires = "callgrind", default_value_t = 10_000, value_parser = harness::range::<u64>(100, 10_000_000))]
    pub callgrind_requests: u64,
    /// With `--callgrind`: a directory to keep each proxy's profile in, for
    /// `callgrind_annotate`.
    #[arg(long, requires = "callgrind")]
    pub callgrind_out: Option<PathBuf>,
    #[command(flatten)]
    pub load: LoadArgs,
    #[command(flatten)]
    pub common: Common,
}

/// An upstream the proxies are measured in front of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Case {
    Nginx,
    Hello,
}

impl std::fmt::Display for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Case::Nginx => "nginx",
            Case::Hello => "hello",
        })
    }
}

/// Where the load is sent; the last two are the gate's peers.
const PATHS: [&str; 6] = [
    "direct",
    "bare relay",
    "hyper relay",
    "gate",
    "nginx",
    "haproxy",
];
const HYPER_RELAY: usize = 2;
const GATE: usize = 3;
const PEER_NGINX: usize = 4;
const PEER_HAPROXY: usize = 5;
const PEERS: [usize; 2] = [PEER_NGINX, PEER_HAPROXY];
/// The fixed answer of the nginx upstream.
const FIXED: &str = r#"{"answer":"okay"}"#;

/// Runs the gate benchmark.
pub fn main(args: GateArgs) -> Result<Report> {
    ensure!(!args.upstreams.is_empty(), "--upstreams names none");
    let (nginx, haproxy) = (system_binary("nginx")?, system_binary("haproxy")?);
    harness::run(args.common.clone(), true, async |bench| {
        let certs = match args.cluster_insecure {
            true => None,
            false => Some(bench.make_certs()?),
        };
        let cluster = free_port()?;
        let cp = bench
            .start_cp("cp-data", cluster, certs.as_ref(), None)
            .await?;
        let body = serde_json::to_vec(
            &json!({ "payload": bench.signer.sign(harness::payload("GATE-BENCH", 1))?.to_json() }),
        )?;
        let mut conn = Http::connect(cp.addr()).await?;
        let record = conn.expect("POST", "/licenses", Some(&body), 201).await?;

        let mut report = Report::new("gate", &args, &bench.pinning);
        let mut all = Vec::new();
        let mut counts = Vec::new();
        for &case in &args.upstreams {
            let upstream = match case {
                Case::Nginx => {
                    let config = format!(
                        "server {{ listen {{addr}}; location / {{ default_type application/json; return 200 '{FIXED}'; }} }}"
                    );
                    let name = format!("nginx-upstream-{case}");
                    start_nginx(bench, &[], &nginx, &name, &config).await?
                }
                Case::Hello => bench.start_hello(&record, &record).await?,
            };
            let to = upstream.addr();
            let proxies = Proxies {
                bench,
                case,
                to,
                cluster,
                certs: certs.as_ref(),
                relay_max_headers: args.relay_max_headers,
                nginx: &nginx,
                haproxy: &haproxy,
            };
            if args.callgrind {
                counts.push((case, count_all(&proxies, &args).await?));
                continue;
            }
            let mut started = Vec::new();
            for path in 1..PATHS.len() {
                started.push(proxies.start(path, &[]).await?);
            }
            // Every proxy must forward the upstream's answer unchanged.
            let direct = async { Http::connect(to).await?.get_ok("/record").await }
                .await
                .context("GET /record from the upstream")?;
            for ((addr, _), name) in started.iter().zip(&PATHS[1..]) {
                let body = async { Http::connect(*addr).await?.get_ok("/record").await }
                    .await
                    .with_context(|| format!("GET /record through {name}"))?;
                ensure!(
                    body == direct,
                    "{name} answered another body than the upstream"
                );
            }
            let targets: Vec<(SocketAddr, Vec<u32>)> = std::iter::once((to, vec![upstream.pid()]))
                .chain(
                    started
                        .iter()
                        .map(|(addr, proxy)| (*addr, vec![upstream.pid(), proxy.pid()])),
                )
                .collect();
            let windows = measure(&args, case, &targets, to).await?;
            all.push((case, windows));
        }
        drop(cp);

        for (case, windows) in all {
            table(&mut report, &args, case, windows);
        }
        for (case, counted) in counts {
            instructions_table(&mut report, &args, case, &counted);
        }
        Ok(report)
    })
}

/// Each target at 1 and at N connections, every round, in alternating order; the
/// windows by series (connections, then path).
async fn measure(
    args: &GateArgs,
    case: Case,
    targets: &[(SocketAddr, Vec<u32>)],
    host: SocketAddr,
) -> Result<Vec<(String, Vec<Window>)>> {
    let requests: Arc<[Vec<u8>]> = Arc::from([Http::encode(host, "GET", "/record", None)]);
    let series: Vec<(usize, usize)> = [1, args.load.connections]
        .into_iter()
        .flat_map(|c| (0..PATHS.len()).map(move |p| (c, p)))
        .collect();
    let mut samples: Vec<Vec<Window>> = vec![Vec::new(); series.len()];
    for round in 1..=args.load.rounds {
        // Alternate which path goes first, so none always follows another.
        let mut order: Vec<usize> = (0..series.len()).collect();
        if round % 2 == 0 {
            order.reverse();
        }
        for index in order {
            let (connections, path) = series[index];
            let (addr, watched) = &targets[path];
            let load = LoadArgs {
                connections,
                ..args.load.clone()
            };
            let label = format!("{case}: {} x{connections}", PATHS[path]);
            let window = harness::retrying(
                args.load.retries,
                &label,
                async || load::measure(*addr, &requests, &load, watched).await,
                |w| w.usage.disturbed(),
            )
            .await?;
            progress(format_args!(
                "round {round}/{}: {label:<24} {:>8.0} req/s, p50 {:?}, p99 {:?}",
                args.load.rounds,
                window.rps(),
                window.latency.p50,
                window.latency.p99
            ));
            samples[index].push(window);
        }
    }
    let labels = series
        .iter()
        .map(|&(c, p)| format!("{case}: {} x{c}", PATHS[p]));
    Ok(labels.zip(samples).collect())
}

/// The table of one upstream: each path against the upstream called directly, the bare
/// hyper relay (the floor of a proxy built on hyper) and the better of the gate's peers
/// (nginx, HAProxy) at the same concurrency.
fn table(report: &mut Report, args: &GateArgs, case: Case, series: Vec<(String, Vec<Window>)>) {
    let title = format!(
        "GET /record behind {case}: median (min, max) of {} rounds",
        args.load.rounds
    );
    let med = |i: usize, f: fn(&Window) -> f64| load::median_of(&series[i].1, f);
    let (p50, p99) = (|w: &Window| w.micros(50), |w: &Window| w.micros(99));
    let compare = |i: usize| {
        let first = i - i % PATHS.len();
        let peer_rps = PEERS.map(|p| med(first + p, Window::rps));
        let best = first + PEERS[if peer_rps[0] >= peer_rps[1] { 0 } else { 1 }];
        vec![
            med(i, Window::rps) / med(first, Window::rps),
            med(i, Window::rps) / med(first + HYPER_RELAY, Window::rps),
            med(i, Window::rps) / med(best, Window::rps),
            med(i, p50) - med(best, p50),
            med(i, p99) - med(best, p99),
        ]
    };
    load::table(
        report,
        title,
        &series,
        "upstream",
        "x direct req/s|x hyper relay req/s|x better peer req/s|p50 - peer's µs|p99 - peer's µs",
        compare,
    );
}

/// What starting the proxies in front of one upstream takes.
struct Proxies<'a> {
    bench: &'a Bench,
    case: Case,
    /// The upstream.
    to: SocketAddr,
    /// The control plane's cluster port, and its certificates.
    cluster: SocketAddr,
    certs: Option<&'a charter_tls::TlsFiles>,
    relay_max_headers: Option<usize>,
    nginx: &'a Path,
    haproxy: &'a Path,
}

impl Proxies<'_> {
    /// Starts the proxy of `PATHS[path]` (not `direct`), run by `wrapper` (none when
    /// empty): the address to send the load to, and the server.
    async fn start(&self, path: usize, wrapper: &[OsString]) -> Result<(SocketAddr, Server)> {
        let (bench, case, to) = (self.bench, self.case, self.to);
        let server = match path {
            GATE => {
                return start_gate(bench, wrapper, self.cluster, self.certs, &to.to_string()).await;
            }
            PEER_NGINX => {
                let config = format!(
                    "upstream backend {{ server {to}; keepalive 64; keepalive_requests 1000000; }}
                     server {{ listen {{addr}}; location / {{ proxy_pass http://backend; proxy_http_version 1.1;
                       proxy_set_header Connection \"\"; proxy_set_header Host $http_host;
                       proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
                       proxy_set_header X-Forwarded-Proto $scheme; proxy_set_header X-Forwarded-Host $http_host; }} }}"
                );
                let name = format!("nginx-proxy-{case}");
                start_nginx(bench, wrapper, self.nginx, &name, &config).await?
            }
            PEER_HAPROXY => start_haproxy(bench, wrapper, self.haproxy, to).await?,
            _ => {
                let http = path == HYPER_RELAY;
                let log = format!("relay-{case}{}.log", if http { "-http" } else { "" });
                let max_headers = self.relay_max_headers;
                bench
                    .start_under(wrapper, &log, "charter-bench", "/record", move |addr| {
                        let (listen, to) = (addr.to_string(), to.to_string());
                        let mut args = ["relay", "--listen", &listen, "--upstream", &to]
                            .map(OsString::from)
                            .to_vec();
                        if http {
                            args.push("--http".into());
                            if let Some(max) = max_headers {
                                args.extend(["--max-headers".into(), max.to_string().into()]);
                            }
                        }
                        args
                    })
                    .await?
            }
        };
        Ok((server.addr(), server))
    }
}

/// `--callgrind`: each proxy in turn under callgrind; its instructions per request.
async fn count_all(proxies: &Proxies<'_>, args: &GateArgs) -> Result<Vec<f64>> {
    let mut counts = Vec::new();
    for (path, name) in PATHS.iter().enumerate().skip(1) {
        let file = format!("{}-{}.callgrind", proxies.case, name.replace(' ', "-"));
        let profile = proxies.bench.path().join(&file);
        let wrapper: Vec<OsString> = vec![
            "valgrind".into(),
            "--tool=callgrind".into(),
            format!("--callgrind-out-file={}", profile.display()).into(),
        ];
        progress(format_args!(
            "{}: {name} under callgrind, {} requests",
            proxies.case, args.callgrind_requests
        ));
        let (addr, server) = proxies.start(path, &wrapper).await?;
        let (per_request, dump) = count(addr, &server, &profile, args.callgrind_requests)
            .await
            .with_context(|| {
                format!("counting {name}'s instructions; its log:\n{}", server.log())
            })?;
        drop(server);
        if let Some(dir) = &args.callgrind_out {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let kept = dir.join(&file);
            std::fs::copy(&dump, &kept).with_context(|| format!("keeping {}", kept.display()))?;
        }
        progress(format_args!(
            "{name}: {per_request:.0} instructions a request"
        ));
        counts.push(per_request);
    }
    Ok(counts)
}

/// Keep-alive connections the counted requests are sent on.
const COUNTED_CONNECTIONS: u64 = 4;

/// The instructions per request of `server`, run under callgrind writing `profile`, and
/// the profile dumped: `requests / 5` GETs to warm it up (connections to the upstream
/// made, buffers grown), its counters zeroed, `requests` GETs, its counters dumped.
async fn count(
    addr: SocketAddr,
    server: &Server,
    profile: &Path,
    requests: u64,
) -> Result<(f64, PathBuf)> {
    let per_connection = requests / COUNTED_CONNECTIONS;
    load_n(addr, per_connection / 5).await?;
    callgrind_control("-z", server.pid()).await?;
    load_n(addr, per_connection).await?;
    callgrind_control("-d", server.pid()).await?;
    // The first dump is `<profile>.1`, written whole before the command returns.
    let dump = PathBuf::from(format!("{}.1", profile.display()));
    let text = std::fs::read_to_string(&dump)
        .with_context(|| format!("reading callgrind's dump {}", dump.display()))?;
    let totals: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("totals:"))
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no `totals:` line in {}", dump.display()))?;
    Ok((totals / (per_connection * COUNTED_CONNECTIONS) as f64, dump))
}

/// `per_connection` sequential GETs of `/record` on each of [`COUNTED_CONNECTIONS`]
/// keep-alive connections at once, every one answered 200.
async fn load_n(addr: SocketAddr, per_connection: u64) -> Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..COUNTED_CONNECTIONS {
        tasks.spawn(async move {
            let mut conn = Http::connect(addr).await?;
            for _ in 0..per_connection {
                conn.get_ok("/record").await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.context("a load task panicked")??;
    }
    Ok(())
}

/// Runs `callgrind_control FLAG PID` (`-z` zeroes the counters, `-d` dumps them).
async fn callgrind_control(flag: &str, pid: u32) -> Result<()> {
    let run = tokio::process::Command::new("callgrind_control")
        .args([flag, &pid.to_string()])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .with_context(|| format!("callgrind_control {flag} {pid} did not return within 60 s"))?
        .context("running callgrind_control (scripts/bench installs valgrind)")?;
    ensure!(
        out.status.success(),
        "callgrind_control {flag} {pid}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The table of `--callgrind` for one upstream: each proxy's instructions per request,
/// against the hyper relay's and the better (fewer) of the peers'.
fn instructions_table(report: &mut Report, args: &GateArgs, case: Case, counts: &[f64]) {
    report.table(
        format!(
            "GET /record behind {case}: user-space instructions per request (callgrind, {} requests)",
            args.callgrind_requests / COUNTED_CONNECTIONS * COUNTED_CONNECTIONS
        ),
        "proxy|instructions/req|x hyper relay|x better peer",
    );
    // `counts` are by path, from the bare relay on.
    let of = |path: usize| counts[path - 1];
    let best = PEERS.map(of).into_iter().fold(f64::INFINITY, f64::min);
    for (path, name) in PATHS.iter().enumerate().skip(1) {
        report.row(
            format!("{case}: {name}"),
            [of(path), of(path) / of(HYPER_RELAY), of(path) / best],
        );
    }
}

/// Starts `charter-dp` in gate mode in front of `upstream`: its proxy address and the
/// server (whose address is its status API).
async fn start_gate(
    bench: &Bench,
    wrapper: &[OsString],
    cluster: SocketAddr,
    certs: Option<&charter_tls::TlsFiles>,
    upstream: &str,
) -> Result<(SocketAddr, Server)> {
    progress(format_args!(
        "starting charter-dp in gate mode; waiting for /status/ready"
    ));
    let proxy = free_port()?;
    let data_dir = bench.path().join(format!("dp-data-{}", proxy.port()));
    let gate = bench
        .start_under(
            wrapper,
            &format!("charter-dp-{}.log", proxy.port()),
            "charter-dp",
            "/status/ready",
            |addr| {
                let mut flags: Vec<OsString> = vec![
                    "--data-dir".into(),
                    data_dir.clone().into(),
                    "--trusted-key".into(),
                    bench.key_path.clone().into(),
                    "--upstream".into(),
                    format!("http://{upstream}").into(),
                ];
                for (flag, value) in [
                    ("--control-plane", cluster),
                    ("--status-listen", addr),
                    ("--proxy-listen", proxy),
                ] {
                    flags.extend([flag.into(), value.to_string().into()]);
                }
                flags.extend(harness::cluster_flags(certs));
                flags
            },
        )
        .await?;
    Ok((proxy, gate))
}

/// Starts nginx with one process (no master: the worker is the process measured) serving
/// `server` (an `http` block's content, `{addr}` standing for its address), no access log,
/// keep-alive connections never closed for their number of requests (nginx closes them
/// after 1,000 by default; the load generator's connections live for the whole run).
async fn start_nginx(
    bench: &Bench,
    wrapper: &[OsString],
    nginx: &Path,
    name: &str,
    server: &str,
) -> Result<Server> {
    let dir = bench.path().join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    bench
        .start_under(
            wrapper,
            &format!("{name}.log"),
            &nginx.to_string_lossy(),
            "/record",
            |addr| {
                let d = dir.display();
                let temp = ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
                    .map(|t| format!("{t}_temp_path {d}/{t};"))
                    .join(" ");
                let config = format!(
                    "worker_processes 1; master_process off; daemon off; pid {d}/nginx.pid;
                 error_log {d}/error.log warn; events {{ worker_connections 4096; }}
                 http {{ access_log off; keepalive_requests 1000000; {temp} {} }}",
                    server.replace("{addr}", &addr.to_string())
                );
                let path = dir.join(format!("nginx-{}.conf", addr.port()));
                // A failed write shows as nginx failing to start, with its log.
                let _ = std::fs::write(&path, config);
                vec![
                    "-e".into(),
                    format!("{d}/error.log").into(),
                    "-c".into(),
                    path.into(),
                ]
            },
        )
        .await
}

/// Starts HAProxy with one thread in front of `upstream`, reusing upstream connections
/// (`http-reuse always`), adding `X-Forwarded-For`, no logging.
async fn start_haproxy(
    bench: &Bench,
    wrapper: &[OsString],
    haproxy: &Path,
    upstream: SocketAddr,
) -> Result<Server> {
    let dir = bench.path().to_owned();
    let program = haproxy.to_string_lossy();
    bench
        .start_under(wrapper, "haproxy.log", &program, "/record", |addr| {
            let config = format!(
                "global\n  nbthread 1\n  maxconn 4096\n\
                 defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  option forwardfor\n  http-reuse always\n\
                 frontend gate\n  bind {addr}\n  default_backend upstream\n\
                 backend upstream\n  server upstream {upstream}\n"
            );
            let path = dir.join(format!("haproxy-{}.cfg", addr.port()));
            let _ = std::fs::write(&path, config);
            vec!["-db".into(), "-f".into(), path.into()]
        })
        .await
}

/// A program of the system's (`nginx`, `haproxy`): on the `PATH` or in `/usr/sbin`.
/// `scripts/bench` installs them when they are missing.
fn system_binary(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .with_context(|| {
            format!("no {name} on the PATH or in /usr/sbin: scripts/bench installs it (apt-get install {name})")
        })
}
