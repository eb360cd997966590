//! PostgreSQL access: the pools (primary and optional read replica), migrations, and one
//! repository module per table group. Tenant data is reached only through [`tenant::begin`].

pub mod api_keys;
pub mod artifacts;
pub mod channels;
pub mod enqueuer;
pub mod episodes;
pub mod events;
pub mod health;
pub mod jobs;
pub mod key_cache;
pub mod policies;
pub mod reflections;
pub mod system_states;
pub mod telegram;
pub mod tenant;
pub mod tenants;
pub mod violations;
pub mod waker;
pub mod webhook_sources;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::config::{DatabaseConfig, Secret};

/// Errors from the data layer. Constraint violations a client can cause are told apart so the
/// HTTP layer can answer 409 instead of 500.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("unique constraint {constraint} violated")]
    UniqueViolation { constraint: String },
    #[error(transparent)]
    Sqlx(sqlx::Error),
}

impl From<sqlx::Error> for DbError {
    fn from(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e
            && db.is_unique_violation()
        {
            return Self::UniqueViolation {
                constraint: db.constraint().unwrap_or_default().to_owned(),
            };
        }
        Self::Sqlx(e)
    }
}

impl DbError {
    /// A failure that concerns the values written (class 22 data exceptions, class 23 integrity
    /// violations): the statement was rolled back, and a batch's rows are worth trying one by
    /// one. Anything else (the database unreachable, a commit whose outcome is unknown) is not.
    pub fn concerns_data(&self) -> bool {
        match self {
            Self::Sqlx(sqlx::Error::Database(db)) => db
                .code()
                .is_some_and(|c| c.starts_with("22") || c.starts_with("23")),
            Self::UniqueViolation { .. } => true,
            Self::Sqlx(_) => false,
        }
    }

    /// The same failure for another caller of one batch: a connection failure stays one (the
    /// HTTP layer answers 503 for it), anything else keeps its description.
    pub fn replicate(&self) -> Self {
        match self {
            Self::UniqueViolation { constraint } => Self::UniqueViolation {
                constraint: constraint.clone(),
            },
            Self::Sqlx(e) if is_connection_error(e) => Self::Sqlx(sqlx::Error::Io(
                std::io::Error::new(std::io::ErrorKind::ConnectionAborted, e.to_string()),
            )),
            Self::Sqlx(e) => Self::Sqlx(sqlx::Error::Protocol(e.to_string())),
        }
    }
}

pub type DbResult<T> = Result<T, DbError>;

/// Keyset position for lists ordered by creation time, ties broken by id (tenants, API keys,
/// episodes, policies).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreationCursor {
    #[serde(deserialize_with = "storable_timestamp")]
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub id: uuid::Uuid,
}

fn storable_timestamp<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<chrono::DateTime<chrono::Utc>, D::Error> {
    let t = <chrono::DateTime<chrono::Utc> as serde::Deserialize>::deserialize(d)?;
    if !crate::domain::storable_time(&t) {
        return Err(serde::de::Error::custom("timestamp out of range"));
    }
    Ok(t)
}

#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    #[error(
        "DATABASE_URL logs in as '{role}', which bypasses row-level security (superuser, BYPASSRLS or table owner); use the app role cybernetic_app"
    )]
    Unsafe { role: String },
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
}

/// `Some(role)` when the connection's role bypasses row-level security: a superuser, a BYPASSRLS
/// role, or the owner (or a member of the owner) of any table in the schema.
async fn role_bypassing_rls(conn: &mut PgConnection) -> Result<Option<String>, sqlx::Error> {
    let (role, bypasses): (String, bool) = sqlx::query_as(
        "select current_user::text,
                r.rolsuper or r.rolbypassrls
                or exists (select from pg_class c join pg_namespace n on n.oid = c.relnamespace
                            where n.nspname = 'public' and pg_has_role(r.oid, c.relowner, 'MEMBER'))
           from pg_roles r where r.rolname = current_user",
    )
    .fetch_one(conn)
    .await?;
    Ok(bypasses.then_some(role))
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "MIGRATION_DATABASE_URL must log in as cybernetic_owner, a non-superuser role that owns the schema (it logs in as '{role}'); the migrations grant to and name these roles"
    )]
    WrongRole { role: String },
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Applies pending migrations as the owner role. Concurrent runs serialise on the migrator's lock.
pub async fn migrate(owner_url: &Secret) -> Result<(), MigrateError> {
    let options: PgConnectOptions = owner_url.expose().parse()?;
    let mut conn =
        PgConnection::connect_with(&options.application_name("cybernetic-migrate")).await?;
    // The migrations create definer functions and owner-only policies for the role running them:
    // that must be the dedicated owner, never a superuser.
    let (role, is_owner): (String, bool) = sqlx::query_as(
        "select current_user::text, current_user = 'cybernetic_owner' and not rolsuper
           from pg_roles where rolname = current_user",
    )
    .fetch_one(&mut conn)
    .await?;
    if !is_owner {
        return Err(MigrateError::WrongRole { role });
    }
    MIGRATOR.run(&mut conn).await?;
    Ok(conn.close().await?)
}

