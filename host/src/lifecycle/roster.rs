//! What the operator knows of one resource's workers, from their events: which pod each
//! runs in, whether it is busy, idle or stalled, and the pod deletion cost that follows.
//! Pure: events, queue samples and the time go in; cost writes, stall notices and per-pool
//! figures come out. [`super::follower`] does the IO.
//!
//! A worker's node name is `<pool>@<pod>` (the operator's `--hostname <pool>@%h`, `%h` being
//! the pod's host name, its name). Events naming another pool, or a pod that is not the
//! pool's Deployment's, are ignored: a forged event can at most rank the resource's own pods.

use std::collections::BTreeMap;

use crate::broker::events::{Kind, WorkerEvent};
use crate::workload::Beat;

/// The annotation the ReplicaSet controller reads: on scale-down, pods with a lower cost go
/// first (after pending and not-ready pods).
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
/// The cost of a busy worker's pod.
pub const BUSY_COST: i32 = 100;
/// The cost of an idle worker's pod (also what a pod without the annotation costs).
pub const IDLE_COST: i32 = 0;
/// The cost of a stalled worker's pod: removed first.
pub const STALLED_COST: i32 = -100;
/// A busy worker counts as idle again after this long without a running task. Together
/// with needing two heartbeats in a row with a running task to count as busy, it keeps
/// short tasks from turning every heartbeat into a write.
pub const IDLE_AFTER_MS: u64 = 30_000;
/// Workers followed per resource at most (a Deployment has at most 10,000 replicas).
pub const MAX_WORKERS: usize = 10_000;
/// Cost writes per tick at most; the rest wait for the next tick.
pub const MAX_WRITES_PER_TICK: usize = 20;

/// One pool the operator follows.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolSettings {
    /// Pool name.
    pub name: String,
    /// Its Deployment: its pods are named `<deployment>-<hash>-<suffix>`.
    pub deployment: String,
    /// A worker is stalled after this long without a heartbeat, or without taking a task
    /// while its queues are not empty.
    pub stalled_after_ms: u64,
    /// Its queues (the follower samples them for [`Roster::backlog`]).
    pub queues: Vec<String>,
    /// Whether a stalled worker's pod is evicted (the follower does it).
    pub replace_stalled: bool,
    /// Whether a task may hold up the worker's heartbeats (`solo` runs tasks in the main
    /// process; `gevent` and `eventlet` stop with a task that blocks): a worker that went
    /// silent while running a task is then taken as busy, not stalled.
    pub heartbeats_pause_in_tasks: bool,
}

/// Why a worker is stalled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stall {
    /// Its heartbeats stopped.
    Silent,
    /// It runs nothing and finishes nothing while its queues hold tasks.
    Idle,
}

impl Stall {
    /// In words, for conditions and Events.
    pub fn describe(self, stalled_after_ms: u64) -> String {
        let s = stalled_after_ms / 1000;
        match self {
            Stall::Silent => format!("no heartbeat for {s} s"),
            Stall::Idle => format!("took no task for {s} s while its queues held tasks"),
        }
    }
}

/// A change in a worker's stall state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StallNotice {
    /// Pool name.
    pub pool: String,
    /// The worker's node name.
    pub hostname: String,
    /// Its pod.
    pub pod: String,
    /// The stall, or `None` when the worker recovered.
    pub stall: Option<Stall>,
}

/// What a tick asks of the IO side.
#[derive(Debug, Default, PartialEq)]
pub struct Changes {
    /// Pods whose deletion cost should be written, and the cost; report each outcome with
    /// [`Roster::written`] or [`Roster::gone`].
    pub writes: Vec<(String, i32)>,
    /// Workers that stalled or recovered.
    pub stalls: Vec<StallNotice>,
}

/// One pool's workers in figures.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Workers heard from.
    pub seen: u32,
    /// Busy workers (running a task).
    pub busy: u32,
    /// Idle workers.
    pub idle: u32,
    /// Stalled workers' node names and why, sorted by name.
    pub stalled: Vec<(String, Stall)>,
    /// When the last event of any of its workers arrived, in Unix milliseconds.
    pub last_heartbeat_ms: Option<u64>,
}

