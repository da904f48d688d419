//! The admin API's strictness, without a socket: only canonical UUIDs name a license, a
//! body field given twice is refused, the `Bearer` scheme matches in any case, the errors
//! answered before any route runs (404, 405, 413, 414, 431) are JSON, a trailing slash is
//! the same route, and Consul's face takes its own token header.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use bytes::Bytes;
use charter_license::{FixedClock, LicenseSigner, TrustedKeys};
use charter_store::SledStore;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::sync::watch;
use tower::ServiceExt;

use super::auth::{bearer_token, Tokens};
use super::{router, ApiState, BODY_LIMIT, HEADERS_LIMIT, HEADER_COUNT_LIMIT, URI_LIMIT};
use crate::service::Service;

/// 2026-06-01T00:00:00Z.
const JUNE_2026: i64 = 1_780_272_000;

fn vendor() -> LicenseSigner {
    LicenseSigner::from_seed([9; 32])
}

fn license(key: &str) -> String {
    let Value::Object(payload) = json!({
        "admin_seats": "1",
        "customer": "Example Company, Inc",
        "dataplanes": "1",
        "license_creation_date": "2026-01-01",
        "license_expiration_date": "2030-01-01",
        "license_key": key,
        "product_subscription": "Charter Enterprise",
        "support_plan": "None",
    }) else {
        unreachable!("an object literal")
    };
    vendor().sign(payload).expect("a valid payload").to_json()
}

/// An admin API over a real sled store in a temp dir.
struct Api {
    _tmp: tempfile::TempDir,
    state: ApiState,
    stop: watch::Sender<bool>,
    tasks: tokio::task::JoinHandle<()>,
}

/// An answer: status, content type and body.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    content_type: String,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} body is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

impl Api {
    async fn start(tokens: Option<&str>) -> Api {
        let tmp = tempfile::tempdir().expect("temp dir");
        let store = Arc::new(SledStore::open(&tmp.path().join("data")).expect("open store"));
        let (service, tasks) = Service::start(
            store,
            TrustedKeys::new([vendor().trusted_key()]),
            Arc::new(FixedClock::new(JUNE_2026)),
            None,
            "cp-test".to_owned(),
        )
        .await
        .expect("start");
        let (stop, stopped) = watch::channel(false);
        let tasks = tokio::spawn(tasks.run(stopped));
        let tokens = tokens.map(|text| Tokens::parse(text).expect("token file"));
        Api {
            _tmp: tmp,
            state: ApiState::new(service, tokens),
            stop,
            tasks,
        }
    }

    async fn call(&self, request: Request<Body>) -> Answer {
        let response = router(self.state.clone())
            .oneshot(request)
            .await
            .expect("the router is infallible");
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().expect("ASCII").to_owned())
            .unwrap_or_default();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        Answer {
            status,
            content_type,
            body,
        }
    }

    /// A request with a body of the given content type (none when empty).
    async fn send(&self, method: &str, uri: &str, content_type: &str, body: &str) -> Answer {
        let mut request = Request::builder().method(method).uri(uri);
        if !content_type.is_empty() {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        self.call(request.body(Body::from(body.to_owned())).expect("request"))
            .await
    }

    async fn json(&self, method: &str, uri: &str, body: &Value) -> Answer {
        self.send(method, uri, "application/json", &body.to_string())
            .await
    }

    async fn get(&self, uri: &str) -> Answer {
        self.send("GET", uri, "", "").await
    }

    /// `POST /licenses`, expecting 201; the new record's id.
    async fn add(&self, key: &str) -> String {
        let answer = self
            .json("POST", "/licenses", &json!({"payload": license(key)}))
            .await;
        assert_eq!(answer.status, StatusCode::CREATED, "{:?}", answer.json());
        answer.json()["id"].as_str().expect("an id").to_owned()
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.tasks.await;
    }
}

fn schema_violation(field: &str, message: &str) -> Value {
    json!({
        "code": 2,
        "name": "schema violation",
        "message": format!("schema violation ({field}: {message})"),
        "fields": {field: message},
    })
}

