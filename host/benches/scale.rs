//! The operator at scale on the real control plane of the test tier (kube-apiserver 1.20 with
//! etcd and the controller manager, the chart's default RBAC, the operator authenticated as
//! its ServiceAccount): N Celery resources (one pool each) are created and settle; then the
//! operator is restarted. Every request is counted from the API server's audit log.
//!
//! `cargo bench -p celery-operator --bench scale` (N = 1000; `SCALE_RESOURCES=...` for another
//! number).
//! Prints, per phase: the time, the operator's requests by verb, its writes, and its peak RSS.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kube::api::{Api, DynamicObject, ListParams, PostParams};
use serde_json::json;
use support::cluster::{Cluster, Operator};

/// The operator counts as settled once it sent nothing and finished no reconcile for this long.
const QUIET: Duration = Duration::from_secs(10);
/// The longest a phase may take to settle.
const LIMIT: Duration = Duration::from_secs(1800);

fn main() {
    let n: usize = std::env::var("SCALE_RESOURCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(n));
}

fn celeries(cluster: &Cluster) -> Api<DynamicObject> {
    let ar = kube::discovery::ApiResource::from_gvk_with_plural(
        &kube::core::GroupVersionKind::gvk("celeryproject.org", "v1alpha1", "Celery"),
        "celeries",
    );
    Api::namespaced_with(cluster.client.clone(), &cluster.ns, &ar)
}

/// Resources whose status says Ready.
async fn ready(cluster: &Cluster) -> usize {
    let Ok(list) = celeries(cluster).list(&ListParams::default()).await else {
        return 0;
    };
    list.items
        .iter()
        .filter(|c| {
            c.data["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
        })
        .count()
}

fn report(phase: &str, took: Duration, cluster: &Cluster, mark: u64, op: &Operator) {
    let sent = cluster.sent_since(mark);
    let mut by_verb: BTreeMap<String, usize> = BTreeMap::new();
    for s in &sent {
        let verb = s.line.split(' ').next().unwrap_or_default().to_string();
        *by_verb.entry(verb).or_default() += 1;
    }
    // LIST requests by collection (the path without its query), to check "one per kind".
    let mut lists: BTreeMap<String, usize> = BTreeMap::new();
    for s in sent.iter().filter(|s| s.line.starts_with("list ")) {
        let path = s.line.split(' ').nth(1).unwrap_or_default();
        let collection = path.split('?').next().unwrap_or_default();
        let kind = collection
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        *lists.entry(kind).or_default() += 1;
    }
    let writes = sent.iter().filter(|s| s.write).count();
    let forbidden = sent.iter().filter(|s| s.forbidden).count();
    println!(
        "{phase}: {took:.1?}; {} requests {by_verb:?}; lists {lists:?}; {writes} writes; {forbidden} forbidden; operator peak RSS {} MiB",
        sent.len(),
        op.peak_rss_kib() / 1024
    );
}

async fn run(n: usize) {
    let cluster = Cluster::real_with_default_chart().await;
    let mut op = cluster.operator("first", &[]);
    let spec = json!({"app": "tasks", "image": "img",
                      "broker": {"secretRef": {"name": "broker", "key": "url"}},
                      "workers": [{"name": "default", "queues": ["celery"], "replicas": 1}]});
    let mark = cluster.mark();
    let start = Instant::now();
    for i in 0..n {
        let object = json!({"apiVersion": "celeryproject.org/v1alpha1", "kind": "Celery",
                            "metadata": {"name": format!("app-{i:04}"), "namespace": cluster.ns},
                            "spec": spec});
        celeries(&cluster)
            .create(
                &PostParams::default(),
                &serde_json::from_value(object).unwrap(),
            )
            .await
            .unwrap();
    }
    let created = start.elapsed();
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(cluster.client.clone(), &cluster.ns);
    loop {
        let have = deployments
            .list(&ListParams::default())
            .await
            .map(|l| l.items.len())
            .unwrap_or(0);
        if have == n {
            break;
        }
        op.assert_running();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "{n} resources created in {created:.1?}; every Deployment applied after {:.1?}",
        start.elapsed()
    );
    while ready(&cluster).await < n {
        op.assert_running();
        cluster.make_ready().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let all_ready = start.elapsed();
    let settled = cluster.settle_within(&op, QUIET, LIMIT).await;
    report(
        &format!("create -> all Ready in {all_ready:.1?}, settled after"),
        settled - start,
        &cluster,
        mark,
        &op,
    );

    drop(op);
    let mark = cluster.mark();
    let start = Instant::now();
    // A short resync, so the settled phase below spans one.
    let mut op = cluster.operator("second", &["--resync-seconds", "20"]);
    while op.reconciled() < n as f64 {
        op.assert_running();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let resumed = start.elapsed();
    let settled = cluster.settle_within(&op, QUIET, LIMIT).await;
    report(
        &format!("restart -> all {n} reconciled in {resumed:.1?}, settled after"),
        settled - start,
        &cluster,
        mark,
        &op,
    );
    let mark = cluster.mark();
    tokio::time::sleep(Duration::from_secs(30)).await;
    report(
        "settled, 30 s (resync every 20 s: every resource reconciled at least once)",
        Duration::from_secs(30),
        &cluster,
        mark,
        &op,
    );
}
