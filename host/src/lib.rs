//! celery-operator: runs Celery on Kubernetes from a `Celery` custom resource.
//!
//! Reconciliation reads as stages, one module each: [`validate`] the spec, [`build`] the
//! desired children (pure), [`apply`] them (and prune stale ones), then compute the
//! [`status`]. [`reconcile`] strings the stages together and runs the controller.

pub mod build;
pub mod children;
pub mod crd;
pub mod quantity;
