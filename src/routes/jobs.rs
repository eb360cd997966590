//! A tenant's background jobs: read them (the dead-letter view is `?state=dead`), retry a dead or
//! cancelled one, cancel one that has not finished. Each change is also an event in the tenant's
//! log, so a stream following `job.*` sees it.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use uuid::Uuid;

use crate::db::jobs::{self, JobView};
use crate::db::{CreationCursor, DbResult, events, tenant as scope};
use crate::domain::event_type::EventType;
use crate::domain::job::{JobState, parse_kind};
use crate::http::error::ApiError;
use crate::http::extract::{AppPath, AppQuery, Operator, TenantAuth, Viewer};
use crate::state::AppState;

use super::{Page, PageQuery, parse_uuid};

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    state: Option<String>,
    kind: Option<String>,
    #[serde(flatten)]
    page: PageQuery,
}

#[tracing::instrument(skip_all)]
pub async fn list(
    auth: TenantAuth<Viewer>,
    State(state): State<AppState>,
    AppQuery(query): AppQuery<ListQuery>,
) -> Result<Json<Page<JobView>>, ApiError> {
    let (limit, cursor) = query.page.parse::<CreationCursor>()?;
    let job_state = query
        .state
        .as_deref()
        .map(JobState::parse)
        .transpose()
        .map_err(ApiError::query)?;
    let kind = query
        .kind
        .as_deref()
        .map(parse_kind)
        .transpose()
        .map_err(ApiError::query)?;
    let mut tx = scope::begin_read(&state.db, auth.tenant_id).await?;
    let rows = jobs::list(
        &mut tx,
        auth.tenant_id,
        job_state,
        kind,
        cursor.as_ref(),
        limit.fetch(),
    )
    .await?;
    scope::end_read(tx);
    Ok(Json(Page::from_rows(rows, limit, |j| CreationCursor {
        created_at: j.created_at,
        id: j.id,
    })))
}

#[tracing::instrument(skip_all)]
pub async fn get(
    auth: TenantAuth<Viewer>,
    State(state): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<Json<JobView>, ApiError> {
    let id = parse_uuid("id", &id)?;
    // From the primary: a client following a job it just acted on must not read an older copy.
    let mut tx = scope::begin(state.db.primary(), auth.tenant_id).await?;
    let job = jobs::get(&mut tx, auth.tenant_id, id).await?;
    scope::end_read(tx);
    job.map(Json).ok_or_else(|| ApiError::not_found("job"))
}

/// Cancels a job that has not finished (409 for one that has). A running job is stopped by its
/// worker at the worker's next heartbeat; its outcome is then discarded.
#[tracing::instrument(skip_all)]
pub async fn cancel(
    auth: TenantAuth<Operator>,
    State(state): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<Json<JobView>, ApiError> {
    let id = parse_uuid("id", &id)?;
    change(
        &state,
        &auth,
        id,
        EventType::JOB_CANCELLED,
        "cancelled",
        |tx, t, id| Box::pin(jobs::cancel(tx, t, id)),
    )
    .await
}

/// Makes a dead or cancelled job available again with a fresh set of attempts (409 otherwise).
#[tracing::instrument(skip_all)]
pub async fn retry(
    auth: TenantAuth<Operator>,
    State(state): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<Json<JobView>, ApiError> {
    let id = parse_uuid("id", &id)?;
    change(
        &state,
        &auth,
        id,
        EventType::JOB_RETRYING,
        "retried",
        |tx, t, id| Box::pin(jobs::retry(tx, t, id)),
    )
    .await
}

type Transition =
    for<'c> fn(
        &'c mut sqlx::PgConnection,
        crate::domain::tenant::TenantId,
        Uuid,
    ) -> futures::future::BoxFuture<'c, DbResult<Option<Result<JobView, String>>>>;

/// Applies a state change and appends its event in one transaction.
async fn change<R>(
    state: &AppState,
    auth: &TenantAuth<R>,
    id: Uuid,
    event_type: &'static str,
    verb: &str,
    apply: Transition,
) -> Result<Json<JobView>, ApiError> {
    let mut tx = scope::begin(state.db.primary(), auth.tenant_id).await?;
    let (job, event) = apply_change(&mut tx, auth.tenant_id, id, event_type, verb, apply).await?;
    tx.commit().await.map_err(crate::db::DbError::from)?;
    state.events.committed(std::slice::from_ref(&event)).await;
    Ok(Json(job))
}

/// Makes a dead or cancelled job available again, with its `job.retrying` event, in the caller's
/// tenant transaction: what `POST /v1/jobs/{id}/retry` and the bot's `/retry` do.
pub async fn retry_in(
    tx: &mut sqlx::PgConnection,
    tenant: crate::domain::tenant::TenantId,
    id: Uuid,
) -> Result<(JobView, crate::db::events::Event), ApiError> {
    apply_change(
        tx,
        tenant,
        id,
        EventType::JOB_RETRYING,
        "retried",
        |tx, t, id| Box::pin(jobs::retry(tx, t, id)),
    )
    .await
}

async fn apply_change(
    tx: &mut sqlx::PgConnection,
    tenant: crate::domain::tenant::TenantId,
    id: Uuid,
    event_type: &'static str,
    verb: &str,
    apply: Transition,
) -> Result<(JobView, crate::db::events::Event), ApiError> {
    let job = match apply(&mut *tx, tenant, id).await? {
        None => return Err(ApiError::not_found("job")),
        Some(Err(current)) => {
            return Err(ApiError::conflict(format!(
                "a job that is {current} cannot be {verb}"
            )));
        }
        Some(Ok(job)) => job,
    };
    let data = serde_json::json!({
        "job_id": job.id,
        "kind": job.kind,
        "queue": job.queue,
        "state": job.state,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
    });
    let event = events::append(&mut *tx, tenant, &EventType::platform(event_type), &data).await?;
    Ok((job, event))
}
