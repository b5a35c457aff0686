//! Tier 2: the reconciler against a mocked Kubernetes API (the tower-test pattern of
//! kube-rs' controller-rs). The mock keeps the objects it is sent, so several reconciles in a
//! row see the results of the previous ones, and it records every request so the tests can
//! assert exactly what was sent.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use serde_json::{Value, json};

use celery_operator::apply::ServedKinds;
use celery_operator::children::Served;
use celery_operator::crd::Celery;
use celery_operator::metrics::Metrics;
use celery_operator::plugin::{Compiler, Limits, Registry, Runtime};
use celery_operator::rbac;
use celery_operator::reconcile::{Context, reconcile};
use celery_operator::shape::{PluginConfig, Plugins};

/// One request the operator sent.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Sent {
    method: Method,
    path: String,
    /// A server-side apply that created its object: Kubernetes authorizes it as `create`
    /// as well as `patch`.
    creates: bool,
}

#[derive(Default)]
struct Store {
    /// Objects by collection path (`/apis/apps/v1/namespaces/apps/deployments`) and name.
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    sent: Vec<Sent>,
    /// The last body sent to each path.
    bodies: BTreeMap<String, Value>,
    /// Collection paths whose writes answer 403 Forbidden.
    forbidden: Vec<String>,
    next_version: u64,
}

/// A fake API server on a tower-test mock service.
#[derive(Clone)]
struct FakeApi(Arc<Mutex<Store>>);

const CELERIES: &str = "/apis/celeryproject.org/v1alpha1/namespaces/apps/celeries";
const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/apps/deployments";
const SERVICES: &str = "/api/v1/namespaces/apps/services";
const INGRESSES: &str = "/apis/networking.k8s.io/v1/namespaces/apps/ingresses";
const PDBS: &str = "/apis/policy/v1/namespaces/apps/poddisruptionbudgets";
const HPAS: &str = "/apis/autoscaling/v2/namespaces/apps/horizontalpodautoscalers";
const SCALED_OBJECTS: &str = "/apis/keda.sh/v1alpha1/namespaces/apps/scaledobjects";
const TRIGGER_AUTHS: &str = "/apis/keda.sh/v1alpha1/namespaces/apps/triggerauthentications";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/apps/events";
const SECRETS: &str = "/api/v1/namespaces/apps/secrets";
const LISTS: [&str; 7] = [
    DEPLOYMENTS,
    SERVICES,
    INGRESSES,
    PDBS,
    HPAS,
    SCALED_OBJECTS,
    TRIGGER_AUTHS,
];

