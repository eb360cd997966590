//! Health endpoints: `/health` (cheap), `/health/live` (the process runs), `/health/ready`
//! (the database answers, as a role row-level security binds, and shutdown has not begun).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::state::AppState;

pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn live() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let draining = state.shutdown.is_cancelled();
    let database = if draining {
        json!({"status": "skipped"})
    } else if state.db.answers().await {
        json!({"status": "ok"})
    } else {
        json!({"status": "fail", "reason": "the database did not answer within 2s (or refused this role; see the server log)"})
    };
    let shutdown = if draining {
        json!({"status": "fail", "reason": "the server is shutting down"})
    } else {
        json!({"status": "ok"})
    };
    let ok = !draining && database["status"] == "ok";
    let body = json!({
        "status": if ok { "ok" } else { "fail" },
        "checks": {"shutdown": shutdown, "database": database},
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}
