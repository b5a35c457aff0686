//! The Kubernetes objects the operator creates for a Celery resource ("children"), and the
//! pure decisions about them: does a live object drift from the desired one, and which live
//! objects are stale and must be pruned.

use std::collections::BTreeMap;

use kube::ResourceExt;
use kube::api::{ApiResource, DynamicObject};
use serde::Serialize;
use serde_json::Value;

use crate::quantity;

/// Every kind of object the operator may create. Pruning lists each of them, so a kind
/// that is added here is automatically cleaned up when no longer wanted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ChildKind {
    /// apps/v1 Deployment (worker pools, Flower, beat).
    Deployment,
    /// v1 Service (Flower).
    Service,
    /// networking.k8s.io/v1 Ingress (Flower).
    Ingress,
    /// policy/v1 PodDisruptionBudget (worker pools).
    PodDisruptionBudget,
    /// autoscaling/v2 HorizontalPodAutoscaler (from an autoscaler plugin).
    HorizontalPodAutoscaler,
    /// keda.sh/v1alpha1 ScaledObject (from an autoscaler plugin; KEDA may be absent).
    ScaledObject,
    /// keda.sh/v1alpha1 TriggerAuthentication (from an autoscaler plugin).
    TriggerAuthentication,
}

impl ChildKind {
    /// All kinds, in the order they are applied.
    pub const ALL: [ChildKind; 7] = [
        ChildKind::Deployment,
        ChildKind::Service,
        ChildKind::Ingress,
        ChildKind::PodDisruptionBudget,
        ChildKind::HorizontalPodAutoscaler,
        ChildKind::ScaledObject,
        ChildKind::TriggerAuthentication,
    ];

    /// The kinds an autoscaler plugin may return.
    pub const AUTOSCALER: [ChildKind; 3] = [
        ChildKind::HorizontalPodAutoscaler,
        ChildKind::ScaledObject,
        ChildKind::TriggerAuthentication,
    ];

    /// The kind of an object with this `apiVersion` and `kind`, if the operator manages it.
    /// Every version in [`versions`](Self::versions) is accepted.
    pub fn of(api_version: &str, kind: &str) -> Option<ChildKind> {
        Self::ALL
            .into_iter()
            .find(|k| k.kind() == kind && k.versions().contains(&api_version))
    }

    /// The group versions that serve this kind with the fields the operator sets, newest
    /// first. The newest is what the operator builds; the first one a cluster serves is what
    /// it talks to (`policy/v1beta1` and `autoscaling/v2beta2` carry the same fields as their
    /// successors and are all that clusters before 1.21 and 1.23 serve).
    pub fn versions(self) -> &'static [&'static str] {
        match self {
            ChildKind::Deployment => &["apps/v1"],
            ChildKind::Service => &["v1"],
            ChildKind::Ingress => &["networking.k8s.io/v1"],
            ChildKind::PodDisruptionBudget => &["policy/v1", "policy/v1beta1"],
            ChildKind::HorizontalPodAutoscaler => &["autoscaling/v2", "autoscaling/v2beta2"],
            ChildKind::ScaledObject | ChildKind::TriggerAuthentication => &["keda.sh/v1alpha1"],
        }
    }

    /// The API resource (group, version, plural) of this kind at its newest version.
    pub fn api_resource(self) -> ApiResource {
        self.api_resource_at(self.versions()[0])
    }

    /// The API resource of this kind at `api_version` (one of [`versions`](Self::versions)).
    pub fn api_resource_at(self, api_version: &str) -> ApiResource {
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        ApiResource {
            group: group.into(),
            version: version.into(),
            api_version: api_version.into(),
            kind: self.kind().into(),
            plural: self.plural().into(),
        }
    }

    /// The resource name in URLs and RBAC rules.
    pub fn plural(self) -> &'static str {
        match self {
            ChildKind::Deployment => "deployments",
            ChildKind::Service => "services",
            ChildKind::Ingress => "ingresses",
            ChildKind::PodDisruptionBudget => "poddisruptionbudgets",
            ChildKind::HorizontalPodAutoscaler => "horizontalpodautoscalers",
            ChildKind::ScaledObject => "scaledobjects",
            ChildKind::TriggerAuthentication => "triggerauthentications",
        }
    }

    /// The `kind` field of objects of this kind.
    pub fn kind(self) -> &'static str {
        match self {
            ChildKind::Deployment => "Deployment",
            ChildKind::Service => "Service",
            ChildKind::Ingress => "Ingress",
            ChildKind::PodDisruptionBudget => "PodDisruptionBudget",
            ChildKind::HorizontalPodAutoscaler => "HorizontalPodAutoscaler",
            ChildKind::ScaledObject => "ScaledObject",
            ChildKind::TriggerAuthentication => "TriggerAuthentication",
        }
    }
}

