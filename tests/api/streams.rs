//! Event streams at the connection level (the socket writer that serves connections opening with
//! `GET /v1/events`, and hyper for streams asked for later on a kept-alive connection), resumes
//! served from the hub's recent window, and group-committed publishing.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::events::{metric, positions, publish};
use crate::helpers::{Options, SseClient, TestApp, eventually, expect_json};

const WAIT: Duration = Duration::from_secs(10);

/// A raw HTTP/1.x connection, to see exactly what goes over the wire.
struct Raw {
    stream: TcpStream,
    read: Vec<u8>,
}

impl Raw {
    async fn connect(app: &TestApp) -> Self {
        Self {
            stream: TcpStream::connect(app.addr).await.expect("connect"),
            read: Vec::new(),
        }
    }

    async fn send(&mut self, request: &str) {
        self.stream
            .write_all(request.as_bytes())
            .await
            .expect("send request");
    }

    /// Reads until `needle` has arrived; returns everything read so far.
    async fn until(&mut self, needle: &str) -> String {
        let found = tokio::time::timeout(WAIT, async {
            loop {
                if String::from_utf8_lossy(&self.read).contains(needle) {
                    return;
                }
                let mut buf = [0u8; 4096];
                let n = self.stream.read(&mut buf).await.expect("read");
                assert!(
                    n > 0,
                    "connection closed before {needle:?}; got {:?}",
                    String::from_utf8_lossy(&self.read)
                );
                self.read.extend_from_slice(&buf[..n]);
            }
        })
        .await;
        let text = String::from_utf8_lossy(&self.read).into_owned();
        assert!(found.is_ok(), "no {needle:?} within {WAIT:?}; got {text:?}");
        text
    }

