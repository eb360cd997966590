//! Episodes and policies through the API: create, read, page, replace, delete.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{TestApp, expect_json, expect_problem};

#[tokio::test]
async fn episodes_are_recorded_listed_newest_first_and_read_back() {
    let app = TestApp::spawn().await;
    let t = app.tenant("acme").await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let e = expect_json(
            app.post(
                "/v1/episodes",
                &t.operator,
                json!({"title": format!("E{i}"), "content": "text"}),
            )
            .await,
            StatusCode::CREATED,
        )
        .await;
        assert!(e["analysis"].is_null());
        ids.push(e["id"].as_str().unwrap().to_owned());
    }
    let mut listed = Vec::new();
    let mut path = "/v1/episodes?limit=3".to_owned();
    loop {
        let page = expect_json(app.get(&path, &t.viewer).await, StatusCode::OK).await;
        listed.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/v1/episodes?limit=3&cursor={c}"),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(listed, ids);
    let one = expect_json(
        app.get(&format!("/v1/episodes/{}", ids[0]), &t.viewer)
            .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(one["title"], "E6");
    expect_problem(
        app.get(&format!("/v1/episodes/{}", uuid::Uuid::new_v4()), &t.viewer)
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let long = "x".repeat(100_001);
    expect_problem(
        app.post(
            "/v1/episodes",
            &t.operator,
            json!({"title": "t", "content": long}),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
    expect_problem(
        app.post(
            "/v1/episodes",
            &t.operator,
            json!({"title": " ", "content": "c"}),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
}

#[tokio::test]
async fn policies_are_validated_versioned_and_unique_by_name() {
    let app = TestApp::spawn().await;
    let t = app.tenant("acme").await;
    let rules = json!([
        {"system": 1, "path": "/throughput", "op": "lt", "threshold": 10, "severity": "critical", "message": "S1 starving"},
        {"system": 3, "path": "/audit", "op": "absent"}
    ]);
    let p = expect_json(
        app.post(
            "/v1/policies",
            &t.admin,
            json!({"name": "ops", "rules": rules}),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(
        (p["version"].clone(), p["active"].clone()),
        (json!(1), json!(true))
    );
    assert_eq!(
        p["rules"][1]["severity"], "warning",
        "defaults are filled in"
    );
    let id = p["id"].as_str().unwrap();

    expect_problem(
        app.post(
            "/v1/policies",
            &t.admin,
            json!({"name": "ops", "rules": rules}),
        )
        .await,
        StatusCode::CONFLICT,
        "conflict",
    )
    .await;

    let bad_rules = [
        json!({"not": "an array"}),
        json!([{"system": 9, "path": "/x", "op": "exists"}]),
        json!([{"system": 1, "path": "/x", "op": "gt", "threshold": "high"}]),
        json!([{"system": 1, "path": "no-slash", "op": "exists"}]),
        json!([{"system": 1, "path": "/x", "op": "exists", "surprise": 1}]),
    ];
    for rules in bad_rules {
        let res = app
            .post(
                "/v1/policies",
                &t.admin,
                json!({"name": "bad", "rules": rules}),
            )
            .await;
        expect_problem(res, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    }

    // A full replacement must say whether the policy is active.
    let res = app
        .put(
            &format!("/v1/policies/{id}"),
            &t.admin,
            json!({"name": "ops", "rules": rules}),
        )
        .await;
    expect_problem(res, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;

    let replaced = expect_json(
        app.put(
            &format!("/v1/policies/{id}"),
            &t.admin,
            json!({"name": "ops-v2", "rules": rules, "active": false}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        (
            replaced["version"].clone(),
            replaced["active"].clone(),
            replaced["name"].clone()
        ),
        (json!(2), json!(false), json!("ops-v2"))
    );
    assert_eq!(replaced["created_at"], p["created_at"]);
    let read = expect_json(
        app.get(&format!("/v1/policies/{id}"), &t.viewer).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(read, replaced);

    assert_eq!(
        app.delete(&format!("/v1/policies/{id}"), &t.admin)
            .await
            .status(),
        StatusCode::NO_CONTENT
    );
    expect_problem(
        app.get(&format!("/v1/policies/{id}"), &t.viewer).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    expect_problem(
        app.delete(&format!("/v1/policies/{id}"), &t.admin).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
}
