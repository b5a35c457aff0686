//! Stage 3 of reconciliation: plugins turn the built objects into the objects to apply.
//! Autoscaler plugins add the objects that scale each autoscaled pool; the shaping chain
//! (cluster-wide shapers, then the resource's own) may adjust or drop objects, or reject the
//! whole set. A plugin that fails is handled by its role's failure policy
//! ([`crate::plugin::policy`]).

use std::collections::BTreeMap;

use crate::children::Child;
use crate::crd::{Celery, PluginUse, WorkerPool};
use crate::names;
use crate::plugin::bindings::{autoscaler::PoolInput, shaper::ShapeInput};
use crate::plugin::policy::{self, Called};
use crate::plugin::{
    OPERATOR_AUTOSCALER, PluginError, PluginId, Plugins, Resolved, Role, settings_text,
};
use crate::plugin_output::{self, ShapedChild, take_shaped};

/// The objects to apply, and what the plugins did.
#[derive(Debug, Default)]
pub struct Shaped {
    /// The objects to apply.
    pub children: Vec<Child>,
    /// Every plugin that ran, for the status.
    pub uses: Vec<PluginUse>,
    /// Plugin failures the failure policy absorbed, in words.
    pub problems: Vec<String>,
    /// The objects each pool's autoscaler plugin returned this time (to remember as the last
    /// good ones).
    pub autoscaler_answers: BTreeMap<String, Vec<Child>>,
    /// Pools whose autoscaler failed with nothing to fall back on: their live autoscaler
    /// objects are kept as they are.
    pub kept_pools: Vec<String>,
    /// A shaper failed under `keep-last-good`: nothing is applied or pruned, what runs is
    /// kept.
    pub keep_what_runs: bool,
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

/// Runs the autoscaler plugins and the shaping chain on the built objects. `last_good` holds
/// the last objects each pool's autoscaler returned, for `keep-last-good`.
pub fn shape(
    plugins: &Plugins,
    celery: &Celery,
    built: Vec<Child>,
    last_good: &BTreeMap<String, Vec<Child>>,
) -> Result<Shaped, ShapeError> {
    let mut shaped = Shaped {
        children: built,
        ..Default::default()
    };
    let celery_json = celery_for_plugins(celery);
    for pool in &celery.spec.workers {
        add_autoscaler_objects(plugins, celery, &celery_json, pool, last_good, &mut shaped)?;
    }
    // The cluster's shapers (no settings), then the resource's own, each with its settings.
    let own = celery.spec.plugins.iter().flat_map(|p| &p.shapers);
    let chain = (plugins
        .config
        .cluster_shapers
        .iter()
        .map(|r| (r.clone(), None)))
    .chain(own.map(|s| (PluginId::from(s), s.settings.as_ref())));
    for (wanted, settings) in chain {
        let settings = settings_text(settings);
        let run = |r: &Resolved| run_shaper(plugins, r, &celery_json, &settings, &shaped.children);
        let failed = |error| ShapeError::Failed {
            role: Role::Shaper,
            plugin: wanted.name.clone(),
            error,
        };
        match policy::call(plugins, Role::Shaper, &wanted, None, run) {
            Called::Answered { by, value } => {
                shaped
                    .uses
                    .push(policy::usage(Role::Shaper, "shaping", &by, None));
                shaped.children = take_shaped(std::mem::take(&mut shaped.children), value);
            }
            Called::Replaced { error, by, value } => {
                shaped.problems.push(format!(
                    "shaper {} failed ({error}); the built-in {} was used instead",
                    wanted.name, by.name
                ));
                let fallback = Some(format!("{} failed", wanted.name));
                shaped
                    .uses
                    .push(policy::usage(Role::Shaper, "shaping", &by, fallback));
                shaped.children = take_shaped(std::mem::take(&mut shaped.children), value);
            }
            Called::KeepWhatRuns { error } => {
                shaped.problems.push(format!(
                    "shaper {} failed ({error}); nothing is applied, what runs is kept",
                    wanted.name
                ));
                shaped.keep_what_runs = true;
                return Ok(shaped);
            }
            Called::Failed {
                error: PluginError::Rejected(message),
            } => {
                return Err(ShapeError::Rejected {
                    plugin: wanted.name,
                    message,
                });
            }
            Called::Failed { error } => return Err(failed(error)),
        }
    }
    Ok(shaped)
}

fn add_autoscaler_objects(
    plugins: &Plugins,
    celery: &Celery,
    celery_json: &str,
    pool: &WorkerPool,
    last_good: &BTreeMap<String, Vec<Child>>,
    shaped: &mut Shaped,
) -> Result<(), ShapeError> {
    let (Some(wanted), Some(autoscaling)) = (plugins.autoscaler_of(pool), &pool.autoscaling) else {
        return Ok(());
    };
    if wanted.name == OPERATOR_AUTOSCALER {
        return Ok(());
    }
    let input = PoolInput {
        celery: celery_json.into(),
        pool: pool.name.clone(),
        deployment: names::worker_name(celery, &pool.name),
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
    let run = |r: &Resolved| {
        let out = plugins
            .registry
            .runtime()
            .with(r.limits)
            .autoscaler_objects(&r.plugin, &input)?;
        plugin_output::autoscaler_children(celery, pool, &out)
    };
    match policy::call(plugins, Role::Autoscaler, &wanted, Some(pool), run) {
        Called::Answered { by, value } => {
            shaped
                .uses
                .push(policy::usage(Role::Autoscaler, &target, &by, None));
            shaped
                .autoscaler_answers
                .insert(pool.name.clone(), value.clone());
            shaped.children.extend(value);
        }
        Called::Replaced { error, by, value } => {
            shaped.problems.push(format!(
                "autoscaler {} failed for pool {} ({error}); the built-in {} was used",
                wanted.name, pool.name, by.name
            ));
            let fallback = Some(format!("{} failed", wanted.name));
            shaped
                .uses
                .push(policy::usage(Role::Autoscaler, &target, &by, fallback));
            shaped.children.extend(value);
        }
        Called::KeepWhatRuns { error } => {
            let what = match last_good.get(&pool.name) {
                Some(children) => {
                    shaped.children.extend(children.iter().cloned());
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
        }
        Called::Failed { error } => {
            return Err(ShapeError::Failed {
                role: Role::Autoscaler,
                plugin: wanted.name,
                error,
            });
        }
    }
    Ok(())
}

fn run_shaper(
    plugins: &Plugins,
    resolved: &Resolved,
    celery_json: &str,
    settings: &str,
    children: &[Child],
) -> Result<Vec<ShapedChild>, PluginError> {
    let input = ShapeInput {
        celery: celery_json.into(),
        objects: children.iter().map(|c| c.object.to_string()).collect(),
        settings: settings.into(),
    };
    let out = plugins
        .registry
        .runtime()
        .with(resolved.limits)
        .shape(&resolved.plugin, &input)?;
    plugin_output::shaped_children(children, &input.objects, &out)
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
        let mut celery = crate::desired::tests::celery(crate::desired::tests::FULL);
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
