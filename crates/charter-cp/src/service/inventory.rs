//! The data-plane inventory: which data planes are connected now, and their rows, written
//! in batches. A sync stream records its data plane's
//! latest row here (on Hello, every Ack and Ping, at disconnect), which is a map insert;
//! one task writes the rows that changed to the store as one batch at most every
//! [`FLUSH_EVERY`], so a snapshot acknowledged by 10,000 data planes costs a few store
//! writes, not 10,000. Readers get the stored rows with the pending ones over them, so
//! `GET /clustering/data-planes` never lags behind the streams.
//!
//! The inventory is soft state (see [`charter_store::DataPlaneRecord`]): rows not yet
//! written when the process dies are rebuilt when the data planes reconnect.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use charter_store::{DataPlaneRecord, Store, StoreError};
use tokio::sync::{watch, Notify};

/// The longest a recorded row waits before it is written.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// The data planes connected now, and the rows recorded and not yet written.
#[derive(Default)]
pub struct Inventory {
    pending: Mutex<HashMap<String, DataPlaneRecord>>,
    recorded: Notify,
    /// Held by a batch write from taking the pending rows until they are in the store, and
    /// by a reader from reading the store until it has read the pending rows, so a reader
    /// never sees a row neither in the store nor pending. (Streams only take `pending`.)
    /// A Tokio mutex: held across the store's `.await`.
    writing: tokio::sync::Mutex<()>,
    /// Node id → the serial of its current stream.
    connected: Mutex<HashMap<String, u64>>,
    serials: AtomicU64,
}

impl Inventory {
    /// Records a data plane's row (replacing any pending row of the same id).
    pub fn record(&self, record: DataPlaneRecord) {
        self.lock().insert(record.id.clone(), record);
        self.recorded.notify_one();
    }

    /// Registers a new stream of `node_id` (replacing an older one) and returns its serial.
    pub fn connect(&self, node_id: &str) -> u64 {
        let serial = self.serials.fetch_add(1, Ordering::Relaxed);
        self.connections().insert(node_id.to_owned(), serial);
        serial
    }

    /// Removes the registration of stream `serial`, unless a newer stream of the same node
    /// replaced it; returns whether it did.
    pub fn disconnect(&self, node_id: &str, serial: u64) -> bool {
        let mut connected = self.connections();
        if connected.get(node_id) == Some(&serial) {
            connected.remove(node_id);
            return true;
        }
        false
    }

    /// How many data planes hold a stream now.
    pub fn connected_count(&self) -> usize {
        self.connections().len()
    }

    /// Every data plane: the stored rows, with the pending ones in their place.
    pub async fn all(&self, store: &dyn Store) -> Result<Vec<DataPlaneRecord>, StoreError> {
        let _writing = self.writing.lock().await;
        let mut rows: HashMap<String, DataPlaneRecord> = store
            .data_planes()
            .await?
            .into_iter()
            .map(|r| (r.id.clone(), r))
            .collect();
        for (id, row) in self.lock().iter() {
            rows.insert(id.clone(), row.clone());
        }
        Ok(rows.into_values().collect())
    }

    /// Writes the pending rows as one batch. On failure they are put back (unless newer
    /// rows were recorded meanwhile) for the next attempt.
    pub async fn flush(&self, store: &dyn Store) -> Result<usize, StoreError> {
        let _writing = self.writing.lock().await;
        let rows: Arc<[DataPlaneRecord]> =
            std::mem::take(&mut *self.lock()).into_values().collect();
        if rows.is_empty() {
            return Ok(0);
        }
        let count = rows.len();
        match store.put_data_planes(rows.clone()).await {
            Ok(()) => Ok(count),
            Err(e) => {
                let mut pending = self.lock();
                for row in rows.iter() {
                    pending.entry(row.id.clone()).or_insert_with(|| row.clone());
                }
                Err(e)
            }
        }
    }

    /// Removes the rows of data planes last seen before `cutoff`, with no batch write in
    /// between (which could bring back a row just refreshed); returns how many.
    pub async fn purge(&self, store: &dyn Store, cutoff: i64) -> Result<usize, StoreError> {
        let _writing = self.writing.lock().await;
        store.purge_data_planes(cutoff).await
    }

