//! The gRPC cluster server: one `Sync` stream per data plane. The cluster's effective
//! license is encoded once into a shared frame; every stream sends the same bytes when
//! the frame changes. Acks, pings and disconnects feed the data-plane inventory.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
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

use crate::service::{Service, Snapshot as Licenses};

/// A data plane that sends nothing for this long is marked gone and its stream closed.
pub const LIVENESS: Duration = Duration::from_secs(45);
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

/// The frame every stream sends, replaced when the license in force changes.
pub struct Hub {
    frames: watch::Sender<Arc<Frame>>,
}

impl Hub {
    /// The hub with the frame of the service's current snapshot.
    pub fn new(service: &Service) -> Arc<Hub> {
        let snapshot = service.snapshot();
        Arc::new(Hub {
            frames: watch::Sender::new(Arc::new(compute_frame(service, &snapshot))),
        })
    }

    /// The current frame.
    pub fn frame(&self) -> Arc<Frame> {
        self.frames.borrow().clone()
    }
}

/// The frame of a snapshot: its license in force now, labelled with its revision (so a
/// snapshot's revision is never ahead of its content). On a control plane with a static
/// license, the static license, never a stored one (seed 003: static configuration "does
/// not communicate license changes").
fn compute_frame(service: &Service, snapshot: &Licenses) -> Frame {
    let view = service.view_of(snapshot);
    if let Some(static_license) = service.static_license() {
        return static_frame(snapshot, static_license, &view);
    }
    let license = view.stored_in_force.as_ref().and_then(|f| f.record.clone());
    let epoch = snapshot.epoch.to_string();
    let message = ControlPlaneMessage {
        msg: Some(control_plane_message::Msg::Snapshot(Snapshot {
            epoch: epoch.clone(),
            revision: snapshot.revision,
            license: license.as_ref().map(|r| License {
                id: r.id.to_string(),
                payload: r.payload.clone(),
                created_at: r.created_at,
                updated_at: r.updated_at,
            }),
        })),
    };
    Frame {
        epoch,
        revision: snapshot.revision,
        licensed_dataplanes: view
            .stored_in_force
            .as_ref()
            .and_then(|f| f.verified.terms.dataplanes),
        license: license.map(|r| (r.id, r.updated_at, r.checksum)),
        encoded: EncodedControlPlaneMessage::new(&message),
    }
}

