//! The plugin runtime with real components: the default plugins through the host, hostile
//! plugins (built from `plugins/testing/`, and written from scratch in
//! `support/hostile.rs`), the failure policies, and ConfigMap swaps.

#[path = "../support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use celery_operator::children::ChildKind;
use celery_operator::crd::{Celery, CelerySpec, PluginLimits};
use celery_operator::plugin::bindings::{autoscaler::PoolInput, scaler, shaper::ShapeInput};
use celery_operator::plugin::configmap::{self, Loaded, PLUGIN_LABEL, WASM_KEY};
use celery_operator::plugin::oci::Registries;
use celery_operator::plugin::registry::Source;
use celery_operator::plugin::{
    Compiler, DiskCache, FailurePolicy, Limits, PluginError, PluginId, Registry, Role, Runtime,
    Sandbox, builtin,
};
use celery_operator::plugin::{PluginConfig, Plugins};
use celery_operator::shape::{self, ShapeError};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use serde_json::{Value, json};
use support::{fixture, hostile};

/// Untrusted components are compiled as in the operator: by a bounded child process of the
/// operator binary (an unoptimised build here, so with room to spare).
fn compiler() -> Compiler {
    Compiler::Sandboxed(Sandbox {
        program: env!("CARGO_BIN_EXE_celery-operator").into(),
        timeout: Duration::from_secs(60),
        memory_bytes: 1 << 30,
        cache: None,
    })
}

/// Tests run an unoptimised build on a loaded 2-core machine: a 1 s deadline keeps good calls
/// clear of it, while an endless loop still runs into it.
const LIMITS: Limits = Limits {
    deadline: Duration::from_secs(1),
    memory_bytes: 32 << 20,
    output_bytes: 1 << 20,
};

fn runtime() -> Runtime {
    Runtime::new(LIMITS, compiler())
}

fn pool_input(pool: &str, autoscaling: Value, broker_type: &str) -> PoolInput {
    PoolInput {
        celery: json!({"metadata": {"name": "shop", "namespace": "shop"},
                       "spec": {"broker": {"type": broker_type, "secretRef": {"name": "broker", "key": "url"}}}})
        .to_string(),
        pool: pool.into(),
        deployment: format!("shop-worker-{pool}"),
        autoscaling: autoscaling.to_string(),
        queues: vec!["reports".into()],
        settings: "{}".into(),
    }
}

fn scaling_input(pool: &str, current: u32, ready: u64, reserved: u64) -> scaler::ScalingInput {
    scaler::ScalingInput {
        pool: pool.into(),
        now_ms: 1_000_000,
        current_replicas: current,
        min_replicas: 0,
        max_replicas: 20,
        target_per_replica: 5.0,
        samples: vec![scaler::Sample {
            at_ms: 1_000_000,
            queues: vec![scaler::QueueDepth {
                name: "reports".into(),
                ready,
                reserved,
                oldest_wait_ms: None,
            }],
        }],
        history: vec![],
        settings: "{}".into(),
        workload: scaler::Workload::default(),
    }
}

