//! The operator's own scaler: one loop per pool the operator scales itself (autoscaler
//! `operator`; see [`crate::plugin::choice`] for autoscaler vs scaler plugins), started and
//! stopped by reconciliation, sharing one probe per broker. Each tick reads the replicas
//! from the Deployment watch cache, samples the broker, lets [`decide`] (and the pool's
//! scaler plugin) choose, applies the result through the Deployment's `scale` subresource,
//! and reports it (Events, metrics, the pool's entry in `status.scaling`).

mod decide;
pub mod limits;
pub mod report;

pub use decide::{HoldCause, PoolScaler, Verdict, target_per_replica};

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Client, ResourceExt};
use tracing::{info, warn};

use crate::broker::{Probe, ProbeError};
use crate::cache::Caches;
use crate::children::ChildKind;
use crate::crd::{BrokerSpec, Celery, PoolScaling, WorkerPool};
use crate::events::Publisher;
use crate::metrics::{Metrics, ScalerLabels};
use crate::names::worker_name;
use crate::plugin::Plugins;
use crate::state::Loop;
use crate::workload::Workloads;

/// What the scaler loops need, and one probe per broker shared by its pools' loops.
pub struct Scalers {
    client: Client,
    events: Publisher,
    metrics: Arc<Metrics>,
    plugins: Arc<Plugins>,
    caches: Caches,
    /// How often loops sample the broker, unless a pool says otherwise.
    poll_interval: Duration,
    /// Probes by broker URL and settings; a probe lives while a loop uses it.
    probes: Mutex<HashMap<String, Weak<Probe>>>,
    /// What the lifecycle followers measured of the pools' workers.
    workloads: Arc<Workloads>,
}

impl Scalers {
    /// The scalers of an operator.
    pub fn new(
        client: Client,
        events: Publisher,
        metrics: Arc<Metrics>,
        plugins: Arc<Plugins>,
        caches: Caches,
        poll_interval: Duration,
        workloads: Arc<Workloads>,
    ) -> Self {
        Scalers {
            client,
            events,
            metrics,
            plugins,
            caches,
            poll_interval,
            probes: Mutex::default(),
            workloads,
        }
    }

