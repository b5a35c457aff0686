//! Unit tests of the latency maths, one rule at a time.

use super::*;
use crate::scaler::{QueueDepth, Recommendation, Workload};

const NOW: u64 = 1_700_000_000_000;

/// A pool at `current` replicas in [min, max], target wait 10 s, with one sample of
/// `(ready, reserved)` on one queue, no history, and a workload of `arrival_rate` tasks/s,
/// `service_seconds` each, on `concurrency` processes per replica.
fn input(
    current: u32,
    (min, max): (u32, u32),
    (ready, reserved): (u64, u64),
    (arrival_rate, service_seconds, concurrency): (Option<f64>, Option<f64>, Option<u32>),
) -> ScalingInput {
    ScalingInput {
        pool: "default".into(),
        now_ms: NOW,
        current_replicas: current,
        min_replicas: min,
        max_replicas: max,
        target_per_replica: 5.0,
        samples: vec![Sample {
            at_ms: NOW - 1000,
            queues: vec![QueueDepth {
                name: "celery".into(),
                ready,
                reserved,
                oldest_wait_ms: None,
            }],
        }],
        history: vec![],
        workload: Workload {
            window_seconds: Some(60.0),
            arrival_rate,
            service_seconds,
            concurrency,
            ..Workload::unknown()
        },
        settings: r#"{"targetWaitSeconds": 10}"#.into(),
    }
}

/// λ = 4/s, S = 2 s, c = 4: 8 processes to keep up.
const STEADY: (Option<f64>, Option<f64>, Option<u32>) = (Some(4.0), Some(2.0), Some(4));

fn with_history(mut input: ScalingInput, history: &[(u64, u32)]) -> ScalingInput {
    input.history = history
        .iter()
        .map(|&(seconds_ago, replicas)| Recommendation {
            at_ms: NOW - seconds_ago * 1000,
            replicas,
        })
        .collect();
    input
}

/// What the plugin does: parse the settings, then decide.
fn plugin(input: ScalingInput) -> Result<Decision, String> {
    decide(&input, &Settings::parse(&input.settings)?)
}

fn run(input: &ScalingInput) -> Decision {
    plugin(input.clone()).unwrap()
}

#[test]
fn steady_state_is_arrivals_times_service_time() {
    let d = run(&input(1, (0, 20), (0, 6), STEADY));
    assert_eq!((d.recommendation, d.replicas), (2, 2));
    assert_eq!(
        d.reason,
        "arrivals 4.00/s x service 2.00 s + 0 waiting x 2.00 s / 10 s target \
         = 8.0 processes / 4 per replica: 2 replicas"
    );
    assert_eq!(processes_needed(4.0, 2.0, 0, 10.0), 8.0);
}

#[test]
fn waiting_tasks_add_the_drain_term() {
    // 8 + 12 x 2 / 10 = 10.4 processes: 2.6 replicas of 4, so 3.
    let d = run(&input(2, (0, 20), (12, 8), STEADY));
    assert_eq!((d.recommendation, d.replicas), (3, 3));
    assert_eq!(
        d.reason,
        "arrivals 4.00/s x service 2.00 s + 12 waiting x 2.00 s / 10 s target \
         = 10.4 processes / 4 per replica: 3 replicas"
    );
    // Nothing arriving, 100 waiting of 3 s each to drain within 30 s: 10 processes.
    let mut i = input(1, (0, 20), (100, 0), (Some(0.0), Some(3.0), Some(2)));
    i.settings = r#"{"targetWaitSeconds": 30}"#.into();
    assert_eq!(run(&i).recommendation, 5);
    // A tighter target needs more: 100 x 3 / 10 = 30 processes, 15 replicas.
    i.settings = r#"{"targetWaitSeconds": 10}"#.into();
    assert_eq!(run(&i).recommendation, 15);
}

