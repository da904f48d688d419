//! The sled backend against the [`Store`] contract, on real sled databases in temp dirs.

use std::sync::Arc;

use tempfile::TempDir;
use uuid::Uuid;

use crate::{
    checksum_of, legacy, Change, DataPlaneRecord, LicenseRecord, Report, SledStore, Store,
    StoreError,
};

fn record(n: u8, payload: &str, now: i64) -> LicenseRecord {
    LicenseRecord {
        id: Uuid::from_bytes([n; 16]),
        payload: payload.to_owned(),
        checksum: checksum_of(payload),
        created_at: now,
        updated_at: now,
        revision: 0,
    }
}

fn row(id: &str, last_seen: i64) -> DataPlaneRecord {
    DataPlaneRecord {
        id: id.to_owned(),
        ip: "127.0.0.1".to_owned(),
        hostname: "h".to_owned(),
        version: "0.1.0".to_owned(),
        labels: Default::default(),
        last_seen,
        sync_status: "in_sync".to_owned(),
        license_id: None,
        license_revision: 0,
        license_status: "unlicensed".to_owned(),
        last_error: None,
        upstream: String::new(),
        control_plane: "cp-a".to_owned(),
    }
}

fn report(node: &str, seq: u64, count: u64) -> Report {
    Report {
        node_id: node.to_owned(),
        seq,
        counters: vec![("2026-12".to_owned(), count)],
    }
}

#[tokio::test]
async fn a_fresh_store_keeps_its_epoch_and_revision_across_reopens() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("cp");
    let store = SledStore::open(&path).unwrap();
    let loaded = store.load().await.unwrap();
    assert_eq!((loaded.revision, loaded.licenses.len()), (0, 0));
    assert_eq!(loaded.epoch, store.epoch());
    assert_ne!(loaded.epoch, Uuid::nil());
    store
        .commit(0, Change::Put(record(1, "a", 10)))
        .await
        .unwrap();
    store.close().await.unwrap();
    drop(store);
    let again = SledStore::open(&path).unwrap();
    let reloaded = again.load().await.unwrap();
    assert_eq!(reloaded.epoch, loaded.epoch, "the epoch is kept");
    assert_eq!(reloaded.revision, 1);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "the data dir is private");
}

#[tokio::test]
async fn every_commit_bumps_the_revision_once_and_load_sees_it() {
    let dir = TempDir::new().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let mut revisions = store.subscribe();
    assert_eq!(
        store
            .commit(0, Change::Put(record(1, "a", 10)))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store
            .commit(1, Change::Put(record(2, "b", 11)))
            .await
            .unwrap(),
        2
    );
    let mut replaced = record(1, "a2", 12);
    replaced.created_at = 10;
    assert_eq!(store.commit(2, Change::Put(replaced)).await.unwrap(), 3);
    assert!(revisions.has_changed().unwrap());
    assert_eq!(*revisions.borrow_and_update(), 3);
    let loaded = store.load().await.unwrap();
    assert_eq!(loaded.revision, 3);
    let summary: Vec<_> = loaded
        .licenses
        .iter()
        .map(|r| {
            (
                r.id.as_bytes()[0],
                r.payload.as_str(),
                r.created_at,
                r.revision,
            )
        })
        .collect();
    assert_eq!(summary, vec![(1, "a2", 10, 3), (2, "b", 11, 2)]);
    assert_eq!(
        store
            .commit(3, Change::Delete(Uuid::from_bytes([2; 16])))
            .await
            .unwrap(),
        4
    );
    let loaded = store.load().await.unwrap();
    assert_eq!((loaded.revision, loaded.licenses.len()), (4, 1));
}

