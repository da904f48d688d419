//! The enforcement state: what the cluster last gave this node (swapped whole on every
//! accepted snapshot), the static license if one is configured, and the judgement of
//! "what is in force, now" that every reader makes against the clock — a license
//! expires with time, not only when a snapshot arrives.
//!
//! The snapshot rules (stale revisions, new epochs, an empty control plane, verification)
//! are the pure functions [`judge`] and [`decide`], and the wait before a lower revision is
//! taken is [`LowerRevisions`], so they are tested without a network.

use std::sync::Arc;
use std::time::Duration;

use charter_license::{
    Clock, Evaluation, LicenseError, Status, TrustedKeys, UnixTime, VerifiedLicense,
};
use charter_proto::v1::Snapshot;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::cache::{CacheFile, CachedLicense, CACHE_FORMAT};
use crate::clock::NodeClock;

/// Where the license in force came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A snapshot received from the control plane since this process started.
    Cluster,
    /// The on-disk cache, verified at start; the control plane has not confirmed it yet.
    Cache,
    /// `--license-path` or `CHARTER_LICENSE_DATA`: wins on this node.
    Static,
}

impl Source {
    /// As in `GET /license`: `cluster`, `cache` or `static`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Cluster => "cluster",
            Source::Cache => "cache",
            Source::Static => "static",
        }
    }
}

/// A verified license this node holds.
#[derive(Debug, Clone)]
pub struct HeldLicense {
    /// The control plane's record; `None` for a static license.
    pub record: Option<CachedLicense>,
    /// The verified document, its signing key and terms.
    pub verified: VerifiedLicense,
}

/// What the cluster last gave this node: a snapshot accepted from the control plane or
/// loaded from the cache.
#[derive(Debug, Clone)]
pub struct ClusterHeld {
    /// The control plane's store epoch.
    pub epoch: String,
    /// The store revision.
    pub revision: u64,
    /// The cluster's license; `None` when the cluster is unlicensed.
    pub license: Option<HeldLicense>,
    /// [`Source::Cluster`] or [`Source::Cache`].
    pub source: Source,
    /// When it was accepted (Unix seconds).
    pub received_at: UnixTime,
}

impl ClusterHeld {
    /// The cache file recording this state.
    pub fn to_cache(&self) -> CacheFile {
        CacheFile {
            format: CACHE_FORMAT,
            epoch: self.epoch.clone(),
            revision: self.revision,
            license: self.license.as_ref().and_then(|l| l.record.clone()),
            received_at: self.received_at,
        }
    }
}

/// The license situation of this node, judged at one moment.
#[derive(Debug, Clone)]
pub struct InForce {
    /// Where the license came from; `None` when there is none.
    pub source: Option<Source>,
    /// The cluster epoch of what is held (`None` for static, or before any snapshot).
    pub epoch: Option<String>,
    /// The cluster revision of what is held.
    pub revision: Option<u64>,
    /// The license, if any.
    pub license: Option<HeldLicense>,
    /// Its evaluation now; `None` when unlicensed.
    pub evaluation: Option<Evaluation>,
    /// The status now.
    pub status: Status,
    /// What an operator should be told.
    pub warnings: Vec<String>,
}

impl InForce {
    /// Whether licensed use is allowed now.
    pub fn allows(&self) -> bool {
        self.status.allows()
    }

    /// The control plane's record id of the license in force ("" for none or static).
    pub fn license_id(&self) -> &str {
        self.license
            .as_ref()
            .and_then(|l| l.record.as_ref())
            .map_or("", |r| r.id.as_str())
    }

    /// A name for logs: the record id, `static`, or `unlicensed`.
    pub fn name(&self) -> String {
        match (&self.license, self.source) {
            (None, _) => "unlicensed".to_owned(),
            (Some(_), Some(Source::Static)) => "static".to_owned(),
            (Some(l), _) => l
                .record
                .as_ref()
                .map_or_else(|| "unknown".to_owned(), |r| r.id.clone()),
        }
    }

