//! S5 policy rules: the validated shape of a policy's `rules` (evaluated by the job pool).
//!
//! A rule compares one value in the latest state of one system with a threshold:
//! `{"system": 3, "path": "/load", "op": "gt", "threshold": 0.9,
//!   "severity": "critical", "message": "S3 load above 90%"}`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ParseError;
use super::system::SystemId;

pub const MAX_RULES: usize = 100;
const MAX_MESSAGE_CHARS: usize = 500;
const MAX_PATH_BYTES: usize = 512;

/// How a rule compares the value at `path` with `threshold`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operator {
    /// Numeric comparisons: the value and the threshold must both be numbers.
    Gt,
    Gte,
    Lt,
    Lte,
    /// JSON equality with any threshold value.
    Eq,
    Ne,
    /// Presence of the path; no threshold.
    Exists,
    Absent,
}

impl Operator {
    fn is_numeric(self) -> bool {
        matches!(self, Self::Gt | Self::Gte | Self::Lt | Self::Lte)
    }

    fn takes_threshold(self) -> bool {
        !matches!(self, Self::Exists | Self::Absent)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

/// One rule as stored: every field validated, defaults filled in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub system: i16,
    /// An RFC 6901 JSON Pointer into the system's state; `""` is the whole state.
    pub path: String,
    pub op: Operator,
    /// `None` when absent; `Some(Value::Null)` when given as `null` (eq/ne may compare to null).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub threshold: Option<Value>,
    #[serde(default = "default_severity")]
    pub severity: Severity,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Rule {
    /// Checks the rule against its system's latest state (`None`: the system has none yet, and
    /// then no rule holds). Returns whether the rule holds, which is a violation, and the value
    /// found at its path. Comparisons need a value: a missing path or, for the numeric operators,
    /// a value that is not a number never holds; `absent` holds when the path is missing.
    pub fn check(&self, state: Option<&Value>) -> (bool, Option<Value>) {
        let Some(state) = state else {
            return (false, None);
        };
        let value = state.pointer(&self.path);
        let threshold = self.threshold.as_ref();
        let holds = match (self.op, value) {
            (Operator::Exists, found) => found.is_some(),
            (Operator::Absent, found) => found.is_none(),
            (_, None) => false,
            (Operator::Eq, Some(v)) => threshold.is_some_and(|t| same(v, t)),
            (Operator::Ne, Some(v)) => threshold.is_some_and(|t| !same(v, t)),
            (op, Some(v)) => match (v.as_f64(), threshold.and_then(Value::as_f64)) {
                (Some(v), Some(t)) => match op {
                    Operator::Gt => v > t,
                    Operator::Gte => v >= t,
                    Operator::Lt => v < t,
                    _ => v <= t,
                },
                _ => false,
            },
        };
        (holds, value.cloned())
    }
}

/// JSON equality where numbers compare by value (`1` equals `1.0`).
fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) if a.is_number() && b.is_number() => x == y,
        _ => a == b,
    }
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

fn default_severity() -> Severity {
    Severity::Warning
}

/// A policy's validated rule list: 1 to 100 rules.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct Rules(Vec<Rule>);

impl Rules {
    pub fn parse(raw: Value) -> Result<Self, ParseError> {
        super::reject_nul("rules", &raw)?;
        let Value::Array(items) = raw else {
            return Err(ParseError::new("rules", "must be an array of rule objects"));
        };
        if items.is_empty() || items.len() > MAX_RULES {
            return Err(ParseError::new("rules", "must hold 1 to 100 rules"));
        }
        let mut rules = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            let rule = serde_json::from_value::<Rule>(item)
                .map_err(|e| e.to_string())
                .and_then(|rule| validate(&rule).map(|()| rule))
                .map_err(|reason| ParseError::new("rules", format!("rule {i}: {reason}")))?;
            rules.push(rule);
        }
        Ok(Self(rules))
    }

    pub fn as_slice(&self) -> &[Rule] {
        &self.0
    }
}

fn validate(rule: &Rule) -> Result<(), String> {
    SystemId::from_number(rule.system).map_err(|_| "system must be from 1 to 5".to_owned())?;
    validate_pointer(&rule.path)?;
    match (&rule.threshold, rule.op) {
        (None, op) if op.takes_threshold() => {
            return Err(format!("op {op:?} needs a threshold").to_lowercase());
        }
        (Some(_), op) if !op.takes_threshold() => {
            return Err(format!("op {op:?} takes no threshold").to_lowercase());
        }
        (Some(t), op) if op.is_numeric() && !t.is_number() => {
            return Err(format!("op {op:?} needs a numeric threshold").to_lowercase());
        }
        _ => {}
    }
    if let Some(message) = &rule.message
        && message.chars().count() > MAX_MESSAGE_CHARS
    {
        return Err("message must be at most 500 characters".to_owned());
    }
    Ok(())
}