#[test]
fn only_ready_tasks_of_the_latest_sample_wait() {
    let mut i = input(2, (0, 20), (0, 0), STEADY);
    i.samples = vec![
        Sample {
            at_ms: NOW - 2000,
            queues: vec![QueueDepth {
                name: "a".into(),
                ready: 1000,
                reserved: 0,
                oldest_wait_ms: Some(99_000),
            }],
        },
        Sample {
            at_ms: NOW - 1000,
            queues: vec![
                QueueDepth {
                    name: "a".into(),
                    ready: 10,
                    reserved: 500,
                    oldest_wait_ms: None,
                },
                QueueDepth {
                    name: "b".into(),
                    ready: 10,
                    reserved: 500,
                    oldest_wait_ms: None,
                },
            ],
        },
    ];
    // 8 + 20 x 2 / 10 = 12 processes: 3 replicas. Reserved tasks are running (they are in
    // λ·S), and the old sample's 1000 do not count, nor its oldest wait.
    let d = run(&i);
    assert_eq!(d.recommendation, 3);
    assert!(d.reason.contains("+ 20 waiting x"), "{}", d.reason);
    assert!(!d.reason.contains("oldest"), "{}", d.reason);
}

#[test]
fn float_noise_does_not_add_a_replica() {
    // 1.1 x 6 + 2 x 6 / 30 is 7.000000000000001 in floating point: 7 processes.
    let mut i = input(3, (0, 20), (2, 0), (Some(1.1), Some(6.0), Some(7)));
    i.settings = r#"{"targetWaitSeconds": 30}"#.into();
    assert!(processes_needed(1.1, 6.0, 2, 30.0) > 7.0);
    assert_eq!(run(&i).recommendation, 1);
    i.workload.concurrency = Some(1);
    assert_eq!(run(&i).recommendation, 7);
}

#[test]
fn within_tolerance_keeps_current() {
    // 8 + 1 x 2 / 10 = 8.2 processes on 2 x 4: 2.5% over, within 10%.
    let d = run(&input(2, (0, 20), (1, 0), STEADY));
    assert_eq!((d.recommendation, d.replicas), (2, 2));
    assert_eq!(
        d.reason,
        "arrivals 4.00/s x service 2.00 s + 1 waiting x 2.00 s / 10 s target \
         = 8.2 processes / 4 per replica = 2.05 replicas, within 10% tolerance of 2: keep 2"
    );
    // Without tolerance: 2.05 replicas is 3.
    let mut i = input(2, (0, 20), (1, 0), STEADY);
    i.settings = r#"{"targetWaitSeconds": 10, "tolerance": 0}"#.into();
    assert_eq!(run(&i).recommendation, 3);
    // Outside it: 8 + 5 x 2 / 10 = 9 processes is 12.5% over 8.
    assert_eq!(run(&input(2, (0, 20), (5, 0), STEADY)).recommendation, 3);
}

#[test]
fn holds_without_concurrency() {
    for concurrency in [None, Some(0)] {
        let d = run(&input(
            3,
            (0, 20),
            (50, 4),
            (Some(4.0), Some(2.0), concurrency),
        ));
        assert_eq!((d.recommendation, d.replicas), (3, 3));
        assert_eq!(
            d.reason,
            "holding 3 replicas: worker processes per replica unknown: set the pool's \
             concurrency"
        );
    }
}

#[test]
fn holds_without_arrival_rate() {
    let d = run(&input(3, (0, 20), (50, 4), (None, Some(2.0), Some(4))));
    assert_eq!((d.recommendation, d.replicas), (3, 3));
    assert_eq!(
        d.reason,
        "holding 3 replicas: no arrival rate measured yet (no worker heartbeat in the window)"
    );
}

#[test]
fn holds_without_service_time() {
    let d = run(&input(3, (0, 20), (50, 4), (Some(4.0), None, Some(4))));
    assert_eq!((d.recommendation, d.replicas), (3, 3));
    assert_eq!(
        d.reason,
        "holding 3 replicas: no service time measured yet (no task finished in the window)"
    );
}

