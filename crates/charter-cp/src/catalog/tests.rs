//! Tests of the in-memory catalog against a real sled store: every read answers what the
//! store holds once a write has returned, byte for byte as the store-backed reads did, and
//! the view is the one `select_effective` over every stored record gives.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use charter_license::{
    select_effective, Candidate, FixedClock, LicenseSigner, Status, TrustedKeys, UnixTime,
};
use charter_store::{LicenseRecord, LicenseStore, SledStore};
use http_body_util::BodyExt;
use serde_json::{json, Map, Value};
use tower::ServiceExt;
use uuid::Uuid;

use crate::api::record_json;
use crate::state::AppState;

const DAY: i64 = 86_400;
/// 2026-06-01T00:00:00Z.
const JUNE_2026: UnixTime = 1_780_272_000;

struct Fixture {
    _tmp: tempfile::TempDir,
    store: Arc<dyn LicenseStore>,
    clock: Arc<FixedClock>,
    state: AppState,
    vendor: LicenseSigner,
    stranger: LicenseSigner,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn LicenseStore> =
        Arc::new(SledStore::open(&tmp.path().join("data")).expect("open store"));
    let vendor = LicenseSigner::from_seed([7; 32]);
    let stranger = LicenseSigner::from_seed([8; 32]);
    let clock = Arc::new(FixedClock::new(JUNE_2026));
    let state = AppState::new(
        store.clone(),
        TrustedKeys::new([vendor.trusted_key()]),
        clock.clone(),
        None,
        None,
    );
    Fixture {
        _tmp: tmp,
        store,
        clock,
        state,
        vendor,
        stranger,
    }
}

fn license(signer: &LicenseSigner, key: &str, created: &str, expires: &str) -> String {
    let Value::Object(payload) = json!({
        "admin_seats": "1",
        "customer": "Example \"Company\", Inc \u{e9}\u{1F600} </script>\\",
        "dataplanes": "1",
        "license_creation_date": created,
        "license_expiration_date": expires,
        "license_key": key,
        "product_subscription": "Charter Enterprise",
        "support_plan": "None",
    }) else {
        unreachable!("an object literal")
    };
    signer.sign(payload).expect("a valid payload").to_json()
}

async fn get(state: &AppState, uri: &str) -> (StatusCode, Vec<u8>) {
    let response = crate::api::router(state.clone())
        .oneshot(Request::get(uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    assert_eq!(
        response.headers()["content-type"],
        "application/json",
        "{uri}"
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, body.to_vec())
}

/// The body the store-backed `GET /licenses` gave: `json!` over the store's page.
fn page_as_before(records: &[LicenseRecord], next: Option<Uuid>, size: usize) -> Vec<u8> {
    let offset = next.map(|id| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id.as_bytes())
    });
    let next = offset
        .as_ref()
        .map(|o| format!("/licenses?offset={o}&size={size}"));
    let data: Vec<Value> = records.iter().map(record_json).collect();
    serde_json::to_vec(&json!({"data": data, "next": next, "offset": offset})).unwrap()
}

/// Every record and every page the API answers is, byte for byte, what the store holds,
/// serialised as the store-backed handlers did.
async fn check_matches_store(f: &Fixture) {
    let all = f.store.all().unwrap();
    for record in &all {
        let (status, body) = get(&f.state, &format!("/licenses/{}", record.id)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            String::from_utf8(body).unwrap(),
            serde_json::to_string(&record_json(record)).unwrap()
        );
    }
    for size in [1, 3, 100] {
        let mut after = None;
        let mut uri = format!("/licenses?size={size}");
        loop {
            let page = f.store.list(after, size).unwrap();
            let (status, body) = get(&f.state, &uri).await;
            assert_eq!(status, StatusCode::OK);
            // Asked again at the same revision, the page comes from the page cache.
            assert_eq!(get(&f.state, &uri).await.1, body, "{uri} again");
            assert_eq!(
                String::from_utf8(body.clone()).unwrap(),
                String::from_utf8(page_as_before(&page.records, page.next, size)).unwrap(),
                "{uri}"
            );
            let answer: Value = serde_json::from_slice(&body).unwrap();
            match answer["next"].as_str() {
                Some(next) => uri = next.to_owned(),
                None => break,
            }
            after = page.next;
        }
    }
}

