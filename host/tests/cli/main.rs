//! The `celery-operator` binary as a user runs it, and the committed CRD against the types
//! (`crd_drift`).

#[path = "../support/mod.rs"]
mod support;

mod crd_drift;

use std::process::Command;

fn operator(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_celery-operator"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("the binary runs")
}

#[test]
fn render_prints_every_child_of_the_full_example() {
    let out = operator(&["render", "-f", "examples/full.yaml"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).unwrap();
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&yaml).unwrap();
    let kinds: Vec<_> = docs
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap(),
                d["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "Deployment/shop-worker-default",
            "PodDisruptionBudget/shop-worker-default",
            "Deployment/shop-worker-reports",
            "PodDisruptionBudget/shop-worker-reports",
            "Deployment/shop-worker-images",
            "Deployment/shop-flower",
            "Service/shop-flower",
            "Ingress/shop-flower",
            "Deployment/shop-beat",
            "HorizontalPodAutoscaler/shop-worker-images",
        ]
    );
    assert!(!yaml.contains("PASSWORD") && !yaml.contains("redis://"));
}

#[test]
fn render_of_an_invalid_spec_names_the_rule_and_fails() {
    let dir = std::env::temp_dir().join(format!("celery-operator-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.yaml");
    let full = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/full.yaml"
    ))
    .unwrap();
    std::fs::write(&file, full.replace("maxReplicas: 20", "maxReplicas: 0")).unwrap();
    let out = operator(&["render", "-f", file.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("minReplicas must be less than or equal to maxReplicas"),
        "{err}"
    );
    assert!(
        out.stdout.is_empty(),
        "nothing is printed for an invalid resource"
    );
}

#[test]
fn crd_command_prints_the_committed_crd() {
    let out = operator(&["crd"]);
    assert!(out.status.success());
    let committed = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../crds/celeries.celeryproject.org.yaml"
    ))
    .unwrap();
    assert!(
        out.stdout == committed,
        "`crd` differs from crds/ (see crd_drift.rs)"
    );
}

#[test]
fn run_without_a_cluster_fails_with_a_clear_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_celery-operator"))
        .args(["run", "--http-addr", "127.0.0.1:0"])
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env("HOME", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no Kubernetes configuration found"), "{err}");
}

