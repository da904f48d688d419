//! Command-line flags (each also an environment variable) and their validation into a
//! typed [`Config`], before any port is bound.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use charter_license::{TrustedKeys, UnixTime};
pub use charter_runtime::flags::StaticLicense;
use charter_runtime::flags::{load_trusted_keys, resolve, static_license};
use charter_runtime::LogFormat;
use charter_tls::{MtlsMode, TlsFiles};
use clap::Parser;

/// The server name a data plane passes in `shared` mode, where names are not checked
/// (the peer must present the pinned cluster certificate itself).
pub const SHARED_SERVER_NAME: &str = "charter-cluster";

/// `charter-dp` flags. Every flag also reads `CHARTER_` + its name in upper snake case.
#[derive(Debug, Parser)]
#[command(name = "charter-dp", version, about = "Charter data plane")]
pub struct Args {
    /// The control plane's cluster address (HOST:PORT), or several comma-separated: after a
    /// lost connection the data plane tries the next one.
    #[arg(long, env = "CHARTER_CONTROL_PLANE", default_value = "127.0.0.1:8005")]
    pub control_plane: String,
    /// Directory of the node id, the clock mark and the verified license cache.
    #[arg(long, env = "CHARTER_DATA_DIR", default_value = "./charter-dp-data")]
    pub data_dir: PathBuf,
    /// Address of the local status API.
    #[arg(long, env = "CHARTER_STATUS_LISTEN", default_value = "127.0.0.1:8100")]
    pub status_listen: String,
    /// A public key (SPKI PEM) trusted to sign licenses; repeat for several (comma-separated in the variable).
    #[arg(
        long = "trusted-key",
        env = "CHARTER_TRUSTED_KEY",
        value_delimiter = ','
    )]
    pub trusted_keys: Vec<PathBuf>,
    /// The cluster certificate (PEM).
    #[arg(long, env = "CHARTER_CLUSTER_CERT")]
    pub cluster_cert: Option<PathBuf>,
    /// The cluster certificate's private key (PEM).
    #[arg(long, env = "CHARTER_CLUSTER_CERT_KEY")]
    pub cluster_cert_key: Option<PathBuf>,
    /// How the two sides authenticate: one pinned shared certificate, or a CA.
    #[arg(long, env = "CHARTER_CLUSTER_MTLS", value_enum, default_value_t = MtlsMode::Shared)]
    pub cluster_mtls: MtlsMode,
    /// The CA certificate that signs the control plane's certificate (pki mode).
    #[arg(long, env = "CHARTER_CLUSTER_CA_CERT")]
    pub cluster_ca_cert: Option<PathBuf>,
    /// The name the control plane's certificate must carry (pki mode).
    #[arg(
        long,
        env = "CHARTER_CLUSTER_SERVER_NAME",
        default_value = "charter-cp"
    )]
    pub cluster_server_name: String,
    /// A static license file: this node uses it and ignores the cluster's licenses.
    #[arg(long, env = "CHARTER_LICENSE_PATH")]
    pub license_path: Option<PathBuf>,
    /// A static license given inline (the document text), like Kong's KONG_LICENSE_DATA.
    #[arg(long, env = "CHARTER_LICENSE_DATA", hide_env_values = true)]
    pub license_data: Option<String>,
    /// A `KEY=VALUE` label reported to the control plane; repeat for several (comma-separated in the variable).
    #[arg(long = "label", env = "CHARTER_LABEL", value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Log format.
    #[arg(long, env = "CHARTER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Connect to the control plane in plaintext gRPC. For development only.
    #[arg(long, env = "CHARTER_CLUSTER_INSECURE")]
    pub cluster_insecure: bool,
    /// Gate mode: serve a license-enforcing reverse proxy on this address (needs --upstream).
    #[arg(long, env = "CHARTER_PROXY_LISTEN")]
    pub proxy_listen: Option<String>,
    /// Gate mode: the service behind the proxy, `http://HOST:PORT[/PATH]` (HTTP/1.1, and
    /// HTTP/2 for HTTP/2 clients when the service speaks it) or `h2c://HOST:PORT[/PATH]`
    /// (HTTP/2 for every request, e.g. a gRPC service); needs --proxy-listen.
    #[arg(long, env = "CHARTER_UPSTREAM")]
    pub upstream: Option<String>,
    /// Gate mode: seconds to wait for the upstream's response headers before answering 504.
    #[arg(long, env = "CHARTER_UPSTREAM_TIMEOUT", default_value_t = 30)]
    pub upstream_timeout: u64,
    /// Gate mode: send the client's `Host` header to the upstream instead of the upstream's
    /// own (for upstreams that build links from `Host`).
    #[arg(long, env = "CHARTER_PRESERVE_HOST")]
    pub preserve_host: bool,
    /// Gate mode: a peer address block (`10.0.0.0/8`, or one address) whose
    /// `X-Forwarded-For` is trusted and appended to; from any other peer it is replaced.
    /// Repeat for several (comma-separated in the variable).
    #[arg(
        long = "trusted-proxy",
        env = "CHARTER_TRUSTED_PROXY",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<String>,
    /// Seconds between usage reports to the control plane (also sent at shutdown).
    #[arg(long, env = "CHARTER_TELEMETRY_INTERVAL", default_value_t = 60)]
    pub telemetry_interval: u64,
}

