//! `/licenses` and `/licenses/{id}`: Kong's Licenses entity.

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use charter_store::LicenseRecord;
use serde::ser::{SerializeStruct, Serializer};
use serde::Serialize;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::{canonical_uuid, parse_id, read_fields, ApiError, ApiState};
use crate::service::Written;

/// Default and largest page sizes, as Kong's.
const DEFAULT_SIZE: usize = 100;
const MAX_SIZE: usize = 1000;

/// A record as the API shows it.
pub fn record_json(record: &LicenseRecord) -> Value {
    json!({
        "id": record.id,
        "payload": record.payload,
        "checksum": record.checksum,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
    })
}

/// A record as the API shows it, serialised straight from the stored record: the same
/// bytes as [`record_json`], without first copying every field into a `serde_json::Value`
/// (which costs every read a copy of each payload and a map per record).
pub struct ApiRecord<'a>(pub &'a LicenseRecord);

impl Serialize for ApiRecord<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // The order `record_json` gives: a `Value` object is a map sorted by key.
        let record = self.0;
        let mut fields = serializer.serialize_struct("LicenseRecord", 5)?;
        fields.serialize_field("checksum", &record.checksum)?;
        fields.serialize_field("created_at", &record.created_at)?;
        fields.serialize_field("id", &record.id)?;
        fields.serialize_field("payload", &record.payload)?;
        fields.serialize_field("updated_at", &record.updated_at)?;
        fields.end()
    }
}

/// The body of `GET /licenses/{id}` for `record`.
pub fn record_body(record: &LicenseRecord) -> Bytes {
    // Serialising strings and integers into a Vec cannot fail; an empty body would be
    // caught by every test that reads a record.
    Bytes::from(serde_json::to_vec(&ApiRecord(record)).unwrap_or_default())
}

/// A page of `GET /licenses`, its fields in sorted order as a `Value` object has them.
/// [`page_body`] writes the same bytes from records already encoded. `offset` is there only
/// when there is a next page, so the last page (and an empty store) is exactly Kong's
/// `{"data":[...],"next":null}`.
#[cfg(test)]
#[derive(Serialize)]
pub struct ApiPage<'a> {
    data: Vec<ApiRecord<'a>>,
    next: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<String>,
}

