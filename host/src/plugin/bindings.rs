//! Host-side bindings of the WIT worlds in `wit/`.

/// The `shaper-plugin` world.
pub mod shaper {
    wasmtime::component::bindgen!({ path: "../wit", world: "shaper-plugin" });
    pub use exports::celery::operator::shaper::ShapeInput;
}

/// The `autoscaler-plugin` world.
pub mod autoscaler {
    wasmtime::component::bindgen!({ path: "../wit", world: "autoscaler-plugin" });
    pub use exports::celery::operator::autoscaler::PoolInput;
}

/// The `scaler-plugin` world.
pub mod scaler {
    wasmtime::component::bindgen!({ path: "../wit", world: "scaler-plugin" });
    pub use exports::celery::operator::scaler::{
        Decision, QueueDepth, Recommendation, Sample, ScalingInput,
    };
}
