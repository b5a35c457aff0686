//! A pool's entry in `status.scaling`: what its scaler loop last saw and decided. Each loop
//! writes its own entry with server-side apply under a field manager of its own, so the
//! reconciler's status writes and other pools' loops never touch it. Writes are rationed: a
//! changed decision, replica count or condition is written at once; changed queue figures
//! alone at most every [`REFRESH`].

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Resource;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::Verdict;
use crate::broker::QueueSample;
use crate::crd::{Celery, PoolScaling};
use crate::status::condition;
use crate::workload::Figures;

/// How often unchanged decisions are rewritten to refresh the queue figures.
pub const REFRESH: Duration = Duration::from_secs(30);
/// The condition every entry carries.
pub const SCALING_ACTIVE: &str = "ScalingActive";

/// The field manager of one pool's scaler loop.
pub fn field_manager(pool: &str) -> String {
    format!("celery-operator-scaler.{pool}")
}

/// The entry for one tick. `previous` is the last entry written (its condition keeps its
/// transition time while its status holds); `scaled_at` the last time replicas changed.
pub fn entry(
    pool: &str,
    samples: Option<&[QueueSample]>,
    verdict: &Verdict,
    plugin: Option<&(String, String)>,
    previous: Option<&PoolScaling>,
    scaled_at: Option<&Time>,
    now: &Time,
) -> PoolScaling {
    let total = |f: fn(&QueueSample) -> u64| {
        samples.map(|s| s.iter().map(f).sum::<u64>().min(i64::MAX as u64) as i64)
    };
    let replicas = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
    let (decision, current, desired, reason) = match verdict {
        Verdict::Scale { from, to, reason } => ("Scale", *from, *to, reason),
        Verdict::Keep { replicas, reason } => ("Keep", *replicas, *replicas, reason),
        Verdict::Hold {
            replicas, reason, ..
        } => ("Hold", *replicas, *replicas, reason),
    };
    let (active, why, message) = match verdict {
        Verdict::Hold { cause, reason, .. } => (false, cause.as_reason(), reason.clone()),
        _ => (
            true,
            "Scaling",
            "the broker is read and decisions are applied".to_string(),
        ),
    };
    let old = previous.map_or(&[][..], |p| &p.conditions[..]);
    PoolScaling {
        pool: pool.into(),
        queued: total(|q| q.ready),
        reserved: total(|q| q.reserved),
        current_replicas: replicas(current),
        desired_replicas: replicas(desired),
        last_decision: decision.into(),
        // Partly the scaler plugin's words.
        reason: crate::text::clean(reason, crate::text::limit::PLUGIN_MESSAGE),
        plugin: plugin
            .filter(|_| active)
            .map(|(name, digest)| format!("{name} {digest}")),
        last_decision_time: now.clone(),
        last_scale_time: scaled_at.cloned(),
        conditions: vec![condition(
            old,
            SCALING_ACTIVE,
            active,
            why,
            message,
            None,
            now,
        )],
        // Filled in by the loop, which keeps them.
        recommendations: Vec::new(),
        scale_events: Vec::new(),
        // Filled in by `add_workload`.
        wait_seconds: None,
        oldest_wait_seconds: None,
        completion_rate: None,
        arrival_rate: None,
        service_seconds: None,
        busy_fraction: None,
    }
}

/// Adds the pool's workload figures to its entry: what its workers get done (`figures`) and
/// how long its tasks wait (from the queue `samples` of the tick, when the broker was read).
pub fn add_workload(entry: &mut PoolScaling, samples: Option<&[QueueSample]>, figures: &Figures) {
    let oldest_ms = samples.and_then(|s| s.iter().filter_map(|q| q.oldest_wait_ms).max());
    let ready = samples.map(|s| s.iter().map(|q| q.ready).sum::<u64>());
    entry.wait_seconds = figures.expected_wait(ready, oldest_ms).map(rounded);
    entry.oldest_wait_seconds = oldest_ms.map(|ms| rounded(ms as f64 / 1000.0));
    entry.completion_rate = figures.completion_rate.map(rounded);
    entry.arrival_rate = figures.arrival_rate.map(rounded);
    entry.service_seconds = figures.service_seconds.map(rounded);
    entry.busy_fraction = figures.busy_fraction.map(rounded);
}

