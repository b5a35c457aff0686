//! The kinds the server serves: a fixed set of built-in ones and whatever
//! CustomResourceDefinitions add. Discovery documents are built from this list.

use std::sync::Arc;

use serde_json::{Value, json};

/// One served resource (one group/version/plural).
#[derive(Clone, Debug, PartialEq)]
pub struct ResourceType {
    /// API group (`""` for the core group).
    pub group: String,
    /// Version served.
    pub version: String,
    /// Plural name used in URLs.
    pub plural: String,
    /// Kind.
    pub kind: String,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
    /// Has a `status` subresource: the main resource ignores status changes, `/status`
    /// ignores everything else.
    pub status: bool,
    /// Has a `scale` subresource (Deployments only; see the crate docs).
    pub scale: bool,
    /// `metadata.generation` is kept and bumped on spec changes.
    pub generation: bool,
    /// The OpenAPI v3 schema of a custom resource, for validation, pruning and list-map keys.
    pub schema: Option<Arc<Value>>,
    /// Short names in discovery (`kubectl get deploy`, `kubectl get cel`).
    pub short_names: Vec<String>,
}

impl ResourceType {
    /// `group/version`, or `version` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

fn builtin(
    group: &str,
    version: &str,
    plural: &str,
    kind: &str,
    namespaced: bool,
    status: bool,
) -> ResourceType {
    ResourceType {
        group: group.into(),
        version: version.into(),
        plural: plural.into(),
        kind: kind.into(),
        namespaced,
        status,
        scale: plural == "deployments",
        generation: status,
        schema: None,
        short_names: builtin_short_names(plural)
            .iter()
            .map(|n| n.to_string())
            .collect(),
    }
}

/// Kubernetes' short names of the built-in kinds served here.
fn builtin_short_names(plural: &str) -> &'static [&'static str] {
    match plural {
        "namespaces" => &["ns"],
        "configmaps" => &["cm"],
        "services" => &["svc"],
        "pods" => &["po"],
        "events" => &["ev"],
        "serviceaccounts" => &["sa"],
        "deployments" => &["deploy"],
        "poddisruptionbudgets" => &["pdb"],
        "ingresses" => &["ing"],
        "horizontalpodautoscalers" => &["hpa"],
        "customresourcedefinitions" => &["crd", "crds"],
        _ => &[],
    }
}

/// The built-in kinds served from the start.
pub fn builtins() -> Vec<ResourceType> {
    vec![
        builtin("", "v1", "namespaces", "Namespace", false, true),
        builtin("", "v1", "configmaps", "ConfigMap", true, false),
        builtin("", "v1", "secrets", "Secret", true, false),
        builtin("", "v1", "services", "Service", true, true),
        builtin("", "v1", "pods", "Pod", true, true),
        builtin("", "v1", "events", "Event", true, false),
        builtin("", "v1", "serviceaccounts", "ServiceAccount", true, false),
        builtin("apps", "v1", "deployments", "Deployment", true, true),
        builtin(
            "policy",
            "v1",
            "poddisruptionbudgets",
            "PodDisruptionBudget",
            true,
            true,
        ),
        builtin(
            "networking.k8s.io",
            "v1",
            "ingresses",
            "Ingress",
            true,
            true,
        ),
        builtin(
            "autoscaling",
            "v2",
            "horizontalpodautoscalers",
            "HorizontalPodAutoscaler",
            true,
            true,
        ),
        builtin("events.k8s.io", "v1", "events", "Event", true, false),
        builtin("coordination.k8s.io", "v1", "leases", "Lease", true, false),
        builtin(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
            true,
        ),
    ]
}