/// A component built against `celery:operator@0.1.0` before 0.2.0 existed: the built-ins
/// of that release, byte for byte (`tests/fixtures/wit-0.1.0`).
fn built_for_0_1(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/wit-0.1.0/{name}.wasm",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Plugins built for 0.1.0 load, say so, and answer as they did: the host serves both
/// versions, converting the 0.2.0 input down (the workload figures are dropped).
#[test]
fn plugins_built_for_wit_0_1_keep_working() {
    let rt = runtime();
    let old = |name: &str| {
        let p = rt
            .load(&built_for_0_1(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(p.wit_version, "0.1.0", "{name}");
        p
    };
    // A scaler: the same decision as today's queue-length, with or without figures.
    let (then, now) = (old("queue_length"), rt.load(builtin::QUEUE_LENGTH).unwrap());
    let mut input = scaling_input("reports", 2, 30, 7);
    input.workload.completion_rate = Some(3.0);
    input.samples[0].queues[0].oldest_wait_ms = Some(12_000);
    let decided = rt.decide(&then, &input).unwrap();
    assert_eq!(decided, rt.decide(&now, &input).unwrap());
    assert_eq!((decided.replicas, decided.recommendation), (8, 8));
    // An autoscaler plugin.
    let hpa = old("hpa");
    let autoscaling = json!({"minReplicas": 2, "maxReplicas": 9, "metrics": [
        {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}]});
    let input = pool_input("reports", autoscaling, "redis");
    let out = objects(rt.autoscaler_objects(&hpa, &input).unwrap());
    // The same objects (today's build writes its fields in another order).
    assert_eq!(
        out,
        objects(
            rt.autoscaler_objects(&rt.load(builtin::HPA).unwrap(), &input)
                .unwrap()
        )
    );
    assert_eq!(out[0]["kind"], "HorizontalPodAutoscaler");
    // A shaper.
    let noop = old("noop_shaper");
    let input = ShapeInput {
        celery: "{}".into(),
        objects: vec![json!({"kind": "Service", "metadata": {"name": "a"}}).to_string()],
        settings: "{}".into(),
    };
    assert_eq!(rt.shape(&noop, &input).unwrap(), input.objects);
}

fn objects(out: Vec<String>) -> Vec<Value> {
    out.iter()
        .map(|o| serde_json::from_str(o).unwrap())
        .collect()
}

#[test]
fn builtins_load_with_their_roles() {
    let rt = runtime();
    for (name, bytes, role) in [
        ("hpa", builtin::HPA, Role::Autoscaler),
        ("keda", builtin::KEDA, Role::Autoscaler),
        ("queue-length", builtin::QUEUE_LENGTH, Role::Scaler),
        ("latency", builtin::LATENCY, Role::Scaler),
        ("noop", builtin::NOOP, Role::Shaper),
    ] {
        let p = rt.load(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(p.roles, vec![role], "{name}");
        assert_eq!(p.wit_version, "0.2.0");
        assert!(p.digest.starts_with("sha256:") && p.digest.len() == 71);
        println!("{name}: {} bytes", p.size);
    }
}

#[test]
fn hpa_plugin_through_the_host() {
    let rt = runtime();
    let p = rt.load(builtin::HPA).unwrap();
    let autoscaling = json!({"minReplicas": 2, "maxReplicas": 9, "metrics": [
        {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
        {"name": "memory", "target": {"type": "AverageValue", "averageValue": "1Gi"}}]});
    let out = objects(
        rt.autoscaler_objects(&p, &pool_input("reports", autoscaling, "redis"))
            .unwrap(),
    );
    assert_eq!(out.len(), 1);
    let hpa = &out[0];
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    assert_eq!(hpa["kind"], "HorizontalPodAutoscaler");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "shop-worker-reports");
    assert_eq!(hpa["spec"]["minReplicas"], 2);
    assert_eq!(hpa["spec"]["maxReplicas"], 9);
    assert_eq!(
        hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"],
        70
    );
    assert_eq!(
        hpa["spec"]["metrics"][1]["resource"]["target"]["averageValue"],
        "1Gi"
    );

    let queue = json!({"minReplicas": 1, "maxReplicas": 9, "metrics": [
        {"name": "taskQueueLength", "target": {"type": "AverageValue", "averageValue": "5"}}]});
    let err = rt
        .autoscaler_objects(&p, &pool_input("reports", queue, "redis"))
        .unwrap_err();
    assert!(
        matches!(&err, PluginError::Rejected(m) if m.contains("queue")),
        "{err}"
    );
}

#[test]
fn keda_plugin_covers_every_priority_list() {
    let rt = runtime();
    let p = rt.load(builtin::KEDA).unwrap();
    let autoscaling = json!({"minReplicas": 0, "maxReplicas": 9, "metrics": [
        {"name": "taskQueueLength", "target": {"type": "AverageValue", "averageValue": "5"}}]});
    let out = objects(
        rt.autoscaler_objects(&p, &pool_input("reports", autoscaling.clone(), "redis"))
            .unwrap(),
    );
    let scaled = out
        .iter()
        .find(|o| o["kind"] == "ScaledObject")
        .expect("a ScaledObject");
    let auth = out
        .iter()
        .find(|o| o["kind"] == "TriggerAuthentication")
        .expect("a TriggerAuthentication");
    assert_eq!(
        scaled["spec"]["scaleTargetRef"]["name"],
        "shop-worker-reports"
    );
    assert_eq!(scaled["spec"]["minReplicaCount"], 0);
    let lists: Vec<_> = scaled["spec"]["triggers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["metadata"]["listName"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        lists,
        [
            "reports",
            "reports\u{6}\u{16}3",
            "reports\u{6}\u{16}6",
            "reports\u{6}\u{16}9"
        ]
    );
    assert!(
        auth.to_string().contains("\"broker\""),
        "credentials come from the broker Secret: {auth}"
    );

    let out = objects(
        rt.autoscaler_objects(&p, &pool_input("reports", autoscaling, "rabbitmq"))
            .unwrap(),
    );
    let scaled = out.iter().find(|o| o["kind"] == "ScaledObject").unwrap();
    assert_eq!(scaled["spec"]["triggers"][0]["type"], "rabbitmq");
    assert_eq!(
        scaled["spec"]["triggers"][0]["metadata"]["queueName"],
        "reports"
    );
}

#[test]
fn queue_length_plugin_through_the_host() {
    let rt = runtime();
    let p = rt.load(builtin::QUEUE_LENGTH).unwrap();
    let d = rt.decide(&p, &scaling_input("reports", 2, 30, 7)).unwrap();
    assert_eq!((d.replicas, d.recommendation), (8, 8), "{}", d.reason);
    assert!(d.reason.contains("37"), "{}", d.reason);
    // Scale to zero only when both the queue and the reserved work are empty.
    assert_eq!(
        rt.decide(&p, &scaling_input("reports", 1, 0, 1))
            .unwrap()
            .replicas,
        1
    );
    assert_eq!(
        rt.decide(&p, &scaling_input("reports", 1, 0, 0))
            .unwrap()
            .replicas,
        0
    );
}

#[test]
fn noop_shaper_returns_its_input() {
    let rt = runtime();
    let p = rt.load(builtin::NOOP).unwrap();
    let objects =
        vec![json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}}).to_string()];
    let input = ShapeInput {
        celery: "{}".into(),
        objects: objects.clone(),
        settings: "{}".into(),
    };
    assert_eq!(rt.shape(&p, &input).unwrap(), objects);
}

type Expectation = dyn Fn(&PluginError) -> bool;
type Call<'a> = dyn Fn() -> Result<(), PluginError> + 'a;

/// Every hostile behaviour, in every role: a clear error, the process survives, and a good
/// plugin still works right after.
#[test]
fn hostile_plugins_fail_cleanly_and_good_ones_keep_working() {
    let rt = runtime();
    let hostile = rt.load(&fixture("hostile")).unwrap();
    let good = rt.load(builtin::QUEUE_LENGTH).unwrap();
    let is_timeout = |e: &PluginError| matches!(e, PluginError::Timeout(_));
    let is_memory = |e: &PluginError| matches!(e, PluginError::MemoryExceeded(_));
    let is_panic = |e: &PluginError| matches!(e, PluginError::Trap { stderr, .. } if stderr.contains("hostile plugin panicked on purpose"));
    // Rust keeps its stack in linear memory: overflowing it is an out-of-bounds access.
    let is_stack = |e: &PluginError| {
        matches!(e, PluginError::Trap { message, .. }
            if message.contains("stack") || message.contains("out of bounds memory access"))
    };
    let is_huge = |e: &PluginError| {
        matches!(
            e,
            PluginError::OutputTooLarge { .. } | PluginError::MemoryExceeded(_)
        )
    };
    let cases: [(&str, &Expectation); 5] = [
        ("loop", &is_timeout),
        ("oom", &is_memory),
        ("panic", &is_panic),
        ("recurse", &is_stack),
        ("huge", &is_huge),
    ];
    for (mode, expected) in cases {
        let calls: [(Role, Box<Call>); 3] = [
            (
                Role::Scaler,
                Box::new(|| rt.decide(&hostile, &scaling_input(mode, 1, 1, 0)).map(drop)),
            ),
            (
                Role::Autoscaler,
                Box::new(|| {
                    rt.autoscaler_objects(&hostile, &pool_input(mode, json!({}), "redis"))
                        .map(drop)
                }),
            ),
            (
                Role::Shaper,
                Box::new(|| {
                    let input = ShapeInput {
                        celery: "{}".into(),
                        objects: vec![],
                        settings: json!({"mode": mode}).to_string(),
                    };
                    rt.shape(&hostile, &input).map(drop)
                }),
            ),
        ];
        for (role, call) in calls {
            let start = Instant::now();
            let err = call().expect_err(mode);
            println!("{role} {mode}: {err} ({:?})", start.elapsed());
            assert!(expected(&err), "{role} {mode}: unexpected error: {err:?}");
            let after = rt
                .decide(&good, &scaling_input("reports", 2, 30, 7))
                .expect("a good plugin still works");
            assert_eq!(after.replicas, 8);
        }
    }
}

#[test]
fn output_larger_than_the_cap_is_refused() {
    // Room for the 64 MiB answer in memory, but not past the output cap.
    let rt = Runtime::new(
        Limits {
            deadline: Duration::from_secs(5),
            memory_bytes: 256 << 20,
            output_bytes: 1 << 20,
        },
        compiler(),
    );
    let hostile = rt.load(&fixture("hostile")).unwrap();
    let err = rt
        .decide(&hostile, &scaling_input("huge", 1, 1, 0))
        .unwrap_err();
    assert!(
        matches!(err, PluginError::OutputTooLarge { size, limit: 1_048_576 } if size >= 64 << 20),
        "{err:?}"
    );
    let input = ShapeInput {
        celery: "{}".into(),
        objects: vec![],
        settings: json!({"mode": "huge"}).to_string(),
    };
    let err = rt.shape(&hostile, &input).unwrap_err();
    assert!(matches!(err, PluginError::OutputTooLarge { .. }), "{err:?}");
}

#[test]
fn malformed_answers_are_caught_by_the_shape_stage() {
    let (plugins, celery) = setup(PluginConfig::default(), "default");
    plugins
        .registry
        .install(
            "hostile",
            &fixture("hostile"),
            Source::ConfigMap("ops/hostile".into()),
        )
        .unwrap();
    let mut celery = celery;
    with_shaper(&mut celery, "garbage");
    let err = run_shape(&plugins, &celery).unwrap_err();
    assert!(err.to_string().contains("not JSON"), "{err}");
}

#[test]
fn garbage_bytes_and_other_wit_versions_are_refused_clearly() {
    let rt = runtime();
    let err = rt.load(b"\0asm\x0d\0\x01\0garbage").unwrap_err();
    assert!(
        matches!(&err, PluginError::Invalid(m) if m.contains("not a WebAssembly component")),
        "{err}"
    );
    let err = rt.load(b"#!/bin/sh\necho hi\n").unwrap_err();
    assert!(matches!(&err, PluginError::Invalid(_)), "{err}");
    let err = rt.load(&fixture("future_version")).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("celery:operator/scaler@0.9.0")
            && msg.contains("serves celery:operator@0.1.0, 0.2.0"),
        "{msg}"
    );
}

#[test]
fn compiled_plugins_are_cached_by_digest() {
    let rt = runtime();
    let a = rt.load(builtin::HPA).unwrap();
    let b = rt.load(builtin::HPA).unwrap();
    assert!(Arc::ptr_eq(&a, &b));
}

const SPEC: &str = r#"
app: shop
image: shop:1
broker: {type: redis, secretRef: {name: broker, key: url}}
workers:
  - name: POOL
    autoscaling:
      minReplicas: 1
      maxReplicas: 5
      autoscaler: {name: custom}
      metrics: [{name: cpu, target: {type: Utilization, averageUtilization: 70}}]
"#;

fn setup(config: PluginConfig, pool: &str) -> (Plugins, Celery) {
    let registry = Registry::with_builtins(Arc::new(runtime())).unwrap();
    let spec: CelerySpec = serde_saphyr::from_str(&SPEC.replace("POOL", pool)).unwrap();
    let mut celery = Celery::new("shop", spec);
    celery.metadata.namespace = Some("shop".into());
    celery.metadata.uid = Some("uid-1".into());
    (Plugins::new(Arc::new(registry), config), celery)
}

/// Makes the hostile fixture the resource's shaper, in `mode`.
fn with_shaper(celery: &mut Celery, mode: &str) {
    let plugins = json!({"shapers": [{"name": "hostile", "settings": {"mode": mode}}]});
    celery.spec.plugins = Some(serde_json::from_value(plugins).unwrap());
}

fn run_shape(plugins: &Plugins, celery: &Celery) -> Result<shape::Shaped, ShapeError> {
    shape::shape(
        plugins,
        celery,
        celery_operator::desired::desired_children(celery),
        &Default::default(),
    )
}

fn with_policy(autoscaler: FailurePolicy, shaper: FailurePolicy) -> PluginConfig {
    PluginConfig {
        autoscaler_failure: autoscaler,
        shaper_failure: shaper,
        ..PluginConfig::default()
    }
}

fn kinds(shaped: &shape::Shaped) -> Vec<ChildKind> {
    shaped.children.iter().map(|c| c.kind).collect()
}

