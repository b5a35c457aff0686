//! Typed views of the JSON documents the host passes in: the pool's `autoscaling` spec and
//! the parts of the Celery resource plugins usually need (the broker).
//!
//! Only the fields plugins read are modelled; unknown fields are ignored, so these keep
//! working when the CRD grows.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::settings::parse_json_at;

/// A worker pool's `autoscaling` spec (the autoscaler world's `pool-input.autoscaling`).
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Autoscaling {
    /// Fewest pods (may be 0).
    #[serde(default)]
    pub min_replicas: u32,
    /// Most pods.
    pub max_replicas: u32,
    /// What to scale on.
    #[serde(default)]
    pub metrics: Vec<Metric>,
    /// How fast to scale: a HorizontalPodAutoscaler's `behavior`, as the resource gives it.
    #[serde(default)]
    pub behavior: Option<Behavior>,
}

/// How fast a pool may scale up and down: a HorizontalPodAutoscaler's `spec.behavior`, in
/// the shape the resource's `autoscaling.behavior` has. It serializes back to the same
/// JSON (absent fields stay absent), so an autoscaler plugin can hand it to the HPA it
/// builds.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Behavior {
    /// Rules for adding replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_up: Option<ScalingRules>,
    /// Rules for removing replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down: Option<ScalingRules>,
}

/// Rules for one direction of scaling (an HPA's `HPAScalingRules`).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ScalingRules {
    /// Seconds of past recommendations considered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stabilization_window_seconds: Option<i32>,
    /// `Max`, `Min` or `Disabled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select_policy: Option<String>,
    /// Rate limits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<ScalingPolicy>,
}

/// One rate limit: at most `value` pods (`Pods`) or percent (`Percent`) per `periodSeconds`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ScalingPolicy {
    /// `Pods` or `Percent`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Pods, or percent of the replicas.
    pub value: i32,
    /// The period, in seconds.
    pub period_seconds: i32,
}

impl Autoscaling {
    /// Parses the `autoscaling` JSON and checks its bounds; errors name the offending field
    /// (`autoscaling.metrics[0].target: ...`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let a: Self = parse_json_at("autoscaling", text)?;
        if a.max_replicas < a.min_replicas {
            return Err(format!(
                "autoscaling.maxReplicas: {} is below minReplicas {}",
                a.max_replicas, a.min_replicas
            ));
        }
        Ok(a)
    }
}

/// One autoscaling metric and its target.
#[derive(Deserialize, Debug, Clone, PartialEq)]
pub struct Metric {
    /// `cpu`, `memory` or `taskQueueLength`.
    pub name: String,
    /// The value to hold the metric at.
    pub target: MetricTarget,
}

/// The metric name of the queue-length metric.
pub const TASK_QUEUE_LENGTH: &str = "taskQueueLength";

/// Target of an autoscaling metric.
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MetricTarget {
    /// `Utilization` or `AverageValue`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Percent of the pods' requests (`Utilization` targets).
    #[serde(default)]
    pub average_utilization: Option<u32>,
    /// Value per pod as a Kubernetes quantity (`AverageValue` targets), e.g. `500m`,
    /// `512Mi`, `5`. A JSON number is accepted and turned into its text.
    #[serde(default, deserialize_with = "optional_string_or_number")]
    pub average_value: Option<String>,
}

/// A `deserialize_with` helper: accepts a JSON string, or a number turned into its text
/// (`5` → `"5"`, `2.5` → `"2.5"`), for fields such as quantities that users write either
/// way. It reads the value without building a `serde_json::Value`, which keeps
/// components smaller.
pub fn string_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    d.deserialize_any(StringOrNumber)
}

/// [`string_or_number`] for an `Option<String>` field (`null` is `None`).
pub fn optional_string_or_number<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<String>, D::Error> {
    d.deserialize_option(OptionalStringOrNumber)
}

struct StringOrNumber;

impl serde::de::Visitor<'_> for StringOrNumber {
    type Value = String;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a string or a number")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<String, E> {
        Ok(v.to_string())
    }
}

struct OptionalStringOrNumber;

impl<'de> serde::de::Visitor<'de> for OptionalStringOrNumber {
    type Value = Option<String>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a string, a number or null")
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<Option<String>, E> {
        Ok(None)
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<Option<String>, E> {
        Ok(None)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Option<String>, D::Error> {
        string_or_number(d).map(Some)
    }
}

/// A Secret key reference (`{name, key}`).
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SecretKeyRef {
    /// Name of the Secret (in the resource's namespace).
    pub name: String,
    /// Key within the Secret.
    pub key: String,
}

/// The Celery resource's `spec.broker`.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Broker {
    /// The Secret key holding the broker URL.
    pub secret_ref: SecretKeyRef,
    /// `redis`, `rabbitmq`, or `None` when the resource does not say.
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    /// How kombu names a Redis broker's keys.
    #[serde(default)]
    pub redis: RedisTransport,
    /// Where a RabbitMQ broker's management API is.
    #[serde(default)]
    pub rabbitmq: RabbitmqAccess,
}

/// kombu's Redis transport options that change where tasks are stored (`spec.broker.redis`).
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(default, rename_all = "camelCase")]
pub struct RedisTransport {
    /// kombu's `global_keyprefix`, before every key.
    pub global_keyprefix: String,
    /// kombu's `sep`, between a queue's name and its priority step.
    pub sep: String,
    /// kombu's `priority_steps`; 0 is the queue's own list.
    pub priority_steps: Vec<u32>,
}