/// Gate mode settings.
#[derive(Debug, Clone)]
pub struct GateConfig {
    /// Where the proxy listens.
    pub listen: SocketAddr,
    /// Where it forwards.
    pub upstream: crate::gate::Upstream,
    /// How long to wait for the upstream's response headers once the request is sent.
    pub timeout: std::time::Duration,
    /// Send the client's `Host` to the upstream.
    pub preserve_host: bool,
    /// Peers whose `X-Forwarded-For` is appended to.
    pub trusted_proxies: Vec<crate::gate::Cidr>,
}

impl GateConfig {
    /// A gate on `listen` in front of `upstream` with the defaults: a 30 s upstream
    /// timeout, the upstream's own `Host`, no trusted proxies.
    pub fn new(listen: SocketAddr, upstream: crate::gate::Upstream) -> GateConfig {
        GateConfig {
            listen,
            upstream,
            timeout: std::time::Duration::from_secs(30),
            preserve_host: false,
            trusted_proxies: Vec::new(),
        }
    }
}

/// How the data plane reaches the control plane.
#[derive(Debug, Clone)]
pub enum Transport {
    /// Plaintext gRPC (`--cluster-insecure`): development only, warned about at every start.
    Insecure,
    /// Mutual TLS.
    Tls {
        /// `shared` or `pki`.
        mode: MtlsMode,
        /// This node's certificate and key, and the CA in `pki` mode.
        files: TlsFiles,
        /// The name checked against the control plane's certificate (`pki`); in `shared`
        /// mode [`SHARED_SERVER_NAME`].
        server_name: String,
    },
}

/// The validated configuration of a data plane.
#[derive(Debug, Clone)]
pub struct Config {
    /// The control plane's cluster address, `HOST:PORT` (resolved at every connection,
    /// so a control plane that moves is found again).
    pub control_plane: String,
    /// Where the node id, the clock mark and the license cache live.
    pub data_dir: PathBuf,
    /// Status API address.
    pub status_listen: SocketAddr,
    /// Keys trusted to sign licenses.
    pub trusted_keys: TrustedKeys,
    /// The `--trusted-key` files, re-read on `SIGHUP` or when they change (none: the keys
    /// stay as given).
    pub trusted_key_files: Vec<PathBuf>,
    /// Cluster transport.
    pub transport: Transport,
    /// A static license, when configured.
    pub static_license: Option<StaticLicense>,
    /// Labels sent in `Hello`.
    pub labels: BTreeMap<String, String>,
    /// Log format.
    pub log_format: LogFormat,
    /// Gate mode, when configured.
    pub gate: Option<GateConfig>,
    /// How often usage is reported.
    pub telemetry_interval: std::time::Duration,
    /// How long lower revisions from the connected control plane are ignored before its
    /// snapshot is taken: [`crate::state::REGRESSION_WAIT`]. Not a flag (DESIGN fixes it);
    /// tests that build a `Config` may shorten it.
    pub regression_wait: std::time::Duration,
}

impl Config {
    /// A configuration with the defaults for everything but the control plane address,
    /// the data dir and the trusted keys: plaintext transport, status API on
    /// `127.0.0.1:0`, no static license, no labels. Tests start from this.
    pub fn new(control_plane: &str, data_dir: &Path, trusted_keys: TrustedKeys) -> Config {
        Config {
            control_plane: control_plane.to_owned(),
            data_dir: data_dir.to_path_buf(),
            status_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            trusted_keys,
            trusted_key_files: Vec::new(),
            transport: Transport::Insecure,
            static_license: None,
            labels: BTreeMap::new(),
            gate: None,
            telemetry_interval: std::time::Duration::from_secs(60),
            regression_wait: crate::state::REGRESSION_WAIT,
            log_format: LogFormat::Text,
        }
    }

