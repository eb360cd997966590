//! IO-free domain types. Each is parsed once at the edge; inner code trusts it.

pub mod api_key;
pub mod event_type;
pub mod pagination;
pub mod policy;
pub mod role;
pub mod system;
pub mod tenant;

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
