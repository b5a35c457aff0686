//! `future-version`: a test fixture. A scaler plugin built against a copy of the WIT
//! whose package is `celery:operator@0.9.0` (in this crate's `wit/` folder), so that it
//! exports `celery:operator/scaler@0.9.0#decide`. The host serves `@0.1.0` and `@0.2.0`
//! only and must refuse to load it, with a message naming the version.
//!
//! It behaves like a sane scaler (keeps the current replicas), so that a host that
//! wrongly accepted it would be caught by what it does, not by a crash.

wit_bindgen::generate!({
    path: "wit",
    world: "scaler-plugin",
});

use exports::celery::operator::scaler::{Decision, Guest, ScalingInput};

/// The plugin.
pub struct FutureVersion;

impl Guest for FutureVersion {
    fn decide(input: ScalingInput) -> Result<Decision, String> {
        Ok(Decision {
            replicas: input.current_replicas,
            recommendation: input.current_replicas,
            reason: "future-version: keep the current replicas".into(),
        })
    }
}

// A native `cargo test` build cannot link the component model's export names.
#[cfg(target_arch = "wasm32")]
export!(FutureVersion);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_current_replicas() {
        let d = FutureVersion::decide(ScalingInput {
            pool: "default".into(),
            now_ms: 0,
            current_replicas: 4,
            min_replicas: 0,
            max_replicas: 10,
            target_per_replica: 5.0,
            samples: vec![],
            history: vec![],
            settings: "{}".into(),
        })
        .unwrap();
        assert_eq!(d.replicas, 4);
    }
}