#[tokio::test]
async fn only_canonical_uuids_name_a_license_on_every_method() {
    let api = Api::start(None).await;
    let id = api.add("canonical").await;
    let bare = id.replace('-', "");
    let not_canonical = [
        format!("urn:uuid:{id}"),
        format!("URN:UUID:{id}"),
        format!("{{{id}}}"),
        format!("%7B{id}%7D"),
        bare.clone(),
        bare.to_uppercase(),
        // Hyphens in the wrong places, but 36 characters.
        format!("{}-{}", &bare[..31], &bare[31..]) + "---",
        format!("{id}0"),
        id[..35].to_owned(),
        "not-a-uuid".to_owned(),
        "%FF".to_owned(),
        " ".repeat(36).replace(' ', "%20"),
    ];
    let expected = schema_violation("id", "expected a valid UUID");
    let write = json!({"payload": license("canonical")});
    for form in &not_canonical {
        let uri = format!("/licenses/{form}");
        for (method, answer) in [
            ("GET", api.get(&uri).await),
            ("PUT", api.json("PUT", &uri, &write).await),
            ("PATCH", api.json("PATCH", &uri, &json!({})).await),
            ("DELETE", api.send("DELETE", &uri, "", "").await),
        ] {
            assert_eq!(answer.content_type, "application/json", "{method} {uri}");
            assert_eq!(
                (answer.status, answer.json()),
                (StatusCode::BAD_REQUEST, expected.clone()),
                "{method} {uri}"
            );
        }
        // The same forms in a body's `id`.
        let answer = api
            .json(
                "POST",
                "/licenses",
                &json!({"payload": license("other"), "id": form}),
            )
            .await;
        assert_eq!(
            (answer.status, answer.json()),
            (StatusCode::BAD_REQUEST, expected.clone()),
            "POST with id {form}"
        );
    }
    // Nothing was deleted, replaced or created.
    let list = api.get("/licenses").await.json();
    assert_eq!(list["data"].as_array().expect("data").len(), 1, "{list}");
    assert_eq!(list["data"][0]["id"], json!(id));

    // The canonical form in upper case is the same license (Kong's check ignores case).
    let upper = id.to_uppercase();
    let answer = api.get(&format!("/licenses/{upper}")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["id"], json!(id));
    let answer = api
        .json(
            "PATCH",
            &format!("/licenses/{upper}"),
            &json!({"id": upper}),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.json());
    let answer = api
        .send("DELETE", &format!("/licenses/{upper}"), "", "")
        .await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT);
    assert_eq!(
        api.get(&format!("/licenses/{id}")).await.status,
        StatusCode::NOT_FOUND
    );
    api.stop().await;
}

