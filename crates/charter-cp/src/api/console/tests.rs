//! The console's routes without a socket: the page and its assets answer without a token,
//! with their types and the security and cache headers; `/auth/self` says what a token may
//! do; the page references only assets that exist and carries nothing inline.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::response::Response;
use charter_license::{FixedClock, LicenseSigner, TrustedKeys};
use charter_store::SledStore;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::{ASSETS, CSP};
use crate::api::auth::Tokens;
use crate::api::{router, ApiState};
use crate::service::Service;

const TOKENS: &str = "reader-token read\nwriter-token write\n";

async fn api_state(tokens: Option<&str>) -> (tempfile::TempDir, ApiState) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(SledStore::open(&tmp.path().join("data")).expect("open store"));
    let keys = TrustedKeys::new([LicenseSigner::from_seed([3; 32]).trusted_key()]);
    let (service, _tasks) = Service::start(
        store,
        keys,
        Arc::new(FixedClock::new(0)),
        None,
        "cp".to_owned(),
    )
    .await
    .expect("start");
    let tokens = tokens.map(|text| Tokens::parse(text).expect("token file"));
    (tmp, ApiState::new(service, tokens))
}

async fn get(state: &ApiState, uri: &str, headers: &[(&str, &str)]) -> Response {
    let mut request = Request::builder().uri(uri);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    router(state.clone())
        .oneshot(request.body(Body::empty()).expect("request"))
        .await
        .expect("the router is infallible")
}

fn header_of(response: &Response, name: header::HeaderName) -> String {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().expect("ASCII").to_owned())
        .unwrap_or_default()
}

async fn body_of(response: Response) -> Vec<u8> {
    response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
        .to_vec()
}

#[tokio::test]
async fn the_page_and_its_assets_need_no_token_and_carry_strict_headers() {
    let (_tmp, state) = api_state(Some(TOKENS)).await;
    for (uri, content_type, starts) in [
        ("/ui", "text/html; charset=utf-8", "<!doctype html>"),
        ("/ui/", "text/html; charset=utf-8", "<!doctype html>"),
        ("/ui/app.js", "text/javascript; charset=utf-8", "//"),
        ("/ui/app.css", "text/css; charset=utf-8", "/*"),
        ("/ui/icon.svg", "image/svg+xml", "<svg"),
    ] {
        let response = get(&state, uri, &[]).await;
        assert_eq!(response.status(), StatusCode::OK, "{uri}");
        assert_eq!(
            header_of(&response, header::CONTENT_TYPE),
            content_type,
            "{uri}"
        );
        assert_eq!(
            header_of(&response, header::CONTENT_SECURITY_POLICY),
            CSP,
            "{uri}"
        );
        assert_eq!(
            header_of(&response, header::X_CONTENT_TYPE_OPTIONS),
            "nosniff",
            "{uri}"
        );
        assert_eq!(
            header_of(&response, header::CACHE_CONTROL),
            "no-cache",
            "{uri}"
        );
        let etag = header_of(&response, header::ETAG);
        assert!(etag.starts_with('"') && etag.len() > 10, "{uri}: {etag}");
        let body = body_of(response).await;
        assert!(body.starts_with(starts.as_bytes()), "{uri}");

        // The same bytes again: 304, no body.
        let again = get(&state, uri, &[("if-none-match", &etag)]).await;
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{uri}");
        assert_eq!(header_of(&again, header::ETAG), etag, "{uri}");
        assert!(body_of(again).await.is_empty(), "{uri}");
    }
    // The data stays behind the token.
    assert_eq!(
        get(&state, "/license/status", &[]).await.status(),
        StatusCode::UNAUTHORIZED
    );
    // Unknown assets, and the page under a second name, are Kong's JSON 404.
    for uri in ["/ui/index.html", "/ui/nope.js", "/ui/../licenses"] {
        let response = get(&state, uri, &[]).await;
        assert!(
            matches!(
                response.status(),
                StatusCode::NOT_FOUND | StatusCode::UNAUTHORIZED
            ),
            "{uri}: {}",
            response.status()
        );
        assert_eq!(
            header_of(&response, header::CONTENT_TYPE),
            "application/json",
            "{uri}"
        );
    }
}

#[tokio::test]
async fn auth_self_tells_what_a_token_may_do() {
    let (_tmp, state) = api_state(Some(TOKENS)).await;
    let check = |token: Option<&'static str>, status: StatusCode, expected: Value| {
        let state = state.clone();
        async move {
            let headers: Vec<(&str, &str)> = token
                .map(|t| vec![("kong-admin-token", t)])
                .unwrap_or_default();
            let response = get(&state, "/auth/self", &headers).await;
            assert_eq!(response.status(), status, "{token:?}");
            let body: Value = serde_json::from_slice(&body_of(response).await).expect("JSON");
            assert_eq!(body, expected, "{token:?}");
        }
    };
    check(
        None,
        StatusCode::UNAUTHORIZED,
        json!({"message": "Invalid credentials. Token or User credentials required"}),
    )
    .await;
    check(
        Some("wrong"),
        StatusCode::UNAUTHORIZED,
        json!({"message": "Invalid credentials. Token or User credentials required"}),
    )
    .await;
    check(
        Some("reader-token"),
        StatusCode::OK,
        json!({"token_required": true, "access": "read"}),
    )
    .await;
    check(
        Some("writer-token"),
        StatusCode::OK,
        json!({"token_required": true, "access": "write"}),
    )
    .await;

    let (_tmp, open) = api_state(None).await;
    let response = get(&open, "/auth/self", &[]).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = serde_json::from_slice(&body_of(response).await).expect("JSON");
    assert_eq!(body, json!({"token_required": false, "access": "write"}));
}

#[test]
fn the_page_references_only_assets_that_exist_and_has_nothing_inline() {
    let page = std::str::from_utf8(ASSETS[0].body).expect("UTF-8");
    let mut referenced = 0;
    for attribute in ["src=\"", "href=\""] {
        for (at, _) in page.match_indices(attribute) {
            let value = &page[at + attribute.len()..];
            let value = &value[..value.find('"').expect("a closing quote")];
            if let Some(name) = value.strip_prefix("/ui/") {
                assert!(
                    ASSETS.iter().any(|a| a.name == name),
                    "{value} is not served"
                );
                referenced += 1;
            } else {
                // In-page links only: nothing is loaded from elsewhere.
                assert!(value.starts_with('#'), "{value}");
            }
        }
    }
    assert!(
        referenced >= 3,
        "the page loads its script, styles and icon"
    );
    // The Content-Security-Policy forbids inline script and style: the page must not need them.
    let lower = page.to_ascii_lowercase();
    assert_eq!(
        lower.matches("<script").count(),
        lower.matches("<script src=\"/ui/").count(),
        "every script is an asset"
    );
    for inline in [" style=", " onclick=", " onload=", " onsubmit=", "<style"] {
        assert!(!lower.contains(inline), "{inline} in the page");
    }
    // The script never turns API data into markup.
    let script = std::str::from_utf8(ASSETS[1].body).expect("UTF-8");
    assert!(!script.contains("innerHTML"), "app.js uses innerHTML");
}
