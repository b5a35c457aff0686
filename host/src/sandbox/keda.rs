//! A simulation, second by second, of the same load scaled by KEDA and the HPA with their
//! defaults, to plot beside the operator's real run. It is a model, not KEDA:
//!
//! - KEDA's Redis scaler reports the queue's length (`LLEN`): tasks waiting, not those
//!   workers already took (running or prefetched);
//! - the HPA reads it every 15 s (its sync period; here at 7 s, 22 s, ...: half a period
//!   after the load starts, the average case), wants `ceil(length / target)` replicas
//!   unless within its 10 % tolerance, scales up by at most max(100 %, 4 pods) per 15 s, and
//!   down to the highest recommendation of the last 300 s (stabilization window);
//! - with `minReplicas: 0`, KEDA itself activates the pool from 0 on its 30 s polling (at
//!   15 s, 45 s, ...);
//! - a new worker is ready `startup` seconds after it was asked for (as measured in the real
//!   run); a worker taken away finishes what it runs (warm shutdown) and its prefetched
//!   tasks go back to the queue.

use std::collections::VecDeque;

use super::load::Trace;
use super::report::{Sample, Series};
use crate::crd::WorkerPool;

/// KEDA's default `pollingInterval`.
const KEDA_POLL: u64 = 30;
/// The HPA's default sync period (`--horizontal-pod-autoscaler-sync-period`).
const HPA_SYNC: u64 = 15;
/// The HPA's default scale-down stabilization window.
const DOWN_WINDOW: u64 = 300;
/// The HPA's default tolerance.
const TOLERANCE: f64 = 0.1;
/// When, within their periods, the HPA syncs and KEDA polls: half way, the average case
/// (their phase against the load's start is anybody's guess).
const HPA_PHASE: u64 = HPA_SYNC / 2;
const KEDA_PHASE: u64 = KEDA_POLL / 2;

/// What the simulation needs of a pool.
#[derive(Clone, Debug, PartialEq)]
pub struct Pool {
    pub min: u32,
    pub max: u32,
    /// Tasks per replica (the queue-length target).
    pub target: f64,
    pub concurrency: u32,
    pub prefetch: u32,
    /// Seconds from a scale-up request to the new worker taking tasks.
    pub startup: u64,
}

impl Pool {
    /// The pool of a Celery resource; a worker's startup time from the real run's samples
    /// (from the first scale-up request to the first added worker ready; 12 s when the run
    /// did not scale up).
    pub fn from_spec(pool: &WorkerPool, samples: &[Sample]) -> Pool {
        let a = pool.autoscaling.as_ref();
        let r = super::report::reaction(samples);
        let startup = match (r.to_scale_request, r.to_ready) {
            (Some(asked), Some(ready)) if ready >= asked => (ready - asked).round() as u64,
            _ => 12,
        };
        Pool {
            min: a.map_or(1, |a| a.min_replicas.max(0) as u32),
            max: a.map_or(1, |a| a.max_replicas.max(1) as u32),
            target: a.and_then(crate::scaler::target_per_replica).unwrap_or(1.0),
            concurrency: pool.concurrency.unwrap_or(1).max(1) as u32,
            prefetch: pool.prefetch_multiplier.unwrap_or(4).max(1) as u32,
            startup,
        }
    }
}

/// One simulated second.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Step {
    pub t: u64,
    /// Tasks waiting (what KEDA sees).
    pub queued: u64,
    /// Tasks taken by workers: running or prefetched.
    pub reserved: u64,
    /// Replicas the HPA asked for.
    pub desired: u32,
    /// Workers ready.
    pub ready: u32,
}

/// The simulated run.
#[derive(Clone, Debug, Default)]
pub struct Simulation {
    pub steps: Vec<Step>,
    /// When the last task completed (seconds), if every task did within the simulation.
    pub finished: Option<u64>,
}

