//! `celery-operator render`: the children the operator would apply for Celery resources
//! read from YAML, without a cluster: validated, built and shaped by the plugins (the
//! built-in ones; ConfigMap plugins live in a cluster).

use std::collections::BTreeMap;

use kube::ResourceExt;
use serde_json::Value;

use crate::crd::Celery;
use crate::plan::{PlanError, plan};
use crate::plugin::Plugins;

/// Why a file cannot be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The YAML is not a Celery resource.
    #[error("not a valid Celery resource: {0}")]
    Parse(String),
    /// The resource is invalid, or a plugin failed or rejected the objects.
    #[error("{name}: {error}")]
    Plan {
        /// Name of the resource.
        name: String,
        /// What went wrong.
        error: PlanError,
    },
    /// A plugin failed (and a cluster's failure policy would have kept what runs).
    #[error("{name}: {}", .problems.join("; "))]
    Plugins {
        /// Name of the resource.
        name: String,
        /// What failed.
        problems: Vec<String>,
    },
}

/// Renders every Celery resource in `yaml` (one or more documents) to the YAML of its
/// children, documents separated by `---`.
pub fn render(yaml: &str, plugins: &Plugins) -> Result<String, RenderError> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(yaml).map_err(|e| RenderError::Parse(e.to_string()))?;
    let mut out = Vec::new();
    for doc in docs.into_iter().filter(|d| !d.is_null()) {
        let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default();
        if kind != "Celery" {
            return Err(RenderError::Parse(format!(
                "expected kind Celery, found {kind:?}"
            )));
        }
        let mut celery: Celery =
            serde_json::from_value(doc).map_err(|e| RenderError::Parse(e.to_string()))?;
        if celery.namespace().is_none() {
            celery.metadata.namespace = Some("default".into());
        }
        let name = celery.name_any();
        // Offline there is no last good answer to keep.
        let plan = plan(&celery, plugins, &BTreeMap::new()).map_err(|error| RenderError::Plan {
            name: name.clone(),
            error,
        })?;
        // A plugin failure a failure policy would absorb in a cluster (and keep what runs) is
        // an error here: there is nothing running to keep.
        if !plan.problems.is_empty() || plan.keep_what_runs {
            return Err(RenderError::Plugins {
                name,
                problems: plan.problems,
            });
        }
        for child in plan.children {
            out.push(
                serde_saphyr::to_string(&child.object).expect("JSON values serialize to YAML"),
            );
        }
    }
    Ok(out.join("---\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::{Compiler, Limits, PluginConfig, Registry, Runtime};
    use std::sync::Arc;

    fn plugins() -> Plugins {
        let runtime = Arc::new(Runtime::new(Limits::default(), Compiler::InProcess));
        let registry = Registry::with_builtins(runtime).unwrap();
        Plugins::new(Arc::new(registry), PluginConfig::default())
    }

    const MINIMAL: &str = "apiVersion: celeryproject.org/v1alpha1\nkind: Celery\nmetadata: {name: m}\nspec:\n  app: proj\n  image: img\n  broker: {secretRef: {name: b, key: url}}\n  workers: [{name: default}]\n";

    #[test]
    fn renders_each_child_as_a_yaml_document() {
        let out = render(MINIMAL, &plugins()).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_multiple(&out).unwrap();
        assert_eq!(docs.len(), 1);
        assert_eq!(docs[0]["kind"], "Deployment");
        assert_eq!(docs[0]["metadata"]["namespace"], "default");
    }

    #[test]
    fn rejects_other_kinds_and_invalid_specs_clearly() {
        let err = render("kind: Deployment\nmetadata: {name: x}\n", &plugins()).unwrap_err();
        assert!(err.to_string().contains("expected kind Celery"), "{err}");
        let err = render(
            &MINIMAL.replace("name: default", "name: Bad_Name"),
            &plugins(),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("m: invalid Celery spec")
                && err.to_string().contains("DNS label"),
            "{err}"
        );
        let err = render(&MINIMAL.replace("  image: img\n", ""), &plugins()).unwrap_err();
        assert!(err.to_string().contains("image"), "{err}");
    }

    #[test]
    fn the_crds_bounds_are_checked() {
        let err = render(
            &MINIMAL.replace(
                "[{name: default}]",
                "[{name: default, replicas: -1, concurrency: 0}]",
            ),
            &plugins(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("spec.workers[0].replicas: Invalid value: -1"),
            "{err}"
        );
        assert!(
            err.contains("spec.workers[0].concurrency: Invalid value: 0"),
            "{err}"
        );
        let flower = MINIMAL.to_string() + "  flower: {enabled: true, port: 99999}\n";
        let err = render(&flower, &plugins()).unwrap_err().to_string();
        assert!(
            err.contains("spec.flower.port: Invalid value: 99999"),
            "{err}"
        );
    }

    #[test]
    fn a_plugin_refusal_fails_the_render() {
        for (autoscaling, expected) in [
            (
                "{minReplicas: 1, maxReplicas: 3, autoscaler: {name: keda}, metrics: [{name: taskQueueLength, target: {type: AverageValue, averageValue: '2.5'}}]}",
                "is not a whole number of tasks",
            ),
            (
                "{minReplicas: 0, maxReplicas: 3, autoscaler: {name: keda}, metrics: [{name: cpu, target: {type: Utilization, averageUtilization: 50}}]}",
                "cannot scale to zero",
            ),
            (
                "{minReplicas: 0, maxReplicas: 3, autoscaler: {name: hpa}, metrics: [{name: cpu, target: {type: Utilization, averageUtilization: 50}}]}",
                "minReplicas",
            ),
            (
                "{minReplicas: 1, maxReplicas: 3, autoscaler: {name: hpa}, metrics: [{name: taskQueueLength, target: {type: AverageValue, averageValue: '5'}}]}",
                "queue",
            ),
        ] {
            let yaml = MINIMAL
                .replace("broker: {secretRef:", "broker: {type: redis, secretRef:")
                .replace(
                    "[{name: default}]",
                    &format!("[{{name: default, autoscaling: {autoscaling}}}]"),
                );
            let err = render(&yaml, &plugins()).unwrap_err().to_string();
            assert!(err.contains(expected), "{autoscaling}: {err}");
        }
    }
}
