//! The processes of a bench run: CPU pinning with `taskset`, server children started on a
//! free loopback port and killed on drop, and per-process CPU time from `/proc`.

use std::ffi::OsString;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hyper::Uri;

use crate::load::Conn;

/// The core the servers run on, and the core the load generator runs on, when pinned.
pub const SERVER_CORE: usize = 0;
/// See [`SERVER_CORE`].
pub const CLIENT_CORE: usize = 1;

/// How the processes of this run are placed on CPUs.
#[derive(Debug, Clone)]
pub enum Pinning {
    /// Servers on [`SERVER_CORE`], this process on [`CLIENT_CORE`], with `taskset`.
    Pinned,
    /// No pinning; the reason is printed with the results.
    Unpinned(String),
}

impl Pinning {
    /// Pins this process (every thread it has so far, and so every thread it starts later)
    /// to [`CLIENT_CORE`] if `taskset` exists and there are two cores to use. Call it before
    /// starting any runtime, so no thread escapes.
    pub fn apply(wanted: bool) -> Pinning {
        if !wanted {
            return Pinning::Unpinned("pinning turned off with --no-pin".to_owned());
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cores <= CLIENT_CORE {
            return Pinning::Unpinned(format!("only {cores} CPU available"));
        }
        let pid = std::process::id().to_string();
        let core = CLIENT_CORE.to_string();
        match Command::new("taskset")
            .args(["--all-tasks", "--cpu-list", "--pid", &core, &pid])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
        {
            Ok(out) if out.status.success() => Pinning::Pinned,
            Ok(out) => Pinning::Unpinned(format!(
                "taskset failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(_) => Pinning::Unpinned("taskset not found".to_owned()),
        }
    }

    /// One line for the report.
    pub fn describe(&self) -> String {
        match self {
            Pinning::Pinned => format!(
                "pinned with taskset: servers on CPU {SERVER_CORE}, load generator on CPU {CLIENT_CORE}"
            ),
            Pinning::Unpinned(why) => format!("unpinned ({why}): servers and load generator share all CPUs"),
        }
    }

    /// Runs `f` on a thread of its own, pinned to [`SERVER_CORE`] when the servers are
    /// pinned there, and waits for it. A baseline measured in this process this way runs
    /// where the server it is compared with runs, so both wait on the same core's wake-ups:
    /// the cost of a disk completion differs between cores when the disk's interrupts are
    /// routed to one of them (here `virtio` requests complete on CPU 1 only).
    pub fn on_server_core<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        std::thread::scope(|scope| {
            let pinned = matches!(self, Pinning::Pinned);
            scope
                .spawn(move || {
                    if pinned {
                        let mut cpus = rustix::thread::CpuSet::new();
                        cpus.set(SERVER_CORE);
                        rustix::thread::sched_setaffinity(None, &cpus).with_context(|| {
                            format!("pinning a baseline thread to CPU {SERVER_CORE}")
                        })?;
                    }
                    Ok(f())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("a baseline thread panicked"))?
        })
    }

    /// Moves a running process (every thread of it) to [`SERVER_CORE`] when the servers
    /// are pinned there; the processes it forks afterwards inherit the placement.
    pub fn pin_process(&self, pid: u32) -> Result<()> {
        if matches!(self, Pinning::Unpinned(_)) {
            return Ok(());
        }
        let out = Command::new("taskset")
            .args(["--all-tasks", "--cpu-list", "--pid"])
            .arg(SERVER_CORE.to_string())
            .arg(pid.to_string())
            .stdout(Stdio::null())
            .output()
            .context("running taskset")?;
        anyhow::ensure!(
            out.status.success(),
            "taskset could not pin process {pid}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// A runtime of one worker thread placed like the servers (its blocking threads too),
    /// for baselines that keep connections open across measurements: they run where the
    /// server they are compared with runs, as with [`Pinning::on_server_core`].
    pub fn server_runtime(&self) -> Result<ServerRuntime> {
        let pinned = matches!(self, Pinning::Pinned);
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

    /// The command that runs `program` with this pinning.
    fn command(&self, program: &Path) -> Command {
        match self {
            Pinning::Pinned => {
                let mut command = Command::new("taskset");
                command
                    .arg("--cpu-list")
                    .arg(SERVER_CORE.to_string())
                    .arg(program);
                command
            }
            Pinning::Unpinned(_) => Command::new(program),
        }
    }
}

/// See [`Pinning::server_runtime`]. Shut down without waiting when dropped, so it may be
/// dropped inside another runtime.
pub struct ServerRuntime(Option<tokio::runtime::Runtime>);

impl ServerRuntime {
    /// Runs `task` on the runtime and waits for its result.
    pub async fn run<T: Send + 'static>(
        &self,
        task: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T> {
        let runtime = self.0.as_ref().context("the baselines' runtime is gone")?;
        runtime
            .spawn(task)
            .await
            .context("a task on the baselines' runtime failed")
    }
}

impl Drop for ServerRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// The binary `name` next to this executable, or `given` (its `flag`); it must exist.
pub fn binary(given: Option<&Path>, name: &str, flag: &str) -> Result<PathBuf> {
    let path = match given {
        Some(path) => path.to_owned(),
        None => std::env::current_exe()
            .context("locating this executable")?
            .with_file_name(name),
    };
    anyhow::ensure!(
        path.is_file(),
        "no {name} binary at {}: build it with `cargo build --release --workspace --bins` \
         (or run scripts/bench), or pass {flag}",
        path.display()
    );
    Ok(path)
}

/// `--work-dir`, or the system temp dir; it must be a directory.
pub fn work_dir(given: Option<&Path>) -> Result<PathBuf> {
    let dir = given.map_or_else(std::env::temp_dir, Path::to_owned);
    anyhow::ensure!(
        dir.is_dir(),
        "--work-dir {} is not a directory",
        dir.display()
    );
    Ok(dir)
}

/// A server child process on a loopback port, killed when dropped.
pub struct Server {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

/// How many free ports to try when a server fails to start (another process may take the
/// port between our probe and the server's bind).
const START_ATTEMPTS: usize = 3;
/// How long a server may take to answer its readiness request.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
const READY_POLL: Duration = Duration::from_millis(25);

impl Server {
    /// Starts `program` with the arguments `args(addr)` on a free loopback port, its
    /// standard error in `log`, and waits until `GET ready_path` answers 200.
    /// Inherited `CHARTER_*` variables are removed so only the flags configure it.
    pub async fn start(
        name: &'static str,
        program: &Path,
        args: impl Fn(SocketAddr) -> Vec<OsString>,
        pinning: &Pinning,
        log: PathBuf,
        ready_path: &str,
    ) -> Result<Server> {
        let ready: Uri = ready_path.parse().context("parsing the readiness path")?;
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            let addr = free_loopback_port()?;
            let mut command = pinning.command(program);
            command
                .args(args(addr))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(File::create(&log).with_context(|| format!("creating {}", log.display()))?);
            for (key, _) in std::env::vars_os() {
                if key.to_string_lossy().starts_with("CHARTER_") {
                    command.env_remove(key);
                }
            }
            let child = command
                .spawn()
                .with_context(|| format!("starting {name} ({})", program.display()))?;
            let mut server = Server {
                name,
                child,
                addr,
                log: log.clone(),
            };
            match server.wait_ready(&ready).await {
                Ok(()) => return Ok(server),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("{name} did not start")))
    }

    async fn wait_ready(&mut self, ready: &Uri) -> Result<()> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().context("polling a child")? {
                bail!(
                    "{} exited with {status} before answering; its log {}:\n{}",
                    self.name,
                    self.log.display(),
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if let Ok(mut conn) = Conn::connect(self.addr).await {
                if conn.get_ok(ready).await.is_ok() {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "{} did not answer GET {ready} on {} within {READY_TIMEOUT:?}; its log: {}",
                    self.name,
                    self.addr,
                    self.log.display()
                );
            }
            tokio::time::sleep(READY_POLL).await;
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
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port free right now.
fn free_loopback_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    listener.local_addr().context("reading the probe's address")
}

/// CPU time (user + system, all threads, living and exited) a process has used so far,
/// from `/proc/PID/stat`, in clock ticks of `getconf CLK_TCK` (10 ms on Linux).
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let fields = stat_fields(pid)?;
    // `utime` and `stime` are fields 14 and 15 of the line.
    let ticks: u64 = fields[11..13]
        .iter()
        .map(|f| f.parse::<u64>())
        .sum::<Result<u64, _>>()
        .with_context(|| format!("parsing /proc/{pid}/stat"))?;
    Ok(Duration::from_secs_f64(
        ticks as f64 / clock_ticks_per_second(),
    ))
}

/// CPU time a process and all its descendants have used so far: that of the living ones
/// (as [`cpu_time_precise`]) and that of the children it has waited for (`cutime`,
/// `cstime`, in clock ticks). For a PostgreSQL server: the postmaster reaps every backend.
pub fn tree_cpu_time(pid: u32) -> Result<Duration> {
    let tree = descendants(pid)?;
    // Children waited for: `cutime` and `cstime`, fields 16 and 17 of the root's line.
    let reaped: u64 = stat_fields(pid)?[13..15]
        .iter()
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    let mut total = Duration::from_secs_f64(reaped as f64 / clock_ticks_per_second());
    for member in tree {
        // A process that exits meanwhile is simply not counted.
        total += cpu_time_precise(member).unwrap_or_default();
    }
    Ok(total)
}

/// `pid` and every living process descended from it.
pub fn descendants(pid: u32) -> Result<Vec<u32>> {
    let mut parents = Vec::new();
    for entry in std::fs::read_dir("/proc")
        .context("listing /proc")?
        .flatten()
    {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process that exits meanwhile is simply left out.
        if let Some(parent) = stat_fields(child)
            .ok()
            .and_then(|f| f[1].parse::<u32>().ok())
        {
            parents.push((child, parent));
        }
    }
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

/// The fields of `/proc/PID/stat` after the command name (which is in parentheses and may
/// hold spaces), so that index 0 is field 3 of the line.
fn stat_fields(pid: u32) -> Result<Vec<String>> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("parsing {path}"))?;
    let fields: Vec<String> = rest.split_whitespace().map(str::to_owned).collect();
    anyhow::ensure!(fields.len() > 15, "parsing {path}: too few fields");
    Ok(fields)
}

/// CPU time a process's living threads have used so far, to the nanosecond, from
/// `/proc/PID/task/*/schedstat`. Threads that have exited are not counted, so use it only
/// over spans in which the process keeps its threads (for [`cpu_time`]'s 10 ms ticks are
/// too coarse for a few milliseconds).
pub fn cpu_time_precise(pid: u32) -> Result<Duration> {
    let dir = format!("/proc/{pid}/task");
    let mut total = 0u64;
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        let path = entry
            .with_context(|| format!("listing {dir}"))?
            .path()
            .join("schedstat");
        // A thread that exits meanwhile has no file any more; it is simply not counted.
        let Ok(stat) = std::fs::read_to_string(&path) else {
            continue;
        };
        total += stat
            .split_whitespace()
            .next()
            .and_then(|ns| ns.parse::<u64>().ok())
            .with_context(|| format!("parsing {}", path.display()))?;
    }
    Ok(Duration::from_nanos(total))
}

/// `getconf CLK_TCK`, or 100 (the value on every Linux architecture) if it cannot be read.
fn clock_ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|t: &f64| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// The cumulative busy and total time counters of one CPU, in clock ticks.
#[derive(Debug, Clone, Copy)]
pub struct CpuCounters {
    busy: u64,
    total: u64,
    /// Interrupt and softirq time (the loopback network's packet work lands here) and
    /// steal time: busy time no process is charged for.
    uncharged: u64,
    /// Steal time alone: time the hypervisor gave this virtual CPU's core to others.
    steal: u64,
}

/// The counters of each CPU (`cpuN` lines of `/proc/stat`), in CPU order.
pub fn cpu_counters() -> Result<Vec<CpuCounters>> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let mut cpus = Vec::new();
    for line in stat.lines() {
        let mut fields = line.split_whitespace();
        match fields.next() {
            Some(name) if name.starts_with("cpu") && name.len() > 3 => {}
            _ => continue,
        }
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let values: Vec<u64> = fields.take(8).filter_map(|f| f.parse().ok()).collect();
        if values.len() < 5 {
            continue;
        }
        let total: u64 = values.iter().sum();
        let idle = values[3] + values[4];
        let uncharged = values.iter().skip(5).sum();
        let steal = values.get(7).copied().unwrap_or(0);
        cpus.push(CpuCounters {
            busy: total - idle,
            total,
            uncharged,
            steal,
        });
    }
    Ok(cpus)
}

/// CPU time, in cores, that the machine spent between two readings `seconds` apart on
/// work charged to some process (user and system time of every process together).
pub fn charged_cores(before: &[CpuCounters], after: &[CpuCounters], seconds: f64) -> f64 {
    let ticks: u64 = before
        .iter()
        .zip(after)
        .map(|(b, a)| {
            let busy = a.busy.saturating_sub(b.busy);
            busy.saturating_sub(a.uncharged.saturating_sub(b.uncharged))
        })
        .sum();
    ticks as f64 / clock_ticks_per_second() / seconds
}

/// The largest share of time (0 to 1) any CPU lost to steal between two readings: on a
/// virtual machine, the time the host ran something else on that CPU's core.
pub fn max_steal_between(before: &[CpuCounters], after: &[CpuCounters]) -> f64 {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| {
            let total = a.total.saturating_sub(b.total);
            if total == 0 {
                0.0
            } else {
                a.steal.saturating_sub(b.steal) as f64 / total as f64
            }
        })
        .fold(0.0, f64::max)
}

/// How busy each CPU was between two readings, from 0 to 1.
pub fn busy_between(before: &[CpuCounters], after: &[CpuCounters]) -> Vec<f64> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| {
            let total = a.total.saturating_sub(b.total);
            if total == 0 {
                0.0
            } else {
                a.busy.saturating_sub(b.busy) as f64 / total as f64
            }
        })
        .collect()
}

/// The block device a path's filesystem is on, as named in `/proc/diskstats` (`vda` for
/// `/dev/vda`), from the longest matching mount point in `/proc/self/mounts`.
pub fn device_of(path: &Path) -> Option<String> {
    mount_of(path).and_then(|(device, _)| {
        device
            .strip_prefix("/dev/")
            .filter(|name| !name.contains('/'))
            .map(str::to_owned)
    })
}

/// The device and filesystem type of the mount holding `path`.
pub fn mount_of(path: &Path) -> Option<(String, String)> {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (device, point, kind) = (fields.next()?, fields.next()?, fields.next()?);
            path.starts_with(point)
                .then(|| (point.len(), (device.to_owned(), kind.to_owned())))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, mount)| mount)
}

/// Bytes written to `device` so far, from `/proc/diskstats` (sectors of 512 bytes).
pub fn device_bytes_written(device: &str) -> Option<u64> {
    let stats = std::fs::read_to_string("/proc/diskstats").ok()?;
    stats.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // major minor name, then reads (4 fields), then writes completed, merged, sectors.
        (fields.get(2) == Some(&device))
            .then(|| fields.get(9)?.parse::<u64>().ok())
            .flatten()
            .map(|sectors| sectors * 512)
    })
}

/// Resident memory of a process, in bytes (`VmRSS` of `/proc/PID/status`).
pub fn rss(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .with_context(|| format!("no VmRSS in {path}"))
}
