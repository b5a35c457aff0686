//! `celery-operator plugin simulate`: replays a recorded trace of queue samples through a
//! scaler plugin and through the built-in `queue-length`, each driven by the operator's own
//! scaler loop (`crate::scaler`: the same windows, clamps, behavior and failure rules as in
//! a cluster), and reports replicas over time, the reaction to the first backlog and the
//! replica-seconds spent.
//!
//! The replay is open loop: the samples are what was recorded, so more replicas do not drain
//! the queue faster here. It answers "what would this scaler have asked for on that day",
//! not "how would the queue have behaved" (`celery-operator sandbox` answers that, with real
//! workers).
//!
//! The trace is CSV with a header: `second` (or `seconds`), `ready`, and optionally
//! `reserved` and `queue` (several rows with the same second are the queues of one sample).
//! The sandbox's `samples.csv` (columns `t`, `queued`, `reserved`) is read too.
//!
//! With a *load* instead ([`serve`]: the sandbox's `second,tasks,task_seconds` CSV) the replay
//! is closed loop: a simulated pool serves the tasks first come, first served, with
//! `concurrency` processes per replica, replicas taking tasks `start_seconds` after they are
//! asked for, and the scaler sees the queue it leaves behind, and the workers' figures
//! (completions, running tasks) as the operator measures them from heartbeats. It reports how
//! long each task waited for a worker (p50, p95, max) and the replica-seconds spent: the
//! numbers to compare `latency` with `queue-length` on bursty and steady load.

use std::fmt::Write as _;

use std::collections::VecDeque;

use crate::broker::QueueSample;
use crate::crd::Autoscaling;
use crate::plugin::{PluginConfig, Plugins, Registry};
use crate::sandbox::load::Trace;
use crate::sandbox::report::Outcome;
use crate::scaler::{PoolScaler, Verdict};
use crate::workload::{Beat, WINDOW_MS};

/// One probe of the trace.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceSample {
    /// Seconds since the start of the trace.
    pub t: f64,
    /// The queues at that time.
    pub queues: Vec<QueueSample>,
}

impl TraceSample {
    /// Tasks waiting or reserved.
    pub fn backlog(&self) -> u64 {
        self.queues.iter().map(|q| q.ready + q.reserved).sum()
    }
}

/// Most samples read from one trace.
pub const MAX_SAMPLES: usize = 1_000_000;

/// Parses a trace (see the module's documentation).
pub fn parse(csv: &str) -> Result<Vec<TraceSample>, String> {
    let mut lines = csv.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .ok_or("the trace is empty")?
        .split(',')
        .map(str::trim)
        .collect();
    let column = |names: &[&str]| header.iter().position(|h| names.contains(h));
    let t = column(&["second", "seconds", "t"]).ok_or("the trace needs a `second` column")?;
    let ready = column(&["ready", "queued"]).ok_or("the trace needs a `ready` column")?;
    let reserved = column(&["reserved"]);
    let queue = column(&["queue"]);
    let mut samples: Vec<TraceSample> = Vec::new();
    for (n, line) in lines.enumerate() {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let row = n + 2;
        let field = |i: usize| {
            fields
                .get(i)
                .copied()
                .ok_or_else(|| format!("line {row}: too few fields"))
        };
        let number = |i: usize| -> Result<f64, String> {
            let text = field(i)?;
            text.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| format!("line {row}: {text:?} is not a number >= 0"))
        };
        let at = number(t)?;
        let sample = QueueSample {
            name: match queue {
                Some(i) => field(i)?.to_string(),
                None => "celery".into(),
            },
            ready: number(ready)? as u64,
            reserved: match reserved {
                Some(i) => number(i)? as u64,
                None => 0,
            },
            by_priority: Vec::new(),
            oldest_wait_ms: None,
        };
        match samples.last_mut() {
            Some(last) if last.t == at => last.queues.push(sample),
            Some(last) if last.t > at => {
                return Err(format!("line {row}: the seconds go backwards"));
            }
            _ => samples.push(TraceSample {
                t: at,
                queues: vec![sample],
            }),
        }
        if samples.len() > MAX_SAMPLES {
            return Err(format!("the trace has more than {MAX_SAMPLES} samples"));
        }
    }
    if samples.is_empty() {
        return Err("the trace has no samples".into());
    }
    Ok(samples)
}

/// What one scaler asked for over the trace.
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    /// The scaler's name.
    pub name: String,
    /// Replicas after each sample: (seconds, replicas).
    pub replicas: Vec<(f64, u32)>,
    /// The first decision that held (a failing plugin), if any: (seconds, why).
    pub first_hold: Option<(f64, String)>,
}

