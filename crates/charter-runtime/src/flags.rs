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

/// Reads every `--trusted-key`. A file holds one or more Ed25519 SPKI PEM keys (one
/// Kubernetes Secret key can carry the old and the new key during a rotation); a file
/// without a key, or with a block that is not such a key, is refused.
pub fn load_trusted_keys(paths: &[PathBuf]) -> Result<TrustedKeys> {
    let mut keys = Vec::new();
    for path in paths {
        let pem = read_file(path, "--trusted-key")?;
        let mut blocks = pem_blocks(&pem);
        if blocks.is_empty() {
            // No block at all: the parser says what a key should look like.
            blocks.push(&pem);
        }
        for block in blocks {
            let key = TrustedKey::from_pem(block)
                .with_context(|| format!("--trusted-key {}", path.display()))?;
            keys.push(key);
        }
    }
    Ok(TrustedKeys::new(keys))
}

/// The PEM blocks of a text, each from its `-----BEGIN` line to its `-----END` line.
fn pem_blocks(text: &str) -> Vec<&str> {
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN") {
        let after = &rest[start..];
        let Some(end) = after.find("-----END") else {
            // An unterminated block: hand it over whole, so the parser says what is wrong.
            blocks.push(after);
            break;
        };
        let close = after[end + 8..]
            .find("-----")
            .map_or(after.len(), |i| end + 8 + i + 5);
        blocks.push(&after[..close]);
        rest = &after[close..];
    }
    blocks
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

#[cfg(test)]
mod tests {
    use charter_license::LicenseSigner;

    use super::*;

    #[test]
    fn a_trusted_key_file_may_hold_several_keys() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (
            LicenseSigner::from_seed([1; 32]),
            LicenseSigner::from_seed([2; 32]),
        );
        let both = dir.path().join("both.pub");
        let pem = format!(
            "{}\n{}",
            old.trusted_key().to_pem(),
            new.trusted_key().to_pem()
        );
        std::fs::write(&both, pem).unwrap();
        let keys = load_trusted_keys(std::slice::from_ref(&both)).unwrap();
        assert_eq!(keys.ids(), vec![old.key_id(), new.key_id()]);

        let broken = format!(
            "{}-----BEGIN PUBLIC KEY-----\nbroken\n-----END PUBLIC KEY-----\n",
            old.trusted_key().to_pem()
        );
        std::fs::write(&both, broken).unwrap();
        assert!(load_trusted_keys(std::slice::from_ref(&both)).is_err());
        std::fs::write(&both, "nothing here").unwrap();
        assert!(load_trusted_keys(&[both]).is_err());
    }
}
