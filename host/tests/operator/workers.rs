//! The Celery-aware worker lifecycle against the real control plane, with the chart's RBAC:
//! heartbeats published on a real Redis the way Celery publishes them (the pods of the test
//! tier run no processes) rank the pool's pods through their deletion cost, and a worker
//! whose heartbeats stop is reported stalled and, as its pool asks, its pod evicted and
//! replaced by the ReplicaSet. (Real workers and scale-down are in the brokers tier's
//! `worker_lifecycle`.)

use std::time::Duration;

use base64::Engine;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde_json::json;

use crate::support::Redis;
use crate::support::cluster::{Cluster, LONG, wait};

const SPEC: &str = r#"
app: tasks
image: img
broker: {secretRef: {name: broker, key: url}}
workers:
  - name: work
    queues: [work]
    replicas: 3
    lifecycle: {enabled: true, stalledAfterSeconds: 5, replaceStalled: true}
"#;

const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

/// A `worker-heartbeat` event of `work@<pod>` as kombu publishes it on Redis.
fn heartbeat(pod: &str, active: u32) -> String {
    let event = json!({"hostname": format!("work@{pod}"), "freq": 1.0, "active": active,
                       "processed": 0, "type": "worker-heartbeat", "timestamp": 0.0});
    let body = base64::engine::general_purpose::STANDARD.encode(event.to_string());
    json!({"body": body, "content-encoding": "utf-8", "content-type": "application/json",
           "headers": {}, "properties": {"body_encoding": "base64",
           "delivery_info": {"exchange": "celeryev", "routing_key": "worker.heartbeat"}}})
    .to_string()
}

/// The pool's pods (not being deleted) and their deletion costs.
async fn pods(cluster: &Cluster) -> Vec<(String, Option<String>)> {
    let api: Api<Pod> = Api::namespaced(cluster.client.clone(), &cluster.ns);
    let list = api.list(&ListParams::default()).await.unwrap();
    list.items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| (p.name_any(), p.annotations().get(DELETION_COST).cloned()))
        .collect()
}

#[tokio::test]
async fn heartbeats_rank_pods_and_a_silent_worker_is_evicted_on_the_real_control_plane() {
    let cluster = Cluster::real().await;
    let redis = Redis::start();
    cluster.secret(&redis.url()).await;
    let op = cluster.operator("operator", &[]);
    let mark = cluster.mark();
    cluster.apply_celery(&cluster.celery("shop", SPEC)).await;
    let names = wait(LONG, "3 pods of the pool", &op, || async {
        let pods = pods(&cluster).await;
        (pods.len() == 3).then(|| pods.into_iter().map(|(n, _)| n).collect::<Vec<_>>())
    })
    .await;
    let (busy, idle, silent) = (&names[0], &names[1], &names[2]);

    // Heartbeats once a second: `busy` runs a task, the others none; `silent` stops after
    // a few.
    let publisher = {
        let (url, busy, idle, silent) = (redis.url(), busy.clone(), idle.clone(), silent.clone());
        tokio::spawn(async move {
            let mut conn = redis::Client::open(url)
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            for beat in 0.. {
                let mut beats = vec![heartbeat(&busy, 1), heartbeat(&idle, 0)];
                if beat < 3 {
                    beats.push(heartbeat(&silent, 0));
                }
                for message in beats {
                    let _: Result<(), _> = redis::cmd("PUBLISH")
                        .arg("/0.celeryev/worker.heartbeat")
                        .arg(message)
                        .query_async(&mut conn)
                        .await;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };

    wait(
        LONG,
        "the busy pod costs 100, the idle one 0",
        &op,
        || async {
            let pods = pods(&cluster).await;
            let cost = |name: &String| pods.iter().find(|(n, _)| n == name)?.1.clone();
            (cost(busy).as_deref() == Some("100") && cost(idle).as_deref() == Some("0"))
                .then_some(())
        },
    )
    .await;
    // The silent worker is evicted and the ReplicaSet replaces its pod.
    wait(LONG, "the silent worker's pod is replaced", &op, || async {
        let pods = pods(&cluster).await;
        (pods.len() == 3 && !pods.iter().any(|(n, _)| n == silent)).then_some(())
    })
    .await;
    let stalled = cluster.events("WorkerStalled").await;
    let note = stalled
        .first()
        .and_then(|e| e["note"].as_str())
        .unwrap_or_else(|| panic!("no WorkerStalled Event{}", op.log()));
    assert!(
        note.contains(silent.as_str()) && note.contains("evicted"),
        "{note}"
    );
    let entry = wait(LONG, "the live workers status", &op, || async {
        let c = cluster.celeries().get("shop").await.ok()?;
        let entry = c.data["status"]["liveWorkers"][0].clone();
        (entry["busy"] == 1 && entry["idle"] == 1).then_some(entry)
    })
    .await;
    assert_eq!(entry["pool"], "work");
    assert!(entry["lastHeartbeatTime"].is_string(), "{entry}");
    assert_eq!(op.metric("celery_operator_worker_stalls_total"), 1.0);
    // Every request of the follower was allowed by the chart's RBAC: pods are patched and
    // evicted by name, never read.
    assert_eq!(cluster.forbidden_since(mark), Vec::<String>::new());
    let pod_requests: Vec<(String, String)> = cluster
        .sent_since(mark)
        .into_iter()
        .filter(|s| s.path.contains("/pods"))
        .map(|s| (s.verb, s.path))
        .collect();
    assert!(
        pod_requests
            .iter()
            .all(|(verb, path)| verb == "patch" || verb == "create" && path.ends_with("/eviction")),
        "{pod_requests:?}"
    );
    assert!(pod_requests.iter().any(|(verb, _)| verb == "create"));
    publisher.abort();
}
