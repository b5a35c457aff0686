//! The operator's own queue-length scaler: one loop per pool the operator scales itself
//! (autoscaler `operator`), started and stopped by reconciliation, sharing one probe per
//! broker. Each tick reads the replicas through the Deployment's `scale` subresource, samples
//! the broker, lets [`decide`] choose, applies the result through `scale`, and reports it
//! (Events, metrics, the pool's entry in `status.scaling`).

mod decide;
pub mod limits;
pub mod report;

pub use decide::{HoldCause, PoolScaler, Verdict};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use tokio::task::AbortHandle;
use tracing::{info, warn};

use crate::broker::{Probe, ProbeError, QueueSample};
use crate::build::worker_name;
use crate::crd::{BrokerSpec, Celery, PoolScaling, WorkerPool};
use crate::metrics::ScalerLabels;
use crate::reconcile::{Context, publish};
use crate::shape::{OPERATOR_AUTOSCALER, autoscaler_of};

/// The scaler loops of every pool the operator scales itself, and one probe per broker.
#[derive(Default)]
pub struct Scalers {
    /// Running loops by resource uid and pool, with the spec they run with.
    loops: std::sync::Mutex<HashMap<(String, String), (String, AbortHandle)>>,
    /// Probes by broker URL and settings, shared by every pool of that broker.
    probes: std::sync::Mutex<HashMap<String, Probe>>,
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
                // The pool is no longer the operator's to scale: its status entry goes too.
                let (api, name, pool) = (
                    Api::<Celery>::namespaced(
                        ctx.client.clone(),
                        &celery.namespace().unwrap_or_default(),
                    ),
                    celery.name_any(),
                    pool.clone(),
                );
                tokio::spawn(async move {
                    if let Err(e) = report::write(&api, &name, &pool, None).await {
                        warn!(%name, %pool, error = %e, "cannot remove the scaling status");
                    }
                });
            }
            keep
        });
        for pool in wanted {
            let key = (uid.clone(), pool.name.clone());
            // Only what the loop uses: an image or resources change must not restart it
            // (that would drop its sample window and stabilization history).
            let fingerprint =
                serde_json::to_string(&(&pool.queues, &pool.autoscaling, &celery.spec.broker))
                    .expect("serializes");
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

    /// Drops the calling loop from the running ones (its resource is gone).
    fn forget_current_task(&self) {
        let me = tokio::task::id();
        let mut loops = self.loops.lock().expect("loops lock");
        loops.retain(|_, (_, handle)| handle.id() != me);
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
        let known = self.probes.lock().expect("probes lock").get(&key).cloned();
        let probe = match known {
            Some(p) => p,
            // Connecting happens outside the lock: an unreachable broker must not hold up
            // the pools of other brokers. Two pools racing here keep the first probe.
            None => {
                let p = Probe::for_broker(url, broker).await?;
                let mut probes = self.probes.lock().expect("probes lock");
                probes.entry(key).or_insert(p).clone()
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
    // Where the pool's last loop (or the last leader) left off.
    let mut resumed = false;
    let previous_entry = celery
        .status
        .as_ref()
        .and_then(|s| s.scaling.iter().find(|e| e.pool == pool.name))
        .cloned();
    let mut last_hold: Option<String> = None;
    // The last entry written to `status.scaling`, and when.
    let mut written: Option<(PoolScaling, Instant)> = None;
    let mut scaled_at: Option<Time> = None;
    // Read from the Secret when the loop starts and again after a failed probe (a rotated
    // password shows up as one), not on every tick.
    let mut url: Option<String> = None;
    loop {
        let current = match deployments.get_scale(&name).await {
            Ok(scale) => scale.spec.and_then(|s| s.replicas).unwrap_or(0).max(0) as u32,
            Err(kube::Error::Api(s)) if s.is_not_found() => {
                // Gone, or deleted and created again under the same name (a new uid gets
                // its own loop).
                let gone = celeries
                    .get_opt(&celery.name_any())
                    .await
                    .is_ok_and(|c| c.is_none_or(|c| c.uid() != celery.uid()));
                if gone {
                    scalers.forget_current_task();
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
        let seen = probe.as_ref().ok().cloned();
        let (plugins, spec, pool_name) =
            (ctx.plugins.clone(), autoscaling.clone(), pool.name.clone());
        let now_ms = jiff::Timestamp::now().as_millisecond().max(0) as u64;
        if !resumed {
            state.resume(previous_entry.as_ref(), current, now_ms);
            resumed = true;
        }
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
        match &verdict {
            Verdict::Scale { from, to, reason } => {
                let patch = Patch::Merge(serde_json::json!({"spec": {"replicas": to}}));
                match deployments
                    .patch_scale(&name, &PatchParams::default(), &patch)
                    .await
                {
                    Ok(_) => {
                        info!(%ns, deployment = %name, from, to, %reason, "scaled");
                        scaled_at = Some(Time(jiff::Timestamp::now()));
                        state.record_scale(now_ms, *from, *to);
                        let note =
                            format!("Scaled pool {} from {from} to {to}: {reason}", pool.name);
                        publish(&ctx, &celery, EventType::Normal, "Scaled", "Scale", note).await;
                    }
                    Err(e) => warn!(%ns, deployment = %name, error = %e, "scaling failed"),
                }
            }
            Verdict::Hold { reason, .. } => {
                if last_hold.as_ref() != Some(reason) {
                    warn!(%ns, pool = %pool.name, %reason, "scaling held");
                    let note = format!("Pool {}: {reason}", pool.name);
                    let kind = EventType::Warning;
                    publish(&ctx, &celery, kind, "ScalingHeld", "Scale", note).await;
                    last_hold = Some(reason.clone());
                }
            }
            Verdict::Keep { .. } => {}
        }
        if !matches!(verdict, Verdict::Hold { .. }) && last_hold.take().is_some() {
            info!(%ns, pool = %pool.name, "scaling resumed");
            let note = format!("Pool {}: the scaler decides again", pool.name);
            let kind = EventType::Normal;
            publish(&ctx, &celery, kind, "ScalingResumed", "Scale", note).await;
        }

        let previous = written.as_ref().map(|(entry, _)| entry);
        let mut entry = report::entry(
            &pool.name,
            seen.as_deref(),
            &verdict,
            state.last_plugin.as_ref(),
            previous,
            scaled_at.as_ref(),
            &Time(jiff::Timestamp::now()),
        );
        entry.recommendations = state.recommendations();
        entry.scale_events = state.scale_events();
        let age = written
            .as_ref()
            .map_or(Duration::MAX, |(_, at)| at.elapsed());
        if report::worth_writing(previous, &entry, age) {
            match report::write(&celeries, &celery.name_any(), &pool.name, Some(&entry)).await {
                Ok(()) => written = Some((entry, Instant::now())),
                Err(e) => {
                    warn!(%ns, pool = %pool.name, error = %e, "cannot write the scaling status")
                }
            }
        }
        tokio::time::sleep(poll).await;
    }
}
