//! Wakes the job pools (theirs LISTEN on [`NOTIFY_CHANNEL`]) after jobs were committed: by a
//! caller's transaction ([`crate::jobs::Wake::after_commit`]), by the standalone enqueue and by the
//! Telegram intake.
//!
//! The NOTIFY is not part of the enqueuing transaction. PostgreSQL lets only one notifying
//! transaction commit at a time, and holds that turn through the commit's flush to disk, so a
//! NOTIFY inside every enqueue would line all enqueuers up behind one another's fsync. Instead the
//! enqueue commits alone (concurrent ones share flushes), returns, and asks this waker; the waker
//! sends one NOTIFY per queue for everything asked since its last one, in a transaction that has
//! nothing to flush (`synchronous_commit = off`). A wake-up that is lost (the database went away
//! between the two) only delays pickup until the pools' next poll.
//!
//! [`NOTIFY_CHANNEL`]: super::jobs::NOTIFY_CHANNEL

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::Notify;

use crate::domain::job::Queue;

#[derive(Clone)]
pub struct JobWaker {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    pending: [AtomicBool; Queue::ALL.len()],
    signal: Notify,
    started: AtomicBool,
}

impl JobWaker {
    pub fn new(pool: PgPool) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                pending: std::array::from_fn(|_| AtomicBool::new(false)),
                signal: Notify::new(),
                started: AtomicBool::new(false),
            }),
        }
    }

    /// Asks for the pools to be woken for `queue`; returns at once.
    pub fn wake(&self, queue: Queue) {
        self.inner.pending[queue.index()].store(true, Ordering::Release);
        if !self.inner.started.swap(true, Ordering::AcqRel) {
            tokio::spawn(run(self.inner.clone()));
        }
        self.inner.signal.notify_one();
    }
}

async fn run(inner: Arc<Inner>) {
    loop {
        // Every second, whether asked or not, to notice that nothing else holds the waker.
        let _ = tokio::time::timeout(Duration::from_secs(1), inner.signal.notified()).await;
        let queues: Vec<&str> = Queue::ALL
            .iter()
            .filter(|q| inner.pending[q.index()].swap(false, Ordering::AcqRel))
            .map(|q| q.as_str())
            .collect();
        if !queues.is_empty() {
            // Both names are fixed identifiers: the channel a constant, the queues the enum's.
            let notifies: Vec<String> = queues
                .iter()
                .map(|q| format!("pg_notify('{}', '{q}')", super::jobs::NOTIFY_CHANNEL))
                .collect();
            let sql = format!(
                "set local synchronous_commit = off; select {}",
                notifies.join(", ")
            );
            if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&inner.pool)
                .await
            {
                tracing::debug!(error = %e, "waking the job pools failed; they find the jobs by polling");
            }
        }
        if Arc::strong_count(&inner) == 1 {
            return;
        }
    }
}