#[tokio::test]
async fn a_body_field_given_twice_is_refused_naming_it() {
    let api = Api::start(None).await;
    let id = api.add("first").await;
    let valid = serde_json::to_string(&license("second")).expect("a string");
    let form_valid: String = url_encode(&license("second"));
    let json_type = "application/json";
    let form_type = "application/x-www-form-urlencoded";
    let cases = [
        (
            json_type,
            format!(r#"{{"payload":"bogus","payload":{valid}}}"#),
            "payload",
        ),
        (
            json_type,
            format!(r#"{{"payload":{valid},"payload":"bogus"}}"#),
            "payload",
        ),
        (
            json_type,
            format!(r#"{{"payload":{valid},"pay\u006coad":{valid}}}"#),
            "payload",
        ),
        (
            json_type,
            format!(r#"{{"payload":{valid},"id":"{id}","id":"{id}"}}"#),
            "id",
        ),
        (
            "application/merge-patch+json",
            format!(r#"{{"payload":"x","payload":{valid}}}"#),
            "payload",
        ),
        (
            form_type,
            format!("payload=bogus&payload={form_valid}"),
            "payload",
        ),
        (
            form_type,
            format!("payload={form_valid}&payload={form_valid}"),
            "payload",
        ),
        (
            form_type,
            format!("id={id}&payload={form_valid}&id={id}"),
            "id",
        ),
    ];
    for (content_type, body, field) in &cases {
        let expected = schema_violation(field, "given more than once");
        for (method, uri) in [
            ("POST", "/licenses".to_owned()),
            ("PUT", format!("/licenses/{id}")),
            ("PATCH", format!("/licenses/{id}")),
        ] {
            let answer = api.send(method, &uri, content_type, body).await;
            assert_eq!(
                (answer.status, answer.json()),
                (StatusCode::BAD_REQUEST, expected.clone()),
                "{method} {uri} {content_type} {body}"
            );
        }
    }
    // Two fields repeated: both named.
    let answer = api
        .send(
            "POST",
            "/licenses",
            form_type,
            &format!("id={id}&payload=a&id={id}&payload=b"),
        )
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        answer.json()["fields"],
        json!({"id": "given more than once", "payload": "given more than once"})
    );
    // Nothing was stored or changed.
    let list = api.get("/licenses").await.json();
    assert_eq!(list["data"].as_array().expect("data").len(), 1, "{list}");
    assert_eq!(list["data"][0]["payload"], json!(license("first")));

    // Only the top level is checked, and the other body errors are as before.
    let nested = format!(r#"{{"payload":{valid},"checksum":{{"a":1,"a":2}}}}"#);
    let answer = api.send("POST", "/licenses", json_type, &nested).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{:?}", answer.json());
    for (body, detail) in [
        ("[1,2]", "the body must be a JSON object"),
        ("\"payload\"", "the body must be a JSON object"),
        (
            "{\"payload\":",
            "EOF while parsing a value at line 1 column 11",
        ),
        ("{} {}", "trailing characters at line 1 column 4"),
    ] {
        let answer = api.send("POST", "/licenses", json_type, body).await;
        assert_eq!(
            (answer.status, answer.json()),
            (
                StatusCode::BAD_REQUEST,
                json!({"message": "Cannot parse JSON body", "detail": detail})
            ),
            "{body}"
        );
    }
    api.stop().await;
}

fn url_encode(text: &str) -> String {
    serde_urlencoded::to_string([("x", text)]).expect("encodable")[2..].to_owned()
}

#[tokio::test]
async fn the_bearer_scheme_matches_in_any_case() {
    let api = Api::start(Some("writer-token write\nreader-token read\n")).await;
    let cases = [
        ("Bearer writer-token", StatusCode::CREATED),
        ("bearer writer-token", StatusCode::CREATED),
        ("BEARER writer-token", StatusCode::CREATED),
        ("bEaReR writer-token", StatusCode::CREATED),
        ("Bearer   writer-token", StatusCode::CREATED),
        ("bearer reader-token", StatusCode::FORBIDDEN),
        ("bearer writer-token-2", StatusCode::UNAUTHORIZED),
        ("Bearerwriter-token", StatusCode::UNAUTHORIZED),
        ("Basic writer-token", StatusCode::UNAUTHORIZED),
        ("Bearers writer-token", StatusCode::UNAUTHORIZED),
        ("bearer", StatusCode::UNAUTHORIZED),
        ("bearer ", StatusCode::UNAUTHORIZED),
        ("writer-token", StatusCode::UNAUTHORIZED),
    ];
    for (n, (authorization, expected)) in cases.into_iter().enumerate() {
        let body = json!({"payload": license(&format!("key-{n}"))}).to_string();
        let request = Request::builder()
            .method("POST")
            .uri("/licenses")
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, authorization)
            .body(Body::from(body))
            .expect("request");
        let answer = api.call(request).await;
        assert_eq!(
            answer.status,
            expected,
            "{authorization:?}: {:?}",
            answer.json()
        );
        let request = Request::builder()
            .uri("/licenses")
            .header(
                header::AUTHORIZATION,
                authorization.replace("writer", "reader"),
            )
            .body(Body::empty())
            .expect("request");
        let read = if expected == StatusCode::UNAUTHORIZED {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::OK
        };
        assert_eq!(
            api.call(request).await.status,
            read,
            "{authorization:?} read"
        );
    }
    assert_eq!(bearer_token("  BeArEr  t0k3n "), Some("t0k3n"));
    api.stop().await;
}

#[tokio::test]
async fn errors_answered_before_any_route_are_json() {
    let api = Api::start(None).await;
    let check = |answer: Answer, status: StatusCode, message: &str| {
        assert_eq!(answer.status, status, "{answer:?}");
        assert_eq!(answer.content_type, "application/json", "{status}");
        let body = answer.json();
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(message)),
            "{status}: {body}"
        );
    };
    check(
        api.get("/nowhere").await,
        StatusCode::NOT_FOUND,
        "Not found",
    );
    check(
        api.send("BREW", "/licenses", "", "").await,
        StatusCode::METHOD_NOT_ALLOWED,
        "Method not allowed",
    );
    check(
        api.send("PUT", "/licenses", "", "").await,
        StatusCode::METHOD_NOT_ALLOWED,
        "Method not allowed",
    );

    // 413, declared and streamed without a length.
    let declared = Request::builder()
        .method("POST")
        .uri("/licenses")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, (BODY_LIMIT + 1).to_string())
        .body(Body::empty())
        .expect("request");
    check(
        api.call(declared).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "Request body too large",
    );
    let chunks =
        (0..=BODY_LIMIT / 4096).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b' '; 4096])));
    let streamed = Request::builder()
        .method("PUT")
        .uri("/v1/operator/license")
        .body(Body::from_stream(tokio_stream::iter(chunks)))
        .expect("request");
    check(
        api.call(streamed).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "Request body too large",
    );

    // 414 past our limit, and not at it.
    let at_limit = format!("/licenses?pad={}", "a".repeat(URI_LIMIT - 14));
    assert_eq!(at_limit.len(), URI_LIMIT);
    assert_eq!(api.get(&at_limit).await.status, StatusCode::OK);
    let over = format!("{at_limit}a");
    check(
        api.get(&over).await,
        StatusCode::URI_TOO_LONG,
        "URI too long",
    );
    check(
        api.get(&format!("http://127.0.0.1:8001{at_limit}")).await,
        StatusCode::URI_TOO_LONG,
        "URI too long",
    );
    check(
        api.send(
            "DELETE",
            &format!("/licenses/{}", "0".repeat(URI_LIMIT)),
            "",
            "",
        )
        .await,
        StatusCode::URI_TOO_LONG,
        "URI too long",
    );

    // 431 past our limits on bytes and on lines, and not at them.
    let with_headers = |headers: Vec<(String, String)>| {
        let mut request = Request::builder().uri("/licenses");
        for (name, value) in headers {
            request = request.header(name, value);
        }
        request.body(Body::empty()).expect("request")
    };
    let many = |n: usize| (0..n).map(|i| (format!("x-{i}"), "v".to_owned())).collect();
    assert_eq!(
        api.call(with_headers(many(HEADER_COUNT_LIMIT)))
            .await
            .status,
        StatusCode::OK
    );
    check(
        api.call(with_headers(many(HEADER_COUNT_LIMIT + 1))).await,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "Request headers too large",
    );
    // `x-big: ` and the line end are 9 bytes.
    let big = |n: usize| vec![("x-big".to_owned(), "b".repeat(n - 9))];
    assert_eq!(
        api.call(with_headers(big(HEADERS_LIMIT))).await.status,
        StatusCode::OK
    );
    check(
        api.call(with_headers(big(HEADERS_LIMIT + 1))).await,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "Request headers too large",
    );
    api.stop().await;
}

