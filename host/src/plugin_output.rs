//! What shapers and autoscaler plugins return is untrusted input. Every object is checked
//! before it becomes a child: JSON of a kind the operator manages, a valid name, metadata of
//! the types Kubernetes defines (so nothing downstream can trip over a label that is a
//! number), and, for autoscaler objects, scaling only the pool's own Deployment with only the
//! resource's broker Secret. Pure: tested with plain values.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde_json::Value;

use crate::children::{Child, ChildKind};
use crate::crd::{Celery, WorkerPool};
use crate::desired;
use crate::names::{self, labels};
use crate::plugin::PluginError;
use crate::text::{self, limit};

/// An answer that is not acceptable, with a clean, bounded message.
fn bad(message: impl AsRef<str>) -> PluginError {
    PluginError::BadOutput(text::clean(message.as_ref(), limit::PLUGIN_MESSAGE))
}

/// The children an autoscaler plugin's answer for `pool` makes: objects of the kinds an
/// autoscaler may return, scaling the pool's Deployment, authenticating with the broker
/// Secret only; made the resource's own (namespace, labels, owner reference).
pub fn autoscaler_children(
    celery: &Celery,
    pool: &WorkerPool,
    texts: &[String],
) -> Result<Vec<Child>, PluginError> {
    let objects = texts
        .iter()
        .map(|t| parse_object(t))
        .collect::<Result<Vec<_>, _>>()?;
    let deployment = names::worker_name(celery, &pool.name);
    let secret = &celery.spec.broker.secret_ref.name;
    for (kind, name, object) in &objects {
        match kind {
            ChildKind::HorizontalPodAutoscaler => check_hpa(name, object, &deployment)?,
            ChildKind::ScaledObject => check_scaled_object(name, object, &deployment, &objects)?,
            ChildKind::TriggerAuthentication => check_trigger_auth(name, object, secret)?,
            other => {
                return Err(bad(format!(
                    "an autoscaler plugin may return HorizontalPodAutoscaler, ScaledObject and \
                     TriggerAuthentication objects, not {other}"
                )));
            }
        }
    }
    Ok(objects
        .into_iter()
        .map(|(kind, name, mut object)| {
            desired::adopt(celery, &pool.name, &mut object);
            Child { kind, name, object }
        })
        .collect())
}

/// One object of a shaper's answer.
#[derive(Debug, PartialEq)]
pub enum ShapedChild {
    /// The object given at this index, unchanged.
    Given(usize),
    /// A changed object: checked, with the identity the operator gave it restored.
    Changed(Child),
}

/// What a shaper's answer makes of the objects it was given (same kind and name), changed or
/// not. `sent[i]` is the text `given[i]` was sent as: an answer byte for byte the same is
/// that object, neither parsed nor copied again (most shapers change a few objects, if any);
/// [`take_shaped`] makes the children.
pub fn shaped_children(
    given: &[Child],
    sent: &[String],
    texts: &[String],
) -> Result<Vec<ShapedChild>, PluginError> {
    texts
        .iter()
        .map(|text| {
            if let Some(unchanged) = sent.iter().position(|s| s == text) {
                return Ok(ShapedChild::Given(unchanged));
            }
            let (kind, name, mut object) = parse_object(text)?;
            let original = given
                .iter()
                .find(|c| c.kind == kind && c.name == name)
                .ok_or_else(|| {
                    bad(format!(
                        "a shaper may change or drop objects but not add or rename them: \
                         {kind} {name} was not in its input"
                    ))
                })?;
            restore_identity(&original.object, &mut object);
            Ok(ShapedChild::Changed(Child { kind, name, object }))
        })
        .collect()
}

