//! Shared helpers for the end-to-end tests in `tests/`: finding the built binaries,
//! starting a real control plane on a free loopback port with a temp data dir (or a
//! private PostgreSQL), signing licenses with a test vendor key, speaking HTTP, and
//! waiting with a bound.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use charter_license::LicenseSigner;
use charter_store::testing::TestPostgres;
use serde_json::{json, Map, Value};

/// The path of a workspace binary built by `cargo build --workspace --bins` (the test
/// command builds them first). Test executables live in `target/<profile>/deps`, the
/// binaries one level up.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --workspace --bins` first (scripts/test does)",
        path.display()
    );
    path
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// Runs a binary with arguments to completion, with no standard input.
pub fn run(name: &str, args: &[&str]) -> Output {
    Command::new(bin(name))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {name}: {e}"))
}

/// Polls `check` until it returns `Some`, or panics after `timeout` naming `what`.
pub fn eventually<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; the caller binds it next).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral loopback port")
}

/// A loopback port where nothing listens, for an upstream that is down. Not one from
/// [`free_port`]: a port that is free now may be handed out again to a server the test
/// starts next (a gate whose upstream is its own listener forwards to itself), while the
/// kernel hands out only ports from its ephemeral range, and this is one below 1024 that
/// refuses connections.
pub fn refused_port() -> u16 {
    [1, 9, 13, 19, 37, 79, 113, 119]
        .into_iter()
        .find(|&port| {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
        })
        .expect("a low loopback port that refuses connections")
}

/// A test vendor: a signing key, and its public key written to a file for `--trusted-key`.
pub struct Vendor {
    signer: LicenseSigner,
    /// The SPKI PEM public key file.
    pub public_key: PathBuf,
}

impl Vendor {
    /// A vendor whose key is derived from `seed`, its public key written into `dir`.
    pub fn new(dir: &Path, seed: u8) -> Vendor {
        let signer = LicenseSigner::from_seed([seed; 32]);
        let public_key = dir.join(format!("vendor-{seed}.pub"));
        fs::write(&public_key, signer.trusted_key().to_pem()).expect("writing the public key");
        Vendor { signer, public_key }
    }

    /// The key id of this vendor's key.
    pub fn key_id(&self) -> String {
        self.signer.key_id().to_string()
    }

    /// A signed license document for `license_key`, created and expiring on the given days.
    pub fn license(&self, license_key: &str, created: &str, expires: &str) -> String {
        self.sign(payload(license_key, created, expires))
    }

    /// A signed license valid for years from 2026-01-01.
    pub fn valid(&self, license_key: &str) -> String {
        self.license(license_key, "2026-01-01", "2099-12-31")
    }

    /// Signs a payload object.
    pub fn sign(&self, payload: Map<String, Value>) -> String {
        self.signer
            .sign(payload)
            .expect("test payload has Kong's shape")
            .to_json()
    }
}

/// A Kong-shaped payload.
pub fn payload(license_key: &str, created: &str, expires: &str) -> Map<String, Value> {
    let Value::Object(map) = json!({
        "admin_seats": "1",
        "customer": "Example Company, Inc",
        "dataplanes": "1",
        "license_creation_date": created,
        "license_expiration_date": expires,
        "license_key": license_key,
        "product_subscription": "Charter Enterprise",
        "support_plan": "None",
    }) else {
        unreachable!("an object literal")
    };
    map
}

/// Cluster certificates made by the real `charterctl gen-cert --ca` in `dir/certs`.
pub fn cluster_certs(dir: &Path) -> PathBuf {
    let certs = dir.join("certs");
    if !certs.join("cluster.crt").exists() {
        let out = run(
            "charterctl",
            &["gen-cert", "--ca", "--out-dir", &certs.to_string_lossy()],
        );
        assert!(
            out.status.success(),
            "gen-cert: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    certs
}

/// The `charter-cp` flags for a shared-mode mTLS cluster port with the certificates in `certs`.
pub fn shared_tls_args(certs: &Path) -> Vec<String> {
    vec![
        "--cluster-cert".into(),
        certs.join("cluster.crt").to_string_lossy().into_owned(),
        "--cluster-cert-key".into(),
        certs.join("cluster.key").to_string_lossy().into_owned(),
    ]
}

/// Where a control plane keeps its licenses: the two storage backends of DESIGN.md, so
/// one test body can run against each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// sled in `--data-dir` (the default).
    Sled,
    /// A private PostgreSQL server started for the control plane (`--database-url`).
    Postgres,
}

impl Backend {
    /// How `db_version` in `/license/report` starts on this backend.
    pub fn db_version_prefix(self) -> &'static str {
        match self {
            Backend::Sled => "sled 0.34",
            Backend::Postgres => "PostgreSQL",
        }
    }
}

