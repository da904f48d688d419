//! Tests of the sled store against real sled databases in temporary directories, including
//! a crash test that SIGKILLs a writer process and checks every acknowledged write survived.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use uuid::Uuid;

use crate::sled_store::checksum_of;
use crate::{LicenseRecord, LicenseStore, Page, PutOutcome, SledStore, StoreError};

fn open(dir: &Path) -> SledStore {
    SledStore::open(dir).expect("open store")
}

fn fresh() -> (tempfile::TempDir, SledStore) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = open(&tmp.path().join("data"));
    (tmp, store)
}

/// Ids with a known byte order, so tests can reason about list order.
fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

#[test]
fn fresh_store_is_empty_at_revision_zero() {
    let (_tmp, store) = fresh();
    assert_eq!(store.revision().unwrap(), 0);
    assert_eq!(store.count().unwrap(), 0);
    assert_eq!(store.all().unwrap(), vec![]);
    assert_eq!(
        store.list(None, 10).unwrap(),
        Page {
            records: vec![],
            next: None
        }
    );
    assert_eq!(store.get(id(1)).unwrap(), None);
    assert_eq!(store.backend_version(), "sled 0.34.7");
}

#[test]
fn insert_sets_every_field() {
    let (_tmp, store) = fresh();
    let record = store.insert(id(7), "payload seven", 1_700_000_000).unwrap();
    let expected = LicenseRecord {
        id: id(7),
        payload: "payload seven".to_string(),
        // `printf 'payload seven' | sha256sum`
        checksum: "151a9525f4903e23fd3bcb79a8bff3225a44c9307a2a112391058e3534a8cdc2".to_string(),
        created_at: 1_700_000_000,
        updated_at: 1_700_000_000,
        revision: 1,
    };
    assert_eq!(record, expected);
    assert_eq!(store.get(id(7)).unwrap(), Some(record));
}

#[test]
fn pagination_over_250_records_is_stable_and_complete() {
    let (_tmp, store) = fresh();
    let mut ids = BTreeSet::new();
    for n in 0..250 {
        let id = Uuid::new_v4();
        store.insert(id, &format!("license {n}"), n).unwrap();
        ids.insert(id);
    }
    // BTreeSet<Uuid> orders by the id bytes, which is the order the store promises.
    let expected: Vec<Uuid> = ids.into_iter().collect();

    for limit in [1, 7, 100, 249, 250, 251, 1000] {
        let mut seen = Vec::new();
        let mut after = None;
        let mut pages = 0;
        loop {
            let page = store.list(after, limit).unwrap();
            assert!(page.records.len() <= limit, "limit {limit}");
            pages += 1;
            assert!(pages <= 251, "paging with limit {limit} does not end");
            seen.extend(page.records.iter().map(|r| r.id));
            match page.next {
                Some(next) => {
                    assert_eq!(Some(next), page.records.last().map(|r| r.id));
                    assert_eq!(page.records.len(), limit);
                    after = Some(next);
                }
                None => break,
            }
        }
        assert_eq!(seen, expected, "limit {limit}");
        assert_eq!(
            pages,
            expected.len().div_ceil(limit).max(1),
            "limit {limit}"
        );
    }

    let all: Vec<Uuid> = store.all().unwrap().iter().map(|r| r.id).collect();
    assert_eq!(all, expected);
    assert_eq!(store.count().unwrap(), 250);
    // Listing is repeatable: the same call gives the same page.
    assert_eq!(
        store.list(Some(expected[10]), 20).unwrap(),
        store.list(Some(expected[10]), 20).unwrap()
    );
}

#[test]
fn list_after_is_exclusive_even_for_unknown_ids() {
    let (_tmp, store) = fresh();
    for n in [10, 20, 30] {
        store.insert(id(n), &format!("p{n}"), 0).unwrap();
    }
    let ids = |page: Page| page.records.iter().map(|r| r.id).collect::<Vec<Uuid>>();
    assert_eq!(
        ids(store.list(Some(id(10)), 10).unwrap()),
        vec![id(20), id(30)]
    );
    assert_eq!(
        ids(store.list(Some(id(15)), 10).unwrap()),
        vec![id(20), id(30)]
    );
    assert_eq!(
        ids(store.list(Some(id(30)), 10).unwrap()),
        Vec::<Uuid>::new()
    );
    // A zero limit still makes progress.
    let page = store.list(None, 0).unwrap();
    assert_eq!(ids(page.clone()), vec![id(10)]);
    assert_eq!(page.next, Some(id(10)));
}

#[test]
fn duplicate_payload_names_the_existing_record() {
    let (_tmp, store) = fresh();
    store.insert(id(1), "same", 1).unwrap();
    match store.insert(id(2), "same", 2) {
        Err(StoreError::DuplicatePayload { existing }) => assert_eq!(existing, id(1)),
        other => panic!("expected DuplicatePayload, got {other:?}"),
    }
    match store.put(id(2), "same", 2) {
        Err(StoreError::DuplicatePayload { existing }) => assert_eq!(existing, id(1)),
        other => panic!("expected DuplicatePayload, got {other:?}"),
    }
    store.insert(id(2), "other", 2).unwrap();
    match store.patch(id(2), "same", 3) {
        Err(StoreError::DuplicatePayload { existing }) => assert_eq!(existing, id(1)),
        other => panic!("expected DuplicatePayload, got {other:?}"),
    }
    assert_eq!(store.get(id(2)).unwrap().unwrap().payload, "other");
    assert_eq!(store.count().unwrap(), 2);
}

