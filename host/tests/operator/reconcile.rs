//! What a reconcile does when it cannot do its job: an invalid spec (new or as an update)
//! applies and prunes nothing; a failed apply prunes nothing, says why, and is retried until
//! it succeeds.

use kube::api::{Patch, PatchParams};
use memory_apiserver::Faults;
use serde_json::json;

use super::{CHILD_RESOURCES, SPEC};
use crate::support::cluster::{Cluster, LONG, Operator, wait};

/// Waits until the resource `shop` has its four Deployments and is Ready, and the operator
/// settled.
async fn converge(cluster: &Cluster, op: &Operator) {
    wait(LONG, "the four Deployments", op, || async {
        (cluster.deployment_names().await.len() == 4).then_some(())
    })
    .await;
    cluster.until_ready(op, "shop").await;
    cluster.settle(op).await;
}

/// An invalid new resource: no child is read, applied or deleted; the status says why
/// (`Degraded` and `Ready` with reason `InvalidSpec`) and one Event; reconciled again, the same
/// invalid spec is not reported twice. Made valid, it gets its children; an invalid update
/// then leaves them running, says why and writes nothing else.
async fn invalid_specs(cluster: &Cluster) {
    let op = cluster.operator("operator", &[]);
    let mark = cluster.mark();
    let invalid = SPEC.replace("minReplicas: 1", "minReplicas: 9");
    cluster
        .apply_celery(&cluster.celery("shop", &invalid))
        .await;
    let degraded = cluster
        .until_condition(&op, "shop", "Degraded", "True")
        .await;
    assert_eq!(degraded["reason"], "InvalidSpec");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap()
            .contains("minReplicas must be less than or equal to maxReplicas"),
        "{degraded}"
    );
    let ready = cluster.condition("shop", "Ready").await.unwrap();
    assert_eq!(
        (ready["status"].as_str(), ready["reason"].as_str()),
        (Some("False"), Some("InvalidSpec"))
    );
    let writes = cluster.settled_writes(&op, mark).await;
    if cluster.observes_requests() {
        assert_eq!(writes, ["patch celeries/shop/status", "create events"]);
        // (The controller's own watches, which list every child at start, are not about this
        // resource: they select by the operator's label only.)
        let touched: Vec<String> = cluster
            .sent_since(mark)
            .into_iter()
            .filter(|s| s.line.contains("shop"))
            .filter(|s| {
                s.target()
                    .is_some_and(|t| CHILD_RESOURCES.contains(&t.resource.as_str()))
            })
            .map(|s| s.line)
            .collect();
        assert_eq!(
            touched,
            Vec::<String>::new(),
            "no child is read, applied or deleted"
        );
    }
    assert_eq!(cluster.events("InvalidSpec").await.len(), 1);

    // Reconciled again (someone labels the resource): nothing new to say, nothing written.
    let mark = cluster.mark();
    let invalid_reconciles = || op.metric("celery_operator_reconciles_total{result=\"invalid\"}");
    let before = invalid_reconciles();
    assert!(before >= 1.0);
    cluster
        .celeries()
        .patch(
            "shop",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"team": "a"}}})),
        )
        .await
        .unwrap();
    wait(LONG, "another reconcile", &op, || async {
        (invalid_reconciles() > before).then_some(())
    })
    .await;
    assert_eq!(
        cluster.settled_writes(&op, mark).await,
        Vec::<String>::new(),
        "the same invalid spec is not reported twice"
    );
    assert_eq!(cluster.events("InvalidSpec").await.len(), 1);

    // Valid: the children come.
    cluster.apply_celery(&cluster.celery("shop", SPEC)).await;
    converge(cluster, &op).await;

    // An invalid update (two pools of the same name): the running children stay as they are.
    let mark = cluster.mark();
    let duplicate = SPEC.replace("name: slow", "name: fast");
    cluster
        .apply_celery(&cluster.celery("shop", &duplicate))
        .await;
    let degraded = cluster
        .until_condition(&op, "shop", "Degraded", "True")
        .await;
    assert!(
        degraded["message"]
            .as_str()
            .unwrap()
            .contains("worker pool names must be unique"),
        "{degraded}"
    );
    let writes = cluster
        .assert_child_writes(&op, mark, &[], "an invalid update")
        .await;
    if cluster.observes_requests() {
        assert_eq!(writes, ["patch celeries/shop/status", "create events"]);
    }
    assert_eq!(
        cluster.deployment_names().await,
        [
            "shop-beat",
            "shop-flower",
            "shop-worker-fast",
            "shop-worker-slow"
        ]
    );
    cluster.assert_rbac(0, &op);
}