#[tokio::test]
async fn reads_follow_every_write_byte_for_byte() {
    let f = fixture();
    check_matches_store(&f).await;
    let (status, _) = get(&f.state, "/licenses").await;
    assert_eq!(status, StatusCode::OK);

    let mut ids = Vec::new();
    for n in 0..7 {
        let text = license(&f.vendor, &format!("key-{n}"), "2026-01-01", "2099-12-31");
        let id = Uuid::new_v4();
        f.store.insert(id, &text, JUNE_2026 + n).unwrap();
        ids.push(id);
        check_matches_store(&f).await;
    }
    // Writes made straight on the store, as well as through the API, are seen: the catalog
    // follows the store's change log, not the handlers.
    let replaced = license(&f.vendor, "replaced", "2026-01-01", "2099-12-31");
    f.store.put(ids[2], &replaced, JUNE_2026 + 100).unwrap();
    check_matches_store(&f).await;
    let patched = license(&f.stranger, "patched", "2026-01-01", "2099-12-31");
    f.store.patch(ids[3], &patched, JUNE_2026 + 200).unwrap();
    check_matches_store(&f).await;
    f.store.delete(ids[4]).unwrap();
    check_matches_store(&f).await;
    let (status, body) = get(&f.state, &format!("/licenses/{}", ids[4])).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body, br#"{"message":"Not found"}"#);

    // And through the API.
    for (method, uri, payload) in [
        (
            "PUT",
            format!("/licenses/{}", ids[0]),
            Some(license(&f.vendor, "put", "2026-01-01", "2099-12-31")),
        ),
        (
            "PATCH",
            format!("/licenses/{}", ids[1]),
            Some(license(&f.vendor, "patch", "2026-01-01", "2099-12-31")),
        ),
        ("PATCH", format!("/licenses/{}", ids[5]), None),
        ("DELETE", format!("/licenses/{}", ids[6]), None),
        (
            "POST",
            "/licenses".to_owned(),
            Some(license(&f.vendor, "post", "2026-01-01", "2099-12-31")),
        ),
    ] {
        let body = match payload {
            Some(payload) => json!({ "payload": payload }).to_string(),
            None => String::new(),
        };
        let response = crate::api::router(f.state.clone())
            .oneshot(
                Request::builder()
                    .method(method)
                    .uri(&uri)
                    .header("content-type", "application/json")
                    .body(Body::from(body))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "{method} {uri}: {}",
            response.status()
        );
        check_matches_store(&f).await;
        // The record a write answers is the one a GET right after answers.
        if method != "DELETE" {
            let written = response.into_body().collect().await.unwrap().to_bytes();
            let written: Value = serde_json::from_slice(&written).unwrap();
            let (_, body) = get(
                &f.state,
                &format!("/licenses/{}", written["id"].as_str().unwrap()),
            )
            .await;
            assert_eq!(serde_json::from_slice::<Value>(&body).unwrap(), written);
        }
    }
}

/// The view the store-backed code computed: `select_effective` over every stored license
/// that verifies and is in force at `now`, in id order.
fn view_as_before(f: &Fixture, now: UnixTime) -> (Option<Uuid>, Option<Status>, bool, usize) {
    let keys = TrustedKeys::new([f.vendor.trusted_key()]);
    let mut candidates = Vec::new();
    let mut unverified = 0;
    for record in f.store.all().unwrap() {
        let Ok(verified) = keys.verify_text(&record.payload) else {
            unverified += 1;
            continue;
        };
        let Ok(evaluation) = verified.evaluate(now) else {
            continue;
        };
        candidates.push(Candidate {
            updated_at: record.updated_at,
            revision: record.revision,
            status: evaluation.status,
            item: record.id,
        });
    }
    let selection = select_effective(&candidates);
    (
        selection.effective.map(|c| c.item),
        selection.effective.map(|c| c.status),
        selection.expired_while_other_valid,
        unverified,
    )
}