    /// Validates flags into a configuration. `now` judges a static license.
    pub fn from_args(args: Args, now: UnixTime) -> Result<Config> {
        let status_listen = resolve(&args.status_listen, "--status-listen")?;
        for address in args.control_plane.split(',') {
            check_host_port(address.trim())?;
        }
        if args.trusted_keys.is_empty() {
            bail!("no --trusted-key given: the data plane verifies every license itself and needs at least one vendor public key (the one the control plane trusts)");
        }
        let trusted_keys = load_trusted_keys(&args.trusted_keys)?;
        let static_license = static_license(
            args.license_path.as_deref(),
            args.license_data.as_deref(),
            &trusted_keys,
            now,
        )?;
        let labels = parse_labels(&args.labels)?;
        let transport = transport(&args)?;
        let gate = match (&args.proxy_listen, &args.upstream) {
            (None, None) if args.preserve_host || !args.trusted_proxies.is_empty() => {
                bail!("--preserve-host and --trusted-proxy are gate mode flags: they need --proxy-listen and --upstream")
            }
            (None, None) => None,
            (Some(listen), Some(upstream)) => {
                if args.upstream_timeout == 0 {
                    bail!("--upstream-timeout must be at least 1 second");
                }
                Some(GateConfig {
                    listen: resolve(listen, "--proxy-listen")?,
                    upstream: crate::gate::Upstream::parse(upstream).map_err(|e| anyhow!(e))?,
                    timeout: std::time::Duration::from_secs(args.upstream_timeout),
                    preserve_host: args.preserve_host,
                    trusted_proxies: args
                        .trusted_proxies
                        .iter()
                        .map(|p| crate::gate::Cidr::parse(p.trim()))
                        .collect::<Result<_, _>>()
                        .map_err(|e| anyhow!(e))?,
                })
            }
            (Some(_), None) => bail!("--proxy-listen needs --upstream, the service to forward to"),
            (None, Some(_)) => {
                bail!("--upstream needs --proxy-listen, the address the gate serves on")
            }
        };
        if args.telemetry_interval == 0 {
            bail!("--telemetry-interval must be at least 1 second");
        }
        Ok(Config {
            control_plane: args.control_plane,
            data_dir: args.data_dir,
            status_listen,
            trusted_keys,
            trusted_key_files: args.trusted_keys.clone(),
            transport,
            static_license,
            labels,
            log_format: args.log_format,
            gate,
            telemetry_interval: std::time::Duration::from_secs(args.telemetry_interval),
            regression_wait: crate::state::REGRESSION_WAIT,
        })
    }
}

/// Checks the cluster transport flags: plaintext only when asked for, otherwise a
/// certificate and key (and a CA in pki mode) that load into a client configuration.
fn transport(args: &Args) -> Result<Transport> {
    if args.cluster_insecure {
        return Ok(Transport::Insecure);
    }
    let (Some(cert), Some(key)) = (&args.cluster_cert, &args.cluster_cert_key) else {
        bail!("connecting to the control plane needs --cluster-cert and --cluster-cert-key (the cluster certificate, charterctl gen-cert makes it), or --cluster-insecure for plaintext development use");
    };
    if args.cluster_mtls == MtlsMode::Pki && args.cluster_ca_cert.is_none() {
        bail!("--cluster-mtls pki needs --cluster-ca-cert, the CA that signs the control plane's certificate");
    }
    let server_name = match args.cluster_mtls {
        MtlsMode::Shared => SHARED_SERVER_NAME.to_owned(),
        MtlsMode::Pki => args.cluster_server_name.clone(),
    };
    let files = TlsFiles {
        cert: cert.clone(),
        key: key.clone(),
        ca: args.cluster_ca_cert.clone(),
    };
    // Load them now, so a bad certificate is a configuration error before any port is bound.
    charter_tls::install_default_provider();
    charter_tls::client_config(args.cluster_mtls, &files).context("cluster TLS")?;
    Ok(Transport::Tls {
        mode: args.cluster_mtls,
        files,
        server_name,
    })
}

/// Parses `KEY=VALUE` labels; a key is 1 to 63 characters and appears once.
fn parse_labels(labels: &[String]) -> Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for label in labels {
        let Some((key, value)) = label.split_once('=') else {
            bail!("--label `{label}` is not KEY=VALUE");
        };
        let key = key.trim();
        if key.is_empty() || key.len() > 63 {
            bail!("--label `{label}`: the key must be 1 to 63 characters");
        }
        if map
            .insert(key.to_owned(), value.trim().to_owned())
            .is_some()
        {
            bail!("--label `{key}` is given twice");
        }
    }
    Ok(map)
}

/// Checks that the control plane address is `HOST:PORT`. It is not resolved here: a
/// control plane whose name does not resolve yet (a starting cluster) is retried later.
fn check_host_port(addr: &str) -> Result<()> {
    let bad = || anyhow!("--control-plane `{addr}` is not HOST:PORT like 127.0.0.1:8005");
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.contains(['/', ' ']) || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    Ok(())
}