fn install(plugins: &Plugins, name: &str, bytes: &[u8]) {
    plugins
        .registry
        .install(name, bytes, Source::ConfigMap(format!("ops/{name}")))
        .unwrap();
}

#[test]
fn autoscaler_failure_policies() {
    // fail: nothing can be applied.
    let (plugins, celery) = setup(
        with_policy(FailurePolicy::Fail, FailurePolicy::Fail),
        "panic",
    );
    install(&plugins, "custom", &fixture("hostile"));
    let built = celery_operator::desired::desired_children(&celery);
    let err = shape::shape(&plugins, &celery, built.clone(), &Default::default()).unwrap_err();
    assert!(
        matches!(
            &err,
            ShapeError::Failed {
                role: Role::Autoscaler,
                ..
            }
        ),
        "{err}"
    );

    // builtin: the built-in of the default autoscaler (hpa) takes over.
    let (plugins, celery) = setup(
        with_policy(FailurePolicy::Builtin, FailurePolicy::Fail),
        "panic",
    );
    install(&plugins, "custom", &fixture("hostile"));
    let shaped = shape::shape(&plugins, &celery, built.clone(), &Default::default()).unwrap();
    assert_eq!(
        kinds(&shaped),
        [ChildKind::Deployment, ChildKind::HorizontalPodAutoscaler]
    );
    assert_eq!(shaped.uses[0].name, "hpa");
    assert_eq!(shaped.uses[0].fallback.as_deref(), Some("custom failed"));
    assert!(
        shaped.problems[0].contains("autoscaler custom failed for pool panic"),
        "{:?}",
        shaped.problems
    );

    // keep-last-good: the last good objects, or, with none, the live ones are kept.
    let (plugins, celery) = setup(
        with_policy(FailurePolicy::KeepLastGood, FailurePolicy::Fail),
        "panic",
    );
    let shaped = shape::shape(&plugins, &celery, built.clone(), &Default::default()).unwrap();
    assert_eq!(
        shaped.kept_pools,
        ["panic"],
        "custom is not loaded yet: nothing to fall back on"
    );
    install(&plugins, "custom", builtin::HPA);
    let good = shape::shape(&plugins, &celery, built.clone(), &Default::default()).unwrap();
    assert!(good.problems.is_empty());
    install(&plugins, "custom", &fixture("hostile"));
    // The controller keeps each pool's last good answer per resource and passes it back.
    let kept = shape::shape(&plugins, &celery, built, &good.autoscaler_answers).unwrap();
    assert_eq!(
        kept.children, good.children,
        "the last good HPA is applied again"
    );
    assert!(kept.kept_pools.is_empty());
    assert!(kept.problems[0].contains("the last good objects are applied"));
}

#[test]
fn shaper_failure_policies() {
    for (policy, check) in [
        (FailurePolicy::Fail, "fail"),
        (FailurePolicy::Builtin, "builtin"),
        (FailurePolicy::KeepLastGood, "keep"),
    ] {
        let (plugins, mut celery) = setup(with_policy(FailurePolicy::Fail, policy), "default");
        install(&plugins, "custom", builtin::HPA);
        install(&plugins, "hostile", &fixture("hostile"));
        with_shaper(&mut celery, "loop");
        let result = run_shape(&plugins, &celery);
        match check {
            "fail" => assert!(matches!(
                result,
                Err(ShapeError::Failed {
                    role: Role::Shaper,
                    ..
                })
            )),
            "builtin" => {
                let shaped = result.unwrap();
                assert!(!shaped.keep_what_runs);
                assert_eq!(
                    kinds(&shaped),
                    [ChildKind::Deployment, ChildKind::HorizontalPodAutoscaler]
                );
                assert!(
                    shaped.problems[0].contains("the built-in noop was used instead"),
                    "{:?}",
                    shaped.problems
                );
                let noop = shaped.uses.iter().find(|u| u.role == "shaper").unwrap();
                assert_eq!(
                    (noop.name.as_str(), noop.fallback.as_deref()),
                    ("noop", Some("hostile failed"))
                );
            }
            _ => {
                let shaped = result.unwrap();
                assert!(shaped.keep_what_runs, "keep-last-good applies nothing");
            }
        }
    }
}

#[test]
fn a_shaper_rejection_applies_nothing_whatever_the_policy() {
    for policy in [
        FailurePolicy::Fail,
        FailurePolicy::Builtin,
        FailurePolicy::KeepLastGood,
    ] {
        let (plugins, mut celery) = setup(with_policy(FailurePolicy::Fail, policy), "default");
        install(&plugins, "custom", builtin::HPA);
        install(&plugins, "hostile", &fixture("hostile"));
        // The hostile fixture answers an error result for a mode it does not know.
        with_shaper(&mut celery, "no-such-mode");
        let err = run_shape(&plugins, &celery).unwrap_err();
        assert!(
            matches!(&err, ShapeError::Rejected { plugin, message } if plugin == "hostile" && message.contains("unknown mode")),
            "{err}"
        );
    }
}

#[test]
fn shapers_cannot_add_objects_or_disown_them() {
    let (plugins, mut celery) = setup(PluginConfig::default(), "default");
    install(&plugins, "custom", builtin::HPA);
    install(&plugins, "hostile", &fixture("hostile"));
    with_shaper(&mut celery, "ok");
    let built = celery_operator::desired::desired_children(&celery);
    let shaped = shape::shape(&plugins, &celery, built, &Default::default()).unwrap();
    for child in &shaped.children {
        assert_eq!(
            child.object["metadata"]["ownerReferences"][0]["uid"], "uid-1",
            "{}",
            child.name
        );
        assert_eq!(child.object["metadata"]["namespace"], "shop");
    }
    assert_eq!(
        shaped
            .uses
            .iter()
            .map(|u| u.role.as_str())
            .collect::<Vec<_>>(),
        ["autoscaler", "shaper"]
    );
}

fn configmap(name: &str, bytes: &[u8]) -> ConfigMap {
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some(format!("{name}-plugin"));
    cm.metadata.namespace = Some("ops".into());
    cm.metadata.labels = Some([(PLUGIN_LABEL.to_string(), name.to_string())].into());
    cm.binary_data = Some([(WASM_KEY.to_string(), ByteString(bytes.to_vec()))].into());
    cm
}

#[test]
fn configmap_swap_replaces_good_builds_and_refuses_broken_ones() {
    let registry = Arc::new(Registry::with_builtins(Arc::new(runtime())).unwrap());
    // Components in ConfigMaps: no registry and no API server is reached.
    let tokio = tokio::runtime::Runtime::new().unwrap();
    let client = tokio.block_on(async {
        kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap()
    });
    let load = |cm: &ConfigMap| {
        tokio.block_on(configmap::load(
            &registry,
            &Registries::default(),
            &client,
            cm,
        ))
    };
    let wanted = PluginId::named("hpa");
    let builtin_digest = registry
        .resolve(Role::Autoscaler, &wanted)
        .unwrap()
        .plugin
        .digest
        .clone();

    // A new good build (here: the keda plugin under the name hpa) replaces the built-in.
    let good = configmap("hpa", builtin::KEDA);
    let Loaded::Swapped { digest, .. } = load(&good) else {
        panic!("not swapped")
    };
    let running = || {
        registry
            .resolve(Role::Autoscaler, &wanted)
            .unwrap()
            .plugin
            .digest
            .clone()
    };
    assert_eq!(running(), digest);
    assert_eq!(load(&good), Loaded::Unchanged);

    // A broken build, or one of another WIT version, or of another role, is refused and
    // the good one keeps running.
    for (bytes, why) in [
        (b"garbage".to_vec(), "not a WebAssembly component"),
        (fixture("future_version"), "celery:operator/scaler@0.9.0"),
        (builtin::NOOP.to_vec(), "implements"),
    ] {
        let Loaded::Refused { error, .. } = load(&configmap("hpa", &bytes)) else {
            panic!("a broken build was accepted")
        };
        assert!(error.contains(why), "{error}");
        assert_eq!(running(), digest);
        assert!(registry.rejection("hpa").is_some());
    }

    // Pins: the old build stays usable by digest while it is known.
    let pinned = PluginId {
        digest: Some(builtin_digest.clone()),
        ..PluginId::named("hpa")
    };
    assert_eq!(
        registry
            .resolve(Role::Autoscaler, &pinned)
            .unwrap()
            .plugin
            .digest,
        builtin_digest
    );
    let unknown = PluginId {
        digest: Some(format!("sha256:{}", "0".repeat(64))),
        ..PluginId::named("hpa")
    };
    assert!(
        registry
            .resolve(Role::Autoscaler, &unknown)
            .unwrap_err()
            .to_string()
            .contains("not loaded")
    );

    // Deleting the ConfigMap brings the built-in back.
    registry.remove("hpa", "ops/hpa-plugin");
    assert_eq!(
        registry
            .resolve(Role::Autoscaler, &wanted)
            .unwrap()
            .plugin
            .digest,
        builtin_digest
    );
}