impl Run {
    /// Replica-seconds: each sample's replicas until the next sample.
    pub fn replica_seconds(&self) -> f64 {
        self.replicas
            .windows(2)
            .map(|w| f64::from(w[0].1) * (w[1].0 - w[0].0))
            .sum()
    }

    /// The most replicas asked for.
    pub fn peak(&self) -> u32 {
        self.replicas.iter().map(|r| r.1).max().unwrap_or(0)
    }

    /// Seconds from the first sample whose backlog needs more replicas than the pool has
    /// (at `target` tasks per replica) to the first scale-up; `None` if there was no such
    /// backlog or no scale-up.
    pub fn reaction(&self, trace: &[TraceSample], target: f64) -> Option<f64> {
        let start = self.replicas.first()?.1;
        let needed = trace
            .iter()
            .find(|s| s.backlog() as f64 > f64::from(start) * target)?
            .t;
        let up = self.replicas.iter().find(|r| r.1 > start)?.0;
        Some((up - needed).max(0.0))
    }
}

/// The plugins and the pool's autoscaling spec with its scaler replaced by `name` (the
/// built-in `queue-length` with its default settings, any other with the spec's settings).
fn scaled_by(
    registry: std::sync::Arc<Registry>,
    name: &str,
    autoscaling: &Autoscaling,
) -> (Plugins, Autoscaling) {
    let plugins = Plugins::new(registry, PluginConfig::default());
    let mut autoscaling = autoscaling.clone();
    let settings = autoscaling.scaler.as_ref().and_then(|s| s.settings.clone());
    autoscaling.scaler = Some(crate::crd::PluginRef {
        name: name.into(),
        digest: None,
        settings: settings.filter(|_| name != "queue-length"),
        limits: None,
    });
    (plugins, autoscaling)
}

/// Replays `trace` through the scaler `name` of `registry` for a pool with `autoscaling`
/// (its `scaler` is replaced by `name`), starting at `start` replicas.
pub fn replay(
    registry: std::sync::Arc<Registry>,
    name: &str,
    autoscaling: &Autoscaling,
    trace: &[TraceSample],
    start: u32,
) -> Run {
    let (plugins, autoscaling) = scaled_by(registry, name, autoscaling);
    let mut scaler = PoolScaler::default();
    let mut current = start;
    let mut run = Run {
        name: name.into(),
        replicas: Vec::with_capacity(trace.len()),
        first_hold: None,
    };
    for sample in trace {
        let now_ms = (sample.t * 1000.0) as u64;
        let verdict = scaler.tick(
            &plugins,
            "pool",
            &autoscaling,
            Ok(sample.queues.clone()),
            current,
            now_ms,
        );
        match verdict {
            Verdict::Scale { from, to, .. } => {
                scaler.record_scale(now_ms, from, to);
                current = to;
            }
            Verdict::Hold { reason, .. } if run.first_hold.is_none() => {
                run.first_hold = Some((sample.t, reason));
            }
            _ => {}
        }
        run.replicas.push((sample.t, current));
    }
    run
}

/// The simulated pool of a closed-loop replay.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Model {
    /// Worker processes per replica (the pool's `concurrency`).
    pub concurrency: u32,
    /// Seconds from asking for a replica to its worker taking tasks.
    pub start_seconds: f64,
    /// Seconds between two ticks of the scaler (`pollIntervalSeconds`).
    pub poll_seconds: f64,
}

/// What one scaler did in a closed-loop replay.
#[derive(Clone, Debug, PartialEq)]
pub struct Served {
    /// Replicas asked for at each tick: (seconds, replicas).
    pub run: Run,
    /// How long each task waited for a worker, in seconds, in the order they started.
    pub waits: Vec<f64>,
    /// Tasks not finished when the replay stopped (an hour after the load).
    pub unfinished: usize,
}

impl Served {
    /// Wait percentiles and cost, as the sandbox reports them.
    pub fn outcome(&self) -> Outcome {
        let run = &self.run;
        Outcome::from_waits(&run.name, &self.waits, run.replica_seconds(), run.peak())
    }
}

/// Time step of the closed-loop replay, in milliseconds.
const STEP_MS: u64 = 100;
/// How long after the load a closed-loop replay goes on, at most, for the pool to finish
/// its tasks and scale back down.
const AFTER_LOAD_MS: u64 = 3_600_000;

