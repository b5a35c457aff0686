//! `keda`: an autoscaler plugin that scales a worker pool with a [KEDA] `ScaledObject`
//! (and, for queue-length metrics, a `TriggerAuthentication` that reads the broker
//! Secret).
//!
//! Metrics become KEDA triggers:
//!
//! * `cpu` / `memory` → a `cpu` / `memory` trigger (`metricType` `Utilization` or
//!   `AverageValue`, `metadata.value`);
//! * `taskQueueLength` with a `redis` broker → one `redis` trigger per Redis list: each
//!   queue, and each of its kombu priority sub-lists `<queue><separator><step>`;
//! * `taskQueueLength` with a `rabbitmq` broker → one `rabbitmq` trigger per queue
//!   (`mode: QueueLength`).
//!
//! The broker type is the Celery resource's `spec.broker.type`. KEDA's `redis` scaler
//! takes `host:port` and a password, not a URL: it reads them from the keys `address` and
//! `password` of the broker Secret (settings `addressKey`, `passwordKey`); the `rabbitmq`
//! scaler reads the AMQP URL from the key the resource names (`spec.broker.secretRef.key`).
//!
//! Known limitations (the operator's own queue-length scaler has neither): KEDA takes the
//! *maximum* over triggers, not the sum, so a pool's queues and priority sub-lists are
//! not added up; and KEDA counts waiting messages only, not those reserved by workers.
//!
//! Settings (all optional):
//!
//! ```json
//! {"pollingInterval": 30, "cooldownPeriod": 300,
//!  "fallback": {"failureThreshold": 3, "replicas": null},
//!  "prioritySteps": [0, 3, 6, 9], "prioritySeparator": "\u0006\u0016",
//!  "databaseIndex": "0", "addressKey": "address", "passwordKey": "password"}
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
    /// Kombu's Redis priority steps; 0 is the queue's own list. Default `[0, 3, 6, 9]`.
    pub priority_steps: Vec<u32>,
    /// Kombu's separator between a queue name and a priority step. Default `"\u0006\u0016"`.
    pub priority_separator: String,
    /// Redis database index (a string in KEDA's metadata; a number is accepted). Default
    /// `"0"`.
    #[serde(deserialize_with = "string_or_number")]
    pub database_index: String,
    /// Broker Secret key with Redis's `host:port`. Default `address`.
    pub address_key: String,
    /// Broker Secret key with Redis's password, or `null` for none. Default `password`.
    pub password_key: Option<String>,
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
            priority_steps: vec![0, 3, 6, 9],
            priority_separator: "\u{6}\u{16}".into(),
            database_index: "0".into(),
            address_key: "address".into(),
            password_key: Some("password".into()),
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

/// The Redis lists kombu keeps for `queue`: the queue itself and its priority sub-lists.
pub fn redis_lists(queue: &str, settings: &Settings) -> Vec<String> {
    let mut lists: Vec<String> = Vec::new();
    for step in &settings.priority_steps {
        let list = if *step == 0 {
            queue.to_string()
        } else {
            format!("{queue}{}{step}", settings.priority_separator)
        };
        if !lists.contains(&list) {
            lists.push(list);
        }
    }
    if lists.is_empty() {
        lists.push(queue.to_string());
    }
    lists
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
    let mut resource_only = true;
    for (i, m) in a.metrics.iter().enumerate() {
        let at = format!("autoscaling.metrics[{i}]");
        match (m.name.as_str(), &broker) {
            ("cpu" | "memory", _) => triggers.push(resource_trigger(&at, m)?),
            (TASK_QUEUE_LENGTH, Some((_, kind))) => {
                let kind = *kind;
                resource_only = false;
                let value = queue_target(&at, m, kind)?;
                if input.queues.is_empty() {
                    return Err(format!(
                        "pool {:?} has no queues to measure for {TASK_QUEUE_LENGTH}",
                        input.pool
                    ));
                }
                for queue in &input.queues {
                    match kind {
                        BrokerType::Redis => {
                            for list in redis_lists(queue, &settings) {
                                triggers.push(json!({
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
                        BrokerType::Rabbitmq => triggers.push(json!({
                            "type": "rabbitmq",
                            "metricType": "AverageValue",
                            "metadata": {
                                "protocol": "amqp",
                                "queueName": queue,
                                "mode": "QueueLength",
                                "value": value,
                            },
                            "authenticationRef": auth_ref,
                        })),
                    }
                }
            }
            (other, _) => {
                return Err(format!(
                    "{at}.name: unknown metric {other:?}; the keda autoscaler supports cpu, \
                     memory and {TASK_QUEUE_LENGTH}"
                ));
            }
        }
    }
    if resource_only && a.min_replicas == 0 {
        return Err(
            "autoscaling.minReplicas: KEDA cannot scale to zero on cpu or memory alone; set \
             minReplicas to 1 or more, or add a taskQueueLength metric"
                .into(),
        );
    }

    let mut spec = json!({
        "scaleTargetRef": {"name": name},
        "minReplicaCount": a.min_replicas,
        "maxReplicaCount": a.max_replicas,
        "pollingInterval": settings.polling_interval,
        "cooldownPeriod": settings.cooldown_period,
        "triggers": triggers,
    });
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
                vec![json!({"parameter": "host", "name": secret, "key": broker.secret_ref.key})]
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