impl Default for RedisTransport {
    fn default() -> Self {
        RedisTransport {
            global_keyprefix: String::new(),
            sep: "\u{6}\u{16}".into(),
            priority_steps: vec![0, 3, 6, 9],
        }
    }
}

impl RedisTransport {
    /// The Redis lists kombu keeps for `queue`: its own list and one per priority step, each
    /// with the global key prefix.
    pub fn lists(&self, queue: &str) -> Vec<String> {
        let mut lists: Vec<String> = Vec::new();
        for step in &self.priority_steps {
            let list = if *step == 0 {
                format!("{}{queue}", self.global_keyprefix)
            } else {
                format!("{}{queue}{}{step}", self.global_keyprefix, self.sep)
            };
            if !lists.contains(&list) {
                lists.push(list);
            }
        }
        if lists.is_empty() {
            lists.push(format!("{}{queue}", self.global_keyprefix));
        }
        lists
    }
}

/// Access to RabbitMQ's management API (`spec.broker.rabbitmq`).
#[derive(Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[serde(default, rename_all = "camelCase")]
pub struct RabbitmqAccess {
    /// Base URL of the management API, without credentials.
    pub management_url: Option<String>,
}

impl Broker {
    /// Reads `spec.broker` from the Celery resource JSON.
    pub fn from_celery(celery: &str) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct Celery {
            spec: Spec,
        }
        #[derive(Deserialize)]
        struct Spec {
            broker: Broker,
        }
        let c: Celery = parse_json_at("celery", celery)?;
        Ok(c.spec.broker)
    }
}

/// Parses a JSON document passed by the host, with an error that says which one
/// (`what`) was not valid JSON.
pub fn parse_value(what: &str, text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|e| format!("{what}: not valid JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn autoscaling_parses_the_crd_shape() {
        let a = Autoscaling::parse(
            r#"{"minReplicas":1,"maxReplicas":10,"metrics":[
                {"name":"cpu","target":{"type":"Utilization","averageUtilization":70}},
                {"name":"taskQueueLength","target":{"type":"AverageValue","averageValue":"5"}},
                {"name":"memory","target":{"type":"AverageValue","averageValue":512}}],
                "autoscaler":{"name":"keda"}}"#,
        )
        .unwrap();
        assert_eq!(a.min_replicas, 1);
        assert_eq!(a.max_replicas, 10);
        assert_eq!(a.metrics[0].target.average_utilization, Some(70));
        assert_eq!(a.metrics[1].name, TASK_QUEUE_LENGTH);
        assert_eq!(a.metrics[1].target.average_value.as_deref(), Some("5"));
        assert_eq!(a.metrics[2].target.average_value.as_deref(), Some("512"));
    }

    #[test]
    fn quantities_as_strings_or_numbers() {
        let target = |v: &str| {
            serde_json::from_str::<MetricTarget>(&format!(
                r#"{{"type":"AverageValue","averageValue":{v}}}"#
            ))
            .map(|t| t.average_value)
        };
        assert_eq!(target(r#""500m""#).unwrap().as_deref(), Some("500m"));
        assert_eq!(target("5").unwrap().as_deref(), Some("5"));
        assert_eq!(target("2.5").unwrap().as_deref(), Some("2.5"));
        assert_eq!(target("null").unwrap(), None);
        assert!(target("[]").is_err());
    }

    #[test]
    fn autoscaling_errors_name_the_field() {
        let err = Autoscaling::parse(r#"{"maxReplicas":"ten"}"#).unwrap_err();
        assert!(err.starts_with("autoscaling.maxReplicas: "), "{err}");
    }

    #[test]
    fn broker_from_celery() {
        let b = Broker::from_celery(
            r#"{"metadata":{"name":"x"},"spec":{"broker":{"secretRef":{"name":"s","key":"url"},"type":"redis"}}}"#,
        )
        .unwrap();
        assert_eq!(b.secret_ref.name, "s");
        assert_eq!(b.secret_ref.key, "url");
        assert_eq!(b.type_.as_deref(), Some("redis"));
        let b = Broker::from_celery(r#"{"spec":{"broker":{"secretRef":{"name":"s","key":"k"}}}}"#)
            .unwrap();
        assert_eq!(b.type_, None);
        assert_eq!(
            b.redis.lists("q"),
            ["q", "q\u{6}\u{16}3", "q\u{6}\u{16}6", "q\u{6}\u{16}9"]
        );
        let b = Broker::from_celery(
            r#"{"spec":{"broker":{"secretRef":{"name":"s","key":"k"},"redis":{"globalKeyprefix":"shop:","sep":":","prioritySteps":[0,5]}}}}"#,
        )
        .unwrap();
        assert_eq!(b.redis.lists("q"), ["shop:q", "shop:q:5"]);
        let err = Broker::from_celery(r#"{"spec":{}}"#).unwrap_err();
        assert!(err.contains("missing field `broker`"), "{err}");
    }
}
