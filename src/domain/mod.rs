//! IO-free domain types. Each is parsed once at the edge; inner code trusts it.

pub mod api_key;
pub mod channel;
pub mod event_type;
pub mod job;
pub mod object_key;
pub mod pagination;
pub mod policy;
pub mod role;
pub mod schedule;
pub mod system;
pub mod tenant;
pub mod topic;
pub mod webhook;

/// PostgreSQL cannot store NUL in text or in JSON strings; refuse it where it enters.
pub fn reject_nul(field: &'static str, value: &serde_json::Value) -> Result<(), ParseError> {
    use serde_json::Value;
    let bad = |s: &str| s.contains('\0');
    let found = match value {
        Value::String(s) => bad(s),
        Value::Array(items) => return items.iter().try_for_each(|v| reject_nul(field, v)),
        Value::Object(map) => {
            for (k, v) in map {
                if bad(k) {
                    return Err(ParseError::new(field, "must not contain NUL characters"));
                }
                reject_nul(field, v)?;
            }
            false
        }
        _ => false,
    };
    if found {
        return Err(ParseError::new(field, "must not contain NUL characters"));
    }
    Ok(())
}

/// Whether a timestamp lies in the range the platform stores (years 1 to 9999), so one taken
/// from a client never reaches PostgreSQL out of its range.
pub fn storable_time(t: &chrono::DateTime<chrono::Utc>) -> bool {
    use chrono::Datelike;
    (1..=9999).contains(&t.year())
}

/// Why a value from outside was refused. The message is written for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ParseError {
    pub field: &'static str,
    pub reason: String,
}

impl ParseError {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}
