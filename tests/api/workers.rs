//! The platform's own workers against real PostgreSQL as the app role, driven step by step:
//! episode analysis enqueued with the episode; policy evaluation opening and resolving violations
//! without repeated alerts; webhook notifications with a valid signature delivered to a local
//! receiver, retried after a failure; notification channel CRUD; cron ticks enqueued once with two
//! pools running; daily reflections on the tenant's clock; hourly health snapshots.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode as AxumStatus};
use chrono::Utc;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use cybernetic::config::Config;
use cybernetic::domain::channel;
use cybernetic::domain::job::Queue;
use cybernetic::domain::schedule::Expr;
use cybernetic::jobs::cron::{Scheduled, Tick};
use cybernetic::jobs::pool::Pool;
use cybernetic::jobs::{Job, JobContext, JobError, Registry};

use crate::helpers::{Options, Tenant, TestApp, eventually, expect_json, expect_problem};
use crate::jobs::{config, pool_running};

/// The platform's registry as `serve` builds it, with webhooks allowed over plain HTTP (the
/// receiver is local) and every schedule as configured by default.
fn platform(app: &TestApp) -> Pool {
    let env: HashMap<&str, String> = HashMap::from([
        ("DATABASE_URL", crate::helpers::app_url(&app.db_name)),
        ("WEBHOOK_ALLOW_HTTP", "true".to_owned()),
        ("WEBHOOK_TIMEOUT", "5s".to_owned()),
    ]);
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
    let mut jobs = Vec::new();
    let mut path = format!("/v1/jobs?kind={kind}&limit=200");
    loop {
        let page = expect_json(app.get(&path, token).await, StatusCode::OK).await;
        jobs.extend(page["items"].as_array().expect("items").iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/v1/jobs?kind={kind}&limit=200&cursor={c}"),
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
