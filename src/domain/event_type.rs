//! Event type names: dotted lowercase words such as `system.state` or `episode.created`.

use serde::Serialize;

use super::ParseError;

pub const MAX_LEN: usize = 100;

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct EventType(String);

impl EventType {
    pub const SYSTEM_STATE: &'static str = "system.state";
    pub const EPISODE_CREATED: &'static str = "episode.created";
    pub const POLICY_CREATED: &'static str = "policy.created";
    pub const POLICY_UPDATED: &'static str = "policy.updated";
    pub const POLICY_DELETED: &'static str = "policy.deleted";
    pub const JOB_PROGRESS: &'static str = "job.progress";
    pub const JOB_COMPLETED: &'static str = "job.completed";
    pub const JOB_RETRYING: &'static str = "job.retrying";
    pub const JOB_FAILED: &'static str = "job.failed";
    pub const JOB_CANCELLED: &'static str = "job.cancelled";
    pub const EPISODE_ANALYZED: &'static str = "episode.analyzed";
    pub const POLICY_VIOLATED: &'static str = "policy.violated";
    pub const POLICY_RECOVERED: &'static str = "policy.recovered";
    pub const REFLECTION_CREATED: &'static str = "reflection.created";
    pub const HEALTH_SNAPSHOT: &'static str = "health.snapshot";
    pub const CHANNEL_CREATED: &'static str = "notification_channel.created";
    pub const CHANNEL_UPDATED: &'static str = "notification_channel.updated";
    pub const CHANNEL_DELETED: &'static str = "notification_channel.deleted";
    pub const ARTIFACT_STORED: &'static str = "artifact.stored";
    pub const ARTIFACT_DELETED: &'static str = "artifact.deleted";
    pub const WEBHOOK_SOURCE_CREATED: &'static str = "webhook_source.created";
    pub const WEBHOOK_SOURCE_UPDATED: &'static str = "webhook_source.updated";
    pub const WEBHOOK_SOURCE_DELETED: &'static str = "webhook_source.deleted";
    pub const WEBHOOK_SOURCE_ROTATED: &'static str = "webhook_source.rotated";
    pub const TELEGRAM_CHAT_LINKED: &'static str = "telegram.chat_linked";
    pub const TELEGRAM_CHAT_UNLINKED: &'static str = "telegram.chat_unlinked";
    pub const TELEGRAM_CHAT_DEACTIVATED: &'static str = "telegram.chat_deactivated";
    pub const TELEGRAM_CHAT_REACTIVATED: &'static str = "telegram.chat_reactivated";
    pub const TELEGRAM_CHAT_MUTED: &'static str = "telegram.chat_muted";
    pub const TELEGRAM_SUBSCRIBED: &'static str = "telegram.subscribed";
    pub const TELEGRAM_UNSUBSCRIBED: &'static str = "telegram.unsubscribed";
    pub const TELEGRAM_LINK_CODE_CREATED: &'static str = "telegram.link_code_created";

    /// Every type the platform itself appends (metrics label these by name).
    pub const PLATFORM: &'static [&'static str] = &[
        Self::SYSTEM_STATE,
        Self::EPISODE_CREATED,
        Self::POLICY_CREATED,
        Self::POLICY_UPDATED,
        Self::POLICY_DELETED,
        Self::JOB_PROGRESS,
        Self::JOB_COMPLETED,
        Self::JOB_RETRYING,
        Self::JOB_FAILED,
        Self::JOB_CANCELLED,
        Self::EPISODE_ANALYZED,
        Self::POLICY_VIOLATED,
        Self::POLICY_RECOVERED,
        Self::REFLECTION_CREATED,
        Self::HEALTH_SNAPSHOT,
        Self::CHANNEL_CREATED,
        Self::CHANNEL_UPDATED,
        Self::CHANNEL_DELETED,
        Self::ARTIFACT_STORED,
        Self::ARTIFACT_DELETED,
        Self::WEBHOOK_SOURCE_CREATED,
        Self::WEBHOOK_SOURCE_UPDATED,
        Self::WEBHOOK_SOURCE_DELETED,
        Self::WEBHOOK_SOURCE_ROTATED,
        Self::TELEGRAM_CHAT_LINKED,
        Self::TELEGRAM_CHAT_UNLINKED,
        Self::TELEGRAM_CHAT_DEACTIVATED,
        Self::TELEGRAM_CHAT_REACTIVATED,
        Self::TELEGRAM_CHAT_MUTED,
        Self::TELEGRAM_SUBSCRIBED,
        Self::TELEGRAM_UNSUBSCRIBED,
        Self::TELEGRAM_LINK_CODE_CREATED,
    ];

    /// Accepts `[a-z0-9_]+(\.[a-z0-9_]+)*`, at most 100 characters.
    pub fn parse(raw: &str) -> Result<Self, ParseError> {
        let words_ok = raw.split('.').all(|word| {
            !word.is_empty()
                && word
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        });
        if raw.is_empty() || raw.len() > MAX_LEN || !words_ok {
            return Err(ParseError::new(
                "type",
                "must be dotted lowercase words ([a-z0-9_]+ separated by '.'), at most 100 characters",
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// Namespaces the platform writes itself; clients may not publish into them, so nothing a
    /// client sends can pass for a platform event (or for a stream's `reset` frame).
    pub const RESERVED: &'static [&'static str] = &[
        "system",
        "episode",
        "policy",
        "job",
        "artifact",
        "reflection",
        "health",
        "notification_channel",
        "webhook",
        "webhook_source",
        "telegram",
        "reset",
    ];

    pub fn is_reserved(&self) -> bool {
        let root = self.0.split('.').next().unwrap_or_default();
        Self::RESERVED.contains(&root)
    }

    /// One of the platform's own types, known to be well formed.
    pub fn platform(name: &'static str) -> Self {
        debug_assert!(
            Self::parse(name).is_ok(),
            "malformed platform event type {name}"
        );
        Self(name.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        for ok in ["a", "system.state", "webhook.n8n_flow", "x.y.z1"] {
            assert!(EventType::parse(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(101);
        for bad in [
            "",
            ".",
            "a.",
            ".a",
            "a..b",
            "A.b",
            "a-b",
            "a b",
            "a.*",
            long.as_str(),
        ] {
            assert!(EventType::parse(bad).is_err(), "{bad}");
        }
    }
}
