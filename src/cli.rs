//! The command line: `serve`, `migrate`, and operator tasks that go through the same repository
//! code (and the same row-level security) as the HTTP API.

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::db::{self, Db, api_keys, tenant as scope, tenants};
use crate::domain::api_key::NewApiKey;
use crate::domain::role::Role;
use crate::domain::tenant::{Name, Slug, TenantId};
use crate::jobs::Registry;
use crate::startup::{App, Mode};

#[derive(Debug, Parser)]
#[command(
    name = "cybernetic",
    version,
    about = "Multi-tenant platform service for organisations run on the Viable System Model."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API, health and metrics on LISTEN_ADDR until SIGTERM/SIGINT, with the job
    /// pool running in-process.
    Serve {
        /// Run no background jobs in this process (run `cybernetic worker` processes instead).
        #[arg(long)]
        no_workers: bool,
    },
    /// Run the job pool alone, with only /health/* and /metrics on LISTEN_ADDR.
    Worker,
    /// Apply pending database migrations as the owner role (MIGRATION_DATABASE_URL), then exit.
    Migrate,
    /// Create and list tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Create, list and revoke a tenant's API keys.
    #[command(subcommand, name = "api-key")]
    ApiKey(ApiKeyCommand),
    /// Register the bot's webhook and commands with Telegram, or show what Telegram has.
    #[command(subcommand)]
    Telegram(TelegramCommand),
    /// Load and validate the configuration, print it with secrets redacted, and exit.
    CheckConfig,
    /// Exit 0 when this process's /health/ready answers 200 (a container HEALTHCHECK that needs no
    /// curl), 1 otherwise.
    Healthcheck {
        /// What to ask; by default /health/ready on LISTEN_ADDR (a wildcard address as loopback).
        #[arg(long)]
        url: Option<String>,
        /// How long to wait for the answer.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
}

#[derive(Debug, Subcommand)]
pub enum TelegramCommand {
    /// Point Telegram at this deployment's /telegram/webhook, with TELEGRAM_WEBHOOK_SECRET as the
    /// secret token and only message updates, and register the bot's commands (setMyCommands).
    SetWebhook {
        /// The public HTTPS URL of /telegram/webhook, e.g. https://cyb.example.org/telegram/webhook.
        #[arg(long)]
        url: String,
        /// Updates Telegram queued while no webhook answered are dropped instead of delivered.
        #[arg(long)]
        drop_pending_updates: bool,
    },
    /// Show Telegram's view of the webhook (getWebhookInfo): URL, pending updates, last error.
    Info,
}

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant.
    Create {
        /// Display name, 1-200 characters.
        #[arg(long)]
        name: String,
        /// URL-safe handle: lowercase letters, digits and inner hyphens, 1-63 characters.
        #[arg(long)]
        slug: String,
    },
    /// List all tenants, oldest first.
    List,
}

#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Create a key for a tenant and print its secret (shown only this once).
    Create {
        /// The tenant's id or slug.
        #[arg(long)]
        tenant: String,
        /// A name to tell the key apart, such as "ci" or "dashboard".
        #[arg(long)]
        name: String,
        /// viewer (read), operator (read and record), admin (also keys and policies).
        #[arg(long, default_value = "admin")]
        role: String,
    },
    /// List a tenant's keys, newest first (secrets are never shown).
    List {
        /// The tenant's id or slug.
        #[arg(long)]
        tenant: String,
    },
    /// Revoke a key; requests using it are refused from now on.
    Revoke {
        /// The tenant's id or slug.
        #[arg(long)]
        tenant: String,
        /// The key's id.
        #[arg(long)]
        id: uuid::Uuid,
    },
}

pub async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve { no_workers } => {
            let shutdown = crate::shutdown::on_signal()?;
            let jobs = (!no_workers).then(|| Registry::platform(&config));
            App::build_as(config, shutdown, Mode::Serve { jobs })
                .await?
                .run()
                .await?;
        }
        Command::Worker => {
            let shutdown = crate::shutdown::on_signal()?;
            let jobs = Registry::platform(&config);
            App::build_as(config, shutdown, Mode::Worker { jobs })
                .await?
                .run()
                .await?;
        }
        Command::Migrate => {
            db::migrate(config.migration_database_url()?).await?;
            println!("migrations applied");
        }
        Command::Healthcheck { url, timeout } => healthcheck(&config, url, timeout).await?,
        Command::CheckConfig => {
            config.database_url()?;
            println!("{config:#?}");
            println!("configuration ok");
        }
        Command::Tenant(cmd) => tenant(cmd, &connect(&config)?).await?,
        Command::Telegram(cmd) => telegram(cmd, &config).await?,
        Command::ApiKey(cmd) => api_key(cmd, &connect(&config)?).await?,
    }
    Ok(())
}

fn connect(config: &Config) -> anyhow::Result<Db> {
    Ok(Db::connect_lazy(config.database_url()?, &config.database)?)
}

async fn healthcheck(
    config: &Config,
    url: Option<String>,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let url = url.unwrap_or_else(|| {
        let mut addr = config.http.listen_addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        format!("http://{addr}/health/ready")
    });
    let status = reqwest::Client::builder()
        .timeout(timeout)
        .build()?
        .get(&url)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("{url}: {}", crate::jobs::notification::without_url(&e)))?
        .status();
    if !status.is_success() {
        anyhow::bail!("{url} answered {status}");
    }
    println!("{url}: {status}");
    Ok(())
}

