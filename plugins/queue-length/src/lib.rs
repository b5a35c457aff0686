//! `queue-length`: a scaler plugin that runs the Kubernetes HPA's algorithm on a Celery
//! pool's backlog (ready + reserved tasks), with the HPA's tolerance and stabilization
//! windows.
//!
//! The maths are the SDK's [`celery_operator_plugin_sdk::queue_length`] module (documented
//! and unit-tested there), so that other scalers can reuse them; this crate is the plugin
//! around them.
//!
//! Settings (all optional): `{"tolerance": 0.1, "scaleDownStabilizationSeconds": 300,
//! "scaleUpStabilizationSeconds": 0}`.

use celery_operator_plugin_sdk::queue_length::{Settings, decide};
use celery_operator_plugin_sdk::scaler::{Decision, Guest, ScalingInput};

/// The plugin.
pub struct QueueLength;

impl Guest for QueueLength {
    fn decide(input: ScalingInput) -> Result<Decision, String> {
        let settings = Settings::parse(&input.settings)?;
        decide(&input, &settings)
    }
}

celery_operator_plugin_sdk::export_scaler!(QueueLength);

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
                    ready: 8,
                    reserved: 2,
                    oldest_wait_ms: None,
                }],
            }],
            history: vec![Recommendation {
                at_ms: 900_000,
                replicas: 6,
            }],
            workload: Workload::default(),
            settings: settings.into(),
        }
    }

    #[test]
    fn defaults_hold_a_scale_down_for_300_seconds() {
        let d = QueueLength::decide(input("{}")).unwrap();
        assert_eq!((d.recommendation, d.replicas), (2, 6));
        assert_eq!(
            d.reason,
            "backlog 10 (ready 8, reserved 2) over target 5/replica: 2 replicas; \
             scale-down to 2 held by the 300s stabilization window: 6"
        );
    }

    #[test]
    fn settings_are_read() {
        let d = QueueLength::decide(input(r#"{"scaleDownStabilizationSeconds": 60}"#)).unwrap();
        assert_eq!((d.recommendation, d.replicas), (2, 2));
        let d = QueueLength::decide(input("")).unwrap();
        assert_eq!(d.replicas, 6);
    }

    #[test]
    fn bad_settings_are_rejected_with_the_field_name() {
        let err = QueueLength::decide(input(r#"{"tolerance": "10%"}"#)).unwrap_err();
        assert_eq!(
            err,
            r#"settings.tolerance: invalid type: string "10%", expected f64"#
        );
    }
}
