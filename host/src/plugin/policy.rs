//! The failure policies, with one meaning for every role. A plugin call either answers, or
//! fails and its role's [`FailurePolicy`] decides:
//!
//! - `fail`: the failure is the caller's error (the reconcile is Degraded and retried; a
//!   scaler holds its replicas);
//! - `keep-last-good`: keep what runs: the caller uses its last good answer if it has one,
//!   and otherwise leaves the running objects (or replicas) as they are;
//! - `builtin`: the built-in plugin of the same name answers instead, or else the built-in
//!   the cluster would choose by default for that role (`--default-autoscaler` /
//!   `--default-queue-autoscaler` for the pool's metrics, `--default-scaler`, and `noop` for
//!   shapers). If that fails too, it is a failure.
//!
//! A shaper's refusal (`PluginError::Rejected`) is its answer, a policy decision, never
//! absorbed by a policy.

use super::{FailurePolicy, PluginError, PluginId, Plugins, Resolved, Role};
use crate::crd::{PluginUse, WorkerPool};

/// What a plugin call came to.
#[derive(Debug)]
pub enum Called<T> {
    /// The wanted plugin answered.
    Answered {
        /// The plugin.
        by: Resolved,
        /// Its answer.
        value: T,
    },
    /// It failed, and a built-in answered instead (policy `builtin`).
    Replaced {
        /// The wanted plugin's failure.
        error: PluginError,
        /// The built-in.
        by: Resolved,
        /// Its answer.
        value: T,
    },
    /// It failed, and what runs is kept (policy `keep-last-good`).
    KeepWhatRuns {
        /// The failure.
        error: PluginError,
    },
    /// It failed (policy `fail`, a fallback that failed too, or a shaper's refusal).
    Failed {
        /// The failure (the wanted plugin's).
        error: PluginError,
    },
}

/// Calls the plugin `wanted` of `role` with `run`, applying the role's failure policy.
/// `pool` is the pool the call is for, when there is one (it picks the default built-in).
pub fn call<T>(
    plugins: &Plugins,
    role: Role,
    wanted: &PluginId,
    pool: Option<&WorkerPool>,
    run: impl Fn(&Resolved) -> Result<T, PluginError>,
) -> Called<T> {
    let error = match plugins
        .registry
        .resolve(role, wanted)
        .and_then(|r| run(&r).map(|value| (r, value)))
    {
        Ok((by, value)) => return Called::Answered { by, value },
        Err(error) => error,
    };
    if role == Role::Shaper && matches!(error, PluginError::Rejected(_)) {
        return Called::Failed { error };
    }
    match plugins.policy(role) {
        FailurePolicy::Fail => Called::Failed { error },
        FailurePolicy::KeepLastGood => Called::KeepWhatRuns { error },
        FailurePolicy::Builtin => {
            let builtin = plugins.registry.builtin(&wanted.name).or_else(|| {
                plugins
                    .registry
                    .builtin(plugins.default_builtin(role, pool))
            });
            match builtin.map(|b| run(&b).map(|value| (b, value))) {
                Some(Ok((by, value))) => Called::Replaced { error, by, value },
                _ => Called::Failed { error },
            }
        }
    }
}

/// How a plugin's use is shown in `status.plugins`.
pub fn usage(role: Role, target: &str, by: &Resolved, fallback: Option<String>) -> PluginUse {
    PluginUse {
        role: role.to_string(),
        target: target.into(),
        name: by.name.clone(),
        digest: by.plugin.digest.clone(),
        source: by.source.to_string(),
        fallback,
    }
}
