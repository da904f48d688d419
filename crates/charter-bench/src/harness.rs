//! The harness every benchmark runs on: CPU pinning, server processes started on a free
//! loopback port and killed on drop, CPU and memory accounting from `/proc`, the private
//! PostgreSQL server, and the little statistics the reports use.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use charter_license::LicenseSigner;
use charter_store::testing::TestPostgres;
use charter_tls::TlsFiles;
use clap::builder::RangedU64ValueParser;
use procfs::process::Process;
use procfs::{CurrentSI, KernelStats};
use serde_json::{json, Map, Value};
use tempfile::TempDir;
use tokio_postgres::{Client, NoTls};

use crate::load::Http;

/// The core the servers run on, and the core the load generator runs on, when pinned.
pub const SERVER_CORE: usize = 0;
/// See [`SERVER_CORE`].
pub const CLIENT_CORE: usize = 1;
/// Other processes' CPU use, in cores, above which a measurement counts as disturbed
/// (process CPU time is counted in 10 ms ticks, so a little noise is normal).
pub const OTHER_LOAD_LIMIT: f64 = 0.1;
/// Steal time share of any CPU above which a measurement counts as disturbed.
pub const STEAL_LIMIT: f64 = 0.03;
/// The pause before measuring a disturbed window again.
const RETRY_PAUSE: Duration = Duration::from_secs(2);

/// The flags every benchmark shares: where the binaries and the temporary files are, and
/// whether to pin.
#[derive(Debug, Clone, clap::Args, serde::Serialize)]
pub struct Common {
    /// The charter-cp binary (a release build). Default: next to this executable.
    #[arg(long)]
    pub cp_bin: Option<PathBuf>,
    /// The charter-dp binary (`gate`). Default: next to this executable.
    #[arg(long)]
    pub dp_bin: Option<PathBuf>,
    /// The charterctl binary that makes the cluster certificate. Default: next to this
    /// executable.
    #[arg(long)]
    pub ctl_bin: Option<PathBuf>,
    /// Directory for the run's temporary files (on the disk to measure). Default: the
    /// system temp dir.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Do not pin the servers and the load generator to separate CPUs.
    #[arg(long)]
    pub no_pin: bool,
}

/// The parser of a flag's whole number from `min` to `max`.
pub fn range<T: TryFrom<u64> + Clone + Send + Sync + 'static>(
    min: u64,
    max: u64,
) -> RangedU64ValueParser<T> {
    RangedU64ValueParser::new().range(min..=max)
}

/// How the processes of this run are placed on CPUs.
#[derive(Debug, Clone)]
pub enum Pinning {
    /// Servers on [`SERVER_CORE`], this process on [`CLIENT_CORE`], with `taskset`.
    Pinned,
    /// No pinning, and why.
    Unpinned(String),
}

impl Pinning {
    /// Pins this process (every thread it has so far, and so every thread it starts later)
    /// to [`CLIENT_CORE`] if `taskset` exists and there are two cores to use. Call it before
    /// starting any runtime, so no thread escapes.
    pub fn apply(wanted: bool) -> Pinning {
        if !wanted {
            return Pinning::Unpinned("pinning turned off".to_owned());
        }
        let cores = cpus();
        if cores <= CLIENT_CORE {
            return Pinning::Unpinned(format!("only {cores} CPU available"));
        }
        match taskset(CLIENT_CORE, std::process::id()) {
            Ok(()) => Pinning::Pinned,
            Err(e) => Pinning::Unpinned(format!("{e:#}")),
        }
    }

    /// One line for the report.
    pub fn describe(&self) -> String {
        match self {
            Pinning::Pinned => format!(
                "servers on CPU {SERVER_CORE}, load generator on CPU {CLIENT_CORE} (taskset)"
            ),
            Pinning::Unpinned(why) => format!("unpinned ({why})"),
        }
    }

    fn pinned(&self) -> bool {
        matches!(self, Pinning::Pinned)
    }

