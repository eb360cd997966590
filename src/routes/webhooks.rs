//! Inbound webhooks. Tenant admins manage sources (`/v1/webhook-sources`, the secret shown once,
//! at creation and at each rotation); other systems post signed JSON to `/v1/webhooks/{source}`,
//! which becomes an event `webhook.<name>` or an S4 episode. See docs/api.md, "Inbound webhooks".
//!
//! A request is checked in this order, and nothing is stored unless every check passes: the
//! signature headers' shape, the timestamp's window, the source (known and active), the body's
//! size, the signature over the raw body, then the body as a JSON object.

use axum::Json;
use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::db::events;
use crate::db::webhook_sources::{self, Produced, Source, Verification};
use crate::db::{CreationCursor, DbError, tenant as scope};
use crate::domain::channel::generate_secret;
use crate::domain::event_type::EventType;
use crate::domain::tenant::TenantId;
use crate::domain::webhook::{
    Refusal, SIGNATURE_HEADER, SignedRequest, SourceName, TIMESTAMP_HEADER, Target, parse_overlap,
};
use crate::domain::{ParseError, reject_nul};
use crate::http::error::ApiError;
use crate::http::extract::{Admin, AppJson, AppPath, AppQuery, TenantAuth};
use crate::http::middleware::record_tenant;
use crate::jobs::Wake;
use crate::state::AppState;

use super::episodes::{NewEpisode, record};
use super::{Page, PageQuery, event_data, parse_uuid};

/// Expired receipts deleted by each accepted request: more than the one it adds, so a tenant's
/// receipts never outgrow what its sources sent within the window.
const PRUNE_BATCH: i64 = 100;
const NAME_CONSTRAINT: &str = "webhook_sources_tenant_id_name_key";

// ---- managing sources (tenant admin) ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSource {
    name: String,
    target: Option<String>,
}

/// A source with its secret: the answer to a creation or a rotation, and nothing else.
#[derive(Debug, Serialize)]
pub struct SourceWithSecret {
    #[serde(flatten)]
    source: Source,
    secret: String,
}

fn name_taken(e: DbError) -> ApiError {
    match e {
        DbError::UniqueViolation { constraint } if constraint == NAME_CONSTRAINT => {
            ApiError::conflict("a webhook source with this name already exists")
        }
        other => other.into(),
    }
}

/// Appends the source's event (never its secret) in the caller's transaction and commits.
async fn commit_with_event(
    state: &AppState,
    mut tx: scope::Tx,
    tenant: TenantId,
    name: &'static str,
    data: &Value,
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
    AppJson(body): AppJson<CreateSource>,
) -> Result<(StatusCode, Json<SourceWithSecret>), ApiError> {
    let name = SourceName::parse(&body.name).map_err(ApiError::validation)?;
    let target = body
        .target
        .as_deref()
        .map(Target::parse)
        .transpose()
        .map_err(ApiError::validation)?
        .unwrap_or(Target::Event);
    let secret = generate_secret().map_err(|e| ApiError::internal(&e))?;
    let mut tx = scope::begin(state.db.primary(), auth.tenant_id).await?;
    let source = webhook_sources::create(&mut tx, auth.tenant_id, &name, target, &secret)
        .await
        .map_err(name_taken)?;
    let data = event_data(&source);
    commit_with_event(
        &state,
        tx,
        auth.tenant_id,
        EventType::WEBHOOK_SOURCE_CREATED,
        &data,
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(SourceWithSecret { source, secret }),
    ))
}

#[tracing::instrument(skip_all)]
pub async fn list(
    auth: TenantAuth<Admin>,
    State(state): State<AppState>,
    AppQuery(query): AppQuery<PageQuery>,
) -> Result<Json<Page<Source>>, ApiError> {
    let (limit, cursor) = query.parse::<CreationCursor>()?;
    let mut tx = scope::begin_read(&state.db, auth.tenant_id).await?;
    let rows =
        webhook_sources::list(&mut tx, auth.tenant_id, cursor.as_ref(), limit.fetch()).await?;
    scope::end_read(tx);
    Ok(Json(Page::from_rows(rows, limit, |s| CreationCursor {
        created_at: s.created_at,
        id: s.id,
    })))
}

