//! The sandbox: one shared wasmtime [`Engine`], components compiled once and cached by the
//! sha256 of their bytes, and every call in a fresh [`Store`] with a wall-clock deadline
//! (epoch interruption), a memory cap and an output size cap.
//!
//! Plugins get WASI only so that components built with a language's standard library
//! instantiate at all: no environment, arguments, files, network or real clock (both clocks
//! read zero); standard output is discarded and standard error is kept (bounded) only to
//! explain a panic.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder, Trap};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxView, WasiView};

use super::bindings::{autoscaler, scaler, shaper};
use super::{PluginError, Role, WIT_PACKAGE, WIT_VERSIONS_SERVED};

/// How often the deadline clock ticks.
const TICK: Duration = Duration::from_millis(5);
/// Bytes of a plugin's standard error kept for error messages.
const STDERR_CAPACITY: usize = 4096;

/// The one engine of the process, with a thread that advances its epoch every [`TICK`].
static ENGINE: LazyLock<Engine> = LazyLock::new(|| {
    let mut config = Config::new();
    config.epoch_interruption(true);
    let engine = Engine::new(&config).expect("the wasmtime configuration is valid");
    let ticker = engine.clone();
    std::thread::Builder::new()
        .name("plugin-epoch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(TICK);
                ticker.increment_epoch();
            }
        })
        .expect("spawning the epoch thread");
    engine
});

/// The engine every plugin is compiled for (for benchmarks of compilation).
pub fn engine() -> &'static Engine {
    &ENGINE
}

/// Bounds on every plugin call.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Wall-clock time one call may take.
    pub deadline: Duration,
    /// Linear memory a plugin instance may grow to.
    pub memory_bytes: usize,
    /// Total bytes of the strings a call may return.
    pub output_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            deadline: Duration::from_millis(100),
            memory_bytes: 64 << 20,
            output_bytes: 4 << 20,
        }
    }
}

/// A compiled, checked plugin, ready to be instantiated for any of its roles.
pub struct Plugin {
    /// `sha256:<hex>` of the component's bytes.
    pub digest: String,
    /// Size of the component in bytes.
    pub size: usize,
    /// The WIT package version it speaks.
    pub wit_version: String,
    /// The roles it implements (one per exported interface).
    pub roles: Vec<Role>,
    shaper: Option<shaper::ShaperPluginPre<State>>,
    autoscaler: Option<autoscaler::AutoscalerPluginPre<State>>,
    scaler: Option<scaler::ScalerPluginPre<State>>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("digest", &self.digest)
            .field("size", &self.size)
            .field("wit_version", &self.wit_version)
            .field("roles", &self.roles)
            .finish()
    }
}

/// Per-call state of a store.
struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    stderr: MemoryOutputPipe,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// A clock stopped at the Unix epoch: plugins get the time only as an input.
struct Stopped;

impl HostWallClock for Stopped {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl HostMonotonicClock for Stopped {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// Compiled components by digest, for the whole process: compiling is the expensive step
/// and never happens twice for the same bytes.
static COMPILED: LazyLock<Mutex<HashMap<String, Component>>> = LazyLock::new(Mutex::default);

/// Loads, caches and calls plugins.
pub struct Runtime {
    linker: Linker<State>,
    limits: Limits,
    /// Checked, linked plugins by digest.
    cache: Mutex<HashMap<String, Arc<Plugin>>>,
}

impl Runtime {
    /// A runtime whose calls are bounded by `limits`.
    pub fn new(limits: Limits) -> Self {
        let mut linker = Linker::new(&ENGINE);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).expect("WASI links once");
        Runtime {
            linker,
            limits,
            cache: Mutex::default(),
        }
    }

    /// The digest of plugin bytes, as `sha256:<hex>`.
    pub fn digest(bytes: &[u8]) -> String {
        format!("sha256:{:x}", Sha256::digest(bytes))
    }

