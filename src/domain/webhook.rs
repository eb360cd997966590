//! Inbound webhooks: what a source is called and where its requests go, and how a request from
//! another system is signed and checked (Slack's scheme: HMAC-SHA256 over
//! `v0:<unix seconds>:<raw body>`, keyed with the source's secret, sent as
//! `X-Cybernetic-Signature: v0=<lowercase hex>` with `X-Cybernetic-Timestamp: <unix seconds>`).
//! Secrets are made like a notification channel's ([`super::channel::generate_secret`]).

use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::ParseError;
use super::event_type::EventType;

/// The header carrying `v0=<hex>`; the same name outbound deliveries use.
pub const SIGNATURE_HEADER: &str = super::channel::SIGNATURE_HEADER;
/// The header carrying the unix seconds the signature was made at.
pub const TIMESTAMP_HEADER: &str = "X-Cybernetic-Timestamp";
/// How far a request's timestamp may be from the server's clock, either way; also how long a
/// receipt is kept after its timestamp, since a repeat is refused as stale after that anyway.
pub const REPLAY_WINDOW_SECS: i64 = 300;
/// How long the previous secret keeps verifying after a rotation, unless the rotation says.
pub const DEFAULT_OVERLAP: Duration = Duration::from_secs(24 * 3600);
pub const MAX_OVERLAP: Duration = Duration::from_secs(7 * 24 * 3600);

const VERSION_PREFIX: &str = "v0=";
const MAX_NAME_LEN: usize = 64;
/// Unix seconds have 10 digits until the year 2286; a longer value is not a timestamp.
const MAX_TIMESTAMP_DIGITS: usize = 12;

/// A source's name: `[a-z0-9_]+`, at most 64 characters; its events are `webhook.<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct SourceName(String);

