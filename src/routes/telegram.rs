//! The Telegram bot's HTTP side: the webhook Telegram posts updates to, and what a tenant admin
//! manages (link codes, linked chats) and reads (the messages sent to its chats).
//!
//! `POST /telegram/webhook` only verifies and enqueues: the secret token in constant time, then one
//! statement that enqueues the update as a `telegram_update` job keyed by its `update_id`. A
//! redelivered update finds its key taken and is acknowledged without a second job, on whichever
//! replica it lands; an update whose enqueue failed is answered 503, so Telegram sends it again and
//! nothing is lost to the dedupe. A body that is not an update is logged, counted and acknowledged
//! (Telegram would otherwise redeliver it forever).

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::db::telegram::{self as store, Chat, Notification, NotificationFilter};
use crate::db::{CreationCursor, events, tenant as scope};
use crate::domain::ParseError;
use crate::domain::event_type::EventType;
use crate::http::error::ApiError;
use crate::http::extract::{Admin, AppPath, AppQuery, TenantAuth, Viewer};
use crate::jobs::telegram_update::{TelegramUpdate, link_code_hash};
use crate::state::AppState;
use crate::telegram::intake::Enqueued;
use crate::telegram::update::{self, Intake};

use super::{Page, PageQuery};

/// The header Telegram sends the webhook's secret token in.
pub const SECRET_HEADER: &str = "x-telegram-bot-api-secret-token";
/// How long a link code is good for.
pub const LINK_CODE_TTL: chrono::Duration = chrono::Duration::minutes(15);
/// Link codes are typed by hand: letters and digits that cannot be mistaken for each other.
const CODE_ALPHABET: &[u8] = b"ABCDEFGHJKMNPQRSTVWXYZ23456789";
const CODE_LENGTH: usize = 10;

fn counted(outcome: &'static str) {
    metrics::counter!("telegram_updates_total", "outcome" => outcome).increment(1);
}

#[tracing::instrument(skip_all)]
pub async fn webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let telegram = &state.config.telegram;
    let (Some(_), Some(secret)) = (&telegram.bot_token, &telegram.webhook_secret) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no Telegram bot is configured here (TELEGRAM_BOT_TOKEN and TELEGRAM_WEBHOOK_SECRET)",
        ));
    };
    let given = headers
        .get(SECRET_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if !bool::from(given.ct_eq(secret.expose().as_bytes())) {
        counted("unauthorized");
        return Err(ApiError::unauthorized(
            "missing or wrong X-Telegram-Bot-Api-Secret-Token",
        ));
    }
    let (update_id, message) = match update::parse(&body) {
        Intake::Message { update_id, message } => (update_id, message.without_nul()),
        Intake::Ignored { update_id } => {
            counted("ignored");
            return Ok(Json(
                json!({"ok": true, "update_id": update_id, "ignored": true}),
            ));
        }
        Intake::Malformed(reason) => {
            counted("malformed");
            tracing::warn!(reason = %reason, bytes = body.len(), "the Telegram webhook got a body that is not an update; acknowledged so it is not redelivered");
            return Ok(Json(json!({"ok": true, "ignored": true})));
        }
    };
    let job = TelegramUpdate { update_id, message };
    let created = match state.telegram.submit(&job).await {
        Ok(enqueued) => enqueued == Enqueued::Created,
        Err(e) => {
            counted("error");
            // The cause is in the server log (intake.rs logs it); none of it goes to the caller.
            let detail = match e {
                crate::telegram::intake::IntakeError::Busy => {
                    "too many updates are waiting to be stored; send it again shortly"
                }
                crate::telegram::intake::IntakeError::Database(_) => {
                    "the update could not be stored; send it again shortly"
                }
            };
            return Err(ApiError::unavailable(detail).with_header(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            ));
        }
    };
    counted(if created { "accepted" } else { "duplicate" });
    Ok(Json(
        json!({"ok": true, "update_id": update_id, "duplicate": !created}),
    ))
}

/// A fresh link code: `XXXXX-XXXXX` from [`CODE_ALPHABET`] (about 49 bits).
fn new_code() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; CODE_LENGTH];
    getrandom::fill(&mut bytes)?;
    let mut code = String::with_capacity(CODE_LENGTH + 1);
    for (i, b) in bytes.iter().enumerate() {
        if i == CODE_LENGTH / 2 {
            code.push('-');
        }
        // 256 is not a multiple of 30; the bias this leaves (under 1 in 8) costs a fraction of a
        // bit, and codes live 15 minutes behind a per-chat rate limit.
        code.push(char::from(
            CODE_ALPHABET[usize::from(*b) % CODE_ALPHABET.len()],
        ));
    }
    Ok(code)
}

#[derive(Debug, Serialize)]
pub struct LinkCode {
    pub code: String,
    pub expires_at: chrono::DateTime<Utc>,
    /// What to send the bot in the chat to link.
    pub command: String,
}