#[tokio::test]
async fn a_commit_on_a_stale_revision_is_a_conflict_and_changes_nothing() {
    let dir = TempDir::new().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    store
        .commit(0, Change::Put(record(1, "a", 10)))
        .await
        .unwrap();
    let err = store
        .commit(0, Change::Put(record(2, "b", 10)))
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
    assert!(!err.is_unknown_outcome());
    let loaded = store.load().await.unwrap();
    assert_eq!((loaded.revision, loaded.licenses.len()), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_one_base_have_exactly_one_winner() {
    let dir = TempDir::new().unwrap();
    let store = Arc::new(SledStore::open(dir.path()).unwrap());
    for round in 0..10u8 {
        let base = store.load().await.unwrap().revision;
        let tasks: Vec<_> = (0..4u8)
            .map(|w| {
                let store = store.clone();
                tokio::spawn(async move {
                    let n = round * 4 + w;
                    store
                        .commit(base, Change::Put(record(n, &format!("p{n}"), 1)))
                        .await
                })
            })
            .collect();
        let mut won = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(revision) => {
                    assert_eq!(revision, base + 1);
                    won += 1;
                }
                Err(StoreError::Conflict { .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(won, 1, "round {round}");
    }
    assert_eq!(store.load().await.unwrap().licenses.len(), 10);
}

#[tokio::test]
async fn a_failed_fsync_refuses_every_later_write_until_a_restart() {
    let dir = TempDir::new().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    store
        .commit(0, Change::Put(record(1, "kept", 10)))
        .await
        .unwrap();
    store.faults().fail_fsync(true);
    let err = store
        .commit(1, Change::Put(record(2, "unknown", 11)))
        .await
        .unwrap_err();
    assert!(err.is_unknown_outcome(), "{err:?}");
    assert!(err.to_string().contains("fsyncing"), "{err}");
    // The fault is gone, but the store does not retry as if nothing happened.
    store.faults().fail_fsync(false);
    for attempt in [
        store
            .commit(1, Change::Put(record(3, "refused", 12)))
            .await
            .map(|_| ()),
        store
            .apply_telemetry(vec![report("dp", 1, 1)])
            .await
            .map(|_| ()),
        store.put_data_planes(vec![row("dp", 1)].into()).await,
        store.check().await,
    ] {
        let err = attempt.unwrap_err();
        assert!(matches!(err, StoreError::Failed(_)), "{err:?}");
        assert!(err.to_string().contains("restart"), "{err}");
    }
    assert!(matches!(
        store.load().await.unwrap_err(),
        StoreError::Failed(_)
    ));
    store.close().await.unwrap();
    drop(store);

    // A restart reads what is on disk: the acknowledged write, and the failed one or not.
    let store = SledStore::open(dir.path()).unwrap();
    let loaded = store.load().await.unwrap();
    let payloads: Vec<&str> = loaded.licenses.iter().map(|r| r.payload.as_str()).collect();
    assert!(payloads.contains(&"kept"), "{payloads:?}");
    assert!(!payloads.contains(&"refused"), "{payloads:?}");
    let next = store
        .commit(loaded.revision, Change::Put(record(4, "after", 13)))
        .await
        .unwrap();
    assert_eq!(next, loaded.revision + 1);
}

#[tokio::test]
async fn telemetry_is_applied_exactly_once_per_node_and_seq_in_one_batch() {
    let dir = TempDir::new().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let applied = store
        .apply_telemetry(vec![
            report("a", 1, 5),
            report("b", 1, 7),
            report("a", 2, 3),
            report("a", 2, 3),
            report("a", 1, 100),
        ])
        .await
        .unwrap();
    assert_eq!(applied, vec![true, true, true, false, false]);
    let applied = store
        .apply_telemetry(vec![report("a", 2, 50), report("b", 2, 1)])
        .await
        .unwrap();
    assert_eq!(applied, vec![false, true]);
    let mut usage = store.usage().await.unwrap();
    usage.sort_by(|x, y| x.node_id.cmp(&y.node_id));
    let totals: Vec<_> = usage
        .iter()
        .map(|u| (u.node_id.as_str(), u.last_seq, u.buckets["2026-12"]))
        .collect();
    assert_eq!(totals, vec![("a", 2, 8), ("b", 2, 8)]);
    assert_eq!(
        store.load().await.unwrap().revision,
        0,
        "telemetry moves no revision"
    );
}

#[tokio::test]
async fn a_node_id_is_data_whatever_bytes_it_holds() {
    let dir = TempDir::new().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let odd = "CHWAL\u{0}\u{0}\u{1}{\"licenses\":[]}\n../../etc";
    store
        .apply_telemetry(vec![report(odd, 1, 2)])
        .await
        .unwrap();
    store
        .put_data_planes(vec![row(odd, 5)].into())
        .await
        .unwrap();
    store.close().await.unwrap();
    drop(store);
    let store = SledStore::open(dir.path()).unwrap();
    assert_eq!(store.usage().await.unwrap()[0].node_id, odd);
    assert_eq!(store.data_planes().await.unwrap()[0].id, odd);
    assert_eq!(store.load().await.unwrap().licenses.len(), 0);
}

#[tokio::test]
async fn the_inventory_is_replaced_by_id_and_purged_by_age() {
    let dir = TempDir::new().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    store
        .put_data_planes(vec![row("a", 1), row("b", 2), row("c", 30)].into())
        .await
        .unwrap();
    store
        .put_data_planes(vec![row("a", 40)].into())
        .await
        .unwrap();
    assert_eq!(store.purge_data_planes(10).await.unwrap(), 1);
    let mut rows: Vec<_> = store
        .data_planes()
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.id, r.last_seen))
        .collect();
    rows.sort();
    assert_eq!(rows, vec![("a".into(), 40), ("c".into(), 30)]);
}

#[tokio::test]
async fn a_closed_store_takes_no_writes() {
    let dir = TempDir::new().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    store.close().await.unwrap();
    assert!(matches!(
        store
            .commit(0, Change::Put(record(1, "a", 1)))
            .await
            .unwrap_err(),
        StoreError::Closed
    ));
}

#[test]
fn a_second_process_on_the_same_data_dir_is_refused_with_a_clear_message() {
    let dir = TempDir::new().unwrap();
    let _first = SledStore::open(dir.path()).unwrap();
    let err = SledStore::open(dir.path()).err().expect("refused");
    assert!(
        err.to_string().contains("in use by another process"),
        "{err}"
    );
}

#[test]
fn an_old_log_of_the_previous_release_is_removed_when_empty_and_refused_otherwise() {
    let check = |bytes: Option<Vec<u8>>| {
        let dir = TempDir::new().unwrap();
        if let Some(bytes) = bytes {
            std::fs::write(dir.path().join(legacy::WAL_FILE), bytes).unwrap();
        }
        let opened = SledStore::open(dir.path()).map(|_| ());
        let left = dir.path().join(legacy::WAL_FILE).exists();
        (opened, left)
    };
    let (opened, left) = check(None);
    assert!(opened.is_ok() && !left);
    // A clean shutdown started a new generation: the old records are of the last one.
    let (opened, left) = check(Some(legacy::old_log(7, Some(6))));
    assert!(opened.is_ok(), "{opened:?}");
    assert!(!left, "an empty old log is removed");
    let (opened, left) = check(Some(legacy::old_log(7, None)));
    assert!(opened.is_ok() && !left);
    for (bytes, why) in [
        (legacy::old_log(7, Some(7)), "not shut down cleanly"),
        (
            {
                let mut bad = legacy::old_log(7, None);
                bad[9] ^= 1;
                bad
            },
            "damaged header",
        ),
        (b"CHW".to_vec(), "damaged header"),
    ] {
        let (opened, left) = check(Some(bytes));
        let err = opened.unwrap_err().to_string();
        assert!(err.contains(why), "{err}");
        assert!(err.contains("SIGTERM"), "says how to recover: {err}");
        assert!(
            left,
            "the old log is kept for the previous release to apply"
        );
    }
}

#[tokio::test]
async fn many_licenses_load_in_id_order() {
    let dir = TempDir::new().unwrap();
    let store = SledStore::open(dir.path()).unwrap();
    let mut revision = 0;
    for n in (0..60u8).rev() {
        revision = store
            .commit(revision, Change::Put(record(n, &format!("p{n}"), 1)))
            .await
            .unwrap();
    }
    let ids: Vec<u8> = store
        .load()
        .await
        .unwrap()
        .licenses
        .iter()
        .map(|r| r.id.as_bytes()[0])
        .collect();
    assert_eq!(ids, (0..60).collect::<Vec<_>>());
}

/// Syncs through `Synced`, recording which paths were synced.
fn synced_paths(synced: &mut crate::sync::Synced, dir: &std::path::Path) -> Vec<String> {
    let calls = std::cell::RefCell::new(Vec::new());
    synced
        .sync(dir, &|_, path, _| {
            calls.borrow_mut().push(
                path.strip_prefix(dir)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
            );
            Ok(())
        })
        .unwrap();
    let mut calls = calls.into_inner();
    calls.sort();
    calls
}

#[test]
fn syncs_cover_every_change_and_skip_only_what_cannot_have_changed() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new().unwrap();
    let root = dir.path();
    std::fs::create_dir(root.join("sub")).unwrap();
    std::fs::write(root.join("old"), b"settled").unwrap();
    std::fs::write(root.join("sub/fresh"), b"1").unwrap();
    let mut synced = crate::sync::Synced::default();
    assert_eq!(
        synced_paths(&mut synced, root),
        vec!["", "old", "sub", "sub/fresh"],
        "everything the first time"
    );
    // Files written moments ago are synced again: their times are not trusted yet.
    assert_eq!(synced_paths(&mut synced, root), vec!["old", "sub/fresh"]);
    std::thread::sleep(std::time::Duration::from_millis(150));
    assert_eq!(synced_paths(&mut synced, root), vec!["old", "sub/fresh"]);
    // Now settled and unchanged: nothing to do.
    assert_eq!(synced_paths(&mut synced, root), Vec::<String>::new());
    // A write of the same size is still seen (its times move), a new entry syncs its
    // directory, and a removed one too.
    std::fs::write(root.join("old"), b"SETTLED").unwrap();
    std::fs::write(root.join("sub/new"), b"2").unwrap();
    assert_eq!(
        synced_paths(&mut synced, root),
        vec!["old", "sub", "sub/new"]
    );
    std::fs::remove_file(root.join("sub/new")).unwrap();
    assert_eq!(synced_paths(&mut synced, root), vec!["old", "sub"]);
    // What another user owns in the data dir is not the store's.
    std::fs::create_dir(root.join("lost+found")).unwrap();
    std::fs::set_permissions(
        root.join("lost+found"),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    std::os::unix::fs::chown(root.join("lost+found"), Some(54321), Some(54321)).unwrap();
    let calls = synced_paths(&mut synced, root);
    assert!(!calls.iter().any(|c| c.contains("lost+found")), "{calls:?}");
}
