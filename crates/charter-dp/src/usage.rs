//! Gate usage counts per UTC month, persisted in the data dir, and the telemetry batches
//! that carry them to the control plane exactly once.
//!
//! Counting goes into `current`. A telemetry round freezes `current` into `pending` with
//! the next sequence number and persists that *before* sending; the batch is resent with
//! the same `seq` until the control plane acknowledges it, and only then dropped. The
//! control plane applies each `(node_id, seq)` once, so a lost ack, a cut connection or a
//! restart of either side neither loses nor double-counts a request.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use charter_license::{utc_date, UnixTime};
use serde::{Deserialize, Serialize};

use crate::files::{self, FileError};

/// The usage file in the data dir.
pub const USAGE_FILE: &str = "usage.json";

/// Counts on their way to the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// Its sequence number (strictly increasing per node, across restarts).
    pub seq: u64,
    /// Requests by month (`YYYY-MM`).
    pub counters: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct UsageFile {
    next_seq: u64,
    pending: Option<Batch>,
    current: BTreeMap<String, u64>,
}

impl Default for UsageFile {
    fn default() -> Self {
        UsageFile {
            next_seq: 1,
            pending: None,
            current: BTreeMap::new(),
        }
    }
}

/// What the counter's lock guards: the counts, and the bucket of the UTC day counted last
/// (so a count names its month without working out a date, once a day).
struct Counts {
    file: UsageFile,
    /// The day (days since 1970-01-01, UTC) and its month's bucket.
    today: Option<(i64, String)>,
}

/// The usage counter of a data plane.
pub struct Usage {
    dir: PathBuf,
    /// A std mutex: held only for in-memory updates and the short atomic file write, never
    /// across an await.
    state: Mutex<Counts>,
    dirty: AtomicBool,
}

