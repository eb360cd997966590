//! In-process fan-out of each tenant's committed events, in position order.
//!
//! Every tenant with local subscribers has a feed: the next position it expects, and one group
//! per distinct topic filter, each a broadcast ring shared by that group's subscribers (so a
//! connection costs a receiver, not a queue, and an event wakes only the streams that want it).
//! Events arrive from this process's commits and from the broker, possibly out of order or twice;
//! the feed examines each position exactly once and in order, and sends it to the groups whose
//! filter matches. Each delivery names the group's previous delivery (`after`): every position in
//! between was examined and did not match, so a subscriber that has seen `after` has missed
//! nothing. When a position is missing, the hub holds later ones back and reads the missing ones
//! from the log, once for the whole process. A poll of head positions every second notices events
//! the broker never delivered. Subscribers that fall behind their ring are told so (`Lagged`) and
//! catch up from the log themselves.
//!
//! A feed also keeps its most recent events (as many as a ring holds), contiguous up to the last
//! position it examined. A stream that joins a live feed starts from that position without
//! reading the log, and one that resumes from an id inside that window replays from memory: a
//! reconnect storm costs the database nothing.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::futures::OwnedNotified;
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::{Db, events, tenant as scope};
use crate::domain::tenant::TenantId;
use crate::domain::topic::TopicFilter;

use super::Live;

const POLL_INTERVAL: Duration = Duration::from_secs(1);
const FILL_PAGE: i64 = 500;
/// Envelope bytes a feed's recent window holds at most, whatever `SSE_BUFFER` allows.
const WINDOW_BYTES: usize = 4 * 1024 * 1024;

pub struct Hub {
    feeds: Mutex<HashMap<Uuid, Feed>>,
    db: Db,
    capacity: usize,
}

struct Feed {
    groups: HashMap<TopicFilter, Group>,
    /// The next position to examine; `None` until a subscriber or an event sets the baseline.
    next: Option<i64>,
    /// Positions that arrived ahead of `next`, held until the gap is filled.
    pending: BTreeMap<i64, Arc<Live>>,
    filling: bool,
    /// The latest examined events, contiguous and ending at `next - 1`: at most `capacity` of
    /// them and [`WINDOW_BYTES`] of envelopes (`recent_bytes`).
    recent: VecDeque<Arc<Live>>,
    recent_bytes: usize,
    capacity: usize,
    /// While `next` is unknown and a subscriber is reading it from the log: the others wait here.
    warming: Option<Arc<Notify>>,
}

/// The subscribers of one tenant sharing one topic filter.
struct Group {
    tx: broadcast::Sender<Delivery>,
    /// The last position sent to this group, or up to which positions are accounted for; `None`
    /// when unknown (the feed skipped a gap), which makes the next delivery a gap for receivers.
    last: Option<i64>,
}

/// An event for a group, with the group's previous delivery: positions in between did not match.
#[derive(Clone)]
pub struct Delivery {
    pub after: Option<i64>,
    pub live: Arc<Live>,
}

/// Where a new subscriber starts.
pub enum Start {
    /// The feed is live: every position up to `scanned` is accounted for, and `replay` holds the
    /// events after the requested id that match the filter. Nothing needs reading from the log.
    Warm {
        scanned: i64,
        replay: Vec<Arc<Live>>,
    },
    /// The subscriber reads its start from the log, then calls [`Hub::expect`]. With a
    /// [`Warmer`], it is the one reading the start of a new feed for everyone: it should pass the
    /// events it read to `expect`, and others wait for it.
    Cold { warmer: Option<Warmer> },
    /// Another subscriber is reading this new feed's start: wait for it (bounded), then ask again
    /// with [`Hub::start`].
    Wait(OwnedNotified),
}

/// Held by the subscriber reading a new feed's start. If it never gets to [`Hub::expect`] (its
/// read failed, its client left), dropping it wakes the waiting subscribers, and one of them
/// takes over.
pub struct Warmer {
    hub: Arc<Hub>,
    tenant: Uuid,
}

