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
use std::collections::BTreeMap;

use celery_operator_plugin_sdk::json::{
    Autoscaling, Behavior, Broker, Metric, TASK_QUEUE_LENGTH, string_or_number,
};
use celery_operator_plugin_sdk::{parse_settings, serde_json};
use serde::{Deserialize, Serialize};

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

// The objects, as typed structs: serializing them needs far less code in the component than
// building `serde_json::Value`s (which keeps the plugin quick to compile).

/// A Kubernetes object as this plugin fills it in: the host sets namespace, labels and owner.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct Object<'a, Spec> {
    api_version: &'static str,
    kind: &'static str,
    metadata: Name<'a>,
    spec: Spec,
}

/// `{"name": ...}`: an object's metadata, a scale target, an authentication reference.
#[derive(Serialize, Debug, Clone, Copy)]
struct Name<'a> {
    name: &'a str,
}

/// A ScaledObject's spec.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct ScaledObjectSpec<'a> {
    scale_target_ref: Name<'a>,
    min_replica_count: u32,
    max_replica_count: u32,
    polling_interval: u32,
    cooldown_period: u32,
    triggers: Vec<Trigger<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    advanced: Option<Advanced<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fallback: Option<Fallback>,
}

/// One KEDA trigger; its `metadata` is a map of strings, as KEDA reads it.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct Trigger<'a> {
    #[serde(rename = "type")]
    type_: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    metric_type: &'static str,
    metadata: BTreeMap<&'static str, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    authentication_ref: Option<Name<'a>>,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct Advanced<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    scaling_modifiers: Option<ScalingModifiers>,
    #[serde(skip_serializing_if = "Option::is_none")]
    horizontal_pod_autoscaler_config: Option<HpaConfig<'a>>,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct ScalingModifiers {
    formula: String,
    target: String,
    metric_type: &'static str,
}

#[derive(Serialize, Debug)]
struct HpaConfig<'a> {
    behavior: &'a Behavior,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct Fallback {
    failure_threshold: u32,
    replicas: u32,
}

/// A TriggerAuthentication's spec.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct TriggerAuthenticationSpec<'a> {
    secret_target_ref: Vec<SecretTargetRef<'a>>,
}

#[derive(Serialize, Debug)]
struct SecretTargetRef<'a> {
    parameter: &'static str,
    name: &'a str,
    key: &'a str,
}

/// The broker kinds KEDA triggers are built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BrokerType {
    Redis,
    Rabbitmq,
}

/// A `cpu` or `memory` trigger.
fn resource_trigger<'a>(at: &str, m: &'a Metric) -> Result<Trigger<'a>, String> {
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
    Ok(Trigger {
        type_: &m.name,
        name: None,
        metric_type,
        metadata: BTreeMap::from([("value", value)]),
        authentication_ref: None,
    })
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

