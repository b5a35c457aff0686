//! The controller: one reconcile strings the stages together — plan (validate, build,
//! shape: [`crate::plan`]), apply (read the live children from the watch caches, apply what
//! drifted, prune what is stale), status — and reports what a person should see.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, error, info, warn};

use crate::apply::{self, Applied, ApplyTo, ServedKinds};
use crate::cache::{Cached, Caches, Ready, Slim, causes, watch_config};
use crate::children::ChildKind;
use crate::crd::{Celery, CeleryStatus};
use crate::events::Publisher;
use crate::lifecycle::Lifecycle;
use crate::metrics::{Metrics, ReconcileLabels, WriteLabels};
use crate::names::{MANAGER, labels};
use crate::plan::{PlanError, plan};
use crate::plugin::{Plugins, configmap};
use crate::scaler::Scalers;
use crate::shape::ShapeError;
use crate::state::ResourceStates;
use crate::status::{self, DEGRADED, READY};

/// Default resync period: even without any event, every resource is checked for drift this
/// often (against the watch caches: a resync of a settled resource sends nothing).
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(300);
/// Default broker poll interval of the operator's own scaler.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// First retry of a failed reconcile; doubled on every failure in a row, up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between retries of a resource that keeps failing.
const RETRY_MAX: Duration = Duration::from_secs(300);
/// Longest a reconcile waits for the watch caches' first listing before it lists directly.
const CACHE_WAIT: Duration = Duration::from_secs(10);
/// How often the state of deleted resources is dropped.
const FORGET_EVERY: Duration = Duration::from_secs(10);

/// The wait before retry number `failures` (1 = the first failure).
pub fn retry_after(failures: u32) -> Duration {
    RETRY_FIRST
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(RETRY_MAX)
}

/// Why a reconcile failed; it is retried with backoff (see [`retry_after`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request to the Kubernetes API failed.
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    /// A child could not be applied.
    #[error("{0}")]
    Apply(#[from] apply::ApplyError),
    /// A plugin failed and its failure policy is `fail`.
    #[error("{0}")]
    Plugin(#[from] ShapeError),
    /// A stage panicked (a bug): the resource is retried, the operator carries on.
    #[error("internal error: {0}")]
    Panicked(String),
    /// The object lacks metadata the API server always sets.
    #[error("Celery resource has no {0}")]
    MissingMetadata(&'static str),
}

/// What every reconcile shares.
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// The version of each child kind the cluster serves.
    pub served: ServedKinds,
    /// Publishes the Events.
    pub events: Publisher,
    /// The operator's metrics.
    pub metrics: Arc<Metrics>,
    /// The plugins and the cluster's choices of them.
    pub plugins: Arc<Plugins>,
    /// The watch caches of the children.
    pub caches: Caches,
    /// Starts and stops the loops of the pools the operator scales itself.
    pub scalers: Arc<Scalers>,
    /// Starts and stops the followers of the resources' worker events.
    pub lifecycle: Arc<Lifecycle>,
    /// What is remembered about each resource between reconciles.
    pub states: ResourceStates,
    /// How often a resource is reconciled without any event.
    pub resync: Duration,
}

impl Context {
    /// A context whose Events are reported as coming from `instance` (the pod name), whose
    /// scaler loops sample brokers every `poll_interval` unless a pool says otherwise.
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        plugins: Arc<Plugins>,
        instance: Option<String>,
        poll_interval: Duration,
    ) -> Self {
        let events = Publisher::new(client.clone(), instance);
        let caches = Caches::default();
        // The followers measure what the workers do; the scaler loops read it.
        let workloads = Arc::new(crate::workload::Workloads::default());
        let scalers = Arc::new(Scalers::new(
            client.clone(),
            events.clone(),
            metrics.clone(),
            plugins.clone(),
            caches.clone(),
            poll_interval,
            workloads.clone(),
        ));
        let lifecycle = Arc::new(Lifecycle::new(
            client.clone(),
            events.clone(),
            metrics.clone(),
            plugins.clone(),
            workloads,
        ));
        Context {
            client,
            served: ServedKinds::undiscovered(),
            events,
            metrics,
            plugins,
            caches,
            scalers,
            lifecycle,
            states: ResourceStates::default(),
            resync: DEFAULT_RESYNC,
        }
    }
}

