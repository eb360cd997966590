//! The one way into tenant data: a transaction with `app.tenant_id` set transaction-locally, so
//! row-level security confines every statement in it to that tenant and the setting can never
//! leak to the next user of a pooled connection (also safe behind PgBouncer in transaction mode).

use sqlx::{AssertSqlSafe, PgPool, Postgres, Transaction};

use crate::domain::tenant::TenantId;

use super::{Db, DbResult, is_connection_error};

pub type Tx = Transaction<'static, Postgres>;

/// Begins a transaction scoped to `tenant`.
#[tracing::instrument(skip_all, fields(tenant_id = %tenant))]
pub async fn begin(pool: &PgPool, tenant: TenantId) -> DbResult<Tx> {
    // BEGIN and set_config travel as one simple query: one round trip instead of two. Inlining is
    // safe because a hyphenated UUID is only hex digits and dashes.
    let sql = format!(
        "BEGIN; SELECT set_config('app.tenant_id', '{}', true)",
        tenant.as_uuid().hyphenated()
    );
    begin_fresh(pool, sql).await
}

/// Ends a transaction that only read. Dropping it makes sqlx queue a ROLLBACK that travels with
/// the check the pool runs on every returned connection, so a read costs one round trip less than
/// with COMMIT; for a transaction that wrote nothing the two are the same.
pub fn end_read(tx: Tx) {
    drop(tx);
}

/// Begins a tenant transaction for history and list reads, on the read replica when one is
/// configured and reachable, else on the primary.
pub async fn begin_read(db: &Db, tenant: TenantId) -> DbResult<Tx> {
    on_replica_or_primary(db, |pool| begin(pool, tenant)).await
}

/// [`begin_platform`] for list reads, on the replica when it answers.
pub async fn begin_platform_read(db: &Db) -> DbResult<Tx> {
    on_replica_or_primary(db, begin_platform).await
}

async fn on_replica_or_primary<'p, F, Fut>(db: &'p Db, begin_on: F) -> DbResult<Tx>
where
    F: Fn(&'p PgPool) -> Fut,
    Fut: Future<Output = DbResult<Tx>>,
{
    let pool = db.reads();
    match begin_on(pool).await {
        Err(super::DbError::Sqlx(e))
            if is_connection_error(&e) && !std::ptr::eq(pool, db.primary()) =>
        {
            db.reads_failed(pool);
            begin_on(db.primary()).await
        }
        other => other,
    }
}

/// Begins a transaction in the platform scope: the tenant registry, for the platform admin API
/// and operator commands. Tenant-scoped tables stay invisible in it.
#[tracing::instrument(skip_all)]
pub async fn begin_platform(pool: &PgPool) -> DbResult<Tx> {
    begin_fresh(
        pool,
        "BEGIN; SELECT set_config('app.scope', 'platform', true)".to_owned(),
    )
    .await
}

/// Begins with `sql`, passing over pooled connections that died while idle (after a database
/// restart or a network cut, every idle connection fails once). Nothing has run on a connection
/// that fails at BEGIN, so trying the next one is safe; each failure discards the dead
/// connection, so within the pool's size a fresh one is reached.
async fn begin_fresh(pool: &PgPool, sql: String) -> DbResult<Tx> {
    let attempts = pool.options().get_max_connections() + 1;
    let mut attempt = 1;
    loop {
        match pool.begin_with(AssertSqlSafe(sql.clone())).await {
            Err(e) if attempt < attempts && super::is_dead_connection(&e) => attempt += 1,
            result => return Ok(result?),
        }
    }
}
