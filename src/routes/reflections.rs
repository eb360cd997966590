//! Daily reflections and weekly reviews written by the scheduled jobs, and the policy violations
//! the evaluation jobs record: read-only views for every role.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;

use crate::db::reflections::{self, Reflection};
use crate::db::violations::{self, Violation};
use crate::db::{CreationCursor, tenant as scope};
use crate::domain::ParseError;
use crate::http::error::ApiError;
use crate::http::extract::{AppPath, AppQuery, TenantAuth, Viewer};
use crate::state::AppState;

use super::{Page, PageQuery, parse_uuid};

#[derive(Debug, Deserialize)]
pub struct ReflectionQuery {
    kind: Option<String>,
    #[serde(flatten)]
    page: PageQuery,
}

#[tracing::instrument(skip_all)]
pub async fn list(
    auth: TenantAuth<Viewer>,
    State(state): State<AppState>,
    AppQuery(query): AppQuery<ReflectionQuery>,
) -> Result<Json<Page<Reflection>>, ApiError> {
    let (limit, cursor) = query.page.parse::<CreationCursor>()?;
    let kind = match query.kind.as_deref() {
        None => None,
        Some(k @ ("daily" | "weekly")) => Some(k),
        Some(_) => {
            return Err(ApiError::query(ParseError::new(
                "kind",
                "must be one of: daily, weekly",
            )));
        }
    };
    let mut tx = scope::begin_read(&state.db, auth.tenant_id).await?;
    let rows = reflections::list(
        &mut tx,
        auth.tenant_id,
        kind,
        cursor.as_ref(),
        limit.fetch(),
    )
    .await?;
    scope::end_read(tx);
    Ok(Json(Page::from_rows(rows, limit, |r| CreationCursor {
        created_at: r.created_at,
        id: r.id,
    })))
}

#[tracing::instrument(skip_all)]
pub async fn get(
    auth: TenantAuth<Viewer>,
    State(state): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<Json<Reflection>, ApiError> {
    let id = parse_uuid("id", &id)?;
    let mut tx = scope::begin_read(&state.db, auth.tenant_id).await?;
    let reflection = reflections::get(&mut tx, auth.tenant_id, id).await?;
    scope::end_read(tx);
    reflection
        .map(Json)
        .ok_or_else(|| ApiError::not_found("reflection"))
}

#[derive(Debug, Deserialize)]
pub struct ViolationQuery {
    state: Option<String>,
    #[serde(flatten)]
    page: PageQuery,
}

/// `GET /v1/violations?state=open|resolved`, newest first.
#[tracing::instrument(skip_all)]
pub async fn violations(
    auth: TenantAuth<Viewer>,
    State(state): State<AppState>,
    AppQuery(query): AppQuery<ViolationQuery>,
) -> Result<Json<Page<Violation>>, ApiError> {
    let (limit, cursor) = query.page.parse::<CreationCursor>()?;
    let open_only = match query.state.as_deref() {
        None => None,
        Some("open") => Some(true),
        Some("resolved") => Some(false),
        Some(_) => {
            return Err(ApiError::query(ParseError::new(
                "state",
                "must be one of: open, resolved",
            )));
        }
    };
    let mut tx = scope::begin_read(&state.db, auth.tenant_id).await?;
    let rows = violations::list(
        &mut tx,
        auth.tenant_id,
        open_only,
        cursor.as_ref(),
        limit.fetch(),
    )
    .await?;
    scope::end_read(tx);
    Ok(Json(Page::from_rows(rows, limit, |v| CreationCursor {
        created_at: v.opened_at,
        id: v.id,
    })))
}
