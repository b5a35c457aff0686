//! Hostile components written from scratch against `wit/0.1.0/celery-operator.wit` (a
//! version the host still serves, whose ABI they spell out by hand), not built from
//! the project's plugins: core modules in WAT, made components by `wit-component` the way
//! language toolchains make them (or, where no valid WIT could describe them, whole
//! components in WAT). Each is an attack the sandbox must contain.

use std::path::Path;

use wit_component::{ComponentEncoder, StringEncoding};
use wit_parser::Resolve;

/// The answer every generated scaler gives after its attack: `ok`, replicas 1 (a
/// `result<decision, string>` at address 64, its reason at 128).
const ANSWER: &str = r#"
  (data (i32.const 64) "\00\00\00\00\01\00\00\00\01\00\00\00\80\00\00\00\02\00\00\00")
  (data (i32.const 128) "ok")"#;

/// A bump allocator, as the canonical ABI wants one.
const REALLOC: &str = r#"
  (global $heap (mut i32) (i32.const 4096))
  (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32)
    (local $p i32)
    (local.set $p (i32.and (i32.add (global.get $heap) (i32.sub (local.get 2) (i32.const 1)))
                           (i32.sub (i32.const 0) (local.get 2))))
    (global.set $heap (i32.add (local.get $p) (local.get 3)))
    (block $fits
      (br_if $fits (i32.le_u (global.get $heap) (i32.mul (memory.size) (i32.const 65536))))
      (br_if $fits (i32.ne (memory.grow (i32.add (i32.shr_u (global.get $heap) (i32.const 16))
                                                 (i32.const 1)))
                           (i32.const -1)))
      unreachable)
    (local.get $p))"#;

/// Turns a core module (WAT) exporting the canonical ABI names of `world` (a world of
/// `wit/0.1.0/` or of `extra_wit`) into a component.
fn componentize(world: &str, extra_wit: Option<&str>, core: &str) -> Vec<u8> {
    let mut resolve = Resolve::default();
    let wit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit/0.1.0");
    let (ours, _) = resolve.push_dir(&wit).expect("the project's WIT parses");
    let package = match extra_wit {
        Some(text) => resolve
            .push_str("extra.wit", text)
            .expect("the test WIT parses"),
        None => ours,
    };
    let world = resolve
        .select_world(&[package], Some(world))
        .expect("the world exists");
    let mut module = wat::parse_str(core).expect("the core module is valid WAT");
    wit_component::embed_component_metadata(&mut module, &resolve, world, StringEncoding::UTF8)
        .expect("the metadata embeds");
    ComponentEncoder::default()
        .module(&module)
        .expect("the module is accepted")
        .validate(true)
        .encode()
        .expect("the component encodes")
}

/// A scaler plugin whose `decide` runs `attack` (core instructions) and then answers;
/// `fields` are added to its core module (memories, tables, functions).
pub fn scaler(attack: &str, fields: &str) -> Vec<u8> {
    let core = format!(
        r#"(module
  (memory (export "memory") 1)
  {REALLOC}
  {ANSWER}
  {fields}
  (func (export "celery:operator/scaler@0.1.0#decide")
    (param i32 i32 i64 i32 i32 i32 f64 i32 i32 i32 i32 i32 i32) (result i32)
    {attack}
    (i32.const 64)))"#
    );
    componentize("scaler-plugin", None, &core)
}

/// `count` extra memories of `pages` 64 KiB pages each: created when the plugin is
/// instantiated (`at_start`), or grown and written page by page by `decide`.
pub fn memories(count: usize, pages: u32, at_start: bool) -> Vec<u8> {
    let initial = if at_start { pages } else { 0 };
    let fields: String = (0..count)
        .map(|i| format!("(memory $m{i} {initial})\n"))
        .collect();
    let attack: String = (0..count)
        .map(|i| {
            format!(
                "(drop (memory.grow $m{i} (i32.const {pages})))
                 (local.set 0 (i32.const 0))
                 (block $done{i} (loop $page{i}
                   (br_if $done{i} (i32.ge_u (local.get 0) (i32.const {bytes})))
                   (i32.store $m{i} (local.get 0) (i32.const 1))
                   (local.set 0 (i32.add (local.get 0) (i32.const 4096)))
                   (br $page{i})))\n",
                bytes = u64::from(pages) * 65536
            )
        })
        .collect();
    scaler(if at_start { "" } else { &attack }, &fields)
}

