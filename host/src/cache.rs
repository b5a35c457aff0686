//! The watch caches of the children: one reflector store per child kind the cluster serves,
//! filled by the same watches that trigger reconciles. Reconciles read live children from
//! here instead of listing them, and the scaler loops read their Deployment's replicas.
//!
//! A cache can be a moment behind the API server, so it is trusted only to say "nothing to
//! do": a child it shows as drifted is read again before it is written (see `apply`).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use futures::{Stream, TryStreamExt};
use kube::ResourceExt;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::reflector::{ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};

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

/// One kind's cache, the version it is watched at, and whether it is filled.
type KindStore = (ApiResource, Store<DynamicObject>, Ready);

/// The children caches, shared by the controller and the scaler loops.
#[derive(Clone, Default)]
pub struct Caches {
    stores: Arc<RwLock<BTreeMap<ChildKind, KindStore>>>,
}

/// Drops what no stage reads, so a cached object costs less memory.
fn slim(obj: &mut DynamicObject) {
    obj.metadata.managed_fields = None;
    if let Some(a) = obj.metadata.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

impl Caches {
    /// Caches `kind` from `events` (a watch of its objects with the operator's label): the
    /// returned stream fills the cache and yields the objects that changed, to trigger
    /// reconciles.
    pub fn watch(
        &self,
        kind: ChildKind,
        ar: &ApiResource,
        events: impl Stream<Item = Result<watcher::Event<DynamicObject>, watcher::Error>>
        + Send
        + 'static,
    ) -> impl Stream<Item = Result<DynamicObject, watcher::Error>> + Send + 'static {
        let writer = Writer::new(ar.clone());
        let (events, ready) = Ready::track(events);
        self.stores
            .write()
            .expect("caches lock")
            .insert(kind, (ar.clone(), writer.as_reader(), ready));
        events
            .modify(slim)
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
    pub fn children(
        &self,
        kind: ChildKind,
        ns: &str,
        instance: &str,
    ) -> Option<Vec<Arc<DynamicObject>>> {
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
    pub fn get(&self, kind: ChildKind, ns: &str, name: &str) -> Option<Option<Arc<DynamicObject>>> {
        let stores = self.stores.read().expect("caches lock");
        let (ar, store, _) = stores.get(&kind).filter(|(_, _, ready)| ready.is_ready())?;
        Some(store.get(&ObjectRef::new_with(name, ar.clone()).within(ns)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use kube::api::ObjectMeta;

    fn deployment(name: &str) -> DynamicObject {
        let ar = ApiResource::erase::<k8s_openapi::api::apps::v1::Deployment>(&());
        let mut obj = DynamicObject::new(name, &ar).within("apps");
        obj.metadata = ObjectMeta {
            name: Some(name.into()),
            namespace: Some("apps".into()),
            labels: Some([(labels::INSTANCE.to_string(), "shop".to_string())].into()),
            managed_fields: Some(vec![Default::default()]),
            ..Default::default()
        };
        obj
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
        assert!(cached.metadata.managed_fields.is_none(), "slimmed");
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
