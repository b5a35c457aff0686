//! The latency maths: how many workers a pool needs so that no task waits in the queue
//! longer than a target, from Little's law. The `latency` plugin is these maths and nothing
//! else; they live in the SDK (like [`queue_length`](crate::queue_length)) so that other
//! scalers can build on them.
//!
//! Where the queue-length maths keep a fixed number of tasks per replica, these size the
//! pool from what its workers do: how fast tasks arrive and how long each one runs.
//!
//! # The figures
//!
//! * `W`, the **waiting** tasks: the sum of `ready` over the queues of the latest sample
//!   (the one with the highest `at-ms`), from the host's probes of the broker;
//! * `λ`, the **arrival rate** in tasks per second (`workload.arrival-rate`);
//! * `S`, the **service time**, the mean seconds a task runs (`workload.service-seconds`);
//! * `c`, the **worker processes per replica** (`workload.concurrency`, the pool's
//!   `concurrency`);
//! * `T`, the **target wait** in seconds (the `targetWaitSeconds` setting).
//!
//! The host measures `λ` and `S` over a window of recent time, from the Celery workers'
//! heartbeats (tasks running and started) and the broker samples (the growth of the
//! waiting backlog): `λ` is tasks started plus that growth, per second; `S` is busy worker
//! processes over the completion rate (Little's law again). A figure the host could not
//! measure is absent, never zero: `S` is absent until a task finishes in the window, `λ`
//! until a worker's heartbeat is heard. A figure that is not a finite number counts as
//! absent; a negative one as 0.
//!
//! # The rule
//!
//! By Little's law, a pool keeps up with its arrivals with `λ·S` busy processes; draining
//! the `W` waiting tasks within `T` seconds takes `W·S/T` more. So
//!
//! ```text
//! processes needed = λ·S + W·S/T
//! raw recommendation = ceil(needed / c)
//! ```
//!
//! (less 1e-9 before the ceiling, so that float noise does not add a replica), and then, as
//! the queue-length maths do:
//!
//! 1. when `current-replicas` is above 0 and `|needed / (c × current) − 1| <= tolerance`,
//!    the raw recommendation is `current-replicas` (no change for small drifts);
//! 2. while any task is waiting or reserved (`ready` or `reserved` above 0), the raw
//!    recommendation is at least 1: a pool never scales to zero under running tasks;
//! 3. the stabilization windows, the clamp to `[min-replicas, max-replicas]` and the wake
//!    from zero of [`queue_length::settle`](crate::queue_length::settle).
//!
//! # Holding
//!
//! Without the figures there is nothing to compute. When `c` is absent or 0, or `λ` or `S`
//! is absent, the raw recommendation is `current-replicas` (the pool holds, clamped to
//! `[min-replicas, max-replicas]`) and the reason names what is missing, for example
//! `holding 3 replicas: no service time measured yet (no task finished in the window)`.
//!
//! One exception: **waking from zero**. A pool at 0 replicas has no worker to measure
//! anything, so when `current-replicas` is 0 and the latest sample has a ready or reserved
//! task, the raw recommendation is `max(1, min-replicas)` even without the figures.
//!
//! When a queue of the latest sample knows how long its oldest task has waited
//! (`oldest-wait-ms`, which needs a `published_at` header on the tasks), the reason ends
//! with the longest such wait (`; oldest waiting task 12.3 s`): for people, it does not
//! change the decision.
//!
//! # Settings
//!
//! `{"targetWaitSeconds": 30, "tolerance": 0.1, "scaleDownStabilizationSeconds": 300,
//! "scaleUpStabilizationSeconds": 0}`: `targetWaitSeconds` is required (a number above 0),
//! the others are optional with these defaults.
//!
//! ```
//! use celery_operator_plugin_sdk::latency::{decide, Settings};
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
//!             ready: 12,
//!             reserved: 8,
//!             oldest_wait_ms: None,
//!         }],
//!     }],
//!     history: vec![],
//!     workload: Workload {
//!         arrival_rate: Some(4.0),
//!         service_seconds: Some(2.0),
//!         concurrency: Some(4),
//!         ..Workload::unknown()
//!     },
//!     settings: r#"{"targetWaitSeconds": 10}"#.into(),
//! };
//! let d = decide(&input, &Settings::parse(&input.settings).unwrap()).unwrap();
//! assert_eq!(d.replicas, 3);
//! assert_eq!(
//!     d.reason,
//!     "arrivals 4.00/s x service 2.00 s + 12 waiting x 2.00 s / 10 s target \
//!      = 10.4 processes / 4 per replica: 3 replicas"
//! );
//! ```

