//! `keda`: an autoscaler plugin that scales a worker pool with a [KEDA] `ScaledObject`
//! (and, for queue-length metrics, a `TriggerAuthentication` that reads the broker
//! Secret).
//!
//! Metrics become KEDA triggers:
//!
//! * `cpu` / `memory` → a `cpu` / `memory` trigger (`metricType` `Utilization` or
//!   `AverageValue`, `metadata.value`);
//! * `taskQueueLength` with a `redis` broker → one `redis` trigger per Redis list kombu
//!   writes: each queue and each of its priority sub-lists, named exactly as the resource's
//!   `spec.broker.redis` says (`globalKeyprefix`, `sep`, `prioritySteps`; kombu's defaults
//!   otherwise);
//! * `taskQueueLength` with a `rabbitmq` broker → one `rabbitmq` trigger per queue, read
//!   through the management API (`protocol: http`), which counts ready *and* unacknowledged
//!   messages (over AMQP KEDA sees only the ready ones, and would scale a busy pool to zero).
//!
//! KEDA takes the *maximum* over triggers; a pool's backlog is the *sum* over its queues and
//! priority lists. With more than one queue trigger, `advanced.scalingModifiers` sums them
//! (`formula: q0 + q1 + ...`) into one metric with the pool's target, as the operator's own
//! scaler does. What KEDA still cannot see on Redis: tasks reserved by workers (kombu's
//! `unacked` hash), which the operator's scaler counts.
//!
//! Credentials come from the resource's broker Secret only, through a TriggerAuthentication:
//! for Redis, KEDA wants `host:port` and a password, not a URL: keys `address` and
//! `password` (settings `addressKey`, `passwordKey`); for RabbitMQ, the management API's
//! `username` and `password` keys (settings `usernameKey`, `passwordKey`) and its URL, from
//! `spec.broker.rabbitmq.managementUrl` or else the key `management-url` (setting
//! `managementUrlKey`); a `pyamqp://` or `amqp://` broker URL is never given to KEDA.
//!
//! The pool's `autoscaling.behavior` becomes the HPA's behavior
//! (`advanced.horizontalPodAutoscalerConfig.behavior`).
//!
//! Settings (all optional):
//!
//! ```json
//! {"pollingInterval": 30, "cooldownPeriod": 300,
//!  "fallback": {"failureThreshold": 3, "replicas": null},
//!  "databaseIndex": "0", "addressKey": "address", "passwordKey": "password",
//!  "usernameKey": "username", "managementUrlKey": "management-url", "vhostName": null}
//! ```
//!
//! `fallback.replicas` defaults to `max(minReplicas, 1)`; `"fallback": null` leaves the
//! fallback out (KEDA rejects one alongside `cpu`/`memory` triggers, so it is left out then
//! too). `"passwordKey": null` is for a Redis without a password.
//!
//! Objects are named after the pool's Deployment; the host sets their namespace, owner
//! reference and labels.
//!
//! [KEDA]: https://keda.sh

use celery_operator_plugin_sdk::autoscaler::{Guest, PoolInput};
use celery_operator_plugin_sdk::json::{
    Autoscaling, Broker, Metric, TASK_QUEUE_LENGTH, string_or_number,
};
use celery_operator_plugin_sdk::parse_settings;
use celery_operator_plugin_sdk::serde_json::{Value, json};
use serde::Deserialize;

/// The plugin's settings.
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Settings {
    /// Seconds between KEDA's checks of each trigger. Default 30.
    pub polling_interval: u32,
    /// Seconds after the last active trigger before scaling to zero. Default 300.
    pub cooldown_period: u32,
    /// Replicas to run while a trigger keeps failing; `null` for none.
    pub fallback: Option<FallbackSettings>,
    /// Redis database index (a string in KEDA's metadata; a number is accepted). Default
    /// `"0"`.
    #[serde(deserialize_with = "string_or_number")]
    pub database_index: String,
    /// Broker Secret key with Redis's `host:port`. Default `address`.
    pub address_key: String,
    /// Broker Secret key with Redis's (or RabbitMQ's management API) password, or `null`
    /// for none (Redis only). Default `password`.
    pub password_key: Option<String>,
    /// Broker Secret key with RabbitMQ's management API user. Default `username`.
    pub username_key: String,
    /// Broker Secret key with RabbitMQ's management API URL, when the resource does not
    /// give `spec.broker.rabbitmq.managementUrl`. Default `management-url`.
    pub management_url_key: String,
    /// RabbitMQ virtual host of the queues, when not the management URL's path.
    pub vhost_name: Option<String>,
}

/// The ScaledObject's `fallback`.
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct FallbackSettings {
    /// Consecutive failures of a trigger before falling back. Default 3.
    pub failure_threshold: u32,
    /// Replicas to fall back to. Default `max(minReplicas, 1)`.
    pub replicas: Option<u32>,
}

