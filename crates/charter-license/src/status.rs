//! Validity of a verified license at an injected time, the clock abstraction, and the
//! high-water mark that keeps a clock set backwards from reviving an expired license.

use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};

use time::{Date, OffsetDateTime};

use crate::error::LicenseError;
use crate::keys::VerifiedLicense;

/// Days before expiry from which a license is `expiring` (inclusive).
pub const EXPIRING_DAYS: i64 = 90;
/// Days before expiry from which the expiry log is an error rather than a warning.
pub const URGENT_DAYS: i64 = 30;
/// Days after expiry during which a license still allows use (`grace`).
pub const GRACE_DAYS: i64 = 30;
/// How far (in seconds) a high-water mark may be ahead of the clock before it is reported:
/// more than a day, and the mark did not come from a clock that merely drifted.
pub const MARK_AHEAD_LIMIT: i64 = 86_400;

/// Seconds since the Unix epoch, UTC.
pub type UnixTime = i64;

/// Where the license logic gets the time. Never read the system clock directly in
/// license logic: inject a `Clock`, so every state can be tested.
pub trait Clock: Send + Sync {
    /// The current time.
    fn now(&self) -> UnixTime;
}

/// A clock that says what it is told (tests, simulations).
#[derive(Debug, Default)]
pub struct FixedClock(AtomicI64);

impl FixedClock {
    /// A clock stopped at `now`.
    pub fn new(now: UnixTime) -> FixedClock {
        FixedClock(AtomicI64::new(now))
    }

    /// Moves the clock to `now`, backwards or forwards.
    pub fn set(&self, now: UnixTime) {
        self.0.store(now, Ordering::SeqCst);
    }
}

impl Clock for FixedClock {
    fn now(&self) -> UnixTime {
        self.0.load(Ordering::SeqCst)
    }
}

/// The latest time a node has seen. Licence decisions use `max(clock, mark)`, so setting
/// the clock back never revives an expired license. The owner persists [`Self::value`].
#[derive(Debug, Default)]
pub struct HighWaterMark(AtomicI64);

impl HighWaterMark {
    /// A mark restored from its persisted value (`i64::MIN` or 0 for none).
    pub fn new(persisted: UnixTime) -> HighWaterMark {
        HighWaterMark(AtomicI64::new(persisted))
    }

    /// Records `now` and returns the time to decide with: the latest time ever seen.
    pub fn observe(&self, now: UnixTime) -> UnixTime {
        let previous = self.0.fetch_max(now, Ordering::SeqCst);
        previous.max(now)
    }

    /// The latest time seen, to persist.
    pub fn value(&self) -> UnixTime {
        self.0.load(Ordering::SeqCst)
    }
}

/// A clock that never goes backwards: the inner clock passed through a high-water mark.
#[derive(Debug)]
pub struct MonotonicClock<C> {
    inner: C,
    mark: HighWaterMark,
}

impl<C: Clock> MonotonicClock<C> {
    /// Wraps `inner`, starting from a persisted mark.
    pub fn new(inner: C, persisted_mark: UnixTime) -> MonotonicClock<C> {
        MonotonicClock {
            inner,
            mark: HighWaterMark::new(persisted_mark),
        }
    }

    /// The latest time seen, to persist.
    pub fn mark(&self) -> UnixTime {
        self.mark.value()
    }

    /// The wrapped clock.
    pub fn inner(&self) -> &C {
        &self.inner
    }

    /// The mark and the inner clock's reading when the mark is more than
    /// [`MARK_AHEAD_LIMIT`] ahead of it: every decision is then made at a time the clock
    /// has not reached (a clock that was wrong and has been corrected, or a mark file that
    /// was altered), so licenses may look expired.
    pub fn mark_ahead(&self) -> Option<MarkAhead> {
        let clock = self.inner.now();
        let mark = self.mark.value();
        (mark.saturating_sub(clock) > MARK_AHEAD_LIMIT).then_some(MarkAhead { mark, clock })
    }
}

/// A high-water mark found more than [`MARK_AHEAD_LIMIT`] ahead of the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MarkAhead {
    /// The mark (Unix seconds).
    pub mark: UnixTime,
    /// The clock's reading (Unix seconds).
    pub clock: UnixTime,
}

impl MarkAhead {
    /// Whole days the mark is ahead of the clock.
    pub fn days(&self) -> i64 {
        self.mark.saturating_sub(self.clock) / 86_400
    }
}

impl fmt::Display for MarkAhead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the clock mark ({}) is {} days ahead of this node's clock ({}): licenses are judged at the mark, not at the clock",
            rfc3339(self.mark),
            self.days(),
            rfc3339(self.clock)
        )
    }
}

