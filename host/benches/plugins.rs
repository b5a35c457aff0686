//! Plugin runtime figures: `cargo bench -p celery-operator --bench plugins`.
//!
//! - a `decide` call of the built-in queue-length plugin, each in a fresh Store (goal: p50 at
//!   most 50 µs on a 2-core machine);
//! - a cold compile of each default plugin (goal: at most 100 ms);
//! - the shape stage (autoscaler plugins and a shaper chain) on the full example resource.

use std::sync::Arc;
use std::time::{Duration, Instant};

use celery_operator::crd::Celery;
use celery_operator::desired::desired_children;
use celery_operator::plugin::bindings::scaler;
use celery_operator::plugin::runtime::engine;
use celery_operator::plugin::{Compiler, Limits, PluginId, Registry, Runtime, builtin};
use celery_operator::plugin::{PluginConfig, Plugins};
use celery_operator::shape::shape;

fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration, Duration) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    (at(0.5), at(0.9), at(0.99))
}

fn report(name: &str, samples: Vec<Duration>) {
    let n = samples.len();
    let (p50, p90, p99) = percentiles(samples);
    println!("{name:<48} n={n:<6} p50={p50:>10.1?} p90={p90:>10.1?} p99={p99:>10.1?}");
}

fn time<R>(n: usize, mut f: impl FnMut() -> R) -> Vec<Duration> {
    (0..n)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(f());
            start.elapsed()
        })
        .collect()
}

fn main() {
    // `DECIDE_CALLS=N`: only load the queue-length plugin and make N decide calls (for
    // instruction counts under `valgrind --tool=callgrind`, which are repeatable where
    // timings on these machines are not).
    let decide_only: Option<usize> = std::env::var("DECIDE_CALLS")
        .ok()
        .and_then(|v| v.parse().ok());
    let runtime = Runtime::new(Limits::default(), Compiler::InProcess);

    for (name, bytes) in builtin::ALL.iter().filter(|_| decide_only.is_none()) {
        let samples = time(10, || {
            wasmtime::component::Component::new(engine(), bytes).expect("compiles")
        });
        report(
            &format!("cold compile: {name} ({} KB)", bytes.len() / 1024),
            samples,
        );
    }

    let plugin = runtime.load(builtin::QUEUE_LENGTH).unwrap();
    let input = scaler::ScalingInput {
        pool: "reports".into(),
        now_ms: 1_000_000,
        current_replicas: 2,
        min_replicas: 0,
        max_replicas: 20,
        target_per_replica: 5.0,
        samples: (0..10)
            .map(|i| scaler::Sample {
                at_ms: 1_000_000 - i * 1000,
                queues: vec![scaler::QueueDepth {
                    name: "reports".into(),
                    ready: 30,
                    reserved: 7,
                    oldest_wait_ms: None,
                }],
            })
            .collect(),
        history: vec![],
        settings: "{}".into(),
        workload: scaler::Workload::default(),
    };
    if let Some(calls) = decide_only {
        for _ in 0..calls {
            std::hint::black_box(runtime.decide(&plugin, &input).unwrap());
        }
        return;
    }
    time(200, || runtime.decide(&plugin, &input).unwrap());
    report(
        "decide: queue-length, fresh Store per call",
        time(5000, || runtime.decide(&plugin, &input).unwrap()),
    );

    let registry = Arc::new(Registry::with_builtins(Arc::new(runtime)).unwrap());
    let config = PluginConfig {
        cluster_shapers: vec![PluginId::named("noop")],
        ..PluginConfig::default()
    };
    let plugins = Plugins::new(registry, config);
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/full.yaml"
    ))
    .unwrap();
    let mut celery: Celery = serde_saphyr::from_str(&yaml).unwrap();
    celery.metadata.uid = Some("uid".into());
    let built = desired_children(&celery);
    let samples = time(500, || {
        shape(&plugins, &celery, built.clone(), &Default::default()).unwrap()
    });
    report(
        &format!(
            "shape: examples/full.yaml ({} objects, hpa + noop)",
            built.len()
        ),
        samples,
    );
}
