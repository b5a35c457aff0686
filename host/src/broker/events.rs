//! Celery's worker events as they cross the broker: `worker-online`, `worker-heartbeat`
//! (every 2 s by default, with the worker's running and processed task counts) and
//! `worker-offline`, each a kombu message on the `celeryev` exchange. On Redis the message is
//! a JSON envelope whose `body` is base64 of the event's JSON; on RabbitMQ the body is the
//! event's JSON itself.
//!
//! Anyone who can write to the broker can publish one, so every field is bounded and checked
//! before it is believed: an event that does not parse is dropped, never half-used.
//!
//! [`Subscription`] follows a broker's worker events.

use std::time::Duration;

use base64::Engine;
use serde::Deserialize;

use super::{ProbeError, rabbitmq::RabbitEvents, redis::RedisEvents};
use crate::crd::{BrokerSpec, BrokerType};

/// Bytes of one message beyond which it is not read (a heartbeat is about 400).
pub const MAX_MESSAGE: usize = 16 * 1024;
/// Bytes of a worker's node name (`<pool>@<pod>`: a 40-byte pool name and a 253-byte pod
/// name at most).
pub const MAX_HOSTNAME: usize = 300;

/// What a worker said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The worker started.
    Online,
    /// The worker is alive.
    Heartbeat,
    /// The worker is stopping.
    Offline,
}

/// One worker event.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerEvent {
    /// The worker's node name, `<pool>@<pod>` for the operator's workers.
    pub hostname: String,
    /// Which event.
    pub kind: Kind,
    /// Tasks the worker is running.
    pub active: u32,
    /// Tasks the worker has finished since it started.
    pub processed: u64,
    /// Seconds between its heartbeats.
    pub freq: f64,
}

#[derive(Deserialize)]
struct Envelope {
    body: String,
    #[serde(rename = "content-type")]
    content_type: Option<String>,
    #[serde(default)]
    properties: Properties,
}

#[derive(Deserialize, Default)]
struct Properties {
    body_encoding: Option<String>,
}

#[derive(Deserialize)]
struct Event {
    #[serde(rename = "type")]
    type_: String,
    hostname: String,
    #[serde(default)]
    active: u32,
    #[serde(default)]
    processed: u64,
    #[serde(default)]
    freq: Option<f64>,
}

/// The event in a kombu message published on Redis, or `None` when it is not a worker event
/// or not well-formed.
pub fn from_redis(message: &[u8]) -> Option<WorkerEvent> {
    if message.len() > MAX_MESSAGE {
        return None;
    }
    let envelope: Envelope = serde_json::from_slice(message).ok()?;
    if envelope
        .content_type
        .is_some_and(|t| t != "application/json")
    {
        return None;
    }
    let body = match envelope.properties.body_encoding.as_deref() {
        Some("base64") => base64::engine::general_purpose::STANDARD
            .decode(envelope.body)
            .ok()?,
        None => envelope.body.into_bytes(),
        Some(_) => return None,
    };
    from_json(&body)
}

/// The event in a message body that is the event's JSON (RabbitMQ), or `None`.
pub fn from_json(body: &[u8]) -> Option<WorkerEvent> {
    if body.len() > MAX_MESSAGE {
        return None;
    }
    let event: Event = serde_json::from_slice(body).ok()?;
    let kind = match event.type_.as_str() {
        "worker-online" => Kind::Online,
        "worker-heartbeat" => Kind::Heartbeat,
        "worker-offline" => Kind::Offline,
        _ => return None,
    };
    if event.hostname.is_empty() || event.hostname.len() > MAX_HOSTNAME {
        return None;
    }
    // Celery's default is 2 s; anything outside a sane range is taken as the default.
    let freq = event
        .freq
        .filter(|f| f.is_finite() && (0.1..=3600.0).contains(f))
        .unwrap_or(2.0);
    Some(WorkerEvent {
        hostname: event.hostname,
        kind,
        active: event.active,
        processed: event.processed,
        freq,
    })
}

/// How long a liveness check of a subscription may take.
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// A subscription to a broker's worker events.
pub enum Subscription {
    /// On Redis: kombu's fanout, a Pub/Sub channel per routing key.
    Redis(RedisEvents),
    /// On RabbitMQ: a queue of the operator's own bound to the `celeryev` exchange.
    Rabbitmq(Box<RabbitEvents>),
}

