//! The fan-out benchmark, run small: it starts the built `charter-cp` and its baseline,
//! connects simulated data planes over shared-mode mTLS with the real protocol, and every
//! one of them must receive, verify and acknowledge each update. This keeps the benchmark
//! working between the runs that measure with it (`scripts/bench fanout`).

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
