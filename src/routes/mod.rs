//! HTTP handlers, one file per resource.

pub mod api_keys;
pub mod artifacts;
pub mod episodes;
pub mod events;
pub mod health;
pub mod jobs;
pub mod metrics;
pub mod notification_channels;
pub mod policies;
pub mod reflections;
pub mod systems;
pub mod telegram;
pub mod tenants;
pub mod webhooks;

use serde::{Deserialize, Serialize};

use crate::domain::ParseError;
use crate::domain::pagination::{Limit, decode_cursor};
use crate::http::error::ApiError;

/// `?limit=&cursor=` as every list takes it.
#[derive(Debug, Deserialize)]
pub struct PageQuery {
    pub limit: Option<String>,
    pub cursor: Option<String>,
}

impl PageQuery {
    pub fn parse<P: serde::de::DeserializeOwned>(&self) -> Result<(Limit, Option<P>), ApiError> {
        let limit = Limit::parse(self.limit.as_deref()).map_err(ApiError::query)?;
        let cursor = decode_cursor(self.cursor.as_deref()).map_err(ApiError::query)?;
        Ok((limit, cursor))
    }
}

/// The response of every list.
#[derive(Debug, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// Cuts the over-fetched row off and points the cursor at the last row kept.
    pub fn from_rows<P: Serialize>(rows: Vec<T>, limit: Limit, position: impl Fn(&T) -> P) -> Self {
        let (items, next_cursor) = crate::domain::pagination::page(rows, limit, position);
        Self { items, next_cursor }
    }
}

/// Serialises a row for an event's `data`. Rows are plain structs: this cannot fail.
pub fn event_data<T: Serialize>(row: &T) -> serde_json::Value {
    serde_json::to_value(row).unwrap_or(serde_json::Value::Null)
}

pub fn parse_uuid(field: &'static str, raw: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(raw).map_err(|_| ApiError::path(ParseError::new(field, "must be a UUID")))
}
