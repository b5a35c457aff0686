//! The operator's own queue-length scaler, decision side: for one pool, keep a short window
//! of broker samples and the plugin's earlier recommendations, ask the scaling-decision
//! plugin, and turn its answer into scale / keep / hold. Pure apart from the plugin call
//! (itself bounded and sandboxed), so it is tested with plain values.
//!
//! The safety rules live here, not in the plugin: a missing metric (broker down, probe
//! error) holds the current replicas and never scales; a failing plugin holds them too (or
//! falls back to the built-in, per the failure policy); every decision is clamped to the
//! pool's min/max.

use std::collections::VecDeque;

use crate::broker::{ProbeError, QueueSample};
use crate::crd::{Autoscaling, MetricName};
use crate::plugin::bindings::scaler::{QueueDepth, Recommendation, Sample, ScalingInput};
use crate::plugin::{FailurePolicy, PluginRef, Resolved, Role, settings_text};
use crate::quantity;
use crate::shape::Plugins;

/// Samples kept per pool.
pub const SAMPLE_WINDOW: usize = 30;
/// How long raw recommendations are kept for stabilization windows.
pub const HISTORY_MS: u64 = 15 * 60 * 1000;

/// What the scaler decided for one tick.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Change the pool's replicas.
    Scale {
        /// Replicas now.
        from: u32,
        /// Replicas wanted.
        to: u32,
        /// Why.
        reason: String,
    },
    /// The replicas are right.
    Keep {
        /// Replicas now.
        replicas: u32,
        /// Why.
        reason: String,
    },
    /// No decision can be trusted (broker down, plugin failed): the replicas stay as they
    /// are.
    Hold {
        /// Replicas now.
        replicas: u32,
        /// What kind of failure, for the status condition's reason.
        cause: HoldCause,
        /// Why, for the status condition's message.
        reason: String,
    },
}

/// Why the scaler holds a pool's replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldCause {
    /// The broker could not be read.
    BrokerUnavailable,
    /// The pool has no `taskQueueLength` target to scale on.
    NoTarget,
    /// The scaling-decision plugin failed and the failure policy says hold.
    ScalerFailed,
}

impl HoldCause {
    /// The condition reason (CamelCase, as Kubernetes conventions want).
    pub fn as_reason(self) -> &'static str {
        match self {
            HoldCause::BrokerUnavailable => "BrokerUnavailable",
            HoldCause::NoTarget => "NoTarget",
            HoldCause::ScalerFailed => "ScalerFailed",
        }
    }
}

/// One pool's scaler state.
#[derive(Debug, Default)]
pub struct PoolScaler {
    samples: VecDeque<Sample>,
    history: VecDeque<Recommendation>,
    /// The plugin that made the last decision, for the status.
    pub last_plugin: Option<(String, String)>,
}

/// The target tasks per replica of an autoscaling spec (its taskQueueLength averageValue).
pub fn target_per_replica(autoscaling: &Autoscaling) -> Option<f64> {
    autoscaling
        .metrics
        .iter()
        .find(|m| m.name == MetricName::TaskQueueLength)
        .and_then(|m| m.target.average_value.as_ref())
        .and_then(|q| quantity::parse(&q.0))
        .filter(|t| *t > 0.0)
}

