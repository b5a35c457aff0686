//! The sandbox: one shared wasmtime [`Engine`]; components compiled (untrusted ones in a
//! bounded child process, see [`compile`](super::compile)), checked (exports, WIT versions,
//! and function types by a trial instantiation) and cached by the sha256 of their bytes for
//! as long as a plugin uses them; every call in a fresh [`Store`] and instance (taken from
//! wasmtime's pooling allocator, so a fresh instance is cheap) with a wall-clock deadline
//! (epoch interruption), one memory budget for every memory and table its instances create,
//! and an output size cap. Plugins get only the non-blocking WASI of [`wasi`](super::wasi).

use std::collections::HashMap;
use std::sync::{Arc, Condvar, LazyLock, Mutex, Weak};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter,
    Store, Strategy, Trap,
};

use super::bindings::{autoscaler, scaler, shaper, v0_1};
use super::compile::Compiler;
use super::wasi::{self, Wasi};
use super::{PluginError, Role, WIT_PACKAGE, WIT_VERSIONS_SERVED};
use crate::text::{self, limit};

/// How often the deadline clock ticks.
const TICK: Duration = Duration::from_millis(5);
/// Instances, memories and tables one call may create. A component built from Rust has a
/// handful of each; the memory budget bounds their sizes together.
const MAX_INSTANCES: usize = 64;
const MAX_MEMORIES: usize = 32;
const MAX_TABLES: usize = 64;
/// What one table element costs against the memory budget (a pointer and bookkeeping).
const TABLE_ELEMENT_BYTES: usize = 16;
/// Names listed in a refusal message, at most.
const LISTED_NAMES: usize = 8;

/// Plugin calls in flight at once in this process. The instance pool keeps slots for this
/// many calls, each with as many instances, memories and tables as one call may create
/// ([`MAX_INSTANCES`], [`MAX_MEMORIES`], [`MAX_TABLES`]); a further call waits for one to end
/// (calls are bounded by their deadline) rather than failing.
const CONCURRENT_CALLS: u32 = 8;
/// Elements a table may have (the memory budget bounds them too, at 16 bytes each). The pool
/// maps this much per table slot; the Python example's largest table starts at 5,670.
const TABLE_ELEMENTS: usize = 1 << 16;
/// Bytes of a memory slot's pages a call dirtied that are reset in place and kept resident
/// (where the kernel can say which pages were dirtied): a call of a default plugin dirties
/// well under this, and all 256 memory slots together keep at most 64 MiB.
const KEEP_RESIDENT: usize = 256 << 10;
/// Bytes of a table slot reset in place and kept resident (a default plugin's table is
/// a few hundred elements of 8 bytes).
const TABLE_KEEP_RESIDENT: usize = 64 << 10;

/// The compiler configuration every plugin is compiled with, here and in the sandboxed
/// compiler (which must produce code this process accepts).
///
/// On x86-64 plugins are compiled by Winch, wasmtime's baseline compiler (a tier-1 compiler
/// there): one pass over the code, about four times faster than Cranelift for our plugins
/// (`cargo bench -p celery-operator --bench plugins`). Its code runs slower, but a plugin's
/// own work is a microsecond or two of a call that costs tens (instantiation and copying
/// the input): compile time is what a user waits for when a plugin is installed. Elsewhere,
/// Cranelift.
fn compile_config() -> Config {
    let mut config = Config::new();
    config.epoch_interruption(true);
    if cfg!(target_arch = "x86_64") {
        config.strategy(Strategy::Winch);
    }
    config
}

