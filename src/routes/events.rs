//! Events: clients publish their own (`POST /v1/events`), follow a tenant's log live over SSE
//! (`GET /v1/events`), or poll it (`GET /v1/events/history`). See docs/events.md.
//!
//! A stream subscribes to the hub before it reads the log, reads the log up to its head, then
//! follows the hub. It keeps `scanned`, the position up to which it has considered every event:
//! a delivery whose predecessor for this filter (`after`) it has already considered is sent at
//! once; any other, or a `Lagged` from the hub's ring, means events were skipped, and the stream
//! reads them from the log before going on.
//! Positions are contiguous per tenant, so this yields every event exactly once and in order.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{FutureExt, Stream};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use crate::db::events::{self, Event};
use crate::db::tenant as scope;
use crate::domain::ParseError;
use crate::domain::event_type::EventType;
use crate::domain::pagination::{Limit, decode_cursor, encode_cursor};
use crate::domain::tenant::TenantId;
use crate::domain::topic::TopicFilter;
use crate::events::batch::PublishError;
use crate::events::hub::{Delivery, Start};
use crate::events::{Live, control_frame, now_us};
use crate::http::error::ApiError;
use crate::http::extract::{AppJson, AppQuery, Operator, TenantAuth, Viewer, bearer_token_from};
use crate::http::middleware::record_tenant;
use crate::state::AppState;

use super::Page;

/// Largest `data` a client may publish, serialised.
const MAX_DATA_BYTES: usize = 64 * 1024;
/// Reconnect hint sent on connect and when the server closes the stream.
const RETRY: Duration = Duration::from_millis(1000);
/// Sent every `SSE_HEARTBEAT`, so proxies and clients see an idle stream is alive.
const HEARTBEAT: &[u8] = b": heartbeat\n\n";
/// Longest a new stream waits for another to read its tenant's feed start from the log.
const WARM_WAIT: Duration = Duration::from_secs(2);
/// Log pages read while replaying or catching up.
const PAGE: i64 = 500;
/// Catch-ups in a row, with no live event in between, before a stream that cannot keep up is
/// closed (the client reconnects with its last id and resumes from the log).
const MAX_LAG_CATCHUPS: u32 = 3;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Publish {
    #[serde(rename = "type")]
    event_type: String,
    data: Value,
}

#[tracing::instrument(skip_all)]
pub async fn publish(
    auth: TenantAuth<Operator>,
    State(state): State<AppState>,
    AppJson(body): AppJson<Publish>,
) -> Result<(StatusCode, Json<Event>), ApiError> {
    let event_type = EventType::parse(&body.event_type).map_err(ApiError::validation)?;
    if event_type.is_reserved() {
        return Err(ApiError::validation(ParseError::new(
            "type",
            "this namespace belongs to the platform's own events; choose another",
        )));
    }
    let size = serde_json::to_vec(&body.data)
        .map(|b| b.len())
        .unwrap_or(usize::MAX);
    if size > MAX_DATA_BYTES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("data is {size} bytes serialised; at most {MAX_DATA_BYTES} are accepted"),
        ));
    }
    crate::domain::reject_nul("data", &body.data).map_err(ApiError::validation)?;
    let event = state
        .events
        .publish(auth.tenant_id, event_type, body.data)
        .await
        .map_err(|e| match e {
            PublishError::Db(e) => ApiError::from(e),
            PublishError::Busy => ApiError::unavailable(format!("{e}; retry shortly"))
                .with_header(header::RETRY_AFTER, HeaderValue::from_static("1")),
            PublishError::Unavailable(_) => {
                ApiError::unavailable("the event could not be committed; retry shortly")
                    .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))
            }
        })?;
    Ok((StatusCode::CREATED, Json(event)))
}

#[derive(Debug, Deserialize)]
pub struct StreamQuery {
    topics: Option<String>,
    last_event_id: Option<String>,
    /// For browsers' EventSource, which cannot send headers. Never logged.
    access_token: Option<String>,
}

fn position(field: &'static str, raw: &str) -> Result<i64, ApiError> {
    raw.trim()
        .parse::<i64>()
        .ok()
        .filter(|p| *p >= 0)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_last_event_id",
                format!("{field} must be an event id (a non-negative integer)"),
            )
        })
}

