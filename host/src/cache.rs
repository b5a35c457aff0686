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

    /// Waits until every cache holds its first complete listing.
    pub async fn ready(&self) {
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
    /// when the kind is not cached.
    pub fn children(
        &self,
        kind: ChildKind,
        ns: &str,
        instance: &str,
    ) -> Option<Vec<Arc<DynamicObject>>> {
        let stores = self.stores.read().expect("caches lock");
        let (_, store, _) = stores.get(&kind)?;
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
        let (ar, store, _) = stores.get(&kind)?;
        Some(store.get(&ObjectRef::new_with(name, ar.clone()).within(ns)))
    }
}
