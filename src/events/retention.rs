//! Retention: events older than `EVENT_RETENTION` are deleted in small batches, each its own
//! short statement, so pruning never holds long locks or long transactions.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::db::{Db, events};

const BATCH: i32 = 1000;
const INTERVAL: Duration = Duration::from_secs(60);

pub fn spawn(db: Db, retention: Duration, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let Ok(age) = chrono::Duration::from_std(retention) else {
                return;
            };
            let cutoff = chrono::Utc::now() - age;
            loop {
                match events::prune(db.primary(), cutoff, BATCH).await {
                    Ok(deleted) => {
                        metrics::counter!("events_pruned_total")
                            .increment(u64::try_from(deleted).unwrap_or(0));
                        if deleted < BATCH || shutdown.is_cancelled() {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "event retention failed; retrying next interval");
                        break;
                    }
                }
            }
        }
    });
}
