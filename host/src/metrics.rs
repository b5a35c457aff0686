//! Prometheus metrics of the operator, served on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Result of one reconcile.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    /// `success`, `invalid` (the spec is invalid) or `error` (will be retried).
    pub result: &'static str,
}

/// One write request to a child object.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    /// The child's kind.
    pub kind: &'static str,
    /// `apply` or `delete`.
    pub operation: &'static str,
}

/// Result of loading a plugin from a ConfigMap.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLoadLabels {
    /// `loaded` (now in use) or `refused` (the previous build stays).
    pub result: &'static str,
}

/// One tick of the operator's own scaler.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScalerLabels {
    /// `scale`, `keep` or `hold` (broker unreachable, plugin failed).
    pub verdict: &'static str,
}

/// One pool of one Celery resource.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// The resource's namespace.
    pub namespace: String,
    /// The resource's name.
    pub celery: String,
    /// The worker pool.
    pub pool: String,
}

/// A gauge per pool.
pub type PoolGauge = Family<PoolLabels, Gauge<f64, AtomicU64>>;

/// The workload figures of the pools the operator scales itself (a pool's series is absent
/// while the figure is unknown).
#[derive(Default)]
pub struct PoolWorkload {
    /// Seconds a task sent now would wait.
    pub wait_seconds: PoolGauge,
    /// Age of the oldest waiting task (apps that stamp `published_at`).
    pub oldest_wait_seconds: PoolGauge,
    /// Tasks finished per second.
    pub completion_rate: PoolGauge,
    /// Tasks arriving per second.
    pub arrival_rate: PoolGauge,
    /// Mean seconds a task runs.
    pub service_seconds: PoolGauge,
    /// Share of worker processes running a task.
    pub busy_fraction: PoolGauge,
}

impl PoolWorkload {
    fn all(&self) -> [(&'static str, &'static str, &PoolGauge); 6] {
        [
            (
                "pool_wait_seconds",
                "Seconds a task sent now would wait before a worker takes it",
                &self.wait_seconds,
            ),
            (
                "pool_oldest_wait_seconds",
                "Age of the oldest waiting task (apps that stamp published_at; Redis)",
                &self.oldest_wait_seconds,
            ),
            (
                "pool_completion_rate",
                "Tasks the pool's workers finished per second (last 30 s)",
                &self.completion_rate,
            ),
            (
                "pool_arrival_rate",
                "Tasks arriving per second in the pool's queues (last 30 s)",
                &self.arrival_rate,
            ),
            (
                "pool_service_seconds",
                "Mean seconds a task of the pool runs",
                &self.service_seconds,
            ),
            (
                "pool_busy_fraction",
                "Share of the pool's worker processes running a task",
                &self.busy_fraction,
            ),
        ]
    }
}

/// The operator's metrics and the registry that serves them.
pub struct Metrics {
    registry: Registry,
    /// Reconciles by result.
    pub reconciles: Family<ReconcileLabels, Counter>,
    /// Duration of reconciles.
    pub reconcile_duration: Histogram,
    /// Write requests to child objects (a no-op reconcile adds none).
    pub child_writes: Family<WriteLabels, Counter>,
    /// Plugin builds loaded from ConfigMaps, by result.
    pub plugin_loads: Family<PluginLoadLabels, Counter>,
    /// Broker samples taken by the operator's own scaler.
    pub scaler_samples: Counter,
    /// Broker probes that failed (the replicas were held).
    pub scaler_probe_errors: Counter,
    /// Decisions of the operator's own scaler, by verdict.
    pub scaler_decisions: Family<ScalerLabels, Counter>,
    /// Celery resources the operator keeps state for (dropped when a resource is deleted).
    pub tracked_resources: Gauge,
    /// Scaler loops running (one per pool the operator scales itself).
    pub scaler_loops: Gauge,
    /// Worker events taken in by the event followers (events of other workers not counted).
    pub worker_events: Counter,
    /// Writes of pods' `controller.kubernetes.io/pod-deletion-cost`.
    pub deletion_cost_writes: Counter,
    /// Workers that became stalled.
    pub worker_stalls: Counter,
    /// The workload figures of the pools the operator scales.
    pub pool_workload: PoolWorkload,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("celery_operator");
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles of Celery resources, by result",
            reconciles.clone(),
        );
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile of a Celery resource took",
            reconcile_duration.clone(),
        );
        let child_writes = Family::<WriteLabels, Counter>::default();
        registry.register(
            "child_writes",
            "Write requests sent for child objects",
            child_writes.clone(),
        );
        let plugin_loads = Family::<PluginLoadLabels, Counter>::default();
        registry.register(
            "plugin_loads",
            "Plugin builds loaded from ConfigMaps, by result",
            plugin_loads.clone(),
        );
        let scaler_samples = Counter::default();
        registry.register(
            "scaler_samples",
            "Broker samples taken by the operator's own scaler",
            scaler_samples.clone(),
        );
        let scaler_probe_errors = Counter::default();
        registry.register(
            "scaler_probe_errors",
            "Broker probes of the operator's own scaler that failed (replicas held)",
            scaler_probe_errors.clone(),
        );
        let scaler_decisions = Family::<ScalerLabels, Counter>::default();
        registry.register(
            "scaler_decisions",
            "Decisions of the operator's own scaler, by verdict",
            scaler_decisions.clone(),
        );
        let tracked_resources = Gauge::default();
        registry.register(
            "tracked_resources",
            "Celery resources the operator keeps state for",
            tracked_resources.clone(),
        );
        let scaler_loops = Gauge::default();
        registry.register(
            "scaler_loops",
            "Scaler loops running, one per pool the operator scales itself",
            scaler_loops.clone(),
        );
        let worker_events = Counter::default();
        registry.register(
            "worker_events",
            "Celery worker events (online, heartbeat, offline) taken in by the event followers",
            worker_events.clone(),
        );
        let deletion_cost_writes = Counter::default();
        registry.register(
            "deletion_cost_writes",
            "Writes of worker pods' pod-deletion-cost annotation",
            deletion_cost_writes.clone(),
        );
        let worker_stalls = Counter::default();
        registry.register(
            "worker_stalls",
            "Workers that became stalled (heartbeats stopped, or idle beside a backlog)",
            worker_stalls.clone(),
        );
        let pool_workload = PoolWorkload::default();
        for (name, help, gauge) in pool_workload.all() {
            registry.register(name, help, gauge.clone());
        }
        Metrics {
            registry,
            pool_workload,
            worker_events,
            deletion_cost_writes,
            worker_stalls,
            tracked_resources,
            scaler_loops,
            reconciles,
            reconcile_duration,
            child_writes,
            plugin_loads,
            scaler_samples,
            scaler_probe_errors,
            scaler_decisions,
        }
    }
}

