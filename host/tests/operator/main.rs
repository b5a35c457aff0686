//! The operator binary as users run it: a separate process, connected through a kubeconfig
//! file to a cluster. Every scenario that needs no fault injection runs twice: against the
//! in-memory test API server (`apiserver/`, fast, with fault injection) and against the
//! real control plane of the test tier (`tests/control-plane`: kube-apiserver with RBAC, etcd,
//! the controller manager), where the operator authenticates as the Helm chart's
//! ServiceAccount and what it sent is read from the audit log. The test plays the kubelet.
//!
//! What the operator sends is observed on both tiers (the in-memory server tells the
//! operator's requests from the test's own by its token): scenarios assert exactly which
//! writes a change causes, once the operator settled.
//!
//! - `lifecycle`: create, Ready, update, prune, repair, delete; RBAC coverage; a restart; the
//!   default chart with the examples; the same lifecycle on a cluster of the user's
//!   (`real_cluster_lifecycle`, when `KUBECONFIG` is set: see the README, "End to end on a
//!   real cluster").
//! - `reconcile`: invalid specs, a failed apply.
//! - `autoscaling`: HPA to KEDA, the operator's own queue-length scaler on a real Redis.
//! - `plugins`: plugin ConfigMaps swapped live, hostile plugins.
//! - `registry`: plugins pulled from a registry by digest, signatures required.
//! - `resilience`: API faults and outages, leader election, 200 resources.
//! - `workers`: worker heartbeats rank pods (deletion cost), a silent worker's pod evicted.

#[path = "../support/mod.rs"]
mod support;

mod autoscaling;
mod lifecycle;
mod plugins;
mod reconcile;
mod registry;
mod resilience;
mod workers;

/// A resource with every kind of child but the Ingress and KEDA's: a pool with a fixed
/// replica count and a PodDisruptionBudget, a pool autoscaled by the default autoscaler (a
/// HorizontalPodAutoscaler), Flower (a Deployment and a Service) and beat.
const SPEC: &str = r#"
app: tasks
image: img
broker: {secretRef: {name: broker, key: url}}
workers:
  - {name: fast, queues: [fast], replicas: 2, concurrency: 4, podDisruptionBudget: {maxUnavailable: 1}}
  - name: slow
    queues: [slow]
    autoscaling:
      minReplicas: 1
      maxReplicas: 5
      metrics: [{name: cpu, target: {type: Utilization, averageUtilization: 70}}]
flower: {enabled: true}
beat: {enabled: true}
"#;

/// The writes that create every child of [`SPEC`] for resource `shop`.
const CREATE_SHOP: [&str; 7] = [
    "patch deployments/shop-worker-fast",
    "patch poddisruptionbudgets/shop-worker-fast",
    "patch deployments/shop-worker-slow",
    "patch horizontalpodautoscalers/shop-worker-slow",
    "patch deployments/shop-flower",
    "patch services/shop-flower",
    "patch deployments/shop-beat",
];

/// Every child kind the operator manages (all served on both tiers: KEDA's CRDs are
/// installed), by plural.
const CHILD_RESOURCES: [&str; 7] = [
    "deployments",
    "horizontalpodautoscalers",
    "ingresses",
    "poddisruptionbudgets",
    "scaledobjects",
    "services",
    "triggerauthentications",
];

/// Replicas of the `fast` pool's Deployment of resource `shop`.
async fn fast_replicas(cluster: &support::cluster::Cluster) -> Option<i32> {
    cluster
        .deployments()
        .get("shop-worker-fast")
        .await
        .ok()?
        .spec?
        .replicas
}