async fn telegram(cmd: TelegramCommand, config: &Config) -> anyhow::Result<()> {
    use crate::telegram::command::COMMANDS;
    use serde_json::json;
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()?;
    let api = crate::telegram::BotApi::from_config(&config.telegram, http)
        .ok_or_else(|| anyhow::anyhow!("TELEGRAM_BOT_TOKEN is not set"))?;
    match cmd {
        TelegramCommand::SetWebhook {
            url,
            drop_pending_updates,
        } => {
            let parsed = reqwest::Url::parse(&url)
                .map_err(|e| anyhow::anyhow!("--url is not a URL: {e}"))?;
            if parsed.scheme() != "https" {
                anyhow::bail!("--url must be https:// (Telegram only posts to HTTPS webhooks)");
            }
            let secret = config
                .telegram
                .webhook_secret
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("TELEGRAM_WEBHOOK_SECRET is not set"))?;
            api.call(
                "setWebhook",
                &json!({
                    "url": url,
                    "secret_token": secret.expose(),
                    "allowed_updates": ["message"],
                    "drop_pending_updates": drop_pending_updates,
                }),
            )
            .await?;
            let commands: Vec<_> = COMMANDS
                .iter()
                .map(|(name, what)| json!({"command": name, "description": what}))
                .collect();
            api.call("setMyCommands", &json!({"commands": commands}))
                .await?;
            println!(
                "webhook set to {url}; {} commands registered",
                COMMANDS.len()
            );
        }
        TelegramCommand::Info => {
            let info = api.call("getWebhookInfo", &json!({})).await?;
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
    }
    Ok(())
}

async fn tenant(cmd: TenantCommand, db: &Db) -> anyhow::Result<()> {
    let mut tx = scope::begin_platform(db.primary()).await?;
    match cmd {
        TenantCommand::Create { name, slug } => {
            let name = Name::parse("name", &name)?;
            let slug = Slug::parse(&slug)?;
            let t = tenants::create(
                &mut tx,
                TenantId::generate(),
                &name,
                &slug,
                &Default::default(),
            )
            .await?;
            println!("created tenant {} ({}) id={}", t.name, t.slug, t.id);
        }
        TenantCommand::List => {
            let mut after = None;
            loop {
                let rows = tenants::list(&mut tx, after.as_ref(), 500).await?;
                for t in &rows {
                    println!(
                        "{}\t{}\t{}\t{}",
                        t.id,
                        t.slug,
                        t.created_at.to_rfc3339(),
                        t.name
                    );
                }
                match rows.last() {
                    Some(last) => {
                        after = Some(db::CreationCursor {
                            created_at: last.created_at,
                            id: last.id,
                        })
                    }
                    None => break,
                }
            }
        }
    }
    tx.commit().await?;
    Ok(())
}

async fn find_tenant(db: &Db, id_or_slug: &str) -> anyhow::Result<TenantId> {
    let mut tx = scope::begin_platform(db.primary()).await?;
    let found = tenants::find(&mut tx, id_or_slug).await?;
    tx.commit().await?;
    let t = found.ok_or_else(|| anyhow::anyhow!("no tenant with id or slug '{id_or_slug}'"))?;
    Ok(TenantId::from_uuid(t.id))
}

async fn api_key(cmd: ApiKeyCommand, db: &Db) -> anyhow::Result<()> {
    match cmd {
        ApiKeyCommand::Create { tenant, name, role } => {
            let tenant = find_tenant(db, &tenant).await?;
            let name = Name::parse("name", &name)?;
            let role = Role::parse(&role)?;
            let new = NewApiKey::generate()?;
            let mut tx = scope::begin(db.primary(), tenant).await?;
            let key =
                api_keys::create(&mut tx, tenant, &name, role, &new.display_prefix, &new.hash)
                    .await?;
            tx.commit().await?;
            println!(
                "created {} key '{}' id={}",
                key.role.as_str(),
                key.name,
                key.id
            );
            println!("{}", new.secret);
            eprintln!("store this key now: it is not shown again");
        }
        ApiKeyCommand::List { tenant } => {
            let tenant = find_tenant(db, &tenant).await?;
            let mut tx = scope::begin(db.primary(), tenant).await?;
            let mut after = None;
            loop {
                let rows = api_keys::list(&mut tx, tenant, after.as_ref(), 500).await?;
                for k in &rows {
                    let state = if k.revoked_at.is_some() {
                        "revoked"
                    } else {
                        "active"
                    };
                    println!(
                        "{}\t{}…\t{}\t{}\t{}",
                        k.id,
                        k.prefix,
                        k.role.as_str(),
                        state,
                        k.name
                    );
                }
                match rows.last() {
                    Some(last) => {
                        after = Some(db::CreationCursor {
                            created_at: last.created_at,
                            id: last.id,
                        })
                    }
                    None => break,
                }
            }
            tx.commit().await?;
        }
        ApiKeyCommand::Revoke { tenant, id } => {
            let tenant = find_tenant(db, &tenant).await?;
            let mut tx = scope::begin(db.primary(), tenant).await?;
            let revoked = api_keys::revoke(&mut tx, tenant, id).await?;
            tx.commit().await?;
            match revoked {
                Some(k) => println!("revoked key '{}' id={}", k.name, k.id),
                None => anyhow::bail!("no key {id} for this tenant"),
            }
        }
    }
    Ok(())
}
