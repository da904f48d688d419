//! The reload trigger: a change of a file's contents publishes the new value, a value that
//! does not load is never published, and `SIGHUP` reloads files that did not change.

use std::time::Duration;

use tokio::sync::watch;

use super::{watch as reloading, POLL};

fn parse(path: &std::path::Path) -> anyhow::Result<u32> {
    Ok(std::fs::read_to_string(path)?.trim().parse()?)
}

#[tokio::test]
async fn changed_files_are_published_and_broken_ones_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("value");
    std::fs::write(&file, "1").unwrap();
    let (_stop_tx, stop) = watch::channel(false);
    let path = file.clone();
    let mut values = reloading(
        "test value",
        vec![file.clone()],
        1,
        move || parse(&path),
        stop,
    );
    let wait = POLL * 5;

    std::fs::write(&file, "2").unwrap();
    tokio::time::timeout(wait, values.wait_for(|v| *v == 2))
        .await
        .unwrap()
        .unwrap();

    // Not a number: the value in use stays, and a fixed file is taken again.
    std::fs::write(&file, "two").unwrap();
    tokio::time::sleep(POLL * 2).await;
    assert_eq!(*values.borrow(), 2);
    std::fs::write(&file, "3").unwrap();
    tokio::time::timeout(wait, values.wait_for(|v| *v == 3))
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn sighup_reloads_unchanged_files_and_stop_ends_the_watch() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("value");
    std::fs::write(&file, "7").unwrap();
    let (stop_tx, stop) = watch::channel(false);
    let path = file.clone();
    // The initial value differs from the file's, so only a reload can publish 7.
    let mut values = reloading("test value", vec![file], 0, move || parse(&path), stop);
    let pid = std::process::id().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(sent.success(), "the process survives SIGHUP");
    tokio::time::timeout(Duration::from_secs(5), values.wait_for(|v| *v == 7))
        .await
        .unwrap()
        .unwrap();

    stop_tx.send(true).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), values.changed()).await;
    assert!(ended.unwrap().is_err(), "the watch ends at stop");
}