/// The connection pools. Cheap to clone.
#[derive(Clone)]
pub struct Db {
    primary: PgPool,
    replica: Option<Replica>,
    /// A few connections of its own for readiness probes and the key-revocation listener, so a
    /// saturated request pool neither fails readiness nor starves the listener.
    ops: PgPool,
    /// How to open one connection outside any pool (the start-up role check).
    direct: PgConnectOptions,
    /// Wakes the job pools after jobs committed outside a caller's transaction.
    waker: waker::JobWaker,
    /// Commits concurrent standalone enqueues together.
    enqueuer: enqueuer::Enqueuer,
}

#[derive(Clone)]
struct Replica {
    pool: PgPool,
    healthy: Arc<AtomicBool>,
}

impl Db {
    /// Builds the pools without connecting: the server starts (and reports not ready) while the
    /// database is down, and connects as soon as it is up.
    pub fn connect_lazy(url: &Secret, config: &DatabaseConfig) -> Result<Self, sqlx::Error> {
        let primary =
            pool_options(config, config.acquire_timeout).connect_lazy_with(connect_options(url)?);
        let replica = match &config.replica_url {
            None => None,
            Some(url) => Some(Replica {
                // A short acquire timeout: a dead replica must cost little before reads fall back.
                pool: pool_options(config, Duration::from_secs(1))
                    .connect_lazy_with(connect_options(url)?),
                healthy: Arc::new(AtomicBool::new(true)),
            }),
        };
        let direct = connect_options(url)?.application_name("cybernetic-ops");
        let ops = pool_options(config, Duration::from_secs(2))
            .max_connections(4)
            .connect_lazy_with(direct.clone());
        Ok(Self {
            waker: waker::JobWaker::new(primary.clone()),
            enqueuer: enqueuer::Enqueuer::new(primary.clone()),
            primary,
            replica,
            ops,
            direct,
        })
    }

    /// Wakes the job pools for `queue` once the jobs just committed can be claimed (see
    /// [`waker`]).
    pub fn wake_jobs(&self, queue: crate::domain::job::Queue) {
        self.waker.wake(queue);
    }

    /// Commits concurrent standalone enqueues together (see [`enqueuer`]).
    pub fn enqueuer(&self) -> &enqueuer::Enqueuer {
        &self.enqueuer
    }

    pub fn ops(&self) -> &PgPool {
        &self.ops
    }

    pub fn primary(&self) -> &PgPool {
        &self.primary
    }

    /// The pool for history and list reads: the replica while it answers, else the primary.
    pub fn reads(&self) -> &PgPool {
        match &self.replica {
            Some(r) if r.healthy.load(Ordering::Relaxed) => &r.pool,
            _ => &self.primary,
        }
    }

    /// Called when a read on [`Db::reads`] could not reach its server, so the next reads go to
    /// the primary until the replica answers a probe again.
    pub fn reads_failed(&self, pool: &PgPool) {
        if let Some(r) = &self.replica
            && std::ptr::eq(pool, &r.pool)
            && r.healthy.swap(false, Ordering::Relaxed)
        {
            tracing::warn!("read replica unreachable; reading from the primary");
        }
    }

    /// While the replica is marked down, probes it every few seconds and routes reads back to
    /// it once it answers. A healthy replica is not probed: failed reads mark it down.
    pub fn spawn_replica_probe(&self, shutdown: CancellationToken) {
        let Some(replica) = self.replica.clone() else {
            return;
        };
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if replica.healthy.load(Ordering::Relaxed) {
                    continue;
                }
                if ping(&replica.pool, Duration::from_secs(2)).await {
                    replica.healthy.store(true, Ordering::Relaxed);
                    tracing::info!("read replica reachable again; reading from it");
                }
            }
        });
    }

    /// Pool sizes for the `db_pool_connections` gauge.
    pub fn record_pool_metrics(&self) {
        record_pool("primary", &self.primary);
        if let Some(r) = &self.replica {
            record_pool("replica", &r.pool);
        }
    }

    /// Closes the pools, waiting at most `timeout` for connections still checked out (a request
    /// cancelled at the drain deadline may leave one waiting on the server).
    pub async fn close(&self, timeout: Duration) {
        let close_all = async {
            self.primary.close().await;
            self.ops.close().await;
            if let Some(r) = &self.replica {
                r.pool.close().await;
            }
        };
        if tokio::time::timeout(timeout, close_all).await.is_err() {
            tracing::warn!("database connections still busy at exit; leaving them to the server");
        }
    }

    /// Whether the server's role is one row-level security binds, on a connection of its own so
    /// the answer is exact (a pool retries refused connections until its timeout).
    pub async fn check_role(&self) -> Result<(), RoleError> {
        let mut conn = PgConnection::connect_with(&self.direct).await?;
        let verdict = role_bypassing_rls(&mut conn).await;
        let _ = conn.close().await;
        match verdict? {
            Some(role) => Err(RoleError::Unsafe { role }),
            None => Ok(()),
        }
    }

    /// Readiness: the database answers on the ops pool, whose connections have all passed the
    /// role check when they were opened.
    pub async fn answers(&self) -> bool {
        ping(&self.ops, Duration::from_secs(2)).await
    }
}

