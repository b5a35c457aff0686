//! A resource's life: create, Ready, update, prune, repair, delete, with exactly which writes
//! each step causes and the RBAC they need; a restart and a no-op reconcile that write
//! nothing; the default chart running the examples.

use std::collections::BTreeSet;
use std::path::Path;

use kube::ResourceExt;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use serde_json::{Value, json};

use super::{CHILD_RESOURCES, CREATE_SHOP, SPEC, fast_replicas};
use crate::support::cluster::{Cluster, LONG, Operator, is_child_write, wait};

/// The managed fields the operator's own server-side apply owns in `object`.
fn applied_by_the_operator(object: &Value) -> Value {
    object["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["manager"] == "celery-operator" && m["operation"] == "Apply")
        .map(|m| m["fieldsV1"].clone())
        .unwrap_or_else(|| panic!("no field of the operator's in {}", object["metadata"]))
}

/// How many writes are `write`.
fn count(writes: &[String], write: &str) -> usize {
    writes.iter().filter(|w| *w == write).count()
}

/// Create -> the live children read, then every child applied (owned by the resource with
/// `controller` and `blockOwnerDeletion`; the replica count owned by the autoscaler where
/// there is one), then the status and one Event; Ready -> status and one Event, no child
/// write; a changed pool -> only its Deployment; a removed pool and a disabled Flower ->
/// pruned, after the one pool left is updated; a drifted child and a deleted one -> both
/// repaired, nothing else; deleting the resource deletes everything (the garbage collector,
/// on a real control plane). The chart's RBAC allows every request, and every verb it grants
/// on children is used.
async fn lifecycle(cluster: &Cluster, op: &Operator) {
    // Create.
    let mark = cluster.mark();
    cluster.apply_celery(&cluster.celery("shop", SPEC)).await;
    let want = [
        "shop-beat",
        "shop-flower",
        "shop-worker-fast",
        "shop-worker-slow",
    ];
    wait(LONG, "the four Deployments exist", op, || async {
        (cluster.deployment_names().await == want).then_some(())
    })
    .await;
    let writes = cluster
        .assert_child_writes(op, mark, &CREATE_SHOP, "create")
        .await;
    if cluster.observes_requests() {
        let sent = cluster.sent_since(mark);
        let first_write = sent.iter().position(|s| s.write).unwrap();
        let listed: Vec<&str> = sent[..first_write]
            .iter()
            .filter(|s| s.verb == "list" && s.query.contains("shop"))
            .map(|s| s.line.as_str())
            .collect();
        assert!(
            listed.is_empty(),
            "the live children come from the watch caches, not a list per resource: {listed:#?}"
        );
        let last_child = writes.iter().rposition(|w| is_child_write(w)).unwrap();
        let first_status = writes
            .iter()
            .position(|w| w == "patch celeries/shop/status")
            .expect("a status");
        assert!(
            last_child < first_status,
            "children, then status: {writes:#?}"
        );
        assert_eq!(count(&writes, "create events"), 1, "{writes:#?}");
        println!(
            "create: {} requests ({} writes) until settled",
            sent.len(),
            writes.len()
        );
    }
    let created = cluster.events("Created").await;
    assert_eq!(created.len(), 1, "{created:#?}");
    assert!(
        created[0]["note"]
            .as_str()
            .unwrap()
            .contains("Deployment/shop-beat"),
        "{}",
        created[0]
    );
    let celery = cluster.celeries().get("shop").await.unwrap();
    let uid = celery.uid().unwrap();
    assert_eq!(celery.data["status"]["observedGeneration"], 1);
    let status = |c: Option<Value>| c.map(|c| c["status"].clone());
    assert_eq!(
        status(cluster.condition("shop", "Ready").await),
        Some(json!("False"))
    );
    assert_eq!(
        status(cluster.condition("shop", "Progressing").await),
        Some(json!("True"))
    );
    for child in CREATE_SHOP {
        let (_, path) = child.split_once(' ').unwrap();
        let (plural, name) = path.split_once('/').unwrap();
        let group = match plural {
            "deployments" => "apps",
            "poddisruptionbudgets" => "policy",
            "horizontalpodautoscalers" => "autoscaling",
            _ => "",
        };
        let object = cluster.served(group, plural).await.get(name).await.unwrap();
        let owner = &object.owner_references()[0];
        assert_eq!(
            (
                owner.uid.as_str(),
                owner.kind.as_str(),
                owner.controller,
                owner.block_owner_deletion
            ),
            (uid.as_str(), "Celery", Some(true), Some(true)),
            "{child}"
        );
    }
    let deployment = |name: &'static str| async move {
        serde_json::to_value(cluster.deployments().get(name).await.unwrap()).unwrap()
    };
    let slow = deployment("shop-worker-slow").await;
    assert!(
        applied_by_the_operator(&slow)["f:spec"]
            .get("f:replicas")
            .is_none(),
        "the autoscaler owns the replicas: {}",
        slow["metadata"]
    );
    let fast = deployment("shop-worker-fast").await;
    assert!(applied_by_the_operator(&fast)["f:spec"]["f:replicas"].is_object());
    assert_eq!(fast["spec"]["replicas"], 2);

    // Ready: the status says so and one Event; no child is written.
    let mark = cluster.mark();
    cluster.until_ready(op, "shop").await;
    let writes = cluster.assert_child_writes(op, mark, &[], "Ready").await;
    if cluster.observes_requests() {
        assert_eq!(count(&writes, "create events"), 1, "{writes:#?}");
        assert!(count(&writes, "patch celeries/shop/status") >= 1);
    }
    assert_eq!(cluster.events("Ready").await.len(), 1);
    let celery = cluster.celeries().get("shop").await.unwrap();
    assert_eq!(celery.data["status"]["workersReady"], "3/3");
    wait(LONG, "Progressing settles", op, || async {
        let c = cluster.condition("shop", "Progressing").await?;
        (c["status"] == "False" && c["reason"] == "Complete").then_some(())
    })
    .await;

    // A changed pool: its Deployment is updated, nothing else; the new generation rolls out.
    let mark = cluster.mark();
    let changed = SPEC.replace("replicas: 2, concurrency: 4", "replicas: 3, concurrency: 8");
    cluster
        .apply_celery(&cluster.celery("shop", &changed))
        .await;
    cluster
        .assert_child_writes(
            op,
            mark,
            &["patch deployments/shop-worker-fast"],
            "a changed pool",
        )
        .await;
    let d = cluster.deployments().get("shop-worker-fast").await.unwrap();
    let args = d.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    assert!(
        args.windows(2).any(|w| w == ["--concurrency", "8"]),
        "{args:?}"
    );
    assert_eq!(fast_replicas(cluster).await, Some(3));
    let celery = cluster.celeries().get("shop").await.unwrap();
    assert_eq!(celery.data["status"]["observedGeneration"], 2);
    assert_eq!(
        status(cluster.condition("shop", "Progressing").await),
        Some(json!("True")),
        "the new generation is rolling out"
    );
    assert_eq!(cluster.events("Updated").await.len(), 1);

    // A removed pool and a disabled Flower: pruned once the pool left is updated (without
    // Flower, workers stop sending task events).
    let mark = cluster.mark();
    let fast_pool = "  - {name: fast, queues: [fast], replicas: 3, concurrency: 8, podDisruptionBudget: {maxUnavailable: 1}}\n";
    assert!(changed.contains(fast_pool));
    let without = changed
        .replace(fast_pool, "")
        .replace("flower: {enabled: true}", "flower: {enabled: false}");
    cluster
        .apply_celery(&cluster.celery("shop", &without))
        .await;
    let writes = cluster
        .assert_child_writes(
            op,
            mark,
            &[
                "delete deployments/shop-flower",
                "delete deployments/shop-worker-fast",
                "delete poddisruptionbudgets/shop-worker-fast",
                "delete services/shop-flower",
                "patch deployments/shop-worker-slow",
            ],
            "a removed pool and a disabled Flower",
        )
        .await;
    if cluster.observes_requests() {
        let updated = writes
            .iter()
            .position(|w| w.starts_with("patch deployments/"));
        let first_delete = writes.iter().position(|w| w.starts_with("delete "));
        assert!(updated < first_delete, "pruned last: {writes:#?}");
    }
    assert_eq!(
        cluster.deployment_names().await,
        ["shop-beat", "shop-worker-slow"]
    );
    let services = cluster.served("", "services").await;
    assert!(services.get_opt("shop-flower").await.unwrap().is_none());

    // A drifted child and a deleted one: both repaired, nothing else written.
    let mark = cluster.mark();
    let deployments = cluster.deployments();
    deployments
        .patch(
            "shop-beat",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .unwrap();
    let before = deployments.get("shop-worker-slow").await.unwrap().uid();
    deployments
        .delete("shop-worker-slow", &DeleteParams::default())
        .await
        .unwrap();
    wait(LONG, "the deleted Deployment is back", op, || async {
        let d = deployments.get_opt("shop-worker-slow").await.ok()??;
        (d.uid() != before).then_some(())
    })
    .await;
    cluster
        .assert_child_writes(
            op,
            mark,
            &[
                "patch deployments/shop-beat",
                "patch deployments/shop-worker-slow",
            ],
            "a drifted and a deleted child",
        )
        .await;
    let beat = deployments.get("shop-beat").await.unwrap();
    assert_eq!(beat.spec.unwrap().replicas, Some(1), "beat is one instance");

    // Deleting the resource deletes everything it owns.
    cluster
        .celeries()
        .delete("shop", &DeleteParams::default())
        .await
        .unwrap();
    wait(LONG, "every child is gone", op, || async {
        cluster.deployment_names().await.is_empty().then_some(())
    })
    .await;

    // Every request since the operator started is allowed by the chart's RBAC, and every
    // verb the chart grants on children was needed.
    let used = cluster.assert_rbac(0, op);
    if cluster.observes_requests() {
        let granted: BTreeSet<String> = cluster
            .chart_rules()
            .iter()
            .map(|(_, rule)| rule)
            .filter(|rule| {
                rule["resources"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r == "deployments")
            })
            .flat_map(|rule| rule["verbs"].as_array().unwrap().clone())
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert!(granted.len() >= 6, "{granted:?}");
        // The real API server's audit log does not show watches while they run (a refused
        // one would show, as a 403): there, the in-memory tier's check of watches stands.
        let seen = |verb: &str| !(cluster.is_real() && verb == "watch");
        for verb in granted.iter().filter(|v| seen(v)) {
            assert!(
                used.iter()
                    .any(|(_, r, v)| v == verb && CHILD_RESOURCES.contains(&r.as_str())),
                "{verb} is granted on children but never used: {used:#?}"
            );
        }
        for needed in [
            ("celeryproject.org", "celeries/status", "patch"),
            ("events.k8s.io", "events", "create"),
        ] {
            let needed = (needed.0.into(), needed.1.into(), needed.2.into());
            assert!(used.contains(&needed), "{needed:?}: {used:#?}");
        }
    }
}

#[tokio::test]
async fn lifecycle_in_memory() {
    let cluster = Cluster::in_memory().await;
    let op = cluster.operator("operator", &[]);
    lifecycle(&cluster, &op).await;
    assert!(
        cluster
            .sent_since(0)
            .iter()
            .any(|r| r.watch && r.path.ends_with("/celeries")),
        "the controller watches"
    );
}

#[tokio::test]
async fn lifecycle_on_the_real_control_plane() {
    let cluster = Cluster::real().await;
    let op = cluster.operator("operator", &[]);
    lifecycle(&cluster, &op).await;
}

/// Runs the lifecycle against the cluster `KUBECONFIG` points to, in a namespace of its own;
/// skipped when `KUBECONFIG` is not set.
#[tokio::test]
async fn real_cluster_lifecycle() {
    let Ok(path) = std::env::var("KUBECONFIG") else {
        eprintln!("skipped: KUBECONFIG is not set (see README, End to end on a real cluster)");
        return;
    };
    let cluster = Cluster::external(Path::new(&path)).await;
    let op = cluster.operator("operator", &[]);
    lifecycle(&cluster, &op).await;
}

/// Settled: the operator goes quiet; a no-op reconcile (someone annotated a child) reads the
/// children and writes nothing; a restarted operator resumes without a write.
async fn restart_without_writes(cluster: &Cluster) {
    let op = cluster.operator("first", &[]);
    cluster.apply_celery(&cluster.celery("shop", SPEC)).await;
    wait(LONG, "the Deployments", &op, || async {
        (cluster.deployment_names().await.len() == 4).then_some(())
    })
    .await;
    cluster.until_ready(&op, "shop").await;
    // Fails if the operator never goes quiet (a hot loop).
    cluster.settle(&op).await;

    // Someone else's change to a child that the operator does not manage: a reconcile that
    // only reads.
    let mark = cluster.mark();
    let reconciles = op.reconciles();
    cluster
        .deployments()
        .patch(
            "shop-beat",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"example.com/owner": "team-a"}}})),
        )
        .await
        .unwrap();
    wait(LONG, "a reconcile", &op, || async {
        (op.reconciles() > reconciles).then_some(())
    })
    .await;
    assert_eq!(
        cluster.settled_writes(&op, mark).await,
        Vec::<String>::new(),
        "a no-op reconcile writes nothing; operator log:\n{}",
        op.log()
    );
    // The live children come from the operator's watch caches: a reconcile in which nothing
    // drifted sends nothing at all.
    let sent = cluster.sent_since(mark);
    let own: Vec<&str> = sent
        .iter()
        .filter(|s| !s.watch)
        .map(|s| s.line.as_str())
        .collect();
    assert_eq!(own, Vec::<&str>::new(), "a no-op reconcile sends nothing");
    println!("no-op reconcile: {} requests, 0 writes", own.len());

    drop(op);
    let mark = cluster.mark();
    let op = cluster.operator("second", &[]);
    // (A watch is no sign: the real API server's audit log does not show it while it runs.)
    wait(
        LONG,
        "the new operator reconciled the resource",
        &op,
        || async { (op.reconciled() >= 1.0).then_some(()) },
    )
    .await;
    let writes = cluster.settled_writes(&op, mark).await;
    assert_eq!(
        writes,
        Vec::<String>::new(),
        "a restart rewrites nothing; operator log:\n{}",
        op.log()
    );
    let sent = cluster.sent_since(mark);
    for kind in CHILD_RESOURCES {
        let lists = sent
            .iter()
            .filter(|s| s.verb == "list")
            .filter(|s| s.target().is_some_and(|t| t.resource == kind))
            .count();
        assert!(
            lists <= 1,
            "a restart lists {kind} {lists} times: {sent:#?}"
        );
    }
    eprintln!(
        "restart: {} requests (reads and watches) to resume",
        sent.len()
    );
    cluster.assert_rbac(0, &op);
}

