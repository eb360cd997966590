//! `App::build` binds the listener and assembles the state; `App::run` serves until shutdown,
//! then drains (see server.rs): readiness fails first, the listener closes after the readiness
//! delay, and in-flight requests get at most the drain timeout to finish.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};
use crate::db::Db;
use crate::db::key_cache::KeyCache;
use crate::events::broker::Broker;
use crate::events::hub::Hub;
use crate::events::{EventBus, retention};
use crate::http::router;
use crate::jobs::pool::Pool;
use crate::jobs::{Registry, maintenance};
use crate::routes::metrics::MetricsEndpoint;
use crate::server::{self, Drain};
use crate::state::AppState;
use crate::telemetry;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("invalid database options: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    UnsafeRole(#[from] crate::db::RoleError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open the artifact storage: {0}")]
    Storage(#[from] crate::storage::StorageError),
}

/// What a process runs.
#[derive(Clone)]
pub enum Mode {
    /// The HTTP API, event streams and metrics, with the job pool running these kinds in-process
    /// (`None`: `serve --no-workers`).
    Serve { jobs: Option<Registry> },
    /// The job pool alone; the listener serves only `/health/*` and `/metrics`.
    Worker { jobs: Registry },
}

pub struct App {
    listener: TcpListener,
    router: Router,
    state: AppState,
    jobs: Option<Registry>,
}

impl App {
    /// [`App::build_as`] for `serve` with the platform's job kinds.
    pub async fn build(config: Config, shutdown: CancellationToken) -> Result<Self, StartupError> {
        let jobs = Some(Registry::platform(&config));
        Self::build_as(config, shutdown, Mode::Serve { jobs }).await
    }

    /// Binds the listener and builds everything the server needs. The database is connected
    /// lazily: the server starts while it is down and reports not ready until it answers.
    pub async fn build_as(
        config: Config,
        shutdown: CancellationToken,
        mode: Mode,
    ) -> Result<Self, StartupError> {
        let db = Db::connect_lazy(config.database_url()?, &config.database)?;
        // Refuse a role that bypasses row-level security. While the database is unreachable the
        // check is left to readiness, which repeats it.
        match tokio::time::timeout(std::time::Duration::from_secs(5), db.check_role()).await {
            Ok(Err(unsafe_role @ crate::db::RoleError::Unsafe { .. })) => {
                return Err(unsafe_role.into());
            }
            Ok(Err(crate::db::RoleError::Sqlx(e))) => {
                tracing::warn!(error = %e, "database not reachable at start")
            }
            Ok(Ok(())) | Err(_) => {}
        }
        let metrics = telemetry::metrics_handle();
        let hub = Hub::new(db.clone(), config.events.buffer);
        let broker = config
            .events
            .amqp_url
            .clone()
            .map(|url| Broker::start(url, hub.clone(), shutdown.clone()));
        let addr = config.http.listen_addr;
        let listener =
            server::listen(addr).map_err(|source| StartupError::Bind { addr, source })?;
        let storage = crate::storage::open(&config.storage.backend).await?;
        let state = AppState {
            storage,
            telegram: crate::telegram::intake::Intake::start(db.clone()),
            keys: KeyCache::default(),
            events: EventBus::new(hub, broker),
            metrics: Arc::new(MetricsEndpoint::new(
                metrics,
                config.metrics.rate_limit_per_second,
            )),
            db,
            config: Arc::new(config),
            shutdown,
        };
        let (router, jobs) = match mode {
            Mode::Serve { jobs } => (router::build(state.clone()), jobs),
            Mode::Worker { jobs } => (router::build_ops(state.clone()), Some(jobs)),
        };
        let jobs = jobs.map(|registry| registry.with_storage(state.storage.clone()));
        Ok(Self {
            listener,
            router,
            state,
            jobs,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn run(self) -> std::io::Result<()> {
        let Self {
            listener,
            router,
            state,
            jobs,
        } = self;
        let shutdown = state.shutdown.clone();
        telemetry::spawn_upkeep(state.metrics.handle(), shutdown.clone());
        state.db.spawn_replica_probe(shutdown.clone());
        state
            .keys
            .spawn_listener(state.db.ops().clone(), shutdown.clone());
        state.events.hub().spawn_poller(shutdown.clone());
        retention::spawn(
            state.db.clone(),
            state.config.events.retention,
            shutdown.clone(),
        );
        let pool = jobs.map(|registry| {
            maintenance::spawn(
                state.db.clone(),
                state.config.jobs.retention,
                shutdown.clone(),
            );
            Pool::new(
                state.db.clone(),
                state.events.clone(),
                registry,
                state.config.jobs.clone(),
            )
            .spawn(shutdown.clone())
        });
        tracing::info!(addr = %listener.local_addr()?, "listening");
        let drain = Drain {
            readiness_delay: state.config.shutdown.readiness_delay,
            timeout: state.config.shutdown.drain_timeout,
        };
        server::serve(listener, router, shutdown, drain).await;
        // The pool drains in parallel with the HTTP server, bounded by JOB_DRAIN_TIMEOUT.
        if let Some(pool) = pool
            && let Err(e) = pool.await
        {
            tracing::error!(error = %e, "job pool ended abnormally");
        }
        state.db.close(std::time::Duration::from_secs(2)).await;
        tracing::info!("stopped");
        Ok(())
    }
}
