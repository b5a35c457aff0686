//! The default plugins, embedded in the operator binary (built from `plugins/` by
//! `host/build.rs`).

/// Name and component bytes of every built-in plugin.
pub const ALL: &[(&str, &[u8])] = &[
    ("hpa", HPA),
    ("keda", KEDA),
    ("queue-length", QUEUE_LENGTH),
    ("latency", LATENCY),
    ("noop", NOOP),
];

/// Emits an autoscaling/v2 HorizontalPodAutoscaler for cpu and memory metrics.
pub const HPA: &[u8] = include_bytes!(concat!(env!("CELERY_PLUGIN_DIR"), "/hpa.wasm"));
/// Emits a KEDA ScaledObject and TriggerAuthentication.
pub const KEDA: &[u8] = include_bytes!(concat!(env!("CELERY_PLUGIN_DIR"), "/keda.wasm"));
/// HPA-compatible scaling decisions on queue length.
pub const QUEUE_LENGTH: &[u8] =
    include_bytes!(concat!(env!("CELERY_PLUGIN_DIR"), "/queue_length.wasm"));
/// Little's-law scaling decisions on a target task wait (`targetWaitSeconds`), from the
/// workload figures the operator measures.
pub const LATENCY: &[u8] = include_bytes!(concat!(env!("CELERY_PLUGIN_DIR"), "/latency.wasm"));
/// A shaper that changes nothing.
pub const NOOP: &[u8] = include_bytes!(concat!(env!("CELERY_PLUGIN_DIR"), "/noop_shaper.wasm"));
