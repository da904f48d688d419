//! The PostgreSQL backend of [`Store`]: several control planes on one database.
//!
//! Durability and ordering are PostgreSQL's: every write is one transaction, committed
//! before the call returns. A license write bumps the one row of `charter_meta` on the
//! condition that it still holds the writer's base revision, so revisions are totally
//! ordered across every control plane, and `NOTIFY`s `charter_revision` in the same
//! transaction. Each store `LISTEN`s on its own connection and also reads the revision
//! once a second, so a lost notification or a lost listening connection only delays
//! [`Store::subscribe`] by that second. A license row carries the revision that last
//! wrote it and a deletion leaves its id and revision in `charter_deletions` (the last
//! [`KEEP_DELETIONS`] revisions' worth), so a control plane behind by a few revisions
//! reads only what changed ([`Store::changes_since`]).
//!
//! The listening connection also tries, every few seconds, to take a session advisory lock
//! ([`CHORES_LOCK`]): the control plane holding it runs the chores of the whole store, and
//! when its connection goes, the server releases the lock and another takes it.
//!
//! TLS to the database follows libpq's `sslmode` (see `pg_url`).
//!
//! The schema is created and migrated at open, under an advisory lock, by the embedded
//! [`MIGRATIONS`]; a database whose schema is newer than this binary knows is refused.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::watch;
use tokio_postgres_rustls::MakeRustlsConnect;
use uuid::Uuid;

use crate::pg_url::{self, Target};
use crate::{
    Change, Changes, DataPlaneRecord, LicenseRecord, Loaded, NodeUsage, Report, Store, StoreError,
};

/// The schema, one statement list per version; version N is `MIGRATIONS[N - 1]`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE charter_meta (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    epoch uuid NOT NULL,
    revision bigint NOT NULL
);
INSERT INTO charter_meta (epoch, revision) VALUES (gen_random_uuid(), 0);
CREATE TABLE charter_licenses (
    id uuid PRIMARY KEY,
    payload text NOT NULL,
    checksum text NOT NULL UNIQUE,
    created_at bigint NOT NULL,
    updated_at bigint NOT NULL,
    revision bigint NOT NULL
);
CREATE TABLE charter_usage (
    node_id text PRIMARY KEY,
    last_seq bigint NOT NULL,
    buckets jsonb NOT NULL
);
CREATE TABLE charter_data_planes (
    id text PRIMARY KEY,
    last_seen bigint NOT NULL,
    record jsonb NOT NULL
);
"#,
    r#"
CREATE TABLE charter_deletions (
    id uuid PRIMARY KEY,
    revision bigint NOT NULL
);
CREATE INDEX charter_deletions_by_revision ON charter_deletions (revision);
CREATE INDEX charter_licenses_by_revision ON charter_licenses (revision);
ALTER TABLE charter_meta ADD COLUMN forgotten bigint NOT NULL DEFAULT 0;
"#,
];

/// How many revisions of deletions the store remembers for [`Store::changes_since`]; a
/// reader further behind loads everything.
const KEEP_DELETIONS: u64 = if cfg!(test) { 5 } else { 10_000 };

/// The advisory lock key that serialises migrations across control planes.
const MIGRATION_LOCK: i64 = 0x6368_6172_7465_7201;
/// The advisory lock key held, on its listening connection, by the one control plane that
/// runs the chores of the whole store ([`Store::leads_chores`]).
const CHORES_LOCK: i64 = 0x6368_6172_7465_7202;
/// The channel a license write notifies.
const CHANNEL: &str = "charter_revision";
/// How often the revision is read even without a notification.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// How often a control plane that does not run the chores tries to take them over.
const CHORES_TRY_EVERY: Duration = Duration::from_secs(5);

/// A [`Store`] in a PostgreSQL database.
#[derive(Clone)]
pub struct PgStore {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) pool: Pool,
    version: String,
    epoch: Uuid,
    revisions: watch::Sender<u64>,
    leading: Arc<AtomicBool>,
    sslmode: &'static str,
    follower: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

