//! The service over a real sled store: writes are decided on every earlier write whole,
//! readers see a write once it is acknowledged, telemetry shares durable writes, a store
//! that failed to reach the disk answers 503 and loses nothing acknowledged, and payloads
//! are kept as sent while duplicates are found on the canonical text.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use charter_license::{
    select_effective, Candidate, Clock, FixedClock, LicenseSigner, TrustedKeys, UnixTime,
};
use charter_store::{
    Change, DataPlaneRecord, Loaded, NodeUsage, Report, SledStore, Store, StoreError,
};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::sync::watch;
use tower::ServiceExt;
use uuid::Uuid;

use super::{Service, WriteError};
use crate::api::{router, ApiState};

const DAY: i64 = 86_400;
/// 2026-06-01T00:00:00Z.
const JUNE_2026: UnixTime = 1_780_272_000;

fn vendor() -> LicenseSigner {
    LicenseSigner::from_seed([7; 32])
}

fn license(key: &str, created: &str, expires: &str) -> String {
    let Value::Object(payload) = json!({
        "admin_seats": "1",
        "customer": "Example Company, Inc",
        "dataplanes": "1",
        "license_creation_date": created,
        "license_expiration_date": expires,
        "license_key": key,
        "product_subscription": "Charter Enterprise",
        "support_plan": "None",
    }) else {
        unreachable!("an object literal")
    };
    vendor().sign(payload).expect("a valid payload").to_json()
}

struct Fixture {
    _tmp: tempfile::TempDir,
    sled: SledStore,
    clock: Arc<FixedClock>,
    service: Service,
    stop: watch::Sender<bool>,
    tasks: tokio::task::JoinHandle<()>,
}

async fn fixture_with(tmp: tempfile::TempDir, store: Option<Arc<dyn Store>>) -> Fixture {
    let sled = SledStore::open(&tmp.path().join("data")).expect("open store");
    let store = store.unwrap_or_else(|| Arc::new(sled.clone()));
    let clock = Arc::new(FixedClock::new(JUNE_2026));
    let (service, tasks) = Service::start(
        store,
        TrustedKeys::new([vendor().trusted_key()]),
        clock.clone(),
        None,
        "cp-test".to_owned(),
    )
    .await
    .expect("start");
    let (stop, stopped) = watch::channel(false);
    let tasks = tokio::spawn(tasks.run(stopped));
    Fixture {
        _tmp: tmp,
        sled,
        clock,
        service,
        stop,
        tasks,
    }
}

async fn fixture() -> Fixture {
    fixture_with(tempfile::tempdir().expect("tempdir"), None).await
}

