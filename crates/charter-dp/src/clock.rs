//! The node's clock: the wall clock passed through a high-water mark that is persisted in
//! the data dir, so neither a clock set backwards nor a restart revives an expired license.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use charter_license::{Clock, MonotonicClock, UnixTime};

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
}

impl NodeClock {
    /// Wraps `wall`, starting from the mark persisted in `dir` (or `floor`, whichever is
    /// later: the time the cache was received is a mark too).
    pub fn new(
        wall: Arc<dyn Clock>,
        dir: PathBuf,
        persisted: Option<UnixTime>,
        floor: Option<UnixTime>,
    ) -> NodeClock {
        let mark = persisted.into_iter().chain(floor).max().unwrap_or(0);
        NodeClock {
            clock: MonotonicClock::new(SharedClock(wall), mark),
            dir,
            written: Mutex::new(persisted),
        }
    }

    /// The latest time seen.
    pub fn mark(&self) -> UnixTime {
        self.clock.mark()
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
