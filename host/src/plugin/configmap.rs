//! Plugins shipped as ConfigMaps: the operator watches ConfigMaps labelled
//! `celeryproject.org/plugin=<name>` in its own namespace. The component is in `binaryData`,
//! under `plugin.wasm`, or gzip-compressed under `plugin.wasm.gz`. Changing the ConfigMap
//! swaps the plugin live; a build that does not compile or check is refused and the running
//! one stays; deleting the ConfigMap brings back the built-in of that name, if any.

use std::io::Read;
use std::sync::Arc;

use flate2::read::GzDecoder;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::events::EventType;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{info, warn};

use super::registry::Source;
use super::{Registry, Runtime};
use crate::events::Publisher;
use crate::metrics::{Metrics, PluginLoadLabels};

/// Label that marks a plugin ConfigMap; its value is the plugin's name.
pub const PLUGIN_LABEL: &str = "celeryproject.org/plugin";
/// `binaryData` key of an uncompressed component.
pub const WASM_KEY: &str = "plugin.wasm";
/// `binaryData` key of a gzip-compressed component.
pub const WASM_GZ_KEY: &str = "plugin.wasm.gz";
/// Largest component accepted after decompression.
pub const MAX_PLUGIN_BYTES: usize = 32 << 20;

/// The plugin name and component bytes a ConfigMap holds.
pub fn decode(cm: &ConfigMap) -> Result<(String, Vec<u8>), String> {
    let name = cm
        .labels()
        .get(PLUGIN_LABEL)
        .filter(|n| !n.is_empty())
        .cloned()
        .ok_or_else(|| format!("the {PLUGIN_LABEL} label must name the plugin"))?;
    let binary = cm.binary_data.as_ref();
    if let Some(bytes) = binary.and_then(|b| b.get(WASM_KEY)) {
        return Ok((name, bytes.0.clone()));
    }
    let compressed = binary
        .and_then(|b| b.get(WASM_GZ_KEY))
        .ok_or_else(|| format!("binaryData must hold {WASM_KEY} or {WASM_GZ_KEY}"))?;
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
    Ok((name, bytes))
}

/// What loading one ConfigMap did.
#[derive(Debug, PartialEq)]
pub enum Loaded {
    /// A new build is in use.
    Swapped { name: String, digest: String },
    /// The build in use already had these bytes.
    Unchanged,
    /// The ConfigMap holds no usable plugin; the running build (if any) stays.
    Refused { name: Option<String>, error: String },
}

/// Loads (compiles and checks) the plugin in a ConfigMap into the registry.
pub fn load(registry: &Registry, cm: &ConfigMap) -> Loaded {
    let source = source_of(cm);
    let (name, bytes) = match decode(cm) {
        Ok(decoded) => decoded,
        Err(error) => return Loaded::Refused { name: None, error },
    };
    let digest = Runtime::digest(&bytes);
    if registry.current(&name) == Some((digest.clone(), source.clone())) {
        return Loaded::Unchanged;
    }
    match registry.install(&name, &bytes, source) {
        Ok(_) => Loaded::Swapped { name, digest },
        Err(e) => Loaded::Refused {
            name: Some(name),
            error: e.to_string(),
        },
    }
}

fn source_of(cm: &ConfigMap) -> Source {
    Source::ConfigMap(format!(
        "{}/{}",
        cm.namespace().unwrap_or_default(),
        cm.name_any()
    ))
}

/// Watches plugin ConfigMaps in `namespace` until the stream ends, loading each change.
/// `changed` is called after every change of the plugins in use (so the resources are
/// reconciled again); `initialized` once the first listing is loaded.
pub async fn watch(
    client: Client,
    namespace: String,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    events: Publisher,
    changed: impl Fn(),
    initialized: impl FnOnce(),
) {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let config = crate::cache::watch_config().labels(PLUGIN_LABEL);
    let mut initialized = Some(initialized);
    let mut stream = watcher(api, config).default_backoff().boxed();
    loop {
        let event = match stream.try_next().await {
            Ok(Some(event)) => event,
            Ok(None) => return,
            Err(e) => {
                warn!(error = %crate::cache::causes(&e), "watching plugin ConfigMaps failed; retrying");
                continue;
            }
        };
        match event {
            watcher::Event::Apply(cm) | watcher::Event::InitApply(cm) => {
                let reg = registry.clone();
                let cm = Arc::new(cm);
                let loading = cm.clone();
                // Compiling takes tens of milliseconds: keep it off the async workers.
                let loaded = tokio::task::spawn_blocking(move || load(&reg, &loading))
                    .await
                    .unwrap_or_else(|e| Loaded::Refused {
                        name: None,
                        error: format!("internal error while loading: {e}"),
                    });
                report(&events, &metrics, &cm, &loaded).await;
                if loaded != Loaded::Unchanged {
                    changed();
                }
            }
            watcher::Event::Delete(cm) => {
                // The label names the plugin; no need to decode the component.
                if let Some(name) = cm.labels().get(PLUGIN_LABEL).cloned() {
                    info!(plugin = %name, configmap = %cm.name_any(), "plugin ConfigMap deleted");
                    registry.remove(&name, &source_of(&cm));
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

async fn report(events: &Publisher, metrics: &Metrics, cm: &ConfigMap, loaded: &Loaded) {
    let (result, event) = match loaded {
        Loaded::Unchanged => return,
        Loaded::Swapped { name, digest } => {
            info!(plugin = %name, %digest, configmap = %cm.name_any(), "plugin loaded");
            let note = format!("Plugin {name} {digest} is in use");
            ("loaded", (EventType::Normal, "PluginLoaded", note))
        }
        Loaded::Refused { name, error } => {
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
        assert_eq!(decode(&cm), Ok(("p".into(), b"\0asm".to_vec())));
        let mut gz = GzEncoder::new(Vec::new(), Compression::best());
        gz.write_all(b"\0asm-compressed").unwrap();
        let cm = configmap("q", WASM_GZ_KEY, gz.finish().unwrap());
        assert_eq!(decode(&cm), Ok(("q".into(), b"\0asm-compressed".to_vec())));
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