impl Default for FallbackSettings {
    fn default() -> Self {
        FallbackSettings {
            failure_threshold: 3,
            replicas: None,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            polling_interval: 30,
            cooldown_period: 300,
            fallback: Some(FallbackSettings::default()),
            database_index: "0".into(),
            address_key: "address".into(),
            password_key: Some("password".into()),
            username_key: "username".into(),
            management_url_key: "management-url".into(),
            vhost_name: None,
        }
    }
}

/// The broker kinds KEDA triggers are built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BrokerType {
    Redis,
    Rabbitmq,
}

/// A `cpu` or `memory` trigger.
fn resource_trigger(at: &str, m: &Metric) -> Result<Value, String> {
    let (metric_type, value) = match m.target.type_.as_str() {
        "Utilization" => (
            "Utilization",
            m.target
                .average_utilization
                .ok_or_else(|| {
                    format!("{at}.target: a Utilization target needs averageUtilization")
                })?
                .to_string(),
        ),
        "AverageValue" => (
            "AverageValue",
            m.target
                .average_value
                .clone()
                .ok_or_else(|| format!("{at}.target: an AverageValue target needs averageValue"))?,
        ),
        other => {
            return Err(format!(
                "{at}.target.type: unknown target type {other:?}; expected Utilization or AverageValue"
            ));
        }
    };
    Ok(json!({"type": m.name, "metricType": metric_type, "metadata": {"value": value}}))
}

/// The `taskQueueLength` target (tasks per replica), checked.
fn queue_target(at: &str, m: &Metric, broker: BrokerType) -> Result<String, String> {
    if m.target.type_ != "AverageValue" {
        return Err(format!(
            "{at}.target.type: {TASK_QUEUE_LENGTH} supports only an AverageValue target (tasks per replica)"
        ));
    }
    let value = m
        .target
        .average_value
        .clone()
        .ok_or_else(|| format!("{at}.target: an AverageValue target needs averageValue"))?;
    let ok = match broker {
        // KEDA's redis scaler reads listLength as a whole number.
        BrokerType::Redis => value.parse::<u64>().is_ok_and(|n| n > 0),
        BrokerType::Rabbitmq => value.parse::<f64>().is_ok_and(|n| n > 0.0),
    };
    if !ok {
        let what = match broker {
            BrokerType::Redis => "a whole number of tasks above 0 (KEDA's redis scaler)",
            BrokerType::Rabbitmq => "a number of tasks above 0",
        };
        return Err(format!("{at}.target.averageValue: {value:?} is not {what}"));
    }
    Ok(value)
}

/// The broker Secret and type from the Celery resource, for queue-length triggers.
fn broker_of(celery: &str) -> Result<(Broker, BrokerType), String> {
    let broker = Broker::from_celery(celery)?;
    let kind = match broker.type_.as_deref() {
        Some("redis") => BrokerType::Redis,
        Some("rabbitmq") => BrokerType::Rabbitmq,
        None => {
            return Err(format!(
                "spec.broker.type is not set: the keda autoscaler needs it (redis or rabbitmq) \
                 to build {TASK_QUEUE_LENGTH} triggers"
            ));
        }
        Some(other) => {
            return Err(format!(
                "spec.broker.type: {other:?} is not supported by the keda autoscaler; expected \
                 redis or rabbitmq"
            ));
        }
    };
    Ok((broker, kind))
}

