//! The PostgreSQL backend against the [`Store`] contract, on a real PostgreSQL server that
//! the test starts itself (its own temp dir, port and socket dir; as an unprivileged user
//! when the tests run as root, since PostgreSQL refuses root).

use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::testing::TestPostgres;
use crate::{checksum_of, Change, LicenseRecord, PgStore, Report, Store, StoreError};

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