/// A figure for the status: three decimals are plenty, and fewer digits churn less.
fn rounded(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The workload figures of an entry.
fn figures(e: &PoolScaling) -> [Option<f64>; 6] {
    [
        e.wait_seconds,
        e.oldest_wait_seconds,
        e.completion_rate,
        e.arrival_rate,
        e.service_seconds,
        e.busy_fraction,
    ]
}

/// Whether `new` is worth a status write, `previous` having been written `age` ago.
pub fn worth_writing(previous: Option<&PoolScaling>, new: &PoolScaling, age: Duration) -> bool {
    let Some(old) = previous else {
        return true;
    };
    let decision = |e: &PoolScaling| {
        (
            e.current_replicas,
            e.desired_replicas,
            e.last_decision.clone(),
            e.plugin.clone(),
            e.last_scale_time.clone(),
            e.conditions
                .iter()
                .map(|c| (c.status.clone(), c.reason.clone()))
                .collect::<Vec<_>>(),
        )
    };
    // The values of the recent recommendations (their times move on every tick: refreshed
    // with the figures).
    let values = |e: &PoolScaling| {
        e.recommendations
            .iter()
            .map(|r| r.replicas)
            .collect::<Vec<_>>()
    };
    decision(old) != decision(new)
        || values(old) != values(new)
        || old.scale_events != new.scale_events
        || (age >= REFRESH
            && ((old.queued, old.reserved) != (new.queued, new.reserved)
                || figures(old) != figures(new)
                || old.recommendations != new.recommendations))
}

/// Writes the pool's entry, or removes it (`None`) when the operator no longer scales the
/// pool.
pub async fn write(
    api: &Api<Celery>,
    name: &str,
    pool: &str,
    entry: Option<&PoolScaling>,
) -> kube::Result<()> {
    let patch = json!({
        "apiVersion": Celery::api_version(&()),
        "kind": Celery::kind(&()),
        "status": {"scaling": entry.into_iter().collect::<Vec<_>>()},
    });
    api.patch_status(
        name,
        &PatchParams::apply(&field_manager(pool)).force(),
        &Patch::Apply(patch),
    )
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scaler::HoldCause;

    fn at(s: i64) -> Time {
        Time(jiff::Timestamp::from_second(1_795_428_000 + s).unwrap())
    }

    fn samples() -> Vec<QueueSample> {
        vec![
            QueueSample {
                name: "a".into(),
                ready: 7,
                reserved: 2,
                by_priority: vec![],
                oldest_wait_ms: None,
            },
            QueueSample {
                name: "b".into(),
                ready: 5,
                reserved: 1,
                by_priority: vec![],
                oldest_wait_ms: None,
            },
        ]
    }

    #[test]
    fn an_entry_sums_the_queues_and_says_what_was_decided() {
        let scale = Verdict::Scale {
            from: 1,
            to: 3,
            reason: "15 tasks".into(),
        };
        let plugin = ("queue-length".to_string(), "sha256:ab".to_string());
        let e = entry(
            "w",
            Some(&samples()),
            &scale,
            Some(&plugin),
            None,
            Some(&at(0)),
            &at(0),
        );
        assert_eq!((e.queued, e.reserved), (Some(12), Some(3)));
        assert_eq!((e.current_replicas, e.desired_replicas), (1, 3));
        assert_eq!(e.last_decision, "Scale");
        assert_eq!(e.plugin.as_deref(), Some("queue-length sha256:ab"));
        assert_eq!(e.conditions[0].status, "True");

        let hold = Verdict::Hold {
            replicas: 3,
            cause: HoldCause::BrokerUnavailable,
            reason: "broker unreachable".into(),
        };
        let held = entry("w", None, &hold, None, Some(&e), Some(&at(0)), &at(10));
        assert_eq!(
            (held.queued, held.reserved),
            (None, None),
            "no figure, not zero"
        );
        let c = &held.conditions[0];
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "BrokerUnavailable")
        );
        assert_eq!(c.last_transition_time, at(10));
        let still = entry("w", None, &hold, None, Some(&held), Some(&at(0)), &at(20));
        assert_eq!(
            still.conditions[0].last_transition_time,
            at(10),
            "kept while False"
        );
    }

    #[test]
    fn writes_are_rationed_to_changes_and_a_periodic_refresh() {
        let keep = |ready| {
            let mut s = samples();
            s[0].ready = ready;
            let v = Verdict::Keep {
                replicas: 2,
                reason: "ok".into(),
            };
            entry("w", Some(&s), &v, None, None, None, &at(ready as i64))
        };
        let first = keep(7);
        assert!(worth_writing(None, &first, Duration::ZERO));
        assert!(
            !worth_writing(Some(&first), &keep(7), REFRESH),
            "nothing changed"
        );
        assert!(
            !worth_writing(Some(&first), &keep(8), Duration::from_secs(5)),
            "figures only, too soon"
        );
        assert!(
            worth_writing(Some(&first), &keep(8), REFRESH),
            "figures, refreshed"
        );
        let scaled = entry(
            "w",
            Some(&samples()),
            &Verdict::Scale {
                from: 2,
                to: 4,
                reason: "more".into(),
            },
            None,
            Some(&first),
            None,
            &at(9),
        );
        assert!(
            worth_writing(Some(&first), &scaled, Duration::ZERO),
            "a decision at once"
        );
    }
}