/// Reconciles one Celery resource and records the metrics of doing so.
pub async fn reconcile(celery: Arc<Celery>, ctx: Arc<Context>) -> Result<Action, Error> {
    let start = Instant::now();
    let result = reconcile_stages(&celery, &ctx).await;
    ctx.metrics
        .reconcile_duration
        .observe(start.elapsed().as_secs_f64());
    let label = match &result {
        Ok(Reconciled::Invalid) => "invalid",
        Ok(_) => "success",
        Err(_) => "error",
    };
    ctx.metrics
        .reconciles
        .get_or_create(&ReconcileLabels { result: label })
        .inc();
    if result.is_ok() {
        let uid = celery.uid().unwrap_or_default();
        ctx.states.with(&uid, |s| s.failures = 0);
    }
    result.map(|r| match r {
        // Only a spec change can fix an invalid spec, and that triggers a reconcile.
        Reconciled::Invalid => Action::await_change(),
        Reconciled::Applied => Action::requeue(ctx.resync),
    })
}

/// Where a successful reconcile ended.
enum Reconciled {
    Invalid,
    Applied,
}

async fn reconcile_stages(celery: &Arc<Celery>, ctx: &Arc<Context>) -> Result<Reconciled, Error> {
    let ns = celery
        .namespace()
        .ok_or(Error::MissingMetadata("namespace"))?;
    let uid = celery.uid().ok_or(Error::MissingMetadata("uid"))?;
    let name = celery.name_any();
    let now = Time(jiff::Timestamp::now());
    let api: Api<Celery> = Api::namespaced(ctx.client.clone(), &ns);

    // Stages 1-3: validate, build, shape (pure but for the plugin calls, which are bounded
    // but may take up to their deadline: off the async workers).
    let last_good = ctx.states.with(&uid, |s| s.last_good.clone());
    let (plugins, owned) = (ctx.plugins.clone(), celery.clone());
    let planned = tokio::task::spawn_blocking(move || plan(&owned, &plugins, &last_good))
        .await
        // A bug, never a plugin's doing (their answers are checked): this resource fails,
        // the operator carries on.
        .map_err(|e| Error::Panicked(e.to_string()))?;

    // Nothing is applied or pruned for an invalid spec.
    if let Err(PlanError::Invalid(invalid)) = &planned {
        let message = invalid.0.join("; ");
        let already_reported = status::find(celery.status.as_ref(), DEGRADED)
            .is_some_and(|c| c.reason == "InvalidSpec" && c.message == message);
        write_status(&api, celery, status::invalid(celery, &message, &now)).await?;
        if !already_reported {
            warn!(%ns, %name, %message, "invalid spec");
            let events = &ctx.events;
            events
                .celery(
                    celery,
                    EventType::Warning,
                    "InvalidSpec",
                    "Validate",
                    message,
                )
                .await;
        }
        return Ok(Reconciled::Invalid);
    }

    // Stage 4: read the live children, apply what drifted, prune what is stale.
    let needed: Vec<ChildKind> = planned
        .iter()
        .flat_map(|p| p.children.iter().map(|c| c.kind))
        .collect();
    let served = ctx.served.current(&ctx.client, needed).await;
    ctx.caches.ready(CACHE_WAIT).await;
    let live = apply::live_children(&ctx.client, &ctx.caches, &served, &ns, &name).await?;
    let on_write = |kind: ChildKind, operation| {
        let labels = WriteLabels {
            kind: kind.kind(),
            operation,
        };
        ctx.metrics.child_writes.get_or_create(&labels).inc();
    };
    let to = ApplyTo {
        client: &ctx.client,
        caches: &ctx.caches,
        served: &served,
        ns: &ns,
        owner_uid: &uid,
    };
    let mut outcome = status::Outcome::default();
    let mut retry = None;
    let mut applied = match &planned {
        Ok(plan) if !plan.keep_what_runs => {
            apply::apply_children(&to, &plan.children, live, &plan.kept_pools, on_write).await
        }
        // Nothing is applied: what runs stays as it is.
        _ => Applied {
            current: live,
            ..Default::default()
        },
    };
    match planned {
        Ok(plan) => {
            ctx.states.with(&uid, |s| {
                s.last_good.extend(plan.autoscaler_answers);
                let pools = &celery.spec.workers;
                s.last_good
                    .retain(|pool, _| pools.iter().any(|p| p.name == *pool));
            });
            outcome.plugins = plan.uses;
            outcome.plugin_problems = plan.problems;
        }
        Err(e) => {
            outcome.failure = Some((e.reason(), e.to_string()));
            if let PlanError::Plugin(e @ ShapeError::Failed { .. }) = e {
                retry = Some(Error::Plugin(e));
            }
        }
    }
    outcome
        .plugin_problems
        .extend(refused_updates(ctx, celery, &outcome.plugins));
    if let Some(e) = applied.error.take() {
        outcome.failure = Some(("ApplyFailed", e.to_string()));
        retry = Some(e.into());
    }
    outcome.changed = applied.changed();
    outcome.deployments = applied
        .current
        .iter()
        .filter(|((kind, _), _)| *kind == ChildKind::Deployment)
        .filter_map(|((_, name), obj)| {
            Some((name.clone(), obj.clone().try_parse::<Deployment>().ok()?))
        })
        .collect();

    // The pools the operator scales itself get their scaler loops, followed pools their
    // resource's event follower (started, changed or stopped here, run on their own).
    if outcome.failure.is_none() {
        ctx.states.with(&uid, |s| {
            ctx.scalers.sync(celery, &mut s.scalers);
            ctx.lifecycle.sync(celery, &mut s.follower);
        });
    }

    // Stage 5: status and Events.
    let new_status = status::compute(celery, &outcome, &now);
    let became_ready = is_true(Some(&new_status)) && !is_true(celery.status.as_ref());
    let degraded_changed = status::find(celery.status.as_ref(), DEGRADED)
        .map(|c| (&c.reason, &c.message))
        != status::find(Some(&new_status), DEGRADED).map(|c| (&c.reason, &c.message));
    let new_failure = outcome.failure.filter(|_| degraded_changed);
    write_status(&api, celery, new_status).await?;
    report(ctx, celery, &applied, became_ready, new_failure).await;
    match retry {
        Some(e) => Err(e),
        None => Ok(Reconciled::Applied),
    }
}

