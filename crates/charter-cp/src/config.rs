//! Command-line flags (each also an environment variable) and their validation into a
//! typed [`Config`], before any port is bound.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use charter_license::{TrustedKeys, UnixTime};
pub use charter_runtime::flags::StaticLicense;
use charter_runtime::flags::{load_trusted_keys, read_file, resolve, static_license};
use charter_runtime::LogFormat;
use charter_tls::{MtlsMode, TlsFiles};
use clap::Parser;

use crate::api::auth::Tokens;

/// `charter-cp` flags. Every flag also reads `CHARTER_` + its name in upper snake case.
#[derive(Debug, Parser)]
#[command(name = "charter-cp", version, about = "Charter control plane")]
pub struct Args {
    /// Directory of the embedded license store.
    #[arg(long, env = "CHARTER_DATA_DIR", default_value = "./charter-cp-data")]
    pub data_dir: PathBuf,
    /// Address of the admin HTTP API.
    #[arg(long, env = "CHARTER_ADMIN_LISTEN", default_value = "127.0.0.1:8001")]
    pub admin_listen: String,
    /// Address of the gRPC cluster server the data planes connect to.
    #[arg(long, env = "CHARTER_CLUSTER_LISTEN", default_value = "0.0.0.0:8005")]
    pub cluster_listen: String,
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
    /// How data planes are authenticated: one pinned shared certificate, or a CA.
    #[arg(long, env = "CHARTER_CLUSTER_MTLS", value_enum, default_value_t = MtlsMode::Shared)]
    pub cluster_mtls: MtlsMode,
    /// The CA certificate that signs data-plane certificates (pki mode).
    #[arg(long, env = "CHARTER_CLUSTER_CA_CERT")]
    pub cluster_ca_cert: Option<PathBuf>,
    /// Admin tokens, one `TOKEN read|write` per line. Without it the admin API only binds loopback.
    #[arg(long, env = "CHARTER_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// A static license file: this node uses it and ignores licenses stored through the API.
    #[arg(long, env = "CHARTER_LICENSE_PATH")]
    pub license_path: Option<PathBuf>,
    /// A static license given inline (the document text), like Kong's KONG_LICENSE_DATA.
    #[arg(long, env = "CHARTER_LICENSE_DATA", hide_env_values = true)]
    pub license_data: Option<String>,
    /// Log format.
    #[arg(long, env = "CHARTER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Serve the cluster port as plaintext gRPC. For development only.
    #[arg(long, env = "CHARTER_CLUSTER_INSECURE")]
    pub cluster_insecure: bool,
    /// Store licenses in PostgreSQL (`postgres://USER[:PASS]@HOST:PORT/DB`) instead of the
    /// embedded store in --data-dir; control planes with the same URL are one cluster.
    #[arg(long, env = "CHARTER_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// A file holding the PostgreSQL URL (so a password can stay in a Secret).
    #[arg(long, env = "CHARTER_DATABASE_URL_FILE")]
    pub database_url_file: Option<PathBuf>,
}

/// Where the licenses are stored.
#[derive(Clone)]
pub enum Storage {
    /// The embedded sled store in this directory.
    Embedded(PathBuf),
    /// A PostgreSQL database shared by several control planes (the URL may hold a
    /// password, so it is never printed).
    Postgres(String),
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Storage::Embedded(dir) => write!(f, "Embedded({})", dir.display()),
            Storage::Postgres(_) => write!(f, "Postgres(<url>)"),
        }
    }
}

/// Cluster transport settings.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Where the cluster server listens.
    pub listen: SocketAddr,
    /// `None` for plaintext (`--cluster-insecure`), else the mTLS mode and files.
    pub tls: Option<(MtlsMode, TlsFiles)>,
}

/// The validated configuration of a control plane.
#[derive(Debug, Clone)]
pub struct Config {
    /// Store directory.
    pub data_dir: PathBuf,
    /// Where the licenses are stored.
    pub storage: Storage,
    /// Admin API address.
    pub admin_listen: SocketAddr,
    /// Cluster settings.
    pub cluster: ClusterConfig,
    /// Keys trusted to sign licenses.
    pub trusted_keys: TrustedKeys,
    /// The `--trusted-key` files, re-read on `SIGHUP` or when they change (none: the keys
    /// stay as given).
    pub trusted_key_files: Vec<PathBuf>,
    /// Admin tokens; `None` means the admin API is open (loopback only).
    pub tokens: Option<Tokens>,
    /// The `--admin-token-file`, re-read on `SIGHUP` or when it changes.
    pub admin_token_file: Option<PathBuf>,
    /// A static license, when configured.
    pub static_license: Option<StaticLicense>,
    /// Log format.
    pub log_format: LogFormat,
}

