//! Names and labels the operator gives what it creates, in one place: the children's names,
//! the labels that select them, and the field manager of every write.

use kube::ResourceExt;

use crate::crd::Celery;

/// Field manager of every server-side apply, and the `managed-by` label value.
pub const MANAGER: &str = "celery-operator";

/// Label keys the operator sets on every child.
pub mod labels {
    /// Always `celery`.
    pub const NAME: &str = "app.kubernetes.io/name";
    /// Name of the Celery resource.
    pub const INSTANCE: &str = "app.kubernetes.io/instance";
    /// `worker`, `flower` or `beat`.
    pub const COMPONENT: &str = "app.kubernetes.io/component";
    /// Always `celery-operator`; the watch and prune selectors use it.
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    /// The Celery version from the spec, when given.
    pub const VERSION: &str = "app.kubernetes.io/version";
    /// Worker pool name (workers only).
    pub const POOL: &str = "celeryproject.org/pool";
}

/// The label selector for every child of the Celery resource `name`.
pub fn children_selector(name: &str) -> String {
    format!(
        "{}={},{}={MANAGER}",
        labels::INSTANCE,
        name,
        labels::MANAGED_BY
    )
}

/// Name of the Deployment of worker pool `pool`.
pub fn worker_name(celery: &Celery, pool: &str) -> String {
    format!("{}-worker-{pool}", celery.name_any())
}

/// Name of Flower's Deployment, Service and Ingress.
pub fn flower_name(celery: &Celery) -> String {
    format!("{}-flower", celery.name_any())
}

/// Name of beat's Deployment.
pub fn beat_name(celery: &Celery) -> String {
    format!("{}-beat", celery.name_any())
}
