//! The queue-length maths: the Kubernetes HPA's algorithm applied to a Celery pool's
//! backlog. The `queue-length` plugin is these maths and nothing else; other scalers build
//! on them (see `examples/plugins/business-hours`, which raises `min-replicas` during
//! business hours and calls [`decide`]).
//!
//! They live in the SDK rather than in the `queue-length` plugin crate because a plugin
//! crate cannot be a dependency of another plugin: both would export
//! `celery:operator/scaler@0.2.0#decide` and the component fails to link.
//!
//! The backlog is the latest sample's sum, over the pool's queues, of `ready` (waiting)
//! plus `reserved` (delivered to a worker, not yet acknowledged) tasks. Then exactly as the
//! Kubernetes HPA does for an External metric with an `AverageValue` target
//! (`pkg/controller/podautoscaler`: `GetExternalPerPodMetricReplicas`,
//! `stabilizeRecommendationWithBehaviors`), with the backlog and the target in milli-units
//! as Kubernetes quantities are:
//!
//! 1. `current-replicas` 0 → `ceil(backlog / target)` (the HPA does not scale from zero;
//!    this scaler does, and an empty backlog stays at `min-replicas`);
//! 2. otherwise, `ratio = backlog / (target × current)` in floating point, as the HPA
//!    computes it; if `|1 − ratio| > tolerance` → `ceil(backlog / target)` (in exact integer
//!    arithmetic, right for any backlog), else `current-replicas` (so an empty backlog
//!    recommends 0: the only way to reach zero replicas is an empty queue *and* no reserved
//!    work, and only with `min-replicas` 0);
//! 3. stabilize the raw recommendation: a scale-down goes no lower than the highest
//!    recommendation of the last `scaleDownStabilizationSeconds` (and this one), a scale-up
//!    no higher than the lowest of the last `scaleUpStabilizationSeconds` (the HPA's
//!    `behavior.*.stabilizationWindowSeconds`). Neither window ever moves the replicas the
//!    other way;
//! 4. clamp to `[min-replicas, max-replicas]`; waking a pool from zero for a non-zero
//!    backlog is never held back.
//!
//! `Decision::recommendation` is the raw recommendation of steps 1–2, before any clamp (the
//! host keeps it in `history`, as the HPA keeps its recommendations); `Decision::replicas` the
//! stabilized and clamped one. Rate limits (the HPA's scale-up and scale-down policies) are the
//! host's: see the pool's `autoscaling.behavior`. Steps 3–4 are [`settle`], which other
//! scalers (the [`latency`](crate::latency) maths) apply to their own raw recommendations.
//!
//! Settings (all optional): `{"tolerance": 0.1, "scaleDownStabilizationSeconds": 300,
//! "scaleUpStabilizationSeconds": 0}`.
//!
//! ```
//! use celery_operator_plugin_sdk::queue_length::{decide, Settings};
//! use celery_operator_plugin_sdk::scaler::{QueueDepth, Sample, ScalingInput, Workload};
//!
//! let input = ScalingInput {
//!     pool: "default".into(),
//!     now_ms: 1_700_000_000_000,
//!     current_replicas: 2,
//!     min_replicas: 0,
//!     max_replicas: 20,
//!     target_per_replica: 5.0,
//!     samples: vec![Sample {
//!         at_ms: 1_699_999_999_000,
//!         queues: vec![QueueDepth {
//!             name: "celery".into(),
//!             ready: 30,
//!             reserved: 7,
//!             oldest_wait_ms: None,
//!         }],
//!     }],
//!     history: vec![],
//!     workload: Workload::unknown(),
//!     settings: "{}".into(),
//! };
//! let d = decide(&input, &Settings::default()).unwrap();
//! assert_eq!(d.replicas, 8);
//! assert_eq!(d.reason, "backlog 37 (ready 30, reserved 7) over target 5/replica: 8 replicas");
//! ```

use serde::Deserialize;

use crate::parse_settings;
use crate::scaler::{Decision, Recommendation, Sample, ScalingInput};

/// The plugin's settings.
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Settings {
    /// How far (as a fraction) the per-replica backlog may be from the target before the
    /// replica count changes. Default 0.1, like the HPA's.
    pub tolerance: f64,
    /// Window over which a scale-down is held at the highest recent recommendation.
    /// Default 300, like the HPA's.
    pub scale_down_stabilization_seconds: u64,
    /// Window over which a scale-up is held at the lowest recent recommendation.
    /// Default 0 (scale up at once), like the HPA's.
    pub scale_up_stabilization_seconds: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            tolerance: 0.1,
            scale_down_stabilization_seconds: 300,
            scale_up_stabilization_seconds: 0,
        }
    }
}

