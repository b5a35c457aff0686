//! Host-side bindings of the WIT worlds in `wit/`: the current `celery:operator@0.2.0`,
//! which the host speaks, and in [`v0_1`] the earlier `0.1.0` (`wit/0.1.0/`), still served:
//! a plugin built against it is called with the current input converted down and its answer
//! converted up.

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

/// The `scaler-plugin` world (its records implement `Default`: an unknown workload figure is
/// `None`).
pub mod scaler {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "scaler-plugin",
        additional_derives: [Default, PartialEq],
    });
    pub use exports::celery::operator::scaler::{
        Decision, QueueDepth, Recommendation, Sample, ScalingInput, Workload,
    };
}

/// `celery:operator@0.1.0`: the same three worlds without the scaler's workload figures.
pub mod v0_1 {
    /// The `shaper-plugin` world at 0.1.0.
    pub mod shaper {
        wasmtime::component::bindgen!({ path: "../wit/0.1.0", world: "shaper-plugin" });
        pub use exports::celery::operator::shaper::ShapeInput;
    }

    /// The `autoscaler-plugin` world at 0.1.0.
    pub mod autoscaler {
        wasmtime::component::bindgen!({ path: "../wit/0.1.0", world: "autoscaler-plugin" });
        pub use exports::celery::operator::autoscaler::PoolInput;
    }

    /// The `scaler-plugin` world at 0.1.0.
    pub mod scaler {
        wasmtime::component::bindgen!({ path: "../wit/0.1.0", world: "scaler-plugin" });
        pub use exports::celery::operator::scaler::{
            Decision, QueueDepth, Recommendation, Sample, ScalingInput,
        };
    }

    /// A shaper's input at 0.1.0 (the same record).
    pub fn shape_input(i: &super::shaper::ShapeInput) -> shaper::ShapeInput {
        shaper::ShapeInput {
            celery: i.celery.clone(),
            objects: i.objects.clone(),
            settings: i.settings.clone(),
        }
    }

    /// An autoscaler plugin's input at 0.1.0 (the same record).
    pub fn pool_input(i: &super::autoscaler::PoolInput) -> autoscaler::PoolInput {
        autoscaler::PoolInput {
            celery: i.celery.clone(),
            pool: i.pool.clone(),
            deployment: i.deployment.clone(),
            autoscaling: i.autoscaling.clone(),
            queues: i.queues.clone(),
            settings: i.settings.clone(),
        }
    }

    /// A scaler's input at 0.1.0: without the workload figures and the queues' oldest wait.
    pub fn scaling_input(i: &super::scaler::ScalingInput) -> scaler::ScalingInput {
        scaler::ScalingInput {
            pool: i.pool.clone(),
            now_ms: i.now_ms,
            current_replicas: i.current_replicas,
            min_replicas: i.min_replicas,
            max_replicas: i.max_replicas,
            target_per_replica: i.target_per_replica,
            samples: i
                .samples
                .iter()
                .map(|s| scaler::Sample {
                    at_ms: s.at_ms,
                    queues: s
                        .queues
                        .iter()
                        .map(|q| scaler::QueueDepth {
                            name: q.name.clone(),
                            ready: q.ready,
                            reserved: q.reserved,
                        })
                        .collect(),
                })
                .collect(),
            history: i
                .history
                .iter()
                .map(|r| scaler::Recommendation {
                    at_ms: r.at_ms,
                    replicas: r.replicas,
                })
                .collect(),
            settings: i.settings.clone(),
        }
    }

    /// A 0.1.0 scaler's decision (the same record).
    pub fn decision(d: scaler::Decision) -> super::scaler::Decision {
        super::scaler::Decision {
            replicas: d.replicas,
            recommendation: d.recommendation,
            reason: d.reason,
        }
    }
}
