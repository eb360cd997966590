//! Background jobs: typed job kinds, enqueueing inside the caller's transaction, and the pool that
//! runs them ([`pool::Pool`]).
//!
//! The queue is the `jobs` table (migration 000005), which is also what tenants see through
//! `/v1/jobs`. Each kind is a [`Job`]: its arguments are the struct itself, and it names its queue,
//! attempts, timeout and backoff. A failed attempt is due again after its backoff (exponential
//! with jitter), written to the row at once with the error; after the last attempt the job is dead,
//! kept until pruned and retryable by hand. Every state change a tenant cares about is an event in
//! its log (`job.progress`, `job.completed`, `job.retrying`, `job.failed`, `job.cancelled`).

pub mod artifact_processing;
pub mod backoff;
pub mod cron;
pub mod episode_analysis;
pub mod health_snapshot;
pub mod maintenance;
pub mod notification;
pub mod policy_evaluation;
pub mod pool;
pub mod reflection;
pub mod storage_reconciliation;
pub mod telegram_update;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::analysis::{Analyzer, TextAnalyzer};
use crate::config::NotificationsConfig;
use crate::db::jobs::{self as store, NewJob};
use crate::db::{Db, DbError, DbResult, events, tenant as scope};
use crate::domain::event_type::EventType;
use crate::domain::job::Queue;
use crate::domain::tenant::TenantId;
use crate::events::EventBus;

/// A kind of background job. The implementing struct is the job's arguments, stored as JSON.
pub trait Job: Serialize + DeserializeOwned + Send + 'static {
    /// The kind's name as stored and shown: lowercase letters, digits and underscores.
    const KIND: &'static str;
    const QUEUE: Queue = Queue::Default;
    /// Attempts before the job is dead.
    const MAX_ATTEMPTS: i32 = 20;
    /// An attempt running longer than this fails (and is retried like any failure).
    const TIMEOUT: Duration = Duration::from_secs(300);

    /// How long to wait before attempt `attempt + 1` after attempt `attempt` failed.
    fn backoff(attempt: i32) -> Duration {
        backoff::exponential(attempt, Duration::from_secs(2), Duration::from_secs(3600))
    }

    /// Runs one attempt. `Ok` is the job's result, stored and shown to the tenant.
    fn run(self, ctx: JobContext) -> impl Future<Output = Result<Value, JobError>> + Send;
}

/// Why an attempt failed. A retryable failure is tried again after the kind's backoff until its
/// attempts run out; a permanent one makes the job dead at once.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct JobError {
    pub message: String,
    pub permanent: bool,
    /// When the next attempt may run, if the failure said (a `Retry-After`); else the kind's
    /// backoff decides.
    pub retry_in: Option<Duration>,
}

impl JobError {
    pub fn retry(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: false,
            retry_in: None,
        }
    }

    /// A retryable failure whose next attempt should wait `wait` (what the other side asked for).
    pub fn retry_in(message: impl Into<String>, wait: Duration) -> Self {
        Self {
            message: message.into(),
            permanent: false,
            retry_in: Some(wait),
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: true,
            retry_in: None,
        }
    }
}

impl From<DbError> for JobError {
    fn from(e: DbError) -> Self {
        Self::retry(format!("database: {e}"))
    }
}

/// What a running attempt knows and may do.
#[derive(Clone)]
pub struct JobContext {
    pub id: Uuid,
    /// The tenant the job belongs to; `None` for a platform job.
    pub tenant: Option<TenantId>,
    /// This attempt's number, from 1.
    pub attempt: i32,
    pub max_attempts: i32,
    pub db: Db,
    pub events: EventBus,
    pub services: Services,
    worker: Arc<str>,
    cancelled: CancellationToken,
}

impl JobContext {
    /// Cancelled when the job is cancelled through the API (noticed at the worker's next
    /// heartbeat) or the attempt runs out of time; a long step may watch it to stop early.
    pub fn cancelled(&self) -> &CancellationToken {
        &self.cancelled
    }

    /// The tenant, for a kind that only exists for tenants.
    pub fn tenant(&self) -> Result<TenantId, JobError> {
        self.tenant
            .ok_or_else(|| JobError::permanent("this kind of job needs a tenant"))
    }

