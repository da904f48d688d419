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
//! reads only what changed ([`Store::changes_since`]). The database records each deletion
//! itself (a trigger on `charter_licenses`), so a delete by any writer, even a release that
//! predates `charter_deletions`, reaches the other control planes.
//!
//! No operation waits for the database forever: each has a timeout ([`TIMEOUT`]) and then
//! answers [`StoreError::Unavailable`], so a server that stops answering (packets dropped,
//! a frozen host) costs a request 503 rather than a hung request holding the write lock.
//! A connection whose operation timed out leaves the pool; TCP keepalives and a TCP user
//! timeout (see `pg_url`) close connections the network has silently lost.
//!
//! The listening connection also tries, every few seconds, to take a session advisory lock
//! ([`CHORES_LOCK`]): the control plane holding it runs the chores of the whole store, and
//! when its connection goes, the server releases the lock and another takes it. While it
//! holds the lock it probes that connection (`SELECT 1`) every few seconds, and gives up
//! the chores and reconnects when the probe fails or times out.
//!
//! TLS to the database follows libpq's `sslmode` (see `pg_url`).
//!
//! The schema is created and migrated at open, under an advisory lock, by the embedded
//! [`MIGRATIONS`]; a database whose schema is newer than this binary knows is refused.

use std::collections::BTreeMap;
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
pub(crate) const MIGRATIONS: &[&str] = &[
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
    // The database records every deletion itself, whoever deletes (a release before
    // version 2 did not write `charter_deletions`), at the revision the deleting
    // transaction moved `charter_meta` to (every writer moves it before deleting). Deletions
    // before this migration may be missing, so a catch-up from before it loads everything.
    r#"
CREATE FUNCTION charter_record_deletion() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO charter_deletions (id, revision)
    SELECT OLD.id, revision FROM charter_meta
    ON CONFLICT (id) DO UPDATE SET revision = EXCLUDED.revision;
    RETURN NULL;
END
$$;
CREATE TRIGGER charter_licenses_deleted AFTER DELETE ON charter_licenses
    FOR EACH ROW EXECUTE FUNCTION charter_record_deletion();
UPDATE charter_meta SET forgotten = revision;
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
/// How often a control plane that does not run the chores tries to take them over, and
/// how often the one that runs them probes its connection.
const CHORES_TRY_EVERY: Duration = Duration::from_secs(5);
/// How long one store operation (taking a connection included) may wait for the database
/// before it fails with [`StoreError::Unavailable`]; also bounds each step of following the
/// revision and of holding the chores lock.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A [`Store`] in a PostgreSQL database.
#[derive(Clone)]
pub struct PgStore {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) pool: Pool,
    version: String,
    /// The epoch as last read (at open, then by the follower).
    epoch: Arc<std::sync::Mutex<Uuid>>,
    timeout: Duration,
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
/// now (starting, shutting down, out of connections, a connection exception, a read-only
/// transaction: a standby after a failover); any other error (no connection, a connection
/// lost, a TLS handshake) means the database is unavailable.
fn db_error(context: &str) -> impl Fn(tokio_postgres::Error) -> StoreError + '_ {
    move |e| {
        let context = context.to_owned();
        let answered = e.as_db_error().map(|db| db.code().code());
        let unavailable = answered.is_none_or(|code| {
            code.starts_with("08") || code.starts_with("57P") || code == "53300" || code == "25006"
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

/// `sql` prepared on this connection once and kept (deadpool's statement cache): a write
/// then costs one round trip per statement, not two, and the server parses and plans each
/// statement once per connection instead of once per write.
async fn prepared(
    tx: &deadpool_postgres::Transaction<'_>,
    sql: &str,
) -> Result<tokio_postgres::Statement, StoreError> {
    tx.prepare_cached(sql)
        .await
        .map_err(db_error("preparing a statement"))
}

/// A read-only repeatable-read transaction: every read in it sees one snapshot of the
/// database.
async fn snapshot_read(
    client: &mut deadpool_postgres::Object,
) -> Result<deadpool_postgres::Transaction<'_>, StoreError> {
    client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(db_error("starting a read"))
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

/// The error of an operation the database did not answer within `timeout`.
fn timed_out(context: &str, timeout: Duration) -> StoreError {
    StoreError::Unavailable {
        context: context.to_owned(),
        source: format!("no answer within the store's timeout of {timeout:?}").into(),
    }
}

/// A pooled connection in use. Dropped without [`Held::release`] (its operation was
/// cancelled by the timeout), it leaves the pool rather than going back: it may be stuck
/// behind a request the server never answered.
struct Held(Option<deadpool_postgres::Object>);

impl Held {
    /// Gives the connection back to the pool.
    fn release(mut self) {
        drop(self.0.take());
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(object) = self.0.take() {
            drop(deadpool_postgres::Object::take(object));
        }
    }
}

/// Runs `work` on a connection of `pool`, taking the connection included, within
/// `timeout`; past it, fails with [`StoreError::Unavailable`] saying `context`.
async fn with_connection<T>(
    pool: &Pool,
    timeout: Duration,
    context: &str,
    work: impl AsyncFnOnce(&mut deadpool_postgres::Object) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let attempt = async {
        let mut held = Held(Some(pool.get().await.map_err(pool_error)?));
        let object = held.0.as_mut().expect("held until released");
        let result = work(object).await;
        held.release();
        result
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(timed_out(context, timeout)),
    }
}

impl PgStore {
    /// Checks that `url` is a PostgreSQL URL this store can use, without connecting.
    /// Reads the TLS files it names, so a missing root certificate is found at start.
    pub fn check_url(url: &str) -> Result<(), StoreError> {
        pg_url::parse(url).map(|_| ())
    }

    /// Connects to `url` (`postgres://USER[:PASS]@HOST:PORT/DB`), creates or migrates the
    /// schema, and starts following the revision. Each operation waits at most
    /// [`TIMEOUT`] for the database.
    pub async fn open(url: &str) -> Result<PgStore, StoreError> {
        PgStore::open_with_timeout(url, TIMEOUT).await
    }

    /// [`PgStore::open`] with another operation timeout than [`TIMEOUT`] (tests use a
    /// short one).
    pub async fn open_with_timeout(url: &str, timeout: Duration) -> Result<PgStore, StoreError> {
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
        let (version, epoch, revision) =
            with_connection(&pool, timeout, "opening the database", async |client| {
                migrate(client).await?;
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
                Ok((version, epoch, revision as u64))
            })
            .await?;
        let revisions = watch::Sender::new(revision);
        let leading = Arc::new(AtomicBool::new(false));
        let epoch = Arc::new(std::sync::Mutex::new(epoch));
        let follower = tokio::spawn(follow(
            config,
            tls,
            pool.clone(),
            Following {
                revisions: revisions.clone(),
                epoch: epoch.clone(),
                leading: leading.clone(),
                timeout,
            },
        ));
        Ok(PgStore {
            inner: Arc::new(Inner {
                pool,
                version: format!(
                    "PostgreSQL {}",
                    version.split_whitespace().next().unwrap_or("")
                ),
                epoch,
                timeout,
                revisions,
                leading,
                sslmode,
                follower,
            }),
        })
    }

    /// The store's epoch, as last read.
    pub fn epoch(&self) -> Uuid {
        *self.inner.epoch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The TLS mode of its connections, as libpq names it (`disable`, `prefer`,
    /// `require`, `verify-ca`, `verify-full`).
    pub fn sslmode(&self) -> &'static str {
        self.inner.sslmode
    }

    /// Runs `work` on a pooled connection within the store's timeout.
    async fn run<T>(
        &self,
        context: &str,
        work: impl AsyncFnOnce(&mut deadpool_postgres::Object) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        with_connection(&self.inner.pool, self.inner.timeout, context, work).await
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

/// What [`follow`] keeps up to date.
struct Following {
    revisions: watch::Sender<u64>,
    epoch: Arc<std::sync::Mutex<Uuid>>,
    leading: Arc<AtomicBool>,
    timeout: Duration,
}

/// Keeps `revisions` at the database's revision: raised by `NOTIFY` on a connection of its
/// own (reconnected when lost), and set to what a read every [`POLL_EVERY`] finds whatever
/// happens, lower ones too (a database restored from a backup), with the epoch. On the
/// listening connection, takes the chores lock when it is free and sets `leading` while
/// held; while leading, probes that connection every [`CHORES_TRY_EVERY`], and gives up
/// the chores and reconnects when the probe fails or outlasts the timeout (a connection
/// lost without a word would otherwise keep claiming them).
async fn follow(
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    pool: Pool,
    following: Following,
) {
    let Following {
        revisions,
        epoch,
        leading,
        timeout,
    } = following;
    let (notified_tx, mut notified) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let listener = async move {
        loop {
            let connected = tokio::time::timeout(timeout, config.connect(tls.clone())).await;
            if let Ok(Ok((client, mut connection))) = connected {
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
                    let listening = tokio::time::timeout(
                        timeout,
                        client.batch_execute(&format!("LISTEN {CHANNEL}")),
                    )
                    .await;
                    if !matches!(listening, Ok(Ok(()))) {
                        return;
                    }
                    let mut every = tokio::time::interval(CHORES_TRY_EVERY);
                    loop {
                        every.tick().await;
                        if leading.load(Ordering::Relaxed) {
                            // The lock is the session's: once taken it is held until this
                            // connection ends, so the leader only checks the connection.
                            let probe =
                                tokio::time::timeout(timeout, client.simple_query("SELECT 1"))
                                    .await;
                            if !matches!(probe, Ok(Ok(_))) {
                                return;
                            }
                            continue;
                        }
                        let tried = tokio::time::timeout(
                            timeout,
                            client.query_one("SELECT pg_try_advisory_lock($1)", &[&CHORES_LOCK]),
                        )
                        .await;
                        match tried {
                            Ok(Ok(row)) => leading.store(row.get(0), Ordering::Relaxed),
                            _ => return,
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
                    let read = with_connection(&pool, timeout, "reading the revision", async |client| {
                        client
                            .query_one("SELECT epoch, revision FROM charter_meta", &[])
                            .await
                            .map_err(db_error("reading the revision"))
                    })
                    .await;
                    if let Ok(row) = read {
                        let (seen, revision): (Uuid, i64) = (row.get(0), row.get(1));
                        let new_epoch = {
                            let mut epoch = epoch.lock().unwrap_or_else(|e| e.into_inner());
                            std::mem::replace(&mut *epoch, seen) != seen
                        };
                        if new_epoch {
                            // Another store under the same URL: news even at the same revision.
                            revisions.send_replace(revision as u64);
                        } else {
                            revisions.send_if_modified(|r| set(r, revision as u64));
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

/// Moves `current` up to `seen` (a notification or this process's own commit: the store
/// is at least there).
fn raise(current: &mut u64, seen: u64) -> bool {
    if seen > *current {
        *current = seen;
        true
    } else {
        false
    }
}

/// Moves `current` to `seen`, down too (a read of the database: the store is there).
fn set(current: &mut u64, seen: u64) -> bool {
    if seen != *current {
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
        self.run("reading licenses", async |client| {
            let tx = snapshot_read(client).await?;
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
        })
        .await
    }

    async fn changes_since(&self, base: u64) -> Result<Option<Changes>, StoreError> {
        self.run("reading what changed", async |client| {
            let tx = snapshot_read(client).await?;
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
            // An id stored again after its deletion is not deleted (a release before
            // version 2 left the deletion's row behind).
            let deleted = tx
                .query(
                    "SELECT id FROM charter_deletions d WHERE revision > $1
                     AND NOT EXISTS (SELECT 1 FROM charter_licenses l WHERE l.id = d.id) ORDER BY id",
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
        })
        .await
    }

    async fn commit(&self, base: u64, change: Change) -> Result<u64, StoreError> {
        let next = self
            .run("writing a license", async |client| {
                let tx = client
                    .transaction()
                    .await
                    .map_err(db_error("starting a write"))?;
                // A deletion is remembered for KEEP_DELETIONS revisions: older ones are
                // dropped and `forgotten` says up to where, so `changes_since` knows when it
                // cannot tell.
                let horizon = (base + 1).saturating_sub(KEEP_DELETIONS) as i64;
                let forget = matches!(change, Change::Delete(_));
                let bump = prepared(
                    &tx,
                    "UPDATE charter_meta SET revision = revision + 1,
                       forgotten = CASE WHEN $2 THEN GREATEST(forgotten, $3) ELSE forgotten END
                     WHERE revision = $1 RETURNING revision",
                )
                .await?;
                let bumped = tx
                    .query_opt(&bump, &[&(base as i64), &forget, &horizon])
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
                        let upsert = prepared(
                            &tx,
                            "INSERT INTO charter_licenses (id, payload, checksum, created_at, updated_at, revision)
                             VALUES ($1, $2, $3, $4, $5, $6)
                             ON CONFLICT (id) DO UPDATE SET payload = EXCLUDED.payload, checksum = EXCLUDED.checksum,
                               created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at, revision = EXCLUDED.revision",
                        )
                        .await?;
                        tx.execute(
                            &upsert,
                            &[&record.id, &record.payload, &record.checksum, &record.created_at, &record.updated_at, &next],
                        )
                        .await
                        .map_err(db_error("writing a license"))?;
                        let undelete =
                            prepared(&tx, "DELETE FROM charter_deletions WHERE id = $1").await?;
                        tx.execute(&undelete, &[&record.id])
                            .await
                            .map_err(db_error("writing a license"))?;
                    }
                    Change::Delete(id) => {
                        // The trigger of migration 3 records the deletion at `next`.
                        let delete =
                            prepared(&tx, "DELETE FROM charter_licenses WHERE id = $1").await?;
                        tx.execute(&delete, &[id])
                            .await
                            .map_err(db_error("deleting a license"))?;
                        let forget =
                            prepared(&tx, "DELETE FROM charter_deletions WHERE revision <= $1")
                                .await?;
                        tx.execute(&forget, &[&horizon])
                        .await
                        .map_err(db_error("deleting a license"))?;
                    }
                }
                let notify = prepared(&tx, "SELECT pg_notify($1, $2)").await?;
                tx.execute(&notify, &[&CHANNEL, &next.to_string()])
                    .await
                    .map_err(db_error("notifying the other control planes"))?;
                tx.commit().await.map_err(db_error("committing a write"))?;
                Ok(next as u64)
            })
            .await?;
        self.inner.revisions.send_if_modified(|r| raise(r, next));
        Ok(next)
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.revisions.subscribe()
    }

    fn seen_epoch(&self) -> Option<Uuid> {
        Some(self.epoch())
    }

    async fn apply_telemetry(&self, reports: Vec<Report>) -> Result<Vec<bool>, StoreError> {
        // Three statements whatever the batch's size (two per report took 3.5-4.4 s for the
        // batcher's largest, 4,096 reports; this takes 0.08-0.14 s). Every node gets its
        // row first, so two control planes given a new node's reports at once queue on that
        // row instead of each writing over the other; the rows are then locked and read,
        // the reports counted here (those of one node in this batch see each other's
        // effect, as on sled), and the rows written back. Ids go in sorted, so concurrent
        // batches lock their rows in one order.
        let mut nodes: Vec<&str> = reports.iter().map(|r| r.node_id.as_str()).collect();
        nodes.sort_unstable();
        nodes.dedup();
        self.run("applying telemetry", async |client| {
            let tx = client
                .transaction()
                .await
                .map_err(db_error("starting a telemetry write"))?;
            tx.execute(
                "INSERT INTO charter_usage (node_id, last_seq, buckets)
                 SELECT id, 0, '{}'::jsonb FROM unnest($1::text[]) AS id
                 ON CONFLICT (node_id) DO NOTHING",
                &[&nodes],
            )
            .await
            .map_err(db_error("adding usage rows"))?;
            let rows = tx
                .query(
                    "SELECT node_id, last_seq, buckets FROM charter_usage
                     WHERE node_id = ANY($1) ORDER BY node_id FOR UPDATE",
                    &[&nodes],
                )
                .await
                .map_err(db_error("reading usage"))?;
            let mut usage = std::collections::HashMap::with_capacity(rows.len());
            for row in &rows {
                let node_id: String = row.get(0);
                let buckets = serde_json::from_value(row.get(2))
                    .map_err(|e| StoreError::Corrupt(format!("usage of {node_id:?}: {e}")))?;
                let last_seq = row.get::<_, i64>(1) as u64;
                usage.insert(node_id, (last_seq, buckets, false));
            }
            let mut applied = Vec::with_capacity(reports.len());
            for report in &reports {
                let (last_seq, buckets, changed) = usage
                    .entry(report.node_id.clone())
                    .or_insert_with(|| (0, BTreeMap::new(), false));
                let fresh = report.seq > *last_seq;
                if fresh {
                    *last_seq = report.seq;
                    for (bucket, count) in &report.counters {
                        let total: &mut u64 = buckets.entry(bucket.clone()).or_default();
                        *total = total.saturating_add(*count);
                    }
                    *changed = true;
                }
                applied.push(fresh);
            }
            let mut ids = Vec::new();
            let mut seqs = Vec::new();
            let mut values = Vec::new();
            for (node_id, (last_seq, buckets, changed)) in &usage {
                if *changed {
                    ids.push(node_id.as_str());
                    seqs.push(*last_seq as i64);
                    values.push(
                        serde_json::to_value(buckets)
                            .map_err(|e| StoreError::Corrupt(format!("encoding usage: {e}")))?,
                    );
                }
            }
            if !ids.is_empty() {
                tx.execute(
                    "INSERT INTO charter_usage (node_id, last_seq, buckets)
                     SELECT * FROM unnest($1::text[], $2::int8[], $3::jsonb[])
                     ON CONFLICT (node_id) DO UPDATE
                     SET last_seq = EXCLUDED.last_seq, buckets = EXCLUDED.buckets",
                    &[&ids, &seqs, &values],
                )
                .await
                .map_err(db_error("writing usage"))?;
            }
            tx.commit()
                .await
                .map_err(db_error("committing telemetry"))?;
            Ok(applied)
        })
        .await
    }

    async fn usage(&self) -> Result<Vec<NodeUsage>, StoreError> {
        let rows = self
            .run("reading usage", async |client| {
                client
                    .query("SELECT node_id, last_seq, buckets FROM charter_usage", &[])
                    .await
                    .map_err(db_error("reading usage"))
            })
            .await?;
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

    /// One statement for the whole batch (a batch is every data plane that reported in the
    /// last second: thousands of rows would be as many round trips one by one).
    async fn put_data_planes(&self, records: Arc<[DataPlaneRecord]>) -> Result<(), StoreError> {
        // One row per id, the last given: a statement may not update a row twice.
        let mut latest: std::collections::HashMap<&str, &DataPlaneRecord> =
            std::collections::HashMap::with_capacity(records.len());
        for record in records.iter() {
            latest.insert(&record.id, record);
        }
        let mut ids = Vec::with_capacity(latest.len());
        let mut last_seen = Vec::with_capacity(latest.len());
        let mut values = Vec::with_capacity(latest.len());
        for record in latest.into_values() {
            ids.push(record.id.as_str());
            last_seen.push(record.last_seen);
            values.push(
                serde_json::to_value(record)
                    .map_err(|e| StoreError::Corrupt(format!("encoding data plane: {e}")))?,
            );
        }
        self.run("recording data planes", async |client| {
            client
                .execute(
                    "INSERT INTO charter_data_planes (id, last_seen, record)
                     SELECT * FROM unnest($1::text[], $2::int8[], $3::jsonb[])
                     ON CONFLICT (id) DO UPDATE SET last_seen = EXCLUDED.last_seen, record = EXCLUDED.record",
                    &[&ids, &last_seen, &values],
                )
                .await
                .map(drop)
                .map_err(db_error("recording data planes"))
        })
        .await
    }

    async fn data_planes(&self) -> Result<Vec<DataPlaneRecord>, StoreError> {
        let rows = self
            .run("reading data planes", async |client| {
                client
                    .query("SELECT record FROM charter_data_planes", &[])
                    .await
                    .map_err(db_error("reading data planes"))
            })
            .await?;
        rows.iter()
            .map(|row| {
                serde_json::from_value(row.get(0))
                    .map_err(|e| StoreError::Corrupt(format!("a data plane row: {e}")))
            })
            .collect()
    }

    async fn purge_data_planes(&self, last_seen_before: i64) -> Result<usize, StoreError> {
        self.run("purging data planes", async |client| {
            let purged = client
                .execute(
                    "DELETE FROM charter_data_planes WHERE last_seen < $1",
                    &[&last_seen_before],
                )
                .await
                .map_err(db_error("purging data planes"))?;
            Ok(purged as usize)
        })
        .await
    }

    fn leads_chores(&self) -> bool {
        self.inner.leading.load(Ordering::Relaxed)
    }

    /// Whether the database takes writes: it answers, is not a standby in recovery (a
    /// replica, or a former primary after a failover), and this session is not read-only.
    async fn check(&self) -> Result<(), StoreError> {
        const CONTEXT: &str = "checking the database";
        let (recovery, read_only) = self
            .run(CONTEXT, async |client| {
                let messages = client
                    .simple_query(
                        "SELECT pg_is_in_recovery(), current_setting('transaction_read_only')",
                    )
                    .await
                    .map_err(db_error(CONTEXT))?;
                let row = messages
                    .iter()
                    .find_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
                        _ => None,
                    })
                    .ok_or_else(|| StoreError::Backend {
                        context: CONTEXT.to_owned(),
                        source: "the server answered no row".into(),
                    })?;
                Ok((row.get(0) == Some("t"), row.get(1) == Some("on")))
            })
            .await?;
        let why = if recovery {
            "the server is a standby in recovery and takes no writes"
        } else if read_only {
            "the database is read-only (default_transaction_read_only)"
        } else {
            return Ok(());
        };
        Err(StoreError::Unavailable {
            context: CONTEXT.to_owned(),
            source: why.into(),
        })
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.inner.follower.abort();
        self.inner.pool.close();
        Ok(())
    }
}
