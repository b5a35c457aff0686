//! The desired child objects of a Celery resource (stage 2 of reconciliation): pure
//! functions from the spec to Kubernetes objects, tested without a cluster.

mod beat;
mod flower;
mod worker;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, EnvVar, EnvVarSource, PodSpec, PodTemplateSpec, SecretKeySelector,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

use crate::children::Child;
use crate::crd::{Celery, SecretKeyRef};
use crate::names::{MANAGER, beat_name, flower_name, labels, worker_name};

/// Environment variable Celery reads its broker URL from.
pub const BROKER_URL_ENV: &str = "CELERY_BROKER_URL";
/// Environment variable Celery reads its result backend URL from.
pub const RESULT_BACKEND_ENV: &str = "CELERY_RESULT_BACKEND";

/// Every object the Celery resource asks for, in apply order. Assumes a validated spec.
pub fn desired_children(celery: &Celery) -> Vec<Child> {
    let mut children = Vec::new();
    for pool in &celery.spec.workers {
        children.extend(worker::children(celery, pool));
    }
    if let Some(flower) = celery.spec.flower.as_ref().filter(|f| f.enabled) {
        children.extend(flower::children(celery, flower));
    }
    if let Some(beat) = celery.spec.beat.as_ref().filter(|b| b.enabled) {
        children.push(beat::deployment(celery, beat));
    }
    children
}

/// Labels that select one component's pods. They end up in immutable Deployment selectors,
/// so they must never change for an existing component.
fn selector_labels(
    celery: &Celery,
    component: &str,
    pool: Option<&str>,
) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        (labels::NAME.to_string(), "celery".to_string()),
        (labels::INSTANCE.to_string(), celery.name_any()),
        (labels::COMPONENT.to_string(), component.to_string()),
    ]);
    if let Some(pool) = pool {
        l.insert(labels::POOL.into(), pool.into());
    }
    l
}

/// All labels of a component's objects: the selector labels plus bookkeeping ones.
fn object_labels(celery: &Celery, component: &str, pool: Option<&str>) -> BTreeMap<String, String> {
    let mut l = selector_labels(celery, component, pool);
    l.insert(labels::MANAGED_BY.into(), MANAGER.into());
    if let Some(v) = &celery.spec.celery_version {
        l.insert(labels::VERSION.into(), v.clone());
    }
    l
}

/// Metadata of a child: name, namespace, labels and the controller owner reference.
///
/// Outside a cluster (`render` on a file) the resource has no `uid`, so no owner reference
/// can be made; in the operator it always has one.
fn child_meta(celery: &Celery, name: String, component: &str, pool: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: celery.namespace(),
        labels: Some(object_labels(celery, component, pool)),
        owner_references: owner_reference(celery).map(|o| vec![o]),
        ..Default::default()
    }
}

/// Component label of the objects autoscaler plugins return.
pub const AUTOSCALER_COMPONENT: &str = "autoscaler";

/// Makes an object a plugin returned for `pool` one of ours: in the resource's namespace,
/// with our labels and the controller owner reference (so it is pruned and deleted with
/// the resource).
pub fn adopt(celery: &Celery, pool: &str, object: &mut serde_json::Value) {
    let meta = &mut object["metadata"];
    meta["namespace"] = serde_json::json!(celery.namespace());
    let mut labels: BTreeMap<String, String> =
        serde_json::from_value(meta["labels"].take()).unwrap_or_default();
    labels.extend(object_labels(celery, AUTOSCALER_COMPONENT, Some(pool)));
    meta["labels"] = serde_json::json!(labels);
    match owner_reference(celery) {
        Some(owner) => meta["ownerReferences"] = serde_json::json!([owner]),
        None => {
            if let Some(m) = meta.as_object_mut() {
                m.remove("ownerReferences");
            }
        }
    }
}

/// The controller reference every child carries. `blockOwnerDeletion`: a foreground deletion
/// of the resource waits until its children are gone.
fn owner_reference(celery: &Celery) -> Option<OwnerReference> {
    let mut owner = celery.controller_owner_ref(&())?;
    owner.block_owner_deletion = Some(true);
    Some(owner)
}

fn selector(celery: &Celery, component: &str, pool: Option<&str>) -> LabelSelector {
    LabelSelector {
        match_labels: Some(selector_labels(celery, component, pool)),
        ..Default::default()
    }
}