    /// Records progress (`percent` 0-100, clamped) on the job and appends a `job.progress` event,
    /// in one transaction. Fails permanently when the job is no longer running under this worker
    /// (cancelled, or its lease ran out and it was handed to another), so the attempt stops.
    pub async fn progress(&self, percent: u8, message: &str) -> Result<(), JobError> {
        let Some(tenant) = self.tenant else {
            return Ok(());
        };
        let percent = i16::from(percent.min(100));
        let mut tx = scope::begin(self.db.primary(), tenant).await?;
        let message = (!message.is_empty()).then_some(message);
        if !store::set_progress(&mut tx, self.id, &self.worker, percent, message).await? {
            return Err(JobError::permanent(
                "the job is no longer running on this worker",
            ));
        }
        let data = serde_json::json!({
            "job_id": self.id,
            "percent": percent,
            "message": message,
        });
        let event = events::append(
            &mut tx,
            tenant,
            &EventType::platform(EventType::JOB_PROGRESS),
            &data,
        )
        .await?;
        tx.commit().await.map_err(DbError::from)?;
        self.events.committed(std::slice::from_ref(&event)).await;
        Ok(())
    }
}

/// How to enqueue: when, how urgent, and the idempotency key, if any.
#[derive(Debug, Clone, Default)]
pub struct Enqueue<'a> {
    /// Higher runs first among due jobs of the same queue.
    pub priority: i16,
    /// Not before this time; `None`: now.
    pub run_at: Option<DateTime<Utc>>,
    /// A second enqueue with the same key (per tenant) is a no-op that returns the first job's id.
    pub idempotency_key: Option<&'a str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[must_use = "a job enqueued in a transaction wakes its pools after the commit: `enqueued.wake.after_commit(&db)`"]
pub struct Enqueued {
    pub id: Uuid,
    /// `false` when the idempotency key was already used and nothing was written.
    pub created: bool,
    /// The queue to wake after the commit, when the job was created due now.
    #[serde(skip)]
    pub wake: Wake,
}

/// The queues whose pools a transaction's enqueues should wake once it has committed.
///
/// A job enqueued in a caller's transaction sends no NOTIFY from inside it (PostgreSQL commits
/// notifying transactions one at a time, each through its flush, which would line every write
/// that enqueues up behind the others). The caller commits, then calls [`Wake::after_commit`]:
/// one NOTIFY per queue goes out from the [`Db`]'s waker. Forgetting it only delays pickup to
/// the pools' next poll (`JOB_POLL_INTERVAL`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[must_use = "call `after_commit` once the transaction has committed"]
pub struct Wake(u8);

impl Wake {
    pub fn queue(queue: Queue) -> Self {
        Self(1 << queue.index())
    }

