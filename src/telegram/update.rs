//! Telegram updates, parsed tolerantly: only the fields the bot uses, every other field ignored,
//! so a Bot API that grows new fields never breaks the intake.

use serde::{Deserialize, Serialize};

/// One update as Telegram posts it. Only messages matter; any other kind of update (edits,
/// callbacks, member changes) has no `message` and is acknowledged and ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct Update {
    pub update_id: i64,
    #[serde(default)]
    pub message: Option<Message>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub message_id: i64,
    #[serde(default)]
    pub from: Option<User>,
    pub chat: Chat,
    /// Absent for photos, stickers and the like: nothing for the bot to do.
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub id: i64,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub first_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chat {
    pub id: i64,
    /// `private`, `group`, `supergroup` or `channel`.
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
}

impl Message {
    /// The message with NUL characters dropped from its text and names: PostgreSQL's `jsonb`
    /// cannot hold them, and a Telegram client can send them.
    pub fn without_nul(mut self) -> Self {
        let clean = |s: &mut Option<String>| {
            if let Some(s) = s {
                s.retain(|c| c != '\0');
            }
        };
        clean(&mut self.text);
        self.chat.kind.retain(|c| c != '\0');
        clean(&mut self.chat.title);
        clean(&mut self.chat.username);
        if let Some(user) = &mut self.from {
            clean(&mut user.username);
            clean(&mut user.first_name);
        }
        self
    }
}

impl Chat {
    /// What to call the chat: its title, else `@username`, else its id.
    pub fn display_name(&self) -> String {
        self.title
            .clone()
            .or_else(|| self.username.as_ref().map(|u| format!("@{u}")))
            .unwrap_or_else(|| self.id.to_string())
    }
}

/// What the intake makes of a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intake {
    /// A text message: a job for it.
    Message { update_id: i64, message: Message },
    /// A valid update the bot does nothing with (no message, or a message without text).
    Ignored { update_id: i64 },
    /// Not an update at all.
    Malformed(String),
}

pub fn parse(body: &[u8]) -> Intake {
    match serde_json::from_slice::<Update>(body) {
        Err(e) => Intake::Malformed(e.to_string()),
        Ok(Update {
            update_id,
            message: Some(message),
        }) if message.text.is_some() => Intake::Message { update_id, message },
        Ok(update) => Intake::Ignored {
            update_id: update.update_id,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_message_with_unknown_fields_parses() {
        let body = br#"{"update_id": 7, "brand_new_field": {"x": 1},
            "message": {"message_id": 3, "date": 1700000000, "entities": [{"type": "bot_command"}],
                        "from": {"id": 42, "is_bot": false, "first_name": "Ada", "username": "ada"},
                        "chat": {"id": -100, "type": "group", "title": "Ops"},
                        "text": "/status"}}"#;
        let Intake::Message { update_id, message } = parse(body) else {
            panic!("not a message");
        };
        assert_eq!(update_id, 7);
        assert_eq!(message.chat.id, -100);
        assert_eq!(message.chat.display_name(), "Ops");
        assert_eq!(message.text.as_deref(), Some("/status"));
        assert_eq!(message.from.map(|u| u.id), Some(42));
    }

    #[test]
    fn other_updates_are_ignored_and_garbage_is_malformed() {
        assert_eq!(
            parse(br#"{"update_id": 8, "edited_message": {"message_id": 1}}"#),
            Intake::Ignored { update_id: 8 }
        );
        assert_eq!(
            parse(br#"{"update_id": 9, "message": {"message_id": 1, "chat": {"id": 5, "type": "private"}}}"#),
            Intake::Ignored { update_id: 9 }
        );
        assert!(matches!(parse(b"not json"), Intake::Malformed(_)));
        assert!(matches!(parse(br#"{"message": {}}"#), Intake::Malformed(_)));
        assert!(matches!(parse(br#"[1, 2]"#), Intake::Malformed(_)));
    }
}
