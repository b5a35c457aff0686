//! Plugin runtime figures, before and after, in one run: `cargo bench -p celery-operator
//! --bench plugins` (release build). Each figure is printed with its goal and the ratio of
//! before to after:
//!
//! - `decide` of the built-in queue-length plugin, each call in a fresh Store and instance
//!   (goal: p50 <= 30 µs, p99 <= 60 µs);
//! - a cold compile of each default plugin (goal: p50 <= 50 ms);
//! - a restart: a compiled plugin loaded from its serialized form, as from the disk cache,
//!   against compiling it;
//! - the shape stage (autoscaler plugin and shaper chain) on the full example resource
//!   (goal: p50 <= 200 µs).
//!
//! "Before" is the engine configuration of the previous release ([`baseline_engine`]:
//! Cranelift, an `mmap` per instance) and, for compiles, the default plugins as that release
//! built them (`benches/fixtures/before/`); "after" is [`engine`] and today's plugins.
//!
//! `SHAPE_PARTS=1` also times the parts of the shape stage alone.
//!
//! `DECIDE_CALLS=N` only loads the queue-length plugin and makes N decide calls (for
//! instruction counts under `valgrind --tool=callgrind`, which are repeatable where timings
//! on these machines are not).

use std::sync::Arc;
use std::time::{Duration, Instant};

use celery_operator::crd::Celery;
use celery_operator::desired::desired_children;
use celery_operator::plugin::bindings::scaler;
use celery_operator::plugin::runtime::engine;
use celery_operator::plugin::{Compiler, Limits, PluginId, Registry, Runtime, builtin};
use celery_operator::plugin::{PluginConfig, Plugins};
use celery_operator::shape::shape;
use wasmtime::Engine;
use wasmtime::component::Component;

/// The engine configuration of the previous release: Cranelift, an `mmap` per instance, no
/// instance pool. Its epoch never advances (no call here comes near a deadline).
fn baseline_engine() -> Engine {
    let mut config = wasmtime::Config::new();
    config.epoch_interruption(true);
    Engine::new(&config).expect("the wasmtime configuration is valid")
}

/// The default plugins as the previous release built them, by built-in name.
const BEFORE: &[(&str, &[u8])] = &[
    ("hpa", include_bytes!("fixtures/before/hpa.wasm")),
    ("keda", include_bytes!("fixtures/before/keda.wasm")),
    (
        "queue-length",
        include_bytes!("fixtures/before/queue_length.wasm"),
    ),
    ("latency", include_bytes!("fixtures/before/latency.wasm")),
    ("noop", include_bytes!("fixtures/before/noop_shaper.wasm")),
];

fn percentile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort();
    samples[((samples.len() - 1) as f64 * q) as usize]
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

/// Prints one figure: before, after, their ratio, and the goal (a bound on `after`).
fn report(name: &str, before: Duration, after: Duration, goal: Option<Duration>) {
    let ratio = before.as_secs_f64() / after.as_secs_f64();
    let goal = match goal {
        Some(g) if after <= g => format!("<= {g:.0?}: met"),
        Some(g) => format!("<= {g:.0?}: MISSED"),
        None => "-".into(),
    };
    println!("{name:<44} {before:>10.1?} {after:>10.1?} {ratio:>7.1}x  {goal}");
}

fn scaling_input() -> scaler::ScalingInput {
    scaler::ScalingInput {
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
    }
}

/// `decide` samples (5,000 calls after 200 to warm up) on a runtime over `engine`.
fn decide_samples(engine: Engine) -> Vec<Duration> {
    let runtime = Runtime::on_engine(engine, Limits::default(), Compiler::InProcess);
    let plugin = runtime.load(builtin::QUEUE_LENGTH).unwrap();
    let input = scaling_input();
    time(200, || runtime.decide(&plugin, &input).unwrap());
    time(5000, || runtime.decide(&plugin, &input).unwrap())
}

/// `examples/full.yaml`, as the API server would give it.
fn full_example() -> Celery {
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/full.yaml"
    ))
    .unwrap();
    let mut celery: Celery = serde_saphyr::from_str(&yaml).unwrap();
    celery.metadata.uid = Some("uid".into());
    celery
}

/// Shape-stage samples (500 runs) on the full example resource, with plugins on `engine`.
fn shape_samples(engine: Engine) -> (usize, Vec<Duration>) {
    let runtime = Runtime::on_engine(engine, Limits::default(), Compiler::InProcess);
    let registry = Arc::new(Registry::with_builtins(Arc::new(runtime)).unwrap());
    let config = PluginConfig {
        cluster_shapers: vec![PluginId::named("noop")],
        ..PluginConfig::default()
    };
    let plugins = Plugins::new(registry, config);
    let celery = full_example();
    let built = desired_children(&celery);
    let objects = built.len();
    // The objects are cloned before each run, outside the time (the stage takes them).
    let runs = |n| {
        (0..n)
            .map(|_| {
                let built = built.clone();
                let start = Instant::now();
                std::hint::black_box(shape(&plugins, &celery, built, &Default::default()).unwrap());
                start.elapsed()
            })
            .collect::<Vec<_>>()
    };
    runs(50);
    (objects, runs(500))
}