/// The resource types a CustomResourceDefinition serves, one per served version.
pub fn from_crd(crd: &Value) -> Result<Vec<ResourceType>, String> {
    let spec = &crd["spec"];
    let group = spec["group"].as_str().ok_or("spec.group is required")?;
    let plural = spec["names"]["plural"]
        .as_str()
        .ok_or("spec.names.plural is required")?;
    let kind = spec["names"]["kind"]
        .as_str()
        .ok_or("spec.names.kind is required")?;
    let expected = format!("{plural}.{group}");
    if crd["metadata"]["name"].as_str() != Some(expected.as_str()) {
        return Err(format!("metadata.name must be {expected}"));
    }
    let namespaced = match spec["scope"].as_str() {
        Some("Namespaced") => true,
        Some("Cluster") => false,
        _ => return Err("spec.scope must be Namespaced or Cluster".into()),
    };
    let versions = spec["versions"]
        .as_array()
        .filter(|v| !v.is_empty())
        .ok_or("spec.versions is required")?;
    Ok(versions
        .iter()
        .filter(|v| v["served"].as_bool().unwrap_or(false))
        .map(|v| ResourceType {
            group: group.into(),
            version: v["name"].as_str().unwrap_or_default().into(),
            plural: plural.into(),
            kind: kind.into(),
            namespaced,
            status: v["subresources"].get("status").is_some(),
            scale: false,
            generation: true,
            schema: v["schema"].get("openAPIV3Schema").cloned().map(Arc::new),
            short_names: spec["names"]["shortNames"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|n| n.as_str().map(String::from))
                .collect(),
        })
        .collect())
}

/// `/api` or `/apis`, and the group/version resource lists.
pub fn discovery(types: &[ResourceType], path: &[&str]) -> Option<Value> {
    let resource = |t: &ResourceType| {
        let mut verbs = vec![
            "create", "delete", "get", "list", "patch", "update", "watch",
        ];
        if t.plural != "namespaces" {
            verbs.push("deletecollection");
        }
        let mut r = json!({"name": t.plural, "singularName": t.kind.to_lowercase(),
                           "namespaced": t.namespaced, "kind": t.kind, "verbs": verbs});
        if !t.short_names.is_empty() {
            r["shortNames"] = json!(t.short_names);
        }
        r
    };
    let sub = |t: &ResourceType, name: &str, kind: &str| {
        json!({"name": format!("{}/{name}", t.plural), "singularName": "", "namespaced": t.namespaced,
               "kind": kind, "verbs": ["get", "patch", "update"]})
    };
    let list = |group: &str, version: &str| {
        let mut resources = Vec::new();
        for t in types
            .iter()
            .filter(|t| t.group == group && t.version == version)
        {
            resources.push(resource(t));
            if t.status {
                resources.push(sub(t, "status", &t.kind));
            }
            if t.scale {
                resources.push(sub(t, "scale", "Scale"));
            }
        }
        let gv = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        (!resources.is_empty()).then(|| {
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                   "resources": resources})
        })
    };
    match path {
        ["api"] => Some(json!({"kind": "APIVersions", "versions": ["v1"],
                               "serverAddressByClientCIDRs": []})),
        ["api", version] => list("", version),
        ["apis"] => {
            let mut groups: Vec<(String, Vec<String>)> = Vec::new();
            for t in types.iter().filter(|t| !t.group.is_empty()) {
                match groups.iter_mut().find(|(g, _)| *g == t.group) {
                    Some((_, versions)) if !versions.contains(&t.version) => {
                        versions.push(t.version.clone())
                    }
                    Some(_) => {}
                    None => groups.push((t.group.clone(), vec![t.version.clone()])),
                }
            }
            let groups: Vec<Value> = groups
                .into_iter()
                .map(|(g, versions)| {
                    let versions: Vec<Value> = versions
                        .iter()
                        .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                        .collect();
                    json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
                })
                .collect();
            Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
        }
        ["apis", group, version] => list(group, version),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_lists_short_names() {
        let mut types = builtins();
        let crd = json!({
            "metadata": {"name": "celeries.celeryproject.org"},
            "spec": {"group": "celeryproject.org", "scope": "Namespaced",
                     "names": {"plural": "celeries", "kind": "Celery", "shortNames": ["cel"]},
                     "versions": [{"name": "v1alpha1", "served": true}]},
        });
        types.extend(from_crd(&crd).unwrap());
        let short = |path: &[&str], name: &str| {
            let list = discovery(&types, path).unwrap();
            let r = list["resources"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["name"] == name)
                .unwrap()
                .clone();
            r.get("shortNames").cloned()
        };
        assert_eq!(
            short(&["apis", "apps", "v1"], "deployments"),
            Some(json!(["deploy"]))
        );
        assert_eq!(short(&["api", "v1"], "secrets"), None);
        assert_eq!(
            short(&["apis", "celeryproject.org", "v1alpha1"], "celeries"),
            Some(json!(["cel"]))
        );
    }
}