    /// Compiles and checks a component (or returns the cached one with the same digest).
    ///
    /// Slow for new bytes (tens of milliseconds): call it when a plugin is installed, never
    /// on the decision path.
    pub fn load(&self, bytes: &[u8]) -> Result<Arc<Plugin>, PluginError> {
        let digest = Self::digest(bytes);
        if let Some(p) = self.cache.lock().expect("cache lock").get(&digest) {
            return Ok(p.clone());
        }
        let compiled = COMPILED
            .lock()
            .expect("compiled lock")
            .get(&digest)
            .cloned();
        let component = match compiled {
            Some(c) => c,
            None => {
                let c = Component::new(&ENGINE, bytes).map_err(|e| {
                    PluginError::Invalid(format!("not a WebAssembly component: {e:#}"))
                })?;
                COMPILED
                    .lock()
                    .expect("compiled lock")
                    .insert(digest.clone(), c.clone());
                c
            }
        };
        let (roles, wit_version) = exported_roles(&component)?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| PluginError::Invalid(format!("cannot be linked: {e:#}")))?;
        let invalid = |e: wasmtime::Error| PluginError::Invalid(format!("{e:#}"));
        let has = |r| roles.contains(&r);
        let plugin = Arc::new(Plugin {
            digest: digest.clone(),
            size: bytes.len(),
            wit_version,
            shaper: has(Role::Shaper)
                .then(|| shaper::ShaperPluginPre::new(pre.clone()))
                .transpose()
                .map_err(invalid)?,
            autoscaler: has(Role::Autoscaler)
                .then(|| autoscaler::AutoscalerPluginPre::new(pre.clone()))
                .transpose()
                .map_err(invalid)?,
            scaler: has(Role::Scaler)
                .then(|| scaler::ScalerPluginPre::new(pre))
                .transpose()
                .map_err(invalid)?,
            roles,
        });
        self.cache
            .lock()
            .expect("cache lock")
            .insert(digest, plugin.clone());
        Ok(plugin)
    }

