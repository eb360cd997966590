//! The job pool: per queue, a runner that claims due jobs in batches (starting claimed jobs while
//! the next claim is in flight) and runs up to the queue's concurrency at once; one finisher that
//! records outcomes in batches, two at a time; a heartbeat that renews the leases of held jobs
//! and stops those cancelled meanwhile; a rescue pass that hands back jobs whose worker died; a
//! listener that wakes a queue when a job is enqueued.
//!
//! Nothing depends on a notification arriving: every queue also looks for due jobs each
//! `JOB_POLL_INTERVAL`, which is what brings delayed jobs and retries in, and a notification that
//! arrives while a claim is in flight is kept (a stored permit) and triggers another claim.
//!
//! A worker killed mid-job stops renewing its leases: within `JOB_LEASE` (plus one rescue pass, a
//! third of it) any pool makes the job due again, counting the lost attempt. On shutdown a pool
//! stops claiming, hands back jobs it claimed but had not started, lets running ones finish for up
//! to `JOB_DRAIN_TIMEOUT`, then stops the rest and hands them back too, attempt not counted.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use futures::future::BoxFuture;
use sqlx::postgres::PgListener;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::JobsConfig;
use crate::db::events::Event;
use crate::db::jobs::{self as store, Claimed, Outcome};
use crate::db::{Db, DbResult};
use crate::domain::job::Queue;
use crate::domain::tenant::TenantId;
use crate::events::EventBus;

use super::{JobContext, JobError, Registry};

/// Outcomes recorded by one statement at most.
const FINISH_BATCH: usize = 1000;
/// Batches of outcomes recorded at once at most.
const FINISHERS: usize = 2;
/// Expired leases handed back by one statement at most.
const RESCUE_BATCH: i32 = 500;
/// How long a cancelled job's handler may take to stop on its own before it is aborted.
const CANCEL_GRACE: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    events: EventBus,
    registry: Registry,
    config: JobsConfig,
    /// Unique per process start: leases name it, so a restarted process never mistakes its
    /// predecessor's jobs for its own.
    worker: Arc<str>,
    /// Jobs this process has claimed and not yet recorded an outcome for, with the token that
    /// stops each one.
    held: Mutex<HashMap<Uuid, CancellationToken>>,
    wake: [Notify; 4],
}

/// What became of one claimed job.
#[derive(Debug, Clone)]
pub struct Ran {
    pub id: Uuid,
    pub kind: String,
    /// `None` when the job was cancelled while it ran: nothing is recorded for it.
    pub outcome: Option<Outcome>,
}

impl Pool {
    pub fn new(db: Db, events: EventBus, registry: Registry, config: JobsConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                db,
                events,
                registry,
                config,
                worker: worker_name().into(),
                held: Mutex::default(),
                wake: std::array::from_fn(|_| Notify::new()),
            }),
        }
    }

    pub fn worker(&self) -> &str {
        &self.inner.worker
    }

    /// Starts the pool; the returned handle ends once `shutdown` has fired and the pool drained.
    pub fn spawn(&self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let inner = self.inner.clone();
        tokio::spawn(async move { inner.run(shutdown).await })
    }

    /// Claims up to `limit` due jobs of `queue`, runs them all, records their outcomes and returns
    /// them: one step of the pool, for tests and tools that drive jobs by hand.
    pub async fn run_due(&self, queue: Queue, limit: usize) -> DbResult<Vec<Ran>> {
        let inner = &self.inner;
        let claimed = inner.claim(queue, limit).await?;
        let runs = claimed.into_iter().map(|job| {
            let inner = inner.clone();
            async move {
                let token = inner.token(job.id);
                let (id, kind) = (job.id, job.kind.clone());
                let outcome = inner.execute(queue, job, token).await;
                Ran { id, kind, outcome }
            }
        });
        let ran = futures::future::join_all(runs).await;
        let outcomes: Vec<(Uuid, Outcome)> = ran
            .iter()
            .filter_map(|r| r.outcome.clone().map(|o| (r.id, o)))
            .collect();
        if !outcomes.is_empty() {
            let events = store::finish(inner.db.primary(), &inner.worker, &outcomes).await?;
            inner.events.committed(&events).await;
        }
        inner.forget(ran.iter().map(|r| r.id));
        Ok(ran)
    }

    /// One heartbeat: renews this process's leases and stops the jobs no longer its own.
    pub async fn heartbeat(&self) -> DbResult<()> {
        self.inner.heartbeat().await
    }

    /// Enqueues the registry's cron ticks in `(after, until]`, as the scheduler does when they come.
    pub async fn enqueue_ticks(
        &self,
        after: chrono::DateTime<chrono::Utc>,
        until: chrono::DateTime<chrono::Utc>,
    ) -> DbResult<u64> {
        let inner = &self.inner;
        super::cron::enqueue_ticks(&inner.db, &inner.registry.schedules, after, until).await
    }

    /// One rescue pass over expired leases; returns how many jobs it handed back.
    pub async fn rescue(&self) -> DbResult<usize> {
        self.inner.rescue().await
    }
}

