//! Unit tests: configuration, the snapshot rules, the cache files, the backoff and the
//! gate's limits (lanes, idle client connections).

use std::fs;
use std::path::Path;
use std::time::Duration;

use charter_license::{LicenseSigner, TrustedKeys};
use charter_proto::v1::{License, Snapshot};
use clap::Parser;
use serde_json::{json, Map, Value};

use crate::cache::{self, CacheError, CacheFile, CachedLicense, CACHE_FORMAT};
use crate::config::{Args, Config, Transport, SHARED_SERVER_NAME};
use crate::files;
use crate::state::{
    decide, decide_regressed, judge, ClusterHeld, Decision, HeldLicense, LowerRevisions, Source,
    Verdict,
};
use crate::sync::backoff;

/// 2026-03-01T12:00:00Z.
const NOW: i64 = 1_772_366_400;

fn signer(seed: u8) -> LicenseSigner {
    LicenseSigner::from_seed([seed; 32])
}

fn document(signer: &LicenseSigner, created: &str, expires: &str) -> String {
    let Value::Object(payload) = json!({
        "admin_seats": "1",
        "customer": "Example Company, Inc",
        "dataplanes": "1",
        "license_creation_date": created,
        "license_expiration_date": expires,
        "license_key": "key-1",
        "product_subscription": "Charter Enterprise",
        "support_plan": "None",
    }) else {
        unreachable!()
    };
    let payload: Map<String, Value> = payload;
    signer.sign(payload).unwrap().to_json()
}

// ---- configuration ----

/// Parses `args` (after the program name) into a configuration, in a temp dir holding
/// `vendor.pub` (a valid key), `bad.pub`, `static.json` (a valid license) and `cert.pem`.
fn check(args: &[&str]) -> Result<Config, String> {
    let dir = tempfile::TempDir::new().unwrap();
    let vendor = signer(1);
    fs::write(dir.path().join("vendor.pub"), vendor.trusted_key().to_pem()).unwrap();
    fs::write(dir.path().join("bad.pub"), "not a key").unwrap();
    fs::write(
        dir.path().join("static.json"),
        document(&vendor, "2026-01-01", "2099-12-31"),
    )
    .unwrap();
    fs::write(
        dir.path().join("stranger.json"),
        document(&signer(2), "2026-01-01", "2099-12-31"),
    )
    .unwrap();
    let d = dir.path().to_str().unwrap();
    let args: Vec<String> = std::iter::once("charter-dp".to_owned())
        .chain(args.iter().map(|a| a.replace("$D", d)))
        .collect();
    let args = Args::try_parse_from(args).map_err(|e| e.to_string())?;
    Config::from_args(args, NOW).map_err(|e| format!("{e:#}"))
}

fn refused(args: &[&str], expected: &str) {
    match check(args) {
        Ok(config) => panic!("{args:?} should be refused, got {config:?}"),
        Err(e) => assert!(
            e.contains(expected),
            "{args:?}: `{e}` should mention `{expected}`"
        ),
    }
}

#[test]
fn configuration_defaults() {
    let config = check(&["--trusted-key", "$D/vendor.pub", "--cluster-insecure"]).unwrap();
    assert_eq!(config.control_plane, "127.0.0.1:8005");
    assert_eq!(config.data_dir, Path::new("./charter-dp-data"));
    assert_eq!(config.status_listen.to_string(), "127.0.0.1:8100");
    assert_eq!(config.trusted_keys.ids(), vec![signer(1).key_id()]);
    assert!(matches!(config.transport, Transport::Insecure));
    assert!(config.static_license.is_none());
    assert!(config.labels.is_empty());
}

#[test]
fn configuration_values() {
    let config = check(&[
        "--trusted-key",
        "$D/vendor.pub",
        "--cluster-insecure",
        "--control-plane",
        "cp.example.internal:9005",
        "--status-listen",
        "0.0.0.0:9100",
        "--label",
        "zone=a",
        "--label",
        "tier = edge",
        "--license-path",
        "$D/static.json",
    ])
    .unwrap();
    assert_eq!(config.control_plane, "cp.example.internal:9005");
    assert_eq!(config.status_listen.to_string(), "0.0.0.0:9100");
    assert_eq!(config.labels.get("zone").map(String::as_str), Some("a"));
    assert_eq!(config.labels.get("tier").map(String::as_str), Some("edge"));
    assert!(config
        .static_license
        .unwrap()
        .origin
        .contains("static.json"));
}

