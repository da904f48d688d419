//! The Consul-compatible face: `GET/PUT/DELETE /v1/operator/license`, for tools written
//! against Consul Enterprise. It shares the store and validation with `/licenses`.

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use charter_store::StoreError;
use serde_json::{json, Value};
use time::Date;
use uuid::Uuid;

use super::{read_body, ApiError};
use crate::effective::{normalized, View};
use crate::state::AppState;

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

/// `GET /v1/operator/license[?signed=1]`.
pub async fn show(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let view = state.view()?;
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
            .map_err(|e| ApiError::BadRequest(format!("Cannot parse query string: {e}")))?;
    let signed = pairs
        .iter()
        .any(|(k, v)| k == "signed" && !matches!(v.as_str(), "" | "0" | "false"));
    if signed {
        let Some(in_force) = &view.in_force else {
            return Err(ApiError::NotFound);
        };
        let document = normalized(&in_force.verified.document);
        return Ok(([(header::CONTENT_TYPE, "application/json")], document).into_response());
    }
    Ok(Json(consul_json(&view)).into_response())
}

/// `PUT /v1/operator/license`: the body is the raw license document. Installing a license
/// already stored moves its `updated_at`, so it is in force afterwards either way.
pub async fn install(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let bytes = read_body(&headers, body).await?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| ApiError::BadRequest("the license must be UTF-8 text".to_owned()))?;
    let (verified, evaluation) = charter_license::validate(text, state.keys(), state.now())
        .map_err(ApiError::InvalidLicense)?;
    let text = normalized(&verified.document);
    state.remember_verified(&text, &verified);
    let now = state.now();
    let record = state
        .write(
            move |store| match store.insert(Uuid::new_v4(), &text, now) {
                Err(StoreError::DuplicatePayload { existing }) => store.patch(existing, &text, now),
                other => other,
            },
        )
        .await?;
    tracing::info!(id = %record.id, key_id = %verified.key_id, status = %evaluation.status,
        "license installed through /v1/operator/license");
    Ok(Json(consul_json(&state.view()?)))
}

/// `DELETE /v1/operator/license`: deletes the stored license in force, so the next one
/// (or this node's static license) takes over. Refused, changing nothing, when that would
/// leave no valid license.
pub async fn reset(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let _guard = state.consul_lock().lock().await;
    let records = state.store().all()?;
    let view = state.view_of(records.clone())?;
    let Some(target) = view.stored_in_force.and_then(|f| f.record) else {
        return Err(ApiError::BadRequest(
            "no stored license to delete: install one first".to_owned(),
        ));
    };
    let remaining: Vec<_> = records.into_iter().filter(|r| r.id != target.id).collect();
    let after = state.view_of(remaining)?;
    if !after
        .in_force
        .as_ref()
        .is_some_and(|f| f.evaluation.status.allows())
    {
        return Err(ApiError::BadRequest(format!(
            "deleting license {} would leave no valid license; install another license first",
            target.id
        )));
    }
    let id = target.id;
    state.write(move |store| store.delete(id)).await?;
    tracing::info!(%id, "license deleted through /v1/operator/license");
    Ok(Json(consul_json(&state.view()?)))
}
