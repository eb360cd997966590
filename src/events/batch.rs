//! Group commit for events that clients publish (`POST /v1/events`).
//!
//! A tenant's appends are serialised on its head row until they commit (migration 000003), so one
//! transaction per published event caps a tenant at one commit round trip per event. Instead,
//! each tenant has a queue. A publish that finds it idle leads: it takes the queue's first batch
//! (its event, and any that joined meanwhile) and commits it (itself when its event is alone in
//! the batch, otherwise through a drain task); events that arrive while a batch commits wait for
//! the next one, which a drain task appends with one statement and one commit. Each caller is
//! answered only after its event is durable; under light load a batch is one event committed by
//! its own request, with no other task involved. A batch holding other callers' events is always
//! committed by a task no request can cancel, so a caller is never told its event failed when it
//! may have committed.
//!
//! Batches are capped ([`MAX_BATCH`]), and so is what a tenant may have waiting ([`MAX_WAITING`]:
//! beyond it, 503). An event whose caller has gone before its batch starts is dropped, never
//! committed. If the database refuses a batch of several for its data, its events are retried one
//! by one, so a bad event never takes others down with it; any other failure (the database away, a
//! commit with an unknown outcome) is answered to every caller in the batch as 503, never retried.

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::Value;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::db::events::{self, Event};
use crate::db::{DbError, DbResult};
use crate::domain::event_type::EventType;
use crate::domain::tenant::TenantId;

use super::EventBus;

/// Events appended by one statement at most.
pub const MAX_BATCH: usize = 256;
/// Events a tenant may have waiting for their batch; beyond it, publishing answers 503 until the
/// queue drains (the database is slow or away), so memory stays bounded.
pub const MAX_WAITING: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{MAX_WAITING} events are already waiting to be committed for this tenant")]
    Busy,
    /// The batch failed for a reason that is not the event's (logged where it happened).
    #[error("the event batch could not be committed: {0}")]
    Unavailable(String),
}

/// Where a caller waits for its event's outcome.
type Answer = oneshot::Receiver<Result<Event, PublishError>>;

struct Pending {
    event_type: EventType,
    data: Value,
    reply: oneshot::Sender<Result<Event, PublishError>>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Pending>,
}

