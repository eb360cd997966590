//! Notification channels: where a tenant's alerts go, and how each delivery is signed.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::ParseError;
use super::policy::Severity;

/// The header that carries a webhook delivery's signature: `t=<unix seconds>,v1=<hex>`, where the
/// hex is HMAC-SHA256, keyed with the channel's secret, of `<unix seconds>.<raw body>`.
pub const SIGNATURE_HEADER: &str = "X-Cybernetic-Signature";
/// Every webhook secret starts with this, so it is recognisable in configs and secret scanners.
pub const SECRET_PREFIX: &str = "whsec_";
const MAX_URL_BYTES: usize = 2048;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// An HTTPS POST of the event as JSON, signed.
    Webhook,
}

impl Kind {
    pub fn parse(raw: &str) -> Result<Self, ParseError> {
        match raw {
            "webhook" => Ok(Self::Webhook),
            _ => Err(ParseError::new("kind", "must be one of: webhook")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Webhook => "webhook",
        }
    }
}

impl Severity {
    pub fn parse(field: &'static str, raw: &str) -> Result<Self, ParseError> {
        match raw {
            "info" => Ok(Self::Info),
            "warning" => Ok(Self::Warning),
            "critical" => Ok(Self::Critical),
            _ => Err(ParseError::new(
                field,
                "must be one of: info, warning, critical",
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }

    /// Severities from `self` upwards, for "at least this severe" filters.
    pub fn and_above(self) -> &'static [&'static str] {
        match self {
            Self::Info => &["info", "warning", "critical"],
            Self::Warning => &["warning", "critical"],
            Self::Critical => &["critical"],
        }
    }
}

/// A webhook URL: absolute `https://` (or `http://` where the operator allows it), with a host
/// and without credentials, at most 2048 bytes.
pub fn parse_webhook_url(raw: &str, allow_http: bool) -> Result<reqwest::Url, ParseError> {
    let invalid = |reason: &str| ParseError::new("url", reason);
    if raw.len() > MAX_URL_BYTES {
        return Err(invalid("must be at most 2048 bytes"));
    }
    let url = reqwest::Url::parse(raw).map_err(|_| invalid("must be an absolute URL"))?;
    match url.scheme() {
        "https" => {}
        "http" if allow_http => {}
        "http" => return Err(invalid("must be an https:// URL")),
        _ => {
            return Err(invalid(if allow_http {
                "must be an https:// or http:// URL"
            } else {
                "must be an https:// URL"
            }));
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("must name a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid("must not carry credentials"));
    }
    Ok(url)
}

/// A fresh webhook secret: 32 random bytes, unpadded base64url, after [`SECRET_PREFIX`].
pub fn generate_secret() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(format!("{SECRET_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes)))
}

/// The `X-Cybernetic-Signature` value for `body` sent at `timestamp` (unix seconds).
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    format!(
        "t={timestamp},v1={}",
        hex::encode(mac(secret, timestamp, body))
    )
}

/// Checks a signature header against `body`, in constant time: what a receiver does (and what the
/// tests do as one). Timestamp freshness is the receiver's to judge.
pub fn verify(secret: &str, header: &str, body: &[u8]) -> bool {
    let mut timestamp = None;
    let mut given = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
            Some(("v1", v)) => given.extend(hex::decode(v).ok()),
            _ => {}
        }
    }
    let Some(timestamp) = timestamp else {
        return false;
    };
    let expected = mac(secret, timestamp, body);
    given
        .iter()
        .any(|g| subtle::ConstantTimeEq::ct_eq(g.as_slice(), expected.as_slice()).into())
}

fn mac(secret: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
    // HMAC takes keys of any length: new_from_slice cannot fail.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return Vec::new();
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_timestamp_dot_body() {
        let sig = sign("key", 1, b"{}");
        assert!(sig.starts_with("t=1,v1="));
        assert_eq!(sig.len(), "t=1,v1=".len() + 64);
        assert!(verify("key", &sig, b"{}"));
        assert!(!verify("other", &sig, b"{}"));
        assert!(!verify("key", &sig, b"{ }"));
        assert!(!verify("key", &sig.replace("t=1", "t=2"), b"{}"));
        assert!(!verify("key", "v1=00", b"{}"));
        assert!(!verify("key", "garbage", b"{}"));
    }

    #[test]
    fn signature_matches_a_reference_hmac() {
        // openssl: printf '1700000000.hello' | openssl dgst -sha256 -hmac secret
        assert_eq!(
            sign("secret", 1_700_000_000, b"hello"),
            "t=1700000000,v1=47b1df0ab12338b2685470b0d2b37033add7c3b2bc8172f313e77413f1bb78c8"
        );
    }

    #[test]
    fn webhook_urls() {
        assert!(parse_webhook_url("https://hooks.example.com/x?y=1", false).is_ok());
        assert!(parse_webhook_url("http://receiver:8080/", false).is_err());
        assert!(parse_webhook_url("http://receiver:8080/", true).is_ok());
        assert!(parse_webhook_url("ftp://example.com/", true).is_err());
        assert!(parse_webhook_url("https://user:pw@example.com/", false).is_err());
        assert!(parse_webhook_url("/relative", false).is_err());
        assert!(parse_webhook_url(&format!("https://e.com/{}", "a".repeat(2048)), false).is_err());
    }

    #[test]
    fn secrets_are_random_and_prefixed() {
        let (a, b) = (generate_secret().unwrap(), generate_secret().unwrap());
        assert!(a.starts_with(SECRET_PREFIX) && a.len() == SECRET_PREFIX.len() + 43);
        assert_ne!(a, b);
    }
}
