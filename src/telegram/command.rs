//! The bot's commands: parsed from a message's text, IO-free. A message that is not a command is
//! answered with a pointer to `/help`; an unknown command or bad arguments get a reply saying what
//! would work.

use std::time::Duration;

use uuid::Uuid;

use crate::domain::topic::TopicFilter;

/// Every command, with what `/help` says of it; also what `setMyCommands` registers.
pub const COMMANDS: &[(&str, &str)] = &[
    ("help", "what the bot can do"),
    ("start", "link this chat: /start CODE"),
    ("link", "link this chat: /link CODE"),
    ("unlink", "unlink this chat from its organisation"),
    (
        "status",
        "latest S1-S5 states, open violations, failed jobs",
    ),
    ("episodes", "latest episodes: /episodes [n]"),
    ("episode", "record an episode: /episode title | text"),
    ("policies", "the S5 policies"),
    ("violations", "open policy violations"),
    ("jobs", "failed (dead) jobs"),
    ("retry", "run a failed job again: /retry JOB_ID"),
    (
        "subscribe",
        "push matching events here: /subscribe policy.violated",
    ),
    (
        "unsubscribe",
        "stop a subscription: /unsubscribe policy.violated",
    ),
    (
        "mute",
        "silence alerts for a while: /mute 2h (or /mute off)",
    ),
    (
        "whoami",
        "this chat, you, and the organisation it is linked to",
    ),
];

/// The most episodes `/episodes` lists.
pub const MAX_EPISODES: u32 = 20;
/// The longest `/mute`.
pub const MAX_MUTE: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Help,
    /// `/start` with no code (a new chat saying hello), or `/start CODE` / `/link CODE`.
    Link(Option<String>),
    Unlink,
    Status,
    Episodes(u32),
    Episode {
        title: String,
        text: String,
    },
    Policies,
    Violations,
    Jobs,
    Retry(Uuid),
    Subscribe(String),
    Unsubscribe(String),
    /// `None`: unmute.
    Mute(Option<Duration>),
    WhoAmI,
}

impl Command {
    /// The command's name, for metrics and replies.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Help => "help",
            Self::Link(_) => "link",
            Self::Unlink => "unlink",
            Self::Status => "status",
            Self::Episodes(_) => "episodes",
            Self::Episode { .. } => "episode",
            Self::Policies => "policies",
            Self::Violations => "violations",
            Self::Jobs => "jobs",
            Self::Retry(_) => "retry",
            Self::Subscribe(_) => "subscribe",
            Self::Unsubscribe(_) => "unsubscribe",
            Self::Mute(_) => "mute",
            Self::WhoAmI => "whoami",
        }
    }

    /// What a chat no tenant has linked may use.
    pub fn allowed_unlinked(&self) -> bool {
        matches!(self, Self::Help | Self::Link(_))
    }
}

/// What a message's text is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Command(Command),
    /// Plain text, not a command.
    NotACommand,
    /// `/something` the bot does not know.
    Unknown(String),
    /// A known command with arguments that do not fit: the reply says how to use it.
    BadArguments {
        command: &'static str,
        reason: String,
    },
}

