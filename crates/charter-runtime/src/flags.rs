//! Flag checks shared by the binaries: files named by flags, addresses, trusted keys and
//! the static license. Errors name the flag, for the one-line refusal (exit 64).

use std::fs;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use charter_license::{TrustedKey, TrustedKeys, UnixTime};

/// A license configured on a node: static configuration wins over the cluster's there.
#[derive(Debug, Clone)]
pub struct StaticLicense {
    /// Where it came from, for logs and status (`--license-path FILE` or `CHARTER_LICENSE_DATA`).
    pub origin: String,
    /// The document text.
    pub text: String,
}

/// Reads the file a flag names.
pub fn read_file(path: &Path, flag: &str) -> Result<String> {
    fs::read_to_string(path)
        .with_context(|| format!("{flag} {}: cannot read the file", path.display()))
}

/// An address like `127.0.0.1:8001` (or a host name that resolves).
pub fn resolve(addr: &str, flag: &str) -> Result<SocketAddr> {
    if let Ok(addr) = addr.parse() {
        return Ok(addr);
    }
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .with_context(|| format!("{flag} `{addr}` is not an address like 127.0.0.1:8001"))
}

/// Reads every `--trusted-key`; a file that is not an Ed25519 SPKI PEM key is refused.
pub fn load_trusted_keys(paths: &[PathBuf]) -> Result<TrustedKeys> {
    let mut keys = Vec::new();
    for path in paths {
        let pem = read_file(path, "--trusted-key")?;
        let key = TrustedKey::from_pem(&pem)
            .with_context(|| format!("--trusted-key {}", path.display()))?;
        keys.push(key);
    }
    Ok(TrustedKeys::new(keys))
}

/// The static license from `--license-path` or `CHARTER_LICENSE_DATA` (not both), checked
/// at `now`. One that does not verify is a configuration error: the node would otherwise
/// run unlicensed while the operator believes it is licensed.
pub fn static_license(
    path: Option<&Path>,
    data: Option<&str>,
    keys: &TrustedKeys,
    now: UnixTime,
) -> Result<Option<StaticLicense>> {
    let license = match (path, data) {
        (Some(_), Some(_)) => bail!(
            "both --license-path and CHARTER_LICENSE_DATA are set; configure the static license once"
        ),
        (Some(path), None) => StaticLicense {
            origin: format!("--license-path {}", path.display()),
            text: read_file(path, "--license-path")?,
        },
        (None, Some(text)) => StaticLicense {
            origin: "CHARTER_LICENSE_DATA".to_owned(),
            text: text.to_owned(),
        },
        (None, None) => return Ok(None),
    };
    charter_license::validate(&license.text, keys, now)
        .map_err(|e| anyhow!("static license from {} is refused: {e}", license.origin))?;
    Ok(Some(license))
}