impl Settings {
    /// Parses and checks the `settings` JSON (`{}` or empty means all defaults).
    pub fn parse(settings: &str) -> Result<Self, String> {
        let s: Settings = parse_settings(settings)?;
        if !(s.tolerance.is_finite() && s.tolerance >= 0.0) {
            return Err(format!(
                "settings.tolerance: must be a number >= 0, got {}",
                s.tolerance
            ));
        }
        Ok(s)
    }
}

/// Tasks in a pool's queues at one probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Backlog {
    /// Waiting tasks, summed over the queues.
    pub ready: u64,
    /// Reserved (delivered, unacknowledged) tasks, summed over the queues.
    pub reserved: u64,
}

impl Backlog {
    /// The backlog of the latest of `samples` (the one with the highest `at-ms`; the last
    /// such one on a tie). Errors when there is none.
    pub fn latest(samples: &[Sample]) -> Result<Self, String> {
        Ok(Backlog::of(latest_sample(samples)?))
    }

    /// The backlog of one sample: its queues' tasks, summed.
    pub fn of(sample: &Sample) -> Self {
        sample
            .queues
            .iter()
            .fold(Backlog::default(), |acc, q| Backlog {
                ready: acc.ready.saturating_add(q.ready),
                reserved: acc.reserved.saturating_add(q.reserved),
            })
    }

    /// Ready plus reserved tasks.
    pub fn total(&self) -> u64 {
        self.ready.saturating_add(self.reserved)
    }
}

/// The latest of `samples`: the one with the highest `at-ms`, the last such one on a tie.
/// Errors when there is none.
pub fn latest_sample(samples: &[Sample]) -> Result<&Sample, String> {
    // `max_by_key` returns the last of equal maxima.
    samples
        .iter()
        .max_by_key(|s| s.at_ms)
        .ok_or_else(|| "no queue samples: the host must pass at least one".to_string())
}

/// A target per replica in milli-units, as Kubernetes reads a quantity (`MilliValue`:
/// rounded up to a whole milli-unit, at least 1). A target given as a float that is a
/// whole number of milli-units up to float error (`0.1` is 100.00000000000001 milli) counts
/// as that number.
pub fn target_milli(target: f64) -> u64 {
    let m = target * 1000.0;
    let near = m.round();
    let milli = if (m - near).abs() <= near.abs() * 1e-12 {
        near
    } else {
        m.ceil()
    };
    if milli >= u64::MAX as f64 {
        u64::MAX
    } else {
        (milli as u64).max(1)
    }
}

/// `ceil(total / target)` in exact integer arithmetic, as a replica count (saturating).
fn replicas_for(total: u64, target_milli: u64) -> u32 {
    let usage = u128::from(total) * 1000;
    let target = u128::from(target_milli);
    let replicas = usage.div_ceil(target);
    u32::try_from(replicas).unwrap_or(u32::MAX)
}

/// Formats a number for a person: `5`, `2.5`, `4.83`.
pub(crate) fn num(x: f64) -> String {
    let rounded = (x * 100.0).round() / 100.0;
    format!("{rounded}")
}

/// The raw recommendation (not yet stabilized nor clamped) and why.
pub fn recommend(input: &ScalingInput, settings: &Settings) -> Result<(u32, String), String> {
    let target = input.target_per_replica;
    if !(target.is_finite() && target > 0.0) {
        return Err(format!(
            "target-per-replica must be a number above 0, got {target}"
        ));
    }
    if input.min_replicas > input.max_replicas {
        return Err(format!(
            "min-replicas {} is above max-replicas {}",
            input.min_replicas, input.max_replicas
        ));
    }
    let backlog = Backlog::latest(&input.samples)?;
    let total = backlog.total();
    let current = input.current_replicas;
    let milli = target_milli(target);
    let what = format!(
        "backlog {total} (ready {}, reserved {})",
        backlog.ready, backlog.reserved
    );
    if current == 0 {
        let n = if total == 0 {
            0
        } else {
            replicas_for(total, milli)
        };
        return Ok((
            n,
            format!("{what} over target {}/replica: {n} replicas", num(target)),
        ));
    }
    // The HPA's test, in its floating point: float64(usage) / (float64(target) *
    // float64(replicas)), with usage and target in milli-units.
    let usage = total as f64 * 1000.0;
    let ratio = usage / (milli as f64 * f64::from(current));
    if (1.0 - ratio).abs() > settings.tolerance {
        let n = replicas_for(total, milli);
        let reason = if total == 0 {
            format!("{what}: no queued or reserved tasks: {n} replicas")
        } else {
            format!("{what} over target {}/replica: {n} replicas", num(target))
        };
        Ok((n, reason))
    } else {
        Ok((
            current,
            format!(
                "{what} is {}/replica, within {}% tolerance of target {}: keep {current}",
                num(total as f64 / f64::from(current)),
                num(settings.tolerance * 100.0),
                num(target)
            ),
        ))
    }
}

