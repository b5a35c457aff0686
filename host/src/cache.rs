//! The watch caches of the children: one reflector store per child kind the cluster serves,
//! filled by the same watches that trigger reconciles. Reconciles read live children from
//! here instead of listing them, and the scaler loops read their Deployment's replicas.
//!
//! A cache can be a moment behind the API server, so it is trusted only to say "nothing to
//! do": a child it shows as drifted is read again before it is written (see `apply`).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ops::Deref;
use std::sync::{Arc, RwLock};

use futures::{Stream, TryStreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::reflector::{ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde::Deserialize;
use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor,
};
use serde_json::{Map, Value};

use crate::children::ChildKind;
use crate::names::labels;

/// Says when a watch has delivered its first complete listing. (kube's own
/// `Store::wait_until_ready` wakes only the last of several waiters.)
#[derive(Clone)]
pub struct Ready(tokio::sync::watch::Receiver<bool>);

impl Ready {
    /// Passes `events` through, and the returned [`Ready`] says once they listed everything.
    pub fn track<K, S>(events: S) -> (impl Stream<Item = S::Item> + Send + 'static, Ready)
    where
        K: Send + 'static,
        S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let events = events.inspect_ok(move |event| {
            if matches!(event, watcher::Event::InitDone) {
                tx.send_replace(true);
            }
        });
        (events, Ready(rx))
    }

    /// Waits until the first listing is complete (at once if it is).
    pub async fn wait(&self) {
        // An error means the watch is gone, and the operator with it: nothing to wait for.
        let _ = self.0.clone().wait_for(|ready| *ready).await;
    }

    /// Whether the first listing is complete.
    pub fn is_ready(&self) -> bool {
        *self.0.borrow()
    }
}

/// An object as the caches hold it: read without its managed fields and its `kubectl apply`
/// annotation. Nothing reads them, and they are about half of a Deployment: skipped while
/// parsing, they never take memory, not even while a listing of every object of a kind is
/// parsed.
#[derive(Clone, Debug)]
pub struct Slim<K>(pub K);

/// A child as the caches hold it.
pub type Cached = Slim<DynamicObject>;

impl<K> Deref for Slim<K> {
    type Target = K;
    fn deref(&self) -> &K {
        &self.0
    }
}

impl<K: Resource> Resource for Slim<K> {
    type DynamicType = K::DynamicType;
    type Scope = K::Scope;

    fn kind(dt: &K::DynamicType) -> Cow<'_, str> {
        K::kind(dt)
    }
    fn group(dt: &K::DynamicType) -> Cow<'_, str> {
        K::group(dt)
    }
    fn version(dt: &K::DynamicType) -> Cow<'_, str> {
        K::version(dt)
    }
    fn plural(dt: &K::DynamicType) -> Cow<'_, str> {
        K::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        self.0.meta()
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        self.0.meta_mut()
    }
}

impl<'de, K: DeserializeOwned> Deserialize<'de> for Slim<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut object = d.deserialize_map(Fields { skip: None })?;
        if let Some(Value::Object(a)) = object
            .get_mut("metadata")
            .and_then(|m| m.get_mut("annotations"))
        {
            a.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
        K::deserialize(Value::Object(object))
            .map(Slim)
            .map_err(de::Error::custom)
    }
}

impl<K> Slim<K> {
    /// The watch events of `Slim` objects as events of the objects themselves.
    pub fn unwrap_events(event: watcher::Event<Slim<K>>) -> watcher::Event<K> {
        use watcher::Event::*;
        match event {
            Apply(o) => Apply(o.0),
            Delete(o) => Delete(o.0),
            Init => Init,
            InitApply(o) => InitApply(o.0),
            InitDone => InitDone,
        }
    }
}

/// Reads a JSON object into a map, its `metadata` without `managedFields`. `skip` names the
/// one field this level leaves out unread.
#[derive(Clone, Copy)]
struct Fields {
    skip: Option<&'static str>,
}