impl FakeApi {
    fn start() -> (FakeApi, Client) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let fake = FakeApi(Arc::default());
        let server = fake.clone();
        tokio::spawn(async move {
            while let Some((request, respond)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let body = body.collect_bytes().await.unwrap();
                let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let (status, answer) = server.answer(&parts.method, parts.uri.path(), body);
                respond.send_response(
                    Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                        .unwrap(),
                );
            }
        });
        (fake, Client::new(service, "apps"))
    }

    fn answer(&self, method: &Method, path: &str, body: Value) -> (StatusCode, Value) {
        let mut store = self.0.lock().unwrap();
        let (collection, name, sub) = split(path);
        let creates = *method == Method::PATCH
            && sub.is_none()
            && name.as_ref().is_some_and(|n| {
                !store
                    .objects
                    .get(&collection)
                    .is_some_and(|o| o.contains_key(n))
            });
        store.sent.push(Sent {
            method: method.clone(),
            path: path.into(),
            creates,
        });
        store.bodies.insert(path.into(), body.clone());
        store.next_version += 1;
        let version = store.next_version.to_string();
        if *method != Method::GET && store.forbidden.contains(&collection) {
            return status_body(StatusCode::FORBIDDEN, "Forbidden", "denied by the test");
        }
        let objects = store.objects.entry(collection.clone()).or_default();
        match (method.as_str(), name, sub) {
            ("GET", None, _) => (
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": version},
                       "items": objects.values().cloned().collect::<Vec<_>>()}),
            ),
            ("PATCH", Some(name), None) => {
                let mut obj = body;
                let old = objects.get(&name).cloned();
                let generation = match &old {
                    Some(o) if o["spec"] == obj["spec"] => {
                        o["metadata"]["generation"].as_i64().unwrap()
                    }
                    Some(o) => o["metadata"]["generation"].as_i64().unwrap() + 1,
                    None => 1,
                };
                obj["metadata"]["uid"] = json!(format!("uid-{name}"));
                obj["metadata"]["generation"] = json!(generation);
                obj["metadata"]["resourceVersion"] = json!(version);
                if let Some(status) = old.as_ref().and_then(|o| o.get("status")) {
                    obj["status"] = status.clone();
                }
                // Defaulting, as the API server does: an unset replica count is 1 on
                // create and otherwise keeps its value (another manager owns it).
                if collection == DEPLOYMENTS && obj["spec"].get("replicas").is_none() {
                    obj["spec"]["replicas"] = old
                        .as_ref()
                        .map_or(json!(1), |o| o["spec"]["replicas"].clone());
                }
                objects.insert(name, obj.clone());
                (StatusCode::OK, obj)
            }
            ("GET", Some(name), None) => match objects.get(&name) {
                Some(obj) => (StatusCode::OK, obj.clone()),
                None => status_body(StatusCode::NOT_FOUND, "NotFound", "no such object"),
            },
            ("GET" | "PATCH", Some(name), Some("scale")) => match objects.get_mut(&name) {
                Some(obj) => {
                    if let Some(replicas) = body.pointer("/spec/replicas") {
                        obj["spec"]["replicas"] = replicas.clone();
                    }
                    let replicas = obj["spec"]["replicas"].clone();
                    (
                        StatusCode::OK,
                        json!({"apiVersion": "autoscaling/v1", "kind": "Scale",
                               "metadata": {"name": name, "namespace": "apps"},
                               "spec": {"replicas": replicas}, "status": {"replicas": replicas}}),
                    )
                }
                None => status_body(StatusCode::NOT_FOUND, "NotFound", "no such object"),
            },
            ("PATCH", Some(name), Some("status")) => match objects.get_mut(&name) {
                Some(obj) => {
                    // Server-side apply by two kinds of field manager, as the operator uses
                    // it: the reconciler owns everything but `scaling`; each scaler loop owns
                    // its pool's `scaling` entry (a list map keyed by `pool`).
                    let mut status = body["status"].clone();
                    let mut scaling = obj["status"]["scaling"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    if let Some(entries) = status.get("scaling").and_then(Value::as_array) {
                        for entry in entries {
                            scaling.retain(|e| e["pool"] != entry["pool"]);
                            scaling.push(entry.clone());
                        }
                    }
                    if status
                        .as_object()
                        .is_some_and(|o| o.keys().all(|k| k == "scaling"))
                    {
                        status = obj["status"].clone();
                    }
                    if scaling.is_empty() {
                        status.as_object_mut().map(|o| o.remove("scaling"));
                    } else {
                        status["scaling"] = json!(scaling);
                    }
                    obj["status"] = status;
                    (StatusCode::OK, obj.clone())
                }
                None => status_body(StatusCode::NOT_FOUND, "NotFound", "no such object"),
            },
            ("DELETE", Some(name), None) => match objects.remove(&name) {
                Some(_) => status_body(StatusCode::OK, "", ""),
                None => status_body(StatusCode::NOT_FOUND, "NotFound", "no such object"),
            },
            ("POST", None, None) => {
                let name = body["metadata"]["name"]
                    .as_str()
                    .unwrap_or("event")
                    .to_string();
                objects.insert(name, body.clone());
                (StatusCode::CREATED, body)
            }
            other => panic!("the fake API does not expect {other:?} on {path}"),
        }
    }

    fn put(&self, collection: &str, obj: Value) {
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        self.0
            .lock()
            .unwrap()
            .objects
            .entry(collection.into())
            .or_default()
            .insert(name, obj);
    }

    fn get(&self, collection: &str, name: &str) -> Option<Value> {
        self.0
            .lock()
            .unwrap()
            .objects
            .get(collection)?
            .get(name)
            .cloned()
    }

    fn names(&self, collection: &str) -> Vec<String> {
        let store = self.0.lock().unwrap();
        store
            .objects
            .get(collection)
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn celery(&self) -> Arc<Celery> {
        Arc::new(serde_json::from_value(self.get(CELERIES, "demo").unwrap()).unwrap())
    }

    /// Takes the requests sent since the last call.
    fn take_sent(&self) -> Vec<Sent> {
        std::mem::take(&mut self.0.lock().unwrap().sent)
    }

    fn forbid(&self, collection: &str) {
        self.0.lock().unwrap().forbidden.push(collection.into());
    }

    /// Marks every Deployment rolled out and ready, as the Deployment controller would.
    fn make_deployments_ready(&self) {
        let mut store = self.0.lock().unwrap();
        for d in store
            .objects
            .entry(DEPLOYMENTS.into())
            .or_default()
            .values_mut()
        {
            let replicas = d["spec"]["replicas"].as_i64().unwrap_or(1);
            d["status"] = json!({"observedGeneration": d["metadata"]["generation"], "replicas": replicas,
                                 "updatedReplicas": replicas, "readyReplicas": replicas});
        }
    }
}