/// Simulates `trace` on `pool` for at least `seconds` (and until every task completed and
/// the pool is back at its minimum, at most a day).
pub fn simulate(trace: &Trace, pool: &Pool, seconds: f64) -> Simulation {
    let total = trace.total_tasks();
    let mut waiting: VecDeque<f64> = VecDeque::new();
    // Per worker (oldest first): when it is ready, and the tasks it took (start, end).
    let mut workers: Vec<(u64, Vec<(f64, f64)>)> = (0..pool.min).map(|_| (0, Vec::new())).collect();
    // Tasks of workers taken away, run to their end.
    let mut draining: Vec<f64> = Vec::new();
    let mut desired = pool.min;
    let mut recommendations: VecDeque<(u64, u32)> = VecDeque::new();
    let mut done = 0u64;
    let mut sim = Simulation::default();
    let limit = 24 * 3600;
    for t in 0..limit {
        if let Some(s) = trace.seconds.get(t as usize) {
            waiting.extend(std::iter::repeat_n(s.task_seconds, s.tasks as usize));
        }
        let now = t as f64;
        // Tasks end.
        for (_, tasks) in &mut workers {
            let before = tasks.len();
            tasks.retain(|(_, end)| *end > now);
            done += (before - tasks.len()) as u64;
        }
        let before = draining.len();
        draining.retain(|end| *end > now);
        done += (before - draining.len()) as u64;
        // Ready workers take tasks: up to concurrency running, prefetch x concurrency more
        // reserved (counted as running here: they leave the queue either way).
        let take = pool.concurrency * (1 + pool.prefetch);
        for (ready_at, tasks) in &mut workers {
            if *ready_at > t {
                continue;
            }
            while (tasks.len() as u32) < take {
                let Some(d) = waiting.pop_front() else { break };
                // A prefetched task starts when a slot frees: when the task `concurrency`
                // places before it ends.
                let start = if (tasks.len() as u32) < pool.concurrency {
                    now
                } else {
                    tasks[tasks.len() - pool.concurrency as usize].1
                };
                tasks.push((start, start + d));
            }
        }
        let reserved: u64 =
            workers.iter().map(|w| w.1.len() as u64).sum::<u64>() + draining.len() as u64;
        let queued = waiting.len() as u64;

        // The autoscalers.
        let current = workers.len() as u32;
        if desired == 0 && t % KEDA_POLL == KEDA_PHASE && queued > 0 {
            desired = 1;
        } else if current > 0 && t % HPA_SYNC == HPA_PHASE {
            let raw = (queued as f64 / pool.target).ceil() as u32;
            let ratio = queued as f64 / (pool.target * f64::from(current));
            let recommended = if (ratio - 1.0).abs() <= TOLERANCE {
                current
            } else {
                raw
            }
            .clamp(pool.min.max(1), pool.max);
            recommendations.push_back((t, recommended));
            while recommendations
                .front()
                .is_some_and(|(at, _)| at + DOWN_WINDOW < t)
            {
                recommendations.pop_front();
            }
            // The HPA's stabilization: up to this recommendation (at most max(2x, +4)), down
            // no lower than the highest recommendation of the window.
            let down = recommendations
                .iter()
                .map(|r| r.1)
                .max()
                .unwrap_or(recommended);
            let next = if recommended > current {
                recommended.min((current * 2).max(current + 4))
            } else {
                down.min(current)
            };
            desired = next;
            // KEDA takes an idle pool with `minReplicas: 0` back to zero.
            if pool.min == 0 && queued == 0 && reserved == 0 && t % KEDA_POLL == KEDA_PHASE {
                let idle_for = recommendations.iter().all(|r| r.1 <= 1);
                if idle_for {
                    desired = 0;
                }
            }
        }
        while (workers.len() as u32) < desired {
            workers.push((t + pool.startup, Vec::new()));
        }
        while (workers.len() as u32) > desired {
            let (_, tasks) = workers.pop().expect("a worker");
            // Running tasks finish (warm shutdown); prefetched ones go back to the queue.
            for (start, end) in tasks.into_iter().rev() {
                if start <= now {
                    draining.push(end);
                } else {
                    waiting.push_front(end - start);
                }
            }
        }
        let ready = workers.iter().filter(|w| w.0 <= t).count() as u32;
        sim.steps.push(Step {
            t,
            queued,
            reserved,
            desired,
            ready,
        });
        // Every task sent, and every one completed.
        if done >= total && sim.finished.is_none() && t as usize + 1 >= trace.duration() {
            sim.finished = Some(t);
        }
        if now >= seconds && sim.finished.is_some() && desired <= pool.min.max(1) {
            break;
        }
    }
    sim
}