impl<'de> Visitor<'de> for Fields {
    type Value = Map<String, Value>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a Kubernetes object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if Some(key.as_str()) == self.skip {
                map.next_value::<IgnoredAny>()?;
            } else if key == "metadata" && self.skip.is_none() {
                let meta = map.next_value_seed(Fields {
                    skip: Some("managedFields"),
                })?;
                out.insert(key, Value::Object(meta));
            } else {
                out.insert(key, map.next_value()?);
            }
        }
        Ok(out)
    }
}

impl<'de> DeserializeSeed<'de> for Fields {
    type Value = Map<String, Value>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

/// How the operator's watches list, like client-go's informers: from the API server's watch
/// cache (`resourceVersion=0`: no read from etcd; at worst a moment old, which the watch that
/// follows catches up on) in one response instead of pages of 500, so a restart sends one
/// LIST per kind however many objects there are. What that costs is the memory of one
/// kind's listing at once; skipping managed fields while parsing (see [`Cached`]) keeps it
/// small.
pub fn watch_config() -> watcher::Config {
    let mut config = watcher::Config::default().any_semantic();
    config.page_size = None;
    config
}

/// An error and every cause under it, `outer: inner: ...`: a watch that keeps failing says
/// why (refused, timed out, forbidden), not only that it failed to connect.
pub fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let next = cause.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = cause.source();
    }
    text
}

/// One kind's cache, the version it is watched at, and whether it is filled.
type KindStore = (ApiResource, Store<Cached>, Ready);

/// The children caches, shared by the controller and the scaler loops.
#[derive(Clone, Default)]
pub struct Caches {
    stores: Arc<RwLock<BTreeMap<ChildKind, KindStore>>>,
}

