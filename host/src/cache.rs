//! The watch caches of the children: one reflector store per child kind the cluster serves,
//! filled by the same watches that trigger reconciles. Reconciles read live children from
//! here instead of listing them, and the scaler loops read their Deployment's replicas.
//!
//! A cache can be a moment behind the API server, so it is trusted only to say "nothing to
//! do": a child it shows as drifted is read again before it is written (see `apply`).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use futures::Stream;
use kube::ResourceExt;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::reflector::{ObjectRef, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};

use crate::children::ChildKind;
use crate::names::labels;

/// One kind's cache, and the version it is watched at.
type KindStore = (ApiResource, Store<DynamicObject>);

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
        self.stores
            .write()
            .expect("caches lock")
            .insert(kind, (ar.clone(), writer.as_reader()));
        events
            .modify(slim)
            .reflect(writer)
            .default_backoff()
            .touched_objects()
    }

    /// Waits until every cache holds its first complete listing.
    pub async fn ready(&self) {
        let stores: Vec<Store<DynamicObject>> = self
            .stores
            .read()
            .expect("caches lock")
            .values()
            .map(|(_, s)| s.clone())
            .collect();
        for store in stores {
            // The writer lives as long as the controller; if it is gone, so are we.
            let _ = store.wait_until_ready().await;
        }
    }

    /// Whether `kind` is cached.
    pub fn has(&self, kind: ChildKind) -> bool {
        self.stores.read().expect("caches lock").contains_key(&kind)
    }

    /// The cached children of kind `kind` of the Celery resource `instance` in `ns`; `None`
    /// when the kind is not cached.
    pub fn children(
        &self,
        kind: ChildKind,
        ns: &str,
        instance: &str,
    ) -> Option<Vec<Arc<DynamicObject>>> {
        let stores = self.stores.read().expect("caches lock");
        let (_, store) = stores.get(&kind)?;
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

    /// The cached object `ns/name` of kind `kind`: `None` when the kind is not cached,
    /// `Some(None)` when the cache has no such object.
    pub fn get(&self, kind: ChildKind, ns: &str, name: &str) -> Option<Option<Arc<DynamicObject>>> {
        let stores = self.stores.read().expect("caches lock");
        let (ar, store) = stores.get(&kind)?;
        Some(store.get(&ObjectRef::new_with(name, ar.clone()).within(ns)))
    }
}
