//! The last stage of reconciliation: what the status says. Pure: it takes what the earlier
//! stages saw and did, and returns the new status.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{Celery, CeleryStatus, ComponentStatus, PluginUse, PoolStatus};
use crate::names::{beat_name, flower_name, worker_name};

/// Condition type: every component has all its pods ready.
pub const READY: &str = "Ready";
/// Condition type: the operator or Kubernetes is still moving toward the spec.
pub const PROGRESSING: &str = "Progressing";
/// Condition type: something prevents reaching the spec (invalid spec, failed apply,
/// failed rollout).
pub const DEGRADED: &str = "Degraded";

/// Condition type: every plugin this resource uses works.
pub const PLUGINS_HEALTHY: &str = "PluginsHealthy";

/// What the shape and apply stages did, as the status needs it.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The Deployments as they are now, by name (live, or as returned by the apply).
    pub deployments: BTreeMap<String, Deployment>,
    /// Whether this reconcile wrote any child.
    pub changed: bool,
    /// Why nothing (more) could be applied, if so: a reason (`ApplyFailed`,
    /// `PluginFailed`, `ShapingRejected`) and a message (already free of secrets).
    pub failure: Option<(&'static str, String)>,
    /// The plugins that ran.
    pub plugins: Vec<PluginUse>,
    /// Plugin failures absorbed by a failure policy, and refused plugin updates.
    pub plugin_problems: Vec<String>,
}

/// The status after a reconcile that got as far as applying.
pub fn compute(celery: &Celery, outcome: &Outcome, now: &Time) -> CeleryStatus {
    let component = |name: String| {
        let d = outcome.deployments.get(&name);
        ComponentStatus {
            replicas: d.and_then(|d| d.spec.as_ref()?.replicas).unwrap_or(0),
            ready_replicas: d
                .and_then(|d| d.status.as_ref()?.ready_replicas)
                .unwrap_or(0),
            deployment: name,
        }
    };
    let workers: Vec<PoolStatus> = celery
        .spec
        .workers
        .iter()
        .map(|p| PoolStatus {
            name: p.name.clone(),
            autoscaled: p.autoscaling.is_some(),
            deployment: component(worker_name(celery, &p.name)),
        })
        .collect();
    let flower = celery
        .spec
        .flower
        .as_ref()
        .filter(|f| f.enabled)
        .map(|_| component(flower_name(celery)));
    let beat = celery
        .spec
        .beat
        .as_ref()
        .filter(|b| b.enabled)
        .map(|_| component(beat_name(celery)));

    let desired: i32 = workers.iter().map(|w| w.deployment.replicas).sum();
    let ready: i32 = workers.iter().map(|w| w.deployment.ready_replicas).sum();

    // Which components are not there yet, in words a person can act on.
    let mut waiting = Vec::new();
    let mut failed = Vec::new();
    let labelled = workers
        .iter()
        .map(|w| (format!("worker pool {}", w.name), &w.deployment))
        .chain(flower.iter().map(|f| ("flower".to_string(), f)))
        .chain(beat.iter().map(|b| ("beat".to_string(), b)));
    for (label, c) in labelled {
        match outcome.deployments.get(&c.deployment) {
            None => waiting.push(format!("{label}: not created yet")),
            Some(d) => {
                if let Some(why) = rollout_failure(d) {
                    failed.push(format!("{label}: {why}"));
                }
                if !rolled_out(d) {
                    waiting.push(format!(
                        "{label}: {}/{} ready",
                        c.ready_replicas, c.replicas
                    ));
                }
            }
        }
    }

    let old = celery
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let generation = celery.metadata.generation;
    let cond = |type_: &str, ok: bool, reason: &str, message: String| {
        condition(old, type_, ok, reason, message, generation, now)
    };
    let conditions = vec![
        if let Some((reason, _)) = &outcome.failure {
            cond(
                READY,
                false,
                reason,
                "the desired objects could not be applied; see Degraded".into(),
            )
        } else if waiting.is_empty() {
            cond(
                READY,
                true,
                "AllReady",
                "every component has all its pods ready".into(),
            )
        } else {
            cond(READY, false, "NotReady", waiting.join("; "))
        },
        if outcome.changed || !waiting.is_empty() {
            let message = if waiting.is_empty() {
                "applied changes to child objects".into()
            } else {
                waiting.join("; ")
            };
            cond(PROGRESSING, true, "RollingOut", message)
        } else {
            cond(
                PROGRESSING,
                false,
                "Complete",
                "every component matches the spec".into(),
            )
        },
        if let Some((reason, message)) = &outcome.failure {
            cond(DEGRADED, true, reason, message.clone())
        } else if !failed.is_empty() {
            cond(DEGRADED, true, "RolloutFailed", failed.join("; "))
        } else {
            cond(DEGRADED, false, "AsExpected", "no problems".into())
        },
        if outcome.plugin_problems.is_empty() {
            cond(
                PLUGINS_HEALTHY,
                true,
                "AsExpected",
                "every plugin in use works".into(),
            )
        } else {
            cond(
                PLUGINS_HEALTHY,
                false,
                "PluginFailed",
                outcome.plugin_problems.join("; "),
            )
        },
    ];

    CeleryStatus {
        observed_generation: generation,
        conditions,
        workers_ready: Some(format!("{ready}/{desired}")),
        workers,
        flower,
        beat,
        plugins: outcome.plugins.clone(),
        // Owned by the scaler loops and the event followers, which write them themselves.
        scaling: Vec::new(),
        live_workers: Vec::new(),
    }
}