/// The version of each child kind the cluster serves, found by discovery. A kind it does not
/// serve (KEDA not installed) has none: there is nothing of it to list, watch or prune, and
/// an object of it cannot be applied.
#[derive(Clone, Debug)]
pub struct Served(BTreeMap<ChildKind, ApiResource>);

impl Served {
    /// Every kind at its newest version: what a current cluster with KEDA serves.
    pub fn newest() -> Served {
        Served(
            ChildKind::ALL
                .into_iter()
                .map(|k| (k, k.api_resource()))
                .collect(),
        )
    }

    /// The group versions whose discovery [`choose`](Self::choose) needs.
    pub fn group_versions() -> Vec<&'static str> {
        let mut all: Vec<&str> = ChildKind::ALL
            .into_iter()
            .flat_map(|k| k.versions().iter().copied())
            .collect();
        all.sort();
        all.dedup();
        all
    }

    /// Picks, for each kind, the first of its [`versions`](ChildKind::versions) whose
    /// discovery (`resources`: group version -> resource names; absent when not served)
    /// lists it.
    pub fn choose(resources: &BTreeMap<&str, Vec<String>>) -> Served {
        let served = ChildKind::ALL.into_iter().filter_map(|kind| {
            let version = kind.versions().iter().find(|v| {
                resources
                    .get(**v)
                    .is_some_and(|names| names.iter().any(|n| n == kind.plural()))
            })?;
            Some((kind, kind.api_resource_at(version)))
        });
        Served(served.collect())
    }

    /// The API resource the cluster serves this kind at, if any.
    pub fn get(&self, kind: ChildKind) -> Option<&ApiResource> {
        self.0.get(&kind)
    }

    /// The kinds the cluster serves.
    pub fn kinds(&self) -> impl Iterator<Item = ChildKind> + '_ {
        self.0.keys().copied()
    }
}

impl std::fmt::Display for ChildKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind())
    }
}

/// One desired child object, as the JSON that is server-side applied.
#[derive(Clone, Debug, PartialEq)]
pub struct Child {
    /// Its kind.
    pub kind: ChildKind,
    /// Its `metadata.name`.
    pub name: String,
    /// The full object (apiVersion, kind, metadata, spec).
    pub object: Value,
}

impl Child {
    /// Wraps a typed object; `apiVersion` and `kind` are filled in from `kind`.
    pub fn new<T: Serialize>(kind: ChildKind, name: impl Into<String>, object: &T) -> Self {
        let mut object =
            serde_json::to_value(object).expect("Kubernetes objects serialize to JSON");
        let ar = kind.api_resource();
        object["apiVersion"] = Value::String(ar.api_version);
        object["kind"] = Value::String(kind.kind().into());
        Child {
            kind,
            name: name.into(),
            object,
        }
    }

    /// The object as a [`DynamicObject`] of `served` (the version the cluster serves), ready
    /// for server-side apply.
    pub fn to_dynamic(&self, served: &ApiResource) -> Result<DynamicObject, serde_json::Error> {
        let mut object: DynamicObject = serde_json::from_value(self.object.clone())?;
        if let Some(types) = &mut object.types {
            types.api_version = served.api_version.clone();
        }
        Ok(object)
    }
}

/// Whether `live` differs from `desired` in any field the operator sets.
///
/// Server-side apply of an unchanged object is still a write request; comparing first is
/// what makes a reconcile with nothing to do issue no writes. Fields the API server or other
/// controllers add (defaults, status, annotations) are ignored; a field the operator sets
/// that was changed or removed is drift. `apiVersion` and `kind` are not compared: items of
/// a list response carry neither, and the cluster may serve an older version of the kind.
pub fn drifted(desired: &Value, live: &Value) -> bool {
    let Value::Object(desired) = desired else {
        return !contains(live, desired);
    };
    desired
        .iter()
        .filter(|(key, _)| !matches!(key.as_str(), "apiVersion" | "kind"))
        .any(|(key, dv)| !has_field(live, key, dv))
}

/// Whether the object `live` has field `key` with a value that contains `desired`.
fn has_field(live: &Value, key: &str, desired: &Value) -> bool {
    match live.get(key) {
        Some(lv) => contains(lv, desired),
        // The API server drops empty values (Go's `omitempty`).
        None => is_empty(desired),
    }
}