/// The children of a shaper's answer: the unchanged ones moved out of `given` (copied only
/// when the answer repeats one), the changed ones as they are.
pub fn take_shaped(given: Vec<Child>, answer: Vec<ShapedChild>) -> Vec<Child> {
    let mut uses = vec![0usize; given.len()];
    for shaped in &answer {
        if let ShapedChild::Given(i) = shaped {
            uses[*i] += 1;
        }
    }
    let mut given: Vec<Option<Child>> = given.into_iter().map(Some).collect();
    answer
        .into_iter()
        .map(|shaped| match shaped {
            ShapedChild::Changed(child) => child,
            ShapedChild::Given(i) => {
                uses[i] -= 1;
                let child = if uses[i] == 0 {
                    given[i].take()
                } else {
                    given[i].clone()
                };
                child.expect("each given child is taken at its last use")
            }
        })
        .collect()
}

/// Parses one object: JSON, a kind the operator manages, a valid name, well formed.
fn parse_object(text: &str) -> Result<(ChildKind, String, Value), PluginError> {
    let object: Value = serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let field = |path: &[&str]| {
        path.iter()
            .try_fold(&object, |v, k| v.get(k))
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("an object has no {} string", path.join("."))))
    };
    let api_version = field(&["apiVersion"])?;
    let kind_name = field(&["kind"])?;
    let name = field(&["metadata", "name"])?.to_string();
    let kind = ChildKind::of(api_version, kind_name).ok_or_else(|| {
        bad(format!(
            "{api_version} {kind_name} is not a kind the operator manages"
        ))
    })?;
    if !is_dns_subdomain(&name) {
        return Err(bad(format!(
            "{kind} {name:?} is not a valid name (lowercase letters, digits, '-' and '.', at \
             most 253)"
        )));
    }
    well_formed(kind, &name, &object)?;
    Ok((kind, name, object))
}

/// A Kubernetes object name: a DNS-1123 subdomain.
fn is_dns_subdomain(name: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|part| {
            part.starts_with(alnum)
                && part.ends_with(alnum)
                && part.chars().all(|c| alnum(c) || c == '-')
        })
}

/// The object's metadata has the types Kubernetes defines (labels a map of strings, a
/// timestamp a time, ...): everything the operator itself reads or writes of a child. The
/// rest of the object is the API server's to validate (a wrong field there is a failed
/// apply, reported like any other).
fn well_formed(kind: ChildKind, name: &str, object: &Value) -> Result<(), PluginError> {
    ObjectMeta::deserialize(&object["metadata"])
        .map(drop)
        .map_err(|e| bad(format!("{kind} {name} has invalid metadata: {e}")))
}

fn check_hpa(name: &str, object: &Value, deployment: &str) -> Result<(), PluginError> {
    let target = &object["spec"]["scaleTargetRef"];
    let ok = target["apiVersion"] == "apps/v1"
        && target["kind"] == "Deployment"
        && target["name"] == deployment;
    if !ok {
        return Err(bad(format!(
            "HorizontalPodAutoscaler {name} must scale the pool's Deployment apps/v1 \
             Deployment {deployment}, not {target}"
        )));
    }
    Ok(())
}