/// The status of a resource whose spec is invalid: nothing is applied, and the conditions
/// say why. Replica counts from before are kept; they still describe what runs.
pub fn invalid(celery: &Celery, message: &str, now: &Time) -> CeleryStatus {
    let mut status = celery.status.clone().unwrap_or_default();
    let old = std::mem::take(&mut status.conditions);
    let generation = celery.metadata.generation;
    status.observed_generation = generation;
    status.conditions = vec![
        condition(
            &old,
            READY,
            false,
            "InvalidSpec",
            "the spec is invalid; see the Degraded condition".into(),
            generation,
            now,
        ),
        condition(
            &old,
            PROGRESSING,
            false,
            "InvalidSpec",
            "nothing is applied until the spec is fixed".into(),
            generation,
            now,
        ),
        condition(
            &old,
            DEGRADED,
            true,
            "InvalidSpec",
            message.into(),
            generation,
            now,
        ),
    ];
    status
}

/// A Deployment has all its desired pods updated and ready, and its controller has seen
/// its latest spec.
fn rolled_out(d: &Deployment) -> bool {
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let Some(s) = &d.status else { return want == 0 };
    let seen = s.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0);
    seen && s.updated_replicas.unwrap_or(0) >= want && s.ready_replicas.unwrap_or(0) >= want
}

/// Why a Deployment's rollout failed, from the conditions its controller sets.
fn rollout_failure(d: &Deployment) -> Option<String> {
    let conditions = d.status.as_ref()?.conditions.as_ref()?;
    conditions.iter().find_map(|c| {
        let failed = (c.type_ == "Progressing" && c.status == "False")
            || (c.type_ == "ReplicaFailure" && c.status == "True");
        failed.then(|| {
            c.message
                .clone()
                .unwrap_or_else(|| c.reason.clone().unwrap_or_default())
        })
    })
}

/// A condition, keeping the previous transition time when its status did not change.
pub(crate) fn condition(
    old: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last_transition_time = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        // Parts of a message may come from plugins.
        message: crate::text::clean(&message, crate::text::limit::CONDITION),
        observed_generation: generation,
        last_transition_time,
    }
}