pub async fn stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    AppQuery(query): AppQuery<StreamQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let token = match bearer_token_from(&headers) {
        Ok(token) => token.to_owned(),
        Err(missing) => query.access_token.clone().ok_or(missing)?,
    };
    let auth = TenantAuth::<Viewer>::from_token(&state, &token).await?;
    let tenant = auth.tenant_id;
    let filter = TopicFilter::parse(query.topics.as_deref()).map_err(ApiError::query)?;
    let last_id = match (headers.get("last-event-id"), query.last_event_id.as_deref()) {
        (Some(header), _) => {
            let raw = header
                .to_str()
                .map_err(|_| position("Last-Event-ID", "x").unwrap_err())?;
            Some(position("Last-Event-ID", raw)?)
        }
        (None, Some(raw)) => Some(position("last_event_id", raw)?),
        (None, None) => None,
    };
    record_tenant(tenant);

    // Subscribe first: anything committed after this is seen live, anything before is in the log
    // (or, when this process's feed for the tenant is live, in its recent window).
    let (subscription, mut start) = state.events.hub().subscribe(tenant, &filter, last_id);
    if let Start::Wait(warming) = start {
        // Another stream is reading this new feed's start from the log; share its reading
        // rather than each going to the log (a reconnect storm), unless it takes too long.
        start = match tokio::time::timeout(WARM_WAIT, warming).await {
            Ok(()) => state.events.hub().start(tenant, &filter, last_id),
            Err(_) => Start::Cold { warmer: None },
        };
        if let Start::Wait(_) = start {
            start = Start::Cold { warmer: None };
        }
    }
    let key_hash = crate::domain::api_key::hash_secret(&token);
    let follow_what = Follow {
        tenant,
        filter,
        key_hash,
    };
    if let Start::Warm { scanned, replay } = start {
        let begin = Begin {
            announced: last_id.unwrap_or(scanned),
            scanned,
            reset: None,
            replay: match last_id {
                Some(_) => Replay::Memory(replay),
                None => Replay::Nothing,
            },
        };
        let stream = follow(state.clone(), follow_what, subscription, begin);
        return Ok(event_stream(stream, state.config.events.heartbeat));
    }
    let mut tx = scope::begin(state.db.primary(), tenant).await?;
    let head = events::head(&mut tx, tenant).await?;
    let earliest = match last_id {
        Some(_) => events::earliest(&mut tx, tenant).await?,
        None => None,
    };
    // The first stream of a feed that resumes a little way back reads the events since its id
    // (all topics) for the feed: clients resuming from about the same point (a reconnect storm)
    // then replay from memory instead of each reading the log.
    let mut recent = Vec::new();
    if let (Start::Cold { warmer: Some(_) }, Some(last)) = (&start, last_id)
        && last < head
        && earliest.is_some_and(|e| e <= last + 1)
        && head - last <= state.events.hub().window() as i64
    {
        let all = TopicFilter::all();
        // Only an optimisation: if the read fails, the feed starts with an empty window.
        match events::page(&mut tx, tenant, last, head, &all, head - last).await {
            Ok(page) => recent = page.iter().map(|e| Arc::new(Live::new(e, None))).collect(),
            Err(e) => tracing::debug!(error = %e, "could not read a new feed's window"),
        }
    }
    scope::end_read(tx);
    state.events.hub().expect(tenant, head + 1, recent);

    let (scanned, reset) = match last_id {
        None => (head, None),
        Some(last) if last > head => (
            head,
            Some(reset_data(
                last,
                earliest,
                head,
                "the id is ahead of this tenant's log",
            )),
        ),
        Some(last) if last < head && earliest.is_none_or(|e| e > last + 1) => (
            head,
            Some(reset_data(
                last,
                earliest,
                head,
                "events after this id are past retention",
            )),
        ),
        Some(last) => (last, None),
    };
    let begin = Begin {
        // Before a reset, the first frame repeats the client's own id: a client that drops
        // between the two frames comes back with it and gets the reset again, rather than
        // resuming at the head without ever hearing that it missed events.
        announced: match (&reset, last_id) {
            (Some(_), Some(last)) => last,
            _ => scanned,
        },
        scanned,
        replay: match (last_id, &reset) {
            (Some(_), None) => Replay::Log,
            _ => Replay::Nothing,
        },
        reset,
    };
    let stream = follow(state.clone(), follow_what, subscription, begin);
    Ok(event_stream(stream, state.config.events.heartbeat))
}

fn reset_data(last: i64, earliest: Option<i64>, head: i64, reason: &str) -> Value {
    json!({
        "reason": reason,
        "last_event_id": last,
        "earliest_available": earliest,
        "resumes_after": head,
    })
}

/// Counts a stream open for as long as it lives, and why it ended.
struct Open {
    reason: &'static str,
}

