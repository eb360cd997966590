//! `/metrics`: Prometheus text that promtool accepts, labelled by route template, guarded by a
//! token when configured, and rate-limited; the job pool's series once jobs have run.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use cybernetic::db::jobs::Outcome;
use cybernetic::domain::job::Queue;
use cybernetic::domain::tenant::TenantId;
use cybernetic::jobs::{self, Enqueue, Job, JobContext, JobError, Registry, maintenance};

use crate::helpers::{Options, TestApp, eventually, expect_problem};
use crate::jobs::{config, pool_running};

async fn scrape(app: &TestApp, token: Option<&str>) -> reqwest::Response {
    let mut req = app.client.get(app.url("/metrics"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap()
}

/// Asserts that promtool accepts the exposition (`promtool check metrics`).
fn promtool_check(text: &str) {
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

    promtool_check(&text);
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

/// Completes at once.
#[derive(Serialize, Deserialize)]
struct MeteredChore;

impl Job for MeteredChore {
    const KIND: &'static str = "metered_chore";

    async fn run(self, _ctx: JobContext) -> Result<Value, JobError> {
        Ok(json!({"done": true}))
    }
}

/// Fails both of its attempts, due again at once after the first: retried, then dead.
#[derive(Serialize, Deserialize)]
struct MeteredFlop;

impl Job for MeteredFlop {
    const KIND: &'static str = "metered_flop";
    const MAX_ATTEMPTS: i32 = 2;

    fn backoff(_attempt: i32) -> Duration {
        Duration::ZERO
    }

    async fn run(self, ctx: JobContext) -> Result<Value, JobError> {
        Err(JobError::retry(format!("flop {}", ctx.attempt)))
    }
}

/// One sample line's series name and labels (label order as written is not significant).
fn parse_series(line: &str) -> Option<(&str, BTreeMap<String, String>, f64)> {
    if line.starts_with('#') || line.trim().is_empty() {
        return None;
    }
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    let Some((name, rest)) = series.split_once('{') else {
        return Some((series, BTreeMap::new(), value));
    };
    let mut labels = BTreeMap::new();
    let mut rest = rest.strip_suffix('}')?;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.to_owned(), value);
        rest = after[end + 1..].trim_start_matches(',');
    }
    Some((name, labels, value))
}

/// The value of the series `name` with exactly `labels`, if the exposition has it.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    text.lines()
        .filter_map(parse_series)
        .find(|(n, l, _)| *n == name && *l == wanted)
        .map(|(_, _, v)| v)
}

async fn scrape_text(app: &TestApp) -> String {
    let res = scrape(app, None).await;
    assert_eq!(res.status(), StatusCode::OK);
    res.text().await.unwrap()
}

