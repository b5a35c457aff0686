//! WebAssembly component plugins: the sandboxed [`runtime`], the named plugins a cluster
//! has ([`registry`], with the [`builtin`] defaults and those loaded from ConfigMaps), which
//! plugin does what ([`choice`], where the difference between an *autoscaler* and a *scaler*
//! plugin is explained), and the failure [`policy`] that decides what happens when a plugin
//! misbehaves.

pub mod bindings;
pub mod builtin;
pub mod choice;
pub mod cli;
pub mod compile;
pub mod configmap;
pub mod oci;
pub mod policy;
pub mod registry;
pub mod runtime;
pub mod scaffold;
pub mod signature;
pub mod wasi;

use std::time::Duration;

pub use choice::{OPERATOR_AUTOSCALER, PluginConfig, Plugins};
pub use compile::{Compiler, DiskCache, Sandbox};
pub use registry::{PluginId, Registry, Resolved};
pub use runtime::{Calls, Limits, Plugin, Runtime};

/// The WIT package plugins implement.
pub const WIT_PACKAGE: &str = "celery:operator";
/// The versions of [`WIT_PACKAGE`] this operator serves.
pub const WIT_VERSIONS_SERVED: &[&str] = &["0.1.0", "0.2.0"];

/// Plugin settings as the JSON object text the WIT expects (`{}` when there are none).
pub fn settings_text(settings: Option<&serde_json::Value>) -> String {
    settings.map_or_else(|| "{}".into(), ToString::to_string)
}

/// What a plugin is used for; one per WIT interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Adjusts or vetoes the objects built for a Celery resource (`shaper`).
    Shaper,
    /// Emits the objects that autoscale a pool (`autoscaler`).
    Autoscaler,
    /// Decides a pool's replicas from queue samples (`scaler`).
    Scaler,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 3] = [Role::Shaper, Role::Autoscaler, Role::Scaler];

    /// The WIT interface of the role.
    pub fn interface(self) -> &'static str {
        match self {
            Role::Shaper => "shaper",
            Role::Autoscaler => "autoscaler",
            Role::Scaler => "scaler",
        }
    }

    /// The WIT world a plugin of this role targets.
    pub fn world(self) -> &'static str {
        match self {
            Role::Shaper => "shaper-plugin",
            Role::Autoscaler => "autoscaler-plugin",
            Role::Scaler => "scaler-plugin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.interface())
    }
}

/// What to do when a plugin fails (traps, times out, returns garbage or is missing); see
/// [`policy`] for what each means in every role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FailurePolicy {
    /// Keep what runs: the last good answer if there is one, else the running objects (or
    /// replicas) stay as they are.
    KeepLastGood,
    /// Use the built-in plugin of the same name, or the cluster's default built-in for the
    /// role.
    Builtin,
    /// Fail the reconcile: nothing is applied, the resource is Degraded, it is retried.
    Fail,
}

/// Why a plugin could not be used or did not give an answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PluginError {
    /// The bytes are not a usable plugin (not a component, unknown WIT version, imports
    /// the host does not provide).
    #[error("invalid plugin: {0}")]
    Invalid(String),
    /// The plugin does not implement the role it was called for.
    #[error("the plugin implements {roles:?}, not {role}")]
    WrongRole {
        /// The role it was called for.
        role: Role,
        /// The roles it implements.
        roles: Vec<Role>,
    },
    /// The call ran past its deadline and was interrupted.
    #[error("the plugin did not finish within {0:?} and was stopped")]
    Timeout(Duration),
    /// The plugin tried to grow its memory past the cap.
    #[error("the plugin exceeded its memory limit of {0} bytes")]
    MemoryExceeded(usize),
    /// The plugin trapped (a panic, a stack overflow, an unreachable instruction).
    #[error("the plugin crashed: {message}{}", if .stderr.is_empty() { String::new() } else { format!(" ({})", .stderr) })]
    Trap {
        /// The trap.
        message: String,
        /// What the plugin wrote to standard error (a panic message).
        stderr: String,
    },
    /// The plugin returned more than the output cap.
    #[error("the plugin returned {size} bytes, more than the limit of {limit}")]
    OutputTooLarge {
        /// Bytes returned.
        size: usize,
        /// The cap.
        limit: usize,
    },
    /// The plugin answered with an error (for a shaper: a policy rejection).
    #[error("{0}")]
    Rejected(String),
    /// The plugin's answer is malformed (not JSON, not a Kubernetes object, an object it may
    /// not return).
    #[error("the plugin returned an invalid answer: {0}")]
    BadOutput(String),
    /// The plugin crashed `crashes` times in a row and is not run again before its backoff
    /// ends.
    #[error(
        "the plugin crashed {crashes} time(s) in a row; it is not run again for {retry_in:.0?}"
    )]
    Backoff {
        /// Crashes in a row.
        crashes: u32,
        /// Time left.
        retry_in: Duration,
    },
    /// No plugin of that name (or pinned digest) is loaded.
    #[error("{0}")]
    NotFound(String),
}