#[tracing::instrument(skip_all)]
pub async fn get(
    auth: TenantAuth<Admin>,
    State(state): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<Json<Source>, ApiError> {
    let id = parse_uuid("id", &id)?;
    let mut tx = scope::begin_read(&state.db, auth.tenant_id).await?;
    let source = webhook_sources::get(&mut tx, auth.tenant_id, id).await?;
    scope::end_read(tx);
    source
        .map(Json)
        .ok_or_else(|| ApiError::not_found("webhook source"))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateSource {
    name: Option<String>,
    active: Option<bool>,
}

/// Changes the fields given; the others keep their values.
#[tracing::instrument(skip_all)]
pub async fn update(
    auth: TenantAuth<Admin>,
    State(state): State<AppState>,
    AppPath(id): AppPath<String>,
    AppJson(body): AppJson<UpdateSource>,
) -> Result<Json<Source>, ApiError> {
    let id = parse_uuid("id", &id)?;
    let name = body
        .name
        .as_deref()
        .map(SourceName::parse)
        .transpose()
        .map_err(ApiError::validation)?;
    let mut tx = scope::begin(state.db.primary(), auth.tenant_id).await?;
    let source = webhook_sources::update(&mut tx, auth.tenant_id, id, name.as_ref(), body.active)
        .await
        .map_err(name_taken)?
        .ok_or_else(|| ApiError::not_found("webhook source"))?;
    let data = event_data(&source);
    commit_with_event(
        &state,
        tx,
        auth.tenant_id,
        EventType::WEBHOOK_SOURCE_UPDATED,
        &data,
    )
    .await?;
    Ok(Json(source))
}

#[tracing::instrument(skip_all)]
pub async fn delete(
    auth: TenantAuth<Admin>,
    State(state): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_uuid("id", &id)?;
    let mut tx = scope::begin(state.db.primary(), auth.tenant_id).await?;
    let source = webhook_sources::delete(&mut tx, auth.tenant_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("webhook source"))?;
    let data = json!({"id": source.id, "name": source.name});
    commit_with_event(
        &state,
        tx,
        auth.tenant_id,
        EventType::WEBHOOK_SOURCE_DELETED,
        &data,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rotate {
    overlap: Option<String>,
}

/// Issues a new secret. The body is optional: without one (and without a `Content-Type`) the
/// previous secret keeps verifying for the default overlap.
#[tracing::instrument(skip_all)]
pub async fn rotate(
    auth: TenantAuth<Admin>,
    State(state): State<AppState>,
    AppPath(id): AppPath<String>,
    request: Request,
) -> Result<Json<SourceWithSecret>, ApiError> {
    let id = parse_uuid("id", &id)?;
    let body = if request.headers().contains_key(header::CONTENT_TYPE) {
        AppJson::<Rotate>::from_request(request, &state).await?.0
    } else {
        let bytes = Bytes::from_request(request, &state)
            .await
            .map_err(|e| body_rejection(&e))?;
        if !bytes.is_empty() {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the body must be JSON with Content-Type: application/json",
            ));
        }
        Rotate::default()
    };
    let overlap = parse_overlap(body.overlap.as_deref()).map_err(ApiError::validation)?;
    let secret = generate_secret().map_err(|e| ApiError::internal(&e))?;
    let mut tx = scope::begin(state.db.primary(), auth.tenant_id).await?;
    let source = webhook_sources::rotate(&mut tx, auth.tenant_id, id, &secret, overlap)
        .await?
        .ok_or_else(|| ApiError::not_found("webhook source"))?;
    let data = json!({
        "id": source.id,
        "name": source.name,
        "rotated_at": source.rotated_at,
        "previous_secret_expires_at": source.previous_secret_expires_at,
    });
    commit_with_event(
        &state,
        tx,
        auth.tenant_id,
        EventType::WEBHOOK_SOURCE_ROTATED,
        &data,
    )
    .await?;
    Ok(Json(SourceWithSecret { source, secret }))
}

// ---- receiving (signed by the source's secret) ----

/// `webhook_requests_total{outcome}`: a fixed set, never the source (tenants define those).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Accepted,
    Duplicate,
    UnknownSource,
    BadSignature,
    Expired,
    Malformed,
    Error,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Duplicate => "duplicate",
            Self::UnknownSource => "unknown_source",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::Malformed => "malformed",
            Self::Error => "error",
        }
    }
}

type Refused = (Outcome, ApiError);

/// Server-side failures (the database, a bug) count as `error`; anything the sender did wrong as
/// `malformed`.
fn failed(e: impl Into<ApiError>) -> Refused {
    (Outcome::Error, e.into())
}

fn malformed(e: ApiError) -> Refused {
    (Outcome::Malformed, e)
}

fn signature_refused(refusal: Refusal) -> Refused {
    let (outcome, code) = match refusal {
        Refusal::Missing(_) | Refusal::Malformed(_) => (Outcome::Malformed, "invalid_signature"),
        Refusal::Mismatch => (Outcome::BadSignature, "invalid_signature"),
        Refusal::OutsideWindow => (Outcome::Expired, "timestamp_out_of_window"),
    };
    let error = ApiError::new(StatusCode::UNAUTHORIZED, code, refusal.to_string()).with_header(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Cybernetic-Signature"),
    );
    (outcome, error)
}

fn body_rejection(rejection: &axum::extract::rejection::BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the request body is larger than this server accepts",
        )
    } else {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the request body could not be read in full",
        )
    }
}

#[tracing::instrument(skip_all)]
pub async fn receive(
    State(state): State<AppState>,
    AppPath(source): AppPath<String>,
    request: Request,
) -> Response {
    let (outcome, response) = match accept(&state, &source, request).await {
        Ok((outcome, status, body)) => (outcome, (status, Json(body)).into_response()),
        Err((outcome, error)) => (outcome, error.into_response()),
    };
    metrics::counter!("webhook_requests_total", "outcome" => outcome.as_str()).increment(1);
    response
}

