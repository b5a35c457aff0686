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

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::limits::{self, Change, EVENTS_MS};
use crate::broker::{ProbeError, QueueSample};
use crate::crd::{Autoscaling, MetricName, PoolScaling, ScaleEvent, TimedReplicas};
use crate::plugin::bindings::scaler::{QueueDepth, Recommendation, Sample, ScalingInput, Workload};
use crate::plugin::policy::{self, Called};
use crate::plugin::{Plugins, Resolved, Role, settings_text};
use crate::quantity;
use crate::workload::{Beat, Figures};

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
    changes: VecDeque<Change>,
    /// The plugin that made the last decision, for the status.
    pub last_plugin: Option<(String, String)>,
    /// Worker processes per replica (the pool's `concurrency`), when the pool sets it.
    pub concurrency: Option<u32>,
    /// The pool's recent [`Beat`]s from the lifecycle follower (empty when its workers are
    /// not followed), set before each tick.
    pub beats: VecDeque<Beat>,
    /// The workload figures of the last tick, for the status and metrics.
    pub figures: Figures,
}

/// Recommendations kept in the status, at most.
const KEPT_RECOMMENDATIONS: usize = 32;

fn ms(time: &Time) -> u64 {
    time.0.as_millisecond().max(0) as u64
}

fn time(ms: u64) -> Time {
    Time(
        jiff::Timestamp::from_millisecond(i64::try_from(ms).unwrap_or(i64::MAX))
            .unwrap_or_default(),
    )
}

