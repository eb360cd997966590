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
use crate::jobs::{self, Enqueue, Wake};
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

/// An episode's title and content, checked: what every way of recording one accepts.
pub struct NewEpisode {
    title: Name,
    content: String,
}

impl NewEpisode {
    pub fn parse(title: &str, content: String) -> Result<Self, ParseError> {
        let title = Name::parse("title", title)?;
        if content.contains('\0') {
            return Err(ParseError::new(
                "content",
                "must not contain NUL characters",
            ));
        }
        if content.chars().count() > MAX_CONTENT_CHARS {
            return Err(ParseError::new(
                "content",
                "must be at most 100000 characters",
            ));
        }
        Ok(Self { title, content })
    }
}

/// Records the episode in the caller's tenant transaction, with its analysis job and its
/// `episode.created` event. After the commit the caller hands the event to the bus and wakes the
/// analysis queue with the returned [`Wake`]. Every way of recording an episode (the API, the
/// Telegram bot, signed webhooks) goes through here.
pub async fn record(
    tx: &mut sqlx::PgConnection,
    tenant: crate::domain::tenant::TenantId,
    new: &NewEpisode,
) -> Result<(Episode, crate::db::events::Event, Wake), ApiError> {
    let episode = episodes::create(&mut *tx, tenant, new.title.as_str(), &new.content).await?;
    // Analysed in the background; the job commits with the episode or not at all.
    let analysis = EpisodeAnalysis {
        episode_id: episode.id,
    };
    let wake = jobs::enqueue(&mut *tx, tenant, &analysis, Enqueue::default())
        .await?
        .wake;
    let event_type = EventType::platform(EventType::EPISODE_CREATED);
    let event = events::append(&mut *tx, tenant, &event_type, &event_data(&episode)).await?;
    Ok((episode, event, wake))
}

#[tracing::instrument(skip_all)]
pub async fn create(
    auth: TenantAuth<Operator>,
    State(state): State<AppState>,
    AppJson(body): AppJson<CreateEpisode>,
) -> Result<(StatusCode, Json<Episode>), ApiError> {
    let new = NewEpisode::parse(&body.title, body.content).map_err(ApiError::validation)?;
    let mut tx = scope::begin(state.db.primary(), auth.tenant_id).await?;
    let (episode, event, wake) = record(&mut tx, auth.tenant_id, &new).await?;
    tx.commit().await?;
    wake.after_commit(&state.db);
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
