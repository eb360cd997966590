//! `AppState`: the cheap-to-clone handles every handler may use.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db::Db;
use crate::db::key_cache::KeyCache;
use crate::events::EventBus;
use crate::routes::metrics::MetricsEndpoint;

#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub keys: KeyCache,
    pub events: EventBus,
    pub config: Arc<Config>,
    pub metrics: Arc<MetricsEndpoint>,
    /// Where artifacts' bytes are kept.
    pub storage: Arc<dyn crate::storage::Storage>,
    /// The Telegram webhook's batching enqueue.
    pub telegram: crate::telegram::intake::Intake,
    /// Cancelled when shutdown begins: readiness fails from that moment.
    pub shutdown: CancellationToken,
}
