//! Real-time events: SSE filters, auth, replay without gap or duplicate, the out-of-order-commit
//! race, backpressure, heartbeats, reset, fan-out between two servers through RabbitMQ and a
//! broker outage, history, and publishing.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{
    DbProxy, Options, SseClient, TestApp, eventually, expect_json, expect_problem, superuser_url,
};

const WAIT: Duration = Duration::from_secs(10);

fn amqp_host() -> String {
    std::env::var("TEST_AMQP_HOST").unwrap_or_else(|_| "127.0.0.1:5672".to_owned())
}

fn amqp_url(host: &str) -> String {
    format!("amqp://guest:guest@{host}/%2f")
}

pub async fn publish(app: &TestApp, key: &str, event_type: &str, n: i64) -> i64 {
    let body = expect_json(
        app.post(
            "/v1/events",
            key,
            json!({"type": event_type, "data": {"n": n}}),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    body["id"].as_i64().unwrap()
}

pub fn positions(frames: &[crate::helpers::SseFrame]) -> Vec<i64> {
    frames.iter().map(|f| f.position()).collect()
}

#[tokio::test]
async fn a_stream_delivers_matching_events_live_with_positions_as_ids() {
    let app = TestApp::spawn().await;
    let t = app.tenant("acme").await;
    let mut stream = SseClient::open(&app, "?topics=system.state,episode.*", &t.viewer, None).await;
    let hint = stream.frame(WAIT).await.unwrap();
    assert_eq!(hint.retry, Some(1000), "a retry hint comes first: {hint:?}");
    assert_eq!(
        hint.id.as_deref(),
        Some("0"),
        "carrying the position reached: {hint:?}"
    );

    expect_json(
        app.put(
            "/v1/systems/2/state",
            &t.operator,
            json!({"state": {"ok": true}}),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    let rules = json!([{"system": 1, "path": "", "op": "exists"}]);
    expect_json(
        app.post(
            "/v1/policies",
            &t.admin,
            json!({"name": "p", "rules": rules}),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    expect_json(
        app.post(
            "/v1/episodes",
            &t.operator,
            json!({"title": "E", "content": "c"}),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;

    let frames = stream.events(2, WAIT).await;
    assert_eq!(
        positions(&frames),
        [1, 3],
        "policy.created (position 2) is filtered out"
    );
    assert_eq!(frames[0].event.as_deref(), Some("system.state"));
    let envelope = frames[0].json();
    assert_eq!(envelope["id"], 1);
    assert_eq!(envelope["type"], "system.state");
    assert_eq!(envelope["tenant_id"], t.id.as_str());
    assert_eq!(envelope["data"]["state"]["ok"], true);
    assert!(envelope["occurred_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(frames[1].event.as_deref(), Some("episode.created"));
}

#[tokio::test]
async fn auth_topics_and_last_event_id_are_checked_before_the_stream_starts() {
    let app = TestApp::spawn().await;
    let t = app.tenant("acme").await;
    let url = app.url("/v1/events");
    expect_problem(
        app.client.get(&url).send().await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
    for query in ["?topics=Bad", "?topics=a..b", "?topics=*.x"] {
        let res = app
            .client
            .get(format!("{url}{query}"))
            .bearer_auth(&t.viewer)
            .send()
            .await
            .unwrap();
        expect_problem(res, StatusCode::BAD_REQUEST, "invalid_query").await;
    }
    for bad in ["abc", "-1", "1.5", "99999999999999999999"] {
        let res = app
            .client
            .get(&url)
            .bearer_auth(&t.viewer)
            .header("last-event-id", bad)
            .send()
            .await
            .unwrap();
        expect_problem(res, StatusCode::BAD_REQUEST, "invalid_last_event_id").await;
        let res = app
            .client
            .get(format!("{url}?last_event_id={bad}"))
            .bearer_auth(&t.viewer)
            .send()
            .await
            .unwrap();
        expect_problem(res, StatusCode::BAD_REQUEST, "invalid_last_event_id").await;
    }
    // Browsers' EventSource cannot set headers: the key may come as access_token.
    let res = app
        .client
        .get(format!("{url}?access_token={}", t.viewer))
        .send()
        .await
        .unwrap();
    let mut stream = SseClient::from_response(res).await;
    publish(&app, &t.operator, "custom.thing", 1).await;
    assert_eq!(
        stream.event(WAIT).await.unwrap().event.as_deref(),
        Some("custom.thing")
    );
    let res = app
        .client
        .get(format!("{url}?access_token=cyb_nope"))
        .send()
        .await
        .unwrap();
    expect_problem(res, StatusCode::UNAUTHORIZED, "unauthorized").await;
}

#[tokio::test]
async fn a_tenant_never_sees_another_tenants_events() {
    let app = TestApp::spawn().await;
    let a = app.tenant("acme").await;
    let b = app.tenant("globex").await;
    let mut sa = SseClient::open(&app, "", &a.viewer, Some(0)).await;
    let mut sb = SseClient::open(&app, "", &b.viewer, Some(0)).await;
    publish(&app, &a.operator, "only.a", 1).await;
    publish(&app, &b.operator, "only.b", 1).await;
    publish(&app, &a.operator, "only.a", 2).await;
    let got_a = sa.events(2, WAIT).await;
    let got_b = sb.events(1, WAIT).await;
    assert!(got_a.iter().all(|f| f.event.as_deref() == Some("only.a") && f.json()["tenant_id"] == a.id.as_str()));
    assert_eq!(positions(&got_a), [1, 2], "positions are per tenant");
    assert_eq!(got_b[0].event.as_deref(), Some("only.b"));
    assert_eq!(got_b[0].position(), 1);
    let history = expect_json(
        app.get("/v1/events/history", &b.viewer).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(history["items"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn replay_after_a_disconnect_has_no_gap_and_no_duplicate() {
    let app = TestApp::spawn().await;
    let t = app.tenant("acme").await;
    for n in 1..=5 {
        publish(&app, &t.operator, "tick", n).await;
    }
    let mut stream = SseClient::open(&app, "", &t.viewer, Some(2)).await;
    let replayed = stream.events(3, WAIT).await;
    assert_eq!(positions(&replayed), [3, 4, 5]);
    publish(&app, &t.operator, "tick", 6).await;
    assert_eq!(stream.event(WAIT).await.unwrap().position(), 6);
    drop(stream);

    // While disconnected, more events; the query-parameter form of the last id resumes too.
    publish(&app, &t.operator, "tick", 7).await;
    publish(&app, &t.operator, "tick", 8).await;
    let res = app
        .client
        .get(app.url("/v1/events?last_event_id=6"))
        .bearer_auth(&t.viewer)
        .send()
        .await
        .unwrap();
    let mut stream = SseClient::from_response(res).await;
    let resumed = stream.events(2, WAIT).await;
    assert_eq!(positions(&resumed), [7, 8]);
    publish(&app, &t.operator, "tick", 9).await;
    assert_eq!(stream.event(WAIT).await.unwrap().position(), 9);
}

#[tokio::test]
async fn concurrent_writers_cannot_commit_positions_out_of_order() {
    // The race: writer A takes a position, writer B comes later and commits first. With
    // positions assigned under the tenant's head row lock, B's append waits until A ends, so a
    // reader can never see B's position before A's, and an aborted append leaves no hole.
    let app = TestApp::spawn().await;
    let t = app.tenant("acme").await;
    let tenant = cybernetic::domain::tenant::TenantId::from_uuid(t.id.parse().unwrap());
    let mut stream = SseClient::open(&app, "", &t.viewer, Some(0)).await;
    let kind = cybernetic::domain::event_type::EventType::parse("race.step").unwrap();

    let mut a = cybernetic::db::tenant::begin(&app.pool, tenant)
        .await
        .unwrap();
    let first = cybernetic::db::events::append(&mut a, tenant, &kind, &json!({"writer": "a"}))
        .await
        .unwrap();
    assert_eq!(first.id, 1);

    let b = {
        let pool = app.pool.clone();
        let kind = kind.clone();
        tokio::spawn(async move {
            let mut b = cybernetic::db::tenant::begin(&pool, tenant).await.unwrap();
            let e = cybernetic::db::events::append(&mut b, tenant, &kind, &json!({"writer": "b"}))
                .await
                .unwrap();
            b.commit().await.unwrap();
            e
        })
    };
    eventually(WAIT, "writer B to wait for writer A", || async {
        let waiting: i64 = sqlx::query_scalar(
            // A row-lock wait is on the holder's transaction id, which names no database: find the
            // waiters through their backends.
            "select count(*) from pg_locks l join pg_stat_activity a using (pid)
              where not l.granted and a.datname = current_database()",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        waiting == 1
    })
    .await;
    assert!(!b.is_finished(), "B cannot commit while A holds the head");
    // A gives its position back: B takes position 1, no hole is left.
    a.rollback().await.unwrap();
    let second = b.await.unwrap();
    assert_eq!(second.id, 1);
    let seen = stream.event(WAIT).await.unwrap();
    assert_eq!(
        (seen.position(), seen.json()["data"]["writer"].clone()),
        (1, json!("b"))
    );

    // And committed in order: A2 holds, B2 waits, A2 commits, B2 follows.
    let mut a = cybernetic::db::tenant::begin(&app.pool, tenant)
        .await
        .unwrap();
    let a2 = cybernetic::db::events::append(&mut a, tenant, &kind, &json!({"writer": "a2"}))
        .await
        .unwrap();
    let b2 = {
        let pool = app.pool.clone();
        tokio::spawn(async move {
            let mut b = cybernetic::db::tenant::begin(&pool, tenant).await.unwrap();
            let e = cybernetic::db::events::append(&mut b, tenant, &kind, &json!({"writer": "b2"}))
                .await
                .unwrap();
            b.commit().await.unwrap();
            e
        })
    };
    a.commit().await.unwrap();
    let b2 = b2.await.unwrap();
    assert_eq!((a2.id, b2.id), (2, 3));
    // These bypassed the bus (written straight to the log): the hub's poll finds them.
    let frames = stream.events(2, WAIT).await;
    assert_eq!(positions(&frames), [2, 3]);
}

#[tokio::test]
async fn a_stalled_consumer_neither_blocks_others_nor_loses_events() {
    let app = TestApp::spawn_with(Options::default().env("SSE_BUFFER", "16")).await;
    let t = app.tenant("acme").await;
    let stalled = SseClient::open(&app, "", &t.viewer, Some(0)).await;
    let mut fast = SseClient::open(&app, "", &t.viewer, Some(0)).await;
    const N: i64 = 300;
    let blob = "x".repeat(20_000);
    for n in 1..=N {
        let res = app
            .post(
                "/v1/events",
                &t.operator,
                json!({"type": "bulk", "data": {"n": n, "blob": blob}}),
            )
            .await;
        assert_eq!(
            res.status(),
            StatusCode::CREATED,
            "publishing is never held up by a stalled reader"
        );
    }
    let fast_seen = fast.events(N as usize, WAIT).await;
    assert_eq!(positions(&fast_seen), (1..=N).collect::<Vec<_>>());

    // The stalled reader now reads: it is caught up from the log, or told to reconnect with its
    // last id; either way every event arrives once, in order.
    let mut seen: Vec<i64> = Vec::new();
    let mut stream = stalled;
    while (seen.len() as i64) < N {
        match stream.event(WAIT).await {
            Some(frame) => seen.push(frame.position()),
            None => {
                stream =
                    SseClient::open(&app, "", &t.viewer, seen.last().copied().or(Some(0))).await
            }
        }
    }
    assert_eq!(seen, (1..=N).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_gap_longer_than_the_buffer_is_read_from_the_log_by_each_stream_without_loss() {
    // The hub fills a gap it finds by its head poll with at most a ring's worth (16 here) of
    // events; a stream that misses the rest reads them from the log itself, page by page.
    let app = TestApp::spawn_with(Options::default().env("SSE_BUFFER", "16")).await;
    let t = app.tenant("acme").await;
    let mut stream = SseClient::open(&app, "", &t.viewer, None).await;
    stream.frame(WAIT).await.unwrap();
    const N: i64 = 700;
    // Straight to the log, past this process's bus: only the head poll can find them.
    append_past_the_bus(&app, &t.id, "direct", N as usize).await;
    let seen = stream.events(N as usize, WAIT).await;
    assert_eq!(positions(&seen), (1..=N).collect::<Vec<_>>());
    assert!(
        metric(&app, "sse_catchups_total{reason=\"gap\"}").await >= 1.0,
        "the stream read the skipped events from the log"
    );
    let next = publish(&app, &t.operator, "live", 0).await;
    assert_eq!(stream.event(WAIT).await.unwrap().position(), next);
}

#[tokio::test]
async fn heartbeats_keep_an_idle_stream_alive() {
    let app = TestApp::spawn_with(Options::default().env("SSE_HEARTBEAT", "200ms")).await;
    let t = app.tenant("acme").await;
    let mut stream = SseClient::open(&app, "", &t.viewer, None).await;
    let mut comments = 0;
    while comments < 2 {
        let frame = stream.frame(WAIT).await.unwrap();
        if frame.comment.as_deref() == Some("heartbeat") {
            comments += 1;
        }
    }
}

#[tokio::test]
async fn heartbeats_keep_coming_while_events_flow() {
    // Events every 50 ms never leave the stream silent for 300 ms; the heartbeat comes all the
    // same, so a proxy or client timing the heartbeat itself sees it on a busy stream too.
    let app = TestApp::spawn_with(Options::default().env("SSE_HEARTBEAT", "300ms")).await;
    let t = app.tenant("acme").await;
    let mut stream = SseClient::open(&app, "", &t.viewer, None).await;
    let mut pace = tokio::time::interval(Duration::from_millis(50));
    let mut heartbeats = 0;
    let mut delivered = 0;
    for n in 1..=120 {
        pace.tick().await;
        let id = publish(&app, &t.operator, "tick", n).await;
        loop {
            let frame = stream.frame(WAIT).await.unwrap();
            if frame.comment.as_deref() == Some("heartbeat") {
                heartbeats += 1;
            } else if frame.event.as_deref() == Some("tick") {
                assert_eq!(frame.position(), id);
                delivered += 1;
                break;
            }
        }
        if heartbeats >= 2 {
            break;
        }
    }
    assert!(
        heartbeats >= 2,
        "no heartbeat among {delivered} events published every 50 ms"
    );
}

#[tokio::test]
async fn an_id_beyond_recovery_starts_with_reset() {
    let app = TestApp::spawn().await;
    let t = app.tenant("acme").await;
    for n in 1..=4 {
        publish(&app, &t.operator, "old", n).await;
    }
    // Retention removes everything older than a cutoff in the future: all four events.
    let pruned: i32 = sqlx::query_scalar("select prune_events(now() + interval '1 minute', 1000)")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(pruned, 4);
    publish(&app, &t.operator, "new", 5).await;

    for (last, head) in [(1, 5), (99, 6)] {
        let mut stream = SseClient::open(&app, "", &t.viewer, Some(last)).await;
        // The first frame repeats the client's id, so a drop before the reset brings the client
        // back with it (and the reset again), never to the head without the reset.
        let first = stream.frame(WAIT).await.unwrap();
        assert_eq!((first.position(), first.retry), (last, Some(1000)));
        let reset = stream.frame(WAIT).await.unwrap();
        assert_eq!(reset.event.as_deref(), Some("reset"), "{reset:?}");
        assert_eq!(reset.json()["last_event_id"], last);
        assert_eq!(reset.json()["resumes_after"], head);
        assert_eq!(
            reset.position(),
            head,
            "the reset's id is where the stream goes on"
        );
        publish(&app, &t.operator, "after", last).await;
        let next = stream.event(WAIT).await.unwrap();
        assert_eq!(
            next.event.as_deref(),
            Some("after"),
            "live events follow the reset"
        );
    }
    // An id inside the retained range replays normally.
    let mut stream = SseClient::open(&app, "", &t.viewer, Some(4)).await;
    assert_eq!(stream.event(WAIT).await.unwrap().position(), 5);
}

#[tokio::test]
async fn retention_deletes_a_prefix_of_each_tenants_log_even_among_events_appended_together() {
    let app = TestApp::spawn().await;
    let t = app.tenant("acme").await;
    // Five events with one occurred_at (as one append gives them), stored last position first:
    // the order of the table and of the occurred_at index's equal keys is the reverse of the log's.
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&superuser_url(&app.db_name))
        .await
        .unwrap();
    sqlx::query(
        "insert into events (tenant_id, position, type, data, occurred_at) \
         select $1::uuid, p, 'a', '{}', now() - interval '1 day' \
         from generate_series(5, 1, -1) p",
    )
    .bind(&t.id)
    .execute(&mut admin)
    .await
    .unwrap();
    let pruned: i32 = sqlx::query_scalar("select prune_events(now() + interval '1 minute', 3)")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(pruned, 3);
    let left: Vec<i64> = sqlx::query_scalar(
        "select position from events where tenant_id = $1::uuid order by position",
    )
    .bind(&t.id)
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert_eq!(
        left,
        [4, 5],
        "the oldest positions go first, with no hole left behind"
    );
}

#[tokio::test]
async fn a_stream_opened_while_the_server_drains_ends_after_one_replay_page_and_older_ones_at_the_listeners_close()
 {
    const DELAY: Duration = Duration::from_secs(8);
    let mut app = TestApp::spawn_with(
        Options::default()
            .env("SHUTDOWN_READINESS_DELAY", "8s")
            // A small window: the late stream's replay comes from the log, in pages of 500.
            .env("SSE_BUFFER", "16"),
    )
    .await;
    let t = app.tenant("acme").await;
    append_past_the_bus(&app, &t.id, "bulk", 600).await;
    let mut early = SseClient::open(&app, "", &t.viewer, None).await;
    early.frame(WAIT).await.unwrap();
    // Shutdown begins; the listener still accepts until the readiness delay has passed.
    let began = tokio::time::Instant::now();
    app.shutdown.cancel();
    let mut late = SseClient::open(&app, "", &t.viewer, Some(0)).await;
    let mut replayed = Vec::new();
    let last = loop {
        let frame = late.frame(WAIT).await.expect("a final frame");
        if frame.event.is_some() {
            replayed.push(frame.position());
        } else if frame.retry.is_some() && frame.id.is_none() {
            break frame;
        }
    };
    assert_eq!(last.retry, Some(1000));
    assert!(
        late.frame(WAIT).await.is_none(),
        "then the late stream ends"
    );
    assert!(
        began.elapsed() < DELAY,
        "the late stream ended only after {:?}",
        began.elapsed()
    );
    // One page of the log, then the hint: the client resumes after 500 on another replica.
    assert_eq!(replayed, (1..=500).collect::<Vec<i64>>());
    // The stream open before shutdown ends when the listener closes, after the delay.
    let last = early.frame(DELAY + WAIT).await.expect("a final frame");
    assert_eq!(last.retry, Some(1000));
    assert!(
        began.elapsed() >= DELAY,
        "the early stream ended before the readiness delay"
    );
    assert!(early.frame(WAIT).await.is_none());
    app.stop().await.unwrap();
}

#[tokio::test]
async fn streams_end_promptly_on_shutdown_with_a_retry_hint() {
    let mut app = TestApp::spawn().await;
    let t = app.tenant("acme").await;
    let mut stream = SseClient::open(&app, "", &t.viewer, None).await;
    stream.frame(WAIT).await.unwrap();
    let started = tokio::time::Instant::now();
    app.stop().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "an open stream held the drain for {:?}",
        started.elapsed()
    );
    let last = stream.frame(WAIT).await.expect("a final frame");
    assert_eq!(last.retry, Some(1000));
    assert!(stream.frame(WAIT).await.is_none(), "then the stream ends");
}

#[tokio::test]
async fn publishing_validates_type_size_and_role_and_history_pages() {
    let app = TestApp::spawn().await;
    let t = app.tenant("acme").await;
    for bad in [
        "Bad.Type",
        "a..b",
        "",
        "x".repeat(101).as_str(),
        "system.state",
        "reset",
        "policy.violated",
    ] {
        let res = app
            .post("/v1/events", &t.operator, json!({"type": bad, "data": {}}))
            .await;
        expect_problem(res, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
    }
    let big = json!({"type": "big", "data": {"blob": "x".repeat(70_000)}});
    expect_problem(
        app.post("/v1/events", &t.operator, big).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    )
    .await;
    expect_problem(
        app.post("/v1/events", &t.viewer, json!({"type": "a", "data": {}}))
            .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    let res = app
        .send(
            Method::POST,
            "/v1/events",
            Some(&t.operator),
            Some(json!({"type": "a"})),
        )
        .await;
    expect_problem(res, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;

    for n in 1..=7 {
        publish(
            &app,
            &t.operator,
            if n % 2 == 0 { "even.n" } else { "odd.n" },
            n,
        )
        .await;
    }
    let mut seen = Vec::new();
    let mut path = "/v1/events/history?topics=odd.*&limit=2".to_owned();
    loop {
        let page = expect_json(app.get(&path, &t.viewer).await, StatusCode::OK).await;
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["id"].as_i64().unwrap()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/v1/events/history?topics=odd.*&limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen, [1, 3, 5, 7]);
    let after = expect_json(
        app.get("/v1/events/history?after=5", &t.viewer).await,
        StatusCode::OK,
    )
    .await;
    let ids: Vec<_> = after["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [6, 7]);
    expect_problem(
        app.get("/v1/events/history?after=x", &t.viewer).await,
        StatusCode::BAD_REQUEST,
        "invalid_query",
    )
    .await;
    expect_problem(
        app.get("/v1/events/history?cursor=zz", &t.viewer).await,
        StatusCode::BAD_REQUEST,
        "invalid_cursor",
    )
    .await;
}

/// Appends `n` events of one type (data `{"n": 1..=n}`) in one statement, as the app role but not
/// through the server: no process hands them to its hub.
async fn append_past_the_bus(app: &TestApp, tenant_id: &str, event_type: &str, n: usize) {
    let types = vec![event_type; n];
    let data: Vec<Value> = (1..=n).map(|n| json!({ "n": n })).collect();
    sqlx::query("select * from append_events($1::uuid, $2, $3)")
        .bind(tenant_id)
        .bind(&types)
        .bind(&data)
        .execute(&app.pool)
        .await
        .unwrap();
}

pub async fn metric(app: &TestApp, name: &str) -> f64 {
    let text = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn two_servers_fan_out_through_rabbitmq_and_keep_tenants_apart() {
    let a = TestApp::spawn_with(Options::default().env("AMQP_URL", &amqp_url(&amqp_host()))).await;
    let b = TestApp::spawn_with(
        Options {
            db_name: Some(a.db_name.clone()),
            ..Default::default()
        }
        .env("AMQP_URL", &amqp_url(&amqp_host())),
    )
    .await;
    let acme = a.tenant("acme").await;
    let globex = a.tenant("globex").await;
    let warm = a.tenant("warm").await;
    eventually(WAIT, "both servers to reach the broker", || async {
        publish(&a, &warm.operator, "warmup", 0).await;
        metric(&b, "event_broker_received_total").await > 0.0
    })
    .await;

    let mut acme_on_b = SseClient::open(&b, "", &acme.viewer, None).await;
    let mut globex_on_b = SseClient::open(&b, "", &globex.viewer, None).await;
    let received_before = metric(&b, "event_broker_received_total").await;
    publish(&a, &acme.operator, "written.on.a", 1).await;
    let frame = acme_on_b.event(WAIT).await.unwrap();
    assert_eq!(
        (frame.position(), frame.event.as_deref()),
        (1, Some("written.on.a"))
    );
    assert!(
        metric(&b, "event_broker_received_total").await > received_before,
        "delivered through RabbitMQ"
    );

    publish(&a, &globex.operator, "for.globex", 1).await;
    publish(&a, &acme.operator, "written.on.a", 2).await;
    let next = globex_on_b.event(WAIT).await.unwrap();
    assert_eq!(
        (next.event.as_deref(), next.json()["tenant_id"].clone()),
        (Some("for.globex"), json!(globex.id))
    );
    let next = acme_on_b.event(WAIT).await.unwrap();
    assert_eq!(
        next.position(),
        2,
        "acme's stream went straight from its 1 to its 2: {next:?}"
    );
    assert_eq!(next.json()["tenant_id"], acme.id.as_str());
}

#[tokio::test]
async fn a_broker_outage_loses_nothing() {
    let broker = DbProxy::to(&amqp_host()).await;
    let via_proxy = amqp_url(&format!("127.0.0.1:{}", broker.port));
    let a = TestApp::spawn_with(Options::default().env("AMQP_URL", &via_proxy)).await;
    let b = TestApp::spawn_with(
        Options {
            db_name: Some(a.db_name.clone()),
            ..Default::default()
        }
        .env("AMQP_URL", &via_proxy),
    )
    .await;
    let t = a.tenant("acme").await;
    let mut on_b = SseClient::open(&b, "", &t.viewer, Some(0)).await;

    publish(&a, &t.operator, "before", 1).await;
    assert_eq!(on_b.event(WAIT).await.unwrap().position(), 1);

    broker.cut();
    eventually(
        WAIT,
        "both servers to notice the broker is gone",
        || async {
            metric(&a, "event_broker_disconnects_total").await >= 1.0
                && metric(&b, "event_broker_disconnects_total").await >= 1.0
        },
    )
    .await;
    for n in 2..=4 {
        publish(&a, &t.operator, "during", n).await;
    }
    // No broker: the hub's head poll reads them from the log.
    assert_eq!(positions(&on_b.events(3, WAIT).await), [2, 3, 4]);

    broker.restore().await;
    let received = metric(&b, "event_broker_received_total").await;
    eventually(
        Duration::from_secs(20),
        "the broker path to work again",
        || async {
            publish(&a, &t.operator, "after", 0).await;
            metric(&b, "event_broker_received_total").await > received
        },
    )
    .await;
    let rest = on_b.events(1, WAIT).await;
    assert_eq!(
        rest[0].position(),
        5,
        "no gap and no duplicate across the outage"
    );
}

#[tokio::test]
async fn revoking_a_key_ends_its_open_streams() {
    let app = TestApp::spawn_with(Options::default().env("SSE_HEARTBEAT", "200ms")).await;
    let t = app.tenant("acme").await;
    let mut stream = SseClient::open(&app, "", &t.viewer, None).await;
    stream.frame(WAIT).await.unwrap();
    let keys = expect_json(app.get("/v1/api-keys", &t.admin).await, StatusCode::OK).await;
    let viewer = keys["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["role"] == "viewer")
        .unwrap();
    let res = app
        .delete(
            &format!("/v1/api-keys/{}", viewer["id"].as_str().unwrap()),
            &t.admin,
        )
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    while stream.frame(WAIT).await.is_some() {}
}

#[tokio::test]
async fn event_times_never_go_back_along_positions() {
    // Writer A's transaction starts first but appends second. Its event's time is when it entered
    // the log, so it is not older than B's: pruning by age removes a prefix of positions, never
    // position p + 1 before p.
    let app = TestApp::spawn().await;
    let t = app.tenant("clock").await;
    let tenant = cybernetic::domain::tenant::TenantId::from_uuid(t.id.parse().unwrap());
    let kind = cybernetic::domain::event_type::EventType::parse("clock.tick").unwrap();

    let mut a = cybernetic::db::tenant::begin(&app.pool, tenant)
        .await
        .unwrap();
    let a_started: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("select now()")
        .fetch_one(&mut *a)
        .await
        .unwrap();
    let b = cybernetic::db::events::append_many(&app.pool, tenant, &[(kind.clone(), json!({}))])
        .await
        .unwrap();
    let first = cybernetic::db::events::append(&mut a, tenant, &kind, &json!({}))
        .await
        .unwrap();
    a.commit().await.unwrap();
    assert_eq!((b[0].id, first.id), (1, 2));
    assert!(b[0].occurred_at > a_started, "B appended after A began");
    assert!(
        first.occurred_at >= b[0].occurred_at,
        "position 2 at {} is older than position 1 at {}",
        first.occurred_at,
        b[0].occurred_at
    );
}

#[tokio::test]
async fn live_and_replayed_copies_of_an_event_are_identical() {
    let app = TestApp::spawn().await;
    let t = app.tenant("numbers").await;
    let mut live = SseClient::open(&app, "", &t.viewer, None).await;
    // Numbers JSON can write several ways: the event carries them as stored.
    let body = r#"{"type": "num.mix", "data": {"z": -0.0, "e": 1e2, "f": 1.50, "i": 7, "big": 12345678901234567890123, "s": "\u00e9"}}"#;
    let published = expect_json(
        app.client
            .post(app.url("/v1/events"))
            .bearer_auth(&t.operator)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap(),
        StatusCode::CREATED,
    )
    .await;
    let live = live.event(WAIT).await.unwrap();
    let mut replay = SseClient::open(&app, "", &t.viewer, Some(0)).await;
    let replayed = replay.event(WAIT).await.unwrap();
    assert_eq!(live.data, replayed.data, "the same bytes live and replayed");
    let history = expect_json(
        app.get("/v1/events/history", &t.viewer).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(live.json(), history["items"][0]);
    assert_eq!(live.json(), published);
}