/// Builds the ScaledObject and, when a queue trigger needs one, the TriggerAuthentication,
/// as JSON.
pub fn keda_objects(input: &PoolInput) -> Result<Vec<String>, String> {
    let settings: Settings = parse_settings(&input.settings)?;
    let a = Autoscaling::parse(&input.autoscaling)?;
    if a.metrics.is_empty() {
        return Err("autoscaling.metrics: at least one metric is needed".into());
    }
    let name = Name {
        name: &input.deployment,
    };

    // The broker matters only for queue-length triggers.
    let broker = if a.metrics.iter().any(|m| m.name == TASK_QUEUE_LENGTH) {
        Some(broker_of(&input.celery)?)
    } else {
        None
    };

    let mut triggers = Vec::new();
    // Queue triggers, summed by a scaling modifier when there are several.
    let mut queue_triggers: Vec<Trigger> = Vec::new();
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
                let trigger = |type_, metadata| Trigger {
                    type_,
                    name: None,
                    metric_type: "AverageValue",
                    metadata,
                    authentication_ref: Some(name),
                };
                for queue in &input.queues {
                    match kind {
                        BrokerType::Redis => {
                            for list in broker.redis.lists(queue) {
                                queue_triggers.push(trigger(
                                    "redis",
                                    BTreeMap::from([
                                        ("listName", list),
                                        ("listLength", value.clone()),
                                        ("databaseIndex", settings.database_index.clone()),
                                    ]),
                                ));
                            }
                        }
                        BrokerType::Rabbitmq => {
                            let mut metadata = BTreeMap::from([
                                ("protocol", "http".to_string()),
                                ("queueName", queue.clone()),
                                ("mode", "QueueLength".to_string()),
                                ("value", value.clone()),
                            ]);
                            if let Some(url) = &broker.rabbitmq.management_url {
                                metadata.insert("host", url.clone());
                            }
                            if let Some(vhost) = &settings.vhost_name {
                                metadata.insert("vhostName", vhost.clone());
                            }
                            queue_triggers.push(trigger("rabbitmq", metadata));
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
    let scaling_modifiers = match queue_target_value {
        Some(target) if queue_triggers.len() > 1 => {
            let names: Vec<String> = (0..queue_triggers.len()).map(|i| format!("q{i}")).collect();
            let formula = names.join(" + ");
            for (trigger, name) in queue_triggers.iter_mut().zip(names) {
                trigger.name = Some(name);
            }
            Some(ScalingModifiers {
                formula,
                target,
                metric_type: "AverageValue",
            })
        }
        _ => None,
    };
    let horizontal_pod_autoscaler_config =
        a.behavior.as_ref().map(|behavior| HpaConfig { behavior });
    let advanced = (scaling_modifiers.is_some() || horizontal_pod_autoscaler_config.is_some())
        .then_some(Advanced {
            scaling_modifiers,
            horizontal_pod_autoscaler_config,
        });
    triggers.extend(queue_triggers);

    let has_resource_trigger = a.metrics.iter().any(|m| m.name != TASK_QUEUE_LENGTH);
    let fallback = match (&settings.fallback, has_resource_trigger) {
        (Some(f), false) => Some(Fallback {
            failure_threshold: f.failure_threshold,
            replicas: f.replicas.unwrap_or(a.min_replicas.max(1)),
        }),
        _ => None,
    };
    let scaled_object = Object {
        api_version: "keda.sh/v1alpha1",
        kind: "ScaledObject",
        metadata: name,
        spec: ScaledObjectSpec {
            scale_target_ref: name,
            min_replica_count: a.min_replicas,
            max_replica_count: a.max_replicas,
            polling_interval: settings.polling_interval,
            cooldown_period: settings.cooldown_period,
            triggers,
            advanced,
            fallback,
        },
    };
    let mut objects = vec![to_json(&scaled_object)?];

    if let Some((broker, kind)) = &broker {
        let secret = &broker.secret_ref.name;
        let secret_ref = |parameter, key| SecretTargetRef {
            parameter,
            name: secret,
            key,
        };
        let refs = match kind {
            BrokerType::Redis => {
                let mut refs = vec![secret_ref("address", &settings.address_key)];
                if let Some(key) = settings.password_key.as_deref().filter(|k| !k.is_empty()) {
                    refs.push(secret_ref("password", key));
                }
                refs
            }
            BrokerType::Rabbitmq => {
                let password = settings
                    .password_key
                    .as_deref()
                    .filter(|k| !k.is_empty())
                    .ok_or("settings.passwordKey: KEDA's management API access needs a password")?;
                let mut refs = vec![
                    secret_ref("username", &settings.username_key),
                    secret_ref("password", password),
                ];
                if broker.rabbitmq.management_url.is_none() {
                    refs.push(secret_ref("host", &settings.management_url_key));
                }
                refs
            }
        };
        objects.push(to_json(&Object {
            api_version: "keda.sh/v1alpha1",
            kind: "TriggerAuthentication",
            metadata: name,
            spec: TriggerAuthenticationSpec {
                secret_target_ref: refs,
            },
        })?);
    }
    Ok(objects)
}

fn to_json(object: &impl Serialize) -> Result<String, String> {
    serde_json::to_string(object).map_err(|e| format!("serializing a KEDA object: {e}"))
}

/// The plugin.
pub struct Keda;

impl Guest for Keda {
    fn objects(input: PoolInput) -> Result<Vec<String>, String> {
        keda_objects(&input)
    }
}

celery_operator_plugin_sdk::export_autoscaler!(Keda);

#[cfg(test)]
mod tests;