/// The instance pool: memories, tables and instances are taken from slots mapped once and
/// reused, so a fresh instance per call costs no `mmap`/`munmap`.
fn pool() -> PoolingAllocationConfig {
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(CONCURRENT_CALLS)
        .total_core_instances(CONCURRENT_CALLS * MAX_INSTANCES as u32)
        .total_memories(CONCURRENT_CALLS * MAX_MEMORIES as u32)
        .total_tables(CONCURRENT_CALLS * MAX_TABLES as u32)
        .max_core_instances_per_component(MAX_INSTANCES as u32)
        .max_memories_per_component(MAX_MEMORIES as u32)
        .max_tables_per_component(MAX_TABLES as u32)
        .max_memories_per_module(MAX_MEMORIES as u32)
        .max_tables_per_module(MAX_TABLES as u32)
        .table_elements(TABLE_ELEMENTS);
    // Pages a call dirtied are reset by copying (the kernel says which, Linux 6.7 and
    // later) and stay mapped, so the next call takes no page faults; elsewhere memories are
    // reset with `madvise`. At most this much stays resident per memory slot.
    if PoolingAllocationConfig::is_pagemap_scan_available() {
        pool.pagemap_scan(Enabled::Yes)
            .linear_memory_keep_resident(KEEP_RESIDENT);
    }
    pool.table_keep_resident(TABLE_KEEP_RESIDENT);
    pool
}

/// The one engine of the process, with a thread that advances its epoch every [`TICK`].
static ENGINE: LazyLock<Engine> = LazyLock::new(|| {
    let mut config = compile_config();
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool()));
    // The pool reserves about 1 TiB of address space (not memory). Where the address space
    // is limited (`ulimit -v`), plugins still run, each instance mapped on its own.
    let engine = Engine::new(&config).unwrap_or_else(|e| {
        tracing::warn!(
            error = %format!("{e:#}"),
            "the plugin instance pool cannot be reserved (is the address space limited?); \
             plugin instances are mapped one by one, which makes calls slower"
        );
        Engine::new(&compile_config()).expect("the wasmtime configuration is valid")
    });
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

/// The engine every plugin is compiled for and run by.
pub fn engine() -> &'static Engine {
    &ENGINE
}

/// An engine that compiles exactly like [`engine`] but maps no instance pool: for the
/// sandboxed compiler, whose memory is capped and which instantiates nothing.
pub fn compile_engine() -> Engine {
    Engine::new(&compile_config()).expect("the wasmtime configuration is valid")
}

/// Free call slots of the instance pool (see [`CONCURRENT_CALLS`]).
static SLOTS: Slots = Slots {
    free: Mutex::new(CONCURRENT_CALLS),
    freed: Condvar::new(),
};

/// A counting semaphore over the pool's call slots.
struct Slots {
    free: Mutex<u32>,
    freed: Condvar,
}

/// A call slot, given back when dropped.
struct Slot;

impl Slots {
    fn take(&'static self) -> Slot {
        let mut free = self.free.lock().expect("slot lock");
        while *free == 0 {
            free = self.freed.wait(free).expect("slot lock");
        }
        *free -= 1;
        Slot
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        *SLOTS.free.lock().expect("slot lock") += 1;
        SLOTS.freed.notify_one();
    }
}

/// Bounds on every plugin call.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Wall-clock time one call may take.
    pub deadline: Duration,
    /// Memory one call may allocate: every linear memory and table of its instances together.
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
    /// The WIT package version of the interfaces it is used for.
    pub wit_version: String,
    /// The roles it implements (one per exported interface of a served version).
    pub roles: Vec<Role>,
    /// Interfaces of the package it exports at versions this operator does not serve
    /// (`celery:operator/shaper@0.2.0`): ignored.
    pub ignored: Vec<String>,
    shaper: Option<Pre<shaper::ShaperPluginPre<State>, v0_1::shaper::ShaperPluginPre<State>>>,
    autoscaler: Option<
        Pre<autoscaler::AutoscalerPluginPre<State>, v0_1::autoscaler::AutoscalerPluginPre<State>>,
    >,
    scaler: Option<Pre<scaler::ScalerPluginPre<State>, v0_1::scaler::ScalerPluginPre<State>>>,
}

