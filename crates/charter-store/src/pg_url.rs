//! The database URL: tokio-postgres' own parameters, plus libpq's TLS parameters that it
//! lacks (`sslmode=verify-ca|verify-full`, `sslrootcert`, `sslcert`, `sslkey`), so an
//! operator can paste the URL a managed PostgreSQL documents.

use std::path::PathBuf;

use charter_tls::{DatabaseTlsFiles, DatabaseVerify};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::StoreError;

/// A parsed database URL: where to connect, and how to secure it.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) config: tokio_postgres::Config,
    pub(crate) tls: MakeRustlsConnect,
    /// The `sslmode` in force, for the log.
    pub(crate) sslmode: &'static str,
}

fn invalid(reason: String) -> StoreError {
    StoreError::Config(reason)
}

/// Parses `url` (`postgres://USER[:PASS]@HOST:PORT/DB[?PARAMS]`, or tokio-postgres'
/// `key=value` form) and reads the TLS files it names.
pub(crate) fn parse(url: &str) -> Result<Target, StoreError> {
    let mut sslmode = "prefer";
    let mut files = DatabaseTlsFiles::default();
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    let rest = match url.split_once('?').filter(|_| is_url) {
        None => url.to_owned(),
        Some((base, query)) => {
            let mut kept = Vec::new();
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                let decoded = || percent_decode(value).map_err(invalid);
                match key {
                    "sslmode" => {
                        sslmode = match decoded()?.as_str() {
                            "disable" => "disable",
                            "allow" | "prefer" => "prefer",
                            "require" => "require",
                            "verify-ca" => "verify-ca",
                            "verify-full" => "verify-full",
                            other => {
                                return Err(invalid(format!(
                                    "sslmode={other} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                                )))
                            }
                        }
                    }
                    "sslrootcert" => files.root = Some(PathBuf::from(decoded()?)),
                    "sslcert" => files.cert = Some(PathBuf::from(decoded()?)),
                    "sslkey" => files.key = Some(PathBuf::from(decoded()?)),
                    _ => kept.push(pair),
                }
            }
            if kept.is_empty() {
                base.to_owned()
            } else {
                format!("{base}?{}", kept.join("&"))
            }
        }
    };
    let mut config: tokio_postgres::Config = rest.parse().map_err(|e| StoreError::Backend {
        context: "parsing the database URL".to_owned(),
        source: Box::new(e),
    })?;
    let verify = match sslmode {
        "disable" => {
            config.ssl_mode(SslMode::Disable);
            DatabaseVerify::Nothing
        }
        "prefer" => {
            // tokio-postgres' own `sslmode` (key=value form) stands when the URL named none.
            DatabaseVerify::Nothing
        }
        "require" => {
            config.ssl_mode(SslMode::Require);
            // libpq: with a root certificate, `require` verifies the chain.
            if files.root.is_some() {
                DatabaseVerify::Chain
            } else {
                DatabaseVerify::Nothing
            }
        }
        "verify-ca" => {
            config.ssl_mode(SslMode::Require);
            DatabaseVerify::Chain
        }
        _ => {
            config.ssl_mode(SslMode::Require);
            DatabaseVerify::Full
        }
    };
    if verify != DatabaseVerify::Nothing && files.root.is_none() {
        return Err(invalid(format!(
            "sslmode={sslmode} needs the server's root certificate: add sslrootcert=PATH (a PEM file)"
        )));
    }
    let sslmode = match config.get_ssl_mode() {
        SslMode::Disable => "disable",
        SslMode::Require => sslmode,
        _ => "prefer",
    };
    let client =
        charter_tls::database_client_config(verify, &files).map_err(|e| invalid(e.to_string()))?;
    Ok(Target {
        config,
        tls: MakeRustlsConnect::new(client),
        sslmode,
    })
}

/// Decodes `%XX` escapes (a path in a URL may need them: `%2F`, `%20`).
fn percent_decode(value: &str) -> Result<String, String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad %-escape in the URL parameter value `{value}`"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("the URL parameter value `{value}` is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(url: &str) -> String {
        match parse(url) {
            Ok(_) => panic!("{url} was accepted"),
            Err(e) => format!(
                "{e}: {}",
                std::error::Error::source(&e)
                    .map(ToString::to_string)
                    .unwrap_or_default()
            ),
        }
    }

    #[test]
    fn libpq_tls_parameters_are_taken_out_of_the_url() {
        let target = parse(
            "postgres://u:p%40ss@db.example:6432/charter?sslmode=require&application_name=cp",
        )
        .unwrap();
        assert_eq!(target.sslmode, "require");
        assert_eq!(target.config.get_ssl_mode(), SslMode::Require);
        assert_eq!(target.config.get_application_name(), Some("cp"));
        assert_eq!(target.config.get_password(), Some(&b"p@ss"[..]));
        assert_eq!(target.config.get_dbname(), Some("charter"));

        let target = parse("postgres://u@h/db").unwrap();
        assert_eq!(target.sslmode, "prefer");
        let target = parse("postgres://u@h/db?sslmode=disable").unwrap();
        assert_eq!(
            (target.sslmode, target.config.get_ssl_mode()),
            ("disable", SslMode::Disable)
        );
    }

    #[test]
    fn verifying_modes_need_a_readable_root_certificate() {
        let e = error_of("postgres://u@h/db?sslmode=verify-full");
        assert!(
            e.contains("sslmode=verify-full needs the server's root certificate"),
            "{e}"
        );
        let e = error_of("postgres://u@h/db?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem");
        assert!(e.contains("cannot read /nonexistent/ca.pem"), "{e}");
        let e = error_of("postgres://u@h/db?sslmode=verify-everything");
        assert!(e.contains("sslmode=verify-everything is not one of"), "{e}");
        let e = error_of("postgres://u@h/db?sslmode=require&sslcert=/tmp/x.crt");
        assert!(e.contains("needs both sslcert and sslkey"), "{e}");
        let e = error_of("postgres://u@h/db?sslrootcert=%zz");
        assert!(e.contains("bad %-escape"), "{e}");
    }
}