fn pool_options(config: &DatabaseConfig, acquire_timeout: Duration) -> PgPoolOptions {
    PgPoolOptions::new()
        // Refuse to use any connection whose role row-level security does not bind.
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                match role_bypassing_rls(conn).await? {
                    Some(role) => {
                        let refusal = RoleError::Unsafe { role };
                        tracing::error!(error = %refusal, "refusing database connection");
                        Err(sqlx::Error::Configuration(Box::new(refusal)))
                    }
                    None => Ok(()),
                }
            })
        })
        .max_connections(config.max_connections)
        .acquire_timeout(acquire_timeout)
        // A per-acquire ping doubles the round trips of short requests; broken connections are
        // detected on use and replaced instead.
        .test_before_acquire(false)
        .idle_timeout(Duration::from_secs(600))
        .max_lifetime(Duration::from_secs(1800))
}

fn connect_options(url: &Secret) -> Result<PgConnectOptions, sqlx::Error> {
    let options: PgConnectOptions = url.expose().parse()?;
    // No `options` startup parameter (such as statement_timeout): PgBouncer refuses it. The app
    // role carries its statement_timeout itself (docker/postgres/create-roles.sql).
    Ok(options.application_name("cybernetic"))
}

async fn ping(pool: &PgPool, timeout: Duration) -> bool {
    let probe = sqlx::query("select 1").execute(pool);
    matches!(tokio::time::timeout(timeout, probe).await, Ok(Ok(_)))
}

fn record_pool(name: &'static str, pool: &PgPool) {
    let idle = pool.num_idle() as f64;
    let size = f64::from(pool.size());
    metrics::gauge!("db_pool_connections", "pool" => name, "state" => "idle").set(idle);
    metrics::gauge!("db_pool_connections", "pool" => name, "state" => "in_use").set(size - idle);
    metrics::gauge!("db_pool_max_connections", "pool" => name)
        .set(f64::from(pool.options().get_max_connections()));
}

/// Whether an error means the server could not be reached or is going away (as opposed to a
/// query failing): the client should retry, and readiness reports it.
/// Runs `work` on a pooled connection, passing over connections that died while idle: after a
/// database restart or a network cut every idle connection fails once, and each failure discards
/// its connection, so within the pool's size a live one is reached. A connection that cannot be
/// had (the database is down) fails at once. Only for work that is safe to run again after its
/// connection failed (a BEGIN, a lookup).
pub(crate) async fn on_live_connection<T, F>(pool: &PgPool, work: F) -> Result<T, sqlx::Error>
where
    F: for<'c> Fn(&'c mut PgConnection) -> futures::future::BoxFuture<'c, Result<T, sqlx::Error>>,
{
    let attempts = pool.options().get_max_connections() + 1;
    let mut attempt = 1;
    loop {
        let mut conn = pool.acquire().await?;
        match work(&mut conn).await {
            Err(e) if attempt < attempts && is_dead_connection(&e) => attempt += 1,
            result => return result,
        }
    }
}

/// An error from a connection that was open but is gone (as opposed to failing to connect).
pub(crate) fn is_dead_connection(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) => true,
        sqlx::Error::Database(db) => matches!(db.code().as_deref(), Some("57P01" | "57P02")),
        _ => false,
    }
}

pub fn is_connection_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // Class 08: connection exceptions; 57P01-03: server shutting down or starting up;
            // 53300: too many connections.
            code.starts_with("08") || matches!(code.as_ref(), "57P01" | "57P02" | "57P03" | "53300")
        }),
        _ => false,
    }
}

pub fn describe_metrics() {
    metrics::describe_gauge!(
        "db_pool_connections",
        "Database pool connections by pool and state (idle, in_use)."
    );
    metrics::describe_gauge!(
        "db_pool_max_connections",
        "Configured maximum connections per database pool."
    );
}
