//! The platform admin API: tenants, and the first API key of a tenant.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;

use crate::db::CreationCursor;
use crate::db::tenant as scope;
use crate::db::tenants::{self, Tenant};
use crate::domain::tenant::{Name, Settings, Slug, TenantId};
use crate::http::error::ApiError;
use crate::http::extract::{AppJson, AppPath, AppQuery, PlatformAdmin};
use crate::state::AppState;

use super::api_keys::{CreateKey, IssuedKey, issue};
use super::{Page, PageQuery, parse_uuid};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    name: String,
    slug: String,
    settings: Option<serde_json::Value>,
}

fn settings(raw: Option<serde_json::Value>) -> Result<Option<Settings>, ApiError> {
    raw.map(Settings::parse)
        .transpose()
        .map_err(ApiError::validation)
}

#[tracing::instrument(skip_all)]
pub async fn create(
    _: PlatformAdmin,
    State(state): State<AppState>,
    AppJson(body): AppJson<CreateTenant>,
) -> Result<(StatusCode, Json<Tenant>), ApiError> {
    let name = Name::parse("name", &body.name).map_err(ApiError::validation)?;
    let slug = Slug::parse(&body.slug).map_err(ApiError::validation)?;
    let settings = settings(body.settings)?.unwrap_or_default();
    let mut tx = scope::begin_platform(state.db.primary()).await?;
    let tenant = tenants::create(&mut tx, TenantId::generate(), &name, &slug, &settings).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(tenant)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateTenant {
    name: Option<String>,
    settings: Option<serde_json::Value>,
}

/// Renames a tenant or replaces its settings.
#[tracing::instrument(skip_all)]
pub async fn update(
    _: PlatformAdmin,
    State(state): State<AppState>,
    AppPath(id): AppPath<String>,
    AppJson(body): AppJson<UpdateTenant>,
) -> Result<Json<Tenant>, ApiError> {
    let id = parse_uuid("id", &id)?;
    let name = body
        .name
        .as_deref()
        .map(|n| Name::parse("name", n))
        .transpose()
        .map_err(ApiError::validation)?;
    let settings = settings(body.settings)?;
    let mut tx = scope::begin_platform(state.db.primary()).await?;
    let tenant = tenants::update(&mut tx, id, name.as_ref(), settings.as_ref())
        .await?
        .ok_or_else(|| ApiError::not_found("tenant"))?;
    tx.commit().await?;
    Ok(Json(tenant))
}

#[tracing::instrument(skip_all)]
pub async fn list(
    _: PlatformAdmin,
    State(state): State<AppState>,
    AppQuery(query): AppQuery<PageQuery>,
) -> Result<Json<Page<Tenant>>, ApiError> {
    let (limit, cursor) = query.parse::<CreationCursor>()?;
    let mut tx = scope::begin_platform_read(&state.db).await?;
    let rows = tenants::list(&mut tx, cursor.as_ref(), limit.fetch()).await?;
    scope::end_read(tx);
    Ok(Json(Page::from_rows(rows, limit, |t| CreationCursor {
        created_at: t.created_at,
        id: t.id,
    })))
}

/// Bootstraps a tenant: the platform admin creates its first key (usually an admin key).
#[tracing::instrument(skip_all)]
pub async fn create_api_key(
    _: PlatformAdmin,
    State(state): State<AppState>,
    AppPath(id): AppPath<String>,
    AppJson(body): AppJson<CreateKey>,
) -> Result<(StatusCode, Json<IssuedKey>), ApiError> {
    let id = parse_uuid("id", &id)?;
    let (name, role) = body.parse()?;
    let tenant = TenantId::from_uuid(id);
    let mut tx = scope::begin(state.db.primary(), tenant).await?;
    // The tenant's own row is visible inside its transaction only if the tenant exists.
    if tenants::find(&mut tx, &id.to_string()).await?.is_none() {
        return Err(ApiError::not_found("tenant"));
    }
    let issued = issue(&mut tx, tenant, &name, role).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(issued)))
}
