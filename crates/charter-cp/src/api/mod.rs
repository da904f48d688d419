//! The admin HTTP API: routes, Kong-shaped errors (one `ApiError: IntoResponse` for the
//! whole boundary) and the body reader that takes JSON and form-urlencoded alike. It is
//! built on [`Service`]; everything about HTTP and JSON lives here.

pub mod auth;
mod console;
mod consul;
mod licenses;
mod metrics;
mod node;
mod unavailable;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{middleware, Json, Router};
use charter_license::LicenseError;
use charter_store::StoreError;
use http_body_util::BodyExt;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::service::{Service, WriteError};
use auth::Tokens;
use metrics::Metrics;
pub use unavailable::Unavailable;

/// What every handler shares; cheap to clone.
#[derive(Clone)]
pub struct ApiState(Arc<ApiInner>);

struct ApiInner {
    service: Service,
    /// The admin tokens as last loaded (the token file is reloaded when it changes).
    tokens: Option<tokio::sync::watch::Receiver<Arc<Tokens>>>,
    metrics: Metrics,
    hostname: String,
}

impl ApiState {
    /// The admin API's state over the service (tests: no cluster certificate).
    #[cfg(test)]
    pub fn new(service: Service, tokens: Option<Tokens>) -> ApiState {
        let tokens = tokens.map(|t| tokio::sync::watch::channel(Arc::new(t)).1);
        ApiState::with_cert_expiry(service, tokens, None)
    }

    /// [`ApiState::new`] exporting the cluster certificate's expiry in `/metrics`.
    pub fn with_cert_expiry(
        service: Service,
        tokens: Option<tokio::sync::watch::Receiver<Arc<Tokens>>>,
        cert_expiry: Option<charter_runtime::cert_expiry::CertExpiry>,
    ) -> ApiState {
        ApiState(Arc::new(ApiInner {
            service,
            tokens,
            metrics: Metrics::with_cert_expiry(cert_expiry),
            hostname: gethostname::gethostname().to_string_lossy().into_owned(),
        }))
    }

    /// The service.
    pub fn service(&self) -> &Service {
        &self.0.service
    }

    /// Admin tokens, when configured: those loaded last.
    pub fn tokens(&self) -> Option<Arc<Tokens>> {
        self.0.tokens.as_ref().map(|t| t.borrow().clone())
    }

    fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// This machine's host name (only ever shown hashed).
    fn hostname(&self) -> &str {
        &self.0.hostname
    }
}

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 1024 * 1024;

/// Longest request target (path and query) answered normally; a longer one is a JSON 414.
/// It sits well below hyper's own limit (65,534 bytes), whose 414 has no body, and matches
/// the 8 KiB a Kong node (nginx) allows.
pub const URI_LIMIT: usize = 8 * 1024;

/// Largest header section (each line as `name: value` and its line end) answered normally;
/// a larger one is a JSON 431, long before hyper's read buffer (about 400 KiB) fills and it
/// answers 431 with no body.
pub const HEADERS_LIMIT: usize = 32 * 1024;

/// Most header lines answered normally; more is a JSON 431. hyper itself answers a bodiless
/// 431 past 100.
pub const HEADER_COUNT_LIMIT: usize = 64;

/// Every route of the admin API, in the order [`router`] adds them. The metrics label
/// requests with these `&'static str`s.
pub const ROUTES: [&str; 12] = [
    "/licenses",
    "/licenses/{id}",
    "/license/status",
    "/license/report",
    "/v1/operator/license",
    "/clustering/data-planes",
    "/status",
    "/metrics",
    "/openapi.json",
    "/auth/self",
    "/ui",
    "/ui/{asset}",
];

/// The admin API router, with auth (when tokens are configured) and metrics. A path with
/// one trailing slash is the same route as without it (Kong's docs write `/licenses/`).
pub fn router(state: ApiState) -> Router {
    // The slash goes before routing: an outer router whose only route is the fallback hands
    // every request, its path trimmed, to the routes; metrics, auth and every handler see
    // the one path.
    Router::new()
        .fallback_service(routes(state))
        .layer(middleware::map_request(trim_trailing_slash))
}

