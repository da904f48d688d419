//! The benchmarks, run small, so they keep working between the runs that measure with them
//! (`scripts/bench`). Each runs with `--json` and its report is checked for the figures
//! it must hold. The fan-out one starts the built `charter-cp` and its baseline, connects
//! simulated data planes over shared-mode mTLS with the real protocol, and every one of
//! them must receive, verify and acknowledge each update. The admin one starts
//! `charter-cp` and the hello-world and runs every GET target and every kind of write. The
//! gate one starts `charter-cp`, the hello-world upstream, the bare relay and `charter-dp`
//! in gate mode, and loads all three paths; with `--callgrind` it counts each proxy's
//! instructions under valgrind. The PostgreSQL ones (`fanout-ha`, `admin
//! --postgres`) start their own private PostgreSQL server, as the PostgreSQL tests do.

use charter_tests::run;
use serde_json::Value;

/// Runs `charter-bench --json ARGS`, which must succeed; its report.
fn bench(args: &[&str]) -> Value {
    let out = run("charter-bench", &[&["--json"][..], args].concat());
    let report = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?} failed:\n{report}\n{log}");
    serde_json::from_str(&report).unwrap_or_else(|e| panic!("not JSON ({e}):\n{report}"))
}

/// The rows of the report's table whose title starts with `title`, by their labels.
fn rows(report: &Value, title: &str) -> Vec<(String, Vec<Value>)> {
    let table = report["tables"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["title"].as_str().is_some_and(|t| t.starts_with(title)))
        .unwrap_or_else(|| panic!("no table `{title}` in {report:#}"));
    let rows = table["rows"].as_array().expect("rows");
    rows.iter()
        .map(|row| {
            let row = row.as_array().expect("a row");
            (
                row[0].as_str().expect("a label").to_owned(),
                row[1..].to_vec(),
            )
        })
        .collect()
}

/// Checks that the table has exactly the rows `labels`, each with a number in every
/// column but those in `may_be_empty`.
fn check(report: &Value, title: &str, labels: &[&str], may_be_empty: &[usize]) {
    let rows = rows(report, title);
    let got: Vec<&str> = rows.iter().map(|(label, _)| label.as_str()).collect();
    assert_eq!(got, labels, "the rows of `{title}`");
    for (label, values) in &rows {
        for (i, value) in values.iter().enumerate() {
            assert!(
                value.is_number() || may_be_empty.contains(&(i + 1)),
                "`{title}`, `{label}`: column {} is {value}",
                i + 1
            );
        }
    }
}

/// The figures of the kinds of update at N in a fan-out report: each kind's updates
/// must all be timed and no snapshot refused.
fn check_fanout(report: &Value, n: usize, kinds: &[&str], updates: usize) {
    assert_eq!(report["failed_rounds"], serde_json::json!([]), "{report:#}");
    let figures = &report[format!("n_{n}")];
    let costs: Vec<&str> = figures["costs"]
        .as_array()
        .expect("costs")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let refused = costs
        .iter()
        .position(|c| *c == "refused")
        .expect("a refused column");
    let verify = costs
        .iter()
        .position(|c| *c == "verify p50 µs")
        .expect("a verify column");
    let got = figures["kinds"].as_array().expect("kinds");
    assert_eq!(got.len(), kinds.len(), "{figures:#}");
    for (kind, want) in got.iter().zip(kinds) {
        assert_eq!(kind["update"], *want);
        assert_eq!(
            kind["updates"].as_array().map(Vec::len),
            Some(updates),
            "{kind:#}"
        );
        // etcd's watchers are the peer: they get a value, with nothing to verify or refuse.
        if want.starts_with("etcd") {
            continue;
        }
        assert_eq!(
            kind["costs"][refused], 0.0,
            "a simulated data plane refused a snapshot: {kind:#}"
        );
        assert!(
            kind["costs"][verify].is_number(),
            "no verification timed: {kind:#}"
        );
    }
    check(report, &format!("N = {n}: median"), kinds, &[]);
}

#[test]
fn fanout_benchmark_runs_end_to_end_with_a_few_data_planes() {
    let report = bench(&[
        "fanout",
        "--sizes",
        "3,5",
        "--rounds",
        "1",
        "--updates",
        "2",
        "--cache-sample",
        "2",
        "--no-pin",
        // Short idle windows: the CPU figures are not checked here.
        "--idle-window-ms",
        "300",
    ]);
    // etcd as the peer, in plaintext and with client-certificate TLS (scripts/install-deps
    // installs Debian's etcd-server).
    let kinds = [
        "charter-cp",
        "baseline (tonic)",
        "etcd (plaintext)",
        "etcd (TLS)",
    ];
    for n in [3, 5] {
        check_fanout(&report, n, &kinds, 2);
    }
}