#[tokio::test]
async fn invalid_specs_apply_and_prune_nothing_in_memory() {
    invalid_specs(&Cluster::in_memory().await).await;
}

#[tokio::test]
async fn invalid_specs_apply_and_prune_nothing_on_the_real_control_plane() {
    invalid_specs(&Cluster::real().await).await;
}

/// Every write to a Service is refused (as an admission webhook or a quota would) while the
/// `slow` pool is renamed and Flower's port changed: the reconcile fails at the Service, and
/// nothing is pruned (the old pool keeps running); `Degraded` says `ApplyFailed` and why, in
/// one Event however often it is retried; it is retried; once the refusals stop, a retry
/// applies the rest and prunes the old pool. Needs fault injection: in memory only.
#[tokio::test]
async fn a_failed_apply_is_degraded_retried_and_prunes_nothing() {
    let mut cluster = Cluster::in_memory().await;
    let op = cluster.operator("operator", &[]);
    cluster.apply_celery(&cluster.celery("shop", SPEC)).await;
    converge(&cluster, &op).await;

    cluster.server().set_faults(Faults {
        forbidden_writes: vec!["/services/".into()],
        ..Default::default()
    });
    let mark = cluster.mark();
    let errors = || op.metric("celery_operator_reconciles_total{result=\"error\"}");
    assert_eq!(errors(), 0.0);
    let renamed = SPEC.replace("name: slow", "name: bulk").replace(
        "flower: {enabled: true}",
        "flower: {enabled: true, port: 8080}",
    );
    cluster
        .apply_celery(&cluster.celery("shop", &renamed))
        .await;
    let degraded = cluster
        .until_condition(&op, "shop", "Degraded", "True")
        .await;
    assert_eq!(degraded["reason"], "ApplyFailed");
    let message = degraded["message"].as_str().unwrap();
    assert!(
        message.contains("injected fault") && message.contains("services/shop-flower"),
        "{degraded}"
    );
    wait(LONG, "the failed reconcile is retried", &op, || async {
        (errors() >= 2.0).then_some(())
    })
    .await;
    let sent = cluster.sent_since(mark);
    let refused = sent
        .iter()
        .filter(|s| s.summary() == "patch services/shop-flower" && s.code == 403)
        .count();
    assert!(
        refused >= 2,
        "the Service is tried on every retry: {sent:#?}"
    );
    let deletes: Vec<&String> = sent
        .iter()
        .filter(|s| s.verb == "delete")
        .map(|s| &s.line)
        .collect();
    assert!(
        deletes.is_empty(),
        "no pruning after a failed apply: {deletes:?}"
    );
    assert_eq!(
        cluster.deployment_names().await,
        [
            "shop-beat",
            "shop-flower",
            "shop-worker-bulk",
            "shop-worker-fast",
            "shop-worker-slow"
        ],
        "the old pool keeps running beside the new one"
    );
    assert_eq!(
        cluster.events("ApplyFailed").await.len(),
        1,
        "reported once, not on every retry"
    );

    // The refusals stop: a retry applies the Service and prunes the old pool.
    cluster.server().set_faults(Faults::default());
    wait(LONG, "the old pool is pruned", &op, || async {
        (cluster.deployment_names().await
            == [
                "shop-beat",
                "shop-flower",
                "shop-worker-bulk",
                "shop-worker-fast",
            ])
        .then_some(())
    })
    .await;
    let degraded = cluster
        .until_condition(&op, "shop", "Degraded", "False")
        .await;
    assert_ne!(degraded["reason"], "ApplyFailed", "{degraded}");
    let service = cluster
        .served("", "services")
        .await
        .get("shop-flower")
        .await
        .unwrap();
    assert_eq!(service.data["spec"]["ports"][0]["port"], 8080);
    // (The refusals were the test's: only check that the chart would allow every request.)
    cluster.assert_chart_allows(0);
}
