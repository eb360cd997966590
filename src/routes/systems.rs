//! The state of the five VSM systems: record a new version, read the latest, page the history.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::db::system_states::{self, HistoryCursor, SystemState, Window};
use crate::db::{events, tenant as scope};
use crate::domain::ParseError;
use crate::domain::event_type::EventType;
use crate::domain::system::SystemId;
use crate::http::error::ApiError;
use crate::http::extract::{AppJson, AppPath, AppQuery, Operator, TenantAuth, Viewer};
use crate::jobs::policy_evaluation::PolicyEvaluation;
use crate::jobs::{self, Enqueue};
use crate::state::AppState;

use super::{Page, PageQuery, event_data};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordState {
    state: serde_json::Map<String, Value>,
}

/// One entry of `GET /v1/systems`: a system with no state yet has nulls.
#[derive(Debug, Serialize)]
pub struct Latest {
    system: i16,
    version: Option<i64>,
    state: Option<Value>,
    recorded_at: Option<DateTime<Utc>>,
}

fn system_param(raw: &str) -> Result<SystemId, ApiError> {
    SystemId::parse(raw).map_err(ApiError::path)
}

#[tracing::instrument(skip_all)]
pub async fn record(
    auth: TenantAuth<Operator>,
    State(state): State<AppState>,
    AppPath(system): AppPath<String>,
    AppJson(body): AppJson<RecordState>,
) -> Result<(StatusCode, Json<SystemState>), ApiError> {
    let system = system_param(&system)?;
    let body_state = Value::Object(body.state);
    crate::domain::reject_nul("state", &body_state).map_err(ApiError::validation)?;
    let mut tx = scope::begin(state.db.primary(), auth.tenant_id).await?;
    let recorded = system_states::record(&mut tx, auth.tenant_id, system, &body_state).await?;
    let evaluation = PolicyEvaluation {
        system: Some(recorded.system),
        version: Some(recorded.version),
        ..PolicyEvaluation::default()
    };
    let wake = jobs::enqueue(&mut tx, auth.tenant_id, &evaluation, Enqueue::default())
        .await?
        .wake;
    let event_type = EventType::platform(EventType::SYSTEM_STATE);
    let event =
        events::append(&mut tx, auth.tenant_id, &event_type, &event_data(&recorded)).await?;
    tx.commit().await?;
    wake.after_commit(&state.db);
    state.events.committed(std::slice::from_ref(&event)).await;
    Ok((StatusCode::CREATED, Json(recorded)))
}

#[tracing::instrument(skip_all)]
pub async fn latest_all(
    auth: TenantAuth<Viewer>,
    State(state): State<AppState>,
) -> Result<Json<Page<Latest>>, ApiError> {
    let mut tx = scope::begin_read(&state.db, auth.tenant_id).await?;
    let rows = system_states::latest_all(&mut tx, auth.tenant_id).await?;
    scope::end_read(tx);
    let items = SystemId::ALL
        .iter()
        .map(|id| match rows.iter().find(|r| r.system == id.number()) {
            Some(r) => Latest {
                system: r.system,
                version: Some(r.version),
                state: Some(r.state.clone()),
                recorded_at: Some(r.recorded_at),
            },
            None => Latest {
                system: id.number(),
                version: None,
                state: None,
                recorded_at: None,
            },
        })
        .collect();
    Ok(Json(Page {
        items,
        next_cursor: None,
    }))
}

#[tracing::instrument(skip_all)]
pub async fn latest(
    auth: TenantAuth<Viewer>,
    State(state): State<AppState>,
    AppPath(system): AppPath<String>,
) -> Result<Json<SystemState>, ApiError> {
    let system = system_param(&system)?;
    let mut tx = scope::begin_read(&state.db, auth.tenant_id).await?;
    let latest = system_states::latest(&mut tx, auth.tenant_id, system).await?;
    scope::end_read(tx);
    latest
        .map(Json)
        .ok_or_else(|| ApiError::not_found(&format!("state of system {}", system.number())))
}

#[derive(Debug, Deserialize)]
pub struct HistoryQuery {
    since: Option<String>,
    until: Option<String>,
    #[serde(flatten)]
    page: PageQuery,
}

fn timestamp(field: &'static str, raw: Option<&str>) -> Result<Option<DateTime<Utc>>, ApiError> {
    raw.map(|r| {
        DateTime::parse_from_rfc3339(r)
            .map(|t| t.with_timezone(&Utc))
            .ok()
            .filter(crate::domain::storable_time)
            .ok_or_else(|| {
                ApiError::query(ParseError::new(
                    field,
                    "must be an RFC 3339 timestamp between years 1 and 9999",
                ))
            })
    })
    .transpose()
}

#[tracing::instrument(skip_all)]
pub async fn history(
    auth: TenantAuth<Viewer>,
    State(state): State<AppState>,
    AppPath(system): AppPath<String>,
    AppQuery(query): AppQuery<HistoryQuery>,
) -> Result<Json<Page<SystemState>>, ApiError> {
    let system = system_param(&system)?;
    let (limit, cursor) = query.page.parse::<HistoryCursor>()?;
    let window = Window {
        since: timestamp("since", query.since.as_deref())?,
        until: timestamp("until", query.until.as_deref())?,
    };
    let mut tx = scope::begin_read(&state.db, auth.tenant_id).await?;
    let rows = system_states::history(
        &mut tx,
        auth.tenant_id,
        system,
        window,
        cursor.as_ref(),
        limit.fetch(),
    )
    .await?;
    scope::end_read(tx);
    Ok(Json(Page::from_rows(rows, limit, |s| HistoryCursor {
        version: s.version,
    })))
}