#[test]
fn hold_names_everything_missing_and_is_clamped() {
    let d = run(&input(1, (0, 20), (5, 0), (None, None, None)));
    assert_eq!((d.recommendation, d.replicas), (1, 1));
    assert_eq!(
        d.reason,
        "holding 1 replica: worker processes per replica unknown: set the pool's concurrency; \
         no arrival rate measured yet (no worker heartbeat in the window); \
         no service time measured yet (no task finished in the window)"
    );
    // The bounds moved under a holding pool: the clamp still applies.
    let d = run(&input(12, (0, 10), (50, 0), (None, Some(2.0), Some(4))));
    assert_eq!((d.recommendation, d.replicas), (12, 10));
    assert!(
        d.reason.ends_with("; capped at max-replicas 10"),
        "{}",
        d.reason
    );
    let d = run(&input(1, (2, 10), (50, 0), (None, Some(2.0), Some(4))));
    assert_eq!((d.recommendation, d.replicas), (1, 2));
}

#[test]
fn figures_that_are_not_numbers_are_unknown() {
    let d = run(&input(
        3,
        (0, 20),
        (50, 4),
        (Some(f64::NAN), Some(2.0), Some(4)),
    ));
    assert_eq!(d.replicas, 3);
    assert!(d.reason.contains("no arrival rate"), "{}", d.reason);
    let d = run(&input(
        3,
        (0, 20),
        (50, 4),
        (Some(4.0), Some(f64::INFINITY), Some(4)),
    ));
    assert!(d.reason.contains("no service time"), "{}", d.reason);
    // A negative arrival rate (a backlog shrinking faster than measured) counts as 0:
    // 0 + 10 x 2 / 10 = 2 processes, 1 replica.
    let d = run(&input(
        3,
        (0, 20),
        (10, 0),
        (Some(-1.0), Some(2.0), Some(4)),
    ));
    assert_eq!(d.recommendation, 1);
    assert!(d.reason.starts_with("arrivals 0.00/s"), "{}", d.reason);
}

#[test]
fn wakes_from_zero_without_figures() {
    let d = run(&input(0, (0, 20), (5, 0), (None, None, None)));
    assert_eq!((d.recommendation, d.replicas), (1, 1));
    assert_eq!(
        d.reason,
        "waking from zero: 5 waiting and 0 reserved tasks, no worker to measure the workload \
         yet: 1 replica"
    );
    // Reserved work counts too, and min-replicas is the floor.
    let d = run(&input(0, (3, 20), (0, 1), (None, None, Some(4))));
    assert_eq!((d.recommendation, d.replicas), (3, 3));
    // Not even a scale-up window holds it back.
    let mut i = with_history(input(0, (0, 20), (5, 0), (None, None, None)), &[(10, 0)]);
    i.settings = r#"{"targetWaitSeconds": 10, "scaleUpStabilizationSeconds": 60}"#.into();
    let d = run(&i);
    assert_eq!((d.recommendation, d.replicas), (1, 1));
    assert!(d.reason.ends_with("; waking from zero: 1"), "{}", d.reason);
}

#[test]
fn an_idle_pool_at_zero_stays_there() {
    let d = run(&input(0, (0, 20), (0, 0), (None, None, None)));
    assert_eq!((d.recommendation, d.replicas), (0, 0));
    assert_eq!(
        d.reason,
        "no task arrives, waits or runs: 0 replicas needed"
    );
}

#[test]
fn a_pool_gone_idle_is_not_held_for_want_of_a_service_time() {
    // No task finished in the window (so no service time), nothing waits or runs, nothing
    // arrives: 0 needed; the scale-down window still applies.
    let mut i = input(3, (1, 20), (0, 0), (Some(0.0), None, Some(4)));
    i.workload.running = Some(0);
    let d = run(&i);
    assert_eq!(d.recommendation, 0);
    assert_eq!(d.replicas, 1, "{}", d.reason);
    // A task still running (not acknowledged early, so not in the broker): not idle.
    i.workload.running = Some(1);
    let d = run(&i);
    assert_eq!((d.recommendation, d.replicas), (3, 3), "{}", d.reason);
}

