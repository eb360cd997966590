//! Artifacts: files a tenant stores, streamed in and out, with their metadata in `artifacts`
//! (row-level security as everywhere) and their bytes in the storage backend.
//!
//! Order of operations, so that a row always names a complete object:
//! - `PUT` streams the body to a new storage path of its own, then (in one transaction) points the
//!   key's row at it and appends `artifact.stored`; the object the row named before, if any, is
//!   deleted after the commit. A failure before the commit deletes the new upload.
//! - `DELETE` removes the row (appending `artifact.deleted`), then the object.
//!
//! A crash between the two steps can only leave an object that no row names, never a row without
//! its object.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::db::artifacts::{self, Artifact, NewArtifact, Stored};
use crate::db::{events, tenant as scope};
use crate::domain::ParseError;
use crate::domain::event_type::EventType;
use crate::domain::object_key::{ObjectKey, StoragePath};
use crate::domain::pagination::Limit;
use crate::domain::tenant::TenantId;
use crate::http::error::ApiError;
use crate::http::extract::{AppPath, AppQuery, Operator, TenantAuth, Viewer};
use crate::jobs::artifact_processing::ArtifactProcessing;
use crate::jobs::{self, Enqueue};
use crate::state::AppState;
use crate::storage::{ByteStream, PutOptions, StorageError};

use super::{Page, event_data};

const META_PREFIX: &str = "x-artifact-meta-";
const TAGS_HEADER: &str = "x-artifact-tags";
/// S3's own limits, so every backend accepts what one accepts.
/// S3 allows 2 KB of user metadata, and the S3 backend keeps the checksum in it.
const MAX_METADATA_BYTES: usize = 1900;
/// Metadata names the platform keeps for itself.
const RESERVED_META_PREFIX: &str = "cyb-";
const MAX_TAGS: usize = 10;
const MAX_CONTENT_TYPE_BYTES: usize = 255;
/// Advisory-lock class for "store one key of one tenant".
const KEY_LOCK_CLASS: i32 = 0x4152; // "AR"

fn key_param(raw: &str) -> Result<ObjectKey, ApiError> {
    ObjectKey::parse(raw).map_err(ApiError::path)
}

fn invalid_header(field: &'static str, reason: impl Into<String>) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_header",
        ParseError::new(field, reason).to_string(),
    )
}

/// What the upload's headers say about it.
struct Upload {
    content_type: String,
    metadata: BTreeMap<String, String>,
    tags: BTreeMap<String, String>,
    if_absent: bool,
}

fn parse_upload(headers: &HeaderMap) -> Result<Upload, ApiError> {
    let content_type = match headers.get(header::CONTENT_TYPE) {
        None => "application/octet-stream".to_owned(),
        Some(v) => {
            let v = v
                .to_str()
                .ok()
                .filter(|v| !v.is_empty() && v.len() <= MAX_CONTENT_TYPE_BYTES && v.contains('/'))
                .ok_or_else(|| {
                    invalid_header("content-type", "must be a media type such as text/csv")
                })?;
            v.to_owned()
        }
    };
    let mut metadata = BTreeMap::new();
    let mut metadata_bytes = 0;
    for (name, value) in headers {
        let Some(field) = name.as_str().strip_prefix(META_PREFIX) else {
            continue;
        };
        if field.starts_with(RESERVED_META_PREFIX) {
            return Err(invalid_header(
                "x-artifact-meta-*",
                "names starting with cyb- are reserved",
            ));
        }
        if field.is_empty()
            || field.len() > 64
            || !field
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(invalid_header(
                "x-artifact-meta-*",
                "names are 1-64 lowercase letters, digits or '-'",
            ));
        }
        let value = value
            .to_str()
            .ok()
            .filter(|v| v.bytes().all(|b| b == b' ' || b.is_ascii_graphic()))
            .ok_or_else(|| invalid_header("x-artifact-meta-*", "values are printable ASCII"))?;
        metadata_bytes += field.len() + value.len();
        if metadata
            .insert(field.to_owned(), value.to_owned())
            .is_some()
        {
            return Err(invalid_header(
                "x-artifact-meta-*",
                format!("{field} is given more than once"),
            ));
        }
    }
    if metadata_bytes > MAX_METADATA_BYTES {
        return Err(invalid_header(
            "x-artifact-meta-*",
            "names and values together must be at most 1900 bytes",
        ));
    }
    let mut tags = BTreeMap::new();
    if let Some(raw) = headers.get(TAGS_HEADER) {
        let raw = raw
            .to_str()
            .map_err(|_| invalid_header("x-artifact-tags", "must be ASCII"))?;
        for (k, v) in form_urlencoded::parse(raw.as_bytes()) {
            if k.is_empty() || k.chars().count() > 128 || v.chars().count() > 256 {
                return Err(invalid_header(
                    "x-artifact-tags",
                    "tag keys are 1-128 characters, values at most 256",
                ));
            }
            // The characters S3 accepts in tags.
            let allowed = |c: char| c.is_alphanumeric() || " +-=._:/@".contains(c);
            if !k.chars().all(allowed) || !v.chars().all(allowed) {
                return Err(invalid_header(
                    "x-artifact-tags",
                    "tags may hold letters, digits, spaces and + - = . _ : / @",
                ));
            }
            if tags.insert(k.into_owned(), v.into_owned()).is_some() {
                return Err(invalid_header("x-artifact-tags", "a tag is given twice"));
            }
        }
        if tags.len() > MAX_TAGS {
            return Err(invalid_header("x-artifact-tags", "at most 10 tags"));
        }
    }
    let if_absent = match headers.get(header::IF_NONE_MATCH) {
        None => false,
        Some(v) if v.as_bytes() == b"*" => true,
        Some(_) => {
            return Err(invalid_header(
                "if-none-match",
                "only '*' (do not replace an existing artifact) is supported on PUT",
            ));
        }
    };
    Ok(Upload {
        content_type,
        metadata,
        tags,
        if_absent,
    })
}

