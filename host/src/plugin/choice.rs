//! Which plugin does what for a resource: the cluster's choices (flags of
//! `celery-operator run`, set by the Helm chart) and a resource's own.
//!
//! Two kinds of plugin take part in autoscaling, and they are easy to confuse:
//! - an **autoscaler** plugin (`autoscaler` role) *emits objects* that scale a pool: the
//!   `hpa` plugin an HorizontalPodAutoscaler, the `keda` plugin a KEDA ScaledObject. It runs
//!   once per reconcile and Kubernetes (or KEDA) does the scaling.
//! - a **scaler** plugin (`scaler` role) *decides replicas*: with the autoscaler `operator`
//!   no objects are emitted and the operator's own scaler loop (`crate::scaler`) samples the
//!   broker and asks the scaler plugin (`queue-length` by default) every poll interval.

use std::sync::Arc;

use super::oci::Registries;
use super::{FailurePolicy, PluginId, Registry};
use crate::crd::{Autoscaling, MetricName, WorkerPool};

/// The autoscaler name meaning "no objects: the operator's own scaler loop scales".
pub const OPERATOR_AUTOSCALER: &str = "operator";

/// The cluster's plugin choices.
#[derive(Clone, Debug)]
pub struct PluginConfig {
    /// Shapers run on every resource, before the resource's own.
    pub cluster_shapers: Vec<PluginId>,
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
    /// How plugins in registries are reached and which signatures they need.
    pub registries: Registries,
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
            registries: Registries::default(),
        }
    }
}

/// The plugins a cluster has and its choices of them: what reconciliation, `render` and the
/// scaler loops share.
pub struct Plugins {
    /// The named plugins.
    pub registry: Arc<Registry>,
    /// The cluster's choices.
    pub config: PluginConfig,
}

impl Plugins {
    /// Plugins from a registry and the cluster's choices.
    pub fn new(registry: Arc<Registry>, config: PluginConfig) -> Self {
        Plugins { registry, config }
    }

    /// The autoscaler plugin a pool uses: its own choice, or the cluster's default for its
    /// metrics. `None` for a pool that is not autoscaled.
    pub fn autoscaler_of(&self, pool: &WorkerPool) -> Option<PluginId> {
        let autoscaling = pool.autoscaling.as_ref()?;
        Some(match &autoscaling.autoscaler {
            Some(r) => PluginId::from(r),
            None => PluginId::named(self.default_autoscaler_for(pool)),
        })
    }

    /// The cluster's default autoscaler for a pool's metrics.
    fn default_autoscaler_for(&self, pool: &WorkerPool) -> &str {
        let on_queues = pool.autoscaling.as_ref().is_some_and(|a| {
            a.metrics
                .iter()
                .any(|m| m.name == MetricName::TaskQueueLength)
        });
        if on_queues {
            &self.config.default_queue_autoscaler
        } else {
            &self.config.default_autoscaler
        }
    }

    /// Whether the operator's own scaler loop scales the pool.
    pub fn operator_scales(&self, pool: &WorkerPool) -> bool {
        self.autoscaler_of(pool)
            .is_some_and(|a| a.name == OPERATOR_AUTOSCALER)
    }

    /// The scaler plugin that decides an autoscaled pool's replicas (when the operator
    /// scales it).
    pub fn scaler_of(&self, autoscaling: &Autoscaling) -> PluginId {
        match &autoscaling.scaler {
            Some(s) => PluginId::from(s),
            None => PluginId::named(&self.config.default_scaler),
        }
    }

    /// The built-in a role's `builtin` failure policy falls back to for a pool (or, for
    /// shapers, `None`): see [`super::policy`].
    pub fn default_builtin(&self, role: super::Role, pool: Option<&WorkerPool>) -> &str {
        match role {
            super::Role::Shaper => "noop",
            super::Role::Autoscaler => pool.map_or(&self.config.default_autoscaler, |p| {
                self.default_autoscaler_for(p)
            }),
            super::Role::Scaler => &self.config.default_scaler,
        }
    }

    /// The failure policy of a role.
    pub fn policy(&self, role: super::Role) -> FailurePolicy {
        match role {
            super::Role::Shaper => self.config.shaper_failure,
            super::Role::Autoscaler => self.config.autoscaler_failure,
            super::Role::Scaler => self.config.scaler_failure,
        }
    }
}