/// `SHAPE_PARTS=1`: the parts of the shape stage, each timed alone (p50 of 500).
fn shape_parts(celery: &Celery) {
    use celery_operator::plugin::bindings::{autoscaler, shaper};
    use celery_operator::plugin_output::{autoscaler_children, shaped_children};
    use celery_operator::shape::celery_for_plugins;

    let part = |name: &str, f: &mut dyn FnMut()| {
        let mut samples = time(500, f);
        println!("  {name:<40} {:>10.1?}", percentile(&mut samples, 0.5));
    };
    let rt = Runtime::new(Limits::default(), Compiler::InProcess);
    let built = desired_children(celery);
    let texts: Vec<String> = built.iter().map(|c| c.object.to_string()).collect();
    let celery_json = celery_for_plugins(celery);
    part("the resource as JSON", &mut || {
        celery_for_plugins(celery);
    });
    part(
        &format!(
            "{} objects as JSON ({} B)",
            texts.len(),
            texts.concat().len()
        ),
        &mut || {
            built.iter().map(|c| c.object.to_string()).for_each(drop);
        },
    );
    let noop = rt.load(builtin::NOOP).unwrap();
    let input = shaper::ShapeInput {
        celery: celery_json.clone(),
        objects: texts.clone(),
        settings: "{}".into(),
    };
    part("noop shaper call", &mut || {
        rt.shape(&noop, &input).unwrap();
    });
    part("its answer read (unchanged objects)", &mut || {
        shaped_children(&built, &texts, &texts).unwrap();
    });
    let hpa = rt.load(builtin::HPA).unwrap();
    let pool = celery
        .spec
        .workers
        .iter()
        .find(|w| w.name == "images")
        .unwrap();
    let input = autoscaler::PoolInput {
        celery: celery_json,
        pool: pool.name.clone(),
        deployment: celery_operator::names::worker_name(celery, &pool.name),
        autoscaling: serde_json::to_string(&pool.autoscaling).unwrap(),
        queues: pool.queues.clone(),
        settings: "{}".into(),
    };
    part("hpa autoscaler call", &mut || {
        rt.autoscaler_objects(&hpa, &input).unwrap();
    });
    let out = rt.autoscaler_objects(&hpa, &input).unwrap();
    part("its answer read", &mut || {
        autoscaler_children(celery, pool, &out).unwrap();
    });
}

fn main() {
    if let Some(calls) = std::env::var("DECIDE_CALLS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        let runtime = Runtime::new(Limits::default(), Compiler::InProcess);
        let plugin = runtime.load(builtin::QUEUE_LENGTH).unwrap();
        let input = scaling_input();
        for _ in 0..calls {
            std::hint::black_box(runtime.decide(&plugin, &input).unwrap());
        }
        return;
    }
    let baseline = baseline_engine();
    println!(
        "{:<44} {:>10} {:>10} {:>8}  goal",
        "figure", "before", "after", "ratio"
    );

    let mut before = decide_samples(baseline.clone());
    let mut after = decide_samples(engine().clone());
    for (q, name, goal) in [(0.5, "p50", 30), (0.99, "p99", 60)] {
        report(
            &format!("decide: queue-length, fresh instance, {name}"),
            percentile(&mut before, q),
            percentile(&mut after, q),
            Some(Duration::from_micros(goal)),
        );
    }

    for (name, old) in BEFORE {
        let (_, new) = builtin::ALL
            .iter()
            .find(|(n, _)| n == name)
            .expect("every earlier plugin is still built in");
        let compile = |engine: &Engine, bytes: &[u8]| {
            let mut samples = time(10, || Component::new(engine, bytes).expect("compiles"));
            percentile(&mut samples, 0.5)
        };
        report(
            &format!(
                "compile p50: {name} ({} -> {} KB)",
                old.len() >> 10,
                new.len() >> 10
            ),
            compile(&baseline, old),
            compile(engine(), new),
            Some(Duration::from_millis(50)),
        );
    }

    for (name, bytes) in builtin::ALL {
        let component = Component::new(engine(), bytes).unwrap();
        let serialized = component.serialize().unwrap();
        let mut compiles = time(10, || Component::new(engine(), bytes).unwrap());
        // SAFETY: serialized just now by this engine.
        let mut loads = time(10, || unsafe {
            Component::deserialize(engine(), &serialized).unwrap()
        });
        report(
            &format!("restart p50: {name}, compile -> cached"),
            percentile(&mut compiles, 0.5),
            percentile(&mut loads, 0.5),
            None,
        );
    }

    let (objects, mut before) = shape_samples(baseline);
    let (_, mut after) = shape_samples(engine().clone());
    report(
        &format!("shape p50: examples/full.yaml ({objects} objects)"),
        percentile(&mut before, 0.5),
        percentile(&mut after, 0.5),
        Some(Duration::from_micros(200)),
    );
    report(
        "shape p99",
        percentile(&mut before, 0.99),
        percentile(&mut after, 0.99),
        None,
    );
    if std::env::var_os("SHAPE_PARTS").is_some() {
        shape_parts(&full_example());
    }
}