// ---- The sandbox against attacks (issue: a hostile plugin never takes the operator down).

/// Resident memory of this process (VmRSS), in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib << 10
}

/// Runs `call` on a thread of its own and fails the test if it does not return within
/// `limit` (a call that blocks forever must fail the test, not hang it).
fn returns_within<T: Send + 'static>(
    limit: Duration,
    call: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(call());
    });
    rx.recv_timeout(limit)
        .expect("the plugin call returned (a blocked call never does)")
}

/// Calls `hostile` in every role with `mode`; returns each role's result (as text).
fn every_role(
    rt: &Runtime,
    plugin: &celery_operator::plugin::Plugin,
    mode: &str,
) -> Vec<(Role, Result<String, PluginError>)> {
    let shape = ShapeInput {
        celery: "{}".into(),
        objects: vec![],
        settings: json!({"mode": mode}).to_string(),
    };
    vec![
        (
            Role::Scaler,
            rt.decide(plugin, &scaling_input(mode, 1, 1, 0))
                .map(|d| d.reason),
        ),
        (
            Role::Autoscaler,
            rt.autoscaler_objects(plugin, &pool_input(mode, json!({}), "redis"))
                .map(|o| o.join("\n")),
        ),
        (Role::Shaper, rt.shape(plugin, &shape).map(|o| o.join("\n"))),
    ]
}

/// Sleeping (a clock pollable, `poll`) returns at once: no host function a plugin can
/// reach waits, so no call can outlive its deadline or hold a thread.
#[test]
fn blocking_host_calls_return_at_once() {
    let rt = Arc::new(runtime());
    let hostile = rt.load(&fixture("hostile")).unwrap();
    for mode in ["sleep", "sleep-forever"] {
        let (rt, hostile) = (rt.clone(), hostile.clone());
        let start = Instant::now();
        let results = returns_within(Duration::from_secs(30), move || {
            every_role(&rt, &hostile, mode)
        });
        let took = start.elapsed();
        for (role, result) in results {
            assert!(result.is_ok(), "{role} {mode}: {result:?}");
        }
        // Three calls; a sleep of 2 s that really slept would take 6 s.
        assert!(
            took < Duration::from_secs(2),
            "{mode}: three calls took {took:?}"
        );
    }
}

#[test]
fn clocks_stand_still_and_randomness_is_the_same_on_every_call() {
    let rt = runtime();
    let hostile = rt.load(&fixture("hostile")).unwrap();
    let reason = |mode| {
        rt.decide(&hostile, &scaling_input(mode, 1, 1, 0))
            .unwrap()
            .reason
    };
    assert_eq!(reason("clock"), "wall=0 elapsed=0");
    let first = reason("random");
    assert!(first.starts_with("random="), "{first}");
    assert_eq!(
        reason("random"),
        first,
        "a pure plugin answers the same twice"
    );
}

/// One budget per call for every memory and table: sixteen memories of 64 MiB, or a table of
/// 2^27 elements, are refused at the budget, fast, and the process does not grow past it.
#[test]
fn one_memory_budget_for_every_memory_and_table() {
    let rt = runtime();
    // Created when instantiated: refused when loaded.
    let err = rt.load(&hostile::memories(16, 1024, true)).unwrap_err();
    assert!(
        matches!(&err, PluginError::Invalid(m) if m.contains("memory limit")),
        "{err}"
    );
    // Grown and written by the call.
    let grower = rt.load(&hostile::memories(16, 1024, false)).unwrap();
    let before = rss();
    let err = rt
        .decide(&grower, &scaling_input("x", 1, 1, 0))
        .unwrap_err();
    assert!(matches!(err, PluginError::MemoryExceeded(_)), "{err}");
    let grown = rss().saturating_sub(before);
    assert!(
        grown <= 2 * LIMITS.memory_bytes as u64,
        "the process grew by {} MiB under a {} MiB budget",
        grown >> 20,
        LIMITS.memory_bytes >> 20
    );
    // A table of 2^27 elements would be 1 GiB or more, and filling it ran past any deadline.
    let table = rt.load(&hostile::table_grow(1 << 27)).unwrap();
    let start = Instant::now();
    let err = rt.decide(&table, &scaling_input("x", 1, 1, 0)).unwrap_err();
    assert!(matches!(err, PluginError::MemoryExceeded(_)), "{err}");
    assert!(start.elapsed() < LIMITS.deadline, "{:?}", start.elapsed());
    // A small table stays within the budget.
    let small = rt.load(&hostile::table_grow(1000)).unwrap();
    assert_eq!(
        rt.decide(&small, &scaling_input("x", 1, 1, 0))
            .unwrap()
            .reason,
        "ok"
    );
}

/// Every call runs in a fresh instance, even with pooled memory kept resident between calls:
/// nothing a call leaves in its globals, initialised data or heap reaches the next one.
#[test]
fn no_call_sees_what_an_earlier_one_left() {
    let rt = runtime();
    let hostile = rt.load(&fixture("hostile")).unwrap();
    for _ in 0..50 {
        let decided = rt
            .decide(&hostile, &scaling_input("state", 2, 0, 0))
            .unwrap();
        assert_eq!(decided.reason, "calls=1 data=fresh heap=fresh");
    }
}

