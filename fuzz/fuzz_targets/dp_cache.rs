//! The data plane's start-up load of its license cache (`license-cache.json`) on arbitrary
//! file contents: read, then verified with the trusted keys, as `charter_dp::run` does. The
//! file is in a directory under `$TMPDIR` (the scripts point it at /dev/shm).
//!
//! Beyond "never panics", it checks:
//! - the load takes exactly the files that `cache::read` reads and `cache::verify` accepts;
//! - what it holds is what the file says (epoch, revision, the record), the license in it
//!   verifies with the trusted keys, and it writes back as the same file, which reads back
//!   the same.

#![no_main]

use std::path::PathBuf;
use std::sync::LazyLock;

use charter_dp::cache;
use charter_dp::state::Source;
use charter_license::{TrustedKey, TrustedKeys, UnixTime};
use libfuzzer_sys::fuzz_target;

/// The committed test vector's public key (`crates/charter-license/testdata`).
static KEYS: LazyLock<TrustedKeys> = LazyLock::new(|| {
    TrustedKeys::new([TrustedKey::from_pem(include_str!(
        "../../crates/charter-license/testdata/vector.pub"
    ))
    .expect("the committed test public key reads")])
});

/// This process's data dir.
static DIR: LazyLock<PathBuf> = LazyLock::new(|| {
    let dir = std::env::temp_dir().join(format!("charter-fuzz-dp-cache-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("making the fuzz data dir");
    dir
});

/// 2026-06-01: the test vector is in force then.
const NOW: UnixTime = 1_780_272_000;

fuzz_target!(|data: &[u8]| {
    let dir = DIR.as_path();
    std::fs::write(cache::path(dir), data).expect("writing the cache file");
    let held = charter_dp::fuzzing::load_cache(dir, &KEYS, NOW);
    let file = match cache::read(dir) {
        Ok(Some(file)) => file,
        Ok(None) => unreachable!("the cache file was just written"),
        Err(_) => {
            assert!(held.is_none(), "an unreadable cache was loaded");
            return;
        }
    };
    let verified = cache::verify(dir, file.clone(), &KEYS, NOW);
    let Some(held) = held else {
        assert!(verified.is_err(), "a cache that verifies was refused");
        return;
    };
    assert!(verified.is_ok(), "a cache that does not verify was loaded");
    assert_eq!(held.source, Source::Cache);
    assert_eq!(
        (&held.epoch, held.revision, held.received_at),
        (&file.epoch, file.revision, file.received_at)
    );
    match (&held.license, &file.license) {
        (None, None) => {}
        (Some(license), Some(record)) => {
            assert_eq!(license.record.as_ref(), Some(record));
            KEYS.verify(&license.verified.document)
                .expect("a license held from the cache verifies");
        }
        (license, record) => panic!("held {license:?} from the record {record:?}"),
    }
    let rewritten = held.to_cache();
    assert_eq!(rewritten, file, "the loaded cache writes back differently");
    cache::store(dir, &rewritten).expect("storing the cache");
    assert_eq!(cache::read(dir).ok().flatten(), Some(file));
});