/// The body of a `GET /licenses` page, from the records' bodies ([`record_body`]): the
/// bytes serde_json writes for [`ApiPage`], copied instead of encoded again.
fn page_body(records: &[Bytes], next: Option<&str>, offset: Option<&str>) -> Bytes {
    let records_len: usize = records.iter().map(|r| r.len() + 1).sum();
    let mut body = Vec::with_capacity(records_len + 64);
    body.extend_from_slice(br#"{"data":["#);
    for (n, record) in records.iter().enumerate() {
        if n > 0 {
            body.push(b',');
        }
        body.extend_from_slice(record);
    }
    body.extend_from_slice(br#"],"next":"#);
    // Writing a string or null into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut body, &next);
    if let Some(offset) = offset {
        body.extend_from_slice(br#","offset":"#);
        let _ = serde_json::to_writer(&mut body, offset);
    }
    body.push(b'}');
    Bytes::from(body)
}

/// A 200 answer with a JSON body, as `Json` makes it.
fn json_response(body: Bytes) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// The fields of a license write.
struct Input {
    payload: Option<String>,
    id: Option<Uuid>,
}

impl Input {
    /// Checks a body's fields against the Licenses schema: `payload` (a string), an
    /// optional `id` matching the path, and the read-only fields of a record (ignored, so a
    /// record fetched with GET can be sent back as is).
    /// Every problem is reported at once, as Kong does.
    fn from_fields(
        fields: Map<String, Value>,
        path_id: Option<Uuid>,
        payload_required: bool,
    ) -> Result<Input, ApiError> {
        let mut errors = Vec::new();
        let mut input = Input {
            payload: None,
            id: None,
        };
        for (name, value) in fields {
            match (name.as_str(), value) {
                ("payload", Value::String(s)) if s.trim().is_empty() => {
                    errors.push((name, "length must be at least 1".to_owned()))
                }
                ("payload", Value::String(s)) => input.payload = Some(s),
                ("payload", Value::Null) => {
                    errors.push((name, "required field missing".to_owned()))
                }
                ("payload", _) => errors.push((name, "expected a string".to_owned())),
                ("id", Value::String(s)) => match canonical_uuid(&s) {
                    Some(id) if path_id.is_some_and(|p| p != id) => {
                        errors.push((name, "must match the id in the URL".to_owned()))
                    }
                    Some(id) => input.id = Some(id),
                    None => errors.push((name, "expected a valid UUID".to_owned())),
                },
                ("id", _) => errors.push((name, "expected a valid UUID".to_owned())),
                ("created_at" | "updated_at" | "checksum", _) => {}
                _ => errors.push((name, "unknown field".to_owned())),
            }
        }
        if payload_required
            && input.payload.is_none()
            && !errors.iter().any(|(f, _)| f == "payload")
        {
            errors.push(("payload".to_owned(), "required field missing".to_owned()));
        }
        if errors.is_empty() {
            Ok(input)
        } else {
            Err(ApiError::Schema(errors))
        }
    }

    fn require_payload(&self) -> Result<&str, ApiError> {
        self.payload
            .as_deref()
            .ok_or_else(|| ApiError::field("payload", "required field missing"))
    }
}

fn log_stored(written: &Written, action: &str) {
    let (record, verified, evaluation) = (&written.record, &written.verified, &written.evaluation);
    if evaluation.status.allows() && evaluation.grace_days_left.is_none() {
        tracing::info!(id = %record.id, key_id = %verified.key_id, status = %evaluation.status,
            expires = %evaluation.expiration_date, revision = record.revision, "license {action}");
    } else {
        // Kong accepts an expired but validly signed license; say so loudly.
        tracing::warn!(id = %record.id, key_id = %verified.key_id, status = %evaluation.status,
            expires = %evaluation.expiration_date, revision = record.revision,
            "license {action}, but it has expired; data planes deny traffic once grace ends");
    }
}

/// `GET /licenses?size=N&offset=X`.
pub async fn list(
    State(state): State<ApiState>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
            .map_err(|e| ApiError::BadRequest(format!("Cannot parse query string: {e}")))?;
    let mut size = DEFAULT_SIZE;
    let mut after = None;
    for (name, value) in pairs {
        match name.as_str() {
            "size" => {
                size = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_SIZE).contains(n))
                    .ok_or(ApiError::InvalidSize)?;
            }
            "offset" => after = Some(decode_offset(&value)?),
            _ => {}
        }
    }
    let snapshot = state.service().snapshot();
    let (entries, next) = snapshot.page(after, size);
    let records: Vec<Bytes> = entries.iter().map(|e| e.encoded(record_body)).collect();
    let offset = next.map(encode_offset);
    let next = offset
        .as_ref()
        .map(|o| format!("/licenses?offset={o}&size={size}"));
    Ok(json_response(page_body(
        &records,
        next.as_deref(),
        offset.as_deref(),
    )))
}

/// The `{id}` path segment. A segment that is not UTF-8 once percent-decoded is no UUID
/// either, so it gets the answer any other bad id gets rather than axum's plain-text 400:
/// every admin API response is JSON.
fn path_segment(path: Result<Path<String>, PathRejection>) -> Option<String> {
    path.ok().map(|Path(id)| id)
}

fn encode_offset(id: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(id.as_bytes())
}

fn decode_offset(offset: &str) -> Result<Uuid, ApiError> {
    URL_SAFE_NO_PAD
        .decode(offset)
        .ok()
        .and_then(|bytes| Uuid::from_slice(&bytes).ok())
        .ok_or_else(|| ApiError::InvalidOffset(offset.to_owned()))
}

/// `POST /licenses`.
pub async fn create(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let input = Input::from_fields(read_fields(&headers, body).await?, None, true)?;
    let service = state.service();
    let valid = service.validate(input.require_payload()?)?;
    let written = service.create(input.id, valid).await?;
    log_stored(&written, "added");
    Ok((StatusCode::CREATED, Json(record_json(&written.record))))
}

/// `GET /licenses/{id}`: an id that is not a canonical UUID is a schema violation, as on
/// every other method.
pub async fn show(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = parse_id(&path_segment(path).unwrap_or_default())?;
    let snapshot = state.service().snapshot();
    let entry = snapshot.get(id).ok_or(ApiError::NotFound)?;
    Ok(json_response(entry.encoded(record_body)))
}

/// `PUT /licenses/{id}`: create with that id, or replace (keeping `created_at`).
pub async fn replace(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&path_segment(path).unwrap_or_default())?;
    let input = Input::from_fields(read_fields(&headers, body).await?, Some(id), true)?;
    let service = state.service();
    let valid = service.validate(input.require_payload()?)?;
    let written = service.put(id, valid).await?;
    log_stored(
        &written,
        if written.replaced {
            "replaced"
        } else {
            "added"
        },
    );
    Ok(Json(record_json(&written.record)))
}

/// `PATCH /licenses/{id}`: a new payload, or none to move `updated_at` (which puts the
/// license back in force).
pub async fn update(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&path_segment(path).unwrap_or_default())?;
    let input = Input::from_fields(read_fields(&headers, body).await?, Some(id), false)?;
    let service = state.service();
    let valid = input
        .payload
        .as_deref()
        .map(|text| service.validate(text))
        .transpose()?;
    let written = service.patch(id, valid).await?;
    log_stored(&written, "updated");
    Ok(Json(record_json(&written.record)))
}

/// `DELETE /licenses/{id}`: 204 whether or not it existed, as Kong.
pub async fn remove(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&path_segment(path).unwrap_or_default())?;
    if let Some(record) = state.service().delete(id).await? {
        tracing::info!(id = %record.id, revision = record.revision, "license deleted");
    }
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests;
