//! The database URL: tokio-postgres' own parameters, plus libpq's TLS parameters that it
//! lacks (`sslmode=verify-ca|verify-full`, `sslrootcert`, `sslcert`, `sslkey`), so an
//! operator can paste the URL a managed PostgreSQL documents. Connections get TCP
//! keepalives, a TCP user timeout and a connect timeout unless the URL sets its own, so a
//! connection the network lost silently is found and closed.

use std::path::PathBuf;
use std::time::Duration;

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

/// How long connecting a socket may take (`connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle time before the first TCP keepalive probe (`keepalives_idle`).
const KEEPALIVES_IDLE: Duration = Duration::from_secs(15);
/// Time between keepalive probes (`keepalives_interval`).
const KEEPALIVES_INTERVAL: Duration = Duration::from_secs(5);
/// Unanswered probes before the connection is dropped (`keepalives_retries`).
const KEEPALIVES_RETRIES: u32 = 3;
/// How long sent data may stay unacknowledged before the connection is dropped
/// (`tcp_user_timeout`, Linux): as long as the keepalives take to give up.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);
/// tokio-postgres' `keepalives_idle` when none is given.
const KEEPALIVES_IDLE_UNSET: Duration = Duration::from_secs(2 * 60 * 60);

/// Where the query of a `postgres://` URL starts (its `?`), as libpq reads the URL: the
/// user info ends at the first `@` before any `/`, and the query is the first `?` after it,
/// so a `?` in a password is the password's.
fn query_start(url: &str) -> Option<usize> {
    let authority = url.find("://")? + 3;
    let rest = &url[authority..];
    let path = rest.find('/').unwrap_or(rest.len());
    let host = rest[..path].find('@').map_or(0, |at| at + 1);
    rest[host..].find('?').map(|q| authority + host + q)
}