/// The settings the pool's scaler is called with: the pool's own and, for the built-in
/// `queue-length` and `latency`, the windows of `autoscaling.behavior` (the HPA's
/// `stabilizationWindowSeconds`) where the settings do not set them, so that the field
/// means the same for the operator's scaler as for an HPA. Other scalers get their settings
/// as they are: they may refuse keys they do not know.
fn scaler_settings(autoscaling: &Autoscaling, scaler: &str) -> String {
    let own = autoscaling
        .scaler
        .as_ref()
        .and_then(|s| s.settings.as_ref());
    let windowed = matches!(scaler, "queue-length" | "latency");
    let (Some(behavior), true) = (&autoscaling.behavior, windowed) else {
        return settings_text(own);
    };
    let mut settings = own.cloned().unwrap_or_else(|| serde_json::json!({}));
    if let Some(settings) = settings.as_object_mut() {
        let windows = [
            (&behavior.scale_down, "scaleDownStabilizationSeconds"),
            (&behavior.scale_up, "scaleUpStabilizationSeconds"),
        ];
        for (rules, key) in windows {
            if let Some(window) = rules.as_ref().and_then(|r| r.stabilization_window_seconds) {
                settings
                    .entry(key)
                    .or_insert_with(|| serde_json::json!(window.max(0)));
            }
        }
    }
    settings_text(Some(&settings))
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

/// The figures as the WIT carries them.
fn workload(f: &Figures) -> Workload {
    Workload {
        window_seconds: f.window_seconds,
        completion_rate: f.completion_rate,
        arrival_rate: f.arrival_rate,
        service_seconds: f.service_seconds,
        busy_fraction: f.busy_fraction,
        concurrency: f.concurrency,
        running: f.running,
        workers: f.workers,
    }
}

impl PoolScaler {
    /// The state of a new loop for a pool with `concurrency` worker processes per replica
    /// (when it sets one).
    pub fn new(concurrency: Option<u32>) -> Self {
        PoolScaler {
            concurrency,
            ..PoolScaler::default()
        }
    }

    /// Picks up where the last loop of the pool left off, from its `status.scaling` entry:
    /// its recent recommendations and scale events. Without any (a pool seen for the first
    /// time), the current replicas count as a recommendation made now, as the HPA does when
    /// it first sees a target: a new loop never scales down at once.
    pub fn resume(&mut self, previous: Option<&PoolScaling>, current: u32, now_ms: u64) {
        let kept = |at: u64, window: u64| at + window >= now_ms;
        self.history = previous
            .into_iter()
            .flat_map(|p| &p.recommendations)
            .map(|r| Recommendation {
                at_ms: ms(&r.time),
                replicas: u32::try_from(r.replicas).unwrap_or(0),
            })
            .filter(|r| kept(r.at_ms, HISTORY_MS))
            .collect();
        self.history.make_contiguous().sort_by_key(|r| r.at_ms);
        if self.history.is_empty() {
            self.history.push_back(Recommendation {
                at_ms: now_ms,
                replicas: current,
            });
        }
        self.changes = previous
            .into_iter()
            .flat_map(|p| &p.scale_events)
            .map(|e| Change {
                at_ms: ms(&e.time),
                from: u32::try_from(e.from).unwrap_or(0),
                to: u32::try_from(e.to).unwrap_or(0),
            })
            .filter(|c| kept(c.at_ms, EVENTS_MS))
            .collect();
    }

    /// Records a replica change made by the scaler (for the rate limits).
    pub fn record_scale(&mut self, now_ms: u64, from: u32, to: u32) {
        self.changes.push_back(Change {
            at_ms: now_ms,
            from,
            to,
        });
        while self
            .changes
            .front()
            .is_some_and(|c| c.at_ms + EVENTS_MS < now_ms)
        {
            self.changes.pop_front();
        }
    }

    /// The recent recommendations for the status: each value once, with the last time it
    /// was made (enough for the stabilization windows: the highest and lowest values of a
    /// window), the newest [`KEPT_RECOMMENDATIONS`].
    pub fn recommendations(&self) -> Vec<TimedReplicas> {
        let mut last: Vec<&Recommendation> = Vec::new();
        for r in self.history.iter().rev() {
            if !last.iter().any(|l| l.replicas == r.replicas) {
                last.push(r);
            }
        }
        last.truncate(KEPT_RECOMMENDATIONS);
        last.iter()
            .rev()
            .map(|r| TimedReplicas {
                time: time(r.at_ms),
                replicas: i32::try_from(r.replicas).unwrap_or(i32::MAX),
            })
            .collect()
    }

    /// The recent scale events for the status.
    pub fn scale_events(&self) -> Vec<ScaleEvent> {
        let replicas = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
        self.changes
            .iter()
            .map(|c| ScaleEvent {
                time: time(c.at_ms),
                from: replicas(c.from),
                to: replicas(c.to),
            })
            .collect()
    }

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
                    oldest_wait_ms: q.oldest_wait_ms,
                })
                .collect(),
        });
        while self.samples.len() > SAMPLE_WINDOW {
            self.samples.pop_front();
        }
        let waiting: Vec<(u64, u64)> = self
            .samples
            .iter()
            .map(|s| (s.at_ms, s.queues.iter().map(|q| q.ready).sum()))
            .collect();
        self.figures = Figures::measure(&self.beats, &waiting, self.concurrency, now_ms);
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
        let wanted = plugins.scaler_of(autoscaling);
        let input = ScalingInput {
            pool: pool.into(),
            now_ms,
            current_replicas: current,
            min_replicas: min,
            max_replicas: max,
            target_per_replica: target,
            samples: self.samples.iter().cloned().collect(),
            history: self.history.iter().cloned().collect(),
            settings: scaler_settings(autoscaling, &wanted.name),
            workload: workload(&self.figures),
        };
        let run = |r: &Resolved| {
            let calls = plugins.registry.runtime().with(r.limits);
            calls.decide(&r.plugin, &input)
        };
        // Keeping what runs, for a scaler, is holding the replicas.
        let (resolved, decision) = match policy::call(plugins, Role::Scaler, &wanted, None, run) {
            Called::Answered { by, value } | Called::Replaced { by, value, .. } => (by, value),
            Called::KeepWhatRuns { error } | Called::Failed { error } => {
                return hold(
                    HoldCause::ScalerFailed,
                    format!(
                        "scaler {} failed ({error}); holding {current} replicas",
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
        let mut reason = decision.reason;
        let mut to = decision.replicas.clamp(min, max.max(min));
        // Out of bounds (the bounds changed), the HPA goes straight back to the nearest
        // bound, whatever the metric says, without rate limits; so does this scaler.
        let within = (min..=max).contains(&current);
        if current > max {
            to = max;
            reason = format!("{current} replicas are above max-replicas: {max}");
        } else if current < min {
            to = min;
            reason = format!("{current} replicas are below min-replicas: {min}");
        }
        if let Some(behavior) = autoscaling.behavior.as_ref().filter(|_| within) {
            let changes: Vec<Change> = self.changes.iter().copied().collect();
            let (limited, why) = limits::limit(behavior, current, to, min, max, &changes, now_ms);
            to = limited;
            if let Some(why) = why {
                reason = format!("{reason}; {why}");
            }
        }
        if to == current {
            Verdict::Keep {
                replicas: current,
                reason,
            }
        } else {
            Verdict::Scale {
                from: current,
                to,
                reason,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::registry::Source;
    use crate::plugin::{Compiler, Limits, Registry, Runtime};
    use crate::plugin::{FailurePolicy, PluginConfig};
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
            oldest_wait_ms: None,
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
    fn the_behavior_window_applies_to_queue_length_unless_its_settings_say() {
        let p = plugins(FailurePolicy::KeepLastGood);
        let with_behavior = |settings: serde_json::Value| {
            let mut spec = autoscaling(0, 10);
            spec.scaler = Some(
                serde_json::from_value(
                    serde_json::json!({"name": "queue-length", "settings": settings}),
                )
                .unwrap(),
            );
            spec.behavior = Some(
                serde_json::from_value(serde_json::json!({
                    "scaleDown": {"stabilizationWindowSeconds": 20,
                                  "policies": [{"type": "Percent", "value": 100, "periodSeconds": 1}]}
                }))
                .unwrap(),
            );
            spec
        };
        const T0: u64 = 1_795_428_000_000;
        // The behavior's 20 s window, where the settings are silent.
        let spec = with_behavior(serde_json::json!({}));
        let mut s = PoolScaler::default();
        s.tick(&p, "w", &spec, queue(40, 0), 8, T0);
        let v = s.tick(&p, "w", &spec, queue(0, 0), 8, T0 + 15_000);
        assert!(matches!(v, Verdict::Keep { replicas: 8, .. }), "{v:?}");
        let v = s.tick(&p, "w", &spec, queue(0, 0), 8, T0 + 21_000);
        assert!(matches!(v, Verdict::Scale { to: 0, .. }), "{v:?}");
        // The settings' own window wins.
        let spec = with_behavior(serde_json::json!({"scaleDownStabilizationSeconds": 60}));
        let mut s = PoolScaler::default();
        s.tick(&p, "w", &spec, queue(40, 0), 8, T0);
        let v = s.tick(&p, "w", &spec, queue(0, 0), 8, T0 + 21_000);
        assert!(matches!(v, Verdict::Keep { replicas: 8, .. }), "{v:?}");
        // Another scaler gets its settings untouched.
        assert_eq!(
            scaler_settings(&with_behavior(serde_json::json!({"x": 1})), "mine"),
            r#"{"x":1}"#
        );
    }

    #[test]
    fn a_new_loop_holds_a_scale_down_like_the_hpa() {
        let p = plugins(FailurePolicy::KeepLastGood);
        let mut spec = autoscaling(0, 10);
        spec.scaler = None; // queue-length with its default 300 s window
        const T0: u64 = 1_795_428_000_000;
        // An operator start, a new leader, an edit of the pool: a loop with no history.
        let mut s = PoolScaler::default();
        s.resume(None, 6, T0);
        let v = s.tick(&p, "w", &spec, queue(0, 0), 6, T0 + 1_000);
        assert!(matches!(v, Verdict::Keep { replicas: 6, .. }), "{v:?}");
        let v = s.tick(&p, "w", &spec, queue(0, 0), 6, T0 + 299_000);
        assert!(matches!(v, Verdict::Keep { replicas: 6, .. }), "{v:?}");
        let v = s.tick(&p, "w", &spec, queue(0, 0), 6, T0 + 301_000);
        assert!(matches!(v, Verdict::Scale { to: 0, .. }), "{v:?}");
    }

    #[test]
    fn a_resumed_loop_continues_the_window_from_the_status() {
        let p = plugins(FailurePolicy::KeepLastGood);
        let mut spec = autoscaling(0, 10);
        spec.scaler = None;
        const T0: u64 = 1_795_428_000_000;
        let mut before = PoolScaler::default();
        before.resume(None, 1, T0);
        before.tick(&p, "w", &spec, queue(40, 0), 1, T0 + 1_000);
        before.tick(&p, "w", &spec, queue(0, 0), 8, T0 + 100_000);
        let entry = PoolScaling {
            pool: "w".into(),
            queued: None,
            reserved: None,
            current_replicas: 8,
            desired_replicas: 8,
            last_decision: "Keep".into(),
            reason: String::new(),
            plugin: None,
            last_decision_time: time(T0 + 100_000),
            last_scale_time: None,
            conditions: vec![],
            recommendations: before.recommendations(),
            scale_events: before.scale_events(),
            wait_seconds: None,
            oldest_wait_seconds: None,
            completion_rate: None,
            arrival_rate: None,
            service_seconds: None,
            busy_fraction: None,
        };
        // Only the newest time of each value is kept.
        assert_eq!(
            entry
                .recommendations
                .iter()
                .map(|r| r.replicas)
                .collect::<Vec<_>>(),
            [1, 8, 0]
        );
        // The recommendation of 8 was made at T0 + 1 s: the window ends at T0 + 301 s,
        // whatever restarted in between.
        let mut after = PoolScaler::default();
        after.resume(Some(&entry), 8, T0 + 200_000);
        let v = after.tick(&p, "w", &spec, queue(0, 0), 8, T0 + 250_000);
        assert!(matches!(v, Verdict::Keep { replicas: 8, .. }), "{v:?}");
        let v = after.tick(&p, "w", &spec, queue(0, 0), 8, T0 + 302_000);
        assert!(matches!(v, Verdict::Scale { to: 0, .. }), "{v:?}");
    }

    #[test]
    fn behavior_rate_limits_apply_to_the_decision() {
        let p = plugins(FailurePolicy::KeepLastGood);
        let mut spec = autoscaling(0, 100);
        spec.behavior = Some(Default::default()); // the HPA's defaults
        const T0: u64 = 1_795_428_000_000;
        let mut s = PoolScaler::default();
        let v = s.tick(&p, "w", &spec, queue(100, 0), 1, T0);
        assert!(
            matches!(&v, Verdict::Scale { to: 5, reason, .. } if reason.contains("limited by autoscaling.behavior.scaleUp")),
            "{v:?}"
        );
        s.record_scale(T0, 1, 5);
        let v = s.tick(&p, "w", &spec, queue(100, 0), 5, T0 + 10_000);
        assert!(
            matches!(v, Verdict::Keep { replicas: 5, .. }),
            "same period: {v:?}"
        );
        let v = s.tick(&p, "w", &spec, queue(100, 0), 5, T0 + 16_000);
        assert!(
            matches!(v, Verdict::Scale { to: 10, .. }),
            "next period: {v:?}"
        );
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
