//! TLS to PostgreSQL: a DATABASE_URL asking for it (`sslmode=require`) gets encrypted
//! connections, and the API works over them.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{Options, TestApp, app_url, expect_json, fresh_database};

#[tokio::test]
async fn sslmode_require_connects_over_tls() {
    let db = fresh_database().await;
    let url = format!("{}?sslmode=require", app_url(&db));
    let app = TestApp::spawn_with(
        Options {
            db_name: Some(db.clone()),
            ..Default::default()
        }
        .env("DATABASE_URL", &url),
    )
    .await;
    let t = app.tenant("acme").await;
    expect_json(
        app.put(
            "/v1/systems/1/state",
            &t.operator,
            json!({"state": {"tls": true}}),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;

    let (connections, encrypted): (i64, i64) = sqlx::query_as(
        "select count(*), count(*) filter (where s.ssl)
           from pg_stat_activity a join pg_stat_ssl s using (pid)
          where a.datname = $1 and a.application_name = 'cybernetic'",
    )
    .bind(&db)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(connections > 0, "the server holds connections to {db}");
    assert_eq!(encrypted, connections, "every server connection uses TLS");
}