fn validate_pointer(path: &str) -> Result<(), String> {
    if path.len() > MAX_PATH_BYTES {
        return Err("path must be at most 512 bytes".to_owned());
    }
    if !path.is_empty() && !path.starts_with('/') {
        return Err("path must be a JSON Pointer: empty or starting with '/'".to_owned());
    }
    // '~' may only start the escapes ~0 ('~') and ~1 ('/').
    let mut chars = path.chars();
    while let Some(c) = chars.next() {
        if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
            return Err("path has a '~' that is not ~0 or ~1".to_owned());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn accepts_documented_shape_and_fills_defaults() {
        let rules = Rules::parse(json!([
            {"system": 3, "path": "/load", "op": "gt", "threshold": 0.9, "severity": "critical", "message": "hot"},
            {"system": 1, "path": "/status", "op": "eq", "threshold": "down"},
            {"system": 5, "path": "/a~1b", "op": "exists"}
        ]))
        .unwrap();
        assert_eq!(rules.as_slice().len(), 3);
        assert_eq!(rules.as_slice()[1].severity, Severity::Warning);
        let null =
            Rules::parse(json!([{"system": 2, "path": "/owner", "op": "eq", "threshold": null}]))
                .unwrap();
        assert_eq!(null.as_slice()[0].threshold, Some(Value::Null));
    }

    fn rule(raw: Value) -> Rule {
        Rules::parse(json!([raw])).unwrap().as_slice()[0].clone()
    }

    #[test]
    fn checks_rules_against_a_state() {
        let state = json!({"load": 0.95, "status": "up", "count": 3, "nested": {"a/b": 1}});
        let hot = rule(json!({"system": 3, "path": "/load", "op": "gt", "threshold": 0.9}));
        assert_eq!(hot.check(Some(&state)), (true, Some(json!(0.95))));
        assert!(!hot.check(Some(&json!({"load": 0.5}))).0);
        assert!(!hot.check(Some(&json!({"load": "high"}))).0);
        assert_eq!(hot.check(Some(&json!({}))), (false, None));
        assert_eq!(hot.check(None), (false, None));
        let lte = rule(json!({"system": 3, "path": "/count", "op": "lte", "threshold": 3}));
        assert!(lte.check(Some(&state)).0);
        let eq = rule(json!({"system": 1, "path": "/count", "op": "eq", "threshold": 3.0}));
        assert!(eq.check(Some(&state)).0, "numbers compare by value");
        let ne = rule(json!({"system": 1, "path": "/status", "op": "ne", "threshold": "up"}));
        assert!(!ne.check(Some(&state)).0);
        assert!(ne.check(Some(&json!({"status": "down"}))).0);
        assert!(!ne.check(Some(&json!({}))).0, "ne needs a value to compare");
        let exists = rule(json!({"system": 1, "path": "/nested/a~1b", "op": "exists"}));
        assert!(exists.check(Some(&state)).0);
        let absent = rule(json!({"system": 1, "path": "/owner", "op": "absent"}));
        assert!(absent.check(Some(&state)).0);
        assert!(!absent.check(None).0, "no state yet: nothing holds");
    }

    #[test]
    fn errors_name_the_rule() {
        let err = Rules::parse(json!([
            {"system": 1, "path": "/x", "op": "exists"},
            {"system": 1, "path": "/x", "op": "between", "threshold": 1}
        ]))
        .unwrap_err();
        assert!(err.reason.starts_with("rule 1: unknown variant"), "{err}");
    }

    #[test]
    fn refuses_malformed_rules() {
        let cases = [
            json!({}),
            json!([]),
            json!([{"system": 6, "path": "/x", "op": "exists"}]),
            json!([{"system": 1, "path": "x", "op": "exists"}]),
            json!([{"system": 1, "path": "/~2", "op": "exists"}]),
            json!([{"system": 1, "path": "/x", "op": "gt"}]),
            json!([{"system": 1, "path": "/x", "op": "gt", "threshold": "high"}]),
            json!([{"system": 1, "path": "/x", "op": "exists", "threshold": 1}]),
            json!([{"system": 1, "path": "/x", "op": "between", "threshold": 1}]),
            json!([{"system": 1, "path": "/x", "op": "exists", "extra": true}]),
            json!([{"system": 1, "path": "/x", "op": "exists", "message": "m".repeat(501)}]),
            json!([{"system": 1, "path": "/x", "op": "gt", "threshold": null}]),
        ];
        for case in cases {
            assert!(Rules::parse(case.clone()).is_err(), "{case}");
        }
    }
}
