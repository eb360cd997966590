//! `TestApp`: the real server on port 0 against a fresh database (cloned from a migrated
//! template), connected as the app role, plus a reqwest client and small request helpers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use cybernetic::config::Config;
use cybernetic::jobs::Registry;
use cybernetic::startup::{App, Mode};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, Executor, PgConnection, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const APP_ROLE_PASSWORD: &str = "app";
pub const OWNER_ROLE_PASSWORD: &str = "owner";

pub fn pg_host() -> String {
    std::env::var("TEST_PG_HOST").unwrap_or_else(|_| "127.0.0.1:5432".to_owned())
}

pub fn superuser_url(db: &str) -> String {
    format!("postgres://postgres@{}/{db}", pg_host())
}

pub fn app_url(db: &str) -> String {
    format!(
        "postgres://cybernetic_app:{APP_ROLE_PASSWORD}@{}/{db}",
        pg_host()
    )
}

pub fn owner_url(db: &str) -> String {
    format!(
        "postgres://cybernetic_owner:{OWNER_ROLE_PASSWORD}@{}/{db}",
        pg_host()
    )
}

/// The template's name carries a hash of the migrations, so a changed migration gets a new one.
fn template_name() -> String {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("migrations directory")
        .map(|e| e.expect("dir entry").path())
        .collect();
    files.sort();
    let mut hash = Sha256::new();
    for f in files {
        hash.update(f.file_name().expect("file name").as_encoded_bytes());
        hash.update(std::fs::read(&f).expect("migration file"));
    }
    format!("cybernetic_tpl_{}", &hex::encode(hash.finalize())[..16])
}

/// Creates the migrated template once per migration set, across test processes.
async fn ensure_template(admin: &mut PgConnection) -> String {
    let name = template_name();
    admin
        .execute("select pg_advisory_lock(424242)")
        .await
        .expect("template lock");
    let exists: bool =
        sqlx::query_scalar("select exists(select from pg_database where datname = $1)")
            .bind(&name)
            .fetch_one(&mut *admin)
            .await
            .expect("template lookup");
    if !exists {
        let roles: i64 = sqlx::query_scalar(
            "select count(*) from pg_roles where rolname in ('cybernetic_owner', 'cybernetic_app')",
        )
        .fetch_one(&mut *admin)
        .await
        .expect("role lookup");
        assert_eq!(
            roles, 2,
            "database roles missing: run scripts/db-setup.sh (scripts/test.sh does)"
        );
        let building = format!("{name}_building");
        admin
            .execute(sqlx::AssertSqlSafe(format!(
                "drop database if exists {building} with (force)"
            )))
            .await
            .expect("drop stale template");
        admin
            .execute(sqlx::AssertSqlSafe(format!(
                "create database {building} owner cybernetic_owner"
            )))
            .await
            .expect("create template");
        cybernetic::db::migrate(&cybernetic::config::Secret::new(owner_url(&building)))
            .await
            .expect("migrate template");
        admin
            .execute(sqlx::AssertSqlSafe(format!(
                "alter database {building} rename to {name}"
            )))
            .await
            .expect("publish template");
    }
    admin
        .execute("select pg_advisory_unlock(424242)")
        .await
        .expect("template unlock");
    name
}

/// A fresh, migrated database for one test. Returns its name.
pub async fn fresh_database() -> String {
    let mut admin = PgConnection::connect(&superuser_url("postgres"))
        .await
        .expect("connect as superuser");
    let template = ensure_template(&mut admin).await;
    let name = format!("cybernetic_test_{}", uuid::Uuid::new_v4().simple());
    admin
        .execute(sqlx::AssertSqlSafe(format!(
            "create database {name} template {template} owner cybernetic_owner"
        )))
        .await
        .expect("create test database");
    name
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub admin_token: String,
    pub db_name: String,
    /// Connected as cybernetic_app, like the server.
    pub pool: PgPool,
    pub shutdown: CancellationToken,
    pub server: Option<JoinHandle<std::io::Result<()>>>,
}

#[derive(Default)]
pub struct Options {
    pub env: HashMap<String, String>,
    pub db_name: Option<String>,
    /// Runs the platform's job pool in-process (`serve` without `--no-workers`). Off by default:
    /// tests drive jobs step by step with their own pools.
    pub workers: bool,
}

