//! How many pod-deletion-cost writes the event follower sends with 50 workers, per workload:
//! the operator's [`Roster`] (the code that decides every write) fed 30 simulated minutes of
//! heartbeats, every 2 s per worker as Celery sends them, ticked every second as the
//! follower ticks it. Beside it, what a naive follower would write: one write whenever a
//! worker's heartbeat flips between running a task and not.
//!
//! `cargo bench -p celery-operator --bench deletion_cost`

use celery_operator::broker::events::{Kind, WorkerEvent};
use celery_operator::lifecycle::roster::{PoolSettings, Roster};

const WORKERS: usize = 50;
const MINUTES: u64 = 30;
const HEARTBEAT_MS: u64 = 2000;

/// A small deterministic generator (xorshift64*): the figures are the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// An exponentially distributed duration of mean `mean_ms`.
    fn exp(&mut self, mean_ms: f64) -> u64 {
        (-mean_ms * (1.0 - self.next()).ln()) as u64
    }
}

/// One workload: each worker alternates tasks and idle gaps.
struct Workload {
    name: &'static str,
    /// Mean task length.
    task_ms: f64,
    /// Share of the time a worker runs a task.
    utilization: f64,
    /// Whether task lengths are exponential (else fixed).
    exponential: bool,
}

/// Per worker: when the current task ends (if running) and the next starts.
struct Sim {
    busy_until: u64,
    next_start: u64,
    processed: u64,
}

fn run(w: &Workload) -> (u64, u64) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut roster = Roster::new(vec![PoolSettings {
        name: "work".into(),
        deployment: "app-worker-work".into(),
        stalled_after_ms: 60_000,
        queues: vec!["work".into()],
        replace_stalled: false,
        heartbeats_pause_in_tasks: false,
    }]);
    let gap_ms = w.task_ms * (1.0 - w.utilization) / w.utilization;
    let mut sims: Vec<Sim> = (0..WORKERS)
        .map(|_| Sim {
            busy_until: 0,
            next_start: rng.exp(gap_ms),
            processed: 0,
        })
        .collect();
    let pods: Vec<String> = (0..WORKERS)
        .map(|i| format!("app-worker-work-5d9f-{i:05}"))
        .collect();
    for pod in &pods {
        roster.observe(&event(pod, Kind::Online, 0, 0), 0);
    }
    let (mut writes, mut naive) = (0u64, 0u64);
    let mut was_active = [false; WORKERS];
    // Heartbeats are spread over the 2 s as workers start at different times.
    let offsets: Vec<u64> = (0..WORKERS)
        .map(|_| (rng.next() * HEARTBEAT_MS as f64) as u64)
        .collect();
    for t in (0..MINUTES * 60_000).step_by(100) {
        for (i, sim) in sims.iter_mut().enumerate() {
            // Advance the worker's tasks to time t.
            while sim.next_start <= t {
                let length = if w.exponential {
                    rng.exp(w.task_ms)
                } else {
                    w.task_ms as u64
                };
                sim.busy_until = sim.next_start + length.max(1);
                sim.next_start = sim.busy_until + rng.exp(gap_ms);
                sim.processed += 1;
            }
            if t % HEARTBEAT_MS == offsets[i] / 100 * 100 {
                let active = sim.busy_until > t;
                // Tasks started so far (processed as Celery counts it, give or take the
                // running one: it only matters beside a backlog, and there is none here).
                let processed = sim.processed;
                roster.observe(
                    &event(&pods[i], Kind::Heartbeat, active.into(), processed),
                    t,
                );
                if active != was_active[i] {
                    naive += 1;
                    was_active[i] = active;
                }
            }
        }
        if t % 1000 == 0 {
            for (pod, cost) in roster.tick(t).writes {
                roster.written(&pod, cost);
                writes += 1;
            }
        }
    }
    (writes, naive)
}

fn event(pod: &str, kind: Kind, active: u32, processed: u64) -> WorkerEvent {
    WorkerEvent {
        hostname: format!("work@{pod}"),
        kind,
        active,
        processed,
        freq: 2.0,
    }
}

fn main() {
    let workloads = [
        Workload {
            name: "short tasks (200 ms), 10% busy",
            task_ms: 200.0,
            utilization: 0.1,
            exponential: true,
        },
        Workload {
            name: "short tasks (200 ms), 70% busy",
            task_ms: 200.0,
            utilization: 0.7,
            exponential: true,
        },
        Workload {
            name: "5 s tasks, 30% busy",
            task_ms: 5000.0,
            utilization: 0.3,
            exponential: true,
        },
        Workload {
            name: "long tasks (10 min), 50% busy",
            task_ms: 600_000.0,
            utilization: 0.5,
            exponential: false,
        },
    ];
    println!(
        "pod-deletion-cost writes with {WORKERS} workers over {MINUTES} simulated minutes \
         (heartbeat every 2 s):"
    );
    println!(
        "{:<34} {:>14} {:>24}",
        "workload", "writes/min", "naive (flip) writes/min"
    );
    for w in &workloads {
        let (writes, naive) = run(w);
        println!(
            "{:<34} {:>14.1} {:>24.1}",
            w.name,
            writes as f64 / MINUTES as f64,
            naive as f64 / MINUTES as f64
        );
    }
}
