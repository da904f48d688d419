//! Requests are counted under their route template and method, as static labels.

use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use charter_license::{FixedClock, LicenseSigner, TrustedKeys};
use charter_store::SledStore;
use http_body_util::BodyExt;
use tower::ServiceExt;

use crate::api::{router, ApiState, ROUTES};
use crate::service::Service;

#[tokio::test]
async fn every_route_is_labelled_by_its_template() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(SledStore::open(&tmp.path().join("data")).unwrap());
    let keys = TrustedKeys::new([LicenseSigner::from_seed([1; 32]).trusted_key()]);
    let (service, _tasks) = Service::start(
        store,
        keys,
        Arc::new(FixedClock::new(0)),
        None,
        "cp".to_owned(),
    )
    .await
    .unwrap();
    let state = ApiState::new(service, None);
    let send = |method: &str, uri: String| {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::empty())
            .unwrap();
        router(state.clone()).oneshot(request)
    };
    for route in ROUTES {
        let uri = route.replace("{id}", "00000000-0000-0000-0000-000000000001");
        send("GET", uri).await.unwrap();
    }
    send("BREW", "/licenses".to_owned()).await.unwrap();
    send("GET", "/nowhere/42".to_owned()).await.unwrap();
    let response = send("GET", "/metrics".to_owned()).await.unwrap();
    let text = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(text.to_vec()).unwrap();
    for route in ROUTES {
        assert!(
            text.contains(&format!(
                r#"charter_http_requests_total{{method="GET",route="{route}""#
            )),
            "{route} in {text}"
        );
    }
    assert!(
        text.contains(r#"{method="other",route="/licenses",status="405"}"#),
        "{text}"
    );
    assert!(
        text.contains(r#"{method="GET",route="unmatched",status="404"}"#),
        "{text}"
    );
    assert!(!text.contains(r#"route="other""#), "{text}");
}