#[test]
fn insert_on_a_taken_id_fails() {
    let (_tmp, store) = fresh();
    store.insert(id(1), "first", 1).unwrap();
    for payload in ["first", "second"] {
        match store.insert(id(1), payload, 2) {
            Err(StoreError::IdExists(taken)) => assert_eq!(taken, id(1)),
            other => panic!("expected IdExists, got {other:?}"),
        }
    }
    assert_eq!(store.get(id(1)).unwrap().unwrap().payload, "first");
}

#[test]
fn put_creates_then_replaces_keeping_created_at() {
    let (_tmp, store) = fresh();
    let (created, outcome) = store.put(id(1), "v1", 100).unwrap();
    assert_eq!(outcome, PutOutcome::Created);
    assert_eq!((created.created_at, created.updated_at), (100, 100));

    let (replaced, outcome) = store.put(id(1), "v2", 200).unwrap();
    assert_eq!(outcome, PutOutcome::Replaced);
    assert_eq!(replaced.payload, "v2");
    assert_eq!(replaced.checksum, checksum_of("v2"));
    assert_eq!((replaced.created_at, replaced.updated_at), (100, 200));
    assert_eq!(replaced.revision, 2);

    // The same payload again is allowed and moves updated_at.
    let (again, outcome) = store.put(id(1), "v2", 300).unwrap();
    assert_eq!(outcome, PutOutcome::Replaced);
    assert_eq!((again.created_at, again.updated_at), (100, 300));
    assert_eq!(again.revision, 3);

    // The old payload's index entry is gone: another id can now hold "v1".
    store.insert(id(2), "v1", 400).unwrap();
    assert_eq!(store.get(id(1)).unwrap(), Some(again));
    assert_eq!(store.checksums.len(), 2);
}

#[test]
fn patch_replaces_existing_and_refuses_missing() {
    let (_tmp, store) = fresh();
    match store.patch(id(9), "x", 1) {
        Err(StoreError::NotFound(missing)) => assert_eq!(missing, id(9)),
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert_eq!(store.count().unwrap(), 0);
    assert_eq!(store.revision().unwrap(), 0);

    store.insert(id(9), "x", 10).unwrap();
    let patched = store.patch(id(9), "y", 20).unwrap();
    assert_eq!((patched.created_at, patched.updated_at), (10, 20));
    assert_eq!(patched.payload, "y");
    let same = store.patch(id(9), "y", 30).unwrap();
    assert_eq!(same.updated_at, 30);
    store.insert(id(10), "x", 40).unwrap();
}

#[test]
fn delete_then_reinsert_the_same_payload() {
    let (_tmp, store) = fresh();
    let record = store.insert(id(1), "payload", 1).unwrap();
    let deleted = store.delete(id(1)).unwrap();
    assert_eq!(deleted, Some(record));
    assert_eq!(store.get(id(1)).unwrap(), None);
    assert_eq!(store.checksums.len(), 0);
    assert_eq!(store.delete(id(1)).unwrap(), None);

    store.insert(id(2), "payload", 2).unwrap();
    store.insert(id(1), "payload 1", 3).unwrap();
    assert_eq!(store.count().unwrap(), 2);
}

/// One step of [`revision_moves_by_one_per_write_and_persists`]: an operation, whether it
/// must succeed, and whether it is a write.
struct Step {
    name: &'static str,
    op: fn(&SledStore) -> Result<(), StoreError>,
    ok: bool,
    writes: bool,
}

#[test]
fn revision_moves_by_one_per_write_and_persists() {
    let steps = [
        Step {
            name: "insert",
            op: |s| s.insert(id(1), "a", 1).map(drop),
            ok: true,
            writes: true,
        },
        Step {
            name: "insert duplicate payload",
            op: |s| s.insert(id(2), "a", 1).map(drop),
            ok: false,
            writes: false,
        },
        Step {
            name: "insert taken id",
            op: |s| s.insert(id(1), "b", 1).map(drop),
            ok: false,
            writes: false,
        },
        Step {
            name: "put create",
            op: |s| s.put(id(2), "b", 2).map(drop),
            ok: true,
            writes: true,
        },
        Step {
            name: "put replace",
            op: |s| s.put(id(2), "c", 3).map(drop),
            ok: true,
            writes: true,
        },
        Step {
            name: "put same payload",
            op: |s| s.put(id(2), "c", 4).map(drop),
            ok: true,
            writes: true,
        },
        Step {
            name: "put payload of another id",
            op: |s| s.put(id(2), "a", 4).map(drop),
            ok: false,
            writes: false,
        },
        Step {
            name: "patch",
            op: |s| s.patch(id(1), "d", 5).map(drop),
            ok: true,
            writes: true,
        },
        Step {
            name: "patch missing",
            op: |s| s.patch(id(3), "e", 5).map(drop),
            ok: false,
            writes: false,
        },
        Step {
            name: "delete",
            op: |s| s.delete(id(1)).map(drop),
            ok: true,
            writes: true,
        },
        Step {
            name: "delete missing",
            op: |s| s.delete(id(1)).map(drop),
            ok: true,
            writes: false,
        },
    ];

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut expected = 0;
    for step in &steps {
        let store = open(&dir);
        let rx = store.subscribe();
        assert_eq!(
            store.revision().unwrap(),
            expected,
            "reopened before {}",
            step.name
        );
        assert_eq!(*rx.borrow(), expected, "watch before {}", step.name);

        let result = (step.op)(&store);
        assert_eq!(result.is_ok(), step.ok, "{}: {result:?}", step.name);
        if step.writes {
            expected += 1;
        }
        assert_eq!(store.revision().unwrap(), expected, "after {}", step.name);
        assert_eq!(*rx.borrow(), expected, "watch after {}", step.name);
    }
    let store = open(&dir);
    assert_eq!(store.revision().unwrap(), 6);
    assert_eq!(store.get(id(2)).unwrap().unwrap().revision, 4);
}

#[test]
fn epoch_persists_and_differs_between_stores() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let epoch_a = open(&a).epoch();
    let epoch_b = open(&b).epoch();
    assert_ne!(epoch_a, epoch_b);
    assert_ne!(epoch_a, Uuid::nil());
    assert_eq!(open(&a).epoch(), epoch_a);
    assert_eq!(open(&b).epoch(), epoch_b);
}

