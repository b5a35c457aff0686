//! Plugins named by ConfigMaps: the operator watches ConfigMaps labelled
//! `celeryproject.org/plugin=<name>` in its own namespace. The component is either in the
//! ConfigMap (`binaryData`, under `plugin.wasm`, or gzip-compressed under `plugin.wasm.gz`:
//! about 1 MiB at most) or in a registry (`data.oci: oci://registry/repository:tag@sha256:...`,
//! with `data.pullSecret` naming a `kubernetes.io/dockerconfigjson` Secret beside it; see
//! [`oci`](super::oci)). Changing the ConfigMap swaps the plugin live; a build that cannot be
//! pulled, is not signed as the cluster requires, or does not compile or check is refused and
//! the running one stays (a failed pull is retried); deleting the ConfigMap brings back the
//! built-in of that name, if any.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use flate2::read::GzDecoder;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::runtime::events::EventType;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use oci_client::secrets::RegistryAuth;
use tracing::{info, warn};

use super::oci::{self, Registries};
use super::registry::{Rejection, Source};
use super::{PluginError, Registry, Runtime};
use crate::events::Publisher;
use crate::metrics::{Metrics, PluginLoadLabels};

/// Label that marks a plugin ConfigMap; its value is the plugin's name.
pub const PLUGIN_LABEL: &str = "celeryproject.org/plugin";
/// `binaryData` key of an uncompressed component.
pub const WASM_KEY: &str = "plugin.wasm";
/// `binaryData` key of a gzip-compressed component.
pub const WASM_GZ_KEY: &str = "plugin.wasm.gz";
/// `data` key of the reference of a component in a registry.
pub const OCI_KEY: &str = "oci";
/// `data` key naming the pull secret of [`OCI_KEY`]'s registry.
pub const PULL_SECRET_KEY: &str = "pullSecret";
/// Largest component accepted after decompression.
pub const MAX_PLUGIN_BYTES: usize = 32 << 20;
/// How soon a failed pull is tried again.
const RETRY_PULL: Duration = Duration::from_secs(30);

/// Where a ConfigMap's component is.
#[derive(Debug, PartialEq)]
pub enum Content {
    /// In the ConfigMap.
    Component(Vec<u8>),
    /// In a registry.
    Oci {
        /// `oci://...`
        reference: String,
        /// Name of a dockerconfigjson Secret in the ConfigMap's namespace.
        pull_secret: Option<String>,
    },
}

