//! Tenant identity and the human-facing tenant fields.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::ParseError;

/// A tenant's id. Only the auth layer and the platform API construct one from outside input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TenantId(Uuid);

impl TenantId {
    /// A fresh id for a tenant being created.
    pub fn generate() -> Self {
        Self(Uuid::now_v7())
    }

    pub fn from_uuid(id: Uuid) -> Self {
        Self(id)
    }

    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl std::fmt::Display for TenantId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A URL-safe tenant handle: lowercase letters, digits and inner hyphens, 1 to 63 characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Slug(String);

impl Slug {
    pub fn parse(raw: &str) -> Result<Self, ParseError> {
        let ok_len = (1..=63).contains(&raw.len());
        let ok_chars = raw
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        let ok_ends = !raw.starts_with('-') && !raw.ends_with('-');
        if ok_len && ok_chars && ok_ends {
            Ok(Self(raw.to_owned()))
        } else {
            Err(ParseError::new(
                "slug",
                "must be 1-63 lowercase letters, digits or inner hyphens",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A display name: trimmed, 1 to 200 characters, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Name(String);

impl Name {
    pub fn parse(field: &'static str, raw: &str) -> Result<Self, ParseError> {
        let trimmed = raw.trim();
        let count = trimmed.chars().count();
        if count == 0 || count > 200 {
            return Err(ParseError::new(field, "must be 1-200 characters"));
        }
        if trimmed.chars().any(char::is_control) {
            return Err(ParseError::new(
                field,
                "must not contain control characters",
            ));
        }
        Ok(Self(trimmed.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A tenant's settings, as stored in `tenants.settings`. Known keys only, so a typo is refused
/// rather than silently ignored:
/// - `timezone`: an IANA name; scheduled reflections follow the tenant's wall clock (default UTC).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
}

impl Settings {
    pub fn parse(raw: serde_json::Value) -> Result<Self, ParseError> {
        if !raw.is_object() {
            return Err(ParseError::new("settings", "must be an object"));
        }
        let settings: Self =
            serde_json::from_value(raw).map_err(|e| ParseError::new("settings", e.to_string()))?;
        if let Some(zone) = &settings.timezone {
            super::schedule::parse_timezone("settings.timezone", zone)?;
        }
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings() {
        let ok = Settings::parse(serde_json::json!({"timezone": "Europe/Berlin"})).unwrap();
        assert_eq!(ok.timezone.as_deref(), Some("Europe/Berlin"));
        assert_eq!(
            Settings::parse(serde_json::json!({})).unwrap(),
            Settings::default()
        );
        for bad in [
            serde_json::json!({"timezone": "Berlin"}),
            serde_json::json!({"timezone": 1}),
            serde_json::json!({"tz": "UTC"}),
            serde_json::json!([]),
        ] {
            assert!(Settings::parse(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn slugs() {
        for ok in ["a", "acme", "acme-2", "0x"] {
            assert!(Slug::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "Acme", "a_b", "a b", &"a".repeat(64)] {
            assert!(Slug::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names() {
        assert_eq!(Name::parse("name", "  Acme  ").unwrap().as_str(), "Acme");
        assert!(Name::parse("name", "   ").is_err());
        assert!(Name::parse("name", "a\u{0}b").is_err());
        assert!(Name::parse("name", &"x".repeat(201)).is_err());
    }
}
