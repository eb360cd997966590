//! Telegram (migration 000008): link codes, linked chats, subscriptions, the per-chat rate limit,
//! and the record of messages sent. The two lookups made before a tenant is known (a chat's
//! tenant, a code's tenant) go through security-definer functions; the rest runs in the tenant's
//! transaction.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::{CreationCursor, DbResult};
use crate::domain::job::Queue;
use crate::domain::tenant::TenantId;

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Chat {
    pub id: Uuid,
    pub chat_id: i64,
    pub chat_type: String,
    pub title: Option<String>,
    /// The Telegram user who linked the chat.
    pub linked_by: Option<i64>,
    pub active: bool,
    pub deactivated_reason: Option<String>,
    pub muted_until: Option<DateTime<Utc>>,
    /// The patterns the chat follows.
    pub subscriptions: Vec<String>,
    #[serde(rename = "linked_at")]
    pub created_at: DateTime<Utc>,
}

const CHAT_COLUMNS: &str = "c.id, c.chat_id, c.chat_type, c.title, c.linked_by, c.active, \
     c.deactivated_reason, c.muted_until, c.created_at, \
     array(select s.pattern from telegram_subscriptions s \
            where s.tenant_id = c.tenant_id and s.chat_id = c.chat_id order by s.pattern) \
       as subscriptions";

/// The tenant a chat is linked to, and whether the chat is active.
#[tracing::instrument(skip_all)]
pub async fn chat_tenant(pool: &PgPool, chat_id: i64) -> DbResult<Option<(TenantId, bool)>> {
    let row: Option<(Uuid, bool)> = sqlx::query_as("select * from telegram_chat_tenant($1)")
        .bind(chat_id)
        .fetch_optional(pool)
        .await?;
    Ok(row.map(|(t, active)| (TenantId::from_uuid(t), active)))
}

/// The tenant a link code (by its hash) belongs to.
#[tracing::instrument(skip_all)]
pub async fn link_code_tenant(pool: &PgPool, code_hash: &str) -> DbResult<Option<TenantId>> {
    let tenant: Option<Uuid> = sqlx::query_scalar("select telegram_link_code_tenant($1)")
        .bind(code_hash)
        .fetch_one(pool)
        .await?;
    Ok(tenant.map(TenantId::from_uuid))
}

#[tracing::instrument(skip_all)]
pub async fn create_link_code(
    conn: &mut PgConnection,
    tenant: TenantId,
    code_hash: &str,
    created_by: Option<Uuid>,
    expires_at: DateTime<Utc>,
) -> DbResult<Uuid> {
    let id = Uuid::now_v7();
    sqlx::query(
        "insert into telegram_link_codes (id, tenant_id, code_hash, created_by, expires_at)
         values ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(tenant.as_uuid())
    .bind(code_hash)
    .bind(created_by)
    .bind(expires_at)
    .execute(conn)
    .await?;
    Ok(id)
}

/// What using a link code found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redeemed {
    /// The code is now used, by this chat.
    Used,
    Expired,
    AlreadyUsed,
    Unknown,
}

/// Marks the code used by `chat_id` if it is still good (the row is locked until the end of the
/// transaction, so a code is used once however many chats race for it).
#[tracing::instrument(skip_all)]
pub async fn redeem_link_code(
    conn: &mut PgConnection,
    tenant: TenantId,
    code_hash: &str,
    chat_id: i64,
) -> DbResult<Redeemed> {
    let row: Option<(Option<DateTime<Utc>>, bool)> = sqlx::query_as(
        "select used_at, expires_at <= now() from telegram_link_codes
          where tenant_id = $1 and code_hash = $2 for update",
    )
    .bind(tenant.as_uuid())
    .bind(code_hash)
    .fetch_optional(&mut *conn)
    .await?;
    let outcome = match row {
        None => Redeemed::Unknown,
        Some((Some(_), _)) => Redeemed::AlreadyUsed,
        Some((None, true)) => Redeemed::Expired,
        Some((None, false)) => Redeemed::Used,
    };
    if outcome == Redeemed::Used {
        sqlx::query(
            "update telegram_link_codes set used_at = now(), used_by_chat = $3
              where tenant_id = $1 and code_hash = $2",
        )
        .bind(tenant.as_uuid())
        .bind(code_hash)
        .bind(chat_id)
        .execute(conn)
        .await?;
    }
    Ok(outcome)
}

pub struct NewChat<'a> {
    pub chat_id: i64,
    pub chat_type: &'a str,
    pub title: Option<&'a str>,
    pub linked_by: Option<i64>,
}