/// A pod template with the settings every Celery pod shares and one container.
fn pod_template(
    celery: &Celery,
    component: &str,
    pool: Option<&str>,
    container: Container,
) -> PodTemplateSpec {
    let spec = &celery.spec;
    let mut labels = spec.pod.labels.clone();
    // Ours win: a user label must not break the Deployment's selector.
    labels.extend(object_labels(celery, component, pool));
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels),
            annotations: non_empty_map(spec.pod.annotations.clone()),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            containers: vec![container],
            image_pull_secrets: non_empty(spec.image_pull_secrets.clone()),
            volumes: non_empty(spec.volumes.clone()),
            node_selector: non_empty_map(spec.pod.node_selector.clone()),
            tolerations: non_empty(spec.pod.tolerations.clone()),
            affinity: spec.pod.affinity.clone(),
            service_account_name: spec.pod.service_account_name.clone(),
            security_context: spec.pod.security_context.clone(),
            ..Default::default()
        }),
    }
}

/// A container running `celery -A <app> <args...>` in exec form, so that SIGTERM reaches
/// the Celery process itself and starts its warm shutdown.
fn celery_container(
    celery: &Celery,
    name: &str,
    args: Vec<String>,
    extra_env: &[EnvVar],
) -> Container {
    let spec = &celery.spec;
    let mut full_args = vec!["-A".to_string(), spec.app.clone()];
    full_args.extend(args);
    let mut env = vec![secret_env(BROKER_URL_ENV, &spec.broker.secret_ref)];
    if let Some(backend) = &spec.result_backend {
        env.push(secret_env(RESULT_BACKEND_ENV, backend));
    }
    env.extend(spec.env.iter().cloned());
    env.extend(extra_env.iter().cloned());
    Container {
        name: name.into(),
        image: Some(spec.image.clone()),
        image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().into()),
        command: Some(vec!["celery".into()]),
        args: Some(full_args),
        env: Some(env),
        env_from: non_empty(spec.env_from.clone()),
        volume_mounts: non_empty(spec.volume_mounts.clone()),
        security_context: spec.pod.container_security_context.clone(),
        ..Default::default()
    }
}

/// An environment variable read from a Secret, so the value never appears in a manifest.
fn secret_env(name: &str, secret: &SecretKeyRef) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.name.clone(),
                key: secret.key.clone(),
                optional: None,
            }),
            ..Default::default()
        }),
    }
}

fn non_empty<T>(v: Vec<T>) -> Option<Vec<T>> {
    (!v.is_empty()).then_some(v)
}

