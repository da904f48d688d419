//! The gRPC cluster server: one `Sync` stream per data plane. The cluster's effective
//! license is encoded once into a shared frame; every stream sends the same bytes when
//! the frame changes. Acks, pings and disconnects feed the data-plane inventory.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use charter_proto::shared::cluster_server::Cluster;
use charter_proto::v1::{
    control_plane_message, data_plane_message, ControlPlaneMessage, DataPlaneMessage, Hello,
    License, Snapshot,
};
use charter_proto::EncodedControlPlaneMessage;
use charter_store::DataPlaneRecord;
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

use crate::inventory::Inventory;
use crate::state::AppState;

/// A data plane that sends nothing for this long is marked gone and its stream closed.
pub const LIVENESS: Duration = Duration::from_secs(45);
/// Inventory rows are purged this long after a data plane was last seen.
pub const PURGE_AFTER: Duration = Duration::from_secs(14 * 24 * 3600);
/// How long a new stream may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the effective license is recomputed without a store change (a license whose
/// creation date arrives, a day that passes).
const RECHECK_EVERY: Duration = Duration::from_secs(60);

/// The snapshot every data plane should hold, encoded once.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Store epoch.
    pub epoch: String,
    /// Store revision the frame was computed at.
    pub revision: u64,
    /// What identifies the license in the frame: (id, updated_at, checksum), or none.
    pub license: Option<(Uuid, i64, String)>,
    /// The license's `dataplanes` allowance, when it states one.
    pub licensed_dataplanes: Option<u64>,
    /// The encoded `ControlPlaneMessage { snapshot }`.
    pub encoded: EncodedControlPlaneMessage,
}

/// A connected data plane.
#[derive(Debug, Clone)]
struct Connection {
    serial: u64,
}

/// The shared state of the cluster server: the current frame and the connected streams.
pub struct Hub {
    frames: watch::Sender<Arc<Frame>>,
    connected: Mutex<HashMap<String, Connection>>,
    serials: AtomicU64,
    inventory: Arc<Inventory>,
}

impl Hub {
    /// The data-plane inventory the streams record into.
    pub fn inventory(&self) -> &Arc<Inventory> {
        &self.inventory
    }

    /// How many data planes hold a stream now.
    pub fn connected_count(&self) -> usize {
        self.connected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// The current frame.
    pub fn frame(&self) -> Arc<Frame> {
        self.frames.borrow().clone()
    }

    fn connect(&self, node_id: &str) -> u64 {
        let serial = self.serials.fetch_add(1, Ordering::Relaxed);
        self.connected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(node_id.to_owned(), Connection { serial });
        serial
    }

    /// Removes the registration, unless a newer stream of the same node replaced it;
    /// returns whether it did.
    fn disconnect(&self, node_id: &str, serial: u64) -> bool {
        let mut connected = self
            .connected
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if connected.get(node_id).is_some_and(|c| c.serial == serial) {
            connected.remove(node_id);
            return true;
        }
        false
    }
}

/// Computes the frame for the store's current state.
fn compute_frame(state: &AppState) -> Result<Frame, charter_store::StoreError> {
    let store = state.store();
    // The revision and the view from one read: a revision read separately could be ahead
    // of the view (a write committed but not yet published), and a snapshot labelled with
    // it would carry the older license under the newer revision.
    let (view, revision) = state.view_with_revision()?;
    let license = view.stored_in_force.as_ref().and_then(|f| f.record.clone());
    let message = ControlPlaneMessage {
        msg: Some(control_plane_message::Msg::Snapshot(Snapshot {
            epoch: store.epoch().to_string(),
            revision,
            license: license.as_ref().map(|r| License {
                id: r.id.to_string(),
                payload: r.payload.clone(),
                created_at: r.created_at,
                updated_at: r.updated_at,
            }),
        })),
    };
    Ok(Frame {
        epoch: store.epoch().to_string(),
        revision,
        licensed_dataplanes: view
            .stored_in_force
            .as_ref()
            .and_then(|f| f.verified.terms.dataplanes),
        license: license.map(|r| (r.id, r.updated_at, r.checksum)),
        encoded: EncodedControlPlaneMessage::new(&message),
    })
}

/// Makes the hub with the current frame.
pub fn hub(state: &AppState) -> Result<Arc<Hub>, charter_store::StoreError> {
    let (frames, _) = watch::channel(Arc::new(compute_frame(state)?));
    Ok(Arc::new(Hub {
        frames,
        connected: Mutex::new(HashMap::new()),
        serials: AtomicU64::new(0),
        inventory: Arc::new(Inventory::default()),
    }))
}

/// Publishes a new frame whenever the cluster's license changes, and purges old
/// inventory rows, until `shutdown` fires.
pub async fn publish(state: AppState, hub: Arc<Hub>, mut shutdown: watch::Receiver<bool>) {
    let mut revisions = state.store().subscribe();
    let mut recheck = tokio::time::interval(RECHECK_EVERY);
    loop {
        tokio::select! {
            changed = revisions.changed() => if changed.is_err() { return },
            _ = recheck.tick() => purge(&state),
            _ = shutdown.changed() => return,
        }
        let frame = match compute_frame(&state) {
            Ok(frame) => frame,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the license store to update data planes; will retry on the next change");
                continue;
            }
        };
        hub.frames.send_if_modified(|current| {
            if current.license == frame.license && current.epoch == frame.epoch {
                return false;
            }
            tracing::info!(revision = frame.revision,
                license = %frame.license.as_ref().map_or("none".to_owned(), |l| l.0.to_string()),
                data_planes = hub.connected_count(), "pushing a new snapshot to data planes");
            *current = Arc::new(frame);
            true
        });
    }
}