async fn accept(
    state: &AppState,
    source: &str,
    request: Request,
) -> Result<(Outcome, StatusCode, Value), Refused> {
    let source_id = parse_uuid("source", source).map_err(malformed)?;
    let signed = {
        let header = |name: &str| request.headers().get(name).map(HeaderValue::as_bytes);
        SignedRequest::parse(header(SIGNATURE_HEADER), header(TIMESTAMP_HEADER))
    }
    .map_err(signature_refused)?;
    let now = Utc::now();
    signed
        .check_window(now.timestamp())
        .map_err(signature_refused)?;
    let found = webhook_sources::for_verification(state.db.primary(), source_id)
        .await
        .map_err(failed)?;
    let Some(found) = found.filter(|s| s.active) else {
        return Err((
            Outcome::UnknownSource,
            ApiError::not_found("webhook source"),
        ));
    };
    record_tenant(found.tenant_id);
    let body = Bytes::from_request(request, state)
        .await
        .map_err(|e| malformed(body_rejection(&e)))?;
    signed
        .verify(found.secrets.valid_at(now), &body)
        .map_err(signature_refused)?;

    let data = json_object(&body).map_err(malformed)?;
    let target = Target::parse(&found.target).map_err(|e| failed(ApiError::internal(&e)))?;
    let episode = match target {
        Target::Event => None,
        Target::Episode => Some(episode_fields(&found, &data).map_err(malformed)?),
    };
    let expires_at = DateTime::from_timestamp(signed.receipt_expires_at(), 0)
        .ok_or_else(|| failed(ApiError::internal(&"receipt expiry out of range")))?;

    let tenant = found.tenant_id;
    let key = signed.receipt_key();
    let mut tx = scope::begin(state.db.primary(), tenant)
        .await
        .map_err(failed)?;
    let earlier =
        webhook_sources::claim_receipt(&mut tx, tenant, found.source_id, &key, expires_at)
            .await
            .map_err(failed)?;
    if let Some(earlier) = earlier {
        scope::end_read(tx);
        let mut answer = produced_json(earlier);
        answer["duplicate"] = Value::Bool(true);
        return Ok((Outcome::Duplicate, StatusCode::OK, answer));
    }
    webhook_sources::prune_receipts(&mut tx, tenant, PRUNE_BATCH)
        .await
        .map_err(failed)?;
    let (produced, event, wake) = match episode {
        None => {
            let event_type = SourceName::parse(&found.name)
                .and_then(|name| name.event_type())
                .map_err(|e| failed(ApiError::internal(&e)))?;
            let event = webhook_sources::append_event(
                &mut tx,
                tenant,
                found.source_id,
                &key,
                &event_type,
                &data,
            )
            .await
            .map_err(failed)?;
            (Produced::Event(event.id), event, Wake::default())
        }
        Some(new) => {
            // The same path as POST /v1/episodes: the row, its analysis job, its event.
            let (episode, event, wake) = record(&mut tx, tenant, &new).await.map_err(failed)?;
            webhook_sources::record_episode(&mut tx, tenant, found.source_id, &key, episode.id)
                .await
                .map_err(failed)?;
            (Produced::Episode(episode.id), event, wake)
        }
    };
    tx.commit().await.map_err(failed)?;
    wake.after_commit(&state.db);
    state.events.committed(std::slice::from_ref(&event)).await;
    Ok((
        Outcome::Accepted,
        StatusCode::ACCEPTED,
        produced_json(produced),
    ))
}

fn produced_json(produced: Produced) -> Value {
    match produced {
        Produced::Event(position) => json!({"event_id": position}),
        Produced::Episode(id) => json!({"episode_id": id}),
    }
}

/// The verified body: a JSON object PostgreSQL can store.
fn json_object(body: &[u8]) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    if !value.is_object() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the body must be a JSON object",
        ));
    }
    reject_nul("body", &value).map_err(ApiError::validation)?;
    Ok(value)
}

/// An episode from a body: its `title` and `content` strings where given, else `webhook <name>`
/// and the body pretty-printed; checked as `POST /v1/episodes` checks them.
fn episode_fields(source: &Verification, body: &Value) -> Result<NewEpisode, ApiError> {
    let text = |field: &'static str| match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err(ApiError::validation(ParseError::new(
            field,
            "must be a string",
        ))),
    };
    let title = match text("title")? {
        Some(title) => title.to_owned(),
        None => format!("webhook {}", source.name),
    };
    let content = match text("content")? {
        Some(content) => content.to_owned(),
        // A serde_json::Value always serialises.
        None => serde_json::to_string_pretty(body).unwrap_or_default(),
    };
    NewEpisode::parse(&title, content).map_err(ApiError::validation)
}

pub fn describe_metrics() {
    metrics::describe_counter!(
        "webhook_requests_total",
        "Requests to /v1/webhooks/{source}, by outcome (accepted, duplicate, unknown_source, bad_signature, expired, malformed, error)."
    );
}
