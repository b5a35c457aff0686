//! The IO stages of reconciliation: read the live children (from the watch caches), apply
//! the drifted ones with server-side apply, prune the stale ones.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use tracing::warn;

use crate::cache::Caches;
use crate::children::{Child, ChildKind, LiveChild, Served, drifted, stale};
use crate::names::{MANAGER, children_selector};

/// Live children of one Celery resource, keyed by kind and name.
pub type LiveObjects = BTreeMap<(ChildKind, String), DynamicObject>;

/// Why the apply stage stopped.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A request to the Kubernetes API failed.
    #[error("{0}")]
    Kube(#[from] kube::Error),
    /// A desired object is not a valid Kubernetes object (never expected: plugin answers are
    /// checked before they become children).
    #[error("{kind}/{name} is not a valid object: {error}")]
    Invalid {
        /// The kind.
        kind: ChildKind,
        /// The object's name.
        name: String,
        /// What is wrong.
        error: serde_json::Error,
    },
    /// An object of a desired name exists and the resource does not control it.
    #[error(
        "{kind}/{name} exists and is not controlled by this Celery resource: it is left \
         alone (delete or rename it, or rename what the resource asks for)"
    )]
    NotOwned {
        /// The kind.
        kind: ChildKind,
        /// The object's name.
        name: String,
    },
    /// A desired object is of a kind the cluster does not serve.
    #[error(
        "{kind}/{name}: the cluster does not serve {kind} at any of {versions:?}{hint}",
        versions = kind.versions(),
        hint = if matches!(kind, ChildKind::ScaledObject | ChildKind::TriggerAuthentication) {
            " (is KEDA installed?)"
        } else {
            ""
        }
    )]
    NotServed {
        /// The kind.
        kind: ChildKind,
        /// The object's name.
        name: String,
    },
}

/// Where children are applied: the cluster, its caches, the namespace and the owning
/// resource's uid.
#[derive(Clone, Copy)]
pub struct ApplyTo<'a> {
    /// The client.
    pub client: &'a Client,
    /// The watch caches.
    pub caches: &'a Caches,
    /// The versions the cluster serves.
    pub served: &'a Served,
    /// The namespace.
    pub ns: &'a str,
    /// The uid of the Celery resource that owns the children.
    pub owner_uid: &'a str,
}

/// Applies one desired child when it drifted from `existing` (the live object of its name,
/// when listed), looking first for an object of that name the list did not show.
async fn apply_one(
    to: &ApplyTo<'_>,
    child: &Child,
    existing: Option<DynamicObject>,
    on_write: &impl Fn(ChildKind, &'static str),
) -> Result<Step, ApplyError> {
    let ApplyTo {
        client,
        caches,
        served,
        ns,
        owner_uid,
    } = *to;
    let ar = served
        .get(child.kind)
        .ok_or_else(|| ApplyError::NotServed {
            kind: child.kind,
            name: child.name.clone(),
        })?;
    let api = api(client, ns, ar);
    // Not listed under our labels: is there one anyway? (One request, only when creating.)
    let existing = match existing {
        Some(obj) => Some(obj),
        None => api.get_opt(&child.name).await?,
    };
    // A cache can be a moment behind: what it shows as drifted is read again first, so a
    // child that is already right is never written.
    let drifted_in = |obj: &DynamicObject| {
        drifted(
            &child.object,
            &serde_json::to_value(obj).unwrap_or_default(),
        )
    };
    let existing = match existing {
        Some(obj) if caches.has(child.kind) && drifted_in(&obj) => api.get_opt(&child.name).await?,
        other => other,
    };
    let exists = existing.is_some();
    if let Some(obj) = existing {
        let ours = obj
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|r| r.controller == Some(true) && r.uid == owner_uid);
        if !ours {
            return Err(ApplyError::NotOwned {
                kind: child.kind,
                name: child.name.clone(),
            });
        }
        if !drifted_in(&obj) {
            return Ok(Step::Unchanged(obj));
        }
    }
    let object = child.to_dynamic(ar).map_err(|error| ApplyError::Invalid {
        kind: child.kind,
        name: child.name.clone(),
        error,
    })?;
    on_write(child.kind, "apply");
    let params = PatchParams::apply(MANAGER).force();
    let applied = api
        .patch(&child.name, &params, &Patch::Apply(object))
        .await?;
    Ok(if exists {
        Step::Updated(applied)
    } else {
        Step::Created(applied)
    })
}

fn api(client: &Client, ns: &str, ar: &ApiResource) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, ar)
}

