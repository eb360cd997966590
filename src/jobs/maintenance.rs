//! Upkeep every pool runs: finished jobs pruned in batches (completed ones after `JOB_RETENTION`,
//! dead and cancelled ones after 30 days), Telegram chats' rate-limit state dropped once it has
//! run out, and the `jobs{queue,state}` gauge refreshed.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::db::{Db, DbResult, jobs as store};
use crate::domain::job::{JobState, Queue};

const PRUNE_BATCH: i32 = 1000;
const PRUNE_INTERVAL: Duration = Duration::from_secs(60);
const COUNT_INTERVAL: Duration = Duration::from_secs(15);
/// How long dead and cancelled jobs are kept for inspection and manual retry.
pub const FAILED_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// States the gauge reports; finished ones only grow until pruned and are left out.
const COUNTED: [JobState; 5] = [
    JobState::Scheduled,
    JobState::Available,
    JobState::Running,
    JobState::Retrying,
    JobState::Dead,
];

pub fn spawn(db: Db, retention: Duration, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut prune_tick = tokio::time::interval(PRUNE_INTERVAL);
        prune_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut count_tick = tokio::time::interval(COUNT_INTERVAL);
        count_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = prune_tick.tick() => {
                    if let Err(e) = prune(&db, retention, FAILED_RETENTION, &shutdown).await {
                        tracing::warn!(error = %e, "job retention failed; retrying next interval");
                    }
                    if let Err(e) = crate::db::telegram::prune_limits(db.primary(), PRUNE_BATCH).await {
                        tracing::debug!(error = %e, "pruning chat limits failed; retrying next interval");
                    }
                }
                _ = count_tick.tick() => {
                    if let Err(e) = count(&db).await {
                        tracing::debug!(error = %e, "counting jobs failed");
                    }
                }
            }
        }
    });
}

/// Deletes finished jobs past their retention, a batch per statement; returns how many.
pub async fn prune(
    db: &Db,
    completed: Duration,
    failed: Duration,
    shutdown: &CancellationToken,
) -> DbResult<u64> {
    let now = chrono::Utc::now();
    let before = |age: Duration| {
        chrono::Duration::from_std(age)
            .ok()
            .and_then(|age| now.checked_sub_signed(age))
            .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC)
    };
    let mut total = 0u64;
    loop {
        let deleted =
            store::prune(db.primary(), before(completed), before(failed), PRUNE_BATCH).await?;
        let deleted = u64::try_from(deleted).unwrap_or(0);
        total += deleted;
        metrics::counter!("jobs_pruned_total").increment(deleted);
        if deleted < u64::try_from(PRUNE_BATCH).unwrap_or(0) || shutdown.is_cancelled() {
            return Ok(total);
        }
    }
}

async fn count(db: &Db) -> DbResult<()> {
    let rows = store::counts(db.primary()).await?;
    for queue in Queue::ALL {
        for state in COUNTED {
            let n = rows
                .iter()
                .find(|(q, s, _)| q == queue.as_str() && s == state.as_str())
                .map_or(0, |(_, _, n)| *n);
            #[allow(clippy::cast_precision_loss)]
            metrics::gauge!("jobs", "queue" => queue.as_str(), "state" => state.as_str())
                .set(n as f64);
        }
    }
    Ok(())
}
