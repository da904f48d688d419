//! The private PostgreSQL server of the PostgreSQL benchmarks (`admin --postgres`,
//! `fanout-ha`): charter-store's `TestPostgres` (initdb in a temp dir, its own port, run as
//! `nobody` when the bench runs as root), placed on the servers' CPU, and its CPU time.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use charter_store::testing::TestPostgres;
use tokio_postgres::{Client, NoTls};

use crate::procs::{self, Pinning};

/// A private PostgreSQL server, stopped and removed when dropped.
pub struct Postgres {
    server: TestPostgres,
    postmaster: u32,
    data_dir: PathBuf,
    version: String,
}

impl Postgres {
    /// Starts a fresh server (with a database `charter`) and moves it, and every backend
    /// it starts later, to the servers' CPU.
    pub async fn start(pinning: &Pinning) -> Result<Postgres> {
        // `TestPostgres::start` is a test helper: it panics, with the reason on stderr.
        let server = tokio::task::spawn_blocking(TestPostgres::start)
            .await
            .map_err(|_| {
                anyhow!("could not start a private PostgreSQL server (scripts/install-deps installs one)")
            })?;
        let client = connect(&server.url()).await?;
        let row = client
            .query_one("SELECT current_setting('data_directory'), version()", &[])
            .await
            .context("asking PostgreSQL for its data directory")?;
        let data_dir = PathBuf::from(row.get::<_, String>(0));
        let version: String = row.get(1);
        let pid_file = data_dir.join("postmaster.pid");
        let postmaster = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.lines().next()?.trim().parse().ok())
            .with_context(|| format!("reading the server's pid from {}", pid_file.display()))?;
        // The postmaster, and what it runs already (a child may end meanwhile, so only the
        // postmaster must be pinned); backends forked later inherit its placement.
        pinning.pin_process(postmaster)?;
        for pid in procs::descendants(postmaster)?.into_iter().skip(1) {
            let _ = pinning.pin_process(pid);
        }
        Ok(Postgres {
            server,
            postmaster,
            data_dir,
            version: version.split(" on ").next().unwrap_or(&version).to_owned(),
        })
    }

    /// The URL of the database `charter`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Creates database `name` on this server; its URL.
    pub async fn create_database(&self, name: &str) -> Result<String> {
        connect(&self.url())
            .await?
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("creating database {name}"))?;
        let url = self.url();
        let server = url
            .rsplit_once('/')
            .map_or(url.as_str(), |(server, _)| server);
        Ok(format!("{server}/{name}"))
    }

    /// "PostgreSQL 16.x" and where its data directory is.
    pub fn describe(&self) -> String {
        format!(
            "{}, a private server with its data in {}",
            self.version,
            self.data_dir.display()
        )
    }

    /// Where its data (and its write-ahead log) is.
    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    /// CPU time of the server's processes so far, ended backends included.
    pub fn cpu_time(&self) -> Result<Duration> {
        procs::tree_cpu_time(self.postmaster)
    }
}

/// Connects a client to `url`, its connection driven by a task on the current runtime.
pub async fn connect(url: &str) -> Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .context("connecting to the bench's PostgreSQL")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}