impl PoolScaler {
    /// One tick: `probe` is what the broker said (or why it could not), `current` the
    /// Deployment's replicas now.
    pub fn tick(
        &mut self,
        plugins: &Plugins,
        pool: &str,
        autoscaling: &Autoscaling,
        probe: Result<Vec<QueueSample>, ProbeError>,
        current: u32,
        now_ms: u64,
    ) -> Verdict {
        let hold = |cause: HoldCause, reason: String| Verdict::Hold {
            replicas: current,
            cause,
            reason,
        };
        let queues = match probe {
            Ok(queues) => queues,
            Err(e) => {
                return hold(
                    HoldCause::BrokerUnavailable,
                    format!("{e}; holding {current} replicas"),
                );
            }
        };
        let Some(target) = target_per_replica(autoscaling) else {
            return hold(
                HoldCause::NoTarget,
                "the pool has no taskQueueLength target".into(),
            );
        };
        self.samples.push_back(Sample {
            at_ms: now_ms,
            queues: queues
                .into_iter()
                .map(|q| QueueDepth {
                    name: q.name,
                    ready: q.ready,
                    reserved: q.reserved,
                })
                .collect(),
        });
        while self.samples.len() > SAMPLE_WINDOW {
            self.samples.pop_front();
        }
        while self
            .history
            .front()
            .is_some_and(|r| r.at_ms + HISTORY_MS < now_ms)
        {
            self.history.pop_front();
        }

        let (min, max) = (
            autoscaling.min_replicas.max(0) as u32,
            autoscaling.max_replicas.max(0) as u32,
        );
        let input = ScalingInput {
            pool: pool.into(),
            now_ms,
            current_replicas: current,
            min_replicas: min,
            max_replicas: max,
            target_per_replica: target,
            samples: self.samples.iter().cloned().collect(),
            history: self.history.iter().cloned().collect(),
            settings: settings_text(
                autoscaling
                    .scaler
                    .as_ref()
                    .and_then(|s| s.settings.as_ref()),
            ),
        };
        let wanted = match &autoscaling.scaler {
            Some(s) => PluginRef::from(s),
            None => PluginRef::named(&plugins.config.default_scaler),
        };
        let decide = |r: &Resolved| {
            plugins
                .registry
                .runtime()
                .decide(&r.plugin, &input)
                .map(|d| (r.clone(), d))
        };
        let result = plugins
            .registry
            .resolve(Role::Scaler, &wanted)
            .and_then(|r| decide(&r));
        // The failure policy `builtin` retries with the built-in queue-length plugin; the
        // error reported is the wanted plugin's.
        let fallback = |e| match plugins.config.scaler_failure {
            FailurePolicy::Builtin => match plugins.registry.builtin("queue-length") {
                Some(b) => decide(&b).map_err(|_| e),
                None => Err(e),
            },
            _ => Err(e),
        };
        let (resolved, decision) = match result.or_else(fallback) {
            Ok(ok) => ok,
            Err(e) => {
                return hold(
                    HoldCause::ScalerFailed,
                    format!(
                        "scaler {} failed ({e}); holding {current} replicas",
                        wanted.name
                    ),
                );
            }
        };
        self.history.push_back(Recommendation {
            at_ms: now_ms,
            replicas: decision.recommendation,
        });
        self.last_plugin = Some((resolved.name.clone(), resolved.plugin.digest.clone()));
        let to = decision.replicas.clamp(min, max.max(min));
        if to == current {
            Verdict::Keep {
                replicas: current,
                reason: decision.reason,
            }
        } else {
            Verdict::Scale {
                from: current,
                to,
                reason: decision.reason,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::registry::Source;
    use crate::plugin::{Compiler, Limits, Registry, Runtime};
    use crate::shape::PluginConfig;
    use std::sync::Arc;
    use std::time::Duration;

    fn plugins(policy: FailurePolicy) -> Plugins {
        let limits = Limits {
            deadline: Duration::from_secs(1),
            ..Limits::default()
        };
        let registry =
            Registry::with_builtins(Arc::new(Runtime::new(limits, Compiler::InProcess))).unwrap();
        let config = PluginConfig {
            scaler_failure: policy,
            ..PluginConfig::default()
        };
        Plugins::new(Arc::new(registry), config)
    }

    fn autoscaling(min: i32, max: i32) -> Autoscaling {
        serde_json::from_value(serde_json::json!({
            "minReplicas": min, "maxReplicas": max,
            "metrics": [{"name": "taskQueueLength", "target": {"type": "AverageValue", "averageValue": "5"}}],
            "scaler": {"name": "queue-length", "settings": {"scaleDownStabilizationSeconds": 60}}
        }))
        .unwrap()
    }

    fn queue(ready: u64, reserved: u64) -> Result<Vec<QueueSample>, ProbeError> {
        Ok(vec![QueueSample {
            name: "q".into(),
            ready,
            reserved,
            by_priority: vec![],
        }])
    }

    #[test]
    fn backlog_scales_up_within_bounds() {
        let p = plugins(FailurePolicy::KeepLastGood);
        let mut s = PoolScaler::default();
        let v = s.tick(&p, "w", &autoscaling(1, 10), queue(37, 3), 2, 1_000);
        assert!(matches!(v, Verdict::Scale { from: 2, to: 8, .. }), "{v:?}");
        let v = s.tick(&p, "w", &autoscaling(1, 4), queue(500, 0), 2, 2_000);
        assert!(
            matches!(v, Verdict::Scale { to: 4, .. }),
            "clamped to max: {v:?}"
        );
        assert_eq!(s.last_plugin.as_ref().unwrap().0, "queue-length");
    }

    #[test]
    fn scale_down_waits_for_the_stabilization_window() {
        let p = plugins(FailurePolicy::KeepLastGood);
        let mut s = PoolScaler::default();
        const T0: u64 = 1_795_428_000_000;
        s.tick(&p, "w", &autoscaling(0, 10), queue(40, 0), 8, T0);
        let v = s.tick(&p, "w", &autoscaling(0, 10), queue(0, 0), 8, T0 + 30_000);
        assert!(
            matches!(v, Verdict::Keep { replicas: 8, .. }),
            "inside the 60 s window: {v:?}"
        );
        let v = s.tick(&p, "w", &autoscaling(0, 10), queue(0, 0), 8, T0 + 61_000);
        assert!(
            matches!(v, Verdict::Scale { to: 0, .. }),
            "after the window, both empty -> zero: {v:?}"
        );
    }

    #[test]
    fn the_default_stabilization_window_is_five_minutes() {
        let p = plugins(FailurePolicy::KeepLastGood);
        let mut spec = autoscaling(0, 10);
        spec.scaler = None; // the cluster default, queue-length, with its default settings
        let mut s = PoolScaler::default();
        const T0: u64 = 1_795_428_000_000;
        let v = s.tick(&p, "w", &spec, queue(40, 0), 1, T0);
        assert!(matches!(v, Verdict::Scale { to: 8, .. }), "{v:?}");
        for t in [1, 60, 299] {
            let v = s.tick(&p, "w", &spec, queue(0, 0), 8, T0 + t * 1_000);
            assert!(
                matches!(v, Verdict::Keep { replicas: 8, .. }),
                "{t} s after the drain: {v:?}"
            );
        }
        let v = s.tick(&p, "w", &spec, queue(0, 0), 8, T0 + 301_000);
        assert!(matches!(v, Verdict::Scale { to: 0, .. }), "{v:?}");
    }

    #[test]
    fn reserved_work_keeps_a_pool_from_scaling_to_zero() {
        let p = plugins(FailurePolicy::KeepLastGood);
        let mut s = PoolScaler::default();
        let v = s.tick(&p, "w", &autoscaling(0, 10), queue(0, 1), 1, 1_000);
        assert!(matches!(v, Verdict::Keep { replicas: 1, .. }), "{v:?}");
    }

    #[test]
    fn a_missing_metric_holds_and_never_scales_to_zero() {
        let p = plugins(FailurePolicy::KeepLastGood);
        let mut s = PoolScaler::default();
        let v = s.tick(
            &p,
            "w",
            &autoscaling(0, 10),
            Err(ProbeError::Broker("connection refused".into())),
            3,
            1_000,
        );
        assert_eq!(
            v,
            Verdict::Hold {
                replicas: 3,
                cause: HoldCause::BrokerUnavailable,
                reason: "broker unreachable or failing: connection refused; holding 3 replicas"
                    .into()
            }
        );
    }

    #[test]
    fn a_failing_plugin_holds_or_falls_back_to_the_builtin() {
        let hostile = std::fs::read(concat!(env!("CELERY_PLUGIN_DIR"), "/hostile.wasm")).unwrap();
        let mut spec = autoscaling(1, 10);
        spec.scaler = Some(serde_json::from_value(serde_json::json!({"name": "hostile"})).unwrap());

        let p = plugins(FailurePolicy::KeepLastGood);
        p.registry
            .install("hostile", &hostile, Source::ConfigMap("ops/hostile".into()))
            .unwrap();
        // The hostile fixture loops when the pool is named "loop".
        let v = PoolScaler::default().tick(&p, "loop", &spec, queue(50, 0), 2, 1_000);
        assert!(
            matches!(&v, Verdict::Hold { replicas: 2, cause: HoldCause::ScalerFailed, reason } if reason.contains("did not finish")),
            "{v:?}"
        );

        let p = plugins(FailurePolicy::Builtin);
        p.registry
            .install("hostile", &hostile, Source::ConfigMap("ops/hostile".into()))
            .unwrap();
        let v = PoolScaler::default().tick(&p, "loop", &spec, queue(50, 0), 2, 1_000);
        assert!(
            matches!(v, Verdict::Scale { to: 10, .. }),
            "the built-in queue-length decided: {v:?}"
        );
    }

    #[test]
    fn target_comes_from_the_task_queue_length_metric() {
        assert_eq!(target_per_replica(&autoscaling(0, 1)), Some(5.0));
        let cpu: Autoscaling = serde_json::from_value(serde_json::json!({"minReplicas": 0, "maxReplicas": 1,
            "metrics": [{"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 50}}]})).unwrap();
        assert_eq!(target_per_replica(&cpu), None);
    }
}
