//! `notification`: delivers one event to one of the tenant's notification channels, or one
//! message to a Telegram chat, with retries.
//!
//! A webhook delivery is an HTTP POST of JSON:
//! `{"id": <delivery id>, "channel_id", "tenant_id", "event": {"id", "type", "occurred_at", "data"}}`
//! with `X-Cybernetic-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">` keyed with
//! the channel's secret, `X-Cybernetic-Delivery` (the same on every attempt, for the receiver to
//! drop repeats) and `X-Cybernetic-Event` (the event type). Any 2xx is delivered. `410 Gone` stops
//! the delivery at once; any other answer, a timeout or a connection failure is retried with
//! backoff until its attempts run out. Redirects are not followed.
//!
//! A Telegram message (a command's reply, or an alert for a subscribed event, enqueued by
//! `append_events` as the event is appended) is sent with `sendMessage` in as many parts
//! as Telegram's length limit needs. Each part delivered is recorded on the tenant's
//! `notifications` row at once, so a retry resumes after it instead of sending it twice. A 429
//! waits the `retry_after` Telegram gives; a 403 (the bot was blocked, or removed from the group)
//! marks the chat inactive and fails the delivery for good, as does any other 4xx; 5xx and network
//! failures are retried with backoff.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use super::{Job, JobContext, JobError, backoff};
use crate::db::channels::{self, Target};
use crate::db::events::Event;
use crate::db::tenant as scope;
use crate::domain::channel::{self, SIGNATURE_HEADER};
use crate::domain::job::Queue;
use crate::domain::tenant::TenantId;

/// How much of a receiver's error answer is kept in the job's error.
const ERROR_BODY_CHARS: usize = 200;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Notification {
    /// An event to one of the tenant's channels.
    Channel { channel_id: Uuid, event: Event },
    /// A message to a Telegram chat.
    Chat(ChatMessage),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatMessage {
    pub chat_id: i64,
    /// The tenant's record of the message (`None` for a reply to a chat no tenant has linked).
    #[serde(default)]
    pub notification_id: Option<Uuid>,
    /// The message's parts, laid out already (a reply).
    #[serde(default)]
    pub parts: Vec<String>,
    /// The event to show (an alert): read and laid out when sent.
    #[serde(default)]
    pub event_position: Option<i64>,
}

impl Job for Notification {
    const KIND: &'static str = "notification";
    const QUEUE: Queue = Queue::Notifications;
    const MAX_ATTEMPTS: i32 = 12;
    const TIMEOUT: Duration = Duration::from_secs(60);

    /// 10 s, 20 s, 40 s ... up to an hour (each jittered to half or more): about 1¾ to 3½ hours
    /// from the first attempt to the last.
    fn backoff(attempt: i32) -> Duration {
        backoff::exponential(attempt, Duration::from_secs(10), Duration::from_secs(3600))
    }

    async fn run(self, ctx: JobContext) -> Result<Value, JobError> {
        match self {
            Self::Channel { channel_id, event } => {
                deliver_to_channel(&ctx, channel_id, &event).await
            }
            Self::Chat(message) => super::telegram_update::deliver(&ctx, message).await,
        }
    }
}

async fn deliver_to_channel(
    ctx: &JobContext,
    channel_id: Uuid,
    event: &Event,
) -> Result<Value, JobError> {
    let tenant = ctx.tenant()?;
    let mut tx = scope::begin(ctx.db.primary(), tenant).await?;
    let target = channels::target(&mut tx, tenant, channel_id).await?;
    scope::end_read(tx);
    let Some(target) = target else {
        return Ok(json!({"skipped": "the channel was deleted"}));
    };
    if !target.active {
        return Ok(json!({"skipped": "the channel is inactive"}));
    }
    match target.kind.as_str() {
        "webhook" => deliver_webhook(ctx, tenant, &target, event).await,
        other => Err(JobError::permanent(format!(
            "channel kind {other} is not delivered by this version"
        ))),
    }
}

async fn deliver_webhook(
    ctx: &JobContext,
    tenant: TenantId,
    target: &Target,
    event: &Event,
) -> Result<Value, JobError> {
    let services = &ctx.services;
    let raw_url = target
        .config
        .get("url")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let url = channel::parse_webhook_url(raw_url, services.notifications.allow_http)
        .map_err(|e| JobError::permanent(format!("webhook {e}")))?;
    let secret = target
        .secret
        .as_deref()
        .ok_or_else(|| JobError::permanent("the webhook channel has no secret"))?;
    let body = serde_json::to_vec(&json!({
        "id": ctx.id,
        "channel_id": target.id,
        "tenant_id": tenant,
        "event": {
            "id": event.id,
            "type": event.event_type,
            "occurred_at": event.occurred_at,
            "data": event.data,
        },
    }))
    .map_err(|e| JobError::permanent(format!("cannot encode the delivery: {e}")))?;
    let timestamp = chrono::Utc::now().timestamp();
    let started = std::time::Instant::now();
    let sent = services
        .http
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(SIGNATURE_HEADER, channel::sign(secret, timestamp, &body))
        .header("X-Cybernetic-Delivery", ctx.id.to_string())
        .header("X-Cybernetic-Event", event.event_type.as_str())
        .body(body)
        .send()
        .await;
    let outcome = match &sent {
        Ok(r) if r.status().is_success() => "delivered",
        Ok(_) => "refused",
        Err(_) => "unreachable",
    };
    metrics::counter!("notification_deliveries_total", "channel" => "webhook", "outcome" => outcome)
        .increment(1);
    let response = sent.map_err(|e| {
        let what = if e.is_timeout() {
            "timed out"
        } else {
            "failed"
        };
        JobError::retry(format!("webhook delivery {what}: {}", without_url(&e)))
    })?;
    let status = response.status();
    if status.is_success() {
        return Ok(json!({
            "status": status.as_u16(),
            "duration_ms": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        }));
    }
    let text = response.text().await.unwrap_or_default();
    let excerpt: String = text.chars().take(ERROR_BODY_CHARS).collect();
    let message = format!("webhook answered {status}: {excerpt}");
    if status == reqwest::StatusCode::GONE {
        Err(JobError::permanent(message))
    } else {
        Err(JobError::retry(message))
    }
}

/// A reqwest error's text without the URL, which may carry a token (in its query, or in a Bot
/// API path).
pub(crate) fn without_url(e: &reqwest::Error) -> String {
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    let mut parts = Vec::new();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    if parts.is_empty() {
        "connection error".to_owned()
    } else {
        parts.join(": ")
    }
}
