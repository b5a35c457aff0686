//! `hpa`: an autoscaler plugin that scales a worker pool with one Kubernetes
//! `autoscaling/v2` HorizontalPodAutoscaler on `cpu` and `memory` metrics.
//!
//! An HPA reads resource metrics only: a `taskQueueLength` metric is rejected (use the
//! `keda` autoscaler or the operator's queue-length scaler), and so is `minReplicas: 0` (an
//! HPA cannot scale to zero).
//!
//! The pool's `autoscaling.behavior` becomes the HPA's `spec.behavior` (scale-up/scale-down
//! policies and stabilization windows). Settings (optional): `{"behavior": {...}}`, in the
//! same shape (`scaleUp`/`scaleDown`: `stabilizationWindowSeconds`, `selectPolicy`,
//! `policies`), used instead of the resource's.
//!
//! The HPA is named after the pool's Deployment; the host sets its namespace, owner
//! reference and labels.

use celery_operator_plugin_sdk::autoscaler::{Guest, PoolInput};
use celery_operator_plugin_sdk::json::{Autoscaling, Behavior, Metric, TASK_QUEUE_LENGTH};
use celery_operator_plugin_sdk::{parse_settings, serde_json};
use serde::{Deserialize, Serialize};

/// The plugin's settings.
#[derive(Deserialize, Debug, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// The HPA's `spec.behavior`, instead of the pool's `autoscaling.behavior`.
    pub behavior: Option<Behavior>,
}

// The HorizontalPodAutoscaler, as typed structs: serializing them needs far less code in the
// component than building a `serde_json::Value` (which keeps the plugin quick to compile).

/// An `autoscaling/v2` HorizontalPodAutoscaler, as far as this plugin fills it in.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct HorizontalPodAutoscaler<'a> {
    api_version: &'static str,
    kind: &'static str,
    metadata: Metadata<'a>,
    spec: HpaSpec<'a>,
}

/// An object's metadata: only its name (the host sets the rest).
#[derive(Serialize, Debug)]
struct Metadata<'a> {
    name: &'a str,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct HpaSpec<'a> {
    scale_target_ref: ScaleTargetRef<'a>,
    min_replicas: u32,
    max_replicas: u32,
    metrics: Vec<ResourceMetric<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    behavior: Option<Behavior>,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct ScaleTargetRef<'a> {
    api_version: &'static str,
    kind: &'static str,
    name: &'a str,
}

/// A `metrics[]` entry of type `Resource`.
#[derive(Serialize, Debug)]
struct ResourceMetric<'a> {
    #[serde(rename = "type")]
    type_: &'static str,
    resource: Resource<'a>,
}

#[derive(Serialize, Debug)]
struct Resource<'a> {
    name: &'a str,
    target: Target<'a>,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct Target<'a> {
    #[serde(rename = "type")]
    type_: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    average_utilization: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    average_value: Option<&'a str>,
}

/// One HPA `metrics[]` entry for a `cpu` or `memory` metric.
fn resource_metric(index: usize, m: &Metric) -> Result<ResourceMetric<'_>, String> {
    let at = format!("autoscaling.metrics[{index}]");
    match m.name.as_str() {
        "cpu" | "memory" => {}
        TASK_QUEUE_LENGTH => {
            return Err(format!(
                "{at}: an HPA cannot read queue length; use the keda autoscaler or the \
                 operator's queue-length scaler for {TASK_QUEUE_LENGTH}"
            ));
        }
        other => {
            return Err(format!(
                "{at}.name: unknown metric {other:?}; the hpa autoscaler supports cpu and memory"
            ));
        }
    }
    let target = match m.target.type_.as_str() {
        "Utilization" => Target {
            type_: "Utilization",
            average_utilization: Some(m.target.average_utilization.ok_or_else(|| {
                format!("{at}.target: a Utilization target needs averageUtilization")
            })?),
            average_value: None,
        },
        "AverageValue" => Target {
            type_: "AverageValue",
            average_utilization: None,
            average_value: Some(m.target.average_value.as_deref().ok_or_else(|| {
                format!("{at}.target: an AverageValue target needs averageValue")
            })?),
        },
        other => {
            return Err(format!(
                "{at}.target.type: unknown target type {other:?}; expected Utilization or AverageValue"
            ));
        }
    };
    Ok(ResourceMetric {
        type_: "Resource",
        resource: Resource {
            name: &m.name,
            target,
        },
    })
}

