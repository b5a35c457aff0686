//! Autoscaling: the autoscaler plugins' objects (an HPA, replaced by KEDA's ScaledObject when
//! the pool switches), and the operator's own queue-length scaler on a real Redis.

use kube::ResourceExt;
use serde_json::Value;

use super::SPEC;
use crate::support::Redis;
use crate::support::cluster::{Cluster, LONG, Operator, wait};

/// The autoscaler plugin use of pool `pool` in the status of resource `shop`.
async fn autoscaler_use(cluster: &Cluster, pool: &str) -> Option<Value> {
    let c = cluster.celeries().get("shop").await.ok()?;
    let uses = c.data["status"]["plugins"].as_array()?;
    let target = format!("pool {pool}");
    uses.iter()
        .find(|u| u["role"] == "autoscaler" && u["target"] == target.as_str())
        .cloned()
}

/// The default autoscaler (the built-in `hpa` plugin) makes a HorizontalPodAutoscaler for the
/// autoscaled pool, owned by the resource and aimed at the pool's Deployment, and the status
/// says which plugin build decided. Switching the pool to `keda` applies its ScaledObject,
/// then deletes the HPA, and writes no other child.
async fn hpa_to_keda(cluster: &Cluster) {
    let op = cluster.operator("operator", &[]);
    cluster.apply_celery(&cluster.celery("shop", SPEC)).await;
    wait(LONG, "the four Deployments", &op, || async {
        (cluster.deployment_names().await.len() == 4).then_some(())
    })
    .await;
    cluster.until_ready(&op, "shop").await;
    cluster.settle(&op).await;
    let uid = cluster.celeries().get("shop").await.unwrap().uid().unwrap();
    let hpas = cluster
        .served("autoscaling", "horizontalpodautoscalers")
        .await;
    let hpa = hpas.get("shop-worker-slow").await.unwrap();
    assert_eq!(
        hpa.data["spec"]["scaleTargetRef"]["name"],
        "shop-worker-slow"
    );
    assert_eq!(hpa.owner_references()[0].uid, uid);
    let used = autoscaler_use(cluster, "slow").await.unwrap();
    assert_eq!(
        (used["name"].as_str(), used["source"].as_str()),
        (Some("hpa"), Some("builtin")),
        "{used}"
    );
    assert!(used["digest"].as_str().unwrap().starts_with("sha256:"));

    let mark = cluster.mark();
    let keda = SPEC.replace(
        "      maxReplicas: 5\n",
        "      maxReplicas: 5\n      autoscaler: {name: keda}\n",
    );
    assert_ne!(keda, SPEC);
    cluster.apply_celery(&cluster.celery("shop", &keda)).await;
    wait(LONG, "the status names the keda plugin", &op, || async {
        let used = autoscaler_use(cluster, "slow").await?;
        (used["name"] == "keda").then_some(())
    })
    .await;
    let writes = cluster
        .assert_child_writes(
            &op,
            mark,
            &[
                "delete horizontalpodautoscalers/shop-worker-slow",
                "patch scaledobjects/shop-worker-slow",
            ],
            "switching to keda",
        )
        .await;
    if cluster.observes_requests() {
        let applied = writes
            .iter()
            .position(|w| w.starts_with("patch scaledobjects"));
        let deleted = writes.iter().position(|w| w.starts_with("delete "));
        assert!(applied < deleted, "the new autoscaler first: {writes:#?}");
    }
    let scaled_object = cluster
        .served("keda.sh", "scaledobjects")
        .await
        .get("shop-worker-slow")
        .await
        .unwrap();
    assert_eq!(
        scaled_object.data["spec"]["scaleTargetRef"]["name"],
        "shop-worker-slow"
    );
    assert_eq!(scaled_object.owner_references()[0].uid, uid);
    assert!(hpas.get_opt("shop-worker-slow").await.unwrap().is_none());
    cluster.assert_rbac(0, &op);
}

#[tokio::test]
async fn switching_a_pool_from_hpa_to_keda_replaces_its_autoscaler_objects_in_memory() {
    hpa_to_keda(&Cluster::in_memory().await).await;
}

#[tokio::test]
async fn switching_a_pool_from_hpa_to_keda_replaces_its_autoscaler_objects_on_the_real_control_plane()
 {
    hpa_to_keda(&Cluster::real().await).await;
}