use serde::Deserialize;

use crate::parse_settings;
use crate::queue_length::{Backlog, latest_sample, num, settle};
use crate::scaler::{Decision, Sample, ScalingInput};

/// The plugin's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The longest a task should wait in the queue before a worker takes it, in seconds
    /// (`targetWaitSeconds`, required, above 0).
    pub target_wait_seconds: f64,
    /// How far (as a fraction) the processes needed may be from the pool's before the
    /// replica count changes (`tolerance`). Default 0.1.
    pub tolerance: f64,
    /// Window over which a scale-down is held at the highest recent recommendation
    /// (`scaleDownStabilizationSeconds`). Default 300.
    pub scale_down_stabilization_seconds: u64,
    /// Window over which a scale-up is held at the lowest recent recommendation
    /// (`scaleUpStabilizationSeconds`). Default 0 (scale up at once).
    pub scale_up_stabilization_seconds: u64,
}

/// The settings as written: every field optional, so that a missing `targetWaitSeconds`
/// gets a message of ours rather than serde's.
#[derive(Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
struct Written {
    target_wait_seconds: Option<f64>,
    tolerance: f64,
    scale_down_stabilization_seconds: u64,
    scale_up_stabilization_seconds: u64,
}

impl Default for Written {
    fn default() -> Self {
        let d = Settings::new(1.0);
        Written {
            target_wait_seconds: None,
            tolerance: d.tolerance,
            scale_down_stabilization_seconds: d.scale_down_stabilization_seconds,
            scale_up_stabilization_seconds: d.scale_up_stabilization_seconds,
        }
    }
}

impl Settings {
    /// Settings with this target wait and the defaults for the rest.
    pub fn new(target_wait_seconds: f64) -> Self {
        Settings {
            target_wait_seconds,
            tolerance: 0.1,
            scale_down_stabilization_seconds: 300,
            scale_up_stabilization_seconds: 0,
        }
    }

    /// Parses and checks the `settings` JSON; `targetWaitSeconds` is required.
    pub fn parse(settings: &str) -> Result<Self, String> {
        let w: Written = parse_settings(settings)?;
        let Some(target) = w.target_wait_seconds else {
            return Err(
                "settings.targetWaitSeconds: required: the longest a task should wait \
                 in the queue before a worker takes it, in seconds (for example \
                 {\"targetWaitSeconds\": 30})"
                    .into(),
            );
        };
        if !(target.is_finite() && target > 0.0) {
            return Err(format!(
                "settings.targetWaitSeconds: must be a number above 0, got {target}"
            ));
        }
        if !(w.tolerance.is_finite() && w.tolerance >= 0.0) {
            return Err(format!(
                "settings.tolerance: must be a number >= 0, got {}",
                w.tolerance
            ));
        }
        Ok(Settings {
            target_wait_seconds: target,
            tolerance: w.tolerance,
            scale_down_stabilization_seconds: w.scale_down_stabilization_seconds,
            scale_up_stabilization_seconds: w.scale_up_stabilization_seconds,
        })
    }
}

/// Worker processes needed, by Little's law: `arrival_rate × service_seconds` to keep up
/// with arrivals, plus `waiting × service_seconds / target_wait_seconds` to drain the
/// waiting tasks within the target.
pub fn processes_needed(
    arrival_rate: f64,
    service_seconds: f64,
    waiting: u64,
    target_wait_seconds: f64,
) -> f64 {
    arrival_rate * service_seconds + waiting as f64 * service_seconds / target_wait_seconds
}

/// Replicas of `concurrency` processes for `needed` processes: `ceil(needed / concurrency)`
/// less float noise, never negative, saturating.
fn replicas_for(needed: f64, concurrency: u32) -> u32 {
    let replicas = (needed / f64::from(concurrency) - 1e-9).ceil();
    if replicas.is_nan() || replicas <= 0.0 {
        0
    } else if replicas >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        replicas as u32
    }
}

/// A measured figure, if usable: absent or not finite is unknown, negative is 0.
fn figure(x: Option<f64>) -> Option<f64> {
    x.filter(|v| v.is_finite()).map(|v| v.max(0.0))
}