    /// Both sets of queues.
    pub fn and(self, other: Wake) -> Self {
        Self(self.0 | other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Wakes the pools of these queues; call it after the transaction that enqueued committed.
    pub fn after_commit(self, db: &Db) {
        for queue in Queue::ALL {
            if self.0 & (1 << queue.index()) != 0 {
                db.wake_jobs(queue);
            }
        }
    }
}

/// Enqueues `job` for `tenant` in the caller's transaction: it becomes visible to the pool when
/// that transaction commits, and vanishes if it rolls back. Once committed, call
/// `enqueued.wake.after_commit(&db)` so the pools claim it at once.
pub async fn enqueue<J: Job>(
    conn: &mut PgConnection,
    tenant: TenantId,
    job: &J,
    how: Enqueue<'_>,
) -> DbResult<Enqueued> {
    let args = job_args(job)?;
    let new = new_job::<J>(&args, &how);
    let (id, created) = store::insert(conn, tenant, &new).await?;
    let due = new.run_at.is_none_or(|at| at <= Utc::now());
    let mut enqueued = counted::<J>(id, created);
    if created && due {
        enqueued.wake = Wake::queue(J::QUEUE);
    }
    Ok(enqueued)
}

/// Enqueues `job` for `tenant` on its own, committed when this returns: for a job that belongs to
/// no other write. Concurrent calls for jobs without an idempotency key share one statement and
/// one commit ([`crate::db::enqueuer`]).
pub async fn enqueue_alone<J: Job>(
    db: &Db,
    tenant: TenantId,
    job: &J,
    how: Enqueue<'_>,
) -> DbResult<Enqueued> {
    let args = job_args(job)?;
    let (id, created) = store::insert_alone(db, tenant, &new_job::<J>(&args, &how)).await?;
    Ok(counted::<J>(id, created))
}

fn job_args<J: Job>(job: &J) -> DbResult<Value> {
    serde_json::to_value(job).map_err(|e| DbError::Sqlx(sqlx::Error::Encode(e.into())))
}

fn new_job<'a, J: Job>(args: &'a Value, how: &Enqueue<'a>) -> NewJob<'a> {
    NewJob {
        kind: J::KIND,
        queue: J::QUEUE,
        args,
        priority: how.priority,
        max_attempts: J::MAX_ATTEMPTS,
        run_at: how.run_at,
        idempotency_key: how.idempotency_key,
    }
}

fn counted<J: Job>(id: Uuid, created: bool) -> Enqueued {
    if created {
        metrics::counter!("jobs_enqueued_total", "kind" => J::KIND).increment(1);
    }
    Enqueued {
        id,
        created,
        wake: Wake::default(),
    }
}

/// What the platform's kinds need besides the database and the bus.
#[derive(Clone)]
pub struct Services {
    /// Outbound HTTP (webhook deliveries): one connection pool for every attempt.
    pub http: reqwest::Client,
    pub analyzer: Arc<dyn Analyzer>,
    pub notifications: NotificationsConfig,
    /// The artifact storage (the process's own; in-memory until the process sets it).
    pub storage: Arc<dyn crate::storage::Storage>,
    /// How old an object no artifact names must be before `storage_reconciliation` deletes it.
    pub orphan_grace: Duration,
    /// The Telegram bot: commands in, messages out.
    pub telegram: telegram_update::Bot,
}

impl Services {
    pub fn new(notifications: NotificationsConfig) -> Self {
        let http = reqwest::Client::builder()
            .user_agent(concat!("cybernetic/", env!("CARGO_PKG_VERSION")))
            .timeout(notifications.timeout)
            .connect_timeout(notifications.timeout.min(Duration::from_secs(5)))
            // A webhook answering with a redirect is not followed: the signed body goes only to
            // the URL the tenant configured.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "HTTP client with timeouts unavailable; using defaults");
                reqwest::Client::new()
            });
        Self {
            telegram: telegram_update::Bot::new(
                crate::config::TelegramConfig::default(),
                http.clone(),
            ),
            http,
            analyzer: Arc::new(TextAnalyzer),
            notifications,
            storage: Arc::new(crate::storage::memory::MemoryStorage::new()),
            orphan_grace: Duration::from_secs(3600),
        }
    }
}

impl Default for Services {
    fn default() -> Self {
        Self::new(NotificationsConfig::default())
    }
}

/// One kind, with its argument type erased so the pool can hold every kind in one map.
trait Handler: Send + Sync {
    fn run(&self, args: Value, ctx: JobContext) -> BoxFuture<'static, Result<Value, JobError>>;
    fn backoff(&self, attempt: i32) -> Duration;
    fn timeout(&self) -> Duration;
    fn queue(&self) -> Queue;
}

struct Typed<J>(std::marker::PhantomData<fn() -> J>);

impl<J: Job> Handler for Typed<J> {
    fn run(&self, args: Value, ctx: JobContext) -> BoxFuture<'static, Result<Value, JobError>> {
        Box::pin(async move {
            // Arguments that no longer decode will never decode: no point retrying.
            let job: J = serde_json::from_value(args).map_err(|e| {
                JobError::permanent(format!("arguments do not decode as {}: {e}", J::KIND))
            })?;
            job.run(ctx).await
        })
    }

    fn backoff(&self, attempt: i32) -> Duration {
        J::backoff(attempt)
    }

    fn timeout(&self) -> Duration {
        J::TIMEOUT
    }

    fn queue(&self) -> Queue {
        J::QUEUE
    }
}