/// Recommendations of `history` made in the `seconds` before `now_ms` (a future one
/// counts too: the safe side if the host's clock stepped back).
fn in_window(history: &[Recommendation], now_ms: u64, seconds: u64) -> impl Iterator<Item = u32> {
    let cutoff = now_ms.saturating_sub(seconds.saturating_mul(1000));
    history
        .iter()
        .filter(move |r| seconds > 0 && r.at_ms > cutoff)
        .map(|r| r.replicas)
}

/// Applies the stabilization windows to the raw recommendation `raw`, as the HPA does:
/// returns the replicas to run and, when a window changed the outcome, why. The windows are
/// the settings' (see [`stabilize_within`]).
pub fn stabilize(input: &ScalingInput, raw: u32, settings: &Settings) -> (u32, Option<String>) {
    stabilize_within(
        input,
        raw,
        settings.scale_down_stabilization_seconds,
        settings.scale_up_stabilization_seconds,
    )
}

/// Applies stabilization windows of `scale_down_seconds` and `scale_up_seconds` to the raw
/// recommendation `raw`, from `input.history`, as the HPA does: a scale-down goes no lower
/// than the highest recommendation of the last `scale_down_seconds` (and `raw`), a scale-up
/// no higher than the lowest of the last `scale_up_seconds` (and `raw`); neither window
/// moves the replicas away from `raw`'s side of `current-replicas`. A window of 0 is off.
/// Returns the replicas to run and, when a window changed the outcome, why.
pub fn stabilize_within(
    input: &ScalingInput,
    raw: u32,
    scale_down_seconds: u64,
    scale_up_seconds: u64,
) -> (u32, Option<String>) {
    let current = input.current_replicas;
    let up = in_window(&input.history, input.now_ms, scale_up_seconds).fold(raw, u32::min);
    let down = in_window(&input.history, input.now_ms, scale_down_seconds).fold(raw, u32::max);
    let replicas = if current < up {
        up
    } else if current > down {
        down
    } else {
        current
    };
    let note = if replicas == raw {
        None
    } else if raw < current {
        Some(format!(
            "scale-down to {raw} held by the {scale_down_seconds}s stabilization window: {replicas}"
        ))
    } else {
        Some(format!(
            "scale-up to {raw} held by the {scale_up_seconds}s stabilization window: {replicas}"
        ))
    };
    (replicas, note)
}

/// From a raw recommendation to the decision: [`stabilize_within`] the windows, then clamp
/// to `[min-replicas, max-replicas]`, appending to `reason` what each step changed. Waking
/// a pool from zero is never held back: a non-zero `recommendation` always gets at least 1
/// replica (if `max-replicas` allows). `Decision::recommendation` is `recommendation`.
pub fn settle(
    input: &ScalingInput,
    recommendation: u32,
    mut reason: String,
    scale_down_seconds: u64,
    scale_up_seconds: u64,
) -> Decision {
    let (stabilized, note) =
        stabilize_within(input, recommendation, scale_down_seconds, scale_up_seconds);
    if let Some(note) = note {
        reason = format!("{reason}; {note}");
    }
    let mut replicas = stabilized.clamp(input.min_replicas, input.max_replicas);
    if replicas < stabilized {
        reason.push_str(&format!("; capped at max-replicas {replicas}"));
    } else if replicas > stabilized {
        reason.push_str(&format!("; raised to min-replicas {replicas}"));
    }
    if recommendation > 0 && replicas == 0 {
        replicas = 1.min(input.max_replicas);
        reason.push_str(&format!("; waking from zero: {replicas}"));
    }
    Decision {
        replicas,
        recommendation,
        reason,
    }
}

/// The whole decision: [`recommend`], then [`stabilize`], clamped to
/// `[min-replicas, max-replicas]` (that is, [`settle`] with the settings' windows). Waking
/// a pool from zero is never held back: a non-zero backlog always gets at least 1 replica.
pub fn decide(input: &ScalingInput, settings: &Settings) -> Result<Decision, String> {
    let (recommendation, reason) = recommend(input, settings)?;
    Ok(settle(
        input,
        recommendation,
        reason,
        settings.scale_down_stabilization_seconds,
        settings.scale_up_stabilization_seconds,
    ))
}

#[cfg(test)]
mod tests;