fn exists() -> ApiError {
    ApiError::new(
        StatusCode::PRECONDITION_FAILED,
        "precondition_failed",
        "an artifact with this key exists and If-None-Match: * was given",
    )
}

fn too_large(max: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("an artifact may be at most {max} bytes (STORAGE_MAX_BYTES)"),
    )
}

/// The request body as a storage stream that fails once more than `max` bytes have come,
/// raising `over`.
fn limited(body: Body, max: u64, over: Arc<AtomicBool>) -> ByteStream {
    let mut seen: u64 = 0;
    Box::pin(body.into_data_stream().map(move |chunk| {
        let chunk = chunk.map_err(|e| StorageError::Interrupted(e.to_string()))?;
        seen += chunk.len() as u64;
        if seen > max {
            over.store(true, Ordering::Relaxed);
            return Err(StorageError::Interrupted(
                "the body is over the size limit".into(),
            ));
        }
        Ok(chunk)
    }))
}

fn storage_error(e: StorageError) -> ApiError {
    match e {
        StorageError::Interrupted(reason) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "upload_interrupted",
            format!("the upload did not complete ({reason}); nothing was stored"),
        ),
        other => {
            tracing::error!(error = %other, "storage backend failed");
            ApiError::unavailable("the artifact storage is unavailable; retry shortly")
        }
    }
}

/// Deletes an object nothing names any more, logging (not failing) when the backend refuses: the
/// object is then left in the backend, unreferenced, and the log line names it.
async fn discard(state: &AppState, path: &StoragePath) {
    if let Err(e) = state.storage.delete(path).await {
        tracing::warn!(path = path.as_str(), error = %e, "could not delete an unreferenced object");
    }
}

#[tracing::instrument(skip_all)]
pub async fn put(
    auth: TenantAuth<Operator>,
    State(state): State<AppState>,
    AppPath(key): AppPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let key = key_param(&key)?;
    let upload = parse_upload(&headers)?;
    let max = state.config.storage.max_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(too_large(max));
    }
    let tenant = auth.tenant_id;
    // Refused before the body is read when it is already clear; checked again at the commit.
    if upload.if_absent && find(&state, tenant, &key).await.is_ok() {
        return Err(exists());
    }
    let path = StoragePath::upload(tenant);
    let over = Arc::new(AtomicBool::new(false));
    let options = PutOptions {
        content_type: upload.content_type,
        metadata: upload.metadata,
        tags: upload.tags,
        if_absent: false,
    };
    let stored = match state
        .storage
        .put(&path, limited(body, max, over.clone()), options)
        .await
    {
        Ok(meta) => meta,
        Err(_) if over.load(Ordering::Relaxed) => return Err(too_large(max)),
        Err(e) => return Err(storage_error(e)),
    };
    let recorded = record(&state, tenant, &key, &path, &stored, upload.if_absent).await;
    let (artifact, created) = match recorded {
        Ok(done) => done,
        Err(e) => {
            discard(&state, &path).await;
            return Err(e);
        }
    };
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(artifact)).into_response())
}