/// A pool the operator scales itself from the `jobs` list of a Redis broker; `window`
/// seconds of scale-down stabilization (None: the default, 300 s).
fn queue_spec(window: Option<u32>) -> String {
    let scaler = match window {
        Some(s) => format!(
            "\n      scaler: {{name: queue-length, settings: {{scaleDownStabilizationSeconds: {s}}}}}"
        ),
        None => String::new(),
    };
    format!(
        r#"
app: tasks
image: img
broker: {{type: redis, secretRef: {{name: broker, key: url}}}}
workers:
  - name: jobs
    queues: [jobs]
    autoscaling:
      minReplicas: 1
      maxReplicas: 10
      pollIntervalSeconds: 1{scaler}
      metrics: [{{name: taskQueueLength, target: {{type: AverageValue, averageValue: "5"}}}}]
"#
    )
}

/// The `status.scaling` entry of the only pool of resource `shop`.
async fn scaling(cluster: &Cluster) -> Option<Value> {
    let c = cluster.celeries().get("shop").await.ok()?;
    let entry = c.data["status"]["scaling"][0].clone();
    (!entry.is_null()).then_some(entry)
}

/// Waits until the pool's scaling status passes `check`; returns it.
async fn until_scaling(
    cluster: &Cluster,
    op: &Operator,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    wait(LONG, what, op, || async {
        scaling(cluster).await.filter(|e| check(e))
    })
    .await
}

/// A Redis broker, an operator and resource `shop` with [`queue_spec`]`(window)`, once its
/// pool's Deployment exists.
async fn queue_pool(cluster: &Cluster, window: Option<u32>) -> (Redis, Operator) {
    let (redis, op) = apply_queue_pool(cluster, window).await;
    until_deployment(cluster, &op).await;
    (redis, op)
}

/// A Redis broker, an operator and resource `shop` with [`queue_spec`]`(window)`, applied.
async fn apply_queue_pool(cluster: &Cluster, window: Option<u32>) -> (Redis, Operator) {
    let redis = Redis::start();
    cluster.secret(&redis.url()).await;
    let op = cluster.operator("operator", &[]);
    cluster
        .apply_celery(&cluster.celery("shop", &queue_spec(window)))
        .await;
    (redis, op)
}

/// Replicas of the pool's Deployment.
async fn jobs_replicas(cluster: &Cluster) -> Option<i32> {
    cluster
        .deployments()
        .get("shop-worker-jobs")
        .await
        .ok()?
        .spec?
        .replicas
}

/// Waits until the pool's Deployment exists (its replicas are the scaler's: unset at first).
async fn until_deployment(cluster: &Cluster, op: &Operator) {
    wait(LONG, "the pool's Deployment", op, || async {
        cluster
            .deployments()
            .get_opt("shop-worker-jobs")
            .await
            .ok()?
            .map(|_| ())
    })
    .await;
}

async fn until_replicas(cluster: &Cluster, op: &Operator, what: &str, replicas: i32) {
    wait(LONG, what, op, || async {
        (jobs_replicas(cluster).await == Some(replicas)).then_some(())
    })
    .await;
}

/// The resources of the test's namespace as the API server prints them for `kubectl get
/// cel -o wide` (server-side printing: a `Table`).
async fn wide_table(cluster: &Cluster) -> Value {
    let request = http::Request::get(format!(
        "/apis/celeryproject.org/v1alpha1/namespaces/{}/celeries",
        cluster.ns
    ))
    .header(
        "Accept",
        "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
    )
    .body(Vec::new())
    .unwrap();
    let text = cluster.client.request_text(request).await.unwrap();
    serde_json::from_str(&text).unwrap()
}

async fn redis_cmd(url: &str, args: &[&str]) {
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd(args[0])
        .arg(&args[1..])
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
}