#[test]
fn from_zero_with_figures_computes() {
    let d = run(&input(0, (0, 20), (12, 0), STEADY));
    assert_eq!((d.recommendation, d.replicas), (3, 3));
}

#[test]
fn idle_pool_scales_to_zero_only_without_tasks() {
    // Nothing arriving, waiting or running.
    let d = run(&input(2, (0, 20), (0, 0), (Some(0.0), Some(2.0), Some(4))));
    assert_eq!((d.recommendation, d.replicas), (0, 0));
    assert_eq!(
        d.reason,
        "arrivals 0.00/s x service 2.00 s + 0 waiting x 2.00 s / 10 s target \
         = 0.0 processes / 4 per replica: 0 replicas"
    );
    // Reserved tasks still running: at least 1.
    let d = run(&input(2, (0, 20), (0, 3), (Some(0.0), Some(2.0), Some(4))));
    assert_eq!((d.recommendation, d.replicas), (1, 1));
    assert!(
        d.reason
            .ends_with(": 0 replicas; 0 waiting and 3 reserved tasks: at least 1 replica"),
        "{}",
        d.reason
    );
}

#[test]
fn scale_down_held_by_the_window() {
    // Steady state needs 2; 5 was recommended 100 s ago: hold at 5.
    let i = with_history(input(5, (0, 20), (0, 0), STEADY), &[(400, 9), (100, 5)]);
    let d = run(&i);
    assert_eq!((d.recommendation, d.replicas), (2, 5));
    assert!(
        d.reason
            .ends_with(": 2 replicas; scale-down to 2 held by the 300s stabilization window: 5"),
        "{}",
        d.reason
    );
    // Partly: the highest in the window is 4.
    let i = with_history(input(5, (0, 20), (0, 0), STEADY), &[(400, 9), (50, 4)]);
    assert_eq!(run(&i).replicas, 4);
    // A shorter window has let go.
    let mut i = with_history(input(5, (0, 20), (0, 0), STEADY), &[(100, 5)]);
    i.settings = r#"{"targetWaitSeconds": 10, "scaleDownStabilizationSeconds": 60}"#.into();
    assert_eq!(run(&i).replicas, 2);
}

#[test]
fn scale_up_held_by_its_window() {
    // 8 + 40 x 2 / 10 = 16 processes: 4 replicas; the lowest in 120 s is 3.
    let mut i = with_history(input(1, (0, 20), (40, 0), STEADY), &[(200, 1), (100, 3)]);
    i.settings = r#"{"targetWaitSeconds": 10, "scaleUpStabilizationSeconds": 120}"#.into();
    let d = run(&i);
    assert_eq!((d.recommendation, d.replicas), (4, 3));
    assert!(
        d.reason
            .ends_with("; scale-up to 4 held by the 120s stabilization window: 3"),
        "{}",
        d.reason
    );
    // By default, at once.
    let i = with_history(input(1, (0, 20), (40, 0), STEADY), &[(100, 1)]);
    assert_eq!(run(&i).replicas, 4);
}

#[test]
fn clamps_to_max_and_min() {
    // 8 + 460 x 2 / 10 = 100 processes: 25 replicas, capped at 10.
    let d = run(&input(2, (1, 10), (460, 0), STEADY));
    assert_eq!(
        d.recommendation, 25,
        "the raw recommendation is not clamped"
    );
    assert_eq!(d.replicas, 10);
    assert!(
        d.reason.ends_with("; capped at max-replicas 10"),
        "{}",
        d.reason
    );
    let d = run(&input(1, (4, 10), (0, 0), STEADY));
    assert_eq!((d.recommendation, d.replicas), (2, 4));
    assert!(
        d.reason.ends_with("; raised to min-replicas 4"),
        "{}",
        d.reason
    );
}

#[test]
fn huge_figures_saturate() {
    let d = run(&input(
        1,
        (0, u32::MAX),
        (u64::MAX, 0),
        (Some(1e300), Some(1e300), Some(1)),
    ));
    assert_eq!(d.recommendation, u32::MAX);
}

