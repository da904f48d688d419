//! `charterctl`: the operator and vendor tool — key pairs, signing, verifying and
//! inspecting licenses, cluster certificates, and `charterctl license`, a client of a
//! running control plane's admin API.

mod cert;
mod files;
mod license;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use charter_license::{
    utc_date, Clock, LicenseDocument, LicenseError, LicenseSigner, TrustedKey, TrustedKeys,
    UnixTime,
};
use charter_runtime::SystemClock;
use clap::{Parser, Subcommand};
use serde_json::Value;
use time::{macros::format_description, Date};

#[derive(Parser)]
#[command(
    name = "charterctl",
    version,
    about = "Charter's operator and vendor tool"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make an Ed25519 signing key pair: DIR/signing.key (PKCS#8 PEM, 0600) and DIR/signing.pub (SPKI PEM).
    Keygen {
        /// Directory to write the key pair into (created if missing).
        #[arg(long, env = "CHARTER_OUT_DIR")]
        out_dir: PathBuf,
        /// Overwrite an existing key pair.
        #[arg(long)]
        force: bool,
    },
    /// Sign a payload object and print the license document.
    Sign {
        /// The private signing key (PKCS#8 PEM).
        #[arg(long, env = "CHARTER_KEY")]
        key: PathBuf,
        /// Pretty-print the document.
        #[arg(long)]
        pretty: bool,
        /// The payload object as JSON (`-` for standard input).
        payload: PathBuf,
    },
    /// Verify a license (document or admin-API record) against trusted public keys.
    Verify {
        /// A trusted public key (SPKI PEM); repeat for several.
        #[arg(
            long = "trusted-key",
            env = "CHARTER_TRUSTED_KEY",
            value_delimiter = ',',
            required = true
        )]
        trusted_keys: Vec<PathBuf>,
        /// Judge the license on this UTC day (YYYY-MM-DD) instead of today.
        #[arg(long)]
        at: Option<String>,
        /// The license file (`-` for standard input).
        license: PathBuf,
    },
    /// Show a license's fields, expiry and days left (the signature is not checked).
    Inspect {
        /// Count days left from this UTC day (YYYY-MM-DD) instead of today.
        #[arg(long)]
        at: Option<String>,
        /// The license file (`-` for standard input).
        license: PathBuf,
    },
    /// Make cluster certificates: cluster.crt/cluster.key for shared mTLS mode; with --ca
    /// also ca.crt, cp.crt (serverAuth) and dp.crt (clientAuth) for pki mode.
    GenCert {
        /// Directory to write the certificates into (created if missing).
        #[arg(long, env = "CHARTER_OUT_DIR")]
        out_dir: PathBuf,
        /// Also make a CA and per-role certificates for pki mode.
        #[arg(long)]
        ca: bool,
        /// DNS names or IPs for the control plane's pki certificate; repeat for several.
        #[arg(long = "cp-name", default_values_t = ["charter-cp".to_owned(), "localhost".to_owned(), "127.0.0.1".to_owned()])]
        cp_names: Vec<String>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Manage the licenses of a running control plane through its admin API: list, get,
    /// add, replace, delete, status, report.
    License(license::Args),
}

/// How a command ended: success, or a refused license (its own exit code).
enum Outcome {
    Ok,
    Refused,
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line, like every other error: clap's first line names the problem.
            eprintln!(
                "charterctl: error: {} (see charterctl --help)",
                charter_runtime::one_line(&e)
            );
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(Outcome::Ok) => ExitCode::SUCCESS,
        Ok(Outcome::Refused) => ExitCode::from(1),
        Err(e) => {
            eprintln!("charterctl: error: {e:#}");
            // 2, or a failed admin API request's own code (`charterctl license --help`).
            ExitCode::from(license::exit_code(&e))
        }
    }
}

fn run(args: Args) -> Result<Outcome> {
    match args.command {
        Command::Keygen { out_dir, force } => keygen(&out_dir, force),
        Command::Sign {
            key,
            pretty,
            payload,
        } => sign(&key, &payload, pretty),
        Command::Verify {
            trusted_keys,
            at,
            license,
        } => verify(&trusted_keys, at.as_deref(), &license),
        Command::Inspect { at, license } => inspect(at.as_deref(), &license),
        Command::GenCert {
            out_dir,
            ca,
            cp_names,
            force,
        } => {
            let written = cert::generate(&cert::GenCert {
                out_dir: &out_dir,
                ca,
                cp_names: &cp_names,
                force,
                now: time::OffsetDateTime::now_utc(),
            })?;
            println!(
                "wrote {} (valid {} days)",
                written.join(", "),
                cert::VALIDITY_DAYS
            );
            Ok(Outcome::Ok)
        }
        Command::License(args) => license::run(args).map(|()| Outcome::Ok),
    }
}

