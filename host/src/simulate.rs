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

use std::fmt::Write as _;

use crate::broker::QueueSample;
use crate::crd::Autoscaling;
use crate::plugin::{PluginConfig, Plugins, Registry};
use crate::scaler::{PoolScaler, Verdict};

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

/// Replays `trace` through the scaler `name` of `registry` for a pool with `autoscaling`
/// (its `scaler` is replaced by `name`), starting at `start` replicas.
pub fn replay(
    registry: std::sync::Arc<Registry>,
    name: &str,
    autoscaling: &Autoscaling,
    trace: &[TraceSample],
    start: u32,
) -> Run {
    let plugins = Plugins::new(registry, PluginConfig::default());
    let mut autoscaling = autoscaling.clone();
    let settings = autoscaling.scaler.as_ref().and_then(|s| s.settings.clone());
    autoscaling.scaler = Some(crate::crd::PluginRef {
        name: name.into(),
        digest: None,
        settings: settings.filter(|_| name != "queue-length"),
        limits: None,
    });
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
    use crate::sandbox::report::{Line, chart};
    use plotters::prelude::*;
    let colors = [BLUE, BLACK, GREEN, MAGENTA];
    let backlog = vec![Line {
        label: "backlog (ready + reserved)".into(),
        points: trace.iter().map(|s| (s.t, s.backlog() as f64)).collect(),
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
    let t_max = trace.last().map_or(1.0, |s| s.t.max(1.0));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1000, 600)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (top, bottom) = root.split_vertically(300);
        chart(&top, "recorded backlog", t_max, backlog)?;
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
