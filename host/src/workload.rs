//! What a pool's workers get done, in figures: tasks finished and arriving per second, how
//! long a task runs, how busy the worker processes are and how long a task waits. Measured
//! from what Celery already emits (each worker's heartbeat carries its running task count
//! and the tasks it started) and from the broker's queue samples, then handed to the scaler
//! plugin (WIT `celery:operator@0.2.0`), the status and the metrics.
//!
//! Pure: the lifecycle follower records a [`Beat`] per pool every second into the shared
//! [`Workloads`]; the scaler asks for the pool's [`Figures`] at each tick.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// How far back the rates look.
pub const WINDOW_MS: u64 = 30_000;
/// Rates over less than this are not trusted (heartbeats come every 2 s).
pub const MIN_SPAN_MS: u64 = 5_000;
/// A pool not heard of for this long is forgotten.
const FORGET_AFTER_MS: u64 = 10 * 60 * 1000;

/// One look at a pool's workers, from their latest heartbeats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Beat {
    /// When, in Unix milliseconds.
    pub at_ms: u64,
    /// Tasks the pool's workers started since the follower began (Celery's `processed`,
    /// summed over the increments seen): a counter, only differences mean anything.
    pub started: u64,
    /// Tasks running now, over the pool's live workers.
    pub running: u32,
    /// Live workers.
    pub workers: u32,
}

/// A pool's figures. Each is `None` when unknown, never zero for unknown.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Figures {
    /// Seconds the rates were measured over.
    pub window_seconds: Option<f64>,
    /// Tasks finished per second.
    pub completion_rate: Option<f64>,
    /// Tasks arriving per second: started plus the growth of the waiting backlog.
    pub arrival_rate: Option<f64>,
    /// Mean seconds a task runs (mean running tasks over the completion rate).
    pub service_seconds: Option<f64>,
    /// Share of the worker processes running a task, 0 to 1.
    pub busy_fraction: Option<f64>,
    /// Worker processes per replica.
    pub concurrency: Option<u32>,
    /// Tasks running now.
    pub running: Option<u32>,
    /// Live workers now.
    pub workers: Option<u32>,
}

/// The waiting backlog of a pool at one probe: `(Unix milliseconds, ready tasks)`.
pub type Waiting = (u64, u64);

impl Figures {
    /// The figures of `beats` (oldest first) over the last [`WINDOW_MS`] before `now_ms`,
    /// with the pool's `backlog` samples (oldest first) for the arrival rate and its
    /// `concurrency` for the busy fraction.
    pub fn measure(
        beats: &VecDeque<Beat>,
        backlog: &[Waiting],
        concurrency: Option<u32>,
        now_ms: u64,
    ) -> Figures {
        let mut figures = Figures {
            concurrency,
            ..Figures::default()
        };
        let recent: Vec<&Beat> = beats
            .iter()
            .filter(|b| b.at_ms + WINDOW_MS >= now_ms && b.at_ms <= now_ms)
            .collect();
        let (Some(first), Some(last)) = (recent.first(), recent.last()) else {
            return figures;
        };
        figures.running = Some(last.running);
        figures.workers = Some(last.workers);
        let span_ms = last.at_ms - first.at_ms;
        if span_ms < MIN_SPAN_MS {
            return figures;
        }
        let span = span_ms as f64 / 1000.0;
        figures.window_seconds = Some(span);
        // Time-weighted means of the running tasks and the workers over the window.
        let (mut running, mut workers) = (0.0, 0.0);
        for pair in recent.windows(2) {
            let dt = (pair[1].at_ms - pair[0].at_ms) as f64 / 1000.0;
            running += f64::from(pair[0].running) * dt;
            workers += f64::from(pair[0].workers) * dt;
        }
        let (running, workers) = (running / span, workers / span);
        let started = last.started.saturating_sub(first.started) as f64 / span;
        // Started tasks that are still running are not finished.
        let finished = started - (f64::from(last.running) - f64::from(first.running)) / span;
        let completion = finished.max(0.0);
        figures.completion_rate = Some(completion);
        if completion > 0.0 {
            figures.service_seconds = Some(running / completion);
        }
        if let Some(c) = concurrency.filter(|c| *c > 0)
            && workers > 0.0
        {
            figures.busy_fraction = Some((running / (workers * f64::from(c))).clamp(0.0, 1.0));
        }
        // The backlog's growth over (about) the same span.
        let at_or_before = |t: u64| backlog.iter().rev().find(|(at, _)| *at <= t);
        if let (Some(then), Some(now)) = (
            at_or_before(first.at_ms).or(backlog.first()),
            backlog.last(),
        ) && now.0 > then.0
        {
            let growth = (now.1 as f64 - then.1 as f64) / ((now.0 - then.0) as f64 / 1000.0);
            figures.arrival_rate = Some((started + growth).max(0.0));
        }
        figures
    }

    /// How long a task sent now would wait before a worker takes it, in seconds: the oldest
    /// waiting task's age when the broker knows it (`oldest_wait_ms`), else the waiting
    /// backlog drained at the completion rate; `None` when neither is known.
    pub fn expected_wait(&self, ready: Option<u64>, oldest_wait_ms: Option<u64>) -> Option<f64> {
        if let Some(ms) = oldest_wait_ms {
            return Some(ms as f64 / 1000.0);
        }
        match (ready?, self.completion_rate) {
            (0, _) => Some(0.0),
            (n, Some(rate)) if rate > 0.0 => Some(n as f64 / rate),
            _ => None,
        }
    }
}