impl Caches {
    /// Caches `kind` from `events` (a watch of its objects with the operator's label): the
    /// returned stream fills the cache and yields the objects that changed, to trigger
    /// reconciles.
    pub fn watch(
        &self,
        kind: ChildKind,
        ar: &ApiResource,
        events: impl Stream<Item = Result<watcher::Event<Cached>, watcher::Error>> + Send + 'static,
    ) -> impl Stream<Item = Result<Cached, watcher::Error>> + Send + 'static {
        let writer = Writer::new(ar.clone());
        let (events, ready) = Ready::track(events);
        self.stores
            .write()
            .expect("caches lock")
            .insert(kind, (ar.clone(), writer.as_reader(), ready));
        events
            .inspect_err(move |e| {
                tracing::warn!(?kind, error = %causes(e), "cannot watch children; retrying")
            })
            .reflect(writer)
            .default_backoff()
            .touched_objects()
    }

    /// Waits until every cache holds its first complete listing, at most `limit`: a watch
    /// that cannot list (a kind the operator may not list, say) must not stall every
    /// reconcile; its kind is listed directly meanwhile (see [`children`](Self::children)).
    pub async fn ready(&self, limit: std::time::Duration) {
        let _ = tokio::time::timeout(limit, self.all_ready()).await;
    }

    async fn all_ready(&self) {
        let ready: Vec<Ready> = self
            .stores
            .read()
            .expect("caches lock")
            .values()
            .map(|(_, _, ready)| ready.clone())
            .collect();
        for r in ready {
            r.wait().await;
        }
    }

    /// Whether `kind` is cached.
    pub fn has(&self, kind: ChildKind) -> bool {
        self.stores.read().expect("caches lock").contains_key(&kind)
    }

    /// The cached children of kind `kind` of the Celery resource `instance` in `ns`; `None`
    /// when the kind is not cached, or its cache has not listed everything yet.
    pub fn children(&self, kind: ChildKind, ns: &str, instance: &str) -> Option<Vec<Arc<Cached>>> {
        let stores = self.stores.read().expect("caches lock");
        let (_, store, _) = stores.get(&kind).filter(|(_, _, ready)| ready.is_ready())?;
        Some(
            store
                .state()
                .into_iter()
                .filter(|o| {
                    o.metadata.namespace.as_deref() == Some(ns)
                        && o.labels().get(labels::INSTANCE).map(String::as_str) == Some(instance)
                })
                .collect(),
        )
    }

    /// The cached object `ns/name` of kind `kind`: `None` when the kind is not cached (or not
    /// listed yet), `Some(None)` when the cache has no such object.
    pub fn get(&self, kind: ChildKind, ns: &str, name: &str) -> Option<Option<Arc<Cached>>> {
        let stores = self.stores.read().expect("caches lock");
        let (ar, store, _) = stores.get(&kind).filter(|(_, _, ready)| ready.is_ready())?;
        Some(store.get(&ObjectRef::new_with(name, ar.clone()).within(ns)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use serde_json::json;

    /// A Deployment as the API server sends it: with managed fields and, here, the
    /// annotation `kubectl apply` leaves.
    fn deployment(name: &str) -> Cached {
        serde_json::from_value(json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": name,
                "namespace": "apps",
                "labels": {labels::INSTANCE: "shop"},
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "{}",
                    "deployment.kubernetes.io/revision": "1",
                },
                "managedFields": [{"manager": "celery-operator", "operation": "Apply",
                                   "fieldsType": "FieldsV1",
                                   "fieldsV1": {"f:spec": {"f:replicas": {}}}}],
            },
            "spec": {"replicas": 2, "template": {"metadata": {"managedFields": "kept"}}},
            "status": {"readyReplicas": 1},
        }))
        .expect("a Deployment")
    }

    #[test]
    fn a_cached_child_is_read_without_managed_fields() {
        let d = deployment("shop-beat");
        assert_eq!(d.metadata.managed_fields, None);
        assert_eq!(
            d.annotations().keys().collect::<Vec<_>>(),
            ["deployment.kubernetes.io/revision"]
        );
        assert_eq!(d.labels()[labels::INSTANCE], "shop");
        assert_eq!(d.types.as_ref().unwrap().kind, "Deployment");
        // Only the object's own metadata loses the field, not a nested one of that name.
        assert_eq!(
            d.data["spec"],
            json!({"replicas": 2, "template": {"metadata": {"managedFields": "kept"}}})
        );
        assert_eq!(d.data["status"]["readyReplicas"], 1);
        assert!(serde_json::from_value::<Cached>(json!(["not", "an", "object"])).is_err());
    }

    #[tokio::test]
    async fn a_cache_is_used_only_once_it_listed_everything() {
        let caches = Caches::default();
        let ar = ApiResource::erase::<k8s_openapi::api::apps::v1::Deployment>(&());
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let mut stream = Box::pin(caches.watch(ChildKind::Deployment, &ar, rx));
        tx.unbounded_send(Ok(watcher::Event::Init)).unwrap();
        tx.unbounded_send(Ok(watcher::Event::InitApply(deployment("shop-beat"))))
            .unwrap();
        tx.unbounded_send(Ok(watcher::Event::InitApply(deployment("other"))))
            .unwrap();
        // Both objects reached the cache, but the listing is not complete: not used (the kind
        // is listed directly), and waiting for it ends at its limit.
        for _ in 0..2 {
            stream.next().await.unwrap().unwrap();
        }
        caches.ready(std::time::Duration::from_millis(10)).await;
        assert!(
            caches
                .children(ChildKind::Deployment, "apps", "shop")
                .is_none()
        );
        assert!(
            caches
                .get(ChildKind::Deployment, "apps", "shop-beat")
                .is_none()
        );

        tx.unbounded_send(Ok(watcher::Event::InitDone)).unwrap();
        drop(tx);
        while stream.next().await.is_some() {}
        caches.ready(std::time::Duration::from_secs(5)).await;
        let children = caches
            .children(ChildKind::Deployment, "apps", "shop")
            .unwrap();
        assert_eq!(children.len(), 2, "both carry the instance label");
        let cached = caches
            .get(ChildKind::Deployment, "apps", "shop-beat")
            .unwrap()
            .unwrap();
        assert_eq!(cached.data["spec"]["replicas"], 2);
        assert!(
            caches
                .get(ChildKind::Deployment, "apps", "gone")
                .unwrap()
                .is_none()
        );
        assert!(
            caches
                .children(ChildKind::Service, "apps", "shop")
                .is_none()
        );
    }
}