/// A running `charter-cp` process, killed when dropped. Its cluster port speaks shared-mode
/// mTLS with the certificates of [`cluster_certs`] unless the flags say otherwise.
pub struct Cp {
    child: Option<Child>,
    /// The PostgreSQL server of a control plane started on [`Backend::Postgres`]. It is
    /// dropped after the process is killed (`Drop` runs before the fields are dropped), and
    /// lives across [`Cp::restart`], so what was stored survives a restart.
    _database: Option<TestPostgres>,
    /// The admin API address.
    pub addr: SocketAddr,
    /// The cluster (gRPC) address.
    pub cluster_addr: SocketAddr,
    /// The certificates directory.
    pub certs: PathBuf,
    /// The data directory.
    pub data_dir: PathBuf,
    /// Its stderr (logs).
    pub log: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

impl Cp {
    /// Starts `charter-cp` with `--data-dir dir/cp-data`, a free admin port, the given
    /// extra arguments, and waits until `GET /status` answers.
    pub fn start(dir: &Path, args: &[&str]) -> Cp {
        Cp::start_with_env(dir, args, &[])
    }

    /// [`Cp::start`] with extra environment variables.
    pub fn start_with_env(dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Cp {
        Cp::start_on_with_env(Backend::Sled, dir, args, envs)
    }

    /// [`Cp::start`] on a storage backend: with [`Backend::Postgres`] a private PostgreSQL
    /// server is started for this control plane (and stopped with it), and its URL passed
    /// as `--database-url`.
    pub fn start_on(backend: Backend, dir: &Path, args: &[&str]) -> Cp {
        Cp::start_on_with_env(backend, dir, args, &[])
    }

    /// [`Cp::start_on`] with extra environment variables.
    pub fn start_on_with_env(
        backend: Backend,
        dir: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Cp {
        let certs = cluster_certs(dir);
        let database = (backend == Backend::Postgres).then(TestPostgres::start);
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        if let Some(database) = &database {
            args.extend(["--database-url".to_owned(), database.url()]);
        }
        let mut cp = Cp {
            child: None,
            _database: database,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            cluster_addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            certs,
            data_dir: dir.join("cp-data"),
            log: dir.join("cp.log"),
            args,
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        cp.restart();
        cp
    }

    /// (Re)starts the process on a fresh admin port (the same cluster port, so data planes
    /// find it again) with the same data dir and flags.
    pub fn restart(&mut self) {
        self.kill();
        for _attempt in 0..3 {
            self.addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let log = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .expect("opening the CP log");
            let mut command = Command::new(bin("charter-cp"));
            command
                .arg("--data-dir")
                .arg(&self.data_dir)
                .arg("--admin-listen")
                .arg(self.addr.to_string())
                .arg("--cluster-listen")
                .arg(self.cluster_addr.to_string())
                .args(self.cluster_args())
                .args(&self.args)
                .env_remove("CHARTER_LICENSE_DATA")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log);
            for (k, v) in &self.envs {
                command.env(k, v);
            }
            let mut child = command.spawn().expect("spawning charter-cp");
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    // Lost the port race, or a real start-up failure: retry, then report.
                    eprintln!("charter-cp exited during start-up: {status}");
                    break;
                }
                if http("GET", &format!("http://{}/status", self.addr), None).is_ok() {
                    self.child = Some(child);
                    return;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!(
                        "charter-cp did not answer /status within 20 s; log:\n{}",
                        self.logs()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("charter-cp failed to start 3 times; log:\n{}", self.logs());
    }

    /// TLS flags unless the test chose its own cluster transport.
    fn cluster_args(&self) -> Vec<String> {
        let chosen = self.args.iter().any(|a| a.starts_with("--cluster-"))
            || self
                .envs
                .iter()
                .any(|(k, _)| k.starts_with("CHARTER_CLUSTER_"));
        if chosen {
            Vec::new()
        } else {
            shared_tls_args(&self.certs)
        }
    }

    /// Every license id this control plane lists, read page by page.
    pub fn stored_ids(&self) -> std::collections::HashSet<String> {
        let mut ids = std::collections::HashSet::new();
        let mut path = "/licenses?size=1000".to_owned();
        for _ in 0..1000 {
            let page = self.get(&path);
            assert_eq!(page.status, 200, "{}", page.body);
            let page = page.json();
            for record in page["data"].as_array().expect("data") {
                ids.insert(record["id"].as_str().expect("id").to_owned());
            }
            match page["next"].as_str() {
                Some(next) => path = next.to_owned(),
                None => return ids,
            }
        }
        panic!("more than 1000 pages");
    }

    /// The URL of a path on the admin API.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Everything the process logged so far.
    pub fn logs(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and wait (bounded) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the CP is running");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("waiting for charter-cp") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("charter-cp did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `GET` a path, expecting an answer.
    pub fn get(&self, path: &str) -> Resp {
        request("GET", &self.url(path), None)
    }

    /// A request with a JSON body.
    pub fn send_json(&self, method: &str, path: &str, body: &Value) -> Resp {
        request(method, &self.url(path), Some(Body::Json(body.clone())))
    }

    /// A request with a form body.
    pub fn send_form(&self, method: &str, path: &str, fields: &[(&str, &str)]) -> Resp {
        let fields = fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        request(method, &self.url(path), Some(Body::Form(fields)))
    }

    /// A request with no body.
    pub fn send(&self, method: &str, path: &str) -> Resp {
        request(method, &self.url(path), None)
    }

    /// `POST /licenses` with a JSON body, expecting 201; returns the record.
    pub fn add(&self, document: &str) -> Value {
        let resp = self.send_json("POST", "/licenses", &json!({ "payload": document }));
        assert_eq!(resp.status, 201, "POST /licenses: {}", resp.body);
        resp.json()
    }
}

impl Drop for Cp {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A request body.
#[derive(Clone, Debug)]
pub enum Body {
    /// `application/json`.
    Json(Value),
    /// `application/x-www-form-urlencoded`.
    Form(Vec<(String, String)>),
    /// Raw bytes with a content type.
    Raw(String, Vec<u8>),
}

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct Resp {
    /// Status code.
    pub status: u16,
    /// Body text.
    pub body: String,
    /// Content type.
    pub content_type: String,
}

impl Resp {
    /// The body as JSON (panics with the body if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

/// Sends a request; `Err` only for transport failures (refused, reset, timeout).
pub fn http(method: &str, url: &str, body: Option<Body>) -> Result<Resp, String> {
    http_with_headers(method, url, body, &[])
}

/// [`http`] with extra headers.
pub fn http_with_headers(
    method: &str,
    url: &str,
    body: Option<Body>,
    headers: &[(&str, &str)],
) -> Result<Resp, String> {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(20))
        .build();
    let mut req = agent.request(method, url);
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let result = match body {
        None => req.call(),
        Some(Body::Json(v)) => req.send_json(v),
        Some(Body::Form(fields)) => {
            let pairs: Vec<(&str, &str)> = fields
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            req.send_form(&pairs)
        }
        Some(Body::Raw(content_type, bytes)) => {
            req.set("Content-Type", &content_type).send_bytes(&bytes)
        }
    };
    let response = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(e.to_string()),
    };
    let status = response.status();
    let content_type = response.content_type().to_owned();
    let body = response
        .into_string()
        .map_err(|e| format!("reading body: {e}"))?;
    Ok(Resp {
        status,
        body,
        content_type,
    })
}

/// Sends a request that must get an answer.
pub fn request(method: &str, url: &str, body: Option<Body>) -> Resp {
    http(method, url, body).unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

/// A running `charter-dp` process, killed when dropped.
pub struct Dp {
    child: Option<Child>,
    /// The status API address.
    pub status_addr: SocketAddr,
    /// The data directory.
    pub data_dir: PathBuf,
    /// Its stderr (logs).
    pub log: PathBuf,
    args: Vec<String>,
    /// Run on CPU 0 only (`taskset`), as a process given one CPU is.
    one_cpu: bool,
}

impl Dp {
    /// Starts `charter-dp` named `name` (data dir `dir/NAME-data`) against `cp`'s cluster
    /// port with shared-mode mTLS, trusting `trusted_key`, plus extra flags; waits until its
    /// status API answers (not until it is ready).
    pub fn start(dir: &Path, name: &str, cp: &Cp, trusted_key: &Path, extra: &[&str]) -> Dp {
        Dp::start_on(dir, name, &[cp], trusted_key, extra)
    }

    /// [`Dp::start`] with several control planes (`--control-plane A,B`), which must share
    /// the first one's cluster certificate.
    pub fn start_on(dir: &Path, name: &str, cps: &[&Cp], trusted_key: &Path, extra: &[&str]) -> Dp {
        let addresses: Vec<SocketAddr> = cps.iter().map(|cp| cp.cluster_addr).collect();
        Dp::start_at(dir, name, &addresses, &cps[0].certs, trusted_key, extra)
    }

    /// [`Dp::start_on`] with the control plane addresses given (say, a proxy in front of
    /// one) and the shared cluster certificate in `certs`.
    pub fn start_at(
        dir: &Path,
        name: &str,
        addresses: &[SocketAddr],
        certs: &Path,
        trusted_key: &Path,
        extra: &[&str],
    ) -> Dp {
        let addresses: Vec<String> = addresses.iter().map(ToString::to_string).collect();
        let mut args = vec![
            "--control-plane".to_owned(),
            addresses.join(","),
            "--trusted-key".to_owned(),
            trusted_key.to_string_lossy().into_owned(),
        ];
        if !extra.iter().any(|a| a.starts_with("--cluster-")) {
            args.extend(shared_tls_args(certs));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut dp = Dp {
            child: None,
            status_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: dir.join(format!("{name}-data")),
            log: dir.join(format!("{name}.log")),
            args,
            one_cpu: false,
        };
        dp.restart();
        dp
    }

    /// Restarts it on CPU 0 only (`taskset --cpu-list 0`, which then runs the binary
    /// itself), as a process given one CPU by its affinity or quota runs.
    pub fn restart_on_one_cpu(&mut self) {
        self.one_cpu = true;
        self.restart();
    }

    /// (Re)starts the process with the same data dir and flags, on a fresh status port.
    pub fn restart(&mut self) {
        self.kill();
        for _attempt in 0..3 {
            self.status_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let log = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .expect("opening the DP log");
            let mut command = Command::new(bin("charter-dp"));
            if self.one_cpu {
                command = Command::new("taskset");
                command.args(["--cpu-list", "0"]).arg(bin("charter-dp"));
            }
            let mut child = command
                .arg("--data-dir")
                .arg(&self.data_dir)
                .arg("--status-listen")
                .arg(self.status_addr.to_string())
                .args(&self.args)
                .env_remove("CHARTER_LICENSE_DATA")
                .env("CHARTER_LOG", "info,charter_dp=debug")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawning charter-dp");
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    eprintln!("charter-dp exited during start-up: {status}");
                    break;
                }
                if http("GET", &format!("http://{}/status", self.status_addr), None).is_ok() {
                    self.child = Some(child);
                    return;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!(
                        "charter-dp did not answer /status within 20 s; log:\n{}",
                        self.logs()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("charter-dp failed to start 3 times; log:\n{}", self.logs());
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `GET` a path on the status API.
    pub fn get(&self, path: &str) -> Resp {
        request("GET", &format!("http://{}{}", self.status_addr, path), None)
    }

    /// The `Via` entry its gate adds to a message received over `protocol` (`1.1`, `2`):
    /// its pseudonym is `charter-` and the first 8 hex digits of its node id.
    pub fn via(&self, protocol: &str) -> String {
        let status = self.get("/status").json();
        let node = status["node_id"].as_str().expect("a node_id in /status");
        format!("{protocol} charter-{}", &node.replace('-', "")[..8])
    }

    /// `GET /license`.
    pub fn license(&self) -> Value {
        let resp = self.get("/license");
        assert_eq!(resp.status, 200, "GET /license: {}", resp.body);
        resp.json()
    }

    /// Waits (bounded) until `/license` satisfies `check`, and returns it.
    pub fn wait_license(&self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        let found = (0..400).find_map(|_| {
            let license = self.license();
            if check(&license) {
                return Some(license);
            }
            last = license;
            std::thread::sleep(Duration::from_millis(25));
            None
        });
        found.unwrap_or_else(|| {
            panic!(
                "data plane never showed {what}; last /license: {last}\nlog:\n{}",
                self.logs()
            )
        })
    }

    /// Everything the process logged so far.
    pub fn logs(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Dp {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A directory laid out like a Kubernetes Secret volume: each file is a symlink through
/// `..data`, itself a symlink to a timestamped directory, and an update writes a new
/// directory and swaps `..data` in one rename (the kubelet's atomic writer).
pub struct SecretMount {
    /// The mount point; the files are `dir/NAME`.
    pub dir: PathBuf,
    version: u32,
}

impl SecretMount {
    /// A mount at `dir` holding `files` (name, contents).
    pub fn new(dir: &Path, files: &[(&str, &[u8])]) -> SecretMount {
        fs::create_dir_all(dir).expect("creating the mount");
        let mut mount = SecretMount {
            dir: dir.to_path_buf(),
            version: 0,
        };
        mount.update(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name))
                .expect("linking a mounted file");
        }
        mount
    }

    /// The path of a mounted file.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Replaces every file at once, as a Secret update does.
    pub fn update(&mut self, files: &[(&str, &[u8])]) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        fs::create_dir(self.dir.join(&version)).expect("creating a mount version");
        for (name, contents) in files {
            fs::write(self.dir.join(&version).join(name), contents).expect("writing a file");
        }
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).expect("linking the new version");
        fs::rename(&tmp, self.dir.join("..data")).expect("swapping ..data");
    }
}

/// Sends `SIGHUP` to a process.
pub fn hangup(pid: u32) {
    let status = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("running kill");
    assert!(status.success(), "kill -HUP {pid} failed");
}
