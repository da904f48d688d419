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

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
const PEERS: [usize; 2] = [4, 5];
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
        for &case in &args.upstreams {
            let upstream = match case {
                Case::Nginx => {
                    let config = format!(
                        "server {{ listen {{addr}}; location / {{ default_type application/json; return 200 '{FIXED}'; }} }}"
                    );
                    start_nginx(bench, &nginx, &format!("nginx-upstream-{case}"), &config).await?
                }
                Case::Hello => bench.start_hello(&record, &record).await?,
            };
            let to = upstream.addr();
            let relay_max_headers = args.relay_max_headers;
            let relay = async |http: bool| {
                let log = format!("relay-{case}{}.log", if http { "-http" } else { "" });
                bench
                    .start(&log, "charter-bench", "/record", move |addr| {
                        let (listen, to) = (addr.to_string(), to.to_string());
                        let mut args = ["relay", "--listen", &listen, "--upstream", &to]
                            .map(OsString::from)
                            .to_vec();
                        if http {
                            args.push("--http".into());
                            if let Some(max) = relay_max_headers {
                                args.extend(["--max-headers".into(), max.to_string().into()]);
                            }
                        }
                        args
                    })
                    .await
            };
            let (relay, hyper_relay) = (relay(false).await?, relay(true).await?);
            let gate = start_gate(bench, cluster, certs.as_ref(), &to.to_string()).await?;
            let peer_config = format!(
                "upstream backend {{ server {to}; keepalive 64; keepalive_requests 1000000; }}
                 server {{ listen {{addr}}; location / {{ proxy_pass http://backend; proxy_http_version 1.1;
                   proxy_set_header Connection \"\"; proxy_set_header Host $http_host;
                   proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
                   proxy_set_header X-Forwarded-Proto $scheme; proxy_set_header X-Forwarded-Host $http_host; }} }}"
            );
            let nginx_proxy =
                start_nginx(bench, &nginx, &format!("nginx-proxy-{case}"), &peer_config).await?;
            let haproxy_proxy = start_haproxy(bench, &haproxy, to).await?;
            let proxies = [&relay, &hyper_relay, &gate.1, &nginx_proxy, &haproxy_proxy];
            // Every proxy must forward the upstream's answer unchanged.
            let direct = async { Http::connect(to).await?.get_ok("/record").await }
                .await
                .context("GET /record from the upstream")?;
            for (proxy, name) in proxies.iter().zip(&PATHS[1..]) {
                let addr = if *name == "gate" {
                    gate.0
                } else {
                    proxy.addr()
                };
                let body = async { Http::connect(addr).await?.get_ok("/record").await }
                    .await
                    .with_context(|| format!("GET /record through {name}"))?;
                ensure!(
                    body == direct,
                    "{name} answered another body than the upstream"
                );
            }
            let targets: Vec<(std::net::SocketAddr, Vec<u32>)> = (0..PATHS.len())
                .map(|path| match path {
                    0 => (to, vec![upstream.pid()]),
                    GATE => (gate.0, vec![upstream.pid(), gate.1.pid()]),
                    p => (
                        proxies[p - 1].addr(),
                        vec![upstream.pid(), proxies[p - 1].pid()],
                    ),
                })
                .collect();
            let windows = measure(&args, case, &targets, to).await?;
            all.push((case, windows));
        }
        drop(cp);

        for (case, windows) in all {
            table(&mut report, &args, case, windows);
        }
        Ok(report)
    })
}

/// Each target at 1 and at N connections, every round, in alternating order; the
/// windows by series (connections, then path).
async fn measure(
    args: &GateArgs,
    case: Case,
    targets: &[(std::net::SocketAddr, Vec<u32>)],
    host: std::net::SocketAddr,
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
        "x direct req/s|x hyper relay req/s|x better peer req/s|p50 - peer's µs|p99 - peer's µs",
        compare,
    );
}

/// Starts `charter-dp` in gate mode in front of `upstream`: its proxy address and the
/// server (whose address is its status API).
async fn start_gate(
    bench: &Bench,
    cluster: std::net::SocketAddr,
    certs: Option<&charter_tls::TlsFiles>,
    upstream: &str,
) -> Result<(std::net::SocketAddr, Server)> {
    progress(format_args!(
        "starting charter-dp in gate mode; waiting for /status/ready"
    ));
    let proxy = free_port()?;
    let data_dir = bench.path().join(format!("dp-data-{}", proxy.port()));
    let gate = bench
        .start(
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
async fn start_nginx(bench: &Bench, nginx: &Path, name: &str, server: &str) -> Result<Server> {
    let dir = bench.path().join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    bench
        .start(
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
    haproxy: &Path,
    upstream: std::net::SocketAddr,
) -> Result<Server> {
    let dir = bench.path().to_owned();
    bench
        .start("haproxy.log", &haproxy.to_string_lossy(), "/record", |addr| {
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