/// Serves `load` with a simulated pool ([`Model`]) scaled by the scaler `name`, starting at
/// `start` replicas (see the module's documentation). Deterministic.
pub fn serve(
    registry: std::sync::Arc<Registry>,
    name: &str,
    autoscaling: &Autoscaling,
    load: &Trace,
    model: &Model,
    start: u32,
) -> Served {
    let (plugins, autoscaling) = scaled_by(registry, name, autoscaling);
    let floor = autoscaling.min_replicas.max(0) as u32;
    let mut scaler = PoolScaler::new(Some(model.concurrency));
    let start_ms = (model.start_seconds.max(0.0) * 1000.0) as u64;
    let poll_ms = ((model.poll_seconds * 1000.0) as u64).max(STEP_MS);
    // When each replica takes tasks (asked-for order: the newest go first on scale-down).
    let mut pods: Vec<u64> = vec![0; start as usize];
    // Tasks waiting (arrived at, runs for), and when the running ones end.
    let mut waiting: VecDeque<(u64, u64)> = VecDeque::new();
    let mut running: Vec<u64> = Vec::new();
    let mut started: u64 = 0;
    let mut served = Served {
        run: Run {
            name: name.into(),
            replicas: Vec::new(),
            first_hold: None,
        },
        waits: Vec::new(),
        unfinished: 0,
    };
    let end_of_load = load.duration() as u64 * 1000;
    let mut now: u64 = 0;
    loop {
        if now.is_multiple_of(1000)
            && let Some(second) = load.seconds.get((now / 1000) as usize)
        {
            let runs_ms = (second.task_seconds * 1000.0) as u64;
            waiting.extend((0..second.tasks).map(|_| (now, runs_ms)));
        }
        running.retain(|end| *end > now);
        let ready = pods.iter().filter(|at| **at <= now).count();
        let capacity = ready * model.concurrency as usize;
        while running.len() < capacity
            && let Some((arrived, runs_ms)) = waiting.pop_front()
        {
            served.waits.push((now - arrived) as f64 / 1000.0);
            running.push(now + runs_ms);
            started += 1;
        }
        if now.is_multiple_of(1000) {
            scaler.beats.push_back(Beat {
                at_ms: now,
                started,
                running: running.len() as u32,
                workers: ready as u32,
            });
            while scaler
                .beats
                .front()
                .is_some_and(|b| b.at_ms + WINDOW_MS < now)
            {
                scaler.beats.pop_front();
            }
        }
        if now.is_multiple_of(poll_ms) {
            let sample = QueueSample {
                name: "celery".into(),
                ready: waiting.len() as u64,
                reserved: running.len() as u64,
                by_priority: Vec::new(),
                oldest_wait_ms: waiting.front().map(|(arrived, _)| now - arrived),
            };
            let current = pods.len() as u32;
            let verdict = scaler.tick(
                &plugins,
                "pool",
                &autoscaling,
                Ok(vec![sample]),
                current,
                now,
            );
            match verdict {
                Verdict::Scale { from, to, .. } => {
                    scaler.record_scale(now, from, to);
                    pods.resize(to as usize, now + start_ms);
                }
                Verdict::Hold { reason, .. } if served.run.first_hold.is_none() => {
                    served.run.first_hold = Some((now as f64 / 1000.0, reason));
                }
                _ => {}
            }
            served
                .run
                .replicas
                .push((now as f64 / 1000.0, pods.len() as u32));
            let idle = waiting.is_empty() && running.is_empty();
            if (now >= end_of_load && idle && pods.len() as u32 <= floor)
                || now >= end_of_load + AFTER_LOAD_MS
            {
                break;
            }
        }
        now += STEP_MS;
    }
    served.unfinished = waiting.len() + running.len();
    served
}

/// The closed-loop comparison as text.
pub fn served_report(load: &Trace, model: &Model, runs: &[Served]) -> String {
    let mut out = format!(
        "closed loop: {} tasks over {} s, {} processes per replica, replicas ready {} s after \
         they are asked for, a decision every {} s\n\n",
        load.total_tasks(),
        load.duration(),
        model.concurrency,
        model.start_seconds,
        model.poll_seconds
    );
    let rows: Vec<Outcome> = runs.iter().map(Served::outcome).collect();
    out.push_str(&crate::sandbox::report::outcomes(&rows));
    for run in runs {
        if run.unfinished > 0 {
            let _ = writeln!(
                out,
                "{}: {} tasks unfinished an hour after the load",
                run.run.name, run.unfinished
            );
        }
        if let Some((t, why)) = &run.run.first_hold {
            let _ = writeln!(
                out,
                "{}: first held at {t:.1} s: {}",
                run.run.name,
                crate::text::clean(why, 300)
            );
        }
    }
    out
}