impl Options {
    pub fn workers(mut self) -> Self {
        self.workers = true;
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.insert(key.to_owned(), value.to_owned());
        self
    }
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(Options::default()).await
    }

    pub async fn spawn_with(options: Options) -> Self {
        if std::env::var_os("TEST_LOG").is_some() {
            cybernetic::telemetry::init_tracing(cybernetic::config::LogFormat::Pretty);
        }
        let db_name = match options.db_name {
            Some(name) => name,
            None => fresh_database().await,
        };
        let admin_token = format!("admin-{}", uuid::Uuid::new_v4().simple());
        let mut env: HashMap<String, String> = HashMap::from([
            ("DATABASE_URL".into(), app_url(&db_name)),
            ("ADMIN_TOKEN".into(), admin_token.clone()),
            ("LISTEN_ADDR".into(), "127.0.0.1:0".into()),
            ("DATABASE_MAX_CONNECTIONS".into(), "8".into()),
            ("METRICS_RATE_LIMIT".into(), "1000".into()),
            ("STORAGE_BACKEND".into(), "memory".into()),
        ]);
        env.extend(options.env);
        let config = Config::from_source(&|k| env.get(k).cloned()).expect("test config");
        let shutdown = CancellationToken::new();
        let jobs = options.workers.then(|| Registry::platform(&config));
        let app = App::build_as(config, shutdown.clone(), Mode::Serve { jobs })
            .await
            .expect("build app");
        let addr = app.local_addr().expect("local addr");
        let server = tokio::spawn(app.run());
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&app_url(&db_name))
            .await
            .expect("connect as app role");
        Self {
            addr,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
            admin_token,
            db_name,
            pool,
            shutdown,
            server: Some(server),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sends a request with an optional bearer token and JSON body.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> reqwest::Response {
        let mut req = self.client.request(method, self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send().await.expect("request sent")
    }

    pub async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.send(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> reqwest::Response {
        self.send(Method::POST, path, Some(token), Some(body)).await
    }

    pub async fn put(&self, path: &str, token: &str, body: Value) -> reqwest::Response {
        self.send(Method::PUT, path, Some(token), Some(body)).await
    }

    pub async fn delete(&self, path: &str, token: &str) -> reqwest::Response {
        self.send(Method::DELETE, path, Some(token), None).await
    }

    /// Creates a tenant through the platform API; returns its id.
    pub async fn create_tenant(&self, slug: &str) -> String {
        let res = self
            .post(
                "/v1/tenants",
                &self.admin_token,
                json!({"name": slug.to_uppercase(), "slug": slug}),
            )
            .await;
        let body = expect_json(res, StatusCode::CREATED).await;
        body["id"].as_str().expect("tenant id").to_owned()
    }

    /// Issues a key for a tenant through the platform bootstrap route; returns the secret.
    pub async fn create_key(&self, tenant_id: &str, role: &str) -> String {
        let res = self
            .post(
                &format!("/v1/tenants/{tenant_id}/api-keys"),
                &self.admin_token,
                json!({"name": format!("{role} key"), "role": role}),
            )
            .await;
        let body = expect_json(res, StatusCode::CREATED).await;
        body["key"].as_str().expect("key").to_owned()
    }

    /// A tenant with one key of each role.
    pub async fn tenant(&self, slug: &str) -> Tenant {
        let id = self.create_tenant(slug).await;
        Tenant {
            admin: self.create_key(&id, "admin").await,
            operator: self.create_key(&id, "operator").await,
            viewer: self.create_key(&id, "viewer").await,
            id,
        }
    }

    /// Cancels the app and waits (bounded) for it to stop.
    pub async fn stop(&mut self) -> std::io::Result<()> {
        self.shutdown.cancel();
        let server = self.server.take().expect("server running");
        tokio::time::timeout(Duration::from_secs(30), server)
            .await
            .expect("server stops within 30s")
            .expect("server task")
    }
}

pub struct Tenant {
    pub id: String,
    pub admin: String,
    pub operator: String,
    pub viewer: String,
}

/// Asserts the status and returns the JSON body.
pub async fn expect_json(res: reqwest::Response, status: StatusCode) -> Value {
    let got = res.status();
    let text = res.text().await.expect("body");
    assert_eq!(got, status, "unexpected status; body: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("body is not JSON ({e}): {text}"))
}

/// Asserts an RFC 9457 problem with the given status and code; returns it.
pub async fn expect_problem(res: reqwest::Response, status: StatusCode, code: &str) -> Value {
    let content_type = res
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or_default().to_owned())
        .unwrap_or_default();
    let request_id = res
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    let body = expect_json(res, status).await;
    assert_eq!(content_type, "application/problem+json", "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status.as_u16(), "{body}");
    assert_eq!(
        body["type"],
        format!("urn:cybernetic:problem:{code}"),
        "{body}"
    );
    assert!(
        body["title"].is_string() && body["detail"].is_string(),
        "{body}"
    );
    assert_eq!(body["request_id"].as_str(), request_id.as_deref(), "{body}");
    body
}

/// Polls `check` until it returns true, failing after `deadline`.
pub async fn eventually<F, Fut>(deadline: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    loop {
        if check().await {
            return;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TCP forwarder between the app and a service (PostgreSQL, RabbitMQ) that a test can cut, to
/// make the service unreachable the way a network partition or a restart does (refused and reset
/// connections), and then restore.
pub struct DbProxy {
    pub port: u16,
    target: String,
    cut: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    /// Connections accepted so far.
    pub accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl DbProxy {
    /// A proxy to PostgreSQL.
    pub async fn start() -> Self {
        Self::to(&pg_host()).await
    }

    /// A proxy to any `host:port`.
    pub async fn to(target: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy bind");
        let port = listener.local_addr().expect("proxy addr").port();
        let (cut, _) = tokio::sync::watch::channel(false);
        let proxy = Self {
            port,
            target: target.to_owned(),
            cut: std::sync::Arc::new(cut),
            accepted: Default::default(),
        };
        proxy.serve(listener);
        proxy
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let mut cut = self.cut.subscribe();
        let cut_sender = self.cut.clone();
        let accepted_count = self.accepted.clone();
        let target = self.target.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = cut.wait_for(|c| *c) => return, // dropping the listener refuses new connections
                    accepted = listener.accept() => {
                        let Ok((mut inbound, _)) = accepted else { continue };
                        accepted_count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let mut conn_cut = cut_sender.subscribe();
                        let target = target.clone();
                        tokio::spawn(async move {
                            let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else { return };
                            tokio::select! {
                                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                                _ = conn_cut.wait_for(|c| *c) => {}
                            }
                        });
                    }
                }
            }
        });
    }

    /// Closes every proxied connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Accepts connections again, on the same port.
    pub async fn restore(&self) {
        self.cut.send_replace(false);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("proxy rebind");
        self.serve(listener);
    }

    pub fn app_url(&self, db: &str) -> String {
        format!(
            "postgres://cybernetic_app:{APP_ROLE_PASSWORD}@127.0.0.1:{}/{db}",
            self.port
        )
    }
}

/// One server-sent event frame (or a comment, such as a heartbeat).
#[derive(Debug, Default, Clone)]
pub struct SseFrame {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
    pub retry: Option<u64>,
    pub comment: Option<String>,
}

impl SseFrame {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("frame data is not JSON ({e}): {self:?}"))
    }

    pub fn position(&self) -> i64 {
        self.id
            .as_deref()
            .and_then(|i| i.parse().ok())
            .unwrap_or_else(|| panic!("frame without id: {self:?}"))
    }
}

/// A minimal SSE client over a reqwest response body.
pub struct SseClient {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: String,
}

impl SseClient {
    /// Opens `/v1/events{query}`; panics unless the server answers 200 text/event-stream.
    pub async fn open(app: &TestApp, query: &str, token: &str, last_event_id: Option<i64>) -> Self {
        let mut req = app
            .client
            .get(app.url(&format!("/v1/events{query}")))
            .bearer_auth(token);
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id.to_string());
        }
        Self::from_response(req.send().await.expect("stream request")).await
    }

    pub async fn from_response(res: reqwest::Response) -> Self {
        assert_eq!(
            res.status(),
            StatusCode::OK,
            "stream refused: {:?}",
            res.text().await.ok()
        );
        let content_type = res.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        Self {
            body: Box::pin(res.bytes_stream()),
            buffer: String::new(),
        }
    }

    /// The next frame, or `None` when the server ended the stream. Fails after `deadline`.
    pub async fn frame(&mut self, deadline: Duration) -> Option<SseFrame> {
        use futures::StreamExt;
        let until = tokio::time::Instant::now() + deadline;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let raw: String = self.buffer.drain(..end + 2).collect();
                return Some(parse_frame(&raw));
            }
            match tokio::time::timeout_at(until, self.body.next()).await {
                Err(_) => panic!(
                    "no SSE frame within {deadline:?}; buffered: {:?}",
                    self.buffer
                ),
                Ok(None) | Ok(Some(Err(_))) => return None,
                Ok(Some(Ok(chunk))) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
            }
        }
    }

    /// The next frame carrying an event (skips comments and retry hints, even those with an id).
    pub async fn event(&mut self, deadline: Duration) -> Option<SseFrame> {
        loop {
            let frame = self.frame(deadline).await?;
            if frame.event.is_some() || !frame.data.is_empty() {
                return Some(frame);
            }
        }
    }

    /// Collects events until `n` have arrived (or the stream ends).
    pub async fn events(&mut self, n: usize, deadline: Duration) -> Vec<SseFrame> {
        let mut out = Vec::new();
        while out.len() < n {
            match self.event(deadline).await {
                Some(f) => out.push(f),
                None => break,
            }
        }
        out
    }
}

fn parse_frame(raw: &str) -> SseFrame {
    let mut frame = SseFrame::default();
    let mut data = Vec::new();
    for line in raw.lines() {
        if let Some(comment) = line.strip_prefix(':') {
            frame.comment = Some(comment.trim().to_owned());
            continue;
        }
        let (field, value) = line
            .split_once(':')
            .map(|(f, v)| (f, v.strip_prefix(' ').unwrap_or(v)))
            .unwrap_or((line, ""));
        match field {
            "id" => frame.id = Some(value.to_owned()),
            "event" => frame.event = Some(value.to_owned()),
            "data" => data.push(value.to_owned()),
            "retry" => frame.retry = value.parse().ok(),
            _ => {}
        }
    }
    frame.data = data.join("\n");
    frame
}
