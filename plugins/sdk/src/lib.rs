//! The SDK for celery-operator WebAssembly plugins.
//!
//! A plugin is a WebAssembly component that exports one interface of the WIT contract
//! `celery:operator@0.2.0` (the repository's `wit/celery-operator.wit`). This crate carries
//! the generated bindings for the three plugin worlds, so a plugin crate needs no
//! `wit-bindgen` of its own:
//!
//! | world | module | trait | export macro |
//! |---|---|---|---|
//! | `shaper-plugin` | [`shaper`] | [`shaper::Guest`] | [`export_shaper!`] |
//! | `autoscaler-plugin` | [`autoscaler`] | [`autoscaler::Guest`] | [`export_autoscaler!`] |
//! | `scaler-plugin` | [`scaler`] | [`scaler::Guest`] | [`export_scaler!`] |
//!
//! ```
//! use celery_operator_plugin_sdk::scaler::{Decision, Guest, ScalingInput};
//!
//! struct Fixed;
//!
//! impl Guest for Fixed {
//!     fn decide(input: ScalingInput) -> Result<Decision, String> {
//!         let replicas = 2.clamp(input.min_replicas, input.max_replicas);
//!         Ok(Decision { replicas, recommendation: replicas, reason: format!("always {replicas}") })
//!     }
//! }
//!
//! celery_operator_plugin_sdk::export_scaler!(Fixed);
//! # fn main() {}
//! ```
//!
//! Besides the bindings, [`settings`] parses a plugin's `settings` JSON into a typed struct
//! with error messages that name the offending field, [`json`] has small helpers to read
//! the Celery resource and the pool's `autoscaling` spec, [`queue_length`] is the
//! HPA-style queue-length maths of the `queue-length` plugin and [`latency`] the
//! Little's-law maths of the `latency` plugin, for scalers that build on them.
//! [`serde_json`] is re-exported so that a plugin's JSON matches the SDK's.
//!
//! The scaler's records derive [`Default`] (zeroes, empty strings and lists, every optional
//! figure absent), so a test or a plugin can write `..Default::default()` for the fields it
//! does not care about; [`scaler::Workload::unknown`] is a workload with no figure known.
//!
//! Plugins are pure functions: the host grants no filesystem, network, environment or
//! clock (time is passed in as `now-ms`), so never call `std::time::SystemTime::now()`,
//! `std::env` or `std::fs` in a plugin.

#![warn(missing_docs)]

// Lets the generated export macros name this crate as `celery_operator_plugin_sdk` both
// from plugin crates and from inside this crate.
extern crate self as celery_operator_plugin_sdk;

pub mod json;
pub mod latency;
pub mod queue_length;
pub mod settings;

pub use serde_json;
pub use settings::parse_settings;

/// Exports a type implementing [`shaper::Guest`] as the component's
/// `celery:operator/shaper@0.2.0` interface.
///
/// Write `celery_operator_plugin_sdk::export_shaper!(MyPlugin);` once, at the plugin
/// crate's root. The export glue is only compiled for `wasm32` targets: a native build (for
/// `cargo test`) cannot link the component model's export names, and needs none.
/// [`shaper::export!`] is the same glue without that guard.
#[macro_export]
macro_rules! export_shaper {
    ($($t:tt)*) => {
        #[cfg(target_arch = "wasm32")]
        $crate::shaper::export!($($t)*);
    };
}

/// Exports a type implementing [`autoscaler::Guest`] as the component's
/// `celery:operator/autoscaler@0.2.0` interface.
///
/// Write `celery_operator_plugin_sdk::export_autoscaler!(MyPlugin);` once, at the plugin
/// crate's root. Like [`export_shaper!`], the glue is only compiled for `wasm32` targets;
/// [`autoscaler::export!`] is the unguarded one.
#[macro_export]
macro_rules! export_autoscaler {
    ($($t:tt)*) => {
        #[cfg(target_arch = "wasm32")]
        $crate::autoscaler::export!($($t)*);
    };
}

/// Exports a type implementing [`scaler::Guest`] as the component's
/// `celery:operator/scaler@0.2.0` interface.
///
/// Write `celery_operator_plugin_sdk::export_scaler!(MyPlugin);` once, at the plugin
/// crate's root. Like [`export_shaper!`], the glue is only compiled for `wasm32` targets;
/// [`scaler::export!`] is the unguarded one.
#[macro_export]
macro_rules! export_scaler {
    ($($t:tt)*) => {
        #[cfg(target_arch = "wasm32")]
        $crate::scaler::export!($($t)*);
    };
}

/// Implementation details of the export macros; not a public API.
#[doc(hidden)]
pub mod __private {
    pub use wit_bindgen;
}

/// The `shaper-plugin` world: adjust or veto the objects the operator built.
///
/// Implement [`shaper::Guest`] and export it with [`export_shaper!`].
pub mod shaper {
    #![allow(missing_docs)]
    wit_bindgen::generate!({
        world: "shaper-plugin",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "export",
        default_bindings_module: "celery_operator_plugin_sdk::shaper",
        runtime_path: "celery_operator_plugin_sdk::__private::wit_bindgen::rt",
        additional_derives: [PartialEq, Clone],
    });

    pub use self::exports::celery::operator::shaper::*;
}

/// The `autoscaler-plugin` world: emit the objects that autoscale a worker pool.
///
/// Implement [`autoscaler::Guest`] and export it with [`export_autoscaler!`].
pub mod autoscaler {
    #![allow(missing_docs)]
    wit_bindgen::generate!({
        world: "autoscaler-plugin",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "export",
        default_bindings_module: "celery_operator_plugin_sdk::autoscaler",
        runtime_path: "celery_operator_plugin_sdk::__private::wit_bindgen::rt",
        additional_derives: [PartialEq, Clone],
    });

    pub use self::exports::celery::operator::autoscaler::*;
}

/// The `scaler-plugin` world: decide how many workers a pool runs.
///
/// Implement [`scaler::Guest`] and export it with [`export_scaler!`].
pub mod scaler {
    #![allow(missing_docs)]
    wit_bindgen::generate!({
        world: "scaler-plugin",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "export",
        default_bindings_module: "celery_operator_plugin_sdk::scaler",
        runtime_path: "celery_operator_plugin_sdk::__private::wit_bindgen::rt",
        // `Default` too (the scaler's records have no variant or enum field): all-absent
        // `Workload`s and `..Default::default()` in tests.
        additional_derives: [PartialEq, Clone, Default],
    });

    pub use self::exports::celery::operator::scaler::*;

    impl Workload {
        /// A workload of which no figure is known (what the host passes before any worker's
        /// heartbeat); the same as `Workload::default()`.
        pub fn unknown() -> Self {
            Workload::default()
        }
    }
}
