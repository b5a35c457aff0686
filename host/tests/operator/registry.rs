//! Plugins pulled from a registry (a real `docker-registry` on 127.0.0.1) by the digest a
//! ConfigMap pins, with the cosign-compatible signatures the cluster requires; pushed and
//! signed with the CLI. On the real control plane, as the chart's ServiceAccount (the pull
//! secret is read with the chart's RBAC).

use std::path::Path;
use std::process::Command;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams};
use p256::ecdsa::SigningKey;
use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::support::cluster::{Cluster, LONG, Operator, wait};
use crate::support::{OciRegistry, plugin_path, tempdir};

/// Runs `celery-operator plugin ARGS`; its standard output.
fn plugin_cli(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_celery-operator"))
        .arg("plugin")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "plugin {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Pushes the fixture `fixture` as `repository:tag`; the ConfigMap the CLI prints.
fn push(registry: &OciRegistry, fixture: &str, tag: &str) -> Value {
    let reference = format!("oci://{}/plugins/hpa:{tag}", registry.host());
    let yaml = plugin_cli(&[
        "push",
        &plugin_path(fixture),
        &reference,
        "--name",
        "hpa",
        "--insecure-registry",
        &registry.host(),
    ]);
    serde_saphyr::from_str(&yaml).unwrap()
}

fn sign(registry: &OciRegistry, configmap: &Value, key: &Path) {
    let signed = plugin_cli(&[
        "sign",
        configmap["data"]["oci"].as_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--insecure-registry",
        &registry.host(),
    ]);
    assert!(signed.starts_with("signed sha256:"), "{signed}");
}

/// A P-256 key pair written as the CLI and the operator read them; the private key's path.
fn key_pair(dir: &Path, name: &str, seed: u8) -> (std::path::PathBuf, std::path::PathBuf) {
    let key = SigningKey::from_slice(&[seed; 32]).unwrap();
    let private = dir.join(format!("{name}.pem"));
    let public = dir.join(format!("{name}.pub"));
    std::fs::write(
        &private,
        key.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes(),
    )
    .unwrap();
    std::fs::write(
        &public,
        key.verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap(),
    )
    .unwrap();
    (private, public)
}

/// The autoscaler plugin use in the resource's status: (digest, source).
async fn autoscaler_use(cluster: &Cluster) -> Option<(String, String)> {
    let c = cluster.celeries().get("shop").await.ok()?;
    let uses = c.data["status"]["plugins"].as_array()?;
    let u = uses.iter().find(|u| u["role"] == "autoscaler")?;
    Some((
        u["digest"].as_str()?.to_string(),
        u["source"].as_str()?.to_string(),
    ))
}

/// Waits until the resource reports the refusal of a new hpa build, saying `why`.
async fn refused(cluster: &Cluster, op: &Operator, why: &str) {
    let condition = wait(LONG, why, op, || async {
        let c = cluster.condition("shop", "PluginsHealthy").await?;
        (c["status"] == "False" && c["message"].as_str()?.contains(why)).then_some(c)
    })
    .await;
    assert!(
        condition["message"].as_str().unwrap().contains("hpa"),
        "{condition}"
    );
}

#[tokio::test]
async fn signed_plugins_are_pulled_from_a_registry_on_the_real_control_plane() {
    let cluster = Cluster::real().await;
    let mut registry = OciRegistry::start();
    let keys = tempdir::Dir::new("keys");
    let (trusted, trusted_pub) = key_pair(keys.path(), "ops", 7);
    let (foreign, _) = key_pair(keys.path(), "someone", 9);

    // Pushed and signed with the CLI: a signed build, one signed by a key the cluster does
    // not trust, and an unsigned one.
    let signed = push(&registry, "keda", "signed");
    sign(&registry, &signed, &trusted);
    let foreign_signed = push(&registry, "hpa", "foreign");
    sign(&registry, &foreign_signed, &foreign);
    let unsigned = push(&registry, "noop_shaper", "unsigned");

    let configmaps: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), &cluster.operator_ns);
    let apply = |mut cm: Value| {
        let configmaps = configmaps.clone();
        cm["metadata"]["namespace"] = json!(cluster.operator_ns);
        cm["data"]["pullSecret"] = json!("registry-credentials");
        async move {
            configmaps
                .patch(
                    "celery-plugin-hpa",
                    &PatchParams::apply("test").force(),
                    &Patch::Apply(cm),
                )
                .await
                .unwrap();
        }
    };
    // A pull secret (the registry takes anyone; reading it checks the chart's RBAC).
    let docker_config = json!({"auths": {registry.host(): {"username": "ci", "password": "pw"}}});
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "registry-credentials", "namespace": cluster.operator_ns},
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": docker_config.to_string()}}))
    .unwrap();
    Api::<Secret>::namespaced(cluster.client.clone(), &cluster.operator_ns)
        .create(&Default::default(), &secret)
        .await
        .unwrap();

    let cache = tempdir::Dir::new("plugin-cache");
    let op = cluster.operator(
        "operator",
        &[
            "--trusted-key",
            trusted_pub.to_str().unwrap(),
            "--insecure-registry",
            &registry.host(),
            "--plugin-cache-dir",
            cache.path().to_str().unwrap(),
        ],
    );
    let mark = cluster.mark();
    let spec = r#"
