//! Several real `charter-cp` processes on one real PostgreSQL (started by the test, as an
//! unprivileged user): one cluster. A write on one control plane reaches the data planes
//! of another; a database outage refuses writes with 503 while data planes keep
//! enforcing, and the next write after the database returns reaches them, with no
//! control plane restarted; a data plane's usage reports are counted exactly once while
//! its connection moves from a killed control plane to another.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use charter_store::testing::TestPostgres;
use charter_tests::{cluster_certs, eventually, free_port, http, shared_tls_args, Cp, Dp, Vendor};
use serde_json::json;
use tempfile::TempDir;

#[test]
fn two_control_planes_on_one_database_are_one_cluster_through_an_outage() {
    let tmp = TempDir::new().expect("temp dir");
    let mut pg = TestPostgres::start();
    let url = pg.url();
    let vendor = Vendor::new(tmp.path(), 5);
    let key = vendor.public_key.to_str().expect("utf-8 path");
    let (dir_a, dir_b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    let a = Cp::start(&dir_a, &["--trusted-key", key, "--database-url", &url]);
    let b = Cp::start(&dir_b, &["--trusted-key", key, "--database-url", &url]);
    assert_eq!(
        a.get("/status").json()["database"]["epoch"],
        b.get("/status").json()["database"]["epoch"],
        "one database, one epoch"
    );
    assert!(a.get("/license/report").json()["db_version"]
        .as_str()
        .is_some_and(|v| v.starts_with("PostgreSQL")));
    let dp = Dp::start(tmp.path(), "dp-b", &b, &vendor.public_key, &[]);

    // A write on A is on B and at B's data plane.
    let first = a.send_json(
        "POST",
        "/licenses",
        &json!({"payload": vendor.valid("PG-1")}),
    );
    assert_eq!(first.status, 201, "{}", first.body);
    let first_id = first.json()["id"].as_str().unwrap().to_owned();
    eventually(
        "B lists the license written on A",
        Duration::from_secs(10),
        || {
            let page = b.get("/licenses").json();
            (page["data"][0]["id"] == first_id.as_str()).then_some(())
        },
    );
    dp.wait_license("the license written on A", |l| l["id"] == first_id.as_str());
    // Both control planes list the data plane (the inventory is in the database).
    eventually("A lists B's data plane", Duration::from_secs(10), || {
        let planes = a.get("/clustering/data-planes").json();
        planes["data"]
            .as_array()
            .is_some_and(|d| d.len() == 1 && d[0]["sync_status"] == "in_sync")
            .then_some(())
    });

    // The database goes away: writes answer 503, /status 503, reads and data planes stay.
    pg.stop_immediately();
    let refused = a.send_json(
        "POST",
        "/licenses",
        &json!({"payload": vendor.valid("PG-2")}),
    );
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.json()["message"], "database unavailable");
    assert_eq!(b.get("/status").status, 503);
    assert_eq!(b.get("/licenses").status, 200);
    assert_eq!(dp.get("/status/ready").status, 200);

    // It returns: the next write reaches B's data plane, no control plane restarted.
    pg.launch();
    let second = eventually(
        "a write after the database returned",
        Duration::from_secs(20),
        || {
            let resp = a.send_json(
                "POST",
                "/licenses",
                &json!({"payload": vendor.valid("PG-3")}),
            );
            (resp.status == 201).then(|| resp.json()["id"].as_str().unwrap().to_owned())
        },
    );
    dp.wait_license("the license written after the outage", |l| {
        l["id"] == second.as_str()
    });
    assert_eq!(b.get("/status").status, 200);
}

