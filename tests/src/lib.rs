//! Shared helpers for the end-to-end tests in `tests/`: finding the built binaries,
//! running them, and waiting for conditions with a bound.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The path of a workspace binary built by `cargo build --workspace --bins` (the test
/// command builds them first). Test executables live in `target/<profile>/deps`, the
/// binaries one level up.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --workspace --bins` first (scripts/test does)",
        path.display()
    );
    path
}

/// Runs a binary with arguments to completion, with no standard input.
pub fn run(name: &str, args: &[&str]) -> Output {
    Command::new(bin(name))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {name}: {e}"))
}

/// Polls `check` until it returns `Some`, or panics after `timeout` naming `what`.
pub fn eventually<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}
