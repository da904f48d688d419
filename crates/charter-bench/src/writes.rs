//! The durable-write baselines of the admin benchmark, for each store a control plane can
//! use ([`Durable`]): the floor any durable write there pays (a raw append+fsync on the
//! data dir's disk; a bare autocommit `INSERT` into the same PostgreSQL), and the CP's own
//! store called in this process, which separates the store's cost from the HTTP and
//! license-verification cost of `POST /licenses`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use charter_store::{Change, LicenseRecord, PgStore, SledStore, Store};
use tokio_postgres::{Client, Statement};
use uuid::Uuid;

use crate::pg::{self, Postgres};
use crate::procs::{Pinning, ServerRuntime};

/// The store the control plane under test writes to, with its baselines.
pub enum Durable {
    /// sled in the CP's data dir: a raw write+fsync on the same filesystem, and a
    /// `SledStore` in this process.
    Sled {
        raw: RawFsync,
        store: InProcessStore,
    },
    /// PostgreSQL: a bare `INSERT` into the same server, and a `PgStore` in this process
    /// on a database of its own (so its revisions do not move the CP's). Both run on a
    /// runtime placed like the servers, and the floor also on this process's runtime.
    Postgres {
        runtime: ServerRuntime,
        on_server_core: Arc<BareInsert>,
        here: Box<BareInsert>,
        store: Arc<InProcessStore>,
    },
}

impl Durable {
    /// A raw fsync file (of `fsync_bytes` a write) and a store, both under `dir`.
    pub fn sled(dir: &Path, fsync_bytes: usize) -> Result<Durable> {
        Ok(Durable::Sled {
            raw: RawFsync::create(&dir.join("raw-fsync"), fsync_bytes)?,
            store: InProcessStore::open(&dir.join("store-inproc"))?,
        })
    }

    /// Bare inserts of `payload` into `pg`, and a store in a new database there.
    pub async fn postgres(pg: &Postgres, pinning: &Pinning, payload: String) -> Result<Durable> {
        let runtime = pinning.server_runtime()?;
        let (url, store_url) = (pg.url(), pg.create_database("bench_store").await?);
        let server_payload = payload.clone();
        let on_server_core = runtime
            .run(async move { BareInsert::connect(&url, server_payload).await })
            .await??;
        let here = Box::new(BareInsert::connect(&pg.url(), payload).await?);
        let store = runtime
            .run(async move { InProcessStore::postgres(&store_url).await })
            .await??;
        Ok(Durable::Postgres {
            runtime,
            on_server_core: Arc::new(on_server_core),
            here,
            store: Arc::new(store),
        })
    }

    /// The floor's row label and the in-process store's.
    pub fn labels(&self) -> (String, &'static str) {
        match self {
            Durable::Sled { raw, .. } => (
                format!("raw write({} B) + fsync", raw.record.len()),
                "SledStore::insert",
            ),
            Durable::Postgres { here, .. } => (
                format!("bare INSERT ({} B text, autocommit)", here.payload.len()),
                "PgStore::commit",
            ),
        }
    }

    /// `n` writes of the floor on the servers' core, then `n` on this thread.
    pub async fn floor(&mut self, pinning: &Pinning, n: usize) -> Result<[Vec<Duration>; 2]> {
        match self {
            Durable::Sled { raw, .. } => {
                let server = pinning
                    .on_server_core(|| (0..n).map(|_| raw.once()).collect::<Result<Vec<_>>>())??;
                let here = (0..n).map(|_| raw.once()).collect::<Result<Vec<_>>>()?;
                Ok([server, here])
            }
            Durable::Postgres {
                runtime,
                on_server_core,
                here,
                ..
            } => {
                let server = on_server_core.clone();
                let server = runtime.run(async move { server.times(n).await }).await??;
                Ok([server, here.times(n).await?])
            }
        }
    }

    /// Each of `texts` committed to the in-process store on the servers' core, timed.
    pub async fn store(
        &self,
        pinning: &Pinning,
        texts: Vec<String>,
        now: i64,
    ) -> Result<Vec<Duration>> {
        match self {
            Durable::Sled { store, .. } => {
                pinning.on_server_core(|| store.insert_all(&texts, now))?
            }
            Durable::Postgres { runtime, store, .. } => {
                let store = store.clone();
                runtime
                    .run(async move {
                        let mut times = Vec::with_capacity(texts.len());
                        for text in &texts {
                            times.push(store.insert(text, now).await?);
                        }
                        Ok(times)
                    })
                    .await?
            }
        }
    }
}

