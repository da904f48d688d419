//! Prometheus metrics of the data plane: sync counters bumped by the sync client, and
//! license and connection gauges filled in at scrape time.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::state::InForce;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

/// The data plane's metrics.
pub struct Metrics {
    registry: Registry,
    license_status: Family<StatusLabels, Gauge>,
    days_left: Gauge,
    connected: Gauge,
    /// Snapshots received from the control plane.
    pub snapshots_received: Counter,
    /// Snapshots accepted (ACKed).
    pub snapshots_accepted: Counter,
    /// Snapshots rejected (NACKed).
    pub snapshots_rejected: Counter,
    /// Reconnection attempts after a failed or ended stream.
    pub reconnects: Counter,
    /// The cluster certificate's `notAfter`, when the cluster connection has one.
    cert_expiry: Option<(charter_runtime::cert_expiry::CertExpiry, Gauge)>,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        Metrics::with_cert_expiry(None)
    }

    /// Registers every metric, and the cluster certificate's expiry when there is one.
    pub fn with_cert_expiry(
        cert_expiry: Option<charter_runtime::cert_expiry::CertExpiry>,
    ) -> Metrics {
        let mut registry = Registry::default();
        let license_status = Family::<StatusLabels, Gauge>::default();
        let days_left = Gauge::default();
        let connected = Gauge::default();
        let snapshots_received = Counter::default();
        let snapshots_accepted = Counter::default();
        let snapshots_rejected = Counter::default();
        let reconnects = Counter::default();
        registry.register(
            "charter_dp_license_status",
            "1 for the status of the license in force on this data plane, 0 for the others",
            license_status.clone(),
        );
        registry.register(
            "charter_dp_license_days_left",
            "Days until the license in force expires (negative once expired; 0 when unlicensed)",
            days_left.clone(),
        );
        registry.register(
            "charter_dp_control_plane_connected",
            "1 while the sync stream to the control plane is open",
            connected.clone(),
        );
        registry.register(
            "charter_dp_snapshots_received",
            "Snapshots received from the control plane",
            snapshots_received.clone(),
        );
        registry.register(
            "charter_dp_snapshots_accepted",
            "Snapshots accepted (ACKed)",
            snapshots_accepted.clone(),
        );
        registry.register(
            "charter_dp_snapshots_rejected",
            "Snapshots rejected (NACKed): stale revision or a license that does not verify",
            snapshots_rejected.clone(),
        );
        registry.register(
            "charter_dp_reconnects",
            "Reconnections to the control plane after a failed or ended stream",
            reconnects.clone(),
        );
        let cert_expiry = cert_expiry.map(|expiry| {
            let gauge = Gauge::default();
            registry.register(
                "charter_cluster_cert_expiry_timestamp_seconds",
                "When this node's cluster certificate expires (Unix seconds)",
                gauge.clone(),
            );
            (expiry, gauge)
        });
        Metrics {
            cert_expiry,
            registry,
            license_status,
            days_left,
            connected,
            snapshots_received,
            snapshots_accepted,
            snapshots_rejected,
            reconnects,
        }
    }

    /// Renders the Prometheus text exposition, refreshing the gauges first.
    pub fn render(&self, in_force: &InForce, connected: bool) -> String {
        for s in ["valid", "expiring", "grace", "expired", "unlicensed"] {
            self.license_status
                .get_or_create(&StatusLabels {
                    status: s.to_owned(),
                })
                .set(i64::from(s == in_force.status.as_str()));
        }
        self.days_left
            .set(in_force.evaluation.as_ref().map_or(0, |e| e.days_left));
        self.connected.set(i64::from(connected));
        if let Some((expiry, gauge)) = &self.cert_expiry {
            gauge.set(expiry.get());
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
