//! The operator binary as users run it: a separate process, connected through a kubeconfig
//! file to a cluster. Every scenario runs twice: against the in-memory test API server
//! (`tests/apiserver`, fast, with fault injection) and against the real control plane of the
//! test tier (`tests/control-plane`: kube-apiserver with RBAC, etcd, the controller manager),
//! where the operator authenticates as the Helm chart's ServiceAccount and what it sent is
//! read from the audit log. The test plays the kubelet.
//!
//! The same lifecycle scenario runs against a real cluster in `real_cluster_lifecycle`
//! when `KUBECONFIG` is set (see the README: "End to end on a real cluster").

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use support::cluster::{Cluster, Operator};
use test_apiserver::Faults;

fn celery(cluster: &Cluster, name: &str, spec: &str) -> Value {
    let spec: Value = serde_saphyr::from_str(spec).unwrap();
    json!({"apiVersion": "celeryproject.org/v1alpha1", "kind": "Celery",
           "metadata": {"name": name, "namespace": cluster.ns}, "spec": spec})
}

const SPEC: &str = r#"
app: tasks
image: img
broker: {secretRef: {name: broker, key: url}}
workers:
  - {name: fast, queues: [fast], replicas: 2, concurrency: 4}
  - {name: slow, queues: [slow], replicas: 1}
flower: {enabled: true}
beat: {enabled: true}
"#;

async fn apply_celery(cluster: &Cluster, object: &Value) {
    celeries(cluster)
        .patch(
            object["metadata"]["name"].as_str().unwrap(),
            &PatchParams::apply("test").force(),
            &Patch::Apply(object),
        )
        .await
        .unwrap();
}

fn celeries(cluster: &Cluster) -> Api<kube::core::DynamicObject> {
    let ar = kube::discovery::ApiResource::from_gvk_with_plural(
        &kube::core::GroupVersionKind::gvk("celeryproject.org", "v1alpha1", "Celery"),
        "celeries",
    );
    Api::namespaced_with(cluster.client.clone(), &cluster.ns, &ar)
}

fn deployments(cluster: &Cluster) -> Api<Deployment> {
    Api::namespaced(cluster.client.clone(), &cluster.ns)
}

/// Polls `check` every 100 ms until it returns Some, or fails after `limit` with the
/// operator's log.
async fn wait<T, Fut>(limit: Duration, what: &str, op: &Operator, check: impl FnMut() -> Fut) -> T
where
    Fut: std::future::Future<Output = Option<T>>,
{
    support::eventually(
        limit,
        what,
        || format!("; operator log:\n{}", op.log()),
        check,
    )
    .await
}

const LONG: Duration = Duration::from_secs(90);

