//! The plugins a cluster has, by name: the built-ins embedded in the binary, and those
//! loaded from ConfigMaps, which may replace a built-in of the same name. A new build of a
//! plugin replaces the running one only once it is compiled and checked; a broken one is
//! recorded and the working one stays.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use super::{Plugin, PluginError, Role, Runtime, builtin};

/// Builds of one plugin kept for digest pins (the newest last).
const KEPT_BUILDS: usize = 8;

/// A plugin by name, optionally pinned to one build by digest: what the registry resolves.
/// (The CRD's `crd::PluginRef` is what a resource writes: the same plus the plugin's
/// settings.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginId {
    /// Plugin name.
    pub name: String,
    /// `sha256:<hex>` to pin one build.
    pub digest: Option<String>,
    /// The bounds the reference asks for (within the runtime's maxima).
    pub limits: Option<crate::crd::PluginLimits>,
}

impl PluginId {
    /// The current build of the plugin `name`.
    pub fn named(name: impl Into<String>) -> Self {
        PluginId {
            name: name.into(),
            digest: None,
            limits: None,
        }
    }
}

impl From<&crate::crd::PluginRef> for PluginId {
    fn from(r: &crate::crd::PluginRef) -> Self {
        PluginId {
            name: r.name.clone(),
            digest: r.digest.clone(),
            limits: r.limits.clone(),
        }
    }
}

/// Where a plugin came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Embedded in the operator binary.
    Builtin,
    /// A ConfigMap, as `namespace/name`.
    ConfigMap(String),
    /// A registry, named by a ConfigMap.
    Oci {
        /// The ConfigMap, as `namespace/name`.
        configmap: String,
        /// What was pulled, pinned: `registry/repository@sha256:<manifest digest>`.
        pinned: String,
        /// The trusted key that signed it, when the cluster requires signatures.
        signed_by: Option<String>,
    },
}