#[test]
fn configuration_errors() {
    refused(&["--cluster-insecure"], "no --trusted-key");
    refused(
        &["--trusted-key", "$D/missing.pub", "--cluster-insecure"],
        "missing.pub",
    );
    refused(
        &["--trusted-key", "$D/bad.pub", "--cluster-insecure"],
        "SPKI PEM",
    );
    refused(
        &["--trusted-key", "$D/vendor.pub"],
        "--cluster-cert and --cluster-cert-key",
    );
    refused(
        &[
            "--trusted-key",
            "$D/vendor.pub",
            "--cluster-cert",
            "$D/cert.pem",
        ],
        "--cluster-cert-key",
    );
    refused(
        &[
            "--trusted-key",
            "$D/vendor.pub",
            "--cluster-cert",
            "$D/cert.pem",
            "--cluster-cert-key",
            "$D/key.pem",
            "--cluster-mtls",
            "pki",
        ],
        "--cluster-ca-cert",
    );
    refused(
        &[
            "--trusted-key",
            "$D/vendor.pub",
            "--cluster-cert",
            "$D/missing-cert.pem",
            "--cluster-cert-key",
            "$D/missing-key.pem",
        ],
        "missing-cert.pem",
    );
    let insecure = ["--trusted-key", "$D/vendor.pub", "--cluster-insecure"];
    let with = |extra: &[&'static str]| -> Vec<&str> {
        insecure
            .iter()
            .copied()
            .chain(extra.iter().copied())
            .collect()
    };
    refused(&with(&["--control-plane", "no-port"]), "HOST:PORT");
    refused(&with(&["--control-plane", "host:99999"]), "HOST:PORT");
    refused(&with(&["--control-plane", ":8005"]), "HOST:PORT");
    refused(&with(&["--status-listen", "nowhere"]), "--status-listen");
    refused(&with(&["--label", "novalue"]), "KEY=VALUE");
    refused(&with(&["--label", "=x"]), "key");
    refused(&with(&["--label", "a=1", "--label", "a=2"]), "twice");
    refused(
        &with(&["--license-path", "$D/stranger.json"]),
        "validation_fail",
    );
    refused(
        &with(&["--license-path", "$D/missing.json"]),
        "--license-path",
    );
    refused(
        &with(&["--license-path", "$D/static.json", "--license-data", "{}"]),
        "both",
    );
    refused(&with(&["--license-data", "{}"]), "static license");
    refused(&with(&["--cluster-mtls", "fancy"]), "fancy");
    // Gate mode.
    let gate = |upstream: &'static str| -> Vec<&str> {
        with(&["--proxy-listen", "127.0.0.1:0", "--upstream", upstream])
    };
    refused(
        &with(&["--proxy-listen", "127.0.0.1:0"]),
        "needs --upstream",
    );
    refused(
        &with(&["--upstream", "http://svc:80"]),
        "needs --proxy-listen",
    );
    refused(&gate("https://svc:443"), "not supported");
    refused(&gate("http://user:pw@svc:80"), "credentials");
    refused(&gate("http://svc:80/?a=b"), "query");
    let mut slow = gate("http://svc:80");
    slow.extend(["--upstream-timeout", "0"]);
    refused(&slow, "--upstream-timeout");
    let mut untrusted = gate("http://svc:80");
    untrusted.extend(["--trusted-proxy", "10.1.2.3/8"]);
    refused(&untrusted, "write 10.0.0.0/8");
    refused(&with(&["--trusted-proxy", "10.0.0.0/8"]), "gate mode flags");
    refused(&with(&["--preserve-host"]), "gate mode flags");
}

#[test]
fn shared_mode_passes_the_shared_server_name() {
    assert_eq!(SHARED_SERVER_NAME, "charter-cluster");
}

// ---- snapshot rules ----

fn held(epoch: &str, revision: u64, signer: &LicenseSigner) -> ClusterHeld {
    let text = document(signer, "2026-01-01", "2099-12-31");
    let (verified, _) =
        charter_license::validate(&text, &TrustedKeys::new([signer.trusted_key()]), NOW).unwrap();
    ClusterHeld {
        epoch: epoch.to_owned(),
        revision,
        license: Some(HeldLicense {
            record: Some(CachedLicense {
                id: "held".into(),
                payload: text,
                created_at: 1,
                updated_at: 2,
            }),
            verified,
        }),
        source: Source::Cache,
        received_at: NOW - 10,
    }
}

fn snap(epoch: &str, revision: u64, payload: Option<String>) -> Snapshot {
    Snapshot {
        epoch: epoch.to_owned(),
        revision,
        license: payload.map(|payload| License {
            id: "new".into(),
            payload,
            created_at: 3,
            updated_at: 4,
        }),
    }
}