#[cfg(unix)]
#[test]
fn open_creates_a_private_directory() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nested").join("data");
    let _store = open(&dir);
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "mode {mode:o}");
}

#[test]
fn open_on_a_file_is_an_io_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("not-a-dir");
    std::fs::write(&file, b"not a directory").unwrap();
    match SledStore::open(&file) {
        Err(err @ StoreError::Io { .. }) => {
            assert!(err.to_string().contains("not-a-dir"), "{err}");
        }
        Err(other) => panic!("expected Io, got {other}"),
        Ok(_) => panic!("opened a store in a regular file"),
    }
}

#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    let (tmp, _store) = fresh();
    match SledStore::open(&tmp.path().join("data")) {
        Err(err @ StoreError::Backend(_)) => {
            let message = err.to_string();
            assert!(message.contains("could not acquire lock"), "{message}");
            assert!(message.contains("another charter-cp"), "{message}");
        }
        Err(other) => panic!("expected Backend, got {other}"),
        Ok(_) => panic!("opened a store that is already open"),
    }
}

#[test]
fn the_store_is_usable_as_a_trait_object() {
    let (_tmp, store) = fresh();
    let store: Arc<dyn LicenseStore> = Arc::new(store);
    store.insert(id(1), "a", 1).unwrap();
    assert_eq!(store.count().unwrap(), 1);
}

#[test]
fn subscribe_sees_every_write() {
    let (_tmp, store) = fresh();
    let mut rx = store.subscribe();
    assert_eq!(*rx.borrow_and_update(), 0);
    store.insert(id(1), "a", 1).unwrap();
    assert!(rx.has_changed().unwrap());
    assert_eq!(*rx.borrow_and_update(), 1);
    store.delete(id(2)).unwrap();
    assert!(
        !rx.has_changed().unwrap(),
        "a delete of nothing is not a write"
    );
}

#[test]
fn changes_since_names_every_write_after_a_revision() {
    let (tmp, store) = fresh();
    let check = |since: u64, revision: u64, ids: Option<Vec<Uuid>>| {
        assert_eq!(
            store.changes_since(since),
            crate::Changes { revision, ids },
            "since {since}"
        );
    };
    check(0, 0, Some(vec![]));
    store.insert(id(1), "a", 1).unwrap();
    store.put(id(2), "b", 2).unwrap();
    store.patch(id(1), "c", 3).unwrap();
    store.delete(id(2)).unwrap();
    store.delete(id(3)).unwrap(); // not a write
    assert!(store.insert(id(1), "d", 4).is_err()); // not a write either
    check(0, 4, Some(vec![id(1), id(2), id(1), id(2)]));
    check(2, 4, Some(vec![id(1), id(2)]));
    check(4, 4, Some(vec![]));
    check(5, 4, None); // never published: start over

    // A reopened store remembers nothing before its first write.
    drop(store);
    let store = open(&tmp.path().join("data"));
    assert_eq!(store.changes_since(4).ids, Some(vec![]));
    assert_eq!(store.changes_since(3).ids, None);
    store.insert(id(9), "e", 5).unwrap();
    assert_eq!(store.changes_since(4).ids, Some(vec![id(9)]));
    assert_eq!(store.changes_since(3).ids, None);
}