fn check_view(f: &Fixture, now: UnixTime) {
    f.clock.set(now);
    let view = f.state.view().unwrap();
    let (id, status, expired_while_other_valid, unverified) = view_as_before(f, now);
    let in_force = view.in_force.as_ref();
    let what = format!("at {now}: {view:?}");
    assert_eq!(
        in_force.and_then(|f| f.record.as_ref()).map(|r| r.id),
        id,
        "{what}"
    );
    assert_eq!(in_force.map(|f| f.evaluation.status), status, "{what}");
    assert_eq!(
        view.warnings
            .iter()
            .any(|w| w.contains("has expired while another")),
        expired_while_other_valid,
        "{what}"
    );
    assert_eq!(
        view.warnings.iter().any(|w| w.contains("do not verify")),
        unverified > 0,
        "{what}"
    );
    // The record in force is as stored now.
    if let Some(record) = in_force.and_then(|f| f.record.as_ref()) {
        assert_eq!(Some(record), f.store.get(record.id).unwrap().as_ref());
    }
    // And the Consul face's computation over a given set of records agrees.
    let of = f.state.view_of(f.store.all().unwrap()).unwrap();
    assert_eq!(format!("{of:?}"), format!("{view:?}"));
}

#[test]
fn the_view_is_select_effective_over_every_stored_license() {
    let f = fixture();
    let nows = [
        JUNE_2026 - 400 * DAY,
        JUNE_2026 - 30 * DAY,
        JUNE_2026,
        JUNE_2026 + 20 * DAY,
        JUNE_2026 + 45 * DAY,
        JUNE_2026 + 200 * DAY,
        JUNE_2026 + 3000 * DAY,
    ];
    let check_all = |f: &Fixture| {
        for now in nows {
            check_view(f, now);
        }
    };
    check_all(&f);
    // (signer, created, expires, updated_at): licenses not yet in force, expiring, in
    // grace, expired, not verifying, and several written at the same second (ties break
    // on the revision).
    let vendor = &f.vendor;
    let stranger = &f.stranger;
    let cases = [
        (vendor, "2025-01-01", "2026-07-01", JUNE_2026),
        (vendor, "2025-01-01", "2099-12-31", JUNE_2026 - DAY),
        (vendor, "2026-09-01", "2099-12-31", JUNE_2026 + DAY),
        (stranger, "2025-01-01", "2099-12-31", JUNE_2026 + 2 * DAY),
        (vendor, "2025-01-01", "2026-06-10", JUNE_2026 + 2 * DAY),
        (vendor, "2025-01-01", "2026-05-01", JUNE_2026 + 2 * DAY),
        (vendor, "2024-01-01", "2025-01-01", JUNE_2026 + 3 * DAY),
    ];
    let mut ids = Vec::new();
    for (n, (signer, created, expires, at)) in cases.into_iter().enumerate() {
        let id = Uuid::new_v4();
        f.store
            .insert(id, &license(signer, &format!("k{n}"), created, expires), at)
            .unwrap();
        ids.push(id);
        check_all(&f);
    }
    // Moving `updated_at` puts a license back in force; deleting hands over to the next.
    f.store
        .patch(
            ids[1],
            &f.store.get(ids[1]).unwrap().unwrap().payload,
            JUNE_2026 + 10 * DAY,
        )
        .unwrap();
    check_all(&f);
    f.store.delete(ids[1]).unwrap();
    check_all(&f);
    f.store.delete(ids[6]).unwrap();
    check_all(&f);
    for id in &ids {
        f.store.delete(*id).unwrap();
    }
    check_all(&f);
}

