//! The broker, read the way Celery (kombu) uses it: probes of how many tasks wait in a pool's
//! queues and how many are reserved by workers, and the worker events Celery publishes.

pub mod events;
pub mod rabbitmq;
pub mod redis;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use crate::crd::{BrokerSpec, BrokerType};

/// One queue, as a probe saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueSample {
    /// Queue name.
    pub name: String,
    /// Messages waiting, over every priority level.
    pub ready: u64,
    /// Messages delivered to a worker and not yet acknowledged (prefetched, or running with
    /// `acks_late`).
    pub reserved: u64,
    /// Messages waiting per priority step (`0` is the queue itself), when the broker keeps
    /// priorities apart.
    pub by_priority: Vec<(u32, u64)>,
    /// How long the oldest waiting message has waited, in milliseconds: known when it
    /// carries a `published_at` header (Unix seconds, stamped by the app's
    /// `before_task_publish` hook) and the broker lets the probe read it (Redis).
    pub oldest_wait_ms: Option<u64>,
}

/// Why a probe failed. The scaler holds the pool's replicas when it does.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The broker could not be reached or answered an error.
    #[error("broker unreachable or failing: {0}")]
    Broker(String),
    /// The broker URL is not usable.
    #[error("invalid broker URL: {0}")]
    Url(String),
}

/// The broker kind a URL's scheme names, if it names one.
pub fn kind_of_url(url: &str) -> Option<BrokerType> {
    let scheme = url.split_once("://")?.0;
    match scheme {
        "redis" | "rediss" => Some(BrokerType::Redis),
        "amqp" | "amqps" | "pyamqp" | "pyamqps" => Some(BrokerType::Rabbitmq),
        _ => None,
    }
}

/// A probe of one broker, of either kind.
#[derive(Clone)]
pub enum Probe {
    /// A Redis broker.
    Redis(redis::RedisProbe),
    /// A RabbitMQ broker, through its management API.
    Rabbitmq(rabbitmq::RabbitProbe),
}

impl Probe {
    /// A probe of the broker at `url`, configured by a resource's `broker` settings.
    pub async fn for_broker(url: &str, broker: &BrokerSpec) -> Result<Probe, ProbeError> {
        let layout = redis::Layout::from(broker.redis.clone().unwrap_or_default());
        let management = broker
            .rabbitmq
            .as_ref()
            .and_then(|r| r.management_url.as_deref());
        Probe::connect(url, broker.type_, layout, management).await
    }

    /// A probe of the broker at `url`. Its kind is `declared` or, when `None`, the URL's
    /// scheme; they must agree. `layout` is used for Redis, `management_url` for RabbitMQ.
    pub async fn connect(
        url: &str,
        declared: Option<BrokerType>,
        layout: redis::Layout,
        management_url: Option<&str>,
    ) -> Result<Probe, ProbeError> {
        let kind = match (declared, kind_of_url(url)) {
            (Some(declared), Some(seen)) if declared != seen => {
                let name = |k: BrokerType| format!("{k:?}").to_lowercase();
                return Err(ProbeError::Url(format!(
                    "broker.type is {} but the URL is a {} URL",
                    name(declared),
                    name(seen)
                )));
            }
            (Some(kind), _) | (None, Some(kind)) => kind,
            (None, None) => {
                return Err(ProbeError::Url(
                    "unknown scheme: expected redis://, rediss://, amqp:// or amqps://".into(),
                ));
            }
        };
        Ok(match kind {
            BrokerType::Redis => Probe::Redis(redis::RedisProbe::connect(url, layout).await?),
            BrokerType::Rabbitmq => {
                Probe::Rabbitmq(rabbitmq::RabbitProbe::new(url, management_url)?)
            }
        })
    }

    /// Reads every queue of `queues` in one round trip.
    pub async fn sample(&self, queues: &[String]) -> Result<Vec<QueueSample>, ProbeError> {
        match self {
            Probe::Redis(p) => p.sample(queues).await,
            Probe::Rabbitmq(p) => p.sample(queues).await,
        }
    }
}

/// The broker URL, from the broker's Secret (read again after each failure: a rotated
/// password shows up as one).
pub async fn url_from_secret(
    secrets: &Api<Secret>,
    broker: &BrokerSpec,
) -> Result<String, ProbeError> {
    let secret_ref = &broker.secret_ref;
    let secret = secrets
        .get(&secret_ref.name)
        .await
        .map_err(|e| ProbeError::Broker(format!("cannot read Secret {}: {e}", secret_ref.name)))?;
    let url = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&secret_ref.key))
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
        .ok_or_else(|| {
            ProbeError::Url(format!(
                "Secret {} has no key {}",
                secret_ref.name, secret_ref.key
            ))
        })?;
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broker(type_: Option<BrokerType>) -> BrokerSpec {
        serde_json::from_value(serde_json::json!({
            "secretRef": {"name": "s", "key": "k"},
            "type": type_,
        }))
        .unwrap()
    }

    #[test]
    fn the_kind_comes_from_the_type_or_the_scheme_and_they_must_agree() {
        assert_eq!(kind_of_url("rediss://h:6380/1"), Some(BrokerType::Redis));
        assert_eq!(kind_of_url("pyamqp://h//"), Some(BrokerType::Rabbitmq));
        assert_eq!(kind_of_url("sqs://"), None);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let err = |url, t| {
            rt.block_on(Probe::for_broker(url, &broker(t)))
                .err()
                .map(|e| e.to_string())
        };
        assert!(
            err("redis://h", Some(BrokerType::Rabbitmq))
                .unwrap()
                .contains("broker.type")
        );
        assert!(err("sqs://h", None).unwrap().contains("unknown scheme"));
        // A RabbitMQ probe sends nothing until it samples, so it can be built offline.
        assert!(err("amqp://h", None).is_none());
        assert!(err("amqp://h", Some(BrokerType::Rabbitmq)).is_none());
    }
}
