//! DATABASE_REPLICA_URL: history and list reads go to the replica, and fall back to the primary
//! while it is unreachable. The "replica" here is the same database behind a proxy the test can
//! cut, which is what the server sees when a real replica goes away.

use std::sync::atomic::Ordering;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{DbProxy, Options, TestApp, eventually, expect_json, fresh_database};

#[tokio::test]
async fn reads_use_the_replica_and_fall_back_to_the_primary_while_it_is_down() {
    let db = fresh_database().await;
    let replica = DbProxy::start().await;
    let app = TestApp::spawn_with(
        Options {
            db_name: Some(db.clone()),
            ..Default::default()
        }
        .env("DATABASE_REPLICA_URL", &replica.app_url(&db)),
    )
    .await;
    let t = app.tenant("acme").await;
    expect_json(
        app.put(
            "/v1/systems/1/state",
            &t.operator,
            json!({"state": {"n": 1}}),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(
        replica.accepted.load(Ordering::SeqCst),
        0,
        "writes and auth never touch the replica"
    );

    let history = expect_json(
        app.get("/v1/systems/1/history", &t.viewer).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(history["items"][0]["state"]["n"], 1);
    assert!(
        replica.accepted.load(Ordering::SeqCst) > 0,
        "the history read went to the replica"
    );

    replica.cut();
    for path in [
        "/v1/systems/1/history",
        "/v1/systems",
        "/v1/episodes",
        "/v1/policies",
        "/v1/api-keys",
    ] {
        let key = if path == "/v1/api-keys" {
            &t.admin
        } else {
            &t.viewer
        };
        expect_json(app.get(path, key).await, StatusCode::OK).await;
    }
    expect_json(
        app.get("/v1/tenants", &app.admin_token).await,
        StatusCode::OK,
    )
    .await;
    expect_json(
        app.put(
            "/v1/systems/1/state",
            &t.operator,
            json!({"state": {"n": 2}}),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    let history = expect_json(
        app.get("/v1/systems/1/history", &t.viewer).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        history["items"][0]["state"]["n"], 2,
        "served by the primary while the replica is down"
    );

    let before = replica.accepted.load(Ordering::SeqCst);
    replica.restore().await;
    eventually(
        Duration::from_secs(20),
        "reads to return to the replica",
        || async {
            expect_json(
                app.get("/v1/systems/1/history", &t.viewer).await,
                StatusCode::OK,
            )
            .await;
            replica.accepted.load(Ordering::SeqCst) > before
        },
    )
    .await;
}
