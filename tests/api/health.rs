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
        ready_status(&app).await == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    let body = expect_json(ready(&app).await, StatusCode::SERVICE_UNAVAILABLE).await;
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
        ready_status(&app).await == StatusCode::OK
    })
    .await;
    expect_json(app.get("/v1/systems", &t.viewer).await, StatusCode::OK).await;
}

async fn ready(app: &TestApp) -> reqwest::Response {
    app.client
        .get(app.url("/health/ready"))
        .send()
        .await
        .unwrap()
}

async fn ready_status(app: &TestApp) -> StatusCode {
    ready(app).await.status()
}

/// A state write that is in flight: it waits on the version lock of `system`, which the returned
/// transaction holds until the test ends or rolls it back.
async fn write_held_in_flight(
    app: &TestApp,
    t: &crate::helpers::Tenant,
    system: i16,
) -> (
    cybernetic::db::tenant::Tx,
    tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>,
) {
    let tenant = cybernetic::domain::tenant::TenantId::from_uuid(t.id.parse().unwrap());
    let mut blocker = cybernetic::db::tenant::begin(&app.pool, tenant)
        .await
        .unwrap();
    sqlx::query("select pg_advisory_xact_lock($1, hashtext($2::text || ':' || $3::text))")
        .bind(cybernetic::db::system_states::VERSION_LOCK_CLASS)
        .bind(tenant.as_uuid())
        .bind(system)
        .execute(&mut *blocker)
        .await
        .unwrap();
    let request = app
        .client
        .put(app.url(&format!("/v1/systems/{system}/state")))
        .bearer_auth(&t.operator)
        .json(&json!({"state": {"x": 1}}));
    let in_flight = tokio::spawn(request.send());
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
    (blocker, in_flight)
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
    let (blocker, in_flight) = write_held_in_flight(&app, &t, 1).await;

    app.shutdown.cancel();
    let body = expect_json(ready(&app).await, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(body["checks"]["shutdown"]["status"], "fail", "{body}");

    // Drain phase: the listener is closed (new connections refused) while the write is still
    // held; only then is it let through, and it must still complete.
    eventually(Duration::from_secs(10), "the listener to close", || async {
        tokio::net::TcpStream::connect(app.addr).await.is_err()
    })
    .await;
    assert!(
        !in_flight.is_finished(),
        "the held write is still in flight during the drain"
    );
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
    let (blocker, stuck) = write_held_in_flight(&app, &t, 2).await;
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