app: tasks
image: img
broker: {secretRef: {name: broker, key: url}}
workers:
  - name: web
    queues: [web]
    autoscaling:
      minReplicas: 1
      maxReplicas: 5
      metrics: [{name: cpu, target: {type: Utilization, averageUtilization: 70}}]
"#;
    cluster.apply_celery(&cluster.celery("shop", spec)).await;
    wait(LONG, "the built-in hpa plugin is used", &op, || async {
        autoscaler_use(&cluster)
            .await
            .filter(|(_, s)| s == "builtin")
    })
    .await;

    // The signed build, pinned by digest: pulled, verified, used; status names the pinned
    // manifest and the key.
    apply(signed.clone()).await;
    let keda = format!(
        "sha256:{:x}",
        Sha256::digest(std::fs::read(plugin_path("keda")).unwrap())
    );
    let (digest, source) = wait(LONG, "the signed build is used", &op, || async {
        autoscaler_use(&cluster)
            .await
            .filter(|(_, s)| s.starts_with("oci://"))
    })
    .await;
    assert_eq!(digest, keda);
    let pinned = signed["data"]["oci"].as_str().unwrap();
    let manifest = pinned.split('@').nth(1).unwrap();
    assert_eq!(
        source,
        format!(
            "oci://{}/plugins/hpa@{manifest} signed by {}",
            registry.host(),
            trusted_pub.display()
        )
    );

    // Signed by someone else, not signed, or not from a registry at all: refused, with a
    // condition and an Event, and the signed build keeps running.
    apply(foreign_signed).await;
    refused(&cluster, &op, "signed, but not by a trusted key").await;
    apply(unsigned).await;
    refused(&cluster, &op, "is not signed").await;
    let embedded = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "celery-plugin-hpa", "labels": {"celeryproject.org/plugin": "hpa"}},
        "binaryData": {"plugin.wasm": k8s_openapi::ByteString(std::fs::read(plugin_path("hpa")).unwrap())}});
    apply(embedded).await;
    refused(&cluster, &op, "runs only signed plugins").await;
    assert_eq!(autoscaler_use(&cluster).await.unwrap().0, keda);
    let events = Api::<Event>::namespaced(cluster.client.clone(), &cluster.operator_ns)
        .list(&ListParams::default())
        .await
        .unwrap();
    let notes: Vec<String> = events
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("PluginRefused"))
        .filter_map(|e| e.note)
        .collect();
    assert!(
        notes.iter().any(|n| n.contains("not by a trusted key")),
        "{notes:?}"
    );

    // The registry goes down while a new reference is applied: the running build stays, and
    // the pull is retried until the registry is back.
    registry.stop();
    let mut by_tag = signed.clone();
    by_tag["data"]["oci"] = json!(format!("oci://{}/plugins/hpa:signed", registry.host()));
    apply(by_tag).await;
    refused(&cluster, &op, "cannot pull").await;
    assert_eq!(autoscaler_use(&cluster).await.unwrap().0, keda);
    registry.resume();
    wait(LONG, "the pull is retried and succeeds", &op, || async {
        let c = cluster.condition("shop", "PluginsHealthy").await?;
        (c["status"] == "True").then_some(())
    })
    .await;
    assert_eq!(autoscaler_use(&cluster).await.unwrap().0, keda);

    // Compiled plugins were kept on disk for the next start.
    let cached = std::fs::read_dir(cache.path()).unwrap().count();
    assert!(cached >= 4, "{cached} compiled plugins in the cache");
    cluster.assert_rbac(mark, &op);
}
