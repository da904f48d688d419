//! The node's clock: the wall clock passed through a high-water mark that is persisted in
//! the data dir, so neither a clock set backwards nor a restart revives an expired license.
//!
//! The mark only ever comes from this node's own clock readings (and the file it persists
//! them to), never from a cache's or a message's fields: an unsigned number that could be
//! altered must not move the time every license is judged at.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use charter_license::{rfc3339, Clock, MarkAhead, MonotonicClock, UnixTime};

use crate::files;

/// Lets an `Arc<dyn Clock>` be the inner clock of a [`MonotonicClock`].
#[derive(Clone)]
pub struct SharedClock(pub Arc<dyn Clock>);

impl std::fmt::Debug for SharedClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedClock")
    }
}

impl Clock for SharedClock {
    fn now(&self) -> UnixTime {
        self.0.now()
    }
}

/// `max(wall clock, mark)`, with the mark persisted by [`NodeClock::persist`].
#[derive(Debug)]
pub struct NodeClock {
    clock: MonotonicClock<SharedClock>,
    dir: PathBuf,
    // A std mutex: held only around a small synchronous file write, from blocking tasks.
    written: Mutex<Option<UnixTime>>,
    // The wall-clock day (days since the Unix epoch) a mark ahead of the clock was last logged, so it is logged once a
    // day while it lasts. A std mutex around a plain value, never held across an await.
    reported: Mutex<Option<i64>>,
}

impl NodeClock {
    /// Wraps `wall`, starting from the mark persisted in `dir` (`persisted`, read by
    /// [`files::read_clock_mark`]).
    pub fn new(wall: Arc<dyn Clock>, dir: PathBuf, persisted: Option<UnixTime>) -> NodeClock {
        NodeClock {
            clock: MonotonicClock::new(SharedClock(wall), persisted.unwrap_or(0)),
            dir,
            written: Mutex::new(persisted),
            reported: Mutex::new(None),
        }
    }

    /// The latest time seen.
    pub fn mark(&self) -> UnixTime {
        self.clock.mark()
    }

    /// The mark and the wall clock when the mark is more than a day ahead of it.
    pub fn mark_ahead(&self) -> Option<MarkAhead> {
        self.clock.mark_ahead()
    }

    /// What `GET /license` says (in `warnings`) while the mark is more than a day ahead of
    /// the wall clock.
    pub fn warning(&self) -> Option<String> {
        self.mark_ahead().map(|ahead| {
            format!(
                "{ahead}; if this node's clock is right, stop the data plane, delete {} and start it again",
                self.dir.join(files::CLOCK_MARK_FILE).display()
            )
        })
    }

    /// Logs an ERROR, with both dates, when the mark is more than a day ahead of the wall
    /// clock: at the first call that finds it so, then once a day while it lasts.
    pub fn report_mark_ahead(&self) {
        let mut reported = self.reported.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(ahead) = self.mark_ahead() else {
            if reported.take().is_some() {
                tracing::info!(mark = %rfc3339(self.mark()),
                    "the wall clock caught up with the clock mark; licenses are judged at the wall clock again");
            }
            return;
        };
        let today = ahead.clock.div_euclid(86_400);
        if *reported == Some(today) {
            return;
        }
        *reported = Some(today);
        let path = self.dir.join(files::CLOCK_MARK_FILE);
        tracing::error!(mark = %rfc3339(ahead.mark), clock = %rfc3339(ahead.clock), path = %path.display(),
            "{ahead}, so licenses may show expired. The mark is the latest time this node has seen; a mark far ahead means the clock was once wrong, or the file was altered. If this node's clock is right, stop the data plane, delete {} and start it again",
            path.display());
    }

    /// Writes the mark to the data dir if it moved since the last write. Blocking (fsync):
    /// call it from a blocking task.
    pub fn persist(&self) {
        let mut written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
        let mark = self.clock.now();
        if *written == Some(mark) {
            return;
        }
        match files::write_clock_mark(&self.dir, mark) {
            Ok(()) => *written = Some(mark),
            Err(e) => {
                tracing::warn!(error = %e, "cannot persist the clock mark; a clock set backwards before the next write could shorten the time this node has seen")
            }
        }
    }
}

impl Clock for NodeClock {
    fn now(&self) -> UnixTime {
        self.clock.now()
    }
}
