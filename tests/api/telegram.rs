//! The Telegram bot end to end: updates posted to `/telegram/webhook` as Telegram posts them, the
//! commands run by the in-process job pool against the real database, and the replies sent to a
//! fake Bot API (the one thing the tests cannot reach) that records every call and can answer 429,
//! 500 or 403 when told to.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode as AxumStatus;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{
    Options, Tenant, TestApp, eventually, expect_json, expect_problem, fresh_database,
    superuser_url,
};

const TOKEN: &str = "123456:test-token";
const SECRET: &str = "webhook-secret_0123456789";

/// An answer the fake gives to the next `sendMessage` instead of delivering.
#[derive(Debug, Clone, Copy)]
enum Scripted {
    TooManyRequests { retry_after: u64 },
}

#[derive(Default)]
struct FakeState {
    /// Every call: method and body.
    calls: Vec<(String, Value)>,
    script: VecDeque<Scripted>,
    /// Chats that blocked the bot: every send answers 403.
    blocked: HashSet<i64>,
    next_message_id: i64,
}

/// A fake Telegram Bot API on a local port.
#[derive(Clone)]
struct FakeBot {
    base: String,
    state: Arc<Mutex<FakeState>>,
}

async fn bot_method(
    State(state): State<Arc<Mutex<FakeState>>>,
    Path((bot, method)): Path<(String, String)>,
    Json(body): Json<Value>,
) -> (AxumStatus, Json<Value>) {
    let mut s = state.lock().expect("fake state");
    if bot != format!("bot{TOKEN}") {
        return (
            AxumStatus::UNAUTHORIZED,
            Json(json!({"ok": false, "error_code": 401, "description": "Unauthorized"})),
        );
    }
    s.calls.push((method.clone(), body.clone()));
    if method != "sendMessage" {
        return (AxumStatus::OK, Json(json!({"ok": true, "result": true})));
    }
    let chat = body["chat_id"].as_i64().unwrap_or_default();
    if s.blocked.contains(&chat) {
        return (
            AxumStatus::FORBIDDEN,
            Json(json!({"ok": false, "error_code": 403,
                        "description": "Forbidden: bot was blocked by the user"})),
        );
    }
    match s.script.pop_front() {
        Some(Scripted::TooManyRequests { retry_after }) => (
            AxumStatus::TOO_MANY_REQUESTS,
            Json(json!({"ok": false, "error_code": 429,
                        "description": format!("Too Many Requests: retry after {retry_after}"),
                        "parameters": {"retry_after": retry_after}})),
        ),
        None => {
            s.next_message_id += 1;
            (
                AxumStatus::OK,
                Json(json!({"ok": true, "result": {
                    "message_id": s.next_message_id, "chat": {"id": chat}, "text": body["text"]}})),
            )
        }
    }
}

impl FakeBot {
    async fn start() -> Self {
        let state = Arc::new(Mutex::new(FakeState::default()));
        let router = axum::Router::new()
            .route("/{bot}/{method}", axum::routing::post(bot_method))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self {
            base: format!("http://{addr}"),
            state,
        }
    }

    fn script(&self, answers: &[Scripted]) {
        self.state
            .lock()
            .expect("fake state")
            .script
            .extend(answers.iter().copied());
    }

    fn block(&self, chat: i64) {
        self.state.lock().expect("fake state").blocked.insert(chat);
    }

    fn unblock(&self, chat: i64) {
        self.state.lock().expect("fake state").blocked.remove(&chat);
    }