/// A Unix time as RFC 3339 in UTC (`2026-03-01T12:00:00Z`), or the raw seconds when it is
/// outside the supported range.
pub fn rfc3339(t: UnixTime) -> String {
    OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{t} (Unix seconds)"))
}

impl<C: Clock> Clock for MonotonicClock<C> {
    fn now(&self) -> UnixTime {
        self.mark.observe(self.inner.now())
    }
}

/// The license status of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    /// More than 90 days left.
    Valid,
    /// 90 days or less left, including the expiration day itself.
    Expiring,
    /// Expired up to 30 days ago: still allowed.
    Grace,
    /// Expired more than 30 days ago: denied.
    Expired,
    /// No license, or none that verifies: denied.
    Unlicensed,
}

impl Status {
    /// The status as on the wire: `valid`, `expiring`, `grace`, `expired`, `unlicensed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Valid => "valid",
            Status::Expiring => "expiring",
            Status::Grace => "grace",
            Status::Expired => "expired",
            Status::Unlicensed => "unlicensed",
        }
    }

    /// Whether a data plane serves under this status.
    pub fn allows(self) -> bool {
        matches!(self, Status::Valid | Status::Expiring | Status::Grace)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How loudly the daily expiry log speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// 90 to 31 days left.
    Warn,
    /// 30 days or less left.
    Error,
    /// In grace or expired.
    Critical,
}

/// A verified license judged at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    /// The status.
    pub status: Status,
    /// The UTC day the judgement was made on.
    pub today: Date,
    /// The last day the license is valid.
    pub expiration_date: Date,
    /// Whole days from today to the expiration day: 0 on the day itself, negative after.
    pub days_left: i64,
    /// In grace, the days left before the license stops allowing use.
    pub grace_days_left: Option<i64>,
    /// What an operator should be told, empty when all is well.
    pub warnings: Vec<String>,
}

impl Evaluation {
    /// The level of the daily expiry log, if one is due at all.
    pub fn severity(&self) -> Option<Severity> {
        match self.status {
            Status::Valid | Status::Unlicensed => None,
            Status::Expiring if self.days_left > URGENT_DAYS => Some(Severity::Warn),
            Status::Expiring => Some(Severity::Error),
            Status::Grace | Status::Expired => Some(Severity::Critical),
        }
    }
}

/// The UTC calendar day of a Unix time, saturating at the ends of the supported range.
pub fn utc_date(now: UnixTime) -> Date {
    match OffsetDateTime::from_unix_timestamp(now) {
        Ok(t) => t.date(),
        Err(_) if now < 0 => Date::MIN,
        Err(_) => Date::MAX,
    }
}

impl VerifiedLicense {
    /// Whether the license lets traffic through at `now` (valid, expiring or in grace):
    /// what [`VerifiedLicense::evaluate`] decides, without building its warnings, for a
    /// check on every request.
    pub fn allows(&self, now: UnixTime) -> bool {
        let today = utc_date(now);
        self.terms.creation_date <= today
            && (self.terms.expiration_date - today).whole_days() >= -GRACE_DAYS
    }

    /// Judges the license at `now`. A creation date after today (UTC) is refused with
    /// `invalid_expiration_date`: the license is not in force yet, or a clock is wrong.
    pub fn evaluate(&self, now: UnixTime) -> Result<Evaluation, LicenseError> {
        let today = utc_date(now);
        let terms = &self.terms;
        if terms.creation_date > today {
            return Err(LicenseError::dates(format!(
                "license_creation_date {} is in the future (today is {today} UTC); check this node's clock",
                terms.creation_date
            )));
        }
        let expiration_date = terms.expiration_date;
        let days_left = (expiration_date - today).whole_days();
        let mut warnings = Vec::new();
        let (status, grace_days_left) = if days_left > EXPIRING_DAYS {
            (Status::Valid, None)
        } else if days_left >= 0 {
            warnings.push(format!(
                "license expires on {expiration_date} ({days_left} days left); install a renewed license before then"
            ));
            (Status::Expiring, None)
        } else if -days_left <= GRACE_DAYS {
            let grace_left = GRACE_DAYS + days_left;
            warnings.push(format!(
                "license expired on {expiration_date}; {grace_left} days left in the {GRACE_DAYS}-day grace period, after which data planes deny traffic"
            ));
            (Status::Grace, Some(grace_left))
        } else {
            warnings.push(format!(
                "license expired on {expiration_date}, more than {GRACE_DAYS} days ago; data planes deny traffic until a valid license is installed"
            ));
            (Status::Expired, None)
        };
        Ok(Evaluation {
            status,
            today,
            expiration_date,
            days_left,
            grace_days_left,
            warnings,
        })
    }
}
