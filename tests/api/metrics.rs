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
pub(crate) fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    text.lines()
        .filter_map(parse_series)
        .find(|(n, l, _)| *n == name && *l == wanted)
        .map(|(_, _, v)| v)
}

pub(crate) async fn scrape_text(app: &TestApp) -> String {
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
    crate::jobs::run_once_due(&pool, "the retry to come due").await;
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
    assert_described(
        &text,
        &[
            ("jobs_enqueued_total", "counter"),
            ("jobs_finished_total", "counter"),
            ("job_duration_seconds", "histogram"),
            ("job_pickup_delay_seconds", "histogram"),
            ("jobs", "gauge"),
        ],
    );
    promtool_check(&text);
}

/// Each metric is exposed with its TYPE and a HELP line.
fn assert_described(text: &str, metrics: &[(&str, &str)]) {
    for (name, kind) in metrics {
        assert!(
            text.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} is not a {kind}"
        );
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no HELP"
        );
    }
}

/// A body of `total` pattern bytes in chunks of `chunk`.
fn storage_body(total: usize, chunk: usize) -> cybernetic::storage::ByteStream {
    let bytes: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
    let chunks: Vec<Result<bytes::Bytes, cybernetic::storage::StorageError>> = bytes
        .chunks(chunk)
        .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
        .collect();
    Box::pin(futures::stream::iter(chunks))
}

/// Reads a `get`'s whole body; returns how many bytes it carried.
async fn drain(got: cybernetic::storage::GetResult) -> u64 {
    use futures::StreamExt;
    let mut body = got.body;
    let mut n = 0;
    while let Some(chunk) = body.next().await {
        n += chunk.expect("chunk").len() as u64;
    }
    n
}

