//! Cybernetic: a multi-tenant platform service for organisations run on the Viable System Model.

/// Episode analysis behind one trait: the deterministic text analyzer, and room for others.
pub mod analysis;
/// Command-line interface and operator commands.
pub mod cli;
/// Typed configuration from the environment.
pub mod config;
/// PostgreSQL pools, migrations and repositories; the one way into tenant data.
pub mod db;
/// IO-free domain types parsed at the edges.
pub mod domain;
/// The event log's fast path: in-process hub, RabbitMQ fan-out, retention.
pub mod events;
/// Router, middleware, errors and extractors.
pub mod http;
/// Background jobs: typed kinds, transactional enqueue, the pool that runs them.
pub mod jobs;
/// HTTP handlers, one module per resource.
pub mod routes;
/// The accept loop with bounded graceful shutdown.
pub mod server;
/// Signal handling for graceful shutdown.
pub mod shutdown;
/// Building and running the server.
pub mod startup;
/// Handles shared by all handlers.
pub mod state;
/// Object storage: one trait, local-filesystem, S3-compatible and in-memory backends.
pub mod storage;
/// The Telegram bot: updates, commands, reply layout and the Bot API client.
pub mod telegram;
/// Logging and metrics setup.
pub mod telemetry;