/// Asks the cluster which version of each child kind it serves: one discovery request per
/// group version. A group version it does not serve answers 404, and older servers answer it
/// in plain text rather than as a `Status`, so the code is what counts.
pub async fn discover(client: &Client) -> Result<Served, kube::Error> {
    let mut resources = BTreeMap::new();
    for group_version in Served::group_versions() {
        let list = if group_version.contains('/') {
            client.list_api_group_resources(group_version).await
        } else {
            client.list_core_api_resources(group_version).await
        };
        match list {
            Ok(list) => {
                let names = list.resources.into_iter().map(|r| r.name).collect();
                resources.insert(group_version, names);
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Served::choose(&resources))
}

/// The child kinds the cluster serves: discovered on first use, and again (at most once a
/// minute) when a resource needs a kind that was not served, such as KEDA's after KEDA is
/// installed.
pub struct ServedKinds {
    state: tokio::sync::Mutex<(Served, Option<Instant>)>,
}

/// How long a discovery that lacked a needed kind stands before it is asked again.
const REDISCOVER_AFTER: Duration = Duration::from_secs(60);

impl ServedKinds {
    /// Not discovered yet: the first [`current`](Self::current) asks the cluster.
    pub fn undiscovered() -> ServedKinds {
        ServedKinds {
            state: tokio::sync::Mutex::new((Served::newest(), None)),
        }
    }

    /// What the cluster serves. Asks it first when it never answered, or when one of
    /// `needed` was not served at the last discovery and that is a while ago. A failed
    /// discovery keeps what was known (the newest versions, before the first answer).
    pub async fn current(
        &self,
        client: &Client,
        needed: impl IntoIterator<Item = ChildKind>,
    ) -> Served {
        let mut state = self.state.lock().await;
        let (served, discovered) = &mut *state;
        let stale = match discovered {
            None => true,
            Some(at) => {
                at.elapsed() >= REDISCOVER_AFTER
                    && needed.into_iter().any(|k| served.get(k).is_none())
            }
        };
        if stale {
            match discover(client).await {
                Ok(found) => {
                    *served = found;
                    *discovered = Some(Instant::now());
                }
                Err(e) => warn!(error = %e, "API discovery failed; using the kinds known before"),
            }
        }
        served.clone()
    }
}

/// The live children of the Celery resource `name`: from the watch caches, and by one LIST
/// for each served kind that is not cached (a kind the cluster began serving after the
/// operator started, such as KEDA's). A kind the cluster does not serve has no children.
pub async fn live_children(
    client: &Client,
    caches: &Caches,
    served: &Served,
    ns: &str,
    name: &str,
) -> Result<LiveObjects, kube::Error> {
    let params = ListParams::default().labels(&children_selector(name));
    let mut live = LiveObjects::new();
    for kind in served.kinds() {
        let objects = match caches.children(kind, ns, name) {
            Some(cached) => cached.iter().map(|o| o.0.clone()).collect(),
            None => {
                let ar = served.get(kind).expect("a served kind");
                api(client, ns, ar).list(&params).await?.items
            }
        };
        for obj in objects {
            live.insert((kind, obj.name_any()), obj);
        }
    }
    Ok(live)
}

/// What the apply stage did.
#[derive(Debug, Default)]
pub struct Applied {
    /// `Kind/name` of the children created.
    pub created: Vec<String>,
    /// `Kind/name` of the children whose drift was repaired.
    pub updated: Vec<String>,
    /// `Kind/name` of the stale children deleted.
    pub deleted: Vec<String>,
    /// The children as they are now (live, or as the apply returned them).
    pub current: LiveObjects,
    /// The first error; applying stops there and nothing is pruned.
    pub error: Option<ApplyError>,
}

impl Applied {
    /// Whether any write happened.
    pub fn changed(&self) -> bool {
        !(self.created.is_empty() && self.updated.is_empty() && self.deleted.is_empty())
    }
}

/// What applying one desired child did.
enum Step {
    /// Nothing drifted: no write.
    Unchanged(DynamicObject),
    /// Created.
    Created(DynamicObject),
    /// Drift repaired.
    Updated(DynamicObject),
}

/// Applies the drifted desired children, then deletes the stale ones (but never the
/// autoscaler objects of `kept_pools`).
///
/// Children are only pruned once every desired child is applied, so a failure half-way (a
/// quota, a webhook) never leaves the application with fewer components than before. An
/// object of a desired name that the resource does not control (someone else's, even with
/// our labels) is never taken over: that is an error, and it is left as it is.
pub async fn apply_children(
    to: &ApplyTo<'_>,
    desired: &[Child],
    mut live: LiveObjects,
    kept_pools: &[String],
    on_write: impl Fn(ChildKind, &'static str),
) -> Applied {
    let mut out = Applied::default();
    for child in desired {
        let key = (child.kind, child.name.clone());
        let existing = live.remove(&key);
        let label = format!("{}/{}", child.kind, child.name);
        match apply_one(to, child, existing, &on_write).await {
            Ok(Step::Unchanged(obj)) => {
                out.current.insert(key, obj);
            }
            Ok(Step::Created(obj)) => {
                out.created.push(label);
                out.current.insert(key, obj);
            }
            Ok(Step::Updated(obj)) => {
                out.updated.push(label);
                out.current.insert(key, obj);
            }
            Err(e) => {
                out.error = Some(e);
                return out;
            }
        }
    }

    let remaining: Vec<LiveChild> = live
        .iter()
        .map(|((kind, _), obj)| LiveChild::from_dynamic(*kind, obj))
        .collect();
    for child in stale(to.owner_uid, desired, &remaining, kept_pools) {
        on_write(child.kind, "delete");
        let ar = to.served.get(child.kind).expect("a listed kind is served");
        match api(to.client, to.ns, ar)
            .delete(&child.name, &DeleteParams::background())
            .await
        {
            Ok(_) => out
                .deleted
                .push(format!("{}/{}", child.kind.kind(), child.name)),
            // Already gone: that is what we wanted.
            Err(kube::Error::Api(s)) if s.is_not_found() => {}
            Err(e) => {
                out.error = Some(e.into());
                return out;
            }
        }
    }
    out
}
