//! The cluster certificate's expiry, watched: read at start and each time the certificate
//! is reloaded (rotation without restarts, [`crate::reload`]), so the metric and the logs
//! follow the certificate in use; logged at start and at each reload, and WARN (30 days or
//! fewer left) or ERROR (expired) daily; exported as
//! `charter_cluster_cert_expiry_timestamp_seconds` by both binaries' `/metrics` through a
//! [`CertExpiry`] handle.

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use charter_license::{utc_date, Clock};
use tokio::sync::watch;

/// How many days before expiry the daily warning starts.
pub const WARN_DAYS: i64 = 30;

/// How often the certificate is read again.
const CHECK_EVERY: Duration = Duration::from_secs(24 * 3600);

/// The certificate's `notAfter` in Unix seconds, shared with the metrics (0: unknown, or
/// no certificate: plaintext cluster port).
#[derive(Clone, Default, Debug)]
pub struct CertExpiry(Arc<AtomicI64>);

impl CertExpiry {
    /// The last `notAfter` read, in Unix seconds; 0 when unknown.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The `notAfter` of the first certificate in the PEM file at `path`, in Unix seconds.
pub fn not_after(path: &std::path::Path) -> Result<i64, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&bytes)
        .map_err(|e| format!("{} is not a PEM certificate: {e}", path.display()))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| format!("{} is not an X.509 certificate: {e}", path.display()))?;
    Ok(cert.validity().not_after.timestamp())
}

/// Reads the certificate at `path` now, and again each time `reloaded` changes (the
/// certificate in use was reloaded from its files), keeping `expiry` and logging as the
/// module says, daily as well, until `shutdown`. Without `reloaded` (a certificate that is
/// not reloaded) the file is read again daily.
pub async fn watch<T>(
    path: PathBuf,
    clock: Arc<dyn Clock>,
    expiry: CertExpiry,
    mut reloaded: Option<watch::Receiver<T>>,
    mut shutdown: watch::Receiver<bool>,
) where
    T: Send + Sync + 'static,
{
    let following = reloaded.is_some();
    let mut every = tokio::time::interval(CHECK_EVERY);
    let mut occasion = Some("cluster certificate loaded");
    loop {
        tokio::select! {
            _ = every.tick() => {}
            changed = reload(&mut reloaded) => {
                if changed {
                    occasion = Some("cluster certificate reloaded");
                    // A day from the reload until the next daily report.
                    every.reset();
                } else {
                    // The reload watch ended (shutdown): nothing more to follow.
                    reloaded = None;
                    continue;
                }
            }
            _ = shutdown.changed() => return,
        }
        // The daily report is of the certificate in use: the file is read again only when
        // nothing follows its reloads (or nothing could be read before).
        let read = if occasion.is_some() || !following || expiry.get() == 0 {
            not_after(&path)
        } else {
            Ok(expiry.get())
        };
        match read {
            Ok(at) => {
                expiry.0.store(at, Ordering::Relaxed);
                report(&path, at, clock.now(), occasion);
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the cluster certificate's expiry"),
        }
        occasion = None;
    }
}

/// Waits for the next reload: `true` when one happened, `false` when the watch ended;
/// never returns without a watch.
async fn reload<T>(reloaded: &mut Option<watch::Receiver<T>>) -> bool {
    match reloaded {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// Logs the certificate's expiry: ERROR once it has passed, WARN within [`WARN_DAYS`],
/// otherwise INFO with `occasion` (at start or a reload) and nothing on a daily check.
fn report(path: &std::path::Path, not_after: i64, now: i64, occasion: Option<&str>) {
    let (date, today) = (utc_date(not_after), utc_date(now));
    let days_left = (not_after - now).div_euclid(86_400);
    let file = path.display();
    if not_after <= now {
        tracing::error!(cert = %file, expired = %date, today = %today,
            "the cluster certificate has expired: the other side refuses it; renew it (charterctl gen-cert) and replace its files (they are reloaded without a restart)");
    } else if days_left <= WARN_DAYS {
        tracing::warn!(cert = %file, expires = %date, days_left,
            "the cluster certificate expires soon: renew it (charterctl gen-cert) before then");
    } else if let Some(occasion) = occasion {
        tracing::info!(cert = %file, expires = %date, days_left, "{occasion}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_after_reads_the_first_certificate_of_a_pem_file() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["charter-cluster".to_owned()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2031, 7, 1);
        let cert = params.self_signed(&key).unwrap();
        let path = dir.path().join("cluster.crt");
        std::fs::write(&path, cert.pem()).unwrap();
        // 2031-07-01T00:00:00Z.
        assert_eq!(not_after(&path), Ok(1_940_630_400));

        std::fs::write(&path, "not a certificate").unwrap();
        assert!(not_after(&path)
            .unwrap_err()
            .contains("is not a PEM certificate"));
        let missing = dir.path().join("missing.crt");
        assert!(not_after(&missing).unwrap_err().starts_with("cannot read"));
    }
}
