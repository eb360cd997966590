//! `GET /metrics`: Prometheus text format, rate-limited, and behind `METRICS_TOKEN` when set.

use std::num::NonZeroU32;

use crate::http::error::ApiError;
use crate::http::extract::{bearer_token, secrets_match};
use crate::state::AppState;
use axum::extract::State;
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use metrics_exporter_prometheus::PrometheusHandle;

pub struct MetricsEndpoint {
    handle: PrometheusHandle,
    limiter: DefaultDirectRateLimiter,
    process: metrics_process::Collector,
}

impl MetricsEndpoint {
    pub fn new(handle: PrometheusHandle, per_second: u32) -> Self {
        let process = metrics_process::Collector::default();
        process.describe();
        let rate = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
        Self {
            handle,
            limiter: RateLimiter::direct(Quota::per_second(rate)),
            process,
        }
    }

    pub fn handle(&self) -> PrometheusHandle {
        self.handle.clone()
    }
}

pub async fn render(State(state): State<AppState>, parts: Parts) -> Result<Response, ApiError> {
    if let Some(token) = &state.config.metrics.token {
        let given = bearer_token(&parts).unwrap_or_default();
        if !secrets_match(given, token.expose()) {
            return Err(ApiError::unauthorized(
                "/metrics needs the metrics bearer token",
            ));
        }
    }
    let endpoint = &state.metrics;
    if endpoint.limiter.check().is_err() {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "/metrics is scraped too often; slow down",
        )
        .with_header(header::RETRY_AFTER, HeaderValue::from_static("1")));
    }
    state.db.record_pool_metrics();
    endpoint.process.collect();
    let body = endpoint.handle.render();
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        body,
    )
        .into_response())
}