/// The comparison as text: replicas whenever either changes, then a summary of each.
pub fn report(trace: &[TraceSample], runs: &[Run], target: f64) -> String {
    let mut out = String::new();
    let _ = write!(out, "{:>9} {:>8}", "second", "backlog");
    for run in runs {
        let _ = write!(out, " {:>14}", crate::text::clean(&run.name, 14));
    }
    out.push('\n');
    for (i, sample) in trace.iter().enumerate() {
        let changed = i == 0 || runs.iter().any(|r| r.replicas[i].1 != r.replicas[i - 1].1);
        if !changed {
            continue;
        }
        let _ = write!(out, "{:>9.1} {:>8}", sample.t, sample.backlog());
        for run in runs {
            let _ = write!(out, " {:>14}", run.replicas[i].1);
        }
        out.push('\n');
    }
    out.push('\n');
    for run in runs {
        let reaction = run
            .reaction(trace, target)
            .map_or("no scale-up".to_string(), |s| format!("{s:.1} s"));
        let _ = writeln!(
            out,
            "{}: reaction to the first backlog {reaction}, peak {} replicas, {:.0} replica-seconds",
            crate::text::clean(&run.name, 63),
            run.peak(),
            run.replica_seconds()
        );
        if let Some((t, why)) = &run.first_hold {
            let _ = writeln!(out, "  held at {t:.1} s: {}", crate::text::clean(why, 300));
        }
    }
    out
}

/// The comparison as SVG: the backlog, and each scaler's replicas.
pub fn plot(trace: &[TraceSample], runs: &[Run]) -> Result<String, String> {
    let backlog = trace.iter().map(|s| (s.t, s.backlog() as f64)).collect();
    plot_with(
        ("recorded backlog", "backlog (ready + reserved)", backlog),
        runs,
    )
}

/// The closed-loop comparison as SVG: the load, and each scaler's replicas.
pub fn plot_served(load: &Trace, runs: &[Served]) -> Result<String, String> {
    let sent = (load.seconds.iter().enumerate())
        .map(|(t, s)| (t as f64, f64::from(s.tasks)))
        .collect();
    let runs: Vec<Run> = runs.iter().map(|r| r.run.clone()).collect();
    plot_with(("load", "tasks sent per second", sent), &runs)
}

/// A plot of one series on top (caption, label, points) and the runs' replicas below.
fn plot_with(top: (&str, &str, Vec<(f64, f64)>), runs: &[Run]) -> Result<String, String> {
    use crate::sandbox::report::{Line, chart};
    use plotters::prelude::*;
    let colors = [BLUE, BLACK, GREEN, MAGENTA];
    let (caption, label, points) = top;
    let backlog = vec![Line {
        label: label.into(),
        points,
        color: RED,
        dashed: false,
    }];
    let replicas = runs
        .iter()
        .zip(colors.iter().cycle())
        .enumerate()
        .map(|(i, (run, color))| Line {
            label: crate::text::clean(&run.name, 63),
            points: run.replicas.iter().map(|r| (r.0, f64::from(r.1))).collect(),
            color: *color,
            dashed: i > 0,
        })
        .collect();
    let t_max = (backlog[0].points.iter().map(|p| p.0))
        .chain(runs.iter().flat_map(|r| r.replicas.iter().map(|p| p.0)))
        .fold(1.0, f64::max);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1000, 600)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (top, bottom) = root.split_vertically(300);
        chart(&top, caption, t_max, backlog)?;
        chart(&bottom, "replicas asked for", t_max, replicas)?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_are_read_per_second_and_queue() {
        let trace = parse("second,queue,ready,reserved\n0,a,1,0\n0,b,2,1\n5,a,10,0\n").unwrap();
        assert_eq!(trace.len(), 2);
        assert_eq!(trace[0].backlog(), 4);
        assert_eq!(trace[1].queues[0].ready, 10);
        let sandbox = parse("t,queued,reserved,desired\n0.5,3,1,1\n").unwrap();
        assert_eq!(sandbox[0].backlog(), 4);
        assert!(
            parse("second,ready\n5,1\n4,1\n")
                .unwrap_err()
                .contains("backwards")
        );
        assert!(
            parse("second,ready\n5,-1\n")
                .unwrap_err()
                .contains("line 2")
        );
        assert!(parse("when,ready\n").unwrap_err().contains("second"));
        assert!(parse("second,ready\n").unwrap_err().contains("no samples"));
    }

    #[test]
    fn replica_seconds_and_reaction_come_from_the_replicas_over_time() {
        let trace = parse("second,ready\n0,0\n10,50\n20,50\n30,0\n").unwrap();
        let run = Run {
            name: "x".into(),
            replicas: vec![(0.0, 1), (10.0, 1), (20.0, 10), (30.0, 10)],
            first_hold: None,
        };
        assert_eq!(run.replica_seconds(), 10.0 + 10.0 + 100.0);
        assert_eq!(run.reaction(&trace, 5.0), Some(10.0));
        assert_eq!(run.peak(), 10);
    }
}
