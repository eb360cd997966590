//! Group commit for events that clients publish (`POST /v1/events`).
//!
//! A tenant's appends are serialised on its head row until they commit (migration 000003), so one
//! transaction per published event caps a tenant at one commit round trip per event. Instead,
//! each tenant has a queue: the first publish starts a drain task, and every publish that arrives
//! while a batch is committing waits for the next one, which appends them all with one statement
//! and one commit. Each caller is answered only after its event is durable, as before; under light
//! load a batch is one event and nothing waits.
//!
//! Batches are capped ([`MAX_BATCH`]); if a batch of several fails, its events are retried one by
//! one, so a bad event never takes others down with it.

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::Value;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::db::events::{self, Event};
use crate::db::{DbError, DbResult, tenant as scope};
use crate::domain::event_type::EventType;
use crate::domain::tenant::TenantId;

use super::EventBus;

/// Events appended by one statement at most.
pub const MAX_BATCH: usize = 256;

struct Pending {
    event_type: EventType,
    data: Value,
    reply: oneshot::Sender<DbResult<Event>>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Pending>,
}

/// Per-tenant queues of published events; a tenant has an entry while its drain task runs.
#[derive(Default)]
pub struct Batcher {
    queues: Mutex<HashMap<Uuid, Queue>>,
}

impl Batcher {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Queue>> {
        // Queues hold plain data; a panic elsewhere cannot leave one half-updated.
        self.queues
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues an event; `true` when the tenant has no drain task yet and the caller must start one.
    fn push(
        &self,
        tenant: TenantId,
        event_type: EventType,
        data: Value,
    ) -> (bool, oneshot::Receiver<DbResult<Event>>) {
        let (reply, answer) = oneshot::channel();
        let mut queues = self.lock();
        let start = !queues.contains_key(&tenant.as_uuid());
        queues
            .entry(tenant.as_uuid())
            .or_default()
            .waiting
            .push(Pending {
                event_type,
                data,
                reply,
            });
        (start, answer)
    }

    /// The next batch for the tenant, or `None` (and the entry removed, under the same lock as
    /// [`Batcher::push`], so no event is left behind) when its queue is empty.
    fn next_batch(&self, tenant: TenantId) -> Option<Vec<Pending>> {
        let mut queues = self.lock();
        let queue = queues.get_mut(&tenant.as_uuid())?;
        if queue.waiting.is_empty() {
            queues.remove(&tenant.as_uuid());
            return None;
        }
        let take = queue.waiting.len().min(MAX_BATCH);
        Some(queue.waiting.drain(..take).collect())
    }

    /// Forgets a tenant's queue; callers still waiting get an error instead of hanging.
    fn abandon(&self, tenant: TenantId) {
        self.lock().remove(&tenant.as_uuid());
    }
}

/// Ends a drain task's hold on its tenant's queue even if the task is cancelled or panics, so
/// the next publish starts a new one (and callers still waiting get an error, not a hang).
struct DrainGuard<'a> {
    batcher: &'a Batcher,
    tenant: TenantId,
    finished: bool,
}

impl Drop for DrainGuard<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.batcher.abandon(self.tenant);
        }
    }
}

impl EventBus {
    /// Appends a client's event with the tenant's next batch and returns it once committed (and
    /// handed to subscribers).
    pub async fn publish(
        &self,
        tenant: TenantId,
        event_type: EventType,
        data: Value,
    ) -> DbResult<Event> {
        let (start, answer) = self.batcher.push(tenant, event_type, data);
        if start {
            let bus = self.clone();
            tokio::spawn(async move { bus.drain(tenant).await });
        }
        answer.await.map_err(|_| {
            DbError::Sqlx(sqlx::Error::Protocol(
                "the event batch ended without an answer".into(),
            ))
        })?
    }

    async fn drain(&self, tenant: TenantId) {
        let mut guard = DrainGuard {
            batcher: &self.batcher,
            tenant,
            finished: false,
        };
        while let Some(batch) = self.batcher.next_batch(tenant) {
            let items: Vec<(EventType, Value)> = batch
                .iter()
                .map(|p| (p.event_type.clone(), p.data.clone()))
                .collect();
            let outcome = self.append(tenant, &items).await;
            match outcome {
                Ok(appended) => {
                    for (pending, event) in batch.into_iter().zip(appended) {
                        let _ = pending.reply.send(Ok(event));
                    }
                }
                Err(e) if batch.len() == 1 => {
                    if let Some(pending) = batch.into_iter().next() {
                        let _ = pending.reply.send(Err(e));
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, count = batch.len(), "event batch failed; appending one by one");
                    for (pending, item) in batch.into_iter().zip(items) {
                        let one = self.append(tenant, std::slice::from_ref(&item)).await;
                        let one = one.and_then(|mut one| {
                            one.pop().ok_or(DbError::Sqlx(sqlx::Error::RowNotFound))
                        });
                        let _ = pending.reply.send(one);
                    }
                }
            }
        }
        guard.finished = true;
    }

    /// One transaction appending `items` in order, then handing them to subscribers.
    async fn append(&self, tenant: TenantId, items: &[(EventType, Value)]) -> DbResult<Vec<Event>> {
        let mut tx = scope::begin(self.hub.db().primary(), tenant).await?;
        let appended = events::append_many(&mut tx, tenant, items).await?;
        tx.commit().await?;
        self.committed(&appended).await;
        Ok(appended)
    }
}
