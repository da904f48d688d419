//! The Consul-compatible face: `GET/PUT/DELETE /v1/operator/license`, for tools written
//! against Consul Enterprise. It shares the store and validation with `/licenses`.

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use time::Date;

use super::{read_body, ApiError, ApiState};
use crate::service::{canonical_text, View};

fn rfc3339(date: Date, end_of_day: bool) -> String {
    if end_of_day {
        format!("{date}T23:59:59.999Z")
    } else {
        format!("{date}T00:00:00Z")
    }
}

/// Consul's `{"Valid", "License", "Warnings"}` for a view.
fn consul_json(view: &View) -> Value {
    let Some(in_force) = &view.in_force else {
        let mut warnings = view.warnings.clone();
        warnings.push("no license is installed".to_owned());
        return json!({"Valid": false, "License": null, "Warnings": warnings});
    };
    let terms = &in_force.verified.terms;
    let mut flags = serde_json::Map::new();
    for name in ["admin_seats", "dataplanes", "support_plan"] {
        if let Some(value) = in_force.verified.document.field(name) {
            flags.insert(name.to_owned(), Value::String(value.to_owned()));
        }
    }
    let license_id = match &in_force.record {
        Some(record) => record.id.to_string(),
        None => "static".to_owned(),
    };
    json!({
        "Valid": in_force.evaluation.status.allows(),
        "License": {
            "license_id": license_id,
            "customer_id": terms.customer,
            "installation_id": "*",
            "issue_time": rfc3339(terms.creation_date, false),
            "start_time": rfc3339(terms.creation_date, false),
            "expiration_time": rfc3339(terms.expiration_date, true),
            "product": terms.product_subscription,
            "flags": flags,
            "features": terms.features,
            "temporary": false,
        },
        "Warnings": view.warnings,
    })
}

/// Whether a `GET /v1/operator/license` query asks for the signed document (`signed` with
/// any value but empty, `0` or `false`).
pub fn wants_signed(query: Option<&str>) -> Result<bool, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or(""))
        .map_err(|e| ApiError::BadRequest(format!("Cannot parse query string: {e}")))?;
    Ok(pairs
        .iter()
        .any(|(k, v)| k == "signed" && !matches!(v.as_str(), "" | "0" | "false")))
}

/// `GET /v1/operator/license[?signed=1]`.
pub async fn show(
    State(state): State<ApiState>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let view = state.service().view();
    if wants_signed(query.as_deref())? {
        let Some(in_force) = &view.in_force else {
            return Err(ApiError::NotFound);
        };
        // A stored license as it was sent; a static one has no record to keep its text.
        let document = match &in_force.record {
            Some(record) => record.payload.clone(),
            None => canonical_text(&in_force.verified.document),
        };
        return Ok(([(header::CONTENT_TYPE, "application/json")], document).into_response());
    }
    Ok(Json(consul_json(&view)).into_response())
}

/// `PUT /v1/operator/license`: the body is the raw license document. Installing a license
/// already stored moves its `updated_at`, so it is in force afterwards either way.
pub async fn install(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let bytes = read_body(&headers, body).await?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| ApiError::BadRequest("the license must be UTF-8 text".to_owned()))?;
    let service = state.service();
    let written = service.install(service.validate(text)?).await?;
    tracing::info!(id = %written.record.id, key_id = %written.verified.key_id,
        status = %written.evaluation.status, "license installed through /v1/operator/license");
    Ok(Json(consul_json(&service.view())))
}

/// `DELETE /v1/operator/license`: deletes the stored license in force, so the next one
/// takes over. Refused, changing nothing, when that would leave no valid license or when
/// the license in force here is static; the check and the delete are one write.
pub async fn reset(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let service = state.service();
    let (deleted, revision) = service.uninstall().await?;
    tracing::info!(id = %deleted.id, revision, "license deleted through /v1/operator/license");
    Ok(Json(consul_json(&service.view())))
}