#[tokio::test]
async fn a_trailing_slash_is_the_same_route_everywhere() {
    let api = Api::start(None).await;
    // Kong's docs list and add at `/licenses/`.
    let added = api
        .json("POST", "/licenses/", &json!({"payload": license("slash")}))
        .await;
    assert_eq!(added.status, StatusCode::CREATED, "{:?}", added.json());
    let id = added.json()["id"].as_str().expect("an id").to_owned();
    // Every route answers the same with and without one trailing slash.
    for route in super::ROUTES {
        let path = route.replace("{id}", &id);
        let (plain, slashed) = (api.get(&path).await, api.get(&format!("{path}/")).await);
        assert_eq!(
            (plain.status, &plain.content_type),
            (slashed.status, &slashed.content_type),
            "{path}/"
        );
        if plain.content_type == "application/json" {
            assert_eq!(plain.json(), slashed.json(), "{path}/");
        }
    }
    let listed = api.get("/licenses/?size=1").await;
    assert_eq!(listed.json()["data"][0]["id"], json!(id));
    // `PUT /licenses/` is `PUT /licenses`: 405, as when the id is omitted in Kong.
    let put = api
        .json("PUT", "/licenses/", &json!({"payload": license("slash")}))
        .await;
    assert_eq!(
        (put.status, put.json()),
        (
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"message": "Method not allowed"})
        )
    );
    // The writes on a license's own path, slashed.
    let path = format!("/licenses/{id}/");
    let patched = api.json("PATCH", &path, &json!({})).await;
    assert_eq!(patched.status, StatusCode::OK, "{:?}", patched.json());
    let replaced = api
        .json("PUT", &path, &json!({"payload": license("slash-2")}))
        .await;
    assert_eq!(replaced.status, StatusCode::OK, "{:?}", replaced.json());
    // Metrics count a slashed request under its route.
    let metrics = String::from_utf8(api.get("/metrics/").await.body.to_vec()).expect("UTF-8");
    assert!(
        metrics.contains(r#"method="POST",route="/licenses",status="201""#),
        "{metrics}"
    );
    assert_eq!(
        api.send("DELETE", &path, "", "").await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(api.get(&path).await.status, StatusCode::NOT_FOUND);
    // One slash only: an empty segment is no route.
    assert_eq!(api.get("/licenses//").await.status, StatusCode::NOT_FOUND);
    assert_eq!(api.get("/").await.status, StatusCode::NOT_FOUND);
    api.stop().await;
}

#[tokio::test]
async fn consul_get_needs_no_token_and_writes_take_x_consul_token() {
    let api = Api::start(Some("writer-token write\nreader-token read\n")).await;
    let call = |method: &str, uri: &str, token: Option<(&str, &str)>, body: String| {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some((name, value)) = token {
            request = request.header(name, value);
        }
        request.body(Body::from(body)).expect("request")
    };
    let consul = "/v1/operator/license";
    // GET needs no token (Consul's ACL "none"), with or without a slash.
    for uri in [consul, "/v1/operator/license/"] {
        let answer = api.call(call("GET", uri, None, String::new())).await;
        assert_eq!(answer.status, StatusCode::OK, "{uri}");
        assert_eq!(answer.json()["Valid"], false);
    }
    // Writes need a write token, also as `X-Consul-Token`.
    let text = license("consul");
    let put = |token| call("PUT", consul, token, text.clone());
    assert_eq!(api.call(put(None)).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        api.call(put(Some(("X-Consul-Token", "wrong"))))
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        api.call(put(Some(("X-Consul-Token", "reader-token"))))
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    let installed = api
        .call(put(Some(("X-Consul-Token", "writer-token"))))
        .await;
    assert_eq!(installed.status, StatusCode::OK, "{:?}", installed.json());
    assert_eq!(installed.json()["Valid"], true);
    let delete = |token| call("DELETE", consul, token, String::new());
    assert_eq!(
        api.call(delete(None)).await.status,
        StatusCode::UNAUTHORIZED
    );
    // Past the token check: the last valid license is not deleted.
    assert_eq!(
        api.call(delete(Some(("X-Consul-Token", "writer-token"))))
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    // The raw document carries the license key: `?signed=1` needs a token, read will do.
    let signed = format!("{consul}?signed=1");
    assert_eq!(
        api.call(call("GET", &signed, None, String::new()))
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    let document = api
        .call(call(
            "GET",
            &signed,
            Some(("X-Consul-Token", "reader-token")),
            String::new(),
        ))
        .await;
    assert_eq!(document.status, StatusCode::OK);
    assert_eq!(document.body, Bytes::from(text.clone()));
    assert_eq!(
        api.call(call(
            "GET",
            &format!("{consul}?signed=0"),
            None,
            String::new()
        ))
        .await
        .status,
        StatusCode::OK
    );
    // `X-Consul-Token` is Consul's face's header only; the other routes still need a token.
    for uri in ["/licenses", "/license/status", "/license/report"] {
        assert_eq!(
            api.call(call(
                "GET",
                uri,
                Some(("X-Consul-Token", "reader-token")),
                String::new()
            ))
            .await
            .status,
            StatusCode::UNAUTHORIZED,
            "{uri}"
        );
    }
    api.stop().await;
}
