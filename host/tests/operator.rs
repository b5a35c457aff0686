//! The operator binary as users run it: a separate process, connected through a kubeconfig
//! file to the test API server (`tests/apiserver`), which plays the cluster. The test plays
//! the kubelet (Deployment readiness) and counts the requests the operator sends.
//!
//! The same lifecycle scenario runs against a real cluster in `real_cluster_lifecycle`
//! when `KUBECONFIG` is set (see the README: "End to end on a real cluster").

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Config, ResourceExt};
use serde_json::{Value, json};
use support::{free_port, tempdir};
use test_apiserver::{ApiServer, Faults};

const NS: &str = "apps";
const OPERATOR_NS: &str = "celery-operator";

/// The operator process; killed when dropped. Its log is kept in the test's directory and
/// printed when a wait times out.
struct Operator {
    process: Child,
    log: PathBuf,
}

impl Operator {
    fn start(kubeconfig: &Path, log: &Path, extra: &[&str]) -> Operator {
        let file = std::fs::File::create(log).unwrap();
        let process = Command::new(env!("CARGO_BIN_EXE_celery-operator"))
            .arg("run")
            .args(["--http-addr", &format!("127.0.0.1:{}", free_port())])
            .args([
                "--plugin-namespace",
                OPERATOR_NS,
                "--log-level",
                "info,kube=warn",
            ])
            .args(["--poll-interval-seconds", "1"])
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env_remove("RUST_LOG")
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .expect("the operator starts");
        Operator {
            process,
            log: log.into(),
        }
    }

    /// Sends SIGTERM, as Kubernetes does to a pod being deleted, and waits for the exit
    /// (asynchronously: the test API server runs on this test's runtime).
    async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.process.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = self.process.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no exit after SIGTERM:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Peak resident memory (VmHWM) in KiB, from /proc.
    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.process.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// A test API server, a kubeconfig for it, and a client.
struct Cluster {
    server: ApiServer,
    dir: tempdir::Dir,
    client: Client,
}

impl Cluster {
    async fn start() -> Cluster {
        let server = ApiServer::start().await;
        let dir = tempdir::Dir::new("operator");
        server.write_kubeconfig(&dir.path().join("kubeconfig"));
        let client = client_for(&dir.path().join("kubeconfig")).await;
        install(&client).await;
        Cluster {
            server,
            dir,
            client,
        }
    }

    fn operator(&self, name: &str, extra: &[&str]) -> Operator {
        Operator::start(
            &self.dir.path().join("kubeconfig"),
            &self.dir.path().join(format!("{name}.log")),
            extra,
        )
    }

    fn writes_since(&self, mark: usize) -> Vec<String> {
        self.server
            .requests_since(mark)
            .into_iter()
            .filter(|r| r.is_write())
            .map(|r| format!("{} {} -> {}", r.method, r.path, r.status))
            .collect()
    }
}

async fn client_for(kubeconfig: &Path) -> Client {
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

/// The CRD (from `crds/`, as users apply it), the namespaces and the broker Secret.
async fn install(client: &Client) {
    let crd_yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../crds/celeries.celeryproject.org.yaml"
    ))
    .unwrap();
    let crd: CustomResourceDefinition = serde_saphyr::from_str(&crd_yaml).unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        &crd.name_any(),
        &PatchParams::apply("test").force(),
        &Patch::Apply(&crd),
    )
    .await
    .unwrap();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for ns in [NS, OPERATOR_NS] {
        let n = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
        namespaces
            .patch(ns, &PatchParams::apply("test").force(), &Patch::Apply(&n))
            .await
            .unwrap();
    }
    secret(client, "redis://127.0.0.1:1/0").await;
}

async fn secret(client: &Client, url: &str) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let s = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "broker"},
                   "data": {"url": k8s_openapi::ByteString(url.as_bytes().to_vec())}});
    secrets
        .patch(
            "broker",
            &PatchParams::apply("test").force(),
            &Patch::Apply(&s),
        )
        .await
        .unwrap();
}

