//! The integration tests: the real server on port 0, real PostgreSQL as the app role, a fresh
//! database per test.

mod artifacts;
mod auth;
mod cli;
mod events;
mod health;
mod helpers;
mod isolation;
mod jobs;
mod malformed;
mod metrics;
mod replica;
mod resources;
mod storage;
mod streams;
mod systems;
mod telegram;
mod tls;
mod webhooks;
mod workers;
