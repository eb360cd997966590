//! The Bot API client: `sendMessage`, `setWebhook`, `setMyCommands`, `getWebhookInfo`, at
//! `TELEGRAM_API_BASE` (`<base>/bot<token>/<method>`). Failures are sorted by what the caller
//! should do: wait as long as Telegram asks (429 `parameters.retry_after`), give the chat up (403:
//! the bot was blocked or removed), drop the message (another 4xx), or retry (5xx, network).
//! The token is part of every URL, so no error text here ever includes a URL.

use std::time::Duration;

use serde_json::{Value, json};

use crate::config::{Secret, TelegramConfig};
use crate::jobs::notification::without_url;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// 429: Telegram asks to wait this long.
    #[error("rate limited by Telegram (retry after {secs}s): {1}", secs = .0.as_secs())]
    RetryAfter(Duration, String),
    /// 403: the user blocked the bot, or the bot was removed from the group.
    #[error("refused by Telegram (403): {0}")]
    Forbidden(String),
    /// Another 4xx: this request will never succeed (bad chat id, bad markup).
    #[error("rejected by Telegram ({0}): {1}")]
    Rejected(u16, String),
    /// 5xx, a timeout, a connection failure, an unreadable answer: worth another try.
    #[error("Telegram unavailable: {0}")]
    Unavailable(String),
}

#[derive(Clone)]
pub struct BotApi {
    http: reqwest::Client,
    base: String,
    token: Secret,
}

impl BotApi {
    /// The client, when a bot token is configured.
    pub fn from_config(config: &TelegramConfig, http: reqwest::Client) -> Option<Self> {
        config.bot_token.as_ref().map(|token| Self {
            http,
            base: config.api_base.clone(),
            token: token.clone(),
        })
    }

    /// Calls `method` with a JSON body; returns its `result`.
    pub async fn call(&self, method: &str, body: &Value) -> Result<Value, SendError> {
        let url = format!("{}/bot{}/{method}", self.base, self.token.expose());
        let response = self
            .http
            .post(url)
            .json(body)
            .send()
            .await
            .map_err(|e| SendError::Unavailable(without_url(&e)))?;
        let status = response.status();
        let answer: Value = match response.json().await {
            Ok(v) => v,
            Err(_) if status.is_server_error() || status.is_success() => {
                return Err(SendError::Unavailable(format!(
                    "{method}: answered {status} without a JSON body"
                )));
            }
            Err(_) => Value::Null,
        };
        if status.is_success() && answer.get("ok") == Some(&Value::Bool(true)) {
            return Ok(answer.get("result").cloned().unwrap_or(Value::Null));
        }
        let description = answer
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or("no description")
            .chars()
            .take(300)
            .collect::<String>();
        let code = answer
            .get("error_code")
            .and_then(Value::as_u64)
            .and_then(|c| u16::try_from(c).ok())
            .unwrap_or(status.as_u16());
        Err(match code {
            429 => {
                let wait = answer
                    .pointer("/parameters/retry_after")
                    .and_then(Value::as_u64)
                    .unwrap_or(1);
                SendError::RetryAfter(Duration::from_secs(wait.clamp(1, 3600)), description)
            }
            403 => SendError::Forbidden(description),
            400..=499 => SendError::Rejected(code, description),
            _ => SendError::Unavailable(format!("{method}: {code} {description}")),
        })
    }

    /// Sends one HTML message; returns its message id.
    pub async fn send_message(&self, chat_id: i64, html: &str) -> Result<i64, SendError> {
        let result = self
            .call(
                "sendMessage",
                &json!({
                    "chat_id": chat_id,
                    "text": html,
                    "parse_mode": "HTML",
                    "link_preview_options": {"is_disabled": true},
                }),
            )
            .await?;
        result
            .get("message_id")
            .and_then(Value::as_i64)
            .ok_or_else(|| {
                SendError::Unavailable("sendMessage answered without a message_id".into())
            })
    }
}
