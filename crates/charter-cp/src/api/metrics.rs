//! Prometheus metrics: request counts and latencies by route and status, plus license
//! gauges filled in at scrape time.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::ApiState;

/// Static strings, so labelling a request allocates nothing.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

type HistogramFamily = Family<RequestLabels, Histogram, fn() -> Histogram>;

/// The control plane's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily,
    licenses_stored: Gauge,
    store_revision: Gauge,
    days_left: Gauge,
    license_status: Family<StatusLabels, Gauge>,
    /// The cluster certificate's `notAfter`, when the cluster port has one.
    cert_expiry: Option<(charter_runtime::cert_expiry::CertExpiry, Gauge)>,
}

fn latency_histogram() -> Histogram {
    // 100 µs to about 3 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 15))
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
        let requests = Family::<RequestLabels, Counter>::default();
        let latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let licenses_stored = Gauge::default();
        let store_revision = Gauge::default();
        let days_left = Gauge::default();
        let license_status = Family::<StatusLabels, Gauge>::default();
        registry.register(
            "charter_http_requests",
            "Admin API requests by method, route and status",
            requests.clone(),
        );
        registry.register(
            "charter_http_request_duration_seconds",
            "Admin API request latency by method, route and status",
            latency.clone(),
        );
        registry.register(
            "charter_licenses_stored",
            "Licenses in the store",
            licenses_stored.clone(),
        );
        registry.register(
            "charter_store_revision",
            "Store revision (grows with every write)",
            store_revision.clone(),
        );
        registry.register(
            "charter_license_days_left",
            "Days until the license in force expires (negative once expired; absent when unlicensed)",
            days_left.clone(),
        );
        registry.register(
            "charter_license_status",
            "1 for the status of this node's license, 0 for the others",
            license_status.clone(),
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
            registry,
            requests,
            latency,
            licenses_stored,
            store_revision,
            days_left,
            license_status,
            cert_expiry,
        }
    }

    /// Renders the Prometheus text exposition, refreshing the license gauges first from
    /// the snapshot (no store read, nothing that grows with the number of licenses but
    /// the count the snapshot keeps).
    pub fn render(&self, service: &crate::service::Service) -> String {
        let snapshot = service.snapshot();
        self.licenses_stored.set(snapshot.len() as i64);
        self.store_revision.set(snapshot.revision as i64);
        let status = match service.view_of(&snapshot).in_force {
            Some(in_force) => {
                self.days_left.set(in_force.evaluation.days_left);
                in_force.evaluation.status
            }
            None => charter_license::Status::Unlicensed,
        };
        for s in ["valid", "expiring", "grace", "expired", "unlicensed"] {
            let value = i64::from(s == status.as_str());
            self.license_status
                .get_or_create(&StatusLabels {
                    status: s.to_owned(),
                })
                .set(value);
        }
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

/// Counts and times every admin request by its route template (never the raw path, so
/// ids do not explode the label set).
pub async fn track(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| route_label(p.as_str()));
    let response = next.run(request).await;
    let labels = RequestLabels {
        method,
        route,
        status: response.status().as_u16(),
    };
    let metrics = state.metrics();
    metrics.requests.get_or_create(&labels).inc();
    metrics
        .latency
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
}

/// The method as a label: the methods the admin API serves, and `other` for the rest (an
/// unknown method gets a 405; counting it under its own name would let a client grow the
/// label set at will).
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// The route template as a label: one of [`ROUTES`](super::ROUTES), which the router
/// is built from.
fn route_label(matched: &str) -> &'static str {
    super::ROUTES
        .iter()
        .find(|route| **route == matched)
        .copied()
        .unwrap_or("other")
}

#[cfg(test)]
mod tests;