/// Builds the ScaledObject and, when a queue trigger needs one, the TriggerAuthentication.
pub fn keda_objects(input: &PoolInput) -> Result<Vec<Value>, String> {
    let settings: Settings = parse_settings(&input.settings)?;
    let a = Autoscaling::parse(&input.autoscaling)?;
    if a.metrics.is_empty() {
        return Err("autoscaling.metrics: at least one metric is needed".into());
    }
    let name = &input.deployment;
    let auth_ref = json!({"name": name});

    // The broker matters only for queue-length triggers.
    let broker = if a.metrics.iter().any(|m| m.name == TASK_QUEUE_LENGTH) {
        Some(broker_of(&input.celery)?)
    } else {
        None
    };

    let mut triggers = Vec::new();
    // Queue triggers, summed by a scaling modifier when there are several.
    let mut queue_triggers: Vec<Value> = Vec::new();
    let mut queue_target_value = None;
    for (i, m) in a.metrics.iter().enumerate() {
        let at = format!("autoscaling.metrics[{i}]");
        match (m.name.as_str(), &broker) {
            ("cpu" | "memory", _) => triggers.push(resource_trigger(&at, m)?),
            (TASK_QUEUE_LENGTH, Some((broker, kind))) => {
                let value = queue_target(&at, m, *kind)?;
                if input.queues.is_empty() {
                    return Err(format!(
                        "pool {:?} has no queues to measure for {TASK_QUEUE_LENGTH}",
                        input.pool
                    ));
                }
                for queue in &input.queues {
                    match kind {
                        BrokerType::Redis => {
                            for list in broker.redis.lists(queue) {
                                queue_triggers.push(json!({
                                    "type": "redis",
                                    "metricType": "AverageValue",
                                    "metadata": {
                                        "listName": list,
                                        "listLength": value,
                                        "databaseIndex": settings.database_index,
                                    },
                                    "authenticationRef": auth_ref,
                                }));
                            }
                        }
                        BrokerType::Rabbitmq => {
                            let mut metadata = json!({
                                "protocol": "http",
                                "queueName": queue,
                                "mode": "QueueLength",
                                "value": value,
                            });
                            if let Some(url) = &broker.rabbitmq.management_url {
                                metadata["host"] = json!(url);
                            }
                            if let Some(vhost) = &settings.vhost_name {
                                metadata["vhostName"] = json!(vhost);
                            }
                            queue_triggers.push(json!({
                                "type": "rabbitmq",
                                "metricType": "AverageValue",
                                "metadata": metadata,
                                "authenticationRef": auth_ref,
                            }));
                        }
                    }
                }
                queue_target_value = Some(value);
            }
            (other, _) => {
                return Err(format!(
                    "{at}.name: unknown metric {other:?}; the keda autoscaler supports cpu, \
                     memory and {TASK_QUEUE_LENGTH}"
                ));
            }
        }
    }
    if queue_triggers.is_empty() && a.min_replicas == 0 {
        return Err(
            "autoscaling.minReplicas: KEDA cannot scale to zero on cpu or memory alone; set \
             minReplicas to 1 or more, or add a taskQueueLength metric"
                .into(),
        );
    }
    let mut advanced = celery_operator_plugin_sdk::serde_json::Map::new();
    if let (Some(target), true) = (&queue_target_value, queue_triggers.len() > 1) {
        let names: Vec<String> = (0..queue_triggers.len()).map(|i| format!("q{i}")).collect();
        for (trigger, name) in queue_triggers.iter_mut().zip(&names) {
            trigger["name"] = json!(name);
        }
        advanced.insert(
            "scalingModifiers".into(),
            json!({"formula": names.join(" + "), "target": target, "metricType": "AverageValue"}),
        );
    }
    if let Some(behavior) = &a.behavior {
        advanced.insert(
            "horizontalPodAutoscalerConfig".into(),
            json!({"behavior": behavior}),
        );
    }
    triggers.extend(queue_triggers);

    let mut spec = json!({
        "scaleTargetRef": {"name": name},
        "minReplicaCount": a.min_replicas,
        "maxReplicaCount": a.max_replicas,
        "pollingInterval": settings.polling_interval,
        "cooldownPeriod": settings.cooldown_period,
        "triggers": triggers,
    });
    if !advanced.is_empty() {
        spec["advanced"] = Value::Object(advanced);
    }
    let has_resource_trigger = a.metrics.iter().any(|m| m.name != TASK_QUEUE_LENGTH);
    if let (Some(f), false) = (&settings.fallback, has_resource_trigger) {
        spec["fallback"] = json!({
            "failureThreshold": f.failure_threshold,
            "replicas": f.replicas.unwrap_or(a.min_replicas.max(1)),
        });
    }
    let mut objects = vec![json!({
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": name},
        "spec": spec,
    })];

    if let Some((broker, kind)) = broker {
        let secret = &broker.secret_ref.name;
        let refs = match kind {
            BrokerType::Redis => {
                let mut refs = vec![
                    json!({"parameter": "address", "name": secret, "key": settings.address_key}),
                ];
                if let Some(key) = settings.password_key.as_ref().filter(|k| !k.is_empty()) {
                    refs.push(json!({"parameter": "password", "name": secret, "key": key}));
                }
                refs
            }
            BrokerType::Rabbitmq => {
                let password = settings
                    .password_key
                    .clone()
                    .filter(|k| !k.is_empty())
                    .ok_or("settings.passwordKey: KEDA's management API access needs a password")?;
                let mut refs = vec![
                    json!({"parameter": "username", "name": secret, "key": settings.username_key}),
                    json!({"parameter": "password", "name": secret, "key": password}),
                ];
                if broker.rabbitmq.management_url.is_none() {
                    refs.push(json!({"parameter": "host", "name": secret, "key": settings.management_url_key}));
                }
                refs
            }
        };
        objects.push(json!({
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "TriggerAuthentication",
            "metadata": {"name": name},
            "spec": {"secretTargetRef": refs},
        }));
    }
    Ok(objects)
}

/// The plugin.
pub struct Keda;

impl Guest for Keda {
    fn objects(input: PoolInput) -> Result<Vec<String>, String> {
        Ok(keda_objects(&input)?.iter().map(Value::to_string).collect())
    }
}

celery_operator_plugin_sdk::export_autoscaler!(Keda);

#[cfg(test)]
mod tests;