/// Whether `live` holds every field of `desired` with an equal value.
fn contains(live: &Value, desired: &Value) -> bool {
    match (desired, live) {
        (Value::Object(d), Value::Object(_)) => d.iter().all(|(key, dv)| has_field(live, key, dv)),
        (Value::Array(d), Value::Array(l)) => {
            d.len() == l.len() && d.iter().zip(l).all(|(dv, lv)| contains(lv, dv))
        }
        (Value::Array(d), Value::Null) => d.is_empty(),
        (Value::Number(d), Value::Number(l)) => d.as_f64() == l.as_f64(),
        // The API server canonicalises quantities ("0.5" comes back as "500m").
        (Value::String(d), Value::String(l)) => d == l || quantity::equal(d, l),
        (d, l) => d == l,
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// A live object found in the cluster, reduced to what pruning needs.
#[derive(Clone, Debug, PartialEq)]
pub struct LiveChild {
    /// Its kind.
    pub kind: ChildKind,
    /// Its name.
    pub name: String,
    /// UIDs of its controller owner references.
    pub controller_uids: Vec<String>,
    /// Its worker pool label, if any.
    pub pool: Option<String>,
}

impl LiveChild {
    /// Reads kind, name and controller owners off a listed object.
    pub fn from_dynamic(kind: ChildKind, obj: &DynamicObject) -> Self {
        LiveChild {
            kind,
            name: obj.metadata.name.clone().unwrap_or_default(),
            controller_uids: obj
                .metadata
                .owner_references
                .iter()
                .flatten()
                .filter(|r| r.controller == Some(true))
                .map(|r| r.uid.clone())
                .collect(),
            pool: obj.labels().get(crate::names::labels::POOL).cloned(),
        }
    }
}

/// The live children to delete: those controlled by `owner_uid` that are not desired,
/// except the autoscaler objects of `kept_pools` (whose autoscaler plugin failed, so what
/// runs is kept).
///
/// Objects that merely carry our labels but are controlled by something else (or by nothing)
/// are never touched: the label is not proof of ownership, the controller reference is.
pub fn stale<'a>(
    owner_uid: &str,
    desired: &[Child],
    live: &'a [LiveChild],
    kept_pools: &[String],
) -> Vec<&'a LiveChild> {
    live.iter()
        .filter(|l| l.controller_uids.iter().any(|u| u == owner_uid))
        .filter(|l| !desired.iter().any(|d| d.kind == l.kind && d.name == l.name))
        .filter(|l| {
            !(ChildKind::AUTOSCALER.contains(&l.kind)
                && l.pool.as_ref().is_some_and(|p| kept_pools.contains(p)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn equal_objects_do_not_drift() {
        let d = json!({"spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "w", "args": ["a"]}]}}}});
        assert!(!drifted(&d, &d.clone()));
    }

    #[test]
    fn server_added_fields_are_not_drift() {
        let d =
            json!({"metadata": {"labels": {"a": "1"}}, "spec": {"containers": [{"name": "w"}]}});
        let l = json!({"metadata": {"labels": {"a": "1", "other": "x"}, "resourceVersion": "7"},
                       "spec": {"containers": [{"name": "w", "terminationMessagePath": "/dev/termination-log"}]},
                       "status": {"readyReplicas": 1}});
        assert!(!drifted(&d, &l));
    }

    #[test]
    fn changed_removed_or_reordered_fields_are_drift() {
        let d = json!({"spec": {"replicas": 2, "args": ["-Q", "a"]}});
        assert!(drifted(
            &d,
            &json!({"spec": {"replicas": 3, "args": ["-Q", "a"]}})
        ));
        assert!(drifted(&d, &json!({"spec": {"args": ["-Q", "a"]}})));
        assert!(drifted(
            &d,
            &json!({"spec": {"replicas": 2, "args": ["a", "-Q"]}})
        ));
        assert!(drifted(
            &d,
            &json!({"spec": {"replicas": 2, "args": ["-Q", "a", "b"]}})
        ));
    }

    #[test]
    fn list_items_without_api_version_and_kind_do_not_drift() {
        let d = json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                       "metadata": {"name": "a"}, "spec": {"maxUnavailable": 1}});
        let listed = json!({"metadata": {"name": "a", "uid": "u"}, "spec": {"maxUnavailable": 1}});
        assert!(!drifted(&d, &listed));
        let older = json!({"apiVersion": "policy/v1beta1", "kind": "PodDisruptionBudget",
                           "metadata": {"name": "a"}, "spec": {"maxUnavailable": 1}});
        assert!(!drifted(&d, &older));
        let changed = json!({"metadata": {"name": "a"}, "spec": {"maxUnavailable": 2}});
        assert!(drifted(&d, &changed));
    }

    #[test]
    fn empty_desired_values_match_absent_live_ones() {
        let d = json!({"spec": {"env": [], "labels": {}, "x": null}});
        assert!(!drifted(&d, &json!({"spec": {}})));
    }

    #[test]
    fn canonicalised_quantities_are_not_drift() {
        let d = json!({"resources": {"requests": {"cpu": "0.5", "memory": "1Gi"}}});
        let l = json!({"resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}});
        assert!(!drifted(&d, &l));
        let l = json!({"resources": {"requests": {"cpu": "600m", "memory": "1Gi"}}});
        assert!(drifted(&d, &l));
    }

    fn live(kind: ChildKind, name: &str, owner: Option<&str>) -> LiveChild {
        LiveChild {
            kind,
            name: name.into(),
            controller_uids: owner.map(String::from).into_iter().collect(),
            pool: None,
        }
    }

    #[test]
    fn stale_selects_exactly_owned_undesired_children() {
        let desired = vec![
            Child::new(ChildKind::Deployment, "c-worker-a", &json!({})),
            Child::new(ChildKind::Service, "c-flower", &json!({})),
        ];
        let live = vec![
            live(ChildKind::Deployment, "c-worker-a", Some("u1")), // desired
            live(ChildKind::Deployment, "c-worker-b", Some("u1")), // pool removed
            live(ChildKind::Deployment, "c-flower", Some("u1")),   // flower disabled
            live(ChildKind::Service, "c-flower", Some("u1")),      // desired
            live(ChildKind::Ingress, "c-flower", Some("u1")),      // ingress removed
            live(ChildKind::Deployment, "c-worker-x", Some("u2")), // someone else's
            live(ChildKind::Deployment, "c-worker-y", None),       // not controlled
        ];
        let names: Vec<_> = stale("u1", &desired, &live, &[])
            .iter()
            .map(|l| (l.kind, l.name.as_str()))
            .collect();
        assert_eq!(
            names,
            vec![
                (ChildKind::Deployment, "c-worker-b"),
                (ChildKind::Deployment, "c-flower"),
                (ChildKind::Ingress, "c-flower"),
            ]
        );
    }

    #[test]
    fn autoscaler_objects_of_kept_pools_are_not_pruned() {
        let mut hpa = live(ChildKind::HorizontalPodAutoscaler, "c-worker-a", Some("u1"));
        hpa.pool = Some("a".into());
        let mut other = live(ChildKind::HorizontalPodAutoscaler, "c-worker-b", Some("u1"));
        other.pool = Some("b".into());
        let live = vec![hpa, other];
        let names: Vec<_> = stale("u1", &[], &live, &["a".to_string()])
            .iter()
            .map(|l| l.name.as_str())
            .collect();
        assert_eq!(names, vec!["c-worker-b"]);
    }

    #[test]
    fn the_first_served_version_of_each_kind_is_chosen() {
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // What a 1.20 cluster without KEDA serves.
        let resources = BTreeMap::from([
            ("apps/v1", names(&["deployments", "deployments/scale"])),
            ("v1", names(&["services", "pods"])),
            ("networking.k8s.io/v1", names(&["ingresses"])),
            ("policy/v1beta1", names(&["poddisruptionbudgets"])),
            ("autoscaling/v2beta2", names(&["horizontalpodautoscalers"])),
        ]);
        let served = Served::choose(&resources);
        let versions: Vec<_> = served
            .kinds()
            .map(|k| served.get(k).unwrap().api_version.clone())
            .collect();
        assert_eq!(
            versions,
            [
                "apps/v1",
                "v1",
                "networking.k8s.io/v1",
                "policy/v1beta1",
                "autoscaling/v2beta2"
            ]
        );
        assert!(served.get(ChildKind::ScaledObject).is_none());
        // Where both are served, the newest wins.
        let mut both = resources.clone();
        both.insert("policy/v1", names(&["poddisruptionbudgets"]));
        let served = Served::choose(&both);
        assert_eq!(
            served
                .get(ChildKind::PodDisruptionBudget)
                .unwrap()
                .api_version,
            "policy/v1"
        );
    }

    #[test]
    fn kinds_are_found_by_api_version_and_kind() {
        assert_eq!(
            ChildKind::of("keda.sh/v1alpha1", "ScaledObject"),
            Some(ChildKind::ScaledObject)
        );
        assert_eq!(
            ChildKind::of("autoscaling/v2", "HorizontalPodAutoscaler"),
            Some(ChildKind::HorizontalPodAutoscaler)
        );
        assert_eq!(
            ChildKind::of("policy/v1beta1", "PodDisruptionBudget"),
            Some(ChildKind::PodDisruptionBudget)
        );
        assert_eq!(
            ChildKind::of("autoscaling/v1", "HorizontalPodAutoscaler"),
            None
        );
        assert_eq!(
            ChildKind::HorizontalPodAutoscaler.api_resource_at("autoscaling/v2beta2"),
            ApiResource {
                group: "autoscaling".into(),
                version: "v2beta2".into(),
                api_version: "autoscaling/v2beta2".into(),
                kind: "HorizontalPodAutoscaler".into(),
                plural: "horizontalpodautoscalers".into(),
            }
        );
        assert_eq!(ChildKind::of("v1", "ConfigMap"), None);
    }
}