/// The operator's own scaler end to end on a real Redis: a backlog scales the pool up through
/// the Deployment's `scale` subresource (no HPA, no ScaledObject), with the decision in
/// `status.scaling` beside the reconciler's status; an empty queue holds the replicas for the
/// stabilization window, then brings the pool back to min; a stopped broker holds the replicas
/// and says why (`ScalingActive=False`, one `ScalingHeld` Event); Redis back where it was,
/// scaling resumes (one `ScalingResumed` Event). Three `Scaled` Events and decision metrics
/// say the same; the chart's RBAC allows every request of the scaler.
async fn queue_length_backlog(cluster: &Cluster) {
    let (redis, op) = queue_pool(cluster, Some(5)).await;

    // The oldest task (kombu pops from the right) is stamped as the app's
    // `before_task_publish` hook stamps it: sent a minute ago.
    let mut backlog: Vec<String> = (0..40).map(|i| format!("task-{i}")).collect();
    let minute_ago = jiff::Timestamp::now().as_millisecond() as f64 / 1000.0 - 60.0;
    backlog[39] =
        serde_json::json!({"body": "", "headers": {"published_at": minute_ago}}).to_string();
    let push = |n: usize| {
        let mut args = vec!["RPUSH", "jobs"];
        args.extend(backlog[..n].iter().map(String::as_str));
        args
    };
    redis_cmd(&redis.url(), &push(40)).await;
    until_replicas(cluster, &op, "the backlog of 40 scales the pool to 8", 8).await;
    let entry = until_scaling(cluster, &op, "the decision in the status", |e| {
        e["desiredReplicas"] == 8
    })
    .await;
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
    // No worker runs here, so no rate is known; the oldest task's age is, and is the wait.
    let waited = entry["oldestWaitSeconds"]
        .as_f64()
        .expect("oldest wait known");
    assert!((60.0..120.0).contains(&waited), "{entry}");
    assert_eq!(entry["waitSeconds"], entry["oldestWaitSeconds"]);
    assert!(
        entry.get("completionRate").is_none(),
        "unknown, not zero: {entry}"
    );
    // `kubectl get cel -o wide` (the real API server's Table; ours does not print tables):
    // the Wait column shows it.
    if cluster.is_real() {
        let table = wide_table(cluster).await;
        let column = table["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .position(|c| c["name"] == "Wait")
            .expect("a Wait column");
        let cell = table["rows"][0]["cells"][column].as_f64();
        assert!(cell.is_some_and(|w| w >= 60.0), "{table}");
    }
    // The reconciler's status is still there beside the scaler's entry (two field managers).
    let celery = cluster.celeries().get("shop").await.unwrap();
    assert_eq!(celery.data["status"]["observedGeneration"], 1);
    assert!(cluster.condition("shop", "Ready").await.is_some());

    // Drained: the window holds the replicas, then the pool goes back to min.
    redis_cmd(&redis.url(), &["DEL", "jobs"]).await;
    let held = until_scaling(cluster, &op, "the empty queue held by the window", |e| {
        e["queued"] == 0 && e["desiredReplicas"] == 8
    })
    .await;
    assert!(
        held["reason"]
            .as_str()
            .unwrap()
            .contains("held by the 5s stabilization window: 8"),
        "{held}"
    );
    until_replicas(
        cluster,
        &op,
        "the empty queue brings the pool back to min",
        1,
    )
    .await;

    // The broker stops: nothing is decided without a figure, and the status says why.
    let port = redis.port;
    drop(redis);
    wait(LONG, "a ScalingHeld Event", &op, || async {
        (!cluster.events("ScalingHeld").await.is_empty()).then_some(())
    })
    .await;
    let entry = until_scaling(cluster, &op, "ScalingActive False", |e| {
        e["conditions"][0]["status"] == "False"
    })
    .await;
    assert_eq!(entry["conditions"][0]["reason"], "BrokerUnavailable");
    assert_eq!(entry["lastDecision"], "Hold");
    assert!(
        entry.get("queued").is_none(),
        "no figure rather than zero: {entry}"
    );
    assert_eq!(
        jobs_replicas(cluster).await,
        Some(1),
        "a missing metric never changes the replicas"
    );

    // Redis comes back where it was: the same connection manager reconnects and scaling
    // resumes.
    let redis = Redis::start_on(port);
    redis_cmd(&redis.url(), &push(20)).await;
    until_replicas(cluster, &op, "the backlog of 20 scales the pool to 4", 4).await;
    until_scaling(cluster, &op, "ScalingActive True again", |e| {
        e["conditions"][0]["status"] == "True"
    })
    .await;
    assert_eq!(cluster.events("ScalingResumed").await.len(), 1);
    assert_eq!(cluster.events("ScalingHeld").await.len(), 1);
    let scaled: Vec<Value> = cluster
        .events("Scaled")
        .await
        .into_iter()
        .map(|e| e["note"].clone())
        .collect();
    assert_eq!(scaled.len(), 3, "1 -> 8 -> 1 -> 4: {scaled:#?}");
    let decisions = |verdict: &str| {
        op.metric(&format!(
            "celery_operator_scaler_decisions_total{{verdict=\"{verdict}\"}}"
        ))
    };
    assert_eq!(decisions("scale"), 3.0);
    assert!(decisions("hold") >= 1.0);
    assert!(op.metric("celery_operator_scaler_probe_errors_total") >= 1.0);

    let used = cluster.assert_rbac(0, &op);
    if cluster.observes_requests() {
        for needed in [
            ("apps", "deployments/scale", "patch"),
            ("", "secrets", "get"),
        ] {
            let needed = (needed.0.into(), needed.1.into(), needed.2.into());
            assert!(used.contains(&needed), "{needed:?}: {used:#?}");
        }
        let autoscalers: Vec<String> = cluster
            .sent_since(0)
            .into_iter()
            .filter(|s| s.write)
            .map(|s| s.summary())
            .filter(|w| w.contains("horizontalpodautoscalers") || w.contains("scaledobjects"))
            .collect();
        assert_eq!(autoscalers, Vec::<String>::new(), "the operator scales it");
    }
}

#[tokio::test]
async fn a_queue_length_pool_follows_its_redis_backlog_in_memory() {
    queue_length_backlog(&Cluster::in_memory().await).await;
}

#[tokio::test]
async fn a_queue_length_pool_follows_its_redis_backlog_on_the_real_control_plane() {
    queue_length_backlog(&Cluster::real().await).await;
}

/// The recommendations are kept in `status.scaling`: an operator that restarts (or a new
/// leader) with the queue empty keeps the scale-down window the first one started, and does
/// not drop the pool to min.
async fn restart_keeps_the_window(cluster: &Cluster) {
    let (redis, op) = queue_pool(cluster, None).await;
    let backlog: Vec<String> = (0..30).map(|i| format!("t{i}")).collect();
    let mut args = vec!["RPUSH", "jobs"];
    args.extend(backlog.iter().map(String::as_str));
    redis_cmd(&redis.url(), &args).await;
    until_replicas(cluster, &op, "30 tasks scale the pool to 6", 6).await;
    let entry = until_scaling(cluster, &op, "the scaling status", |e| {
        e["desiredReplicas"] == 6
    })
    .await;
    assert!(
        entry["recommendations"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["replicas"] == 6)),
        "the recommendation is kept in the status: {entry}"
    );
    cluster.assert_rbac(0, &op);

    // A new operator finds the queue empty: it must keep the scale-down window the first one
    // started, from the status, and not drop to 1.
    drop(op);
    redis_cmd(&redis.url(), &["DEL", "jobs"]).await;
    let op = cluster.operator("restarted", &[]);
    let entry = until_scaling(cluster, &op, "the new operator's decision", |e| {
        e["queued"] == 0
    })
    .await;
    assert_eq!(entry["desiredReplicas"], 6, "{entry}");
    assert!(
        entry["reason"]
            .as_str()
            .is_some_and(|r| r.contains("held by the 300s stabilization window")),
        "{entry}"
    );
    assert_eq!(jobs_replicas(cluster).await, Some(6));
}

