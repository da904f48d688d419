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
