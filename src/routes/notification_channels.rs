//! Where a tenant's alerts go (admin only). A webhook channel's signing secret is returned once,
//! when the channel is created; deliveries carry `X-Cybernetic-Signature` made with it.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::db::channels::{self, Channel, ChannelChange, NewChannel};
use crate::db::{CreationCursor, events, tenant as scope};
use crate::domain::channel::{Kind, generate_secret, parse_webhook_url};
use crate::domain::event_type::EventType;
use crate::domain::policy::Severity;
use crate::domain::tenant::{Name, TenantId};
use crate::http::error::ApiError;
use crate::http::extract::{Admin, AppJson, AppPath, AppQuery, TenantAuth};
use crate::state::AppState;

use super::{Page, PageQuery, event_data, parse_uuid};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateChannel {
    name: String,
    kind: String,
    url: String,
    min_severity: Option<String>,
    #[serde(default = "active_by_default")]
    active: bool,
}

fn active_by_default() -> bool {
    true
}

/// A created channel: the only response that carries `secret`.
#[derive(Debug, Serialize)]
pub struct CreatedChannel {
    #[serde(flatten)]
    channel: Channel,
    secret: String,
}

fn webhook_config(state: &AppState, url: &str) -> Result<serde_json::Value, ApiError> {
    let url = parse_webhook_url(url, state.config.notifications.allow_http)
        .map_err(ApiError::validation)?;
    Ok(json!({"url": url.as_str()}))
}

fn severity(raw: Option<&str>) -> Result<Option<Severity>, ApiError> {
    raw.map(|s| Severity::parse("min_severity", s))
        .transpose()
        .map_err(ApiError::validation)
}

/// Appends the channel's event (never its secret) in the caller's transaction and commits.
async fn commit_with_event(
    state: &AppState,
    mut tx: scope::Tx,
    tenant: TenantId,
    name: &'static str,
    data: &serde_json::Value,
) -> Result<(), ApiError> {
    let event = events::append(&mut tx, tenant, &EventType::platform(name), data).await?;
    tx.commit().await?;
    state.events.committed(std::slice::from_ref(&event)).await;
    Ok(())
}

#[tracing::instrument(skip_all)]
pub async fn create(
    auth: TenantAuth<Admin>,
    State(state): State<AppState>,
    AppJson(body): AppJson<CreateChannel>,
) -> Result<(StatusCode, Json<CreatedChannel>), ApiError> {
    let name = Name::parse("name", &body.name).map_err(ApiError::validation)?;
    let kind = Kind::parse(&body.kind).map_err(ApiError::validation)?;
    let config = match kind {
        Kind::Webhook => webhook_config(&state, &body.url)?,
    };
    let min_severity = severity(body.min_severity.as_deref())?.unwrap_or(Severity::Info);
    let secret = generate_secret().map_err(|e| ApiError::internal(&e))?;
    let mut tx = scope::begin(state.db.primary(), auth.tenant_id).await?;
    let channel = channels::create(
        &mut tx,
        auth.tenant_id,
        &NewChannel {
            name: name.as_str(),
            kind: kind.as_str(),
            config: &config,
            secret: Some(&secret),
            min_severity,
            active: body.active,
        },
    )
    .await?;
    let data = event_data(&channel);
    commit_with_event(
        &state,
        tx,
        auth.tenant_id,
        EventType::CHANNEL_CREATED,
        &data,
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedChannel { channel, secret }),
    ))
}

#[tracing::instrument(skip_all)]
pub async fn list(
    auth: TenantAuth<Admin>,
    State(state): State<AppState>,
    AppQuery(query): AppQuery<PageQuery>,
) -> Result<Json<Page<Channel>>, ApiError> {
    let (limit, cursor) = query.parse::<CreationCursor>()?;
    let mut tx = scope::begin_read(&state.db, auth.tenant_id).await?;
    let rows = channels::list(&mut tx, auth.tenant_id, cursor.as_ref(), limit.fetch()).await?;
    scope::end_read(tx);
    Ok(Json(Page::from_rows(rows, limit, |c| CreationCursor {
        created_at: c.created_at,
        id: c.id,
    })))
}

#[tracing::instrument(skip_all)]
pub async fn get(
    auth: TenantAuth<Admin>,
    State(state): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<Json<Channel>, ApiError> {
    let id = parse_uuid("id", &id)?;
    let mut tx = scope::begin_read(&state.db, auth.tenant_id).await?;
    let channel = channels::get(&mut tx, auth.tenant_id, id).await?;
    scope::end_read(tx);
    channel
        .map(Json)
        .ok_or_else(|| ApiError::not_found("notification channel"))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateChannel {
    name: Option<String>,
    url: Option<String>,
    min_severity: Option<String>,
    active: Option<bool>,
}

/// Changes the fields given; the others keep their values.
#[tracing::instrument(skip_all)]
pub async fn update(
    auth: TenantAuth<Admin>,
    State(state): State<AppState>,
    AppPath(id): AppPath<String>,
    AppJson(body): AppJson<UpdateChannel>,
) -> Result<Json<Channel>, ApiError> {
    let id = parse_uuid("id", &id)?;
    let name = body
        .name
        .as_deref()
        .map(|n| Name::parse("name", n))
        .transpose()
        .map_err(ApiError::validation)?;
    // Every channel kind shipped so far is a webhook.
    let config = body
        .url
        .as_deref()
        .map(|url| webhook_config(&state, url))
        .transpose()?;
    let change = ChannelChange {
        name: name.as_ref().map(Name::as_str),
        config: config.as_ref(),
        min_severity: severity(body.min_severity.as_deref())?,
        active: body.active,
    };
    let mut tx = scope::begin(state.db.primary(), auth.tenant_id).await?;
    let channel = channels::update(&mut tx, auth.tenant_id, id, &change)
        .await?
        .ok_or_else(|| ApiError::not_found("notification channel"))?;
    let data = event_data(&channel);
    commit_with_event(
        &state,
        tx,
        auth.tenant_id,
        EventType::CHANNEL_UPDATED,
        &data,
    )
    .await?;
    Ok(Json(channel))
}

#[tracing::instrument(skip_all)]
pub async fn delete(
    auth: TenantAuth<Admin>,
    State(state): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_uuid("id", &id)?;
    let mut tx = scope::begin(state.db.primary(), auth.tenant_id).await?;
    let channel = channels::delete(&mut tx, auth.tenant_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("notification channel"))?;
    let data = json!({"id": channel.id, "name": channel.name});
    commit_with_event(
        &state,
        tx,
        auth.tenant_id,
        EventType::CHANNEL_DELETED,
        &data,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
