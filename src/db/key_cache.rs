//! In-process cache of API key lookups, so an authenticated request does not spend a database
//! round trip (plus the pool's release check) on a key it saw a moment ago.
//!
//! Revocation still takes effect at once: a trigger on `api_keys` (migration 000002) sends
//! `NOTIFY` on [`REVOCATION_CHANNEL`] for every revocation, deletion or role change, every
//! replica's listener drops the key when the transaction commits, and the revoking process drops
//! it before answering. The cache is trusted only while the listener demonstrably hears: every
//! [`HEARTBEAT`] the listener sends itself a notification through another connection, and if one
//! does not come back within [`HEARTBEAT_DEADLINE`] (a silently dead connection, or a pooler that
//! does not pass LISTEN through) the cache is switched off and every request asks the database
//! until a new listener is confirmed. A lookup that raced a revocation cannot re-insert the
//! revoked key: each invalidation bumps a generation, and a lookup only stores its result if the
//! generation is unchanged since it started.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::DbResult;
use super::api_keys::{self, KeyOwner};

pub const REVOCATION_CHANNEL: &str = "cybernetic_api_key_revoked";

/// How long a cached lookup is trusted; a refresh also records the key's last use.
const TTL: Duration = Duration::from_secs(30);
/// How often the listener proves it still hears notifications.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// How long a heartbeat may take to come back before the listener counts as deaf.
pub const HEARTBEAT_DEADLINE: Duration = Duration::from_secs(3);
const HEARTBEAT_PREFIX: &str = "heartbeat:";
/// Only valid keys are cached, so this bounds memory even under a flood of unknown keys.
const MAX_ENTRIES: usize = 100_000;

#[derive(Clone, Default)]
pub struct KeyCache {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: RwLock<HashMap<[u8; 32], (KeyOwner, Instant)>>,
    generation: AtomicU64,
    /// True while the revocation listener is connected.
    live: AtomicBool,
}

impl KeyCache {
    /// The owner of a valid, unrevoked key, from the cache when it can be trusted.
    pub async fn authenticate(
        &self,
        pool: &PgPool,
        secret_hash: &[u8; 32],
    ) -> DbResult<Option<KeyOwner>> {
        let live = self.inner.live.load(Ordering::Acquire);
        if live && let Some(owner) = self.fresh(secret_hash) {
            return Ok(Some(owner));
        }
        let generation = self.inner.generation.load(Ordering::Acquire);
        let owner = api_keys::authenticate(pool, secret_hash).await?;
        if let Some(owner) = owner
            && live
        {
            let mut entries = self.write();
            if self.inner.generation.load(Ordering::Acquire) == generation {
                if entries.len() >= MAX_ENTRIES {
                    entries.clear();
                }
                entries.insert(*secret_hash, (owner, Instant::now()));
            }
        }
        Ok(owner)
    }

    /// Forgets one key (after revoking it here, or on a notification from another replica).
    pub fn forget(&self, key_id: Uuid) {
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        self.write().retain(|_, (owner, _)| owner.key_id != key_id);
    }

    fn forget_all(&self) {
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        self.write().clear();
    }

    fn fresh(&self, secret_hash: &[u8; 32]) -> Option<KeyOwner> {
        let entries = self
            .inner
            .entries
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        entries
            .get(secret_hash)
            .filter(|(_, at)| at.elapsed() < TTL)
            .map(|(owner, _)| *owner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<[u8; 32], (KeyOwner, Instant)>> {
        // The map holds plain data; a panic elsewhere cannot leave it half-updated.
        self.inner
            .entries
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set_live(&self, live: bool) {
        self.forget_all();
        self.inner.live.store(live, Ordering::Release);
    }

    /// Listens for revocations until shutdown, reconnecting with backoff.
    pub fn spawn_listener(&self, pool: PgPool, shutdown: CancellationToken) {
        const FIRST_RETRY: Duration = Duration::from_millis(250);
        let cache = self.clone();
        tokio::spawn(async move {
            let mut backoff = FIRST_RETRY;
            loop {
                match listen(&cache, &pool, &shutdown).await {
                    Ok(()) => {
                        // Shutting down: nothing watches for revocations any more.
                        cache.set_live(false);
                        return;
                    }
                    Err(e) => tracing::debug!(error = %e, "revocation listener failed"),
                }
                // A listener that had connected failed later: start the backoff over.
                if cache.inner.live.load(Ordering::Acquire) {
                    backoff = FIRST_RETRY;
                }
                cache.set_live(false);
                tracing::warn!(retry_in = ?backoff, "API key revocation listener down; key cache off");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        });
    }
}

/// Runs one listener connection; returns `Ok` on shutdown and `Err` when the connection fails,
/// drops, or stops hearing its own heartbeats (the caller turns caching off at once, then builds
/// a new listener).
async fn listen(
    cache: &KeyCache,
    pool: &PgPool,
    shutdown: &CancellationToken,
) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    // Report a dropped connection instead of reconnecting silently: revocations sent while it is
    // down would be missed, and the cache must not be trusted meanwhile.
    listener.eager_reconnect(false);
    listener.listen(REVOCATION_CHANNEL).await?;
    tracing::debug!("API key revocation listener connected; waiting for its first heartbeat");

    let mut beat = tokio::time::interval(HEARTBEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The heartbeat in flight: its payload and when it must have come back.
    let mut awaiting: Option<(String, tokio::time::Instant)> = None;
    loop {
        let deadline = awaiting.as_ref().map(|(_, at)| *at);
        let notification = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = beat.tick(), if awaiting.is_none() => {
                let payload = format!("{HEARTBEAT_PREFIX}{}", Uuid::new_v4());
                sqlx::query("select pg_notify($1, $2)")
                    .bind(REVOCATION_CHANNEL)
                    .bind(&payload)
                    .execute(pool)
                    .await?;
                awaiting = Some((payload, tokio::time::Instant::now() + HEARTBEAT_DEADLINE));
                continue;
            }
            () = sleep_until_or_forever(deadline) => return Err(deaf()),
            n = listener.try_recv() => n?,
        };
        let Some(notification) = notification else {
            return Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "revocation listener connection dropped",
            )));
        };
        let payload = notification.payload();
        if payload.starts_with(HEARTBEAT_PREFIX) {
            if awaiting.as_ref().is_some_and(|(sent, _)| sent == payload) {
                awaiting = None;
                // Trusted only once the listener has shown it hears (a pooler that does not pass
                // LISTEN through never gets here, and the cache stays off).
                if !cache.inner.live.load(Ordering::Acquire) {
                    cache.set_live(true);
                }
            }
            continue;
        }
        match Uuid::parse_str(payload) {
            Ok(key_id) => cache.forget(key_id),
            // Not ours to interpret: forget everything to stay safe.
            Err(_) => cache.forget_all(),
        }
    }
}

async fn sleep_until_or_forever(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn deaf() -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "revocation listener did not hear its own heartbeat",
    ))
}
