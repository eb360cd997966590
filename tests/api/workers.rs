//! The platform's own workers against real PostgreSQL as the app role, driven step by step:
//! episode analysis enqueued with the episode; policy evaluation opening and resolving violations
//! without repeated alerts; webhook notifications with a valid signature delivered to a local
//! receiver, retried after a failure; notification channel CRUD; cron ticks enqueued once with two
//! pools running; daily reflections and weekly reviews on the tenant's clock, with the period's
//! violations and dead jobs; hourly health snapshots; retention of finished jobs.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode as AxumStatus};
use chrono::{DateTime, Datelike, NaiveDate, Utc};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use cybernetic::config::Config;
use cybernetic::db::{Db, tenant as scope};
use cybernetic::domain::channel;
use cybernetic::domain::job::Queue;
use cybernetic::domain::schedule::Expr;
use cybernetic::domain::tenant::TenantId;
use cybernetic::jobs::cron::{Scheduled, Tick};
use cybernetic::jobs::maintenance::{self, FAILED_RETENTION};
use cybernetic::jobs::pool::Pool;
use cybernetic::jobs::{self, Enqueue, Job, JobContext, JobError, Registry};

use crate::helpers::{Options, Tenant, TestApp, eventually, expect_json, expect_problem};
use crate::jobs::{config, pool_running};

/// The platform's registry as `serve` builds it, with webhooks allowed over plain HTTP (the
/// receiver is local) and every schedule as configured by default.
fn platform(app: &TestApp) -> Pool {
    platform_with(app, &[])
}