#[test]
fn a_data_plane_moves_to_the_other_control_plane_when_its_own_is_killed() {
    let tmp = TempDir::new().expect("temp dir");
    let pg = TestPostgres::start();
    let url = pg.url();
    let vendor = Vendor::new(tmp.path(), 6);
    let key = vendor.public_key.to_str().expect("utf-8 path").to_owned();
    // One cluster certificate for both control planes, as one Secret would give them.
    let certs = cluster_certs(tmp.path());
    let mut args: Vec<String> = vec!["--trusted-key".into(), key, "--database-url".into(), url];
    args.extend(shared_tls_args(&certs));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (dir_a, dir_b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    let mut a = Cp::start(&dir_a, &args);
    let b = Cp::start(&dir_b, &args);
    let written = a.send_json(
        "POST",
        "/licenses",
        &json!({"payload": vendor.valid("FAILOVER")}),
    );
    assert_eq!(written.status, 201, "{}", written.body);
    let id = written.json()["id"].as_str().unwrap().to_owned();
    let dp_tls = shared_tls_args(&certs);
    let dp_tls: Vec<&str> = dp_tls.iter().map(String::as_str).collect();
    let dp = Dp::start_on(tmp.path(), "dp", &[&a, &b], &vendor.public_key, &dp_tls);
    dp.wait_license("the license", |l| l["id"] == id.as_str());
    let status = dp.get("/status").json();
    assert_eq!(
        status["control_plane"]["address"],
        a.cluster_addr.to_string()
    );

    a.kill();
    // The data plane stays licensed and ready, and syncs with B.
    let b_addr = b.cluster_addr.to_string();
    eventually(
        "the data plane connected to B",
        Duration::from_secs(30),
        || {
            let status = dp.get("/status").json();
            (status["control_plane"]["address"] == b_addr.as_str()
                && status["control_plane"]["connected"] == true)
                .then_some(())
        },
    );
    assert_eq!(dp.get("/status/ready").status, 200);
    assert_eq!(dp.license()["id"], id.as_str());
    // A write on B reaches it.
    let renewed = b.send_json(
        "POST",
        "/licenses",
        &json!({"payload": vendor.valid("FAILOVER-2")}),
    );
    assert_eq!(renewed.status, 201, "{}", renewed.body);
    let renewed = renewed.json()["id"].as_str().unwrap().to_owned();
    dp.wait_license("the license written on B", |l| l["id"] == renewed.as_str());
}

#[test]
fn killing_control_planes_under_concurrent_writes_loses_nothing_acknowledged() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    const CYCLES: usize = 25;
    let tmp = TempDir::new().expect("temp dir");
    let pg = TestPostgres::start();
    let vendor = Vendor::new(tmp.path(), 7);
    let certs = cluster_certs(tmp.path());
    let mut args: Vec<String> = vec![
        "--trusted-key".into(),
        vendor.public_key.to_string_lossy().into_owned(),
        "--database-url".into(),
        pg.url(),
    ];
    args.extend(shared_tls_args(&certs));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let dirs = [tmp.path().join("a"), tmp.path().join("b")];
    for dir in &dirs {
        std::fs::create_dir_all(dir).unwrap();
    }
    let mut cps = [Cp::start(&dirs[0], &args), Cp::start(&dirs[1], &args)];
    let dp_tls = shared_tls_args(&certs);
    let dp_tls: Vec<&str> = dp_tls.iter().map(String::as_str).collect();
    let dp = Dp::start_on(
        tmp.path(),
        "dp",
        &[&cps[0], &cps[1]],
        &vendor.public_key,
        &dp_tls,
    );
    let mut acknowledged = std::collections::HashSet::new();
    let (mut last_revision, mut last_dp_revision) = (0, 0);
    for cycle in 0..CYCLES {
        let urls = [cps[0].url("/licenses"), cps[1].url("/licenses")];
        let stop = AtomicBool::new(false);
        let acked = Mutex::new(Vec::new());
        let victim = cycle % 2;
        std::thread::scope(|scope| {
            for writer in 0..4 {
                let (url, stop, acked, vendor) = (&urls[writer % 2], &stop, &acked, &vendor);
                scope.spawn(move || {
                    for n in 0..10_000 {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        let doc = vendor.valid(&format!("KILL-{cycle}-{writer}-{n}"));
                        let body = charter_tests::Body::Json(json!({ "payload": doc }));
                        match charter_tests::http("POST", url, Some(body)) {
                            Ok(resp) if resp.status == 201 => {
                                let id = resp.json()["id"].as_str().expect("id").to_owned();
                                acked.lock().expect("lock").push(id);
                            }
                            Ok(resp) => panic!("unexpected answer {}: {}", resp.status, resp.body),
                            // Its control plane was killed under it: not acknowledged.
                            Err(_) => return,
                        }
                    }
                });
            }
            std::thread::sleep(Duration::from_millis(100 + 37 * (cycle as u64 % 7)));
            cps[victim].kill();
            stop.store(true, Ordering::SeqCst);
        });
        acknowledged.extend(acked.into_inner().expect("lock"));
        cps[victim].restart();
        for cp in &cps {
            let revision = cp.get("/status").json()["database"]["revision"]
                .as_u64()
                .expect("revision");
            assert!(
                revision >= last_revision,
                "cycle {cycle}: revision went down from {last_revision} to {revision}"
            );
            last_revision = revision;
        }
        let survivor = &cps[1 - victim];
        let stored = survivor.stored_ids();
        let lost: Vec<_> = acknowledged.difference(&stored).collect();
        assert!(
            lost.is_empty(),
            "cycle {cycle}: acknowledged writes lost: {lost:?}"
        );
        // The data plane's revision never goes back, whichever control plane it syncs with.
        let held = dp.license()["revision"].as_u64().unwrap_or(0);
        assert!(
            held >= last_dp_revision,
            "cycle {cycle}: the data plane went from revision {last_dp_revision} to {held}"
        );
        last_dp_revision = held;
    }
    assert!(acknowledged.len() > CYCLES, "the writers hardly wrote");
    // In the end every control plane and the data plane hold the same newest license.
    let newest = eventually("both control planes agree", Duration::from_secs(10), || {
        let a = cps[0].get("/license/status").json()["license"]["id"].clone();
        let b = cps[1].get("/license/status").json()["license"]["id"].clone();
        (a == b && a.is_string()).then_some(a)
    });
    dp.wait_license("the newest license", |l| l["id"] == newest);
}

