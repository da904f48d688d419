//! Crash test of the real `charter-cp`: concurrent writers while the process is killed
//! with SIGKILL at random moments. Every acknowledged write must be there after restart,
//! the revision must never go down, and the store must always reopen.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use charter_tests::{http, Body, Cp, Vendor};
use serde_json::json;
use tempfile::TempDir;

const CYCLES: usize = 50;
const WRITERS: usize = 4;

/// A small deterministic generator (xorshift), seeded from the clock and printed, so a
/// failing schedule can be replayed with `CHARTER_CRASH_SEED`.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let seed = std::env::var("CHARTER_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    eprintln!("crash schedule seed: CHARTER_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let dir = TempDir::new().expect("temp dir");
    let vendor = Vendor::new(dir.path(), 21);
    let key = vendor.public_key.to_string_lossy().into_owned();
    let mut cp = Cp::start(dir.path(), &["--trusted-key", &key]);
    let epoch = cp.get("/status").json()["database"]["epoch"].clone();
    let mut acknowledged: HashSet<String> = HashSet::new();
    let mut last_revision = 0;
    let started = Instant::now();

    for cycle in 0..CYCLES {
        let url = cp.url("/licenses");
        let stop = AtomicBool::new(false);
        let acked = Mutex::new(Vec::new());
        let run_for = Duration::from_millis(rng.below(250));
        std::thread::scope(|scope| {
            for writer in 0..WRITERS {
                let (url, stop, acked, vendor) = (&url, &stop, &acked, &vendor);
                scope.spawn(move || {
                    for n in 0..10_000 {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        let doc = vendor.valid(&format!("CRASH-{cycle}-{writer}-{n}"));
                        match http("POST", url, Some(Body::Json(json!({ "payload": doc })))) {
                            Ok(resp) if resp.status == 201 => {
                                let id = resp.json()["id"].as_str().expect("id").to_owned();
                                acked.lock().expect("lock").push(id);
                            }
                            Ok(resp) => panic!("unexpected answer {}: {}", resp.status, resp.body),
                            // The process was killed under us: this write was not acknowledged.
                            Err(_) => return,
                        }
                    }
                });
            }
            std::thread::sleep(run_for);
            cp.kill();
            stop.store(true, Ordering::SeqCst);
        });
        acknowledged.extend(acked.into_inner().expect("lock"));

        cp.restart();
        let health = cp.get("/status").json();
        assert_eq!(
            health["database"]["epoch"], epoch,
            "cycle {cycle}: the store was recreated"
        );
        let revision = health["database"]["revision"].as_u64().expect("revision");
        assert!(
            revision >= last_revision,
            "cycle {cycle}: revision went down from {last_revision} to {revision}"
        );
        assert!(
            revision >= acknowledged.len() as u64,
            "cycle {cycle}: revision {revision} below {} acknowledged writes",
            acknowledged.len()
        );
        last_revision = revision;
        let stored = cp.stored_ids();
        let lost: Vec<_> = acknowledged.difference(&stored).collect();
        assert!(
            lost.is_empty(),
            "cycle {cycle} (seed {seed}): {} acknowledged writes lost: {lost:?}",
            lost.len()
        );
    }
    eprintln!(
        "{CYCLES} kill cycles, {} acknowledged writes, all present; final revision {last_revision}; {:?}",
        acknowledged.len(),
        started.elapsed()
    );
    assert!(
        acknowledged.len() > CYCLES,
        "the writers hardly wrote: the test proved little"
    );
}