    /// Reads until the server closes; returns everything read.
    async fn read_to_close(&mut self) -> String {
        tokio::time::timeout(WAIT, self.stream.read_to_end(&mut self.read))
            .await
            .expect("server closes the connection")
            .expect("read");
        String::from_utf8_lossy(&self.read).into_owned()
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n\r\n").next()?.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

async fn operator(app: &TestApp, slug: &str) -> String {
    let tenant = app.create_tenant(slug).await;
    app.create_key(&tenant, "operator").await
}

/// Publishes `count` events of one type; returns their ids.
async fn publish_many(app: &TestApp, key: &str, event_type: &str, count: i64) -> Vec<i64> {
    let mut ids = Vec::new();
    for n in 0..count {
        ids.push(publish(app, key, event_type, n).await);
    }
    ids
}

/// Resumes counted so far: (from the log, from memory).
async fn replay_sources(app: &TestApp) -> (f64, f64) {
    (
        metric(app, "sse_replays_total{source=\"log\"}").await,
        metric(app, "sse_replays_total{source=\"memory\"}").await,
    )
}

#[tokio::test]
async fn a_connection_opening_with_a_stream_gets_chunked_frames_and_closes_after() {
    let app = TestApp::spawn().await;
    let key = operator(&app, "raw").await;
    let mut raw = Raw::connect(&app).await;
    raw.send(&format!(
        "GET /v1/events?topics=raw.* HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\nX-Request-Id: raw-1\r\n\r\n"
    ))
    .await;
    let head = raw.until("\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(header(&head, "content-type"), Some("text/event-stream"));
    assert_eq!(header(&head, "transfer-encoding"), Some("chunked"));
    assert_eq!(header(&head, "connection"), Some("close"));
    assert_eq!(header(&head, "x-request-id"), Some("raw-1"));
    assert!(header(&head, "date").is_some(), "{head}");
    // The first frame is the retry hint, as one chunk.
    raw.until("retry: 1000").await;

    let id = publish(&app, &key, "raw.ping", 7).await;
    let text = raw.until("event: raw.ping").await;
    // Chunk framing around the event: size line, frame, CRLF.
    let frame_at = text.find(&format!("id: {id}\n")).expect("event frame");
    let size_line = text[..frame_at].trim_end_matches("\r\n");
    let size_line = size_line.rsplit("\r\n").next().unwrap();
    let size = usize::from_str_radix(size_line, 16).expect("chunk size in hex");
    let frame = &text[frame_at..frame_at + size];
    assert!(frame.ends_with("\n\n"), "{frame:?}");
    assert!(frame.contains("\"n\":7"), "{frame:?}");
    assert_eq!(&text[frame_at + size..frame_at + size + 2], "\r\n");
}

#[tokio::test]
async fn refusals_on_the_stream_path_are_problems_and_close_the_connection() {
    let app = TestApp::spawn().await;
    let key = operator(&app, "refusals").await;

    // A handler refusal (bad topic pattern): problem+json with its length, then close.
    let mut raw = Raw::connect(&app).await;
    raw.send(&format!(
        "GET /v1/events?topics=Bad! HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\n\r\n"
    ))
    .await;
    let all = raw.read_to_close().await;
    assert!(all.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{all}");
    assert_eq!(
        header(&all, "content-type"),
        Some("application/problem+json")
    );
    assert_eq!(header(&all, "connection"), Some("close"));
    let body = all.split("\r\n\r\n").nth(1).unwrap();
    assert_eq!(
        header(&all, "content-length"),
        Some(body.len().to_string().as_str())
    );
    let problem: Value = serde_json::from_str(body).unwrap();
    assert_eq!(problem["status"], 400);

    // No credentials: 401.
    let mut raw = Raw::connect(&app).await;
    raw.send("GET /v1/events HTTP/1.1\r\nHost: test\r\n\r\n")
        .await;
    let all = raw.read_to_close().await;
    assert!(all.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{all}");

    // A head that is not HTTP: 400, before any handler.
    let mut raw = Raw::connect(&app).await;
    raw.send("GET /v1/events HTTP/1.1\r\nNo colon here\r\n\r\n")
        .await;
    let all = raw.read_to_close().await;
    assert!(all.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{all}");
    assert!(all.contains("\"code\":\"bad_request\""), "{all}");

    // A GET announcing a body: 400, whatever follows.
    let mut raw = Raw::connect(&app).await;
    raw.send(&format!(
        "GET /v1/events HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\nContent-Length: 5\r\n\r\nhello"
    ))
    .await;
    let all = raw.read_to_close().await;
    assert!(all.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{all}");
    assert!(all.contains("has no body"), "{all}");

    // An oversized head: 431.
    let mut raw = Raw::connect(&app).await;
    let filler = "x".repeat(20 * 1024);
    raw.send(&format!(
        "GET /v1/events HTTP/1.1\r\nHost: test\r\nX-Filler: {filler}\r\n\r\n"
    ))
    .await;
    let all = raw.read_to_close().await;
    assert!(
        all.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{all}"
    );

    // The server is unharmed: a stream still opens.
    let mut stream = SseClient::open(&app, "", &key, None).await;
    assert!(stream.frame(WAIT).await.is_some());
}

#[tokio::test]
async fn an_http_1_0_stream_is_delimited_by_closing() {
    let app = TestApp::spawn().await;
    let key = operator(&app, "old").await;
    let mut raw = Raw::connect(&app).await;
    raw.send(&format!(
        "GET /v1/events HTTP/1.0\r\nAuthorization: Bearer {key}\r\n\r\n"
    ))
    .await;
    let head = raw.until("retry: 1000").await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(header(&head, "transfer-encoding"), None);
    assert_eq!(header(&head, "connection"), Some("close"));
    publish(&app, &key, "old.one", 1).await;
    let text = raw.until("event: old.one").await;
    // No chunk sizes: frames follow the head directly.
    let body = text.split("\r\n\r\n").nth(1).unwrap();
    assert!(body.starts_with("id: "), "{body:?}");
}

#[tokio::test]
async fn a_stream_asked_for_on_a_kept_alive_connection_works_too() {
    let app = TestApp::spawn().await;
    let key = operator(&app, "keepalive").await;
    let mut raw = Raw::connect(&app).await;
    raw.send("GET /health HTTP/1.1\r\nHost: test\r\n\r\n").await;
    raw.until("\"status\"").await;
    raw.send(&format!(
        "GET /v1/events?topics=ka.x HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\n\r\n"
    ))
    .await;
    raw.until("text/event-stream").await;
    publish(&app, &key, "ka.x", 1).await;
    raw.until("event: ka.x").await;
}

#[tokio::test]
async fn a_client_that_goes_away_is_noticed_without_any_write() {
    // Heartbeats are an hour apart: only reading the socket can tell the client has gone.
    let app = TestApp::spawn_with(Options::default().env("SSE_HEARTBEAT", "1h")).await;
    let key = operator(&app, "gone").await;
    let mut raw = Raw::connect(&app).await;
    raw.send(&format!(
        "GET /v1/events HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\n\r\n"
    ))
    .await;
    raw.until("retry: 1000").await;
    eventually(WAIT, "the stream is counted", || async {
        metric(&app, "sse_connections").await == 1.0
    })
    .await;
    drop(raw);
    eventually(WAIT, "the closed stream is noticed", || async {
        metric(&app, "sse_connections").await == 0.0
            && metric(&app, "sse_disconnects_total{reason=\"client_closed\"}").await == 1.0
    })
    .await;
}

#[tokio::test]
async fn a_resume_inside_the_recent_window_replays_from_memory_without_gap_or_duplicate() {
    let app = TestApp::spawn().await;
    let key = operator(&app, "window").await;
    // One stream keeps the tenant's feed live in this process.
    let mut keeper = SseClient::open(&app, "", &key, None).await;
    let mut ids = Vec::new();
    for n in 0..6 {
        let topic = if n % 2 == 0 { "win.even" } else { "win.odd" };
        ids.push(publish(&app, &key, topic, n).await);
    }
    assert_eq!(keeper.events(6, WAIT).await.len(), 6);

    // Resume after the second event, for even ones only: events 3 and 5 (n = 2, 4).
    let mut resumed = SseClient::open(&app, "?topics=win.even", &key, Some(ids[1])).await;
    let first = resumed.frame(WAIT).await.unwrap();
    assert_eq!(
        first.position(),
        ids[1],
        "the first frame names the resume point"
    );
    let replayed = resumed.events(2, WAIT).await;
    assert_eq!(positions(&replayed), vec![ids[2], ids[4]]);
    assert_eq!(replay_sources(&app).await, (0.0, 1.0));

    // Then live, with nothing repeated.
    let live = publish(&app, &key, "win.even", 6).await;
    let next = resumed.event(WAIT).await.unwrap();
    assert_eq!(next.position(), live);
    drop(keeper);
}

#[tokio::test]
async fn the_first_resume_of_a_quiet_tenant_lets_the_next_ones_replay_from_memory() {
    let app = TestApp::spawn().await;
    let key = operator(&app, "storm").await;
    // Published while nobody listens: this process holds nothing of the tenant's log.
    let ids = publish_many(&app, &key, "storm.tick", 8).await;
    let mut first = SseClient::open(&app, "", &key, Some(ids[2])).await;
    let mut second = SseClient::open(&app, "?topics=storm.*", &key, Some(ids[2])).await;
    for stream in [&mut first, &mut second] {
        let replayed = stream.events(5, WAIT).await;
        assert_eq!(positions(&replayed), ids[3..].to_vec());
    }
    assert_eq!(replay_sources(&app).await, (1.0, 1.0));
    // Both go on live, once each.
    let live = publish(&app, &key, "storm.tick", 8).await;
    assert_eq!(first.event(WAIT).await.unwrap().position(), live);
    assert_eq!(second.event(WAIT).await.unwrap().position(), live);
}

#[tokio::test]
async fn a_reconnect_storm_on_a_quiet_tenant_reads_the_log_once() {
    let app = TestApp::spawn().await;
    let key = operator(&app, "burst-resume").await;
    let ids = publish_many(&app, &key, "resume.tick", 10).await;
    // Thirty clients resume from the same id at the same moment: one reads the log for the
    // tenant's feed, the others wait for it and replay from memory.
    let opens = (0..30).map(|_| SseClient::open(&app, "", &key, Some(ids[4])));
    let mut streams = futures::future::join_all(opens).await;
    for stream in &mut streams {
        let replayed = stream.events(5, WAIT).await;
        assert_eq!(positions(&replayed), ids[5..].to_vec());
    }
    assert_eq!(replay_sources(&app).await, (1.0, 29.0));
}

#[tokio::test]
async fn a_resume_older_than_the_window_reads_the_log() {
    // The smallest ring: 16 events stay in memory.
    let app = TestApp::spawn_with(Options::default().env("SSE_BUFFER", "16")).await;
    let key = operator(&app, "old-resume").await;
    let mut keeper = SseClient::open(&app, "", &key, None).await;
    let ids = publish_many(&app, &key, "old.tick", 40).await;
    assert_eq!(keeper.events(40, WAIT).await.len(), 40);

    let mut resumed = SseClient::open(&app, "", &key, Some(ids[2])).await;
    let replayed = resumed.events(37, WAIT).await;
    assert_eq!(positions(&replayed), ids[3..].to_vec());
    assert_eq!(replay_sources(&app).await, (1.0, 0.0));
}

#[tokio::test]
async fn concurrent_publishes_commit_every_event_once_in_position_order() {
    let app = TestApp::spawn().await;
    let key = operator(&app, "burst").await;
    let mut stream = SseClient::open(&app, "", &key, None).await;
    let publishes = (0..200).map(|n| {
        let app = &app;
        let key = key.clone();
        async move { publish(app, &key, "burst.n", n).await }
    });
    let mut ids = futures::future::join_all(publishes).await;
    ids.sort_unstable();
    assert_eq!(
        ids,
        (1..=200).collect::<Vec<i64>>(),
        "contiguous, none twice"
    );

    let frames = stream.events(200, WAIT).await;
    let seen: Vec<i64> = frames.iter().map(|f| f.position()).collect();
    assert_eq!(seen, ids, "delivered once each, in position order");
    // Each delivered envelope is the event published with that id.
    let history = expect_json(
        app.get("/v1/events/history?limit=200", &key).await,
        StatusCode::OK,
    )
    .await;
    for (frame, stored) in frames.iter().zip(history["items"].as_array().unwrap()) {
        assert_eq!(&frame.json(), stored);
    }
}