fn split(path: &str) -> (String, Option<String>, Option<&str>) {
    let parts: Vec<&str> = path.split('/').collect();
    let ns = parts
        .iter()
        .position(|p| *p == "namespaces")
        .expect("namespaced path");
    let collection = parts[..ns + 3].join("/");
    (
        collection,
        parts.get(ns + 3).map(|s| s.to_string()),
        parts.get(ns + 4).copied(),
    )
}

fn status_body(code: StatusCode, reason: &str, message: &str) -> (StatusCode, Value) {
    let status = if code.is_success() {
        "Success"
    } else {
        "Failure"
    };
    (
        code,
        json!({"apiVersion": "v1", "kind": "Status", "status": status, "reason": reason,
               "message": message, "code": code.as_u16()}),
    )
}

const SPEC: &str = r#"
app: proj.celery:app
image: example/app:1.0
broker: {secretRef: {name: broker, key: url}}
workers:
  - name: default
    queues: [celery]
    replicas: 2
    podDisruptionBudget: {maxUnavailable: 1}
  - name: heavy
    queues: [reports]
    autoscaling:
      minReplicas: 1
      maxReplicas: 5
      metrics: [{name: cpu, target: {type: Utilization, averageUtilization: 70}}]
flower: {}
beat: {}
"#;

fn celery_object(spec_yaml: &str, generation: i64) -> Value {
    let spec: Value = serde_saphyr::from_str(spec_yaml).unwrap();
    json!({
        "apiVersion": "celeryproject.org/v1alpha1", "kind": "Celery",
        "metadata": {"name": "demo", "namespace": "apps", "uid": "celery-uid", "generation": generation},
        "spec": spec,
    })
}

/// The built-in plugins, compiled once for all tests.
fn plugins() -> Arc<Plugins> {
    static REGISTRY: LazyLock<Arc<Registry>> = LazyLock::new(|| {
        // A generous deadline: an unoptimised build on a loaded machine.
        let limits = Limits {
            deadline: Duration::from_secs(1),
            ..Limits::default()
        };
        Arc::new(
            Registry::with_builtins(Arc::new(Runtime::new(limits, Compiler::InProcess))).unwrap(),
        )
    });
    Arc::new(Plugins::new(REGISTRY.clone(), PluginConfig::default()))
}

async fn setup(spec_yaml: &str) -> (FakeApi, Arc<Context>) {
    let (fake, client) = FakeApi::start();
    fake.put(CELERIES, celery_object(spec_yaml, 1));
    let mut ctx = Context::new(client, Arc::new(Metrics::default()), plugins(), None);
    // The mock answers no discovery: it serves the newest version of every kind.
    ctx.served = ServedKinds::known(Served::newest());
    (fake, Arc::new(ctx))
}

/// Reconciles the stored Celery resource once, as the controller would after a change.
async fn reconcile_once(fake: &FakeApi, ctx: &Arc<Context>) -> Result<Action, String> {
    tokio::time::timeout(
        Duration::from_secs(10),
        reconcile(fake.celery(), ctx.clone()),
    )
    .await
    .expect("reconcile finishes")
    .map_err(|e| e.to_string())
}

fn writes(sent: &[Sent]) -> Vec<(Method, String)> {
    sent.iter()
        .filter(|s| s.method != Method::GET)
        .map(|s| (s.method.clone(), s.path.clone()))
        .collect()
}

fn lists() -> Vec<Sent> {
    LISTS
        .iter()
        .map(|p| Sent {
            method: Method::GET,
            path: p.to_string(),
            creates: false,
        })
        .collect()
}

fn patch(collection: &str, name: &str) -> (Method, String) {
    (Method::PATCH, format!("{collection}/{name}"))
}

