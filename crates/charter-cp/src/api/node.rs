//! This node's own endpoints: `/license/status`, `/license/report`, `/status`, `/metrics`
//! and `/openapi.json`.

use axum::extract::{RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{ApiError, ApiState};
use crate::service::{InForce, View};

/// The OpenAPI 3 document of this API.
const OPENAPI: &str = include_str!("../openapi.json");

/// An irreversible identifier: SHA-256 over a domain-separating prefix and the value.
pub fn hashed(domain: &str, value: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"charter/");
    hasher.update(domain.as_bytes());
    hasher.update([0]);
    hasher.update(value.as_bytes());
    hex::encode(&hasher.finalize()[..16])
}

/// The license in force, as `/license/status` and the report describe it.
pub fn license_json(in_force: &InForce) -> Value {
    let mut license = serde_json::Map::new();
    for (name, value) in in_force.verified.document.payload() {
        license.insert(name.clone(), value.clone());
    }
    let record = in_force.record.as_ref();
    license.insert("id".into(), json!(record.map(|r| r.id)));
    license.insert("updated_at".into(), json!(record.map(|r| r.updated_at)));
    license.insert("key_id".into(), json!(in_force.verified.key_id.to_string()));
    license.insert("days_left".into(), json!(in_force.evaluation.days_left));
    license.insert("source".into(), json!(in_force.source.as_str()));
    Value::Object(license)
}

fn status_json(view: &View) -> Value {
    match &view.in_force {
        Some(in_force) => json!({
            "status": in_force.evaluation.status.as_str(),
            "source": in_force.source.as_str(),
            "license": license_json(in_force),
            "warnings": view.warnings,
        }),
        None => json!({
            "status": "unlicensed",
            "source": null,
            "license": null,
            "warnings": view.warnings,
        }),
    }
}

/// `GET /license/status`.
pub async fn license_status(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(status_json(&state.service().view())))
}

/// `GET /license/report[?by=dataplane]`: Kong's usage report, plus Charter's deployment
/// fields; `by=dataplane` adds the counters of each data plane.
pub async fn report(
    State(state): State<ApiState>,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
            .map_err(|e| ApiError::BadRequest(format!("Cannot parse query string: {e}")))?;
    let by_dataplane = match pairs
        .iter()
        .find(|(k, _)| k == "by")
        .map(|(_, v)| v.as_str())
    {
        None => false,
        Some("dataplane") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "by={other} is not supported; use by=dataplane"
            )))
        }
    };
    let service = state.service();
    let view = service.view();
    let usage = service.usage().await?;
    let mut months: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for node in &usage {
        for (bucket, count) in &node.buckets {
            let total = months.entry(bucket.clone()).or_default();
            *total = total.saturating_add(*count);
        }
    }
    // The current UTC month is always listed, 0 until something is counted, as Kong's
    // report shows it.
    months.entry(month_bucket(service.now())).or_default();
    let counters: Vec<Value> = months
        .iter()
        .map(|(bucket, count)| json!({"bucket": bucket, "request_count": count}))
        .collect();
    let planes = service.data_planes().await?;
    let services: std::collections::BTreeSet<&str> = planes
        .iter()
        .map(|p| p.upstream.as_str())
        .filter(|u| !u.is_empty())
        .collect();
    let terms = view.in_force.as_ref().map(|f| &f.verified.terms);
    let license_key = match terms {
        Some(t) => hashed("license_key", &t.license_key),
        None => "UNLICENSED".to_owned(),
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut report = json!({
        "counters": counters,
        "db_version": service.store().backend_version(),
        "kong_version": env!("CARGO_PKG_VERSION"),
        "license_key": license_key,
        "rbac_users": state.tokens().map_or(0, |t| t.len()),
        "services_count": services.len(),
        "system_info": {
            "cores": cores,
            "hostname": hashed("hostname", state.hostname()),
            "uname": uname(),
        },
        "workspaces_count": 1,
        "deployment_info": {"type": "hybrid", "connected_dp_count": service.inventory().connected_count()},
        "licensed_dataplanes": terms.and_then(|t| t.dataplanes),
    });
    if by_dataplane {
        report["dataplanes"] = usage
            .iter()
            .map(|node| {
                let counters: Vec<Value> = node
                    .buckets
                    .iter()
                    .map(|(bucket, count)| json!({"bucket": bucket, "request_count": count}))
                    .collect();
                json!({"id": node.node_id, "counters": counters})
            })
            .collect();
    }
    Ok(Json(report))
}

/// The report bucket (`YYYY-MM`, UTC) of a time, as the data planes count requests in.
fn month_bucket(now: charter_license::UnixTime) -> String {
    let date = charter_license::utc_date(now);
    format!("{:04}-{:02}", date.year(), u8::from(date.month()))
}

/// `Linux x86_64`, as Kong's report shows it.
fn uname() -> String {
    let os = std::env::consts::OS;
    let mut name = os[..1].to_ascii_uppercase();
    name.push_str(&os[1..]);
    format!("{name} {}", std::env::consts::ARCH)
}

/// `GET /status`: health. 503 when the store takes no writes.
pub async fn health(State(state): State<ApiState>) -> Response {
    let service = state.service();
    match service.health().await {
        Ok(()) => {
            let snapshot = service.snapshot();
            let status = service
                .view_of(&snapshot)
                .in_force
                .map_or("unlicensed", |f| f.evaluation.status.as_str());
            Json(json!({
                "database": {
                    "reachable": true,
                    "backend": service.store().backend_version(),
                    "epoch": snapshot.epoch,
                    "revision": snapshot.revision,
                },
                "license": {"status": status},
                "server": {"version": env!("CARGO_PKG_VERSION")},
            }))
            .into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "health check: the license store takes no writes");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"database": {"reachable": false}, "message": "License store unavailable"})),
            )
                .into_response()
        }
    }
}

/// `GET /metrics`: Prometheus text.
pub async fn metrics(State(state): State<ApiState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics().render(state.service()),
    )
        .into_response()
}

/// `GET /openapi.json`.
pub async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// `GET /clustering/data-planes`: the inventory, most recently seen first.
pub async fn data_planes(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let mut planes = state.service().data_planes().await?;
    planes.sort_by(|a, b| b.last_seen.cmp(&a.last_seen).then_with(|| a.id.cmp(&b.id)));
    let data: Vec<Value> = planes
        .iter()
        .map(|dp| {
            json!({
                "id": dp.id,
                "ip": dp.ip,
                "hostname": dp.hostname,
                "version": dp.version,
                "labels": dp.labels,
                "last_seen": dp.last_seen,
                "sync_status": dp.sync_status,
                "license_id": dp.license_id,
                "license_revision": dp.license_revision,
                "license_status": dp.license_status,
                "last_error": dp.last_error,
                "control_plane": dp.control_plane,
            })
        })
        .collect();
    Ok(Json(json!({"data": data, "next": null})))
}
