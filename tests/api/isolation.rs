//! Tenant isolation at the database level: row-level security, not our WHERE clauses, keeps
//! tenants apart. Everything here runs as the app role the server uses.

use cybernetic::db::tenant;
use cybernetic::domain::tenant::TenantId;
use serde_json::json;
use sqlx::Row;
use uuid::Uuid;

use crate::helpers::TestApp;

const TENANT_TABLES: [&str; 7] = [
    "api_keys",
    "system_states",
    "episodes",
    "policies",
    "artifacts",
    "events",
    "event_heads",
];

/// Writes one row into every tenant table for `tenant`, inside its own transaction.
async fn seed(app: &TestApp, tenant: TenantId) {
    let mut tx = tenant::begin(&app.pool, tenant).await.unwrap();
    let t = tenant.as_uuid();
    let hash: Vec<u8> = Uuid::new_v4().as_bytes().repeat(2);
    sqlx::query("insert into api_keys (id, tenant_id, name, role, prefix, secret_hash) values ($1, $2, 'k', 'viewer', 'cyb_x', $3)")
        .bind(Uuid::new_v4()).bind(t).bind(hash).execute(&mut *tx).await.unwrap();
    sqlx::query("insert into system_states (id, tenant_id, system, version, state) values ($1, $2, 1, 1, '{}')")
        .bind(Uuid::new_v4()).bind(t).execute(&mut *tx).await.unwrap();
    sqlx::query("insert into episodes (id, tenant_id, title, content) values ($1, $2, 't', 'c')")
        .bind(Uuid::new_v4())
        .bind(t)
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("insert into policies (id, tenant_id, name, rules) values ($1, $2, 'p', '[]')")
        .bind(Uuid::new_v4())
        .bind(t)
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("insert into artifacts (id, tenant_id, key, storage_path, content_type, size, sha256) values ($1, $2, 'a.txt', 'tenants/' || $2 || '/a', 'text/plain', 1, $3)")
        .bind(Uuid::new_v4()).bind(t).bind("0".repeat(64)).execute(&mut *tx).await.unwrap();
    let seed = cybernetic::domain::event_type::EventType::parse("test.seed").unwrap();
    cybernetic::db::events::append(&mut tx, tenant, &seed, &serde_json::json!({}))
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

async fn two_seeded_tenants(app: &TestApp) -> (TenantId, TenantId) {
    let a = TenantId::from_uuid(app.create_tenant("tenant-a").await.parse().unwrap());
    let b = TenantId::from_uuid(app.create_tenant("tenant-b").await.parse().unwrap());
    seed(app, a).await;
    seed(app, b).await;
    (a, b)
}

#[tokio::test]
async fn runtime_role_cannot_bypass_row_level_security() {
    let app = TestApp::spawn().await;
    let row = sqlx::query("select rolsuper, rolbypassrls, current_user::text as me from pg_roles where rolname = current_user")
        .fetch_one(&app.pool).await.unwrap();
    assert_eq!(row.get::<String, _>("me"), "cybernetic_app");
    assert!(
        !row.get::<bool, _>("rolsuper"),
        "app role must not be superuser"
    );
    assert!(
        !row.get::<bool, _>("rolbypassrls"),
        "app role must not bypass RLS"
    );
    let owned: i64 = sqlx::query_scalar(
        "select count(*) from pg_class c join pg_namespace n on n.oid = c.relnamespace
          where n.nspname = 'public' and pg_get_userbyid(c.relowner) = current_user",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(owned, 0, "app role must own no tables");
    for table in TENANT_TABLES.iter().chain(&["tenants"]) {
        let (enabled, forced): (bool, bool) =
            sqlx::query_as("select relrowsecurity, relforcerowsecurity from pg_class where relname = $1 and relkind = 'r'")
                .bind(table).fetch_one(&app.pool).await.unwrap();
        assert!(
            enabled && forced,
            "{table} must ENABLE and FORCE row level security"
        );
    }
}

#[tokio::test]
async fn a_tenant_transaction_sees_only_its_own_rows() {
    let app = TestApp::spawn().await;
    let (a, _) = two_seeded_tenants(&app).await;
    let mut tx = tenant::begin(&app.pool, a).await.unwrap();
    for table in TENANT_TABLES {
        // Unfiltered on purpose: only row-level security stands between A and B here.
        let tenants: Vec<Uuid> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "select distinct tenant_id from {table}"
        )))
        .fetch_all(&mut *tx)
        .await
        .unwrap();
        assert_eq!(tenants, vec![a.as_uuid()], "{table} leaks across tenants");
    }
    let visible_tenants: Vec<Uuid> = sqlx::query_scalar("select id from tenants")
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    assert_eq!(visible_tenants, vec![a.as_uuid()]);
    tx.rollback().await.unwrap();
}