fn condition(fake: &FakeApi, type_: &str) -> Value {
    let c = fake.get(CELERIES, "demo").unwrap();
    c["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap()
        .clone()
}

/// Brings a fresh resource to the steady state: created, rolled out, ready.
async fn converge(fake: &FakeApi, ctx: &Arc<Context>) {
    reconcile_once(fake, ctx).await.unwrap();
    fake.make_deployments_ready();
    reconcile_once(fake, ctx).await.unwrap();
    fake.take_sent();
}

#[tokio::test]
async fn create_applies_every_child_then_status_and_one_event() {
    let (fake, ctx) = setup(SPEC).await;
    let action = reconcile_once(&fake, &ctx).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    let sent = fake.take_sent();
    assert_eq!(sent[..7], lists()[..], "the live children are read first");
    assert_eq!(
        writes(&sent),
        vec![
            patch(DEPLOYMENTS, "demo-worker-default"),
            patch(PDBS, "demo-worker-default"),
            patch(DEPLOYMENTS, "demo-worker-heavy"),
            patch(DEPLOYMENTS, "demo-flower"),
            patch(SERVICES, "demo-flower"),
            patch(DEPLOYMENTS, "demo-beat"),
            patch(HPAS, "demo-worker-heavy"),
            patch(CELERIES, "demo/status"),
            (Method::POST, EVENTS.into()),
        ]
    );
    println!(
        "create reconcile: {} requests ({} writes)",
        sent.len(),
        writes(&sent).len()
    );
    assert_eq!(condition(&fake, "Ready")["status"], "False");
    assert_eq!(condition(&fake, "Progressing")["status"], "True");
    let status = fake.get(CELERIES, "demo").unwrap()["status"].clone();
    assert_eq!(status["observedGeneration"], 1);
    let heavy = fake.0.lock().unwrap().bodies[&format!("{DEPLOYMENTS}/demo-worker-heavy")].clone();
    assert!(
        heavy["spec"].get("replicas").is_none(),
        "the autoscaler owns replicas"
    );
    let default =
        fake.0.lock().unwrap().bodies[&format!("{DEPLOYMENTS}/demo-worker-default")].clone();
    assert_eq!(default["spec"]["replicas"], 2);
    let event = fake.0.lock().unwrap().objects[EVENTS]
        .values()
        .next()
        .unwrap()
        .clone();
    assert_eq!(event["reason"], "Created");
    assert!(
        event["note"]
            .as_str()
            .unwrap()
            .contains("Deployment/demo-beat")
    );
}

#[tokio::test]
async fn ready_then_noop_reconcile_sends_no_writes() {
    let (fake, ctx) = setup(SPEC).await;
    reconcile_once(&fake, &ctx).await.unwrap();
    fake.take_sent();
    fake.make_deployments_ready();

    reconcile_once(&fake, &ctx).await.unwrap();
    let sent = fake.take_sent();
    assert_eq!(
        writes(&sent),
        vec![
            patch(CELERIES, "demo/status"),
            (Method::POST, EVENTS.into())
        ]
    );
    assert_eq!(condition(&fake, "Ready")["status"], "True");
    assert_eq!(
        fake.get(CELERIES, "demo").unwrap()["status"]["workersReady"],
        "3/3"
    );

    reconcile_once(&fake, &ctx).await.unwrap();
    let sent = fake.take_sent();
    assert_eq!(sent, lists(), "a no-op reconcile only reads");
    println!(
        "no-op reconcile: {} requests ({} writes)",
        sent.len(),
        writes(&sent).len()
    );
    let metrics = ctx.metrics.encode();
    assert!(
        metrics.contains("celery_operator_reconciles_total{result=\"success\"} 3"),
        "{metrics}"
    );
}

#[tokio::test]
async fn changed_pool_updates_only_its_deployment() {
    let (fake, ctx) = setup(SPEC).await;
    converge(&fake, &ctx).await;
    fake.put(
        CELERIES,
        celery_object(
            &SPEC.replace("replicas: 2", "replicas: 2\n    concurrency: 8"),
            2,
        ),
    );

    reconcile_once(&fake, &ctx).await.unwrap();
    let sent = fake.take_sent();
    assert_eq!(
        writes(&sent),
        vec![
            patch(DEPLOYMENTS, "demo-worker-default"),
            patch(CELERIES, "demo/status"),
            (Method::POST, EVENTS.into())
        ]
    );
    let args = fake.get(DEPLOYMENTS, "demo-worker-default").unwrap()["spec"]["template"]["spec"]["containers"][0]["args"].clone();
    assert!(args.as_array().unwrap().contains(&json!("--concurrency")));
    assert_eq!(
        fake.get(CELERIES, "demo").unwrap()["status"]["observedGeneration"],
        2
    );
    assert_eq!(
        condition(&fake, "Progressing")["status"],
        "True",
        "the new generation is rolling out"
    );
}

#[tokio::test]
async fn removed_pool_and_disabled_flower_are_pruned() {
    let (fake, ctx) = setup(SPEC).await;
    converge(&fake, &ctx).await;
    let without = SPEC.replace("  - name: default\n    queues: [celery]\n    replicas: 2\n    podDisruptionBudget: {maxUnavailable: 1}\n", "")
        .replace("flower: {}", "flower: {enabled: false}");
    fake.put(CELERIES, celery_object(&without, 2));

    reconcile_once(&fake, &ctx).await.unwrap();
    let sent = fake.take_sent();
    let mut deletes: Vec<_> = writes(&sent)
        .into_iter()
        .filter(|(m, _)| *m == Method::DELETE)
        .map(|(_, p)| p)
        .collect();
    deletes.sort();
    assert_eq!(
        deletes,
        vec![
            format!("{SERVICES}/demo-flower"),
            format!("{DEPLOYMENTS}/demo-flower"),
            format!("{DEPLOYMENTS}/demo-worker-default"),
            format!("{PDBS}/demo-worker-default"),
        ]
    );
    let applied: Vec<_> = writes(&sent)
        .into_iter()
        .filter(|(m, p)| *m == Method::PATCH && !p.starts_with(CELERIES))
        .collect();
    assert_eq!(
        applied,
        vec![patch(DEPLOYMENTS, "demo-worker-heavy")],
        "without Flower, workers stop sending task events"
    );
    assert_eq!(
        fake.names(DEPLOYMENTS),
        vec!["demo-beat", "demo-worker-heavy"]
    );
}

#[tokio::test]
async fn drifted_or_deleted_child_is_repaired() {
    let (fake, ctx) = setup(SPEC).await;
    converge(&fake, &ctx).await;
    let mut beat = fake.get(DEPLOYMENTS, "demo-beat").unwrap();
    beat["spec"]["replicas"] = json!(3);
    fake.put(DEPLOYMENTS, beat);
    fake.0
        .lock()
        .unwrap()
        .objects
        .get_mut(SERVICES)
        .unwrap()
        .remove("demo-flower");

    reconcile_once(&fake, &ctx).await.unwrap();
    let applied: Vec<_> = writes(&fake.take_sent())
        .into_iter()
        .filter(|(_, p)| !p.starts_with(CELERIES) && !p.starts_with(EVENTS))
        .collect();
    assert_eq!(
        applied,
        vec![
            patch(SERVICES, "demo-flower"),
            patch(DEPLOYMENTS, "demo-beat")
        ]
    );
    assert_eq!(
        fake.get(DEPLOYMENTS, "demo-beat").unwrap()["spec"]["replicas"],
        1
    );
}

#[tokio::test]
async fn invalid_spec_sets_a_condition_and_applies_nothing() {
    let (fake, ctx) = setup(&SPEC.replace("minReplicas: 1", "minReplicas: 9")).await;
    let action = reconcile_once(&fake, &ctx).await.unwrap();
    assert_eq!(action, Action::await_change());
    let sent = fake.take_sent();
    assert_eq!(
        sent.iter()
            .map(|s| (s.method.clone(), s.path.clone()))
            .collect::<Vec<_>>(),
        vec![
            patch(CELERIES, "demo/status"),
            (Method::POST, EVENTS.into())
        ],
        "no child is read, applied or deleted"
    );
    let degraded = condition(&fake, "Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "InvalidSpec");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap()
            .contains("minReplicas must be less than or equal to maxReplicas")
    );
    assert_eq!(condition(&fake, "Ready")["reason"], "InvalidSpec");

    reconcile_once(&fake, &ctx).await.unwrap();
    assert_eq!(
        fake.take_sent(),
        vec![],
        "the same invalid spec is not reported twice"
    );
}

#[tokio::test]
async fn invalid_update_keeps_running_children() {
    let (fake, ctx) = setup(SPEC).await;
    converge(&fake, &ctx).await;
    fake.put(
        CELERIES,
        celery_object(
            &SPEC
                .replace("flower: {}", "flower: {}\n")
                .replace("- name: heavy", "- name: default"),
            2,
        ),
    );
    reconcile_once(&fake, &ctx).await.unwrap();
    assert!(
        writes(&fake.take_sent())
            .iter()
            .all(|(m, _)| *m != Method::DELETE)
    );
    assert_eq!(fake.names(DEPLOYMENTS).len(), 4);
    assert!(
        condition(&fake, "Degraded")["message"]
            .as_str()
            .unwrap()
            .contains("names must be unique")
    );
}

#[tokio::test]
async fn failed_apply_is_degraded_retried_and_prunes_nothing() {
    let (fake, ctx) = setup(SPEC).await;
    converge(&fake, &ctx).await;
    fake.forbid(SERVICES);
    let renamed = SPEC
        .replace("- name: heavy", "- name: bulk")
        .replace("flower: {}", "flower: {port: 8080}");
    fake.put(CELERIES, celery_object(&renamed, 2));

    let err = reconcile_once(&fake, &ctx).await.unwrap_err();
    assert!(err.contains("denied by the test"), "{err}");
    let sent = fake.take_sent();
    assert!(
        writes(&sent).iter().all(|(m, _)| *m != Method::DELETE),
        "no pruning after a failed apply"
    );
    assert!(
        fake.get(DEPLOYMENTS, "demo-worker-heavy").is_some(),
        "the old pool keeps running"
    );
    let degraded = condition(&fake, "Degraded");
    assert_eq!(
        (degraded["status"].as_str(), degraded["reason"].as_str()),
        (Some("True"), Some("ApplyFailed"))
    );
    let metrics = ctx.metrics.encode();
    assert!(
        metrics.contains("celery_operator_reconciles_total{result=\"error\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn children_are_owned_by_the_celery_resource() {
    let (fake, ctx) = setup(SPEC).await;
    reconcile_once(&fake, &ctx).await.unwrap();
    for collection in [DEPLOYMENTS, SERVICES, PDBS] {
        for name in fake.names(collection) {
            let obj = fake.get(collection, &name).unwrap();
            let owner = &obj["metadata"]["ownerReferences"][0];
            assert_eq!(owner["uid"], "celery-uid", "{collection}/{name}");
            assert_eq!(owner["controller"], true);
        }
    }
}

#[tokio::test]
async fn switching_a_pool_from_hpa_to_keda_replaces_its_autoscaler_objects() {
    let (fake, ctx) = setup(SPEC).await;
    converge(&fake, &ctx).await;
    let hpa = fake
        .get(HPAS, "demo-worker-heavy")
        .expect("the default autoscaler made an HPA");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "demo-worker-heavy");
    assert_eq!(hpa["metadata"]["ownerReferences"][0]["uid"], "celery-uid");
    let status = fake.get(CELERIES, "demo").unwrap()["status"].clone();
    let used = &status["plugins"][0];
    assert_eq!(
        (
            used["role"].as_str(),
            used["target"].as_str(),
            used["name"].as_str(),
            used["source"].as_str()
        ),
        (
            Some("autoscaler"),
            Some("pool heavy"),
            Some("hpa"),
            Some("builtin")
        )
    );
    assert!(used["digest"].as_str().unwrap().starts_with("sha256:"));

    let keda = SPEC.replace(
        "      maxReplicas: 5\n",
        "      maxReplicas: 5\n      autoscaler: {name: keda}\n",
    );
    fake.put(CELERIES, celery_object(&keda, 2));
    reconcile_once(&fake, &ctx).await.unwrap();
    let changes: Vec<_> = writes(&fake.take_sent())
        .into_iter()
        .filter(|(_, p)| !p.starts_with(CELERIES) && !p.starts_with(EVENTS))
        .collect();
    assert_eq!(
        changes,
        vec![
            patch(SCALED_OBJECTS, "demo-worker-heavy"),
            (Method::DELETE, format!("{HPAS}/demo-worker-heavy")),
        ]
    );
    let status = fake.get(CELERIES, "demo").unwrap()["status"].clone();
    assert_eq!(status["plugins"][0]["name"], "keda");
}

/// What the RBAC rules derived from the code allow: (API group, resource, verb).
fn allowed_requests() -> std::collections::BTreeSet<(String, String, String)> {
    rbac::watched_namespaces()
        .into_iter()
        .flat_map(|r| {
            let (g, res) = (r.api_groups[0].clone(), r.resources[0].clone());
            r.verbs
                .into_iter()
                .map(move |v| (g.clone(), res.clone(), v))
        })
        .collect()
}

/// The requests the reconciler sends, as RBAC sees them: (API group, resource, verb).
fn rbac_requests(sent: &[Sent]) -> std::collections::BTreeSet<(String, String, String)> {
    sent.iter()
        .flat_map(|s| {
            let parts: Vec<&str> = s.path.trim_start_matches('/').split('/').collect();
            let (group, rest) = match parts[0] {
                "api" => ("", &parts[2..]),
                _ => (parts[1], &parts[3..]),
            };
            // rest: namespaces, <ns>, <resource>[, <name>[, <subresource>]]
            let resource = match rest.get(4) {
                Some(sub) => format!("{}/{sub}", rest[2]),
                None => rest[2].to_string(),
            };
            let verb = match (s.method.as_str(), rest.len()) {
                ("GET", 3) => "list",
                ("GET", _) => "get",
                ("POST", _) => "create",
                ("PUT", _) => "update",
                ("PATCH", _) => "patch",
                ("DELETE", _) => "delete",
                (m, _) => panic!("unexpected method {m}"),
            };
            let request = |verb: &str| (group.to_string(), resource.clone(), verb.to_string());
            let mut verbs = vec![request(verb)];
            if s.creates {
                verbs.push(request("create"));
            }
            verbs
        })
        .collect()
}

#[tokio::test]
async fn rbac_rules_cover_every_request_and_every_child_verb_is_used() {
    let (fake, ctx) = setup(SPEC).await;
    let mut sent = Vec::new();
    converge(&fake, &ctx).await;
    // Everything a resource goes through: create, roll out, switch autoscalers, prune,
    // an invalid spec.
    let (fresh, fresh_ctx) = setup(SPEC).await;
    reconcile_once(&fresh, &fresh_ctx).await.unwrap();
    sent.extend(fresh.take_sent());
    let keda = SPEC
        .replace(
            "      maxReplicas: 5\n",
            "      maxReplicas: 5\n      autoscaler: {name: keda}\n",
        )
        .replace("flower: {}", "flower: {enabled: false}");
    fake.put(CELERIES, celery_object(&keda, 2));
    reconcile_once(&fake, &ctx).await.unwrap();
    fake.put(
        CELERIES,
        celery_object(&SPEC.replace("minReplicas: 1", "minReplicas: 9"), 3),
    );
    reconcile_once(&fake, &ctx).await.unwrap();
    sent.extend(fake.take_sent());

    let allowed = allowed_requests();
    let used = rbac_requests(&sent);
    let uncovered: Vec<_> = used.difference(&allowed).collect();
    assert!(
        uncovered.is_empty(),
        "requests the RBAC rules do not allow: {uncovered:?}"
    );
    // Nothing more: every verb granted on the child kinds is one the reconciler uses (watch
    // comes from the controller's watches, which the mock does not serve; the real control
    // plane's tests prove them).
    for verb in rbac::CHILD_VERBS.into_iter().filter(|v| *v != "watch") {
        assert!(
            used.iter().any(|(_, _, v)| v == verb),
            "{verb} is granted but never used"
        );
    }
    assert!(used.contains(&(
        "celeryproject.org".into(),
        "celeries/status".into(),
        "patch".into()
    )));
    assert!(used.contains(&("events.k8s.io".into(), "events".into(), "create".into())));
}

const QUEUE_SPEC: &str = r#"
app: proj
image: img
broker: {type: redis, secretRef: {name: broker, key: url}}
workers:
  - name: jobs
    queues: [jobs]
    autoscaling:
      minReplicas: 1
      maxReplicas: 10
      pollIntervalSeconds: 1
      scaler: {name: queue-length, settings: {scaleDownStabilizationSeconds: 3}}
      metrics: [{name: taskQueueLength, target: {type: AverageValue, averageValue: "5"}}]
"#;

/// The `status.scaling` entry of the only pool.
fn scaling(fake: &FakeApi) -> Value {
    let celery = fake.get(CELERIES, "demo").unwrap();
    celery["status"]["scaling"][0].clone()
}

/// How many Events with `reason` were recorded.
fn events(fake: &FakeApi, reason: &str) -> usize {
    let store = fake.0.lock().unwrap();
    store.objects.get(EVENTS).map_or(0, |events| {
        events.values().filter(|e| e["reason"] == reason).count()
    })
}

fn replicas(fake: &FakeApi) -> i64 {
    fake.get(DEPLOYMENTS, "demo-worker-jobs").unwrap()["spec"]["replicas"]
        .as_i64()
        .unwrap()
}

async fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let check = || std::future::ready(ok().then_some(()));
    support::eventually(limit, what, String::new, check).await
}

/// The operator's own scaler end to end on a real Redis: a backlog scales the pool up through
/// the Deployment's scale subresource, an empty queue brings it back to min after the
/// stabilization window, and a stopped broker holds the replicas and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_scales_a_queue_length_pool_from_its_redis_backlog() {
    let redis = support::Redis::start();
    let (fake, ctx) = setup(QUEUE_SPEC).await;
    let url = serde_json::to_value(k8s_openapi::ByteString(redis.url().into_bytes())).unwrap();
    fake.put(SECRETS, json!({"apiVersion": "v1", "kind": "Secret",
                             "metadata": {"name": "broker", "namespace": "apps"}, "data": {"url": url}}));
    reconcile_once(&fake, &ctx).await.unwrap();
    assert_eq!(replicas(&fake), 1);
    assert!(
        fake.get(HPAS, "demo-worker-jobs").is_none(),
        "the operator scales it: no HPA"
    );

    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let backlog: Vec<String> = (0..40).map(|i| format!("task-{i}")).collect();
    redis::cmd("RPUSH")
        .arg("jobs")
        .arg(&backlog)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    wait_for(
        "the backlog of 40 scales the pool to 8",
        Duration::from_secs(10),
        || replicas(&fake) == 8,
    )
    .await;
    wait_for("the pool's scaling status", Duration::from_secs(10), || {
        scaling(&fake)["desiredReplicas"] == 8
    })
    .await;
    let entry = scaling(&fake);
    assert_eq!(entry["pool"], "jobs");
    assert_eq!(entry["queued"], 40);
    assert_eq!(entry["reserved"], 0);
    assert!(
        entry["plugin"]
            .as_str()
            .unwrap()
            .starts_with("queue-length sha256:"),
        "{entry}"
    );
    assert_eq!(entry["conditions"][0]["type"], "ScalingActive");
    assert_eq!(entry["conditions"][0]["status"], "True");
    assert_eq!(
        fake.get(CELERIES, "demo").unwrap()["status"]["observedGeneration"],
        1,
        "the reconciler's status is still there"
    );

    redis::cmd("DEL")
        .arg("jobs")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let drained = std::time::Instant::now();
    wait_for(
        "the empty queue brings the pool back to min",
        Duration::from_secs(15),
        || replicas(&fake) == 1,
    )
    .await;
    // The last recommendation of 8 came at most one poll (1 s) before the drain; the 3 s
    // stabilization window keeps it for 3 s.
    assert!(
        drained.elapsed() >= Duration::from_secs(2),
        "scaled down after {:?}, inside the stabilization window",
        drained.elapsed()
    );

    let port = redis.port;
    drop(redis);
    wait_for("a ScalingHeld Event", Duration::from_secs(10), || {
        events(&fake, "ScalingHeld") > 0
    })
    .await;
    wait_for("ScalingActive False", Duration::from_secs(10), || {
        scaling(&fake)["conditions"][0]["status"] == "False"
    })
    .await;
    let entry = scaling(&fake);
    assert_eq!(entry["conditions"][0]["reason"], "BrokerUnavailable");
    assert_eq!(entry["lastDecision"], "Hold");
    assert!(
        entry.get("queued").is_none(),
        "no figure rather than zero: {entry}"
    );
    assert_eq!(
        replicas(&fake),
        1,
        "a missing metric never changes the replicas"
    );

    // Redis comes back where it was: the same connection manager reconnects and scaling
    // resumes.
    let redis = support::Redis::start_on(port);
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("RPUSH")
        .arg("jobs")
        .arg(&backlog[..20])
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    wait_for(
        "the backlog of 20 scales the pool to 4",
        Duration::from_secs(15),
        || replicas(&fake) == 4,
    )
    .await;
    assert_eq!(events(&fake, "ScalingResumed"), 1);
    wait_for("ScalingActive True again", Duration::from_secs(10), || {
        scaling(&fake)["conditions"][0]["status"] == "True"
    })
    .await;

    let scaled: Vec<_> = {
        let store = fake.0.lock().unwrap();
        store.objects[EVENTS]
            .values()
            .filter(|e| e["reason"] == "Scaled")
            .map(|e| e["note"].clone())
            .collect()
    };
    assert_eq!(scaled.len(), 3, "{scaled:?}");
    let metrics = ctx.metrics.encode();
    assert!(
        metrics.contains("celery_operator_scaler_decisions_total{verdict=\"scale\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("celery_operator_scaler_decisions_total{verdict=\"hold\"}"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("celery_operator_scaler_probe_errors_total 0\n"),
        "{metrics}"
    );

    // Every request of the scaler (Secret, scale subresource, Events) is allowed by the RBAC
    // rules the chart grants.
    let allowed = allowed_requests();
    let used = rbac_requests(&fake.take_sent());
    assert!(used.contains(&("apps".into(), "deployments/scale".into(), "patch".into())));
    assert!(used.contains(&("".into(), "secrets".into(), "get".into())));
    let uncovered: Vec<_> = used.difference(&allowed).collect();
    assert!(
        uncovered.is_empty(),
        "requests the RBAC rules do not allow: {uncovered:?}"
    );
}
