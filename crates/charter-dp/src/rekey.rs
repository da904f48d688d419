//! The trusted keys were reloaded (rotation without restarts): every license this node
//! holds is judged again with the keys now trusted, as start-up would judge it.
//!
//! - A static license that no longer verifies is refused: static configuration still
//!   wins, so the node is unlicensed (at start-up the configuration would be refused); one
//!   that verifies again is in force again.
//! - The cluster's license held (from the control plane or the cache) that no longer
//!   verifies is no longer in force: the node is unlicensed until the control plane sends a
//!   license the keys verify. The cache on disk is left as it is, so a restart judges it
//!   as start-up does.
//! - When no cluster license is held (the cache was refused at start, or the license was
//!   refused at an earlier reload), the cache on disk is judged again: a license signed by
//!   a newly trusted key is taken, as start-up would take it.
//!
//! The sync client then judges the control plane's last snapshot again, so a license it
//! refused before (signed by a key trusted only now) is taken, and its Ack tells the
//! control plane what this node enforces now.

use std::path::Path;

use charter_license::TrustedKeys;

use crate::cache;
use crate::config::StaticLicense;
use crate::state::{ClusterHeld, Enforcement, Source};

/// What changed in the licenses held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rejudged {
    /// The static license was refused, or taken again.
    pub static_changed: bool,
    /// The cluster's license held was refused, or taken again from the cache.
    pub cluster_changed: bool,
}

/// Judges every license held again with `keys` (see the module), swapping the state
/// where the outcome changed.
pub async fn rejudge(
    enforcement: &Enforcement,
    dir: &Path,
    static_license: Option<&StaticLicense>,
    keys: &TrustedKeys,
) -> Rejudged {
    let _judging = enforcement.judging().await;
    let now = enforcement.now();
    let mut outcome = Rejudged::default();

    if let Some(license) = static_license {
        let was_in_force = enforcement.static_in_force();
        match charter_license::validate(&license.text, keys, now) {
            Ok((verified, _)) => {
                if !was_in_force {
                    tracing::info!(origin = %license.origin, key_id = %verified.key_id,
                        "the static license verifies with the trusted keys now loaded: it is in force again");
                    outcome.static_changed = true;
                }
                enforcement.set_static(Ok(verified));
            }
            Err(e) => {
                if was_in_force {
                    tracing::error!(origin = %license.origin, code = %e.code,
                        "the static license is refused by the trusted keys now loaded: {}; this data plane denies licensed use until a trusted key verifies it (started with these keys, it would refuse the configuration)", e.message);
                    outcome.static_changed = true;
                }
                enforcement.set_static(Err(format!(
                    "static license from {} is refused by the trusted keys: {e}",
                    license.origin
                )));
            }
        }
    }

    let held = enforcement.cluster();
    let held_license = held.as_ref().and_then(|h| {
        h.license
            .as_ref()
            .and_then(|l| l.record.as_ref().map(|r| (l, r)))
    });
    match (held.as_ref(), held_license) {
        (Some(held), Some((license, record))) => {
            if let Err(e) = charter_license::validate(&record.payload, keys, now) {
                let fallback = if enforcement.has_static() {
                    "the static license stays in force on this node"
                } else {
                    "this data plane denies licensed use until the control plane sends a license the trusted keys verify"
                };
                tracing::error!(license = %record.id, key_id = %license.verified.key_id,
                    epoch = %held.epoch, revision = held.revision, code = %e.code,
                    "the license held is refused by the trusted keys now loaded: {}; {fallback}", e.message);
                enforcement.set_cluster(ClusterHeld {
                    license: None,
                    ..(**held).clone()
                });
                outcome.cluster_changed = true;
            }
        }
        (held, _) => {
            if let Some(taken) = from_cache(dir, held.map(|h| &**h), keys, now) {
                let license = taken.license.as_ref().and_then(|l| l.record.as_ref());
                tracing::info!(license = %license.map_or("", |r| r.id.as_str()),
                    epoch = %taken.epoch, revision = taken.revision,
                    "the license cache verifies with the trusted keys now loaded: its license is in force");
                enforcement.set_cluster(taken);
                outcome.cluster_changed = true;
            }
        }
    }
    outcome
}

/// The cache on disk, when it holds a license the keys verify and it is what the cluster
/// last gave this node (its epoch and revision are the ones held, or nothing is held).
fn from_cache(
    dir: &Path,
    held: Option<&ClusterHeld>,
    keys: &TrustedKeys,
    now: charter_license::UnixTime,
) -> Option<ClusterHeld> {
    let file = match cache::read(dir) {
        Ok(file) => file?,
        Err(e) => {
            tracing::debug!(error = %e, "the license cache cannot be read; nothing to judge again");
            return None;
        }
    };
    // A cache that says "unlicensed" has nothing to take.
    file.license.as_ref()?;
    if let Some(held) = held {
        if held.epoch != file.epoch || held.revision != file.revision {
            return None;
        }
    }
    let loaded = match cache::verify(dir, file, keys, now) {
        Ok(loaded) => loaded,
        Err(e) => {
            tracing::debug!(error = %e, "the license cache still does not verify");
            return None;
        }
    };
    let taken = crate::held_from_cache(loaded, held.map_or(Source::Cache, |h| h.source));
    taken.license.as_ref()?;
    Some(taken)
}
