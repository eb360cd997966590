//! `telegram_update`: runs the command in one Telegram message, enqueued by `POST
//! /telegram/webhook` as a platform job keyed by the update's id (so a redelivered update is one
//! job, whichever replica it reaches).
//!
//! The chat's tenant is looked up first; a chat no tenant has linked may only `/start`, `/link`
//! and `/help`. A command reads and writes in its tenant's transaction through the same functions
//! as the HTTP API (same rows, same events, same row-level security), and its reply is enqueued as
//! a `notification` job in that same transaction under the key `telegram:reply:<update id>`: if an
//! earlier attempt of this job already committed, that key is taken, and this attempt rolls back
//! instead of running the command twice.
//!
//! Limits: each chat may run `TELEGRAM_CHAT_RATE` commands a minute with bursts of
//! `TELEGRAM_CHAT_BURST` (kept in PostgreSQL, so the limit holds across every replica); the first
//! command over it gets one polite reply, the ones after it none, until the chat is under the limit
//! again. Each process runs at most `TELEGRAM_GLOBAL_RATE` commands a second; the rest wait.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::notification::{ChatMessage, Notification};
use super::{Enqueue, Job, JobContext, JobError, Wake};
use crate::config::TelegramConfig;
use crate::db::events::{self, Event};
use crate::db::telegram::{self as store, Allowance, NewChat, Redeemed};
use crate::db::{DbError, episodes, policies, system_states, tenant as scope, tenants, violations};
use crate::domain::event_type::EventType;
use crate::domain::job::{JobState, Queue};
use crate::domain::tenant::TenantId;
use crate::telegram::command::{self, COMMANDS, Command, Parsed};
use crate::telegram::format::Reply;
use crate::telegram::update::{Message, User};
use crate::telegram::{BotApi, SendError};

/// Subscriptions one chat may hold.
const MAX_SUBSCRIPTIONS: usize = 20;
/// Lines a list reply shows at most.
const MAX_LIST: i64 = 50;

/// The bot as the jobs use it: its settings, its Bot API client (when a token is configured), and
/// the process-wide command limit.
#[derive(Clone)]
pub struct Bot {
    pub config: TelegramConfig,
    pub api: Option<BotApi>,
    commands: Arc<DefaultDirectRateLimiter>,
}

impl Bot {
    pub fn new(config: TelegramConfig, http: reqwest::Client) -> Self {
        let per_second = std::num::NonZeroU32::new(config.global_per_second)
            .unwrap_or(std::num::NonZeroU32::MIN);
        Self {
            api: BotApi::from_config(&config, http),
            commands: Arc::new(RateLimiter::direct(Quota::per_second(per_second))),
            config,
        }
    }

    /// Time per command in a chat's allowance.
    fn chat_interval(&self) -> Duration {
        Duration::from_secs(60) / self.config.chat_per_minute.max(1)
    }
}

