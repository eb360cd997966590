//! Extractors: JSON, path and query wrappers whose rejections answer problem+json, and the
//! authentication extractors. A handler states the role it needs in its signature:
//! `auth: TenantAuth<Operator>`.

use std::marker::PhantomData;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::db::api_keys;
use crate::domain::api_key::{hash_secret, looks_like_key};
use crate::domain::role::Role;
use crate::domain::tenant::TenantId;
use crate::state::AppState;

use super::error::ApiError;
use super::middleware::record_tenant;

/// A JSON body. Syntax errors answer 400, shape errors 422, a missing content type 415 and an
/// oversize body 413.
pub struct AppJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for AppJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::JsonDataError(e) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            e.body_text(),
        ),
        JsonRejection::JsonSyntaxError(e) => {
            ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", e.body_text())
        }
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the body must be JSON with Content-Type: application/json",
        ),
        JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the request body is larger than this server accepts",
            )
        }
        other => ApiError::new(StatusCode::BAD_REQUEST, "bad_request", other.body_text()),
    }
}

/// Path parameters; a malformed one (say, a bad UUID) answers 400.
pub struct AppPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for AppPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(Self(value)),
            Err(rejection) => Err(path_rejection(rejection)),
        }
    }
}

fn path_rejection(rejection: PathRejection) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_path_parameter",
        rejection.body_text(),
    )
}

/// Query parameters; a malformed query string answers 400.
pub struct AppQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for AppQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(query_rejection(rejection)),
        }
    }
}

fn query_rejection(rejection: QueryRejection) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_query",
        rejection.body_text(),
    )
}

/// A role a route requires, as a type.
pub trait RequiredRole {
    const ROLE: Role;
}

pub struct Viewer;
pub struct Operator;
pub struct Admin;

impl RequiredRole for Viewer {
    const ROLE: Role = Role::Viewer;
}
impl RequiredRole for Operator {
    const ROLE: Role = Role::Operator;
}
impl RequiredRole for Admin {
    const ROLE: Role = Role::Admin;
}

/// A caller holding a valid tenant API key with at least role `R`.
pub struct TenantAuth<R> {
    pub tenant_id: TenantId,
    pub key_id: Uuid,
    pub role: Role,
    required: PhantomData<R>,
}

impl<R: RequiredRole> FromRequestParts<AppState> for TenantAuth<R> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        Self::from_token(state, bearer_token(parts)?).await
    }
}

impl<R: RequiredRole> TenantAuth<R> {
    /// Authenticates a tenant key however it arrived (header, or a query parameter where a
    /// browser cannot set headers).
    pub async fn from_token(state: &AppState, token: &str) -> Result<Self, ApiError> {
        if is_admin_token(state, token) {
            return Err(ApiError::forbidden(
                "the platform admin token manages tenants only; use a tenant API key here",
            ));
        }
        let owner = authenticate_key(state, token)
            .await?
            .ok_or_else(|| ApiError::unauthorized("the API key is invalid or revoked"))?;
        record_tenant(owner.tenant_id);
        if !owner.role.allows(R::ROLE) {
            return Err(ApiError::forbidden(format!(
                "this needs a key with the {} role; this key has {}",
                R::ROLE.as_str(),
                owner.role.as_str()
            )));
        }
        Ok(Self {
            tenant_id: owner.tenant_id,
            key_id: owner.key_id,
            role: owner.role,
            required: PhantomData,
        })
    }
}

/// A caller holding the platform admin token (`ADMIN_TOKEN`).
pub struct PlatformAdmin;

impl FromRequestParts<AppState> for PlatformAdmin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer_token(parts)?;
        if is_admin_token(state, token) {
            return Ok(Self);
        }
        if authenticate_key(state, token).await?.is_some() {
            return Err(ApiError::forbidden(
                "tenant API keys cannot manage tenants; this needs the platform admin token",
            ));
        }
        Err(ApiError::unauthorized(
            "the platform admin token is invalid",
        ))
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
pub fn bearer_token(parts: &Parts) -> Result<&str, ApiError> {
    bearer_token_from(&parts.headers)
}

/// [`bearer_token`] from a header map.
pub fn bearer_token_from(headers: &axum::http::HeaderMap) -> Result<&str, ApiError> {
    let header = headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| {
            ApiError::unauthorized("missing credentials: send Authorization: Bearer <key>")
        })?;
    let value = header
        .to_str()
        .map_err(|_| ApiError::unauthorized("the Authorization header is not valid text"))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or_else(|| ApiError::unauthorized("the Authorization header must be 'Bearer <key>'"))?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(ApiError::unauthorized(
            "the Authorization header must be 'Bearer <key>'",
        ));
    }
    Ok(token)
}

fn is_admin_token(state: &AppState, token: &str) -> bool {
    state
        .config
        .admin_token
        .as_ref()
        .is_some_and(|admin| secrets_match(token, admin.expose()))
}

/// Constant-time comparison of a presented token with a configured one. Comparing digests makes
/// the time independent of both contents and lengths.
pub fn secrets_match(given: &str, expected: &str) -> bool {
    Sha256::digest(given.as_bytes())
        .ct_eq(&Sha256::digest(expected.as_bytes()))
        .into()
}

async fn authenticate_key(
    state: &AppState,
    token: &str,
) -> Result<Option<api_keys::KeyOwner>, ApiError> {
    if !looks_like_key(token) {
        return Ok(None);
    }
    Ok(state
        .keys
        .authenticate(state.db.primary(), &hash_secret(token))
        .await?)
}
