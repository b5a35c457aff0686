//! The test API server against the Kubernetes API conventions, through the real kube client:
//! what a controller relies on must behave as a real API server does.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::core::{DynamicObject, GroupVersionKind};
use kube::discovery::ApiResource;
use kube::{Client, Config, Discovery};
use memory_apiserver::{ApiServer, Faults};
use serde_json::json;

async fn client(server: &ApiServer) -> Client {
    let dir = std::env::temp_dir().join(format!(
        "apiserver-test-{}",
        server.url().rsplit(':').next().unwrap()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("kubeconfig");
    server.write_kubeconfig(&path);
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

fn cm(name: &str, data: &str) -> ConfigMap {
    serde_json::from_value(
        json!({"metadata": {"name": name, "labels": {"app": "a", "n": name}}, "data": {"k": data}}),
    )
    .unwrap()
}

fn deployment(name: &str) -> Deployment {
    serde_json::from_value(json!({"metadata": {"name": name},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}}}))
    .unwrap()
}

#[tokio::test]
async fn crud_versions_conflicts_and_status_bodies() {
    let server = ApiServer::start().await;
    let api: Api<ConfigMap> = Api::namespaced(client(&server).await, "default");
    let created = api
        .create(&PostParams::default(), &cm("one", "1"))
        .await
        .unwrap();
    let rv1: u64 = created
        .metadata
        .resource_version
        .clone()
        .unwrap()
        .parse()
        .unwrap();
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
    // Create again: 409 AlreadyExists.
    let err = api
        .create(&PostParams::default(), &cm("one", "1"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists"),
        "{err:?}"
    );
    // Replace with the current version works and bumps it; with the stale one: 409 Conflict.
    let mut changed = created.clone();
    changed.data = Some([("k".to_string(), "2".to_string())].into());
    let replaced = api
        .replace("one", &PostParams::default(), &changed)
        .await
        .unwrap();
    assert!(
        replaced
            .metadata
            .resource_version
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > rv1
    );
    let err = api
        .replace("one", &PostParams::default(), &changed)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict"),
        "{err:?}"
    );
    // 404 with a Status body, and 422 for an invalid name.
    let err = api.get("missing").await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 404 && s.reason == "NotFound"),
        "{err:?}"
    );
    let err = api
        .create(&PostParams::default(), &cm("Bad_Name", "1"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 422),
        "{err:?}"
    );
    // A namespace that does not exist.
    let elsewhere: Api<ConfigMap> = Api::namespaced(client(&server).await, "nowhere");
    let err = elsewhere
        .create(&PostParams::default(), &cm("x", "1"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 404),
        "{err:?}"
    );
    // Merge patch and JSON patch.
    let p = api
        .patch(
            "one",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"m": "x"}})),
        )
        .await
        .unwrap();
    assert_eq!(p.data.unwrap()["m"], "x");
    let ops: json_patch::Patch =
        serde_json::from_value(json!([{"op": "remove", "path": "/data/m"}])).unwrap();
    let p = api
        .patch("one", &PatchParams::default(), &Patch::<()>::Json(ops))
        .await
        .unwrap();
    assert!(!p.data.unwrap().contains_key("m"));
    // An unchanged write keeps the resource version.
    let before = api.get("one").await.unwrap().metadata.resource_version;
    let same = api
        .patch(
            "one",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"k": "2"}})),
        )
        .await
        .unwrap();
    assert_eq!(same.metadata.resource_version, before);
}