/// Points the key's row at the stored upload and appends `artifact.stored`; deletes the object
/// the row named before once that is committed. Returns the row and whether it is new.
async fn record(
    state: &AppState,
    tenant: TenantId,
    key: &ObjectKey,
    path: &StoragePath,
    stored: &crate::storage::ObjectMeta,
    if_absent: bool,
) -> Result<(Artifact, bool), ApiError> {
    let sha256 = stored.sha256.clone().unwrap_or_default();
    let metadata = json!(stored.metadata);
    let tags = json!(stored.tags);
    let mut tx = scope::begin(state.db.primary(), tenant).await?;
    sqlx::query("select pg_advisory_xact_lock($1, hashtext($2::text || ':' || $3))")
        .bind(KEY_LOCK_CLASS)
        .bind(tenant.as_uuid())
        .bind(key.as_str())
        .execute(&mut *tx)
        .await
        .map_err(crate::db::DbError::from)?;
    let new = NewArtifact {
        key: key.as_str(),
        storage_path: path.as_str(),
        size: i64::try_from(stored.size).unwrap_or(i64::MAX),
        content_type: &stored.content_type,
        sha256: &sha256,
        metadata: &metadata,
        tags: &tags,
    };
    let (artifact, previous) = match artifacts::store(&mut tx, tenant, &new, if_absent).await? {
        Stored::Exists => return Err(exists()),
        Stored::Created(artifact) => (artifact, None),
        Stored::Replaced {
            artifact,
            previous_path,
        } => (artifact, Some(previous_path)),
    };
    // Checked again from the stored bytes in the background, committed with the row.
    let processing = ArtifactProcessing {
        key: artifact.key.clone(),
        storage_path: artifact.storage_path.clone(),
        sha256: artifact.sha256.clone(),
    };
    let wake = jobs::enqueue(&mut tx, tenant, &processing, Enqueue::default())
        .await?
        .wake;
    let event = events::append(
        &mut tx,
        tenant,
        &EventType::platform(EventType::ARTIFACT_STORED),
        &event_data(&artifact),
    )
    .await?;
    tx.commit().await?;
    wake.after_commit(&state.db);
    state.events.committed(std::slice::from_ref(&event)).await;
    let created = previous.is_none();
    if let Some(previous) = previous {
        discard(state, &StoragePath::raw(&previous)).await;
    }
    Ok((artifact, created))
}

async fn find(state: &AppState, tenant: TenantId, key: &ObjectKey) -> Result<Artifact, ApiError> {
    // From the primary: a replica behind a replace would name an object already deleted.
    let mut tx = scope::begin(state.db.primary(), tenant).await?;
    let artifact = artifacts::get(&mut tx, tenant, key.as_str()).await?;
    scope::end_read(tx);
    artifact.ok_or_else(|| ApiError::not_found("artifact"))
}

fn etag(artifact: &Artifact) -> String {
    format!("\"{}\"", artifact.sha256)
}

/// The headers describing an artifact, on GET and HEAD alike.
fn describe(artifact: &Artifact, headers: &mut HeaderMap) {
    let mut set = |name: HeaderName, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(name, v);
        }
    };
    set(header::CONTENT_TYPE, &artifact.content_type);
    set(header::ETAG, &etag(artifact));
    set(header::ACCEPT_RANGES, "bytes");
    set(
        header::LAST_MODIFIED,
        &artifact
            .updated_at
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string(),
    );
    if let Value::Object(metadata) = &artifact.metadata {
        for (k, v) in metadata {
            if let (Ok(name), Some(v)) = (
                HeaderName::from_bytes(format!("{META_PREFIX}{k}").as_bytes()),
                v.as_str(),
            ) {
                set(name, v);
            }
        }
    }
    if let Value::Object(tags) = &artifact.tags
        && !tags.is_empty()
    {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (k, v) in tags {
            query.append_pair(k, v.as_str().unwrap_or_default());
        }
        set(HeaderName::from_static(TAGS_HEADER), &query.finish());
    }
}

