//! The Celery-aware worker lifecycle: one follower per resource reads its workers' own event
//! stream on the broker (heartbeats carry each worker's running and finished task counts),
//! keeps each worker pod's `controller.kubernetes.io/pod-deletion-cost` so that the
//! ReplicaSet removes stalled and idle workers before busy ones on scale-down, reports
//! stalled workers (a condition and an Event; optionally evicts their pods), and writes the
//! pools' figures to `status.liveWorkers`.
//!
//! [`roster`] is the pure core, [`report`] the status entry, `follower` the IO.

mod follower;
pub mod report;
pub mod roster;

use std::sync::Arc;

use kube::{Client, ResourceExt};

use crate::crd::{Celery, PoolType, WorkerPool};
use crate::events::Publisher;
use crate::metrics::Metrics;
use crate::names::worker_name;
use crate::plugin::Plugins;
use crate::state::Loop;
use crate::workload::Workloads;
use roster::PoolSettings;

/// `lifecycle.stalledAfterSeconds` when unset.
pub const DEFAULT_STALLED_AFTER_SECONDS: i64 = 60;

/// What the event followers need.
pub struct Lifecycle {
    client: Client,
    events: Publisher,
    metrics: Arc<Metrics>,
    plugins: Arc<Plugins>,
    workloads: Arc<Workloads>,
}

/// Whether the operator follows a pool's workers: as `lifecycle.enabled` says, by default
/// when the operator scales the pool itself (`operator_scales`: it reads the pool's broker
/// anyway; an HPA or KEDA pool may live where the operator has no way to its broker).
pub fn followed(pool: &WorkerPool, operator_scales: bool) -> bool {
    pool.lifecycle
        .as_ref()
        .and_then(|l| l.enabled)
        .unwrap_or(operator_scales)
}

/// The pools of `celery` the operator follows, with their settings; `operator_scales` says
/// whether the operator scales a pool itself.
pub fn followed_pools(
    celery: &Celery,
    operator_scales: impl Fn(&WorkerPool) -> bool,
) -> Vec<PoolSettings> {
    celery
        .spec
        .workers
        .iter()
        .filter(|p| followed(p, operator_scales(p)))
        .map(|p| {
            let lifecycle = p.lifecycle.clone().unwrap_or_default();
            let seconds = lifecycle
                .stalled_after_seconds
                .unwrap_or(DEFAULT_STALLED_AFTER_SECONDS)
                .max(1);
            PoolSettings {
                name: p.name.clone(),
                deployment: worker_name(celery, &p.name),
                stalled_after_ms: seconds as u64 * 1000,
                queues: p.queues.clone(),
                replace_stalled: lifecycle.replace_stalled.unwrap_or(false),
                heartbeats_pause_in_tasks: matches!(
                    p.pool,
                    Some(PoolType::Solo | PoolType::Gevent | PoolType::Eventlet)
                ),
            }
        })
        .collect()
}

impl Lifecycle {
    /// The followers of an operator; they record what each pool's workers do in
    /// `workloads`.
    pub fn new(
        client: Client,
        events: Publisher,
        metrics: Arc<Metrics>,
        plugins: Arc<Plugins>,
        workloads: Arc<Workloads>,
    ) -> Self {
        Lifecycle {
            client,
            events,
            metrics,
            plugins,
            workloads,
        }
    }

    /// Starts the follower `celery` needs, restarts it when its pools or broker changed, and
    /// stops it when no pool is followed (`slot` is the resource's running one). Never
    /// blocks: the follower is its own task.
    pub fn sync(self: &Arc<Self>, celery: &Celery, slot: &mut Option<Loop>) {
        let pools = followed_pools(celery, |p| self.plugins.operator_scales(p));
        if pools.is_empty() {
            if slot.take().is_some() {
                // Its entries go with it.
                let api = kube::Api::<Celery>::namespaced(
                    self.client.clone(),
                    &celery.namespace().unwrap_or_default(),
                );
                let name = celery.name_any();
                tokio::spawn(async move {
                    if let Err(e) = report::write(&api, &name, &[]).await {
                        tracing::warn!(%name, error = %e, "cannot remove the live workers status");
                    }
                });
            }
            return;
        }
        let fingerprint = format!("{pools:?} {:?}", celery.spec.broker);
        if slot.as_ref().is_some_and(|l| l.fingerprint == fingerprint) {
            return;
        }
        let task = tokio::spawn(follower::follow(self.clone(), celery.clone(), pools));
        // Replacing the follower drops (and so stops) the old one.
        *slot = Some(Loop {
            fingerprint,
            task: task.abort_handle(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_the_operator_scales_are_followed_unless_they_say_otherwise() {
        let celery = crate::desired::tests::celery(
            r#"
app: tasks
image: app:1
broker: {secretRef: {name: b, key: url}}
workers:
  - name: fixed
  - name: auto
    autoscaling: {minReplicas: 1, maxReplicas: 3, metrics: [{name: cpu, target: {type: Utilization, averageUtilization: 70}}]}
  - name: "off"
    autoscaling: {minReplicas: 1, maxReplicas: 3, metrics: [{name: cpu, target: {type: Utilization, averageUtilization: 70}}]}
    lifecycle: {enabled: false}
  - name: "on"
    queues: [a, b]
    lifecycle: {enabled: true, stalledAfterSeconds: 15, replaceStalled: true}
"#,
        );
        // As if the operator scaled every autoscaled pool itself.
        let pools = followed_pools(&celery, |p| p.autoscaling.is_some());
        let names: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["auto", "on"]);
        assert_eq!(pools[0].stalled_after_ms, 60_000);
        assert_eq!(pools[0].deployment, "demo-worker-auto");
        assert!(!pools[0].replace_stalled);
        assert_eq!(
            (
                pools[1].stalled_after_ms,
                &pools[1].queues,
                pools[1].replace_stalled
            ),
            (15_000, &vec!["a".to_string(), "b".to_string()], true)
        );
    }
}