async fn deployment_names(cluster: &Cluster) -> Vec<String> {
    let mut names: Vec<String> = deployments(cluster)
        .list(&ListParams::default())
        .await
        .map(|l| l.items.iter().map(|d| d.name_any()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// Replicas of the `fast` pool's Deployment.
async fn fast_replicas(cluster: &Cluster) -> Option<i32> {
    deployments(cluster)
        .get("shop-worker-fast")
        .await
        .ok()?
        .spec?
        .replicas
}

async fn condition(cluster: &Cluster, name: &str, type_: &str) -> Option<Value> {
    let c = celeries(cluster).get(name).await.ok()?;
    c.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

/// Plays the kubelet until resource `name` is Ready.
async fn until_ready(cluster: &Cluster, op: &Operator, name: &str) {
    wait(LONG, "the resource is Ready", op, || async {
        cluster.make_ready().await;
        let ready = condition(cluster, name, "Ready").await?;
        (ready["status"] == "True").then_some(())
    })
    .await;
}

/// No request of the operator since `mark` was refused by the authorizer.
fn assert_nothing_forbidden(cluster: &Cluster, mark: u64, op: &Operator) {
    let forbidden = cluster.forbidden_since(mark);
    assert!(
        forbidden.is_empty(),
        "the chart's RBAC refused {forbidden:#?}; operator log:\n{}",
        op.log()
    );
}

/// Create -> children with owner references -> Ready, Progressing settles; update, remove a
/// pool, disable Flower -> changed and pruned; a deleted child comes back; deleting the
/// resource deletes all (the garbage collector, on a real control plane). Nothing the
/// operator sends is forbidden.
async fn lifecycle(cluster: &Cluster, op: &Operator) {
    let mark = cluster.mark();
    apply_celery(cluster, &celery(cluster, "shop", SPEC)).await;
    let want = [
        "shop-beat",
        "shop-flower",
        "shop-worker-fast",
        "shop-worker-slow",
    ];
    wait(LONG, "the four Deployments exist", op, || async {
        (deployment_names(cluster).await == want).then_some(())
    })
    .await;
    let uid = celeries(cluster).get("shop").await.unwrap().uid().unwrap();
    let deployments = deployments(cluster);
    for d in deployments
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
    {
        let owner = &d.owner_references()[0];
        assert_eq!(
            (
                owner.uid.as_str(),
                owner.controller,
                owner.block_owner_deletion
            ),
            (uid.as_str(), Some(true), Some(true))
        );
    }
    let services: Api<Service> = Api::namespaced(cluster.client.clone(), &cluster.ns);
    assert!(services.get_opt("shop-flower").await.unwrap().is_some());

    until_ready(cluster, op, "shop").await;
    wait(LONG, "Progressing settles", op, || async {
        let c = condition(cluster, "shop", "Progressing").await?;
        (c["status"] == "False" && c["reason"] == "Complete").then_some(())
    })
    .await;

    // Update a pool, remove another, disable Flower.
    let changed = SPEC
        .replace("replicas: 2, concurrency: 4", "replicas: 3, concurrency: 8")
        .replace("  - {name: slow, queues: [slow], replicas: 1}\n", "")
        .replace("flower: {enabled: true}", "flower: {enabled: false}");
    apply_celery(cluster, &celery(cluster, "shop", &changed)).await;
    wait(LONG, "the slow pool and Flower are pruned", op, || async {
        (deployment_names(cluster).await == ["shop-beat", "shop-worker-fast"]).then_some(())
    })
    .await;
    wait(LONG, "the fast pool is updated", op, || async {
        let d = deployments.get("shop-worker-fast").await.ok()?;
        let args = d.spec?.template.spec?.containers[0].args.clone()?;
        args.contains(&"8".to_string()).then_some(())
    })
    .await;
    assert_eq!(fast_replicas(cluster).await, Some(3));
    assert!(services.get_opt("shop-flower").await.unwrap().is_none());

    // A deleted child is recreated.
    let before = deployments.get("shop-worker-fast").await.unwrap().uid();
    deployments
        .delete("shop-worker-fast", &DeleteParams::default())
        .await
        .unwrap();
    wait(LONG, "the deleted Deployment is back", op, || async {
        let d = deployments.get_opt("shop-worker-fast").await.ok()??;
        (d.uid() != before).then_some(())
    })
    .await;

    // Deleting the resource deletes everything it owns.
    celeries(cluster)
        .delete("shop", &DeleteParams::default())
        .await
        .unwrap();
    wait(LONG, "every child is gone", op, || async {
        deployment_names(cluster).await.is_empty().then_some(())
    })
    .await;
    assert_nothing_forbidden(cluster, mark, op);
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
            .any(|r| r.watch && r.line.contains("/celeries")),
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

/// Settled: a quiet period sends no write; a restarted operator resumes without one.
async fn restart_without_writes(cluster: &Cluster) {
    let op = cluster.operator("first", &[]);
    apply_celery(cluster, &celery(cluster, "shop", SPEC)).await;
    wait(LONG, "the Deployments", &op, || async {
        (deployment_names(cluster).await.len() == 4).then_some(())
    })
    .await;
    until_ready(cluster, &op, "shop").await;
    // Let the pods' and Deployments' last status changes reach the operator.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mark = cluster.mark();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        cluster.writes_since(mark),
        Vec::<String>::new(),
        "no writes while nothing changes; operator log:\n{}",
        op.log()
    );
    let quiet = cluster.sent_since(mark).len();

    drop(op);
    let mark = cluster.mark();
    let op = cluster.operator("second", &[]);
    // (A watch is no sign: the real API server records one in its audit log only once
    // something was sent on it.)
    wait(
        LONG,
        "the new operator reconciled the resource",
        &op,
        || async { (op.reconciled() >= 1.0).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let sent = cluster.sent_since(mark);
    let writes = cluster.writes_since(mark);
    assert_eq!(
        writes,
        Vec::<String>::new(),
        "a restart rewrites nothing; operator log:\n{}",
        op.log()
    );
    eprintln!(
        "restart: {} requests (reads and watches) to resume, quiet period: {quiet} requests in 5 s",
        sent.len()
    );
    assert_nothing_forbidden(cluster, 0, &op);
}

#[tokio::test]
async fn a_restarted_operator_resumes_without_writes_in_memory() {
    restart_without_writes(&Cluster::in_memory().await).await;
}

#[tokio::test]
async fn a_restarted_operator_resumes_without_writes_on_the_real_control_plane() {
    restart_without_writes(&Cluster::real().await).await;
}

fn plugin_configmap(cluster: &Cluster, bytes: &[u8]) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": "hpa-plugin", "namespace": cluster.operator_ns, "labels": {"celeryproject.org/plugin": "hpa"}},
           "binaryData": {"plugin.wasm": k8s_openapi::ByteString(bytes.to_vec())}})
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/{name}.wasm", env!("CELERY_PLUGIN_DIR"))).unwrap()
}

/// The autoscaler plugin use in the resource's status: (digest, source).
async fn autoscaler_use(cluster: &Cluster) -> Option<(String, String)> {
    let c = celeries(cluster).get("shop").await.ok()?;
    let uses = c.data["status"]["plugins"].as_array()?;
    let u = uses.iter().find(|u| u["role"] == "autoscaler")?;
    Some((
        u["digest"].as_str()?.to_string(),
        u["source"].as_str()?.to_string(),
    ))
}

/// A plugin ConfigMap swaps the plugin live; a broken build is refused and the good one
/// keeps running. The HorizontalPodAutoscaler is applied at the version the cluster serves.
async fn plugin_configmaps(cluster: &Cluster) {
    let op = cluster.operator("operator", &[]);
    let mark = cluster.mark();
    let spec = r#"
app: tasks
image: img
broker: {secretRef: {name: broker, key: url}}
workers:
  - name: web
    queues: [web]
    autoscaling:
      minReplicas: 1
      maxReplicas: 5
      metrics: [{name: cpu, target: {type: Utilization, averageUtilization: 70}}]
"#;
    apply_celery(cluster, &celery(cluster, "shop", spec)).await;
    let (builtin, source) = wait(LONG, "the built-in hpa plugin is used", &op, || {
        autoscaler_use(cluster)
    })
    .await;
    assert_eq!(source, "builtin");
    let hpa = wait(LONG, "the HorizontalPodAutoscaler", &op, || async {
        cluster
            .sent_since(mark)
            .into_iter()
            .find(|s| s.write && s.line.contains("/horizontalpodautoscalers/shop-worker-web"))
    })
    .await;
    assert!(
        hpa.line.ends_with("-> 201") || hpa.line.ends_with("-> 200"),
        "{}",
        hpa.line
    );

    // A ConfigMap named for the plugin replaces the built-in (here with the keda build).
    let configmaps: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), &cluster.operator_ns);
    let apply = |bytes: Vec<u8>| {
        let configmaps = configmaps.clone();
        let object = plugin_configmap(cluster, &bytes);
        async move {
            configmaps
                .patch(
                    "hpa-plugin",
                    &PatchParams::apply("test").force(),
                    &Patch::Apply(object),
                )
                .await
                .unwrap();
        }
    };
    let from_configmap = format!("configmap {}/hpa-plugin", cluster.operator_ns);
    apply(fixture("keda")).await;
    let (swapped, source) = wait(LONG, "the ConfigMap build is used", &op, || async {
        autoscaler_use(cluster).await.filter(|(d, _)| *d != builtin)
    })
    .await;
    assert_eq!(source, from_configmap);

    // Replaced by another good build (the hpa build, now from the ConfigMap): used.
    apply(fixture("hpa")).await;
    let (digest, source) = wait(LONG, "the second build is used", &op, || async {
        autoscaler_use(cluster).await.filter(|(d, _)| *d != swapped)
    })
    .await;
    assert_eq!(digest, builtin);
    assert_eq!(source, from_configmap);

    // Replaced by a broken build: refused, the good one keeps working, and the status says so.
    apply(b"not a component".to_vec()).await;
    let healthy = wait(LONG, "the refusal is reported", &op, || async {
        let c = condition(cluster, "shop", "PluginsHealthy").await?;
        (c["status"] == "False").then_some(c)
    })
    .await;
    assert!(
        healthy["message"].as_str().unwrap().contains("hpa"),
        "{healthy}"
    );
    let (digest, source) = autoscaler_use(cluster).await.unwrap();
    assert_eq!(digest, builtin, "the last good build keeps running");
    assert_eq!(source, from_configmap);
    assert_nothing_forbidden(cluster, mark, &op);
}

#[tokio::test]
async fn plugin_configmaps_swap_live_in_memory() {
    plugin_configmaps(&Cluster::in_memory().await).await;
}

#[tokio::test]
async fn plugin_configmaps_swap_live_on_the_real_control_plane() {
    plugin_configmaps(&Cluster::real().await).await;
}

/// A backlog in a real Redis scales the pool through the `scale` subresource; the scaler's
/// status entry (its own field manager) sits beside the reconciler's conditions.
async fn queue_length_scaling(cluster: &Cluster) {
    let redis = support::Redis::start();
    cluster.secret(&redis.url()).await;
    let op = cluster.operator("operator", &[]);
    let mark = cluster.mark();
    let spec = r#"
app: tasks
image: img
broker: {type: redis, secretRef: {name: broker, key: url}}
workers:
  - name: jobs
    queues: [jobs]
    autoscaling:
      minReplicas: 1
      maxReplicas: 10
      pollIntervalSeconds: 1
      metrics: [{name: taskQueueLength, target: {type: AverageValue, averageValue: "5"}}]
"#;
    apply_celery(cluster, &celery(cluster, "shop", spec)).await;
    let deployments = deployments(cluster);
    wait(LONG, "the pool's Deployment", &op, || async {
        deployments.get_opt("shop-worker-jobs").await.ok()?
    })
    .await;
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let backlog: Vec<String> = (0..30).map(|i| format!("t{i}")).collect();
    redis::cmd("RPUSH")
        .arg("jobs")
        .arg(&backlog)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    wait(LONG, "30 tasks scale the pool to 6", &op, || async {
        let d = deployments.get("shop-worker-jobs").await.ok()?;
        (d.spec?.replicas == Some(6)).then_some(())
    })
    .await;
    assert!(
        cluster
            .sent_since(mark)
            .iter()
            .any(|r| r.write && r.line.contains("/deployments/shop-worker-jobs/scale")),
        "through the scale subresource"
    );
    let entry = wait(LONG, "the scaling status", &op, || async {
        let c = celeries(cluster).get("shop").await.ok()?;
        let e = c.data["status"]["scaling"][0].clone();
        (e["desiredReplicas"] == 6).then_some(e)
    })
    .await;
    assert_eq!(entry["queued"], 30);
    assert!(
        entry["recommendations"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["replicas"] == 6)),
        "the recommendation is kept in the status: {entry}"
    );
    // The reconciler's own status is still there beside the scaler's entry (two field managers).
    assert!(condition(cluster, "shop", "Ready").await.is_some());
    assert_nothing_forbidden(cluster, mark, &op);

    // A new operator (a restart, a new leader) finds the queue empty: it must keep the
    // scale-down window the first one started, from the status, and not drop to 1.
    drop(op);
    redis::cmd("DEL")
        .arg("jobs")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let op = cluster.operator("restarted", &[]);
    let entry = wait(LONG, "the new operator's decision", &op, || async {
        let c = celeries(cluster).get("shop").await.ok()?;
        let e = c.data["status"]["scaling"][0].clone();
        (e["queued"] == 0).then_some(e)
    })
    .await;
    assert_eq!(entry["desiredReplicas"], 6, "{entry}");
    assert!(
        entry["reason"]
            .as_str()
            .is_some_and(|r| r.contains("held by the 300s stabilization window")),
        "{entry}"
    );
    assert_eq!(
        deployments
            .get("shop-worker-jobs")
            .await
            .unwrap()
            .spec
            .unwrap()
            .replicas,
        Some(6)
    );
}

