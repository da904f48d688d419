//! The web console: `GET /ui` and its assets, compiled into the binary, and
//! `GET /auth/self`, which tells the console what the token it holds may do.
//!
//! The console is a client of the public admin API like any other: its page holds no data
//! and reads everything through the routes above it, with the operator's token. So the
//! shell (`/ui`, `/ui/{asset}`) needs no token, as Kong Manager's and Consul's UI do not,
//! and one console works the same against every control plane of a cluster.

use std::sync::LazyLock;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::auth::Access;
use super::{ApiError, ApiState};

/// One file of the console, as compiled in.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

/// Every file the console serves. `index.html` is the page at `/ui`; the others are
/// `/ui/{name}`. Plain HTML, CSS and JavaScript without a build step, so what is in
/// `crates/charter-cp/ui/` is exactly what a browser gets, with no network at run time.
const ASSETS: [Asset; 4] = [
    Asset {
        name: "index.html",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../../ui/index.html"),
    },
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../ui/app.js"),
    },
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../../ui/app.css"),
    },
    Asset {
        name: "icon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("../../ui/icon.svg"),
    },
];

/// The console's Content-Security-Policy: scripts, styles, images and API calls from this
/// origin only, and nothing inline (the page has no inline script or style attribute), so
/// a value from the API that slipped into the page as markup still could not run. No
/// frames and no form posts elsewhere.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// Each asset's entity tag: a digest of its bytes, computed once. Browsers revalidate on
/// every load (`no-cache`) and get a bodiless 304 while the binary is the same, so a
/// control plane upgraded in place never serves a stale script with a new page.
static ETAGS: LazyLock<Vec<HeaderValue>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|asset| {
            let digest = Sha256::digest(asset.body);
            let tag = format!("\"{}\"", hex::encode(&digest[..12]));
            // Hex digits in quotes are always a valid header value.
            HeaderValue::from_str(&tag).unwrap_or(HeaderValue::from_static("\"0\""))
        })
        .collect()
});

/// `GET /ui`: the console's page.
pub async fn page(headers: HeaderMap) -> Response {
    serve(0, &headers)
}

/// `GET /ui/{asset}`: a script, style sheet or icon of the console.
pub async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    // `index.html` has one address, `/ui`.
    match ASSETS
        .iter()
        .position(|asset| asset.name == name && name != "index.html")
    {
        Some(index) => serve(index, &headers),
        None => ApiError::NotFound.into_response(),
    }
}

fn serve(index: usize, headers: &HeaderMap) -> Response {
    let asset = &ASSETS[index];
    let etag = ETAGS[index].clone();
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| {
            tags.split(',')
                .any(|tag| tag.trim() == "*" || tag.trim().as_bytes() == etag.as_bytes())
        });
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            )],
            asset.body,
        )
            .into_response()
    };
    let headers = response.headers_mut();
    headers.insert(header::ETAG, etag);
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// Whether a request path is the console's shell, which needs no token: `/ui` or one
/// segment under it (the router does not resolve `..`, but a path that could name
/// anything else is left to the token check all the same).
pub fn is_shell(path: &str) -> bool {
    path == "/ui"
        || path
            .strip_prefix("/ui/")
            .is_some_and(|name| !name.contains('/'))
}

/// `GET /auth/self`: whether this control plane asks for a token, and what the token of
/// the request may do. It needs a token like every data route (the auth layer answers
/// 401 first), so the console learns both that it must ask for one and, once it has one,
/// whether to offer the write controls, without trying a write to find out.
pub async fn whoami(State(state): State<ApiState>, access: Option<Extension<Access>>) -> Response {
    let body = match (state.tokens(), access) {
        // No token file: the API is open (on loopback only) and everything is allowed.
        (None, _) => json!({"token_required": false, "access": "write"}),
        (Some(_), Some(Extension(access))) => {
            json!({"token_required": true, "access": access.as_str()})
        }
        // Unreachable behind the auth layer, which answers 401 without a known token;
        // answering 401 here too keeps the handler right on its own.
        (Some(_), None) => return ApiError::Unauthorized.into_response(),
    };
    Json(body).into_response()
}

#[cfg(test)]
mod tests;