/// A role's pre-instantiated bindings, at the WIT version the plugin speaks.
enum Pre<Current, V0_1> {
    /// `celery:operator@0.2.0`.
    Current(Current),
    /// `celery:operator@0.1.0`.
    V0_1(V0_1),
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

/// Per-call state of a store. The WASI context is made at the plugin's first WASI call:
/// most calls make none (Rust's standard library reaches for WASI to report a panic), and
/// making one is a good part of a call's cost.
struct State {
    wasi: Option<Wasi>,
    budget: Budget,
}

impl wasi::HasWasi for State {
    fn wasi(&mut self) -> &mut Wasi {
        self.wasi.get_or_insert_with(Wasi::new)
    }
}

/// One memory budget for everything a call's instances allocate: linear memories (as they
/// are created and as they grow) and table elements, together.
struct Budget {
    limit: usize,
    used: usize,
}

/// A call tried to go past its memory budget.
#[derive(Debug, thiserror::Error)]
#[error("the plugin exceeded its memory limit of {0} bytes")]
struct OverBudget(usize);

impl Budget {
    fn take(&mut self, bytes: usize) -> wasmtime::Result<bool> {
        match self.used.checked_add(bytes).filter(|t| *t <= self.limit) {
            Some(total) => {
                self.used = total;
                Ok(true)
            }
            None => Err(OverBudget(self.limit).into()),
        }
    }
}

impl ResourceLimiter for Budget {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.take(desired.saturating_sub(current))
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.take(
            desired
                .saturating_sub(current)
                .saturating_mul(TABLE_ELEMENT_BYTES),
        )
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }
}

/// Loads, caches and calls plugins.
pub struct Runtime {
    engine: Engine,
    linker: Linker<State>,
    limits: Limits,
    maxima: Limits,
    compiler: Compiler,
    /// Checked plugins by digest, for as long as something (the registry) holds them.
    cache: Mutex<HashMap<String, Weak<Plugin>>>,
    /// Plugins that crashed, by digest, while they wait out their backoff (when enabled).
    crashes: Option<Mutex<HashMap<String, Crash>>>,
}

/// First wait after a crash; it doubles with every crash in a row, up to [`CRASH_BACKOFF_MAX`].
pub const CRASH_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait after crashes in a row.
pub const CRASH_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// A plugin's crashes in a row and when it may run again.
struct Crash {
    in_a_row: u32,
    until: std::time::Instant,
}

impl Runtime {
    /// A runtime whose calls are bounded by `limits` and whose untrusted components are
    /// compiled by `compiler`.
    pub fn new(limits: Limits, compiler: Compiler) -> Self {
        Self::on_engine(engine().clone(), limits, compiler)
    }

    /// A runtime on another engine than the process's (the bench compares engine
    /// configurations).
    pub fn on_engine(engine: Engine, limits: Limits, compiler: Compiler) -> Self {
        let mut linker = Linker::new(&engine);
        wasi::add_to_linker(&mut linker).expect("the sandbox's WASI links once");
        Runtime {
            engine,
            linker,
            limits,
            maxima: limits,
            compiler,
            cache: Mutex::default(),
            crashes: None,
        }
    }

    /// Lets a plugin reference ask for bounds up to `maxima` (each at least the default).
    pub fn with_maxima(mut self, maxima: Limits) -> Self {
        self.maxima = Limits {
            deadline: maxima.deadline.max(self.limits.deadline),
            memory_bytes: maxima.memory_bytes.max(self.limits.memory_bytes),
            output_bytes: maxima.output_bytes.max(self.limits.output_bytes),
        };
        self
    }

    /// After a plugin crashes (traps, runs out of time or memory), its calls fail at once,
    /// without instantiating it, for [`CRASH_BACKOFF`], doubling with each crash in a row up
    /// to [`CRASH_BACKOFF_MAX`]; an answer resets it. For the operator, where a plugin is
    /// called again and again: a crashing one must not cost a fresh instance every time.
    pub fn with_crash_backoff(mut self) -> Self {
        self.crashes = Some(Mutex::default());
        self
    }

