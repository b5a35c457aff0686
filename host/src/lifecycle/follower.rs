//! One resource's event follower: subscribes to its broker's worker events, feeds them to
//! the [`Roster`] and, once a second, carries out what the roster asks: pod deletion costs
//! (a merge patch of one annotation: RBAC `patch` on pods), Events and evictions for stalled
//! workers, and `status.liveWorkers`. A broker that cannot be reached is retried with a
//! backoff and reported in the status; nothing is decided about workers meanwhile.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, EvictParams, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use super::Lifecycle;
use super::report;
use super::roster::{Changes, DELETION_COST, PoolSettings, Roster};
use crate::broker::events::Subscription;
use crate::broker::{Probe, url_from_secret};
use crate::crd::{Celery, PoolWorkers};

/// How often the roster is ticked.
const TICK: Duration = Duration::from_secs(1);
/// Ticks between liveness checks of the subscription and samples of the queues.
const CHECK_EVERY: u64 = 5;
/// The longest wait before connecting again.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

fn now_ms() -> u64 {
    jiff::Timestamp::now().as_millisecond().max(0) as u64
}

/// What the follower last wrote to `status.liveWorkers`, and when.
#[derive(Default)]
struct Written {
    entries: BTreeMap<String, PoolWorkers>,
    at: Option<Instant>,
}