#[derive(Debug)]
struct Worker {
    pool: usize,
    hostname: String,
    /// The worker said it started while followed: its pod has no deletion cost yet.
    fresh: bool,
    last_seen_ms: u64,
    /// Heartbeats in a row with a running task.
    busy_streak: u32,
    busy: bool,
    /// Its last event showed a running task.
    running: bool,
    last_active_ms: u64,
    processed: u64,
    /// Tasks running at its last event.
    active: u32,
    /// The last time it ran or finished a task (or was first heard from).
    progress_ms: u64,
    stall: Option<Stall>,
    written: Option<i32>,
}

impl Worker {
    fn cost(&self) -> i32 {
        match (self.stall, self.busy) {
            (Some(_), _) => STALLED_COST,
            (None, true) => BUSY_COST,
            (None, false) => IDLE_COST,
        }
    }
}

/// One resource's workers, by pod name.
#[derive(Debug)]
pub struct Roster {
    pools: Vec<PoolSettings>,
    workers: BTreeMap<String, Worker>,
    /// Per pool: since when its queues have held tasks at every sample.
    backlog_since: Vec<Option<u64>>,
    /// Per pool: tasks its workers started while followed (see [`Beat::started`]).
    started: Vec<u64>,
}

/// Whether `pod` can be a pod of `deployment`: `<deployment>-...`, and a valid object name.
fn is_pod_of(pod: &str, deployment: &str) -> bool {
    pod.len() <= 253
        && pod
            .strip_prefix(deployment)
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|rest| !rest.is_empty())
        && pod
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !pod.ends_with(['-', '.'])
}

impl Roster {
    /// A roster of `pools`' workers.
    pub fn new(pools: Vec<PoolSettings>) -> Self {
        let backlog_since = vec![None; pools.len()];
        let started = vec![0; pools.len()];
        Roster {
            pools,
            workers: BTreeMap::new(),
            backlog_since,
            started,
        }
    }

    /// The pools followed.
    pub fn pools(&self) -> &[PoolSettings] {
        &self.pools
    }

    /// Takes in one event; `false` when it is not about one of the pools' pods.
    pub fn observe(&mut self, event: &WorkerEvent, now_ms: u64) -> bool {
        let Some((pool_name, pod)) = event.hostname.split_once('@') else {
            return false;
        };
        let Some(pool) = self
            .pools
            .iter()
            .position(|p| p.name == pool_name && is_pod_of(pod, &p.deployment))
        else {
            return false;
        };
        if event.kind == Kind::Offline {
            // Stopping: its pod goes with it.
            self.workers.remove(pod);
            return true;
        }
        if !self.workers.contains_key(pod) {
            if self.workers.len() >= MAX_WORKERS {
                return false;
            }
            self.workers.insert(
                pod.to_string(),
                Worker {
                    pool,
                    hostname: event.hostname.clone(),
                    fresh: event.kind == Kind::Online,
                    last_seen_ms: now_ms,
                    busy_streak: 0,
                    busy: false,
                    running: false,
                    last_active_ms: 0,
                    processed: event.processed,
                    active: 0,
                    progress_ms: now_ms,
                    stall: None,
                    written: None,
                },
            );
        }
        let w = self.workers.get_mut(pod).expect("inserted above");
        w.last_seen_ms = now_ms;
        w.running = event.active > 0;
        w.active = event.active;
        if event.active > 0 {
            w.busy_streak = w.busy_streak.saturating_add(1);
            w.last_active_ms = now_ms;
            w.progress_ms = now_ms;
            if w.busy_streak >= 2 {
                w.busy = true;
            }
        } else {
            w.busy_streak = 0;
        }
        if event.processed != w.processed {
            // A restarted worker (same pod, new process) counts from zero again.
            self.started[pool] += event.processed.saturating_sub(w.processed);
            w.processed = event.processed;
            w.progress_ms = now_ms;
        }
        true
    }

    /// Takes in how many tasks wait in `pool`'s queues (`None`: unknown).
    pub fn backlog(&mut self, pool: &str, waiting: Option<u64>, now_ms: u64) {
        if let Some(i) = self.pools.iter().position(|p| p.name == pool) {
            self.backlog_since[i] = match waiting {
                Some(n) if n > 0 => Some(self.backlog_since[i].unwrap_or(now_ms)),
                _ => None,
            };
        }
    }

