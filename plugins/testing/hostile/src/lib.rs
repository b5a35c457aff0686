//! `hostile`: a test fixture for the host's sandbox. ONE component that exports all three
//! interfaces of `celery:operator@0.1.0` and misbehaves on demand, so the host's tests can
//! check that each kind of misbehaviour is contained (time limit, memory limit, traps,
//! output-size limit, output validation) and reported.
//!
//! The mode is picked by the input: the scaler's and the autoscaler's `pool` field, and
//! the shaper's `settings` JSON (`{"mode": "..."}`, default `ok`).
//!
//! | mode | shaper | autoscaler | scaler |
//! |---|---|---|---|
//! | `ok` | objects unchanged | no objects | replicas = current-replicas, reason `ok` |
//! | `loop` | spins forever | same | same |
//! | `oom` | allocates and touches 1 MiB blocks forever | same | same |
//! | `panic` | panics (a trap, with `panic = "abort"`) | same | same |
//! | `recurse` | recurses without bound (stack overflow) | same | same |
//! | `huge` | returns one 64 MiB object | same | a 64 MiB reason |
//! | `garbage` | returns `["{not json"]` | same | replicas = `u32::MAX` |
//!
//! Any other mode is an error result naming it. Never load this component outside tests.

wit_bindgen::generate!({
    inline: "
        package test:hostile;

        world hostile {
            export celery:operator/shaper@0.1.0;
            export celery:operator/autoscaler@0.1.0;
            export celery:operator/scaler@0.1.0;
        }
    ",
    path: "../../../wit",
    world: "hostile",
});

use exports::celery::operator::{autoscaler, scaler, shaper};

/// The ways to misbehave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A valid, normal answer.
    Ok,
    /// An infinite loop the optimizer cannot remove.
    Loop,
    /// Unbounded allocation.
    Oom,
    /// `panic!`.
    Panic,
    /// Unbounded recursion.
    Recurse,
    /// A 64 MiB answer.
    Huge,
    /// A malformed answer.
    Garbage,
}

impl Mode {
    /// Parses a mode name.
    pub fn parse(name: &str) -> Result<Mode, String> {
        Ok(match name {
            "ok" => Mode::Ok,
            "loop" => Mode::Loop,
            "oom" => Mode::Oom,
            "panic" => Mode::Panic,
            "recurse" => Mode::Recurse,
            "huge" => Mode::Huge,
            "garbage" => Mode::Garbage,
            other => {
                return Err(format!(
                    "hostile: unknown mode {other:?} (ok, loop, oom, panic, recurse, huge, garbage)"
                ));
            }
        })
    }
}

/// Size of the `huge` answer.
pub const HUGE_BYTES: usize = 64 << 20;

/// Spins until a volatile read of `false` returns `true`, which it never does. A volatile
/// read is a side effect the optimizer must keep, so the loop stays.
fn spin() -> ! {
    let stop = false;
    loop {
        // SAFETY: reading a live local through a reference is always valid.
        if unsafe { std::ptr::read_volatile(&stop) } {
            break;
        }
    }
    unreachable!("the loop above never ends")
}

/// Allocates 1 MiB blocks and writes to every page of each, keeping them all, until the
/// allocator fails (an abort, so a trap).
fn exhaust_memory() -> ! {
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut block = vec![0u8; 1 << 20];
        for page in block.chunks_mut(4096) {
            page[0] = 1;
        }
        blocks.push(std::hint::black_box(block));
    }
}

/// Recurses without bound: each frame keeps a 1 KiB array alive across the call and uses
/// it afterwards, so this is neither a tail call nor a loop.
#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    let frame = std::hint::black_box([depth; 128]);
    let below = recurse(depth + 1);
    below.wrapping_add(frame.iter().sum::<u64>())
}

/// Runs the misbehaving modes (everything but `ok`, `huge` and `garbage`, which each
/// interface answers in its own way).
fn misbehave(mode: Mode) {
    match mode {
        Mode::Loop => spin(),
        Mode::Oom => exhaust_memory(),
        Mode::Panic => panic!("hostile plugin panicked on purpose"),
        Mode::Recurse => {
            std::hint::black_box(recurse(0));
        }
        Mode::Ok | Mode::Huge | Mode::Garbage => {}
    }
}

