//! Plugins pulled from a registry (a real `docker-registry` on 127.0.0.1) by the digest a
//! ConfigMap pins, with the cosign-compatible signatures the cluster requires; pushed and
//! signed with the CLI. On the real control plane, as the chart's ServiceAccount (the pull
//! secret is read with the chart's RBAC).

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams};
use p256::ecdsa::SigningKey;
use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::plugins::autoscaler_use;
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

/// The repository's root.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .into()
}

/// `plugin new NAME --world scaler --lang LANG` in `dir`, built; the component.
fn scaffold_and_build(dir: &Path, name: &str, lang: &str) -> PathBuf {
    let sdk = repo().join("plugins/sdk");
    plugin_cli(&[
        "new",
        name,
        "--world",
        "scaler",
        "--lang",
        lang,
        "--dir",
        dir.to_str().unwrap(),
        "--sdk-path",
        sdk.to_str().unwrap(),
    ]);
    let status = match lang {
        "python" => Command::new("python3")
            .args([
                "-m",
                "celery_operator_plugin",
                "build",
                "app",
                "--world",
                "scaler",
            ])
            .args(["-o", &format!("{name}.wasm")])
            .env("PYTHONPATH", repo().join("plugins/python"))
            .current_dir(dir)
            .status(),
        _ => {
            // The plugins' own target directory and lock file: the SDK's dependencies are
            // built already.
            std::fs::copy(repo().join("plugins/Cargo.lock"), dir.join("Cargo.lock")).unwrap();
            let binary = Path::new(env!("CARGO_BIN_EXE_celery-operator"));
            let target = binary
                .parent()
                .unwrap()
                .parent()
                .unwrap()
                .join("wasm-plugins");
            let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args(["build", "--release", "--target", "wasm32-wasip2"])
                .env("CARGO_TARGET_DIR", &target)
                .current_dir(dir)
                .status();
            let lib = name.replace('-', "_");
            let built = target.join(format!("wasm32-wasip2/release/{lib}.wasm"));
            let _ = std::fs::copy(built, dir.join(format!("{name}.wasm")));
            status
        }
    };
    assert!(status.unwrap().success(), "building the {lang} scaffold");
    dir.join(format!("{name}.wasm"))
}

/// The acceptance path of a plugin author: `plugin new` in Python and in Rust, built,
/// pushed, signed, pulled by digest by an operator that requires signatures, and deciding
/// the replicas of a pool on a real Redis backlog.
#[tokio::test]
async fn scaffolded_python_and_rust_scalers_scale_pools_from_a_registry_on_the_real_control_plane()
{
    let cluster = Cluster::real().await;
    let registry = OciRegistry::start();
    let work = tempdir::Dir::new("scaffolds");
    let (key, public) = key_pair(work.path(), "ops", 11);
    let mut digests = Vec::new();
    let configmaps: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), &cluster.operator_ns);
    for (name, lang) in [("py-scaler", "python"), ("rs-scaler", "rust")] {
        let wasm = scaffold_and_build(&work.path().join(name), name, lang);
        let bytes = std::fs::read(&wasm).unwrap();
        digests.push(format!("sha256:{:x}", Sha256::digest(&bytes)));
        let reference = format!("oci://{}/plugins/{name}:0.1.0", registry.host());
        let yaml = plugin_cli(&[
            "push",
            wasm.to_str().unwrap(),
            &reference,
            "--name",
            name,
            "--namespace",
            &cluster.operator_ns,
            "--insecure-registry",
            &registry.host(),
            "--plugin-compile-timeout-seconds",
            "120",
            "--plugin-compile-memory-mib",
            "1024",
        ]);
        let cm: Value = serde_saphyr::from_str(&yaml).unwrap();
        sign(&registry, &cm, &key);
        configmaps
            .create(&Default::default(), &serde_json::from_value(cm).unwrap())
            .await
            .unwrap();
    }

    let redis = crate::support::Redis::start();
    cluster.secret(&redis.url()).await;
    let op = cluster.operator(
        "operator",
        &[
            "--trusted-key",
            public.to_str().unwrap(),
            "--insecure-registry",
            &registry.host(),
            // A Python component is ~18 MB: seconds and ~400 MiB to compile in this debug
            // build; its calls take milliseconds.
            "--plugin-compile-timeout-seconds",
            "120",
            "--plugin-compile-memory-mib",
            "1024",
            "--plugin-timeout-ms",
            "2000",
        ],
    );
    let pool = |name: &str, scaler: &str| {
        format!(
            "  - name: {name}\n    queues: [{name}]\n    autoscaling:\n      minReplicas: 1\n      maxReplicas: 10\n      pollIntervalSeconds: 1\n      scaler: {{name: {scaler}}}\n      metrics: [{{name: taskQueueLength, target: {{type: AverageValue, averageValue: \"5\"}}}}]\n"
        )
    };
    let spec = format!(
        "app: tasks\nimage: img\nbroker: {{type: redis, secretRef: {{name: broker, key: url}}}}\nworkers:\n{}{}",
        pool("py", "py-scaler"),
        pool("rs", "rs-scaler")
    );
    cluster.apply_celery(&cluster.celery("shop", &spec)).await;
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for queue in ["py", "rs"] {
        let tasks: Vec<String> = (0..37).map(|i| format!("task-{i}")).collect();
        redis::cmd("RPUSH")
            .arg(queue)
            .arg(&tasks)
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }
    // 37 tasks at 5 per replica: each scaffold asks for 8, and says so in its own words.
    for ((pool, plugin), digest) in [("py", "py-scaler"), ("rs", "rs-scaler")]
        .into_iter()
        .zip(&digests)
    {
        let entry = wait(
            LONG,
            &format!("{plugin} scales pool {pool} to 8"),
            &op,
            || async {
                let c = cluster.celeries().get("shop").await.ok()?;
                let entries = c.data["status"]["scaling"].as_array()?.clone();
                entries
                    .into_iter()
                    .find(|e| e["pool"] == pool && e["desiredReplicas"] == 8)
            },
        )
        .await;
        assert_eq!(entry["plugin"], format!("{plugin} {digest}"), "{entry}");
        assert_eq!(entry["reason"], "37 tasks at 5 per replica", "{entry}");
        let replicas = cluster
            .deployments()
            .get(&format!("shop-worker-{pool}"))
            .await
            .unwrap()
            .spec
            .unwrap()
            .replicas;
        assert_eq!(replicas, Some(8));
    }
}