impl SourceName {
    pub fn parse(raw: &str) -> Result<Self, ParseError> {
        let ok = (1..=MAX_NAME_LEN).contains(&raw.len())
            && raw
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !ok {
            return Err(ParseError::new(
                "name",
                "must be 1-64 lowercase letters, digits or underscores",
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The type of the events a source of this name appends: `webhook.<name>`. Never an error
    /// for a parsed name (same alphabet, at most 72 characters), but typed as the parse it is.
    pub fn event_type(&self) -> Result<EventType, ParseError> {
        EventType::parse(&format!("webhook.{}", self.0))
    }
}

/// What a verified request becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// An event `webhook.<name>` whose data is the body.
    Event,
    /// An S4 episode, analysed like one recorded through `POST /v1/episodes`.
    Episode,
}

impl Target {
    pub fn parse(raw: &str) -> Result<Self, ParseError> {
        match raw {
            "event" => Ok(Self::Event),
            "episode" => Ok(Self::Episode),
            _ => Err(ParseError::new("target", "must be one of: event, episode")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Event => "event",
            Self::Episode => "episode",
        }
    }
}

/// How long the previous secret keeps verifying after a rotation: a humantime duration such as
/// `1h` or `30m`, from `0s` (at once) to 7 days; 24 hours when not given.
pub fn parse_overlap(raw: Option<&str>) -> Result<Duration, ParseError> {
    let Some(raw) = raw else {
        return Ok(DEFAULT_OVERLAP);
    };
    let overlap = humantime::parse_duration(raw.trim())
        .map_err(|_| ParseError::new("overlap", "must be a duration such as 1h, 30m or 0s"))?;
    if overlap > MAX_OVERLAP {
        return Err(ParseError::new("overlap", "must be at most 7 days"));
    }
    Ok(overlap)
}

/// Why a request's signature was refused. The messages are written for the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("missing {0} header")]
    Missing(&'static str),
    #[error("{0}")]
    Malformed(&'static str),
    #[error(
        "the X-Cybernetic-Timestamp is more than 5 minutes away from the server's clock; sign the request again with the current time"
    )]
    OutsideWindow,
    #[error("the signature does not match this request and the source's secret")]
    Mismatch,
}

/// A request's signature headers, well formed but not yet checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedRequest {
    timestamp: i64,
    mac: [u8; 32],
    receipt_key: [u8; 32],
}

impl SignedRequest {
    /// Reads the two headers' raw values. The signature must be `v0=` and 64 lowercase hex
    /// digits, the timestamp unix seconds in decimal digits.
    pub fn parse(signature: Option<&[u8]>, timestamp: Option<&[u8]>) -> Result<Self, Refusal> {
        let signature = signature.ok_or(Refusal::Missing(SIGNATURE_HEADER))?;
        let timestamp = timestamp.ok_or(Refusal::Missing(TIMESTAMP_HEADER))?;
        let malformed_timestamp =
            Refusal::Malformed("X-Cybernetic-Timestamp must be unix seconds (decimal digits)");
        if timestamp.is_empty()
            || timestamp.len() > MAX_TIMESTAMP_DIGITS
            || !timestamp.iter().all(u8::is_ascii_digit)
        {
            return Err(malformed_timestamp);
        }
        // All digits and at most 12 of them: the value fits an i64.
        let timestamp = std::str::from_utf8(timestamp)
            .ok()
            .and_then(|t| t.parse::<i64>().ok())
            .ok_or(malformed_timestamp)?;
        let malformed_signature = Refusal::Malformed(
            "X-Cybernetic-Signature must be v0= followed by 64 lowercase hex digits",
        );
        let hex_digits = signature
            .strip_prefix(VERSION_PREFIX.as_bytes())
            .filter(|h| {
                h.iter()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
            })
            .ok_or(malformed_signature)?;
        let mut mac = [0u8; 32];
        hex::decode_to_slice(hex_digits, &mut mac).map_err(|_| malformed_signature)?;
        Ok(Self {
            timestamp,
            mac,
            receipt_key: Sha256::digest(signature).into(),
        })
    }

    /// Refuses a timestamp more than [`REPLAY_WINDOW_SECS`] before or after `now` (unix seconds).
    pub fn check_window(&self, now: i64) -> Result<(), Refusal> {
        if (self.timestamp - now).abs() > REPLAY_WINDOW_SECS {
            return Err(Refusal::OutsideWindow);
        }
        Ok(())
    }

    /// Checks the signature against `body` with each of `secrets` (the current one, and the
    /// previous one during a rotation's overlap), in constant time. Every secret is tried, so
    /// the time taken does not tell which one matched.
    pub fn verify<'s>(
        &self,
        secrets: impl IntoIterator<Item = &'s str>,
        body: &[u8],
    ) -> Result<(), Refusal> {
        let matched = secrets
            .into_iter()
            .fold(subtle::Choice::from(0), |found, s| {
                found | mac(s, self.timestamp, body).ct_eq(&self.mac)
            });
        if bool::from(matched) {
            Ok(())
        } else {
            Err(Refusal::Mismatch)
        }
    }

    /// SHA-256 of the signature header's value: what identifies an exact repeat.
    pub fn receipt_key(&self) -> [u8; 32] {
        self.receipt_key
    }

    /// Until when a repeat of this request could still pass the window check (unix seconds).
    pub fn receipt_expires_at(&self) -> i64 {
        self.timestamp + REPLAY_WINDOW_SECS
    }
}

/// A source's secrets as stored: the current one, and the previous one with the end of its
/// overlap.
#[derive(Debug, Clone)]
pub struct Secrets {
    pub current: String,
    pub previous: Option<(String, DateTime<Utc>)>,
}

impl Secrets {
    /// The secrets a signature made at `now` may use.
    pub fn valid_at(&self, now: DateTime<Utc>) -> impl Iterator<Item = &str> {
        let previous = self
            .previous
            .as_ref()
            .filter(|(_, until)| *until > now)
            .map(|(secret, _)| secret.as_str());
        std::iter::once(self.current.as_str()).chain(previous)
    }
}

/// The `X-Cybernetic-Signature` value for `body` sent at `timestamp`: what a sender computes.
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    format!(
        "{VERSION_PREFIX}{}",
        hex::encode(mac(secret, timestamp, body))
    )
}

