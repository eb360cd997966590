//! In-process fan-out of each tenant's committed events, in position order.
//!
//! Every tenant with local subscribers has a feed: one broadcast ring shared by all of them (so a
//! connection costs a receiver, not a queue) and the next position it expects. Events arrive from
//! this process's commits and from the broker, possibly out of order or twice; the feed passes
//! each position on exactly once and in order. When a position is missing, the hub holds later
//! ones back and reads the missing ones from the log, once for the whole process. A poll of head
//! positions every second notices events the broker never delivered. Subscribers that fall
//! behind the ring are told so (`Lagged`) and catch up from the log themselves.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::{Db, events, tenant as scope};
use crate::domain::tenant::TenantId;
use crate::domain::topic::TopicFilter;

use super::Live;

const POLL_INTERVAL: Duration = Duration::from_secs(1);
const FILL_PAGE: i64 = 500;

pub struct Hub {
    feeds: Mutex<HashMap<Uuid, Feed>>,
    db: Db,
    capacity: usize,
}

struct Feed {
    tx: broadcast::Sender<Arc<Live>>,
    /// The next position to pass on; `None` until a subscriber or an event sets the baseline.
    next: Option<i64>,
    /// Positions that arrived ahead of `next`, held until the gap is filled.
    pending: BTreeMap<i64, Arc<Live>>,
    filling: bool,
}

/// A subscriber's end of a tenant feed; the feed goes away with its last subscriber.
pub struct Subscription {
    rx: Option<broadcast::Receiver<Arc<Live>>>,
    tenant: Uuid,
    hub: Arc<Hub>,
}

