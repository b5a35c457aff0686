//! What loading a plugin costs on a first start and on a restart with the disk cache:
//! `cargo bench -p celery-operator --bench plugin_load`. For each built-in plugin, and for a
//! Python component when `PYTHON_PLUGIN=path.wasm` is set (build one with
//! `celery-operator-plugin build`, see plugins/python), prints its size, the p50 of 3
//! compiles by the sandboxed compiler (a child process, as in the operator) without a cache,
//! and the p50 of 3 loads from the disk cache (`--plugin-cache-dir`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use celery_operator::plugin::{Compiler, DiskCache, Sandbox, builtin, runtime};

fn p50(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn main() {
    let program = env!("CARGO_BIN_EXE_celery-operator");
    let cache = std::env::temp_dir().join(format!("plugin-load-bench-{}", std::process::id()));
    let compiler = |dir: Option<PathBuf>| {
        Compiler::Sandboxed(Sandbox {
            program: program.into(),
            timeout: Duration::from_secs(300),
            memory_bytes: 2 << 30,
            cache: dir.map(|dir| DiskCache {
                dir,
                max_bytes: 1 << 30,
            }),
        })
    };
    let mut plugins: Vec<(String, Vec<u8>)> = builtin::ALL
        .iter()
        .map(|(name, bytes)| (name.to_string(), bytes.to_vec()))
        .collect();
    if let Ok(path) = std::env::var("PYTHON_PLUGIN") {
        plugins.push((format!("python {path}"), std::fs::read(&path).unwrap()));
    }
    let engine = runtime::engine();
    println!(
        "{:<28} {:>10} {:>16} {:>16} {:>8}",
        "plugin", "bytes", "compile p50", "disk cache p50", "ratio"
    );
    for (name, bytes) in plugins {
        let timed = |compiler: &Compiler| {
            let start = Instant::now();
            compiler.compile(engine, &bytes).unwrap();
            start.elapsed()
        };
        let cold = p50((0..3).map(|_| timed(&compiler(None))).collect());
        let cached_compiler = compiler(Some(cache.clone()));
        timed(&cached_compiler); // fills the cache
        let warm = p50((0..3).map(|_| timed(&cached_compiler)).collect());
        println!(
            "{name:<28} {:>10} {:>13.1} ms {:>13.1} ms {:>7.0}x",
            bytes.len(),
            cold.as_secs_f64() * 1e3,
            warm.as_secs_f64() * 1e3,
            cold.as_secs_f64() / warm.as_secs_f64()
        );
    }
    let _ = std::fs::remove_dir_all(&cache);
}