impl Open {
    fn new() -> Self {
        metrics::gauge!("sse_connections").increment(1.0);
        Self {
            reason: "client_closed",
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        metrics::gauge!("sse_connections").decrement(1.0);
        metrics::counter!("sse_disconnects_total", "reason" => self.reason).increment(1);
    }
}

/// The `text/event-stream` response, with a heartbeat every `heartbeat`. Frames are written as
/// the stream yields them; an event's frame is the bytes the hub rendered once for every stream
/// that delivers it.
fn event_stream(
    frames: impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
    heartbeat: Duration,
) -> Response {
    let frames = Heartbeats::new(frames, heartbeat);
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            // Proxies that buffer responses (nginx) pass each frame on at once.
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(frames),
    )
        .into_response()
}

/// A stream of frames with a `: heartbeat` comment every tick, whatever the stream is doing:
/// waiting for events, or for the database while it catches up. It ends with the stream. The
/// timer is never reset per event (axum's keep-alive reset it on every frame).
struct Heartbeats<S> {
    frames: Pin<Box<S>>,
    tick: tokio::time::Interval,
}

impl<S> Heartbeats<S> {
    fn new(frames: S, heartbeat: Duration) -> Self {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            frames: Box::pin(frames),
            tick,
        }
    }
}

impl<S: Stream<Item = Result<Bytes, Infallible>>> Stream for Heartbeats<S> {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.tick.poll_tick(cx).is_ready() {
            return Poll::Ready(Some(Ok(Bytes::from_static(HEARTBEAT))));
        }
        self.frames.as_mut().poll_next(cx)
    }
}

/// `event: reset`: the client missed events beyond recovery; the stream goes on after `id`.
fn reset_frame(id: i64, data: &Value) -> Bytes {
    // Compact JSON: one `data:` line.
    control_frame(Some(id), Some("reset"), Some(&data.to_string()), None)
}

fn retry_frame() -> Bytes {
    control_frame(None, None, None, Some(RETRY))
}

/// What a stream follows, and with whose key.
struct Follow {
    tenant: TenantId,
    filter: TopicFilter,
    /// The key is checked again every heartbeat interval: a revoked key ends its streams.
    key_hash: [u8; 32],
}

/// How a stream begins.
struct Begin {
    /// The id of the first frame: where a client that drops before any event resumes.
    announced: i64,
    /// Every position up to here is accounted for (replayed below, or not wanted).
    scanned: i64,
    reset: Option<Value>,
    replay: Replay,
}

enum Replay {
    Nothing,
    /// The events after the client's id, taken from the hub's recent window.
    Memory(Vec<Arc<Live>>),
    /// Read the events after `scanned` from the log.
    Log,
}