/// Every followed pool's recent beats, shared by the lifecycle followers (which record) and
/// the scaler loops (which read). Keyed by namespace, resource and pool.
#[derive(Default)]
pub struct Workloads {
    pools: Mutex<HashMap<(String, String, String), VecDeque<Beat>>>,
}

impl Workloads {
    /// Records a beat of the pool `pool` of the resource `celery` in `namespace`.
    pub fn record(&self, namespace: &str, celery: &str, pool: &str, beat: Beat) {
        let mut pools = self.pools.lock().expect("workloads lock");
        pools.retain(|_, beats| {
            beats
                .back()
                .is_some_and(|b| b.at_ms + FORGET_AFTER_MS >= beat.at_ms)
        });
        let beats = pools
            .entry((namespace.into(), celery.into(), pool.into()))
            .or_default();
        beats.push_back(beat);
        while beats
            .front()
            .is_some_and(|b| b.at_ms + WINDOW_MS < beat.at_ms)
        {
            beats.pop_front();
        }
    }

    /// The recent beats of a pool, by namespace, resource and pool (empty when its workers
    /// are not followed).
    pub fn beats(&self, (namespace, celery, pool): (&str, &str, &str)) -> VecDeque<Beat> {
        let pools = self.pools.lock().expect("workloads lock");
        pools
            .get(&(namespace.into(), celery.into(), pool.into()))
            .cloned()
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Beats every second from `from` for `seconds`: `rate` tasks started per second,
    /// `running` running, 2 workers.
    fn steady(from_ms: u64, seconds: u64, rate: u64, running: u32) -> VecDeque<Beat> {
        (0..=seconds)
            .map(|s| Beat {
                at_ms: from_ms + s * 1000,
                started: 100 + s * rate,
                running,
                workers: 2,
            })
            .collect()
    }

    #[test]
    fn steady_work_gives_littles_law() {
        // 4 tasks/s, 8 running: each task runs 2 s; 8 of 2 x 8 processes busy.
        let beats = steady(0, 30, 4, 8);
        let backlog = [(0, 10), (30_000, 10)];
        let f = Figures::measure(&beats, &backlog, Some(8), 30_000);
        assert_eq!(f.window_seconds, Some(30.0));
        assert_eq!(f.completion_rate, Some(4.0));
        assert_eq!(f.service_seconds, Some(2.0));
        assert_eq!(f.busy_fraction, Some(0.5));
        assert_eq!(f.arrival_rate, Some(4.0));
        assert_eq!((f.running, f.workers), (Some(8), Some(2)));
        // 10 waiting, drained at 4/s.
        assert_eq!(f.expected_wait(Some(10), None), Some(2.5));
        assert_eq!(f.expected_wait(Some(10), Some(7_500)), Some(7.5));
    }

    #[test]
    fn a_growing_backlog_adds_to_the_arrivals() {
        let beats = steady(0, 30, 4, 8);
        // 60 more waiting after 30 s: 2/s more than the workers start.
        let backlog = [(0, 0), (15_000, 30), (30_000, 60)];
        let f = Figures::measure(&beats, &backlog, None, 30_000);
        assert_eq!(f.arrival_rate, Some(6.0));
        assert_eq!(f.busy_fraction, None, "no concurrency, no busy fraction");
    }

    #[test]
    fn tasks_started_but_not_finished_are_not_completions() {
        // 10 tasks started over 10 s and all still running: nothing finished yet.
        let beats: VecDeque<Beat> = (0..=10)
            .map(|s| Beat {
                at_ms: s * 1000,
                started: s,
                running: s as u32,
                workers: 1,
            })
            .collect();
        let f = Figures::measure(&beats, &[], Some(10), 10_000);
        assert_eq!(f.completion_rate, Some(0.0));
        assert_eq!(f.service_seconds, None, "unknown, not zero");
        assert_eq!(f.arrival_rate, None, "no backlog samples");
        assert_eq!(f.expected_wait(Some(3), None), None);
        assert_eq!(f.expected_wait(Some(0), None), Some(0.0));
    }

    #[test]
    fn too_little_history_is_unknown() {
        let f = Figures::measure(&steady(0, 3, 4, 8), &[], Some(8), 3_000);
        assert_eq!(f.completion_rate, None);
        assert_eq!(f.running, Some(8));
        let f = Figures::measure(&VecDeque::new(), &[], Some(8), 3_000);
        assert_eq!(
            f,
            Figures {
                concurrency: Some(8),
                ..Figures::default()
            }
        );
        // Old beats are outside the window.
        let f = Figures::measure(&steady(0, 30, 4, 8), &[], None, 100_000);
        assert_eq!((f.running, f.completion_rate), (None, None));
    }

    #[test]
    fn the_store_keeps_one_window_per_pool_and_forgets_silent_pools() {
        let w = Workloads::default();
        for b in steady(0, 60, 2, 4) {
            w.record("ns", "app", "a", b);
        }
        let beats = w.beats(("ns", "app", "a"));
        assert_eq!(beats.len(), 31, "the last 30 s");
        let f = Figures::measure(&beats, &[], Some(4), 60_000);
        assert_eq!(f.window_seconds, Some(30.0));
        assert_eq!(f.completion_rate, Some(2.0));
        assert!(w.beats(("ns", "app", "b")).is_empty());
        w.record(
            "ns",
            "app",
            "b",
            Beat {
                at_ms: 60_000 + FORGET_AFTER_MS + 1,
                ..Beat::default()
            },
        );
        assert_eq!(w.pools.lock().unwrap().len(), 1, "pool a was forgotten");
    }
}