#[test]
fn concurrent_consul_deletes_on_two_control_planes_never_leave_the_cluster_unlicensed() {
    let tmp = TempDir::new().expect("temp dir");
    let pg = TestPostgres::start();
    let vendor = Vendor::new(tmp.path(), 8);
    let key = vendor.public_key.to_str().expect("utf-8 path");
    let (dir_a, dir_b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    let url = pg.url();
    let a = Cp::start(&dir_a, &["--trusted-key", key, "--database-url", &url]);
    let b = Cp::start(&dir_b, &["--trusted-key", key, "--database-url", &url]);
    for round in 0..10 {
        for n in 0..2 {
            let resp = a.send_json(
                "POST",
                "/licenses",
                &json!({"payload": vendor.valid(&format!("CONSUL-{round}-{n}"))}),
            );
            assert_eq!(resp.status, 201, "{}", resp.body);
            std::thread::sleep(Duration::from_millis(1100)); // a newer updated_at
        }
        eventually("B has both licenses", Duration::from_secs(10), || {
            (b.stored_ids().len() == 2).then_some(())
        });
        let (ra, rb) = std::thread::scope(|scope| {
            let ra = scope.spawn(|| a.send("DELETE", "/v1/operator/license").status);
            let rb = scope.spawn(|| b.send("DELETE", "/v1/operator/license").status);
            (ra.join().unwrap(), rb.join().unwrap())
        });
        let mut statuses = [ra, rb];
        statuses.sort();
        assert_eq!(
            statuses,
            [200, 400],
            "round {round}: one delete, one refusal"
        );
        for cp in [&a, &b] {
            let ids = eventually("one license left", Duration::from_secs(10), || {
                let ids = cp.stored_ids();
                (ids.len() == 1).then_some(ids)
            });
            assert_eq!(ids.len(), 1);
            assert_eq!(cp.get("/license/status").json()["status"], "valid");
        }
        // Start the next round empty.
        for id in a.stored_ids() {
            assert_eq!(a.send("DELETE", &format!("/licenses/{id}")).status, 204);
        }
    }
}

/// A TCP proxy in front of a control plane's cluster port. While `swallow` is set it keeps
/// passing what the data plane sends but drops everything the control plane answers, its
/// telemetry acknowledgements included: the control plane applies a usage report whose
/// acknowledgement never arrives. When either side closes, both are closed.
struct AckSwallower {
    addr: SocketAddr,
    swallow: Arc<AtomicBool>,
}

impl AckSwallower {
    fn start(target: SocketAddr) -> AckSwallower {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let swallow = Arc::new(AtomicBool::new(false));
        let swallowing = swallow.clone();
        std::thread::spawn(move || {
            // Enough connections for the data plane's reconnections during one test.
            for client in listener.incoming().take(100) {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(target) else {
                    continue; // The control plane is gone: the data plane moves on.
                };
                let (Ok(client_tx), Ok(server_tx)) = (client.try_clone(), server.try_clone())
                else {
                    continue;
                };
                pipe(client, server_tx, None);
                pipe(server, client_tx, Some(swallowing.clone()));
            }
        });
        AckSwallower { addr, swallow }
    }
}

/// Copies `from` to `to` on a thread until either ends, dropping what is read while
/// `swallow` is set.
fn pipe(mut from: TcpStream, mut to: TcpStream, swallow: Option<Arc<AtomicBool>>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf) {
            if swallow.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)) {
                continue;
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

/// An upstream on loopback that answers 200 `ok` to everything, for a gate.
struct Upstream {
    url: String,
    _runtime: tokio::runtime::Runtime,
}

impl Upstream {
    fn start() -> Upstream {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("binding the upstream");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let app = axum::Router::new().fallback(|| async { "ok" });
        runtime.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Upstream {
            url,
            _runtime: runtime,
        }
    }
}

/// The requests counted in the usage report, over every month.
fn report_total(cp: &Cp) -> u64 {
    let report = cp.get("/license/report");
    assert_eq!(report.status, 200, "{}", report.body);
    report.json()["counters"]
        .as_array()
        .expect("counters")
        .iter()
        .map(|c| c["request_count"].as_u64().expect("request_count"))
        .sum()
}

/// Requests sent through a gate from a thread until stopped: how many were answered 200,
/// and what else came back (nothing else should).
struct Traffic {
    ok: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<String>>,
}

impl Traffic {
    fn start(gate: SocketAddr) -> Traffic {
        let ok = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (counted, stopping) = (ok.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut other = Vec::new();
            // At most 60 s of requests, whatever the test does.
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stopping.load(Ordering::SeqCst) && Instant::now() < deadline {
                match http("GET", &format!("http://{gate}/counted"), None) {
                    Ok(resp) if resp.status == 200 => {
                        counted.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(resp) => other.push(format!("{} {}", resp.status, resp.body)),
                    Err(e) => other.push(e),
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            other
        });
        Traffic { ok, stop, thread }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }

    /// Stops, and returns the number of 200s.
    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        let other = self.thread.join().expect("the traffic thread");
        assert!(
            other.is_empty(),
            "the gate answered something other than 200 while its control plane changed: {other:?}"
        );
        self.ok.load(Ordering::SeqCst)
    }
}

/// Two control planes on one database, a gate listing both, reporting every second. Its
/// control plane applies a report whose acknowledgement is lost, then is killed with
/// traffic flowing: the gate moves to the other control plane and sends the report again
/// under the same `seq`. The database's totals count every request answered 200 exactly
/// once: not the resent report twice, and nothing counted meanwhile lost.
#[test]
fn usage_counts_exactly_once_while_a_gate_moves_to_another_control_plane() {
    let tmp = TempDir::new().expect("temp dir");
    let pg = TestPostgres::start();
    let vendor = Vendor::new(tmp.path(), 9);
    let certs = cluster_certs(tmp.path());
    let mut args: Vec<String> = vec![
        "--trusted-key".into(),
        vendor.public_key.to_string_lossy().into_owned(),
        "--database-url".into(),
        pg.url(),
    ];
    args.extend(shared_tls_args(&certs));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (dir_a, dir_b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    let mut a = Cp::start(&dir_a, &args);
    let b = Cp::start(&dir_b, &args);
    a.add(&vendor.valid("USAGE"));
    let upstream = Upstream::start();
    let proxy = AckSwallower::start(a.cluster_addr);
    let gate = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let gate_arg = gate.to_string();
    let dp = Dp::start_at(
        tmp.path(),
        "gate",
        &[proxy.addr, b.cluster_addr],
        &certs,
        &vendor.public_key,
        &[
            "--proxy-listen",
            &gate_arg,
            "--upstream",
            &upstream.url,
            "--telemetry-interval",
            "1",
        ],
    );
    dp.wait_license("the license", |l| l["status"] == "valid");
    let connected_to = |addr: SocketAddr| {
        let status = dp.get("/status").json();
        (status["control_plane"]["address"] == addr.to_string().as_str()
            && status["control_plane"]["connected"] == true)
            .then_some(())
    };
    eventually("the gate connected to A", Duration::from_secs(10), || {
        connected_to(proxy.addr)
    });

    // Counted through A, acknowledged.
    const FIRST: u64 = 30;
    for _ in 0..FIRST {
        let resp = http("GET", &format!("http://{gate}/first"), None).expect("the gate answers");
        assert_eq!(resp.status, 200, "{}", resp.body);
    }
    eventually(
        "the first 30 requests counted",
        Duration::from_secs(15),
        || (report_total(&b) == FIRST).then_some(()),
    );

    // A's answers are lost from now on. Requests keep flowing; the gate's report is
    // applied by A but never acknowledged, so the gate holds it and sends it again every
    // second (A applies it once), and counts the requests after it for later: the total
    // stops moving while requests flow.
    proxy.swallow.store(true, Ordering::SeqCst);
    let traffic = Traffic::start(gate);
    let swallowed_at = Instant::now();
    let mut last = (report_total(&b), Instant::now());
    let held = eventually(
        "the total to stop moving while requests flow (a report held unacknowledged)",
        Duration::from_secs(20),
        || {
            let total = report_total(&b);
            if total != last.0 {
                last = (total, Instant::now());
            }
            let still = last.1.elapsed() >= Duration::from_millis(2500);
            let flowing = FIRST + traffic.ok() > total;
            (still && flowing && swallowed_at.elapsed() >= Duration::from_secs(3)).then_some(total)
        },
    );
    assert!(held >= FIRST, "counts went down: {held}");

    // A is killed with requests flowing; the gate moves to B and sends the held report
    // there, under the same seq.
    a.kill();
    eventually("the gate connected to B", Duration::from_secs(30), || {
        connected_to(b.cluster_addr)
    });
    assert_eq!(dp.get("/status/ready").status, 200);
    let moved = traffic.ok();
    eventually(
        "more requests through the gate on B",
        Duration::from_secs(10),
        || (traffic.ok() >= moved + 50).then_some(()),
    );
    let answered = FIRST + traffic.finish();
    assert!(answered > held, "the traffic hardly flowed: {answered}");

    let counted = eventually(
        "every request answered 200 counted",
        Duration::from_secs(30),
        || {
            let total = report_total(&b);
            (total >= answered).then_some(total)
        },
    );
    assert_eq!(
        counted, answered,
        "the report counts {counted} requests, the gate answered {answered} with 200 \
         (more: a report resent after the move counted twice)"
    );
    // A few more telemetry rounds: the total stays put.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(report_total(&b), answered, "counted twice after settling");
    let by_dp = b.get("/license/report?by=dataplane").json();
    let planes = by_dp["dataplanes"].as_array().expect("dataplanes");
    assert_eq!(planes.len(), 1, "{by_dp}");
    let own: u64 = planes[0]["counters"]
        .as_array()
        .expect("counters")
        .iter()
        .map(|c| c["request_count"].as_u64().expect("request_count"))
        .sum();
    assert_eq!(own, answered, "{by_dp}");
}

/// The daily expiry log of a stored license is the cluster's: one control plane writes it
/// (the one leading the chores), and when that one dies another takes over within seconds.
#[test]
fn one_control_plane_logs_the_expiry_and_another_takes_over_when_it_dies() {
    let tmp = TempDir::new().expect("temp dir");
    let pg = TestPostgres::start();
    let url = pg.url();
    let vendor = Vendor::new(tmp.path(), 6);
    let key = vendor.public_key.to_str().expect("utf-8 path");
    let mut cps: Vec<Cp> = ["a", "b"]
        .iter()
        .map(|name| {
            let dir = tmp.path().join(name);
            std::fs::create_dir_all(&dir).unwrap();
            Cp::start(&dir, &["--trusted-key", key, "--database-url", &url])
        })
        .collect();
    // Twenty days left: an ERROR once a day.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let expires = charter_license::rfc3339(now + 20 * 86_400)[..10].to_owned();
    let added = cps[0].send_json(
        "POST",
        "/licenses",
        &json!({"payload": vendor.license("SOON", "2026-01-01", &expires)}),
    );
    assert_eq!(added.status, 201, "{}", added.body);
    let logged = |cp: &Cp| {
        cp.logs()
            .lines()
            .filter(|l| l.contains("ERROR") && l.contains("days left"))
            .count()
    };
    let leader = eventually(
        "one control plane logs the expiry",
        Duration::from_secs(60),
        || cps.iter().position(|cp| logged(cp) > 0),
    );
    let other = 1 - leader;
    // Well past the other's next look at the license (every 10 s): still only one.
    std::thread::sleep(Duration::from_secs(15));
    assert_eq!(
        (logged(&cps[leader]), logged(&cps[other])),
        (1, 0),
        "once, by one control plane"
    );

    cps[leader].kill();
    eventually(
        "the other control plane takes the chores over and logs",
        Duration::from_secs(60),
        || (logged(&cps[other]) == 1).then_some(()),
    );
}