#[tokio::test]
async fn queue_length_scaling_patches_the_scale_subresource_in_memory() {
    queue_length_scaling(&Cluster::in_memory().await).await;
}

#[tokio::test]
async fn queue_length_scaling_patches_the_scale_subresource_on_the_real_control_plane() {
    queue_length_scaling(&Cluster::real().await).await;
}

#[tokio::test]
async fn the_operator_recovers_from_faults_without_a_hot_loop() {
    let mut cluster = Cluster::in_memory().await;
    let op = cluster.operator("operator", &[]);
    let long = Duration::from_secs(120);

    // One request in twenty fails with 500 and one write in twenty with 409 while it
    // converges. A reconcile sends about 16 requests, so most attempts meet a fault; each
    // failure is retried after 1 s, 2 s, 4 s, ..., and what an attempt applied stays applied.
    cluster.server().set_faults(Faults {
        error_share: 0.05,
        conflict_share: 0.05,
        ..Default::default()
    });
    let api = celeries(&cluster);
    let object = celery(&cluster, "shop", SPEC);
    loop {
        // The test's own writes see the faults too.
        if api
            .patch(
                "shop",
                &PatchParams::apply("test").force(),
                &Patch::Apply(&object),
            )
            .await
            .is_ok()
        {
            break;
        }
    }
    wait(long, "convergence despite 500s and 409s", &op, || async {
        (deployment_names(&cluster).await.len() == 4).then_some(())
    })
    .await;
    cluster.server().set_faults(Faults::default());

    // The API server goes away for a while and comes back.
    cluster.server().stop().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.server().restart().await;
    let changed = SPEC.replace("replicas: 2, concurrency: 4", "replicas: 4, concurrency: 4");
    apply_celery(&cluster, &celery(&cluster, "shop", &changed)).await;
    wait(
        long,
        "a change after the outage is applied",
        &op,
        || async { (fast_replicas(&cluster).await == Some(4)).then_some(()) },
    )
    .await;

    // Dropped watches: the next change still arrives.
    cluster.server().drop_watches();
    let changed = SPEC.replace("replicas: 2, concurrency: 4", "replicas: 5, concurrency: 4");
    apply_celery(&cluster, &celery(&cluster, "shop", &changed)).await;
    wait(
        long,
        "a change after dropped watches is applied",
        &op,
        || async { (fast_replicas(&cluster).await == Some(5)).then_some(()) },
    )
    .await;

    // Settled: no hot loop. Watches stay open; a handful of requests at most.
    cluster.make_ready().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mark = cluster.mark();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let requests = cluster.sent_since(mark);
    assert_eq!(cluster.writes_since(mark), Vec::<String>::new());
    assert!(
        requests.len() < 20,
        "a hot loop: {} requests in 5 s: {requests:?}",
        requests.len()
    );
}