#[test]
fn reports_the_oldest_waiting_task() {
    let mut i = input(1, (0, 20), (0, 6), STEADY);
    i.samples[0].queues = vec![
        QueueDepth {
            name: "a".into(),
            ready: 1,
            reserved: 0,
            oldest_wait_ms: Some(4_000),
        },
        QueueDepth {
            name: "b".into(),
            ready: 1,
            reserved: 0,
            oldest_wait_ms: Some(12_345),
        },
        QueueDepth {
            name: "c".into(),
            ready: 0,
            reserved: 0,
            oldest_wait_ms: None,
        },
    ];
    let d = run(&i);
    assert_eq!(d.recommendation, 3, "informational only: 8.4 processes");
    assert!(
        d.reason
            .ends_with(": 3 replicas; oldest waiting task 12.3 s"),
        "{}",
        d.reason
    );
    // On a hold too.
    i.workload.service_seconds = None;
    let d = run(&i);
    assert!(
        d.reason.ends_with("; oldest waiting task 12.3 s"),
        "{}",
        d.reason
    );
}

#[test]
fn settings_defaults_and_errors() {
    assert_eq!(
        Settings::parse(r#"{"targetWaitSeconds": 30}"#).unwrap(),
        Settings {
            target_wait_seconds: 30.0,
            tolerance: 0.1,
            scale_down_stabilization_seconds: 300,
            scale_up_stabilization_seconds: 0,
        }
    );
    assert_eq!(
        Settings::parse(r#"{"targetWaitSeconds": 2.5}"#).unwrap(),
        Settings::new(2.5)
    );
    for missing in [
        "",
        "{}",
        r#"{"tolerance": 0.2}"#,
        r#"{"targetWaitSeconds": null}"#,
    ] {
        let err = Settings::parse(missing).unwrap_err();
        assert!(
            err.starts_with("settings.targetWaitSeconds: required: "),
            "{missing}: {err}"
        );
    }
    assert_eq!(
        Settings::parse(r#"{"targetWaitSeconds": 0}"#).unwrap_err(),
        "settings.targetWaitSeconds: must be a number above 0, got 0"
    );
    assert_eq!(
        Settings::parse(r#"{"targetWaitSeconds": -5}"#).unwrap_err(),
        "settings.targetWaitSeconds: must be a number above 0, got -5"
    );
    assert_eq!(
        Settings::parse(r#"{"targetWaitSeconds": "30s"}"#).unwrap_err(),
        r#"settings.targetWaitSeconds: invalid type: string "30s", expected f64"#
    );
    assert_eq!(
        Settings::parse(r#"{"targetWaitSeconds": 30, "tolerance": -1}"#).unwrap_err(),
        "settings.tolerance: must be a number >= 0, got -1"
    );
    let err = Settings::parse(r#"{"targetWaitSecond": 30}"#).unwrap_err();
    assert!(
        err.starts_with("settings.targetWaitSecond: unknown field `targetWaitSecond`"),
        "{err}"
    );
    let err = Settings::parse(r#"{"targetWaitSeconds": 30, "targetPerReplica": 5}"#).unwrap_err();
    assert!(
        err.starts_with("settings.targetPerReplica: unknown field"),
        "{err}"
    );
}

#[test]
fn input_errors() {
    let mut i = input(1, (0, 10), (1, 0), STEADY);
    i.samples.clear();
    assert_eq!(
        plugin(i).unwrap_err(),
        "no queue samples: the host must pass at least one"
    );
    assert_eq!(
        plugin(input(1, (5, 2), (1, 0), STEADY)).unwrap_err(),
        "min-replicas 5 is above max-replicas 2"
    );
    let mut i = input(1, (0, 10), (1, 0), STEADY);
    i.settings = "{}".into();
    assert!(
        plugin(i)
            .unwrap_err()
            .starts_with("settings.targetWaitSeconds: required")
    );
}
