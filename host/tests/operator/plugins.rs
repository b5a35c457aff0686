//! Plugins shipped as ConfigMaps of the operator's namespace: swapped live (a broken build
//! refused, the good one kept), and hostile ones that never take the operator down.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::{Value, json};

use crate::support;
use crate::support::cluster::{Cluster, LONG, wait};
use crate::support::fixture;

fn plugin_configmap(cluster: &Cluster, bytes: &[u8]) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": "hpa-plugin", "namespace": cluster.operator_ns, "labels": {"celeryproject.org/plugin": "hpa"}},
           "binaryData": {"plugin.wasm": k8s_openapi::ByteString(bytes.to_vec())}})
}

/// The autoscaler plugin use in the resource's status: (digest, source).
pub(crate) async fn autoscaler_use(cluster: &Cluster) -> Option<(String, String)> {
    let c = cluster.celeries().get("shop").await.ok()?;
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
    cluster.apply_celery(&cluster.celery("shop", spec)).await;
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
    assert!(hpa.line.ends_with("-> 201"), "created: {}", hpa.line);

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
        let c = cluster.condition("shop", "PluginsHealthy").await?;
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
    cluster.assert_rbac(mark, &op);
}

#[tokio::test]
async fn plugin_configmaps_swap_live_in_memory() {
    plugin_configmaps(&Cluster::in_memory().await).await;
}

#[tokio::test]
async fn plugin_configmaps_swap_live_on_the_real_control_plane() {
    plugin_configmaps(&Cluster::real().await).await;
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
        (
            "bomb",
            support::hostile::compile_bomb(support::hostile::BOMB_FUNCTIONS),
        ),
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
        cluster.apply_celery(&cluster.celery(name, spec)).await;
    }
    let degraded = |name: &'static str| {
        let cluster = &cluster;
        async move {
            let c = cluster.condition(name, "Degraded").await?;
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
        let c = cluster.celeries().get("sleeper").await.ok()?;
        (c.data["status"]["scaling"][0]["reason"] == "ok").then_some(())
    })
    .await;
    cluster.until_ready(&op, "plain").await;
    op.assert_running();

    // The foreign HPA is as it was, and stays when the resource that wanted it goes.
    let hpas = cluster
        .served("autoscaling", "horizontalpodautoscalers")
        .await;
    let hpa = hpas.get("foreign").await.unwrap();
    assert!(
        hpa.metadata.owner_references.is_none(),
        "{:?}",
        hpa.metadata
    );
    assert!(
        cluster
            .deployments()
            .get_opt("taker-worker-take-over")
            .await
            .unwrap()
            .is_some()
    );
    cluster
        .celeries()
        .delete("taker", &DeleteParams::default())
        .await
        .unwrap();
    wait(LONG, "what the resource owned is gone", &op, || async {
        let d = cluster
            .deployments()
            .get_opt("taker-worker-take-over")
            .await;
        d.ok()?.is_none().then_some(())
    })
    .await;
    assert!(hpas.get_opt("foreign").await.unwrap().is_some());
    let rss = op.peak_rss_kib() >> 10;
    eprintln!("operator peak RSS under hostile plugins: {rss} MiB");
    assert!(rss < 400, "peak RSS {rss} MiB");
}