/// Drops one trailing slash from a request's path (`/licenses/` → `/licenses`, the query
/// kept); `/` stays.
async fn trim_trailing_slash(mut request: Request) -> Request {
    let uri = request.uri();
    let path = uri.path();
    if path.len() > 1 && path.ends_with('/') {
        let trimmed = &path[..path.len() - 1];
        let path_and_query = match uri.query() {
            Some(query) => format!("{trimmed}?{query}"),
            None => trimmed.to_owned(),
        };
        let mut parts = uri.clone().into_parts();
        // A valid path minus its last byte, a `/`, is still a valid path; were it not, the
        // request keeps its path and answers 404.
        if let Ok(pq) = path_and_query.parse() {
            parts.path_and_query = Some(pq);
            if let Ok(uri) = Uri::from_parts(parts) {
                *request.uri_mut() = uri;
            }
        }
    }
    request
}

/// Every route, with auth (when tokens are configured) and metrics.
fn routes(state: ApiState) -> Router {
    let [r_licenses, r_license, r_status, r_report, r_consul, r_data_planes, r_health, r_metrics, r_openapi, r_self, r_ui, r_asset] =
        ROUTES;
    let mut router = Router::new()
        .route(r_licenses, get(licenses::list).post(licenses::create))
        .route(
            r_license,
            get(licenses::show)
                .put(licenses::replace)
                .patch(licenses::update)
                .delete(licenses::remove),
        )
        .route(r_status, get(node::license_status))
        .route(r_report, get(node::report))
        .route(
            r_consul,
            get(consul::show).put(consul::install).delete(consul::reset),
        )
        .route(r_data_planes, get(node::data_planes))
        .route(r_health, get(node::health))
        .route(r_metrics, get(node::metrics))
        .route(r_openapi, get(node::openapi))
        .route(r_self, get(console::whoami))
        .route(r_ui, get(console::page))
        .route(r_asset, get(console::asset))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed });
    // Without a token file every request passes, so the check is left out altogether
    // rather than run to do nothing (whether there is a token file is fixed for the life of
    // the process; only its tokens are reloaded).
    if state.tokens().is_some() {
        router = router.layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    }
    router
        .layer(middleware::from_fn(check_head))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .with_state(state)
}

/// Every error the admin API answers, in Kong's shapes.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 404 `{"message":"Not found"}`.
    #[error("not found")]
    NotFound,
    /// 405 `{"message":"Method not allowed"}`.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 400 `{"message":"Cannot parse JSON body"}`.
    #[error("cannot parse JSON body: {0}")]
    BadJson(String),
    /// 400 Kong schema violation with per-field messages.
    #[error("schema violation")]
    Schema(Vec<(String, String)>),
    /// 400 `{"message":"Unable to validate license: <code>"}`.
    #[error("invalid license: {0}")]
    InvalidLicense(LicenseError),
    /// 409 the payload (or id) is already stored.
    #[error("unique violation on {field}")]
    Conflict {
        /// `payload` or `id`.
        field: &'static str,
        /// The id already holding it.
        existing: Uuid,
    },
    /// 400 Kong's `invalid size`.
    #[error("invalid size")]
    InvalidSize,
    /// 400 Kong's `invalid offset`.
    #[error("invalid offset")]
    InvalidOffset(String),
    /// 413 body over the limit.
    #[error("body too large")]
    TooLarge,
    /// 414 a request target over [`URI_LIMIT`].
    #[error("request target too long")]
    UriTooLong,
    /// 431 a header section over [`HEADERS_LIMIT`] or [`HEADER_COUNT_LIMIT`].
    #[error("request headers too large")]
    HeadersTooLarge,
    /// 415 a body that is neither JSON nor a form.
    #[error("unsupported content type {0}")]
    UnsupportedMediaType(String),
    /// 401 no or unknown token.
    #[error("unauthorized")]
    Unauthorized,
    /// 403 a read token on a write.
    #[error("forbidden")]
    Forbidden,
    /// 400 with a plain message (Consul face).
    #[error("{0}")]
    BadRequest(String),
    /// 408 the client stopped sending the request body.
    #[error("{0}")]
    BodyTimeout(String),
    /// 503 the store cannot be read or written; the message is the client's, the error
    /// the log's.
    #[error("store unavailable: {error}")]
    Unavailable {
        /// What the client is told.
        message: &'static str,
        /// What went wrong, for the log.
        error: String,
    },
}