/// Links the chat to the tenant; `None` when it is linked already (to this tenant or, invisible
/// here, another).
#[tracing::instrument(skip_all)]
pub async fn insert_chat(
    conn: &mut PgConnection,
    tenant: TenantId,
    chat: &NewChat<'_>,
) -> DbResult<Option<Chat>> {
    let inserted: Option<(i64,)> = sqlx::query_as(
        "insert into telegram_chats (id, tenant_id, chat_id, chat_type, title, linked_by)
         values ($1, $2, $3, $4, $5, $6)
         on conflict (chat_id) do nothing
         returning chat_id",
    )
    .bind(Uuid::now_v7())
    .bind(tenant.as_uuid())
    .bind(chat.chat_id)
    .bind(chat.chat_type)
    .bind(chat.title)
    .bind(chat.linked_by)
    .fetch_optional(&mut *conn)
    .await?;
    match inserted {
        Some(_) => get_chat(conn, tenant, chat.chat_id).await,
        None => Ok(None),
    }
}

#[tracing::instrument(skip_all)]
pub async fn get_chat(
    conn: &mut PgConnection,
    tenant: TenantId,
    chat_id: i64,
) -> DbResult<Option<Chat>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {CHAT_COLUMNS} from telegram_chats c where c.tenant_id = $1 and c.chat_id = $2"
    )))
    .bind(tenant.as_uuid())
    .bind(chat_id)
    .fetch_optional(conn)
    .await?)
}

#[tracing::instrument(skip_all)]
pub async fn list_chats(
    conn: &mut PgConnection,
    tenant: TenantId,
    after: Option<&CreationCursor>,
    fetch: i64,
) -> DbResult<Vec<Chat>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {CHAT_COLUMNS} from telegram_chats c
          where c.tenant_id = $1
            and ($2::timestamptz is null or (c.created_at, c.id) < ($2, $3))
          order by c.created_at desc, c.id desc
          limit $4"
    )))
    .bind(tenant.as_uuid())
    .bind(after.map(|c| c.created_at))
    .bind(after.map(|c| c.id))
    .bind(fetch)
    .fetch_all(conn)
    .await?)
}

/// Unlinks the chat (its subscriptions go with it); returns it as it was.
#[tracing::instrument(skip_all)]
pub async fn delete_chat(
    conn: &mut PgConnection,
    tenant: TenantId,
    chat_id: i64,
) -> DbResult<Option<Chat>> {
    let chat = get_chat(&mut *conn, tenant, chat_id).await?;
    if chat.is_some() {
        sqlx::query("delete from telegram_chats where tenant_id = $1 and chat_id = $2")
            .bind(tenant.as_uuid())
            .bind(chat_id)
            .execute(conn)
            .await?;
    }
    Ok(chat)
}

