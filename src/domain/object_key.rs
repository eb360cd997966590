//! Artifact keys: what a tenant names its objects, validated once at the edge.
//!
//! A key is 1 to 1024 bytes of UTF-8 made of `/`-separated segments. It may not start or end with
//! `/`, have an empty, `.` or `..` segment, or contain `\`, NUL or any other control character, or
//! a percent-encoded byte (`%2e`, `%2F`, ...): the HTTP layer decodes a path exactly once, and a key
//! that still looks encoded is refused rather than risk a layer that decodes it again. The tenant's
//! prefix is never part of a key: the platform adds it ([`ObjectKey::under`]), so no key can name
//! another tenant's objects or anything outside the storage root.

use serde::Serialize;

use super::ParseError;
use super::tenant::TenantId;

pub const MAX_KEY_BYTES: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ObjectKey(String);

impl ObjectKey {
    pub fn parse(raw: &str) -> Result<Self, ParseError> {
        let refuse = |reason: &str| Err(ParseError::new("key", reason));
        if raw.is_empty() || raw.len() > MAX_KEY_BYTES {
            return refuse("must be 1 to 1024 bytes");
        }
        if raw.starts_with('/') || raw.ends_with('/') {
            return refuse("must not start or end with '/'");
        }
        if raw.chars().any(|c| c == '\\' || c.is_control()) {
            return refuse("must not contain '\\', NUL or control characters");
        }
        if has_percent_escape(raw) {
            return refuse("must not contain percent-encoded bytes such as %2e");
        }
        if raw
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
        {
            return refuse("must not have empty, '.' or '..' segments");
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Where the object lives in the backend: under its tenant's own prefix.
    pub fn under(&self, tenant: TenantId) -> StoragePath {
        StoragePath(format!("{}/{}", tenant_prefix(tenant), self.0))
    }
}

/// The prefix every object of `tenant` lives under (without a trailing `/`).
pub fn tenant_prefix(tenant: TenantId) -> String {
    format!("tenants/{}", tenant.as_uuid().hyphenated())
}

fn has_percent_escape(raw: &str) -> bool {
    raw.as_bytes()
        .windows(3)
        .any(|w| w[0] == b'%' && w[1].is_ascii_hexdigit() && w[2].is_ascii_hexdigit())
}

/// A full path in a storage backend: a tenant prefix and a validated key, or a prefix of one for
/// listing. Only this module and the storage tests make one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoragePath(String);

impl StoragePath {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A listing prefix under `tenant`: `""` lists all its objects; otherwise the start of a key
    /// (same characters as a key, but it may end with `/` or in the middle of a segment).
    pub fn prefix(tenant: TenantId, prefix: &str) -> Result<Self, ParseError> {
        if prefix.is_empty() {
            return Ok(Self(format!("{}/", tenant_prefix(tenant))));
        }
        // A prefix is valid when it is the start of some valid key (`.` starts `.hidden`).
        let probe = format!("{prefix}x");
        ObjectKey::parse(&probe).map_err(|e| ParseError::new("prefix", e.reason))?;
        Ok(Self(format!("{}/{prefix}", tenant_prefix(tenant))))
    }

    /// A fresh path for one upload of `tenant`'s: every upload is written to its own path, never
    /// over another object, and the artifact's row is pointed at it once it is complete.
    pub fn upload(tenant: TenantId) -> Self {
        Self(format!(
            "{}/{}",
            tenant_prefix(tenant),
            uuid::Uuid::now_v7().simple()
        ))
    }

    /// A path as stored (an artifact row's `storage_path`), or for backends' tests and tools.
    #[doc(hidden)]
    pub fn raw(path: &str) -> Self {
        Self(path.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_keys() {
        for ok in [
            "report.pdf",
            "2026/11/exports/q3 summary.csv",
            "a/b/c/d.e.f",
            "ünïcödé/文件.txt",
            "100%.txt",
            "%zz",
            ".hidden",
            "..dots",
            &"k".repeat(1024),
        ] {
            assert!(ObjectKey::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_traversal_and_malformed_keys() {
        for bad in [
            "",
            "/abs",
            "trailing/",
            "a//b",
            ".",
            "..",
            "../x",
            "a/../b",
            "a/./b",
            "a\\b",
            "..\\x",
            "nul\0byte",
            "line\nbreak",
            "tab\there",
            "\u{7f}",
            "%2e%2e/x",
            "%2E%2E",
            "a%2fb",
            "%00",
            &"k".repeat(1025),
        ] {
            assert!(ObjectKey::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_platform_adds_the_tenant_prefix() {
        let tenant = TenantId::from_uuid(uuid::Uuid::nil());
        let key = ObjectKey::parse("a/b.txt").unwrap();
        assert_eq!(
            key.under(tenant).as_str(),
            "tenants/00000000-0000-0000-0000-000000000000/a/b.txt"
        );
        assert_eq!(
            StoragePath::prefix(tenant, "").unwrap().as_str(),
            "tenants/00000000-0000-0000-0000-000000000000/"
        );
        assert!(StoragePath::prefix(tenant, "a/").is_ok());
        assert!(StoragePath::prefix(tenant, "rep").is_ok());
        assert!(StoragePath::prefix(tenant, "../").is_err());
        assert!(StoragePath::prefix(tenant, "/").is_err());
    }
}
