//! Inbound webhooks against the real server and PostgreSQL as the app role: signed requests
//! becoming events or episodes, every refusal storing nothing, exact repeats answered with the
//! original, secret rotation with and without overlap, tenant isolation, roles, and the secret
//! never read back.

use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::Sha256;
use uuid::Uuid;

use cybernetic::db::tenant;
use cybernetic::domain::tenant::TenantId;

use crate::helpers::{Options, TestApp, expect_json, expect_problem};

/// `v0=<hex>` computed here, independently of the server's code: HMAC-SHA256 over
/// `v0:<timestamp>:<body>` keyed with the secret.
fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("v0:{timestamp}:").as_bytes());
    mac.update(body);
    format!("v0={}", hex::encode(mac.finalize().into_bytes()))
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

struct Source {
    id: String,
    secret: String,
}

async fn create_source(app: &TestApp, token: &str, body: Value) -> Source {
    let created = expect_json(
        app.post("/v1/webhook-sources", token, body).await,
        StatusCode::CREATED,
    )
    .await;
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["url"], format!("/v1/webhooks/{id}"));
    let secret = created["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"), "{created}");
    Source { id, secret }
}

/// Posts `body` to the source's URL with the given signature headers (each left out when `None`).
async fn post_raw(
    app: &TestApp,
    id: &str,
    signature: Option<&str>,
    timestamp: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    let mut req = app
        .client
        .post(app.url(&format!("/v1/webhooks/{id}")))
        .header("content-type", "application/json");
    if let Some(s) = signature {
        req = req.header("x-cybernetic-signature", s);
    }
    if let Some(t) = timestamp {
        req = req.header("x-cybernetic-timestamp", t);
    }
    req.body(body).send().await.unwrap()
}

/// Posts `body` signed with `secret` at `timestamp`.
async fn post_signed(
    app: &TestApp,
    id: &str,
    secret: &str,
    timestamp: i64,
    body: &[u8],
) -> reqwest::Response {
    let signature = sign(secret, timestamp, body);
    post_raw(
        app,
        id,
        Some(&signature),
        Some(&timestamp.to_string()),
        body.to_vec(),
    )
    .await
}

/// The tenant's events whose type matches `topics`, oldest first.
async fn events_of(app: &TestApp, token: &str, topics: &str) -> Vec<Value> {
    let res = app
        .get(
            &format!("/v1/events/history?topics={topics}&limit=200"),
            token,
        )
        .await;
    expect_json(res, StatusCode::OK).await["items"]
        .as_array()
        .unwrap()
        .clone()
}

/// Receipts stored for the tenant, read in its own transaction as the app role.
async fn receipts(app: &TestApp, tenant_id: &str) -> i64 {
    let id = TenantId::from_uuid(tenant_id.parse().unwrap());
    let mut tx = tenant::begin(&app.pool, id).await.unwrap();
    let n = sqlx::query_scalar("select count(*) from webhook_receipts")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    n
}

#[tokio::test]
async fn a_signed_request_becomes_an_event_in_the_tenants_log() {
    let app = TestApp::spawn().await;
    let t = app.tenant("acme").await;
    let source = create_source(&app, &t.admin, json!({"name": "n8n_flow"})).await;
    let body = br#"{"flow": "nightly", "ok": true, "items": [1, 2]}"#;
    let accepted = expect_json(
        post_signed(&app, &source.id, &source.secret, now(), body).await,
        StatusCode::ACCEPTED,
    )
    .await;
    let event_id = accepted["event_id"].as_i64().expect("event_id");
    assert_eq!(accepted.as_object().unwrap().len(), 1, "{accepted}");

    let events = events_of(&app, &t.viewer, "webhook.*").await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["id"], event_id);
    assert_eq!(events[0]["type"], "webhook.n8n_flow");
    assert_eq!(
        events[0]["data"],
        json!({"flow": "nightly", "ok": true, "items": [1, 2]})
    );
    assert_eq!(receipts(&app, &t.id).await, 1);
}