fn huge() -> String {
    "x".repeat(HUGE_BYTES)
}

/// The component.
pub struct Hostile;

impl shaper::Guest for Hostile {
    fn shape(input: shaper::ShapeInput) -> Result<Vec<String>, String> {
        let settings: serde_json::Value = serde_json::from_str(&input.settings)
            .map_err(|e| format!("settings: not valid JSON: {e}"))?;
        let mode = Mode::parse(settings["mode"].as_str().unwrap_or("ok"))?;
        misbehave(mode);
        Ok(match mode {
            Mode::Huge => vec![huge()],
            Mode::Garbage => vec!["{not json".into()],
            _ => input.objects,
        })
    }
}

impl autoscaler::Guest for Hostile {
    fn objects(input: autoscaler::PoolInput) -> Result<Vec<String>, String> {
        let mode = Mode::parse(&input.pool)?;
        misbehave(mode);
        Ok(match mode {
            Mode::Huge => vec![huge()],
            Mode::Garbage => vec!["{not json".into()],
            _ => vec![],
        })
    }
}

impl scaler::Guest for Hostile {
    fn decide(input: scaler::ScalingInput) -> Result<scaler::Decision, String> {
        let mode = Mode::parse(&input.pool)?;
        misbehave(mode);
        Ok(match mode {
            Mode::Huge => scaler::Decision {
                replicas: input.current_replicas,
                recommendation: input.current_replicas,
                reason: huge(),
            },
            Mode::Garbage => scaler::Decision {
                replicas: u32::MAX,
                recommendation: u32::MAX,
                reason: "garbage".into(),
            },
            _ => scaler::Decision {
                replicas: input.current_replicas,
                recommendation: input.current_replicas,
                reason: "ok".into(),
            },
        })
    }
}

// A native `cargo test` build cannot link the component model's export names.
#[cfg(target_arch = "wasm32")]
export!(Hostile);

#[cfg(test)]
mod tests {
    use super::*;
    use scaler::Guest as _;
    use shaper::Guest as _;

    fn scaling(pool: &str) -> scaler::ScalingInput {
        scaler::ScalingInput {
            pool: pool.into(),
            now_ms: 0,
            current_replicas: 3,
            min_replicas: 0,
            max_replicas: 10,
            target_per_replica: 5.0,
            samples: vec![],
            history: vec![],
            settings: "{}".into(),
        }
    }

    #[test]
    fn ok_garbage_and_huge_answers() {
        let d = Hostile::decide(scaling("ok")).unwrap();
        assert_eq!((d.replicas, d.reason.as_str()), (3, "ok"));
        assert_eq!(
            Hostile::decide(scaling("garbage")).unwrap().replicas,
            u32::MAX
        );
        assert_eq!(
            Hostile::decide(scaling("huge")).unwrap().reason.len(),
            HUGE_BYTES
        );
        let objects = vec!["{}".to_string()];
        let shaped = Hostile::shape(shaper::ShapeInput {
            celery: "{}".into(),
            objects: objects.clone(),
            settings: r#"{"mode":"garbage"}"#.into(),
        })
        .unwrap();
        assert_eq!(shaped, ["{not json"]);
        let shaped = Hostile::shape(shaper::ShapeInput {
            celery: "{}".into(),
            objects: objects.clone(),
            settings: "{}".into(),
        })
        .unwrap();
        assert_eq!(shaped, objects);
    }

    #[test]
    fn unknown_mode_is_an_error() {
        assert!(
            Hostile::decide(scaling("nice"))
                .unwrap_err()
                .starts_with("hostile: unknown mode \"nice\"")
        );
    }

    #[test]
    #[should_panic(expected = "hostile plugin panicked on purpose")]
    fn panics() {
        let _ = Hostile::decide(scaling("panic"));
    }
}
