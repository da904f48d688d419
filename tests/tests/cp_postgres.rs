//! Several real `charter-cp` processes on one real PostgreSQL (started by the test, as an
//! unprivileged user): one cluster. A write on one control plane reaches the data planes
//! of another; a database outage refuses writes with 503 while data planes keep
//! enforcing, and the next write after the database returns reaches them, with no
//! control plane restarted.

use std::time::Duration;

use charter_store::testing::TestPostgres;
use charter_tests::{cluster_certs, eventually, shared_tls_args, Cp, Dp, Vendor};
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