#[tokio::test]
async fn many_resources_converge() {
    let cluster = Cluster::in_memory().await;
    let op = cluster.operator("operator", &[]);
    const N: usize = 200;
    let start = Instant::now();
    let api = celeries(&cluster);
    let spec = r#"
app: tasks
image: img
broker: {secretRef: {name: broker, key: url}}
workers:
  - {name: default, queues: [celery], replicas: 1}
"#;
    for i in 0..N {
        let object = celery(&cluster, &format!("app-{i:03}"), spec);
        api.create(
            &PostParams::default(),
            &serde_json::from_value(object).unwrap(),
        )
        .await
        .unwrap();
    }
    let long = Duration::from_secs(300);
    wait(long, "every resource has its Deployment", &op, || async {
        (deployment_names(&cluster).await.len() == N).then_some(())
    })
    .await;
    cluster.make_ready().await;
    wait(long, "every resource is Ready", &op, || async {
        let list = api.list(&ListParams::default()).await.ok()?;
        let ready = list
            .items
            .iter()
            .filter(|c| {
                c.data["status"]["conditions"].as_array().is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
            })
            .count();
        (ready == N).then_some(())
    })
    .await;
    let took = start.elapsed();
    let sent = cluster.sent_since(0);
    println!(
        "many resources: {N} Celery resources created and Ready in {took:.1?}; {} requests ({} writes); operator peak RSS {} MiB",
        sent.len(),
        sent.iter().filter(|r| r.write).count(),
        op.peak_rss_kib() / 1024
    );
}