/// More calls at once than the instance pool has slots for (8): the extra ones wait for a
/// slot and every call answers, in a fresh instance (the same answer every time).
#[test]
fn calls_beyond_the_pools_slots_wait_and_all_answer() {
    let rt = Arc::new(runtime());
    let plugin = rt.load(builtin::QUEUE_LENGTH).unwrap();
    let input = scaling_input("reports", 2, 30, 7);
    let expected = rt.decide(&plugin, &input).unwrap();
    let threads: Vec<_> = (0..24)
        .map(|_| {
            let (rt, plugin, input) = (rt.clone(), plugin.clone(), input.clone());
            std::thread::spawn(move || {
                (0..50)
                    .map(|_| rt.decide(&plugin, &input))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for thread in threads {
        for decided in thread.join().unwrap() {
            assert_eq!(decided.unwrap(), expected);
        }
    }
}

/// A component that is small to send but costly to compile is stopped at the compile bounds
/// in a child process: refused like any other refused build, this process untouched.
#[test]
fn compilation_is_bounded_in_time_and_memory() {
    let bomb = hostile::compile_bomb(hostile::BOMB_FUNCTIONS);
    println!("compile bomb: {} bytes", bomb.len());
    let rt = Runtime::new(
        LIMITS,
        Compiler::Sandboxed(Sandbox {
            program: env!("CARGO_BIN_EXE_celery-operator").into(),
            timeout: Duration::from_secs(3),
            memory_bytes: 256 << 20,
            cache: None,
        }),
    );
    let before = rss();
    let start = Instant::now();
    let err = rt.load(&bomb).unwrap_err();
    let took = start.elapsed();
    println!("compile bomb refused after {took:?}: {err}");
    assert!(
        matches!(&err, PluginError::Invalid(m)
            if m.contains("compiling took longer than 3s") || m.contains("compiling needed more than 256 MiB")),
        "{err}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(
        rss().saturating_sub(before) < 64 << 20,
        "the compilation ran in this process"
    );
    // The same sandbox compiles a good plugin.
    assert_eq!(
        rt.load(builtin::QUEUE_LENGTH).unwrap().roles,
        [Role::Scaler]
    );
}

/// A plugin's words are bounded in bytes and free of control characters wherever they go.
#[test]
fn plugin_messages_are_bounded_and_clean() {
    // Room for the long answers, so that they are cut rather than refused.
    let rt = Runtime::new(
        Limits {
            memory_bytes: 64 << 20,
            output_bytes: 8 << 20,
            ..LIMITS
        },
        compiler(),
    );
    let hostile = rt.load(&fixture("hostile")).unwrap();
    for (role, result) in every_role(&rt, &hostile, "huge-error") {
        let message = result.unwrap_err().to_string();
        assert!(message.len() <= 1024, "{role}: {} bytes", message.len());
    }
    let clean = |text: &str| {
        !text
            .chars()
            .any(|c| c.is_control() || ('\u{202A}'..='\u{202E}').contains(&c))
    };
    for (role, result) in every_role(&rt, &hostile, "control-chars") {
        let text = match result {
            Ok(reason) => reason,
            Err(e) => e.to_string(),
        };
        assert!(text.contains("redevil"), "{role}: {text:?}");
        assert!(clean(&text), "{role}: {text:?}");
    }
    let reason = rt
        .decide(&hostile, &scaling_input("long-reason", 1, 1, 0))
        .unwrap()
        .reason;
    assert!(reason.len() <= 512, "{} bytes", reason.len());
}

/// Exports are checked when a build is loaded, not at its first call; a refusal names what
/// is wrong in a few hundred bytes, whatever the component holds.
#[test]
fn exports_are_checked_when_loading() {
    let rt = runtime();
    let err = rt.load(&hostile::wrong_shape_type()).unwrap_err();
    assert!(
        matches!(&err, PluginError::Invalid(m) if m.contains("shaper") && m.contains("shape")),
        "{err}"
    );
    let mixed = rt.load(&hostile::mixed_versions()).unwrap();
    assert_eq!(mixed.roles, [Role::Scaler]);
    assert_eq!(mixed.wit_version, "0.1.0");
    assert_eq!(mixed.ignored, ["celery:operator/shaper@0.9.0"]);
    assert_eq!(
        rt.decide(&mixed, &scaling_input("x", 1, 1, 0))
            .unwrap()
            .reason,
        "ok"
    );
    let err = rt
        .load(&hostile::many_exports(20_000))
        .unwrap_err()
        .to_string();
    assert!(err.len() < 1024, "{} bytes: {err}", err.len());
    assert!(err.contains("and 19992 more"), "{err}");
    for interface in ["wasi:sockets/tcp@0.2.6", "wasi:filesystem/types@0.2.6"] {
        let err = rt
            .load(&hostile::importing(interface))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("does not provide") && err.contains(interface),
            "{err}"
        );
    }
    // In a registry, such a build never replaces a working one.
    let registry = Registry::with_builtins(Arc::new(runtime())).unwrap();
    let source = Source::ConfigMap("ops/noop".into());
    assert!(
        registry
            .install("noop", &hostile::wrong_shape_type(), source)
            .is_err()
    );
    assert_eq!(registry.current("noop").unwrap().1, Source::Builtin);
}

/// Malformed objects in a plugin's answer (labels that are a string, annotations a number,
/// label values that are not strings, a bad timestamp) are a clean failure of that plugin.
#[test]
fn malformed_objects_are_a_plugin_failure_not_a_crash() {
    for mode in [
        "bad-labels",
        "bad-annotations",
        "bad-label-values",
        "bad-timestamp",
    ] {
        let (plugins, celery) = setup(with_policy(FailurePolicy::Fail, FailurePolicy::Fail), mode);
        install(&plugins, "custom", &fixture("hostile"));
        let err = run_shape(&plugins, &celery).unwrap_err();
        assert!(
            matches!(
                &err,
                ShapeError::Failed {
                    error: PluginError::BadOutput(_),
                    ..
                }
            ),
            "autoscaler {mode}: {err}"
        );
        let (plugins, mut celery) =
            setup(with_policy(FailurePolicy::Fail, FailurePolicy::Fail), "ok");
        install(&plugins, "custom", &fixture("hostile"));
        install(&plugins, "hostile", &fixture("hostile"));
        with_shaper(&mut celery, mode);
        let err = run_shape(&plugins, &celery).unwrap_err();
        assert!(
            matches!(
                &err,
                ShapeError::Failed {
                    error: PluginError::BadOutput(_),
                    ..
                }
            ),
            "shaper {mode}: {err}"
        );
    }
}

/// An autoscaler plugin's objects may scale only the pool's Deployment, with only the
/// resource's broker Secret.
#[test]
fn autoscaler_objects_may_scale_only_their_own_pool() {
    for (mode, expected) in [
        ("other-target", "other-deployment"),
        (
            "other-secret",
            "may read only the resource's broker Secret broker",
        ),
    ] {
        let (plugins, celery) = setup(with_policy(FailurePolicy::Fail, FailurePolicy::Fail), mode);
        install(&plugins, "custom", &fixture("hostile"));
        let err = run_shape(&plugins, &celery).unwrap_err().to_string();
        assert!(err.contains(expected), "{mode}: {err}");
    }
}

/// Compiled builds live as long as the registry keeps them: replaced builds beyond the kept
/// ones and refused builds are dropped.
#[test]
fn compiled_builds_follow_the_registry() {
    let runtime = Arc::new(runtime());
    let registry = Registry::with_builtins(runtime.clone()).unwrap();
    let builtins = runtime.builds_in_memory();
    for i in 0..20 {
        let build = hostile::scaler("", &format!("(global $build i32 (i32.const {i}))"));
        let source = Source::ConfigMap("ops/custom".into());
        registry.install("custom", &build, source).unwrap();
        let refused = hostile::memories(16, 1024, true);
        let _ = registry.install("custom", &refused, Source::ConfigMap("ops/custom".into()));
    }
    let kept = runtime.builds_in_memory() - builtins;
    assert!(kept <= 8, "{kept} builds of one plugin are still in memory");
}

// ---- Conformance of the operator's scaler with the Kubernetes HPA (issue: scaling that
// matches Kubernetes and KEDA exactly).

mod hpa {
    //! The Kubernetes HPA's decision for an External metric with an AverageValue target and
    //! the default behaviour, transliterated from `pkg/controller/podautoscaler`
    //! (`GetExternalPerPodMetricReplicas`, `stabilizeRecommendationWithBehaviors`,
    //! `convertDesiredReplicasWithBehaviorRate` and the default `HPAScalingRules`), with Go's
    //! float64 and int32 arithmetic: the reference the scaler is checked against.

    /// A pool at one moment: replicas, bounds, target per replica, the backlog, recent
    /// recommendations (seconds ago, replicas) and scale events (seconds ago, from, to).
    #[derive(Debug, Clone)]
    pub struct State {
        pub current: u32,
        pub min: u32,
        pub max: u32,
        pub target: f64,
        pub ready: u64,
        pub reserved: u64,
        pub history: Vec<(u64, u32)>,
        pub events: Vec<(u64, u32, u32)>,
    }

    /// A quantity's MilliValue (rounded up), as the HPA reads the target.
    fn milli(target: f64) -> i64 {
        let m = target * 1000.0;
        let near = m.round();
        let v = if (m - near).abs() <= near.abs() * 1e-12 {
            near
        } else {
            m.ceil()
        };
        (v as i64).max(1)
    }

    pub fn replicas(s: &State) -> u32 {
        if s.current == 0 {
            return 0; // the HPA does not scale a target at zero replicas
        }
        // Out of bounds: straight back within them, without metrics or limits.
        if s.current > s.max {
            return s.max;
        }
        if s.current < s.min {
            return s.min;
        }
        let usage = ((s.ready + s.reserved) * 1000) as i64;
        let target = milli(s.target);
        let ratio = usage as f64 / (target as f64 * f64::from(s.current));
        let raw = if (1.0 - ratio).abs() > 0.1 {
            ((usage as f64) / (target as f64)).ceil() as i64
        } else {
            i64::from(s.current)
        };
        // Stabilization: up window 0 s, down window 300 s; a first sight records the current
        // replicas.
        let seeded = [(0, s.current)];
        let recs: &[(u64, u32)] = if s.history.is_empty() {
            &seeded
        } else {
            &s.history
        };
        let down = recs
            .iter()
            .filter(|(ago, _)| *ago < 300)
            .fold(raw, |m, (_, r)| m.max(i64::from(*r)));
        let up = raw;
        let mut desired = i64::from(s.current).max(up).min(down);
        let changed = |period: u64, up: bool| -> i64 {
            s.events
                .iter()
                .filter(|(ago, f, t)| *ago < period && (t > f) == up && t != f)
                .map(|(_, f, t)| (i64::from(*t) - i64::from(*f)).abs())
                .sum()
        };
        let start = i64::from(s.current) - changed(15, true) + changed(15, false);
        let current = i64::from(s.current);
        if desired > current {
            let limit = ((start as f64 * 2.0).ceil() as i64)
                .max(start + 4)
                .max(current);
            desired = desired.min(limit.min(i64::from(s.max)));
        } else if desired < current {
            let limit = ((start as f64 * 0.0) as i64).min(current);
            desired = desired.max(limit.max(i64::from(s.min)));
        }
        desired as u32
    }
}

/// The operator's scaler (the built `queue-length` component, its default settings, and the
/// host's rate limits with `behavior: {}`, the HPA's defaults) on one state.
fn operator_scaler(s: &hpa::State, behavior: bool) -> u32 {
    use celery_operator::broker::QueueSample;
    use celery_operator::crd::{PoolScaling, ScaleEvent, TimedReplicas};
    use celery_operator::scaler::{PoolScaler, Verdict};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    const NOW: i64 = 1_795_428_000_000;
    let at = |ago: u64| Time(jiff::Timestamp::from_millisecond(NOW - ago as i64 * 1000).unwrap());
    thread_local! {
        static PLUGINS: Plugins = Plugins::new(
            Arc::new(Registry::with_builtins(Arc::new(Runtime::new(LIMITS, Compiler::InProcess))).unwrap()),
            PluginConfig::default(),
        );
    }
    let mut spec = json!({"minReplicas": s.min, "maxReplicas": s.max,
        "metrics": [{"name": "taskQueueLength", "target": {"type": "AverageValue", "averageValue": s.target.to_string()}}]});
    if behavior {
        spec["behavior"] = json!({});
    }
    let spec = serde_json::from_value(spec).unwrap();
    let previous = PoolScaling {
        pool: "p".into(),
        queued: None,
        reserved: None,
        current_replicas: 0,
        desired_replicas: 0,
        last_decision: String::new(),
        reason: String::new(),
        plugin: None,
        last_decision_time: at(0),
        last_scale_time: None,
        conditions: vec![],
        wait_seconds: None,
        oldest_wait_seconds: None,
        completion_rate: None,
        arrival_rate: None,
        service_seconds: None,
        busy_fraction: None,
        recommendations: s
            .history
            .iter()
            .map(|(ago, r)| TimedReplicas {
                time: at(*ago),
                replicas: *r as i32,
            })
            .collect(),
        scale_events: s
            .events
            .iter()
            .map(|(ago, f, t)| ScaleEvent {
                time: at(*ago),
                from: *f as i32,
                to: *t as i32,
            })
            .collect(),
    };
    let mut scaler = PoolScaler::default();
    scaler.resume(Some(&previous), s.current, NOW as u64);
    let probe = Ok(vec![QueueSample {
        name: "q".into(),
        ready: s.ready,
        reserved: s.reserved,
        by_priority: vec![],
        oldest_wait_ms: None,
    }]);
    PLUGINS.with(
        |plugins| match scaler.tick(plugins, "p", &spec, probe, s.current, NOW as u64) {
            Verdict::Scale { to, .. } => to,
            Verdict::Keep { replicas, .. } => replicas,
            v => panic!("{v:?}"),
        },
    )
}

/// 36 pool states with the replicas Kubernetes' HPA chooses (External metric, AverageValue
/// target, default behaviour); the operator's scaler chooses the same, except where it
/// differs on purpose (the last two rows).
#[test]
fn the_scaler_chooses_what_the_hpa_chooses() {
    /// Name, then the fields of `hpa::State` (history and events as in `State`), then the
    /// replicas the HPA chooses.
    type Row = (
        &'static str,
        u32,
        u32,
        u32,
        f64,
        u64,
        u64,
        &'static [(u64, u32)],
        &'static [(u64, u32, u32)],
        u32,
    );
    #[rustfmt::skip]
    let rows: &[Row] = &[
        // name, current, min, max, target, ready, reserved, history, events, HPA
        ("backlog over target, first sight (seeded, rate limited)", 2, 1, 20, 5.0, 30, 7, &[], &[], 6),
        ("within tolerance below", 4, 1, 20, 5.0, 19, 0, &[(400, 4)], &[], 4),
        ("tolerance border above: |1-1.1| > 0.1 in float", 4, 1, 20, 5.0, 22, 0, &[(400, 4)], &[], 5),
        ("tolerance border below: |1-0.9| < 0.1 in float", 4, 1, 20, 5.0, 18, 0, &[(400, 4)], &[], 4),
        ("just outside tolerance below", 4, 1, 20, 5.0, 17, 0, &[(400, 4)], &[], 4),
        ("scale down, settled", 4, 1, 20, 5.0, 10, 0, &[(400, 4)], &[], 2),
        ("scale down held by the window", 8, 0, 20, 5.0, 5, 0, &[(100, 8)], &[], 8),
        ("scale down partly held", 8, 0, 20, 5.0, 5, 0, &[(100, 4), (400, 8)], &[], 4),
        ("scale down after the window", 8, 0, 20, 5.0, 0, 0, &[(301, 8)], &[], 0),
        ("window edge: 299 s ago still counts", 8, 0, 20, 5.0, 0, 0, &[(299, 8)], &[], 8),
        ("zero backlog, min 0", 3, 0, 10, 5.0, 0, 0, &[(400, 3)], &[], 0),
        ("zero backlog, min 2", 3, 2, 10, 5.0, 0, 0, &[(400, 3)], &[], 2),
        ("reserved only keeps one", 3, 0, 10, 5.0, 0, 1, &[(400, 3)], &[], 1),
        ("restarted loop: seeded with current, scale-down held", 6, 0, 10, 5.0, 0, 0, &[], &[], 6),
        ("max clamp", 2, 1, 6, 5.0, 100, 0, &[(400, 2)], &[], 6),
        ("min clamp", 5, 3, 10, 5.0, 2, 0, &[(400, 5)], &[], 3),
        ("scale-up limit: 4 pods beat 100 %", 1, 1, 100, 5.0, 100, 0, &[(400, 1)], &[], 5),
        ("scale-up limit: 100 % beats 4 pods", 10, 1, 100, 5.0, 500, 0, &[(400, 10)], &[], 20),
        ("scale-up limit spent in the period", 5, 1, 100, 5.0, 500, 0, &[(400, 5)], &[(10, 1, 5)], 5),
        ("scale-up limit renewed after 15 s", 5, 1, 100, 5.0, 500, 0, &[(400, 5)], &[(16, 1, 5)], 10),
        ("fractional target 2.5", 1, 1, 100, 2.5, 10, 0, &[(400, 1)], &[], 4),
        ("fractional target 0.5, rate limited", 1, 1, 100, 0.5, 3, 0, &[(400, 1)], &[], 5),
        ("target 100m, exactly on target", 30, 1, 100, 0.1, 3, 0, &[(400, 30)], &[], 30),
        ("target 100m, 31 tasks on 30", 30, 1, 1000, 0.1, 31, 0, &[(400, 30)], &[], 60),
        ("1,000,000,001 tasks at 200,000", 4000, 1, 100_000, 200_000.0, 1_000_000_001, 0, &[(400, 4000)], &[], 5001),
        ("1,999,999,999 tasks at 1", 1_000_000_000, 1, i32::MAX as u32, 1.0, 1_999_999_999, 0, &[(400, 1_000_000_000)], &[], 1_999_999_999),
        ("ready and reserved together", 3, 1, 20, 5.0, 20, 10, &[(400, 3)], &[], 6),
        ("scale up not held by older low recommendations", 4, 1, 20, 5.0, 40, 0, &[(100, 2)], &[], 8),
        ("target 10", 2, 1, 20, 10.0, 55, 0, &[(400, 2)], &[], 6),
        ("replicas above max: straight to max", 12, 1, 8, 5.0, 100, 0, &[(400, 12)], &[], 8),
        ("replicas below min: straight to min, no rate limit", 1, 10, 20, 5.0, 0, 0, &[(400, 1)], &[], 10),
        ("scale down 10 -> 1 at once (100 % per 15 s)", 10, 1, 20, 5.0, 5, 0, &[(400, 10)], &[], 1),
        ("large target, small backlog", 3, 1, 20, 1000.0, 10, 0, &[(400, 3)], &[], 1),
        ("exact multiple", 4, 1, 20, 5.0, 40, 0, &[(400, 4)], &[], 8),
    ];
    assert!(rows.len() >= 30);
    for &(name, current, min, max, target, ready, reserved, history, events, expected) in rows {
        let state = hpa::State {
            current,
            min,
            max,
            target,
            ready,
            reserved,
            history: history.to_vec(),
            events: events.to_vec(),
        };
        assert_eq!(
            hpa::replicas(&state),
            expected,
            "the reference HPA model, {name}"
        );
        assert_eq!(operator_scaler(&state, true), expected, "{name}: {state:?}");
    }
    // Where it differs on purpose: it wakes a pool at zero (the HPA leaves it there), and
    // without `behavior` it does not rate-limit scaling up.
    let from_zero = hpa::State {
        current: 0,
        min: 0,
        max: 20,
        target: 5.0,
        ready: 12,
        reserved: 0,
        history: vec![],
        events: vec![],
    };
    assert_eq!(
        (hpa::replicas(&from_zero), operator_scaler(&from_zero, true)),
        (0, 3)
    );
    let burst = hpa::State {
        current: 1,
        min: 1,
        max: 100,
        target: 5.0,
        ready: 100,
        reserved: 0,
        history: vec![(400, 1)],
        events: vec![],
    };
    assert_eq!(
        (hpa::replicas(&burst), operator_scaler(&burst, false)),
        (5, 20)
    );
}

proptest::proptest! {
    // Failures are kept next to this file, in `main.proptest-regressions` (proptest's default
    // would put them in `../proptest-regressions/main.txt`, as this file is a `main.rs`).
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 200,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"),
        )),
        ..Default::default()
    })]

    /// On random states, the operator's scaler with `behavior: {}` agrees with the HPA.
    #[test]
    fn the_scaler_agrees_with_the_hpa_on_random_states(
        current in 1u32..200,
        min in 0u32..5,
        extra in 0u32..300,
        target in proptest::sample::select(vec![0.1, 0.5, 1.0, 2.5, 5.0, 7.0, 10.0, 100.0]),
        ready in 0u64..5000,
        reserved in 0u64..200,
        history in proptest::collection::vec((0u64..600, 0u32..300), 0..4),
        events in proptest::collection::vec((0u64..30, 0u32..300, 0u32..300), 0..3),
    ) {
        let state = hpa::State { current, min, max: min.max(1) + extra, target, ready, reserved, history, events };
        proptest::prop_assert_eq!(operator_scaler(&state, true), hpa::replicas(&state), "{:?}", state);
    }
}