    /// Runs `call` in a fresh store under the limits, turning traps into clear errors.
    fn call<R>(
        &self,
        call: impl FnOnce(&mut Store<State>) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        let stderr = MemoryOutputPipe::new(STDERR_CAPACITY);
        let wasi = WasiCtx::builder()
            .stderr(stderr.clone())
            .wall_clock(Stopped)
            .monotonic_clock(Stopped)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.limits.memory_bytes)
            .trap_on_grow_failure(true)
            .build();
        let mut store = Store::new(
            &ENGINE,
            State {
                wasi,
                table: ResourceTable::new(),
                limits,
                stderr,
            },
        );
        store.limiter(|s| &mut s.limits);
        let ticks = (self.limits.deadline.as_millis() / TICK.as_millis()).max(1) as u64;
        store.set_epoch_deadline(ticks);
        store.epoch_deadline_trap();
        call(&mut store).map_err(|e| self.classify(e, &store.data().stderr))
    }

    fn classify(&self, error: wasmtime::Error, stderr: &MemoryOutputPipe) -> PluginError {
        let stderr = String::from_utf8_lossy(&stderr.contents())
            .lines()
            .filter(|l| !l.starts_with("note: run with `RUST_BACKTRACE"))
            .collect::<Vec<_>>()
            .join(" ")
            .trim()
            .to_string();
        match error.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => PluginError::Timeout(self.limits.deadline),
            // What the store limiter says when it refuses to grow memory.
            _ if format!("{error:#}").contains("forcing trap when growing memory") => {
                PluginError::MemoryExceeded(self.limits.memory_bytes)
            }
            trap => PluginError::Trap {
                message: match trap {
                    Some(trap) => trap.to_string(),
                    None => error.root_cause().to_string(),
                },
                stderr,
            },
        }
    }

    fn check_output(&self, size: usize) -> Result<(), PluginError> {
        if size > self.limits.output_bytes {
            return Err(PluginError::OutputTooLarge {
                size,
                limit: self.limits.output_bytes,
            });
        }
        Ok(())
    }

    /// Instantiates `pre` (the plugin's bindings for `role`) and makes one call. A plugin's
    /// own error answer becomes [`PluginError::Rejected`].
    fn call_role<P, R>(
        &self,
        plugin: &Plugin,
        role: Role,
        pre: Option<&P>,
        call: impl FnOnce(&P, &mut Store<State>) -> wasmtime::Result<Result<R, String>>,
    ) -> Result<R, PluginError> {
        let pre = pre.ok_or(PluginError::WrongRole {
            role,
            roles: plugin.roles.clone(),
        })?;
        self.call(|store| call(pre, store))?
            .map_err(PluginError::Rejected)
    }

    /// Calls a shaper.
    pub fn shape(
        &self,
        plugin: &Plugin,
        input: &shaper::ShapeInput,
    ) -> Result<Vec<String>, PluginError> {
        let objects = self.call_role(
            plugin,
            Role::Shaper,
            plugin.shaper.as_ref(),
            |pre, store| {
                pre.instantiate(&mut *store)?
                    .celery_operator_shaper()
                    .call_shape(&mut *store, input)
            },
        )?;
        self.check_output(objects.iter().map(String::len).sum())?;
        Ok(objects)
    }

    /// Calls an autoscaler-objects plugin.
    pub fn autoscaler_objects(
        &self,
        plugin: &Plugin,
        input: &autoscaler::PoolInput,
    ) -> Result<Vec<String>, PluginError> {
        let role = Role::Autoscaler;
        let objects = self.call_role(plugin, role, plugin.autoscaler.as_ref(), |pre, store| {
            pre.instantiate(&mut *store)?
                .celery_operator_autoscaler()
                .call_objects(&mut *store, input)
        })?;
        self.check_output(objects.iter().map(String::len).sum())?;
        Ok(objects)
    }

    /// Calls a scaling-decision plugin.
    pub fn decide(
        &self,
        plugin: &Plugin,
        input: &scaler::ScalingInput,
    ) -> Result<scaler::Decision, PluginError> {
        let decision = self.call_role(
            plugin,
            Role::Scaler,
            plugin.scaler.as_ref(),
            |pre, store| {
                pre.instantiate(&mut *store)?
                    .celery_operator_scaler()
                    .call_decide(&mut *store, input)
            },
        )?;
        self.check_output(decision.reason.len())?;
        Ok(decision)
    }
}

/// The roles a component exports, and the WIT version it speaks. A component of another
/// version of our package is rejected here, with the versions this host serves.
fn exported_roles(component: &Component) -> Result<(Vec<Role>, String), PluginError> {
    let ty = component.component_type();
    let names: Vec<&str> = ty.exports(&ENGINE).map(|(name, _)| name).collect();
    let mut roles = Vec::new();
    let mut versions = Vec::new();
    for name in &names {
        let Some(rest) = name
            .strip_prefix(WIT_PACKAGE)
            .and_then(|r| r.strip_prefix('/'))
        else {
            continue;
        };
        let (interface, version) = rest.split_once('@').unwrap_or((rest, ""));
        versions.push(version.to_string());
        if WIT_VERSIONS_SERVED.contains(&version) {
            roles.extend(Role::ALL.into_iter().filter(|r| r.interface() == interface));
        }
    }
    if roles.is_empty() {
        let served = WIT_VERSIONS_SERVED.join(", ");
        return Err(PluginError::Invalid(match versions.first() {
            Some(v) => format!(
                "the component speaks {WIT_PACKAGE}@{v}; this operator serves {WIT_PACKAGE}@{served}"
            ),
            None => format!(
                "the component exports no {WIT_PACKAGE} interface (exports: {}); this operator serves {WIT_PACKAGE}@{served}",
                if names.is_empty() {
                    "none".into()
                } else {
                    names.join(", ")
                }
            ),
        }));
    }
    Ok((roles, versions[0].clone()))
}
