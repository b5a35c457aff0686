//! The Celery-aware worker lifecycle with real workers: the operator binary follows the
//! workers' heartbeats on a real Redis, against the in-memory API server, with the sandbox's
//! kubelet running each pod as real Celery worker processes. A pool scaled 4 -> 1 while one
//! worker runs a long task keeps that worker (and the task runs once); a worker stopped with
//! SIGSTOP is reported stalled, and recovers with SIGCONT.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use celery_operator::crd::Celery;
use celery_operator::lifecycle::roster::DELETION_COST;
use celery_operator::sandbox::{self, NAMESPACE, kubelet, services};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::support::{eventually, tempdir};

/// One task at a time per worker and none reserved ahead, a grace period longer than the
/// task, stalled after 8 s without a heartbeat (Celery sends one every 2 s).
const RESOURCE: &str = r#"
apiVersion: celeryproject.org/v1alpha1
kind: Celery
metadata: {name: life}
spec:
  app: tasks
  image: example.com/life:1
  broker: {secretRef: {name: celery-broker, key: url}}
  workers:
    - name: work
      queues: [work]
      pool: threads
      concurrency: 1
      prefetchMultiplier: 1
      replicas: REPLICAS
      terminationGracePeriodSeconds: 120
      lifecycle: {enabled: true, stalledAfterSeconds: 8}
"#;
const LONG_TASK_SECONDS: u32 = 40;
const LIMIT: Duration = Duration::from_secs(120);