/// The frame carrying a control plane's static license. It has no stored record, so its id
/// is made from its text (the same license, the same id, across restarts) and its times
/// are its creation date's midnight (UTC).
fn static_frame(
    snapshot: &Licenses,
    static_license: &charter_runtime::flags::StaticLicense,
    view: &crate::service::View,
) -> Frame {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(static_license.text.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    let id = uuid::Builder::from_custom_bytes(bytes).into_uuid();
    let checksum = charter_store::checksum_of(&static_license.text);
    let in_force = view.in_force.as_ref();
    let created = in_force.map_or(0, |f| {
        f.verified
            .terms
            .creation_date
            .midnight()
            .assume_utc()
            .unix_timestamp()
    });
    let epoch = snapshot.epoch.to_string();
    let message = ControlPlaneMessage {
        msg: Some(control_plane_message::Msg::Snapshot(Snapshot {
            epoch: epoch.clone(),
            revision: snapshot.revision,
            license: Some(License {
                id: id.to_string(),
                payload: static_license.text.clone(),
                created_at: created,
                updated_at: created,
            }),
        })),
    };
    Frame {
        epoch,
        revision: snapshot.revision,
        licensed_dataplanes: in_force.and_then(|f| f.verified.terms.dataplanes),
        license: Some((id, created, checksum)),
        encoded: EncodedControlPlaneMessage::new(&message),
    }
}

/// Publishes a new frame whenever the cluster's license changes: on every new snapshot,
/// and every [`RECHECK_EVERY`] (a license whose creation date arrives, a day that passes),
/// until `shutdown` fires.
pub async fn publish(service: Service, hub: Arc<Hub>, mut shutdown: watch::Receiver<bool>) {
    let mut snapshots = service.subscribe();
    let mut recheck = tokio::time::interval(RECHECK_EVERY);
    loop {
        tokio::select! {
            changed = snapshots.changed() => if changed.is_err() { return },
            _ = recheck.tick() => {}
            _ = shutdown.changed() => return,
        }
        let snapshot = snapshots.borrow_and_update().clone();
        let frame = compute_frame(&service, &snapshot);
        hub.frames.send_if_modified(|current| {
            if current.license == frame.license && current.epoch == frame.epoch {
                return false;
            }
            tracing::info!(revision = frame.revision,
                license = %frame.license.as_ref().map_or("none".to_owned(), |l| l.0.to_string()),
                data_planes = service.inventory().connected_count(), "pushing a new snapshot to data planes");
            *current = Arc::new(frame);
            true
        });
    }
}

/// A data plane's node id: `[A-Za-z0-9._:-]{1,128}`.
pub fn valid_node_id(node_id: &str) -> bool {
    (1..=128).contains(&node_id.len())
        && node_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
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
    service: Service,
    hub: Arc<Hub>,
    shutdown: watch::Receiver<bool>,
}

impl ClusterService {
    /// The service over a hub; streams end when `shutdown` fires.
    pub fn new(service: Service, hub: Arc<Hub>, shutdown: watch::Receiver<bool>) -> ClusterService {
        ClusterService {
            service,
            hub,
            shutdown,
        }
    }
}

/// What the stream knows of its data plane, kept in the inventory.
struct Peer {
    service: Service,
    record: DataPlaneRecord,
}

impl Peer {
    fn save(&mut self) {
        self.record.last_seen = self.service.now();
        self.service.inventory().record(self.record.clone());
    }
}

/// Owns a stream's peer; when the stream ends or is dropped, unregisters it and records
/// the data plane as disconnected, unless a newer stream of the same node replaced it
/// (whose row must not be overwritten).
struct StreamEnd {
    node_id: String,
    serial: u64,
    peer: Peer,
}

impl Drop for StreamEnd {
    fn drop(&mut self) {
        let node_id = &self.node_id;
        let inventory = self.peer.service.inventory();
        if inventory.disconnect(node_id, self.serial) {
            let connected = inventory.connected_count();
            self.peer.record.sync_status = "disconnected".to_owned();
            self.peer.save();
            tracing::info!(%node_id, connected, "data plane disconnected");
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
        let addr: Option<SocketAddr> = charter_tls::remote_addr(&request);
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
        if !valid_node_id(&node_id) {
            // Recorded nowhere: the id is only logged, escaped, with the peer's address.
            tracing::warn!(%ip, node_id = ?node_id.chars().take(160).collect::<String>(),
                "refusing a data plane whose node_id is not [A-Za-z0-9._:-]{{1,128}}");
            return Err(Status::invalid_argument(
                "node_id must be 1 to 128 characters of A-Z, a-z, 0-9, '.', '_', ':' and '-'",
            ));
        }
        let mut peer = Peer {
            service: self.service.clone(),
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
                control_plane: self.service.name().to_owned(),
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
        let inventory = self.service.inventory();
        let serial = inventory.connect(&node_id);
        let connected = inventory.connected_count();
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

        let mut frames = self.hub.frames.subscribe();
        let mut shutdown = self.shutdown.clone();
        // Records the end of the stream however it ends: also when hyper drops it because
        // the connection went away (a killed data plane), where code after the loop would
        // never run, or before it was ever polled. Moved into the stream.
        let mut guard = StreamEnd {
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
            // Waited on for the stream's whole life: registered once, not at every wake-up.
            let stopped = async move { drop(shutdown.wait_for(|stop| *stop).await) };
            tokio::pin!(stopped);
            'stream: loop {
                {
                    // One wait for the next frame per frame sent, kept across the data
                    // plane's messages.
                    let changed = frames.changed();
                    tokio::pin!(changed);
                    loop {
                        tokio::select! {
                            // A new frame first: the wake-up that carries it sends it
                            // without polling the inbound side, the timer or the shutdown.
                            biased;
                            changed = &mut changed => {
                                if changed.is_err() { break 'stream; }
                                break;
                            }
                            message = inbound.message() => {
                                liveness.as_mut().reset(tokio::time::Instant::now() + LIVENESS);
                                match message {
                                    Ok(Some(DataPlaneMessage { msg: Some(data_plane_message::Msg::Ack(ack)) })) => {
                                        let current = sent.as_ref().is_some_and(|f| f.revision == ack.revision && f.epoch == ack.epoch);
                                        let record = &mut guard.peer.record;
                                        if ack.accepted {
                                            record.license_revision = ack.revision;
                                            record.license_id = Some(ack.license_id).filter(|s| !s.is_empty());
                                            record.license_status = ack.license_status;
                                            record.last_error = None;
                                            if current { set(&mut record.sync_status, "in_sync"); }
                                            tracing::debug!(%node_id, revision = ack.revision, "snapshot accepted");
                                        } else {
                                            set(&mut record.sync_status, "rejected");
                                            // What the data plane still enforces (say, its license
                                            // kept from an empty control plane), not what was offered.
                                            record.license_id = Some(ack.license_id).filter(|s| !s.is_empty());
                                            record.license_status = ack.license_status;
                                            record.last_error = Some(format!("{}: {}", ack.error_code, ack.error));
                                            tracing::warn!(%node_id, revision = ack.revision, code = %ack.error_code,
                                                "data plane rejected the snapshot: {}", ack.error);
                                        }
                                        guard.peer.save();
                                    }
                                    Ok(Some(DataPlaneMessage { msg: Some(data_plane_message::Msg::Ping(_)) })) => guard.peer.save(),
                                    Ok(Some(DataPlaneMessage { msg: Some(data_plane_message::Msg::Telemetry(t)) })) => {
                                        guard.peer.save();
                                        // Boxed: a report is rare, and its store write's state
                                        // would otherwise make every stream's state larger.
                                        if let Some(ack) = Box::pin(apply_telemetry(&guard.peer.service, &node_id, t)).await {
                                            yield Ok(ack);
                                        }
                                        // Not durable: no ack, so the data plane sends it again.
                                    }
                                    Ok(Some(_)) => {
                                        tracing::warn!(%node_id, "unexpected message from data plane; closing its stream");
                                        yield Err(Status::invalid_argument("unexpected message: Hello may only be sent once"));
                                        break 'stream;
                                    }
                                    Ok(None) => break 'stream,
                                    Err(e) => {
                                        tracing::info!(%node_id, error = %e, "data plane stream failed");
                                        break 'stream;
                                    }
                                }
                            }
                            _ = &mut liveness => {
                                tracing::warn!(%node_id, "no message from data plane for 45 s; marking it gone");
                                break 'stream;
                            }
                            _ = &mut stopped => break 'stream,
                        }
                    }
                }
                let frame = frames.borrow_and_update().clone();
                set(&mut guard.peer.record.sync_status, "syncing");
                sent = Some(frame.clone());
                yield Ok(frame.encoded.clone());
            }
            drop(guard);
        };
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Sets a status field, reusing its buffer (a frame sent to every stream does not allocate
/// a status string per stream).
fn set(status: &mut String, value: &str) {
    if status != value {
        status.clear();
        status.push_str(value);
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

/// Applies a telemetry report exactly once (durably, in a batch with the reports that
/// arrive with it) and returns the encoded ack, or `None` when it could not be stored (then
/// no ack is sent, and the data plane resends).
async fn apply_telemetry(
    service: &Service,
    node_id: &str,
    telemetry: charter_proto::v1::Telemetry,
) -> Option<EncodedControlPlaneMessage> {
    let seq = telemetry.seq;
    let mut counters = Vec::new();
    for counter in telemetry.counters {
        if valid_bucket(&counter.bucket) {
            counters.push((counter.bucket, counter.request_count));
        } else {
            tracing::warn!(%node_id, seq, bucket = ?counter.bucket, "ignoring a usage counter whose bucket is not YYYY-MM");
        }
    }
    let report = charter_store::Report {
        node_id: node_id.to_owned(),
        seq,
        counters,
    };
    match service.apply_telemetry(report).await {
        Ok(applied) => {
            tracing::debug!(%node_id, seq, applied, "telemetry acknowledged");
            let ack = ControlPlaneMessage {
                msg: Some(control_plane_message::Msg::TelemetryAck(
                    charter_proto::v1::TelemetryAck { seq },
                )),
            };
            Some(EncodedControlPlaneMessage::new(&ack))
        }
        Err(e) => {
            tracing::error!(%node_id, seq, error = %e, "cannot store telemetry; the data plane will resend it");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{compatible, valid_bucket, valid_node_id};

    #[test]
    fn node_ids() {
        for good in [
            "dp-1",
            "a",
            "node.example.com:8000",
            "A_b-c.d:e",
            &"x".repeat(128),
        ] {
            assert!(valid_node_id(good), "{good}");
        }
        for bad in [
            "",
            &"x".repeat(129),
            "dp 1",
            "dp/1",
            "dp\n1",
            "CHWAL\u{0}",
            "é",
            "{\"a\":1}",
        ] {
            assert!(!valid_node_id(bad), "{bad:?}");
        }
    }

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
