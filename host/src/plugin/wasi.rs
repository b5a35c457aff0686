//! The part of WASI a plugin may import, and nothing that can block or leak.
//!
//! Components built with a language's standard library import some of WASI even when they use
//! none of it (Rust's imports `wasi:cli` and `wasi:io` for panics). The sandbox provides:
//!
//! - `wasi:io/{error,streams,poll}` over streams that never wait: standard input is closed,
//!   standard output is discarded, standard error is kept (bounded) to explain a panic;
//! - `wasi:cli/{environment,exit,stdin,stdout,stderr,terminal-*}`: no environment, no
//!   arguments, no terminal;
//! - `wasi:clocks`: both clocks read zero and stand still; a timer (`subscribe-duration`,
//!   `subscribe-instant`) is ready at once, so `sleep` returns immediately and `poll` never
//!   waits: time is an input of the call, never something a plugin can wait for;
//! - `wasi:random`: a fixed sequence, the same on every call (plugins are pure functions of
//!   their input), at most [`MAX_RANDOM_BYTES`] per request.
//!
//! Not provided: `wasi:filesystem`, `wasi:sockets` and anything else. A component that
//! imports them is refused when it is loaded.

use std::sync::LazyLock;
use std::time::Duration;

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime_wasi::cli::WasiCli;
use wasmtime_wasi::cli::WasiCliView;
use wasmtime_wasi::clocks::{WasiClocks, WasiClocksView};
use wasmtime_wasi::p2::bindings::{cli, clocks, random, sync};
use wasmtime_wasi::p2::pipe::{ClosedInputStream, MemoryOutputPipe, SinkOutputStream};
use wasmtime_wasi::p2::{DynPollable, Pollable, subscribe};
use wasmtime_wasi::random::{Deterministic, WasiRandom};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxView, WasiView};

/// Largest `get-random-bytes` request; a larger one traps (the host would allocate it).
pub const MAX_RANDOM_BYTES: u64 = 64 << 10;

/// Bytes of a plugin's standard error kept (to explain a panic).
const STDERR_CAPACITY: usize = 4096;

/// What a plugin's WASI imports see during one call.
pub struct Wasi {
    ctx: WasiCtx,
    table: ResourceTable,
    stderr: MemoryOutputPipe,
}

impl WasiView for Wasi {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
}

impl Wasi {
    /// A fresh context whose standard error is kept, up to 4 KiB.
    pub fn new() -> Wasi {
        let stderr = MemoryOutputPipe::new(STDERR_CAPACITY);
        let ctx = WasiCtx::builder()
            .stdin(ClosedInputStream)
            .stdout(SinkOutputStream)
            .stderr(stderr.clone())
            .wall_clock(Stopped)
            .monotonic_clock(Stopped)
            .secure_random(Deterministic::new(FIXED_BYTES.clone()))
            .insecure_random(Deterministic::new(FIXED_BYTES.clone()))
            .insecure_random_seed(0x5eed)
            .max_random_size(MAX_RANDOM_BYTES)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Wasi {
            ctx,
            table: ResourceTable::new(),
            stderr,
        }
    }

    /// What the plugin wrote to its standard error (invalid UTF-8 replaced).
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.contents()).into_owned()
    }
}

impl Default for Wasi {
    fn default() -> Self {
        Wasi::new()
    }
}

/// What `wasi:random` returns, on every call.
static FIXED_BYTES: LazyLock<Vec<u8>> = LazyLock::new(fixed_bytes);

/// A pseudo-random but fixed sequence of bytes (splitmix64 from a constant seed).
fn fixed_bytes() -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..32)
        .flat_map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)).to_le_bytes()
        })
        .collect()
}

/// Store data that holds a [`Wasi`].
pub trait HasWasi: Send + 'static {
    /// The WASI context of the call.
    fn wasi(&mut self) -> &mut Wasi;
}

/// Adds the sandbox's WASI to `linker`.
pub fn add_to_linker<T: HasWasi>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    wasmtime_wasi_io::bindings::wasi::io::error::add_to_linker::<T, Table>(linker, |t: &mut T| {
        &mut t.wasi().table
    })?;
    sync::io::poll::add_to_linker::<T, Table>(linker, |t: &mut T| &mut t.wasi().table)?;
    sync::io::streams::add_to_linker::<T, Table>(linker, |t: &mut T| &mut t.wasi().table)?;
    clocks::wall_clock::add_to_linker::<T, WasiClocks>(linker, |t: &mut T| t.wasi().clocks())?;
    clocks::monotonic_clock::add_to_linker::<T, Timers>(linker, |t: &mut T| {
        Timers(&mut t.wasi().table)
    })?;
    random::random::add_to_linker::<T, WasiRandom>(linker, |t: &mut T| t.wasi().ctx.random())?;
    random::insecure::add_to_linker::<T, WasiRandom>(linker, |t: &mut T| t.wasi().ctx.random())?;
    random::insecure_seed::add_to_linker::<T, WasiRandom>(linker, |t: &mut T| {
        t.wasi().ctx.random()
    })?;
    cli::exit::add_to_linker::<T, WasiCli>(linker, |t: &mut T| t.wasi().cli())?;
    cli::environment::add_to_linker::<T, WasiCli>(linker, |t: &mut T| t.wasi().cli())?;
    cli::stdin::add_to_linker::<T, WasiCli>(linker, |t: &mut T| t.wasi().cli())?;
    cli::stdout::add_to_linker::<T, WasiCli>(linker, |t: &mut T| t.wasi().cli())?;
    cli::stderr::add_to_linker::<T, WasiCli>(linker, |t: &mut T| t.wasi().cli())?;
    cli::terminal_input::add_to_linker::<T, WasiCli>(linker, |t: &mut T| t.wasi().cli())?;
    cli::terminal_output::add_to_linker::<T, WasiCli>(linker, |t: &mut T| t.wasi().cli())?;
    cli::terminal_stdin::add_to_linker::<T, WasiCli>(linker, |t: &mut T| t.wasi().cli())?;
    cli::terminal_stdout::add_to_linker::<T, WasiCli>(linker, |t: &mut T| t.wasi().cli())?;
    cli::terminal_stderr::add_to_linker::<T, WasiCli>(linker, |t: &mut T| t.wasi().cli())?;
    Ok(())
}

/// `wasi:io` works on the resource table alone.
struct Table;

impl HasData for Table {
    type Data<'a> = &'a mut ResourceTable;
}

/// A clock stopped at zero: plugins get the time only as an input.
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

/// `wasi:clocks/monotonic-clock` whose timers are ready at once.
struct Timers<'a>(&'a mut ResourceTable);

impl HasData for Timers<'static> {
    type Data<'a> = Timers<'a>;
}

impl clocks::monotonic_clock::Host for Timers<'_> {
    fn now(&mut self) -> wasmtime::Result<u64> {
        Ok(0)
    }

    fn resolution(&mut self) -> wasmtime::Result<u64> {
        Ok(1_000_000_000)
    }

    fn subscribe_instant(&mut self, _when: u64) -> wasmtime::Result<Resource<DynPollable>> {
        let ready = self.0.push(Ready)?;
        subscribe(self.0, ready)
    }

    fn subscribe_duration(&mut self, _duration: u64) -> wasmtime::Result<Resource<DynPollable>> {
        let ready = self.0.push(Ready)?;
        subscribe(self.0, ready)
    }
}

/// A pollable that is always ready.
struct Ready;

#[wasmtime_wasi::async_trait]
impl Pollable for Ready {
    async fn ready(&mut self) {}
}