fn purge(state: &AppState) {
    let cutoff = state.now() - PURGE_AFTER.as_secs() as i64;
    match state.store().purge_data_planes(cutoff) {
        Ok(0) => {}
        Ok(n) => tracing::info!(purged = n, "purged data planes not seen for 14 days"),
        Err(e) => tracing::warn!(error = %e, "cannot purge old data planes"),
    }
}

/// Whether a data plane of `dp` version may sync with this control plane: same major,
/// and not newer in minor.
pub fn compatible(cp: &str, dp: &str) -> Result<(), String> {
    let parse = |v: &str| -> Option<(u64, u64)> {
        let mut parts = v.split(['.', '-', '+']);
        Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
    };
    let (Some((cp_major, cp_minor)), Some((dp_major, dp_minor))) = (parse(cp), parse(dp)) else {
        return Err(format!(
            "data plane version `{dp}` is not MAJOR.MINOR.PATCH"
        ));
    };
    if cp_major != dp_major {
        return Err(format!(
            "data plane version {dp} has another major version than control plane {cp}"
        ));
    }
    if dp_minor > cp_minor {
        return Err(format!(
            "data plane version {dp} is newer than control plane {cp}; upgrade the control plane first"
        ));
    }
    Ok(())
}

/// The `Cluster` service.
pub struct ClusterService {
    state: AppState,
    hub: Arc<Hub>,
    shutdown: watch::Receiver<bool>,
}

impl ClusterService {
    /// The service over a hub; streams end when `shutdown` fires.
    pub fn new(state: AppState, hub: Arc<Hub>, shutdown: watch::Receiver<bool>) -> ClusterService {
        ClusterService {
            state,
            hub,
            shutdown,
        }
    }
}

/// What the stream knows of its data plane, kept in the inventory.
struct Peer {
    state: AppState,
    inventory: Arc<Inventory>,
    record: DataPlaneRecord,
}

impl Peer {
    fn save(&mut self) {
        self.record.last_seen = self.state.now();
        self.inventory.record(self.record.clone());
    }
}

/// Owns a stream's peer; when the stream ends or is dropped, unregisters it and records
/// the data plane as disconnected, unless a newer stream of the same node replaced it
/// (whose row must not be overwritten).
struct StreamEnd {
    hub: Arc<Hub>,
    node_id: String,
    serial: u64,
    peer: Peer,
}

impl Drop for StreamEnd {
    fn drop(&mut self) {
        let node_id = &self.node_id;
        if self.hub.disconnect(node_id, self.serial) {
            self.peer.record.sync_status = "disconnected".to_owned();
            self.peer.save();
            tracing::info!(%node_id, connected = self.hub.connected_count(), "data plane disconnected");
        } else {
            tracing::info!(%node_id, "an older stream of a reconnected data plane ended");
        }
    }
}