fn follow(
    state: AppState,
    follow: Follow,
    mut subscription: crate::events::hub::Subscription,
    begin: Begin,
) -> impl Stream<Item = Result<Bytes, Infallible>> {
    let Follow {
        tenant,
        filter,
        key_hash,
    } = follow;
    let Begin {
        announced,
        mut scanned,
        reset,
        replay,
    } = begin;
    // Decided when the request is answered, not when the stream gets to it (after its replay).
    let delay = (!state.shutdown.is_cancelled()).then_some(state.config.shutdown.readiness_delay);
    async_stream::stream! {
        let mut open = Open::new();
        // Every frame that is not an event still carries the position reached, so a client that
        // reconnects before its first event resumes from here rather than from the live end.
        yield Ok(control_frame(Some(announced), None, None, Some(RETRY)));
        if let Some(reset) = reset {
            yield Ok(reset_frame(scanned, &reset));
        }
        let mut reason = None;
        match replay {
            Replay::Nothing => {}
            Replay::Log => {
                metrics::counter!("sse_replays_total", "source" => "log").increment(1);
                reason = Some("replay");
            }
            Replay::Memory(events) => {
                metrics::counter!("sse_replays_total", "source" => "memory").increment(1);
                metrics::counter!("sse_catchups_total", "reason" => "replay").increment(1);
                for live in events {
                    metrics::counter!("sse_events_sent_total").increment(1);
                    yield Ok(live.frame());
                }
            }
        }
        // Streams open when shutdown begins end when the listener stops accepting (after the
        // readiness delay, once the load balancer has taken the instance out), with a final
        // retry hint so clients come back through it to another replica. A stream opened during
        // the delay ends once its replay is out (one page at most from the log), so no stream
        // outlives the listener.
        let stop = {
            let shutdown = state.shutdown.clone();
            async move {
                shutdown.cancelled().await;
                if let Some(delay) = delay {
                    tokio::time::sleep(delay).await;
                }
            }
        };
        tokio::pin!(stop);
        // The key is checked again every heartbeat interval.
        let mut recheck = tokio::time::interval(state.config.events.heartbeat);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        recheck.tick().await;
        let mut lag_catchups = 0u32;
        'stream: loop {
            if let Some(why) = reason.take() {
                metrics::counter!("sse_catchups_total", "reason" => why).increment(1);
                // Boxed: a database future is large and lives only while it runs; the stream's own state,
                // resident for the whole connection, stays small.
                let upto = match Box::pin(read_head(&state, tenant)).await {
                    Ok(head) => head,
                    Err(e) => {
                        tracing::warn!(error = %e, "event stream could not read the log; closing it");
                        open.reason = "log_unavailable";
                        yield Ok(retry_frame());
                        break;
                    }
                };
                // Page by page, each page its own short transaction: a slow client never holds
                // a transaction open, and memory stays at one page.
                while scanned < upto {
                    match Box::pin(catch_up_page(&state, tenant, &filter, scanned, upto)).await {
                        Ok(CatchUp::Events(events, reached)) => {
                            for live in &events {
                                metrics::counter!("sse_events_sent_total").increment(1);
                                yield Ok(live.frame());
                            }
                            scanned = reached;
                        }
                        Ok(CatchUp::Pruned { earliest }) => {
                            // Retention overtook this reader: say so, and go on from what is kept
                            // (or, with nothing kept, from the end of the replay).
                            let resume = earliest.map_or(upto, |e| e - 1);
                            let data = reset_data(scanned, earliest, resume, "events after this id were pruned during replay");
                            yield Ok(reset_frame(resume, &data));
                            scanned = resume;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "event stream could not read the log; closing it");
                            open.reason = "log_unavailable";
                            yield Ok(retry_frame());
                            break 'stream;
                        }
                    }
                    if scanned < upto && (&mut stop).now_or_never().is_some() {
                        // Shutting down mid-replay: the client resumes after the last frame it
                        // received, on another replica.
                        open.reason = "shutdown";
                        yield Ok(retry_frame());
                        break 'stream;
                    }
                }
            }
            let received = tokio::select! {
                biased;
                () = &mut stop => {
                    open.reason = "shutdown";
                    yield Ok(retry_frame());
                    break;
                }
                _ = recheck.tick() => {
                    match Box::pin(state.keys.authenticate(state.db.primary(), &key_hash)).await {
                        Ok(Some(_)) | Err(_) => continue,
                        Ok(None) => {
                            open.reason = "key_revoked";
                            break;
                        }
                    }
                }
                received = subscription.recv() => received,
            };
            match received {
                Ok(delivery) if delivery.live.position <= scanned => {}
                // The hub examined every position since `after` for this filter: none matched.
                Ok(Delivery { after: Some(after), live }) if after <= scanned => {
                    scanned = live.position;
                    lag_catchups = 0;
                    if let Some(at) = live.published_at_us {
                        let seconds = (now_us() - at).max(0) as f64 / 1e6;
                        metrics::histogram!("event_delivery_seconds").record(seconds);
                    }
                    metrics::counter!("sse_events_sent_total").increment(1);
                    yield Ok(live.frame());
                }
                Ok(_) => reason = Some("gap"),
                Err(RecvError::Lagged(_)) => {
                    lag_catchups += 1;
                    if lag_catchups > MAX_LAG_CATCHUPS {
                        open.reason = "slow_consumer";
                        yield Ok(retry_frame());
                        break;
                    }
                    reason = Some("lagged");
                }
                Err(RecvError::Closed) => break,
            }
        }
    }
}

async fn read_head(state: &AppState, tenant: TenantId) -> Result<i64, crate::db::DbError> {
    let mut tx = scope::begin(state.db.primary(), tenant).await?;
    let head = events::head(&mut tx, tenant).await?;
    scope::end_read(tx);
    Ok(head)
}

enum CatchUp {
    /// Matching events after the cursor, and the position the page reached.
    Events(Vec<Arc<Live>>, i64),
    /// Events right after the cursor are gone; the log now starts at `earliest` (`None`: every
    /// event of the tenant is gone).
    Pruned { earliest: Option<i64> },
}

