//! Group commit for standalone enqueues ([`crate::jobs::enqueue_alone`]): jobs without an
//! idempotency key that belong to no other write, enqueued by concurrent callers of one process,
//! are inserted together by one statement that commits once (`enqueue_jobs`, migration 000012).
//! A job with a key is inserted on its own ([`super::jobs::insert_alone`]): its insert may wait
//! for another transaction holding the same key, and must not make the others wait with it.
//!
//! A caller that finds fewer than [`MAX_DRAINS`] batches committing starts a drain task, and waits
//! for its answer like every other caller. A drain task takes everything waiting (up to
//! [`MAX_BATCH`]), inserts it, answers each caller, and goes on while more arrived meanwhile.
//! Under light load a batch is one job; under load, callers that arrive while batches commit share
//! the next commit, instead of each paying a statement and a flush of its own and queueing for the
//! CPU and the WAL behind the others. One batch commits at a time: with two at once, eight
//! producers on two cores waited longer (p99 2.9 against 2.1 ms), each statement now competing
//! with the other for the CPU.
//!
//! Each caller is answered only once its job is committed. A job whose caller has gone before its
//! batch starts is dropped, never inserted. If the database refuses a batch of several for its
//! data, its jobs are inserted one by one, so a bad job never takes others down with it; any other
//! failure (the database away, a commit whose outcome is unknown) is answered to every caller in
//! the batch and never retried here.

use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::domain::job::Queue;
use crate::domain::tenant::TenantId;

use super::{DbError, DbResult};

/// Jobs inserted by one statement at most.
pub const MAX_BATCH: usize = 256;
/// Batches committing at once at most (see above).
pub const MAX_DRAINS: usize = 1;

/// One job waiting for its batch, owned so it can outlive the caller's borrow.
#[derive(Debug, Clone)]
pub struct QueuedJob {
    pub tenant: TenantId,
    pub kind: String,
    pub queue: Queue,
    pub args: Value,
    pub priority: i16,
    pub max_attempts: i32,
    /// `None`: due now.
    pub run_at: Option<DateTime<Utc>>,
}

struct Pending {
    id: Uuid,
    job: QueuedJob,
    reply: oneshot::Sender<DbResult<Uuid>>,
}

#[derive(Default)]
struct State {
    waiting: Vec<Pending>,
    /// Drain tasks running; each takes whatever is waiting before it stops.
    drains: usize,
}

#[derive(Clone)]
pub struct Enqueuer {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    state: Mutex<State>,
}

impl Enqueuer {
    pub fn new(pool: PgPool) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                state: Mutex::default(),
            }),
        }
    }

    /// Inserts `job` with the jobs of the next batch; returns its id once the batch has
    /// committed.
    pub async fn enqueue(&self, job: QueuedJob) -> DbResult<Uuid> {
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut state = self.inner.lock();
            state.waiting.push(Pending {
                id: Uuid::now_v7(),
                job,
                reply,
            });
            let start = state.drains < MAX_DRAINS;
            if start {
                state.drains += 1;
            }
            start
        };
        if start {
            // A task of its own: a caller that goes away (its request cancelled) never strands
            // the jobs of others. The guard exists before the task does, so a task dropped
            // before it first runs still ends its drain.
            let guard = DrainGuard {
                inner: self.inner.clone(),
                finished: false,
            };
            tokio::spawn(drain(guard));
        }
        answer.await.unwrap_or_else(|_| {
            Err(DbError::Sqlx(sqlx::Error::Protocol(
                "the enqueue batch ended without an answer".into(),
            )))
        })
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state holds plain data; a panic elsewhere cannot leave it half-updated.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next batch, or `None` (and this drain over, under the same lock as a push, so no job
    /// is left behind) when nothing is waiting. Jobs whose caller has gone are dropped.
    fn next_batch(&self) -> Option<Vec<Pending>> {
        let mut state = self.lock();
        state.waiting.retain(|p| !p.reply.is_closed());
        if state.waiting.is_empty() {
            state.drains = state.drains.saturating_sub(1);
            return None;
        }
        let take = state.waiting.len().min(MAX_BATCH);
        Some(state.waiting.drain(..take).collect())
    }
}

/// Ends a drain whose task stops without finishing (a panic, or the task dropped before it ran):
/// if no other drain is left, the callers still waiting get an error instead of hanging; the next
/// enqueue starts a new drain.
struct DrainGuard {
    inner: Arc<Inner>,
    finished: bool,
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut state = self.inner.lock();
        state.drains = state.drains.saturating_sub(1);
        if state.drains == 0 {
            state.waiting.clear();
        }
    }
}

async fn drain(mut guard: DrainGuard) {
    while let Some(batch) = guard.inner.next_batch() {
        commit(&guard.inner.pool, batch).await;
    }
    guard.finished = true;
}

/// Inserts one batch and answers each of its callers.
async fn commit(pool: &PgPool, batch: Vec<Pending>) {
    let rows: Vec<(Uuid, &QueuedJob)> = batch.iter().map(|p| (p.id, &p.job)).collect();
    match insert(pool, &rows).await {
        Ok(()) => {
            for pending in batch {
                let _ = pending.reply.send(Ok(pending.id));
            }
        }
        Err(e) if batch.len() > 1 && e.concerns_data() => {
            tracing::debug!(error = %e, count = batch.len(), "enqueue batch refused; inserting one by one");
            for pending in batch {
                let one = insert(pool, &[(pending.id, &pending.job)]).await;
                let _ = pending.reply.send(one.map(|()| pending.id));
            }
        }
        Err(e) => {
            if batch.len() > 1 {
                tracing::warn!(error = %e, count = batch.len(), "enqueue batch failed");
            }
            let mut batch = batch.into_iter();
            if let Some(first) = batch.next() {
                for pending in batch {
                    let _ = pending.reply.send(Err(e.replicate()));
                }
                let _ = first.reply.send(Err(e));
            }
        }
    }
}

/// One `enqueue_jobs` call: the rows inserted and committed together, or none of them.
async fn insert(pool: &PgPool, rows: &[(Uuid, &QueuedJob)]) -> DbResult<()> {
    let tenants: Vec<Uuid> = rows.iter().map(|(_, j)| j.tenant.as_uuid()).collect();
    let ids: Vec<Uuid> = rows.iter().map(|(id, _)| *id).collect();
    let kinds: Vec<&str> = rows.iter().map(|(_, j)| j.kind.as_str()).collect();
    let queues: Vec<&str> = rows.iter().map(|(_, j)| j.queue.as_str()).collect();
    let priorities: Vec<i16> = rows.iter().map(|(_, j)| j.priority).collect();
    let args: Vec<&Value> = rows.iter().map(|(_, j)| &j.args).collect();
    let max_attempts: Vec<i32> = rows.iter().map(|(_, j)| j.max_attempts).collect();
    let run_at: Vec<Option<DateTime<Utc>>> = rows.iter().map(|(_, j)| j.run_at).collect();
    let (inserted,): (i32,) = sqlx::query_as("select enqueue_jobs($1, $2, $3, $4, $5, $6, $7, $8)")
        .bind(&tenants)
        .bind(&ids)
        .bind(&kinds)
        .bind(&queues)
        .bind(&priorities)
        .bind(&args)
        .bind(&max_attempts)
        .bind(&run_at)
        .fetch_one(pool)
        .await?;
    if usize::try_from(inserted).ok() != Some(rows.len()) {
        return Err(DbError::Sqlx(sqlx::Error::Protocol(format!(
            "enqueue_jobs inserted {inserted} of {} jobs",
            rows.len()
        ))));
    }
    Ok(())
}