impl Metrics {
    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Sets a pool's workload gauges from its status entry; an unknown figure's series is
    /// removed (an absent series, not a zero).
    pub fn record_workload(
        &self,
        namespace: &str,
        celery: &str,
        pool: &str,
        entry: &crate::crd::PoolScaling,
    ) {
        let labels = PoolLabels {
            namespace: namespace.into(),
            celery: celery.into(),
            pool: pool.into(),
        };
        let w = &self.pool_workload;
        let values = [
            (&w.wait_seconds, entry.wait_seconds),
            (&w.oldest_wait_seconds, entry.oldest_wait_seconds),
            (&w.completion_rate, entry.completion_rate),
            (&w.arrival_rate, entry.arrival_rate),
            (&w.service_seconds, entry.service_seconds),
            (&w.busy_fraction, entry.busy_fraction),
        ];
        for (gauge, value) in values {
            match value {
                Some(v) => {
                    gauge.get_or_create(&labels).set(v);
                }
                None => {
                    gauge.remove(&labels);
                }
            }
        }
    }

    /// Removes a pool's workload gauges (its scaler loop stopped).
    pub fn forget_pool(&self, namespace: &str, celery: &str, pool: &str) {
        let labels = PoolLabels {
            namespace: namespace.into(),
            celery: celery.into(),
            pool: pool.into(),
        };
        for (_, _, gauge) in self.pool_workload.all() {
            gauge.remove(&labels);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_figures_are_gauges_absent_while_unknown() {
        let m = Metrics::default();
        let mut entry: crate::crd::PoolScaling = serde_json::from_value(serde_json::json!({
            "pool": "w", "currentReplicas": 1, "desiredReplicas": 1, "lastDecision": "Keep",
            "reason": "", "lastDecisionTime": "2026-12-06T00:00:00Z",
            "waitSeconds": 2.5, "completionRate": 4.0
        }))
        .unwrap();
        m.record_workload("ns", "app", "w", &entry);
        let text = m.encode();
        assert!(
            text.contains(
                "celery_operator_pool_wait_seconds{namespace=\"ns\",celery=\"app\",pool=\"w\"} 2.5"
            ),
            "{text}"
        );
        assert!(
            !text.contains("celery_operator_pool_service_seconds{"),
            "{text}"
        );
        entry.wait_seconds = None;
        m.record_workload("ns", "app", "w", &entry);
        assert!(!m.encode().contains("celery_operator_pool_wait_seconds{"));
        m.forget_pool("ns", "app", "w");
        assert!(!m.encode().contains("celery_operator_pool_completion_rate{"));
    }

    #[test]
    fn encodes_counters_with_labels() {
        let m = Metrics::default();
        m.reconciles
            .get_or_create(&ReconcileLabels { result: "success" })
            .inc();
        m.child_writes
            .get_or_create(&WriteLabels {
                kind: "Deployment",
                operation: "apply",
            })
            .inc_by(2);
        m.reconcile_duration.observe(0.01);
        let text = m.encode();
        assert!(
            text.contains("celery_operator_reconciles_total{result=\"success\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "celery_operator_child_writes_total{kind=\"Deployment\",operation=\"apply\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains("celery_operator_reconcile_duration_seconds_count 1"),
            "{text}"
        );
    }
}
