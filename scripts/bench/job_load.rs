//! The job pool benchmark for scripts/bench/jobs.sh, in the phases the graphile-worker peer script
//! runs, against a migrated database as the app role:
//!
//! 1. enqueue latency: `producers` tasks each enqueue their share of `jobs` no-op jobs, each in a
//!    tenant transaction of its own (`tx`: `jobs::enqueue`, as a request handler enqueues with its
//!    write) or on its own (`alone`: `jobs::enqueue_alone`, one statement). `enqueue_ms` is the
//!    whole of it (with `tx`: begin, enqueue, commit); `enqueue_call_ms` the enqueue call alone
//!    (with `tx`: what adding the job costs a transaction that writes anyway);
//! 2. drain: a pool with `concurrency` slots on the default queue (and `prefetch`) runs them all;
//!    jobs/s from its start until none is left unfinished in the database (looked up once every
//!    handler has run: the count is a query over the tenant's jobs, and running it every few
//!    milliseconds while the pool works would take a core from the two it shares);
//! 3. pickup: 200 jobs enqueued one at a time, 20 ms apart, with the pool idle; enqueue commit to
//!    handler start.
//!
//! Usage: job-load <app-database-url> <tenant-id> <jobs> <concurrency> <producers> <prefetch> <tx|alone>
//! Prints one JSON object.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use cybernetic::config::{DatabaseConfig, JobsConfig, Secret};
use cybernetic::db::{Db, tenant as scope};
use cybernetic::domain::tenant::TenantId;
use cybernetic::events::EventBus;
use cybernetic::events::hub::Hub;
use cybernetic::jobs::pool::Pool;
use cybernetic::jobs::{self, Enqueue, Job, JobContext, JobError, Registry};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Microseconds since the epoch when the job was enqueued; the handler records its pickup delay.
#[derive(Serialize, Deserialize)]
struct Noop {
    t: i64,
}

static PICKUPS: Mutex<Vec<f64>> = Mutex::new(Vec::new());

impl Job for Noop {
    const KIND: &'static str = "noop";

    async fn run(self, _ctx: JobContext) -> Result<Value, JobError> {
        let ms = (cybernetic::events::now_us() - self.t) as f64 / 1000.0;
        PICKUPS.lock().expect("pickups").push(ms);
        Ok(Value::Null)
    }
}

fn percentiles(mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    let at = |p: f64| {
        if v.is_empty() {
            return 0.0;
        }
        let i = ((v.len() - 1) as f64 * p).round() as usize;
        (v[i] * 1000.0).round() / 1000.0
    };
    json!({"count": v.len(), "p50": at(0.5), "p95": at(0.95), "p99": at(0.99), "max": at(1.0)})
}

/// Enqueues one job; returns how long the enqueue call itself took.
async fn enqueue_one(db: &Db, tenant: TenantId, alone: bool) -> anyhow::Result<Duration> {
    let job = Noop {
        t: cybernetic::events::now_us(),
    };
    if alone {
        let call = Instant::now();
        let _woken_already = jobs::enqueue_alone(db, tenant, &job, Enqueue::default()).await?;
        return Ok(call.elapsed());
    }
    let mut tx = scope::begin(db.primary(), tenant).await?;
    let call = Instant::now();
    let enqueued = jobs::enqueue(&mut tx, tenant, &job, Enqueue::default()).await?;
    let call = call.elapsed();
    tx.commit().await?;
    enqueued.wake.after_commit(db);
    Ok(call)
}

async fn unfinished(db: &Db, tenant: TenantId) -> anyhow::Result<i64> {
    let mut tx = scope::begin(db.primary(), tenant).await?;
    // Counted through the partial indexes of unfinished jobs, not a scan of every finished one.
    let (n,): (i64,) = sqlx::query_as(
        "select count(*) from jobs where state in ('available', 'retrying', 'running')",
    )
    .fetch_one(&mut *tx)
    .await?;
    tx.rollback().await?;
    Ok(n)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, tenant, jobs, concurrency, producers, prefetch, mode] = args.as_slice() else {
        anyhow::bail!(
            "usage: job-load <app-database-url> <tenant-id> <jobs> <concurrency> <producers> <prefetch> <tx|alone>"
        );
    };
    let alone = match mode.as_str() {
        "tx" => false,
        "alone" => true,
        other => anyhow::bail!("mode must be tx or alone, not {other}"),
    };
    let tenant = TenantId::from_uuid(tenant.parse()?);
    let (jobs, concurrency, producers, prefetch): (usize, usize, usize, usize) = (
        jobs.parse()?,
        concurrency.parse()?,
        producers.parse()?,
        prefetch.parse()?,
    );
    let db = Db::connect_lazy(
        &Secret::new(url.clone()),
        &DatabaseConfig {
            url: None,
            migration_url: None,
            replica_url: None,
            max_connections: u32::try_from(concurrency.max(producers) + 2)?,
            acquire_timeout: Duration::from_secs(30),
        },
    )?;

    // Phase 1: enqueue latency.
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..producers {
        let db = db.clone();
        let share = jobs / producers;
        tasks.spawn(async move {
            let mut lat = Vec::with_capacity(share);
            let mut calls = Vec::with_capacity(share);
            for _ in 0..share {
                let t = Instant::now();
                let call = enqueue_one(&db, tenant, alone).await?;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                calls.push(call.as_secs_f64() * 1000.0);
            }
            anyhow::Ok((lat, calls))
        });
    }
    let mut enqueue_lat = Vec::with_capacity(jobs);
    let mut call_lat = Vec::with_capacity(jobs);
    while let Some(done) = tasks.join_next().await {
        let (lat, calls) = done??;
        enqueue_lat.extend(lat);
        call_lat.extend(calls);
    }
    let enqueue_s = started.elapsed().as_secs_f64();
    let enqueued = enqueue_lat.len();

    // Phase 2: drain.
    let config = JobsConfig {
        concurrency: [0, concurrency, 0, 0],
        poll_interval: Duration::from_millis(250),
        lease: Duration::from_secs(15),
        prefetch,
        drain_timeout: Duration::from_secs(5),
        retention: Duration::from_secs(7 * 24 * 3600),
        cron: cybernetic::config::CronConfig::default(),
    };
    let bus = EventBus::new(Hub::new(db.clone(), 64), None);
    let pool = Pool::new(db.clone(), bus, Registry::new().register::<Noop>(), config);
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let running = pool.spawn(shutdown.clone());
    let give_up_waiting = Instant::now() + Duration::from_secs(120);
    while PICKUPS.lock().expect("pickups").len() < enqueued && Instant::now() < give_up_waiting {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    while unfinished(&db, tenant).await? > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drain_s = started.elapsed().as_secs_f64();

    // Phase 3: pickup while idle.
    PICKUPS.lock().expect("pickups").clear();
    for _ in 0..200 {
        enqueue_one(&db, tenant, alone).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while PICKUPS.lock().expect("pickups").len() < 200 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pickups = std::mem::take(&mut *PICKUPS.lock().expect("pickups"));
    shutdown.cancel();
    running.await?;

    println!(
        "{}",
        json!({
            "jobs": enqueued,
            "producers": producers,
            "concurrency": concurrency,
            "prefetch": prefetch,
            "enqueue_per_s": (enqueued as f64 / enqueue_s).round(),
            "enqueue_ms": percentiles(enqueue_lat),
            "enqueue_call_ms": percentiles(call_lat),
            "drain_s": (drain_s * 1000.0).round() / 1000.0,
            "drain_jobs_per_s": (enqueued as f64 / drain_s).round(),
            "pickup_ms": percentiles(pickups),
        })
    );
    Ok(())
}