/// A usage file that cannot be read back.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    /// The file could not be read or written.
    #[error(transparent)]
    File(#[from] FileError),
    /// The file is not what this program writes.
    #[error("{path} is not a usage file ({reason}); move it aside to start counting afresh")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

impl Usage {
    /// Opens the counter, restoring unsent and unacknowledged counts.
    pub fn open(dir: &Path) -> Result<Usage, UsageError> {
        let path = dir.join(USAGE_FILE);
        let state = match files::read_optional(&path)? {
            None => UsageFile::default(),
            Some(text) => serde_json::from_str(&text).map_err(|e| UsageError::Corrupt {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?,
        };
        Ok(Usage {
            dir: dir.to_path_buf(),
            state: Mutex::new(Counts {
                file: state,
                today: None,
            }),
            dirty: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        // The guarded data is plain counters; a panic elsewhere cannot leave it torn.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one forwarded request at `now`.
    pub fn count(&self, now: UnixTime) {
        let day = now.div_euclid(86_400);
        let mut state = self.lock();
        let Counts { file, today } = &mut *state;
        let bucket = match today {
            Some((counted, bucket)) if *counted == day => bucket,
            _ => &today.insert((day, bucket(now))).1,
        };
        match file.current.get_mut(bucket.as_str()) {
            Some(count) => *count += 1,
            None => {
                file.current.insert(bucket.clone(), 1);
            }
        }
        drop(state);
        self.dirty.store(true, Ordering::Release);
    }

    /// Writes the counts to disk if they changed since the last write.
    pub fn persist(&self) -> Result<(), UsageError> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let state = self.lock();
        let result = self.write(&state.file);
        if result.is_err() {
            self.dirty.store(true, Ordering::Release);
        }
        result
    }

    fn write(&self, state: &UsageFile) -> Result<(), UsageError> {
        // Serialising plain maps and integers cannot fail.
        let text = serde_json::to_vec(state).unwrap_or_default();
        files::write_atomic(&self.dir, USAGE_FILE, &text)?;
        Ok(())
    }

    /// The batch to send now: the unacknowledged one again, or the current counts frozen
    /// under a new `seq` (persisted before it is returned). `None` when there is nothing.
    pub fn next_batch(&self) -> Result<Option<Batch>, UsageError> {
        let mut state = self.lock();
        if let Some(pending) = &state.file.pending {
            return Ok(Some(pending.clone()));
        }
        if state.file.current.is_empty() {
            return Ok(None);
        }
        let mut next = state.file.clone();
        next.pending = Some(Batch {
            seq: next.next_seq,
            counters: std::mem::take(&mut next.current),
        });
        next.next_seq += 1;
        // Persist before anything is sent: a batch the control plane may apply must
        // survive a crash with its seq, or a resend after restart would count it twice.
        self.write(&next)?;
        state.file = next;
        Ok(state.file.pending.clone())
    }

    /// The control plane acknowledged `seq`: drop that batch. Returns whether it matched.
    pub fn acknowledge(&self, seq: u64) -> Result<bool, UsageError> {
        let mut state = self.lock();
        if state.file.pending.as_ref().is_none_or(|p| p.seq != seq) {
            return Ok(false);
        }
        let mut next = state.file.clone();
        next.pending = None;
        self.write(&next)?;
        state.file = next;
        Ok(true)
    }

    /// Requests counted and not yet acknowledged, by month (for the status API).
    pub fn unacknowledged(&self) -> BTreeMap<String, u64> {
        let state = &self.lock().file;
        let mut totals = state.current.clone();
        if let Some(pending) = &state.pending {
            for (bucket, count) in &pending.counters {
                *totals.entry(bucket.clone()).or_default() += count;
            }
        }
        totals
    }
}

/// The bucket (`YYYY-MM`, UTC) of `now`.
fn bucket(now: UnixTime) -> String {
    let date = utc_date(now);
    format!("{:04}-{:02}", date.year(), u8::from(date.month()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOV: UnixTime = 1_795_600_000; // 2026-11-25
    const DEC: UnixTime = NOV + 10 * 86_400;

    #[test]
    fn batches_are_frozen_resent_until_acknowledged_and_survive_restart() {
        let dir = tempfile::TempDir::new().expect("temp dir");
        let usage = Usage::open(dir.path()).expect("open");
        assert_eq!(usage.next_batch().expect("batch"), None, "nothing to send");
        usage.count(NOV);
        usage.count(NOV);
        usage.count(DEC);
        let first = usage.next_batch().expect("batch").expect("some");
        assert_eq!(first.seq, 1);
        assert_eq!(
            first.counters,
            BTreeMap::from([("2026-11".into(), 2), ("2026-12".into(), 1)])
        );
        // Counting goes on into the next batch; the pending one is resent unchanged.
        usage.count(DEC);
        assert_eq!(usage.next_batch().expect("resend"), Some(first.clone()));
        // A restart before the ack resends the same batch with the same seq.
        usage.persist().expect("persist");
        drop(usage);
        let usage = Usage::open(dir.path()).expect("reopen");
        assert_eq!(usage.next_batch().expect("resend"), Some(first.clone()));
        assert!(
            !usage.acknowledge(7).expect("ack"),
            "a foreign seq is ignored"
        );
        assert!(usage.acknowledge(1).expect("ack"));
        let second = usage.next_batch().expect("batch").expect("some");
        assert_eq!(
            (second.seq, second.counters.clone()),
            (2, BTreeMap::from([("2026-12".into(), 1)]))
        );
        assert!(usage.acknowledge(2).expect("ack"));
        assert_eq!(usage.next_batch().expect("batch"), None);
        drop(usage);
        let usage = Usage::open(dir.path()).expect("reopen");
        usage.count(NOV);
        assert_eq!(
            usage.next_batch().expect("batch").map(|b| b.seq),
            Some(3),
            "seq keeps growing across restarts"
        );
    }

    #[test]
    fn each_count_goes_to_its_own_utc_month() {
        let dir = tempfile::TempDir::new().expect("temp dir");
        let usage = Usage::open(dir.path()).expect("open");
        // 2026-12-01T00:00:00Z.
        let december = 1_796_083_200;
        // The last second of November, the first of December, and November again (a
        // clock stepped back), then before 1970 and either side of its start: each its
        // own month, whichever day was counted just before.
        for at in [
            december - 1,
            december,
            december + 86_399,
            december - 1,
            -1,
            0,
            -1,
        ] {
            usage.count(at);
        }
        assert_eq!(
            usage.unacknowledged(),
            BTreeMap::from([
                ("1969-12".into(), 2),
                ("1970-01".into(), 1),
                ("2026-11".into(), 2),
                ("2026-12".into(), 2)
            ])
        );
    }

    #[test]
    fn a_corrupt_file_is_a_clear_error() {
        let dir = tempfile::TempDir::new().expect("temp dir");
        std::fs::write(dir.path().join(USAGE_FILE), "nope").expect("write");
        let err = Usage::open(dir.path()).err().expect("refused");
        assert!(err.to_string().contains("is not a usage file"), "{err}");
    }
}
