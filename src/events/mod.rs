//! Real-time events. The log in PostgreSQL is the truth; this module only carries committed
//! events quickly to subscribers: the [`hub::Hub`] fans them out in position order inside one
//! process, and with `AMQP_URL` the [`broker`] carries them between processes. Anything the fast
//! path misses (broker down, slow client, reconnect) is read back from the log.

pub mod batch;
pub mod broker;
pub mod hub;
pub mod retention;

use std::ops::Range;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::db::events::Event;
use crate::domain::event_type::EventType;

/// A committed event on its way to subscribers, rendered once for all of them: every stream that
/// delivers it writes the same shared bytes.
#[derive(Debug)]
pub struct Live {
    pub position: i64,
    pub event_type: String,
    pub tenant_id: uuid::Uuid,
    /// The SSE frame `id: <position>\nevent: <type>\ndata: <envelope>\n\n`.
    frame: Bytes,
    /// Where the envelope `{"id", "type", "tenant_id", "occurred_at", "data"}` lies in `frame`.
    json: Range<usize>,
    /// When it was handed to the bus after commit (microseconds since the epoch); `None` when it
    /// was read back from the log, so delivery latency is not measured for it.
    pub published_at_us: Option<i64>,
}

impl Live {
    pub fn new(event: &Event, published_at_us: Option<i64>) -> Self {
        let mut frame = format!("id: {}\nevent: {}\ndata: ", event.id, event.event_type);
        let start = frame.len();
        // An envelope of strings, numbers and JSON values always serialises, and compact JSON
        // has no line break (those in strings are escaped), so it is one `data:` line.
        frame.push_str(&serde_json::to_string(event).unwrap_or_default());
        let end = frame.len();
        frame.push_str("\n\n");
        debug_assert!(
            !frame[..end].contains('\r') && frame[..end].matches('\n').count() == 2,
            "an event frame's fields are single lines"
        );
        Self {
            position: event.id,
            event_type: event.event_type.clone(),
            tenant_id: event.tenant_id,
            frame: Bytes::from(frame),
            json: start..end,
            published_at_us,
        }
    }

    /// The envelope as JSON text.
    pub fn json(&self) -> &[u8] {
        &self.frame[self.json.clone()]
    }

    /// The event's SSE frame (a reference-counted view: no copy).
    pub fn frame(&self) -> Bytes {
        self.frame.clone()
    }
}

/// An SSE frame that is not an event of the log: a position, a `retry:` hint, or a named event
/// with one line of data (`data` must hold no line break).
pub fn control_frame(
    id: Option<i64>,
    event: Option<&str>,
    data: Option<&str>,
    retry: Option<std::time::Duration>,
) -> Bytes {
    debug_assert!(
        [event, data]
            .iter()
            .flatten()
            .all(|field| !field.contains(['\r', '\n'])),
        "a control frame's fields are single lines"
    );
    let mut frame = String::new();
    if let Some(id) = id {
        frame.push_str(&format!("id: {id}\n"));
    }
    if let Some(event) = event {
        frame.push_str(&format!("event: {event}\n"));
    }
    if let Some(data) = data {
        frame.push_str(&format!("data: {data}\n"));
    }
    if let Some(retry) = retry {
        frame.push_str(&format!("retry: {}\n", retry.as_millis()));
    }
    frame.push('\n');
    Bytes::from(frame)
}

pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// What handlers use: hand committed events over; subscribe to a tenant's stream.
#[derive(Clone)]
pub struct EventBus {
    hub: Arc<hub::Hub>,
    broker: Option<broker::Broker>,
    batcher: Arc<batch::Batcher>,
}

impl EventBus {
    pub fn new(hub: Arc<hub::Hub>, broker: Option<broker::Broker>) -> Self {
        Self {
            hub,
            broker,
            batcher: Arc::default(),
        }
    }

    pub fn hub(&self) -> &Arc<hub::Hub> {
        &self.hub
    }

    /// Call after the transaction that appended `events` has committed.
    pub async fn committed(&self, events: &[Event]) {
        for event in events {
            metrics::counter!("events_appended_total", "type" => type_label(&event.event_type))
                .increment(1);
            let live = Arc::new(Live::new(event, Some(now_us())));
            self.hub.offer(live.clone());
            if let Some(broker) = self.broker.clone() {
                // Off the request's path: a slow broker never delays the answer to a write.
                tokio::spawn(async move { broker.publish(&live).await });
            }
        }
    }
}

/// Platform types by name; every client-defined type as `custom`, so labels stay bounded.
fn type_label(event_type: &str) -> &'static str {
    EventType::PLATFORM
        .iter()
        .find(|t| **t == event_type)
        .copied()
        .unwrap_or("custom")
}

pub fn describe_metrics() {
    metrics::describe_counter!(
        "events_appended_total",
        "Events committed to the log, by type (client-defined types as custom)."
    );
    metrics::describe_gauge!("sse_connections", "Open event streams.");
    metrics::describe_counter!("sse_events_sent_total", "Events written to event streams.");
    metrics::describe_counter!(
        "sse_catchups_total",
        "Times a stream was caught up from the log, by reason (replay, lagged, gap)."
    );
    metrics::describe_counter!(
        "sse_replays_total",
        "Streams resumed with a Last-Event-ID, by where the replay came from (memory: the hub's recent window; log: the database)."
    );
    metrics::describe_counter!(
        "sse_disconnects_total",
        "Event streams ended by the server, by reason."
    );
    metrics::describe_histogram!(
        "event_delivery_seconds",
        metrics::Unit::Seconds,
        "Time from handing a committed event to the bus until a stream yields it to the connection."
    );
    metrics::describe_counter!(
        "event_bus_gap_fills_total",
        "Times the hub read missing positions back from the log."
    );
    metrics::describe_counter!("events_pruned_total", "Events deleted by retention.");
    metrics::describe_counter!(
        "event_broker_received_total",
        "Events received from the broker (RabbitMQ)."
    );
    metrics::describe_counter!(
        "event_broker_disconnects_total",
        "Times the broker connection was lost."
    );
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::DateTime;
    use serde_json::json;

    use super::*;

    #[test]
    fn an_event_frame_is_id_event_and_the_envelope_on_one_data_line() {
        let event = Event {
            id: 7,
            event_type: "n8n.flow.finished".into(),
            tenant_id: uuid::Uuid::nil(),
            occurred_at: DateTime::from_timestamp(0, 0).expect("the epoch"),
            data: json!({"note": "two\nlines\r\n"}),
        };
        let live = Live::new(&event, None);
        let envelope = serde_json::to_string(&event).expect("serialises");
        assert_eq!(live.json(), envelope.as_bytes());
        assert_eq!(
            live.frame(),
            Bytes::from(format!(
                "id: 7\nevent: n8n.flow.finished\ndata: {envelope}\n\n"
            ))
        );
        let parsed: serde_json::Value = serde_json::from_slice(live.json()).expect("JSON");
        assert_eq!(parsed["data"]["note"], "two\nlines\r\n");
    }

    #[test]
    fn control_frames_carry_only_the_fields_given() {
        let retry = Some(Duration::from_millis(1000));
        assert_eq!(
            control_frame(Some(5), None, None, retry),
            "id: 5\nretry: 1000\n\n"
        );
        assert_eq!(control_frame(None, None, None, retry), "retry: 1000\n\n");
        assert_eq!(
            control_frame(Some(3), Some("reset"), Some(r#"{"a":1}"#), None),
            "id: 3\nevent: reset\ndata: {\"a\":1}\n\n"
        );
    }
}
