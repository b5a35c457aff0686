//! The Kubernetes objects the operator creates for a Celery resource ("children"), and the
//! pure decisions about them: does a live object drift from the desired one, and which live
//! objects are stale and must be pruned.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
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

    /// The kinds the controller watches, so that a changed or deleted child is repaired at
    /// once. KEDA's kinds are not watched (KEDA may be absent); the periodic resync repairs
    /// them.
    pub const WATCHED: [ChildKind; 5] = [
        ChildKind::Deployment,
        ChildKind::Service,
        ChildKind::Ingress,
        ChildKind::PodDisruptionBudget,
        ChildKind::HorizontalPodAutoscaler,
    ];

    /// The kinds an autoscaler plugin may return.
    pub const AUTOSCALER: [ChildKind; 3] = [
        ChildKind::HorizontalPodAutoscaler,
        ChildKind::ScaledObject,
        ChildKind::TriggerAuthentication,
    ];

    /// The kind of an object with this `apiVersion` and `kind`, if the operator manages it.
    pub fn of(api_version: &str, kind: &str) -> Option<ChildKind> {
        Self::ALL.into_iter().find(|k| {
            let ar = k.api_resource();
            ar.api_version == api_version && ar.kind == kind
        })
    }

    /// The API resource (group, version, plural) of this kind.
    pub fn api_resource(self) -> ApiResource {
        match self {
            ChildKind::Deployment => ApiResource::erase::<Deployment>(&()),
            ChildKind::Service => ApiResource::erase::<Service>(&()),
            ChildKind::Ingress => ApiResource::erase::<Ingress>(&()),
            ChildKind::PodDisruptionBudget => ApiResource::erase::<PodDisruptionBudget>(&()),
            ChildKind::HorizontalPodAutoscaler => {
                ApiResource::erase::<HorizontalPodAutoscaler>(&())
            }
            ChildKind::ScaledObject => keda("ScaledObject", "scaledobjects"),
            ChildKind::TriggerAuthentication => {
                keda("TriggerAuthentication", "triggerauthentications")
            }
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

    /// Whether the kind is served only when an add-on (KEDA) is installed.
    pub fn optional(self) -> bool {
        matches!(
            self,
            ChildKind::ScaledObject | ChildKind::TriggerAuthentication
        )
    }
}

fn keda(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "keda.sh".into(),
        version: "v1alpha1".into(),
        api_version: "keda.sh/v1alpha1".into(),
        kind: kind.into(),
        plural: plural.into(),
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

    /// The object as a [`DynamicObject`], ready for server-side apply.
    pub fn to_dynamic(&self) -> DynamicObject {
        serde_json::from_value(self.object.clone()).expect("a child is a valid Kubernetes object")
    }
}

/// Whether `live` differs from `desired` in any field the operator sets.
///
/// Server-side apply of an unchanged object is still a write request; comparing first is
/// what makes a reconcile with nothing to do issue no writes. Fields the API server or other
/// controllers add (defaults, status, annotations) are ignored; a field the operator sets
/// that was changed or removed is drift.
pub fn drifted(desired: &Value, live: &Value) -> bool {
    !contains(live, desired)
}

/// Whether `live` holds every field of `desired` with an equal value.
fn contains(live: &Value, desired: &Value) -> bool {
    match (desired, live) {
        (Value::Object(d), Value::Object(l)) => d.iter().all(|(key, dv)| match l.get(key) {
            Some(lv) => contains(lv, dv),
            // The API server drops empty values (Go's `omitempty`).
            None => is_empty(dv),
        }),
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
            pool: obj.labels().get(crate::build::labels::POOL).cloned(),
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
    fn kinds_are_found_by_api_version_and_kind() {
        assert_eq!(
            ChildKind::of("keda.sh/v1alpha1", "ScaledObject"),
            Some(ChildKind::ScaledObject)
        );
        assert_eq!(
            ChildKind::of("autoscaling/v2", "HorizontalPodAutoscaler"),
            Some(ChildKind::HorizontalPodAutoscaler)
        );
        assert_eq!(ChildKind::of("v1", "ConfigMap"), None);
    }
}
