//! Rotation without restarts: re-reading the files a flag names (trusted keys, cluster
//! certificates, the admin token file) on `SIGHUP` and whenever their contents change.
//!
//! A Kubernetes Secret update replaces the mounted files by swapping a symlink, which
//! inotify reports unreliably, so the files' contents are read every [`POLL`] instead and
//! compared with what was last seen. A new set that does not load is logged at ERROR and
//! the set in use is kept.

use std::path::PathBuf;
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;

/// How often the files are read to see whether they changed.
pub const POLL: Duration = Duration::from_secs(2);

/// Publishes `initial`, then `load()`'s result each time one of `paths` changes or the
/// process receives `SIGHUP`, until `stop` turns true. `what` names the set in the log
/// ("trusted keys", "cluster certificate"). When `load` fails, nothing is published: the
/// receivers keep the set in use, and the failure is logged at ERROR with what to do.
///
/// Must be called inside a Tokio runtime; the `SIGHUP` handler is installed before it
/// returns, so from then on `SIGHUP` no longer ends the process.
pub fn watch<T, F>(
    what: &'static str,
    paths: Vec<PathBuf>,
    initial: T,
    load: F,
    mut stop: watch::Receiver<bool>,
) -> watch::Receiver<T>
where
    T: Send + Sync + 'static,
    F: Fn() -> anyhow::Result<T> + Send + 'static,
{
    let (tx, rx) = watch::channel(initial);
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, what, "cannot listen for SIGHUP; changed files are still picked up within seconds");
            None
        }
    };
    // Read now, not when the task first runs: a change made right after this call is a
    // change.
    let mut seen = contents(&paths);
    tokio::spawn(async move {
        let files = paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(",");
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let cause = tokio::select! {
                _ = tick.tick() => {
                    let now = contents(&paths);
                    if now == seen {
                        continue;
                    }
                    seen = now;
                    "the files changed"
                }
                () = next(&mut hangup) => {
                    seen = contents(&paths);
                    "SIGHUP"
                }
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        return;
                    }
                    continue;
                }
            };
            match load() {
                Ok(value) => {
                    tracing::info!(what, %files, cause, "reloaded the {what}; new connections and checks use them");
                    tx.send_replace(value);
                }
                Err(e) => tracing::error!(what, %files, cause, error = %format!("{e:#}"),
                    "cannot reload the {what}; keeping the ones in use; fix the files (the next change or SIGHUP loads them again)"),
            }
        }
    });
    rx
}

/// The files' contents now (`None` for one that cannot be read).
fn contents(paths: &[PathBuf]) -> Vec<Option<Vec<u8>>> {
    paths.iter().map(|p| std::fs::read(p).ok()).collect()
}

/// The next `SIGHUP`, or never when it cannot be listened for.
async fn next(hangup: &mut Option<Signal>) {
    match hangup {
        Some(signal) => {
            if signal.recv().await.is_none() {
                // The signal driver is gone (the runtime is shutting down): wait forever
                // rather than spin.
                *hangup = None;
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