#[tokio::test]
async fn lists_select_and_paginate() {
    let server = ApiServer::start().await;
    let api: Api<ConfigMap> = Api::namespaced(client(&server).await, "default");
    for i in 0..7 {
        api.create(&PostParams::default(), &cm(&format!("cm-{i}"), "v"))
            .await
            .unwrap();
    }
    let page = api.list(&ListParams::default().limit(3)).await.unwrap();
    assert_eq!(page.items.len(), 3);
    let token = page.metadata.continue_.clone().unwrap();
    let rest = api
        .list(&ListParams::default().limit(10).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(rest.items.len(), 4);
    assert!(rest.metadata.continue_.is_none());
    let one = api
        .list(&ListParams::default().labels("n=cm-2"))
        .await
        .unwrap();
    assert_eq!(one.items.len(), 1);
    let by_name = api
        .list(&ListParams::default().fields("metadata.name=cm-3"))
        .await
        .unwrap();
    assert_eq!(by_name.items[0].metadata.name.as_deref(), Some("cm-3"));
    let some = api
        .list(&ListParams::default().labels("n in (cm-1,cm-5),app=a"))
        .await
        .unwrap();
    assert_eq!(some.items.len(), 2);
}

#[tokio::test]
async fn server_side_apply_merges_managers_and_reports_conflicts() {
    let server = ApiServer::start().await;
    let api: Api<Deployment> = Api::namespaced(client(&server).await, "default");
    let mut d = serde_json::to_value(deployment("web")).unwrap();
    d["apiVersion"] = json!("apps/v1");
    d["kind"] = json!("Deployment");
    let created = api
        .patch("web", &PatchParams::apply("operator"), &Patch::Apply(&d))
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    let managers: Vec<_> = created
        .metadata
        .managed_fields
        .unwrap()
        .into_iter()
        .map(|m| m.manager.unwrap())
        .collect();
    assert_eq!(managers, ["operator"]);
    // Another manager changing replicas conflicts unless forced.
    let scale = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {"replicas": 3}});
    let err = api
        .patch(
            "web",
            &PatchParams::apply("autoscaler"),
            &Patch::Apply(&scale),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 409),
        "{err:?}"
    );
    let forced = api
        .patch(
            "web",
            &PatchParams::apply("autoscaler").force(),
            &Patch::Apply(&scale),
        )
        .await
        .unwrap();
    assert_eq!(forced.spec.as_ref().unwrap().replicas, Some(3));
    assert_eq!(
        forced.metadata.generation,
        Some(2),
        "a spec change bumps the generation"
    );
    // The first manager re-applies without replicas: the autoscaler's value stays.
    d["spec"].as_object_mut().unwrap().remove("replicas");
    let again = api
        .patch("web", &PatchParams::apply("operator"), &Patch::Apply(&d))
        .await
        .unwrap();
    assert_eq!(again.spec.unwrap().replicas, Some(3));
    // Status goes through /status only, without bumping the generation.
    let status = json!({"apiVersion": "apps/v1", "kind": "Deployment", "status": {"readyReplicas": 3, "replicas": 3}});
    let s = api
        .patch_status("web", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    assert_eq!(s.status.unwrap().ready_replicas, Some(3));
    assert_eq!(s.metadata.generation, Some(2));
    let ignored = api
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"readyReplicas": 0}})),
        )
        .await
        .unwrap();
    assert_eq!(
        ignored.status.unwrap().ready_replicas,
        Some(3),
        "the main resource ignores status"
    );
    // The scale subresource.
    let sc = api.get_scale("web").await.unwrap();
    assert_eq!(sc.spec.unwrap().replicas, Some(3));
    api.patch_scale(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 5}})),
    )
    .await
    .unwrap();
    assert_eq!(
        api.get("web").await.unwrap().spec.unwrap().replicas,
        Some(5)
    );
}

#[tokio::test]
async fn watches_replay_bookmark_and_expire() {
    let server = ApiServer::start().await;
    server.set_bookmark_interval(Duration::from_millis(200));
    server.store().history_limit = 5;
    let api: Api<ConfigMap> = Api::namespaced(client(&server).await, "default");
    let first = api
        .create(&PostParams::default(), &cm("w0", "v"))
        .await
        .unwrap();
    let rv = first.metadata.resource_version.unwrap();
    api.create(&PostParams::default(), &cm("w1", "v"))
        .await
        .unwrap();
    let mut stream = api
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match stream.try_next().await.unwrap().unwrap() {
        WatchEvent::Added(o) => assert_eq!(o.metadata.name.as_deref(), Some("w1")),
        other => panic!("{other:?}"),
    }
    api.delete("w0", &DeleteParams::default()).await.unwrap();
    match stream.try_next().await.unwrap().unwrap() {
        WatchEvent::Deleted(o) => assert_eq!(o.metadata.name.as_deref(), Some("w0")),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        stream.try_next().await.unwrap().unwrap(),
        WatchEvent::Bookmark(_)
    ));
    // After more changes than the history keeps, the old version is gone: 410.
    for i in 0..10 {
        api.create(&PostParams::default(), &cm(&format!("x{i}"), "v"))
            .await
            .unwrap();
    }
    let mut stale = api
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match stale.try_next().await.unwrap().unwrap() {
        WatchEvent::Error(e) => assert_eq!(e.code, 410),
        other => panic!("{other:?}"),
    }
    // A dropped watch ends the stream.
    server.drop_watches();
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(e)) = stream.next().await {
            if !matches!(e, WatchEvent::Bookmark(_)) {
                continue;
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the stream ended");
}

#[tokio::test]
async fn finalizers_and_owner_references_cascade() {
    let server = ApiServer::start().await;
    let api: Api<ConfigMap> = Api::namespaced(client(&server).await, "default");
    let owner = api
        .create(&PostParams::default(), &cm("owner", "v"))
        .await
        .unwrap();
    let mut child = cm("child", "v");
    child.metadata.owner_references = Some(vec![serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid.unwrap(), "controller": true}))
    .unwrap()]);
    child.metadata.finalizers = Some(vec!["test/keep".into()]);
    api.create(&PostParams::default(), &child).await.unwrap();
    api.delete("owner", &DeleteParams::default()).await.unwrap();
    // The dependent is being deleted, held by its finalizer.
    let held = api.get("child").await.unwrap();
    assert!(held.metadata.deletion_timestamp.is_some());
    api.patch(
        "child",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert!(
        api.get_opt("child").await.unwrap().is_none(),
        "gone once the finalizer is removed"
    );
}

