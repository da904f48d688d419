//! Which license is in force on this control plane: a static license if configured, else
//! the stored license with the most recent `updated_at` among those that verify.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use charter_license::{
    select_effective, Candidate, Evaluation, LicenseDocument, TrustedKeys, UnixTime,
    VerifiedLicense,
};
use charter_store::LicenseRecord;

use crate::config::StaticLicense;

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

/// Verifies stored licenses once per distinct payload: a record's verification only
/// changes when its payload does, and the trusted keys are fixed for the process.
#[derive(Default)]
pub struct VerifyCache {
    verified: Mutex<HashMap<String, Option<Arc<VerifiedLicense>>>>,
}

impl VerifyCache {
    fn verify(&self, keys: &TrustedKeys, record: &LicenseRecord) -> Option<Arc<VerifiedLicense>> {
        // The lock is held only for map access; verification runs outside it. A poisoned
        // lock only means another thread panicked mid-insert, and the map is still usable.
        if let Some(hit) = self
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&record.checksum)
        {
            return hit.clone();
        }
        let result = keys.verify_text(&record.payload).ok().map(Arc::new);
        let mut map = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > 10_000 {
            map.clear();
        }
        map.insert(record.checksum.clone(), result.clone());
        result
    }
}

/// Computes the view from the stored records and the static license at `now`.
pub fn compute(
    records: Vec<LicenseRecord>,
    keys: &TrustedKeys,
    cache: &VerifyCache,
    static_license: Option<&StaticLicense>,
    now: UnixTime,
) -> View {
    let mut warnings = Vec::new();
    let mut candidates = Vec::new();
    let mut unverified = 0;
    for record in records {
        let Some(verified) = cache.verify(keys, &record) else {
            unverified += 1;
            continue;
        };
        // A license whose creation date is still ahead is not in force yet.
        let Ok(evaluation) = verified.evaluate(now) else {
            continue;
        };
        candidates.push(Candidate {
            updated_at: record.updated_at,
            revision: record.revision,
            status: evaluation.status,
            item: (record, verified, evaluation),
        });
    }
    if unverified > 0 {
        warnings.push(format!(
            "{unverified} stored license(s) do not verify against the trusted keys and are ignored"
        ));
    }
    let selection = select_effective(&candidates);
    let stored_in_force = selection.effective.map(|c| {
        let (record, verified, evaluation) = &c.item;
        InForce {
            source: Source::Store,
            record: Some(record.clone()),
            verified: (**verified).clone(),
            evaluation: evaluation.clone(),
        }
    });
    if selection.expired_while_other_valid {
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
            // Checked at start-up; this only happens if a date check fails later.
            warnings.push(format!(
                "static license from {} is refused: {e}",
                license.origin
            ));
            None
        }
    }
}

/// The canonical text a license is stored as: the compact document with sorted keys, so
/// the same license submitted with other whitespace or key order is the same payload.
pub fn normalized(document: &LicenseDocument) -> String {
    document.to_json()
}
