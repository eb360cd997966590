//! The Telegram bot: what arrives at `/telegram/webhook` (updates), what the commands are, how
//! replies are laid out within Telegram's limits, and the Bot API client that sends them.
//!
//! The intake (`routes::telegram`) only verifies and enqueues; commands run in the
//! `telegram_update` job and their replies go out through the `notification` job.

pub mod client;
pub mod command;
pub mod format;
pub mod intake;
pub mod update;

pub use client::{BotApi, SendError};