    /// The `GET /license` object.
    pub fn to_json(&self) -> Value {
        let record = self.license.as_ref().and_then(|l| l.record.as_ref());
        json!({
            "status": self.status.as_str(),
            "id": record.map(|r| r.id.clone()),
            "updated_at": record.map(|r| r.updated_at),
            "revision": self.revision,
            "epoch": self.epoch,
            "source": self.source.map(Source::as_str),
            "key_id": self.license.as_ref().map(|l| l.verified.key_id.to_string()),
            "payload": self.license.as_ref().map(|l| Value::Object(l.verified.document.payload().clone())),
            "days_left": self.evaluation.as_ref().map(|e| e.days_left),
            "warnings": self.warnings,
        })
    }
}

/// The shared enforcement state.
///
/// The cluster part sits in a `watch` channel: the sync client, and the judgement again
/// after the trusted keys were reloaded (`rekey`), swap it whole, each holding
/// [`Enforcement::judging`]; readers clone an `Arc` and never wait for a writer.
pub struct Enforcement {
    /// The static license as judged with the keys trusted now: `None` when none is
    /// configured, an error when the trusted keys (reloaded) no longer verify it.
    static_license: watch::Sender<Option<Result<HeldLicense, String>>>,
    cluster: watch::Sender<Option<Arc<ClusterHeld>>>,
    clock: Arc<NodeClock>,
    /// Held by whoever judges a license with the trusted keys and then swaps the state
    /// (the sync client with a snapshot, the re-judgement after the keys were reloaded), so
    /// no license verified with a set of keys is swapped in after that set was replaced.
    judging: tokio::sync::Mutex<()>,
}

impl Enforcement {
    /// The state at start: the static license if configured, the verified cache if any.
    pub(crate) fn new(
        static_license: Option<VerifiedLicense>,
        cluster: Option<ClusterHeld>,
        clock: Arc<NodeClock>,
    ) -> Enforcement {
        let (cluster, _) = watch::channel(cluster.map(Arc::new));
        let (static_license, _) = watch::channel(static_license.map(|verified| {
            Ok(HeldLicense {
                record: None,
                verified,
            })
        }));
        Enforcement {
            static_license,
            cluster,
            clock,
            judging: tokio::sync::Mutex::new(()),
        }
    }

    /// Taken while a license is judged with the trusted keys and the state swapped to the
    /// outcome (see the field `judging`).
    pub async fn judging(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.judging.lock().await
    }

    /// The time decisions are made with (never earlier than any time seen before).
    pub fn now(&self) -> UnixTime {
        self.clock.now()
    }

    /// Whether a static license is configured (it wins over the cluster's).
    pub fn has_static(&self) -> bool {
        self.static_license.borrow().is_some()
    }

    /// Whether a static license is configured and verifies with the keys trusted now.
    pub fn static_in_force(&self) -> bool {
        matches!(*self.static_license.borrow(), Some(Ok(_)))
    }

    /// Sets what the static license is now that the trusted keys changed: verified, or
    /// refused (why). Only for a node with a static license.
    pub fn set_static(&self, judged: Result<VerifiedLicense, String>) {
        self.static_license.send_modify(|current| {
            if current.is_some() {
                *current = Some(judged.map(|verified| HeldLicense {
                    record: None,
                    verified,
                }));
            }
        });
    }

    /// What the cluster last gave this node.
    pub fn cluster(&self) -> Option<Arc<ClusterHeld>> {
        self.cluster.borrow().clone()
    }

    /// Replaces what the cluster gave this node.
    pub fn set_cluster(&self, held: ClusterHeld) {
        self.cluster.send_replace(Some(Arc::new(held)));
    }