impl ApiError {
    /// A schema violation on one field.
    pub fn field(name: &str, message: impl Into<String>) -> ApiError {
        ApiError::Schema(vec![(name.to_owned(), message.into())])
    }

    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BadJson(_)
            | ApiError::Schema(_)
            | ApiError::InvalidLicense(_)
            | ApiError::InvalidSize
            | ApiError::InvalidOffset(_)
            | ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UriTooLong => StatusCode::URI_TOO_LONG,
            ApiError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn body(&self) -> Value {
        match self {
            ApiError::NotFound => json!({"message": "Not found"}),
            ApiError::MethodNotAllowed => json!({"message": "Method not allowed"}),
            ApiError::BadJson(detail) => {
                json!({"message": "Cannot parse JSON body", "detail": detail})
            }
            ApiError::Schema(fields) => {
                let summary: Vec<String> =
                    fields.iter().map(|(f, m)| format!("{f}: {m}")).collect();
                let fields: Map<String, Value> = fields
                    .iter()
                    .map(|(f, m)| (f.clone(), Value::String(m.clone())))
                    .collect();
                json!({
                    "code": 2,
                    "name": "schema violation",
                    "message": format!("schema violation ({})", summary.join("; ")),
                    "fields": fields,
                })
            }
            ApiError::InvalidLicense(e) => json!({
                "message": format!("Unable to validate license: {}", e.code),
                "detail": e.message,
            }),
            ApiError::Conflict { field, existing } => json!({
                "code": 5,
                "name": "unique constraint violation",
                "message": format!("UNIQUE violation detected on '{{{field}}}': already stored as license {existing}"),
                "fields": {*field: format!("already stored as license {existing}")},
            }),
            ApiError::InvalidSize => json!({
                "code": 9,
                "name": "invalid size",
                "message": "size must be an integer between 1 and 1000",
            }),
            ApiError::InvalidOffset(offset) => json!({
                "code": 7,
                "name": "invalid offset",
                "message": format!("'{offset}' is not a valid offset: use the `offset` of a previous page"),
            }),
            ApiError::TooLarge => json!({
                "message": format!("Request body too large: the limit is {} bytes", BODY_LIMIT),
            }),
            ApiError::UriTooLong => json!({
                "message": format!("URI too long: the limit is {URI_LIMIT} bytes"),
            }),
            ApiError::HeadersTooLarge => json!({
                "message": format!("Request headers too large: the limit is {HEADER_COUNT_LIMIT} headers and {HEADERS_LIMIT} bytes"),
            }),
            ApiError::UnsupportedMediaType(kind) => json!({
                "message": format!("Unsupported Content-Type '{kind}': send application/json or application/x-www-form-urlencoded"),
            }),
            ApiError::Unauthorized => json!({
                "message": "Invalid credentials. Token or User credentials required",
            }),
            ApiError::Forbidden => json!({
                "message": "Forbidden: this token is read-only; the request needs a write token",
            }),
            ApiError::BadRequest(message) | ApiError::BodyTimeout(message) => {
                json!({"message": message})
            }
            ApiError::Unavailable { message, .. } => json!({"message": message}),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Unavailable { error, .. } = &self {
            tracing::error!(error = %error, "admin API request failed");
        }
        (self.status(), Json(self.body())).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        let message = match &e {
            StoreError::Unavailable { .. } => "database unavailable",
            StoreError::Failed(_) => {
                "License store refuses writes since a write failed to reach the disk; restart the control plane"
            }
            _ => "License store unavailable",
        };
        ApiError::Unavailable {
            message,
            error: e.to_string(),
        }
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> ApiError {
        match e {
            WriteError::Invalid(e) => ApiError::InvalidLicense(e),
            WriteError::NotFound(_) => ApiError::NotFound,
            WriteError::DuplicatePayload { existing } => ApiError::Conflict {
                field: "payload",
                existing,
            },
            WriteError::IdExists(id) => ApiError::Conflict {
                field: "id",
                existing: id,
            },
            WriteError::Refused(message) => ApiError::BadRequest(message),
            WriteError::Store(e) => e.into(),
        }
    }
}

/// Reads a request body as a JSON object, from `application/json` or
/// `application/x-www-form-urlencoded` (Kong accepts both), within [`BODY_LIMIT`].
/// An empty body is an empty object. A field given twice is a schema violation naming it:
/// serde_json and serde_urlencoded would both keep one of the two silently, and which one a
/// client meant is anyone's guess.
pub async fn read_fields(headers: &HeaderMap, body: Body) -> Result<Map<String, Value>, ApiError> {
    let bytes = read_body(headers, body).await?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let media = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_owned();
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    let fields = match media.as_str() {
        "application/x-www-form-urlencoded" => {
            let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(&bytes)
                .map_err(|e| ApiError::BadRequest(format!("Cannot parse form body: {e}")))?;
            let mut fields = Fields::default();
            for (name, value) in pairs {
                fields.insert(name, Value::String(value));
            }
            fields
        }
        "" | "application/json" => parse_json_object(&bytes)?,
        other if other.ends_with("+json") => parse_json_object(&bytes)?,
        other => return Err(ApiError::UnsupportedMediaType(other.to_owned())),
    };
    fields.into_map()
}

/// A body's top-level fields, and the names given more than once.
#[derive(Default)]
struct Fields {
    map: Map<String, Value>,
    repeated: Vec<String>,
}

impl Fields {
    fn insert(&mut self, name: String, value: Value) {
        if self.map.contains_key(&name) {
            if !self.repeated.contains(&name) {
                self.repeated.push(name);
            }
        } else {
            self.map.insert(name, value);
        }
    }

    fn into_map(self) -> Result<Map<String, Value>, ApiError> {
        if self.repeated.is_empty() {
            Ok(self.map)
        } else {
            Err(ApiError::Schema(
                self.repeated
                    .into_iter()
                    .map(|name| (name, "given more than once".to_owned()))
                    .collect(),
            ))
        }
    }
}

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Fields, D::Error> {
        struct ObjectVisitor;

        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = Fields;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Fields, A::Error> {
                let mut fields = Fields::default();
                while let Some(name) = access.next_key::<String>()? {
                    let value = access.next_value::<Value>()?;
                    fields.insert(name, value);
                }
                Ok(fields)
            }
        }

        deserializer.deserialize_map(ObjectVisitor)
    }
}