fn not_modified(headers: &HeaderMap, artifact: &Artifact) -> bool {
    let tag = etag(artifact);
    headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .map(|t| t.trim().trim_start_matches("W/"))
                .any(|t| t == "*" || t == tag)
        })
}

/// A single byte range from a `Range` header, as `start..end` (end exclusive) of an object of
/// `size` bytes. `Ok(None)`: no range, or one this server ignores (several ranges, another unit,
/// a malformed header), so the whole object is sent; `Err`: unsatisfiable.
fn byte_range(headers: &HeaderMap, size: u64) -> Result<Option<std::ops::Range<u64>>, ()> {
    let Some(raw) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let Some(spec) = raw.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let parsed = match (first.trim(), last.trim()) {
        ("", "") => return Ok(None),
        ("", suffix) => match suffix.parse::<u64>() {
            Ok(0) => return Err(()),
            Ok(n) => Some(size.saturating_sub(n)..size),
            Err(_) => return Ok(None),
        },
        (start, "") => start.parse::<u64>().ok().map(|s| s..size),
        (start, end) => match (start.parse::<u64>(), end.parse::<u64>()) {
            (Ok(s), Ok(e)) if s <= e => Some(s..e.saturating_add(1).min(size)),
            _ => return Ok(None),
        },
    };
    match parsed {
        Some(r) if r.start < size && r.start < r.end => Ok(Some(r)),
        Some(_) => Err(()),
        None => Ok(None),
    }
}

fn unsatisfiable(size: u64) -> ApiError {
    let error = ApiError::new(
        StatusCode::RANGE_NOT_SATISFIABLE,
        "range_not_satisfiable",
        format!("the artifact has {size} bytes"),
    );
    match HeaderValue::from_str(&format!("bytes */{size}")) {
        Ok(v) => error.with_header(header::CONTENT_RANGE, v),
        Err(_) => error,
    }
}

/// What GET and HEAD start from: the artifact and the headers describing it, or the 304 a
/// matching `If-None-Match` gets.
enum Lookup {
    Found(Box<Artifact>, HeaderMap),
    NotModified(Response),
}

async fn look_up(
    state: &AppState,
    tenant: TenantId,
    key: &ObjectKey,
    request: &HeaderMap,
) -> Result<Lookup, ApiError> {
    let artifact = find(state, tenant, key).await?;
    let mut out = HeaderMap::new();
    describe(&artifact, &mut out);
    if not_modified(request, &artifact) {
        return Ok(Lookup::NotModified(
            (StatusCode::NOT_MODIFIED, out).into_response(),
        ));
    }
    Ok(Lookup::Found(Box::new(artifact), out))
}