/// The kinds a pool runs, by name, the schedules it keeps, and the services the kinds use.
#[derive(Clone, Default)]
pub struct Registry {
    kinds: HashMap<&'static str, Arc<dyn Handler>>,
    schedules: Vec<Arc<cron::Schedule>>,
    services: Services,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// The platform's own kinds and schedules, as `serve` and `worker` run them.
    pub fn platform(config: &crate::config::Config) -> Self {
        let services = Services::new(config.notifications.clone());
        let telegram = telegram_update::Bot::new(config.telegram.clone(), services.http.clone());
        let mut registry = Self::new()
            .with_services(Services {
                orphan_grace: config.storage.orphan_grace,
                telegram,
                ..services
            })
            .register::<telegram_update::TelegramUpdate>()
            .register::<episode_analysis::EpisodeAnalysis>()
            .register::<policy_evaluation::PolicyEvaluation>()
            .register::<notification::Notification>()
            .register::<artifact_processing::ArtifactProcessing>();
        let cron = &config.jobs.cron;
        if let Some(expr) = &cron.health_snapshot {
            registry = registry.schedule::<health_snapshot::HealthSnapshot>(expr.clone());
        }
        if let Some(expr) = &cron.daily_reflection {
            registry = registry.schedule::<reflection::DailyReflection>(expr.clone());
        }
        if let Some(expr) = &cron.weekly_review {
            registry = registry.schedule::<reflection::WeeklyReview>(expr.clone());
        }
        if let Some(expr) = &cron.storage_reconciliation {
            registry =
                registry.schedule::<storage_reconciliation::StorageReconciliation>(expr.clone());
        }
        registry
    }

    pub fn with_services(mut self, services: Services) -> Self {
        self.services = services;
        self
    }

    /// The artifact storage the kinds read (the process's own).
    pub fn with_storage(mut self, storage: Arc<dyn crate::storage::Storage>) -> Self {
        self.services.storage = storage;
        self
    }

    /// Registers `J` and runs it on `expr`'s ticks for every tenant (see [`cron`]).
    pub fn schedule<J: cron::Scheduled>(self, expr: cron::Expr) -> Self {
        let mut registry = self.register::<J>();
        registry
            .schedules
            .push(Arc::new(cron::Schedule::of::<J>(expr)));
        registry
    }

    pub fn register<J: Job>(mut self) -> Self {
        self.kinds
            .insert(J::KIND, Arc::new(Typed::<J>(std::marker::PhantomData)));
        self
    }

    fn get(&self, kind: &str) -> Option<&Arc<dyn Handler>> {
        self.kinds.get(kind)
    }

    /// The registered kind's name as a `'static` metric label; `unknown` for anything else, so
    /// labels stay bounded whatever the table holds.
    fn label(&self, kind: &str) -> &'static str {
        self.kinds
            .get_key_value(kind)
            .map(|(k, _)| *k)
            .unwrap_or("unknown")
    }

    /// The kinds registered on `queue`: what a pool claims from it.
    fn kinds_of(&self, queue: Queue) -> Vec<&'static str> {
        let mut kinds: Vec<&'static str> = self
            .kinds
            .iter()
            .filter(|(_, h)| h.queue() == queue)
            .map(|(k, _)| *k)
            .collect();
        kinds.sort_unstable();
        kinds
    }

    /// Queues that have at least one registered kind.
    fn queues(&self) -> Vec<Queue> {
        Queue::ALL
            .into_iter()
            .filter(|q| self.kinds.values().any(|h| h.queue() == *q))
            .collect()
    }
}

pub fn describe_metrics() {
    metrics::describe_counter!(
        "jobs_enqueued_total",
        "Jobs enqueued, by kind (idempotent repeats not counted)."
    );
    metrics::describe_counter!(
        "jobs_finished_total",
        "Attempts finished, by kind and outcome (completed, retried, dead, cancelled, released)."
    );
    metrics::describe_histogram!(
        "job_duration_seconds",
        metrics::Unit::Seconds,
        "Time an attempt ran, by kind."
    );
    metrics::describe_histogram!(
        "job_pickup_delay_seconds",
        metrics::Unit::Seconds,
        "Time from a job being due to a worker claiming it, by queue."
    );
    metrics::describe_gauge!(
        "jobs",
        "Unfinished and dead jobs across all workers, by queue and state."
    );
    metrics::describe_counter!(
        "jobs_rescued_total",
        "Running jobs whose worker stopped renewing their lease, handed back to the queue."
    );
    metrics::describe_counter!("jobs_pruned_total", "Finished jobs deleted by retention.");
    metrics::describe_counter!(
        "notification_deliveries_total",
        "Notification delivery attempts, by channel kind and outcome (delivered, refused, unreachable)."
    );
}