fn celery(name: &str, spec: &str) -> Value {
    let spec: Value = serde_saphyr::from_str(spec).unwrap();
    json!({"apiVersion": "celeryproject.org/v1alpha1", "kind": "Celery",
           "metadata": {"name": name, "namespace": NS}, "spec": spec})
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

async fn apply_celery(client: &Client, object: &Value) {
    let api: Api<kube::core::DynamicObject> = celeries(client);
    api.patch(
        object["metadata"]["name"].as_str().unwrap(),
        &PatchParams::apply("test").force(),
        &Patch::Apply(object),
    )
    .await
    .unwrap();
}

fn celeries(client: &Client) -> Api<kube::core::DynamicObject> {
    let ar = kube::discovery::ApiResource::from_gvk_with_plural(
        &kube::core::GroupVersionKind::gvk("celeryproject.org", "v1alpha1", "Celery"),
        "celeries",
    );
    Api::namespaced_with(client.clone(), NS, &ar)
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

async fn deployment_names(client: &Client) -> Vec<String> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), NS);
    let mut names: Vec<String> = api
        .list(&ListParams::default())
        .await
        .map(|l| l.items.iter().map(|d| d.name_any()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// What the kubelet and the Deployment controller would report: every Deployment's pods
/// ready for its current generation.
async fn make_deployments_ready(client: &Client) {
    let api: Api<Deployment> = Api::namespaced(client.clone(), NS);
    for d in api.list(&ListParams::default()).await.unwrap().items {
        let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let status = json!({"status": {"observedGeneration": d.metadata.generation, "replicas": replicas,
                                       "updatedReplicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas}});
        let s = d.status.clone().unwrap_or_default();
        if s.ready_replicas == Some(replicas) && s.observed_generation == d.metadata.generation {
            continue;
        }
        api.patch_status(
            &d.name_any(),
            &PatchParams::default(),
            &Patch::Merge(status),
        )
        .await
        .unwrap();
    }
}

/// Replicas of the `fast` pool's Deployment.
async fn fast_replicas(client: &Client) -> Option<i32> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    deployments
        .get("shop-worker-fast")
        .await
        .ok()?
        .spec?
        .replicas
}

async fn condition(client: &Client, name: &str, type_: &str) -> Option<Value> {
    let c = celeries(client).get(name).await.ok()?;
    c.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

/// Create -> children with owner references -> Ready; update, remove a pool, disable Flower
/// -> changed and pruned; a deleted child comes back; deleting the resource deletes all.
/// `simulate` plays the kubelet (not on a real cluster, which has its own).
async fn lifecycle(client: &Client, op: &Operator, simulate: bool) {
    let long = Duration::from_secs(60);
    apply_celery(client, &celery("shop", SPEC)).await;
    let want = [
        "shop-beat",
        "shop-flower",
        "shop-worker-fast",
        "shop-worker-slow",
    ];
    wait(long, "the four Deployments exist", op, || async {
        (deployment_names(client).await == want).then_some(())
    })
    .await;
    let uid = celeries(client).get("shop").await.unwrap().uid().unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    for d in deployments
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
    {
        let owner = &d.owner_references()[0];
        assert_eq!(
            (owner.uid.as_str(), owner.controller),
            (uid.as_str(), Some(true))
        );
    }
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    assert!(services.get_opt("shop-flower").await.unwrap().is_some());

    if simulate {
        make_deployments_ready(client).await;
        wait(long, "the resource is Ready", op, || async {
            let ready = condition(client, "shop", "Ready").await?;
            (ready["status"] == "True").then_some(())
        })
        .await;
    }

    // Update a pool, remove another, disable Flower.
    let changed = SPEC
        .replace("replicas: 2, concurrency: 4", "replicas: 3, concurrency: 8")
        .replace("  - {name: slow, queues: [slow], replicas: 1}\n", "")
        .replace("flower: {enabled: true}", "flower: {enabled: false}");
    apply_celery(client, &celery("shop", &changed)).await;
    wait(long, "the slow pool and Flower are pruned", op, || async {
        (deployment_names(client).await == ["shop-beat", "shop-worker-fast"]).then_some(())
    })
    .await;
    wait(long, "the fast pool is updated", op, || async {
        let d = deployments.get("shop-worker-fast").await.ok()?;
        let args = d.spec?.template.spec?.containers[0].args.clone()?;
        args.contains(&"8".to_string()).then_some(())
    })
    .await;
    assert_eq!(
        deployments
            .get("shop-worker-fast")
            .await
            .unwrap()
            .spec
            .unwrap()
            .replicas,
        Some(3)
    );
    assert!(services.get_opt("shop-flower").await.unwrap().is_none());

    // A deleted child is recreated.
    let before = deployments.get("shop-worker-fast").await.unwrap().uid();
    deployments
        .delete("shop-worker-fast", &DeleteParams::default())
        .await
        .unwrap();
    wait(long, "the deleted Deployment is back", op, || async {
        let d = deployments.get_opt("shop-worker-fast").await.ok()??;
        (d.uid() != before).then_some(())
    })
    .await;

    // Deleting the resource deletes everything it owns.
    celeries(client)
        .delete("shop", &DeleteParams::default())
        .await
        .unwrap();
    wait(long, "every child is gone", op, || async {
        deployment_names(client).await.is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn lifecycle_against_the_test_api_server() {
    let cluster = Cluster::start().await;
    let op = cluster.operator("operator", &[]);
    lifecycle(&cluster.client, &op, true).await;
    let requests = cluster.server.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.watch && r.path.ends_with("/celeries")),
        "the controller watches"
    );
}

/// Runs the lifecycle against the cluster `KUBECONFIG` points to, in a namespace of its own;
/// skipped when `KUBECONFIG` is not set.
#[tokio::test]
async fn real_cluster_lifecycle() {
    let Ok(path) = std::env::var("KUBECONFIG") else {
        eprintln!("skipped: KUBECONFIG is not set (see README, End to end on a real cluster)");
        return;
    };
    let client = client_for(Path::new(&path)).await;
    install(&client).await;
    let dir = tempdir::Dir::new("e2e");
    let op = Operator::start(
        Path::new(&path),
        &dir.path().join("operator.log"),
        &["--namespace", NS],
    );
    lifecycle(&client, &op, false).await;
}

#[tokio::test]
async fn a_restarted_operator_resumes_without_writes() {
    let cluster = Cluster::start().await;
    let client = &cluster.client;
    let op = cluster.operator("first", &[]);
    apply_celery(client, &celery("shop", SPEC)).await;
    wait(Duration::from_secs(60), "the Deployments", &op, || async {
        (deployment_names(client).await.len() == 4).then_some(())
    })
    .await;
    make_deployments_ready(client).await;
    wait(Duration::from_secs(60), "Ready", &op, || async {
        (condition(client, "shop", "Ready").await?["status"] == "True").then_some(())
    })
    .await;
    // Settled: a quiet period sends no writes at all.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mark = cluster.server.request_count();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        cluster.writes_since(mark),
        Vec::<String>::new(),
        "no writes while nothing changes"
    );
    let quiet = cluster.server.requests_since(mark).len();

    drop(op);
    let mark = cluster.server.request_count();
    let op = cluster.operator("second", &[]);
    wait(
        Duration::from_secs(60),
        "the new operator watches",
        &op,
        || async {
            cluster
                .server
                .requests_since(mark)
                .iter()
                .any(|r| r.watch && r.path.ends_with("/celeries"))
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let writes = cluster.writes_since(mark);
    assert_eq!(writes, Vec::<String>::new(), "a restart rewrites nothing");
    eprintln!(
        "restart: {} requests (reads and watches) to resume, quiet period: {quiet} requests in 5 s",
        cluster.server.requests_since(mark).len()
    );
    drop(op);
}

fn plugin_configmap(bytes: &[u8]) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": "hpa-plugin", "namespace": OPERATOR_NS, "labels": {"celeryproject.org/plugin": "hpa"}},
           "binaryData": {"plugin.wasm": k8s_openapi::ByteString(bytes.to_vec())}})
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/{name}.wasm", env!("CELERY_PLUGIN_DIR"))).unwrap()
}

/// The autoscaler plugin use in the resource's status: (digest, source).
async fn autoscaler_use(client: &Client) -> Option<(String, String)> {
    let c = celeries(client).get("shop").await.ok()?;
    let uses = c.data["status"]["plugins"].as_array()?;
    let u = uses.iter().find(|u| u["role"] == "autoscaler")?;
    Some((
        u["digest"].as_str()?.to_string(),
        u["source"].as_str()?.to_string(),
    ))
}

#[tokio::test]
async fn plugin_configmaps_swap_live_and_broken_builds_are_refused() {
    let cluster = Cluster::start().await;
    let client = &cluster.client;
    let op = cluster.operator("operator", &[]);
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
    apply_celery(client, &celery("shop", spec)).await;
    let long = Duration::from_secs(60);
    let (builtin, source) = wait(long, "the built-in hpa plugin is used", &op, || {
        autoscaler_use(client)
    })
    .await;
    assert_eq!(source, "builtin");

    // A ConfigMap named for the plugin replaces the built-in (here with the keda build).
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), OPERATOR_NS);
    let apply = |bytes: Vec<u8>| {
        let configmaps = configmaps.clone();
        async move {
            configmaps
                .patch(
                    "hpa-plugin",
                    &PatchParams::apply("test").force(),
                    &Patch::Apply(plugin_configmap(&bytes)),
                )
                .await
                .unwrap();
        }
    };
    apply(fixture("keda")).await;
    let (swapped, source) = wait(long, "the ConfigMap build is used", &op, || async {
        autoscaler_use(client).await.filter(|(d, _)| *d != builtin)
    })
    .await;
    assert_eq!(source, format!("configmap {OPERATOR_NS}/hpa-plugin"));

    // Replaced by another good build (the hpa build, now from the ConfigMap): used.
    apply(fixture("hpa")).await;
    let (digest, source) = wait(long, "the second build is used", &op, || async {
        autoscaler_use(client).await.filter(|(d, _)| *d != swapped)
    })
    .await;
    assert_eq!(digest, builtin);
    assert_eq!(source, format!("configmap {OPERATOR_NS}/hpa-plugin"));

    // Replaced by a broken build: refused, the good one keeps working, and the status says so.
    apply(b"not a component".to_vec()).await;
    let healthy = wait(long, "the refusal is reported", &op, || async {
        let c = condition(client, "shop", "PluginsHealthy").await?;
        (c["status"] == "False").then_some(c)
    })
    .await;
    assert!(
        healthy["message"].as_str().unwrap().contains("hpa"),
        "{healthy}"
    );
    let (digest, source) = autoscaler_use(client).await.unwrap();
    assert_eq!(digest, builtin, "the last good build keeps running");
    assert_eq!(source, format!("configmap {OPERATOR_NS}/hpa-plugin"));
}

#[tokio::test]
async fn queue_length_scaling_patches_the_scale_subresource() {
    let cluster = Cluster::start().await;
    let client = &cluster.client;
    let redis = support::Redis::start();
    secret(client, &redis.url()).await;
    let op = cluster.operator("operator", &[]);
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
    apply_celery(client, &celery("shop", spec)).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    let long = Duration::from_secs(60);
    wait(long, "the pool's Deployment", &op, || async {
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
    wait(long, "30 tasks scale the pool to 6", &op, || async {
        let d = deployments.get("shop-worker-jobs").await.ok()?;
        (d.spec?.replicas == Some(6)).then_some(())
    })
    .await;
    assert!(
        cluster.server.requests().iter().any(|r| r.method == "PATCH" && r.path.ends_with("/deployments/shop-worker-jobs/scale")),
        "through the scale subresource"
    );
    let entry = wait(long, "the scaling status", &op, || async {
        let c = celeries(client).get("shop").await.ok()?;
        let e = c.data["status"]["scaling"][0].clone();
        (e["desiredReplicas"] == 6).then_some(e)
    })
    .await;
    assert_eq!(entry["queued"], 30);
    // The reconciler's own status is still there beside the scaler's entry (two field managers).
    assert!(condition(client, "shop", "Ready").await.is_some());
}

#[tokio::test]
async fn the_operator_recovers_from_faults_without_a_hot_loop() {
    let mut cluster = Cluster::start().await;
    let client = cluster.client.clone();
    let op = cluster.operator("operator", &[]);
    let long = Duration::from_secs(120);

    // One request in twenty fails with 500 and one write in twenty with 409 while it
    // converges. A reconcile sends about 16 requests, so most attempts meet a fault; each
    // failure is retried after 1 s, 2 s, 4 s, ..., and what an attempt applied stays applied.
    cluster.server.set_faults(Faults {
        error_share: 0.05,
        conflict_share: 0.05,
        ..Default::default()
    });
    let api = celeries(&client);
    let object = celery("shop", SPEC);
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
        (deployment_names(&client).await.len() == 4).then_some(())
    })
    .await;
    cluster.server.set_faults(Faults::default());

    // The API server goes away for a while and comes back.
    cluster.server.stop().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.server.restart().await;
    let changed = SPEC.replace("replicas: 2, concurrency: 4", "replicas: 4, concurrency: 4");
    apply_celery(&client, &celery("shop", &changed)).await;
    wait(
        long,
        "a change after the outage is applied",
        &op,
        || async { (fast_replicas(&client).await == Some(4)).then_some(()) },
    )
    .await;

    // Dropped watches: the next change still arrives.
    cluster.server.drop_watches();
    let changed = SPEC.replace("replicas: 2, concurrency: 4", "replicas: 5, concurrency: 4");
    apply_celery(&client, &celery("shop", &changed)).await;
    wait(
        long,
        "a change after dropped watches is applied",
        &op,
        || async { (fast_replicas(&client).await == Some(5)).then_some(()) },
    )
    .await;

    // Settled: no hot loop. Watches stay open; a handful of requests at most.
    make_deployments_ready(&client).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mark = cluster.server.request_count();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let requests = cluster.server.requests_since(mark);
    assert_eq!(cluster.writes_since(mark), Vec::<String>::new());
    assert!(
        requests.len() < 20,
        "a hot loop: {} requests in 5 s: {requests:?}",
        requests.len()
    );
}

#[tokio::test]
async fn many_resources_converge() {
    let cluster = Cluster::start().await;
    let client = &cluster.client;
    let op = cluster.operator("operator", &[]);
    const N: usize = 200;
    let start = Instant::now();
    let api = celeries(client);
    let spec = r#"
app: tasks
image: img
broker: {secretRef: {name: broker, key: url}}
workers:
  - {name: default, queues: [celery], replicas: 1}
"#;
    for i in 0..N {
        let object = celery(&format!("app-{i:03}"), spec);
        api.create(
            &PostParams::default(),
            &serde_json::from_value(object).unwrap(),
        )
        .await
        .unwrap();
    }
    wait(
        Duration::from_secs(300),
        "every resource has its Deployment",
        &op,
        || async { (deployment_names(client).await.len() == N).then_some(()) },
    )
    .await;
    make_deployments_ready(client).await;
    wait(
        Duration::from_secs(300),
        "every resource is Ready",
        &op,
        || async {
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
        },
    )
    .await;
    let took = start.elapsed();
    let requests = cluster.server.requests();
    println!(
        "many resources: {N} Celery resources created and Ready in {took:.1?}; {} requests ({} writes); operator peak RSS {} MiB",
        requests.len(),
        requests.iter().filter(|r| r.is_write()).count(),
        op.peak_rss_kib() / 1024
    );
}

/// The holder of the leader-election Lease.
async fn lease_holder(client: &Client) -> Option<String> {
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), OPERATOR_NS);
    leases
        .get("celery-operator")
        .await
        .ok()?
        .spec?
        .holder_identity
}