#[test]
fn fanout_ha_benchmark_times_writes_on_either_control_plane() {
    let report = bench(&[
        "fanout-ha",
        "--sizes",
        "3",
        "--rounds",
        "2",
        "--updates",
        "1",
        "--licenses",
        "5",
        "--cache-sample",
        "1",
        "--no-pin",
        "--idle-window-ms",
        "300",
    ]);
    let kinds = [
        "written on CP A, DPs on CP B",
        "written on CP B, DPs on CP B",
        "one CP on sled",
    ];
    // Two rounds of one update of each kind, all timed.
    check_fanout(&report, 3, &kinds, 2);
}

#[test]
fn admin_benchmark_on_postgres_compares_posts_with_bare_inserts() {
    let report = bench(&[
        "admin",
        "--postgres",
        "--licenses",
        "10",
        "--retries",
        "0",
        "--writes",
        "20",
    ]);
    let writes = rows(&report, "Durable writes");
    assert!(writes[0].0.starts_with("bare INSERT ("), "{writes:?}");
    let labels: Vec<&str> = writes.iter().skip(1).map(|(l, _)| l.as_str()).collect();
    assert_eq!(
        labels,
        ["POST /licenses (201, durable)", "PgStore::commit alone"]
    );
    let per_post = rows(&report, "Per POST");
    assert!(
        per_post
            .iter()
            .any(|(l, v)| l == "PostgreSQL CPU per POST µs" && v[0].is_number()),
        "{per_post:?}"
    );
    assert!(
        report["store"]
            .as_str()
            .is_some_and(|s| s.starts_with("PostgreSQL")),
        "{report:#}"
    );
    // Only the writes: reads are served from the same snapshot whatever the store.
    assert!(report.get("windows").is_none(), "{report:#}");
}

#[test]
fn admin_benchmark_runs_end_to_end_briefly() {
    let report = bench(&[
        "admin",
        "--licenses",
        "20",
        "--connections",
        "2",
        "--duration-secs",
        "0.3",
        "--warmup-secs",
        "0.1",
        "--rounds",
        "1",
        "--retries",
        "0",
        "--writes",
        "20",
    ]);
    let targets = [
        "hello-world (record body)",
        "GET /licenses/{id}",
        "GET /licenses (size 100)",
        "GET /licenses?size=10",
        "hello-world (page body)",
    ];
    // The proxy column is for the gate.
    check(&report, "GET", &targets, &[11]);
    let writes = [
        "raw write(1536 B) + fsync",
        "POST /licenses (201, durable)",
        "SledStore::insert alone",
    ];
    check(&report, "Durable writes", &writes, &[]);
}