impl Source {
    /// The ConfigMap that provided the plugin, as `namespace/name`.
    pub fn configmap(&self) -> Option<&str> {
        match self {
            Source::Builtin => None,
            Source::ConfigMap(name)
            | Source::Oci {
                configmap: name, ..
            } => Some(name),
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Builtin => f.write_str("builtin"),
            Source::ConfigMap(name) => write!(f, "configmap {name}"),
            Source::Oci {
                pinned, signed_by, ..
            } => {
                write!(f, "oci://{pinned}")?;
                match signed_by {
                    Some(key) => write!(f, " signed by {key}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// A plugin found by name.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// Its name.
    pub name: String,
    /// The compiled build.
    pub plugin: Arc<Plugin>,
    /// Where it came from.
    pub source: Source,
    /// The bounds of its calls.
    pub limits: super::Limits,
}

/// A build that was refused.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    /// Its digest.
    pub digest: String,
    /// Where it came from.
    pub source: Source,
    /// Why it was refused.
    pub error: PluginError,
}

#[derive(Default)]
struct Entry {
    /// The build in use.
    current: Option<(Arc<Plugin>, Source)>,
    /// Every good build seen, for pins; the newest last.
    builds: Vec<Arc<Plugin>>,
    /// The last refused build, until a good one replaces it.
    rejected: Option<Rejection>,
}

/// The named plugins.
pub struct Registry {
    runtime: Arc<Runtime>,
    builtins: BTreeMap<String, Arc<Plugin>>,
    entries: RwLock<BTreeMap<String, Entry>>,
}

impl Registry {
    /// A registry with the built-in plugins compiled and installed.
    pub fn with_builtins(runtime: Arc<Runtime>) -> Result<Self, PluginError> {
        // Compiled like any plugin, by the runtime's compiler: in the operator a child
        // process, which keeps the compiler's memory (tens of MiB at its peak) out of the
        // operator. In parallel: four child processes start faster than one after another.
        let loaded: Vec<Result<Arc<Plugin>, PluginError>> = std::thread::scope(|scope| {
            let loads: Vec<_> = builtin::ALL
                .iter()
                .map(|(_, bytes)| scope.spawn(|| runtime.load(bytes)))
                .collect();
            loads
                .into_iter()
                .map(|l| l.join().expect("loading a plugin does not panic"))
                .collect()
        });
        let mut builtins = BTreeMap::new();
        let mut entries = BTreeMap::new();
        for ((name, _), plugin) in builtin::ALL.iter().zip(loaded) {
            let plugin = plugin.map_err(|e| {
                PluginError::Invalid(format!("built-in plugin {name} does not load: {e}"))
            })?;
            builtins.insert(name.to_string(), plugin.clone());
            entries.insert(
                name.to_string(),
                Entry {
                    current: Some((plugin.clone(), Source::Builtin)),
                    builds: vec![plugin],
                    rejected: None,
                },
            );
        }
        Ok(Registry {
            runtime,
            builtins,
            entries: RwLock::new(entries),
        })
    }

    /// The sandbox that runs the plugins.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Compiles and checks a new build of `name`; it replaces the running one only if it is
    /// good and implements at least the roles of the one it replaces. A refused build is
    /// recorded (see [`Registry::rejection`]) and the running one stays.
    pub fn install(
        &self,
        name: &str,
        bytes: &[u8],
        source: Source,
    ) -> Result<Arc<Plugin>, PluginError> {
        let checked = self.runtime.load(bytes).and_then(|plugin| {
            let entries = self.entries.read().expect("registry lock");
            let current = entries.get(name).and_then(|e| e.current.as_ref());
            match current {
                Some((old, _)) if !old.roles.iter().all(|r| plugin.roles.contains(r)) => {
                    Err(PluginError::Invalid(format!(
                        "it implements {:?} but the plugin it would replace implements {:?}",
                        plugin.roles, old.roles
                    )))
                }
                _ => Ok(plugin),
            }
        });
        let mut entries = self.entries.write().expect("registry lock");
        let entry = entries.entry(name.to_string()).or_default();
        match checked {
            Ok(plugin) => {
                entry.current = Some((plugin.clone(), source));
                entry.builds.retain(|b| b.digest != plugin.digest);
                entry.builds.push(plugin.clone());
                if entry.builds.len() > KEPT_BUILDS {
                    entry.builds.remove(0);
                }
                entry.rejected = None;
                Ok(plugin)
            }
            Err(error) => {
                entry.rejected = Some(Rejection {
                    digest: Runtime::digest(bytes),
                    source,
                    error: error.clone(),
                });
                Err(error)
            }
        }
    }

    /// Records a build refused before it could be compiled (not pulled, not signed); the
    /// running one stays.
    pub fn refuse(&self, name: &str, rejection: Rejection) {
        let mut entries = self.entries.write().expect("registry lock");
        entries.entry(name.to_string()).or_default().rejected = Some(rejection);
    }

    /// Forgets the refusal of a build of `name`; whether there was one.
    pub fn clear_rejection(&self, name: &str) -> bool {
        let mut entries = self.entries.write().expect("registry lock");
        entries
            .get_mut(name)
            .is_some_and(|e| e.rejected.take().is_some())
    }

    /// Forgets the plugin the ConfigMap `configmap` (`namespace/name`) provided (it was
    /// deleted): a built-in of the same name takes over again.
    pub fn remove(&self, name: &str, configmap: &str) {
        let mut entries = self.entries.write().expect("registry lock");
        let Some(entry) = entries.get_mut(name) else {
            return;
        };
        if entry
            .current
            .as_ref()
            .is_some_and(|(_, s)| s.configmap() == Some(configmap))
        {
            entry.current = self
                .builtins
                .get(name)
                .map(|p| (p.clone(), Source::Builtin));
        }
        if entry
            .rejected
            .as_ref()
            .is_some_and(|r| r.source.configmap() == Some(configmap))
        {
            entry.rejected = None;
        }
        if entry.current.is_none() {
            entries.remove(name);
        }
    }

    /// The build to use for `wanted` in `role`.
    pub fn resolve(&self, role: Role, wanted: &PluginId) -> Result<Resolved, PluginError> {
        let entries = self.entries.read().expect("registry lock");
        let entry = entries
            .get(&wanted.name)
            .filter(|e| e.current.is_some())
            .ok_or_else(|| {
                PluginError::NotFound(format!(
                    "no plugin named {:?} is loaded (known: {})",
                    wanted.name,
                    entries.keys().cloned().collect::<Vec<_>>().join(", ")
                ))
            })?;
        let (current, source) = entry.current.clone().expect("filtered above");
        let plugin = match &wanted.digest {
            None => current,
            Some(digest) => entry
                .builds
                .iter()
                .find(|b| &b.digest == digest)
                .cloned()
                .ok_or_else(|| {
                    PluginError::NotFound(format!(
                        "plugin {:?} is pinned to {digest}, which is not loaded (running: {})",
                        wanted.name, current.digest
                    ))
                })?,
        };
        if !plugin.roles.contains(&role) {
            return Err(PluginError::WrongRole {
                role,
                roles: plugin.roles.clone(),
            });
        }
        Ok(Resolved {
            name: wanted.name.clone(),
            plugin,
            source,
            limits: self.runtime.limits_for(wanted.limits.as_ref()),
        })
    }

    /// The built-in plugin called `name`.
    pub fn builtin(&self, name: &str) -> Option<Resolved> {
        self.builtins.get(name).map(|p| Resolved {
            name: name.into(),
            plugin: p.clone(),
            source: Source::Builtin,
            limits: self.runtime.limits(),
        })
    }

    /// Digest and source of the build of `name` in use.
    pub fn current(&self, name: &str) -> Option<(String, Source)> {
        let entries = self.entries.read().expect("registry lock");
        let (plugin, source) = entries.get(name)?.current.as_ref()?;
        Some((plugin.digest.clone(), source.clone()))
    }

    /// The last refused build of `name`, while the running one is older than it.
    pub fn rejection(&self, name: &str) -> Option<Rejection> {
        let entries = self.entries.read().expect("registry lock");
        entries.get(name)?.rejected.clone()
    }
}
