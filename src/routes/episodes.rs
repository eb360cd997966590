//! S4 episodes: record observations and reports, list and read them.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;

use crate::db::CreationCursor;
use crate::db::episodes::{self, Episode};
use crate::db::{events, tenant as scope};
use crate::domain::ParseError;
use crate::domain::event_type::EventType;
use crate::domain::tenant::Name;
use crate::http::error::ApiError;
use crate::http::extract::{AppJson, AppPath, AppQuery, Operator, TenantAuth, Viewer};
use crate::jobs::episode_analysis::EpisodeAnalysis;
use crate::jobs::{self, Enqueue};
use crate::state::AppState;

use super::{Page, PageQuery, event_data, parse_uuid};

/// Episode text beyond this is refused (the body limit also applies).
const MAX_CONTENT_CHARS: usize = 100_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateEpisode {
    title: String,
    content: String,
}

#[tracing::instrument(skip_all)]
pub async fn create(
    auth: TenantAuth<Operator>,
    State(state): State<AppState>,
    AppJson(body): AppJson<CreateEpisode>,
) -> Result<(StatusCode, Json<Episode>), ApiError> {
    let title = Name::parse("title", &body.title).map_err(ApiError::validation)?;
    if body.content.contains('\0') {
        return Err(ApiError::validation(ParseError::new(
            "content",
            "must not contain NUL characters",
        )));
    }
    if body.content.chars().count() > MAX_CONTENT_CHARS {
        return Err(ApiError::validation(ParseError::new(
            "content",
            "must be at most 100000 characters",
        )));
    }
    let mut tx = scope::begin(state.db.primary(), auth.tenant_id).await?;
    let episode = episodes::create(&mut tx, auth.tenant_id, title.as_str(), &body.content).await?;
    // Analysed in the background; the job commits with the episode or not at all.
    let analysis = EpisodeAnalysis {
        episode_id: episode.id,
    };
    jobs::enqueue(&mut tx, auth.tenant_id, &analysis, Enqueue::default()).await?;
    let event_type = EventType::platform(EventType::EPISODE_CREATED);
    let event = events::append(&mut tx, auth.tenant_id, &event_type, &event_data(&episode)).await?;
    tx.commit().await?;
    state.events.committed(std::slice::from_ref(&event)).await;
    Ok((StatusCode::CREATED, Json(episode)))
}

#[tracing::instrument(skip_all)]
pub async fn list(
    auth: TenantAuth<Viewer>,
    State(state): State<AppState>,
    AppQuery(query): AppQuery<PageQuery>,
) -> Result<Json<Page<Episode>>, ApiError> {
    let (limit, cursor) = query.parse::<CreationCursor>()?;
    let mut tx = scope::begin_read(&state.db, auth.tenant_id).await?;
    let rows = episodes::list(&mut tx, auth.tenant_id, cursor.as_ref(), limit.fetch()).await?;
    scope::end_read(tx);
    Ok(Json(Page::from_rows(rows, limit, |e| CreationCursor {
        created_at: e.created_at,
        id: e.id,
    })))
}

#[tracing::instrument(skip_all)]
pub async fn get(
    auth: TenantAuth<Viewer>,
    State(state): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<Json<Episode>, ApiError> {
    let id = parse_uuid("id", &id)?;
    let mut tx = scope::begin_read(&state.db, auth.tenant_id).await?;
    let episode = episodes::get(&mut tx, auth.tenant_id, id).await?;
    scope::end_read(tx);
    episode
        .map(Json)
        .ok_or_else(|| ApiError::not_found("episode"))
}
