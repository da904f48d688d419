//! A private PostgreSQL server for tests (feature `test-postgres`): initdb in a temp dir,
//! its own port and socket dir, run as `nobody` when the tests run as root (PostgreSQL
//! refuses root), stopped and removed when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A private PostgreSQL server, stopped and removed when dropped.
pub struct TestPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    child: Option<Child>,
    as_user: Option<&'static str>,
    /// Whether the server offers TLS (see [`TestPostgres::start_with_tls`]).
    tls: bool,
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
    /// Starts a fresh server with a database `charter` owned by user `charter`.
    pub fn start() -> TestPostgres {
        TestPostgres::start_with(None)
    }

    /// [`TestPostgres::start`] with TLS offered (`ssl=on`) with this PEM certificate chain
    /// and key; clients may still connect without TLS.
    pub fn start_with_tls(cert_pem: &str, key_pem: &str) -> TestPostgres {
        TestPostgres::start_with(Some((cert_pem, key_pem)))
    }

    fn start_with(tls: Option<(&str, &str)>) -> TestPostgres {
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
            tls: tls.is_some(),
        };
        if let Some((cert, key)) = tls {
            pg.write_private("server.crt", cert);
            pg.write_private("server.key", key);
        }
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

    /// Writes a file only the server's user may read (PostgreSQL insists for its key).
    fn write_private(&self, name: &str, text: &str) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("writing a server TLS file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
        if let Some(user) = self.as_user {
            let out = Command::new("chown")
                .arg(user)
                .arg(&path)
                .output()
                .expect("chown");
            assert!(out.status.success(), "{out:?}");
        }
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

    /// Starts the server (again, on the same port) and waits until it takes connections.
    pub fn launch(&mut self) {
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
            .args(if self.tls {
                vec![
                    "-c".to_owned(),
                    "ssl=on".to_owned(),
                    "-c".to_owned(),
                    format!(
                        "ssl_cert_file={}",
                        self.dir.path().join("server.crt").display()
                    ),
                    "-c".to_owned(),
                    format!(
                        "ssl_key_file={}",
                        self.dir.path().join("server.key").display()
                    ),
                ]
            } else {
                Vec::new()
            })
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
    pub fn stop_immediately(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["stop", "-m", "immediate", "-w"])
            .output();
        if let Some(mut child) = self.child.take() {
            // Should `runuser` have stopped itself after a `freeze`, it could not end.
            signal("CONT", &[child.id()]);
            let _ = child.wait();
        }
    }

    /// The database's URL.
    pub fn url(&self) -> String {
        format!("postgres://charter@127.0.0.1:{}/charter", self.port)
    }

    /// Runs `statements` (one or more, `;`-separated) on the database, as an operator's
    /// `psql` would, on a connection of its own.
    pub async fn execute(&self, statements: &str) {
        let (client, connection) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .expect("connecting to the test database");
        let connection = tokio::spawn(connection);
        client
            .batch_execute(statements)
            .await
            .unwrap_or_else(|e| panic!("{statements}: {e:?}"));
        drop(client);
        let _ = connection.await;
    }

    /// Stops every process of the server (SIGSTOP: the process that launched it, the
    /// postmaster, then its children) until the returned guard is dropped (SIGCONT), as a
    /// host that stops answering: connections stay open, nothing answers on them, and new
    /// ones are never served.
    pub fn freeze(&self) -> Frozen<'_> {
        let pid_file = self.data().join("postmaster.pid");
        let text = std::fs::read_to_string(&pid_file).expect("reading postmaster.pid");
        let postmaster: u32 = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("a pid in postmaster.pid");
        // The guard first: whatever fails from here on, the processes are continued.
        let mut frozen = Frozen {
            stopped: Vec::new(),
            _server: std::marker::PhantomData,
        };
        // `runuser` (when the tests run as root) stops itself when it sees its child stop,
        // and would stay stopped: stop it first, and wait until it is, so it never sees
        // the postmaster stop.
        if let Some(launcher) = self.child.as_ref().map(Child::id) {
            if launcher != postmaster {
                frozen.stop(&[launcher]);
                let deadline = Instant::now() + Duration::from_secs(10);
                while !is_stopped(launcher) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        frozen.stop(&[postmaster]);
        // The postmaster stopped forks no more children: these are all of them.
        frozen.stop(&children_of(postmaster));
        frozen
    }
}

/// The server's processes stopped by [`TestPostgres::freeze`]; continued when dropped
/// (also when a test panics), in the reverse order.
pub struct Frozen<'a> {
    stopped: Vec<u32>,
    _server: std::marker::PhantomData<&'a TestPostgres>,
}

impl Frozen<'_> {
    fn stop(&mut self, pids: &[u32]) {
        self.stopped.extend_from_slice(pids);
        signal("STOP", pids);
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        let reversed: Vec<u32> = self.stopped.iter().rev().copied().collect();
        signal("CONT", &reversed);
    }
}

/// Sends the signal `name` to each of `pids`, in order; a process already gone is skipped.
fn signal(name: &str, pids: &[u32]) {
    for pid in pids {
        let _ = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .stderr(Stdio::null())
            .status();
    }
}

/// Whether the process `pid` is stopped (state `T` in `/proc/PID/stat`).
fn is_stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|s| s == "T"))
        })
        .unwrap_or(false)
}

/// The processes whose parent is `parent` (from `/proc/*/stat`).
fn children_of(parent: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("reading /proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            children.push(pid);
        }
    }
    children
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        self.stop_immediately();
    }
}