/// The holder of the leader-election Lease.
async fn lease_holder(cluster: &Cluster) -> Option<String> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(cluster.client.clone(), &cluster.operator_ns);
    leases
        .get("celery-operator")
        .await
        .ok()?
        .spec?
        .holder_identity
}

/// Two replicas: one leader acts; when it goes away the other takes the Lease over and
/// acts; a leader stopped cleanly releases the Lease.
async fn leader_election(cluster: &Cluster) {
    let a = cluster.operator("a", &["--leader-elect", "--instance", "a"]);
    let b = cluster.operator("b", &["--leader-elect", "--instance", "b"]);
    let leader = wait(LONG, "a leader", &a, || lease_holder(cluster)).await;
    apply_celery(cluster, &celery(cluster, "shop", SPEC)).await;
    wait(LONG, "the leader applies the children", &a, || async {
        (deployment_names(cluster).await.len() == 4).then_some(())
    })
    .await;

    // The leader goes away (as a deleted pod would, without releasing the Lease): the other
    // replica takes over once the Lease expires, and applies the next change.
    let (gone, standby, standby_id) = if leader == "a" {
        (a, b, "b")
    } else {
        (b, a, "a")
    };
    drop(gone);
    let next = wait(LONG, "the standby holds the Lease", &standby, || async {
        lease_holder(cluster).await.filter(|h| *h != leader)
    })
    .await;
    assert_eq!(next, standby_id);
    let changed = SPEC.replace("replicas: 2, concurrency: 4", "replicas: 6, concurrency: 4");
    apply_celery(cluster, &celery(cluster, "shop", &changed)).await;
    wait(
        LONG,
        "the new leader applies a change",
        &standby,
        || async { (fast_replicas(cluster).await == Some(6)).then_some(()) },
    )
    .await;

    // A leader stopped cleanly (SIGTERM) gives the Lease up rather than letting it expire.
    let mut standby = standby;
    assert!(standby.terminate().await.success(), "{}", standby.log());
    assert_eq!(lease_holder(cluster).await, None, "released on shutdown");
    assert_nothing_forbidden(cluster, 0, &standby);
}

