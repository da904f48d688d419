//! Charter's license domain: the Kong license document, its RFC 8785 canonical form,
//! Ed25519 signing and strict verification against a set of trusted keys, validity at an
//! injected time, and the choice of the license in force.
//!
//! **Architecture Invariant:** this crate does no I/O, spawns nothing and never reads a
//! clock. Time comes in as a [`UnixTime`] from a [`Clock`] the caller owns; randomness for
//! key generation comes in as a seed.

mod document;
mod error;
mod keys;
mod schedule;
mod select;
mod status;

pub use document::{
    canonical_payload, LicenseDocument, Terms, DOCUMENT_VERSION, MAX_EXACT_INTEGER,
};
pub use error::{ErrorCode, LicenseError};
pub use keys::{KeyError, KeyId, LicenseSigner, TrustedKey, TrustedKeys, VerifiedLicense};
pub use schedule::DailyLog;
pub use select::{select_effective, Candidate, Selection};
pub use status::{
    rfc3339, utc_date, Clock, Evaluation, FixedClock, HighWaterMark, MarkAhead, MonotonicClock,
    Severity, Status, UnixTime, EXPIRING_DAYS, GRACE_DAYS, MARK_AHEAD_LIMIT, URGENT_DAYS,
};

/// Parses, verifies and judges a license text at `now` in one step: the path every
/// component takes for a license it did not make itself.
pub fn validate(
    text: &str,
    keys: &TrustedKeys,
    now: UnixTime,
) -> Result<(VerifiedLicense, Evaluation), LicenseError> {
    let verified = keys.verify_text(text)?;
    let evaluation = verified.evaluate(now)?;
    Ok((verified, evaluation))
}

#[cfg(test)]
mod tests;
