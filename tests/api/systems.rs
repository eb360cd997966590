//! System states: versions, latest, history pages, and the event each write appends.

use std::collections::HashSet;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestApp, expect_json, expect_problem};

#[tokio::test]
async fn states_are_versioned_and_the_latest_is_served() {
    let app = TestApp::spawn().await;
    let t = app.tenant("acme").await;
    for (n, load) in [(1, 0.1), (2, 0.2), (3, 0.3)] {
        let body = expect_json(
            app.put(
                "/v1/systems/s3/state",
                &t.operator,
                json!({"state": {"load": load}}),
            )
            .await,
            StatusCode::CREATED,
        )
        .await;
        assert_eq!(body["version"], n);
        assert_eq!(body["system"], 3);
        assert_eq!(body["state"]["load"], load);
    }
    let latest = expect_json(
        app.get("/v1/systems/3/state", &t.viewer).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        (latest["version"].clone(), latest["state"]["load"].clone()),
        (json!(3), json!(0.3))
    );
    let all = expect_json(app.get("/v1/systems", &t.viewer).await, StatusCode::OK).await;
    let items = all["items"].as_array().unwrap();
    assert_eq!(items.len(), 5);
    assert_eq!(items[2]["version"], 3);
    assert!(items[0]["version"].is_null() && items[0]["state"].is_null());
    expect_problem(
        app.get("/v1/systems/1/state", &t.viewer).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
}

#[tokio::test]
async fn concurrent_writers_get_distinct_gap_free_versions() {
    let app = TestApp::spawn().await;
    let t = app.tenant("acme").await;
    let writes = (0..20).map(|i| {
        let app = &app;
        let key = t.operator.clone();
        async move {
            expect_json(
                app.put("/v1/systems/2/state", &key, json!({"state": {"i": i}}))
                    .await,
                StatusCode::CREATED,
            )
            .await
        }
    });
    let results = futures::future::join_all(writes).await;
    let versions: HashSet<i64> = results
        .iter()
        .map(|r| r["version"].as_i64().unwrap())
        .collect();
    assert_eq!(versions, (1..=20).collect());
}

#[tokio::test]
async fn history_pages_have_no_gap_and_no_duplicate() {
    let app = TestApp::spawn().await;
    let t = app.tenant("acme").await;
    for i in 1..=23 {
        expect_json(
            app.put(
                "/v1/systems/1/state",
                &t.operator,
                json!({"state": {"i": i}}),
            )
            .await,
            StatusCode::CREATED,
        )
        .await;
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/systems/1/history?limit=5&cursor={c}"),
            None => "/v1/systems/1/history?limit=5".to_owned(),
        };
        // A write between pages must not shift what the next page returns.
        if pages == 1 {
            expect_json(
                app.put(
                    "/v1/systems/1/state",
                    &t.operator,
                    json!({"state": {"i": 24}}),
                )
                .await,
                StatusCode::CREATED,
            )
            .await;
        }
        let page = expect_json(app.get(&path, &t.viewer).await, StatusCode::OK).await;
        pages += 1;
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["version"].as_i64().unwrap()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, (1..=23).rev().collect::<Vec<_>>());
    assert_eq!(pages, 5);
}

#[tokio::test]
async fn history_filters_by_time_window() {
    let app = TestApp::spawn().await;
    let t = app.tenant("acme").await;
    let mut times = Vec::new();
    for i in 1..=4 {
        let s = expect_json(
            app.put(
                "/v1/systems/4/state",
                &t.operator,
                json!({"state": {"i": i}}),
            )
            .await,
            StatusCode::CREATED,
        )
        .await;
        times.push(s["recorded_at"].as_str().unwrap().to_owned());
    }
    let since = urlencode(&times[1]);
    let until = urlencode(&times[3]);
    let page = expect_json(
        app.get(
            &format!("/v1/systems/4/history?since={since}&until={until}"),
            &t.viewer,
        )
        .await,
        StatusCode::OK,
    )
    .await;
    let versions: Vec<_> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["version"].as_i64().unwrap())
        .collect();
    assert_eq!(versions, [3, 2]);
}

#[tokio::test]
async fn every_write_appends_its_event_in_the_same_transaction() {
    let app = TestApp::spawn().await;
    let t = app.tenant("acme").await;
    expect_json(
        app.put(
            "/v1/systems/5/state",
            &t.operator,
            json!({"state": {"mode": "steady"}}),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    let episode = expect_json(
        app.post(
            "/v1/episodes",
            &t.operator,
            json!({"title": "Audit", "content": "All fine"}),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    let rules = json!([{"system": 5, "path": "/mode", "op": "ne", "threshold": "steady", "severity": "critical"}]);
    let policy = expect_json(
        app.post(
            "/v1/policies",
            &t.admin,
            json!({"name": "steady", "rules": rules}),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    let pid = policy["id"].as_str().unwrap();
    expect_json(
        app.put(
            &format!("/v1/policies/{pid}"),
            &t.admin,
            json!({"name": "steady", "rules": rules, "active": false}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        app.delete(&format!("/v1/policies/{pid}"), &t.admin)
            .await
            .status(),
        StatusCode::NO_CONTENT
    );

    let tenant = cybernetic::domain::tenant::TenantId::from_uuid(t.id.parse().unwrap());
    let mut tx = cybernetic::db::tenant::begin(&app.pool, tenant)
        .await
        .unwrap();
    let events: Vec<(i64, String, Value)> =
        sqlx::query_as("select id, type, data from events order by id")
            .fetch_all(&mut *tx)
            .await
            .unwrap();
    tx.rollback().await.unwrap();
    let types: Vec<_> = events.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(
        types,
        [
            "system.state",
            "episode.created",
            "policy.created",
            "policy.updated",
            "policy.deleted"
        ]
    );
    assert_eq!(events[0].2["state"]["mode"], "steady");
    assert_eq!(events[0].2["version"], 1);
    assert_eq!(events[1].2["id"], episode["id"]);
    assert_eq!(events[3].2["version"], 2);
    assert_eq!(events[3].2["active"], false);
    assert_eq!(events[4].2["id"], policy["id"]);
    assert!(events.windows(2).all(|w| w[0].0 < w[1].0));
}

fn urlencode(s: &str) -> String {
    s.replace(':', "%3A").replace('+', "%2B")
}