/// Refused updates of the plugins a resource uses: the old build keeps running, and the
/// resource's status says so.
fn refused_updates(ctx: &Context, celery: &Celery, uses: &[crate::crd::PluginUse]) -> Vec<String> {
    let mut names: Vec<String> = uses.iter().map(|u| u.name.clone()).collect();
    names.extend(
        celery
            .spec
            .workers
            .iter()
            .filter_map(|p| Some(ctx.plugins.autoscaler_of(p)?.name)),
    );
    names.sort();
    names.dedup();
    names
        .iter()
        .filter_map(|name| {
            let r = ctx.plugins.registry.rejection(name)?;
            Some(format!(
                "the new build {} of plugin {name} from {} was refused ({}); the previous build keeps running",
                r.digest, r.source, r.error
            ))
        })
        .collect()
}

fn is_true(status: Option<&CeleryStatus>) -> bool {
    status::find(status, READY).is_some_and(|c| c.status == "True")
}

/// Writes the status only when it changed, so a quiet reconcile sends no write.
async fn write_status(
    api: &Api<Celery>,
    celery: &Celery,
    mut status: CeleryStatus,
) -> Result<(), Error> {
    // `scaling` and `liveWorkers` belong to the scaler loops and the event followers (their
    // own field managers): neither compared nor applied here, so this apply leaves their
    // entries alone.
    let others = |s: &mut CeleryStatus| {
        s.scaling.clear();
        s.live_workers.clear();
    };
    others(&mut status);
    let live = celery.status.clone().map(|mut s| {
        others(&mut s);
        s
    });
    if live.as_ref() == Some(&status) {
        return Ok(());
    }
    // Server-side apply replaces exactly the fields we own, including removing ones that
    // are no longer set (a merge patch would leave them behind).
    let patch = json!({
        "apiVersion": Celery::api_version(&()),
        "kind": Celery::kind(&()),
        "status": status,
    });
    api.patch_status(
        &celery.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await?;
    Ok(())
}

/// Events a person reading `kubectl describe celery` should see.
///
/// Each is published when something changed, never on a quiet reconcile, so a failure that
/// repeats on every retry is reported once, not every 15 seconds.
async fn report(
    ctx: &Context,
    celery: &Celery,
    applied: &Applied,
    became_ready: bool,
    new_failure: Option<(&'static str, String)>,
) {
    let (ns, name) = (celery.namespace().unwrap_or_default(), celery.name_any());
    for (what, reason, items) in [
        ("created", "Created", &applied.created),
        ("updated", "Updated", &applied.updated),
        ("deleted", "Deleted", &applied.deleted),
    ] {
        if !items.is_empty() {
            info!(%ns, %name, objects = ?items, "{what} children");
            let note = format!("{} {}", capitalize(what), items.join(", "));
            let events = &ctx.events;
            events
                .celery(celery, EventType::Normal, reason, "Reconcile", note)
                .await;
        }
    }
    if let Some((reason, message)) = new_failure {
        warn!(%ns, %name, %reason, %message, "reconcile failed");
        let events = &ctx.events;
        events
            .celery(celery, EventType::Warning, reason, "Reconcile", message)
            .await;
    }
    if became_ready {
        let note = "Every component has all its pods ready".to_string();
        let events = &ctx.events;
        events
            .celery(celery, EventType::Normal, "Ready", "Reconcile", note)
            .await;
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// Decides what happens after a failed reconcile.
/// A resource that keeps failing is retried ever less often (1 s, 2 s, 4 s, ... 5 min), so
/// an API server in trouble is not hammered; success resets it.
pub fn error_policy(celery: Arc<Celery>, error: &Error, ctx: Arc<Context>) -> Action {
    let failures = ctx.states.with(&celery.uid().unwrap_or_default(), |s| {
        s.failures = s.failures.saturating_add(1);
        s.failures
    });
    let wait = retry_after(failures);
    warn!(name = %celery.name_any(), ns = ?celery.namespace(), %error, failures, retry_in = ?wait, "reconcile failed; retrying");
    Action::requeue(wait)
}

/// Runs the controller until SIGTERM or SIGINT. Watches Celery resources (in `namespace`, or
/// all namespaces) and the children the operator manages, so a changed or deleted child is
/// repaired; and, when `plugin_namespace` is set, the plugin ConfigMaps there, reconciling
/// every resource again when a plugin changes.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    plugin_namespace: Option<String>,
    ctx: Arc<Context>,
) {
    fn api<K>(client: &Client, ns: &Option<String>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let celeries: Api<Slim<Celery>> = api(&client, &namespace);

    let (plugins_changed, reconcile_all) = futures::channel::mpsc::unbounded::<()>();
    match plugin_namespace {
        Some(plugin_ns) => {
            let (listed, initial_list) = tokio::sync::oneshot::channel();
            tokio::spawn(configmap::watch(
                client.clone(),
                plugin_ns.clone(),
                ctx.plugins.registry.clone(),
                ctx.plugins.config.registries.clone(),
                ctx.metrics.clone(),
                ctx.events.clone(),
                move || {
                    let _ = plugins_changed.unbounded_send(());
                },
                move || {
                    let _ = listed.send(());
                },
            ));
            // The plugins resources ask for should be loaded before the first reconcile.
            match tokio::time::timeout(Duration::from_secs(30), initial_list).await {
                Ok(_) => info!(namespace = %plugin_ns, "plugin ConfigMaps loaded"),
                Err(_) => {
                    warn!(namespace = %plugin_ns, "plugin ConfigMaps not listed within 30 s; starting anyway")
                }
            }
        }
        None => info!("no plugin namespace set: plugins come from the built-ins only"),
    }

    // The resources, read without their managed fields (nothing reads them).
    let writer = Writer::<Celery>::default();
    let store = writer.as_reader();
    let (events, listed) = Ready::track(watcher(celeries, watch_config()));
    let resources = events
        .inspect_err(|e| warn!(error = %causes(e), "cannot watch Celery resources; retrying"))
        .map_ok(Slim::unwrap_events)
        .reflect(writer)
        .default_backoff()
        .applied_objects();
    let mut controller =
        Controller::for_stream(resources, store.clone()).trigger_backoff(EachWatchBacksOff);
    // Every child kind the cluster serves is watched and cached: a changed or deleted child
    // is repaired at once, and reconciles read children from the caches. A kind served only
    // later (KEDA installed after the operator) is listed by each reconcile and repaired by
    // the periodic resync until the next restart.
    let owned = watch_config().labels(&format!("{}={MANAGER}", labels::MANAGED_BY));
    let served = ctx.served.current(&client, []).await;
    for kind in served.kinds() {
        let ar = served.get(kind).expect("a served kind").clone();
        let children: Api<Cached> = match &namespace {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
            None => Api::all_with(client.clone(), &ar),
        };
        let events = watcher(children, owned.clone());
        controller = controller.owns_stream_with(ctx.caches.watch(kind, &ar, events), ar);
    }
    let forget = tokio::spawn(forget_deleted(ctx.clone(), store, listed));
    controller
        .reconcile_all_on(reconcile_all)
        // A rollout changes a Deployment's status many times a second; one reconcile for
        // the burst is enough.
        // At most 16 resources reconciled at once: enough to keep two cores busy (a
        // reconcile mostly waits on the API server), few enough to bound the memory of a
        // restart with thousands of resources.
        .with_config(
            ControllerConfig::default()
                .debounce(Duration::from_millis(500))
                .concurrency(16),
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => debug!(name = %obj.name, ns = ?obj.namespace, "reconciled"),
                Err(e) => debug!(error = %e, "reconcile error"),
            }
        })
        .await;
    forget.abort();
    info!("controller stopped");
}

/// The controller's backoff over all its watches at once: none. Each watch backs off on its
/// own errors (`default_backoff` on every stream); kube's default here would put every
/// watch to sleep for any one's errors, and after an API server outage, when all of them
/// fail, the sleeps grow until changes wait minutes to be seen.
struct EachWatchBacksOff;

impl Iterator for EachWatchBacksOff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        Some(Duration::ZERO)
    }
}