#[tracing::instrument(skip_all)]
pub async fn get(
    auth: TenantAuth<Viewer>,
    State(state): State<AppState>,
    AppPath(key): AppPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let key = key_param(&key)?;
    let (artifact, mut out) = match look_up(&state, auth.tenant_id, &key, &headers).await? {
        Lookup::Found(artifact, out) => (artifact, out),
        Lookup::NotModified(response) => return Ok(response),
    };
    let size = u64::try_from(artifact.size).unwrap_or(0);
    let range = match byte_range(&headers, size) {
        Ok(range) => range,
        Err(()) => return Err(unsatisfiable(size)),
    };
    let partial = range.is_some();
    let path = StoragePath::raw(&artifact.storage_path);
    let object = match state.storage.get(&path, range).await {
        Ok(object) => object,
        Err(StorageError::NotFound) => {
            tracing::error!(
                key = key.as_str(),
                path = path.as_str(),
                "an artifact's object is missing"
            );
            return Err(ApiError::not_found("artifact"));
        }
        Err(StorageError::InvalidRange { size }) => return Err(unsatisfiable(size)),
        Err(e) => return Err(storage_error(e)),
    };
    let length = object.range.end - object.range.start;
    if let Ok(v) = HeaderValue::from_str(&length.to_string()) {
        out.insert(header::CONTENT_LENGTH, v);
    }
    let status = if partial {
        let content_range = format!(
            "bytes {}-{}/{size}",
            object.range.start,
            object.range.end.saturating_sub(1)
        );
        if let Ok(v) = HeaderValue::from_str(&content_range) {
            out.insert(header::CONTENT_RANGE, v);
        }
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    let body = Body::from_stream(
        object
            .body
            .map(|chunk| chunk.map_err(std::io::Error::other)),
    );
    let mut response = (status, out, body).into_response();
    // A server that can send from the file directly takes it from here (src/server/download.rs).
    if let Some(span) = object.file {
        response.extensions_mut().insert(span);
    }
    Ok(response)
}

#[tracing::instrument(skip_all)]
pub async fn head(
    auth: TenantAuth<Viewer>,
    State(state): State<AppState>,
    AppPath(key): AppPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let key = key_param(&key)?;
    let (artifact, mut out) = match look_up(&state, auth.tenant_id, &key, &headers).await? {
        Lookup::Found(artifact, out) => (artifact, out),
        Lookup::NotModified(response) => return Ok(response),
    };
    if let Ok(v) = HeaderValue::from_str(&artifact.size.to_string()) {
        out.insert(header::CONTENT_LENGTH, v);
    }
    Ok((StatusCode::OK, out).into_response())
}

#[tracing::instrument(skip_all)]
pub async fn delete(
    auth: TenantAuth<Operator>,
    State(state): State<AppState>,
    AppPath(key): AppPath<String>,
) -> Result<StatusCode, ApiError> {
    let key = key_param(&key)?;
    let tenant = auth.tenant_id;
    let mut tx = scope::begin(state.db.primary(), tenant).await?;
    let artifact = artifacts::delete(&mut tx, tenant, key.as_str())
        .await?
        .ok_or_else(|| ApiError::not_found("artifact"))?;
    let data = json!({"key": artifact.key, "sha256": artifact.sha256, "size": artifact.size});
    let event = events::append(
        &mut tx,
        tenant,
        &EventType::platform(EventType::ARTIFACT_DELETED),
        &data,
    )
    .await?;
    tx.commit().await?;
    state.events.committed(std::slice::from_ref(&event)).await;
    discard(&state, &StoragePath::raw(&artifact.storage_path)).await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    prefix: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyCursor {
    after: String,
}

/// `GET /v1/artifacts?prefix=&limit=&cursor=`, in key order.
#[tracing::instrument(skip_all)]
pub async fn list(
    auth: TenantAuth<Viewer>,
    State(state): State<AppState>,
    AppQuery(query): AppQuery<ListQuery>,
) -> Result<Json<Page<Artifact>>, ApiError> {
    let limit = Limit::parse(query.limit.as_deref()).map_err(ApiError::query)?;
    let cursor: Option<KeyCursor> =
        crate::domain::pagination::decode_cursor(query.cursor.as_deref())
            .map_err(ApiError::query)?;
    let prefix = query.prefix.unwrap_or_default();
    if !prefix.is_empty() {
        StoragePath::prefix(auth.tenant_id, &prefix).map_err(ApiError::query)?;
    }
    let mut tx = scope::begin_read(&state.db, auth.tenant_id).await?;
    let rows = artifacts::list(
        &mut tx,
        auth.tenant_id,
        &prefix,
        cursor.as_ref().map(|c| c.after.as_str()),
        limit.fetch(),
    )
    .await?;
    scope::end_read(tx);
    Ok(Json(Page::from_rows(rows, limit, |a| KeyCursor {
        after: a.key.clone(),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(raw: &str, size: u64) -> Result<Option<std::ops::Range<u64>>, ()> {
        let mut headers = HeaderMap::new();
        headers.insert(header::RANGE, HeaderValue::from_str(raw).unwrap());
        byte_range(&headers, size)
    }

    #[test]
    fn byte_ranges() {
        assert_eq!(range("bytes=0-9", 100), Ok(Some(0..10)));
        assert_eq!(range("bytes=90-", 100), Ok(Some(90..100)));
        assert_eq!(range("bytes=-10", 100), Ok(Some(90..100)));
        assert_eq!(range("bytes=-500", 100), Ok(Some(0..100)));
        assert_eq!(range("bytes=50-500", 100), Ok(Some(50..100)));
        assert_eq!(range("bytes=100-", 100), Err(()));
        assert_eq!(range("bytes=-0", 100), Err(()));
        assert_eq!(range("bytes=0-1,5-6", 100), Ok(None));
        assert_eq!(range("items=0-1", 100), Ok(None));
        assert_eq!(range("bytes=9-1", 100), Ok(None));
        assert_eq!(range("bytes=x-1", 100), Ok(None));
        assert_eq!(range("bytes=0-0", 0), Err(()));
    }
}