#[tokio::test]
async fn a_wrong_signature_is_refused_and_stores_nothing() {
    let app = TestApp::spawn().await;
    let t = app.tenant("acme").await;
    let source = create_source(&app, &t.admin, json!({"name": "ci"})).await;
    let body = br#"{"build": 7}"#;
    let ts = now();
    let res = post_signed(&app, &source.id, "whsec_not_the_secret", ts, body).await;
    assert_eq!(
        res.headers()["www-authenticate"].to_str().unwrap(),
        "Cybernetic-Signature"
    );
    let problem = expect_problem(res, StatusCode::UNAUTHORIZED, "invalid_signature").await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("does not match"),
        "{problem}"
    );
    // Signed correctly, but the body sent differs from the one signed.
    let signature = sign(&source.secret, ts, body);
    let res = post_raw(
        &app,
        &source.id,
        Some(&signature),
        Some(&ts.to_string()),
        r#"{"build": 8}"#,
    )
    .await;
    expect_problem(res, StatusCode::UNAUTHORIZED, "invalid_signature").await;
    // Signed correctly, but for another timestamp than the one sent.
    let res = post_raw(
        &app,
        &source.id,
        Some(&signature),
        Some(&(ts - 1).to_string()),
        body.to_vec(),
    )
    .await;
    expect_problem(res, StatusCode::UNAUTHORIZED, "invalid_signature").await;

    assert!(events_of(&app, &t.viewer, "webhook.*").await.is_empty());
    assert_eq!(receipts(&app, &t.id).await, 0);
}

#[tokio::test]
async fn missing_or_malformed_signature_headers_are_refused() {
    let app = TestApp::spawn().await;
    let t = app.tenant("acme").await;
    let source = create_source(&app, &t.admin, json!({"name": "ci"})).await;
    let body = br#"{"build": 7}"#;
    let ts = now();
    let good = sign(&source.secret, ts, body);
    let ts_text = ts.to_string();
    let upper = format!("v0={}", good[3..].to_uppercase());
    let outbound = format!("t={ts},v1={}", &good[3..]);
    let cases: [(Option<&str>, Option<&str>, &str); 9] = [
        (None, None, "missing X-Cybernetic-Signature"),
        (None, Some(&ts_text), "missing X-Cybernetic-Signature"),
        (Some(&good), None, "missing X-Cybernetic-Timestamp"),
        (Some(&good), Some("yesterday"), "unix seconds"),
        (Some(&good), Some("-5"), "unix seconds"),
        (Some(&good[3..]), Some(&ts_text), "v0="),
        (Some(&upper), Some(&ts_text), "lowercase hex"),
        (Some(&outbound), Some(&ts_text), "v0="),
        (Some("v0=abc"), Some(&ts_text), "64 lowercase hex"),
    ];
    for (signature, timestamp, detail) in cases {
        let res = post_raw(&app, &source.id, signature, timestamp, body.to_vec()).await;
        let problem = expect_problem(res, StatusCode::UNAUTHORIZED, "invalid_signature").await;
        assert!(
            problem["detail"].as_str().unwrap().contains(detail),
            "{signature:?} {timestamp:?}: {problem}"
        );
    }
    assert!(events_of(&app, &t.viewer, "webhook.*").await.is_empty());
    assert_eq!(receipts(&app, &t.id).await, 0);
}

#[tokio::test]
async fn timestamps_outside_the_five_minute_window_are_refused() {
    let app = TestApp::spawn().await;
    let t = app.tenant("acme").await;
    let source = create_source(&app, &t.admin, json!({"name": "monitor"})).await;
    let body = br#"{"alert": "disk"}"#;
    // Clear of the edge (the exact edge is the unit tests' in src/domain/webhook.rs): the server
    // reads its clock a moment after this test, in whole seconds, so a timestamp 301 s ahead can
    // be 300 s ahead by then, inside the window.
    for ts in [now() - 301, now() - 3600, now() + 310, now() + 86_400] {
        let res = post_signed(&app, &source.id, &source.secret, ts, body).await;
        let problem =
            expect_problem(res, StatusCode::UNAUTHORIZED, "timestamp_out_of_window").await;
        assert!(
            problem["detail"].as_str().unwrap().contains("5 minutes"),
            "{problem}"
        );
    }
    assert!(events_of(&app, &t.viewer, "webhook.*").await.is_empty());
    assert_eq!(receipts(&app, &t.id).await, 0);
    // Inside the window, either way, the same body is accepted.
    for ts in [now() - 240, now() + 240] {
        let res = post_signed(&app, &source.id, &source.secret, ts, body).await;
        expect_json(res, StatusCode::ACCEPTED).await;
    }
    assert_eq!(events_of(&app, &t.viewer, "webhook.*").await.len(), 2);
}