fn resource(replicas: u32) -> Celery {
    let mut celery: Celery =
        serde_saphyr::from_str(&RESOURCE.replace("REPLICAS", &replicas.to_string())).unwrap();
    celery.metadata.namespace = Some(NAMESPACE.into());
    celery
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Pod name -> its deletion cost annotation (if any).
async fn pods(api: &Api<Pod>) -> Vec<(String, Option<String>)> {
    let list = api.list(&ListParams::default()).await.unwrap();
    list.items
        .iter()
        .map(|p| (p.name_any(), p.annotations().get(DELETION_COST).cloned()))
        .collect()
}

async fn live_workers(celeries: &Api<DynamicObject>) -> Value {
    let celery = celeries.get("life").await.unwrap();
    celery.data["status"]["liveWorkers"][0].clone()
}

/// Sends SIGSTOP or SIGCONT to the process group of the pod's worker (the sandbox's kubelet
/// runs each pod in a group of its own; `%h` on its command line is the pod's name).
fn signal_pod(pod: &str, signal: i32) {
    let out = std::process::Command::new("pgrep")
        .args(["-f", &format!("work@{pod}")])
        .output()
        .unwrap();
    let pids: Vec<i32> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    assert!(!pids.is_empty(), "no process of pod {pod}");
    for pid in pids {
        // SAFETY: plain syscalls on process ids this test's kubelet started.
        unsafe {
            let group = libc::getpgid(pid);
            if group > 0 {
                libc::killpg(group, signal);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_workers_survive_a_scale_down_and_a_stopped_worker_is_reported() {
    let dir = tempdir::Dir::new("worker-lifecycle");
    let out = dir.path();
    let venv = PathBuf::from(
        std::env::var_os("CELERY_OPERATOR_CACHE").expect("scripts/setup.sh exports it"),
    )
    .join("venv");
    let app_dir = root().join("examples/sandbox");

    let apiserver = memory_apiserver::ApiServer::start().await;
    let kubeconfig = out.join("kubeconfig");
    apiserver.write_kubeconfig(&kubeconfig);
    let client = Client::try_from(kube::Config::new(apiserver.url().parse().unwrap())).unwrap();
    let redis = services::Redis::start(&out.join("redis")).await.unwrap();
    let url = format!("redis://127.0.0.1:{}/0", redis.port);
    sandbox::install(&client, &resource(4), &url).await.unwrap();
    let operator = services::Operator::start(
        Path::new(env!("CARGO_BIN_EXE_celery-operator")),
        &kubeconfig,
        &out.join("operator.log"),
    )
    .unwrap();
    let (stop_kubelet, stopped) = tokio::sync::watch::channel(false);
    std::fs::create_dir_all(out.join("pods")).unwrap();
    let kubelet = tokio::spawn(
        kubelet::Kubelet::new(
            client.clone(),
            NAMESPACE,
            kubelet::Runtime {
                app_dir: app_dir.clone(),
                path_prefix: vec![venv.join("bin")],
                logs: out.join("pods"),
            },
        )
        .run(stopped),
    );
    let log = || {
        format!(
            "\noperator log:\n{}",
            std::fs::read_to_string(out.join("operator.log")).unwrap_or_default()
        )
    };
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
    let ar = kube::api::ApiResource::erase::<Celery>(&());
    let celeries: Api<DynamicObject> = Api::namespaced_with(client.clone(), NAMESPACE, &ar);
    let ready = |n: i32| {
        let deployments = deployments.clone();
        move || {
            let deployments = deployments.clone();
            async move {
                let d = deployments.get_opt("life-worker-work").await.ok()??;
                (d.status?.ready_replicas? == n).then_some(())
            }
        }
    };
    eventually(LIMIT, "4 workers are ready", log, ready(4)).await;
    eventually(LIMIT, "the operator heard from 4 workers", log, || async {
        (live_workers(&celeries).await["seen"] == 4).then_some(())
    })
    .await;

    // One long task: the worker running it becomes busy and its pod costs more.
    let mut sender = services::sender(
        &venv.join("bin/python"),
        &app_dir,
        &url,
        &out.join("sender.log"),
    )
    .unwrap();
    let mut sender_in = sender.stdin.take().unwrap();
    let line = format!("1 {LONG_TASK_SECONDS} work\n");
    sender_in.write_all(line.as_bytes()).await.unwrap();
    let sent = Instant::now();
    let busy = eventually(LIMIT, "a worker pod costs 100", log, || async {
        let pods = pods(&pod_api).await;
        let busy: Vec<String> = pods
            .iter()
            .filter(|(_, cost)| cost.as_deref() == Some("100"))
            .map(|(name, _)| name.clone())
            .collect();
        (busy.len() == 1).then(|| busy[0].clone())
    })
    .await;
    let marked_after = sent.elapsed();
    assert_eq!(live_workers(&celeries).await["busy"], 1);

    // 4 -> 1 while the task runs: the busy worker stays, the task runs once.
    let apply = PatchParams::apply("test").force();
    celeries
        .patch("life", &apply, &Patch::Apply(&resource(1)))
        .await
        .unwrap();
    let scaled = Instant::now();
    let left = eventually(LIMIT, "one pod is left", log, || async {
        let pods = pods(&pod_api).await;
        (pods.len() == 1).then(|| pods[0].0.clone())
    })
    .await;
    let scale_down = scaled.elapsed();
    assert_eq!(left, busy, "the busy worker was removed");
    let mut broker = redis.client().await.unwrap();
    eventually(LIMIT, "the long task is done", log, || {
        let mut broker = broker.clone();
        async move { (services::task_counts(&mut broker).await.1 == 1).then_some(()) }
    })
    .await;
    let accounting = services::accounting(&mut broker).await.unwrap();
    assert_eq!(
        (accounting.sent, accounting.completed, accounting.lost),
        (1, 1, 0)
    );
    assert_eq!(accounting.run_more_than_once, 0);
    println!(
        "lifecycle: busy pod marked {marked_after:?} after the task was sent; 3 idle pods gone \
         {scale_down:?} after 4 -> 1; the task ran once"
    );

    // A second worker, then stopped: reported stalled, removed first, then recovered.
    celeries
        .patch("life", &apply, &Patch::Apply(&resource(2)))
        .await
        .unwrap();
    eventually(LIMIT, "2 workers are ready", log, ready(2)).await;
    let fresh = eventually(LIMIT, "the operator heard from 2 workers", log, || async {
        let pods = pods(&pod_api).await;
        let fresh = pods.iter().find(|(name, _)| *name != busy)?.0.clone();
        (live_workers(&celeries).await["seen"] == 2).then_some(fresh)
    })
    .await;
    signal_pod(&fresh, libc::SIGSTOP);
    let stopped_at = Instant::now();
    let entry = eventually(LIMIT, "the stopped worker is reported", log, || async {
        let entry = live_workers(&celeries).await;
        (entry["stalled"] == 1).then_some(entry)
    })
    .await;
    let reported_after = stopped_at.elapsed();
    signal_pod(&fresh, libc::SIGCONT);
    assert_eq!(entry["stalledWorkers"][0], format!("work@{fresh}"));
    let condition = &entry["conditions"][0];
    assert_eq!(condition["type"], "WorkersStalled");
    assert_eq!(condition["status"], "True");
    assert_eq!(condition["reason"], "HeartbeatsStopped");
    let events: Api<Event> = Api::namespaced(client.clone(), NAMESPACE);
    let reasons = || async {
        let list = events.list(&ListParams::default()).await.unwrap();
        list.items
            .iter()
            .map(|e| {
                (
                    e.reason.clone().unwrap_or_default(),
                    e.note.clone().unwrap_or_default(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert!(
        reasons()
            .await
            .iter()
            .any(|(r, note)| r == "WorkerStalled" && note.contains(&fresh)),
        "{:?}",
        reasons().await
    );
    eventually(LIMIT, "the stalled pod costs -100", log, || async {
        let pods = pods(&pod_api).await;
        let cost = pods.iter().find(|(n, _)| *n == fresh)?.1.clone();
        (cost.as_deref() == Some("-100")).then_some(())
    })
    .await;
    // SIGCONT: it beats again and recovers.
    eventually(LIMIT, "the worker recovers", log, || async {
        let entry = live_workers(&celeries).await;
        (entry["stalled"] == 0 && entry["seen"] == 2).then_some(())
    })
    .await;
    assert!(
        reasons().await.iter().any(|(r, _)| r == "WorkerRecovered"),
        "{:?}",
        reasons().await
    );
    println!("lifecycle: a SIGSTOP'd worker reported stalled after {reported_after:?}");

    drop(sender_in);
    let _ = sender.wait().await;
    stop_kubelet.send(true).unwrap();
    kubelet.await.unwrap();
    operator.stop().await;
}