    /// The texts sent to `chat` (every attempt, including refused ones).
    fn sent_to(&self, chat: i64) -> Vec<String> {
        self.state
            .lock()
            .expect("fake state")
            .calls
            .iter()
            .filter(|(m, b)| m == "sendMessage" && b["chat_id"].as_i64() == Some(chat))
            .map(|(_, b)| b["text"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    fn calls_of(&self, method: &str) -> Vec<Value> {
        self.state
            .lock()
            .expect("fake state")
            .calls
            .iter()
            .filter(|(m, _)| m == method)
            .map(|(_, b)| b.clone())
            .collect()
    }

    /// Waits until `chat` has been sent a text containing `needle`; returns all texts sent to it.
    async fn wait_for(&self, chat: i64, needle: &str) -> Vec<String> {
        eventually(
            Duration::from_secs(20),
            &format!("a message with {needle:?} to {chat}"),
            || {
                let found = self.sent_to(chat).iter().any(|t| t.contains(needle));
                async move { found }
            },
        )
        .await;
        self.sent_to(chat)
    }
}

/// Whether the tenant's first linked chat is active, as `GET /v1/telegram/chats` shows it.
async fn first_chat_active(app: &TestApp, admin: &str) -> Option<bool> {
    let chats = expect_json(app.get("/v1/telegram/chats", admin).await, StatusCode::OK).await;
    chats["items"][0]["active"].as_bool()
}

fn options(bot: &FakeBot) -> Options {
    Options::default()
        .workers()
        .env("TELEGRAM_BOT_TOKEN", TOKEN)
        .env("TELEGRAM_WEBHOOK_SECRET", SECRET)
        .env("TELEGRAM_API_BASE", &bot.base)
        .env("JOB_POLL_INTERVAL", "50ms")
        // The tests send commands faster than people do; the limit has a test of its own.
        .env("TELEGRAM_CHAT_BURST", "100")
}

fn update(update_id: i64, chat: i64, text: &str) -> Value {
    json!({
        "update_id": update_id,
        "message": {
            "message_id": update_id,
            "date": 1_700_000_000,
            "from": {"id": chat, "is_bot": false, "first_name": "Ada", "username": "ada"},
            "chat": {"id": chat, "type": "private", "username": "ada"},
            "text": text,
        },
    })
}

async fn post_update(app: &TestApp, body: &Value) -> reqwest::Response {
    app.client
        .post(app.url("/telegram/webhook"))
        .header("X-Telegram-Bot-Api-Secret-Token", SECRET)
        .json(body)
        .send()
        .await
        .expect("request")
}

/// Sends `text` from `chat` as a new update.
async fn say(app: &TestApp, chat: i64, text: &str) {
    static NEXT: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(1_000);
    let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let res = post_update(app, &update(id, chat, text)).await;
    assert_eq!(res.status(), StatusCode::OK);
}

async fn link_code(app: &TestApp, t: &Tenant) -> String {
    let created = expect_json(
        app.post("/v1/telegram/link-codes", &t.admin, json!({}))
            .await,
        StatusCode::CREATED,
    )
    .await;
    assert!(created["expires_at"].is_string());
    created["code"].as_str().expect("code").to_owned()
}

/// A tenant with `chat` linked to it.
async fn linked(app: &TestApp, bot: &FakeBot, slug: &str, chat: i64) -> Tenant {
    let t = app.tenant(slug).await;
    let code = link_code(app, &t).await;
    say(app, chat, &format!("/start {code}")).await;
    bot.wait_for(chat, "Linked to").await;
    t
}

async fn jobs_of_kind(app: &TestApp, kind: &str) -> i64 {
    let pool = sqlx::PgPool::connect(&superuser_url(&app.db_name))
        .await
        .expect("superuser");
    let n = sqlx::query_scalar("select count(*) from jobs where kind = $1")
        .bind(kind)
        .fetch_one(&pool)
        .await
        .expect("count");
    pool.close().await;
    n
}

#[tokio::test]
async fn a_linked_chat_runs_commands_that_write_through_the_api_paths() {
    let bot = FakeBot::start().await;
    let app = TestApp::spawn_with(options(&bot)).await;
    let chat = 501;

    // Before linking only /start, /link and /help work.
    say(&app, chat, "/status").await;
    bot.wait_for(chat, "not linked").await;
    say(&app, chat, "/help").await;
    let texts = bot.wait_for(chat, "/subscribe").await;
    assert!(texts.iter().any(|t| t.contains("/start CODE")));

    let t = linked(&app, &bot, "acme", chat).await;
    let chats = expect_json(
        app.get("/v1/telegram/chats", &t.admin).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(chats["items"][0]["chat_id"], chat);
    assert_eq!(chats["items"][0]["active"], true);

    expect_json(
        app.put(
            "/v1/systems/1/state",
            &t.operator,
            json!({"state": {"throughput": 42}}),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    say(&app, chat, "/status").await;
    let texts = bot.wait_for(chat, "Systems").await;
    let status = texts
        .iter()
        .find(|t| t.contains("Systems"))
        .expect("status");
    assert!(status.contains("throughput"), "{status}");
    assert!(status.contains("S2 · no state recorded"), "{status}");

    // /episode records through the API's own path: the episode, its event, its analysis job.
    say(
        &app,
        chat,
        "/episode Night shift | Line 3 <stopped> & restarted",
    )
    .await;
    bot.wait_for(chat, "Recorded episode").await;
    let episodes = expect_json(app.get("/v1/episodes", &t.viewer).await, StatusCode::OK).await;
    assert_eq!(episodes["items"][0]["title"], "Night shift");
    assert_eq!(
        episodes["items"][0]["content"],
        "Line 3 <stopped> & restarted"
    );
    let history = expect_json(
        app.get(
            "/v1/events/history?topics=episode.created,telegram.*",
            &t.viewer,
        )
        .await,
        StatusCode::OK,
    )
    .await;
    let types: Vec<&str> = history["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|e| e["type"].as_str())
        .collect();
    assert!(types.contains(&"episode.created"), "{types:?}");
    assert!(types.contains(&"telegram.chat_linked"), "{types:?}");
    let analysis = expect_json(
        app.get("/v1/jobs?kind=episode_analysis", &t.viewer).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(analysis["items"].as_array().map(Vec::len), Some(1));

    // Replies are escaped for HTML, and recorded as delivered.
    say(&app, chat, "/episodes").await;
    let texts = bot.wait_for(chat, "Latest 1 episodes").await;
    assert!(texts.iter().any(|t| t.contains("Night shift")));
    say(&app, chat, "/frobnicate").await;
    bot.wait_for(chat, "I don't know /frobnicate").await;
    say(&app, chat, "/episodes 99").await;
    bot.wait_for(chat, "from 1 to 20").await;
    eventually(
        Duration::from_secs(10),
        "replies recorded as delivered",
        || async {
            let listed = expect_json(
                app.get(
                    &format!("/v1/notifications?chat_id={chat}&status=pending"),
                    &t.viewer,
                )
                .await,
                StatusCode::OK,
            )
            .await;
            listed["items"].as_array().is_some_and(Vec::is_empty)
        },
    )
    .await;
    let delivered = expect_json(
        app.get(
            "/v1/notifications?status=delivered&purpose=reply",
            &t.viewer,
        )
        .await,
        StatusCode::OK,
    )
    .await;
    let first = &delivered["items"][0];
    assert_eq!(first["chat_id"], chat);
    assert_eq!(first["message_ids"].as_array().map(Vec::len), Some(1));
    assert!(first["delivered_at"].is_string());
    expect_problem(
        app.get("/v1/notifications?status=lost", &t.viewer).await,
        StatusCode::BAD_REQUEST,
        "invalid_query",
    )
    .await;

    // /unlink, and the admin's view follows.
    say(&app, chat, "/unlink").await;
    bot.wait_for(chat, "Unlinked from").await;
    let chats = expect_json(
        app.get("/v1/telegram/chats", &t.admin).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(chats["items"].as_array().map(Vec::len), Some(0));
}

#[tokio::test]
async fn link_codes_are_single_use_expire_and_must_exist() {
    let bot = FakeBot::start().await;
    let app = TestApp::spawn_with(options(&bot)).await;
    let t = app.tenant("codes").await;
    let other = app.tenant("other").await;

    say(&app, 601, "/start WRONG-CODE1").await;
    bot.wait_for(601, "not valid").await;

    let code = link_code(&app, &t).await;
    say(&app, 602, &format!("/link {}", code.to_lowercase())).await;
    bot.wait_for(602, "Linked to").await;
    say(&app, 603, &format!("/start {code}")).await;
    bot.wait_for(603, "used already").await;

    // A chat linked to one tenant cannot take another's code without unlinking first.
    let second = link_code(&app, &other).await;
    say(&app, 602, &format!("/start {second}")).await;
    bot.wait_for(602, "linked to another organisation").await;

    let expired = link_code(&app, &t).await;
    let pool = sqlx::PgPool::connect(&superuser_url(&app.db_name))
        .await
        .expect("superuser");
    sqlx::query("update telegram_link_codes set expires_at = now() - interval '1 minute' where used_at is null and tenant_id = $1")
        .bind(uuid::Uuid::parse_str(&t.id).expect("id"))
        .execute(&pool)
        .await
        .expect("expire");
    say(&app, 604, &format!("/start {expired}")).await;
    bot.wait_for(604, "expired").await;

    // Only the one chat got linked; admins of other tenants see nothing, and role rules hold.
    let chats = expect_json(
        app.get("/v1/telegram/chats", &t.admin).await,
        StatusCode::OK,
    )
    .await;
    let ids: Vec<i64> = chats["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|c| c["chat_id"].as_i64())
        .collect();
    assert_eq!(ids, vec![602]);
    let theirs = expect_json(
        app.get("/v1/telegram/chats", &other.admin).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(theirs["items"].as_array().map(Vec::len), Some(0));
    expect_problem(
        app.delete("/v1/telegram/chats/602", &other.admin).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    expect_problem(
        app.post("/v1/telegram/link-codes", &t.operator, json!({}))
            .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    let res = app.delete("/v1/telegram/chats/602", &t.admin).await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    say(&app, 602, "/status").await;
    bot.wait_for(602, "not linked").await;
}

#[tokio::test]
async fn the_webhook_refuses_a_forged_secret_and_acknowledges_what_it_cannot_use() {
    let bot = FakeBot::start().await;
    let app = TestApp::spawn_with(options(&bot)).await;
    for secret in [None, Some("wrong"), Some("webhook-secret_012345678")] {
        let mut req = app
            .client
            .post(app.url("/telegram/webhook"))
            .json(&update(1, 700, "/help"));
        if let Some(secret) = secret {
            req = req.header("X-Telegram-Bot-Api-Secret-Token", secret);
        }
        let res = req.send().await.expect("request");
        expect_problem(res, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
    assert_eq!(
        jobs_of_kind(&app, "telegram_update").await,
        0,
        "nothing processed"
    );

    // Garbage and updates the bot does not use are acknowledged (Telegram would redeliver them).
    let res = app
        .client
        .post(app.url("/telegram/webhook"))
        .header("X-Telegram-Bot-Api-Secret-Token", SECRET)
        .body("{not json")
        .send()
        .await
        .expect("request");
    assert_eq!(res.status(), StatusCode::OK);
    let res = post_update(
        &app,
        &json!({"update_id": 5, "edited_message": {"message_id": 1}}),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(jobs_of_kind(&app, "telegram_update").await, 0);

    // A NUL (which PostgreSQL's jsonb cannot store) is dropped, not refused.
    let res = post_update(&app, &update(6, 701, "/he\u{0}lp")).await;
    let accepted = expect_json(res, StatusCode::OK).await;
    assert_eq!(accepted["duplicate"], false);
    bot.wait_for(701, "/subscribe").await;
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for outcome in ["unauthorized", "malformed", "ignored"] {
        assert!(
            metrics.contains(&format!("telegram_updates_total{{outcome=\"{outcome}\"}}")),
            "{outcome}"
        );
    }

    // Without a bot configured the webhook does not exist.
    let plain = TestApp::spawn().await;
    expect_problem(
        post_update(&plain, &update(1, 1, "/help")).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
}

#[tokio::test]
async fn a_redelivered_update_runs_once_across_two_replicas() {
    let bot = FakeBot::start().await;
    let db = fresh_database().await;
    let with_db = |o: Options| Options {
        db_name: Some(db.clone()),
        ..o
    };
    let a = TestApp::spawn_with(with_db(options(&bot))).await;
    let b = TestApp::spawn_with(with_db(options(&bot))).await;
    let t = linked(&a, &bot, "twice", 801).await;

    let body = update(42_000, 801, "/episode Once | only once");
    let first = expect_json(post_update(&a, &body).await, StatusCode::OK).await;
    let second = expect_json(post_update(&b, &body).await, StatusCode::OK).await;
    let third = expect_json(post_update(&a, &body).await, StatusCode::OK).await;
    assert_eq!(first["duplicate"], false);
    assert_eq!(second["duplicate"], true);
    assert_eq!(third["duplicate"], true);
    bot.wait_for(801, "Recorded episode").await;
    // Both replicas' pools have had time to pick up anything else there was to run.
    eventually(Duration::from_secs(10), "the reply delivered", || async {
        let listed = expect_json(
            a.get("/v1/notifications?status=pending", &t.viewer).await,
            StatusCode::OK,
        )
        .await;
        listed["items"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
    let episodes = expect_json(a.get("/v1/episodes", &t.viewer).await, StatusCode::OK).await;
    assert_eq!(episodes["items"].as_array().map(Vec::len), Some(1));
    let recorded = bot
        .sent_to(801)
        .iter()
        .filter(|t| t.contains("Recorded episode"))
        .count();
    assert_eq!(recorded, 1);

    // The same update delivered many times at once, to both replicas: batched together or not,
    // one delivery creates the job and every other is told it is a duplicate.
    let body = update(43_000, 801, "/whoami");
    let posts = (0..12).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        let body = body.clone();
        async move { expect_json(post_update(app, &body).await, StatusCode::OK).await }
    });
    let answers = futures::future::join_all(posts).await;
    let created = answers.iter().filter(|a| a["duplicate"] == false).count();
    assert_eq!(created, 1, "{answers:?}");
    bot.wait_for(801, "Organisation:").await;
}

#[tokio::test]
async fn a_chat_over_its_limit_gets_one_notice_then_silence() {
    let bot = FakeBot::start().await;
    let app = TestApp::spawn_with(
        options(&bot)
            .env("TELEGRAM_CHAT_RATE", "1")
            .env("TELEGRAM_CHAT_BURST", "3"),
    )
    .await;
    for _ in 0..8 {
        say(&app, 901, "/help").await;
    }
    bot.wait_for(901, "Easy there").await;
    // Every update was handled: 3 answered, 1 notice, 4 silent.
    let pool = sqlx::PgPool::connect(&superuser_url(&app.db_name))
        .await
        .expect("superuser");
    eventually(Duration::from_secs(20), "every update handled", || {
        let pool = pool.clone();
        async move {
            let done: i64 = sqlx::query_scalar(
                "select count(*) from jobs where kind = 'telegram_update' and state = 'completed'",
            )
            .fetch_one(&pool)
            .await
            .expect("count");
            done == 8
        }
    })
    .await;
    eventually(Duration::from_secs(10), "the replies sent", || {
        let n = bot.sent_to(901).len();
        async move { n >= 4 }
    })
    .await;
    let texts = bot.sent_to(901);
    assert_eq!(texts.len(), 4, "{texts:?}");
    assert_eq!(texts.iter().filter(|t| t.contains("Easy there")).count(), 1);
    // Another chat is not held back by this one.
    say(&app, 902, "/help").await;
    bot.wait_for(902, "/subscribe").await;
}

#[tokio::test]
async fn a_429_is_waited_out_and_a_403_deactivates_the_chat() {
    let bot = FakeBot::start().await;
    let app = TestApp::spawn_with(options(&bot)).await;
    let t = linked(&app, &bot, "limits", 1001).await;

    bot.script(&[Scripted::TooManyRequests { retry_after: 1 }]);
    say(&app, 1001, "/whoami").await;
    bot.wait_for(1001, "Organisation:").await;
    eventually(
        Duration::from_secs(30),
        "the reply recorded as delivered",
        || async {
            let listed = expect_json(
                app.get(
                    "/v1/notifications?status=delivered&purpose=reply",
                    &t.viewer,
                )
                .await,
                StatusCode::OK,
            )
            .await;
            listed["items"]
                .as_array()
                .is_some_and(|items| items.iter().any(|n| n["attempts"] == 2))
        },
    )
    .await;
    let attempts = bot
        .sent_to(1001)
        .iter()
        .filter(|t| t.contains("Organisation:"))
        .count();
    assert_eq!(
        attempts, 2,
        "429, then delivered after the wait Telegram asked for"
    );

    bot.block(1001);
    say(&app, 1001, "/status").await;
    eventually(
        Duration::from_secs(20),
        "the chat marked inactive",
        || async { first_chat_active(&app, &t.admin).await == Some(false) },
    )
    .await;
    let failed = expect_json(
        app.get("/v1/notifications?status=failed", &t.viewer).await,
        StatusCode::OK,
    )
    .await;
    let n = &failed["items"][0];
    assert!(
        n["last_error"].as_str().is_some_and(|e| e.contains("403")),
        "{n}"
    );
    // The chat is marked inactive within the attempt; the pool records the job dead just after.
    eventually(
        Duration::from_secs(10),
        "the delivery dead after one attempt",
        || async {
            let dead = expect_json(
                app.get("/v1/jobs?kind=notification&state=dead", &t.viewer)
                    .await,
                StatusCode::OK,
            )
            .await;
            dead["items"][0]["attempts"] == 1
        },
    )
    .await;

    // The user unblocks the bot and writes again: the chat is active again.
    bot.unblock(1001);
    say(&app, 1001, "/whoami").await;
    eventually(Duration::from_secs(20), "the chat active again", || async {
        first_chat_active(&app, &t.admin).await == Some(true)
    })
    .await;
    expect_problem(
        app.delete("/v1/telegram/chats/not-a-number", &t.admin)
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_path_parameter",
    )
    .await;
}

#[tokio::test]
async fn a_subscribed_chat_gets_the_violation_recorded_through_the_api() {
    let bot = FakeBot::start().await;
    let app = TestApp::spawn_with(options(&bot)).await;
    let t = linked(&app, &bot, "alerts", 1101).await;
    say(&app, 1101, "/subscribe policy.violated").await;
    bot.wait_for(1101, "Subscribed").await;
    say(&app, 1101, "/subscribe nope..x").await;
    bot.wait_for(1101, "give one event type").await;

    expect_json(
        app.post(
            "/v1/policies",
            &t.admin,
            json!({"name": "Throughput floor", "rules": [
                {"system": 1, "path": "/throughput", "op": "lt", "threshold": 10,
                 "severity": "critical", "message": "throughput below 10"}
            ]}),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    throughput(&app, &t, 3).await;
    let texts = bot.wait_for(1101, "🔔 policy.violated").await;
    let alert = texts
        .iter()
        .find(|t| t.contains("🔔 policy.violated"))
        .expect("alert");
    assert!(alert.contains("Throughput floor"), "{alert}");
    eventually(Duration::from_secs(10), "the alert recorded", || async {
        let listed = expect_json(
            app.get(
                "/v1/notifications?purpose=alert&status=delivered",
                &t.viewer,
            )
            .await,
            StatusCode::OK,
        )
        .await;
        listed["items"][0]["event_type"] == "policy.violated"
    })
    .await;
    // Only the subscribed type is pushed: the state itself, the policy and the jobs are not.
    assert!(!texts.iter().any(|t| t.contains("🔔 system.state")));

    // Muted, nothing is pushed; the chat still answers commands.
    say(&app, 1101, "/mute 1h").await;
    bot.wait_for(1101, "Alerts muted until").await;
    let count = |state: &'static str| {
        let app = &app;
        let t = &t;
        async move {
            let listed = expect_json(
                app.get(&format!("/v1/violations?state={state}"), &t.viewer)
                    .await,
                StatusCode::OK,
            )
            .await;
            listed["items"].as_array().map_or(0, Vec::len)
        }
    };
    // Evaluations read the latest states, so each step is awaited before the next.
    throughput(&app, &t, 50).await;
    eventually(
        Duration::from_secs(15),
        "the violation resolved",
        || async { count("resolved").await == 1 },
    )
    .await;
    throughput(&app, &t, 1).await;
    // Alerts are queued with the event, in its transaction: once the second violation is
    // committed, an alert for it would be there.
    eventually(
        Duration::from_secs(15),
        "the violation opened again",
        || async { count("open").await == 1 },
    )
    .await;
    let alerts = expect_json(
        app.get("/v1/notifications?purpose=alert", &t.viewer).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        alerts["items"].as_array().map(Vec::len),
        Some(1),
        "muted: the second violation was not pushed: {alerts}"
    );
    say(&app, 1101, "/violations").await;
    bot.wait_for(1101, "1 open violation").await;
}

/// Alert rows of a tenant: (notifications, notification jobs keyed for alerts).
async fn alert_rows(app: &TestApp, tenant: &str) -> (i64, i64) {
    let pool = sqlx::PgPool::connect(&superuser_url(&app.db_name))
        .await
        .expect("superuser");
    let counted = sqlx::query_as(
        "select (select count(*) from notifications
                  where tenant_id = $1::uuid and purpose = 'alert'),
                (select count(*) from jobs
                  where tenant_id = $1::uuid and idempotency_key like 'telegram:alert:%')",
    )
    .bind(tenant)
    .fetch_one(&pool)
    .await
    .expect("count");
    pool.close().await;
    counted
}

#[tokio::test]
async fn a_batch_append_alerts_each_matching_event_once_and_only_subscribed_tenants() {
    let bot = FakeBot::start().await;
    let app = TestApp::spawn_with(options(&bot)).await;
    let t = linked(&app, &bot, "batch", 1201).await;
    say(&app, 1201, "/subscribe n8n.*").await;
    bot.wait_for(1201, "Subscribed").await;
    let quiet = app.tenant("quiet").await;

    // One statement appends three events (as a group-committed publish does); two match.
    let append = "select max(event_position) from append_events($1::uuid, \
                  array['n8n.started', 'n8n.finished', 'other.thing'], \
                  array['{}', '{}', '{}']::jsonb[])";
    let last: i64 = sqlx::query_scalar(append)
        .bind(&t.id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(alert_rows(&app, &t.id).await, (2, 2));

    // Enqueueing the same events again records nothing twice.
    let mut tx = app.pool.begin().await.unwrap();
    sqlx::query("select set_config('app.tenant_id', $1, true)")
        .bind(&t.id)
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("select telegram_alerts_enqueue($1::uuid, $2 - 2, $2)")
        .bind(&t.id)
        .bind(last)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(alert_rows(&app, &t.id).await, (2, 2));

    // A tenant with no linked chat gets no alert rows.
    sqlx::query(append)
        .bind(&quiet.id)
        .execute(&app.pool)
        .await
        .unwrap();
    assert_eq!(alert_rows(&app, &quiet.id).await, (0, 0));
    bot.wait_for(1201, "n8n.finished").await;
}

async fn throughput(app: &TestApp, t: &Tenant, value: i64) {
    expect_json(
        app.put(
            "/v1/systems/1/state",
            &t.operator,
            json!({"state": {"throughput": value}}),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
}

#[tokio::test]
async fn a_long_reply_is_split_within_telegrams_limit() {
    let bot = FakeBot::start().await;
    let app = TestApp::spawn_with(options(&bot)).await;
    let t = linked(&app, &bot, "long", 1201).await;
    for i in 0..40 {
        let name = format!(
            "{i:02} {}",
            "policy with a long descriptive name & <markup> ".repeat(4)
        );
        expect_json(
            app.post(
                "/v1/policies",
                &t.admin,
                json!({"name": name.trim(), "rules": [
                    {"system": 1, "path": "/x", "op": "gt", "threshold": 1, "severity": "info"}
                ]}),
            )
            .await,
            StatusCode::CREATED,
        )
        .await;
    }
    say(&app, 1201, "/policies").await;
    // The parts are sent one after another: wait for the first policy's and the last one's.
    bot.wait_for(1201, "00 policy").await;
    bot.wait_for(1201, "39 policy").await;
    let parts: Vec<String> = bot
        .sent_to(1201)
        .into_iter()
        .filter(|t| t.contains("policy with a long"))
        .collect();
    assert!(parts.len() >= 2, "{} parts", parts.len());
    let mut lines = 0;
    for part in &parts {
        let shown = part
            .replace("<b>", "")
            .replace("</b>", "")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&");
        assert!(shown.encode_utf16().count() <= 4096);
        assert!(!part.contains("<markup>"), "escaped");
        lines += shown
            .lines()
            .filter(|l| l.contains("policy with a long"))
            .count();
    }
    assert_eq!(lines, 40, "no line lost");
    let notifications = expect_json(
        app.get("/v1/notifications?purpose=reply", &t.viewer).await,
        StatusCode::OK,
    )
    .await;
    let reply = &notifications["items"][0];
    assert_eq!(
        reply["message_ids"].as_array().map(Vec::len),
        Some(parts.len())
    );
}

/// Runs `cybernetic ARGS` with only the bot's settings, pointed at the fake Bot API.
async fn cli(bot: &FakeBot, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_cybernetic"))
        .args(args)
        .env_clear()
        .env("TELEGRAM_BOT_TOKEN", TOKEN)
        .env("TELEGRAM_WEBHOOK_SECRET", SECRET)
        .env("TELEGRAM_API_BASE", &bot.base)
        .output()
        .await
        .expect("run")
}

#[tokio::test]
async fn set_webhook_registers_the_fixed_secret_and_the_commands() {
    let bot = FakeBot::start().await;
    let url = "https://cyb.example.org/telegram/webhook";
    let out = cli(&bot, &["telegram", "set-webhook", "--url", url]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let set = bot.calls_of("setWebhook");
    assert_eq!(set.len(), 1);
    assert_eq!(set[0]["secret_token"], SECRET);
    assert_eq!(set[0]["url"], url);
    assert_eq!(set[0]["allowed_updates"], json!(["message"]));
    let commands = bot.calls_of("setMyCommands");
    let names: Vec<&str> = commands[0]["commands"]
        .as_array()
        .expect("commands")
        .iter()
        .filter_map(|c| c["command"].as_str())
        .collect();
    assert!(
        names.contains(&"status") && names.contains(&"subscribe"),
        "{names:?}"
    );

    let out = cli(
        &bot,
        &[
            "telegram",
            "set-webhook",
            "--url",
            "http://plain.example.org/hook",
        ],
    )
    .await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("https"));
    assert_eq!(bot.calls_of("setWebhook").len(), 1);

    let out = cli(&bot, &["telegram", "info"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(bot.calls_of("getWebhookInfo").len(), 1);
}