    /// Notified on every change of the cluster part.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<ClusterHeld>>> {
        self.cluster.subscribe()
    }

    /// Whether the license in force allows traffic now: the gate's per-request check.
    /// Only a date comparison on the license already verified — no signature check, no
    /// clone of the license.
    pub fn allows_now(&self) -> bool {
        self.allows(self.now())
    }

    /// Whether the license in force allows traffic at `now` (read from [`Enforcement::now`]
    /// once for both the check and the count of a request).
    pub fn allows(&self, now: UnixTime) -> bool {
        let judge = |license: &HeldLicense| license.verified.allows(now);
        match &*self.static_license.borrow() {
            Some(Ok(license)) => judge(license),
            Some(Err(_)) => false,
            None => self
                .cluster
                .borrow()
                .as_ref()
                .and_then(|held| held.license.as_ref())
                .is_some_and(judge),
        }
    }

    /// What is in force, judged now.
    pub fn current(&self) -> InForce {
        let now = self.now();
        let cluster = self.cluster();
        let static_license = self.static_license.borrow().clone();
        let mut refused = None;
        let (source, epoch, revision, license) = match (static_license, &cluster) {
            (Some(Ok(license)), _) => (Some(Source::Static), None, None, Some(license)),
            // Static configuration still wins: the cluster's license is not used here.
            (Some(Err(reason)), _) => {
                refused = Some(reason);
                (None, None, None, None)
            }
            (None, Some(held)) => (
                held.license.as_ref().map(|_| held.source),
                Some(held.epoch.clone()),
                Some(held.revision),
                held.license.clone(),
            ),
            (None, None) => (None, None, None, None),
        };
        let (evaluation, status, mut warnings) = match &license {
            None => (None, Status::Unlicensed, Vec::new()),
            Some(l) => match l.verified.evaluate(now) {
                Ok(e) => {
                    let (status, warnings) = (e.status, e.warnings.clone());
                    (Some(e), status, warnings)
                }
                // A license accepted earlier is judged at a later time (the clock never
                // goes back), so this only happens if its dates were accepted wrongly.
                Err(e) => (None, Status::Unlicensed, vec![e.to_string()]),
            },
        };
        warnings.extend(refused);
        warnings.extend(self.clock.warning());
        InForce {
            source,
            epoch,
            revision,
            license,
            evaluation,
            status,
            warnings,
        }
    }
}

/// What to do with a snapshot.
#[derive(Debug)]
pub enum Decision {
    /// Same epoch, lower revision: ignored, NACKed `stale_revision` (until
    /// [`REGRESSION_WAIT`] passes with only lower revisions, see [`decide_regressed`]).
    Stale {
        /// The revision held.
        held: u64,
    },
    /// Same epoch, revision and license as held: nothing to do, ACKed.
    AlreadyApplied,
    /// The license does not verify: NACKed with its code, the previous state stays.
    Reject(LicenseError),
    /// Accept: write the cache, then swap the state to this.
    Apply(Box<ClusterHeld>),
}

/// How long the data plane ignores the lower revisions of the control plane it is connected
/// to before it takes that control plane's snapshot (DESIGN.md "Cluster protocol"): long
/// enough for a lagging replica to catch up (PostgreSQL control planes read the revision
/// every second), short enough that an altered cache or a store that went back does not
/// leave the node on an old license.
pub const REGRESSION_WAIT: Duration = Duration::from_secs(60);

/// What the sync client does with a snapshot: [`decide`]'s answer, or the refusal of a
/// control plane with a new, empty store.
#[derive(Debug)]
pub enum Verdict {
    /// Decided by the snapshot rules of [`decide`].
    Decided(Decision),
    /// A new epoch with no license while this node holds one: kept, NACKed
    /// `empty_control_plane`.
    EmptyControlPlane {
        /// The epoch of the license held.
        held_epoch: String,
    },
}

/// The rules the sync client applies to a snapshot: [`decide`]'s, and that a new epoch with
/// no license (a control plane whose store is new and empty) never displaces a license this
/// node holds. Deleting the last license within the same epoch still makes the node
/// unlicensed.
pub fn judge(
    held: Option<&ClusterHeld>,
    snapshot: &Snapshot,
    keys: &TrustedKeys,
    now: UnixTime,
) -> Verdict {
    if let Some(held) = held {
        if held.epoch != snapshot.epoch && snapshot.license.is_none() && held.license.is_some() {
            return Verdict::EmptyControlPlane {
                held_epoch: held.epoch.clone(),
            };
        }
    }
    Verdict::Decided(decide(held, snapshot, keys, now))
}

