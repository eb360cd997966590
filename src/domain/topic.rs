//! Topic filters for event streams and history: `?topics=system.state,episode.*`.

use super::ParseError;
use super::event_type::EventType;

const MAX_PATTERNS: usize = 50;

/// Which event types a subscriber wants: exact names, `prefix.*` patterns, or everything (`*`,
/// or no filter at all).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct TopicFilter {
    all: bool,
    exact: Vec<String>,
    /// Each ends with '.', so `episode.*` is stored as `episode.` and matches `episode.created`
    /// but not `episodes.x` or `episode` itself.
    prefixes: Vec<String>,
}

impl TopicFilter {
    pub fn all() -> Self {
        Self {
            all: true,
            ..Self::default()
        }
    }

    /// Parses a comma-separated list; `None` or empty means all events.
    pub fn parse(raw: Option<&str>) -> Result<Self, ParseError> {
        let Some(raw) = raw.map(str::trim).filter(|r| !r.is_empty()) else {
            return Ok(Self::all());
        };
        let patterns: Vec<&str> = raw.split(',').map(str::trim).collect();
        if patterns.len() > MAX_PATTERNS {
            return Err(ParseError::new("topics", "at most 50 patterns"));
        }
        let mut filter = Self::default();
        let mut everything = false;
        for pattern in patterns {
            if pattern == "*" {
                // Every other pattern is still checked: a typo beside `*` is an error too.
                everything = true;
                continue;
            }
            let invalid = |_| {
                ParseError::new(
                    "topics",
                    format!("'{pattern}' is not an event type, a 'prefix.*' pattern or '*'"),
                )
            };
            match pattern.strip_suffix(".*") {
                Some(prefix) => {
                    let prefix = EventType::parse(prefix).map_err(invalid)?;
                    filter.prefixes.push(format!("{}.", prefix.as_str()));
                }
                None => filter.exact.push(
                    EventType::parse(pattern)
                        .map_err(invalid)?
                        .as_str()
                        .to_owned(),
                ),
            }
        }
        Ok(if everything { Self::all() } else { filter })
    }

    pub fn matches(&self, event_type: &str) -> bool {
        self.all
            || self.exact.iter().any(|e| e == event_type)
            || self
                .prefixes
                .iter()
                .any(|p| event_type.starts_with(p.as_str()))
    }

    pub fn is_all(&self) -> bool {
        self.all
    }

    pub fn exact(&self) -> &[String] {
        &self.exact
    }

    /// The prefixes as SQL LIKE patterns (`_` escaped, `%` appended).
    pub fn like_patterns(&self) -> Vec<String> {
        self.prefixes
            .iter()
            .map(|p| format!("{}%", p.replace('_', "\\_")))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn semantics() {
        let f = TopicFilter::parse(Some("system.state, episode.*")).unwrap();
        assert!(f.matches("system.state"));
        assert!(!f.matches("system.states"));
        assert!(!f.matches("system"));
        assert!(f.matches("episode.created"));
        assert!(f.matches("episode.analysis.done"));
        assert!(!f.matches("episode"));
        assert!(!f.matches("episodes.created"));
        assert!(!f.matches("policy.created"));
        for all in [None, Some(""), Some("*"), Some("a,*")] {
            assert!(
                TopicFilter::parse(all).unwrap().matches("anything.at.all"),
                "{all:?}"
            );
        }
        assert_eq!(
            TopicFilter::parse(Some("web_hook.*"))
                .unwrap()
                .like_patterns(),
            ["web\\_hook.%"]
        );
    }

    #[test]
    fn refuses_bad_patterns() {
        let many = vec!["a"; 51].join(",");
        for bad in [
            "Episode",
            "a..b",
            "*.created",
            "a.*.b",
            "a.**",
            ".*",
            "a,,b",
            "a b",
            "*,Bad",
            "a.*,*,b..c",
            many.as_str(),
        ] {
            assert!(TopicFilter::parse(Some(bad)).is_err(), "{bad}");
        }
    }
}