#[tokio::test]
async fn writes_carrying_another_tenants_id_are_refused() {
    let app = TestApp::spawn().await;
    let (a, b) = two_seeded_tenants(&app).await;
    let other = b.as_uuid();
    let attempts = [
        "insert into system_states (id, tenant_id, system, version, state) values (gen_random_uuid(), $1, 2, 1, '{}')",
        "insert into episodes (id, tenant_id, title, content) values (gen_random_uuid(), $1, 'x', 'y')",
        "insert into policies (id, tenant_id, name, rules) values (gen_random_uuid(), $1, 'x', '[]')",
        "insert into artifacts (id, tenant_id, key, storage_path, content_type, size, sha256) values (gen_random_uuid(), $1, 'b', 'tenants/x/b', 't', 0, repeat('0', 64))",
        "insert into policy_violations (id, tenant_id, policy_name, policy_version, rule_index, rule, system, severity) values (gen_random_uuid(), $1, 'p', 1, 0, '{}', 1, 'info')",
        "insert into notification_channels (id, tenant_id, name, kind, config) values (gen_random_uuid(), $1, 'c', 'webhook', '{}')",
        "insert into reflections (id, tenant_id, kind, period_start, period_end, timezone, summary) values (gen_random_uuid(), $1, 'daily', now() - interval '1 day', now(), 'UTC', '{}')",
        "insert into jobs (id, tenant_id, kind, queue, args, max_attempts) values (gen_random_uuid(), $1, 'x', 'default', '{}', 1)",
        "insert into events (tenant_id, position, type, data) values ($1, 99, 'x', '{}')",
        "insert into event_heads (tenant_id, position) values ($1, 99)",
        "insert into api_keys (id, tenant_id, name, role, prefix, secret_hash) values (gen_random_uuid(), $1, 'k', 'admin', 'p', sha256('x'::bytea))",
        // Moving one's own row to another tenant is refused by WITH CHECK.
        "update episodes set tenant_id = $1",
        "update policies set tenant_id = $1",
        "update api_keys set tenant_id = $1",
    ];
    for sql in attempts {
        let mut tx = tenant::begin(&app.pool, a).await.unwrap();
        let err = sqlx::query(sql)
            .bind(other)
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
    // Updates and deletes aimed at B's rows touch nothing.
    let mut tx = tenant::begin(&app.pool, a).await.unwrap();
    for sql in [
        "update episodes set title = 'pwned' where tenant_id = $1",
        "update policies set active = false where tenant_id = $1",
        "delete from policies where tenant_id = $1",
        "delete from artifacts where tenant_id = $1",
    ] {
        let done = sqlx::query(sql)
            .bind(other)
            .execute(&mut *tx)
            .await
            .unwrap();
        assert_eq!(done.rows_affected(), 0, "{sql}");
    }
    tx.commit().await.unwrap();
    let mut tx = tenant::begin(&app.pool, b).await.unwrap();
    let title: String = sqlx::query_scalar("select title from episodes")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(title, "t");
    tx.rollback().await.unwrap();
}

#[tokio::test]
async fn without_a_tenant_nothing_is_visible_and_the_setting_does_not_leak() {
    let app = TestApp::spawn().await;
    let (a, _) = two_seeded_tenants(&app).await;
    // One connection: first a tenant transaction, then plain statements on the same session.
    let mut conn = app.pool.acquire().await.unwrap();
    {
        let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
        sqlx::query("select set_config('app.tenant_id', $1, true)")
            .bind(a.to_string())
            .execute(&mut *tx)
            .await
            .unwrap();
        let n: i64 = sqlx::query_scalar("select count(*) from episodes")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(n, 1);
        tx.commit().await.unwrap();
    }
    for table in TENANT_TABLES.iter().chain(&["tenants"]) {
        let n: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("select count(*) from {table}")))
                .fetch_one(&mut *conn)
                .await
                .unwrap();
        assert_eq!(n, 0, "{table} visible without a tenant");
    }
    let err = sqlx::query(
        "insert into events (tenant_id, position, type, data) values ($1, 99, 'x', '{}')",
    )
    .bind(a.as_uuid())
    .execute(&mut *conn)
    .await
    .unwrap_err();
    assert_eq!(
        err.as_database_error().and_then(|e| e.code()).as_deref(),
        Some("42501")
    );
}

