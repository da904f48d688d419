//! The local status API (`--status-listen`): `/status`, `/status/ready`, `/license`,
//! `/license/features/{name}` and `/metrics`. Every answer judges the license in force at
//! the moment of the request.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use charter_license::Status;
use serde_json::{json, Value};

use crate::metrics::Metrics;
use crate::state::{Enforcement, InForce};
use crate::sync::ControlPlaneStatus;

/// What the status API reads.
#[derive(Clone)]
pub struct ApiState {
    /// The enforcement state.
    pub enforcement: Arc<Enforcement>,
    /// The sync client's connection state.
    pub control_plane: Arc<ControlPlaneStatus>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// This node's id.
    pub node_id: String,
}

/// The status API router.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/status/ready", get(ready))
        .route("/license", get(license))
        .route("/license/features/{name}", get(feature))
        .route("/metrics", get(metrics))
        .fallback(|| async { message(StatusCode::NOT_FOUND, "Not found") })
        .method_not_allowed_fallback(|| async {
            message(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed")
        })
        .with_state(state)
}

fn message(status: StatusCode, text: &str) -> Response {
    (status, Json(json!({ "message": text }))).into_response()
}

async fn status(State(state): State<ApiState>) -> Json<Value> {
    let in_force = state.enforcement.current();
    Json(json!({
        "license": in_force.to_json(),
        "control_plane": state.control_plane.to_json(),
        "node_id": state.node_id,
    }))
}

async fn ready(State(state): State<ApiState>) -> Response {
    let in_force = state.enforcement.current();
    if in_force.allows() {
        return Json(json!({ "ready": true })).into_response();
    }
    let reason = denial_reason(&in_force, &state);
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "ready": false, "reason": reason })),
    )
        .into_response()
}

async fn license(State(state): State<ApiState>) -> Json<Value> {
    Json(state.enforcement.current().to_json())
}

async fn feature(State(state): State<ApiState>, Path(name): Path<String>) -> Response {
    let in_force = state.enforcement.current();
    let granted = in_force
        .license
        .as_ref()
        .is_some_and(|l| l.verified.terms.has_feature(&name));
    if in_force.allows() && granted {
        return Json(json!({ "feature": name, "allowed": true })).into_response();
    }
    let why = if in_force.allows() {
        format!(
            "feature `{name}` is not in the license in force ({})",
            in_force.name()
        )
    } else {
        denial_reason(&in_force, &state)
    };
    (
        StatusCode::FORBIDDEN,
        Json(json!({ "feature": name, "allowed": false, "message": why })),
    )
        .into_response()
}

async fn metrics(State(state): State<ApiState>) -> Response {
    let body = state.metrics.render(
        &state.enforcement.current(),
        state.control_plane.is_connected(),
    );
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// Why licensed use is denied, in words for an operator.
fn denial_reason(in_force: &InForce, state: &ApiState) -> String {
    match in_force.status {
        Status::Unlicensed if in_force.license.is_some() => format!(
            "the license in force cannot be judged: {}",
            in_force.warnings.join("; ")
        ),
        Status::Unlicensed => match state.enforcement.cluster() {
            Some(_) => "unlicensed: the cluster has no valid license; add one on the control plane"
                .to_owned(),
            None => format!(
                "unlicensed: no license received yet from the control plane at {}",
                state.control_plane.address()
            ),
        },
        Status::Expired => format!("expired: {}", in_force.warnings.join("; ")),
        Status::Valid | Status::Expiring | Status::Grace => String::new(),
    }
}
