//! Which license is in force: the most recent `updated_at` among licenses that verify,
//! ties broken by store revision.

use crate::status::Status;

/// A stored license that verified, as seen by the selection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate<T> {
    /// The caller's record.
    pub item: T,
    /// When the record was last written (Unix seconds).
    pub updated_at: i64,
    /// The store revision of that write (breaks ties between equal `updated_at`).
    pub revision: u64,
    /// Its status now.
    pub status: Status,
}

/// The outcome of [`select_effective`].
#[derive(Debug, PartialEq, Eq)]
pub struct Selection<'a, T> {
    /// The license in force, if any verified.
    pub effective: Option<&'a Candidate<T>>,
    /// The license in force has expired (grace or past it) while another verified one has
    /// not: an operator most likely updated the wrong license.
    pub expired_while_other_valid: bool,
}

/// Picks the license in force among verified candidates. Pass only licenses that verified:
/// one that does not verify never takes part.
pub fn select_effective<T>(candidates: &[Candidate<T>]) -> Selection<'_, T> {
    let effective = candidates.iter().max_by_key(|c| (c.updated_at, c.revision));
    let expired_while_other_valid = match effective {
        Some(e) if matches!(e.status, Status::Grace | Status::Expired) => candidates
            .iter()
            .any(|c| matches!(c.status, Status::Valid | Status::Expiring)),
        _ => false,
    };
    Selection {
        effective,
        expired_while_other_valid,
    }
}
