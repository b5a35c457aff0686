//! Stage 3 of reconciliation: plugins turn the built objects into the objects to apply.
//! Autoscaler plugins add the objects that scale each autoscaled pool; the shaping chain
//! (cluster-wide shapers, then the resource's own) may adjust or drop objects, or reject the
//! whole set. A plugin that fails is handled by its role's [`FailurePolicy`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kube::ResourceExt;

use crate::build;
use crate::children::Child;
use crate::crd::{Celery, MetricName, PluginUse, WorkerPool};
use crate::plugin::bindings::{autoscaler::PoolInput, shaper::ShapeInput};
use crate::plugin::{
    FailurePolicy, PluginError, PluginRef, Registry, Resolved, Role, settings_text,
};
use crate::plugin_output;

/// The autoscaler name meaning "no objects: the operator's own scaler loop scales".
pub const OPERATOR_AUTOSCALER: &str = "operator";

/// The cluster's plugin choices (flags of `celery-operator run`; the Helm chart sets them).
#[derive(Clone, Debug)]
pub struct PluginConfig {
    /// Shapers run on every resource, before the resource's own.
    pub cluster_shapers: Vec<PluginRef>,
    /// Autoscaler of pools whose metrics are all cpu or memory.
    pub default_autoscaler: String,
    /// Autoscaler of pools that scale on taskQueueLength.
    pub default_queue_autoscaler: String,
    /// Scaling-decision plugin of the operator's own scaler.
    pub default_scaler: String,
    /// What a shaper failure does.
    pub shaper_failure: FailurePolicy,
    /// What an autoscaler plugin failure does.
    pub autoscaler_failure: FailurePolicy,
    /// What a scaling-decision plugin failure does.
    pub scaler_failure: FailurePolicy,
}

impl Default for PluginConfig {
    fn default() -> Self {
        PluginConfig {
            cluster_shapers: Vec::new(),
            default_autoscaler: "hpa".into(),
            default_queue_autoscaler: OPERATOR_AUTOSCALER.into(),
            default_scaler: "queue-length".into(),
            shaper_failure: FailurePolicy::Fail,
            autoscaler_failure: FailurePolicy::KeepLastGood,
            scaler_failure: FailurePolicy::KeepLastGood,
        }
    }
}

/// Plugins as reconciliation uses them.
pub struct Plugins {
    /// The named plugins.
    pub registry: Arc<Registry>,
    /// The cluster's choices.
    pub config: PluginConfig,
    /// Last good autoscaler objects per resource uid and pool, for `keep-last-good`.
    last_good: Mutex<HashMap<(String, String), Vec<Child>>>,
}

impl Plugins {
    /// Plugins from a registry and the cluster's choices.
    pub fn new(registry: Arc<Registry>, config: PluginConfig) -> Self {
        Plugins {
            registry,
            config,
            last_good: Mutex::default(),
        }
    }
}

/// The objects to apply, and what the plugins did.
#[derive(Debug, Default)]
pub struct Shaped {
    /// The objects to apply.
    pub children: Vec<Child>,
    /// Every plugin that ran, for the status.
    pub uses: Vec<PluginUse>,
    /// Plugin failures the failure policy absorbed, in words.
    pub problems: Vec<String>,
    /// Pools whose autoscaler failed with nothing to fall back on: their live autoscaler
    /// objects are kept as they are.
    pub kept_pools: Vec<String>,
    /// A shaper failed under `keep-last-good`: apply and prune nothing, keep what runs.
    pub hold: bool,
}

/// Why nothing can be applied.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ShapeError {
    /// A shaper rejected the objects: a policy decision, not a failure.
    #[error("shaper {plugin} rejected the objects: {message}")]
    Rejected {
        /// The shaper.
        plugin: String,
        /// Its reason.
        message: String,
    },
    /// A plugin failed and its policy is `fail` (or the fallback failed too).
    #[error("{role} plugin {plugin} failed: {error}")]
    Failed {
        /// The role.
        role: Role,
        /// The plugin.
        plugin: String,
        /// What went wrong.
        error: PluginError,
    },
}