pub fn parse(text: &str) -> Parsed {
    let text = text.trim();
    let Some(rest) = text.strip_prefix('/') else {
        return Parsed::NotACommand;
    };
    let (head, args) = match rest.find(char::is_whitespace) {
        Some(i) => (&rest[..i], rest[i..].trim()),
        None => (rest, ""),
    };
    // `/status@cybernetic_bot` in a group names the bot it is for.
    let name = head
        .split('@')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let bad = |command: &'static str, reason: &str| Parsed::BadArguments {
        command,
        reason: reason.to_owned(),
    };
    let command = match name.as_str() {
        "help" => Command::Help,
        "start" | "link" => {
            let code = args.split_whitespace().next().map(str::to_owned);
            if name == "link" && code.is_none() {
                return bad("link", "send the code your admin created: /link CODE");
            }
            Command::Link(code)
        }
        "unlink" => Command::Unlink,
        "status" => Command::Status,
        "episodes" => match args {
            "" => Command::Episodes(5),
            n => match n.parse::<u32>() {
                Ok(n) if (1..=MAX_EPISODES).contains(&n) => Command::Episodes(n),
                _ => return bad("episodes", "give a number from 1 to 20: /episodes 10"),
            },
        },
        "episode" => {
            let Some((title, body)) = args.split_once('|') else {
                return bad(
                    "episode",
                    "separate the title and the text with |: /episode Title | what happened",
                );
            };
            let (title, body) = (title.trim(), body.trim());
            if title.is_empty() || body.is_empty() {
                return bad(
                    "episode",
                    "both a title and a text are needed: /episode Title | what happened",
                );
            }
            Command::Episode {
                title: title.to_owned(),
                text: body.to_owned(),
            }
        }
        "policies" => Command::Policies,
        "violations" => Command::Violations,
        "jobs" => Command::Jobs,
        "retry" => match Uuid::parse_str(args) {
            Ok(id) => Command::Retry(id),
            Err(_) => {
                return bad(
                    "retry",
                    "give the id of a failed job (see /jobs): /retry JOB_ID",
                );
            }
        },
        "subscribe" | "unsubscribe" => {
            let pattern = args.trim();
            if pattern.is_empty()
                || pattern.contains(',')
                || TopicFilter::parse(Some(pattern)).is_err()
            {
                let reason =
                    "give one event type, a prefix.* pattern or *: /subscribe policy.violated";
                return if name == "subscribe" {
                    bad("subscribe", reason)
                } else {
                    bad("unsubscribe", reason)
                };
            }
            if name == "subscribe" {
                Command::Subscribe(pattern.to_owned())
            } else {
                Command::Unsubscribe(pattern.to_owned())
            }
        }
        "mute" => match args {
            "off" | "0" => Command::Mute(None),
            raw => match humantime::parse_duration(raw) {
                Ok(d) if !d.is_zero() && d <= MAX_MUTE => Command::Mute(Some(d)),
                _ => {
                    return bad(
                        "mute",
                        "give a duration up to 30 days, like 30m, 2h or 1d, or off",
                    );
                }
            },
        },
        "whoami" => Command::WhoAmI,
        _ => return Parsed::Unknown(name),
    };
    Parsed::Command(command)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(text: &str) -> Command {
        match parse(text) {
            Parsed::Command(c) => c,
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn commands_parse_with_their_arguments() {
        assert_eq!(command("/help"), Command::Help);
        assert_eq!(command("  /STATUS@cybernetic_bot  "), Command::Status);
        assert_eq!(command("/start"), Command::Link(None));
        assert_eq!(
            command("/start ABCD-1234"),
            Command::Link(Some("ABCD-1234".into()))
        );
        assert_eq!(command("/link abcd"), Command::Link(Some("abcd".into())));
        assert_eq!(command("/episodes"), Command::Episodes(5));
        assert_eq!(command("/episodes 12"), Command::Episodes(12));
        assert_eq!(
            command("/episode Outage in S1 | The line stopped\nfor ten minutes"),
            Command::Episode {
                title: "Outage in S1".into(),
                text: "The line stopped\nfor ten minutes".into()
            }
        );
        let id = Uuid::now_v7();
        assert_eq!(command(&format!("/retry {id}")), Command::Retry(id));
        assert_eq!(
            command("/subscribe policy.*"),
            Command::Subscribe("policy.*".into())
        );
        assert_eq!(command("/unsubscribe *"), Command::Unsubscribe("*".into()));
        assert_eq!(
            command("/mute 2h"),
            Command::Mute(Some(Duration::from_secs(7200)))
        );
        assert_eq!(command("/mute off"), Command::Mute(None));
        assert_eq!(command("/whoami"), Command::WhoAmI);
    }

    #[test]
    fn bad_arguments_say_how_to_use_the_command() {
        for text in [
            "/link",
            "/episodes 0",
            "/episodes many",
            "/episodes 21",
            "/episode no separator",
            "/episode | only text",
            "/retry 42",
            "/subscribe",
            "/subscribe Policy Violated",
            "/subscribe a.*,b.*",
            "/mute forever",
            "/mute 0s",
            "/mute 60d",
        ] {
            assert!(
                matches!(parse(text), Parsed::BadArguments { .. }),
                "{text}: {:?}",
                parse(text)
            );
        }
    }

    #[test]
    fn plain_text_and_unknown_commands() {
        assert_eq!(parse("hello"), Parsed::NotACommand);
        assert_eq!(
            parse("/frobnicate now"),
            Parsed::Unknown("frobnicate".into())
        );
    }

    #[test]
    fn every_parsed_command_is_listed() {
        for (name, _) in COMMANDS {
            let text = match *name {
                "start" => "/start".to_owned(),
                "link" => "/link CODE".to_owned(),
                "episode" => "/episode a | b".to_owned(),
                "retry" => format!("/retry {}", Uuid::now_v7()),
                "subscribe" | "unsubscribe" => format!("/{name} *"),
                "mute" => "/mute 1h".to_owned(),
                other => format!("/{other}"),
            };
            assert!(matches!(parse(&text), Parsed::Command(_)), "{text}");
        }
    }
}
