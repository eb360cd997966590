//! S5 policies: admins write them, every role reads them. Rules are validated on the way in
//! (shape in docs/api.md).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::PgConnection;

use crate::db::CreationCursor;
use crate::db::policies::{self, Policy, PolicyInput};
use crate::db::{events, tenant as scope};
use crate::domain::event_type::EventType;
use crate::domain::policy::Rules;
use crate::domain::tenant::{Name, TenantId};
use crate::http::error::ApiError;
use crate::http::extract::{Admin, AppJson, AppPath, AppQuery, TenantAuth, Viewer};
use crate::jobs::policy_evaluation::PolicyEvaluation;
use crate::jobs::{self, Enqueue, Wake};
use crate::state::AppState;

use super::{Page, PageQuery, event_data, parse_uuid};

/// A new policy: `active` may be left out (it starts active).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewPolicy {
    name: String,
    rules: Value,
    #[serde(default = "active_by_default")]
    active: bool,
}

fn active_by_default() -> bool {
    true
}

/// A full replacement: every field is required, so leaving `active` out cannot silently
/// re-enable a disabled policy.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplacePolicy {
    name: String,
    rules: Value,
    active: bool,
}

fn parse(name: &str, rules: Value) -> Result<(Name, Rules), ApiError> {
    let name = Name::parse("name", name).map_err(ApiError::validation)?;
    let rules = Rules::parse(rules).map_err(ApiError::validation)?;
    Ok((name, rules))
}

/// A changed policy is checked against the latest states at once (and a deleted one's open
/// violations resolved), not only when the next state is recorded. The caller wakes the queue
/// after its commit.
async fn reevaluate(
    tx: &mut PgConnection,
    tenant: TenantId,
    policy_id: uuid::Uuid,
) -> Result<Wake, ApiError> {
    let evaluation = PolicyEvaluation {
        policy_id: Some(policy_id),
        ..PolicyEvaluation::default()
    };
    Ok(jobs::enqueue(tx, tenant, &evaluation, Enqueue::default())
        .await?
        .wake)
}

#[tracing::instrument(skip_all)]
pub async fn create(
    auth: TenantAuth<Admin>,
    State(state): State<AppState>,
    AppJson(body): AppJson<NewPolicy>,
) -> Result<(StatusCode, Json<Policy>), ApiError> {
    let (name, rules) = parse(&body.name, body.rules)?;
    let input = PolicyInput {
        name: &name,
        rules: &rules,
        active: body.active,
    };
    let mut tx = scope::begin(state.db.primary(), auth.tenant_id).await?;
    let policy = policies::create(&mut tx, auth.tenant_id, &input).await?;
    let wake = reevaluate(&mut tx, auth.tenant_id, policy.id).await?;
    let event_type = EventType::platform(EventType::POLICY_CREATED);
    let event = events::append(&mut tx, auth.tenant_id, &event_type, &event_data(&policy)).await?;
    tx.commit().await?;
    wake.after_commit(&state.db);
    state.events.committed(std::slice::from_ref(&event)).await;
    Ok((StatusCode::CREATED, Json(policy)))
}

#[tracing::instrument(skip_all)]
pub async fn list(
    auth: TenantAuth<Viewer>,
    State(state): State<AppState>,
    AppQuery(query): AppQuery<PageQuery>,
) -> Result<Json<Page<Policy>>, ApiError> {
    let (limit, cursor) = query.parse::<CreationCursor>()?;
    let mut tx = scope::begin_read(&state.db, auth.tenant_id).await?;
    let rows = policies::list(&mut tx, auth.tenant_id, cursor.as_ref(), limit.fetch()).await?;
    scope::end_read(tx);
    Ok(Json(Page::from_rows(rows, limit, |p| CreationCursor {
        created_at: p.created_at,
        id: p.id,
    })))
}

#[tracing::instrument(skip_all)]
pub async fn get(
    auth: TenantAuth<Viewer>,
    State(state): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<Json<Policy>, ApiError> {
    let id = parse_uuid("id", &id)?;
    let mut tx = scope::begin_read(&state.db, auth.tenant_id).await?;
    let policy = policies::get(&mut tx, auth.tenant_id, id).await?;
    scope::end_read(tx);
    policy
        .map(Json)
        .ok_or_else(|| ApiError::not_found("policy"))
}

/// Replaces name, rules and active flag; the version goes up by one.
#[tracing::instrument(skip_all)]
pub async fn replace(
    auth: TenantAuth<Admin>,
    State(state): State<AppState>,
    AppPath(id): AppPath<String>,
    AppJson(body): AppJson<ReplacePolicy>,
) -> Result<Json<Policy>, ApiError> {
    let id = parse_uuid("id", &id)?;
    let (name, rules) = parse(&body.name, body.rules)?;
    let input = PolicyInput {
        name: &name,
        rules: &rules,
        active: body.active,
    };
    let mut tx = scope::begin(state.db.primary(), auth.tenant_id).await?;
    let policy = policies::replace(&mut tx, auth.tenant_id, id, &input)
        .await?
        .ok_or_else(|| ApiError::not_found("policy"))?;
    let wake = reevaluate(&mut tx, auth.tenant_id, policy.id).await?;
    let event_type = EventType::platform(EventType::POLICY_UPDATED);
    let event = events::append(&mut tx, auth.tenant_id, &event_type, &event_data(&policy)).await?;
    tx.commit().await?;
    wake.after_commit(&state.db);
    state.events.committed(std::slice::from_ref(&event)).await;
    Ok(Json(policy))
}

#[tracing::instrument(skip_all)]
pub async fn delete(
    auth: TenantAuth<Admin>,
    State(state): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_uuid("id", &id)?;
    let mut tx = scope::begin(state.db.primary(), auth.tenant_id).await?;
    let policy = policies::delete(&mut tx, auth.tenant_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("policy"))?;
    let wake = reevaluate(&mut tx, auth.tenant_id, policy.id).await?;
    let event_type = EventType::platform(EventType::POLICY_DELETED);
    let data = json!({"id": policy.id, "name": policy.name, "version": policy.version});
    let event = events::append(&mut tx, auth.tenant_id, &event_type, &data).await?;
    tx.commit().await?;
    wake.after_commit(&state.db);
    state.events.committed(std::slice::from_ref(&event)).await;
    Ok(StatusCode::NO_CONTENT)
}
