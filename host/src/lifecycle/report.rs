//! A pool's entry in `status.liveWorkers`, written by the resource's event follower with
//! server-side apply under its own field manager (the reconciler's status writes and the
//! scaler loops never touch it). Rationed like the scaler's: changed figures or condition at
//! once, a newer last heartbeat alone at most every [`REFRESH`].

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Resource;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::roster::{Stall, Summary};
use crate::crd::{Celery, PoolWorkers};
use crate::status::condition;

/// How often an unchanged entry is rewritten to refresh its last heartbeat.
pub const REFRESH: Duration = Duration::from_secs(30);
/// The condition every entry carries.
pub const WORKERS_STALLED: &str = "WorkersStalled";
/// The field manager of the event followers.
pub const FIELD_MANAGER: &str = "celery-operator-lifecycle";
/// Stalled workers named in an entry at most.
const NAMED: usize = 10;

/// The entry of `pool`: its workers' figures, or, with `unavailable`, why the event stream
/// cannot be read. `stalled_after_ms` is the pool's setting; `previous` the last entry
/// written (its condition keeps its transition time while its status holds).
pub fn entry(
    pool: &str,
    summary: &Summary,
    stalled_after_ms: u64,
    unavailable: Option<&str>,
    previous: Option<&PoolWorkers>,
    now: &Time,
) -> PoolWorkers {
    let count = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
    let stalled = u32::try_from(summary.stalled.len()).unwrap_or(u32::MAX);
    let (is_stalled, reason, message) = match (unavailable, summary.stalled.first()) {
        (Some(why), _) => (
            false,
            "BrokerUnavailable",
            format!("the worker event stream cannot be read: {why}"),
        ),
        (None, Some((_, first))) => {
            let named: Vec<String> = summary
                .stalled
                .iter()
                .take(NAMED)
                .map(|(name, stall)| format!("{name}: {}", stall.describe(stalled_after_ms)))
                .collect();
            let reason = match first {
                Stall::Silent => "HeartbeatsStopped",
                Stall::Idle => "IdleWithBacklog",
            };
            (true, reason, named.join("; "))
        }
        (None, None) => (false, "NoneStalled", "every worker heard from works".into()),
    };
    let old = previous.map_or(&[][..], |p| &p.conditions[..]);
    PoolWorkers {
        pool: pool.into(),
        seen: count(summary.seen),
        busy: count(summary.busy),
        idle: count(summary.idle),
        stalled: count(stalled),
        // Node names come from the broker: cleaned like any untrusted text.
        stalled_workers: summary
            .stalled
            .iter()
            .take(NAMED)
            .map(|(name, _)| crate::text::clean(name, 300))
            .collect(),
        last_heartbeat_time: summary
            .last_heartbeat_ms
            .and_then(|ms| jiff::Timestamp::from_millisecond(ms as i64).ok())
            .map(Time),
        conditions: vec![condition(
            old,
            WORKERS_STALLED,
            is_stalled,
            reason,
            message,
            None,
            now,
        )],
    }
}

/// Whether `new` is worth a status write, `previous` having been written `age` ago.
pub fn worth_writing(previous: Option<&PoolWorkers>, new: &PoolWorkers, age: Duration) -> bool {
    let Some(old) = previous else {
        return true;
    };
    let figures = |e: &PoolWorkers| {
        (
            e.seen,
            e.busy,
            e.idle,
            e.stalled,
            e.stalled_workers.clone(),
            e.conditions
                .iter()
                .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
                .collect::<Vec<_>>(),
        )
    };
    figures(old) != figures(new)
        || (age >= REFRESH && old.last_heartbeat_time != new.last_heartbeat_time)
}

/// Writes the pools' entries (the follower's whole list: pools no longer followed drop out).
pub async fn write(api: &Api<Celery>, name: &str, entries: &[PoolWorkers]) -> kube::Result<()> {
    let patch = json!({
        "apiVersion": Celery::api_version(&()),
        "kind": Celery::kind(&()),
        "status": {"liveWorkers": entries},
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Time {
        Time(jiff::Timestamp::from_second(1_800_000_000).unwrap())
    }

    #[test]
    fn an_entry_names_its_stalled_workers_and_why() {
        let summary = Summary {
            seen: 3,
            busy: 1,
            idle: 1,
            stalled: vec![("default@p-\u{1b}[31mx".into(), Stall::Silent)],
            last_heartbeat_ms: Some(1_800_000_000_000),
        };
        let e = entry("default", &summary, 60_000, None, None, &now());
        assert_eq!((e.seen, e.busy, e.idle, e.stalled), (3, 1, 1, 1));
        assert_eq!(e.stalled_workers, vec!["default@p-[31mx".to_string()]);
        let c = &e.conditions[0];
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "HeartbeatsStopped")
        );
        assert!(c.message.contains("no heartbeat for 60 s"), "{}", c.message);
        assert_eq!(e.last_heartbeat_time, Some(now()));

        let down = entry(
            "default",
            &summary,
            60_000,
            Some("refused"),
            Some(&e),
            &now(),
        );
        assert_eq!(down.conditions[0].reason, "BrokerUnavailable");
        assert!(worth_writing(Some(&e), &down, Duration::ZERO));
    }

    #[test]
    fn a_newer_heartbeat_alone_waits_for_the_refresh() {
        let mut summary = Summary {
            seen: 1,
            idle: 1,
            last_heartbeat_ms: Some(1_800_000_000_000),
            ..Summary::default()
        };
        let old = entry("p", &summary, 60_000, None, None, &now());
        summary.last_heartbeat_ms = Some(1_800_000_002_000);
        let new = entry("p", &summary, 60_000, None, Some(&old), &now());
        assert!(!worth_writing(Some(&old), &new, Duration::from_secs(5)));
        assert!(worth_writing(Some(&old), &new, REFRESH));
        summary.busy = 1;
        summary.idle = 0;
        let busy = entry("p", &summary, 60_000, None, Some(&old), &now());
        assert!(worth_writing(Some(&old), &busy, Duration::ZERO));
    }
}
