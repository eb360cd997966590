//! `/metrics`: Prometheus text that promtool accepts, labelled by route template, guarded by a
//! token when configured, and rate-limited.

use std::io::Write;
use std::process::{Command, Stdio};

use reqwest::StatusCode;

use crate::helpers::{Options, TestApp, expect_problem};

async fn scrape(app: &TestApp, token: Option<&str>) -> reqwest::Response {
    let mut req = app.client.get(app.url("/metrics"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn metrics_are_promtool_clean_and_use_route_templates() {
    let app = TestApp::spawn().await;
    let t = app.tenant("acme").await;
    app.get("/v1/systems/3/state", &t.viewer).await;
    app.get(
        "/v1/episodes/5f0c6b9e-0000-4000-8000-000000000000",
        &t.viewer,
    )
    .await;
    app.get("/no/such/path/1234", &t.viewer).await;

    let res = scrape(&app, None).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = res.text().await.unwrap();
    for needle in [
        r#"http_requests_total{method="GET",route="/v1/systems/{system}/state",status="404"} 1"#,
        r#"http_requests_total{method="GET",route="/v1/episodes/{id}",status="404"} 1"#,
        r#"http_requests_total{method="GET",route="unmatched",status="404"} 1"#,
        r#"http_request_duration_seconds_bucket{method="POST",route="/v1/tenants",status="201",le="0.005"}"#,
        "# TYPE http_request_duration_seconds histogram",
        "db_pool_connections{pool=\"primary\",state=\"idle\"}",
        "db_pool_max_connections{pool=\"primary\"} 8",
        "# TYPE process_cpu_seconds_total counter",
        "process_resident_memory_bytes ",
        "process_open_fds ",
    ] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
    assert!(
        !text.contains("5f0c6b9e"),
        "raw paths must never become labels"
    );
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split_whitespace().nth(2).unwrap();
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no HELP"
        );
    }

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool on PATH (apt-get install prometheus; scripts/test.sh does)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn metrics_token_is_required_when_set() {
    let token = "m".repeat(40);
    let app = TestApp::spawn_with(Options::default().env("METRICS_TOKEN", &token)).await;
    expect_problem(
        scrape(&app, None).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
    expect_problem(
        scrape(&app, Some("wrong")).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
    assert_eq!(scrape(&app, Some(&token)).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn scrapes_beyond_the_rate_limit_get_429() {
    let app = TestApp::spawn_with(Options::default().env("METRICS_RATE_LIMIT", "2")).await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let res = scrape(&app, None).await;
        if res.status() == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(res.headers()["retry-after"], "1");
            expect_problem(res, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
            statuses.push(429);
        } else {
            statuses.push(res.status().as_u16());
        }
    }
    assert_eq!(statuses[0], 200);
    assert!(statuses.contains(&429), "{statuses:?}");
}