impl Subscription {
    pub async fn recv(&mut self) -> Result<Arc<Live>, broadcast::error::RecvError> {
        match self.rx.as_mut() {
            Some(rx) => rx.recv().await,
            None => Err(broadcast::error::RecvError::Closed),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        drop(self.rx.take());
        let mut feeds = self.hub.lock();
        if feeds
            .get(&self.tenant)
            .is_some_and(|f| f.tx.receiver_count() == 0)
        {
            feeds.remove(&self.tenant);
        }
    }
}

impl Hub {
    pub fn new(db: Db, capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            feeds: Mutex::new(HashMap::new()),
            db,
            capacity: capacity.max(16),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Uuid, Feed>> {
        // Feeds hold plain data; a panic elsewhere cannot leave one half-updated.
        self.feeds
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Subscribes to a tenant's live events. Subscribe first, then read the log up to its head,
    /// then call [`Hub::expect`]: nothing committed in between is missed.
    pub fn subscribe(self: &Arc<Self>, tenant: TenantId) -> Subscription {
        let mut feeds = self.lock();
        let feed = feeds.entry(tenant.as_uuid()).or_insert_with(|| Feed {
            tx: broadcast::channel(self.capacity).0,
            next: None,
            pending: BTreeMap::new(),
            filling: false,
        });
        Subscription {
            rx: Some(feed.tx.subscribe()),
            tenant: tenant.as_uuid(),
            hub: self.clone(),
        }
    }

    /// Tells a new feed where its subscribers' reading of the log ended.
    pub fn expect(&self, tenant: TenantId, next: i64) {
        if let Some(feed) = self.lock().get_mut(&tenant.as_uuid())
            && feed.next.is_none()
        {
            feed.next = Some(next);
        }
    }

    /// Hands over a committed event (from this process or the broker).
    pub fn offer(self: &Arc<Self>, live: Arc<Live>) {
        let mut feeds = self.lock();
        let tenant = TenantId::from_uuid(live.tenant_id);
        let Some(feed) = feeds.get_mut(&live.tenant_id) else {
            return;
        };
        let position = live.position;
        match feed.next {
            None => {
                feed.next = Some(position + 1);
                let _ = feed.tx.send(live);
            }
            Some(next) if position < next => {}
            Some(next) if position == next => {
                let _ = feed.tx.send(live);
                feed.next = Some(next + 1);
                feed.release_pending();
            }
            Some(next) => {
                feed.pending.insert(position, live);
                if feed.pending.len() > self.capacity {
                    // Too far behind to hold back any longer: pass on what is here and let each
                    // subscriber fill the hole from the log.
                    tracing::warn!(%tenant, "event hub skipping a gap it could not fill");
                    if let Some((&first, _)) = feed.pending.first_key_value() {
                        feed.next = Some(first);
                    }
                    feed.release_pending();
                } else if !feed.filling {
                    feed.filling = true;
                    self.spawn_fill(tenant, next, position - 1);
                }
            }
        }
    }

    fn spawn_fill(self: &Arc<Self>, tenant: TenantId, from: i64, to: i64) {
        let hub = self.clone();
        tokio::spawn(async move {
            metrics::counter!("event_bus_gap_fills_total").increment(1);
            let result = hub.read_log(tenant, from, to).await;
            let mut feeds = hub.lock();
            let Some(feed) = feeds.get_mut(&tenant.as_uuid()) else {
                return;
            };
            feed.filling = false;
            match result {
                Ok(events) => {
                    for live in events {
                        if Some(live.position) == feed.next {
                            let _ = feed.tx.send(live);
                            feed.next = feed.next.map(|n| n + 1);
                            feed.release_pending();
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, %tenant, "event hub could not read missing events")
                }
            }
            // Still short (the read failed, or the events are not visible yet): skip to what is
            // held; subscribers detect the hole and read it from the log themselves.
            if let (Some(next), Some((&first, _))) = (feed.next, feed.pending.first_key_value())
                && first > next
            {
                feed.next = Some(first);
                feed.release_pending();
            }
        });
    }

    async fn read_log(
        &self,
        tenant: TenantId,
        from: i64,
        to: i64,
    ) -> Result<Vec<Arc<Live>>, crate::db::DbError> {
        let mut tx = scope::begin(self.db.primary(), tenant).await?;
        let mut out = Vec::new();
        let mut after = from - 1;
        while after < to {
            let page =
                events::page(&mut tx, tenant, after, to, &TopicFilter::all(), FILL_PAGE).await?;
            let Some(last) = page.last() else { break };
            after = last.id;
            out.extend(page.iter().map(|e| Arc::new(Live::new(e, None))));
        }
        scope::end_read(tx);
        Ok(out)
    }

    /// Every second, compares each followed tenant's head with what the feed has passed on, and
    /// reads anything missing from the log (a broker message lost, or no broker at all while
    /// other processes write).
    pub fn spawn_poller(self: &Arc<Self>, shutdown: CancellationToken) {
        let hub = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(POLL_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let tenants: Vec<Uuid> = hub.lock().keys().copied().collect();
                if tenants.is_empty() {
                    continue;
                }
                let heads = match events::heads(hub.db.ops(), &tenants).await {
                    Ok(heads) => heads,
                    Err(e) => {
                        tracing::debug!(error = %e, "event head poll failed");
                        continue;
                    }
                };
                let mut feeds = hub.lock();
                let mut fills = Vec::new();
                for (tenant, head) in heads {
                    if let Some(feed) = feeds.get_mut(&tenant)
                        && let Some(next) = feed.next
                        && head >= next
                        && !feed.filling
                    {
                        feed.filling = true;
                        fills.push((TenantId::from_uuid(tenant), next, head));
                    }
                }
                drop(feeds);
                for (tenant, from, to) in fills {
                    hub.spawn_fill(tenant, from, to);
                }
            }
        });
    }
}

impl Feed {
    fn release_pending(&mut self) {
        while let Some(next) = self.next
            && let Some(live) = self.pending.remove(&next)
        {
            let _ = self.tx.send(live);
            self.next = Some(next + 1);
        }
        if let Some(next) = self.next {
            self.pending.retain(|&p, _| p >= next);
        }
    }
}