#[tokio::test]
async fn a_restarted_operator_resumes_without_writes_in_memory() {
    restart_without_writes(&Cluster::in_memory().await).await;
}

#[tokio::test]
async fn a_restarted_operator_resumes_without_writes_on_the_real_control_plane() {
    restart_without_writes(&Cluster::real().await).await;
}

/// What a platform team and an application team do on a fresh cluster: `helm install` with
/// the default values (the operator watches every namespace, with a ClusterRole), then
/// `kubectl apply` of the examples. The workers, Flower, beat, the PodDisruptionBudget and the
/// HorizontalPodAutoscaler appear (at the versions the cluster serves), under nothing but the
/// chart's RBAC.
#[tokio::test]
async fn the_default_chart_runs_the_examples_on_the_real_control_plane() {
    let cluster = Cluster::real_with_default_chart().await;
    let op = cluster.operator("operator", &[]);
    let secret = |name: &str, key: &str, value: &str| {
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": cluster.ns},
               "stringData": {key: value}})
    };
    // Brokers that refuse at once: nothing leaves 127.0.0.1.
    for s in [
        secret("celery-broker", "url", "redis://127.0.0.1:1/0"),
        secret("shop-broker", "url", "redis://127.0.0.1:1/0"),
        secret("shop-results", "url", "redis://127.0.0.1:1/1"),
        secret("shop-flower", "auth", "admin:test"),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "shop", "namespace": cluster.ns}}),
    ] {
        crate::support::cluster::apply(&cluster.client, &s).await;
    }
    for example in ["minimal", "full"] {
        let path = format!("{}/../examples/{example}.yaml", env!("CARGO_MANIFEST_DIR"));
        let mut object: Value =
            serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        object["metadata"]["namespace"] = json!(cluster.ns);
        cluster.apply_celery(&object).await;
    }
    wait(
        LONG,
        "the minimal example's worker Deployment",
        &op,
        || async {
            cluster
                .deployments()
                .get_opt("hello-worker-default")
                .await
                .ok()?
        },
    )
    .await;
    cluster.until_ready(&op, "hello").await;
    cluster.until_ready(&op, "shop").await;
    let names = |api_version: &'static str, plural: &'static str| {
        let api = cluster.objects(api_version, plural);
        async move {
            let mut names: Vec<String> = api
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .iter()
                .map(|o| o.name_any())
                .collect();
            names.sort();
            names
        }
    };
    // Kubernetes 1.20 serves PodDisruptionBudgets at policy/v1beta1 and the HPA fields at
    // autoscaling/v2beta2: the operator found that out by discovery.
    assert_eq!(
        names("policy/v1beta1", "poddisruptionbudgets").await,
        ["shop-worker-default", "shop-worker-reports"]
    );
    assert_eq!(
        names("autoscaling/v2beta2", "horizontalpodautoscalers").await,
        ["shop-worker-images"]
    );
    assert_eq!(
        names("networking.k8s.io/v1", "ingresses").await,
        ["shop-flower"]
    );
    cluster.assert_rbac(0, &op);
}