/// Every kind of ScaledObject and TriggerAuthentication the `keda` plugin emits is valid for
/// KEDA v2.20.2's own CRDs (structural schema and CEL rules, vendored in `tests/data`) and
/// uses only the metadata and authentication keys KEDA's scalers read
/// (`pkg/scalers/{redis,rabbitmq}_scaler.go`, `cpu_memory_scaler.go`).
#[test]
fn keda_objects_are_valid_for_kedas_crds() {
    let crd = |file: &str| -> Value {
        let path = format!(
            "{}/../tests/data/keda-v2.20.2/{file}",
            env!("CARGO_MANIFEST_DIR")
        );
        let crd: Value = serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
    };
    let schemas = [
        ("ScaledObject", crd("keda.sh_scaledobjects.yaml")),
        (
            "TriggerAuthentication",
            crd("keda.sh_triggerauthentications.yaml"),
        ),
    ];
    // The keys KEDA v2.20.2 reads, per scaler: trigger metadata, and TriggerAuthentication
    // parameters.
    let metadata_keys = |t: &str| -> &[&str] {
        match t {
            "redis" => &[
                "listName",
                "listLength",
                "activationListLength",
                "databaseIndex",
                "enableTLS",
                "unsafeSsl",
                "address",
                "host",
                "port",
            ],
            "rabbitmq" => &[
                "queueName",
                "mode",
                "value",
                "activationValue",
                "host",
                "protocol",
                "vhostName",
                "useRegex",
                "excludeUnacknowledged",
                "pageSize",
                "operation",
                "timeout",
                "unsafeSsl",
            ],
            "cpu" | "memory" => &["value", "containerName"],
            other => panic!("unexpected trigger {other}"),
        }
    };
    let auth_keys = |t: &str| -> &[&str] {
        match t {
            "redis" => &[
                "address", "host", "port", "username", "password", "tls", "ca", "cert", "key",
            ],
            "rabbitmq" => &[
                "host",
                "username",
                "password",
                "protocol",
                "vhostName",
                "tls",
                "ca",
                "cert",
                "key",
            ],
            other => panic!("unexpected trigger {other}"),
        }
    };
    let rt = runtime();
    let keda = rt.load(builtin::KEDA).unwrap();
    let celery = |broker: Value| {
        json!({"metadata": {"name": "shop", "namespace": "shop"}, "spec": {"broker": broker}})
            .to_string()
    };
    let queue =
        json!({"name": "taskQueueLength", "target": {"type": "AverageValue", "averageValue": "5"}});
    let cpu = json!({"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}});
    let memory =
        json!({"name": "memory", "target": {"type": "AverageValue", "averageValue": "512Mi"}});
    let redis = json!({"type": "redis", "secretRef": {"name": "broker", "key": "url"}});
    let cases = [
        (
            "redis, defaults",
            celery(redis.clone()),
            json!([queue]),
            vec!["reports"],
        ),
        (
            "redis, prefix, separator and steps",
            celery(
                json!({"type": "redis", "secretRef": {"name": "broker", "key": "url"},
            "redis": {"globalKeyprefix": "shop:", "sep": ":", "prioritySteps": [0, 4, 8]}}),
            ),
            json!([queue]),
            vec!["reports", "mail"],
        ),
        (
            "redis, one list",
            celery(
                json!({"type": "redis", "secretRef": {"name": "broker", "key": "url"}, "redis": {"prioritySteps": [0]}}),
            ),
            json!([queue]),
            vec!["reports"],
        ),
        (
            "rabbitmq, management URL in a Secret",
            celery(json!({"type": "rabbitmq", "secretRef": {"name": "broker", "key": "url"}})),
            json!([queue]),
            vec!["reports", "mail"],
        ),
        (
            "rabbitmq, management URL in the resource",
            celery(
                json!({"type": "rabbitmq", "secretRef": {"name": "broker", "key": "url"},
            "rabbitmq": {"managementUrl": "http://rabbitmq:15672"}}),
            ),
            json!([queue]),
            vec!["reports"],
        ),
        (
            "cpu and memory with a queue",
            celery(redis.clone()),
            json!([cpu, memory, queue]),
            vec!["reports"],
        ),
        (
            "cpu and memory only",
            celery(redis.clone()),
            json!([cpu, memory]),
            vec![],
        ),
    ];
    for (name, celery, metrics, queues) in cases {
        let autoscaling = json!({"minReplicas": 1, "maxReplicas": 10, "metrics": metrics,
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 60}}});
        let input = PoolInput {
            celery,
            pool: "reports".into(),
            deployment: "shop-worker-reports".into(),
            autoscaling: autoscaling.to_string(),
            queues: queues.iter().map(|q| q.to_string()).collect(),
            settings: "{}".into(),
        };
        let out = objects(
            rt.autoscaler_objects(&keda, &input)
                .unwrap_or_else(|e| panic!("{name}: {e}")),
        );
        let auth = out.iter().find(|o| o["kind"] == "TriggerAuthentication");
        for object in &out {
            let (_, schema) = schemas.iter().find(|(k, _)| object["kind"] == *k).unwrap();
            let mut checked = object.clone();
            memory_apiserver::schema::check(&mut checked, schema)
                .unwrap_or_else(|e| panic!("{name}: {e:?}"));
            assert_eq!(
                &checked, object,
                "{name}: KEDA's schema prunes fields the plugin set"
            );
            let compiled = kube::core::cel::compile_schema(schema);
            kube::core::cel::Validator::new()
                .validate_compiled(&compiled, object, None)
                .unwrap_or_else(|e| panic!("{name}: CEL rules of KEDA's CRD: {e:?}"));
        }
        let scaled = out.iter().find(|o| o["kind"] == "ScaledObject").unwrap();
        for trigger in scaled["spec"]["triggers"].as_array().unwrap() {
            let t = trigger["type"].as_str().unwrap();
            for key in trigger["metadata"].as_object().unwrap().keys() {
                assert!(
                    metadata_keys(t).contains(&key.as_str()),
                    "{name}: KEDA's {t} scaler does not read {key}"
                );
            }
            if t == "redis" || t == "rabbitmq" {
                let params: Vec<&str> = auth.unwrap()["spec"]["secretTargetRef"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r["parameter"].as_str().unwrap())
                    .collect();
                for p in &params {
                    assert!(
                        auth_keys(t).contains(p),
                        "{name}: KEDA's {t} scaler does not read {p}"
                    );
                }
                let required = if t == "redis" {
                    "listName"
                } else {
                    "queueName"
                };
                assert!(trigger["metadata"].get(required).is_some(), "{name}");
                if t == "rabbitmq" {
                    assert_eq!(
                        trigger["metadata"]["protocol"], "http",
                        "{name}: ready + unacked"
                    );
                    assert!(
                        trigger["metadata"].get("host").is_some() || params.contains(&"host"),
                        "{name}"
                    );
                }
            }
        }
        // More than one queue trigger: summed by a formula over every one of them.
        let queue_triggers: Vec<&Value> = scaled["spec"]["triggers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["type"] == "redis" || t["type"] == "rabbitmq")
            .collect();
        if queue_triggers.len() > 1 {
            let formula = scaled["spec"]["advanced"]["scalingModifiers"]["formula"]
                .as_str()
                .unwrap();
            let names: Vec<&str> = queue_triggers
                .iter()
                .map(|t| t["name"].as_str().unwrap())
                .collect();
            assert_eq!(formula, names.join(" + "), "{name}");
        }
        assert_eq!(
            scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"],
            60,
            "{name}"
        );
    }
}

#[test]
fn compiled_plugins_are_cached_on_disk_and_a_damaged_file_is_not_trusted() {
    let dir = support::tempdir::Dir::new("compile-cache");
    let compiler = |program: &str| {
        Compiler::Sandboxed(Sandbox {
            program: program.into(),
            timeout: Duration::from_secs(60),
            memory_bytes: 1 << 30,
            cache: Some(DiskCache {
                dir: dir.path().into(),
                max_bytes: 1 << 30,
            }),
        })
    };
    let engine = celery_operator::plugin::runtime::engine();
    let compiled = || {
        std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect::<Vec<_>>()
    };
    let real = env!("CARGO_BIN_EXE_celery-operator");
    let missing = "/nonexistent/celery-operator";

    compiler(real)
        .compile(engine, builtin::QUEUE_LENGTH)
        .unwrap();
    let files = compiled();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].to_str().unwrap().ends_with(".cwasm"));
    // A later start loads it without compiling: here no compiler could run.
    compiler(missing)
        .compile(engine, builtin::QUEUE_LENGTH)
        .unwrap();
    // Another component is not served from that file.
    let error = compiler(missing).compile(engine, builtin::HPA).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("cannot start the plugin compiler"),
        "{error}"
    );

    // A damaged file is not trusted: it is removed and the component compiled again.
    let mut data = std::fs::read(&files[0]).unwrap();
    let middle = data.len() / 2;
    data[middle] ^= 0xff;
    std::fs::write(&files[0], &data).unwrap();
    let error = compiler(missing)
        .compile(engine, builtin::QUEUE_LENGTH)
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("cannot start the plugin compiler"),
        "{error}"
    );
    assert!(compiled().is_empty(), "the damaged file is gone");
    compiler(real)
        .compile(engine, builtin::QUEUE_LENGTH)
        .unwrap();
    assert_eq!(compiled(), files);
}