/// Runs the autoscaler plugins and the shaping chain on the built objects.
pub fn shape(plugins: &Plugins, celery: &Celery, built: Vec<Child>) -> Result<Shaped, ShapeError> {
    let mut shaped = Shaped {
        children: built,
        ..Default::default()
    };
    let celery_json = celery_for_plugins(celery);
    for pool in &celery.spec.workers {
        add_autoscaler_objects(plugins, celery, &celery_json, pool, &mut shaped)?;
    }
    // Last good objects of pools this resource no longer has are of no further use.
    let uid = celery.uid().unwrap_or_default();
    let pools = &celery.spec.workers;
    plugins
        .last_good
        .lock()
        .expect("last-good lock")
        .retain(|(u, pool), _| *u != uid || pools.iter().any(|p| p.name == *pool));
    // The cluster's shapers (no settings), then the resource's own, each with its settings.
    let own = celery.spec.plugins.iter().flat_map(|p| &p.shapers);
    let chain = (plugins
        .config
        .cluster_shapers
        .iter()
        .map(|r| (r.clone(), None)))
    .chain(own.map(|s| (PluginRef::from(s), s.settings.as_ref())));
    for (wanted, settings) in chain {
        let settings = settings_text(settings);
        let result = plugins
            .registry
            .resolve(Role::Shaper, &wanted)
            .and_then(|r| {
                run_shaper(
                    &plugins.registry,
                    &r,
                    &celery_json,
                    settings,
                    &shaped.children,
                )
                .map(|c| (r, c))
            });
        match result {
            Ok((resolved, children)) => {
                shaped
                    .uses
                    .push(usage(Role::Shaper, "shaping", &resolved, None));
                shaped.children = children;
            }
            Err(PluginError::Rejected(message)) => {
                return Err(ShapeError::Rejected {
                    plugin: wanted.name,
                    message,
                });
            }
            Err(error) => match plugins.config.shaper_failure {
                FailurePolicy::Fail => {
                    return Err(ShapeError::Failed {
                        role: Role::Shaper,
                        plugin: wanted.name,
                        error,
                    });
                }
                FailurePolicy::Builtin => {
                    shaped.problems.push(format!(
                        "shaper {} failed ({error}); its objects were applied unshaped by it",
                        wanted.name
                    ));
                }
                FailurePolicy::KeepLastGood => {
                    shaped.problems.push(format!(
                        "shaper {} failed ({error}); nothing is applied, what runs is kept",
                        wanted.name
                    ));
                    shaped.hold = true;
                    return Ok(shaped);
                }
            },
        }
    }
    Ok(shaped)
}

fn usage(role: Role, target: &str, r: &Resolved, fallback: Option<String>) -> PluginUse {
    PluginUse {
        role: role.to_string(),
        target: target.into(),
        name: r.name.clone(),
        digest: r.plugin.digest.clone(),
        source: r.source.to_string(),
        fallback,
    }
}

/// The autoscaler a pool uses: its own choice, or the cluster default for its metrics.
pub fn autoscaler_of(config: &PluginConfig, pool: &WorkerPool) -> Option<PluginRef> {
    let autoscaling = pool.autoscaling.as_ref()?;
    Some(match &autoscaling.autoscaler {
        Some(r) => PluginRef::from(r),
        None if autoscaling
            .metrics
            .iter()
            .any(|m| m.name == MetricName::TaskQueueLength) =>
        {
            PluginRef::named(&config.default_queue_autoscaler)
        }
        None => PluginRef::named(&config.default_autoscaler),
    })
}

