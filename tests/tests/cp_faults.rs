//! Faults made from outside the real `charter-cp`: its data dir on a file system that
//! fills up (a tmpfs of a few MiB, mounted by the test; the tests run as root, as CI does).
//! A write that cannot reach the disk answers 503 with a JSON message, the store takes no
//! writes until a restart, and no acknowledged write is lost.

use std::path::{Path, PathBuf};
use std::process::Command;

use charter_tests::{Cp, Vendor};
use serde_json::json;
use tempfile::TempDir;

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).expect("creating the mount point");
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root (CI runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }

    fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_answers_503_and_loses_no_acknowledged_write() {
    let tmp = TempDir::new().expect("temp dir");
    let vendor = Vendor::new(tmp.path(), 3);
    let disk = Tmpfs::mount(&tmp.path().join("cp-data"), "3m");
    let key = vendor.public_key.to_str().expect("utf-8 path");
    let mut cp = Cp::start(tmp.path(), &["--trusted-key", key]);

    let mut acknowledged = Vec::new();
    let mut refused = None;
    for n in 0..20_000 {
        let resp = cp.send_json(
            "POST",
            "/licenses",
            &json!({"payload": vendor.valid(&format!("FULL-{n:05}"))}),
        );
        match resp.status {
            201 => acknowledged.push(resp.json()["id"].as_str().expect("id").to_owned()),
            503 => {
                refused = Some(resp);
                break;
            }
            other => panic!("POST {n}: {other} {}", resp.body),
        }
    }
    let refused = refused.expect("the disk filled up within 20,000 writes");
    assert!(
        !acknowledged.is_empty(),
        "some writes fit before the disk filled"
    );
    assert!(
        refused.json()["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{}",
        refused.body
    );
    // Once failed, the store refuses writes and `/status` says so; reads still answer.
    let again = cp.send_json(
        "POST",
        "/licenses",
        &json!({"payload": vendor.valid("AFTER-FULL")}),
    );
    assert_eq!(again.status, 503, "{}", again.body);
    assert!(
        again.json()["message"]
            .as_str()
            .unwrap_or("")
            .contains("restart"),
        "{}",
        again.body
    );
    assert_eq!(cp.get("/status").status, 503);
    let listed = cp.get("/licenses?size=1000");
    assert_eq!(listed.status, 200);

    // More room and a restart: every acknowledged write is there, and writes work again.
    cp.kill();
    disk.resize("64m");
    cp.restart();
    let stored = cp.stored_ids();
    let lost: Vec<_> = acknowledged
        .iter()
        .filter(|id| !stored.contains(*id))
        .collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    let resp = cp.send_json(
        "POST",
        "/licenses",
        &json!({"payload": vendor.valid("AFTER-RESTART")}),
    );
    assert_eq!(resp.status, 201, "{}", resp.body);
    drop(cp);
    drop(disk);
}