/// `decide` grows a table by `elements` at once.
pub fn table_grow(elements: u32) -> Vec<u8> {
    scaler(
        &format!("(drop (table.grow $t (ref.null func) (i32.const {elements})))"),
        "(table $t 0 funcref)",
    )
}

/// Functions of the compile bomb the tests send.
pub const BOMB_FUNCTIONS: usize = 200_000;

/// A valid scaler with `functions` more functions, empty: four bytes each to send, yet each
/// costs the compiler its own work, code and metadata. 200,000 of them (800 KB) take Winch
/// (and Cranelift, longer) seconds and more than a gigabyte to compile.
pub fn compile_bomb(functions: usize) -> Vec<u8> {
    scaler("", &"(func)".repeat(functions))
}

/// A component (whole WAT) that exports `celery:operator/shaper@0.1.0` whose `shape` takes
/// nothing and returns a number.
pub fn wrong_shape_type() -> Vec<u8> {
    wat::parse_str(
        r#"(component
  (core module $m (func (export "shape") (result i32) (i32.const 7)))
  (core instance $i (instantiate $m))
  (func $shape (result u32) (canon lift (core func $i "shape")))
  (instance $shaper (export "shape" (func $shape)))
  (export "celery:operator/shaper@0.1.0" (instance $shaper)))"#,
    )
    .expect("valid component WAT")
}

/// A component with `count` exported functions and nothing of ours.
pub fn many_exports(count: usize) -> Vec<u8> {
    let exports: String = (0..count)
        .map(|i| format!("(export \"export-number-{i}\" (func $f))\n"))
        .collect();
    wat::parse_str(format!(
        r#"(component
  (core module $m (func (export "f") (result i32) (i32.const 0)))
  (core instance $i (instantiate $m))
  (func $f (result u32) (canon lift (core func $i "f")))
  {exports})"#
    ))
    .expect("valid component WAT")
}

/// A scaler of `celery:operator@0.1.0` that also exports a `shaper` of a `0.9.0` of the
/// package (a version no operator serves yet, with another signature).
pub fn mixed_versions() -> Vec<u8> {
    let wit = r#"
package celery:operator@0.9.0;
interface shaper { shape: func() -> u32; }
world mixed {
  export celery:operator/scaler@0.1.0;
  export shaper;
}"#;
    let core = format!(
        r#"(module
  (memory (export "memory") 1)
  {REALLOC}
  {ANSWER}
  (func (export "celery:operator/shaper@0.9.0#shape") (result i32) (i32.const 7))
  (func (export "celery:operator/scaler@0.1.0#decide")
    (param i32 i32 i64 i32 i32 i32 f64 i32 i32 i32 i32 i32 i32) (result i32)
    (i32.const 64)))"#
    );
    componentize("celery:operator/mixed@0.9.0", Some(wit), &core)
}

/// A component importing one function of `interface` (say `wasi:sockets/tcp@0.2.6`),
/// which the sandbox does not provide, and exporting a plausible scaler instance.
pub fn importing(interface: &str) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(component
  (import "{interface}" (instance $wasi (export "drop" (func))))
  (core func $drop (canon lower (func $wasi "drop")))
  (core module $m (import "wasi" "drop" (func)) (func (export "decide") (result i32) (i32.const 0)))
  (core instance $imports (export "drop" (func $drop)))
  (core instance $i (instantiate $m (with "wasi" (instance $imports))))
  (func $decide (result u32) (canon lift (core func $i "decide")))
  (instance $scaler (export "decide" (func $decide)))
  (export "celery:operator/scaler@0.1.0" (instance $scaler)))"#
    ))
    .expect("valid component WAT")
}