/// Parses a JSON body that must be one object, keeping every name it repeats. Only the
/// top level is checked: the fields of the admin API are strings, and the license
/// document inside `payload` is the license parser's to judge.
fn parse_json_object(bytes: &[u8]) -> Result<Fields, ApiError> {
    serde_json::from_slice::<Fields>(bytes).map_err(|e| {
        // A data error can only be the top level's type: every key of a JSON object is a
        // string and every value fits a `Value`.
        if e.is_data() {
            ApiError::BadJson("the body must be a JSON object".to_owned())
        } else {
            ApiError::BadJson(e.to_string())
        }
    })
}

/// Reads a whole body, answering 413 past [`BODY_LIMIT`] without buffering more.
pub async fn read_body(headers: &HeaderMap, body: Body) -> Result<bytes::Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > BODY_LIMIT as u64) {
        return Err(ApiError::TooLarge);
    }
    match http_body_util::Limited::new(body, BODY_LIMIT)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::TooLarge)
        }
        Err(e) if stalled(&*e) => Err(ApiError::BodyTimeout(format!(
            "Cannot read request body: {e}"
        ))),
        Err(e) => Err(ApiError::BadRequest(format!(
            "Cannot read request body: {e}"
        ))),
    }
}

/// Whether `e` is (or was caused by) a client that stopped sending its body.
fn stalled(mut e: &(dyn std::error::Error + 'static)) -> bool {
    loop {
        if e.is::<charter_runtime::http::BodyStalled>() {
            return true;
        }
        match e.source() {
            Some(source) => e = source,
            None => return false,
        }
    }
}

/// Parses a path id as a UUID, or answers Kong's schema violation.
pub fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    canonical_uuid(id).ok_or_else(|| ApiError::field("id", "expected a valid UUID"))
}

/// A UUID in its canonical text form only: 8-4-4-4-12 hex digits with hyphens, in either
/// case, as Kong's `is_valid_uuid` matches (a case-insensitive regex). The other forms the
/// `uuid` crate reads (`urn:uuid:…`, braced, 32 bare hex digits) are refused, so one
/// license has exactly one id a client can name.
pub fn canonical_uuid(text: &str) -> Option<Uuid> {
    // At 36 bytes `Uuid::try_parse` accepts nothing but the hyphenated form.
    if text.len() == 36 {
        Uuid::try_parse(text).ok()
    } else {
        None
    }
}

/// Answers a JSON 414 or 431 for a request line or header section over this API's limits,
/// before any route (or the token check) runs. hyper answers the same statuses itself,
/// without a body, only past its own far larger limits.
async fn check_head(request: Request, next: Next) -> Response {
    if target_len(request.uri()) > URI_LIMIT {
        return ApiError::UriTooLong.into_response();
    }
    let headers = request.headers();
    let size: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if headers.len() > HEADER_COUNT_LIMIT || size > HEADERS_LIMIT {
        return ApiError::HeadersTooLarge.into_response();
    }
    next.run(request).await
}

/// The length of a request target as the client sent it (near enough: the scheme and
/// authority of an absolute form, then path and query).
fn target_len(uri: &Uri) -> usize {
    uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |pq| pq.as_str().len())
}

#[cfg(test)]
mod tests;
