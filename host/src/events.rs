//! Kubernetes Events: what a person reading `kubectl describe` should see. Publishing one
//! never fails a caller: a refused Event is logged and forgotten.

use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};
use tracing::warn;

use crate::crd::Celery;
use crate::names::MANAGER;
use crate::text::{self, limit};

/// Publishes Events as the operator instance it was made for.
#[derive(Clone)]
pub struct Publisher {
    client: Client,
    reporter: Reporter,
}

impl Publisher {
    /// Events reported as coming from `instance` (the pod name) of the operator.
    pub fn new(client: Client, instance: Option<String>) -> Self {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance,
        };
        Publisher { client, reporter }
    }

    /// An Event about a Celery resource.
    pub async fn celery(
        &self,
        celery: &Celery,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        self.about(&celery.object_ref(&()), type_, reason, action, note)
            .await;
    }

    /// An Event about any object (a Celery resource, a plugin ConfigMap).
    pub async fn about(
        &self,
        about: &k8s_openapi::api::core::v1::ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            // The Events API limits notes to 1 KiB; parts of a note may come from plugins.
            note: Some(text::clean(&note, limit::EVENT_NOTE)),
            action: action.into(),
            secondary: None,
        };
        // A fresh recorder: kube's recorder folds Events with the same reason into one
        // series and keeps the first note, which would hide a new message behind an old one.
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        if let Err(e) = recorder.publish(&event, about).await {
            warn!(error = %e, "could not publish Event");
        }
    }
}