#[test]
fn concurrent_reads_see_every_acknowledged_write() {
    let f = fixture();
    let ids: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    let texts: Vec<String> = (0..6)
        .map(|n| license(&f.vendor, &format!("c{n}"), "2026-01-01", "2099-12-31"))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (state, stop, texts) = (f.state.clone(), stop.clone(), texts.clone());
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Whatever a reader sees is a record as stored at some point, encoded
                    // as the API encodes it.
                    let entries = state.catalog(|index| index.page(None, 100).0).unwrap();
                    for entry in entries {
                        assert!(texts.contains(&entry.record.payload));
                        assert_eq!(entry.json, crate::api::record_body(&entry.record));
                    }
                    state.view().unwrap();
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    let mut payloads: Map<String, Value> = Map::new();
    for round in 0..40usize {
        let id = ids[round % ids.len()];
        let text = &texts[round % texts.len()];
        match f.store.put(id, text, JUNE_2026 + round as i64) {
            Ok((record, _)) => {
                // Once the write has returned, every read sees it.
                let seen = f
                    .state
                    .record(id)
                    .unwrap()
                    .expect("the record just written");
                assert_eq!(seen.record, record);
                payloads.insert(id.to_string(), Value::String(text.clone()));
            }
            // The same payload under another id.
            Err(charter_store::StoreError::DuplicatePayload { .. }) => {
                f.store.delete(id).unwrap();
                assert!(f.state.record(id).unwrap().is_none());
                payloads.remove(&id.to_string());
            }
            Err(e) => panic!("{e}"),
        }
        let in_force = f
            .state
            .view()
            .unwrap()
            .in_force
            .and_then(|f| f.record)
            .map(|r| r.id);
        let newest = f
            .store
            .all()
            .unwrap()
            .into_iter()
            .max_by_key(|r| (r.updated_at, r.revision))
            .map(|r| r.id);
        assert_eq!(in_force, newest);
    }
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        assert!(reader.join().unwrap() > 0);
    }
    assert_eq!(
        f.state
            .catalog(|index| index.page(None, 100).0.len())
            .unwrap(),
        payloads.len()
    );
}

#[test]
fn a_remembered_verification_is_what_verifying_the_stored_text_gives() {
    let f = fixture();
    let keys = TrustedKeys::new([f.vendor.trusted_key()]);
    let document = license(&f.vendor, "spaced", "2026-01-01", "2099-12-31");
    // Submitted with other whitespace and key order than it is stored with.
    let value: Value = serde_json::from_str(&document).unwrap();
    let submitted = serde_json::to_string_pretty(&value).unwrap();
    let verified = keys.verify_text(&submitted).unwrap();
    let stored = crate::effective::normalized(&verified.document);
    assert_ne!(stored, submitted);
    f.state.remember_verified(&stored, &verified);
    let record = f.store.insert(Uuid::new_v4(), &stored, JUNE_2026).unwrap();
    let cache = crate::effective::VerifyCache::default();
    let fresh = cache.verify(&keys, &record).expect("verifies");
    let entry = f.state.record(record.id).unwrap().expect("stored");
    assert_eq!(entry.verified.as_deref(), Some(&*fresh));
}

/// The sled store, except that one record reads back as corrupt, as a record whose bytes
/// were damaged on disk would: the real store's API cannot make one, by design.
struct OneCorruptRecord {
    inner: SledStore,
    broken: std::sync::Mutex<Option<Uuid>>,
}

impl OneCorruptRecord {
    fn broken(&self) -> Option<Uuid> {
        *self.broken.lock().unwrap()
    }

    fn check(&self, id: Uuid) -> Result<(), charter_store::StoreError> {
        match self.broken() {
            Some(broken) if broken == id => Err(charter_store::StoreError::Corrupt(format!(
                "tree licenses key {id}: checksum does not match the payload"
            ))),
            _ => Ok(()),
        }
    }
}