/// An autocommit `INSERT` of a license-sized row (uuid id, the payload as text, three
/// bigints) into a table of its own, with a prepared statement: one round trip and one
/// commit, so one write-ahead log flush, per write. The floor any durable write to this
/// PostgreSQL pays.
pub struct BareInsert {
    client: Client,
    statement: Statement,
    payload: String,
}

impl BareInsert {
    /// Connects (the connection runs on the current runtime) and makes the table.
    pub async fn connect(url: &str, payload: String) -> Result<BareInsert> {
        let client = pg::connect(url).await?;
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS bench_bare_insert (id uuid PRIMARY KEY, \
                 payload text NOT NULL, created_at bigint NOT NULL, updated_at bigint NOT NULL, \
                 revision bigint NOT NULL)",
            )
            .await
            .context("creating the bare insert table")?;
        let statement = client
            .prepare(
                "INSERT INTO bench_bare_insert (id, payload, created_at, updated_at, revision) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .await
            .context("preparing the bare insert")?;
        Ok(BareInsert {
            client,
            statement,
            payload,
        })
    }

    /// `n` inserts, one after the other, each timed.
    pub async fn times(&self, n: usize) -> Result<Vec<Duration>> {
        let mut times = Vec::with_capacity(n);
        for i in 0..n {
            let (id, at) = (Uuid::new_v4(), i as i64);
            let started = Instant::now();
            self.client
                .execute(&self.statement, &[&id, &self.payload, &at, &at, &at])
                .await
                .context("a bare insert")?;
            times.push(started.elapsed());
        }
        Ok(times)
    }
}

/// Appends `record_bytes` to one file and fsyncs it (`File::sync_all`, i.e. `fsync(2)`),
/// one record per call: what a minimal write-ahead log does per acknowledged write.
pub struct RawFsync {
    file: File,
    record: Vec<u8>,
}

impl RawFsync {
    /// Creates the log file in `dir`.
    pub fn create(dir: &Path, record_bytes: usize) -> Result<RawFsync> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("raw-fsync.log");
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        // Make the file's own creation durable first, so the loop measures appends only.
        file.sync_all()
            .with_context(|| format!("fsyncing {}", path.display()))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("fsyncing {}", dir.display()))?;
        let record = (0..record_bytes)
            .map(|i| b"0123456789abcdef"[i % 16])
            .collect();
        Ok(RawFsync { file, record })
    }

    /// One write+fsync, timed.
    pub fn once(&mut self) -> Result<Duration> {
        let started = Instant::now();
        self.file
            .write_all(&self.record)
            .context("appending to the raw fsync log")?;
        self.file.sync_all().context("fsyncing the raw fsync log")?;
        Ok(started.elapsed())
    }
}

/// The control plane's store, opened in this process.
pub struct InProcessStore {
    store: Box<dyn Store>,
    revision: AtomicU64,
}

impl InProcessStore {
    /// Opens a fresh sled store in `dir`.
    pub fn open(dir: &Path) -> Result<InProcessStore> {
        let store = SledStore::open(dir)
            .with_context(|| format!("opening an in-process store in {}", dir.display()))?;
        Ok(InProcessStore {
            store: Box::new(store),
            revision: AtomicU64::new(0),
        })
    }

    /// Opens the PostgreSQL store at `url` (a fresh database), on the current runtime.
    pub async fn postgres(url: &str) -> Result<InProcessStore> {
        let store = PgStore::open(url)
            .await
            .context("opening an in-process PostgreSQL store")?;
        Ok(InProcessStore {
            store: Box::new(store),
            revision: AtomicU64::new(0),
        })
    }

    /// Inserts each license text, one durable commit each, timed, on a runtime made on this
    /// thread (so the store's blocking thread inherits this thread's CPU pinning).
    pub fn insert_all(&self, texts: &[String], now: i64) -> Result<Vec<Duration>> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a runtime for the in-process store")?;
        texts
            .iter()
            .map(|text| runtime.block_on(self.insert(text, now)))
            .collect()
    }

    async fn insert(&self, payload: &str, now: i64) -> Result<Duration> {
        let base = self.revision.load(Ordering::SeqCst);
        let record = LicenseRecord {
            id: Uuid::new_v4(),
            payload: payload.to_owned(),
            checksum: charter_store::checksum_of(payload),
            created_at: now,
            updated_at: now,
            revision: base + 1,
        };
        let started = Instant::now();
        let revision = self
            .store
            .commit(base, Change::Put(record))
            .await
            .context("committing to the in-process store")?;
        let elapsed = started.elapsed();
        self.revision.store(revision, Ordering::SeqCst);
        Ok(elapsed)
    }
}
