//! Builds the plugins workspace (`plugins/`, its own Cargo workspace) for `wasm32-wasip2`,
//! so the default plugins can be embedded in the operator and the test plugins are at hand.
//! The wasm files land in `$CELERY_PLUGIN_DIR` (set for the crate's code and tests).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Components the build must produce.
const PLUGINS: &[&str] = &[
    "hpa",
    "keda",
    "queue_length",
    "latency",
    "noop_shaper",
    "hostile",
    "future_version",
    "business_hours",
];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    for watched in ["plugins", "wit", "examples/plugins"] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    // One target dir for every profile of the host, so the plugins build once.
    let target = std::env::var_os("CELERY_PLUGINS_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| out.ancestors().nth(4).unwrap_or(&out).join("wasm-plugins"));

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--manifest-path",
        ])
        .arg(root.join("plugins/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target);
    // The outer build's compiler wrappers and flags (clippy, coverage) are not for the guests.
    for var in [
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CLIPPY_ARGS",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
    ] {
        build.env_remove(var);
    }
    let status = build.status().expect("running cargo for the plugins");
    if !status.success() {
        panic!(
            "building the WebAssembly plugins failed (see above). Is the wasm32-wasip2 target \
             installed? `rustup target add wasm32-wasip2` (scripts/setup.sh does it)"
        );
    }

    let dir = out.join("plugins");
    std::fs::create_dir_all(&dir).unwrap();
    let built = target.join("wasm32-wasip2/release");
    for name in PLUGINS {
        copy(
            &built.join(format!("{name}.wasm")),
            &dir.join(format!("{name}.wasm")),
        );
    }
    println!("cargo:rustc-env=CELERY_PLUGIN_DIR={}", dir.display());
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("plugin {} was not built: {e}", from.display()));
}
