//! Gathers the updates that arrive at the same time into one enqueue, so a burst of updates costs
//! one statement and one commit per batch rather than one per update. The acknowledgement still
//! waits for its own update to be committed: nothing is answered 200 before it is durable.
//!
//! A few tasks take turns: each takes everything waiting (up to [`MAX_BATCH`]) and enqueues it,
//! so while one batch commits the next one fills. An idle intake adds no delay: a lone update is
//! a batch of one at once.

use std::sync::Arc;

use serde_json::Value;
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::db::Db;
use crate::db::telegram::enqueue_platform_batch;
use crate::jobs::Job;
use crate::jobs::telegram_update::TelegramUpdate;

/// Updates enqueued in one statement at most.
pub const MAX_BATCH: usize = 256;
/// Batches in flight at once.
const TASKS: usize = 4;
/// Updates waiting for a batch beyond which the intake answers "busy" (Telegram sends them again).
const QUEUE: usize = 8192;

/// What enqueueing an update did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    Created,
    /// The update's key was taken: a redelivery.
    Duplicate,
}

/// Why an update was not enqueued (it was not stored: Telegram should send it again).
#[derive(Debug, Clone, thiserror::Error)]
pub enum IntakeError {
    #[error("too many updates are waiting to be stored")]
    Busy,
    #[error("the updates could not be stored: {0}")]
    Database(String),
}

struct Pending {
    args: Value,
    key: String,
    done: oneshot::Sender<Result<Enqueued, IntakeError>>,
}

#[derive(Clone)]
pub struct Intake {
    queue: mpsc::Sender<Pending>,
}

impl Intake {
    /// Starts the batching tasks (they end when every `Intake` clone is dropped).
    pub fn start(db: Db) -> Self {
        let (queue, receiver) = mpsc::channel(QUEUE);
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..TASKS {
            let receiver = receiver.clone();
            let db = db.clone();
            tokio::spawn(async move {
                loop {
                    let mut batch = Vec::new();
                    {
                        let mut receiver = receiver.lock().await;
                        if receiver.recv_many(&mut batch, MAX_BATCH).await == 0 {
                            return;
                        }
                    }
                    store(&db, batch).await;
                }
            });
        }
        Self { queue }
    }

    /// Enqueues the update's job and waits until it is committed.
    pub async fn submit(&self, update: &TelegramUpdate) -> Result<Enqueued, IntakeError> {
        let args = serde_json::to_value(update)
            .map_err(|e| IntakeError::Database(format!("cannot encode the update: {e}")))?;
        let (done, outcome) = oneshot::channel();
        let pending = Pending {
            args,
            key: format!("telegram:update:{}", update.update_id),
            done,
        };
        self.queue
            .try_send(pending)
            .map_err(|_| IntakeError::Busy)?;
        outcome
            .await
            .unwrap_or_else(|_| Err(IntakeError::Database("the intake stopped".into())))
    }
}

async fn store(db: &Db, batch: Vec<Pending>) {
    let jobs: Vec<(Value, String)> = batch
        .iter()
        .map(|p| (p.args.clone(), p.key.clone()))
        .collect();
    #[allow(clippy::cast_precision_loss)]
    metrics::histogram!("telegram_intake_batch_size").record(jobs.len() as f64);
    let result = enqueue_platform_batch(
        db,
        TelegramUpdate::KIND,
        TelegramUpdate::QUEUE,
        TelegramUpdate::MAX_ATTEMPTS,
        &jobs,
    )
    .await;
    match result {
        Ok(outcomes) => {
            for (pending, (_, created)) in batch.into_iter().zip(outcomes) {
                let outcome = if created {
                    Enqueued::Created
                } else {
                    Enqueued::Duplicate
                };
                let _ = pending.done.send(Ok(outcome));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, updates = batch.len(), "storing Telegram updates failed; Telegram will send them again");
            let message = e.to_string();
            for pending in batch {
                let _ = pending
                    .done
                    .send(Err(IntakeError::Database(message.clone())));
            }
        }
    }
}
