//! The daily expiry log schedule: WARN from 90 days left, ERROR from 30, CRITICAL in grace
//! and after — once per UTC day, and again whenever the severity or the license changes.

use time::Date;

use crate::status::Severity;

/// Remembers what was last logged, so each day is logged once.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DailyLog {
    last: Option<(Date, Option<Severity>, String)>,
}

impl DailyLog {
    /// Whether a log line is due on `today` for `license` (an id or any stable name) at
    /// `severity` (`None` when nothing needs saying).
    pub fn due(&mut self, today: Date, severity: Option<Severity>, license: &str) -> bool {
        let key = (today, severity, license.to_owned());
        if self.last.as_ref() == Some(&key) {
            return false;
        }
        self.last = Some(key);
        severity.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    #[test]
    fn logs_once_per_day_and_on_change() {
        let mut s = DailyLog::default();
        let d1 = date!(2026 - 01 - 01);
        let d2 = date!(2026 - 01 - 02);
        assert!(s.due(d1, Some(Severity::Warn), "a"));
        assert!(
            !s.due(d1, Some(Severity::Warn), "a"),
            "same day, same state: quiet"
        );
        assert!(
            s.due(d1, Some(Severity::Error), "a"),
            "severity rose: log now"
        );
        assert!(
            s.due(d1, Some(Severity::Error), "b"),
            "another license: log now"
        );
        assert!(s.due(d2, Some(Severity::Error), "b"), "next day: log again");
        assert!(!s.due(d2, None, "b"), "nothing to say for a valid license");
    }
}