#[test]
fn a_directory_is_fsynced_again_whenever_its_entries_change() {
    use crate::sled_store::{list_dir, SyncedDir};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("a"), "a").unwrap();
    let mut synced = SyncedDir::default();
    synced.sync(dir, list_dir(dir).unwrap()).unwrap();
    let first = synced.listing.clone().expect("recorded after an fsync");
    assert_eq!(first.len(), 1);
    // A file's content is not an entry: nothing to record.
    std::fs::write(dir.join("a"), "longer").unwrap();
    assert_eq!(list_dir(dir).unwrap(), first);
    // A new name, a name replaced by another inode, a removal: each is a change.
    std::fs::write(dir.join("b"), "b").unwrap();
    let with_b = list_dir(dir).unwrap();
    assert_ne!(with_b, first);
    synced.sync(dir, with_b.clone()).unwrap();
    assert_eq!(synced.listing.as_ref(), Some(&with_b));
    std::fs::write(dir.join("c"), "c").unwrap();
    std::fs::rename(dir.join("c"), dir.join("a")).unwrap();
    let renamed = list_dir(dir).unwrap();
    assert_eq!(renamed.len(), 2);
    assert_ne!(renamed, with_b, "same names, but `a` is another inode");
    synced.sync(dir, renamed.clone()).unwrap();
    assert_eq!(
        synced.listing.as_ref(),
        Some(&renamed),
        "the change is synced and recorded"
    );
    std::fs::remove_file(dir.join("b")).unwrap();
    let removed = list_dir(dir).unwrap();
    assert_ne!(removed, renamed);
    synced.sync(dir, removed.clone()).unwrap();
    assert_eq!(synced.listing.as_ref(), Some(&removed));
    // A listing that no longer matches the directory when the fsync ends is not recorded,
    // so the next write fsyncs again.
    synced.sync(dir, renamed.clone()).unwrap();
    assert_eq!(
        synced.listing, None,
        "a stale listing is never taken as synced"
    );
}

#[test]
fn changes_since_forgets_beyond_its_length() {
    // Thousands of fsynced writes would make this slow, so it drives the log directly.
    let total = super::sled_store::CHANGE_LOG_LEN as u64 + 3;
    let mut log = super::sled_store::ChangeLog::new(10);
    for revision in 11..=10 + total {
        log.publish(revision, id(u128::from(revision)));
    }
    assert_eq!(log.since(10).ids, None);
    assert_eq!(
        log.since(13).ids.map(|ids| ids.len()),
        Some(total as usize - 3)
    );
    assert_eq!(log.since(12).ids, None);
    // A revision that was never published (a failed flush) drops what came before.
    log.publish(20 + total, id(1));
    assert_eq!(log.since(10 + total).ids, None);
    assert_eq!(log.since(19 + total).ids, Some(vec![id(1)]));
}

#[tokio::test]
async fn subscriber_wakes_on_a_write_from_another_thread() {
    let (_tmp, store) = fresh();
    let store = Arc::new(store);
    let mut rx = store.subscribe();
    let writer = {
        let store = Arc::clone(&store);
        std::thread::spawn(move || store.insert(id(1), "a", 1).map(drop))
    };
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .expect("no revision within 10 s")
        .unwrap();
    assert_eq!(*rx.borrow(), 1);
    writer.join().unwrap().unwrap();
}

