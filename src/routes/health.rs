//! Health endpoints: `/health` (cheap), `/health/live` (the process runs), `/health/ready`
//! (the database answers and shutdown has not begun).

use std::time::Duration;

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
    let database = !draining && state.db.ping_primary(Duration::from_secs(2)).await;
    let check = |ok: bool, failure: &str| {
        if ok {
            json!({"status": "ok"})
        } else {
            json!({"status": "fail", "reason": failure})
        }
    };
    let body = json!({
        "status": if database && !draining { "ok" } else { "fail" },
        "checks": {
            "shutdown": check(!draining, "the server is shutting down"),
            "database": if draining { json!({"status": "skipped"}) } else { check(database, "the database did not answer within 2s") },
        }
    });
    let status = if database && !draining {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}
