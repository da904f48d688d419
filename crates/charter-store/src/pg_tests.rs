//! The PostgreSQL backend against the [`Store`] contract, on a real PostgreSQL server that
//! the test starts itself (its own temp dir, port and socket dir; as an unprivileged user
//! when the tests run as root, since PostgreSQL refuses root).

use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::testing::TestPostgres;
use crate::{
    checksum_of, Change, DataPlaneRecord, LicenseRecord, PgStore, Report, Store, StoreError,
};

fn record(n: u8, payload: &str) -> LicenseRecord {
    LicenseRecord {
        id: Uuid::from_bytes([n; 16]),
        payload: payload.to_owned(),
        checksum: checksum_of(payload),
        created_at: 10,
        updated_at: 20 + i64::from(n),
        revision: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_store_keeps_the_store_contract_across_control_planes() {
    let mut pg = TestPostgres::start();
    let a = PgStore::open(&pg.url()).await.expect("open a");
    let b = PgStore::open(&pg.url())
        .await
        .expect("open b (migrations already applied)");
    assert_eq!(a.epoch(), b.epoch(), "one database, one epoch");
    assert!(
        a.backend_version().starts_with("PostgreSQL "),
        "{}",
        a.backend_version()
    );

    // Writes on either store are one sequence of revisions.
    assert_eq!(a.commit(0, Change::Put(record(1, "one"))).await.unwrap(), 1);
    let err = b
        .commit(0, Change::Put(record(2, "two")))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Conflict {
                expected: 0,
                actual: 1
            }
        ),
        "{err:?}"
    );
    assert_eq!(b.commit(1, Change::Put(record(2, "two"))).await.unwrap(), 2);
    assert_eq!(
        a.commit(2, Change::Delete(Uuid::from_bytes([1; 16])))
            .await
            .unwrap(),
        3
    );

    // The other store hears of every write (a notification, or the once-a-second read).
    let mut revisions = a.subscribe();
    tokio::time::timeout(Duration::from_secs(5), revisions.wait_for(|r| *r >= 3))
        .await
        .expect("store a follows b's writes within 5 s")
        .unwrap();
    let loaded = a.load().await.unwrap();
    assert_eq!(loaded.revision, 3);
    let ids: Vec<u8> = loaded.licenses.iter().map(|r| r.id.as_bytes()[0]).collect();
    assert_eq!(ids, vec![2]);
    assert_eq!(loaded.licenses[0].revision, 2);

    // Telemetry exactly once per (node, seq), whichever store receives it.
    let report = |seq| Report {
        node_id: "dp-1".into(),
        seq,
        counters: vec![("2026-12".into(), 5)],
    };
    assert_eq!(
        a.apply_telemetry(vec![report(1)]).await.unwrap(),
        vec![true]
    );
    assert_eq!(
        b.apply_telemetry(vec![report(1), report(2)]).await.unwrap(),
        vec![false, true]
    );
    let usage = a.usage().await.unwrap();
    assert_eq!((usage[0].last_seq, usage[0].buckets["2026-12"]), (2, 10));

    // The database goes away and comes back: the stores answer errors meanwhile, then
    // work again without being reopened.
    pg.stop_immediately();
    assert!(a.check().await.is_err());
    assert!(a.commit(3, Change::Put(record(3, "three"))).await.is_err());
    pg.launch();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match a.commit(3, Change::Put(record(3, "three"))).await {
            Ok(revision) => {
                assert_eq!(revision, 4);
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "no write after the restart: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(b.load().await.unwrap().licenses.len(), 2);
    a.close().await.unwrap();
    b.close().await.unwrap();
}

fn data_plane(id: &str, last_seen: i64, status: &str) -> DataPlaneRecord {
    DataPlaneRecord {
        id: id.to_owned(),
        ip: "127.0.0.1".to_owned(),
        hostname: format!("host of {id}"),
        version: "0.1.0".to_owned(),
        labels: [("zone".to_owned(), "a".to_owned())].into(),
        last_seen,
        sync_status: status.to_owned(),
        license_id: None,
        license_revision: 3,
        license_status: "valid".to_owned(),
        last_error: Some("E: \"quoted\"".to_owned()),
        upstream: String::new(),
        control_plane: "cp-a".to_owned(),
    }
}

#[tokio::test]
async fn the_inventory_is_written_in_one_batch_replaced_by_id_and_purged_by_age() {
    let pg = TestPostgres::start();
    let store = PgStore::open(&pg.url()).await.expect("open");
    // A fleet's batch, with one id given twice: the later stands.
    let mut batch: Vec<DataPlaneRecord> = (0..2000)
        .map(|i| data_plane(&format!("dp-{i}"), 100 + i, "in_sync"))
        .collect();
    batch.push(data_plane("dp-7", 5000, "rejected"));
    store.put_data_planes(batch.into()).await.expect("batch");
    let stored = store.data_planes().await.expect("read");
    assert_eq!(stored.len(), 2000);
    let seven = stored.iter().find(|r| r.id == "dp-7").expect("dp-7");
    assert_eq!(*seven, data_plane("dp-7", 5000, "rejected"));
    // Replaced by id; the rest untouched.
    store
        .put_data_planes(vec![data_plane("dp-0", 9000, "syncing")].into())
        .await
        .expect("replace");
    let stored = store.data_planes().await.expect("read");
    assert_eq!(stored.len(), 2000);
    let zero = stored.iter().find(|r| r.id == "dp-0").expect("dp-0");
    assert_eq!(*zero, data_plane("dp-0", 9000, "syncing"));
    // Rows last seen before 1100 go: dp-1 to dp-999 but dp-7, seen later.
    assert_eq!(store.purge_data_planes(1100).await.expect("purge"), 998);
    assert_eq!(store.data_planes().await.expect("read").len(), 1002);
    store
        .put_data_planes(Vec::new().into())
        .await
        .expect("an empty batch");
}

fn usage_report(node: usize, seq: u64, count: u64) -> Report {
    Report {
        node_id: format!("dp-{node}"),
        seq,
        counters: vec![("2026-12".into(), count)],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_batches_of_two_control_planes_at_once_lose_no_count() {
    let pg = TestPostgres::start();
    let a = PgStore::open(&pg.url()).await.expect("open a");
    let b = PgStore::open(&pg.url()).await.expect("open b");
    // Within one batch, as on sled: a node's reports see each other; a resend is not
    // counted again.
    let applied = a
        .apply_telemetry(vec![
            usage_report(0, 1, 5),
            usage_report(1, 1, 7),
            usage_report(0, 2, 3),
            usage_report(0, 2, 3),
            usage_report(0, 1, 100),
        ])
        .await
        .unwrap();
    assert_eq!(applied, vec![true, true, true, false, false]);

    // Two control planes given reports of the same nodes at once, new nodes and known
    // ones, in opposite orders: every report acknowledged as applied is counted, once.
    const NODES: usize = 300;
    let mut counted = vec![0u64; NODES];
    (counted[0], counted[1]) = (8, 7);
    let mut seq = 2;
    for round in 0..4 {
        let from_a: Vec<Report> = (0..NODES).map(|n| usage_report(n, seq + 1, 1)).collect();
        let from_b: Vec<Report> = (0..NODES)
            .rev()
            .map(|n| usage_report(n, seq + 2, 10))
            .collect();
        let (applied_a, applied_b) = tokio::join!(
            a.apply_telemetry(from_a.clone()),
            b.apply_telemetry(from_b.clone())
        );
        let (applied_a, applied_b) = (
            applied_a.unwrap_or_else(|e| panic!("round {round}, store a: {e}")),
            applied_b.unwrap_or_else(|e| panic!("round {round}, store b: {e}")),
        );
        for (report, applied) in from_a
            .iter()
            .zip(applied_a)
            .chain(from_b.iter().zip(applied_b))
        {
            if applied {
                let n: usize = report.node_id[3..].parse().unwrap();
                counted[n] += report.counters[0].1;
            }
        }
        seq += 2;
    }
    let usage = b.usage().await.unwrap();
    assert_eq!(usage.len(), NODES);
    for node in usage {
        let n: usize = node.node_id[3..].parse().unwrap();
        // b's report has the higher seq, so it is applied whichever commits first.
        assert_eq!(
            (node.last_seq, node.buckets["2026-12"]),
            (seq, counted[n]),
            "{}",
            node.node_id
        );
    }
}

#[tokio::test]
async fn a_schema_newer_than_this_release_is_refused() {
    let pg = TestPostgres::start();
    let store = PgStore::open(&pg.url()).await.expect("open");
    store.close().await.unwrap();
    let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .execute("INSERT INTO charter_schema (version) VALUES (999)", &[])
        .await
        .unwrap();
    let err = PgStore::open(&pg.url()).await.err().expect("refused");
    assert!(err.to_string().contains("newer than this release"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_since_reads_what_changed_and_knows_what_it_forgot() {
    let pg = TestPostgres::start();
    let store = PgStore::open(&pg.url()).await.expect("open");
    let id = |n: u8| Uuid::from_bytes([n; 16]);
    // Every state the store passes through, by revision, to check each catch-up against.
    let mut states = vec![store.load().await.unwrap()];
    let changes = [
        Change::Put(record(1, "one")),
        Change::Put(record(2, "two")),
        Change::Put(record(3, "three")),
        Change::Delete(id(2)),
        Change::Put(record(1, "one again")),
        Change::Delete(id(3)),
        Change::Put(record(3, "three again")),
        Change::Put(record(2, "two again")),
        Change::Delete(id(1)),
        Change::Put(record(4, "four")),
        Change::Delete(id(4)),
    ];
    for (base, change) in changes.into_iter().enumerate() {
        let base = base as u64;
        let change = match change {
            Change::Put(mut r) => {
                r.revision = base + 1;
                Change::Put(r)
            }
            delete => delete,
        };
        assert_eq!(store.commit(base, change).await.unwrap(), base + 1);
        states.push(store.load().await.unwrap());
    }
    let now = states.last().unwrap().clone();
    assert_eq!(now.revision, 11);

    // The last delete was at base 10: deletions up to revision 10 - 5 + 1 are forgotten.
    let forgotten = 6;
    for base in 0..=now.revision {
        let changes = store.changes_since(base).await.unwrap();
        if base < forgotten {
            assert!(
                changes.is_none(),
                "base {base} is older than the store remembers"
            );
            continue;
        }
        let changes = changes.unwrap_or_else(|| panic!("changes since {base}"));
        assert_eq!((changes.epoch, changes.revision), (now.epoch, now.revision));
        // The state at `base` with the changes applied is the state now.
        let mut licenses = states[base as usize].licenses.clone();
        licenses.retain(|r| {
            !changes.deleted.contains(&r.id) && !changes.written.iter().any(|w| w.id == r.id)
        });
        licenses.extend(changes.written.iter().cloned());
        licenses.sort_by_key(|r| r.id);
        assert_eq!(licenses, now.licenses, "caught up from {base}");
        assert!(changes.written.iter().all(|r| r.revision > base));
    }
    assert_eq!(
        store.changes_since(8).await.unwrap().unwrap().deleted,
        vec![id(1), id(4)]
    );
    let nothing = store.changes_since(11).await.unwrap().unwrap();
    assert!(nothing.written.is_empty() && nothing.deleted.is_empty());
    assert!(
        store.changes_since(12).await.unwrap().is_none(),
        "a base ahead of the store (a restored backup) needs a whole load"
    );
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_store_at_a_time_leads_the_chores() {
    let pg = TestPostgres::start();
    let a = PgStore::open(&pg.url()).await.expect("open a");
    let b = PgStore::open(&pg.url()).await.expect("open b");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !(a.leads_chores() || b.leads_chores()) {
        assert!(Instant::now() < deadline, "nobody took the chores");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Longer than the retry period: the other store has tried and failed meanwhile.
    for _ in 0..60 {
        assert!(
            a.leads_chores() != b.leads_chores(),
            "exactly one leads the chores"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (leader, other) = if a.leads_chores() { (a, b) } else { (b, a) };
    leader.close().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !other.leads_chores() {
        assert!(
            Instant::now() < deadline,
            "the other store did not take over the chores within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    other.close().await.unwrap();
}

/// A CA called `ca_name`, and a server certificate it signed for `names`: (CA PEM,
/// certificate PEM, key PEM).
fn server_certificate(ca_name: &str, names: &[&str]) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let cert = CertificateParams::new(names)
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// Whether the store's connections are encrypted, as the server sees its own session.
async fn encrypted(store: &PgStore) -> bool {
    let client = store.inner.pool.get().await.unwrap();
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_database_follows_libpq_sslmode() {
    let (ca, chain, key) = server_certificate("database CA", &["localhost", "127.0.0.1"]);
    let (other_ca, _, _) = server_certificate("another CA", &["localhost"]);
    let pg = TestPostgres::start_with_tls(&chain, &key);
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    let other_ca_path = dir.path().join("other-ca.pem");
    std::fs::write(&ca_path, &ca).unwrap();
    std::fs::write(&other_ca_path, &other_ca).unwrap();
    let url = |params: &str| format!("{}?{params}", pg.url());

    for (params, mode, tls) in [
        ("sslmode=disable", "disable", false),
        ("sslmode=prefer", "prefer", true),
        ("sslmode=require", "require", true),
        (
            &format!("sslmode=verify-ca&sslrootcert={}", ca_path.display()),
            "verify-ca",
            true,
        ),
        (
            &format!("sslmode=verify-full&sslrootcert={}", ca_path.display()),
            "verify-full",
            true,
        ),
    ] {
        let store = PgStore::open(&url(params))
            .await
            .unwrap_or_else(|e| panic!("{params}: {e}: {:?}", std::error::Error::source(&e)));
        assert_eq!(store.sslmode(), mode);
        assert_eq!(encrypted(&store).await, tls, "{params}");
        store.close().await.unwrap();
    }

    // A server certificate from a CA the client does not trust is refused, saying why.
    let err = PgStore::open(&url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        other_ca_path.display()
    )))
    .await
    .err()
    .expect("an untrusted server certificate is refused");
    let text = format!("{err}: {:?}", std::error::Error::source(&err));
    assert!(
        text.contains("invalid peer certificate: UnknownIssuer"),
        "{text}"
    );
    // `require` with a root certificate verifies the chain too, as libpq does.
    assert!(PgStore::open(&url(&format!(
        "sslmode=require&sslrootcert={}",
        other_ca_path.display()
    )))
    .await
    .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_checks_the_name_and_verify_ca_does_not() {
    let (ca, chain, key) = server_certificate("database CA", &["db.example.com"]);
    let pg = TestPostgres::start_with_tls(&chain, &key);
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, &ca).unwrap();
    let url = |mode: &str| {
        format!(
            "{}?sslmode={mode}&sslrootcert={}",
            pg.url(),
            ca_path.display()
        )
    };
    let err = PgStore::open(&url("verify-full"))
        .await
        .err()
        .expect("a certificate for another name is refused");
    let text = format!("{err}: {:?}", std::error::Error::source(&err));
    assert!(
        text.contains("certificate not valid for name \"127.0.0.1\""),
        "{text}"
    );
    let store = PgStore::open(&url("verify-ca")).await.expect("verify-ca");
    assert!(encrypted(&store).await);
    store.close().await.unwrap();

    // A server without TLS cannot satisfy `require`.
    let plain = TestPostgres::start();
    let err = PgStore::open(&format!("{}?sslmode=require", plain.url()))
        .await
        .err()
        .expect("require against a server without TLS");
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
}

/// A connection of the test's own to the database, as an operator's `psql`.
async fn admin(pg: &TestPostgres) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .expect("an admin connection");
    tokio::spawn(connection);
    client
}

/// A release that predates `charter_deletions` (and one that writes it) delete a license
/// their own way; the database records the deletion, so `changes_since` still reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_by_an_older_release_reaches_changes_since() {
    let pg = TestPostgres::start();
    let store = PgStore::open(&pg.url()).await.expect("open");
    let id = |n: u8| Uuid::from_bytes([n; 16]);
    for n in 1..=3u8 {
        let mut r = record(n, &format!("license {n}"));
        r.revision = u64::from(n);
        store
            .commit(u64::from(n) - 1, Change::Put(r))
            .await
            .unwrap();
    }
    let sql = admin(&pg).await;
    // As version 1 deleted: the revision moved first, then the row; no charter_deletions.
    sql.batch_execute(&format!(
        "BEGIN;
         UPDATE charter_meta SET revision = revision + 1 WHERE revision = 3;
         DELETE FROM charter_licenses WHERE id = '{}';
         COMMIT;",
        id(1)
    ))
    .await
    .unwrap();
    let changes = store.changes_since(3).await.unwrap().expect("changes");
    assert_eq!(changes.revision, 4);
    assert_eq!(changes.deleted, vec![id(1)], "{changes:?}");
    assert!(changes.written.is_empty());

    // As version 2 deleted: its own row in charter_deletions as well (no second row).
    sql.batch_execute(&format!(
        "BEGIN;
         UPDATE charter_meta SET revision = revision + 1 WHERE revision = 4;
         DELETE FROM charter_licenses WHERE id = '{0}';
         INSERT INTO charter_deletions (id, revision) VALUES ('{0}', 5)
           ON CONFLICT (id) DO UPDATE SET revision = EXCLUDED.revision;
         COMMIT;",
        id(2)
    ))
    .await
    .unwrap();
    assert_eq!(
        store.changes_since(4).await.unwrap().unwrap().deleted,
        vec![id(2)]
    );

    // This release's own delete: recorded once, by the database, at its revision.
    assert_eq!(store.commit(5, Change::Delete(id(3))).await.unwrap(), 6);
    let rows = sql
        .query(
            "SELECT id, revision FROM charter_deletions ORDER BY revision",
            &[],
        )
        .await
        .unwrap();
    let rows: Vec<(Uuid, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(rows, vec![(id(1), 4), (id(2), 5), (id(3), 6)]);

    // Version 1 stores a deleted id again and leaves its deletion behind: it is written,
    // not deleted.
    sql.batch_execute(&format!(
        "BEGIN;
         UPDATE charter_meta SET revision = revision + 1 WHERE revision = 6;
         INSERT INTO charter_licenses (id, payload, checksum, created_at, updated_at, revision)
           VALUES ('{}', 'again', 'x', 1, 2, 7);
         COMMIT;",
        id(1)
    ))
    .await
    .unwrap();
    let changes = store.changes_since(3).await.unwrap().unwrap();
    assert_eq!(changes.deleted, vec![id(2), id(3)]);
    let written: Vec<Uuid> = changes.written.iter().map(|r| r.id).collect();
    assert_eq!(written, vec![id(1)]);
    store.close().await.unwrap();
}

/// Deletions made before migration 3 may not be recorded: a catch-up from before it loads
/// everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_from_before_migration_3_loads_everything() {
    let pg = TestPostgres::start();
    let sql = admin(&pg).await;
    // A database at schema version 2, at revision 2.
    sql.batch_execute(&format!(
        "CREATE TABLE charter_schema (version integer NOT NULL);
         {}
         {}
         INSERT INTO charter_schema (version) VALUES (1), (2);
         INSERT INTO charter_licenses (id, payload, checksum, created_at, updated_at, revision)
           VALUES ('{}', 'two', 'c2', 1, 2, 2);
         UPDATE charter_meta SET revision = 2;",
        crate::postgres::MIGRATIONS[0],
        crate::postgres::MIGRATIONS[1],
        Uuid::from_bytes([2; 16])
    ))
    .await
    .unwrap();
    let store = PgStore::open(&pg.url()).await.expect("open and migrate");
    assert!(store.changes_since(0).await.unwrap().is_none());
    assert!(store.changes_since(1).await.unwrap().is_none());
    let changes = store.changes_since(2).await.unwrap().expect("from now on");
    assert!(changes.written.is_empty() && changes.deleted.is_empty());
    assert_eq!(store.load().await.unwrap().licenses.len(), 1);
    store.close().await.unwrap();
}

/// A server that stops answering (every process stopped, connections left open): writes,
/// reads and the health check fail `Unavailable` after the store's timeout rather than
/// hanging, and the store works again once the server does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_stops_answering_is_unavailable_then_works_again() {
    let pg = TestPostgres::start();
    let timeout = Duration::from_secs(1);
    let store = PgStore::open_with_timeout(&pg.url(), timeout)
        .await
        .expect("open");
    assert_eq!(
        store
            .commit(0, Change::Put(record(1, "one")))
            .await
            .unwrap(),
        1
    );
    {
        let _frozen = pg.freeze();
        // Generous: only that it answers at all, not how fast.
        let bound = Duration::from_secs(60);
        let mut r = record(2, "two");
        r.revision = 2;
        let err = tokio::time::timeout(bound, store.commit(1, Change::Put(r)))
            .await
            .expect("a write answers while the database does not")
            .unwrap_err();
        assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
        assert!(err.to_string().contains("timeout of 1s"), "{err}");
        let err = tokio::time::timeout(bound, store.check())
            .await
            .expect("the check answers")
            .unwrap_err();
        assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
        let err = tokio::time::timeout(bound, store.load())
            .await
            .expect("a read answers")
            .unwrap_err();
        assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = async {
            let base = store.load().await?.revision;
            let mut r = record(3, "three");
            r.revision = base + 1;
            store.commit(base, Change::Put(r)).await
        };
        match attempt.await {
            Ok(_) => break,
            Err(e) => assert!(
                Instant::now() < deadline,
                "no write after the server continued: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    store.check().await.expect("ready again");
    store.close().await.unwrap();
}

/// The control plane that runs the chores probes its connection: when the server stops
/// answering, it gives them up, and takes them again once the server answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chores_leader_whose_database_stops_answering_gives_them_up() {
    let pg = TestPostgres::start();
    let store = PgStore::open_with_timeout(&pg.url(), Duration::from_secs(1))
        .await
        .expect("open");
    let wait_for = |leads: bool, what: &str| {
        let store = store.clone();
        let what = what.to_owned();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while store.leads_chores() != leads {
                assert!(Instant::now() < deadline, "{what} within 30 s");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_for(true, "the only store takes the chores").await;
    {
        let _frozen = pg.freeze();
        wait_for(false, "the leader gives up the chores").await;
    }
    wait_for(true, "the store takes the chores again").await;
    store.close().await.unwrap();
}

/// A database that takes no writes (here `default_transaction_read_only`, as a standby
/// after a failover answers): a write is `Unavailable` (503), not an internal error, and
/// the health check fails; both work again once it takes writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_database_is_unavailable_and_not_ready() {
    let pg = TestPostgres::start();
    let store = PgStore::open(&pg.url()).await.expect("open");
    assert_eq!(
        store
            .commit(0, Change::Put(record(1, "one")))
            .await
            .unwrap(),
        1
    );
    let sql = admin(&pg).await;
    // New sessions are read-only; end the store's, so it opens new ones.
    let reconnect_all = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                         WHERE datname = 'charter' AND pid <> pg_backend_pid()";
    sql.batch_execute("ALTER DATABASE charter SET default_transaction_read_only = on")
        .await
        .unwrap();
    sql.batch_execute(reconnect_all).await.unwrap();

    // A terminated pooled connection may answer first: wait for the read-only answer.
    let deadline = Instant::now() + Duration::from_secs(15);
    let err = loop {
        match store.check().await {
            Err(e) if e.to_string().contains("read-only") => break e,
            other => assert!(
                Instant::now() < deadline,
                "the check never saw the read-only database: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    let mut r = record(2, "two");
    r.revision = 2;
    let err = loop {
        match store.commit(1, Change::Put(r.clone())).await {
            Err(e) if e.to_string().contains("read-only transaction") => break e,
            other => assert!(
                Instant::now() < deadline,
                "the write never saw the read-only database: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    // A control plane starting on it waits (503) rather than failing.
    let err = PgStore::open(&pg.url()).await.err().expect("read-only");
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");

    sql.batch_execute("ALTER DATABASE charter RESET default_transaction_read_only")
        .await
        .unwrap();
    sql.batch_execute(reconnect_all).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while store.check().await.is_err() {
        assert!(Instant::now() < deadline, "not ready again within 15 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let base = store.load().await.unwrap().revision;
    r.revision = base + 1;
    store
        .commit(base, Change::Put(r))
        .await
        .expect("writable again");
    store.close().await.unwrap();
}

/// A database restored to an older revision: the store's revision follows it down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_revision_follows_a_database_restored_to_an_older_one() {
    let pg = TestPostgres::start();
    let store = PgStore::open(&pg.url()).await.expect("open");
    for n in 1..=3u8 {
        let mut r = record(n, &format!("license {n}"));
        r.revision = u64::from(n);
        store
            .commit(u64::from(n) - 1, Change::Put(r))
            .await
            .unwrap();
    }
    let mut revisions = store.subscribe();
    assert_eq!(*revisions.borrow_and_update(), 3);
    admin(&pg)
        .await
        .batch_execute(
            "BEGIN;
             DELETE FROM charter_licenses WHERE revision > 1;
             DELETE FROM charter_deletions;
             UPDATE charter_meta SET revision = 1;
             COMMIT;",
        )
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), revisions.wait_for(|r| *r == 1))
        .await
        .expect("the store's revision follows the database down within 10 s")
        .unwrap();
    store.close().await.unwrap();
}
