//! The operator when things go wrong around it: API errors, conflicts, an outage, dropped
//! watches; its leader going away; 200 resources at once.

use std::time::{Duration, Instant};

use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use memory_apiserver::Faults;

use super::{SPEC, fast_replicas};
use crate::support::cluster::{Cluster, LONG, wait};

/// Two plain pools, Flower and beat: the fewer requests a reconcile sends, the more attempts
/// get through one fault in twenty (and each failure doubles the wait before the next).
const PLAIN: &str = r#"
app: tasks
image: img
broker: {secretRef: {name: broker, key: url}}
workers:
  - {name: fast, queues: [fast], replicas: 2, concurrency: 4}
  - {name: slow, queues: [slow], replicas: 1}
flower: {enabled: true}
beat: {enabled: true}
"#;

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
    let api = cluster.celeries();
    let object = cluster.celery("shop", PLAIN);
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
        (cluster.deployment_names().await.len() == 4).then_some(())
    })
    .await;
    cluster.server().set_faults(Faults::default());

    // The API server goes away for a while and comes back.
    cluster.server().stop().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.server().restart().await;
    let changed = PLAIN.replace("replicas: 2, concurrency: 4", "replicas: 4, concurrency: 4");
    cluster
        .apply_celery(&cluster.celery("shop", &changed))
        .await;
    wait(
        long,
        "a change after the outage is applied",
        &op,
        || async { (fast_replicas(&cluster).await == Some(4)).then_some(()) },
    )
    .await;

    // Dropped watches: the next change still arrives.
    cluster.server().drop_watches();
    let changed = PLAIN.replace("replicas: 2, concurrency: 4", "replicas: 5, concurrency: 4");
    cluster
        .apply_celery(&cluster.celery("shop", &changed))
        .await;
    wait(
        long,
        "a change after dropped watches is applied",
        &op,
        || async { (fast_replicas(&cluster).await == Some(5)).then_some(()) },
    )
    .await;

    // No hot loop: once ready, the operator goes quiet (no request, no reconcile) and its
    // watches stay open.
    cluster.until_ready(&op, "shop").await;
    cluster.settle(&op).await;
}

#[tokio::test]
async fn many_resources_converge() {
    let cluster = Cluster::in_memory().await;
    let op = cluster.operator("operator", &[]);
    const N: usize = 200;
    let start = Instant::now();
    let api = cluster.celeries();
    let spec = r#"
app: tasks
image: img
broker: {secretRef: {name: broker, key: url}}
workers:
  - {name: default, queues: [celery], replicas: 1}
"#;
    for i in 0..N {
        let object = cluster.celery(&format!("app-{i:03}"), spec);
        api.create(
            &PostParams::default(),
            &serde_json::from_value(object).unwrap(),
        )
        .await
        .unwrap();
    }
    let long = Duration::from_secs(300);
    wait(long, "every resource has its Deployment", &op, || async {
        (cluster.deployment_names().await.len() == N).then_some(())
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
    cluster.apply_celery(&cluster.celery("shop", SPEC)).await;
    wait(LONG, "the leader applies the children", &a, || async {
        (cluster.deployment_names().await.len() == 4).then_some(())
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
    cluster
        .apply_celery(&cluster.celery("shop", &changed))
        .await;
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
    cluster.assert_rbac(0, &standby);
}

#[tokio::test]
async fn two_replicas_elect_one_leader_and_the_other_takes_over_in_memory() {
    leader_election(&Cluster::in_memory().await).await;
}

#[tokio::test]
async fn two_replicas_elect_one_leader_and_the_other_takes_over_on_the_real_control_plane() {
    leader_election(&Cluster::real().await).await;
}
