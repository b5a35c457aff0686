//! Unit tests of the queue-length maths, one rule at a time.

use super::*;
use crate::scaler::{QueueDepth, Workload};

const NOW: u64 = 1_700_000_000_000;

/// A pool at `current` replicas in [min, max], target 5/replica, with one sample of
/// `(ready, reserved)` on one queue and no history.
fn input(current: u32, min: u32, max: u32, ready: u64, reserved: u64) -> ScalingInput {
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
        workload: Workload::default(),
        settings: "{}".into(),
    }
}

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
fn backlog_is_ready_plus_reserved_over_target() {
    let d = run(&input(2, 1, 20, 30, 7));
    assert_eq!(d.recommendation, 8);
    assert_eq!(d.replicas, 8);
    assert_eq!(
        d.reason,
        "backlog 37 (ready 30, reserved 7) over target 5/replica: 8 replicas"
    );
}

#[test]
fn sums_all_queues_of_the_latest_sample_only() {
    let mut i = input(1, 1, 20, 0, 0);
    i.samples = vec![
        Sample {
            at_ms: NOW - 2000,
            queues: vec![QueueDepth {
                name: "a".into(),
                ready: 1000,
                reserved: 0,
                oldest_wait_ms: None,
            }],
        },
        Sample {
            at_ms: NOW - 1000,
            queues: vec![
                QueueDepth {
                    name: "a".into(),
                    ready: 10,
                    reserved: 1,
                    oldest_wait_ms: None,
                },
                QueueDepth {
                    name: "b".into(),
                    ready: 4,
                    reserved: 5,
                    oldest_wait_ms: None,
                },
            ],
        },
    ];
    let d = run(&i);
    assert_eq!(d.recommendation, 4); // 20 / 5
    assert!(
        d.reason.starts_with("backlog 20 (ready 14, reserved 6)"),
        "{}",
        d.reason
    );
}

#[test]
fn latest_sample_is_the_newest_then_the_last() {
    let sample = |at_ms, ready| Sample {
        at_ms,
        queues: vec![QueueDepth {
            name: "celery".into(),
            ready,
            reserved: 0,
            oldest_wait_ms: None,
        }],
    };
    // Out of order: the newest wins.
    let b = Backlog::latest(&[sample(NOW, 7), sample(NOW - 1000, 3)]).unwrap();
    assert_eq!(b.total(), 7);
    // Same time: the last wins.
    let b = Backlog::latest(&[sample(NOW, 7), sample(NOW, 9)]).unwrap();
    assert_eq!(b.total(), 9);
}

#[test]
fn within_tolerance_keeps_current() {
    // 19 tasks on 4 replicas: 4.75/replica, 5% under the target of 5.
    let d = run(&input(4, 1, 20, 19, 0));
    assert_eq!(d.replicas, 4);
    assert_eq!(d.recommendation, 4);
    assert_eq!(
        d.reason,
        "backlog 19 (ready 19, reserved 0) is 4.75/replica, within 10% tolerance of target 5: keep 4"
    );
    // At the 10% edge, in the HPA's floating point: 22 on 4 for 5 is a ratio of 1.1, and
    // |1 - 1.1| is 0.10000000000000009 > 0.1, so the HPA scales (to 5); 18 on 4 is 0.9, and
    // |1 - 0.9| is 0.09999999999999998, so it keeps 4.
    assert_eq!(run(&input(4, 1, 20, 22, 0)).replicas, 5);
    assert_eq!(run(&input(4, 1, 20, 18, 0)).replicas, 4);
}

#[test]
fn outside_tolerance_scales() {
    // 23 tasks on 4 replicas: 5.75/replica, 15% over.
    let d = run(&input(4, 1, 20, 23, 0));
    assert_eq!(d.recommendation, 5);
    assert_eq!(d.replicas, 5);
}

#[test]
fn tolerance_is_a_setting() {
    let mut i = input(4, 1, 20, 23, 0);
    i.settings = r#"{"tolerance": 0.2}"#.into();
    assert_eq!(run(&i).replicas, 4);
    i.settings = r#"{"tolerance": -1}"#.into();
    assert_eq!(
        plugin(i).unwrap_err(),
        "settings.tolerance: must be a number >= 0, got -1"
    );
}

