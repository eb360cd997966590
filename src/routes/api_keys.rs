//! A tenant's API keys, managed by its admins. The secret is returned once, at creation.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::db::CreationCursor;
use crate::db::api_keys::{self, ApiKey};
use crate::db::tenant as scope;
use crate::domain::api_key::NewApiKey;
use crate::domain::role::Role;
use crate::domain::tenant::{Name, TenantId};
use crate::http::error::ApiError;
use crate::http::extract::{Admin, AppJson, AppPath, AppQuery, TenantAuth};
use crate::state::AppState;

use super::{Page, PageQuery, parse_uuid};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    pub name: String,
    pub role: String,
}

impl CreateKey {
    pub fn parse(&self) -> Result<(Name, Role), ApiError> {
        let name = Name::parse("name", &self.name).map_err(ApiError::validation)?;
        let role = Role::parse(&self.role).map_err(ApiError::validation)?;
        Ok((name, role))
    }
}

/// A newly issued key: the only response that ever carries `key`.
#[derive(Debug, Serialize)]
pub struct IssuedKey {
    pub id: Uuid,
    pub name: String,
    pub role: Role,
    pub prefix: String,
    pub key: String,
    pub created_at: DateTime<Utc>,
}

/// Generates and stores a key inside the caller's tenant transaction.
pub async fn issue(
    conn: &mut PgConnection,
    tenant: TenantId,
    name: &Name,
    role: Role,
) -> Result<IssuedKey, ApiError> {
    let new = NewApiKey::generate().map_err(|e| ApiError::internal(&e))?;
    let row = api_keys::create(conn, tenant, name, role, &new.display_prefix, &new.hash).await?;
    Ok(IssuedKey {
        id: row.id,
        name: row.name,
        role: row.role,
        prefix: row.prefix,
        key: new.secret,
        created_at: row.created_at,
    })
}

#[tracing::instrument(skip_all)]
pub async fn create(
    auth: TenantAuth<Admin>,
    State(state): State<AppState>,
    AppJson(body): AppJson<CreateKey>,
) -> Result<(StatusCode, Json<IssuedKey>), ApiError> {
    let (name, role) = body.parse()?;
    let mut tx = scope::begin(state.db.primary(), auth.tenant_id).await?;
    let issued = issue(&mut tx, auth.tenant_id, &name, role).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(issued)))
}

#[tracing::instrument(skip_all)]
pub async fn list(
    auth: TenantAuth<Admin>,
    State(state): State<AppState>,
    AppQuery(query): AppQuery<PageQuery>,
) -> Result<Json<Page<ApiKey>>, ApiError> {
    let (limit, cursor) = query.parse::<CreationCursor>()?;
    let mut tx = scope::begin_read(&state.db, auth.tenant_id).await?;
    let rows = api_keys::list(&mut tx, auth.tenant_id, cursor.as_ref(), limit.fetch()).await?;
    scope::end_read(tx);
    Ok(Json(Page::from_rows(rows, limit, |k| CreationCursor {
        created_at: k.created_at,
        id: k.id,
    })))
}

/// Revokes a key at once: the next request with it is refused.
#[tracing::instrument(skip_all)]
pub async fn revoke(
    auth: TenantAuth<Admin>,
    State(state): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_uuid("id", &id)?;
    let mut tx = scope::begin(state.db.primary(), auth.tenant_id).await?;
    let revoked = api_keys::revoke(&mut tx, auth.tenant_id, id).await?;
    tx.commit().await?;
    match revoked {
        Some(key) => {
            state.keys.forget(key.id);
            Ok(StatusCode::NO_CONTENT)
        }
        None => Err(ApiError::not_found("API key")),
    }
}
