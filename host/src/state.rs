//! What the operator remembers about each Celery resource between reconciles, in one place,
//! keyed by the resource's uid and dropped when the resource is gone: the retry backoff, the
//! last good answers of its autoscaler plugins, its pools' scaler loops and its worker event
//! follower.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use tokio::task::AbortHandle;

use crate::children::Child;
use crate::crd::Celery;

/// A running background loop (a pool's scaler, a resource's event follower); stopped when
/// dropped.
#[derive(Debug)]
pub struct Loop {
    /// What the loop runs with (a change restarts it).
    pub fingerprint: String,
    /// The loop's task.
    pub task: AbortHandle,
}

impl Drop for Loop {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One resource's state.
#[derive(Debug, Default)]
pub struct ResourceState {
    /// Failed reconciles in a row: the retry backoff.
    pub failures: u32,
    /// The last objects each pool's autoscaler plugin returned, for `keep-last-good`.
    pub last_good: BTreeMap<String, Vec<Child>>,
    /// The scaler loops of the pools the operator scales itself.
    pub scalers: BTreeMap<String, Loop>,
    /// The follower of its workers' events, while any pool is followed.
    pub follower: Option<Loop>,
}

/// Every resource's state.
#[derive(Default)]
pub struct ResourceStates(Mutex<HashMap<String, ResourceState>>);

impl ResourceStates {
    /// Runs `f` on the state of the resource `uid` (created empty when new).
    pub fn with<R>(&self, uid: &str, f: impl FnOnce(&mut ResourceState) -> R) -> R {
        let mut states = self.0.lock().expect("resource states lock");
        f(states.entry(uid.to_string()).or_default())
    }

    /// Drops the state of every resource `exists` says is gone (stopping its scaler loops).
    pub fn retain(&self, exists: impl Fn(&str) -> bool) {
        let mut states = self.0.lock().expect("resource states lock");
        states.retain(|uid, _| exists(uid));
    }

    /// Resources with state, and their scaler loops.
    pub fn counts(&self) -> (usize, usize) {
        let states = self.0.lock().expect("resource states lock");
        let loops = states.values().map(|s| s.scalers.len()).sum();
        (states.len(), loops)
    }
}

/// Whether the resource a background loop runs for is gone: deleted, or replaced by a new one
/// of the same name (a new uid, with loops of its own). `false` when that cannot be told.
pub async fn is_gone(api: &kube::Api<Celery>, celery: &Celery) -> bool {
    use kube::ResourceExt;
    api.get_opt(&celery.name_any())
        .await
        .is_ok_and(|c| c.is_none_or(|c| c.uid() != celery.uid()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_gone_resource_loses_its_state_and_its_loops_stop() {
        let states = ResourceStates::default();
        let task = tokio::spawn(std::future::pending::<()>());
        states.with("a", |s| {
            s.failures = 3;
            s.scalers.insert(
                "pool".into(),
                Loop {
                    fingerprint: String::new(),
                    task: task.abort_handle(),
                },
            );
        });
        states.with("b", |s| s.failures = 1);
        assert_eq!(states.counts(), (2, 1));
        states.retain(|uid| uid == "b");
        assert_eq!(states.counts(), (1, 0));
        assert!(task.await.unwrap_err().is_cancelled());
        assert_eq!(states.with("b", |s| s.failures), 1);
    }
}
