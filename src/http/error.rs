//! `ApiError`: every error answer is RFC 9457 `application/problem+json` with a stable `code`
//! (registry in docs/errors.md) and the request id. 5xx bodies never carry internals: the cause
//! is logged, the client sees a generic detail.

use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::db::DbError;
use crate::domain::ParseError;

use super::middleware::current_request_id;

pub const PROBLEM_JSON: &str = "application/problem+json";

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    detail: String,
    /// Extra headers (WWW-Authenticate, Retry-After); rarely more than one.
    headers: Vec<(HeaderName, HeaderValue)>,
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
    code: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<String>,
}

impl ApiError {
    /// What went wrong, as the problem's `detail` says it.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
            headers: Vec::new(),
        }
    }

    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
            .with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))
    }

    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", detail)
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", detail)
    }

    /// A body field failed validation.
    pub fn validation(e: ParseError) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            e.to_string(),
        )
    }

    /// A query parameter failed validation.
    pub fn query(e: ParseError) -> Self {
        let code = if e.field == "cursor" {
            "invalid_cursor"
        } else {
            "invalid_query"
        };
        Self::new(StatusCode::BAD_REQUEST, code, e.to_string())
    }

    /// A path parameter failed validation.
    pub fn path(e: ParseError) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_path_parameter",
            e.to_string(),
        )
    }

    /// Something failed on our side: the cause goes to the log, not to the client.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, request_id = current_request_id().as_deref(), "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the server failed to handle this request; it has been logged",
        )
    }

    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail)
    }

    fn title(&self) -> &'static str {
        self.status.canonical_reason().unwrap_or("Error")
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::UniqueViolation { constraint } => {
                let what = match constraint.as_str() {
                    "tenants_slug_key" => "a tenant with this slug already exists",
                    "policies_tenant_id_name_key" => "a policy with this name already exists",
                    "notification_channels_tenant_id_name_key" => {
                        "a notification channel with this name already exists"
                    }
                    _ => "this resource already exists",
                };
                Self::conflict(what)
            }
            DbError::Sqlx(e) if crate::db::is_connection_error(&e) => {
                tracing::error!(error = %e, request_id = current_request_id().as_deref(), "database unreachable");
                Self::unavailable("the database is unreachable; retry shortly")
                    .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))
            }
            // Class 22 (data exception): a value from the request the database cannot store,
            // such as text with NUL or a number out of range. The client's doing, not ours.
            DbError::Sqlx(sqlx::Error::Database(db))
                if db.code().is_some_and(|c| c.starts_with("22")) =>
            {
                tracing::warn!(error = %db, request_id = current_request_id().as_deref(), "database refused a value");
                Self::validation(ParseError::new(
                    "body",
                    "a value in the request cannot be stored (for example text containing NUL)",
                ))
            }
            DbError::Sqlx(e) => Self::internal(&e),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        DbError::from(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Problem {
            kind: format!("urn:cybernetic:problem:{}", self.code),
            title: self.title(),
            status: self.status.as_u16(),
            detail: &self.detail,
            code: self.code,
            request_id: current_request_id(),
        };
        // Serialising a struct of strings and integers cannot fail.
        let json = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = (self.status, json).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        for (name, value) in self.headers {
            response.headers_mut().insert(name, value);
        }
        response
    }
}