impl kube::runtime::utils::Backoff for EachWatchBacksOff {
    fn reset(&mut self) {}
}

/// Drops, every little while, the state of the resources that are gone (their retry
/// counters, last good plugin answers, scaler loops and, with them, unused broker probes).
async fn forget_deleted(ctx: Arc<Context>, store: reflector::Store<Celery>, listed: Ready) {
    // Before the first listing the store is empty: everything would look deleted.
    listed.wait().await;
    loop {
        let live: HashSet<String> = store.state().iter().filter_map(|c| c.uid()).collect();
        ctx.states.retain(|uid| live.contains(uid));
        let (resources, loops) = ctx.states.counts();
        ctx.metrics.tracked_resources.set(resources as i64);
        ctx.metrics.scaler_loops.set(loops as i64);
        tokio::time::sleep(FORGET_EVERY).await;
    }
}

/// Blocks until the API server serves Celery resources, saying clearly why not in the
/// meantime. Asks discovery, which every client may read, rather than listing: the watch
/// that follows lists them (and says so when it may not).
pub async fn wait_for_crd(client: &Client) {
    let api_version = Celery::api_version(&());
    let plural = Celery::plural(&());
    loop {
        let problem = match client.list_api_group_resources(&api_version).await {
            Ok(served) if served.resources.iter().any(|r| r.name == plural) => return,
            Ok(_) => format!("{api_version} is served without {plural}"),
            Err(e) => e.to_string(),
        };
        error!(%problem, "Celery resources are not served; is the CRD installed? \
               (celery-operator crd | kubectl apply --server-side -f -)");
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_exponentially_up_to_five_minutes() {
        let waits: Vec<u64> = [1, 2, 3, 4, 9, 10, 40, u32::MAX]
            .map(|n| retry_after(n).as_secs())
            .to_vec();
        assert_eq!(waits, [1, 2, 4, 8, 256, 300, 300, 300]);
    }
}
