//! The pure part of reconciliation, shared by the controller and `celery-operator render`:
//! [`plan`] validates a resource, builds its desired children and lets the plugins shape
//! them. Nothing here talks to the API server, so what `render` prints is what the
//! controller would apply.

use std::collections::BTreeMap;

use crate::children::Child;
use crate::crd::Celery;
use crate::desired::desired_children;
use crate::plugin::Plugins;
use crate::shape::{ShapeError, Shaped, shape};
use crate::validate::{InvalidSpec, validate};

/// What reconciling a resource should apply: the shaped children and what the plugins did.
pub type Plan = Shaped;

/// Why a resource has no plan.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// The spec breaks a rule of the CRD: nothing is applied or pruned.
    #[error("{0}")]
    Invalid(#[from] InvalidSpec),
    /// A plugin failed or a shaper rejected the objects.
    #[error("{0}")]
    Plugin(#[from] ShapeError),
}

impl PlanError {
    /// The condition reason for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            PlanError::Invalid(_) => "InvalidSpec",
            PlanError::Plugin(ShapeError::Rejected { .. }) => "ShapingRejected",
            PlanError::Plugin(ShapeError::Failed { .. }) => "PluginFailed",
        }
    }
}

/// Validates, builds and shapes. `last_good` holds the last objects each pool's autoscaler
/// plugin returned (empty offline), for the `keep-last-good` failure policy.
pub fn plan(
    celery: &Celery,
    plugins: &Plugins,
    last_good: &BTreeMap<String, Vec<Child>>,
) -> Result<Plan, PlanError> {
    validate(celery)?;
    Ok(shape(plugins, celery, desired_children(celery), last_good)?)
}