/// A plugin reference may ask for more memory (or time, or output) than the defaults, up to
/// the runtime's maxima: a plugin that needs 48 MiB fails under the 32 MiB default, runs
/// when its reference asks for 64, and a reference asking for more than the maximum gets the
/// maximum.
#[test]
fn a_reference_raises_its_plugins_bounds_within_the_maxima() {
    let maxima = Limits {
        deadline: Duration::from_secs(2),
        memory_bytes: 64 << 20,
        output_bytes: 2 << 20,
    };
    let rt = runtime().with_maxima(maxima);
    let grower = rt.load(&hostile::memories(1, 768, false)).unwrap();
    let input = scaling_input("x", 1, 1, 0);
    let err = rt.decide(&grower, &input).unwrap_err();
    assert!(matches!(err, PluginError::MemoryExceeded(_)), "{err}");

    let asked = |memory_mib, timeout_ms| PluginLimits {
        memory_mib: Some(memory_mib),
        timeout_ms: Some(timeout_ms),
        output_kib: None,
    };
    let roomy = rt.limits_for(Some(&asked(64, 1500)));
    assert_eq!(roomy.memory_bytes, 64 << 20);
    assert_eq!(roomy.deadline, Duration::from_millis(1500));
    assert_eq!(
        roomy.output_bytes, LIMITS.output_bytes,
        "unset: the default"
    );
    assert_eq!(rt.with(roomy).decide(&grower, &input).unwrap().reason, "ok");

    let greedy = rt.limits_for(Some(&asked(4096, 60_000)));
    assert_eq!(greedy.memory_bytes, maxima.memory_bytes);
    assert_eq!(greedy.deadline, maxima.deadline);
    assert_eq!(rt.limits_for(None).memory_bytes, LIMITS.memory_bytes);
}