    /// The default bounds of every call.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The bounds of a call whose plugin reference asks for `requested`: its values, else
    /// the defaults, never above the maxima.
    pub fn limits_for(&self, requested: Option<&crate::crd::PluginLimits>) -> Limits {
        let Some(r) = requested else {
            return self.limits;
        };
        let pick = |asked: Option<u32>, unit: u64, default: u64, max: u64| {
            asked.map_or(default, |v| (u64::from(v) * unit).min(max))
        };
        let ms = |d: Duration| d.as_millis() as u64;
        Limits {
            deadline: Duration::from_millis(pick(
                r.timeout_ms,
                1,
                ms(self.limits.deadline),
                ms(self.maxima.deadline),
            )),
            memory_bytes: pick(
                r.memory_mib,
                1 << 20,
                self.limits.memory_bytes as u64,
                self.maxima.memory_bytes as u64,
            ) as usize,
            output_bytes: pick(
                r.output_kib,
                1 << 10,
                self.limits.output_bytes as u64,
                self.maxima.output_bytes as u64,
            ) as usize,
        }
    }

    /// Calls bounded by `limits` (see [`Runtime::limits_for`]).
    pub fn with(&self, limits: Limits) -> Calls<'_> {
        Calls {
            runtime: self,
            limits,
        }
    }

    /// The digest of plugin bytes, as `sha256:<hex>`.
    pub fn digest(bytes: &[u8]) -> String {
        format!("sha256:{:x}", Sha256::digest(bytes))
    }

    /// How many compiled plugins are in memory (held by a registry or a caller).
    pub fn builds_in_memory(&self) -> usize {
        let mut cache = self.cache.lock().expect("cache lock");
        cache.retain(|_, p| p.strong_count() > 0);
        cache.len()
    }

    /// Compiles (with the runtime's compiler) and checks untrusted bytes, or returns the
    /// plugin already loaded from the same bytes.
    ///
    /// Slow for new bytes (tens of milliseconds, more for large components): call it when a
    /// plugin is installed, never on the decision path.
    pub fn load(&self, bytes: &[u8]) -> Result<Arc<Plugin>, PluginError> {
        let digest = Self::digest(bytes);
        if let Some(p) = self.cached(&digest) {
            return Ok(p);
        }
        let component = self.compiler.compile(&self.engine, bytes)?;
        let exports = exported_roles(&self.engine, &component)?;
        let pre = self.linker.instantiate_pre(&component).map_err(|e| {
            PluginError::Invalid(text::clean(
                &format!(
                    "it imports what the sandbox does not provide (plugins get no files, \
                     network, environment or real clock): {e:#}"
                ),
                limit::PLUGIN_MESSAGE,
            ))
        })?;
        let invalid = |e: wasmtime::Error| {
            PluginError::Invalid(text::clean(&format!("{e:#}"), limit::PLUGIN_MESSAGE))
        };
        let has = |r| exports.roles.contains(&r);
        let current = exports.version != "0.1.0";
        // Bindings of the plugin's version for a role it implements.
        macro_rules! pre {
            ($role:expr, $current:ty, $old:ty) => {
                if !has($role) {
                    None
                } else if current {
                    Some(Pre::Current(<$current>::new(pre.clone()).map_err(invalid)?))
                } else {
                    Some(Pre::V0_1(<$old>::new(pre.clone()).map_err(invalid)?))
                }
            };
        }
        let plugin = Plugin {
            digest: digest.clone(),
            size: bytes.len(),
            shaper: pre!(
                Role::Shaper,
                shaper::ShaperPluginPre<State>,
                v0_1::shaper::ShaperPluginPre<State>
            ),
            autoscaler: pre!(
                Role::Autoscaler,
                autoscaler::AutoscalerPluginPre<State>,
                v0_1::autoscaler::AutoscalerPluginPre<State>
            ),
            scaler: pre!(
                Role::Scaler,
                scaler::ScalerPluginPre<State>,
                v0_1::scaler::ScalerPluginPre<State>
            ),
            wit_version: exports.version,
            ignored: exports.ignored,
            roles: exports.roles,
        };
        self.check_types(&plugin)?;
        let plugin = Arc::new(plugin);
        let mut cache = self.cache.lock().expect("cache lock");
        cache.retain(|_, p| p.strong_count() > 0);
        cache.insert(digest, Arc::downgrade(&plugin));
        Ok(plugin)
    }

    fn cached(&self, digest: &str) -> Option<Arc<Plugin>> {
        self.cache
            .lock()
            .expect("cache lock")
            .get(digest)?
            .upgrade()
    }

    /// Instantiates the plugin once per role, under the most a reference may ask for (the
    /// maxima): the functions it exports are type-checked against the WIT on instantiation,
    /// so a build whose `shape` has the wrong type (or that cannot even start within the
    /// maxima) is refused now, not at its first call.
    fn check_types(&self, plugin: &Plugin) -> Result<(), PluginError> {
        let wrong = |role: Role, e: PluginError| {
            PluginError::Invalid(text::clean(
                &format!(
                    "it does not instantiate as a {WIT_PACKAGE}@{} {} plugin within the call \
                     limits: {e}",
                    plugin.wit_version,
                    role.interface(),
                ),
                limit::PLUGIN_MESSAGE,
            ))
        };
        let calls = self.with(self.maxima);
        let check =
            |role: Role, started: Result<(), PluginError>| started.map_err(|e| wrong(role, e));
        match &plugin.shaper {
            Some(Pre::Current(pre)) => {
                check(Role::Shaper, calls.call(|s| pre.instantiate(s).map(drop)))?
            }
            Some(Pre::V0_1(pre)) => {
                check(Role::Shaper, calls.call(|s| pre.instantiate(s).map(drop)))?
            }
            None => {}
        }
        match &plugin.autoscaler {
            Some(Pre::Current(pre)) => check(
                Role::Autoscaler,
                calls.call(|s| pre.instantiate(s).map(drop)),
            )?,
            Some(Pre::V0_1(pre)) => check(
                Role::Autoscaler,
                calls.call(|s| pre.instantiate(s).map(drop)),
            )?,
            None => {}
        }
        match &plugin.scaler {
            Some(Pre::Current(pre)) => {
                check(Role::Scaler, calls.call(|s| pre.instantiate(s).map(drop)))?
            }
            Some(Pre::V0_1(pre)) => {
                check(Role::Scaler, calls.call(|s| pre.instantiate(s).map(drop)))?
            }
            None => {}
        }
        Ok(())
    }

    /// Calls a shaper, within the default bounds.
    pub fn shape(
        &self,
        plugin: &Plugin,
        input: &shaper::ShapeInput,
    ) -> Result<Vec<String>, PluginError> {
        self.with(self.limits).shape(plugin, input)
    }

    /// Calls an autoscaler-objects plugin, within the default bounds.
    pub fn autoscaler_objects(
        &self,
        plugin: &Plugin,
        input: &autoscaler::PoolInput,
    ) -> Result<Vec<String>, PluginError> {
        self.with(self.limits).autoscaler_objects(plugin, input)
    }

    /// Calls a scaling-decision plugin, within the default bounds.
    pub fn decide(
        &self,
        plugin: &Plugin,
        input: &scaler::ScalingInput,
    ) -> Result<scaler::Decision, PluginError> {
        self.with(self.limits).decide(plugin, input)
    }

    /// Fails at once while `digest` waits out a crash backoff.
    fn check_backoff(&self, digest: &str) -> Result<(), PluginError> {
        let Some(crashes) = &self.crashes else {
            return Ok(());
        };
        let crashes = crashes.lock().expect("crash lock");
        match crashes.get(digest) {
            Some(c) if c.until > std::time::Instant::now() => Err(PluginError::Backoff {
                crashes: c.in_a_row,
                retry_in: c.until - std::time::Instant::now(),
            }),
            _ => Ok(()),
        }
    }

    /// Records how a call of `digest` ended, for the crash backoff.
    fn record_outcome<R>(&self, digest: &str, outcome: &Result<R, PluginError>) {
        let Some(crashes) = &self.crashes else {
            return;
        };
        let mut crashes = crashes.lock().expect("crash lock");
        match outcome {
            Err(
                PluginError::Trap { .. } | PluginError::Timeout(_) | PluginError::MemoryExceeded(_),
            ) => {
                let in_a_row = crashes.get(digest).map_or(0, |c| c.in_a_row) + 1;
                let wait = CRASH_BACKOFF
                    .saturating_mul(1 << (in_a_row - 1).min(16))
                    .min(CRASH_BACKOFF_MAX);
                crashes.insert(
                    digest.to_string(),
                    Crash {
                        in_a_row,
                        until: std::time::Instant::now() + wait,
                    },
                );
            }
            _ => {
                crashes.remove(digest);
            }
        }
    }
}