#[test]
fn plugin_check_reports_world_version_size_and_digest() {
    let out = operator(&["plugin", "check", &support::plugin_path("business_hours")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("worlds:          scaler-plugin"), "{text}");
    assert!(
        text.contains("wit package:     celery:operator@0.2.0"),
        "{text}"
    );
    assert!(text.contains("digest:          sha256:"), "{text}");

    let out = operator(&["plugin", "check", &support::plugin_path("future_version")]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("celery:operator/scaler@0.9.0")
            && err.contains("serves celery:operator@0.1.0, 0.2.0"),
        "{err}"
    );
}

/// `plugin run` with a deadline that a loaded machine running a debug build cannot miss.
fn plugin_run(file: &str, world: &str, input: &str) -> std::process::Output {
    operator(&[
        "plugin",
        "run",
        file,
        "--world",
        world,
        "--plugin-timeout-ms",
        "2000",
        "--input",
        input,
    ])
}

/// Where the address space is limited too much for the instance pool (about 1 TiB), plugins
/// still compile and answer, each instance mapped on its own.
#[test]
fn plugins_run_without_the_instance_pool_where_address_space_is_limited() {
    let script = format!(
        "ulimit -v {}; exec {} plugin run {} --world scaler-plugin --input \
         examples/plugins/inputs/scaler.json",
        64 << 20, // KiB: 64 GiB, room for per-call instances, not for the pool
        env!("CARGO_BIN_EXE_celery-operator"),
        support::plugin_path("business_hours"),
    );
    let out = Command::new("bash")
        .args(["-c", &script])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decision: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(decision["replicas"].is_u64(), "{decision}");
}

#[test]
fn plugin_run_calls_each_world_on_the_example_inputs() {
    let out = plugin_run(
        &support::plugin_path("business_hours"),
        "scaler-plugin",
        "examples/plugins/inputs/scaler.json",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decision: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(decision["replicas"], 8, "{decision}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("call took"));

    let out = plugin_run(
        &support::plugin_path("hpa"),
        "autoscaler-plugin",
        "examples/plugins/inputs/autoscaler.json",
    );
    let objects: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(objects[0]["kind"], "HorizontalPodAutoscaler");

    let out = plugin_run(
        &support::plugin_path("noop_shaper"),
        "shaper",
        "examples/plugins/inputs/shaper.json",
    );
    let objects: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(objects[0]["metadata"]["name"], "shop-worker-images");

    // A world the plugin does not implement, and an input that does not fit.
    let out = plugin_run(
        &support::plugin_path("hpa"),
        "scaler-plugin",
        "examples/plugins/inputs/scaler.json",
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not scaler"));
    let out = plugin_run(
        &support::plugin_path("hpa"),
        "autoscaler-plugin",
        "examples/plugins/inputs/scaler.json",
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not fit the autoscaler-plugin world")
    );
}

#[test]
fn plugin_pack_prints_a_configmap_the_operator_loads() {
    use std::io::Read;
    let file = support::plugin_path("business_hours");
    let out = operator(&[
        "plugin",
        "pack",
        &file,
        "--name",
        "business-hours",
        "--namespace",
        "ops",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cm: k8s_openapi::api::core::v1::ConfigMap =
        serde_saphyr::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(
        cm.metadata.labels.unwrap()["celeryproject.org/plugin"],
        "business-hours"
    );
    assert_eq!(cm.metadata.namespace.as_deref(), Some("ops"));
    let gz = &cm.binary_data.unwrap()["plugin.wasm.gz"].0;
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(gz.as_slice())
        .read_to_end(&mut bytes)
        .unwrap();
    assert_eq!(
        bytes,
        std::fs::read(&file).unwrap(),
        "the ConfigMap holds the exact component"
    );
    assert!(gz.len() < bytes.len());
}

/// The CLI compiles and runs untrusted components in the same sandbox as the operator: a
/// compile bomb is stopped at the compile bounds, a refusal is short whatever the component
/// holds, a sleeping plugin returns at once, and nothing a plugin says reaches the terminal
/// raw.
#[test]
fn plugin_check_and_run_are_bounded_on_hostile_components() {
    let dir = support::tempdir::Dir::new("cli-hostile");
    let write = |name: &str, bytes: Vec<u8>| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path.display().to_string()
    };
    let bomb = write(
        "bomb.wasm",
        support::hostile::compile_bomb(support::hostile::BOMB_FUNCTIONS),
    );
    let start = std::time::Instant::now();
    let out = operator(&[
        "plugin",
        "check",
        &bomb,
        "--plugin-compile-timeout-seconds",
        "3",
        "--plugin-compile-memory-mib",
        "256",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("compiling"), "{err}");
    assert!(start.elapsed() < std::time::Duration::from_secs(15));

    let many = write("many.wasm", support::hostile::many_exports(20_000));
    let out = operator(&["plugin", "check", &many]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stderr.len() < 1500, "{} bytes", out.stderr.len());

    let input = |pool: &str| {
        let text = serde_json::json!({"pool": pool, "nowMs": 1000, "currentReplicas": 2,
            "minReplicas": 0, "maxReplicas": 5, "targetPerReplica": 5.0,
            "samples": [{"atMs": 1000, "queues": [{"name": "q", "ready": 1, "reserved": 0}]}]});
        write(&format!("{pool}.json"), text.to_string().into_bytes())
    };
    let hostile = support::plugin_path("hostile");
    let start = std::time::Instant::now();
    let out = plugin_run(&hostile, "scaler-plugin", &input("sleep"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(start.elapsed() < std::time::Duration::from_secs(10));
    let out = plugin_run(&hostile, "scaler-plugin", &input("control-chars"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(printed.contains("redevil"), "{printed}");
    assert!(
        !printed.contains('\u{1b}') && !printed.contains("\\u001b"),
        "{printed}"
    );
}

/// The worked Python example (`examples/plugins/drain-time`), built with the Python SDK and
/// called like the operator calls it: its settings, its refusal of wrong ones.
#[test]
fn the_python_example_builds_and_decides() {
    let dir = support::tempdir::Dir::new("drain-time");
    let wasm = dir.path().join("drain_time.wasm");
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let built = Command::new("python3")
        .args([
            "-m",
            "celery_operator_plugin",
            "build",
            "app",
            "--world",
            "scaler",
        ])
        .arg("-o")
        .arg(&wasm)
        .env("PYTHONPATH", format!("{root}/plugins/python"))
        .current_dir(format!("{root}/examples/plugins/drain-time"))
        .status()
        .expect("python3 runs");
    assert!(built.success());
    let run = |input: &str| {
        operator(&[
            "plugin",
            "run",
            wasm.to_str().unwrap(),
            "--world",
            "scaler-plugin",
            "--input",
            input,
            "--plugin-timeout-ms",
            "2000",
            "--plugin-compile-timeout-seconds",
            "120",
            "--plugin-compile-memory-mib",
            "1024",
        ])
    };
    let out = run("examples/plugins/drain-time/input.json");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decision: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(decision["replicas"], 8, "{decision}");
    // With the figures the host measures (WIT 0.2.0): 3 tasks/s over 2 workers drain 15
    // tasks each in 10 s, so 37 tasks need 3.
    let out = run("examples/plugins/drain-time/input-measured.json");
    let decision: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(decision["replicas"], 3, "{decision}");
    assert!(
        decision["reason"].as_str().unwrap().contains("(measured)"),
        "{decision}"
    );
    // The business-hours settings are not this plugin's: refused, with the reason.
    let out = run("examples/plugins/inputs/scaler.json");
    assert!(!out.status.success());
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(error.contains("drain-time: unknown settings"), "{error}");
}

/// `plugin simulate` replays a trace through a plugin and the built-in queue-length, in the
/// operator's own scaler loop: the business-hours floor shows in the replicas and costs
/// replica-seconds; the plot is written.
#[test]
fn plugin_simulate_compares_a_scaler_with_queue_length_on_a_trace() {
    let dir = support::tempdir::Dir::new("simulate");
    let svg = dir.path().join("sim.svg");
    let out = operator(&[
        "plugin",
        "simulate",
        &support::plugin_path("business_hours"),
        "--trace",
        "examples/plugins/traces/burst.csv",
        "--settings",
        r#"{"minDuringBusinessHours": 3, "startHour": 0, "endHour": 24, "weekdaysOnly": false}"#,
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let header = text.lines().next().unwrap();
    assert!(
        header.contains("business_hours") && header.contains("queue-length"),
        "{text}"
    );
    // The floor of 3 holds where queue-length goes back to 1.
    let last = text
        .lines()
        .find(|l| l.trim_start().starts_with("800.0"))
        .unwrap();
    assert_eq!(
        last.split_whitespace().collect::<Vec<_>>(),
        ["800.0", "0", "3", "1"]
    );
    let spent = |name: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name}:")))
            .unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        words[words.len() - 2].parse().unwrap()
    };
    assert!(spent("business_hours") > spent("queue-length"), "{text}");
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));

    let bad = operator(&[
        "plugin",
        "simulate",
        &support::plugin_path("business_hours"),
        "--trace",
        "Cargo.toml",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("second"));
}