#[test]
fn scales_to_zero_only_when_queue_and_reserved_are_both_zero() {
    let d = run(&input(3, 0, 10, 0, 0));
    assert_eq!(d.recommendation, 0);
    // Scale-down from 3 to 0 is held by the default 300 s window only if history says
    // so; with no history it goes straight to 0.
    assert_eq!(d.replicas, 0);
    assert_eq!(
        d.reason,
        "backlog 0 (ready 0, reserved 0): no queued or reserved tasks: 0 replicas"
    );
    // One reserved task (a worker is busy with it): not zero.
    let d = run(&input(3, 0, 10, 0, 1));
    assert_eq!(d.recommendation, 1);
    assert_eq!(d.replicas, 1);
    // One ready task: not zero either.
    assert_eq!(run(&input(3, 0, 10, 1, 0)).replicas, 1);
}

#[test]
fn empty_backlog_goes_to_min_replicas() {
    let d = run(&input(3, 2, 10, 0, 0));
    // The raw recommendation, as the HPA records it, is 0; the pool runs min-replicas.
    assert_eq!(d.recommendation, 0);
    assert_eq!(d.replicas, 2);
    assert!(
        d.reason.ends_with("; raised to min-replicas 2"),
        "{}",
        d.reason
    );
}

#[test]
fn from_zero_replicas() {
    let d = run(&input(0, 0, 10, 12, 0));
    assert_eq!(d.recommendation, 3);
    assert_eq!(d.replicas, 3);
    // A single task wakes one worker, however high the target.
    let mut i = input(0, 0, 10, 1, 0);
    i.target_per_replica = 1e12;
    assert_eq!(run(&i).replicas, 1);
}

#[test]
fn waking_from_zero_is_never_held_by_scale_up_stabilization() {
    let mut i = with_history(input(0, 0, 10, 12, 0), &[(10, 0)]);
    i.settings = r#"{"scaleUpStabilizationSeconds": 60}"#.into();
    let d = run(&i);
    assert_eq!(d.recommendation, 3);
    assert_eq!(d.replicas, 1);
    assert!(d.reason.ends_with("; waking from zero: 1"), "{}", d.reason);
}

#[test]
fn clamps_to_max_and_min() {
    let d = run(&input(2, 1, 6, 100, 0));
    assert_eq!(
        d.recommendation, 20,
        "the raw recommendation is not clamped"
    );
    assert_eq!(d.replicas, 6);
    assert!(
        d.reason.ends_with("; capped at max-replicas 6"),
        "{}",
        d.reason
    );
    let d = run(&input(2, 3, 6, 5, 0));
    assert_eq!(d.recommendation, 1);
    assert_eq!(d.replicas, 3);
    assert!(
        d.reason.ends_with("; raised to min-replicas 3"),
        "{}",
        d.reason
    );
}

#[test]
fn exact_divisions_do_not_round_up() {
    let mut i = input(1, 0, 100, 3, 0);
    i.target_per_replica = 0.1;
    assert_eq!(run(&i).recommendation, 30);
    let mut i = input(1, 0, 100, 31, 0);
    i.target_per_replica = 0.1;
    assert_eq!(run(&i).recommendation, 310);
    assert_eq!(run(&i).replicas, 100);
}

#[test]
fn scale_down_held_by_the_window() {
    // Backlog says 2, but 6 was recommended 100 s ago: hold at 6.
    let i = with_history(input(6, 1, 10, 10, 0), &[(400, 9), (100, 6), (50, 4)]);
    let d = run(&i);
    assert_eq!(d.recommendation, 2);
    assert_eq!(d.replicas, 6);
    assert!(
        d.reason
            .ends_with("; scale-down to 2 held by the 300s stabilization window: 6"),
        "{}",
        d.reason
    );
}

#[test]
fn scale_down_partly_held() {
    // Highest in the window is 4, current 6: go down to 4, not 2.
    let i = with_history(input(6, 1, 10, 10, 0), &[(400, 9), (50, 4)]);
    let d = run(&i);
    assert_eq!(d.replicas, 4);
}

#[test]
fn scale_down_after_the_window() {
    // The 9 is 400 s old, outside the 300 s window: scale down to 2.
    let i = with_history(input(6, 1, 10, 10, 0), &[(400, 9), (301, 8)]);
    let d = run(&i);
    assert_eq!(d.replicas, 2);
    assert_eq!(
        d.reason,
        "backlog 10 (ready 10, reserved 0) over target 5/replica: 2 replicas"
    );
}