    /// Starts the loops `celery` needs, restarts those whose pool or broker changed and
    /// stops those no longer wanted (`loops` are the resource's running ones). Never
    /// blocks: each loop is its own task.
    pub fn sync(self: &Arc<Self>, celery: &Celery, loops: &mut BTreeMap<String, Loop>) {
        let wanted: Vec<&WorkerPool> = celery
            .spec
            .workers
            .iter()
            .filter(|p| self.plugins.operator_scales(p))
            .collect();
        loops.retain(|pool, _| {
            let keep = wanted.iter().any(|p| &p.name == pool);
            if !keep {
                self.metrics.forget_pool(
                    &celery.namespace().unwrap_or_default(),
                    &celery.name_any(),
                    pool,
                );
                // The pool is no longer the operator's to scale: its status entry goes too.
                let (api, name, pool) = (
                    Api::<Celery>::namespaced(
                        self.client.clone(),
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
            // Only what the loop uses: an image or resources change must not restart it
            // (that would drop its sample window).
            let fingerprint =
                serde_json::to_string(&(&pool.queues, &pool.autoscaling, &celery.spec.broker))
                    .expect("serializes");
            if loops
                .get(&pool.name)
                .is_some_and(|l| l.fingerprint == fingerprint)
            {
                continue;
            }
            let task = tokio::spawn(pool_loop(self.clone(), celery.clone(), pool.clone()));
            // Replacing a loop drops (and so stops) the old one.
            loops.insert(
                pool.name.clone(),
                Loop {
                    fingerprint,
                    task: task.abort_handle(),
                },
            );
        }
    }

    /// The replicas of the Deployment `name`, from the watch cache (a GET of its `scale`
    /// when Deployments are not cached); `None` when there is no such Deployment.
    async fn replicas(
        &self,
        api: &Api<Deployment>,
        name: &str,
    ) -> Result<Option<u32>, kube::Error> {
        let ns = api.namespace().unwrap_or_default();
        let replicas = |r: Option<i32>| r.unwrap_or(0).max(0) as u32;
        if let Some(cached) = self.caches.get(ChildKind::Deployment, ns, name) {
            return Ok(cached.map(|d| {
                replicas(
                    d.data["spec"]["replicas"]
                        .as_i64()
                        .and_then(|r| i32::try_from(r).ok()),
                )
            }));
        }
        match api.get_scale(name).await {
            Ok(scale) => Ok(Some(replicas(scale.spec.and_then(|s| s.replicas)))),
            Err(kube::Error::Api(s)) if s.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The probe of the broker at `url`, shared by every pool of that broker while any of
    /// them uses it.
    async fn probe(&self, url: &str, broker: &BrokerSpec) -> Result<Arc<Probe>, ProbeError> {
        let key = format!(
            "{url} {}",
            serde_json::to_string(&(&broker.type_, &broker.redis, &broker.rabbitmq))
                .expect("serializes")
        );
        let known = self
            .probes
            .lock()
            .expect("probes lock")
            .get(&key)
            .and_then(Weak::upgrade);
        if let Some(p) = known {
            return Ok(p);
        }
        // Connecting happens outside the lock: an unreachable broker must not hold up the
        // pools of other brokers. Two pools racing here keep the first probe.
        let p = Arc::new(Probe::for_broker(url, broker).await?);
        let mut probes = self.probes.lock().expect("probes lock");
        probes.retain(|_, p| p.strong_count() > 0);
        match probes.get(&key).and_then(Weak::upgrade) {
            Some(first) => Ok(first),
            None => {
                probes.insert(key, Arc::downgrade(&p));
                Ok(p)
            }
        }
    }
}

/// Samples, decides and scales one pool every poll interval, until the loop is stopped or
/// the resource is gone. Replicas change only through the Deployment's scale subresource.
async fn pool_loop(scalers: Arc<Scalers>, celery: Celery, pool: WorkerPool) {
    let ctx = &*scalers;
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
    let mut state = PoolScaler::new(pool.concurrency.and_then(|c| u32::try_from(c).ok()));
    let celery_name = celery.name_any();
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
    let mut probe: Option<Arc<Probe>> = None;
    loop {
        let current = match scalers.replicas(&deployments, &name).await {
            Ok(Some(replicas)) => replicas,
            Ok(None) => {
                // Not created yet, or the resource is gone (its state, and this loop with
                // it, is dropped soon; a resource created again under the same name gets a
                // new uid and its own loop).
                if crate::state::is_gone(&celeries, &celery).await {
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
        // The probe is kept while it works; after a failure the Secret is read again (a
        // rotated password shows up as one) and a new probe connects.
        let connected = match probe.take() {
            Some(p) => Ok(p),
            None => match crate::broker::url_from_secret(&secrets, &celery.spec.broker).await {
                Ok(url) => scalers.probe(&url, &celery.spec.broker).await,
                Err(e) => Err(e),
            },
        };
        let sampled = match connected {
            Ok(p) => {
                let sampled = p.sample(&pool.queues).await;
                if sampled.is_ok() {
                    probe = Some(p);
                }
                sampled
            }
            Err(e) => Err(e),
        };
        match &sampled {
            Ok(_) => ctx.metrics.scaler_samples.inc(),
            Err(_) => ctx.metrics.scaler_probe_errors.inc(),
        };
        let seen = sampled.as_ref().ok().cloned();
        let (plugins, spec, pool_name) =
            (ctx.plugins.clone(), autoscaling.clone(), pool.name.clone());
        let now_ms = jiff::Timestamp::now().as_millisecond().max(0) as u64;
        if !resumed {
            state.resume(previous_entry.as_ref(), current, now_ms);
            resumed = true;
        }
        state.beats = ctx.workloads.beats((&ns, &celery_name, &pool.name));
        let (returned, verdict) = tokio::task::spawn_blocking(move || {
            let verdict = state.tick(&plugins, &pool_name, &spec, sampled, current, now_ms);
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
                        let kind = EventType::Normal;
                        ctx.events
                            .celery(&celery, kind, "Scaled", "Scale", note)
                            .await;
                    }
                    Err(e) => warn!(%ns, deployment = %name, error = %e, "scaling failed"),
                }
            }
            Verdict::Hold { reason, .. } => {
                if last_hold.as_ref() != Some(reason) {
                    warn!(%ns, pool = %pool.name, %reason, "scaling held");
                    let note = format!("Pool {}: {reason}", pool.name);
                    let kind = EventType::Warning;
                    ctx.events
                        .celery(&celery, kind, "ScalingHeld", "Scale", note)
                        .await;
                    last_hold = Some(reason.clone());
                }
            }
            Verdict::Keep { .. } => {}
        }
        if !matches!(verdict, Verdict::Hold { .. }) && last_hold.take().is_some() {
            info!(%ns, pool = %pool.name, "scaling resumed");
            let note = format!("Pool {}: the scaler decides again", pool.name);
            let kind = EventType::Normal;
            ctx.events
                .celery(&celery, kind, "ScalingResumed", "Scale", note)
                .await;
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
        report::add_workload(&mut entry, seen.as_deref(), &state.figures);
        ctx.metrics
            .record_workload(&ns, &celery_name, &pool.name, &entry);
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
