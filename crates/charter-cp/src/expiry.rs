//! The daily expiry log: WARN from 90 days left, ERROR from 30, CRITICAL in grace and
//! after, once per UTC day (and again whenever the severity or the license changes). On a
//! shared store only the control plane leading the chores logs.

use std::time::Duration;

use charter_license::{utc_date, DailyLog, Severity};

use crate::service::Service;

/// How often the schedule looks at the license (and, on a shared store, whether this
/// control plane now leads the chores, so a new leader logs within seconds of taking
/// over). Logging happens at most daily.
const CHECK_EVERY: Duration = Duration::from_secs(10);

/// Logs the license situation once per day until `shutdown` fires.
pub async fn run(service: Service, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut schedule = DailyLog::default();
    let mut interval = tokio::time::interval(CHECK_EVERY);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.changed() => return,
        }
        // A stored license is the whole cluster's: one control plane logs it. A static
        // license is this node's own.
        if !service.leads_chores() && !service.has_static_license() {
            continue;
        }
        let view = service.view();
        let today = utc_date(service.now());
        let Some(in_force) = &view.in_force else {
            if schedule.due(today, Some(Severity::Critical), "unlicensed") {
                tracing::error!(severity = "critical", "no valid license is in force: data planes deny traffic; add one with POST /licenses");
            }
            continue;
        };
        let e = &in_force.evaluation;
        let id = in_force
            .record
            .as_ref()
            .map_or_else(|| "static".to_owned(), |r| r.id.to_string());
        if !schedule.due(today, e.severity(), &id) {
            continue;
        }
        let message = e.warnings.join("; ");
        match e.severity() {
            Some(Severity::Warn) => {
                tracing::warn!(license = %id, days_left = e.days_left, "{message}")
            }
            Some(Severity::Error) => {
                tracing::error!(license = %id, days_left = e.days_left, "{message}")
            }
            Some(Severity::Critical) => tracing::error!(severity = "critical", license = %id,
                days_left = e.days_left, grace_days_left = e.grace_days_left, "{message}"),
            None => {}
        }
        for warning in view.warnings.iter().filter(|w| !e.warnings.contains(w)) {
            tracing::warn!(license = %id, "{warning}");
        }
    }
}