#[test]
fn scale_down_window_never_scales_up() {
    // A high recommendation in the window does not push current (3) up when the raw
    // recommendation (2) is below it: keep 3.
    let i = with_history(input(3, 1, 10, 10, 0), &[(100, 9)]);
    assert_eq!(run(&i).replicas, 3);
}

#[test]
fn scale_down_window_is_a_setting() {
    let mut i = with_history(input(6, 1, 10, 10, 0), &[(100, 6)]);
    i.settings = r#"{"scaleDownStabilizationSeconds": 60}"#.into();
    assert_eq!(run(&i).replicas, 2);
    i.settings = r#"{"scaleDownStabilizationSeconds": 0}"#.into();
    assert_eq!(run(&i).replicas, 2);
}

#[test]
fn scale_up_is_immediate_by_default() {
    let i = with_history(input(2, 1, 10, 40, 0), &[(10, 2)]);
    let d = run(&i);
    assert_eq!(d.replicas, 8);
}

#[test]
fn scale_up_held_by_its_window() {
    // Lowest in the 120 s window is 5: scale up to 5 only.
    let mut i = with_history(input(2, 1, 10, 40, 0), &[(200, 1), (100, 5), (10, 7)]);
    i.settings = r#"{"scaleUpStabilizationSeconds": 120}"#.into();
    let d = run(&i);
    assert_eq!(d.recommendation, 8);
    assert_eq!(d.replicas, 5);
    assert!(
        d.reason
            .ends_with("; scale-up to 8 held by the 120s stabilization window: 5"),
        "{}",
        d.reason
    );
    // Lowest in the window at or below current: keep current.
    let mut i = with_history(input(2, 1, 10, 40, 0), &[(100, 2)]);
    i.settings = r#"{"scaleUpStabilizationSeconds": 120}"#.into();
    assert_eq!(run(&i).replicas, 2);
}

#[test]
fn stabilized_value_is_clamped_to_new_bounds() {
    // 9 in the window, but max-replicas is now 5.
    let i = with_history(input(7, 1, 5, 10, 0), &[(100, 9)]);
    assert_eq!(run(&i).replicas, 5);
}

#[test]
fn errors() {
    let mut i = input(1, 1, 10, 1, 0);
    i.target_per_replica = 0.0;
    assert_eq!(
        plugin(i.clone()).unwrap_err(),
        "target-per-replica must be a number above 0, got 0"
    );
    i.target_per_replica = -2.0;
    assert!(plugin(i.clone()).is_err());
    i.target_per_replica = f64::NAN;
    assert!(plugin(i.clone()).is_err());
    let mut i = input(1, 1, 10, 1, 0);
    i.samples.clear();
    assert_eq!(
        plugin(i).unwrap_err(),
        "no queue samples: the host must pass at least one"
    );
    let mut i = input(1, 1, 10, 1, 0);
    i.settings = r#"{"tolerence": 0.2}"#.into();
    assert!(
        plugin(i)
            .unwrap_err()
            .starts_with("settings.tolerence: unknown field `tolerence`")
    );
    let i = input(1, 5, 2, 1, 0);
    assert_eq!(
        plugin(i).unwrap_err(),
        "min-replicas 5 is above max-replicas 2"
    );
}

#[test]
fn large_backlogs_are_counted_exactly() {
    let mut i = input(1, 0, u32::MAX, 1_000_000_001, 0);
    i.target_per_replica = 200_000.0;
    assert_eq!(run(&i).recommendation, 5_001);
    let mut i = input(1, 0, u32::MAX, 1_999_999_999, 0);
    i.target_per_replica = 1.0;
    assert_eq!(run(&i).recommendation, 1_999_999_999);
}

#[test]
fn targets_are_read_in_milli_units_as_kubernetes_does() {
    assert_eq!(target_milli(5.0), 5000);
    assert_eq!(target_milli(0.1), 100);
    assert_eq!(target_milli(2.5), 2500);
    assert_eq!(target_milli(0.0005), 1, "rounded up to a milli-unit");
    assert_eq!(target_milli(1e-9), 1);
    assert_eq!(target_milli(200_000.0), 200_000_000);
}

#[test]
fn huge_backlogs_saturate() {
    let mut i = input(1, 0, u32::MAX, u64::MAX, u64::MAX);
    i.target_per_replica = 1e-300;
    let d = run(&i);
    assert_eq!(d.recommendation, u32::MAX);
}
