//! Cursor pagination: a bounded page size and an opaque, typed cursor.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::ParseError;

/// Page size: 1 to 200, 50 when not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit(u16);

impl Limit {
    pub const DEFAULT: u16 = 50;
    pub const MAX: u16 = 200;

    pub fn parse(raw: Option<&str>) -> Result<Self, ParseError> {
        let Some(raw) = raw else {
            return Ok(Self(Self::DEFAULT));
        };
        match raw.parse::<u16>() {
            Ok(n @ 1..=Self::MAX) => Ok(Self(n)),
            _ => Err(ParseError::new("limit", "must be an integer from 1 to 200")),
        }
    }

    pub fn get(self) -> usize {
        usize::from(self.0)
    }

    /// Rows to fetch: one more than the page, to know whether another page follows.
    pub fn fetch(self) -> i64 {
        i64::from(self.0) + 1
    }
}

/// Encodes a keyset position as an opaque token (base64url of JSON). A token that does not
/// decode as the list's position type is refused; lists keyed alike (created_at, id) accept each
/// other's tokens, which is harmless since row-level security still scopes the rows.
pub fn encode_cursor<T: Serialize>(position: &T) -> String {
    // Serialising plain structs of numbers, strings and timestamps cannot fail.
    let json = serde_json::to_vec(position).unwrap_or_default();
    URL_SAFE_NO_PAD.encode(json)
}

pub fn decode_cursor<T: DeserializeOwned>(raw: Option<&str>) -> Result<Option<T>, ParseError> {
    let Some(raw) = raw else { return Ok(None) };
    let invalid = || ParseError::new("cursor", "is not a cursor this list returned");
    // Room for the longest position: an artifact key of 1024 bytes, JSON-escaped, in base64.
    if raw.len() > 4096 {
        return Err(invalid());
    }
    let bytes = URL_SAFE_NO_PAD.decode(raw).map_err(|_| invalid())?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|_| invalid())
}

/// A page of results: the first `limit` rows, and a cursor when more rows exist.
pub fn page<T, P: Serialize>(
    mut rows: Vec<T>,
    limit: Limit,
    position: impl Fn(&T) -> P,
) -> (Vec<T>, Option<String>) {
    if rows.len() > limit.get() {
        rows.truncate(limit.get());
        let next = rows.last().map(|last| encode_cursor(&position(last)));
        (rows, next)
    } else {
        (rows, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Pos {
        v: i64,
    }

    #[test]
    fn limits() {
        assert_eq!(Limit::parse(None).unwrap().get(), 50);
        assert_eq!(Limit::parse(Some("200")).unwrap().get(), 200);
        for bad in ["0", "201", "-1", "x", ""] {
            assert!(Limit::parse(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn cursor_round_trip_and_garbage() {
        let c = encode_cursor(&Pos { v: 42 });
        assert_eq!(decode_cursor::<Pos>(Some(&c)).unwrap(), Some(Pos { v: 42 }));
        assert_eq!(decode_cursor::<Pos>(None).unwrap(), None);
        for bad in ["!!", "e30", "bm90IGpzb24", &"A".repeat(600)] {
            assert!(decode_cursor::<Pos>(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn page_cuts_and_points_at_last_row() {
        let limit = Limit::parse(Some("2")).unwrap();
        let (rows, next) = page(vec![1, 2, 3], limit, |n| Pos { v: *n });
        assert_eq!(rows, vec![1, 2]);
        assert_eq!(
            decode_cursor::<Pos>(next.as_deref()).unwrap(),
            Some(Pos { v: 2 })
        );
        let (rows, next) = page(vec![1, 2], limit, |n| Pos { v: *n });
        assert_eq!((rows, next), (vec![1, 2], None));
    }
}