#[tokio::test]
async fn an_exact_repeat_answers_the_original_event_and_stores_nothing() {
    let app = TestApp::spawn().await;
    let t = app.tenant("acme").await;
    let source = create_source(&app, &t.admin, json!({"name": "ci"})).await;
    let body = br#"{"build": 7}"#;
    let ts = now();
    let first = expect_json(
        post_signed(&app, &source.id, &source.secret, ts, body).await,
        StatusCode::ACCEPTED,
    )
    .await;
    for _ in 0..2 {
        let again = expect_json(
            post_signed(&app, &source.id, &source.secret, ts, body).await,
            StatusCode::OK,
        )
        .await;
        assert_eq!(
            again,
            json!({"event_id": first["event_id"], "duplicate": true})
        );
    }
    let events = events_of(&app, &t.viewer, "webhook.*").await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["id"], first["event_id"]);
    assert_eq!(receipts(&app, &t.id).await, 1);

    // Another body, or the same body at another second, is another request.
    let other = expect_json(
        post_signed(&app, &source.id, &source.secret, ts, br#"{"build": 8}"#).await,
        StatusCode::ACCEPTED,
    )
    .await;
    let later = expect_json(
        post_signed(&app, &source.id, &source.secret, ts + 1, body).await,
        StatusCode::ACCEPTED,
    )
    .await;
    assert_ne!(other["event_id"], first["event_id"]);
    assert_ne!(later["event_id"], other["event_id"]);
    assert_eq!(events_of(&app, &t.viewer, "webhook.*").await.len(), 3);
}

#[tokio::test]
async fn concurrent_identical_requests_store_one_event() {
    let app = TestApp::spawn().await;
    let t = app.tenant("acme").await;
    let source = create_source(&app, &t.admin, json!({"name": "ci"})).await;
    let body = br#"{"build": 9}"#;
    let ts = now();
    let answers = futures::future::join_all(
        (0..8).map(|_| post_signed(&app, &source.id, &source.secret, ts, body)),
    )
    .await;
    let mut accepted = 0;
    let mut ids = Vec::new();
    for res in answers {
        let status = res.status();
        let answer: Value = res.json().await.unwrap();
        match status {
            StatusCode::ACCEPTED => accepted += 1,
            StatusCode::OK => assert_eq!(answer["duplicate"], true),
            other => panic!("unexpected {other}: {answer}"),
        }
        ids.push(answer["event_id"].clone());
    }
    assert_eq!(accepted, 1);
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    assert_eq!(events_of(&app, &t.viewer, "webhook.*").await.len(), 1);
}

