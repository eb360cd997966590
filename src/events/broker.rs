//! Cross-process fan-out over RabbitMQ (`AMQP_URL`). Every committed event is published to a
//! fanout exchange; every process consumes it through its own exclusive queue and hands it to its
//! hub, which orders and de-duplicates. The broker may go away at any time: publishing then skips
//! it, the consumer reconnects with backoff, and the hub's head poll reads whatever was missed
//! from the log. Nothing depends on the broker for correctness, only for speed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::config::Secret;
use crate::db::events::Event;

use super::Live;
use super::hub::Hub;

const EXCHANGE: &str = "cybernetic.events";
const PUBLISH_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub struct Broker {
    /// The publishing channel while connected.
    channel: Arc<Mutex<Option<Channel>>>,
}

#[derive(Deserialize)]
struct Message {
    published_at_us: i64,
    event: Event,
}

impl Broker {
    /// Connects in the background and keeps reconnecting until shutdown.
    pub fn start(url: Secret, hub: Arc<Hub>, shutdown: CancellationToken) -> Self {
        let broker = Self {
            channel: Arc::new(Mutex::new(None)),
        };
        let slot = broker.channel.clone();
        tokio::spawn(async move {
            const FIRST_RETRY: Duration = Duration::from_millis(250);
            let mut backoff = FIRST_RETRY;
            loop {
                let mut connected = false;
                match session(&url, &hub, &slot, &shutdown, &mut connected).await {
                    Ok(()) => return,
                    Err(e) => {
                        set(&slot, None);
                        metrics::counter!("event_broker_disconnects_total").increment(1);
                        tracing::warn!(error = %e, retry_in = ?backoff, "event broker connection lost; the log covers the gap");
                    }
                }
                if connected {
                    backoff = FIRST_RETRY;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        });
        broker
    }

    /// Publishes a committed event; skipped while disconnected (the log has it).
    pub async fn publish(&self, live: &Live) {
        let channel = self
            .channel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(channel) = channel else { return };
        let Some(published_at) = live.published_at_us else {
            return;
        };
        let mut body = format!(r#"{{"published_at_us":{published_at},"event":"#).into_bytes();
        body.extend_from_slice(live.json());
        body.push(b'}');
        let publish = channel.basic_publish(
            EXCHANGE.into(),
            "".into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default(),
        );
        match tokio::time::timeout(PUBLISH_TIMEOUT, publish).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "event broker publish failed"),
            Err(_) => tracing::debug!("event broker publish timed out"),
        }
    }
}

fn set(slot: &Mutex<Option<Channel>>, channel: Option<Channel>) {
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = channel;
}

async fn session(
    url: &Secret,
    hub: &Arc<Hub>,
    slot: &Mutex<Option<Channel>>,
    shutdown: &CancellationToken,
    connected: &mut bool,
) -> Result<(), lapin::Error> {
    let connection = Connection::connect(url.expose(), ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            EXCHANGE.into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await?;
    let private = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    let queue = channel
        .queue_declare("".into(), private, FieldTable::default())
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            EXCHANGE.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..BasicConsumeOptions::default()
    };
    let mut consumer = channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            no_ack,
            FieldTable::default(),
        )
        .await?;
    set(slot, Some(channel));
    *connected = true;
    tracing::info!("event broker connected");

    loop {
        let delivery = tokio::select! {
            _ = shutdown.cancelled() => {
                set(slot, None);
                let _ = connection.close(200, "shutting down".into()).await;
                return Ok(());
            }
            delivery = consumer.next() => delivery,
        };
        let delivery = match delivery {
            Some(Ok(delivery)) => delivery,
            Some(Err(e)) => return Err(e),
            None => {
                return Err(lapin::Error::from(
                    lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed),
                ));
            }
        };
        match serde_json::from_slice::<Message>(&delivery.data) {
            Ok(message) => {
                metrics::counter!("event_broker_received_total").increment(1);
                hub.offer(Arc::new(Live::new(
                    &message.event,
                    Some(message.published_at_us),
                )));
            }
            Err(e) => tracing::warn!(error = %e, "ignoring a malformed event broker message"),
        }
    }
}