impl LicenseStore for OneCorruptRecord {
    fn epoch(&self) -> Uuid {
        self.inner.epoch()
    }
    fn revision(&self) -> Result<u64, charter_store::StoreError> {
        self.inner.revision()
    }
    fn backend_version(&self) -> &'static str {
        self.inner.backend_version()
    }
    fn get(&self, id: Uuid) -> Result<Option<LicenseRecord>, charter_store::StoreError> {
        self.check(id)?;
        self.inner.get(id)
    }
    fn list(
        &self,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<charter_store::Page, charter_store::StoreError> {
        let page = self.inner.list(after, limit)?;
        page.records.iter().try_for_each(|r| self.check(r.id))?;
        Ok(page)
    }
    fn all(&self) -> Result<Vec<LicenseRecord>, charter_store::StoreError> {
        let all = self.inner.all()?;
        all.iter().try_for_each(|r| self.check(r.id))?;
        Ok(all)
    }
    fn count(&self) -> Result<u64, charter_store::StoreError> {
        self.inner.count()
    }
    fn insert(
        &self,
        id: Uuid,
        payload: &str,
        now: i64,
    ) -> Result<LicenseRecord, charter_store::StoreError> {
        self.inner.insert(id, payload, now)
    }
    fn put(
        &self,
        id: Uuid,
        payload: &str,
        now: i64,
    ) -> Result<(LicenseRecord, charter_store::PutOutcome), charter_store::StoreError> {
        self.inner.put(id, payload, now)
    }
    fn patch(
        &self,
        id: Uuid,
        payload: &str,
        now: i64,
    ) -> Result<LicenseRecord, charter_store::StoreError> {
        self.inner.patch(id, payload, now)
    }
    fn delete(&self, id: Uuid) -> Result<Option<LicenseRecord>, charter_store::StoreError> {
        self.inner.delete(id)
    }
    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.subscribe()
    }
    fn changes_since(&self, revision: u64) -> charter_store::Changes {
        self.inner.changes_since(revision)
    }
    fn put_data_plane(
        &self,
        record: &charter_store::DataPlaneRecord,
    ) -> Result<(), charter_store::StoreError> {
        self.inner.put_data_plane(record)
    }
    fn put_data_planes(
        &self,
        records: &[charter_store::DataPlaneRecord],
    ) -> Result<(), charter_store::StoreError> {
        self.inner.put_data_planes(records)
    }
    fn data_planes(
        &self,
    ) -> Result<Vec<charter_store::DataPlaneRecord>, charter_store::StoreError> {
        self.inner.data_planes()
    }
    fn apply_telemetry(
        &self,
        node_id: &str,
        seq: u64,
        counters: &[(String, u64)],
    ) -> Result<bool, charter_store::StoreError> {
        self.inner.apply_telemetry(node_id, seq, counters)
    }
    fn usage(&self) -> Result<Vec<charter_store::NodeUsage>, charter_store::StoreError> {
        self.inner.usage()
    }
    fn purge_data_planes(&self, last_seen_before: i64) -> Result<usize, charter_store::StoreError> {
        self.inner.purge_data_planes(last_seen_before)
    }
}

#[tokio::test]
async fn a_record_that_does_not_decode_fails_only_its_own_reads() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(OneCorruptRecord {
        inner: SledStore::open(&tmp.path().join("data")).expect("open store"),
        broken: std::sync::Mutex::new(None),
    });
    let vendor = LicenseSigner::from_seed([7; 32]);
    let state = AppState::new(
        store.clone(),
        TrustedKeys::new([vendor.trusted_key()]),
        Arc::new(FixedClock::new(JUNE_2026)),
        None,
        None,
    );
    let (good, bad) = (Uuid::from_u128(1), Uuid::from_u128(2));
    for (id, key) in [(good, "good"), (bad, "bad")] {
        store
            .insert(id, &license(&vendor, key, "2026-01-01", "2027-01-01"), 1)
            .unwrap();
    }
    assert_eq!(get(&state, "/licenses").await.0, StatusCode::OK);

    // The bad record changes, and reads back as corrupt: the catalog cannot take it in.
    store
        .put(
            bad,
            &license(&vendor, "bad 2", "2026-01-01", "2027-01-01"),
            2,
        )
        .unwrap();
    *store.broken.lock().unwrap() = Some(bad);
    assert!(state.record(good).is_err(), "the catalog is behind");

    // The good record is still served, from the store, byte for byte.
    let (status, body) = get(&state, &format!("/licenses/{good}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        serde_json::to_vec(&record_json(&store.inner.get(good).unwrap().unwrap())).unwrap()
    );
    // The bad one, and any page that holds it, fail as the store does rather than guess.
    let unavailable = (
        StatusCode::SERVICE_UNAVAILABLE,
        br#"{"message":"License store unavailable"}"#.to_vec(),
    );
    assert_eq!(get(&state, &format!("/licenses/{bad}")).await, unavailable);
    assert_eq!(get(&state, "/licenses").await, unavailable);
    assert_eq!(get(&state, "/licenses?size=1").await.0, StatusCode::OK);
    assert_eq!(
        get(&state, &format!("/licenses/{}", Uuid::from_u128(3)))
            .await
            .0,
        StatusCode::NOT_FOUND
    );

    // Once it reads back again, the catalog catches up and serves it.
    *store.broken.lock().unwrap() = None;
    let (status, body) = get(&state, &format!("/licenses/{bad}")).await;
    assert_eq!(status, StatusCode::OK);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["updated_at"], 2);
    assert!(state.record(bad).unwrap().is_some());
}
