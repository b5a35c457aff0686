//! The Kubernetes permissions the operator needs, derived from what the code does: the child
//! kinds it manages and watches, the verbs the apply stage uses, the plugin ConfigMaps and the
//! leader-election Lease. `celery-operator rbac` prints them; the Helm chart's RBAC is checked
//! against that output, and the mocked-API tests check that every request the reconciler sends
//! is allowed by them.

use serde::Serialize;

use crate::children::ChildKind;
use crate::crd::{Celery, GROUP};
use kube::Resource;

/// Verbs of the apply stage on every child kind: list (observe), patch (server-side apply),
/// delete (prune).
pub const CHILD_VERBS: [&str; 3] = ["list", "patch", "delete"];

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
        rule("events.k8s.io", "events", &["create"]),
        // The operator's own scaler: the broker URL, and the replicas of the pools it scales.
        rule("", "secrets", &["get"]),
        rule("apps", "deployments/scale", &["get", "patch"]),
    ];
    for kind in ChildKind::ALL {
        let ar = kind.api_resource();
        let mut verbs = CHILD_VERBS.to_vec();
        if ChildKind::WATCHED.contains(&kind) {
            verbs.push("watch");
        }
        rules.push(rule(&ar.group, &ar.plural, &verbs));
    }
    rules.sort();
    rules
}

/// Permissions in the operator's own namespace: plugin ConfigMaps (read and watched) and the
/// leader-election Lease.
pub fn operator_namespace() -> Vec<Rule> {
    vec![
        rule("", "configmaps", &["list", "watch"]),
        rule(
            "coordination.k8s.io",
            "leases",
            &["get", "create", "update"],
        ),
    ]
}
