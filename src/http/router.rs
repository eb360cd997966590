//! Every route, in one place, and the middleware stack around them (order documented in
//! middleware.rs).

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{delete, get, patch, post, put};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;

use crate::routes::{
    api_keys, artifacts, episodes, events, health, jobs, metrics, notification_channels, policies,
    reflections, systems, telegram, tenants, webhooks,
};
use crate::state::AppState;

use super::error::ApiError;
use super::middleware;

pub fn build(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/tenants", post(tenants::create).get(tenants::list))
        .route("/v1/tenants/{id}", patch(tenants::update))
        .route("/v1/tenants/{id}/api-keys", post(tenants::create_api_key))
        .route("/v1/api-keys", get(api_keys::list).post(api_keys::create))
        .route("/v1/api-keys/{id}", delete(api_keys::revoke))
        .route("/v1/events/history", get(events::history))
        .route("/v1/systems", get(systems::latest_all))
        .route(
            "/v1/systems/{system}/state",
            put(systems::record).get(systems::latest),
        )
        .route("/v1/systems/{system}/history", get(systems::history))
        .route("/v1/episodes", post(episodes::create).get(episodes::list))
        .route("/v1/episodes/{id}", get(episodes::get))
        .route("/v1/jobs", get(jobs::list))
        .route("/v1/jobs/{id}", get(jobs::get))
        .route("/v1/jobs/{id}/retry", post(jobs::retry))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/v1/policies", post(policies::create).get(policies::list))
        .route(
            "/v1/policies/{id}",
            get(policies::get)
                .put(policies::replace)
                .delete(policies::delete),
        )
        .route("/v1/artifacts", get(artifacts::list))
        .route("/telegram/webhook", post(telegram::webhook))
        .route("/v1/telegram/link-codes", post(telegram::create_link_code))
        .route("/v1/telegram/chats", get(telegram::list_chats))
        .route(
            "/v1/telegram/chats/{chat_id}",
            delete(telegram::delete_chat),
        )
        .route("/v1/notifications", get(telegram::list_notifications))
        .route("/v1/violations", get(reflections::violations))
        .route("/v1/reflections", get(reflections::list))
        .route("/v1/reflections/{id}", get(reflections::get))
        .route(
            "/v1/notification-channels",
            post(notification_channels::create).get(notification_channels::list),
        )
        .route(
            "/v1/notification-channels/{id}",
            get(notification_channels::get)
                .patch(notification_channels::update)
                .delete(notification_channels::delete),
        )
        .route(
            "/v1/webhook-sources",
            post(webhooks::create).get(webhooks::list),
        )
        .route(
            "/v1/webhook-sources/{id}",
            get(webhooks::get)
                .patch(webhooks::update)
                .delete(webhooks::delete),
        )
        .route("/v1/webhook-sources/{id}/rotate", post(webhooks::rotate))
        .route("/v1/webhooks/{source}", post(webhooks::receive))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            state.config.http.request_timeout,
        ));

    // Streams stay open for as long as the client wants: no handler timeout.
    let streams = Router::new().route(
        "/v1/events",
        get(events::stream).merge(post(events::publish).layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            state.config.http.request_timeout,
        ))),
    );

    // Uploads and downloads take as long as their size needs: no handler timeout, and the body
    // limit is the artifact's own (STORAGE_MAX_BYTES, checked while streaming).
    let files = Router::new().route(
        "/v1/artifacts/{*key}",
        put(artifacts::put)
            .get(artifacts::get)
            .head(artifacts::head)
            .delete(artifacts::delete),
    );

    with_middleware(
        Router::new()
            .merge(api)
            .merge(streams)
            .merge(files)
            .merge(ops()),
        state,
    )
}

/// What `cybernetic worker` serves: health and metrics only.
pub fn build_ops(state: AppState) -> Router {
    with_middleware(ops(), state)
}

fn ops() -> Router<AppState> {
    Router::new()
        .route("/health", get(health::health))
        .route("/health/live", get(health::live))
        .route("/health/ready", get(health::ready))
        .route("/metrics", get(metrics::render))
}

fn with_middleware(routes: Router<AppState>, state: AppState) -> Router {
    routes
        // Wrong methods get axum's 405 with its Allow header; observe() gives it a problem body.
        .fallback(not_found)
        .layer(
            ServiceBuilder::new()
                .layer(axum::middleware::from_fn(
                    middleware::drop_unusable_request_id,
                ))
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(PropagateRequestIdLayer::x_request_id())
                .layer(axum::middleware::from_fn(middleware::observe))
                .layer(CatchPanicLayer::new())
                .layer(DefaultBodyLimit::max(state.config.http.max_body_bytes)),
        )
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

pub fn describe_metrics() {
    ::metrics::describe_counter!(
        "http_requests_total",
        "HTTP requests answered, by method, route template and status."
    );
    ::metrics::describe_histogram!(
        "http_request_duration_seconds",
        ::metrics::Unit::Seconds,
        "Time from receiving a request to its response head, by method, route template and status."
    );
}
