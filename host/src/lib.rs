//! celery-operator: runs Celery on Kubernetes from a `Celery` custom resource.
//!
//! Reconciliation reads as stages, one module each: [`validate`] the spec, build the
//! [`desired`] children (pure), let the WebAssembly [`plugin`]s [`shape`] them — together the
//! [`plan`], which `render` shares — then [`apply`] them (reading live children from the
//! watch [`cache`]s, pruning stale ones) and compute the [`status`]. [`reconcile`] strings
//! the stages together and runs the controller; the operator's own [`scaler`] loops scale
//! the pools it scales itself; the [`lifecycle`] followers read the workers' own events on the
//! broker (busy-aware scale-down, stalled workers). [`cli`] is the command line, [`config`] what `run` needs.
//!
//! Two words to keep apart: an *autoscaler* plugin emits the objects that scale a pool (an
//! HPA, a KEDA ScaledObject) once per reconcile; a *scaler* plugin decides a pool's replicas
//! on every tick of the operator's own scaler loop. See [`plugin::choice`].
//!
//! [`sandbox`] runs all of it on one machine, with no cluster: the `sandbox` command.

pub mod apply;
pub mod broker;
pub mod cache;
pub mod children;
pub mod cli;
pub mod config;
pub mod crd;
pub mod desired;
pub mod events;
pub mod http;
pub mod leader;
pub mod lifecycle;
pub mod metrics;
pub mod names;
pub mod plan;
pub mod plugin;
pub mod plugin_output;
pub mod quantity;
pub mod rbac;
pub mod reconcile;
pub mod render;
pub mod sandbox;
pub mod scaler;
pub mod shape;
pub mod simulate;
pub mod state;
pub mod status;
pub mod text;
pub mod validate;
pub mod workload;