/// The code a link-code row stores: SHA-256 of the code as typed, uppercased, dashes dropped.
pub fn link_code_hash(code: &str) -> String {
    let normal: String = code
        .chars()
        .filter(|c| *c != '-')
        .flat_map(char::to_uppercase)
        .collect();
    hex::encode(Sha256::digest(normal.as_bytes()))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TelegramUpdate {
    pub update_id: i64,
    pub message: Message,
}

impl Job for TelegramUpdate {
    const KIND: &'static str = "telegram_update";
    /// Someone is waiting for the answer.
    const QUEUE: Queue = Queue::Critical;
    const MAX_ATTEMPTS: i32 = 10;
    const TIMEOUT: Duration = Duration::from_secs(60);

    async fn run(self, ctx: JobContext) -> Result<Value, JobError> {
        let bot = &ctx.services.telegram;
        let chat = &self.message.chat;
        let parsed = command::parse(self.message.text.as_deref().unwrap_or_default());
        // In a group, ordinary conversation is not for the bot.
        if parsed == Parsed::NotACommand && chat.kind != "private" {
            return Ok(json!({"ignored": "not a command"}));
        }
        bot.commands.until_ready().await;
        let pool = ctx.db.primary();
        // Only the first attempt counts against the chat: a retry is the same command.
        let allowance = if ctx.attempt == 1 {
            store::take_token(pool, chat.id, bot.chat_interval(), bot.config.chat_burst).await?
        } else {
            Allowance::Allowed
        };
        match allowance {
            Allowance::Allowed => {}
            Allowance::Silent => return Ok(json!({"throttled": true, "replied": false})),
            Allowance::Throttled => {
                let reply = Reply::text(format!(
                    "Easy there: this chat can send {} commands a minute. I'll answer again in \
                     a moment.",
                    bot.config.chat_per_minute
                ));
                metrics::counter!("telegram_commands_total", "command" => "throttled").increment(1);
                return self.reply_unlinked(&ctx, &reply, "throttled").await;
            }
        }
        let label = match &parsed {
            Parsed::Command(c) => c.name(),
            Parsed::BadArguments { command, .. } => command,
            Parsed::Unknown(_) | Parsed::NotACommand => "unknown",
        };
        metrics::counter!("telegram_commands_total", "command" => label).increment(1);

        let link = store::chat_tenant(pool, chat.id).await?;
        if let Some((tenant, false)) = link {
            self.reactivate(&ctx, tenant).await?;
        }
        let command = match parsed {
            Parsed::Command(command) => command,
            Parsed::NotACommand => {
                let reply = Reply::text("I understand commands: send /help to see them.");
                return self.reply(&ctx, link.map(|l| l.0), reply, "hint").await;
            }
            Parsed::Unknown(name) => {
                let reply = Reply::text(format!(
                    "I don't know /{name}. Send /help to see what I can do."
                ));
                return self.reply(&ctx, link.map(|l| l.0), reply, "unknown").await;
            }
            Parsed::BadArguments { reason, .. } => {
                return self
                    .reply(
                        &ctx,
                        link.map(|l| l.0),
                        Reply::text(reason),
                        "bad_arguments",
                    )
                    .await;
            }
        };
        match (command, link) {
            (Command::Help, link) => {
                let reply = help(link.is_some());
                self.reply(&ctx, link.map(|l| l.0), reply, "help").await
            }
            (Command::Link(code), link) => self.link(&ctx, code, link.map(|l| l.0)).await,
            (_, None) => {
                let reply = Reply::text(
                    "This chat is not linked to an organisation yet. Ask one of its admins for \
                     a link code, then send /start CODE. /help lists the commands.",
                );
                self.reply_unlinked(&ctx, &reply, "not_linked").await
            }
            (command, Some((tenant, _))) => self.run_linked(&ctx, tenant, command).await,
        }
    }
}

/// What a command did: its reply and the events to hand to the bus after the commit.
struct Done {
    reply: Reply,
    events: Vec<Event>,
    /// The queues of jobs the command enqueued, woken after the commit.
    wake: Wake,
}

impl Done {
    fn reply(reply: Reply) -> Self {
        Self::with_events(reply, Vec::new())
    }

    fn with_events(reply: Reply, events: Vec<Event>) -> Self {
        Self {
            reply,
            events,
            wake: Wake::default(),
        }
    }
}

impl TelegramUpdate {
    fn reply_key(&self) -> String {
        format!("telegram:reply:{}", self.update_id)
    }

    /// Replies without doing anything else: in the tenant's transaction (recorded in its
    /// notifications) when the chat is linked, else as a platform job.
    async fn reply(
        &self,
        ctx: &JobContext,
        tenant: Option<TenantId>,
        reply: Reply,
        outcome: &str,
    ) -> Result<Value, JobError> {
        match tenant {
            None => self.reply_unlinked(ctx, &reply, outcome).await,
            Some(tenant) => {
                let tx = scope::begin(ctx.db.primary(), tenant).await?;
                self.commit(ctx, tx, tenant, Done::reply(reply), outcome)
                    .await
            }
        }
    }

    async fn reply_unlinked(
        &self,
        ctx: &JobContext,
        reply: &Reply,
        outcome: &str,
    ) -> Result<Value, JobError> {
        let message = Notification::Chat(ChatMessage {
            chat_id: self.message.chat.id,
            notification_id: None,
            parts: reply.render(),
            event_position: None,
        });
        let args = serde_json::to_value(&message)
            .map_err(|e| JobError::permanent(format!("cannot encode the reply: {e}")))?;
        let (job, created) = store::enqueue_platform(
            &ctx.db,
            Notification::KIND,
            Notification::QUEUE,
            &args,
            Notification::MAX_ATTEMPTS,
            &self.reply_key(),
        )
        .await?;
        Ok(json!({"outcome": outcome, "reply_job_id": job, "duplicate": !created}))
    }

    /// Enqueues the reply in the command's transaction and commits, unless an earlier attempt
    /// already did (then this one rolls back).
    async fn commit(
        &self,
        ctx: &JobContext,
        mut tx: scope::Tx,
        tenant: TenantId,
        done: Done,
        outcome: &str,
    ) -> Result<Value, JobError> {
        let chat_id = self.message.chat.id;
        let notification_id = Uuid::now_v7();
        let message = Notification::Chat(ChatMessage {
            chat_id,
            notification_id: Some(notification_id),
            parts: done.reply.render(),
            event_position: None,
        });
        let key = self.reply_key();
        let how = Enqueue {
            idempotency_key: Some(&key),
            ..Enqueue::default()
        };
        let enqueued = super::enqueue(&mut tx, tenant, &message, how).await?;
        if !enqueued.created {
            // An earlier attempt ran the command and committed; running it again would repeat it.
            return Ok(json!({"outcome": outcome, "duplicate": true}));
        }
        store::insert_notification(
            &mut tx,
            tenant,
            notification_id,
            chat_id,
            "reply",
            enqueued.id,
        )
        .await?;
        tx.commit().await.map_err(DbError::from)?;
        done.wake.and(enqueued.wake).after_commit(&ctx.db);
        ctx.events.committed(&done.events).await;
        Ok(json!({
            "outcome": outcome,
            "reply_job_id": enqueued.id,
            "notification_id": notification_id,
        }))
    }

    async fn link(
        &self,
        ctx: &JobContext,
        code: Option<String>,
        linked: Option<TenantId>,
    ) -> Result<Value, JobError> {
        let pool = ctx.db.primary();
        let Some(code) = code else {
            let reply = match linked {
                Some(_) => Reply::text("This chat is linked already. /help lists the commands."),
                None => Reply::text(
                    "Hello! I'm the Cybernetic bot. To link this chat to your organisation, ask \
                     one of its admins for a link code and send /start CODE.",
                ),
            };
            return self.reply(ctx, linked, reply, "hello").await;
        };
        let hash = link_code_hash(&code);
        let Some(tenant) = store::link_code_tenant(pool, &hash).await? else {
            let reply = Reply::text("That code is not valid. Check it, or ask for a new one.");
            return self.reply(ctx, linked, reply, "code_unknown").await;
        };
        if let Some(current) = linked {
            let reply = if current == tenant {
                Reply::text("This chat is linked to that organisation already.")
            } else {
                Reply::text(
                    "This chat is linked to another organisation. Send /unlink first, then the \
                     code again.",
                )
            };
            return self.reply(ctx, linked, reply, "already_linked").await;
        }
        let chat = &self.message.chat;
        let mut tx = scope::begin(pool, tenant).await?;
        let failure = match store::redeem_link_code(&mut tx, tenant, &hash, chat.id).await? {
            Redeemed::Used => None,
            Redeemed::Expired => {
                Some(("code_expired", "That code has expired. Ask for a new one."))
            }
            Redeemed::AlreadyUsed => Some((
                "code_used",
                "That code has been used already. Ask for a new one.",
            )),
            Redeemed::Unknown => Some(("code_unknown", "That code is not valid.")),
        };
        if let Some((outcome, text)) = failure {
            drop(tx);
            return self.reply_unlinked(ctx, &Reply::text(text), outcome).await;
        }
        let title = chat.display_name();
        let new = NewChat {
            chat_id: chat.id,
            chat_type: &chat.kind,
            title: Some(&title),
            linked_by: self.message.from.as_ref().map(|u| u.id),
        };
        let Some(linked) = store::insert_chat(&mut tx, tenant, &new).await? else {
            drop(tx);
            let reply = Reply::text("This chat was linked meanwhile. Send /whoami to see where.");
            return self.reply_unlinked(ctx, &reply, "already_linked").await;
        };
        let event = append(
            &mut tx,
            tenant,
            EventType::TELEGRAM_CHAT_LINKED,
            json!({"chat_id": linked.chat_id, "chat_type": linked.chat_type,
                   "title": linked.title, "linked_by": linked.linked_by}),
        )
        .await?;
        let name = tenant_name(&mut tx, tenant).await?;
        let reply = Reply::text(format!(
            "Linked to {name}. Try /status, or /subscribe policy.violated to get alerts here."
        ));
        let done = Done::with_events(reply, vec![event]);
        self.commit(ctx, tx, tenant, done, "linked").await
    }

    /// The chat writes again, so the bot can reach it again (a user who blocked the bot has to
    /// unblock it to send anything): alerts resume.
    async fn reactivate(&self, ctx: &JobContext, tenant: TenantId) -> Result<(), JobError> {
        let mut tx = scope::begin(ctx.db.primary(), tenant).await?;
        let chat_id = self.message.chat.id;
        if !store::reactivate(&mut tx, tenant, chat_id).await? {
            return Ok(());
        }
        let event = append(
            &mut tx,
            tenant,
            EventType::TELEGRAM_CHAT_REACTIVATED,
            json!({"chat_id": chat_id}),
        )
        .await?;
        tx.commit().await.map_err(DbError::from)?;
        ctx.events.committed(std::slice::from_ref(&event)).await;
        Ok(())
    }

    async fn run_linked(
        &self,
        ctx: &JobContext,
        tenant: TenantId,
        command: Command,
    ) -> Result<Value, JobError> {
        let outcome = command.name();
        let mut tx = scope::begin(ctx.db.primary(), tenant).await?;
        let chat_id = self.message.chat.id;
        let done = match command {
            Command::Help | Command::Link(_) => Done::reply(help(true)),
            Command::Unlink => {
                let name = tenant_name(&mut tx, tenant).await?;
                match store::delete_chat(&mut tx, tenant, chat_id).await? {
                    None => Done::reply(Reply::text("This chat is not linked.")),
                    Some(chat) => {
                        let event = append(
                            &mut tx,
                            tenant,
                            EventType::TELEGRAM_CHAT_UNLINKED,
                            json!({"chat_id": chat.chat_id, "title": chat.title, "by": "chat"}),
                        )
                        .await?;
                        Done::with_events(
                            Reply::text(format!(
                                "Unlinked from {name}. Its subscriptions here are gone too."
                            )),
                            vec![event],
                        )
                    }
                }
            }
            Command::Status => Done::reply(status(&mut tx, tenant).await?),
            Command::Episodes(n) => {
                let rows = episodes::list(&mut tx, tenant, None, i64::from(n)).await?;
                let mut reply = Reply::new();
                if rows.is_empty() {
                    reply.line("No episodes yet. Record one: /episode Title | what happened");
                } else {
                    reply.heading(format!("Latest {} episodes", rows.len()));
                    for e in rows {
                        reply.line(format!(
                            "{} · {}",
                            e.created_at.format("%Y-%m-%d %H:%M"),
                            e.title
                        ));
                    }
                }
                Done::reply(reply)
            }
            Command::Episode { title, text } => {
                match crate::routes::episodes::NewEpisode::parse(&title, text) {
                    Err(e) => Done::reply(Reply::text(format!("Not recorded: {e}"))),
                    Ok(new) => {
                        let (episode, event, wake) =
                            match crate::routes::episodes::record(&mut tx, tenant, &new).await {
                                Ok(done) => done,
                                Err(e) if e.status().is_client_error() => {
                                    let reply =
                                        Reply::text(format!("Not recorded: {}", e.detail()));
                                    return self
                                        .commit(ctx, tx, tenant, Done::reply(reply), outcome)
                                        .await;
                                }
                                Err(e) => return Err(JobError::retry(e.detail().to_owned())),
                            };
                        let mut reply = Reply::new();
                        reply
                            .line(format!("Recorded episode “{}” ", episode.title))
                            .code(episode.id.to_string());
                        reply.line("Its analysis is queued.");
                        Done {
                            wake,
                            ..Done::with_events(reply, vec![event])
                        }
                    }
                }
            }
            Command::Policies => {
                let rows = policies::list(&mut tx, tenant, None, MAX_LIST).await?;
                let mut reply = Reply::new();
                if rows.is_empty() {
                    reply.line("No policies yet.");
                } else {
                    reply.heading("Policies");
                    for p in rows {
                        let rules = p.rules.as_array().map_or(0, Vec::len);
                        reply.line(format!(
                            "{} {} · v{} · {rules} rule(s)",
                            if p.active { "●" } else { "○" },
                            p.name,
                            p.version
                        ));
                    }
                }
                Done::reply(reply)
            }
            Command::Violations => {
                let rows = violations::open(&mut tx, tenant).await?;
                let mut reply = Reply::new();
                if rows.is_empty() {
                    reply.line("No open violations. ✅");
                } else {
                    reply.heading(format!("{} open violation(s)", rows.len()));
                    for v in rows.iter().take(MAX_LIST as usize) {
                        reply.line(format!(
                            "[{}] {} · S{} · since {}",
                            v.severity,
                            v.policy_name,
                            v.system,
                            v.opened_at.format("%Y-%m-%d %H:%M UTC")
                        ));
                    }
                }
                Done::reply(reply)
            }
            Command::Jobs => {
                let rows = crate::db::jobs::list(
                    &mut tx,
                    tenant,
                    Some(JobState::Dead),
                    None,
                    None,
                    MAX_LIST,
                )
                .await?;
                let mut reply = Reply::new();
                if rows.is_empty() {
                    reply.line("No failed jobs. ✅");
                } else {
                    reply.heading(format!("{} failed job(s)", rows.len()));
                    for j in rows {
                        reply.line(format!("{} · ", j.kind)).code(j.id.to_string());
                        if let Some(error) = j.last_error {
                            let short: String = error.chars().take(200).collect();
                            reply.line(format!("  {short}"));
                        }
                    }
                    reply.line("Run one again with /retry JOB_ID");
                }
                Done::reply(reply)
            }
            Command::Retry(id) => match crate::routes::jobs::retry_in(&mut tx, tenant, id).await {
                Ok((job, event)) => {
                    let mut reply = Reply::new();
                    reply
                        .line(format!("Queued {} again: ", job.kind))
                        .code(job.id.to_string());
                    Done::with_events(reply, vec![event])
                }
                Err(e) if e.status().is_client_error() => {
                    Done::reply(Reply::text(format!("Not retried: {}", e.detail())))
                }
                Err(e) => return Err(JobError::retry(e.detail().to_owned())),
            },
            Command::Subscribe(pattern) => {
                let chat = store::get_chat(&mut tx, tenant, chat_id).await?;
                let count = chat.as_ref().map_or(0, |c| c.subscriptions.len());
                if count >= MAX_SUBSCRIPTIONS {
                    Done::reply(Reply::text(format!(
                        "This chat follows {MAX_SUBSCRIPTIONS} patterns already; /unsubscribe one first."
                    )))
                } else if store::subscribe(&mut tx, tenant, chat_id, &pattern).await? {
                    let event = append(
                        &mut tx,
                        tenant,
                        EventType::TELEGRAM_SUBSCRIBED,
                        json!({"chat_id": chat_id, "pattern": pattern}),
                    )
                    .await?;
                    Done::with_events(
                        Reply::text(format!(
                            "Subscribed: events matching {pattern} will be posted here."
                        )),
                        vec![event],
                    )
                } else {
                    Done::reply(Reply::text(format!("This chat follows {pattern} already.")))
                }
            }
            Command::Unsubscribe(pattern) => {
                if store::unsubscribe(&mut tx, tenant, chat_id, &pattern).await? {
                    let event = append(
                        &mut tx,
                        tenant,
                        EventType::TELEGRAM_UNSUBSCRIBED,
                        json!({"chat_id": chat_id, "pattern": pattern}),
                    )
                    .await?;
                    Done::with_events(
                        Reply::text(format!("Unsubscribed from {pattern}.")),
                        vec![event],
                    )
                } else {
                    Done::reply(Reply::text(format!(
                        "This chat does not follow {pattern}. /whoami lists what it follows."
                    )))
                }
            }
            Command::Mute(duration) => {
                let until = duration
                    .and_then(|d| chrono::Duration::from_std(d).ok())
                    .map(|d| Utc::now() + d);
                store::set_muted(&mut tx, tenant, chat_id, until).await?;
                let event = append(
                    &mut tx,
                    tenant,
                    EventType::TELEGRAM_CHAT_MUTED,
                    json!({"chat_id": chat_id, "muted_until": until}),
                )
                .await?;
                let reply = match until {
                    Some(until) => Reply::text(format!(
                        "Alerts muted until {}. /mute off brings them back.",
                        until.format("%Y-%m-%d %H:%M UTC")
                    )),
                    None => Reply::text("Alerts are on again."),
                };
                Done::with_events(reply, vec![event])
            }
            Command::WhoAmI => {
                let name = tenant_name(&mut tx, tenant).await?;
                let chat = store::get_chat(&mut tx, tenant, chat_id).await?;
                Done::reply(whoami(
                    &name,
                    tenant,
                    chat.as_ref(),
                    self.message.from.as_ref(),
                ))
            }
        };
        self.commit(ctx, tx, tenant, done, outcome).await
    }
}

async fn append(
    tx: &mut sqlx::PgConnection,
    tenant: TenantId,
    event_type: &'static str,
    data: Value,
) -> Result<Event, JobError> {
    Ok(events::append(tx, tenant, &EventType::platform(event_type), &data).await?)
}

async fn tenant_name(tx: &mut sqlx::PgConnection, tenant: TenantId) -> Result<String, JobError> {
    Ok(tenants::find(tx, &tenant.as_uuid().to_string())
        .await?
        .map(|t| t.name)
        .unwrap_or_else(|| tenant.to_string()))
}

fn help(linked: bool) -> Reply {
    let mut reply = Reply::new();
    reply.heading("Cybernetic bot");
    for (name, what) in COMMANDS {
        reply.line(format!("/{name} — {what}"));
    }
    if !linked {
        reply.line("");
        reply.line("This chat is not linked yet: ask an admin for a code and send /start CODE.");
    }
    reply
}

async fn status(tx: &mut sqlx::PgConnection, tenant: TenantId) -> Result<Reply, JobError> {
    let states = system_states::latest_all(&mut *tx, tenant).await?;
    let open = violations::open(&mut *tx, tenant).await?;
    let dead: i64 =
        sqlx::query_scalar("select count(*) from jobs where tenant_id = $1 and state = 'dead'")
            .bind(tenant.as_uuid())
            .fetch_one(&mut *tx)
            .await
            .map_err(DbError::from)?;
    let mut reply = Reply::new();
    reply.heading("Systems");
    for system in 1..=5i16 {
        match states.iter().find(|s| s.system == system) {
            Some(s) => {
                let state: String = s.state.to_string().chars().take(300).collect();
                reply.line(format!(
                    "S{system} · v{} · {} · {state}",
                    s.version,
                    s.recorded_at.format("%Y-%m-%d %H:%M UTC")
                ));
            }
            None => {
                reply.line(format!("S{system} · no state recorded"));
            }
        }
    }
    let critical = open.iter().filter(|v| v.severity == "critical").count();
    reply.heading("Policies");
    reply.line(format!(
        "{} open violation(s){}",
        open.len(),
        if critical > 0 {
            format!(", {critical} critical")
        } else {
            String::new()
        }
    ));
    reply.heading("Jobs");
    reply.line(format!("{dead} failed job(s)"));
    Ok(reply)
}

fn whoami(name: &str, tenant: TenantId, chat: Option<&store::Chat>, from: Option<&User>) -> Reply {
    let mut reply = Reply::new();
    reply
        .line(format!("Organisation: {name} "))
        .code(tenant.to_string());
    if let Some(chat) = chat {
        reply
            .line(format!(
                "Chat: {} ({}) ",
                chat.title.as_deref().unwrap_or("-"),
                chat.chat_type
            ))
            .code(chat.chat_id.to_string());
        reply.line(format!(
            "Linked {}",
            chat.created_at.format("%Y-%m-%d %H:%M UTC")
        ));
        if chat.subscriptions.is_empty() {
            reply.line("Follows: nothing (/subscribe policy.violated)");
        } else {
            reply.line(format!("Follows: {}", chat.subscriptions.join(", ")));
        }
        if let Some(until) = chat.muted_until.filter(|u| *u > Utc::now()) {
            reply.line(format!(
                "Muted until {}",
                until.format("%Y-%m-%d %H:%M UTC")
            ));
        }
    }
    if let Some(user) = from {
        let handle = user
            .username
            .as_ref()
            .map(|u| format!("@{u}"))
            .or_else(|| user.first_name.clone())
            .unwrap_or_default();
        reply
            .line(format!("You: {handle} "))
            .code(user.id.to_string());
    }
    reply
}

/// Sends a chat message (the `notification` job's Telegram delivery).
pub(super) async fn deliver(ctx: &JobContext, message: ChatMessage) -> Result<Value, JobError> {
    let bot = &ctx.services.telegram;
    let tenant = ctx.tenant;
    let record = match (tenant, message.notification_id) {
        (Some(tenant), Some(id)) => Some((tenant, id)),
        _ => None,
    };
    let Some(api) = &bot.api else {
        // Another process may have the token (a worker started without it): left for it, until
        // the attempts run out; then the tenant's record says why it was never sent.
        let reason = "no Telegram bot is configured in this process (TELEGRAM_BOT_TOKEN)";
        if let Some((tenant, id)) = record.filter(|_| ctx.attempt >= ctx.max_attempts) {
            let mut tx = scope::begin(ctx.db.primary(), tenant).await?;
            store::record_attempt(&mut tx, tenant, id, "failed", Some(reason)).await?;
            tx.commit().await.map_err(DbError::from)?;
        }
        return Err(JobError::retry(reason));
    };
    // What was delivered by earlier attempts.
    let mut sent: Vec<i64> = Vec::new();
    if let Some((tenant, id)) = record {
        let mut tx = scope::begin(ctx.db.primary(), tenant).await?;
        let row = store::get_notification(&mut tx, tenant, id).await?;
        scope::end_read(tx);
        match row {
            None => return Ok(json!({"skipped": "the notification is gone"})),
            // `failed` and run again: a retry someone asked for (`POST /v1/jobs/{id}/retry`).
            Some(n) if n.status == "delivered" => return Ok(json!({"skipped": n.status})),
            Some(n) => sent = n.message_ids,
        }
    }
    let parts = match message.event_position {
        None => message.parts.clone(),
        Some(position) => {
            let tenant = ctx.tenant()?;
            let mut tx = scope::begin(ctx.db.primary(), tenant).await?;
            let chat = store::get_chat(&mut tx, tenant, message.chat_id).await?;
            // Unlinked, blocked or muted since the alert was queued: it is not sent.
            let gone = match &chat {
                None => Some("the chat was unlinked"),
                Some(c) if !c.active => Some("the chat is inactive"),
                Some(c) if c.muted_until.is_some_and(|u| u > Utc::now()) => {
                    Some("the chat is muted")
                }
                Some(_) => None,
            };
            if let Some(reason) = gone {
                if let Some((tenant, id)) = record {
                    store::record_attempt(&mut tx, tenant, id, "failed", Some(reason)).await?;
                    tx.commit().await.map_err(DbError::from)?;
                }
                return Ok(json!({"skipped": reason}));
            }
            let event = store::event_at(&mut tx, tenant, position).await?;
            scope::end_read(tx);
            match event {
                Some(event) => alert(&event).render(),
                None => Reply::text(format!("Event {position} is no longer in the log.")).render(),
            }
        }
    };
    for part in parts.iter().skip(sent.len()) {
        match api.send_message(message.chat_id, part).await {
            Ok(message_id) => {
                metrics::counter!("telegram_messages_sent_total", "outcome" => "sent").increment(1);
                sent.push(message_id);
                if let Some((tenant, id)) = record {
                    store::record_part(ctx.db.primary(), tenant, id, message_id).await?;
                }
            }
            Err(e) => return Err(failed(ctx, &message, record, e).await),
        }
    }
    if let Some((tenant, id)) = record {
        let mut tx = scope::begin(ctx.db.primary(), tenant).await?;
        store::record_attempt(&mut tx, tenant, id, "delivered", None).await?;
        tx.commit().await.map_err(DbError::from)?;
    }
    Ok(json!({"chat_id": message.chat_id, "message_ids": sent}))
}

/// Records a failed send and says what the pool should do with the job.
async fn failed(
    ctx: &JobContext,
    message: &ChatMessage,
    record: Option<(TenantId, Uuid)>,
    error: SendError,
) -> JobError {
    let (outcome, job_error) = match &error {
        SendError::RetryAfter(wait, _) => {
            ("rate_limited", JobError::retry_in(error.to_string(), *wait))
        }
        SendError::Forbidden(_) => ("forbidden", JobError::permanent(error.to_string())),
        SendError::Rejected(..) => ("rejected", JobError::permanent(error.to_string())),
        SendError::Unavailable(_) => ("failed", JobError::retry(error.to_string())),
    };
    metrics::counter!("telegram_messages_sent_total", "outcome" => outcome).increment(1);
    let last = job_error.permanent || ctx.attempt >= ctx.max_attempts;
    let result = async {
        let Some(tenant) = ctx.tenant else {
            return Ok::<(), JobError>(());
        };
        let mut tx = scope::begin(ctx.db.primary(), tenant).await?;
        let mut events = Vec::new();
        if matches!(error, SendError::Forbidden(_))
            && store::deactivate(&mut tx, tenant, message.chat_id, &error.to_string()).await?
        {
            events.push(
                append(
                    &mut tx,
                    tenant,
                    EventType::TELEGRAM_CHAT_DEACTIVATED,
                    json!({"chat_id": message.chat_id, "reason": error.to_string()}),
                )
                .await?,
            );
        }
        if let Some((tenant, id)) = record {
            let status = if last { "failed" } else { "pending" };
            store::record_attempt(&mut tx, tenant, id, status, Some(&error.to_string())).await?;
        }
        tx.commit().await.map_err(DbError::from)?;
        ctx.events.committed(&events).await;
        Ok(())
    }
    .await;
    match result {
        Ok(()) => job_error,
        // The failure could not be recorded: try the whole delivery again.
        Err(e) => JobError::retry(format!("{error}; recording it failed: {}", e.message)),
    }
}

/// An alert's text: the event's type, when, and its data.
fn alert(event: &Event) -> Reply {
    let mut reply = Reply::new();
    reply.heading(format!("🔔 {}", event.event_type));
    reply.line(
        event
            .occurred_at
            .format("%Y-%m-%d %H:%M:%S UTC")
            .to_string(),
    );
    let data = serde_json::to_string_pretty(&event.data).unwrap_or_default();
    let data: String = data.chars().take(3000).collect();
    reply.line(data);
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_codes_hash_as_typed_in_any_case_with_or_without_dashes() {
        assert_eq!(link_code_hash("abcd-efgh-23"), link_code_hash("ABCDEFGH23"));
        assert_ne!(link_code_hash("ABCDEFGH23"), link_code_hash("ABCDEFGH24"));
    }

    #[test]
    fn help_lists_every_command() {
        let text = help(false).render().join("\n");
        for (name, _) in COMMANDS {
            assert!(text.contains(&format!("/{name} ")), "{name}");
        }
        assert!(text.contains("/start CODE"));
    }
}