impl Inner {
    fn held(&self) -> MutexGuard<'_, HashMap<Uuid, CancellationToken>> {
        // The map holds plain data; a panic elsewhere cannot leave it half-updated.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn token(&self, id: Uuid) -> CancellationToken {
        self.held().entry(id).or_default().clone()
    }

    fn forget(&self, ids: impl Iterator<Item = Uuid>) {
        let mut held = self.held();
        for id in ids {
            held.remove(&id);
        }
    }

    async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let queues: Vec<Queue> = self
            .registry
            .queues()
            .into_iter()
            .filter(|q| self.config.concurrency[q.index()] > 0)
            .collect();
        tracing::info!(
            worker = %self.worker,
            queues = ?queues.iter().map(|q| q.as_str()).collect::<Vec<_>>(),
            recovery_bound = ?self.config.recovery_bound(),
            "job pool started"
        );
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let background = CancellationToken::new();
        let mut tasks = JoinSet::new();
        tasks.spawn(self.clone().listen(background.clone()));
        tasks.spawn(self.clone().keep_leases(background.clone()));
        if !self.registry.schedules.is_empty() {
            // Stops with the pool's intake: no tick is enqueued by a process that is leaving.
            tasks.spawn(super::cron::run(
                self.db.clone(),
                self.registry.schedules.clone(),
                shutdown.clone(),
            ));
        }
        let finisher = tokio::spawn(self.clone().finish_outcomes(done_rx, shutdown.clone()));
        let mut runners = JoinSet::new();
        for queue in queues {
            runners.spawn(
                self.clone()
                    .run_queue(queue, done_tx.clone(), shutdown.clone()),
            );
        }
        drop(done_tx);
        while runners.join_next().await.is_some() {}
        // Every runner has handed its last outcome over; the finisher ends once it recorded them.
        if let Err(e) = finisher.await {
            tracing::error!(error = %e, "job finisher ended abnormally");
        }
        background.cancel();
        while tasks.join_next().await.is_some() {}
        tracing::info!(worker = %self.worker, "job pool stopped");
    }

    async fn claim(&self, queue: Queue, limit: usize) -> DbResult<Vec<Claimed>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let kinds = self.registry.kinds_of(queue);
        let mut claimed = store::claim(
            self.db.primary(),
            queue,
            &kinds,
            limit,
            &self.worker,
            self.config.lease,
        )
        .await?;
        // The statement's rows come in no promised order: run them in the order they were picked.
        claimed.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then(a.run_at.cmp(&b.run_at))
                .then(a.id.cmp(&b.id))
        });
        let received = std::time::Instant::now();
        let mut held = self.held();
        for job in &mut claimed {
            held.entry(job.id).or_default();
            job.received = Some(received);
        }
        Ok(claimed)
    }

    /// Runs one attempt to its outcome: the handler's result or error, a timeout, or a panic.
    /// `None` when the job was cancelled meanwhile.
    async fn execute(
        self: &Arc<Self>,
        queue: Queue,
        job: Claimed,
        token: CancellationToken,
    ) -> Option<Outcome> {
        let kind = self.registry.label(&job.kind);
        // From due to this start: the wait for a claim (database time), then for a free slot
        // (this process's clock, as the claim may have fetched it ahead).
        let waited = (job.claimed_at - job.run_at).to_std().unwrap_or_default()
            + job.received.map(|r| r.elapsed()).unwrap_or_default();
        metrics::histogram!("job_pickup_delay_seconds", "queue" => queue.as_str())
            .record(waited.as_secs_f64());
        let Some(handler) = self.registry.get(&job.kind).cloned() else {
            // A kind this build does not know (a newer build enqueued it, or it was removed):
            // retried like a failure, so a worker that knows it can still take it.
            let error = JobError::retry(format!("no worker here runs jobs of kind {}", job.kind));
            return Some(self.failed(&job, None, error, kind));
        };
        let ctx = JobContext {
            id: job.id,
            tenant: job.tenant_id.map(TenantId::from_uuid),
            attempt: job.attempt,
            max_attempts: job.max_attempts,
            db: self.db.clone(),
            events: self.events.clone(),
            services: self.registry.services.clone(),
            worker: self.worker.clone(),
            cancelled: token.clone(),
        };
        let timeout = handler.timeout();
        let started = Instant::now();
        // Its own task, so a panic is caught and reported as a failed attempt; aborted if this
        // future is dropped (the pool stopping past its drain time), so it never runs on unseen.
        let mut attempt = AbortOnDrop(tokio::spawn(tokio::time::timeout(
            timeout,
            handler.run(job.args.clone(), ctx),
        )));
        let result = tokio::select! {
            joined = &mut attempt.0 => joined,
            () = token.cancelled() => {
                // The handler sees the same token: give it a moment to stop on its own.
                if tokio::time::timeout(CANCEL_GRACE, &mut attempt.0).await.is_err() {
                    attempt.0.abort();
                }
                metrics::counter!("jobs_finished_total", "kind" => kind, "outcome" => "cancelled").increment(1);
                return None;
            }
        };
        metrics::histogram!("job_duration_seconds", "kind" => kind)
            .record(started.elapsed().as_secs_f64());
        let error = match result {
            Ok(Ok(Ok(value))) => {
                metrics::counter!("jobs_finished_total", "kind" => kind, "outcome" => "completed")
                    .increment(1);
                return Some(Outcome::Completed(value));
            }
            Ok(Ok(Err(e))) => e,
            Ok(Err(_)) => JobError::retry(format!(
                "timed out after {}",
                humantime::format_duration(timeout)
            )),
            Err(e) if e.is_panic() => JobError::retry(format!("panicked: {}", panic_message(e))),
            Err(_) => JobError::retry("stopped before it finished"),
        };
        Some(self.failed(&job, Some(handler.backoff(job.attempt)), error, kind))
    }

    fn failed(
        &self,
        job: &Claimed,
        backoff: Option<Duration>,
        error: JobError,
        kind: &'static str,
    ) -> Outcome {
        let last = error.permanent || job.attempt >= job.max_attempts;
        tracing::warn!(job_id = %job.id, kind = %job.kind, attempt = job.attempt, last, error = %error.message, "job attempt failed");
        if last {
            metrics::counter!("jobs_finished_total", "kind" => kind, "outcome" => "dead")
                .increment(1);
            return Outcome::Dead {
                error: error.message,
            };
        }
        metrics::counter!("jobs_finished_total", "kind" => kind, "outcome" => "retried")
            .increment(1);
        let wait = error.retry_in.or(backoff).unwrap_or_else(|| {
            super::backoff::exponential(
                job.attempt,
                Duration::from_secs(2),
                Duration::from_secs(3600),
            )
        });
        let at = Utc::now() + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::MAX);
        Outcome::Retrying {
            error: error.message,
            at,
        }
    }

    /// Claims and runs one queue's jobs until `shutdown`, then drains.
    async fn run_queue(
        self: Arc<Self>,
        queue: Queue,
        done: mpsc::UnboundedSender<(Uuid, Option<Outcome>)>,
        shutdown: CancellationToken,
    ) {
        let concurrency = self.config.concurrency[queue.index()];
        let prefetch = self.config.prefetch;
        let mut waiting: VecDeque<Claimed> = VecDeque::new();
        let mut running: JoinSet<()> = JoinSet::new();
        let mut running_ids: HashMap<tokio::task::Id, Uuid> = HashMap::new();
        let mut poll = tokio::time::interval(self.config.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut more_due = true;
        // The claim in flight, if any, with how many jobs it asked for. Jobs keep starting from
        // `waiting` while it runs: claiming is a round trip and a commit, and a runner that
        // waited for it would leave its slots empty meanwhile.
        let mut claiming: Option<BoxFuture<'static, (usize, DbResult<Vec<Claimed>>)>> = None;
        // A wake-up or poll tick that came while a claim was in flight: look again after it,
        // since that claim may have been too early to see the new jobs.
        let mut again = false;
        loop {
            while running.len() < concurrency
                && let Some(job) = waiting.pop_front()
            {
                let id = job.id;
                // Cancelled while it waited here (the heartbeat dropped it): never started.
                let Some(token) = self.held().get(&id).filter(|t| !t.is_cancelled()).cloned()
                else {
                    continue;
                };
                let inner = self.clone();
                let done = done.clone();
                let handle = running.spawn(async move {
                    let outcome = inner.execute(queue, job, token).await;
                    let _ = done.send((id, outcome));
                });
                running_ids.insert(handle.id(), id);
            }
            // Room is counted when the claim starts; until it lands, running and waiting jobs
            // only finish or move from one to the other, so the claimed ones always fit.
            let room = (concurrency + prefetch).saturating_sub(running.len() + waiting.len());
            if claiming.is_none() && more_due && room > 0 && waiting.len() <= prefetch / 2 {
                let inner = self.clone();
                claiming = Some(Box::pin(
                    async move { (room, inner.claim(queue, room).await) },
                ));
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                (asked, claimed) = async { claiming.as_mut().expect("guarded by the branch condition").await }, if claiming.is_some() => {
                    claiming = None;
                    match claimed {
                        Ok(claimed) => {
                            more_due = claimed.len() == asked || again;
                            waiting.extend(claimed);
                        }
                        Err(e) => {
                            tracing::warn!(queue = queue.as_str(), error = %e, "claiming jobs failed; trying again at the next poll");
                            more_due = again;
                        }
                    }
                    again = false;
                }
                Some(finished) = running.join_next_with_id(), if !running.is_empty() => {
                    let task = match &finished { Ok((task, ())) => *task, Err(e) => e.id() };
                    running_ids.remove(&task);
                }
                () = self.wake[queue.index()].notified() => {
                    more_due = true;
                    again |= claiming.is_some();
                }
                _ = poll.tick() => {
                    more_due = true;
                    again |= claiming.is_some();
                }
            }
        }
        // A claim in flight when the pool stops is awaited, so the jobs it took are handed back
        // with the others instead of waiting for their leases to expire.
        if let Some(claim) = claiming.take() {
            match claim.await {
                (_, Ok(claimed)) => waiting.extend(claimed),
                (_, Err(e)) => {
                    tracing::warn!(queue = queue.as_str(), error = %e, "the last claim failed while stopping");
                }
            }
        }
        self.drain(queue, waiting, running, running_ids, done).await;
    }

    async fn drain(
        &self,
        queue: Queue,
        waiting: VecDeque<Claimed>,
        mut running: JoinSet<()>,
        mut running_ids: HashMap<tokio::task::Id, Uuid>,
        done: mpsc::UnboundedSender<(Uuid, Option<Outcome>)>,
    ) {
        let mut unstarted: Vec<Uuid> = waiting.iter().map(|j| j.id).collect();
        let deadline = tokio::time::Instant::now() + self.config.drain_timeout;
        while !running.is_empty() {
            match tokio::time::timeout_at(deadline, running.join_next_with_id()).await {
                Ok(Some(finished)) => {
                    let task = match &finished {
                        Ok((task, ())) => *task,
                        Err(e) => e.id(),
                    };
                    running_ids.remove(&task);
                }
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(
                        queue = queue.as_str(),
                        count = running.len(),
                        "jobs still running at the end of the drain; stopping them and handing them back"
                    );
                    running.abort_all();
                    while running.join_next().await.is_some() {}
                    unstarted.extend(running_ids.drain().map(|(_, id)| id));
                    break;
                }
            }
        }
        drop(done);
        if unstarted.is_empty() {
            return;
        }
        match store::release(self.db.primary(), &self.worker, &unstarted).await {
            Ok(n) => {
                metrics::counter!("jobs_finished_total", "kind" => "any", "outcome" => "released")
                    .increment(u64::try_from(n).unwrap_or(0));
                tracing::info!(
                    queue = queue.as_str(),
                    released = n,
                    "handed unfinished jobs back to the queue"
                );
            }
            Err(e) => {
                tracing::warn!(queue = queue.as_str(), error = %e, "handing jobs back failed; they are rescued when their lease expires")
            }
        }
        self.forget(unstarted.into_iter());
    }

    /// Records outcomes in batches until every runner has stopped and all are recorded. Up to
    /// [`FINISHERS`] batches are recorded at once: most of a batch's statement is updating its
    /// jobs, which two batches do side by side (only appending their events to a tenant's log
    /// takes turns), and one statement at a time capped the pool at what one database backend
    /// could finish (a 20k-job drain here: 17.6k jobs/s with one, 23k with two, no better with
    /// three).
    async fn finish_outcomes(
        self: Arc<Self>,
        mut done: mpsc::UnboundedReceiver<(Uuid, Option<Outcome>)>,
        shutdown: CancellationToken,
    ) {
        let mut recording = futures::stream::FuturesUnordered::new();
        loop {
            if recording.len() >= FINISHERS {
                recording.next().await;
                continue;
            }
            let mut received = Vec::with_capacity(FINISH_BATCH);
            tokio::select! {
                biased;
                Some(()) = recording.next(), if !recording.is_empty() => {}
                n = done.recv_many(&mut received, FINISH_BATCH) => {
                    if n == 0 {
                        break;
                    }
                    recording.push(self.clone().record(received, shutdown.clone()));
                }
            }
        }
        while recording.next().await.is_some() {}
    }

    /// Records one batch of outcomes. A batch that fails is tried again (the leases of its jobs
    /// are still renewed meanwhile) until it lands; once the pool is stopping, for at most the
    /// drain time, after which those jobs are left to be rescued when their leases expire and run
    /// again.
    async fn record(
        self: Arc<Self>,
        received: Vec<(Uuid, Option<Outcome>)>,
        shutdown: CancellationToken,
    ) {
        let mut outcomes: Vec<(Uuid, Outcome)> = received
            .iter()
            .filter_map(|(id, o)| o.clone().map(|o| (*id, o)))
            .collect();
        // finish_jobs updates the rows in this order; the heartbeat locks the same rows in id
        // order (migration 000013), so neither waits for the other in a cycle.
        outcomes.sort_unstable_by_key(|(id, _)| *id);
        let mut wait = Duration::from_millis(50);
        let mut stopping_since: Option<Instant> = None;
        while !outcomes.is_empty() {
            match store::finish(self.db.primary(), &self.worker, &outcomes).await {
                Ok(events) => {
                    self.events.committed(&events).await;
                    break;
                }
                Err(e) => {
                    if shutdown.is_cancelled() {
                        let since = *stopping_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= self.config.drain_timeout {
                            tracing::error!(error = %e, count = outcomes.len(), "could not record job outcomes before stopping; the jobs run again once their leases expire");
                            break;
                        }
                    }
                    tracing::warn!(error = %e, count = outcomes.len(), "recording job outcomes failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
        self.forget(received.into_iter().map(|(id, _)| id));
    }

    async fn heartbeat(&self) -> DbResult<()> {
        let ids: Vec<Uuid> = self.held().keys().copied().collect();
        if ids.is_empty() {
            return Ok(());
        }
        let still: std::collections::HashSet<Uuid> =
            store::extend_leases(self.db.primary(), &self.worker, &ids, self.config.lease)
                .await?
                .into_iter()
                .collect();
        let mut held = self.held();
        for id in ids.iter().filter(|id| !still.contains(id)) {
            if let Some(token) = held.remove(id) {
                tracing::info!(job_id = %id, "job no longer ours (cancelled or rescued); stopping it");
                token.cancel();
            }
        }
        Ok(())
    }

    async fn rescue(&self) -> DbResult<usize> {
        let mut total = 0;
        loop {
            let events: Vec<Event> = store::rescue(self.db.primary(), RESCUE_BATCH).await?;
            let count = events.len();
            total += count;
            self.events.committed(&events).await;
            if count < usize::try_from(RESCUE_BATCH).unwrap_or(0) {
                break;
            }
        }
        if total > 0 {
            metrics::counter!("jobs_rescued_total").increment(u64::try_from(total).unwrap_or(0));
            tracing::warn!(
                count = total,
                "handed back jobs whose worker stopped renewing its lease"
            );
            for wake in &self.wake {
                wake.notify_one();
            }
        }
        Ok(total)
    }

    /// Renews this process's leases and rescues expired ones, each every third of the lease,
    /// until `stop`.
    async fn keep_leases(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.config.lease / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.heartbeat().await {
                tracing::warn!(error = %e, "renewing job leases failed");
            }
            if let Err(e) = self.rescue().await {
                tracing::warn!(error = %e, "rescuing jobs with expired leases failed");
            }
        }
    }

    /// Wakes a queue's runner when a job for it is enqueued. While the connection is down, polling
    /// carries on alone; after reconnecting, every queue looks once, for what it may have missed.
    async fn listen(self: Arc<Self>, stop: CancellationToken) {
        let mut wait = Duration::from_millis(100);
        loop {
            let listener = async {
                let mut listener = PgListener::connect_with(self.db.ops()).await?;
                listener.listen(store::NOTIFY_CHANNEL).await?;
                Ok::<_, sqlx::Error>(listener)
            };
            let mut listener = tokio::select! {
                () = stop.cancelled() => return,
                connected = listener => match connected {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "job notifications unavailable; polling meanwhile");
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(wait) => {}
                        }
                        wait = (wait * 2).min(Duration::from_secs(5));
                        continue;
                    }
                },
            };
            wait = Duration::from_millis(100);
            for wake in &self.wake {
                wake.notify_one();
            }
            loop {
                let received = tokio::select! {
                    () = stop.cancelled() => return,
                    r = listener.try_recv() => r,
                };
                match received {
                    Ok(Some(n)) => {
                        if let Some(queue) = Queue::parse(n.payload()) {
                            self.wake[queue.index()].notify_one();
                        }
                    }
                    // The connection dropped and sqlx reconnected: notifications may be lost.
                    Ok(None) => {
                        for wake in &self.wake {
                            wake.notify_one();
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "job notification connection lost");
                        break;
                    }
                }
            }
        }
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn panic_message(e: tokio::task::JoinError) -> String {
    let payload = e.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-text panic".to_owned())
}

/// `host-pid-random`: readable in `locked_by`, and unique per process start.
fn worker_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "cybernetic".to_owned());
    let random = Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &random[..8])
}