impl Subscription {
    /// Subscribes to the worker events of the broker at `url`, configured by a resource's
    /// `broker` settings.
    pub async fn connect(url: &str, broker: &BrokerSpec) -> Result<Subscription, ProbeError> {
        match broker.type_.or_else(|| super::kind_of_url(url)) {
            Some(BrokerType::Redis) => {
                let layout = super::redis::Layout::from(broker.redis.clone().unwrap_or_default());
                Ok(Subscription::Redis(
                    RedisEvents::connect(url, &layout.prefix).await?,
                ))
            }
            Some(BrokerType::Rabbitmq) => Ok(Subscription::Rabbitmq(Box::new(
                RabbitEvents::connect(url).await?,
            ))),
            None => Err(ProbeError::Url(
                "unknown scheme: expected redis://, rediss://, amqp:// or amqps://".into(),
            )),
        }
    }

    /// The next worker event; `None` when the connection is lost. Messages that are not
    /// worker events are skipped.
    pub async fn next(&mut self) -> Option<WorkerEvent> {
        match self {
            Subscription::Redis(r) => r.next().await,
            Subscription::Rabbitmq(r) => r.next().await,
        }
    }

    /// Whether the subscription still works: silence from a worker means something only
    /// while it does.
    pub async fn alive(&mut self) -> bool {
        match self {
            Subscription::Redis(r) => {
                matches!(tokio::time::timeout(PING_TIMEOUT, r.ping()).await, Ok(true))
            }
            Subscription::Rabbitmq(r) => r.alive(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A heartbeat published by Celery 5.7 on Redis, as `redis-cli psubscribe` shows it.
    const REDIS_HEARTBEAT: &str = r#"{"body": "eyJob3N0bmFtZSI6ICJ3QHBvZC1hYmMiLCAidXRjb2Zmc2V0IjogMC4wLCAicGlkIjogNTA4NCwgImNsb2NrIjogNCwgImZyZXEiOiAyLjAsICJhY3RpdmUiOiAxLCAicHJvY2Vzc2VkIjogMSwgImxvYWRhdmciOiBbMi43NCwgMC44MiwgMC4yOV0sICJzd19pZGVudCI6ICJweS1jZWxlcnkiLCAic3dfdmVyIjogIjUuNy4wIiwgInN3X3N5cyI6ICJMaW51eCIsICJ0aW1lc3RhbXAiOiAxNzk2MTIwODEwLjg0ODgwNzMsICJ0eXBlIjogIndvcmtlci1oZWFydGJlYXQifQ==", "content-encoding": "utf-8", "content-type": "application/json", "headers": {"hostname": "w@pod-abc"}, "properties": {"delivery_mode": 1, "delivery_info": {"exchange": "celeryev", "routing_key": "worker.heartbeat"}, "priority": 0, "body_encoding": "base64", "delivery_tag": "292df800-7bd9-4ace-963f-efce4e2c4570"}}"#;

    #[test]
    fn a_celery_heartbeat_on_redis_is_read() {
        let e = from_redis(REDIS_HEARTBEAT.as_bytes()).unwrap();
        assert_eq!(
            e,
            WorkerEvent {
                hostname: "w@pod-abc".into(),
                kind: Kind::Heartbeat,
                active: 1,
                processed: 1,
                freq: 2.0
            }
        );
    }

    #[test]
    fn anything_else_is_dropped() {
        let json = |v: serde_json::Value| from_json(v.to_string().as_bytes());
        let ok = serde_json::json!({"type": "worker-offline", "hostname": "a@b", "freq": 1e300});
        assert_eq!(json(ok).unwrap().freq, 2.0);
        assert!(json(serde_json::json!({"type": "task-started", "hostname": "a@b"})).is_none());
        assert!(json(serde_json::json!({"type": "worker-heartbeat", "hostname": ""})).is_none());
        let long = "x".repeat(MAX_HOSTNAME + 1);
        assert!(json(serde_json::json!({"type": "worker-heartbeat", "hostname": long})).is_none());
        assert!(
            json(serde_json::json!({"type": "worker-heartbeat", "hostname": "a@b", "active": -1}))
                .is_none()
        );
        assert!(from_redis(b"not json").is_none());
        let pickled = REDIS_HEARTBEAT.replace("application/json", "application/x-python-serialize");
        assert!(from_redis(pickled.as_bytes()).is_none());
        let huge = format!("{{\"body\": \"{}\"}}", "A".repeat(MAX_MESSAGE));
        assert!(from_redis(huge.as_bytes()).is_none());
    }
}
