//! The Kubernetes permissions the operator needs, derived from what the code does: the child
//! kinds it manages and watches, the verbs the apply stage uses, the plugin ConfigMaps and the
//! leader-election Lease. `celery-operator rbac` prints them; the Helm chart's RBAC is checked
//! against that output, and the operator tests check, on the in-memory server and on a real
//! control plane, that every request the operator sends is allowed by them.

use serde::Serialize;

use crate::children::ChildKind;
use crate::crd::{Celery, GROUP};
use kube::Resource;

/// Verbs on every child kind: list and watch (observe), get (is there an object of that name
/// the resource does not control, before creating one), patch (server-side apply), create
/// (Kubernetes authorizes a server-side apply that creates an object as `create` as well as
/// `patch`), delete (prune).
pub const CHILD_VERBS: [&str; 6] = ["create", "delete", "get", "list", "patch", "watch"];

/// One RBAC rule.
#[derive(Serialize, Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// API groups (`""` is the core group).
    pub api_groups: Vec<String>,
    /// Resources (`celeries/status` for a subresource).
    pub resources: Vec<String>,
    /// Verbs.
    pub verbs: Vec<String>,
}

fn rule(group: &str, resource: &str, verbs: &[&str]) -> Rule {
    Rule {
        api_groups: vec![group.into()],
        resources: vec![resource.into()],
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
    }
}

/// Permissions in the namespaces whose Celery resources the operator manages (cluster-wide
/// when it watches all namespaces).
pub fn watched_namespaces() -> Vec<Rule> {
    let plural = Celery::plural(&());
    let mut rules = vec![
        // get: a scaler loop checks whether its resource still exists.
        rule(GROUP, &plural, &["get", "list", "watch"]),
        rule(GROUP, &format!("{plural}/status"), &["patch"]),
        // Children point to their resource with `blockOwnerDeletion`; clusters that enforce
        // owner-reference permissions (the OwnerReferencesPermissionEnforcement admission
        // plugin) require `update` on the owner's finalizers to set it.
        rule(GROUP, &format!("{plural}/finalizers"), &["update"]),
        rule("events.k8s.io", "events", &["create"]),
        // The operator's own scaler: the broker URL, and the replicas of the pools it scales.
        rule("", "secrets", &["get"]),
        rule("apps", "deployments/scale", &["get", "patch"]),
        // The event followers: worker pods' deletion cost (an annotation, by name; pods are
        // never read or listed), and evicting a stalled worker's pod when its pool asks.
        rule("", "pods", &["patch"]),
        rule("", "pods/eviction", &["create"]),
    ];
    for kind in ChildKind::ALL {
        // The same resource in every version the operator may talk to: RBAC rules name
        // groups, not versions.
        let ar = kind.api_resource();
        rules.push(rule(&ar.group, &ar.plural, &CHILD_VERBS));
    }
    rules.sort();
    rules
}

/// Permissions in the operator's own namespace: plugin ConfigMaps (read and watched, and
/// Events about them), the pull secrets of plugins in registries, and the leader-election
/// Lease.
pub fn operator_namespace() -> Vec<Rule> {
    vec![
        rule("", "configmaps", &["list", "watch"]),
        rule("", "secrets", &["get"]),
        rule("events.k8s.io", "events", &["create"]),
        rule(
            "coordination.k8s.io",
            "leases",
            &["get", "create", "update"],
        ),
    ]
}