/// One page of the log after `after` (up to `upto`): the matching events and how far it reached.
async fn catch_up_page(
    state: &AppState,
    tenant: TenantId,
    filter: &TopicFilter,
    after: i64,
    upto: i64,
) -> Result<CatchUp, crate::db::DbError> {
    let mut tx = scope::begin(state.db.primary(), tenant).await?;
    // The page first, then the oldest retained position: retention deletes each tenant's oldest
    // events first (migration 000015), so if nothing right after `after` is gone once the page
    // has been read, nothing the page should hold was gone while it was read. (The other order,
    // under READ COMMITTED, could miss events pruned between the two statements.)
    let page = events::page(&mut tx, tenant, after, upto, filter, PAGE).await?;
    let earliest = events::earliest(&mut tx, tenant).await?;
    scope::end_read(tx);
    // Called only with `after < upto`: positions up to `upto` were committed, so no event left at
    // all means they were pruned too.
    if earliest.is_none_or(|e| e > after + 1) {
        return Ok(CatchUp::Pruned { earliest });
    }
    let reached = match page.last() {
        Some(last) if page.len() as i64 == PAGE => last.id,
        _ => upto,
    };
    Ok(CatchUp::Events(
        page.iter().map(|e| Arc::new(Live::new(e, None))).collect(),
        reached,
    ))
}

#[derive(Debug, Deserialize)]
pub struct HistoryQuery {
    topics: Option<String>,
    after: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

#[derive(Debug, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryCursor {
    after: i64,
}

/// `GET /v1/events/history`: events after a position, oldest first, for clients that poll.
#[tracing::instrument(skip_all)]
pub async fn history(
    auth: TenantAuth<Viewer>,
    State(state): State<AppState>,
    AppQuery(query): AppQuery<HistoryQuery>,
) -> Result<Json<Page<Event>>, ApiError> {
    let filter = TopicFilter::parse(query.topics.as_deref()).map_err(ApiError::query)?;
    let limit = Limit::parse(query.limit.as_deref()).map_err(ApiError::query)?;
    let after = match (
        decode_cursor::<HistoryCursor>(query.cursor.as_deref()).map_err(ApiError::query)?,
        &query.after,
    ) {
        (Some(cursor), _) => cursor.after,
        (None, Some(raw)) => raw.parse::<i64>().ok().filter(|p| *p >= 0).ok_or_else(|| {
            ApiError::query(ParseError::new(
                "after",
                "must be an event id (a non-negative integer)",
            ))
        })?,
        (None, None) => 0,
    };
    let mut tx = scope::begin_read(&state.db, auth.tenant_id).await?;
    let rows = events::page(
        &mut tx,
        auth.tenant_id,
        after,
        i64::MAX,
        &filter,
        limit.fetch(),
    )
    .await?;
    scope::end_read(tx);
    let mut items = rows;
    let next_cursor = if items.len() > limit.get() {
        items.truncate(limit.get());
        items
            .last()
            .map(|e| encode_cursor(&HistoryCursor { after: e.id }))
    } else {
        None
    };
    Ok(Json(Page { items, next_cursor }))
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    const DEADLINE: Duration = Duration::from_secs(10);

    async fn next(frames: &mut (impl Stream<Item = Result<Bytes, Infallible>> + Unpin)) -> Bytes {
        match tokio::time::timeout(DEADLINE, frames.next()).await {
            Ok(Some(Ok(frame))) => frame,
            other => panic!("no frame within {DEADLINE:?}: {other:?}"),
        }
    }

    #[tokio::test]
    async fn heartbeats_go_out_while_the_stream_waits_and_frames_keep_their_order() {
        // The inner stream stands for a catch-up: one frame, then a wait on the database (the
        // gate), then the frames the read returns.
        let (open, gate) = tokio::sync::oneshot::channel::<()>();
        let inner = async_stream::stream! {
            yield Ok(Bytes::from_static(b"id: 1\n\n"));
            let _ = gate.await;
            yield Ok(Bytes::from_static(b"id: 2\n\n"));
            yield Ok(Bytes::from_static(b"id: 3\n\n"));
        };
        let mut frames = Heartbeats::new(inner, Duration::from_millis(20));
        // (A heartbeat may come first if this task is slow to poll.)
        let mut first = next(&mut frames).await;
        while first == HEARTBEAT {
            first = next(&mut frames).await;
        }
        assert_eq!(first, &b"id: 1\n\n"[..]);
        // While the read is outstanding, only heartbeats come, one per interval.
        for _ in 0..3 {
            assert_eq!(next(&mut frames).await, HEARTBEAT);
        }
        open.send(()).expect("the stream waits on the gate");
        let mut after = Vec::new();
        while let Some(Ok(frame)) = tokio::time::timeout(DEADLINE, frames.next())
            .await
            .expect("the stream ends once its frames are out")
        {
            if frame != HEARTBEAT {
                after.push(frame);
            }
        }
        assert_eq!(after, [&b"id: 2\n\n"[..], &b"id: 3\n\n"[..]]);
    }
}