/// Parses `url` (`postgres://USER[:PASS]@HOST:PORT/DB[?PARAMS]`, or tokio-postgres'
/// `key=value` form) and reads the TLS files it names.
pub(crate) fn parse(url: &str) -> Result<Target, StoreError> {
    let mut sslmode = "prefer";
    let mut files = DatabaseTlsFiles::default();
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    let split = query_start(url)
        .filter(|_| is_url)
        .map(|q| (&url[..q], &url[q + 1..]));
    let rest = match split {
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
    refuse_unused_files(sslmode, &files)?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_keepalives_idle() == KEEPALIVES_IDLE_UNSET {
        config.keepalives_idle(KEEPALIVES_IDLE);
    }
    if config.get_keepalives_interval().is_none() {
        config.keepalives_interval(KEEPALIVES_INTERVAL);
    }
    if config.get_keepalives_retries().is_none() {
        config.keepalives_retries(KEEPALIVES_RETRIES);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
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

/// Refuses TLS files the `sslmode` would silently not use, so an operator who names a root
/// certificate is never left believing the server is verified. libpq ignores them under
/// `disable`; under `prefer` (the default) and `allow` it may check the root certificate
/// but falls back to a connection without TLS when the handshake fails, which verifies
/// nothing; and its `sslrootcert=system` (the system's roots) this store cannot read.
fn refuse_unused_files(sslmode: &str, files: &DatabaseTlsFiles) -> Result<(), StoreError> {
    if files.root.as_deref() == Some(std::path::Path::new("system")) {
        return Err(invalid(
            "sslrootcert=system (the system's trusted roots) is not supported: give the server's root certificate as a PEM file, sslrootcert=PATH".to_owned(),
        ));
    }
    if sslmode == "disable" {
        let named: Vec<&str> = [
            ("sslrootcert", files.root.is_some()),
            ("sslcert", files.cert.is_some()),
            ("sslkey", files.key.is_some()),
        ]
        .iter()
        .filter(|(_, given)| *given)
        .map(|(name, _)| *name)
        .collect();
        if !named.is_empty() {
            return Err(invalid(format!(
                "sslmode=disable turns TLS off, so {} would not be used: remove {}, or choose sslmode=verify-full",
                named.join(" and "),
                if named.len() == 1 { "it" } else { "them" }
            )));
        }
    }
    if sslmode == "prefer" && files.root.is_some() {
        return Err(invalid(
            "sslrootcert is given but sslmode is prefer (the default) or allow, which do not verify the server: add sslmode=verify-full (or verify-ca), or remove sslrootcert".to_owned(),
        ));
    }
    Ok(())
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

    #[test]
    fn a_question_mark_in_the_password_is_the_password_s() {
        let target = parse("postgres://u:p?ss@db.example:6432/charter?sslmode=require").unwrap();
        assert_eq!(target.config.get_password(), Some(&b"p?ss"[..]));
        assert_eq!(target.config.get_dbname(), Some("charter"));
        assert_eq!(target.sslmode, "require");
        // libpq's own parameters are found and taken out.
        let e = error_of("postgres://u:p?ss@h/db?sslmode=verify-full");
        assert!(
            e.contains("sslmode=verify-full needs the server's root certificate"),
            "{e}"
        );
        // No path: the query still starts after the host.
        let target = parse("postgres://u:a?b@h?application_name=cp").unwrap();
        assert_eq!(target.config.get_password(), Some(&b"a?b"[..]));
        assert_eq!(target.config.get_application_name(), Some("cp"));
        // No query at all.
        let target = parse("postgres://u:a?b@h/db").unwrap();
        assert_eq!(target.config.get_password(), Some(&b"a?b"[..]));
        assert_eq!(target.config.get_dbname(), Some("db"));
        // A `?` in the query's values stays there.
        let target = parse("postgres://u@h/db?application_name=a?b").unwrap();
        assert_eq!(target.config.get_application_name(), Some("a?b"));
        assert_eq!(query_start("postgres://u:p?x@h/d?a=b"), Some(20));
        assert_eq!(query_start("postgres://h/d"), None);
    }

    #[test]
    fn tls_files_the_sslmode_would_not_use_are_refused() {
        for (params, wanted) in [
            (
                "sslmode=disable&sslrootcert=/tmp/ca.pem",
                "sslmode=disable turns TLS off, so sslrootcert would not be used",
            ),
            (
                "sslmode=disable&sslcert=/tmp/c.pem&sslkey=/tmp/k.pem",
                "so sslcert and sslkey would not be used: remove them",
            ),
            (
                "sslrootcert=/tmp/ca.pem",
                "sslmode is prefer (the default) or allow, which do not verify the server",
            ),
            (
                "sslmode=allow&sslrootcert=/tmp/ca.pem",
                "add sslmode=verify-full",
            ),
            (
                "sslmode=verify-full&sslrootcert=system",
                "sslrootcert=system (the system's trusted roots) is not supported",
            ),
        ] {
            let url = format!("postgres://u@h/db?{params}");
            let e = parse(&url)
                .err()
                .unwrap_or_else(|| panic!("{url} was accepted"));
            assert!(matches!(e, StoreError::Config(_)), "{url}: {e:?}");
            assert!(e.to_string().contains(wanted), "{url}: {e}");
        }
    }

    #[test]
    fn connections_get_keepalives_and_timeouts_unless_the_url_sets_its_own() {
        let config = parse("postgres://u@h/db").unwrap().config;
        assert_eq!(config.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
        assert!(config.get_keepalives());
        assert_eq!(config.get_keepalives_idle(), KEEPALIVES_IDLE);
        assert_eq!(config.get_keepalives_interval(), Some(KEEPALIVES_INTERVAL));
        assert_eq!(config.get_keepalives_retries(), Some(KEEPALIVES_RETRIES));
        assert_eq!(config.get_tcp_user_timeout(), Some(&TCP_USER_TIMEOUT));
        let config = parse(
            "postgres://u@h/db?connect_timeout=2&keepalives_idle=60&keepalives_interval=7&keepalives_retries=9&tcp_user_timeout=11",
        )
        .unwrap()
        .config;
        assert_eq!(config.get_connect_timeout(), Some(&Duration::from_secs(2)));
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(60));
        assert_eq!(
            config.get_keepalives_interval(),
            Some(Duration::from_secs(7))
        );
        assert_eq!(config.get_keepalives_retries(), Some(9));
        assert_eq!(
            config.get_tcp_user_timeout(),
            Some(&Duration::from_secs(11))
        );
    }
}