#[tokio::test]
async fn a_restarted_operator_keeps_the_scale_down_window_in_memory() {
    restart_keeps_the_window(&Cluster::in_memory().await).await;
}

#[tokio::test]
async fn a_restarted_operator_keeps_the_scale_down_window_on_the_real_control_plane() {
    restart_keeps_the_window(&Cluster::real().await).await;
}

/// What the operator keeps per resource (its scaler loop and broker probe, retry counter,
/// last good plugin answers) goes with the resource: the gauges fall back to zero after a
/// delete, and the loop stops sampling the broker.
async fn state_goes_with_the_resource(cluster: &Cluster) {
    let (_redis, op) = apply_queue_pool(cluster, None).await;
    let kept = |resources: f64, loops: f64| {
        op.metric("celery_operator_tracked_resources") == resources
            && op.metric("celery_operator_scaler_loops") == loops
    };
    wait(
        LONG,
        "one resource kept, with one scaler loop",
        &op,
        || async { kept(1.0, 1.0).then_some(()) },
    )
    .await;
    wait(LONG, "the loop samples the broker", &op, || async {
        (op.metric("celery_operator_scaler_samples") > 0.0).then_some(())
    })
    .await;
    cluster
        .celeries()
        .delete("shop", &Default::default())
        .await
        .unwrap();
    wait(
        LONG,
        "nothing kept for the deleted resource",
        &op,
        || async { kept(0.0, 0.0).then_some(()) },
    )
    .await;
    let stopped = op.metric("celery_operator_scaler_samples");
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(
        op.metric("celery_operator_scaler_samples"),
        stopped,
        "the loop of a deleted resource samples no more (poll 1 s)"
    );
}

#[tokio::test]
async fn state_goes_with_the_resource_in_memory() {
    state_goes_with_the_resource(&Cluster::in_memory().await).await;
}

#[tokio::test]
async fn state_goes_with_the_resource_on_the_real_control_plane() {
    state_goes_with_the_resource(&Cluster::real().await).await;
}
