//! The `celery-operator` binary as a user runs it.

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
            "Deployment/shop-flower",
            "Service/shop-flower",
            "Ingress/shop-flower",
            "Deployment/shop-beat",
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