/// An error the server answered is the engine's, unless it says the server cannot serve
/// now (starting, shutting down, out of connections, a connection exception); any other
/// error (no connection, a connection lost, a TLS handshake) means the database is
/// unavailable.
fn db_error(context: &str) -> impl Fn(tokio_postgres::Error) -> StoreError + '_ {
    move |e| {
        let context = context.to_owned();
        let answered = e.as_db_error().map(|db| db.code().code());
        let unavailable = answered.is_none_or(|code| {
            code.starts_with("08") || code.starts_with("57P") || code == "53300"
        });
        // tokio-postgres prints only its own part ("error performing TLS handshake"): keep
        // the causes in the message, where an operator reads it.
        let source = chain(&e).into();
        if !unavailable {
            StoreError::Backend { context, source }
        } else {
            StoreError::Unavailable { context, source }
        }
    }
}

/// An error and its causes on one line, each cause once.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let part = cause.to_string();
        if !text.contains(&part) {
            text = format!("{text}: {part}");
        }
        next = cause.source();
    }
    text
}

fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        // The connection's own error says what went wrong (refused, a TLS certificate, a
        // password); the pool's wrapping adds nothing.
        deadpool_postgres::PoolError::Backend(e) => db_error("connecting to the database")(e),
        e => StoreError::Unavailable {
            context: "connecting to the database".to_owned(),
            source: Box::new(e),
        },
    }
}

impl PgStore {
    /// Checks that `url` is a PostgreSQL URL this store can use, without connecting.
    /// Reads the TLS files it names, so a missing root certificate is found at start.
    pub fn check_url(url: &str) -> Result<(), StoreError> {
        pg_url::parse(url).map(|_| ())
    }

    /// Connects to `url` (`postgres://USER[:PASS]@HOST:PORT/DB`), creates or migrates the
    /// schema, and starts following the revision.
    pub async fn open(url: &str) -> Result<PgStore, StoreError> {
        let Target {
            config,
            tls,
            sslmode,
        } = pg_url::parse(url)?;
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(8)
            .wait_timeout(Some(Duration::from_secs(5)))
            .create_timeout(Some(Duration::from_secs(5)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Backend {
                context: "building the database pool".to_owned(),
                source: Box::new(e),
            })?;
        let mut client = pool.get().await.map_err(pool_error)?;
        migrate(&mut client).await?;
        let version: String = client
            .query_one("SHOW server_version", &[])
            .await
            .map_err(db_error("reading the server version"))?
            .get(0);
        let row = client
            .query_one("SELECT epoch, revision FROM charter_meta", &[])
            .await
            .map_err(db_error("reading the store epoch"))?;
        let epoch: Uuid = row.get(0);
        let revision: i64 = row.get(1);
        drop(client);
        let revisions = watch::Sender::new(revision as u64);
        let leading = Arc::new(AtomicBool::new(false));
        let follower = tokio::spawn(follow(
            config,
            tls,
            pool.clone(),
            revisions.clone(),
            leading.clone(),
        ));
        Ok(PgStore {
            inner: Arc::new(Inner {
                pool,
                version: format!(
                    "PostgreSQL {}",
                    version.split_whitespace().next().unwrap_or("")
                ),
                epoch,
                revisions,
                leading,
                sslmode,
                follower,
            }),
        })
    }

    /// The store's epoch.
    pub fn epoch(&self) -> Uuid {
        self.inner.epoch
    }

    /// The TLS mode of its connections, as libpq names it (`disable`, `prefer`,
    /// `require`, `verify-ca`, `verify-full`).
    pub fn sslmode(&self) -> &'static str {
        self.inner.sslmode
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.inner.pool.get().await.map_err(pool_error)
    }
}