/// The condition of `type_` in a status, if any.
pub fn find<'a>(status: Option<&'a CeleryStatus>, type_: &str) -> Option<&'a Condition> {
    status?.conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::tests::{FULL, celery};
    use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentSpec, DeploymentStatus};

    fn time(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(secs).unwrap())
    }

    fn deployment(replicas: i32, ready: i32) -> Deployment {
        let mut d = Deployment::default();
        d.metadata.generation = Some(1);
        d.spec = Some(DeploymentSpec {
            replicas: Some(replicas),
            ..Default::default()
        });
        d.status = Some(DeploymentStatus {
            observed_generation: Some(1),
            replicas: Some(replicas),
            updated_replicas: Some(replicas),
            ready_replicas: Some(ready),
            ..Default::default()
        });
        d
    }

    fn all_deployments(ready: bool) -> BTreeMap<String, Deployment> {
        [
            "demo-worker-default",
            "demo-worker-heavy",
            "demo-flower",
            "demo-beat",
        ]
        .into_iter()
        .map(|n| {
            let r = if n.contains("default") { 3 } else { 1 };
            (n.to_string(), deployment(r, if ready { r } else { 0 }))
        })
        .collect()
    }

    fn cond<'a>(s: &'a CeleryStatus, t: &str) -> &'a Condition {
        find(Some(s), t).unwrap()
    }

    #[test]
    fn nothing_created_yet_is_progressing_not_ready() {
        let c = celery(FULL);
        let s = compute(
            &c,
            &Outcome {
                changed: true,
                ..Default::default()
            },
            &time(10),
        );
        assert_eq!(s.observed_generation, Some(1));
        assert_eq!(cond(&s, READY).status, "False");
        assert!(
            cond(&s, READY)
                .message
                .contains("worker pool default: not created yet")
        );
        assert_eq!(cond(&s, PROGRESSING).status, "True");
        assert_eq!(cond(&s, DEGRADED).status, "False");
        assert_eq!(s.workers_ready.as_deref(), Some("0/0"));
    }

    #[test]
    fn all_ready_counts_replicas_per_component() {
        let c = celery(FULL);
        let s = compute(
            &c,
            &Outcome {
                deployments: all_deployments(true),
                ..Default::default()
            },
            &time(10),
        );
        assert_eq!(cond(&s, READY).status, "True");
        assert_eq!(cond(&s, PROGRESSING).status, "False");
        assert_eq!(s.workers_ready.as_deref(), Some("4/4"));
        assert_eq!(
            s.workers[0].deployment,
            ComponentStatus {
                deployment: "demo-worker-default".into(),
                replicas: 3,
                ready_replicas: 3
            }
        );
        assert!(s.workers[1].autoscaled && !s.workers[0].autoscaled);
        assert_eq!(s.flower.as_ref().unwrap().ready_replicas, 1);
        assert_eq!(s.beat.as_ref().unwrap().replicas, 1);
    }

    #[test]
    fn transition_time_changes_only_when_status_flips() {
        let mut c = celery(FULL);
        let first = compute(
            &c,
            &Outcome {
                deployments: all_deployments(false),
                ..Default::default()
            },
            &time(10),
        );
        c.status = Some(first.clone());
        let same = compute(
            &c,
            &Outcome {
                deployments: all_deployments(false),
                ..Default::default()
            },
            &time(20),
        );
        assert_eq!(
            same, first,
            "an unchanged situation gives an identical status"
        );
        let ready = compute(
            &c,
            &Outcome {
                deployments: all_deployments(true),
                ..Default::default()
            },
            &time(30),
        );
        assert_eq!(cond(&ready, READY).last_transition_time, time(30));
        assert_eq!(cond(&ready, DEGRADED).last_transition_time, time(10));
    }

    #[test]
    fn failed_apply_and_failed_rollout_are_degraded() {
        let c = celery(FULL);
        let s = compute(
            &c,
            &Outcome {
                failure: Some(("ApplyFailed", "forbidden".into())),
                ..Default::default()
            },
            &time(1),
        );
        assert_eq!(
            (
                cond(&s, DEGRADED).status.as_str(),
                cond(&s, DEGRADED).reason.as_str()
            ),
            ("True", "ApplyFailed")
        );
        assert_eq!(cond(&s, READY).reason, "ApplyFailed");

        let mut deployments = all_deployments(false);
        let d = deployments.get_mut("demo-beat").unwrap();
        d.status.as_mut().unwrap().conditions = Some(vec![DeploymentCondition {
            type_: "Progressing".into(),
            status: "False".into(),
            reason: Some("ProgressDeadlineExceeded".into()),
            message: Some("ReplicaSet has timed out progressing".into()),
            ..Default::default()
        }]);
        let s = compute(
            &c,
            &Outcome {
                deployments,
                ..Default::default()
            },
            &time(1),
        );
        assert_eq!(cond(&s, DEGRADED).reason, "RolloutFailed");
        assert!(
            cond(&s, DEGRADED)
                .message
                .contains("beat: ReplicaSet has timed out")
        );
    }

    #[test]
    fn invalid_spec_keeps_counts_and_says_why() {
        let mut c = celery(FULL);
        c.status = Some(compute(
            &c,
            &Outcome {
                deployments: all_deployments(true),
                ..Default::default()
            },
            &time(1),
        ));
        c.metadata.generation = Some(2);
        let s = invalid(&c, "spec.workers[0]: bad", &time(5));
        assert_eq!(s.observed_generation, Some(2));
        assert_eq!(s.workers_ready.as_deref(), Some("4/4"));
        assert_eq!(cond(&s, DEGRADED).reason, "InvalidSpec");
        assert_eq!(cond(&s, DEGRADED).message, "spec.workers[0]: bad");
        assert_eq!(cond(&s, READY).status, "False");
    }
}
