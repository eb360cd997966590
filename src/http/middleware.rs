//! Per-request middleware. The stack, outermost first (built in router.rs):
//!
//! 1. [`drop_unusable_request_id`]: an inbound `X-Request-Id` that is too long or not a plain
//!    token is discarded (it would end up in every log line).
//! 2. `SetRequestId`: keeps an inbound `X-Request-Id` (HAProxy sets one) or generates a UUID.
//! 3. `PropagateRequestId`: echoes it on the response.
//! 4. [`observe`]: the request's context (request id, tenant), its span, the access-log line,
//!    the HTTP metrics, and the rewrite of any bare error answer into problem+json.
//! 5. `CatchPanic`: a panicking handler answers 500 (made problem+json by 4) instead of
//!    dropping the connection.
//! 6. `DefaultBodyLimit`: bodies over HTTP_MAX_BODY_BYTES are refused with 413.
//! 7. `Timeout`, on the `/v1` routes except the event stream: 503 when a handler overruns.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use crate::domain::tenant::TenantId;

use super::error::ApiError;

/// What the layers and the handler learn about one request.
struct RequestContext {
    request_id: String,
    tenant: OnceLock<TenantId>,
}

tokio::task_local! {
    static CONTEXT: Arc<RequestContext>;
}

/// The id of the request being handled on this task, if any.
pub fn current_request_id() -> Option<String> {
    CONTEXT.try_with(|c| c.request_id.clone()).ok()
}

/// Records the authenticated tenant for the access log and the span.
pub fn record_tenant(tenant: TenantId) {
    let _ = CONTEXT.try_with(|c| c.tenant.set(tenant));
    tracing::Span::current().record("tenant_id", tracing::field::display(tenant));
}

pub async fn observe(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let context = Arc::new(RequestContext {
        request_id: request_id.clone(),
        tenant: OnceLock::new(),
    });
    let span = tracing::info_span!(
        "request",
        method,
        route = %route,
        request_id = %request_id,
        tenant_id = tracing::field::Empty,
    );

    let response = CONTEXT
        .scope(context.clone(), async move {
            let response = next.run(request).await;
            problem_if_bare(response)
        })
        .instrument(span.clone())
        .await;

    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    let status_label = status.to_string();
    let labels = [
        ("method", method.to_owned()),
        ("route", route.clone()),
        ("status", status_label),
    ];
    metrics::counter!("http_requests_total", &labels).increment(1);
    metrics::histogram!("http_request_duration_seconds", &labels).record(elapsed.as_secs_f64());

    let _entered = span.enter();
    let tenant = context.tenant.get().map(ToString::to_string);
    tracing::info!(
        target: "access",
        method,
        route = %route,
        status,
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        request_id = %request_id,
        tenant_id = tenant.as_deref().unwrap_or("-"),
        "request"
    );
    response
}

/// Longest inbound request id kept; longer ones are replaced by a generated id.
const MAX_REQUEST_ID_LEN: usize = 128;

pub async fn drop_unusable_request_id(mut request: Request, next: Next) -> Response {
    let usable = request.headers().get("x-request-id").is_none_or(|v| {
        !v.is_empty()
            && v.len() <= MAX_REQUEST_ID_LEN
            && v.as_bytes()
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=".contains(b))
    });
    if !usable {
        request.headers_mut().remove("x-request-id");
    }
    next.run(request).await
}

/// Bounded label values: the standard methods, everything else as `other`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Error answers produced outside our handlers (routing, timeouts, panics, body limits) come
/// without a problem body; give them one, keeping headers such as `Allow` and `Retry-After`.
fn problem_if_bare(response: Response) -> Response {
    let status = response.status();
    // Bare means no body type, or the plain text axum and tower-http put in their rejections.
    // Our own JSON answers (readiness 503, for one) and problems are left alone.
    let bare = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_none_or(|v| v.as_bytes().starts_with(b"text/plain"));
    if !(status.is_client_error() || status.is_server_error()) || !bare {
        return response;
    }
    let (code, detail) = match status {
        StatusCode::NOT_FOUND => ("not_found", "no such route"),
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            "this route does not accept this method",
        ),
        StatusCode::PAYLOAD_TOO_LARGE => (
            "payload_too_large",
            "the request body is larger than this server accepts",
        ),
        StatusCode::REQUEST_TIMEOUT | StatusCode::SERVICE_UNAVAILABLE => (
            "unavailable",
            "the server could not finish this request in time; retry shortly",
        ),
        StatusCode::INTERNAL_SERVER_ERROR => (
            "internal",
            "the server failed to handle this request; it has been logged",
        ),
        s if s.is_server_error() => (
            "unavailable",
            "the server cannot handle this request right now",
        ),
        _ => ("bad_request", "the request could not be handled"),
    };
    let (parts, _) = response.into_parts();
    let mut fresh = ApiError::new(status, code, detail).into_response();
    for name in [header::ALLOW, header::RETRY_AFTER, header::WWW_AUTHENTICATE] {
        if let Some(value) = parts.headers.get(&name) {
            fresh.headers_mut().insert(name, value.clone());
        }
    }
    fresh
}