/// A plugin that crashes is not instantiated again until its backoff ends (1 s, doubling
/// with each crash in a row); other plugins are not held back, and an answer resets it.
#[test]
fn a_crashing_plugin_waits_out_a_backoff_before_it_runs_again() {
    let rt = runtime().with_crash_backoff();
    let hostile = rt.load(&fixture("hostile")).unwrap();
    let good = rt.load(builtin::QUEUE_LENGTH).unwrap();
    let err = rt
        .decide(&hostile, &scaling_input("panic", 1, 1, 0))
        .unwrap_err();
    assert!(matches!(err, PluginError::Trap { .. }), "{err}");
    // Even a call that would answer is not made during the backoff.
    let err = rt
        .decide(&hostile, &scaling_input("ok", 1, 1, 0))
        .unwrap_err();
    assert!(
        matches!(err, PluginError::Backoff { crashes: 1, .. }),
        "{err}"
    );
    assert!(
        rt.decide(&good, &scaling_input("reports", 2, 30, 7))
            .is_ok()
    );
    std::thread::sleep(Duration::from_millis(1100));
    let err = rt
        .decide(&hostile, &scaling_input("panic", 1, 1, 0))
        .unwrap_err();
    assert!(matches!(err, PluginError::Trap { .. }), "{err}");
    let PluginError::Backoff { crashes, retry_in } = rt
        .decide(&hostile, &scaling_input("ok", 1, 1, 0))
        .unwrap_err()
    else {
        panic!("not in backoff")
    };
    assert_eq!(crashes, 2);
    assert!(retry_in > Duration::from_secs(1), "doubled: {retry_in:?}");
    std::thread::sleep(retry_in + Duration::from_millis(100));
    assert!(rt.decide(&hostile, &scaling_input("ok", 1, 1, 0)).is_ok());
    // The answer reset the count: the next crash waits 1 s again.
    rt.decide(&hostile, &scaling_input("panic", 1, 1, 0))
        .unwrap_err();
    let PluginError::Backoff { crashes, .. } = rt
        .decide(&hostile, &scaling_input("ok", 1, 1, 0))
        .unwrap_err()
    else {
        panic!("not in backoff")
    };
    assert_eq!(crashes, 1);
}

/// The disk cache keeps to its budget: a new file pushes out the least recently used.
#[test]
fn the_compiled_plugin_cache_keeps_to_its_budget() {
    let dir = support::tempdir::Dir::new("compile-cache-budget");
    let engine = celery_operator::plugin::runtime::engine();
    let files = || {
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let with_budget = |max_bytes| {
        Compiler::Sandboxed(Sandbox {
            program: env!("CARGO_BIN_EXE_celery-operator").into(),
            timeout: Duration::from_secs(60),
            memory_bytes: 1 << 30,
            cache: Some(DiskCache {
                dir: dir.path().into(),
                max_bytes,
            }),
        })
    };
    with_budget(1 << 30).compile(engine, builtin::NOOP).unwrap();
    let noop = files();
    let noop_size = std::fs::metadata(dir.path().join(&noop[0])).unwrap().len();
    // Room for about one more file of that size: the queue-length one replaces it.
    let tight = with_budget(noop_size * 5 / 2);
    tight.compile(engine, builtin::QUEUE_LENGTH).unwrap();
    let after = files();
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(after, noop, "the older file went");
    // A file larger than the whole budget is not kept at all.
    let none = support::tempdir::Dir::new("compile-cache-none");
    let tiny = Compiler::Sandboxed(Sandbox {
        program: env!("CARGO_BIN_EXE_celery-operator").into(),
        timeout: Duration::from_secs(60),
        memory_bytes: 1 << 30,
        cache: Some(DiskCache {
            dir: none.path().into(),
            max_bytes: 1024,
        }),
    });
    tiny.compile(engine, builtin::NOOP).unwrap();
    assert_eq!(
        std::fs::read_dir(none.path())
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
}

/// A resource's plugin reference carries its limits to the call: the registry resolves the
/// reference with the bounds it asked for (within the maxima), and a built-in fallback runs
/// with the defaults.
#[test]
fn resolved_references_carry_their_limits() {
    let rt = runtime().with_maxima(Limits {
        deadline: Duration::from_secs(2),
        memory_bytes: 64 << 20,
        output_bytes: 2 << 20,
    });
    let registry = Registry::with_builtins(Arc::new(rt)).unwrap();
    let reference: celery_operator::crd::PluginRef = serde_json::from_value(json!({
        "name": "queue-length", "limits": {"memoryMiB": 48, "timeoutMs": 1500}
    }))
    .unwrap();
    let resolved = registry
        .resolve(Role::Scaler, &PluginId::from(&reference))
        .unwrap();
    assert_eq!(resolved.limits.memory_bytes, 48 << 20);
    assert_eq!(resolved.limits.deadline, Duration::from_millis(1500));
    assert_eq!(resolved.limits.output_bytes, LIMITS.output_bytes);
    assert_eq!(
        registry
            .builtin("queue-length")
            .unwrap()
            .limits
            .memory_bytes,
        LIMITS.memory_bytes
    );
}
