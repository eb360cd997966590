//! The five systems of the Viable System Model.

use serde::Serialize;

use super::ParseError;

/// S1 operations, S2 coordination, S3 control, S4 intelligence, S5 policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct SystemId(u8);

impl SystemId {
    pub const ALL: [SystemId; 5] = [Self(1), Self(2), Self(3), Self(4), Self(5)];

    pub fn parse(raw: &str) -> Result<Self, ParseError> {
        // Accept both `3` and `s3`/`S3`, the way people write VSM systems.
        let digits = raw.strip_prefix(['s', 'S']).unwrap_or(raw);
        match digits.parse::<u8>() {
            Ok(n @ 1..=5) if digits.len() == 1 => Ok(Self(n)),
            _ => Err(ParseError::new(
                "system",
                "must be a VSM system from 1 to 5 (or s1 to s5)",
            )),
        }
    }

    pub fn from_number(n: i16) -> Result<Self, ParseError> {
        match u8::try_from(n) {
            Ok(n @ 1..=5) => Ok(Self(n)),
            _ => Err(ParseError::new("system", "must be from 1 to 5")),
        }
    }

    pub fn number(self) -> i16 {
        i16::from(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        assert_eq!(SystemId::parse("1").unwrap().number(), 1);
        assert_eq!(SystemId::parse("s5").unwrap().number(), 5);
        assert_eq!(SystemId::parse("S3").unwrap().number(), 3);
        for bad in ["0", "6", "", "s", "01", "-1", "3.0", "s6", "99999999999"] {
            assert!(SystemId::parse(bad).is_err(), "{bad}");
        }
    }
}