fn add_autoscaler_objects(
    plugins: &Plugins,
    celery: &Celery,
    celery_json: &str,
    pool: &WorkerPool,
    shaped: &mut Shaped,
) -> Result<(), ShapeError> {
    let Some(wanted) = autoscaler_of(&plugins.config, pool) else {
        return Ok(());
    };
    if wanted.name == OPERATOR_AUTOSCALER {
        return Ok(());
    }
    let autoscaling = pool.autoscaling.as_ref().expect("autoscaler_of checked it");
    let input = PoolInput {
        celery: celery_json.into(),
        pool: pool.name.clone(),
        deployment: build::worker_name(celery, &pool.name),
        autoscaling: serde_json::to_string(autoscaling).expect("serializes"),
        queues: pool.queues.clone(),
        settings: settings_text(
            autoscaling
                .autoscaler
                .as_ref()
                .and_then(|a| a.settings.as_ref()),
        ),
    };
    let target = format!("pool {}", pool.name);
    let key = (celery.uid().unwrap_or_default(), pool.name.clone());
    let run = |r: &Resolved| run_autoscaler(&plugins.registry, r, celery, pool, &input);
    let result = plugins
        .registry
        .resolve(Role::Autoscaler, &wanted)
        .and_then(|r| run(&r).map(|c| (r, c)));
    let error = match result {
        Ok((resolved, children)) => {
            shaped
                .uses
                .push(usage(Role::Autoscaler, &target, &resolved, None));
            let mut last = plugins.last_good.lock().expect("last-good lock");
            last.insert(key, children.clone());
            shaped.children.extend(children);
            return Ok(());
        }
        Err(error) => error,
    };
    let failed = |error| ShapeError::Failed {
        role: Role::Autoscaler,
        plugin: wanted.name.clone(),
        error,
    };
    match plugins.config.autoscaler_failure {
        FailurePolicy::Fail => Err(failed(error)),
        FailurePolicy::KeepLastGood => {
            let last = plugins
                .last_good
                .lock()
                .expect("last-good lock")
                .get(&key)
                .cloned();
            let what = match last {
                Some(children) => {
                    shaped.children.extend(children);
                    "the last good objects are applied"
                }
                None => {
                    shaped.kept_pools.push(pool.name.clone());
                    "the pool's autoscaler objects are left as they are"
                }
            };
            shaped.problems.push(format!(
                "autoscaler {} failed for pool {} ({error}); {what}",
                wanted.name, pool.name
            ));
            Ok(())
        }
        FailurePolicy::Builtin => {
            let builtin = plugins
                .registry
                .builtin(&wanted.name)
                .or_else(|| plugins.registry.builtin(&plugins.config.default_autoscaler))
                .ok_or_else(|| failed(error.clone()))?;
            let children = run(&builtin).map_err(failed)?;
            shaped.problems.push(format!(
                "autoscaler {} failed for pool {} ({error}); the built-in {} was used",
                wanted.name, pool.name, builtin.name
            ));
            shaped.uses.push(usage(
                Role::Autoscaler,
                &target,
                &builtin,
                Some(format!("{} failed", wanted.name)),
            ));
            shaped.children.extend(children);
            Ok(())
        }
    }
}

fn run_autoscaler(
    registry: &Registry,
    resolved: &Resolved,
    celery: &Celery,
    pool: &WorkerPool,
    input: &PoolInput,
) -> Result<Vec<Child>, PluginError> {
    let out = registry
        .runtime()
        .autoscaler_objects(&resolved.plugin, input)?;
    plugin_output::autoscaler_children(celery, pool, &out)
}

fn run_shaper(
    registry: &Registry,
    resolved: &Resolved,
    celery_json: &str,
    settings: String,
    children: &[Child],
) -> Result<Vec<Child>, PluginError> {
    let input = ShapeInput {
        celery: celery_json.into(),
        objects: children.iter().map(|c| c.object.to_string()).collect(),
        settings,
    };
    let out = registry.runtime().shape(&resolved.plugin, &input)?;
    plugin_output::shaped_children(children, &out)
}

/// The resource as plugins see it: identity and spec. Not its status, which holds other
/// plugins' messages, nor its managed fields.
pub fn celery_for_plugins(celery: &Celery) -> String {
    let m = &celery.metadata;
    serde_json::json!({
        "apiVersion": "celeryproject.org/v1alpha1",
        "kind": "Celery",
        "metadata": {
            "name": m.name, "namespace": m.namespace, "uid": m.uid,
            "generation": m.generation, "labels": m.labels, "annotations": m.annotations,
        },
        "spec": celery.spec,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugins_see_the_spec_but_not_the_status() {
        let mut celery = crate::build::tests::celery(crate::build::tests::FULL);
        celery.status = Some(crate::crd::CeleryStatus {
            conditions: vec![crate::status::condition(
                &[],
                "PluginsHealthy",
                false,
                "PluginFailed",
                "another plugin's message".into(),
                None,
                &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH),
            )],
            ..Default::default()
        });
        let seen: serde_json::Value = serde_json::from_str(&celery_for_plugins(&celery)).unwrap();
        assert!(seen.get("status").is_none());
        assert!(!seen.to_string().contains("another plugin's message"));
        assert_eq!(seen["spec"], serde_json::to_value(&celery.spec).unwrap());
        assert_eq!(
            seen["metadata"]["name"],
            celery.metadata.name.clone().unwrap()
        );
    }
}