/// Builds the HorizontalPodAutoscaler for a pool, as JSON.
pub fn horizontal_pod_autoscaler(input: &PoolInput) -> Result<String, String> {
    let settings: Settings = parse_settings(&input.settings)?;
    let a = Autoscaling::parse(&input.autoscaling)?;
    if a.min_replicas == 0 {
        return Err(
            "autoscaling.minReplicas: an HPA cannot scale to zero (minReplicas 0); set \
             minReplicas to 1 or more, or use the keda autoscaler or the operator's \
             queue-length scaler"
                .into(),
        );
    }
    if a.metrics.is_empty() {
        return Err("autoscaling.metrics: at least one cpu or memory metric is needed".into());
    }
    let metrics = a
        .metrics
        .iter()
        .enumerate()
        .map(|(i, m)| resource_metric(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    let hpa = HorizontalPodAutoscaler {
        api_version: "autoscaling/v2",
        kind: "HorizontalPodAutoscaler",
        metadata: Metadata {
            name: &input.deployment,
        },
        spec: HpaSpec {
            scale_target_ref: ScaleTargetRef {
                api_version: "apps/v1",
                kind: "Deployment",
                name: &input.deployment,
            },
            min_replicas: a.min_replicas,
            max_replicas: a.max_replicas,
            metrics,
            behavior: settings.behavior.or(a.behavior),
        },
    };
    serde_json::to_string(&hpa).map_err(|e| format!("serializing the HPA: {e}"))
}

/// The plugin.
pub struct Hpa;

impl Guest for Hpa {
    fn objects(input: PoolInput) -> Result<Vec<String>, String> {
        Ok(vec![horizontal_pod_autoscaler(&input)?])
    }
}

celery_operator_plugin_sdk::export_autoscaler!(Hpa);

#[cfg(test)]
mod tests {
    use super::*;
    use celery_operator_plugin_sdk::serde_json::{Value, json};

    fn input(autoscaling: &str, settings: &str) -> PoolInput {
        PoolInput {
            celery: r#"{"metadata":{"name":"app"},"spec":{}}"#.into(),
            pool: "default".into(),
            deployment: "app-worker-default".into(),
            autoscaling: autoscaling.into(),
            queues: vec!["celery".into()],
            settings: settings.into(),
        }
    }

    fn objects(autoscaling: &str, settings: &str) -> Result<Vec<Value>, String> {
        Hpa::objects(input(autoscaling, settings)).map(|objs| {
            objs.iter()
                .map(|o| serde_json::from_str(o).unwrap())
                .collect()
        })
    }

    #[test]
    fn cpu_and_memory() {
        let objs = objects(
            r#"{"minReplicas":2,"maxReplicas":10,"metrics":[
                {"name":"cpu","target":{"type":"Utilization","averageUtilization":70}},
                {"name":"memory","target":{"type":"AverageValue","averageValue":"512Mi"}}]}"#,
            "{}",
        )
        .unwrap();
        assert_eq!(
            objs,
            vec![json!({
                "apiVersion": "autoscaling/v2",
                "kind": "HorizontalPodAutoscaler",
                "metadata": {"name": "app-worker-default"},
                "spec": {
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "app-worker-default"},
                    "minReplicas": 2,
                    "maxReplicas": 10,
                    "metrics": [
                        {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}},
                        {"type": "Resource", "resource": {"name": "memory", "target": {"type": "AverageValue", "averageValue": "512Mi"}}},
                    ],
                },
            })]
        );
        // Nothing the host owns.
        assert!(objs[0]["metadata"].get("namespace").is_none());
        assert!(objs[0]["metadata"].get("labels").is_none());
        assert!(objs[0]["metadata"].get("ownerReferences").is_none());
    }

    #[test]
    fn the_pools_behavior_is_the_hpas() {
        let input = PoolInput {
            celery: "{}".into(),
            pool: "p".into(),
            deployment: "d".into(),
            autoscaling: r#"{"minReplicas":1,"maxReplicas":3,"metrics":[{"name":"cpu","target":{"type":"Utilization","averageUtilization":50}}],
                "behavior":{"scaleDown":{"stabilizationWindowSeconds":60}}}"#.into(),
            queues: vec![],
            settings: "{}".into(),
        };
        let hpa: Value = serde_json::from_str(&Hpa::objects(input).unwrap()[0]).unwrap();
        assert_eq!(
            hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"],
            60
        );
    }

    #[test]
    fn behavior_is_copied() {
        let behavior = json!({"scaleDown": {"stabilizationWindowSeconds": 60, "policies": [{"type": "Pods", "value": 1, "periodSeconds": 30}]}});
        let objs = objects(
            r#"{"minReplicas":1,"maxReplicas":3,"metrics":[{"name":"cpu","target":{"type":"Utilization","averageUtilization":50}}]}"#,
            &json!({"behavior": behavior}).to_string(),
        )
        .unwrap();
        assert_eq!(objs[0]["spec"]["behavior"], behavior);
    }

    #[test]
    fn queue_length_is_rejected() {
        let err = objects(
            r#"{"minReplicas":1,"maxReplicas":10,"metrics":[
                {"name":"cpu","target":{"type":"Utilization","averageUtilization":70}},
                {"name":"taskQueueLength","target":{"type":"AverageValue","averageValue":"5"}}]}"#,
            "{}",
        )
        .unwrap_err();
        assert_eq!(
            err,
            "autoscaling.metrics[1]: an HPA cannot read queue length; use the keda autoscaler \
             or the operator's queue-length scaler for taskQueueLength"
        );
    }

    #[test]
    fn scale_to_zero_is_rejected() {
        let err = objects(
            r#"{"minReplicas":0,"maxReplicas":10,"metrics":[{"name":"cpu","target":{"type":"Utilization","averageUtilization":70}}]}"#,
            "{}",
        )
        .unwrap_err();
        assert!(
            err.starts_with("autoscaling.minReplicas: an HPA cannot scale to zero"),
            "{err}"
        );
    }

    #[test]
    fn other_errors() {
        let cpu = r#"[{"name":"cpu","target":{"type":"Utilization","averageUtilization":70}}]"#;
        let err = objects(
            &format!(r#"{{"minReplicas":3,"maxReplicas":2,"metrics":{cpu}}}"#),
            "{}",
        )
        .unwrap_err();
        assert_eq!(err, "autoscaling.maxReplicas: 2 is below minReplicas 3");
        let err = objects(r#"{"minReplicas":1,"maxReplicas":2,"metrics":[]}"#, "{}").unwrap_err();
        assert!(err.starts_with("autoscaling.metrics: "), "{err}");
        let err = objects(
            r#"{"minReplicas":1,"maxReplicas":2,"metrics":[{"name":"cpu","target":{"type":"Utilization"}}]}"#,
            "{}",
        )
        .unwrap_err();
        assert_eq!(
            err,
            "autoscaling.metrics[0].target: a Utilization target needs averageUtilization"
        );
        let err = objects(
            r#"{"minReplicas":1,"maxReplicas":2,"metrics":[{"name":"gpu","target":{"type":"Utilization","averageUtilization":1}}]}"#,
            "{}",
        )
        .unwrap_err();
        assert!(
            err.starts_with("autoscaling.metrics[0].name: unknown metric \"gpu\""),
            "{err}"
        );
        let err = objects(
            &format!(r#"{{"minReplicas":1,"maxReplicas":2,"metrics":{cpu}}}"#),
            r#"{"behaviour": {}}"#,
        )
        .unwrap_err();
        assert!(
            err.starts_with("settings.behaviour: unknown field"),
            "{err}"
        );
        let err = objects(
            &format!(r#"{{"minReplicas":1,"maxReplicas":2,"metrics":{cpu}}}"#),
            r#"{"behavior": 5}"#,
        )
        .unwrap_err();
        assert!(err.starts_with("settings.behavior: invalid type"), "{err}");
    }
}
