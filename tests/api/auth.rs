//! Authentication and authorisation: bearer keys, roles, revocation, the platform admin token.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::{TestApp, expect_json, expect_problem};

#[tokio::test]
async fn missing_malformed_and_unknown_credentials_are_401() {
    let app = TestApp::spawn().await;
    let res = app.send(Method::GET, "/v1/systems", None, None).await;
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    expect_problem(res, StatusCode::UNAUTHORIZED, "unauthorized").await;

    for header in [
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer ",
        "cyb_only_a_token",
        "Bearer cyb_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "Bearer not-a-key-at-all",
    ] {
        let res = app
            .client
            .get(app.url("/v1/systems"))
            .header("authorization", header)
            .send()
            .await
            .unwrap();
        expect_problem(res, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
}

#[tokio::test]
async fn a_revoked_key_stops_working_at_once() {
    let app = TestApp::spawn().await;
    let t = app.tenant("acme").await;
    expect_json(app.get("/v1/systems", &t.viewer).await, StatusCode::OK).await;
    let keys = expect_json(app.get("/v1/api-keys", &t.admin).await, StatusCode::OK).await;
    let viewer = keys["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["role"] == "viewer")
        .unwrap();
    assert!(t.viewer.starts_with(viewer["prefix"].as_str().unwrap()));
    assert!(
        viewer["last_used_at"].is_string(),
        "last use is recorded: {viewer}"
    );
    assert!(
        keys.to_string().find(&t.viewer).is_none(),
        "list must never show a secret"
    );

    let res = app
        .delete(
            &format!("/v1/api-keys/{}", viewer["id"].as_str().unwrap()),
            &t.admin,
        )
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    expect_problem(
        app.get("/v1/systems", &t.viewer).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
    // Revoking again is idempotent; an unknown id is 404.
    let res = app
        .delete(
            &format!("/v1/api-keys/{}", viewer["id"].as_str().unwrap()),
            &t.admin,
        )
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    expect_problem(
        app.delete(&format!("/v1/api-keys/{}", uuid::Uuid::new_v4()), &t.admin)
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
}

#[tokio::test]
async fn roles_gate_what_a_key_may_do() {
    let app = TestApp::spawn().await;
    let t = app.tenant("acme").await;
    let state = json!({"state": {"ok": true}});
    let policy = json!({"name": "p", "rules": [{"system": 1, "path": "/ok", "op": "eq", "threshold": true}]});
    let forbidden = [
        (
            Method::PUT,
            "/v1/systems/1/state",
            &t.viewer,
            Some(state.clone()),
        ),
        (
            Method::POST,
            "/v1/episodes",
            &t.viewer,
            Some(json!({"title": "t", "content": "c"})),
        ),
        (
            Method::POST,
            "/v1/policies",
            &t.operator,
            Some(policy.clone()),
        ),
        (Method::GET, "/v1/api-keys", &t.operator, None),
        (
            Method::POST,
            "/v1/api-keys",
            &t.operator,
            Some(json!({"name": "x", "role": "viewer"})),
        ),
        (Method::GET, "/v1/tenants", &t.admin, None),
        (
            Method::POST,
            "/v1/tenants",
            &t.admin,
            Some(json!({"name": "x", "slug": "x"})),
        ),
    ];
    for (method, path, key, body) in forbidden {
        let res = app.send(method.clone(), path, Some(key), body).await;
        expect_problem(res, StatusCode::FORBIDDEN, "forbidden").await;
    }
    // The platform admin token is not a tenant key.
    expect_problem(
        app.get("/v1/systems", &app.admin_token).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    expect_problem(
        app.get("/v1/tenants", "wrong-admin-token-wrong-admin-token")
            .await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;

    expect_json(
        app.put("/v1/systems/1/state", &t.operator, state).await,
        StatusCode::CREATED,
    )
    .await;
    expect_json(
        app.post("/v1/policies", &t.admin, policy).await,
        StatusCode::CREATED,
    )
    .await;
    expect_json(app.get("/v1/policies", &t.viewer).await, StatusCode::OK).await;
    let issued = expect_json(
        app.post(
            "/v1/api-keys",
            &t.admin,
            json!({"name": "ci", "role": "operator"}),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(issued["role"], "operator");
    let key = issued["key"].as_str().unwrap();
    expect_json(
        app.put("/v1/systems/2/state", key, json!({"state": {}}))
            .await,
        StatusCode::CREATED,
    )
    .await;
}

#[tokio::test]
async fn platform_admin_manages_tenants() {
    let app = TestApp::spawn().await;
    for slug in ["a", "b", "c"] {
        app.create_tenant(slug).await;
    }
    let dup = app
        .post(
            "/v1/tenants",
            &app.admin_token,
            json!({"name": "A again", "slug": "a"}),
        )
        .await;
    expect_problem(dup, StatusCode::CONFLICT, "conflict").await;
    let bad = app
        .post(
            "/v1/tenants",
            &app.admin_token,
            json!({"name": "Bad", "slug": "Not A Slug"}),
        )
        .await;
    expect_problem(bad, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;

    let first = expect_json(
        app.get("/v1/tenants?limit=2", &app.admin_token).await,
        StatusCode::OK,
    )
    .await;
    let cursor = first["next_cursor"].as_str().unwrap();
    let second = expect_json(
        app.get(
            &format!("/v1/tenants?limit=2&cursor={cursor}"),
            &app.admin_token,
        )
        .await,
        StatusCode::OK,
    )
    .await;
    let slugs: Vec<_> = first["items"]
        .as_array()
        .unwrap()
        .iter()
        .chain(second["items"].as_array().unwrap())
        .map(|t| t["slug"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(slugs, ["a", "b", "c"]);
    assert!(second["next_cursor"].is_null());

    let res = app
        .post(
            &format!("/v1/tenants/{}/api-keys", uuid::Uuid::new_v4()),
            &app.admin_token,
            json!({"name": "k", "role": "admin"}),
        )
        .await;
    expect_problem(res, StatusCode::NOT_FOUND, "not_found").await;
    let id = first["items"][0]["id"].as_str().unwrap();
    let res = app
        .post(
            &format!("/v1/tenants/{id}/api-keys"),
            &app.admin_token,
            json!({"name": "k", "role": "root"}),
        )
        .await;
    expect_problem(res, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
}

#[tokio::test]
async fn without_admin_token_configured_the_platform_api_refuses() {
    let mut app = TestApp::spawn().await;
    app.stop().await.unwrap();
    let app = TestApp::spawn_with(
        crate::helpers::Options {
            db_name: Some(app.db_name.clone()),
            ..Default::default()
        }
        .env("ADMIN_TOKEN", ""),
    )
    .await;
    expect_problem(
        app.get("/v1/tenants", &app.admin_token).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
}

/// Revokes a key the way the CLI does: straight through the repository, in another process's
/// transaction, so only the NOTIFY tells the servers.
async fn revoke_out_of_band(app: &TestApp, tenant: &str, key: &str) {
    let tenant = cybernetic::domain::tenant::TenantId::from_uuid(tenant.parse().unwrap());
    let mut tx = cybernetic::db::tenant::begin(&app.pool, tenant)
        .await
        .unwrap();
    let id: uuid::Uuid = sqlx::query_scalar("select id from api_keys where secret_hash = $1")
        .bind(cybernetic::domain::api_key::hash_secret(key).as_slice())
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    cybernetic::db::api_keys::revoke(&mut tx, tenant, id)
        .await
        .unwrap()
        .expect("key exists");
    tx.commit().await.unwrap();
}

async fn refused_on(app: &TestApp, key: &str) -> bool {
    app.get("/v1/systems", key).await.status() == StatusCode::UNAUTHORIZED
}

#[tokio::test]
async fn revocation_reaches_every_replica_even_after_its_listener_reconnects() {
    use std::time::Duration;

    use crate::helpers::{Options, eventually};

    let a = TestApp::spawn().await;
    let b = TestApp::spawn_with(Options {
        db_name: Some(a.db_name.clone()),
        ..Default::default()
    })
    .await;
    let t = a.tenant("acme").await;
    let second = a.create_key(&t.id, "viewer").await;
    for app in [&a, &b] {
        for key in [&t.viewer, &second] {
            // Twice: the second use is served from the cache.
            expect_json(app.get("/v1/systems", key).await, StatusCode::OK).await;
            expect_json(app.get("/v1/systems", key).await, StatusCode::OK).await;
        }
    }

    revoke_out_of_band(&a, &t.id, &t.viewer).await;
    for app in [&a, &b] {
        eventually(
            Duration::from_secs(5),
            "the revoked key to be refused",
            || refused_on(app, &t.viewer),
        )
        .await;
    }
    expect_json(b.get("/v1/systems", &second).await, StatusCode::OK).await;

    // Kill both listeners' connections. Each server turns its cache off, reconnects, and proves
    // the new listener hears before trusting the cache again; then the second key is cached anew
    // and revoked, so the revocation must travel through the reconnected listeners.
    let killed: Vec<bool> = sqlx::query_scalar(
        "select pg_terminate_backend(pid) from pg_stat_activity
          where datname = current_database() and query ilike 'LISTEN%'",
    )
    .fetch_all(&a.pool)
    .await
    .unwrap();
    assert_eq!(killed, [true, true], "one listener per server");
    eventually(
        Duration::from_secs(10),
        "both listeners to reconnect",
        || async {
            let listening: i64 = sqlx::query_scalar(
                "select count(*) from pg_stat_activity
              where datname = current_database() and query ilike 'LISTEN%' and state = 'idle'",
            )
            .fetch_one(&a.pool)
            .await
            .unwrap();
            listening == 2
        },
    )
    .await;
    for app in [&a, &b] {
        expect_json(app.get("/v1/systems", &second).await, StatusCode::OK).await;
        expect_json(app.get("/v1/systems", &second).await, StatusCode::OK).await;
    }
    revoke_out_of_band(&a, &t.id, &second).await;
    for app in [&a, &b] {
        eventually(
            Duration::from_secs(5),
            "the second revoked key to be refused",
            || refused_on(app, &second),
        )
        .await;
    }
    expect_json(a.get("/v1/systems", &t.admin).await, StatusCode::OK).await;
}

#[tokio::test]
async fn a_key_changed_by_plain_sql_is_refused_too() {
    use std::time::Duration;

    use crate::helpers::eventually;

    // No application code runs here: the trigger on api_keys announces the change itself.
    let app = TestApp::spawn().await;
    let t = app.tenant("acme").await;
    expect_json(app.get("/v1/systems", &t.viewer).await, StatusCode::OK).await;
    expect_json(app.get("/v1/systems", &t.viewer).await, StatusCode::OK).await;
    let tenant = cybernetic::domain::tenant::TenantId::from_uuid(t.id.parse().unwrap());
    let mut tx = cybernetic::db::tenant::begin(&app.pool, tenant)
        .await
        .unwrap();
    sqlx::query("update api_keys set revoked_at = now() where role = 'viewer'")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    eventually(Duration::from_secs(5), "the key to be refused", || {
        refused_on(&app, &t.viewer)
    })
    .await;
}
