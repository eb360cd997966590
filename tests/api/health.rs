//! Health, readiness and graceful shutdown.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{DbProxy, Options, TestApp, eventually, expect_json, fresh_database};

/// Advisory-lock waiters in this test's database only (tests run in parallel on one cluster).
const WAITING_ON_ADVISORY_LOCK: &str = "select count(*) from pg_locks
    where locktype = 'advisory' and not granted
      and database = (select oid from pg_database where datname = current_database())";

#[tokio::test]
async fn health_and_liveness_answer_ok() {
    let app = TestApp::spawn().await;
    for path in ["/health", "/health/live", "/health/ready"] {
        let body = expect_json(
            app.client.get(app.url(path)).send().await.unwrap(),
            StatusCode::OK,
        )
        .await;
        assert_eq!(body["status"], "ok", "{path}");
    }
}

#[tokio::test]
async fn readiness_fails_while_the_database_is_unreachable_and_recovers() {
    let db = fresh_database().await;
    let proxy = DbProxy::start().await;
    let app = TestApp::spawn_with(
        Options {
            db_name: Some(db.clone()),
            ..Default::default()
        }
        .env("DATABASE_URL", &proxy.app_url(&db)),
    )
    .await;
    let t = app.tenant("acme").await;
    expect_json(app.get("/v1/systems", &t.viewer).await, StatusCode::OK).await;

    proxy.cut();
    eventually(Duration::from_secs(15), "readiness to fail", || async {
        let res = app
            .client
            .get(app.url("/health/ready"))
            .send()
            .await
            .unwrap();
        res.status() == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    let res = app
        .client
        .get(app.url("/health/ready"))
        .send()
        .await
        .unwrap();
    let body = expect_json(res, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(body["checks"]["database"]["status"], "fail", "{body}");
    assert_eq!(body["checks"]["shutdown"]["status"], "ok", "{body}");
    // Liveness does not depend on the database.
    expect_json(
        app.client
            .get(app.url("/health/live"))
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    // An API call while the database is down is a clean 503 problem, not a hang or a 500.
    let res = app.get("/v1/systems", &t.viewer).await;
    assert_eq!(res.headers()["retry-after"], "1");
    crate::helpers::expect_problem(res, StatusCode::SERVICE_UNAVAILABLE, "unavailable").await;

    proxy.restore().await;
    eventually(Duration::from_secs(15), "readiness to recover", || async {
        let res = app
            .client
            .get(app.url("/health/ready"))
            .send()
            .await
            .unwrap();
        res.status() == StatusCode::OK
    })
    .await;
    expect_json(app.get("/v1/systems", &t.viewer).await, StatusCode::OK).await;
}

#[tokio::test]
async fn shutdown_fails_readiness_first_then_drains_in_flight_requests() {
    let mut app = TestApp::spawn_with(
        Options::default()
            .env("SHUTDOWN_READINESS_DELAY", "1500ms")
            .env("SHUTDOWN_TIMEOUT", "20s"),
    )
    .await;
    let t = app.tenant("acme").await;
    let tenant = cybernetic::domain::tenant::TenantId::from_uuid(t.id.parse().unwrap());

    // Hold the version lock of system 1 so the next write is in flight while shutdown begins.
    let mut blocker = cybernetic::db::tenant::begin(&app.pool, tenant)
        .await
        .unwrap();
    sqlx::query("select pg_advisory_xact_lock(22099, hashtext($1::text || ':' || '1'))")
        .bind(tenant.as_uuid())
        .execute(&mut *blocker)
        .await
        .unwrap();
    let in_flight = {
        let client = app.client.clone();
        let url = app.url("/v1/systems/1/state");
        let key = t.operator.clone();
        tokio::spawn(async move {
            client
                .put(url)
                .bearer_auth(key)
                .json(&json!({"state": {"x": 1}}))
                .send()
                .await
        })
    };
    eventually(
        Duration::from_secs(10),
        "the write to wait on the lock",
        || async {
            let waiting: i64 = sqlx::query_scalar(WAITING_ON_ADVISORY_LOCK)
                .fetch_one(&app.pool)
                .await
                .unwrap();
            waiting == 1
        },
    )
    .await;

    app.shutdown.cancel();
    let res = app
        .client
        .get(app.url("/health/ready"))
        .send()
        .await
        .unwrap();
    let body = expect_json(res, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(body["checks"]["shutdown"]["status"], "fail", "{body}");

    blocker.rollback().await.unwrap();
    let res = in_flight
        .await
        .unwrap()
        .expect("in-flight request completes");
    assert_eq!(res.status(), StatusCode::CREATED);
    app.stop().await.unwrap();
    assert!(
        app.client.get(app.url("/health")).send().await.is_err(),
        "listener closed after drain"
    );
}

#[tokio::test]
async fn drain_is_bounded_by_the_shutdown_timeout() {
    let mut app = TestApp::spawn_with(Options::default().env("SHUTDOWN_TIMEOUT", "500ms")).await;
    let t = app.tenant("acme").await;
    let tenant = cybernetic::domain::tenant::TenantId::from_uuid(t.id.parse().unwrap());
    let mut blocker = cybernetic::db::tenant::begin(&app.pool, tenant)
        .await
        .unwrap();
    sqlx::query("select pg_advisory_xact_lock(22099, hashtext($1::text || ':' || '2'))")
        .bind(tenant.as_uuid())
        .execute(&mut *blocker)
        .await
        .unwrap();
    let stuck = {
        let client = app.client.clone();
        let url = app.url("/v1/systems/2/state");
        let key = t.operator.clone();
        tokio::spawn(async move {
            client
                .put(url)
                .bearer_auth(key)
                .json(&json!({"state": {}}))
                .send()
                .await
        })
    };
    eventually(
        Duration::from_secs(10),
        "the write to wait on the lock",
        || async {
            let waiting: i64 = sqlx::query_scalar(WAITING_ON_ADVISORY_LOCK)
                .fetch_one(&app.pool)
                .await
                .unwrap();
            waiting == 1
        },
    )
    .await;
    let started = tokio::time::Instant::now();
    app.stop().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "drain took {:?}",
        started.elapsed()
    );
    assert!(
        stuck.await.unwrap().is_err(),
        "the stuck request was cut at the drain deadline"
    );
    blocker.rollback().await.unwrap();
}