/// A lower revision of the held epoch, taken after [`REGRESSION_WAIT`] of nothing else from
/// the control plane: the revision rule is set aside, the license is still verified.
pub fn decide_regressed(
    held: Option<&ClusterHeld>,
    snapshot: &Snapshot,
    keys: &TrustedKeys,
    now: UnixTime,
) -> Decision {
    match held {
        Some(h) if h.epoch == snapshot.epoch && snapshot.revision < h.revision => {
            match verify(snapshot, keys, now) {
                Ok(new) => Decision::Apply(Box::new(new)),
                Err(e) => Decision::Reject(e),
            }
        }
        _ => decide(held, snapshot, keys, now),
    }
}

/// The lower revisions the connected control plane offers: since when, and the latest.
/// The sync client keeps one per stream, so a new connection starts the wait again.
#[derive(Debug, Default)]
pub struct LowerRevisions {
    pending: Option<(Instant, Snapshot)>,
}

impl LowerRevisions {
    /// The control plane offered `snapshot`, a lower revision of the held epoch, `at`. The
    /// wait runs from the first lower revision; the latest one is what will be taken.
    pub fn offered(&mut self, snapshot: Snapshot, at: Instant) {
        let since = self.pending.as_ref().map_or(at, |(since, _)| *since);
        self.pending = Some((since, snapshot));
    }

    /// The control plane offered something else (a revision not lower, another epoch):
    /// it is not going back, so the wait ends.
    pub fn clear(&mut self) {
        self.pending = None;
    }

    /// When the latest lower revision is to be taken, if one waits.
    pub fn deadline(&self, wait: Duration) -> Option<Instant> {
        self.pending.as_ref().map(|(since, _)| *since + wait)
    }

    /// The lower revision to take now, if the wait is over (the wait then ends).
    pub fn due(&mut self, now: Instant, wait: Duration) -> Option<Snapshot> {
        if self.deadline(wait)? > now {
            return None;
        }
        self.pending.take().map(|(_, snapshot)| snapshot)
    }
}

/// Whether the snapshot carries the license `held` holds (the same record, or none).
fn holds_same_license(held: &ClusterHeld, snapshot: &Snapshot) -> bool {
    let held = held.license.as_ref().and_then(|l| l.record.as_ref());
    match (held, &snapshot.license) {
        (None, None) => true,
        (Some(h), Some(s)) => {
            h.id == s.id && h.updated_at == s.updated_at && h.payload == s.payload
        }
        _ => false,
    }
}

/// The snapshot rules (DESIGN.md "Cluster protocol"): no going back in time within an
/// epoch, a new epoch is accepted, and every license is verified here at `now`. The sync
/// client applies them through [`judge`], which also keeps a license from an empty control
/// plane.
pub fn decide(
    held: Option<&ClusterHeld>,
    snapshot: &Snapshot,
    keys: &TrustedKeys,
    now: UnixTime,
) -> Decision {
    if let Some(held) = held.filter(|h| h.epoch == snapshot.epoch) {
        if snapshot.revision < held.revision {
            return Decision::Stale {
                held: held.revision,
            };
        }
        if snapshot.revision == held.revision && holds_same_license(held, snapshot) {
            return Decision::AlreadyApplied;
        }
        // The same revision with another license: nothing was written, but the control
        // plane's choice changed with time (a stored license's creation date arrived).
        // That is news, and is judged and applied like a new revision.
    }
    match verify(snapshot, keys, now) {
        Ok(new) => Decision::Apply(Box::new(new)),
        Err(e) => Decision::Reject(e),
    }
}

/// The snapshot's license verified here at `now`, as what the cluster gives this node.
fn verify(
    snapshot: &Snapshot,
    keys: &TrustedKeys,
    now: UnixTime,
) -> Result<ClusterHeld, LicenseError> {
    let license = match &snapshot.license {
        None => None,
        Some(license) => match charter_license::validate(&license.payload, keys, now) {
            Ok((verified, _)) => Some(HeldLicense {
                record: Some(CachedLicense {
                    id: license.id.clone(),
                    payload: license.payload.clone(),
                    created_at: license.created_at,
                    updated_at: license.updated_at,
                }),
                verified,
            }),
            Err(e) => return Err(e),
        },
    };
    Ok(ClusterHeld {
        epoch: snapshot.epoch.clone(),
        revision: snapshot.revision,
        license,
        source: Source::Cluster,
        received_at: now,
    })
}
