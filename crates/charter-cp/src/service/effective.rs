//! Which license is in force on this control plane: a static license if configured, else
//! the stored license with the most recent `updated_at` among those that verify.

use std::sync::Arc;

#[cfg(doc)]
use charter_license::select_effective;
use charter_license::{Evaluation, Status, TrustedKeys, UnixTime, VerifiedLicense};
use charter_runtime::flags::StaticLicense;
use charter_store::LicenseRecord;

/// Where the license in force comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Stored through the admin API.
    Store,
    /// `--license-path` or `CHARTER_LICENSE_DATA` on this node.
    Static,
}

impl Source {
    /// As on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Store => "store",
            Source::Static => "static",
        }
    }
}

/// The license in force.
#[derive(Debug, Clone)]
pub struct InForce {
    /// Where it comes from.
    pub source: Source,
    /// The stored record, for a stored license.
    pub record: Option<LicenseRecord>,
    /// The verified license.
    pub verified: VerifiedLicense,
    /// Its status now.
    pub evaluation: Evaluation,
}

/// The node's license situation at one moment.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// The license in force, if any.
    pub in_force: Option<InForce>,
    /// The stored license the cluster would use (equal to `in_force` unless a static
    /// license overrides it on this node).
    pub stored_in_force: Option<InForce>,
    /// What an operator should be told.
    pub warnings: Vec<String>,
}

/// The view at `now`, from the verified stored licenses newest first (most recent
/// `updated_at`, then the higher revision, then the higher id) and the number of stored
/// licenses that do not verify.
///
/// This is [`select_effective`] over the licenses in force at `now`, without evaluating
/// each one: the license in force is the first, newest first, whose creation date has come
/// (`evaluate` succeeds), and only when it has expired are the others looked at, to warn
/// that another one has not. So a view costs about one evaluation, whatever the number of
/// stored licenses.
pub fn select<'a>(
    newest_first: impl Iterator<Item = (&'a LicenseRecord, &'a Arc<VerifiedLicense>)> + Clone,
    unverified: usize,
    keys: &TrustedKeys,
    static_license: Option<&StaticLicense>,
    now: UnixTime,
) -> View {
    let mut warnings = Vec::new();
    if unverified > 0 {
        warnings.push(format!(
            "{unverified} stored license(s) do not verify against the trusted keys and are ignored"
        ));
    }
    // A license whose creation date is still ahead is not in force yet.
    let effective = newest_first.clone().find_map(|(record, verified)| {
        let evaluation = verified.evaluate(now).ok()?;
        Some((record, verified, evaluation))
    });
    let expired_while_other_valid = match &effective {
        Some((_, _, evaluation))
            if matches!(evaluation.status, Status::Grace | Status::Expired) =>
        {
            newest_first.clone().any(|(_, verified)| {
                verified
                    .evaluate(now)
                    .is_ok_and(|e| matches!(e.status, Status::Valid | Status::Expiring))
            })
        }
        _ => false,
    };
    let stored_in_force = effective.map(|(record, verified, evaluation)| InForce {
        source: Source::Store,
        record: Some(record.clone()),
        verified: (**verified).clone(),
        evaluation,
    });
    if expired_while_other_valid {
        if let Some(effective) = &stored_in_force {
            let id = effective
                .record
                .as_ref()
                .map(|r| r.id.to_string())
                .unwrap_or_default();
            warnings.push(format!(
                "the license in force ({id}) has expired while another stored license has not; PATCH the valid one to put it in force, or delete {id}"
            ));
        }
    }
    let in_force = match static_license {
        Some(license) => {
            warnings.push(format!(
                "static license from {} is in force on this node; licenses stored through the admin API are not used here",
                license.origin
            ));
            static_in_force(license, keys, now, &mut warnings)
        }
        None => stored_in_force.clone(),
    };
    if let Some(in_force) = &in_force {
        warnings.extend(in_force.evaluation.warnings.iter().cloned());
    }
    View {
        in_force,
        stored_in_force,
        warnings,
    }
}

fn static_in_force(
    license: &StaticLicense,
    keys: &TrustedKeys,
    now: UnixTime,
    warnings: &mut Vec<String>,
) -> Option<InForce> {
    match charter_license::validate(&license.text, keys, now) {
        Ok((verified, evaluation)) => Some(InForce {
            source: Source::Static,
            record: None,
            verified,
            evaluation,
        }),
        Err(e) => {
            // Checked at start-up; this happens when reloaded trusted keys no longer
            // verify it (or a date check fails later): the node is unlicensed.
            warnings.push(format!(
                "static license from {} is refused: {e}",
                license.origin
            ));
            None
        }
    }
}