/// Follows `celery`'s workers until stopped (dropped by [`Lifecycle::sync`]) or the resource
/// is gone.
pub(super) async fn follow(ctx: Arc<Lifecycle>, celery: Celery, pools: Vec<PoolSettings>) {
    let ns = celery.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let celeries: Api<Celery> = Api::namespaced(ctx.client.clone(), &ns);
    let mut roster = Roster::new(pools);
    // What an earlier follower (or leader) wrote: not written again while unchanged.
    let mut written = Written {
        entries: celery
            .status
            .iter()
            .flat_map(|s| s.live_workers.iter())
            .map(|e| (e.pool.clone(), e.clone()))
            .collect(),
        at: Some(Instant::now()),
    };
    let mut delay = Duration::from_secs(1);
    // The reason the stream could not be read, while it cannot.
    let mut unavailable: Option<String> = None;
    loop {
        let connected = async {
            let url = url_from_secret(&secrets, &celery.spec.broker).await?;
            let subscription = Subscription::connect(&url, &celery.spec.broker).await?;
            // Only for the backlog of "idle beside a backlog": following works without it.
            let probe = Probe::for_broker(&url, &celery.spec.broker).await.ok();
            Ok::<_, crate::broker::ProbeError>((subscription, probe))
        }
        .await;
        let (mut subscription, probe) = match connected {
            Ok(c) => c,
            Err(e) => {
                if crate::state::is_gone(&celeries, &celery).await {
                    return;
                }
                let why = e.to_string();
                if unavailable.as_ref() != Some(&why) {
                    warn!(%ns, celery = %celery.name_any(), error = %why, "cannot follow the worker events");
                    let note = format!("Cannot follow the worker events: {why}");
                    ctx.events
                        .celery(
                            &celery,
                            EventType::Warning,
                            "WorkerEventsUnavailable",
                            "Follow",
                            note,
                        )
                        .await;
                    unavailable = Some(why);
                }
                write_status(&ctx, &celery, &roster, unavailable.as_deref(), &mut written).await;
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        delay = Duration::from_secs(1);
        roster.reconnected(now_ms());
        if unavailable.take().is_some() {
            info!(%ns, celery = %celery.name_any(), "following the worker events again");
        }
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut count: u64 = 0;
        loop {
            tokio::select! {
                event = subscription.next() => match event {
                    Some(event) => {
                        if roster.observe(&event, now_ms()) {
                            ctx.metrics.worker_events.inc();
                        }
                    }
                    None => break,
                },
                _ = ticks.tick() => {
                    count += 1;
                    if count.is_multiple_of(CHECK_EVERY) {
                        if !subscription.alive().await {
                            break;
                        }
                        if let Some(probe) = &probe {
                            sample_backlog(probe, &mut roster).await;
                        }
                    }
                    let now = now_ms();
                    let changes = roster.tick(now);
                    for pool in roster.pools() {
                        if let Some(beat) = roster.beat(&pool.name, now) {
                            ctx.workloads.record(&ns, &celery.name_any(), &pool.name, beat);
                        }
                    }
                    carry_out(&ctx, &celery, &mut roster, changes).await;
                    write_status(&ctx, &celery, &roster, None, &mut written).await;
                }
            }
        }
        warn!(%ns, celery = %celery.name_any(), "lost the worker event stream; connecting again");
    }
}

/// Tells the roster how many tasks wait in each pool's queues.
async fn sample_backlog(probe: &Probe, roster: &mut Roster) {
    let now = now_ms();
    let pools: Vec<(String, Vec<String>)> = roster
        .pools()
        .iter()
        .map(|p| (p.name.clone(), p.queues.clone()))
        .collect();
    for (pool, queues) in pools {
        let waiting = probe
            .sample(&queues)
            .await
            .ok()
            .map(|s| s.iter().map(|q| q.ready).sum());
        roster.backlog(&pool, waiting, now);
    }
}

/// Writes the deletion costs the roster asks for, then reports stalls and recoveries (of
/// workers whose pods still exist) and evicts stalled pods where the pool asks.
async fn carry_out(ctx: &Lifecycle, celery: &Celery, roster: &mut Roster, changes: Changes) {
    let ns = celery.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let mut gone = BTreeSet::new();
    for (pod, cost) in changes.writes {
        let patch =
            serde_json::json!({"metadata": {"annotations": {DELETION_COST: cost.to_string()}}});
        match pods
            .patch_metadata(&pod, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                ctx.metrics.deletion_cost_writes.inc();
                roster.written(&pod, cost);
            }
            Err(kube::Error::Api(s)) if s.is_not_found() => {
                roster.gone(&pod);
                gone.insert(pod);
            }
            Err(e) => warn!(%ns, %pod, error = %e, "cannot write the pod deletion cost"),
        }
    }
    for notice in changes.stalls {
        if gone.contains(&notice.pod) {
            // Its pod went without a word (killed after its grace period): not a stall.
            continue;
        }
        let settings = roster
            .pools()
            .iter()
            .find(|p| p.name == notice.pool)
            .expect("notices name followed pools");
        let (stalled_after, replace) = (settings.stalled_after_ms, settings.replace_stalled);
        let Some(stall) = notice.stall else {
            info!(%ns, worker = %notice.hostname, "worker recovered");
            let note = format!(
                "Pool {}: worker {} works again",
                notice.pool, notice.hostname
            );
            ctx.events
                .celery(celery, EventType::Normal, "WorkerRecovered", "Follow", note)
                .await;
            continue;
        };
        ctx.metrics.worker_stalls.inc();
        let why = stall.describe(stalled_after);
        warn!(%ns, worker = %notice.hostname, pod = %notice.pod, %why, "worker stalled");
        let mut note = format!(
            "Pool {}: worker {} (pod {}) is stalled: {why}",
            notice.pool, notice.hostname, notice.pod
        );
        if replace {
            match pods.evict(&notice.pod, &EvictParams::default()).await {
                Ok(_) => note.push_str("; its pod is evicted to be replaced"),
                Err(e) => {
                    warn!(%ns, pod = %notice.pod, error = %e, "cannot evict a stalled worker");
                    note.push_str(&format!("; its pod could not be evicted: {e}"));
                }
            }
        }
        ctx.events
            .celery(celery, EventType::Warning, "WorkerStalled", "Follow", note)
            .await;
    }
}

/// Writes `status.liveWorkers` when worth it.
async fn write_status(
    ctx: &Lifecycle,
    celery: &Celery,
    roster: &Roster,
    unavailable: Option<&str>,
    written: &mut Written,
) {
    let now = Time(jiff::Timestamp::now());
    let entries: Vec<PoolWorkers> = roster
        .pools()
        .iter()
        .map(|p| {
            report::entry(
                &p.name,
                &roster.summary(&p.name),
                p.stalled_after_ms,
                unavailable,
                written.entries.get(&p.name),
                &now,
            )
        })
        .collect();
    let age = written.at.map_or(Duration::MAX, |at| at.elapsed());
    // A pool no longer followed drops out of the list too.
    let pools: BTreeSet<&String> = entries.iter().map(|e| &e.pool).collect();
    let same_pools = written.entries.keys().eq(pools.iter().copied());
    let worth = !same_pools
        || entries
            .iter()
            .any(|e| report::worth_writing(written.entries.get(&e.pool), e, age));
    if !worth {
        return;
    }
    let api: Api<Celery> = Api::namespaced(
        ctx.client.clone(),
        &celery.meta().namespace.clone().unwrap_or_default(),
    );
    match report::write(&api, &celery.name_any(), &entries).await {
        Ok(()) => {
            written.entries = entries.into_iter().map(|e| (e.pool.clone(), e)).collect();
            written.at = Some(Instant::now());
        }
        Err(e) => {
            warn!(celery = %celery.name_any(), error = %e, "cannot write the live workers status")
        }
    }
}