#[tokio::test]
async fn two_replicas_elect_one_leader_and_the_other_takes_over_in_memory() {
    leader_election(&Cluster::in_memory().await).await;
}

#[tokio::test]
async fn two_replicas_elect_one_leader_and_the_other_takes_over_on_the_real_control_plane() {
    leader_election(&Cluster::real().await).await;
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
        support::cluster::apply(&cluster.client, &s).await;
    }
    for example in ["minimal", "full"] {
        let path = format!("{}/../examples/{example}.yaml", env!("CARGO_MANIFEST_DIR"));
        let mut object: Value =
            serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        object["metadata"]["namespace"] = json!(cluster.ns);
        apply_celery(&cluster, &object).await;
    }
    wait(
        LONG,
        "the minimal example's worker Deployment",
        &op,
        || async {
            deployments(&cluster)
                .get_opt("hello-worker-default")
                .await
                .ok()?
        },
    )
    .await;
    until_ready(&cluster, &op, "hello").await;
    until_ready(&cluster, &op, "shop").await;
    let names = |api_version: &str, plural: &str| {
        let (group, version) = api_version.split_once('/').unwrap();
        let ar = kube::discovery::ApiResource {
            group: group.into(),
            version: version.into(),
            api_version: api_version.into(),
            kind: String::new(),
            plural: plural.into(),
        };
        let api: Api<kube::core::DynamicObject> =
            Api::namespaced_with(cluster.client.clone(), &cluster.ns, &ar);
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
    assert_nothing_forbidden(&cluster, 0, &op);
}