type SyncStream = Pin<Box<dyn Stream<Item = Result<EncodedControlPlaneMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Cluster for ClusterService {
    type SyncStream = SyncStream;

    async fn sync(
        &self,
        request: Request<Streaming<DataPlaneMessage>>,
    ) -> Result<Response<SyncStream>, Status> {
        let addr: Option<SocketAddr> = request.remote_addr();
        let ip = addr.map_or_else(|| "unknown".to_owned(), |a| a.ip().to_string());
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(DataPlaneMessage {
                msg: Some(data_plane_message::Msg::Hello(hello)),
            }))) => hello,
            Ok(Ok(_)) => {
                tracing::warn!(%ip, "data plane stream did not start with Hello; closed");
                return Err(Status::invalid_argument("the first message must be Hello"));
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                tracing::warn!(%ip, "data plane sent no Hello within 10 s; closed");
                return Err(Status::deadline_exceeded("no Hello within 10 s"));
            }
        };
        let Hello {
            node_id,
            hostname,
            version,
            labels,
            cached_epoch,
            cached_revision,
            upstream,
        } = hello;
        if node_id.is_empty() || node_id.len() > 128 {
            return Err(Status::invalid_argument(
                "node_id must be 1 to 128 characters",
            ));
        }
        let mut peer = Peer {
            state: self.state.clone(),
            inventory: self.hub.inventory.clone(),
            record: DataPlaneRecord {
                id: node_id.clone(),
                ip: ip.clone(),
                hostname,
                version: version.clone(),
                labels: labels.into_iter().collect::<BTreeMap<_, _>>(),
                last_seen: 0,
                sync_status: "syncing".to_owned(),
                license_id: None,
                license_revision: cached_revision,
                license_status: "unknown".to_owned(),
                last_error: None,
                upstream,
            },
        };
        if let Err(reason) = compatible(env!("CARGO_PKG_VERSION"), &version) {
            tracing::warn!(%node_id, %ip, %version, "refusing data plane: {reason}");
            peer.record.sync_status = "version_incompatible".to_owned();
            peer.record.last_error = Some(reason.clone());
            peer.save();
            return Err(Status::failed_precondition(reason));
        }
        peer.save();
        let serial = self.hub.connect(&node_id);
        let connected = self.hub.connected_count();
        tracing::info!(%node_id, %ip, %version, %cached_epoch, cached_revision, connected, "data plane connected");
        let frame = self.hub.frame();
        if let Some(allowed) = frame.licensed_dataplanes {
            if connected as u64 > allowed {
                tracing::warn!(
                    connected,
                    allowed,
                    "more data planes are connected than the license allows"
                );
            }
        }

        let hub = self.hub.clone();
        let mut frames = self.hub.frames.subscribe();
        let mut shutdown = self.shutdown.clone();
        // Records the end of the stream however it ends: also when hyper drops it because
        // the connection went away (a killed data plane), where code after the loop would
        // never run, or before it was ever polled. Moved into the stream.
        let mut guard = StreamEnd {
            hub,
            node_id: node_id.clone(),
            serial,
            peer,
        };
        let stream = async_stream::stream! {
            let mut sent: Option<Arc<Frame>> = None;
            frames.mark_changed();
            // One timer per stream, moved on by each message: a frame's wake-up does not
            // touch the timer wheel.
            let liveness = tokio::time::sleep(LIVENESS);
            tokio::pin!(liveness);
            loop {
                tokio::select! {
                    changed = frames.changed() => {
                        if changed.is_err() { break; }
                        let frame = frames.borrow_and_update().clone();
                        guard.peer.record.sync_status = "syncing".to_owned();
                        sent = Some(frame.clone());
                        yield Ok(frame.encoded.clone());
                    }
                    message = inbound.message() => {
                        liveness.as_mut().reset(tokio::time::Instant::now() + LIVENESS);
                        match message {
                            Ok(Some(DataPlaneMessage { msg: Some(data_plane_message::Msg::Ack(ack)) })) => {
                                let current = sent.as_ref().is_some_and(|f| f.revision == ack.revision && f.epoch == ack.epoch);
                                if ack.accepted {
                                    guard.peer.record.license_revision = ack.revision;
                                    guard.peer.record.license_id = Some(ack.license_id.clone()).filter(|s| !s.is_empty());
                                    guard.peer.record.license_status = ack.license_status.clone();
                                    guard.peer.record.last_error = None;
                                    if current { guard.peer.record.sync_status = "in_sync".to_owned(); }
                                    tracing::debug!(%node_id, revision = ack.revision, "snapshot accepted");
                                } else {
                                    guard.peer.record.sync_status = "rejected".to_owned();
                                    guard.peer.record.license_status = ack.license_status.clone();
                                    guard.peer.record.last_error = Some(format!("{}: {}", ack.error_code, ack.error));
                                    tracing::warn!(%node_id, revision = ack.revision, code = %ack.error_code,
                                        "data plane rejected the snapshot: {}", ack.error);
                                }
                                guard.peer.save();
                            }
                            Ok(Some(DataPlaneMessage { msg: Some(data_plane_message::Msg::Ping(_)) })) => guard.peer.save(),
                            Ok(Some(DataPlaneMessage { msg: Some(data_plane_message::Msg::Telemetry(t)) })) => {
                                guard.peer.save();
                                match apply_telemetry(&guard.peer.state, &node_id, t).await {
                                    Some(ack) => yield Ok(ack),
                                    // Not durable: no ack, so the data plane sends it again.
                                    None => continue,
                                }
                            }
                            Ok(Some(_)) => {
                                tracing::warn!(%node_id, "unexpected message from data plane; closing its stream");
                                yield Err(Status::invalid_argument("unexpected message: Hello may only be sent once"));
                                break;
                            }
                            Ok(None) => break,
                            Err(e) => {
                                tracing::info!(%node_id, error = %e, "data plane stream failed");
                                break;
                            }
                        }
                    }
                    _ = &mut liveness => {
                        tracing::warn!(%node_id, "no message from data plane for 45 s; marking it gone");
                        break;
                    }
                    _ = shutdown.changed() => break,
                }
            }
            drop(guard);
        };
        Ok(Response::new(Box::pin(stream)))
    }
}