/// Per-tenant queues of published events; a tenant has an entry while its queue is being drained.
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

    /// Queues an event. `Ok((true, _))` when the tenant's queue was idle: the caller leads (see
    /// [`EventBus::publish`]).
    fn push(
        &self,
        tenant: TenantId,
        event_type: EventType,
        data: Value,
    ) -> Result<(bool, Answer), PublishError> {
        let mut queues = self.lock();
        let start = !queues.contains_key(&tenant.as_uuid());
        let queue = queues.entry(tenant.as_uuid()).or_default();
        if queue.waiting.len() >= MAX_WAITING {
            return Err(PublishError::Busy);
        }
        let (reply, answer) = oneshot::channel();
        queue.waiting.push(Pending {
            event_type,
            data,
            reply,
        });
        Ok((start, answer))
    }

    /// After a batch: `true` if events are waiting (the drain goes on); otherwise the tenant's
    /// entry is removed, under the same lock as [`Batcher::push`].
    fn more_waiting(&self, tenant: TenantId) -> bool {
        let mut queues = self.lock();
        match queues.get(&tenant.as_uuid()) {
            Some(queue) if !queue.waiting.is_empty() => true,
            _ => {
                queues.remove(&tenant.as_uuid());
                false
            }
        }
    }

    /// The next batch for the tenant, or `None` (and the entry removed, under the same lock as
    /// [`Batcher::push`], so no event is left behind) when its queue is empty. Events whose
    /// caller has gone (its request timed out or was cancelled) are dropped, never committed.
    fn next_batch(&self, tenant: TenantId) -> Option<Vec<Pending>> {
        let mut queues = self.lock();
        let queue = queues.get_mut(&tenant.as_uuid())?;
        queue.waiting.retain(|p| !p.reply.is_closed());
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

/// The hold of whoever drains a tenant's queue (the leading request, then a drain task), created
/// as soon as the queue's entry is. If the holder ends without finishing (its request cancelled,
/// its task dropped before its first poll, a panic), dropping the guard hands the waiting events
/// to a new drain task, once; if that one fails as well, the entry is removed and its callers get
/// an error rather than hanging.
struct DrainGuard {
    bus: EventBus,
    tenant: TenantId,
    finished: bool,
    respawn: bool,
}

impl DrainGuard {
    fn new(bus: EventBus, tenant: TenantId) -> Self {
        Self {
            bus,
            tenant,
            finished: false,
            respawn: true,
        }
    }
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if self.respawn
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let guard = DrainGuard {
                bus: self.bus.clone(),
                tenant: self.tenant,
                finished: false,
                respawn: false,
            };
            runtime.spawn(async move { guard.bus.clone().drain(guard).await });
        } else {
            self.bus.batcher.abandon(self.tenant);
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
    ) -> Result<Event, PublishError> {
        let (lead, answer) = self.batcher.push(tenant, event_type, data)?;
        if lead {
            // The tenant's queue was idle: this request leads. Its own event is first in the
            // batch; when it is alone there, the request commits it in its own task, so a
            // publish on a quiet tenant involves no other task. A batch that also holds other
            // callers' events is committed by a drain task instead: if this request were
            // cancelled mid-commit (its client gone), those callers would be told it failed
            // although it may have committed, and a retry would append their events twice.
            let mut guard = DrainGuard::new(self.clone(), tenant);
            match self.batcher.next_batch(tenant) {
                Some(batch) if batch.len() == 1 => {
                    self.commit_batch(tenant, batch).await;
                    if self.batcher.more_waiting(tenant) {
                        let bus = self.clone();
                        tokio::spawn(async move { bus.drain(guard).await });
                    } else {
                        guard.finished = true;
                    }
                }
                Some(batch) => {
                    let bus = self.clone();
                    tokio::spawn(async move {
                        bus.commit_batch(tenant, batch).await;
                        bus.drain(guard).await;
                    });
                }
                None => guard.finished = true,
            }
        }
        answer.await.unwrap_or_else(|_| {
            Err(PublishError::Unavailable(
                "the event batch ended without an answer".into(),
            ))
        })
    }

    async fn drain(&self, mut guard: DrainGuard) {
        let tenant = guard.tenant;
        while let Some(batch) = self.batcher.next_batch(tenant) {
            self.commit_batch(tenant, batch).await;
        }
        guard.finished = true;
    }

    /// Commits one batch and answers each of its callers.
    async fn commit_batch(&self, tenant: TenantId, batch: Vec<Pending>) {
        let items: Vec<(EventType, Value)> = batch
            .iter()
            .map(|p| (p.event_type.clone(), p.data.clone()))
            .collect();
        match self.append(tenant, &items).await {
            Ok(appended) => {
                for (pending, event) in batch.into_iter().zip(appended) {
                    let _ = pending.reply.send(Ok(event));
                }
            }
            Err(e) if batch.len() > 1 && e.concerns_data() => {
                tracing::debug!(error = %e, count = batch.len(), "event batch refused; appending one by one");
                for (pending, item) in batch.into_iter().zip(items) {
                    let one = self.append(tenant, std::slice::from_ref(&item)).await;
                    let one = one
                        .and_then(|mut one| {
                            one.pop().ok_or(DbError::Sqlx(sqlx::Error::RowNotFound))
                        })
                        .map_err(PublishError::Db);
                    let _ = pending.reply.send(one);
                }
            }
            Err(e) if batch.len() == 1 => {
                if let Some(pending) = batch.into_iter().next() {
                    let _ = pending.reply.send(Err(PublishError::Db(e)));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, count = batch.len(), %tenant, "event batch failed");
                let described = e.to_string();
                for pending in batch {
                    let _ = pending
                        .reply
                        .send(Err(PublishError::Unavailable(described.clone())));
                }
            }
        }
    }

    /// Appends `items` in order as one transaction (one statement, one round trip), then hands
    /// them to subscribers.
    async fn append(&self, tenant: TenantId, items: &[(EventType, Value)]) -> DbResult<Vec<Event>> {
        let appended = events::append_many(self.hub.db().primary(), tenant, items).await?;
        self.committed(&appended).await;
        Ok(appended)
    }
}