fn check_scaled_object(
    name: &str,
    object: &Value,
    deployment: &str,
    all: &[(ChildKind, String, Value)],
) -> Result<(), PluginError> {
    let target = &object["spec"]["scaleTargetRef"];
    let kind_ok = target["kind"].is_null() || target["kind"] == "Deployment";
    let version_ok = target["apiVersion"].is_null() || target["apiVersion"] == "apps/v1";
    if !(kind_ok && version_ok && target["name"] == deployment) {
        return Err(bad(format!(
            "ScaledObject {name} must scale the pool's Deployment {deployment}, not {target}"
        )));
    }
    // KEDA creates an HPA named keda-hpa-<name> unless told otherwise; another name could
    // be one that exists.
    let hpa = &object["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["name"];
    if !hpa.is_null() && *hpa != format!("keda-hpa-{name}").as_str() {
        return Err(bad(format!(
            "ScaledObject {name} may not name its HorizontalPodAutoscaler ({hpa})"
        )));
    }
    let auths: Vec<&str> = all
        .iter()
        .filter(|(k, _, _)| *k == ChildKind::TriggerAuthentication)
        .map(|(_, n, _)| n.as_str())
        .collect();
    for trigger in object["spec"]["triggers"].as_array().into_iter().flatten() {
        let auth = &trigger["authenticationRef"];
        if auth.is_null() {
            continue;
        }
        let ok = (auth["kind"].is_null() || auth["kind"] == "TriggerAuthentication")
            && auth["name"].as_str().is_some_and(|n| auths.contains(&n));
        if !ok {
            return Err(bad(format!(
                "ScaledObject {name} may authenticate only with a TriggerAuthentication the \
                 same plugin returns, not {auth}"
            )));
        }
    }
    Ok(())
}

fn check_trigger_auth(name: &str, object: &Value, secret: &str) -> Result<(), PluginError> {
    let spec = object["spec"].as_object();
    if let Some(other) = spec
        .into_iter()
        .flat_map(|s| s.keys())
        .find(|k| *k != "secretTargetRef")
    {
        return Err(bad(format!(
            "TriggerAuthentication {name} may take credentials only from the broker Secret \
             (secretTargetRef), not {other}"
        )));
    }
    for r in object["spec"]["secretTargetRef"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if r["name"] != secret {
            return Err(bad(format!(
                "TriggerAuthentication {name} may read only the resource's broker Secret \
                 {secret}, not {}",
                r["name"]
            )));
        }
    }
    Ok(())
}

/// A shaper cannot move an object to another namespace, disown it, or break the labels the
/// operator selects and prunes by: those are put back as they were.
fn restore_identity(original: &Value, shaped: &mut Value) {
    let meta = &original["metadata"];
    let Some(shaped_meta) = shaped.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    for key in ["namespace", "ownerReferences"] {
        match meta.get(key) {
            Some(v) => shaped_meta.insert(key.into(), v.clone()),
            None => shaped_meta.remove(key),
        };
    }
    let ours = [
        labels::NAME,
        labels::INSTANCE,
        labels::COMPONENT,
        labels::MANAGED_BY,
        labels::POOL,
    ]
    .into_iter()
    .filter_map(|key| Some((key, meta["labels"].get(key)?.clone())));
    let shaped_labels = shaped_meta
        .entry("labels")
        .or_insert_with(|| Value::Object(Default::default()));
    if !shaped_labels.is_object() {
        *shaped_labels = Value::Object(Default::default());
    }
    if let Some(l) = shaped_labels.as_object_mut() {
        for (key, value) in ours {
            l.insert(key.into(), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::CelerySpec;
    use proptest::prelude::*;
    use serde_json::json;

    fn celery() -> Celery {
        let spec: CelerySpec = serde_json::from_value(json!({
            "app": "shop", "image": "shop:1",
            "broker": {"type": "redis", "secretRef": {"name": "broker", "key": "url"}},
            "workers": [{"name": "jobs", "autoscaling": {"minReplicas": 1, "maxReplicas": 5,
                "metrics": [{"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}]}}]
        }))
        .unwrap();
        let mut celery = Celery::new("shop", spec);
        celery.metadata.namespace = Some("shop".into());
        celery.metadata.uid = Some("uid-1".into());
        celery
    }

    /// Any JSON value, a few levels deep; keys drawn from those Kubernetes objects use, so
    /// that wrong types land where the operator looks.
    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(|f| json!(f)),
            "\\PC{0,12}".prop_map(Value::from),
            Just(json!("shop-worker-jobs")),
            Just(json!("broker")),
        ];
        let key = prop_oneof![
            Just("metadata"),
            Just("name"),
            Just("labels"),
            Just("annotations"),
            Just("namespace"),
            Just("ownerReferences"),
            Just("creationTimestamp"),
            Just("spec"),
            Just("scaleTargetRef"),
            Just("kind"),
            Just("apiVersion"),
            Just("secretTargetRef"),
            Just("triggers"),
            Just("authenticationRef"),
            Just("advanced"),
            Just("x"),
        ]
        .prop_map(String::from);
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(key.clone(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Something like an object a plugin returns: a known or unknown kind, a name, and
    /// metadata and spec of any shape.
    fn plugin_object() -> impl Strategy<Value = String> {
        let kind = prop_oneof![
            Just(("autoscaling/v2", "HorizontalPodAutoscaler")),
            Just(("keda.sh/v1alpha1", "ScaledObject")),
            Just(("keda.sh/v1alpha1", "TriggerAuthentication")),
            Just(("apps/v1", "Deployment")),
            Just(("v1", "Service")),
            Just(("policy/v1", "PodDisruptionBudget")),
            Just(("v1", "ConfigMap")),
        ];
        let name = prop_oneof![
            Just(json!("shop-worker-jobs")),
            Just(json!("shop-flower")),
            "[a-z]{1,8}".prop_map(Value::from),
            json_value(),
        ];
        let random = (kind, name, json_value(), json_value(), any::<bool>()).prop_map(
            |((api_version, kind), name, mut metadata, spec, raw)| {
                if raw {
                    return spec.to_string();
                }
                if let Some(m) = metadata.as_object_mut() {
                    m.insert("name".into(), name);
                }
                json!({"apiVersion": api_version, "kind": kind, "metadata": metadata, "spec": spec})
                    .to_string()
            },
        );
        // Good objects with random labels and annotations: the accepted path is taken too.
        let good = (
            prop::collection::btree_map("[a-z]{1,6}", "[a-z0-9]{0,6}", 0..3),
            prop::collection::btree_map("[a-z]{1,6}", "\\PC{0,12}", 0..3),
            prop_oneof![Just("shop-worker-jobs"), Just("shop-flower")],
        )
            .prop_map(|(labels, annotations, name)| {
                json!({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                       "metadata": {"name": name, "labels": labels, "annotations": annotations},
                       "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                                                   "name": "shop-worker-jobs"},
                                "maxReplicas": 3}})
                .to_string()
            });
        prop_oneof![3 => random, 1 => good]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// No autoscaler answer panics; an accepted one is a valid object of ours.
        #[test]
        fn no_autoscaler_answer_panics(texts in prop::collection::vec(plugin_object(), 0..4)) {
            let celery = celery();
            let pool = &celery.spec.workers[0];
            if let Ok(children) = autoscaler_children(&celery, pool, &texts) {
                for child in children {
                    prop_assert!(child.to_dynamic(&child.kind.api_resource()).is_ok());
                    prop_assert!(!crate::children::drifted(&child.object, &child.object));
                    prop_assert_eq!(&child.object["metadata"]["namespace"], "shop");
                }
            }
        }

        /// No shaper answer panics; an accepted one keeps the identity of what it was given.
        #[test]
        fn no_shaper_answer_panics(texts in prop::collection::vec(plugin_object(), 0..4)) {
            let given = desired::desired_children(&celery());
            let sent: Vec<String> = given.iter().map(|c| c.object.to_string()).collect();
            if let Ok(shaped) = shaped_children(&given, &sent, &texts) {
                let children = take_shaped(given.clone(), shaped);
                for child in children {
                    prop_assert!(child.to_dynamic(&child.kind.api_resource()).is_ok());
                    let original = given.iter().find(|g| g.kind == child.kind && g.name == child.name).unwrap();
                    prop_assert_eq!(&child.object["metadata"]["ownerReferences"], &original.object["metadata"]["ownerReferences"]);
                    prop_assert_eq!(
                        &child.object["metadata"]["labels"][labels::MANAGED_BY],
                        &original.object["metadata"]["labels"][labels::MANAGED_BY]
                    );
                }
            }
        }
    }

    #[test]
    fn a_good_autoscaler_object_becomes_ours() {
        let celery = celery();
        let hpa = json!({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                         "metadata": {"name": "shop-worker-jobs", "labels": {"team": "a"}},
                         "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                                                     "name": "shop-worker-jobs"}, "maxReplicas": 3}});
        let children =
            autoscaler_children(&celery, &celery.spec.workers[0], &[hpa.to_string()]).unwrap();
        let meta = &children[0].object["metadata"];
        assert_eq!(meta["namespace"], "shop");
        assert_eq!(meta["labels"]["team"], "a");
        assert_eq!(meta["labels"][labels::POOL], "jobs");
        assert_eq!(meta["ownerReferences"][0]["uid"], "uid-1");
    }

    #[test]
    fn broken_metadata_is_refused_with_a_clean_message() {
        let celery = celery();
        let pool = &celery.spec.workers[0];
        for metadata in [
            json!({"name": "shop-worker-jobs", "labels": "app=evil"}),
            json!({"name": "shop-worker-jobs", "annotations": 42}),
            json!({"name": "shop-worker-jobs", "labels": {"a": 1}}),
            json!({"name": "shop-worker-jobs", "creationTimestamp": "yesterday"}),
            json!({"name": "Shop\u{1b}[31m"}),
            json!("a string"),
        ] {
            let hpa = json!({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                             "metadata": metadata,
                             "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "shop-worker-jobs"},
                                      "maxReplicas": 3}});
            let err = autoscaler_children(&celery, pool, &[hpa.to_string()]).unwrap_err();
            let message = err.to_string();
            assert!(matches!(err, PluginError::BadOutput(_)), "{message}");
            assert!(!message.chars().any(char::is_control), "{message:?}");
        }
    }

    /// Objects a shaper hands back unchanged are the children it was given; a changed one is
    /// parsed, checked and keeps the identity the operator gave it.
    #[test]
    fn a_shaper_answer_keeps_unchanged_children_and_parses_changed_ones() {
        let mut celery = celery();
        let mut second = celery.spec.workers[0].clone();
        second.name = "mail".into();
        celery.spec.workers.push(second);
        let given = desired::desired_children(&celery);
        let sent: Vec<String> = given.iter().map(|c| c.object.to_string()).collect();
        let shaped = shaped_children(&given, &sent, &sent).unwrap();
        assert_eq!(shaped, [ShapedChild::Given(0), ShapedChild::Given(1)]);
        assert_eq!(take_shaped(given.clone(), shaped), given);

        let mut changed = given[0].object.clone();
        changed["metadata"]["labels"]["team"] = json!("a");
        changed["metadata"]["ownerReferences"] = json!([]);
        // The first object changed, the second twice, the rest dropped.
        let texts = [changed.to_string(), sent[1].clone(), sent[1].clone()];
        let children = take_shaped(
            given.clone(),
            shaped_children(&given, &sent, &texts).unwrap(),
        );
        assert_eq!(children[0].object["metadata"]["labels"]["team"], "a");
        assert_eq!(
            children[0].object["metadata"]["ownerReferences"],
            given[0].object["metadata"]["ownerReferences"]
        );
        assert_eq!(children[1..], [given[1].clone(), given[1].clone()]);

        assert!(shaped_children(&given, &sent, &["{not json".into()]).is_err());
    }

    #[test]
    fn names_are_dns_subdomains() {
        for good in ["a", "shop-worker-jobs", "a.b-c.d", &"a".repeat(253)] {
            assert!(is_dns_subdomain(good), "{good}");
        }
        for bad in [
            "",
            "A",
            "-a",
            "a-",
            "a..b",
            "a_b",
            "a b",
            &"a".repeat(254),
            "é",
        ] {
            assert!(!is_dns_subdomain(bad), "{bad}");
        }
    }
}