/// A `YYYY-MM` usage bucket.
fn valid_bucket(bucket: &str) -> bool {
    let b = bucket.as_bytes();
    b.len() == 7
        && b[4] == b'-'
        && b[..4].iter().chain(&b[5..]).all(u8::is_ascii_digit)
        && matches!(bucket[5..].parse::<u8>(), Ok(1..=12))
}

/// Applies a telemetry report exactly once (durably) and returns the encoded ack, or
/// `None` when it could not be stored (then no ack is sent, and the data plane resends).
async fn apply_telemetry(
    state: &AppState,
    node_id: &str,
    telemetry: charter_proto::v1::Telemetry,
) -> Option<EncodedControlPlaneMessage> {
    let seq = telemetry.seq;
    let mut counters = Vec::new();
    for counter in telemetry.counters {
        if valid_bucket(&counter.bucket) {
            counters.push((counter.bucket, counter.request_count));
        } else {
            tracing::warn!(%node_id, seq, bucket = %counter.bucket, "ignoring a usage counter whose bucket is not YYYY-MM");
        }
    }
    let (store, node) = (state.store().clone(), node_id.to_owned());
    let applied =
        tokio::task::spawn_blocking(move || store.apply_telemetry(&node, seq, &counters)).await;
    match applied {
        Ok(Ok(applied)) => {
            tracing::debug!(%node_id, seq, applied, "telemetry acknowledged");
            let ack = ControlPlaneMessage {
                msg: Some(control_plane_message::Msg::TelemetryAck(
                    charter_proto::v1::TelemetryAck { seq },
                )),
            };
            Some(EncodedControlPlaneMessage::new(&ack))
        }
        Ok(Err(e)) => {
            tracing::error!(%node_id, seq, error = %e, "cannot store telemetry; the data plane will resend it");
            None
        }
        Err(e) => {
            tracing::error!(%node_id, seq, error = %e, "telemetry task failed; the data plane will resend it");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{compatible, valid_bucket};

    #[test]
    fn usage_buckets() {
        assert!(valid_bucket("2026-11"));
        for bad in [
            "2026-13", "2026-00", "26-11", "2026/11", "2026-1x", "2026-111",
        ] {
            assert!(!valid_bucket(bad), "{bad}");
        }
    }

    #[test]
    fn version_compatibility() {
        assert!(compatible("1.4.0", "1.4.9").is_ok());
        assert!(compatible("1.4.0", "1.2.0").is_ok(), "older minor is fine");
        assert!(compatible("1.4.0", "1.5.0").unwrap_err().contains("newer"));
        assert!(compatible("1.4.0", "2.0.0").unwrap_err().contains("major"));
        assert!(compatible("1.4.0", "x")
            .unwrap_err()
            .contains("MAJOR.MINOR"));
    }
}