/// Alerts to the chat are dropped until `until` (`None`: from now on, delivered again).
#[tracing::instrument(skip_all)]
pub async fn set_muted(
    conn: &mut PgConnection,
    tenant: TenantId,
    chat_id: i64,
    until: Option<DateTime<Utc>>,
) -> DbResult<bool> {
    let done = sqlx::query(
        "update telegram_chats set muted_until = $3 where tenant_id = $1 and chat_id = $2",
    )
    .bind(tenant.as_uuid())
    .bind(chat_id)
    .bind(until)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Marks the chat inactive (Telegram refused to deliver to it); `false` when it already was, or
/// is not linked.
#[tracing::instrument(skip_all)]
pub async fn deactivate(
    conn: &mut PgConnection,
    tenant: TenantId,
    chat_id: i64,
    reason: &str,
) -> DbResult<bool> {
    let done = sqlx::query(
        "update telegram_chats set active = false, deactivated_reason = $3
          where tenant_id = $1 and chat_id = $2 and active",
    )
    .bind(tenant.as_uuid())
    .bind(chat_id)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Marks an inactive chat active again; `false` when it was active already.
#[tracing::instrument(skip_all)]
pub async fn reactivate(conn: &mut PgConnection, tenant: TenantId, chat_id: i64) -> DbResult<bool> {
    let done = sqlx::query(
        "update telegram_chats set active = true, deactivated_reason = null
          where tenant_id = $1 and chat_id = $2 and not active",
    )
    .bind(tenant.as_uuid())
    .bind(chat_id)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Adds the pattern to the chat's subscriptions; `false` when it was there already.
#[tracing::instrument(skip_all)]
pub async fn subscribe(
    conn: &mut PgConnection,
    tenant: TenantId,
    chat_id: i64,
    pattern: &str,
) -> DbResult<bool> {
    let done = sqlx::query(
        "insert into telegram_subscriptions (tenant_id, chat_id, pattern) values ($1, $2, $3)
         on conflict do nothing",
    )
    .bind(tenant.as_uuid())
    .bind(chat_id)
    .bind(pattern)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

#[tracing::instrument(skip_all)]
pub async fn unsubscribe(
    conn: &mut PgConnection,
    tenant: TenantId,
    chat_id: i64,
    pattern: &str,
) -> DbResult<bool> {
    let done = sqlx::query(
        "delete from telegram_subscriptions where tenant_id = $1 and chat_id = $2 and pattern = $3",
    )
    .bind(tenant.as_uuid())
    .bind(chat_id)
    .bind(pattern)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The per-chat command limit's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowance {
    Allowed,
    /// Over the limit for the first time since the last allowed command: send one notice.
    Throttled,
    /// Still over the limit: say nothing.
    Silent,
}

#[tracing::instrument(skip_all)]
pub async fn take_token(
    pool: &PgPool,
    chat_id: i64,
    interval: std::time::Duration,
    burst: u32,
) -> DbResult<Allowance> {
    let verdict: String = sqlx::query_scalar("select telegram_take_token($1, $2, $3)")
        .bind(chat_id)
        .bind(interval)
        .bind(i32::try_from(burst).unwrap_or(i32::MAX))
        .fetch_one(pool)
        .await?;
    Ok(match verdict.as_str() {
        "allowed" => Allowance::Allowed,
        "throttled" => Allowance::Throttled,
        _ => Allowance::Silent,
    })
}

/// Forgets the limit state of up to `batch` chats whose allowance is full again (an absent row
/// means the same); returns how many.
#[tracing::instrument(skip_all)]
pub async fn prune_limits(pool: &PgPool, batch: i32) -> DbResult<u64> {
    let done = sqlx::query(
        "delete from telegram_chat_limits
          where chat_id in (select chat_id from telegram_chat_limits
                             where tat < now() - interval '1 minute'
                             limit $1)",
    )
    .bind(batch)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Enqueues a platform job (no tenant) of a kind that needs one; `false` when the key was used.
pub async fn enqueue_platform(
    db: &super::Db,
    kind: &str,
    queue: Queue,
    args: &Value,
    max_attempts: i32,
    key: &str,
) -> DbResult<(Option<Uuid>, bool)> {
    let done = enqueue_platform_batch(
        db,
        kind,
        queue,
        max_attempts,
        &[(args.clone(), key.to_owned())],
    )
    .await?;
    Ok(done.into_iter().next().unwrap_or((None, false)))
}

/// Enqueues platform jobs (`args`, key) of one kind in one statement; returns for each, in order,
/// its job's id and whether it was created here. A key given twice is created once: the later
/// ones answer `false`.
#[tracing::instrument(skip_all, fields(jobs = jobs.len()))]
pub async fn enqueue_platform_batch(
    db: &super::Db,
    kind: &str,
    queue: Queue,
    max_attempts: i32,
    jobs: &[(Value, String)],
) -> DbResult<Vec<(Option<Uuid>, bool)>> {
    let ids: Vec<Uuid> = jobs.iter().map(|_| Uuid::now_v7()).collect();
    let args: Vec<&Value> = jobs.iter().map(|(a, _)| a).collect();
    let keys: Vec<&str> = jobs.iter().map(|(_, k)| k.as_str()).collect();
    let rows: Vec<(String, Option<Uuid>, bool)> =
        sqlx::query_as("select * from enqueue_platform_jobs($1, $2, $3, $4, $5, $6)")
            .bind(&ids)
            .bind(kind)
            .bind(queue.as_str())
            .bind(&args)
            .bind(max_attempts)
            .bind(&keys)
            .fetch_all(db.primary())
            .await?;
    if rows.iter().any(|(_, _, created)| *created) {
        // After the commit (see enqueue_platform_jobs and the waker).
        db.wake_jobs(queue);
    }
    let mut found: std::collections::HashMap<String, (Option<Uuid>, bool)> = rows
        .into_iter()
        .map(|(k, id, created)| (k, (id, created)))
        .collect();
    Ok(keys
        .iter()
        .map(|k| {
            let (id, created) = found.get(*k).copied().unwrap_or((None, false));
            // Only the first of repeated keys counts as created.
            if created {
                found.insert((*k).to_owned(), (id, false));
            }
            (id, created)
        })
        .collect())
}

/// A message the platform sends to a chat, as the tenant sees it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Notification {
    pub id: Uuid,
    pub channel: String,
    pub chat_id: i64,
    /// `reply` (to a command) or `alert` (a subscribed event).
    pub purpose: String,
    pub event_position: Option<i64>,
    pub event_type: Option<String>,
    pub job_id: Option<Uuid>,
    /// `pending`, `delivered` or `failed`.
    pub status: String,
    pub attempts: i32,
    /// Telegram's ids of the messages delivered (a long text goes in several).
    pub message_ids: Vec<i64>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
}

const NOTIFICATION_COLUMNS: &str = "id, channel, chat_id, purpose, event_position, event_type, \
     job_id, status, attempts, message_ids, last_error, created_at, delivered_at";

#[tracing::instrument(skip_all)]
pub async fn insert_notification(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    chat_id: i64,
    purpose: &str,
    job_id: Uuid,
) -> DbResult<()> {
    sqlx::query(
        "insert into notifications (id, tenant_id, channel, chat_id, purpose, job_id)
         values ($1, $2, 'telegram', $3, $4, $5)",
    )
    .bind(id)
    .bind(tenant.as_uuid())
    .bind(chat_id)
    .bind(purpose)
    .bind(job_id)
    .execute(conn)
    .await?;
    Ok(())
}

#[tracing::instrument(skip_all)]
pub async fn get_notification(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> DbResult<Option<Notification>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {NOTIFICATION_COLUMNS} from notifications where tenant_id = $1 and id = $2"
    )))
    .bind(tenant.as_uuid())
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// One more part of the message delivered.
#[tracing::instrument(skip_all)]
pub async fn record_part(
    pool: &PgPool,
    tenant: TenantId,
    id: Uuid,
    message_id: i64,
) -> DbResult<()> {
    let mut tx = super::tenant::begin(pool, tenant).await?;
    sqlx::query(
        "update notifications set message_ids = message_ids || $3
          where tenant_id = $1 and id = $2",
    )
    .bind(tenant.as_uuid())
    .bind(id)
    .bind(message_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Records an attempt's outcome: `delivered`, `failed` (for good), or still `pending` with the
/// error of the attempt that will be retried.
#[tracing::instrument(skip_all)]
pub async fn record_attempt(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    status: &str,
    error: Option<&str>,
) -> DbResult<()> {
    sqlx::query(
        "update notifications
            set status = $3, last_error = $4, attempts = attempts + 1,
                delivered_at = case when $3 = 'delivered' then now() end
          where tenant_id = $1 and id = $2",
    )
    .bind(tenant.as_uuid())
    .bind(id)
    .bind(status)
    .bind(error)
    .execute(conn)
    .await?;
    Ok(())
}

/// Filters of `GET /v1/notifications`.
#[derive(Debug, Default)]
pub struct NotificationFilter {
    pub chat_id: Option<i64>,
    pub status: Option<String>,
    pub purpose: Option<String>,
}

#[tracing::instrument(skip_all)]
pub async fn list_notifications(
    conn: &mut PgConnection,
    tenant: TenantId,
    filter: &NotificationFilter,
    after: Option<&CreationCursor>,
    fetch: i64,
) -> DbResult<Vec<Notification>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {NOTIFICATION_COLUMNS} from notifications
          where tenant_id = $1
            and ($2::bigint is null or chat_id = $2)
            and ($3::text is null or status = $3)
            and ($4::text is null or purpose = $4)
            and ($5::timestamptz is null or (created_at, id) < ($5, $6))
          order by created_at desc, id desc
          limit $7"
    )))
    .bind(tenant.as_uuid())
    .bind(filter.chat_id)
    .bind(filter.status.as_deref())
    .bind(filter.purpose.as_deref())
    .bind(after.map(|c| c.created_at))
    .bind(after.map(|c| c.id))
    .bind(fetch)
    .fetch_all(conn)
    .await?)
}

/// An event of the tenant's log by its position (what an alert shows).
#[tracing::instrument(skip_all)]
pub async fn event_at(
    conn: &mut PgConnection,
    tenant: TenantId,
    position: i64,
) -> DbResult<Option<super::events::Event>> {
    Ok(sqlx::query_as(
        "select position, type, tenant_id, occurred_at, data from events
          where tenant_id = $1 and position = $2",
    )
    .bind(tenant.as_uuid())
    .bind(position)
    .fetch_optional(conn)
    .await?)
}
