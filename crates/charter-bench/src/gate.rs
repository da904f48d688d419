//! `charter-bench gate`: `GET /record` from the hello-world upstream directly, through a
//! bare TCP relay, and through `charter-dp` in gate mode (connected to a release
//! `charter-cp` over shared-mode mTLS, holding a freshly signed license), in interleaved
//! rounds at one connection (latency) and at N keep-alive connections (throughput): req/s,
//! the p50 and p99 of every request's latency in each window, and the CPU time per request
//! of the serving processes and of the proxy.

use std::sync::Arc;

use anyhow::{ensure, Result};
use serde_json::json;

use crate::harness::{self, free_port, progress, Common};
use crate::load::{self, Http, LoadArgs, Window};
use crate::report::Report;

/// Flags of `charter-bench gate`.
#[derive(Debug, clap::Args, serde::Serialize)]
pub struct GateArgs {
    /// Plaintext cluster port (`--cluster-insecure`) instead of shared-mode mTLS.
    #[arg(long)]
    pub cluster_insecure: bool,
    #[command(flatten)]
    pub load: LoadArgs,
    #[command(flatten)]
    pub common: Common,
}

/// Where the load is sent.
const PATHS: [&str; 3] = ["direct", "through a bare relay", "through the gate"];

/// Runs the gate benchmark.
pub fn main(args: GateArgs) -> Result<Report> {
    harness::run(args.common.clone(), true, async |bench| {
        let certs = match args.cluster_insecure {
            true => None,
            false => Some(bench.make_certs()?),
        };
        let cluster = free_port()?;
        let cp = bench
            .start_cp("cp-data", cluster, certs.as_ref(), None)
            .await?;
        // The upstream answers a license record's bytes, as a realistic small JSON body.
        let body = serde_json::to_vec(
            &json!({ "payload": bench.signer.sign(harness::payload("GATE-BENCH", 1))?.to_json() }),
        )?;
        let mut conn = Http::connect(cp.addr()).await?;
        let record = conn.expect("POST", "/licenses", Some(&body), 201).await?;
        let upstream = bench.start_hello(&record, &record).await?;
        let upstream_addr = upstream.addr().to_string();
        let relay = bench
            .start("relay.log", "charter-bench", "/record", |addr| {
                [
                    "relay",
                    "--listen",
                    &addr.to_string(),
                    "--upstream",
                    &upstream_addr,
                ]
                .map(Into::into)
                .to_vec()
            })
            .await?;
        progress(format_args!(
            "starting charter-dp in gate mode; waiting for /status/ready"
        ));
        let proxy = free_port()?;
        let data_dir = bench.path().join("dp-data");
        let gate = bench
            .start("charter-dp.log", "charter-dp", "/status/ready", |addr| {
                let mut flags: Vec<std::ffi::OsString> = vec![
                    "--data-dir".into(),
                    data_dir.clone().into(),
                    "--trusted-key".into(),
                    bench.key_path.clone().into(),
                ];
                for (flag, value) in [
                    ("--control-plane", cluster),
                    ("--status-listen", addr),
                    ("--proxy-listen", proxy),
                ] {
                    flags.extend([flag.into(), value.to_string().into()]);
                }
                flags.extend([
                    "--upstream".into(),
                    format!("http://{upstream_addr}").into(),
                ]);
                flags.extend(harness::cluster_flags(certs.as_ref()));
                flags
            })
            .await?;
        // The gate must forward the upstream's answer unchanged.
        let direct_body = Http::connect(upstream.addr())
            .await?
            .get_ok("/record")
            .await?;
        let gate_body = Http::connect(proxy).await?.get_ok("/record").await?;
        ensure!(
            direct_body == gate_body,
            "the gate answered a different body than the upstream"
        );

        let requests: Arc<[Vec<u8>]> =
            Arc::from([Http::encode(upstream.addr(), "GET", "/record", None)]);
        // (connections, path) for each series; the watched processes: the upstream, the
        // proxy if any, and this one.
        let series: Vec<(usize, usize)> = [1, args.load.connections]
            .into_iter()
            .flat_map(|c| (0..PATHS.len()).map(move |p| (c, p)))
            .collect();
        let mut samples: Vec<Vec<Window>> = vec![Vec::new(); series.len()];
        for round in 1..=args.load.rounds {
            // Alternate which path goes first, so neither always follows the other.
            let mut order: Vec<usize> = (0..series.len()).collect();
            if round % 2 == 0 {
                order.reverse();
            }
            for index in order {
                let (connections, path) = series[index];
                let (addr, watched) = match path {
                    0 => (upstream.addr(), vec![upstream.pid()]),
                    1 => (relay.addr(), vec![upstream.pid(), relay.pid()]),
                    _ => (proxy, vec![upstream.pid(), gate.pid()]),
                };
                let load = LoadArgs {
                    connections,
                    ..args.load.clone()
                };
                let label = format!("{} x{connections}", PATHS[path]);
                let window = harness::retrying(
                    args.load.retries,
                    &label,
                    async || load::measure(addr, &requests, &load, &watched).await,
                    |w| w.usage.disturbed(),
                )
                .await?;
                progress(format_args!(
                    "round {round}/{}: {label:<26} {:>8.0} req/s, p99 {:?}",
                    args.load.rounds,
                    window.rps(),
                    window.latency.p99
                ));
                samples[index].push(window);
            }
        }
        drop((gate, relay, upstream, cp));

        let mut report = Report::new("gate", &args, &bench.pinning);
        let labels = series.iter().map(|&(c, p)| format!("{} x{c}", PATHS[p]));
        let series: Vec<(String, Vec<Window>)> = labels.zip(samples).collect();
        let title = format!(
            "GET /record: median (min, max) of {} rounds",
            args.load.rounds
        );
        // Each path against the upstream called directly at the same concurrency.
        let med = |i: usize, f: fn(&Window) -> f64| load::median_of(&series[i].1, f);
        let compare = |i: usize| {
            let direct = i - i % PATHS.len();
            let p = |w: &Window| w.micros(50);
            let p99 = |w: &Window| w.micros(99);
            vec![
                med(i, Window::rps) / med(direct, Window::rps),
                med(i, p) - med(direct, p),
                med(i, p99) - med(direct, p99),
            ]
        };
        load::table(
            &mut report,
            title,
            &series,
            "x direct req/s|added p50 µs|added p99 µs",
            compare,
        );
        Ok(report)
    })
}