#[test]
fn gate_benchmark_runs_end_to_end_briefly() {
    let report = bench(&[
        "gate",
        "--connections",
        "2",
        "--duration-secs",
        "0.3",
        "--warmup-secs",
        "0.1",
        "--rounds",
        "1",
        "--retries",
        "0",
        "--relay-max-headers",
        "256",
        "--no-pin",
    ]);
    // The hyper relay takes the gate's header limits when asked (and serves with them).
    assert_eq!(report["settings"]["relay_max_headers"], 256, "{report:#}");
    // The machine line says how an idle CPU waits for work (the driver and governor, and
    // how long a virtual machine's `haltpoll` governor polls before halting).
    let idle = report["machine"]["cpuidle"]
        .as_str()
        .expect("machine.cpuidle");
    let sys = |path: &str| {
        std::fs::read_to_string(format!("/sys/devices/system/cpu/cpuidle/{path}"))
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    assert!(idle.starts_with(&sys("current_driver")), "{idle}");
    assert!(!idle.starts_with(' '), "{idle}");
    let governor = sys("current_governor_ro");
    if !governor.is_empty() {
        assert!(idle.contains(&format!("({governor} governor")), "{idle}");
    }
    let polls = std::fs::read_to_string("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
        .map(|ns| format!(": polls up to {} ns before halting)", ns.trim()));
    match polls {
        Ok(polls) if governor == "haltpoll" => assert!(idle.ends_with(&polls), "{idle}"),
        _ => assert!(!idle.contains("polls"), "{idle}"),
    }
    let paths = [
        "direct",
        "bare relay",
        "hyper relay",
        "gate",
        "nginx",
        "haproxy",
    ];
    for case in ["nginx", "hello"] {
        let rows: Vec<String> = [1, 2]
            .into_iter()
            .flat_map(|c| paths.map(|p| format!("{case}: {p} x{c}")))
            .collect();
        let rows: Vec<&str> = rows.iter().map(String::as_str).collect();
        check(&report, &format!("GET /record behind {case}"), &rows, &[11]);
    }
}

#[test]
fn gate_benchmark_counts_each_proxy_s_instructions_under_callgrind() {
    let report = bench(&[
        "gate",
        "--callgrind",
        "--callgrind-requests",
        "100",
        "--upstreams",
        "nginx",
        "--cluster-insecure",
        "--no-pin",
    ]);
    let title = "GET /record behind nginx: user-space instructions per request";
    let paths = ["bare relay", "hyper relay", "gate", "nginx", "haproxy"];
    let labels = paths.map(|p| format!("nginx: {p}"));
    check(&report, title, &labels.each_ref().map(String::as_str), &[]);
    // Nothing is timed: no windows.
    assert!(report["windows"].is_null(), "{report:#}");
    let count = |path: &str| -> f64 {
        let rows = rows(&report, title);
        let (_, values) = rows
            .iter()
            .find(|(label, _)| label == &format!("nginx: {path}"))
            .expect("a row");
        values[0].as_f64().expect("a count")
    };
    // Counts, not times: whatever the machine, a relay that copies bytes does less than
    // one that parses HTTP, and the gate does what a hyper relay does and more.
    assert!(count("bare relay") > 0.0, "{report:#}");
    assert!(count("bare relay") < count("hyper relay"), "{report:#}");
    assert!(count("hyper relay") < count("gate"), "{report:#}");
    assert!(count("nginx") > 0.0 && count("haproxy") > 0.0, "{report:#}");
}

#[test]
fn telemetry_benchmark_counts_every_report_exactly_once_on_either_store() {
    for (store, flags) in [("sled", &[][..]), ("PostgreSQL", &["--postgres"][..])] {
        let mut args = vec!["telemetry", "--nodes", "20", "--rounds", "3", "--no-pin"];
        args.extend(flags);
        let report = bench(&args);
        let rows = rows(
            &report,
            &format!("Telemetry ingest: 20 data planes x 3 rounds, {store}"),
        );
        assert_eq!(rows[0].0, "60", "{store}: {rows:?}");
        assert_eq!(
            rows[0].1[0], 60.0,
            "{store}: not counted exactly once: {rows:?}"
        );
    }
}

#[test]
fn startup_benchmark_starts_a_control_plane_on_a_seeded_store() {
    let report = bench(&["startup", "--licenses", "50", "--starts", "1"]);
    let figures = [
        "spawn to GET /status 200, s",
        "resident memory once ready, MiB",
        "every license verified, s from spawn",
        "resident memory then, MiB",
    ];
    check(&report, "Start-up with 50 stored licenses", &figures, &[]);
}

#[test]
fn text_output_is_a_table() {
    let out = run(
        "charter-bench",
        &["telemetry", "--nodes", "2", "--rounds", "1", "--no-pin"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("Telemetry ingest: 2 data planes x 1 rounds"),
        "{text}"
    );
    assert!(text.contains("reports  counted  reports/s"), "{text}");
}

#[test]
fn bench_flags_refuse_what_cannot_be_used() {
    // Addresses the relay refuses after parsing (not loopback): a flag accepted by mistake
    // ends the run at once with exit status 1, never a relay left serving.
    let relay = [
        "relay",
        "--listen",
        "192.0.2.1:1",
        "--upstream",
        "192.0.2.1:2",
    ];
    for (args, says) in [
        (
            vec!["gate", "--relay-max-headers", "0"],
            "invalid value '0' for '--relay-max-headers <RELAY_MAX_HEADERS>': 0 is not in 1..=10000",
        ),
        (
            [&relay[..], &["--http", "--max-headers", "10001"]].concat(),
            "invalid value '10001' for '--max-headers <MAX_HEADERS>': 10001 is not in 1..=10000",
        ),
        (
            [&relay[..], &["--max-headers", "256"]].concat(),
            "the following required arguments were not provided:\n  --http",
        ),
        (
            vec!["gate", "--callgrind", "--callgrind-requests", "99"],
            "invalid value '99' for '--callgrind-requests <CALLGRIND_REQUESTS>': 99 is not in 100..=10000000",
        ),
        (
            vec!["gate", "--callgrind-out", "profiles"],
            "the following required arguments were not provided:\n  --callgrind",
        ),
    ] {
        let out = run("charter-bench", &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}
