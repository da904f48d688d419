//! The benchmarks, run small, so they keep working between the runs that measure with them
//! (`scripts/bench`). The fan-out one starts the built `charter-cp` and its baseline,
//! connects simulated data planes over shared-mode mTLS with the real protocol, and every
//! one of them must receive, verify and acknowledge each update. The admin one starts
//! `charter-cp` and the hello-world and runs every GET target and every kind of write. The
//! gate one starts `charter-cp`, the hello-world upstream, the bare relay and `charter-dp` in
//! gate mode, and loads all three paths. The PostgreSQL ones (`fanout-ha`, `admin
//! --postgres`) start their own private PostgreSQL server, as the PostgreSQL tests do.

use charter_tests::run;

#[test]
fn fanout_benchmark_runs_end_to_end_with_a_few_data_planes() {
    let out = run(
        "charter-bench",
        &[
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
        ],
    );
    let report = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fanout failed:\n{report}\n{log}");
    for expected in [
        "N = 3: from the 201",
        "N = 5: from the 201",
        "Goals (judged at N = 5)",
        "verify (decide) p50",
        "durable cache write (cache::store)",
    ] {
        assert!(report.contains(expected), "no `{expected}` in:\n{report}");
    }
    assert!(
        !report.contains("REFUSED"),
        "a simulated data plane refused a snapshot:\n{report}"
    );
    // Two updates per server at each N, all timed.
    assert!(
        report.matches("over 2 updates").count() == 2,
        "not every update was timed:\n{report}"
    );
}

#[test]
fn fanout_ha_benchmark_times_writes_on_either_control_plane() {
    let out = run(
        "charter-bench",
        &[
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
        ],
    );
    let report = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fanout-ha failed:\n{report}\n{log}");
    for expected in [
        "N = 3 data planes, 5 licenses stored; PostgreSQL",
        // Two rounds of one update of each kind, all timed.
        "median (min–max) over 2 updates of each kind",
        "written on CP A, DPs on CP B",
        "written on CP B, DPs on CP B",
        "one CP on sled",
        "written on A against on B:",
        "on B against the sled CP:",
        "steal up to",
        "Goal (N = 3): written on another CP at most 50.0 ms later",
    ] {
        assert!(report.contains(expected), "no `{expected}` in:\n{report}");
    }
    assert!(
        !report.contains("REFUSED"),
        "a simulated data plane refused a snapshot:\n{report}"
    );
}

#[test]
fn admin_benchmark_on_postgres_compares_posts_with_bare_inserts() {
    let out = run(
        "charter-bench",
        &[
            "admin",
            "--postgres",
            "--licenses",
            "10",
            "--retries",
            "0",
            "--writes",
            "20",
        ],
    );
    let report = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "admin --postgres failed:\n{report}\n{log}"
    );
    for expected in [
        "store:       PostgreSQL",
        "bare INSERT (",
        "the same on the load generator's CPU",
        "POST /licenses (201, durable)",
        "of which PgStore::commit alone",
        "PostgreSQL used",
        "x bare INSERT (goal <= 1.5x)",
    ] {
        assert!(report.contains(expected), "no `{expected}` in:\n{report}");
    }
    // Only the writes: reads are served from the same snapshot whatever the store.
    assert!(!report.contains("GET throughput"), "{report}");
}

#[test]
fn admin_benchmark_runs_end_to_end_briefly() {
    let out = run(
        "charter-bench",
        &[
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
        ],
    );
    let report = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "admin bench failed:\n{report}\n{log}");
    for expected in [
        "GET /licenses/{id}",
        "GET /licenses (size 100)",
        "hello-world (page body)",
        "raw write(1536 B) + fsync",
        "the same on the load generator's CPU",
        "POST /licenses (201, durable)",
        "of which SledStore::insert alone",
        // Each goal names the baseline it is judged against.
        "x hello-world (page body) (goal >= 0.7x)",
        "x hello-world (record body) (goal >= 0.7x)",
        "x raw fsync   (goal <= 2x)",
    ] {
        assert!(report.contains(expected), "no `{expected}` in:\n{report}");
    }
}

#[test]
fn gate_benchmark_runs_end_to_end_briefly() {
    let out = run(
        "charter-bench",
        &[
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
            "--no-pin",
        ],
    );
    let report = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "gate bench failed:\n{report}\n{log}");
    for expected in [
        "direct x1",
        "through a bare relay x1",
        "through the gate x1",
        "direct x2",
        "through a bare relay x2",
        "through the gate x2",
        "1 connection(s): throughput",
        "2 connection(s): throughput",
        "the bare relay:",
    ] {
        assert!(report.contains(expected), "no `{expected}` in:\n{report}");
    }
}

#[test]
fn telemetry_benchmark_counts_every_report_exactly_once() {
    let out = run(
        "charter-bench",
        &["telemetry", "--nodes", "20", "--rounds", "3", "--no-pin"],
    );
    let report = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "telemetry failed:\n{report}\n{log}");
    assert!(report.contains("reports/s durably applied"), "{report}");
    assert!(report.contains("counted exactly once (60)"), "{report}");
}

#[test]
fn startup_benchmark_starts_a_control_plane_on_a_seeded_store() {
    let out = run(
        "charter-bench",
        &["startup", "--licenses", "50", "--starts", "1"],
    );
    let report = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "startup failed:\n{report}\n{log}");
    assert!(
        report.contains("Start-up with 50 stored licenses"),
        "{report}"
    );
    assert!(report.contains("resident memory once ready"), "{report}");
}