fn non_empty_map<K, V>(m: BTreeMap<K, V>) -> Option<BTreeMap<K, V>> {
    (!m.is_empty()).then_some(m)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::children::ChildKind;
    use crate::crd::CelerySpec;
    use serde_json::Value;

    /// A Celery resource as the API server would return it (with a uid).
    pub(crate) fn celery(spec_yaml: &str) -> Celery {
        let spec: CelerySpec = serde_saphyr::from_str(spec_yaml).expect("test spec parses");
        let mut c = Celery::new("demo", spec);
        c.metadata.namespace = Some("apps".into());
        c.metadata.uid = Some("uid-1".into());
        c.metadata.generation = Some(1);
        c
    }

    pub(crate) const FULL: &str = r#"
app: proj.celery:app
image: example/app:1.0
celeryVersion: "5.4"
broker: {secretRef: {name: broker, key: url}}
resultBackend: {name: backend, key: url}
env: [{name: TZ, value: UTC}]
workers:
  - name: default
    queues: [celery, emails]
    replicas: 3
    concurrency: 4
    pool: threads
    prefetchMultiplier: 1
    timeLimitSeconds: 600
    args: ["--loglevel", "INFO"]
    podDisruptionBudget: {maxUnavailable: 1}
  - name: heavy
    queues: [reports]
    pool: prefork
    autoscaling:
      minReplicas: 1
      maxReplicas: 10
      metrics: [{name: taskQueueLength, target: {type: AverageValue, averageValue: "5"}}]
flower:
  basicAuthSecretRef: {name: flower-auth, key: auth}
  ingress: {host: flower.example.com, tlsSecretName: flower-tls}
beat: {}
"#;

    pub(crate) fn find<'a>(children: &'a [Child], kind: ChildKind, name: &str) -> &'a Value {
        &children
            .iter()
            .find(|c| c.kind == kind && c.name == name)
            .unwrap_or_else(|| panic!("no {kind:?} {name}"))
            .object
    }

    #[test]
    fn full_resource_builds_every_component() {
        let children = desired_children(&celery(FULL));
        let names: Vec<_> = children.iter().map(|c| (c.kind, c.name.as_str())).collect();
        assert_eq!(
            names,
            vec![
                (ChildKind::Deployment, "demo-worker-default"),
                (ChildKind::PodDisruptionBudget, "demo-worker-default"),
                (ChildKind::Deployment, "demo-worker-heavy"),
                (ChildKind::Deployment, "demo-flower"),
                (ChildKind::Service, "demo-flower"),
                (ChildKind::Ingress, "demo-flower"),
                (ChildKind::Deployment, "demo-beat"),
            ]
        );
    }

    #[test]
    fn every_child_has_owner_reference_labels_and_namespace() {
        for child in desired_children(&celery(FULL)) {
            let meta = &child.object["metadata"];
            assert_eq!(meta["namespace"], "apps", "{}", child.name);
            let owners = meta["ownerReferences"]
                .as_array()
                .expect("owner references");
            assert_eq!(owners.len(), 1);
            assert_eq!(owners[0]["uid"], "uid-1");
            assert_eq!(owners[0]["kind"], "Celery");
            assert_eq!(owners[0]["apiVersion"], "celeryproject.org/v1alpha1");
            assert_eq!(owners[0]["controller"], true);
            let l = &meta["labels"];
            assert_eq!(l[labels::INSTANCE], "demo");
            assert_eq!(l[labels::MANAGED_BY], MANAGER);
            assert_eq!(l[labels::VERSION], "5.4");
            assert!(l[labels::COMPONENT].is_string());
        }
    }

    #[test]
    fn without_uid_no_owner_reference_is_invented() {
        let mut c = celery(FULL);
        c.metadata.uid = None;
        for child in desired_children(&c) {
            assert!(child.object["metadata"].get("ownerReferences").is_none());
        }
    }

    #[test]
    fn secrets_are_never_inlined() {
        let children = desired_children(&celery(FULL));
        let text =
            serde_json::to_string(&children.iter().map(|c| &c.object).collect::<Vec<_>>()).unwrap();
        assert!(!text.contains("redis://") && !text.contains("amqp://"));
        for child in children.iter().filter(|c| c.kind == ChildKind::Deployment) {
            let env = child.object["spec"]["template"]["spec"]["containers"][0]["env"]
                .as_array()
                .unwrap();
            let broker = env.iter().find(|e| e["name"] == BROKER_URL_ENV).unwrap();
            assert!(broker.get("value").is_none());
            assert_eq!(broker["valueFrom"]["secretKeyRef"]["name"], "broker");
            assert_eq!(broker["valueFrom"]["secretKeyRef"]["key"], "url");
            let backend = env
                .iter()
                .find(|e| e["name"] == RESULT_BACKEND_ENV)
                .unwrap();
            assert_eq!(backend["valueFrom"]["secretKeyRef"]["name"], "backend");
        }
    }

    #[test]
    fn user_pod_labels_cannot_override_selector_labels() {
        let yaml = FULL.replace(
            "env: [{name: TZ, value: UTC}]",
            "pod: {labels: {app.kubernetes.io/component: evil, team: a}}",
        );
        let children = desired_children(&celery(&yaml));
        let d = find(&children, ChildKind::Deployment, "demo-worker-default");
        let pod_labels = &d["spec"]["template"]["metadata"]["labels"];
        assert_eq!(pod_labels[labels::COMPONENT], "worker");
        assert_eq!(pod_labels["team"], "a");
        for (k, v) in d["spec"]["selector"]["matchLabels"].as_object().unwrap() {
            assert_eq!(&pod_labels[k], v, "selector label {k} must match the pod");
        }
    }

    #[test]
    fn disabled_flower_and_beat_build_nothing() {
        let yaml = FULL
            .replace("beat: {}", "beat: {enabled: false}")
            .replace("flower:\n", "flower:\n  enabled: false\n");
        let children = desired_children(&celery(&yaml));
        assert!(
            children
                .iter()
                .all(|c| !c.name.ends_with("-flower") && !c.name.ends_with("-beat"))
        );
    }
}
