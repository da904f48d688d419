//! The daily expiry log: WARN from 90 days left, ERROR from 30, CRITICAL in grace and
//! after, once per UTC day (and again whenever the severity or the license changes).

use std::sync::Arc;
use std::time::Duration;

use charter_license::{utc_date, DailyLog, Severity};

use crate::state::Enforcement;

/// How often the schedule looks at the license. Logging happens at most daily, or when
/// the license changes.
const CHECK_EVERY: Duration = Duration::from_secs(600);

/// Logs the license situation once per day until `shutdown` fires.
pub async fn run(enforcement: Arc<Enforcement>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut schedule = DailyLog::default();
    let mut interval = tokio::time::interval(CHECK_EVERY);
    let mut changes = enforcement.subscribe();
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            changed = changes.changed() => if changed.is_err() { return },
            _ = shutdown.changed() => return,
        }
        let in_force = enforcement.current();
        let today = utc_date(enforcement.now());
        let name = in_force.name();
        let Some(e) = &in_force.evaluation else {
            if schedule.due(today, Some(Severity::Critical), &name) {
                tracing::error!(severity = "critical",
                    "no license is in force: this data plane denies licensed use until the control plane sends a valid license (or a static license is configured)");
            }
            continue;
        };
        if !schedule.due(today, e.severity(), &name) {
            continue;
        }
        let message = e.warnings.join("; ");
        match e.severity() {
            Some(Severity::Warn) => {
                tracing::warn!(license = %name, days_left = e.days_left, "{message}")
            }
            Some(Severity::Error) => {
                tracing::error!(license = %name, days_left = e.days_left, "{message}")
            }
            Some(Severity::Critical) => tracing::error!(severity = "critical", license = %name,
                days_left = e.days_left, grace_days_left = e.grace_days_left, "{message}"),
            None => {}
        }
    }
}
