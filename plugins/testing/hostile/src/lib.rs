//! `hostile`: a test fixture for the host's sandbox. ONE component that exports all three
//! interfaces of `celery:operator@0.2.0` and misbehaves on demand, so the host's tests can
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
//! | `sleep` | sleeps 2 s (a clock pollable), then as `ok` | same | same |
//! | `sleep-forever` | sleeps `Duration::MAX`, then as `ok` | same | same |
//! | `clock` | — | — | reason: the wall and monotonic clocks it reads |
//! | `random` | — | — | reason: a number from std's random hash keys |
//! | `state` | — | — | reason: what earlier calls left behind (`calls=1 data=fresh heap=fresh` in a fresh instance), then leaves its own marks |
//! | `bad-labels`, `bad-annotations`, `bad-label-values`, `bad-timestamp` | its objects with that metadata broken | an HPA of the pool with it broken | — |
//! | `huge-error` | an 8 MiB error message | same | same |
//! | `control-chars` | an error with ESC, CR, NUL, BEL, bidi overrides | same | a reason with them |
//! | `long-reason` | — | — | a 4 MiB reason |
//! | `other-target` | — | an HPA of another Deployment | — |
//! | `other-secret` | — | a ScaledObject whose TriggerAuthentication reads another Secret | — |
//! | `take-over` | — | an HPA named `foreign` (for the pool) | — |
//!
//! Any other mode is an error result naming it. Never load this component outside tests.

wit_bindgen::generate!({
    inline: "
        package test:hostile;

        world hostile {
            export celery:operator/shaper@0.2.0;
            export celery:operator/autoscaler@0.2.0;
            export celery:operator/scaler@0.2.0;
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
    /// Sleeps for 2 s.
    Sleep,
    /// Sleeps forever.
    SleepForever,
    /// Reads the clocks.
    Clock,
    /// Reads randomness.
    Random,
    /// Reports, then leaves, marks in its globals, data and heap.
    State,
    /// Objects whose metadata is broken in one of these ways.
    Broken(Broken),
    /// An 8 MiB error.
    HugeError,
    /// Terminal control characters.
    ControlChars,
    /// A 4 MiB reason.
    LongReason,
    /// An HPA of another Deployment.
    OtherTarget,
    /// A TriggerAuthentication reading another Secret.
    OtherSecret,
    /// An HPA named `foreign`.
    TakeOver,
}

/// Ways to break an object's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broken {
    /// `labels` is a string.
    Labels,
    /// `annotations` is a number.
    Annotations,
    /// Label values are not strings.
    LabelValues,
    /// `creationTimestamp` is not a time.
    Timestamp,
}

impl Broken {
    fn apply(self, object: &mut serde_json::Value) {
        let meta = &mut object["metadata"];
        match self {
            Broken::Labels => meta["labels"] = "app=evil".into(),
            Broken::Annotations => meta["annotations"] = 42.into(),
            Broken::LabelValues => meta["labels"] = serde_json::json!({"a": 1, "b": [true]}),
            Broken::Timestamp => meta["creationTimestamp"] = "yesterday".into(),
        }
    }
}

/// Calls this instance has answered (zero in a fresh one: `.bss`).
static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
/// Two pages of initialised data (`.data`), overwritten by every `state` call.
static DATA: std::sync::Mutex<[u8; 8192]> = std::sync::Mutex::new([7; 8192]);
/// Bytes of the heap block `state` allocates and marks.
const HEAP_BLOCK: usize = 256 << 10;

/// What earlier calls of this instance left in its globals, data and heap, then leaves its
/// own: a fresh instance per call sees `calls=1 data=fresh heap=fresh` every time.
fn state() -> String {
    let calls = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    let data = {
        let mut data = DATA.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = data.iter().all(|b| *b == 7);
        data.fill(9);
        if fresh { "fresh" } else { "dirty" }
    };
    // A fresh heap has never held the mark: the allocator's block comes from memory it got
    // from `memory.grow` (`alloc`, not `alloc_zeroed`: nothing clears it in between).
    let layout = std::alloc::Layout::from_size_align(HEAP_BLOCK, 8).expect("layout");
    // SAFETY: a valid layout; the block is read as bytes (a probe of what memory holds, on
    // purpose), then written, and never freed.
    let heap = unsafe {
        let block = std::alloc::alloc(layout);
        if block.is_null() {
            return format!("calls={calls} data={data} heap=none");
        }
        let dirty = (0..HEAP_BLOCK).any(|i| block.add(i).read_volatile() == 0xA5);
        block.write_bytes(0xA5, HEAP_BLOCK);
        if dirty { "dirty" } else { "fresh" }
    };
    format!("calls={calls} data={data} heap={heap}")
}

/// Size of the `huge-error` message.
pub const HUGE_ERROR_BYTES: usize = 8 << 20;
/// Size of the `long-reason` reason.
pub const LONG_REASON_BYTES: usize = 4 << 20;
/// What `control-chars` says.
pub const CONTROL_CHARS: &str = "\u{1b}[31mred\r\0\u{7}\u{202E}evil\nnext";

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
            "sleep" => Mode::Sleep,
            "sleep-forever" => Mode::SleepForever,
            "clock" => Mode::Clock,
            "random" => Mode::Random,
            "state" => Mode::State,
            "bad-labels" => Mode::Broken(Broken::Labels),
            "bad-annotations" => Mode::Broken(Broken::Annotations),
            "bad-label-values" => Mode::Broken(Broken::LabelValues),
            "bad-timestamp" => Mode::Broken(Broken::Timestamp),
            "huge-error" => Mode::HugeError,
            "control-chars" => Mode::ControlChars,
            "long-reason" => Mode::LongReason,
            "other-target" => Mode::OtherTarget,
            "other-secret" => Mode::OtherSecret,
            "take-over" => Mode::TakeOver,
            other => {
                return Err(format!(
                    "hostile: unknown mode {other:?} (see the component's documentation)"
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
        Mode::Sleep => std::thread::sleep(std::time::Duration::from_secs(2)),
        Mode::SleepForever => std::thread::sleep(std::time::Duration::MAX),
        _ => {}
    }
}

/// The errors every role answers the same way.
fn error_of(mode: Mode) -> Result<(), String> {
    match mode {
        Mode::HugeError => Err("E".repeat(HUGE_ERROR_BYTES)),
        Mode::ControlChars => Err(CONTROL_CHARS.to_string()),
        _ => Ok(()),
    }
}

/// An HPA of `deployment` named `name`.
fn hpa(name: &str, deployment: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment},
                 "minReplicas": 1, "maxReplicas": 3}
    })
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
        error_of(mode)?;
        Ok(match mode {
            Mode::Huge => vec![huge()],
            Mode::Garbage => vec!["{not json".into()],
            Mode::Broken(how) => input
                .objects
                .iter()
                .map(|o| {
                    let mut object: serde_json::Value = serde_json::from_str(o).unwrap_or_default();
                    how.apply(&mut object);
                    object.to_string()
                })
                .collect(),
            _ => input.objects,
        })
    }
}