impl Simulation {
    /// Lines to plot beside the real run.
    pub fn series(&self) -> Vec<Series<'static>> {
        vec![
            Series {
                label: "simulated KEDA + HPA: backlog",
                points: self
                    .steps
                    .iter()
                    .map(|s| (s.t as f64, (s.queued + s.reserved) as f64))
                    .collect(),
            },
            Series {
                label: "simulated KEDA + HPA: replicas",
                points: self
                    .steps
                    .iter()
                    .map(|s| (s.t as f64, f64::from(s.desired)))
                    .collect(),
            },
        ]
    }

    /// Worker-seconds spent.
    pub fn replica_seconds(&self) -> f64 {
        self.steps.iter().map(|s| f64::from(s.ready)).sum()
    }
}

/// The comparison's paragraph in the report.
pub fn summary(sim: &Simulation, samples: &[Sample], total: u64) -> String {
    let real = super::report::reaction(samples);
    let first_backlog = sim
        .steps
        .iter()
        .find(|s| s.queued + s.reserved > 0)
        .map(|s| s.t);
    let start = sim.steps.first().map_or(0, |s| s.ready);
    let first_up = first_backlog.and_then(|t0| {
        sim.steps
            .iter()
            .find(|s| s.t >= t0 && s.desired > start)
            .map(|s| s.t - t0)
    });
    let secs = |v: Option<f64>| v.map_or("never".to_string(), |v| format!("{v:.1} s"));
    format!(
        "## Compared with KEDA + HPA (a simulation, not a run)\n\n\
         The same trace through a model of KEDA's Redis scaler and the HPA with their defaults \
         (queue length only, 15 s HPA sync, 30 s KEDA polling, 300 s scale-down \
         stabilization; see `host/src/sandbox/keda.rs`), dashed in the plot.\n\n\
         | | operator (real run) | KEDA + HPA (simulated) |\n|---|---|---|\n\
         | first backlog -> scale-up asked for | {} | {} |\n\
         | most replicas | {} | {} |\n\
         | worker-seconds spent | {:.0} | {:.0} |\n\
         | last task completed | {} | {} |\n",
        secs(real.to_scale_request),
        secs(first_up.map(|s| s as f64)),
        samples.iter().map(|s| s.desired).max().unwrap_or(0),
        sim.steps.iter().map(|s| s.desired).max().unwrap_or(0),
        super::report::replica_seconds(samples),
        sim.replica_seconds(),
        secs(samples.iter().find(|s| s.done >= total).map(|s| s.t)),
        secs(sim.finished.map(|t| t as f64)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::load::{Profile, Second};

    fn pool() -> Pool {
        Pool {
            min: 1,
            max: 8,
            target: 4.0,
            concurrency: 4,
            prefetch: 1,
            startup: 10,
        }
    }

    #[test]
    fn a_burst_waits_for_the_hpa_sync_and_the_window() {
        let trace = Profile::Burst.trace(1, 100.0, 5.0);
        let sim = simulate(&trace, &pool(), 0.0);
        let desired = |t: u64| sim.steps[t as usize].desired;
        // The HPA's first sync (t = 7) sees the burst: at most max(2x, +4) = 5.
        assert_eq!(desired(6), 1);
        assert_eq!(desired(7), 5);
        // Not before the next sync, 15 s later.
        assert_eq!(desired(21), 5);
        let peak = desired(22);
        assert!(peak > 5, "{peak}");
        let finished = sim.finished.expect("every task completes");
        // Scale-down only after 300 s of lower recommendations.
        let first_down = sim.steps[22..]
            .iter()
            .position(|s| s.desired < peak)
            .unwrap() as u64
            + 22;
        assert!(first_down >= 300, "scaled down at {first_down}");
        assert!(finished < first_down, "{finished} {first_down}");
        assert_eq!(sim.steps.last().unwrap().desired, 1);
    }

    #[test]
    fn minimum_zero_waits_for_keda_polling() {
        let second = |tasks| Second {
            tasks,
            task_seconds: 1.0,
        };
        let mut seconds = vec![second(0); 31];
        seconds.push(second(4));
        let trace = Trace { seconds };
        let sim = simulate(&trace, &Pool { min: 0, ..pool() }, 0.0);
        // Tasks arrive at 31 s; KEDA polls at 45 s.
        let up = sim.steps.iter().position(|s| s.desired > 0).unwrap();
        assert_eq!(up, 45);
        assert!(sim.finished.is_some());
    }
}