/// The plugin name and where the component of a ConfigMap is.
pub fn decode(cm: &ConfigMap) -> Result<(String, Content), String> {
    let name = cm
        .labels()
        .get(PLUGIN_LABEL)
        .filter(|n| !n.is_empty())
        .cloned()
        .ok_or_else(|| format!("the {PLUGIN_LABEL} label must name the plugin"))?;
    let data = cm.data.as_ref();
    if let Some(reference) = data.and_then(|d| d.get(OCI_KEY)) {
        let pull_secret = data.and_then(|d| d.get(PULL_SECRET_KEY)).cloned();
        let reference = reference.trim().to_string();
        return Ok((
            name,
            Content::Oci {
                reference,
                pull_secret,
            },
        ));
    }
    let binary = cm.binary_data.as_ref();
    if let Some(bytes) = binary.and_then(|b| b.get(WASM_KEY)) {
        return Ok((name, Content::Component(bytes.0.clone())));
    }
    let compressed = binary.and_then(|b| b.get(WASM_GZ_KEY)).ok_or_else(|| {
        format!("binaryData must hold {WASM_KEY} or {WASM_GZ_KEY}, or data {OCI_KEY}")
    })?;
    let mut bytes = Vec::new();
    GzDecoder::new(compressed.0.as_slice())
        .take(MAX_PLUGIN_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{WASM_GZ_KEY} is not valid gzip: {e}"))?;
    if bytes.len() > MAX_PLUGIN_BYTES {
        return Err(format!(
            "the plugin is larger than {MAX_PLUGIN_BYTES} bytes uncompressed"
        ));
    }
    Ok((name, Content::Component(bytes)))
}

/// What loading one ConfigMap did.
#[derive(Debug, PartialEq)]
pub enum Loaded {
    /// A new build is in use.
    Swapped { name: String, digest: String },
    /// The build in use already had these bytes.
    Unchanged,
    /// The ConfigMap holds no usable plugin; the running build (if any) stays. `retry`: the
    /// registry may serve a usable build later (the pull, the pull secret or the signature
    /// failed), so the ConfigMap is loaded again after a while; a build that was pulled but
    /// does not compile or check is not pulled again until the ConfigMap changes.
    Refused {
        name: Option<String>,
        error: String,
        retry: bool,
    },
}

/// Loads (fetches when it is in a registry, compiles and checks) the plugin a ConfigMap
/// names into the registry. `client` reads pull secrets.
pub async fn load(
    registry: &Arc<Registry>,
    registries: &Registries,
    client: &Client,
    cm: &ConfigMap,
) -> Loaded {
    let configmap = configmap_name(cm);
    let (name, content) = match decode(cm) {
        Ok(decoded) => decoded,
        Err(error) => {
            return Loaded::Refused {
                name: None,
                error,
                retry: false,
            };
        }
    };
    let refuse = |digest: String, source: Source, error: String, retry: bool| {
        registry.refuse(
            &name,
            Rejection {
                digest,
                source,
                error: PluginError::Invalid(error.clone()),
            },
        );
        Loaded::Refused {
            name: Some(name.clone()),
            error,
            retry,
        }
    };
    let (bytes, source) = match content {
        Content::Component(bytes) if !registries.trusted_keys.is_empty() => {
            let error = "the cluster runs only signed plugins: push this one to a registry, \
                         sign it, and name it with data.oci"
                .to_string();
            let digest = Runtime::digest(&bytes);
            return refuse(digest, Source::ConfigMap(configmap), error, false);
        }
        Content::Component(bytes) => (bytes, Source::ConfigMap(configmap)),
        Content::Oci {
            reference,
            pull_secret,
        } => {
            let unpulled = Source::ConfigMap(configmap.clone());
            let reference = match oci::parse(&reference) {
                Ok(r) => r,
                Err(error) => return refuse(reference, unpulled, error, false),
            };
            // A pinned build in use is not pulled again (the watch lists ConfigMaps again
            // after every reconnection).
            if let (
                Some(pin),
                Some((
                    digest,
                    Source::Oci {
                        pinned,
                        configmap: c,
                        ..
                    },
                )),
            ) = (reference.digest(), registry.current(&name))
                && c == configmap
                && pinned == format!("{}/{}@{pin}", reference.registry(), reference.repository())
            {
                return unchanged(registry, name, digest);
            }
            let namespace = cm.namespace().unwrap_or_default();
            let auth = match pull_auth(client, &namespace, pull_secret.as_deref(), &reference).await
            {
                Ok(auth) => auth,
                Err(error) => return refuse(reference.to_string(), unpulled, error, true),
            };
            match registries.pull(&reference, &auth).await {
                Ok(pulled) => {
                    let pinned = format!(
                        "{}/{}@{}",
                        reference.registry(),
                        reference.repository(),
                        pulled.manifest_digest
                    );
                    let source = Source::Oci {
                        configmap,
                        pinned,
                        signed_by: pulled.signed_by,
                    };
                    (pulled.bytes, source)
                }
                Err(error) => return refuse(reference.to_string(), unpulled, error, true),
            }
        }
    };
    let digest = Runtime::digest(&bytes);
    if registry.current(&name) == Some((digest.clone(), source.clone())) {
        return unchanged(registry, name, digest);
    }
    // Compiling takes tens of milliseconds or more: keep it off the async workers.
    let installing = registry.clone();
    let plugin = name.clone();
    let installed =
        tokio::task::spawn_blocking(move || installing.install(&plugin, &bytes, source)).await;
    match installed {
        Ok(Ok(_)) => Loaded::Swapped { name, digest },
        Ok(Err(e)) => Loaded::Refused {
            name: Some(name),
            error: e.to_string(),
            retry: false,
        },
        Err(e) => Loaded::Refused {
            name: Some(name),
            error: format!("internal error while loading: {e}"),
            retry: false,
        },
    }
}

/// The ConfigMap names the build in use again: after a refused build, that refusal no
/// longer stands, and the change is reported.
fn unchanged(registry: &Registry, name: String, digest: String) -> Loaded {
    match registry.clear_rejection(&name) {
        true => Loaded::Swapped { name, digest },
        false => Loaded::Unchanged,
    }
}

/// The credentials of the pull secret `secret` for the reference's registry.
async fn pull_auth(
    client: &Client,
    namespace: &str,
    secret: Option<&str>,
    reference: &oci_client::Reference,
) -> Result<RegistryAuth, String> {
    let Some(secret) = secret else {
        return Ok(RegistryAuth::Anonymous);
    };
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let found = api
        .get(secret)
        .await
        .map_err(|e| format!("cannot read the pull secret {namespace}/{secret}: {e}"))?;
    let config = found
        .data
        .as_ref()
        .and_then(|d| d.get(".dockerconfigjson"))
        .ok_or_else(|| format!("the pull secret {namespace}/{secret} has no .dockerconfigjson"))?;
    oci::auth_from_docker_config(&config.0, reference.resolve_registry())
}

fn configmap_name(cm: &ConfigMap) -> String {
    format!("{}/{}", cm.namespace().unwrap_or_default(), cm.name_any())
}

/// Watches plugin ConfigMaps in `namespace` until the stream ends, loading each change.
/// `changed` is called after every change of the plugins in use (so the resources are
/// reconciled again); `initialized` once the first listing is loaded.
#[allow(clippy::too_many_arguments)]
pub async fn watch(
    client: Client,
    namespace: String,
    registry: Arc<Registry>,
    registries: Registries,
    metrics: Arc<Metrics>,
    events: Publisher,
    changed: impl Fn(),
    initialized: impl FnOnce(),
) {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let config = crate::cache::watch_config().labels(PLUGIN_LABEL);
    let mut initialized = Some(initialized);
    let mut stream = watcher(api, config).default_backoff().boxed();
    // ConfigMaps whose pull failed, loaded again every RETRY_PULL.
    let mut failed_pulls: BTreeMap<String, ConfigMap> = BTreeMap::new();
    loop {
        let retry = async {
            if failed_pulls.is_empty() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(RETRY_PULL).await;
        };
        let event = tokio::select! {
            next = stream.try_next() => match next {
                Ok(Some(event)) => event,
                Ok(None) => return,
                Err(e) => {
                    warn!(error = %crate::cache::causes(&e), "watching plugin ConfigMaps failed; retrying");
                    continue;
                }
            },
            () = retry => {
                for (_, cm) in std::mem::take(&mut failed_pulls) {
                    let loaded = load(&registry, &registries, &client, &cm).await;
                    settle(&mut failed_pulls, &cm, &loaded, &events, &metrics, &changed).await;
                }
                continue;
            }
        };
        match event {
            watcher::Event::Apply(cm) | watcher::Event::InitApply(cm) => {
                failed_pulls.remove(&configmap_name(&cm));
                let loaded = load(&registry, &registries, &client, &cm).await;
                settle(&mut failed_pulls, &cm, &loaded, &events, &metrics, &changed).await;
            }
            watcher::Event::Delete(cm) => {
                failed_pulls.remove(&configmap_name(&cm));
                // The label names the plugin; no need to decode the component.
                if let Some(name) = cm.labels().get(PLUGIN_LABEL).cloned() {
                    info!(plugin = %name, configmap = %cm.name_any(), "plugin ConfigMap deleted");
                    registry.remove(&name, &configmap_name(&cm));
                    changed();
                }
            }
            watcher::Event::Init => {}
            watcher::Event::InitDone => {
                if let Some(done) = initialized.take() {
                    done();
                }
            }
        }
    }
}

/// Reports a load, remembers a refusal worth retrying, and signals a change.
async fn settle(
    failed_pulls: &mut BTreeMap<String, ConfigMap>,
    cm: &ConfigMap,
    loaded: &Loaded,
    events: &Publisher,
    metrics: &Metrics,
    changed: &impl Fn(),
) {
    if let Loaded::Refused { retry: true, .. } = loaded {
        failed_pulls.insert(configmap_name(cm), cm.clone());
    }
    report(events, metrics, cm, loaded).await;
    if *loaded != Loaded::Unchanged {
        changed();
    }
}

async fn report(events: &Publisher, metrics: &Metrics, cm: &ConfigMap, loaded: &Loaded) {
    let (result, event) = match loaded {
        Loaded::Unchanged => return,
        Loaded::Swapped { name, digest } => {
            info!(plugin = %name, %digest, configmap = %cm.name_any(), "plugin loaded");
            let note = format!("Plugin {name} {digest} is in use");
            ("loaded", (EventType::Normal, "PluginLoaded", note))
        }
        Loaded::Refused { name, error, .. } => {
            warn!(plugin = ?name, configmap = %cm.name_any(), %error, "plugin refused");
            let note =
                format!("Plugin refused, the previous build (if any) keeps running: {error}");
            ("refused", (EventType::Warning, "PluginRefused", note))
        }
    };
    metrics
        .plugin_loads
        .get_or_create(&PluginLoadLabels { result })
        .inc();
    let (type_, reason, note) = event;
    events
        .about(&cm.object_ref(&()), type_, reason, "LoadPlugin", note)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::Compression;
    use flate2::write::GzEncoder;
    use k8s_openapi::ByteString;
    use std::collections::BTreeMap;
    use std::io::Write;

    pub(crate) fn configmap(name: &str, key: &str, bytes: Vec<u8>) -> ConfigMap {
        let mut cm = ConfigMap::default();
        cm.metadata.name = Some(format!("{name}-plugin"));
        cm.metadata.namespace = Some("ops".into());
        cm.metadata.labels = Some(BTreeMap::from([(PLUGIN_LABEL.into(), name.into())]));
        cm.binary_data = Some(BTreeMap::from([(key.into(), ByteString(bytes))]));
        cm
    }

    #[test]
    fn decodes_plain_and_gzipped_components() {
        let cm = configmap("p", WASM_KEY, b"\0asm".to_vec());
        assert_eq!(
            decode(&cm),
            Ok(("p".into(), Content::Component(b"\0asm".to_vec())))
        );
        let mut gz = GzEncoder::new(Vec::new(), Compression::best());
        gz.write_all(b"\0asm-compressed").unwrap();
        let cm = configmap("q", WASM_GZ_KEY, gz.finish().unwrap());
        assert_eq!(
            decode(&cm),
            Ok(("q".into(), Content::Component(b"\0asm-compressed".to_vec())))
        );
        let mut cm = configmap("r", "other", vec![]);
        cm.data = Some(BTreeMap::from([
            (OCI_KEY.into(), " oci://ghcr.io/acme/r:1 ".into()),
            (PULL_SECRET_KEY.into(), "ghcr".into()),
        ]));
        assert_eq!(
            decode(&cm),
            Ok((
                "r".into(),
                Content::Oci {
                    reference: "oci://ghcr.io/acme/r:1".into(),
                    pull_secret: Some("ghcr".into())
                }
            ))
        );
    }

    #[test]
    fn refuses_configmaps_without_a_component() {
        let cm = configmap("p", "other", vec![1]);
        assert!(
            decode(&cm)
                .unwrap_err()
                .contains("binaryData must hold plugin.wasm")
        );
        let cm = configmap("p", WASM_GZ_KEY, b"not gzip".to_vec());
        assert!(decode(&cm).unwrap_err().contains("not valid gzip"));
        let mut cm = configmap("p", WASM_KEY, vec![1]);
        cm.metadata.labels = None;
        assert!(
            decode(&cm)
                .unwrap_err()
                .contains("label must name the plugin")
        );
    }
}