#[tracing::instrument(skip_all)]
pub async fn create_link_code(
    auth: TenantAuth<Admin>,
    State(state): State<AppState>,
) -> Result<(StatusCode, Json<LinkCode>), ApiError> {
    let code = new_code().map_err(|e| ApiError::internal(&e))?;
    let expires_at = Utc::now() + LINK_CODE_TTL;
    let mut tx = scope::begin(state.db.primary(), auth.tenant_id).await?;
    let id = store::create_link_code(
        &mut tx,
        auth.tenant_id,
        &link_code_hash(&code),
        Some(auth.key_id),
        expires_at,
    )
    .await?;
    let event = events::append(
        &mut tx,
        auth.tenant_id,
        &EventType::platform(EventType::TELEGRAM_LINK_CODE_CREATED),
        &json!({"id": id, "expires_at": expires_at, "created_by": auth.key_id}),
    )
    .await?;
    tx.commit().await?;
    state.events.committed(std::slice::from_ref(&event)).await;
    Ok((
        StatusCode::CREATED,
        Json(LinkCode {
            command: format!("/start {code}"),
            code,
            expires_at,
        }),
    ))
}

#[tracing::instrument(skip_all)]
pub async fn list_chats(
    auth: TenantAuth<Admin>,
    State(state): State<AppState>,
    AppQuery(query): AppQuery<PageQuery>,
) -> Result<Json<Page<Chat>>, ApiError> {
    let (limit, cursor) = query.parse::<CreationCursor>()?;
    let mut tx = scope::begin_read(&state.db, auth.tenant_id).await?;
    let rows = store::list_chats(&mut tx, auth.tenant_id, cursor.as_ref(), limit.fetch()).await?;
    scope::end_read(tx);
    Ok(Json(Page::from_rows(rows, limit, |c| CreationCursor {
        created_at: c.created_at,
        id: c.id,
    })))
}

fn chat_param(raw: &str) -> Result<i64, ApiError> {
    raw.parse::<i64>().map_err(|_| {
        ApiError::path(ParseError::new(
            "chat_id",
            "must be a Telegram chat id (an integer)",
        ))
    })
}

#[tracing::instrument(skip_all)]
pub async fn delete_chat(
    auth: TenantAuth<Admin>,
    State(state): State<AppState>,
    AppPath(chat_id): AppPath<String>,
) -> Result<StatusCode, ApiError> {
    let chat_id = chat_param(&chat_id)?;
    let mut tx = scope::begin(state.db.primary(), auth.tenant_id).await?;
    let Some(chat) = store::delete_chat(&mut tx, auth.tenant_id, chat_id).await? else {
        return Err(ApiError::not_found("chat"));
    };
    let event = events::append(
        &mut tx,
        auth.tenant_id,
        &EventType::platform(EventType::TELEGRAM_CHAT_UNLINKED),
        &json!({"chat_id": chat.chat_id, "title": chat.title, "by": "admin"}),
    )
    .await?;
    tx.commit().await?;
    state.events.committed(std::slice::from_ref(&event)).await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
pub struct NotificationQuery {
    chat_id: Option<String>,
    status: Option<String>,
    purpose: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

#[tracing::instrument(skip_all)]
pub async fn list_notifications(
    auth: TenantAuth<Viewer>,
    State(state): State<AppState>,
    AppQuery(query): AppQuery<NotificationQuery>,
) -> Result<Json<Page<Notification>>, ApiError> {
    let page = PageQuery {
        limit: query.limit,
        cursor: query.cursor,
    };
    let (limit, cursor) = page.parse::<CreationCursor>()?;
    let one_of = |field: &'static str, value: Option<String>, allowed: &[&str]| match value {
        Some(v) if !allowed.contains(&v.as_str()) => Err(ApiError::query(ParseError::new(
            field,
            format!("must be one of {}", allowed.join(", ")),
        ))),
        v => Ok(v),
    };
    let filter = NotificationFilter {
        chat_id: query
            .chat_id
            .as_deref()
            .map(|c| c.parse::<i64>())
            .transpose()
            .map_err(|_| ApiError::query(ParseError::new("chat_id", "must be an integer")))?,
        status: one_of("status", query.status, &["pending", "delivered", "failed"])?,
        purpose: one_of("purpose", query.purpose, &["reply", "alert"])?,
    };
    let mut tx = scope::begin_read(&state.db, auth.tenant_id).await?;
    let rows = store::list_notifications(
        &mut tx,
        auth.tenant_id,
        &filter,
        cursor.as_ref(),
        limit.fetch(),
    )
    .await?;
    scope::end_read(tx);
    Ok(Json(Page::from_rows(rows, limit, |n| CreationCursor {
        created_at: n.created_at,
        id: n.id,
    })))
}

pub fn describe_metrics() {
    metrics::describe_counter!(
        "telegram_updates_total",
        "Updates posted to /telegram/webhook, by outcome (accepted, duplicate, ignored, malformed, \
         unauthorized, error)."
    );
    metrics::describe_counter!(
        "telegram_commands_total",
        "Bot commands run, by command (the known ones, unknown, throttled)."
    );
    metrics::describe_counter!(
        "telegram_messages_sent_total",
        "Messages sent to Telegram chats, by outcome (sent, rate_limited, forbidden, rejected, \
         failed)."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_two_groups_of_the_alphabet() {
        let code = new_code().expect("random");
        assert_eq!(code.len(), CODE_LENGTH + 1);
        let (a, b) = code.split_once('-').expect("dash");
        assert_eq!((a.len(), b.len()), (5, 5));
        assert!(
            a.bytes()
                .chain(b.bytes())
                .all(|c| CODE_ALPHABET.contains(&c))
        );
        assert_ne!(new_code().expect("random"), code);
    }
}
