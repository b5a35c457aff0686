//! What a hostile plugin can cost the operator, per attack, with the production limits
//! (100 ms deadline, 64 MiB memory budget, 4 MiB output; compiles bounded at 10 s and
//! 512 MiB in a child process): `cargo bench -p celery-operator --bench hostile`.
//!
//! Prints, per attack, the longest call (or load) of 5 and this process's RSS growth.
//! `HOSTILE_UNBOUNDED=1` also compiles the compile bomb in process, without bounds, to show
//! what the sandbox saves.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use celery_operator::plugin::bindings::{autoscaler, scaler, shaper};
use celery_operator::plugin::{Compiler, Limits, Plugin, PluginError, Runtime, Sandbox};
use support::hostile;

fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        >> 10
}

fn scaling(pool: &str) -> scaler::ScalingInput {
    scaler::ScalingInput {
        pool: pool.into(),
        now_ms: 1_000_000,
        current_replicas: 1,
        min_replicas: 0,
        max_replicas: 10,
        target_per_replica: 5.0,
        samples: vec![scaler::Sample {
            at_ms: 1_000_000,
            queues: vec![],
        }],
        history: vec![],
        settings: "{}".into(),
        workload: scaler::Workload::default(),
    }
}

/// Runs `attack` 5 times; prints the longest run, the RSS growth and the outcome.
fn measure<T: std::fmt::Debug>(name: &str, mut attack: impl FnMut() -> Result<T, PluginError>) {
    let before = rss_mib();
    let mut longest = Duration::ZERO;
    let mut outcome = String::new();
    for _ in 0..5 {
        let start = Instant::now();
        let result = attack();
        longest = longest.max(start.elapsed());
        outcome = match result {
            Ok(v) => format!("ok {v:?}"),
            Err(e) => e.to_string(),
        };
    }
    let outcome: String = outcome.chars().take(90).collect();
    println!(
        "{name:<40} max {longest:>9.1?}  RSS +{:>4} MiB  {outcome}",
        rss_mib().saturating_sub(before)
    );
}

fn main() {
    let program = env!("CARGO_BIN_EXE_celery-operator");
    let sandbox = Sandbox {
        program: program.into(),
        timeout: Sandbox::DEFAULT_TIMEOUT,
        memory_bytes: Sandbox::DEFAULT_MEMORY_BYTES,
        cache: None,
    };
    let rt = Runtime::new(Limits::default(), Compiler::Sandboxed(sandbox));
    let fixture = std::fs::read(format!("{}/hostile.wasm", env!("CELERY_PLUGIN_DIR"))).unwrap();
    let hostile: std::sync::Arc<Plugin> = rt.load(&fixture).unwrap();
    println!("rss at start: {} MiB", rss_mib());

    for mode in [
        "sleep",
        "sleep-forever",
        "loop",
        "oom",
        "recurse",
        "huge",
        "huge-error",
    ] {
        measure(&format!("decide {mode}"), || {
            rt.decide(&hostile, &scaling(mode)).map(|d| d.reason.len())
        });
    }
    for mode in ["sleep", "huge-error", "control-chars"] {
        measure(&format!("objects {mode}"), || {
            let input = autoscaler::PoolInput {
                celery: "{}".into(),
                pool: mode.into(),
                deployment: "d".into(),
                autoscaling: "{}".into(),
                queues: vec![],
                settings: "{}".into(),
            };
            rt.autoscaler_objects(&hostile, &input).map(|o| o.len())
        });
        measure(&format!("shape {mode}"), || {
            let input = shaper::ShapeInput {
                celery: "{}".into(),
                objects: vec![],
                settings: format!("{{\"mode\":\"{mode}\"}}"),
            };
            rt.shape(&hostile, &input).map(|o| o.len())
        });
    }
    let grower = rt.load(&hostile::memories(16, 1024, false)).unwrap();
    measure("decide: 16 memories x 64 MiB, written", || {
        rt.decide(&grower, &scaling("x")).map(|d| d.replicas)
    });
    let table = rt.load(&hostile::table_grow(1 << 27)).unwrap();
    measure("decide: table.grow 2^27 elements", || {
        rt.decide(&table, &scaling("x")).map(|d| d.replicas)
    });
    measure("load: 16 memories x 64 MiB at start", || {
        rt.load(&hostile::memories(16, 1024, true)).map(|p| p.size)
    });
    let bomb = hostile::compile_bomb(hostile::BOMB_FUNCTIONS);
    println!("compile bomb: {} KB", bomb.len() >> 10);
    measure("load: compile bomb (sandboxed)", || {
        rt.load(&bomb).map(|p| p.size)
    });
    measure("load: 20,000 foreign exports", || {
        rt.load(&hostile::many_exports(20_000)).map(|p| p.size)
    });
    if std::env::var_os("HOSTILE_UNBOUNDED").is_some() {
        let unbounded = Runtime::new(Limits::default(), Compiler::InProcess);
        let start = Instant::now();
        let result = unbounded.load(&bomb).map(|p| p.size);
        println!(
            "compile bomb in process, unbounded: {:?} in {:.1?}, RSS now {} MiB",
            result.map_err(|e| e.to_string()),
            start.elapsed(),
            rss_mib()
        );
    }
}
