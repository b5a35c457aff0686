//! The controller: one reconcile strings the stages together — validate, build, apply
//! (observe, apply drifted, prune stale), status — and reports what a person should see.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, error, info, warn};

use crate::apply::{self, Applied, ServedKinds};
use crate::build::{self, MANAGER, labels};
use crate::children::ChildKind;
use crate::crd::{Celery, CeleryStatus};
use crate::metrics::{Metrics, ReconcileLabels, WriteLabels};
use crate::plugin::configmap;
use crate::scaler::Scalers;
use crate::shape::{self, Plugins};
use crate::status::{self, DEGRADED, READY};
use crate::validate::validate;

/// Resync period: even without any event, every resource is checked for drift this often.
const RESYNC: Duration = Duration::from_secs(300);
/// Default broker poll interval of the operator's own scaler.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// Retry delay after a failed reconcile.
/// First retry of a failed reconcile; doubled on every failure in a row, up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between retries of a resource that keeps failing.
const RETRY_MAX: Duration = Duration::from_secs(300);

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
    Plugin(#[from] shape::ShapeError),
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
    /// Who publishes the Events.
    pub reporter: Reporter,
    /// The operator's metrics.
    pub metrics: Arc<Metrics>,
    /// The plugins and the cluster's choices of them.
    pub plugins: Arc<Plugins>,
    /// The loops of the pools the operator scales itself.
    pub scalers: Arc<Scalers>,
    /// How often those loops sample the broker, unless a pool says otherwise.
    pub poll_interval: Duration,
    /// Failed reconciles in a row, by resource uid: the retry backoff.
    pub failures: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

impl Context {
    /// A context whose Events are reported as coming from `instance` (the pod name).
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        plugins: Arc<Plugins>,
        instance: Option<String>,
    ) -> Self {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance,
        };
        Context {
            reporter,
            client,
            served: ServedKinds::undiscovered(),
            metrics,
            plugins,
            scalers: Arc::default(),
            poll_interval: DEFAULT_POLL_INTERVAL,
            failures: Default::default(),
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
        ctx.failures.lock().expect("failures lock").remove(&uid);
    }
    result.map(|r| match r {
        // Only a spec change can fix an invalid spec, and that triggers a reconcile.
        Reconciled::Invalid => Action::await_change(),
        Reconciled::Applied => Action::requeue(RESYNC),
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

    // Stage 1: validate. Nothing is applied or pruned for an invalid spec.
    if let Err(invalid) = validate(celery) {
        let message = invalid.0.join("; ");
        let already_reported = status::find(celery.status.as_ref(), DEGRADED)
            .is_some_and(|c| c.reason == "InvalidSpec" && c.message == message);
        write_status(&api, celery, status::invalid(celery, &message, &now)).await?;
        if !already_reported {
            warn!(%ns, %name, %message, "invalid spec");
            publish(
                ctx,
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

    // Stage 2: build the desired children (pure).
    let built = build::desired_children(celery);

    // Stage 3: shape them with the plugins. Each call is bounded, but may take up to its
    // deadline, so it runs off the async workers.
    let (plugins, owned) = (ctx.plugins.clone(), celery.clone());
    let shaped = tokio::task::spawn_blocking(move || shape::shape(&plugins, &owned, built))
        .await
        // A bug, never a plugin's doing (their answers are checked): this resource fails,
        // the operator carries on.
        .map_err(|e| Error::Panicked(e.to_string()))?;

    // Stage 4: observe the live children, apply what drifted, prune what is stale.
    let needed: Vec<ChildKind> = shaped
        .iter()
        .flat_map(|s| s.children.iter().map(|c| c.kind))
        .collect();
    let served = ctx.served.current(&ctx.client, needed).await;
    let live = apply::list_children(&ctx.client, &served, &ns, &name).await?;
    let on_write = |kind: ChildKind, operation| {
        let labels = WriteLabels {
            kind: kind.kind(),
            operation,
        };
        ctx.metrics.child_writes.get_or_create(&labels).inc();
    };
    let mut outcome = status::Outcome::default();
    let mut retry = None;
    let mut applied = match &shaped {
        Ok(shaped) if !shaped.hold => {
            apply::apply_children(
                &ctx.client,
                &served,
                &ns,
                &uid,
                &shaped.children,
                live,
                &shaped.kept_pools,
                on_write,
            )
            .await
        }
        // Nothing is applied: what runs stays as it is.
        _ => Applied {
            current: live,
            ..Default::default()
        },
    };
    match shaped {
        Ok(shaped) => {
            outcome.plugins = shaped.uses;
            outcome.plugin_problems = shaped.problems;
        }
        Err(e @ shape::ShapeError::Rejected { .. }) => {
            outcome.failure = Some(("ShapingRejected", e.to_string()));
        }
        Err(e @ shape::ShapeError::Failed { .. }) => {
            outcome.failure = Some(("PluginFailed", e.to_string()));
            retry = Some(Error::Plugin(e));
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

    // The pools the operator scales itself get their scaler loops (started, changed or
    // stopped here, run on their own).
    if outcome.failure.is_none() {
        ctx.scalers.sync(ctx, celery);
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
            .filter_map(|p| Some(shape::autoscaler_of(&ctx.plugins.config, p)?.name)),
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
    // `scaling` belongs to the scaler loops (their own field managers): neither compared nor
    // applied here, so this apply leaves their entries alone.
    status.scaling.clear();
    let live = celery.status.clone().map(|mut s| {
        s.scaling.clear();
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
            publish(ctx, celery, EventType::Normal, reason, "Reconcile", note).await;
        }
    }
    if let Some((reason, message)) = new_failure {
        warn!(%ns, %name, %reason, %message, "reconcile failed");
        publish(
            ctx,
            celery,
            EventType::Warning,
            reason,
            "Reconcile",
            message,
        )
        .await;
    }
    if became_ready {
        let note = "Every component has all its pods ready".to_string();
        publish(ctx, celery, EventType::Normal, "Ready", "Reconcile", note).await;
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// Publishes an Event; failing to do so is logged, never fatal.
pub(crate) async fn publish(
    ctx: &Context,
    celery: &Celery,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let about = celery.object_ref(&());
    publish_about(
        &ctx.client,
        &ctx.reporter,
        &about,
        type_,
        reason,
        action,
        note,
    )
    .await;
}

/// Publishes an Event about any object (a Celery resource, a plugin ConfigMap).
pub(crate) async fn publish_about(
    client: &Client,
    reporter: &Reporter,
    about: &ObjectReference,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        // The Events API limits notes to 1 KiB; parts of a note may come from plugins.
        note: Some(crate::text::clean(&note, crate::text::limit::EVENT_NOTE)),
        action: action.into(),
        secondary: None,
    };
    // A fresh recorder: kube's recorder folds Events with the same reason into one series
    // and keeps the first note, which would hide a new message behind an old one.
    let recorder = Recorder::new(client.clone(), reporter.clone());
    if let Err(e) = recorder.publish(&event, about).await {
        warn!(error = %e, "could not publish Event");
    }
}

/// Decides what happens after a failed reconcile.
/// A resource that keeps failing is retried ever less often (1 s, 2 s, 4 s, ... 5 min), so
/// an API server in trouble is not hammered; success resets it.
pub fn error_policy(celery: Arc<Celery>, error: &Error, ctx: Arc<Context>) -> Action {
    let failures = {
        let mut failures = ctx.failures.lock().expect("failures lock");
        let n = failures
            .entry(celery.uid().unwrap_or_default())
            .or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
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
    let celeries: Api<Celery> = api(&client, &namespace);

    let (plugins_changed, reconcile_all) = futures::channel::mpsc::unbounded::<()>();
    match plugin_namespace {
        Some(plugin_ns) => {
            let (listed, initial_list) = tokio::sync::oneshot::channel();
            tokio::spawn(configmap::watch(
                client.clone(),
                plugin_ns.clone(),
                ctx.plugins.registry.clone(),
                ctx.metrics.clone(),
                ctx.reporter.clone(),
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

    let owned = watcher::Config::default().labels(&format!("{}={MANAGER}", labels::MANAGED_BY));
    let mut controller = Controller::new(celeries, watcher::Config::default());
    // Every child kind the cluster serves is watched, so a changed or deleted child is
    // repaired at once. A kind served only later (KEDA installed after the operator) is
    // repaired by the periodic resync until the next restart.
    let served = ctx.served.current(&client, []).await;
    for kind in served.kinds() {
        let ar = served.get(kind).expect("a served kind").clone();
        let children: Api<DynamicObject> = match &namespace {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
            None => Api::all_with(client.clone(), &ar),
        };
        controller = controller.owns_with(children, ar, owned.clone());
    }
    controller
        .reconcile_all_on(reconcile_all)
        // A rollout changes a Deployment's status many times a second; one reconcile for
        // the burst is enough.
        .with_config(ControllerConfig::default().debounce(Duration::from_millis(500)))
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => debug!(name = %obj.name, ns = ?obj.namespace, "reconciled"),
                Err(e) => debug!(error = %e, "reconcile error"),
            }
        })
        .await;
    info!("controller stopped");
}

/// Blocks until Celery resources can be listed in `namespace` (or all namespaces), saying
/// clearly why not in the meantime.
pub async fn wait_for_crd(client: &Client, namespace: Option<&str>) {
    let celeries: Api<Celery> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    loop {
        match celeries.list(&ListParams::default().limit(1)).await {
            Ok(_) => return,
            Err(e) => {
                error!(error = %e, "cannot list Celery resources; is the CRD installed? \
                       (celery-operator crd | kubectl apply --server-side -f -)");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
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
