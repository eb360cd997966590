//! A table of malformed requests: each gets a 4xx problem+json and changes nothing.

use reqwest::{Method, StatusCode};

use crate::helpers::{Options, TestApp, expect_json, expect_problem};

struct Case {
    method: Method,
    path: &'static str,
    content_type: Option<&'static str>,
    body: Option<Vec<u8>>,
    status: StatusCode,
    code: &'static str,
}

fn case(
    method: Method,
    path: &'static str,
    body: Option<&str>,
    status: u16,
    code: &'static str,
) -> Case {
    Case {
        method,
        path,
        content_type: body.map(|_| "application/json"),
        body: body.map(|b| b.as_bytes().to_vec()),
        status: StatusCode::from_u16(status).unwrap(),
        code,
    }
}

#[tokio::test]
async fn malformed_requests_answer_problem_json() {
    let app = TestApp::spawn_with(Options::default().env("HTTP_MAX_BODY_BYTES", "4096")).await;
    let t = app.tenant("acme").await;
    let huge = format!(r#"{{"state": {{"blob": "{}"}}}}"#, "x".repeat(8192));
    let mut cases = vec![
        case(
            Method::PUT,
            "/v1/systems/1/state",
            Some("{not json"),
            400,
            "malformed_json",
        ),
        case(
            Method::PUT,
            "/v1/systems/1/state",
            Some(""),
            400,
            "malformed_json",
        ),
        case(
            Method::PUT,
            "/v1/systems/1/state",
            Some(r#"{"state": [1, 2]}"#),
            422,
            "validation_failed",
        ),
        case(
            Method::PUT,
            "/v1/systems/1/state",
            Some(r#"{"state": "text"}"#),
            422,
            "validation_failed",
        ),
        case(
            Method::PUT,
            "/v1/systems/1/state",
            Some(r#"{}"#),
            422,
            "validation_failed",
        ),
        case(
            Method::PUT,
            "/v1/systems/1/state",
            Some(r#"{"state": {}, "extra": 1}"#),
            422,
            "validation_failed",
        ),
        case(
            Method::PUT,
            "/v1/systems/0/state",
            Some(r#"{"state": {}}"#),
            400,
            "invalid_path_parameter",
        ),
        case(
            Method::PUT,
            "/v1/systems/6/state",
            Some(r#"{"state": {}}"#),
            400,
            "invalid_path_parameter",
        ),
        case(
            Method::GET,
            "/v1/systems/banana/state",
            None,
            400,
            "invalid_path_parameter",
        ),
        case(
            Method::GET,
            "/v1/systems/99999999999999999999/history",
            None,
            400,
            "invalid_path_parameter",
        ),
        case(
            Method::GET,
            "/v1/systems/-1/history",
            None,
            400,
            "invalid_path_parameter",
        ),
        case(
            Method::GET,
            "/v1/episodes/not-a-uuid",
            None,
            400,
            "invalid_path_parameter",
        ),
        case(
            Method::GET,
            "/v1/policies/1234",
            None,
            400,
            "invalid_path_parameter",
        ),
        case(
            Method::DELETE,
            "/v1/api-keys/%00",
            None,
            400,
            "invalid_path_parameter",
        ),
        case(
            Method::GET,
            "/v1/episodes?cursor=garbage",
            None,
            400,
            "invalid_cursor",
        ),
        case(
            Method::GET,
            "/v1/episodes?cursor=eyJ2ZXJzaW9uIjoxfQ",
            None,
            400,
            "invalid_cursor",
        ),
        case(
            Method::GET,
            "/v1/systems/1/history?cursor=%FF%FE",
            None,
            400,
            "invalid_cursor",
        ),
        case(
            Method::GET,
            "/v1/episodes?limit=0",
            None,
            400,
            "invalid_query",
        ),
        case(
            Method::GET,
            "/v1/episodes?limit=1000",
            None,
            400,
            "invalid_query",
        ),
        case(
            Method::GET,
            "/v1/episodes?limit=ten",
            None,
            400,
            "invalid_query",
        ),
        case(
            Method::GET,
            "/v1/systems/1/history?since=yesterday",
            None,
            400,
            "invalid_query",
        ),
        case(
            Method::POST,
            "/v1/episodes",
            Some(r#"{"title": 5, "content": "c"}"#),
            422,
            "validation_failed",
        ),
        case(
            Method::POST,
            "/v1/episodes",
            Some(r#"{"title": "t"}"#),
            422,
            "validation_failed",
        ),
        case(
            Method::POST,
            "/v1/policies",
            Some(r#"{"name": "p", "rules": "all"}"#),
            422,
            "validation_failed",
        ),
        case(
            Method::PUT,
            "/v1/systems/1/state",
            Some(r#"{"state": {"note": "a\u0000b"}}"#),
            422,
            "validation_failed",
        ),
        case(
            Method::PUT,
            "/v1/systems/1/state",
            Some(r#"{"state": {"k\u0000": 1}}"#),
            422,
            "validation_failed",
        ),
        case(
            Method::POST,
            "/v1/episodes",
            Some(r#"{"title": "t", "content": "nul \u0000 here"}"#),
            422,
            "validation_failed",
        ),
        case(
            Method::POST,
            "/v1/policies",
            Some(
                r#"{"name": "p", "rules": [{"system": 1, "path": "/x", "op": "eq", "threshold": "\u0000"}]}"#,
            ),
            422,
            "validation_failed",
        ),
        case(
            Method::GET,
            "/v1/episodes?cursor=eyJjcmVhdGVkX2F0IjoiLTUwMDAtMDEtMDFUMDA6MDA6MDBaIiwiaWQiOiIwMDAwMDAwMC0wMDAwLTQwMDAtODAwMC0wMDAwMDAwMDAwMDAifQ",
            None,
            400,
            "invalid_cursor",
        ),
        case(
            Method::GET,
            "/v1/systems/1/history?since=0000-01-01T00:00:00Z",
            None,
            400,
            "invalid_query",
        ),
        case(Method::GET, "/v1/nope", None, 404, "not_found"),
        case(Method::GET, "/", None, 404, "not_found"),
        case(
            Method::PATCH,
            "/v1/systems",
            None,
            405,
            "method_not_allowed",
        ),
        case(
            Method::DELETE,
            "/v1/episodes",
            None,
            405,
            "method_not_allowed",
        ),
    ];
    cases.push(Case {
        method: Method::PUT,
        path: "/v1/systems/1/state",
        content_type: Some("application/json"),
        body: Some(huge.into_bytes()),
        status: StatusCode::PAYLOAD_TOO_LARGE,
        code: "payload_too_large",
    });
    cases.push(Case {
        method: Method::PUT,
        path: "/v1/systems/1/state",
        content_type: Some("text/plain"),
        body: Some(br#"{"state": {}}"#.to_vec()),
        status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
        code: "unsupported_media_type",
    });
    cases.push(Case {
        method: Method::PUT,
        path: "/v1/systems/1/state",
        content_type: None,
        body: Some(br#"{"state": {}}"#.to_vec()),
        status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
        code: "unsupported_media_type",
    });

    for c in cases {
        let mut req = app
            .client
            .request(c.method.clone(), app.url(c.path))
            .bearer_auth(&t.admin);
        if let Some(ct) = c.content_type {
            req = req.header("content-type", ct);
        }
        if let Some(body) = c.body {
            req = req.body(body);
        }
        let res = req.send().await.unwrap();
        let label = format!("{} {}", c.method, c.path);
        let status = res.status();
        assert_eq!(status, c.status, "{label}");
        let problem = expect_problem(res, c.status, c.code).await;
        assert!(!problem["detail"].as_str().unwrap().is_empty(), "{label}");
    }

    // None of that recorded anything.
    let systems = expect_json(app.get("/v1/systems", &t.viewer).await, StatusCode::OK).await;
    assert!(
        systems["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["version"].is_null()),
        "{systems}"
    );
}

#[tokio::test]
async fn request_ids_are_kept_or_generated_and_echoed() {
    let app = TestApp::spawn().await;
    let res = app
        .client
        .get(app.url("/v1/nope"))
        .header("x-request-id", "edge-1234")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"], "edge-1234");
    let problem = expect_problem(res, StatusCode::NOT_FOUND, "not_found").await;
    assert_eq!(problem["request_id"], "edge-1234");

    for unusable in [
        "x".repeat(129),
        "has spaces".to_owned(),
        "quote\"d".to_owned(),
    ] {
        let res = app
            .client
            .get(app.url("/health"))
            .header("x-request-id", &unusable)
            .send()
            .await
            .unwrap();
        let echoed = res.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert!(
            uuid::Uuid::parse_str(&echoed).is_ok(),
            "{unusable:?} was replaced, got {echoed}"
        );
    }

    let a = app.client.get(app.url("/health")).send().await.unwrap();
    let b = app.client.get(app.url("/health")).send().await.unwrap();
    let (a, b) = (
        a.headers()["x-request-id"].clone(),
        b.headers()["x-request-id"].clone(),
    );
    assert_ne!(a, b);
    assert!(uuid::Uuid::parse_str(a.to_str().unwrap()).is_ok());
}