    /// Moves a running process (every thread of it) to [`SERVER_CORE`] when the servers
    /// are pinned there; the processes it forks afterwards inherit the placement.
    pub fn pin_process(&self, pid: u32) -> Result<()> {
        if self.pinned() {
            taskset(SERVER_CORE, pid)?;
        }
        Ok(())
    }

    /// A runtime of one worker thread placed like the servers (its blocking threads too),
    /// for baselines measured in this process: they run where the server they are
    /// compared with runs, so both wait on the same core's wake-ups (the cost of a disk
    /// completion differs between cores when the disk's interrupts go to one of them).
    /// Shut down without waiting when dropped, so it may be dropped inside another runtime.
    pub fn server_runtime(&self) -> Result<ServerRuntime> {
        let pinned = self.pinned();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .on_thread_start(move || {
                if pinned {
                    let mut cpus = rustix::thread::CpuSet::new();
                    cpus.set(SERVER_CORE);
                    // Cannot fail for a CPU that exists; [`Pinning::apply`] checked it does.
                    let _ = rustix::thread::sched_setaffinity(None, &cpus);
                }
            })
            .build()
            .context("starting the baselines' runtime")?;
        Ok(ServerRuntime(Some(runtime)))
    }
}

fn taskset(core: usize, pid: u32) -> Result<()> {
    let out = Command::new("taskset")
        .args(["--all-tasks", "--cpu-list", "--pid"])
        .args([core.to_string(), pid.to_string()])
        .stdout(Stdio::null())
        .output()
        .context("running taskset")?;
    ensure!(
        out.status.success(),
        "taskset could not pin process {pid}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// See [`Pinning::server_runtime`].
pub struct ServerRuntime(Option<tokio::runtime::Runtime>);

impl ServerRuntime {
    /// Runs `task` on the runtime and waits for its result.
    pub async fn run<T: Send + 'static>(
        &self,
        task: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T> {
        let runtime = self.0.as_ref().context("the baselines' runtime is gone")?;
        runtime.spawn(task).await.context("a baseline task failed")
    }
}

impl Drop for ServerRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// What a run shares: its settings, its temp dir, a signer whose public key the control
/// planes trust, and the placement of its processes.
pub struct Bench {
    /// The shared flags.
    pub common: Common,
    /// The run's temp dir.
    pub dir: TempDir,
    /// Signs the run's licenses.
    pub signer: LicenseSigner,
    /// The signer's public key, as a file for `--trusted-key`.
    pub key_path: PathBuf,
    /// Where the processes run.
    pub pinning: Pinning,
}

/// Sets the process up (open files, TLS, pinning before any runtime, the clock tick rate),
/// makes the run's temp dir and signer, and runs `body` on a current-thread runtime.
pub fn run<T>(common: Common, pin: bool, body: impl AsyncFnOnce(&Bench) -> Result<T>) -> Result<T> {
    let (_, hard) = rlimit::Resource::NOFILE
        .get()
        .context("reading the open-files limit")?;
    rlimit::Resource::NOFILE
        .set(hard, hard)
        .context("raising the open-files limit")?;
    charter_tls::install_default_provider();
    let pinning = if pin {
        Pinning::apply(!common.no_pin)
    } else {
        Pinning::Unpinned("this benchmark runs unpinned".to_owned())
    };
    let work = common.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    ensure!(
        work.is_dir(),
        "--work-dir {} is not a directory",
        work.display()
    );
    let dir = tempfile::Builder::new()
        .prefix("charter-bench-")
        .tempdir_in(&work)
        .with_context(|| format!("creating a temp dir in {}", work.display()))?;
    let signer = LicenseSigner::from_seed(rand::random());
    let key_path = dir.path().join("signing.pub");
    std::fs::write(&key_path, signer.trusted_key().to_pem())
        .with_context(|| format!("writing {}", key_path.display()))?;
    let bench = Bench {
        common,
        dir,
        signer,
        key_path,
        pinning,
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(body(&bench))
}

impl Bench {
    /// The run's temp dir.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A binary: the one its flag names, `name` itself when it is a path (a peer's, such
    /// as nginx), or `name` next to this executable.
    pub fn binary(&self, name: &str) -> Result<PathBuf> {
        let path = Some(PathBuf::from(name));
        let given = match name {
            "charter-cp" => &self.common.cp_bin,
            "charter-dp" => &self.common.dp_bin,
            "charterctl" => &self.common.ctl_bin,
            _ if name.contains('/') => &path,
            _ => &None,
        };
        let path = match given {
            Some(path) => path.clone(),
            None => std::env::current_exe()
                .context("locating this executable")?
                .with_file_name(name),
        };
        ensure!(
            path.is_file(),
            "no {name} binary at {}: build it with `cargo build --release --workspace --bins` \
             (or run scripts/bench), or name it with its flag",
            path.display()
        );
        Ok(path)
    }

    /// The shared-mode cluster certificate, made by `charterctl gen-cert`.
    pub fn make_certs(&self) -> Result<TlsFiles> {
        let dir = self.path().join("certs");
        let ctl = self.binary("charterctl")?;
        let out = Command::new(&ctl)
            .args(["gen-cert", "--out-dir"])
            .arg(&dir)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", ctl.display()))?;
        ensure!(
            out.status.success(),
            "charterctl gen-cert failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(TlsFiles {
            cert: dir.join("cluster.crt"),
            key: dir.join("cluster.key"),
            ca: None,
        })
    }

    /// Starts a release `charter-cp` storing in `data` (a directory name in the run's
    /// dir) or in the PostgreSQL database `database_url`, its cluster port on `cluster`
    /// with the certificate `certs` (plaintext without).
    pub async fn start_cp(
        &self,
        data: &str,
        cluster: SocketAddr,
        certs: Option<&TlsFiles>,
        database_url: Option<&str>,
    ) -> Result<Server> {
        let mut flags = cluster_flags(certs);
        if let Some(url) = database_url {
            flags.extend(["--database-url".into(), url.into()]);
        }
        let data_dir = self.path().join(data);
        let key = self.key_path.clone();
        self.start(&format!("{data}.log"), "charter-cp", "/status", |addr| {
            let mut args: Vec<OsString> = vec![
                "--data-dir".into(),
                data_dir.clone().into(),
                "--admin-listen".into(),
                addr.to_string().into(),
                "--trusted-key".into(),
                key.clone().into(),
                "--cluster-listen".into(),
                cluster.to_string().into(),
            ];
            args.extend(flags.iter().cloned());
            args
        })
        .await
    }

    /// Starts the hello-world baseline (`charter-bench hello`) answering `record` on
    /// `GET /record` and `page` on `GET /page`.
    pub async fn start_hello(&self, record: &[u8], page: &[u8]) -> Result<Server> {
        let mut args: Vec<OsString> = vec!["hello".into(), "--listen".into()];
        for (name, body) in [("record", record), ("page", page)] {
            let path = self.path().join(format!("{name}.json"));
            std::fs::write(&path, body).with_context(|| format!("writing {}", path.display()))?;
            args.extend([format!("--{name}").into(), path.into()]);
        }
        self.start("hello.log", "charter-bench", "/record", |addr| {
            let mut args = args.clone();
            args.insert(2, addr.to_string().into());
            args
        })
        .await
    }

    /// Starts `program` (a binary name, or `charter-bench` for this one) with `args(its
    /// HTTP address)`, placed like the servers, logging to `log` in the run's dir, and
    /// waits until `GET ready` answers 200.
    pub async fn start(
        &self,
        log: &str,
        program: &str,
        ready: &str,
        args: impl Fn(SocketAddr) -> Vec<OsString>,
    ) -> Result<Server> {
        self.start_under(&[], log, program, ready, args).await
    }

    /// [`Bench::start`], the program run by the command `wrapper` (`valgrind
    /// --tool=callgrind …`; none when empty), which must exec it in its own process.
    pub async fn start_under(
        &self,
        wrapper: &[OsString],
        log: &str,
        program: &str,
        ready: &str,
        args: impl Fn(SocketAddr) -> Vec<OsString>,
    ) -> Result<Server> {
        let program = match program {
            "charter-bench" => std::env::current_exe().context("locating this executable")?,
            // Debian's etcd-server, on the path.
            "etcd" => PathBuf::from("etcd"),
            name => self.binary(name)?,
        };
        let log = self.path().join(log);
        let mut last_error = None;
        // Another process may take the port between our probe and the server's bind.
        for _ in 0..3 {
            let addr = free_port()?;
            let mut line: Vec<OsString> = wrapper.to_vec();
            line.push(program.clone().into());
            let mut command = if self.pinning.pinned() {
                let mut command = Command::new("taskset");
                command.args(["--cpu-list", &SERVER_CORE.to_string()]);
                command.args(&line);
                command
            } else {
                let mut command = Command::new(&line[0]);
                command.args(&line[1..]);
                command
            };
            command
                .args(args(addr))
                .stdin(Stdio::null())
                .stdout(Stdio::null());
            command
                .stderr(File::create(&log).with_context(|| format!("creating {}", log.display()))?);
            // Only the flags configure it.
            for (key, _) in std::env::vars_os() {
                if ["CHARTER_", "ETCD_"]
                    .iter()
                    .any(|p| key.to_string_lossy().starts_with(p))
                {
                    command.env_remove(key);
                }
            }
            let child = command
                .spawn()
                .with_context(|| format!("starting {}", program.display()))?;
            let mut server = Server {
                child,
                addr,
                log: log.clone(),
            };
            // A program under valgrind starts some fifty times slower.
            let within = Duration::from_secs(if wrapper.is_empty() { 15 } else { 120 });
            match server.wait_ready(ready, within).await {
                Ok(()) => return Ok(server),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("{} did not start", program.display())))
    }
}

/// The flags of a cluster port served with `certs`, or in plaintext.
pub fn cluster_flags(certs: Option<&TlsFiles>) -> Vec<OsString> {
    match certs {
        Some(certs) => vec![
            "--cluster-cert".into(),
            certs.cert.clone().into(),
            "--cluster-cert-key".into(),
            certs.key.clone().into(),
        ],
        None => vec!["--cluster-insecure".into()],
    }
}

/// A server child process on a loopback port, killed when dropped.
pub struct Server {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Server {
    async fn wait_ready(&mut self, ready: &str, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().context("polling a child")? {
                bail!(
                    "{} exited with {status} before answering:\n{}",
                    self.log.display(),
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if let Ok(mut conn) = Http::connect(self.addr).await {
                if conn.get_ok(ready).await.is_ok() {
                    return Ok(());
                }
            }
            ensure!(
                Instant::now() < deadline,
                "no answer to GET {ready} on {} within {} s; its log: {}",
                self.addr,
                within.as_secs(),
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its process id (the program's own: `taskset` execs it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port free right now.
pub fn free_port() -> Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free loopback port")
}

/// CPUs of the machine, as first read (before this process is pinned to one).
pub fn cpus() -> usize {
    static CPUS: OnceLock<usize> = OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Prints progress on standard error.
pub fn progress(message: std::fmt::Arguments<'_>) {
    eprintln!("charter-bench: {message}");
}

/// The process `pid` in `/proc`.
fn process(pid: u32) -> Result<Process> {
    Process::new(pid as i32).with_context(|| format!("no process {pid} in /proc"))
}

/// Clock ticks (of `/proc`'s CPU times) as a duration.
fn ticks(n: u64) -> Duration {
    Duration::from_secs_f64(n as f64 / procfs::ticks_per_second() as f64)
}

/// CPU time (user + system, all threads, living and exited) a process has used so far,
/// from `/proc/PID/stat`, in clock ticks (10 ms on Linux).
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = process(pid)?.stat().context("reading a process's stat")?;
    Ok(ticks(stat.utime + stat.stime))
}

/// CPU time a process's living threads have used so far, to the nanosecond, from
/// `/proc/PID/task/*/schedstat`. Threads that have exited are not counted, so use it only
/// over spans in which the process keeps its threads.
pub fn cpu_time_precise(pid: u32) -> Result<Duration> {
    let tasks = process(pid)?
        .tasks()
        .context("listing a process's threads")?;
    // A thread that exits meanwhile is simply not counted.
    let nanos = tasks
        .flatten()
        .filter_map(|task| task.schedstat().ok())
        .map(|s| s.sum_exec_runtime)
        .sum();
    Ok(Duration::from_nanos(nanos))
}

/// CPU time the processes descended from any of `roots` (themselves included) have used
/// so far: that of the living ones (as [`cpu_time_precise`]) and that of the children the
/// roots have waited for. For a PostgreSQL server: the postmaster reaps every backend.
pub fn tree_cpu_time(roots: &[u32]) -> Result<Duration> {
    let mut tree = BTreeSet::new();
    let mut reaped = Duration::ZERO;
    for &root in roots {
        tree.extend(descendants(root)?);
        let stat = process(root)?.stat().context("reading a process's stat")?;
        reaped += ticks((stat.cutime + stat.cstime).max(0) as u64);
    }
    // A process that exits meanwhile is simply not counted.
    Ok(reaped
        + tree
            .into_iter()
            .map(|pid| cpu_time_precise(pid).unwrap_or_default())
            .sum::<Duration>())
}

/// `pid` and every living process descended from it.
pub fn descendants(pid: u32) -> Result<Vec<u32>> {
    // A process that exits meanwhile is simply left out.
    let parents: Vec<(u32, u32)> = procfs::process::all_processes()
        .context("listing /proc")?
        .flatten()
        .filter_map(|p| p.stat().ok())
        .map(|s| (s.pid as u32, s.ppid as u32))
        .collect();
    let mut tree = vec![pid];
    let mut next = 0;
    while let Some(&parent) = tree.get(next) {
        tree.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(c, _)| *c),
        );
        next += 1;
    }
    Ok(tree)
}

/// Resident memory of a process, in bytes (`VmRSS` of `/proc/PID/status`).
pub fn rss(pid: u32) -> Result<u64> {
    let status = process(pid)?
        .status()
        .context("reading a process's status")?;
    status
        .vmrss
        .map(|kib| kib * 1024)
        .with_context(|| format!("no VmRSS for process {pid}"))
}

/// The counters of one CPU (a `cpuN` line of `/proc/stat`), in clock ticks.
#[derive(Debug, Clone, Copy)]
struct CpuCounters {
    busy: u64,
    total: u64,
    /// Interrupt, softirq and steal time: busy time no process is charged for.
    uncharged: u64,
    steal: u64,
}

fn cpu_counters() -> Result<Vec<CpuCounters>> {
    let stats = KernelStats::current().context("reading /proc/stat")?;
    // Guest time is inside user time.
    let cpus = stats.cpu_time.iter().map(|c| {
        let [iowait, irq, softirq, steal] =
            [c.iowait, c.irq, c.softirq, c.steal].map(Option::unwrap_or_default);
        let total = c.user + c.nice + c.system + c.idle + iowait + irq + softirq + steal;
        CpuCounters {
            busy: total - c.idle - iowait,
            total,
            uncharged: irq + softirq + steal,
            steal,
        }
    });
    Ok(cpus.collect())
}

/// Measures the CPU use of a span: of the watched processes, of this process and its
/// descendants (and any other roots of ours, such as PostgreSQL's postmaster), and of the
/// machine, to tell what the bench did from what others did to it.
pub struct Meter {
    started: Instant,
    watched: Vec<(u32, Duration)>,
    ours: Vec<u32>,
    ours_before: Duration,
    cpus: Vec<CpuCounters>,
}

/// What a [`Meter`] saw.
#[derive(Debug, Clone)]
pub struct Usage {
    /// The span's length.
    pub seconds: f64,
    /// CPU time of each watched process, in the order given.
    pub watched: Vec<Duration>,
    /// How busy each CPU was (0 to 1), counting what no process is charged for, such as
    /// the loopback network's softirq work and steal.
    pub busy: Vec<f64>,
    /// CPU time, in cores, that processes other than ours used: anything else running on
    /// the machine disturbs the figures.
    pub other_cores: f64,
    /// The largest share of the span any CPU lost to the hypervisor (steal time).
    pub steal: f64,
}

impl Meter {
    /// Starts measuring; `watched` (with their whole CPU time, in ticks) and `roots`
    /// besides this process (counted as ours).
    pub fn start(watched: &[u32], roots: &[u32]) -> Result<Meter> {
        let mut ours = vec![std::process::id()];
        ours.extend(roots);
        Ok(Meter {
            watched: watched
                .iter()
                .map(|&pid| Ok((pid, cpu_time(pid)?)))
                .collect::<Result<_>>()?,
            ours_before: tree_cpu_time(&ours)?,
            ours,
            cpus: cpu_counters()?,
            started: Instant::now(),
        })
    }

    /// What was used since [`Meter::start`].
    pub fn stop(&self) -> Result<Usage> {
        let seconds = self.started.elapsed().as_secs_f64().max(1e-9);
        let watched = self
            .watched
            .iter()
            .map(|&(pid, before)| Ok(cpu_time(pid)?.saturating_sub(before)))
            .collect::<Result<_>>()?;
        let ours = tree_cpu_time(&self.ours)?.saturating_sub(self.ours_before);
        let after = cpu_counters()?;
        let pairs = || self.cpus.iter().zip(&after);
        let share = |part: u64, total: u64| {
            if total == 0 {
                0.0
            } else {
                part as f64 / total as f64
            }
        };
        let charged: u64 = pairs()
            .map(|(b, a)| (a.busy - b.busy).saturating_sub(a.uncharged - b.uncharged))
            .sum();
        Ok(Usage {
            seconds,
            watched,
            busy: pairs()
                .map(|(b, a)| share(a.busy - b.busy, a.total - b.total))
                .collect(),
            other_cores: ((ticks(charged).as_secs_f64() - ours.as_secs_f64()) / seconds).max(0.0),
            steal: pairs()
                .map(|(b, a)| share(a.steal - b.steal, a.total - b.total))
                .fold(0.0, f64::max),
        })
    }
}

impl Usage {
    /// Whether something outside the bench took CPU time: other processes, or the
    /// hypervisor (steal).
    pub fn disturbed(&self) -> bool {
        self.other_cores > OTHER_LOAD_LIMIT || self.steal > STEAL_LIMIT
    }

    /// A watched process's CPU time in cores.
    pub fn cores(&self, index: usize) -> f64 {
        self.watched.get(index).map_or(0.0, Duration::as_secs_f64) / self.seconds
    }

    /// The figures, for the report.
    pub fn to_json(&self) -> Value {
        json!({ "seconds": self.seconds, "busy": self.busy, "other_cores": self.other_cores, "steal": self.steal })
    }
}

/// Measures with `measure` until `disturbed` says no, at most `retries` times again, with a
/// pause before each retry.
pub async fn retrying<T>(
    retries: usize,
    label: &str,
    mut measure: impl AsyncFnMut() -> Result<T>,
    disturbed: impl Fn(&T) -> bool,
) -> Result<T> {
    for attempt in 1.. {
        let sample = measure().await?;
        if !disturbed(&sample) || attempt > retries {
            return Ok(sample);
        }
        progress(format_args!("{label}: disturbed by something outside the bench; measuring again ({attempt}/{retries})"));
        tokio::time::sleep(RETRY_PAUSE).await;
    }
    unreachable!("the loop returns")
}

/// A private PostgreSQL server (charter-store's `TestPostgres`: initdb in a temp dir, its
/// own port, as `nobody` when run as root), placed with the servers; stopped when dropped.
pub struct Postgres {
    server: TestPostgres,
    /// Its postmaster, which forks and reaps every backend.
    pub postmaster: u32,
    /// "PostgreSQL 16.x".
    pub version: String,
}

impl Postgres {
    /// Starts a fresh server (with a database `charter`) and moves it, and every backend
    /// it starts later, to the servers' CPU.
    pub async fn start(pinning: &Pinning) -> Result<Postgres> {
        // `TestPostgres::start` is a test helper: it panics, with the reason on stderr.
        let server = tokio::task::spawn_blocking(TestPostgres::start).await.map_err(|_| {
            anyhow!("could not start a private PostgreSQL server (scripts/install-deps installs one)")
        })?;
        let row = pg_connect(&server.url())
            .await?
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
        // The postmaster, and what it runs already (a child may end meanwhile); backends
        // forked later inherit its placement.
        pinning.pin_process(postmaster)?;
        for pid in descendants(postmaster)?.into_iter().skip(1) {
            let _ = pinning.pin_process(pid);
        }
        Ok(Postgres {
            server,
            postmaster,
            version: version.split(" on ").next().unwrap_or(&version).to_owned(),
        })
    }

    /// The URL of the database `charter`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Creates database `name` on this server; its URL.
    pub async fn create_database(&self, name: &str) -> Result<String> {
        pg_connect(&self.url())
            .await?
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("creating database {name}"))?;
        let url = self.url();
        let (server, _) = url
            .rsplit_once('/')
            .context("a database URL without a name")?;
        Ok(format!("{server}/{name}"))
    }
}

/// Connects a client to `url`, its connection driven by a task on the current runtime.
pub async fn pg_connect(url: &str) -> Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .context("connecting to the bench's PostgreSQL")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A license payload of Kong's fields with key `key`, in force for years, for up to
/// `dataplanes` data planes.
pub fn payload(key: &str, dataplanes: u32) -> Map<String, Value> {
    let value = json!({
        "admin_seats": "1",
        "customer": format!("Bench Customer {key}"),
        "dataplanes": dataplanes.to_string(),
        "license_creation_date": "2025-01-01",
        "license_expiration_date": "2035-12-31",
        "license_key": key,
        "product_subscription": "Charter Enterprise",
        "support_plan": "None",
    });
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// The `p`-th percentile (0 < p ≤ 100) of `sorted` by the nearest-rank method: the
/// smallest sample with at least p % of the samples at or below it. `None` when empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() || !(p > 0.0 && p <= 100.0) {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// The median of `values` (the mean of the middle two for an even count). `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// The median, smallest and largest of `values`, as the reports give them (NaN when empty).
pub fn spread(values: impl IntoIterator<Item = f64>) -> [f64; 3] {
    let values: Vec<f64> = values.into_iter().collect();
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    match median(&values) {
        Some(m) => [m, min, max],
        None => [f64::NAN; 3],
    }
}

/// A latency distribution.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    /// Samples.
    pub count: usize,
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Mean.
    pub mean: Duration,
    /// Largest sample.
    pub max: Duration,
}

impl Latency {
    /// Summarises `samples`; `None` when there are none.
    pub fn of(samples: &[Duration]) -> Option<Latency> {
        let mut sorted = samples.to_vec();
        sorted.sort();
        Some(Latency {
            count: sorted.len(),
            p50: percentile(&sorted, 50.0)?,
            p99: percentile(&sorted, 99.0)?,
            mean: sorted.iter().sum::<Duration>() / u32::try_from(sorted.len()).ok()?,
            max: *sorted.last()?,
        })
    }

    /// In microseconds, for the report.
    pub fn to_json(self) -> Value {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        json!({ "count": self.count, "p50_us": us(self.p50), "p99_us": us(self.p99),
                "mean_us": us(self.mean), "max_us": us(self.max) })
    }
}

#[cfg(test)]
mod tests;