#[tokio::test]
async fn job_series_are_labelled_and_promtool_clean_once_jobs_complete_and_die() {
    let app = TestApp::spawn().await;
    let t = app.tenant("metered").await;
    let tenant = TenantId::from_uuid(t.id.parse().expect("tenant id"));
    // The recorder is the process's: series of other tests' jobs may move meanwhile, so shared
    // series are compared as deltas; this test's kinds are its own.
    let before = scrape_text(&app).await;
    let pickups = |text: &str| {
        sample(
            text,
            "job_pickup_delay_seconds_count",
            &[("queue", "default")],
        )
        .unwrap_or(0.0)
    };

    let (pool, db) = pool_running(
        &app.db_name,
        Registry::new()
            .register::<MeteredChore>()
            .register::<MeteredFlop>(),
        config(),
    );
    let chore = jobs::enqueue_alone(&db, tenant, &MeteredChore, Enqueue::default())
        .await
        .expect("enqueue")
        .id;
    let flop = jobs::enqueue_alone(&db, tenant, &MeteredFlop, Enqueue::default())
        .await
        .expect("enqueue")
        .id;
    let ran = pool.run_due(Queue::Default, 10).await.expect("run");
    assert_eq!(ran.len(), 2);
    for r in &ran {
        let expected = if r.id == chore {
            matches!(r.outcome, Some(Outcome::Completed(_)))
        } else {
            matches!(r.outcome, Some(Outcome::Retrying { .. }))
        };
        assert!(expected, "{r:?}");
    }
    // Due again at once (no backoff): its second and last attempt fails too.
    eventually(Duration::from_secs(10), "the retry to come due", || {
        let pool = pool.clone();
        async move {
            !pool
                .run_due(Queue::Default, 10)
                .await
                .expect("run")
                .is_empty()
        }
    })
    .await;
    let dead = crate::helpers::expect_json(
        app.get(&format!("/v1/jobs/{flop}"), &t.viewer).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(dead["state"], "dead", "{dead}");

    // Upkeep refreshes the jobs gauge when it starts (then every 15 s).
    let stop = CancellationToken::new();
    maintenance::spawn(db.clone(), config().retention, stop.clone());
    eventually(
        Duration::from_secs(10),
        "the jobs gauge to count the dead job",
        || async {
            let text = scrape_text(&app).await;
            sample(&text, "jobs", &[("queue", "default"), ("state", "dead")])
                .is_some_and(|n| n >= 1.0)
        },
    )
    .await;
    stop.cancel();
    let text = scrape_text(&app).await;

    let value = |name: &str, labels: &[(&str, &str)]| {
        sample(&text, name, labels).unwrap_or_else(|| panic!("no {name}{labels:?} in:\n{text}"))
    };
    assert_eq!(
        value("jobs_enqueued_total", &[("kind", "metered_chore")]),
        1.0
    );
    assert_eq!(
        value("jobs_enqueued_total", &[("kind", "metered_flop")]),
        1.0
    );
    for (kind, outcome) in [
        ("metered_chore", "completed"),
        ("metered_flop", "retried"),
        ("metered_flop", "dead"),
    ] {
        assert_eq!(
            value(
                "jobs_finished_total",
                &[("kind", kind), ("outcome", outcome)]
            ),
            1.0,
            "{kind} {outcome}"
        );
    }
    assert_eq!(
        sample(
            &text,
            "jobs_finished_total",
            &[("kind", "metered_chore"), ("outcome", "dead")]
        ),
        None
    );
    // One duration per attempt, by kind.
    for (kind, attempts) in [("metered_chore", 1.0), ("metered_flop", 2.0)] {
        assert_eq!(
            value("job_duration_seconds_count", &[("kind", kind)]),
            attempts
        );
        assert_eq!(
            value(
                "job_duration_seconds_bucket",
                &[("kind", kind), ("le", "+Inf")]
            ),
            attempts
        );
        assert!(value("job_duration_seconds_sum", &[("kind", kind)]) >= 0.0);
        assert!(
            value(
                "job_duration_seconds_bucket",
                &[("kind", kind), ("le", "10")]
            ) <= attempts
        );
    }
    // One pickup per claim: the chore, and the flop twice.
    assert!(
        pickups(&text) - pickups(&before) >= 3.0,
        "pickups before {} after {}",
        pickups(&before),
        pickups(&text)
    );
    value(
        "job_pickup_delay_seconds_bucket",
        &[("queue", "default"), ("le", "+Inf")],
    );
    value("job_pickup_delay_seconds_sum", &[("queue", "default")]);
    // The gauge reports every queue and state, zeros included.
    for queue in ["critical", "default", "analysis", "notifications"] {
        for state in ["scheduled", "available", "running", "retrying", "dead"] {
            value("jobs", &[("queue", queue), ("state", state)]);
        }
    }
    for (name, kind) in [
        ("jobs_enqueued_total", "counter"),
        ("jobs_finished_total", "counter"),
        ("job_duration_seconds", "histogram"),
        ("job_pickup_delay_seconds", "histogram"),
        ("jobs", "gauge"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} is not a {kind}"
        );
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no HELP"
        );
    }
    promtool_check(&text);
}