#[test]
fn snapshot_rules() {
    let vendor = signer(1);
    let keys = TrustedKeys::new([vendor.trusted_key()]);
    let good = Some(document(&vendor, "2026-01-01", "2099-12-31"));
    let expired = Some(document(&vendor, "2020-01-01", "2021-01-01"));
    let forged = Some(document(&signer(2), "2026-01-01", "2099-12-31"));
    let h = held("e1", 5, &vendor);
    let same = {
        let record = h.license.as_ref().and_then(|l| l.record.clone()).unwrap();
        Snapshot {
            epoch: "e1".into(),
            revision: 5,
            license: Some(License {
                id: record.id,
                payload: record.payload,
                created_at: record.created_at,
                updated_at: record.updated_at,
            }),
        }
    };
    let outcome = |held: Option<&ClusterHeld>, s: Snapshot| -> String {
        match judge(held, &s, &keys, NOW) {
            Verdict::EmptyControlPlane { held_epoch } => format!("empty, keep {held_epoch}"),
            Verdict::Decided(decision) => describe(decision),
        }
    };
    let unlicensed = ClusterHeld {
        license: None,
        ..held("e1", 5, &vendor)
    };
    let table: Vec<(Option<&ClusterHeld>, Snapshot, &str)> = vec![
        (None, snap("e1", 1, good.clone()), "apply e1@1 new"),
        (None, snap("e1", 1, None), "apply e1@1 none"),
        (Some(&h), snap("e1", 4, good.clone()), "stale 5"),
        (Some(&h), snap("e1", 4, forged.clone()), "stale 5"),
        (Some(&h), same.clone(), "applied"),
        // Same revision, another license: the control plane's choice changed with time.
        (Some(&h), snap("e1", 5, good.clone()), "apply e1@5 new"),
        (Some(&h), snap("e1", 5, None), "apply e1@5 none"),
        (
            Some(&h),
            snap("e1", 5, forged.clone()),
            "reject validation_fail",
        ),
        (Some(&h), snap("e1", 6, good.clone()), "apply e1@6 new"),
        (Some(&h), snap("e1", 6, None), "apply e1@6 none"),
        (Some(&h), snap("e2", 1, good.clone()), "apply e2@1 new"),
        // A new epoch with no license (a rebuilt, empty control plane) never displaces a
        // license held; within the epoch, deleting the last license still unlicenses.
        (Some(&h), snap("e2", 1, None), "empty, keep e1"),
        (Some(&h), snap("e2", 9, None), "empty, keep e1"),
        (Some(&unlicensed), snap("e2", 1, None), "apply e2@1 none"),
        (Some(&unlicensed), snap("e1", 4, None), "stale 5"),
        (Some(&h), snap("e1", 6, forged), "reject validation_fail"),
        (
            Some(&h),
            snap("e1", 6, Some("{".into())),
            "reject invalid_license_json",
        ),
        (Some(&h), snap("e1", 6, expired), "apply e1@6 new"),
        (
            Some(&h),
            snap("e1", 6, Some(document(&vendor, "2026-12-01", "2099-12-31"))),
            "reject invalid_expiration_date",
        ),
    ];
    for (i, (held, snapshot, expected)) in table.into_iter().enumerate() {
        assert_eq!(outcome(held, snapshot), expected, "case {i}");
    }
}

fn describe(decision: Decision) -> String {
    match decision {
        Decision::Stale { held } => format!("stale {held}"),
        Decision::AlreadyApplied => "applied".into(),
        Decision::Reject(e) => format!("reject {}", e.code),
        Decision::Apply(new) => format!(
            "apply {}@{} {}",
            new.epoch,
            new.revision,
            new.license
                .as_ref()
                .and_then(|l| l.record.as_ref())
                .map_or("none", |r| r.id.as_str())
        ),
    }
}

#[test]
fn a_regressed_revision_is_taken_still_verified() {
    let vendor = signer(1);
    let keys = TrustedKeys::new([vendor.trusted_key()]);
    let good = Some(document(&vendor, "2026-01-01", "2099-12-31"));
    let forged = Some(document(&signer(2), "2026-01-01", "2099-12-31"));
    // What an altered cache holds: the control plane's epoch and the largest revision.
    let h = held("e1", u64::MAX, &vendor);
    let table: Vec<(Snapshot, &str)> = vec![
        (snap("e1", 7, good.clone()), "apply e1@7 new"),
        (snap("e1", 7, None), "apply e1@7 none"),
        (snap("e1", 7, forged), "reject validation_fail"),
        // Not lower: the ordinary rules.
        (snap("e2", 7, good.clone()), "apply e2@7 new"),
    ];
    for (i, (snapshot, expected)) in table.into_iter().enumerate() {
        assert_eq!(
            describe(decide_regressed(Some(&h), &snapshot, &keys, NOW)),
            expected,
            "case {i}"
        );
    }
    assert_eq!(
        describe(decide(Some(&h), &snap("e1", 7, good), &keys, NOW)),
        format!("stale {}", u64::MAX),
        "without the wait, a lower revision is stale"
    );
}

#[test]
fn lower_revisions_are_taken_after_the_wait_from_the_first() {
    let wait = Duration::from_secs(60);
    let t0 = tokio::time::Instant::now();
    let at = |secs: u64| t0 + Duration::from_secs(secs);
    let mut lower = LowerRevisions::default();
    assert_eq!(lower.deadline(wait), None);
    assert!(lower.due(at(1000), wait).is_none(), "nothing offered");

    lower.offered(snap("e1", 3, None), at(0));
    lower.offered(snap("e1", 4, None), at(30));
    assert_eq!(lower.deadline(wait), Some(at(60)), "from the first");
    assert!(lower.due(at(59), wait).is_none(), "the CP may be lagging");
    let taken = lower.due(at(60), wait).expect("due after the wait");
    assert_eq!(taken.revision, 4, "the latest offer is taken");
    assert_eq!(lower.deadline(wait), None, "taken once");

    lower.offered(snap("e1", 3, None), at(100));
    lower.clear();
    assert!(
        lower.due(at(1000), wait).is_none(),
        "something newer ends the wait"
    );
    lower.offered(snap("e1", 3, None), at(200));
    assert_eq!(lower.deadline(wait), Some(at(260)), "a new wait");
}

#[test]
fn an_applied_snapshot_is_from_the_cluster_at_now() {
    let vendor = signer(1);
    let keys = TrustedKeys::new([vendor.trusted_key()]);
    let Decision::Apply(new) = decide(
        None,
        &snap("e", 1, Some(document(&vendor, "2026-01-01", "2099-12-31"))),
        &keys,
        NOW,
    ) else {
        panic!("applies")
    };
    assert_eq!(new.source, Source::Cluster);
    assert_eq!(new.received_at, NOW);
    let cache = new.to_cache();
    assert_eq!(cache.format, CACHE_FORMAT);
    assert_eq!(cache.license.unwrap().updated_at, 4);
}