fn keygen(out_dir: &Path, force: bool) -> Result<Outcome> {
    files::ensure_dir(out_dir)?;
    let private = out_dir.join("signing.key");
    let public = out_dir.join("signing.pub");
    files::check_absent(&[&private, &public], force)?;
    let seed: [u8; 32] = rand::random();
    let signer = LicenseSigner::from_seed(seed);
    files::write(&private, &signer.to_pem(), 0o600)?;
    files::write(&public, &signer.trusted_key().to_pem(), 0o644)?;
    println!(
        "wrote {} (private, keep it secret) and {} (public); key id {}",
        private.display(),
        public.display(),
        signer.key_id()
    );
    Ok(Outcome::Ok)
}

fn read_input(path: &Path, what: &str) -> Result<String> {
    if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading standard input")
    } else {
        files::read(path, what)
    }
}

fn sign(key: &Path, payload: &Path, pretty: bool) -> Result<Outcome> {
    let signer = LicenseSigner::from_pem(&files::read(key, "signing key")?)
        .with_context(|| format!("reading signing key {}", key.display()))?;
    let text = read_input(payload, "payload")?;
    let value: Value = serde_json::from_str(&text)
        .with_context(|| format!("payload {} is not valid JSON", payload.display()))?;
    let Value::Object(map) = value else {
        bail!(
            "payload {} must be a JSON object of license fields (the `payload` of a license), not a whole document or another value",
            payload.display()
        );
    };
    if map.contains_key("license") {
        bail!(
            "payload {} is already a license document; pass only its `payload` object",
            payload.display()
        );
    }
    let document = signer
        .sign(map)
        .map_err(|e| anyhow::anyhow!("payload {} cannot be signed: {}", payload.display(), e))?;
    if pretty {
        println!("{}", serde_json::to_string_pretty(&document.to_value())?);
    } else {
        println!("{}", document.to_json());
    }
    Ok(Outcome::Ok)
}

fn parse_at(at: Option<&str>) -> Result<UnixTime> {
    match at {
        None => Ok(SystemClock.now()),
        Some(text) => {
            let date = Date::parse(text, format_description!("[year]-[month]-[day]"))
                .map_err(|_| anyhow::anyhow!("--at `{text}` is not a date as YYYY-MM-DD"))?;
            Ok(date.midnight().assume_utc().unix_timestamp())
        }
    }
}

fn verify(key_paths: &[PathBuf], at: Option<&str>, license: &Path) -> Result<Outcome> {
    let mut keys = Vec::new();
    for path in key_paths {
        let key = TrustedKey::from_pem(&files::read(path, "trusted key")?)
            .with_context(|| format!("reading trusted key {}", path.display()))?;
        keys.push(key);
    }
    let keys = TrustedKeys::new(keys);
    let now = parse_at(at)?;
    let text = read_input(license, "license")?;
    match charter_license::validate(&text, &keys, now) {
        Ok((verified, evaluation)) => {
            let t = &verified.terms;
            let expiry = if evaluation.days_left >= 0 {
                format!(
                    "expires {} ({} days left)",
                    t.expiration_date, evaluation.days_left
                )
            } else {
                format!(
                    "expired {} ({} days ago)",
                    t.expiration_date, -evaluation.days_left
                )
            };
            println!(
                "{}: license for {} ({}) verified by key {}; {expiry}",
                evaluation.status, t.customer, t.product_subscription, verified.key_id,
            );
            for warning in &evaluation.warnings {
                println!("warning: {warning}");
            }
            Ok(Outcome::Ok)
        }
        Err(e) => {
            refused(license, &e);
            Ok(Outcome::Refused)
        }
    }
}

fn refused(license: &Path, e: &LicenseError) {
    eprintln!(
        "charterctl: {} refused: {}: {}",
        license.display(),
        e.code,
        e.message
    );
}

fn inspect(at: Option<&str>, license: &Path) -> Result<Outcome> {
    let now = parse_at(at)?;
    let text = read_input(license, "license")?;
    let document = match LicenseDocument::parse(&text) {
        Ok(d) => d,
        Err(e) => {
            refused(license, &e);
            return Ok(Outcome::Refused);
        }
    };
    for (name, value) in document.payload() {
        match value {
            Value::String(s) => println!("{name}: {s}"),
            other => println!("{name}: {other}"),
        }
    }
    println!(
        "signature: {} (not checked; use `charterctl verify`)",
        &document.signature_hex()[..16]
    );
    match document.terms() {
        Ok(terms) => {
            let today = utc_date(now);
            let days_left = (terms.expiration_date - today).whole_days();
            if days_left >= 0 {
                println!(
                    "expires: {} (valid through that UTC day; {days_left} days left on {today})",
                    terms.expiration_date
                );
            } else {
                println!(
                    "expired: {} ({} days ago on {today})",
                    terms.expiration_date, -days_left
                );
            }
            Ok(Outcome::Ok)
        }
        Err(e) => {
            refused(license, &e);
            Ok(Outcome::Refused)
        }
    }
}