#[tokio::test]
async fn the_platform_scope_sees_tenants_but_no_tenant_data() {
    let app = TestApp::spawn().await;
    two_seeded_tenants(&app).await;
    let mut tx = tenant::begin_platform(&app.pool).await.unwrap();
    let n: i64 = sqlx::query_scalar("select count(*) from tenants")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(n, 2);
    for table in TENANT_TABLES {
        let n: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("select count(*) from {table}")))
                .fetch_one(&mut *tx)
                .await
                .unwrap();
        assert_eq!(n, 0, "{table} visible in platform scope");
    }
    tx.rollback().await.unwrap();
}

#[tokio::test]
async fn app_role_cannot_rewrite_history() {
    let app = TestApp::spawn().await;
    let (a, _) = two_seeded_tenants(&app).await;
    for sql in [
        "update system_states set state = '{\"x\": 1}'",
        "delete from system_states",
        "update events set data = '{}'",
    ] {
        let mut tx = tenant::begin(&app.pool, a).await.unwrap();
        let err = sqlx::query(sql).execute(&mut *tx).await.expect_err(sql);
        assert_eq!(
            err.as_database_error().and_then(|e| e.code()).as_deref(),
            Some("42501"),
            "{sql}"
        );
        tx.rollback().await.unwrap();
    }
}

#[tokio::test]
async fn http_keys_never_cross_tenants() {
    let app = TestApp::spawn().await;
    let a = app.tenant("acme").await;
    let b = app.tenant("globex").await;
    use crate::helpers::{expect_json, expect_problem};
    use reqwest::StatusCode;

    expect_json(
        app.put(
            "/v1/systems/1/state",
            &a.operator,
            json!({"state": {"owner": "a"}}),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    let episode = expect_json(
        app.post(
            "/v1/episodes",
            &a.operator,
            json!({"title": "A", "content": "secret"}),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    let policy = expect_json(
        app.post(
            "/v1/policies",
            &a.admin,
            json!({"name": "p", "rules": [{"system": 1, "path": "/x", "op": "exists"}]}),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    let keys = expect_json(app.get("/v1/api-keys", &a.admin).await, StatusCode::OK).await;
    let a_key_id = keys["items"][0]["id"].as_str().unwrap().to_owned();

    let systems = expect_json(app.get("/v1/systems", &b.viewer).await, StatusCode::OK).await;
    assert!(
        systems["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["state"].is_null()),
        "{systems}"
    );
    expect_problem(
        app.get("/v1/systems/1/state", &b.viewer).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let history = expect_json(
        app.get("/v1/systems/1/history", &b.viewer).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(history["items"], json!([]));
    let eid = episode["id"].as_str().unwrap();
    expect_problem(
        app.get(&format!("/v1/episodes/{eid}"), &b.viewer).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    assert_eq!(
        expect_json(app.get("/v1/episodes", &b.viewer).await, StatusCode::OK).await["items"],
        json!([])
    );
    let pid = policy["id"].as_str().unwrap();
    expect_problem(
        app.get(&format!("/v1/policies/{pid}"), &b.viewer).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    expect_problem(
        app.put(
            &format!("/v1/policies/{pid}"),
            &b.admin,
            json!({"name": "stolen", "rules": [{"system": 1, "path": "", "op": "exists"}], "active": true}),
        )
        .await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    expect_problem(
        app.delete(&format!("/v1/policies/{pid}"), &b.admin).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    assert_eq!(
        expect_json(app.get("/v1/policies", &b.viewer).await, StatusCode::OK).await["items"],
        json!([])
    );
    expect_problem(
        app.delete(&format!("/v1/api-keys/{a_key_id}"), &b.admin)
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let b_keys = expect_json(app.get("/v1/api-keys", &b.admin).await, StatusCode::OK).await;
    assert!(
        b_keys["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["id"] != a_key_id.as_str())
    );

    // A's data is intact and A's key still works.
    let p = expect_json(
        app.get(&format!("/v1/policies/{pid}"), &a.viewer).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(p["name"], "p");
    expect_json(app.get("/v1/api-keys", &a.admin).await, StatusCode::OK).await;
}

#[tokio::test]
async fn the_server_refuses_a_role_that_bypasses_row_level_security() {
    let db = crate::helpers::fresh_database().await;
    // The owner owns the tables; a superuser bypasses RLS outright. Neither may serve.
    for url in [
        crate::helpers::owner_url(&db),
        crate::helpers::superuser_url(&db),
    ] {
        let env = std::collections::HashMap::from([
            ("DATABASE_URL".to_owned(), url.clone()),
            ("LISTEN_ADDR".to_owned(), "127.0.0.1:0".to_owned()),
        ]);
        let config = cybernetic::config::Config::from_source(&|k| env.get(k).cloned()).unwrap();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let err = match cybernetic::startup::App::build(config, shutdown).await {
            Ok(_) => panic!("{url} must be refused"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("bypasses row-level security"), "{err}");
    }
}