/// [`platform`] with more settings (`CRON_*=off` to leave a schedule and its kind out).
fn platform_with(app: &TestApp, extra: &[(&'static str, &str)]) -> Pool {
    let mut env: HashMap<&str, String> = HashMap::from([
        ("DATABASE_URL", crate::helpers::app_url(&app.db_name)),
        ("WEBHOOK_ALLOW_HTTP", "true".to_owned()),
        ("WEBHOOK_TIMEOUT", "5s".to_owned()),
    ]);
    env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    let cfg = Config::from_source(&|k| env.get(k).cloned()).expect("config");
    pool_running(&app.db_name, Registry::platform(&cfg), config()).0
}

async fn spawn() -> TestApp {
    TestApp::spawn_with(Options::default().env("WEBHOOK_ALLOW_HTTP", "true")).await
}

/// Events of the tenant's log whose type starts with `prefix`, oldest first.
async fn events_of(app: &TestApp, token: &str, topics: &str) -> Vec<Value> {
    let res = app
        .get(
            &format!("/v1/events/history?topics={topics}&limit=200"),
            token,
        )
        .await;
    expect_json(res, StatusCode::OK).await["items"]
        .as_array()
        .expect("items")
        .clone()
}

/// Every job of `kind`, newest first, across pages.
async fn jobs_of(app: &TestApp, token: &str, kind: &str) -> Vec<Value> {
    list_jobs(app, token, &format!("kind={kind}&")).await
}

/// Every job the tenant sees, newest first, across pages; `filter` is `""` or `"name=value&"`.
async fn list_jobs(app: &TestApp, token: &str, filter: &str) -> Vec<Value> {
    let mut jobs = Vec::new();
    let mut path = format!("/v1/jobs?{filter}limit=200");
    loop {
        let page = expect_json(app.get(&path, token).await, StatusCode::OK).await;
        jobs.extend(page["items"].as_array().expect("items").iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/v1/jobs?{filter}limit=200&cursor={c}"),
            None => return jobs,
        }
    }
}

#[tokio::test]
async fn an_episode_is_analysed_by_the_job_enqueued_with_it() {
    let app = spawn().await;
    let t = app.tenant("analysis").await;
    let pool = platform(&app);
    for (title, content) in [
        ("Standup", "The budget review went fine. Budget approved."),
        ("Retro", "Deploys were slow again; the budget is fine."),
    ] {
        let res = app
            .post(
                "/v1/episodes",
                &t.operator,
                json!({"title": title, "content": content}),
            )
            .await;
        expect_json(res, StatusCode::CREATED).await;
    }
    let res = app
        .post(
            "/v1/episodes",
            &t.operator,
            json!({
                "title": "Incident 42",
                "content": "The pager fired at 03:00! Ask @Alice about the #outage and the runbook at https://wiki.example.com/runbooks/db. Mail ops@example.com. The outage lasted an hour; the outage report follows.",
            }),
        )
        .await;
    let episode = expect_json(res, StatusCode::CREATED).await;
    let id = episode["id"].as_str().expect("id").to_owned();
    assert_eq!(
        episode["analysis"],
        Value::Null,
        "analysed in the background"
    );
    assert_eq!(jobs_of(&app, &t.viewer, "episode_analysis").await.len(), 3);

    let ran = pool.run_due(Queue::Analysis, 10).await.expect("run");
    assert_eq!(ran.len(), 3);
    let episode = expect_json(
        app.get(&format!("/v1/episodes/{id}"), &t.viewer).await,
        StatusCode::OK,
    )
    .await;
    let analysis = &episode["analysis"];
    assert_eq!(analysis["analyzer"], "text");
    assert!(analysis["word_count"].as_u64().expect("word count") >= 25);
    assert_eq!(
        analysis["urls"],
        json!(["https://wiki.example.com/runbooks/db"])
    );
    assert_eq!(analysis["emails"], json!(["ops@example.com"]));
    assert_eq!(analysis["mentions"], json!(["alice"]));
    assert_eq!(analysis["tags"], json!(["outage"]));
    let keywords: Vec<&str> = analysis["top_keywords"]
        .as_array()
        .expect("keywords")
        .iter()
        .filter_map(|k| k["term"].as_str())
        .collect();
    assert_eq!(keywords.first(), Some(&"outage"), "{keywords:?}");

    let analysed = events_of(&app, &t.viewer, "episode.analyzed").await;
    assert_eq!(analysed.len(), 3);
    assert!(
        analysed
            .iter()
            .any(|e| e["data"]["episode_id"] == id.as_str() && e["data"]["analysis"] == *analysis)
    );
}

/// A webhook receiver on 127.0.0.1 that answers with the queued statuses (then 200) and hands
/// every request over.
struct Receiver {
    url: String,
    requests: mpsc::UnboundedReceiver<(HeaderMap, Bytes)>,
    statuses: Arc<Mutex<VecDeque<u16>>>,
    stop: CancellationToken,
}

impl Receiver {
    async fn start() -> Self {
        let (tx, requests) = mpsc::unbounded_channel();
        let statuses: Arc<Mutex<VecDeque<u16>>> = Arc::default();
        let answers = statuses.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let tx = tx.clone();
                let answers = answers.clone();
                async move {
                    let _ = tx.send((headers, body));
                    let status = answers.lock().expect("statuses").pop_front().unwrap_or(200);
                    AxumStatus::from_u16(status).expect("status")
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let stop = CancellationToken::new();
        let until = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { until.cancelled().await })
                .await
        });
        Self {
            url,
            requests,
            statuses,
            stop,
        }
    }

    async fn next(&mut self) -> (HeaderMap, Value, Bytes) {
        let (headers, body) = tokio::time::timeout(Duration::from_secs(10), self.requests.recv())
            .await
            .expect("a delivery within 10s")
            .expect("receiver open");
        let json = serde_json::from_slice(&body).expect("JSON body");
        (headers, json, body)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn create_webhook(
    app: &TestApp,
    t: &Tenant,
    url: &str,
    min_severity: &str,
) -> (String, String) {
    let res = app
        .post(
            "/v1/notification-channels",
            &t.admin,
            json!({"name": format!("hook {min_severity}"), "kind": "webhook", "url": url, "min_severity": min_severity}),
        )
        .await;
    let created = expect_json(res, StatusCode::CREATED).await;
    (
        created["id"].as_str().expect("id").to_owned(),
        created["secret"].as_str().expect("secret").to_owned(),
    )
}

async fn record(app: &TestApp, t: &Tenant, system: u8, state: Value) {
    let res = app
        .put(
            &format!("/v1/systems/{system}/state"),
            &t.operator,
            json!({"state": state}),
        )
        .await;
    expect_json(res, StatusCode::CREATED).await;
}

#[tokio::test]
async fn a_violation_is_alerted_once_through_a_signed_webhook_and_its_recovery_too() {
    let app = spawn().await;
    let t = app.tenant("alerts").await;
    let pool = platform(&app);
    let mut receiver = Receiver::start().await;
    let (channel_id, secret) = create_webhook(&app, &t, &receiver.url, "warning").await;
    // A channel for critical alerts only, which this warning must not reach.
    let (_, _) = create_webhook(&app, &t, &receiver.url, "critical").await;
    let res = app
        .post(
            "/v1/policies",
            &t.admin,
            json!({"name": "load", "rules": [
                {"system": 3, "path": "/load", "op": "gt", "threshold": 0.9,
                 "severity": "warning", "message": "S3 load above 90%"}
            ]}),
        )
        .await;
    let policy = expect_json(res, StatusCode::CREATED).await;
    // The policy's own evaluation: no state yet, nothing holds.
    pool.run_due(Queue::Critical, 10).await.expect("evaluate");

    record(&app, &t, 3, json!({"load": 0.95})).await;
    let ran = pool.run_due(Queue::Critical, 10).await.expect("evaluate");
    assert_eq!(ran.len(), 1);
    let violated = events_of(&app, &t.viewer, "policy.violated").await;
    assert_eq!(violated.len(), 1);
    let data = &violated[0]["data"];
    assert_eq!(data["policy_id"], policy["id"]);
    assert_eq!(data["value"], json!(0.95));
    assert_eq!(data["severity"], "warning");
    assert_eq!(data["message"], "S3 load above 90%");
    let open = expect_json(
        app.get("/v1/violations?state=open", &t.viewer).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(open["items"].as_array().map(Vec::len), Some(1));

    // The receiver fails the first delivery; the job retries it.
    receiver.statuses.lock().expect("statuses").push_back(500);
    let ran = pool
        .run_due(Queue::Notifications, 10)
        .await
        .expect("deliver");
    assert_eq!(ran.len(), 1, "one channel takes warnings");
    let (_, first, _) = receiver.next().await;
    let notification = jobs_of(&app, &t.viewer, "notification").await;
    assert_eq!(notification.len(), 1);
    assert_eq!(notification[0]["state"], "retrying");
    assert!(
        notification[0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("500")),
        "{}",
        notification[0]
    );
    // Due again after its backoff: bring it forward instead of waiting.
    let job_id = notification[0]["id"].as_str().expect("id").to_owned();
    bring_forward(&app, &t.id, &job_id).await;
    pool.run_due(Queue::Notifications, 10)
        .await
        .expect("deliver");
    let (headers, body, raw) = receiver.next().await;
    assert_eq!(body["id"], first["id"], "a retry is the same delivery");
    assert_eq!(
        headers["x-cybernetic-delivery"].to_str().expect("header"),
        job_id
    );
    assert_eq!(headers["x-cybernetic-event"], "policy.violated");
    let signature = headers["x-cybernetic-signature"].to_str().expect("header");
    assert!(
        channel::verify(&secret, signature, &raw),
        "signature verifies"
    );
    assert!(!channel::verify("whsec_wrong", signature, &raw));
    assert_eq!(body["channel_id"], channel_id.as_str());
    assert_eq!(body["tenant_id"], t.id.as_str());
    assert_eq!(body["event"]["type"], "policy.violated");
    assert_eq!(body["event"]["data"], *data);
    let job = expect_json(
        app.get(&format!("/v1/jobs/{job_id}"), &t.viewer).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(job["state"], "completed");
    assert_eq!(job["attempts"], 2);

    // Still too hot: no second alert while the violation persists.
    record(&app, &t, 3, json!({"load": 0.97})).await;
    pool.run_due(Queue::Critical, 10).await.expect("evaluate");
    assert_eq!(events_of(&app, &t.viewer, "policy.violated").await.len(), 1);
    assert!(
        pool.run_due(Queue::Notifications, 10)
            .await
            .expect("deliver")
            .is_empty()
    );

    // Cooled down: recovered, and that is delivered too.
    record(&app, &t, 3, json!({"load": 0.5})).await;
    pool.run_due(Queue::Critical, 10).await.expect("evaluate");
    let recovered = events_of(&app, &t.viewer, "policy.recovered").await;
    assert_eq!(recovered.len(), 1);
    assert_eq!(recovered[0]["data"]["violation_id"], data["violation_id"]);
    assert_eq!(recovered[0]["data"]["reason"], "recovered");
    assert_eq!(recovered[0]["data"]["resolved_value"], json!(0.5));
    pool.run_due(Queue::Notifications, 10)
        .await
        .expect("deliver");
    let (headers, body, raw) = receiver.next().await;
    assert_eq!(body["event"]["type"], "policy.recovered");
    let signature = headers["x-cybernetic-signature"].to_str().expect("header");
    assert!(channel::verify(&secret, signature, &raw));

    // Hot again: a new violation, alerted again.
    record(&app, &t, 3, json!({"load": 0.99})).await;
    pool.run_due(Queue::Critical, 10).await.expect("evaluate");
    assert_eq!(events_of(&app, &t.viewer, "policy.violated").await.len(), 2);
    // Deleting the policy resolves what it left open.
    let res = app
        .delete(
            &format!("/v1/policies/{}", policy["id"].as_str().expect("id")),
            &t.admin,
        )
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    pool.run_due(Queue::Critical, 10).await.expect("evaluate");
    let recovered = events_of(&app, &t.viewer, "policy.recovered").await;
    assert_eq!(recovered.len(), 2);
    assert_eq!(recovered[1]["data"]["reason"], "policy_deleted");
    let open = expect_json(
        app.get("/v1/violations?state=open", &t.viewer).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(open["items"], json!([]));
}

/// Makes a retrying job due now, inside the tenant's scope (as an operator could by waiting).
async fn bring_forward(app: &TestApp, tenant: &str, job: &str) {
    let mut tx = app.pool.begin().await.expect("begin");
    sqlx::query("select set_config('app.tenant_id', $1, true)")
        .bind(tenant)
        .execute(&mut *tx)
        .await
        .expect("scope");
    let done =
        sqlx::query("update jobs set run_at = now() where id = $1::uuid and state = 'retrying'")
            .bind(job)
            .execute(&mut *tx)
            .await
            .expect("update");
    assert_eq!(done.rows_affected(), 1);
    tx.commit().await.expect("commit");
}

#[tokio::test]
async fn notification_channels_are_managed_by_admins_and_never_show_their_secret_again() {
    let app = TestApp::spawn().await;
    let t = app.tenant("channels").await;
    let other = app.tenant("channels-other").await;
    // Plain HTTP is refused unless the operator allows it.
    expect_problem(
        app.post(
            "/v1/notification-channels",
            &t.admin,
            json!({"name": "a", "kind": "webhook", "url": "http://receiver.internal/hook"}),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
    for bad in [
        json!({"name": "a", "kind": "sms", "url": "https://e.com/"}),
        json!({"name": "a", "kind": "webhook", "url": "not a url"}),
        json!({"name": "a", "kind": "webhook", "url": "https://u:p@e.com/"}),
        json!({"name": "a", "kind": "webhook", "url": "https://e.com/", "min_severity": "loud"}),
        json!({"name": "", "kind": "webhook", "url": "https://e.com/"}),
    ] {
        expect_problem(
            app.post("/v1/notification-channels", &t.admin, bad).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        )
        .await;
    }
    expect_problem(
        app.post(
            "/v1/notification-channels",
            &t.operator,
            json!({"name": "a", "kind": "webhook", "url": "https://e.com/"}),
        )
        .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    let created = expect_json(
        app.post(
            "/v1/notification-channels",
            &t.admin,
            json!({"name": "ops", "kind": "webhook", "url": "https://hooks.example.com/ops"}),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    let id = created["id"].as_str().expect("id");
    assert!(
        created["secret"]
            .as_str()
            .is_some_and(|s| s.starts_with("whsec_"))
    );
    assert_eq!(created["min_severity"], "info");
    expect_problem(
        app.post(
            "/v1/notification-channels",
            &t.admin,
            json!({"name": "ops", "kind": "webhook", "url": "https://e.com/"}),
        )
        .await,
        StatusCode::CONFLICT,
        "conflict",
    )
    .await;
    let path = format!("/v1/notification-channels/{id}");
    let got = expect_json(app.get(&path, &t.admin).await, StatusCode::OK).await;
    assert_eq!(got["url"], "https://hooks.example.com/ops");
    assert!(got.get("secret").is_none(), "{got}");
    let listed = expect_json(
        app.get("/v1/notification-channels", &t.admin).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(listed["items"].as_array().map(Vec::len), Some(1));
    assert!(listed["items"][0].get("secret").is_none());
    let patched = expect_json(
        app.send(
            reqwest::Method::PATCH,
            &path,
            Some(&t.admin),
            Some(json!({"min_severity": "critical", "active": false})),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(patched["min_severity"], "critical");
    assert_eq!(patched["active"], false);
    assert_eq!(patched["url"], "https://hooks.example.com/ops");
    // Another tenant sees nothing of it.
    expect_problem(
        app.get(&path, &other.admin).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    expect_problem(
        app.delete(&path, &other.admin).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let events = events_of(&app, &t.viewer, "notification_channel.*").await;
    let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(
        types,
        [
            "notification_channel.created",
            "notification_channel.updated"
        ]
    );
    assert!(events.iter().all(|e| e["data"].get("secret").is_none()));
    assert_eq!(
        app.delete(&path, &t.admin).await.status(),
        StatusCode::NO_CONTENT
    );
    expect_problem(
        app.get(&path, &t.admin).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
}

/// A scheduled kind of the test's own that fires every second.
#[derive(Serialize, Deserialize)]
struct Beat(Tick);

impl From<Tick> for Beat {
    fn from(tick: Tick) -> Self {
        Self(tick)
    }
}

impl Scheduled for Beat {
    const LOCAL_TIME: bool = false;
}

impl Job for Beat {
    const KIND: &'static str = "beat";

    async fn run(self, _ctx: JobContext) -> Result<Value, JobError> {
        Ok(json!({"tick": self.0.at}))
    }
}

#[tokio::test]
async fn a_cron_tick_is_enqueued_once_with_two_pools_running() {
    let app = TestApp::spawn().await;
    let tenants = [app.tenant("cron-a").await, app.tenant("cron-b").await];
    let every_second =
        || Registry::new().schedule::<Beat>(Expr::parse("* * * * * *").expect("expr"));
    let (one, _) = pool_running(&app.db_name, every_second(), config());
    let (two, _) = pool_running(&app.db_name, every_second(), config());
    let stop = CancellationToken::new();
    let runs = [one.spawn(stop.clone()), two.spawn(stop.clone())];
    // Both schedulers catch up on the last five minutes at start, then follow the clock.
    eventually(
        Duration::from_secs(20),
        "ticks after both pools started",
        || async {
            jobs_of(&app, &tenants[1].viewer, "beat")
                .await
                .iter()
                .filter(|j| j["state"] == "completed")
                .count()
                >= 303
        },
    )
    .await;
    stop.cancel();
    for run in runs {
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("pool stops")
            .expect("pool task");
    }
    for t in &tenants {
        let ticks: Vec<Value> = jobs_of(&app, &t.viewer, "beat")
            .await
            .iter()
            .map(|j| j["args"]["at"].clone())
            .collect();
        let distinct: HashSet<String> = ticks.iter().map(Value::to_string).collect();
        assert!(ticks.len() >= 300, "{} ticks", ticks.len());
        assert_eq!(
            distinct.len(),
            ticks.len(),
            "no tick ran twice for a tenant"
        );
    }
    // Enqueueing the same window again, from both pools at once, adds nothing.
    let now = Utc::now();
    let since = now - chrono::Duration::seconds(30);
    let (a, b) = tokio::join!(
        one.enqueue_ticks(since, now - chrono::Duration::seconds(5)),
        two.enqueue_ticks(since, now - chrono::Duration::seconds(5))
    );
    assert_eq!(a.expect("enqueue") + b.expect("enqueue"), 0);
}

#[tokio::test]
async fn a_daily_reflection_summarises_the_tenants_day_on_its_own_clock() {
    let app = TestApp::spawn().await;
    let res = app
        .post(
            "/v1/tenants",
            &app.admin_token,
            json!({"name": "Kolkata", "slug": "kolkata", "settings": {"timezone": "Asia/Kolkata"}}),
        )
        .await;
    let created = expect_json(res, StatusCode::CREATED).await;
    assert_eq!(created["settings"]["timezone"], "Asia/Kolkata");
    let id = created["id"].as_str().expect("id").to_owned();
    let viewer = app.create_key(&id, "viewer").await;
    let operator = app.create_key(&id, "operator").await;
    let utc = app.tenant("utc").await;
    expect_problem(
        app.post(
            "/v1/tenants",
            &app.admin_token,
            json!({"name": "X", "slug": "x", "settings": {"timezone": "Mars/Base"}}),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;

    let k = Tenant {
        id: id.clone(),
        admin: String::new(),
        operator,
        viewer,
    };
    record(&app, &k, 1, json!({"ok": true})).await;
    record(&app, &k, 1, json!({"ok": true})).await;
    record(&app, &k, 4, json!({"plan": "x"})).await;
    let res = app
        .post(
            "/v1/episodes",
            &k.operator,
            json!({"title": "Planning", "content": "We planned the quarter."}),
        )
        .await;
    expect_json(res, StatusCode::CREATED).await;

    // The next day's ticks, enqueued ahead of time so the day they close includes this test's
    // writes: one 18:00 tick per timezone in the coming 24 hours.
    let pool = platform(&app);
    let now = Utc::now();
    let created = pool
        .enqueue_ticks(now, now + chrono::Duration::hours(24))
        .await
        .expect("enqueue");
    let jobs = jobs_of(&app, &k.viewer, "daily_reflection").await;
    assert_eq!(jobs.len(), 1, "one daily tick for the tenant");
    assert_eq!(
        jobs_of(&app, &utc.viewer, "daily_reflection").await.len(),
        1
    );
    // 24 hourly snapshots, 24 hourly storage reconciliations and one reflection for each tenant
    // (a weekly review only on Fridays).
    let weekly = jobs_of(&app, &k.viewer, "weekly_review").await.len()
        + jobs_of(&app, &utc.viewer, "weekly_review").await.len();
    assert_eq!(created, 2 * (24 + 24 + 1) + weekly as u64);
    // Running the analysis queue takes the reflections (and the episode's analysis).
    pool.run_due(Queue::Analysis, 10).await.expect("run");
    let listed = expect_json(
        app.get("/v1/reflections?kind=daily", &k.viewer).await,
        StatusCode::OK,
    )
    .await;
    let reflection = &listed["items"][0];
    assert_eq!(reflection["timezone"], "Asia/Kolkata");
    let end = chrono::DateTime::parse_from_rfc3339(reflection["period_end"].as_str().expect("end"))
        .expect("time");
    // 18:00 in Kolkata is 12:30 UTC.
    assert_eq!(end.with_timezone(&Utc).format("%H:%M").to_string(), "12:30");
    let summary = &reflection["summary"];
    assert_eq!(summary["states"]["recorded"], 3);
    assert_eq!(summary["states"]["by_system"], json!({"1": 2, "4": 1}));
    assert_eq!(summary["episodes"]["created"], 1);
    assert_eq!(summary["episodes"]["newest"][0]["title"], "Planning");
    let created_events = events_of(&app, &k.viewer, "reflection.created").await;
    assert_eq!(created_events.len(), 1);
    assert_eq!(created_events[0]["data"]["id"], reflection["id"]);
    let got = expect_json(
        app.get(
            &format!("/v1/reflections/{}", reflection["id"].as_str().expect("id")),
            &k.viewer,
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(got, *reflection);
    // The UTC tenant's reflection closes at 18:00 UTC and saw none of this.
    let theirs = expect_json(
        app.get("/v1/reflections", &utc.viewer).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(theirs["items"][0]["timezone"], "UTC");
    assert_eq!(theirs["items"][0]["summary"]["states"]["recorded"], 0);
    expect_problem(
        app.get("/v1/reflections?kind=monthly", &k.viewer).await,
        StatusCode::BAD_REQUEST,
        "invalid_query",
    )
    .await;

    // Hourly health (and storage reconciliation, on the same queue): one snapshot per tenant per
    // tick.
    let ran = pool.run_due(Queue::Default, 200).await.expect("run");
    assert_eq!(ran.len(), 2 * 48);
    let snapshots = events_of(&app, &k.viewer, "health.snapshot").await;
    assert_eq!(snapshots.len(), 24);
    let last = &snapshots[23]["data"];
    assert_eq!(last["status"], "ok");
    assert_eq!(last["systems"][0]["version"], 2);
    assert_eq!(last["systems"][1]["version"], Value::Null);
}

#[tokio::test]
async fn serve_runs_the_platform_workers_in_process() {
    let app = TestApp::spawn_with(Options::default().workers()).await;
    let t = app.tenant("in-process").await;
    let res = app
        .post(
            "/v1/episodes",
            &t.operator,
            json!({"title": "Note", "content": "Nothing to report. All quiet."}),
        )
        .await;
    let id = expect_json(res, StatusCode::CREATED).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    eventually(Duration::from_secs(10), "the episode analysed", || async {
        let episode = expect_json(
            app.get(&format!("/v1/episodes/{id}"), &t.viewer).await,
            StatusCode::OK,
        )
        .await;
        episode["analysis"]["sentence_count"] == 2
    })
    .await;
}

#[tokio::test]
async fn the_platform_admin_sets_a_tenants_timezone() {
    let app = TestApp::spawn().await;
    let t = app.tenant("zoned").await;
    let path = format!("/v1/tenants/{}", t.id);
    let patch = |token: String, body: Value| {
        let path = path.clone();
        let app = &app;
        async move {
            app.send(reqwest::Method::PATCH, &path, Some(&token), Some(body))
                .await
        }
    };
    let updated = expect_json(
        patch(
            app.admin_token.clone(),
            json!({"settings": {"timezone": "America/New_York"}}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(updated["settings"], json!({"timezone": "America/New_York"}));
    assert_eq!(updated["name"], "ZONED", "the name is kept");
    let renamed = expect_json(
        patch(app.admin_token.clone(), json!({"name": "Zoned Inc"})).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(renamed["settings"]["timezone"], "America/New_York");
    expect_problem(
        patch(
            app.admin_token.clone(),
            json!({"settings": {"timezone": "EST5"}}),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
    expect_problem(
        patch(
            app.admin_token.clone(),
            json!({"settings": {"locale": "en"}}),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
    expect_problem(
        patch(t.admin.clone(), json!({"name": "mine"})).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    expect_problem(
        app.send(
            reqwest::Method::PATCH,
            &format!("/v1/tenants/{}", uuid::Uuid::now_v7()),
            Some(&app.admin_token),
            Some(json!({"name": "ghost"})),
        )
        .await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    // The scheduler now sends this tenant New York's ticks.
    let pool = platform(&app);
    let now = Utc::now();
    pool.enqueue_ticks(now, now + chrono::Duration::hours(24))
        .await
        .expect("enqueue");
    let daily = jobs_of(&app, &t.viewer, "daily_reflection").await;
    assert_eq!(daily.len(), 1);
    assert_eq!(daily[0]["args"]["timezone"], "America/New_York");
}

/// Fails for good at its first attempt (a permanent error).
#[derive(Serialize, Deserialize)]
struct Doomed;

impl Job for Doomed {
    const KIND: &'static str = "doomed";

    async fn run(self, _ctx: JobContext) -> Result<Value, JobError> {
        Err(JobError::permanent("doomed from the start"))
    }
}

/// Fails an ordinary (retryable) way, with one attempt allowed: dead after it.
#[derive(Serialize, Deserialize)]
struct Spent;

impl Job for Spent {
    const KIND: &'static str = "spent";
    const MAX_ATTEMPTS: i32 = 1;

    async fn run(self, _ctx: JobContext) -> Result<Value, JobError> {
        Err(JobError::retry("out of attempts"))
    }
}

/// Completes at once.
#[derive(Serialize, Deserialize)]
struct Chore;

impl Job for Chore {
    const KIND: &'static str = "chore";

    async fn run(self, _ctx: JobContext) -> Result<Value, JobError> {
        Ok(json!({"done": true}))
    }
}

/// Enqueues `jobs` for `tenant` in one transaction; returns their ids in order.
async fn enqueue_all<J: Job>(db: &Db, tenant: &str, batch: &[J], how: Enqueue<'_>) -> Vec<Uuid> {
    let tenant = TenantId::from_uuid(tenant.parse().expect("tenant id"));
    let mut tx = scope::begin(db.primary(), tenant).await.expect("begin");
    let mut ids = Vec::with_capacity(batch.len());
    let mut wakes = Vec::new();
    for job in batch {
        let enqueued = jobs::enqueue(&mut tx, tenant, job, how.clone())
            .await
            .expect("enqueue");
        ids.push(enqueued.id);
        wakes.push(enqueued.wake);
    }
    tx.commit().await.expect("commit");
    for wake in wakes {
        wake.after_commit(db);
    }
    ids
}

/// Sets when finished jobs of the tenant finished, inside its scope (the way time passing would).
async fn set_finished_at(app: &TestApp, tenant: &str, ids: &[Uuid], at: DateTime<Utc>) {
    let mut tx = app.pool.begin().await.expect("begin");
    sqlx::query("select set_config('app.tenant_id', $1, true)")
        .bind(tenant)
        .execute(&mut *tx)
        .await
        .expect("scope");
    let done = sqlx::query(
        "update jobs set finished_at = $2
          where id = any($1) and state in ('completed', 'dead', 'cancelled')",
    )
    .bind(ids)
    .bind(at)
    .execute(&mut *tx)
    .await
    .expect("update");
    assert_eq!(done.rows_affected(), ids.len() as u64, "every job finished");
    tx.commit().await.expect("commit");
}

/// A tenant on `timezone`'s wall clock, with one key of each role.
async fn zoned_tenant(app: &TestApp, slug: &str, timezone: &str) -> Tenant {
    let res = app
        .post(
            "/v1/tenants",
            &app.admin_token,
            json!({"name": slug, "slug": slug, "settings": {"timezone": timezone}}),
        )
        .await;
    let id = expect_json(res, StatusCode::CREATED).await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    Tenant {
        admin: app.create_key(&id, "admin").await,
        operator: app.create_key(&id, "operator").await,
        viewer: app.create_key(&id, "viewer").await,
        id,
    }
}

fn timestamp(value: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(value.as_str().expect("a timestamp"))
        .expect("RFC 3339")
        .with_timezone(&Utc)
}

/// The tenant's reflections of `kind` (`daily` or `weekly`), newest first.
async fn reflections_of(app: &TestApp, token: &str, kind: &str) -> Vec<Value> {
    let listed = expect_json(
        app.get(&format!("/v1/reflections?kind={kind}"), token)
            .await,
        StatusCode::OK,
    )
    .await;
    listed["items"].as_array().expect("items").clone()
}

#[tokio::test]
async fn reflections_count_violations_and_dead_jobs_and_a_weekly_review_covers_its_week() {
    let app = TestApp::spawn().await;
    let k = zoned_tenant(&app, "kolkata-week", "Asia/Kolkata").await;
    let utc = app.tenant("utc-week").await;
    let pool = platform(&app);

    // Two rules on S3: a warning on load and a critical on errors; both hold, then load recovers.
    let res = app
        .post(
            "/v1/policies",
            &k.admin,
            json!({"name": "s3", "rules": [
                {"system": 3, "path": "/load", "op": "gt", "threshold": 0.9,
                 "severity": "warning", "message": "S3 load above 90%"},
                {"system": 3, "path": "/errors", "op": "gt", "threshold": 10,
                 "severity": "critical", "message": "S3 failing"}
            ]}),
        )
        .await;
    expect_json(res, StatusCode::CREATED).await;
    pool.run_due(Queue::Critical, 10).await.expect("evaluate");
    record(&app, &k, 3, json!({"load": 0.95, "errors": 20})).await;
    pool.run_due(Queue::Critical, 10).await.expect("evaluate");
    record(&app, &k, 3, json!({"load": 0.5, "errors": 20})).await;
    pool.run_due(Queue::Critical, 10).await.expect("evaluate");
    let open = expect_json(
        app.get("/v1/violations?state=open", &k.viewer).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(open["items"].as_array().map(Vec::len), Some(1), "{open}");
    assert_eq!(open["items"][0]["severity"], "critical");

    // Jobs that die: two at once (a permanent error), one on its last attempt; and one of another
    // tenant's, which this tenant's reflections must not count.
    let (failing, db) = pool_running(
        &app.db_name,
        Registry::new().register::<Doomed>().register::<Spent>(),
        config(),
    );
    let doomed = enqueue_all(&db, &k.id, &[Doomed, Doomed], Enqueue::default()).await;
    let spent = enqueue_all(&db, &k.id, &[Spent], Enqueue::default()).await;
    enqueue_all(&db, &utc.id, &[Doomed], Enqueue::default()).await;
    let ran = failing.run_due(Queue::Default, 10).await.expect("run");
    assert_eq!(ran.len(), 4);
    let dead = list_jobs(&app, &k.viewer, "state=dead&").await;
    assert_eq!(dead.len(), 3, "{dead:?}");

    // The next 18:00 in Kolkata (UTC+05:30, no daylight saving) after these writes, and the next
    // Friday 18:00 there: the daily and weekly periods that end then both hold this activity.
    let ist = chrono::FixedOffset::east_opt(5 * 3600 + 1800).expect("offset");
    let at_six = |day: NaiveDate| {
        day.and_hms_opt(18, 0, 0)
            .expect("18:00")
            .and_local_timezone(ist)
            .single()
            .expect("one instant")
            .with_timezone(&Utc)
    };
    let now = Utc::now();
    let mut day = now.with_timezone(&ist).date_naive();
    if at_six(day) <= now {
        day = day.succ_opt().expect("tomorrow");
    }
    let daily_end = at_six(day);
    while day.weekday() != chrono::Weekday::Fri {
        day = day.succ_opt().expect("next day");
    }
    let weekly_end = at_six(day);
    let week = chrono::Duration::days(7);

    // The daily tick alone (the weekly schedule off in this pool): only Kolkata's 18:00 falls on it.
    let daily_pool = platform_with(&app, &[("CRON_WEEKLY_REVIEW", "off")]);
    let created = daily_pool
        .enqueue_ticks(daily_end - chrono::Duration::seconds(1), daily_end)
        .await
        .expect("enqueue");
    assert_eq!(created, 1, "one daily tick, for the Kolkata tenant");
    let ran = daily_pool.run_due(Queue::Analysis, 10).await.expect("run");
    assert_eq!(ran.len(), 1);
    let daily = reflections_of(&app, &k.viewer, "daily").await;
    assert_eq!(daily.len(), 1);
    assert_eq!(timestamp(&daily[0]["period_end"]), daily_end);
    assert_eq!(
        timestamp(&daily[0]["period_start"]),
        daily_end - chrono::Duration::days(1)
    );
    let violations = json!({
        "opened": 2,
        "opened_by_severity": {"warning": 1, "critical": 1},
        "resolved": 1,
        "open_at_end": 1,
    });
    assert_eq!(
        daily[0]["summary"],
        json!({
            "states": {"recorded": 2, "by_system": {"3": 2}},
            "episodes": {"created": 0, "words": 0, "newest": []},
            "violations": violations,
            "failed_jobs": {"count": 3, "by_kind": {"doomed": 2, "spent": 1}},
        })
    );

    // Two of the dead jobs finished long ago: one exactly at the week's start (counted: a period
    // includes its start), one just before it (not counted).
    let start = weekly_end - week;
    set_finished_at(&app, &k.id, &doomed[..1], start).await;
    set_finished_at(
        &app,
        &k.id,
        &spent,
        start - chrono::Duration::milliseconds(1),
    )
    .await;

    // The weekly tick, Friday 18:00 on the tenant's clock, with the daily schedule off.
    let weekly_pool = platform_with(&app, &[("CRON_DAILY_REFLECTION", "off")]);
    let created = weekly_pool
        .enqueue_ticks(weekly_end - chrono::Duration::seconds(1), weekly_end)
        .await
        .expect("enqueue");
    assert_eq!(created, 1, "one weekly tick, for the Kolkata tenant");
    assert!(jobs_of(&app, &utc.viewer, "weekly_review").await.is_empty());
    let job = &jobs_of(&app, &k.viewer, "weekly_review").await[0];
    assert_eq!(job["args"]["timezone"], "Asia/Kolkata");
    assert_eq!(timestamp(&job["args"]["at"]), weekly_end);
    let ran = weekly_pool.run_due(Queue::Analysis, 10).await.expect("run");
    assert_eq!(ran.len(), 1);
    let weekly = reflections_of(&app, &k.viewer, "weekly").await;
    assert_eq!(weekly.len(), 1);
    let review = &weekly[0];
    assert_eq!(review["kind"], "weekly");
    assert_eq!(review["timezone"], "Asia/Kolkata");
    let end = timestamp(&review["period_end"]);
    assert_eq!(end, weekly_end);
    let local_end = end.with_timezone(&ist);
    assert_eq!(local_end.weekday(), chrono::Weekday::Fri);
    assert_eq!(local_end.format("%H:%M:%S").to_string(), "18:00:00");
    assert_eq!(timestamp(&review["period_start"]), start);
    assert_eq!(
        review["summary"],
        json!({
            "states": {"recorded": 2, "by_system": {"3": 2}},
            "episodes": {"created": 0, "words": 0, "newest": []},
            "violations": violations,
            "failed_jobs": {"count": 2, "by_kind": {"doomed": 2}},
        })
    );
    let announced = events_of(&app, &k.viewer, "reflection.created").await;
    let ids: Vec<&Value> = announced.iter().map(|e| &e["data"]["id"]).collect();
    assert_eq!(ids, [&daily[0]["id"], &review["id"]]);
    assert_eq!(announced[1]["data"]["summary"], review["summary"]);
    // The daily reflection was summarised when it ran: moving the jobs later changed nothing.
    assert_eq!(reflections_of(&app, &k.viewer, "daily").await, daily);
    assert!(reflections_of(&app, &utc.viewer, "weekly").await.is_empty());
}

#[tokio::test]
async fn retention_prunes_old_completed_and_dead_jobs_in_batches_and_keeps_the_rest() {
    let app = TestApp::spawn().await;
    let t = app.tenant("retention").await;
    let (pool, db) = pool_running(
        &app.db_name,
        Registry::new().register::<Chore>().register::<Doomed>(),
        config(),
    );
    let retention = config().retention;
    let day = chrono::Duration::days(1);
    let job_retention = chrono::Duration::from_std(retention).expect("retention");
    let failed_retention = chrono::Duration::from_std(FAILED_RETENTION).expect("retention");

    // More eligible jobs than prune_jobs deletes in one statement (1000), of both kinds of
    // retention, next to finished jobs that must stay.
    let completed = enqueue_all(
        &db,
        &t.id,
        &(0..702).map(|_| Chore).collect::<Vec<_>>(),
        Enqueue::default(),
    )
    .await;
    let dead = enqueue_all(
        &db,
        &t.id,
        &(0..401).map(|_| Doomed).collect::<Vec<_>>(),
        Enqueue::default(),
    )
    .await;
    let scheduled = enqueue_all(
        &db,
        &t.id,
        &[Chore],
        Enqueue {
            run_at: Some(Utc::now() + chrono::Duration::hours(1)),
            ..Enqueue::default()
        },
    )
    .await[0];
    let ran = pool.run_due(Queue::Default, 2000).await.expect("run");
    assert_eq!(ran.len(), 702 + 401, "everything due ran once");
    let (recent, completed) = completed.split_first().expect("jobs");
    let (younger_than_retention, old_completed) = completed.split_first().expect("jobs");
    let (dead_kept, old_dead) = dead.split_first().expect("jobs");
    assert_eq!(old_completed.len() + old_dead.len(), 1100);

    let now = Utc::now();
    // Completed: past JOB_RETENTION (pruned), and a day short of it (kept).
    set_finished_at(&app, &t.id, old_completed, now - job_retention - day).await;
    set_finished_at(
        &app,
        &t.id,
        &[*younger_than_retention],
        now - job_retention + day,
    )
    .await;
    // Dead: past 30 days (pruned), and past JOB_RETENTION but a day short of 30 days (kept).
    set_finished_at(&app, &t.id, old_dead, now - failed_retention - day).await;
    set_finished_at(&app, &t.id, &[*dead_kept], now - failed_retention + day).await;

    // The retentions upkeep prunes with: every eligible job, across batches, and nothing else.
    let pruned = maintenance::prune(&db, retention, FAILED_RETENTION, &CancellationToken::new())
        .await
        .expect("prune");
    assert_eq!(pruned, 1100);
    let again = maintenance::prune(&db, retention, FAILED_RETENTION, &CancellationToken::new())
        .await
        .expect("prune");
    assert_eq!(again, 0, "nothing left to prune");

    let left: HashMap<String, String> = list_jobs(&app, &t.viewer, "")
        .await
        .iter()
        .map(|j| {
            (
                j["id"].as_str().expect("id").to_owned(),
                j["state"].as_str().expect("state").to_owned(),
            )
        })
        .collect();
    let expected: HashMap<String, String> = [
        (recent, "completed"),
        (younger_than_retention, "completed"),
        (dead_kept, "dead"),
        (&scheduled, "scheduled"),
    ]
    .into_iter()
    .map(|(id, state)| (id.to_string(), state.to_owned()))
    .collect();
    assert_eq!(left, expected);
    for id in [old_completed[0], old_dead[0]] {
        expect_problem(
            app.get(&format!("/v1/jobs/{id}"), &t.viewer).await,
            StatusCode::NOT_FOUND,
            "not_found",
        )
        .await;
    }
}