    /// Reclassifies every worker at `now_ms`.
    pub fn tick(&mut self, now_ms: u64) -> Changes {
        let mut changes = Changes::default();
        for (pod, w) in &mut self.workers {
            let settings = &self.pools[w.pool];
            let paused_by_a_task = settings.heartbeats_pause_in_tasks && w.running;
            if w.busy
                && !paused_by_a_task
                && now_ms.saturating_sub(w.last_active_ms) >= IDLE_AFTER_MS
            {
                w.busy = false;
            }
            let silent = now_ms.saturating_sub(w.last_seen_ms) > settings.stalled_after_ms
                && !paused_by_a_task;
            let idle_with_backlog = self.backlog_since[w.pool].is_some_and(|since| {
                now_ms.saturating_sub(since.max(w.progress_ms)) > settings.stalled_after_ms
            });
            let stall = if silent {
                Some(Stall::Silent)
            } else if idle_with_backlog {
                Some(Stall::Idle)
            } else {
                None
            };
            if stall != w.stall {
                w.stall = stall;
                changes.stalls.push(StallNotice {
                    pool: settings.name.clone(),
                    hostname: w.hostname.clone(),
                    pod: pod.clone(),
                    stall,
                });
            }
        }
        let mut writes: Vec<(String, i32)> = self
            .workers
            .iter()
            .filter(|(_, w)| {
                let cost = w.cost();
                // A pod whose worker started while followed has no annotation: idle is
                // what it costs already.
                w.written != Some(cost) && !(w.written.is_none() && w.fresh && cost == IDLE_COST)
            })
            .map(|(pod, w)| (pod.clone(), w.cost()))
            .collect();
        // Protecting busy workers matters most, then removing stalled ones first.
        writes.sort_by_key(|(_, cost)| std::cmp::Reverse(cost.abs()));
        writes.truncate(MAX_WRITES_PER_TICK);
        changes.writes = writes;
        changes
    }

    /// `pod`'s deletion cost is now `cost`.
    pub fn written(&mut self, pod: &str, cost: i32) {
        if let Some(w) = self.workers.get_mut(pod) {
            w.written = Some(cost);
        }
    }

    /// The event stream was lost until `now_ms`: what workers did meanwhile is unknown, so
    /// their silence counts from now.
    pub fn reconnected(&mut self, now_ms: u64) {
        for w in self.workers.values_mut() {
            w.last_seen_ms = w.last_seen_ms.max(now_ms);
        }
    }

    /// `pod` does not exist: its worker is forgotten.
    pub fn gone(&mut self, pod: &str) {
        self.workers.remove(pod);
    }

    /// What the pool `pool`'s live (not stalled) workers do at `now_ms`, for its
    /// [`crate::workload`] figures.
    pub fn beat(&self, pool: &str, now_ms: u64) -> Option<Beat> {
        let index = self.pools.iter().position(|p| p.name == pool)?;
        let mut beat = Beat {
            at_ms: now_ms,
            started: self.started[index],
            ..Beat::default()
        };
        for w in self
            .workers
            .values()
            .filter(|w| w.pool == index && w.stall.is_none())
        {
            beat.workers += 1;
            beat.running += w.active;
        }
        Some(beat)
    }