#[tokio::test]
async fn crds_are_served_validated_and_discovered() {
    let server = ApiServer::start().await;
    let client = client(&server).await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {"group": "example.com", "scope": "Namespaced",
                 "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
                 "versions": [{"name": "v1", "served": true, "storage": true, "subresources": {"status": {}},
                   "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                     "spec": {"type": "object", "required": ["size"], "properties": {"size": {"type": "integer", "maximum": 10}}},
                     "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}}}]}}))
    .unwrap();
    crds.create(&PostParams::default(), &crd).await.unwrap();
    let discovery = Discovery::new(client.clone()).run().await.unwrap();
    assert!(discovery.has_group("example.com"));
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("example.com", "v1", "Widget"),
        "widgets",
    );
    let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
    let w = |size: serde_json::Value| -> DynamicObject {
        serde_json::from_value(json!({"apiVersion": "example.com/v1", "kind": "Widget",
                                      "metadata": {"name": "w"}, "spec": {"size": size, "unknown": 1}})).unwrap()
    };
    let err = widgets
        .create(&PostParams::default(), &w(json!(11)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 422),
        "{err:?}"
    );
    let created = widgets
        .create(&PostParams::default(), &w(json!(3)))
        .await
        .unwrap();
    assert!(
        created.data["spec"].get("unknown").is_none(),
        "unknown fields are pruned"
    );
    // Deleting the namespace deletes what is in it.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .delete("default", &DeleteParams::default())
        .await
        .unwrap();
    assert!(widgets.get_opt("w").await.unwrap().is_none());
}

#[tokio::test]
async fn faults_are_injected_and_a_stopped_server_comes_back() {
    let mut server = ApiServer::start().await;
    let api: Api<ConfigMap> = Api::namespaced(client(&server).await, "default");
    api.create(&PostParams::default(), &cm("kept", "v"))
        .await
        .unwrap();
    server.set_faults(Faults {
        error_share: 1.0,
        ..Default::default()
    });
    let err = api.get("kept").await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 500),
        "{err:?}"
    );
    // kube's client retries 429 answers by itself (with backoff), so a share of them only
    // slows it down.
    server.set_faults(Faults {
        throttle_share: 0.5,
        ..Default::default()
    });
    for _ in 0..4 {
        api.get("kept").await.unwrap();
    }
    assert!(server.requests().iter().any(|r| r.status == 429));
    server.set_faults(Faults {
        latency: Duration::from_millis(300),
        ..Default::default()
    });
    let start = std::time::Instant::now();
    api.get("kept").await.unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "latency is added"
    );
    server.set_faults(Faults::default());
    server.stop().await;
    assert!(api.get("kept").await.is_err(), "refused while stopped");
    server.restart().await;
    assert!(
        api.get("kept").await.is_ok(),
        "same objects after the restart"
    );
    assert!(server.requests().iter().any(|r| r.status == 500));
}