#[test]
fn concurrent_inserts_all_land_with_distinct_revisions() {
    const THREADS: u128 = 8;
    const PER_THREAD: u128 = 20;
    let (_tmp, store) = fresh();
    let store = Arc::new(store);
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                (0..PER_THREAD)
                    .map(|n| {
                        let record = store
                            .insert(id(t * 1000 + n), &format!("t{t} n{n}"), 0)
                            .unwrap();
                        (record.id, record.revision)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let results: Vec<(Uuid, u64)> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();

    let total = u64::try_from(THREADS * PER_THREAD).unwrap();
    let revisions: BTreeSet<u64> = results.iter().map(|&(_, r)| r).collect();
    assert_eq!(revisions, (1..=total).collect());
    assert_eq!(store.revision().unwrap(), total);
    assert_eq!(store.count().unwrap(), total);
    for (id, revision) in results {
        assert_eq!(store.get(id).unwrap().unwrap().revision, revision);
    }
}

#[test]
fn large_payloads_survive_reopen() {
    // Over a quarter of sled's 512 KiB segment, so sled stores it as a blob file.
    let payload = "x".repeat(300 * 1024);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    {
        let store = open(&dir);
        store.insert(id(1), &payload, 1).unwrap();
        store.put(id(1), &format!("{payload}y"), 2).unwrap();
    }
    let store = open(&dir);
    let record = store.get(id(1)).unwrap().unwrap();
    assert_eq!(record.payload.len(), payload.len() + 1);
    assert_eq!(record.checksum, checksum_of(&record.payload));
}

#[test]
fn undecodable_records_are_corrupt_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    {
        let store = open(&dir);
        store.insert(id(1), "fine", 1).unwrap();
        store.insert(id(2), "tampered", 1).unwrap();
    }
    {
        // Damaged behind the store's back after a reopen, whose fresh log holds nothing
        // that a replay would write over the damage with.
        let store = open(&dir);
        let mut bad = store.get(id(2)).unwrap().unwrap();
        bad.payload = "changed behind the store's back".to_string();
        store
            .licenses
            .insert(id(2).as_bytes(), serde_json::to_vec(&bad).unwrap())
            .unwrap();
        store
            .licenses
            .insert(id(3).as_bytes(), b"not json".as_slice())
            .unwrap();
        store.licenses.insert(b"short", b"{}".as_slice()).unwrap();
        store.db.flush().unwrap();
    }
    let store = open(&dir);
    let corrupt = |result: Result<Option<LicenseRecord>, StoreError>| match result {
        Err(StoreError::Corrupt(message)) => message,
        other => panic!("expected Corrupt, got {other:?}"),
    };
    assert!(store.get(id(1)).unwrap().is_some());
    let message = corrupt(store.get(id(2)));
    assert!(message.contains(&id(2).to_string()), "{message}");
    assert!(message.contains("checksum"), "{message}");
    let message = corrupt(store.get(id(3)));
    assert!(message.contains(&id(3).to_string()), "{message}");
    assert!(message.contains("JSON"), "{message}");

    let message = match store.all() {
        Err(StoreError::Corrupt(message)) => message,
        other => panic!("expected Corrupt, got {other:?}"),
    };
    assert!(message.contains(&id(2).to_string()), "{message}");
    match store.list(None, 100) {
        Err(StoreError::Corrupt(_)) => {}
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // Writes that would need the broken record refuse instead of guessing.
    match store.put(id(3), "new", 2) {
        Err(StoreError::Corrupt(message)) => assert!(message.contains(&id(3).to_string())),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // A key that is not an id is named too.
    store.licenses.remove(id(2).as_bytes()).unwrap();
    store.licenses.remove(id(3).as_bytes()).unwrap();
    match store.all() {
        Err(StoreError::Corrupt(message)) => assert!(message.contains("short"), "{message}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn corrupt_meta_is_refused_on_open() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    {
        let store = open(&dir);
        store.meta.insert(b"revision", b"bad".as_slice()).unwrap();
        store.db.flush().unwrap();
    }
    match SledStore::open(&dir) {
        Err(StoreError::Corrupt(message)) => assert!(message.contains("revision"), "{message}"),
        Err(other) => panic!("expected Corrupt, got {other}"),
        Ok(_) => panic!("opened a store with a corrupt revision"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Any payload and any timestamp round-trip, and nothing panics.
    #[test]
    fn any_payload_round_trips(payload in any::<String>(), now in any::<i64>(), later in any::<i64>()) {
        let (_tmp, store) = fresh();
        let id = Uuid::new_v4();
        let record = store.insert(id, &payload, now).unwrap();
        prop_assert_eq!(&record.payload, &payload);
        prop_assert_eq!(store.get(id).unwrap(), Some(record.clone()));
        let (replaced, _) = store.put(id, &payload, later).unwrap();
        prop_assert_eq!((replaced.created_at, replaced.updated_at), (now, later));
        prop_assert_eq!(store.delete(id).unwrap(), Some(replaced));
        prop_assert_eq!(store.revision().unwrap(), 3);
    }
}

/// Set in the re-executed test binary to make [`acknowledged_writes_survive_sigkill`] act
/// as the writer to be killed, on the data directory named by its value.
const CRASH_CHILD_ENV: &str = "CHARTER_STORE_CRASH_CHILD_DIR";
const CRASH_TEST_NAME: &str = "tests::acknowledged_writes_survive_sigkill";

/// Kills the child on drop, so a failing test never leaves a writer running.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Parses a child's `ACK <id> <revision>` line.
fn parse_ack(line: &str) -> Option<(Uuid, u64)> {
    let mut words = line.strip_prefix("ACK ")?.split(' ');
    let id = words.next()?.parse().ok()?;
    let revision = words.next()?.trim().parse().ok()?;
    Some((id, revision))
}

/// The writer: opens the store and inserts records until killed, printing each
/// acknowledged one.
fn crash_child(dir: &Path) {
    // The store waits for the lock if the parent's handle on it is still closing.
    let store = SledStore::open(dir).expect("crash child opens the store");
    let mut out = std::io::stdout().lock();
    // Bounded, so a writer whose parent vanished without killing it stops on its own.
    for n in 0..100_000u32 {
        let id = Uuid::new_v4();
        let record = store
            .insert(id, &format!("crash payload {n} {id}"), i64::from(n))
            .expect("insert");
        if writeln!(out, "ACK {id} {}", record.revision)
            .and_then(|()| out.flush())
            .is_err()
        {
            return;
        }
    }
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    if let Some(dir) = std::env::var_os(CRASH_CHILD_ENV) {
        crash_child(Path::new(&dir));
        return;
    }

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let exe = std::env::current_exe().unwrap();
    let epoch = open(&dir).epoch();
    let mut acked: Vec<(Uuid, u64)> = Vec::new();
    let mut last_revision = 0;

    for cycle in 0u64..20 {
        let mut child = KillOnDrop(
            Command::new(&exe)
                .args([
                    "--exact",
                    CRASH_TEST_NAME,
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CRASH_CHILD_ENV, &dir)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        );
        let stdout = child.0.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(ack) = parse_ack(&line) {
                    if tx.send(ack).is_err() {
                        break;
                    }
                }
            }
        });

        // Kill at varying moments: after a varying number of acknowledged writes, plus a
        // varying delay so that the kill lands at different points of the next write.
        let wait_for = 1 + (cycle * 7) % 13;
        for _ in 0..wait_for {
            let ack = rx
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|e| panic!("cycle {cycle}: no acknowledgement from child: {e}"));
            acked.push(ack);
        }
        std::thread::sleep(Duration::from_micros((cycle * 997) % 4000));
        child.0.kill().unwrap();
        child.0.wait().unwrap();
        reader.join().unwrap();
        // Everything printed before the kill was acknowledged too.
        acked.extend(rx.try_iter());

        let store = open(&dir);
        assert_eq!(store.epoch(), epoch, "cycle {cycle}");
        let revision = store.revision().unwrap();
        assert!(
            revision >= last_revision,
            "cycle {cycle}: revision went from {last_revision} back to {revision}"
        );
        for &(id, acked_revision) in &acked {
            let record = store
                .get(id)
                .unwrap()
                .unwrap_or_else(|| panic!("cycle {cycle}: acknowledged {id} is lost"));
            assert_eq!(record.revision, acked_revision, "cycle {cycle}: {id}");
            assert!(acked_revision <= revision, "cycle {cycle}: {id}");
        }
        // The index and the records agree after every crash.
        let all = store.all().unwrap();
        assert_eq!(store.checksums.len(), all.len(), "cycle {cycle}");
        assert_eq!(
            store.count().unwrap(),
            revision,
            "cycle {cycle}: only inserts ran"
        );
        last_revision = revision;
    }
    assert!(acked.len() >= 20);
}

#[test]
fn data_plane_inventory_is_kept_and_purged() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let store = SledStore::open(dir.path()).expect("open");
    let revision = store.revision().expect("revision");
    let dp = |id: &str, last_seen: i64| crate::DataPlaneRecord {
        id: id.to_owned(),
        ip: "127.0.0.1".to_owned(),
        hostname: "host".to_owned(),
        version: "0.1.0".to_owned(),
        labels: [("zone".to_owned(), "a".to_owned())].into(),
        last_seen,
        sync_status: "in_sync".to_owned(),
        license_id: None,
        license_revision: 0,
        license_status: "unlicensed".to_owned(),
        last_error: None,
        upstream: String::new(),
    };
    store.put_data_plane(&dp("a", 100)).expect("put");
    store.put_data_plane(&dp("b", 200)).expect("put");
    store.put_data_plane(&dp("a", 300)).expect("replace");
    assert_eq!(
        store.data_planes().expect("list"),
        vec![dp("a", 300), dp("b", 200)]
    );
    assert_eq!(
        store.revision().expect("revision"),
        revision,
        "inventory does not move the license revision"
    );
    assert_eq!(store.purge_data_planes(250).expect("purge"), 1);
    assert_eq!(store.data_planes().expect("list"), vec![dp("a", 300)]);
    store
        .put_data_planes(&[dp("c", 400), dp("a", 500)])
        .expect("batch");
    assert_eq!(
        store.data_planes().expect("list"),
        vec![dp("a", 500), dp("c", 400)],
        "a batch inserts and replaces"
    );
    store.put_data_planes(&[]).expect("an empty batch");
    drop(store);
    let store = SledStore::open(dir.path()).expect("reopen");
    assert_eq!(
        store.data_planes().expect("list"),
        vec![dp("a", 500), dp("c", 400)]
    );
}

#[test]
fn telemetry_is_applied_exactly_once_and_survives_reopen() {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let store = SledStore::open(dir.path()).expect("open");
    let revision = store.revision().expect("revision");
    let batch = |n: u64| vec![("2026-11".to_owned(), n), ("2026-12".to_owned(), 1)];
    assert!(store.apply_telemetry("dp-1", 1, &batch(10)).expect("apply"));
    assert!(
        !store
            .apply_telemetry("dp-1", 1, &batch(10))
            .expect("resend"),
        "a resend is not applied again"
    );
    assert!(
        !store.apply_telemetry("dp-1", 0, &batch(99)).expect("old"),
        "an older seq is not applied"
    );
    assert!(store.apply_telemetry("dp-1", 2, &batch(5)).expect("apply"));
    assert!(store
        .apply_telemetry("dp-2", 1, &batch(7))
        .expect("another node"));
    assert_eq!(
        store.revision().expect("revision"),
        revision,
        "telemetry does not move the license revision"
    );
    drop(store);
    let store = SledStore::open(dir.path()).expect("reopen");
    let usage = store.usage().expect("usage");
    assert_eq!(usage.len(), 2);
    assert_eq!(usage[0].node_id, "dp-1");
    assert_eq!(usage[0].last_seq, 2);
    assert_eq!(usage[0].buckets["2026-11"], 15);
    assert_eq!(usage[0].buckets["2026-12"], 2);
    assert_eq!(usage[1].buckets["2026-11"], 7);
}

const REPLAY_WRITES: u128 = 40;

/// Opens a store whose sled is made durable only at checkpoints.
fn open_unflushed(dir: &Path, wal_capacity: u64) -> SledStore {
    let tuning = crate::sled_store::Tuning {
        wal_capacity,
        sled_flush_every_ms: None,
    };
    SledStore::open_tuned(dir, tuning).expect("open store")
}

/// Acknowledged writes of every kind, checked by [`check_logged_writes`].
fn make_logged_writes(store: &SledStore) {
    for n in 1..=REPLAY_WRITES {
        // About 1 KiB each, so a 16 KiB log holds a handful.
        store
            .insert(id(n), &format!("{n:0>1000}"), n as i64)
            .expect("insert");
    }
    store.put(id(1), "replaced", 100).expect("put");
    store.patch(id(2), "patched", 101).expect("patch");
    store.delete(id(3)).expect("delete");
    assert!(store
        .apply_telemetry("dp-1", 1, &[("2026-11".to_owned(), 42)])
        .expect("telemetry"));
}

/// Checks the state [`make_logged_writes`] left, then writes once more.
fn check_logged_writes(store: &SledStore) {
    let writes = REPLAY_WRITES as u64 + 3;
    assert_eq!(store.revision().unwrap(), writes);
    assert_eq!(store.count().unwrap(), writes - 3 - 1 + 1 - 1);
    let one = store.get(id(1)).unwrap().unwrap();
    assert_eq!(
        (one.payload.as_str(), one.created_at, one.updated_at),
        ("replaced", 1, 100)
    );
    assert_eq!(store.get(id(2)).unwrap().unwrap().revision, writes - 1);
    assert_eq!(store.get(id(3)).unwrap(), None);
    for n in 4..=REPLAY_WRITES {
        let record = store.get(id(n)).unwrap().unwrap();
        assert_eq!((record.revision, record.created_at), (n as u64, n as i64));
    }
    // The index followed every write: the old payloads of 1 and 2 and the deleted 3 are
    // free again, the current ones taken.
    assert_eq!(store.checksums.len(), store.all().unwrap().len());
    store.insert(id(1001), &format!("{:0>1000}", 1), 1).unwrap();
    assert!(matches!(
        store.insert(id(1002), "patched", 1),
        Err(StoreError::DuplicatePayload { existing }) if existing == id(2)
    ));
    let usage = store.usage().unwrap();
    assert_eq!(usage[0].buckets["2026-11"], 42);
    assert_eq!(store.revision().unwrap(), writes + 1);
}

/// Copies the regular files of `from` (sled's `conf`, `db`, snapshots, the log) to `to`.
fn copy_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

#[test]
fn acknowledged_writes_are_replayed_from_the_log_when_sled_lost_them() {
    // What a power cut can leave of a store whose sled was last made durable at `open`:
    // sled's files as they were then, and the log as it is now. (sled writes its buffers
    // out on its own, so a process crash mostly leaves it less to lose; the SIGKILL test
    // covers that case.)
    let tmp = tempfile::tempdir().unwrap();
    let live = tmp.path().join("live");
    let cut = tmp.path().join("cut");
    let store = open_unflushed(&live, crate::wal::DEFAULT_CAPACITY);
    copy_files(&live, &cut);
    make_logged_writes(&store);
    std::fs::copy(
        live.join(crate::wal::WAL_FILE),
        cut.join(crate::wal::WAL_FILE),
    )
    .unwrap();

    let recovered = open(&cut);
    assert_eq!(
        recovered.replayed(),
        REPLAY_WRITES as usize + 4,
        "every write came from the log"
    );
    check_logged_writes(&recovered);
    drop(recovered);
    // The replay was made durable and the log started again, and the clean close
    // checkpointed the write `check_logged_writes` made since: nothing to replay.
    let reopened = open(&cut);
    assert_eq!(reopened.replayed(), 0);
    assert_eq!(reopened.revision().unwrap(), REPLAY_WRITES as u64 + 4);
}

#[test]
fn a_full_log_checkpoints_and_loses_nothing() {
    // A 16 KiB log holds about a dozen of these 1 KiB writes: past that, each write that
    // does not fit makes sled durable and starts the log's next generation.
    let tmp = tempfile::tempdir().unwrap();
    let live = tmp.path().join("live");
    let cut = tmp.path().join("cut");
    let store = open_unflushed(&live, 16 * 1024);
    let write = |n: u128| {
        store.insert(id(n), &format!("{n:0>1000}"), 1).unwrap();
        n
    };
    let mut n = 0;
    while store.checkpoints() < 2 {
        n = write(n + 1);
    }
    // Just after a checkpoint: sled's files as they are now are what it made durable, and
    // what a power cut keeps of sled until the next one.
    copy_files(&live, &cut);
    let at_checkpoint = n;
    for _ in 0..5 {
        n = write(n + 1);
    }
    assert_eq!(store.checkpoints(), 2, "the next five fit in the log");
    std::fs::copy(
        live.join(crate::wal::WAL_FILE),
        cut.join(crate::wal::WAL_FILE),
    )
    .unwrap();

    let recovered = open(&cut);
    assert!(
        recovered.replayed() >= 5,
        "the writes since the checkpoint come from the log ({} replayed)",
        recovered.replayed()
    );
    assert!(
        at_checkpoint > 2,
        "two checkpoints took {at_checkpoint} writes"
    );
    assert_eq!(recovered.revision().unwrap(), n as u64);
    for n in 1..=n {
        assert_eq!(
            recovered.get(id(n)).unwrap().map(|r| r.revision),
            Some(n as u64),
            "write {n}"
        );
    }
}

#[test]
fn the_log_ends_at_a_torn_record_or_one_of_an_older_generation() {
    use crate::wal::{self, Appended, Entry, Op, TreeTag, Wal, HEADER_LEN, WAL_FILE};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let entry = |lsn: u64, value: &[u8]| Entry {
        lsn,
        ops: vec![
            Op {
                tree: TreeTag::Licenses,
                key: b"k".into(),
                value: Some(value.into()),
            },
            Op {
                tree: TreeTag::Checksums,
                key: b"gone".into(),
                value: None,
            },
        ],
    };
    let mut log = Wal::create(dir, 1024 * 16).unwrap();
    assert_eq!(
        std::fs::metadata(dir.join(WAL_FILE)).unwrap().len(),
        16 * 1024,
        "the log is written full size up front"
    );
    assert_eq!(wal::recover(dir).unwrap(), vec![]);
    let entries: Vec<Entry> = (1..=3).map(|lsn| entry(lsn, &[lsn as u8; 100])).collect();
    for e in &entries {
        assert_eq!(log.append(e).unwrap(), Appended::Durable);
    }
    assert_eq!(wal::recover(dir).unwrap(), entries);
    // One that does not fit in what is left is refused whole, and the log is unchanged;
    // one larger than the whole log is an error.
    assert_eq!(log.append(&entry(4, &[0; 12_000])).unwrap(), Appended::Full);
    assert!(matches!(
        log.append(&entry(4, &[0; 20 * 1024])),
        Err(StoreError::TooLarge { .. })
    ));
    assert_eq!(wal::recover(dir).unwrap(), entries);

    // A flipped bit in the third record ends the log after the second.
    let path = dir.join(WAL_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let record_len = wal::encode(1, &entries[0]).len();
    let third = HEADER_LEN as usize + 2 * record_len;
    bytes[third + 40] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(wal::recover(dir).unwrap(), entries[..2]);
    // A record cut short likewise.
    bytes[third + 40] ^= 1;
    bytes[third + record_len - 1..third + record_len].fill(0);
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(wal::recover(dir).unwrap(), entries[..2]);

    // A new generation makes every earlier record obsolete; its own records are read, and
    // the older ones behind them are not.
    let mut log = Wal::create(dir, 1024 * 16).unwrap();
    for e in &entries {
        log.append(e).unwrap();
    }
    log.restart().unwrap();
    assert_eq!(wal::recover(dir).unwrap(), vec![]);
    // Of the same size, so an intact record of the older generation follows it.
    let newer = entry(9, &[9; 100]);
    log.append(&newer).unwrap();
    assert_eq!(wal::recover(dir).unwrap(), vec![newer]);

    // A broken header means no log: it is only ever replaced once sled is durable.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[9] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(wal::recover(dir).unwrap(), vec![]);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(wal::recover(dir).unwrap(), vec![]);
}

#[test]
fn a_log_record_that_checks_but_does_not_decode_is_corrupt() {
    use crate::wal::{self, Entry, Op, TreeTag, Wal, HEADER_LEN, WAL_FILE};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut log = Wal::create(dir, 16 * 1024).unwrap();
    let entry = Entry {
        lsn: 1,
        ops: vec![Op {
            tree: TreeTag::Meta,
            key: b"k".into(),
            value: None,
        }],
    };
    log.append(&entry).unwrap();
    // An unknown tree tag, with the CRC made to match: a bug or a foreign writer, not a
    // torn write, so it is reported rather than taken as the end of the log.
    let path = dir.join(WAL_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = HEADER_LEN as usize;
    let len = wal::encode(1, &entry).len();
    bytes[at + 24] = 9;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&bytes[at..at + 20]);
    crc.update(&bytes[at + 24..at + len]);
    bytes[at + 20..at + 24].copy_from_slice(&crc.finalize().to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    match wal::recover(dir) {
        Err(StoreError::Corrupt(message)) => {
            assert!(message.contains("unknown tree tag 9"), "{message}");
            assert!(message.contains("offset 4096"), "{message}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn a_write_larger_than_the_log_is_refused_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let store = open_unflushed(&dir, 16 * 1024);
    store.insert(id(1), "small one", 1).unwrap();
    let big = "b".repeat(40 * 1024);
    match store.insert(id(2), &big, 2) {
        Err(StoreError::TooLarge { bytes, limit }) => {
            assert!(bytes > 40 * 1024, "{bytes}");
            assert_eq!(limit, 16 * 1024 - crate::wal::HEADER_LEN);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    match store.put(id(1), &big, 2) {
        Err(StoreError::TooLarge { .. }) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(store.get(id(2)).unwrap(), None);
    assert_eq!(store.get(id(1)).unwrap().unwrap().payload, "small one");
    assert_eq!(store.revision().unwrap(), 1);
    store.insert(id(3), "small three", 3).unwrap();
    assert_eq!(
        crate::wal::recover(&dir).unwrap().len(),
        2,
        "two writes logged"
    );
    drop(store);
    // A clean close checkpoints: sled holds both, and the log nothing.
    assert_eq!(crate::wal::recover(&dir).unwrap(), vec![]);
    let store = open(&dir);
    assert_eq!(store.revision().unwrap(), 2);
    assert_eq!(store.all().unwrap().len(), 2);
}

#[test]
fn damage_in_the_middle_of_the_log_is_corrupt_not_an_end() {
    use crate::wal::{self, Entry, Op, TreeTag, Wal, HEADER_LEN, WAL_FILE};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut log = Wal::create(dir, 16 * 1024).unwrap();
    let entries: Vec<Entry> = (1..=3)
        .map(|lsn| Entry {
            lsn,
            ops: vec![Op {
                tree: TreeTag::Licenses,
                key: b"k".into(),
                value: Some(vec![lsn as u8; 100].into()),
            }],
        })
        .collect();
    for e in &entries {
        log.append(e).unwrap();
    }
    let path = dir.join(WAL_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let record_len = wal::encode(1, &entries[0]).len();
    // A flipped bit in the second record, with an intact third behind it.
    bytes[HEADER_LEN as usize + record_len + 40] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    match wal::recover(dir) {
        Err(StoreError::Corrupt(message)) => {
            assert!(
                message.contains(&format!("offset {}", HEADER_LEN as usize + record_len)),
                "{message}"
            );
            assert!(message.contains("intact later one"), "{message}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}