/// Applies the migrations this database lacks, under an advisory lock, in one transaction.
async fn migrate(client: &mut deadpool_postgres::Object) -> Result<(), StoreError> {
    let tx = client
        .transaction()
        .await
        .map_err(db_error("starting the migration"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(db_error("taking the migration lock"))?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS charter_schema (version integer NOT NULL)")
        .await
        .map_err(db_error("creating the schema version table"))?;
    let current: Option<i32> = tx
        .query_opt("SELECT max(version) FROM charter_schema", &[])
        .await
        .map_err(db_error("reading the schema version"))?
        .and_then(|row| row.get(0));
    let current = current.unwrap_or(0) as usize;
    if current > MIGRATIONS.len() {
        return Err(StoreError::Corrupt(format!(
            "the database schema is version {current}, newer than this release knows ({}): upgrade charter-cp",
            MIGRATIONS.len()
        )));
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(current) {
        tx.batch_execute(migration)
            .await
            .map_err(db_error("migrating the schema"))?;
        tx.execute(
            "INSERT INTO charter_schema (version) VALUES ($1)",
            &[&((index + 1) as i32)],
        )
        .await
        .map_err(db_error("recording the schema version"))?;
    }
    tx.commit()
        .await
        .map_err(db_error("committing the migration"))
}

/// Keeps `revisions` at the database's revision: from `NOTIFY` on a connection of its own
/// (reconnected when lost), and from a read every [`POLL_EVERY`] whatever happens. On that
/// same connection, takes the chores lock when it is free and sets `leading` while held.
async fn follow(
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    pool: Pool,
    revisions: watch::Sender<u64>,
    leading: Arc<AtomicBool>,
) {
    let (notified_tx, mut notified) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let listener = async move {
        loop {
            if let Ok((client, mut connection)) = config.connect(tls.clone()).await {
                let notified_tx = notified_tx.clone();
                let messages = async move {
                    loop {
                        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                            Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                                if let Ok(revision) = n.payload().parse() {
                                    let _ = notified_tx.send(revision);
                                }
                            }
                            Some(Ok(_)) => {}
                            Some(Err(_)) | None => return,
                        }
                    }
                };
                let listen = async {
                    if client
                        .batch_execute(&format!("LISTEN {CHANNEL}"))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    // The lock is the session's: once taken it is held until this
                    // connection ends, so only a follower without it asks again.
                    let mut every = tokio::time::interval(CHORES_TRY_EVERY);
                    loop {
                        every.tick().await;
                        if leading.load(Ordering::Relaxed) {
                            continue;
                        }
                        match client
                            .query_one("SELECT pg_try_advisory_lock($1)", &[&CHORES_LOCK])
                            .await
                        {
                            Ok(row) => leading.store(row.get(0), Ordering::Relaxed),
                            Err(_) => return,
                        }
                    }
                };
                tokio::select! {
                    () = messages => {}
                    () = listen => {}
                }
                leading.store(false, Ordering::Relaxed);
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    };
    let poller = async {
        let mut every = tokio::time::interval(POLL_EVERY);
        loop {
            tokio::select! {
                _ = every.tick() => {
                    if let Ok(client) = pool.get().await {
                        if let Ok(row) = client.query_one("SELECT revision FROM charter_meta", &[]).await {
                            let revision: i64 = row.get(0);
                            revisions.send_if_modified(|r| raise(r, revision as u64));
                        }
                    }
                }
                Some(revision) = notified.recv() => {
                    revisions.send_if_modified(|r| raise(r, revision));
                }
            }
        }
    };
    tokio::join!(listener, poller);
}

/// A license row of `SELECT id, payload, checksum, created_at, updated_at, revision`.
fn record_of(row: &tokio_postgres::Row) -> LicenseRecord {
    LicenseRecord {
        id: row.get(0),
        payload: row.get(1),
        checksum: row.get(2),
        created_at: row.get(3),
        updated_at: row.get(4),
        revision: row.get::<_, i64>(5) as u64,
    }
}

fn raise(current: &mut u64, seen: u64) -> bool {
    if seen > *current {
        *current = seen;
        true
    } else {
        false
    }
}

#[async_trait::async_trait]
impl Store for PgStore {
    fn backend_version(&self) -> &str {
        &self.inner.version
    }

    async fn load(&self) -> Result<Loaded, StoreError> {
        let mut client = self.client().await?;
        // One snapshot of the database: a repeatable-read transaction.
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(db_error("starting a read"))?;
        let meta = tx
            .query_one("SELECT epoch, revision FROM charter_meta", &[])
            .await
            .map_err(db_error("reading the revision"))?;
        let rows = tx
            .query(
                "SELECT id, payload, checksum, created_at, updated_at, revision FROM charter_licenses ORDER BY id",
                &[],
            )
            .await
            .map_err(db_error("reading licenses"))?;
        tx.commit().await.map_err(db_error("ending a read"))?;
        let revision: i64 = meta.get(1);
        Ok(Loaded {
            epoch: meta.get(0),
            revision: revision as u64,
            licenses: rows.iter().map(record_of).collect(),
            damaged: Vec::new(),
        })
    }

    async fn changes_since(&self, base: u64) -> Result<Option<Changes>, StoreError> {
        let mut client = self.client().await?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(db_error("starting a read"))?;
        let meta = tx
            .query_one("SELECT epoch, revision, forgotten FROM charter_meta", &[])
            .await
            .map_err(db_error("reading the revision"))?;
        let revision = meta.get::<_, i64>(1) as u64;
        let forgotten = meta.get::<_, i64>(2) as u64;
        // Behind what the store remembers, or ahead of it (a database restored from an
        // older backup): only a whole load tells.
        if base < forgotten || base > revision {
            tx.commit().await.map_err(db_error("ending a read"))?;
            return Ok(None);
        }
        let rows = tx
            .query(
                "SELECT id, payload, checksum, created_at, updated_at, revision FROM charter_licenses
                 WHERE revision > $1 ORDER BY id",
                &[&(base as i64)],
            )
            .await
            .map_err(db_error("reading licenses"))?;
        let deleted = tx
            .query(
                "SELECT id FROM charter_deletions WHERE revision > $1 ORDER BY id",
                &[&(base as i64)],
            )
            .await
            .map_err(db_error("reading deletions"))?;
        tx.commit().await.map_err(db_error("ending a read"))?;
        Ok(Some(Changes {
            epoch: meta.get(0),
            revision,
            written: rows.iter().map(record_of).collect(),
            deleted: deleted.iter().map(|row| row.get(0)).collect(),
        }))
    }

    async fn commit(&self, base: u64, change: Change) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(db_error("starting a write"))?;
        // A deletion is remembered for KEEP_DELETIONS revisions: older ones are dropped
        // and `forgotten` says up to where, so `changes_since` knows when it cannot tell.
        let horizon = (base + 1).saturating_sub(KEEP_DELETIONS) as i64;
        let forget = matches!(change, Change::Delete(_));
        let bumped = tx
            .query_opt(
                "UPDATE charter_meta SET revision = revision + 1,
                   forgotten = CASE WHEN $2 THEN GREATEST(forgotten, $3) ELSE forgotten END
                 WHERE revision = $1 RETURNING revision",
                &[&(base as i64), &forget, &horizon],
            )
            .await
            .map_err(db_error("moving the revision"))?;
        let Some(bumped) = bumped else {
            let actual: i64 = tx
                .query_one("SELECT revision FROM charter_meta", &[])
                .await
                .map_err(db_error("reading the revision"))?
                .get(0);
            return Err(StoreError::Conflict {
                expected: base,
                actual: actual as u64,
            });
        };
        let next: i64 = bumped.get(0);
        match &change {
            Change::Put(record) => {
                tx.execute(
                    "INSERT INTO charter_licenses (id, payload, checksum, created_at, updated_at, revision)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (id) DO UPDATE SET payload = EXCLUDED.payload, checksum = EXCLUDED.checksum,
                       created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at, revision = EXCLUDED.revision",
                    &[&record.id, &record.payload, &record.checksum, &record.created_at, &record.updated_at, &next],
                )
                .await
                .map_err(db_error("writing a license"))?;
                tx.execute("DELETE FROM charter_deletions WHERE id = $1", &[&record.id])
                    .await
                    .map_err(db_error("writing a license"))?;
            }
            Change::Delete(id) => {
                tx.execute("DELETE FROM charter_licenses WHERE id = $1", &[id])
                    .await
                    .map_err(db_error("deleting a license"))?;
                tx.execute(
                    "INSERT INTO charter_deletions (id, revision) VALUES ($1, $2)
                     ON CONFLICT (id) DO UPDATE SET revision = EXCLUDED.revision",
                    &[id, &next],
                )
                .await
                .map_err(db_error("deleting a license"))?;
                tx.execute(
                    "DELETE FROM charter_deletions WHERE revision <= $1",
                    &[&horizon],
                )
                .await
                .map_err(db_error("deleting a license"))?;
            }
        }
        tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &next.to_string()])
            .await
            .map_err(db_error("notifying the other control planes"))?;
        tx.commit().await.map_err(db_error("committing a write"))?;
        let next = next as u64;
        self.inner.revisions.send_if_modified(|r| raise(r, next));
        Ok(next)
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.revisions.subscribe()
    }

    async fn apply_telemetry(&self, reports: Vec<Report>) -> Result<Vec<bool>, StoreError> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(db_error("starting a telemetry write"))?;
        let mut applied = Vec::with_capacity(reports.len());
        for report in &reports {
            let row = tx
                .query_opt(
                    "SELECT last_seq, buckets FROM charter_usage WHERE node_id = $1 FOR UPDATE",
                    &[&report.node_id],
                )
                .await
                .map_err(db_error("reading usage"))?;
            let mut usage = match row {
                Some(row) => NodeUsage {
                    node_id: report.node_id.clone(),
                    last_seq: row.get::<_, i64>(0) as u64,
                    buckets: serde_json::from_value(row.get(1)).map_err(|e| {
                        StoreError::Corrupt(format!("usage of {:?}: {e}", report.node_id))
                    })?,
                },
                None => NodeUsage {
                    node_id: report.node_id.clone(),
                    ..NodeUsage::default()
                },
            };
            if report.seq <= usage.last_seq {
                applied.push(false);
                continue;
            }
            usage.last_seq = report.seq;
            for (bucket, count) in &report.counters {
                let total = usage.buckets.entry(bucket.clone()).or_default();
                *total = total.saturating_add(*count);
            }
            let buckets = serde_json::to_value(&usage.buckets)
                .map_err(|e| StoreError::Corrupt(format!("encoding usage: {e}")))?;
            tx.execute(
                "INSERT INTO charter_usage (node_id, last_seq, buckets) VALUES ($1, $2, $3)
                 ON CONFLICT (node_id) DO UPDATE SET last_seq = EXCLUDED.last_seq, buckets = EXCLUDED.buckets",
                &[&report.node_id, &(usage.last_seq as i64), &buckets],
            )
            .await
            .map_err(db_error("writing usage"))?;
            applied.push(true);
        }
        tx.commit()
            .await
            .map_err(db_error("committing telemetry"))?;
        Ok(applied)
    }

    async fn usage(&self) -> Result<Vec<NodeUsage>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT node_id, last_seq, buckets FROM charter_usage", &[])
            .await
            .map_err(db_error("reading usage"))?;
        rows.iter()
            .map(|row| {
                let node_id: String = row.get(0);
                Ok(NodeUsage {
                    last_seq: row.get::<_, i64>(1) as u64,
                    buckets: serde_json::from_value(row.get(2))
                        .map_err(|e| StoreError::Corrupt(format!("usage of {node_id:?}: {e}")))?,
                    node_id,
                })
            })
            .collect()
    }

    async fn put_data_planes(&self, records: Vec<DataPlaneRecord>) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(db_error("starting an inventory write"))?;
        for record in &records {
            let value = serde_json::to_value(record)
                .map_err(|e| StoreError::Corrupt(format!("encoding data plane: {e}")))?;
            tx.execute(
                "INSERT INTO charter_data_planes (id, last_seen, record) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET last_seen = EXCLUDED.last_seen, record = EXCLUDED.record",
                &[&record.id, &record.last_seen, &value],
            )
            .await
            .map_err(db_error("recording data planes"))?;
        }
        tx.commit()
            .await
            .map_err(db_error("committing the inventory"))
    }

    async fn data_planes(&self) -> Result<Vec<DataPlaneRecord>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT record FROM charter_data_planes", &[])
            .await
            .map_err(db_error("reading data planes"))?;
        rows.iter()
            .map(|row| {
                serde_json::from_value(row.get(0))
                    .map_err(|e| StoreError::Corrupt(format!("a data plane row: {e}")))
            })
            .collect()
    }

    async fn purge_data_planes(&self, last_seen_before: i64) -> Result<usize, StoreError> {
        let client = self.client().await?;
        let purged = client
            .execute(
                "DELETE FROM charter_data_planes WHERE last_seen < $1",
                &[&last_seen_before],
            )
            .await
            .map_err(db_error("purging data planes"))?;
        Ok(purged as usize)
    }

    fn leads_chores(&self) -> bool {
        self.inner.leading.load(Ordering::Relaxed)
    }

    async fn check(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute("SELECT 1", &[])
            .await
            .map_err(db_error("checking the database"))?;
        Ok(())
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.inner.follower.abort();
        self.inner.pool.close();
        Ok(())
    }
}