fn mac(secret: &str, timestamp: i64, body: &[u8]) -> [u8; 32] {
    // HMAC takes keys of any length: new_from_slice cannot fail.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return [0; 32];
    };
    mac.update(format!("v0:{timestamp}:").as_bytes());
    mac.update(body);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(signature: &str, timestamp: &str) -> Result<SignedRequest, Refusal> {
        SignedRequest::parse(Some(signature.as_bytes()), Some(timestamp.as_bytes()))
    }

    #[test]
    fn signature_matches_a_reference_hmac() {
        // printf 'v0:1700000000:{"a":1}' | openssl dgst -sha256 -hmac secret
        assert_eq!(
            sign("secret", 1_700_000_000, br#"{"a":1}"#),
            "v0=7d06e4dcbb54167f0033658ac8c45abe35b1fa257ff38a448e290762b595f902"
        );
    }

    #[test]
    fn verifies_the_body_timestamp_and_secret() {
        let body = br#"{"a":1}"#;
        let sig = sign("key", 1_700_000_000, body);
        let ok = request(&sig, "1700000000").unwrap();
        assert_eq!(ok.verify(["key"], body), Ok(()));
        assert_eq!(ok.verify(["other", "key"], body), Ok(()));
        assert_eq!(ok.verify(["other"], body), Err(Refusal::Mismatch));
        assert_eq!(ok.verify([], body), Err(Refusal::Mismatch));
        assert_eq!(ok.verify(["key"], b"{\"a\":2}"), Err(Refusal::Mismatch));
        let moved = request(&sig, "1700000001").unwrap();
        assert_eq!(moved.verify(["key"], body), Err(Refusal::Mismatch));
        // The outbound format does not pass for the inbound one.
        let outbound = super::super::channel::sign("key", 1_700_000_000, body);
        assert!(request(&outbound, "1700000000").is_err());
    }

    #[test]
    fn malformed_headers() {
        let sig = sign("key", 1, b"{}");
        assert_eq!(
            SignedRequest::parse(None, Some(b"1")),
            Err(Refusal::Missing(SIGNATURE_HEADER))
        );
        assert_eq!(
            SignedRequest::parse(Some(sig.as_bytes()), None),
            Err(Refusal::Missing(TIMESTAMP_HEADER))
        );
        for ts in ["", "-1", "+1", "1.5", " 1", "abc", "1234567890123"] {
            assert!(
                matches!(request(&sig, ts), Err(Refusal::Malformed(_))),
                "{ts:?}"
            );
        }
        let upper = sig.to_uppercase().replace("V0=", "v0=");
        for bad in [
            "",
            "v0=",
            "v1=00",
            &sig[3..],
            &sig[..sig.len() - 1],
            &format!("{sig}0"),
            &upper,
            &sig.replace("v0=", "v0= "),
            &format!("{sig},v0={}", "0".repeat(64)),
        ] {
            assert!(
                matches!(request(bad, "1"), Err(Refusal::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_window_is_five_minutes_either_way() {
        let sig = sign("key", 1_000, b"{}");
        let at = request(&sig, "1000").unwrap();
        assert_eq!(at.check_window(1_000), Ok(()));
        assert_eq!(at.check_window(1_300), Ok(()));
        assert_eq!(at.check_window(700), Ok(()));
        assert_eq!(at.check_window(1_301), Err(Refusal::OutsideWindow));
        assert_eq!(at.check_window(699), Err(Refusal::OutsideWindow));
        assert_eq!(at.receipt_expires_at(), 1_300);
    }

    #[test]
    fn receipts_identify_the_signature() {
        let a = request(&sign("key", 1, b"{}"), "1").unwrap();
        let again = request(&sign("key", 1, b"{}"), "1").unwrap();
        let other = request(&sign("key", 1, b"[]"), "1").unwrap();
        assert_eq!(a.receipt_key(), again.receipt_key());
        assert_ne!(a.receipt_key(), other.receipt_key());
    }

    #[test]
    fn the_previous_secret_verifies_until_its_overlap_ends() {
        let until = DateTime::from_timestamp(1_000, 0).unwrap();
        let secrets = Secrets {
            current: "new".into(),
            previous: Some(("old".into(), until)),
        };
        let before = DateTime::from_timestamp(999, 0).unwrap();
        assert_eq!(secrets.valid_at(before).collect::<Vec<_>>(), ["new", "old"]);
        assert_eq!(secrets.valid_at(until).collect::<Vec<_>>(), ["new"]);
    }

    #[test]
    fn names_targets_and_overlaps() {
        for ok in ["n8n", "ci_builds", "a", &"x".repeat(64)] {
            assert!(SourceName::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "N8N", "a-b", "a.b", "a b", "é", &"x".repeat(65)] {
            assert!(SourceName::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            SourceName::parse("ci")
                .unwrap()
                .event_type()
                .unwrap()
                .as_str(),
            "webhook.ci"
        );
        assert!(
            SourceName::parse(&"x".repeat(64))
                .unwrap()
                .event_type()
                .is_ok()
        );
        assert_eq!(Target::parse("episode"), Ok(Target::Episode));
        assert!(Target::parse("job").is_err());
        assert_eq!(parse_overlap(None), Ok(DEFAULT_OVERLAP));
        assert_eq!(parse_overlap(Some("0s")), Ok(Duration::ZERO));
        assert_eq!(parse_overlap(Some("1h")), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_overlap(Some("7days")), Ok(MAX_OVERLAP));
        assert!(parse_overlap(Some("7days 1s")).is_err());
        assert!(parse_overlap(Some("soon")).is_err());
        assert!(parse_overlap(Some("")).is_err());
    }
}
