//! The operator commands, run as the real binary against the test database.

use std::process::{Command, Output};

use reqwest::StatusCode;

use crate::helpers::{Options, TestApp, app_url, expect_json, expect_problem, fresh_database};

fn cybernetic(env: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cybernetic"))
        .env_clear()
        .envs(env.iter().copied())
        .args(args)
        .output()
        .expect("run cybernetic")
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn tenants_and_keys_created_by_the_cli_work_over_http() {
    let db = fresh_database().await;
    let url = app_url(&db);
    let env = [("DATABASE_URL", url.as_str())];
    let created = stdout(&cybernetic(
        &env,
        &["tenant", "create", "--name", "Acme Ltd", "--slug", "acme"],
    ));
    assert!(created.contains("acme"), "{created}");
    let listed = stdout(&cybernetic(&env, &["tenant", "list"]));
    assert!(listed.contains("Acme Ltd"), "{listed}");

    let out = stdout(&cybernetic(
        &env,
        &[
            "api-key", "create", "--tenant", "acme", "--name", "ops", "--role", "operator",
        ],
    ));
    let key = out
        .lines()
        .find(|l| l.starts_with("cyb_"))
        .expect("key printed")
        .to_owned();

    let app = TestApp::spawn_with(Options {
        db_name: Some(db.clone()),
        ..Default::default()
    })
    .await;
    expect_json(
        app.put(
            "/v1/systems/1/state",
            &key,
            serde_json::json!({"state": {"via": "cli"}}),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;

    let keys = stdout(&cybernetic(&env, &["api-key", "list", "--tenant", "acme"]));
    assert!(!keys.contains(&key), "secrets are never listed");
    let id = keys.split_whitespace().next().unwrap();
    stdout(&cybernetic(
        &env,
        &["api-key", "revoke", "--tenant", "acme", "--id", id],
    ));
    // Revoked in another process: the server hears of it through the database's notification.
    crate::helpers::eventually(
        std::time::Duration::from_secs(5),
        "the revoked key to be refused",
        || async { app.get("/v1/systems", &key).await.status() == StatusCode::UNAUTHORIZED },
    )
    .await;
    expect_problem(
        app.get("/v1/systems", &key).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;

    let missing = cybernetic(&env, &["api-key", "list", "--tenant", "nobody"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no tenant"));
}

#[test]
fn bad_configuration_stops_with_one_line_naming_the_variable() {
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str], &'a str);
    let cases: &[Case] = &[
        (&[], &["check-config"], "DATABASE_URL"),
        (
            &[("DATABASE_URL", "mysql://nope")],
            &["check-config"],
            "DATABASE_URL",
        ),
        (
            &[
                ("DATABASE_URL", "postgres://a@b/c"),
                ("LISTEN_ADDR", "everywhere"),
            ],
            &["check-config"],
            "LISTEN_ADDR",
        ),
        (
            &[
                ("DATABASE_URL", "postgres://a@b/c"),
                ("ADMIN_TOKEN", "short"),
            ],
            &["serve"],
            "ADMIN_TOKEN",
        ),
        (&[], &["migrate"], "MIGRATION_DATABASE_URL"),
    ];
    for (env, args, var) in cases {
        let out = cybernetic(env, args);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains(var), "{var} not named in: {err}");
    }
    let ok = cybernetic(
        &[
            ("DATABASE_URL", "postgres://u:hunter2@db/c"),
            ("ADMIN_TOKEN", &"s".repeat(40)),
        ],
        &["check-config"],
    );
    let text = stdout(&ok);
    assert!(
        !text.contains("hunter2") && !text.contains(&"s".repeat(40)),
        "secrets printed: {text}"
    );
}

#[tokio::test]
async fn migrate_refuses_any_role_but_the_owner() {
    let db = fresh_database().await;
    for url in [crate::helpers::superuser_url(&db), app_url(&db)] {
        let out = cybernetic(&[("MIGRATION_DATABASE_URL", url.as_str())], &["migrate"]);
        assert!(!out.status.success(), "{url} must be refused");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("must log in as cybernetic_owner"), "{err}");
    }
    let owner = crate::helpers::owner_url(&db);
    stdout(&cybernetic(
        &[("MIGRATION_DATABASE_URL", owner.as_str())],
        &["migrate"],
    ));
}

#[test]
fn every_command_has_help() {
    for args in [
        &["--help"][..],
        &["serve", "--help"],
        &["migrate", "--help"],
        &["tenant", "create", "--help"],
        &["tenant", "list", "--help"],
        &["api-key", "create", "--help"],
        &["api-key", "list", "--help"],
        &["api-key", "revoke", "--help"],
        &["check-config", "--help"],
        &["healthcheck", "--help"],
        &["telegram", "set-webhook", "--help"],
        &["telegram", "info", "--help"],
        &["worker", "--help"],
    ] {
        let text = stdout(&cybernetic(&[], args));
        assert!(text.contains("Usage:"), "{args:?}: {text}");
    }
}

/// `cybernetic healthcheck ARGS` with `env`, off the test's runtime (it blocks).
async fn healthcheck(env: Vec<(&'static str, String)>, args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut all = vec!["healthcheck"];
        all.extend(args.iter().map(String::as_str));
        cybernetic(&env, &all)
    })
    .await
    .expect("join")
}

#[tokio::test]
async fn healthcheck_passes_only_while_the_server_is_ready() {
    let app = crate::helpers::TestApp::spawn().await;
    let ready = format!("http://{}/health/ready", app.addr);
    let out = healthcheck(vec![], vec!["--url".into(), ready]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // LISTEN_ADDR on every interface is asked on loopback.
    let listen = format!("0.0.0.0:{}", app.addr.port());
    let out = healthcheck(vec![("LISTEN_ADDR", listen)], vec![]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Nothing listening: a failure, quickly.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/health/ready", closed.local_addr().expect("addr"));
    drop(closed);
    let out = healthcheck(
        vec![],
        vec!["--url".into(), url, "--timeout".into(), "1s".into()],
    )
    .await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("health/ready"));
}