// ---- files ----

#[test]
fn cache_round_trip_verification_and_refusals() {
    let dir = tempfile::TempDir::new().unwrap();
    let vendor = signer(1);
    let keys = TrustedKeys::new([vendor.trusted_key()]);
    assert!(cache::load(dir.path(), &keys, NOW).unwrap().is_none());

    let file = held("e", 3, &vendor).to_cache();
    cache::store(dir.path(), &file).unwrap();
    let loaded = cache::load(dir.path(), &keys, NOW).unwrap().unwrap();
    assert_eq!(loaded.file, file);
    assert!(loaded.license.is_some());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &fs::metadata(cache::path(dir.path())).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    let unlicensed = CacheFile {
        license: None,
        ..file.clone()
    };
    cache::store(dir.path(), &unlicensed).unwrap();
    let loaded = cache::load(dir.path(), &keys, NOW).unwrap().unwrap();
    assert!(loaded.license.is_none());

    let other_keys = TrustedKeys::new([signer(2).trusted_key()]);
    cache::store(dir.path(), &file).unwrap();
    let e = cache::load(dir.path(), &other_keys, NOW).unwrap_err();
    assert!(matches!(e, CacheError::Unverifiable { .. }));
    assert_eq!(e.code(), "validation_fail");
    assert!(e.to_string().contains(cache::CACHE_FILE), "{e}");

    fs::write(cache::path(dir.path()), "{\"format\": 1, \"epo").unwrap();
    let e = cache::load(dir.path(), &keys, NOW).unwrap_err();
    assert_eq!(e.code(), "cache_corrupt");

    let future = CacheFile { format: 99, ..file };
    cache::store(dir.path(), &future).unwrap();
    assert_eq!(
        cache::load(dir.path(), &keys, NOW).unwrap_err().code(),
        "cache_corrupt"
    );
}

