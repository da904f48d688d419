//! `charterctl gen-cert`: the cluster certificate for `shared` mTLS mode, and with `--ca`
//! a CA plus per-role certificates for `pki` mode.

use std::path::Path;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P384_SHA384,
};
use time::{Duration, OffsetDateTime};

use crate::files;

/// Validity of every generated certificate: three years, like `kong hybrid gen_cert`.
pub const VALIDITY_DAYS: i64 = 3 * 365;

/// The name in the shared cluster certificate.
pub const SHARED_NAME: &str = "charter-cluster";

/// What `gen-cert` makes.
pub struct GenCert<'a> {
    pub out_dir: &'a Path,
    pub ca: bool,
    pub cp_names: &'a [String],
    pub force: bool,
    pub now: OffsetDateTime,
}

/// Writes the certificates and returns the paths written, for the summary.
pub fn generate(opts: &GenCert<'_>) -> Result<Vec<String>> {
    // Check the names before writing anything, so a typo leaves no half-made set behind.
    for name in opts.cp_names {
        san(name)?;
    }
    files::ensure_dir(opts.out_dir)?;
    let out = |name: &str| opts.out_dir.join(name);
    let mut names = vec!["cluster.crt", "cluster.key"];
    if opts.ca {
        names.extend(["ca.crt", "ca.key", "cp.crt", "cp.key", "dp.crt", "dp.key"]);
    }
    let paths: Vec<_> = names.iter().map(|n| out(n)).collect();
    files::check_absent(
        &paths.iter().map(|p| p.as_path()).collect::<Vec<_>>(),
        opts.force,
    )?;

    // Shared mode: one self-signed certificate both sides present and pin.
    let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).context("generating a key")?;
    let mut params = leaf_params(opts, SHARED_NAME, &[SHARED_NAME.to_owned()])?;
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params
        .self_signed(&key)
        .context("signing the cluster certificate")?;
    files::write(&out("cluster.crt"), &cert.pem(), 0o644)?;
    files::write(&out("cluster.key"), &key.serialize_pem(), 0o600)?;

    if opts.ca {
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).context("generating a key")?;
        let mut ca_params = CertificateParams::default();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Charter cluster CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        set_validity(&mut ca_params, opts.now);
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .context("signing the CA certificate")?;
        files::write(&out("ca.crt"), &ca_cert.pem(), 0o644)?;
        files::write(&out("ca.key"), &ca_key.serialize_pem(), 0o600)?;

        for (role, cn, names, usage) in [
            (
                "cp",
                "charter-cp",
                opts.cp_names.to_vec(),
                ExtendedKeyUsagePurpose::ServerAuth,
            ),
            (
                "dp",
                "charter-dp",
                vec!["charter-dp".to_owned()],
                ExtendedKeyUsagePurpose::ClientAuth,
            ),
        ] {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).context("generating a key")?;
            let mut params = leaf_params(opts, cn, &names)?;
            params.extended_key_usages = vec![usage];
            let cert = params
                .signed_by(&key, &ca_cert, &ca_key)
                .with_context(|| format!("signing the {role} certificate"))?;
            files::write(&out(&format!("{role}.crt")), &cert.pem(), 0o644)?;
            files::write(&out(&format!("{role}.key")), &key.serialize_pem(), 0o600)?;
        }
    }
    Ok(paths.iter().map(|p| p.display().to_string()).collect())
}

fn leaf_params(opts: &GenCert<'_>, cn: &str, names: &[String]) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.subject_alt_names = names.iter().map(|name| san(name)).collect::<Result<_>>()?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.is_ca = IsCa::ExplicitNoCa;
    set_validity(&mut params, opts.now);
    Ok(params)
}

fn set_validity(params: &mut CertificateParams, now: OffsetDateTime) {
    // Start a day early so a peer whose clock is slightly behind accepts the certificate.
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(VALIDITY_DAYS);
}

/// A subject alternative name: an IP address, or a DNS name (RFC 1123 labels, a leading
/// `*` label allowed for a wildcard).
fn san(name: &str) -> Result<SanType> {
    if let Ok(ip) = name.parse() {
        return Ok(SanType::IpAddress(ip));
    }
    let label_ok = |(i, label): (usize, &str)| {
        (i == 0 && label == "*")
            || (!label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    };
    if name.len() > 253 || !name.split('.').enumerate().all(label_ok) {
        anyhow::bail!("`{name}` is not a valid DNS name or IP address");
    }
    Ok(SanType::DnsName(name.to_owned().try_into().with_context(
        || format!("`{name}` is not a valid DNS name or IP address"),
    )?))
}
