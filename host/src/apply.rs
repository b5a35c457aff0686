//! The IO stages of reconciliation: read the live children, server-side apply the drifted
//! ones, prune the stale ones.

use std::collections::BTreeMap;

use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};

use crate::build::{MANAGER, children_selector};
use crate::children::{Child, ChildKind, LiveChild, drifted, stale};

/// Live children of one Celery resource, keyed by kind and name.
pub type LiveObjects = BTreeMap<(ChildKind, String), DynamicObject>;

fn api(client: &Client, ns: &str, kind: ChildKind) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &kind.api_resource())
}

/// Lists every child kind by the operator's labels: one read per kind. A kind that the
/// cluster does not serve (KEDA not installed) has no children.
pub async fn list_children(
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<LiveObjects, kube::Error> {
    let params = ListParams::default().labels(&children_selector(name));
    let mut live = LiveObjects::new();
    for kind in ChildKind::ALL {
        let list = match api(client, ns, kind).list(&params).await {
            Err(kube::Error::Api(s)) if s.is_not_found() && kind.optional() => continue,
            list => list?,
        };
        for obj in list {
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
    pub error: Option<kube::Error>,
}

impl Applied {
    /// Whether any write happened.
    pub fn changed(&self) -> bool {
        !(self.created.is_empty() && self.updated.is_empty() && self.deleted.is_empty())
    }
}

/// Applies the drifted desired children, then deletes the stale ones (but never the
/// autoscaler objects of `kept_pools`).
///
/// Children are only pruned once every desired child is applied, so a failure half-way (a
/// quota, a webhook) never leaves the application with fewer components than before.
pub async fn apply_children(
    client: &Client,
    ns: &str,
    owner_uid: &str,
    desired: &[Child],
    mut live: LiveObjects,
    kept_pools: &[String],
    on_write: impl Fn(ChildKind, &'static str),
) -> Applied {
    let mut out = Applied::default();
    let params = PatchParams::apply(MANAGER).force();
    for child in desired {
        let key = (child.kind, child.name.clone());
        let existing = live.remove(&key);
        let label = format!("{}/{}", child.kind.kind(), child.name);
        match existing {
            Some(obj)
                if !drifted(
                    &child.object,
                    &serde_json::to_value(&obj).unwrap_or_default(),
                ) =>
            {
                out.current.insert(key, obj);
            }
            existing => {
                on_write(child.kind, "apply");
                match api(client, ns, child.kind)
                    .patch(&child.name, &params, &Patch::Apply(child.to_dynamic()))
                    .await
                {
                    Ok(obj) => {
                        if existing.is_some() {
                            &mut out.updated
                        } else {
                            &mut out.created
                        }
                        .push(label);
                        out.current.insert(key, obj);
                    }
                    Err(e) => {
                        out.error = Some(e);
                        return out;
                    }
                }
            }
        }
    }

    let remaining: Vec<LiveChild> = live
        .iter()
        .map(|((kind, _), obj)| LiveChild::from_dynamic(*kind, obj))
        .collect();
    for child in stale(owner_uid, desired, &remaining, kept_pools) {
        on_write(child.kind, "delete");
        match api(client, ns, child.kind)
            .delete(&child.name, &DeleteParams::background())
            .await
        {
            Ok(_) => out
                .deleted
                .push(format!("{}/{}", child.kind.kind(), child.name)),
            // Already gone: that is what we wanted.
            Err(kube::Error::Api(s)) if s.is_not_found() => {}
            Err(e) => {
                out.error = Some(e);
                return out;
            }
        }
    }
    out
}