#[test]
fn a_leftover_temp_file_does_not_matter() {
    let dir = tempfile::TempDir::new().unwrap();
    let staging = dir.path().join(files::STAGING_DIR);
    fs::create_dir(&staging).unwrap();
    let temp = staging.join(cache::CACHE_FILE);
    fs::write(&temp, "half a cache from a crash").unwrap();
    fs::set_permissions(&temp, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let file = held("e", 1, &signer(1)).to_cache();
    cache::store(dir.path(), &file).unwrap();
    assert_eq!(cache::read(dir.path()).unwrap().unwrap(), file);
    assert!(!temp.exists());
}

#[test]
fn the_node_id_is_made_once_and_kept() {
    let dir = tempfile::TempDir::new().unwrap();
    let id = files::node_id(dir.path()).unwrap();
    assert_eq!(id.get_version_num(), 4);
    assert_eq!(files::node_id(dir.path()).unwrap(), id);
    fs::write(dir.path().join(files::NODE_ID_FILE), "garbage").unwrap();
    let e = files::node_id(dir.path()).unwrap_err();
    assert!(e.to_string().contains("delete it"), "{e}");
}

#[test]
fn the_clock_mark_round_trips_and_bounds_the_clock() {
    use charter_license::{Clock, FixedClock};
    use std::sync::Arc;
    let dir = tempfile::TempDir::new().unwrap();
    assert_eq!(files::read_clock_mark(dir.path()).unwrap(), None);
    let wall = Arc::new(FixedClock::new(NOW));
    let clock = crate::clock::NodeClock::new(wall.clone(), dir.path().to_path_buf(), None);
    assert_eq!(clock.now(), NOW);
    clock.persist();
    assert_eq!(files::read_clock_mark(dir.path()).unwrap(), Some(NOW));
    wall.set(NOW - 1000);
    assert_eq!(clock.now(), NOW, "never backwards");
    assert_eq!(clock.warning(), None, "a mark minutes ahead is no news");

    let restarted = crate::clock::NodeClock::new(
        wall.clone(),
        dir.path().to_path_buf(),
        files::read_clock_mark(dir.path()).unwrap(),
    );
    assert_eq!(
        restarted.now(),
        NOW,
        "the persisted mark survives a restart"
    );
    fs::write(dir.path().join(files::CLOCK_MARK_FILE), "soon").unwrap();
    assert_eq!(files::read_clock_mark(dir.path()).unwrap(), None);
}

#[test]
fn a_mark_more_than_a_day_ahead_is_a_warning_with_both_dates_and_the_reset() {
    use charter_license::{Clock, FixedClock};
    use std::sync::Arc;
    let dir = tempfile::TempDir::new().unwrap();
    let year_2100 = 4_102_444_800;
    let wall = Arc::new(FixedClock::new(NOW));
    let clock =
        crate::clock::NodeClock::new(wall.clone(), dir.path().to_path_buf(), Some(year_2100));
    assert_eq!(clock.now(), year_2100, "the mark still bounds the clock");
    let warning = clock.warning().expect("a mark 74 years ahead is shown");
    for needle in [
        "2100-01-01T00:00:00Z",
        "2026-03-01T12:00:00Z",
        files::CLOCK_MARK_FILE,
    ] {
        assert!(warning.contains(needle), "`{needle}` in: {warning}");
    }
    clock.report_mark_ahead();
    wall.set(year_2100 - 3600);
    assert_eq!(clock.warning(), None, "the clock caught up");
    clock.report_mark_ahead();
}

#[test]
fn backoff_doubles_from_one_to_thirty_seconds_with_jitter() {
    let secs = |failures, jitter| backoff(failures, jitter).as_secs_f64();
    assert_eq!(backoff(0, 1.0), Duration::from_secs(1));
    assert_eq!(backoff(0, 0.0), Duration::from_secs(1), "never under 1 s");
    assert_eq!(secs(1, 1.0), 2.0);
    assert_eq!(secs(3, 1.0), 8.0);
    assert!((secs(3, 0.0) - 6.4).abs() < 1e-9);
    assert_eq!(secs(5, 1.0), 30.0, "capped");
    assert_eq!(secs(u32::MAX, 1.0), 30.0);
    assert!(secs(10, 0.0) >= 24.0);
}

// ---- the gate's limits ----

/// An upstream on loopback that keeps connections open and answers each request with
/// `answer(the connection's number, the request's path)`.
fn keep_alive_upstream(
    answer: impl Fn(usize, &str) -> String + Send + Sync + 'static,
) -> std::net::SocketAddr {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let answer = std::sync::Arc::new(answer);
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate().take(32) {
            let Ok(stream) = stream else { return };
            let answer = answer.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                loop {
                    let mut request_line = String::new();
                    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let path = request_line.split(' ').nth(1).unwrap_or("/");
                    let body = answer(n, path);
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if reader.get_mut().write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// An upstream that answers every request with the number of the connection it came on.
fn counting_upstream() -> std::net::SocketAddr {
    keep_alive_upstream(|n, _| n.to_string())
}

/// An upstream that answers `GET /MS` with `ok` after MS milliseconds (any other path at
/// once).
fn delaying_upstream() -> std::net::SocketAddr {
    keep_alive_upstream(|_, path| {
        let delay = path.trim_start_matches('/').parse().unwrap_or(0);
        std::thread::sleep(Duration::from_millis(delay));
        "ok".to_owned()
    })
}

/// One keep-alive client connection to the gate.
struct Client(std::io::BufReader<std::net::TcpStream>);

impl Client {
    fn connect(addr: std::net::SocketAddr) -> Client {
        let stream = std::net::TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        Client(std::io::BufReader::new(stream))
    }

    /// `GET /` on this connection: the status and the body (the upstream connection's
    /// number).
    fn get(&mut self) -> (u16, String) {
        self.get_path("/")
    }

    /// `GET path` on this connection: the status and the body.
    fn get_path(&mut self, path: &str) -> (u16, String) {
        use std::io::{BufRead, Read, Write};
        self.0
            .get_mut()
            .write_all(format!("GET {path} HTTP/1.1\r\nhost: gate.test\r\n\r\n").as_bytes())
            .expect("send");
        let mut line = String::new();
        self.0.read_line(&mut line).expect("status line");
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut length = 0;
        loop {
            line.clear();
            self.0.read_line(&mut line).expect("header");
            if line == "\r\n" {
                break;
            }
            if let Some(("content-length", value)) = line.split_once(':') {
                length = value.trim().parse().expect("length");
            }
        }
        let mut body = vec![0; length];
        self.0.read_exact(&mut body).expect("body");
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// Whether the gate has closed this connection.
    fn closed(&mut self) -> bool {
        use std::io::Read;
        let mut byte = [0; 1];
        matches!(self.0.read(&mut byte), Ok(0))
    }

    /// Whether the gate has closed this connection, or does within `wait`.
    fn closed_within(&mut self, wait: Duration) -> bool {
        self.0
            .get_ref()
            .set_read_timeout(Some(wait))
            .expect("timeout");
        self.closed()
    }
}

/// A gate serving on a loopback port with a valid license, in front of `upstream`, with
/// `lanes` lanes, clients closed after a second without a request and spliced
/// connections after two seconds without a byte.
struct LicensedGate {
    addr: std::net::SocketAddr,
    // Dropped in this order: the gate's tasks, then its data dir.
    _runtime: tokio::runtime::Runtime,
    _stop: tokio::sync::watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

fn licensed_gate(upstream: std::net::SocketAddr, timeout: Duration, lanes: usize) -> LicensedGate {
    licensed_gate_to(&format!("http://{upstream}"), timeout, lanes)
}

/// [`licensed_gate`] in front of the upstream at `url`.
fn licensed_gate_to(url: &str, timeout: Duration, lanes: usize) -> LicensedGate {
    licensed_gate_idle(url, timeout, lanes, Duration::from_secs(1))
}

/// [`licensed_gate_to`], with clients closed after `idle` without a request.
fn licensed_gate_idle(url: &str, timeout: Duration, lanes: usize, idle: Duration) -> LicensedGate {
    use std::sync::Arc;

    use crate::config::GateConfig;
    use crate::gate::{serve, Gate, Upstream};
    use crate::state::Enforcement;
    use crate::usage::Usage;

    let dir = tempfile::TempDir::new().expect("temp dir");
    let signer = signer(7);
    let text = document(&signer, "2026-01-01", "2099-12-31");
    let (verified, _) =
        charter_license::validate(&text, &TrustedKeys::new([signer.trusted_key()]), NOW)
            .expect("valid");
    let clock = Arc::new(crate::clock::NodeClock::new(
        Arc::new(charter_license::FixedClock::new(NOW)),
        dir.path().to_path_buf(),
        None,
    ));
    let enforcement = Arc::new(Enforcement::new(Some(verified), None, clock));
    let usage = Arc::new(Usage::open(dir.path()).expect("usage"));
    let upstream = Upstream::parse(url).expect("url");
    let config = GateConfig {
        timeout,
        ..GateConfig::new(std::net::SocketAddr::from(([127, 0, 0, 1], 0)), upstream)
    };
    let gate = Gate::with_limits(
        &config,
        uuid::Uuid::new_v4(),
        enforcement,
        usage,
        lanes,
        idle,
    )
    .with_tunnel_idle_timeout(Duration::from_secs(2));
    let gate = Arc::new(gate);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    runtime.spawn(serve(listener, gate, stopped));
    LicensedGate {
        addr,
        _runtime: runtime,
        _stop: stop,
        _dir: dir,
    }
}

#[test]
fn beyond_the_lane_limit_requests_still_go_through_and_idle_clients_are_closed() {
    // One lane, and clients closed after a second without a request.
    let gate = licensed_gate(counting_upstream(), Duration::from_secs(5), 1);
    let addr = gate.addr;

    // The first client holds the only lane: its requests go over one upstream connection.
    let mut first = Client::connect(addr);
    let (status, lane) = first.get();
    assert_eq!(status, 200);
    assert_eq!(first.get(), (200, lane.clone()));
    // A second client, beyond the limit, is served through the pool, on another
    // upstream connection.
    let mut second = Client::connect(addr);
    let (status, pooled) = second.get();
    assert_eq!(status, 200);
    assert_ne!(pooled, lane);
    // A third, also beyond the limit, gets the pool's idle connection (with a lane of its
    // own it would open a new one).
    std::thread::sleep(Duration::from_millis(100));
    let mut third = Client::connect(addr);
    assert_eq!(third.get(), (200, pooled.clone()));

    // Idle for longer than the limit: the gate closes the client connections, and the
    // first one's upstream connection goes back to be reused by the next lane.
    std::thread::sleep(Duration::from_millis(1500));
    for client in [&mut first, &mut second, &mut third] {
        assert!(client.closed(), "an idle client connection is closed");
    }
    let mut fourth = Client::connect(addr);
    assert_eq!(
        fourth.get(),
        (200, lane),
        "the closed client's upstream connection is reused"
    );
}

#[test]
fn each_request_gets_its_whole_upstream_timeout_and_idle_time_on_a_reused_connection() {
    // A 2 s upstream timeout, clients closed after 2 s without a request. Both timers
    // are the connection's, left at an earlier deadline while that is ahead of the
    // current one: when it comes during a later request, or while the connection waits
    // for the next head, they must wait on to the current one's. Every margin is 0.5 s.
    let second = Duration::from_millis(1000);
    let gate = licensed_gate_idle(
        &format!("http://{}", delaying_upstream()),
        2 * second,
        4,
        2 * second,
    );
    let start = std::time::Instant::now();
    let at = |ms: u64| {
        let wait = Duration::from_millis(ms).saturating_sub(start.elapsed());
        std::thread::sleep(wait);
    };
    // `busy` sends a request at once; `waiting` waits for its first head for a second
    // (that wait's deadline is 2 s).
    let mut busy = Client::connect(gate.addr);
    let mut waiting = Client::connect(gate.addr);
    assert_eq!(busy.get_path("/0"), (200, "ok".into()));
    at(1000);
    // Its next head's deadline is 3 s, after the first's (2 s).
    assert_eq!(waiting.get_path("/0"), (200, "ok".into()));
    // The first request's upstream deadline (2 s) comes during this one (its own: 3 s);
    // answered at 2.5 s.
    assert_eq!(busy.get_path("/1500"), (200, "ok".into()));
    // The first head's deadline (2 s) came while `waiting` waited for its second head
    // (deadline 3 s).
    at(2500);
    assert_eq!(waiting.get_path("/0"), (200, "ok".into()));
    // Still timed: an upstream answering after 3 s gets 504 (at 4.5 s)...
    let (status, _) = busy.get_path("/3000");
    assert_eq!(status, 504);
    // ...and `waiting`, idle since 2.5 s, is closed by 4.5 s.
    at(5000);
    assert!(
        waiting.closed_within(second / 2),
        "an idle client connection is closed"
    );
}

/// An HTTP/2 (h2c) upstream allowing `limit` streams at once on each connection: it
/// holds each request until `hold` are in flight together, then answers each with the
/// port of the connection it came on.
fn holding_h2_upstream(limit: u32, hold: usize) -> std::net::SocketAddr {
    use http_body_util::Full;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let together = std::sync::Arc::new(tokio::sync::Barrier::new(hold));
            while let Ok((stream, peer)) = listener.accept().await {
                let together = together.clone();
                let service = hyper::service::service_fn(move |_request| {
                    let together = together.clone();
                    async move {
                        together.wait().await;
                        let port = bytes::Bytes::from(peer.port().to_string());
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(port)))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .max_concurrent_streams(limit)
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
    });
    addr
}

#[test]
fn requests_beyond_an_http2_connections_streams_go_on_another_connection() {
    // 150 requests that the upstream answers only once all 150 are in flight, at most
    // 100 streams on a connection: on one connection, the last 50 would wait for streams
    // that never come free.
    let upstream = holding_h2_upstream(100, 150);
    let gate = licensed_gate_to(&format!("h2c://{upstream}"), Duration::from_secs(10), 4);
    let addr = gate.addr;
    let clients: Vec<_> = (0..150)
        .map(|_| std::thread::spawn(move || Client::connect(addr).get()))
        .collect();
    let answers: Vec<(u16, String)> = clients
        .into_iter()
        .map(|c| c.join().expect("client thread"))
        .collect();
    assert!(
        answers.iter().all(|(status, _)| *status == 200),
        "{answers:?}"
    );
    let connections: std::collections::BTreeSet<&str> =
        answers.iter().map(|(_, port)| port.as_str()).collect();
    assert_eq!(
        connections.len(),
        2,
        "upstream connections used: {connections:?}"
    );
}

/// An upstream that accepts any upgrade: it answers `101` to a request's head, then echoes
/// every byte it reads until the connection closes.
fn upgrading_upstream() -> std::net::SocketAddr {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().take(4) {
            let Ok(stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    line.clear();
                }
                let mut stream = reader.get_ref().try_clone().expect("clone");
                let head = "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n";
                stream.write_all(head.as_bytes()).expect("101");
                let mut buf = [0; 1024];
                while let Ok(n @ 1..) = reader.read(&mut buf) {
                    if stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn a_spliced_connection_stays_open_while_it_carries_bytes_and_closes_when_silent() {
    use std::io::{BufRead, Read, Write};
    // Spliced connections closed after two seconds without a byte either way.
    let gate = licensed_gate(upgrading_upstream(), Duration::from_secs(5), 4);
    let mut client = Client::connect(gate.addr);
    client
        .0
        .get_mut()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let upgrade =
        "GET /echo HTTP/1.1\r\nhost: gate.test\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n";
    client
        .0
        .get_mut()
        .write_all(upgrade.as_bytes())
        .expect("send");
    let mut line = String::new();
    client.0.read_line(&mut line).expect("status line");
    assert!(line.starts_with("HTTP/1.1 101 "), "{line:?}");
    while line != "\r\n" {
        line.clear();
        client.0.read_line(&mut line).expect("header");
    }
    // A byte every half second for five seconds, two and a half times the idle limit:
    // the connection stays open and every byte comes back.
    let mut last = std::time::Instant::now();
    for i in 0..10u8 {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(500));
        }
        client.0.get_mut().write_all(&[i]).expect("send a byte");
        let mut echoed = [0; 1];
        client.0.read_exact(&mut echoed).expect("the byte echoed");
        assert_eq!(echoed[0], i);
        last = std::time::Instant::now();
    }
    // Then silence: the gate closes the connection, after at least the idle limit (it
    // checks every half limit, so after two to three seconds of silence).
    let silent = last;
    let mut byte = [0; 1];
    match client.0.read(&mut byte) {
        Ok(0) => {}
        other => panic!("the silent spliced connection was not closed: {other:?}"),
    }
    assert!(
        silent.elapsed() >= Duration::from_millis(1500),
        "closed after {:?} of silence",
        silent.elapsed()
    );
}

/// An upstream that reads each request's whole body (by its Content-Length) before it
/// answers `200 <bytes read>`.
fn body_reading_upstream() -> std::net::SocketAddr {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().take(8) {
            let Ok(stream) = stream else { return };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                let mut length = 0usize;
                let mut line = String::new();
                loop {
                    line.clear();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':') {
                        if name.eq_ignore_ascii_case("content-length") {
                            length = value.trim().parse().unwrap_or(0);
                        }
                    }
                }
                let mut body = vec![0; length];
                if reader.read_exact(&mut body).is_err() {
                    return;
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{length}",
                    length.to_string().len()
                );
                let _ = reader.get_mut().write_all(answer.as_bytes());
            });
        }
    });
    addr
}

#[test]
fn a_client_that_stops_sending_its_body_gets_a_408() {
    use std::io::{Read, Write};

    // Clients idle after a second; the upstream timeout well beyond it.
    let gate = licensed_gate(body_reading_upstream(), Duration::from_secs(30), 4);
    let addr = gate.addr;

    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    stream
        .write_all(b"POST / HTTP/1.1\r\nhost: gate.test\r\ncontent-length: 10\r\n\r\nab")
        .expect("send");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("sent nothing of the request body for 1 s"),
        "{answer}"
    );
}

// ---- trusted keys reloaded ----

fn enforcement(
    dir: &Path,
    static_license: Option<charter_license::VerifiedLicense>,
    cluster: Option<ClusterHeld>,
) -> std::sync::Arc<crate::state::Enforcement> {
    let clock = std::sync::Arc::new(crate::clock::NodeClock::new(
        std::sync::Arc::new(charter_license::FixedClock::new(NOW)),
        dir.to_path_buf(),
        None,
    ));
    std::sync::Arc::new(crate::state::Enforcement::new(
        static_license,
        cluster,
        clock,
    ))
}

#[tokio::test]
async fn reloaded_keys_judge_the_static_license_again() {
    use charter_license::Status;

    let dir = tempfile::TempDir::new().unwrap();
    let (vendor, other) = (signer(1), signer(2));
    let text = document(&vendor, "2026-01-01", "2099-12-31");
    let (verified, _) =
        charter_license::validate(&text, &TrustedKeys::new([vendor.trusted_key()]), NOW).unwrap();
    // A cluster license signed by the other key: static configuration still wins.
    let state = enforcement(dir.path(), Some(verified), Some(held("e1", 1, &other)));
    let static_license = crate::StaticLicense {
        origin: "--license-path static.json".to_owned(),
        text,
    };
    assert!(state.allows_now());

    // The vendor's key is removed: refused, as start-up would refuse it; the node is
    // unlicensed and says why.
    let only_other = TrustedKeys::new([other.trusted_key()]);
    let outcome =
        crate::rekey::rejudge(&state, dir.path(), Some(&static_license), &only_other).await;
    assert!(outcome.static_changed);
    assert!(!state.allows_now());
    let now = state.current();
    assert_eq!(now.status, Status::Unlicensed);
    assert_eq!(now.source, None);
    assert!(
        now.warnings.iter().any(|w| w
            .contains("static license from --license-path static.json is refused")
            && w.contains("validation_fail")),
        "{:?}",
        now.warnings
    );

    // Trusted again: in force again. Judging with the same keys changes nothing.
    let both = TrustedKeys::new([other.trusted_key(), vendor.trusted_key()]);
    let outcome = crate::rekey::rejudge(&state, dir.path(), Some(&static_license), &both).await;
    assert!(outcome.static_changed);
    assert!(state.allows_now());
    let now = state.current();
    assert_eq!(now.source, Some(Source::Static));
    assert_eq!(now.status, Status::Valid);
    let again = crate::rekey::rejudge(&state, dir.path(), Some(&static_license), &both).await;
    assert_eq!(again, crate::rekey::Rejudged::default());
}

#[tokio::test]
async fn reloaded_keys_judge_the_cluster_license_and_the_cache_again() {
    use charter_license::Status;

    let dir = tempfile::TempDir::new().unwrap();
    let (old, new) = (signer(1), signer(2));
    let held_old = held("e1", 7, &old);
    cache::store(dir.path(), &held_old.to_cache()).unwrap();
    let state = enforcement(dir.path(), None, Some(held_old.clone()));
    assert!(state.allows_now());

    // The old key is removed: the license held no longer counts, as a cache signed with
    // it is refused at start-up. The position in the cluster stays; the cache on disk too.
    let only_new = TrustedKeys::new([new.trusted_key()]);
    let outcome = crate::rekey::rejudge(&state, dir.path(), None, &only_new).await;
    assert!(outcome.cluster_changed);
    assert!(!state.allows_now());
    assert_eq!(state.current().status, Status::Unlicensed);
    let cluster = state.cluster().unwrap();
    assert!(cluster.license.is_none());
    assert_eq!((cluster.epoch.as_str(), cluster.revision), ("e1", 7));
    let on_disk = cache::read(dir.path()).unwrap().unwrap();
    assert!(on_disk.license.is_some(), "the cache is left as it was");
    // Nothing more to refuse with the same keys.
    let again = crate::rekey::rejudge(&state, dir.path(), None, &only_new).await;
    assert_eq!(again, crate::rekey::Rejudged::default());

    // The old key is trusted again: the cache's license is taken back, as start-up would.
    let both = TrustedKeys::new([new.trusted_key(), old.trusted_key()]);
    let outcome = crate::rekey::rejudge(&state, dir.path(), None, &both).await;
    assert!(outcome.cluster_changed);
    assert!(state.allows_now());
    assert_eq!(state.current().license_id(), "held");

    // A cache refused at start (its key was not trusted then) is taken once its key is.
    let fresh = tempfile::TempDir::new().unwrap();
    cache::store(fresh.path(), &held("e2", 3, &new).to_cache()).unwrap();
    let state = enforcement(fresh.path(), None, None);
    assert!(!state.allows_now());
    let only_old = TrustedKeys::new([old.trusted_key()]);
    let outcome = crate::rekey::rejudge(&state, fresh.path(), None, &only_old).await;
    assert_eq!(outcome, crate::rekey::Rejudged::default());
    assert!(!state.allows_now());
    let outcome = crate::rekey::rejudge(&state, fresh.path(), None, &both).await;
    assert!(outcome.cluster_changed);
    let now = state.current();
    assert_eq!(now.source, Some(Source::Cache));
    assert_eq!((now.epoch.as_deref(), now.revision), (Some("e2"), Some(3)));
    assert!(state.allows_now());

    // A cluster that said "unlicensed" stays so: the cache holds no license to take.
    let unlicensed_dir = tempfile::TempDir::new().unwrap();
    let unlicensed = ClusterHeld {
        license: None,
        ..held("e3", 4, &old)
    };
    cache::store(unlicensed_dir.path(), &unlicensed.to_cache()).unwrap();
    let state = enforcement(unlicensed_dir.path(), None, Some(unlicensed));
    let outcome = crate::rekey::rejudge(&state, unlicensed_dir.path(), None, &both).await;
    assert_eq!(outcome, crate::rekey::Rejudged::default());
    assert!(!state.allows_now());
}