/// The longest `oldest-wait-ms` over the queues of `sample`, if any queue knows it.
fn oldest_wait_ms(sample: &Sample) -> Option<u64> {
    sample.queues.iter().filter_map(|q| q.oldest_wait_ms).max()
}

/// `1 replica`, `3 replicas`.
fn replicas(n: u32) -> String {
    if n == 1 {
        "1 replica".into()
    } else {
        format!("{n} replicas")
    }
}

/// Formats a rate or a duration for a person: `4.00`.
fn fixed(x: f64) -> String {
    format!("{x:.2}")
}

/// The raw recommendation (not yet stabilized nor clamped) and why. A pool that holds for
/// want of figures is recommended its `current-replicas`.
pub fn recommend(input: &ScalingInput, settings: &Settings) -> Result<(u32, String), String> {
    if input.min_replicas > input.max_replicas {
        return Err(format!(
            "min-replicas {} is above max-replicas {}",
            input.min_replicas, input.max_replicas
        ));
    }
    let sample = latest_sample(&input.samples)?;
    let backlog = Backlog::of(sample);
    let (mut n, mut reason) = raw(input, settings, backlog);
    if n == 0 && backlog.total() > 0 {
        n = 1;
        reason.push_str(&format!(
            "; {} waiting and {} reserved tasks: at least 1 replica",
            backlog.ready, backlog.reserved
        ));
    }
    if let Some(ms) = oldest_wait_ms(sample) {
        reason.push_str(&format!(
            "; oldest waiting task {:.1} s",
            ms as f64 / 1000.0
        ));
    }
    Ok((n, reason))
}

/// Little's law and the tolerance (step 1 of the rule), or the hold, or the wake from zero.
fn raw(input: &ScalingInput, settings: &Settings, backlog: Backlog) -> (u32, String) {
    let current = input.current_replicas;
    let w = &input.workload;
    let concurrency = w.concurrency.filter(|&c| c > 0);
    let arrival_rate = figure(w.arrival_rate);
    let service_seconds = figure(w.service_seconds);
    let (Some(c), Some(lambda), Some(s)) = (concurrency, arrival_rate, service_seconds) else {
        // Nothing waits, is reserved or runs, and nothing arrives (or no worker is there to
        // say so): no process is needed, whatever the service time. Without this a pool
        // that went idle would hold forever: with no task finishing, no service time.
        let idle = backlog.total() == 0
            && w.running.unwrap_or(0) == 0
            && arrival_rate.is_none_or(|rate| rate == 0.0);
        if idle {
            return (
                0,
                "no task arrives, waits or runs: 0 replicas needed".into(),
            );
        }
        if current == 0 && backlog.total() > 0 {
            let n = input.min_replicas.max(1);
            return (
                n,
                format!(
                    "waking from zero: {} waiting and {} reserved tasks, no worker to measure \
                     the workload yet: {}",
                    backlog.ready,
                    backlog.reserved,
                    replicas(n)
                ),
            );
        }
        let mut missing = Vec::new();
        if concurrency.is_none() {
            missing.push("worker processes per replica unknown: set the pool's concurrency");
        }
        if arrival_rate.is_none() {
            missing.push("no arrival rate measured yet (no worker heartbeat in the window)");
        }
        if service_seconds.is_none() {
            missing.push("no service time measured yet (no task finished in the window)");
        }
        return (
            current,
            format!("holding {}: {}", replicas(current), missing.join("; ")),
        );
    };
    let target = settings.target_wait_seconds;
    let needed = processes_needed(lambda, s, backlog.ready, target);
    let formula = format!(
        "arrivals {}/s x service {} s + {} waiting x {} s / {} s target = {:.1} processes / {c} \
         per replica",
        fixed(lambda),
        fixed(s),
        backlog.ready,
        fixed(s),
        num(target),
        needed,
    );
    if current > 0 {
        let ratio = needed / (f64::from(c) * f64::from(current));
        if (1.0 - ratio).abs() <= settings.tolerance {
            return (
                current,
                format!(
                    "{formula} = {} replicas, within {}% tolerance of {current}: keep {current}",
                    num(needed / f64::from(c)),
                    num(settings.tolerance * 100.0),
                ),
            );
        }
    }
    let n = replicas_for(needed, c);
    (n, format!("{formula}: {}", replicas(n)))
}

/// The whole decision: [`recommend`], then the stabilization windows and the clamp to
/// `[min-replicas, max-replicas]` of [`queue_length::settle`](crate::queue_length::settle).
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