/// Calls of a [`Runtime`]'s plugins under one set of bounds.
pub struct Calls<'a> {
    runtime: &'a Runtime,
    limits: Limits,
}

impl Calls<'_> {
    /// Runs `call` in a fresh store under the limits, turning traps into clear errors.
    fn call<R>(
        &self,
        call: impl FnOnce(&mut Store<State>) -> wasmtime::Result<R>,
    ) -> Result<R, PluginError> {
        // Taken before the store and given back after it is dropped (with its instances).
        let _slot = SLOTS.take();
        let mut store = Store::new(
            &self.runtime.engine,
            State {
                wasi: None,
                budget: Budget {
                    limit: self.limits.memory_bytes,
                    used: 0,
                },
            },
        );
        store.limiter(|s| &mut s.budget);
        let ticks = (self.limits.deadline.as_millis() / TICK.as_millis()).max(1) as u64;
        store.set_epoch_deadline(ticks);
        store.epoch_deadline_trap();
        call(&mut store).map_err(|e| self.classify(e, store.data().wasi.as_ref()))
    }

    fn classify(&self, error: wasmtime::Error, wasi: Option<&Wasi>) -> PluginError {
        if error.downcast_ref::<OverBudget>().is_some() {
            return PluginError::MemoryExceeded(self.limits.memory_bytes);
        }
        if let Some(Trap::Interrupt) = error.downcast_ref::<Trap>() {
            return PluginError::Timeout(self.limits.deadline);
        }
        let stderr = wasi
            .map(Wasi::stderr)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.starts_with("note: run with `RUST_BACKTRACE"))
            .collect::<Vec<_>>()
            .join(" ");
        let message = match error.downcast_ref::<Trap>() {
            Some(trap) => trap.to_string(),
            // Backtraces carry the plugin's own function names.
            None => format!("{:#}", error.root_cause()),
        };
        PluginError::Trap {
            message: text::clean(&message, limit::PLUGIN_MESSAGE),
            stderr: text::clean(stderr.trim(), limit::PLUGIN_MESSAGE),
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
    /// own error answer becomes [`PluginError::Rejected`], cleaned and bounded.
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
        self.runtime.check_backoff(&plugin.digest)?;
        let outcome = self.call(|store| call(pre, store)).and_then(|answer| {
            answer.map_err(|m| PluginError::Rejected(text::clean(&m, limit::PLUGIN_MESSAGE)))
        });
        self.runtime.record_outcome(&plugin.digest, &outcome);
        outcome
    }

    /// Calls a shaper.
    pub fn shape(
        &self,
        plugin: &Plugin,
        input: &shaper::ShapeInput,
    ) -> Result<Vec<String>, PluginError> {
        let role = Role::Shaper;
        let objects = self.call_role(
            plugin,
            role,
            plugin.shaper.as_ref(),
            |pre, store| match pre {
                Pre::Current(pre) => pre
                    .instantiate(&mut *store)?
                    .celery_operator_shaper()
                    .call_shape(&mut *store, input),
                Pre::V0_1(pre) => pre
                    .instantiate(&mut *store)?
                    .celery_operator_shaper()
                    .call_shape(&mut *store, &v0_1::shape_input(input)),
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
        let objects =
            self.call_role(
                plugin,
                role,
                plugin.autoscaler.as_ref(),
                |pre, store| match pre {
                    Pre::Current(pre) => pre
                        .instantiate(&mut *store)?
                        .celery_operator_autoscaler()
                        .call_objects(&mut *store, input),
                    Pre::V0_1(pre) => pre
                        .instantiate(&mut *store)?
                        .celery_operator_autoscaler()
                        .call_objects(&mut *store, &v0_1::pool_input(input)),
                },
            )?;
        self.check_output(objects.iter().map(String::len).sum())?;
        Ok(objects)
    }

    /// Calls a scaling-decision plugin. The reason is cleaned and bounded.
    pub fn decide(
        &self,
        plugin: &Plugin,
        input: &scaler::ScalingInput,
    ) -> Result<scaler::Decision, PluginError> {
        let role = Role::Scaler;
        let mut decision =
            self.call_role(
                plugin,
                role,
                plugin.scaler.as_ref(),
                |pre, store| match pre {
                    Pre::Current(pre) => pre
                        .instantiate(&mut *store)?
                        .celery_operator_scaler()
                        .call_decide(&mut *store, input),
                    Pre::V0_1(pre) => Ok(pre
                        .instantiate(&mut *store)?
                        .celery_operator_scaler()
                        .call_decide(&mut *store, &v0_1::scaling_input(input))?
                        .map(v0_1::decision)),
                },
            )?;
        self.check_output(decision.reason.len())?;
        decision.reason = text::clean(&decision.reason, limit::REASON);
        Ok(decision)
    }
}

/// What a component exports of our package.
struct Exports {
    roles: Vec<Role>,
    version: String,
    ignored: Vec<String>,
}

/// `names` for a message: at most [`LISTED_NAMES`], each cleaned and short.
pub(crate) fn listed(names: &[String]) -> String {
    let mut shown: Vec<String> = names
        .iter()
        .take(LISTED_NAMES)
        .map(|n| text::clean(n, 80))
        .collect();
    if names.len() > LISTED_NAMES {
        shown.push(format!("and {} more", names.len() - LISTED_NAMES));
    }
    shown.join(", ")
}

/// The roles a component exports at a version this operator serves, that version, and the
/// interfaces of the package it exports at other versions. A component with no interface of
/// a served version is refused, with the versions this host serves.
fn exported_roles(engine: &Engine, component: &Component) -> Result<Exports, PluginError> {
    let ty = component.component_type();
    let names: Vec<String> = ty
        .exports(engine)
        .map(|(name, _)| name.to_string())
        .collect();
    let mut roles = Vec::new();
    let mut versions: Vec<&str> = Vec::new();
    let mut ignored = Vec::new();
    for name in &names {
        let Some(rest) = name
            .strip_prefix(WIT_PACKAGE)
            .and_then(|r| r.strip_prefix('/'))
        else {
            continue;
        };
        let (interface, version) = rest.split_once('@').unwrap_or((rest, ""));
        let role = Role::ALL.into_iter().find(|r| r.interface() == interface);
        match role {
            Some(role) if WIT_VERSIONS_SERVED.contains(&version) => {
                roles.push(role);
                versions.push(version);
            }
            _ => ignored.push(name.clone()),
        }
    }
    versions.sort();
    versions.dedup();
    let served = WIT_VERSIONS_SERVED.join(", ");
    match versions.as_slice() {
        [version] => Ok(Exports {
            roles,
            version: version.to_string(),
            ignored,
        }),
        [] if !ignored.is_empty() => Err(PluginError::Invalid(format!(
            "the component speaks versions of {WIT_PACKAGE} this operator does not serve \
             ({}); it serves {WIT_PACKAGE}@{served}",
            listed(&ignored)
        ))),
        [] => Err(PluginError::Invalid(format!(
            "the component exports no {WIT_PACKAGE} interface (exports: {}); this operator \
             serves {WIT_PACKAGE}@{served}",
            if names.is_empty() {
                "none".into()
            } else {
                listed(&names)
            }
        ))),
        several => Err(PluginError::Invalid(format!(
            "the component mixes versions of {WIT_PACKAGE} ({}): one plugin speaks one version",
            several.join(", ")
        ))),
    }
}