#[tokio::test]
async fn two_replicas_elect_one_leader_and_the_other_takes_over() {
    let cluster = Cluster::start().await;
    let client = &cluster.client;
    let a = cluster.operator("a", &["--leader-elect", "--instance", "a"]);
    let b = cluster.operator("b", &["--leader-elect", "--instance", "b"]);
    let long = Duration::from_secs(60);
    let leader = wait(long, "a leader", &a, || lease_holder(client)).await;
    apply_celery(client, &celery("shop", SPEC)).await;
    wait(long, "the leader applies the children", &a, || async {
        (deployment_names(client).await.len() == 4).then_some(())
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
    let next = wait(
        Duration::from_secs(60),
        "the standby holds the Lease",
        &standby,
        || async { lease_holder(client).await.filter(|h| *h != leader) },
    )
    .await;
    assert_eq!(next, standby_id);
    let changed = SPEC.replace("replicas: 2, concurrency: 4", "replicas: 6, concurrency: 4");
    apply_celery(client, &celery("shop", &changed)).await;
    wait(
        long,
        "the new leader applies a change",
        &standby,
        || async { (fast_replicas(client).await == Some(6)).then_some(()) },
    )
    .await;

    // A leader stopped cleanly (SIGTERM) gives the Lease up rather than letting it expire.
    let mut standby = standby;
    assert!(standby.terminate().await.success(), "{}", standby.log());
    assert_eq!(lease_holder(client).await, None, "released on shutdown");
}
