//! Typed configuration from the environment. Every secret also accepts `NAME_FILE` (a path, for
//! Docker secrets). A missing or malformed value stops start-up with one line naming it.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;

use crate::domain::schedule::Expr;
use crate::storage::s3::S3Config;

/// A value that must never reach a log line or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration error: {var}: {reason}")]
pub struct ConfigError {
    pub var: &'static str,
    pub reason: String,
}

impl ConfigError {
    fn new(var: &'static str, reason: impl Into<String>) -> Self {
        Self {
            var,
            reason: reason.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// App role (`cybernetic_app`): what the server and operator commands log in as.
    pub url: Option<Secret>,
    /// Owner role (`cybernetic_owner`): used only by `migrate`.
    pub migration_url: Option<Secret>,
    /// Optional read replica for history and list reads.
    pub replica_url: Option<Secret>,
    pub max_connections: u32,
    pub acquire_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub listen_addr: SocketAddr,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct MetricsConfig {
    pub token: Option<Secret>,
    /// Scrapes allowed per second on `/metrics`, across all callers.
    pub rate_limit_per_second: u32,
}

#[derive(Debug, Clone)]
pub struct ShutdownConfig {
    /// How long readiness reports 503 before the listener stops accepting, so load balancers
    /// take the instance out before connections are refused.
    pub readiness_delay: Duration,
    /// How long in-flight requests may take to finish after that.
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct EventsConfig {
    /// RabbitMQ, for fan-out between processes; without it a process serves its own writes live
    /// and others' within the hub's poll interval.
    pub amqp_url: Option<Secret>,
    pub heartbeat: Duration,
    pub retention: Duration,
    /// Events each tenant's in-process ring holds for subscribers that are momentarily behind.
    pub buffer: usize,
}

#[derive(Debug, Clone)]
pub struct JobsConfig {
    /// Jobs each queue runs at once in this process: critical, default, analysis, notifications.
    pub concurrency: [usize; 4],
    /// How often a queue looks for due jobs when no notification arrived: the bound on pickup
    /// latency when a NOTIFY is missed, and for delayed jobs and retries coming due.
    pub poll_interval: Duration,
    /// How long a claimed job stays reserved without its worker's heartbeat; a worker killed
    /// mid-job has its job run again within this (plus one rescue pass, a third of it).
    pub lease: Duration,
    /// Jobs claimed ahead of free slots, so a busy queue does not wait on the database between jobs.
    pub prefetch: usize,
    /// On shutdown, how long running jobs may take to finish; the rest go back to the queue.
    pub drain_timeout: Duration,
    /// Completed jobs are deleted after this; dead and cancelled ones after 30 days.
    pub retention: Duration,
    pub cron: CronConfig,
}

impl JobsConfig {
    /// How long after its worker died (killed, frozen, cut off) a job runs again at most: its
    /// lease runs out, the next rescue pass (one every third of the lease) makes it due, and a
    /// pool claims it within a poll interval. 20.25 s with the defaults.
    pub fn recovery_bound(&self) -> Duration {
        self.lease + self.lease / 3 + self.poll_interval
    }
}

/// When the platform's scheduled kinds run (6-field cron: second minute hour day month weekday);
/// `None` turns one off (`Default`: all off). Reflections are evaluated in each tenant's timezone.
#[derive(Debug, Clone, Default)]
pub struct CronConfig {
    pub health_snapshot: Option<Expr>,
    pub daily_reflection: Option<Expr>,
    pub weekly_review: Option<Expr>,
    /// Deletes objects no artifact names (left by a crash mid-upload) and reports artifacts whose
    /// object is missing.
    pub storage_reconciliation: Option<Expr>,
}

/// Where artifacts' bytes are kept.
#[derive(Debug, Clone)]
pub enum StorageBackend {
    /// A directory on this machine (`STORAGE_LOCAL_ROOT`).
    Local {
        root: std::path::PathBuf,
    },
    S3(S3Config),
    /// In this process only: for tests and throwaway runs.
    Memory,
}

#[derive(Debug, Clone)]
pub struct StorageConfig {
    pub backend: StorageBackend,
    /// Largest artifact accepted; a bigger upload is refused with 413 while it streams.
    pub max_bytes: u64,
    /// How old an object no artifact names must be before storage reconciliation deletes it: the
    /// time an upload may sit complete in the backend before its row is committed, with room for
    /// the backend's clock to differ from the database's.
    pub orphan_grace: Duration,
}

/// Outbound notifications (webhook deliveries).
#[derive(Debug, Clone)]
pub struct NotificationsConfig {
    /// Allows `http://` webhook URLs (for a receiver on a private network); only `https://`
    /// otherwise.
    pub allow_http: bool,
    /// Bound on one delivery attempt, connect to last byte of the response.
    pub timeout: Duration,
}

impl Default for NotificationsConfig {
    fn default() -> Self {
        Self {
            allow_http: false,
            timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub database: DatabaseConfig,
    pub http: HttpConfig,
    pub admin_token: Option<Secret>,
    pub metrics: MetricsConfig,
    pub shutdown: ShutdownConfig,
    pub events: EventsConfig,
    pub jobs: JobsConfig,
    pub notifications: NotificationsConfig,
    pub storage: StorageConfig,
    pub telegram: TelegramConfig,
    pub log_format: LogFormat,
}

/// The Telegram bot: where its Bot API is, how its webhook is verified, and the command limits.
#[derive(Debug, Clone)]
pub struct TelegramConfig {
    /// The bot's token (`TELEGRAM_BOT_TOKEN`); without it nothing is sent and `/telegram/webhook`
    /// answers 404.
    pub bot_token: Option<Secret>,
    /// What Telegram sends in `X-Telegram-Bot-Api-Secret-Token` (`TELEGRAM_WEBHOOK_SECRET`): fixed,
    /// so every replica verifies the same one. Required with a token.
    pub webhook_secret: Option<Secret>,
    /// The Bot API's base URL (`TELEGRAM_API_BASE`).
    pub api_base: String,
    /// Commands one chat may send per minute, and at once.
    pub chat_per_minute: u32,
    pub chat_burst: u32,
    /// Commands this process runs per second, over all chats; the rest wait their turn.
    pub global_per_second: u32,
}

impl Default for TelegramConfig {
    fn default() -> Self {
        Self {
            bot_token: None,
            webhook_secret: None,
            api_base: "https://api.telegram.org".into(),
            chat_per_minute: 20,
            chat_burst: 5,
            global_per_second: 50,
        }
    }
}

const MIN_TOKEN_LEN: usize = 32;

impl Config {
    /// Reads the process environment.
    pub fn load() -> Result<Self, ConfigError> {
        Self::from_source(&|name| std::env::var(name).ok())
    }

    /// Reads from any lookup (the environment, or a map in tests).
    pub fn from_source(env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let src = Source { env };
        let database = DatabaseConfig {
            url: src
                .secret("DATABASE_URL")?
                .map(|s| postgres_url("DATABASE_URL", s))
                .transpose()?,
            migration_url: src
                .secret("MIGRATION_DATABASE_URL")?
                .map(|s| postgres_url("MIGRATION_DATABASE_URL", s))
                .transpose()?,
            replica_url: src
                .secret("DATABASE_REPLICA_URL")?
                .map(|s| postgres_url("DATABASE_REPLICA_URL", s))
                .transpose()?,
            max_connections: src.number("DATABASE_MAX_CONNECTIONS", 20, 1..=10_000)?,
            acquire_timeout: src.duration("DATABASE_ACQUIRE_TIMEOUT", Duration::from_secs(5))?,
        };
        let listen_addr = match src.plain("LISTEN_ADDR") {
            None => SocketAddr::from(([0, 0, 0, 0], 8080)),
            Some(raw) => raw.parse().map_err(|_| {
                ConfigError::new(
                    "LISTEN_ADDR",
                    format!("'{raw}' is not an address like 0.0.0.0:8080"),
                )
            })?,
        };
        let http = HttpConfig {
            listen_addr,
            max_body_bytes: src.number("HTTP_MAX_BODY_BYTES", 1 << 20, 1..=(1 << 30))?,
            request_timeout: src.duration("HTTP_REQUEST_TIMEOUT", Duration::from_secs(30))?,
        };
        let admin_token = src.token("ADMIN_TOKEN")?;
        let metrics = MetricsConfig {
            token: src.token("METRICS_TOKEN")?,
            rate_limit_per_second: src.number("METRICS_RATE_LIMIT", 10, 1..=100_000)?,
        };
        let shutdown = ShutdownConfig {
            readiness_delay: src.duration("SHUTDOWN_READINESS_DELAY", Duration::ZERO)?,
            drain_timeout: src.duration("SHUTDOWN_TIMEOUT", Duration::from_secs(25))?,
        };
        let amqp_url = src.secret("AMQP_URL")?;
        if let Some(url) = &amqp_url
            && !(url.expose().starts_with("amqp://") || url.expose().starts_with("amqps://"))
        {
            return Err(ConfigError::new(
                "AMQP_URL",
                "must be an amqp:// or amqps:// URL",
            ));
        }
        let events = EventsConfig {
            amqp_url,
            heartbeat: src.duration("SSE_HEARTBEAT", Duration::from_secs(15))?,
            retention: src.duration("EVENT_RETENTION", Duration::from_secs(30 * 24 * 3600))?,
            buffer: src.number("SSE_BUFFER", 1024, 16..=1_000_000)?,
        };
        if events.retention < Duration::from_secs(60) {
            return Err(ConfigError::new("EVENT_RETENTION", "must be at least 1m"));
        }
        if events.heartbeat.is_zero() {
            return Err(ConfigError::new(
                "SSE_HEARTBEAT",
                "must be longer than zero",
            ));
        }
        let jobs = JobsConfig {
            concurrency: [
                src.number("JOB_CONCURRENCY_CRITICAL", 4, 0..=1000)?,
                src.number("JOB_CONCURRENCY_DEFAULT", 8, 0..=1000)?,
                src.number("JOB_CONCURRENCY_ANALYSIS", 2, 0..=1000)?,
                src.number("JOB_CONCURRENCY_NOTIFICATIONS", 8, 0..=1000)?,
            ],
            poll_interval: src.duration("JOB_POLL_INTERVAL", Duration::from_millis(250))?,
            lease: src.duration("JOB_LEASE", Duration::from_secs(15))?,
            prefetch: src.number("JOB_PREFETCH", 32, 0..=10_000)?,
            drain_timeout: src.duration("JOB_DRAIN_TIMEOUT", Duration::from_secs(20))?,
            retention: src.duration("JOB_RETENTION", Duration::from_secs(7 * 24 * 3600))?,
            cron: CronConfig {
                health_snapshot: src.cron("CRON_HEALTH_SNAPSHOT", "0 0 * * * *")?,
                daily_reflection: src.cron("CRON_DAILY_REFLECTION", "0 0 18 * * *")?,
                weekly_review: src.cron("CRON_WEEKLY_REVIEW", "0 0 18 * * Fri")?,
                storage_reconciliation: src.cron("CRON_STORAGE_RECONCILIATION", "0 15 * * * *")?,
            },
        };
        if jobs.poll_interval < Duration::from_millis(10) {
            return Err(ConfigError::new(
                "JOB_POLL_INTERVAL",
                "must be at least 10ms",
            ));
        }
        if jobs.lease < Duration::from_secs(1) {
            return Err(ConfigError::new("JOB_LEASE", "must be at least 1s"));
        }
        // Longer than the cron catch-up window, so a restarted scheduler always finds the jobs of
        // the ticks it enqueues again (their idempotency keys) and adds nothing.
        if jobs.retention < Duration::from_secs(600) {
            return Err(ConfigError::new("JOB_RETENTION", "must be at least 10m"));
        }
        let notifications = NotificationsConfig {
            allow_http: src.flag("WEBHOOK_ALLOW_HTTP", false)?,
            timeout: src.duration("WEBHOOK_TIMEOUT", Duration::from_secs(10))?,
        };
        if notifications.timeout < Duration::from_millis(100) {
            return Err(ConfigError::new(
                "WEBHOOK_TIMEOUT",
                "must be at least 100ms",
            ));
        }
        let storage = StorageConfig {
            backend: match src.plain("STORAGE_BACKEND").as_deref() {
                None | Some("local") => StorageBackend::Local {
                    root: src
                        .plain("STORAGE_LOCAL_ROOT")
                        .unwrap_or_else(|| "data".to_owned())
                        .into(),
                },
                Some("memory") => StorageBackend::Memory,
                Some("s3") => StorageBackend::S3(S3Config {
                    bucket: src.plain("S3_BUCKET").ok_or_else(|| {
                        ConfigError::new("S3_BUCKET", "is required with STORAGE_BACKEND=s3")
                    })?,
                    endpoint: src.plain("S3_ENDPOINT"),
                    region: src
                        .plain("S3_REGION")
                        .unwrap_or_else(|| "us-east-1".to_owned()),
                    force_path_style: src.flag("S3_FORCE_PATH_STYLE", false)?,
                    access_key_id: src.secret("S3_ACCESS_KEY_ID")?,
                    secret_access_key: src.secret("S3_SECRET_ACCESS_KEY")?,
                    part_size: src.number(
                        "S3_PART_SIZE",
                        8 << 20,
                        crate::storage::s3::MIN_PART_SIZE..=(512 << 20),
                    )?,
                    parts_in_flight: src.number("S3_PARTS_IN_FLIGHT", 3, 1..=64)?,
                }),
                Some(other) => {
                    return Err(ConfigError::new(
                        "STORAGE_BACKEND",
                        format!("'{other}' is not one of local, s3, memory"),
                    ));
                }
            },
            max_bytes: src.number("STORAGE_MAX_BYTES", 5 << 30, 1..=(1 << 40))?,
            orphan_grace: src.duration("STORAGE_ORPHAN_GRACE", Duration::from_secs(3600))?,
        };
        if storage.orphan_grace < Duration::from_secs(60) {
            return Err(ConfigError::new(
                "STORAGE_ORPHAN_GRACE",
                "must be at least 1m, so an upload about to be committed is never taken for an orphan",
            ));
        }
        if let StorageBackend::S3(s3) = &storage.backend
            && (s3.part_size as u64).saturating_mul(10_000) < storage.max_bytes
        {
            return Err(ConfigError::new(
                "S3_PART_SIZE",
                "times 10000 parts (S3's limit) must be at least STORAGE_MAX_BYTES",
            ));
        }
        if let StorageBackend::S3(s3) = &storage.backend
            && s3.access_key_id.is_some() != s3.secret_access_key.is_some()
        {
            return Err(ConfigError::new(
                "S3_ACCESS_KEY_ID",
                "set both S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY, or neither",
            ));
        }
        let telegram = TelegramConfig {
            bot_token: src.secret("TELEGRAM_BOT_TOKEN")?,
            webhook_secret: src.secret("TELEGRAM_WEBHOOK_SECRET")?,
            api_base: src
                .plain("TELEGRAM_API_BASE")
                .map(|base| base.trim_end_matches('/').to_owned())
                .unwrap_or_else(|| "https://api.telegram.org".into()),
            chat_per_minute: src.number("TELEGRAM_CHAT_RATE", 20, 1..=6000)?,
            chat_burst: src.number("TELEGRAM_CHAT_BURST", 5, 1..=1000)?,
            global_per_second: src.number("TELEGRAM_GLOBAL_RATE", 50, 1..=100_000)?,
        };
        if telegram.bot_token.is_some() && telegram.webhook_secret.is_none() {
            return Err(ConfigError::new(
                "TELEGRAM_WEBHOOK_SECRET",
                "is required with TELEGRAM_BOT_TOKEN (Telegram sends it with every update)",
            ));
        }
        if let Some(secret) = &telegram.webhook_secret {
            let s = secret.expose();
            if !(1..=256).contains(&s.len())
                || !s
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(ConfigError::new(
                    "TELEGRAM_WEBHOOK_SECRET",
                    "must be 1-256 characters of A-Z, a-z, 0-9, _ and - (Telegram's rule)",
                ));
            }
        }
        if !(telegram.api_base.starts_with("https://") || telegram.api_base.starts_with("http://"))
        {
            return Err(ConfigError::new(
                "TELEGRAM_API_BASE",
                "must be an http:// or https:// URL",
            ));
        }
        let log_format = match src.plain("LOG_FORMAT").as_deref() {
            None | Some("json") => LogFormat::Json,
            Some("pretty") => LogFormat::Pretty,
            Some(other) => {
                return Err(ConfigError::new(
                    "LOG_FORMAT",
                    format!("'{other}' is not one of json, pretty"),
                ));
            }
        };
        Ok(Self {
            database,
            http,
            admin_token,
            metrics,
            shutdown,
            events,
            jobs,
            notifications,
            storage,
            telegram,
            log_format,
        })
    }

    /// The app-role URL, which every command but `migrate` needs.
    pub fn database_url(&self) -> Result<&Secret, ConfigError> {
        self.database
            .url
            .as_ref()
            .ok_or_else(|| ConfigError::new("DATABASE_URL", "is not set (app role connection URL)"))
    }

    /// The owner-role URL, which `migrate` needs.
    pub fn migration_database_url(&self) -> Result<&Secret, ConfigError> {
        self.database.migration_url.as_ref().ok_or_else(|| {
            ConfigError::new(
                "MIGRATION_DATABASE_URL",
                "is not set (owner role connection URL)",
            )
        })
    }
}

struct Source<'a> {
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Source<'_> {
    fn plain(&self, name: &str) -> Option<String> {
        (self.env)(name).filter(|v| !v.is_empty())
    }

    /// `NAME`, or the contents of the file named by `NAME_FILE` (one trailing newline dropped).
    fn secret(&self, name: &'static str) -> Result<Option<Secret>, ConfigError> {
        let file_var = format!("{name}_FILE");
        match (self.plain(name), self.plain(&file_var)) {
            (Some(_), Some(_)) => Err(ConfigError::new(
                name,
                format!("set either {name} or {file_var}, not both"),
            )),
            (Some(value), None) => Ok(Some(Secret(value))),
            (None, Some(path)) => {
                let contents = std::fs::read_to_string(&path).map_err(|e| {
                    ConfigError::new(name, format!("cannot read {file_var}={path}: {e}"))
                })?;
                let value = contents.strip_suffix('\n').unwrap_or(&contents);
                let value = value.strip_suffix('\r').unwrap_or(value);
                if value.is_empty() {
                    return Err(ConfigError::new(
                        name,
                        format!("{file_var}={path} is empty"),
                    ));
                }
                Ok(Some(Secret(value.to_owned())))
            }
            (None, None) => Ok(None),
        }
    }

    /// A bearer token: long enough that guessing it is hopeless.
    fn token(&self, name: &'static str) -> Result<Option<Secret>, ConfigError> {
        let token = self.secret(name)?;
        if let Some(t) = &token {
            if t.0.len() < MIN_TOKEN_LEN {
                return Err(ConfigError::new(
                    name,
                    format!("must be at least {MIN_TOKEN_LEN} characters"),
                ));
            }
            if !t.0.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ConfigError::new(
                    name,
                    "must be printable ASCII without spaces",
                ));
            }
        }
        Ok(token)
    }

    fn number<T>(
        &self,
        name: &'static str,
        default: T,
        range: std::ops::RangeInclusive<T>,
    ) -> Result<T, ConfigError>
    where
        T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
    {
        let Some(raw) = self.plain(name) else {
            return Ok(default);
        };
        match raw.parse::<T>() {
            Ok(n) if range.contains(&n) => Ok(n),
            _ => Err(ConfigError::new(
                name,
                format!(
                    "'{raw}' is not a whole number from {} to {}",
                    range.start(),
                    range.end()
                ),
            )),
        }
    }

    fn flag(&self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.plain(name).as_deref() {
            None => Ok(default),
            Some("true" | "1" | "yes") => Ok(true),
            Some("false" | "0" | "no") => Ok(false),
            Some(other) => Err(ConfigError::new(
                name,
                format!("'{other}' is not one of true, false, 1, 0, yes, no"),
            )),
        }
    }

    /// A cron expression; `off` turns the schedule off.
    fn cron(&self, name: &'static str, default: &str) -> Result<Option<Expr>, ConfigError> {
        let raw = self.plain(name).unwrap_or_else(|| default.to_owned());
        if raw == "off" {
            return Ok(None);
        }
        Expr::parse(&raw)
            .map(Some)
            .map_err(|e| ConfigError::new(name, e.reason))
    }

    fn duration(&self, name: &'static str, default: Duration) -> Result<Duration, ConfigError> {
        let Some(raw) = self.plain(name) else {
            return Ok(default);
        };
        humantime::parse_duration(&raw).map_err(|_| {
            ConfigError::new(
                name,
                format!("'{raw}' is not a duration like 500ms, 30s or 2m"),
            )
        })
    }
}

fn postgres_url(var: &'static str, url: Secret) -> Result<Secret, ConfigError> {
    if !(url.0.starts_with("postgres://") || url.0.starts_with("postgresql://")) {
        return Err(ConfigError::new(var, "must be a postgres:// URL"));
    }
    url.0
        .parse::<PgConnectOptions>()
        .map_err(|_| ConfigError::new(var, "is not a valid PostgreSQL connection URL"))?;
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_source(&move |k| map.get(k).cloned())
    }

    /// Each set of variables is refused, naming the variable at fault.
    fn refused_naming(cases: &[(&[(&str, &str)], &str)]) {
        for (vars, var) in cases {
            let err = load(vars).unwrap_err();
            assert_eq!(err.var, *var, "{vars:?}: {err}");
        }
    }

    #[test]
    fn defaults() {
        let c = load(&[]).unwrap();
        assert_eq!(c.http.listen_addr.port(), 8080);
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(c.database_url().is_err());
        assert_eq!(c.database.max_connections, 20);
    }

    #[test]
    fn a_job_whose_worker_dies_runs_again_within_30_seconds_by_default() {
        let c = load(&[]).unwrap();
        assert_eq!(c.jobs.recovery_bound(), Duration::from_millis(20_250));
        assert!(c.jobs.recovery_bound() <= Duration::from_secs(30));
        let shorter = load(&[("JOB_LEASE", "3s"), ("JOB_POLL_INTERVAL", "100ms")]).unwrap();
        assert_eq!(shorter.jobs.recovery_bound(), Duration::from_millis(4_100));
    }

    #[test]
    fn errors_name_the_variable() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("DATABASE_URL", "mysql://x")], "DATABASE_URL"),
            (&[("LISTEN_ADDR", "nope")], "LISTEN_ADDR"),
            (&[("LOG_FORMAT", "xml")], "LOG_FORMAT"),
            (&[("ADMIN_TOKEN", "short")], "ADMIN_TOKEN"),
            (&[("HTTP_REQUEST_TIMEOUT", "soon")], "HTTP_REQUEST_TIMEOUT"),
            (
                &[("DATABASE_MAX_CONNECTIONS", "0")],
                "DATABASE_MAX_CONNECTIONS",
            ),
            (&[("ADMIN_TOKEN_FILE", "/nonexistent/token")], "ADMIN_TOKEN"),
        ];
        refused_naming(cases);
    }

    #[test]
    fn secret_from_file_and_redacted() {
        let dir = std::env::temp_dir().join(format!("cyb-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        let token = "t".repeat(40);
        std::fs::write(&path, format!("{token}\n")).unwrap();
        let c = load(&[("ADMIN_TOKEN_FILE", path.to_str().unwrap())]).unwrap();
        assert_eq!(c.admin_token.as_ref().unwrap().expose(), token);
        assert!(!format!("{c:?}").contains(&token));
        let both = load(&[
            ("ADMIN_TOKEN", &token),
            ("ADMIN_TOKEN_FILE", path.to_str().unwrap()),
        ]);
        assert_eq!(both.unwrap_err().var, "ADMIN_TOKEN");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn database_url_secret_not_in_debug() {
        let c = load(&[("DATABASE_URL", "postgres://app:hunter2@db/cybernetic")]).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    fn s3(c: &Config) -> &S3Config {
        match &c.storage.backend {
            StorageBackend::S3(s3) => s3,
            other => panic!("not the s3 backend: {other:?}"),
        }
    }

    #[test]
    fn the_storage_backend_is_chosen_by_configuration() {
        // Nothing set: the local backend under ./data, and artifacts of up to 5 GiB.
        let c = load(&[]).unwrap();
        assert!(
            matches!(&c.storage.backend, StorageBackend::Local { root } if root.as_path() == std::path::Path::new("data")),
            "{:?}",
            c.storage.backend
        );
        assert_eq!(c.storage.max_bytes, 5 * 1024 * 1024 * 1024);
        assert_eq!(c.storage.orphan_grace, Duration::from_secs(3600));

        let c = load(&[
            ("STORAGE_BACKEND", "local"),
            ("STORAGE_LOCAL_ROOT", "/srv/artifacts"),
            ("STORAGE_MAX_BYTES", "1000"),
        ])
        .unwrap();
        assert!(
            matches!(&c.storage.backend, StorageBackend::Local { root } if root.as_path() == std::path::Path::new("/srv/artifacts")),
            "{:?}",
            c.storage.backend
        );
        assert_eq!(c.storage.max_bytes, 1000);

        let c = load(&[("STORAGE_BACKEND", "memory")]).unwrap();
        assert!(
            matches!(c.storage.backend, StorageBackend::Memory),
            "{:?}",
            c.storage.backend
        );

        let c = load(&[
            ("STORAGE_BACKEND", "s3"),
            ("S3_BUCKET", "artifacts"),
            ("S3_ENDPOINT", "http://127.0.0.1:9000"),
            ("S3_REGION", "eu-central-1"),
            ("S3_FORCE_PATH_STYLE", "true"),
            ("S3_ACCESS_KEY_ID", "AKIDEXAMPLE"),
            ("S3_SECRET_ACCESS_KEY", "wJalrXUtnFEMI"),
        ])
        .unwrap();
        let s = s3(&c);
        assert_eq!(s.bucket, "artifacts");
        assert_eq!(s.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(s.region, "eu-central-1");
        assert!(s.force_path_style);
        assert_eq!(
            s.access_key_id.as_ref().map(Secret::expose),
            Some("AKIDEXAMPLE")
        );
        assert_eq!(
            s.secret_access_key.as_ref().map(Secret::expose),
            Some("wJalrXUtnFEMI")
        );
        assert_eq!(s.part_size, 8 << 20);
        assert_eq!(s.parts_in_flight, 3);
        assert!(!format!("{c:?}").contains("wJalrXUtnFEMI"));

        // Only the bucket: AWS itself, its default region and credential chain, virtual hosts.
        let c = load(&[("STORAGE_BACKEND", "s3"), ("S3_BUCKET", "artifacts")]).unwrap();
        let s = s3(&c);
        assert_eq!(s.endpoint, None);
        assert_eq!(s.region, "us-east-1");
        assert!(!s.force_path_style);
        assert!(s.access_key_id.is_none() && s.secret_access_key.is_none());
        let c = load(&[
            ("STORAGE_BACKEND", "s3"),
            ("S3_BUCKET", "artifacts"),
            ("S3_FORCE_PATH_STYLE", "0"),
        ])
        .unwrap();
        assert!(!s3(&c).force_path_style);
    }

    #[test]
    fn s3_credentials_can_come_from_files() {
        let dir = std::env::temp_dir().join(format!("cyb-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let id_file = dir.join("s3_access_key_id");
        let secret_file = dir.join("s3_secret_access_key");
        std::fs::write(&id_file, "AKIDFROMFILE\n").unwrap();
        std::fs::write(&secret_file, "s3cr3t-from-file\r\n").unwrap();
        let id_path = id_file.to_str().unwrap();
        let secret_path = secret_file.to_str().unwrap();

        let c = load(&[
            ("STORAGE_BACKEND", "s3"),
            ("S3_BUCKET", "artifacts"),
            ("S3_ACCESS_KEY_ID_FILE", id_path),
            ("S3_SECRET_ACCESS_KEY_FILE", secret_path),
        ])
        .unwrap();
        let s = s3(&c);
        assert_eq!(
            s.access_key_id.as_ref().map(Secret::expose),
            Some("AKIDFROMFILE")
        );
        assert_eq!(
            s.secret_access_key.as_ref().map(Secret::expose),
            Some("s3cr3t-from-file")
        );
        assert!(!format!("{c:?}").contains("s3cr3t-from-file"));

        // A file and a value for one credential, a credential without the other, an empty or a
        // missing file: each refused, naming the variable.
        let empty = dir.join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[
                    ("S3_ACCESS_KEY_ID", "AKID"),
                    ("S3_ACCESS_KEY_ID_FILE", id_path),
                    ("S3_SECRET_ACCESS_KEY_FILE", secret_path),
                ],
                "S3_ACCESS_KEY_ID",
            ),
            (
                &[
                    ("S3_ACCESS_KEY_ID_FILE", id_path),
                    ("S3_SECRET_ACCESS_KEY", "s"),
                    ("S3_SECRET_ACCESS_KEY_FILE", secret_path),
                ],
                "S3_SECRET_ACCESS_KEY",
            ),
            (&[("S3_ACCESS_KEY_ID_FILE", id_path)], "S3_ACCESS_KEY_ID"),
            (
                &[
                    ("S3_ACCESS_KEY_ID_FILE", id_path),
                    ("S3_SECRET_ACCESS_KEY_FILE", empty.to_str().unwrap()),
                ],
                "S3_SECRET_ACCESS_KEY",
            ),
            (
                &[
                    ("S3_ACCESS_KEY_ID_FILE", "/nonexistent/s3_access_key_id"),
                    ("S3_SECRET_ACCESS_KEY_FILE", secret_path),
                ],
                "S3_ACCESS_KEY_ID",
            ),
        ];
        for (vars, var) in cases {
            let mut vars = vars.to_vec();
            vars.extend([("STORAGE_BACKEND", "s3"), ("S3_BUCKET", "artifacts")]);
            let err = load(&vars).unwrap_err();
            assert_eq!(err.var, *var, "{vars:?}: {err}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn storage_errors_name_the_variable() {
        let err = load(&[("STORAGE_BACKEND", "ftp")]).unwrap_err();
        assert_eq!(err.var, "STORAGE_BACKEND", "{err}");
        assert!(err.reason.contains("'ftp'"), "{err}");
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("STORAGE_BACKEND", "s3")], "S3_BUCKET"),
            (
                &[
                    ("STORAGE_BACKEND", "s3"),
                    ("S3_BUCKET", "b"),
                    ("S3_FORCE_PATH_STYLE", "sometimes"),
                ],
                "S3_FORCE_PATH_STYLE",
            ),
            (
                &[
                    ("STORAGE_BACKEND", "s3"),
                    ("S3_BUCKET", "b"),
                    ("S3_PART_SIZE", "1048576"),
                ],
                "S3_PART_SIZE",
            ),
            (&[("STORAGE_MAX_BYTES", "0")], "STORAGE_MAX_BYTES"),
            (&[("STORAGE_MAX_BYTES", "5GiB")], "STORAGE_MAX_BYTES"),
            (&[("STORAGE_ORPHAN_GRACE", "30s")], "STORAGE_ORPHAN_GRACE"),
        ];
        refused_naming(cases);
    }

    #[test]
    fn s3_parts_must_be_able_to_hold_the_largest_artifact() {
        // S3 allows at most 10,000 parts: 5 MiB parts hold 10,000 x 5 MiB and not a byte more.
        let with = |max: &str, part: Option<&str>| {
            let mut vars = vec![
                ("STORAGE_BACKEND", "s3"),
                ("S3_BUCKET", "b"),
                ("STORAGE_MAX_BYTES", max),
            ];
            if let Some(part) = part {
                vars.push(("S3_PART_SIZE", part));
            }
            load(&vars)
        };
        let five_mib = "5242880";
        let fits = (5u64 << 20) * 10_000;
        let c = with(&fits.to_string(), Some(five_mib)).unwrap();
        assert_eq!(c.storage.max_bytes, fits);
        assert_eq!(s3(&c).part_size, 5 << 20);
        let err = with(&(fits + 1).to_string(), Some(five_mib)).unwrap_err();
        assert_eq!(err.var, "S3_PART_SIZE", "{err}");
        assert!(err.reason.contains("STORAGE_MAX_BYTES"), "{err}");
        // The default 8 MiB parts cover the default 5 GiB, but not 1 TiB; larger parts do.
        assert!(with(&(5u64 << 30).to_string(), None).is_ok());
        assert_eq!(
            with(&(1u64 << 40).to_string(), None).unwrap_err().var,
            "S3_PART_SIZE"
        );
        assert!(with(&(1u64 << 40).to_string(), Some(&(128u64 << 20).to_string())).is_ok());
        // Only S3 has parts: the other backends take any size up to the bound.
        for backend in ["local", "memory"] {
            let c = load(&[
                ("STORAGE_BACKEND", backend),
                ("STORAGE_MAX_BYTES", &(1u64 << 40).to_string()),
            ])
            .unwrap();
            assert_eq!(c.storage.max_bytes, 1 << 40);
        }
    }
}