impl autoscaler::Guest for Hostile {
    fn objects(input: autoscaler::PoolInput) -> Result<Vec<String>, String> {
        let mode = Mode::parse(&input.pool)?;
        misbehave(mode);
        error_of(mode)?;
        let deployment = &input.deployment;
        Ok(match mode {
            Mode::Huge => vec![huge()],
            Mode::Garbage => vec!["{not json".into()],
            Mode::Broken(how) => {
                let mut object = hpa(deployment, deployment);
                how.apply(&mut object);
                vec![object.to_string()]
            }
            Mode::OtherTarget => vec![hpa(deployment, "other-deployment").to_string()],
            Mode::TakeOver => vec![hpa("foreign", deployment).to_string()],
            Mode::OtherSecret => vec![
                serde_json::json!({
                    "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
                    "metadata": {"name": deployment},
                    "spec": {"scaleTargetRef": {"name": deployment},
                             "triggers": [{"type": "redis", "metadata": {"listName": "q"},
                                           "authenticationRef": {"name": deployment}}]}
                })
                .to_string(),
                serde_json::json!({
                    "apiVersion": "keda.sh/v1alpha1", "kind": "TriggerAuthentication",
                    "metadata": {"name": deployment},
                    "spec": {"secretTargetRef": [{"parameter": "password", "name": "other", "key": "password"}]}
                })
                .to_string(),
            ],
            _ => vec![],
        })
    }
}

impl scaler::Guest for Hostile {
    fn decide(input: scaler::ScalingInput) -> Result<scaler::Decision, String> {
        let mode = Mode::parse(&input.pool)?;
        misbehave(mode);
        let answer = |reason: String| scaler::Decision {
            replicas: input.current_replicas,
            recommendation: input.current_replicas,
            reason,
        };
        Ok(match mode {
            Mode::HugeError => return Err("E".repeat(HUGE_ERROR_BYTES)),
            Mode::ControlChars => answer(CONTROL_CHARS.into()),
            Mode::LongReason => answer("R".repeat(LONG_REASON_BYTES)),
            Mode::Clock => {
                let wall = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(u128::MAX);
                let start = std::time::Instant::now();
                answer(format!(
                    "wall={wall} elapsed={}",
                    start.elapsed().as_nanos()
                ))
            }
            Mode::State => answer(state()),
            Mode::Random => {
                use std::hash::BuildHasher;
                let n = std::collections::hash_map::RandomState::new().hash_one(1u8);
                answer(format!("random={n}"))
            }
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
            workload: scaler::Workload {
                window_seconds: None,
                completion_rate: None,
                arrival_rate: None,
                service_seconds: None,
                busy_fraction: None,
                concurrency: None,
                running: None,
                workers: None,
            },
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