    /// Writes recorded rows at most every [`FLUSH_EVERY`] until `shutdown` fires; the
    /// caller flushes once more after the streams have ended.
    pub async fn run(&self, store: Arc<dyn Store>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = self.recorded.notified() => {}
                _ = shutdown.changed() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(FLUSH_EVERY) => {}
                _ = shutdown.changed() => return,
            }
            if let Err(e) = self.flush(store.as_ref()).await {
                tracing::warn!(error = %e, "cannot record data planes in the inventory; will retry");
                // The rows are pending again: try again after the interval even if
                // nothing new is recorded.
                self.recorded.notify_one();
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, DataPlaneRecord>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn connections(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.connected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use charter_store::SledStore;

    fn row(id: &str, last_seen: i64) -> DataPlaneRecord {
        DataPlaneRecord {
            id: id.to_owned(),
            ip: "127.0.0.1".to_owned(),
            hostname: "h".to_owned(),
            version: "0.1.0".to_owned(),
            labels: Default::default(),
            last_seen,
            sync_status: "in_sync".to_owned(),
            license_id: None,
            license_revision: 0,
            license_status: "unlicensed".to_owned(),
            last_error: None,
            upstream: String::new(),
            control_plane: "cp".to_owned(),
        }
    }

    fn sorted(mut rows: Vec<DataPlaneRecord>) -> Vec<(String, i64)> {
        rows.sort_by(|a, b| a.id.cmp(&b.id));
        rows.into_iter().map(|r| (r.id, r.last_seen)).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_never_misses_a_row_while_batches_are_written() {
        use std::sync::atomic::AtomicUsize;
        let dir = tempfile::TempDir::new().expect("temp dir");
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).expect("open"));
        let inventory = Arc::new(Inventory::default());
        let recorded = Arc::new(AtomicUsize::new(0));
        const ROWS: usize = 2000;
        let writer = {
            let (store, inventory, recorded) = (store.clone(), inventory.clone(), recorded.clone());
            tokio::spawn(async move {
                for i in 0..ROWS {
                    inventory.record(row(&format!("dp-{i}"), i as i64));
                    recorded.store(i + 1, Ordering::SeqCst);
                    if i % 25 == 0 {
                        inventory.flush(store.as_ref()).await.expect("flush");
                    }
                }
            })
        };
        let mut reads = 0;
        while !writer.is_finished() || reads == 0 {
            let before = recorded.load(Ordering::SeqCst);
            let seen: std::collections::HashSet<String> = inventory
                .all(store.as_ref())
                .await
                .expect("all")
                .into_iter()
                .map(|r| r.id)
                .collect();
            for i in 0..before {
                assert!(
                    seen.contains(&format!("dp-{i}")),
                    "dp-{i} missing after {reads} reads"
                );
            }
            reads += 1;
        }
        writer.await.expect("writer");
        assert_eq!(
            inventory.all(store.as_ref()).await.expect("all").len(),
            ROWS
        );
    }

    #[tokio::test]
    async fn pending_rows_are_read_over_stored_ones_and_written_in_one_batch() {
        let dir = tempfile::TempDir::new().expect("temp dir");
        let store = SledStore::open(dir.path()).expect("open");
        store
            .put_data_planes(vec![row("a", 1)].into())
            .await
            .expect("put");
        let inventory = Inventory::default();
        inventory.record(row("a", 2));
        inventory.record(row("b", 3));
        inventory.record(row("b", 4));
        assert_eq!(
            sorted(inventory.all(&store).await.expect("all")),
            vec![("a".to_owned(), 2), ("b".to_owned(), 4)],
            "pending rows win, the latest of each id"
        );
        assert_eq!(
            sorted(store.data_planes().await.expect("stored")),
            vec![("a".to_owned(), 1)]
        );
        assert_eq!(inventory.flush(&store).await.expect("flush"), 2);
        assert_eq!(inventory.flush(&store).await.expect("nothing left"), 0);
        assert_eq!(
            sorted(store.data_planes().await.expect("stored")),
            vec![("a".to_owned(), 2), ("b".to_owned(), 4)]
        );
    }

    #[test]
    fn a_newer_stream_of_a_node_keeps_its_registration() {
        let inventory = Inventory::default();
        let old = inventory.connect("dp");
        let new = inventory.connect("dp");
        assert!(!inventory.disconnect("dp", old));
        assert_eq!(inventory.connected_count(), 1);
        assert!(inventory.disconnect("dp", new));
        assert_eq!(inventory.connected_count(), 0);
    }
}