impl Config {
    /// Validates flags into a configuration. `now` judges a static license.
    pub fn from_args(args: Args, now: UnixTime) -> Result<Config> {
        let admin_listen = resolve(&args.admin_listen, "--admin-listen")?;
        let cluster_listen = resolve(&args.cluster_listen, "--cluster-listen")?;
        if args.trusted_keys.is_empty() {
            bail!("no --trusted-key given: the control plane needs at least one public key (charterctl keygen makes one) to verify licenses");
        }
        let trusted_keys = load_trusted_keys(&args.trusted_keys)?;
        let tokens = match &args.admin_token_file {
            Some(path) => Some(load_tokens(path)?),
            None => None,
        };
        if tokens.is_none() && !admin_listen.ip().is_loopback() {
            bail!(
                "refusing to serve the admin API on non-loopback address {admin_listen} without --admin-token-file; bind 127.0.0.1 or configure admin tokens"
            );
        }
        let static_license = static_license(
            args.license_path.as_deref(),
            args.license_data.as_deref(),
            &trusted_keys,
            now,
        )?;
        let tls = cluster_tls(
            args.cluster_insecure,
            args.cluster_mtls,
            args.cluster_cert.as_deref(),
            args.cluster_cert_key.as_deref(),
            args.cluster_ca_cert.as_deref(),
        )?;
        let storage = match (args.database_url, &args.database_url_file) {
            (Some(_), Some(_)) => {
                bail!("give --database-url or --database-url-file, not both")
            }
            (Some(url), None) => Storage::Postgres(url),
            (None, Some(path)) => {
                Storage::Postgres(read_file(path, "--database-url-file")?.trim().to_owned())
            }
            (None, None) => Storage::Embedded(args.data_dir.clone()),
        };
        if let Storage::Postgres(url) = &storage {
            charter_store::PgStore::check_url(url).map_err(|e| match e {
                charter_store::StoreError::Config(reason) => anyhow::anyhow!("--database-url: {reason}"),
                e => anyhow::anyhow!("--database-url is not a PostgreSQL URL (postgres://USER[:PASS]@HOST:PORT/DB): {e}"),
            })?;
        }
        Ok(Config {
            storage,
            data_dir: args.data_dir,
            admin_listen,
            cluster: ClusterConfig {
                listen: cluster_listen,
                tls,
            },
            trusted_keys,
            trusted_key_files: args.trusted_keys,
            tokens,
            admin_token_file: args.admin_token_file,
            static_license,
            log_format: args.log_format,
        })
    }
}

/// Reads and parses the `--admin-token-file`.
pub fn load_tokens(path: &Path) -> Result<Tokens> {
    Tokens::parse(&read_file(path, "--admin-token-file")?)
        .with_context(|| format!("--admin-token-file {}", path.display()))
}

/// Checks the cluster transport flags: plaintext only when asked for, otherwise a
/// certificate and key (and a CA in pki mode) that load.
pub fn cluster_tls(
    insecure: bool,
    mode: MtlsMode,
    cert: Option<&Path>,
    key: Option<&Path>,
    ca: Option<&Path>,
) -> Result<Option<(MtlsMode, TlsFiles)>> {
    if insecure {
        return Ok(None);
    }
    let (Some(cert), Some(key)) = (cert, key) else {
        bail!("the cluster port needs --cluster-cert and --cluster-cert-key (charterctl gen-cert makes them), or --cluster-insecure for plaintext development use");
    };
    if mode == MtlsMode::Pki && ca.is_none() {
        bail!("--cluster-mtls pki needs --cluster-ca-cert, the CA that signs the cluster certificates");
    }
    let files = TlsFiles {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        ca: ca.map(Path::to_path_buf),
    };
    // Load them now, so a bad certificate is a configuration error before any port is bound.
    charter_tls::install_default_provider();
    charter_tls::server_config(mode, &files).context("cluster TLS")?;
    Ok(Some((mode, files)))
}