impl Drop for Warmer {
    fn drop(&mut self) {
        if let Some(feed) = self.hub.lock().get_mut(&self.tenant) {
            feed.wake();
        }
    }
}

/// A subscriber's end of a tenant feed; its group, and the feed, go away with the last subscriber.
pub struct Subscription {
    rx: Option<broadcast::Receiver<Delivery>>,
    tenant: Uuid,
    filter: TopicFilter,
    hub: Arc<Hub>,
}

impl Subscription {
    pub async fn recv(&mut self) -> Result<Delivery, broadcast::error::RecvError> {
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
        let Some(feed) = feeds.get_mut(&self.tenant) else {
            return;
        };
        if feed
            .groups
            .get(&self.filter)
            .is_some_and(|g| g.tx.receiver_count() == 0)
        {
            feed.groups.remove(&self.filter);
        }
        if feed.groups.is_empty() {
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

    pub fn db(&self) -> &Db {
        &self.db
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Uuid, Feed>> {
        // Feeds hold plain data; a panic elsewhere cannot leave one half-updated.
        self.feeds
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Subscribes to a tenant's live events matching `filter`, resuming after `resume` if given.
    /// On [`Start::Cold`], read the log up to its head, then call [`Hub::expect`]: nothing
    /// committed in between is missed (the subscription already receives it).
    pub fn subscribe(
        self: &Arc<Self>,
        tenant: TenantId,
        filter: &TopicFilter,
        resume: Option<i64>,
    ) -> (Subscription, Start) {
        let mut feeds = self.lock();
        let feed = feeds.entry(tenant.as_uuid()).or_insert_with(|| Feed {
            groups: HashMap::new(),
            next: None,
            pending: BTreeMap::new(),
            filling: false,
            recent: VecDeque::new(),
            recent_bytes: 0,
            capacity: self.capacity,
            warming: None,
        });
        let next = feed.next;
        let start = feed.start(self, tenant, filter, resume);
        let group = feed.groups.entry(filter.clone()).or_insert_with(|| Group {
            tx: broadcast::channel(self.capacity).0,
            // Everything before the feed's next position was examined before this group existed;
            // its subscribers read that part of the log themselves.
            last: next.map(|n| n - 1),
        });
        let subscription = Subscription {
            rx: Some(group.tx.subscribe()),
            tenant: tenant.as_uuid(),
            filter: filter.clone(),
            hub: self.clone(),
        };
        (subscription, start)
    }

    /// Tells a new feed where its subscribers' reading of the log ended, with the events just
    /// before that point if the reader has them (`recent`: contiguous, ending at `next - 1`), so
    /// that streams resuming right behind it replay from memory.
    pub fn expect(&self, tenant: TenantId, next: i64, recent: Vec<Arc<Live>>) {
        if let Some(feed) = self.lock().get_mut(&tenant.as_uuid())
            && feed.next.is_none()
        {
            feed.next = Some(next);
            for group in feed.groups.values_mut() {
                group.last.get_or_insert(next - 1);
            }
            feed.wake();
            let contiguous = recent
                .iter()
                .zip(next - recent.len() as i64..)
                .all(|(live, position)| live.position == position);
            if contiguous {
                for live in recent {
                    feed.remember(live);
                }
            }
        }
    }

    /// Where a subscriber that was told to [`Start::Wait`] starts, once woken or tired of waiting.
    pub fn start(
        self: &Arc<Self>,
        tenant: TenantId,
        filter: &TopicFilter,
        resume: Option<i64>,
    ) -> Start {
        match self.lock().get_mut(&tenant.as_uuid()) {
            Some(feed) => feed.start(self, tenant, filter, resume),
            None => Start::Cold { warmer: None },
        }
    }

    /// How many events a reader starting a feed should hand to [`Hub::expect`] at most.
    pub fn window(&self) -> usize {
        self.capacity.min(FILL_PAGE as usize)
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
                feed.wake();
                feed.send(live);
            }
            Some(next) if position < next => {}
            Some(next) if position == next => {
                feed.send(live);
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
                        feed.skip_to(first);
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
        // A fill holds what it reads in memory, so it reads at most a ring's worth: the last
        // `capacity` positions. Before them the feed skips, and each stream that wanted those
        // events pages through the log itself.
        let from = from.max(to.saturating_sub(self.capacity as i64) + 1);
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
                    if let Some(next) = feed.next
                        && next < from
                    {
                        feed.skip_to(from);
                    }
                    for live in events {
                        if Some(live.position) == feed.next {
                            feed.send(live);
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
                feed.skip_to(first);
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
    /// Where a subscriber resuming after `resume` (or joining at the live end) starts. Only a live
    /// feed whose window reaches back to `resume` answers from memory; an id before the window or
    /// past what this feed has examined is for the log to judge (expired, or ahead of the log).
    fn start(
        &mut self,
        hub: &Arc<Hub>,
        tenant: TenantId,
        filter: &TopicFilter,
        resume: Option<i64>,
    ) -> Start {
        let Some(next) = self.next else {
            return match &self.warming {
                // Created now, under the feed's lock: it sees the wake-up even if that comes
                // before the subscriber starts waiting.
                Some(notify) => Start::Wait(notify.clone().notified_owned()),
                None => {
                    self.warming = Some(Arc::new(Notify::new()));
                    Start::Cold {
                        warmer: Some(Warmer {
                            hub: hub.clone(),
                            tenant: tenant.as_uuid(),
                        }),
                    }
                }
            };
        };
        let scanned = next - 1;
        let first = self.recent.front().map_or(next, |e| e.position);
        match resume {
            None => Start::Warm {
                scanned,
                replay: Vec::new(),
            },
            Some(id) if id >= first - 1 && id <= scanned => Start::Warm {
                scanned,
                replay: self
                    .recent
                    .iter()
                    .filter(|e| e.position > id && filter.matches(&e.event_type))
                    .cloned()
                    .collect(),
            },
            Some(_) => Start::Cold { warmer: None },
        }
    }

    /// Adds the next position to the recent window, dropping the oldest beyond its bounds.
    fn remember(&mut self, live: Arc<Live>) {
        self.recent_bytes += live.json().len();
        self.recent.push_back(live);
        while self.recent.len() > self.capacity || self.recent_bytes > WINDOW_BYTES {
            match self.recent.pop_front() {
                Some(old) => self.recent_bytes -= old.json().len(),
                None => break,
            }
        }
    }

    /// Ends a warm-up: subscribers waiting for the feed's start ask again.
    fn wake(&mut self) {
        if let Some(notify) = self.warming.take() {
            notify.notify_waiters();
        }
    }

    /// Passes the next position on to every group whose filter it matches.
    fn send(&mut self, live: Arc<Live>) {
        self.remember(live.clone());
        for (filter, group) in &mut self.groups {
            if filter.matches(&live.event_type) {
                let _ = group.tx.send(Delivery {
                    after: group.last,
                    live: live.clone(),
                });
                group.last = Some(live.position);
            }
        }
    }

    /// Jumps over positions that were never examined: no group can vouch for them any more.
    fn skip_to(&mut self, position: i64) {
        self.next = Some(position);
        self.recent.clear();
        self.recent_bytes = 0;
        for group in self.groups.values_mut() {
            group.last = None;
        }
    }

    fn release_pending(&mut self) {
        while let Some(next) = self.next
            && let Some(live) = self.pending.remove(&next)
        {
            self.send(live);
            self.next = Some(next + 1);
        }
        if let Some(next) = self.next {
            self.pending.retain(|&p, _| p >= next);
        }
    }
}
