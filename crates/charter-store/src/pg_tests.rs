//! The PostgreSQL backend against the [`Store`] contract, on a real PostgreSQL server that
//! the test starts itself (its own temp dir, port and socket dir; as an unprivileged user
//! when the tests run as root, since PostgreSQL refuses root).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::{checksum_of, Change, LicenseRecord, PgStore, Report, Store, StoreError};

/// A private PostgreSQL server, stopped and removed when dropped.
struct TestPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    child: Option<Child>,
    as_user: Option<&'static str>,
}

/// The directory of the installed PostgreSQL server binaries (Debian's layout, or `PATH`).
fn server_bin() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("postgres").exists())
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!("no PostgreSQL server in /usr/lib/postgresql/*/bin: run scripts/install-deps")
    })
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|l| l.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}

impl TestPostgres {
    fn start() -> TestPostgres {
        let bin = server_bin();
        let dir = tempfile::Builder::new()
            .prefix("charter-pg-")
            .tempdir()
            .expect("temp dir");
        let as_user = running_as_root().then_some("nobody");
        if as_user.is_some() {
            let out = Command::new("chown")
                .args(["nobody:nogroup"])
                .arg(dir.path())
                .output()
                .expect("chown");
            assert!(out.status.success(), "{out:?}");
        }
        let mut pg = TestPostgres {
            dir,
            bin,
            port: 0,
            child: None,
            as_user,
        };
        let data = pg.data();
        let out = pg
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "charter", "-A", "trust", "-E", "UTF8", "--no-sync"])
            .output()
            .expect("running initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.launch();
        let out = pg
            .command("createdb")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &pg.port.to_string(),
                "-U",
                "charter",
                "charter",
            ])
            .output()
            .expect("running createdb");
        assert!(
            out.status.success(),
            "createdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        match self.as_user {
            Some(user) => {
                let mut command = Command::new("runuser");
                command.args(["-u", user, "--"]).arg(path);
                command
            }
            None => Command::new(path),
        }
    }

    /// Starts the server on a free port and waits until it takes connections.
    fn launch(&mut self) {
        if self.port == 0 {
            self.port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
        }
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data())
            .args([
                "-p",
                &self.port.to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
            ])
            .arg("-k")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting postgres");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = self
                .command("pg_isready")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "charter",
                ])
                .output()
                .is_ok_and(|o| o.status.success());
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not start within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`: no shutdown checkpoint, as a
    /// crash).
    fn stop_immediately(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["stop", "-m", "immediate", "-w"])
            .output();
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("postgres://charter@127.0.0.1:{}/charter", self.port)
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        self.stop_immediately();
    }
}

fn record(n: u8, payload: &str) -> LicenseRecord {
    LicenseRecord {
        id: Uuid::from_bytes([n; 16]),
        payload: payload.to_owned(),
        checksum: checksum_of(payload),
        created_at: 10,
        updated_at: 20 + i64::from(n),
        revision: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_store_keeps_the_store_contract_across_control_planes() {
    let mut pg = TestPostgres::start();
    let a = PgStore::open(&pg.url()).await.expect("open a");
    let b = PgStore::open(&pg.url())
        .await
        .expect("open b (migrations already applied)");
    assert_eq!(a.epoch(), b.epoch(), "one database, one epoch");
    assert!(
        a.backend_version().starts_with("PostgreSQL "),
        "{}",
        a.backend_version()
    );

    // Writes on either store are one sequence of revisions.
    assert_eq!(a.commit(0, Change::Put(record(1, "one"))).await.unwrap(), 1);
    let err = b
        .commit(0, Change::Put(record(2, "two")))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Conflict {
                expected: 0,
                actual: 1
            }
        ),
        "{err:?}"
    );
    assert_eq!(b.commit(1, Change::Put(record(2, "two"))).await.unwrap(), 2);
    assert_eq!(
        a.commit(2, Change::Delete(Uuid::from_bytes([1; 16])))
            .await
            .unwrap(),
        3
    );

    // The other store hears of every write (a notification, or the once-a-second read).
    let mut revisions = a.subscribe();
    tokio::time::timeout(Duration::from_secs(5), revisions.wait_for(|r| *r >= 3))
        .await
        .expect("store a follows b's writes within 5 s")
        .unwrap();
    let loaded = a.load().await.unwrap();
    assert_eq!(loaded.revision, 3);
    let ids: Vec<u8> = loaded.licenses.iter().map(|r| r.id.as_bytes()[0]).collect();
    assert_eq!(ids, vec![2]);
    assert_eq!(loaded.licenses[0].revision, 2);

    // Telemetry exactly once per (node, seq), whichever store receives it.
    let report = |seq| Report {
        node_id: "dp-1".into(),
        seq,
        counters: vec![("2026-12".into(), 5)],
    };
    assert_eq!(
        a.apply_telemetry(vec![report(1)]).await.unwrap(),
        vec![true]
    );
    assert_eq!(
        b.apply_telemetry(vec![report(1), report(2)]).await.unwrap(),
        vec![false, true]
    );
    let usage = a.usage().await.unwrap();
    assert_eq!((usage[0].last_seq, usage[0].buckets["2026-12"]), (2, 10));

    // The database goes away and comes back: the stores answer errors meanwhile, then
    // work again without being reopened.
    pg.stop_immediately();
    assert!(a.check().await.is_err());
    assert!(a.commit(3, Change::Put(record(3, "three"))).await.is_err());
    pg.launch();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match a.commit(3, Change::Put(record(3, "three"))).await {
            Ok(revision) => {
                assert_eq!(revision, 4);
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "no write after the restart: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(b.load().await.unwrap().licenses.len(), 2);
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test]
async fn a_schema_newer_than_this_release_is_refused() {
    let pg = TestPostgres::start();
    let store = PgStore::open(&pg.url()).await.expect("open");
    store.close().await.unwrap();
    let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .execute("INSERT INTO charter_schema (version) VALUES (999)", &[])
        .await
        .unwrap();
    let err = PgStore::open(&pg.url()).await.err().expect("refused");
    assert!(err.to_string().contains("newer than this release"), "{err}");
}