#[tokio::test]
async fn storage_operations_are_counted_timed_and_their_bytes_summed() {
    use cybernetic::config::StorageBackend;
    use cybernetic::domain::object_key::{ObjectKey, StoragePath};
    use cybernetic::storage::{PutOptions, StorageError};

    // The app installs the process's recorder; the backends below, opened as the app opens its
    // own (wrapped by the metrics layer), report to it.
    let app = TestApp::spawn().await;
    let t = app.tenant("metered-storage").await;
    let root = std::env::temp_dir().join(format!("cyb-metered-{}", uuid::Uuid::new_v4().simple()));
    let backends = [
        ("memory", StorageBackend::Memory),
        ("local", StorageBackend::Local { root: root.clone() }),
    ];
    let mut text = String::new();
    for (backend, config) in backends {
        let storage = cybernetic::storage::open(&config).await.expect("open");
        assert_eq!(storage.backend(), backend);
        let tenant = TenantId::from_uuid(uuid::Uuid::new_v4());
        let path = |key: &str| ObjectKey::parse(key).expect("key").under(tenant);
        let (big, small, missing) = (path("m/big.bin"), path("m/small.bin"), path("m/none.bin"));
        let before = scrape_text(&app).await;

        let mut written: u64 = 0;
        let mut read: u64 = 0;
        let stored = storage
            .put(
                &big,
                storage_body(300_000, 64 * 1024),
                PutOptions::default(),
            )
            .await
            .expect("put");
        assert_eq!(stored.size, 300_000);
        written += 300_000;
        storage
            .put(&small, storage_body(1000, 1000), PutOptions::default())
            .await
            .expect("put");
        written += 1000;
        // A body that fails half-way, as when the client goes away mid-upload.
        let cut: cybernetic::storage::ByteStream = Box::pin(futures::stream::iter(vec![
            Ok(bytes::Bytes::from(vec![7u8; 5000])),
            Err(StorageError::Interrupted("the client went away".into())),
        ]));
        let interrupted = storage
            .put(&path("m/cut.bin"), cut, PutOptions::default())
            .await;
        assert!(
            matches!(interrupted, Err(StorageError::Interrupted(_))),
            "{:?}",
            interrupted.map(|m| m.path)
        );
        read += drain(storage.get(&big, None).await.expect("get")).await;
        read += drain(storage.get(&small, Some(0..100)).await.expect("get")).await;
        assert_eq!(read, 300_100);
        assert!(matches!(
            storage.get(&missing, None).await.map(|g| g.meta),
            Err(StorageError::NotFound)
        ));
        assert!(matches!(
            storage.get(&small, Some(5000..6000)).await.map(|g| g.meta),
            Err(StorageError::InvalidRange { size: 1000 })
        ));
        assert!(matches!(
            storage.head(&missing).await,
            Err(StorageError::NotFound)
        ));
        assert_eq!(storage.head(&big).await.expect("head").size, 300_000);
        let prefix = StoragePath::prefix(tenant, "m/").expect("prefix");
        let page = storage.list(&prefix, None, 10).await.expect("list");
        assert_eq!(page.items.len(), 2, "{page:?}");
        storage.delete(&big).await.expect("delete");
        storage
            .delete(&missing)
            .await
            .expect("deleting nothing succeeds");
        assert!(matches!(
            storage.get(&big, None).await.map(|g| g.meta),
            Err(StorageError::NotFound)
        ));

        text = scrape_text(&app).await;
        // Shared with the app's own backend and other tests in this process: compared as deltas.
        let delta = |name: &str, labels: &[(&str, &str)]| {
            let after = sample(&text, name, labels)
                .unwrap_or_else(|| panic!("no {name}{labels:?} in:\n{text}"));
            after - sample(&before, name, labels).unwrap_or(0.0)
        };
        for (op, outcome, times) in [
            ("put", "ok", 2.0),
            ("put", "interrupted", 1.0),
            ("get", "ok", 2.0),
            ("get", "not_found", 2.0),
            ("get", "invalid_range", 1.0),
            ("head", "ok", 1.0),
            ("head", "not_found", 1.0),
            ("list", "ok", 1.0),
            ("delete", "ok", 2.0),
        ] {
            let labels = [("backend", backend), ("op", op), ("outcome", outcome)];
            let n = delta("storage_operations_total", &labels);
            assert!(n >= times, "{labels:?}: {n} more, expected {times}");
        }
        for (op, times) in [
            ("put", 3.0),
            ("get", 5.0),
            ("head", 2.0),
            ("list", 1.0),
            ("delete", 2.0),
        ] {
            let labels = [("backend", backend), ("op", op)];
            let n = delta("storage_operation_duration_seconds_count", &labels);
            assert!(n >= times, "{labels:?}: {n} more timings, expected {times}");
            let count = sample(&text, "storage_operation_duration_seconds_count", &labels);
            let inf = sample(
                &text,
                "storage_operation_duration_seconds_bucket",
                &[("backend", backend), ("op", op), ("le", "+Inf")],
            );
            assert_eq!(inf, count, "{labels:?}: +Inf bucket is the count");
            let sum = sample(&text, "storage_operation_duration_seconds_sum", &labels);
            assert!(sum.is_some_and(|s| s >= 0.0), "{labels:?}: sum {sum:?}");
        }
        let bytes_in = delta(
            "storage_bytes_total",
            &[("backend", backend), ("direction", "in")],
        );
        assert!(
            bytes_in >= written as f64,
            "{backend}: {bytes_in} bytes in, wrote {written}"
        );
        let bytes_out = delta(
            "storage_bytes_total",
            &[("backend", backend), ("direction", "out")],
        );
        assert!(
            bytes_out >= read as f64,
            "{backend}: {bytes_out} bytes out, read {read}"
        );
    }
    assert_described(
        &text,
        &[
            ("storage_operations_total", "counter"),
            ("storage_operation_duration_seconds", "histogram"),
            ("storage_bytes_total", "counter"),
        ],
    );
    promtool_check(&text);
    let _ = std::fs::remove_dir_all(&root);

    // The app's own backend (memory, in tests) is wrapped the same way: an upload and a download
    // through the artifact API count too.
    let before = scrape_text(&app).await;
    let body = vec![42u8; 4096];
    let res = app
        .client
        .put(app.url("/v1/artifacts/metered.bin"))
        .bearer_auth(&t.operator)
        .body(body.clone())
        .send()
        .await
        .expect("put");
    assert_eq!(res.status(), StatusCode::CREATED);
    let got = app.get("/v1/artifacts/metered.bin", &t.viewer).await;
    assert_eq!(got.status(), StatusCode::OK);
    assert_eq!(got.bytes().await.expect("body").as_ref(), &body[..]);
    let text = scrape_text(&app).await;
    let delta = |name: &str, labels: &[(&str, &str)]| {
        sample(&text, name, labels).unwrap_or_else(|| panic!("no {name}{labels:?} in:\n{text}"))
            - sample(&before, name, labels).unwrap_or(0.0)
    };
    for op in ["put", "get"] {
        let labels = [("backend", "memory"), ("op", op), ("outcome", "ok")];
        assert!(
            delta("storage_operations_total", &labels) >= 1.0,
            "{labels:?}"
        );
    }
    for direction in ["in", "out"] {
        let labels = [("backend", "memory"), ("direction", direction)];
        let n = delta("storage_bytes_total", &labels);
        assert!(n >= 4096.0, "{labels:?}: {n}");
    }
    promtool_check(&text);
}
