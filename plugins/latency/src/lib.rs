//! `latency`: a scaler plugin that runs enough workers that no task waits in the queue
//! longer than `targetWaitSeconds`, by Little's law: `arrival rate × service time` worker
//! processes to keep up, plus `waiting × service time / target` to drain the backlog in
//! time, over the pool's `concurrency` processes per replica. It holds the pool while the
//! host has not measured those figures yet (and wakes a pool at zero for any task).
//!
//! The maths are the SDK's [`celery_operator_plugin_sdk::latency`] module (documented and
//! unit-tested there), so that other scalers can reuse them; this crate is the plugin
//! around them.
//!
//! Settings: `{"targetWaitSeconds": 30}` (required), and optionally `"tolerance": 0.1,
//! "scaleDownStabilizationSeconds": 300, "scaleUpStabilizationSeconds": 0`.

use celery_operator_plugin_sdk::latency::{Settings, decide};
use celery_operator_plugin_sdk::scaler::{Decision, Guest, ScalingInput};

/// The plugin.
pub struct Latency;

impl Guest for Latency {
    fn decide(input: ScalingInput) -> Result<Decision, String> {
        let settings = Settings::parse(&input.settings)?;
        decide(&input, &settings)
    }
}

celery_operator_plugin_sdk::export_scaler!(Latency);

#[cfg(test)]
mod tests {
    use super::*;
    use celery_operator_plugin_sdk::scaler::{QueueDepth, Recommendation, Sample, Workload};

    fn input(settings: &str) -> ScalingInput {
        ScalingInput {
            pool: "default".into(),
            now_ms: 1_000_000,
            current_replicas: 6,
            min_replicas: 0,
            max_replicas: 10,
            target_per_replica: 5.0,
            samples: vec![Sample {
                at_ms: 999_000,
                queues: vec![QueueDepth {
                    name: "celery".into(),
                    ready: 10,
                    reserved: 8,
                    oldest_wait_ms: Some(4_500),
                }],
            }],
            history: vec![Recommendation {
                at_ms: 900_000,
                replicas: 6,
            }],
            workload: Workload {
                window_seconds: Some(60.0),
                completion_rate: Some(4.0),
                arrival_rate: Some(4.0),
                service_seconds: Some(2.0),
                busy_fraction: Some(8.0 / 24.0),
                concurrency: Some(4),
                running: Some(8),
                workers: Some(6),
            },
            settings: settings.into(),
        }
    }

    #[test]
    fn defaults_hold_a_scale_down_for_300_seconds() {
        let d = Latency::decide(input(r#"{"targetWaitSeconds": 10}"#)).unwrap();
        // 4 x 2 + 10 x 2 / 10 = 10 processes: 3 replicas of 4.
        assert_eq!((d.recommendation, d.replicas), (3, 6));
        assert_eq!(
            d.reason,
            "arrivals 4.00/s x service 2.00 s + 10 waiting x 2.00 s / 10 s target \
             = 10.0 processes / 4 per replica: 3 replicas; oldest waiting task 4.5 s; \
             scale-down to 3 held by the 300s stabilization window: 6"
        );
    }

    #[test]
    fn settings_are_read() {
        let d = Latency::decide(input(
            r#"{"targetWaitSeconds": 10, "scaleDownStabilizationSeconds": 60}"#,
        ))
        .unwrap();
        assert_eq!((d.recommendation, d.replicas), (3, 3));
        // A tighter target: 8 + 10 x 2 / 1 = 28 processes, 7 replicas.
        let d = Latency::decide(input(r#"{"targetWaitSeconds": 1}"#)).unwrap();
        assert_eq!((d.recommendation, d.replicas), (7, 7));
    }

    #[test]
    fn holds_until_a_task_finishes() {
        let mut i = input(r#"{"targetWaitSeconds": 10}"#);
        i.workload.service_seconds = None;
        let d = Latency::decide(i).unwrap();
        assert_eq!((d.recommendation, d.replicas), (6, 6));
        assert_eq!(
            d.reason,
            "holding 6 replicas: no service time measured yet (no task finished in the window); \
             oldest waiting task 4.5 s"
        );
    }

    #[test]
    fn bad_settings_are_rejected_with_the_field_name() {
        let err = Latency::decide(input("{}")).unwrap_err();
        assert!(
            err.starts_with("settings.targetWaitSeconds: required: "),
            "{err}"
        );
        let err = Latency::decide(input(r#"{"targetWaitSeconds": "10s"}"#)).unwrap_err();
        assert_eq!(
            err,
            r#"settings.targetWaitSeconds: invalid type: string "10s", expected f64"#
        );
    }
}
