//! The operator's own queue-length scaler, decision side: for one pool, keep a short window
//! of broker samples and the plugin's earlier recommendations, ask the scaling-decision
//! plugin, and turn its answer into scale / keep / hold. Pure apart from the plugin call
//! (itself bounded and sandboxed), so it is tested with plain values.
//!
//! The safety rules live here, not in the plugin: a missing metric (broker down, probe
//! error) holds the current replicas and never scales; a failing plugin holds them too (or
//! falls back to the built-in, per the failure policy); every decision is clamped to the
//! pool's min/max.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use tokio::task::AbortHandle;
use tracing::{info, warn};

use crate::broker::{Probe, ProbeError, QueueSample};
use crate::build::worker_name;
use crate::crd::{Autoscaling, BrokerSpec, Celery, MetricName, WorkerPool};
use crate::metrics::ScalerLabels;
use crate::plugin::bindings::scaler::{QueueDepth, Recommendation, Sample, ScalingInput};
use crate::plugin::{FailurePolicy, PluginRef, Resolved, Role, settings_text};
use crate::quantity;
use crate::reconcile::{Context, publish};
use crate::shape::Plugins;
use crate::shape::{OPERATOR_AUTOSCALER, autoscaler_of};

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
        /// Why, for the status condition.
        reason: String,
    },
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
        let hold = |reason: String| Verdict::Hold {
            replicas: current,
            reason,
        };
        let queues = match probe {
            Ok(queues) => queues,
            Err(e) => return hold(format!("{e}; holding {current} replicas")),
        };
        let Some(target) = target_per_replica(autoscaling) else {
            return hold("the pool has no taskQueueLength target".into());
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
            Some(s) => PluginRef {
                name: s.name.clone(),
                digest: s.digest.clone(),
            },
            None => PluginRef {
                name: plugins.config.default_scaler.clone(),
                digest: None,
            },
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
        let (resolved, decision) = match (result, plugins.config.scaler_failure) {
            (Ok(ok), _) => ok,
            (Err(e), FailurePolicy::Builtin) => {
                match plugins.registry.builtin("queue-length").map(|b| decide(&b)) {
                    Some(Ok(ok)) => ok,
                    _ => {
                        return hold(format!(
                            "scaler {} failed ({e}); holding {current} replicas",
                            wanted.name
                        ));
                    }
                }
            }
            (Err(e), _) => {
                return hold(format!(
                    "scaler {} failed ({e}); holding {current} replicas",
                    wanted.name
                ));
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

/// The scaler loops of every pool the operator scales itself, and one probe per broker.
#[derive(Default)]
pub struct Scalers {
    /// Running loops by resource uid and pool, with the spec they run with.
    loops: std::sync::Mutex<HashMap<(String, String), (String, AbortHandle)>>,
    /// Probes by broker URL and settings, shared by every pool of that broker.
    probes: tokio::sync::Mutex<HashMap<String, Probe>>,
}

impl Scalers {
    /// Starts the loops `celery` needs, restarts those whose pool or broker changed and
    /// stops those no longer wanted. Never blocks: each loop is its own task.
    pub fn sync(self: &Arc<Self>, ctx: &Arc<Context>, celery: &Celery) {
        let uid = celery.uid().unwrap_or_default();
        let wanted: Vec<&WorkerPool> = celery
            .spec
            .workers
            .iter()
            .filter(|p| {
                autoscaler_of(&ctx.plugins.config, p).is_some_and(|a| a.name == OPERATOR_AUTOSCALER)
            })
            .collect();
        let mut loops = self.loops.lock().expect("loops lock");
        loops.retain(|(u, pool), (_, handle)| {
            let keep = *u != uid || wanted.iter().any(|p| &p.name == pool);
            if !keep {
                handle.abort();
            }
            keep
        });
        for pool in wanted {
            let key = (uid.clone(), pool.name.clone());
            let fingerprint =
                serde_json::to_string(&(pool, &celery.spec.broker)).expect("serializes");
            match loops.get(&key) {
                Some((running, _)) if *running == fingerprint => continue,
                Some((_, handle)) => handle.abort(),
                None => {}
            }
            let task = tokio::spawn(pool_loop(
                self.clone(),
                ctx.clone(),
                celery.clone(),
                pool.clone(),
            ));
            loops.insert(key, (fingerprint, task.abort_handle()));
        }
    }

    /// The pool's queues on the broker at `url`, through the probe shared by every pool of
    /// that broker.
    async fn sample(
        &self,
        url: &str,
        broker: &BrokerSpec,
        queues: &[String],
    ) -> Result<Vec<QueueSample>, ProbeError> {
        let key = format!(
            "{url} {}",
            serde_json::to_string(&(&broker.type_, &broker.redis, &broker.rabbitmq))
                .expect("serializes")
        );
        let probe = {
            let mut probes = self.probes.lock().await;
            match probes.get(&key) {
                Some(p) => p.clone(),
                None => {
                    let p = Probe::for_broker(url, broker).await?;
                    probes.insert(key, p.clone());
                    p
                }
            }
        };
        probe.sample(queues).await
    }
}

/// The broker URL from the broker's Secret.
async fn broker_url(secrets: &Api<Secret>, broker: &BrokerSpec) -> Result<String, ProbeError> {
    let secret_ref = &broker.secret_ref;
    let secret = secrets
        .get(&secret_ref.name)
        .await
        .map_err(|e| ProbeError::Broker(format!("cannot read Secret {}: {e}", secret_ref.name)))?;
    let url = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&secret_ref.key))
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
        .ok_or_else(|| {
            ProbeError::Url(format!(
                "Secret {} has no key {}",
                secret_ref.name, secret_ref.key
            ))
        })?;
    Ok(url)
}

/// Samples, decides and scales one pool every poll interval, until the loop is stopped or
/// the resource is gone. Replicas change only through the Deployment's scale subresource.
async fn pool_loop(scalers: Arc<Scalers>, ctx: Arc<Context>, celery: Celery, pool: WorkerPool) {
    let (ns, name) = (
        celery.namespace().unwrap_or_default(),
        worker_name(&celery, &pool.name),
    );
    let autoscaling = pool
        .autoscaling
        .clone()
        .expect("only autoscaled pools get a loop");
    let poll = autoscaling
        .poll_interval_seconds
        .map_or(ctx.poll_interval, |s| Duration::from_secs(s.into()));
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let celeries: Api<Celery> = Api::namespaced(ctx.client.clone(), &ns);
    let mut state = PoolScaler::default();
    let mut last_hold = None;
    // Read from the Secret when the loop starts and again after a failed probe (a rotated
    // password shows up as one), not on every tick.
    let mut url: Option<String> = None;
    loop {
        let current = match deployments.get_scale(&name).await {
            Ok(scale) => scale.spec.and_then(|s| s.replicas).unwrap_or(0).max(0) as u32,
            Err(kube::Error::Api(s)) if s.is_not_found() => {
                if celeries
                    .get_opt(&celery.name_any())
                    .await
                    .is_ok_and(|c| c.is_none())
                {
                    return;
                }
                tokio::time::sleep(poll).await;
                continue;
            }
            Err(e) => {
                warn!(%ns, deployment = %name, error = %e, "scaler cannot read the replicas");
                tokio::time::sleep(poll).await;
                continue;
            }
        };
        let known = match url.take() {
            Some(known) => Ok(known),
            None => broker_url(&secrets, &celery.spec.broker).await,
        };
        let probe = match known {
            Ok(known) => {
                let sample = scalers
                    .sample(&known, &celery.spec.broker, &pool.queues)
                    .await;
                if sample.is_ok() {
                    url = Some(known);
                }
                sample
            }
            Err(e) => Err(e),
        };
        match &probe {
            Ok(_) => ctx.metrics.scaler_samples.inc(),
            Err(_) => ctx.metrics.scaler_probe_errors.inc(),
        };
        let (plugins, spec, pool_name) =
            (ctx.plugins.clone(), autoscaling.clone(), pool.name.clone());
        let now_ms = jiff::Timestamp::now().as_millisecond().max(0) as u64;
        let (returned, verdict) = tokio::task::spawn_blocking(move || {
            let verdict = state.tick(&plugins, &pool_name, &spec, probe, current, now_ms);
            (state, verdict)
        })
        .await
        .expect("a scaler tick does not panic");
        state = returned;
        let label = match verdict {
            Verdict::Scale { .. } => "scale",
            Verdict::Keep { .. } => "keep",
            Verdict::Hold { .. } => "hold",
        };
        ctx.metrics
            .scaler_decisions
            .get_or_create(&ScalerLabels { verdict: label })
            .inc();
        match verdict {
            Verdict::Scale { from, to, reason } => {
                let patch = Patch::Merge(serde_json::json!({"spec": {"replicas": to}}));
                match deployments
                    .patch_scale(&name, &PatchParams::default(), &patch)
                    .await
                {
                    Ok(_) => {
                        info!(%ns, deployment = %name, from, to, %reason, "scaled");
                        let note =
                            format!("Scaled pool {} from {from} to {to}: {reason}", pool.name);
                        publish(&ctx, &celery, EventType::Normal, "Scaled", "Scale", note).await;
                    }
                    Err(e) => warn!(%ns, deployment = %name, error = %e, "scaling failed"),
                }
                last_hold = None;
            }
            Verdict::Hold { reason, .. } if last_hold.as_ref() != Some(&reason) => {
                warn!(%ns, pool = %pool.name, %reason, "scaling held");
                let note = format!("Pool {}: {reason}", pool.name);
                publish(
                    &ctx,
                    &celery,
                    EventType::Warning,
                    "ScalingHeld",
                    "Scale",
                    note,
                )
                .await;
                last_hold = Some(reason);
            }
            Verdict::Hold { .. } => {}
            Verdict::Keep { .. } => last_hold = None,
        }
        tokio::time::sleep(poll).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::registry::Source;
    use crate::plugin::{Limits, Registry, Runtime};
    use crate::shape::PluginConfig;
    use std::sync::Arc;

    fn plugins(policy: FailurePolicy) -> Plugins {
        let limits = Limits {
            deadline: Duration::from_secs(1),
            ..Limits::default()
        };
        let registry = Registry::with_builtins(Arc::new(Runtime::new(limits))).unwrap();
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
            matches!(&v, Verdict::Hold { replicas: 2, reason } if reason.contains("did not finish")),
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
