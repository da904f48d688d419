//! Crash safety of the license cache: a child process (this test binary, re-executed with
//! an environment marker) writes alternating valid caches in a loop and reports each
//! completed write; the parent SIGKILLs it at varying moments, many times, and checks the
//! cache on disk is always the last completed write or the next one — never torn.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use charter_dp::cache::{self, CacheFile, CachedLicense, CACHE_FORMAT};
use common::*;
use rand::Rng;

const CHILD_MARKER: &str = "CHARTER_DP_CRASH_CHILD_DIR";
const ROUNDS: usize = 40;

/// Two licenses of different sizes, so a torn write could not pass for either.
fn documents() -> [String; 2] {
    let vendor = signer(3);
    [
        license(&vendor, "key-short", "2026-01-01", "2099-12-31", &[]),
        license(
            &vendor,
            "key-long",
            "2026-01-01",
            "2099-12-31",
            &[
                "rbac",
                "vitals",
                "dev-portal",
                "ai-gateway",
                "konnect",
                "secrets",
            ],
        ),
    ]
}

/// The cache write number `n`: revision `n`, alternating between the two licenses.
fn cache_number(n: u64, documents: &[String; 2]) -> CacheFile {
    let doc = &documents[(n % 2) as usize];
    CacheFile {
        format: CACHE_FORMAT,
        epoch: "crash-epoch".to_owned(),
        revision: n,
        license: Some(CachedLicense {
            id: format!("lic-{n}"),
            payload: doc.clone(),
            created_at: 1,
            updated_at: n as i64,
        }),
        received_at: MARCH_2026,
    }
}

/// The child: write caches for ever, printing `written N` after each completed write.
fn child(dir: &Path) -> ! {
    let documents = documents();
    let mut stdout = std::io::stdout().lock();
    let mut n: u64 = 1;
    loop {
        cache::store(dir, &cache_number(n, &documents)).expect("writing the cache");
        writeln!(stdout, "written {n}").unwrap();
        stdout.flush().unwrap();
        n += 1;
    }
}

#[test]
fn a_killed_writer_leaves_the_old_or_the_new_cache_never_a_torn_one() {
    if let Ok(dir) = std::env::var(CHILD_MARKER) {
        child(Path::new(&dir));
    }
    let dir = tempfile::TempDir::new().unwrap();
    let documents = documents();
    let keys = keys(&signer(3));
    let mut rng = rand::thread_rng();
    let mut first_write_seen = 0;
    for round in 0..ROUNDS {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "a_killed_writer_leaves_the_old_or_the_new_cache_never_a_torn_one",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_MARKER, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // Let it complete a varying number of writes, then kill it a varying time later:
        // sometimes right after a write completed, sometimes in the middle of one.
        let writes_before_kill = rng.gen_range(1..=20);
        let mut last: u64 = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while last < writes_before_kill {
            let line = lines.next().expect("the child reports writes").unwrap();
            if let Some(n) = line.strip_prefix("written ") {
                last = n.parse().unwrap();
            }
            assert!(Instant::now() < deadline, "the child writes too slowly");
        }
        let pause = rng.gen_range(0..1500);
        if pause > 0 {
            std::thread::sleep(Duration::from_micros(pause));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        // Writes completed between the last line read and the kill were reported too.
        for line in lines {
            let Ok(line) = line else { break };
            if let Some(n) = line.strip_prefix("written ") {
                last = n.parse().unwrap();
            }
        }

        let loaded = cache::load(dir.path(), &keys, MARCH_2026)
            .unwrap_or_else(|e| panic!("round {round}: the cache does not load after a kill: {e}"))
            .expect("a cache exists");
        let revision = loaded.file.revision;
        assert!(
            revision == last || revision == last + 1,
            "round {round}: the cache holds write {revision}, but the last completed write was {last}"
        );
        assert_eq!(
            loaded.file,
            cache_number(revision, &documents),
            "round {round}"
        );
        assert!(
            loaded.license.is_some(),
            "round {round}: the license verifies"
        );
        if revision == last + 1 {
            first_write_seen += 1;
        }
    }
    // Not asserted (timing-dependent), but useful when reading a failure.
    eprintln!(
        "{first_write_seen} of {ROUNDS} kills landed after a write's rename and before its report"
    );
}