#[tokio::test]
async fn a_rotated_secret_overlaps_with_the_previous_one_only_as_long_as_asked() {
    let app = TestApp::spawn().await;
    let t = app.tenant("acme").await;
    let first = create_source(&app, &t.admin, json!({"name": "ci"})).await;
    let path = format!("/v1/webhook-sources/{}/rotate", first.id);

    // Without a body: the default overlap of 24 hours.
    let rotated = expect_json(
        app.client
            .post(app.url(&path))
            .bearer_auth(&t.admin)
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    let second = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(second, first.secret);
    let until: chrono::DateTime<chrono::Utc> = rotated["previous_secret_expires_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let hours = (until - chrono::Utc::now()).num_minutes() as f64 / 60.0;
    assert!((23.9..=24.0).contains(&hours), "{rotated}");
    assert!(rotated["rotated_at"].is_string());

    // During the overlap, both secrets verify.
    for (i, secret) in [&first.secret, &second].into_iter().enumerate() {
        let body = format!(r#"{{"n": {i}}}"#);
        let res = post_signed(&app, &first.id, secret, now(), body.as_bytes()).await;
        expect_json(res, StatusCode::ACCEPTED).await;
    }

    // With no overlap, only the newest verifies: neither the one it replaced nor the first.
    let rotated = expect_json(
        app.post(&path, &t.admin, json!({"overlap": "0s"})).await,
        StatusCode::OK,
    )
    .await;
    let third = rotated["secret"].as_str().unwrap().to_owned();
    assert_eq!(rotated["previous_secret_expires_at"], Value::Null);
    for secret in [&first.secret, &second] {
        let res = post_signed(&app, &first.id, secret, now(), br#"{"n": 9}"#).await;
        expect_problem(res, StatusCode::UNAUTHORIZED, "invalid_signature").await;
    }
    let res = post_signed(&app, &first.id, &third, now(), br#"{"n": 9}"#).await;
    expect_json(res, StatusCode::ACCEPTED).await;

    // A short overlap is honoured too.
    let rotated = expect_json(
        app.post(&path, &t.admin, json!({"overlap": "1h"})).await,
        StatusCode::OK,
    )
    .await;
    let fourth = rotated["secret"].as_str().unwrap().to_owned();
    for (i, secret) in [&third, &fourth].into_iter().enumerate() {
        let body = format!(r#"{{"m": {i}}}"#);
        let res = post_signed(&app, &first.id, secret, now(), body.as_bytes()).await;
        expect_json(res, StatusCode::ACCEPTED).await;
    }
    let res = post_signed(&app, &first.id, &second, now(), br#"{"m": 5}"#).await;
    expect_problem(res, StatusCode::UNAUTHORIZED, "invalid_signature").await;

    for (overlap, detail) in [
        (json!("8 days"), "overlap: must be at most 7 days"),
        (json!("soon"), "overlap: must be a duration"),
    ] {
        let res = app.post(&path, &t.admin, json!({"overlap": overlap})).await;
        let problem =
            expect_problem(res, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
        assert!(
            problem["detail"].as_str().unwrap().starts_with(detail),
            "{problem}"
        );
    }
    let res = app
        .post(&path, &t.admin, json!({"overlap": "1h", "secret": "mine"}))
        .await;
    expect_problem(res, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    let res = app
        .client
        .post(app.url(&path))
        .bearer_auth(&t.admin)
        .body("overlap=1h")
        .send()
        .await
        .unwrap();
    expect_problem(
        res,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;
    let res = app
        .post(
            &format!("/v1/webhook-sources/{}/rotate", Uuid::new_v4()),
            &t.admin,
            json!({}),
        )
        .await;
    expect_problem(res, StatusCode::NOT_FOUND, "not_found").await;

    let rotations = events_of(&app, &t.viewer, "webhook_source.rotated").await;
    assert_eq!(rotations.len(), 3);
    assert_eq!(rotations[0]["data"]["id"], first.id.as_str());
    assert_eq!(rotations[0]["data"]["name"], "ci");
}

#[tokio::test]
async fn sources_never_cross_tenants() {
    let app = TestApp::spawn().await;
    let a = app.tenant("alpha").await;
    let b = app.tenant("beta").await;
    let a_source = create_source(&app, &a.admin, json!({"name": "ci"})).await;
    let b_source = create_source(&app, &b.admin, json!({"name": "ci"})).await;
    let a_path = format!("/v1/webhook-sources/{}", a_source.id);

    // B's admin cannot see, change, rotate or delete A's source.
    expect_problem(
        app.get(&a_path, &b.admin).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let res = app
        .send(
            reqwest::Method::PATCH,
            &a_path,
            Some(&b.admin),
            Some(json!({"active": false})),
        )
        .await;
    expect_problem(res, StatusCode::NOT_FOUND, "not_found").await;
    let res = app
        .post(
            &format!("{a_path}/rotate"),
            &b.admin,
            json!({"overlap": "0s"}),
        )
        .await;
    expect_problem(res, StatusCode::NOT_FOUND, "not_found").await;
    expect_problem(
        app.delete(&a_path, &b.admin).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let listed = expect_json(
        app.get("/v1/webhook-sources", &b.admin).await,
        StatusCode::OK,
    )
    .await;
    let ids: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [b_source.id.as_str()]);

    // A's source signed with B's secret fails; A's own secret still works (nothing was rotated).
    let body = br#"{"x": 1}"#;
    let res = post_signed(&app, &a_source.id, &b_source.secret, now(), body).await;
    expect_problem(res, StatusCode::UNAUTHORIZED, "invalid_signature").await;
    let res = post_signed(&app, &a_source.id, &a_source.secret, now(), body).await;
    expect_json(res, StatusCode::ACCEPTED).await;
    assert_eq!(events_of(&app, &a.viewer, "webhook.*").await.len(), 1);
    assert!(events_of(&app, &b.viewer, "webhook.*").await.is_empty());

    // At the database level: row-level security enabled and forced, so inside B's transaction
    // A's rows are invisible and A's id refused.
    for table in ["webhook_sources", "webhook_receipts"] {
        let (enabled, forced): (bool, bool) = sqlx::query_as(
            "select relrowsecurity, relforcerowsecurity from pg_class
              where relname = $1 and relkind = 'r'",
        )
        .bind(table)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        assert!(enabled && forced, "{table}");
    }
    let b_id = TenantId::from_uuid(b.id.parse().unwrap());
    let mut tx = tenant::begin(&app.pool, b_id).await.unwrap();
    for table in ["webhook_sources", "webhook_receipts"] {
        let tenants: Vec<Uuid> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "select distinct tenant_id from {table}"
        )))
        .fetch_all(&mut *tx)
        .await
        .unwrap();
        assert!(
            !tenants.contains(&a.id.parse().unwrap()),
            "{table} leaks across tenants"
        );
    }
    tx.rollback().await.unwrap();
    for sql in [
        "insert into webhook_sources (id, tenant_id, name, secret) values (gen_random_uuid(), $1, 'x', 's')",
        "insert into webhook_receipts (source_id, signature_sha256, tenant_id, expires_at) values ($2, sha256('x'::bytea), $1, now())",
        "update webhook_sources set tenant_id = $1",
    ] {
        let mut tx = tenant::begin(&app.pool, b_id).await.unwrap();
        let err = sqlx::query(sql)
            .bind(Uuid::parse_str(&a.id).unwrap())
            .bind(Uuid::parse_str(&a_source.id).unwrap())
            .execute(&mut *tx)
            .await
            .expect_err(sql);
        let code = err
            .as_database_error()
            .and_then(|e| e.code())
            .map(|c| c.into_owned());
        assert_eq!(code.as_deref(), Some("42501"), "{sql}: {err}");
        tx.rollback().await.unwrap();
    }
    // Outside any tenant, the app role sees no source at all: only the definer function finds one.
    let visible: i64 = sqlx::query_scalar("select count(*) from webhook_sources")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(visible, 0);
}

#[tokio::test]
async fn bodies_that_are_not_json_objects_are_refused() {
    let app = TestApp::spawn().await;
    let t = app.tenant("acme").await;
    let source = create_source(&app, &t.admin, json!({"name": "ci"})).await;
    for (body, code) in [
        (&b"not json"[..], "malformed_json"),
        (b"{\"a\": ", "malformed_json"),
        (b"", "malformed_json"),
        (b"[1, 2]", "bad_request"),
        (b"\"text\"", "bad_request"),
        (b"42", "bad_request"),
        (b"null", "bad_request"),
    ] {
        let res = post_signed(&app, &source.id, &source.secret, now(), body).await;
        expect_problem(res, StatusCode::BAD_REQUEST, code).await;
    }
    // A NUL character cannot be stored: refused before the database sees it.
    let res = post_signed(
        &app,
        &source.id,
        &source.secret,
        now(),
        br#"{"a": "x\u0000y"}"#,
    )
    .await;
    expect_problem(res, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    assert!(events_of(&app, &t.viewer, "webhook.*").await.is_empty());
    assert_eq!(receipts(&app, &t.id).await, 0);
}

#[tokio::test]
async fn an_oversize_body_is_refused_with_413() {
    let app = TestApp::spawn_with(Options::default().env("HTTP_MAX_BODY_BYTES", "4096")).await;
    let t = app.tenant("acme").await;
    let source = create_source(&app, &t.admin, json!({"name": "ci"})).await;
    let big = format!(r#"{{"blob": "{}"}}"#, "x".repeat(5000));
    let res = post_signed(&app, &source.id, &source.secret, now(), big.as_bytes()).await;
    expect_problem(res, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    let fits = format!(r#"{{"blob": "{}"}}"#, "x".repeat(3000));
    let res = post_signed(&app, &source.id, &source.secret, now(), fits.as_bytes()).await;
    expect_json(res, StatusCode::ACCEPTED).await;
    assert_eq!(events_of(&app, &t.viewer, "webhook.*").await.len(), 1);
    assert_eq!(receipts(&app, &t.id).await, 1);
}

#[tokio::test]
async fn unknown_inactive_and_deleted_sources_answer_404() {
    let app = TestApp::spawn().await;
    let t = app.tenant("acme").await;
    let source = create_source(&app, &t.admin, json!({"name": "ci"})).await;
    let body = br#"{"x": 1}"#;
    let unknown = Uuid::new_v4().to_string();
    let res = post_signed(&app, &unknown, &source.secret, now(), body).await;
    expect_problem(res, StatusCode::NOT_FOUND, "not_found").await;
    let res = post_signed(&app, "not-a-uuid", &source.secret, now(), body).await;
    expect_problem(res, StatusCode::BAD_REQUEST, "invalid_path_parameter").await;

    let path = format!("/v1/webhook-sources/{}", source.id);
    let patch = |active: bool| {
        app.send(
            reqwest::Method::PATCH,
            &path,
            Some(&t.admin),
            Some(json!({"active": active})),
        )
    };
    let off = expect_json(patch(false).await, StatusCode::OK).await;
    assert_eq!(off["active"], false);
    let res = post_signed(&app, &source.id, &source.secret, now(), body).await;
    expect_problem(res, StatusCode::NOT_FOUND, "not_found").await;
    assert!(events_of(&app, &t.viewer, "webhook.*").await.is_empty());

    expect_json(patch(true).await, StatusCode::OK).await;
    let res = post_signed(&app, &source.id, &source.secret, now(), body).await;
    expect_json(res, StatusCode::ACCEPTED).await;

    let res = app.delete(&path, &t.admin).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let res = post_signed(&app, &source.id, &source.secret, now(), br#"{"x": 2}"#).await;
    expect_problem(res, StatusCode::NOT_FOUND, "not_found").await;
    assert_eq!(events_of(&app, &t.viewer, "webhook.*").await.len(), 1);
    assert_eq!(
        receipts(&app, &t.id).await,
        0,
        "receipts go with their source"
    );
}

#[tokio::test]
async fn the_episode_target_records_an_episode_and_enqueues_its_analysis() {
    let app = TestApp::spawn().await;
    let t = app.tenant("acme").await;
    let source = create_source(
        &app,
        &t.admin,
        json!({"name": "postmortems", "target": "episode"}),
    )
    .await;
    let body = br#"{"title": "Deploy failed", "content": "The canary stalled at 40%.", "run": 12}"#;
    let ts = now();
    let accepted = expect_json(
        post_signed(&app, &source.id, &source.secret, ts, body).await,
        StatusCode::ACCEPTED,
    )
    .await;
    let id = accepted["episode_id"]
        .as_str()
        .expect("episode_id")
        .to_owned();
    let episode = expect_json(
        app.get(&format!("/v1/episodes/{id}"), &t.viewer).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(episode["title"], "Deploy failed");
    assert_eq!(episode["content"], "The canary stalled at 40%.");

    let jobs = expect_json(
        app.get("/v1/jobs?kind=episode_analysis", &t.viewer).await,
        StatusCode::OK,
    )
    .await;
    let jobs = jobs["items"].as_array().unwrap();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0]["args"], json!({"episode_id": id}));
    let created = events_of(&app, &t.viewer, "episode.created").await;
    assert_eq!(created.len(), 1);
    assert_eq!(created[0]["data"]["id"], id.as_str());
    assert!(events_of(&app, &t.viewer, "webhook.*").await.is_empty());

    // A repeat answers the same episode and records nothing more.
    let again = expect_json(
        post_signed(&app, &source.id, &source.secret, ts, body).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(again, json!({"episode_id": id, "duplicate": true}));

    // Without title and content: a title naming the source, the body pretty-printed.
    let accepted = expect_json(
        post_signed(
            &app,
            &source.id,
            &source.secret,
            now(),
            br#"{"alert": "disk full"}"#,
        )
        .await,
        StatusCode::ACCEPTED,
    )
    .await;
    let episode = expect_json(
        app.get(
            &format!("/v1/episodes/{}", accepted["episode_id"].as_str().unwrap()),
            &t.viewer,
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(episode["title"], "webhook postmortems");
    assert_eq!(episode["content"], "{\n  \"alert\": \"disk full\"\n}");
    let listed = expect_json(app.get("/v1/episodes", &t.viewer).await, StatusCode::OK).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 2);
    let jobs = expect_json(
        app.get("/v1/jobs?kind=episode_analysis", &t.viewer).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(jobs["items"].as_array().unwrap().len(), 2);

    // A title that is not a string is refused, and nothing is recorded.
    let res = post_signed(&app, &source.id, &source.secret, now(), br#"{"title": 5}"#).await;
    let problem = expect_problem(res, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    assert_eq!(problem["detail"], "title: must be a string");
    let listed = expect_json(app.get("/v1/episodes", &t.viewer).await, StatusCode::OK).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn sources_are_managed_by_admins_and_their_secret_is_never_read_back() {
    let app = TestApp::spawn().await;
    let t = app.tenant("acme").await;
    let mut secrets = Vec::new();
    let mut ids = Vec::new();
    for name in ["a", "b", "c"] {
        let s = create_source(&app, &t.admin, json!({"name": name})).await;
        secrets.push(s.secret);
        ids.push(s.id);
    }
    let first = format!("/v1/webhook-sources/{}", ids[0]);
    let rotated = expect_json(
        app.post(
            &format!("{first}/rotate"),
            &t.admin,
            json!({"overlap": "1h"}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    secrets.push(rotated["secret"].as_str().unwrap().to_owned());

    // Listed newest first, paginated.
    let mut listed = Vec::new();
    let mut path = "/v1/webhook-sources?limit=2".to_owned();
    let mut reads = Vec::new();
    loop {
        let page = expect_json(app.get(&path, &t.admin).await, StatusCode::OK).await;
        reads.push(page.to_string());
        for s in page["items"].as_array().unwrap() {
            assert!(s.get("secret").is_none(), "{s}");
            listed.push(s["id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/v1/webhook-sources?limit=2&cursor={c}"),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(listed, ids);
    ids.reverse();
    let one = expect_json(app.get(&first, &t.admin).await, StatusCode::OK).await;
    assert_eq!(one["name"], "a");
    assert_eq!(one["target"], "event");
    assert_eq!(one["active"], true);
    assert!(one["previous_secret_expires_at"].is_string());
    reads.push(one.to_string());
    let renamed = expect_json(
        app.send(
            reqwest::Method::PATCH,
            &first,
            Some(&t.admin),
            Some(json!({"name": "a2"})),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(renamed["name"], "a2");
    reads.push(renamed.to_string());
    let res = app
        .send(
            reqwest::Method::PATCH,
            &first,
            Some(&t.admin),
            Some(json!({"name": "b"})),
        )
        .await;
    let problem = expect_problem(res, StatusCode::CONFLICT, "conflict").await;
    assert_eq!(
        problem["detail"],
        "a webhook source with this name already exists"
    );
    let res = app
        .post("/v1/webhook-sources", &t.admin, json!({"name": "b"}))
        .await;
    expect_problem(res, StatusCode::CONFLICT, "conflict").await;
    for bad in [
        json!({"name": "Has-Caps"}),
        json!({"name": "x".repeat(65)}),
        json!({"name": ""}),
        json!({"name": "ok", "target": "job"}),
        json!({"name": "ok", "secret": "mine"}),
        json!({}),
    ] {
        let res = app.post("/v1/webhook-sources", &t.admin, bad.clone()).await;
        expect_problem(res, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    }
    let res = app
        .delete(&format!("/v1/webhook-sources/{}", ids[2]), &t.admin)
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let res = app
        .delete(&format!("/v1/webhook-sources/{}", ids[2]), &t.admin)
        .await;
    expect_problem(res, StatusCode::NOT_FOUND, "not_found").await;

    // Every admin write appended its event; none carries a secret.
    let events = events_of(&app, &t.viewer, "webhook_source.*").await;
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "webhook_source.created",
            "webhook_source.created",
            "webhook_source.created",
            "webhook_source.rotated",
            "webhook_source.updated",
            "webhook_source.deleted",
        ]
    );
    assert_eq!(events[5]["data"], json!({"id": ids[2], "name": "c"}));
    let all = expect_json(
        app.get("/v1/events/history?limit=200", &t.viewer).await,
        StatusCode::OK,
    )
    .await;
    reads.push(all.to_string());
    for secret in &secrets {
        for read in &reads {
            assert!(!read.contains(secret.as_str()), "secret leaked: {read}");
        }
    }

    // Operators and viewers manage nothing.
    for token in [&t.operator, &t.viewer] {
        let attempts = [
            app.post("/v1/webhook-sources", token, json!({"name": "z"}))
                .await,
            app.get("/v1/webhook-sources", token).await,
            app.get(&first, token).await,
            app.send(
                reqwest::Method::PATCH,
                &first,
                Some(token),
                Some(json!({"active": false})),
            )
            .await,
            app.post(&format!("{first}/rotate"), token, json!({})).await,
            app.delete(&first, token).await,
        ];
        for res in attempts {
            expect_problem(res, StatusCode::FORBIDDEN, "forbidden").await;
        }
    }
    let one = expect_json(app.get(&first, &t.admin).await, StatusCode::OK).await;
    assert_eq!(one["active"], true);
}

#[tokio::test]
async fn requests_are_counted_by_outcome_never_by_source() {
    let app = TestApp::spawn().await;
    let t = app.tenant("acme").await;
    let source = create_source(&app, &t.admin, json!({"name": "ci"})).await;
    let body = br#"{"x": 1}"#;
    let ts = now();
    post_signed(&app, &source.id, &source.secret, ts, body).await;
    post_signed(&app, &source.id, &source.secret, ts, body).await;
    post_signed(&app, &source.id, "whsec_wrong", ts, body).await;
    post_signed(&app, &source.id, &source.secret, ts - 600, body).await;
    post_signed(&app, &Uuid::new_v4().to_string(), &source.secret, ts, body).await;
    post_raw(&app, &source.id, None, None, body.to_vec()).await;
    post_signed(&app, &source.id, &source.secret, ts, b"[]").await;

    let text = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "# HELP webhook_requests_total ",
        r#"webhook_requests_total{outcome="accepted"} 1"#,
        r#"webhook_requests_total{outcome="duplicate"} 1"#,
        r#"webhook_requests_total{outcome="bad_signature"} 1"#,
        r#"webhook_requests_total{outcome="expired"} 1"#,
        r#"webhook_requests_total{outcome="unknown_source"} 1"#,
        r#"webhook_requests_total{outcome="malformed"} 2"#,
        r#"http_requests_total{method="POST",route="/v1/webhooks/{source}",status="202"} 1"#,
    ] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
    assert!(
        !text.contains(&source.id),
        "source ids must never become labels"
    );
}

#[tokio::test]
async fn receipts_whose_window_has_passed_are_pruned_by_later_requests() {
    let app = TestApp::spawn().await;
    let t = app.tenant("acme").await;
    let source = create_source(&app, &t.admin, json!({"name": "ci"})).await;
    let tenant_id = TenantId::from_uuid(t.id.parse().unwrap());
    let mut tx = tenant::begin(&app.pool, tenant_id).await.unwrap();
    for (i, age) in ["1 minute", "1 hour", "-1 minute"].into_iter().enumerate() {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "insert into webhook_receipts (source_id, signature_sha256, tenant_id, event_position, expires_at)
             values ($1, sha256($2), $3, 1, now() - interval '{age}')"
        )))
        .bind(Uuid::parse_str(&source.id).unwrap())
        .bind(vec![i as u8])
        .bind(tenant_id.as_uuid())
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    assert_eq!(receipts(&app, &t.id).await, 3);

    let res = post_signed(&app, &source.id, &source.secret, now(), br#"{"x": 1}"#).await;
    expect_json(res, StatusCode::ACCEPTED).await;
    // The two expired receipts are gone; the unexpired one and the new one remain.
    assert_eq!(receipts(&app, &t.id).await, 2);
}