async fn send(
    service: &Service,
    method: &str,
    uri: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .unwrap();
    let response = router(ApiState::new(service.clone(), None))
        .oneshot(request)
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patch_without_payload_never_undoes_a_concurrent_put() {
    let f = fixture().await;
    let id = Uuid::new_v4();
    let (a, b) = (
        license("A", "2026-01-01", "2027-12-31"),
        license("B", "2026-01-01", "2027-12-31"),
    );
    for round in 0..30 {
        let reset = f.service.validate(&a).unwrap();
        f.service.put(id, reset).await.unwrap();
        let put = {
            let (service, b) = (f.service.clone(), b.clone());
            tokio::spawn(async move {
                let valid = service.validate(&b).unwrap();
                service.put(id, valid).await.map(|_| ())
            })
        };
        let patch = {
            let service = f.service.clone();
            tokio::spawn(async move { service.patch(id, None).await.map(|_| ()) })
        };
        put.await.unwrap().unwrap();
        patch.await.unwrap().unwrap();
        // In either serial order the PUT's payload is the one left: a PATCH without a
        // payload stores the payload it finds in the write.
        let stored = f.service.snapshot().get(id).unwrap().record.payload.clone();
        assert!(
            stored.contains("\"B\""),
            "round {round}: the PUT was undone"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consul_delete_is_one_step_against_every_other_write() {
    let f = fixture().await;
    for round in 0..30u32 {
        // Two valid licenses; the newer is in force.
        let older = f
            .service
            .create(
                None,
                f.service
                    .validate(&license(
                        &format!("old-{round}"),
                        "2026-01-01",
                        "2027-12-31",
                    ))
                    .unwrap(),
            )
            .await
            .unwrap()
            .record;
        f.clock.set(f.clock.now() + 1);
        f.service
            .create(
                None,
                f.service
                    .validate(&license(
                        &format!("new-{round}"),
                        "2026-01-01",
                        "2027-12-31",
                    ))
                    .unwrap(),
            )
            .await
            .unwrap();
        let base = f.service.snapshot().revision;
        let uninstall = {
            let service = f.service.clone();
            tokio::spawn(async move { service.uninstall().await })
        };
        let delete_older = {
            let service = f.service.clone();
            tokio::spawn(async move { service.delete(older.id).await })
        };
        let uninstalled = uninstall.await.unwrap();
        delete_older.await.unwrap().unwrap();
        match uninstalled {
            // It went first, while the older license was still there to take over.
            Ok((_, revision)) => assert_eq!(revision, base + 1, "round {round}"),
            // It came second and saw that the license in force was the last one.
            Err(WriteError::Refused(why)) => {
                assert!(why.contains("would leave no valid license"), "{why}");
                assert!(f.service.view().in_force.is_some(), "round {round}");
            }
            Err(e) => panic!("round {round}: {e}"),
        }
        // Start the next round empty.
        for id in f
            .service
            .snapshot()
            .page(None, 100)
            .0
            .iter()
            .map(|e| e.record.id)
            .collect::<Vec<_>>()
        {
            f.service.delete(id).await.unwrap();
        }
        f.clock.set(f.clock.now() + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_after_an_acknowledged_write_sees_it() {
    let f = fixture().await;
    for n in 0..40 {
        let text = license(&format!("K-{n}"), "2026-01-01", "2027-12-31");
        let (status, record) = send(
            &f.service,
            "POST",
            "/licenses",
            Some(json!({"payload": text})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{record}");
        let id = record["id"].as_str().unwrap();
        let (status, got) = send(&f.service, "GET", &format!("/licenses/{id}"), None).await;
        assert_eq!((status, &got), (StatusCode::OK, &record));
        assert_eq!(
            f.service
                .view()
                .stored_in_force
                .unwrap()
                .record
                .unwrap()
                .id
                .to_string(),
            id,
            "the newest write is in force"
        );
    }
    let (_, page) = send(&f.service, "GET", "/licenses?size=1000", None).await;
    assert_eq!(page["data"].as_array().unwrap().len(), 40);
}

#[tokio::test]
async fn the_view_is_select_effective_over_every_stored_license() {
    let f = fixture().await;
    let stranger = LicenseSigner::from_seed([8; 32]);
    let Value::Object(foreign) = json!({"customer": "x", "license_creation_date": "2026-01-01",
        "license_expiration_date": "2030-01-01", "license_key": "F", "product_subscription": "p",
        "admin_seats": "1", "dataplanes": "1", "support_plan": "None"})
    else {
        unreachable!()
    };
    let foreign = stranger.sign(foreign).unwrap().to_json();
    let texts = [
        license("expired", "2025-01-01", "2026-02-01"),
        license("future", "2026-09-01", "2028-01-01"),
        license("valid", "2026-01-01", "2027-06-01"),
        license("expiring", "2026-01-01", "2026-07-01"),
    ];
    for text in &texts {
        // Dates checked at write time are those of the fixture's clock: "future" is
        // refused by validation only if its creation is ahead; store it a year later.
        f.clock.set(JUNE_2026 + 400 * DAY);
        let valid = f.service.validate(text).unwrap();
        f.clock.set(JUNE_2026);
        f.service.create(None, valid).await.unwrap();
        f.clock.set(f.clock.now() + DAY);
    }
    // A license that does not verify is stored only through the store itself.
    let snapshot = f.service.snapshot();
    f.service
        .0
        .store
        .commit(
            snapshot.revision,
            Change::Put(charter_store::LicenseRecord {
                id: Uuid::new_v4(),
                checksum: charter_store::checksum_of(&foreign),
                payload: foreign.clone(),
                created_at: 0,
                updated_at: JUNE_2026 + 90 * DAY,
                revision: 0,
            }),
        )
        .await
        .unwrap();
    f.service.catch_up().await.unwrap();
    // The reload verifies nothing up front; the background sweep counts it.
    for _ in 0..500 {
        if f.service.snapshot().fully_verified() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(f.service.snapshot().unverified(), Some(1));
    for day in [0, 20, 40, 200, 400, 800] {
        let now = JUNE_2026 + day * DAY;
        f.clock.set(now);
        let view = f.service.view();
        let snapshot = f.service.snapshot();
        let keys = TrustedKeys::new([vendor().trusted_key()]);
        let mut candidates = Vec::new();
        for entry in snapshot.page(None, 1000).0 {
            if let Ok(evaluation) = keys
                .verify_text(&entry.record.payload)
                .and_then(|v| v.evaluate(now))
            {
                candidates.push(Candidate {
                    item: entry.record.id,
                    updated_at: entry.record.updated_at,
                    revision: entry.record.revision,
                    status: evaluation.status,
                });
            }
        }
        let expected = select_effective(&candidates).effective.map(|c| c.item);
        assert_eq!(
            view.stored_in_force.and_then(|f| f.record).map(|r| r.id),
            expected,
            "day {day}"
        );
        assert!(view
            .warnings
            .iter()
            .any(|w| w.contains("1 stored license(s) do not verify")));
    }
}

/// A real sled store that counts its telemetry writes.
struct Counting {
    inner: SledStore,
    telemetry_writes: AtomicUsize,
}

#[async_trait::async_trait]
impl Store for Counting {
    fn backend_version(&self) -> &str {
        self.inner.backend_version()
    }
    async fn load(&self) -> Result<Loaded, StoreError> {
        self.inner.load().await
    }
    async fn commit(&self, base: u64, change: Change) -> Result<u64, StoreError> {
        self.inner.commit(base, change).await
    }
    fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.subscribe()
    }
    async fn apply_telemetry(&self, reports: Vec<Report>) -> Result<Vec<bool>, StoreError> {
        self.telemetry_writes.fetch_add(1, Ordering::SeqCst);
        self.inner.apply_telemetry(reports).await
    }
    async fn usage(&self) -> Result<Vec<NodeUsage>, StoreError> {
        self.inner.usage().await
    }
    async fn put_data_planes(&self, records: Arc<[DataPlaneRecord]>) -> Result<(), StoreError> {
        self.inner.put_data_planes(records).await
    }
    async fn data_planes(&self) -> Result<Vec<DataPlaneRecord>, StoreError> {
        self.inner.data_planes().await
    }
    async fn purge_data_planes(&self, before: i64) -> Result<usize, StoreError> {
        self.inner.purge_data_planes(before).await
    }
    async fn check(&self) -> Result<(), StoreError> {
        self.inner.check().await
    }
    async fn close(&self) -> Result<(), StoreError> {
        self.inner.close().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_that_arrives_together_shares_durable_writes_and_counts_once() {
    let tmp = tempfile::tempdir().unwrap();
    let sled = SledStore::open(&tmp.path().join("telemetry")).unwrap();
    let counting = Arc::new(Counting {
        inner: sled,
        telemetry_writes: AtomicUsize::new(0),
    });
    let f = fixture_with(tmp, Some(counting.clone())).await;
    const NODES: u64 = 200;
    // Every node at once, each sending its report, the same again (a resend), and its next
    // one, in order, as a data plane does.
    let nodes: Vec<_> = (0..NODES)
        .map(|n| {
            let service = f.service.clone();
            tokio::spawn(async move {
                let mut fresh = 0;
                for seq in [1, 1, 2] {
                    let applied = service
                        .apply_telemetry(Report {
                            node_id: format!("dp-{n}"),
                            seq,
                            counters: vec![("2026-06".to_owned(), 10)],
                        })
                        .await
                        .unwrap();
                    fresh += usize::from(applied);
                }
                fresh
            })
        })
        .collect();
    let mut fresh = 0;
    for node in nodes {
        fresh += node.await.unwrap();
    }
    assert_eq!(fresh, 2 * NODES as usize, "each (node, seq) applied once");
    let usage = f.service.usage().await.unwrap();
    assert_eq!(usage.len(), NODES as usize);
    assert!(usage
        .iter()
        .all(|u| u.buckets["2026-06"] == 20 && u.last_seq == 2));
    let writes = counting.telemetry_writes.load(Ordering::SeqCst);
    assert!(
        writes < (3 * NODES as usize) / 4,
        "{writes} durable writes for {} reports: not group-committed",
        3 * NODES
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_failed_to_reach_the_disk_answers_503_and_loses_nothing_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let f = fixture_with(tmp, None).await;
    let kept = license("KEPT", "2026-01-01", "2027-12-31");
    let (status, record) = send(
        &f.service,
        "POST",
        "/licenses",
        Some(json!({"payload": kept})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);

    f.sled.faults().fail_fsync(true);
    let lost = license("UNKNOWN", "2026-01-01", "2027-12-31");
    let (status, body) = send(
        &f.service,
        "POST",
        "/licenses",
        Some(json!({"payload": lost})),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["message"].is_string(), "{body}");
    // The disk works again, but the store does not pretend nothing happened.
    f.sled.faults().fail_fsync(false);
    let later = license("LATER", "2026-01-01", "2027-12-31");
    let (status, body) = send(
        &f.service,
        "POST",
        "/licenses",
        Some(json!({"payload": later})),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        body["message"].as_str().unwrap().contains("restart"),
        "{body}"
    );
    let (status, _) = send(&f.service, "GET", "/status", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    // Reads answer from the snapshot, which never held the failed write.
    let (status, page) = send(&f.service, "GET", "/licenses", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["data"].as_array().unwrap().len(), 1, "{page}");
    assert!(f
        .service
        .apply_telemetry(Report {
            node_id: "dp".into(),
            seq: 1,
            counters: vec![]
        })
        .await
        .is_err());

    // A restart reads what is on disk: the acknowledged write is there.
    f.service.close().await.unwrap();
    let Fixture {
        _tmp: tmp,
        sled,
        service,
        stop,
        tasks,
        ..
    } = f;
    stop.send(true).unwrap();
    tasks.await.unwrap();
    drop((sled, service));
    let dir = tmp.path().join("data");
    let store = SledStore::open(&dir).unwrap();
    let loaded = store.load().await.unwrap();
    let ids: Vec<String> = loaded.licenses.iter().map(|r| r.id.to_string()).collect();
    assert!(
        ids.contains(&record["id"].as_str().unwrap().to_owned()),
        "{ids:?}"
    );
    assert!(!loaded.licenses.iter().any(|r| r.payload.contains("LATER")));
}

/// The snapshot's licenses as (id, payload, updated_at, revision), in id order.
fn contents(service: &Service) -> (u64, Vec<(Uuid, String, i64, u64)>) {
    let snapshot = service.snapshot();
    let (entries, _) = snapshot.page(None, usize::MAX);
    (
        snapshot.revision,
        entries
            .iter()
            .map(|e| {
                let r = &e.record;
                (r.id, r.payload.clone(), r.updated_at, r.revision)
            })
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_follows_another_by_what_changed() {
    let pg = charter_store::testing::TestPostgres::start();
    let start = || async {
        let store: Arc<dyn Store> = Arc::new(
            charter_store::PgStore::open(&pg.url())
                .await
                .expect("open the database"),
        );
        let clock = Arc::new(FixedClock::new(JUNE_2026));
        let (service, tasks) = Service::start(
            store,
            TrustedKeys::new([vendor().trusted_key()]),
            clock.clone(),
            None,
            "cp".to_owned(),
        )
        .await
        .expect("start");
        let (stop, stopped) = watch::channel(false);
        (service, stop, tokio::spawn(tasks.run(stopped)), clock)
    };
    let (a, stop_a, tasks_a, clock) = start().await;
    let (b, stop_b, tasks_b, _) = start().await;

    // Creates, replaces, touches and deletes on A; B catches up after each, to the same
    // licenses, the same revisions, and the same license in force.
    let mut ids = Vec::new();
    for step in 0..24u32 {
        clock.set(JUNE_2026 + i64::from(step) + 1);
        let text = license(&format!("key-{step}"), "2026-01-01", "2027-12-31");
        match step % 4 {
            0 | 1 => ids.push(
                a.create(None, a.validate(&text).unwrap())
                    .await
                    .unwrap()
                    .record
                    .id,
            ),
            2 => {
                let id = ids[ids.len() / 2];
                a.put(id, a.validate(&text).unwrap()).await.unwrap();
            }
            _ => {
                let id = ids.remove(0);
                a.delete(id).await.unwrap().expect("deleted");
                a.patch(ids[0], None).await.unwrap();
            }
        }
        let mut snapshots = b.subscribe();
        let target = a.snapshot().revision;
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            snapshots.wait_for(|s| s.revision >= target),
        )
        .await
        .unwrap_or_else(|_| panic!("B did not reach revision {target} within 5 s"))
        .unwrap();
        assert_eq!(contents(&b), contents(&a), "after step {step}");
        let in_force = |s: &Service| s.view().in_force.and_then(|f| f.record).map(|r| r.id);
        assert_eq!(in_force(&b), in_force(&a), "after step {step}");
    }
    for (stop, tasks, service) in [(stop_a, tasks_a, a), (stop_b, tasks_b, b)] {
        stop.send(true).unwrap();
        tasks.await.unwrap();
        service.close().await.unwrap();
    }
}

/// A database restored to an older revision (a backup): the control plane notices the
/// revision going down and reloads, rather than serving licenses the database lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_follows_its_database_restored_to_an_older_revision() {
    let pg = charter_store::testing::TestPostgres::start();
    let pg_store = charter_store::PgStore::open(&pg.url())
        .await
        .expect("open the database");
    let store: Arc<dyn Store> = Arc::new(pg_store.clone());
    let clock = Arc::new(FixedClock::new(JUNE_2026));
    let (service, tasks) = Service::start(
        store,
        TrustedKeys::new([vendor().trusted_key()]),
        clock.clone(),
        None,
        "cp".to_owned(),
    )
    .await
    .expect("start");
    let (stop, stopped) = watch::channel(false);
    let tasks = tokio::spawn(tasks.run(stopped));
    for step in 0..3 {
        let text = license(&format!("key-{step}"), "2026-01-01", "2027-12-31");
        service
            .create(None, service.validate(&text).unwrap())
            .await
            .unwrap();
    }
    assert_eq!(contents(&service).1.len(), 3);

    // The backup: the database as it was at revision 1.
    pg.execute(
        "BEGIN;
         DELETE FROM charter_licenses WHERE revision > 1;
         DELETE FROM charter_deletions;
         UPDATE charter_meta SET revision = 1;
         COMMIT;",
    )
    .await;
    let mut snapshots = service.subscribe();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        snapshots.wait_for(|s| s.revision == 1),
    )
    .await
    .expect("the control plane follows the restore within 10 s")
    .unwrap();
    let loaded = pg_store.load().await.unwrap();
    let (revision, licenses) = contents(&service);
    assert_eq!(revision, loaded.revision);
    let stored: Vec<_> = loaded
        .licenses
        .iter()
        .map(|r| (r.id, r.payload.clone(), r.updated_at, r.revision))
        .collect();
    assert_eq!(licenses, stored);
    assert_eq!(licenses.len(), 1);

    // And writes go on from there.
    let text = license("after", "2026-01-01", "2027-12-31");
    let written = service
        .create(None, service.validate(&text).unwrap())
        .await
        .unwrap();
    assert_eq!(written.record.revision, 2);
    stop.send(true).unwrap();
    tasks.await.unwrap();
    service.close().await.unwrap();
}

/// `text`'s license with every key in reverse order, indented over several lines.
fn reordered(text: &str) -> String {
    let document: Value = serde_json::from_str(text).unwrap();
    let license = &document["license"];
    let fields: Vec<String> = license["payload"]
        .as_object()
        .unwrap()
        .iter()
        .rev()
        .map(|(name, value)| format!("      {}: {value}", Value::from(name.as_str())))
        .collect();
    format!(
        "{{\n  \"license\": {{\n    \"version\": {},\n    \"signature\": {},\n    \"payload\": {{\n{}\n    }}\n  }}\n}}\n",
        license["version"],
        license["signature"],
        fields.join(",\n")
    )
}

/// A payload is kept exactly as sent, while duplicates are found on the canonical text; a
/// store written by an earlier release, which kept the canonical text as the payload, loads
/// and its licenses keep finding their duplicates.
#[tokio::test]
async fn payloads_are_kept_as_sent_and_duplicates_found_on_the_canonical_text() {
    let tmp = tempfile::tempdir().unwrap();
    // As an earlier release stored it: the compact document with sorted keys.
    let legacy = license("LEGACY", "2026-01-01", "2027-12-31");
    let legacy_id = Uuid::new_v4();
    {
        let store = SledStore::open(&tmp.path().join("data")).unwrap();
        let record = charter_store::LicenseRecord {
            id: legacy_id,
            payload: legacy.clone(),
            checksum: charter_store::checksum_of(&legacy),
            created_at: JUNE_2026 - DAY,
            updated_at: JUNE_2026 - DAY,
            revision: 1,
        };
        store.commit(0, Change::Put(record)).await.unwrap();
        store.close().await.unwrap();
    }
    let f = fixture_with(tmp, None).await;
    let (status, stored) = send(&f.service, "GET", &format!("/licenses/{legacy_id}"), None).await;
    assert_eq!(
        (status, &stored["payload"]),
        (StatusCode::OK, &json!(legacy))
    );
    let in_force = f.service.view().in_force.and_then(|f| f.record);
    assert_eq!(in_force.map(|r| r.id), Some(legacy_id));

    // The same license with other whitespace and key order is a duplicate of it.
    let spaced = reordered(&legacy);
    assert_ne!(spaced, legacy);
    let (status, body) = send(
        &f.service,
        "POST",
        "/licenses",
        Some(json!({"payload": spaced})),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.to_string().contains(&legacy_id.to_string()), "{body}");
    // Replaced on its own id by that text, it keeps the text and the checksum.
    let path = format!("/licenses/{legacy_id}");
    let (status, put) = send(&f.service, "PUT", &path, Some(json!({"payload": spaced}))).await;
    assert_eq!(status, StatusCode::OK, "{put}");
    assert_eq!(put["payload"], json!(spaced));
    assert_eq!(put["checksum"], stored["checksum"]);
    // Consul's PUT of the compact text finds the same record.
    let installed = f
        .service
        .install(f.service.validate(&legacy).unwrap())
        .await
        .unwrap();
    assert_eq!(
        (installed.record.id, installed.record.payload.as_str()),
        (legacy_id, legacy.as_str())
    );
    assert_eq!(f.service.snapshot().len(), 1);

    // A new license comes back byte for byte, from the write, GET, the list and a PATCH
    // without payload; its checksum is that of the canonical text.
    let fresh = license("FRESH", "2026-01-01", "2027-12-31");
    let sent = reordered(&fresh);
    let (status, created) = send(
        &f.service,
        "POST",
        "/licenses",
        Some(json!({"payload": sent})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["payload"], json!(sent));
    assert_eq!(
        created["checksum"],
        json!(charter_store::checksum_of(&fresh))
    );
    let path = format!("/licenses/{}", created["id"].as_str().unwrap());
    assert_eq!(send(&f.service, "GET", &path, None).await.1, created);
    let (_, page) = send(&f.service, "GET", "/licenses", None).await;
    assert!(
        page["data"].as_array().unwrap().contains(&created),
        "{page}"
    );
    let (status, patched) = send(&f.service, "PATCH", &path, Some(json!({}))).await;
    assert_eq!(
        (status, &patched["payload"]),
        (StatusCode::OK, &json!(sent))
    );
    // An admin-API record sent as the payload stores the document it holds, as it was sent.
    let other = reordered(&license("RECORD", "2026-01-01", "2027-12-31"));
    let wrapped = json!({"payload": other, "id": Uuid::new_v4()}).to_string();
    let (status, created) = send(
        &f.service,
        "POST",
        "/licenses",
        Some(json!({"payload": wrapped})),
    )
    .await;
    assert_eq!(
        (status, &created["payload"]),
        (StatusCode::CREATED, &json!(other))
    );
    f.stop.send(true).unwrap();
    f.tasks.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_trusted_keys_judge_every_stored_license_again() {
    let f = fixture().await;
    let (status, created) = send(
        &f.service,
        "POST",
        "/licenses",
        Some(json!({ "payload": license("ROTATED", "2026-01-01", "2030-12-31") })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert!(f.service.view().stored_in_force.is_some());

    // The vendor's key is no longer trusted: the stored license no longer counts.
    let other = LicenseSigner::from_seed([8; 32]);
    f.service
        .set_keys(TrustedKeys::new([other.trusted_key()]))
        .await;
    assert!(f.service.view().stored_in_force.is_none());
    // Trusted again: it is in force again.
    f.service
        .set_keys(TrustedKeys::new([
            other.trusted_key(),
            vendor().trusted_key(),
        ]))
        .await;
    let view = f.service.view();
    let in_force = view.stored_in_force.expect("in force again");
    assert_eq!(
        in_force.record.map(|r| r.id.to_string()),
        created["id"].as_str().map(str::to_owned)
    );
    let _ = f.stop.send(true);
    let _ = f.tasks.await;
}
