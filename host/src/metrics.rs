//! Prometheus metrics of the operator, served on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

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
        Metrics {
            registry,
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