    /// The figures of the pool `pool`.
    pub fn summary(&self, pool: &str) -> Summary {
        let mut s = Summary::default();
        for w in self
            .workers
            .values()
            .filter(|w| self.pools[w.pool].name == pool)
        {
            s.seen += 1;
            match (w.stall, w.busy) {
                (Some(stall), _) => s.stalled.push((w.hostname.clone(), stall)),
                (None, true) => s.busy += 1,
                (None, false) => s.idle += 1,
            }
            s.last_heartbeat_ms = s.last_heartbeat_ms.max(Some(w.last_seen_ms));
        }
        s.stalled.sort();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALLED_AFTER: u64 = 20_000;

    fn roster() -> Roster {
        Roster::new(vec![PoolSettings {
            name: "default".into(),
            deployment: "app-worker-default".into(),
            stalled_after_ms: STALLED_AFTER,
            queues: vec!["celery".into()],
            replace_stalled: false,
            heartbeats_pause_in_tasks: false,
        }])
    }

    fn event(pod: &str, kind: Kind, active: u32, processed: u64) -> WorkerEvent {
        WorkerEvent {
            hostname: format!("default@{pod}"),
            kind,
            active,
            processed,
            freq: 2.0,
        }
    }

    const A: &str = "app-worker-default-5d9f-aaaaa";
    const B: &str = "app-worker-default-5d9f-bbbbb";

    /// Heartbeats every 2 s from `from_ms` to `to_ms` (exclusive), ticking after each.
    fn beat(r: &mut Roster, pod: &str, active: u32, from_ms: u64, to_ms: u64) -> Vec<Changes> {
        (from_ms..to_ms)
            .step_by(2000)
            .map(|t| {
                r.observe(&event(pod, Kind::Heartbeat, active, 0), t);
                let c = r.tick(t);
                for (pod, cost) in &c.writes {
                    r.written(pod, *cost);
                }
                c
            })
            .collect()
    }

    #[test]
    fn only_the_resource_s_own_pods_are_followed() {
        let mut r = roster();
        assert!(r.observe(&event(A, Kind::Heartbeat, 0, 0), 0));
        for hostname in [
            "celery@app-worker-default-5d9f-aaaaa",
            "default@other-5d9f-aaaaa",
            "default@app-worker-default",
            "default@app-worker-default-",
            "default@app-worker-default-X",
            "default@app-worker-default-a/b",
            "no-at-sign",
        ] {
            let e = WorkerEvent {
                hostname: hostname.into(),
                ..event(A, Kind::Heartbeat, 1, 0)
            };
            assert!(!r.observe(&e, 0), "{hostname}");
        }
        assert_eq!(r.summary("default").seen, 1);
    }

    #[test]
    fn a_long_task_makes_a_worker_busy_and_short_blips_do_not() {
        let mut r = roster();
        r.observe(&event(A, Kind::Online, 0, 0), 0);
        assert_eq!(
            r.tick(0),
            Changes::default(),
            "a fresh idle pod costs 0 already"
        );
        // One heartbeat with a task running (a short task): still idle, nothing written.
        let c = beat(&mut r, A, 1, 2000, 4000);
        assert!(c[0].writes.is_empty());
        beat(&mut r, A, 0, 4000, 6000);
        // A task seen at two heartbeats in a row: busy.
        let c = beat(&mut r, A, 1, 6000, 10_000);
        assert_eq!(c[1].writes, vec![(A.to_string(), BUSY_COST)]);
        assert_eq!(r.summary("default").busy, 1);
        // Idle again only after IDLE_AFTER_MS without a task.
        let c = beat(&mut r, A, 0, 10_000, 10_000 + IDLE_AFTER_MS + 2000);
        let writes: Vec<_> = c.iter().flat_map(|c| c.writes.clone()).collect();
        assert_eq!(writes, vec![(A.to_string(), IDLE_COST)]);
        assert_eq!(r.summary("default").idle, 1);
    }

    #[test]
    fn a_worker_found_already_running_gets_its_cost_written_once() {
        // Heard first through a heartbeat (the operator restarted): its pod may carry an old
        // cost, so even idle is written, once.
        let mut r = roster();
        let c = beat(&mut r, A, 0, 0, 10_000);
        assert_eq!(c[0].writes, vec![(A.to_string(), IDLE_COST)]);
        assert!(c[1..].iter().all(|c| c.writes.is_empty()));
    }

    #[test]
    fn a_silent_worker_stalls_and_recovers_when_heard_again() {
        let mut r = roster();
        beat(&mut r, A, 0, 0, 4000);
        beat(&mut r, B, 0, 0, 4000);
        // A keeps beating, B goes silent (SIGSTOP).
        let changes = beat(&mut r, A, 0, 4000, 4000 + STALLED_AFTER + 4000);
        let stalls: Vec<_> = changes.iter().flat_map(|c| c.stalls.clone()).collect();
        assert_eq!(stalls.len(), 1);
        assert_eq!(stalls[0].pod, B);
        assert_eq!(stalls[0].stall, Some(Stall::Silent));
        let writes: Vec<_> = changes.iter().flat_map(|c| c.writes.clone()).collect();
        assert_eq!(writes, vec![(B.to_string(), STALLED_COST)]);
        let s = r.summary("default");
        let stalled = vec![(format!("default@{B}"), Stall::Silent)];
        assert_eq!((s.seen, s.idle, s.stalled), (2, 1, stalled));
        // SIGCONT: heard again, recovered, idle cost again.
        let now = 4000 + STALLED_AFTER + 4000;
        r.observe(&event(B, Kind::Heartbeat, 0, 0), now);
        let c = r.tick(now);
        assert_eq!(c.stalls[0].stall, None);
        assert_eq!(c.writes, vec![(B.to_string(), IDLE_COST)]);
    }

    #[test]
    fn a_solo_worker_silent_in_a_long_task_stays_busy() {
        let mut r = roster();
        r.pools[0].heartbeats_pause_in_tasks = true;
        beat(&mut r, A, 1, 0, 4000);
        beat(&mut r, B, 0, 0, 4000);
        // Both go silent: A in the middle of its task (a solo pool's main process runs it),
        // B idle.
        let later = 4000 + 10 * STALLED_AFTER;
        let c = r.tick(later);
        let stalled: Vec<&str> = c.stalls.iter().map(|s| s.pod.as_str()).collect();
        assert_eq!(stalled, [B]);
        assert_eq!(r.summary("default").busy, 1);
    }

    #[test]
    fn an_idle_worker_beside_a_backlog_stalls_until_it_takes_a_task() {
        let mut r = roster();
        beat(&mut r, A, 0, 0, 2000);
        let mut stalled_at = None;
        for t in (2000..2000 + STALLED_AFTER + 6000).step_by(2000) {
            r.backlog("default", Some(5), t);
            r.observe(&event(A, Kind::Heartbeat, 0, 0), t);
            if r.tick(t)
                .stalls
                .iter()
                .any(|s| s.stall == Some(Stall::Idle))
            {
                stalled_at.get_or_insert(t);
            }
        }
        let stalled_at = stalled_at.expect("stalled");
        assert!(stalled_at > 2000 + STALLED_AFTER, "{stalled_at}");
        // It finishes a task: recovered.
        let t = stalled_at + 10_000;
        r.observe(&event(A, Kind::Heartbeat, 0, 1), t);
        assert_eq!(r.tick(t).stalls[0].stall, None);
        // An empty queue never stalls anyone.
        r.backlog("default", Some(0), t);
        assert!(
            r.tick(t + 10 * STALLED_AFTER)
                .stalls
                .iter()
                .all(|s| s.stall != Some(Stall::Idle))
        );
    }

    #[test]
    fn offline_and_gone_workers_are_forgotten_and_writes_are_rationed() {
        let mut r = roster();
        beat(&mut r, A, 0, 0, 2000);
        r.observe(&event(A, Kind::Offline, 0, 0), 2000);
        assert_eq!(r.summary("default").seen, 0);
        for i in 0..(MAX_WRITES_PER_TICK + 5) {
            let pod = format!("app-worker-default-5d9f-{i}");
            r.observe(&event(&pod, Kind::Heartbeat, 1, 0), 0);
            r.observe(&event(&pod, Kind::Heartbeat, 1, 0), 2000);
        }
        let c = r.tick(2000);
        assert_eq!(c.writes.len(), MAX_WRITES_PER_TICK);
        for (pod, _) in &c.writes {
            r.gone(pod);
        }
        assert_eq!(r.tick(2000).writes.len(), 5);
        assert_eq!(r.summary("default").seen, 5);
    }

    #[test]
    fn beats_count_started_tasks_and_running_ones_of_live_workers() {
        let mut r = roster();
        let (a, b) = (
            "app-worker-default-7d9f-aaaaa",
            "app-worker-default-7d9f-bbbbb",
        );
        // First events set each worker's baseline: tasks started before are not counted.
        r.observe(&event(a, Kind::Heartbeat, 2, 50), 0);
        r.observe(&event(b, Kind::Heartbeat, 0, 7), 0);
        assert_eq!(
            r.beat("default", 0),
            Some(Beat {
                at_ms: 0,
                started: 0,
                running: 2,
                workers: 2
            })
        );
        r.observe(&event(a, Kind::Heartbeat, 3, 56), 2000);
        r.observe(&event(b, Kind::Heartbeat, 1, 9), 2000);
        assert_eq!(
            r.beat("default", 2000),
            Some(Beat {
                at_ms: 2000,
                started: 8,
                running: 4,
                workers: 2
            })
        );
        // b restarts in the same pod: its count starts again from zero, nothing is lost.
        r.observe(&event(b, Kind::Heartbeat, 1, 1), 4000);
        r.observe(&event(a, Kind::Heartbeat, 0, 57), 4000);
        assert_eq!(r.beat("default", 4000).unwrap().started, 9);
        // A stalled worker is not live.
        r.tick(4000 + STALLED_AFTER + 1);
        assert_eq!(
            r.beat("default", 4000 + STALLED_AFTER + 1).unwrap().workers,
            0
        );
        assert_eq!(r.beat("other", 0), None);
    }
}