#[tokio::test]
async fn requests_name_their_user_and_writes_to_chosen_paths_are_forbidden() {
    let server = ApiServer::start().await;
    let dir = std::env::temp_dir().join(format!(
        "apiserver-test-token-{}",
        server.url().rsplit(':').next().unwrap()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("kubeconfig");
    server.write_kubeconfig_with_token(&path, "alice");
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let alice: Api<ConfigMap> = Api::namespaced(Client::try_from(config).unwrap(), "default");
    let anonymous: Api<ConfigMap> = Api::namespaced(client(&server).await, "default");

    // An apply that creates answers 201, one that changes 200.
    let apply = |data: &str| {
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"k": data}});
        let alice = alice.clone();
        async move {
            alice
                .patch("a", &PatchParams::apply("alice"), &Patch::Apply(cm))
                .await
        }
    };
    let mark = server.request_count();
    apply("1").await.unwrap();
    apply("2").await.unwrap();
    anonymous.get("a").await.unwrap();
    let sent: Vec<_> = server
        .requests_since(mark)
        .into_iter()
        .map(|r| (r.method, r.status, r.user))
        .collect();
    assert_eq!(
        sent,
        [
            ("PATCH".to_string(), 201, Some("alice".to_string())),
            ("PATCH".into(), 200, Some("alice".into())),
            ("GET".into(), 200, None),
        ]
    );

    // Writes to the chosen paths are refused, every time; reads and other writes are not.
    server.set_faults(Faults {
        forbidden_writes: vec!["/configmaps/a".into()],
        ..Default::default()
    });
    for _ in 0..3 {
        let err = apply("3").await.unwrap_err();
        assert!(
            matches!(&err, kube::Error::Api(s) if s.code == 403 && s.reason == "Forbidden"),
            "{err:?}"
        );
    }
    assert_eq!(alice.get("a").await.unwrap().data.unwrap()["k"], "2");
    alice
        .create(&PostParams::default(), &cm("b", "1"))
        .await
        .unwrap();
    server.set_faults(Faults::default());
    apply("3").await.unwrap();
}

#[tokio::test]
async fn a_deployment_without_replicas_gets_one_that_no_manager_owns() {
    let server = ApiServer::start().await;
    let api: Api<Deployment> = Api::namespaced(client(&server).await, "default");
    let apply = |label: &str| {
        let mut d = serde_json::to_value(deployment("d")).unwrap();
        d["apiVersion"] = json!("apps/v1");
        d["kind"] = json!("Deployment");
        d["metadata"]["labels"] = json!({"l": label});
        d["spec"].as_object_mut().unwrap().remove("replicas");
        let api = api.clone();
        async move {
            api.patch("d", &PatchParams::apply("app").force(), &Patch::Apply(d))
                .await
                .unwrap()
        }
    };
    let created = apply("1").await;
    assert_eq!(created.spec.as_ref().unwrap().replicas, Some(1));
    let owned = serde_json::to_value(&created.metadata.managed_fields.unwrap()[0]).unwrap();
    assert_eq!(owned["manager"], "app");
    assert!(
        owned["fieldsV1"]["f:spec"].get("f:replicas").is_none(),
        "{owned}"
    );
    // An autoscaler sets the replicas; the next apply leaves them alone.
    api.patch_scale(
        "d",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 3}})),
    )
    .await
    .unwrap();
    let applied = apply("2").await;
    assert_eq!(applied.spec.unwrap().replicas, Some(3));
}

#[tokio::test]
async fn a_selector_watch_sees_objects_enter_and_leave_it() {
    let server = ApiServer::start().await;
    let api: Api<ConfigMap> = Api::namespaced(client(&server).await, "default");
    let created = api
        .create(&PostParams::default(), &cm("s", "v"))
        .await
        .unwrap();
    let rv = created.metadata.resource_version.unwrap();
    let params = WatchParams::default().labels("app=a");
    let mut stream = api.watch(&params, &rv).await.unwrap().boxed();
    let relabel = |app: &'static str| json!({"metadata": {"labels": {"app": app}}});
    api.patch("s", &PatchParams::default(), &Patch::Merge(relabel("b")))
        .await
        .unwrap();
    match stream.try_next().await.unwrap().unwrap() {
        WatchEvent::Deleted(o) => assert_eq!(o.metadata.name.as_deref(), Some("s")),
        other => panic!("leaving the selector is a DELETED event: {other:?}"),
    }
    api.patch("s", &PatchParams::default(), &Patch::Merge(relabel("a")))
        .await
        .unwrap();
    match stream.try_next().await.unwrap().unwrap() {
        WatchEvent::Added(o) => assert_eq!(o.metadata.name.as_deref(), Some("s")),
        other => panic!("entering the selector is an ADDED event: {other:?}"),
    }
}
