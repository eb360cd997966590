//! `health_snapshot` (cron, hourly by default): records each tenant's health as a
//! `health.snapshot` event: the age of each system's latest state, open violations by severity,
//! jobs waiting or retrying and jobs that died in the last day, with an overall status
//! (`critical` with an open critical violation, `degraded` with any other open violation or a job
//! dead in the last day, else `ok`).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::cron::{Scheduled, Tick};
use super::{Job, JobContext, JobError};
use crate::db::{DbError, events, health, tenant as scope};
use crate::domain::event_type::EventType;
use crate::domain::job::Queue;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HealthSnapshot(pub Tick);

impl From<Tick> for HealthSnapshot {
    fn from(tick: Tick) -> Self {
        Self(tick)
    }
}

impl Scheduled for HealthSnapshot {
    const LOCAL_TIME: bool = false;
}

impl Job for HealthSnapshot {
    const KIND: &'static str = "health_snapshot";
    const QUEUE: Queue = Queue::Default;
    /// A snapshot an hour late is no longer worth taking.
    const MAX_ATTEMPTS: i32 = 5;
    const TIMEOUT: Duration = Duration::from_secs(60);

    async fn run(self, ctx: JobContext) -> Result<Value, JobError> {
        let tenant = ctx.tenant()?;
        let mut tx = scope::begin(ctx.db.primary(), tenant).await?;
        let mut snapshot = health::snapshot(&mut tx, tenant).await?;
        let status = status(&snapshot);
        if let Value::Object(map) = &mut snapshot {
            map.insert("tick".into(), json!(self.0.at));
            map.insert("status".into(), json!(status));
        }
        let event = events::append(
            &mut tx,
            tenant,
            &EventType::platform(EventType::HEALTH_SNAPSHOT),
            &snapshot,
        )
        .await?;
        tx.commit().await.map_err(DbError::from)?;
        ctx.events.committed(std::slice::from_ref(&event)).await;
        Ok(json!({"status": status, "event_id": event.id}))
    }
}

fn status(snapshot: &Value) -> &'static str {
    let count = |section: &str, key: &str| {
        snapshot
            .get(section)
            .and_then(|s| s.get(key))
            .and_then(Value::as_i64)
            .unwrap_or(0)
    };
    if count("open_violations", "critical") > 0 {
        "critical"
    } else if count("open_violations", "warning") + count("open_violations", "info") > 0
        || count("jobs", "dead") > 0
    {
        "degraded"
    } else {
        "ok"
    }
}
