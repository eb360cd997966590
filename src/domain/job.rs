//! Job queues, states and kind names.

use super::ParseError;

/// The pool's queues; each has its own concurrency, so slow analysis never holds up alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Queue {
    Critical,
    Default,
    Analysis,
    Notifications,
}

impl Queue {
    /// In the order of `JobsConfig::concurrency`.
    pub const ALL: [Queue; 4] = [
        Queue::Critical,
        Queue::Default,
        Queue::Analysis,
        Queue::Notifications,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Queue::Critical => "critical",
            Queue::Default => "default",
            Queue::Analysis => "analysis",
            Queue::Notifications => "notifications",
        }
    }

    pub fn index(self) -> usize {
        match self {
            Queue::Critical => 0,
            Queue::Default => 1,
            Queue::Analysis => 2,
            Queue::Notifications => 3,
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|q| q.as_str() == raw)
    }
}

/// A job's state as clients see it. `Scheduled` is an available job whose `run_at` is still ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Scheduled,
    Available,
    Running,
    Retrying,
    Completed,
    Dead,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 7] = [
        JobState::Scheduled,
        JobState::Available,
        JobState::Running,
        JobState::Retrying,
        JobState::Completed,
        JobState::Dead,
        JobState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Scheduled => "scheduled",
            JobState::Available => "available",
            JobState::Running => "running",
            JobState::Retrying => "retrying",
            JobState::Completed => "completed",
            JobState::Dead => "dead",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(raw: &str) -> Result<Self, ParseError> {
        Self::ALL
            .into_iter()
            .find(|s| s.as_str() == raw)
            .ok_or_else(|| {
                ParseError::new(
                    "state",
                    "must be one of scheduled, available, running, retrying, completed, dead, cancelled",
                )
            })
    }
}

/// A job kind as a filter: lowercase letters, digits and underscores, 1-64 characters.
pub fn parse_kind(raw: &str) -> Result<&str, ParseError> {
    let ok = (1..=64).contains(&raw.len())
        && raw
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(raw)
    } else {
        Err(ParseError::new(
            "kind",
            "must be 1-64 lowercase letters, digits or underscores",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_and_queues_round_trip() {
        for s in JobState::ALL {
            assert_eq!(JobState::parse(s.as_str()).ok(), Some(s));
        }
        for q in Queue::ALL {
            assert_eq!(Queue::parse(q.as_str()), Some(q));
            assert_eq!(Queue::ALL[q.index()], q);
        }
        assert!(JobState::parse("Running").is_err());
        assert!(parse_kind("episode_analysis").is_ok());
        assert!(parse_kind("Episode").is_err());
        assert!(parse_kind("").is_err());
    }
}