/// Hostile plugins shipped as ConfigMaps never take the operator down: a compile bomb is
/// refused within the compile bounds, a shaper's malformed objects and a scaler that sleeps
/// are plugin failures or nothing at all, an autoscaler's object named like an HPA the
/// resource does not control is not taken over (nor deleted with the resource), and the
/// operator keeps serving every other resource.
#[tokio::test]
async fn hostile_plugin_configmaps_never_take_the_operator_down() {
    let cluster = Cluster::in_memory().await;
    let redis = support::Redis::start();
    cluster.secret(&redis.url()).await;
    let mut op = cluster.operator(
        "operator",
        &[
            "--plugin-compile-timeout-seconds",
            "3",
            "--plugin-compile-memory-mib",
            "256",
        ],
    );
    let configmaps: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), &cluster.operator_ns);
    for (name, bytes) in [
        ("bomb", support::hostile::compile_bomb(50_000, 4_000)),
        ("evil", fixture("hostile")),
    ] {
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": format!("{name}-plugin"), "namespace": cluster.operator_ns,
                         "labels": {"celeryproject.org/plugin": name}},
            "binaryData": {"plugin.wasm": k8s_openapi::ByteString(bytes)}});
        configmaps
            .patch(
                &format!("{name}-plugin"),
                &PatchParams::apply("test").force(),
                &Patch::Apply(cm),
            )
            .await
            .unwrap();
    }
    wait(
        LONG,
        "the bomb is refused and the fixture loaded",
        &op,
        || async {
            let refused = op.metric("celery_operator_plugin_loads_total{result=\"refused\"}");
            let loaded = op.metric("celery_operator_plugin_loads_total{result=\"loaded\"}");
            (refused >= 1.0 && loaded >= 1.0).then_some(())
        },
    )
    .await;

    // Someone's own HPA, even labelled like ours.
    let foreign = json!({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "foreign", "namespace": cluster.ns,
                     "labels": {"app.kubernetes.io/managed-by": "celery-operator", "app.kubernetes.io/instance": "taker"}},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "mine"},
                 "minReplicas": 1, "maxReplicas": 2}});
    support::cluster::apply(&cluster.client, &foreign).await;

    let base =
        "app: tasks\nimage: img\nbroker: {type: redis, secretRef: {name: broker, key: url}}\n";
    let resources = [
        (
            "taker",
            format!(
                "{base}workers:\n  - name: take-over\n    autoscaling: {{minReplicas: 1, maxReplicas: 3, autoscaler: {{name: evil}}, metrics: [{{name: cpu, target: {{type: Utilization, averageUtilization: 50}}}}]}}\n"
            ),
        ),
        (
            "broken",
            format!(
                "{base}workers: [{{name: a}}]\nplugins: {{shapers: [{{name: evil, settings: {{mode: bad-labels}}}}]}}\n"
            ),
        ),
        (
            "sleeper",
            format!(
                "{base}workers:\n  - name: sleep\n    autoscaling: {{minReplicas: 1, maxReplicas: 3, scaler: {{name: evil}}, pollIntervalSeconds: 1, metrics: [{{name: taskQueueLength, target: {{type: AverageValue, averageValue: \"5\"}}}}]}}\n"
            ),
        ),
        (
            "bombed",
            format!("{base}workers: [{{name: a}}]\nplugins: {{shapers: [{{name: bomb}}]}}\n"),
        ),
        ("plain", format!("{base}workers: [{{name: a}}]\n")),
    ];
    for (name, spec) in &resources {
        apply_celery(&cluster, &celery(&cluster, name, spec)).await;
    }
    let degraded = |name: &'static str| {
        let cluster = &cluster;
        async move {
            let c = condition(cluster, name, "Degraded").await?;
            (c["status"] == "True").then(|| c["message"].as_str().unwrap_or_default().to_string())
        }
    };
    let taken = wait(LONG, "the take-over is refused", &op, || degraded("taker")).await;
    assert!(
        taken.contains("HorizontalPodAutoscaler/foreign") && taken.contains("not controlled"),
        "{taken}"
    );
    let broken = wait(
        LONG,
        "the malformed shaper answer is a failure",
        &op,
        || degraded("broken"),
    )
    .await;
    assert!(
        broken.contains("shaper plugin evil failed") && broken.contains("invalid answer"),
        "{broken}"
    );
    let bombed = wait(LONG, "the refused plugin is reported", &op, || {
        degraded("bombed")
    })
    .await;
    assert!(bombed.contains("bomb"), "{bombed}");
    wait(LONG, "the sleeping scaler decides", &op, || async {
        let c = celeries(&cluster).get("sleeper").await.ok()?;
        (c.data["status"]["scaling"][0]["reason"] == "ok").then_some(())
    })
    .await;
    until_ready(&cluster, &op, "plain").await;
    op.assert_running();

    // The foreign HPA is as it was, and stays when the resource that wanted it goes.
    let hpas: Api<kube::core::DynamicObject> = Api::namespaced_with(
        cluster.client.clone(),
        &cluster.ns,
        &celery_operator::children::ChildKind::HorizontalPodAutoscaler.api_resource(),
    );
    let hpa = hpas.get("foreign").await.unwrap();
    assert!(
        hpa.metadata.owner_references.is_none(),
        "{:?}",
        hpa.metadata
    );
    celeries(&cluster)
        .delete("taker", &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(hpas.get_opt("foreign").await.unwrap().is_some());
    let rss = op.peak_rss_kib() >> 10;
    eprintln!("operator peak RSS under hostile plugins: {rss} MiB");
    assert!(rss < 400, "peak RSS {rss} MiB");
}
