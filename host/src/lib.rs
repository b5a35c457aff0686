//! celery-operator: runs Celery on Kubernetes from a `Celery` custom resource.
//!
//! Reconciliation reads as stages, one module each: [`validate`] the spec, [`build`] the
//! desired children (pure), let the WebAssembly [`plugin`]s [`shape`] them, [`apply`] them
//! (and prune stale ones), then compute the [`status`]. [`reconcile`] strings the stages
//! together and runs the controller.

pub mod apply;
pub mod broker;
pub mod build;
pub mod children;
pub mod crd;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod plugin;
pub mod plugin_output;
pub mod quantity;
pub mod rbac;
pub mod reconcile;
pub mod render;
pub mod scaler;
pub mod shape;
pub mod status;
pub mod text;
pub mod validate;
